"""Export: format table, profiles, ONNX/OpenVINO artifacts, the parity gate, metadata round-trips, the bundle."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_recipe, write_npz
from edgekd.errors import EdgeKDError
from edgekd.export import (FORMATS, export_checkpoint, export_inputs, export_plan, load_profile,
                           profile_from_dict)
from edgekd.export.artifact import ArtifactSession
from edgekd.export.onnx import read_onnx_metadata
from edgekd.export.openvino import read_openvino_metadata
from edgekd.export.parity import check_signature, tta_view
from edgekd.models import deploy_form
from edgekd.recipe import recipe_from_dict
from edgekd.train.checkpoint import load_checkpoint, save_checkpoint

EMBEDDED_KEYS = ("class_names", "preprocess", "tta", "io", "model", "metrics", "edgekd_version", "schema")


def make_checkpoint(root: Path, model_name: str, image_size: int = 16, train_epochs: int = 0,
                    model_kwargs: dict | None = None) -> Path:
    """A real edgekd checkpoint of a tiny model on tiny learnable data (trained `train_epochs` epochs)."""
    npz = write_npz(root / "tiny.npz", n=(64, 24, 24), size=image_size)
    raw = tiny_recipe(npz, name=f"tiny-{model_name}", image_size=image_size, batch_size=16, epochs=train_epochs,
                      monitor=None, model={"name": model_name, "kwargs": model_kwargs or {}})
    recipe = recipe_from_dict(raw)
    if train_epochs:
        from edgekd.train.run import train_recipe

        return train_recipe(recipe, root / "run", log=lambda *_: None).best_path
    from edgekd.data import build_data
    from edgekd.train.run import build_student_model, checkpoint_meta

    torch.manual_seed(0)
    data = build_data(recipe)
    model, spec = build_student_model(recipe, data)
    return save_checkpoint(root / "best.pt", {**checkpoint_meta(recipe, data, spec), "state_dict": model.state_dict(),
                                              "metrics": {"val_auc": 0.5}, "recipe_digest": recipe.digest()})


def quiet(*_):
    pass


# --- format table and profiles -------------------------------------------------------------------------------


def test_plan_takes_supported_pairs_by_name():
    plan = export_plan(["onnx", "openvino", "onnx"], ["fp32", "fp16", "int8"])
    assert [(f.name, p) for f, p in plan] == [("onnx", "fp32"), ("onnx", "int8"), ("openvino", "fp32"),
                                              ("openvino", "fp16"), ("openvino", "int8")]
    assert FORMATS["openvino"].relpath("fp16") == "openvino/model_fp16.xml"


def test_format_table_matches_the_shared_names():
    """The runtime and bench check names against edgekd.formats; the exporter's table must offer exactly those."""
    from edgekd.formats import ARTIFACT_FORMATS, PRECISIONS

    assert tuple(FORMATS) == ARTIFACT_FORMATS
    assert all(set(f.precisions) <= set(PRECISIONS) for f in FORMATS.values())


@pytest.mark.parametrize("formats, precisions, message", [
    (["tflite"], ["fp32"], "unknown format 'tflite'"),
    (["onnx"], ["fp8"], "unknown precision 'fp8'"),
    (["onnx"], ["fp16"], "--precision fp16: not supported by onnx"),
    (["onnx", "openvino"], ["fp16"], "--format onnx: supports fp32, int8"),
])
def test_plan_rejects_what_no_format_supports(formats, precisions, message):
    with pytest.raises(EdgeKDError, match=message):
        export_plan(formats, precisions)


def test_shipped_profiles_load_by_name_and_by_file(tmp_path, monkeypatch):
    from edgekd.export.profile import PROFILES_DIR, shipped_profiles

    names = shipped_profiles()
    assert {"cpu-all", "cpu-onnx-fp32", "cpu-openvino-fp16", "cpu-openvino-int8"} <= set(names)
    monkeypatch.chdir(tmp_path)  # by name from anywhere: a wheel install has no repository around it
    for name in names:
        profile = load_profile(name)
        assert profile.name == name and export_plan(profile.formats, profile.precisions)
        assert load_profile(f"{name}.yaml") == profile == load_profile(f"export/{name}.yaml")  # the old paths
        assert load_profile(PROFILES_DIR / f"{name}.yaml") == profile
    (tmp_path / "cpu-all.yaml").write_text("name: mine\nformats: [onnx]\nprecisions: [fp32]\nparity: {images: 4}\n")
    assert load_profile("cpu-all.yaml").name == "mine"  # a file of that name comes first
    with pytest.raises(EdgeKDError, match=r"^cpu-nothing: export profile not found \(a YAML file, or a shipped "
                                          r"profile: default, cpu-all, "):
        load_profile("cpu-nothing")
    # `default`, the name a bundle records of the defaults (and update's log gives), is a --target too: it was
    # refused as not found
    assert load_profile("default") == load_profile(None)
    with pytest.raises(EdgeKDError, match="export profile not found"):
        load_profile("elsewhere/cpu-all.yaml")  # a path that is not there is not a shipped name


