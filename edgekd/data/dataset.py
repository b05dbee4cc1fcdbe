"""Torch datasets and loaders over source tables: bad-image policy, class weights, balanced sampling."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from edgekd.data.sources import Source, Table, load_source
from edgekd.data.splits import make_splits, stratified_subset
from edgekd.data.transforms import build_transforms, chw_tensor, preprocess_spec
from edgekd.errors import EdgeKDError, shorten
from edgekd.imageio import read_image
from edgekd.metrics import positive_class_index


class ImageDataset(Dataset):
    """Yields (image tensor, label) from in-memory arrays or decoded files (validated up front by build_data)."""

    def __init__(self, table: Table, transform):
        self.table, self.transform = table, transform

    def __len__(self) -> int:
        return len(self.table)

    def raw(self, i: int) -> np.ndarray:
        if self.table.images is not None:
            return self.table.images[i]
        return read_image(self.table.paths[i])

    def __getitem__(self, i: int):
        arr = self.raw(i)
        img = chw_tensor(arr)
        return self.transform(img), int(self.table.labels[i])


def check_class_order(model_classes: list[str], data_classes: list[str], where: str,
                      log: Callable[[str], None] | None = None) -> str | None:
    """A model's outputs are read by index against the data's classes. A class name (compared without case or
    surrounding spaces) found in both lists at different places is an error: the same classes in another order
    (`data.class_names` reordered, class folders that sort otherwise) would invert every metric, a distillation
    target or a calibration fit, with nothing to see. Names that differ without any moving (other spellings, ids
    for names) are matched by index: a warning, given to `log` and returned (None when the names agree). Another
    class count is an error."""
    def key(name) -> str:
        return str(name).strip().lower()

    if len(model_classes) != len(data_classes):  # no matching by index: it had warned so, then failed on the count
        raise EdgeKDError(f"{where}: the model has {len(model_classes)} classes "
                          f"{shorten(str(list(model_classes)), 100)}, the data has {len(data_classes)} "
                          f"{shorten(str(list(data_classes)), 100)}")
    model_at = {key(n): i for i, n in enumerate(model_classes)}
    moved = [(n, model_at[key(n)], j) for j, n in enumerate(data_classes) if model_at.get(key(n), j) != j]
    if moved:
        name, i, j = moved[0]
        raise EdgeKDError(f"{where}: class '{name}' is output {i} of the model but class {j} of the data (model "
                          f"{shorten(str(list(model_classes)), 100)}, data {shorten(str(list(data_classes)), 100)}): "
                          "give data.class_names in the model's order")
    if [key(n) for n in model_classes] == [key(n) for n in data_classes]:
        return None
    warning = (f"warning: {where}: the model's classes {shorten(str(list(model_classes)), 100)} are named otherwise "
               f"in the data {shorten(str(list(data_classes)), 100)}; matched by index")
    if log is not None:
        log(warning)
    return warning


def validate_images(table: Table, on_bad_image: str) -> tuple[Table, list[str]]:
    """Decode every path-backed image once up front so a corrupt file fails (or is dropped) before training: the
    table of the readable ones and, per file left out, its error line (the path, then why)."""
    if table.paths is None:
        return table, []
    good, bad = [], []
    for i, p in enumerate(table.paths):
        try:
            read_image(p)
            good.append(i)
        except EdgeKDError as err:
            bad.append(str(err))
    if on_bad_image == "error":
        refuse_bad_images(bad)
    return table.subset(np.asarray(good, dtype=np.int64)), bad


def refuse_bad_images(bad: list[str]) -> None:
    """The one-line error for unreadable images under data.on_bad_image=error: the first, and how many more."""
    if bad:  # e.g. a DICOM export's structured report beside its images
        more = f" (and {len(bad) - 1} more unreadable file(s))" if len(bad) > 1 else ""
        raise EdgeKDError(f"{bad[0]}{more} (--set data.on_bad_image=skip leaves such files out)")


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """'Balanced' weights n / (k * count_c), as scikit-learn's compute_class_weight; absent classes get 0."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def balanced_sampler(labels: np.ndarray, seed: int) -> WeightedRandomSampler:
    counts = np.bincount(labels)
    weights = 1.0 / counts[labels]
    gen = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), num_samples=len(labels),
                                 replacement=True, generator=gen)


