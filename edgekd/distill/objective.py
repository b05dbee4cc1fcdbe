"""The teacher-student step: a frozen teacher, its input adapter and logit cache, and the DistillObjective."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from edgekd.distill.features import FeatureAdapter, FeatureMaps, build_adapter, build_feature_maps
from edgekd.distill.losses import DistillLoss, KDBatch, build_distill_loss
from edgekd.distill.unlabeled import UnlabeledStream
from edgekd.errors import EdgeKDError, exception_line
from edgekd.hair import hair_element
from edgekd.models import capture_features, forward_error
from edgekd.runtime import is_bundle
from edgekd.train.checkpoint import checkpoints_in_folder, model_from_checkpoint


def load_teacher(path: str | Path, teacher_recipe: str | None = None,
                 key: str = "distill.teacher") -> tuple[nn.Module, dict[str, Any]]:
    """The teacher from an edgekd checkpoint: frozen (no grad) and in eval mode for good. An absent checkpoint's
    error gives the command that trains it from `teacher_recipe` (distill.teacher_recipe) when there is one."""
    given = Path(path)
    if not given.is_file():
        folder = given if given.is_dir() else given.parent
        held = checkpoints_in_folder(folder) if folder.is_dir() else ""
        if folder.is_dir() and is_bundle(folder):
            held = f"{folder} is an exported bundle; give the training run's best.pt it was exported from"
        elif held.startswith("a k-fold run"):  # its best.pt had been asked for; the hint would retrain over it
            held = f"{folder} is {held}: give one" + (" (or train this recipe with --folds K: each fold's student "
                                                       "then learns from its own fold's teacher)"
                                                       if key == "distill.teacher" else "")
        if held or given.is_dir():
            raise EdgeKDError(f"{key}: {path} is not a checkpoint file: {held or 'a folder holding no best.pt'}")
        how = (f"run `edgekd train {teacher_recipe} --out {given.parent}` first" if teacher_recipe
               else "train the teacher recipe first")
        raise EdgeKDError(f"{key}: checkpoint {path} not found ({how}; a relative path is read from the working "
                          "folder)")
    teacher, ckpt = model_from_checkpoint(path)
    freeze_teacher(teacher)
    return teacher, ckpt


def freeze_teacher(teacher: nn.Module) -> nn.Module:
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class TeacherInput(nn.Module):
    """Turns the student's normalized batch into the teacher's input: undo the student normalization, match
    channels, resize to the teacher's size, apply the teacher's normalization. Identity when they agree."""

    def __init__(self, student_pre: dict[str, Any], teacher_pre: dict[str, Any], teacher_size: int | None = None):
        super().__init__()
        self.size = int(teacher_size or teacher_pre["input_size"][-1])
        self.student_size = int(student_pre["input_size"][-1])
        self.s_channels, self.t_channels = int(student_pre["channels"]), int(teacher_pre["channels"])
        self.register_buffer("s_mean", torch.tensor(student_pre["mean"]).view(1, -1, 1, 1))
        self.register_buffer("s_std", torch.tensor(student_pre["std"]).view(1, -1, 1, 1))
        self.register_buffer("t_mean", torch.tensor(teacher_pre["mean"]).view(1, -1, 1, 1))
        self.register_buffer("t_std", torch.tensor(teacher_pre["std"]).view(1, -1, 1, 1))
        self.same_norm = (self.s_channels == self.t_channels and student_pre["mean"] == teacher_pre["mean"]
                          and student_pre["std"] == teacher_pre["std"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        if not self.same_norm:
            x = x * self.s_std + self.s_mean
            if self.s_channels == 1 and self.t_channels == 3:
                x = x.expand(-1, 3, -1, -1)
            elif self.s_channels == 3 and self.t_channels == 1:
                x = (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        if not self.same_norm:
            x = (x - self.t_mean) / self.t_std
        return x


class TeacherLogitCache:
    """Teacher logits keyed by the bytes of each input image.

    With a deterministic train transform an image is the same tensor every epoch, so its teacher logits are
    computed once; keying by content (not by dataset index) is right under any sampler or shuffling.
    """

    def __init__(self):
        self.store: dict[bytes, torch.Tensor] = {}
        self.hits = self.misses = 0

    @staticmethod
    def key(image: torch.Tensor) -> bytes:
        return hashlib.blake2b(image.detach().cpu().contiguous().numpy().tobytes(), digest_size=16).digest()

    def logits(self, images: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        keys = [self.key(img) for img in images]
        missing = [i for i, k in enumerate(keys) if k not in self.store]
        if missing:
            fresh = compute(images[missing]).float().cpu()
            for i, row in zip(missing, fresh):
                self.store[keys[i]] = row
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        return torch.stack([self.store[k] for k in keys]).to(images.device)


class EnsembleTeacher(nn.Module):
    """Several frozen teachers as one: each gets the student batch through its own TeacherInput; the output is
    the mean of their logits, or log of the mean of their softmax (a valid logit vector of the averaged
    distribution: softmax of it is that mean)."""

    def __init__(self, members: list[nn.Module], inputs: list[TeacherInput], mode: str = "mean_probs"):
        super().__init__()
        if len(members) != len(inputs) or not members:
            raise ValueError("one TeacherInput per member, at least one member")
        self.members, self.inputs, self.mode = nn.ModuleList(members), nn.ModuleList(inputs), mode

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = torch.stack([m(inp(images)).float() for m, inp in zip(self.members, self.inputs)])
        if self.mode == "mean_logits":
            return logits.mean(0)
        return log_mean_softmax(logits)


def log_mean_softmax(logits: torch.Tensor) -> torch.Tensor:
    """log of the mean over dim 0 of softmax(logits), in log space (logsumexp): a confident teacher's non-target
    classes keep their order. (log of a mean clamped at 1e-12 had put every class below it at -27.6, so a KL or
    DKD target at T > 1 saw them all alike: an ensemble of two copies of one teacher gave DKD 12.4 for its 85.1.)"""
    return torch.logsumexp(F.log_softmax(logits, dim=-1), dim=0) - math.log(logits.shape[0])


class AveragedViews(nn.Module):
    """A teacher whose target is averaged over flipped views of the batch (TTA for the targets): log of the mean
    of its softmax over the views, so softmax of the output is that mean."""

    FLIPS = {"original": None, "hflip": -1, "vflip": -2}

    def __init__(self, teacher: nn.Module, views: list[str]):
        super().__init__()
        self.teacher, self.views = teacher, list(views)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = [self.teacher(images if self.FLIPS[v] is None else images.flip(self.FLIPS[v])).float()
                  for v in self.views]
        return log_mean_softmax(torch.stack(logits))


class SharedViewMix:
    """Function matching's input: the batch mixed by torchvision.transforms.v2 MixUp/CutMix (with probability
    p); the objective gives the mixed pixels to both the student and the teacher."""

    def __init__(self, kind: str, alpha: float, p: float, num_classes: int):
        from torchvision.transforms import v2

        self.op = (v2.MixUp if kind == "mixup" else v2.CutMix)(alpha=alpha, num_classes=num_classes)
        self.p = p

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.p < 1 and float(torch.rand(())) >= self.p:
            return images
        return self.op(images, targets)[0]


class DistillObjective:
    """Trainer objective: student forward (+ feature taps), teacher forward under no_grad, weighted KD loss.

    `.parameters()` are the feature adapters: the trainer optimizes them with the student's head group, and
    they live here, not in the student, so best.pt's state_dict and every export hold the student alone.
    """

    def __init__(self, teacher: nn.Module, loss: DistillLoss, teacher_input: nn.Module,
                 cache: TeacherLogitCache | None = None, mix: SharedViewMix | None = None,
                 unlabeled: UnlabeledStream | None = None, unlabeled_weight: float = 1.0):
        self.teacher, self.loss, self.teacher_input, self.cache, self.mix = teacher, loss, teacher_input, cache, mix
        self.unlabeled, self.unlabeled_weight = unlabeled, unlabeled_weight
        self.last_parts: dict[str, float] = {}

    def to(self, device: torch.device) -> "DistillObjective":
        self.teacher.to(device)
        self.loss.to(device)
        self.teacher_input.to(device)
        return self

    def parameters(self) -> list[nn.Parameter]:
        return list(self.loss.parameters())

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return self.loss.state_dict()

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        self.loss.load_state_dict(state)

    @torch.no_grad()
    def teacher_outputs(self, images: torch.Tensor) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        layers = self.loss.teacher_layers
        if self.teacher.training:  # whoever flipped it, BatchNorm statistics and dropout must stay frozen
            self.teacher.eval()
        if self.cache is not None and not layers:
            return self.cache.logits(images, lambda x: self.teacher(self.teacher_input(x))), {}
        with capture_features(self.teacher, layers) as feats:
            logits = self.teacher(self.teacher_input(images))
        return logits, {k: v.detach() for k, v in feats.items()}

    def set_epoch(self, epoch: int) -> None:
        """Called by the trainer at each epoch: a term's warm-up weight and the unlabeled pool's draws follow the
        epoch (exact resume)."""
        self.loss.set_epoch(epoch)
        if self.unlabeled is not None:
            self.unlabeled.set_epoch(epoch)

    def __call__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor):
        n = len(images)
        if self.unlabeled is not None:  # one forward over labelled + unlabeled rows (one DDP forward per backward)
            pool = self.unlabeled.next().to(images.device, non_blocking=True)
            images = torch.cat([images, pool])
        if self.mix is not None:  # one mixed batch: the student and the teacher see the same pixels
            labels = torch.cat([targets, targets.new_zeros(len(images) - n)])  # label-free terms only under mix
            images = self.mix(images, labels)
        with capture_features(model, self.loss.student_layers) as student_feats:
            logits = model(images)
        teacher_logits, teacher_feats = None, {}
        if self.loss.needs_teacher_logits or self.loss.teacher_layers or self.unlabeled is not None:
            teacher_logits, teacher_feats = self.teacher_outputs(images)
        student_feats = dict(student_feats)

        def batch(part: slice, labels: torch.Tensor) -> KDBatch:
            return KDBatch(logits[part], labels, None if teacher_logits is None else teacher_logits[part],
                           {k: v[part] for k, v in student_feats.items()},
                           {k: v[part] for k, v in teacher_feats.items()})

        labelled, unlabeled = slice(0, n), slice(n, None)
        total, self.last_parts = self.loss(batch(labelled, targets))
        if self.unlabeled is None:
            return total, logits
        # unlabeled rows: the teacher's top class stands in as the target (DKD's); ce/focal skip them
        extra, parts = self.loss(batch(unlabeled, teacher_logits[unlabeled].argmax(1)), labelled=False)
        self.last_parts.update({f"unlabeled_{k}": v for k, v in parts.items()})
        return total + self.unlabeled_weight * extra, logits[labelled]


def probe_features(student: nn.Module, teacher: nn.Module, teacher_input: TeacherInput, input_size: list[int],
                   student_layers: list[str], teacher_layers: list[str]) -> tuple[dict, dict]:
    """One forward of each model on a zero batch (eval mode) to learn the tapped layers' shapes."""
    x = torch.zeros(2, *input_size)
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad(), capture_features(student, student_layers) as s_feats:
            student(x)
        with torch.no_grad(), capture_features(teacher, teacher_layers) as t_feats:
            teacher(teacher_input(x))
    finally:
        student.train(was_training)
    for side, layers, feats in (("student", student_layers, s_feats), ("teacher", teacher_layers, t_feats)):
        for layer in layers:
            check_tap(side, layer, feats.get(layer), len(x))
    return dict(s_feats), dict(t_feats)


