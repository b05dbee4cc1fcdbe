"""Supervised losses: cross-entropy (class weights, label smoothing) and focal loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgekd.errors import EdgeKDError


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): mean over the batch of -alpha_y (1 - p_y)^gamma log p_y.

    alpha: None, a scalar (weight of class 1 in binary tasks, 1 - alpha for class 0) or one weight per class.
    """

    def __init__(self, gamma: float = 2.0, alpha: float | list[float] | torch.Tensor | None = None,
                 label_smoothing: float = 0.0):
        super().__init__()
        self.gamma, self.label_smoothing = gamma, label_smoothing
        if alpha is not None and not torch.is_tensor(alpha):
            alpha = torch.tensor([1.0 - alpha, alpha] if isinstance(alpha, (int, float)) else alpha, dtype=torch.float32)
        self.register_buffer("alpha", alpha if alpha is not None else None)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits.float(), dim=1)
        logp_t = logp.gather(1, target[:, None]).squeeze(1)
        # 1 - p_t from log p_t, floored: p_t rounded to 1.0 made (1 - p_t) ** gamma's gradient infinite for gamma < 1
        # (NaN gradients under a finite loss once an image was confidently right)
        one_minus = (-torch.expm1(logp_t)).clamp_min(1e-12)
        if self.label_smoothing:
            k = logits.shape[1]
            nll = -(1 - self.label_smoothing) * logp_t - self.label_smoothing / k * logp.sum(1)
        else:
            nll = -logp_t
        loss = one_minus ** self.gamma * nll
        if self.alpha is not None:
            loss = loss * self.alpha.to(loss.device)[target]
        return loss.mean()


class ClassWeightedCE(nn.Module):
    """Cross-entropy with class weights as the mean over the batch's images of each image's weighted loss
    (Keras' `class_weight` reduction), not torch's sum(w_y x loss) / sum(w_y). A batch's loss is then a sum over its
    images divided by their count, so accumulated micro-batches (and DDP ranks) add up to one big batch's loss; under
    torch's normalisation each micro-batch was normalised by its own weights, and in a micro-batch of one class the
    weight cancelled (class weights did nothing at data.batch_size 1). The balanced weights n / (k x count) average
    1 over the train split's images, so both reductions agree on average."""

    def __init__(self, weight: torch.Tensor, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, weight=self.weight.to(logits.device, logits.dtype), reduction="none",
                               label_smoothing=self.label_smoothing).mean()


def cross_entropy_loss(weight: torch.Tensor | None, label_smoothing: float = 0.0) -> nn.Module:
    """torch's CrossEntropyLoss, or ClassWeightedCE when there are class weights."""
    if weight is None:
        return nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    return ClassWeightedCE(weight, label_smoothing)


def check_alpha_fits(alpha, num_classes: int | None, key: str) -> None:
    """A focal alpha fits the data: a scalar for two classes only, a list of one weight per class (it had failed
    at the first step with an IndexError, or a list too long had passed)."""
    if alpha is None or num_classes is None:
        return
    if isinstance(alpha, list) and len(alpha) != num_classes:
        raise EdgeKDError(f"{key}: {len(alpha)} weights for {num_classes} classes (give one per class)")
    if not isinstance(alpha, list) and num_classes != 2:
        raise EdgeKDError(f"{key}: a scalar alpha weighs class 1 against class 0 of a two-class task; the data has "
                          f"{num_classes} classes (give one weight per class)")


def build_loss(loss_cfg, class_weights: torch.Tensor | None = None) -> nn.Module:
    """The recipe's train.loss -> a module taking (logits, targets); `class_weights` has one entry per class."""
    weight = class_weights if loss_cfg.class_weights else None
    if loss_cfg.name == "focal":
        check_alpha_fits(loss_cfg.alpha, None if class_weights is None else len(class_weights), "train.loss.alpha")
        alpha = loss_cfg.alpha if loss_cfg.alpha is not None else weight
        return FocalLoss(loss_cfg.gamma, alpha, loss_cfg.label_smoothing)
    return cross_entropy_loss(weight, loss_cfg.label_smoothing)