class DistributedBalancedSampler(torch.utils.data.Sampler[int]):
    """`data.balanced_sampler` under DDP: every rank draws the one-process balanced sequence (the same seed) and
    takes every `world`-th index of it from its rank on (padded by wrapping, as DistributedSampler pads), so the
    ranks' shards together are the draw one process makes, and a run resumed on another process count keeps its
    class mix. (Without it, DDP had fallen back to the plain shard: imbalance uncorrected.)"""

    def __init__(self, labels: np.ndarray, seed: int, rank: int, world: int):
        draw = list(balanced_sampler(labels, seed))
        total = -(-len(draw) // world) * world
        draw += (draw * world)[:total - len(draw)]
        self.indices = draw[rank:total:world]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)



RANK_STRIDE = 1_000_003
"""How far apart the seeds of two DDP ranks' random streams are (a prime above 10^6: a rank's seed equals another
rank's only for seeds 1000 apart)."""


def epoch_seed(seed: int, epoch: int, distributed: bool = False) -> int:
    """The seed of one epoch's random draws (augmentation, dropout, shuffling, worker seeds): `seed * 1000 + epoch`,
    so a resumed run draws what an uninterrupted one drew; under DDP each rank offset by its rank (rank 0 is the
    single-process stream), so two ranks do not flip, crop and drop out the k-th image of their shards alike."""
    rank = torch.distributed.get_rank() if distributed and torch.distributed.is_initialized() else 0
    return seed * 1000 + epoch + RANK_STRIDE * rank

@dataclass
class DataModule:
    """Everything training needs from the data section of a recipe."""

    tables: dict[str, Table]
    class_names: list[str]
    source_name: str
    cfg: object
    augment: list
    seed: int
    bad_files: list[str]
    """The images left out (on_bad_image: skip), each as its error line: the path, then why."""
    notes: list[str] = field(default_factory=list)
    """What the run should warn of about its data beyond bad files and lost classes (`warn_about_data`)."""
    carved: list[str] = field(default_factory=list)
    """The splits drawn by edgekd (from train, or from everything but test), not given by the source."""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def preprocess(self) -> dict:
        return preprocess_spec(self.cfg)

    @property
    def positive(self) -> int:
        """The positive class's index for a two-class task's sensitivity/specificity/AUC (data.positive_class; by
        default 1); 1 for more classes, where those figures are macro means and it is unused."""
        chosen = getattr(self.cfg, "positive_class", None)
        if chosen is not None and self.num_classes != 2:
            raise EdgeKDError(f"data.positive_class is for a two-class task; this data has {self.num_classes} "
                              f"classes ({', '.join(self.class_names)})")
        return positive_class_index(chosen, self.class_names)

    def dataset(self, split: str, train: bool | None = None) -> ImageDataset:
        if split not in self.tables:
            raise EdgeKDError(f"data: no '{split}' split")
        train = split == "train" if train is None else train
        return ImageDataset(self.tables[split], build_transforms(self.cfg, self.augment, train))

    def loader(self, split: str, train: bool | None = None, epoch: int = 0, distributed: bool = False) -> DataLoader:
        train = split == "train" if train is None else train
        ds = self.dataset(split, train)
        sampler, shuffle = None, train
        if train and self.samples_balanced():
            seed = self.seed * 1000 + epoch  # every rank's: one draw, sharded
            sampler, shuffle = (DistributedBalancedSampler(ds.table.labels, seed, torch.distributed.get_rank(),
                                                           torch.distributed.get_world_size()) if distributed
                                else balanced_sampler(ds.table.labels, seed)), False
        elif distributed:
            sampler = torch.utils.data.DistributedSampler(ds, shuffle=train, seed=self.seed)
            sampler.set_epoch(epoch)
            shuffle = False
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, epoch, distributed))
        drawn = len(sampler) if sampler is not None else len(ds)  # this rank's images per epoch
        # a training batch of one image fails in BatchNorm's train mode (a ResNet's 1x1 map at 28 px: after a whole
        # epoch): that image is left out of the epoch (a shuffled one each epoch); any other short batch trains
        lone = train and drawn > 1 and drawn % self.cfg.batch_size == 1
        return DataLoader(ds, batch_size=self.cfg.batch_size, shuffle=shuffle, sampler=sampler, generator=gen,
                          num_workers=self.cfg.num_workers, drop_last=lone,
                          persistent_workers=False)

    def samples_balanced(self) -> bool:
        """Whether the train loader draws classes evenly (`data.balanced_sampler`; under DDP too)."""
        return bool(self.cfg.balanced_sampler)

    def class_weights(self) -> torch.Tensor:
        """Balanced weights for the label mix the train loader draws. With the balanced sampler that mix is
        already even: weighting the loss on top would count the imbalance twice, the minority class weighted by
        (n_major / n_minor) squared, so every present class gets weight 1."""
        labels = self.tables["train"].labels
        if self.samples_balanced():
            return (torch.as_tensor(np.bincount(labels, minlength=self.num_classes)) > 0).float()
        return class_weights(labels, self.num_classes)

    def counts(self) -> dict[str, list[int]]:
        return {s: np.bincount(t.labels, minlength=self.num_classes).tolist() for s, t in self.tables.items()}

    def split_fingerprint(self, splits: tuple[str, ...] | None = None) -> dict[str, dict[str, object]]:
        """{split: {images, sha256[, pixels]}}: which images (paths relative to data.path, so a moved copy matches)
        with which labels each split holds; in-memory sets by their labels, and `pixels`, the digest of their pixels
        (an .npz whose images changed under the same name). A checkpoint records it (`check_trained_splits`).
        `splits`: only these (default: every split)."""
        root = Path(str(getattr(self.cfg, "path", "") or "."))
        root = root if root.is_dir() else root.parent
        out: dict[str, dict[str, object]] = {}
        for split, table in self.tables.items():
            if splits is not None and split not in splits:
                continue
            digest = hashlib.sha256()
            if table.paths is not None:
                for path, label in sorted(zip((os.path.relpath(p, root) for p in table.paths), table.labels.tolist())):
                    digest.update(f"{path}\t{label}\n".encode("utf-8", "surrogateescape"))
            else:
                digest.update(np.ascontiguousarray(table.labels, dtype=np.int64).tobytes())
            out[split] = {"images": len(table), "sha256": digest.hexdigest()}
            if table.images is not None:  # streamed: no copy of the pixels
                pixels = np.ascontiguousarray(table.images)
                pixel_digest = hashlib.sha256(repr(pixels.shape).encode())
                pixel_digest.update(pixels.data)
                out[split]["pixels"] = pixel_digest.hexdigest()
        return out


