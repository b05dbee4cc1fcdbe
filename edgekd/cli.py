"""The `edgekd` command line (typer + rich): a thin layer over the pipeline stages.

Stage modules are imported inside each command so `edgekd predict` runs on a box without PyTorch.
"""

from __future__ import annotations

import os
import signal
import shlex
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table as RichTable

from edgekd import __version__
from edgekd.errors import EdgeKDError, error_line, printable
from edgekd.options import int_list, split_list


def _plain_help_types() -> None:
    """typer 0.29's help shows Python types: a flag's `<bool>` (`--tta <bool>`, even `--help <bool>`) as if it took
    a value, `<list[str]>` for a repeatable option or a variadic argument, `<int range>` beside its `[x>=1]`, and
    `{checkpoint}` for a required argument in the usage line; its command list keeps a docstring's line breaks.
    Shown instead: nothing for a flag, the element type (`--set <str>`, repeatable as its help says), `<int>`,
    CHECKPOINT / [OUT] in the usage line as click writes them, and each command's summary as one paragraph. A typer
    without these hooks is left as it is."""
    import inspect
    import re

    from typer.core import TyperArgument, TyperOption

    def plain(shown):
        def display_type_rich(self, ctx):
            if getattr(self, "is_flag", False):
                return None
            label = shown(self, ctx)
            return re.sub(r"<(?:list\[(\w+)\]|(\w+) range)>", lambda m: f"<{m.group(1) or m.group(2)}>", label) \
                if label else label
        display_type_rich.plain = True
        return display_type_rich

    for cls in (TyperOption, TyperArgument):
        shown = getattr(cls, "display_type_rich", None)
        if shown is not None and not getattr(shown, "plain", False):
            cls.display_type_rich = plain(shown)

    def usage_name(self):
        name = self.display_name_raw.upper()
        return (name if self.required else f"[{name}]") + ("..." if self.nargs != 1 else "")

    if hasattr(TyperArgument, "_usage_display_name"):
        TyperArgument._usage_display_name = usage_name
    if "--help" not in sys.argv[1:] and len(sys.argv) > 2:
        return  # the command list is help only: rich's markdown stays unimported on a prediction's start
    from typer import rich_utils

    command_help = getattr(rich_utils, "_make_command_help", None)
    if command_help is not None and not getattr(command_help, "plain", False):
        def one_paragraph(*, help_text: str, **kwargs):  # "run two / optimizer steps" at the docstring's breaks
            return command_help(help_text=re.sub(r"(?<!\n)\n(?!\n)", " ", inspect.cleandoc(help_text)), **kwargs)

        one_paragraph.plain = True
        rich_utils._make_command_help = one_paragraph
    if hasattr(rich_utils, "_fix_linebreaks") and not getattr(rich_utils._fix_linebreaks, "plain", False):
        def joined(paragraphs, *args, **kwargs):  # a command's later paragraphs, reflowed to the terminal too
            return "\n\n".join(p if p.startswith("\b") else re.sub(r"\n", " ", p) for p in paragraphs)

        joined.plain = True
        rich_utils._fix_linebreaks = joined


_plain_help_types()
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Distill medical-imaging classifiers into small, verified models for CPU edge devices.")
console = Console(stderr=True, highlight=False, soft_wrap=True)
# Tables are the output: keep them readable when piped to a file or a CI log (no 80-column squeeze).
out_console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
STATE: dict = {"debug": False, "on_interrupt": None}
"""on_interrupt: a command's hint for an interrupted run (a callable returning a line, or None)."""


def say_interrupted() -> None:
    hint = STATE["on_interrupt"]() if STATE["on_interrupt"] else None
    console.print("interrupted" + (f" ({hint})" if hint else ""))


BUNDLE_PRECISION_HELP = "fp32, fp16 or int8 (default: the most precise model in the bundle, fp32 first)."


