"""The one trainer: epochs, AMP, accumulation, clipping, schedules, SWA, early stopping, checkpoints, resume.

What is optimized is an *objective* (supervised, distillation, ...) and what else happens around the loop are
*plugins* (continual-learning penalties, BN freezing, ...), so every recipe runs through this loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import nn

from edgekd.data import check_trained_splits, epoch_seed
from edgekd.errors import EdgeKDError
from edgekd.host import host_record
from edgekd.metrics import classification_metrics, ece, write_csv_log
from edgekd.probability import softmax
from edgekd.progress import progress_task
from edgekd.recipe import VAL_METRICS
from edgekd.train import distributed
from edgekd.train.checkpoint import load_resumable, load_state, save_checkpoint
from edgekd.train.optim import build_optimizer, build_scheduler, schedule_warnings
from edgekd.train.tracking import EpochRecord, Tracker, exit_code_of, require_packages


class Objective(Protocol):
    """Computes the training loss of a batch; returns (loss, student logits)."""

    def __call__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class SupervisedObjective:
    def __init__(self, criterion: nn.Module):
        self.criterion = criterion

    def __call__(self, model, images, targets):
        logits = model(images)
        return self.criterion(logits, targets), logits

    def parameters(self) -> list[nn.Parameter]:
        return list(self.criterion.parameters())

    def to(self, device: torch.device) -> "SupervisedObjective":
        """The criterion's buffers (CE's class weights) where the logits are."""
        self.criterion.to(device)
        return self


class Plugin:
    """Hooks around the training loop (Avalanche-style). Override what you need. A penalty is logged per epoch
    as `train_<name>` (log.csv): `name`, else the class name without "Plugin", lower case."""

    def before_fit(self, trainer: "Trainer") -> None: ...
    def before_epoch(self, trainer: "Trainer", epoch: int) -> None: ...
    def penalty(self, trainer: "Trainer", images: torch.Tensor, targets: torch.Tensor,
                logits: torch.Tensor) -> torch.Tensor | None: ...
    def after_step(self, trainer: "Trainer") -> None: ...
    def after_fit(self, trainer: "Trainer") -> None: ...


def plugin_name(plugin: Plugin) -> str:
    """The log.csv name of a plugin's penalty (`train_<name>`): its `name`, else its class name without "Plugin"."""
    return getattr(plugin, "name", None) or type(plugin).__name__.removesuffix("Plugin").lower()


def penalty_name(plugin: Plugin, taken) -> str:
    """plugin_name, suffixed _2, _3, ... past the names `taken` (a second plugin of one class: a column of its own)."""
    name = plugin_name(plugin)
    return name if name not in taken else next(f"{name}_{k}" for k in itertools.count(2) if f"{name}_{k}" not in taken)


def part_order(name: str) -> tuple:
    """log.csv's order of the loss parts: the distillation terms by index (`10_ce` after `2_kl`, not before), the
    unlabeled pool's likewise, then the plugins' penalties by name."""
    head, _, rest = name.partition("_")
    if head == "unlabeled":
        head, _, rest = rest.partition("_")
        return (1, int(head) if head.isdigit() else 0, rest)
    return (0, int(head), rest) if head.isdigit() else (2, 0, name)


def seed_everything(seed: int, deterministic: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def rng_state() -> dict[str, torch.Tensor]:
    """The Python, numpy and torch (CPU) random states as tensors, so a checkpoint loaded with weights_only keeps
    them: a run resumed from that point draws what the uninterrupted run drew."""
    _, mt, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(mt.astype(np.int64)),
            "numpy_extra": torch.tensor([pos, has_gauss, gauss], dtype=torch.float64),
            "python": torch.tensor(internal, dtype=torch.int64),
            "python_extra": torch.tensor([version, float("nan") if gauss_next is None else gauss_next],
                                         dtype=torch.float64)}


