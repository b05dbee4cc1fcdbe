"""Learning without forgetting (Li & Hoiem 2016) / KD from the previous model: the outputs the earlier tasks own
are distilled from a frozen copy of the model as it was before the current task."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from edgekd.continual.base import ContinualPlugin, TaskStep


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton KD: T^2 * KL(softmax(teacher / T) || softmax(student / T)), batch mean."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                    reduction="batchmean", log_target=True) * t * t


class LwFPlugin(ContinualPlugin):
    """+ alpha * KD on the old outputs of every training batch (new-task and, with rehearsal, buffer images).

    multi-head: one softmax per old task's head; single head: one softmax over all old classes.
    """

    def __init__(self, alpha: float = 1.0, temperature: float = 2.0):
        self.alpha, self.temperature = alpha, temperature
        self.previous: torch.nn.Module | None = None
        self.old_ranges: list[tuple[int, int]] = []

    def before_task(self, step: TaskStep) -> None:
        self.previous = None
        if step.step == 0 or self.alpha == 0:
            return
        self.previous = copy.deepcopy(step.model).eval()
        for p in self.previous.parameters():
            p.requires_grad_(False)
        old = step.tasks[: step.step]
        self.old_ranges = [(t.lo, t.hi) for t in old] if step.head == "multi" else [(0, old[-1].hi)]

    def penalty(self, trainer, images, targets, logits):
        if self.previous is None:
            return None
        with torch.no_grad():
            old_logits = self.previous(images)
        loss = sum(kd_kl(logits[:, lo:hi], old_logits[:, lo:hi], self.temperature) for lo, hi in self.old_ranges)
        return self.alpha * loss

    def after_task(self, step: TaskStep) -> None:
        self.previous = None
