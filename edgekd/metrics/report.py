"""Evaluation reports on disk: metrics.json, confusion matrix and ROC PNGs, a CSV training log."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.fileio import atomic_write
from edgekd.metrics.calibration import calibration_figures
from edgekd.metrics.classification import classification_metrics, confusion, one_class_warning
from edgekd.metrics.uncertainty import bootstrap_intervals


def write_csv_log(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(buf.getvalue()))


def evaluation_report(y: np.ndarray, probs: np.ndarray, class_names: list[str], out: str | Path,
                      split: str, title: str = "", plots: bool = True, positive: int = 1) -> dict[str, Any]:
    """Metrics (with 95% intervals, `bootstrap_intervals`, and calibration figures) plus the confusion matrix for one
    split, and a `warning` when its ACC is no better than its largest class's share; PNGs `confusion_<split>.png`
    and `roc_<split>.png`. `positive`: a two-class task's positive class (its sensitivity, AUC, ROC curve)."""
    from edgekd.metrics.plots import plot_confusion, plot_roc

    out = Path(out)
    m = classification_metrics(y, probs, positive)
    cm = confusion(y, probs)
    if plots:
        plot_confusion(cm, class_names, out / f"confusion_{split}.png", f"{title} {split}".strip())
        plot_roc(y, probs, class_names, out / f"roc_{split}.png", f"{title} {split}".strip(), positive)
    present = len(np.unique(y)) == probs.shape[1]  # intervals of AUC and per-class rates need every class
    counts = np.bincount(np.asarray(y).astype(int), minlength=len(class_names)).tolist()
    warning = one_class_warning(split, m.get("acc"), counts)
    return {"split": split, "n": int(len(y)), **m, "confusion_matrix": cm.tolist(), "class_names": list(class_names),
            "calibration": calibration_figures(probs, y),
            **({"positive_class": class_names[positive]} if len(class_names) == 2 else {}),
            "intervals": bootstrap_intervals(y, probs, positive=positive) if present else None,
            **({"warning": warning} if warning else {})}
