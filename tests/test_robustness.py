"""Corruptions (deterministic, growing with severity, shape/dtype kept) and the corruption evaluation."""

from __future__ import annotations

import numpy as np
import pytest

from edgekd.errors import EdgeKDError
from edgekd.robustness.corruptions import CORRUPTIONS, SEVERITIES, corrupt


def textured(size: int = 28, channels: int = 1, seed: int = 0) -> np.ndarray:
    """A mid-grey image with smooth structure and fine texture (every corruption has something to change)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    img = 100 + 60 * np.sin(xx / 3.0) * np.cos(yy / 4.0) + rng.integers(0, 30, (size, size))
    return np.repeat(img.astype(np.uint8)[..., None], channels, axis=-1)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
@pytest.mark.parametrize("channels", [1, 3])
def test_corruption_is_deterministic_and_grows_with_severity(name, channels):
    img = textured(28, channels)
    changes = []
    for severity in SEVERITIES:
        out = corrupt(img, name, severity, seed=3, index=7)
        assert out.shape == img.shape and out.dtype == np.uint8
        assert np.array_equal(out, corrupt(img.copy(), name, severity, seed=3, index=7))
        changes.append(np.abs(out.astype(np.float64) - img).mean())
    assert changes[0] > 0.5, f"{name} severity 1 barely changes the image"
    assert all(b > a for a, b in zip(changes, changes[1:])), f"{name}: change per severity {changes}"


@pytest.mark.parametrize("name", ["gaussian_noise", "speckle_noise", "motion_blur"])
def test_random_corruptions_depend_on_seed_and_image_index(name):
    img = textured(32)
    a = corrupt(img, name, 3, seed=0, index=0)
    assert not np.array_equal(a, corrupt(img, name, 3, seed=1, index=0))
    assert not np.array_equal(a, corrupt(img, name, 3, seed=0, index=1))


def test_corrupt_accepts_2d_and_rejects_bad_input():
    img = textured(16)[..., 0]
    assert corrupt(img, "pixelate", 5).shape == (16, 16)
    with pytest.raises(EdgeKDError, match="unknown corruption 'fog'"):
        corrupt(img, "fog", 1)
    with pytest.raises(EdgeKDError, match="1..5"):
        corrupt(img, "contrast", 6)
    with pytest.raises(EdgeKDError, match="uint8"):
        corrupt(img.astype(np.float32), "contrast", 1)


def test_corruptions_are_scored_a_chunk_of_decoded_images_at_a_time(monkeypatch):
    """The corruption eval decoded the whole split, then made a corrupted copy of it per condition (a folder of
    full-size scans: tens of GB). Now a chunk is decoded once and every condition and model run on it: the same
    figures as in one piece, each image read once."""
    import edgekd.robustness.evaluate as evaluate

    rng = np.random.default_rng(1)
    pixels = [rng.integers(0, 256, (12, 12, 1), dtype=np.uint8) for _ in range(10)]
    labels = np.array([0, 1] * 5)

    class Counted:
        reads = 0

        def __len__(self):
            return len(pixels)

        def __getitem__(self, i):
            Counted.reads += 1
            return pixels[i]

    def model(batch):  # brighter images lean to class 1
        score = np.array([b.mean() / 255.0 for b in batch])
        return np.stack([1 - score, score], axis=1)

    predictors = [evaluate.Predictor("m", "student", "onnx", "fp32", ["a", "b"], model)]
    args = (["gaussian_noise", "brightness"], [1, 4])
    whole = evaluate.corruption_records(predictors, pixels, labels, *args, log=lambda *_: None, positions=range(10))
    monkeypatch.setattr(evaluate, "FOLDER_CHUNK", 3)
    chunked = evaluate.corruption_records(predictors, Counted(), labels, *args, log=lambda *_: None,
                                          positions=range(10))
    assert chunked == whole and Counted.reads == 10


def test_brightness_and_contrast_of_an_rgb_image_are_imagenet_cs():
    """ImageNet-C adds c to HSV's value (the channels scale together) and pulls each channel toward its own mean:
    +c on each RGB channel had washed colors out, one mean over all channels had shifted the hue."""
    import colorsys

    from edgekd.robustness.corruptions import PARAMS

    rgb = np.random.default_rng(0).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    rgb[0, 0] = 0  # black: no hue, becomes gray
    c = PARAMS["brightness"][2]
    out = corrupt(rgb, "brightness", 3)
    for y, x in np.ndindex(6, 6):
        h, s, v = colorsys.rgb_to_hsv(*(rgb[y, x] / 255.0))
        want = np.array(colorsys.hsv_to_rgb(h, s, min(1.0, v + c))) * 255
        assert np.abs(out[y, x].astype(float) - want).max() <= 0.51, (y, x)
    gray = rgb[..., :1]
    assert np.array_equal(corrupt(gray, "brightness", 3)[..., 0],
                          (np.clip(gray[..., 0] / np.float32(255.0) + np.float32(c), 0, 1) * 255 + 0.5).astype(np.uint8))
    tinted = np.zeros((8, 8, 3), np.uint8)
    tinted[..., 0], tinted[..., 2] = 200, 20
    assert np.array_equal(corrupt(tinted, "contrast", 5), tinted)  # each channel at its mean already


# ---------------------------------------------------------------- evaluation on checkpoints and bundles

import json  # noqa: E402

from conftest import run_edgekd, tiny_recipe, write_npz  # noqa: E402
from edgekd.metrics.failures import confused_pairs  # noqa: E402
from edgekd.recipe import recipe_from_dict  # noqa: E402
from edgekd.train.checkpoint import load_checkpoint  # noqa: E402
from edgekd.robustness.evaluate import (CLEAN, corruption_summary, load_split_images,  # noqa: E402
                                        run_corruption_eval)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """edgekd_cnn_tiny trained 3 epochs on learnable 16-px images (class = where the bright square is)."""
    from edgekd.train.run import train_recipe

    root = tmp_path_factory.mktemp("robust")
    npz = write_npz(root / "tiny.npz", n=(64, 24, 40))
    raw = tiny_recipe(npz, batch_size=16, epochs=3)
    return train_recipe(recipe_from_dict(raw), root / "run", log=lambda *_: None).best_path


def test_checkpoint_corruption_eval_clean_row_equals_plain_eval(tiny_run, tmp_path):
    from edgekd.train.run import evaluate_checkpoint

    res = run_corruption_eval([tiny_run], tmp_path, corruptions=["contrast", "gaussian_noise"], severities=[1, 5],
                              log=lambda *_: None)
    recs = res["records"]
    assert [(r["corruption"], r["severity"]) for r in recs] == [
        (CLEAN, 0), ("contrast", 1), ("contrast", 5), ("gaussian_noise", 1), ("gaussian_noise", 5)]
    assert all(set(r) >= {"model", "role", "format", "precision", "corruption", "severity", "acc", "auc"} for r in recs)
    plain = evaluate_checkpoint(tiny_run, tmp_path / "plain", None, ("test",))["test"]
    assert recs[0]["acc"] == pytest.approx(plain["acc"]) and recs[0]["auc"] == pytest.approx(plain["auc"])
    (s,) = res["summary"]
    corrupted = [r["acc"] for r in recs[1:]]
    assert s["mean_corruption_acc"] == pytest.approx(sum(corrupted) / 4)
    assert s["relative_acc"] == pytest.approx(s["mean_corruption_acc"] / s["clean_acc"])
    assert s["per_corruption_acc"]["contrast"] == pytest.approx((recs[1]["acc"] + recs[2]["acc"]) / 2)
    saved = json.loads((tmp_path / "robustness.json").read_text())
    assert saved["records"] == recs and (tmp_path / "robustness.png").stat().st_size > 1000
    assert "mean corr. acc" in (tmp_path / "robustness.md").read_text()


def test_an_eval_at_another_image_size_says_so_and_records_it(tiny_run, tmp_path):
    """`eval --set data.image_size=24` scored at 24 px, and neither the output nor metrics.json said so."""
    from edgekd.train.checkpoint import load_checkpoint
    from edgekd.train.run import evaluate_checkpoint

    raw = load_checkpoint(tiny_run)["recipe"]
    said = []
    same = evaluate_checkpoint(tiny_run, tmp_path / "same", recipe_from_dict(raw), ("test",), log=said.append)
    assert same["image_size"] == 16 and not any("scoring at" in s for s in said)
    other = evaluate_checkpoint(tiny_run, tmp_path / "other", recipe_from_dict({**raw, "data": {**raw["data"],
                                "image_size": 24}}), ("test",), log=said.append)
    assert [s for s in said if "scoring at" in s] == [f"note: scoring at 24 px; {tiny_run} was trained at 16 px"]
    assert json.loads((tmp_path / "other" / "metrics.json").read_text())["image_size"] == other["image_size"] == 24


def test_summary_of_hand_made_records():
    rec = lambda c, s, acc: {"model": "m", "role": "student", "format": "onnx", "precision": "int8",  # noqa: E731
                             "corruption": c, "severity": s, "acc": acc, "auc": 0.5 + acc / 2}
    (s,) = corruption_summary([rec(CLEAN, 0, 0.8), rec("blur", 1, 0.6), rec("blur", 2, 0.4), rec("noise", 1, 0.2)])
    assert s["mean_corruption_acc"] == pytest.approx(0.4) and s["relative_acc"] == pytest.approx(0.5)
    assert s["acc_drop_pts"] == pytest.approx(40.0) and s["per_corruption_acc"] == pytest.approx({"blur": 0.5, "noise": 0.2})
    from edgekd.robustness.evaluate import corruption_markdown

    one_class = [{**r, "auc": float("nan")} for r in (rec(CLEAN, 0, 0.0), rec("blur", 1, 0.0))]  # and acc 0
    (row,) = corruption_summary(one_class)
    assert corruption_markdown([row]).splitlines()[-1] == "| m | student | onnx/int8 | 0.0000 | - | 0.0000 | 0.0000 | - | - |"


@pytest.mark.slow
def test_bundle_artifacts_see_the_same_corrupted_pixels_as_pytorch(tiny_run, tmp_path):
    from edgekd.export import export_checkpoint

    bundle = tmp_path / "bundle"
    export_checkpoint(tiny_run, bundle, ["onnx", "openvino"], ["fp32"], log=lambda *_: None)
    # the deployment card shows Grad-CAM overlays of test images, each listed in the hashed manifest
    card, manifest = (bundle / "card.md").read_text(), (bundle / "manifest.sha256").read_text()
    overlays = sorted(p.name for p in (bundle / "explain").glob("*_gradcam.png"))
    assert len(overlays) == 4 and "## Where the model looks (Grad-CAM)" in card
    assert all(f"(explain/{name})" in card and f"explain/{name}" in manifest for name in overlays)
    res = run_corruption_eval([tiny_run, bundle], tmp_path / "ev", corruptions=["pixelate", "motion_blur"],
                              severities=[2, 5], log=lambda *_: None)
    by_fmt: dict[str, list[float]] = {}
    for r in res["records"]:
        by_fmt.setdefault(r["format"], []).append(r["acc"])
    assert set(by_fmt) == {"torch", "onnx", "openvino"}
    n = res["images"]
    for fmt in ("onnx", "openvino"):  # FP32 artifacts agree with PyTorch to within one image per condition
        assert all(abs(a - b) <= 1 / n + 1e-9 for a, b in zip(by_fmt[fmt], by_fmt["torch"])), (fmt, by_fmt)


def test_confused_pairs_on_hand_made_predictions():
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    probs = np.array([[.9, .1, 0], [.2, .7, .1], [.1, .8, .1],      # two 0 -> 1 (p .7, .8)
                      [0, 1, 0], [.6, .4, 0],                        # one 1 -> 0
                      [0, .3, .7], [.1, .6, .3], [.2, .55, .25], [.3, .1, .6]])  # two 2 -> 1 (p .6, .55)
    pairs = confused_pairs(y, probs, top=2)
    assert [(p["true"], p["pred"], p["count"]) for p in pairs] == [(0, 1, 2), (2, 1, 2)]
    assert pairs[0]["indices"] == [2, 1] and pairs[0]["rate"] == pytest.approx(2 / 3)   # most confident first
    assert pairs[1]["indices"] == [6, 7] and pairs[1]["rate"] == pytest.approx(0.5)
    assert confused_pairs(y, np.eye(3)[y]) == []


@pytest.mark.slow
def test_eval_cli_corruptions_and_failures(tiny_run, tmp_path):
    out = tmp_path / "ev"
    p = run_edgekd("eval", tiny_run, "--corruptions", "--only", "brightness,jpeg_compression", "--severities", "3",
                   "--failures", "--out", out)
    assert p.returncode == 0, p.stderr
    assert "mean corr. acc" in p.stdout
    rob = json.loads((out / "robustness.json").read_text())
    assert {r["corruption"] for r in rob["records"]} == {CLEAN, "brightness", "jpeg_compression"}
    fail = json.loads((out / "failures.json").read_text())
    images, _, _, _, _ = load_split_images(recipe_from_dict(load_checkpoint(tiny_run)["recipe"]))
    assert fail["images"] == len(images) and sum(p["count"] for p in fail["pairs"]) <= fail["errors"]
    assert fail["probabilities"] == "the model's softmax" and "; p: the model's softmax" in p.stderr  # not a bundle's
    assert (out / "failures.png").is_file() and (out / "metrics.json").is_file()
    p = run_edgekd("eval", tiny_run, "--corruptions", "--only", "fog", "--out", out)
    assert p.returncode == 2 and "unknown corruption 'fog'" in p.stderr and "Traceback" not in p.stderr
    # refused before the plain evaluation writes anything (it wrote metrics.json and plots, then failed)
    for args, words in ((["--corruptions", "--severities", "9"], "severity must be 1..5, got 9"),
                        (["--only", "brightness"], "--only and --severities choose the corruptions of --corruptions"),
                        (["--split", ","], "no split given"),
                        (["--split", ""], "no split given"),  # it had scored test
                        (["--split", "val,val"], "--split val,val: val is given twice"),  # rows and files twice
                        (["--corruptions", "--only", ","], "--only ',': nothing given"),
                        (["--corruptions", "--severities", "1,1"], "a value given twice"),  # counted twice in means
                        (["--corruptions", "--split", "val,test"], "score one split"),  # ran on val alone
                        (["--limit", "5"], "--limit is an option of --corruptions, which was not given"),  # ignored
                        (["--failures", "--compare", str(tiny_run)], "--compare is an option of --corruptions"),
                        (["--corruptions", "--top", "3"], "--top is an option of --failures, which was not given")):
        p = run_edgekd("eval", tiny_run, *args, "--out", tmp_path / "refused")
        assert p.returncode == 2 and words in p.stderr and not (tmp_path / "refused").exists(), p.stderr


def test_eval_refused_half_way_leaves_out_as_it_was(tiny_run, tmp_path, monkeypatch):
    """A corruption eval refused after the plain evaluation wrote metrics.json and plots (a --compare of other
    classes) left them behind in a new --out, and said it wrote them; in a folder holding an earlier evaluation it
    left the new metrics.json beside the earlier robustness files. Now --out is as it was, with no staging left."""
    from typer.testing import CliRunner

    import edgekd.robustness.evaluate as evaluate
    from edgekd.cli import app
    from edgekd.errors import EdgeKDError

    def refuse(*_, **__):
        raise EdgeKDError("corruption eval: all models must have the data's classes")

    monkeypatch.setattr(evaluate, "run_corruption_eval", refuse)
    out = tmp_path / "new"
    result = CliRunner().invoke(app, ["eval", str(tiny_run), "--corruptions", "--out", str(out)])
    assert result.exit_code != 0 and not out.exists() and "wrote" not in result.output
    kept = tmp_path / "kept"
    kept.mkdir()
    earlier = {"metrics.json": "{\"checkpoint\": \"earlier.pt\"}", "robustness.json": "{}", "confusion_test.png": "earlier"}
    for name, text in earlier.items():
        (kept / name).write_text(text)
    result = CliRunner().invoke(app, ["eval", str(tiny_run), "--corruptions", "--out", str(kept)])
    assert result.exit_code != 0 and {p.name: p.read_text() for p in kept.iterdir()} == earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]  # no staging folder beside it
    result = CliRunner().invoke(app, ["eval", str(tiny_run), "--out", str(kept)])  # a plain eval replaces its files
    assert result.exit_code == 0 and (kept / "metrics.json").read_text() != "{}"
    assert (kept / "robustness.json").read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == ["kept"]
    # an earlier eval's plot of a split the new metrics.json does not hold goes; another tool's plots stay
    (kept / "metrics.json").write_text(json.dumps({"checkpoint": "x.pt", "train": {}, "test": {}}))
    for name in ("roc_train.png", "roc_pneumonia.png", "confusion_task1.png", "confusion_val.png"):
        (kept / name).write_text("earlier")
    result = CliRunner().invoke(app, ["eval", str(tiny_run), "--out", str(kept)])
    assert result.exit_code == 0 and not (kept / "roc_train.png").exists() and (kept / "roc_test.png").is_file()
    assert all((kept / n).is_file() for n in ("roc_pneumonia.png", "confusion_task1.png", "confusion_val.png"))
    (tmp_path / "a_file").write_text("x")  # refused before the work (it failed at its end, after scoring)
    result = CliRunner().invoke(app, ["eval", str(tiny_run), "--out", str(tmp_path / "a_file")])
    assert result.exit_code != 0 and "is a file, not a folder" in str(result.exception)
    assert (tmp_path / "a_file").read_text() == "x"


def test_limit_picks_the_same_images_whatever_the_seed(tiny_run, tmp_path):
    """--seed seeds the corruptions' noise alone: the --limit subset (and so the clean row) is the same; it had
    drawn another subset per seed, mixing subset variance into the noise's."""
    runs = [run_corruption_eval([tiny_run], tmp_path / f"s{seed}", corruptions=["gaussian_noise"], severities=[5],
                                seed=seed, limit=10, log=lambda *_: None) for seed in (0, 1)]
    assert runs[0]["class_counts"] == runs[1]["class_counts"]
    assert runs[0]["records"][0] == runs[1]["records"][0]  # the clean row
    assert runs[0]["records"][1]["corruption"] == "gaussian_noise"


