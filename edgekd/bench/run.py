"""`edgekd bench`: checkpoint/bundle -> (export) -> one fresh process per row -> records, JSON, markdown, chart."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field, replace
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgekd.bench.hardware import OtherCPU, gemm_peak_fraction
from edgekd.errors import EdgeKDError
from edgekd.fileio import (owner, owner_alive, refuse_output_inside, remove_trees, sha256_file, track_tree,
                           untrack_tree, write_json)
from edgekd.formats import ARTIFACT_FORMATS, PRECISIONS, TTA_VIEWS
from edgekd.host import cpu_info
from edgekd.options import parse_batches, parse_list
from edgekd.progress import progress_task, silent
from edgekd.runtime import MAX_THREADS, cap_to_cores, is_bundle
from edgekd.scoring import absent_classes_warning, accuracy_auc, scoring_subset

SCHEMA = "edgekd-bench/1"
FORMATS = ("torch", *ARTIFACT_FORMATS)
DEFAULT_VIEWS = list(TTA_VIEWS)
RECORD_KEYS = ("model", "role", "format", "precision", "variant", "batch", "tta", "views", "threads", "p50_ms",
               "p90_ms", "p99_ms", "mean_ms", "min_ms", "runs", "throughput", "params", "macs", "size_mb",
               "peak_rss_mb", "load_s", "first_call_ms", "acc", "auc", "gemm_peak_fraction", "status", "reason")
"""Every record has exactly these keys (None where not measured; status 'ok' or 'n/a' with the reason)."""
VARIANTS = {"torch": ("eager", "compile"), "onnx": ("bare", "runner"), "openvino": ("bare", "runner")}
"""bare: the framework's own call on a preprocessed float batch; runner: edgekd.runtime from uint8 images
(preprocessing, TTA views, inference, softmax); eager / compile: PyTorch, and torch.compile (inductor) on CPU."""
BUSY_CORES = 0.25
"""Other processes' average CPU use (in cores) during a run above which the bench warns that the machine was not
quiet (the zoo's quiet runs read 0.01-0.04)."""

BENCH_ALLOWS_FORGETTING = "edgekd bench, which times a model whatever its retention; not for deployment"
"""Who let a continual checkpoint below min_retention through, in the warning and the card of bench's bundle."""


@dataclass
class Timing:
    """Per measurement: `warmup` untimed calls, then timed calls until both `min_runs` and `min_seconds`."""

    warmup: int = 10
    min_runs: int = 20
    max_runs: int = 5000
    min_seconds: float = 2.0

    def __post_init__(self) -> None:
        self.max_runs = max(self.max_runs, self.min_runs)  # --min-runs 8000 had stopped at 5000, said as 8000

    def as_kwargs(self) -> dict:
        return {"warmup": self.warmup, "min_runs": self.min_runs, "max_runs": self.max_runs,
                "min_seconds": self.min_seconds}


@dataclass
class Subject:
    """A model to benchmark (the student, or the teacher): where its weights and artifacts are, what it costs."""

    role: str
    name: str
    preprocess: dict
    class_names: list[str]
    checkpoint: Path | None = None
    artifacts: dict[tuple[str, str], dict] = field(default_factory=dict)
    """(format, precision) -> {"bundle": dir, "path": file, "size_mb": float}."""
    unavailable: dict[tuple[str, str], str] = field(default_factory=dict)
    """(format, precision) -> why there is no artifact (e.g. the export's parity gate refused it)."""
    views: list[str] = field(default_factory=lambda: list(DEFAULT_VIEWS))
    center_crop_fraction: float = 0.875
    fuse: bool = True
    """The torch rows run the model fused as the export traced it (deploy_form), unless a bundle was exported with
    the profile's `fuse: false`."""
    params: int | None = None
    macs: int | None = None
    weights_mb: float | None = None
    """The torch row's size: its state_dict's tensors (the checkpoint file also holds the recipe, metrics and, in a
    last.pt, the optimizer's state)."""
    continual: str | None = None
    """A continual-learning model ("one head per task" or "one head over every task's classes"), None otherwise: its
    accuracy is scored per task (`edgekd eval`, continual.json), not by bench's one softmax over one dataset."""
    images: Path | None = None
    labels: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)
    opened: list = field(default_factory=list)
    """The opened bundles whose files the rows read: a zipped bundle's extracted copy lives as long as its Bundle."""

    def describe(self) -> dict:
        return {"role": self.role, "model": self.name, "checkpoint": str(self.checkpoint) if self.checkpoint else None,
                "params": self.params, "macs": self.macs, "input_size": self.preprocess.get("input_size"),
                "artifacts": {f"{f}/{p}": str(a["path"]) for (f, p), a in self.artifacts.items()},
                "unavailable": {f"{f}/{p}": r for (f, p), r in self.unavailable.items()},
                "test_images": None if self.labels is None else int(len(self.labels)), "notes": self.notes}


@dataclass
class BenchResult:
    out: Path
    records: list[dict]
    summary: dict
    markdown: str
    written: list[str] = field(default_factory=list)
    """The files written into `out` (bench.png only where matplotlib is installed)."""


# ------------------------------------------------------------------------------------------------ subjects

def bundle_reusable(bundle_dir: Path, checkpoint: Path, pairs: list[tuple[str, str]], digest: str,
                    checkpoint_sha256: str | None = None) -> bool:
    """An earlier export of this very checkpoint (its path, and its content: the sha256 the bundle records; a
    checkpoint replaced by a copy that kept an older mtime is not the one exported), by this edgekd under these
    export settings (`digest`: profile_digest), holding every pair we need. `checkpoint_sha256`: the checkpoint's,
    when the caller has it (hashed here otherwise)."""
    meta_path, parity_path = bundle_dir / "edgekd.json", bundle_dir / "parity.json"
    if not (meta_path.is_file() and parity_path.is_file()):
        return False
    parity = json.loads(parity_path.read_text())
    if Path(parity.get("checkpoint", "")).resolve() != checkpoint.resolve():
        return False
    meta = json.loads(meta_path.read_text())
    if meta.get("model", {}).get("checkpoint_sha256") != (checkpoint_sha256 or sha256_file(checkpoint)):
        return False
    if meta.get("export_profile_digest") != digest:
        return False
    have = {(a["format"], a["precision"]) for a in meta.get("artifacts", [])}
    return set(pairs) <= have


