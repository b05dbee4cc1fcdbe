"""Data: sources, splits (given, stratified, patient, k-fold), transforms, imbalance helpers, bad images."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from edgekd.data import build_data, build_transforms, class_weights, kfold_indices, load_source
from edgekd.data.dataset import balanced_sampler
from edgekd.data.splits import group_split, stratified_split
from edgekd.data.transforms import build_op
from edgekd.errors import EdgeKDError
from edgekd.recipe import recipe_from_dict
from conftest import write_image_folder, write_npz


def recipe(**data):
    return recipe_from_dict({"data": {"image_size": 16, "batch_size": 8, **data}})


def test_a_resplit_that_replaces_the_datas_own_val_split_is_said(tmp_path):
    """data.split=patient (the skin recipe's) re-drew a CSV split column's val rows without a word."""
    folder = write_image_folder(tmp_path / "imgs", n_per_class=6, size=16)
    rows = [f"imgs/{c}/{c}_{i}.png,{c},p{c}{i // 2},{('train', 'train', 'val', 'val', 'test', 'test')[i]}"
            for c in ("a", "b") for i in range(6)]
    (tmp_path / "m.csv").write_text("path,label,patient_id,split\n" + "\n".join(rows) + "\n")
    assert folder.is_dir()
    said = [n for n in build_data(recipe(source="csv", path=str(tmp_path / "m.csv"), split="patient",
                                         val_fraction=0.5)).notes if n.startswith("data.split=")]
    assert said == ["data.split=patient: the CSV split column's val rows are pooled with train and a new val split is "
                    "drawn (data.val_fraction 0.5; the test split is kept); data.split=given keeps them"]
    assert not [n for n in build_data(recipe(source="csv", path=str(tmp_path / "m.csv"))).notes
                if n.startswith("data.split=")]
    npz = write_npz(tmp_path / "d.npz", channels=1)  # an .npz has a val split; the builtin set has its own too
    assert any(n.startswith("data.split=stratified: the .npz's val images are pooled") for n in
               build_data(recipe(source="medmnist", path=str(npz), split="stratified")).notes)


def test_medmnist_gray_and_rgb(tmp_path):
    gray = write_npz(tmp_path / "g.npz", channels=1)
    rgb = write_npz(tmp_path / "c.npz", channels=3, size=20)
    s = load_source("medmnist", str(gray))
    assert s.tables["train"].images.shape == (48, 16, 16, 1) and set(s.tables) == {"train", "val", "test"}
    dm = build_data(recipe(source="medmnist", path=str(rgb), channels=3))
    x, y = next(iter(dm.loader("train")))
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_builtin_dataset_ships_with_the_package():
    dm = build_data(recipe(source="builtin", image_size=28))
    assert dm.class_names == ["normal", "pneumonia"]
    assert {s: len(t) for s, t in dm.tables.items()} == {"train": 888, "val": 200, "test": 300}


def test_npz_with_nan_or_multilabel_is_refused(tmp_path):
    p = tmp_path / "nan.npz"
    np.savez(p, train_images=np.full((4, 8, 8), np.nan, dtype=np.float32), train_labels=np.zeros((4, 1)))
    with pytest.raises(EdgeKDError, match="NaN"):
        load_source("medmnist", str(p))
    p = tmp_path / "ml.npz"
    np.savez(p, train_images=np.zeros((4, 8, 8), np.uint8), train_labels=np.zeros((4, 3)))
    with pytest.raises(EdgeKDError, match="multi-label"):
        load_source("medmnist", str(p))


def test_npz_labels_that_skip_ids_or_exceed_a_known_set_are_refused(tmp_path):
    # Five stray train labels of 7 in a 2-class set made an 8-class model with 5 empty classes, silently.
    images = np.zeros((12, 8, 8), np.uint8)
    labels = np.array([0, 1] * 6)[:, None]
    stray = labels.copy()
    stray[:5] = 7
    np.savez(tmp_path / "mine.npz", train_images=images, train_labels=stray, val_images=images, val_labels=labels)
    with pytest.raises(EdgeKDError, match=r"class id\(s\) 2, 3, 4, 5, 6 have no image in any split"):
        build_data(recipe(source="medmnist", path=str(tmp_path / "mine.npz"), split="stratified"))
    # ... unless data.classes picks the ids that are there.
    picked = build_data(recipe(source="medmnist", path=str(tmp_path / "mine.npz"), split="stratified", classes=[0, 7]))
    assert picked.class_names == ["class_0", "class_7"] and picked.num_classes == 2
    np.savez(tmp_path / "pneumoniamnist.npz", train_images=images, train_labels=np.arange(12)[:, None] % 3)
    with pytest.raises(EdgeKDError, match="labels go up to 2, but MedMNIST 'pneumoniamnist' has 2 classes"):
        load_source("medmnist", str(tmp_path / "pneumoniamnist.npz"))
    # A known set's file without one of its classes keeps the set's classes (a subset of it).
    np.savez(tmp_path / "retinamnist.npz", train_images=images, train_labels=np.arange(12)[:, None] % 2 * 3)
    assert len(load_source("medmnist", str(tmp_path / "retinamnist.npz")).class_names) == 5
    # MedMNIST+ file names (a size after the set's) and the other single-label 2D sets had got class_<i> names, and
    # no check of their ids; an empty split had failed in numpy ("zero-size array")
    np.savez(tmp_path / "pneumoniamnist_224.npz", train_images=images, train_labels=np.arange(12)[:, None] % 3)
    with pytest.raises(EdgeKDError, match="labels go up to 2, but MedMNIST 'pneumoniamnist_224' has 2 classes"):
        load_source("medmnist", str(tmp_path / "pneumoniamnist_224.npz"))
    np.savez(tmp_path / "organamnist_64.npz", train_images=images, train_labels=labels)
    names = load_source("medmnist", str(tmp_path / "organamnist_64.npz")).class_names
    assert len(names) == 11 and names[:3] == ["bladder", "femur_left", "femur_right"]
    np.savez(tmp_path / "empty.npz", train_images=images, train_labels=labels, val_images=images[:0],
             val_labels=labels[:0])
    with pytest.raises(EdgeKDError, match=r"empty.npz: val_images holds no image \(leave the key out"):
        load_source("medmnist", str(tmp_path / "empty.npz"))


def test_image_folder_splits_stratified(tmp_path):
    root = write_image_folder(tmp_path / "imgs", n_per_class=10)
    dm = build_data(recipe(source="imagefolder", path=str(root), split="stratified", val_fraction=0.2, test_fraction=0.2))
    assert dm.class_names == ["a", "b"]
    counts = dm.counts()
    assert counts["test"] == [2, 2] and counts["val"] == [2, 2] and counts["train"] == [6, 6]


def test_given_train_and_val_folders_without_a_test_folder_get_a_carved_test_split(tmp_path):
    """`given` carves missing splits: train/ and val/ folders without test/ had trained, then failed at the end
    ("no 'test' split"); an .npz of train and val keys alike."""
    root = tmp_path / "imgs"
    write_image_folder(root / "train", n_per_class=10)
    write_image_folder(root / "val", n_per_class=3)
    dm = build_data(recipe(source="imagefolder", path=str(root), test_fraction=0.2))
    counts = dm.counts()
    assert counts["val"] == [3, 3] and counts["test"] == [2, 2] and counts["train"] == [8, 8]
    with pytest.raises(EdgeKDError, match="data.test_fraction must be > 0 when the source has no test split"):
        build_data(recipe(source="imagefolder", path=str(root), test_fraction=0.0))
    # a checkpoint of such a source from before the carve recorded no test split: its test split now holds images
    # it trained on, refused (not scored silently)
    from edgekd.data import check_trained_splits

    rec = recipe(source="imagefolder", path=str(root), test_fraction=0.2)
    old = {k: v for k, v in dm.split_fingerprint().items() if k != "test"}
    with pytest.raises(EdgeKDError, match=r"test: 4 images carved now \(data.test_fraction\) from the train images, "
                                          r"a split the run did not have"):
        check_trained_splits({"recipe": rec.to_dict(), "data_splits": old}, dm, rec, "best.pt")
    # a checkpoint written before a split key existed (data.dicom_patient_ids) drew its splits with that key's
    # default: still the same settings, still checked
    from edgekd.data import same_split_settings

    embedded = rec.to_dict()
    del embedded["data"]["dicom_patient_ids"]
    assert same_split_settings(embedded, rec)
    assert not same_split_settings(embedded, recipe(source="imagefolder", path=str(root), test_fraction=0.2,
                                                    dicom_patient_ids=True))


def test_a_folder_of_dicom_files_warns_of_its_patients_and_splits_by_them_when_asked(tmp_path):
    """A PACS export's DICOM files carry PatientID: a folder of them was split by image, every test patient also in
    train, without a word. By default (old checkpoints' splits unchanged; anonymised exports, one id for all, still
    usable) a warning names the patients; data.dicom_patient_ids=true splits by them."""
    from test_runtime import write_dicom  # imported here: at module level pytest would collect its tests twice

    from edgekd.train import warn_about_data

    root = tmp_path / "dcm"
    for c, name in enumerate(("normal", "pneumonia")):
        (root / name).mkdir(parents=True)
        for patient in range(6):
            for k in range(3):
                pixels = np.full((16, 16), 1000 * (c + 1) + 37 * patient + k, dtype=np.uint16)
                write_dicom(root / name / f"1.2.{c}.{patient}.{k}", pixels, PatientID=f"P{c}{patient}")
    r = dict(source="imagefolder", path=str(root), val_fraction=0.2, test_fraction=0.2)
    dm = build_data(recipe(**r))
    assert dm.tables["train"].groups is None  # by image, as before
    assert dm.notes == ["the DICOM files name 12 patients (PatientID) but the split is by image, so one patient's "
                        "images may be in two splits: data.dicom_patient_ids=true splits by patient"]
    said: list[str] = []
    warn_about_data(dm, said.append)
    assert said[0] == f"warning: {dm.notes[0]}"  # what `edgekd train` and `check` print
    dm = build_data(recipe(**r, dicom_patient_ids=True))
    patients = {split: set(t.groups.tolist()) for split, t in dm.tables.items()}
    assert all(len(ids) >= 2 for ids in patients.values()) and dm.notes == []
    assert not (patients["train"] & patients["test"]) and not (patients["train"] & patients["val"])
    assert not (patients["val"] & patients["test"])
    (root / "normal" / "notes.txt").write_text("reading notes")  # not an image: left out, and said
    assert build_data(recipe(**r, dicom_patient_ids=True)).notes == [
        f"1 file(s) in the class folders are not images and are left out (neither an image suffix nor DICOM, or a "
        f"DICOMDIR), e.g. {root / 'normal' / 'notes.txt'}"]
    (root / "normal" / "notes.txt").unlink()
    # a file without a PatientID: asked for ids, refused, naming it; not asked, nothing changes
    write_dicom(root / "normal" / "1.9", np.zeros((16, 16), np.uint16))
    with pytest.raises(EdgeKDError, match=r"data.dicom_patient_ids: .*1.9 has no PatientID"):
        build_data(recipe(**r, dicom_patient_ids=True))
    assert build_data(recipe(**r)).tables["train"].groups is None
    # without pydicom the folder had seemed to hold no DICOM files; a CSV of them was said to hold none
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "pydicom", None)  # `import pydicom` raises ImportError
        with pytest.raises(EdgeKDError, match=r"^data.dicom_patient_ids: reading PatientID tags needs pydicom "
                                              r"\(pip install 'edgekd\[dicom\]'\)$"):
            build_data(recipe(**r, dicom_patient_ids=True))
    rows = [f"{f.relative_to(tmp_path)},{f.parent.name}" for f in sorted(root.rglob("1.2.*"))]
    (tmp_path / "m.csv").write_text("\n".join(["path,label", *rows]) + "\n")
    with pytest.raises(EdgeKDError, match=r"^data.dicom_patient_ids reads an ImageFolder's DICOM files; a csv source "
                                          r"gives patient ids in a patient_id column$"):
        build_data(recipe(source="csv", path=str(tmp_path / "m.csv"), dicom_patient_ids=True))
    with pytest.raises(EdgeKDError, match=r"^data.dicom_patient_ids reads an ImageFolder's DICOM files; a builtin "
                                          r"source has none \(and no patient ids\)$"):
        build_data(recipe(source="builtin", dicom_patient_ids=True))


def test_image_folder_class_names_order_the_folders_by_name(tmp_path):
    root = write_image_folder(tmp_path / "imgs", n_per_class=10)
    src = load_source("imagefolder", str(root))
    in_b = {p for p, y in zip(src.tables["all"].paths, src.tables["all"].labels) if y == 1}  # folder b, label 1
    dm = build_data(recipe(source="imagefolder", path=str(root), split="stratified", val_fraction=0.2,
                           test_fraction=0.2, class_names=["b", "a"]))
    assert dm.class_names == ["b", "a"]
    train = dm.tables["train"]
    assert {p for p, y in zip(train.paths, train.labels) if y == 0} == in_b & set(train.paths)  # b's images: 0
    with pytest.raises(EdgeKDError, match="lists 'nope', which is not one of the class folders"):
        build_data(recipe(source="imagefolder", path=str(root), split="stratified", class_names=["b", "nope"]))
    with pytest.raises(EdgeKDError, match="unknown label 'b'"):
        build_data(recipe(source="imagefolder", path=str(root), split="stratified", class_names=["a"]))
    with pytest.raises(EdgeKDError, match="lists 'a' more than once"):
        build_data(recipe(source="imagefolder", path=str(root), split="stratified", class_names=["b", "a", "a"]))


def test_data_classes_must_exist_and_be_listed_once(tmp_path):
    npz = write_npz(tmp_path / "d.npz", classes=2)
    assert build_data(recipe(source="medmnist", path=str(npz), classes=[1])).class_names == ["class_1"]
    with pytest.raises(EdgeKDError, match="data.classes: class 5 is not in the data"):
        build_data(recipe(source="medmnist", path=str(npz), classes=[0, 5]))
    with pytest.raises(EdgeKDError, match="data.classes lists class 0 more than once"):
        build_data(recipe(source="medmnist", path=str(npz), classes=[0, 0]))


def test_empty_class_folder_is_an_error(tmp_path):
    root = write_image_folder(tmp_path / "imgs")
    (root / "c").mkdir()
    with pytest.raises(EdgeKDError, match="empty class folder"):
        load_source("imagefolder", str(root))


def _manifest(tmp_path, n_patients=10, per_patient=3):
    root = write_image_folder(tmp_path / "imgs", n_per_class=n_patients * per_patient // 2)
    files = sorted(root.rglob("*.png"))
    lines = ["path,label,patient_id"]
    for i, f in enumerate(files):
        lines.append(f"{f.relative_to(tmp_path)},{f.parent.name},p{i // per_patient}")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "m.csv"


def test_csv_labels_spelled_in_two_unicode_forms_are_refused(tmp_path):
    # "café" as one code point (NFC) and as e + a combining accent (NFD) print alike: they had been two classes
    csv = _manifest(tmp_path)
    rows = csv.read_text().splitlines()
    nfc, nfd = "caf\u00e9", "cafe\u0301"
    rows = rows[:1] + [r.replace(",a,", f",{nfc if i % 2 else nfd},") for i, r in enumerate(rows[1:])]
    csv.write_text("\n".join(rows) + "\n", encoding="utf-8")
    with pytest.raises(EdgeKDError, match=r"m.csv:\d+: label .* differs from .* only in Unicode form"):
        load_source("csv", str(csv))
    csv.write_text("\n".join(r.replace(nfd, nfc.upper()) for r in rows) + "\n", encoding="utf-8")
    with pytest.raises(EdgeKDError, match=r"only in case: spell one class one way"):
        load_source("csv", str(csv))


def test_patient_split_keeps_patients_apart(tmp_path):
    csv = _manifest(tmp_path)
    dm = build_data(recipe(source="csv", path=str(csv), split="patient", val_fraction=0.2, test_fraction=0.2))
    groups = {s: set(t.groups) for s, t in dm.tables.items()}
    assert not groups["train"] & groups["val"] and not groups["train"] & groups["test"] and not groups["val"] & groups["test"]
    assert sum(len(t) for t in dm.tables.values()) == 30


def test_csv_errors_name_the_line(tmp_path):
    csv = _manifest(tmp_path)
    text = csv.read_text().splitlines()
    csv.write_text("\n".join(text + ["imgs/a/missing.png,a,p99"]) + "\n")
    with pytest.raises(EdgeKDError, match=r"m.csv:\d+: image imgs/a/missing.png not found"):
        load_source("csv", str(csv))
    # the line an editor shows, blank lines counted (DictReader skips them: the row's index had been named)
    csv.write_text("\n".join(text[:3] + ["", ""] + text[3:] + ["imgs/a/missing.png,a,p99"]) + "\n")
    with pytest.raises(EdgeKDError, match=rf"m.csv:{len(text) + 3}: image imgs/a/missing.png not found"):
        load_source("csv", str(csv))


def _groups(dm):
    return {s: set(t.groups) for s, t in dm.tables.items()}


def test_patient_ids_keep_patients_apart_in_every_split_mode(tmp_path):
    # `given` (the default) carved the missing splits image by image: 22 of 30 patients in two splits, silently.
    csv = _manifest(tmp_path)
    g = _groups(build_data(recipe(source="csv", path=str(csv), val_fraction=0.2, test_fraction=0.2)))
    assert not (g["train"] & g["val"] or g["train"] & g["test"] or g["val"] & g["test"])
    with pytest.raises(EdgeKDError, match=r"patient p\d+ appears in both .* \(data.split=stratified splits images"):
        build_data(recipe(source="csv", path=str(csv), split="stratified", val_fraction=0.2, test_fraction=0.2))
    # A split column that puts one patient in train and test: refused under `given` too (it was only checked
    # under split: patient, which re-splits and so drops the manifest's own split).
    lines = csv.read_text().splitlines()
    rows = [lines[0] + ",split"] + [f"{r},{'test' if i in (0, 3, 4, 5) else 'train'}" for i, r in enumerate(lines[1:])]
    csv.write_text("\n".join(rows) + "\n")
    with pytest.raises(EdgeKDError, match=r"patient p0 appears in both test and train \(the given splits: "):
        build_data(recipe(source="csv", path=str(csv), val_fraction=0.2))


def test_a_split_carved_by_patient_keeps_every_class(tmp_path):
    # Class a: 20 patients of one image each; class b: 3 patients of five. The first patient-level draw can leave
    # class b out of a split under the default `given` split; another draw of the same seeded k-fold keeps it.
    root = write_image_folder(tmp_path / "imgs", n_per_class=20)
    files_a, files_b = sorted((root / "a").glob("*.png")), sorted((root / "b").glob("*.png"))[:15]
    rows = ["path,label,patient_id"] + [f"{f.relative_to(tmp_path)},a,pa{i}" for i, f in enumerate(files_a)]
    rows += [f"{f.relative_to(tmp_path)},b,pb{i // 5}" for i, f in enumerate(files_b)]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    for seed in range(4):
        dm = build_data(recipe_from_dict({"seed": seed, "data": {"source": "csv", "path": str(tmp_path / "m.csv"),
                                                                 "image_size": 16, "batch_size": 8}}))
        assert all(min(c) > 0 for c in dm.counts().values()), (seed, dm.counts())
    (tmp_path / "m.csv").write_text("\n".join(rows[:-5]) + "\n")  # 2 patients of class b: not enough for 3 splits
    with pytest.raises(EdgeKDError, match="carving the val split by patient: no draw of 1/7 of the 18 patients keeps every class on both"):
        build_data(recipe(source="csv", path=str(tmp_path / "m.csv")))


def test_a_patient_share_smaller_than_the_class_count_is_named_as_the_cause():
    """1/10 of 26 patients is 2-3 patients, fewer than 4 classes: the error had named a class of 6 patients."""
    groups = np.repeat(np.arange(26), 4)
    labels = np.repeat(np.arange(26) % 4, 4)
    with pytest.raises(EdgeKDError, match=r"^carving the val split by patient: 1/10 of the 26 patients is at most 3, "
                                          r"fewer than the 4 classes that each need a patient there; a larger "):
        group_split(labels, groups, 0.1, 0, "the val split")
    lone = np.repeat([0] * 10 + [1] * 10 + [2] * 5 + [3], 2)  # a class of one patient: that is the cause to name
    with pytest.raises(EdgeKDError, match=r"no draw of 1/10 of the 26 patients .* \(class id 3 has 1 patient\)"):
        group_split(lone, np.repeat(np.arange(26), 2), 0.1, 0, "the val split")
    keep, held = group_split(labels, groups, 0.25, 0, "the val split")  # about 6 patients: every class on both sides
    assert set(labels[held]) == set(labels[keep]) == {0, 1, 2, 3}


def test_csv_manifest_rows_that_would_leak_or_mislabel_are_refused(tmp_path, monkeypatch):
    csv = _manifest(tmp_path)
    (tmp_path / "imgs" / "b" / "extra.png").write_bytes((tmp_path / "imgs" / "a" / "a_0.png").read_bytes())
    lines = csv.read_text().splitlines()
    # Patient ids are stripped: "p0 " and "p0" are one patient (they were two, so split: patient leaked).
    csv.write_text("\n".join(lines[:2] + [lines[2] + " "] + lines[3:]) + "\n")
    assert "p0 " not in set(load_source("csv", str(csv)).tables["all"].groups)
    path, label, _ = lines[1].split(",")
    for extra, says in ((f"{path},{label},p9", r"is listed again \(first on line 2\)"),
                        ("imgs/b/extra.png,b,", "empty patient_id")):
        csv.write_text("\n".join(lines + [extra]) + "\n")
        with pytest.raises(EdgeKDError, match=says):
            load_source("csv", str(csv))
    # Given by a relative path, the manifest's relative row and the same file's absolute path are one image (two
    # rows of one image, under two labels, had both been read)
    assert not Path(path).is_absolute()
    monkeypatch.chdir(tmp_path)
    csv.write_text("\n".join(lines + [f"{tmp_path / path},b,p9"]) + "\n")
    with pytest.raises(EdgeKDError, match=r"m.csv:\d+: image \S+ is listed again \(first on line 2\)"):
        load_source("csv", csv.name)
    # A label on one row only is a typo until data.class_names says which labels to expect.
    csv.write_text("\n".join(lines[:-1] + [lines[-1].replace(",b,", ",bb,")]) + "\n")
    with pytest.raises(EdgeKDError, match=r"m.csv:31: label 'bb' is on this row only \(a typo\?"):
        build_data(recipe(source="csv", path=str(csv), split="patient"))
    with pytest.raises(EdgeKDError, match="unknown label 'bb'"):
        build_data(recipe(source="csv", path=str(csv), split="patient", class_names=["a", "b"]))
    assert build_data(recipe(source="csv", path=str(csv), split="patient", classes=[0, 1])).num_classes == 2
    # Integer labels that skip an id, as in an .npz.
    csv.write_text("\n".join(lines[:1] + [r.replace(",b,", ",2,").replace(",a,", ",0,") for r in lines[1:]]) + "\n")
    with pytest.raises(EdgeKDError, match=r"class id\(s\) 1 have no image in any split"):
        build_data(recipe(source="csv", path=str(csv), split="patient"))


def test_csv_encoding_and_separator_problems_are_named(tmp_path):
    csv = _manifest(tmp_path)
    text = csv.read_text()
    csv.write_bytes(b"\xef\xbb\xbf" + text.encode())  # Excel's "CSV UTF-8" starts with a byte-order mark
    assert len(load_source("csv", str(csv)).tables["all"]) == 30
    csv.write_bytes(text.replace("p0", "p\xff").encode("latin-1"))
    with pytest.raises(EdgeKDError, match=r"m.csv:2: not UTF-8 text \(byte 0xff\); save the manifest"):
        load_source("csv", str(csv))
    csv.write_text(text.replace(",", ";"))
    with pytest.raises(EdgeKDError, match="lacks column.*separated by ';'; edgekd reads comma-separated"):
        load_source("csv", str(csv))


def test_csv_labels_and_headers_as_spreadsheets_write_them(tmp_path):
    """Labels `01`/`1.0` had been "unknown label '01'" or names sorted as text (`10.0` before `2.0`); a header
    `path, label` lacked a column named label; a split column without train rows failed as KeyError: 'train'."""
    from edgekd.data.sources import integer_label

    assert [integer_label(v) for v in ("3", "03", "3.0", "3.", "-1", "3.5", "a", "", ".", "٣")] == \
        [3, 3, 3, 3, -1, None, None, None, None, None]
    csv = _manifest(tmp_path)
    lines = csv.read_text().splitlines()
    ids = {"a": "00", "b": "1.0"}
    spelled = [r.replace(",a,", f",{ids['a']},").replace(",b,", f",{ids['b']},") for r in lines[1:]]
    csv.write_text("\n".join(["path, label, patient_id", *spelled]) + "\n")
    source = load_source("csv", str(csv))
    assert source.class_names == ["class_0", "class_1"]
    labels = source.tables["all"].labels.tolist()
    assert labels == [0 if ",00," in r else 1 for r in spelled]
    csv.write_text("\n".join(["label, path"] + [f"{r.split(',')[1]}, {r.split(',')[0]}" for r in spelled]) + "\n")
    assert len(load_source("csv", str(csv)).tables["all"]) == len(spelled)  # the path after ", " had kept its space
    csv.write_text("\n".join(["path, label, label"] + [r + ",x" for r in spelled]) + "\n")
    with pytest.raises(EdgeKDError, match=r"m.csv: column 'label' named twice in the header; name each column once$"):
        load_source("csv", str(csv))
    csv.write_text("\n".join(["Path,Label"] + [",".join(r.split(",")[:2]) for r in spelled]) + "\n")
    with pytest.raises(EdgeKDError, match=r"lacks column\(s\) label, path \(its header has Path, Label: column "
                                          r"names are lower case\)$"):
        load_source("csv", str(csv))
    csv.write_text("\n".join(["path,label,split"] + [",".join(r.split(",")[:2]) + ",test" for r in spelled]) + "\n")
    with pytest.raises(EdgeKDError, match=r"m.csv: no row of the train split \(its split column gives test\); a "
                                          r"manifest with a split column needs train rows$"):
        load_source("csv", str(csv))


def test_patient_ids_from_file_names_keep_patients_apart(tmp_path):
    # Kermany OCT2017 names its B-scans CLASS-PATIENT-N.jpeg: the KD-OCT protocol's patient-level split and k-fold
    # need the patient, which an ImageFolder had no way to give.
    root = tmp_path / "oct"
    for split, patients in (("train", range(12)), ("test", range(12, 16))):
        for p in patients:
            cls = "CNV" if p % 2 else "NORMAL"
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for k in range(3):
                Image.new("L", (8, 8), 40 * k + p).save(root / split / cls / f"{cls}-{1000 + p}-{k}.png")
    pattern = r"^[A-Z]+-(\d+)-"
    dm = build_data(recipe(source="imagefolder", path=str(root), patient_pattern=pattern, val_fraction=0.25))
    g = _groups(dm)
    assert not (g["train"] & g["val"] or g["train"] & g["test"]) and len(g["val"]) >= 2 and "1000" in g["train"] | g["val"]
    assert sum(len(t) for t in dm.tables.values()) == 48
    from edgekd.distill.folds import write_fold_splits

    for fold in range(3):  # k-fold by patient; splits.json lists what each fold used, for an audit
        rec = recipe(source="imagefolder", path=str(root), patient_pattern=pattern, folds=3, fold=fold)
        f = _groups(build_data(rec))
        assert not f["train"] & f["val"]
        write_fold_splits(tmp_path / f"fold{fold}" / "splits.json", rec)
        listed = json.loads((tmp_path / f"fold{fold}" / "splits.json").read_text())
        assert {s: set(listed[s]["patients"]) for s in ("train", "val", "test")} == f
        assert len(listed["val"]["files"]) == listed["val"]["images"] == sum(listed["val"]["class_counts"])
    Image.new("L", (8, 8)).save(root / "train" / "CNV" / "scan.png")
    with pytest.raises(EdgeKDError, match=r"patient_pattern .* finds no patient id in the file name 'scan.png'"):
        build_data(recipe(source="imagefolder", path=str(root), patient_pattern=pattern))
    with pytest.raises(EdgeKDError, match="patient_pattern needs a group"):
        recipe(source="imagefolder", path=str(root), patient_pattern="^[A-Z]+-")
    npz = write_npz(tmp_path / "n.npz")
    with pytest.raises(EdgeKDError, match="holds no image files to read patient ids from"):
        build_data(recipe(source="medmnist", path=str(npz), patient_pattern=pattern))


def test_kfold_needs_every_class_in_every_val_fold():
    labels = np.array([0] * 20 + [1] * 6)
    groups = np.concatenate([np.repeat(np.arange(10), 2), np.repeat([10, 11, 12], 2)])  # 3 patients of class 1
    with pytest.raises(EdgeKDError, match=r"--folds 4: class id 1 has 3 patients in the train/val pool \(13 patients "
                                          r"in all\), too few"):
        kfold_indices(labels, 4, seed=0, groups=groups)
    with pytest.raises(EdgeKDError, match="class 'CNV' \\(id 1\\) has 3 patients"):  # the name, when known
        kfold_indices(labels, 4, seed=0, groups=groups, class_names=["NORMAL", "CNV"])
    assert len(kfold_indices(labels, 3, seed=0, groups=groups)) == 3
    # Patients holding both classes: enough of each, yet a fold's val split misses one (found by a seeded search).
    mixed = np.array([1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 0, 0])
    with pytest.raises(EdgeKDError, match=r"--folds 3: fold 1's val split has no image of class id 1"):
        kfold_indices(mixed, 3, seed=0, groups=np.array([0, 3, 0, 2, 4, 4, 1, 0, 2, 4, 3, 0]))


def test_stratified_and_group_kfold():
    labels = np.array([0] * 20 + [1] * 10)
    keep, held = stratified_split(labels, 0.2, seed=0)
    assert len(held) == 6 and np.bincount(labels[held]).tolist() == [4, 2]
    groups = np.repeat(np.arange(15), 2)
    folds = kfold_indices(labels, 5, seed=0, groups=groups)
    assert len(folds) == 5
    seen = np.concatenate([v for _, v in folds])
    assert sorted(seen.tolist()) == list(range(30))
    for tr, va in folds:
        assert not set(groups[tr]) & set(groups[va])
    with pytest.raises(EdgeKDError, match="at least"):
        group_split(labels[:4], np.array([0, 0, 1, 1]), 0.2, 0)


def test_kfold_fold_selects_validation(tiny_npz):
    a = build_data(recipe(source="medmnist", path=str(tiny_npz), folds=4, fold=0))
    b = build_data(recipe(source="medmnist", path=str(tiny_npz), folds=4, fold=1))
    assert len(a.tables["val"]) == 16 and len(a.tables["train"]) == 48
    assert not np.array_equal(a.tables["val"].images, b.tables["val"].images)


def test_class_weights_and_balanced_sampler():
    labels = np.array([0] * 90 + [1] * 10)
    w = class_weights(labels, 2)
    assert w.tolist() == pytest.approx([100 / 180, 100 / 20])
    drawn = labels[list(balanced_sampler(labels, seed=0))]
    assert 0.35 < drawn.mean() < 0.65


def test_class_weights_not_doubled_by_the_balanced_sampler(tiny_npz):
    # The loss sees the sampler's even mix: weighting it again would count the imbalance twice.
    arrays = dict(np.load(tiny_npz))
    arrays["train_labels"][:40] = 0  # 40+ of 48 train images in class 0
    np.savez(tiny_npz, **arrays)
    plain = build_data(recipe(source="medmnist", path=str(tiny_npz)))
    labels = plain.tables["train"].labels
    assert plain.class_weights()[1] > 2 * plain.class_weights()[0]
    assert plain.class_weights().tolist() == pytest.approx(class_weights(labels, plain.num_classes).tolist())
    sampled = build_data(recipe(source="medmnist", path=str(tiny_npz), balanced_sampler=True))
    present = (np.bincount(labels, minlength=plain.num_classes) > 0).astype(float)
    assert sampled.class_weights().tolist() == present.tolist()


def test_ddp_ranks_share_the_one_process_balanced_draw():
    """Under DDP the balanced sampler had been dropped (each rank took a plain shard, the imbalance uncorrected: a
    2-process run called every image the majority class). Each rank now takes every world-th index of the draw
    one process makes, so the shards interleave back into it and a resume on another process count keeps its mix."""
    from edgekd.data.dataset import DistributedBalancedSampler

    labels = np.array([0] * 9 + [1] * 91)
    one = list(balanced_sampler(labels, seed=7))
    shards = [list(DistributedBalancedSampler(labels, 7, rank, 2)) for rank in range(2)]
    assert [i for pair in zip(*shards) for i in pair] == one and len(shards[0]) == len(shards[1]) == 50
    assert 0.35 < labels[shards[1]].mean() < 0.65  # each rank's half is balanced too, not 91% class 1
    three = [list(DistributedBalancedSampler(labels, 7, rank, 3)) for rank in range(3)]
    assert [len(s) for s in three] == [34, 34, 34]  # 100 padded to 102 by wrapping, as DistributedSampler pads
    assert [i for t in zip(*three) for i in t] == one + one[:2]
    assert list(DistributedBalancedSampler(labels, 8, 0, 2)) != shards[0]  # the epoch's seed draws anew


def test_transforms_by_v2_class_name():
    cfg = recipe().data
    t = build_transforms(cfg, ["RandAugment", {"RandomErasing": {"p": 0.5}}, {"GaussianBlur": {"kernel_size": 3}}], train=True)
    names = [type(op).__name__ for op in t.transforms]
    assert names.index("RandAugment") < names.index("GaussianBlur") < names.index("Normalize") < names.index("RandomErasing")
    t = build_transforms(cfg, [{"RandomHorizontalFlip": {"p": 1.0}}], train=True)
    img = torch.zeros(1, 16, 16, dtype=torch.uint8)
    img[..., :8] = 255
    out = t(img)
    assert out.shape == (3, 16, 16) and out[0, 0, 0] == pytest.approx(-1.0) and out[0, 0, 15] == pytest.approx(1.0)
    with pytest.raises(EdgeKDError, match="unknown op 'Blurr'"):
        build_op({"Blurr": {}})
    with pytest.raises(EdgeKDError, match="RandomRotation"):
        build_op({"RandomRotation": {"degreez": 3}})
    # An op that cannot take the pipeline's uint8 images fails when the pipeline is built, in one line (it had been
    # a TypeError at the first batch); the check's random draws leave the seeded stream as it was.
    torch.manual_seed(5)
    with pytest.raises(EdgeKDError, match=r"augment: the train pipeline fails on an image \(TypeError: Input tensor "
                                          r"should be a float tensor"):
        build_transforms(cfg, [{"Normalize": {"mean": [0.5], "std": [0.5]}}], train=True)
    build_transforms(cfg, [{"RandomRotation": {"degrees": 30}}], train=True)
    after = torch.rand(1)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(1))


def test_input_sized_augment_ops_follow_the_image_size():
    from edgekd.recipe import DataConfig

    cfg = DataConfig(image_size=20, channels=3)
    t = build_transforms(cfg, [{"RandomResizedCrop": {"scale": [0.5, 1.0]}}, "RandomCrop"], train=True)
    assert t(torch.zeros(3, 37, 29, dtype=torch.uint8)).shape == (3, 20, 20)
    assert build_transforms(cfg, [{"RandomResizedCrop": {"size": 20}}], train=True)
    with pytest.raises(EdgeKDError, match="RandomResizedCrop size 224 differs from data.image_size 20"):
        build_transforms(cfg, [{"RandomResizedCrop": {"size": 224}}], train=True)


def test_nested_random_apply_builds_again_from_the_same_recipe_list():
    # the recipe's op list is built once per pipeline (validation, train, each epoch's loader): building must not
    # consume it (RandomApply once popped its inner list, so the second build had no transforms)
    spec = {"RandomApply": {"transforms": [{"GaussianBlur": {"kernel_size": 5}}], "p": 0.3}}
    first, second = build_op(spec), build_op(spec)
    assert len(first.transforms) == len(second.transforms) == 1
    assert spec == {"RandomApply": {"transforms": [{"GaussianBlur": {"kernel_size": 5}}], "p": 0.3}}
    with pytest.raises(EdgeKDError, match="augment: RandomApply"):
        build_op({"RandomApply": {"transforms": []}})


def test_eval_transform_resizes_and_crops():
    cfg = recipe(image_size=16, resize=20, channels=1, mean=[0.0], std=[1.0]).data
    t = build_transforms(cfg, [], train=False)
    out = t(torch.full((3, 40, 30), 128, dtype=torch.uint8))
    assert out.shape == (1, 16, 16) and out.mean().item() == pytest.approx(128 / 255, abs=1e-2)


def test_corrupt_image_named_or_skipped(tmp_path):
    root = write_image_folder(tmp_path / "imgs", n_per_class=6)
    bad = root / "a" / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    r = dict(source="imagefolder", path=str(root), split="stratified", val_fraction=0.25, test_fraction=0.25)
    with pytest.raises(EdgeKDError, match="bad.png") as err:
        build_data(recipe(**r))
    assert "more unreadable" not in str(err.value)
    dm = build_data(recipe(**r, on_bad_image="skip"))
    assert len(dm.bad_files) == 1 and dm.bad_files[0].startswith(f"{bad}: ")  # the file, then why
    assert sum(len(t) for t in dm.tables.values()) == 12
    # every split is read before refusing: the error says how many files fail, not just the first
    (root / "b" / "bad2.png").write_bytes(b"nothing")
    with pytest.raises(EdgeKDError, match=r"bad.*png.*\(and 1 more unreadable file\(s\)\) \(--set data.on_bad_image="
                                          r"skip"):
        build_data(recipe(**r))


def test_image_modes_decode(tmp_path):
    from edgekd.imageio import read_image

    arr16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    Image.fromarray(arr16).save(tmp_path / "16.png")
    Image.new("RGBA", (5, 4), (10, 20, 30, 0)).save(tmp_path / "rgba.png")
    Image.new("CMYK", (5, 4)).save(tmp_path / "cmyk.jpg")
    a = read_image(tmp_path / "16.png")
    assert a.shape == (8, 8, 1) and a.dtype == np.uint8 and a.max() == 255 and a.min() == 0
    assert read_image(tmp_path / "rgba.png").shape == (4, 5, 3)
    assert read_image(tmp_path / "cmyk.jpg").shape == (4, 5, 3)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(EdgeKDError, match="empty file"):
        read_image(tmp_path / "empty.png")


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "CMYK", "P", "YCbCr", "L", "1", "LA"])
def test_an_image_converted_strip_by_strip_has_the_pixels_of_its_whole_conversion(mode):
    """pil_to_array converts and copies STRIP_ROWS rows at a time (a 64-MP photo had held two whole copies beside
    the decoded image): every row, the last partial strip's included, is what one whole-image convert gives."""
    from edgekd.imageio import STRIP_ROWS, pil_to_array

    rgb = Image.fromarray(np.random.default_rng(3).integers(0, 256, (2 * STRIP_ROWS + 37, 11, 3), dtype=np.uint8))
    img = rgb.convert(mode)
    whole = np.asarray(img.convert("L" if mode in ("1", "L", "LA") else "RGB"), dtype=np.uint8)
    got = pil_to_array(img)
    assert got.shape == (*whole.shape[:2], 1 if whole.ndim == 2 else 3) and got.dtype == np.uint8
    assert np.array_equal(got.reshape(whole.shape), whole)


def test_exif_orientation_is_applied_as_a_viewer_applies_it(tmp_path):
    """A camera stores a portrait photo sideways with EXIF Orientation 6 (rotate 90 degrees clockwise to view):
    training and the runtime read the file upright, as the clinician sees it; a file without the tag is untouched,
    and a PIL image handed over by a caller is taken as it is."""
    from edgekd.imageio import EXIF_ORIENTATION, pil_to_array, read_image

    upright = Image.fromarray(np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8))
    upright.save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "exif6.png", exif=exif)  # stored 10x6
    expected = np.asarray(upright)
    assert np.array_equal(read_image(tmp_path / "upright.png"), expected)
    assert np.array_equal(read_image(tmp_path / "exif6.png"), expected)
    with Image.open(tmp_path / "exif6.png") as img:  # a caller's PIL image is taken as it is
        assert np.array_equal(pil_to_array(ImageOps.exif_transpose(img)), expected)
        assert np.array_equal(pil_to_array(img), np.asarray(img.convert("RGB")))


