"""Training: registered models (``training.models``), the Horovod/DDP trainer and checkpoints."""
