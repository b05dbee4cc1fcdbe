"""`edgekd check`: build what a recipe's training would build and run it for a few optimizer steps and one evaluation.

Real data by default (a missing file is the data stage's one-line error); `synthetic=True` stands in a generated
MedMNIST-shaped set with the recipe's image size, channels and class count, and a randomly initialised teacher
(or starting student) of the recipe's architecture for a checkpoint that is not there yet, so a recipe can be
checked on a machine that has none of its data. The run itself is `run_recipe` on a shrunken copy of the recipe
(one epoch of a few batches), so it goes through exactly the code a real `edgekd train` runs.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgekd.data.sources import FASHION_CLASSES, medmnist_classes
from edgekd.errors import EdgeKDError
from edgekd.recipe import Recipe, find_recipe_file, load_recipe, recipe_from_dict
from edgekd.runtime.timing import peak_rss_mb

STEPS = 5
"""Optimizer steps a check runs by default: the first pays for allocation and warm-up and is not timed; the median
of the others is the step time (one timed step had varied 10x under another process's load)."""


@dataclass
class CheckResult:
    recipe: str
    name: str
    kind: str
    """supervised, distill or continual."""
    model: str
    params: int
    macs: int | None
    input_size: list[int]
    batch_size: int
    grad_accum: int
    """Batches per optimizer step: a step (step_seconds) trains batch_size x grad_accum images."""
    step_seconds: float
    """The median of the timed steps (all but each training's first); the training step only, evaluation not
    included. With one step only (a train split of one batch), that step, warm-up included (timed_steps 0)."""
    step_range: tuple[float, float]
    """The fastest and slowest timed step."""
    timed_steps: int
    train_images: int | None
    """The real train split's size (None for synthetic data: no epoch estimate)."""
    epoch_seconds: float | None
    seconds: float
    peak_rss_mb: float
    teacher: str | None = None
    stand_ins: list[str] = field(default_factory=list)
    """What a synthetic check generated instead of the recipe's files."""
    warnings: list[str] = field(default_factory=list)
    """What the real data loses before training, as `edgekd train` warns (a class a split lacks, skipped images)."""

    @property
    def seconds_per_1000_images(self) -> float:
        """Training seconds per 1000 train images: a step trains batch_size x grad_accum of them."""
        return self.step_seconds / (self.batch_size * self.grad_accum) * 1000


def _quiet(*_args, **_kwargs) -> None:
    """The log of the shrunken run (the check reports its own summary)."""


def check_recipe(path: str | Path, overrides: list[str] | None = None, synthetic: bool = False,
                 classes: int | None = None, log: Callable[[str], None] = _quiet,
                 warn: Callable[[str], None] = _quiet, steps: int = STEPS, folds: int | None = None,
                 teacher_overrides: list[str] | None = None) -> CheckResult:
    """Validate the recipe, build its data, model, teacher and plug-ins, train `steps` optimizer steps (at least 2:
    the first is not timed), evaluate once. `warn` gets each data warning of `edgekd train` as it arises (also in
    the result), before a failing step's error. `folds`: check what `train --folds` would run, on its real data:
    its refusals before training (`kfold_preflight`), then fold 1's run, a distill recipe's fold teacher stood in
    by an untrained model of its `distill.teacher_recipe` (with `teacher_overrides`, as --teacher-set)."""
    _check_options(steps, synthetic, folds, teacher_overrides)
    from edgekd.pipeline import run_recipe

    t0 = time.perf_counter()
    recipe = load_recipe(path, overrides)
    teacher_recipe_problem = None if synthetic or folds is not None else _teacher_recipe_problem(recipe, path)
    with tempfile.TemporaryDirectory(prefix="edgekd-check-") as tmp:
        tmp = Path(tmp)
        stand_ins: list[str] = []
        if synthetic and recipe.distill and recipe.distill.unlabeled:  # the pool's stand-in could not be refused
            from edgekd.distill import refuse_held_out_pool

            refuse_held_out_pool(recipe.distill.unlabeled, recipe.data)
        if synthetic:
            recipe = synthetic_recipe(recipe, tmp, classes, stand_ins, path, steps)
        warnings: list[str] = []

        def data_warning(line: str) -> None:
            warnings.append(line)
            warn(line)

        if folds is not None:  # (--folds trains them)
            recipe = fold_zero_recipe(recipe, folds, path, tmp, stand_ins, data_warning, teacher_overrides)

        if teacher_recipe_problem:
            data_warning(teacher_recipe_problem)

        train_images = None if synthetic else count_train_images(recipe, data_warning)
        result = run_recipe(shrunken(recipe, synthetic, steps), tmp / "run", log=log)
        start = recipe.continual.checkpoint if recipe.continual else None
        model = _arch_name(start) if start else recipe.model.name
        teacher = _arch_name(recipe.distill.teacher) if recipe.distill else None
        macs = getattr(result, "macs", None) or _final_macs(result.best_path)
    runs = _step_seconds(result)
    timed = [s for steps in runs for s in steps[1:]]  # each task's first step pays for allocation and warm-up
    used = timed or [s for steps in runs for s in steps[:1]]  # one batch only: that step, warm-up included
    step = float(np.median(used)) if used else float("nan")
    batch = recipe.data.batch_size * recipe.train.grad_accum
    return CheckResult(
        recipe=str(path), name=recipe.name,
        kind="continual" if recipe.continual else "distill" if recipe.distill else "supervised",
        model=model, params=int(result.params), macs=macs,
        input_size=[recipe.data.channels, recipe.data.image_size, recipe.data.image_size],
        batch_size=recipe.data.batch_size, grad_accum=recipe.train.grad_accum, step_seconds=step,
        train_images=train_images,
        step_range=(min(used), max(used)) if used else (step, step),
        timed_steps=len(timed),
        epoch_seconds=None if train_images is None else step * math.ceil(train_images / batch),
        seconds=time.perf_counter() - t0, peak_rss_mb=peak_rss_mb(), teacher=teacher, stand_ins=stand_ins,
        warnings=warnings)


def _check_options(steps: int, synthetic: bool, folds: int | None, teacher_overrides: list[str] | None) -> None:
    if steps < 2:
        raise EdgeKDError(f"--steps {steps}: at least 2 (the first step is warm-up, not timed)")
    if teacher_overrides and folds is None:
        raise EdgeKDError("--teacher-set overrides the fold teacher's recipe: give --folds too")
    if folds is not None and (synthetic or folds < 2):
        raise EdgeKDError(f"--folds {folds}: at least 2" if folds < 2 else "--folds checks the folds of the "
                          "recipe's own data (by patient or image): not with --synthetic")


def _teacher_recipe_problem(recipe: Recipe, path: str | Path) -> str | None:
    """A warning when distill.teacher_recipe (read only by `train --folds`) cannot be loaded."""
    if not (recipe.distill and recipe.distill.teacher_recipe):
        return None
    try:
        load_recipe(find_recipe_file(recipe.distill.teacher_recipe, "distill.teacher_recipe", path))
    except EdgeKDError as err:
        return f"warning: {err} (`train --folds` trains the teacher from it)"
    return None


def fold_zero_recipe(recipe: Recipe, folds: int, path: str | Path, tmp: Path, stand_ins: list[str],
                     say: Callable[[str], None], teacher_overrides: list[str] | None = None) -> Recipe:
    """Fold 1's recipe of `train --folds` (after its refusals), a distill recipe's fold teacher stood in by an
    untrained model of its teacher recipe on that fold (`train --folds` trains it first)."""
    from edgekd.distill import fold_recipe, fold_teacher, kfold_preflight

    split, teacher_base = kfold_preflight(recipe, folds, path, teacher_overrides, log=say)
    say(f"k-fold: checking fold 1 of {folds} ({'patient' if split == 'patient' else 'image'}-level), held out as "
        "validation")
    if teacher_base is None:
        return fold_recipe(recipe, folds, 0, split)
    teacher = fold_teacher(teacher_base, recipe, folds, 0, split).to_dict()
    teacher["model"]["pretrained"], teacher["model"]["weights"] = False, None  # its weights come from its training
    stand_in = _stand_in(teacher, tmp / "fold-teacher.pt", "distill.teacher (the fold teacher)", stand_ins)
    stand_ins[-1] += f" (train --folds trains it from {recipe.distill.teacher_recipe} on each fold)"
    return fold_recipe(recipe, folds, 0, split, teacher=str(stand_in))


def _step_seconds(result) -> list[list[float]]:
    """Each training's step times: the run's, or each continual task's."""
    if getattr(result, "fit", None) is not None:
        return [list(result.fit.step_seconds)]
    return [list(step.get("step_seconds", [])) for step in result.summary["steps"]]


def _final_macs(checkpoint: Path) -> int | None:
    """MACs of the model a run ended with (a continual run's, its head grown over every task)."""
    from edgekd.models import count_macs
    from edgekd.train.checkpoint import model_from_checkpoint

    model, ckpt = model_from_checkpoint(checkpoint)
    return count_macs(model, tuple(ckpt["preprocess"]["input_size"]))


def _arch_name(checkpoint: str) -> str:
    from edgekd.train.checkpoint import load_checkpoint

    return load_checkpoint(checkpoint)["arch"]["name"]


def count_train_images(recipe: Recipe, warn: Callable[[str], None] = _quiet) -> int:
    """Build the recipe's data as training would (every file decoded once): the train split's size; a continual
    recipe's summed over its tasks (the per-epoch estimate is then one epoch of every task; under `joint`, task i
    trains on tasks 1..i together, each counted so). `warn` gets what
    `edgekd train` would warn about the data (a class a split lacks, unreadable images skipped)."""
    from edgekd.train import warn_about_data

    listed = "a training run's metrics.json would list"
    if recipe.continual:
        from edgekd.continual import build_tasks, task_warnings

        tasks = build_tasks(recipe)
        for line in task_warnings(tasks, recipe.continual):
            warn(line)
        for t in tasks:
            warn_about_data(t.data, lambda line, task=t.name: warn(line.replace("warning:", f"warning: task {task}:")),
                            listed, own=(t.lo, t.hi))  # a task lacks the other tasks' classes by design
        sizes = [len(t.data.tables["train"]) for t in tasks]
        if recipe.continual.joint:  # task i trains on the union of tasks 1..i (3x the sum for 5 equal tasks)
            return sum(sum(sizes[:i + 1]) for i in range(len(sizes)))
        return sum(sizes)
    from edgekd.data import build_data

    data = build_data(recipe)

    def warning(line: str) -> None:  # the run's other lines (what it builds) are the check's own summary
        if line.startswith("warning:"):
            warn(line)

    if recipe.distill and recipe.distill.unlabeled:  # the whole pool, as training reads it (the check's run draws
        from edgekd.distill import build_unlabeled  # from a shrunk one): an unreadable or held-out image fails here

        build_unlabeled(recipe, data, log=warning)
    if recipe.distill and recipe.distill.teacher:  # what the run warns of before it trains, on the whole data (the
        from edgekd.distill import warn_about_distill  # shrunk run's log is the status line only)
        from edgekd.train.checkpoint import load_checkpoint

        paths = [recipe.distill.teacher, *recipe.distill.ensemble]
        if all(Path(p).is_file() for p in paths):  # a missing one fails the check's run, by name
            warn_about_distill(recipe, data, [load_checkpoint(p) for p in paths], warning)
    warn_about_data(data, warn, listed)
    return len(data.tables["train"])


def shrunken(recipe: Recipe, synthetic: bool, steps: int = STEPS) -> Recipe:
    """The same recipe for one epoch of `steps` optimizer steps (SWA from the start, no early stop)."""
    raw = recipe.to_dict()
    train = raw["train"]
    train["epochs"] = 1
    train["early_stop"]["patience"] = None
    if train["swa"]["enabled"]:
        train["swa"]["start_epoch"] = 0
    if not synthetic:  # a synthetic set is generated at this size already
        limit = steps * recipe.data.batch_size * recipe.train.grad_accum
        raw["data"]["limit"] = min(limit, raw["data"].get("limit") or limit)  # a smaller limit of the recipe's holds
        for task in (raw.get("continual") or {}).get("tasks", []):
            task["data"]["limit"] = min(limit, task["data"].get("limit") or limit)
        pool = (raw.get("distill") or {}).get("unlabeled")
        if pool:  # the pool is decoded up front: only as much of it as the check's steps draw
            pool["limit"] = min(pool.get("limit") or limit, limit)
    return recipe_from_dict(raw, where=f"{recipe.name} (shrunk for check)")


# ------------------------------------------------------------------------------------------------- synthetic
def known_classes(data: dict[str, Any]) -> int | None:
    """The class count of a data section's dataset when the recipe says it without the data at hand."""
    if data.get("classes"):
        return max(data["classes"]) + 1
    if data.get("class_names"):
        return len(data["class_names"])
    if data.get("source") == "fashion_mnist":
        return len(FASHION_CLASSES)
    if data.get("source") in ("builtin", None):
        return 2
    names = medmnist_classes(data.get("path"))
    return len(names) if names else None


def synthetic_images(n: int, size: int, channels: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable uint8 images: class c brightens a class-specific cell of a 3x3 grid over low noise; every class
    appears (labels cycle), so every per-class metric is defined."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(n, size, size, channels), dtype=np.uint8)
    cell = max(size // 3, 1)
    for i, c in enumerate(labels):
        r, col = divmod(int(c) % 9, 3)
        images[i, r * cell:(r + 1) * cell, col * cell:(col + 1) * cell] += np.uint8(120 + 10 * (int(c) // 9 % 8))
    return images, labels


def write_synthetic_npz(path: Path, data: dict[str, Any], classes: int, counts: tuple[int, int, int], seed: int) -> Path:
    """A MedMNIST-shaped .npz at the data section's raw size (its eval resize) and channels."""
    size = data.get("resize") or data.get("image_size") or 28
    channels = data.get("channels", 3)
    arrays = {}
    for k, (split, n) in enumerate(zip(("train", "val", "test"), counts)):
        images, labels = synthetic_images(n, size, channels, classes, seed + k)
        arrays[f"{split}_images"] = images[..., 0] if channels == 1 else images
        arrays[f"{split}_labels"] = labels[:, None].astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def _synthetic_data(data: dict[str, Any], tmp: Path, tag: str, classes: int | None, batch: int,
                    stand_ins: list[str], steps: int = STEPS) -> dict[str, Any]:
    """Point a data section at a generated set named after the real one (MedMNIST names give real labels)."""
    k = classes or known_classes(data) or 2
    stem = Path(data.get("path") or "builtin").stem or "data"
    known = medmnist_classes(stem)
    if known and k != len(known):
        stem = f"synthetic-{stem}"  # --classes K: a known set's name would bring its own class count
    train = max(steps * batch, 2 * k)
    held = max(min(batch, 32), 2 * k)
    path = write_synthetic_npz(tmp / tag / f"{stem}.npz", data, k, (train, held, held), seed=len(stand_ins))
    stand_ins.append(f"{tag}: {data.get('source', 'builtin')} {data.get('path') or ''} -> {k}-class synthetic "
                     f"{data.get('resize') or data.get('image_size')} px".replace("  ", " "))
    positive = data.get("positive_class")
    named = data.get("class_names") or medmnist_classes(stem) or []  # the synthetic set's: MedMNIST's by its name
    if isinstance(positive, str) and positive not in named and k == 2:  # a name only the real source's labels give
        stand_ins.append(f"{tag}: data.positive_class {positive!r} -> label id 1 (the synthetic set's names are "
                         "not the source's)")
        positive = 1
    return {**data, "source": "medmnist", "path": str(path), "split": "given", "folds": None, "fold": None,
            "limit": None, "patient_pattern": None, "dicom_patient_ids": False, "positive_class": positive}


def _teacher_classes(dist: dict[str, Any] | None) -> int | None:
    """The class count of the recipe's teacher checkpoint when it exists (a KL term needs the data to match it)."""
    path = (dist or {}).get("teacher")
    if not path or not Path(path).is_file():
        return None
    from edgekd.train.checkpoint import load_checkpoint

    return len(load_checkpoint(path).get("class_names") or []) or None


def synthetic_recipe(recipe: Recipe, tmp: Path, classes: int | None, stand_ins: list[str],
                     path: str | Path | None = None, steps: int = STEPS) -> Recipe:
    """The recipe (read from `path`) over generated data of `steps` batches, with untrained stand-ins for absent
    teacher/student checkpoints."""
    raw = recipe.to_dict()
    batch = recipe.data.batch_size * recipe.train.grad_accum
    if raw["model"]["pretrained"] and not raw["model"]["weights"]:  # a local weights file is loaded and checked
        stand_ins.append(f"model: {recipe.model.name} randomly initialised (hub weights are not downloaded)")
        raw["model"]["pretrained"] = False
    k = classes or known_classes(raw["data"]) or _teacher_classes(raw.get("distill")) or 2
    outputs = len(raw["data"]["classes"]) if raw["data"].get("classes") else k
    raw["data"] = _synthetic_data(raw["data"], tmp, "data", k, batch, stand_ins, steps)
    cont = raw.get("continual")
    if cont:
        for i, task in enumerate(cont["tasks"]):
            if not task["data"]:
                continue  # the task reads the recipe's data section, synthetic already
            merged = {**recipe.data.model_dump(), **task["data"]}
            fresh = _synthetic_data(merged, tmp, f"task{i + 1}", known_classes(merged), batch, stand_ins, steps)
            task["data"] = {**task["data"], **{key: fresh[key] for key in
                                               ("source", "path", "split", "folds", "fold", "limit")}}
        if cont.get("checkpoint") and not Path(cont["checkpoint"]).is_file():
            first = {**raw, "continual": None, "distill": None}
            first["data"] = {**raw["data"], **cont["tasks"][0]["data"]}
            if cont["tasks"][0].get("classes"):
                first["data"]["classes"] = cont["tasks"][0]["classes"]
            cont["checkpoint"] = str(_stand_in(first, tmp / "student.pt", "continual.checkpoint", stand_ins))
    dist = raw.get("distill")
    if dist and not (dist.get("teacher") and Path(dist["teacher"]).is_file()):
        if not dist.get("teacher_recipe"):
            raise EdgeKDError(f"distill.teacher {dist.get('teacher')}: checkpoint not found and no "
                              "distill.teacher_recipe to stand in a random teacher of its architecture")
        teacher = load_recipe(find_recipe_file(dist["teacher_recipe"], "distill.teacher_recipe", path)).to_dict()
        teacher["model"]["pretrained"], teacher["model"]["weights"] = False, None
        teacher["data"] = _synthetic_data({**teacher["data"], "classes": None, "class_names": None}, tmp,
                                          "teacher-data", outputs, batch, stand_ins)
        dist["teacher"] = str(_stand_in(teacher, tmp / "teacher.pt", "distill.teacher", stand_ins))
    pool = (dist or {}).get("unlabeled")
    if pool and pool.get("source", "folder") != "builtin":
        dist["unlabeled"] = {**pool, "source": "medmnist", "path": raw["data"]["path"], "split": "train"}
        stand_ins.append(f"distill.unlabeled: {pool.get('path')} -> the synthetic train split, labels unused")
    if dist and any(not Path(p).is_file() for p in dist.get("ensemble") or []):
        # absent ensemble members are stood in by the teacher checkpoint (a stand-in or the real one), each by a copy
        # of its own: the same file twice (by path or link) is refused as a member counted twice
        dist["ensemble"] = [p if Path(p).is_file() else shutil.copyfile(dist["teacher"], tmp / f"ensemble{i}.pt")
                            for i, p in enumerate(dist["ensemble"])]
        stand_ins.append("distill.ensemble: absent members stood in by the teacher checkpoint")
    return recipe_from_dict(raw, where=f"{recipe.name} (synthetic)")


def _stand_in(raw: dict[str, Any], path: Path, key: str, stand_ins: list[str]) -> Path:
    from edgekd.train.run import untrained_checkpoint

    rec = recipe_from_dict(raw, where=f"{key} stand-in")
    stand_ins.append(f"{key}: untrained {rec.model.name} at {rec.data.image_size} px")
    return untrained_checkpoint(rec, path)
