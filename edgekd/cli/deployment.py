"""The deployment-side commands: export, update, predict, repository, serve, bench (predict, repository, serve
and a bundle's bench run without PyTorch)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from edgekd.cli.console import (BUNDLE_PRECISION_HELP, STATE, checkpoint_argument, console, out_console, progress_bar,
                                with_progress)
from edgekd.cli.tables import continual_table, model_run, parity_table, predictions_table, task_predictions_table
from edgekd.errors import EdgeKDError, error_line, printable
from edgekd.fileio import held_output
from edgekd.options import given_list


def probability_option(value: Optional[float]) -> Optional[float]:
    """A probability option (--threshold): a number in [0, 1]; NaN is named as not a number (click's range check
    had said 'less than or equal to 1')."""
    if value is not None and not 0.0 <= value <= 1.0:
        raise typer.BadParameter(f"{value}: not a number" if value != value else f"{value} is outside [0, 1]")
    return value


def export(
    checkpoint: Path = typer.Argument(..., callback=checkpoint_argument, help="A checkpoint (best.pt) written by "
                                      "`edgekd train`, or its run folder."),
    format_: Optional[str] = typer.Option(None, "--format", "-f", help="Comma-separated: onnx,openvino (default: the profile's)."),
    precision: Optional[str] = typer.Option(None, "--precision", "-p", help="Comma-separated: fp32,fp16,int8 (default: the profile's)."),
    target: Optional[Path] = typer.Option(None, "--target", "-t", help="Export profile: a YAML file or a shipped "
                                          "profile's name (cpu-all, cpu-onnx-fp32, cpu-openvino-fp16, cpu-openvino-int8)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Bundle directory (default: <checkpoint dir>/bundle)."),
    zip_: bool = typer.Option(False, "--zip", help="Also write <out>.zip."),
    parity_images: Optional[int] = typer.Option(None, "--parity-images", help="Validation images in the parity gate (default 64)."),
    calib_images: Optional[int] = typer.Option(None, "--calib-images", help="Training images for INT8 calibration (default 300)."),
    metric_images: Optional[int] = typer.Option(None, "--metric-images", help="Score each artifact on N val "
                                                "and N test images (stratified) for the ACC/AUC gate (default: whole "
                                                "splits; fewer is faster and coarser). Calibration, the decision "
                                                "threshold and PyTorch's figures use the whole splits."),
    accuracy_control: bool = typer.Option(False, "--accuracy-control", help="OpenVINO INT8 with NNCF accuracy "
                                          "control (max drop from the profile)."),
    no_accuracy_control: bool = typer.Option(False, "--no-accuracy-control", help="Without it, whatever the profile "
                                             "says."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for parity runs and the bundle's runtime hint."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a key of the checkpoint's recipe (e.g. data.path=...; not its preprocessing)."),
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
    formats, precisions = given_list(format_, "--format"), given_list(precision, "--precision")
    int8 = "int8" in [p.lower() for p in precisions or profile.precisions]  # the plan lowercases them (-p INT8)
    openvino_int8 = int8 and "openvino" in [f.lower() for f in formats or profile.formats]
    for option, given, applies, to in (("--calib-images", calib_images is not None, int8, "INT8"),
                                       ("--accuracy-control", accuracy_control, openvino_int8, "OpenVINO INT8")):
        if given and not applies:  # ignored without a word before
            console.print(f"[yellow]warning:[/] {option} applies to {to}, which this export does not build: ignored")
    out = out or checkpoint.parent / "bundle"
    with held_output(out, "export"):  # a second export into it now is refused (each had said "wrote" it)
        result = with_progress(lambda log, bar: export_checkpoint(
            checkpoint, out, formats, precisions, profile, zip_, set_, log=log,
            allow_forgetting=allow_forgetting, progress=bar))
    out_console.print(parity_table(str(checkpoint), result))


def update(
    source: Path = typer.Argument(..., help="The deployed student: a bundle (its edgekd.json names the checkpoint) "
                                  "or a checkpoint."),
    recipe: Path = typer.Argument(..., help="A continual recipe whose first task is the student's."),
    out: Path = typer.Option(..., "--out", "-o", help="The new bundle directory."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a recipe key (repeatable)."),
    allow_forgetting: bool = typer.Option(False, "--allow-forgetting", help="Export even when an earlier task's "
                                          "retention is below the profile's min_retention."),
    target: Optional[Path] = typer.Option(None, "--target", "-t", help="Export profile: a YAML file or a shipped profile's name "
                                          "(default: the parent's export settings, as its edgekd.json records them; else the defaults)."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Continual run folder, new or empty (default "
                                           "runs/<recipe name>-update-<--out folder name>, or -2, -3, ... when taken)."),
    zip_: bool = typer.Option(False, "--zip", help="Also write <out>.zip (as export --zip)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the continual run an interrupted update left in "
                                "--run-dir (named by the log's 'update: continual training ... into' line and by "
                                "Ctrl-C's hint)."),
) -> None:
    """Continual update of a deployed student: train the recipe's tasks from it, gate on retention, export with
    parity to a new bundle that records its parent bundle's sha256 (lineage)."""
    from edgekd.export import load_profile
    from edgekd.update import update_bundle

    profile = load_profile(target) if target is not None else None  # None: the parent's
    def hint(folder: Path) -> None:  # Ctrl-C says how to go on
        again = shlex.join(["edgekd", "update", str(source), str(recipe), "--out", str(out), "--resume", "--run-dir",
                            str(folder), *[a for o in set_ for a in ("--set", o)],
                            *(["--target", str(target)] if target else []), *(["--zip"] if zip_ else []),
                            *(["--allow-forgetting"] if allow_forgetting else [])])
        STATE["on_interrupt"] = lambda: f"resume it: {again}" if folder.exists() else None

    with held_output(out, "update"):  # a second update into it now is refused (both had said "wrote" it)
        result = with_progress(lambda log, bar: update_bundle(source, recipe, out, set_, run_dir, profile,
                                                             allow_forgetting, log=log, progress=bar, zip_bundle=zip_,
                                                             resume=resume, on_run_dir=hint))
    out_console.print(continual_table(result.continual.summary["name"], result.continual))
    out_console.print(parity_table(str(result.continual.best_path), result.export))
    parent = result.lineage.get("parent_bundle_sha256")
    console.print(escape(f"wrote {out} " + (f"(parent sha256 {parent})" if parent else
                                            "(from a checkpoint: no parent bundle)")))


