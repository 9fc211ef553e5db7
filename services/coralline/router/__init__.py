"""The router: where sessions go (placement.py, a pure function), where workers are found
(discovery.py); the Ray Serve application and failover build on these (issue 13)."""