def test_an_image_gets_the_same_noise_whatever_the_limit(tiny_run, tmp_path, monkeypatch):
    """The noise was keyed by the image's place in the --limit subset, so one image was corrupted differently
    under --limit 5 and without it; it is keyed by its position in the split now."""
    import edgekd.robustness.evaluate as evaluate

    real, seen = evaluate.corrupt, {}

    def spy(image, name, severity, seed, index):
        seen.setdefault(index, set()).add(image.tobytes())
        return real(image, name, severity, seed, index)

    monkeypatch.setattr(evaluate, "corrupt", spy)
    for limit in (None, 5):
        run_corruption_eval([tiny_run], tmp_path / f"l{limit}", corruptions=["gaussian_noise"], severities=[1],
                            limit=limit, log=lambda *_: None)
    assert len(seen) > 5 and all(len(images) == 1 for images in seen.values())  # one image per noise key


def test_multi_head_checkpoints_are_refused_and_single_head_continual_ones_need_data(tmp_path, monkeypatch):
    import edgekd.robustness.evaluate as evaluate
    from edgekd.errors import EdgeKDError

    monkeypatch.setattr("edgekd.train.checkpoint.model_from_checkpoint",
                        lambda path: (None, {"continual": {"head": "multi"}, "recipe": {}}))
    with pytest.raises(EdgeKDError, match=r"model.pt: one head per task; give --task \(\): one softmax over every "
                                          r"head's outputs would mix the tasks \(`edgekd eval` without --data DIR"):
        evaluate.checkpoint_predictor(tmp_path / "model.pt")
    (tmp_path / "model.pt").write_bytes(b"")
    monkeypatch.setattr("edgekd.train.checkpoint.load_checkpoint",
                        lambda path: {"continual": {"head": "single"}, "recipe": {"name": "cl"}})
    with pytest.raises(EdgeKDError, match="learned several tasks' data; give the data to score with --data"):
        evaluate._recipe_of_first_checkpoint([tmp_path / "model.pt"])