def _export(checkpoint: Path, bundle_dir: Path, pairs: list[tuple[str, str]], threads: int, parity_images: int | None,
            calib_images: int | None, data_overrides: list[str], log, accuracy_control: bool | None = None
            ) -> tuple[list[Path], dict[tuple[str, str], str]]:
    """Export `pairs` into bundle_dir; if the parity gate refuses some artifacts, export the others (one bundle per
    precision) and report the refused ones. -> (bundle dirs, {(format, precision): reason})."""
    from edgekd.export import ParityGateError, export_checkpoint, load_profile, profile_digest, with_overrides

    profile = with_overrides(load_profile(None), parity_images, calib_images, threads, accuracy_control)
    # The bench times every artifact itself, a slow INT8 included: the export's INT8 speed check is off here.
    profile = profile.model_copy(update={"quantization": profile.quantization.model_copy(update={"min_speedup": None})})
    formats = list(dict.fromkeys(f for f, _ in pairs))
    precisions = list(dict.fromkeys(p for _, p in pairs))
    digest, sha256 = profile_digest(profile), sha256_file(checkpoint)  # hashed once, for every check below
    if bundle_reusable(bundle_dir, checkpoint, pairs, digest, sha256):
        log(f"reusing the export in {bundle_dir}")
        return [bundle_dir], {}
    # An earlier run of this checkpoint whose gate refused some artifacts: reuse its split bundles and verdict.
    refusal_file = bundle_dir.with_name(f"{bundle_dir.name}-refused.json")
    # The digest covers accuracy control and every other export setting.
    stamp = {"checkpoint": str(checkpoint.resolve()), "sha256": sha256,
             "export_profile_digest": digest}
    if refusal_file.is_file():
        earlier = json.loads(refusal_file.read_text())
        refused = {tuple(k.split("/")): v for k, v in earlier["refused"].items()}
        rest = [p for p in pairs if p not in refused]
        split = [bundle_dir.with_name(f"{bundle_dir.name}-{p}") for p in dict.fromkeys(p for _, p in rest)]
        if earlier["stamp"] == stamp and all(
                bundle_reusable(b, checkpoint, [(f, p) for f, p in rest if b.name.endswith(f"-{p}")], digest, sha256)
                for b in split):
            log(f"reusing the exports {', '.join(b.name for b in split)} (the parity gate refused "
                f"{', '.join('/'.join(k) for k in refused if k in pairs)} for this checkpoint)")
            return split, {k: v for k, v in refused.items() if k in pairs}
    log(f"exporting {checkpoint} -> {bundle_dir} ({', '.join(f'{f}/{p}' for f, p in pairs)})")
    try:
        # a continual checkpoint below the profile's min_retention is timed all the same (bench has no
        # --allow-forgetting to give; the gate's message had named one): warned, and its card names bench
        export_checkpoint(checkpoint, bundle_dir, formats, precisions, profile, data_overrides=data_overrides, log=log,
                          allow_forgetting=BENCH_ALLOWS_FORGETTING)
        return [bundle_dir], {}
    except ParityGateError as err:
        refused = {(r["format"], r["precision"]): "export parity gate: " + "; ".join(r["failures"])
                   for r in err.parity["artifacts"] if not r["passed"]}
        passed = [(r["format"], r["precision"]) for r in err.parity["artifacts"] if r["passed"]]
        missing = [p for p in pairs if p not in refused and p not in passed]  # failed before the gate
        for pair in missing:
            refused[pair] = next((f for f in err.parity["failures"] if f.startswith(f"{pair[0]}/{pair[1]}")),
                                 "export failed")
        log(f"parity gate refused {', '.join(f'{f}/{p}' for f, p in refused)}; exporting the rest")
        write_json(refusal_file, {"stamp": stamp, "refused": {f"{f}/{p}": r for (f, p), r in refused.items()}})
    bundles = []
    for precision in precisions:
        ok = [f for f, p in passed if p == precision]
        if ok:
            target = bundle_dir.with_name(f"{bundle_dir.name}-{precision}")
            if not bundle_reusable(target, checkpoint, [(f, precision) for f in ok], digest, sha256):
                export_checkpoint(checkpoint, target, ok, [precision], profile, data_overrides=data_overrides, log=log,
                                  allow_forgetting=BENCH_ALLOWS_FORGETTING)
            bundles.append(target)
    return bundles, refused


def _add_bundle_artifacts(subject: Subject, bundle_path: Path) -> None:
    from edgekd.runtime import open_bundle

    bundle = open_bundle(bundle_path)
    subject.opened.append(bundle)
    for art in bundle.meta["artifacts"]:
        key = (art["format"], art["precision"])
        path = bundle.root / art["path"]
        files = [path, path.with_suffix(".bin")] if art["format"] == "openvino" else [path]
        subject.artifacts.setdefault(key, {"bundle": bundle_path, "path": path,
                                           "size_mb": sum(f.stat().st_size for f in files) / 2**20})
    subject.fuse = subject.fuse and (bundle.meta.get("export_profile_settings") or {}).get("fuse", True) is not False
    subject.views = list(bundle.tta.get("views") or DEFAULT_VIEWS)
    subject.center_crop_fraction = float(bundle.tta.get("center_crop_fraction", 0.875))


