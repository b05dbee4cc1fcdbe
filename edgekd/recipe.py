"""Recipes: the YAML that says what trains. One loader, validated on load, overridable with `--set key=value`."""

from __future__ import annotations

import copy
import difflib
import hashlib
import inspect
import json
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from edgekd.errors import EdgeKDError, oversized, quote, shorten
from edgekd.fileio import is_torch_file_head
from edgekd.runtime import MAX_RESIZE_FACTOR


def refuse_nonfinite(value: Any, path: str = "") -> Any:
    """Free-form recipe values (augment arguments, timm kwargs) hold no inf or nan either: `ColorJitter: {contrast:
    .inf}` passed `edgekd check` and failed training's first step."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        refuse_nonfinite(item, f"{path}.{key}" if path else str(key))
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{path}: must be a finite number, got {value}")
    return value


def _number_types(annotation: Any) -> set[Any]:
    """The scalar types an annotation admits (`int | None` -> {int, NoneType}; Optional/Union/Annotated unwrapped,
    `Literal[1, 3]` -> {int}); a list's items as ("list", its item types)."""
    args, origin = typing.get_args(annotation), typing.get_origin(annotation)
    if origin in (Union, types.UnionType, Annotated):
        return set().union(*(_number_types(a) for a in (args[:1] if origin is Annotated else args)))
    if origin is Literal:
        return {type(a) for a in args}
    if origin is list and args:
        return {("list", frozenset(_number_types(args[0])))}
    return {annotation}


def _takes_bool_as_number(admitted: set[Any]) -> bool:
    return bool(admitted & {int, float}) and not admitted & {bool, str}


def refuse_bool_for_number(cls, data: Any) -> Any:
    """A YAML true/yes/on where a number is expected was read as 1 (`parity.images: yes` gated on one image,
    `threads: true` ran on one thread): refused. A field that also takes a bool or a text (a class name or
    index) is left to its own checks. The other way round, a true/false key given a number or a text ("no", 1)
    is refused too."""
    if isinstance(data, dict):
        for name, field in cls.model_fields.items():
            value, admitted = data.get(name), _number_types(field.annotation)
            items = set().union(*(a[1] for a in admitted if isinstance(a, tuple)))  # of a list field
            if isinstance(value, bool) and _takes_bool_as_number(admitted):
                raise ValueError(f"{name}: a number is expected, not {str(value).lower()}")
            if isinstance(value, list) and _takes_bool_as_number(items) and any(isinstance(v, bool) for v in value):
                raise ValueError(f"{name}: numbers are expected, not true/false ({quote(value)})")
            if value is not None and not isinstance(value, bool) and admitted <= {bool, type(None)}:
                raise ValueError(f"{name}: true or false is expected, not {quote(value)}")  # "no" had been false
    return data


def expand_home(value: Any) -> Any:
    """A path key's `~` or `~user` as the shell would expand it (a YAML value or `--set data.path=~/x` is not);
    a pathlib.Path in a recipe dict as its text."""
    if isinstance(value, list):
        return [expand_home(v) for v in value]
    if isinstance(value, os.PathLike):  # recipe_from_dict({"data": {"path": Path(...)}}) had been refused
        value = os.fspath(value)
    return os.path.expanduser(value) if isinstance(value, str) and value.startswith("~") else value


def _home_expanded(*fields: str) -> Any:
    """A section's validator expanding `~` in its path keys `fields`."""
    return field_validator(*fields, mode="before")(classmethod(lambda cls, v: expand_home(v)))


class Section(BaseModel):
    # Attribute docstrings become field descriptions: the recipe-key reference (docs/recipe-keys.md) is made from them.
    # No number of a recipe may be inf or nan (`lr=inf` was accepted and failed at the second step).
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)
    _no_bool_numbers = model_validator(mode="before")(classmethod(refuse_bool_for_number))