def test_profile_unknown_key_is_a_one_line_error(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("formats: [onnx]\nparity:\n  imagez: 3\n")
    with pytest.raises(EdgeKDError) as err:
        load_profile(path)
    assert str(err.value) == f"{path}: unknown key 'parity.imagez'"


@pytest.mark.parametrize("text, key", [
    ("formats: [tflite]", "formats.0"),
    ("formats: []", "formats: List should have at least 1 item"),  # was blamed on a --format flag not given
    ("precisions: []", "precisions: List should have at least 1 item"),
    ("tta: {views: [mirror]}", "tta.views.0"),
    ("parity: {tolerances: {fp32: {top1_agreement: 1.5}}}", "parity.tolerances.fp32.top1_agreement"),
    ("- a list", "<root>"),
    # the runtime refused such a bundle after an `edgekd update` had exported it with exit 0
    ("tta: {views: [original, original, hflip]}", "tta.views: a view is named twice: ['original', 'original', 'hflip']"),
    ("tta: {views: []}", "tta.views: List should have at least 1 item"),
    ("threads: true", "threads: a number is expected, not true"),  # was 1 thread
    ("parity: {images: yes}", "parity.images: a number is expected, not true"),  # gated on one image
    ("fuse: 'no'", "fuse: true or false is expected, not 'no'"),  # was read as false
])
def test_profile_bad_values_name_the_key(tmp_path, text, key):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(EdgeKDError, match=str(path)) as err:
        load_profile(path)
    assert key in str(err.value) or "mapping" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_profile_file_without_a_name_is_named_after_the_file(tmp_path):
    """It was recorded as "default" in the bundle, as if the built-in defaults had been used."""
    (tmp_path / "clinic-a.yaml").write_text("formats: [onnx]\n")
    assert load_profile(tmp_path / "clinic-a.yaml").name == "clinic-a"
    (tmp_path / "named.yaml").write_text("name: mine\nformats: [onnx]\n")
    assert load_profile(tmp_path / "named.yaml").name == "mine"


def test_partial_tolerance_keeps_the_other_defaults():
    profile = profile_from_dict({"parity": {"tolerances": {"fp16": {"max_abs": 0.05}}}})
    assert profile.parity.tolerances.fp16.max_abs == 0.05
    assert profile.parity.tolerances.fp16.top1_agreement == 0.995
    assert profile.parity.tolerances.fp32.max_abs == 1e-4
    assert profile.parity.tolerances.int8.acc_drop == 0.01


# --- parity building blocks ----------------------------------------------------------------------------------


def test_tta_views_follow_the_contract():
    img = torch.zeros(1, 1, 9, 9, dtype=torch.uint8)
    img[0, 0, 4, 7] = 255  # a dot right of the center
    assert torch.equal(tta_view(img, "hflip")[0, 0, 4, 1], torch.tensor(255, dtype=torch.uint8))
    assert torch.equal(tta_view(img, "vflip"), img.flip(-2))
    up = tta_view(img, "rot+15")[0, 0].float()
    down = tta_view(img, "rot-15")[0, 0].float()
    # Counter-clockwise positive (image rows grow downwards): +15 degrees lifts the dot, -15 lowers it.
    assert up[:4].sum() > up[5:].sum() and down[5:].sum() > down[:4].sum()
    assert torch.equal(tta_view(img, "center_crop", 1.0), img)
    assert tta_view(img, "center_crop", 0.5).shape == img.shape


def test_signature_check_collects_every_problem():
    session = ArtifactSession(["x"], ["output"], [2, 3, 16, 16], [2, 5], run=lambda x: x)
    problems = check_signature(session, (3, 16, 16), num_classes=2)
    assert len(problems) == 4
    assert any("inputs are ['x']" in p for p in problems)
    assert any("batch axis is not dynamic" in p for p in problems)
    assert any("output shape [2, 5]" in p for p in problems)
    assert check_signature(ArtifactSession(["input"], ["logits"], [None, 3, 16, 16], [None, 2], lambda x: x),
                           (3, 16, 16), 2) == []


# --- end to end ------------------------------------------------------------------------------------------------


def run_artifact(fmt: str, path: Path, x: np.ndarray) -> tuple[np.ndarray, dict]:
    """Run an artifact with the bare runtime library (not edgekd code) and report its io signature."""
    if fmt == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        io = {"input": sess.get_inputs()[0].name, "output": sess.get_outputs()[0].name,
              "batch": sess.get_inputs()[0].shape[0]}
        return sess.run(None, {"input": x})[0], io
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    io = {"input": model.inputs[0].get_any_name(), "output": model.outputs[0].get_any_name(),
          "batch": str(model.inputs[0].get_partial_shape()[0])}
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return np.asarray(compiled(x)[compiled.outputs[0]]), io


def test_export_inputs_are_what_the_export_checks(tmp_path, monkeypatch):
    """export_inputs gives the parity set and calibration sample an export uses: same counts and reference metrics
    as the export's parity.json, the same calibration images the INT8 quantizer reads, and the same twice."""
    import edgekd.export.quantize as quantize
    from edgekd.export.parity import torch_logits

    ckpt = make_checkpoint(tmp_path, "edgekd_cnn_tiny")
    profile = profile_from_dict({"parity": {"images": 8, "on_fail": "drop"}, "quantization": {"calib_images": 16}})
    inputs = export_inputs(ckpt, profile, log=quiet)
    seen, real = [], quantize.quantize_openvino

    def recording_quantize(model, ctx, advance=lambda: None):
        seen.append(ctx.calibration())
        return real(model, ctx, advance)

    monkeypatch.setattr(quantize, "quantize_openvino", recording_quantize)
    parity = export_checkpoint(ckpt, tmp_path / "b", ["onnx", "openvino"], ["fp32", "int8"], profile,
                               log=quiet).parity
    assert len(inputs.parity_set.inputs) == parity["inputs"] == 8 * len(profile.tta.views)
    assert {s: len(y) for s, (_, y) in inputs.parity_set.splits.items()} == parity["reference"]["split_images"]
    x_val, y_val = inputs.parity_set.splits["val"]
    val_acc = float((torch_logits(inputs.model, x_val).argmax(1) == y_val).mean())
    assert val_acc == pytest.approx(parity["reference"]["metrics"]["val"]["acc"])
    assert inputs.calibration.shape == (16, *inputs.preprocess["input_size"])
    assert len(seen) == 1 and np.array_equal(seen[0], inputs.calibration)
    np.testing.assert_array_equal(export_inputs(ckpt, profile, log=quiet).calibration, inputs.calibration)


def test_metric_images_take_a_stratified_seeded_subset_of_each_split(tmp_path):
    """parity.metric_images (`--metric-images`): about N images per metric split, every class of the split in it
    with its share, the same images every time; unset, the whole split."""
    from edgekd.data import build_data
    from edgekd.export.run import with_overrides
    from edgekd.recipe import recipe_from_dict as from_dict
    from edgekd.train.checkpoint import load_checkpoint

    ckpt = make_checkpoint(tmp_path, "edgekd_cnn_tiny")
    data = build_data(from_dict(load_checkpoint(ckpt)["recipe"]))
    whole = export_inputs(ckpt, profile_from_dict({"parity": {"images": 4}}), log=quiet).parity_set.splits
    profile = with_overrides(profile_from_dict({"parity": {"images": 4}}), metric_images=10)
    assert profile.parity.metric_images == 10
    parity_set = export_inputs(ckpt, profile, log=quiet).parity_set
    picked = {s: parity_set.metric_split(s) for s in ("val", "test")}
    for split in ("val", "test"):
        labels = data.tables[split].labels
        assert np.array_equal(parity_set.splits[split][1], whole[split][1])  # the reference still sees every image
        (x_all, y_all), (x, y) = whole[split], picked[split]
        assert len(y_all) == len(labels) == 24 and len(y) == 10
        assert set(y.tolist()) == set(labels.tolist())  # every class kept: AUC stays defined
        assert abs(np.mean(y) - np.mean(labels)) <= 1 / len(y)  # the split's class share, to one image
        rows = [next(i for i in range(len(x_all)) if np.array_equal(x_all[i], img)) for img in x]
        assert np.array_equal(y_all[rows], y)  # real images of that split with their own labels
    again = export_inputs(ckpt, profile, log=quiet).parity_set
    assert all(np.array_equal(again.metric_split(s)[0], picked[s][0]) for s in picked)
    from edgekd.export.run import metric_subset

    labels = data.tables["val"].labels
    assert len(metric_subset(labels, len(labels) - 1)) == len(labels) - 1
    rare = np.array([0] * 1000 + [1] * 3 + [2] * 50)  # a stratified draw by scikit-learn left class 1 out of 5..30
    for n in (3, 5, 30):
        assert len(metric_subset(rare, n)) == n and set(rare[metric_subset(rare, n)].tolist()) == {0, 1, 2}, n


def test_metric_images_leave_the_calibration_threshold_and_metrics_of_the_bundle_alone(tmp_path):
    """`--metric-images` is a faster, coarser gate: the artifacts are scored on the subset, while the shipped
    temperature, threshold and metrics come from the whole splits. The subset had fed them too (T 0.07 from 10
    images, threshold 1.0: test sensitivity 0.40 in a re-trial), and the card said every image was gated."""
    from edgekd.export.run import with_overrides

    ckpt = make_checkpoint(tmp_path, "edgekd_cnn_tiny")
    base = profile_from_dict({"parity": {"images": 4}, "formats": ["onnx"], "precisions": ["fp32"],
                              "decision": {"rule": "sensitivity", "target": 0.9}})
    whole = export_checkpoint(ckpt, tmp_path / "whole", profile=base, log=quiet)
    sub = export_checkpoint(ckpt, tmp_path / "sub", profile=with_overrides(base, metric_images=10), log=quiet)
    meta = [json.loads((tmp_path / b / "edgekd.json").read_text()) for b in ("whole", "sub")]
    assert meta[0]["calibration"] == meta[1]["calibration"] and meta[0]["decision"] == meta[1]["decision"]
    assert meta[0]["metrics"] == meta[1]["metrics"]
    assert sub.parity["reference"]["split_images"] == whole.parity["reference"]["split_images"] == {"val": 24, "test": 24}
    assert sub.parity["reference"]["metric_images"] == {"val": 10, "test": 10}
    assert sub.parity["artifacts"][0]["split_images"] == {"val": 10, "test": 10}
    card = [(tmp_path / b / "card.md").read_text() for b in ("whole", "sub")]
    assert "gated on every image of the `val` split (24 images" in card[0]
    assert "gated on a seeded subset of the `val` split with its class proportions (`--metric-images`) (10 images" \
        in card[1]
    assert "| pytorch (subset) |" in card[1] and "| pytorch (subset) |" not in card[0]
    assert "`pytorch (subset)` on the artifacts' images" in card[1]
    assert sub.parity["artifacts"][0]["reference_metrics"]["val"] == sub.parity["artifacts"][0]["metrics"]["val"]
    assert "single differing top-1" not in card[0]  # FP32's 100% tolerates no flip at any count: nothing to say
    fp16 = export_checkpoint(ckpt, tmp_path / "fp16", ["openvino"], ["fp16"], base, log=quiet)
    assert fp16.parity["inputs"] == 4 * len(base.tta.views) < 200
    fp16_card = (tmp_path / "fp16" / "card.md").read_text()
    assert "With 24 inputs a single differing top-1 prediction fails the 99.50% top-1 limit: the 99.50% limit takes " \
        "34 parity images, more than the val split's 24" in fp16_card  # not "more --parity-images": there are none


def test_an_export_into_the_current_folder_is_refused_before_any_work(tmp_path, monkeypatch):
    """`--out .` from inside a bundle (or an empty folder) ran the whole export, then could not move the folder it
    stood in aside ("device or resource busy")."""
    from edgekd.export.bundle import check_target

    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    with pytest.raises(EdgeKDError, match=r"--out \.: the current folder"):
        check_target(Path("."))
    check_target(tmp_path / "elsewhere")  # a new folder: fine


def test_a_re_export_says_it_replaced_the_bundle_and_removes_its_stale_zip(tmp_path):
    """Exported again without --zip, a bundle folder held the new model and `<out>.zip` beside it still the old
    one, without a word; the zip is what gets copied to a device. A zip that is not a bundle's stays."""
    import zipfile

    ckpt = make_checkpoint(tmp_path, "edgekd_cnn_tiny", 16)
    profile = profile_from_dict({"parity": {"images": 4}})
    said: list[str] = []
    export_checkpoint(ckpt, tmp_path / "b", ["onnx"], ["fp32"], profile, zip_bundle=True, log=said.append)
    assert (tmp_path / "b.zip").is_file() and not any("replaced" in line for line in said)
    export_checkpoint(ckpt, tmp_path / "b", ["onnx"], ["fp32"], profile, log=said.append)
    assert not (tmp_path / "b.zip").exists()
    assert f"replaced the earlier bundle in {tmp_path / 'b'}" in said and any("removed" in line for line in said)
    with zipfile.ZipFile(tmp_path / "c.zip", "w") as zf:
        zf.writestr("notes.txt", "not a bundle")
    export_checkpoint(ckpt, tmp_path / "c", ["onnx"], ["fp32"], profile, log=said.append)
    assert (tmp_path / "c.zip").is_file()
    # a bundle zip with no bundle folder beside it (kept as the shipped archive): nothing replaced, the zip stays
    export_checkpoint(ckpt, tmp_path / "d", ["onnx"], ["fp32"], profile, zip_bundle=True, log=said.append)
    shutil.rmtree(tmp_path / "d")
    said.clear()
    export_checkpoint(ckpt, tmp_path / "d", ["onnx"], ["fp32"], profile, log=said.append)
    assert (tmp_path / "d.zip").is_file() and not any("removed" in line or "replaced" in line for line in said)
    # through a symlink, the bundle it points to is replaced (the link had become a new folder, the bundle stayed);
    # --zip writes <the name given>.zip, and the replaced bundle's zips under both names go (the target's name had
    # been written and a stale link.zip left holding the old model)
    (tmp_path / "link").symlink_to(tmp_path / "d")
    shutil.copy(tmp_path / "d.zip", tmp_path / "link.zip")  # the zip a user made of "link" earlier
    export_checkpoint(ckpt, tmp_path / "link", ["onnx"], ["fp32"], profile, zip_bundle=True, log=said.append)
    assert (tmp_path / "link").is_symlink() and (tmp_path / "link.zip").is_file() and not (tmp_path / "d.zip").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_stop_during_publish_waits_for_it_and_one_after_it_leaves_no_stale_zip(tmp_path, monkeypatch):
    """A stop between publish's two renames had left neither bundle at --out (the staged one deleted, the old one
    hidden as .old); one after publish, while the new zip was written, had left the old model's zip beside the
    new folder."""
    import json
    import signal

    import edgekd.export.bundle as bundle_module
    import edgekd.export.run as run_module

    ckpt = make_checkpoint(tmp_path, "edgekd_cnn_tiny", 16)
    profile = profile_from_dict({"parity": {"images": 4}})
    export_checkpoint(ckpt, tmp_path / "b", ["onnx"], ["fp32"], profile, zip_bundle=True, log=quiet)
    seen: list[bool] = []
    old_handler = signal.signal(signal.SIGINT, lambda *_: seen.append((tmp_path / "b" / "edgekd.json").is_file()))
    real_rename = os.rename

    def rename_then_stop(src, dst):  # a Ctrl-C right after the old bundle is moved aside
        real_rename(src, dst)
        if str(dst).endswith(".old"):
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(bundle_module.os, "rename", rename_then_stop)
    try:
        export_checkpoint(ckpt, tmp_path / "b", ["onnx"], ["fp32"], profile, log=quiet)
    finally:
        signal.signal(signal.SIGINT, old_handler)
    assert seen == [True]  # the signal was handled once the new bundle was in place, not between the renames
    monkeypatch.setattr(bundle_module.os, "rename", real_rename)
    export_checkpoint(ckpt, tmp_path / "b", ["onnx"], ["fp32"], profile, zip_bundle=True, log=quiet)

    def interrupted_zip(*_args, **_kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "write_zip", interrupted_zip)
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(ckpt, tmp_path / "b", ["onnx"], ["fp32"], profile, zip_bundle=True, log=quiet)
    assert json.loads((tmp_path / "b" / "edgekd.json").read_text())["artifacts"]
    assert not (tmp_path / "b.zip").exists()  # no zip rather than the previous model's
    # Killed outright between publish's renames: the old bundle is aside as .b.<pid>@<host>-*.old, --out missing;
    # the next export brings it back first (it had been swept away with the staged one).
    import subprocess
    import sys

    from edgekd.fileio import PID_SPACE

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    aside = tmp_path / f".b.{dead}@{PID_SPACE}-x1y2.old"
    os.rename(tmp_path / "b", aside)
    from edgekd.export.run import export_target

    assert export_target(tmp_path / "b") == (tmp_path / "b", True) and not aside.exists()


@pytest.mark.slow
@pytest.mark.parametrize("model_name, size, kwargs", [
    ("edgekd_cnn_tiny", 16, {}),
    ("test_resnet", 32, {}),  # 16 px leaves a 1x1 map that OpenVINO cannot avg-pool (2x2, ceil mode)
    ("test_vit", 32, {"img_size": 32}),
])
def test_export_both_formats_runs_at_batch_1_and_7(tmp_path, model_name, size, kwargs):
    from edgekd.runtime.bundle import open_bundle
    from edgekd.train.checkpoint import model_from_checkpoint

    ckpt = make_checkpoint(tmp_path, model_name, size, model_kwargs=kwargs)
    profile = profile_from_dict({"parity": {"images": 8}})
    precisions = ["fp32", "fp16"] if model_name == "edgekd_cnn_tiny" else ["fp32"]
    result = export_checkpoint(ckpt, tmp_path / "bundle", ["onnx", "openvino"], precisions, profile, zip_bundle=True,
                               log=quiet)
    bundle = open_bundle(tmp_path / "bundle.zip")  # the runtime's reader: schema + sha256 manifest
    assert {(a.format, a.precision) for a in bundle.artifacts} == \
        {("onnx", "fp32"), ("openvino", "fp32")} | ({("openvino", "fp16")} if "fp16" in precisions else set())
    assert result.parity["passed"] and all(r["passed"] for r in result.parity["artifacts"])

    model, _ = model_from_checkpoint(ckpt)
    gen = torch.Generator().manual_seed(1)
    for fmt in ("onnx", "openvino"):
        path = tmp_path / "bundle" / FORMATS[fmt].relpath("fp32")
        for batch in (1, 7):
            x = torch.randn(batch, 3, size, size, generator=gen)
            with torch.no_grad():
                ref = model(x).numpy()
            out, io = run_artifact(fmt, path, x.numpy())
            assert out.shape == (batch, 2)
            assert np.abs(out - ref).max() < 1e-4
        assert io["input"] == "input" and io["output"] == "logits" and io["batch"] in ("batch", "?")
    onnx_meta = json.loads((tmp_path / "bundle" / "edgekd.json").read_text())
    assert [a["opset"] for a in onnx_meta["artifacts"] if a["format"] == "onnx"] == [18]
    settings = onnx_meta["export_profile_settings"]  # what an update re-exports with: the pairs built, not the
    assert (settings["formats"], settings["precisions"]) == (["onnx", "openvino"], precisions)  # profile's
    assert profile_from_dict(settings).parity.images == 8


@pytest.mark.slow
def test_runner_check_compares_what_predict_runs_with_the_gated_artifact(tmp_path, monkeypatch):
    import edgekd.export.run as export_run
    from edgekd.export.run import ParityGateError

    # images of 27 px read at 19 (resize) and a 16 px center crop: the runner's own resize and crop are compared
    from edgekd.train.run import train_recipe

    npz = write_npz(tmp_path / "odd.npz", n=(64, 24, 24), size=27)
    raw = tiny_recipe(npz, name="odd", image_size=16, batch_size=16, epochs=1, monitor=None)
    raw["data"]["resize"] = 19
    ckpt = train_recipe(recipe_from_dict(raw), tmp_path / "run", log=quiet).best_path
    profile = profile_from_dict({"parity": {"images": 8}})
    export_checkpoint(ckpt, tmp_path / "ok", ["onnx", "openvino"], ["fp32"], profile, log=quiet)
    pre = json.loads((tmp_path / "ok" / "edgekd.json").read_text())["preprocess"]
    assert (pre["resize"], pre["center_crop"]) == (19, 16)
    record = json.loads((tmp_path / "ok" / "parity.json").read_text())["runner"]
    assert record["images"] == 8 and len(record["views"]) == 6
    for key in ("onnx/fp32", "openvino/fp32"):
        assert record[key]["max_prob_diff"] <= 0.01 and record[key]["top1_agreement"] == 1.0, record[key]
    card = (tmp_path / "ok" / "card.md").read_text()
    assert "Runner check: the runtime's Runner" in card and "onnx/fp32 on openvino" not in record
    assert ("Without options both run the openvino FP32 model on OpenVINO (the default backend); `--backend onnx` "
            "runs the ONNX file on ONNX Runtime.") in card  # one precision: no --precision to pick another model
    # An ONNX-only bundle: predict's and serve's default backend, OpenVINO, reads the ONNX file; that path is
    # checked too (it had not been), and the card's Run line says what the defaults run (it had said --backend onnx).
    export_checkpoint(ckpt, tmp_path / "onnx-only", ["onnx"], ["fp32"], profile, log=quiet)
    record = json.loads((tmp_path / "onnx-only" / "parity.json").read_text())["runner"]
    assert record["onnx/fp32 on openvino"]["backend"] == "openvino" and record["onnx/fp32"]["backend"] == "onnx"
    assert record["onnx/fp32 on openvino"]["max_prob_diff"] <= 0.01
    assert ("Without options both run the onnx FP32 model on OpenVINO" in
            (tmp_path / "onnx-only" / "card.md").read_text())

    # edgekd.json's normalization is no longer training's (in edgekd.json and embedded in the models alike): the
    # gate, which runs the artifacts on the export's own inputs, cannot see it; the runner check does.
    real = export_run._bundle_metadata

    def shifted(*args, **kwargs):
        meta = real(*args, **kwargs)
        return {**meta, "preprocess": {**meta["preprocess"], "mean": [m + 0.3 for m in meta["preprocess"]["mean"]]}}

    monkeypatch.setattr(export_run, "_bundle_metadata", shifted)
    with pytest.raises(ParityGateError, match="failed the runner check") as err:
        export_checkpoint(ckpt, tmp_path / "bad", ["onnx", "openvino"], ["fp32"], profile, log=quiet)
    assert not (tmp_path / "bad").exists()
    assert all(f.startswith("runner check ") for f in err.value.parity["failures"])
    assert err.value.parity["runner"]["onnx/fp32"]["max_prob_diff"] > 0.01
    # the check can be turned off in the profile (and then says so)
    off = profile_from_dict({"parity": {"images": 8, "runner": {"enabled": False}}})
    export_checkpoint(ckpt, tmp_path / "off", ["onnx"], ["fp32"], off, log=quiet)
    assert json.loads((tmp_path / "off" / "parity.json").read_text())["runner"] == {
        "skipped": "parity.runner.enabled is false"}


def test_the_checked_paths_include_what_predict_runs_by_default():
    from edgekd.export.runner_check import checked_paths

    art = lambda fmt, precision: {"format": fmt, "precision": precision}  # noqa: E731
    assert checked_paths([art("onnx", "fp32"), art("openvino", "fp32")]) == [("onnx", "onnx"), ("openvino", "openvino")]
    assert checked_paths([art("onnx", "fp32")]) == [("onnx", "onnx"), ("onnx", "openvino")]
    # OpenVINO INT8 alone beside ONNX FP32: the default (most precise) model is the ONNX file, read by OpenVINO
    assert checked_paths([art("onnx", "fp32"), art("openvino", "int8")]) == [
        ("onnx", "onnx"), ("openvino", "openvino"), ("onnx", "openvino")]
    assert checked_paths([art("openvino", "fp16")]) == [("openvino", "openvino")]


def test_metadata_round_trips_through_every_artifact(tmp_path):
    ckpt = make_checkpoint(tmp_path, "edgekd_cnn_tiny")
    profile = profile_from_dict({"parity": {"images": 4}, "tta": {"views": ["original", "hflip"]}, "threads": 1})
    export_checkpoint(ckpt, tmp_path / "b", ["onnx", "openvino"], ["fp32", "fp16"], profile, log=quiet)
    meta = json.loads((tmp_path / "b" / "edgekd.json").read_text())
    ckpt_data = torch.load(ckpt, weights_only=True)
    assert meta["class_names"] == ckpt_data["class_names"]
    assert meta["preprocess"] == ckpt_data["preprocess"]
    assert meta["model"]["recipe_digest"] == ckpt_data["recipe_digest"]
    assert meta["tta"]["views"] == ["original", "hflip"] and meta["runtime"]["threads"] == 1
    assert meta["preprocess"]["channels"] == 3 and meta["runtime"]["image_channels"] == 1  # gray data, RGB model
    assert meta["metrics"]["training"] == {"val_auc": 0.5}
    from edgekd.host import cpu_info  # the gate's machine, for a device to compare its INT8 kernels with

    assert meta["export_host"]["int8_dot_product"] == cpu_info()["int8_dot_product"]
    assert meta["export_host"]["simd"] == cpu_info()["simd"]
    embedded = {("onnx", "fp32"): read_onnx_metadata(tmp_path / "b/onnx/model_fp32.onnx"),
                ("openvino", "fp32"): read_openvino_metadata(tmp_path / "b/openvino/model_fp32.xml"),
                ("openvino", "fp16"): read_openvino_metadata(tmp_path / "b/openvino/model_fp16.xml")}
    for (fmt, precision), found in embedded.items():
        assert {k: found[k] for k in EMBEDDED_KEYS} == {k: meta[k] for k in EMBEDDED_KEYS}
        assert (found["format"], found["precision"]) == (fmt, precision)
    listed = dict(line.split("  ")[::-1] for line in (tmp_path / "b/manifest.sha256").read_text().splitlines())
    assert sorted(listed) == sorted(p.relative_to(tmp_path / "b").as_posix() for p in (tmp_path / "b").rglob("*")
                                    if p.is_file() and p.name != "manifest.sha256")
    card = (tmp_path / "b/card.md").read_text()
    assert "| openvino | fp16 |" in card and "max abs diff" in card

    # edgekd.json edited after export, its manifest line re-hashed: the runner compares it with the model file's
    # embedded copy (a renamed class, another threshold or normalization would relabel the outputs silently)
    from edgekd.export.bundle import write_manifest
    from edgekd.runtime import Runner

    edited = tmp_path / "edited"
    for key, change in (("class_names", lambda m: m["class_names"].__setitem__(0, "renamed")),
                        ("preprocess", lambda m: m["preprocess"].update(mean=[0.1] * len(m["preprocess"]["mean"]))),
                        ("tta", lambda m: m["tta"].update(center_crop_fraction=0.3))):  # the views had gone unchecked
        shutil.rmtree(edited, ignore_errors=True)
        shutil.copytree(tmp_path / "b", edited)
        changed = json.loads((edited / "edgekd.json").read_text())
        change(changed)
        (edited / "edgekd.json").write_text(json.dumps(changed))
        write_manifest(edited)
        for backend in ("onnx", "openvino"):
            with pytest.raises(EdgeKDError, match=f"edgekd.json {key}(\\.\\w+)? is .*, the model file was exported"):
                Runner.from_bundle(edited, backend=backend)
    Runner.from_bundle(tmp_path / "b", backend="onnx")  # the bundle as exported opens
    from edgekd.runtime import check_embedded_metadata, metadata_strings

    exported = {**meta, "decision": {**meta["decision"], "val": {"auc": {"value": float("nan")}}}}
    embedded = metadata_strings(exported)  # NaN written as NaN there, as null in edgekd.json: the same figures
    check_embedded_metadata(json.loads(json.dumps(exported).replace("NaN", "null")), embedded, "b")
    for key, value in (("threshold", 0.3), ("positive_index", 0)):
        edited_meta = {**meta, "decision": {**meta["decision"], key: value}}
        with pytest.raises(EdgeKDError, match=f"edgekd.json decision.{key} is .*, the model file was exported with"):
            check_embedded_metadata(edited_meta, embedded, "b")
    if meta.get("decision", {}).get("positive_class") is not None:  # the classes swapped: the decision names the other
        changed = json.loads((tmp_path / "b/edgekd.json").read_text())
        changed["class_names"].reverse()
        (edited / "edgekd.json").write_text(json.dumps(changed))
        write_manifest(edited)
        with pytest.raises(EdgeKDError, match="decision.positive_class must be the class name at"):
            Runner.from_bundle(edited, backend="onnx")
    # a section the embedded copy lacks (tasks added to a one-head bundle) is compared too: it had split one
    # softmax into two per-task ones without a word
    tasks = [{"name": "x", "outputs": [0, 1], "class_names": meta["class_names"][:1]},
             {"name": "y", "outputs": [1, 2], "class_names": meta["class_names"][1:]}]
    with pytest.raises(EdgeKDError, match=r"^b: edgekd.json tasks is .*, the model file was exported with null"):
        check_embedded_metadata({**meta, "tasks": tasks}, embedded, "b")
    # two entries' paths swapped: the FP16 file had run reported as FP32
    changed = json.loads((tmp_path / "b/edgekd.json").read_text())
    ov = [a for a in changed["artifacts"] if a["format"] == "openvino"]
    ov[0]["path"], ov[1]["path"] = ov[1]["path"], ov[0]["path"]
    (edited / "edgekd.json").write_text(json.dumps(changed))
    write_manifest(edited)
    with pytest.raises(EdgeKDError, match=r"edgekd.json lists it as precision fp32, the model file was exported as "
                                          r"\"fp16\""):
        Runner.from_bundle(edited, backend="openvino", precision="fp32")
    # the same (format, precision) twice, or a class named twice (a probability had been lost)
    from edgekd.runtime.bundle import validate_metadata

    twice = {**meta, "artifacts": meta["artifacts"] + meta["artifacts"][:1]}
    with pytest.raises(EdgeKDError, match="artifacts must list each \\(format, precision\\) and each path once"):
        validate_metadata(twice)
    with pytest.raises(EdgeKDError, match="class_names must be unique"):
        validate_metadata({**meta, "class_names": [meta["class_names"][0]] * len(meta["class_names"])})


def perturbed(fmt_name: str):
    """The real exporter of a format, followed by a change of one weight tensor in the written file."""
    real = FORMATS[fmt_name]

    def export(ctx, precision, path):
        info = real.export(ctx, precision, path)
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(path))
        init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
        arr = numpy_helper.to_array(init).copy()
        init.CopyFrom(numpy_helper.from_array(arr + 0.05 * np.abs(arr).max(), init.name))
        onnx.save(model, str(path))
        return info

    return dataclasses.replace(real, export=export)


