"""Training: DeepSpeed engine, loop, checkpoints, LR schedule, metrics."""
