"""Image sources: MedMNIST .npz, ImageFolder, CSV manifest, idx (Fashion-MNIST) and the built-in dataset."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import os
import re
import unicodedata
import warnings
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.errors import EdgeKDError, exception_line, shorten
from edgekd.fileio import sha256_file
from edgekd.imageio import folder_files, is_hidden, is_image_file, subfolders

SPLITS = ("train", "val", "test")
BUILTIN_DIR = Path(__file__).parent / "builtin"
BUILTIN_FILE = BUILTIN_DIR / "pneumoniamnist_mini.npz"

# Label names of the MedMNIST v2 2D sets (medmnist INFO); other files fall back to class_<i>.
MEDMNIST_CLASSES = {
    "pneumoniamnist": ["normal", "pneumonia"],
    "pneumoniamnist_mini": ["normal", "pneumonia"],
    "octmnist": ["choroidal_neovascularization", "diabetic_macular_edema", "drusen", "normal"],
    "dermamnist": ["actinic_keratoses", "basal_cell_carcinoma", "benign_keratosis", "dermatofibroma",
                   "melanoma", "melanocytic_nevi", "vascular_lesions"],
    "breastmnist": ["malignant", "normal_or_benign"],
    "bloodmnist": ["basophil", "eosinophil", "erythroblast", "immature_granulocytes", "lymphocyte",
                   "monocyte", "neutrophil", "platelet"],
    "retinamnist": ["0", "1", "2", "3", "4"],
    "pathmnist": ["adipose", "background", "debris", "lymphocytes", "mucus", "smooth_muscle", "normal_colon_mucosa",
                  "cancer_associated_stroma", "colorectal_adenocarcinoma_epithelium"],
    "tissuemnist": ["collecting_duct_connecting_tubule", "distal_convoluted_tubule", "glomerular_endothelial_cells",
                    "interstitial_endothelial_cells", "leukocytes", "podocytes", "proximal_tubule_segments",
                    "thick_ascending_limb"],
    **dict.fromkeys(("organamnist", "organcmnist", "organsmnist"),
                    ["bladder", "femur_left", "femur_right", "heart", "kidney_left", "kidney_right", "liver",
                     "lung_left", "lung_right", "pancreas", "spleen"]),
}
"""The class names of the MedMNIST v2 2D sets with one label per image (ChestMNIST is multi-label), by file name
(`medmnist_classes`)."""


def medmnist_classes(path: str | Path | None) -> list[str] | None:
    """The class names of a MedMNIST file by its name: `pneumoniamnist.npz`, or a MedMNIST+ size's
    `pneumoniamnist_224.npz`; None for another name."""
    stem = Path(path or "").stem.lower()
    return MEDMNIST_CLASSES.get(re.sub(r"_(28|64|128|224)$", "", stem))


FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


def pixel_digest(image: np.ndarray) -> str:
    """The digest of an image array's pixels and shape (an in-memory table's fingerprint)."""
    return hashlib.sha256(np.ascontiguousarray(image).tobytes() + repr(image.shape).encode()).hexdigest()


@dataclass
class Table:
    """A set of labelled images: in-memory uint8 arrays (N,H,W,C) or file paths, plus optional groups."""

    labels: np.ndarray
    images: np.ndarray | None = None
    paths: list[str] | None = None
    groups: np.ndarray | None = None
    _prints: list[str] | None = field(default=None, init=False, repr=False, compare=False)
    _pixel_prints: list[str] | None = field(default=None, init=False, repr=False, compare=False)
    """`fingerprints()` once computed: a training run compares val and test with the pool and with train."""

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> "Table":
        idx = np.asarray(idx, dtype=np.int64)
        return Table(
            labels=self.labels[idx],
            images=None if self.images is None else self.images[idx],
            paths=None if self.paths is None else [self.paths[i] for i in idx],
            groups=None if self.groups is None else self.groups[idx],
        )

    def fingerprints(self) -> list[str]:
        """Each image's content digest: of its file's bytes (a copy or a link of the file has the same one), or of
        an in-memory array's pixels and shape. Two tables share an image when they share a fingerprint (the same
        picture re-encoded or resized is not recognised). Computed once per table."""
        if self._prints is None:
            self._prints = ([pixel_digest(a) for a in self.images] if self.images is not None else
                            [sha256_file(p) for p in self.paths or []])
        return self._prints

    def pixel_fingerprints(self) -> list[str]:
        """Each image's digest of its decoded pixels (uint8 H x W x C, gray as one channel, as `read_image` and an
        .npz table hold them): an image stored as a file matches its copy held as an array (a folder of PNGs saved
        from an .npz's val split), which `fingerprints` (file bytes vs pixels) cannot. Decodes every file once."""
        if self._pixel_prints is None:
            if self.images is not None:
                self._pixel_prints = self.fingerprints()
            else:
                from edgekd.imageio import read_image

                self._pixel_prints = [pixel_digest(read_image(p)) for p in self.paths or []]
        return self._pixel_prints

    @staticmethod
    def concat(tables: list["Table"]) -> "Table":
        first = tables[0]
        return Table(
            labels=np.concatenate([t.labels for t in tables]),
            images=None if first.images is None else np.concatenate([t.images for t in tables]),
            paths=None if first.paths is None else sum((t.paths for t in tables), []),
            # patient ids only when every table has them (a replay of a CSV task with ids and a folder task without
            # had failed in numpy's concatenate)
            groups=None if any(t.groups is None for t in tables) else np.concatenate([t.groups for t in tables]),
        )


@dataclass
class Source:
    """What a source yields: the tables it splits itself (keys of SPLITS) or one table under 'all'."""

    name: str
    tables: dict[str, Table]
    class_names: list[str]
    info: dict = field(default_factory=dict)


def load_source(kind: str, path: str | None) -> Source:
    if kind == "builtin":
        return load_medmnist(path or BUILTIN_FILE)
    if path is None:
        raise EdgeKDError(f"data.path is required for data.source={kind}")
    loaders = {"medmnist": load_medmnist, "imagefolder": load_imagefolder, "csv": load_csv,
               "fashion_mnist": load_idx_dir}
    return loaders[kind](path)


def load_medmnist(path: str | Path) -> Source:
    """A MedMNIST v2 .npz (keys train_images, train_labels, val_*, test_*), grayscale or RGB, any size."""
    path = Path(path)
    if path.is_dir():  # the path exists: "not found" had sent users looking for a typo
        raise EdgeKDError(f"{path}: a folder, and data.source medmnist reads a .npz file; for a folder of images "
                          "give --set data.source=imagefolder (class subfolders, or train/val/test of them)")
    if not path.is_file():
        raise EdgeKDError(f"{path}: MedMNIST .npz not found")
    try:
        npz = np.load(path, allow_pickle=False)
        keys = set(npz.files)
    except Exception as err:
        raise EdgeKDError(f"{path}: not a readable .npz ({type(err).__name__})") from None
    tables = {}
    for split in SPLITS:
        if f"{split}_images" not in keys:
            continue
        if f"{split}_labels" not in keys:
            raise EdgeKDError(f"{path}: has {split}_images but no {split}_labels")
        try:
            images = npz[f"{split}_images"]
            labels = npz[f"{split}_labels"]
        except (ValueError, OSError, zipfile.BadZipFile) as err:  # object arrays (pickle) are refused here
            raise EdgeKDError(f"{path}: cannot read {split} arrays ({shorten(str(err).splitlines()[0], 100)})") from None
        tables[split] = Table(labels=_check_labels(labels, path, split), images=_check_images(images, path, split))
        if len(tables[split].images) != len(tables[split].labels):
            raise EdgeKDError(f"{path}: {split}_images and {split}_labels differ in length")
        if not len(tables[split]):  # numpy's "zero-size array to reduction operation" had followed
            raise EdgeKDError(f"{path}: {split}_images holds no image (leave the key out to carve the split)")
    if "train" not in tables:
        raise EdgeKDError(f"{path}: no train_images key (expected MedMNIST keys train_images, train_labels, ...)")
    n_classes = int(max(t.labels.max() for t in tables.values())) + 1
    refuse_sparse_ids(n_classes, len(np.unique(np.concatenate([t.labels for t in tables.values()]))), str(path))
    names = medmnist_classes(path)
    if names is not None and n_classes > len(names):
        raise EdgeKDError(f"{path}: labels go up to {n_classes - 1}, but MedMNIST '{path.stem}' has {len(names)} "
                          f"classes (0..{len(names) - 1}); stray labels, or another set under that file name")
    counts = sum(np.bincount(t.labels, minlength=n_classes) for t in tables.values())
    # Ids with no image in any split: empty classes unless data.classes picks the ones present (build_data checks).
    skipped = np.flatnonzero(counts == 0).tolist() if names is None else []
    return Source(name=path.stem, tables=tables, class_names=names or [f"class_{i}" for i in range(n_classes)],
                  info={"skipped_ids": skipped} if skipped else {})


def _check_images(images: np.ndarray, path: Path, split: str) -> np.ndarray:
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise EdgeKDError(f"{path}: {split}_images has shape {images.shape}, expected (N,H,W) or (N,H,W,3)")
    if images.dtype != np.uint8:
        if not np.all(np.isfinite(images)):
            raise EdgeKDError(f"{path}: {split}_images holds NaN or Inf values")
        lo, hi = float(images.min()), float(images.max())
        if lo < 0 or hi > 255:
            raise EdgeKDError(f"{path}: {split}_images values outside 0..255 ({lo}..{hi})")
        images = (images * 255.0 if hi <= 1.0 else images).round().astype(np.uint8)
    return images


def _check_labels(labels: np.ndarray, path: Path, split: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] != 1:
        raise EdgeKDError(f"{path}: {split}_labels is multi-label {labels.shape}; edgekd trains single-label classifiers")
    labels = labels.reshape(-1)
    if labels.dtype.kind not in "biuf":  # strings, bytes, dates, objects: numpy's ufunc error had followed
        raise EdgeKDError(f"{path}: {split}_labels must be non-negative integers (it holds {labels.dtype} values)")
    if labels.dtype.kind == "f" and not np.all(np.isfinite(labels)):
        raise EdgeKDError(f"{path}: {split}_labels holds NaN or Inf values")
    if labels.size and (labels.min() < 0 or np.any(labels != np.round(labels))):
        raise EdgeKDError(f"{path}: {split}_labels must be non-negative integers")
    return labels.astype(np.int64)


def list_images(folder: Path, skipped: list[Path] | None = None) -> list[Path]:
    """Every image file under `folder`, any depth (`edgekd.imageio.folder_files`: through symlinked folders, hidden
    and system entries left out), sorted: image suffixes, and DICOM files of any name. `skipped`, if given, gets
    the other files, as `predict` counts them."""
    files = folder_files(folder)  # symlinked sub-folders followed (rglob had skipped them without a word)
    images = [p for p in files if is_image_file(p)]
    if skipped is not None:
        kept = set(images)
        skipped += [p for p in files if p not in kept]
    return images


def load_imagefolder(path: str | Path) -> Source:
    """root/<class>/*.png, or root/{train,val,test}/<class>/*.png for given splits (the split folders named in any
    case or spelling a manifest's split column may use: `Training/`, `valid/`, `Testing/`)."""
    root = Path(path)
    if root.is_file():  # it had said "image folder not found" of a file that is there
        other = {".csv": "data.source=csv for a manifest", ".npz": "data.source=medmnist for an .npz"}.get(
            root.suffix.lower(), "give the folder that holds the class folders")
        raise EdgeKDError(f"{root}: a file, not an image folder (data.source imagefolder): {other}")
    if not root.is_dir():
        raise EdgeKDError(f"{root}: image folder not found")
    parts = split_folders(root)
    if parts:
        class_names = [d.name for d in subfolders(parts["train"])]
    else:
        class_names = [d.name for d in subfolders(root)]  # a .Trashes/ or __MACOSX/ had become a class
        parts = {"all": root}
    if not class_names:
        raise EdgeKDError(f"{root}: no class folders (expected root/<class>/<image>)")
    if "all" in parts and len(class_names) == 1 and split_folders(root / class_names[0]):  # one folder up
        raise EdgeKDError(f"{root}: its one folder {class_names[0]}/ holds the split folders: give "
                          f"data.path={root / class_names[0]}")
    for split, folder in parts.items():  # a class only val/ or test/ has was dropped without a word
        extra = [d.name for d in subfolders(folder) if d.name not in class_names]
        if extra:
            raise EdgeKDError(f"{folder / extra[0]}: a class folder the train split does not have (train has "
                              f"{', '.join(class_names)}); every split needs the same class folders, named alike")
    tables, skipped = {}, []
    for split, folder in parts.items():
        paths, labels = [], []
        for i, name in enumerate(class_names):
            files = list_images(folder / name, skipped) if (folder / name).is_dir() else []
            if not files and split in ("train", "all"):
                raise EdgeKDError(f"{folder / name}: empty class folder (no images)")
            paths += [str(f) for f in files]
            labels += [i] * len(files)
        tables[split] = Table(labels=np.asarray(labels, dtype=np.int64), paths=paths)
    # Folder names are the labels: data.class_names orders them by name and must list exactly these folders.
    return Source(name=root.name, tables=tables, class_names=class_names,
                  info={"named_labels": True, "label_source": "class folders", **dicom_patients(tables),
                        **({"skipped_files": (len(skipped), str(skipped[0]))} if skipped else {}),
                        **({"ignored_folders": ignored} if (ignored := ignored_folders(root, parts)) else {})})


def split_folders(root: Path) -> dict[str, Path]:
    """{train/val/test: folder} of an image folder whose sub-folders name splits (`split_name`: `Training/` and
    `Testing/` had become two classes, each holding every real class's images; `valid/` had been ignored), else {}.
    A split folder holds class folders, not images (a class named `valid` stays a class). Split folders without a
    train one, or two folders of one split, are refused; other folders beside them are not read
    (`ignored_folders`, a warning of the run)."""
    named: dict[str, list[Path]] = {}
    strays: list[Path] = []  # images beside the class folders of a split-named folder
    for d in subfolders(root):
        if (split := split_name(d.name)) is not None and subfolders(d):
            own = own_images(d)
            if own:
                strays.append(own[0])
            else:
                named.setdefault(split, []).append(d)
    if named and strays:  # one stray image had made test/ "a class", so a new test split was cut from train
        raise EdgeKDError(f"{strays[0]}: an image beside the class folders of the split folder "
                          f"{strays[0].parent.name}/ (a split folder holds class folders only): move it into its "
                          "class folder or out of the split folder")
    twice = next((f for f in named.values() if len(f) > 1), None)
    if twice:
        raise EdgeKDError(f"{root}: {' and '.join(d.name for d in twice)} both name the {split_name(twice[0].name)} "
                          "split; keep one")
    if named and "train" not in named:
        raise EdgeKDError(f"{root}: split folders ({', '.join(d[0].name for d in named.values())}) but none for "
                          "training: name it train/ (or root/<class>/ without split folders)")
    return {split: named[split][0] for split in SPLITS if split in named}


def own_images(folder: Path) -> list[Path]:
    """The images directly in `folder` (not in its sub-folders), sorted; hidden and system files (`is_hidden`: a
    `.preview.png`, an AppleDouble `._scan.png`) left out, as everywhere else."""
    return sorted(f for f in folder.iterdir() if f.is_file() and not is_hidden(f) and is_image_file(f))


def ignored_folders(root: Path, parts: dict[str, Path]) -> list[str]:
    """What beside a data folder's split folders is not read: folders (masks/, metadata/, a nested copy) and
    images at the top (a preview.png)."""
    if "all" in parts:
        return []
    kept = {folder.name for folder in parts.values()}
    return [d.name for d in subfolders(root) if d.name not in kept] + [f.name for f in own_images(root)]


def dicom_patients(tables: dict[str, Table]) -> dict[str, Any]:
    """The PatientID tags of a folder's DICOM files: {"dicom_patients": {split: ids (None where a file has none)},
    "dicom_patient_count": distinct ids}; {} for a folder without DICOM files. Only files without a Pillow image
    suffix are opened, and only their PatientID is parsed; an unreadable header counts as none (decoding names it)."""
    from edgekd.imageio import PILLOW_FORMATS, is_dicom

    paths = [p for t in tables.values() for p in t.paths or []]
    candidates = [p for p in paths if Path(p).suffix.lower() not in PILLOW_FORMATS and is_dicom(p)]
    if not candidates:
        return {}
    try:
        import pydicom
    except ImportError:  # reading the images will say pydicom is needed
        return {}
    ids: dict[str, str | None] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warnings about odd headers: decoding judges the file
        for p in candidates:
            try:
                value = pydicom.dcmread(p, specific_tags=["PatientID"], stop_before_pixels=True).get("PatientID")
                ids[p] = str(value).strip() or None if value is not None else None
            except Exception:
                ids[p] = None
    return {"dicom_patients": {split: [ids.get(p) for p in t.paths or []] for split, t in tables.items()},
            "dicom_patient_count": len({v for v in ids.values() if v})}


def load_csv(path: str | Path) -> Source:
    """A manifest with columns path,label[,patient_id][,split]; paths relative to the CSV's folder."""
    path = Path(path)
    if path.is_dir():  # it said "CSV manifest not found" of a folder that is there
        csvs = sorted(p.name for p in path.glob("*.csv"))
        hint = (f"give the manifest file, e.g. data.path={path / csvs[0]}" if csvs else
                "give the manifest file, or data.source=imagefolder for a folder of class folders")
        raise EdgeKDError(f"{path}: a folder, not a CSV manifest (data.source csv): {hint}")
    if not path.is_file():
        raise EdgeKDError(f"{path}: CSV manifest not found")
    rows, lines = _read_manifest(path)
    label_values = [(r["label"] or "").strip() for r in rows]
    empty = next((i for i, v in enumerate(label_values) if not v), None)
    if empty is not None:
        raise EdgeKDError(f"{path}:{lines[empty]}: empty label")
    class_names, to_id, info = _csv_classes(path, label_values, lines)
    has_groups = "patient_id" in rows[0]
    has_split = "split" in rows[0]
    buckets: dict[str, dict[str, list]] = {}
    first_line: dict[str, int] = {}
    for lineno, row, label in zip(lines, rows, label_values):
        entry = (row["path"] or "").strip()  # `label, path`: the space after the comma had been part of the path
        if not entry:
            raise EdgeKDError(f"{path}:{lineno}: empty path")
        if label not in to_id:
            raise EdgeKDError(f"{path}:{lineno}: unknown label {label!r}")
        # absolute and normalised, links not followed: a DVC or git-annex link's target has no suffix or another
        # name (the file had been read as the cache object, refused as no image, its patient id not found)
        file = Path(os.path.abspath(path.parent / entry))
        if not file.is_file():
            raise EdgeKDError(f"{path}:{lineno}: image {entry} not found (paths are read relative to the CSV's "
                              f"folder, {path.parent}, or absolute)")
        # absolute (a relative data.path had kept `../x.png` and `/abs/x.png` apart), links not followed (other files)
        key = os.path.normcase(os.path.abspath(path.parent / entry))
        if first_line.setdefault(key, lineno) != lineno:  # one image in two splits, or under two labels
            raise EdgeKDError(f"{path}:{lineno}: image {entry} is listed again (first on line {first_line[key]})")
        patient = (row.get("patient_id") or "").strip()
        if has_groups and not patient:
            raise EdgeKDError(f"{path}:{lineno}: empty patient_id (every row needs one when the column is there)")
        given = (row.get("split") or "").strip() if has_split else "all"
        split = split_name(given) if has_split else given
        if split is None:
            raise EdgeKDError(f"{path}:{lineno}: split {given!r} is not one of train/val/test")
        b = buckets.setdefault(split, {"paths": [], "labels": [], "groups": []})
        b["paths"].append(str(file))
        b["labels"].append(to_id[label])
        b["groups"].append(patient)
    if has_split and "train" not in buckets:  # a KeyError: 'train' had followed
        raise EdgeKDError(f"{path}: no row of the train split (its split column gives {', '.join(sorted(buckets))}); "
                          "a manifest with a split column needs train rows")
    tables = {
        split: Table(labels=np.asarray(b["labels"], dtype=np.int64), paths=b["paths"],
                     groups=np.asarray(b["groups"]) if has_groups else None)
        for split, b in buckets.items()
    }
    # Named labels: data.class_names may set their order (build_data remaps by name, never by position).
    return Source(name=path.stem, tables=tables, class_names=class_names, info=info)


MAX_SKIPPED_IDS = 1000
"""Integer labels are class indices 0..K-1: more ids skipped than this (codes such as SNOMED 426783006 in the
label column) is refused before a name is made for every id up to the largest (gigabytes, then a kill)."""


def refuse_sparse_ids(span: int, distinct: int, where: str) -> None:
    """Integer labels whose largest id leaves more than MAX_SKIPPED_IDS ids without an image."""
    if span - distinct > MAX_SKIPPED_IDS:
        raise EdgeKDError(f"{where}: integer labels go up to {span - 1} for {distinct} distinct ones: labels are "
                          "class indices 0..K-1 (codes or ids are class names: give them as text, e.g. with a "
                          "letter in front, or map them to indices)")


def _csv_classes(path: Path, label_values: list[str],
                 lines: list[int]) -> tuple[list[str], dict[str, int], dict[str, Any]]:
    """(class names, label -> id, Source.info) of a manifest's labels: integer ids as given (ids that skip one are
    noted), else names in sorted order (a name on one row only is noted: build_data refuses both unless the recipe
    picks or names the classes)."""
    as_ids = {v: integer_label(v) for v in label_values}
    named = None in as_ids.values()
    info: dict[str, Any] = {"named_labels": named}
    if not named:
        ids = sorted(set(as_ids.values()))
        if ids[0] < 0:
            raise EdgeKDError(f"{path}: negative label {ids[0]}")
        refuse_sparse_ids(ids[-1] + 1, len(ids), str(path))
        skipped = sorted(set(range(ids[-1] + 1)) - set(ids))
        if skipped:
            info["skipped_ids"] = skipped
        return [f"class_{i}" for i in range(ids[-1] + 1)], as_ids, info
    class_names = sorted(set(label_values))
    spelled: dict[str, str] = {}
    for name in class_names:
        other = spelled.setdefault(unicodedata.normalize("NFC", name).casefold(), name)
        if other != name:  # "café" typed as one code point and as e + a combining accent had been two classes
            how = "in case" if unicodedata.normalize("NFC", name) != unicodedata.normalize("NFC", other) else \
                "in Unicode form (the same letters as other code points, e.g. an accent typed apart)"
            raise EdgeKDError(f"{path}:{lines[label_values.index(name)]}: label {name!r} differs from {other!r} "
                              f"(line {lines[label_values.index(other)]}) only {how}: spell one class one way")
    to_id = {n: i for i, n in enumerate(class_names)}
    info["label_rows"] = {n: lines[label_values.index(n)] for n in class_names}  # where each label first appears
    counts = Counter(label_values)
    lone = next((n for n in class_names if counts[n] == 1), None)
    if lone is not None:
        info["lone_label"] = (to_id[lone], f"{path}:{lines[label_values.index(lone)]}: label {lone!r} is on this row "
                                           "only")
    return class_names, to_id, info


def integer_label(value: str) -> int | None:
    """A manifest label that is a class id: `3`, `03` or `3.0` (as a spreadsheet or pandas may write it; `01` had been
    refused as an unknown label and `10.0` sorted before `2.0` as names), else None."""
    whole, _, fraction = value.partition(".")
    digits = whole[1:] if whole.startswith("-") else whole
    return int(whole) if digits.isdigit() and digits.isascii() and fraction.strip("0") == "" else None


def _read_manifest(path: Path) -> tuple[list[dict[str, str]], list[int]]:
    """The CSV's rows (UTF-8, an Excel byte-order mark allowed) with at least the path and label columns, and the
    file line each row ends on (blank lines and quoted line breaks counted: errors name the line an editor shows)."""
    data = path.read_bytes()
    try:
        reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig"), newline=""))
        if reader.fieldnames:  # `path, label` (a space after each comma) had lacked a column named "label"
            reader.fieldnames = [h.strip() if h else h for h in reader.fieldnames]
        header = reader.fieldnames or []
        twice = next((h for h in header if h and header.count(h) > 1), None)
        if twice:  # the last of them had been read, without a word
            raise EdgeKDError(f"{path}: column {twice!r} named twice in the header; name each column once")
        rows, lines = [], []
        for row in reader:
            rows.append(row)
            lines.append(reader.line_num)
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise EdgeKDError(f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x}); save the manifest as "
                          "UTF-8") from None
    except csv.Error as err:
        raise EdgeKDError(f"{path}: not a readable CSV ({err})") from None
    if not rows:
        raise EdgeKDError(f"{path}: CSV manifest is empty")
    header = list(rows[0])
    missing = {"path", "label"} - set(header)
    if missing:
        sep = next((s for s in (";", "\t", "|") if any(s in (h or "") for h in header)), None)
        hint = f" (its header is separated by {sep!r}; edgekd reads comma-separated values)" if sep else ""
        cased = [h for h in header if h and h.lower() in missing]
        hint = hint or (f" (its header has {', '.join(cased)}: column names are lower case)" if cased else "")
        raise EdgeKDError(f"{path}: CSV manifest lacks column(s) {', '.join(sorted(missing))}{hint}")
    _refuse_near_miss_columns(path, rows)
    return rows, lines


