"""Training: the one trainer, losses, optimizers/schedules, checkpoints, and the recipe runner."""

from edgekd.train.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from edgekd.train.trainer import Plugin, SupervisedObjective, Trainer, evaluate, predict_logits, seed_everything

__all__ = ["Plugin", "SupervisedObjective", "Trainer", "evaluate", "load_checkpoint",
           "model_from_checkpoint", "predict_logits", "save_checkpoint", "seed_everything"]