def check_source(source: Path) -> None:
    """A benchmark subject exists and, if a bundle, opens and verifies (nothing is written before this)."""
    from edgekd.runtime import open_bundle

    if not source.exists():
        raise EdgeKDError(f"{source}: no such checkpoint or bundle")
    if is_bundle(source):
        open_bundle(source)
    elif source.is_dir():
        raise EdgeKDError(f"{source}: a folder that is not an edgekd bundle (no edgekd.json); give a bundle or a "
                          f"checkpoint (best.pt)")
    else:
        from edgekd.train.checkpoint import load_checkpoint

        load_checkpoint(source)  # an empty, foreign or truncated file: its one-line error, before any output


def resolve_subject(source: Path, role: str | None, formats: list[str], precisions: list[str], out: Path,
                    threads: int, checkpoint: Path | None = None, export_options: dict | None = None,
                    log: Callable[[str], None] = print, data_given: bool = False,
                    taken_role: str | None = None) -> Subject:
    """A checkpoint (exported here for the ONNX/OpenVINO rows) or a bundle (plus an optional checkpoint for torch).
    `data_given`: --data was given (a continual model is refused before any export). `taken_role`: another
    subject's role (the --teacher's): this one is the "student" if it would have the same (records and export
    folders are named by role; the teacher's export had replaced the model's, and its rows timed the teacher)."""
    from edgekd.runtime import check_artifact, open_bundle

    export_options = export_options or {}
    source = Path(source)
    if not source.exists():
        raise EdgeKDError(f"{source}: no such checkpoint or bundle")
    wanted = [(f, p) for f in formats if f != "torch" for p in precisions]
    if is_bundle(source):
        bundle = open_bundle(source)
        meta = bundle.model
        if checkpoint is not None:
            check_bundle_checkpoint(checkpoint, meta, source)
        subject = Subject(role=_role(role or meta.get("role"), taken_role), name=meta.get("name") or source.name,
                          preprocess=bundle.preprocess, class_names=bundle.class_names, checkpoint=checkpoint,
                          params=meta.get("params"))
        subject.continual = continual_kind((bundle.meta.get("continual") or {}).get("head"))
        recorded = meta.get("checkpoint_path")
        if (checkpoint is None and recorded and Path(recorded).is_file()  # "pass --checkpoint": which one, said
                and find_spec("torch") is not None):  # (the core install cannot run it)
            subject.notes.append(f"its edgekd.json names the checkpoint it was exported from, {recorded}: "
                                 "--checkpoint with it adds the torch rows and MACs")
        refuse_continual_scoring(subject, data_given)
        _add_bundle_artifacts(subject, source)
        for pair in wanted:
            if pair not in subject.artifacts:
                subject.unavailable[pair] = f"not in the bundle {source}"
            else:  # a bundle the runtime refuses (edgekd.json edited after export) is an error, not an n/a row
                check_artifact(bundle, *pair)
    else:
        from edgekd.train.checkpoint import load_checkpoint

        if checkpoint is not None and Path(checkpoint).resolve() != source.resolve():
            raise EdgeKDError(f"--checkpoint {checkpoint}: the source {source} is a checkpoint already (--checkpoint "
                              "gives a bundle its torch rows)")
        ckpt = load_checkpoint(source)
        checkpoint = source
        subject = Subject(role=_role(role or ckpt.get("role"), taken_role), name=ckpt["arch"]["name"],
                          preprocess=ckpt["preprocess"], class_names=list(ckpt["class_names"]), checkpoint=source,
                          continual=continual_kind((ckpt.get("continual") or {}).get("head")))
        refuse_continual_scoring(subject, data_given)  # before its export, minutes of work
        from edgekd.export import FORMATS as EXPORT_FORMATS

        pairs = [(f, p) for f, p in wanted if p in EXPORT_FORMATS[f].precisions]
        for pair in wanted:
            if pair not in pairs:
                subject.unavailable[pair] = f"{pair[0]} has no {pair[1]} export"
        if pairs:
            _export_subject(subject, source, pairs, out, threads, export_options, log)
    count_costs(subject)
    return subject


def _export_subject(subject: Subject, source: Path, pairs: list[tuple[str, str]], out: Path, threads: int,
                    export_options: dict, log: Callable[[str], None]) -> None:
    """A checkpoint subject's `pairs` exported (or an earlier export reused) into <bundle_root>/bundle-<role>,
    never onto one of the run's sources; its artifacts and refusals added to the subject."""
    target = Path(export_options.get("bundle_root") or out) / f"bundle-{subject.role}"
    for given in export_options.get("sources") or []:  # a source there would be replaced by this export
        if Path(given).resolve() == target.resolve() or target.resolve() in Path(given).resolve().parents:
            raise EdgeKDError(f"{given}: the export of {source} would replace it ({target}): give another --out")
    bundles, refused = _export(source, target, pairs, threads, export_options.get("parity_images"),
                               export_options.get("calib_images"), export_options.get("data_overrides") or [], log,
                               export_options.get("accuracy_control"))
    for b in bundles:
        _add_bundle_artifacts(subject, b)
    subject.unavailable.update(refused)
    for pair in list(subject.artifacts):
        if pair not in pairs:
            del subject.artifacts[pair]  # a reused bundle may hold more than was asked for


def _role(role: str | None, taken: str | None) -> str:
    role = role or "model"
    return "student" if role == taken else role


def check_bundle_checkpoint(checkpoint: Path, model: dict[str, Any], bundle: Path) -> None:
    """--checkpoint beside a bundle: the checkpoint the bundle was exported from (its sha256 in edgekd.json), or
    its torch rows, params and MACs would be another model's under the bundle's name."""
    recorded = model.get("checkpoint_sha256")
    if recorded and sha256_file(Path(checkpoint)) != recorded:
        raise EdgeKDError(f"--checkpoint {checkpoint}: not the checkpoint {bundle} was exported from (its "
                          f"edgekd.json records {model.get('checkpoint') or 'a checkpoint'} with another sha256)")


