"""Run a continual recipe: learn its tasks one after the other from a (distilled) student with the recipe's
plug-ins, evaluate every learned task after each step, write the accuracy matrix, CL metrics, plots, checkpoint."""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml
from sklearn import metrics as skm
from torch import nn

from edgekd import __version__
from edgekd.continual.base import TaskStep
from edgekd.continual.heads import num_outputs, resize_classifier
from edgekd.continual.metrics import average_accuracy, backward_transfer, forgetting, forgetting_per_task, retention
from edgekd.continual.plugins import build_plugins
from edgekd.continual.scenarios import (ContinualObjective, Task, build_tasks, output_range, recorded_tasks,
                                       task_warnings, union_data)
from edgekd.data import check_model_splits
from edgekd.errors import EdgeKDError
from edgekd.fileio import deferred_signals, sha256_file, write_json, write_text
from edgekd.hair import hair_element
from edgekd.host import host_record
from edgekd.metrics import one_class_warning
from edgekd.metrics.report import write_csv_log
from edgekd.models import count_parameters, create_model, freeze, model_spec
from edgekd.progress import progress_task, silent
from edgekd.recipe import entry_arguments
from edgekd.train.checkpoint import load_resumable, load_state, model_from_checkpoint, save_checkpoint
from edgekd.train.losses import build_loss
from edgekd.train import (apply_threads, init_weights, is_main_process, keeps_torch_threads,
                          remove_earlier_outputs, warn_about_data)
from edgekd.train.trainer import (Trainer, predict_logits, resolve_device, restore_rng_state, rng_state,
                                  seed_everything)


@dataclass
class ContinualResult:
    """What a continual run returns (and the CLI prints): the accuracy matrix and its CL metrics."""

    out: Path
    best_path: Path
    params: int
    task_names: list[str]
    acc_matrix: list[list[float]]
    summary: dict[str, Any]
    val: dict[str, Any] = field(default_factory=dict)
    test: dict[str, Any] = field(default_factory=dict)


def finished_run(out: str | Path, recipe) -> ContinualResult | None:
    """The result of a continual run of `recipe` that finished in `out` (its model.pt and continual.json), read back
    without touching them; None when it did not finish there. Another recipe's finished run is refused."""
    out = Path(out)
    if not ((out / "model.pt").is_file() and (out / "continual.json").is_file()):
        return None
    load_resumable(out / "model.pt", recipe)
    summary = json.loads((out / "continual.json").read_text())
    acc = [[float("nan") if v is None else v for v in row] for row in summary["acc_matrix"]]  # JSON's null: NaN
    return ContinualResult(out, out / "model.pt", summary["params"], summary["tasks"], acc, summary)


def method_name(cfg) -> str:
    """A short label of the strategy combination, e.g. 'ewc', 'replay+lwf', 'finetune', 'joint'."""
    if cfg.joint:
        return "joint"
    parts = [name for name, on in (("replay", cfg.replay), ("online_ewc" if cfg.ewc and cfg.ewc.online else "ewc",
                                                                cfg.ewc), ("lwf", cfg.lwf)) if on]
    return "+".join(parts) or "finetune"


