"""KD loss terms as small registered modules, combined by the recipe's `distill.terms` into one weighted sum."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from edgekd.distill.features import FeatureAdapter, FeatureMaps, align_spatial
from edgekd.errors import EdgeKDError
from edgekd.train.losses import FocalLoss, check_alpha_fits, cross_entropy_loss

LOSS_TERMS: dict[str, Callable[..., "LossTerm"]] = {}


def register_term(kind: str):
    def deco(builder):
        LOSS_TERMS[kind] = builder
        return builder
    return deco


@dataclass
class KDBatch:
    """What a term may look at: student outputs, labels, and (when a term needs them) the teacher's."""

    student_logits: torch.Tensor
    targets: torch.Tensor
    teacher_logits: torch.Tensor | None = None
    student_features: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_features: dict[str, torch.Tensor] = field(default_factory=dict)


class LossTerm(nn.Module):
    """One term of the KD loss. `needs_teacher_logits` / `student_layer` / `teacher_layer` tell the objective
    what to compute before calling it."""

    needs_teacher_logits = False
    student_layer: str | None = None
    teacher_layer: str | None = None

    def forward(self, batch: KDBatch) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(p_teacher^T || p_student^T) * T^2, averaged over the batch (Hinton et al. 2015; torchdistill's KDLoss).

    The T^2 factor keeps the soft-target gradients on the same scale as the hard-label ones when T changes.
    """
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * (t * t)


class KLDivergence(LossTerm):
    needs_teacher_logits = True

    def __init__(self, temperature: float):
        super().__init__()
        self.temperature = temperature

    def forward(self, batch: KDBatch) -> torch.Tensor:
        return kl_divergence(batch.student_logits, batch.teacher_logits, self.temperature)


def decoupled_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                 temperature: float, alpha: float, beta: float) -> torch.Tensor:
    """DKD (Zhao et al. 2022; the authors' mdistiller code): alpha * TCKD + beta * NCKD, batch-mean, times T^2.

    TCKD = KL(b_t || b_s) of the binary (target, rest) probabilities at T; NCKD = KL between the teacher's and the
    student's softmax at T over the non-target classes only (the target logit masked out)."""
    t = temperature
    s, te = student_logits.float() / t, teacher_logits.float() / t
    gt = F.one_hot(targets, s.shape[1]).bool()
    # the binary (target, rest) log-probabilities in log space: 1 - p_target rounds to 0 in float32 once the rest
    # is below ~1e-7, and TCKD's value and gradient had gone wrong there (the student pushed the wrong way)
    log_b_s, log_b_t = (torch.stack([lp[gt], torch.logsumexp(lp.masked_fill(gt, float("-inf")), dim=1)], dim=1)
                        for lp in (F.log_softmax(s, dim=1), F.log_softmax(te, dim=1)))
    tckd = (log_b_t.exp() * (log_b_t - log_b_s)).sum(1).mean()
    if s.shape[1] > 2:
        log_q_s = F.log_softmax(s.masked_fill(gt, float("-inf")), dim=1).masked_fill(gt, 0.0)
        log_q_t = F.log_softmax(te.masked_fill(gt, float("-inf")), dim=1).masked_fill(gt, 0.0)
        nckd = (log_q_t.exp() * (log_q_t - log_q_s)).sum(1).mean()
    else:  # one non-target class: its distribution is certain, NCKD is 0
        nckd = s.new_zeros(())
    return (alpha * tckd + beta * nckd) * (t * t)


class DecoupledKD(LossTerm):
    needs_teacher_logits = True

    def __init__(self, temperature: float, alpha: float, beta: float):
        super().__init__()
        self.temperature, self.alpha, self.beta = temperature, alpha, beta

    def forward(self, batch: KDBatch) -> torch.Tensor:
        return decoupled_kd(batch.student_logits, batch.teacher_logits, batch.targets, self.temperature,
                            self.alpha, self.beta)


class LabelLoss(LossTerm):
    """A supervised criterion (CE or focal) on the hard labels."""

    def __init__(self, criterion: nn.Module):
        super().__init__()
        self.criterion = criterion

    def forward(self, batch: KDBatch) -> torch.Tensor:
        return self.criterion(batch.student_logits.float(), batch.targets)


class FeatureMSE(LossTerm):
    """MSE between adapter(student feature map) and the teacher's, after spatial alignment.

    The teacher map is a fixed target (no_grad); gradients flow into the student and the adapter.
    """

    def __init__(self, student_layer: str, teacher_layer: str, adapter: FeatureAdapter, spatial: str):
        super().__init__()
        self.student_layer, self.teacher_layer = student_layer, teacher_layer
        self.adapter, self.spatial = adapter, spatial

    def forward(self, batch: KDBatch) -> torch.Tensor:
        student = self.adapter(batch.student_features[self.student_layer])
        teacher = self.adapter.teacher_map(batch.teacher_features[self.teacher_layer])
        student, teacher = align_spatial(student, teacher, self.spatial)
        return F.mse_loss(student.float(), teacher.float())


def attention_map(feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """(B, C, H, W) -> (B, 1, H, W): the channel mean of |A|^p (Zagoruyko & Komodakis 2017, F_sum^p up to 1/C,
    which the L2 normalization that follows removes; so teacher and student channel counts may differ)."""
    return feature.float().abs().pow(p).mean(dim=1, keepdim=True)


def attention_transfer(student_map: torch.Tensor, teacher_map: torch.Tensor, p: float = 2.0,
                       spatial: str = "interpolate") -> torch.Tensor:
    """Mean squared difference of the L2-normalized, flattened attention maps (the authors' code: at_loss).

    The maps are reduced over channels first, then brought to one grid (`align_spatial`: by default the student's
    attention map is interpolated to the teacher's size).
    """
    qs, qt = align_spatial(attention_map(student_map, p), attention_map(teacher_map, p), spatial)
    qs, qt = F.normalize(qs.flatten(1), dim=1), F.normalize(qt.flatten(1), dim=1)
    return (qs - qt).pow(2).mean()


class AttentionTransfer(LossTerm):
    """Attention-transfer KD on one (student layer, teacher layer) pair; no trainable parameters."""

    def __init__(self, student_layer: str, teacher_layer: str, maps: FeatureMaps, p: float, spatial: str):
        super().__init__()
        self.student_layer, self.teacher_layer = student_layer, teacher_layer
        self.maps, self.p, self.spatial = maps, p, spatial

    def forward(self, batch: KDBatch) -> torch.Tensor:
        student = self.maps.student_map(batch.student_features[self.student_layer])
        teacher = self.maps.teacher_map(batch.teacher_features[self.teacher_layer])
        return attention_transfer(student, teacher, self.p, self.spatial)


@register_term("kl")
def _build_kl(cfg, class_weights: torch.Tensor | None, adapter: FeatureAdapter | None = None) -> LossTerm:
    return KLDivergence(cfg.temperature)


@register_term("dkd")
def _build_dkd(cfg, class_weights: torch.Tensor | None, adapter: FeatureAdapter | None = None) -> LossTerm:
    return DecoupledKD(cfg.temperature, cfg.alpha, cfg.beta)


@register_term("ce")
def _build_ce(cfg, class_weights: torch.Tensor | None, adapter: FeatureAdapter | None = None) -> LossTerm:
    weight = class_weights if cfg.class_weights else None
    return LabelLoss(cross_entropy_loss(weight, cfg.label_smoothing))


@register_term("focal")
def _build_focal(cfg, class_weights: torch.Tensor | None, adapter: FeatureAdapter | None = None) -> LossTerm:
    check_alpha_fits(cfg.alpha, None if class_weights is None else len(class_weights), "distill.terms[focal].alpha")
    alpha = cfg.alpha if cfg.alpha is not None else (class_weights if cfg.class_weights else None)
    return LabelLoss(FocalLoss(cfg.gamma, alpha, cfg.label_smoothing))


@register_term("feature_mse")
def _build_feature(cfg, class_weights: torch.Tensor | None, adapter: FeatureAdapter | None = None) -> LossTerm:
    if adapter is None:
        raise EdgeKDError(f"distill.terms: feature_mse {cfg.student} -> {cfg.teacher} needs an adapter")
    return FeatureMSE(cfg.student, cfg.teacher, adapter, cfg.spatial)


@register_term("attention")
def _build_attention(cfg, class_weights: torch.Tensor | None, maps: FeatureMaps | None = None) -> LossTerm:
    if maps is None:  # layouts are resolved by a probe forward in build_objective; without one assume NCHW maps
        maps = FeatureMaps(cfg.student_layout if cfg.student_layout != "auto" else "nchw",
                           cfg.teacher_layout if cfg.teacher_layout != "auto" else "nchw")
    return AttentionTransfer(cfg.student, cfg.teacher, maps, cfg.p, cfg.spatial)


class DistillLoss(nn.Module):
    """sum_i weight_i * term_i(batch); also returns each term's value (detached) for logging."""

    def __init__(self, terms: list[LossTerm], weights: list[float], names: list[str],
                 warmups: list[int] | None = None):
        super().__init__()
        warmups = [0] * len(terms) if warmups is None else list(warmups)
        if not (len(terms) == len(weights) == len(names) == len(warmups)):
            raise ValueError("terms, weights, names and warmups must have the same length")
        self.terms = nn.ModuleList(terms)
        self.weights, self.names = list(weights), list(names)
        self.warmups = warmups  # per term: the epochs over which its weight rises linearly (0: none)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """epoch counted from 0: a term with warmup_epochs N weighs min((epoch + 1) / N, 1) x its weight."""
        self.scales = [min((epoch + 1) / w, 1.0) if w else 1.0 for w in self.warmups]

    @property
    def needs_teacher_logits(self) -> bool:
        return any(t.needs_teacher_logits for t in self.terms)

    @property
    def student_layers(self) -> list[str]:
        return sorted({t.student_layer for t in self.terms if t.student_layer})

    @property
    def teacher_layers(self) -> list[str]:
        return sorted({t.teacher_layer for t in self.terms if t.teacher_layer})

    def forward(self, batch: KDBatch, labelled: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
        """labelled=False (a batch of unlabeled images): the label terms (ce, focal) are skipped."""
        total = batch.student_logits.new_zeros((), dtype=torch.float32)
        parts: dict[str, float] = {}
        for name, weight, scale, term in zip(self.names, self.weights, self.scales, self.terms):
            if not labelled and isinstance(term, LabelLoss):
                continue
            value = term(batch)
            parts[name] = float(value.detach())
            total = total + weight * scale * value
        return total, parts


def build_distill_loss(terms_cfg: list, class_weights: torch.Tensor | None,
                       adapters: dict[int, FeatureAdapter | FeatureMaps] | None = None) -> DistillLoss:
    """The recipe's distill.terms -> DistillLoss. `adapters[i]` reads the taps of term i: the trained adapter
    of a feature_mse term, the (parameter-free) FeatureMaps of an attention term."""
    adapters = adapters or {}
    terms, weights, names = [], [], []
    for i, cfg in enumerate(terms_cfg):
        builder = LOSS_TERMS.get(cfg.kind)
        if builder is None:
            raise EdgeKDError(f"distill.terms.{i}: unknown kind '{cfg.kind}' (known: {', '.join(sorted(LOSS_TERMS))})")
        terms.append(builder(cfg, class_weights, adapters.get(i)))
        weights.append(cfg.weight)
        names.append(f"{i}_{cfg.kind}")
    return DistillLoss(terms, weights, names, [getattr(cfg, "warmup_epochs", 0) for cfg in terms_cfg])