def cli(monkeypatch, *args: str) -> int:
    """The CLI's exit code (0 when it returns without SystemExit)."""
    from edgekd.cli import run

    monkeypatch.setattr(sys, "argv", ["edgekd", *args])
    try:
        run()
    except SystemExit as ex:
        return ex.code or 0
    return 0


@pytest.mark.slow
def test_perturbed_artifact_fails_the_gate_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    ckpt = make_checkpoint(tmp_path, "edgekd_cnn_tiny", train_epochs=1)
    out = tmp_path / "exports" / "bundle"
    monkeypatch.setitem(FORMATS, "onnx", perturbed("onnx"))
    code = cli(monkeypatch, "export", str(ckpt), "--format", "onnx,openvino", "--precision", "fp32",
               "--out", str(out), "--parity-images", "8", "--zip")
    err = capsys.readouterr().err
    assert code == 2
    report = err.split("error:", 1)[1].splitlines()
    assert "failed (1 problem)" in report[0]
    # One line per failure: only the perturbed artifact; the clean OpenVINO one passed.
    assert [line.strip().split(": ")[0] for line in report[1:] if line.strip()] == ["onnx/fp32"]
    assert "logit diff" in report[1] and "1e-05·|reference|" in report[1]
    # no bundle, no zip, no staging leftovers, no lock file: not even the folder the refused export made for them
    assert not (tmp_path / "exports").exists()


