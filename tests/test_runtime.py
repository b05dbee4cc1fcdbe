"""The torch-free runtime: bundle checks, preprocessing/TTA parity with torchvision, backends, `edgekd predict`."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, export_plain_onnx, random_pixels, run_edgekd
from edgekd.errors import EdgeKDError
from edgekd.runtime import Failure, Preprocessor, Runner, open_bundle, softmax
from edgekd.runtime.backends import Slot
from edgekd.runtime.bundle import validate_metadata
from edgekd.runtime.preprocess import to_channels
from edgekd.runtime.tta import TTAViews

CLASS_NAMES = ["normal", "pneumonia", "other"]
SIZE = 16


def _data_cfg(image_size=SIZE, resize=None, channels=3, mean=(0.5, 0.4, 0.3), std=(0.25, 0.3, 0.2)):
    from edgekd.recipe import DataConfig

    return DataConfig(image_size=image_size, resize=resize, channels=channels,
                      mean=list(mean[:channels]), std=list(std[:channels]))


def write_test_bundle(out: Path, model, data_cfg, class_names, zip_too: bool = False) -> Path:
    """A bundle per notes/bundle.md, written the plain way (ONNX via torch.onnx, IR via openvino) for tests."""
    import openvino as ov
    import torch

    from edgekd.data import preprocess_spec

    out.mkdir(parents=True)
    (out / "onnx").mkdir()
    (out / "openvino").mkdir()
    c, s = data_cfg.channels, data_cfg.image_size
    example = torch.randn(2, c, s, s)
    onnx_path = out / "onnx" / "model_fp32.onnx"
    export_plain_onnx(model, onnx_path, example)
    ov_model = ov.convert_model(str(onnx_path))
    ov.save_model(ov_model, str(out / "openvino" / "model_fp32.xml"), compress_to_fp16=False)
    ov.save_model(ov_model, str(out / "openvino" / "model_fp16.xml"), compress_to_fp16=True)
    meta = {
        "schema": "edgekd-bundle/1", "edgekd_version": "0.1.0", "created": "2025-01-01T00:00:00Z",
        "model": {"name": "edgekd_cnn_tiny", "role": "student", "params": 1, "dataset": "synthetic"},
        "class_names": class_names, "preprocess": preprocess_spec(data_cfg),
        "tta": {"views": ["original", "hflip", "vflip", "center_crop", "rot+15", "rot-15"],
                "center_crop_fraction": 0.875, "ensemble": "mean_softmax"},
        "io": {"input": "input", "output": "logits", "dynamic_batch": True},
        "artifacts": [{"format": "onnx", "precision": "fp32", "path": "onnx/model_fp32.onnx"},
                      {"format": "openvino", "precision": "fp32", "path": "openvino/model_fp32.xml"},
                      {"format": "openvino", "precision": "fp16", "path": "openvino/model_fp16.xml"}],
        "metrics": {}, "parity": "parity.json",
    }
    (out / "edgekd.json").write_text(json.dumps(meta, indent=2))
    (out / "parity.json").write_text("{}")
    (out / "card.md").write_text("# test bundle\n")
    write_manifest(out)
    return out


def write_manifest(root: Path) -> None:
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(root).as_posix()}"
             for p in sorted(root.rglob("*")) if p.is_file() and p.name != "manifest.sha256"]
    (root / "manifest.sha256").write_text("\n".join(lines) + "\n")


def _tiny_model(channels=3, classes=3, seed=0):
    import torch

    from edgekd.models import create_model

    torch.manual_seed(seed)
    model = create_model({"name": "edgekd_cnn_tiny", "num_classes": classes, "in_chans": channels}).eval()
    # Non-trivial BN statistics so the logits depend strongly on the input (a fresh BN is nearly the identity).
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.fixture(scope="module")
def bundle_and_model(tmp_path_factory):
    model = _tiny_model()
    cfg = _data_cfg()
    root = write_test_bundle(tmp_path_factory.mktemp("bundle") / "b", model, cfg, CLASS_NAMES)
    return root, model, cfg


@pytest.fixture(scope="module")
def bundle(bundle_and_model) -> Path:
    return bundle_and_model[0]


# ---------------------------------------------------------------- torch-free

def test_runtime_and_predict_cli_never_import_torch(bundle, tmp_path):
    img = tmp_path / "x.png"
    Image.fromarray(random_pixels((20, 24, 3))).save(img)
    code = f"""
import sys
import numpy as np
import edgekd.runtime
r = edgekd.runtime.Runner.from_bundle({str(bundle)!r}, tta=True)
r.predict(np.zeros((20, 20), np.uint8))
edgekd.runtime.Runner.from_bundle({str(bundle)!r}, backend="onnx").predict({str(img)!r})
assert 'torch' not in sys.modules, 'runtime imported torch'
from edgekd import cli
sys.argv = ['edgekd', 'predict', {str(bundle)!r}, {str(img)!r}, '--tta', '--out', {str(tmp_path / 'p.json')!r}]
try:
    cli.run()
except SystemExit as e:
    assert not e.code, e.code
assert 'torch' not in sys.modules, 'edgekd predict imported torch'
print('NO_TORCH_OK')
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "NO_TORCH_OK" in proc.stdout
    assert json.loads((tmp_path / "p.json").read_text())["predictions"][0]["file"] == str(img)


# ---------------------------------------------------------------- preprocessing vs torchvision

@pytest.mark.parametrize("channels,resize", [(3, None), (1, None), (3, 20), (1, 12)])
@pytest.mark.parametrize("shape", [(16, 16, 1), (16, 16, 3), (16, 23, 3), (30, 16, 1), (21, 37, 3), (9, 13, 1),
                                   (64, 48, 3), (25, 25, 3)])
def test_preprocess_matches_torchvision(channels, resize, shape):
    import torch

    from edgekd.data import build_transforms, preprocess_spec

    cfg = _data_cfg(resize=resize, channels=channels)
    arr = random_pixels(shape, sum(shape) + channels)
    ref = build_transforms(cfg, [], train=False)(torch.from_numpy(arr).permute(2, 0, 1)).numpy()
    ours = Preprocessor(preprocess_spec(cfg))(arr)
    assert ours.shape == ref.shape == (channels, SIZE, SIZE) and ours.dtype == np.float32
    one_level = (1 / 255) / min(cfg.std)
    if min(shape[:2]) == (resize or SIZE):  # gray <-> RGB included (torch's fused multiply-adds re-done)
        np.testing.assert_array_equal(ours, ref)  # same float32 ops in the same order: bit-exact
    else:  # Pillow's and torch's fixed-point antialias filters round apart (2 levels at 25 -> 20 px, 1.25x)
        diff = np.abs(ours - ref)
        assert diff.max() <= 2 * one_level * 1.001, diff.max() / one_level  # at most two uint8 levels
        assert diff.mean() <= one_level * 0.25


def test_rgb_to_gray_is_torchvisions_bit_for_bit():
    """Separate float32 multiply and add put 21 of the 16.7M colours one level below torch's fused multiply-add."""
    import torch
    from torchvision.transforms import v2

    rng = np.random.default_rng(0)
    colours = np.concatenate([[[20, 152, 7]], rng.integers(0, 256, (200_000, 3))]).astype(np.uint8)[:, None, :]
    ref = v2.functional.rgb_to_grayscale(torch.from_numpy(colours).permute(2, 0, 1).contiguous())[0].numpy()
    ours = to_channels(colours, 1)[..., 0]
    assert ours[0, 0] == ref[0, 0] == 96
    np.testing.assert_array_equal(ours, ref)


def test_preprocess_pads_small_image_like_torchvision():
    import torch

    from edgekd.data import build_transforms, preprocess_spec

    cfg = _data_cfg(image_size=20, resize=12)  # resize smaller than the crop: torchvision pads with zeros
    arr = random_pixels((12, 12, 3), 3)
    ref = build_transforms(cfg, [], train=False)(torch.from_numpy(arr).permute(2, 0, 1)).numpy()
    np.testing.assert_array_equal(Preprocessor(preprocess_spec(cfg))(arr), ref)


def test_wrong_input_rank_or_dtype_is_a_clear_error(bundle):
    runner = Runner.from_bundle(bundle, warmup=0)
    with pytest.raises(EdgeKDError, match=r"shape \(2, 16, 16, 3\).*predict_batch"):
        runner.predict(np.zeros((2, 16, 16, 3), np.uint8))
    with pytest.raises(EdgeKDError, match=r"shape \(16,\)"):
        runner.predict(np.zeros(16, np.uint8))
    with pytest.raises(EdgeKDError, match="uint8"):
        runner.predict(np.zeros((16, 16), np.float32))
    with pytest.raises(EdgeKDError, match=r"model input must have shape \(N, 3, 16, 16\)"):
        runner.infer(np.zeros((3, 16, 16), np.float32))


# ---------------------------------------------------------------- TTA views vs torchvision v2

def test_tta_views_match_torchvision():
    import torch
    from torchvision.transforms import v2

    F = v2.functional
    for channels in (1, 3):
        # A smooth image: interpolation differences stay small where there are no sharp edges.
        yy, xx = np.mgrid[0:SIZE * 2, 0:SIZE * 2]
        base = (127 + 100 * np.sin(xx / 4.0) * np.cos(yy / 5.0)).astype(np.uint8)
        arr = np.stack([base, base[::-1], base.T][:channels], axis=-1)
        t = torch.from_numpy(arr).permute(2, 0, 1)
        views = TTAViews(["original", "hflip", "vflip", "center_crop", "rot+15", "rot-15"], 0.875)
        ours = torch.from_numpy(views(arr)).permute(0, 3, 1, 2).int()
        h = w = arr.shape[0]
        ch, cw = round(0.875 * h), round(0.875 * w)
        ref = {
            "original": t, "hflip": F.horizontal_flip(t), "vflip": F.vertical_flip(t),
            "center_crop": F.resize(F.center_crop(t, [ch, cw]), [h, w], antialias=True),
            "rot+15": F.rotate(t, 15.0, interpolation=v2.InterpolationMode.BILINEAR, fill=0),
            "rot-15": F.rotate(t, -15.0, interpolation=v2.InterpolationMode.BILINEAR, fill=0),
        }
        for i, name in enumerate(views.names):
            diff = (ours[i] - ref[name].int()).abs()
            if name in ("original", "hflip", "vflip"):
                assert diff.max() == 0, name
            else:
                # Same geometry and the same fill blending as torchvision; torch's uint8 resize rounds in fixed
                # point, so a pixel may differ by 1.
                assert diff.max() <= 1 and diff.float().mean() <= 0.3, (name, diff.max(), diff.float().mean())
        # The rotation direction is right: +15 differs from torchvision's -15 much more than from its +15.
        wrong = (ours[4] - ref["rot-15"].int()).abs().float().mean()
        assert wrong > 4 * (ours[4] - ref["rot+15"].int()).abs().float().mean()


def test_unknown_tta_view_is_an_error():
    with pytest.raises(EdgeKDError, match="unknown TTA view 'rot90'"):
        TTAViews(["original", "rot90"])


# ---------------------------------------------------------------- runner vs bare backend

def _bare_onnx(path, x):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], {"input": x})[0]


def _bare_openvino(path, x):
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return compiled({"input": x})[compiled.output("logits")]


@pytest.mark.parametrize("backend", ["openvino", "onnx"])
def test_runner_equals_bare_backend_and_pytorch(bundle_and_model, backend):
    import torch

    root, model, cfg = bundle_and_model
    runner = Runner.from_bundle(root, backend=backend, threads=1)
    images = [random_pixels((SIZE, SIZE, 3), s) for s in range(4)] + [random_pixels((19, 27, 1), 9)]
    x = np.stack([runner.preprocessor(a) for a in images])
    bare = _bare_openvino(root / "openvino/model_fp32.xml", x) if backend == "openvino" else \
        _bare_onnx(root / "onnx/model_fp32.onnx", x)
    preds = runner.predict_batch(images)
    ours = np.stack([p.probs for p in preds])
    assert np.abs(ours - softmax(bare)).max() <= 1e-5
    assert np.abs(runner.infer(x) - bare).max() <= 1e-5
    single = runner.predict(images[4])
    assert np.abs(single.probs - ours[4]).max() <= 1e-5
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x)).numpy()
    assert np.abs(bare - torch_logits).max() <= 1e-4  # the export's FP32 parity tolerance
    assert [p.label for p in preds] == [CLASS_NAMES[int(i)] for i in torch_logits.argmax(1)]
    assert len({p.index for p in preds}) > 1 or np.ptp(ours[:, 0]) > 1e-3  # the fixture model is not constant