SPLIT_ALIASES = {"training": "train", "valid": "val", "validation": "val", "testing": "test"}
"""Other words for the three splits a manifest may use (any case): `Train`, `validation`, `TESTING`."""


def split_name(value: str) -> str | None:
    """train/val/test for a split column's value in any case or spelling SPLIT_ALIASES knows, else None."""
    value = value.strip().lower()
    return value if value in SPLITS else SPLIT_ALIASES.get(value)


NEAR_MISS_COLUMNS = {"patient_id": {"patientid", "patient", "patientname", "patid", "subjectid", "pid", "patientno",
                                    "patientnumber", "patientnum", "patientnr", "patientkey", "subjectno", "mrn",
                                    "participantid", "personid"},  # (not `subject`, `case`: body part, diagnosis)
                     "split": {"split", "splits", "subset", "partition"}}
"""Headers that may mean an optional column under another spelling: read as a plain extra column, they would leave
splits by image (a patient's images on both sides) or replace the user's own test split by a random one."""


def _refuse_near_miss_columns(path: Path, rows: list[dict[str, str]]) -> None:
    """A near-miss header whose values fit the role is an error (split values all train/val/test or their aliases;
    patient ids, some repeated, as a patient's images are; blank cells aside); one holding something else is another
    column."""
    header = list(rows[0])
    for column, spellings in NEAR_MISS_COLUMNS.items():
        if column in header:
            continue
        for near in (h for h in header if h and "".join(c for c in h.lower() if c.isalnum()) in spellings):
            values = [v for v in ((r.get(near) or "").strip() for r in rows) if v]  # a blank cell aside
            fits = bool(values) and (all(split_name(v) for v in values) if column == "split"
                                     else 1 < len(set(values)) < len(values))
            if fits:
                raise EdgeKDError(f"{path}: column {near!r} looks like the {column} column: name it {column} "
                                  f"(edgekd reads path, label, patient_id and split)")