def test_stratified_subset_keeps_the_class_mix_of_a_sorted_split():
    from edgekd.data.splits import stratified_subset

    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)  # a class-sorted folder: the first 20 are all class 0
    idx = stratified_subset(labels, 20, seed=0)
    assert len(idx) == 20 and np.all(np.diff(idx) > 0)
    assert np.bincount(labels[idx]).tolist() == [12, 6, 2]
    assert np.array_equal(idx, stratified_subset(labels, 20, seed=0))  # seeded
    assert np.array_equal(stratified_subset(labels, 500, seed=0), np.arange(100))
    # Too close to the whole set (or too few) to put every class on both sides: a plain seeded draw of that size,
    # where scikit-learn's stratified split raised a ValueError (a traceback under `data.limit: 99`).
    for n in (99, 98, 2):
        idx = stratified_subset(labels, n, seed=0)
        assert len(idx) == len(set(idx.tolist())) == n and np.array_equal(idx, stratified_subset(labels, n, seed=0))


def test_stratified_subset_keeps_every_class_that_fits():
    """scikit-learn's draw gave a rare class none of a small subset (a data.limit run had no image of it to learn
    or score); each missing class now takes the place of an item of the subset's largest class."""
    from edgekd.data.splits import _stratified_draw, stratified_subset

    labels = np.array([0] * 90 + [1] * 5 + [2] * 3 + [3] * 2)
    assert np.bincount(labels[_stratified_draw(labels, 10, 0)[1]], minlength=4).tolist() == [9, 1, 0, 0]
    idx = stratified_subset(labels, 10, seed=0)
    assert len(set(idx.tolist())) == 10 and np.all(np.diff(idx) > 0)
    assert np.bincount(labels[idx], minlength=4).tolist() == [7, 1, 1, 1]
    assert np.array_equal(idx, stratified_subset(labels, 10, seed=0))
    assert np.bincount(labels[stratified_subset(labels, 3, seed=0)], minlength=4).min() == 0  # fewer than classes
    for n in (4, 20, 97):
        assert np.bincount(labels[stratified_subset(labels, n, seed=1)], minlength=4).min() >= 1


