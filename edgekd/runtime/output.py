"""Writing predictions to CSV or JSON (atomically), one row per input; failed inputs keep their error."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Sequence

from edgekd.errors import EdgeKDError
from edgekd.fileio import write_json, write_text
from edgekd.runtime.runner import Failure, Prediction

OUTPUT_SUFFIXES = (".csv", ".json")


def check_output_path(path: str | Path) -> Path:
    """Refuse an unknown suffix before any work is done."""
    path = Path(path)
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise EdgeKDError(f"{path}: --out must end with .csv or .json")
    return path


def predictions_csv(results: Sequence[Prediction | Failure], class_names: list[str]) -> str:
    """file, label, index, prob, p_<class>..., [<view>:p_<class>...], [uncalibrated:p_<class>...], error."""
    views: list[str] = []
    for r in results:
        if isinstance(r, Prediction) and r.view_probs:
            views = list(r.view_probs)
            break
    raw = any(isinstance(r, Prediction) and r.raw_probs is not None for r in results)
    header = ["file", "label", "index", "prob", *[f"p_{c}" for c in class_names],
              *[f"{v}:p_{c}" for v in views for c in class_names],
              *([f"uncalibrated:p_{c}" for c in class_names] if raw else []), "error"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for r in results:
        if isinstance(r, Failure):
            writer.writerow([r.source] + [""] * (len(header) - 2) + [r.error])
            continue
        row: list[Any] = [r.source, r.label, r.index, f"{r.prob:.6f}", *[f"{p:.6f}" for p in r.probs]]
        for v in views:
            row += [f"{p:.6f}" for p in (r.view_probs or {}).get(v, [""] * len(class_names))]
        if raw:
            row += [f"{p:.6f}" for p in r.raw_probs] if r.raw_probs is not None else [""] * len(class_names)
        writer.writerow(row + [""])
    return buf.getvalue()


def write_predictions(path: str | Path, results: Sequence[Prediction | Failure], class_names: list[str],
                      info: dict[str, Any] | None = None) -> Path:
    path = check_output_path(path)
    if path.suffix.lower() == ".csv":
        return write_text(path, predictions_csv(results, class_names))
    return write_json(path, {"class_names": class_names, **(info or {}),
                             "predictions": [r.to_dict() for r in results]})