def _read_idx(file: Path, ndim: int) -> np.ndarray:
    """An idx ubyte file of `ndim` dimensions (3: images, 1: labels), gzipped or not; a cut-short download, a file
    that is not gzip or not idx, or another shape: one line naming the file (EOFError had ended as a blank line)."""
    opener = gzip.open if file.suffix == ".gz" else open
    try:
        with opener(file, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError, zlib.error) as err:
        raise EdgeKDError(f"{file}: cannot read it, truncated or corrupt ({exception_line(err, 80)})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise EdgeKDError(f"{file}: not an idx ubyte file")
    if data[3] != ndim or len(data) < 4 + 4 * ndim:
        raise EdgeKDError(f"{file}: an idx file of {data[3]} dimensions, expected {ndim}")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise EdgeKDError(f"{file}: truncated idx file")
    return arr.reshape(dims)


def load_idx_dir(path: str | Path) -> Source:
    """A folder of MNIST-style idx files (train-images-idx3-ubyte.gz, t10k-..., as Fashion-MNIST ships)."""
    root = Path(path)
    tables = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        img = next(iter(sorted(root.glob(f"{prefix}-images-idx3-ubyte*"))), None)
        lab = next(iter(sorted(root.glob(f"{prefix}-labels-idx1-ubyte*"))), None)
        if img is None or lab is None:
            raise EdgeKDError(f"{root}: missing {prefix}-images/labels idx files")
        labels, images = _read_idx(lab, 1).astype(np.int64), _read_idx(img, 3)[..., None]
        if len(labels) != len(images):  # fewer labels: an IndexError; more images: the extra dropped unsaid
            raise EdgeKDError(f"{root}: {img.name} holds {len(images)} images, {lab.name} {len(labels)} labels")
        if len(labels) and labels.max() >= len(FASHION_CLASSES):
            raise EdgeKDError(f"{root}: {lab.name} holds label {int(labels.max())}; Fashion-MNIST has "
                              f"{len(FASHION_CLASSES)} classes (0..{len(FASHION_CLASSES) - 1})")
        tables[split] = Table(labels=labels, images=images)
    return Source(name=root.name, tables=tables, class_names=list(FASHION_CLASSES))