def test_openvino_static_shape_compiles_match_the_dynamic_model_and_stay_bounded(bundle_and_model):
    from edgekd.runtime.backends import MAX_CACHED_REQUESTS, OpenVINOBackend

    root, _, _ = bundle_and_model
    path = root / "openvino/model_fp32.xml"
    static = OpenVINOBackend(path, "input", "logits", threads=1)
    dynamic = OpenVINOBackend(path, "input", "logits", threads=1, static_shapes=False)
    assert static.static_shapes and not dynamic.static_shapes and static.input_dims[0] is None
    x = np.random.default_rng(0).random((7, 3, SIZE, SIZE), dtype=np.float32)
    for n in (1, 3, 7, 2, 5, 1):
        assert np.abs(static.infer(x[:n]) - dynamic.infer(x[:n])).max() <= 1e-5, n
    assert len(static.slots) == MAX_CACHED_REQUESTS and list(static.slots)[-1] == ("tensor", (1, 3, SIZE, SIZE))
    shapes = {key[1]: tuple(slot.request.get_input_tensor().shape) for key, slot in static.slots.items()}
    assert all(shape == key_shape for key_shape, shape in shapes.items())
    assert dynamic.slots[("tensor", (7, 3, SIZE, SIZE))].request.get_compiled_model().input(0).get_partial_shape().is_dynamic
    # Results are copies: the next call on the same request does not change an earlier result.
    first = static.infer(x[:1])
    kept = first.copy()
    static.infer(x[1:2])
    assert np.array_equal(first, kept)


@pytest.mark.parametrize("channels", [3, 1])
def test_image_path_preprocesses_in_the_backend_as_numpy_does(tmp_path, channels):
    # The runner hands uint8 (N, H, W, C) pixels to the backend; OpenVINO normalizes, transposes and applies the
    # softmax inside the compiled model (static and dynamic batch), ONNX Runtime in numpy. All must give the
    # softmax of the bare model on the numpy preprocessing, with the bundle's per-channel mean/std.
    from edgekd.runtime.backends import ONNXRuntimeBackend, OpenVINOBackend

    root = write_test_bundle(tmp_path / "b", _tiny_model(channels=channels), _data_cfg(channels=channels), CLASS_NAMES)
    pre = Preprocessor(open_bundle(root).preprocess)
    images = random_pixels((5, SIZE, SIZE, channels), 3)
    backends = [OpenVINOBackend(root / "openvino/model_fp32.xml", "input", "logits", threads=1, preprocessor=pre),
                OpenVINOBackend(root / "openvino/model_fp32.xml", "input", "logits", threads=1, preprocessor=pre,
                                static_shapes=False),
                ONNXRuntimeBackend(root / "onnx/model_fp32.onnx", "input", "logits", threads=1, preprocessor=pre)]
    expected = softmax(backends[0].infer(pre.normalize(images)))
    assert np.ptp(expected[:, 0]) > 1e-4  # the inputs lead to different outputs (100x the tolerance below)
    # With TTA views (OpenVINO: built inside the model, exact in float32, so the numpy views' very pixels).
    views = TTAViews(["original", "hflip", "vflip", "center_crop", "rot+15", "rot-15"], 0.8)
    expected_views = softmax(backends[0].infer(pre.normalize(np.concatenate([views(a) for a in images]))))
    for backend in backends:
        for n in (5, 1):
            slot = backend.image_slot(n)
            slot.inputs[...] = images[:n]
            probs = slot.run()
            assert probs.shape == (n, len(CLASS_NAMES))
            assert np.abs(probs - expected[:n]).max() <= 1e-6, (backend.name, n)
            # Slots are reused per size (their memory is bound to the model) and results are fresh arrays.
            assert backend.image_slot(n) is slot
            kept = probs.copy()
            slot.inputs[...] = images[::-1][:n]
            assert np.abs(slot.run() - expected[::-1][:n]).max() <= 1e-6 and np.array_equal(probs, kept)
            slot = backend.image_slot(n, views)
            slot.inputs[...] = images[:n]
            probs = slot.run()
            assert probs.shape == (n * len(views), len(CLASS_NAMES))
            assert np.abs(probs - expected_views[:n * len(views)]).max() <= 1e-6, (backend.name, n, "views")
    request = backends[0].slots[("images", 1, None, None)].request
    assert request.get_input_tensor().element_type.get_type_name() == "u8"
    assert tuple(request.get_input_tensor().shape) == ((1, SIZE, SIZE, 3) if channels == 3 else (1, 1, SIZE, SIZE))
    if channels == 3:  # gray images handed over as one channel, repeated to RGB inside (or in numpy for ORT)
        gray = images[..., :1]
        expected_gray = softmax(backends[0].infer(pre.normalize(np.repeat(gray, 3, axis=-1))))
        for backend in backends:
            slot = backend.image_slot(5, None, 1)
            slot.inputs[...] = gray
            assert np.abs(slot.run() - expected_gray).max() <= 1e-6, backend.name
            slot = backend.image_slot(2, views, 1)
            slot.inputs[...] = gray[:2]
            assert np.abs(slot.run() - softmax(backends[0].infer(pre.normalize(
                np.concatenate([views(np.repeat(a, 3, axis=-1)) for a in gray[:2]]))))).max() <= 1e-6, backend.name
        # Gray pixels are declared NCHW (the same memory as (5, H, W, 1)): no transpose in the model.
        assert tuple(backends[0].slots[("images", 5, None, 1)].request.get_input_tensor().shape) == (5, 1, SIZE, SIZE)
        with pytest.raises(EdgeKDError, match="2 channels cannot feed a 3-channel model"):
            backends[0].image_slot(1, None, 2)
    with pytest.raises(EdgeKDError, match="without a preprocessing spec"):
        OpenVINOBackend(root / "openvino/model_fp32.xml", "input", "logits", threads=1).image_slot(1)


@pytest.mark.parametrize("backend", ["openvino", "onnx"])
def test_batched_tta_equals_per_view_runs(bundle, backend):
    runner = Runner.from_bundle(bundle, backend=backend, tta=True)
    arr = random_pixels((24, 20, 3), 5)
    pred = runner.predict(arr)
    assert list(pred.view_probs) == ["original", "hflip", "vflip", "center_crop", "rot+15", "rot-15"]
    for name, probs in pred.view_probs.items():
        alone = runner.predict(arr, tta=[name])
        assert np.abs(alone.view_probs[name] - probs).max() <= 1e-5, name
    np.testing.assert_allclose(pred.probs, np.mean(list(pred.view_probs.values()), axis=0), atol=1e-12)
    assert pred.index == int(np.argmax(pred.probs))
    # Views really differ, and TTA off gives the original view alone.
    assert max(np.abs(p - pred.view_probs["original"]).max() for p in pred.view_probs.values()) > 1e-4
    plain = runner.predict(arr, tta=False)
    assert plain.view_probs is None
    assert np.abs(plain.probs - pred.view_probs["original"]).max() <= 1e-5


def test_tta_batch_of_images_is_one_inference_call(bundle):
    runner = Runner.from_bundle(bundle, tta=["original", "hflip", "rot+15"], warmup=0)
    calls = []
    image_slot = runner.backend.image_slot

    def counted(n, views, channels):
        slot = image_slot(n, views, channels)
        calls.append((n, views.names))
        return Slot(slot.inputs, lambda: calls.append("run") or slot.run(), slot.request)

    runner.backend.image_slot = counted
    preds = runner.predict_batch([random_pixels((SIZE, SIZE, 3), s) for s in range(4)])
    assert calls == [(4, ["original", "hflip", "rot+15"]), "run"] and len(preds) == 4
    # One (4 images x 3 views) compiled model: the views are built inside the model.
    request = runner.backend.slots[("images", 4, runner.tta_views, 3)].request
    assert tuple(request.get_input_tensor().shape) == (4, SIZE, SIZE, 3)
    assert tuple(request.get_output_tensor().shape) == (12, len(CLASS_NAMES))


def test_fp16_artifact_runs_close_to_fp32(bundle):
    arr = random_pixels((SIZE, SIZE, 3), 11)
    r32, r16 = Runner.from_bundle(bundle, precision="fp32"), Runner.from_bundle(bundle, precision="fp16")
    # the FP16 request loads the FP16 file (on CPU its weights run as f32, so the outputs alone cannot tell)
    assert (r32.info["artifact"], r16.info["artifact"]) == ("openvino/model_fp32.xml", "openvino/model_fp16.xml")
    import openvino as ov

    ops = ov.Core().read_model(bundle / r16.info["artifact"]).get_ops()
    assert any(op.get_type_name() == "Constant" and op.get_output_element_type(0) == ov.Type.f16 for op in ops)
    p32, p16 = r32.predict(arr), r16.predict(arr)
    assert np.abs(p32.probs - p16.probs).max() <= 1e-2
    with pytest.raises(EdgeKDError, match=r": no int8 model in the bundle \(it has: onnx/fp32, "):
        Runner.from_bundle(bundle, backend="onnx", precision="int8")


def test_without_precision_the_most_precise_model_in_the_bundle_runs(bundle):
    # A bundle of one non-FP32 model needed --precision: the default fp32 was "not in the bundle".
    from dataclasses import replace

    from edgekd.runtime import open_bundle

    full = open_bundle(bundle)
    assert Runner.from_bundle(full, warmup=0).precision == "fp32"
    fp16_only = replace(full, artifacts=[a for a in full.artifacts if a.precision == "fp16"])
    only = Runner.from_bundle(fp16_only, warmup=0)
    assert only.precision == "fp16" and only.info["artifact"] == "openvino/model_fp16.xml"
    # A backend that cannot run the most precise model is an error, not a quieter fallback (e.g. to INT8).
    with pytest.raises(EdgeKDError, match=r"no onnx fp16 model in the bundle \(it has: openvino/fp16; --backend "
                                          r"openvino runs its openvino fp16 model\)"):
        Runner.from_bundle(fp16_only, backend="onnx", warmup=0)
    # no model of that precision at all: said so, not named after the backend asked for (which read as if another
    # backend could run it)
    with pytest.raises(EdgeKDError, match=r": no int8 model in the bundle \(it has: openvino/fp16\)$"):
        Runner.from_bundle(fp16_only, backend="openvino", precision="int8", warmup=0)


def test_predict_many_keeps_order_and_reports_bad_inputs(bundle, tmp_path):
    runner = Runner.from_bundle(bundle, warmup=0)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    good = [random_pixels((SIZE, SIZE, 3), s) for s in range(5)]
    items = [good[0], good[1], bad, good[2], np.zeros((2, 2, 2, 2), np.uint8), good[3], good[4]]
    results = list(runner.predict_many(items, batch=2))
    assert [type(r).__name__ for r in results] == ["Prediction", "Prediction", "Failure", "Prediction", "Failure",
                                                   "Prediction", "Prediction"]
    assert "bad.png" in results[2].error
    expected = runner.predict_batch(good)
    for r, e in zip([r for r in results if not isinstance(r, Failure)], expected):
        assert np.abs(r.probs - e.probs).max() <= 1e-5


# ---------------------------------------------------------------- bundle integrity

