"""Grad-CAM: the heat map peaks where the decisive evidence is; default layers; overlays and the explain CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import random_pixels, run_edgekd, tiny_recipe, write_npz
from edgekd.errors import EdgeKDError
from edgekd.explain.gradcam import default_target_layer, gradcam, overlay
from edgekd.models import create_model


class PatchNet(nn.Module):
    """Hand-set: 'features' fires only on bright 3x3 neighbourhoods; class 1 = 'a bright patch is present'."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():
            self.features[0].weight.fill_(1.0 / 9)
            self.features[0].bias.fill_(-0.6)            # background noise (<= 0.3) never fires, the patch (1.0) does
            self.fc.weight.copy_(torch.tensor([[-20.0] * 4, [20.0] * 4]))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def patch_image(size: int, top: int, left: int, seed: int, patch: int = 5) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    img = rng.uniform(0.0, 0.3, (size, size)).astype(np.float32)
    img[top:top + patch, left:left + patch] = 1.0
    return torch.from_numpy(img)[None]


@pytest.mark.parametrize("top,left", [(2, 3), (20, 4), (10, 18), (21, 21)])
def test_gradcam_peak_lies_in_the_decisive_patch(top, left):
    model = PatchNet()
    x = torch.stack([patch_image(28, top, left, seed=top * 31 + left)])
    maps, probs = gradcam(model, x, "features")
    assert probs[0].argmax() == 1                     # the patch decided the class
    assert maps.shape == (1, 28, 28) and 0.0 <= maps.min() and maps.max() == pytest.approx(1.0)
    y, xx = np.unravel_index(maps[0].argmax(), maps[0].shape)
    assert top <= y < top + 5 and left <= xx < left + 5
    inside = maps[0][top:top + 5, left:left + 5].mean()
    outside = np.delete(maps[0].ravel(), [r * 28 + c for r in range(top, top + 5) for c in range(left, left + 5)])
    assert inside > 5 * outside.mean()


def patch_dataset(n: int, size: int, seed: int, patch: int = 6):
    """Class 1 = a bright patch somewhere on dark noise, class 0 = noise only; the patch is the only evidence."""
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 80, (n, size, size), dtype=np.uint8)
    labels = np.arange(n) % 2
    boxes = rng.integers(0, size - patch, (n, 2))
    for i in np.flatnonzero(labels):
        imgs[i, boxes[i, 0]:boxes[i, 0] + patch, boxes[i, 1]:boxes[i, 1] + patch] = 230
    return imgs, labels, boxes


def test_gradcam_on_a_trained_tiny_cnn_peaks_in_the_patch(tmp_path):
    from edgekd.data import build_data
    from edgekd.explain.gradcam import checkpoint_pipeline
    from edgekd.recipe import recipe_from_dict
    from edgekd.train.checkpoint import model_from_checkpoint
    from edgekd.train.run import train_recipe

    arrays = {}
    for split, n, seed in (("train", 160, 0), ("val", 32, 1), ("test", 40, 2)):
        imgs, labels, boxes = patch_dataset(n, 32, seed)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = imgs, labels[:, None].astype(np.uint8)
        test_boxes = boxes  # the last split is the test split
    np.savez(tmp_path / "p.npz", **arrays)
    raw = tiny_recipe(tmp_path / "p.npz", name="p", image_size=32, batch_size=16, epochs=4)
    best = train_recipe(recipe_from_dict(raw), tmp_path / "run", log=lambda *_: None).best_path
    model, ckpt = model_from_checkpoint(best)
    test = build_data(recipe_from_dict(raw)).dataset("test", train=False)
    geometry, normalize = checkpoint_pipeline(ckpt)
    x = torch.stack([normalize(geometry(torch.from_numpy(test.raw(i)).permute(2, 0, 1))) for i in range(len(test))])
    maps, probs = gradcam(model, x)                   # default layer (stages.1, an 8x8 map), predicted class
    assert (probs.argmax(1) == test.table.labels).mean() >= 0.9
    positives = np.flatnonzero(test.table.labels == 1)
    hits = 0
    for i in positives:                               # peak inside the 6x6 patch, give or take one 4-px map cell
        y, x_ = np.unravel_index(maps[i].argmax(), maps[i].shape)
        top, left = test_boxes[i]
        hits += top - 2 <= y < top + 8 and left - 2 <= x_ < left + 8
    assert hits / len(positives) >= 0.8, f"{hits}/{len(positives)}"


