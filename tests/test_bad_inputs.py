"""Bad-input corpus: broken images, data, recipes, checkpoints and bundles through the real CLI commands.

Every case must end in one `error: ...` line naming the problem and a non-zero exit (exit 2 for a refused command;
`edgekd predict` reports each bad file and goes on, exit 1), never a traceback, never a half-written output.
Commands run in-process through `edgekd.cli.run` (the console entry point) so the corpus stays fast; a few cases
run the real `python -m edgekd` process.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import export_plain_onnx, make_images, random_pixels, run_edgekd, write_image_folder, write_npz
from edgekd.errors import EdgeKDError

SIZE = 16


# ------------------------------------------------------------------------------------------------ helpers
def invoke(capsys, *args) -> tuple[int, str, str]:
    """Run the console entry point in-process with argv; returns (exit code, stdout, stderr)."""
    from edgekd.cli import run

    capsys.readouterr()
    with mock.patch.object(sys, "argv", ["edgekd", *map(str, args)]):
        try:
            run()
            code = 0
        except SystemExit as ex:
            code = ex.code if isinstance(ex.code, int) else 1
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


def assert_refused(result, *fragments: str, after: tuple[str, ...] = ()) -> str:
    """Exit 2, exactly one line on stderr, 'error: ...' naming every fragment, no traceback. `after`: the starts
    of a run's own lines printed before an error that comes once training has begun (its `data:` line)."""
    code, out, err = result
    assert "Traceback" not in out + err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(after)] if after else lines
    assert code == 2, f"exit {code}: {err}"
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for f in fragments:
        assert str(f) in lines[0], f"{f!r} not in {lines[0]!r}"
    return lines[0]


def new_files(folder: Path, before: set[str]) -> set[str]:
    return {p.name for p in folder.iterdir()} - before if folder.exists() else set()


def png_with_header_size(path: Path, width: int, height: int) -> Path:
    """A valid 1x1 PNG whose IHDR claims width x height: decoding it would need width*height pixels."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = 8 + 4  # after the signature and the chunk length
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr:ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))
    return path


def _good_array(seed=0) -> np.ndarray:
    return make_images(1, SIZE, 3, seed=seed)[0][0]


def _truncated(path: Path, fmt: str) -> None:
    Image.fromarray(random_pixels((64, 64, 3))).save(path, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# Files that must be refused: name -> (writer, words the error must contain).
BAD_IMAGES = {
    "truncated_jpeg": (lambda p: _truncated(p, "JPEG"), ".jpg", "truncated"),
    "truncated_png": (lambda p: _truncated(p, "PNG"), ".png", "truncated"),
    "zero_byte": (lambda p: p.write_bytes(b""), ".png", "empty file"),
    "text_as_png": (lambda p: p.write_text("patient,label\n1,0\n"), ".png", "not an image"),
    "random_bytes_jpg": (lambda p: p.write_bytes(np.random.default_rng(1).bytes(4096)), ".jpg", "not an image"),
    "png_header_only": (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n"), ".png", "image"),
    "decompression_bomb": (lambda p: png_with_header_size(p, 20000, 20000), ".png", "pixel limit"),
    "multi_page_tiff": (lambda p: _frames(p), ".tif", "a TIFF of 3 pages"),
    "animated_gif": (lambda p: _frames(p), ".gif", "a GIF of 3 frames"),
    "dicom_report": (lambda p: _dicom_report(p), ".dcm",
                     "a DICOM without pixel data (Secondary Capture Image Storage, Modality SR)"),
    "dicom_file_set_index": (lambda p: _dicomdir(p), "", "a DICOMDIR (the index of a DICOM file set), not an image"),
    "dicom_truncated_header": (lambda p: _dicom_truncated_header(p), ".dcm", "a DICOM header without pixel data or SOP "
                               "class: a truncated file"),
}


def _dicom_report(path: Path) -> None:
    """A DICOM export's structured report: a DICOM file, no image in it."""
    from test_runtime import write_dicom  # imported here: at module level pytest would collect its tests twice

    write_dicom(path, np.zeros((8, 8), np.uint16), pixel_data=False, Modality="SR")


def _dicomdir(path: Path) -> None:
    """The index file of a DICOM file set, given by hand (a folder leaves it out)."""
    from test_runtime import write_dicom

    write_dicom(path, np.zeros((8, 8), np.uint16), pixel_data=False)
    import pydicom
    ds = pydicom.dcmread(path)
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    ds.save_as(path)


def _dicom_truncated_header(path: Path) -> None:
    """A DICOM file cut inside its meta header: it had read as "a DICOM without pixel data (no Modality)"."""
    from test_runtime import write_dicom

    write_dicom(path, np.zeros((8, 8), np.uint16))
    path.write_bytes(path.read_bytes()[:200])


def _frames(path: Path) -> None:
    """A file of 3 different images (pages of a TIFF, frames of a GIF): which one is meant cannot be guessed."""
    first, *rest = (Image.fromarray(random_pixels((20, 20), seed=30 + i)) for i in range(3))
    first.save(path, save_all=True, append_images=rest)


def _rescaled(a: np.ndarray) -> np.ndarray:
    """What a 16-bit or float image decodes to: its own min..max stretched to 0..255, rounded, one channel."""
    a = a.astype(np.float64)
    span = a.max() - a.min()
    out = np.zeros(a.shape) if span == 0 else np.round((a - a.min()) * 255.0 / span)
    return out.astype(np.uint8)[..., None]


def _write(arr: np.ndarray, mode: str | None = None, convert: str | None = None):
    """A writer saving `arr` (as `mode`, then converted to `convert`) to a path."""
    def write(p):
        img = Image.fromarray(arr, mode) if mode else Image.fromarray(arr)
        (img.convert(convert) if convert else img).save(p)
    return write


def _odd(write, expected: np.ndarray, atol: int = 0):
    """Write the file, return (the pixels the decoder must give, the tolerance: 0 unless the format is lossy)."""
    def make(p):
        write(p)
        return expected, atol
    return make


# Each source array from its own seeded generator: a file's content does not depend on which tests ran first.
_U16 = random_pixels((20, 20), seed=20, high=65535, dtype=np.uint16)
_RGBA, _GRAY = random_pixels((20, 20, 4), seed=21), random_pixels((20, 20), seed=22)
_RGB = random_pixels((20, 20, 3), seed=23)
_FLOAT = np.random.default_rng(24).normal(size=(20, 20)).astype(np.float32)
_CMYK = (10, 200, 30, 5)
# Unusual but valid files: decoded (16-bit rescaled, alpha dropped, CMYK/palette to RGB), predicted, trained on.
# kind -> (writer(path) returning (expected decoded uint8 (H, W, C) array, tolerance), suffix).
ODD_IMAGES = {
    "png_16bit": (_odd(_write(_U16), _rescaled(_U16)), ".png"),
    "png_16bit_constant": (_odd(_write(np.full((20, 20), 4000, np.uint16)), np.zeros((20, 20, 1), np.uint8)), ".png"),
    "rgba": (_odd(_write(_RGBA, "RGBA"), _RGBA[..., :3]), ".png"),
    "la": (_odd(_write(_GRAY, convert="LA"), _GRAY[..., None]), ".png"),
    # CMYK -> RGB: each channel (255 - ink) * (255 - black) / 255; JPEG may move a value by a step or two.
    "cmyk_jpeg": (_odd(lambda p: Image.new("CMYK", (20, 20), _CMYK).save(p),
                       np.full((20, 20, 3), [round((255 - c) * (255 - _CMYK[3]) / 255) for c in _CMYK[:3]], np.uint8),
                       atol=2), ".jpg"),
    "palette": (_odd(_write(_RGB, convert="P"), np.asarray(Image.fromarray(_RGB).convert("P").convert("RGB"))),
                ".png"),
    "one_pixel": (_odd(lambda p: Image.new("RGB", (1, 1), (200, 10, 10)).save(p),
                       np.array([[[200, 10, 10]]], np.uint8)), ".png"),
    "float_tiff": (_odd(_write(_FLOAT), _rescaled(_FLOAT)), ".tif"),
    "thin_strip": (_odd(lambda p: Image.new("L", (300, 2), 90).save(p), np.full((2, 300, 1), 90, np.uint8)), ".png"),
}


def write_recipe(path: Path, data: dict, **sections) -> Path:
    raw = {"name": "bad", "seed": 0,
           "data": {"image_size": SIZE, "channels": 3, "batch_size": 8, **data},
           "model": {"name": "edgekd_cnn_tiny"},
           "train": {"epochs": 1, "optimizer": {"name": "adam", "lr": 0.01}, "scheduler": {"name": "none"},
                     "monitor": "val_loss", "monitor_mode": "min"}}
    for k, v in sections.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    path.write_text(yaml.safe_dump(raw))
    return path


def given_split_folder(root: Path, n=4) -> Path:
    for split in ("train", "val", "test"):
        write_image_folder(root / split, n_per_class=n, size=SIZE)
    return root


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """One tiny trained checkpoint (1 epoch, 48 images of 16 px) shared by the checkpoint cases."""
    from edgekd.recipe import load_recipe
    from edgekd.train.run import train_recipe

    root = tmp_path_factory.mktemp("trained")
    npz = write_npz(root / "tiny.npz", size=SIZE)
    recipe = write_recipe(root / "tiny.yaml", {"source": "medmnist", "path": str(npz)})
    result = train_recipe(load_recipe(recipe), root / "run", log=lambda *_: None)
    return {"root": root, "npz": npz, "recipe": recipe, "run": root / "run", "ckpt": result.best_path}


@pytest.fixture(scope="module")
def bundle(trained) -> Path:
    """One tiny exported bundle (ONNX + OpenVINO FP32) of the trained checkpoint, plus its zip."""
    from edgekd.export import export_checkpoint, load_profile, with_overrides

    profile = with_overrides(load_profile(None), parity_images=4)
    out = trained["root"] / "bundle"
    export_checkpoint(trained["ckpt"], out, ["onnx", "openvino"], ["fp32"], profile, zip_bundle=True,
                      log=lambda *_: None)
    return out


