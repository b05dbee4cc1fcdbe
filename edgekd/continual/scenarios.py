"""Task sequences: each recipe task becomes a DataModule whose labels are global output ids (earlier tasks'
classes first), and the loss/prediction rule of the head layout (multi-head with task id, or one expanding head)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from torch import nn

from edgekd.data import DataModule, Table, build_data, data_path_key, preprocess_spec
from edgekd.errors import EdgeKDError
from edgekd.metrics import classification_metrics
from edgekd.probability import softmax
from edgekd.recipe import DataConfig, deep_merge

# Preprocessing keys every task must share: one model, one input pipeline (the bundle records the first task's,
# hair removal included: a task trained on hair-removed images had been served without it).
SHARED_PREPROCESS = ("channels", "input_size", "resize", "mean", "std", "hair_removal", "hair_kernel")


@dataclass
class Task:
    """One task of the sequence: its data (global labels) and its rows [lo, hi) of the output layer."""

    index: int
    name: str
    class_names: list[str]
    lo: int
    hi: int
    data: DataModule

    @property
    def num_classes(self) -> int:
        return self.hi - self.lo


def _offset_tables(tables: dict[str, Table], offset: int) -> dict[str, Table]:
    return {split: replace(t, labels=t.labels + offset) for split, t in tables.items()}


def task_data_section(recipe, task_cfg) -> dict[str, Any]:
    """A task's data section as a mapping: the recipe's, with the task's own `data:` keys over it."""
    return deep_merge(recipe.data.model_dump(), task_cfg.data)


def build_tasks(recipe, recorded: bool = False) -> list[Task]:
    """The recipe's `continual.tasks` as Task objects: data section + task overrides, class selection, and
    label ids shifted after the earlier tasks' classes. `recorded`: the tasks of a trained checkpoint, rebuilt to
    score or export it (a one-head cross-domain model trained before 2026-12-06 may repeat a class: not refused)."""
    tasks: list[Task] = []
    global_names: list[str] = []
    for i, tcfg in enumerate(recipe.continual.tasks):
        raw = task_data_section(recipe, tcfg)
        if tcfg.classes is not None:
            raw["classes"] = tcfg.classes
        try:
            data_cfg = DataConfig.model_validate(raw)
        except ValidationError as err:
            first = err.errors()[0]
            key = ".".join(str(p) for p in first["loc"])
            raise EdgeKDError(f"continual.tasks[{i}] ({tcfg.name}): data.{key}: {first['msg']}") from None
        where = f"continual.tasks[{i}] ({tcfg.name})"
        if tasks:  # before the data is built: a wrong channels count otherwise surfaces as a mean/std length error
            first_pp, pp = tasks[0].data.preprocess, preprocess_spec(data_cfg)
            for key in SHARED_PREPROCESS:
                if first_pp.get(key) != pp.get(key):
                    raise EdgeKDError(f"{where}: data.{key} differs from the first task's ({pp.get(key)} vs "
                                      f"{first_pp.get(key)}); one model needs one input pipeline")
        try:
            dm = build_data(recipe.model_copy(update={"data": data_cfg, "continual": None}))
        except EdgeKDError as err:
            raise EdgeKDError(f"{where}: {err}") from None
        if recipe.continual.scenario == "class_incremental" or (recipe.continual.head == "single" and not recorded):
            check_new_classes(tasks, data_cfg, dm.class_names, where)
        if len(dm.class_names) < 2 and (recipe.continual.head == "multi" or not tasks):  # a head of its own
            raise EdgeKDError(f"{where}: one class ({dm.class_names[0]!r}): a head of one class calls every image "
                              "right (accuracy 1.0, AUC undefined); give the task 2 classes or more")
        lo = len(global_names)
        global_names += [f"{tcfg.name}:{n}" for n in dm.class_names]
        task_data = DataModule(tables=_offset_tables(dm.tables, lo), class_names=list(global_names),
                               source_name=dm.source_name, cfg=data_cfg, augment=dm.augment, seed=dm.seed,
                               bad_files=dm.bad_files, notes=dm.notes)  # (its notes had been dropped)
        tasks.append(Task(i, tcfg.name, list(dm.class_names), lo, lo + len(dm.class_names), task_data))
    if not recorded:
        check_loss_fits_tasks(recipe, tasks)
    return tasks


