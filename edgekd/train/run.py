"""Recipe -> trained checkpoint + evaluation reports. The supervised path; distill/continual reuse its parts."""

from __future__ import annotations

import contextlib
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from torch import nn

from edgekd import __version__
from edgekd.data import (DataModule, build_checkpoint_data, build_data, check_class_order, check_trained_splits,
                         duplicate_notes, recipe_positive, split_listing)
from edgekd.errors import EdgeKDError
from edgekd.metrics import evaluation_report, write_csv_log
from edgekd.options import split_list
from edgekd.models import (check_input_size, count_macs, count_parameters, create_model, freeze, hub_weights,
                           model_spec)
from edgekd.fileio import (check_output_location, ensure_free_space, held_folder, refuse_other_metrics,
                           refuse_output_inside, sha256_file, write_json, write_text)
from edgekd.hair import describe_hair_removal
from edgekd.host import host_record, usable_cores
from edgekd.probability import softmax
from edgekd.progress import silent
from edgekd.recipe import entry_arguments
from edgekd.train.checkpoint import model_from_checkpoint, save_checkpoint
from edgekd.train import distributed
from edgekd.train.distributed import is_main_process
from edgekd.train.losses import build_loss
from edgekd.train.trainer import (FitResult, Objective, Plugin, SupervisedObjective, Trainer, predict_logits,
                                  resolve_device, seed_everything)


@dataclass
class RunResult:
    out: Path
    best_path: Path
    test: dict[str, Any]
    val: dict[str, Any]
    params: int
    macs: int
    fit: FitResult


def build_student_model(recipe, data: DataModule,
                        resuming_from: Path | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The recipe's model for this data: spec (for checkpoints), pretrained/local weights, freezing.
    `resuming_from`: a last.pt whose weights replace the starting ones, which are then not loaded (a resumed run
    had failed when its model.weights file had been moved since)."""
    spec = model_spec(recipe.model, data.num_classes, recipe.data.channels)
    start = resuming_from is None or not resuming_from.is_file()
    model = create_model(spec, pretrained=recipe.model.pretrained and start,
                         weights=recipe.model.weights if start else None)
    check_input_size(model, recipe.data.image_size, recipe.model.name, recipe.data.channels)
    freeze(model, recipe.model.freeze_stages, recipe.model.freeze_patterns)
    return model, spec


def init_weights(model_cfg) -> dict[str, Any] | None:
    """Where a model's starting weights came from, for the checkpoint and the bundle's card: a local file (path and
    sha256), the hub weights of a timm name (with the revision and sha256 of the file huggingface_hub cached), or
    None (random). Read when a run begins; a resumed run keeps what its last.pt recorded (the file may be gone or
    replaced since)."""
    if model_cfg.weights:
        path = Path(model_cfg.weights)
        return {"file": str(path.resolve()), "sha256": sha256_file(path) if path.is_file() else None}
    return hub_weights(model_cfg.name) if model_cfg.pretrained else None


def checkpoint_meta(recipe, data: DataModule, spec: dict[str, Any]) -> dict[str, Any]:
    """What every checkpoint carries besides weights: enough to rebuild, preprocess and describe the model."""
    return {
        "arch": spec, "class_names": data.class_names, "preprocess": data.preprocess,
        "recipe": recipe.to_dict(), "role": recipe.role, "dataset": data.source_name,
        "init_weights": None,  # train_model sets it: init_weights on rank 0, or what a resumed last.pt recorded
        "edgekd_version": __version__, "data_splits": data.split_fingerprint(),
    }


def untrained_checkpoint(recipe, path: str | Path) -> Path:
    """A checkpoint of the recipe's model as built, before any training (its data gives classes and
    preprocessing): what `edgekd check` stands in for a teacher or starting student that is not there yet."""
    data = build_data(recipe)
    model, spec = build_student_model(recipe, data)
    return save_checkpoint(path, {**checkpoint_meta(recipe, data, spec), "state_dict": model.state_dict(),
                                  "metrics": {}, "recipe_digest": recipe.digest()})


def loss_class_weights(data: DataModule) -> torch.Tensor:
    """The class weights for the mix the train loader draws (all 1 under the balanced sampler)."""
    return data.class_weights()


def uses_class_weights(recipe) -> bool:
    """Whether the loss or any distillation term asks for the train split's balanced class weights."""
    terms = recipe.distill.terms if getattr(recipe, "distill", None) else []
    return bool(recipe.train.loss.class_weights or any(getattr(t, "class_weights", False) for t in terms))