@pytest.mark.slow
def test_failed_re_export_keeps_the_previous_bundle(tmp_path, monkeypatch):
    from edgekd.runtime.bundle import verify_manifest

    ckpt = make_checkpoint(tmp_path, "edgekd_cnn_tiny")
    out = tmp_path / "bundle"
    profile = profile_from_dict({"parity": {"images": 4}})
    export_checkpoint(ckpt, out, ["onnx"], ["fp32"], profile, log=quiet)
    before = (out / "manifest.sha256").read_text()
    monkeypatch.setitem(FORMATS, "onnx", perturbed("onnx"))
    with pytest.raises(EdgeKDError, match=r"onnx/fp32: logit diff .* > 0.0001 \+ 1e-05·\|reference\|"):
        export_checkpoint(ckpt, out, ["onnx"], ["fp32"], profile, log=quiet)
    assert (out / "manifest.sha256").read_text() == before
    verify_manifest(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "bundle", "tiny.npz"]


def test_out_that_is_not_a_bundle_is_refused_before_any_work(tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(EdgeKDError, match="is not an edgekd bundle"):
        export_checkpoint(tmp_path / "missing.pt", out, ["onnx"], ["fp32"], log=quiet)
    assert (out / "notes.txt").read_text() == "keep me"


def test_export_warns_when_the_checkpoint_calls_every_image_one_class(tmp_path, monkeypatch):
    import edgekd.export.run as run

    ckpt = make_checkpoint(tmp_path, "edgekd_cnn_tiny")
    real = run.model_from_checkpoint

    def one_class(path):  # the head biased so every image lands in class 1: every format agrees with it trivially
        model, meta = real(path)
        head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        with torch.no_grad():
            head.bias.copy_(torch.tensor([-1e3, 1e3]))
        return model, meta

    monkeypatch.setattr(run, "model_from_checkpoint", one_class)
    lines = []
    profile = profile_from_dict({"parity": {"images": 8}})
    result = export_checkpoint(ckpt, tmp_path / "b", ["onnx"], ["fp32"], profile, log=lines.append)
    warned = [ln for ln in lines if ln.startswith("warning: the checkpoint's ")]
    assert [w.split("'s ")[1].split(" ACC")[0] for w in warned] == ["val", "test"]
    assert result.parity["reference"]["warnings"] == [w.split("checkpoint's ", 1)[1] for w in warned]
    assert result.parity["passed"]  # a warning, not a refusal


@pytest.mark.slow
def test_int8_paths_quantize_and_are_gated(tmp_path):
    import onnx

    ckpt = make_checkpoint(tmp_path, "edgekd_cnn_tiny", train_epochs=1)
    # A 1-epoch model has near-tied logits, so INT8 may flip a few of them: the bounds here are loose on purpose.
    loose = {"top1_agreement": 0.75, "acc_drop": 0.2, "auc_drop": 0.2}
    profile = profile_from_dict({"parity": {"images": 8, "tolerances": {"int8": loose}},
                                 "quantization": {"calib_images": 16}})
    result = export_checkpoint(ckpt, tmp_path / "b", ["onnx", "openvino"], ["int8"], profile, log=quiet)
    ops = {n.op_type for n in onnx.load(str(tmp_path / "b/onnx/model_int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    xml = (tmp_path / "b/openvino/model_int8.xml").read_text()
    assert "FakeQuantize" in xml or 'element_type="i8"' in xml or 'element_type="u8"' in xml
    for rec in result.parity["artifacts"]:
        assert rec["tolerance"] == {"max_abs": None, "rtol": 0.0, **loose} and rec["passed"]
        assert 0 < rec["max_abs_diff"] and rec["top1_agreement"] >= 0.75
        assert set(rec["metric_drop"]) == {"val", "test"}


@pytest.mark.slow
def test_int8_not_faster_than_fp32_is_left_out_and_the_card_says_why(tmp_path, monkeypatch):
    """quantization.min_speedup: an INT8 artifact timed slower than the bar is not shipped (the export still
    succeeds with FP32), parity.json and the card give the timings; one that clears the bar ships with them."""
    import json

    ckpt = make_checkpoint(tmp_path, "edgekd_cnn_tiny", train_epochs=1)
    loose = {"top1_agreement": 0.5, "acc_drop": 0.5, "auc_drop": 0.5}

    def export(min_speedup, out, formats=("onnx",), precisions=("int8", "fp32")):
        profile = profile_from_dict({"parity": {"images": 4, "tolerances": {"int8": loose}},
                                     "quantization": {"calib_images": 8, "min_speedup": min_speedup}})
        # int8 asked for first: the plan still builds FP32 first, the reference INT8 is timed against
        return export_checkpoint(ckpt, tmp_path / out, list(formats), list(precisions), profile, log=quiet)

    slow = export(1e6, "slow")  # no INT8 model is a million times faster
    assert [(a["format"], a["precision"]) for a in slow.metadata["artifacts"]] == [("onnx", "fp32")]
    assert not (tmp_path / "slow/onnx/model_int8.onnx").exists()
    (gone,) = slow.parity["too_slow"]
    speed = gone["speed_vs_fp32"]
    assert speed["speedup"] == pytest.approx(speed["fp32_p50_ms"] / speed["int8_p50_ms"], rel=0.01)
    assert not speed["fast_enough"] and speed["runs"] > 0
    assert slow.parity["passed"] and [r["precision"] for r in slow.parity["artifacts"]] == ["fp32"]
    card = (tmp_path / "slow/card.md").read_text()
    assert "## Not shipped: INT8 slower than FP32" in card and "below quantization.min_speedup 1e+06" in card
    assert json.loads((tmp_path / "slow/parity.json").read_text())["too_slow"][0]["format"] == "onnx"
    # INT8 alone (the cpu-openvino-int8 profile's plan): nothing to time it against; shipped untimed, said so
    alone = export(1e6, "alone", ("onnx",), ("int8",))
    assert [a["precision"] for a in alone.metadata["artifacts"]] == ["int8"] and "too_slow" not in alone.parity
    assert alone.parity["int8_untimed"] == [{"artifact": "onnx/int8", "reason": "this export builds no onnx/fp32 to "
                                             "time it against; quantization.min_speedup applies when it does"}]
    assert "- onnx/int8: this export builds no onnx/fp32" in (tmp_path / "alone/card.md").read_text()
    # its FP32 failing the gate: the INT8 is the format's only model, kept though slower (both had been dropped,
    # the INT8 "for the FP32 to run here")
    real, broken = FORMATS["onnx"], perturbed("onnx")
    monkeypatch.setitem(FORMATS, "onnx", dataclasses.replace(real, export=lambda ctx, precision, path: (
        broken if precision == "fp32" else real).export(ctx, precision, path)))
    strict = profile_from_dict({"parity": {"images": 4, "tolerances": {"int8": loose}, "on_fail": "drop"},
                                "quantization": {"calib_images": 8, "min_speedup": 1e6}})
    kept_int8 = export_checkpoint(ckpt, tmp_path / "strict", ["onnx"], ["fp32", "int8"], strict, log=quiet)
    assert [(a["format"], a["precision"]) for a in kept_int8.metadata["artifacts"]] == [("onnx", "int8")]
    (int8_record,) = [r for r in kept_int8.parity["artifacts"] if r["precision"] == "int8"]
    assert int8_record["speed_vs_fp32"]["kept"].startswith("its FP32 failed the gate")
    assert "too_slow" not in kept_int8.parity
    monkeypatch.setitem(FORMATS, "onnx", real)

    # both formats, FP16 between OpenVINO's FP32 and INT8: each INT8 is timed against its own format's FP32
    kept = export(1e-6, "kept", ("onnx", "openvino"), ("int8", "fp16", "fp32"))
    assert len(kept.metadata["artifacts"]) == 5 and "too_slow" not in kept.parity
    timed = {r["format"]: r["speed_vs_fp32"] for r in kept.parity["artifacts"] if r["precision"] == "int8"}
    assert set(timed) == {"onnx", "openvino"} and all(t["fast_enough"] for t in timed.values())
    assert not any("speed_vs_fp32" in r for r in kept.parity["artifacts"] if r["precision"] != "int8")
    card = (tmp_path / "kept/card.md").read_text()
    assert "## How the INT8 artifacts were made" in card
    assert "- onnx int8: onnxruntime static QDQ" in card and "- openvino int8: nncf" in card
    assert "full bias correction" in card  # a CNN: NNCF's full bias correction
    # Regression: releasing OpenVINO's FP32 model mid-export (once its INT8 was timed) made the next signal this
    # process got kill it with SIGSEGV; a crash here takes the whole test run down.
    import signal

    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: seen.append(signum))
    try:
        signal.raise_signal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == [signal.SIGTERM]


@pytest.mark.slow
def test_int8_tolerance_miss_is_an_error(tmp_path):
    ckpt = make_checkpoint(tmp_path, "edgekd_cnn_tiny", train_epochs=1)
    # An impossible bound (INT8 logits never match FP32 to 1e-9) must fail the export, not warn.
    profile = profile_from_dict({"parity": {"images": 4, "tolerances": {"int8": {"max_abs": 1e-9}}},
                                 "quantization": {"calib_images": 8}})
    with pytest.raises(EdgeKDError, match=r"onnx/int8: logit diff .* at \|reference\| .* > 1e-09 \+ 0·\|reference\|"):
        export_checkpoint(ckpt, tmp_path / "b", ["onnx"], ["int8"], profile, log=quiet)
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_dynamo_exporter_option(tmp_path, monkeypatch):
    """onnx.dynamo: true reaches torch.onnx.export as dynamo=True with a dynamic batch Dim (not TorchScript's
    dynamic_axes), and the graph is the dynamo exporter's: its node names carry no TorchScript module scope."""
    pytest.importorskip("onnxscript")
    import onnx

    calls = []
    export = torch.onnx.export

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", spy)
    ckpt = make_checkpoint(tmp_path, "edgekd_cnn_tiny")
    profile = profile_from_dict({"parity": {"images": 4}, "onnx": {"dynamo": True}})
    result = export_checkpoint(ckpt, tmp_path / "b", ["onnx"], ["fp32"], profile, log=quiet)
    (kwargs,) = calls
    assert kwargs["dynamo"] is True and "dynamic_axes" not in kwargs
    (batch,) = [shape[0] for shape in kwargs["dynamic_shapes"]]
    assert isinstance(batch, torch.export.Dim) and batch.__name__ == "batch"
    graph = onnx.load(str(tmp_path / "b" / "onnx" / "model_fp32.onnx")).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert graph.node and not any(n.name.startswith("/") for n in graph.node), [n.name for n in graph.node][:4]
    assert result.parity["artifacts"][0]["max_abs_diff"] <= 1e-4


def test_profile_refuses_the_export_batch_size_for_parity():
    with pytest.raises(EdgeKDError, match="parity.batch_size: .*export batch size 2"):
        profile_from_dict({"parity": {"batch_size": 2}})


def test_profile_refuses_a_nan_or_infinite_tolerance():
    """A nan tolerance compares false with every difference (so nothing would fail it); inf is no bound."""
    for value in (float("nan"), float("inf")):
        with pytest.raises(EdgeKDError, match="max_abs: Input should be a finite number"):
            profile_from_dict({"parity": {"tolerances": {"fp32": {"max_abs": value}}}})


@pytest.mark.slow
def test_input_size_override_rescales_preprocessing(tmp_path, monkeypatch):
    import edgekd.explain.gradcam as gradcam

    ckpt = make_checkpoint(tmp_path, "edgekd_cnn_tiny")
    profile = profile_from_dict({"input_size": 24, "parity": {"images": 4}})
    said: list[str] = []
    shapes: list[tuple] = []
    real = gradcam.gradcam
    monkeypatch.setattr(gradcam, "gradcam", lambda model, inputs, *a, **k: shapes.append(tuple(inputs.shape)) or real(
        model, inputs, *a, **k))
    result = export_checkpoint(ckpt, tmp_path / "b", ["onnx"], ["fp32"], profile, log=said.append)
    assert result.metadata["preprocess"]["input_size"] == [3, 24, 24]
    assert result.metadata["preprocess"]["center_crop"] == 24
    trained = load_checkpoint(ckpt)["preprocess"]["input_size"][-1]
    assert f"warning: exporting at input_size 24, the model trained at {trained} px" in "\n".join(said)
    assert result.metadata["model"]["trained_input_size"] == trained  # the card said nothing of it
    assert f"**the model trained at {trained} px** and is exported at another size" in (tmp_path / "b" /
                                                                                      "card.md").read_text()
    # the card's Grad-CAM images (and their predicted/p) go through the bundle's 24 px preprocessing, not training's
    assert shapes == [(4, 3, 24, 24)]
    x = np.zeros((3, 3, 24, 24), np.float32)
    out, io = run_artifact("onnx", tmp_path / "b/onnx/model_fp32.onnx", x)
    assert out.shape == (3, 2)


def test_an_input_size_the_model_cannot_take_is_a_one_line_error():
    """A ViT built for 32 px exported with input_size 64 ended in timm's AssertionError, exit 1, after the work."""
    import timm

    from edgekd.export.run import _check_takes_size

    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=2, pretrained=False, depth=1)
    with pytest.raises(EdgeKDError, match=r"^export profile input_size 64: the model \(trained at 32 px\) does not "
                                          r"take 64 px inputs \(AssertionError: Input height \(64\)"):
        _check_takes_size(vit, [3, 64, 64], {"preprocess": {"input_size": [3, 32, 32]}})
    _check_takes_size(vit, [3, 32, 32], {"preprocess": {"input_size": [3, 32, 32]}})  # its own size: not even run


@pytest.mark.slow
def test_int8_accuracy_control_mode(tmp_path):
    ckpt = make_checkpoint(tmp_path, "edgekd_cnn_tiny", train_epochs=1)
    profile = profile_from_dict({"parity": {"images": 4, "tolerances": {"int8": {"top1_agreement": 0.5}}},
                                 "quantization": {"calib_images": 16, "accuracy_control": True, "max_drop": 0.0}})
    result = export_checkpoint(ckpt, tmp_path / "b", ["openvino"], ["int8"], profile, log=quiet)
    (art,) = result.metadata["artifacts"]
    assert "accuracy-controlled" in art["quantization"]
    assert "tuned on the val split, so the gate's val ACC drop is not an independent estimate" in art["quantization"]
    # max_drop 0 on the val split: NNCF reverts layers until val accuracy is unchanged.
    assert result.parity["artifacts"][0]["metric_drop"]["val"]["acc"] <= 0.0


def _fake_session(run):
    from edgekd.export.artifact import ArtifactSession

    return ArtifactSession(input_names=["input"], output_names=["logits"], input_shape=[None, 3, 8, 8],
                           output_shape=[None, 3], run=run)


def _parity_case(scale: float, seed: int = 0):
    """A parity set of 40 inputs and a reference model whose logits are `scale` times a fixed linear map."""
    from edgekd.export.parity import ParitySet, split_metrics

    rng = np.random.default_rng(seed)
    w = rng.normal(size=(3 * 8 * 8, 3))
    x = rng.normal(size=(40, 3, 8, 8)).astype(np.float32)
    y = rng.integers(0, 3, 40)

    def logits(inputs):
        return (inputs.reshape(len(inputs), -1).astype(np.float64) @ w * scale).astype(np.float32)

    metrics = split_metrics(y, logits(x))  # as reference_report gives them: every row is scored
    ref = {"logits": logits(x), "splits": {"val": {"logits": logits(x), "metrics": metrics, "scored_metrics": metrics}}}
    return ParitySet(x, ["original"] * 40, {"val": (x, y)}), ref, logits


def test_fp32_gate_is_relative_for_large_logits_and_strict_for_small():
    from edgekd.export.parity import check_artifact
    from edgekd.export.profile import profile_from_dict

    fp32 = profile_from_dict({}).parity.tolerances.fp32
    # Logits ~1e3 (a badly scaled but valid model) with a 1e-7 relative error: |diff| ~1e-4..3e-4 > atol 1e-4,
    # far inside atol + rtol*|ref|: passes.
    data, ref, logits = _parity_case(scale=100.0)
    assert np.abs(ref["logits"]).max() > 500
    rel = _fake_session(lambda x: (logits(x).astype(np.float64) * (1 + 1e-7)).astype(np.float32))
    record, failures = check_artifact(rel, data, ref, fp32, (3, 8, 8), 3, 7, "val")
    assert record["max_abs_diff"] > 1e-4 and not failures, failures
    # The old absolute-only rule refuses the same artifact.
    strict = fp32.model_copy(update={"rtol": 0.0})
    assert check_artifact(rel, data, ref, strict, (3, 8, 8), 3, 7, "val")[1]
    # A perturbed artifact of a normally scaled model still fails: 1e-3 added to every logit.
    data, ref, logits = _parity_case(scale=0.1)
    assert np.abs(ref["logits"]).max() < 20
    bumped = _fake_session(lambda x: logits(x) + np.float32(1e-3))
    record, failures = check_artifact(bumped, data, ref, fp32, (3, 8, 8), 3, 7, "val")
    assert any("logit diff 0.001" in f and "1e-05·|reference|" in f for f in failures), failures
    assert record["allclose_violations"] == 40 * 3
    # ... and so does a single logit out of 120 moved by 1e-3.
    def one_off(x):
        out = logits(x)
        if len(x) == 40 or len(x) == 7:
            out[0, 0] += 1e-3
        return out
    assert check_artifact(_fake_session(one_off), data, ref, fp32, (3, 8, 8), 3, 7, "val")[1]


def test_metric_gate_reports_its_image_count_and_resolution():
    from edgekd.export.parity import check_artifact
    from edgekd.export.profile import profile_from_dict

    int8 = profile_from_dict({}).parity.tolerances.int8
    data, ref, logits = _parity_case(scale=1.0)
    record, failures = check_artifact(_fake_session(logits), data, ref, int8, (3, 8, 8), 3, 7, "val")
    assert not failures and record["split_images"]["val"] == 40
    assert record["acc_resolution"]["val"] == pytest.approx(1 / 40)
    assert record["acc_gate_resolves"] is False  # 40 images: one image is 2.5 points > the 1-point limit


@pytest.mark.slow
def test_on_fail_drop_ships_the_passing_artifacts_and_says_why(tmp_path, monkeypatch):
    from edgekd.runtime import Runner

    ckpt = make_checkpoint(tmp_path, "edgekd_cnn_tiny", train_epochs=1)
    monkeypatch.setitem(FORMATS, "onnx", perturbed("onnx"))
    drop = profile_from_dict({"parity": {"images": 4, "on_fail": "drop"}})
    result = export_checkpoint(ckpt, tmp_path / "b", ["onnx", "openvino"], ["fp32"], drop, log=quiet)
    assert [(a["format"], a["precision"]) for a in result.metadata["artifacts"]] == [("openvino", "fp32")]
    assert not (tmp_path / "b" / "onnx" / "model_fp32.onnx").exists()
    assert result.parity["dropped"][0]["format"] == "onnx" and "logit diff" in result.parity["dropped"][0]["failures"][0]
    card = (tmp_path / "b" / "card.md").read_text()
    assert "## Not shipped" in card and "- onnx fp32: logit diff" in card
    Runner.from_bundle(tmp_path / "b", backend="openvino")  # manifest and metadata agree on what is there
    with pytest.raises(EdgeKDError, match="not in this bundle|no onnx"):
        Runner.from_bundle(tmp_path / "b", backend="onnx")
    # every artifact failing is still an error, nothing written
    with pytest.raises(EdgeKDError, match="failed \\(1 problem\\)"):
        export_checkpoint(ckpt, tmp_path / "c", ["onnx"], ["fp32"], drop, log=quiet)
    assert not (tmp_path / "c").exists()


def test_an_int8_whose_fp32_failed_to_build_ships_untimed_and_says_why(tmp_path, monkeypatch):
    """With its FP32 artifact failed to build, the INT8 one shipped without the speed check, said to be untimed
    because "this export builds no onnx/fp32"."""
    real = FORMATS["onnx"]

    def export(ctx, precision, path):
        if precision == "fp32":
            raise RuntimeError("converter broke")
        return real.export(ctx, precision, path)

    monkeypatch.setitem(FORMATS, "onnx", dataclasses.replace(real, export=export))
    ckpt = make_checkpoint(tmp_path, "edgekd_cnn_tiny")
    drop = profile_from_dict({"parity": {"images": 4, "on_fail": "drop",
                                         "tolerances": {"int8": {"top1_agreement": 0.5, "acc_drop": 0.5}}},
                              "quantization": {"calib_images": 8}})
    result = export_checkpoint(ckpt, tmp_path / "b", ["onnx"], ["fp32", "int8"], drop, log=quiet)
    assert [(a["format"], a["precision"]) for a in result.metadata["artifacts"]] == [("onnx", "int8")]
    assert result.parity["int8_untimed"] == [{"artifact": "onnx/int8", "reason": "its onnx/fp32 failed to build"}]
    assert "- onnx/int8: its onnx/fp32 failed to build" in (tmp_path / "b" / "card.md").read_text()


def test_int8_transformer_scheme_is_picked_for_every_timm_attention_and_no_channel_gate():
    """NNCF's transformer scheme goes to multi-head attention as timm builds it (ViT's Attention and Swin's
    WindowAttention, which the scheme once missed), never to squeeze-excitation or CBAM gates of the CNNs."""
    from timm.layers import Attention, SqueezeExcite
    from timm.layers.cbam import CbamModule
    from timm.models.swin_transformer_v2 import WindowAttention

    from edgekd.export.quantize import is_transformer

    for attention in (Attention(32, num_heads=2), WindowAttention(32, window_size=(4, 4), num_heads=2),
                      torch.nn.MultiheadAttention(32, 2)):
        assert is_transformer(torch.nn.Sequential(torch.nn.Conv2d(3, 32, 1), attention)), type(attention).__name__
    for gate in (SqueezeExcite(32), CbamModule(32)):
        assert not is_transformer(torch.nn.Sequential(torch.nn.Conv2d(3, 32, 1), gate)), type(gate).__name__
    # timm's attention classes not named *Attention (they had got the CNN scheme); ResNeSt's SplitAttn has no heads
    from timm.layers import SplitAttn
    from timm.models.cait import TalkingHeadAttn
    from timm.models.efficientformer_v2 import Attention2d
    from timm.models.twins import GlobalSubSampleAttn

    for attention in (TalkingHeadAttn(32, num_heads=2), GlobalSubSampleAttn(32, num_heads=2),
                      Attention2d(32, key_dim=8, num_heads=2, resolution=4)):
        assert is_transformer(torch.nn.Sequential(torch.nn.Conv2d(3, 32, 1), attention)), type(attention).__name__
    assert not is_transformer(torch.nn.Sequential(torch.nn.Conv2d(3, 32, 1), SplitAttn(32, radix=2)))


def test_the_cards_run_line_names_only_the_options_a_bundle_has():
    """It offered `--precision` for a one-model bundle and `--backend onnx` for a bundle without ONNX files."""
    from edgekd.export.bundle import default_run_line

    ov = [{"format": "openvino", "precision": p} for p in ("int8", "fp16", "fp32")]
    assert default_run_line(ov) == ("Without options both run the openvino FP32 model on OpenVINO (the default "
                                    "backend); `--precision fp16|int8` picks another model of the bundle.")
    assert default_run_line([{"format": "onnx", "precision": "int8"}, {"format": "onnx", "precision": "fp16"}]) == (
        "Without options both run the onnx FP16 model on OpenVINO (the default backend); `--backend onnx` runs the "
        "ONNX file on ONNX Runtime; `--precision int8` picks another model of the bundle.")
    assert default_run_line(ov[2:]) == ("Without options both run the openvino FP32 model on OpenVINO (the default "
                                        "backend).")


def test_a_continual_parity_set_scores_each_tasks_metric_subset():
    """merge_parity_sets keeps every task's `--metric-images` rows, offset past the tasks before it."""
    from edgekd.export.continual import TaskLayout, merge_parity_sets
    from edgekd.export.parity import ParitySet

    def task(first: int, n: int, rows):
        labels = np.arange(first, first + n)
        x = labels.astype(np.float32).reshape(n, 1, 1, 1)
        return ParitySet(x[:1], ["original"], {"val": (x, labels), "test": (x, labels)},
                         metric_rows=None if rows is None else {"val": np.array(rows), "test": np.array(rows)})

    one_head = TaskLayout("single", "", [{"name": "a", "outputs": [0, 5]}, {"name": "b", "outputs": [5, 14]}], None)
    merged = merge_parity_sets([task(0, 5, [1, 3]), task(10, 4, [0, 2])], one_head)
    x, y = merged.metric_split("val")
    assert y.tolist() == [1, 3, 10, 12] and x.ravel().tolist() == [1, 3, 10, 12]
    assert len(merged.splits["val"][1]) == 9  # the reference's whole splits
    whole = merge_parity_sets([task(0, 5, None), task(10, 4, None)], one_head)
    assert whole.metric_rows is None and whole.metric_split("test")[1].tolist() == [0, 1, 2, 3, 4, 10, 11, 12, 13]
    assert whole.heads is None and whole.task_outputs == [("a", 0, 5), ("b", 5, 14)]


def test_a_one_head_continual_bundle_gives_each_tasks_figures_as_eval_scores_them():
    """A one-head continual bundle's figures were the pooled problem only, while `edgekd eval` and continual.json
    give each task's, every class competing (val ACC 0.53 beside 0.37 for their mean). Its headline stays the whole
    model's (what it predicts; a task's pair scored as a binary problem is no figure of it)."""
    from edgekd.export.parity import split_metrics

    y = np.array([0, 1, 2, 0, 3, 4, 3])  # task a: classes 0-2 (4 images), task b: classes 3-4 (3 images)
    pred = np.array([0, 1, 4, 1, 3, 4, 0])  # a: 2 of 4 right (one called b's class 4); b: 2 of 3
    logits = np.eye(5)[pred] * 4.0
    m = split_metrics(y, logits, task_outputs=[("a", 0, 3), ("b", 3, 5)])
    assert m["tasks"]["a"]["acc"] == pytest.approx(0.5) and m["tasks"]["b"]["acc"] == pytest.approx(2 / 3)
    assert m["tasks"]["a"]["n"] == 4 and m["tasks"]["b"]["n"] == 3
    assert m["tasks"]["a"]["f1"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)  # classes 0, 1, 2 of task a only
    pooled = split_metrics(y, logits)
    assert {k: v for k, v in m.items() if k != "tasks"} == pooled and pooled["acc"] == pytest.approx(4 / 7)


def test_the_cards_grad_cam_rows_give_the_bundles_calibrated_prediction():
    """The card's Grad-CAM table showed the uncalibrated softmax top class (0.958 where predict says 0.887);
    it now gives what the bundle predicts: temperature-scaled p and the decision threshold."""
    from edgekd.export.bundle import _explanation_section
    from edgekd.export.clinical import as_the_bundle_decides

    record = {"image": "test1", "label": "pneumonia", "predicted": "normal", "target": "normal", "prob": 0.7,
              "probs": [0.7, 0.3], "overlay": "explain/test1_gradcam.png", "layer": "stages.1"}
    clinical = {"calibration": {"temperature": 2.0}, "decision": {"threshold": 0.4, "positive_index": 1}}
    p1 = np.sqrt(0.3) / (np.sqrt(0.7) + np.sqrt(0.3))  # softmax(log p / 2) = sqrt(p), normalized: 0.3956
    [kept] = as_the_bundle_decides([record], clinical, ["normal", "pneumonia"])
    assert kept["predicted"] == "normal" and kept["prob"] == pytest.approx(1 - p1) and kept["uncalibrated_prob"] == 0.7
    clinical["decision"]["threshold"] = 0.35
    [flipped] = as_the_bundle_decides([record], clinical, ["normal", "pneumonia"])
    assert flipped["predicted"] == "pneumonia" and flipped["prob"] == pytest.approx(p1)
    row = _explanation_section([flipped])[-1]
    assert f"| pneumonia ({p1:.3f}; the map is of normal, the top class) |" in row
    assert f"| normal ({1 - p1:.3f}) |" in _explanation_section([kept])[-1]
    piped = _explanation_section([{**kept, "label": "nor|mal", "image": "a|b"}])[-1]  # a `|` had split the row
    assert piped.startswith("| a\\|b | nor\\|mal | normal") and piped.count(" | ") == 3


def test_export_threads_over_the_cores_run_on_the_cores(tmp_path, monkeypatch):
    """`--threads 2000` started 2,004 threads and stalled the export for minutes: the export's own runs take at
    most this machine's cores; the bundle keeps the hint (the runner caps it on the device)."""
    from edgekd.export.run import with_overrides

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    opened, real = [], FORMATS["onnx"]
    monkeypatch.setitem(FORMATS, "onnx", dataclasses.replace(real, open=lambda path, precision, threads: (
        opened.append(threads) or real.open(path, precision, threads))))
    ckpt, logs = make_checkpoint(tmp_path, "edgekd_cnn_tiny"), []
    profile = with_overrides(profile_from_dict({"parity": {"images": 4}, "formats": ["onnx"], "precisions": ["fp32"]}),
                             threads=512)
    export_checkpoint(ckpt, tmp_path / "b", profile=profile, log=logs.append)
    assert opened and set(opened) == {2}
    assert "threads 512 is over this machine's 2 cores: the export runs on 2; the bundle's hint stays 512 (a " \
        "runner caps it to its cores)" in logs
    assert json.loads((tmp_path / "b" / "edgekd.json").read_text())["runtime"]["threads"] == 512
    with pytest.raises(EdgeKDError, match=r"--threads must be in \[1, 1024\]"):
        with_overrides(profile, threads=1025)


def test_a_top1_failure_by_a_single_input_says_how_many_parity_images_give_the_gate_room():
    """--parity-images 32 (192 inputs) failed FP16's 99.5% on one near-tied input, with nothing saying that no
    fewer than 200 inputs tolerate one flip."""
    from edgekd.export.parity import check_artifact
    from edgekd.export.profile import profile_from_dict

    fp16 = profile_from_dict({}).parity.tolerances.fp16
    data, ref, logits = _parity_case(scale=0.1)

    def flip(out, x, row):  # the input `row` of the parity set, wherever it falls in a batch
        hit = [i for i in range(len(x)) if np.array_equal(x[i], data.inputs[row])]
        for i in hit:
            out[i, ref["logits"][row].argmin()] = ref["logits"][row].max() + 1.0
        return out

    def one_flip(x):
        return flip(logits(x).copy(), x, 0)
    record, failures = check_artifact(_fake_session(one_flip), data, ref, fp16, (3, 8, 8), 3, 7, "val")
    assert any("top-1 agreement 97.50% < 99.50% (1 of 40 differ; with 40 inputs one differing input fails this "
               "limit: --parity-images 200 or more give it room)" in f for f in failures), failures
    def two_flips(x):
        return flip(one_flip(x), x, 1)
    failures = check_artifact(_fake_session(two_flips), data, ref, fp16, (3, 8, 8), 3, 7, "val")[1]
    assert any("(2 of 40 differ)" in f for f in failures), failures  # more images would not save it: no hint
    # A val split of 50 images cannot give 200: the hint says so instead of asking for images that are not there
    from dataclasses import replace
    small_val = replace(data, raw_source=(list(range(50)), list(range(40))))
    failures = check_artifact(_fake_session(one_flip), small_val, ref, fp16, (3, 8, 8), 3, 7, "val")[1]
    assert any("one differing input fails this limit below 200 parity images, more than the val split's 50" in f
               for f in failures), failures
    assert not any("--parity-images 200" in f for f in failures)


@pytest.mark.slow
def test_a_rep_model_exports_fused_and_a_wrong_fusion_fails_the_gate(tmp_path, monkeypatch):
    import onnx

    import edgekd.export.run as export_run

    ckpt = make_checkpoint(tmp_path, "repvgg_a0", 32)
    convs = {}
    for fuse in (True, False):
        profile = profile_from_dict({"parity": {"images": 4}, "fuse": fuse})
        result = export_checkpoint(ckpt, tmp_path / f"fuse-{fuse}", ["onnx"], ["fp32"], profile, log=quiet)
        assert result.parity["passed"]
        graph = onnx.load(str(tmp_path / f"fuse-{fuse}" / FORMATS["onnx"].relpath("fp32"))).graph
        convs[fuse] = sum(n.op_type == "Conv" for n in graph.node)
        card = (tmp_path / f"fuse-{fuse}" / "card.md").read_text()
        assert result.metadata["model"].get("fused_blocks") == (22 if fuse else None)
        assert ("- Exported in its fused inference form: 22 re-parameterizable blocks folded" in card) is fuse
    assert (convs[True], convs[False]) == (22, 44)  # RepVGG-A0: each block's 3x3 and 1x1 branches become one 3x3

    check = json.loads((tmp_path / "fuse-True" / "edgekd.json").read_text())["model"]["fusion_check"]
    assert check["inputs"] == 4 and check["fused_fp32_max_diff"] < 1e-4  # 4 images, original view (not x 6 views)
    assert "of the unfused checkpoint run in float64 on 4 parity inputs" in (tmp_path / "fuse-True" / "card.md").read_text()

    def off_by_a_little(model):  # a fusion that changed the function: checked against the unfused model
        fused, n = deploy_form(model)
        with torch.no_grad():
            fused.head.fc.bias += 1e-3
        return fused, n

    monkeypatch.setattr(export_run, "deploy_form", off_by_a_little)
    with pytest.raises(EdgeKDError, match=r"^fused form: logit diff 0.001 from the unfused model run in float64 .*"
                                          r"the fusion changed the function; `fuse: false`"):
        export_checkpoint(ckpt, tmp_path / "wrong", ["onnx"], ["fp32"], profile_from_dict({"parity": {"images": 4}}),
                          log=quiet)
    assert not (tmp_path / "wrong").exists()


def test_the_fusion_check_allows_float_rounding_and_refuses_a_changed_function():
    """Folding BatchNorm into weights moves FP32 rounding: on a large-logit model that exceeds the FP32 gate's
    absolute tolerance without any error (a fused MobileOne was refused at 1.7e-4 at |logit| 5.6). The check
    measures rounding against a float64 run instead; a real change of function still fails."""
    import copy

    from edgekd.export.parity import check_fusion, torch_logits
    from edgekd.export.profile import Tolerance

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 3)).eval()
    with torch.no_grad():
        model[2].weight.mul_(40)  # logits of a few hundred
    x = (30 * np.random.default_rng(0).normal(size=(64, 256))).astype(np.float32)
    refolded = copy.deepcopy(model)
    with torch.no_grad():  # the same function, other roundings: each weight times 3 then divided by 3 in float32
        for layer in (refolded[0], refolded[2]):
            layer.weight.mul_(3).div_(3)
    fp32_gate = Tolerance(max_abs=1e-4, rtol=0.0)
    assert np.abs(torch_logits(refolded, x) - torch_logits(model, x)).max() > 1e-4  # the old rule refused it
    ok = check_fusion(model, refolded, x, fp32_gate, factor=10)
    assert ok["passed"] and 0 < ok["unfused_fp32_max_diff"] and ok["fused_fp32_max_diff"] <= 10 * ok["unfused_fp32_max_diff"] + 1e-4
    changed = copy.deepcopy(refolded)
    with torch.no_grad():
        changed[2].bias += 0.5  # far below the logits' scale, far above their rounding
    bad = check_fusion(model, changed, x, fp32_gate, factor=10)
    assert not bad["passed"] and bad["worst"]["diff"] > bad["worst"]["allowed"]