def test_stratified_subset_returns_exactly_n_where_the_float_fraction_rounds_up():
    from edgekd.data.splits import stratified_split, stratified_subset

    # 400 / 624 * 624 is 400.00000000000006 as a float: drawn as a fraction, the subset held 401 images
    # (`bench --eval-limit 400` on PneumoniaMNIST's test split scored 401).
    labels = np.array([0] * 234 + [1] * 390)
    assert int(np.ceil(len(labels) * (400 / len(labels)))) == 401
    for n in (100, 200, 400):
        idx = stratified_subset(labels, n, seed=0)
        assert len(idx) == len(set(idx.tolist())) == n
        assert abs(np.bincount(labels[idx])[0] - n * 234 / 624) <= 1
    # Where the fraction is exact, the draw is the one a fraction gives (recorded data.limit runs keep their images).
    assert np.array_equal(stratified_subset(labels, 312, seed=3), stratified_split(labels, 0.5, seed=3)[1])


def test_a_class_missing_from_val_or_test_is_a_warning():
    """A small data.limit can leave a rare class out of a split (scikit-learn's stratified draw does): its AUC there
    is undefined, which the run said nowhere."""
    from types import SimpleNamespace

    from edgekd.train.run import warn_about_data

    said: list[str] = []
    data = SimpleNamespace(bad_files=[], class_names=["normal", "rare", "other"],
                           counts=lambda: {"train": [50, 3, 20], "val": [10, 0, 4], "test": [10, 1, 4]})
    warn_about_data(data, said.append)
    assert said == ["warning: the val split has no image of class rare (a small data.limit or a rare class?): its "
                    "AUC and per-class figures there are undefined"]
    data.counts = lambda: {"train": [50, 3, 0], "val": [10, 1, 0], "test": [10, 1, 0]}  # a limit left it out of all
    said.clear()
    warn_about_data(data, said.append)
    assert [w.split(" (")[0] for w in said] == [f"warning: the {s} split has no image of class other"
                                                for s in ("train", "val", "test")]
    data.counts = lambda: {"train": [50, 3, 1], "val": [10, 1, 1], "test": [10, 1, 1]}
    said.clear()
    warn_about_data(data, said.append)
    assert said == []


