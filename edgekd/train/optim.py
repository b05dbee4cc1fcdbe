"""Optimizers with differential (head vs backbone) learning rates, and warmup + cosine / plateau schedules."""

from __future__ import annotations

import torch
from torch import nn

from edgekd.models import head_parameters


def build_optimizer(model: nn.Module, cfg, extra_params: list[nn.Parameter] | None = None) -> torch.optim.Optimizer:
    """AdamW / Adam / SGD. With `head_lr`, the classifier head (and KD adapters in `extra_params`) get their
    own group at head_lr; the backbone keeps `lr`."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    extra = [p for p in (extra_params or []) if p.requires_grad]
    if cfg.head_lr is not None:
        head_ids = {id(p) for p in head_parameters(model)}
        head = [p for p in trainable if id(p) in head_ids] + extra
        backbone = [p for p in trainable if id(p) not in head_ids]
        groups = [{"params": backbone, "lr": cfg.lr, "name": "backbone"}, {"params": head, "lr": cfg.head_lr, "name": "head"}]
    else:
        groups = [{"params": trainable + extra, "lr": cfg.lr, "name": "all"}]
    groups = [g for g in groups if g["params"]]
    if cfg.name == "sgd":
        # Nesterov momentum when there is momentum (torch refuses nesterov with momentum 0).
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg, epochs: int):
    """Stepped once per epoch. cosine: linear warmup for `warmup_epochs`, then cosine to `min_lr`.
    plateau: ReduceLROnPlateau on `cfg.monitor` in direction `cfg.mode` (step(value))."""
    if cfg.name == "none" or epochs == 0:
        return None
    if cfg.name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=cfg.mode or "max", factor=cfg.factor,
                                                          patience=cfg.patience, min_lr=cfg.min_lr)
    warmup = min(cfg.warmup_epochs, max(epochs - 1, 0))
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs - warmup, 1), eta_min=cfg.min_lr)
    if not warmup:
        return cosine
    linear = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, end_factor=1.0, total_iters=warmup)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [linear, cosine], milestones=[warmup])