def test_tampered_file_fails_manifest_check(bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    open_bundle(copy)  # intact copy opens
    model = copy / "onnx" / "model_fp32.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(EdgeKDError, match=r"onnx/model_fp32\.onnx does not match its sha256") as err:
        Runner.from_bundle(copy)
    assert "\n" not in str(err.value)
    shutil.copy(bundle / "onnx" / "model_fp32.onnx", model)
    (copy / "extra.txt").write_text("smuggled")
    with pytest.raises(EdgeKDError, match="extra.txt is not listed"):
        open_bundle(copy)
    (copy / "extra.txt").unlink()
    (copy / "card.md").unlink()
    with pytest.raises(EdgeKDError, match="card.md is listed .* but missing"):
        open_bundle(copy)


@pytest.mark.parametrize("mutate,message", [
    (lambda m: m.update(schema="edgekd-bundle/2"), r"schema must be 'edgekd-bundle/1', got 'edgekd-bundle/2' \(written "
                                                   r"by a newer edgekd: upgrade edgekd here"),
    (lambda m: m.update(schema="other/1"), r"schema must be 'edgekd-bundle/1', got 'other/1'$"),
    (lambda m: m["preprocess"].update(mean=[0.5]), r"preprocess.mean must be a list of 3 finite numbers"),
    (lambda m: m["preprocess"].update(input_size=[3, 16]), r"preprocess.input_size"),
    (lambda m: m.update(class_names=[]), "class_names"),
    (lambda m: m["artifacts"][0].update(path="../../etc/passwd.onnx"), r"artifacts\[0\].path"),
    (lambda m: m["artifacts"][0].update(format="tflite"), r"artifacts\[0\].format"),
    (lambda m: m["tta"].update(views=["original", "rot90"]), "tta.views"),
    (lambda m: m.pop("io"), "io must name"),
])
def test_metadata_schema_errors(bundle, mutate, message):
    meta = json.loads((bundle / "edgekd.json").read_text())
    validate_metadata(meta)
    mutate(meta)
    with pytest.raises(EdgeKDError, match=message):
        validate_metadata(meta)


def test_zip_bundle_loads_and_predicts_like_the_folder(bundle, tmp_path):
    archive = tmp_path / "bundle.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(bundle.rglob("*")):
            if p.is_file():
                zf.write(p, f"b/{p.relative_to(bundle).as_posix()}")  # zipped with its top folder
    arr = random_pixels((SIZE, SIZE, 3), 2)
    from_zip = Runner.from_bundle(archive).predict(arr)
    from_dir = Runner.from_bundle(bundle).predict(arr)
    np.testing.assert_array_equal(from_zip.probs, from_dir.probs)
    # close() (or leaving a `with`) removes the extracted files at once, not when the Runner is collected
    with Runner.from_bundle(archive) as runner:
        root = runner.bundle.root
        assert root.is_dir() and runner.predict(arr).probs.shape == from_zip.probs.shape
    assert not root.exists()
    opened = open_bundle(archive)  # a Bundle the caller opened stays the caller's
    Runner.from_bundle(opened).close()
    assert opened.root.is_dir()
    opened.close()
    assert not opened.root.exists()


@pytest.mark.parametrize("member", ["../evil.txt", "/abs/evil.txt", "ok/../../evil.txt", "C:/evil.txt"])
def test_zip_path_traversal_is_rejected(bundle, tmp_path, member):
    archive = tmp_path / "zips" / "bundle.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(bundle.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(bundle).as_posix())
        zf.writestr(member, "pwned")
    before = set(tmp_path.rglob("*"))
    with pytest.raises(EdgeKDError, match="refusing zip member"):
        open_bundle(archive)
    assert set(tmp_path.rglob("*")) == before
    assert not (tmp_path / "evil.txt").exists()


def test_not_a_bundle_is_an_error(tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(EdgeKDError, match=r"x.txt: not a bundle \(expected a directory or a .zip file\)$"):
        open_bundle(tmp_path / "x.txt")
    (tmp_path / "notes.zip").write_text("hello")  # named .zip: said to be no zip, not "expected a .zip file"
    with pytest.raises(EdgeKDError, match=r"notes.zip: not a zip file \(it does not start like one\): not a bundle$"):
        open_bundle(tmp_path / "notes.zip")
    (tmp_path / "notes.zip").unlink()
    with pytest.raises(EdgeKDError, match=r"not a bundle \(no edgekd.json or manifest.sha256 in it\)$"):
        open_bundle(tmp_path)  # it walked the folder first: any symlink below it was the error
    (tmp_path / "best.pt").write_bytes(b"")
    with pytest.raises(EdgeKDError, match="in it\); a training run: export it first"):
        open_bundle(tmp_path)
    (tmp_path / "edgekd.json").write_text("{}")
    with pytest.raises(EdgeKDError, match="manifest.sha256 is missing"):
        open_bundle(tmp_path)


# ---------------------------------------------------------------- edgekd predict

def _write_mixed_folder(folder: Path) -> None:
    folder.mkdir()
    Image.fromarray(random_pixels((16, 16, 3), 1)).save(folder / "rgb.png")
    Image.fromarray(random_pixels((20, 17, 1), 2)[..., 0]).save(folder / "gray.jpg")
    Image.fromarray(random_pixels((18, 18, 3), 3)).save(folder / "scan.tif")
    Image.fromarray(random_pixels((16, 16, 3), 4)).save(folder / "img.bmp")
    wide = (np.random.default_rng(5).integers(0, 65535, size=(16, 24))).astype(np.uint16)
    Image.fromarray(wide).save(folder / "deep16.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (folder / "notes.txt").write_text("not an image: ignored in folders")


def test_predict_cli_folder_with_a_corrupt_file(bundle, tmp_path):
    from typer.testing import CliRunner

    from edgekd.cli import app

    folder = tmp_path / "imgs"
    _write_mixed_folder(folder)
    cli = CliRunner()
    res = cli.invoke(app, ["predict", str(bundle), str(folder), "--tta", "--batch", "2",
                           "--out", str(tmp_path / "preds.csv")])
    assert res.exit_code == 1, res.output
    assert "broken.png" in res.output
    rows = (tmp_path / "preds.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert header[:4] == ["file", "label", "index", "prob"] and "hflip:p_normal" in header
    by_file = {Path(r.split(",")[0]).name: r.split(",") for r in rows[1:]}
    assert set(by_file) == {"rgb.png", "gray.jpg", "scan.tif", "img.bmp", "deep16.png", "broken.png"}
    assert by_file["broken.png"][1] == "" and "broken.png" in by_file["broken.png"][-1]
    assert by_file["rgb.png"][1] in CLASS_NAMES and by_file["rgb.png"][-1] == ""

    res = cli.invoke(app, ["predict", str(bundle), str(folder / "*.png"), str(tmp_path / "missing.png"),
                           "--backend", "onnx", "--out", str(tmp_path / "preds.json")])
    assert res.exit_code == 1
    preds = json.loads((tmp_path / "preds.json").read_text())
    ok = {Path(p["file"]).name: p for p in preds["predictions"] if "error" not in p}
    bad = {Path(p["file"]).name for p in preds["predictions"] if "error" in p}
    assert set(ok) == {"rgb.png", "deep16.png"} and bad == {"broken.png", "missing.png"}
    assert preds["format"] == "onnx" and abs(sum(ok["rgb.png"]["probs"].values()) - 1) < 1e-6
    # Same image, same prediction whether it came through the CLI or the API.
    api = Runner.from_bundle(bundle, backend="onnx").predict(folder / "rgb.png")
    assert abs(ok["rgb.png"]["prob"] - api.prob) < 1e-6 and ok["rgb.png"]["label"] == api.label


def test_predict_cli_all_good_exits_zero_and_bad_out_suffix_is_refused(bundle, tmp_path):
    from typer.testing import CliRunner

    from edgekd.cli import app

    img = tmp_path / "a.png"
    Image.fromarray(random_pixels((16, 16, 3))).save(img)
    res = CliRunner().invoke(app, ["predict", str(bundle), str(img)])
    assert res.exit_code == 0, res.output
    assert "a.png" in res.output
    res = CliRunner().invoke(app, ["predict", str(bundle), str(img), "--out", str(tmp_path / "p.xlsx")])
    assert res.exit_code != 0 and not (tmp_path / "p.xlsx").exists()
    # --out is written before the table is printed: a table that cannot be shown (stdout a closed pipe) had lost
    # the whole run's results
    import edgekd.cli.deployment as deployment

    def closed_pipe(*args, **kwargs):
        raise BrokenPipeError(32, "Broken pipe")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(deployment, "predictions_table", closed_pipe)
        res = CliRunner().invoke(app, ["predict", str(bundle), str(img), "--out", str(tmp_path / "p.csv")])
    assert res.exit_code != 0 and "a.png" in (tmp_path / "p.csv").read_text()


def test_predict_says_when_openvino_runs_an_onnx_file_the_export_checked_on_onnx_runtime_only():
    """A bundle without an OpenVINO INT8 model: `predict --precision int8` on the default backend runs the ONNX INT8
    file on OpenVINO, which the export's runner check never did (it runs the most precise ONNX file there)."""
    from types import SimpleNamespace

    from edgekd.runtime import ungated_path_note

    from edgekd.formats import PRECISIONS

    def runner(backend, fmt, precision, pairs=(("onnx", "fp32"), ("onnx", "int8"), ("openvino", "fp32"))):
        arts = [SimpleNamespace(format=f, precision=p) for f, p in pairs]
        best = min((a.precision for a in arts), key=PRECISIONS.index)
        return SimpleNamespace(info={"backend": backend, "format": fmt}, precision=precision,
                               bundle=SimpleNamespace(artifacts=arts, most_precise=lambda: best))

    assert ungated_path_note(runner("openvino", "onnx", "int8")).startswith(
        "this bundle has no OpenVINO int8 model: OpenVINO runs its ONNX int8 file, which the export checked on ONNX "
        "Runtime only")
    for checked in (runner("onnx", "onnx", "int8"), runner("openvino", "openvino", "fp32"),
                    runner("openvino", "onnx", "fp32")):
        assert ungated_path_note(checked) is None
    # OpenVINO FP32 and ONNX INT8 only (parity drops): the ONNX INT8 never ran on OpenVINO, though it is ONNX's
    # most precise file (the note had been silent)
    assert ungated_path_note(runner("openvino", "onnx", "int8", (("openvino", "fp32"), ("onnx", "int8"))))
    assert ungated_path_note(runner("openvino", "onnx", "int8", (("onnx", "int8"),))) is None  # checked there


def test_an_onnx_int8_model_on_a_cpu_without_vnni_is_noted_when_the_export_checked_it_on_one_with_vnni():
    """ONNX Runtime's uint8 x int8 kernels saturate on AVX2 without VNNI unless the model was quantized with
    reduce_range: the export's gate ran on its own CPU (edgekd.json export_host), so a device without VNNI is told."""
    from types import SimpleNamespace

    from edgekd.runtime import int8_host_note

    avx2 = {"machine": "x86_64", "simd": ["avx2", "fma"], "int8_dot_product": False}
    vnni = {"machine": "x86_64", "simd": ["avx2", "fma", "avx512_vnni"], "int8_dot_product": True}

    def runner(backend="onnx", fmt="onnx", precision="int8", reduce_range=False, exported_on=vnni):
        meta = {"export_profile_settings": {"quantization": {"onnx": {"reduce_range": reduce_range}}}}
        if exported_on is not None:
            meta["export_host"] = exported_on
        return SimpleNamespace(info={"backend": backend, "format": fmt}, precision=precision,
                               bundle=SimpleNamespace(meta=meta))

    assert int8_host_note(runner(), avx2).startswith("this CPU has no INT8 dot-product instructions (VNNI)")
    assert int8_host_note(runner(exported_on=None), avx2) is not None  # a bundle from before the record
    for quiet, host in ((runner(), vnni), (runner(reduce_range=True), avx2), (runner(exported_on=avx2), avx2),
                        (runner(precision="fp32"), avx2), (runner(backend="openvino"), avx2),
                        (runner(backend="openvino", fmt="openvino"), avx2),
                        (runner(), {"machine": "aarch64", "simd": [], "int8_dot_product": False}),
                        (runner(), {"machine": "x86_64", "simd": [], "int8_dot_product": False})):
        assert int8_host_note(quiet, host) is None


def test_class_and_task_names_are_shown_as_written_in_the_predictions_tables():
    """Column headers took class names as rich markup: 'nevus [benign]' was shown as 'nevus ', and a name with
    '[/b]' raised a MarkupError after the whole run."""
    from types import SimpleNamespace

    from rich.console import Console

    from edgekd.cli.tables import predictions_table, task_predictions_table
    from edgekd.runtime import Prediction

    names = ["nevus [benign]", "mel [/b]"]
    runner = SimpleNamespace(class_names=names, temperature=1.0, bias=None, threshold=None, task=None,
                             info={"format": "onnx"}, tasks=[("lesion [x]", names)], precision="fp32")
    pred = Prediction("a.png", 1, names[1], np.array([0.2, 0.8]), names)
    console = Console(record=True, width=200)
    console.print(predictions_table("b", runner, [pred], "fp32", False))
    console.print(task_predictions_table("b", runner, [Failure("c.png", "bad")]))
    shown = console.export_text()
    assert all(name in shown for name in (*names, "lesion [x] label"))
    assert "b: onnx fp32" in shown and " on " not in shown  # its own runtime: not said
    runner.info = {"format": "onnx", "backend": "openvino"}  # OpenVINO running the ONNX file: said in the title
    console.print(predictions_table("b", runner, [pred], "int8", False))
    assert "b: onnx int8 on openvino" in console.export_text()


# ---------------------------------------------------------------- DICOM (pydicom: the dev and dicom extras)

def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int = 12,
                pixel_data: bool = True, **tags) -> Path:
    """A DICOM file written by pydicom: 2-D gray, (H, W, 3) RGB, or (frames, H, W) multi-frame gray pixels."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "OT"
    rgb = photometric == "RGB"
    if pixel_data:
        ds.Rows, ds.Columns = pixels.shape[-3:-1] if rgb else pixels.shape[-2:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = (3, "RGB") if rgb else (1, photometric)
        if rgb:
            ds.PlanarConfiguration = 0
        bits = 8 if pixels.dtype == np.uint8 else 16
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, min(bits, bits_stored), min(bits, bits_stored) - 1
        ds.PixelRepresentation = 0
        if pixels.ndim == 3 and not rgb:
            ds.NumberOfFrames = pixels.shape[0]
        ds.PixelData = pixels.tobytes()
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.save_as(str(path), enforce_file_format=True)
    return path


def test_dicom_modality_and_voi_luts_and_monochrome1(tmp_path):
    from edgekd.imageio import read_image

    raw = np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 16  # 0 .. 4080, 12-bit
    # rescale: value = 2 * raw - 1000 (-1000 .. 7160); window 2000 +- 1000: raw below 1000 clips low, above 2000 high
    tags = dict(RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=2000, WindowWidth=2000)
    mono2 = read_image(write_dicom(tmp_path / "a.dcm", raw, **tags))[..., 0]
    mono1 = read_image(write_dicom(tmp_path / "b.dcm", raw, photometric="MONOCHROME1", **tags))[..., 0]
    assert mono2.shape == (16, 16)
    assert np.array_equal(mono1, 255 - mono2)  # MONOCHROME1: low values are white
    assert (mono2[raw < 1000] == 0).all() and (mono2[raw > 2000] == 255).all()
    inside = (raw > 1020) & (raw < 1980)
    assert 0 < mono2[inside].min() and mono2[inside].max() < 255 and (np.diff(mono2.ravel()) >= 0).all()
    middle = mono2.ravel()[np.argmin(np.abs(raw.ravel() * 2 - 1000 - 2000))]
    assert abs(int(middle) - 128) <= 2  # the window centre maps to mid-grey
    # without the modality LUT the same window cuts elsewhere: the slope and intercept are applied
    plain = read_image(write_dicom(tmp_path / "c.dcm", raw, WindowCenter=2000, WindowWidth=2000))[..., 0]
    assert (plain[(raw > 2020) & (raw < 2980)] < 255).all() and (plain[raw > 3000] == 255).all()


def test_dicom_window_maps_to_grey_as_a_viewer_shows_it(tmp_path):
    """The window (or VOI LUT) decides black and white, not the image's own range: pixels that fill only the middle
    of a window stay mid-grey, as on the radiologist's screen; a file without a window is stretched by its range."""
    from edgekd.imageio import read_image

    raw = np.linspace(900, 1100, 16 * 16).astype(np.uint16).reshape(16, 16)  # the middle fifth of the window
    windowed = read_image(write_dicom(tmp_path / "w.dcm", raw, WindowCenter=1000, WindowWidth=1000))[..., 0]
    assert 95 <= windowed.min() <= 105 and 150 <= windowed.max() <= 160  # (900 - 500) / 1000 * 255 = 102
    assert abs(int(windowed.ravel()[np.argmin(np.abs(raw.ravel().astype(int) - 1000))]) - 128) <= 1
    plain = read_image(write_dicom(tmp_path / "p.dcm", raw))[..., 0]
    assert plain.min() == 0 and plain.max() == 255


def test_dicom_of_8_bits_or_fewer_reads_by_its_stored_range_whatever_its_identity_rescale(tmp_path):
    """Identical 8-bit pixels read 50..100 without rescale tags and 0..255 with an identity slope/intercept (pydicom
    returns floats then); a 1-bit mask read as 0/1, a blank image to the model."""
    from edgekd.imageio import read_image

    raw = (np.random.default_rng(0).random((16, 16)) * 50 + 50).astype(np.uint8)
    plain = read_image(write_dicom(tmp_path / "a.dcm", raw, bits_stored=8))[..., 0]
    identity = read_image(write_dicom(tmp_path / "b.dcm", raw, bits_stored=8, RescaleSlope=1, RescaleIntercept=0))
    assert np.array_equal(plain, raw) and np.array_equal(identity[..., 0], raw)  # as an 8-bit PNG reads
    mask = (np.arange(16 * 16).reshape(16, 16) % 3 == 0).astype(np.uint8)  # a 4-bit file holding 0/1 values
    four = read_image(write_dicom(tmp_path / "m.dcm", mask, bits_stored=4))[..., 0]
    assert set(np.unique(four)) == {0, 17}  # 1 of 0..15 is 17 of 0..255: the stored range, not the image's own
    rescaled = read_image(write_dicom(tmp_path / "r.dcm", raw, bits_stored=8, RescaleSlope=2, RescaleIntercept=0))
    assert rescaled.min() == 0 and rescaled.max() == 255  # a real rescale: the image's own range, as documented
    rgb = np.stack([raw, raw // 2 + 10, raw], axis=-1)  # 8-bit colour of a narrow range: as stored, not stretched
    assert np.array_equal(read_image(write_dicom(tmp_path / "c.dcm", rgb, photometric="RGB")), rgb)


def test_dicom_negative_slope_window_empty_rescale_palette_and_enhanced_frames(tmp_path):
    """Four files pydicom's top-level LUT functions read wrongly: a window under a negative RescaleSlope came out
    inverted; empty RescaleSlope/Intercept made the image unreadable; PALETTE COLOR came out as gray indices; an
    enhanced multi-frame file's window and rescale (functional groups) were ignored."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from edgekd.imageio import read_image

    raw = np.linspace(0, 3000, 16 * 16).reshape(16, 16).astype(np.uint16)
    lo, hi = 1500 - 0.5 - 999 / 2, 1500 - 0.5 + 999 / 2  # DICOM's LINEAR window of centre 1500, width 1000
    neg = read_image(write_dicom(tmp_path / "n.dcm", raw, RescaleSlope=-1, RescaleIntercept=3000, WindowCenter=1500,
                                 WindowWidth=1000))[..., 0]
    assert np.array_equal(neg, np.round(np.clip((3000.0 - raw - lo) / (hi - lo) * 255, 0, 255)).astype(np.uint8))
    empty = write_dicom(tmp_path / "e.dcm", raw)
    import pydicom
    ds = pydicom.dcmread(empty)
    ds.add_new("RescaleSlope", "DS", None)
    ds.add_new("RescaleIntercept", "DS", None)
    ds.save_as(empty)
    assert np.array_equal(read_image(empty), read_image(write_dicom(tmp_path / "p.dcm", raw)))
    # an empty slope beside a real intercept: the intercept still applies (it had been dropped with the slope)
    half = write_dicom(tmp_path / "h.dcm", raw, RescaleIntercept=-1000, WindowCenter=500, WindowWidth=1000)
    ds = pydicom.dcmread(half)
    ds.add_new("RescaleSlope", "DS", None)
    ds.save_as(half)
    assert np.array_equal(read_image(half), read_image(write_dicom(tmp_path / "w.dcm", raw, RescaleSlope=1,
                                                                   RescaleIntercept=-1000, WindowCenter=500,
                                                                   WindowWidth=1000)))
    # PALETTE COLOR: indices 0..3 through 8-bit red/green/blue tables
    idx = (np.arange(16 * 16).reshape(16, 16) % 4).astype(np.uint8)
    tables = {"Red": [0, 255, 0, 0], "Green": [0, 0, 255, 0], "Blue": [0, 0, 0, 255]}
    palette = {f"{c}PaletteColorLookupTableDescriptor": [4, 0, 8] for c in tables}
    palette.update({f"{c}PaletteColorLookupTableData": bytes(v) for c, v in tables.items()})
    rgb = read_image(write_dicom(tmp_path / "c.dcm", idx, photometric="PALETTE COLOR", bits_stored=8, **palette))
    assert rgb.shape == (16, 16, 3)
    assert np.array_equal(rgb[idx == 1], np.tile([255, 0, 0], ((idx == 1).sum(), 1)))
    assert np.array_equal(rgb[idx == 3], np.tile([0, 0, 255], ((idx == 3).sum(), 1)))
    # 8-bit entries stored in 16-bit words (pydicom returns uint16 values <= 255): scaled by the entries' depth
    words = {f"{c}PaletteColorLookupTableDescriptor": [4, 0, 8] for c in tables}
    words.update({f"{c}PaletteColorLookupTableData": np.asarray(v, "<u2").tobytes() for c, v in tables.items()})
    wide = read_image(write_dicom(tmp_path / "c16.dcm", idx, photometric="PALETTE COLOR", bits_stored=8, **words))
    assert np.array_equal(wide, rgb)
    # enhanced multi-frame: the shared group's rescale (-1024) and window (1000 +- 100), frame 2's own window
    frames = np.stack([raw, raw])
    path = write_dicom(tmp_path / "f.dcm", frames)
    ds = pydicom.dcmread(path)
    def group(center, width, intercept=None):
        item = Dataset()
        voi = Dataset()
        voi.WindowCenter, voi.WindowWidth = center, width
        item.FrameVOILUTSequence = Sequence([voi])
        if intercept is not None:
            pv = Dataset()
            pv.RescaleSlope, pv.RescaleIntercept, pv.RescaleType = 1, intercept, "HU"
            item.PixelValueTransformationSequence = Sequence([pv])
        return item
    ds.SharedFunctionalGroupsSequence = Sequence([group(1000, 200, intercept=-1024)])
    ds.PerFrameFunctionalGroupsSequence = Sequence([Dataset(), group(1500, 3000)])
    ds.save_as(path)
    def window(center, width):
        lo, hi = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
        return np.round(np.clip((raw - 1024.0 - lo) / (hi - lo) * 255, 0, 255)).astype(np.uint8)
    assert np.array_equal(read_image(path, frame=0)[..., 0], window(1000, 200))
    assert np.array_equal(read_image(path, frame=1)[..., 0], window(1500, 3000))  # per frame before shared
    one = write_dicom(tmp_path / "one.dcm", raw)  # a single-frame enhanced file: its one per-frame item counts
    ds = pydicom.dcmread(one)
    ds.SharedFunctionalGroupsSequence = Sequence([group(1000, 200, intercept=-1024)])
    ds.PerFrameFunctionalGroupsSequence = Sequence([group(1500, 3000)])
    ds.save_as(one)
    assert np.array_equal(read_image(one)[..., 0], window(1500, 3000))


def test_a_compressed_dicom_without_its_decoder_says_so(tmp_path):
    """JPEG-LS pixel data with no pydicom plugin installed: the error names the compression and what to install,
    not a bare 'unreadable pixel data (RuntimeError)' that reads like a corrupt file."""
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLSLossless

    from edgekd.imageio import read_image

    path = write_dicom(tmp_path / "jls.dcm", np.zeros((16, 16), np.uint16))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8 not decoded here"])
    ds["PixelData"].VR = "OB"
    ds.save_as(path)
    if pydicom.pixels.get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder plugin is installed here")
    with pytest.raises(EdgeKDError, match=r"jls.dcm: no decoder here for its JPEG-LS .* pip install"):
        read_image(path)
    from pydicom.uid import JPEG2000Lossless  # Pillow decodes JPEG 2000: its error named its buffer object

    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"not a JPEG 2000 codestream"])
    ds.save_as(path)
    with pytest.raises(EdgeKDError, match=r"jls.dcm: unreadable DICOM pixel data \(RuntimeError: .*cannot identify "
                                          r"image file\)$") as err:
        read_image(path)
    assert "object at 0x" not in str(err.value)
    from pydicom.data import get_testdata_file  # 12-bit JPEG: Pillow is there but cannot; the hint had been left out

    lossy = get_testdata_file("JPEG-lossy.dcm")
    decoder = pydicom.pixels.get_decoder(pydicom.dcmread(lossy).file_meta.TransferSyntaxUID)
    if set(decoder.available_plugins) != {"pillow"}:
        pytest.skip("a 12-bit JPEG decoder plugin is installed here (or Pillow's is not)")
    with pytest.raises(EdgeKDError, match=r"JPEG-lossy.dcm: no decoder here for its JPEG Extended .*\(pillow: Pillow "
                                          r"does not support .*12-bit precision; pydicom needs a plugin: pip install"):
        read_image(lossy)


def test_unreadable_dicom_pixel_data_gives_the_decoders_reason(tmp_path):
    """The error had named the exception type alone ("(ValueError)"), and --debug showed no more."""
    from edgekd.imageio import read_image

    short = write_dicom(tmp_path / "short.dcm", np.zeros((16, 16), np.uint16), PixelData=b"\0" * 10)
    with pytest.raises(EdgeKDError) as err:
        read_image(short)
    said = str(err.value)  # numpy's words after the type: "cannot reshape array of size 5 into shape (16,16)"
    assert said.startswith(f"{short}: unreadable DICOM pixel data (ValueError: ") and "reshape" in said


def test_dicom_is_detected_by_content_not_suffix(bundle, tmp_path):
    from edgekd.imageio import read_image, read_image_bytes

    rgb = random_pixels((16, 16, 3), seed=4)
    assert np.array_equal(read_image(write_dicom(tmp_path / "IM0001", rgb, photometric="RGB")), rgb)
    assert np.array_equal(read_image(write_dicom(tmp_path / "scan.png", rgb, photometric="RGB")), rgb)
    Image.fromarray(rgb).save(tmp_path / "fake.dcm", format="PNG")
    with pytest.raises(EdgeKDError, match="fake.dcm: not DICOM"):
        read_image(tmp_path / "fake.dcm")
    nopre = tmp_path / "nopreamble.dcm"  # the same dataset without the preamble and its DICM marker
    nopre.write_bytes((tmp_path / "IM0001").read_bytes()[132:])
    with pytest.raises(EdgeKDError, match="nopreamble.dcm: a DICOM data set without the Part 10 header"):
        read_image(nopre)  # named as what it is, not "not DICOM"; the same without a suffix, and uploaded
    (tmp_path / "nopreamble").write_bytes(nopre.read_bytes())
    with pytest.raises(EdgeKDError, match="nopreamble: a DICOM data set without the Part 10 header"):
        read_image(tmp_path / "nopreamble")
    with pytest.raises(EdgeKDError, match="upload: a DICOM data set without the Part 10 header"):
        read_image_bytes(nopre.read_bytes())
    (tmp_path / "blob").write_bytes(b"\x08\x00\x05\x00" + b"\xff" * 28)  # starts like group 0008, nothing more
    with pytest.raises(EdgeKDError, match="blob: not a supported image type"):
        read_image(tmp_path / "blob")


def test_multi_frame_dicom_a_series_folder_and_a_dicom_without_pixels_in_predict(bundle, tmp_path):
    from typer.testing import CliRunner

    from edgekd.cli import app
    from edgekd.imageio import read_image
    from edgekd.runtime import as_image_array
    from edgekd.runtime.inputs import collect_inputs

    series = tmp_path / "series"
    series.mkdir()
    frames = np.zeros((3, 16, 16), np.uint16)
    for k in range(3):
        frames[k, 4 * k:4 * k + 4] = 4000  # frame k: a bright band at rows 4k..4k+3
    multi = write_dicom(series / "cine.dcm", frames)
    for i in range(2):  # a series exported without suffixes
        write_dicom(series / f"1.2.3.{i}", random_pixels((16, 16), seed=i, high=4096, dtype=np.uint16))
    write_dicom(series / "report.dcm", frames[0], pixel_data=False, Modality="SR")
    (series / "notes.txt").write_text("not an image")
    items, problems = collect_inputs([series])
    assert not problems and [str(i) for i in items] == [f"{series}/1.2.3.0", f"{series}/1.2.3.1"] + [
        f"{multi}#frame{k}" for k in (1, 2, 3)] + [f"{series}/report.dcm"]
    assert [str(i) for i in collect_inputs([multi], frame=2)[0]] == [f"{multi}#frame2"]
    for k in range(3):
        arr = read_image(multi, frame=k)[..., 0]
        assert (arr[4 * k:4 * k + 4] == 255).all() and arr.sum() == 255 * 4 * 16
    with pytest.raises(EdgeKDError, match="a DICOM of 3 frames") as err:  # e.g. listed in a training CSV
        read_image(multi)
    assert "save the frame you mean as its own image" in str(err.value)  # train/explain have no --frame
    from edgekd.runtime.inputs import collect_labelled  # eval/bench --data DIR had scored each frame as an image

    (tmp_path / "labelled" / "normal").mkdir(parents=True)
    (tmp_path / "labelled" / "normal" / "cine.dcm").write_bytes(multi.read_bytes())
    with pytest.raises(EdgeKDError, match=r"normal/cine.dcm: a DICOM of 3 frames \(a labelled folder takes one image "):
        collect_labelled(tmp_path / "labelled", ["normal", "pneumonia"])
    single = series / "1.2.3.0"  # --frame on a single-image file: frame 1 is the image, frame 2 is an error
    assert collect_inputs([single], frame=1)[0] == [single]
    [frame2], _ = collect_inputs([single], frame=2)
    with pytest.raises(EdgeKDError, match=r"no frame 2 \(the file has 1\)"):
        as_image_array(frame2)
    from edgekd.runtime import DicomFrame  # the Python API's frames: a 0-based int, of a DICOM file only

    for index in (-1, 1.7, "1", True):  # -1 had said "no frame 0", 1.7 read as #frame2.7, "1" a TypeError
        with pytest.raises(EdgeKDError, match=r"the frame index is a 0-based int >= 0"):
            DicomFrame(multi, index)
    assert str(DicomFrame(multi, np.int64(1))) == f"{multi}#frame2"
    png = tmp_path / "a.png"
    Image.fromarray(random_pixels((16, 16), seed=3)).save(png)
    with pytest.raises(EdgeKDError, match=r"a.png: not DICOM, so it has no frame 6"):  # had been ignored, as #frame6
        as_image_array(DicomFrame(png, 5))
    from edgekd.serve.uploads import MULTI_FRAME_HINT, decode_upload  # the service names no CLI option

    with pytest.raises(EdgeKDError, match="a DICOM of 3 frames") as err:
        decode_upload(multi.read_bytes(), "application/dicom", "cine.dcm",
                      Runner.from_bundle(bundle).preprocessor, keep_gray=False)
    assert MULTI_FRAME_HINT in str(err.value) and "--frame" not in str(err.value)

    out = tmp_path / "p.json"
    res = CliRunner().invoke(app, ["predict", str(bundle), str(series), "--out", str(out)])
    assert res.exit_code == 1, res.output  # the report without pixels fails, the rest are predicted
    rows = json.loads(out.read_text())["predictions"]
    assert [r["file"] for r in rows[:5]] == [str(i) for i in items[:5]] and all("label" in r for r in rows[:5])
    assert rows[5]["file"] == str(series / "report.dcm") and "without pixel data (Secondary Capture Image Storage, " \
        "Modality SR): not an image" in rows[5]["error"]
    res = CliRunner().invoke(app, ["predict", str(bundle), str(multi), "--frame", "5", "--out", str(out)])
    assert res.exit_code == 1 and "no frame 5 (the file has 3)" in json.loads(out.read_text())["predictions"][0]["error"]


def test_runner_rejects_unknown_backend_and_precision(bundle):
    with pytest.raises(EdgeKDError, match="unknown backend 'tensorrt'"):
        Runner.from_bundle(bundle, backend="tensorrt")
    with pytest.raises(EdgeKDError, match="unknown precision 'int4'"):
        Runner.from_bundle(bundle, precision="int4")
    # Wrong types are one-line errors naming the argument (they had been AttributeErrors deep inside).
    for kwargs, words in (({"backend": None}, "backend must be a string, got None"),
                          ({"precision": 32}, "precision must be a string, got 32"),
                          ({"threshold": float("nan")}, "threshold must be a number in [0, 1], got nan"),
                          ({"threshold": 1.5}, "threshold must be a number in [0, 1], got 1.5")):
        with pytest.raises(EdgeKDError, match=re.escape(words)):
            Runner.from_bundle(bundle, **kwargs)
    with pytest.raises(EdgeKDError, match="expected a bundle path .* got 5"):
        Runner.from_bundle(5)


def test_predict_many_takes_one_image_as_one_input_and_infer_refuses_pixels(bundle, tmp_path):
    from PIL import Image

    runner = Runner.from_bundle(bundle, backend="onnx")
    size = runner.input_shape[-1]
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    one = runner.predict(pixels)
    # One array or PIL image is one input (an array had been read row by row, a PIL image had raised TypeError).
    for single in (pixels, Image.fromarray(pixels)):
        got = list(runner.predict_many(single))
        assert len(got) == 1 and np.allclose(got[0].probs, one.probs, atol=1e-6)
    stacked = list(runner.predict_many(np.stack([pixels, pixels])))  # (N, H, W, C): N images
    assert len(stacked) == 2 and np.allclose(stacked[1].probs, one.probs, atol=1e-6)
    gray = pixels[..., 0]
    grays = list(runner.predict_many(np.stack([gray] * 5)))  # (N, H, W): N gray images, as MedMNIST stores them
    assert len(grays) == 5 and np.allclose(grays[4].probs, runner.predict(gray).probs, atol=1e-6)
    assert len(runner.predict_batch(np.stack([gray] * 3))) == 3  # (3, H, W): 3 gray images, as documented
    deep = Image.fromarray(pixels[..., 0].astype(np.int32))  # mode I: had been stretched by its own min..max
    with pytest.raises(EdgeKDError, match=r"a PIL image of mode 'I' made in memory \(more than 8 bits a pixel\)"):
        runner.predict(deep)
    wide = (np.arange(size * size, dtype=np.uint16).reshape(size, size) * 60)
    Image.fromarray(wide).save(tmp_path / "deep16.png")  # a 16-bit file opened with PIL reads as its path does
    opened = runner.predict(Image.open(tmp_path / "deep16.png"))
    assert np.allclose(opened.probs, runner.predict(tmp_path / "deep16.png").probs, atol=1e-6)
    for bad in ("4", 2.5, True, 0):
        with pytest.raises(EdgeKDError, match="batch must be an integer >= 1"):
            next(runner.predict_many([pixels], batch=bad))
    with pytest.raises(EdgeKDError, match="expected images .* got int"):
        next(runner.predict_many(7))
    # infer() takes normalized float model input: uint8 pixels would be read as such, silently.
    with pytest.raises(EdgeKDError, match="model input must be float .* got uint8.*predict"):
        runner.infer(np.zeros((1, *runner.input_shape), np.uint8))
    assert runner.infer(np.zeros((1, *runner.input_shape), np.float32)).shape == (1, len(runner.class_names))


# ---------------------------------------------------------------- end to end with `edgekd export`

@pytest.mark.slow
def test_exported_bundle_predicts_like_pytorch(tmp_path, tiny_recipe_dict):
    """train (tiny) -> `edgekd export` (dir + zip) -> Runner and `edgekd predict --tta` agree with PyTorch."""
    import torch
    from typer.testing import CliRunner

    from edgekd.cli import app
    from edgekd.data import build_data, build_transforms
    from edgekd.recipe import recipe_from_dict
    from edgekd.train.checkpoint import model_from_checkpoint
    from edgekd.train.run import train_recipe

    # one epoch: a model that errs on val, so a temperature is fitted (a perfect val split keeps T at 1)
    recipe = recipe_from_dict({**tiny_recipe_dict, "train": {**tiny_recipe_dict["train"], "epochs": 1}})
    ckpt = train_recipe(recipe, tmp_path / "run", log=lambda *_: None).best_path
    bundle = tmp_path / "bundle"
    res = CliRunner().invoke(app, ["export", str(ckpt), "--format", "onnx,openvino", "--precision", "fp32",
                                   "--out", str(bundle), "--zip", "--parity-images", "16"])
    assert res.exit_code == 0, res.output
    archive = next(tmp_path.glob("bundle*.zip"))

    data = build_data(recipe)
    images = data.tables["test"].images[:6]
    model, _ = model_from_checkpoint(ckpt)
    transform = build_transforms(recipe.data, [], train=False)
    with torch.no_grad():
        x = torch.stack([transform(torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)) for a in images])
        logits = model(x)
        torch_probs = torch.softmax(logits, dim=1).numpy()
    temperature = json.loads((bundle / "edgekd.json").read_text())["calibration"]["temperature"]
    assert temperature != 1.0
    calibrated = torch.softmax(logits.double() / temperature, dim=1).numpy()
    for source, backend in ((bundle, "openvino"), (archive, "onnx")):
        runner = Runner.from_bundle(source, backend=backend)
        preds = runner.predict_batch(list(images))
        raw = np.stack([p.raw_probs for p in preds])
        assert np.abs(raw - torch_probs).max() <= 1e-4, backend  # the export's FP32 parity tolerance
        # the runner's probabilities are the bundle's calibration: softmax(logits / T)
        assert np.abs(np.stack([p.probs for p in preds]) - calibrated).max() <= 1e-4, backend
        assert runner.class_names == data.class_names

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, a in enumerate(images):
        Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(folder / f"img{i}.png")
    res = CliRunner().invoke(app, ["predict", str(archive), str(folder), "--tta", "--out", str(tmp_path / "p.json")])
    assert res.exit_code == 0, res.output
    preds = json.loads((tmp_path / "p.json").read_text())["predictions"]
    assert len(preds) == 6 and all(len(p["views"]) == 6 for p in preds)


def test_metadata_input_size_must_match_the_model(bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    meta = json.loads((copy / "edgekd.json").read_text())
    meta["preprocess"].update(input_size=[3, 20, 20], resize=20, center_crop=20)
    (copy / "edgekd.json").write_text(json.dumps(meta))
    write_manifest(copy)
    for backend in ("openvino", "onnx"):
        with pytest.raises(EdgeKDError, match=r"model input shape .* does not match edgekd.json"):
            Runner.from_bundle(copy, backend=backend)


def test_openvino_model_cache_is_used_and_gives_the_same_result(bundle, tmp_path):
    arr = random_pixels((SIZE, SIZE, 3), 8)
    def loaded_from_cache(runner):
        return {s.request.get_compiled_model().get_property("LOADED_FROM_CACHE") for s in runner.backend.slots.values()}

    cold = Runner.from_bundle(bundle, cache_dir=tmp_path / "cache")
    first = cold.predict(arr)
    assert any((tmp_path / "cache").iterdir()) and loaded_from_cache(cold) == {False}  # compiled, blob stored
    warm = Runner.from_bundle(bundle, cache_dir=tmp_path / "cache")
    again = warm.predict(arr)
    assert loaded_from_cache(warm) == {True}  # the second process-like load imports the blob
    assert np.abs(first.probs - again.probs).max() <= 1e-6


def test_model_cache_never_lands_inside_the_bundle_or_on_a_file(bundle, tmp_path):
    """A cache inside the bundle folder left unlisted blobs there: every later load refused the bundle."""
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    for inside in (copy / "cache", copy):
        with pytest.raises(EdgeKDError, match=r"cache folder \(--cache-dir\) .*: is inside the input"):
            Runner.from_bundle(copy, cache_dir=inside)
    (tmp_path / "file").write_text("x")
    with pytest.raises(EdgeKDError, match="not a folder"):
        Runner.from_bundle(copy, cache_dir=tmp_path / "file")
    # one OpenVINO cannot create had been its two-line C++ exception (exit 1); a read-only one cached nothing
    with pytest.raises(EdgeKDError, match=r"^cache folder \(--cache-dir\) .*file/sub: cannot create it \(Not a directory\)$"):
        Runner.from_bundle(copy, cache_dir=tmp_path / "file" / "sub")
    import edgekd.runtime.runner as runner_module

    with pytest.MonkeyPatch.context() as mp:  # (root may write anywhere: the check is what is tested)
        mp.setattr(runner_module.os, "access", lambda path, mode: False)
        with pytest.raises(EdgeKDError, match=r"^cache folder \(--cache-dir\) .*ro: not writable"):
            Runner.from_bundle(copy, cache_dir=tmp_path / "ro")
    assert not (copy / "cache").exists()
    Runner.from_bundle(copy).predict(random_pixels((SIZE, SIZE, 3), 8))  # still verifies and runs
    # ONNX Runtime has no compiled-model cache: the option had been ignored without a word
    with pytest.raises(EdgeKDError, match=r"^cache folder \(--cache-dir\): OpenVINO's compiled-model cache; the "
                                          r"onnx backend \(ONNX Runtime\) has none: leave it out$"):
        Runner.from_bundle(copy, backend="ONNX", cache_dir=tmp_path / "c")


def test_latency_stats_and_child_peak_rss():
    import resource

    from edgekd.runtime.timing import latency_stats

    stats = latency_stats(list(range(1, 101)))
    assert stats["p50_ms"] == 50.5 and stats["p90_ms"] == pytest.approx(90.1) and stats["min_ms"] == 1
    assert stats["runs"] == 100
    with pytest.raises(ValueError):
        latency_stats([])
    # A fresh child reports its own peak, not this (torch-loaded, larger) process's: ru_maxrss would not.
    parent_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    code = "from edgekd.runtime.timing import peak_rss_mb; print(peak_rss_mb())"
    child_mb = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                                    check=True).stdout)
    assert 5 < child_mb < min(parent_mb, 200)


def test_warmup_compiles_the_graph_for_the_bundles_image_channels(bundle, tmp_path):
    # A 3-channel model trained on gray images gets gray inputs: the runner warms up the gray-input graph (recorded
    # at export as runtime.image_channels), so the first real prediction compiles nothing. Without the record it
    # warms up the model's own channels.
    plain = Runner.from_bundle(bundle)
    assert list(plain.backend.slots) == [("images", 1, None, 3)]
    gray_bundle = tmp_path / "gray"
    shutil.copytree(bundle, gray_bundle)
    meta = json.loads((gray_bundle / "edgekd.json").read_text())
    meta["runtime"] = {"threads": None, "image_channels": 1}
    (gray_bundle / "edgekd.json").write_text(json.dumps(meta))
    write_manifest(gray_bundle)
    runner = Runner.from_bundle(gray_bundle)
    assert list(runner.backend.slots) == [("images", 1, None, 1)]
    runner.predict(random_pixels((SIZE, SIZE, 1), 3))
    assert list(runner.backend.slots) == [("images", 1, None, 1)]


def test_gray_input_kept_one_channel_until_normalize_gives_the_rgb_result(bundle):
    # The runner builds views on a gray image's single channel and repeats it to the model's 3 channels inside
    # the model (a separately compiled gray-input graph); the predictions must equal those of the same image
    # repeated to RGB beforehand within float rounding, also in a batch that mixes gray and color images.
    runner = Runner.from_bundle(bundle, tta=True)
    gray = random_pixels((SIZE + 6, SIZE + 2, 1), 21)
    rgb = np.repeat(gray, 3, axis=-1)
    assert runner.preprocessor.to_model_size(gray, keep_gray=True).shape[-1] == 1
    a, b = runner.predict(gray), runner.predict(rgb)
    assert np.abs(a.probs - b.probs).max() <= 1e-6
    assert all(np.abs(a.view_probs[v] - b.view_probs[v]).max() <= 1e-6 for v in a.view_probs)
    assert ("images", 1, runner.tta_views, 1) in runner.backend.slots  # the gray graph ran
    color = random_pixels((SIZE, SIZE, 3), 22)
    mixed = runner.predict_batch([gray, color, rgb])
    assert np.array_equal(mixed[0].probs, mixed[2].probs) and np.abs(mixed[0].probs - a.probs).max() <= 1e-6
    assert np.abs(mixed[1].probs - runner.predict(color).probs).max() <= 1e-6
    with pytest.raises(EdgeKDError, match="channels"):
        runner.preprocessor.normalize(np.zeros((1, SIZE, SIZE, 2), dtype=np.uint8))


@pytest.mark.parametrize("shape", [(20, 26, 1), (27, 22, 3), (9, 9, 1)])
def test_tta_resampling_views_match_torchvision_on_noise_and_odd_shapes(shape):
    # Noise has no smooth regions to hide a wrong axis, center or half-pixel offset behind.
    import torch
    from torchvision.transforms import v2

    F = v2.functional
    arr = random_pixels(shape, sum(shape))
    t = torch.from_numpy(arr).permute(2, 0, 1)
    h, w = shape[:2]
    views = TTAViews(["center_crop", "rot+15", "rot-15"], 0.8)
    ours = torch.from_numpy(views(arr)).permute(0, 3, 1, 2).int()
    refs = [F.resize(F.center_crop(t, [round(0.8 * h), round(0.8 * w)]), [h, w], antialias=True),
            F.rotate(t, 15.0, interpolation=v2.InterpolationMode.BILINEAR, fill=0),
            F.rotate(t, -15.0, interpolation=v2.InterpolationMode.BILINEAR, fill=0)]
    for name, o, ref in zip(views.names, ours, refs):
        assert (o - ref.int()).abs().max() <= 1, name


@pytest.mark.parametrize("shape", [(28, 28, 1), (17, 23, 3)])
def test_tta_linear_maps_give_the_views_exactly_in_any_summation_order(shape):
    # A compiled model applies the views as gather + weighted sum in its own order; the weights' grid makes every
    # product and partial sum exact in float32, so any order gives the numpy views' pixels.
    views = TTAViews(["original", "hflip", "vflip", "center_crop", "rot+15", "rot-15"], 0.8)
    img = random_pixels(shape, 7)
    h, w, c = shape
    index, weight = views.linear_maps(h, w)
    src = np.concatenate([img.reshape(h * w, c), np.zeros((1, c), np.uint8)]).astype(np.float32)
    terms = src[index] * weight[..., None]  # (V, H*W, 4, C), each product exact
    forward = ((terms[:, :, 0] + terms[:, :, 1]) + terms[:, :, 2]) + terms[:, :, 3]
    backward = ((terms[:, :, 3] + terms[:, :, 2]) + terms[:, :, 1]) + terms[:, :, 0]
    pairwise = (terms[:, :, 0] + terms[:, :, 2]) + (terms[:, :, 1] + terms[:, :, 3])
    expected = views(img).reshape(len(views), h * w, c)
    # The sums themselves are identical (without the grid ~30% of them differ in the last bit between orders,
    # and some pixels round differently).
    assert np.array_equal(forward, backward) and np.array_equal(forward, pairwise)
    assert np.array_equal(np.rint(forward).astype(np.uint8), expected)
    assert not np.array_equal(expected[0], expected[4])  # the rotation really resamples


def _hairy_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Skin-like RGB images with a lesion blob and thin dark hairs across them."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = []
    for _ in range(n):
        img = np.full((size, size, 3), (205, 160, 140), dtype=np.float64) + rng.normal(0, 6, (size, size, 3))
        cy, cx, r = rng.integers(size // 3, 2 * size // 3, 2).tolist() + [size // 5]
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] *= 0.6
        for _ in range(3):  # hairs: 1-2 px dark lines
            a, b = rng.uniform(-1, 1), rng.integers(0, size)
            line = np.abs(yy - (a * xx + b)) < 1.0
            img[line] = (40, 30, 25)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)


def test_remove_hair_fills_thin_dark_lines():
    from edgekd.hair import remove_hair

    img = _hairy_images(1, 64)[0]
    clean = remove_hair(img)
    assert clean.shape == img.shape and clean.dtype == np.uint8
    dark = img.mean(-1) < 60  # the hairs
    assert dark.sum() > 50 and clean[dark].mean() > img[dark].mean() + 60  # filled with skin/lesion colour
    gray = remove_hair(img.mean(-1, keepdims=True).astype(np.uint8))
    assert gray.shape == (64, 64, 1)


def test_the_hair_element_scales_with_the_image_and_spares_a_small_lesion():
    """A fixed 17 px element inpainted every dark spot narrower than 17 px as hair: a 16 px lesion on a 48 px image
    was erased whole (test AUC 1.00 -> 0.27 in a re-trial)."""
    from edgekd.hair import hair_kernel, remove_hair

    assert [hair_kernel(s, s) for s in (28, 48, 133, 224, 1024, 4000)] == [3, 3, 3, 5, 17, 67]
    assert hair_kernel(48, 2000) == 3 and hair_kernel(1024, 1024, kernel=9) == 9
    img = _hairy_images(1, 48)[0]
    yy, xx = np.mgrid[:48, :48]
    lesion = (yy - 24) ** 2 + (xx - 24) ** 2 < 8 ** 2  # 16 px across
    img[lesion] = (70, 45, 35)
    hairs = (img.mean(-1) < 60) & ~lesion
    for kernel, erased in ((None, False), (17, True)):
        out = remove_hair(img, kernel)
        changed = np.abs(out[lesion].astype(int) - img[lesion]).max(-1) > 20
        assert bool(changed.mean() > 0.9) is erased, kernel
        assert out[hairs].mean() > img[hairs].mean() + 40  # the hairs are filled either way


def test_hair_removal_from_before_hair_kernel_keeps_its_17_px_element(tmp_path):
    """Checkpoints and bundles made before data.hair_kernel removed hair with 17 px at any size: evaluating,
    exporting or running them must remove it as their training did, not with the new scaled element."""
    import torch

    from edgekd.hair import describe_hair_removal
    from edgekd.recipe import recipe_from_dict
    from edgekd.train.checkpoint import load_checkpoint
    from edgekd.train.run import untrained_checkpoint

    recipe = recipe_from_dict({"name": "skin", "data": {"source": "builtin", "image_size": 16, "hair_removal": True},
                               "model": {"name": "edgekd_cnn_tiny"}})
    ckpt = load_checkpoint(untrained_checkpoint(recipe, tmp_path / "new.pt"))
    assert ckpt["preprocess"]["hair_kernel"] is None and ckpt["recipe"]["data"]["hair_kernel"] is None
    old = {**ckpt, "preprocess": {k: v for k, v in ckpt["preprocess"].items() if k != "hair_kernel"}}
    old["recipe"] = {**ckpt["recipe"], "data": {k: v for k, v in ckpt["recipe"]["data"].items() if k != "hair_kernel"}}
    torch.save(old, tmp_path / "old.pt")
    loaded = load_checkpoint(tmp_path / "old.pt")
    assert loaded["preprocess"]["hair_kernel"] == 17 and loaded["recipe"]["data"]["hair_kernel"] == 17
    assert recipe_from_dict(loaded["recipe"]).data.hair_kernel == 17
    from edgekd.train.checkpoint import with_legacy_hair_kernel  # a continual task's own data turning it on

    cont = with_legacy_hair_kernel({"preprocess": {"hair_removal": False}, "recipe": {
        "data": {"hair_removal": False}, "continual": {"tasks": [{"data": {}}, {"data": {"hair_removal": True}}]}}})
    assert cont["recipe"]["continual"]["tasks"][1]["data"]["hair_kernel"] == 17
    first_task = cont["recipe"]["continual"]["tasks"][0]["data"]
    assert "hair_kernel" not in cont["recipe"]["data"] and "hair_kernel" not in first_task
    legacy = {k: v for k, v in ckpt["preprocess"].items() if k != "hair_kernel"}  # an old bundle's preprocess
    assert Preprocessor(legacy).hair_kernel == 17 and Preprocessor(ckpt["preprocess"]).hair_kernel is None
    assert "a 17 px black-hat element" in describe_hair_removal(legacy)
    assert "17 px per 1024 px of the image's shorter side" in describe_hair_removal(ckpt["preprocess"])
    with pytest.raises(Exception, match="data.hair_kernel 5: hair removal is off"):
        from edgekd.recipe import load_recipe

        load_recipe(REPO / "recipes" / "demo" / "baseline.yaml", ["data.hair_kernel=5"])


@pytest.mark.slow
def test_skin_bundle_with_hair_removal_predicts_like_pytorch(tmp_path):
    """A recipe with data.hair_removal exports (parity on hair-removed inputs) and the runtime applies the same
    hair removal: runner probabilities == PyTorch on the training-side eval pipeline; without it they differ."""
    import torch

    from edgekd.data import build_transforms
    from edgekd.export import export_checkpoint, load_profile
    from edgekd.recipe import recipe_from_dict
    from edgekd.train.checkpoint import model_from_checkpoint
    from edgekd.train.run import untrained_checkpoint

    arrays = {}
    for i, (split, n) in enumerate((("train", 16), ("val", 12), ("test", 12))):
        arrays[f"{split}_images"] = _hairy_images(n, 48, seed=i)
        arrays[f"{split}_labels"] = (np.arange(n) % 2)[:, None].astype(np.uint8)
    np.savez(tmp_path / "skin.npz", **arrays)
    recipe = recipe_from_dict({"name": "skin", "data": {"source": "medmnist", "path": str(tmp_path / "skin.npz"),
                                                        "image_size": 32, "resize": 36, "hair_removal": True},
                               "model": {"name": "edgekd_cnn_tiny"}})
    torch.manual_seed(0)
    ckpt = untrained_checkpoint(recipe, tmp_path / "best.pt")
    bundle = tmp_path / "bundle"
    export_checkpoint(ckpt, bundle, ["onnx", "openvino"], ["fp32"], load_profile(None), log=lambda *_: None)
    assert json.loads((bundle / "edgekd.json").read_text())["preprocess"]["hair_removal"] is True
    assert "DullRazor hair removal on the decoded image, a black-hat element of 17 px per 1024 px" in (
        bundle / "card.md").read_text()

    images = _hairy_images(6, 48, seed=7)
    model, _ = model_from_checkpoint(ckpt)
    transform = build_transforms(recipe.data, [], train=False)
    with torch.no_grad():
        x = torch.stack([transform(torch.from_numpy(a).permute(2, 0, 1)) for a in images])
        torch_probs = torch.softmax(model(x), dim=1).numpy()
    for backend in ("openvino", "onnx"):
        runner = Runner.from_bundle(bundle, backend=backend)
        probs = np.stack([p.raw_probs for p in runner.predict_batch(list(images))])
        assert np.abs(probs - torch_probs).max() <= 1e-4, backend
    # The runtime's model input is the training side's, hair removal included (not the hairy image's).
    ours = np.stack([Preprocessor(open_bundle(bundle).preprocess)(a) for a in images])
    no_hair = build_transforms(recipe.data.model_copy(update={"hair_removal": False}), [], train=False)
    hairy = np.stack([no_hair(torch.from_numpy(a).permute(2, 0, 1)).numpy() for a in images])
    one_level = (1 / 255) / min(recipe.data.std)
    assert np.abs(ours - x.numpy()).max() <= one_level * 1.001  # resize rounding at most one uint8 level
    assert np.abs(ours - hairy).max() > 50 * one_level  # the hairs are gone in both


@pytest.mark.slow
def test_full_size_skin_bundle_with_hair_removal_predicts(tmp_path, monkeypatch):
    """recipes/skin/student-scratch.yaml as shipped (ViT-S/16 at 224 px, hair_removal: true) on a synthetic
    stand-in of its data: untrained checkpoint -> export -> the runtime predicts with hair removal."""
    from edgekd.check import synthetic_recipe
    from edgekd.export import export_checkpoint, load_profile
    from edgekd.recipe import load_recipe
    from edgekd.train.run import untrained_checkpoint

    monkeypatch.chdir(REPO)
    recipe = synthetic_recipe(load_recipe("recipes/skin/student-scratch.yaml"), tmp_path, classes=2, stand_ins=[])
    assert recipe.data.hair_removal and recipe.data.image_size == 224 and recipe.model.name == "vit_small_patch16_224"
    ckpt = untrained_checkpoint(recipe, tmp_path / "best.pt")
    profile = load_profile(None).model_copy(update={"parity": load_profile(None).parity.model_copy(
        update={"images": 4})})
    export_checkpoint(ckpt, tmp_path / "bundle", ["openvino"], ["fp32"], profile, log=lambda *_: None)
    runner = Runner.from_bundle(tmp_path / "bundle", backend="openvino")
    assert runner.preprocessor.hair_removal
    pred = runner.predict(_hairy_images(1, 300, seed=3)[0])
    assert pred.probs.shape == (2,) and abs(float(pred.probs.sum()) - 1) < 1e-5


def test_is_bundle_is_one_rule_for_folders_and_zips(tmp_path):
    # update, bench, eval and the corruption eval each had their own rule (any folder; any .zip; edgekd.json).
    import zipfile

    from edgekd.runtime import is_bundle

    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "edgekd.json").write_text("{}")
    (tmp_path / "plain").mkdir()
    with zipfile.ZipFile(tmp_path / "root.zip", "w") as zf:
        zf.writestr("edgekd.json", "{}")
    with zipfile.ZipFile(tmp_path / "folder.zip", "w") as zf:
        zf.writestr("bundle/edgekd.json", "{}")
    with zipfile.ZipFile(tmp_path / "deep.zip", "w") as zf:
        zf.writestr("a/b/edgekd.json", "{}")
    torch = pytest.importorskip("torch")
    torch.save({"x": 1}, tmp_path / "ckpt.zip")  # torch.save writes a zip: a checkpoint, whatever its suffix
    (tmp_path / "text.zip").write_text("not a zip")
    (tmp_path / "folder.zip").rename(tmp_path / "folder.bundle")
    torch.save({"x": 1}, tmp_path / "best.pt")
    # A .zip is meant as a bundle whatever it holds (open_bundle then names what is wrong with it).
    assert all(is_bundle(tmp_path / n) for n in ("b", "root.zip", "folder.bundle", "deep.zip", "text.zip", "ckpt.zip",
                                                  "missing.zip"))
    assert not any(is_bundle(tmp_path / n) for n in ("plain", "best.pt", "missing.pt"))
    from edgekd.runtime import open_bundle

    for name, says in (("missing.zip", "bundle not found"), ("text.zip", "not a"), ("ckpt.zip", "a PyTorch checkpoint"),
                       ("deep.zip", "no edgekd.json at the top of the zip")):
        with pytest.raises(EdgeKDError, match=says):
            open_bundle(tmp_path / name)


@pytest.mark.parametrize("backend", ["openvino", "onnx"])
def test_one_runner_shared_by_threads_gives_each_call_its_own_answer(bundle, backend):
    """Every call of one batch size fills one shared input buffer: without the runner's lock, 4 threads got other
    images' probabilities back (514 of 600 calls on OpenVINO), silently."""
    from concurrent.futures import ThreadPoolExecutor

    runner = Runner.from_bundle(bundle, backend=backend, threads=1)
    images = [random_pixels((SIZE, SIZE, 3), seed) for seed in range(24)]
    ref = [runner.predict(x).probs for x in images]
    with ThreadPoolExecutor(4) as pool:
        one = list(pool.map(lambda i: runner.predict(images[i % 24]).probs, range(96)))
        many = list(pool.map(lambda i: runner.predict_batch(images[i:i + 4]), range(0, 24, 4)))
    assert all(np.allclose(one[i], ref[i % 24]) for i in range(96))
    assert all(np.allclose(p.probs, ref[i + j]) for i, batch in zip(range(0, 24, 4), many) for j, p in enumerate(batch))


def test_runner_api_refuses_odd_arguments_in_one_line(bundle):
    """A library caller's mistakes are EdgeKDErrors, not raw TypeErrors or images silently dropped."""
    runner = Runner.from_bundle(bundle, backend="onnx")
    x = random_pixels((SIZE, SIZE, 3), 1)
    for call, words in ((lambda: runner.predict_batch([x, x, x], sources=["a"]), "3 images but 1 source names"),
                        (lambda: runner.predict(x, tta=1), "tta: expected"),
                        (lambda: Runner.from_bundle(bundle, threshold="0.3"), "threshold must be a number"),
                        (lambda: Runner.from_bundle(bundle, threads="2"), "threads must be an integer")):
        with pytest.raises(EdgeKDError, match=words):
            call()
    assert list(runner.predict(x, tta="hflip,vflip").view_probs) == ["hflip", "vflip"]  # names, comma-separated
    (failure,) = runner.predict_many(str(Path("nowhere.png")))  # one path, not its characters
    assert failure.source == "nowhere.png"
    # an iterator is read once: its names had been taken from the spent iterator ("2 images but 0 source names")
    by_iter = runner.predict_batch(iter([x, x[::-1]]))
    assert [p.probs.tolist() for p in by_iter] == [p.probs.tolist() for p in runner.predict_batch([x, x[::-1]])]
    # predict_sized checks what it is given: an int64 300 had wrapped to 44, another size a broadcast error
    sized = runner.preprocessor.to_model_size(x)
    assert runner.predict_sized([sized], ["a"])[0].probs.tolist() == runner.predict(x).probs.tolist()
    for bad, words in ((sized.astype(np.int64), r"a: predict_sized takes uint8 arrays .*got int64"),
                       (sized[:-1], rf"a: predict_sized takes \({SIZE}, {SIZE}, 1 or 3\) images .*got shape"),
                       ([[0]], r"a: predict_sized takes uint8 arrays .*got list")):
        with pytest.raises(EdgeKDError, match=words):
            runner.predict_sized([bad], ["a"])
    runner.close()
    with pytest.raises(EdgeKDError, match="this Runner is closed"):
        runner.predict(x)


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")  # the NaN slope is the point
def test_a_dicom_rescaled_to_nan_names_its_file(tmp_path):
    pytest.importorskip("pydicom")
    from edgekd.errors import EdgeKDError
    from edgekd.imageio import read_image

    path = write_dicom(tmp_path / "scan.dcm", np.arange(64, dtype=np.uint16).reshape(8, 8), RescaleSlope="NaN",
                       RescaleIntercept=0)
    with pytest.raises(EdgeKDError, match=r"scan\.dcm: image holds NaN or Inf values"):
        read_image(path)


def test_a_blank_image_is_answered_with_a_warning(bundle, tmp_path):
    """A model answers an empty picture as confidently as any other: the answer says it means nothing, in the
    runner's result, `predict`'s output and JSON; a real image gets no warning."""
    import json as json_

    from edgekd.runtime import Runner
    from edgekd.runtime.runner import BLANK_IMAGE

    runner = Runner.from_bundle(bundle, backend="onnx", threads=1)
    blank = runner.predict(np.zeros((20, 20), np.uint8))
    one_pixel = runner.predict(np.full((1, 1, 3), 200, np.uint8))
    green = runner.predict(np.broadcast_to(np.array([10, 200, 10], np.uint8), (20, 20, 3)).copy())  # had passed
    real = runner.predict(random_pixels((20, 20, 3), seed=3))
    assert blank.warning == one_pixel.warning == green.warning == BLANK_IMAGE and real.warning is None
    assert blank.to_dict()["warning"] == BLANK_IMAGE and "warning" not in real.to_dict()
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "black.png")
    Image.fromarray(random_pixels((20, 20, 3), seed=3)).save(tmp_path / "scan.png")
    proc = run_edgekd("predict", str(bundle), str(tmp_path / "black.png"), str(tmp_path / "scan.png"), "--backend",
                      "onnx", "--out", str(tmp_path / "p.json"))
    assert proc.returncode == 0, proc.stderr
    assert "warning:" in proc.stderr and "black.png: blank image" in proc.stderr and "scan.png:" not in proc.stderr
    answers = {Path(p["file"]).name: p for p in json_.loads((tmp_path / "p.json").read_text())["predictions"]}
    assert answers["black.png"]["warning"] == BLANK_IMAGE and "warning" not in answers["scan.png"]
    # ... and in a CSV (it had no column for it)
    import csv

    from edgekd.runtime.output import predictions_csv

    rows = list(csv.DictReader(io.StringIO(predictions_csv([blank, real], runner.class_names))))
    assert rows[0]["warning"] == BLANK_IMAGE and rows[1]["warning"] == "" and rows[0]["error"] == ""


def test_predictions_csv_mixes_tta_and_plain_rows_and_a_truncated_pil_image_is_one_failure(bundle, tmp_path):
    """write_predictions of results with and without TTA raised ValueError (a missing view's empty cells were
    formatted as numbers); the task column came and went with whether any file succeeded; a truncated file opened
    with PIL (it decodes lazily) raised OSError out of predict_many, ending the stream."""
    import csv

    from edgekd.runtime.output import predictions_csv

    runner = Runner.from_bundle(bundle, backend="onnx", threads=1)
    image = random_pixels((20, 20, 3), seed=3)
    mixed = [runner.predict(image, tta=True), runner.predict(image, tta=False)]
    rows = list(csv.DictReader(io.StringIO(predictions_csv(mixed, runner.class_names))))
    view = f"hflip:p_{runner.class_names[0]}"
    assert float(rows[0][view]) >= 0 and rows[1][view] == "" and rows[0]["label"] == rows[1]["label"]
    failed = [Failure("a.png", "a.png: not an image")]
    assert predictions_csv(failed, runner.class_names, task_column=True).startswith("file,task,label,")
    assert predictions_csv(failed, runner.class_names).startswith("file,label,")
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[:-40])
    out = list(runner.predict_many([Image.open(tmp_path / "cut.png"), image]))
    assert isinstance(out[0], Failure) and "corrupt or truncated" in out[0].error and not isinstance(out[1], Failure)


def test_a_signal_after_two_openvino_runners_were_destroyed_is_handled(bundle):
    """OpenVINO's CPU plugin sets the compiling thread's alternate signal stack and puts back the one it found when
    the compiled model goes: two runners destroyed in the order they were made left the thread on a freed stack, and
    the next SIGTERM crashed the process with a segfault (exit -11) instead of running its handler."""
    code = ("import gc, signal, numpy as np; from edgekd.runtime import Runner\n"
            f"first, second = (Runner.from_bundle({str(bundle)!r}) for _ in (0, 1))\n"
            f"image = np.zeros(({SIZE}, {SIZE}, 3), np.uint8); first.predict(image); second.predict(image)\n"
            "del first; del second; gc.collect(); seen = []\n"  # in the order they were made (not a list's reverse)
            "signal.signal(signal.SIGTERM, lambda s, f: seen.append(s)); signal.raise_signal(signal.SIGTERM)\n"
            "print('handled', seen)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0 and "handled [15]" in proc.stdout, (proc.returncode, proc.stderr[-500:])


def _flat_onnx_bundle(out: Path, batch="N", outputs=3, extra_first=False, classes=("a", "b", "c"), weights=None,
                      meta_extra=None) -> Path:
    """A bundle of one hand-built ONNX model (Flatten -> MatMul), its batch axis `batch`, `outputs` logits, and with
    `extra_first` a feature output listed before the logits."""
    import hashlib

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if weights is None:
        weights = np.random.default_rng(0).normal(size=(3 * SIZE * SIZE, outputs)).astype(np.float32) * 0.05
    w = numpy_helper.from_array(weights.astype(np.float32), "W")
    nodes = [helper.make_node("Flatten", ["input"], ["f"], axis=1), helper.make_node("MatMul", ["f", "W"], ["logits"])]
    outs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, outputs])]
    if extra_first:
        nodes.append(helper.make_node("Identity", ["f"], ["feat"]))
        outs.insert(0, helper.make_tensor_value_info("feat", TensorProto.FLOAT, [batch, 3 * SIZE * SIZE]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                          [batch, 3, SIZE, SIZE])], outs, [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    (out / "onnx").mkdir(parents=True)
    onnx.save(model, str(out / "onnx" / "model_fp32.onnx"))
    meta = {"schema": "edgekd-bundle/1", "class_names": list(classes),
            "preprocess": {"input_size": [3, SIZE, SIZE], "channels": 3, "resize": SIZE, "center_crop": SIZE,
                           "scale": 1 / 255, "mean": [0.5] * 3, "std": [0.25] * 3},
            "tta": {"views": ["original", "hflip"], "center_crop_fraction": 0.875},
            "io": {"input": "input", "output": "logits"},
            "artifacts": [{"format": "onnx", "precision": "fp32", "path": "onnx/model_fp32.onnx"}], **(meta_extra or {})}
    (out / "edgekd.json").write_text(json.dumps(meta))
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(out).as_posix()}"
             for p in sorted(out.rglob("*")) if p.is_file()]
    (out / "manifest.sha256").write_text("\n".join(lines) + "\n")
    return out