def restore_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Set the random states `rng_state` recorded."""
    pos, has_gauss, gauss = state["numpy_extra"].tolist()
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(pos), int(has_gauss), gauss))
    version, gauss_next = state["python_extra"].tolist()
    random.setstate((int(version), tuple(state["python"].tolist()), None if gauss_next != gauss_next else gauss_next))
    torch.set_rng_state(state["torch"])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EdgeKDError(f"train.device={name} but CUDA is not available")
    if name.startswith("cuda:") and distributed.is_active():  # every rank on that one GPU: NCCL's duplicate GPU
        raise EdgeKDError(f"train.device={name} with {distributed.world_size()} processes: each process trains on "
                          "the GPU of its LOCAL_RANK (torchrun); give train.device cuda or auto")
    available = {"mps": lambda: torch.backends.mps.is_available(),
                 "xpu": lambda: hasattr(torch, "xpu") and torch.xpu.is_available()}.get(name.split(":")[0])
    if available is not None and not available():  # torch's own error had been a RuntimeError, exit 1
        raise EdgeKDError(f"train.device={name} but this PyTorch build or machine has no {name.split(':')[0]} device")
    return torch.device(name)


@torch.no_grad()
def predict_logits(model: nn.Module, loader, device: torch.device, amp: bool = False, progress=None,
                   description: str = "predict") -> tuple[np.ndarray, np.ndarray]:
    """(labels, logits) over a loader with the model in eval mode (a step per batch on `progress`, if given)."""
    was_training = model.training
    model.eval()
    ys, outs = [], []
    with progress_task(progress, description, len(loader)) as advance:
        for images, targets in loader:
            with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
                logits = model(images.to(device, non_blocking=True))
            ys.append(targets.numpy())
            outs.append(logits.float().cpu().numpy())
            advance()
    model.train(was_training)
    return np.concatenate(ys), np.concatenate(outs)


def scored_outputs(model: nn.Module, loader, device: torch.device,
                   view: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(labels, logits) that are scored: finite, seen through `view(logits, labels) -> logits` (a continual run's
    multi-head layout masks each sample's logits to its own task's rows)."""
    y, logits = predict_logits(model, loader, device)
    if not np.all(np.isfinite(logits)):
        raise EdgeKDError("the model's outputs are NaN/Inf on the evaluation data (the weights diverged); "
                          "lower the learning rate or set train.clip_grad")
    return y, (view(logits, y) if view is not None else logits)


Scorer = Callable[[np.ndarray, np.ndarray], dict[str, float]]
"""(labels, logits) -> metrics: how an objective scores validation outputs (a continual run's per-task scoring)."""


def evaluate(model: nn.Module, loader, device: torch.device, criterion: nn.Module | None = None,
             view: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
             scorer: Scorer | None = None, positive: int = 1) -> dict[str, float]:
    """Metrics of the model on a loader (see scored_outputs for `view`, output_metrics for `scorer`, `positive`)."""
    return output_metrics(*scored_outputs(model, loader, device, view), criterion, scorer, positive)


def output_metrics(y: np.ndarray, logits: np.ndarray, criterion: nn.Module | None = None,
                   scorer: Scorer | None = None, positive: int = 1) -> dict[str, float]:
    """Classification metrics of (labels, logits) (`scorer`'s, else over every output, with the ECE of the softmax
    so that `monitor: val_ece` can pick a checkpoint; a two-class task's sensitivity/AUC of class `positive`), and
    the criterion's loss when one is given."""
    if scorer is not None:
        out = scorer(y, logits)
    else:
        probs = softmax(logits)
        out = {**classification_metrics(y, probs, positive), "ece": ece(probs, y)}
    if criterion is not None:
        with torch.no_grad():
            out["loss"] = float(criterion(torch.from_numpy(logits), torch.from_numpy(y).long()))
    return out


def monitored_value(row: dict[str, Any], name: str, key: str, epoch: int) -> float:
    """The value of a monitored metric in an epoch's log row: a one-line error when it is missing or NaN (a
    metric undefined for this data, e.g. AUC on a split with one class, would silently keep the first epoch)."""
    value = row.get(name)
    if value is None:
        usable = [k for k in row if k.startswith("train_") or (k.startswith("val_") and k[4:] in VAL_METRICS)]
        raise EdgeKDError(f"{key}: '{name}' is not a logged metric (choose from {', '.join(usable)})")
    if isinstance(value, float) and math.isnan(value):
        raise EdgeKDError(f"{key}: '{name}' is NaN at epoch {epoch + 1} (undefined for this data, e.g. AUC or pAUC "
                          "on a split without every class); monitor another metric such as val_loss")
    return value


@dataclass
class FitResult:
    best_path: Path
    last_path: Path
    history: list[dict[str, Any]]
    best_value: float
    best_epoch: int
    stopped_early: bool = False
    nonfinite_batches: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    step_seconds: list[float] = field(default_factory=list)
    """Wall time of each optimizer step (forward, backward and update of its accumulated batches)."""


