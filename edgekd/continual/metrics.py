"""CL metrics as pure functions of an accuracy matrix R, where R[i, j] is the accuracy on task j after
learning task i (NaN for tasks not learned yet). The run only fills the matrix; these turn it into numbers."""

from __future__ import annotations

import numpy as np


def _matrix(acc_matrix) -> np.ndarray:
    r = np.asarray(acc_matrix, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] != r.shape[1] or r.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be square and non-empty, got shape {r.shape}")
    return r


def average_accuracy(acc_matrix, step: int = -1) -> float:
    """Mean accuracy over the tasks learned so far, after task `step` (default: the last)."""
    r = _matrix(acc_matrix)
    step = step % len(r)
    return float(np.mean(r[step, : step + 1]))


def forgetting_per_task(acc_matrix) -> np.ndarray:
    """For each earlier task j: its best accuracy before the last step minus its final accuracy
    (Chaudhry et al. 2018). The last task has no forgetting yet: NaN."""
    r = _matrix(acc_matrix)
    t = len(r)
    out = np.full(t, np.nan)
    for j in range(t - 1):
        out[j] = np.max(r[j: t - 1, j]) - r[t - 1, j]
    return out


def forgetting(acc_matrix) -> float:
    """Average forgetting over the tasks before the last (0.0 for a single task)."""
    per_task = forgetting_per_task(acc_matrix)
    return float(np.mean(per_task[:-1])) if len(per_task) > 1 else 0.0


def backward_transfer(acc_matrix) -> float:
    """BWT (Lopez-Paz & Ranzato 2017): mean over earlier tasks of final accuracy minus the accuracy right after
    learning it; negative means forgetting."""
    r = _matrix(acc_matrix)
    t = len(r)
    if t < 2:
        return 0.0
    return float(np.mean([r[t - 1, j] - r[j, j] for j in range(t - 1)]))


def retention(acc_matrix, task: int = 0) -> float:
    """Fraction of a task's accuracy kept at the end: R[last, task] / R[task, task]."""
    r = _matrix(acc_matrix)
    before = r[task, task]
    return float(r[-1, task] / before) if before > 0 else float("nan")


def retention_per_task(acc_matrix) -> np.ndarray:
    """retention(R, j) for every task j; the last task's is 1.0 by definition (NaN when R[j, j] is 0)."""
    r = _matrix(acc_matrix)
    return np.array([retention(r, j) for j in range(len(r))])


def retention_misses(acc_matrix, min_retention: float) -> list[tuple[int, float]]:
    """The retention gate: (task index, retention) of every earlier task whose retention is below
    `min_retention`, and of every one never learned (accuracy 0 right after learning it: retention NaN), which
    had passed the gate without a word."""
    kept = retention_per_task(acc_matrix)
    return [(j, float(kept[j])) for j in range(len(kept) - 1) if not kept[j] >= min_retention]
