"""What the controller tells people and machines about itself: Prometheus metrics
(`metrics`), systemd readiness (`sdnotify`) and Alertmanager delivery (`alerting`)."""
