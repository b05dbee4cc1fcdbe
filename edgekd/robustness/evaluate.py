"""Corruption robustness: checkpoints (PyTorch) and bundle artifacts (edge runtime) scored on the same corrupted images.

Each condition (corruption x severity, plus `clean`) corrupts the decoded uint8 test images once; every model then
applies its own preprocessing (the training side's eval transform, or the runtime's Preprocessor), so a teacher,
its student and the student's INT8 artifact are compared on identical pixels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from edgekd.errors import EdgeKDError
from edgekd.fileio import deferred_signals, write_json, write_text
from edgekd.probability import softmax
from edgekd.runtime import is_bundle
from edgekd.progress import progress_task, silent
from edgekd.robustness.corruptions import check_names, check_severities, corrupt
from edgekd.scoring import absent_classes_warning, accuracy_auc

CLEAN = "clean"
RECORD_KEYS = ("model", "role", "format", "precision", "corruption", "severity", "acc", "auc", "n")


@dataclass
class Predictor:
    """One model in one format: uint8 (H, W, C) images -> (N, num_classes) probabilities."""

    model: str
    role: str
    format: str
    precision: str
    class_names: list[str]
    predict: Callable[[list[np.ndarray]], np.ndarray]
    trained: dict[str, Any] | None = None
    """A checkpoint's embedded recipe, its data_splits and path (`check_trained_splits`); None for an artifact."""
    decide: Callable[[list[np.ndarray]], tuple[np.ndarray, np.ndarray]] | None = None
    """A bundle's: (its model's softmax, the label indices the bundle gives: its calibration and decision threshold,
    as `edgekd predict` labels) in one pass; None for a checkpoint (its labels are the top class)."""

    @property
    def label(self) -> str:
        return f"{self.model} ({self.role}) {self.format}/{self.precision}"


MIXED_HEADS = ("one head per task; the corruption eval and failure analysis score one softmax over the model's "
               "outputs, which would mix the tasks' heads (a labelled folder's eval takes --task)")


def source_checkpoint(src: Path) -> Path | None:
    """The checkpoint file a predictor source names (a .pt file, or a run directory's best.pt); None for a bundle."""
    if is_bundle(src):
        return None
    if src.is_dir() and (src / "best.pt").is_file():
        return src / "best.pt"
    if src.is_file():
        return src
    raise EdgeKDError(f"{src}: not a checkpoint, run directory (holding best.pt) or bundle")


def check_predictor_source(src: str | Path) -> list[str]:
    """What `predictors_for` refuses, said before any work (a bad --compare had been refused after the main
    evaluation printed its table): a checkpoint, run directory (its best.pt) or bundle that opens, and one softmax
    over its outputs (not one head per task). Returns its class names."""
    from edgekd.runtime import open_bundle

    src = Path(src)
    if not src.exists():
        raise EdgeKDError(f"{src}: no such checkpoint, run directory or bundle")
    ckpt_path = source_checkpoint(src)
    if ckpt_path is None:  # a bundle: torch-free (the core install scores bundles)
        bundle = open_bundle(src)
        if bundle.tasks:
            raise EdgeKDError(f"{src}: a bundle with {MIXED_HEADS}")
        return bundle.class_names
    from edgekd.train.checkpoint import load_checkpoint

    ckpt = load_checkpoint(ckpt_path)
    if (ckpt.get("continual") or {}).get("head") == "multi":
        raise EdgeKDError(f"{ckpt_path}: {MIXED_HEADS} (`edgekd eval` without them scores it per task)")
    return list(ckpt.get("class_names") or [])


