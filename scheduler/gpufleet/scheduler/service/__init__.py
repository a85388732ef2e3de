"""The wire: gRPC servicers, their clients, and the one place protobuf becomes domain types.

`server` (the agents' stream and the controller process), `ingest` (validated reports ->
store and health policy), `limits` (per-field bounds checked before ingest), `user_service` /
`user_client` / `placecall` (FleetUser for people, authenticated by MUNGE), `leader`
(active/standby on PostgreSQL).
"""