def test_an_image_in_two_splits_is_a_data_warning(tmp_path):
    """A file copied into two split folders (or a data set's own duplicates) had gone unmentioned: the test
    figures then include an image the model trained on."""
    import shutil

    from conftest import write_image_folder
    from edgekd.recipe import recipe_from_dict

    for split in ("train", "val", "test"):
        write_image_folder(tmp_path / "d" / split, n_per_class=4, size=16)
        for i, p in enumerate(sorted((tmp_path / "d" / split).rglob("*.png"))):  # distinct pixels per split
            Image.fromarray(np.full((16, 16, 3), 40 * ("train", "val", "test").index(split) + i, np.uint8)).save(p)
    raw = {"name": "dup", "data": {"source": "imagefolder", "path": str(tmp_path / "d"), "image_size": 16,
                                   "channels": 3}, "model": {"name": "edgekd_cnn_tiny"}}
    from edgekd.data import duplicate_notes

    assert duplicate_notes(build_data(recipe_from_dict(raw)).tables) == []
    copied = tmp_path / "d" / "test" / "a" / "copy_of_train.png"
    shutil.copy(sorted((tmp_path / "d" / "train" / "a").glob("*.png"))[0], copied)
    (note,) = duplicate_notes(build_data(recipe_from_dict(raw)).tables)
    assert note == (f"1 test image(s) are also train images (the same content under two names, e.g. {copied}): the "
                    "test figures include images the model trained on")
    # the same content under two classes, in one split: one label is wrong (it had not been said)
    copied.unlink()
    relabelled = tmp_path / "d" / "train" / "b" / "copy_of_a.png"
    shutil.copy(sorted((tmp_path / "d" / "train" / "a").glob("*.png"))[1], relabelled)
    (note,) = duplicate_notes(build_data(recipe_from_dict(raw)).tables)
    assert note.startswith(f"1 image(s) have the content of an image under another class (e.g. {relabelled} and "
                           f"{sorted((tmp_path / 'd' / 'train' / 'a').glob('*.png'))[1]}): one of each pair's labels")