def count_costs(subject: Subject) -> None:
    """Params, MACs and weights size of the subject's checkpoint, in the form its rows run (fused as exported)."""
    if subject.checkpoint is None:
        subject.notes.append("no checkpoint: no torch rows and no MACs (so no GEMM-peak fraction); pass --checkpoint")
        return
    from edgekd.models import count_macs, count_parameters, deploy_form
    from edgekd.train.checkpoint import model_from_checkpoint

    model = model_from_checkpoint(subject.checkpoint)[0]
    model = deploy_form(model)[0] if subject.fuse else model  # as exported and timed
    subject.params = count_parameters(model)
    subject.macs = count_macs(model, tuple(subject.preprocess["input_size"]))
    subject.weights_mb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20


def continual_kind(head: str | None) -> str | None:
    """How a continual model's outputs are laid out (its checkpoint's or bundle's `continual.head`), None for none."""
    if head is None:
        return None
    return "one head per task" if head == "multi" else "one head over every task's classes"


def refuse_continual_scoring(subject: Subject, data_given: bool) -> None:
    if subject.continual and data_given:
        raise EdgeKDError(f"--data: the {subject.role} is a continual-learning model ({subject.continual}), scored per "
                          "task by `edgekd eval` (and continual.json), not as one softmax over one dataset: bench it "
                          "without --data (timed on random images)")


EVAL_SEED = 0
"""Seed of the --eval-limit subset: two benchmarks with the same limit score the same images."""


def eval_subset(labels: np.ndarray, n: int, seed: int = EVAL_SEED) -> np.ndarray:
    """The --eval-limit subset: `n` images with every class kept (scoring_subset)."""
    return scoring_subset(labels, n, seed)


def warn_of_classes_the_subset_lacks(labels: np.ndarray, picked: np.ndarray, class_names: list[str],
                                     log: Callable[[str], None]) -> None:
    """--eval-limit below the class count: the subset cannot hold every class the images have (scoring_subset
    keeps one of each when it can), so AUC is undefined on it: said, as it is said of a folder lacking a class."""
    whole = np.bincount(labels, minlength=len(class_names))
    kept = np.bincount(labels[picked], minlength=len(class_names))
    lost = (whole > 0) & (kept == 0)
    if lost.any():
        counts = np.where(lost, 0, 1).tolist()  # only the classes the subset lost (a folder's own are said apart)
        log(f"warning: {absent_classes_warning(f'the --eval-limit {len(picked)} subset', counts, class_names)}"
            f" (a limit below the {int((whole > 0).sum())} classes present cannot keep one of each)")


def attach_test_images(subject: Subject, recipe, work: Path, limit: int | None, log) -> None:
    """The test split at this subject's model input size (uint8, runtime preprocessing) -> an .npy for the workers."""
    from edgekd.data import build_checkpoint_data, check_class_order
    from edgekd.runtime import Preprocessor

    data = build_checkpoint_data(recipe, "pass --data with a recipe of the data (e.g. the run's recipe.yaml) and "
                                         "--set data.path=...")
    if data.num_classes != len(subject.class_names):
        raise EdgeKDError(f"--data: {recipe.name} has {data.num_classes} classes, the {subject.role} model "
                          f"{len(subject.class_names)}")
    # the same classes in another order would score every row inverted (ACC 0 for a perfect model), without a word
    check_class_order(subject.class_names, data.class_names, f"--data {recipe.name}", log=lambda m: log(f"warning: {m}"))
    test = data.dataset("test", train=False)
    # --eval-limit: a seeded subset with the split's class mix (the first N of a class-sorted folder is one class)
    picked = eval_subset(test.table.labels, limit or len(test))
    warn_of_classes_the_subset_lacks(np.asarray(test.table.labels), picked, subject.class_names, log)
    prep = Preprocessor(subject.preprocess)
    # At the resize stage (e.g. 256 for a 224 crop): the bare rows crop them, the runner does its own crop.
    images = np.stack([prep.to_resize_size(test.raw(int(i))) for i in picked])
    subject.images = work / f"{subject.role}-test-images.npy"
    np.save(subject.images, images)
    subject.labels = np.asarray(test.table.labels[picked])
    log(f"{subject.role}: {len(picked)} test images of {recipe.data.source} '{recipe.name}' at {images.shape[1:]}"
        + (f" (stratified subset of {len(test)})" if len(picked) < len(test) else "") + hair_note(subject))


def hair_note(subject: Subject) -> str:
    """Said of a hair-removal model's test images: removed once as they are prepared; no row times it."""
    return ("; hair removal applied once as they are prepared (at each image's decoded size), not timed in any row"
            if subject.preprocess.get("hair_removal") else "")


def training_copies_warning(subject: Subject, folder: Path, paths: list) -> str | None:
    """`eval --data DIR`'s warning of a folder holding the model's own train or val images (by content), when its
    checkpoint is here and PyTorch is installed to read it (the core install's bench scores without it)."""
    if subject.checkpoint is None or not Path(subject.checkpoint).is_file() or find_spec("torch") is None:
        return None
    from edgekd.robustness import trained_images_warning
    from edgekd.train.checkpoint import load_checkpoint

    return trained_images_warning(str(folder), paths, load_checkpoint(subject.checkpoint))


