"""Continual checkpoints at export: their task layout (a head per task, or one expanding head), their tasks' data
with global labels, the retention gate on their accuracy matrix, and what edgekd.json and the card say of them."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
from torch.utils.data import ConcatDataset

from edgekd.continual import (backward_transfer, forgetting_per_task, recorded_tasks, retention_misses,
                              retention_per_task)
from edgekd.errors import EdgeKDError
from edgekd.export.parity import ParitySet, join_split_images


class RetentionGateError(EdgeKDError):
    """A continual checkpoint forgot an earlier task beyond the export profile's min_retention, or never learned
    one (no retention to keep); nothing written.
    `lines`: one per task that misses; `anyway` says how to export regardless, `outcome` what was not written
    (edgekd update re-raises it with its own)."""

    multiline = True  # the summary, then one indented line per task that misses

    def __init__(self, lines: list[str], anyway: str = "--allow-forgetting exports anyway",
                 outcome: str = "nothing was written"):
        self.lines = lines
        super().__init__(f"refusing to export: {len(lines)} earlier task(s) below the export profile's "
                         f"min_retention or never learned ({anyway}); {outcome}:\n  " + "\n  ".join(lines))


@dataclass
class TaskLayout:
    """What a continual checkpoint records of its tasks: head layout, tasks (name, class names, output rows) and
    the accuracy matrix of the run (R[i][j]: task j after learning task i)."""

    head: str
    scenario: str
    tasks: list[dict[str, Any]]
    acc_matrix: list[list[float]] | None

    @property
    def task_outputs(self) -> list[tuple[str, int, int]]:
        """(task, first output, end output) of each task's classes, under either head layout."""
        return [(t["name"], int(t["outputs"][0]), int(t["outputs"][1])) for t in self.tasks]

    @property
    def heads(self) -> list[tuple[str, int, int]] | None:
        """(task, first output, end output) per head of a multi-head model; None for one (expanding) head."""
        return self.task_outputs if self.head == "multi" else None


def task_layout(ckpt: dict[str, Any]) -> TaskLayout | None:
    """The layout of a continual checkpoint (run_continual's model.pt or task.pt), None for any other."""
    cont = ckpt.get("continual")
    if not cont:
        return None
    acc = (ckpt.get("metrics") or {}).get("acc_matrix")
    return TaskLayout(cont["head"], cont.get("scenario", ""), list(cont["tasks"]), acc)


class JoinedDataset(ConcatDataset):
    """The tasks' datasets of one split end to end, with their labels (`table.labels`, global) and decoded images
    (`raw`) as one dataset's: the card's Grad-CAM picks classes in turn over every task (it had shown the last
    task's only)."""

    def __init__(self, parts: list):
        super().__init__(parts)
        self.table = SimpleNamespace(labels=np.concatenate([np.asarray(p.table.labels) for p in parts]))

    def raw(self, i: int):
        part = int(np.searchsorted(self.cumulative_sizes, i, side="right"))
        return self.datasets[part].raw(i - (self.cumulative_sizes[part - 1] if part else 0))


class TaskUnion:
    """Every task's data as one data module for the export (global labels, the first task's preprocessing):
    its datasets are the tasks' concatenated; the parity set is built per task (`ParitySet`s merged)."""

    def __init__(self, tasks: list):
        self.tasks = tasks
        self.class_names = list(tasks[-1].data.class_names)
        self.preprocess = tasks[0].data.preprocess
        self.cfg = tasks[0].data.cfg

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def dataset(self, split: str, train: bool | None = None) -> JoinedDataset:
        return JoinedDataset([t.data.dataset(split, train=train) for t in self.tasks])

    def counts(self) -> dict[str, list[int]]:
        return {s: np.bincount(np.concatenate([t.data.tables[s].labels for t in self.tasks]),
                               minlength=self.num_classes).tolist() for s in ("train", "val", "test")}


def continual_data(recipe, layout: TaskLayout, where: str) -> TaskUnion:
    """The checkpoint's tasks rebuilt from its embedded recipe, checked against what the checkpoint recorded."""
    return TaskUnion(recorded_tasks(recipe, layout.tasks, where))