def check_predictor_sources(sources: Sequence[str | Path], reads_their_data: str | None = None) -> None:
    """`check_predictor_source` of each model a corruption eval compares, and what the comparison needs of them
    together, before any work: the same class count (a mismatch had been refused after the main evaluation
    printed) in the same order (a labelled folder's eval had scored another order silently), and no model given
    twice (its rows had appeared twice). `reads_their_data`: the analysis ("corruption eval", "failure analysis")
    that will score the first checkpoint's own data (no --data): one it cannot be taken from (a continual
    checkpoint's, a bundle's) is refused now too (it had been after the main evaluation)."""
    seen: dict[Path, str | Path] = {}
    names: dict[str | Path, list[str]] = {}
    for src in sources:
        names[src] = check_predictor_source(src)
        key = (source_checkpoint(Path(src)) or Path(src)).resolve()
        if key in seen:
            raise EdgeKDError(f"{src}: given twice (as {seen[key]} too): each model is compared once")
        seen[key] = src
    first = sources[0]
    for other in sources[1:]:
        if len(names[other]) != len(names[first]):
            raise EdgeKDError(f"--compare {other}: {len(names[other])} classes, {first} has {len(names[first])}: "
                              "compared models must share the data's classes")
        if names[other] != names[first] and sorted(names[other]) == sorted(names[first]):  # scored by index
            raise EdgeKDError(f"--compare {other}: its classes are {first}'s in another order "
                              f"({', '.join(names[other])} vs {', '.join(names[first])}): it would be scored against "
                              "the wrong labels")
    if reads_their_data is not None:  # after each model's own refusals (a multi-head one's names --task)
        _recipe_of_first_checkpoint(sources, reads_their_data)


def checkpoint_predictor(path: str | Path, batch_size: int = 256, task: str | None = None) -> Predictor:
    """A checkpoint with its own recipe's eval transform (decoded uint8 image -> normalized tensor); a model with one
    head per task as its `task`'s head (`task_head`: the only task's without one; refused without one otherwise)."""
    import torch

    from edgekd.continual import task_head
    from edgekd.data import build_transforms, chw_tensor
    from edgekd.recipe import recipe_from_dict
    from edgekd.train.checkpoint import model_from_checkpoint

    model, ckpt = model_from_checkpoint(path)
    head = task_head(ckpt, task, str(path), "one softmax over every head's outputs would mix the tasks (`edgekd "
                     "eval` without --data DIR scores each task on its own data)")
    lo, hi = head["outputs"] if head else (0, None)
    recipe = recipe_from_dict(ckpt["recipe"], where=f"{path} (embedded recipe)")
    transform = build_transforms(recipe.data, [], train=False)

    @torch.no_grad()
    def predict(images: list[np.ndarray]) -> np.ndarray:
        out = []
        for start in range(0, len(images), batch_size):
            chunk = [transform(chw_tensor(a))
                     for a in images[start:start + batch_size]]
            out.append(model(torch.stack(chunk)).float()[:, lo:hi])
        return softmax(torch.cat(out).numpy().astype(np.float64))

    return Predictor(ckpt["arch"]["name"], ckpt.get("role") or recipe.role, "torch", "fp32",
                     list(head["class_names"] if head else ckpt["class_names"]), predict,
                     {"recipe": ckpt["recipe"], "data_splits": ckpt.get("data_splits"), "path": str(path)})


def bundle_predictors(path: str | Path, artifacts: Sequence[str] | None = None, threads: int | None = None,
                      batch_size: int = 64) -> list[Predictor]:
    """One predictor per artifact of a bundle (or the `format/precision` ones asked for), run by edgekd.runtime."""
    from edgekd.runtime import Runner, open_bundle

    bundle = open_bundle(path)
    if bundle.tasks:
        raise EdgeKDError(f"{path}: a bundle with {MIXED_HEADS}")
    wanted = [tuple(a.split("/", 1)) for a in artifacts] if artifacts else [(a.format, a.precision)
                                                                          for a in bundle.artifacts]
    predictors = []
    for fmt, precision in wanted:
        bundle.artifact(fmt, precision)  # a one-line error naming what the bundle has
        runner = Runner.from_bundle(bundle, backend=fmt, precision=precision, threads=threads, tta=False)

        def decide(images: list[np.ndarray], runner=runner) -> tuple[np.ndarray, np.ndarray]:
            got = [p for start in range(0, len(images), batch_size)
                   for p in runner.predict_batch(images[start:start + batch_size], tta=False)]
            # The model's own softmax, as a checkpoint's row has it: a Platt bias in the calibrated
            # probabilities moves their argmax, a threshold the README says these rows do not apply.
            return (np.stack([p.probs if p.raw_probs is None else p.raw_probs for p in got]),
                    np.asarray([p.index for p in got], dtype=np.int64))

        model = bundle.model
        predictors.append(Predictor(model.get("name", "model"), model.get("role") or "model", fmt, precision,
                                    list(bundle.class_names), lambda images, decide=decide: decide(images)[0],
                                    decide=decide))
    return predictors