@pytest.fixture
def good_png(tmp_path) -> Path:
    path = tmp_path / "good.png"
    Image.fromarray(_good_array()).save(path)
    return path


def checkpoint_dict(trained) -> dict:
    return torch.load(trained["ckpt"], map_location="cpu", weights_only=True)


def copy_bundle(bundle: Path, dest: Path) -> Path:
    shutil.copytree(bundle, dest)
    return dest


def rehash(root: Path) -> None:
    from edgekd.export.bundle import write_manifest

    write_manifest(root)


def foreign_onnx(path: Path, classes=2, size=SIZE, input_name="input") -> Path:
    """An ONNX file of another model (another class count, input size or io names)."""
    from edgekd.models import create_model

    model = create_model({"name": "edgekd_cnn_tiny", "num_classes": classes, "in_chans": 3}).eval()
    return export_plain_onnx(model, path, torch.randn(2, 3, size, size), input_name)


# ================================================================================ images: edgekd predict
@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_predict_reports_a_bad_image_and_goes_on(kind, bundle, good_png, tmp_path, capsys):
    write, suffix, words = BAD_IMAGES[kind]
    bad = tmp_path / f"{kind}{suffix}"
    write(bad)
    out = tmp_path / "pred.csv"
    code, stdout, err = invoke(capsys, "predict", bundle, good_png, bad, "--backend", "onnx", "--out", out)
    assert code == 1 and "Traceback" not in stdout + err, err
    errors = error_lines(err)
    assert len(errors) == 1 and str(bad) in errors[0] and words in errors[0], err
    assert "1 of 2 input(s) failed" in err
    rows = list(csv.DictReader(out.open()))
    assert [r["file"] for r in rows] == [str(good_png), str(bad)]
    assert rows[0]["label"] and not rows[0]["error"]
    assert not rows[1]["label"] and words in rows[1]["error"]


def test_predict_csv_columns_do_not_depend_on_which_files_failed(bundle, good_png, tmp_path, capsys):
    """A CSV's header is the bundle's and the options', the same when every file fails (a parser reads one
    layout); `--out` naming a folder is refused before any inference."""
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    headers = []
    for name, inputs in (("some.csv", [good_png, bad]), ("none.csv", [bad])):
        code, _, _ = invoke(capsys, "predict", bundle, *inputs, "--tta", "--backend", "onnx", "--out", tmp_path / name)
        assert code == 1
        headers.append((tmp_path / name).read_text().splitlines()[0])
    assert headers[0] == headers[1] and "hflip:p_" in headers[0]
    (tmp_path / "d.csv").mkdir()
    code, out, err = invoke(capsys, "predict", bundle, good_png, "--backend", "onnx", "--out", tmp_path / "d.csv")
    assert code == 2 and "d.csv: --out is a folder" in err and "p_" not in out  # refused before the table
    # Under a file: refused before any inference too (it had run, printed the table, then said "file exists").
    code, out, err = invoke(capsys, "predict", bundle, good_png, "--backend", "onnx", "--out", good_png / "x.csv")
    assert code == 2 and "p_" not in out
    assert err.strip() == f"error: --out {good_png / 'x.csv'}: {good_png} is a file, not a folder"


def test_predict_says_how_many_files_of_a_folder_it_does_not_read(bundle, good_png, tmp_path, capsys):
    """A PNG without a suffix and a text file in a folder were left out without a word (given by name, each is an
    error); hidden files such as .DS_Store are not counted."""
    folder = tmp_path / "export"
    folder.mkdir()
    shutil.copy(good_png, folder / "a.png")
    shutil.copy(good_png, folder / "noext")
    (folder / "notes.txt").write_text("n")
    (folder / ".DS_Store").write_bytes(b"\0")
    code, out, err = invoke(capsys, "predict", bundle, folder, "--backend", "onnx")
    assert code == 0 and "a.png" in out
    assert ("note: 2 file(s) in the folders and patterns given are not read: neither an image suffix" in err
            and f"nor DICOM, e.g. {folder / 'noext'}" in err), err
    (folder / "DICOMDIR").write_bytes(b"\0" * 200)  # a file set's index: DICOM, not an image, not "not DICOM"
    code, out, err = invoke(capsys, "predict", bundle, folder, "--backend", "onnx")
    assert code == 0 and "note: 1 DICOMDIR file(s) left out (the index of a DICOM file set, not an image)" in err
    assert "note: 2 file(s) in the folders and patterns given are not read" in err, err