def micro_batch_weight(step: int, accum: int, n_batches: int, sizes: list[int] | None, n: int) -> float:
    """What micro-batch `step` (of `n` images) weighs in its accumulation group, so each optimizer step is the mean
    over its images, as one big batch: its share of the group's images (`sizes`: each batch's count; the epoch's
    short last batch had weighed as much as a full one). The last group may hold fewer than accum micro-batches. A
    loader of unknown batch sizes: the mean of its micro-batches."""
    first = step // accum * accum
    group = min(accum, n_batches - first)
    return n / sum(sizes[first:first + group]) if sizes else 1.0 / group


def batch_sizes(loader) -> list[int] | None:
    """Each batch's image count of a plain DataLoader (a sampler of known length, a fixed batch size; only the last
    batch may be short), else None (e.g. a loader that appends a replay batch to each of its batches)."""
    size, sampler = getattr(loader, "batch_size", None), getattr(loader, "sampler", None)
    if not isinstance(loader, torch.utils.data.DataLoader) or not size or not hasattr(sampler, "__len__"):
        return None
    n, batches = len(sampler), len(loader)
    sizes = [size] * batches
    if batches and not loader.drop_last:
        sizes[-1] = n - size * (batches - 1)
    return sizes if all(s > 0 for s in sizes) else None


def one_image_batch_error(err: ValueError, data_cfg) -> Exception:
    """A training batch of one image through a BatchNorm layer at a 1x1 map (ResNet-18 at 28 px with
    data.batch_size 1) ends in torch's "Expected more than 1 value per channel": said as the recipe's problem."""
    if "more than 1 value per channel" not in str(err):
        return err
    return EdgeKDError(f"data.batch_size {data_cfg.batch_size}: a training batch of one image reached a BatchNorm "
                       f"layer with one value per channel (a 1x1 feature map at data.image_size "
                       f"{data_cfg.image_size}): BatchNorm needs 2 or more images per training batch")