def predictors_for(sources: Sequence[str | Path], threads: int | None = None) -> list[Predictor]:
    """Checkpoints (.pt files or run directories with best.pt) and bundle directories/zips -> predictors."""
    out: list[tuple[Path, Predictor]] = []
    for src in map(Path, sources):
        ckpt_path = source_checkpoint(src)
        out += ([(src, p) for p in bundle_predictors(src, threads=threads)] if ckpt_path is None else
                [(src, checkpoint_predictor(ckpt_path))])
    # Two sources with one model name, role and format (two seeds, two versions) would be one row of every table:
    # each such model is named with its source.
    labels = [p.label for _, p in out]
    for src, p in out:
        if labels.count(p.label) > 1:
            p.model = f"{p.model} [{src}]"
    return [p for _, p in out]


SUBSET_SEED = 0
"""The --limit subset's seed: fixed, so --seed varies the corruptions' noise alone, never which images are scored
(the subset is the one --seed 0 always picked)."""


def limited(n: int, limit: int | None) -> np.ndarray:
    """Sorted indices of the --limit subset of n images: a fixed random draw (not stratified: recorded runs'
    subsets stay as they were), or all."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(SUBSET_SEED).choice(n, size=limit, replace=False))


def load_split_images(recipe, split: str = "test", limit: int | None = None,
                      predictors: Sequence[Predictor] = ()) -> tuple["SplitImages", np.ndarray, list[str],
                                                                      np.ndarray, list[str] | None]:
    """The uint8 images (SplitImages: decoded when read), labels, class names, positions and files (None for in-memory data: an .npz) of a
    recipe's split (the fixed random subset
    `limited` picks, if `limit` is given: the same whatever --seed, which seeds the corruptions only; the
    positions key each image's corruption noise, so an image gets the same noise with any --limit). Each
    checkpoint among `predictors`, on data drawn with its own split settings, must find the split it was trained
    with (`check_trained_splits`)."""
    from edgekd.data import build_checkpoint_data, check_trained_splits

    data = build_checkpoint_data(recipe)
    for p in predictors:
        if p.trained is not None:
            check_trained_splits(p.trained, data, recipe, p.trained["path"], (split,))
    ds = data.dataset(split, train=False)
    idx = limited(len(ds), limit)
    images = SplitImages(ds, idx)  # decoded when read: a split of full-size scans never sits in memory whole
    files = None if ds.table.paths is None else [str(ds.table.paths[int(i)]) for i in idx]
    return images, np.asarray(ds.table.labels)[idx].astype(np.int64), list(data.class_names), idx, files


def load_folder_images(folder: str | Path, class_names: list[str], limit: int | None = None,
                       predictors: Sequence[Predictor] = ()) -> tuple["FolderImages", np.ndarray, list[str],
                                                                      np.ndarray]:
    """The uint8 images (FolderImages: decoded when read), labels, class names and positions in the folder's listing
    of a labelled folder (root/<class>/...; the model's class names), a fixed random subset of `limit` if given (`limited`): the
    torch-free counterpart of `load_split_images`. A checkpoint among `predictors` must not have trained on the
    folder (`refuse_training_folder`)."""
    paths, labels = folder_listing(folder, class_names, predictors)
    idx = limited(len(paths), limit)
    images = FolderImages([paths[i] for i in idx])  # a path or a multi-frame DICOM's frame, decoded when read
    return images, np.asarray(labels, dtype=np.int64)[idx], list(class_names), idx


def folder_listing(folder: str | Path, class_names: list[str], predictors: Sequence[Predictor] = ()
                   ) -> tuple[list, list[int]]:
    """A labelled folder's images (paths, multi-frame DICOM frames refused) and labels in `class_names`' order;
    refused when a checkpoint among `predictors` trained on the folder (`refuse_training_folder`)."""
    from edgekd.runtime.inputs import collect_labelled

    for p in predictors:
        if p.trained is not None:
            refuse_training_folder(folder, p.trained, p.trained["path"])
    return collect_labelled(folder, list(class_names))


def refuse_training_folder(folder: str | Path, trained: dict[str, Any] | None, checkpoint: str | Path) -> None:
    """`eval --data DIR` scores DIR's images as unseen: DIR being (or holding, or inside) the folder the checkpoint
    trained on would score its training images."""
    from edgekd.data import data_path_key, split_name

    path = ((trained or {}).get("recipe") or {}).get("data", {}).get("path")
    if not path:
        return
    given, own = Path(data_path_key(str(folder))), Path(data_path_key(path))
    if given.parent == own and split_name(given.name) == "test":  # it said "its images include training ones"
        raise EdgeKDError(f"--data {folder}: the test split folder of the data the checkpoint was trained on "
                          f"(data.path {path}): `edgekd eval {checkpoint}` scores it as the checkpoint's test split")
    if given.is_relative_to(own) or own.is_relative_to(given):
        raise EdgeKDError(f"--data {folder}: the folder the checkpoint was trained on (data.path {path}), or part of "
                          f"it: its images include training ones; score new images kept in a separate folder, or "
                          f"the checkpoint's own test split (`edgekd eval {checkpoint}`)")


def trained_images_warning(folder: str, paths: Sequence, trained: dict[str, Any] | None) -> str | None:
    """A copy of the checkpoint's train or val images in a labelled folder (`refuse_training_folder` catches the
    folder itself, not a copy): found by file content (the same bytes; only training files of a size the folder
    has are read), or by pixels when the checkpoint trained on an in-memory set (.npz images saved as PNGs). One-colour
    images are left out (two blank files are alike without being copies). None when there is no copy, or the
    training data is not found here (or is a continual run's, of several sets)."""
    recipe = (trained or {}).get("recipe")
    if not recipe or recipe.get("continual"):
        return None
    from edgekd.data import pixel_digest, split_tables
    from edgekd.fileio import sha256_file
    from edgekd.imageio import read_image
    from edgekd.recipe import recipe_from_dict

    try:
        tables, _, _ = split_tables(recipe_from_dict(recipe, where="the checkpoint's recipe"))
        seen = [tables[s] for s in ("train", "val") if s in tables]
        decoded: dict[int, np.ndarray] = {}  # each folder image decoded once (the pixel digests, the blank check)
        if tables["train"].images is not None:
            known = {fp for t in seen for fp in t.pixel_fingerprints()}
            decoded = {i: read_image(p) for i, p in enumerate(paths)}
            mine = [pixel_digest(decoded[i]) for i in range(len(paths))]
        else:
            sizes = {os.path.getsize(p) for p in paths}
            known = {sha256_file(p) for t in seen for p in t.paths or [] if os.path.getsize(p) in sizes}
            mine = [sha256_file(p) for p in paths]
    except (EdgeKDError, OSError):  # moved or unreadable: the scoring names what it cannot read
        return None
    hits = [str(p) for i, (p, fp) in enumerate(zip(paths, mine))
            if fp in known and np.ptp(decoded[i] if i in decoded else read_image(p)) > 0]
    if not hits:
        return None
    return (f"{len(hits)} of the {len(paths)} images in {folder} are identical in content to the checkpoint's own "
            f"train or val images (e.g. {hits[0]}): its figures include images the model trained on or was "
            "selected on")


FOLDER_CHUNK = 128
"""Images `predict_folder` decodes and scores at a time (`eval --data DIR`, `--failures` on a folder)."""


class SplitImages:
    """A recipe split's images at positions `idx`, decoded when indexed (`FolderImages`' counterpart)."""

    def __init__(self, dataset, idx: np.ndarray) -> None:
        self.dataset, self.idx = dataset, idx

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i):
        return np.ascontiguousarray(self.dataset.raw(int(self.idx[i])))


