"""Continual learning: anti-forgetting plug-ins on the one trainer (EWC, LwF, rehearsal, BN freeze), task
scenarios with expanding heads, and CL metrics over an accuracy matrix."""

from edgekd.continual.metrics import (average_accuracy, backward_transfer, forgetting, forgetting_per_task,
                                      retention)

__all__ = ["average_accuracy", "backward_transfer", "forgetting", "forgetting_per_task", "retention"]