def test_default_layer_is_the_last_feature_stage():
    assert default_target_layer(create_model({"name": "edgekd_cnn_tiny", "num_classes": 2, "in_chans": 3})) == "stages.1"
    assert default_target_layer(create_model({"name": "test_resnet", "num_classes": 2, "in_chans": 3})) == "layer4"
    assert default_target_layer(PatchNet()) == "features.0"
    # at 28 px ResNet-18's layer4 is 1x1 (a constant CAM) and layer3 2x2: the default is layer2 (4x4);
    # the custom CNN's last stage is 3x3
    resnet = create_model({"name": "resnet18", "num_classes": 2, "in_chans": 3})
    assert default_target_layer(resnet, (3, 28, 28)) == "layer2"
    assert default_target_layer(resnet, (3, 224, 224)) == "layer4"
    assert default_target_layer(create_model({"name": "edgekd_cnn", "num_classes": 2, "in_chans": 3}), (3, 28, 28)) == "stages.2"


def test_gradcam_hands_a_training_model_back_in_training_without_gradients():
    """gradcam() switched a model in training to eval and left the backward pass's .grad on its parameters (a
    training callback's model came back changed); a refused target leaves it as it came too."""
    model = create_model({"name": "edgekd_cnn_tiny", "num_classes": 2, "in_chans": 3}).train()
    x = torch.from_numpy(random_pixels((2, 3, 16, 16), seed=1).astype(np.float32) / 255)
    maps, probs = gradcam(model, x)
    assert maps.shape == (2, 16, 16) and probs.shape == (2, 2)
    assert model.training and all(p.grad is None for p in model.parameters())
    model.eval()
    with pytest.raises(EdgeKDError, match="Grad-CAM targets"):
        gradcam(model, x, targets=[5, 0])
    assert not model.training


def test_vector_layer_is_refused_and_vit_tokens_work():
    with pytest.raises(EdgeKDError, match="spatial map"):
        gradcam(PatchNet(), patch_image(16, 2, 2, 0)[None], "fc")
    vit = create_model({"name": "test_vit", "num_classes": 2, "in_chans": 3, "kwargs": {"img_size": 16, "patch_size": 4}})
    maps, _ = gradcam(vit, torch.randn(2, 3, 16, 16), "blocks.0")
    assert maps.shape == (2, 16, 16) and np.isfinite(maps).all()
    # The default for a class-token ViT: the last block's norm1, as the last block's output tokens never reach the
    # head (their map was zero everywhere); the map there is not flat.
    torch.manual_seed(0)
    vit = create_model({"name": "test_vit", "num_classes": 2, "in_chans": 3, "kwargs": {"img_size": 32, "patch_size": 4}})
    last = f"blocks.{len(vit.blocks) - 1}"
    assert default_target_layer(vit, (3, 32, 32)) == f"{last}.norm1"
    x = torch.randn(2, 3, 32, 32)
    assert np.ptp(gradcam(vit, x, last)[0]) == 0 and np.ptp(gradcam(vit, x)[0]) > 0
    # No block reaches 3x3 (a 2x2 token grid): the deepest of the largest maps, not the first (it had been
    # blocks.0.norm1, whose map was often flat).
    small = create_model({"name": "test_vit", "num_classes": 2, "in_chans": 3,
                          "kwargs": {"img_size": 8, "patch_size": 4}})
    assert default_target_layer(small, (3, 8, 8)) == f"blocks.{len(small.blocks) - 1}.norm1"


def test_unique_overlay_names_never_collide():
    from edgekd.explain.gradcam import unique_names

    # dup/a/x.png, dup/b/x.png, dup/x_1.png gave x and x_1 twice: 3 inputs, 2 files
    for stems in (["x", "x", "x_1"], ["x", "x", "x_2"], ["a", "b", "a", "a"]):
        names = unique_names(stems)
        assert len(set(names)) == len(stems) and all(n == s or n.startswith(s + "_") for n, s in zip(names, stems))


def test_overlay_is_rgb_upscaled_and_hot_where_the_map_is():
    img = np.full((16, 16, 1), 128, np.uint8)
    cam = np.zeros((16, 16), np.float32)
    cam[:4, :4] = 1.0
    out = overlay(img, cam)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert out[10, 10, 0] > out[10, 10, 2] and out[200, 200, 2] > out[200, 200, 0]   # jet: hot red, cold blue