def test_compare_takes_a_run_folder_and_refuses_a_multi_head_model_before_any_output(tiny_run, tmp_path):
    """`--compare RUN_DIR` was refused ("a folder that is not an edgekd bundle") though the corruption eval reads a
    run folder's best.pt; a multi-head --compare was refused only after the main evaluation had printed its table."""
    from typer.testing import CliRunner

    from edgekd.cli import app
    from edgekd.train.checkpoint import save_checkpoint

    (tmp_path / "run2").mkdir()
    (tmp_path / "run2" / "best.pt").write_bytes(tiny_run.read_bytes())
    res = CliRunner().invoke(app, ["eval", str(tiny_run), "--corruptions", "--compare", str(tmp_path / "run2"),
                                   "--only", "contrast", "--severities", "1", "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    # the same model twice (its run folder) gave its rows twice; a model of other classes was refused only after
    # the main evaluation had printed its table
    res = CliRunner().invoke(app, ["eval", str(tiny_run), "--corruptions", "--compare", str(tiny_run.parent),
                                   "--out", str(tmp_path / "ev1")])
    assert res.exit_code != 0 and f"{tiny_run.parent}: given twice (as {tiny_run} too)" in str(res.exception)
    ckpt = load_checkpoint(tiny_run)
    save_checkpoint(tmp_path / "three.pt", {**{k: v for k, v in ckpt.items() if k != "format"},
                                            "class_names": ["a", "b", "c"]})
    res = CliRunner().invoke(app, ["eval", str(tiny_run), "--corruptions", "--compare", str(tmp_path / "three.pt"),
                                   "--out", str(tmp_path / "ev1")])
    assert res.exit_code != 0 and f"--compare {tmp_path / 'three.pt'}: 3 classes, {tiny_run} has 2" in str(
        res.exception)
    assert "acc" not in res.output and not (tmp_path / "ev1").exists()
    names = list(ckpt["class_names"])
    save_checkpoint(tmp_path / "swapped.pt", {**{k: v for k, v in ckpt.items() if k != "format"},
                                              "class_names": names[::-1]})
    res = CliRunner().invoke(app, ["eval", str(tiny_run), "--corruptions", "--compare", str(tmp_path / "swapped.pt"),
                                   "--out", str(tmp_path / "ev1")])
    assert res.exit_code != 0 and "its classes are" in str(res.exception) and "in another order" in str(res.exception)
    save_checkpoint(tmp_path / "multi.pt", {**{k: v for k, v in ckpt.items() if k != "format"},
                                            "continual": {"head": "multi", "tasks": []}})
    res = CliRunner().invoke(app, ["eval", str(tiny_run), "--corruptions", "--compare", str(tmp_path / "multi.pt"),
                                   "--out", str(tmp_path / "ev2")])
    assert res.exit_code != 0 and "one head per task" in str(res.exception)
    assert "acc" not in res.output and not (tmp_path / "ev2").exists()  # no table printed before the refusal
    # The multi-head checkpoint itself under --corruptions / --failures: refused before its per-task eval runs (its
    # message had sent the user to --data, which was refused again after a second eval).
    for flag in ("--corruptions", "--failures"):
        res = CliRunner().invoke(app, ["eval", str(tmp_path / "multi.pt"), flag, "--out", str(tmp_path / "ev3")])
        assert res.exit_code != 0 and "one head per task" in str(res.exception)
        assert "acc" not in res.output and not (tmp_path / "ev3").exists()


def test_two_sources_with_one_model_name_stay_two_rows(tiny_run, tmp_path):
    """`eval A --corruptions --compare B` of two checkpoints of one architecture and role (two seeds, two
    versions) had merged them into one row of the summary: A's clean figures, the corrupted ones averaged over
    both."""
    from edgekd.train.checkpoint import save_checkpoint

    ckpt = load_checkpoint(tiny_run)
    ckpt["state_dict"] = {k: -v if k.startswith("fc.") else v for k, v in ckpt["state_dict"].items()}  # inverted
    save_checkpoint(tmp_path / "other.pt", {k: v for k, v in ckpt.items() if k != "format"})
    res = run_corruption_eval([tiny_run, tmp_path / "other.pt"], tmp_path / "ev", corruptions=["contrast"],
                              severities=[1], log=lambda *_: None)
    a, b = res["summary"]
    assert a["model"] == f"edgekd_cnn_tiny [{tiny_run}]" and b["model"] == f"edgekd_cnn_tiny [{tmp_path / 'other.pt'}]"
    assert a["clean_acc"] + b["clean_acc"] == pytest.approx(1.0)  # the inverted head calls every image the other way
    assert len(res["records"]) == 4 and f"[{tmp_path / 'other.pt'}]" in (tmp_path / "ev" / "robustness.md").read_text()


def test_failure_analysis_refuses_data_of_another_class_count(tiny_run, tmp_path):
    """`eval --failures --data` never compared the model's classes with the data's: 5-class data for a 2-class
    model ran and labelled its pairs with the data's class names; a model of more classes failed with an
    IndexError."""
    import yaml

    from edgekd.robustness.evaluate import run_failure_analysis

    npz = write_npz(tmp_path / "five.npz", n=(20, 20, 20), classes=5)
    (tmp_path / "five.yaml").write_text(yaml.safe_dump(tiny_recipe(npz)))
    with pytest.raises(EdgeKDError, match=r"the model has 2 classes .*the data has 5"):
        run_failure_analysis(tiny_run, tmp_path / "f", recipe_from_dict(tiny_recipe(npz)), log=lambda *_: None)
    p = run_edgekd("eval", tiny_run, "--failures", "--data", tmp_path / "five.yaml", "--out", tmp_path / "cli")
    assert p.returncode == 2 and "the data has 5" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "cli").exists()


def test_failures_on_a_labelled_folder_name_the_files(tiny_run, tmp_path):
    """failures.json and the console named a mistake only by its position in an internal listing (#81): a clinician
    could not find the scan."""
    from pathlib import Path

    from PIL import Image

    from edgekd.robustness.evaluate import run_failure_analysis
    from edgekd.train.checkpoint import load_checkpoint

    names = load_checkpoint(tiny_run)["class_names"]
    rng = np.random.default_rng(0)
    for name in names:
        (tmp_path / "scans" / name).mkdir(parents=True)
        for i in range(12):  # noise: the model gets some of each class wrong
            pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "scans" / name / f"{i}.png")
    res = run_failure_analysis(tiny_run, tmp_path / "f", data_folder=tmp_path / "scans", log=lambda *_: None)
    assert res["pairs"] and json.loads((tmp_path / "f" / "failures.json").read_text())["pairs"] == res["pairs"]
    for pair in res["pairs"]:
        assert len(pair["files"]) == pair["count"]
        assert all(Path(f).is_file() and Path(f).parent.name == pair["true_name"] for f in pair["files"])
    p = run_edgekd("eval", tiny_run, "--failures", "--data", tmp_path / "scans", "--out", tmp_path / "cli")
    assert p.returncode == 0 and f"most confident {res['pairs'][0]['files'][0]} p=" in p.stdout, p.stderr