def split_listing(tables: dict[str, Table], class_names: list[str]) -> dict[str, Any]:
    """What each split holds, for an audit (splits.json): its image files (file-backed data) and patient ids (when
    the data has them), else its class counts only (in-memory arrays)."""
    out: dict[str, Any] = {"class_names": list(class_names)}
    for split, table in tables.items():
        entry: dict[str, Any] = {"images": len(table),
                                 "class_counts": np.bincount(table.labels, minlength=len(class_names)).tolist()}
        if table.groups is not None:
            entry["patients"] = sorted({str(g) for g in table.groups})
        if table.paths is not None:
            entry["files"] = [str(p) for p in table.paths]
        out[split] = entry
    return out


def _listed_twice(values: list) -> list:
    """The values a list holds more than once, sorted."""
    return sorted({v for v in values if values.count(v) > 1})


def _select_classes(tables: dict[str, Table], classes: list[int], names: list[str]) -> tuple[dict[str, Table], list[str]]:
    twice = _listed_twice(classes)
    if twice:
        raise EdgeKDError(f"data.classes lists class {twice[0]} more than once")
    present = set(np.concatenate([t.labels for t in tables.values()]).tolist())
    absent = [c for c in classes if c not in present]
    if absent:
        raise EdgeKDError(f"data.classes: class {absent[0]} is not in the data (its labels: "
                          f"{', '.join(map(str, sorted(present)))})")
    remap = {c: i for i, c in enumerate(classes)}
    out = {}
    for split, t in tables.items():
        keep = np.flatnonzero(np.isin(t.labels, classes))
        sub = t.subset(keep)
        sub.labels = np.asarray([remap[int(c)] for c in sub.labels], dtype=np.int64)
        out[split] = sub
    return out, [names[c] if c < len(names) else f"class_{c}" for c in classes]