def check_loss_fits_tasks(recipe, tasks: list[Task]) -> None:
    """A focal loss's scalar alpha weighs class 1 against class 0: it fits only where the loss sees two classes at
    every step (one head: every class so far; one head per task: each task's). It had failed with an IndexError
    once the second task's classes came, after the first task had trained (`edgekd update`: at its first step)."""
    from edgekd.train.losses import check_alpha_fits

    loss = recipe.train.loss
    if loss.name != "focal" or loss.alpha is None or isinstance(loss.alpha, list):
        return
    for t in tasks:
        seen = t.hi if recipe.continual.head == "single" else t.num_classes
        try:
            check_alpha_fits(loss.alpha, seen, "train.loss.alpha")
        except EdgeKDError as err:
            raise EdgeKDError(f"continual.tasks[{t.index}] ({t.name}): {err}; per-class weights are not supported "
                              "in continual runs: set train.loss.alpha=null") from None


def recorded_tasks(recipe, recorded: list[dict], where: str) -> list[Task]:
    """The tasks a continual checkpoint records (its `continual.tasks`), rebuilt from its recipe and checked against
    the record: the same names and output rows."""
    if recipe.continual is None:
        raise EdgeKDError(f"{where}: a continual checkpoint whose embedded recipe has no continual section")
    tasks = build_tasks(recipe, recorded=True)[: len(recorded)]
    ours = [(t.name, [t.lo, t.hi]) for t in tasks]
    theirs = [(t["name"], list(t["outputs"])) for t in recorded]
    if ours != theirs:
        raise EdgeKDError(f"{where}: the recipe's tasks {ours} do not match the checkpoint's {theirs}")
    return tasks


def task_head(ckpt: dict, task: str | None, where: str, why: str) -> dict | None:
    """The recorded task (name, class_names, outputs [lo, hi]) whose head a model with one head per task is scored
    or explained by: `task`, or the only one; None for a model with one head (its whole output). `why`: what one
    softmax over every head would do, said when a model of several heads is given no task."""
    cont = ckpt.get("continual") or {}
    if cont.get("head") != "multi":
        if task is not None:
            raise EdgeKDError(f"--task {task}: {where} has one head (--task is for a model with one head per task)")
        return None
    tasks = cont.get("tasks") or []
    names = [t["name"] for t in tasks]
    if task is None and len(tasks) != 1:
        raise EdgeKDError(f"{where}: one head per task; give --task ({', '.join(names)}): {why}")
    chosen = tasks[0] if task is None else next((t for t in tasks if t["name"] == task), None)
    if chosen is None:
        raise EdgeKDError(f"--task {task}: not a task of {where} ({', '.join(names)})")
    return chosen


def dataset_key(data_cfg) -> tuple[str, str | None]:
    """Which dataset a data section reads: its source and its path resolved (`dir/` and `dir`, a relative and an
    absolute spelling, a symlink: one dataset)."""
    return data_cfg.source, data_path_key(data_cfg.path)


def repeated_tasks(tasks: list[Task]) -> list[str]:
    """Warnings for tasks of their own head that read an earlier task's dataset with its classes (a data.path left
    at the first task's): such a run learns and scores one task twice, and its retention means nothing (it had
    run without a word; a head shared by tasks refuses a repeated class, `check_new_classes`)."""
    said = []
    for i, task in enumerate(tasks):
        earlier = next((e for e in tasks[:i] if dataset_key(e.data.cfg) == dataset_key(task.data.cfg)
                        and e.class_names == task.class_names), None)
        if earlier is not None:
            said.append(f"warning: task '{task.name}' reads the same data ({task.data.cfg.path}) and classes as task "
                        f"'{earlier.name}': it learns that task again; give it its own data.path")
    return said


def task_warnings(tasks: list[Task], cfg) -> list[str]:
    """What a continual run (and `edgekd check`) warns of its tasks: a task learned twice (`repeated_tasks`), and a
    replay buffer (continual.replay.size) below the classes it would rehearse: a class-balanced buffer then keeps
    one image of the lowest class ids only, and the rest are never replayed (it had said nothing)."""
    said = repeated_tasks(tasks)
    rehearsed = len({c for t in tasks[:-1] for c in range(t.lo, t.hi)})  # the last task's are never replayed
    if cfg.replay and cfg.replay.size < rehearsed:
        said.append(f"warning: continual.replay.size {cfg.replay.size} is below the {rehearsed} classes of the tasks "
                    f"before the last: the buffer keeps one image of {cfg.replay.size} of them, the others are never "
                    "replayed")
    return said


def check_new_classes(tasks: list[Task], data_cfg, class_names: list[str], where: str) -> None:
    """Class-incremental tasks, and any tasks of one head, bring new classes: a class an earlier task of the same
    dataset already has would get a second output row, and the two rows would compete in the single head (a
    cross-domain run of one head had taken it without a word)."""
    for earlier in tasks:
        if dataset_key(earlier.data.cfg) != dataset_key(data_cfg):
            continue
        shared = [n for n in class_names if n in earlier.class_names]
        if shared:
            raise EdgeKDError(f"{where}: class '{shared[0]}' is task '{earlier.name}''s too (each task of one head "
                              "brings new classes, each its own output row; give each class to one task)")