def test_undefined_figures_of_a_folder_missing_a_class_are_said_and_shown_as_a_dash():
    """A labelled folder with one class only gave null AUCs without a word, and the console table printed 'nan%'
    where robustness.md printed '-'."""
    from rich.console import Console

    from edgekd.cli.tables import robustness_table
    from edgekd.scoring import absent_classes_warning

    assert absent_classes_warning("scans", [5, 0, 3], ["a", "b", "c"]) == (
        "scans holds no images of b: AUC, PR-AUC and pAUC are undefined on it (null, shown as -); sensitivity, "
        "specificity, recall and F1 are means over the classes it holds")
    assert absent_classes_warning("scans", [5, 0], ["a", "b"]).endswith("the sensitivity or specificity of that class too")
    assert absent_classes_warning("scans", [5, 1, 3], ["a", "b", "c"]) is None
    row = {"model": "m", "role": "student", "format": "onnx", "precision": "fp32", "clean_acc": 0.0,
           "clean_auc": float("nan"), "per_corruption_acc": {"contrast": 0.0}, "mean_corruption_acc": 0.0,
           "mean_corruption_auc": 0.75, "relative_acc": float("nan")}
    console = Console(record=True, width=250)
    console.print(robustness_table([row], "t"))
    text = console.export_text()
    assert "nan" not in text and text.rstrip().splitlines()[-2].rstrip(" │").endswith("-")
    assert "clean AUC" in text and "mean corr. AUC" in text and "0.7500" in text  # AUC beside accuracy