def _order_named_classes(tables: dict[str, Table], names: list[str], wanted: list[str], where: str | None,
                         exact: str | None = None, filtered: bool = False,
                         rows: dict[str, int] | None = None) -> tuple[dict[str, Table], list[str]]:
    """Label ids follow data.class_names for a source with named labels; a label not listed is an error (naming the
    CSV row it is first on, from `rows`), and so, where the labels are `exact` (e.g. "class folders"), is a listed
    name that is not one of them."""
    twice = _listed_twice(wanted)
    if twice:
        raise EdgeKDError(f"{where}: data.class_names lists {twice[0]!r} more than once")
    extra = [n for n in wanted if n not in names]
    if exact and extra:  # first: a typo in class_names also leaves the folder it meant unlisted
        raise EdgeKDError(f"{where}: data.class_names lists {extra[0]!r}, which is not one of the {exact} "
                          f"({', '.join(names)}{' kept by data.classes' if filtered else ''})")
    unknown = [n for n in names if n not in wanted]
    if unknown:
        row = f":{rows[unknown[0]]}" if rows and unknown[0] in rows else ""
        raise EdgeKDError(f"{where}{row}: unknown label {unknown[0]!r} (data.class_names: {', '.join(wanted)})")
    remap = np.asarray([wanted.index(n) for n in names], dtype=np.int64)
    out = {}
    for split, t in tables.items():
        out[split] = t.subset(np.arange(len(t)))
        out[split].labels = remap[t.labels]
    return out, wanted


def patients_from_dicom(tables: dict[str, Table], ids: dict[str, list] | None, where: str | None,
                        source: str | None = None) -> dict[str, Table]:
    """Each table with its patient ids from its DICOM files' PatientID tags (data.dicom_patient_ids: an ImageFolder's;
    `source`: the recipe's data.source)."""
    if source == "csv":  # a CSV of DICOM files had been "holds no DICOM files"
        raise EdgeKDError("data.dicom_patient_ids reads an ImageFolder's DICOM files; a csv source gives patient ids "
                          "in a patient_id column")
    if source not in (None, "imagefolder"):
        raise EdgeKDError(f"data.dicom_patient_ids reads an ImageFolder's DICOM files; a {source} source has none "
                          "(and no patient ids)")
    if not ids:
        if importlib.util.find_spec("pydicom") is None:  # without it the folder had seemed to hold no DICOM files
            raise EdgeKDError("data.dicom_patient_ids: reading PatientID tags needs pydicom "
                              "(pip install 'edgekd[dicom]')")
        raise EdgeKDError(f"data.dicom_patient_ids: {where} holds no DICOM files to read PatientID tags from")
    out = {}
    for split, t in tables.items():
        missing = next((p for p, v in zip(t.paths or [], ids[split]) if not v), None)
        if t.groups is not None or t.paths is None or missing is not None:
            raise EdgeKDError(f"data.dicom_patient_ids: {missing or where} has no PatientID (every image must be a "
                              "DICOM file with one; else data.patient_pattern or a CSV with a patient_id column)")
        out[split] = replace(t, groups=np.asarray(ids[split]))
    return out


def patients_from_names(tables: dict[str, Table], pattern: str, where: str | None) -> dict[str, Table]:
    """Each table with its patient ids: the first group of `pattern` searched in each image's file name."""
    rx, out = re.compile(pattern), {}
    for split, t in tables.items():
        if t.paths is None:
            raise EdgeKDError(f"data.patient_pattern: {where} holds no image files to read patient ids from")
        if t.groups is not None:
            raise EdgeKDError(f"data.patient_pattern: {where} has a patient_id column already")
        ids = []
        for p in t.paths:
            match = rx.search(Path(p).name)
            if match is None or not match.group(1):
                raise EdgeKDError(f"data.patient_pattern '{pattern}' finds no patient id in the file name "
                                  f"{Path(p).name!r} ({p})")
            ids.append(match.group(1))
        out[split] = replace(t, groups=np.asarray(ids))
    return out


def _limit(table: Table, n: int, seed: int) -> Table:
    return table if len(table) <= n else table.subset(stratified_subset(table.labels, n, seed))


@contextlib.contextmanager
def checkpoint_path_hint(recipe, fix: str = "pass --set data.path=..."):
    """Reading a checkpoint's data: a relative data.path that is not found from here gets the way on (the path is
    relative to the folder the checkpoint was trained in; `fix`: the command's own way to give another)."""
    try:
        yield
    except EdgeKDError as err:
        path = recipe.data.path
        if path and not Path(path).is_absolute() and not Path(path).exists() and str(path) in str(err):
            raise EdgeKDError(f"{err} (a checkpoint's data.path is relative to the folder it was trained in: run from "
                              f"there or {fix})") from None
        raise