def test_predict_csv_cells_a_spreadsheet_would_run_as_formulas_are_text(bundle, good_png, tmp_path, capsys,
                                                                         monkeypatch):
    """A file named like a formula was written as is: Excel ran it. Such text cells now start with ' (numbers and
    ordinary names are untouched)."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(good_png, tmp_path / "=1+2+cmd|calc!A1.png")
    shutil.copy(good_png, tmp_path / "plain.png")
    (tmp_path / "@bad.png").write_bytes(b"not a png")
    code, _, _ = invoke(capsys, "predict", bundle, "=1+2+cmd|calc!A1.png", "plain.png", "@bad.png",
                        "--backend", "onnx", "--out", "p.csv")
    assert code == 1
    rows = list(csv.reader((tmp_path / "p.csv").open()))
    assert [r[0] for r in rows[1:]] == ["'=1+2+cmd|calc!A1.png", "plain.png", "'@bad.png"]
    assert rows[1][1:4] == rows[2][1:4] and float(rows[1][3]) > 0  # same image, same label and figures


@pytest.mark.parametrize("kind", sorted(ODD_IMAGES))
def test_predict_decodes_unusual_but_valid_images(kind, bundle, runner, tmp_path, capsys):
    """The decoder gives the known pixels of each file, and `edgekd predict` reports the probabilities of exactly
    those pixels."""
    from edgekd.imageio import read_image

    write, suffix = ODD_IMAGES[kind]
    path = tmp_path / f"{kind}{suffix}"
    expected, atol = write(path)
    decoded = read_image(path)
    assert decoded.dtype == np.uint8 and decoded.shape == expected.shape, (decoded.dtype, decoded.shape)
    diff = int(np.abs(decoded.astype(int) - expected).max())
    assert diff <= atol, f"{kind}: decoded pixels differ from the known ones by up to {diff}"
    out = tmp_path / "pred.json"
    code, _, err = invoke(capsys, "predict", bundle, path, "--backend", "onnx", "--out", out)
    assert code == 0, err
    (pred,) = json.loads(out.read_text())["predictions"]
    want = runner.predict(expected if atol == 0 else decoded)
    assert pred["label"] == want.label
    assert list(pred["probs"].values()) == pytest.approx(want.probs.tolist(), abs=1e-6)


def test_predict_keeps_brackets_in_a_reported_file_name(bundle, good_png, tmp_path, capsys):
    """A file name with [brackets] (rich markup syntax) is printed as it is, in the error and in the table."""
    bad = tmp_path / "scan[left].png"
    bad.write_bytes(b"")
    code, stdout, err = invoke(capsys, "predict", bundle, bad, good_png, "--backend", "onnx")
    assert code == 1
    assert f"error: {bad}: empty file" in err
    assert "scan[left].png" in stdout


# ================================================================================ images: edgekd train
@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_train_refuses_a_bad_image(kind, tmp_path, capsys):
    write, suffix, words = BAD_IMAGES[kind]
    root = given_split_folder(tmp_path / "imgs")
    bad = root / "train" / "b" / f"{kind}{suffix}"
    write(bad)
    recipe = write_recipe(tmp_path / "r.yaml", {"source": "imagefolder", "path": str(root)})
    # the way on is named too: a folder may hold files that are not images (a DICOM export's reports)
    assert_refused(invoke(capsys, "train", recipe, "--out", tmp_path / "run"), str(bad), words,
                   "--set data.on_bad_image=skip")
    assert not (tmp_path / "run").exists()


def test_train_skips_bad_images_and_trains_on_unusual_ones(tmp_path, capsys):
    """on_bad_image=skip drops (and lists) broken files; 16-bit, RGBA, CMYK, 1x1 ... files train and evaluate."""
    root = given_split_folder(tmp_path / "imgs", n=3)
    for split in ("train", "val", "test"):
        for kind, (write, suffix) in ODD_IMAGES.items():
            write(root / split / "a" / f"{kind}{suffix}")  # (returns the expected pixels, unused here)
    BAD_IMAGES["truncated_jpeg"][0](root / "train" / "a" / "broken.jpg")
    recipe = write_recipe(tmp_path / "r.yaml", {"source": "imagefolder", "path": str(root), "on_bad_image": "skip"})
    code, _, err = invoke(capsys, "train", recipe, "--out", tmp_path / "run")
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(metrics["bad_files"]) == 1  # the file and why: a cine or a report had read as "unreadable" alone
    assert metrics["bad_files"][0].startswith(f"{root / 'train' / 'a' / 'broken.jpg'}: ")
    from edgekd.imageio import read_image
    with pytest.raises(EdgeKDError) as why:
        read_image(root / "train" / "a" / "broken.jpg")
    assert metrics["bad_files"] == [str(why.value)]  # the decoder's own line, the file named first
    assert metrics["test"]["n"] == 6 + len(ODD_IMAGES)
    assert "skipped 1 unreadable image(s)" in err and "broken.jpg" in err  # it was in metrics.json alone
    assert "; metrics.json lists them with their reasons (bad_files)" in err
    code, _, err = invoke(capsys, "check", recipe)  # check writes no metrics.json: it had said it lists them
    assert code == 0 and "; a training run's metrics.json would list them with their reasons (bad_files)" in err, err


# ================================================================================ data sources: edgekd train
def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _split_arrays(images=None, labels=None):
    imgs, labels_ = make_images(12, SIZE, 1)
    imgs = imgs[..., 0] if images is None else images
    labels_ = labels_[:, None] if labels is None else labels
    return {"train_images": imgs, "train_labels": labels_, "val_images": imgs, "val_labels": labels_,
            "test_images": imgs, "test_labels": labels_}


def _float_images(bad):
    imgs = make_images(12, SIZE, 1)[0][..., 0].astype(np.float32)
    imgs[3, 2, 2] = bad
    return imgs


def _csv(path: Path, rows: list[tuple], header=("path", "label", "split")) -> Path:
    folder = path.parent
    write_image_folder(folder / "imgs", n_per_class=7, size=SIZE)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for row in rows:
            w.writerow(row)
    return path


GOOD_ROWS = [(f"imgs/{c}/{c}_{2 * k + i}.png", c, s) for k, s in enumerate(("train", "val", "test")) for c in ("a", "b")
             for i in range(2)]  # each image in one split

DATA_CASES = {
    # name: (make(tmp) -> data section, words in the error)
    "npz_nan_images": (lambda t: {"source": "medmnist", "path": str(_npz(t / "d.npz", **_split_arrays(
        _float_images(np.nan))))}, "NaN or Inf"),
    "npz_inf_images": (lambda t: {"source": "medmnist", "path": str(_npz(t / "d.npz", **_split_arrays(
        _float_images(np.inf))))}, "NaN or Inf"),
    "npz_nan_labels": (lambda t: {"source": "medmnist", "path": str(_npz(t / "d.npz", **_split_arrays(
        labels=np.array([[0.0], [np.nan]] * 6))))}, "NaN or Inf"),
    "npz_text_labels": (lambda t: {"source": "medmnist", "path": str(_npz(t / "d.npz", **_split_arrays(
        labels=np.array([["a"], ["b"]] * 6))))}, "train_labels must be non-negative integers (it holds <U1 values)"),
    "folder_given_a_csv": (lambda t: {"source": "imagefolder", "path": str(_csv(t / "m.csv", GOOD_ROWS))},
                           "m.csv: a file, not an image folder (data.source imagefolder): data.source=csv for a manifest"),
    "npz_object_array": (lambda t: {"source": "medmnist", "path": str(_npz(t / "d.npz", **_split_arrays(
        labels=np.array([[0], "x"] * 6, dtype=object))))}, "Object arrays"),
    "npz_five_channels": (lambda t: {"source": "medmnist", "path": str(_npz(t / "d.npz", **_split_arrays(
        np.zeros((12, SIZE, SIZE, 5), np.uint8))))}, "expected (N,H,W)"),
    "npz_length_mismatch": (lambda t: {"source": "medmnist", "path": str(_npz(t / "d.npz", **_split_arrays(
        labels=np.zeros((5, 1), np.int64))))}, "differ in length"),
    "npz_no_labels": (lambda t: {"source": "medmnist", "path": str(_npz(
        t / "d.npz", train_images=np.zeros((4, SIZE, SIZE), np.uint8)))}, "no train_labels"),
    "npz_text_file": (lambda t: {"source": "medmnist", "path": str(_write(t / "d.npz", "not a zip"))},
                      "not a readable .npz"),
    "npz_truncated": (lambda t: {"source": "medmnist", "path": str(_cut(write_npz(t / "d.npz", size=SIZE)))},
                      "not a readable .npz"),
    "npz_missing": (lambda t: {"source": "medmnist", "path": str(t / "none.npz")}, "not found"),
    "folder_empty_class": (lambda t: {"source": "imagefolder", "path": str(_empty_class(t))}, "empty class folder"),
    "folder_no_classes": (lambda t: {"source": "imagefolder", "path": str(_mkdir(t / "flat"))}, "no class folders"),
    "folder_one_class": (lambda t: {"source": "imagefolder", "path": str(write_image_folder(  # a NaN AUC, then sklearn
        t / "one", n_per_class=6, size=SIZE, classes=("normal",)))}, "has one class (normal); a classifier needs at least two"),
    "folder_class_only_in_test": (lambda t: {"source": "imagefolder", "path": str(_split_folders(t, ["covid"]))},
                                  "test/covid: a class folder the train split does not have (train has a, b)"),
    "folder_class_cased_otherwise_in_test": (lambda t: {"source": "imagefolder", "path": str(_split_folders(t, ["A"]))},
                                             "test/A: a class folder the train split does not have"),
    "folder_missing": (lambda t: {"source": "imagefolder", "path": str(t / "nowhere")}, "image folder not found"),
    "csv_missing_image": (lambda t: {"source": "csv", "path": str(_csv(t / "m.csv", GOOD_ROWS + [
        ("imgs/a/gone.png", "a", "train")]))}, "imgs/a/gone.png not found"),
    "csv_unknown_label": (lambda t: {"source": "csv", "path": str(_csv(t / "m.csv", GOOD_ROWS + [
        ("imgs/a/a_6.png", "c", "train")])), "class_names": ["a", "b"]},
        f"m.csv:{len(GOOD_ROWS) + 2}: unknown label 'c'"),  # its row named, as without class_names
    "csv_empty_label": (lambda t: {"source": "csv", "path": str(_csv(t / "m.csv", GOOD_ROWS + [
        ("imgs/a/a_0.png", "", "train")]))}, "empty label"),
    "csv_bad_split": (lambda t: {"source": "csv", "path": str(_csv(t / "m.csv", GOOD_ROWS + [
        ("imgs/a/a_6.png", "a", "tran")]))}, "'tran' is not one of"),
    "csv_missing_column": (lambda t: {"source": "csv", "path": str(_csv(t / "m.csv", [("imgs/a/a_0.png",)],
                                                                         header=("path",)))}, "lacks column"),
    "csv_empty": (lambda t: {"source": "csv", "path": str(_write(t / "m.csv", ""))}, "empty"),
    "csv_bad_image": (lambda t: {"source": "csv", "path": str(_csv_with_bad_image(t))}, "not an image"),
    # A near-miss header was an ignored extra column: splits by image (patients on both sides), or a random test split.
    "csv_patient_column_misspelled": (lambda t: {"source": "csv", "path": str(_csv(t / "m.csv", [
        r + (f"p{i // 2}",) for i, r in enumerate(GOOD_ROWS)], header=("path", "label", "split", "PatientID")))},
        "column 'PatientID' looks like the patient_id column"),
    "csv_patient_column_as_pid": (lambda t: {"source": "csv", "path": str(_csv(t / "m.csv", [
        r + (f"p{i // 2}",) for i, r in enumerate(GOOD_ROWS)], header=("path", "label", "split", "PID")))},
        "column 'PID' looks like the patient_id column"),  # with MRN, patient_no...: had split by image
    "csv_split_column_capitalised": (lambda t: {"source": "csv", "path": str(_csv(t / "m.csv", GOOD_ROWS,
                                                                                 header=("path", "label", "Split")))},
                                     "column 'Split' looks like the split column"),
    "csv_split_column_with_a_blank_cell_and_words": (lambda t: {"source": "csv", "path": str(_csv(t / "m.csv", [
        (p, c, {"train": "Training", "val": "validation", "test": "TEST"}[sp]) for p, c, sp in GOOD_ROWS[:-1]]
        + [GOOD_ROWS[-1][:2] + ("",)], header=("path", "label", "Split")))}, "column 'Split' looks like the split"),
    "csv_labels_differ_in_case": (lambda t: {"source": "csv", "path": str(_csv(t / "m.csv", GOOD_ROWS + [
        ("imgs/a/a_6.png", "A", "train"), ("imgs/b/b_6.png", "A", "train")]))}, "only in case"),
    "folder_of_dicoms_without_suffix_all_broken": (lambda t: {"source": "imagefolder", "path": str(_uid_named(t))},
                                                   "1.2.840.1"),
}


def test_a_column_spelled_like_split_or_patient_but_holding_something_else_is_read_as_extra(tmp_path):
    from edgekd.data.sources import load_csv

    rows = [r + ("scanner-a", f"p{i}") for i, r in enumerate(GOOD_ROWS)]  # 'subset' is not a split, ids never repeat
    source = load_csv(_csv(tmp_path / "m.csv", rows, header=("path", "label", "split", "subset", "Patient")))
    assert sorted(source.tables) == ["test", "train", "val"] and source.tables["train"].groups is None
    body = [r + (("chest", "knee")[i % 2],) for i, r in enumerate(GOOD_ROWS)]  # repeated values, not patients
    assert load_csv(_csv(tmp_path / "s.csv", body, header=("path", "label", "split", "subject"))).tables["train"].groups is None
    # A split column's values in any case, or spelled out, name the same three splits
    words = {"train": "Training", "val": "VALIDATION", "test": "Test"}
    source = load_csv(_csv(tmp_path / "w.csv", [(p, c, words[sp]) for p, c, sp in GOOD_ROWS]))
    assert {k: len(t) for k, t in source.tables.items()} == {"train": 4, "val": 4, "test": 4}


def _uid_named(tmp: Path) -> Path:
    """A class folder of DICOM files named by UID (no suffix), unreadable: listed (by content), then refused by name.
    They had been skipped as non-images, the class folder called empty."""
    root = write_image_folder(tmp / "imgs", n_per_class=3, size=SIZE)
    for i in range(2):
        (root / "a" / f"1.2.840.{i + 1}").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
    return root


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _cut(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "x.png").write_bytes(b"")
    return path


def _split_folders(tmp: Path, extra_test_classes: list[str]) -> Path:
    """root/{train,val,test}/{a,b}, and test/ also holds `extra_test_classes` (dropped without a word before)."""
    for split in ("train", "val", "test"):
        write_image_folder(tmp / "split" / split, n_per_class=3, size=SIZE)
    write_image_folder(tmp / "split" / "test", n_per_class=3, size=SIZE, classes=tuple(extra_test_classes))
    return tmp / "split"


def _empty_class(tmp: Path) -> Path:
    root = write_image_folder(tmp / "imgs", n_per_class=3, size=SIZE)
    (root / "c").mkdir()
    return root


def _csv_with_bad_image(tmp: Path) -> Path:
    path = _csv(tmp / "m.csv", GOOD_ROWS)
    (tmp / "imgs" / "a" / "a_0.png").write_text("hello")
    return path


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_train_refuses_bad_data(case, tmp_path, capsys):
    make, words = DATA_CASES[case]
    recipe = write_recipe(tmp_path / "r.yaml", make(tmp_path))
    assert_refused(invoke(capsys, "train", recipe, "--out", tmp_path / "run"), words)
    assert not (tmp_path / "run").exists()


def test_csv_class_names_order_the_labels(tmp_path, capsys):
    """data.class_names of a CSV with named labels sets the label ids (not a silent rename of sorted names)."""
    from edgekd.data import build_data
    from edgekd.recipe import load_recipe

    recipe = write_recipe(tmp_path / "r.yaml", {"source": "csv", "path": str(_csv(tmp_path / "m.csv", GOOD_ROWS)),
                                                "class_names": ["b", "a"]})
    data = build_data(load_recipe(recipe))
    assert data.class_names == ["b", "a"]
    table = data.tables["train"]
    assert all((lab == 0) == ("/b/" in p) for lab, p in zip(table.labels, table.paths))


# ================================================================================ recipes: edgekd train
RECIPE_CASES = {
    "unknown_top_key": ("epochz: 3\n", [], "unknown key 'epochz'"),
    "unknown_nested_key": ("train:\n  optimiser: {lr: 0.1}\n", [], "unknown key 'train.optimiser'"),
    "wrong_type_epochs": ("train:\n  epochs: many\n", [], "train.epochs"),
    "wrong_type_section": ("data: 5\n", [], "data"),
    "negative_batch": ("data:\n  batch_size: -4\n", [], "data.batch_size"),
    "bad_literal": ("train:\n  optimizer: {name: adamax}\n", [], "train.optimizer.name"),
    # a raw torch RuntimeError, exit 1, after the run folder was touched
    "focal_alpha_and_class_weights": ("train:\n  loss: {name: focal, alpha: 0.3, class_weights: true}\n", [],
                                      "focal loss weights classes by alpha or by class_weights"),  # alpha won
    "negative_freeze_stages": ("model:\n  freeze_stages: -1\n", [], "model.freeze_stages"),
    "unknown_device": ("seed: 1\n", ["--set", "train.device=gpu"], "train.device: String should match pattern"),
    "invalid_yaml": ("train: [epochs: 1\n", [], "is not valid YAML"),
    "duplicate_key": ("train: {epochs: 1, optimizer: {lr: 0.003}}\nseed: 1\ntrain: {epochs: 2}\n", [],
                      "line 3: duplicate key 'train' (YAML would keep only the last one)"),
    "bad_name": ("name: ../elsewhere\n", [], "name: String should match pattern"),
    "zero_std": ("data:\n  std: [0.5, 0, 0.5]\n", [], "data.std: every entry must be > 0"),
    # A negative head LR trained the head by gradient ascent; inf/nan numbers failed at a later step or never.
    "negative_head_lr": ("name: x\n", ["--set", "train.optimizer.head_lr=-0.003"], "train.optimizer.head_lr: "
                         "Input should be greater than 0 (got -0.003)"),
    "infinite_lr": ("train:\n  optimizer: {lr: .inf}\n", [], "train.optimizer.lr: Input should be a finite number"),
    "nan_gamma": ("name: x\n", ["--set", "train.loss.gamma=nan"], "train.loss.gamma: Input should be a finite number"),
    "negative_gamma": ("name: x\n", ["--set", "train.loss.gamma=-5"], "train.loss.gamma: Input should be greater than"),
    "focal_alpha_over_1": ("train:\n  loss: {name: focal, alpha: 1.5}\n", [],
                           "train.loss.alpha: a scalar alpha must be in [0, 1] (class 0 gets 1 - alpha) (got 1.5)"),
    "focal_alpha_negative": ("name: x\n", ["--set", "train.loss.alpha=[1, -1]"],
                             "train.loss.alpha: per-class weights must be >= 0, got [1, -1]"),
    "focal_alpha_nan": ("name: x\n", ["--set", "train.loss.alpha=.nan"], "train.loss.alpha: must be finite (got nan)"),
    # free-form values too: ColorJitter's contrast .inf passed `check`, then failed training's first step
    "augment_inf": ("augment:\n  - ColorJitter: {contrast: .inf}\n", [],
                    "augment: 0.ColorJitter.contrast: must be a finite number, got inf"),
    "timm_kwarg_nan": ("name: x\n", ["--set", "model.kwargs={drop_rate: .nan}"],
                       "model.kwargs.drop_rate: must be a finite number, got nan"),
    "plateau_factor_1": ("train:\n  scheduler: {name: plateau, factor: 1}\n", [], "train.scheduler.factor"),
    "yaml_list": ("- 1\n- 2\n", [], "must be a YAML mapping"),
    "empty_file": ("# nothing yet\n", [], "the recipe is empty"),
    "missing_base": ("base: nowhere.yaml\n", [], "nowhere.yaml: recipe file not found"),
    "base_list": ("base: [a.yaml, b.yaml]\n", [], "base: must be the path of one recipe file"),
    "set_unknown_key": ("name: x\n", ["--set", "train.epoch=2"], "--set train.epoch=2: unknown key 'train.epoch'"),
    "set_bad_value": ("name: x\n", ["--set", "train.epochs=-1"], "train.epochs"),
    "set_no_equals": ("name: x\n", ["--set", "train.epochs"], "expected key=value"),
    "unknown_model": ("model: {name: resnet_9000}\n", [], "unknown timm model 'resnet_9000'"),
    "unknown_augment": ("augment:\n  - RandomWobble: {}\n", [], "RandomWobble"),
}


@pytest.mark.parametrize("case", sorted(RECIPE_CASES))
def test_train_refuses_a_bad_recipe(case, tmp_path, capsys):
    text, extra, words = RECIPE_CASES[case]
    if case in ("unknown_model", "unknown_augment"):  # valid YAML: needs real data to get that far
        npz = write_npz(tmp_path / "d.npz", size=SIZE)
        raw = yaml.safe_load(text)
        recipe = write_recipe(tmp_path / "r.yaml", {"source": "medmnist", "path": str(npz)}, **raw)
    else:
        recipe = tmp_path / "r.yaml"
        recipe.write_text(text)
    assert_refused(invoke(capsys, "train", recipe, *extra, "--out", tmp_path / "run"), words)
    assert not (tmp_path / "run").exists()


def test_train_refuses_a_missing_recipe(tmp_path, capsys):
    assert_refused(invoke(capsys, "train", tmp_path / "no.yaml", "--out", tmp_path / "run"), "recipe file not found")


def test_train_refuses_an_out_that_is_a_bundle_or_a_file_and_zero_folds(bundle, trained, tmp_path, capsys):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    before = sorted(p.name for p in copy.iterdir())
    assert_refused(invoke(capsys, "train", trained["recipe"], "--out", copy), "holds an exported bundle")
    assert sorted(p.name for p in copy.iterdir()) == before
    (tmp_path / "afile").write_text("x")
    assert_refused(invoke(capsys, "train", trained["recipe"], "--out", tmp_path / "afile"), "is a file")
    assert_refused(invoke(capsys, "train", trained["recipe"], "--out", tmp_path / "k", "--folds", "0"),
                   "--folds must be at least 2")
    assert not (tmp_path / "k").exists()


def test_continual_train_with_missing_data_writes_nothing(tmp_path, capsys):
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "continual" / "retina-pneumonia" / "logit-finetune.yaml"
    assert_refused(invoke(capsys, "train", recipe, "--out", tmp_path / "cl", "--set",
                          "data.path=" + str(tmp_path / "none.npz")), "none.npz", "not found")  # task A's data
    assert not (tmp_path / "cl").exists()


def test_resume_refuses_another_recipe_and_a_missing_last_checkpoint(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    before = (run / "last.pt").read_bytes()
    recipe_yaml = (run / "recipe.yaml").read_text()
    assert_refused(invoke(capsys, "train", trained["recipe"], "--out", run, "--resume", "--set",
                          "train.optimizer.lr=0.5"), "trained with another recipe")
    assert (run / "last.pt").read_bytes() == before
    assert (run / "recipe.yaml").read_text() == recipe_yaml  # the refused recipe is not written over it
    assert_refused(invoke(capsys, "train", trained["recipe"], "--out", tmp_path / "fresh", "--resume"),
                   "last.pt", "not found")
    assert not (tmp_path / "fresh").exists()


def test_nonfinite_loss_stops_with_an_error_or_is_skipped(trained, tmp_path, capsys):
    """Focal alpha 1e39 for class 0 (inf in the loss's float32; a recipe refuses inf itself) makes every batch holding
    a class-0 image non-finite (batch size 1): nonfinite=error stops at the first one naming the step; skip leaves
    those batches out, counts them and trains on the rest."""
    from edgekd.data import build_data
    from edgekd.recipe import load_recipe

    sets = ["train.loss.name=focal", "train.loss.alpha=[1.0e+39, 1.0]", "data.batch_size=1"]
    inf = [a for s in sets for a in ("--set", s)]
    # The training order of epoch 1 is the loader's seeded shuffle: the error names the first class-0 image's step.
    data = build_data(load_recipe(trained["recipe"], sets))
    order = [int(y) for _, y in data.loader("train", epoch=0)]
    first_class0 = order.index(0) + 1
    line = assert_refused(invoke(capsys, "train", trained["recipe"], *inf, "--out", tmp_path / "err"),
                          after=("data: ",))
    assert line == (f"error: non-finite loss (inf) at epoch 1 step {first_class0}; lower the learning rate, "
                    "or set train.nonfinite=skip")
    assert not (tmp_path / "err" / "best.pt").exists() and not (tmp_path / "err" / "last.pt").exists()
    code, _, err = invoke(capsys, "train", trained["recipe"], *inf, "--set", "train.nonfinite=skip",
                          "--out", tmp_path / "skip")
    assert code == 0, err
    metrics = json.loads((tmp_path / "skip" / "metrics.json").read_text())
    assert order.count(0) == 24  # the class-0 half of the 48 training images, once each ...
    assert metrics["nonfinite_batches"] == 24  # ... each one skipped and counted
    (row,) = list(csv.DictReader((tmp_path / "skip" / "log.csv").open()))
    assert 0 < float(row["train_loss"]) < math.inf  # the mean over the 24 finite (class-1) batches
    assert math.isfinite(float(row["val_loss"])) and math.isfinite(metrics["best_value"])


def test_diverged_weights_are_a_clear_error(trained, tmp_path, capsys):
    """lr=1e30: the loss is finite once, the weights blow up; skipping cannot help: a one-line error, no best.pt."""
    big = ["--set", "train.optimizer.lr=1e30", "--set", "train.optimizer.name=sgd", "--set", "train.nonfinite=skip"]
    assert_refused(invoke(capsys, "train", trained["recipe"], *big, "--out", tmp_path / "run"), "NaN/Inf",
                   "weights diverged", after=("data: ",))
    assert not (tmp_path / "run" / "best.pt").exists()


# ================================================================================ checkpoints: eval + export
def _ckpt_zero(t, trained):
    (t / "c.pt").write_bytes(b"")


def _ckpt_truncated(t, trained):
    data = trained["ckpt"].read_bytes()
    (t / "c.pt").write_bytes(data[: len(data) // 2])


def _ckpt_random(t, trained):
    (t / "c.pt").write_bytes(np.random.default_rng(3).bytes(2048))


def _ckpt_plain_tensor(t, trained):
    torch.save({"weight": torch.zeros(3)}, t / "c.pt")


def _ckpt_pickle_payload(t, trained):
    class Payload:  # what a malicious checkpoint does: run code when unpickled
        def __reduce__(self):
            return (os.system, (f"touch {t / 'PWNED'}",))
    torch.save({"format": "edgekd-checkpoint/1", "x": Payload()}, t / "c.pt")


def _ckpt_other_arch(t, trained):
    ckpt = checkpoint_dict(trained)
    ckpt["arch"] = {**ckpt["arch"], "name": "edgekd_cnn"}
    torch.save(ckpt, t / "c.pt")


def _ckpt_other_class_count(t, trained):
    ckpt = checkpoint_dict(trained)
    ckpt["arch"] = {**ckpt["arch"], "num_classes": 5}
    torch.save(ckpt, t / "c.pt")


def _ckpt_no_state(t, trained):
    ckpt = checkpoint_dict(trained)
    del ckpt["state_dict"]
    torch.save(ckpt, t / "c.pt")


def _ckpt_unknown_model(t, trained):
    ckpt = checkpoint_dict(trained)
    ckpt["arch"] = {**ckpt["arch"], "name": "not_a_model"}
    torch.save(ckpt, t / "c.pt")


def _ckpt_data_gone(t, trained):
    ckpt = checkpoint_dict(trained)
    ckpt["recipe"]["data"]["path"] = str(t / "moved.npz")
    torch.save(ckpt, t / "c.pt")


CHECKPOINT_CASES = {
    "zero_byte": (_ckpt_zero, "not a readable checkpoint"),
    "truncated": (_ckpt_truncated, "not a readable checkpoint"),
    "random_bytes": (_ckpt_random, "not a readable checkpoint"),
    "text_file": (lambda t, trained: (t / "c.pt").write_text("hello"),  # had said "KeyError: 101"
                  "not a readable checkpoint (not a PyTorch file: neither a torch.save zip nor a pickle)"),
    "not_edgekd": (_ckpt_plain_tensor, "not an edgekd checkpoint"),
    "pickle_payload": (_ckpt_pickle_payload, "not a readable checkpoint"),
    "other_architecture": (_ckpt_other_arch, "weights do not fit"),
    "other_class_count": (_ckpt_other_class_count, "another architecture or class count"),
    "no_state_dict": (_ckpt_no_state, "lacks 'state_dict'"),
    "unknown_model": (_ckpt_unknown_model, "unknown timm model"),
    "data_moved": (_ckpt_data_gone, "moved.npz"),
}


@pytest.mark.parametrize("command", ["eval", "export"])
@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_bad_checkpoint_is_refused(case, command, trained, tmp_path, capsys):
    make, words = CHECKPOINT_CASES[case]
    make(tmp_path, trained)
    before = {p.name for p in tmp_path.iterdir()}
    out = tmp_path / "out"
    extra = ["--format", "onnx", "--precision", "fp32", "--parity-images", "4"] if command == "export" else []
    assert_refused(invoke(capsys, command, tmp_path / "c.pt", *extra, "--out", out), words)
    assert new_files(tmp_path, before) == set()  # no out dir, no staging leftovers
    assert not (tmp_path / "PWNED").exists()


def test_eval_refuses_data_with_another_class_count(trained, tmp_path, capsys):
    npz = write_npz(tmp_path / "three.npz", size=SIZE, classes=3)
    data = write_recipe(tmp_path / "d.yaml", {"source": "medmnist", "path": str(npz)})
    assert_refused(invoke(capsys, "eval", trained["ckpt"], "--data", data, "--out", tmp_path / "ev"),
                   "the model has 2 classes ['class_0', 'class_1'], the data has 3 ['class_0', 'class_1', 'class_2']")
    assert not (tmp_path / "ev").exists()


def test_eval_of_a_bundle_with_set_but_no_data_recipe_says_what_to_give(bundle, tmp_path, capsys):
    assert_refused(invoke(capsys, "eval", bundle, "--set", "data.limit=50", "--failures", "--out", tmp_path / "ev"),
                   "is a bundle, which holds no recipe to override: give --data RECIPE")
    assert not (tmp_path / "ev").exists()


def test_eval_refuses_a_bad_compare_before_writing(trained, tmp_path, capsys):
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "adir").mkdir()
    for bad, words in ((tmp_path / "empty.pt", "empty.pt"),
                       (tmp_path / "adir", "not a checkpoint, run directory (holding best.pt) or bundle"),
                       (tmp_path / "none.pt", "no such checkpoint, run directory or bundle")):
        assert_refused(invoke(capsys, "eval", trained["ckpt"], "--corruptions", "--compare", bad,
                              "--out", tmp_path / "ev"), words)
        assert not (tmp_path / "ev").exists()
    # A negative seed had scored the clean row, then failed inside numpy (exit 1).
    assert_refused(invoke(capsys, "eval", trained["ckpt"], "--corruptions", "--seed", "-1", "--out", tmp_path / "ev"),
                   "--seed")
    assert not (tmp_path / "ev").exists()


def test_a_checkpoint_where_a_bundle_goes_and_back_is_named_for_what_it_is(trained, bundle, good_png, tmp_path,
                                                                          capsys):
    assert_refused(invoke(capsys, "predict", trained["ckpt"], good_png), "a PyTorch checkpoint, not a bundle")
    assert_refused(invoke(capsys, "export", bundle, "--out", tmp_path / "b"), "an exported bundle, not a checkpoint")
    (tmp_path / "no_run").mkdir()  # a run folder stands for its best.pt; a folder without one is named
    assert_refused(invoke(capsys, "eval", tmp_path / "no_run", "--out", tmp_path / "ev"), "a folder, not a checkpoint")
    # an eval into the training run's own folder had replaced its metrics.json (best epoch, val, sessions)
    record = (Path(trained["run"]) / "metrics.json").read_bytes()
    assert_refused(invoke(capsys, "eval", trained["ckpt"], "--out", trained["run"]),
                   f"--out {trained['run']}: holds a metrics.json that is not an earlier eval's (a training run's?)")
    assert (Path(trained["run"]) / "metrics.json").read_bytes() == record
    # ... and a run still training (last.pt, no metrics.json yet): the eval's would be replaced by the run's, or
    # would replace it when it finished during the eval
    running = tmp_path / "running"
    running.mkdir()
    (running / "last.pt").write_bytes((Path(trained["run"]) / "last.pt").read_bytes())
    assert_refused(invoke(capsys, "eval", trained["ckpt"], "--out", running),
                   f"--out {running}: a training run's folder (its metrics.json is the run's")
    assert not (running / "metrics.json").exists()
    # explain reads a folder's images now, but never writes its overlays into a folder it reads
    assert_refused(invoke(capsys, "explain", trained["ckpt"], tmp_path, "--out", tmp_path / "x"),
                   f"--out {tmp_path / 'x'}: is inside the input {tmp_path}")
    assert_refused(invoke(capsys, "update", bundle, trained["recipe"], "--out", tmp_path / "u"),
                   "needs a continual recipe")
    assert not any((tmp_path / d).exists() for d in ("b", "ev", "x", "u"))


def test_the_python_eval_refuses_what_the_cli_eval_refuses(trained, bundle, tmp_path):
    """evaluate_checkpoint had written its metrics.json and plots into a bundle (whose manifest then refused it) and
    over a training run's metrics.json; the guards were the CLI's only. A data recipe of other channels had ended
    in a raw convolution error."""
    from edgekd.train import evaluate_checkpoint

    before = {p.name: p.read_bytes() for p in Path(bundle).iterdir() if p.is_file()}
    with pytest.raises(EdgeKDError, match=r"^out .*: is a bundle, whose manifest would no longer match"):
        evaluate_checkpoint(trained["ckpt"], bundle, log=None)
    assert {p.name: p.read_bytes() for p in Path(bundle).iterdir() if p.is_file()} == before
    record = (Path(trained["run"]) / "metrics.json").read_bytes()
    with pytest.raises(EdgeKDError, match=r"holds a metrics.json that is not an earlier eval's"):
        evaluate_checkpoint(trained["ckpt"], trained["run"], log=None)
    assert (Path(trained["run"]) / "metrics.json").read_bytes() == record
    a_file = tmp_path / "a.txt"
    a_file.write_text("x")
    with pytest.raises(EdgeKDError, match=r"is a file, not a folder"):
        evaluate_checkpoint(trained["ckpt"], a_file, log=None)
    gray = {"data": {"source": "medmnist", "path": str(trained["npz"]), "image_size": SIZE, "channels": 1,
                     "mean": [0.5], "std": [0.5]}}
    with pytest.raises(EdgeKDError, match=r"the model takes 3-channel images, the data recipe gives data.channels 1"):
        evaluate_checkpoint(trained["ckpt"], tmp_path / "ev", gray, log=None)
    assert not (tmp_path / "ev").exists()


def test_the_python_explain_takes_one_path_and_never_writes_into_a_bundle(trained, bundle, good_png, tmp_path):
    """explain_files(ckpt, "imgs/a.png", out) had read the path letter by letter ("i: image file not found"), and
    wrote its overlays into a bundle, whose manifest then refused it."""
    from edgekd.explain import explain_files

    with pytest.raises(EdgeKDError, match=r"^--out .*: is a bundle, whose manifest would no longer match"):
        explain_files(trained["ckpt"], [good_png], bundle)
    assert not (Path(bundle) / "explain.json").exists()
    records = explain_files(trained["ckpt"], str(good_png), tmp_path / "x")
    assert [r["file"] for r in records] == [str(good_png)]


@pytest.mark.parametrize("key, value", [("mean", "[0.0,0.0,0.0]"), ("image_size", "32"), ("hair_removal", "true")])
def test_export_set_cannot_change_the_preprocessing_the_bundle_ships(key, value, trained, tmp_path, capsys):
    """`export --set data.mean=[0.0]` had shipped mean 0.0 for a model trained on 0.5 (the gate compared the model
    with itself on the changed inputs, so it passed); data.image_size without the profile's warning."""
    assert_refused(invoke(capsys, "export", trained["ckpt"], "--set", f"data.{key}={value}", "--out", tmp_path / "b"),
                   f"--set data.{key}: the model was trained with data.{key} ", "the export profile's input_size")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("command", ["export", "eval", "report"])
def test_a_checkpoint_read_from_another_folder_says_the_data_path_is_relative(command, trained, tmp_path, capsys):
    """export said so; eval and report had said only "not found"."""
    import torch

    ckpt = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)
    ckpt["recipe"]["data"]["path"] = "my_scans.npz"  # as trained in another working directory
    torch.save(ckpt, tmp_path / "moved.pt")
    assert_refused(invoke(capsys, command, tmp_path / "moved.pt", "--out", tmp_path / "b"), "my_scans.npz",
                   "relative to the folder it was trained in", "--set data.path=")
    assert not (tmp_path / "b").exists()


