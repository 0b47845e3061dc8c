"""snd.train: the stage-two distillation loop, its schedule, checkpoints and run directory."""