def build_checkpoint_data(recipe, fix: str = "pass --set data.path=...") -> DataModule:
    """`build_data` of a checkpoint's embedded recipe (eval, report, bench, corruption eval), with the hint of
    `checkpoint_path_hint` when its relative data.path is not found from here."""
    with checkpoint_path_hint(recipe, fix):
        return build_data(recipe)


def recipe_positive(recipe: dict | None, class_names: list[str]) -> int:
    """The positive class index a checkpoint's embedded recipe (a dict) names in data.positive_class (1 when it
    names none, or for more than two classes): the class its two-class figures are given for."""
    named = ((recipe or {}).get("data") or {}).get("positive_class")
    if len(class_names) != 2:
        return 1
    return positive_class_index(named, class_names, "the checkpoint's data.positive_class")


SPLIT_KEYS = ("source", "split", "val_fraction", "test_fraction", "fold", "folds", "class_names", "classes", "limit",
              "patient_pattern", "dicom_patient_ids", "on_bad_image")
"""The data keys (besides data.path and the seed) that decide which image lands in which split."""


def data_path_key(path: str | None) -> str | None:
    """data.path as one dataset: resolved, so `dir/` and `dir`, a relative and an absolute spelling, a symlink
    are the same."""
    return os.path.realpath(path) if path else None


def same_split_settings(trained: dict, recipe) -> bool:
    """Whether `recipe` draws its splits as the checkpoint's embedded recipe (`trained`, a dict) did: the same
    data.path, seed and split keys (SPLIT_KEYS)."""
    data, fields = trained.get("data") or {}, type(recipe.data).model_fields
    return (data_path_key(data.get("path")) == data_path_key(recipe.data.path) and trained.get("seed") == recipe.seed
            and all(data.get(k, fields[k].default) == getattr(recipe.data, k) for k in SPLIT_KEYS))  # a key added
    # since the checkpoint was written took its default there


FILE_SOURCES = ("imagefolder", "csv")
"""Sources that list image files: a model trained on them can be checked file by file against another run's splits."""


def check_model_splits(what: str, ckpt: dict, data: DataModule, log: Callable[[str], None],
                       whose: str = "this run's", val_effect: str = "figures on them are on images it has seen",
                       rebuilt: dict | None = None) -> None:
    """A model this run learns from (a KD teacher, a continual run's starting checkpoint: `what`, its recipe key and
    path) trained on this run's own image files must not have trained on its test images: splits carved with another
    seed, fraction, limit, class filter or patient pattern put them in its training split, and every test figure would be
    on images it learned (an error). Its training on val images only (a val split carved from train by seed, as in
    a seed sweep from one teacher) biases the run's choices: a warning (`val_effect`). Compared file by file, from
    the model's recipe as it splits the files today, when both read image files (ImageFolder or CSV, either of
    them: a CSV may list the folder's files), or image by image by content when both are in memory (.npz, idx: a
    file without val/test splits, data.split stratified or patient, folds, cut them by seed too). `rebuilt`: a dict that
    keeps the model's splits once rebuilt, for checking one model against several runs' data (continual tasks)."""
    from edgekd.recipe import recipe_from_dict

    raw = ckpt.get("recipe")
    in_memory = data.tables["train"].paths is None
    if not raw or (not in_memory and (raw.get("data") or {}).get("source") not in FILE_SOURCES):
        return
    rebuilt = {} if rebuilt is None else rebuilt
    if "tables" not in rebuilt:
        try:
            rebuilt["tables"] = split_tables(recipe_from_dict(raw, where=f"{what} (embedded recipe)"))[0]
        except EdgeKDError as err:
            rebuilt["tables"] = None
            log(f"warning: {what}: its training split could not be rebuilt to check it against {whose} val/test "
                f"images ({err}); a relative data.path of its recipe is read from the folder it was trained in: run "
                "from there for the check")
    tables = rebuilt["tables"]
    if tables is None or (tables["train"].images is not None) != in_memory:  # files against arrays: other data
        return
    key = content_keys(data) if in_memory else (lambda table: [os.path.realpath(p) for p in table.paths])
    seen = set(key(tables["train"]))
    leaked = {split: sum(k in seen for k in key(data.tables[split])) for split in ("val", "test")}
    settings = "seed, data.split, fractions, fold, limit, classes or patient_pattern"
    if leaked["test"]:
        raise EdgeKDError(f"{what} trained on {leaked['test']} of {whose} {len(data.tables['test'])} test images (its "
                          f"splits were drawn with other settings: {settings}): train it with the same split "
                          "settings, or give the splits as folders or a split column")
    if leaked["val"]:
        log(f"warning: {what} trained on {leaked['val']} of {whose} {len(data.tables['val'])} val images (another "
            f"{settings}): {val_effect}")
    chosen_on = set(key(tables["val"])) if "val" in tables else set()
    picked = sum(k in chosen_on for k in key(data.tables["test"]))
    if picked:  # (it had passed without a word)
        log(f"warning: {what} chose its best epoch on {picked} of {whose} {len(data.tables['test'])} test images (its "
            f"val split; another {settings}): the test figures are on images that picked it")
    warn_shared_patients(what, tables["train"], data, whose, log, [s for s in ("test", "val") if not leaked[s]])