def test_split_folders_are_known_by_the_names_a_split_column_may_use(tmp_path):
    """`Training/` and `Testing/` (a common download's layout) had become two classes, each holding every real
    class's images, without a word; `valid/` had been ignored (val carved from train)."""
    root = tmp_path / "bt"
    write_image_folder(root / "Training", n_per_class=6, classes=("glioma", "notumor"))
    write_image_folder(root / "Testing", n_per_class=2, classes=("glioma", "notumor"))
    source = load_source("imagefolder", root)
    assert source.class_names == ["glioma", "notumor"] and list(source.tables) == ["train", "test"]
    assert [len(source.tables[s].paths) for s in ("train", "test")] == [12, 4]
    write_image_folder(root / "valid", n_per_class=3, classes=("glioma", "notumor"))
    assert list(load_source("imagefolder", root).tables) == ["train", "val", "test"]
    write_image_folder(root / "val", n_per_class=1, classes=("glioma", "notumor"))
    with pytest.raises(EdgeKDError, match=r"bt: val and valid both name the val split; keep one$"):
        load_source("imagefolder", root)
    (root / "val").rename(tmp_path / "val-kept")
    write_image_folder(root / "masks", n_per_class=1, classes=("glioma",))  # its images had been left out unsaid
    assert load_source("imagefolder", root).info["ignored_folders"] == ["masks"]
    dm = build_data(recipe(source="imagefolder", path=str(root)))
    assert "1 folder(s) or image(s) beside the split folders are not read: masks" in dm.notes
    # An image beside the split folders is not read, and said so; one beside a split's class folders (hidden ones
    # aside) is refused: it had made test/ "a class folder", so a new test split was cut from train without a word.
    shutil.copy(next((root / "Training" / "glioma").iterdir()), root / "preview.png")
    assert load_source("imagefolder", root).info["ignored_folders"] == ["masks", "preview.png"]
    shutil.copy(root / "preview.png", root / "Testing" / ".preview.png")
    shutil.copy(root / "preview.png", root / "Testing" / "._scan.png")
    assert list(load_source("imagefolder", root).tables) == ["train", "val", "test"]
    for split in ("Testing", "Training"):  # in train/ it had said "split folders (...) but none for training"
        shutil.copy(root / "preview.png", root / split / "stray.png")
        with pytest.raises(EdgeKDError, match=rf"{split}/stray.png: an image beside the class folders of the split "
                                              rf"folder {split}/ \(a split folder holds class folders only\)"):
            load_source("imagefolder", root)
        (root / split / "stray.png").unlink()
    # a class named like a split holds images, not class folders: a flat set of classes valid/ and invalid/
    flat = write_image_folder(tmp_path / "quality", n_per_class=2, classes=("invalid", "valid"))
    assert load_source("imagefolder", flat).class_names == ["invalid", "valid"]
    one = tmp_path / "one"  # the train split of one class (its one-folder check had looked in the wrong place)
    for split in ("train", "test"):
        write_image_folder(one / split, n_per_class=2, classes=("a",))
    assert load_source("imagefolder", one).class_names == ["a"]
    nested = tmp_path / "nest"  # one folder too high: it had been "one class (chest_xray)"
    write_image_folder(nested / "chest_xray" / "train", n_per_class=2)
    with pytest.raises(EdgeKDError, match=r"nest: its one folder chest_xray/ holds the split folders: give "
                                          r"data.path=\S+nest/chest_xray$"):
        load_source("imagefolder", nested)
    only_test = tmp_path / "only"
    write_image_folder(only_test / "test", n_per_class=2)
    with pytest.raises(EdgeKDError, match=r"only: split folders \(test\) but none for training: name it train/"):
        load_source("imagefolder", only_test)


