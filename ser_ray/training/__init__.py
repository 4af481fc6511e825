"""Pure-torch training: settings, engine, schedule, checkpoints, clip batching, fine-tuning and
pre-training loops."""
