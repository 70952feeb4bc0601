"""What every training task and command stands on: the accelerator and its process group,
optimizers and schedules, tracking, metrics. Nothing here imports ``train``, ``tasks``,
``evaluation`` or the commands above them."""
