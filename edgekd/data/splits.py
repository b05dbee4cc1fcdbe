"""Train/val/test splits: given, stratified random, patient-level (grouped) and stratified (group) k-fold."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split

from edgekd.data.sources import Source, Table
from edgekd.errors import EdgeKDError


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held_out) with `fraction` held out, class proportions preserved (a plain seeded draw when a
    class has one item or a side is too small to hold every class)."""
    return _stratified_draw(labels, int(np.ceil(len(labels) * fraction)), seed)  # scikit-learn's count for a float


def stratified_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded subset of exactly `n` items with the class proportions of `labels` (all if
    n >= len)."""
    if n >= len(labels):
        return np.arange(len(labels))
    return _stratified_draw(labels, n, seed)[1]


def _stratified_draw(labels: np.ndarray, n_held: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    # An integer count: n / len as a float fraction can round up to n + 1 (400 of 624 gave 401).
    idx = np.arange(len(labels))
    counts = np.bincount(labels)
    classes = int((counts > 0).sum())
    stratify = labels if counts[counts > 0].min() >= 2 and min(n_held, len(labels) - n_held) >= classes else None
    keep, held = train_test_split(idx, test_size=n_held, random_state=seed, stratify=stratify)
    return np.sort(keep), np.sort(held)


def group_split(labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Like stratified_split, but every group (patient) lands wholly on one side."""
    n_splits = max(2, int(round(1.0 / fraction)))
    n_groups = len(np.unique(groups))
    if n_groups < n_splits:
        raise EdgeKDError(f"patient-level split needs at least {n_splits} patients, found {n_groups}")
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    keep, held = next(sgkf.split(np.zeros(len(labels)), labels, groups))
    return np.sort(keep), np.sort(held)


def kfold_indices(labels: np.ndarray, folds: int, seed: int, groups: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified k-fold, grouped by patient when groups are given: [(train_idx, val_idx)] per fold."""
    if groups is not None:
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        return [(np.sort(a), np.sort(b)) for a, b in splitter.split(np.zeros(len(labels)), labels, groups)]
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [(np.sort(a), np.sort(b)) for a, b in splitter.split(np.zeros(len(labels)), labels)]


def make_splits(source: Source, mode: str, val_fraction: float, test_fraction: float, seed: int,
                folds: int | None = None, fold: int | None = None) -> dict[str, Table]:
    """Resolve a source into train/val/test tables.

    Splits the source already has are kept (`given`); missing ones are carved from the training pool,
    stratified (`stratified`) or by patient (`patient`). With `folds`, the non-test pool is k-folded and
    fold `fold` is the validation split.
    """
    tables = dict(source.tables)
    if mode != "given" and "all" not in tables:
        # Re-split everything the source offers except its test split.
        pool = Table.concat([tables[s] for s in ("train", "val") if s in tables])
        tables = {"all": pool, **({"test": tables["test"]} if "test" in tables else {})}
    grouped = mode == "patient"
    if grouped and any(t.groups is None for t in tables.values()):
        raise EdgeKDError("data.split=patient needs patient ids (a CSV manifest with a patient_id column)")

    def carve(table: Table, fraction: float) -> tuple[Table, Table]:
        if grouped:
            keep, held = group_split(table.labels, table.groups, fraction, seed)
        else:
            keep, held = stratified_split(table.labels, fraction, seed)
        return table.subset(keep), table.subset(held)

    if "all" in tables:
        pool = tables.pop("all")
        if "test" not in tables:
            if test_fraction <= 0:
                raise EdgeKDError("data.test_fraction must be > 0 when the source has no test split")
            pool, tables["test"] = carve(pool, test_fraction)
        tables["train"] = pool
    if folds:
        pool = Table.concat([tables[s] for s in ("train", "val") if s in tables])
        if fold is None or not 0 <= fold < folds:
            raise EdgeKDError(f"data.fold must be in 0..{folds - 1} when data.folds={folds}")
        train_idx, val_idx = kfold_indices(pool.labels, folds, seed, pool.groups if grouped else None)[fold]
        tables["train"], tables["val"] = pool.subset(train_idx), pool.subset(val_idx)
    elif "val" not in tables:
        if val_fraction <= 0:
            raise EdgeKDError("data.val_fraction must be > 0 when the source has no val split")
        tables["train"], tables["val"] = carve(tables["train"], val_fraction)
    if grouped:
        assert_disjoint_groups(tables)
    return tables


def assert_disjoint_groups(tables: dict[str, Table]) -> None:
    seen: dict[str, str] = {}
    for split, t in tables.items():
        for g in np.unique(t.groups):
            if seen.setdefault(str(g), split) != split:
                raise EdgeKDError(f"patient {g} appears in both {seen[str(g)]} and {split}")