def _version(value: bool) -> None:
    if value:
        print(f"edgekd {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    STATE["debug"] = debug


def progress_bar():
    """A rich progress bar on stderr; silent when stderr is not a terminal (CI logs stay readable)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True, disable=not console.is_terminal)


def with_progress(run):
    """`run(log, progress)` under the progress bar; `log` prints above the bar on a terminal."""
    with progress_bar() as progress:
        return run(progress.console.print if progress.console.is_terminal else console.print, progress)


def metrics_table(title: str, rows: list[dict], keys=("acc", "balanced_acc", "auc", "f1", "sensitivity",
                                                    "specificity", "pr_auc", "pauc")) -> RichTable:
    table = RichTable(title=title)
    table.add_column("model")
    table.add_column("split")
    for k in keys:
        table.add_column({"f1": "f1 (macro)"}.get(k, k), justify="right")
    for r in rows:
        table.add_row(r["model"], r["split"], *[_fmt(r.get(k)) for k in keys])
    return table


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.4f}"
    return str(v)


def continual_table(title: str, result) -> RichTable:
    """Accuracy after each task (rows) on each task (columns), then average accuracy, forgetting, BWT."""
    s = result.summary
    table = RichTable(title=f"{title}: {s['method']}{' + BN freeze' if s['bn_freeze'] else ''}, {s['head']} head "
                            f"({s['eval_split']} accuracy)")
    table.add_column("after task")
    for name in result.task_names:
        table.add_column(name, justify="right")
    table.add_column("avg", justify="right")
    for i, (name, row) in enumerate(zip(result.task_names, result.acc_matrix)):
        avg = sum(row[: i + 1]) / (i + 1)
        table.add_row(name, *[_fmt(v) if j <= i else "" for j, v in enumerate(row)], _fmt(avg))
    table.caption = (f"avg acc {s['avg_acc']:.4f} · forgetting {s['forgetting']:.4f} · BWT {s['bwt']:.4f} · "
                     f"first-task retention {s['retention_first_task']:.1%}")
    return table


def _quiet(*_args, **_kwargs) -> None:
    """The log of ranks other than 0."""


@app.command()
def train(
    recipe: Path = typer.Argument(..., help="Recipe YAML (see recipes/)."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a recipe key: --set train.epochs=3 (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (default runs/<recipe name>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from <out>/last.pt."),
    folds: Optional[int] = typer.Option(None, "--folds", help="k-fold cross-validation: train once per fold."),
    teacher_set: list[str] = typer.Option([], "--teacher-set", help="With --folds and a distill recipe: override a "
                                          "key of distill.teacher_recipe, the teacher trained on each fold."),
) -> None:
    """Train a teacher, baseline or student from a recipe; writes best.pt, last.pt, metrics.json and plots."""
    from edgekd.fileio import removed_if_only
    from edgekd.pipeline import check_run_inputs
    from edgekd.recipe import load_recipe
    from edgekd.train.distributed import distributed_session, is_main_process

    rec = load_recipe(recipe, set_)
    out = out or Path("runs") / rec.name
    if teacher_set and (folds is None or rec.distill is None):
        raise EdgeKDError("--teacher-set is for --folds with a distill recipe (the teacher trained on each fold)")
    check_run_inputs(rec, out, recipe, resume, folds, console.print if os.environ.get("RANK", "0") == "0" else _quiet)
    if folds is None:
        again = shlex.join(["edgekd", "train", str(recipe), "--out", str(out), "--resume",
                            *[a for o in set_ for a in ("--set", o)]])
        # a continual run keeps a last.pt per task (task<i>/last.pt)
        STATE["on_interrupt"] = lambda: f"resume it: {again}" if next(out.glob("**/last.pt"), None) else None
    # Under torchrun every rank runs this command: one process group per run, console output from rank 0 only.
    # A run refused before it wrote anything but its recipe (e.g. a monitor NaN at epoch 1) leaves no folder behind.
    with removed_if_only(out, ("recipe.yaml",)), distributed_session(rec.train.device), progress_bar() as progress:
        main = is_main_process()
        log = (progress.console.print if progress.console.is_terminal else console.print) if main else _quiet
        if folds is not None:
            from edgekd.pipeline import run_folds
            summary = run_folds(rec, out, folds, log=log, progress=progress if main else None, recipe_path=recipe,
                                teacher_overrides=teacher_set)
            if main:
                out_console.print(summary["table_markdown"])
            return
        from edgekd.pipeline import run_recipe
        result = run_recipe(rec, out, resume=resume, log=log, progress=progress if main else None)
    if not main:
        return
    if getattr(result, "acc_matrix", None) is not None:  # a continual run: its table is the accuracy matrix
        out_console.print(continual_table(rec.name, result))
        console.print(f"wrote {result.best_path} and continual.json, task_accuracy.png in {out}")
        return
    rows = [{"model": f"{rec.name} ({result.params / 1e6:.2f}M)", **result.val},
            {"model": f"{rec.name} ({result.params / 1e6:.2f}M)", **result.test}]
    out_console.print(metrics_table(f"{rec.name}: best checkpoint", rows))
    console.print(f"wrote {result.best_path} and reports in {out}")


@app.command()
def check(
    recipe: Path = typer.Argument(..., help="Recipe YAML (see recipes/)."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a recipe key: --set data.batch_size=4 (repeatable)."),
    synthetic: bool = typer.Option(False, "--synthetic", help="Generated data of the recipe's image size, channels "
                                   "and classes; untrained stand-ins for absent teacher/student checkpoints."),
    classes: Optional[int] = typer.Option(None, "--classes", min=2, help="With --synthetic: the class count "
                                          "(default: from the recipe, a MedMNIST file name, else 2)."),
) -> None:
    """Check a recipe before a long run: validate it, build its data, model, teacher and plug-ins, run two
    optimizer steps and one evaluation at its image size; print params, MACs, seconds per step and per epoch."""
    from edgekd.check import check_recipe

    with console.status(f"checking {recipe} ..."):
        r = check_recipe(recipe, set_, synthetic=synthetic, classes=classes)
    table = RichTable(title=f"check ok ({r.kind}{', synthetic data' if synthetic else ''})", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    rows = [("recipe", str(recipe)), ("model", r.model), ("teacher", r.teacher or "-"), ("params", f"{r.params / 1e6:.3f} M"),
            ("MACs", f"{r.macs / 1e6:.1f} M" if r.macs else "-"), ("input", "x".join(map(str, r.input_size))),
            ("batch", str(r.batch_size)), ("seconds per step", f"{r.step_seconds:.3f}"),
            ("per epoch", f"{r.epoch_seconds:.0f} s ({r.train_images} train images)" if r.epoch_seconds is not None
             else f"{r.step_seconds / r.batch_size * 1000:.0f} s per 1000 train images"),
            ("peak RSS", f"{r.peak_rss_mb:.0f} MB"), ("check took", f"{r.seconds:.1f} s")]
    rows += [("stand-in", s) for s in r.stand_ins]
    for k, v in rows:
        table.add_row(k, escape(v))
    out_console.print(table)


@app.command("eval")
def eval_(
    checkpoint: Path = typer.Argument(..., help="A checkpoint (best.pt) written by `edgekd train`; with "
                                      "--corruptions/--failures also an exported bundle."),
    data: Optional[Path] = typer.Option(None, "--data", help="Evaluate on this recipe's data instead of the checkpoint's; "
                                        "for a bundle's --corruptions also a labelled folder (DIR/<class name>/images)."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a key of the data recipe (e.g. data.path=...)."),
    split: str = typer.Option("test", "--split", help="Comma-separated splits: train,val,test."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (default: next to the checkpoint)."),
    corruptions: bool = typer.Option(False, "--corruptions", help="Also score under 8 corruptions x 5 severities "
                                     "(robustness.json/.md/.png)."),
    only: Optional[str] = typer.Option(None, "--only", help="Comma-separated corruptions (default: all 8)."),
    severities: Optional[str] = typer.Option(None, "--severities", help="Comma-separated severities 1..5 (default all)."),
    compare: list[Path] = typer.Option([], "--compare", help="More checkpoints/bundles scored on the same corrupted "
                                       "images (e.g. the teacher, the student's bundle); repeatable."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Corruption eval on a fixed random subset of N images."),
    seed: int = typer.Option(0, "--seed", help="Seed of the corruptions' randomness."),
    failures: bool = typer.Option(False, "--failures", help="Top confused class pairs with example images "
                                  "(failures.json/.png)."),
    top: int = typer.Option(5, "--top", min=1, help="How many confused pairs --failures reports."),
) -> None:
    """Evaluate a checkpoint: prints a metrics table, writes metrics.json, confusion and ROC plots; optionally
    corruption robustness (teacher vs student vs each export format) and failure analysis. A bundle's corruption
    eval on a labelled folder (--data DIR) runs on the core install, without PyTorch."""
    from edgekd.fileio import refuse_output_inside
    from edgekd.runtime import is_bundle

    splits, names, levels = _eval_options(split, corruptions, only, severities)
    folder = data if data is not None and data.is_dir() else None
    bundle = is_bundle(checkpoint)
    if folder is not None and (set_ or failures or not bundle):
        raise EdgeKDError(f"--data {folder}: a folder serves a bundle's --corruptions; a checkpoint, --set and "
                          "--failures take a data recipe")
    data_recipe = _data_recipe(checkpoint, data, set_) if folder is None else None
    out = out or checkpoint.parent / f"eval_{checkpoint.stem}"
    refuse_output_inside(out, [checkpoint, *compare])
    if compare:
        from edgekd.bench.run import check_source
        for other in compare:  # a bad --compare is refused before the main evaluation writes anything
            check_source(other)
    if not bundle:
        _eval_checkpoint(checkpoint, out, data_recipe, splits)
    elif not (corruptions or failures):
        raise EdgeKDError(f"{checkpoint}: a bundle is evaluated with --corruptions/--failures (or give its checkpoint)")
    if corruptions:
        from edgekd.robustness.evaluate import run_corruption_eval
        res = with_progress(lambda log, bar: run_corruption_eval(
            [checkpoint, *compare], out, data_recipe, splits[0], names, levels, seed, limit, log=log, progress=bar,
            data_folder=folder))
        out_console.print(robustness_table(res["summary"], f"corruption robustness ({res['split']}, {res['images']} images)"))
        console.print(f"wrote {', '.join(str(out / name) for name in res['written'])}")
    if failures:
        from edgekd.robustness.evaluate import run_failure_analysis
        res = run_failure_analysis(checkpoint, out, data_recipe, splits[0], top)
        for p in res["pairs"]:
            out_console.print(f"{p['true_name']} -> {p['pred_name']}: {p['count']} ({p['rate']:.1%} of "
                              f"{p['true_name']}), most confident #{p['indices'][0]} p={p['confidence'][0]:.3f}")
        console.print(f"{res['errors']} errors / {res['images']} images; wrote {out / 'failures.json'}, failures.png")


def _eval_options(split: str, corruptions: bool, only: Optional[str], severities: Optional[str]):
    """`edgekd eval`'s splits, corruption names and severities, checked before any work (a bad --severities
    failed after the plain evaluation had written its files)."""
    from edgekd.robustness import check_names, check_severities

    splits = tuple(split_list(split) or ())
    if not splits:
        raise EdgeKDError(f"--split {split!r}: no split given (use train, val, test)")
    bad = [s for s in splits if s not in ("train", "val", "test")]
    if bad:
        raise EdgeKDError(f"--split: unknown split '{bad[0]}' (use train, val, test)")
    if not corruptions and (only is not None or severities is not None):
        raise EdgeKDError("--only and --severities choose the corruptions of --corruptions, which was not given")
    names, levels = split_list(only), int_list(severities, "--severities")
    for option, given, parsed in (("--only", only, names), ("--severities", severities, levels)):
        if given is not None and not parsed:  # `--only ,` ran all 8
            raise EdgeKDError(f"{option} {given!r}: nothing given")
    return splits, check_names(names) if names else names, check_severities(levels) if levels else levels


def _eval_checkpoint(checkpoint: Path, out: Path, data_recipe, splits: tuple[str, ...]) -> None:
    """`edgekd eval CHECKPOINT`: the metrics table, a warning per split that calls nearly everything one class."""
    from edgekd.train.run import evaluate_checkpoint

    result = with_progress(lambda log, bar: evaluate_checkpoint(checkpoint, out, data_recipe, splits, progress=bar,
                                                                log=log))
    out_console.print(metrics_table(f"{checkpoint}", [{"model": result["model"], **result[s]} for s in splits]))
    for s in splits:
        if result[s].get("warning"):
            console.print(f"[yellow]warning:[/] {escape(result[s]['warning'])}")
    console.print(f"wrote {out / 'metrics.json'}")


def _data_recipe(checkpoint: Path, data: Optional[Path], set_: list[str]):
    """The data recipe of `edgekd eval`: --data RECIPE (with --set overrides), the checkpoint's own recipe with
    --set overrides, or None (the checkpoint's recipe as it is)."""
    if data is not None:
        from edgekd.recipe import load_recipe

        return load_recipe(data, set_)
    if set_:
        from edgekd.recipe import apply_overrides, recipe_from_dict
        from edgekd.train.checkpoint import load_checkpoint

        return recipe_from_dict(apply_overrides(load_checkpoint(checkpoint)["recipe"], set_), str(checkpoint))
    return None


def robustness_table(summary: list[dict], title: str) -> RichTable:
    names = list(summary[0]["per_corruption_acc"]) if summary else []
    table = RichTable(title=title)
    for col in ("model", "format", "clean acc", *names, "mean corr. acc", "rel. to clean"):
        table.add_column(col.replace("_", " "), justify="left" if col in ("model", "format") else "right")
    for r in summary:
        table.add_row(f"{r['model']} ({r['role']})", f"{r['format']}/{r['precision']}", _fmt(r["clean_acc"]),
                      *[_fmt(r["per_corruption_acc"][n]) for n in names], _fmt(r["mean_corruption_acc"]),
                      f"{r['relative_acc']:.1%}")
    return table


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="A checkpoint (best.pt) written by `edgekd train`."),
    format_: Optional[str] = typer.Option(None, "--format", "-f", help="Comma-separated: onnx,openvino (default: the profile's)."),
    precision: Optional[str] = typer.Option(None, "--precision", "-p", help="Comma-separated: fp32,fp16,int8 (default: the profile's)."),
    target: Optional[Path] = typer.Option(None, "--target", "-t", help="Export profile YAML, e.g. export/cpu-openvino-int8.yaml."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Bundle directory (default: <checkpoint dir>/bundle)."),
    zip_: bool = typer.Option(False, "--zip", help="Also write <out>.zip."),
    parity_images: Optional[int] = typer.Option(None, "--parity-images", help="Validation images in the parity gate (default 64)."),
    calib_images: Optional[int] = typer.Option(None, "--calib-images", help="Training images for INT8 calibration (default 300)."),
    metric_images: Optional[int] = typer.Option(None, "--metric-images", help="N val and N test images "
                                                "(stratified) for the ACC/AUC gate (default: whole splits; fewer is "
                                                "faster and coarser)."),
    accuracy_control: bool = typer.Option(False, "--accuracy-control", help="OpenVINO INT8 with NNCF accuracy "
                                          "control (max drop from the profile)."),
    no_accuracy_control: bool = typer.Option(False, "--no-accuracy-control", help="Without it, whatever the profile "
                                             "says."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for parity runs and the bundle's runtime hint."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a key of the checkpoint's recipe (e.g. data.path=...)."),
    drop_failed: bool = typer.Option(False, "--drop-failed", help="Ship the artifacts that pass the gate; list the "
                                     "others with their reasons in parity.json and the card (parity.on_fail: drop)."),
    allow_forgetting: bool = typer.Option(False, "--allow-forgetting", help="Continual checkpoints: export even when "
                                          "an earlier task's retention is below the profile's min_retention."),
) -> None:
    """Export to ONNX/OpenVINO (FP32/FP16/INT8), gate every artifact on parity with PyTorch, write a bundle.

    A continual checkpoint is first checked by the retention gate (its accuracy matrix); a multi-head one exports
    every task's head and is parity-checked per head."""
    from edgekd.export import export_checkpoint, load_profile, with_overrides

    if accuracy_control and no_accuracy_control:
        raise EdgeKDError("--accuracy-control and --no-accuracy-control: give one")
    control = True if accuracy_control else False if no_accuracy_control else None
    profile = with_overrides(load_profile(target), parity_images, calib_images, threads, control,
                             "drop" if drop_failed else None, metric_images)
    out = out or checkpoint.parent / "bundle"
    result = with_progress(lambda log, bar: export_checkpoint(
        checkpoint, out, split_list(format_), split_list(precision), profile, zip_, set_, log=log,
        allow_forgetting=allow_forgetting, progress=bar))
    out_console.print(parity_table(str(checkpoint), result))


def parity_table(title: str, result) -> RichTable:
    """An export's parity table: PyTorch, then every artifact (size, differences, metrics, result)."""
    split = result.parity["metric_split"]
    table = RichTable(title=f"{title}: parity with PyTorch ({result.parity['inputs']} inputs)")
    for col in ("format", "precision", "size MB", "max abs diff", "mean abs diff", "top-1 agree",
                f"{split} acc", "test acc", "test auc", "result"):
        table.add_column(col, justify="left" if col in ("format", "precision", "result") else "right")
    sizes = {a["path"]: a["size_mb"] for a in result.metadata["artifacts"]}
    ref = result.parity["reference"]["metrics"]
    table.add_row("pytorch", "fp32", "-", "-", "-", "-", _fmt(ref[split].get("acc")), _fmt(ref["test"].get("acc")),
                  _fmt(ref["test"].get("auc")), "reference")
    for r in result.parity["artifacts"]:
        metrics = r.get("metrics", {})
        table.add_row(r["format"], r["precision"], f"{sizes[r['path']]:.3f}" if r["path"] in sizes else "-",
                      *("-" if r.get(k) is None else f"{r[k]:.2e}" for k in ("max_abs_diff", "mean_abs_diff")),
                      "-" if r.get("top1_agreement") is None else f"{r['top1_agreement']:.2%}",
                      _fmt(metrics.get(split, {}).get("acc")), _fmt(metrics.get("test", {}).get("acc")),
                      _fmt(metrics.get("test", {}).get("auc")), "pass" if r["passed"] else "[red]dropped[/]")
    for r in result.parity.get("dropped", []):
        console.print(f"[yellow]not shipped:[/] {r['format']}/{r['precision']}: {escape('; '.join(r['failures']))}")
    for r in result.parity.get("too_slow", []):
        console.print(f"[yellow]not shipped:[/] {r['format']}/{r['precision']}: {escape(r['reason'])}")
    return table


@app.command()
def update(
    source: Path = typer.Argument(..., help="The deployed student: a bundle (its edgekd.json names the checkpoint) "
                                  "or a checkpoint."),
    recipe: Path = typer.Argument(..., help="A continual recipe whose first task is the student's."),
    out: Path = typer.Option(..., "--out", "-o", help="The new bundle directory."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a recipe key (repeatable)."),
    allow_forgetting: bool = typer.Option(False, "--allow-forgetting", help="Export even when an earlier task's "
                                          "retention is below the profile's min_retention."),
    target: Optional[Path] = typer.Option(None, "--target", "-t", help="Export profile YAML (default: the defaults)."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Continual run folder (default runs/<recipe name>-update-<--out folder name>)."),
) -> None:
    """Continual update of a deployed student: train the recipe's tasks from it, gate on retention, export with
    parity to a new bundle that records its parent bundle's sha256 (lineage)."""
    from edgekd.export import load_profile
    from edgekd.update import update_bundle

    profile = load_profile(target)
    result = with_progress(lambda log, bar: update_bundle(source, recipe, out, set_, run_dir, profile, allow_forgetting,
                                                         log=log, progress=bar))
    out_console.print(continual_table(result.continual.summary["name"], result.continual))
    out_console.print(parity_table(str(result.continual.best_path), result.export))
    console.print(f"wrote {out} (parent sha256 {result.lineage.get('parent_bundle_sha256') or '-'})")


@app.command()
def predict(
    bundle: Path = typer.Argument(..., help="An exported bundle (directory or .zip) from `edgekd export`."),
    inputs: list[str] = typer.Argument(..., help="Image files, folders (searched recursively; a DICOM series) or globs."),
    tta: bool = typer.Option(False, "--tta/--no-tta", help="Test-time augmentation with the bundle's views."),
    views: Optional[str] = typer.Option(None, "--views", help="TTA views to use, comma-separated (implies --tta)."),
    backend: str = typer.Option("openvino", "--backend", help="openvino or onnx."),
    precision: Optional[str] = typer.Option(None, "--precision", help=BUNDLE_PRECISION_HELP),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Inference threads (default: all cores)."),
    batch: int = typer.Option(16, "--batch", min=1, help="Images per inference call (bounds memory)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write predictions to a .csv or .json file."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="OpenVINO model cache: later runs start faster."),
    threshold: Optional[float] = typer.Option(None, "--threshold", min=0.0, max=1.0,
                                              help="Decision threshold on the positive class's calibrated probability "
                                                   "for this call (two-class bundles; default: the bundle's)."),
    task: Optional[str] = typer.Option(None, "--task", help="Multi-head bundle: the task whose head predicts "
                                       "(default: every task's prediction side by side)."),
    frame: Optional[int] = typer.Option(None, "--frame", min=1, help="Multi-frame DICOM: frame N only (default: all, file.dcm#frameN)."),
) -> None:
    """Classify images with a bundle, without PyTorch; a bad file is reported and skipped (exit 1 at the end).

    Probabilities are calibrated with the bundle's temperature (when it has one; the uncalibrated ones are shown
    beside them) and the label follows the bundle's operating point (its threshold, or the top class)."""
    from edgekd.runtime import Failure, Runner
    from edgekd.runtime.inputs import collect_inputs
    from edgekd.fileio import refuse_output_inside
    from edgekd.runtime.output import check_output_path

    if out is not None:
        check_output_path(out)
        refuse_output_inside(out, [bundle])
    tta_option = split_list(views) if views else tta
    runner = Runner.from_bundle(bundle, backend=backend, precision=precision, threads=threads, tta=tta_option,
                                cache_dir=cache_dir, threshold=threshold, task=task)
    paths, problems = collect_inputs(inputs, frame)
    for _, message in problems:
        console.print(f"[bold red]error:[/] {escape(error_line(message))}", soft_wrap=True)
    results = []
    with progress_bar() as progress:
        bar = progress.add_task("predict", total=len(paths))
        for result in runner.predict_many(paths, batch=batch):
            if isinstance(result, Failure):
                progress.console.print(f"[bold red]error:[/] {escape(error_line(result.error))}", soft_wrap=True)
            results.append(result)
            progress.advance(bar)
    results += [Failure(source, message) for source, message in problems]
    if runner.tasks and task is None:
        out_console.print(_task_predictions_table(bundle.name, runner, results))
    else:
        out_console.print(_predictions_table(bundle.name, runner, results, runner.precision, tta_option))
    failed = sum(isinstance(r, Failure) for r in results)
    if out is not None:
        _write_predict_output(out, results, runner, bundle, tta_option, task)
    if failed:
        console.print(f"[bold red]{failed} of {len(results)} input(s) failed[/]")
        raise typer.Exit(1)


def _write_predict_output(out: Path, results: list, runner, bundle: Path, tta_option, task: str | None) -> None:
    """`predict --out`: the CSV/JSON, its columns fixed by the runner (the same whichever files failed)."""
    from edgekd.runtime.output import write_predictions

    views = runner.tta_views.names if tta_option else []
    write_predictions(out, results, runner.class_names, {
        "bundle": str(bundle), **runner.info, "tta_views": views or None,
        "temperature": runner.temperature, "threshold": runner.threshold,
        **({"task": task, "tasks": dict(runner.tasks)} if runner.tasks else {})},
        runner.tasks if task is None else None, (views, runner.temperature != 1.0 or runner.bias is not None))
    console.print(f"wrote {out}")


def _task_predictions_table(title: str, runner, results: list) -> RichTable:
    """A multi-head bundle's predictions, every task's label and probability side by side."""
    from edgekd.runtime import Failure

    table = RichTable(title=f"{title}: {runner.info['format']} {runner.precision}, one head per task")
    table.add_column("file")
    for name, _ in runner.tasks:
        table.add_column(f"{name} label")
        table.add_column(f"{name} prob", justify="right")
    for r in results:
        cells = (["[red]error[/]", "-"] * len(runner.tasks) if isinstance(r, Failure) else
                 [c for name, _ in runner.tasks for c in (escape(r.tasks[name].label), f"{r.tasks[name].prob:.4f}")])
        table.add_row(escape(printable(r.source)), *cells)
    return table


def _predictions_table(title: str, runner, results: list, precision: str, tta_option) -> RichTable:
    """One row per image: label, probability (and uncalibrated), every class's probability."""
    from edgekd.runtime import Failure

    names = runner.class_names
    calibrated = runner.temperature != 1.0 or runner.bias is not None
    rule = (f", label: p({names[runner.positive]}) >= {runner.threshold:.6g}" if runner.threshold is not None
            else "")  # 6 significant digits: a 0.99999 threshold is not shown as 1.0000
    table = RichTable(title=f"{title}: {runner.info['format']} {precision}"
                            + (f", task {runner.task}" if runner.task else "")
                            + (f", TTA {'+'.join(runner.tta_views.names)}" if tta_option else "")
                            + (f", calibrated (T={runner.temperature:.3g}{', Platt' if runner.bias else ''})" if calibrated else "")
                            + rule)
    raw_cols = ["p(label) uncal."] if calibrated else []  # every class's uncalibrated probability: --out
    for col in ("file", "label", "p(label)", *raw_cols, *names):
        table.add_column(col, justify="left" if col in ("file", "label") else "right")
    for r in results:
        if isinstance(r, Failure):
            table.add_row(escape(printable(r.source)), "[red]error[/]", "-", *["-"] * (len(raw_cols) + len(names)))
        else:
            raw = [f"{r.raw_probs[r.index]:.4f}"] if r.raw_probs is not None else ["-"] * len(raw_cols)
            table.add_row(escape(printable(r.source)), escape(r.label), f"{r.prob:.4f}", *raw,
                          *[f"{p:.4f}" for p in r.probs])
    return table


@app.command()
def repository(
    bundle: Path = typer.Argument(..., help="An exported bundle (directory or .zip) from `edgekd export`."),
    kind: str = typer.Option(..., "--kind", help="triton (the bundle's ONNX model) or ovms (its OpenVINO IR)."),
    out: Path = typer.Option(..., "--out", "-o", help="The repository directory to write (new or empty)."),
    precision: Optional[str] = typer.Option(None, "--precision", help=BUNDLE_PRECISION_HELP),
    name: Optional[str] = typer.Option(None, "--name", help="Model name in the server (default: <model>_<precision>)."),
    max_batch: int = typer.Option(32, "--max-batch", min=1, help="Triton max_batch_size (dynamic batching)."),
    queue_delay_us: int = typer.Option(2000, "--queue-delay-us", min=0,
                                       help="Triton dynamic batching: longest wait to fill a batch (microseconds)."),
    base_path: str = typer.Option("/models", "--base-path", help="OVMS: where the repository is mounted in the "
                                  "server (config.json's base_path is <base-path>/<name>)."),
) -> None:
    """Write the model repository NVIDIA Triton or OpenVINO Model Server loads, from a verified bundle: the
    bundle's model files byte for byte, config.pbtxt / config.json, and a README with the preprocessing."""
    from edgekd.fileio import refuse_output_inside
    from edgekd.runtime.repository import write_repository

    refuse_output_inside(out, [bundle])
    repo = write_repository(bundle, kind, out, precision, name, max_batch, queue_delay_us, base_path)
    for rel, digest in repo.files.items():
        out_console.print(f"{escape(rel)}  sha256 {digest}")
    console.print(f"wrote {repo.kind} repository {out} (model '{repo.model_name}', README.md)")


@app.command()
def serve(
    bundle: Path = typer.Argument(..., help="An exported bundle (directory or .zip) from `edgekd export`."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (another host than localhost needs a token)."),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="TCP port."),
    backend: str = typer.Option("openvino", "--backend", help="openvino or onnx."),
    precision: Optional[str] = typer.Option(None, "--precision", help=BUNDLE_PRECISION_HELP),
    tta: bool = typer.Option(False, "--tta/--no-tta", help="Test-time augmentation with the bundle's views."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Inference threads (default: the bundle's)."),
    max_batch: int = typer.Option(8, "--max-batch", min=1, max=256, help="Most images per inference call."),
    max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", min=0, max=10_000,
                                      help="Longest wait for more requests to fill a batch."),
    max_queue: int = typer.Option(64, "--max-queue", min=1, help="Images waiting for the model before 503."),
    max_concurrency: int = typer.Option(256, "--max-concurrency", min=1,
                                        help="Open connections/requests before uvicorn answers 503."),
    max_upload_mb: float = typer.Option(64.0, "--max-upload-mb", min=0.001, help="Largest request body."),
    token: Optional[str] = typer.Option(None, "--token", envvar="EDGEKD_TOKEN", show_envvar=True,
                                        help="Require `Authorization: Bearer TOKEN` (not on /health)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="OpenVINO model cache: later starts are faster."),
    task: Optional[str] = typer.Option(None, "--task", help="Multi-head bundle: the task whose head answers "
                                       "(default: every task's prediction side by side)."),
) -> None:
    """Serve a bundle over HTTP without PyTorch: POST /predict, /predict/batch; GET /health, /metadata, /metrics.

    Requests from concurrent clients are batched (up to --max-batch images or --max-wait-ms); a full queue answers
    503, a bad upload a 4xx with a one-line JSON error. SIGTERM/SIGINT finish the requests in flight, then exit 0."""
    from edgekd.runtime import Runner
    from edgekd.serve import ServeSettings, check_port_free, check_settings, serve as run_service

    settings = ServeSettings(host=host, port=port, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                             max_concurrency=max_concurrency, token=token, max_upload_mb=max_upload_mb)
    check_settings(settings)
    check_port_free(host, port)
    runner = Runner.from_bundle(bundle, backend=backend, precision=precision, threads=threads, tta=tta,
                                cache_dir=cache_dir, task=task)
    console.print(f"serving {escape(str(bundle))} ({runner.info['format']} {runner.precision} on {backend}, {runner.info['threads'] or 'default'} "
                  f"threads{', TTA' if tta else ''}) at http://{host}:{port}" + (" (token required)" if token else ""))
    run_service(runner, settings)


@app.command()
def bench(
    source: Path = typer.Argument(..., help="A checkpoint (exported here first) or an exported bundle."),
    formats: Optional[str] = typer.Option(None, "--formats", help="Comma-separated: torch,onnx,openvino (default: "
                                          "all three; onnx,openvino where PyTorch is not installed)."),
    precision: str = typer.Option("fp32,int8", "--precision", help="Comma-separated: fp32,fp16,int8."),
    batch: str = typer.Option("1,8,32", "--batch", help="Comma-separated batch sizes."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Inference threads (default: all cores)."),
    tta: bool = typer.Option(False, "--tta/--no-tta", help="Every image in all its TTA views (one batched call)."),
    teacher: Optional[Path] = typer.Option(None, "--teacher", help="The teacher (checkpoint or bundle), benchmarked alike."),
    data: Optional[Path] = typer.Option(None, "--data", help="Score accuracy on this recipe's test split (default: the "
                                        "checkpoint's), or on a labelled folder DIR/<class name>/images (no PyTorch needed)."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a key of the --data recipe."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="With a bundle: its checkpoint, for the torch rows and MACs."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (default: bench/ beside the source)."),
    seconds: float = typer.Option(2.0, "--seconds", min=0, help="Minimum timed seconds per measurement."),
    min_runs: int = typer.Option(20, "--min-runs", min=1, help="Minimum timed calls per measurement."),
    warmup: int = typer.Option(10, "--warmup", min=0, help="Untimed calls before each measurement."),
    no_compile: bool = typer.Option(False, "--no-compile", help="Skip the torch.compile rows."),
    eval_limit: Optional[int] = typer.Option(None, "--eval-limit", min=1, help="Score a stratified, seeded subset of N test images."),
    profile: bool = typer.Option(False, "--profile", help="OpenVINO per-layer profile of every OpenVINO row."),
    keep_work: bool = typer.Option(False, "--keep-work", help="Keep <out>/work: worker jobs and results and the "
                                   "preprocessed copy of the scored images (removed after a run by default)."),
    parity_images: Optional[int] = typer.Option(None, "--parity-images", help="Parity images when exporting a checkpoint."),
    calib_images: Optional[int] = typer.Option(None, "--calib-images", help="INT8 calibration images when exporting."),
) -> None:
    """Latency (p50/p90/p99), throughput, size, peak RSS, MACs, accuracy/AUC and share of the GEMM peak per
    format x precision x batch, with PyTorch eager/compile and bare-runtime baselines; writes bench.json/.md/.png."""
    from importlib.util import find_spec

    from edgekd.bench.report import records_table
    from edgekd.bench.run import VARIANTS, BenchConfig, Timing, command_line, run_bench

    folder = data if data is not None and data.is_dir() else None
    if set_ and (data is None or folder is not None):
        raise EdgeKDError("--set needs --data RECIPE (it overrides the data recipe)")
    data_recipe = None
    if data is not None and folder is None:
        from edgekd.recipe import load_recipe

        data_recipe = load_recipe(data, set_)
    formats = formats or ("torch,onnx,openvino" if find_spec("torch") is not None else "onnx,openvino")
    variants = {**VARIANTS, "torch": ("eager",)} if no_compile else VARIANTS
    out = out or source.parent / "bench"  # beside a bundle folder, never inside it
    config = BenchConfig(source=source, out=out, formats=formats, precisions=precision, batches=batch, threads=threads,
                         tta=tta, teacher=teacher, data_recipe=data_recipe, checkpoint=checkpoint,
                         timing=Timing(warmup=warmup, min_runs=min_runs, min_seconds=seconds), variants=variants,
                         eval_limit=eval_limit, profile=profile, command=command_line(), data_folder=folder,
                         export_options={"parity_images": parity_images, "calib_images": calib_images},
                         keep_work=keep_work)
    result = with_progress(lambda log, bar: run_bench(config, log=log, progress=bar))
    gemm = result.summary.get("gemm") or {}
    title = f"{source}: {result.summary['threads']} thread(s)" + (
        f", FP32 GEMM peak {gemm['peak_gflops']:.1f} GFLOP/s" if gemm.get("peak_gflops") else "")
    out_console.print(records_table(result.records, title))
    for r in {(r["role"], r["format"], r["precision"], r["variant"]): r for r in result.records
              if r["status"] != "ok"}.values():
        console.print(f"n/a: {r['role']} {r['format']} {r['precision']} {r['variant']}: {r['reason']}")
    console.print(f"wrote {', '.join(str(out / name) for name in result.written)}")


@app.command()
def report(
    runs: list[Path] = typer.Argument(..., help="Run directories (holding best.pt) or checkpoints to compare."),
    out: Path = typer.Option(Path("runs/report"), "--out", "-o", help="Output directory."),
    split: str = typer.Option("test", "--split", help="The split to evaluate every model on."),
) -> None:
    """KD report: one table per dataset (baseline, teacher, student from scratch, distilled student) with
    params, MACs, acc, AUC, F1, sensitivity, specificity, pAUC; writes report.md/.json and ROC/confusion PNGs."""
    from edgekd.distill.report import comparison_report
    from edgekd.fileio import refuse_output_inside

    refuse_output_inside(out, [r for r in runs if not r.is_dir()])  # a run folder may hold its report
    if split not in ("train", "val", "test"):
        raise EdgeKDError(f"--split: unknown split '{split}' (use train, val, test)")
    result = comparison_report(runs, out, split)
    out_console.print(result["markdown"])
    console.print(f"wrote {out / 'report.md'}, {out / 'report.json'} and plots")


@app.command()
def explain(
    checkpoint: Path = typer.Argument(..., help="A checkpoint (best.pt) written by `edgekd train`."),
    images: list[Path] = typer.Argument(..., help="Image files to explain."),
    layer: Optional[str] = typer.Option(None, "--layer", help="Module path of the target layer (default: the last "
                                        "feature stage in timm's feature_info with a map of at least 3x3)."),
    target: Optional[str] = typer.Option(None, "--target", help="Class name or id to explain (default: the predicted)."),
    out: Path = typer.Option(Path("runs/explain"), "--out", "-o", help="Output directory."),
) -> None:
    """Grad-CAM: writes <image>_gradcam.png heat-map overlays and explain.json (prediction, target, CAM peak)."""
    from edgekd.explain.gradcam import explain_files
    from edgekd.fileio import refuse_output_inside

    refuse_output_inside(out, [checkpoint])
    records = explain_files(checkpoint, images, out, layer, target)
    for r in records:
        out_console.print(f"{r['file']}: predicted {r['predicted']} ({r['prob']:.3f}), Grad-CAM of {r['target']} "
                          f"at {r['layer']} -> {out / r['overlay']}")
    console.print(f"wrote {len(records)} overlay(s) and {out / 'explain.json'}")


def run() -> None:
    """Entry point: EdgeKDError, and OS and resource errors that name their cause, -> one `error:` line on stderr
    and exit 2 (traceback only with --debug); anything unforeseen -> one line naming its type, exit 1."""
    install_process_guards()
    STATE["on_interrupt"] = None  # set by the command this run starts (train)
    try:
        code = app(standalone_mode=False)
    except EdgeKDError as err:
        if STATE["debug"]:
            raise
        fail(error_line(str(err), err.multiline))
    except KeyboardInterrupt:
        say_interrupted()
        stopped(130)
    except SystemExit as ex:
        if RECEIVED_SIGNALS:  # raised by _exit_on_signal
            say_interrupted()
            stopped(ex.code if isinstance(ex.code, int) else 128 + RECEIVED_SIGNALS[0])
        raise
    except typer.Exit as ex:
        sys.exit(ex.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as err:  # usage errors of typer's (vendored) click, and anything unforeseen
        if hasattr(err, "show") and isinstance(getattr(err, "exit_code", None), int):
            err.show()
            sys.exit(err.exit_code)
        if STATE["debug"]:
            raise
        known = known_failure(err)
        if known is not None:
            fail(error_line(known))
        detail = f": {error_line(str(err))}" if str(err) else ""
        console.print(f"[bold red]error:[/] {type(err).__name__}{escape(detail)} (run with --debug for the traceback)",
                      soft_wrap=True)
        sys.exit(1)
    if RECEIVED_SIGNALS:  # a kill whose exception a finalizer swallowed: still not a success
        say_interrupted()
        stopped(128 + RECEIVED_SIGNALS[0])
    # Outside standalone mode click returns a command's `typer.Exit(code)` instead of exiting with it.
    if isinstance(code, int) and code:
        sys.exit(code)


def stopped(code: int) -> None:
    """End a run that a signal stopped: the exit handlers (temp-dir fallbacks) run, then the process exits at once.
    Interpreter shutdown would join non-daemon threads of the dependencies, and one stopped while it held the
    import lock never finishes (seen as an export hanging after SIGINT)."""
    import atexit

    from edgekd.fileio import remove_tracked_trees

    remove_tracked_trees()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def fail(line: str) -> None:
    """Print `error: <line>` on stderr (escaped: a file name like scan[left].png is not rich markup), exit 2."""
    console.print(f"[bold red]error:[/] {escape(line)}", soft_wrap=True)
    sys.exit(2)


def known_failure(err: BaseException) -> str | None:
    """The one-line message of an error whose cause the user can act on (a path's permission, a full disk, a
    package the install lacks, an input nested too deeply, memory), else None."""
    if isinstance(err, OSError) and (err.filename is not None or err.strerror):
        name = err.filename
        name = os.fsdecode(name) if isinstance(name, (str, bytes, os.PathLike)) else str(name)  # an fd is an int
        where = f"{printable(name)}: " if err.filename is not None else ""
        return f"{where}{(err.strerror or type(err).__name__).lower()}"
    if isinstance(err, ModuleNotFoundError) and err.name:  # e.g. a training-side command on the core install
        return (f"this needs the Python package '{err.name.split('.')[0]}', which is not installed (training, export "
                "and checkpoints need the train extra: pip install 'edgekd[train]')")
    if isinstance(err, RecursionError):
        return "input nested too deeply (Python's recursion limit): a self-referencing recipe or file?"
    if isinstance(err, MemoryError):
        return "out of memory (an input too large for this machine)"
    return None


def install_process_guards() -> None:
    """Make the process end cleanly whatever stops it: SIGTERM/SIGHUP raise SystemExit and SIGINT
    KeyboardInterrupt, so `finally` blocks and exit handlers remove temp dirs and half-written files, and every
    one is recorded so the exit status says the run was stopped; warnings of
    dependencies become one `warning:` line each (once); undecodable file names print as escapes."""
    from edgekd.fileio import STOP_SIGNALS

    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler, None):
            try:
                signal.signal(sig, _exit_on_signal)
            except ValueError:  # not the main thread (an embedding application): its signals are its own
                pass
    warnings.showwarning = _one_line_warning
    sys.unraisablehook = _stop_if_swallowed
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError, OSError):  # not a text stream we may reconfigure
            pass


RECEIVED_SIGNALS: list[int] = []
"""Signals this process was sent: their exception can be lost (raised inside a finalizer or a `__del__`, Python
prints and drops it), so `run` exits 128 + signum even when the command ran on to its end."""


def _exit_on_signal(signum, _frame) -> None:
    from edgekd.fileio import TRACKED_TREES

    RECEIVED_SIGNALS.append(signum)
    if TRACKED_TREES:
        # An export is under way: its exception would unwind through native callbacks (torch's ONNX exporter,
        # NNCF, OpenVINO) that may crash (SIGSEGV) or abort (C++ terminate) instead, and everything it would clean
        # up is in its tracked temp dirs: remove them and end here.
        say_interrupted()
        stopped(128 + signum)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def _stop_if_swallowed(unraisable) -> None:
    """sys.unraisablehook: a stop signal's exception raised where Python cannot propagate it (a finalizer, an import
    lock's callback) ends the run here, as `run` would have, instead of a printed traceback and a run that goes on."""
    if RECEIVED_SIGNALS and isinstance(unraisable.exc_value, (KeyboardInterrupt, SystemExit)):
        say_interrupted()
        stopped(128 + RECEIVED_SIGNALS[0])  # does not return
        return
    sys.__unraisablehook__(unraisable)


_WARNED: set[tuple[str, str]] = set()


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    text = error_line(str(message).strip().splitlines()[0] if str(message).strip() else category.__name__)
    if (category.__name__, text) in _WARNED:
        return
    _WARNED.add((category.__name__, text))
    console.print(f"[yellow]warning:[/] {escape(text)}", soft_wrap=True)


if __name__ == "__main__":
    run()