def starting_model(recipe, tasks: list[Task], log: Callable[[str], None] = print
                   ) -> tuple[nn.Module, dict[str, Any], bool]:
    """(model with a head for the first task, its spec, whether the first task is already learned). A checkpoint
    trained on a task's own image files must not have trained on that task's test images (`check_model_splits`)."""
    cfg = recipe.continual
    first = tasks[0]
    if cfg.checkpoint is None:
        spec = model_spec(recipe.model, first.num_classes, recipe.data.channels)
        model = create_model(spec, pretrained=recipe.model.pretrained, weights=recipe.model.weights)
        freeze(model, recipe.model.freeze_stages, recipe.model.freeze_patterns)
        return model, spec, False
    if not Path(cfg.checkpoint).is_file():  # named by its key: "checkpoint not found" had not said which setting
        raise EdgeKDError(f"continual.checkpoint {cfg.checkpoint}: checkpoint not found (train the starting student "
                          "first, or --set continual.checkpoint=PATH)")
    model, ckpt = model_from_checkpoint(cfg.checkpoint)
    rebuilt: dict = {}  # its splits, rebuilt once for every task
    for task in tasks:  # (its task 0 drawn with another seed or fraction had been scored on images it trained on)
        check_model_splits(f"continual.checkpoint {cfg.checkpoint}", ckpt, task.data, log, f"task '{task.name}''s",
                           "the accuracy matrix on them (continual.eval_split: val) is on images it has seen"
                           if cfg.eval_split == "val" else "its best epochs are chosen on images it has seen", rebuilt)
    spec = dict(ckpt["arch"])
    theirs, ours = ckpt["preprocess"], first.data.preprocess
    if "resize" not in theirs:  # a checkpoint from before preprocess.resize resized to its input size
        theirs = {**theirs, "resize": theirs["input_size"][-1]}
    for key in ("input_size", "channels", "mean", "std", "resize"):  # resize: the eval and export pipelines' too
        if theirs.get(key) != ours[key]:
            raise EdgeKDError(f"continual.checkpoint {cfg.checkpoint}: preprocess {key}={theirs.get(key)} but the "
                              f"recipe's data gives {ours[key]}; set the data section to match the student")
    hair = [hair_element(pre) if pre.get("hair_removal") else "none" for pre in (theirs, ours)]
    if hair[0] != hair[1]:  # its own task would be scored and trained on other pixels than it learned from
        raise EdgeKDError(f"continual.checkpoint {cfg.checkpoint}: hair removal with {hair[0]} in its training, with "
                          f"{hair[1]} in the recipe's data; set data.hair_removal / data.hair_kernel to match the "
                          "student (17 for a student from before data.hair_kernel)")
    if cfg.checkpoint_task:
        learned = [str(n).split(":", 1)[-1] if ckpt.get("continual") else str(n)  # a continual one's "task:class"
                   for n in ckpt["class_names"]]
        if num_outputs(model) != first.num_classes:
            grown = ckpt.get("continual") or {}  # an earlier continual run's one head: all its tasks' classes
            whose = (f"; it is one head over the tasks {', '.join(str(t.get('name')) for t in grown.get('tasks', []))}"
                     f", so the first task must hold all its classes in order ({', '.join(learned)})"
                     if grown.get("head") == "single" else "")
            raise EdgeKDError(f"continual.checkpoint {cfg.checkpoint}: {num_outputs(model)} outputs, but the first task "
                              f"'{first.name}' has {first.num_classes} classes (the first task must be the "
                              f"checkpoint's{whose}; with edgekd train, checkpoint_task: false retrains its head "
                              "instead)")
        if [n.lower() for n in learned] != [str(n).lower() for n in first.class_names]:
            raise EdgeKDError(f"continual.checkpoint {cfg.checkpoint}: learned the classes {learned}, but the first task "
                              f"'{first.name}' has {list(first.class_names)}: its outputs would be trained as other "
                              "classes (select the checkpoint's classes; with edgekd train, checkpoint_task: false "
                              "retrains the head instead)")
        freeze_as_recipe_says(model, recipe)
        return model, spec, True
    resize_classifier(model, first.num_classes, keep=0)
    freeze_as_recipe_says(model, recipe)
    return model, spec, False


def freeze_as_recipe_says(model: nn.Module, recipe) -> None:
    """The recipe's model.freeze_stages / freeze_patterns on a continual.checkpoint's model too (they had been
    ignored there: every shipped continual recipe starts from a checkpoint, as `edgekd update` does)."""
    if recipe.model.freeze_stages or recipe.model.freeze_patterns:
        freeze(model, recipe.model.freeze_stages, recipe.model.freeze_patterns)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "task"


def task_folder(out: Path, i: int, task: Task) -> Path:
    """Where the run keeps task i's checkpoints and log: <out>/task<i+1>_<name>."""
    return out / f"task{i + 1}_{_slug(task.name)}"