def merge_parity_sets(sets: list[ParitySet], layout: TaskLayout) -> ParitySet:
    """One parity set from each task's: inputs and views in task order, each metric split concatenated; the
    layout's heads (one per task) or, under one head, its tasks' outputs (scored per task)."""
    splits = {s: (join_split_images([p.splits[s][0] for p in sets]), np.concatenate([p.splits[s][1] for p in sets]))
              for s in sets[0].splits}
    rows = None
    if any(p.metric_rows is not None for p in sets):  # each task's scored rows, offset past the tasks before it
        offsets = {s: np.cumsum([0] + [len(p.splits[s][1]) for p in sets[:-1]]) for s in splits}
        rows = {s: np.concatenate([p.rows(s) + offsets[s][i] for i, p in enumerate(sets)]) for s in splits}
    return ParitySet(np.concatenate([p.inputs for p in sets]), [v for p in sets for v in p.views], splits,
                     layout.heads, metric_rows=rows, raw_parts=[part for p in sets for part in p.decoded_parts],
                     task_outputs=layout.task_outputs if layout.heads is None else None,
                     input_heads=None if layout.heads is None else  # task i's parity images go to head i
                     np.concatenate([np.full(len(p.inputs), i) for i, p in enumerate(sets)]))


def retention_report(layout: TaskLayout, min_retention: float, allow_forgetting: bool | str) -> dict[str, Any]:
    """The retention gate on the checkpoint's accuracy matrix: RetentionGateError (one line per earlier task below
    `min_retention`) unless `allow_forgetting` (True: the user's --allow-forgetting; a text: who else let it pass,
    recorded as `allowed_by`); else the record edgekd.json and the card show."""
    names = [t["name"] for t in layout.tasks]
    if layout.acc_matrix is None:
        raise EdgeKDError("continual checkpoint without an accuracy matrix (metrics.acc_matrix): the retention gate "
                          "needs it; export the run's model.pt")
    acc = np.asarray(layout.acc_matrix, dtype=np.float64)
    misses = retention_misses(acc, min_retention)
    lines = [f"task '{names[j]}': " + (f"retention {kept:.4f} < min_retention {min_retention:g} " if kept == kept
                                       else "never learned, no retention to keep ")
             + f"(accuracy {acc[j, j]:.4f} after learning it, {acc[-1, j]:.4f} now)" for j, kept in misses]
    if misses and not allow_forgetting:
        raise RetentionGateError(lines)
    return {"head": layout.head, "scenario": layout.scenario, "tasks": names, "acc_matrix": acc.tolist(),
            "retention": retention_per_task(acc).tolist(), "forgetting": forgetting_per_task(acc).tolist(),
            "bwt": backward_transfer(acc), "min_retention": min_retention,
            "gate": "allowed forgetting" if misses else "passed", "misses": lines,
            **({"allowed_by": allow_forgetting if isinstance(allow_forgetting, str) else "--allow-forgetting"}
               if misses else {})}


def task_metadata(layout: TaskLayout) -> list[dict[str, Any]] | None:
    """edgekd.json `tasks` of a multi-head bundle: each task's name, class names and output slice [lo, hi)."""
    if layout.heads is None:
        return None
    return [{"name": t["name"], "class_names": list(t["class_names"]), "outputs": list(t["outputs"])}
            for t in layout.tasks]


def _cell(v: Any) -> str:
    return "-" if v is None or v != v else f"{v:.4f}"


def continual_card_section(continual: dict[str, Any], tasks: list[dict[str, Any]] | None) -> list[str]:
    """The card's continual-learning section: heads, the accuracy matrix, retention, forgetting and the gate."""
    names = continual["tasks"]
    lines = ["", "## Continual learning", ""]
    if tasks:
        lines += ["One head per task: output `logits` is the heads side by side, each task's slice has its own "
                  "softmax (`edgekd predict --task NAME` picks one). No calibration temperature or decision "
                  "threshold is fit for a multi-head bundle (they need a single task): labels are each head's top "
                  "class.", "", "| task | classes | output slice |", "|---|---|---|"]
        lines += [f"| {t['name']} | {', '.join(t['class_names'])} | [{t['outputs'][0]}, {t['outputs'][1]}) |"
                  for t in tasks]
        lines.append("")
    lines += [f"Accuracy matrix (row: after learning that task; column: accuracy on that task; {continual['head']} "
              "head, the run's evaluation split):", "", "| after \\ on | " + " | ".join(names) + " |",
              "|---|" + "---|" * len(names)]
    lines += [f"| {names[i]} | " + " | ".join(_cell(v) if j <= i else "" for j, v in enumerate(row)) + " |"
              for i, row in enumerate(continual["acc_matrix"])]
    lines += ["", "| task | retention (final / after learning) | forgetting |", "|---|---|---|"]
    lines += [f"| {n} | {_cell(r)} | {_cell(f)} |" for n, r, f in zip(names, continual["retention"],
                                                                        continual["forgetting"])]
    gate = continual["gate"]
    lines += ["", f"Retention gate: every earlier task >= {continual['min_retention']:g}: **{gate}**"
              + (f" (exported by {continual.get('allowed_by', '--allow-forgetting')}):" if continual["misses"]
                 else ".")]
    lines += [f"- {m}" for m in continual["misses"]]
    return lines
