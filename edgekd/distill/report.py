"""The KD comparison report: per dataset, baseline / teacher / student from scratch / distilled student in one table."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgekd.errors import EdgeKDError
from edgekd.formats import param_count
from edgekd.fileio import sha256_file, staged_files, write_json, write_text
from edgekd.progress import silent

ROLE_ORDER = ("baseline", "teacher", "student_scratch", "student")
COLUMNS = ("acc", "auc", "f1", "sensitivity", "specificity", "ppv", "pauc")
HEADERS = {"f1": "F1 (macro)", "sensitivity": "sensitivity (recall)", "ppv": "PPV (precision)"}
"""A two-class table's headers: its sensitivity is the positive class's recall, its PPV that class's precision."""


def resolve_checkpoint(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():  # a missing x.zip had been "an exported bundle, not a checkpoint"
        raise EdgeKDError(f"{path}: no checkpoint (give a run directory holding best.pt, or a .pt file)")
    if path.is_dir() and (path / "kfold.json").is_file() and not (path / "best.pt").is_file():
        runs = sorted(p.parent.relative_to(path).as_posix() for p in path.glob("fold0/*/best.pt"))
        raise EdgeKDError(f"{path}: a k-fold folder (its summary over the folds is kfold.md); give fold runs to "
                          f"compare, e.g. {' '.join(str(path / r) for r in runs) or str(path / 'fold0' / '<role>')}")
    if path.is_dir() and (path / "splits.json").is_file() and not (path / "best.pt").is_file():  # a fold folder
        runs = sorted(str(p.parent) for p in path.glob("*/best.pt"))
        raise EdgeKDError(f"{path}: a fold of a k-fold run; give its runs, e.g. {' '.join(runs) or path / '<role>'}")
    from edgekd.runtime import is_bundle

    if is_bundle(path):
        raise EdgeKDError(f"{path}: an exported bundle, not a checkpoint (give the run directory it was exported "
                          "from, holding best.pt)")
    if path.is_dir() and not (path / "best.pt").is_file() and (path / "model.pt").is_file():  # said: no checkpoint
        raise EdgeKDError(f"{path}: a continual run; its figures per task are in {path / 'continual.json'} and "
                          "`edgekd eval` of its model.pt (report compares single-task runs on one dataset)")
    if path.is_dir():
        path = path / "best.pt"
    if not path.is_file():
        raise EdgeKDError(f"{path}: no checkpoint (give a run directory holding best.pt, or a .pt file)")
    return path


def evaluate_for_report(checkpoint: Path, split: str, overrides: list[str] | None = None,
                        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Re-run one checkpoint on `split` of its own recipe's data (`overrides`: `--set` keys over that recipe, e.g.
    data.path=... for a run made in another folder): metrics, probabilities, size. The data's classes in another
    order than the model's are refused, as eval and export refuse them (every figure would be inverted)."""
    from edgekd.data import build_checkpoint_data, check_class_order, check_trained_splits
    from edgekd.metrics import bootstrap_intervals, classification_metrics, confusion
    from edgekd.models import count_macs, count_parameters
    from edgekd.probability import softmax
    from edgekd.recipe import apply_overrides, recipe_from_dict
    from edgekd.train.checkpoint import model_from_checkpoint
    from edgekd.train.trainer import predict_logits, resolve_device

    model, ckpt = model_from_checkpoint(checkpoint)
    if (ckpt.get("recipe") or {}).get("continual"):  # its top-level data is not what each task trained on
        raise EdgeKDError(f"{checkpoint}: a continual checkpoint; its figures per task are in its run's "
                          "continual.json (report compares single-task runs on one dataset)")
    if len(ckpt["class_names"]) != 2:  # one report, tables of two-class and multi-class sets: the key is the former's
        overrides = [o for o in overrides or [] if o.split("=", 1)[0].strip() != "data.positive_class"]
    recipe = recipe_from_dict(apply_overrides(ckpt["recipe"], overrides or []), where=f"{checkpoint} (embedded recipe)")
    data = build_checkpoint_data(recipe)
    check_class_order(list(ckpt["class_names"]), list(data.class_names), str(checkpoint), log)  # counts too
    check_trained_splits(ckpt, data, recipe, str(checkpoint))
    device = resolve_device("auto")
    y, logits = predict_logits(model.to(device), data.loader(split, train=False), device)
    probs, positive = softmax(logits), data.positive
    return {
        "checkpoint": str(checkpoint), "name": recipe.name, "role": ckpt.get("role", recipe.role), "seed": recipe.seed,
        "model": ckpt["arch"]["name"], "dataset": data.source_name, "split": split,  # the data scored (--set)
        "input_size": ckpt["preprocess"]["input_size"], "params": count_parameters(model),
        "macs": count_macs(model.cpu(), tuple(ckpt["preprocess"]["input_size"])),
        "teacher": (ckpt.get("distill") or {}).get("teacher"),
        # which teacher a student learned from, by content: its recorded path is relative to where it trained
        "_teacher_sha256": (ckpt.get("distill") or {}).get("teacher_sha256"),
        "_sha256": sha256_file(checkpoint) if ckpt.get("role", recipe.role) == "teacher" else None,
        **classification_metrics(y, probs, positive), "confusion_matrix": confusion(y, probs).tolist(),
        "intervals": bootstrap_intervals(y, probs, positive=positive) if len(np.unique(y)) == probs.shape[1] else None,
        "positive_class": data.class_names[positive] if probs.shape[1] == 2 else None, "_positive": positive,
        "class_names": list(ckpt["class_names"]), "images": int(len(y)), "_y": y, "_probs": probs,
        "_scored": scored_images(data.tables[split]),
    }


def scored_images(table) -> str:
    """What a row was scored on, in order, with each label: image files by real path, size and modification time
    (not read again), in-memory images by their pixels. Rows compare (one table, a paired DeLong test) only when
    this matches; equal labels alone had paired two folders of other images."""
    digest = hashlib.sha256()
    if table.paths is not None:
        items = [f"{os.path.realpath(p)}:{st.st_size}:{st.st_mtime_ns}" for p in table.paths for st in [os.stat(p)]]
    else:
        items = table.fingerprints()
    for item, label in zip(items, table.labels.tolist()):
        digest.update(f"{item}\t{label}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def name_apart(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of one recipe name and seed (a recipe trained twice with other --set values; a run's best.pt and
    last.pt) read alike in the table and wrote one confusion PNG over the other: each gets its checkpoint's folder
    and file name after its own (`demo-student@student-last`), or its whole path when those match too."""
    key = lambda r: (r["name"], r["seed"])  # noqa: E731
    tags = (lambda p: f"{p.parent.name}-{p.stem}", lambda p: re.sub(r"[^A-Za-z0-9_.-]+", "-", str(p)).strip("-"))
    for tag in tags:
        counts = Counter(map(key, rows))
        for r in [r for r in rows if counts[key(r)] > 1]:
            r["name"] = f"{r['name'].split('@')[0]}@{tag(Path(r['checkpoint']))}"
    return rows


def comparison_report(runs: list[str | Path], out: str | Path, split: str = "test",
                      overrides: list[str] | None = None, log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """One table per dataset over the given runs (run dirs or checkpoints); writes report.md, report.json,
    roc_<dataset>.png (every model's ROC on one plot) and confusion_<dataset>_<name>_s<seed>.png per model."""
    log = log or silent  # log=None: say nothing
    from edgekd.metrics.plots import plot_confusion

    if not runs:
        raise EdgeKDError("report: give at least one run directory or checkpoint")
    out = Path(out)
    checkpoints = [resolve_checkpoint(r) for r in runs]
    seen: dict[Path, int] = {}
    for i, ckpt in enumerate(checkpoints):  # twice the same model: two identical rows, a DeLong test of itself
        first = seen.setdefault(ckpt.resolve(), i)
        if first != i:
            raise EdgeKDError(f"report: {runs[i]} and {runs[first]} are the same checkpoint ({ckpt})")
    rows = name_apart([evaluate_for_report(ckpt, split, overrides, log) for ckpt in checkpoints])
    order = {r: i for i, r in enumerate(ROLE_ORDER)}
    rows.sort(key=lambda r: (r["dataset"], order.get(r["role"], len(order)), r["params"]))
    groups = {d: [r for r in rows if r["dataset"] == d] for d in dict.fromkeys(r["dataset"] for r in rows)}
    for dataset, group in groups.items():
        one_positive_class(dataset, group)
    tables = {d: report_markdown(d, split, g) + different_images_note(g) + auc_comparisons(g)
              for d, g in groups.items()}
    clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    markdown = "\n\n".join(tables.values())
    def drop_earlier(stage: Path) -> None:  # an earlier report's files this one does not replace
        for stale in report_files(out):
            if not (stage / stale.name).exists():
                stale.unlink(missing_ok=True)

    # staged: an earlier report's files go and this one's come as one step; a failure midway (a full disk, a plot
    # that fails) leaves the earlier report whole (its files had been removed first, then half replaced)
    with staged_files(out, last="report.json", before_publish=drop_earlier) as stage:
        for dataset, group in groups.items():
            plot_roc_comparison(group, stage / f"roc_{dataset}.png", f"{dataset} ({split})")
            for r in group:
                plot_confusion(np.asarray(r["confusion_matrix"]), r["class_names"], stage / confusion_name(r),
                               f"{r['name']} ({r['role']}, seed {r['seed']}), {split}")
        write_json(stage / "report.json", {"split": split, "rows": clean})
        write_text(stage / "report.md", markdown + "\n")
    return {"rows": clean, "tables": tables, "markdown": markdown}


def confusion_name(row: dict[str, Any]) -> str:
    return f"confusion_{row['dataset']}_{row['name']}_s{row['seed']}.png"


def report_files(out: Path) -> list[Path]:
    """The files an earlier `edgekd report` into `out` wrote, as its report.json lists them (a run folder may
    hold a report: its own plots are not these)."""
    try:
        rows = json.loads((out / "report.json").read_text())["rows"]
        names = {f"roc_{r['dataset']}.png" for r in rows} | {confusion_name(r) for r in rows}
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [out / n for n in sorted(names)] + [out / "report.json", out / "report.md"]


def report_markdown(dataset: str, split: str, rows: list[dict[str, Any]]) -> str:
    said = ["Brackets: 95% intervals, stratified bootstrap (1000 resamples, seed 0); a two-class task's ACC, "
            "sensitivity and specificity: Wilson score.", ""] \
        if any(r.get("intervals") for r in rows) else []  # none without intervals (one class: nothing to resample)
    positive = rows[0].get("positive_class")
    said += [f"Sensitivity (its recall), specificity, PPV (its precision) and pAUC are the positive "
             f"class's: `{positive}`; F1 is the macro mean over both classes.", ""] if positive else [
        "Sensitivity, specificity and F1 are macro means over the classes, AUC and pAUC one-vs-rest macro means "
        "(the ROC plot's legend gives each model's micro-average AUC, of its pooled one-vs-rest curve); PPV is for "
        "two-class tasks.", ""]
    headers = [HEADERS.get(k, k) if positive else {"f1": "F1 (macro)"}.get(k, k) for k in COLUMNS]
    lines = [f"### {dataset} ({split} split)", "", *said,
             "| model | role | seed | params | MMACs | images | " + " | ".join(headers) + " |",
             "|---|---|---:|---:|---:|---:|" + "---:|" * len(COLUMNS)]
    for r in rows:
        ci = r.get("intervals") or {}
        cells = [("-" if r.get(k) is None or r[k] != r[k] else f"{r[k]:.4f}"
                  + (f" [{ci[k]['low']:.3f}, {ci[k]['high']:.3f}]" if k in ci else "")) for k in COLUMNS]
        lines.append(f"| {r['name']} ({r['model']}) | {r['role']} | {r['seed']} | {param_count(r['params'])} | "
                     f"{r['macs'] / 1e6:.1f} | {r['images']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def one_positive_class(dataset: str, rows: list[dict[str, Any]]) -> None:
    """Rows of one two-class table must give their sensitivity/specificity for one class (data.positive_class)."""
    named = {r["name"]: r["positive_class"] for r in rows if r.get("positive_class")}
    if len(set(named.values())) > 1:
        raise EdgeKDError(f"report: the {dataset} runs name different positive classes ("
                          + ", ".join(f"{c} in {n}" for n, c in named.items())
                          + "): give them one with --set data.positive_class=NAME")


def different_images_note(rows: list[dict[str, Any]]) -> str:
    """A line under a dataset's table whose rows were scored on different images (another data.limit, another
    file of the same dataset): their figures do not compare, and no DeLong test pairs them."""
    if all(r["_scored"] == rows[0]["_scored"] for r in rows):
        return ""
    counts = ", ".join(f"{r['name']} {r['images']}" for r in rows)
    return (f"\n\nWarning: these rows were scored on different {rows[0]['split']} images ({counts}): their figures "
            "do not compare, and no DeLong test pairs them.")


def auc_comparisons(rows: list[dict[str, Any]]) -> str:
    """Binary tasks: the DeLong test of each model's AUC against the teacher's on the same images, into the rows
    (`auc_vs`) and as a table. The reference: the teacher a student of the table was distilled from, else the first
    teacher (the smallest; with two teachers the smaller had been taken whoever taught), else the first model."""
    from edgekd.metrics import delong_test

    taught_by = {r["_teacher_sha256"] for r in rows if r.get("_teacher_sha256")}  # read from another folder,
    paths = {os.path.realpath(r["teacher"]) for r in rows if r.get("teacher")}  # a relative path named another file
    teachers = [r for r in rows if r["role"] == "teacher"]
    ref = next((t for t in teachers if t.get("_sha256") and t["_sha256"] in taught_by),  # else by path (older
               next((t for t in teachers if t.get("checkpoint")  # students record no sha256; a teacher file since
                     and os.path.realpath(t["checkpoint"]) in paths), (teachers or rows)[0]))  # retrained)
    others = [r for r in rows if r is not ref and r["_probs"].shape[1] == 2 and r["_scored"] == ref["_scored"]]
    if ref["_probs"].shape[1] != 2 or not others or len(np.unique(ref["_y"])) < 2:
        return ""
    lines = ["", "", f"AUC vs `{ref['name']}` ({ref['role']}), DeLong test on the same {len(ref['_y'])} images:", "",
             "| model | AUC | reference AUC | difference | z | p |", "|---|---:|---:|---:|---:|---:|"]
    for r in others:
        pos = ref.get("_positive", 1)
        t = delong_test(r["_y"], r["_probs"][:, pos], ref["_probs"][:, pos], pos)
        r["auc_vs"] = {"reference": ref["name"], **{k: t[k] for k in ("diff", "z", "p_value")}}
        z, p = ("-", "-") if t["z"] is None else (f"{t['z']:.2f}", f"{t['p_value']:.3g}")
        lines.append(f"| {r['name']} ({r['role']}) | {t['auc_a']:.4f} | {t['auc_b']:.4f} | {t['diff']:+.4f} | "
                     f"{z} | {p} |")
    return "\n".join(lines)


def plot_roc_comparison(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Binary: each model's ROC for the positive class; multi-class: each model's micro-averaged one-vs-rest ROC,
    its legend AUC marked as the micro average (the report's AUC column is the macro one: two AUCs of one model had
    stood side by side unnamed)."""
    from edgekd.metrics.plots import finish_roc, plt, roc_line, save_figure

    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    for r in rows:
        y, probs = r["_y"], r["_probs"]
        if probs.shape[1] == 2:
            pos = r.get("_positive", 1)
            truth, score, kind = y == pos, probs[:, pos], ""
        else:
            truth = (y[:, None] == np.arange(probs.shape[1])[None]).ravel()
            score, kind = probs.ravel(), ", micro-average"
        if 0 < truth.sum() < len(truth):
            roc_line(ax, truth, score, f"{r['name']} ({r['role']}){kind}")
    finish_roc(ax, title, rows[0].get("positive_class"))
    return save_figure(fig, path)