def test_a_folder_copied_from_a_mac_or_a_share_reads_its_images_only(tmp_path):
    """AppleDouble `._x.png` files had been read as images (and failed), `.Trashes/` or `__MACOSX/` had become a
    class, a symlinked sub-folder's images had been left out without a word, `.jfif`/`.jpe` JPEGs were not read."""
    from edgekd.data.sources import list_images
    from edgekd.runtime.inputs import collect_inputs, collect_labelled

    root = tmp_path / "scans"
    for name in ("normal", "pneumonia"):
        (root / name).mkdir(parents=True)
        Image.fromarray(np.full((8, 8), 60, np.uint8)).save(root / name / f"{name}.png")
        (root / name / f"._{name}.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
        (root / name / "Thumbs.db").write_bytes(b"x")
    Image.fromarray(np.full((8, 8), 90, np.uint8)).save(root / "normal" / "more.jfif", format="JPEG")
    Image.fromarray(np.full((8, 8), 95, np.uint8)).save(root / "normal" / "more2.jpe", format="JPEG")
    elsewhere = tmp_path / "batch2"
    elsewhere.mkdir()
    Image.fromarray(np.full((8, 8), 120, np.uint8)).save(elsewhere / "linked.png")
    (root / "pneumonia" / "batch2").symlink_to(elsewhere)
    (root / "pneumonia" / "loop").symlink_to(root / "pneumonia")  # a link loop ends
    (root / "normal" / "up").symlink_to(root)  # a link up the tree is not followed (pneumonia would be normal)
    for junk in (".Trashes", "__MACOSX", ".ipynb_checkpoints", "@eaDir", "normal/@eaDir"):  # @eaDir: a Synology's
        (root / junk).mkdir()                                                              # thumbnails
        (root / junk / "x.png").write_bytes(b"junk")

    source = load_source("imagefolder", root)
    assert source.class_names == ["normal", "pneumonia"]
    names = sorted(Path(p).name for p in source.tables["all"].paths)
    assert names == ["linked.png", "more.jfif", "more2.jpe", "normal.png", "pneumonia.png"]
    skipped: list = []
    assert [p.name for p in list_images(root / "normal", skipped)] == ["more.jfif", "more2.jpe", "normal.png"]
    assert skipped == []  # hidden and system files are not "files that are not images"
    found, problems = collect_inputs([root])
    assert sorted(p.name for p in found) == names and problems == []
    paths, labels = collect_labelled(root, ["normal", "pneumonia"])
    assert sorted(zip((p.name for p in paths), labels)) == [("linked.png", 1), ("more.jfif", 0), ("more2.jpe", 0),
                                                            ("normal.png", 0), ("pneumonia.png", 1)]


def test_a_broken_link_to_an_image_is_an_unreadable_image_not_left_out(tmp_path):
    """A symlink whose target had moved was left out without a word (neither read nor counted)."""
    from edgekd.data.sources import list_images
    from edgekd.imageio import read_image
    from edgekd.runtime.inputs import collect_inputs

    write_image_folder(tmp_path / "f", n_per_class=6, size=16)
    moved = tmp_path / "f" / "b" / "moved.png"
    moved.symlink_to(tmp_path / "gone" / "scan.png")
    (tmp_path / "f" / "b" / "notes").symlink_to(tmp_path / "gone" / "notes")  # no image suffix: not an image
    skipped: list = []
    assert moved in list_images(tmp_path / "f" / "b", skipped) and skipped == [tmp_path / "f" / "b" / "notes"]
    with pytest.raises(EdgeKDError, match=r"moved.png: a broken symbolic link \(its target \S+scan.png is missing\)$"):
        read_image(moved)
    raw = {"name": "links", "data": {"source": "imagefolder", "path": str(tmp_path / "f"), "image_size": 16,
                                     "channels": 3}, "model": {"name": "edgekd_cnn_tiny"}}
    with pytest.raises(EdgeKDError, match=r"moved.png: a broken symbolic link .*data.on_bad_image=skip"):
        build_data(recipe_from_dict(raw))
    raw["data"]["on_bad_image"] = "skip"
    dm = build_data(recipe_from_dict(raw))
    assert len(dm.bad_files) == 1 and "moved.png: a broken symbolic link" in dm.bad_files[0]
    assert moved in collect_inputs([tmp_path / "f"])[0]  # predict names it among its unreadable images
    # a glob reaches what the folder does: data/* matched the class folders, which were dropped without a word,
    # and the broken link; a file of two folders given (one inside the other) counts once among those not read
    shutil.copy(sorted((tmp_path / "f" / "a").iterdir())[0], tmp_path / "f" / "top.png")
    plain, _ = collect_inputs([tmp_path / "f"])
    globbed, problems = collect_inputs([str(tmp_path / "f" / "*")])
    assert sorted(globbed) == sorted(plain) and moved in globbed and problems == []
    assert sorted(collect_inputs([str(tmp_path / "f" / "**")])[0]) == sorted(plain)
    # one spec given bare, as a str or a Path, is that spec (a str had been read letter by letter)
    assert collect_inputs(str(tmp_path / "f"))[0] == collect_inputs(tmp_path / "f")[0] == plain
    skipped.clear()
    collect_inputs([tmp_path / "f", tmp_path / "f" / "b"], None, skipped)
    assert skipped == [tmp_path / "f" / "b" / "notes"]
    # a subfolder that cannot be listed (no permission) is named, for predict and for training (os.walk had
    # skipped it without a word); the test runs as root, so the refusal is os.scandir's, made to fail
    import os as os_

    listing = os_.scandir

    def no_permission(path=".", *args):
        if str(path).endswith(os_.sep + "b"):
            raise PermissionError(13, "Permission denied", str(path))
        return listing(path, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os_, "scandir", no_permission)
        found, problems = collect_inputs([tmp_path / "f"])
        assert problems == [(str(tmp_path / "f" / "b"), f"{tmp_path / 'f' / 'b'}: folder cannot be read "
                                                          "(Permission denied)")]
        assert found and all(Path(p).parent.name != "b" for p in found)
        with pytest.raises(EdgeKDError, match=r"f/b: folder cannot be read \(Permission denied\)$"):
            build_data(recipe_from_dict(raw))


def test_a_labelled_folder_of_split_folders_points_at_the_split_to_give(tmp_path):
    """`eval --data ROOT` on a dataset root of Training/ and Testing/ named only 'Training' as not a class."""
    from edgekd.runtime.inputs import collect_labelled

    for split in ("Training", "Testing"):
        for name in ("normal", "pneumonia"):
            (tmp_path / split / name).mkdir(parents=True)
            Image.fromarray(np.full((8, 8), 60, np.uint8)).save(tmp_path / split / name / "a.png")
    with pytest.raises(EdgeKDError) as err:
        collect_labelled(tmp_path, ["normal", "pneumonia"])
    assert str(err.value) == (f"--data {tmp_path}: sub-folder 'Testing' is not a class of the model (normal, "
                              f"pneumonia); Testing/ holds class folders, as a split folder does: give it, --data "
                              f"{tmp_path / 'Testing'}")
    (tmp_path / "Testing" / "masks" / "scan1").mkdir(parents=True)  # no class folders inside: no hint
    with pytest.raises(EdgeKDError, match=r"'masks' is not a class of the model \(normal, pneumonia\)$"):
        collect_labelled(tmp_path / "Testing", ["normal", "pneumonia"])


def test_a_labelled_folder_names_a_one_head_continual_models_classes_without_their_task(tmp_path):
    """A one-head model over two tasks names its classes TASK:CLASS; folders normal/ and pneumonia/ were refused
    ('not a class of the model'), and a ':' cannot be in a Windows folder name."""
    from edgekd.runtime.inputs import collect_labelled

    names = ["retina:0", "retina:1", "pneumonia:normal", "pneumonia:pneumonia"]
    for name in ("normal", "pneumonia", "retina:1"):
        (tmp_path / "d" / name).mkdir(parents=True)
        Image.fromarray(np.full((8, 8), 60, np.uint8)).save(tmp_path / "d" / name / "a.png")
    paths, labels = collect_labelled(tmp_path / "d", names)
    assert sorted(zip((p.parent.name for p in paths), labels)) == [("normal", 2), ("pneumonia", 3), ("retina:1", 1)]
    with pytest.raises(EdgeKDError, match=r"sub-folder 'normal' is not a class of the model \(.*\); name the folder "
                                          r"after one of pneumonia:normal, other:normal$"):
        collect_labelled(tmp_path / "d", names + ["other:normal"])  # two tasks have a class 'normal'


def test_an_npz_whose_pixels_changed_under_the_same_name_is_refused_as_other_data(tmp_path):
    """A resumed run, eval or export of an .npz trained on: its splits were recorded by their labels only, so the
    same file name and labels with other images passed as the data the model trained on."""
    from edgekd.data import check_trained_splits

    path = write_npz(tmp_path / "set.npz")
    rec = recipe(source="medmnist", path=str(path), channels=3)
    trained = build_data(rec).split_fingerprint()
    ckpt = {"recipe": rec.to_dict(), "data_splits": trained}
    check_trained_splits(ckpt, build_data(rec), rec, "best.pt")  # the same file: passes
    with np.load(path) as z:
        arrays = dict(z)
    arrays["val_images"] = 255 - arrays["val_images"]  # other pixels, the same names, counts and labels
    np.savez(path, **arrays)
    with pytest.raises(EdgeKDError, match=r"^best.pt: its data's splits are not the ones it was trained with "
                                          r"\(val: the pixels of its 16 images changed \(labels as at training\)\): "
                                          r".*changed since, so every figure on them would be on other images"):
        check_trained_splits(ckpt, build_data(rec), rec, "best.pt")
    check_trained_splits(ckpt, build_data(rec), rec, "best.pt", ("test",))  # scoring test alone: its images hold
    # a record from before pixels were recorded (labels only) is compared by what it holds
    labels_only = {s: {k: v for k, v in d.items() if k != "pixels"} for s, d in trained.items()}
    check_trained_splits({**ckpt, "data_splits": labels_only}, build_data(rec), rec, "best.pt")


def test_eval_checks_the_splits_it_scores(tmp_path, tiny_recipe_dict):
    """eval checked val and test whatever --split asked: a changed test split refused `--split val`, and train
    images changed under the same name were scored as the ones the model trained on."""
    from edgekd.recipe import recipe_from_dict
    from edgekd.train.run import evaluate_checkpoint, train_recipe

    raw = {**tiny_recipe_dict, "train": {**tiny_recipe_dict["train"], "epochs": 1}}
    run = train_recipe(recipe_from_dict(raw), tmp_path / "run", log=lambda s: None)
    npz = Path(raw["data"]["path"])
    with np.load(npz) as z:
        arrays = dict(z)
    arrays["train_images"] = 255 - arrays["train_images"]
    np.savez(npz, **arrays)
    evaluate_checkpoint(run.best_path, tmp_path / "e1", splits=("val", "test"), log=lambda s: None)
    with pytest.raises(EdgeKDError, match=r"train: the pixels of its 48 images changed"):
        evaluate_checkpoint(run.best_path, tmp_path / "e2", splits=("train",), log=lambda s: None)


def test_numbered_class_folders_are_said_to_sort_as_text_and_class_names_takes_numbers(tmp_path):
    """Folders 1, 2, 10 became class ids 0, 1, 2 of folders 1, 10, 2 without a word; data.class_names, the way to
    order them, refused the YAML list [1, 2, 10] (numbers, not strings)."""
    write_image_folder(tmp_path / "f", n_per_class=5, classes=("1", "2", "10"))
    raw = {"name": "num", "data": {"source": "imagefolder", "path": str(tmp_path / "f"), "image_size": 16,
                                   "channels": 3}, "model": {"name": "edgekd_cnn_tiny"}}
    dm = build_data(recipe_from_dict(raw))
    assert dm.class_names == ["1", "10", "2"]
    assert dm.notes == ["the class folders are numbers, ordered as text (1, 10, 2), so class id k is not folder k: "
                        "data.class_names [1, 2, 10] orders them by number"]
    raw["data"]["class_names"] = [1, 2, 10]
    dm = build_data(recipe_from_dict(raw))
    assert dm.class_names == ["1", "2", "10"] and dm.notes == []
    assert all(Path(p).parent.name == dm.class_names[y] for p, y in zip(dm.tables["train"].paths, dm.tables["train"].labels))
    picked = {**raw["data"], "class_names": None, "classes": [0, 2]}  # data.classes already orders them: quiet
    assert build_data(recipe_from_dict({**raw, "data": picked})).notes == []
    write_image_folder(tmp_path / "g", n_per_class=5, classes=("0", "1", "2"))  # text order is number order: quiet
    assert build_data(recipe_from_dict({**raw, "data": {**raw["data"], "path": str(tmp_path / "g"),
                                                        "class_names": None}})).notes == []


def test_a_training_epoch_never_ends_in_a_batch_of_one_image(tmp_path):
    """65 train images in batches of 64 ended each epoch with one image, which BatchNorm's train mode refuses (a
    ResNet-18's 1x1 map at 28 px): the run failed after a whole epoch. That image sits the epoch out; any other short
    batch trains, and evaluation sees every image."""
    npz = write_npz(tmp_path / "d.npz", n=(9, 5, 5), size=8)
    raw = {"name": "b", "data": {"source": "medmnist", "path": str(npz), "image_size": 8, "batch_size": 4},
           "model": {"name": "edgekd_cnn_tiny"}}
    dm = build_data(recipe_from_dict(raw))
    assert [len(y) for _, y in dm.loader("train")] == [4, 4]
    assert [len(y) for _, y in dm.loader("train", train=False)] == [4, 4, 1]
    ten = build_data(recipe_from_dict({**raw, "data": {**raw["data"], "path": str(write_npz(tmp_path / "e.npz",
                                                                                             n=(10, 5, 5), size=8))}}))
    assert [len(y) for _, y in ten.loader("train")] == [4, 4, 2]


def test_a_class_of_one_image_does_not_turn_stratification_off_and_tiny_splits_are_one_line_errors():
    """One class of a single image made every draw unstratified (a class of 4 was left out of test in 23 of 50
    seeds); that image now stays in train. Too few images to carve a split was scikit-learn's ValueError. A
    patient-level share of 0.4 held out 50% (round(2.5) == 2 folds), then a third (the nearest 1/k, kept); 0.7 held
    out 50% (1/k is at most a half): a share far from every 1/k is m of k folds, k no more than the patients."""
    labels = np.array([0] * 900 + [1] * 95 + [2] * 4 + [3] * 1)
    for seed in range(20):
        keep, held = stratified_split(labels, 0.15, seed)
        assert 2 in labels[held] and 3 in labels[keep] and len(held) == 150
        assert len(np.intersect1d(keep, held)) == 0 and len(keep) + len(held) == len(labels)
    with pytest.raises(EdgeKDError, match=r"^1 image\(s\) are too few to hold out a share of 0.15 \(1\) and keep any"):
        stratified_split(np.array([0]), 0.15, 0)
    groups = np.repeat(np.arange(30), 2)
    for fraction, patients in ((0.4, 10), (0.7, 20), (0.6, 18), (0.15, 5), (0.3, 10)):  # 1/3 (0.3, 0.4), 1/7 as before
        keep, held = group_split(np.tile([0, 1], 30), groups, fraction, 0)
        assert len(np.unique(groups[held])) == patients, fraction
        assert not set(groups[keep]) & set(groups[held]) and len(keep) + len(held) == 60
    # 8 patients at 0.7: 2 of 3 folds (7 of 10 had needed 10 patients)
    keep, held = group_split(np.tile([0, 1], 12), np.repeat(np.arange(8), 3), 0.7, 0)
    assert len(np.unique(np.repeat(np.arange(8), 3)[held])) in (5, 6)
    with pytest.raises(EdgeKDError, match=r"class id 1 has 1 patient\); a class needs a patient on each side: give "
                                          r"it more patients, or the splits yourself"):
        group_split(np.array([0, 0, 0, 1, 1, 0, 0, 0]), np.array([0, 0, 1, 2, 2, 3, 4, 5]), 0.3, 0)
    # 18 patients of one image, 9 per class, cut by 1/10: scikit-learn's ValueError had been the message
    with pytest.raises(EdgeKDError, match=r"^carving a split by patient as 1/10 needs a class with at least 10 "
                                          r"images, the largest has 9 \(give the splits yourself"):
        group_split(np.array([0] * 9 + [1] * 9), np.arange(18), 0.1, 0)


@pytest.mark.parametrize("op, words", [({"Pad": {"padding": 4}}, "the train pipeline gives 24x24 images, not "
                                                                  "data.image_size 16"),
                                       ({"RandomZoomOut": {}}, r"the train pipeline gives \d+x\d+, .* images, not "
                                                               "data.image_size 16"),
                                       ({"RandomApply": {"transforms": [{"RandomResizedCrop": {"size": 24}}]}},
                                        "RandomResizedCrop size 24 differs from data.image_size 16"),
                                       ({"RandomApply": {"transforms": [{"Resize": {"size": 24}}]}},
                                        "the train pipeline gives 24x24 images")])
def test_an_augment_op_that_changes_the_size_is_refused(op, words, tmp_path):
    """Pad and Resize trained at another size than eval and export use, without a word; RandomZoomOut failed to
    stack a batch; a crop inside RandomApply escaped the size check of the top-level crops."""
    npz = write_npz(tmp_path / "d.npz", n=(8, 4, 4), size=16)
    raw = {"name": "a", "data": {"source": "medmnist", "path": str(npz), "image_size": 16},
           "model": {"name": "edgekd_cnn_tiny"}, "augment": [op]}
    with pytest.raises(EdgeKDError, match=r"^augment: " + words):
        build_data(recipe_from_dict(raw)).dataset("train")
    if "differs from data.image_size" in words:  # an input-sized op naming another size: refused wherever it is
        return
    fixed = {**raw, "augment": [op, {"CenterCrop": {}}]}  # cropped back: trains
    assert tuple(build_data(recipe_from_dict(fixed)).dataset("train")[0][0].shape) == (3, 16, 16)


def test_augment_ops_nested_in_any_container_are_built_and_a_channel_change_is_refused(tmp_path):
    """RandomChoice/RandomOrder got their ops as strings (a TypeError named as the pipeline's failure); Grayscale
    among the ops of an RGB model passed the shape check, Normalize broadcasting its one channel back to three."""
    npz = write_npz(tmp_path / "d.npz", n=(8, 4, 4), size=16)
    raw = {"name": "a", "data": {"source": "medmnist", "path": str(npz), "image_size": 16, "channels": 3,
                                 "mean": [0.5] * 3, "std": [0.5] * 3}, "model": {"name": "edgekd_cnn_tiny"}}
    nested = [{"RandomChoice": {"transforms": ["RandomHorizontalFlip", {"RandomResizedCrop": {"scale": [0.5, 1]}}]}},
              {"RandomOrder": {"transforms": [{"RandomRotation": {"degrees": 10}}, "RandomVerticalFlip"]}}]
    data = build_data(recipe_from_dict({**raw, "augment": nested}))
    assert tuple(data.dataset("train")[0][0].shape) == (3, 16, 16)  # the nested crop took data.image_size
    with pytest.raises(EdgeKDError, match=r"^augment: the train pipeline gives 1-channel images, not data.channels 3 "
                                          r".*\(Grayscale: give num_output_channels: 3\)"):
        build_data(recipe_from_dict({**raw, "augment": [{"Grayscale": {}}]})).dataset("train")
    # Grayscale with its 3 output channels keeps the model's input: accepted
    gray3 = build_data(recipe_from_dict({**raw, "augment": [{"Grayscale": {"num_output_channels": 3}}]}))
    assert tuple(gray3.dataset("train")[0][0].shape) == (3, 16, 16)


def test_the_augment_check_seeds_the_cpu_generator_only(monkeypatch):
    """torch.manual_seed(0) in the check also reset every GPU's stream (dropout masks) to seed 0 at each epoch."""
    import torch

    from edgekd.data import build_transforms
    from edgekd.recipe import DataConfig

    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: seeded.append(seed))
    torch.manual_seed(1234005)
    before = torch.random.get_rng_state()
    build_transforms(DataConfig(image_size=8, channels=3, mean=[0.5] * 3, std=[0.5] * 3),
                     ["RandomHorizontalFlip"], train=True)
    assert seeded == [1234005] and torch.equal(torch.random.get_rng_state(), before)