def check_tap(side: str, layer: str, output: torch.Tensor | None, batch: int) -> None:
    """A tapped module's probe output: one that never ran (timm's fused attention skips `attn_drop`: a KeyError)
    or whose first axis is not the batch (SwinV2's window attention gives (batch x windows, N, C): every student
    image had been matched with windows of the first teacher image, without a word) is a one-line refusal."""
    if output is None:
        raise EdgeKDError(f"distill.terms: the {side}'s module '{layer}' gave no output in an eval-mode forward "
                          "pass (it is not called: a fused attention's dropout, a training-only branch); tap a module "
                          "that runs")
    if output.ndim < 2 or output.shape[0] != batch:
        raise EdgeKDError(f"distill.terms: the {side}'s module '{layer}' gives an output of shape "
                          f"{tuple(output.shape)} for {batch} images, its first axis not the batch (a window "
                          "attention's batch x windows); tap a module whose output keeps one row per image (its "
                          "block or stage)")


def check_teacher_size(teacher: nn.Module, teacher_input: TeacherInput, ckpt: dict[str, Any]) -> None:
    """A distill.teacher_image_size the teacher cannot take (a fixed-grid SwinV2 trained at 64 px fed the full-size
    recipe's 256) is a one-line refusal before the run clears its folder (timm's AssertionError at the first step,
    exit 1, after an earlier run's files were gone)."""
    trained = int(ckpt["preprocess"]["input_size"][-1])
    if teacher_input.size == trained:
        return
    shape = (teacher_input.t_channels, teacher_input.size, teacher_input.size)
    if (err := forward_error(teacher, shape)) is not None:
        raise EdgeKDError(f"distill.teacher_image_size {teacher_input.size}: the teacher {ckpt['arch']['name']} "
                          f"(trained at {trained} px) does not take {teacher_input.size} px input "
                          f"({exception_line(err, 100)}); set distill.teacher_image_size: {trained}, or null for the "
                          "checkpoint's own size")