@torch.no_grad()
def evaluate_task(model: nn.Module, tasks: list[Task], head: str, task: int, step: int, split: str,
                  device: torch.device) -> dict[str, Any]:
    """Accuracy, macro F1 over the task's classes and the confusion matrix (rows: the task's classes; columns:
    the classes that compete under the head layout) of task `task` after learning task `step`."""
    t = tasks[task]
    y, logits = predict_logits(model, t.data.loader(split, train=False), device)
    lo, hi = output_range(tasks, head, task, step)
    pred = logits[:, lo:hi].argmax(1) + lo
    own = list(range(t.lo, t.hi))
    cm = skm.confusion_matrix(y, pred, labels=list(range(lo, hi)))[t.lo - lo: t.hi - lo]
    return {"task": t.name, "n": int(len(y)), "acc": float(np.mean(pred == y)),
            "f1": float(skm.f1_score(y, pred, labels=own, average="macro", zero_division=np.nan)),  # as elsewhere
            "confusion_matrix": cm.tolist(), "rows": t.class_names,
            "columns": tasks[step].data.class_names[lo:hi]}


def evaluate_continual_checkpoint(checkpoint: str | Path, out: str | Path, splits: tuple[str, ...] = ("test",),
                                  device: str = "auto", recipe=None) -> dict[str, Any]:
    """A continual checkpoint on its own tasks, rebuilt from its embedded recipe and scored as the run scored them
    (multi-head: each task on its own head; single head: every learned class competes): per task ACC and macro F1,
    and their mean; writes metrics.json. The top-level data section is not the tasks' data, nor are its classes
    the model's outputs. `recipe`: its embedded recipe with overrides (e.g. the tasks' data moved elsewhere)."""
    from edgekd.recipe import recipe_from_dict

    model, ckpt = model_from_checkpoint(checkpoint)
    layout = ckpt["continual"]
    recipe = recipe or recipe_from_dict(ckpt["recipe"], where=f"{checkpoint} (embedded recipe)")
    if recipe.continual is None:
        raise EdgeKDError(f"{checkpoint}: a continual checkpoint is evaluated on its tasks: the data recipe needs the "
                          "continual section (give --set overrides of its own recipe instead)")
    tasks = recorded_tasks(recipe, layout["tasks"], str(checkpoint))
    dev = resolve_device(device)
    model.to(dev)
    result: dict[str, Any] = {"checkpoint": str(checkpoint), "model": ckpt["arch"]["name"], "role": ckpt.get("role"),
                              "head": layout["head"], "tasks": [t.name for t in tasks]}
    warnings = []
    for split in splits:
        scores = [evaluate_task(model, tasks, layout["head"], j, len(tasks) - 1, split, dev) for j in range(len(tasks))]
        result[split] = {"acc": float(np.mean([r["acc"] for r in scores])),
                         "f1": float(np.mean([r["f1"] for r in scores])),
                         "per_task": {r["task"]: {k: r[k] for k in ("n", "acc", "f1", "confusion_matrix")}
                                      for r in scores}}
        warnings += task_one_class_warnings(scores, split)
    if warnings:
        result["warnings"] = warnings
    write_json(Path(out) / "metrics.json", result)
    return result


def task_one_class_warnings(scores: list[dict[str, Any]], split: str) -> list[str]:
    """`one_class_warning` per task of `evaluate_task` records: a task whose ACC is no better than calling each of
    its images the task's largest class (the export gate said so; train and eval had not)."""
    earlier = "a task forgotten while the later ones were learned (see the accuracy matrix), or one never learned"
    last = "the last task, not learned (more epochs, or another learning rate)"  # nothing came after it to forget it
    found = [one_class_warning(f"{split} (task {r['task']})", r["acc"],
                               np.asarray(r["confusion_matrix"]).sum(axis=1).tolist(),
                               last if i == len(scores) - 1 and len(scores) > 1 else earlier)
             for i, r in enumerate(scores)]
    return [w for w in found if w]