def test_a_teacher_drawn_from_an_npz_with_another_seed_is_checked_against_the_students_test_images(tmp_path):
    """The teacher check compared image files only: an .npz without val/test splits (cut by seed), or any .npz
    under data.split=stratified, let a teacher trained with another seed hold most of the student's test images,
    without a word. In-memory data is now compared by content; the dataset's own duplicates across its splits
    (MedMNIST has some) are not counted as the teacher's."""
    from edgekd.data.dataset import check_model_splits

    images = np.random.default_rng(0).integers(0, 256, (200, 8, 8), dtype=np.uint8)
    labels = (np.arange(200) % 2)[:, None].astype(np.uint8)
    np.savez(tmp_path / "own.npz", train_images=images, train_labels=labels)
    raw = {"name": "t", "data": {"source": "medmnist", "path": str(tmp_path / "own.npz"), "image_size": 8},
           "model": {"name": "edgekd_cnn_tiny"}}
    teacher = {"recipe": recipe_from_dict(raw).to_dict()}
    student = build_data(recipe_from_dict({**raw, "seed": 1}))
    with pytest.raises(EdgeKDError, match=r"^distill.teacher t.pt trained on \d+ of this run's 30 test images"):
        check_model_splits("distill.teacher t.pt", teacher, student, print)
    said: list[str] = []
    check_model_splits("distill.teacher t.pt", teacher, build_data(recipe_from_dict(raw)), said.append)
    assert said == []  # the same draw: nothing to say
    dup = write_npz(tmp_path / "dup.npz", n=(20, 6, 6), size=8)  # official splits sharing an image
    arrays = dict(np.load(dup))
    arrays["test_images"][0] = arrays["train_images"][0]
    np.savez(tmp_path / "dup.npz", **arrays)
    given = {**raw, "data": {**raw["data"], "path": str(tmp_path / "dup.npz")}}
    check_model_splits("distill.teacher t.pt", {"recipe": recipe_from_dict(given).to_dict()},
                       build_data(recipe_from_dict(given)), said.append)
    assert said == []