@pytest.mark.slow
def test_explain_cli_writes_overlays(tmp_path, monkeypatch):
    from edgekd.recipe import recipe_from_dict
    from edgekd.train.run import train_recipe

    npz = write_npz(tmp_path / "q.npz", n=(32, 8, 8), size=16)
    raw = tiny_recipe(npz, name="q", batch_size=16, epochs=1)
    best = train_recipe(recipe_from_dict(raw), tmp_path / "run", log=lambda *_: None).best_path
    files = []
    for i in range(2):
        files.append(tmp_path / f"x{i}.png")
        Image.fromarray(random_pixels((20, 20), i, high=255)).save(files[-1])
    p = run_edgekd("explain", best, *files, "--out", tmp_path / "cam", "--target", "1")
    assert p.returncode == 0, p.stderr
    # the probability shown is the checkpoint's softmax, said so (predict's calibrated one had been compared with it)
    assert "the checkpoint's uncalibrated softmax" in " ".join(p.stdout.split())
    rec = json.loads((tmp_path / "cam" / "explain.json").read_text())["images"]
    assert [r["overlay"] for r in rec] == ["x0_gradcam.png", "x1_gradcam.png"] and rec[0]["layer"] == "stages.1"
    assert rec[0]["input_size"] == [16, 16] and rec[0]["target"] == "class_1"
    assert 0 <= rec[0]["target_prob"] <= 1 and all((r["peak_yx"] is None) == r["blank"] for r in rec)
    assert Image.open(tmp_path / "cam" / "x0_gradcam.png").size == (224, 224)
    folder = tmp_path / "scans"
    (folder / "sub").mkdir(parents=True)
    for i, f in enumerate(files):
        (folder / ("sub" if i else "") / f.name).write_bytes(f.read_bytes())
    p = run_edgekd("explain", best, folder, "--out", tmp_path / "cam_folder")  # a folder, as predict takes
    assert p.returncode == 0, p.stderr
    assert sorted(r["overlay"] for r in json.loads((tmp_path / "cam_folder" / "explain.json").read_text())["images"]) \
        == ["x0_gradcam.png", "x1_gradcam.png"]  # the subfolder's image too
    p = run_edgekd("explain", best, files[0], "--layer", "nope", "--out", tmp_path / "cam2")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "SmallCNN has no module 'nope' (its top level has stages, pool, drop, fc)" in p.stderr  # the names to use
    p = run_edgekd("explain", best, files[0], "--layer", "pool", "--out", tmp_path / "cam_pool")  # a 1x1 map
    assert p.returncode == 0 and "pool gives no spatial evidence (a pooled or 1x1 map" in p.stderr, p.stderr
    assert "--target" not in p.stderr  # none given: no target named in the advice
    p = run_edgekd("explain", best, files[0], "--layer", "pool", "--target", "1", "--out", tmp_path / "cam_pool1")
    assert "or the model sees nothing for --target 1 in these images" in " ".join(p.stderr.split()), p.stderr
    # Explained a batch at a time: a bad image in a later batch leaves no half-written new folder.
    import edgekd.explain.gradcam as gradcam_module
    from typer.testing import CliRunner

    from edgekd.cli import app

    monkeypatch.setattr(gradcam_module, "EXPLAIN_BATCH", 1)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    # The CLI reports an unreadable file and explains the others, exit 1, as predict does (one bad file had
    # stopped a whole folder, exit 2).
    result = CliRunner().invoke(app, ["explain", str(best), str(files[0]), str(tmp_path / "bad.png"),
                                      "--out", str(tmp_path / "cam3")])
    assert result.exit_code == 1 and "1 of 2 image(s) could not be read" in result.output, result.output
    written = json.loads((tmp_path / "cam3" / "explain.json").read_text())
    assert [r["file"] for r in written["images"]] == [str(files[0])]
    assert [s["file"] for s in written["skipped"]] == [str(tmp_path / "bad.png")]
    # The library's default stops at it: a failure in a later batch leaves no half-written new folder ...
    with pytest.raises(EdgeKDError, match="bad.png"):
        gradcam_module.explain_files(best, [files[0], tmp_path / "bad.png"], tmp_path / "cam5")
    assert not (tmp_path / "cam5").exists()
    before = {p.name: p.read_bytes() for p in (tmp_path / "cam").iterdir()}  # ... and a folder that was there as it was
    with pytest.raises(EdgeKDError, match="bad.png"):
        gradcam_module.explain_files(best, [files[1], tmp_path / "bad.png"], tmp_path / "cam")
    assert {p.name: p.read_bytes() for p in (tmp_path / "cam").iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".cam")]  # no staging folder left
    result = CliRunner().invoke(app, ["explain", str(best), str(tmp_path / "bad.png"), "--out", str(tmp_path / "cam6")])
    assert "explain: no readable image" in str(result.exception) and not (tmp_path / "cam6").exists()
    result = CliRunner().invoke(app, ["explain", str(best), *map(str, files), "--out", str(tmp_path / "cam4")])
    assert result.exit_code == 0 and len(json.loads((tmp_path / "cam4" / "explain.json").read_text())["images"]) == 2
    # A second run into the same folder removes the overlays the first one listed and did not replace; other files
    # stay (the folder had held 2 overlays while its explain.json listed 1).
    (tmp_path / "cam4" / "notes.txt").write_text("mine")
    result = CliRunner().invoke(app, ["explain", str(best), str(files[1]), "--out", str(tmp_path / "cam4")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "cam4").iterdir()) == ["explain.json", "notes.txt", "x1_gradcam.png"]
