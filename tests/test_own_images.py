"""The README's "bring your own images" path, end to end: a generated ImageFolder of JPEGs at 64 px through the
full-size pneumonia recipes (check, teacher, distilled student, export, predict --tta)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import REPO
from edgekd.cli import app
from edgekd.errors import EdgeKDError


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


def tiny_folder_args(scans) -> list[str]:
    """`--set` values that train the demo baseline recipe's tiny CNN on an image folder in seconds."""
    return ["--set", "data.source=imagefolder", "--set", f"data.path={scans}", "--set", "data.image_size=28",
            "--set", "data.resize=28", "--set", "model.name=edgekd_cnn_tiny", "--set", "train.epochs=1",
            "--set", "data.num_workers=0"]


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
    epoch = re.search(r"per epoch\s*│\s*([0-9.e+-]+) s \(", res.output)
    assert epoch and float(epoch.group(1)) > 0, res.output  # a fraction of a second had been shown as "0 s"

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


def test_eval_report_and_export_refuse_a_folder_whose_splits_changed_since_training(tmp_path, monkeypatch):
    """Splits drawn again from a folder that had grown put images the model trained on into test (14 of 21 in a
    re-trial), and eval, report and the export's calibration scored them without a word. A copy of the same
    folder elsewhere (`--set data.path=`) is the same data."""
    import shutil

    monkeypatch.chdir(REPO)
    scans = write_jpeg_folder(tmp_path / "scans", per_class=16)
    common, cli, run = tiny_folder_args(scans), CliRunner(), tmp_path / "run"
    res = cli.invoke(app, ["train", "recipes/demo/baseline.yaml", *common, "--out", str(run)])
    assert res.exit_code == 0, res.output
    moved = tmp_path / "moved"
    shutil.copytree(scans, moved)
    res = cli.invoke(app, ["report", str(run), "--set", f"data.path={moved}", "--out", str(tmp_path / "rep0")])
    assert res.exit_code == 0, res.output  # the same images in another folder: the same splits
    res = cli.invoke(app, ["eval", str(run / "best.pt"), "--set", "data.num_workers=0", "--out", str(tmp_path / "e0")])
    assert res.exit_code == 0, res.output

    write_jpeg_folder(tmp_path / "more", per_class=8, seed=1)
    for label in ("normal", "pneumonia"):
        for f in (tmp_path / "more" / label).iterdir():
            shutil.copy(f, scans / label / f"new_{f.name}")
    for args in (["eval", str(run / "best.pt"), "--out", str(tmp_path / "ev")],
                 ["report", str(run), "--out", str(tmp_path / "rep")],
                 ["export", str(run / "best.pt"), "--out", str(tmp_path / "bundle"), "--parity-images", "4"],
                 ["train", "recipes/demo/baseline.yaml", *common, "--out", str(run), "--resume"]):  # train too
        res = cli.invoke(app, args)
        assert "its data's splits are not the ones it was trained with (" in str(res.exception), res.output
        assert not (tmp_path / "bundle").exists()
    from edgekd.errors import EdgeKDError
    from edgekd.robustness.evaluate import run_failure_analysis

    with pytest.raises(EdgeKDError, match=r"best.pt: its data's splits are not the ones it was trained with \(test: "):
        run_failure_analysis(run, tmp_path / "failures")  # a run directory: its best.pt, loaded once


