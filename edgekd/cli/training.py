"""The training-side commands: train, check, eval, report, explain (PyTorch; imported inside each command)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table as RichTable

from edgekd.cli.console import (STATE, _quiet, checkpoint_argument, console, out_console, plain_log, progress_bar,
                                torchrun_worker, with_progress)
from edgekd.cli.tables import continual_table, metrics_table, robustness_table
from edgekd.errors import EdgeKDError
from edgekd.formats import param_count
from edgekd.options import int_list, split_list


def train(
    recipe: Path = typer.Argument(..., help="Recipe YAML (see recipes/)."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a recipe key: --set train.epochs=3 (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (default runs/<recipe name>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from <out>/last.pt (a continual run: from the task "
                                "cut short; with --folds: keep the folds that finished, continue the one cut short)."),
    folds: Optional[int] = typer.Option(None, "--folds", help="k-fold cross-validation: train once per fold."),
    teacher_set: list[str] = typer.Option([], "--teacher-set", help="With --folds and a distill recipe: override a "
                                          "key of distill.teacher_recipe, the teacher trained on each fold."),
) -> None:
    """Train a teacher, baseline or student from a recipe (best.pt, last.pt, metrics.json and plots), or a
    continual-learning sequence (model.pt, continual.json); --folds N runs k-fold cross-validation."""
    from edgekd.fileio import removed_if_only
    from edgekd.recipe import load_recipe, warn_sections_turned_on
    from edgekd.train.distributed import distributed_session, is_main_process

    rec = load_recipe(recipe, set_)
    out = out or Path("runs") / rec.name
    if teacher_set and (folds is None or rec.distill is None):
        raise EdgeKDError("--teacher-set is for --folds with a distill recipe (the teacher trained on each fold)")
    rank, world = torchrun_worker()
    warn_sections_turned_on(recipe, set_, console.print if rank == 0 else _quiet)
    launcher = ["torchrun", "--nproc_per_node", str(world), "-m", "edgekd"] if world > 1 else ["edgekd"]
    again = shlex.join([*launcher, "train", str(recipe), "--out", str(out), "--resume",
                        *(["--folds", str(folds)] if folds is not None else []),
                        *[a for o in set_ for a in ("--set", o)], *[a for o in teacher_set for a in ("--teacher-set", o)]])
    # a continual run keeps a last.pt per task (task<i>/last.pt), a k-fold run per fold and role
    STATE["on_interrupt"] = lambda: f"resume it: {again}" if next(out.glob("**/last.pt"), None) else None
    # Under torchrun every rank runs this command: one process group per run, console output from rank 0 only.
    # A run refused before it wrote anything but its recipe (e.g. a monitor NaN at epoch 1) leaves no folder behind.
    with removed_if_only(out, ("recipe.yaml",)), distributed_session(rec.train.device), progress_bar() as progress:
        main = is_main_process()
        log = plain_log(progress.console.print if progress.console.is_terminal else console.print) if main else _quiet
        if folds is not None:
            from edgekd.pipeline import run_folds
            summary = run_folds(rec, out, folds, log=log, progress=progress if main else None, recipe_path=recipe,
                                teacher_overrides=teacher_set, resume=resume)
            if main:
                out_console.print(summary["table_markdown"], soft_wrap=True, markup=False, highlight=False)
            return
        from edgekd.pipeline import run_recipe
        result = run_recipe(rec, out, resume=resume, log=log, progress=progress if main else None, recipe_path=recipe)
    if not main:
        return
    if getattr(result, "acc_matrix", None) is not None:  # a continual run: its table is the accuracy matrix
        out_console.print(continual_table(rec.name, result))
        console.print(escape(f"final checkpoint {result.best_path} (the weights after the last task); wrote "
                             f"continual.json, task_accuracy.png in {out}"))
        return
    size = param_count(result.params)
    rows = [{"model": f"{rec.name} ({size})", **result.val}, {"model": f"{rec.name} ({size})", **result.test}]
    out_console.print(metrics_table(f"{rec.name}: best checkpoint", rows))
    console.print(escape(f"best checkpoint {result.best_path}; wrote the reports in {out}"))


def check(
    recipe: Path = typer.Argument(..., help="Recipe YAML (see recipes/)."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a recipe key: --set data.batch_size=4 (repeatable)."),
    synthetic: bool = typer.Option(False, "--synthetic", help="Generated data of the recipe's image size, channels "
                                   "and classes; untrained stand-ins for absent teacher/student checkpoints."),
    classes: Optional[int] = typer.Option(None, "--classes", min=2, help="With --synthetic: the class count "
                                          "(default: from the recipe, a MedMNIST file name, else 2)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=2, help="Optimizer steps to run (default 5); the "
                                        "first is warm-up, the median of the others is the step time."),
    folds: Optional[int] = typer.Option(None, "--folds", min=2, help="Check `train --folds N` on the recipe's data: "
                                        "what it refuses before training, then fold 1's run (a distill recipe's fold "
                                        "teacher stood in by an untrained model of its teacher recipe)."),
    teacher_set: list[str] = typer.Option([], "--teacher-set", help="With --folds and a distill recipe: override a "
                                          "key of distill.teacher_recipe, as `train --folds` takes it."),
) -> None:
    """Check a recipe before a long run: validate it, build its data, model, teacher and plug-ins, run a few
    optimizer steps and one evaluation at its image size; print params, MACs, seconds per step and per epoch."""
    from edgekd.check import check_recipe
    from edgekd.recipe import load_recipe, warn_sections_turned_on

    if classes is not None and not synthetic:  # it was ignored, and the check said ok
        raise EdgeKDError("--classes sets the class count of --synthetic data; the recipe's own data has its classes")
    load_recipe(recipe, set_)  # a bad key is the one line (a warning that --set turns its section on had come first)
    warn_sections_turned_on(recipe, set_, console.print)
    with console.status(f"checking {recipe} ...") as status:  # the run's own lines as they come: a large model's
        r = check_recipe(recipe, set_, synthetic=synthetic, classes=classes,  # build and steps take minutes on a CPU
                         **({"steps": steps} if steps else {}), folds=folds, teacher_overrides=teacher_set,
                         warn=lambda line: console.print(escape(line)),
                         log=lambda line: status.update(f"checking {escape(str(recipe))}: {escape(line[:100])}"))
    table = RichTable(title=f"check ok ({r.kind}{', synthetic data' if synthetic else ''})", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    rows = [("recipe", str(recipe)), ("model", r.model), ("teacher", r.teacher or "-"), ("params", f"{r.params / 1e6:.3f} M"),
            ("MACs", f"{r.macs / 1e6:.1f} M" if r.macs else "-"), ("input", "x".join(map(str, r.input_size))),
            ("batch", str(r.batch_size) + (f" x {r.grad_accum} accumulated per step" if r.grad_accum > 1 else "")),
            ("seconds per step", f"{r.step_seconds:.3f} (" + (
                f"median of {r.timed_steps} timed steps, {r.step_range[0]:.3f}-{r.step_range[1]:.3f}" if r.timed_steps
                else "one step, warm-up included: the train split is one optimizer step"
                + (f" ({r.grad_accum} accumulated batches)" if r.grad_accum > 1 else " (one batch)"))
                + "; training only, not evaluation)"),
            ("per epoch" if r.kind != "continual" else "an epoch of every task",
             f"{r.epoch_seconds:.3g} s ({r.train_images} train images)" if r.epoch_seconds is not None
             else f"{r.seconds_per_1000_images:.3g} s per 1000 train images"),  # 3 digits: 0.36 s had shown as 0
            ("peak RSS", f"{r.peak_rss_mb:.0f} MB"), ("check took", f"{r.seconds:.1f} s")]
    rows += [("stand-in", s) for s in r.stand_ins]
    for k, v in rows:
        table.add_row(k, escape(v))
    out_console.print(table)


def eval_(
    checkpoint: Path = typer.Argument(..., callback=checkpoint_argument, help="A checkpoint (best.pt) written by "
                                      "`edgekd train` (or its run folder); with --corruptions/--failures a bundle."),
    data: Optional[Path] = typer.Option(None, "--data", help="Evaluate on this recipe's data instead of the checkpoint's, "
                                        "or on every image of a labelled folder (DIR/<class name>/images)."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a key of the data recipe (e.g. data.path=...)."),
    split: Optional[str] = typer.Option(None, "--split", help="Comma-separated splits: train,val,test (default: test)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (default: eval_<name> beside it)."),
    corruptions: bool = typer.Option(False, "--corruptions", help="Also score under 8 corruptions x 5 severities "
                                     "(robustness.json/.md/.png)."),
    only: Optional[str] = typer.Option(None, "--only", help="Comma-separated corruptions (default: all 8)."),
    severities: Optional[str] = typer.Option(None, "--severities", help="Comma-separated severities 1..5 (default all)."),
    compare: list[Path] = typer.Option([], "--compare", help="More checkpoints/bundles scored on the same corrupted "
                                       "images (e.g. the teacher, the student's bundle); repeatable."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Corruption eval on a fixed random subset of N images."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the corruptions' randomness."),
    failures: bool = typer.Option(False, "--failures", help="Top confused class pairs with example images "
                                  "(failures.json/.png)."),
    top: Optional[int] = typer.Option(None, "--top", min=1, help="How many confused pairs --failures reports "
                                      "(default: 5)."),
    task: Optional[str] = typer.Option(None, "--task", help="A model with one head per task: the task whose head "
                                       "scores the labelled folder of --data DIR."),
) -> None:
    """Evaluate a checkpoint: prints a metrics table, writes metrics.json, confusion and ROC plots (a continual
    checkpoint: metrics.json, per task); optionally corruption robustness (teacher vs student vs each export format) and failure analysis. A bundle's corruption
    eval on a labelled folder (--data DIR) runs on the core install, without PyTorch."""
    from edgekd.fileio import staged_files
    from edgekd.runtime import is_bundle

    folder, bundle = data if data is not None and data.is_dir() else None, is_bundle(checkpoint)
    splits, names, levels = _eval_options(split, corruptions, only, severities, failures,
                                          given={"--limit": limit, "--compare": compare, "--top": top}, folder=folder,
                                          task=task, bundle=bundle)
    if folder is not None and (set_ or (bundle and not (corruptions or failures))):
        raise EdgeKDError(f"--data {folder}: a labelled folder is scored by a checkpoint, or by a bundle's "
                          "--corruptions or --failures; --set takes a data recipe")
    data_recipe = _data_recipe(checkpoint, data, set_) if folder is None else None
    out = out or checkpoint.parent / f"eval_{checkpoint.stem}"
    _eval_preflight(checkpoint, compare, out, bundle, data_recipe is not None or folder is not None, corruptions,
                    failures)
    wrote: list[str] = []  # said once every step has passed: a refusal or stop half-way leaves --out as it was
    with staged_files(out, before_publish=_drop_other_plots(out)) as stage:  # (a refused --compare had left files)
        if not bundle and folder is not None:
            wrote += _eval_folder(checkpoint, stage, folder, task)
        elif not bundle:
            wrote += _eval_checkpoint(checkpoint, stage, data_recipe, splits)
        elif not (corruptions or failures):
            raise EdgeKDError(f"{checkpoint}: a bundle is evaluated with --corruptions/--failures (or give its "
                              "checkpoint)")
        if corruptions:
            wrote += _eval_corruptions([checkpoint, *compare], stage, data_recipe, splits[0], names, levels, seed,
                                       limit, folder)
        if failures:
            wrote += _eval_failures(checkpoint, stage, data_recipe, splits[0], top or 5, folder)
    console.print(escape(f"wrote {', '.join(str(out / Path(p).name) for p in wrote)}"))  # paths: no rich markup


def _eval_preflight(checkpoint: Path, compare: list[Path], out: Path, bundle: bool, data_given: bool,
                    corruptions: bool, failures: bool) -> None:
    """What `edgekd eval` refuses before any work: an --out inside an input or over a run's metrics.json, and for
    --corruptions/--failures models that cannot be compared or whose data cannot be taken (a multi-head checkpoint,
    a --compare of other classes, a continual checkpoint without --data: each had been refused after the main
    evaluation printed); the train extra the failure analysis needs."""
    from edgekd.fileio import refuse_other_metrics, refuse_output_inside
    from edgekd.robustness import check_predictor_sources

    refuse_output_inside(out, [checkpoint, *compare])
    refuse_other_metrics(out, checkpoint, writes=not bundle)  # a bundle's --corruptions/--failures write none
    if corruptions or failures:
        check_predictor_sources([checkpoint, *compare], None if data_given else  # --data, or --set's recipe
                                "corruption eval" if corruptions else "failure analysis")
    if failures:  # the train extra (scikit-learn, matplotlib), asked for before a core install's corruption eval
        import edgekd.metrics.failures  # noqa: F401


def _eval_corruptions(sources: list[Path], out: Path, data_recipe, split: str, names, levels, seed: int,
                      limit: Optional[int], folder: Optional[Path]) -> list[str]:
    """`edgekd eval --corruptions`: the robustness table printed; the files it wrote."""
    from edgekd.robustness.evaluate import run_corruption_eval

    res = with_progress(lambda log, bar: run_corruption_eval(
        sources, out, data_recipe, split, names, levels, seed, limit, log=log, progress=bar, data_folder=folder))
    out_console.print(robustness_table(res["summary"], f"corruption robustness ({res['split']}, "
                                                        f"{res['images']} images)"))
    return [str(out / name) for name in res["written"]]


def _drop_other_plots(out: Path):
    """An earlier evaluation's confusion/ROC plots of splits the new metrics.json does not hold would sit beside it
    as if they were its own (a --split val eval after a test one): removed when a new metrics.json comes. Only
    an eval's (its metrics.json names a `checkpoint`) and only the splits it lists: a run folder's own plots, a
    report's or a continual run's stay. Likewise an earlier robustness.png beside a new robustness.json without
    one."""
    from edgekd.fileio import earlier_eval

    def drop(stage: Path) -> None:
        if (stage / "robustness.json").is_file() and not (stage / "robustness.png").exists():
            (out / "robustness.png").unlink(missing_ok=True)  # a core install's corruption eval draws no chart
        earlier = earlier_eval(out)
        if earlier is None or not (stage / "metrics.json").is_file():
            return
        for split in (s for s in ("train", "val", "test", "folder") if s in earlier):
            for name in (f"confusion_{split}.png", f"roc_{split}.png"):
                if not (stage / name).exists():
                    (out / name).unlink(missing_ok=True)
    return drop


def _eval_failures(checkpoint: Path, out: Path, data_recipe, split: str, top: int,
                   folder: Optional[Path] = None) -> list[str]:
    """`edgekd eval --failures`: the top confused pairs printed; the files it wrote."""
    from edgekd.robustness.evaluate import run_failure_analysis

    res = run_failure_analysis(checkpoint, out, data_recipe, split, top, log=plain_log(console.print),
                               data_folder=folder)
    for p in res["pairs"]:
        out_console.print(escape(f"{p['true_name']} -> {p['pred_name']}: {p['count']} ({p['rate']:.1%} of "
                                 f"{p['true_name']}), most confident "
                                 f"{p['files'][0] if p.get('files') else '#' + str(p['indices'][0])} "
                                 f"p={p['confidence'][0]:.3f}"))  # class names and files as written
    console.print(f"{res['errors']} errors / {res['images']} images; labels: {res['labels']}; p: "
                  f"{res['probabilities']}")
    return [str(out / "failures.json"), str(out / "failures.png")]


def _eval_options(split: Optional[str], corruptions: bool, only: Optional[str], severities: Optional[str],
                  failures: bool = False, given: dict | None = None, folder: Optional[Path] = None,
                  task: Optional[str] = None, bundle: bool = False):
    """`edgekd eval`'s splits, corruption names and severities, checked before any work (a bad --severities
    failed after the plain evaluation had written its files). `given`: the options of one mode (--limit and
    --compare of --corruptions, --top of --failures), refused without it (they had been ignored); --task (the head
    of a checkpoint that scores a labelled folder) refused without --data DIR, or for a bundle (it was ignored)."""
    if task is not None and folder is None:  # each task is scored on its own data, by its own head
        raise EdgeKDError(f"--task {task}: chooses the head that scores a labelled folder (--data DIR); without one "
                          "`edgekd eval` scores every task on its own data")
    if task is not None and bundle:
        raise EdgeKDError(f"--task {task}: chooses a checkpoint's head for a labelled folder; a bundle's "
                          "--corruptions/--failures score a bundle of one head")
    from edgekd.robustness import check_names, check_severities

    of = {"--limit": ("--corruptions", corruptions), "--compare": ("--corruptions", corruptions),
          "--top": ("--failures", failures)}
    for option, value in (given or {}).items():
        if value and not of[option][1]:
            raise EdgeKDError(f"{option} is an option of {of[option][0]}, which was not given")
    if folder is not None and split is not None:
        raise EdgeKDError(f"--split {split}: a labelled folder (--data {folder}) has no splits; every image is scored")
    split = "test" if split is None else split  # given as '' it is no split (`split or "test"` had scored test)
    splits = tuple(split_list(split, "--split") or ())
    twice = next((s for i, s in enumerate(splits) if s in splits[:i]), None)
    if twice:  # its rows, warnings and files had come twice
        raise EdgeKDError(f"--split {split}: {twice} is given twice")
    if not splits:
        raise EdgeKDError(f"--split {split!r}: no split given (use train, val, test)")
    bad = [s for s in splits if s not in ("train", "val", "test")]
    if bad:
        raise EdgeKDError(f"--split: unknown split '{bad[0]}' (use train, val, test)")
    if not corruptions and (only is not None or severities is not None):
        raise EdgeKDError("--only and --severities choose the corruptions of --corruptions, which was not given")
    names, levels = split_list(only, "--only"), int_list(severities, "--severities")
    for option, given, parsed in (("--only", only, names), ("--severities", severities, levels)):
        if given is not None and not parsed:  # `--only ,` ran all 8
            raise EdgeKDError(f"{option} {given!r}: nothing given")
        if parsed and len(set(parsed)) < len(parsed):  # counted twice in the means
            raise EdgeKDError(f"{option} {given!r}: a value given twice")
    if (corruptions or failures) and len(splits) > 1:  # it ran on the first alone, without a word
        raise EdgeKDError(f"--split {split}: --corruptions and --failures score one split; give one")
    return splits, check_names(names) if names else names, check_severities(levels) if levels else levels


def _eval_checkpoint(checkpoint: Path, out: Path, data_recipe, splits: tuple[str, ...]) -> list[str]:
    """`edgekd eval CHECKPOINT`: the metrics table, a warning per split that calls nearly everything one class;
    the files written."""
    from edgekd.train.checkpoint import load_checkpoint
    from edgekd.train.run import evaluate_checkpoint

    if load_checkpoint(checkpoint).get("continual"):
        _eval_continual(checkpoint, out, splits, data_recipe)
        return [str(out / "metrics.json")]

    result = with_progress(lambda log, bar: evaluate_checkpoint(checkpoint, out, data_recipe, splits, progress=bar,
                                                                log=log))
    out_console.print(metrics_table(f"{checkpoint}", [{"model": result["model"], **result[s],
                                                       "split": f"{s} ({result[s]['n']} images)"} for s in splits]))
    for s in splits:
        if result[s].get("warning"):
            console.print(f"[yellow]warning:[/] {escape(result[s]['warning'])}")
    return [str(out / name) for name in ("metrics.json", *(f"{kind}_{s}.png" for s in splits
                                                          for kind in ("confusion", "roc")))]


def _eval_folder(checkpoint: Path, out: Path, folder: Path, task: Optional[str] = None) -> list[str]:
    """`edgekd eval CHECKPOINT --data DIR [--task NAME]`: every image of the labelled folder, one row."""
    from edgekd.robustness import evaluate_on_folder

    with console.status(escape(f"scoring {checkpoint} on {folder} ...")):
        result = evaluate_on_folder(checkpoint, out, folder, task)
    row = result["folder"]
    head = f" (task {task})" if task else ""
    out_console.print(metrics_table(f"{checkpoint}{head} on {folder}", [{"model": result["model"], **row,
                                                                   "split": f"{folder} ({row['n']} images)"}]))
    if row.get("warning"):
        console.print(f"[yellow]warning:[/] {escape(row['warning'])}")
    return [str(out / name) for name in ("metrics.json", "confusion_folder.png", "roc_folder.png")]


def _eval_continual(checkpoint: Path, out: Path, splits: tuple[str, ...], data_recipe) -> None:
    """A continual checkpoint: a row per task and split (each scored as the run scored it), then their mean."""
    from edgekd.continual import evaluate_continual_checkpoint

    with console.status(f"evaluating the tasks of {checkpoint} ..."):
        result = evaluate_continual_checkpoint(checkpoint, out, splits, recipe=data_recipe)
    rows = [{"model": f"task {name}", "split": s, **result[s]["per_task"][name]} for s in splits
            for name in result["tasks"]]
    rows += [{"model": "mean over tasks", "split": s, "acc": result[s]["acc"], "f1": result[s]["f1"]} for s in splits]
    out_console.print(metrics_table(f"{checkpoint} ({result['head']} head)", rows, keys=("acc", "f1")))
    for warning in result.get("warnings", []):
        console.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)


def _data_recipe(checkpoint: Path, data: Optional[Path], set_: list[str]):
    """The data recipe of `edgekd eval`: --data RECIPE (with --set overrides), the checkpoint's own recipe with
    --set overrides, or None (the checkpoint's recipe as it is)."""
    if data is not None:
        from edgekd.recipe import load_recipe

        if not data.exists():
            raise EdgeKDError(f"--data {data}: not found (a data recipe, or for a bundle's --corruptions a labelled "
                              "folder)")
        if data.is_file() and data.suffix.lower() in (".csv", ".npz"):  # it said "a recipe must be a YAML mapping"
            from edgekd.runtime import is_bundle

            source = "csv" if data.suffix.lower() == ".csv" else "medmnist"
            how = (f"give a recipe naming it (data.source: {source}, data.path: {data})" if is_bundle(checkpoint) else
                   f"drop --data and give --set data.source={source} --set data.path={data} (the checkpoint's recipe "
                   "on this file), or give a recipe naming it")
            raise EdgeKDError(f"--data {data}: a data file, not a recipe or a labelled folder: to score its test "
                              f"split, {how}")
        return load_recipe(data, set_)
    if set_:
        from edgekd.recipe import apply_overrides, recipe_from_dict
        from edgekd.runtime import is_bundle
        from edgekd.train.checkpoint import load_checkpoint

        if is_bundle(checkpoint):  # it had said "an exported bundle, not a checkpoint file"
            raise EdgeKDError(f"--set: {checkpoint} is a bundle, which holds no recipe to override: give --data "
                              "RECIPE (--set then overrides it)")

        return recipe_from_dict(apply_overrides(load_checkpoint(checkpoint)["recipe"], set_), str(checkpoint))
    return None


def report(
    runs: list[Path] = typer.Argument(..., help="Run directories (holding best.pt) or checkpoints to compare."),
    out: Path = typer.Option(Path("runs/report"), "--out", "-o", help="Output directory."),
    split: str = typer.Option("test", "--split", help="The split to evaluate every model on."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a key of every run's recipe, e.g. "
                                   "data.path=... for runs trained in another folder (repeatable)."),
) -> None:
    """KD report: one table per dataset (baseline, teacher, student from scratch, distilled student) with
    params, MACs, acc, AUC, macro F1, sensitivity, specificity, PPV, pAUC; writes report.md/.json and ROC/confusion PNGs."""
    from edgekd.distill.report import comparison_report
    from edgekd.fileio import check_output_location, refuse_output_inside

    refuse_output_inside(out, [r for r in runs if not r.is_dir()])  # a run folder may hold its report
    check_output_location(out)  # before every model is scored (a file there had been found after them)
    if "," in split:  # eval takes a list; a report's tables are of one split
        raise EdgeKDError(f"--split {split}: a report scores one split (run it once per split)")
    if split not in ("train", "val", "test"):
        raise EdgeKDError(f"--split: unknown split '{split}' (use train, val, test)")
    result = comparison_report(runs, out, split, set_, log=plain_log(console.print))
    out_console.print(result["markdown"], soft_wrap=True, markup=False, highlight=False)  # rows unwrapped
    console.print(f"wrote {escape(str(out / 'report.md'))}, {escape(str(out / 'report.json'))} and plots")


def _explained_images(images: list[Path]) -> list[Path]:
    """The images given, a folder's read as `predict` reads it (its image files, recursively; a folder had been "not
    an image file"); a multi-frame DICOM among them is refused (explain reads a file's one image)."""
    from edgekd.imageio import DicomFrame
    from edgekd.runtime.inputs import collect_inputs

    found: list[Path] = []
    for image in images:
        if not image.is_dir():
            found.append(image)
            continue
        paths, problems = collect_inputs([image])
        if problems:
            raise EdgeKDError(problems[0][1])
        if frames := [p for p in paths if isinstance(p, DicomFrame)]:
            raise EdgeKDError(f"{frames[0].path}: a multi-frame DICOM; explain takes single-frame images")
        found += paths
    return found


def explain(
    checkpoint: Path = typer.Argument(..., callback=checkpoint_argument, help="A checkpoint (best.pt) written by "
                                      "`edgekd train`, or its run folder."),
    images: list[Path] = typer.Argument(..., help="Image files, or folders of them (searched recursively), to "
                                        "explain."),
    layer: Optional[str] = typer.Option(None, "--layer", help="Module path of the target layer (default: the last "
                                        "feature stage in timm's feature_info with a map of at least 3x3)."),
    target: Optional[str] = typer.Option(None, "--target", help="Class name or id to explain (default: the predicted)."),
    out: Path = typer.Option(Path("runs/explain"), "--out", "-o", help="Output directory."),
    task: Optional[str] = typer.Option(None, "--task", help="A model with one head per task: the task whose head to "
                                       "explain (its class names for --target)."),
) -> None:
    """Grad-CAM: writes <image>_gradcam.png heat-map overlays and explain.json (prediction, target, CAM peak)."""
    from edgekd.explain.gradcam import explain_files
    from edgekd.fileio import refuse_output_inside

    # nor inside a folder it reads: the overlays would be read as images by the next run over it
    refuse_output_inside(out, [checkpoint, *(i for i in images if i.is_dir())])
    files, skipped = _explained_images(images), []
    records = explain_files(checkpoint, files, out, layer, target, task, skipped=skipped)  # bad files: as predict
    for r in records:
        out_console.print(escape(f"{r['file']}: predicted {r['predicted']} (p {r['prob']:.3f}, the checkpoint's "
                                 f"uncalibrated softmax), Grad-CAM of "
                                 f"{r['target']} at {r['layer']} -> {out / r['overlay']}"))
    blank = [r["file"] for r in records if r["blank"]]
    if blank:
        console.print(escape(f"warning: {len(blank)} of {len(records)} map(s) are flat, nothing highlighted "
                             f"({blank[0]}{', ...' if len(blank) > 1 else ''}): {records[0]['layer']} gives no "
                             "spatial evidence (a pooled or 1x1 map, tokens that never reach the head, or a class "
                             "gradient of zero there); try an earlier --layer with a map of at least 3x3"
                             + (f", or the model sees nothing for --target {target} in these images" if target else "")
                             + " (explain.json: blank)"))
    console.print(escape(f"wrote {len(records)} overlay(s) and {out / 'explain.json'}"))
    for bad in skipped:  # reported and skipped, exit 1 at the end (one had stopped the whole folder, exit 2)
        console.print(escape(f"skipped {bad['error']}" if bad["error"].startswith(bad["file"]) else
                             f"skipped {bad['file']}: {bad['error']}"))
    if skipped:
        console.print(f"[bold red]{len(skipped)} of {len(files)} image(s) could not be read[/]")
        raise typer.Exit(1)