def test_the_card_says_where_the_training_started_from():
    from edgekd.export.bundle import _provenance_lines

    assert _provenance_lines({"init_weights": {"file": "/w/r50.pth", "sha256": "ab12"}}) == [
        "- Initialised from the weights file /w/r50.pth (sha256 `ab12`)"]
    assert _provenance_lines({"init_weights": {"hub": "resnet50.a1_in1k"}}) == [
        "- Initialised from timm's pretrained weights of resnet50.a1_in1k (no revision recorded)"]
    assert _provenance_lines({"init_weights": {"hub": "resnet50", "repo": "timm/resnet50.a1_in1k", "revision": "c0ffee",
                                               "filename": "model.safetensors", "sha256": "ab12"}}) == [
        "- Initialised from timm's pretrained weights of resnet50 (model.safetensors of timm/resnet50.a1_in1k at "
        "revision `c0ffee`, sha256 `ab12`)"]
    assert _provenance_lines({"init_weights": None, "fused_blocks": 0}) == []


def test_the_value_check_allows_a_model_its_own_fp32_rounding():
    """A model FP32 computes only to 1.6e-4 at logits of 5.6 (a barely trained MobileOne) had every faithful FP32
    artifact refused by atol 1e-4 + rtol 1e-5; the check now also allows 10x that rounding, measured only when a
    value exceeds the tolerance. A model FP32 computes well still refuses a 1e-3 change."""
    from edgekd.export.parity import check_artifact
    from edgekd.export.profile import profile_from_dict

    fp32 = profile_from_dict({}).parity.tolerances.fp32
    data, ref, logits = _parity_case(scale=0.1)
    off = _fake_session(lambda x: logits(x) + np.float32(3e-4))
    asked = []

    def rounding(value):
        return lambda: asked.append(value) or value

    record, failures = check_artifact(off, data, ref, fp32, (3, 8, 8), 3, 7, "val", rounding=rounding(2e-4))
    assert not failures and record["fp32_rounding"] == 2e-4 and record["allclose_violations"] == 0
    record, failures = check_artifact(off, data, ref, fp32, (3, 8, 8), 3, 7, "val", rounding=rounding(1e-7))
    assert any("+ 10x the model's own FP32 rounding 1e-07" in f for f in failures), failures
    exact = _fake_session(logits)
    asked.clear()
    record, failures = check_artifact(exact, data, ref, fp32, (3, 8, 8), 3, 7, "val", rounding=rounding(1.0))
    assert not failures and asked == [] and "fp32_rounding" not in record  # not measured when nothing exceeds