def attach_folder_images(subject: Subject, folder: Path, work: Path, limit: int | None, log) -> None:
    """A labelled folder (ImageFolder layout, the model's class names) decoded by the runtime, at the resize stage
    like the test split (torch-free: the core install's bench scores accuracy this way); --eval-limit takes a
    seeded subset with the folder's class mix (eval_subset)."""
    from edgekd.runtime import Preprocessor
    from edgekd.runtime.inputs import collect_labelled

    paths, labels = collect_labelled(folder, subject.class_names)
    absent = absent_classes_warning(str(folder), np.bincount(labels, minlength=len(subject.class_names)).tolist(),
                                    subject.class_names)
    if absent:
        log(f"warning: {absent}")
    if copies := training_copies_warning(subject, folder, paths):
        log(f"warning: {subject.role}: {copies}")
        subject.notes.append(copies)
    picked = eval_subset(np.asarray(labels), limit or len(paths))
    warn_of_classes_the_subset_lacks(np.asarray(labels), picked, subject.class_names, log)
    prep = Preprocessor(subject.preprocess)
    images = np.stack([prep.to_resize_size(paths[i]) for i in picked])
    subject.images = work / f"{subject.role}-folder-images.npy"
    np.save(subject.images, images)
    subject.labels = np.asarray(labels)[picked]
    log(f"{subject.role}: {len(picked)} labelled images of {folder}, held at the resize size {images.shape[1:]} "
        "(each row crops them to the model's input)"
        + (f" (stratified subset of {len(paths)})" if len(picked) < len(paths) else "") + hair_note(subject))


def attach_synthetic_images(subject: Subject, work: Path, n: int,
                            note: str | None = None) -> None:
    """No test data (a bundle without --data): time on seeded random images, report no accuracy (`note` says why;
    by default what would give accuracy: a labelled folder, and with PyTorch a recipe or a checkpoint)."""
    if note is None:
        note = ("no test data (give --data DIR, a labelled folder" + (", a recipe, or a checkpoint"
                if find_spec("torch") is not None else "") + "): timed on random images, no accuracy")
    c, size = subject.preprocess["input_size"][0], subject.preprocess["resize"]  # the resize stage, as test images
    images = np.random.default_rng(0).integers(0, 256, size=(n, size, size, c), dtype=np.uint8)
    subject.images = work / f"{subject.role}-synthetic-images.npy"
    np.save(subject.images, images)
    subject.notes.append(note)


# ------------------------------------------------------------------------------------------------ rows

@dataclass
class Row:
    subject: Subject
    format: str
    precision: str
    variant: str

    @property
    def label(self) -> str:
        return f"{self.subject.role} {self.format} {self.precision} {self.variant}"


def plan_rows(subject: Subject, formats: list[str], precisions: list[str], variants: dict[str, tuple[str, ...]]) -> list[Row]:
    rows = []
    for fmt in formats:
        for precision in precisions:
            if fmt == "torch" and precision != "fp32":
                continue  # PyTorch runs the checkpoint as trained; lower precisions come from the exports
            for variant in variants.get(fmt, ()):
                rows.append(Row(subject, fmt, precision, variant))
    return rows