def test_a_model_that_overflows_under_a_corruption_gets_no_figures_and_is_named():
    """Non-finite outputs had been scored: an all-NaN row counted as class 0 (right for a class-0 image) and the
    ranks gave a finite AUC, so an overflowing INT8 or FP16 artifact got a plausible robustness row."""
    from edgekd.robustness.evaluate import Predictor, corruption_records

    images = [np.full((8, 8, 1), 40 * i, np.uint8) for i in range(6)]
    labels = np.array([0, 0, 0, 1, 1, 1])

    def predict(batch):
        bright = np.array([img.mean() > 100 for img in batch], float)
        out = np.stack([1 - bright, bright], 1) * 0.8 + 0.1
        out[[img.max() > 200 for img in batch]] = np.nan  # overflows on the brightest images
        return out

    said: list[str] = []
    records = corruption_records([Predictor("m", "student", "onnx", "int8", ["a", "b"], predict)], images, labels,
                                 ["brightness"], [5], log=said.append)
    clean, bright = records
    assert "nonfinite" not in clean and clean["acc"] == 1.0
    assert np.isnan(bright["acc"]) and np.isnan(bright["auc"]) and bright["nonfinite"] >= 1
    assert any(line.startswith("warning: m (student) onnx/int8 on brightness s5: non-finite outputs on")
               for line in said), said


