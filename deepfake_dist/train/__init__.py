"""The training loop, its checkpoints, metrics and logging; tasks plug in their step."""