class Trainer:
    """Runs `recipe.train` on a model and a DataModule; writes best.pt / last.pt into `out`."""

    track_part: str | None = None
    """The part of a larger run this training is (a continual task's folder name), for its trackers
    (`edgekd.train.tracking.Tracker.from_recipe`); a k-fold recipe's fold is read from the recipe."""

    def __init__(self, recipe, model: nn.Module, data, objective: Objective, out: str | Path,
                 plugins: list[Plugin] | None = None, eval_criterion: nn.Module | None = None,
                 checkpoint_extra: Callable[[], dict[str, Any]] | None = None, log: Callable[[str], None] = print):
        self.recipe, self.cfg = recipe, recipe.train
        self.data, self.objective = data, objective
        self.out = Path(out)
        self.plugins = plugins or []
        # Under torchrun: one process per rank, DDP for training, rank 0 logs and writes checkpoints.
        self.distributed = distributed.is_active()
        self.is_main = distributed.is_main_process()
        self.log = log if self.is_main else (lambda *_args, **_kw: None)
        self.device = resolve_device(self.cfg.device)
        self.model = model.to(self.device)
        if hasattr(objective, "to"):  # its loss's buffers too (CE class weights on the CPU had failed on CUDA)
            objective.to(self.device)
        self.net: nn.Module = self.model
        """What the objective calls in training: the model, or its DDP wrapper (set up in fit())."""
        self.eval_criterion = eval_criterion or nn.CrossEntropyLoss()
        self.eval_view = getattr(objective, "eval_view", None)
        self.eval_scorer = getattr(objective, "eval_metrics", None)
        self.checkpoint_extra = checkpoint_extra or (lambda: {})
        extra_params = list(getattr(objective, "parameters", lambda: [])())
        self.optimizer = build_optimizer(self.model, self.cfg.optimizer, extra_params)
        self.scheduler = build_scheduler(self.optimizer, self.cfg.scheduler, self.cfg.epochs)
        self.use_amp = self.cfg.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self._set_up_swa()
        for line in schedule_warnings(self.cfg, self.optimizer, self.swa_start if self.swa_model else None):
            self.log(line)
        self.history: list[dict[str, Any]] = []
        self.epoch = 0
        self.best_value = -math.inf if self.cfg.monitor_mode == "max" else math.inf
        self.best_epoch = -1
        self.best_loss: float | None = None
        """The best epoch's val loss: what breaks an exact tie of the monitor."""
        self.bad_epochs = 0
        self.nonfinite = 0
        self.checkpoints_written = 0
        self.samples_seen = 0
        self.epoch_random_state: torch.Tensor | None = None
        self.step_seconds: list[float] = []
        self.sessions: list[dict[str, int]] = []
        """One entry per `fit` of this run, resumes included: the epoch it started at, its processes and threads."""
        self.prior_seconds = 0.0
        """Seconds the run trained before this session, up to its last checkpoint (0 unless resumed)."""
        self.resumed_from: tuple[Path | None, int | None] = (None, None)  # the checkpoint and its process count
        self._session_start: float | None = None
        self._unmanaged_params: list[nn.Parameter] = []
        self.val_outputs: tuple[np.ndarray, np.ndarray] | None = None
        """The last validation pass's (labels, scored logits)."""
        self.epoch_lrs: dict[str, float] = {}
        """The learning rate of each param group (by name) in the last epoch."""
        if self.is_main:  # a tracking package the recipe asks for and this box lacks: refused before any work
            require_packages(recipe.tracking)

    def _set_up_swa(self) -> None:
        """train.swa: the averaged model, its first epoch (default: the last quarter's) and SWALR when swa.lr."""
        self.swa_model = self.swa_scheduler = None
        if self.cfg.swa.enabled:
            self.swa_model = torch.optim.swa_utils.AveragedModel(self.model)
            start = self.cfg.swa.start_epoch
            self.swa_start = int(self.cfg.epochs * 0.75) if start is None else start
            if self.cfg.swa.lr is not None:  # from swa_start on, SWALR replaces the main schedule
                self.swa_scheduler = torch.optim.swa_utils.SWALR(
                    self.optimizer, swa_lr=self.cfg.swa.lr, anneal_epochs=self.cfg.swa.anneal_epochs,
                    anneal_strategy="cos")

    # ----------------------------------------------------------------- state
    def state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "history": self.history, "best_value": self.best_value,
            "best_epoch": self.best_epoch, "best_loss": self.best_loss, "bad_epochs": self.bad_epochs, "nonfinite": self.nonfinite,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "scaler": self.scaler.state_dict(),
            "swa": self.swa_model.state_dict() if self.swa_model else None,
            "swa_scheduler": self.swa_scheduler.state_dict() if self.swa_scheduler else None,
            "world_size": distributed.world_size(),
            "train_seconds": self.train_seconds(), "sessions": self.sessions,
        }

    @property
    def trained_this_session(self) -> bool:
        """Whether this session had epochs to train (a resumed run that had finished has none)."""
        return self._session_start is not None

    def train_seconds(self) -> float:
        """Wall time the run has trained: earlier sessions up to their last checkpoint, plus this session so far."""
        now = 0.0 if self._session_start is None else time.perf_counter() - self._session_start
        return self.prior_seconds + now

    def checkpoint_payload(self, state_dict: dict[str, torch.Tensor], metrics: dict[str, float],
                           with_state: bool) -> dict[str, Any]:
        payload = {
            "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
            "metrics": metrics,
            "recipe_digest": self.recipe.digest(),
            **self.checkpoint_extra(),
        }
        if with_state:
            payload["trainer"] = self.state()
        return payload

    def resume(self, path: str | Path) -> dict[str, Any]:
        """Load last.pt's weights and trainer state; returns the checkpoint (its other keys: what the run recorded)."""
        ckpt = load_resumable(path, self.recipe)
        if "trainer" not in ckpt:
            raise EdgeKDError(f"{path}: holds no trainer state to resume from")
        # a folder that changed between sessions re-draws the splits: the run would go on with other images
        check_trained_splits(ckpt, self.data, self.recipe, str(path), ("train", "val", "test"))
        load_state(self.model, ckpt["state_dict"], str(path))
        st = ckpt["trainer"]
        self.optimizer.load_state_dict(st["optimizer"])
        if self.scheduler and st["scheduler"]:
            self.scheduler.load_state_dict(st["scheduler"])
        if st["scaler"] or not self.scaler.is_enabled():  # a CPU session's disabled scaler saved {}: a CUDA
            self.scaler.load_state_dict(st["scaler"])  # session goes on with a fresh scale (loading {} raised)
        else:
            self.log(f"{path}: no AMP loss scale saved (its session ran without CUDA AMP); a fresh scale is used")
        if self.swa_model and st["swa"]:
            self.swa_model.load_state_dict(st["swa"])
        if self.swa_scheduler and st.get("swa_scheduler"):
            self.swa_scheduler.load_state_dict(st["swa_scheduler"])
        self.epoch, self.history = st["epoch"], st["history"]
        self.best_value, self.best_epoch = st["best_value"], st["best_epoch"]
        self.best_loss = st.get("best_loss")  # absent before 2026-12-06: ties are then not broken until a new best
        self.bad_epochs, self.nonfinite = st["bad_epochs"], st["nonfinite"]
        # absent from checkpoints before 2026-12-05: their time and sessions before the resume are not known
        self.prior_seconds, self.sessions = st.get("train_seconds", 0.0), list(st.get("sessions", []))
        self.log(f"resumed from {path} after epoch {self.epoch}"
                 + (f" (training goes on at epoch {self.epoch + 1})" if self.epoch < self.cfg.epochs else ""))
        self.resumed_from = (path, st.get("world_size"))  # absent from checkpoints before 2026-12-05
        return ckpt

    # ----------------------------------------------------------------- loop
    def _improved(self, value: float) -> bool:
        """Better than the best epoch's monitor by min_delta (what early stopping's patience counts)."""
        delta = self.cfg.early_stop.min_delta
        if math.isnan(value):
            return False
        if self.cfg.monitor_mode == "max":
            return value > self.best_value + delta
        return value < self.best_value - delta

    def _early_stop_line(self, patience: int) -> str:
        """Why the run stopped; a best.pt from a tie broken by val loss (marked * in its epoch line) after the last
        improvement is named, since the patience counts from that improvement (the line had seemed to contradict
        the * marks)."""
        last = self.epoch - self.bad_epochs
        tie = (f"; best.pt is epoch {self.best_epoch}'s, which tied epoch {last}'s at a lower val loss"
               if self.best_epoch > last else "")
        return f"early stop: {self.cfg.monitor} did not improve for {patience} epochs (last at epoch {last}{tie})"

    def _breaks_tie(self, value: float, loss: float | None) -> bool:
        """The monitor tied exactly with the best epoch's (a val AUC or ACC saturated on a small split: the first
        epoch at 1.0 had been kept, barely trained) at a val loss lower by more than min_delta: this epoch becomes
        best.pt, without resetting early stopping's patience (the monitor did not improve)."""
        return (value == self.best_value and loss is not None and self.best_loss is not None
                and loss < self.best_loss - self.cfg.early_stop.min_delta)

    def train_epoch(self, epoch: int, progress=None) -> dict[str, float]:
        self.model.train()
        for p in self.plugins:
            p.before_epoch(self, epoch)
        if hasattr(self.objective, "set_epoch"):  # an objective with its own seeded data (a KD unlabeled pool)
            self.objective.set_epoch(epoch)
        loader = self.data.loader("train", epoch=epoch, distributed=self.distributed)
        with progress_task(progress, f"epoch {epoch + 1}/{self.cfg.epochs}", len(loader)) as advance:
            try:
                total, count, parts = self._train_batches(epoch, loader, advance)
            except ValueError as err:
                raise one_image_batch_error(err, self.data.cfg) from None
        names = sorted(distributed.union_across_ranks(parts), key=part_order)  # one never logged counts 0 there
        sums = distributed.sum_across_ranks([total, count, *(parts.get(k, 0.0) for k in names)], self.device)
        count = max(sums[1], 1)  # the loss over all ranks' shards
        return {"train_loss": sums[0] / count, **{f"train_{k}": v / count for k, v in zip(names, sums[2:])}}

    def _train_batches(self, epoch: int, loader, advance: Callable[..., None]) -> tuple[float, int, dict[str, float]]:
        """One pass over the training loader: (summed loss, samples, summed parts) of this rank. The parts are what
        the loss adds up: a distillation objective's terms (each unweighted) and each plugin's penalty (as added)."""
        accum, n_batches = self.cfg.grad_accum, len(loader)
        sizes = batch_sizes(loader) if accum > 1 else None
        total, count = 0.0, 0
        part_sums: dict[str, float] = {}
        self.optimizer.zero_grad(set_to_none=True)
        step_start, dropped = time.perf_counter(), None  # dropped: the accumulation group a non-finite loss voids
        for step, (images, targets) in enumerate(loader):
            if step // accum == dropped:  # its other micro-batches had made a step of group - 1 of them, scaled 1/group
                advance()  # the loss shown is unchanged
                step_start = time.perf_counter()  # the next step's time is its own
                continue
            images = images.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, enabled=self.use_amp):
                loss, logits = self.objective(self.net, images, targets)
                parts = dict(getattr(self.objective, "last_parts", {}))
                for p in self.plugins:
                    extra = p.penalty(self, images, targets, logits)
                    if extra is not None:
                        loss = loss + extra
                        parts[penalty_name(p, parts)] = float(extra.detach() if torch.is_tensor(extra) else extra)
            # Every rank takes the same branch (a rank skipping backward alone would stall DDP's all-reduce).
            if not distributed.all_ranks_true(bool(torch.isfinite(loss)), self.device):
                if self.cfg.nonfinite == "error":
                    raise EdgeKDError(f"non-finite loss ({loss.item()}) at epoch {epoch + 1} step {step + 1}; "
                                      "lower the learning rate, or set train.nonfinite=skip")
                self.nonfinite += 1
                self.optimizer.zero_grad(set_to_none=True)
                dropped = step // accum
                advance()
                step_start = time.perf_counter()
                continue
            self.scaler.scale(loss * micro_batch_weight(step, accum, n_batches, sizes, len(targets))).backward()
            if (step + 1) % accum == 0 or step + 1 == n_batches:
                if self.distributed:
                    distributed.average_gradients(self._unmanaged_params)
                if self.cfg.clip_grad:
                    self.scaler.unscale_(self.optimizer)
                    nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                             self.cfg.clip_grad)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                for p in self.plugins:
                    p.after_step(self)
                now = time.perf_counter()
                self.step_seconds.append(now - step_start)
                step_start = now
            total += loss.item() * len(targets)
            count += len(targets)
            for k, v in parts.items():
                part_sums[k] = part_sums.get(k, 0.0) + v * len(targets)
            self.samples_seen += len(targets)
            advance(description=f"epoch {epoch + 1}/{self.cfg.epochs} loss {total / max(count, 1):.4f}")
        return total, count, part_sums

    def _start_fit(self, trains: bool = True) -> None:
        """This session's record (`trains`: it has epochs left to train), plugins' before_fit, then the
        (DDP-)wrapped model and the parameters the objective owns."""
        self._session_start = time.perf_counter() if trains else None  # a finished run's re-evaluation trains not
        if trains:
            self.sessions.append({"from_epoch": self.epoch, "processes": distributed.world_size(),
                                  "threads": torch.get_num_threads(), "machine": host_record()})  # each resume's
        for p in self.plugins:
            p.before_fit(self)
        # Wrapped after before_fit: DDP registers the parameters that require grad at that moment (BN freeze).
        self.net = distributed.wrap_model(self.model, self.device)
        model_params = {id(p) for p in self.model.parameters()}
        self._unmanaged_params = [p for g in self.optimizer.param_groups for p in g["params"]
                                  if id(p) not in model_params]

    def _run_epoch(self, epoch: int, val_loader, progress) -> tuple[dict[str, Any], bool]:
        """Train and validate one epoch, step the schedule, track the best: (history row, improved)."""
        # Re-seeding per epoch makes a resumed run replay the same random stream as an uninterrupted one.
        seed_everything(epoch_seed(self.recipe.seed, epoch, self.distributed), self.cfg.deterministic)
        self.epoch_random_state = torch.get_rng_state()  # in the DDP debug record: each rank draws its own
        t0 = time.perf_counter()
        row: dict[str, Any] = {"epoch": epoch + 1, **self.train_epoch(epoch, progress)}
        row["lr"] = self.optimizer.param_groups[-1]["lr"]
        self.epoch_lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}
        if len(self.epoch_lrs) > 1:  # differential LR: each group's rate in log.csv (`lr` is the last group's)
            row.update({f"lr_{name}": lr for name, lr in self.epoch_lrs.items()})
        distributed.broadcast_buffers(self.model)
        if self.swa_model is not None and epoch >= self.swa_start:
            self.swa_model.update_parameters(self.model)
        self.val_outputs = scored_outputs(self.model, val_loader, self.device, self.eval_view)
        row.update({f"val_{k}": v for k, v in output_metrics(*self.val_outputs, self.eval_criterion,
                                                                      self.eval_scorer, getattr(self.data, "positive", 1)).items()})
        row["epoch_seconds"] = time.perf_counter() - t0
        monitor = monitored_value(row, self.cfg.monitor, "train.monitor", epoch)
        self._step_schedule(row, epoch)
        improved = self._improved(monitor)
        self.bad_epochs = 0 if improved else self.bad_epochs + 1
        if improved or self._breaks_tie(monitor, row.get("val_loss")):
            self.best_value, self.best_epoch, self.best_loss = monitor, epoch + 1, row.get("val_loss")
            improved = True  # best.pt is written
        self.history.append(row)
        self.epoch = epoch + 1
        return row, improved

    def _save_epoch(self, row: dict[str, Any], improved: bool, best_path: Path, last_path: Path) -> None:
        # Every rank evaluated the same (identical) weights on the whole val split, so all agree on `improved`
        # and on early stopping without a broadcast; only rank 0 writes, the others wait for the files.
        if self.is_main:
            metrics = {k: v for k, v in row.items() if k.startswith("val_")}
            if improved:
                self._save(best_path, self.checkpoint_payload(self.model.state_dict(), metrics, False))
            self._save(last_path, self.checkpoint_payload(self.model.state_dict(), metrics, True))
            write_csv_log(self.out / "log.csv", self.history)  # every epoch: a long run can be followed
        distributed.barrier()

    def _finish_fit(self, best_path: Path, last_path: Path) -> dict[str, Any]:
        """SWA's final weights, the plugins' after_fit, the checkpoints of a 0-epoch run, the debug record."""
        extra = {}
        if self.swa_model is not None and self.epoch > self.swa_start:
            extra["swa"] = self._finish_swa(best_path)
        elif self.swa_model is not None and self.swa_start < self.cfg.epochs:  # stopped early: SWA never began
            self.log(f"warning: the run ended at epoch {self.epoch}, before train.swa.start_epoch {self.swa_start}: "
                     "no weights were averaged; best.pt is the best epoch's")
            extra["swa"] = {"used": False, "reason": f"ended at epoch {self.epoch}, before swa start {self.swa_start}"}
        for p in self.plugins:
            p.after_fit(self)
        if self.cfg.epochs == 0 and self.is_main:
            self._save(best_path, self.checkpoint_payload(self.model.state_dict(), {}, False))
            self._save(last_path, self.checkpoint_payload(self.model.state_dict(), {}, True))
        distributed.barrier()
        self.net = self.model
        distributed.write_debug_record(self.model, {
            "samples_seen": self.samples_seen, "epochs": self.epoch, "checkpoints_written": self.checkpoints_written,
            "random_state_sha256": hashlib.sha256(self.epoch_random_state.numpy().tobytes()).hexdigest()
            if self.epoch_random_state is not None else None,
            "objective_sha256": distributed.weights_digest(
                {str(i): p for i, p in enumerate(self._unmanaged_params)}) if self._unmanaged_params else None})
        return extra

    def fit(self, progress=None) -> FitResult:
        self.out.mkdir(parents=True, exist_ok=True)
        best_path, last_path = self.out / "best.pt", self.out / "last.pt"
        patience = self.cfg.early_stop.patience
        stopped_early = patience is not None and self.epoch > 0 and self.bad_epochs >= patience  # resumed, had stopped
        finished = self.epoch > 0 and (self.epoch >= self.cfg.epochs or stopped_early)
        if finished:  # a resumed run that had ended: it had added an empty session, without a word
            self.log(f"the run had finished ({self.epoch} of {self.cfg.epochs} epochs"
                     f"{', stopped early' if stopped_early else ''}): nothing left to train; its best.pt is "
                     "evaluated again")
        path, before = self.resumed_from
        if not finished and before is not None and before != distributed.world_size():
            self.log(f"warning: {path} was trained by {before} process(es), resumed by {distributed.world_size()}: "
                     f"the batch each step averages ({self.data.cfg.batch_size} x processes) and the shards change")
        threads = self.sessions[-1].get("threads") if self.sessions else None  # the session it was stopped in
        if not finished and path is not None and threads and threads != torch.get_num_threads():
            self.log(f"warning: {path} was trained on {threads} CPU thread(s), resumed on {torch.get_num_threads()}: "
                     "the figures can differ in the last digits from a run that kept one count (train.threads "
                     "fixes it; OMP_NUM_THREADS or another machine's cores had changed it without a word)")
        self._start_fit(trains=not finished)
        val_loader = self.data.loader("val", train=False)
        tracker = (Tracker.from_recipe(self.recipe, self.out, self.track_part, resume=path is not None, log=self.log)
                   if self.is_main and not finished else Tracker([]))
        try:
            while self.epoch < self.cfg.epochs and not stopped_early:
                row, improved = self._run_epoch(self.epoch, val_loader, progress)
                self._save_epoch(row, improved, best_path, last_path)
                self.log(self._summary(row, improved))
                tracker.log_epoch(self._epoch_record(row))
                if patience is not None and self.bad_epochs >= patience:
                    stopped_early = True
                    self.log(self._early_stop_line(patience))
                    break
        except BaseException as err:
            with contextlib.suppress(Exception):  # a tracker's own failure never hides the training's
                tracker.close(exit_code_of(err))
            raise
        tracker.close()
        extra = self._finish_fit(best_path, last_path)
        return FitResult(best_path, last_path, self.history, self.best_value, self.best_epoch, stopped_early,
                         self.nonfinite, extra, self.step_seconds)

    def _epoch_record(self, row: dict[str, Any]) -> EpochRecord:
        """What the trackers get of an epoch: its log row, every param group's learning rate, validation classes."""
        y, logits = self.val_outputs
        names = list(getattr(self.data, "class_names", None) or [])
        if len(names) != logits.shape[1]:  # a continual run's output layout
            names = [str(i) for i in range(logits.shape[1])]
        return EpochRecord(row["epoch"], row, self.epoch_lrs, y, logits.argmax(1), names)

    def _step_schedule(self, row: dict[str, Any], epoch: int) -> None:
        """Once per epoch: SWALR from swa_start on (when swa.lr is set), else the main schedule."""
        if self.swa_scheduler is not None and epoch >= self.swa_start:
            self.swa_scheduler.step()
        elif isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(monitored_value(row, self.cfg.scheduler.monitor, "train.scheduler.monitor", epoch))
        elif self.scheduler is not None:
            self.scheduler.step()

    def _finish_swa(self, best_path: Path) -> dict[str, float]:
        """Recompute BN statistics for the averaged weights; keep them as best.pt if they beat the best epoch.
        A last batch of one image is left out, as training leaves it out: update_bn runs the model in train mode,
        where it had ended a finished run at a BatchNorm of 1x1 maps (ResNet-18 at 28 px)."""
        torch.optim.swa_utils.update_bn(
            ((x.to(self.device), ) for x, _ in self.data.loader("train", train=False) if len(x) > 1),
            self.swa_model, self.device)
        swa_net = self.swa_model.module
        val = evaluate(swa_net, self.data.loader("val", train=False), self.device, self.eval_criterion,
                       self.eval_view, self.eval_scorer, getattr(self.data, "positive", 1))
        value = val.get(self.cfg.monitor.removeprefix("val_"), float("nan"))
        metrics = {f"val_{k}": v for k, v in val.items()}
        if self.is_main:
            self._save(self.out / "swa.pt", self.checkpoint_payload(swa_net.state_dict(), metrics, False))
        used = self._improved(value) or self._breaks_tie(value, val.get("loss"))
        if used:
            self.best_value, self.best_epoch, self.best_loss = value, self.epoch, val.get("loss")
            self.model.load_state_dict(swa_net.state_dict())
            if self.is_main:
                self._save(best_path, self.checkpoint_payload(swa_net.state_dict(), metrics, False))
        self.log(f"SWA over epochs {self.swa_start + 1}..{self.epoch}: {self.cfg.monitor}={value:.4f}"
                 f" ({'kept as best' if used else 'best epoch kept'})")
        return {"value": value, "used": used}

    def _save(self, path: Path, payload: dict[str, Any]) -> None:
        save_checkpoint(path, payload)
        self.checkpoints_written += 1

    def _summary(self, row: dict[str, Any], improved: bool) -> str:
        shown = ("train_loss", "val_loss", "val_acc", "val_auc", "val_f1")  # + the monitor (val_pauc) that picks best.pt
        keys = [k for k in (*shown, *([self.cfg.monitor] if self.cfg.monitor not in shown else [])) if k in row]
        parts = " ".join(f"{k}={row[k]:.4f}" for k in keys)
        return f"epoch {row['epoch']}/{self.cfg.epochs} {parts} ({row['epoch_seconds']:.1f}s){' *' if improved else ''}"