class FolderImages:
    """A labelled folder's images, decoded when indexed: what is shown of a folder of thousands of full-size scans
    (a failure grid's few examples) is read again, the rest never sits in memory."""

    def __init__(self, paths: Sequence) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        from edgekd.runtime.preprocess import as_image_array

        return as_image_array(self.paths[i])


def image_chunks(images: Sequence[np.ndarray]) -> Iterator[list[np.ndarray]]:
    """A folder's (or split's) images, decoded a chunk (FOLDER_CHUNK) at a time."""
    for i in range(0, len(images), FOLDER_CHUNK):
        yield [images[j] for j in range(i, min(i + FOLDER_CHUNK, len(images)))]


def predict_folder(predictor: Predictor, images: Sequence[np.ndarray]) -> np.ndarray:
    """The predictor's probabilities on a folder's (or split's) images, a chunk at a time (`image_chunks`)."""
    return np.concatenate([predictor.predict(chunk) for chunk in image_chunks(images)])


def decided_folder(predictor: Predictor, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, label indices) of `predict_folder`'s images: a bundle's labels as it gives them (its decision
    threshold), a checkpoint's top class; a chunk decoded at a time."""
    if predictor.decide is None:
        probs = predict_folder(predictor, images)
        return probs, probs.argmax(1)
    parts = [predictor.decide(chunk) for chunk in image_chunks(images)]
    return np.concatenate([p for p, _ in parts]), np.concatenate([k for _, k in parts])