def warn_shared_patients(what: str, trained: Table, data: DataModule, whose: str, log: Callable[[str], None],
                         splits: list[str]) -> None:
    """A model's training patients among this run's `splits` (val, test) patients, when both carry patient ids:
    other images of the same patients (new scans, another export of the files), which the file-by-file check does
    not see. A warning: two data sets may number their patients alike."""
    if trained.groups is None:
        return
    seen = {str(g) for g in trained.groups}
    for split in splits:
        groups = data.tables[split].groups if split in data.tables else None
        mine = {str(g) for g in groups} if groups is not None else set()
        shared = sorted(mine & seen)
        if shared:
            log(f"warning: {what} trained on images of {len(shared)} of {whose} {len(mine)} {split} "
                f"patients (the same patient ids, e.g. {', '.join(shared[:3])}): if they are the same people, the "
                f"{split} figures are on patients it learned")


def content_keys(data: DataModule) -> Callable[[Table], list[str]]:
    """For in-memory data (.npz, idx) compared by content: a table's image fingerprints, less those the run's own
    splits share (duplicate images of the dataset across its splits, e.g. MedMNIST's, are not a model's leak)."""
    own = {s: set(t.fingerprints()) for s, t in data.tables.items()}
    shared = (own.get("train", set()) & (own.get("val", set()) | own.get("test", set()))) | \
        (own.get("val", set()) & own.get("test", set()))
    return lambda table: [f for f in table.fingerprints() if f not in shared]


def check_trained_splits(ckpt: dict, data: DataModule, recipe, where: str,
                         splits: tuple[str, ...] = ("val", "test")) -> None:
    """Refuse data drawn with the checkpoint's own split settings whose `splits` no longer hold the images they held
    at training: splits drawn again from a folder that has changed put images the model trained on into val and
    test, and every figure scored on them (eval, report, the export's calibration, threshold and card; a resumed
    run's best checkpoint) would be wrong without a word. Data with other settings (another path, limit, seed) is
    another dataset, the user's choice: not checked. Checkpoints from before 2026-12-06 carry no record."""
    trained = ckpt.get("data_splits")
    if not isinstance(trained, dict) or not same_split_settings(ckpt.get("recipe") or {}, recipe):
        return
    now = data.split_fingerprint(splits)

    def differs(split: str) -> bool:  # by what the record holds (`pixels` is recorded since 2026-12-06)
        return any(now.get(split, {}).get(key) != value for key, value in trained[split].items())

    # a split the run had not (train/ and val/ folders trained on before a missing test split was carved): carved
    # now from the images it trained on
    changed = [s for s in splits if (s in trained and differs(s)) or (s not in trained and s in now)]
    if not changed:
        return

    def pixels_only(split: str) -> bool:  # the same images by name and label, other pixels (an .npz rewritten)
        was, new = trained.get(split, {}), now.get(split, {})
        return "pixels" in was and was.get("sha256") == new.get("sha256") and was.get("images") == new.get("images")

    def said(split: str) -> str:
        if split not in trained:
            return (f"{split}: {now[split].get('images')} images carved now (data.{split}_fraction) from the "
                    "train images, a split the run did not have")
        n, then = now.get(split, {}).get("images", 0), trained[split].get("images")
        if pixels_only(split):
            return f"{split}: the pixels of its {n} images changed (labels as at training)"
        return (f"{split}: {n} images now, {then} at training" if n != then else
                f"{split}: other images or labels, {n} as at training")
    why = ("so every figure on them would be on other images than the model's" if all(map(pixels_only, changed))
           else "so images it trained on may land in val or test")
    raise EdgeKDError(f"{where}: its data's splits are not the ones it was trained with "
                      f"({'; '.join(map(said, changed))}): {recipe.data.path or 'the data'} changed since, {why}; "
                      "restore it as it was, or give new images as another dataset (another data.path)"
                      + (" (a folder trained on before 2026-12-06 also lists differently now: hidden files such as "
                         "._x.png are left out, symlinked sub-folders followed)"
                         if recipe.data.source == "imagefolder" else ""))


