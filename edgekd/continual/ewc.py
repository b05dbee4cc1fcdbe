"""Elastic weight consolidation (Kirkpatrick et al. 2017) and online EWC (Schwarz et al. 2018): a quadratic
penalty pulling each weight towards its value after earlier tasks, weighted by the diagonal Fisher."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, Subset

from edgekd.continual.base import ContinualPlugin, TaskStep
from edgekd.continual.scenarios import output_range

# Per-sample gradients of a chunk must fit in about this many bytes.
_PER_SAMPLE_BYTES = 256 * 2**20


def _overlap(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The leading block of `t` that a tensor of `shape` has (an expanded head keeps its old rows first)."""
    return t[tuple(slice(0, s) for s in shape)]


def ewc_penalty(model: nn.Module, terms: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]) -> torch.Tensor:
    """sum over terms (fisher, anchor) of sum_k F_k (theta_k - theta*_k)^2; rows a grown head added are free."""
    params = dict(model.named_parameters())
    total = next(model.parameters()).new_zeros(())
    for fisher, anchor in terms:
        for name, ref in anchor.items():
            p = params.get(name)
            if p is None or not p.requires_grad:
                continue
            total = total + (fisher[name] * (_overlap(p, ref.shape) - ref) ** 2).sum()
    return total


def diagonal_fisher(model: nn.Module, loader, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    device: torch.device) -> dict[str, torch.Tensor]:
    """Empirical diagonal Fisher: mean over samples of the squared per-sample gradient of `loss_fn`, model in
    eval mode. Per-sample gradients come from torch.func (vmap over grad), chunked to bound memory."""
    was_training = model.training
    model.eval()
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())
    n_params = sum(p.numel() for p in params.values())
    chunk = max(1, _PER_SAMPLE_BYTES // (4 * max(n_params, 1)))

    def sample_loss(p, x, y):
        return loss_fn(functional_call(model, (p, buffers), (x.unsqueeze(0),)), y.unsqueeze(0))

    per_sample_grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    fisher = {k: torch.zeros_like(p) for k, p in params.items()}
    n = 0
    for images, targets in loader:
        images, targets = images.to(device), targets.to(device)
        for i in range(0, len(images), chunk):
            g = per_sample_grads(params, images[i: i + chunk], targets[i: i + chunk])
            for k in fisher:
                fisher[k] += g[k].pow(2).sum(0)
        n += len(images)
    model.train(was_training)
    return {k: v / max(n, 1) for k, v in fisher.items()}


class EWCPlugin(ContinualPlugin):
    """Adds (weight / 2) * EWC penalty to every training step after the first task.

    Separate EWC keeps one (Fisher, anchor) per finished task; online EWC keeps a single running Fisher
    gamma * F_old + F_new anchored at the latest weights.
    """

    def __init__(self, weight: float, online: bool = False, gamma: float = 1.0, fisher_samples: int = 1000,
                 seed: int = 0):
        self.weight, self.online, self.gamma = weight, online, gamma
        self.fisher_samples, self.seed = fisher_samples, seed
        self.terms: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []

    def penalty(self, trainer, images, targets, logits):
        if not self.terms or self.weight == 0:
            return None
        return 0.5 * self.weight * ewc_penalty(trainer.model, self.terms)

    def after_task(self, step: TaskStep) -> None:
        task = step.task
        ds = task.data.dataset("train", train=False)
        rng = np.random.default_rng(self.seed + step.step)
        idx = rng.permutation(len(ds))[: self.fisher_samples]
        loader = DataLoader(Subset(ds, idx.tolist()), batch_size=task.data.cfg.batch_size, shuffle=False)
        lo, hi = output_range(step.tasks, step.head, step.step, step.step)

        def task_loss(logits, targets):
            return F.cross_entropy(logits[:, lo:hi], targets - lo)

        fisher = diagonal_fisher(step.model, loader, task_loss, step.device)
        anchor = {k: p.detach().clone() for k, p in step.model.named_parameters() if k in fisher}
        if self.online and self.terms:
            old, _ = self.terms[0]
            for k, f in fisher.items():
                if k in old:
                    padded = torch.zeros_like(f)
                    _overlap(padded, old[k].shape).copy_(old[k])
                    fisher[k] = f + self.gamma * padded
            self.terms = [(fisher, anchor)]
        else:
            self.terms.append((fisher, anchor))