def test_fp32_rounding_measures_the_models_distance_from_float64():
    from edgekd.export.parity import fp32_rounding

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3)).eval()
    x = np.random.default_rng(0).normal(size=(8, 64)).astype(np.float32)
    small = fp32_rounding(model, x)
    with torch.no_grad():
        model[2].weight.mul_(1e4)  # logits 1e4 times larger: rounding grows with them
    assert 0 < small < 1e-5 and fp32_rounding(model, x) > 100 * small


def test_the_card_gives_the_rounding_allowance_and_marks_flat_grad_cam_maps():
    """A card said "pass" beside a max abs diff above its stated max_abs when the FP32 rounding allowance was used,
    and showed flat Grad-CAM maps as if they were evidence."""
    from edgekd.export.bundle import _explanation_section, _parity_section

    parity = {"reference": {"split_images": {"val": 40}}, "images": 4, "inputs": 24, "batch_size": 7,
              "metric_split": "val", "rounding_factor": 10, "artifacts": [
                  {"format": "onnx", "precision": "fp32", "max_abs_diff": 5.96e-7, "mean_abs_diff": 1e-7,
                   "top1_agreement": 1.0, "tolerance": {"max_abs": 1e-9, "rtol": 0.0}, "passed": True,
                   "fp32_rounding": 4.61e-7}]}
    row = next(line for line in _parity_section(parity, {"views": ["original"]}) if line.startswith("| onnx"))
    assert "max_abs 1e-09, rtol 0, + 10x the model's FP32 rounding 4.61e-07" in row
    shots = [{"image": "a.png", "label": "x", "predicted": "x", "prob": 0.9, "overlay": "e/a.png", "layer": "s1",
              "blank": True}, {"image": "b.png", "label": "y", "predicted": "y", "prob": 0.8, "overlay": "e/b.png",
                               "layer": "s1", "blank": False}]
    text = "\n".join(_explanation_section(shots))
    assert text.count("(flat map: nothing highlighted at this layer)") == 1
    assert "1 of 2 maps are flat" in text


