"""Training entry points shared by train_net.py, the demo and the smoke tests."""
from .trainer import Trainer, setup_cfg  # noqa: F401