class DataConfig(Section):
    source: Literal["builtin", "medmnist", "imagefolder", "csv", "fashion_mnist"] = "builtin"
    """builtin: the bundled PneumoniaMNIST subset (or the .npz at `path`); medmnist: a MedMNIST v2 .npz; imagefolder:
    `root/<class>/` or `root/{train,val,test}/<class>/`; csv: a manifest with columns `path,label[,patient_id][,split]`;
    fashion_mnist: a folder of MNIST-style idx files."""
    path: str | None = None
    """File or folder for the source; relative paths resolve against the working directory."""
    _home = _home_expanded("path")
    split: Literal["given", "stratified", "patient"] = "given"
    """given: the source's splits, missing ones carved from train (by patient when the data has patient ids);
    stratified / patient: everything but the test split re-split by image / by patient. With patient ids no patient
    may be in two splits, whatever the mode."""
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    """The share of the train pool (what the test split leaves) held out as the val split when one is carved: a source
    without a val split, or split stratified / patient; not with `folds`. Must be > 0 then. By patient the share is
    of patients, in whole folds of a stratified group k-fold: 1/k when one is within 0.07 of it (0.15: 1/7, 0.4: 1/3),
    else m of k folds (0.6: 3/5, 0.7: 2/3)."""
    test_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    """The share held out as the test split when the source has none: of all the images for a source without splits
    (an ImageFolder without split folders, a CSV without a split column), of the train split for one with train (and
    val) splits but no test split. A given test split is always kept. Must be > 0 then."""
    fold: int | None = None
    """With `folds`, which fold of a stratified (group) k-fold is the validation split."""
    folds: int | None = Field(None, ge=2)
    """k-fold cross-validation: the images outside the test split are cut into this many stratified folds (by patient
    under split patient, or given with patient ids) and fold `fold` is the val split (val_fraction unused). `edgekd
    train --folds K` sets both for each fold."""
    class_names: list[str] | None = None
    """Class names in label-id order (null: the source's own: folder or label names sorted, MedMNIST's, Fashion-MNIST's,
    else `class_<i>`). Named labels (ImageFolder folders, CSV names) are reordered by it: each listed once (for an
    ImageFolder, its folders and no other name); integer labels are renamed by position, one name per class (after
    `classes`)."""
    classes: list[int] | None = Field(None, min_length=1)
    """Keep only these label ids (remapped to 0..k-1 in the given order)."""
    positive_class: str | int | None = None
    """A two-class task's positive class, by name or label id (after `classes`): the class whose sensitivity,
    specificity, AUC, PR-AUC and pAUC training logs and eval, report and export give, and the one an export profile
    without its own decision.positive thresholds. null: label id 1, the second class (MedMNIST's pneumonia; a sorted
    folder's second name, so set it for e.g. `covid/normal`). Not for multi-class data or a continual recipe."""
    limit: int | None = Field(None, ge=1)
    """Use at most this many images in each split, train, val and test alike (a stratified, seeded subset that
    keeps an image of every class when the limit allows)."""
    image_size: int = Field(28, ge=8, le=4096)
    """The model's input size (square); also the eval resize/crop size."""
    resize: int | None = None
    """Eval resize (the shorter side) before the center crop to image_size (defaults to image_size; training
    resizes to image_size itself). Below image_size the crop pads with zeros, which training never shows."""
    channels: Literal[1, 3] = 3
    """The model's input channels: decoded images are converted (gray repeated to RGB, RGB to gray by luminance); `mean`
    and `std` take one value per channel."""
    mean: list[float] = [0.5, 0.5, 0.5]
    """Per-channel mean subtracted after pixels are scaled to 0..1, one value per channel (ImageNet's [0.485, 0.456,
    0.406] for pretrained timm weights); the bundle's runtime applies the same."""
    std: list[float] = [0.5, 0.5, 0.5]
    """Per-channel divisor applied after `mean`, one value > 0 per channel (ImageNet's [0.229, 0.224, 0.225] for
    pretrained timm weights)."""
    batch_size: int = Field(64, ge=1)
    """Images per batch of every loader, train, val and test (per process under torchrun); an optimizer step averages
    train.grad_accum such batches."""
    num_workers: int = Field(0, ge=0)
    """DataLoader worker processes (0: load in the training process); each is seeded from the run's seed."""
    balanced_sampler: bool = False
    """Draw train batches with each class equally likely (with replacement); loss class weights become 1."""
    on_bad_image: Literal["error", "skip"] = "error"
    """Every image file is decoded once when the data is built. error: an unreadable one stops the run, named (with a
    count of the others); skip: such files are left out and listed in metrics.json `bad_files`. In-memory sets (.npz,
    idx) are not checked."""
    hair_removal: bool = False
    """DullRazor hair removal (black-hat morphology + Telea inpainting, OpenCV: `pip install 'edgekd[skin]'`) on each
    decoded image before resizing, in training and in the exported bundle's runtime alike."""
    hair_kernel: int | None = Field(None, ge=3, le=4096)
    """With hair_removal: the black-hat element's side in pixels of the decoded image; a dark structure narrower than
    it is taken for hair and inpainted, so a lesion narrower than it is erased. null (default): scaled to each image,
    17 px per 1024 px of its shorter side (DullRazor's 17 on dermoscopy), rounded, an even number plus 1, at least 3:
    3 px on a 133 px ISIC 2024 crop. Checkpoints and bundles from before this key used 17 px at every size, and still
    do."""
    patient_pattern: str | None = None
    """Patient ids from the image file names (an ImageFolder, or a CSV without a patient_id column): the first group
    of this regular expression, searched in each file name; e.g. '^[A-Z]+-(\\d+)-' for Kermany OCT2017's
    CNV-1016042-1.jpeg. Then no patient is in two splits, and k-fold is by patient."""
    dicom_patient_ids: bool = False
    """Patient ids from the PatientID tag of an ImageFolder's DICOM files (every image must be one, with a PatientID):
    then no patient is in two splits, and k-fold is by patient. Off, a folder whose DICOM files name two or more
    patients is split by image with a warning."""

    @field_validator("positive_class", mode="before")
    @classmethod
    def _not_a_flag(cls, v: Any) -> Any:
        if isinstance(v, bool):  # `positive_class: true` would have been label id 1
            raise ValueError("give the positive class's name or label id, not true/false")
        return v

    @field_validator("class_names", mode="before")
    @classmethod
    def _numbers_as_names(cls, v: Any) -> Any:
        """Class folders named 0, 1, 2 ... listed as YAML numbers ([1, 2, 10]) are those folders' names."""
        if isinstance(v, list):
            return [str(x) if isinstance(x, int) and not isinstance(x, bool) else x for x in v]
        return v

    @field_validator("std")
    @classmethod
    def _std_positive(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("give one value per channel")
        if any(not x > 0 for x in v):  # `not x > 0` also catches NaN
            raise ValueError("every entry must be > 0 (images are divided by it)")
        return v

    @model_validator(mode="after")
    def _resize_and_pattern(self) -> "DataConfig":
        crop = self.image_size
        if self.resize is not None and not crop // 2 <= self.resize <= MAX_RESIZE_FACTOR * crop:  # export refused it last
            raise ValueError(f"resize {self.resize} is out of range for image_size {crop} ({crop // 2} to "
                             f"{MAX_RESIZE_FACTOR * crop}: the eval resize before the center crop, as a bundle takes it)")
        if self.patient_pattern is not None:
            try:
                groups = re.compile(self.patient_pattern).groups
            except re.error as err:
                raise ValueError(f"patient_pattern is not a regular expression ({err})") from None
            if groups < 1:
                raise ValueError("patient_pattern needs a group, the patient id: e.g. '^[A-Z]+-(\\d+)-'")
        return self


class ModelConfig(Section):
    name: str = "resnet18"
    """A timm model name (e.g. resnet18, mobilenetv3_large_100, vit_small_patch16_224) or a built-in CNN: edgekd_cnn
    (0.29M parameters), edgekd_cnn_small (41k), edgekd_cnn_micro (18k)."""
    pretrained: bool = False
    """Start from timm's hub weights (a download; the edgekd_cnn models have none), classifier replaced. A `weights`
    file is loaded instead, whatever this says."""
    weights: str | None = None
    """A local weights file (.pth/.safetensors) loaded into the backbone before the head is replaced."""
    _home = _home_expanded("weights")
    drop_rate: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout before the classifier: timm.create_model's drop_rate (the edgekd_cnn models: before their `fc`)."""
    drop_path_rate: float | None = Field(None, ge=0.0, lt=1.0)
    """Stochastic depth of a timm model that has it (null: the model's own default)."""
    head: Literal["linear", "dropout_linear", "mlp"] = "linear"
    """linear: the model's own classifier; dropout_linear: Dropout(head_dropout) + Linear; mlp:
    Linear(head_hidden)-ReLU-Dropout(head_dropout)-Linear. The last two replace a Linear classifier."""
    head_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout before the classifier of a dropout_linear or mlp head."""
    head_hidden: int = 256
    """Hidden width of an mlp head."""
    freeze_stages: int = 0
    """Freeze, for the whole run, the first N of timm's coarse parameter groups (stem, stage 1, ...: the model's
    group_matcher; 0: none; the last group is the classifier, so at most the group count - 1). A model without a
    group_matcher is refused: use freeze_patterns."""
    freeze_patterns: list[str] = []
    """Regular expressions: every parameter whose name (model.named_parameters) one of them matches, searched anywhere
    in it, is frozen for the whole run (e.g. `^patch_embed`); a pattern matching no parameter is an error. Frozen
    parameters (by stages or patterns) do not change; BatchNorm running statistics in frozen stages still do
    (`continual.bn_freeze` holds them in a continual run)."""

    @field_validator("freeze_patterns")
    @classmethod
    def _compiles(cls, v: list[str]) -> list[str]:
        for pattern in v:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"'{pattern}' is not a regular expression ({err})") from None
        return v
    kwargs: dict[str, Any] = {}
    """More keyword arguments for timm.create_model (e.g. img_size, window_size). Under `base:` they replace the base's
    whole, and a recipe naming another model.name drops them."""

    @field_validator("kwargs")
    @classmethod
    def _finite_kwargs(cls, v: dict[str, Any]) -> dict[str, Any]:
        return refuse_nonfinite(v)


class OptimizerConfig(Section):
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    """adamw: AdamW (decoupled weight decay); adam: Adam (weight decay added to the gradient, L2); sgd: SGD, with
    Nesterov momentum when `momentum` > 0."""
    lr: float = Field(1e-3, gt=0)
    """Learning rate of every trainable parameter (the backbone's when head_lr is set); under cosine, the peak the
    warmup rises to."""
    head_lr: float | None = Field(None, gt=0)
    """Differential LR: the classifier head's LR (backbone uses `lr`)."""
    weight_decay: float = Field(0.0, ge=0)
    """Weight decay of every parameter group (0: none)."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """sgd only."""


VAL_METRICS = ("loss", "acc", "balanced_acc", "auc", "pr_auc", "pauc", "f1", "precision", "recall", "sensitivity",
               "specificity", "ece")
"""What an epoch logs of the val split that can pick a checkpoint, `val_<name>` (val_ppv and val_npv are logged too,
for two-class tasks, but are undefined in an epoch that calls no image positive, or none negative)."""


def monitor_direction(metric: str) -> Literal["max", "min"]:
    """Whether a larger value of a logged metric is better: losses and calibration errors go down, the rest up."""
    name = metric.lower()
    return "min" if "loss" in name or "ece" in name else "max"


class SchedulerConfig(Section):
    name: Literal["none", "cosine", "plateau"] = "cosine"
    """none: the LR stays at optimizer.lr; cosine: a linear warmup over warmup_epochs, then cosine decay toward min_lr;
    plateau: ReduceLROnPlateau on `monitor` (factor, patience, floor min_lr)."""
    warmup_epochs: int = Field(0, ge=0)
    """cosine: epochs over which the LR rises linearly from 1% to optimizer.lr (cut to epochs - 1 when it is epochs
    or more, with a warning); plateau and none have no warmup."""
    min_lr: float = Field(1e-6, ge=0)
    """cosine: where the decay ends, one step after the last epoch (the last epoch trains above it: 25% of the way
    to the peak after 3 decay epochs, 4% after 8)."""
    monitor: str | None = None
    """plateau: the logged metric it watches (default: train.monitor)."""
    mode: Literal["max", "min"] | None = None
    """plateau: whether `monitor` should go up or down (default: from its name, as train.monitor_mode)."""
    factor: float = Field(0.5, gt=0, lt=1)
    """plateau: the LR is multiplied by this when `monitor` stops improving."""
    patience: int = Field(2, ge=0)
    """plateau: epochs without improvement before the LR drops."""


def check_focal_alpha(alpha: list[float] | float | None) -> list[float] | float | None:
    """Focal alpha: a scalar in [0, 1] (class 0 gets 1 - alpha, so outside it one class's weight is negative), or
    one weight >= 0 per class."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    values = alpha if isinstance(alpha, list) else [alpha]
    if any(number(a) and not math.isfinite(a) for a in values):  # before pydantic's union names its branches
        raise ValueError("must be finite" + (f", got {alpha}" if isinstance(alpha, list) else ""))
    if isinstance(alpha, list) and any(number(a) and a < 0 for a in alpha):
        raise ValueError(f"per-class weights must be >= 0, got {alpha}")
    if number(alpha) and not 0 <= alpha <= 1:
        raise ValueError("a scalar alpha must be in [0, 1] (class 0 gets 1 - alpha)")
    return alpha


class LossConfig(Section):
    name: Literal["ce", "focal"] = "ce"
    """ce: cross-entropy; focal: focal loss (Lin et al. 2017), shaped by `gamma` and `alpha`."""
    gamma: float = Field(2.0, ge=0)
    """focal: the focusing exponent of (1 - p_true)^gamma (larger: well-classified images count less)."""
    alpha: list[float] | float | None = None
    """focal: the weight of class 1 in a binary task (class 0 gets 1 - alpha), or one weight per class."""
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    """The share of the target spread evenly over all classes (ce and focal)."""
    class_weights: bool = False
    """Weight the loss by the train split's balanced class weights; all 1 when `data.balanced_sampler` already
    evens the classes (the imbalance is not corrected twice). ce: the batch's mean of each image's weighted loss
    (Keras' reduction, not torch's division by the weights' sum), so grad_accum adds up to one big batch."""

    @field_validator("alpha", mode="before")
    @classmethod
    def _alpha_in_range(cls, v: Any) -> Any:
        return check_focal_alpha(v)


class EarlyStopConfig(Section):
    patience: int | None = Field(None, ge=1)
    """Stop after this many epochs without the monitor improving (null: never stop early; 0 stopped a run that was
    still improving after its first epoch, so it is refused)."""
    min_delta: float = Field(0.0, ge=0.0)
    """The least change of the monitor that counts as an improvement (also for which epoch becomes best.pt)."""


class SWAConfig(Section):
    enabled: bool = False
    """Stochastic weight averaging on (the other keys do nothing without it)."""
    start_epoch: int | None = Field(None, ge=0)
    """0-based epoch from which weights are averaged (0: from the first epoch); null, the default: the last quarter,
    int(0.75 x epochs)."""
    lr: float | None = Field(None, gt=0)
    """A constant LR for the averaged epochs instead of the main schedule (null: the main schedule goes on): epoch
    start_epoch itself trains on the main schedule (the first averaged); from the next one torch's SWALR anneals
    every parameter group to `lr` over `anneal_epochs` (torch's pattern: SWALR steps after each averaged epoch)."""
    anneal_epochs: int = Field(1, ge=1)
    """Epochs over which SWALR anneals (cosine) from the current LR to `lr`."""


class TrainConfig(Section):
    epochs: int = Field(10, ge=0)
    """Training epochs (per task in a continual run); 0: no training, best.pt and last.pt hold the model as built."""
    optimizer: OptimizerConfig = OptimizerConfig()
    """The optimizer and its learning rates."""
    scheduler: SchedulerConfig = SchedulerConfig()
    """The learning-rate schedule, stepped once per epoch."""
    loss: LossConfig = LossConfig()
    """The loss of a supervised run and of each continual task (a distill run trains on distill.terms instead)."""
    monitor: str = "val_auc"
    """The metric that picks the best checkpoint and drives early stopping."""
    monitor_mode: Literal["max", "min"] | None = None
    """Default: from the metric's name (`*loss*`, `*ece*` -> min, else max)."""
    early_stop: EarlyStopConfig = EarlyStopConfig()
    """Early stopping on `monitor`."""
    amp: bool = True
    """Mixed precision; used only on CUDA."""
    grad_accum: int = Field(1, ge=1)
    """Batches whose gradients are averaged into one optimizer step (data.batch_size x grad_accum images, x processes
    under torchrun); an epoch's last step may average fewer."""
    clip_grad: float | None = Field(None, gt=0)
    """Clip the L2 norm of all gradients together to this value before each optimizer step (null: no clipping)."""
    swa: SWAConfig = SWAConfig()
    """Stochastic weight averaging (torch.optim.swa_utils): the averaged weights become best.pt if they beat the best
    epoch on `monitor`."""
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|(cuda|xpu)(:\d+)?)$")
    """`auto` (CUDA when available, else CPU), `cpu`, `cuda`/`cuda:N`, or torch's `mps`/`xpu` where the build has them
    (under torchrun `cuda` or `auto`: each process takes the GPU of its LOCAL_RANK)."""
    deterministic: bool = True
    """cuDNN in deterministic mode with autotuning off (seeded CPU runs repeat exactly either way)."""
    threads: int | None = Field(None, ge=1)
    """CPU threads of the training process (default: torch's, all cores). Float sums depend on it: a seeded run
    repeats its metrics exactly only at the thread count it records in metrics.json (`threads`)."""
    nonfinite: Literal["error", "skip"] = "error"
    """A NaN/Inf training loss. error: the run stops, naming epoch and step; skip: that batch's optimizer step is
    dropped (with grad_accum, its whole accumulation group: the micro-batches before and after it) and the batch
    counted in metrics.json `nonfinite_batches`."""

    _inferred: set[str] = PrivateAttr(default_factory=set)
    """The keys `_directions` filled in (not the recipe's own): `to_dict` leaves them out, so a run's recipe.yaml
    run again with another monitor infers them again."""

    @model_validator(mode="after")
    def _directions(self) -> "TrainConfig":
        sched = self.scheduler
        for key, name in (("monitor", self.monitor), ("scheduler.monitor", sched.monitor)):
            if name in ("val_ppv", "val_npv"):
                raise ValueError(f"{key} '{name}' is logged but cannot pick a checkpoint: it is undefined in an epoch "
                                 "that calls no image positive (ppv) or none negative (npv); monitor one of "
                                 + ", ".join(f"val_{m}" for m in VAL_METRICS))
            if name is not None and name.startswith("val_") and name[4:] not in VAL_METRICS:  # (found after an epoch)
                close = difflib.get_close_matches(name.lower(), [f"val_{m}" for m in VAL_METRICS], n=1, cutoff=0.6)
                raise ValueError(f"{key} '{name}' is not a validation metric the run logs"
                                 + (f" (did you mean '{close[0]}'?)" if close else "")
                                 + f"; choose from {', '.join(f'val_{m}' for m in VAL_METRICS)}")
        self._inferred = {k for k, v in (("monitor_mode", self.monitor_mode), ("scheduler.monitor", sched.monitor),
                                         ("scheduler.mode", sched.mode)) if v is None}
        if self.monitor_mode is None:
            self.monitor_mode = monitor_direction(self.monitor)
        if sched.monitor is None:
            sched.monitor = self.monitor
        if sched.mode is None:
            sched.mode = self.monitor_mode if sched.monitor == self.monitor else monitor_direction(sched.monitor)
        return self


class KLTerm(Section):
    """Response KD: KL(softmax(teacher/T) || softmax(student/T)) * T^2 (Hinton et al. 2015)."""
    kind: Literal["kl"]
    """Selects this term: KL divergence of the softened teacher and student outputs."""
    weight: float = Field(1.0, ge=0)
    """Multiplies this term in the distillation loss (the sum of weight x term)."""
    temperature: float = Field(4.0, gt=0)
    """T: both logits are divided by it before the softmax, and the KL is scaled by T^2."""


class DKDTerm(Section):
    """Decoupled KD (Zhao et al., CVPR 2022): alpha * TCKD (KL of the target-vs-rest binary split) + beta * NCKD
    (KL among the non-target classes), both at temperature T and scaled by T^2. With 2 classes NCKD is empty and
    DKD is alpha times the binary KL."""
    kind: Literal["dkd"]
    """Selects this term: decoupled KD (uses the labels: not with distill.mix; on unlabeled images the teacher's top
    class stands in)."""
    weight: float = Field(1.0, ge=0)
    """Multiplies this term in the distillation loss (the sum of weight x term)."""
    temperature: float = Field(4.0, gt=0)
    """T of both softmaxes; the loss is scaled by T^2."""
    alpha: float = Field(1.0, ge=0)
    """Weight of TCKD, the KL of the target-vs-rest split."""
    beta: float = Field(8.0, ge=0)
    """Weight of NCKD, the KL among the non-target classes (no effect with 2 classes)."""
    warmup_epochs: int = Field(0, ge=0)
    """The term's weight rises linearly over the first N epochs: epoch e (counted from 1) weighs min(e / N, 1)
    times `weight` (the authors' warm-up, 20 of 240 epochs on CIFAR-100: NCKD's large beta would otherwise swamp
    an untrained student); 0, the default: the full weight from the first epoch."""


class CETerm(Section):
    """Cross-entropy on the labels; `class_weights` uses the train split's balanced weights (all 1 under
    `data.balanced_sampler`)."""
    kind: Literal["ce"]
    """Selects this term: cross-entropy on the labels (skipped on unlabeled images; not with distill.mix)."""
    weight: float = Field(1.0, ge=0)
    """Multiplies this term in the distillation loss (the sum of weight x term)."""
    class_weights: bool = False
    """Weight the classes by the train split's balanced weights, n / (k x count) (all 1 under data.balanced_sampler);
    the batch's mean of each image's weighted loss, as train.loss.class_weights."""
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    """The share of the target spread evenly over all classes (torch's CrossEntropyLoss label_smoothing)."""


class FocalTerm(Section):
    kind: Literal["focal"]
    """Selects this term: focal loss on the labels (Lin et al. 2017; skipped on unlabeled images; not with
    distill.mix)."""
    weight: float = Field(1.0, ge=0)
    """Multiplies this term in the distillation loss (the sum of weight x term)."""
    gamma: float = Field(2.0, ge=0)
    """The focusing exponent of (1 - p_true)^gamma (larger: well-classified images count less)."""
    alpha: list[float] | float | None = None
    """The weight of class 1 in a binary task (class 0 gets 1 - alpha), or one weight per class."""
    class_weights: bool = False
    """The train split's balanced class weights serve as alpha (all 1 under data.balanced_sampler); not with
    `alpha` (one weighting or the other: a recipe with both is refused)."""
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    """The share of the target spread evenly over all classes."""

    @field_validator("alpha", mode="before")
    @classmethod
    def _alpha_in_range(cls, v: Any) -> Any:
        return check_focal_alpha(v)


class FeatureTerm(Section):
    """Feature KD (FitNets-style): MSE between adapter(student layer) and the teacher layer, both by module path."""
    kind: Literal["feature_mse"]
    """Selects this term: MSE between a student layer's output, mapped by a learned adapter, and a teacher layer's."""
    weight: float = Field(1.0, ge=0)
    """Multiplies this term in the distillation loss (the sum of weight x term)."""
    student: str
    """The student module tapped, by its path in model.named_modules() (e.g. stages.1, blocks.11); a 1x1 conv (a linear
    layer for tokens) maps its channels onto the teacher's."""
    teacher: str
    """The teacher module tapped, by its path in the teacher's named_modules() (e.g. layer3, layers.3)."""
    spatial: Literal["pool", "interpolate"] = "pool"
    """pool: average-pool the larger map to the smaller size; interpolate: resize the student map to the teacher's."""
    student_layout: Literal["auto", "nchw", "nhwc", "tokens"] = "auto"
    """How the student output is read. auto: 2-D a vector, 3-D ViT tokens (class/register tokens dropped, patches laid
    on their square grid), 4-D the model's timm output_fmt (NHWC for Swin, else NCHW); or nchw, nhwc, tokens as
    given."""
    teacher_layout: Literal["auto", "nchw", "nhwc", "tokens"] = "auto"
    """How the teacher output is read (as student_layout)."""


class AttentionTerm(Section):
    """Attention transfer (Zagoruyko & Komodakis 2017): match the L2-normalized spatial attention maps (channel
    mean of |activation|^p) of a student and a teacher layer, both by module path; no adapter. The default
    weight is the paper's beta/2 = 500 per layer pair (the loss is a mean over batch and positions: small values)."""
    kind: Literal["attention"]
    """Selects this term: attention transfer between a student and a teacher layer."""
    weight: float = Field(500.0, ge=0)
    """Multiplies this term in the distillation loss (the sum of weight x term)."""
    student: str
    """The student module tapped, by its path in model.named_modules() (e.g. stages.1); any channel count."""
    teacher: str
    """The teacher module tapped, by its path in the teacher's named_modules() (e.g. layer2)."""
    p: float = Field(2.0, gt=0)
    """The exponent of |activation|^p in the attention map (the paper's 2)."""
    spatial: Literal["pool", "interpolate"] = "interpolate"
    """interpolate: resize the student's attention map to the teacher's grid; pool: average-pool the larger."""
    student_layout: Literal["auto", "nchw", "nhwc", "tokens"] = "auto"
    """How the student output is read as a map (auto, nchw, nhwc, tokens: as for feature_mse)."""
    teacher_layout: Literal["auto", "nchw", "nhwc", "tokens"] = "auto"
    """How the teacher output is read as a map (as student_layout)."""


DistillTerm = Annotated[Union[KLTerm, DKDTerm, CETerm, FocalTerm, FeatureTerm, AttentionTerm],
                        Field(discriminator="kind")]
TEACHER_TERMS = ("kl", "dkd", "feature_mse", "attention")
LABEL_TERMS = ("ce", "focal")


class MixConfig(Section):
    """Function matching (Beyer et al., CVPR 2022, "A good teacher is patient and consistent"): each training
    batch is mixed (torchvision.transforms.v2 MixUp or CutMix) and teacher and student see the same mixed pixels;
    the student matches the teacher's output on them, so only teacher terms may be used (no labels)."""
    kind: Literal["mixup", "cutmix"] = "mixup"
    """mixup: each image blended with another of the batch; cutmix: a box of another image pasted in
    (torchvision.transforms.v2 MixUp / CutMix)."""
    alpha: float = Field(1.0, gt=0)
    """Beta(alpha, alpha) of the mixing weight."""
    p: float = Field(1.0, ge=0, le=1)
    """The share of batches that are mixed."""


class UnlabeledConfig(Section):
    """KD on unlabeled images: every training step also draws a batch from this pool (seeded per epoch, with the
    recipe's train transform), runs it through student and teacher in one forward with the labelled batch (so
    BatchNorm statistics see both), and adds `weight` * the teacher terms on it: kl and feature terms as on
    labelled images, dkd with the teacher's top class as the target; ce/focal need labels and are skipped there.
    The teacher labels images the student would otherwise never learn from; a student without a teacher cannot
    use them."""
    source: Literal["folder", "builtin", "medmnist", "imagefolder", "csv", "fashion_mnist"] = "folder"
    """folder: every image under `path` (PNG, JPEG, DICOM, ..., any depth), no labels needed; the others: one
    split of a labelled source, its labels ignored."""
    path: str | None = None
    """The folder or file; required except for source builtin."""
    _home = _home_expanded("path")
    split: Literal["train", "val", "test", "all"] = "train"
    """Which split of a labelled source is the pool (`all`: a source without given splits). A pool from the
    labelled data's own file or folder must be its given train split (anything else is refused: it would hold
    the run's val or test images); any pool's images that are the run's val or test images by content are left
    out of it (a warning)."""
    limit: int | None = Field(None, ge=1)
    """At most this many images (a seeded subset, as data.limit draws, with seed 0: the same pool for every run
    seed; a labelled source keeps its class mix)."""
    weight: float = Field(1.0, gt=0)
    """Multiplies the teacher terms on the unlabeled batch."""
    batch_size: int | None = Field(None, ge=1)
    """Unlabeled images per step (default: data.batch_size)."""


class DistillConfig(Section):
    """The loss is sum(weight * term): KD-OCT is [kl 0.7 T=4, ce 0.3]; ISIC is [ce 0.6 weighted, kl 0.4 T=4]."""
    teacher: str | None = None
    """The teacher checkpoint (best.pt of `edgekd train`)."""
    teacher_recipe: str | None = None
    """For `--folds`: the recipe that trains the teacher on each fold before the student distills from it."""
    teacher_image_size: int | None = Field(None, ge=8)
    """Teacher input size (default: the teacher checkpoint's); the student batch is resized for the teacher."""
    cache_teacher_logits: bool = False
    """Reuse teacher logits per distinct input image (needs a deterministic train transform: empty augment)."""
    ensemble: list[str] = []
    """More teacher checkpoints (same classes): the target is the ensemble of `teacher` and these."""
    _home = _home_expanded("teacher", "teacher_recipe", "ensemble")
    ensemble_mode: Literal["mean_probs", "mean_logits"] = "mean_probs"
    """mean_probs: the teacher logits are log(mean of the members' softmax), averaged at temperature 1 (a KL term at
    T then softens that mixture: not the mean of each member's softmax at T, which it equals only at T=1 or when the
    members agree); mean_logits: the mean of their logits."""
    mix: MixConfig | None = None
    """Shared-view mixing of every batch (function matching); teacher terms only."""
    teacher_views: list[Literal["original", "hflip", "vflip"]] = ["original"]
    """TTA-averaged teacher targets: the teacher's softmax averaged over these flips of each batch, at temperature 1
    as `ensemble_mode: mean_probs` (one flip alone: the teacher sees that flip only)."""
    unlabeled: UnlabeledConfig | None = None
    """A pool of unlabeled images the student also matches the teacher on (KD on unlabeled images)."""
    terms: list[DistillTerm] = Field(min_length=1)
    """The loss terms, each a mapping picked by its `kind` (kl, dkd, ce, focal, feature_mse, attention; their keys
    below); the loss is the sum of weight x term, with at least one teacher term (kl, dkd, feature_mse, attention)."""

    @model_validator(mode="after")
    def _has_teacher_term(self) -> "DistillConfig":
        if not any(t.kind in TEACHER_TERMS for t in self.terms):
            raise ValueError(f"no {', '.join(TEACHER_TERMS)} term: nothing is distilled from the teacher")
        if self.mix is not None and any(t.kind in (*LABEL_TERMS, "dkd") for t in self.terms):
            raise ValueError("mix: mixed images have no single label; use label-free teacher terms (kl, feature_mse, "
                             "attention)")
        if self.teacher_views != ["original"] and any(t.kind in ("feature_mse", "attention") for t in self.terms):
            raise ValueError("teacher_views: feature terms tap one forward of the teacher; use kl or dkd")
        if self.ensemble and any(t.kind in ("feature_mse", "attention") for t in self.terms):
            raise ValueError("ensemble: feature terms tap one teacher's layers; use kl or dkd with an ensemble")
        if self.teacher is None and self.teacher_recipe is None:
            raise ValueError("set 'teacher' (a checkpoint) or 'teacher_recipe' (for --folds)")
        if self.unlabeled is not None and self.unlabeled.source != "builtin" and not self.unlabeled.path:
            raise ValueError(f"unlabeled: source {self.unlabeled.source} needs a path")
        return self


class ContinualTask(Section):
    """One task of a continual sequence: the recipe's data section with these overrides, these label ids."""
    name: str = Field(pattern=r"^[^.:]+$")
    """Names the task in `--set continual.tasks.NAME.key=...` (so no '.') and prefixes its classes in the model's
    class names, `NAME:class` (so no ':')."""
    data: dict[str, Any] = {}
    """Keys of the data section that differ for this task (source, path, limit, ...)."""
    classes: list[int] | None = Field(None, min_length=1)
    """This task's label ids in its dataset (default: all); they get new output ids after the earlier tasks'."""


class EWCConfig(Section):
    """Elastic weight consolidation: (weight / 2) * sum F (theta - theta*)^2 with the diagonal Fisher of each task,
    the empirical one (squared gradients of the loss at the images' own labels, as Avalanche's EWC; Kirkpatrick et
    al. sample the labels from the model), in eval mode on un-augmented training images."""
    weight: float = Field(1000.0, ge=0)
    """lambda."""
    online: bool = False
    """Online EWC (Schwarz et al. 2018): one running Fisher gamma * F_old + F_new anchored at the latest weights."""
    gamma: float = Field(1.0, ge=0, le=1)
    """Online EWC's decay of the running Fisher (online: true only)."""
    fisher_samples: int = Field(1000, ge=1)
    """Training images of the finished task used to estimate the Fisher."""

    @model_validator(mode="after")
    def _gamma_is_online(self) -> "EWCConfig":
        if self.gamma != 1.0 and not self.online:  # it was accepted and never read
            raise ValueError(f"gamma {self.gamma:g} decays online EWC's running Fisher; set online: true or drop it")
        return self


class LwFConfig(Section):
    """Learning without forgetting: + alpha * T^2 * KL(previous model || current) on the old tasks' outputs."""
    alpha: float = Field(1.0, ge=0)
    """Weight of the LwF term (0: off)."""
    temperature: float = Field(2.0, gt=0)
    """T of both softmaxes (the previous and the current model's old-task outputs); the KL is scaled by T^2."""


class ReplayConfig(Section):
    """Rehearsal: a class-balanced buffer of earlier tasks' images, mixed into every training batch."""
    size: int = Field(200, ge=1)
    """Buffer images kept in all, split evenly over the classes seen so far (a class with fewer images keeps them
    all, the others share the rest)."""
    selection: Literal["reservoir", "herding"] = "reservoir"
    """reservoir: a uniform random sample of each class; herding: iCaRL herding on the model's pre-logit features (the
    images whose running mean stays closest to the class mean)."""
    batch_size: int | None = Field(None, ge=1)
    """Buffer images added to each batch (default: data.batch_size)."""


class ContinualConfig(Section):
    """A sequence of tasks learned one after the other by one model, with combinable anti-forgetting plug-ins."""
    scenario: Literal["cross_domain", "class_incremental"] = "cross_domain"
    """cross_domain: each task its own problem, by default a head per task with the task id given at test;
    class_incremental: one growing head (`head` single), no task id. With one head (either scenario) no task may
    repeat a class an earlier task of the same dataset has."""
    head: Literal["multi", "single"] | None = None
    """multi: a head per task, task id given at test (cross_domain default); single: one expanding head, no task id."""
    checkpoint: str | None = None
    """Starting student (best.pt). Default: recipe.model from scratch."""
    _home = _home_expanded("checkpoint")
    checkpoint_task: bool = True
    """The checkpoint already solves the first task (it is evaluated, not retrained); false: reuse only its backbone."""
    tasks: list[ContinualTask] = Field(min_length=2)
    """The tasks in learning order (at least 2, names unique); `--set continual.tasks.NAME.key=...` reaches one by
    name."""
    joint: bool = False
    """Upper bound: at each step train on the union of all tasks so far."""
    ewc: EWCConfig | None = None
    """Elastic weight consolidation plug-in (null: off)."""
    lwf: LwFConfig | None = None
    """Learning-without-forgetting plug-in (null: off)."""
    replay: ReplayConfig | None = None
    """Rehearsal plug-in (null: off)."""
    bn_freeze: bool = False
    """BatchNorm layers in eval mode with frozen affine parameters while learning the tasks after the first (not with
    train.swa, whose update_bn recomputes their statistics)."""
    eval_split: Literal["val", "test"] = "test"
    """The split of every task the accuracy matrix (and retention) is measured on after each task."""

    _head_inferred: bool = PrivateAttr(default=False)
    """`head` filled in from the scenario (not the recipe's own): `to_dict` leaves it out, so a run's recipe.yaml
    run again with another scenario infers it again (`head: multi` written out had refused class_incremental)."""

    @model_validator(mode="after")
    def _consistent(self) -> "ContinualConfig":
        if self.head is None:
            self._head_inferred = True
            self.head = "single" if self.scenario == "class_incremental" else "multi"
        if self.scenario == "class_incremental" and self.head == "multi":
            raise ValueError("class_incremental has no task id at test: use head 'single'")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        extra = [name for name, on in (("replay", self.replay), ("ewc", self.ewc), ("lwf", self.lwf)) if on]
        if self.joint and extra:  # it ran under the name "joint"
            them = "it" if len(extra) == 1 else "them"
            raise ValueError(f"joint trains on every task's data at once, the upper bound the methods are measured "
                             f"against; {', '.join(extra)} cannot be part of it: drop {them} or joint")
        return self


class WandbConfig(Section):
    """Weights & Biases run of the training (needs the `wandb` package: `pip install 'edgekd[wandb]'`)."""
    project: str = "edgekd"
    """The W&B project the run is logged to."""
    mode: Literal["offline", "online"] = "offline"
    """offline: the run is written under `dir` only (upload later with `wandb sync`); online: streamed to W&B."""
    entity: str | None = None
    """The W&B user or team that owns the project (null: your default entity)."""
    name: str | None = None
    """Run name (default: the recipe name); a fold or task of a k-fold or continual run is its own W&B run, named
    `<name>-fold<k>-<role>` or `<name>-task<i>_<task name>` and grouped under `<name>`. `train --resume` goes on in
    the run it resumes (its id is kept in `<out>/wandb_run_id`)."""
    tags: list[str] = []
    """Tags of the W&B run."""
    dir: str | None = None
    """Where W&B writes its `wandb/` run folders (default: the run's output directory)."""
    _home = _home_expanded("dir")


class TrackingConfig(Section):
    """Experiment tracking besides log.csv (always written): per-epoch metrics, learning rates and a validation
    confusion matrix. Not part of the recipe digest (tracking does not change what trains)."""
    tensorboard: bool | str = False
    """true: TensorBoard event files in `<out>/tensorboard` (a fold's or task's own folder: `<out>/fold<k>/<role>/`,
    `<out>/task<i>_<name>/`); a path: there, a fold's or task's in `<path>/fold<k>/<role>` or `<path>/task<i>_<name>`
    (needs `pip install 'edgekd[track]'`)."""
    _home = _home_expanded("tensorboard")
    wandb: WandbConfig | None = None
    """A Weights & Biases run of the training (null: none)."""


class Recipe(Section):
    name: str = Field("run", pattern=r"^[^/\\]+$")
    """The run's name: also its default folder, runs/<name> (one path component: no slash, not . or ..)."""

    @field_validator("name")
    @classmethod
    def _one_folder_name(cls, v: str) -> str:
        if v.strip() in (".", ".."):
            raise ValueError("must name a folder (runs/<name>), not . or ..")
        return v
    role: Literal["teacher", "student", "student_scratch", "baseline"] = "teacher"
    """What the run is in a KD comparison: `edgekd report` groups and orders its rows by it."""
    seed: int = Field(0, ge=0, lt=2**32)
    """Seeds Python's, numpy's and torch's generators, the carving of splits (val/test fractions, folds, limit) and each
    epoch's draws (augmentation, dropout, shuffling: seed * 1000 + epoch). In [0, 2**32): scikit-learn's split
    draws take no other (a negative seed had trained, then failed where a split was carved)."""
    data: DataConfig = DataConfig()
    """Where the images come from, how they are split, and the preprocessing the model (and its bundle) uses."""
    augment: list[dict[str, Any]] = []
    """torchvision.transforms.v2 ops by class name, e.g. `- RandomRotation: {degrees: 15}`."""

    @field_validator("augment")
    @classmethod
    def _finite_augment(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return refuse_nonfinite(v)
    model: ModelConfig = ModelConfig()
    """The network: a timm or built-in architecture, its starting weights, classifier head and frozen layers."""
    train: TrainConfig = TrainConfig()
    """The training loop: epochs, optimizer, LR schedule, loss, monitor, early stopping, SWA, device."""
    distill: DistillConfig | None = None
    """Knowledge distillation: `model` trains as the student of a frozen teacher checkpoint (null: a supervised run)."""
    continual: ContinualConfig | None = None
    """A sequence of tasks learned one after the other by one model (null: one task); not with `distill`."""
    tracking: TrackingConfig = TrackingConfig()
    """Experiment tracking besides log.csv (TensorBoard, Weights & Biases); not part of the digest."""

    @model_validator(mode="after")
    def _one_kind_of_run(self) -> "Recipe":
        data = self.data  # found when transforms were built, it did not name the --set that broke a recipe
        if len(data.mean) != data.channels or len(data.std) != data.channels:  # (a task's: continual's own check)
            raise ValueError(f"data.mean/std need {data.channels} values for data.channels={data.channels} (mean "
                             f"has {len(data.mean)}, std {len(data.std)})")
        if self.continual is not None and (data.positive_class is not None
                                           or any("positive_class" in t.data for t in self.continual.tasks)):
            raise ValueError("data.positive_class is for a single-task run: a continual run scores each two-class "
                             "task's label id 1 as its positive class")
        if self.continual is not None and self.distill is not None:  # the continual runner never read it
            raise ValueError("a recipe with a continual section does not use a distill section (its tasks learn "
                             "with continual.lwf/ewc/replay; distill a student with its own recipe and name it in "
                             "continual.checkpoint): remove one")
        if self.continual is not None and self.continual.bn_freeze and self.train.swa.enabled:
            raise ValueError("train.swa with continual.bn_freeze: SWA recomputes the BatchNorm statistics on the "
                             "current task's images (torch's update_bn), which bn_freeze holds at the earlier "
                             "tasks'; turn one off")
        self._no_adam_decay_on_idle_heads()
        return self

    def _no_adam_decay_on_idle_heads(self) -> None:
        """Multi-head continual runs train each task's rows of one Linear; without replay, LwF or joint the earlier
        tasks' rows get a zero loss gradient, and Adam's L2 term wd * p, normalised per weight, moves each of them
        by about lr * sign(p) per step whatever the decay: the old heads shrink to zero (AdamW's decoupled decay
        scales a row as a whole and keeps its argmax)."""
        c, opt = self.continual, self.train.optimizer
        if c is None or c.head != "multi" or opt.name != "adam" or not opt.weight_decay:
            return
        if c.joint or c.replay or (c.lwf is not None and c.lwf.alpha > 0):
            return
        raise ValueError(f"train.optimizer adam with weight_decay {opt.weight_decay:g} in a multi-head continual run "
                         "drives the earlier tasks' heads (no loss gradient, Adam's normalised L2 step) to zero: use "
                         "name adamw or weight_decay 0")

    def to_dict(self) -> dict[str, Any]:
        """The recipe as data (a run's recipe.yaml, a checkpoint's embedded recipe): the monitor directions the
        recipe left to inference stay unset (written out, `max` for val_auc had been kept for a val_loss run)."""
        dumped = self.model_dump(mode="json")
        if self.continual is not None and self.continual._head_inferred:
            dumped["continual"]["head"] = None
        for key in self.train._inferred:
            *section, name = ["train", *key.split(".")]
            node = dumped
            for k in section:
                node = node[k]
            node[name] = None
        return dumped

    def digests(self) -> set[str]:
        """Every digest a run of this setup may have recorded: `digest()`, and the one from before data.
        dicom_patient_ids (2026-12-06) when it is off, which that key's arrival had changed for every recipe (a run
        started before could not resume, a finished k-fold fold was trained again)."""
        return {self.digest(), self.digest(legacy=True)}

    def digest(self, legacy: bool = False) -> str:
        """A short sha256 of the resolved recipe: same digest, same training setup."""
        dumped = self.model_dump(mode="json", exclude={"tracking"})
        if legacy and not dumped["data"]["dicom_patient_ids"]:
            dumped["data"].pop("dicom_patient_ids")
        swa = dumped["train"]["swa"]
        # train.swa.start_epoch: "the last quarter" was spelled 0 until 2026-12-05 and is null since, when 0 came
        # to mean the first epoch; digests keep the old spelling, so runs trained before still resume and reuse.
        swa["start_epoch"] = {None: 0, 0: "first"}.get(swa["start_epoch"], swa["start_epoch"])
        for key in ("patient_pattern", "positive_class"):  # keys since 2026-12-05/07: unset, the digest is as before
            if dumped["data"].get(key) is None:
                dumped["data"].pop(key, None)
        # keys since 2026-12-06, left out where they mean what recipes before them did: the digest is as before
        if not dumped["data"]["hair_removal"] or dumped["data"].get("hair_kernel") == 17:  # 17 px: the old element
            dumped["data"].pop("hair_kernel", None)
        for term in (dumped.get("distill") or {}).get("terms", []):
            if term.get("warmup_epochs") == 0:
                term.pop("warmup_epochs")
        text = json.dumps(dumped, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def recipe_differences(before: Any, after: Any, prefix: str = "") -> list[str]:
    """Where two recipe dicts (`to_dict`) differ, down to the leaf, as `key: old -> new` (lists of one length item
    by item, `augment.0.RandomAffine.degrees: 10 -> 20`; `tracking` left out, as the digest leaves it out)."""
    if isinstance(before, dict) and isinstance(after, dict):
        keys = sorted(set(before) | set(after), key=str)
        pairs = [(k, before.get(k), after.get(k)) for k in keys if prefix or k != "tracking"]
    elif isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        pairs = list(zip(range(len(before)), before, after))
    else:
        return [] if before == after else [f"{prefix.rstrip('.') or 'recipe'}: {shorten(json.dumps(before), 60)} -> "
                                           f"{shorten(json.dumps(after), 60)}"]
    return [change for key, old, new in pairs for change in recipe_differences(old, new, f"{prefix}{key}.")]


BOUNDS = {"Ge": ("≥", "ge"), "Gt": (">", "gt"), "Le": ("≤", "le"), "Lt": ("<", "lt"), "MinLen": ("min length", "min_length")}


def _type_name(annotation: Any) -> str:
    """A field's type as a reader writes it: `int | null`, `"cosine" | "plateau"`, `list[str]`, `section`."""
    text = repr(annotation) if not isinstance(annotation, type) else annotation.__name__
    for old, new in (("typing.", ""), ("NoneType", "null"), ("| None", "| null"), ("edgekd.recipe.", ""),
                     ("Literal", "one of ")):
        text = text.replace(old, new)
    return text


def _sections_of(annotation: Any) -> list[type[BaseModel]]:
    """The recipe sections (pydantic models) a field holds, directly or in a list/union."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) for m in _sections_of(arg)]


BASE_KEY_ROW = ("| `base` | str \\| null | `null` |  | Not a schema key, read when the file is loaded: the path of "
                "another recipe file this one inherits, relative to this file's folder (that one may have its own "
                "`base:`; a cycle is refused). Mappings merge key by key, this file's values winning; a list "
                "(`augment`, `distill.terms`, `continual.tasks`) or other value replaces the base's whole, and so "
                "do `model.kwargs`, which are dropped when this file names another `model.name`. `--set` applies "
                "after the merge and cannot give `base`. |")
"""The top-level `base:` key in the reference's `recipe` table: `load_recipe` resolves it (`_read_yaml_with_base`,
`inherit`) before validation, so the schema never sees it."""


def recipe_key_reference() -> str:
    """Every recipe key with its type, default, bounds and description, made from the schema (docs/recipe-keys.md)."""
    lines = ["# Recipe keys", "", "Generated from the pydantic schema in `edgekd/recipe.py` by "
             "`python scripts/recipe_keys.py` (a test checks this file is current). Dotted keys are what "
             "`--set key=value` takes; a section may be `null` where its type says so.", ""]
    seen: set[type] = set()

    def section(model: type[BaseModel], prefix: str) -> None:
        rows, nested = [BASE_KEY_ROW] if model is Recipe else [], []
        for name, field in model.model_fields.items():
            bounds = ", ".join(f"{BOUNDS[type(m).__name__][0]} {getattr(m, BOUNDS[type(m).__name__][1])}"
                               for m in field.metadata if type(m).__name__ in BOUNDS)
            default = "required" if field.is_required() else f"`{json.dumps(field.get_default(call_default_factory=True), default=str)}`"
            subs = _sections_of(field.annotation)
            kind = " \\| ".join(sorted({m.__name__ for m in subs})) + (" \\| null" if type(None) in getattr(field.annotation, "__args__", ()) else "") \
                if subs else _type_name(field.annotation).replace("|", "\\|")
            desc = (field.description or "").replace("\n", " ").replace("|", "\\|")
            rows.append(f"| `{prefix}{name}` | {kind} | {default if not subs else ''} | {bounds} | {desc} |")
            nested += [(m, f"{prefix}{name}.") for m in subs if m not in seen]
        lines.extend([f"## `{prefix.rstrip('.') or 'recipe'}` ({model.__name__})", "",
                      *([inspect.cleandoc(model.__doc__), ""] if model.__doc__ and model.__doc__ != Section.__doc__ else []),
                      "| key | type | default | bounds | description |", "|---|---|---|---|---|", *rows, ""])
        for m, p in nested:
            if m not in seen:
                seen.add(m)
                section(m, f"{p}[{m.__name__}]." if m.__name__.endswith("Term") else p)  # a list item of that kind

    section(Recipe, "")
    return "\n".join(lines).rstrip() + "\n"


def format_validation_error(err: ValidationError, where: str) -> str:
    """pydantic's first error as one line naming `where` and the key: an unknown key, or the key, the problem and
    the (bounded) value given."""
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<root>"
    if first["type"] == "extra_forbidden":
        return f"{where}: unknown key '{shorten(key, 120)}'"
    value = first.get("input")
    msg = first["msg"].removeprefix("Value error, ")  # pydantic's prefix to a check of ours
    if first["type"] == "value_error" and isinstance(value, (dict, list)):  # a section's own check: not the section
        field = re.match(r"([a-z_]+): ", msg)  # one of its keys named first ("epochs: a number is expected"):
        if first["loc"] and field and isinstance(value, dict) and field.group(1) in value:  # train.epochs: ...
            return f"{where}: {shorten(key, 120)}.{msg}"
        return f"{where}: {shorten(key, 120)}: {msg}" if first["loc"] else f"{where}: {msg}"
    return f"{where}: {shorten(key, 120)}: {msg} (got {quote(value)})"


def parse_override(text: str, option: str = "--set") -> tuple[list[str], Any]:
    """`train.epochs=3` -> (['train', 'epochs'], 3); the value is parsed as YAML, except that a value with a `#`
    that YAML would take for a comment is the text as given. `option`: how errors name it."""
    if "=" not in text:
        raise EdgeKDError(f"{option} {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise EdgeKDError(f"{option} {text!r}: empty key")
    try:
        value = load_yaml(raw) if raw != "" else ""
        if re.search(r"(^|\s)#", raw) and not raw.lstrip().startswith(("'", '"', "[", "{")):
            value = raw  # `data.path=Batch #3`: YAML would read "Batch", the rest a comment (another folder)
    except DuplicateKeyError as err:
        raise EdgeKDError(f"{option} {shorten(text, 80)}: {err.problem}") from None
    except (yaml.YAMLError, RecursionError):
        value = raw
    check_recipe_size(value, Path(f"{option} {shorten(key.strip(), 60)}"))
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str], option: str = "--set") -> dict[str, Any]:
    """`key.sub=value` overrides on a recipe dict; a list is entered by index or, for a list of named mappings
    (continual.tasks), by name: `continual.tasks.1.data.path=...` or `continual.tasks.pneumonia.data.limit=400`.
    `option`: the command-line option errors name (--set, --teacher-set)."""
    raw = copy.deepcopy(raw)
    for text in overrides:
        keys, value = parse_override(text, option)
        node = raw
        for i, k in enumerate(keys[:-1]):
            if isinstance(node, list):
                node = node[_list_index(node, k, text, ".".join(keys[:i]), option)]
                if not isinstance(node, (dict, list)):
                    raise EdgeKDError(f"{option} {text!r}: '{'.'.join(keys[:i + 1])}' is not a section")
                continue
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, (dict, list)):
                raise EdgeKDError(f"{option} {text!r}: '{k}' is not a section")
            node = nxt
        if isinstance(node, list):
            node[_list_index(node, keys[-1], text, ".".join(keys[:-1]), option)] = value
        else:
            node[keys[-1]] = value
    return raw


def with_following_resize(raw: dict[str, Any], overrides: list[str], option: str = "--set") -> dict[str, Any]:
    """`apply_overrides`, and a recipe file's data.resize following an overridden image size
    (`resize_following_size`): for the recipes a user gives (load_recipe), not a checkpoint's embedded one, which
    eval --set and report --set override as it was trained."""
    after = apply_overrides(raw, overrides, option)
    resize = resize_following_size(raw, after, overrides)
    if resize is not None:
        after["data"]["resize"] = resize
    return after


def resize_following_size(before: dict[str, Any], after: dict[str, Any], overrides: list[str]) -> int | None:
    """The eval resize of a recipe whose `data.image_size` an override changes and whose `data.resize` none does:
    the recipe's resize-to-crop ratio kept (272 for 256 -> 102 for 96), else None. Left at 272, a 96 px run's
    validation, test, export and device saw the middle 35% of the image, training the whole of it."""
    given = {tuple(parse_override(text)[0]) for text in overrides}
    data, then = after.get("data"), before.get("data")
    if ("data", "image_size") not in given or ("data", "resize") in given or not isinstance(then, dict) \
            or not isinstance(data, dict):
        return None
    old_size, old_resize, size = then.get("image_size"), then.get("resize"), data.get("image_size")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (old_size, old_resize, size)) \
            or old_size == size or data.get("resize") != old_resize:
        return None
    return max(1, round(size * old_resize / old_size))


def _list_index(items: list, key: str, text: str, where: str, option: str = "--set") -> int:
    """The position of `key` in a recipe list: an index, or the `name` of one of its mappings (a key that is both,
    for two different items, is refused)."""
    names = [item.get("name") if isinstance(item, dict) else None for item in items]
    index = int(key) % len(items) if key.lstrip("-").isdigit() and -len(items) <= int(key) < len(items) else None
    named = [i for i, n in enumerate(names) if n is not None and str(n) == key]
    if index is not None and named and named != [index]:
        raise EdgeKDError(f"{option} {text!r}: '{key}' in '{where}' is both an index and the name of item {named[0]}")
    if index is not None or named:
        return index if index is not None else named[0]
    if not items:
        raise EdgeKDError(f"{option} {text!r}: '{where}' is an empty list")
    listed = [str(n) for n in names if n is not None]
    hint = f" or a name ({', '.join(listed)})" if listed else ""
    raise EdgeKDError(f"{option} {text!r}: '{where}' is a list of {len(items)}; give an index 0..{len(items) - 1}{hint}")


def recipe_from_dict(raw: dict[str, Any], where: str = "recipe") -> Recipe:
    """A Recipe from a dict of the recipe YAML's shape (no `base:`; every key in docs/recipe-keys.md), validated;
    `where` names it in errors. What a checkpoint embeds loads this way too, so the new-run traps that
    `load_recipe` refuses are not checked here (`refuse_new_run_traps`; the run entry points check them)."""
    if not isinstance(raw, dict):
        raise EdgeKDError(f"{where}: a recipe must be a YAML mapping")
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise EdgeKDError(format_validation_error(err, where)) from None


def as_recipe(recipe: Recipe | str | Path | dict, key: str = "recipe") -> Recipe:
    """A Recipe as the Python entry points take one: a Recipe, a recipe YAML path (read by `load_recipe`) or a dict
    of one (`recipe_from_dict`); `key` names the argument in the error for anything else."""
    if isinstance(recipe, (str, Path)):
        return load_recipe(recipe)
    if isinstance(recipe, dict) and "base" in recipe:  # as in a YAML file, the path read from the working folder
        raw, base = {k: v for k, v in recipe.items() if k != "base"}, recipe["base"]  # (it had been an unknown key)
        if not isinstance(base, (str, Path)) or not str(base).strip() or not Path(base).is_file():
            raise EdgeKDError(f"{key}: base: {shorten(repr(base), 80)}: not a recipe file (a dict's base: is a path "
                              "from the working folder)")
        return recipe_from_dict(inherit(_read_yaml_with_base(Path(base), seen=set()), raw), where=f"{key} (dict)")
    if isinstance(recipe, dict):
        return recipe_from_dict(recipe)
    if not isinstance(recipe, Recipe):
        raise EdgeKDError(f"{key}: expected a Recipe (edgekd.recipe.load_recipe), a recipe file path or a dict, got "
                          f"{type(recipe).__name__}")
    return recipe


def entry_arguments(recipe: Recipe | str | Path | dict, out: str | Path) -> tuple[Recipe, Path]:
    """What the Python entry points (`run_recipe`, `train_recipe`, `distill_recipe`, `run_continual`) take: a
    recipe (`as_recipe`) and the run folder as a path."""
    recipe = as_recipe(recipe)
    if not isinstance(out, (str, Path)) or not str(out).strip():
        raise EdgeKDError(f"out: expected the run's folder as a path, got {out!r}")
    refuse_new_run_traps(recipe, "recipe")
    return recipe, Path(out)


def find_recipe_file(value: str | Path, key: str, beside: str | Path | None = None) -> Path:
    """The recipe file a key names (`distill.teacher_recipe`): as given (absolute, or from the working directory),
    else from the folder of the recipe that names it (`beside`) or one of its parents, so the shipped recipes'
    `recipes/...` paths work from outside the project folder too."""
    given = Path(value)
    places = [given]
    if beside is not None and not given.is_absolute():
        start = Path(beside).resolve().parent
        places += [folder / given for folder in (start, *start.parents)]
    found = next((p for p in places if p.is_file()), None)
    if found is None:
        where = f" or above {Path(beside).parent}" if beside is not None and not given.is_absolute() else ""
        raise EdgeKDError(f"{key} {value}: recipe file not found (looked in the working directory{where})")
    return found


def load_recipe(path: str | Path, overrides: list[str] | str | dict[str, Any] | None = None,
                option: str = "--set") -> Recipe:
    """Read a recipe YAML (with optional `base:` inheritance), apply overrides (`key=value` texts, one text, or a
    {dotted key: value} dict), validate. `option`: the command-line option the overrides came from, as errors
    name it (--set, --teacher-set)."""
    raw = _read_yaml_with_base(Path(path), seen=set())
    if isinstance(overrides, dict):  # {"train.epochs": 3}: had been a TypeError (unhashable slice)
        overrides = [f"{key}={json.dumps(value, default=str)}" for key, value in overrides.items()]
    overrides = [overrides] if isinstance(overrides, str) else overrides or []
    try:
        recipe = recipe_from_dict(with_following_resize(raw, overrides, option), where=str(path))
        refuse_new_run_traps(recipe, str(path))
    except EdgeKDError as err:
        if not overrides:
            raise
        raise _blame(raw, overrides, str(path), err, option) from None
    return recipe


def refuse_new_run_traps(recipe: Recipe, where: str) -> None:
    """Settings a run would take without doing what they say, refused in the recipes a user gives (`load_recipe`,
    the Python entry points), not in the ones embedded in checkpoints (a model trained under them still evaluates
    and exports): focal loss with both `alpha` and `class_weights` (alpha won, without a word), a negative
    `model.freeze_stages`, and the `traps` below."""
    focal = [("train.loss", recipe.train.loss)] if recipe.train.loss.name == "focal" else []
    focal += [(f"distill.terms[{i}]", t) for i, t in enumerate(recipe.distill.terms if recipe.distill else [])
              if t.kind == "focal"]
    for key, loss in focal:
        if loss.alpha is not None and loss.class_weights:
            raise EdgeKDError(f"{where}: {key}: focal loss weights classes by alpha or by class_weights: give one "
                              "(with alpha set, class_weights did nothing)")
    if recipe.model.freeze_stages < 0:
        raise EdgeKDError(f"{where}: model.freeze_stages must be >= 0 (got {recipe.model.freeze_stages})")
    lowest = min(r for r in (recipe.train.optimizer.lr, recipe.train.optimizer.head_lr) if r)
    views = recipe.distill.teacher_views if recipe.distill else []
    sections = [("data", recipe.data)]
    for task in recipe.continual.tasks if recipe.continual else []:  # its data as continual's task_data_section has it
        try:
            sections.append((f"continual.tasks.{task.name}.data",
                             DataConfig.model_validate(deep_merge(recipe.data.model_dump(), task.data))))
        except ValidationError:  # named when the tasks are built (continual.tasks[i] (name): data.key: ...)
            pass
    traps = [trap for key, data in sections for trap in data_traps(data, key)] + [
        # each had run without doing what it says (checks of 2026-12-06/07: older checkpoints still load)
        # cosine had climbed toward it (lr 0.001 -> 0.43 in 4 epochs, val loss 0.69 -> 72)
        (recipe.train.scheduler.name == "cosine" and recipe.train.scheduler.min_lr >= lowest,
         f"train.scheduler.min_lr {recipe.train.scheduler.min_lr:g} is not below the learning rate {lowest:g} "
         "(optimizer.lr / head_lr): the cosine schedule would raise the rate toward it"),
        (recipe.model.head_hidden < 1, f"model.head_hidden must be >= 1 (got {recipe.model.head_hidden})"),
        (recipe.train.swa.enabled and not recipe.train.monitor.startswith("val_"),
         f"train.swa: the averaged weights are judged on the validation split, but train.monitor is "
         f"{recipe.train.monitor}; monitor a val_ metric"),
        (recipe.distill is not None and not recipe.distill.teacher_views,
         "distill.teacher_views: give at least one view (original, hflip, vflip)"),
        (recipe.distill is not None and len(set(views)) < len(views),
         f"distill.teacher_views: a view is given twice ({views}); it would count twice in the teacher's average"),
        (recipe.distill is not None and len({os.path.realpath(p) if p else p for p in
                                             (recipe.distill.teacher, *recipe.distill.ensemble)})
         < 1 + len(recipe.distill.ensemble), "distill.ensemble: a teacher checkpoint is given twice (teacher and "
         "ensemble together, by path or a link to it); it would count twice in the ensemble's mean"),
        (isinstance(recipe.tracking.tensorboard, str) and not recipe.tracking.tensorboard.strip(),
         "tracking.tensorboard: an empty path; give a folder, or true for <out>/tensorboard"),
        (recipe.model.name.startswith("edgekd_cnn") and bool(recipe.model.drop_path_rate),
         f"model.drop_path_rate {recipe.model.drop_path_rate}: the {recipe.model.name} model has no stochastic depth "
         "(it was dropped without a word); leave it unset (--set model.drop_path_rate=null), or use model.drop_rate "
         "(dropout before the head)")]
    for trapped, message in traps:
        if trapped:
            raise EdgeKDError(f"{where}: {message}")


def data_traps(data: DataConfig, key: str = "data") -> list[tuple[bool, str]]:
    """A data section's new-run traps (`refuse_new_run_traps`), its keys named under `key`."""
    names = data.class_names or []
    twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
    return [  # the export then failed ("class 'a' is output 1 of the model but class 0 of the data")
        (twice is not None, f"{key}.class_names: '{twice}' is given twice ({names}): each class needs its own name"),
        (any(not n.strip() for n in names), f"{key}.class_names: a class name is blank ({names})"),
        (data.path is not None and not data.path.strip(),  # '' had read the working directory
         f"{key}.path: is blank: give a file or folder, or null for the source's default"),
        (data.fold is not None and data.folds is None,
         f"{key}.fold {data.fold} needs data.folds (the number of folds), e.g. folds: 5 (it was ignored)"),
        (data.hair_kernel is not None and not data.hair_removal,
         f"{key}.hair_kernel {data.hair_kernel}: hair removal is off (data.hair_removal: false); turn it on, or "
         "leave hair_kernel unset")]


def sections_turned_on(path: str | Path, overrides: list[str], raw: dict[str, Any] | None = None) -> list[str]:
    """The optional sections (off, null, in the recipe file) that --set overrides turn on, one key being enough:
    `--set continual.ewc.fisher_samples=200` on a recipe without EWC runs EWC with defaults for its other keys.
    The callers warn: folder and recipe names then describe a method that is not the one that runs."""
    raw = _read_yaml_with_base(Path(path), seen=set()) if raw is None else raw
    try:
        base = recipe_from_dict(raw, where=str(path))
    except EdgeKDError:  # invalid without its overrides (e.g. a data.path given by --set): nothing to compare
        return []
    found: list[str] = []
    for text in overrides:
        keys, _ = parse_override(text)
        node: Any = base
        for i, k in enumerate(keys[:-1]):
            if not isinstance(node, BaseModel) or k not in type(node).model_fields:
                break
            node = getattr(node, k)
            if node is None:
                section = ".".join(keys[:i + 1])
                if section not in found:
                    found.append(section)
                break
    return found


def warn_sections_turned_on(path: str | Path, overrides: list[str], log: Callable[[str], None]) -> None:
    """A warning per section `sections_turned_on` finds; a note when data.resize follows an overridden image size
    (`resize_following_size`)."""
    raw = _read_yaml_with_base(Path(path), seen=set())  # once for both
    for section in sections_turned_on(path, overrides, raw):
        log(f"warning: --set turns on {section}, which {path} does not have (its other keys take their defaults; "
            "the run's name still says what the recipe does)")
    try:
        resize = resize_following_size(raw, apply_overrides(raw, overrides), overrides)
    except EdgeKDError:  # a malformed override: load_recipe names it
        return
    if resize is not None:
        log(f"note: data.resize {raw['data']['resize']} -> {resize}, following --set data.image_size (the recipe's "
            f"{raw['data']['resize']}/{raw['data']['image_size']} eval resize-to-crop ratio kept; give data.resize to "
            "choose another)")


def _blame(raw: dict[str, Any], overrides: list[str], where: str, err: EdgeKDError,
           option: str = "--set") -> EdgeKDError:
    """The error of a recipe with --set overrides, named after its cause: the first override after which the recipe
    has the problem it has with all of them, which the file alone does not (`--set KEY=VALUE: ...`), else the file.
    (An in-between state's problem that a later override mends, e.g. `distill.terms` missing until the next --set
    gives it, is not the one reported.)"""
    def problem(n: int) -> str | None:
        merged = apply_overrides(raw, overrides[:n], option)  # a malformed override raises its own message, naming it
        try:
            refuse_new_run_traps(recipe_from_dict(merged, where=""), "")  # a trap a --set sets is named as that --set
        except EdgeKDError as e:
            return str(e)
        return None

    own, final = problem(0), problem(len(overrides))
    for i, override in enumerate(overrides, 1):
        found = problem(i)
        if found is not None and found != own and found == final:
            if "Input should be a valid string" in found:  # `data.path=2024`, `=on`, `=[x]`: read as YAML
                found += f" ({option} reads a value as YAML: quote a text value, e.g. {option} 'KEY=\"on\"')"
            return EdgeKDError(f"{option} {override}{found}" if found.startswith(":") else f"{option} {override}: {found}")
    return err


MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_VALUES = 100_000
MAX_RECIPE_DEPTH = 32


def check_recipe_size(raw: Any, path: Path) -> None:
    """Refuse a recipe that expands to more than MAX_RECIPE_VALUES values or nests deeper than MAX_RECIPE_DEPTH
    (YAML aliases of aliases, a "billion laughs", or an alias to itself), counted without expanding it."""
    problem = oversized(raw, MAX_RECIPE_VALUES, MAX_RECIPE_DEPTH)
    if problem == "values":
        raise EdgeKDError(f"{path}: the recipe expands to more than {MAX_RECIPE_VALUES} values (nested YAML aliases?)")
    if problem == "depth":
        raise EdgeKDError(f"{path}: the recipe nests deeper than {MAX_RECIPE_DEPTH} levels (a YAML alias to itself?)")


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping that names a key twice: YAML keeps the last silently, so a second `train:` block dropped the
    first one's settings without a word."""


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged by flatten_mapping below
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                if key in seen:
                    raise DuplicateKeyError(None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
            except TypeError:  # an unhashable key: the base class says so, as a YAML error with its line
                break
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 integers as YAML 1.2 reads them: decimal only. PyYAML's 1.1 rules made `seed: 010` 8 (octal), `0x10` 16
# and `1:30` 90 (base 60), silently; those now stay strings (pydantic then reads "010" as 10, refuses "0x10").
_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:int"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?(?:0|[1-9][0-9_]*)$"),
                                       list("-+0123456789"))


def load_yaml(text: str) -> Any:
    """yaml.safe_load, except that a key given twice in one mapping is an error (DuplicateKeyError) and integers
    are decimal, as YAML 1.2 reads them (no octal 010, hex 0x10 or base-60 1:30; floats keep YAML 1.1's rules)."""
    loader = _UniqueKeyLoader(text)  # a SafeLoader: no Python object tags (tests/test_security.py)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def yaml_error(path: Path, err: yaml.YAMLError) -> EdgeKDError:
    """A YAML problem as one line naming the file and line."""
    mark = getattr(err, "problem_mark", None)
    line = f" line {mark.line + 1}" if mark else ""
    if isinstance(err, DuplicateKeyError):
        return EdgeKDError(f"{path}:{line}: {err.problem} (YAML would keep only the last one)")
    return EdgeKDError(f"{path}:{line} is not valid YAML")


def _read_yaml_with_base(path: Path, seen: set[Path]) -> dict[str, Any]:
    if path.is_dir():
        raise EdgeKDError(f"{path}: a folder, not a recipe file")
    if not path.is_file():
        raise EdgeKDError(f"{path}: recipe file not found")
    if path.resolve() in seen:
        raise EdgeKDError(f"{path}: circular 'base:'")
    seen.add(path.resolve())
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise EdgeKDError(f"{path}: {path.stat().st_size / 2**20:.1f} MiB is too large for a recipe "
                          f"(limit {MAX_RECIPE_BYTES // 2**10} KiB)")
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise yaml_error(path, err) from None
    except UnicodeDecodeError:
        with path.open("rb") as fh:  # a checkpoint given where the recipe goes (`check runs/x/best.pt`)
            head = fh.read(4)
        if is_torch_file_head(head):
            raise EdgeKDError(f"{path}: a PyTorch checkpoint or zip file, not a recipe (a YAML file, e.g. "
                              "recipes/demo/teacher.yaml)") from None
        raise EdgeKDError(f"{path}: is not UTF-8 text") from None
    except RecursionError:
        raise EdgeKDError(f"{path}: the YAML nests too deeply") from None
    if raw is None:  # an empty file (or comments only): every key would silently take its default
        raise EdgeKDError(f"{path}: the recipe is empty")
    if not isinstance(raw, dict):
        raise EdgeKDError(f"{path}: a recipe must be a YAML mapping")
    check_recipe_size(raw, path)
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str) or not base.strip():
        raise EdgeKDError(f"{path}: base: must be the path of one recipe file (got {shorten(repr(base), 60)})")
    here, real = path.parent / base, path.resolve().parent / base  # a symlinked recipe: beside its target too
    found = next((p for p in (here, real) if p.is_file()), None)
    if found is None and not here.exists():
        looked = f"{path.parent}" + (f" or {path.resolve().parent}, the folder of the file it links to"
                                      if path.parent.resolve() != path.resolve().parent else "")  # a link
        raise EdgeKDError(f"{path}: base: {base}: recipe file not found (looked in {looked})")
    return inherit(_read_yaml_with_base(found or here, seen), raw)


def inherit(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """A child recipe over its `base:`: sections merge key by key, except `model.kwargs`, which are one
    architecture's constructor arguments: a child's kwargs replace the parent's whole, and a child naming
    another model starts from none (a ViT student must not inherit its Swin teacher's window_size)."""
    merged = deep_merge(parent, child)
    p_model, c_model = parent.get("model") or {}, child.get("model") or {}
    if isinstance(c_model, dict) and isinstance(merged.get("model"), dict):
        if "kwargs" in c_model:
            merged["model"]["kwargs"] = copy.deepcopy(c_model["kwargs"])
        elif "name" in c_model and c_model["name"] != p_model.get("name"):
            merged["model"].pop("kwargs", None)
    return merged


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out