def evaluate_on_folder(checkpoint: str | Path, out: str | Path, folder: str | Path,
                       task: str | None = None) -> dict[str, Any]:
    """`edgekd eval CHECKPOINT --data DIR [--task NAME]`: every image of a labelled folder (DIR/<class name>/...,
    new images kept apart from the training data) scored by the checkpoint with its own eval transform (a model with
    one head per task: by `task`'s head); metrics.json and plots as `evaluate_checkpoint` writes them, the split
    named `folder`."""
    from edgekd.data import recipe_positive
    from edgekd.metrics.report import evaluation_report

    predictor = checkpoint_predictor(checkpoint, task=task)
    paths, labels = folder_listing(folder, predictor.class_names, [predictor])
    try:
        probs = predict_folder(predictor, FolderImages(paths))
    except EdgeKDError as err:  # had ended there, with no way on but finding the file
        raise EdgeKDError(f"{err} (every image of --data {folder} is scored: move it out of the folder; "
                          f"`edgekd predict` with a bundle lists every unreadable file at once)") from None
    names = list(predictor.class_names)
    report = evaluation_report(np.asarray(labels, dtype=np.int64), probs, names, out, "folder", predictor.model,
                               positive=recipe_positive((predictor.trained or {}).get("recipe"), names))
    absent = absent_classes_warning(str(folder), np.bincount(labels, minlength=len(names)).tolist(), names)
    seen = trained_images_warning(str(folder), paths, predictor.trained)
    if absent or seen:  # (training warns of a split lacking a class itself, when the run starts)
        report["warning"] = "; ".join(w for w in (seen, absent, report.get("warning")) if w)
    result = {"checkpoint": str(checkpoint), "model": predictor.model, "role": predictor.role,
              "dataset": str(folder), **({"task": task} if task else {}), "folder": report}
    write_json(Path(out) / "metrics.json", result)
    return result


