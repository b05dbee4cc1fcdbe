"""Accuracy and the rank (Mann-Whitney) AUC in numpy alone: torch- and scikit-learn-free, so the edge-side bench and
corruption eval on the core install score as the training side's metrics do (tests check them against sklearn)."""

from __future__ import annotations

import numpy as np


def mid_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks along the last axis, ties sharing their mean rank (scipy's rankdata 'average')."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, axis=-1, kind="mergesort")
    ordered = np.take_along_axis(values, order, axis=-1)
    n = values.shape[-1]
    pos = np.broadcast_to(np.arange(n), ordered.shape)
    starts = np.concatenate([np.ones(ordered.shape[:-1] + (1,), bool), ordered[..., 1:] != ordered[..., :-1]], -1)
    ends = np.concatenate([starts[..., 1:], np.ones(ordered.shape[:-1] + (1,), bool)], -1)
    first = np.maximum.accumulate(np.where(starts, pos, 0), axis=-1)
    last = np.flip(np.minimum.accumulate(np.flip(np.where(ends, pos, n - 1), -1), axis=-1), -1)
    ranks = np.empty_like(ordered)
    np.put_along_axis(ranks, order, (first + last) / 2.0 + 1.0, axis=-1)
    return ranks


def rank_auc(labels: np.ndarray, score: np.ndarray, positive: int = 1) -> np.ndarray | float:
    """ROC AUC of `score` for class `positive` against the rest, ties counting half; along the last axis, so (rows,
    n) arrays give one AUC per row. NaN where a row lacks either side."""
    pos = np.asarray(labels) == positive
    n1 = pos.sum(axis=-1)
    n0 = pos.shape[-1] - n1
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((mid_ranks(score) * pos).sum(axis=-1) - n1 * (n1 + 1) / 2) / (n1 * n0)
    return float(auc) if np.ndim(auc) == 0 else auc


def accuracy_auc(labels: np.ndarray, probs: np.ndarray, positive: int = 1) -> dict[str, float]:
    """{"acc", "auc"} as `edgekd.metrics.classification_metrics` gives them: binary AUC of class `positive`,
    multi-class the macro one-vs-rest AUC; NaN unless every class is present. Non-finite probabilities (an INT8
    or FP16 model that overflowed) make both NaN and are counted in "nonfinite": an all-NaN row's argmax is class
    0, which had been scored as a right answer, and the ranks had given a finite AUC."""
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    k = probs.shape[1]
    bad = int((~np.isfinite(probs)).any(axis=1).sum())
    if bad:
        return {"acc": float("nan"), "auc": float("nan"), "nonfinite": bad}
    acc = float((probs.argmax(1) == labels).mean()) if len(labels) else float("nan")
    if len(np.unique(labels)) < k:
        return {"acc": acc, "auc": float("nan")}
    if k == 2:
        return {"acc": acc, "auc": rank_auc(labels, probs[:, positive], positive)}
    return {"acc": acc, "auc": float(np.mean([rank_auc(labels, probs[:, c], c) for c in range(k)]))}


def scoring_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded subset of `n` images to score on, with the class proportions of `labels` (largest
    remainder), every class at least once when n >= the class count, so AUC stays defined (a proportional share of
    6 of RetinaMNIST's 400 test images left its rarest grade out; scikit-learn's stratified draw leaves out a class
    of 3 in 1,053). All of them when n >= len(labels). numpy only: the core install's bench takes it too."""
    labels = np.asarray(labels)
    if n >= len(labels):
        return np.arange(len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    floor = np.ones_like(counts) if n >= len(classes) else np.zeros_like(counts)
    spare, rest = counts - floor, n - int(floor.sum())
    share = spare / spare.sum() * rest
    alloc = floor + np.floor(share).astype(int)
    alloc[np.argsort(-(share - np.floor(share)), kind="stable")[:n - int(alloc.sum())]] += 1
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), size=int(k), replace=False)
                                   for c, k in zip(classes, alloc)]))


def absent_classes_warning(split: str, counts: list[int], class_names: list[str]) -> str | None:
    """A warning when a split (e.g. a labelled folder) holds no image of some class: AUC and the per-class figures
    are undefined on it (null in the JSON); None when every class is there."""
    absent = [name for name, n in zip(class_names, counts) if n == 0]
    if not absent:
        return None
    per_class = ("the sensitivity or specificity of that class too" if len(class_names) == 2 else
                 "sensitivity, specificity, recall and F1 are means over the classes it holds")
    return (f"{split} holds no images of {', '.join(absent)}: AUC, PR-AUC and pAUC are undefined on it (null, shown "
            f"as -); {per_class}")