def predict(
    bundle: Path = typer.Argument(..., help="An exported bundle (directory or .zip) from `edgekd export`."),
    inputs: list[str] = typer.Argument(..., help="Image files, folders (searched recursively; a DICOM series) or globs."),
    tta: Optional[bool] = typer.Option(None, "--tta/--no-tta", help="Test-time augmentation with the bundle's views "
                                       "(default: off)."),
    views: Optional[str] = typer.Option(None, "--views", help="TTA views to use, comma-separated (implies --tta)."),
    backend: str = typer.Option("openvino", "--backend", help="openvino or onnx."),
    precision: Optional[str] = typer.Option(None, "--precision", help=BUNDLE_PRECISION_HELP),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Inference threads (default: the bundle's "
                                          "hint, at most the cores; else the engine's default)."),
    batch: int = typer.Option(16, "--batch", min=1, help="Images per inference call (bounds memory)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write predictions to a .csv or .json file; `-`: "
                                       "the JSON document on stdout (no table), for a pipe (`| jq`)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="OpenVINO model cache: later runs start faster."),
    threshold: Optional[float] = typer.Option(None, "--threshold", callback=probability_option, metavar="[0..1]",
                                              help="Decision threshold on the positive class's calibrated probability "
                                                   "for this call (two-class bundles; default: the bundle's)."),
    task: Optional[str] = typer.Option(None, "--task", help="Multi-head bundle: the task whose head predicts "
                                       "(default: every task's prediction side by side)."),
    frame: Optional[int] = typer.Option(None, "--frame", min=1, help="Multi-frame DICOM: frame N only (default: all, file.dcm#frameN)."),
) -> None:
    """Classify images with a bundle, without PyTorch; a bad file is reported and skipped (exit 1 at the end).

    Probabilities are calibrated with the bundle's temperature (when it has one; the uncalibrated ones are shown
    beside them) and the label follows the bundle's operating point (its threshold, or the top class)."""
    from edgekd.fileio import refuse_output_inside, to_jsonable
    from edgekd.runtime import Failure, Runner
    from edgekd.runtime.output import check_output_path, predictions_document

    to_stdout = out is not None and str(out) == "-"
    if out is not None and not to_stdout:
        out = check_output_path(out)  # a symlinked --out: the file it points to
        refuse_output_inside(out, [bundle])
    if views is not None and tta is False:
        raise EdgeKDError("--views with --no-tta: --views runs those views (it implies --tta); give one of the two")
    tta_option = given_list(views, "--views") if views is not None else bool(tta)
    runner = Runner.from_bundle(bundle, backend=backend, precision=precision, threads=threads, tta=tta_option,
                                cache_dir=cache_dir, threshold=threshold, task=task)
    say_runner_notes(runner, threads)
    paths, problems = _predict_inputs(inputs, frame)
    results = _predictions(runner, paths, batch) + [Failure(source, message) for source, message in problems]
    if to_stdout:  # the data on stdout, nothing else there (notes and errors go to stderr)
        document = predictions_document(results, runner.class_names, _predict_info(runner, bundle, tta_option, task))
        out_console.print(json.dumps(to_jsonable(document), indent=2), markup=False, highlight=False, soft_wrap=True)
    else:
        if out is not None:  # first: a table that cannot be printed (a closed pipe) does not lose the run's results
            _write_predict_output(out, results, runner, bundle, tta_option, task)
        out_console.print(task_predictions_table(bundle.name, runner, results) if runner.tasks and task is None
                          else predictions_table(bundle.name, runner, results, runner.precision, tta_option))
    failed = sum(isinstance(r, Failure) for r in results)
    if failed:
        console.print(f"[bold red]{failed} of {len(results)} input(s) failed[/]")
        raise typer.Exit(1)


def _predictions(runner, paths: list, batch: int) -> list:
    """`runner.predict_many` under a progress bar, each failure and warning said as it comes."""
    from edgekd.runtime import Failure

    results = []
    with progress_bar() as progress:
        bar = progress.add_task("predict", total=len(paths))
        for result in runner.predict_many(paths, batch=batch):
            if isinstance(result, Failure):
                progress.console.print(f"[bold red]error:[/] {escape(error_line(result.error))}", soft_wrap=True)
            elif _warning(result):
                progress.console.print(f"[yellow]warning:[/] {escape(printable(result.source))}: "
                                       f"{escape(_warning(result))}", soft_wrap=True)
            results.append(result)
            progress.advance(bar)
    return results


def say_runner_notes(runner, threads: int | None = None) -> None:
    """`runner_notes`, each printed as a note; `threads` (--threads) capped to the cores is one too."""
    from edgekd.runtime import runner_notes

    used = runner.info.get("threads")
    capped = [f"--threads {threads} is more than the {used} cores this process may use: {used} used"
              if threads and used and used < threads else None]
    for note in [*filter(None, capped), *runner_notes(runner)]:
        console.print(f"note: {escape(note)}", soft_wrap=True)


def _predict_inputs(inputs: list[str], frame: int | None) -> tuple[list, list[tuple[str, str]]]:
    """`collect_inputs`, saying what it could not find and how many files of the folders it does not read."""
    from edgekd.imageio import IMAGE_SUFFIXES, DicomFrame, is_dicomdir
    from edgekd.runtime.inputs import collect_inputs

    left_out: list[Path] = []
    repeated: list[Path] = []
    paths, problems = collect_inputs(inputs, frame, left_out, repeated)
    if repeated:  # a link in a folder to a file also given: one row, said (the link had vanished without a word)
        console.print(f"note: {len(repeated)} input(s) reach a file already given (twice, or through a link), "
                      f"predicted once, e.g. {escape(str(repeated[0]))}", soft_wrap=True)
    indexes = [p for p in left_out if is_dicomdir(p)]
    others = [p for p in left_out if p not in indexes]
    if indexes:  # a DICOM file set's index: DICOM, but no image
        console.print(f"note: {len(indexes)} DICOMDIR file(s) left out (the index of a DICOM file set, not an image), "
                      f"e.g. {escape(str(indexes[0]))}", soft_wrap=True)
    if others:  # a clinic export's odd names (a PNG without suffix) would otherwise go unnoticed
        console.print(f"note: {len(others)} file(s) in the folders and patterns given are not read: neither an image suffix "
                      f"({', '.join(sorted(IMAGE_SUFFIXES))}) nor DICOM, e.g. {escape(str(others[0]))}",
                      soft_wrap=True)
    if frame is not None and not any(isinstance(p, DicomFrame) for p in paths):  # it had been ignored without a word
        console.print(f"note: --frame {frame} picks a frame of a multi-frame DICOM, and none is among the inputs: "
                      "each file is read whole", soft_wrap=True)
    for _, message in problems:
        console.print(f"[bold red]error:[/] {escape(error_line(message))}", soft_wrap=True)
    return paths, problems


def _warning(result) -> str | None:
    """A prediction's warning (a multi-head result's: its tasks share the image, so the first task's)."""
    parts = list(result.tasks.values()) if hasattr(result, "tasks") and isinstance(result.tasks, dict) else [result]
    return next((p.warning for p in parts if getattr(p, "warning", None)), None)


def _write_predict_output(out: Path, results: list, runner, bundle: Path, tta_option, task: str | None) -> None:
    """`predict --out`: the CSV/JSON, its columns fixed by the runner (the same whichever files failed)."""
    from edgekd.runtime.output import write_predictions

    views = runner.tta_views.names if tta_option else []
    write_predictions(out, results, runner.class_names, _predict_info(runner, bundle, tta_option, task),
                      runner.tasks if task is None else None,
                      (views, runner.temperature != 1.0 or runner.bias is not None))
    console.print(escape(f"wrote {out}"))


def _predict_info(runner, bundle: Path, tta_option, task: str | None) -> dict:
    """The run's settings a predictions file carries beside the predictions."""
    views = runner.tta_views.names if tta_option else []
    return {"bundle": str(bundle), **runner.info, "tta_views": views or None, "temperature": runner.temperature,
            "threshold": runner.threshold,  # on the positive class's probability: named beside it
            **({"positive_class": runner.class_names[runner.positive]} if runner.threshold is not None else {}),
            **({"task": task, "tasks": dict(runner.tasks)} if runner.tasks else {})}


def repository(
    bundle: Path = typer.Argument(..., help="An exported bundle (directory or .zip) from `edgekd export`."),
    kind: str = typer.Option(..., "--kind", help="triton (the bundle's ONNX model) or ovms (its OpenVINO IR)."),
    out: Path = typer.Option(..., "--out", "-o", help="The repository directory to write (new or empty; with --add, "
                             "an existing repository)."),
    precision: Optional[str] = typer.Option(None, "--precision", help=BUNDLE_PRECISION_HELP),
    name: Optional[str] = typer.Option(None, "--name", help="Model name in the server (default: <model>_<precision>; "
                                       "an update or multi-head bundle: <model>_<N>out_<precision>)."),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", min=1, help="Triton max_batch_size (dynamic "
                                            "batching; default 32)."),
    queue_delay_us: Optional[int] = typer.Option(None, "--queue-delay-us", min=0, help="Triton dynamic batching: "
                                                 "longest wait to fill a batch (microseconds; default 2000)."),
    base_path: Optional[str] = typer.Option(None, "--base-path", help="OVMS: where the repository is mounted in the "
                                            "server (config.json's base_path is <base-path>/<name>; default /models)."),
    version: int = typer.Option(1, "--version", min=1, help="The model's version folder (an update of a served "
                                "model: the same --name, the next version)."),
    add: bool = typer.Option(False, "--add", help="Add the model to the repository at --out (one written by edgekd "
                             "repository): another --name, or the next --version of one it serves."),
) -> None:
    """Write the model repository NVIDIA Triton or OpenVINO Model Server loads, from a verified bundle: the
    bundle's model files byte for byte, config.pbtxt / config.json, and a README with the preprocessing."""
    from edgekd.fileio import refuse_output_inside
    from edgekd.runtime import is_bundle
    from edgekd.runtime.repository import write_repository

    if is_bundle(bundle):  # else write_repository says what `bundle` is (a folder of runs was 'the input' of --out)
        refuse_output_inside(out, [bundle])
    done: list = []  # a stop that lands while the model is put in place is delivered after: say it had finished
    STATE["on_interrupt"] = lambda: (f"it had finished: model '{done[0].model_name}' version {version} is in {out}"
                                     if done else None)
    repo = write_repository(bundle, kind, out, precision, name, max_batch, queue_delay_us, base_path,
                            version=version, add=add, on_published=done.append)  # None: its defaults
    for rel, digest in repo.files.items():
        out_console.print(f"{escape(rel)}  sha256 {digest}")
    for note in repo.notes:
        console.print(f"warning: {escape(note)}")
    console.print(escape(f"added model '{repo.model_name}' to the {repo.kind} repository {out} ({repo.readme})"
                         if add else f"wrote {repo.kind} repository {out} (model '{repo.model_name}', {repo.readme})"))


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
                                        help="Requests answered at once before a 503 (/health aside; idle "
                                             "connections do not count)."),
    max_upload_mb: float = typer.Option(64.0, "--max-upload-mb", min=0.001, help="Largest request body, in MiB (2^20 bytes)."),
    max_inflight_mb: float = typer.Option(1024.0, "--max-inflight-mb", min=0.001, help="Request bodies held at once "
                                          "(every request being answered) before a 503."),
    upload_timeout: float = typer.Option(15.0, "--upload-timeout", min=0.1, help="Seconds a request body may go "
                                         "without a byte before a 408."),
    max_megapixels: float = typer.Option(64.0, "--max-megapixels", help="Largest image decoded, in millions of "
                                         "pixels, from its header (at most 64; larger: a 422)."),
    threshold: Optional[float] = typer.Option(None, "--threshold", callback=probability_option, metavar="[0..1]",
                                              help="Decision threshold on the positive class's calibrated probability "
                                                   "(two-class bundles; default: the bundle's)."),
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
                             max_concurrency=max_concurrency, token=token, max_upload_mb=max_upload_mb,
                             max_inflight_mb=max_inflight_mb, upload_timeout_s=upload_timeout,
                             max_megapixels=max_megapixels)
    check_settings(settings)
    check_port_free(host, port)
    runner = Runner.from_bundle(bundle, backend=backend, precision=precision, threads=threads, tta=tta,
                                cache_dir=cache_dir, task=task, threshold=threshold)
    say_runner_notes(runner, threads)
    url_host = f"[{host}]" if ":" in host else host  # an IPv6 address in a URL goes in brackets
    console.print(f"serving {escape(str(bundle))} ({model_run(runner, runner.precision)}, "
                  f"{runner.info['threads'] or 'default'} threads{', TTA' if tta else ''}"
                  f"{f', task {escape(runner.task)}' if runner.task else ', every task' if runner.bundle.tasks else ''})"
                  f" at http://{url_host}:{port}"
                  + (" (token required)" if token else ""))
    run_service(runner, settings)