def test_report_refuses_a_model_whose_outputs_do_not_match_its_data(trained, tmp_path, capsys):
    """A continual model's outputs span every task; report's argmax over them scored 0.0, with exit 0."""
    import torch

    ckpt = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)
    ckpt["recipe"]["data"]["path"] = str(write_npz(tmp_path / "three.npz", size=SIZE, classes=3))
    torch.save(ckpt, tmp_path / "other.pt")
    assert_refused(invoke(capsys, "report", tmp_path / "other.pt", "--out", tmp_path / "rep"),
                   "the model has 2 classes ['class_0', 'class_1'], the data has 3")  # as eval and export say it
    assert not (tmp_path / "rep").exists()
    (tmp_path / "a_file").write_text("x")  # refused before any model is scored (it had said "file exists" after)
    assert_refused(invoke(capsys, "report", tmp_path / "other.pt", "--out", tmp_path / "a_file"),
                   f"--out {tmp_path / 'a_file'}: {tmp_path / 'a_file'} is a file, not a folder")


def test_a_run_folder_stands_for_its_checkpoint_and_report_takes_one_split(trained, tmp_path, capsys):
    """`eval runs/x` had been refused ("a folder, not a checkpoint file") while report and bench take run folders;
    `report --split val,test` had said "unknown split 'val,test'"."""
    code, out, err = invoke(capsys, "eval", trained["run"], "--out", tmp_path / "e")
    assert code == 0, err
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["checkpoint"] == str(trained["ckpt"])
    assert_refused(invoke(capsys, "report", trained["run"], "--split", "val,test", "--out", tmp_path / "r"),
                   "--split val,test: a report scores one split (run it once per split)")
    assert not (tmp_path / "r").exists()