def test_a_labelled_folder_holding_copies_of_the_training_images_is_warned_of(tiny_run, tmp_path):
    """`eval --data DIR` refused the training folder itself but scored a copy of its images as new ones (an
    .npz's train images saved as PNGs): the figures then include images the model trained on."""
    from PIL import Image

    from edgekd.recipe import recipe_from_dict
    from edgekd.robustness import evaluate_on_folder
    from edgekd.train.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tiny_run)
    npz = np.load(recipe_from_dict(ckpt["recipe"]).data.path)
    rng = np.random.default_rng(0)
    for name in ckpt["class_names"]:
        (tmp_path / "new" / name).mkdir(parents=True)
        (tmp_path / "copy" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(tmp_path / "new" / name / f"{i}.png")
    for i in range(3):  # three train images, one val image, each under its own class
        for split, j in (("train", i), ("val", 0)):
            image, label = npz[f"{split}_images"][j], int(npz[f"{split}_labels"][j].ravel()[0])
            Image.fromarray(image).save(tmp_path / "copy" / ckpt["class_names"][label] / f"{split}{j}.png")
    for name in ckpt["class_names"]:
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(tmp_path / "copy" / name / "new.png")
    copied = evaluate_on_folder(tiny_run, tmp_path / "e1", tmp_path / "copy")["folder"]
    assert copied["warning"].startswith(f"4 of the 6 images in {tmp_path / 'copy'} are identical in content to the "
                                        "checkpoint's own train or val images (e.g. ")
    fresh = evaluate_on_folder(tiny_run, tmp_path / "e2", tmp_path / "new")["folder"]
    assert "identical in content" not in fresh.get("warning", "")  # (noise: its ACC may be warned of)
    (tmp_path / "new" / ckpt["class_names"][0] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 40)
    with pytest.raises(EdgeKDError, match=r"broken.png: .*\(every image of --data .* is scored: move it out of the "
                                          r"folder; `edgekd predict` with a bundle lists every unreadable file at once\)"):
        evaluate_on_folder(tiny_run, tmp_path / "e3", tmp_path / "new")  # the error had offered no way on


def test_a_bundles_failures_are_its_own_labels_at_its_decision_threshold(tiny_run, tmp_path):
    """A screening bundle's failures had been counted on the argmax: its 14 missed cases at its threshold showed
    nowhere. Each error now is one `edgekd predict` gives."""
    from edgekd.export import export_checkpoint
    from edgekd.export.profile import profile_from_dict
    from edgekd.robustness.evaluate import run_failure_analysis
    from edgekd.runtime import Runner

    profile = profile_from_dict({"formats": ["onnx"], "precisions": ["fp32"],
                                 "decision": {"rule": "sensitivity", "target": 1.0}}, "test")
    from edgekd.recipe import recipe_from_dict
    from edgekd.robustness.evaluate import load_split_images
    from edgekd.train.checkpoint import load_checkpoint

    bundle = export_checkpoint(tiny_run, tmp_path / "screen", profile=profile, log=None).out
    data = recipe_from_dict(load_checkpoint(tiny_run)["recipe"])
    res = run_failure_analysis(bundle, tmp_path / "f", data, log=lambda *_: None)
    assert res["labels"].startswith("the bundle's (its calibration and decision threshold")
    images, labels, _, _, _ = load_split_images(data, "test")
    runner = Runner.from_bundle(bundle, backend="onnx", tta=False)
    given = np.asarray([p.index for p in runner.predict_batch([images[i] for i in range(len(images))])])
    raw = np.stack([p.raw_probs if p.raw_probs is not None else p.probs
                    for p in runner.predict_batch([images[i] for i in range(len(images))])])
    assert int((raw.argmax(1) != labels).sum()) != int((given != labels).sum())  # the premise: the threshold moves
    assert res["errors"] == int((given != labels).sum())  # predict's labels, not the top class's
    assert sum(p["count"] for p in res["pairs"]) == res["errors"]  # (two classes: at most two pairs, all shown)
    ckpt = run_failure_analysis(tiny_run, tmp_path / "g", log=lambda *_: None)
    assert ckpt["labels"] == "the top class"
