"""The README's "bring your own images" path, end to end: a generated ImageFolder of JPEGs at 64 px through the
full-size pneumonia recipes (check, teacher, distilled student, export, predict --tta)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import REPO
from edgekd.cli import app


def write_jpeg_folder(root, per_class: int = 20, seed: int = 0):
    """root/{normal,pneumonia}/*.jpg, 64-80 px wide RGB JPEGs; pneumonia images carry a bright blob."""
    rng = np.random.default_rng(seed)
    for label in ("normal", "pneumonia"):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            w = int(rng.integers(64, 81))
            img = rng.integers(40, 90, size=(64, w, 3), dtype=np.uint8)
            if label == "pneumonia":
                y, x = rng.integers(10, 40, 2)
                img[y:y + 20, x:x + 20] += 120
            Image.fromarray(img).save(root / label / f"{label}_{i}.jpg", quality=90)
    return root


@pytest.mark.slow
def test_bring_your_own_jpegs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the student recipe names its teacher_recipe relative to the repository
    scans = write_jpeg_folder(tmp_path / "my_scans")
    common = ["--set", f"data.path={scans}", "--set", "data.image_size=64", "--set", "data.resize=72",
              "--set", "model.pretrained=false", "--set", "data.batch_size=8", "--set", "data.num_workers=0",
              "--set", "train.epochs=1"]
    cli = CliRunner()

    res = cli.invoke(app, ["check", "recipes/pneumonia/teacher.yaml", *common])
    assert res.exit_code == 0, res.output
    assert "check ok (supervised)" in res.output and "train images" in res.output

    teacher = tmp_path / "teacher"
    res = cli.invoke(app, ["train", "recipes/pneumonia/teacher.yaml", *common, "--out", str(teacher)])
    assert res.exit_code == 0, res.output
    metrics = json.loads((teacher / "metrics.json").read_text())
    assert metrics["model"] == "resnet50" and sum(metrics["counts"]["test"]) == 6  # 15% of 40, stratified
    student = tmp_path / "student"
    res = cli.invoke(app, ["train", "recipes/pneumonia/student.yaml", *common,
                           "--set", f"distill.teacher={teacher / 'best.pt'}", "--out", str(student)])
    assert res.exit_code == 0, res.output

    bundle = tmp_path / "bundle"
    res = cli.invoke(app, ["export", str(student / "best.pt"), "--out", str(bundle), "--parity-images", "8"])
    assert res.exit_code == 0, res.output
    meta = json.loads((bundle / "edgekd.json").read_text())
    assert meta["model"]["name"] == "mobilenetv3_large_100" and meta["preprocess"]["input_size"] == [3, 64, 64]
    assert meta["class_names"] == ["normal", "pneumonia"]

    out = tmp_path / "preds.csv"
    res = cli.invoke(app, ["predict", str(bundle), str(scans / "pneumonia"), "--tta", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = out.read_text().strip().splitlines()
    assert len(rows) == 1 + 20 and all(r.split(",")[1] in ("normal", "pneumonia") for r in rows[1:])
