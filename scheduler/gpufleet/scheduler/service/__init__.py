"""The wire: gRPC servicers, their clients, and the one place protobuf becomes domain types.

`server` (the agents' stream and the controller process), `ingest` (validated reports ->
store and health policy), `limits` (per-field bounds checked before ingest), `user_service` /
`user_client` / `placecall` (FleetUser for people, authenticated by MUNGE; the servicer runs
userapi.LocalUserApi for the caller), `user_remote` (the user API over that client),
`user_wire` (FleetUser's messages <-> the user API's types), `convert` (the agents' messages
-> domain types; the one decode of a stored inventory), `repair_link` (repair commands on the
agents' streams), `leader` (active/standby on PostgreSQL).
"""
