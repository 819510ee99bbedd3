"""Training engine: train step, optimizer, LR schedule, loss, metrics, callbacks, checkpoint files, the run."""