def same_channel_count(tables: list[Table]) -> list[Table]:
    """In-memory tables with gray images repeated to 3 channels when another task's are RGB (retina -> chest
    X-ray): the same pixels the per-task pipeline feeds a 3-channel model, so joint batches can mix them."""
    channels = {t.images.shape[3] for t in tables}
    if channels != {1, 3}:
        return tables
    return [replace(t, images=np.repeat(t.images, 3, axis=3)) if t.images.shape[3] == 1 else t
            for t in tables]


def union_data(tasks: list[Task]) -> DataModule:
    """All tasks' tables concatenated (joint training), under the last task's data settings."""
    last = tasks[-1].data
    tables = {}
    for split in ("train", "val", "test"):
        parts = [t.data.tables[split] for t in tasks]
        if any((p.images is None) != (parts[0].images is None) for p in parts):
            raise EdgeKDError("continual.joint: cannot mix in-memory and file-backed datasets")
        if parts[0].images is not None:
            parts = same_channel_count(parts)
            if len({p.images.shape[1:] for p in parts}) > 1:
                raise EdgeKDError("continual.joint: the tasks' images differ in size; joint training needs one size")
        tables[split] = Table.concat(parts)
    return replace(last, tables=tables)


def output_range(tasks: list[Task], head: str, task: int, step: int) -> tuple[int, int]:
    """The output rows that compete when predicting task `task` after learning task `step`: its own head with a
    task id (multi), every class seen so far without one (single)."""
    if head == "multi":
        return tasks[task].lo, tasks[task].hi
    return 0, tasks[step].hi


class ContinualObjective:
    """Supervised loss of a (possibly mixed-task) batch under the head layout.

    multi: each sample's loss is over its own task's rows only (a per-task softmax, so heads do not compete);
    single: one softmax over every class seen so far.
    """

    def __init__(self, criterion: nn.Module, tasks: list[Task], step: int, head: str):
        self.criterion, self.head, self.step = criterion, head, step
        self.seen = tasks[step].hi
        self.bounds = torch.tensor([[t.lo, t.hi] for t in tasks[: step + 1]])
        self.task_of_class = torch.tensor(np.concatenate([[t.index] * t.num_classes for t in tasks[: step + 1]]))

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.head == "single":
            return self.criterion(logits[:, : self.seen], targets)
        task_ids = self.task_of_class.to(targets.device)[targets]
        total = logits.new_zeros(())
        for t in torch.unique(task_ids).tolist():
            rows = task_ids == t
            lo, hi = self.bounds[t].tolist()
            total = total + self.criterion(logits[rows, lo:hi], targets[rows] - lo) * rows.sum()
        return total / len(targets)

    def __call__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor):
        logits = model(images)
        return self.loss(logits, targets), logits

    def eval_view(self, logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Validation logits as the loss sees them: single head, the classes seen so far; multi-head, each sample's
        own task rows (the others set to -inf), so val_acc is the task-id-given accuracy the run reports."""
        if self.head == "single":
            out = np.full_like(logits, -np.inf)
            out[:, : self.seen] = logits[:, : self.seen]
            return out
        task_ids = self.task_of_class.numpy()[targets]
        bounds = self.bounds.numpy()[task_ids]
        cols = np.arange(logits.shape[1])[None, :]
        return np.where((cols >= bounds[:, :1]) & (cols < bounds[:, 1:]), logits, -np.inf)

    def eval_metrics(self, targets: np.ndarray, logits: np.ndarray) -> dict[str, float]:
        """Validation metrics of each task in `targets` on its own classes, then their mean over those tasks (the
        average the run's accuracy matrix reports): multi-head, the task's rows and their softmax; single head, the
        softmax over every class seen so far, a prediction of another task's class counting as an error. Over all
        outputs, a task's macro F1 counted the other tasks' classes as zeros and its AUC was NaN."""
        if len(targets) == 0:
            raise EdgeKDError("continual: the validation split is empty")
        task_ids = self.task_of_class.numpy()[targets]
        per_task = []
        for t in np.unique(task_ids).tolist():
            rows = task_ids == t
            lo, hi = self.bounds[t].tolist()
            if self.head == "multi":
                per_task.append(classification_metrics(targets[rows] - lo, softmax(logits[rows, lo:hi])))
            else:
                per_task.append(classification_metrics(targets[rows], softmax(logits[rows, : self.seen]),
                                                       classes=list(range(lo, hi))))
        shared = [k for k in per_task[0] if all(k in m for m in per_task)]  # ppv/npv: two-class tasks only
        return {k: float(np.mean([m[k] for m in per_task])) for k in shared}

    def parameters(self) -> list[nn.Parameter]:
        return list(self.criterion.parameters())