def build_data(recipe) -> DataModule:
    """Recipe data section -> loaders-ready DataModule (source, class filter, splits, limit, bad images)."""
    tables, names, source = split_tables(recipe)
    cfg, bad = recipe.data, []
    for split in list(tables):  # every split read before refusing: the error counts them all
        tables[split], dropped = validate_images(tables[split], "skip")
        bad += dropped
    if cfg.on_bad_image == "error":
        refuse_bad_images(bad)
    for split in tables:
        if len(tables[split]) == 0:
            raise EdgeKDError(f"data: the {split} split is empty")
    if tables["train"].labels.max() >= len(names):
        raise EdgeKDError(f"data: label {tables['train'].labels.max()} exceeds the {len(names)} class names")
    data = DataModule(tables=tables, class_names=names, source_name=source.name, cfg=cfg,
                      augment=recipe.augment, seed=recipe.seed, bad_files=bad, notes=source_notes(source, cfg),
                      carved=[s for s in ("val", "test") if s not in source.tables
                              or (s == "val" and (cfg.split != "given" or cfg.folds))])
    data.positive  # data.positive_class checked against the class names before any training
    return data


def duplicate_notes(tables: dict[str, Table]) -> list[str]:
    """Images found in two splits by content (`Table.fingerprints`: the same file bytes or pixels under two names:
    a data set's own duplicates, a file copied into two class or split folders): the later split's figures then
    include images the model trained on (or was selected on). It reads every file: a training run's warning
    (`edgekd.train.warn_about_data`), not every load of the data."""
    prints = {split: table.fingerprints() for split, table in tables.items()}
    notes = []
    for later, earlier in (("val", "train"), ("test", "train"), ("test", "val")):
        if later not in prints or earlier not in prints:
            continue
        known = set(prints[earlier])
        shared = [i for i, fp in enumerate(prints[later]) if fp in known]
        if shared:
            notes.append(f"{len(shared)} {later} image(s) are also {earlier} images (the same content under two "
                         f"names, e.g. {_image_name(tables, later, shared[0])}): the {later} figures include images the model "
                         f"{'trained' if earlier == 'train' else 'was selected'} on")
    return notes + conflicting_label_notes(tables, prints)


def conflicting_label_notes(tables: dict[str, Table], prints: dict[str, list]) -> list[str]:
    """Images whose content is found under two classes, in one split or across splits (a file copied into two
    class folders, a CSV row relabelled): one of the labels is wrong, and the model is taught both."""
    first: dict[Any, tuple[str, int]] = {}  # content -> (split, row) where it was first seen
    pairs = []
    for split, table in tables.items():
        for i, fp in enumerate(prints[split]):
            seen = first.setdefault(fp, (split, i))
            if tables[seen[0]].labels[seen[1]] != table.labels[i]:
                pairs.append((seen, (split, i)))
    if not pairs:
        return []
    first_seen, again = pairs[0]
    return [f"{len(pairs)} image(s) have the content of an image under another class (e.g. "
            f"{_image_name(tables, *again)} and {_image_name(tables, *first_seen)}): one of each pair's labels is wrong"]


def _image_name(tables: dict[str, Table], split: str, row: int) -> str:
    """A table row's file, or its split and row number for in-memory arrays."""
    paths = tables[split].paths
    return str(paths[row]) if paths is not None else f"{split} image #{row}"