def check_teacher_classes(terms: list, teacher_ckpts: list[dict[str, Any]], num_classes: int | None) -> None:
    """kl/dkd terms compare class distributions: every teacher must have the data's class count."""
    if num_classes is None or not any(t.kind in ("kl", "dkd") for t in terms):
        return
    for ckpt in teacher_ckpts:
        t_classes = ckpt["arch"]["num_classes"]
        if t_classes != num_classes:
            raise EdgeKDError(f"distill: a kl/dkd term needs the teacher's classes; the teacher has {t_classes} "
                              f"({ckpt['arch']['name']}), the data has {num_classes} (use feature_mse terms "
                              "only for cross-task KD)")


def warn_teacher_input_mismatch(teacher_ckpts: list[dict[str, Any]], student_pre: dict[str, Any],
                                teacher_size: int | None, log: Callable[[str], None]) -> None:
    """A warning per teacher trained with another data.hair_removal than the student uses (TeacherInput adapts
    normalization, channels and size, not what happens at decode), and per teacher fed at a distill.teacher_image_size
    other than the size it trained at (a full-size recipe's 256 px for a teacher trained at 32 px went unsaid)."""
    for ckpt in teacher_ckpts:
        name = ckpt["arch"]["name"]
        if bool(ckpt["preprocess"].get("hair_removal")) != bool(student_pre.get("hair_removal")):
            log(f"warning: distill: the teacher {name} was trained "
                f"{'with' if ckpt['preprocess'].get('hair_removal') else 'without'} data.hair_removal and the student "
                f"{'uses' if student_pre.get('hair_removal') else 'does not use'} it: the teacher sees images unlike "
                "its training data (normalization, channels and size are adapted; hair removal is not)")
        elif student_pre.get("hair_removal") and hair_element(ckpt["preprocess"]) != hair_element(student_pre):
            log(f"warning: distill: the teacher {name} removed hair with {hair_element(ckpt['preprocess'])} and the "
                f"student uses {hair_element(student_pre)} (data.hair_kernel): the teacher sees images unlike its "
                "training data")
        trained = int(ckpt["preprocess"]["input_size"][-1])
        if teacher_size is not None and teacher_size != trained:
            log(f"warning: distill.teacher_image_size {teacher_size} but the teacher {name} was trained at {trained} px: "
                f"it sees the student's batch at a size it never trained on (null, the default, uses the checkpoint's "
                f"{trained})")


