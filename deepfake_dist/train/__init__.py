"""The trainer (``loop``), its run state, checkpoints, fault handling and rank heartbeat; tasks
plug in their step."""
