"""BN freeze: BatchNorm layers stay in eval mode (running statistics untouched) with frozen affine parameters
while later tasks train, so a new domain's statistics do not overwrite the old one's."""

from __future__ import annotations

from torch import nn

from edgekd.continual.base import ContinualPlugin, TaskStep


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def freeze_batchnorm(model: nn.Module) -> None:
    """Eval mode and no gradients for every BatchNorm layer (timm's BatchNormAct2d included)."""
    for m in batchnorm_layers(model):
        m.eval()
        for p in m.parameters(recurse=False):
            p.requires_grad_(False)


class BNFreezePlugin(ContinualPlugin):
    """Active from the second task on: the first task (if trained here) still needs to learn its statistics."""

    def __init__(self) -> None:
        self.active = False
        self._saved: list[tuple[nn.Parameter, bool]] = []

    def before_task(self, step: TaskStep) -> None:
        self.active = step.step > 0

    def before_fit(self, trainer) -> None:
        if self.active:
            self._saved = [(p, p.requires_grad) for m in batchnorm_layers(trainer.model)
                           for p in m.parameters(recurse=False)]
            freeze_batchnorm(trainer.model)

    def before_epoch(self, trainer, epoch: int) -> None:
        # The trainer calls model.train() at every epoch start (and evaluation restores train mode): re-freeze.
        if self.active:
            freeze_batchnorm(trainer.model)

    def after_fit(self, trainer) -> None:
        for p, flag in self._saved:
            p.requires_grad_(flag)
        self._saved = []
