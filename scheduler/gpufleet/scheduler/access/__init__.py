"""Who may do what: the cluster CA and mTLS (`certs`, `tls`), MUNGE identities (`munge`),
and the audit log of every state-changing action (`audit`)."""
