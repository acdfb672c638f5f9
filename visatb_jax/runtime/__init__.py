"""What every stage runs on: sharding (mesh, rules, multi-host), fileio, checkpoint, metrics_log."""