def plot_task_accuracy(acc: np.ndarray, names: list[str], path: Path, title: str) -> Path:
    """Accuracy of each task (one line from the step it is learned) over the task sequence, and the average."""
    from edgekd.metrics.plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(names), 4))
    steps = np.arange(len(names))
    for j, name in enumerate(names):
        ax.plot(steps[j:], acc[j:, j], marker="o", label=name)
    ax.plot(steps, [average_accuracy(acc, i) for i in steps], "k--", marker=".", label="average")
    ax.set_xticks(steps, [f"after {n}" for n in names], rotation=20)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def starting_weights(recipe) -> dict[str, Any] | None:
    """Where a continual run's model started, for its checkpoints and a bundle's card: its continual.checkpoint (path
    and sha256 when the run began), else the recipe's model weights as `edgekd train` records them."""
    if recipe.continual.checkpoint is None:
        return init_weights(recipe.model)
    path = Path(recipe.continual.checkpoint)
    return {"file": str(path.resolve()), "sha256": sha256_file(path)}


def _meta(recipe, tasks: list[Task], step: int, spec: dict[str, Any], head: str,
          init: dict[str, Any] | None) -> dict[str, Any]:
    seen = tasks[: step + 1]
    return {
        "arch": {**spec, "num_classes": seen[-1].hi}, "class_names": seen[-1].data.class_names,
        "preprocess": tasks[0].data.preprocess, "recipe": recipe.to_dict(), "role": recipe.role,
        "init_weights": init,
        "dataset": "+".join(dict.fromkeys(t.data.source_name for t in seen)), "edgekd_version": __version__,
        "continual": {"scenario": recipe.continual.scenario, "head": head, "step": step,
                      "tasks": [{"name": t.name, "outputs": [t.lo, t.hi], "class_names": t.class_names} for t in seen]},
    }


def _cpu_state(model: nn.Module) -> dict[str, Any]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _train_task(recipe, model: nn.Module, tasks: list[Task], i: int, step: TaskStep, plugins: list, criterion,
                task_dir: Path, meta: dict[str, Any], resume: bool, progress, log: Callable[[str], None]) -> dict:
    """Train the model on task i (resuming its last.pt if asked); save task.pt; the step's training record."""
    cfg, task, n = recipe.continual, tasks[i], len(tasks)
    data = union_data(tasks[: i + 1]) if cfg.joint else task.data
    for p in plugins:
        data = p.train_data(data, step)
    log(f"task {i + 1}/{n} '{task.name}': {len(task.data.tables['train'])} train images"
        + (f" (joint: {len(data.tables['train'])})" if cfg.joint else "")
        + (f", {method_name(cfg)}" + (" + BN freeze" if cfg.bn_freeze else "") if i > 0 else ""))  # (from task 2)
    trainer = Trainer(recipe, model, data, ContinualObjective(criterion, tasks, i, cfg.head), task_dir,
                      plugins=list(plugins), log=log, checkpoint_extra=lambda meta=meta: meta)
    trainer.track_part = task_dir.name  # its own TensorBoard folder and W&B run under an explicit tracking path
    if resume and (task_dir / "last.pt").is_file():
        trainer.resume(task_dir / "last.pt")
    fit = trainer.fit(progress=progress)
    main = is_main_process()  # under torchrun only rank 0 writes (each rank's random state differs: task.pt
    if main:  # holds rank 0's, as the trainer's last.pt does)
        write_csv_log(task_dir / "log.csv", fit.history)
    # The sequence goes on from the last epoch's weights: old-task data is not there to pick a "best".
    # The random states go with it: a resumed run goes on from here as the uninterrupted one did (the next task's
    # new head rows are drawn from them).
    training = {"epochs": len(fit.history), "seconds": float(sum(h["epoch_seconds"] for h in fit.history)),
                "step_seconds": fit.step_seconds}
    if main:
        save_checkpoint(task_dir / "task.pt", {"state_dict": _cpu_state(model), "rng": rng_state(),
                                              "training": training, "metrics": {}, "recipe_digest": recipe.digest(),
                                              **meta})
    return training