def source_notes(source, cfg) -> list[str]:
    """Warnings about what a folder source left out or did not use: files in its class folders that are not images
    (a DICOMDIR, notes, thumbnails: left out without a word before), and DICOM files naming two or more patients
    split by image (one patient's images may land in two splits) because data.dicom_patient_ids is off."""
    notes = []
    if source.info.get("skipped_files"):
        count, example = source.info["skipped_files"]
        notes.append(f"{count} file(s) in the class folders are not images and are left out (neither an image suffix "
                     f"nor DICOM, or a DICOMDIR), e.g. {example}")
    if source.info.get("ignored_folders"):  # beside split folders (they had been an error, then nothing)
        names = source.info["ignored_folders"]
        notes.append(f"{len(names)} folder(s) or image(s) beside the split folders are not read: {', '.join(names[:5])}"
                     + (" ..." if len(names) > 5 else ""))
    if cfg.split != "given" and not cfg.folds and "val" in source.tables:  # re-drawn without a word before
        own = {"csv": "the CSV split column's val rows", "imagefolder": "the val folder's images",
               "medmnist": "the .npz's val images"}.get(cfg.source, "the data's own val images")
        test = "the test split is kept" if "test" in source.tables else "a test split is drawn from them too"
        notes.append(f"data.split={cfg.split}: {own} are pooled with train and a new val split is drawn "
                     f"(data.val_fraction {cfg.val_fraction:g}; {test}); data.split=given keeps them")
    names = source.class_names
    if source.info.get("label_source") == "class folders" and not cfg.class_names and not cfg.classes and \
            all(n.isdecimal() for n in names) and names != sorted(names, key=int):  # 1, 10, 2: id 2 is folder 10
        notes.append(f"the class folders are numbers, ordered as text ({', '.join(names[:4])}"
                     f"{', ...' if len(names) > 4 else ''}), so class id k is not folder k: "
                     f"data.class_names [{', '.join(sorted(names, key=int))}] orders them by number")
    patients = source.info.get("dicom_patient_count", 0)
    if patients > 1 and not (cfg.dicom_patient_ids or cfg.patient_pattern or cfg.split == "patient"):
        notes.append(f"the DICOM files name {patients} patients (PatientID) but the split is by image, so one "
                     "patient's images may be in two splits: data.dicom_patient_ids=true splits by patient")
    return notes


def split_tables(recipe) -> tuple[dict[str, Table], list[str], Source]:
    """The recipe's train/val/test tables, class names and source, before any image is decoded: what decides which
    image lands in which split (source, class filter, patients, split mode and seed, limit)."""
    cfg = recipe.data
    source = load_source(cfg.source, cfg.path)
    tables, names = source.tables, source.class_names
    if cfg.patient_pattern:
        tables = patients_from_names(tables, cfg.patient_pattern, cfg.path)
    elif cfg.dicom_patient_ids:
        tables = patients_from_dicom(tables, source.info.get("dicom_patients"), cfg.path, cfg.source)
    skipped = source.info.get("skipped_ids")
    if skipped and not cfg.classes:
        shown = ", ".join(map(str, skipped[:8])) + (f" and {len(skipped) - 8} more" if len(skipped) > 8 else "")
        raise EdgeKDError(f"{cfg.path}: labels run to {len(names) - 1}, but class id(s) {shown} have no image in any "
                          "split (each would become an empty class): remap the labels to 0..K-1, or pick the "
                          "present ids with data.classes")
    lone = source.info.get("lone_label")
    if lone and not cfg.class_names and (not cfg.classes or lone[0] in cfg.classes):
        raise EdgeKDError(f"{lone[1]} (a typo? a class needs images to split, train and score; data.class_names "
                          "lists the classes to expect)")
    if cfg.classes:
        tables, names = _select_classes(tables, cfg.classes, names)
    if cfg.class_names and source.info.get("named_labels"):
        tables, names = _order_named_classes(tables, names, list(cfg.class_names), cfg.path,
                                             source.info.get("label_source"), bool(cfg.classes),
                                             source.info.get("label_rows"))
    elif cfg.class_names:
        if len(cfg.class_names) != len(names):
            raise EdgeKDError(f"data.class_names has {len(cfg.class_names)} names, the data has {len(names)} classes")
        names = list(cfg.class_names)
    build_transforms(cfg, recipe.augment, train=True)  # an unknown augment op fails now, before any output
    source.tables = tables
    tables = make_splits(source, cfg.split, cfg.val_fraction, cfg.test_fraction, recipe.seed, cfg.folds, cfg.fold,
                         names)
    if cfg.limit:
        tables = {split: _limit(table, cfg.limit, recipe.seed) for split, table in tables.items()}
    return tables, names, source