def corruption_records(predictors: Sequence[Predictor], images: Sequence[np.ndarray], labels: np.ndarray,
                       corruptions: list[str] | None = None, severities: list[int] | None = None, seed: int = 0,
                       log: Callable[[str], None] = print, progress=None,
                       positions: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Accuracy/AUC of every predictor on the clean images and under each corruption x severity (a step per
    condition and predictor on `progress`, the CLI's progress bar, if given). `positions`: each image's index in
    its split, which seeds its noise (default: its place in `images`)."""
    names, levels = check_names(corruptions), check_severities(severities)
    classes = {len(p.class_names) for p in predictors}
    if len(classes) != 1 or int(labels.max()) >= classes.pop():
        raise EdgeKDError(f"corruption eval: all models must have the data's classes (data: {int(labels.max()) + 1} "
                          f"or more; {', '.join(f'{p.label}: {len(p.class_names)}' for p in predictors)})")
    conditions = [(CLEAN, 0)] + [(n, s) for n in names for s in levels]
    keys = list(range(len(images)) if positions is None else positions)
    chunks = [range(i, min(i + FOLDER_CHUNK, len(images))) for i in range(0, len(images), FOLDER_CHUNK)]
    probs: dict[tuple[int, int], list[np.ndarray]] = {}
    # a chunk of images decoded once, then every condition and model on it: the split (full-size scans, a corrupted
    # copy per condition) never sits in memory whole; the noise is keyed by position, so chunking changes nothing
    with progress_task(progress, "corruptions", len(chunks) * len(conditions) * len(predictors)) as advance:
        for chunk in chunks:
            clean = [images[i] for i in chunk]
            for c, (name, severity) in enumerate(conditions):
                batch = clean if name == CLEAN else [corrupt(img, name, severity, seed, int(keys[i]))
                                                     for i, img in zip(chunk, clean)]
                for k, p in enumerate(predictors):
                    advance(0, f"{name}{'' if name == CLEAN else f' s{severity}'}: {p.label}")
                    probs.setdefault((c, k), []).append(p.predict(batch))
                    advance()
    records = []
    for c, (name, severity) in enumerate(conditions):
        for k, p in enumerate(predictors):
            m = accuracy_auc(labels, np.concatenate(probs[(c, k)]))
            records.append({"model": p.model, "role": p.role, "format": p.format, "precision": p.precision,
                            "corruption": name, "severity": severity, "acc": m["acc"], "auc": m["auc"],
                            "n": int(len(labels)), **({"nonfinite": m["nonfinite"]} if "nonfinite" in m else {})})
            if "nonfinite" in m:
                log(f"warning: {p.label} on {name}{'' if name == CLEAN else f' s{severity}'}: non-finite outputs on "
                    f"{m['nonfinite']} of {len(labels)} images: ACC and AUC left undefined")
        log(f"{name}{'' if name == CLEAN else f' s{severity}'}: " + ", ".join(
            f"{r['model']} {r['format']}/{r['precision']} acc {r['acc']:.4f}" for r in records[-len(predictors):]))
    return records


def _subject(r: dict[str, Any]) -> tuple[str, str, str, str]:
    return r["model"], r["role"], r["format"], r["precision"]


def corruption_summary(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model/format: clean acc/AUC, mean corruption accuracy/AUC over all corruptions x severities,
    accuracy relative to clean (mCA / clean acc), drop in points, and each corruption's mean accuracy."""
    out = []
    for key in dict.fromkeys(_subject(r) for r in records):
        rows = [r for r in records if _subject(r) == key]
        clean = next((r for r in rows if r["corruption"] == CLEAN), None)
        corrupted = [r for r in rows if r["corruption"] != CLEAN]
        if clean is None or not corrupted:
            continue
        mca = float(np.mean([r["acc"] for r in corrupted]))
        aucs = [r["auc"] for r in corrupted if r["auc"] == r["auc"]]
        per = {name: float(np.mean([r["acc"] for r in corrupted if r["corruption"] == name]))
               for name in dict.fromkeys(r["corruption"] for r in corrupted)}
        out.append({"model": key[0], "role": key[1], "format": key[2], "precision": key[3],
                    "clean_acc": clean["acc"], "clean_auc": clean["auc"], "mean_corruption_acc": mca,
                    "mean_corruption_auc": float(np.mean(aucs)) if aucs else float("nan"),
                    "relative_acc": mca / clean["acc"] if clean["acc"] else float("nan"),
                    "acc_drop_pts": 100 * (clean["acc"] - mca), "per_corruption_acc": per})
    return out


def corruption_markdown(summary: list[dict[str, Any]], title: str = "Corruption robustness") -> str:
    """Mean accuracy per corruption (over severities) for every model/format, with clean and mean columns."""
    if not summary:
        return f"### {title}\n\n(no results)"
    names = list(summary[0]["per_corruption_acc"])
    lines = [f"### {title}", "",
             "| model | role | format | clean acc | clean AUC | " + " | ".join(names)
             + " | mean corr. acc | mean corr. AUC | rel. to clean |",
             "|---|---|---|---:|---:|" + "---:|" * len(names) + "---:|---:|---:|"]
    def cell(value: float, spec: str = ".4f") -> str:  # undefined (an AUC of one class): a dash, not 'nan'
        return "-" if value != value else format(value, spec)

    for s in summary:
        cells = [cell(s["per_corruption_acc"][n]) for n in names]
        lines.append(f"| {s['model']} | {s['role']} | {s['format']}/{s['precision']} | {cell(s['clean_acc'])} | "
                     f"{cell(s['clean_auc'])} | " + " | ".join(cells) + f" | {cell(s['mean_corruption_acc'])} | "
                     f"{cell(s['mean_corruption_auc'])} | {cell(s['relative_acc'], '.1%')} |")
    return "\n".join(lines)


def plot_corruptions(records: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """One panel per corruption: accuracy vs severity (0 = clean) with a line per model/format."""
    from edgekd.metrics.plots import plt, save_figure

    names = list(dict.fromkeys(r["corruption"] for r in records if r["corruption"] != CLEAN))
    subjects = list(dict.fromkeys(_subject(r) for r in records))
    cols = 4
    rows = max(1, -(-len(names) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), sharey=True, squeeze=False)
    for ax, name in zip(axes.flat, names):
        for subj in subjects:
            mine = [r for r in records if _subject(r) == subj]
            clean = [r for r in mine if r["corruption"] == CLEAN]
            pts = sorted((r["severity"], r["acc"]) for r in mine if r["corruption"] == name)
            pts = [(0, clean[0]["acc"])] + pts if clean else pts
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3,
                    label=f"{subj[0]} ({subj[1]}) {subj[2]}/{subj[3]}")
        ax.set_title(name.replace("_", " "), fontsize=10)
        ax.set_xticks(range(0, 6))
        ax.set_xlabel("severity (0 = clean)", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=8, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(title or "Accuracy under corruptions")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return save_figure(fig, path)


CHART_PACKAGES = ("matplotlib", "sklearn", "scipy")
"""What the chart's plotting module (edgekd.metrics) imports: the train extra's; matplotlib alone is not enough."""


def run_corruption_eval(sources: Sequence[str | Path], out: str | Path, data_recipe=None, split: str = "test",
                        corruptions: list[str] | None = None, severities: list[int] | None = None, seed: int = 0,
                        limit: int | None = None, threads: int | None = None,
                        log: Callable[[str], None] | None = print, progress=None,
                        data_folder: str | Path | None = None) -> dict[str, Any]:
    """Score every checkpoint/bundle in `sources` on `split` of `data_recipe` (default: the first checkpoint's
    recipe), or on the labelled folder `data_folder` (torch-free for bundles), under all corruptions; writes
    robustness.json, robustness.md and (with matplotlib) robustness.png into `out`."""
    log = log or silent  # log=None: say nothing
    if not sources:
        raise EdgeKDError("corruption eval: give at least one checkpoint or bundle")
    recipe = None if data_folder is not None else (data_recipe or _recipe_of_first_checkpoint(sources))
    names, levels = check_names(corruptions), check_severities(severities)
    predictors = predictors_for(sources, threads)
    if data_folder is not None:
        images, labels, class_names, positions = load_folder_images(data_folder, predictors[0].class_names, limit,
                                                                    predictors)
        split = str(data_folder)
    else:
        images, labels, class_names, positions, _ = load_split_images(recipe, split, limit, predictors)
        from edgekd.data import check_class_order  # the training side: only for a recipe's data

        for p in predictors:
            check_class_order(p.class_names, class_names, p.label, log)
    scored = split if limit is None else f"the --limit {limit} subset of {split}"  # drawn unstratified
    counts = np.bincount(labels, minlength=len(class_names)).tolist()
    absent = absent_classes_warning(scored, counts, class_names)
    if absent:
        log(f"warning: {absent}")
    log(f"corruption eval: {len(predictors)} model/format(s) x {len(images)} {split} images x "
        f"{len(names)} corruptions x {len(levels)} severities")
    records = corruption_records(predictors, images, labels, names, levels, seed, log, progress, positions)
    summary = corruption_summary(records)
    out = Path(out)
    result = {"split": split, "images": len(images), "class_names": class_names,
              "class_counts": counts, "seed": seed,
              "corruptions": names, "severities": levels,
              "sources": [str(s) for s in sources], "records": records, "summary": summary}
    with deferred_signals():  # the set is replaced as one: json, md and the chart of this run, or no chart
        write_json(out / "robustness.json", result)
        write_text(out / "robustness.md", corruption_markdown(summary) + "\n")
        result["written"] = ["robustness.json", "robustness.md"]
        if all(find_spec(m) is not None for m in CHART_PACKAGES):  # the core install writes no PNG chart
            plot_corruptions(records, out / "robustness.png",
                             f"Accuracy under corruptions ({split}, {len(images)} images)")
            result["written"].append("robustness.png")
        else:  # an earlier run's chart would sit beside figures it does not show
            (out / "robustness.png").unlink(missing_ok=True)
    return result


def _recipe_of_first_checkpoint(sources: Sequence[str | Path], what: str = "corruption eval"):
    for src in sources:
        src = Path(src)
        ckpt_path = src / "best.pt" if src.is_dir() and (src / "best.pt").is_file() else src
        if ckpt_path.is_file() and ckpt_path.suffix == ".pt":
            from edgekd.recipe import recipe_from_dict  # the training side: only for a checkpoint
            from edgekd.train.checkpoint import load_checkpoint

            ckpt = load_checkpoint(ckpt_path)
            if ckpt.get("recipe") is None:
                raise EdgeKDError(f"{ckpt_path}: checkpoint has no embedded recipe (give --data RECIPE)")
            if ckpt.get("continual"):  # its recipe's top-level data section is not its tasks' data
                raise EdgeKDError(f"{ckpt_path}: a continual checkpoint learned several tasks' data; give the data "
                                  "to score with --data RECIPE (or DIR for a bundle)")
            return recipe_from_dict(ckpt["recipe"], where=f"{ckpt_path} (embedded recipe)")
    if what == "corruption eval":
        raise EdgeKDError("corruption eval of bundles needs labelled images: give --data DIR (one sub-folder per "
                          "class) or --data RECIPE (or a checkpoint too)")
    raise EdgeKDError(f"{what} of a bundle needs the data: give --data RECIPE")


def run_failure_analysis(source: str | Path, out: str | Path, data_recipe=None, split: str = "test",
                         top: int = 5, per_pair: int = 6, threads: int | None = None,
                         log: Callable[[str], None] | None = print, data_folder: str | Path | None = None) -> dict[str, Any]:
    """The most confused class pairs of one checkpoint (or a bundle's first artifact) on `split`, or on every
    image of the labelled folder `data_folder`, with example images: writes failures.json and failures.png into
    `out`."""
    log = log or silent  # log=None: say nothing
    from edgekd.metrics.failures import confused_pairs, plot_failure_grid

    predictor = predictors_for([source], threads)[0]
    if data_folder is not None:
        paths, folder_labels = folder_listing(data_folder, predictor.class_names, [predictor])
        images, labels, class_names = FolderImages(paths), np.asarray(folder_labels, dtype=np.int64), \
            list(predictor.class_names)
        split, files = str(data_folder), [str(p) for p in paths]
    else:
        from edgekd.data import check_class_order

        recipe = data_recipe or _recipe_of_first_checkpoint([source], "failure analysis")
        images, labels, class_names, _, files = load_split_images(recipe, split, predictors=[predictor])
        check_class_order(predictor.class_names, class_names, predictor.label, log)  # another task's data: refused
    probs, predicted = decided_folder(predictor, images)  # a bundle's labels (the argmax had hidden its misses)
    pairs = confused_pairs(labels, probs, top, predicted)
    out = Path(out)
    kind = ("the model's softmax" if predictor.format == "torch" else  # not a calibration's: it can move the argmax
            "the bundle's model's softmax (uncalibrated, as the checkpoint's)")
    result = {"source": str(source), "model": predictor.label, "split": split, "images": len(images),
              "probabilities": kind, "labels": "the bundle's (its calibration and decision threshold, as predict "
              "gives them)" if predictor.decide else "the top class", "errors": int((predicted != labels).sum()),
              "class_names": class_names,
              "pairs": [{**p, "true_name": class_names[p["true"]], "pred_name": class_names[p["pred"]],
                         **({"files": [files[i] for i in p["indices"]]} if files else {})} for p in pairs]}
    write_json(out / "failures.json", result)
    plot_failure_grid(images, pairs, class_names, out / "failures.png", per_pair,
                      f"{predictor.label}: most confused pairs on {split} ({result['errors']} errors / {len(images)})")
    return result