def test_a_gate_looser_than_the_defaults_is_named_in_the_card():
    """A profile with every INT8 limit null (or max_abs 0.5) read "pass" in the card without a word that the gate
    was not edgekd's."""
    from edgekd.export.bundle import _parity_section
    from edgekd.export.profile import loosened_tolerances, profile_from_dict

    loose = profile_from_dict({"parity": {"tolerances": {"int8": {"top1_agreement": None, "acc_drop": 0.02},
                                                         "fp32": {"max_abs": 0.5}, "fp16": {"max_abs": 0.001}}}})
    assert loosened_tolerances(loose.parity.tolerances, {"fp32", "int8"}) == [
        "fp32 max_abs 0.5 (default 0.0001)", "int8 top1_agreement off (default 0.98)",
        "int8 acc_drop 0.02 (default 0.01)"]
    assert loosened_tolerances(loose.parity.tolerances, {"fp16"}) == []  # stricter than the default: nothing to say
    assert loosened_tolerances(profile_from_dict({}).parity.tolerances, {"fp32", "fp16", "int8"}) == []
    parity = {"reference": {"split_images": {"val": 40}}, "images": 4, "inputs": 24, "batch_size": 7,
              "metric_split": "val", "rounding_factor": 10, "artifacts": [], "loosened_gate": ["int8 acc_drop 0.02 "
                                                                                              "(default 0.01)"]}
    text = "\n".join(_parity_section(parity, {"views": ["original"]}))
    assert "**The gate is looser than edgekd's defaults** (the export profile's settings): int8 acc_drop 0.02" in text
    del parity["loosened_gate"]
    assert "looser" not in "\n".join(_parity_section(parity, {"views": ["original"]}))


def test_the_rounding_allowance_is_measured_on_the_same_images_whatever_the_tta_views():
    """A diverged model (logits ~1.5e3) failed FP32 parity under the default 6-view profile and passed under a
    1-view one: its float64 rounding was sampled from other rows, 5e5-fold apart."""
    from edgekd.export.parity import ParitySet
    from edgekd.export.run import rounding_sample

    images = np.arange(100, dtype=np.float32).reshape(100, 1, 1, 1)
    views = ["original", "hflip", "vflip", "center_crop", "rotate+15", "rotate-15"]
    six = ParitySet(np.concatenate([images + 1000 * k for k in range(6)]), [v for v in views for _ in range(100)], {})
    one = ParitySet(images, ["original"] * 100, {})
    picked = rounding_sample(one).ravel()
    assert np.array_equal(rounding_sample(six), rounding_sample(one)) and len(picked) == 64
    assert picked[0] == 0 and picked[-1] == 99  # spread over the images (the first 64 of 100 before), originals only


def _gate(art, ref, y, tolerance, heads=None):
    """check_artifact on a stand-in session answering `art` (rows by input index) against reference logits `ref`."""
    from edgekd.export.artifact import ArtifactSession
    from edgekd.export.parity import ParitySet, check_artifact

    x = np.arange(len(y), dtype=np.float32).reshape(-1, 1, 1, 1)
    session = ArtifactSession(["input"], ["logits"], [None, 1, 1, 1], [None, ref.shape[1]],
                              lambda b: art[b[:, 0, 0, 0].astype(int)].astype(np.float32))
    ps = ParitySet(x, ["original"] * len(y), {"val": (x, y)}, heads=heads)
    m = ps.metrics(y, ref)
    reference = {"logits": ref.astype(np.float32), "splits": {"val": {"logits": ref, "metrics": m, "scored_metrics": m}}}
    return check_artifact(session, ps, reference, tolerance, (1, 1, 1), ref.shape[1], 7, "val")


def test_a_drop_exactly_at_the_limit_passes_despite_float_rounding():
    """0.90 - 0.89 = 0.010000000000000009 > 0.01: a 1-point drop on 100 images was refused by a 1-point limit."""
    from edgekd.export.profile import Tolerance

    y = np.arange(100) % 2
    ref = np.zeros((100, 2))
    ref[np.arange(100), y] = 3.0
    ref[np.arange(10), 1 - y[:10]] = 4.0  # the reference gets 90 right
    for wrong, refused in ((1, False), (2, True)):
        art = ref.copy()
        rows = np.arange(10, 10 + wrong)
        art[rows, 1 - y[rows]] = 4.0  # 89 or 88 right
        record, failures = _gate(art, ref, y, Tolerance(top1_agreement=0.9, acc_drop=0.01, max_abs=None))
        assert record["metric_drop"]["val"]["acc"] == pytest.approx(wrong / 100)
        assert bool(failures) == refused, failures


def test_the_metric_gate_holds_each_task_and_an_rtol_alone_and_says_what_it_could_not_check():
    """One task of a two-head model lost 3 points against a 2-point limit and passed in the mean over tasks; a
    tolerance of rtol alone (max_abs null) checked nothing; an undefined AUC switched its limit off silently."""
    from edgekd.export.profile import Tolerance

    rng, n = np.random.default_rng(0), 100
    y = np.concatenate([rng.integers(0, 2, n), 2 + rng.integers(0, 2, n)])
    ref = np.zeros((2 * n, 4))
    ref[np.arange(2 * n), y] = 3.0
    art = ref.copy()
    flipped = np.flatnonzero(y < 2)[:3]
    art[flipped, y[flipped]], art[flipped, 1 - y[flipped]] = 0.0, 3.0
    record, failures = _gate(art, ref, y, Tolerance(top1_agreement=0.95, acc_drop=0.02, auc_drop=0.5),
                             heads=[("a", 0, 2), ("b", 2, 4)])
    assert record["metric_drop"]["val"]["acc"] == pytest.approx(0.015)
    assert failures == ["val task 'a' ACC drops by 0.0300 > 0.02"]
    scaled = ref[:, :2] * 1.5
    _, failures = _gate(scaled, ref[:, :2], (y % 2), Tolerance(max_abs=None, rtol=1e-3, top1_agreement=1.0))
    assert len(failures) == 1 and failures[0].startswith("logit diff 1.5 at |reference| 3 > 0 + 0.001·|reference|")
    three = np.zeros((20, 3))
    labels = np.arange(20) % 2  # class 2 absent: AUC undefined
    three[np.arange(20), labels] = 2.0
    record, failures = _gate(three, three, labels, Tolerance(auc_drop=0.01))
    assert failures == [] and record["ungated"] == [
        "val AUC undefined (a class absent): its auc_drop limit 0.01 could not be checked"]


def tiny_context():
    """The export context _export_one reads: the default profile, a (1, 2, 2) input, a silent log."""
    from types import SimpleNamespace

    from edgekd.export.profile import load_profile

    return SimpleNamespace(profile=load_profile(None), input_shape=(1, 2, 2), log=lambda line: None)


