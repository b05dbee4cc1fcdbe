"""Train/val/test splits: given, stratified random, patient-level (grouped) and stratified (group) k-fold."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split

from edgekd.data.sources import Source, Table
from edgekd.errors import EdgeKDError


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held_out) with `fraction` held out, class proportions preserved (a plain seeded draw when a
    class has one item or a side is too small to hold every class)."""
    n_held = int(np.ceil(len(labels) * fraction))  # scikit-learn's count for a float
    if n_held >= len(labels):  # (scikit-learn's ValueError had ended the run with a traceback's last line)
        raise EdgeKDError(f"{len(labels)} image(s) are too few to hold out a share of {fraction:g} ({n_held}) and "
                          "keep any to train on: give more images, or the splits yourself")
    return _stratified_draw(labels, n_held, seed)


def stratified_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded subset of exactly `n` items with the class proportions of `labels` (all if
    n >= len), holding at least one item of every class when n is at least the number of classes."""
    if n >= len(labels):
        return np.arange(len(labels))
    return _with_every_class(labels, _stratified_draw(labels, n, seed)[1], seed)


def _with_every_class(labels: np.ndarray, held: np.ndarray, seed: int) -> np.ndarray:
    # scikit-learn's stratified draw rounds a rare class's share down to 0 items (3 of 100 at n=20 gets none).
    # Each missing class takes the place of a seeded pick among the subset's largest class, which keeps >= 1 item.
    missing = np.setdiff1d(np.unique(labels), labels[held])
    if not len(missing) or len(held) < len(np.unique(labels)):
        return held
    rng = np.random.default_rng(seed)
    held = held.copy()
    for cls in missing:
        largest = np.bincount(labels[held]).argmax()
        held[rng.choice(np.flatnonzero(labels[held] == largest))] = rng.choice(np.flatnonzero(labels == cls))
    return np.sort(held)


def _stratified_draw(labels: np.ndarray, n_held: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    # An integer count: n / len as a float fraction can round up to n + 1 (400 of 624 gave 401).
    # A class of one image stays on the keep side and the others are stratified (one such class had turned
    # stratification off for every class: a class of 4 left out of test in 23 of 50 seeds).
    alone = np.flatnonzero(np.bincount(labels)[labels] == 1)
    aside = alone if n_held < len(labels) - len(alone) else alone[:0]  # kept out of the draw, on the keep side
    idx = np.setdiff1d(np.arange(len(labels)), aside)
    rest = np.bincount(labels[idx])
    classes = int((rest > 0).sum())
    stratify = labels[idx] if rest[rest > 0].min() >= 2 and min(n_held, len(idx) - n_held) >= classes else None
    keep, held = train_test_split(idx, test_size=n_held, random_state=seed, stratify=stratify)
    return np.sort(np.concatenate([keep, aside])), np.sort(held)


GIVE_SPLITS = "give the splits yourself (train/ val/ test/ folders, or a CSV manifest's split column)"


def group_split(labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int,
                what: str = "a split", class_names: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Like stratified_split, but every group (patient) lands wholly on one side: m consecutive folds of a seeded
    stratified group k-fold (`fold_share`: m/k near `fraction`), the first run of them that leaves every class on
    both sides."""
    n_groups = len(np.unique(groups))
    present, counts = np.unique(labels, return_counts=True)
    taken, n_splits = fold_share(fraction, most=min(20, n_groups, int(counts.max())))
    if n_groups < n_splits:
        raise EdgeKDError(f"carving {what} by patient needs at least {n_splits} patients, found {n_groups} "
                          f"({GIVE_SPLITS}, or a larger fraction)")
    if counts.max() < n_splits:  # scikit-learn's own ValueError had ended the run with a traceback
        raise EdgeKDError(f"carving {what} by patient as {taken}/{n_splits} needs a class with at least {n_splits} images, "
                          f"the largest has {counts.max()} ({GIVE_SPLITS}, or a larger fraction)")
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # "the least populated class has only 5 members < n_splits=7": checked here
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        draws = list(sgkf.split(np.zeros(len(labels)), labels, groups))
    for start in range(n_splits):
        held = np.concatenate([draws[(start + i) % n_splits][1] for i in range(taken)])
        keep = np.setdiff1d(np.arange(len(labels)), held)
        if all(np.isin(present, labels[side]).all() for side in (keep, held)):
            return np.sort(keep), np.sort(held)
    short, count = fewest_units(labels, groups)
    held_patients = -(-n_groups * taken // n_splits)  # the most a draw of taken/n_splits holds (its folds' sizes)
    if count >= 2 and held_patients < len(present):  # the class named below had looked like the cause (6 of 26)
        raise EdgeKDError(f"carving {what} by patient: {taken}/{n_splits} of the {n_groups} patients is at most "
                          f"{held_patients}, fewer than the {len(present)} classes that each need a patient there; "
                          f"a larger data.val_fraction / data.test_fraction, more patients, or {GIVE_SPLITS}")
    fix = (f"a class needs a patient on each side: give it more patients, or {GIVE_SPLITS[5:]}" if count < 2 else
           f"{GIVE_SPLITS}, or another data.val_fraction / data.test_fraction")
    raise EdgeKDError(f"carving {what} by patient: no draw of {taken}/{n_splits} of the {n_groups} patients keeps every "
                      f"class on both sides (class {class_label(short, class_names)} has {count} "
                      f"patient{'s' if count != 1 else ''}); {fix}")


def fold_share(fraction: float, near: float = 0.07, most: int = 20) -> tuple[int, int]:
    """(m, k): hold out m of k patient folds for a share `fraction`. The nearest 1/k when it is within `near` of it
    (the only choice before 2026-12-07, so the splits of runs trained then stay as they were: 0.4 is still 1/3), else
    the smallest k <= `most` (the patients, the largest class's images) with an m/k within 0.05 of it, else the
    nearest m/k: 1/k alone could not hold out more than half (0.7 and 0.6 had held out 50%)."""
    k = min(range(2, 101), key=lambda k: abs(1.0 / k - fraction))
    if abs(1.0 / k - fraction) <= near or most < 3:
        return 1, k
    pairs = [(m, k) for k in range(2, most + 1) for m in range(1, k)]
    close = [p for p in pairs if abs(p[0] / p[1] - fraction) <= 0.05]
    return close[0] if close else min(pairs, key=lambda p: (abs(p[0] / p[1] - fraction), p[1]))


def class_label(c: int, class_names: list[str] | None) -> str:
    """A class as an error names it: its name when known (with the id), else its id."""
    return f"'{class_names[c]}' (id {c})" if class_names is not None and 0 <= c < len(class_names) else f"id {c}"


def fewest_units(labels: np.ndarray, units: np.ndarray) -> tuple[int, int]:
    """(the class with the fewest distinct units, e.g. patients, and that count)."""
    present = np.unique(labels)
    counts = [len(np.unique(units[labels == c])) for c in present]
    return int(present[int(np.argmin(counts))]), min(counts)


def kfold_indices(labels: np.ndarray, folds: int, seed: int, groups: np.ndarray | None = None,
                  class_names: list[str] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified k-fold, grouped by patient when groups are given: [(train_idx, val_idx)] per fold. Every class
    must reach every fold's val split (else its metrics are undefined and the run stops at that fold)."""
    present = np.unique(labels)
    short, count = fewest_units(labels, groups if groups is not None else np.arange(len(labels)))
    kind = "patients" if groups is not None else "images"
    if folds > count:
        total = f" ({len(np.unique(groups))} patients in all)" if groups is not None else ""
        kind = kind[:-1] if count == 1 else kind
        raise EdgeKDError(f"--folds {folds}: class {class_label(short, class_names)} has {count} {kind} in the "
                          f"train/val pool{total}, too few for {folds} folds (each fold's val split needs one)")
    if groups is not None:
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        out = [(np.sort(a), np.sort(b)) for a, b in splitter.split(np.zeros(len(labels)), labels, groups)]
    else:
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        out = [(np.sort(a), np.sort(b)) for a, b in splitter.split(np.zeros(len(labels)), labels)]
    for i, (_, val) in enumerate(out):
        missing = np.setdiff1d(present, labels[val])
        if missing.size:
            raise EdgeKDError(f"--folds {folds}: fold {i}'s val split has no image of class "
                              f"{class_label(int(missing[0]), class_names)} "
                              f"({kind} are split whole); use fewer folds")
    return out


def make_splits(source: Source, mode: str, val_fraction: float, test_fraction: float, seed: int,
                folds: int | None = None, fold: int | None = None,
                class_names: list[str] | None = None) -> dict[str, Table]:
    """Resolve a source into train/val/test tables.

    Splits the source already has are kept (`given`); missing ones are carved from the training pool, by patient
    when the data has patient ids, else stratified by image. `stratified` and `patient` re-split everything but the
    test split (by image, or by patient). With `folds`, the non-test pool is k-folded and fold `fold` is the
    validation split. With patient ids, a patient in two splits is an error whatever the mode.
    """
    tables = dict(source.tables)
    if mode != "given" and "all" not in tables:
        # Re-split everything the source offers except its test split.
        pool = Table.concat([tables[s] for s in ("train", "val") if s in tables])
        tables = {"all": pool, **({"test": tables["test"]} if "test" in tables else {})}
    has_groups = all(t.groups is not None for t in tables.values())
    if mode == "patient" and not has_groups:
        raise EdgeKDError("data.split=patient needs patient ids: a CSV manifest with a patient_id column, "
                          "data.patient_pattern to read them from the file names, or data.dicom_patient_ids=true "
                          "for a folder of DICOM files")
    grouped = mode == "patient" or (mode == "given" and has_groups)  # `given` carves what is missing by patient

    def carve(table: Table, fraction: float, what: str) -> tuple[Table, Table]:
        if grouped:
            keep, held = group_split(table.labels, table.groups, fraction, seed, what, class_names)
        else:
            keep, held = stratified_split(table.labels, fraction, seed)
        return table.subset(keep), table.subset(held)

    if "all" in tables:
        tables["train"] = tables.pop("all")
    if "test" not in tables and "train" in tables:  # no splits, or given train (and val) without a test split (that
        if test_fraction <= 0:                       # had failed after training: "no 'test' split")
            raise EdgeKDError("data.test_fraction must be > 0 when the source has no test split")
        tables["train"], tables["test"] = carve(tables["train"], test_fraction, "the test split")
    if folds:
        pool = Table.concat([tables[s] for s in ("train", "val") if s in tables])
        if fold is None or not 0 <= fold < folds:
            raise EdgeKDError(f"data.fold must be in 0..{folds - 1} when data.folds={folds}")
        train_idx, val_idx = kfold_indices(pool.labels, folds, seed, pool.groups if grouped else None,
                                           class_names)[fold]
        tables["train"], tables["val"] = pool.subset(train_idx), pool.subset(val_idx)
    elif "val" not in tables:
        if val_fraction <= 0:
            raise EdgeKDError("data.val_fraction must be > 0 when the source has no val split")
        tables["train"], tables["val"] = carve(tables["train"], val_fraction, "the val split")
    if has_groups:  # whatever the mode: a patient in two splits leaks
        assert_disjoint_groups(tables, mode)
    return tables


def assert_disjoint_groups(tables: dict[str, Table], mode: str = "patient") -> None:
    hint = {"stratified": " (data.split=stratified splits images; with patient ids use data.split=patient)",
            "given": " (the given splits: train/val/test folders or a CSV split column)"}.get(mode, "")
    seen: dict[str, str] = {}
    for split, t in tables.items():
        for g in np.unique(t.groups):
            if seen.setdefault(str(g), split) != split:
                raise EdgeKDError(f"patient {g} appears in both {seen[str(g)]} and {split}{hint}")