# ================================================================================ export options
EXPORT_CASES = {
    "unknown_format": (["--format", "tflite"], "tflite"),
    "unknown_precision": (["--precision", "int4"], "int4"),
    "missing_profile": (["--target", "{t}/none.yaml"], "none.yaml"),
    "profile_unknown_key": (["--target", "{t}/p.yaml"], "unknown key"),
    "empty_profile": (["--target", "{t}/empty.yaml"], "the export profile is empty"),
    "out_not_a_bundle": (["--out", "{t}/docs"], "is not an edgekd bundle"),
    "zero_parity_images": (["--parity-images", "0"], "at least 1"),
    "zero_metric_images": (["--metric-images", "0"], "--metric-images must be at least 1"),
    "metric_images_below_the_classes": (["--metric-images", "1"], "below the 2 classes"),
    "threads_over_the_limit": (["--threads", "2000"], "--threads must be in [1, 1024] (got 2000)"),  # had hung
    "blank_format": (["--format", ""], "--format '': nothing given"),  # had fallen back to the profile's
    "blank_precision": (["--precision", ","], "--precision ',': nothing given"),
    "out_named_zip": (["--out", "{t}/b.zip", "--zip"], "a bundle is a folder; for a zip too give --out"),
    "profile_precision_unsupported": (["--target", "cpu-openvino-fp16", "--format", "onnx"],
                                      "precision fp16 (export profile cpu-openvino-fp16): not supported by onnx"),
    "own_profile_precision_unsupported": (["--target", "{t}/fp16.yaml"],  # a copy keeping the shipped name: the file
                                          "precision fp16 (export profile {t}/fp16.yaml): not supported by onnx"),
}


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_export_refuses_bad_options(case, trained, tmp_path, capsys):
    args, words = EXPORT_CASES[case]
    (tmp_path / "p.yaml").write_text("formats: [onnx]\nprecision: [fp32]\n")
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "fp16.yaml").write_text("name: cpu-onnx-fp32\nformats: [onnx]\nprecisions: [fp16]\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("keep me")
    before = {p.name for p in tmp_path.iterdir()}
    args = [a.format(t=tmp_path) for a in args]
    out = [] if "--out" in args else ["--out", tmp_path / "bundle"]
    assert_refused(invoke(capsys, "export", trained["ckpt"], *args, *out), words.format(t=tmp_path))
    assert new_files(tmp_path, before) == set()
    assert (tmp_path / "docs" / "notes.txt").read_text() == "keep me"


# ================================================================================ bundles: edgekd predict
def _b_tampered(b):
    with (b / "onnx" / "model_fp32.onnx").open("ab") as fh:
        fh.write(b"\0")


def _b_unlisted(b):
    (b / "extra.bin").write_bytes(b"x")


def _b_no_manifest(b):
    (b / "manifest.sha256").unlink()


def _b_meta_edit_without_rehash(b):
    meta = json.loads((b / "edgekd.json").read_text())
    meta["class_names"] = ["normal", "cancer"]
    (b / "edgekd.json").write_text(json.dumps(meta))


def _b_meta(mutate):
    def apply(b):
        meta = json.loads((b / "edgekd.json").read_text())
        mutate(meta)
        (b / "edgekd.json").write_text(json.dumps(meta))
        rehash(b)
    return apply


def _b_meta_not_json(b):
    (b / "edgekd.json").write_text("{schema: ")
    rehash(b)


def _b_onnx(**kw):
    def apply(b):
        foreign_onnx(b / "onnx" / "model_fp32.onnx", **kw)
        rehash(b)
    return apply


def _b_onnx_garbage(b):
    (b / "onnx" / "model_fp32.onnx").write_bytes(b"\x08\x07garbage")
    rehash(b)


def _b_traversal_member(b):
    import zipfile

    rehash(b)
    with zipfile.ZipFile(b.parent / "evil.zip", "w") as zf:
        for p in sorted(b.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(b).as_posix())
        zf.writestr("../escaped.txt", "outside")


def _b_truncated_zip(b):
    shutil.make_archive(str(b.parent / "cut"), "zip", b)
    data = (b.parent / "cut.zip").read_bytes()
    (b.parent / "cut.zip").write_bytes(data[: len(data) // 2])


BUNDLE_CASES = {
    # name: (mutate the copied bundle dir, what is passed to predict, words)
    "tampered_artifact": (_b_tampered, "b", "does not match its sha256"),
    "unlisted_file": (_b_unlisted, "b", "extra.bin is not listed"),
    "no_manifest": (_b_no_manifest, "b", "manifest.sha256 is missing"),
    "metadata_edited": (_b_meta_edit_without_rehash, "b", "edgekd.json does not match its sha256"),
    "metadata_not_json": (_b_meta_not_json, "b", "not valid JSON"),
    "schema_version": (_b_meta(lambda m: m.update(schema="edgekd-bundle/9")), "b", "schema must be"),
    "no_class_names": (_b_meta(lambda m: m.pop("class_names")), "b", "class_names"),
    "std_zero": (_b_meta(lambda m: m["preprocess"].update(std=[0, 0.5, 0.5])), "b", "preprocess.std values must be in"),
    "artifact_path_escapes": (_b_meta(lambda m: m["artifacts"][0].update(path="../model.onnx")), "b",
                              "relative path inside the bundle"),
    "onnx_other_class_count": (_b_onnx(classes=5), "b", "does not match"),
    "onnx_other_input_size": (_b_onnx(size=24), "b", "model input shape"),
    "onnx_other_io_names": (_b_onnx(input_name="x"), "b", "no input named 'input'"),
    "onnx_garbage": (_b_onnx_garbage, "b", "cannot load the model"),
    "zip_path_traversal": (_b_traversal_member, "evil.zip", "escapes the bundle"),
    "zip_truncated": (_b_truncated_zip, "cut.zip", "a truncated or corrupt zip"),
    "bundle_missing": (lambda b: None, "nowhere", "bundle not found"),
}


@pytest.mark.parametrize("case", sorted(BUNDLE_CASES))
def test_predict_refuses_a_bad_bundle(case, bundle, good_png, tmp_path, capsys):
    mutate, target, words = BUNDLE_CASES[case]
    work = tmp_path / "w"
    work.mkdir()
    mutate(copy_bundle(bundle, work / "b"))
    out = tmp_path / "pred.csv"
    assert_refused(invoke(capsys, "predict", work / target, good_png, "--backend", "onnx", "--out", out), words)
    assert not out.exists() and not (tmp_path / "escaped.txt").exists() and not (work / "escaped.txt").exists()


PREDICT_OPTION_CASES = {
    "precision_not_in_bundle": (["--precision", "int8"], "no int8 model in the bundle"),
    "unknown_precision": (["--precision", "fp64"], "unknown precision 'fp64'"),
    "unknown_backend": (["--backend", "tensorrt"], "unknown backend 'tensorrt'"),
    "bad_out_suffix": (["--out", "{t}/pred.xlsx"], "must end with .csv or .json"),
    "unknown_tta_view": (["--views", "original,mirror"], "mirror"),
    "blank_tta_views": (["--views", ""], "--views '': nothing given"),  # had run without TTA
    "blank_item_in_views": (["--views", "hflip,,vflip"], "--views 'hflip,,vflip': a blank item in the comma-sep"),
    "views_with_no_tta": (["--no-tta", "--views", "hflip"], "--views with --no-tta"),  # --views had won silently
}


@pytest.mark.parametrize("case", sorted(PREDICT_OPTION_CASES))
def test_predict_refuses_bad_options(case, bundle, good_png, tmp_path, capsys):
    args, words = PREDICT_OPTION_CASES[case]
    args = [a.format(t=tmp_path) for a in args]
    backend = [] if "--backend" in args else ["--backend", "onnx"]
    assert_refused(invoke(capsys, "predict", bundle, good_png, *backend, *args), words)
    assert not any(p.name.startswith("pred") for p in tmp_path.iterdir())


def test_predict_says_what_a_special_file_a_repeated_file_and_a_frame_of_no_dicom_are(bundle, good_png, tmp_path,
                                                                                        capsys):
    """A named pipe hung predict in open(); /dev/zero was "image file not found"; a link in a folder to a file also
    given vanished without a word; --frame on PNGs was ignored without one."""
    import os
    import threading

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    done = []
    worker = threading.Thread(target=lambda: done.append(invoke(capsys, "predict", bundle, fifo, "--backend", "onnx")),
                              daemon=True)
    worker.start()
    worker.join(60)
    if not done:  # unblock the hung open so the thread can end, then fail
        with open(fifo, "wb"):
            pass
        pytest.fail("predict blocked on a named pipe")
    code, _, err = done[0]
    assert code == 1 and "pipe.png: not a regular file (a device, pipe or socket)" in err, err
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "link.png").symlink_to(good_png)
    code, out, err = invoke(capsys, "predict", bundle, good_png, folder, "--backend", "onnx", "--frame", "2")
    assert code == 0, err
    assert "note: 1 input(s) reach a file already given (twice, or through a link), predicted once, e.g. " \
        f"{folder / 'link.png'}" in err.replace("\n", "")
    assert "note: --frame 2 picks a frame of a multi-frame DICOM, and none is among the inputs" in err


def test_predict_reports_missing_inputs_per_item(bundle, good_png, tmp_path, capsys):
    code, _, err = invoke(capsys, "predict", bundle, good_png, tmp_path / "nope.png", str(tmp_path / "*.dcmx"),
                          "--backend", "onnx", "--out", tmp_path / "p.json")
    assert code == 1 and "Traceback" not in err
    assert len(error_lines(err)) == 2 and "2 of 3 input(s) failed" in err
    preds = json.loads((tmp_path / "p.json").read_text())["predictions"]
    assert [("error" in p) for p in preds] == [False, True, True]


# ================================================================================ runner API: wrong inputs
RUNNER_INPUTS = {
    "rank_5": (lambda r: r.predict(np.zeros((1, 2, SIZE, SIZE, 3), np.uint8)), "expected an image array"),
    "rank_1": (lambda r: r.predict(np.zeros(SIZE, np.uint8)), "expected an image array"),
    "batch_as_one_image": (lambda r: r.predict(np.zeros((2, SIZE, SIZE, 3), np.uint8)), "use predict_batch"),
    "float_image": (lambda r: r.predict(np.zeros((SIZE, SIZE, 3), np.float32)), "uint8"),
    "two_channels": (lambda r: r.predict(np.zeros((SIZE, SIZE, 2), np.uint8)), "channels"),
    "empty_image": (lambda r: r.predict(np.zeros((0, SIZE, 3), np.uint8)), "empty image"),
    "infer_rank_3": (lambda r: r.infer(np.zeros((3, SIZE, SIZE), np.float32)), "model input must have shape"),
    "infer_wrong_size": (lambda r: r.infer(np.zeros((1, 3, 8, 8), np.float32)), "model input must have shape"),
    "not_an_image": (lambda r: r.predict({"pixels": 1}), "expected an image path"),
}


@pytest.fixture(scope="module")
def runner(bundle):
    from edgekd.runtime import Runner

    return Runner.from_bundle(bundle, backend="onnx")


@pytest.mark.parametrize("case", sorted(RUNNER_INPUTS))
def test_runner_refuses_wrong_inputs(case, runner):
    call, words = RUNNER_INPUTS[case]
    with pytest.raises(EdgeKDError, match=words) as info:
        call(runner)
    assert "\n" not in str(info.value)


# ================================================================================ the real entry point
def as_result(proc: subprocess.CompletedProcess):
    return proc.returncode, proc.stdout, proc.stderr


def test_subprocess_truncated_checkpoint_and_debug_traceback(trained, tmp_path):
    _ckpt_truncated(tmp_path, trained)
    assert_refused(as_result(run_edgekd("eval", tmp_path / "c.pt", "--out", tmp_path / "ev")),
                   "not a readable checkpoint")
    proc = run_edgekd("--debug", "eval", tmp_path / "c.pt", "--out", tmp_path / "ev")
    assert proc.returncode != 0 and "Traceback" in proc.stderr  # --debug shows it
    assert not (tmp_path / "ev").exists()


def test_subprocess_tampered_bundle_zip(bundle, good_png, tmp_path):
    import zipfile

    src = bundle.parent / f"{bundle.name}.zip"
    bad = tmp_path / "tampered.zip"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(info, data + b" " if info.filename == "card.md" else data)
    assert_refused(as_result(run_edgekd("predict", bad, good_png, "--out", tmp_path / "p.csv")),
                   "card.md does not match its sha256")
    assert not (tmp_path / "p.csv").exists()


def test_subprocess_bad_image_in_training_data(tmp_path):
    root = given_split_folder(tmp_path / "imgs")
    bad = root / "val" / "a" / "cut.jpg"
    BAD_IMAGES["truncated_jpeg"][0](bad)
    recipe = write_recipe(tmp_path / "r.yaml", {"source": "imagefolder", "path": str(root)})
    assert_refused(as_result(run_edgekd("train", recipe, "--out", tmp_path / "run")), str(bad), "truncated")
    assert not (tmp_path / "run").exists()


# ================================================================================ full disk
def _disk_nearly_full(monkeypatch, free_mib=4) -> list[Path]:
    """edgekd.fileio sees `free_mib` MiB free on every disk; returns the list of paths it asked about (filled in as
    the code under test calls shutil.disk_usage), so a test can tell the check ran on the output's disk."""
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    probed: list[Path] = []

    def disk_usage(path):
        probed.append(Path(path))
        return usage(2**40, 2**40 - free_mib * 2**20, free_mib * 2**20)

    monkeypatch.setattr("edgekd.fileio.shutil.disk_usage", disk_usage)
    return probed


def test_train_on_a_full_disk_writes_nothing(trained, tmp_path, capsys, monkeypatch):
    probed = _disk_nearly_full(monkeypatch, free_mib=4)
    line = assert_refused(invoke(capsys, "train", trained["recipe"], "--out", tmp_path / "run"),
                          f"{tmp_path / 'run'}: not enough free disk space for checkpoints", "MiB, 4 MiB free)")
    assert probed == [tmp_path]  # the run folder does not exist yet: its nearest existing parent was asked
    assert not (tmp_path / "run").exists(), line


def test_export_on_a_full_disk_writes_nothing(trained, tmp_path, capsys, monkeypatch):
    probed = _disk_nearly_full(monkeypatch, free_mib=4)
    assert_refused(invoke(capsys, "export", trained["ckpt"], "--format", "onnx", "--precision", "fp32",
                          "--out", tmp_path / "bundle"), f"{tmp_path}: not enough free disk space for the bundle",
                   "MiB, 4 MiB free)")
    assert probed == [tmp_path]
    assert list(tmp_path.iterdir()) == []


def test_a_write_failing_midway_leaves_the_old_file(tmp_path):
    """ENOSPC halfway through a checkpoint write: one-line error, the previous file intact, no temp file left."""
    from edgekd.fileio import atomic_write

    target = tmp_path / "last.pt"
    target.write_bytes(b"previous checkpoint")

    def write(tmp):
        Path(tmp).write_bytes(b"half of the new")
        raise OSError(28, "No space left on device")

    with pytest.raises(EdgeKDError, match="last.pt: could not be written \\(No space left on device\\)"):
        atomic_write(target, write)
    assert target.read_bytes() == b"previous checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    # a write that succeeds is on disk before it is named, and the rename is synced too (after a power loss a
    # checkpoint had could be empty on some filesystems)
    import os

    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fsync", lambda fd: events.append("fsync " + os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
                   or real_fsync(fd))
        mp.setattr(os, "replace", lambda a, b: events.append("replace") or real_replace(a, b))
        atomic_write(target, lambda tmp: Path(tmp).write_bytes(b"new"))
    assert events[0].startswith("fsync .last.pt.") and events[1:] == ["replace", f"fsync {tmp_path.name}"]
    assert target.read_bytes() == b"new"


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_published_files_and_directories_get_the_umask_mode_not_a_private_one(tmp_path, umask, file_mode, dir_mode):
    """A bundle or model repository is read by a service or container running as another user: mkstemp/mkdtemp's
    private 0600/0700 would lock it out; outputs get what open()/mkdir() give under the umask."""
    import os
    import stat

    from edgekd.export.bundle import publish, staging_dir
    from edgekd.fileio import atomic_write, write_json

    old = os.umask(umask)
    try:
        target = atomic_write(tmp_path / "best.pt", lambda tmp: Path(tmp).write_bytes(b"weights"))
        stage = staging_dir(tmp_path / "bundle")
        write_json(stage / "edgekd.json", {"schema": "edgekd-bundle/1"})
        out = publish(stage, tmp_path / "bundle")
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == file_mode
    assert stat.S_IMODE(out.stat().st_mode) == dir_mode
    assert stat.S_IMODE((out / "edgekd.json").stat().st_mode) == file_mode


def test_a_folder_that_cannot_be_written_names_the_file_asked_for(tmp_path, monkeypatch):
    import errno
    import tempfile

    from edgekd.fileio import write_json

    def refused(*args, **kwargs):  # what mkstemp raises in a read-only folder (root ignores chmod, so simulated)
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / ".metrics.json.x1y2.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    with pytest.raises(EdgeKDError) as err:
        write_json(tmp_path / "metrics.json", {})
    assert str(err.value) == f"{tmp_path / 'metrics.json'}: could not be written (Permission denied)"


def test_a_camera_jpeg_preview_and_a_tiff_thumbnail_are_not_other_pages(tmp_path):
    """Pillow counts an MPO JPEG's preview and a TIFF's reduced-resolution page as frames: read as the one image
    they are (the multi-frame refusal had refused ordinary camera JPEGs), and a DICOMDIR is not a training image."""
    from PIL import TiffImagePlugin

    from edgekd.imageio import is_image_file, read_image

    big = Image.fromarray(random_pixels((40, 40, 3), seed=5))
    big.save(tmp_path / "cam.jpg", format="MPO", save_all=True, append_images=[big.resize((10, 10))])
    assert Image.open(tmp_path / "cam.jpg").n_frames == 2 and read_image(tmp_path / "cam.jpg").shape == (40, 40, 3)
    with TiffImagePlugin.AppendingTiffWriter(tmp_path / "scan.tif", True) as tf:
        big.save(tf)
        tf.newFrame()
        big.resize((10, 10)).save(tf, tiffinfo={254: 1})  # NewSubfileType: a reduced-resolution copy
        tf.newFrame()
    assert read_image(tmp_path / "scan.tif").shape == (40, 40, 3)
    with TiffImagePlugin.AppendingTiffWriter(tmp_path / "thumb_first.tif", True) as tf:  # the thumbnail first
        big.resize((10, 10)).save(tf, tiffinfo={254: 1})
        tf.newFrame()
        big.save(tf)
        tf.newFrame()
    assert read_image(tmp_path / "thumb_first.tif").shape == (40, 40, 3)  # it read the 10 x 10 thumbnail
    with TiffImagePlugin.AppendingTiffWriter(tmp_path / "long.tif", True) as tf:  # the size limits on the page read
        big.resize((10, 10)).save(tf, tiffinfo={254: 1})  # (they had been checked on the thumbnail)
        tf.newFrame()
        Image.new("L", (4000, 10)).save(tf)
        tf.newFrame()
    with pytest.raises(EdgeKDError, match=r"long.tif: image is 4000x10, more elongated than"):
        read_image(tmp_path / "long.tif")
    (tmp_path / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
    (tmp_path / "1.2.3").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
    (tmp_path / "DICOMDIR.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
    assert not is_image_file(tmp_path / "DICOMDIR") and not is_image_file(tmp_path / "DICOMDIR.dcm")
    assert is_image_file(tmp_path / "1.2.3")


def test_an_out_starting_with_a_tilde_or_a_dangling_link_is_refused(trained, bundle, good_png, tmp_path, capsys,
                                                                     monkeypatch):
    """`--out=~/runs` (no shell expands ~ after =) had written into a folder named ~; a symlink to nothing had been
    "file exists"."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dangling").symlink_to(tmp_path / "nothere")
    recipe = trained["ckpt"].parent / "recipe.yaml"
    for args in (["train", recipe, "--out", "~/x"], ["eval", trained["ckpt"], "--out", "~/e"],
                 ["predict", bundle, good_png, "--out", "~/p.csv"]):
        assert_refused(invoke(capsys, *args), "starts with '~', which no shell expanded")
    assert_refused(invoke(capsys, "train", recipe, "--out", "dangling"), "--out dangling: a symlink to",
                   "which does not exist")
    assert not (tmp_path / "~").exists() and not (tmp_path / "nothere").exists()


def test_predict_writes_through_a_symlinked_out_file(bundle, good_png, tmp_path, capsys):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "preds.csv").write_text("old\n")
    (tmp_path / "link.csv").symlink_to(tmp_path / "shared" / "preds.csv")
    code, _, err = invoke(capsys, "predict", bundle, good_png, "--backend", "onnx", "--out", tmp_path / "link.csv")
    assert code == 0, err
    assert (tmp_path / "link.csv").is_symlink()  # it had been replaced by a plain file, the target left stale
    assert (tmp_path / "shared" / "preds.csv").read_text().startswith("file,")
    (tmp_path / "new.csv").symlink_to(tmp_path / "shared" / "not-yet.csv")  # a link to a file not yet written
    code, _, err = invoke(capsys, "predict", bundle, good_png, "--backend", "onnx", "--out", tmp_path / "new.csv")
    assert code == 0, err
    assert (tmp_path / "shared" / "not-yet.csv").read_text().startswith("file,")


def test_predict_says_when_threads_are_capped_to_the_cores(bundle, good_png, capsys):
    """`predict --threads 64` on 2 cores had run on 2 without a word (bench said so)."""
    from edgekd.runtime import cap_to_cores

    asked = 512  # beyond any CI machine's cores
    code, _, err = invoke(capsys, "predict", bundle, good_png, "--backend", "onnx", "--threads", asked)
    assert code == 0, err
    used = cap_to_cores(asked)
    assert f"note: --threads {asked} is more than the {used} cores this process may use: {used} used" in err
    code, _, err = invoke(capsys, "predict", bundle, good_png, "--backend", "onnx", "--threads", "1")
    assert code == 0 and "more than the" not in err


def test_an_option_given_twice_or_an_empty_path_is_refused(trained, bundle, good_png, tmp_path, capsys, monkeypatch):
    """`-p int4 -p fp32` had kept fp32 without checking int4 (and `-p fp32 -p int8` built int8 only); `--out ""` was
    read as the current folder."""
    monkeypatch.chdir(tmp_path)
    assert_refused(invoke(capsys, "export", trained["ckpt"], "-p", "int4", "-p", "fp32"),
                   "--precision given 2 times", "comma-separated")
    assert_refused(invoke(capsys, "predict", bundle, good_png, "--threads", "0", "--threads=2"), "--threads given 2")
    for args in (["predict", bundle, good_png, "--out", ""], ["export", trained["ckpt"], "--out="],
                 ["eval", trained["ckpt"], "-o", ""]):
        assert_refused(invoke(capsys, *args), "an empty path")
    assert list(tmp_path.iterdir()) == [good_png]  # nothing written in the current folder


def test_format_and_precision_names_are_read_in_any_case(trained, tmp_path):
    from edgekd.export.formats import export_plan
    from edgekd.options import parse_list

    assert parse_list("FP32,Int8", ("fp32", "fp16", "int8"), "--precision") == ["fp32", "int8"]
    assert [(f.name, p) for f, p in export_plan(["ONNX"], ["FP32"])] == [("onnx", "fp32")]


def test_a_second_export_into_a_bundle_being_written_is_refused(trained, tmp_path, capsys):
    """Two `edgekd update --out B` at once both said "wrote B"; the bundle held the one that finished last."""
    import subprocess
    import sys

    from edgekd.fileio import held_output

    out = tmp_path / "bundle"
    with held_output(out, "export"):
        assert_refused(invoke(capsys, "export", trained["ckpt"], "--format", "onnx", "--precision", "fp32",
                              "--out", out), f"{out}: another edgekd export is writing it now")
        probe = ("import sys; from edgekd.fileio import held_output\n"
                 "try:\n    with held_output(sys.argv[1], 'update'): print('got it')\n"
                 "except Exception as e: print(e)")
        other = subprocess.run([sys.executable, "-c", probe, str(out)], capture_output=True, text=True, check=True)
        assert "another edgekd export is writing it now" in other.stdout  # another process: the holder is named
    assert list(tmp_path.iterdir()) == []  # nothing written; the lock file is gone with the lock
    (tmp_path / ".bundle.edgekd-lock").write_text("")  # one a killed process left: taken over
    with held_output(out, "export"):
        pass
    assert list(tmp_path.iterdir()) == []
    # a refused export into a new folder leaves no empty folders behind (the lock had made them)
    assert_refused(invoke(capsys, "export", tmp_path / "gone.pt", "--out", tmp_path / "x" / "deep" / "b"), "gone.pt")
    assert list(tmp_path.iterdir()) == []


def test_an_output_lock_leaves_a_stop_signal_to_unwind_and_goes_with_an_export_ended_at_once(tmp_path):
    """Registered as a tracked tree, the lock made the signal handler end `edgekd update`'s training at once,
    skipping every cleanup (tracking, finally blocks); it is now removed only with the trees of an export ended so."""
    from edgekd import fileio

    out = tmp_path / "bundle"
    trees = set(fileio.TRACKED_TREES)
    with fileio.held_output(out, "update"):
        lock = tmp_path / ".bundle.edgekd-lock"
        assert fileio.TRACKED_TREES == trees and lock in fileio.TRACKED_LOCKS and lock.is_file()
        fileio.remove_tracked_trees()  # what a stop signal during an export runs before os._exit
        assert not lock.exists() and lock not in fileio.TRACKED_LOCKS
    assert list(tmp_path.iterdir()) == []