def test_an_artifact_whose_runtime_raises_is_one_failed_record_not_an_aborted_export(tmp_path):
    """A RuntimeError of ONNX Runtime or OpenVINO (an INT8 graph its speed check could not run) ended the whole
    export: on_fail drop could not ship the artifacts that passed, and the error named no artifact."""
    from edgekd.export.artifact import ArtifactSession
    from edgekd.export.formats import ExportFormat
    from edgekd.export.parity import ParitySet
    from edgekd.export.run import _Outcome, _export_one

    def session(run):
        return ArtifactSession(["input"], ["logits"], [None, 1, 2, 2], [None, 2], run)

    def cannot(x):
        raise RuntimeError("NOT_IMPLEMENTED: QLinearConv")

    fmt = ExportFormat("onnx", ".onnx", ("fp32", "int8"), lambda c, p, q: {}, lambda q, p, t: session(cannot))
    x, y = np.zeros((8, 1, 2, 2), np.float32), np.array([0, 1] * 4)

    outcome = _Outcome([], [], [], timed_formats={"onnx"})
    outcome.fp32_sessions["onnx"] = session(lambda b: np.zeros((len(b), 2), np.float32))
    _export_one(fmt, "int8", tiny_context(), tmp_path,
                ParitySet(x, ["original"] * 8, {"val": (x, y), "test": (x, y)}), {}, 2, outcome)
    assert outcome.failures == ["onnx/int8: RuntimeError: NOT_IMPLEMENTED: QLinearConv"]
    assert outcome.records[0]["passed"] is False


def test_a_write_that_fails_on_a_full_disk_says_the_disk_is_full(tmp_path, monkeypatch):
    """A disk that filled mid-export was named only by the converter's 'iostream error'."""
    import shutil

    from edgekd.export.formats import ExportFormat
    from edgekd.export.parity import ParitySet
    from edgekd.export.run import _Outcome, _export_one

    def cannot_write(ctx, precision, path):
        raise RuntimeError("basic_ios::clear: iostream error")

    fmt = ExportFormat("onnx", ".onnx", ("fp32",), cannot_write, lambda q, p, t: None)
    x, y = np.zeros((4, 1, 2, 2), np.float32), np.array([0, 1] * 2)

    def run(free):
        monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12 - free, free))
        outcome = _Outcome([], [], [])
        _export_one(fmt, "fp32", tiny_context(), tmp_path, ParitySet(x, ["original"] * 4, {"val": (x, y)}), {}, 2,
                    outcome)
        return outcome.failures[0]

    assert run(10**10) == "onnx/fp32: RuntimeError: basic_ios::clear: iostream error"
    assert run(3 * 2**20) == (f"onnx/fp32: RuntimeError: basic_ios::clear: iostream error (the disk holding {tmp_path} "
                              "has 3 MiB free: a full disk is the likely cause)")


@pytest.mark.parametrize("hair", [False, True])
def test_split_images_are_the_dataset_items_held_uint8(tmp_path, hair):
    """The export keeps its metric splits uint8 and normalizes each batch as it is read: the values are the
    dataset's own items (gray 16-px images to a 3-channel model at 20 px, hair removal or not), bit for bit,
    for a slice, a row subset and one image, and a quarter of the float32 bytes."""
    from edgekd.data import build_data, build_transforms
    from edgekd.export.parity import NormalizedImages, join_split_images
    from edgekd.export.run import _split_images
    from torchvision.transforms import v2

    recipe = recipe_from_dict(tiny_recipe(write_npz(tmp_path / "t.npz", channels=1), image_size=20,
                                          data={"resize": 24, "hair_removal": hair}))
    data = build_data(recipe)
    pipeline = build_transforms(data.cfg, [], train=False)
    geometry, normalize = v2.Compose(pipeline.transforms[:-2]), v2.Compose(pipeline.transforms[-2:])
    dataset = data.dataset("val", train=False)
    x, y = _split_images(dataset, geometry, normalize)
    expected = np.stack([dataset[i][0].numpy() for i in range(len(dataset))])
    assert isinstance(x, NormalizedImages) and x.images.dtype == torch.uint8
    assert x.shape == expected.shape == (16, 3, 20, 20) and len(x) == 16
    assert y.tolist() == [dataset[i][1] for i in range(len(dataset))]
    assert np.array_equal(x[:], expected) and np.array_equal(x[3:7], expected[3:7])
    rows = np.array([5, 0, 9])
    assert np.array_equal(x[rows], expected[rows]) and np.array_equal(x.take(rows)[:], expected[rows])
    assert np.array_equal(x[2], expected[2]) and x[1:3].dtype == np.float32
    assert x.images.element_size() * x.images.nelement() * 4 == expected.nbytes
    joined = join_split_images([x, x.take(rows)])
    assert isinstance(joined, NormalizedImages) and np.array_equal(joined[:], np.concatenate([expected, expected[rows]]))
    other = NormalizedImages(x.images, v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.0] * 3, [1.0] * 3)]))
    with pytest.raises(ValueError, match="normalized differently"):
        NormalizedImages.concat([x, other])


def test_tta_views_the_model_never_trained_on_are_named():
    """The default profile's views (h/v-flip, rotation 15) on a chest X-ray model trained with rotation 10 and no
    flips: the gate and the runner use views the model never saw, where INT8 flips near ties. Named per view with
    the reason; a policy op (RandAugment) counts as rotating; a view the augment covers is not named."""
    from edgekd.export.parity import untrained_views

    views = ["original", "hflip", "vflip", "center_crop", "rot+15", "rot-15"]
    xray = [{"RandomResizedCrop": {"scale": [0.8, 1.0]}}, {"RandomRotation": {"degrees": 10}}]
    assert untrained_views(xray, views) == {
        "hflip": "no RandomHorizontalFlip in its augment", "vflip": "no RandomVerticalFlip in its augment",
        "rot+15": "its augment rotates by at most 10 degrees", "rot-15": "its augment rotates by at most 10 degrees"}
    oct_ = [{"RandomHorizontalFlip": {}}, {"RandomVerticalFlip": {"p": 0.5}}, {"RandomAffine": {"degrees": [-20, 20]}}]
    assert untrained_views(oct_, views) == {}
    assert set(untrained_views([{"RandAugment": {}}], views)) == {"hflip", "vflip"}
    assert untrained_views([{"RandomRotation": {"degrees": [0, 30]}}], ["rot-15"]) == {
        "rot-15": "its augment rotates by at most 0 degrees"}  # one way only: the other view is unseen
    assert untrained_views(None, ["original", "center_crop"]) == {}
    assert untrained_views(None, ["rot+15"]) == {"rot+15": "no rotation in its augment"}


def test_export_notes_untrained_tta_views_and_keeps_them_in_parity_json(tmp_path):
    ckpt = make_checkpoint(tmp_path, "edgekd_cnn_tiny")  # trained without augment
    profile = profile_from_dict({"parity": {"images": 4}, "tta": {"views": ["original", "vflip"]}, "threads": 1})
    said: list[str] = []
    export_checkpoint(ckpt, tmp_path / "b", ["onnx"], ["fp32"], profile, log=said.append)
    (note,) = [line for line in said if "never shown in training" in line]
    assert note.startswith("note: TTA view(s) vflip were never shown in training (no RandomVerticalFlip in its "
                           "augment: vflip)")
    parity = json.loads((tmp_path / "b" / "parity.json").read_text())
    assert parity["reference"]["untrained_views"] == {"vflip": "no RandomVerticalFlip in its augment"}


def test_a_card_without_overlays_says_why_even_when_the_error_has_no_text(tmp_path, monkeypatch):
    """An error without a message (ImportError() from a half-installed package) had ended the export with an
    IndexError where it meant to leave the overlays out."""
    from types import SimpleNamespace

    import edgekd.explain.gradcam
    from edgekd.export.run import card_explanations

    def broken(*_args, **_kwargs):
        raise ImportError()

    monkeypatch.setattr(edgekd.explain.gradcam, "card_overlays", broken)
    said: list[str] = []
    data = SimpleNamespace(dataset=lambda *_a, **_k: None, cfg=None)
    assert card_explanations(None, {}, data, tmp_path, {}, said.append) == []
    assert said == ["card: no Grad-CAM overlays (ImportError)"]


def test_an_export_over_the_bundle_that_holds_its_checkpoint_is_refused(tmp_path):
    """`export bb/best.pt --out bb`: the old bundle was deleted at publish, and the checkpoint with it."""
    ckpt = make_checkpoint(tmp_path, "edgekd_cnn_tiny")
    profile = profile_from_dict({"parity": {"images": 4}, "tta": {"views": ["original"]}, "threads": 1})
    export_checkpoint(ckpt, tmp_path / "bb", ["onnx"], ["fp32"], profile, log=quiet)
    kept = tmp_path / "bb" / "best.pt"
    shutil.copy(ckpt, kept)
    with pytest.raises(EdgeKDError, match=r"--out \S+bb: holds the input \S+best.pt, which replacing it would delete"):
        export_checkpoint(kept, tmp_path / "bb", ["onnx"], ["fp32"], profile, log=quiet)
    assert kept.is_file() and (tmp_path / "bb" / "edgekd.json").is_file()


def test_export_options_warned_as_ignored_only_when_they_are(tmp_path, monkeypatch, capsys):
    """`-p INT8 --calib-images 16` said "--calib-images applies to INT8, which this export does not build: ignored"
    (a case-sensitive check; the plan lowercases) and then applied it."""
    ckpt = make_checkpoint(tmp_path, "edgekd_cnn_tiny")
    assert cli(monkeypatch, "export", str(ckpt), "-f", "ONNX", "-p", "INT8", "--calib-images", "8",
               "--parity-images", "4", "--out", str(tmp_path / "a")) == 0
    assert "does not build" not in capsys.readouterr().err
    assert cli(monkeypatch, "export", str(ckpt), "-f", "onnx", "-p", "fp32", "--calib-images", "8",
               "--parity-images", "4", "--out", str(tmp_path / "b")) == 0
    assert "warning: --calib-images applies to INT8, which this export does not build: ignored" in \
        capsys.readouterr().err


def test_the_cards_metrics_are_of_the_decisions_positive_class():
    """edgekd.json's metrics (the card's clinical table, serve's /metadata) gave class 1's sensitivity and
    specificity beside an operating point of `decision.positive: 0`: the two tables of one card contradicted."""
    from edgekd.export.parity import split_metrics

    labels = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    logits = np.zeros((8, 2))
    logits[[0, 3, 4, 5, 6], 1] = 2.0  # image 0 called 1: class 0 gets 2 of 3 right
    logits[7, 0] = 2.0  # image 7 called 0: class 1 gets 4 of 5 right
    one, zero = split_metrics(labels, logits), split_metrics(labels, logits, positive=0)
    assert one["sensitivity"] == pytest.approx(4 / 5) and one["specificity"] == pytest.approx(2 / 3)
    assert zero["sensitivity"] == pytest.approx(2 / 3) and zero["specificity"] == pytest.approx(4 / 5)


@pytest.mark.slow
def test_an_export_scores_its_metrics_for_the_profiles_positive_class(tmp_path):
    ckpt = make_checkpoint(tmp_path, "edgekd_cnn_tiny", train_epochs=1)
    metrics = {}
    for positive in (1, 0):
        profile = profile_from_dict({"parity": {"images": 4}, "decision": {"positive": positive}})
        result = export_checkpoint(ckpt, tmp_path / f"b{positive}", ["onnx"], ["fp32"], profile, log=quiet)
        metrics[positive] = result.metadata["metrics"]["test"]
        assert result.metadata["decision"]["positive_index"] == positive
    assert metrics[0]["sensitivity"] == pytest.approx(metrics[1]["specificity"])
    assert metrics[0]["specificity"] == pytest.approx(metrics[1]["sensitivity"])
    assert metrics[0]["sensitivity"] != pytest.approx(metrics[0]["specificity"])  # a case that tells them apart


def test_the_card_lists_the_warnings_about_the_checkpoint_itself(tmp_path):
    """A model no better than calling every image its largest class was warned of on the console only: the card of
    a continual model whose first task had collapsed showed a retention above 100% and a passed gate, nothing else."""
    ckpt = make_checkpoint(tmp_path, "edgekd_cnn_tiny")  # untrained: it calls every image one class
    result = export_checkpoint(ckpt, tmp_path / "b", ["onnx"], ["fp32"], profile_from_dict({"parity": {"images": 4}}),
                               log=quiet)
    warned = result.parity["reference"]["warnings"]
    assert warned and all("no better than calling every" in w for w in warned)
    card = (tmp_path / "b" / "card.md").read_text()
    assert "Warnings about the checkpoint itself" in card and all(f"- {w}" in card for w in warned)