def _summary(recipe, tasks: list[Task], spec: dict[str, Any], model: nn.Module, acc: np.ndarray, f1: np.ndarray,
             steps: list[dict[str, Any]]) -> dict[str, Any]:
    """continual.json."""
    cfg = recipe.continual
    return {
        "name": recipe.name, "scenario": cfg.scenario, "head": cfg.head, "method": method_name(cfg),
        "bn_freeze": cfg.bn_freeze, "checkpoint": cfg.checkpoint, "eval_split": cfg.eval_split,
        "tasks": [t.name for t in tasks],
        "task_classes": [t.class_names for t in tasks], "model": spec["name"], "params": count_parameters(model),
        "acc_matrix": acc, "f1_matrix": f1, "avg_acc": average_accuracy(acc), "forgetting": forgetting(acc),
        "forgetting_per_task": forgetting_per_task(acc), "bwt": backward_transfer(acc),
        "retention_first_task": retention(acc, 0), "final": steps[-1]["eval"], "steps": steps,
        "seed": recipe.seed, "threads": torch.get_num_threads(), "machine": host_record(),
        "bad_files": {t.name: t.data.bad_files for t in tasks if t.data.bad_files},  # data.on_bad_image: skip
    }


def _write_plots(recipe, out: Path, acc: np.ndarray, names: list[str], final: list[dict[str, Any]]) -> None:
    """The task-accuracy chart and the confusion matrices after the last task (per task, or all classes)."""
    cfg, head = recipe.continual, recipe.continual.head
    plot_task_accuracy(acc, names, out / "task_accuracy.png", f"{recipe.name} ({method_name(cfg)}, {head} head)")
    from edgekd.metrics.plots import plot_confusion
    for j, r in enumerate(final):
        if head == "multi":
            plot_confusion(np.asarray(r["confusion_matrix"]), r["rows"], out / f"confusion_task{j + 1}.png",
                           f"{names[j]} after {names[-1]}")
    if head == "single":
        cm = np.concatenate([np.asarray(r["confusion_matrix"]) for r in final])
        plot_confusion(cm, final[-1]["columns"], out / "confusion_all_tasks.png", f"all classes after {names[-1]}")