def earlier_train_seconds(out: Path, sessions: list[dict[str, int]]) -> float | None:
    """The train_seconds the run in `out` wrote to metrics.json when it finished, if that file is this run's
    (it lists the same training sessions as last.pt)."""
    try:
        earlier = json.loads((out / "metrics.json").read_text())
        value = earlier["train_seconds"] if earlier["sessions"] == sessions else None
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return float(value) if isinstance(value, (int, float)) else None


def refuse_before_training(recipe, data: DataModule, out: Path, resume: bool) -> None:
    """What a run is refused for before anything is written: one class, or nothing to resume."""
    if data.num_classes < 2:  # it had failed on a NaN val AUC at epoch 1, then in scikit-learn
        raise EdgeKDError(f"data: {recipe.data.path or recipe.data.source} has one class ({data.class_names[0]}); "
                          "a classifier needs at least two")
    if resume and not (out / "last.pt").is_file():
        raise EdgeKDError(f"{out / 'last.pt'}: checkpoint not found (nothing to resume)")
    lost = lost_classes(data, "val")
    sched = recipe.train.scheduler
    watched = {"train.monitor": recipe.train.monitor,
               **({"train.scheduler.monitor": sched.monitor} if sched.name == "plateau" and sched.monitor else {})}
    key, name = next(((k, v) for k, v in watched.items() if "auc" in v), (None, None))
    if lost and key and recipe.continual is None:  # it had failed after epoch 1 (NaN), the earlier outputs cleared
        raise EdgeKDError(f"{key} {name}: the val split has no image of class {', '.join(lost)} "
                          f"({lost_cause(data)}), so it is undefined (NaN) from the first epoch: monitor val_loss, "
                          "or give the val split every class")


def lost_classes(data: DataModule, split: str, own: tuple[int, int] | None = None) -> list[str]:
    """The classes a split has no image of (`own`: only those in [lo, hi) of the class list)."""
    counts = data.counts().get(split, [])
    return [name for i, (name, n) in enumerate(zip(data.class_names, counts))
            if not n and (own is None or own[0] <= i < own[1])]


def lost_cause(data: DataModule) -> str:
    """Why a split may lack a class: the unreadable images skipped first, when there were any."""
    return ("unreadable images skipped (data.on_bad_image: skip), a small data.limit or a rare class?"
            if data.bad_files else "a small data.limit or a rare class?")


