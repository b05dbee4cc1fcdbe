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


def schedule_warnings(cfg, optimizer: torch.optim.Optimizer, swa_start: int | None) -> list[str]:
    """What a run's train section asks for and will not get (each had been dropped without a word): a warmup as
    long as the run, a warmup under the plateau schedule, a head_lr without a trainable head, SWA that starts after
    the last epoch, SWA's single learning rate over differential ones."""
    sched, lines = cfg.scheduler, []
    if sched.name == "cosine" and cfg.epochs and sched.warmup_epochs >= cfg.epochs:
        lines.append(f"warning: train.scheduler.warmup_epochs {sched.warmup_epochs} >= train.epochs {cfg.epochs}: the "
                     f"warmup is cut to {max(cfg.epochs - 1, 0)} epoch(s), the cosine decay to one")
    if sched.name == "plateau" and sched.warmup_epochs:
        lines.append(f"warning: train.scheduler.warmup_epochs {sched.warmup_epochs}: the plateau schedule has no "
                     "warmup (cosine only); not used")
    groups = {g.get("name") for g in optimizer.param_groups}
    if cfg.optimizer.head_lr is not None and "head" not in groups:
        lines.append(f"warning: train.optimizer.head_lr {cfg.optimizer.head_lr:g}: the model has no trainable "
                     "classifier head (frozen?); every parameter trains at train.optimizer.lr")
    if swa_start is not None and swa_start >= cfg.epochs:
        lines.append(f"warning: train.swa.start_epoch {swa_start} >= train.epochs {cfg.epochs}: no weights will be "
                     "averaged")
    if swa_start is not None and cfg.swa.lr is not None and len(groups) > 1:
        lines.append(f"note: from epoch {swa_start + 2} SWALR anneals every parameter group to train.swa.lr "
                     f"{cfg.swa.lr:g}, reached at epoch {swa_start + 1 + cfg.swa.anneal_epochs} (head_lr's ratio ends "
                     "there)")
    if swa_start is not None and not cfg.monitor.startswith("val_"):  # SWA's weights are scored on val only
        lines.append(f"warning: train.monitor {cfg.monitor} is not a val_ metric, which SWA's averaged weights are "
                     "scored by: they are never kept as best.pt (monitor a val_ metric to let them be)")
    return lines