def _evaluate_step(model: nn.Module, tasks: list[Task], head: str, i: int, split: str, device,
                   log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every task learned so far after task i, logged; after the last, a warning per task that calls its images
    one class."""
    scores = [evaluate_task(model, tasks, head, j, i, split, device) for j in range(i + 1)]
    log(f"after task {i + 1} '{tasks[i].name}': " + ", ".join(f"{r['task']} acc={r['acc']:.4f}" for r in scores))
    for warning in task_one_class_warnings(scores, split) if i == len(tasks) - 1 else ():
        log(f"warning: {warning}")
    return scores


@contextlib.contextmanager
def random_stream_kept():
    """The random states as they were before the block: a plug-in's draws (EWC's Fisher loader takes a torch seed)
    had moved the stream the next task's new head rows and batches come from, so an EWC run at weight 0 started
    task 2 from another head than fine-tuning at the same seed."""
    state = rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)


def call_plugins(plugins: list, hook: str, step: TaskStep) -> None:
    """Each plug-in's `hook` (before_task, after_task), its own random draws leaving the run's (random_stream_kept)."""
    with random_stream_kept():
        for plugin in plugins:
            getattr(plugin, hook)(step)


def remove_earlier_run(out: Path, tasks: list[Task], log: Callable[[str], None]) -> None:
    """A new (not resumed) run into the folder of an earlier one: that run's results and its task checkpoints of
    these tasks go now. They had stayed until the new run's end, so a stop half-way left the old model.pt beside the
    new tasks (`edgekd export out/model.pt` shipped it) and the printed resume command was refused on it."""
    said = remove_earlier_outputs(out, log)  # the top-level results of an earlier run of any kind, said if any
    stale = [path for i, t in enumerate(tasks) for name in ("task.pt", "last.pt", "best.pt", "swa.pt", "log.csv")
             if (path := task_folder(out, i, t) / name).is_file()]
    if stale and not said and is_main_process():  # an interrupted run's resumable tasks had gone without a word
        folders = ", ".join(sorted({p.parent.name for p in stale}))
        log(f"warning: {out} holds an earlier run's task checkpoints ({folders}): they are removed (a new run; "
            "--resume goes on from them instead)")
    for path in stale:
        path.unlink(missing_ok=True)  # every torchrun rank runs this
    for i, t in enumerate(tasks):  # a task folder left empty goes too (the task makes it again when it trains)
        with contextlib.suppress(OSError):
            task_folder(out, i, t).rmdir()


def resume_task(model: nn.Module, path: Path, recipe) -> dict[str, Any]:
    """Load a task finished by an earlier run of this very recipe (its weights and the random states after it);
    returns that task's training record (epochs, seconds, step_seconds; empty from task.pt files before
    2026-12-06), which continual.json keeps."""
    ckpt = load_resumable(path, recipe)
    load_state(model, ckpt["state_dict"], str(path))
    if "rng" in ckpt:
        restore_rng_state(ckpt["rng"])
    return dict(ckpt.get("training") or {})


def check_resumable(out: Path, tasks: list[Task], recipe) -> dict[str, Any]:
    """Before a resume writes anything (its recipe.yaml had replaced a finished run's before the refusal): a task
    checkpoint to resume from, written by this very recipe; returns it (what the run began with is in it)."""
    found = [task_folder(out, i, t) / name for i, t in enumerate(tasks)
             for name in ("task.pt", "last.pt")]
    found = [p for p in found if p.is_file()]
    if not found:
        raise EdgeKDError(f"{out}: no task.pt or last.pt of this recipe's tasks (nothing to resume)")
    return load_resumable(found[0], recipe)


def _start(recipe, out: Path, tasks: list[Task], resume: bool,
           log: Callable[[str], None]) -> tuple[nn.Module, dict[str, Any], bool, dict[str, Any] | None]:
    """The run's starting model (`starting_model`) and where it started (`starting_weights`; a resumed run keeps what
    it began with, as the file may have changed since: checkpoints from before 2026-12-06 recorded none, so those
    are read now); then `out` made, an earlier run's results removed (a new run) and recipe.yaml written."""
    resumed = check_resumable(out, tasks, recipe) if resume else None
    began = (resumed or {}).get("init_weights") or {}
    if recipe.continual.checkpoint is not None and began.get("sha256") and Path(recipe.continual.checkpoint).is_file() \
            and sha256_file(recipe.continual.checkpoint) != began["sha256"]:  # retrained into the same file since
        raise EdgeKDError(f"continual.checkpoint {recipe.continual.checkpoint} has changed since this run began (sha256 "
                          f"{began['sha256'][:12]} then, {sha256_file(recipe.continual.checkpoint)[:12]} now): the "
                          "resumed run would take task 0's scores, EWC's anchors or LwF's teacher from another model; "
                          "resume with the file it began from, or start anew (without --resume)")
    model, spec, first_learned = starting_model(recipe, tasks, log)
    init = resumed["init_weights"] if resumed is not None and "init_weights" in resumed else starting_weights(recipe)
    checkpoint, note = recipe.continual.checkpoint, ""
    if checkpoint is not None and spec["name"] != recipe.model.name:  # the checkpoint's model is what trains
        note = (f"continual.checkpoint {checkpoint} holds model {spec['name']}; the recipe's model.name "
                f"{recipe.model.name} is not used")
        log(f"warning: {note}")
    out.mkdir(parents=True, exist_ok=True)  # data and model built: a bad path has failed before anything is written
    if not resume:
        remove_earlier_run(out, tasks, log)
    # the recipe as given (its digest is the checkpoints'), with a note when its model.name is not what trained
    write_text(out / "recipe.yaml", (f"# {note}\n" if note else "") + yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    return model, spec, first_learned, init


def warn_about_tasks(tasks: list[Task], cfg, log: Callable[[str], None]) -> None:
    """What the sequence will not do as asked (`task_warnings`), then each task's data notes, skipped files and
    missing classes, as a single run and `edgekd check` say them (a task lacks the other tasks' classes by design)."""
    for warning in task_warnings(tasks, cfg):
        log(warning)
    for t in tasks:
        warn_about_data(t.data, lambda line, task=t.name: log(line.replace("warning:", f"warning: task {task}:", 1)),
                        "continual.json lists", own=(t.lo, t.hi))


@keeps_torch_threads
def run_continual(recipe, out: str | Path, resume: bool = False, log: Callable[[str], None] | None = print,
                  progress=None) -> ContinualResult:
    """Learn recipe.continual.tasks in order; after each, evaluate all learned tasks (accuracy matrix)."""
    log = log or silent  # log=None: say nothing
    recipe, out = entry_arguments(recipe, out)
    cfg = recipe.continual
    if recipe.train.loss.class_weights or isinstance(recipe.train.loss.alpha, list):
        raise EdgeKDError("train.loss: per-class weights are not supported in continual runs (classes change per task)")
    out = Path(out)
    seed_everything(recipe.seed, recipe.train.deterministic)
    apply_threads(recipe, log)  # (only supervised and distillation runs had applied train.threads)
    if resume and (done := finished_run(out, recipe)) is not None:  # it had retrained nothing, yet rewritten
        log(f"{out}: this recipe's run finished there; nothing to resume (model.pt and continual.json are kept)")
        return done  # model.pt (an exported bundle's parent) and dropped continual.json's timing records
    tasks = build_tasks(recipe)
    warn_about_tasks(tasks, cfg, log)
    model, spec, first_learned, init = _start(recipe, out, tasks, resume, log)
    device = resolve_device(recipe.train.device)
    model.to(device)
    head = cfg.head
    plugins = build_plugins(cfg, recipe.seed)
    criterion = build_loss(recipe.train.loss)
    n = len(tasks)
    acc, f1 = np.full((n, n), np.nan), np.full((n, n), np.nan)
    steps: list[dict[str, Any]] = []
    with progress_task(progress, f"continual: {n} tasks", n) as advance_task:
        for i, task in enumerate(tasks):
            task_dir = task_folder(out, i, task)
            if num_outputs(model) != task.hi:
                resize_classifier(model, task.hi)
            step = TaskStep(model, tasks, i, head, device)
            call_plugins(plugins, "before_task", step)
            record: dict[str, Any] = {"step": i + 1, "task": task.name}
            if i == 0 and first_learned:
                log(f"task 1/{n} '{task.name}': learned by {cfg.checkpoint}")
            elif resume and (task_dir / "task.pt").is_file():
                record.update(resume_task(model, task_dir / "task.pt", recipe))
                log(f"task {i + 1}/{n} '{task.name}': done before, loaded {task_dir / 'task.pt'}")
            else:
                record.update(_train_task(recipe, model, tasks, i, step, plugins, criterion, task_dir,
                                          _meta(recipe, tasks, i, spec, head, init), resume, progress, log))
            call_plugins(plugins, "after_task", step)
            record["eval"] = _evaluate_step(model, tasks, head, i, cfg.eval_split, device, log)
            for j, r in enumerate(record["eval"]):
                acc[i, j], f1[i, j] = r["acc"], r["f1"]
            steps.append(record)
            advance_task()
    summary = _summary(recipe, tasks, spec, model, acc, f1, steps)
    best_path = out / "model.pt"
    if is_main_process():  # (every torchrun rank had written them)
        with deferred_signals():  # continual.json last: it (with model.pt) marks the run finished for --resume,
            save_checkpoint(best_path, {  # which had then never written plots a Ctrl-C cut off
                "state_dict": _cpu_state(model), "metrics": {"acc_matrix": acc.tolist()},
                "recipe_digest": recipe.digest(), **_meta(recipe, tasks, n - 1, spec, head, init)})
            _write_plots(recipe, out, acc, summary["tasks"], steps[-1]["eval"])
            write_json(out / "continual.json", summary)
    return ContinualResult(out, best_path, summary["params"], summary["tasks"], acc.tolist(), summary)