def run_worker(job: dict, work: Path, timeout: float, env: dict[str, str] | None = None) -> dict:
    """Run one job in a fresh interpreter (with `env` added to the environment); any failure (error, crash,
    timeout) comes back as {"error": ...}."""
    fd, job_path = tempfile.mkstemp(prefix="job-", suffix=".json", dir=work)
    os.close(fd)
    job = {**job, "result": str(Path(job_path).with_name(Path(job_path).stem + "-result.json"))}  # a folder
    # name with ".json" in it had sent the result outside work/
    Path(job_path).write_text(json.dumps(job))
    try:
        proc = subprocess.run([sys.executable, "-m", "edgekd.bench.worker", job_path], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    result_path = Path(job["result"])
    if result_path.is_file():
        return json.loads(result_path.read_text())
    tail = (proc.stderr or proc.stdout or "").strip().splitlines()
    return {"error": f"worker exited with code {proc.returncode}: {tail[-1][:300] if tail else 'no output'}"}


def row_job(row: Row, batches: list[int], threads: int, tta: bool, timing: Timing, work: Path,
            evaluate: bool, profile_batch: int | None) -> dict | str:
    """The worker job of a row, or the reason it cannot run."""
    s = row.subject
    job: dict[str, Any] = {"kind": row.format, "variant": row.variant, "precision": row.precision, "threads": threads,
                           "batches": batches, "views": s.views if tta else None,
                           "center_crop_fraction": s.center_crop_fraction, "preprocess": s.preprocess,
                           "images": str(s.images), "timing": timing.as_kwargs(), "evaluate": evaluate,
                           "probs": str(work / f"{row.label.replace(' ', '-')}-probs.npy")}
    if row.format == "torch":
        if find_spec("torch") is None:  # first: on a device, --checkpoint had been asked for, then refused
            return "PyTorch is not installed (the edgekd[train] extra)"
        if s.checkpoint is None:
            return "no checkpoint (pass --checkpoint with a bundle)"
        job["model_path"], job["fuse"] = str(s.checkpoint), s.fuse
    else:
        art = s.artifacts.get((row.format, row.precision))
        if art is None:
            return s.unavailable.get((row.format, row.precision), "no such artifact")
        job["model_path"], job["bundle"] = str(art["path"]), str(art["bundle"])
        if profile_batch and row.format == "openvino" and row.variant == "bare":
            job["profile_batch"] = profile_batch
    return job


def size_mb(row: Row) -> float | None:
    if row.format == "torch":
        return row.subject.weights_mb
    art = row.subject.artifacts.get((row.format, row.precision))
    return art["size_mb"] if art else None


def make_records(row: Row, result: dict | str, batches: list[int], threads: int, tta: bool,
                 peak_gflops: float | None) -> list[dict]:
    """One record per batch size; a row that could not run gives 'n/a' records with the reason."""
    s = row.subject
    views = len(s.views) if tta else 1
    error = result if isinstance(result, str) else result.get("error")
    metrics = {}
    if not error and result.get("probs") and s.labels is not None:
        probs = np.load(result["probs"])
        metrics = accuracy_auc(s.labels[:len(probs)], probs)
        if "nonfinite" in metrics:  # said, and left undefined (an all-NaN row had counted as class 0)
            s.notes.append(f"{row.format}/{row.precision} {row.variant}: non-finite outputs on "
                           f"{metrics['nonfinite']} of {len(probs)} scored images: no ACC or AUC")
        elif result.get("labels"):  # a runner row: the label `edgekd predict` gives, by the bundle's operating point
            metrics["acc"] = float((np.load(result["labels"]) == s.labels[:len(probs)]).mean())
    records = []
    for batch in batches:
        rec = dict.fromkeys(RECORD_KEYS)
        rec.update(model=s.name, role=s.role, format=row.format, precision=row.precision, variant=row.variant,
                   batch=batch, tta=tta, views=views, threads=threads, params=s.params, macs=s.macs,
                   size_mb=size_mb(row), status="n/a" if error else "ok", reason=error)
        if not error:
            stats = result["timings"][str(batch)]
            rec.update({k: stats[k] for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms", "runs")})
            rec["throughput"] = 1000.0 * batch / stats["p50_ms"]
            rss = (result.get("peak_rss_mb_by_batch") or {}).get(str(batch), result.get("peak_rss_mb"))
            rec.update(peak_rss_mb=rss, load_s=result.get("load_s"),
                       first_call_ms=stats.get("first_ms"),
                       acc=metrics.get("acc"), auc=metrics.get("auc"),
                       gemm_peak_fraction=gemm_peak_fraction(s.macs, rec["throughput"], peak_gflops, views))
        records.append(rec)
    return records


# ------------------------------------------------------------------------------------------------ the run

@dataclass
class BenchConfig:
    """What `run_bench` measures: a model (and optionally its teacher) in every (format, precision, variant) x batch.

    `data_recipe`: a Recipe whose test split scores accuracy (default: each checkpoint's own recipe); `data_folder`
    instead: a labelled folder (root/<class name>/images), decoded by the torch-free runtime.
    `variants`: per format, which variants to run (default VARIANTS: eager+compile, bare+runner).
    `export_options`: parity_images, calib_images, accuracy_control, data_overrides, bundle_root (where checkpoints are exported;
    default `out`: an earlier export of the same checkpoint there is reused).
    `role`: the model's role in the records (default: its checkpoint's or bundle's). `gemm_info`: a GEMM peak
    measured earlier in the same session (skips measuring it again).
    """

    source: str | Path
    out: str | Path
    formats: list[str] | str = "torch,onnx,openvino"
    precisions: list[str] | str | None = None
    """None: a bundle's own precisions, fp32 and int8 for a checkpoint (exported first)."""
    batches: list[int] | str = "1,8,32"
    threads: int | None = None
    tta: bool = False
    teacher: str | Path | None = None
    data_recipe: Any = None
    checkpoint: str | Path | None = None
    timing: Timing | None = None
    variants: dict[str, tuple[str, ...]] | None = None
    eval_limit: int | None = None
    profile: bool = False
    gemm: bool = True
    worker_timeout: float = 1800.0
    export_options: dict | None = None
    command: str | None = None
    role: str | None = None
    gemm_info: dict | None = None
    data_folder: str | Path | None = None
    keep_work: bool = False
    """Keep out/work (worker jobs and results, the preprocessed copy of the scored images); removed by default."""


def default_precisions(source: Path) -> str:
    """--precision when none is given: every precision a bundle holds (its fp16 had been left out without a word),
    fp32 and int8 for a checkpoint (exported first)."""
    if not is_bundle(source):
        return "fp32,int8"
    from edgekd.runtime import open_bundle

    bundle = open_bundle(source)  # verified: a broken bundle's first error is its own
    try:
        held = {a.precision for a in bundle.artifacts}
    finally:
        bundle.close()  # a zip's extracted files
    return ",".join(p for p in PRECISIONS if p in held)


def _resolved(config: BenchConfig, log: Callable[[str], None]) -> BenchConfig:
    """The config with its lists parsed and checked and every default filled in; --threads above the cores this
    process may use is timed at the cores (said), as predict runs it (it had timed 100000 threads for minutes)."""
    threads = config.threads or cap_to_cores(os.cpu_count() or 1)
    formats = parse_list(config.formats, FORMATS, "--formats")
    precisions = parse_list(config.precisions or default_precisions(Path(config.source)), PRECISIONS, "--precision")
    batches = parse_batches(config.batches)
    if not 1 <= threads <= MAX_THREADS:
        raise EdgeKDError(f"--threads must be in [1, {MAX_THREADS}], got {threads}")
    if cap_to_cores(threads) < threads:
        log(f"warning: --threads {threads} is more than the {cap_to_cores(threads)} cores this process may use: "
            f"timed at {cap_to_cores(threads)}")
        threads = cap_to_cores(threads)
    return replace(config, formats=formats, precisions=precisions, batches=batches, threads=threads,
                   timing=config.timing or Timing(), variants=config.variants or VARIANTS, out=Path(config.out))


def _prepare_out(cfg: BenchConfig) -> Path:
    """Check the sources and the output folder before anything is created, then make out/work."""
    out = cfg.out
    if out.exists() and not out.is_dir():
        raise EdgeKDError(f"--out {out}: exists and is not a directory")
    sources = [Path(p) for p in (cfg.source, cfg.teacher, cfg.checkpoint) if p is not None]
    refuse_output_inside(out, sources)
    for path in sources:  # a missing file or a bad bundle is refused before anything is created
        check_source(path)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    work.mkdir(exist_ok=True)
    return work


def _subjects(cfg: BenchConfig, work: Path, log: Callable[[str], None]) -> list[Subject]:
    """The model (and its teacher), each with the images it is scored on."""
    data_given = cfg.data_folder is not None or cfg.data_recipe is not None
    options = {**(cfg.export_options or {}), "sources": [p for p in (cfg.source, cfg.teacher, cfg.checkpoint) if p]}
    taken = "teacher" if cfg.teacher is not None else None  # settled before either export (folders by role)
    subjects = [resolve_subject(Path(cfg.source), cfg.role, cfg.formats, cfg.precisions, cfg.out, cfg.threads,
                                Path(cfg.checkpoint) if cfg.checkpoint else None, options, log, data_given, taken)]
    if cfg.teacher is not None:
        subjects.append(resolve_subject(Path(cfg.teacher), "teacher", cfg.formats, cfg.precisions, cfg.out,
                                        cfg.threads, None, options, log, data_given))
    for s in subjects:
        if s.preprocess.get("hair_removal"):  # in bench.json/.md and the CLI's notes, not the log alone
            s.notes.append("hair removal (data.hair_removal) is not timed in any row: `edgekd predict` runs it on "
                           "each image at its decoded size before the model (the scored images had it applied once "
                           "as they were prepared; random images have none)")
        if s.continual:  # its test data is every task's, scored per task: bench times it only (--data refused)
            attach_synthetic_images(s, work, max(cfg.batches), f"a continual-learning model ({s.continual}): timed on "
                                    "random images, no accuracy here; `edgekd eval` scores it per task")
            continue
        if cfg.data_folder is not None:
            attach_folder_images(s, Path(cfg.data_folder), work, cfg.eval_limit, log)
            continue
        recipe = cfg.data_recipe
        if recipe is None and s.checkpoint is not None:
            from edgekd.recipe import recipe_from_dict
            from edgekd.train.checkpoint import load_checkpoint

            embedded = load_checkpoint(s.checkpoint).get("recipe")
            recipe = recipe_from_dict(embedded, f"{s.checkpoint} (embedded recipe)") if embedded else None
        if recipe is not None:
            attach_test_images(s, recipe, work, cfg.eval_limit, log)
        else:
            attach_synthetic_images(s, work, max(cfg.batches))
    return subjects


def _measure_gemm(cfg: BenchConfig, work: Path, when: str, log: Callable[[str], None]) -> dict:
    log(f"measuring the FP32 GEMM peak at {cfg.threads} thread(s) ({when} the rows)")
    # numpy's BLAS reads its thread count from the environment at start (threadpoolctl, with the train extra, too).
    blas = {k: str(cfg.threads) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    result = run_worker({"kind": "gemm", "variant": "gemm", "threads": cfg.threads,
                         "min_seconds": min(1.0, max(0.25, cfg.timing.min_seconds / 2))}, work, cfg.worker_timeout,
                        env=blas)
    return result.get("gemm") or {"error": result.get("error")}


def _higher_peak(before: dict, after: dict) -> dict:
    """Measured again after the rows: on a loaded machine one measurement can land in a busy spell; the higher
    of the two is the peak (both are kept)."""
    if after.get("peak_gflops", 0) > (before.get("peak_gflops") or 0):
        before, after = after, before
    return {**before, "other_measurement": after}


def _run_rows(subjects: list[Subject], cfg: BenchConfig, work: Path, log: Callable[[str], None],
              progress=None) -> tuple[list[dict], list[dict]]:
    """Every row of every subject, each in a fresh worker process: the records and the OpenVINO profiles."""
    records, profiles = [], []
    batches = cfg.batches
    rows = [(s, row) for s in subjects for row in plan_rows(s, cfg.formats, cfg.precisions, cfg.variants)]
    with progress_task(progress, "bench", len(rows)) as advance:
        for s, row in rows:
            advance(0, f"bench {row.label}")
            job = row_job(row, batches, cfg.threads, cfg.tta, cfg.timing, work, evaluate=s.labels is not None,
                          profile_batch=max(batches) if cfg.profile else None)
            if isinstance(job, dict):
                log(f"{row.label}: timing batch {', '.join(map(str, batches))}")
                result = run_worker(job, work, cfg.worker_timeout)
            else:
                result = job
            if isinstance(result, dict) and result.get("profile"):
                profiles.append({"model": s.name, "role": s.role, "format": row.format, "precision": row.precision,
                                 **result["profile"]})
            new = make_records(row, result, batches, cfg.threads, cfg.tta, None)
            if new[0]["status"] != "ok":
                log(f"{row.label}: n/a ({new[0]['reason']})")
            if isinstance(result, dict) and result.get("error"):  # its worker failed (not a row the bundle lacks)
                for rec in new:
                    rec["failed"] = True
            records += new
            advance()
    return records, profiles


def _write_outputs(cfg: BenchConfig, subjects: list[Subject], records: list[dict],
                   summary: dict) -> BenchResult:
    """out/bench.json, out/bench.md and (with matplotlib) out/bench.png."""
    from edgekd.bench.report import records_markdown, throughput_chart
    from edgekd.fileio import atomic_write

    out = cfg.out
    markdown = records_markdown(records, summary)
    write_json(out / "bench.json", summary)
    atomic_write(out / "bench.md", lambda tmp: Path(tmp).write_text(markdown))
    written = ["bench.json", "bench.md"]
    if find_spec("matplotlib") is not None and throughput_chart(  # the train extra's; the core install: no PNG
            records, out / "bench.png", title=f"{', '.join(s.name for s in subjects)}: throughput "
                                              f"({cfg.threads} thread(s){', TTA' if cfg.tta else ''})") is not None:
        written.append("bench.png")
    return BenchResult(out=out, records=records, summary=summary, markdown=markdown, written=written)


def default_bench_out(source: str | Path) -> Path:
    """Where `edgekd bench` writes without --out: bench/ in a checkpoint's run folder; <bundle>-bench/ beside a
    bundle (folder or .zip), so two bundles in one folder do not share, and replace, one output folder."""
    source = Path(os.path.abspath(source))  # `bench .` inside a bundle: named after it, not "" (nor "..")
    if source.is_file() and source.suffix.lower() != ".zip":
        return source.parent / "bench"
    return source.parent / f"{source.stem if source.suffix.lower() == '.zip' else source.name}-bench"


WORK_MARKER = ".edgekd-bench-work"
"""In a work/ folder a bench run made and removes when it ends: the run's `owner()` (a killed run's is removed later)."""


def remove_killed_runs_work(work: Path) -> bool:
    """Remove a work/ folder whose bench run was killed before it could (its marker names a process gone)."""
    marker = work / WORK_MARKER
    if marker.is_file() and not owner_alive(marker.read_text().strip()):
        remove_trees([work])
        return True
    return False


def run_bench(config: BenchConfig, log: Callable[[str], None] | None = print, progress=None) -> BenchResult:
    """Benchmark a model (and optionally its teacher) in every (format, precision, variant) x batch, one run
    (see BenchConfig; `progress`: the CLI's progress bar, a step per row). Writes out/bench.json, out/bench.md
    and out/bench.png; returns the records."""
    log = log or silent  # log=None: say nothing
    cfg = _resolved(config, log)
    replacing = (cfg.out / "bench.json").is_file()
    if remove_killed_runs_work(cfg.out / "work"):
        log(f"removed {cfg.out / 'work'}: left by a bench run that was stopped outright (its image copy included)")
    created = [p for p in (cfg.out, cfg.out / "work") if not p.exists()]
    bundles_before = set(cfg.out.glob("bundle-*"))  # reused by a later run: only this run's are removed on failure
    work = _prepare_out(cfg)
    if work not in created:  # an earlier --keep-work run's: this run's files in a folder of their own, removed after
        work = Path(tempfile.mkdtemp(prefix="run-", dir=work))
        created.append(work)
    if work in created and not cfg.keep_work:  # to be removed at the end: a run killed before then says so
        (work / WORK_MARKER).write_text(owner())
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    load_start = [round(v, 2) for v in os.getloadavg()]
    other_cpu = OtherCPU()

    def leave_nothing() -> None:  # a failed or stopped run leaves no half-made output behind
        made = [cfg.out] if cfg.out in created else [work] * (work in created) + sorted(
            set(cfg.out.glob("bundle-*")) - bundles_before)
        remove_trees([p for p in made if p.is_dir()])
        for p in made:  # a refusal record, bundle-<role>-refused.json
            if p.is_file():
                p.unlink()

    # A stop signal during the export (which ends the process at once) removes what this run made too: the out
    # folder, or its work/ in an out that was there.
    tracked = next((p for p in (cfg.out, work) if p in created), None)
    if tracked is not None:
        track_tree(tracked)
    try:
        subjects = _subjects(cfg, work, log)
    except BaseException:
        leave_nothing()
        raise
    finally:
        untrack_tree(tracked)
    try:
        result = _measure_and_write(cfg, subjects, work, started, load_start, other_cpu, log, progress)
        if replacing:
            log(f"replaced the earlier results in {cfg.out} ({', '.join(result.written)})")
        return result
    except BaseException:
        leave_nothing()
        raise
    finally:  # bench.json holds every figure; work/ also holds a copy of the (patient) images
        if not cfg.keep_work and work in created:
            remove_trees([work])


def _measure_and_write(cfg: BenchConfig, subjects: list[Subject], work: Path, started: str, load_start: list[float],
                       other_cpu: OtherCPU, log: Callable[[str], None], progress) -> BenchResult:
    """The GEMM peak, every row, and the written outputs of `run_bench`."""
    measure = cfg.gemm and cfg.gemm_info is None
    gemm_info = _measure_gemm(cfg, work, "before", log) if measure else cfg.gemm_info
    records, profiles = _run_rows(subjects, cfg, work, log, progress)
    if not any(r["status"] == "ok" for r in records):
        reasons = dict.fromkeys(f"{r['role']} {r['format']}/{r['precision']} {r['variant']}: {r['reason']}"
                                for r in records)
        raise EdgeKDError("no row could run (nothing written): " + ("; ".join(reasons) or "no format offers these "
                                                                     "precisions (torch rows are fp32 only)"))
    if measure:
        gemm_info = _higher_peak(gemm_info, _measure_gemm(cfg, work, "after", log))
    peak = (gemm_info or {}).get("peak_gflops")
    for rec in records:
        if rec["status"] == "ok":
            rec["gemm_peak_fraction"] = gemm_peak_fraction(rec["macs"], rec["throughput"], peak, rec["views"])
    busy = other_cpu.cores()
    if busy is not None and busy >= BUSY_CORES:
        log(f"warning: other processes used {busy:.2f} cores on average during the run: these latencies are not a "
            "quiet machine's (bench.json records it)")
    summary = {
        "schema": SCHEMA, "date": started, "command": cfg.command or "run_bench(...)",
        "machine": {**cpu_info(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_avg_at_start": load_start, "load_avg_at_end": [round(v, 2) for v in os.getloadavg()],
                    "other_processes_cpu_cores": busy},
        "threads": cfg.threads, "batches": cfg.batches, "tta": cfg.tta, "timing": cfg.timing.as_kwargs(),
        "versions": software_versions(), "runner_accuracy": "operating_point", "gemm": gemm_info,
        "subjects": [s.describe() for s in subjects], "profiles": profiles, "records": records,
        "failed_rows": list(dict.fromkeys(f"{r['role']} {r['format']}/{r['precision']} {r['variant']}: {r['reason']}"
                                          for r in records if r.pop("failed", False))),
    }
    return _write_outputs(cfg, subjects, records, summary)


def software_versions() -> dict[str, str]:
    """The installed versions of what the rows ran on (a package that is not installed is left out)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("edgekd", "numpy", "onnxruntime", "openvino", "torch", "timm"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def command_line(argv: list[str] | None = None) -> str:
    argv = sys.argv if argv is None else argv
    return " ".join(shlex.quote(a) for a in ["edgekd", *argv[1:]])