def bench(
    source: Path = typer.Argument(..., help="A checkpoint (exported here first) or an exported bundle."),
    formats: Optional[str] = typer.Option(None, "--formats", "--format", "-f", help="Comma-separated: "
                                          "torch,onnx,openvino (default: all three; onnx,openvino where PyTorch is "
                                          "not installed)."),
    precision: Optional[str] = typer.Option(None, "--precision", "-p", help="Comma-separated: fp32,fp16,int8 "
                                            "(default: a bundle's own, fp32,int8 for a checkpoint)."),
    batch: str = typer.Option("1,8,32", "--batch", help="Comma-separated batch sizes."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Inference threads (default: all cores)."),
    tta: bool = typer.Option(False, "--tta/--no-tta", help="Every image in all its TTA views (one batched call)."),
    teacher: Optional[Path] = typer.Option(None, "--teacher", help="The teacher (checkpoint or bundle), benchmarked alike."),
    data: Optional[Path] = typer.Option(None, "--data", help="Score accuracy on this recipe's test split (default: the "
                                        "checkpoint's), or on a labelled folder DIR/<class name>/images (no PyTorch needed)."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a key of the --data recipe."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="With a bundle: its checkpoint, for the torch rows and MACs."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (default: bench/ in a checkpoint's "
                                       "run folder, <bundle>-bench/ beside a bundle)."),
    seconds: float = typer.Option(2.0, "--seconds", min=0, help="Minimum timed seconds per measurement."),
    min_runs: int = typer.Option(20, "--min-runs", min=1, help="Minimum timed calls per measurement."),
    warmup: int = typer.Option(10, "--warmup", min=0, help="Untimed calls before each measurement; the "
                                "first call is always one (timed alone: first_call_ms)."),
    no_compile: bool = typer.Option(False, "--no-compile", help="Skip the torch.compile rows."),
    eval_limit: Optional[int] = typer.Option(None, "--eval-limit", min=1, help="Score a stratified, seeded subset of N test images."),
    profile: bool = typer.Option(False, "--profile", help="OpenVINO per-layer profile of each bare OpenVINO row, "
                                 "at its largest batch (in bench.json)."),
    keep_work: bool = typer.Option(False, "--keep-work", help="Keep <out>/work: worker jobs and results and the "
                                   "preprocessed copy of the scored images (removed after a run by default)."),
    parity_images: Optional[int] = typer.Option(None, "--parity-images", help="Parity images when exporting a checkpoint."),
    calib_images: Optional[int] = typer.Option(None, "--calib-images", help="INT8 calibration images when exporting."),
) -> None:
    """Latency (p50/p90/p99), throughput, size, peak RSS, MACs, accuracy/AUC and share of the GEMM peak per
    format x precision x batch, with PyTorch eager/compile and bare-runtime baselines; writes bench.json/.md/.png."""
    from importlib.util import find_spec

    from edgekd.bench.run import VARIANTS, BenchConfig, Timing, command_line, default_bench_out, run_bench

    folder, data_recipe = _bench_data(source, data, set_, checkpoint, eval_limit)
    _refuse_unused_export_options(source, teacher, parity_images, calib_images)
    formats = formats or ("torch,onnx,openvino" if find_spec("torch") is not None else "onnx,openvino")
    variants = {**VARIANTS, "torch": ("eager",)} if no_compile else VARIANTS
    out = out or default_bench_out(source)  # beside a bundle, never inside it
    config = BenchConfig(source=source, out=out, formats=formats, precisions=precision, batches=batch, threads=threads,
                         tta=tta, teacher=teacher, data_recipe=data_recipe, checkpoint=checkpoint,
                         timing=Timing(warmup=warmup, min_runs=min_runs, min_seconds=seconds), variants=variants,
                         eval_limit=eval_limit, profile=profile, command=command_line(), data_folder=folder,
                         export_options={"parity_images": parity_images, "calib_images": calib_images},
                         keep_work=keep_work)
    result = with_progress(lambda log, bar: run_bench(config, log=log, progress=bar))
    _say_bench_result(source, out, result)


def _say_bench_result(source: Path, out: Path, result) -> None:
    """The records table, then the notes (the GEMM peak's, each subject's), the n/a rows and the files written."""
    from edgekd.bench.report import gemm_over_peak_note, gemm_spread_note, records_table

    gemm = result.summary.get("gemm") or {}
    title = f"{source}: {result.summary['threads']} thread(s)" + (
        f", FP32 GEMM peak {gemm['peak_gflops']:.1f} GFLOP/s{gemm_spread_note(gemm)}" if gemm.get("peak_gflops")
        else "")
    out_console.print(records_table(result.records, title))
    if note := gemm_over_peak_note(result.records):
        console.print(f"note: {note}")
    for subject in result.summary.get("subjects", []):  # e.g. why a bundle alone has no accuracy (they were only
        for note in subject.get("notes", []):              # in bench.json)
            console.print(f"note: {escape(subject['role'])} {escape(str(subject['model']))}: {escape(note)}")
    for r in {(r["role"], r["format"], r["precision"], r["variant"]): r for r in result.records
              if r["status"] != "ok"}.values():
        console.print(escape(f"n/a: {r['role']} {r['format']} {r['precision']} {r['variant']}: {r['reason']}"))
    console.print(escape(f"wrote {', '.join(str(out / name) for name in result.written)}"))
    if failed := result.summary.get("failed_rows"):  # a crashed or timed-out worker is not a row the bundle lacks
        console.print(f"[bold red]{len(failed)} row(s) failed[/] (bench.json lists them in failed_rows)")
        raise typer.Exit(1)


def _refuse_unused_export_options(source: Path, teacher: Optional[Path], parity_images: Optional[int],
                                  calib_images: Optional[int]) -> None:
    """--parity-images/--calib-images set how a checkpoint is exported: with bundles only they had been ignored."""
    from edgekd.runtime import is_bundle

    exported = [p for p in (source, teacher) if p is not None and not is_bundle(p)]
    if (parity_images is not None or calib_images is not None) and not exported:
        raise EdgeKDError("--parity-images/--calib-images set how a checkpoint is exported: "
                          f"{'the source and teacher are bundles' if teacher else 'the source is a bundle'}, "
                          "nothing is exported here")


def _bench_data(source: Path, data: Optional[Path], set_: list[str], checkpoint: Optional[Path],
                eval_limit: Optional[int]):
    """`edgekd bench`'s scored images: (a labelled folder, a data recipe), either or neither."""
    from edgekd.runtime import is_bundle

    if data is not None and not data.exists():  # it had said "recipe file not found" of a mistyped folder
        raise EdgeKDError(f"--data {data}: no such file or folder (a data recipe, or a labelled image folder)")
    folder = data if data is not None and data.is_dir() else None
    if set_ and (data is None or folder is not None):
        raise EdgeKDError("--set needs --data RECIPE (it overrides the data recipe)")
    if eval_limit is not None and data is None and checkpoint is None and is_bundle(source):  # it was ignored
        raise EdgeKDError(f"--eval-limit: {source} is a bundle, which holds no test images; give --data RECIPE|DIR "
                          "or --checkpoint (its recipe's test split)")
    if data is None or folder is not None:
        return folder, None
    from edgekd.recipe import load_recipe

    return None, load_recipe(data, set_)
