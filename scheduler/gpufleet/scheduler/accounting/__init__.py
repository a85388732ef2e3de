"""GPU time and energy per job: the ledger's Prometheus view (`metrics`). The ledger itself
is stored by `gpufleet.scheduler.store.acct`; its types and time arithmetic are `ledger`."""
