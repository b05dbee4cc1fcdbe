"""Continual learning: anti-forgetting plug-ins on the one trainer (EWC, LwF, rehearsal, BN freeze), task
scenarios with expanding heads, and CL metrics over an accuracy matrix."""

from edgekd.continual.metrics import (average_accuracy, backward_transfer, forgetting, forgetting_per_task,
                                      retention, retention_misses, retention_per_task)
from edgekd.continual.run import evaluate_continual_checkpoint, finished_run, run_continual
from edgekd.continual.scenarios import (build_tasks, recorded_tasks, repeated_tasks, task_data_section, task_head,
                                       task_warnings)

__all__ = ["average_accuracy", "backward_transfer", "build_tasks", "evaluate_continual_checkpoint", "finished_run",
           "forgetting", "forgetting_per_task", "recorded_tasks", "repeated_tasks", "retention", "retention_misses",
           "retention_per_task", "run_continual", "task_data_section", "task_head", "task_warnings"]