def test_eval_of_a_checkpoint_scores_every_image_of_a_separate_labelled_folder(tmp_path, monkeypatch):
    """The README's way to score new images: `eval CHECKPOINT --data DIR`. A recipe pointing at the folder scored
    only the test split it carved (6 of 40 in a re-trial), and the table never said how many images it scored."""
    monkeypatch.chdir(REPO)
    scans = write_jpeg_folder(tmp_path / "scans", per_class=12)
    new = write_jpeg_folder(tmp_path / "new", per_class=7, seed=3)
    common, cli, run = tiny_folder_args(scans), CliRunner(), tmp_path / "run"
    res = cli.invoke(app, ["train", "recipes/demo/baseline.yaml", *common, "--out", str(run)])
    assert res.exit_code == 0, res.output
    listing = json.loads((run / "splits.json").read_text())  # which files each split held, for an audit
    assert sorted(f for s in ("train", "val", "test") for f in listing[s]["files"]) == sorted(
        str(p) for p in scans.rglob("*.jpg")) and listing["class_names"] == ["normal", "pneumonia"]
    import edgekd.robustness.evaluate as evaluate

    monkeypatch.setattr(evaluate, "FOLDER_CHUNK", 3)  # scored a chunk at a time: the chunks add up to the folder
    res = cli.invoke(app, ["eval", str(run / "best.pt"), "--data", str(new), "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["folder"]["n"] == 14 and sum(map(sum, metrics["folder"]["confusion_matrix"])) == 14
    assert "(14 images)" in res.output and (tmp_path / "ev" / "confusion_folder.png").is_file()
    # the training folder itself is not "new images": refused, not scored as if unseen
    res = cli.invoke(app, ["eval", str(run / "best.pt"), "--data", str(scans), "--out", str(tmp_path / "ev3")])
    assert res.exit_code != 0 and "the folder the checkpoint was trained on" in str(res.exception)
    import shutil  # a folder without one class: AUC and the per-class figures undefined, said (they were null silently)

    shutil.copytree(new / "normal", tmp_path / "one" / "normal")
    res = cli.invoke(app, ["eval", str(run / "best.pt"), "--data", str(tmp_path / "one"), "--out", str(tmp_path / "e1")])
    assert res.exit_code == 0 and ("holds no images of pneumonia: AUC, PR-AUC and pAUC are undefined on it (null, "
                                   "shown as -); the sensitivity or specificity of that class too") in " ".join(
        res.output.split()), res.output
    assert json.loads((tmp_path / "e1" / "metrics.json").read_text())["folder"]["auc"] is None
    # --failures on a folder (it had been refused: "--failures take a data recipe", while the README listed it)
    res = cli.invoke(app, ["eval", str(run / "best.pt"), "--data", str(new), "--failures", "--out",
                           str(tmp_path / "ev2")])
    assert res.exit_code == 0, res.output
    failures = json.loads((tmp_path / "ev2" / "failures.json").read_text())
    assert failures["images"] == 14 and failures["split"] == str(new) and (tmp_path / "ev2" / "failures.png").is_file()
    assert failures["errors"] == 14 - round(metrics["folder"]["acc"] * 14)  # the same images, the same model
    res = cli.invoke(app, ["eval", str(run / "best.pt"), "--data", str(scans), "--failures", "--corruptions",
                           "--only", "contrast", "--severities", "1", "--out", str(tmp_path / "ev4")])
    assert res.exit_code != 0 and "the folder the checkpoint was trained on" in str(res.exception)
    assert not (tmp_path / "ev4").exists()
    for analysis in (lambda: evaluate.run_failure_analysis(run / "best.pt", tmp_path / "ev6", data_folder=scans),
                     lambda: evaluate.run_corruption_eval([run / "best.pt"], tmp_path / "ev6", data_folder=scans)):
        with pytest.raises(EdgeKDError, match="the folder the checkpoint was trained on"):  # the Python API's too
            analysis()
    res = cli.invoke(app, ["eval", str(run / "best.pt"), "--data", str(new), "--set", "data.limit=3", "--out",
                           str(tmp_path / "ev5")])
    assert res.exit_code != 0 and "--set takes a data recipe" in str(res.exception)


def test_eval_data_of_the_trained_datas_own_test_folder_says_so(tmp_path):
    """`eval CKPT --data ROOT/test` (the given test split of the data it trained on) was refused as holding training
    images, which it does not: it is the checkpoint's own test split, which `edgekd eval CKPT` scores."""
    from edgekd.robustness.evaluate import refuse_training_folder

    for split in ("train", "Testing"):
        (tmp_path / "oct" / split).mkdir(parents=True)
    trained = {"recipe": {"data": {"path": str(tmp_path / "oct")}}}
    with pytest.raises(EdgeKDError) as err:
        refuse_training_folder(tmp_path / "oct" / "Testing", trained, "run/best.pt")
    assert str(err.value) == (f"--data {tmp_path / 'oct' / 'Testing'}: the test split folder of the data the "
                              f"checkpoint was trained on (data.path {tmp_path / 'oct'}): `edgekd eval run/best.pt` "
                              "scores it as the checkpoint's test split")
    for folder in (tmp_path / "oct" / "train", tmp_path / "oct"):
        with pytest.raises(EdgeKDError, match="the folder the checkpoint was trained on"):
            refuse_training_folder(folder, trained, "run/best.pt")
    refuse_training_folder(tmp_path / "elsewhere", trained, "run/best.pt")  # new images: scored
