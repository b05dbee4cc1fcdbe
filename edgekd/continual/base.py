"""The continual plug-in interface: the trainer's hooks (per fit) plus task boundaries (Avalanche's
before/after_training_exp), called by the continual runner around each task's fit."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edgekd.continual.scenarios import Task
from edgekd.train.trainer import Plugin


@dataclass
class TaskStep:
    """Where the sequence is: the model, all tasks, the index of the task being learned, the head layout."""

    model: nn.Module
    tasks: list[Task]
    step: int
    head: str
    device: torch.device

    @property
    def task(self) -> Task:
        return self.tasks[self.step]


class ContinualPlugin(Plugin):
    """A Plugin that also sees task boundaries. Override what you need."""

    def before_task(self, step: TaskStep) -> None: ...
    def train_data(self, data, step: TaskStep):
        """The data the trainer fits on for this task (rehearsal mixes its buffer in here)."""
        return data
    def after_task(self, step: TaskStep) -> None: ...
