"""Training: CLI, loop, functional steps, optimizer, losses."""
