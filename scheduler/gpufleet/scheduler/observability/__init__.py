"""What the controller tells people and machines about itself: Prometheus metrics
(`metrics`) and Alertmanager delivery (`alerting`). systemd readiness and the `/metrics` HTTP
server are gpufleet.rpc.daemon's, shared with the agent."""