def test_a_model_of_other_outputs_a_fixed_batch_or_a_feature_output_first_is_said_at_load(tmp_path):
    """A 5-output model in a 3-class bundle loaded (and passed check_artifact) and failed at the first predict; a
    batch axis fixed at 1 failed inside ONNX Runtime at batch 2 or with TTA; a feature output listed first sized the
    ONNX Runtime output buffer (its load failed with ONNX Runtime's own error)."""
    wide = _flat_onnx_bundle(tmp_path / "wide", outputs=5)
    for backend in ("onnx", "openvino"):
        with pytest.raises(EdgeKDError, match=r"output shape \(1, 5\) does not match \(1, 3 classes\)"):
            Runner.from_bundle(wide, backend=backend)
    fixed = _flat_onnx_bundle(tmp_path / "fixed", batch=1)
    with pytest.raises(EdgeKDError, match=r"the model's batch axis is fixed at 1; the onnx backend needs a dynamic one"):
        Runner.from_bundle(fixed, backend="onnx")
    images = [random_pixels((SIZE, SIZE, 3), i) for i in range(2)]
    assert len(Runner.from_bundle(fixed, backend="openvino").predict_batch(images)) == 2  # OpenVINO reshapes it
    feature_first = _flat_onnx_bundle(tmp_path / "feat", extra_first=True)
    ours, theirs = (Runner.from_bundle(feature_first, backend=b).predict(images[0]).probs for b in ("onnx", "openvino"))
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_a_calibrated_probability_below_float32s_range_is_the_same_on_both_backends(tmp_path):
    """OpenVINO's in-graph float32 softmax rounded p = e^-100 to 0; a temperature of 20 then gave 4e-16 where
    ONNX Runtime (float64) gave 0.0067: a high-sensitivity threshold flipped the label on one backend only."""
    from edgekd.probability import calibrated_softmax

    weights = np.zeros((3 * SIZE * SIZE, 2), np.float32)
    weights[:, 1] = 100 / (2 * 3 * SIZE * SIZE)  # a black image is -2 after normalization: logits [0, -100]
    bundle = _flat_onnx_bundle(tmp_path / "b", outputs=2, classes=("normal", "disease"), weights=weights,
                               meta_extra={"calibration": {"temperature": 20.0, "bias": None}})
    black = np.zeros((SIZE, SIZE, 3), np.uint8)
    want = calibrated_softmax(np.array([[0.0, -100.0]]), 20.0)[0]
    for backend in ("onnx", "openvino"):
        probs = Runner.from_bundle(bundle, backend=backend).predict(black).probs
        np.testing.assert_allclose(probs, want, rtol=1e-4, err_msg=backend)
        assert probs[1] == pytest.approx(0.00669, rel=1e-2)


def test_predict_out_dash_writes_the_json_document_to_stdout_alone(bundle, tmp_path):
    """`-o -` was refused (.csv or .json only) and the only stdout was the table: `edgekd predict ... | jq` could not
    work. Now stdout holds the JSON document, every note and error on stderr."""
    from conftest import run_edgekd

    img = tmp_path / "a.png"
    Image.fromarray(random_pixels((16, 16, 3))).save(img)
    proc = run_edgekd("predict", bundle, img, tmp_path / "missing.png", "--tta", "-o", "-")
    assert proc.returncode == 1, proc.stderr  # the missing file: exit 1, as with a file output
    document = json.loads(proc.stdout)
    assert document["class_names"] == CLASS_NAMES and document["tta_views"]
    good, missing = document["predictions"]
    assert good["file"].endswith("a.png") and sum(good["probs"].values()) == pytest.approx(1.0)
    assert "error" in missing and "missing.png" in proc.stderr
    assert not (tmp_path / "-").exists()