def test_a_teacher_trained_on_other_images_of_the_students_test_patients_is_warned_of(tmp_path):
    """Teacher and student read two CSVs of the same 24 patients (images 1-2 of each, image 3 of each): no file is
    shared, so the file check passed without a word while the teacher had trained on the student's test patients."""
    from edgekd.data.dataset import check_model_splits

    rng = np.random.default_rng(0)
    rows = {"a": ["path,label,patient_id"], "b": ["path,label,patient_id"]}
    for patient in range(24):
        for image in range(3):
            name = f"p{patient}-{image}.png"
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / name)
            rows["a" if image < 2 else "b"].append(f"{name},{'ab'[patient % 2]},P{patient:03d}")
    for part, lines in rows.items():
        (tmp_path / f"{part}.csv").write_text("\n".join(lines) + "\n")

    def recipe(part, seed=0):
        return recipe_from_dict({"name": part, "seed": seed, "model": {"name": "edgekd_cnn_tiny"}, "data": {
            "source": "csv", "path": str(tmp_path / f"{part}.csv"), "image_size": 8, "val_fraction": 0.25,
            "test_fraction": 0.25}})

    teacher = {"recipe": recipe("a", seed=7).to_dict()}  # its own patient draw
    said: list[str] = []
    check_model_splits("distill.teacher t.pt", teacher, build_data(recipe("b")), said.append)
    test = [line for line in said if " test patients" in line]
    assert len(test) == 1 and test[0].startswith("warning: distill.teacher t.pt trained on images of ")
    assert "of this run's 6 test patients (the same patient ids, e.g. P0" in test[0]
    said.clear()
    check_model_splits("distill.teacher t.pt", teacher, build_data(recipe("a", seed=7)), said.append)
    assert said == []  # the same data and split: its patients are apart


def test_csv_rows_through_links_keep_the_links_names(tmp_path):
    """DVC and git-annex keep images as links to suffix-less or hashed cache files: the CSV loader had resolved
    them, so every image was refused as 'not a supported image type' (named by its cache object) and a patient
    pattern was matched against the cache key."""
    store = tmp_path / "store"
    store.mkdir()
    (tmp_path / "imgs").mkdir()
    rows = ["path,label"]
    for i in range(6):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(store / f"md5_{i}", format="PNG")
        (tmp_path / "imgs" / f"P{i}_x.png").symlink_to(store / f"md5_{i}")
        rows.append(f"imgs/P{i}_x.png,{'ab'[i % 2]}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    source = load_source("csv", str(tmp_path / "m.csv"))
    paths = [p for t in source.tables.values() for p in t.paths]
    assert sorted(Path(p).name for p in paths) == [f"P{i}_x.png" for i in range(6)]


def test_integer_labels_far_above_their_count_are_refused_before_a_name_per_id(tmp_path):
    """Codes in the label column (3000000, SNOMED 426783006): a class name was made for every id up to the largest
    (1.3 GB for 3e6, a kill for a SNOMED code) before the 'ids without an image' error."""
    write_image_folder(tmp_path / "imgs", n_per_class=2, size=8)
    files = sorted((tmp_path / "imgs").rglob("*.png"))
    (tmp_path / "m.csv").write_text("path,label\n" + "".join(f"{f},{426783006 + i % 2}\n" for i, f in
                                                               enumerate(files)))
    with pytest.raises(EdgeKDError, match=r"integer labels go up to 426783007 for 2 distinct ones"):
        load_source("csv", str(tmp_path / "m.csv"))
    arrays = {f"{s}_images": np.zeros((4, 8, 8), np.uint8) for s in ("train", "val", "test")}
    arrays.update({f"{s}_labels": np.array([[0], [1], [0], [3_000_000]]) for s in ("train", "val", "test")})
    np.savez(tmp_path / "codes.npz", **arrays)
    with pytest.raises(EdgeKDError, match=r"integer labels go up to 3000000 for 3 distinct ones"):
        load_source("medmnist", str(tmp_path / "codes.npz"))


def test_bad_idx_files_are_one_line_errors_naming_the_file(tmp_path):
    """A cut-short .gz had ended as a blank line (EOFError read as Abort); a count mismatch as an IndexError or a
    silently dropped image; a label of 10 had made an 11th class."""
    import gzip

    def idx(dims, values) -> bytes:
        head = bytes([0, 0, 8, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
        return head + bytes(values)

    def write(root, n_images, labels):
        root.mkdir(exist_ok=True)
        for prefix in ("train", "t10k"):
            (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx([n_images, 2, 2],
                                                                                     [7] * (4 * n_images))))
            (root / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx([len(labels)], labels)))

    write(tmp_path / "ok", 3, [0, 1, 2])
    assert len(load_source("fashion_mnist", str(tmp_path / "ok")).tables["train"]) == 3
    write(tmp_path / "count", 3, [0, 1])
    with pytest.raises(EdgeKDError, match=r"train-images-idx3-ubyte.gz holds 3 images, train-labels-idx1-ubyte.gz 2"):
        load_source("fashion_mnist", str(tmp_path / "count"))
    write(tmp_path / "label", 2, [0, 10])
    with pytest.raises(EdgeKDError, match=r"holds label 10; Fashion-MNIST has 10 classes"):
        load_source("fashion_mnist", str(tmp_path / "label"))
    cut = tmp_path / "ok" / "train-images-idx3-ubyte.gz"
    cut.write_bytes(cut.read_bytes()[:-6])
    with pytest.raises(EdgeKDError, match=r"train-images-idx3-ubyte.gz: cannot read it, truncated or corrupt"):
        load_source("fashion_mnist", str(tmp_path / "ok"))


@pytest.mark.parametrize("compression", [None, "tiff_lzw"])
def test_a_tiff_tagged_with_a_turning_orientation_is_read_upright(tmp_path, compression):
    """Pillow 13 scrambles an uncompressed TIFF tagged orientation 6 or 8 opened from a path (neither upright nor
    as stored; LZW and in-memory bytes decode right): edgekd reads such a file from memory."""
    from edgekd.imageio import read_image

    a = np.arange(8 * 16, dtype=np.uint8).reshape(8, 16)
    for orientation, upright in ((3, np.rot90(a, 2)), (6, np.rot90(a, -1)), (8, np.rot90(a, 1))):
        path = tmp_path / f"o{orientation}.tif"
        Image.fromarray(a).save(path, tiffinfo={274: orientation},
                                **({"compression": compression} if compression else {}))
        assert np.array_equal(read_image(path)[..., 0], upright), orientation