def term_text(term) -> str:
    """A distill term as the run's log names it: `0.7*kl(T=4)`, `1*dkd(T=4) (warm-up 4 epochs)`."""
    warm, temperature = getattr(term, "warmup_epochs", 0), getattr(term, "temperature", None)
    return (f"{term.weight:g}*{term.kind}" + (f"(T={temperature:g})" if temperature is not None else "")
            + (f" (warm-up {warm} epochs)" if warm else ""))


def build_objective(distill_cfg, student: nn.Module, teacher: nn.Module, teacher_ckpt: dict[str, Any],
                    student_pre: dict[str, Any], class_weights: torch.Tensor | None,
                    augment: list | None = None, num_classes: int | None = None,
                    log: Callable[[str], None] = print,
                    ensemble: list[tuple[nn.Module, dict[str, Any]]] | None = None,
                    unlabeled: UnlabeledStream | None = None) -> DistillObjective:
    """The recipe's distill section + models -> a DistillObjective (adapters sized by a probe forward).
    `ensemble`: more (teacher, checkpoint) pairs, combined with `teacher` by distill.ensemble_mode; `unlabeled`:
    the stream of distill.unlabeled's pool (edgekd.distill.unlabeled.build_unlabeled)."""
    members = [(teacher, teacher_ckpt), *(ensemble or [])]
    check_teacher_classes(distill_cfg.terms, [ckpt for _, ckpt in members], num_classes)
    for member, _ in members:
        freeze_teacher(member)
    inputs = [TeacherInput(student_pre, ckpt["preprocess"], distill_cfg.teacher_image_size) for _, ckpt in members]
    for (member, ckpt), member_input in zip(members, inputs):
        check_teacher_size(member, member_input, ckpt)
    teacher_input = inputs[0]
    if len(members) > 1:
        teacher = EnsembleTeacher([m for m, _ in members], inputs, distill_cfg.ensemble_mode)
        log(f"distill: an ensemble of {len(members)} teachers ({distill_cfg.ensemble_mode}): "
            + ", ".join(ckpt["arch"]["name"] for _, ckpt in members))
    feature_terms = {i: t for i, t in enumerate(distill_cfg.terms) if t.kind in ("feature_mse", "attention")}
    adapters: dict[int, FeatureAdapter | FeatureMaps] = {}
    if feature_terms:
        s_feats, t_feats = probe_features(student, teacher, teacher_input, student_pre["input_size"],
                                          sorted({t.student for t in feature_terms.values()}),
                                          sorted({t.teacher for t in feature_terms.values()}))
        for i, t in feature_terms.items():
            build = build_adapter if t.kind == "feature_mse" else build_feature_maps
            adapters[i] = build(student, s_feats[t.student], t.student_layout,
                                teacher, t_feats[t.teacher], t.teacher_layout, t.student, t.teacher)
    loss = build_distill_loss(distill_cfg.terms, class_weights, adapters)
    cache = None
    if distill_cfg.cache_teacher_logits:
        if augment:
            raise EdgeKDError("distill.cache_teacher_logits needs a deterministic train transform, "
                              "but the recipe has augment ops (remove them or turn the cache off)")
        if feature_terms:
            raise EdgeKDError("distill.cache_teacher_logits caches logits only: feature_mse/attention terms need "
                              "the teacher's forward every step (turn the cache off)")
        cache = TeacherLogitCache()
    mix = None
    if distill_cfg.mix is not None:
        if cache is not None:
            raise EdgeKDError("distill.mix makes every batch new: turn distill.cache_teacher_logits off")
        mix = SharedViewMix(distill_cfg.mix.kind, distill_cfg.mix.alpha, distill_cfg.mix.p,
                            num_classes or teacher_ckpt["arch"]["num_classes"])
    log(f"distill: teacher {teacher_ckpt['arch']['name']} at {teacher_input.size}px, student at "
        f"{teacher_input.student_size}px; terms " + ", ".join(map(term_text, distill_cfg.terms))
        + (" (teacher logits cached)" if cache else "")
        + (f"; shared-view {distill_cfg.mix.kind} (alpha {distill_cfg.mix.alpha:g}, p {distill_cfg.mix.p:g})"
           if mix else ""))
    if len(members) > 1:  # each member has its own input adapter inside the ensemble
        teacher_input = nn.Identity()
    if distill_cfg.teacher_views != ["original"]:  # `[hflip]` alone had been ignored, as if [original]
        teacher = AveragedViews(teacher, distill_cfg.teacher_views)
        log(f"distill: teacher targets averaged over {', '.join(distill_cfg.teacher_views)}")
    weight = distill_cfg.unlabeled.weight if distill_cfg.unlabeled is not None else 1.0
    return DistillObjective(teacher, loss, teacher_input, cache, mix, unlabeled, weight)
