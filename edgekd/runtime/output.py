"""Writing predictions to CSV or JSON (atomically), one row per input; failed inputs keep their error."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any, Sequence

from edgekd.errors import EdgeKDError
from edgekd.fileio import check_output_location, write_json, write_text
from edgekd.runtime.runner import Failure, Prediction, TaskPredictions

OUTPUT_SUFFIXES = (".csv", ".json")


def check_output_path(path: str | Path) -> Path:
    """Refuse an unknown suffix or a folder before any work is done."""
    path = Path(path)
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise EdgeKDError(f"{path}: --out must end with .csv or .json")
    if path.is_dir():
        raise EdgeKDError(f"{path}: --out is a folder (give a .csv or .json file name)")
    check_output_location(path, "--out", is_file=True)  # under a file, or a folder that takes no new file
    if path.is_symlink():  # written where the link points, as a shell's `>` would (it had replaced the link)
        path = Path(os.path.realpath(path))
    return path


def _columns(preds: Sequence[Prediction], class_names: list[str],
             shape: tuple[list[str], bool] | None = None) -> tuple[list[str], list[str], bool]:
    """label, index, prob, p_<class>..., [<view>:p_<class>...], [uncalibrated:p_<class>...] of these predictions;
    the views and whether uncalibrated columns are there (`shape`: the runner's (views, calibrated), so the columns
    do not depend on which files failed; else read from the predictions)."""
    views = list(shape[0]) if shape else next((list(p.view_probs) for p in preds if p.view_probs), [])
    raw = shape[1] if shape else any(p.raw_probs is not None for p in preds)
    return (["label", "index", "prob", *[f"p_{c}" for c in class_names],
             *[f"{v}:p_{c}" for v in views for c in class_names],
             *([f"uncalibrated:p_{c}" for c in class_names] if raw else [])], views, raw)


def _cells(r: Prediction, n_classes: int, views: list[str], raw: bool) -> list[Any]:
    row: list[Any] = [r.label, r.index, f"{r.prob:.6f}", *[f"{p:.6f}" for p in r.probs]]
    for v in views:  # a prediction without this view (e.g. run without TTA): empty cells
        seen = (r.view_probs or {}).get(v)
        row += [f"{p:.6f}" for p in seen] if seen is not None else [""] * n_classes
    if raw:
        row += [f"{p:.6f}" for p in r.raw_probs] if r.raw_probs is not None else [""] * n_classes
    return row


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
"""What a spreadsheet reads as the start of a formula in a text cell (OWASP's CSV injection list)."""


def spreadsheet_safe(text: str) -> str:
    """A text cell (file name, class name, error) that a spreadsheet shows as text: a leading ' when it would start a
    formula (a file named `=1+2+cmd|calc!A1.png` was written as is, and Excel ran it as a formula)."""
    return f"'{text}" if text.startswith(FORMULA_START) else text


def predictions_csv(results: Sequence[Prediction | TaskPredictions | Failure], class_names: list[str],
                    tasks: list[tuple[str, list[str]]] | None = None,
                    shape: tuple[list[str], bool] | None = None, task_column: bool | None = None) -> str:
    """file, [task,] label, index, prob, p_<class>..., [<view>:p_<class>...], [uncalibrated:p_<class>...], warning
    (e.g. a blank image: the answer means nothing), error.
    A `task` column when the predictions are one task's of a multi-head bundle; with `tasks` (a multi-head
    bundle, no task chosen: TaskPredictions) one row per image and every task's columns side by side, each
    prefixed `<task>:`. `task_column`: whether the `task` column is there (a multi-head bundle's chosen task, so
    the columns do not depend on which files failed); None: when a prediction has a task."""
    done = [r for r in results if not isinstance(r, Failure)]
    groups = [(name, names, [r.tasks[name] for r in done]) for name, names in tasks] if tasks else \
        [(None, class_names, done)]
    layout = [(name, names, *_columns(preds, names, shape)) for name, names, preds in groups]
    with_task = not tasks and (task_column if task_column is not None else
                               any(getattr(r, "task", None) is not None for r in done))
    header = ["file", *(["task"] if with_task else []),
              *[f"{name}:{c}" if name else c for name, _, cols, _, _ in layout for c in cols], "warning", "error"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(map(spreadsheet_safe, header))
    for r in results:
        if isinstance(r, Failure):
            writer.writerow([spreadsheet_safe(r.source)] + [""] * (len(header) - 2) + [spreadsheet_safe(r.error)])
            continue
        row: list[Any] = [spreadsheet_safe(r.source), *([spreadsheet_safe(r.task or "")] if with_task else [])]
        for name, names, _, views, raw in layout:
            cells = _cells(r.tasks[name] if name else r, len(names), views, raw)
            row += [spreadsheet_safe(cells[0]), *cells[1:]]  # the label: a class name
        warning = r.warning if isinstance(r, Prediction) else next(iter(r.tasks.values())).warning  # per image
        writer.writerow(row + [spreadsheet_safe(warning or ""), ""])
    return buf.getvalue()


def write_predictions(path: str | Path, results: Sequence[Prediction | TaskPredictions | Failure],
                      class_names: list[str], info: dict[str, Any] | None = None,
                      tasks: list[tuple[str, list[str]]] | None = None,
                      shape: tuple[list[str], bool] | None = None) -> Path:
    """CSV (`predictions_csv`) or JSON ({class_names, info..., predictions: [Prediction/TaskPredictions.to_dict()]})."""
    path = check_output_path(path)
    if path.suffix.lower() == ".csv":
        chosen = info["task"] is not None if info and "tasks" in info and "task" in info else None  # a head's
        return write_text(path, predictions_csv(results, class_names, tasks, shape, chosen))
    return write_json(path, predictions_document(results, class_names, info))


def predictions_document(results: Sequence[Prediction | TaskPredictions | Failure], class_names: list[str],
                         info: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a JSON output holds: {class_names, info..., predictions: [Prediction/TaskPredictions.to_dict()]}."""
    return {"class_names": class_names, **(info or {}), "predictions": [r.to_dict() for r in results]}