def keeps_torch_threads(run: Callable) -> Callable:
    """A run entry point that sets train.threads (`apply_threads`) and gives the process its thread count back when
    it returns (a notebook had gone on with the recipe's 1 thread)."""
    @functools.wraps(run)
    def wrapped(*args, **kwargs):
        threads = torch.get_num_threads()
        try:
            return run(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    return wrapped


@keeps_torch_threads
def train_model(recipe, out: str | Path, data: DataModule, model: nn.Module, spec: dict[str, Any],
                objective: Objective | None = None, plugins: list[Plugin] | None = None,
                resume: bool = False, log: Callable[[str], None] | None = print, progress=None,
                extra_meta: dict[str, Any] | None = None) -> RunResult:
    """Fit with the one Trainer, then evaluate best.pt on val and test and write the run's reports."""
    log = log or silent  # log=None: say nothing
    out = Path(out)
    refuse_before_training(recipe, data, out, resume)
    # best.pt + last.pt (weights, optimizer moments) and their temp copies while being replaced.
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    ensure_free_space(out, 8 * weight_bytes + 64 * 2**20, "checkpoints")
    out.mkdir(parents=True, exist_ok=True)  # every rank's; rank 0 holds it
    with held_folder(out, "training") if is_main_process() else contextlib.nullcontext():
        return _fit_and_report(recipe, out, data, model, spec, objective, plugins, resume, log, progress, extra_meta)


def apply_threads(recipe, log: Callable[[str], None]) -> None:
    """train.threads: PyTorch's CPU threads for this process (a supervised, distillation or continual run), with a
    warning when torchrun's processes together oversubscribe the cores; the entry points give the count back
    (`keeps_torch_threads`)."""
    if not recipe.train.threads:
        return
    torch.set_num_threads(recipe.train.threads)
    cores = usable_cores()
    ranks = distributed.world_size()
    if ranks > 1 and recipe.train.threads * ranks > cores:
        log(f"warning: train.threads {recipe.train.threads} is per process: {ranks} processes x "
            f"{recipe.train.threads} threads on {cores} cores oversubscribe them (slower, not faster)")
    elif ranks == 1 and recipe.train.threads > cores:  # (the run keeps them: its figures record the count)
        log(f"warning: train.threads {recipe.train.threads} is more than the {cores} cores this process may use: "
            "they oversubscribe them (slower, not faster)")


def data_summary(data: DataModule, recipe) -> str:
    """The run's data in one line: source, images per split, classes, input size, hair removal (a skin run had not
    said whether it removed hair)."""
    counts = " / ".join(f"{len(data.tables[s])} {s}" for s in ("train", "val", "test") if s in data.tables)
    hair = describe_hair_removal(data.preprocess)
    by = ("image (no patient ids)" if data.tables["train"].groups is None else
          "image (data.split stratified)" if recipe.data.split == "stratified" else "patient")
    carved = f"; {' and '.join(data.carved)} drawn by {by}" if data.carved else ""
    return (f"data: {data.source_name}, {counts} images, {data.num_classes} classes, {recipe.data.image_size} px"
            + carved + (f"; {hair}" if hair else ""))


def _fit_and_report(recipe, out: Path, data: DataModule, model: nn.Module, spec: dict[str, Any],
                    objective: Objective | None, plugins: list[Plugin] | None, resume: bool,
                    log: Callable[[str], None], progress, extra_meta: dict[str, Any] | None) -> RunResult:
    """train_model's work, in its folder: the Trainer's fit, best.pt evaluated on val and test, the reports."""
    apply_threads(recipe, log)
    if uses_class_weights(recipe) and data.samples_balanced():
        log("class_weights: data.balanced_sampler already evens the classes the loss sees; weights set to 1 "
            "(not applied twice)")
    warn_about_data(data, log)
    criterion = build_loss(recipe.train.loss, loss_class_weights(data))
    objective = objective or SupervisedObjective(criterion)
    meta = {**checkpoint_meta(recipe, data, spec), **(extra_meta or {})}
    trainer = Trainer(recipe, model, data, objective, out, plugins=plugins, log=log,
                      checkpoint_extra=lambda: meta)
    started = init_weights(recipe.model) if is_main_process() and not resume else None  # before a clear removes
    resumed = resume_or_clear(trainer, out, resume)  # another recipe is refused here, before recipe.yaml is rewritten
    log(data_summary(data, recipe))  # (after the refusal: that is the one line)
    meta["init_weights"] = resumed.get("init_weights") if resumed is not None else started
    if is_main_process():
        write_text(out / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    earlier = earlier_train_seconds(out, trainer.sessions) if resume else None  # last.pt's stops at its checkpoint
    fit = trainer.fit(progress=progress)  # train_seconds: a resumed run's earlier sessions included
    train_seconds = trainer.train_seconds() if trainer.trained_this_session or earlier is None else earlier
    if trainer.is_main:
        write_csv_log(out / "log.csv", fit.history)
        if fit.history:
            from edgekd.metrics.plots import plot_curves
            plot_curves(fit.history, out / "curves.png", recipe.name)
    best, reports = evaluate_best(fit.best_path, data, trainer.device, out, recipe.name, trainer.is_main, log)
    params = count_parameters(best)
    macs = count_macs(best.cpu(), tuple(data.preprocess["input_size"]))
    summary = {
        "name": recipe.name, "role": recipe.role, "dataset": data.source_name, "model": spec["name"],
        "params": params, "macs": macs, "best_epoch": fit.best_epoch, "monitor": recipe.train.monitor,
        # best.pt is SWA's averaged weights (scored after the last epoch, not that epoch's log.csv row) or an epoch's
        "best_source": "swa" if (fit.extra.get("swa") or {}).get("used") else "epoch",
        "best_value": fit.best_value, "epochs_run": len(fit.history), "stopped_early": fit.stopped_early,
        "nonfinite_batches": fit.nonfinite_batches, "train_seconds": train_seconds,
        "seconds_per_epoch": (sum(h["epoch_seconds"] for h in fit.history) / len(fit.history)) if fit.history else None,
        "seed": recipe.seed, "threads": torch.get_num_threads(), "processes": distributed.world_size(),
        "machine": host_record(),  # seconds per epoch, and a seeded run's figures, hold on this kind of machine
        "sessions": trainer.sessions,  # more than one: resumed; threads and processes above are the last session's
        "counts": data.counts(), "bad_files": data.bad_files, **fit.extra,
        "unlabeled_pool": ((extra_meta or {}).get("distill") or {}).get("unlabeled_pool"),  # KD's unlabeled images
        "val": reports["val"], "test": reports["test"],
    }
    if trainer.is_main:  # splits.json: which files (and patients) each split held, for an audit
        write_json(out / "metrics.json", summary)
        write_json(out / "splits.json", split_listing(data.tables, data.class_names))
    return RunResult(out, fit.best_path, reports["test"], reports["val"], params, macs, fit)


RUN_OUTPUTS = ("best.pt", "last.pt", "swa.pt", "metrics.json", "splits.json", "log.csv", "curves.png",
               "confusion_val.png", "confusion_test.png", "roc_val.png", "roc_test.png")
KFOLD_OUTPUTS = ("kfold.json", "kfold.md")
CONTINUAL_OUTPUTS = ("model.pt", "continual.json", "task_accuracy.png", "confusion_all_tasks.png")
"""What a run, a k-fold run and a continual run write at the top of their folder (a continual run also
confusion_task<j>.png). A new run into the folder of an earlier one, of any kind, removes these."""
RUN_MARKERS = ("best.pt", "last.pt", "metrics.json", "kfold.json", "model.pt", "continual.json")
"""The files that say a folder holds a finished or started run (of any kind): `edgekd train` warns of them."""


def resume_or_clear(trainer: Trainer, out: Path, resume: bool) -> dict[str, Any] | None:
    """--resume: last.pt's state (a checkpoint write the crash cut short removed), and last.pt itself is returned;
    a new run: an earlier run's results in `out` go now (a stop during this run had left a mix of the two)."""
    if resume:
        for stale in out.glob(".*.pt.*.tmp") if is_main_process() else ():  # one named before owner() (newer ones
            stale.unlink(missing_ok=True)  # are swept by atomic_write); rank 0's, which holds the folder's lock
        return trainer.resume(out / "last.pt")
    if is_main_process():
        remove_earlier_outputs(out, trainer.log)
    return None


def remove_earlier_outputs(out: Path, log: Callable[[str], None] | None = None) -> list[str]:
    """When `out` holds an earlier run's results, of any kind (a run's, a k-fold summary, a continual run's), they
    go (by name: a report's plots beside them stay, and so do fold and task folders): a k-fold summary had stayed
    beside a new single run as if it described it. The caller holds the folder (its lock). `log`: told so, now
    that the run's inputs have all been checked (a run refused for its teacher had first said it replaced them).
    Returns the run markers found (none: nothing was there)."""
    found = [name for name in RUN_MARKERS if (out / name).is_file()]
    if not found:
        return found
    if log is not None:
        log(f"warning: {out} already holds a run ({', '.join(found)}): its files are replaced by this one; "
            "anything else there (a bundle, eval folders, task folders of other tasks) stays from the earlier run")
    for path in [*(out / name for name in (*RUN_OUTPUTS, *KFOLD_OUTPUTS, *CONTINUAL_OUTPUTS)),
                 *out.glob("confusion_task[0-9]*.png")]:
        if path.is_file():
            path.unlink(missing_ok=True)  # every torchrun rank may run this
    return found


def warn_about_data(data: DataModule, log: Callable[[str], None], listed: str = "metrics.json lists",
                    own: tuple[int, int] | None = None) -> None:
    """What a run's data lost before training: unreadable images skipped (on_bad_image: skip), and a class a split
    lacks (a small data.limit, a rare class): never learned, or its AUC there undefined. `listed` says where the
    skipped files are listed (`edgekd check` writes no metrics.json); `own`: a continual task's [lo, hi) of the
    class list, the classes it is meant to hold (the others are other tasks')."""
    duplicates = duplicate_notes(data.tables) if is_main_process() and hasattr(data, "tables") else []
    for note in [*getattr(data, "notes", []), *duplicates]:
        log(f"warning: {note}")
    if data.bad_files:
        log(f"warning: skipped {len(data.bad_files)} unreadable image(s) (data.on_bad_image: skip), e.g. "
            f"{data.bad_files[0]}; {listed} them with their reasons (bad_files)")
    for split in ("train", "val", "test"):
        lost = lost_classes(data, split, own)
        if lost:
            log(f"warning: the {split} split has no image of class {', '.join(lost)} ({lost_cause(data)}): "
                + ("the model never learns it" if split == "train" else
                   "its AUC and per-class figures there are undefined"))


def evaluate_best(best_path: Path, data: DataModule, device, out: Path, name: str, plots: bool,
                  log: Callable[[str], None]) -> tuple[nn.Module, dict[str, Any]]:
    """The best checkpoint's val and test reports (plots on the main process); warns when a split's accuracy is no
    better than its largest class's share."""
    best, _ = model_from_checkpoint(best_path)
    best.to(device)
    reports = {}
    for split in ("val", "test"):
        y, logits = predict_logits(best, data.loader(split, train=False), device)
        reports[split] = evaluation_report(y, softmax(logits), data.class_names, out, split, name, plots=plots,
                                           positive=data.positive)
        if plots and reports[split].get("warning"):
            log(f"warning: {best_path}: {reports[split]['warning']}")
    return best, reports


def train_recipe(recipe, out: str | Path, resume: bool = False, log: Callable[[str], None] | None = print,
                 progress=None) -> RunResult:
    """The supervised path: teacher, baseline, or a student trained from scratch."""
    log = log or silent  # log=None: say nothing
    recipe, out = entry_arguments(recipe, out)
    if recipe.distill or recipe.continual:
        raise EdgeKDError("this recipe has a distill/continual section: run it with `edgekd train` (in Python: "
                          "edgekd.pipeline.run_recipe)")
    seed_everything(recipe.seed, recipe.train.deterministic)
    data = build_data(recipe)
    model, spec = build_student_model(recipe, data, Path(out) / "last.pt" if resume else None)
    return train_model(recipe, out, data, model, spec, resume=resume, log=log, progress=progress)


def evaluate_checkpoint(checkpoint: str | Path, out: str | Path, data_recipe=None,
                        splits: tuple[str, ...] | str = ("test",), device: str = "auto", progress=None,
                        log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Evaluate a checkpoint on its own recipe's data (or `data_recipe`'s: a Recipe, a recipe file or a dict), write
    metrics.json and plots; the data's classes must be the model's, in its order (`check_class_order`). `splits`:
    names, or one name or "val,test" as text. Returns metrics.json's dict."""
    log = log or silent  # log=None: say nothing
    check_output_location(out, "out")  # what `edgekd eval` refuses, refused here too (the API had written into a
    refuse_output_inside(out, [checkpoint], "out")  # bundle, breaking its manifest, or over a run's metrics.json)
    refuse_other_metrics(out, checkpoint, option="out")
    model, ckpt = model_from_checkpoint(checkpoint)
    from edgekd.recipe import as_recipe, recipe_from_dict

    if isinstance(splits, str):  # "val" had been read as the splits v, a, l
        splits = tuple(split_list(splits, "splits") or ())
    recipe = (as_recipe(data_recipe, "data_recipe") if data_recipe is not None  # a file had been an AttributeError
              else recipe_from_dict(ckpt["recipe"], where=f"{checkpoint} (embedded recipe)"))
    takes = (ckpt.get("preprocess") or {}).get("input_size", [recipe.data.channels])[0]
    if recipe.data.channels != takes:  # a raw conv error had said so ("expected input[50, 1, 28, 28] to have 3...")
        raise EdgeKDError(f"{checkpoint}: the model takes {takes}-channel images, the data recipe gives "
                          f"data.channels {recipe.data.channels} (set data.channels: {takes}, with {takes} mean/std "
                          "values)")
    data = build_checkpoint_data(recipe)
    check_class_order(list(ckpt["class_names"]), list(data.class_names), str(checkpoint), log)  # counts too
    check_trained_splits(ckpt, data, recipe, str(checkpoint), tuple(splits))  # the splits scored, as at training
    # the positive class the --data recipe names, else the model's own (a recipe of other data naming none)
    positive = (data.positive if recipe.data.positive_class is not None
                else recipe_positive(ckpt.get("recipe"), list(ckpt["class_names"])))
    dev = resolve_device(device)
    model.to(dev)
    out = Path(out)
    arch = ckpt["arch"]["name"]  # the plots' titles name the run too: a scratch and a distilled student read alike
    title = f"{ckpt['recipe']['name']} ({arch})" if (ckpt.get("recipe") or {}).get("name") else arch
    trained_at = (ckpt.get("recipe") or {}).get("data", {}).get("image_size")
    if trained_at is not None and trained_at != recipe.data.image_size:  # `--set data.image_size=...`: said and kept
        log(f"note: scoring at {recipe.data.image_size} px; {checkpoint} was trained at {trained_at} px")
    result = {"checkpoint": str(checkpoint), "model": ckpt["arch"]["name"], "role": ckpt.get("role"),
              "dataset": data.source_name, "image_size": recipe.data.image_size, "params": count_parameters(model)}
    for split in splits:
        y, logits = predict_logits(model, data.loader(split, train=False), dev, progress=progress,
                                   description=f"eval {split}")
        result[split] = evaluation_report(y, softmax(logits), data.class_names, out, split, title, positive=positive)
    write_json(out / "metrics.json", result)
    return result
