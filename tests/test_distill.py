"""Knowledge distillation: loss arithmetic, feature taps/adapters, teacher handling, logit cache, k-fold driver."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from conftest import REPO
from edgekd.distill.features import FeatureAdapter, align_spatial
from edgekd.distill.losses import KDBatch, build_distill_loss, kl_divergence
from edgekd.distill.objective import TeacherInput, build_objective, freeze_teacher, warn_teacher_input_mismatch
from edgekd.errors import EdgeKDError
from edgekd.models import capture_features, create_model, tokens_to_map
from edgekd.recipe import DistillConfig, load_recipe, recipe_from_dict


def softmax(xs):
    e = [math.exp(x) for x in xs]
    return [v / sum(e) for v in e]


def hand_kl(student, teacher, t):
    """sum_c p_t log(p_t / p_s) per row at temperature t, averaged over rows, times t^2."""
    total = 0.0
    for s_row, t_row in zip(student, teacher):
        ps, pt = softmax([v / t for v in s_row]), softmax([v / t for v in t_row])
        total += sum(b * math.log(b / a) for a, b in zip(ps, pt))
    return total / len(student) * t * t


def hand_ce(student, targets, weights=None):
    """Class-weighted CE as the mean over the images: sum_i w_{y_i} * -log p_{y_i} / n (not torch's / sum_i w_{y_i},
    under which accumulated micro-batches were not one big batch)."""
    return sum(-(1.0 if weights is None else weights[y]) * math.log(softmax(row)[y])
               for row, y in zip(student, targets)) / len(targets)


S = [[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]]
T = [[1.0, 1.5, 0.0], [-2.0, 0.5, 2.0]]
Y = [0, 2]


def distill_cfg(terms, **kw) -> DistillConfig:
    return DistillConfig.model_validate({"teacher": "t.pt", "terms": terms, **kw})


def batch() -> KDBatch:
    return KDBatch(torch.tensor(S), torch.tensor(Y), torch.tensor(T))


# ---------------------------------------------------------------- loss arithmetic

@pytest.mark.parametrize("t", [1.0, 2.0, 4.0])
def test_kl_matches_hand_computed_with_t_squared_scaling(t):
    got = float(kl_divergence(torch.tensor(S), torch.tensor(T), t))
    assert got == pytest.approx(hand_kl(S, T, t), rel=1e-5)
    assert float(kl_divergence(torch.tensor(S), torch.tensor(S), t)) == pytest.approx(0.0, abs=1e-6)


def test_kd_oct_form_alpha_kl_plus_beta_ce():
    loss = build_distill_loss(distill_cfg([{"kind": "kl", "weight": 0.7, "temperature": 4},
                                           {"kind": "ce", "weight": 0.3}]).terms, None)
    total, parts = loss(batch())
    want = 0.7 * hand_kl(S, T, 4.0) + 0.3 * hand_ce(S, Y)
    assert float(total) == pytest.approx(want, rel=1e-5)
    assert parts["0_kl"] == pytest.approx(hand_kl(S, T, 4.0), rel=1e-5)
    assert parts["1_ce"] == pytest.approx(hand_ce(S, Y), rel=1e-5)


def test_isic_form_weighted_ce_plus_one_minus_alpha_kl():
    weights = [0.5, 1.0, 3.0]
    cfg = distill_cfg([{"kind": "ce", "weight": 0.6, "class_weights": True},
                       {"kind": "kl", "weight": 0.4, "temperature": 4}])
    total, _ = build_distill_loss(cfg.terms, torch.tensor(weights))(batch())
    want = 0.6 * hand_ce(S, Y, weights) + 0.4 * hand_kl(S, T, 4.0)
    assert float(total) == pytest.approx(want, rel=1e-5)
    # class_weights: false ignores the weights it is given
    plain = build_distill_loss(distill_cfg([{"kind": "ce", "weight": 1.0}, {"kind": "kl", "weight": 0.0}]).terms,
                               torch.tensor(weights))(batch())[0]
    assert float(plain) == pytest.approx(hand_ce(S, Y), rel=1e-5)


def test_focal_and_label_smoothing_terms():
    cfg = distill_cfg([{"kind": "focal", "weight": 1.0, "gamma": 2.0}, {"kind": "kl", "weight": 0.0}])
    total, _ = build_distill_loss(cfg.terms, None)(batch())
    want = sum(-(1 - softmax(r)[y]) ** 2 * math.log(softmax(r)[y]) for r, y in zip(S, Y)) / 2
    assert float(total) == pytest.approx(want, rel=1e-5)
    cfg = distill_cfg([{"kind": "ce", "weight": 1.0, "label_smoothing": 0.1}, {"kind": "kl", "weight": 0.0}])
    total, _ = build_distill_loss(cfg.terms, None)(batch())
    want = sum(-(0.9 * math.log(softmax(r)[y]) + 0.1 / 3 * sum(math.log(p) for p in softmax(r)))
               for r, y in zip(S, Y)) / 2
    assert float(total) == pytest.approx(want, rel=1e-5)


def test_feature_mse_with_adapter_and_pooling_matches_hand_computed():
    adapter = FeatureAdapter("nchw", 1, "nchw", 2)
    with torch.no_grad():
        adapter.proj.weight.copy_(torch.tensor([2.0, -1.0]).view(2, 1, 1, 1))
        adapter.proj.bias.zero_()
    student = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])          # 1x1x2x2
    teacher = torch.tensor([[[[4.0]], [[-1.0]]]])                   # 1x2x1x1
    cfg = distill_cfg([{"kind": "feature_mse", "weight": 0.5, "student": "s", "teacher": "t"}])
    loss = build_distill_loss(cfg.terms, None, {0: adapter})
    b = KDBatch(torch.zeros(1, 2), torch.tensor([0]), None, {"s": student}, {"t": teacher})
    total, _ = loss(b)
    total = total.detach()
    # adapter -> channels (2x, -x); pooled to 1x1 -> (5, -2.5); MSE vs (4, -1) = ((1)^2 + (1.5)^2) / 2
    assert float(total) == pytest.approx(0.5 * (1.0 + 2.25) / 2, rel=1e-6)


def test_align_spatial_modes():
    s, t = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4)
    a, b = align_spatial(s, t, "pool")
    assert a.shape == b.shape == (2, 3, 4, 4)
    assert torch.allclose(a[0, 0, 0, 0], s[0, 0, :2, :2].mean())
    a, b = align_spatial(t, s, "interpolate")
    assert a.shape == b.shape == (2, 3, 8, 8)
    # shrinking 4x: columns 1, 0, 0, 1 repeated average 0.5; plain bilinear reads the middle two of each four (0)
    stripes = torch.tensor([1.0, 0.0, 0.0, 1.0]).repeat(4).expand(1, 1, 16, 16)
    a, _ = align_spatial(stripes, torch.zeros(1, 1, 4, 4), "interpolate")
    assert a.shape == (1, 1, 4, 4) and torch.allclose(a, torch.full_like(a, 0.5))


def test_tokens_to_map_puts_each_patch_token_on_its_grid_cell():
    b, prefix, side, c = 2, 1, 3, 4
    tokens = torch.randn(b, prefix + side * side, c)
    m = tokens_to_map(tokens, prefix)
    assert m.shape == (b, c, side, side)
    for i in range(side):
        for j in range(side):
            assert torch.equal(m[:, :, i, j], tokens[:, prefix + i * side + j, :])
    with pytest.raises(EdgeKDError, match="square"):
        tokens_to_map(torch.randn(1, 1 + 6, 4), 1)
    # a layer's output without the model's class token (CaiT/XCiT blocks, a ViT's patch_embed): read whole, the
    # 16 patch tokens had lost one to the "prefix" and failed as 15
    patches = torch.randn(1, 16, 4)
    assert torch.equal(tokens_to_map(patches, 1), patches.transpose(1, 2).reshape(1, 4, 4, 4))


def test_a_torch_2d_layer_of_an_nhwc_model_is_read_as_nchw():
    """Swin declares output_fmt NHWC at the model; its patch_embed.proj is a Conv2d (NCHW): it had been read as
    NHWC, the adapter sized for the wrong axis without a word."""
    from edgekd.models.taps import resolve_layout

    model = create_model({"name": "swinv2_tiny_window8_256", "num_classes": 2, "in_chans": 3,
                          "kwargs": {"img_size": 64, "window_size": 4}})
    conv_out = torch.randn(1, 96, 16, 16)
    assert resolve_layout(model, conv_out, "auto", "patch_embed.proj") == "nchw"
    assert resolve_layout(model, torch.randn(1, 16, 16, 96), "auto", "layers.0") == "nhwc"  # its stages are NHWC


# ---------------------------------------------------------------- models, hooks, adapters

def tiny(name: str, **kw) -> nn.Module:
    spec = {"name": name, "num_classes": 2, "in_chans": 3, "kwargs": kw}
    return create_model(spec)


def pre(size: int = 16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> dict:
    return {"input_size": [3, size, size], "channels": 3, "mean": list(mean), "std": list(std)}


def teacher_ckpt(model_name: str, size: int = 16, **kw) -> dict:
    return {"arch": {"name": model_name, "num_classes": 2, "kwargs": kw}, "preprocess": pre(size)}


def test_capture_features_removes_its_hooks():
    model = tiny("edgekd_cnn_tiny")
    with capture_features(model, ["stages.1"]) as feats:
        model(torch.randn(2, 3, 16, 16))
    assert feats["stages.1"].shape == (2, 16, 4, 4)
    assert not model.stages[1]._forward_hooks
    with torch.no_grad(), capture_features(model, ["stages.0.1", "stages.0.2"]) as feats:  # a BatchNorm, its ReLU
        model.eval()(torch.randn(2, 3, 16, 16))  # (in place: it had overwritten the BatchNorm's output it was given)
    assert (feats["stages.0.1"] < 0).any() and torch.equal(feats["stages.0.1"].clamp_min(0), feats["stages.0.2"])
    with pytest.raises(EdgeKDError, match="no module 'nope'"):
        with capture_features(model, ["nope"]):
            pass


def test_feature_kd_on_timm_cnn_reaches_adapter_and_student():
    student, teacher = tiny("edgekd_cnn_tiny"), freeze_teacher(tiny("test_resnet"))
    cfg = distill_cfg([{"kind": "ce", "weight": 0.5},
                       {"kind": "feature_mse", "weight": 0.5, "student": "stages.1", "teacher": "layer2"},
                       {"kind": "kl", "weight": 0.3}])
    obj = build_objective(cfg, student, teacher, teacher_ckpt("test_resnet", 32), pre(16), None, log=lambda m: None)
    adapter = obj.loss.terms[1].adapter
    assert isinstance(adapter.proj, nn.Conv2d) and adapter.proj.out_channels == teacher.layer2[-1].conv2.out_channels
    loss, logits = obj(student, torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 0, 1]))
    assert logits.shape == (4, 2) and torch.isfinite(loss)
    loss.backward()
    assert adapter.proj.weight.grad is not None and adapter.proj.weight.grad.abs().sum() > 0
    assert student.stages[0][0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert {id(p) for p in obj.parameters()} == {id(p) for p in adapter.parameters()}
    assert not any(k.startswith("proj") or "adapter" in k for k in student.state_dict())


def test_a_teacher_trained_without_the_students_hair_removal_is_warned_of():
    # Normalization, channels and size are adapted to the teacher; hair removal (in the decode) cannot be.
    logs: list[str] = []
    warn_teacher_input_mismatch([teacher_ckpt("edgekd_cnn_tiny")], {**pre(16), "hair_removal": True}, None, logs.append)
    assert [m for m in logs if "hair_removal" in m] == [
        "warning: distill: the teacher edgekd_cnn_tiny was trained without data.hair_removal and the student uses it: "
        "the teacher sees images unlike its training data (normalization, channels and size are adapted; hair "
        "removal is not)"]
    logs.clear()
    warn_teacher_input_mismatch([teacher_ckpt("edgekd_cnn_tiny")], pre(16), None, logs.append)
    assert not [m for m in logs if "hair_removal" in m]
    # both remove hair, with other elements: a teacher from before data.hair_kernel (17 px) for a scaled student
    old = teacher_ckpt("edgekd_cnn_tiny")
    old["preprocess"] = {**old["preprocess"], "hair_removal": True}
    for student_kernel, said in ((None, True), (17, False)):
        logs.clear()
        warn_teacher_input_mismatch([old], {**pre(16), "hair_removal": True, "hair_kernel": student_kernel}, None,
                                    logs.append)
        assert [m for m in logs if "removed hair" in m] == ([
            "warning: distill: the teacher edgekd_cnn_tiny removed hair with a 17 px element and the student uses the "
            "element scaled to the image (data.hair_kernel): the teacher sees images unlike its training data"]
            if said else [])


def test_a_teacher_image_size_other_than_the_teachers_own_is_warned_of():
    """A full-size skin recipe's teacher_image_size 256 resized a 32 px teacher's input 8x without a word."""
    logs: list[str] = []
    warn_teacher_input_mismatch([teacher_ckpt("edgekd_cnn_tiny", 16)], pre(16), 32, logs.append)
    assert [m for m in logs if "teacher_image_size" in m] == [
        "warning: distill.teacher_image_size 32 but the teacher edgekd_cnn_tiny was trained at 16 px: it sees the "
        "student's batch at a size it never trained on (null, the default, uses the checkpoint's 16)"]
    logs.clear()
    warn_teacher_input_mismatch([teacher_ckpt("edgekd_cnn_tiny", 16)], pre(16), 16, logs.append)
    assert not [m for m in logs if "teacher_image_size" in m]


def test_feature_kd_vit_tokens_reshaped_and_linear_adapter():
    student = tiny("test_vit", img_size=16, patch_size=4)            # 1 class token + 4x4 patch tokens
    teacher = freeze_teacher(tiny("edgekd_cnn_tiny"))
    cfg = distill_cfg([{"kind": "feature_mse", "weight": 1.0, "student": "blocks.0", "teacher": "stages.0"}])
    obj = build_objective(cfg, student, teacher, teacher_ckpt("edgekd_cnn_tiny", 16), pre(16), None,
                          log=lambda m: None)
    adapter = obj.loss.terms[0].adapter
    assert adapter.student_layout == "tokens" and adapter.student_prefix == 1
    assert isinstance(adapter.proj, nn.Linear) and adapter.proj.out_features == 8
    with capture_features(student, ["blocks.0"]) as feats:
        student(torch.randn(2, 3, 16, 16))
    assert adapter(feats["blocks.0"]).shape == (2, 8, 4, 4)
    loss, _ = obj(student, torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))
    loss.backward()
    assert adapter.proj.weight.grad.abs().sum() > 0


def test_teacher_input_renormalizes_and_resizes():
    ti = TeacherInput(pre(16), pre(32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)))
    x = torch.full((1, 3, 16, 16), 0.2)                            # student-normalized: raw = 0.2 * .5 + .5 = .6
    out = ti(x)
    assert out.shape == (1, 3, 32, 32)
    assert torch.allclose(out[0, :, 5, 5], (torch.tensor(0.6) - torch.tensor([0.485, 0.456, 0.406]))
                          / torch.tensor([0.229, 0.224, 0.225]), atol=1e-5)
    same = TeacherInput(pre(16), pre(16))
    assert same(x) is x


def test_teacher_logit_cache_equals_live_teacher_under_any_order():
    student, teacher = tiny("edgekd_cnn_tiny"), freeze_teacher(tiny("test_resnet"))
    terms = [{"kind": "kl", "weight": 0.7}, {"kind": "ce", "weight": 0.3}]
    live = build_objective(distill_cfg(terms), student, teacher, teacher_ckpt("test_resnet", 24), pre(16), None,
                           log=lambda m: None)
    cached = build_objective(distill_cfg(terms, cache_teacher_logits=True), student, teacher,
                             teacher_ckpt("test_resnet", 24), pre(16), None, log=lambda m: None)
    images = torch.randn(6, 3, 16, 16)
    first, _ = cached.teacher_outputs(images)
    perm = torch.tensor([5, 3, 0, 1, 4, 2])
    second, _ = cached.teacher_outputs(images[perm])
    reference, _ = live.teacher_outputs(images)
    assert torch.allclose(first, reference, atol=1e-6)
    assert torch.allclose(second, reference[perm], atol=1e-6)
    assert (cached.cache.misses, cached.cache.hits) == (6, 6)
    with pytest.raises(EdgeKDError, match="deterministic"):
        build_objective(distill_cfg(terms, cache_teacher_logits=True), student, teacher,
                        teacher_ckpt("test_resnet"), pre(16), None, augment=[{"RandomHorizontalFlip": {}}],
                        log=lambda m: None)


def test_kl_term_needs_matching_class_counts():
    student, teacher = tiny("edgekd_cnn_tiny"), freeze_teacher(tiny("test_resnet"))
    with pytest.raises(EdgeKDError, match="teacher has 2"):
        build_objective(distill_cfg([{"kind": "kl"}]), student, teacher, teacher_ckpt("test_resnet"), pre(16),
                        None, num_classes=3, log=lambda m: None)


# ---------------------------------------------------------------- recipes

def test_distill_section_is_validated():
    with pytest.raises(EdgeKDError, match="nothing is distilled"):
        recipe_from_dict({"distill": {"teacher": "t.pt", "terms": [{"kind": "ce"}]}})
    with pytest.raises(EdgeKDError, match="unknown key"):
        recipe_from_dict({"distill": {"teacher": "t.pt", "terms": [{"kind": "kl", "alpha": 0.3}]}})
    with pytest.raises(EdgeKDError, match="teacher"):
        recipe_from_dict({"distill": {"terms": [{"kind": "kl"}]}})
    with pytest.raises(EdgeKDError, match="kind"):
        recipe_from_dict({"distill": {"teacher": "t.pt", "terms": [{"kind": "cosine"}]}})


@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in (REPO / "recipes").rglob("*.yaml")))
def test_every_recipe_validates(path):
    from edgekd.data import build_transforms
    recipe = load_recipe(REPO / path)
    # every augment op and its arguments exist (hair removal needs the optional OpenCV extra: checked elsewhere)
    build_transforms(recipe.data.model_copy(update={"hair_removal": False}), recipe.augment, train=True)
    if recipe.distill and recipe.distill.teacher_recipe:
        teacher = load_recipe(REPO / recipe.distill.teacher_recipe)
        assert teacher.data.source == recipe.data.source and teacher.data.path == recipe.data.path


# ---------------------------------------------------------------- training with the one trainer

def tiny_recipe(tmp_path: Path, **over) -> dict:
    raw = {"name": "tiny", "seed": 0,
           "data": {"source": "builtin", "image_size": 16, "batch_size": 16, "limit": 48},
           "model": {"name": "edgekd_cnn_tiny"},
           "train": {"epochs": 1, "optimizer": {"lr": 0.01}, "scheduler": {"name": "none"}}}
    for k, v in over.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    return raw


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory) -> Path:
    from edgekd.train.run import train_recipe
    out = tmp_path_factory.mktemp("teacher")
    raw = tiny_recipe(out, model={"name": "test_resnet"}, data={"image_size": 24})
    return train_recipe(recipe_from_dict(raw), out, log=lambda m: None).best_path


def test_training_steps_leave_teacher_unchanged_and_adapters_out_of_the_checkpoint(tmp_path, tiny_teacher):
    from edgekd.data import build_data
    from edgekd.distill.objective import load_teacher
    from edgekd.train.checkpoint import load_checkpoint
    from edgekd.train.run import build_student_model, train_model

    raw = tiny_recipe(tmp_path, role="student", distill={
        "teacher": str(tiny_teacher),
        "terms": [{"kind": "kl", "weight": 0.5}, {"kind": "ce", "weight": 0.5},
                  {"kind": "feature_mse", "weight": 1.0, "student": "stages.1", "teacher": "layer1"}]})
    recipe = recipe_from_dict(raw)
    data = build_data(recipe)
    teacher, ckpt = load_teacher(tiny_teacher)
    teacher.train()  # even if someone flips it, the objective runs it in eval mode (BN stats frozen)
    before = copy.deepcopy(teacher.state_dict())
    model, spec = build_student_model(recipe, data)
    student_before = copy.deepcopy(model.state_dict())
    obj = build_objective(recipe.distill, model, teacher, ckpt, data.preprocess, data.class_weights(),
                          log=lambda m: None)
    adapter_before = copy.deepcopy(obj.adapter_state())
    res = train_model(recipe, tmp_path, data, model, spec, objective=obj, log=lambda m: None,
                      extra_meta={"kd_adapters": obj.adapter_state()})
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not teacher.training
    assert any(not torch.equal(student_before[k], v) for k, v in model.state_dict().items())
    assert any(not torch.equal(adapter_before[k], v) for k, v in obj.adapter_state().items())
    best = load_checkpoint(res.best_path)
    assert set(best["state_dict"]) == set(student_before)
    last = load_checkpoint(tmp_path / "last.pt")
    assert all(torch.equal(last["kd_adapters"][k], v) for k, v in obj.adapter_state().items())


def test_a_resumed_feature_kd_run_restores_its_adapters_and_matches_an_uninterrupted_run(tmp_path, tiny_teacher,
                                                                                         monkeypatch):
    from edgekd.distill.run import ADAPTER_KEY, distill_recipe
    from edgekd.train.checkpoint import load_checkpoint, save_checkpoint
    from edgekd.train.trainer import Trainer

    def recipe(epochs):
        return recipe_from_dict(tiny_recipe(
            tmp_path, role="student",
            train={"epochs": epochs, "optimizer": {"lr": 0.01}, "scheduler": {"name": "none"}},
            distill={"teacher": str(tiny_teacher),
                     "terms": [{"kind": "kl", "weight": 0.5}, {"kind": "ce", "weight": 0.5},
                               {"kind": "feature_mse", "weight": 1.0, "student": "stages.1", "teacher": "layer1"}]}))

    starts = []  # the adapters as each fit begins
    fit = Trainer.fit

    def spy(self, progress=None):
        starts.append({k: v.detach().clone() for k, v in self.objective.adapter_state().items()})
        return fit(self, progress)

    monkeypatch.setattr(Trainer, "fit", spy)
    quiet = dict(log=lambda m: None)
    full = distill_recipe(recipe(2), tmp_path / "full", **quiet)
    # Interrupted after epoch 1: a 1-epoch run's last.pt (the trainer re-seeds per epoch, so its epoch 1 is the
    # 2-epoch run's) under the 2-epoch recipe's digest, resumed to epoch 2.
    one = distill_recipe(recipe(1), tmp_path / "one", **quiet)
    saved = load_checkpoint(tmp_path / "one" / "last.pt")
    saved["recipe_digest"] = recipe(2).digest()
    save_checkpoint(tmp_path / "part" / "last.pt", {k: v for k, v in saved.items() if k != "format"})
    resumed = distill_recipe(recipe(2), tmp_path / "part", resume=True, **quiet)

    fresh, _, at_resume = starts
    adapters = saved[ADAPTER_KEY]
    assert adapters and set(at_resume) == set(adapters)
    assert any(not torch.equal(fresh[k], adapters[k]) for k in adapters)  # epoch 1 trained them
    assert all(torch.equal(at_resume[k], adapters[k]) for k in adapters)  # restored, not re-initialised
    assert resumed.fit.history[0]["train_loss"] == pytest.approx(one.fit.history[0]["train_loss"])
    assert [h["train_loss"] for h in resumed.fit.history] == pytest.approx(
        [h["train_loss"] for h in full.fit.history], rel=1e-5)
    ends = [load_checkpoint(d / "last.pt") for d in (tmp_path / "full", tmp_path / "part")]
    for key in ("state_dict", ADAPTER_KEY):
        for name, value in ends[0][key].items():
            torch.testing.assert_close(ends[1][key][name], value, rtol=1e-5, atol=1e-6)
    assert resumed.test["auc"] == pytest.approx(full.test["auc"])
    # the teacher is pinned by sha256: a resume after it changed (retrained into the same best.pt) went on with the
    # other model silently; here last.pt says it started from other bytes
    from edgekd.fileio import sha256_file

    assert ends[1]["distill"]["teacher_sha256"] == sha256_file(tiny_teacher)
    ends[1]["distill"]["teacher_sha256"] = "0" * 64
    save_checkpoint(tmp_path / "part" / "last.pt", {k: v for k, v in ends[1].items() if k != "format"})
    (tmp_path / "part" / "metrics.json").unlink()  # cut short again
    with pytest.raises(EdgeKDError, match=rf"distill teacher {tiny_teacher} changed since this run started "
                                          r"\(sha256 000000000000\.\.\. then, "):
        distill_recipe(recipe(2), tmp_path / "part", resume=True, **quiet)


def test_distill_recipe_end_to_end_from_cli(tmp_path, tiny_teacher, monkeypatch):
    from typer.testing import CliRunner

    from edgekd.cli import app

    raw = tiny_recipe(tmp_path, name="tiny-student", role="student",
                      distill={"teacher": str(tiny_teacher), "cache_teacher_logits": True,
                               "terms": [{"kind": "kl", "weight": 0.7, "temperature": 4},
                                         {"kind": "ce", "weight": 0.3}]})
    (tmp_path / "student.yaml").write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["train", str(tmp_path / "student.yaml"), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["role"] == "student" and "auc" in metrics["test"]
    from edgekd.train.checkpoint import load_checkpoint
    assert load_checkpoint(tmp_path / "run" / "best.pt")["distill"]["teacher"] == str(tiny_teacher)
    # log.csv holds each term's value (unweighted) beside the weighted sum the student trained on
    import csv

    for row in csv.DictReader((tmp_path / "run" / "log.csv").open()):
        kl, ce = float(row["train_0_kl"]), float(row["train_1_ce"])
        assert kl > 0 and ce > 0 and float(row["train_loss"]) == pytest.approx(0.7 * kl + 0.3 * ce, rel=1e-6)

    result = CliRunner().invoke(app, ["report", str(tiny_teacher.parent), str(tmp_path / "run"),
                                      "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [r["role"] for r in report["rows"]] == ["teacher", "student"]
    student_row = report["rows"][1]
    assert student_row["acc"] == pytest.approx(metrics["test"]["acc"]) and student_row["params"] == metrics["params"]
    assert "| tiny-student (edgekd_cnn_tiny) | student | 0 |" in (tmp_path / "report" / "report.md").read_text()
    assert (tmp_path / "report" / "roc_pneumoniamnist_mini.png").is_file()
    assert (tmp_path / "report" / "confusion_pneumoniamnist_mini_tiny-student_s0.png").is_file()
    # intervals around every figure, and the student's AUC tested against the teacher's on the same images
    ci = student_row["intervals"]["auc"]
    assert ci["low"] <= student_row["auc"] <= ci["high"] and ci["low"] < ci["high"]
    from edgekd.metrics.uncertainty import delong_test  # noqa: F401  (the test the report runs)
    vs = student_row["auc_vs"]
    assert vs["reference"] == report["rows"][0]["name"] and 0 <= vs["p_value"] <= 1
    assert vs["diff"] == pytest.approx(student_row["auc"] - report["rows"][0]["auc"], abs=1e-9)
    text = (tmp_path / "report" / "report.md").read_text()
    assert "|\n\nAUC vs `" in text  # a paragraph of its own (right under the table it rendered as a table row)
    assert student_row["images"] == report["rows"][0]["images"] > 0 and "scored on different" not in text
    again = CliRunner().invoke(app, ["report", str(tmp_path / "run"), str(tmp_path / "run" / "best.pt"),
                                     "--out", str(tmp_path / "report2")])
    assert "are the same checkpoint" in str(again.exception) and not (tmp_path / "report2").exists()
    # --set reaches every run's recipe (a run made in another folder: its data.path relative to that one)
    moved = CliRunner().invoke(app, ["report", str(tmp_path / "run"), "--set", f"data.path={tmp_path / 'gone.npz'}",
                                     "--out", str(tmp_path / "report3")])
    assert "gone.npz" in str(moved.exception)
    same = CliRunner().invoke(app, ["report", str(tmp_path / "run"), "--set", "data.batch_size=3",
                                    "--out", str(tmp_path / "report4")])
    assert same.exit_code == 0 and (tmp_path / "report4" / "report.json").is_file()
    assert metrics["test"]["intervals"]["acc"]["low"] <= metrics["test"]["acc"] <= metrics["test"]["intervals"]["acc"]["high"]
    assert "ece" in metrics["test"]["calibration"]


def test_fold_summary_says_what_a_fold_holds_whole():
    from edgekd.distill.folds import SUMMARY_METRICS, folds_markdown

    summary = {"student": {"val": {k: {"mean": 0.9, "std": 0.01, "n": 5} for k in SUMMARY_METRICS}}}
    patient, image = (folds_markdown(summary, "r", 5, unit) for unit in ("patient", "image"))
    assert "Patient-level folds (no patient in two folds)." in patient and "Image-level" not in patient
    assert "Image-level folds: the data has no patient ids" in image
    # a metric some folds leave undefined (a one-class fold's AUC) says over how many folds it is
    summary["student"]["val"]["auc"] = {"mean": 0.8, "std": 0.02, "n": 3}
    summary["student"]["val"]["pauc"] = {"mean": 0.1, "std": 0.0, "n": 1}
    summary["student"]["val"]["f1"] = {"mean": float("nan"), "std": 0.0, "n": 0}
    row = folds_markdown(summary, "r", 5).splitlines()[-1].strip("| ").split(" | ")
    cells = dict(zip(("role", "split", *SUMMARY_METRICS), row))
    assert cells["acc"] == "0.9000 ± 0.0100" and cells["auc"] == "0.8000 ± 0.0200 (3 of 5 folds)"
    assert cells["pauc"] == "0.1000 (1 of 5 folds)" and cells["f1"] == "-"


def test_kfold_driver_trains_teacher_then_student_per_fold(tmp_path):
    from edgekd.distill.folds import run_kfold

    teacher_raw = tiny_recipe(tmp_path, name="fold-teacher")
    (tmp_path / "teacher.yaml").write_text(yaml.safe_dump(teacher_raw))
    raw = tiny_recipe(tmp_path, name="fold-student", role="student",
                      distill={"teacher_recipe": str(tmp_path / "teacher.yaml"),
                               "terms": [{"kind": "kl", "weight": 0.7}, {"kind": "ce", "weight": 0.3}]})
    result = run_kfold(recipe_from_dict(raw), tmp_path / "kfold", 2, log=lambda m: None,
                       teacher_overrides=["name=fold-teacher-b"])  # `train --teacher-set`
    assert {r["name"] for r in result["runs"] if r["role"] == "teacher"} == {"fold-teacher-b"}
    for fold in (0, 1):
        for role in ("teacher", "student"):
            run = tmp_path / "kfold" / f"fold{fold}" / role
            assert (run / "confusion_val.png").is_file() and (run / "best.pt").is_file()
    folds = [json.loads((tmp_path / "kfold" / f"fold{k}" / "splits.json").read_text()) for k in (0, 1)]
    assert folds[0]["val"]["images"] + folds[1]["val"]["images"] == folds[0]["train"]["images"] + folds[0]["val"]["images"]
    saved = json.loads((tmp_path / "kfold" / "kfold.json").read_text())
    assert saved["machine"]["cores"] == os.cpu_count()  # where the folds ran
    assert [(r["fold"], r["role"]) for r in saved["runs"]] == [(0, "teacher"), (0, "student"),
                                                              (1, "teacher"), (1, "student")]
    for r in saved["runs"]:
        assert sum(map(sum, r["confusion_val"])) > 0
    accs = [r["val"]["acc"] for r in saved["runs"] if r["role"] == "student"]
    stats = saved["summary"]["student"]["val"]["acc"]
    assert stats["mean"] == pytest.approx(sum(accs) / 2) and stats["n"] == 2
    assert "±" in result["table_markdown"] and (tmp_path / "kfold" / "kfold.md").is_file()
    assert stats["std"] == pytest.approx(abs(accs[0] - accs[1]) / 2 ** 0.5)  # the sample std (ddof=1), as labelled
    # A MedMNIST file has no patient ids: the folds are image-level, and the summary says so (it had not).
    assert saved["fold_unit"] == "image" and "mean ± sample std over folds" in saved["table_markdown"]
    assert "Image-level folds: the data has no patient ids" in (tmp_path / "kfold" / "kfold.md").read_text()
    # `edgekd report` of the k-fold folder itself names the fold runs to give (it said "no checkpoint")
    from edgekd.distill.report import resolve_checkpoint

    with pytest.raises(EdgeKDError, match=r"kfold: a k-fold folder \(its summary over the folds is kfold.md\); give "
                                          r"fold runs to compare, e.g. \S+fold0/student \S+fold0/teacher$"):
        resolve_checkpoint(tmp_path / "kfold")
    with pytest.raises(EdgeKDError, match=r"fold1: a fold of a k-fold run; give its runs, e.g. \S+fold1/student "
                                          r"\S+fold1/teacher$"):
        resolve_checkpoint(tmp_path / "kfold" / "fold1")

    # --resume: finished runs are kept as they are; a run cut short (no metrics.json yet) goes on from its last.pt
    kept = tmp_path / "kfold" / "fold0" / "student" / "best.pt"
    stamp = kept.stat().st_mtime_ns
    (tmp_path / "kfold" / "fold1" / "student" / "metrics.json").unlink()
    said: list[str] = []
    again = run_kfold(recipe_from_dict(raw), tmp_path / "kfold", 2, log=said.append,
                      teacher_overrides=["name=fold-teacher-b"], resume=True)
    assert kept.stat().st_mtime_ns == stamp and sum("finished earlier: kept" in m for m in said) == 3
    assert said[0].startswith("k-fold: the data has no patient ids: folds are image-level")
    # the log counts folds from 1, the folders from 0: each fold's line names its folder (it had not)
    assert [m for m in said if m.startswith("k-fold: fold ")] == [
        f"k-fold: fold {k + 1}/2 (held out as validation; runs in {tmp_path / 'kfold' / f'fold{k}'})" for k in (0, 1)]
    assert any("resumed from" in m and "fold1" in m and "student" in m for m in said), said
    assert [r["test"] for r in again["runs"]] == [r["test"] for r in saved["runs"]]  # the same runs, the same figures
    with pytest.raises(EdgeKDError, match="no fold run to resume"):
        run_kfold(recipe_from_dict(raw), tmp_path / "fresh", 2, log=lambda m: None, resume=True)
    # a new k-fold run into it: `edgekd train` says once that its runs are replaced (each fold run had said it
    # again for its own folder), listing the fold runs when a run cut short left no kfold.json
    from edgekd.pipeline import check_run_inputs

    (tmp_path / "kfold" / "kfold.json").unlink()
    said.clear()
    check_run_inputs(recipe_from_dict(raw), tmp_path / "kfold", None, resume=False, folds=2, log=said.append)
    assert [m for m in said if "already holds a run" in m] == [
        f"warning: {tmp_path / 'kfold'} already holds a run (fold0/student/last.pt, fold0/teacher/last.pt, "
        "fold1/student/last.pt, fold1/teacher/last.pt): its files are replaced by this one; anything else there (a "
        "bundle, eval folders, task folders of other tasks) stays from the earlier run"]
    said.clear()
    run_kfold(recipe_from_dict(raw), tmp_path / "kfold", 2, log=said.append, teacher_overrides=["name=fold-teacher-b"])
    assert not any("already holds a run" in m for m in said) and kept.stat().st_mtime_ns != stamp
    # A new k-fold run stopped in its fold 2 had left the earlier run's fold 2 (and kfold.md) beside the new fold 1,
    # and --resume then refused that fold as another recipe's: the earlier folds go when the new run starts.
    from edgekd.distill import folds as folds_module

    real_run = folds_module.fold_run

    def stopped_in_fold_2(train, rec, out, resume, log, progress):
        if out.parent.name == "fold1":
            raise KeyboardInterrupt
        return real_run(train, rec, out, resume, log, progress)

    other = recipe_from_dict({**raw, "train": {**raw["train"], "optimizer": {"lr": 0.0123}}})
    with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(folds_module, "fold_run", stopped_in_fold_2)
        run_kfold(other, tmp_path / "kfold", 2, log=lambda m: None, teacher_overrides=["name=fold-teacher-b"])
    assert not (tmp_path / "kfold" / "kfold.json").exists() and not (tmp_path / "kfold" / "kfold.md").exists()
    assert not list((tmp_path / "kfold" / "fold1").rglob("*.pt")) and not (tmp_path / "kfold" / "fold1" /
                                                                           "splits.json").exists()
    resumed = run_kfold(other, tmp_path / "kfold", 2, log=lambda m: None, teacher_overrides=["name=fold-teacher-b"],
                        resume=True)
    assert len(resumed["runs"]) == 4 and (tmp_path / "kfold" / "fold1" / "splits.json").is_file()


def test_kfold_distill_needs_teacher_recipe(tmp_path):
    from edgekd.distill.folds import run_kfold

    raw = tiny_recipe(tmp_path, distill={"teacher": "t.pt", "terms": [{"kind": "kl"}]})
    with pytest.raises(EdgeKDError, match="teacher_recipe"):
        run_kfold(recipe_from_dict(raw), tmp_path / "k", 2, log=lambda m: None)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    from conftest import run_edgekd

    p = run_edgekd("train", tmp_path / "r.yaml", "--teacher-set", "train.epochs=1", "--out", tmp_path / "o")
    assert p.returncode == 2 and "--teacher-set is for --folds" in p.stderr and not (tmp_path / "o").exists()


# ---------------------------------------------------------------- distillation that pays: DKD, shared views, ensembles

def hand_dkd(student, teacher, targets, t, alpha, beta):
    """DKD by hand: TCKD on (p_target, 1 - p_target), NCKD on the renormalized non-target probabilities."""
    total = 0.0
    for s_row, t_row, y in zip(student, teacher, targets):
        ps, pt = softmax([v / t for v in s_row]), softmax([v / t for v in t_row])
        bs, bt = [ps[y], 1 - ps[y]], [pt[y], 1 - pt[y]]
        tckd = sum(b * math.log(b / a) for a, b in zip(bs, bt))
        qs = softmax([v / t for c, v in enumerate(s_row) if c != y])
        qt = softmax([v / t for c, v in enumerate(t_row) if c != y])
        nckd = sum(b * math.log(b / a) for a, b in zip(qs, qt))
        total += alpha * tckd + beta * nckd
    return total / len(student) * t * t


@pytest.mark.parametrize("t,alpha,beta", [(1.0, 1.0, 8.0), (4.0, 1.0, 8.0), (2.0, 0.5, 2.0)])
def test_dkd_matches_hand_computed(t, alpha, beta):
    loss = build_distill_loss(distill_cfg([{"kind": "dkd", "temperature": t, "alpha": alpha, "beta": beta}]).terms,
                              None)
    value, _ = loss(batch())
    assert value.item() == pytest.approx(hand_dkd(S, T, Y, t, alpha, beta), rel=1e-5)


def test_dkd_with_two_classes_is_alpha_times_kl():
    s, te, y = torch.tensor([[2.0, -1.0], [0.3, 0.9]]), torch.tensor([[0.5, 0.2], [-1.0, 2.0]]), torch.tensor([0, 1])
    loss = build_distill_loss(distill_cfg([{"kind": "dkd", "temperature": 4.0, "alpha": 0.7, "beta": 8.0}]).terms,
                              None)
    value, _ = loss(KDBatch(s, y, te))
    assert value.item() == pytest.approx(0.7 * kl_divergence(s, te, 4.0).item(), rel=1e-5)


def test_a_dkd_warm_up_scales_the_term_linearly_from_the_first_epoch():
    """The DKD authors' warm-up: epoch e (from 1) weighs min(e / N, 1); the logged part stays the term's value."""
    terms = distill_cfg([{"kind": "dkd", "weight": 2.0, "temperature": 4.0, "warmup_epochs": 4},
                         {"kind": "ce", "weight": 1.0}]).terms
    loss = build_distill_loss(terms, None)
    dkd = hand_dkd(S, T, Y, 4.0, 1.0, 8.0)
    ce = torch.nn.functional.cross_entropy(torch.tensor(S), torch.tensor(Y)).item()
    for epoch, share in [(0, 0.25), (2, 0.75), (3, 1.0), (9, 1.0)]:
        loss.set_epoch(epoch)
        value, parts = loss(batch())
        assert value.item() == pytest.approx(2.0 * share * dkd + ce, rel=1e-5)
        assert parts["0_dkd"] == pytest.approx(dkd, rel=1e-5)


def test_a_distillation_run_warms_its_dkd_term_up_epoch_by_epoch_and_says_when_it_never_ends(tmp_path, tiny_teacher,
                                                                                           monkeypatch):
    from edgekd.distill.losses import DistillLoss
    from edgekd.distill.run import distill_recipe

    seen = []
    forward = DistillLoss.forward
    monkeypatch.setattr(DistillLoss, "forward", lambda self, b, labelled=True: (seen.append(list(self.scales)),
                                                                               forward(self, b, labelled))[1])
    lines = []
    raw = tiny_recipe(tmp_path, role="student", train={"epochs": 2},
                      distill={"teacher": str(tiny_teacher), "terms": [
                          {"kind": "dkd", "weight": 1.0, "warmup_epochs": 3}, {"kind": "ce", "weight": 1.0}]})
    distill_recipe(recipe_from_dict(raw), tmp_path / "run", log=lines.append)
    assert sorted({tuple(s) for s in seen}) == [(1 / 3, 1.0), (2 / 3, 1.0)]  # epochs 1 and 2, the ce term unscaled
    assert [s[0] for s in seen] == sorted(s[0] for s in seen)
    assert any("warmup_epochs 3 > train.epochs 2: the term ends the run at 67% of its weight" in m for m in lines)
    assert any("terms 1*dkd(T=4) (warm-up 3 epochs), 1*ce" in m for m in lines)  # the temperature named


class Recorder(nn.Module):
    """A model wrapper that keeps every input it sees."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.model(x)


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_shared_view_mixing_gives_teacher_and_student_the_same_pixels(kind):
    torch.manual_seed(0)
    student, teacher = Recorder(tiny("edgekd_cnn_tiny")), Recorder(tiny("test_resnet"))
    cfg = distill_cfg([{"kind": "kl"}], mix={"kind": kind, "alpha": 1.0})
    objective = build_objective(cfg, student, teacher, teacher_ckpt("test_resnet"), pre(16), None, num_classes=2,
                                log=lambda m: None)
    images, targets = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 0, 1])
    objective(student, images, targets)
    (seen_s,), (seen_t,) = student.seen[-1:], teacher.seen[-1:]
    assert torch.equal(seen_s, seen_t)  # identical pixels
    assert not torch.equal(seen_s, images)  # and they were mixed


def test_mixing_refuses_label_terms_and_the_logit_cache():
    with pytest.raises(EdgeKDError, match="no single label"):
        recipe_from_dict({"distill": {"teacher": "t.pt", "mix": {"kind": "mixup"},
                                      "terms": [{"kind": "kl"}, {"kind": "ce"}]}})
    cfg = distill_cfg([{"kind": "kl"}], mix={"kind": "mixup"}, cache_teacher_logits=True)
    with pytest.raises(EdgeKDError, match="cache_teacher_logits off"):
        build_objective(cfg, tiny("edgekd_cnn_tiny"), tiny("test_resnet"), teacher_ckpt("test_resnet"), pre(16),
                        None, num_classes=2, log=lambda m: None)


@pytest.mark.parametrize("mode", ["mean_probs", "mean_logits"])
def test_an_ensemble_teachers_targets_are_the_mean_of_its_members(mode):
    torch.manual_seed(0)
    members = [freeze_teacher(tiny("test_resnet")), freeze_teacher(tiny("edgekd_cnn_tiny"))]
    ckpts = [teacher_ckpt("test_resnet"), teacher_ckpt("edgekd_cnn_tiny", size=24)]  # the second at 24 px
    cfg = distill_cfg([{"kind": "kl"}], ensemble=["t2.pt"], ensemble_mode=mode)
    objective = build_objective(cfg, tiny("edgekd_cnn_tiny"), members[0], ckpts[0], pre(16), None, num_classes=2,
                                log=lambda m: None, ensemble=[(members[1], ckpts[1])])
    images = torch.randn(3, 3, 16, 16)
    got, _ = objective.teacher_outputs(images)
    with torch.no_grad():
        each = [m(TeacherInput(pre(16), c["preprocess"])(images)) for m, c in zip(members, ckpts)]
    if mode == "mean_logits":
        torch.testing.assert_close(got, (each[0] + each[1]) / 2)
    else:
        torch.testing.assert_close(got.softmax(1), (each[0].softmax(1) + each[1].softmax(1)) / 2)


def test_an_ensemble_refuses_feature_terms():
    with pytest.raises(EdgeKDError, match="ensemble: feature terms"):
        recipe_from_dict({"distill": {"teacher": "t.pt", "ensemble": ["t2.pt"],
                                      "terms": [{"kind": "feature_mse", "student": "a", "teacher": "b"}]}})


def test_tta_averaged_teacher_targets_are_the_mean_over_flips():
    torch.manual_seed(0)
    teacher = freeze_teacher(tiny("test_resnet"))
    cfg = distill_cfg([{"kind": "kl"}], teacher_views=["original", "hflip", "vflip"])
    objective = build_objective(cfg, tiny("edgekd_cnn_tiny"), teacher, teacher_ckpt("test_resnet"), pre(16), None,
                                num_classes=2, log=lambda m: None)
    x = torch.randn(3, 3, 16, 16)
    got, _ = objective.teacher_outputs(x)
    with torch.no_grad():
        want = (teacher(x).softmax(1) + teacher(x.flip(-1)).softmax(1) + teacher(x.flip(-2)).softmax(1)) / 3
    torch.testing.assert_close(got.softmax(1), want)
    assert not torch.allclose(want, teacher(x).softmax(1))  # the views do change the target
    # One flip alone is that flip's target (it had been ignored, as if [original]); no view at all is refused.
    alone = build_objective(distill_cfg([{"kind": "kl"}], teacher_views=["hflip"]), tiny("edgekd_cnn_tiny"), teacher,
                            teacher_ckpt("test_resnet"), pre(16), None, num_classes=2, log=lambda m: None)
    with torch.no_grad():
        torch.testing.assert_close(alone.teacher_outputs(x)[0].softmax(1), teacher(x.flip(-1)).softmax(1))
    from edgekd.recipe import refuse_new_run_traps

    with pytest.raises(EdgeKDError, match="teacher_views"):
        refuse_new_run_traps(recipe_from_dict({"distill": {"teacher": "t.pt", "teacher_views": [],
                                                           "terms": [{"kind": "kl"}]}}), "r")


def test_a_teacher_trained_on_the_students_test_images_is_refused(tmp_path):
    """Splits carved from one image folder with another seed put most of the student's test images in the
    teacher's training split; the student would learn its test answers from the teacher."""
    from edgekd.distill.run import distill_recipe
    from edgekd.train.run import train_recipe

    from conftest import tiny_recipe, write_image_folder

    root = write_image_folder(tmp_path / "imgs", n_per_class=12)
    data = {"source": "imagefolder", "path": str(root), "split": "stratified", "val_fraction": 0.25,
            "test_fraction": 0.25}
    teacher = train_recipe(recipe_from_dict(tiny_recipe(root, epochs=1, data=data)), tmp_path / "teacher",
                           log=lambda s: None)
    kd = {"teacher": str(teacher.best_path), "terms": [{"kind": "kl", "weight": 1.0, "temperature": 4}]}
    student = tiny_recipe(root, name="student", epochs=1, data=data, distill=kd, role="student")
    with pytest.raises(EdgeKDError, match=r"distill.teacher .* trained on \d+ of this run's \d+ test images"):
        distill_recipe(recipe_from_dict({**student, "seed": 1}), tmp_path / "s1", log=lambda s: None)
    assert not (tmp_path / "s1" / "best.pt").exists()
    said = []
    distill_recipe(recipe_from_dict(student), tmp_path / "s0", log=said.append)  # the teacher's own splits
    assert not any("trained on" in line for line in said)
    # the same files listed in a CSV (another source, another split): compared too (it had been skipped)
    rows = ["path,label"] + [f"{p},{p.parent.name}" for p in sorted(root.rglob("*.png"))]
    (tmp_path / "files.csv").write_text("\n".join(rows) + "\n")
    csv_data = {**data, "source": "csv", "path": str(tmp_path / "files.csv")}
    with pytest.raises(EdgeKDError, match=r"distill.teacher .* trained on \d+ of this run's \d+ test images"):
        distill_recipe(recipe_from_dict({**student, "data": {**student["data"], **csv_data}, "seed": 5}),
                       tmp_path / "csv", log=lambda s: None)
    # given train/ and test/ folders, val carved from train by seed: a student seed sweep from one teacher shares
    # no test image with it, only val images (a warning, not an error)
    for split, n in (("train", 12), ("test", 4)):
        write_image_folder(tmp_path / "given" / split, n_per_class=n)
    given = {"source": "imagefolder", "path": str(tmp_path / "given"), "split": "given", "val_fraction": 0.25}
    teacher = train_recipe(recipe_from_dict(tiny_recipe(root, epochs=1, data=given)), tmp_path / "teacher2",
                           log=lambda s: None)
    sweep = tiny_recipe(root, name="student", epochs=1, data=given, role="student",
                        distill={**kd, "teacher": str(teacher.best_path)})
    said = []
    distill_recipe(recipe_from_dict({**sweep, "seed": 1}), tmp_path / "sweep1", log=said.append)
    assert any(line.startswith("warning: distill.teacher") and "val images" in line for line in said), said
    # a teacher whose val split is the student's test/ folder chose its best epoch on those images (no word had
    # been said: only its train split was compared)
    files = sorted((tmp_path / "given").rglob("*.png"))
    rows = ["path,label,split"] + [f"{f},{f.parent.name},{'val' if f.parts[-3] == 'test' else 'train'}" for f in files]
    (tmp_path / "chosen.csv").write_text("\n".join(rows) + "\n")
    chose = train_recipe(recipe_from_dict(tiny_recipe(root, epochs=1, data={
        "source": "csv", "path": str(tmp_path / "chosen.csv"), "split": "given", "test_fraction": 0.25})),
        tmp_path / "teacher3", log=lambda s: None)
    said = []
    distill_recipe(recipe_from_dict({**sweep, "distill": {**kd, "teacher": str(chose.best_path)}}), tmp_path / "s3",
                   log=said.append)
    assert any(line.startswith("warning: distill.teacher") and "chose its best epoch on 8 of this run's 8 test "
               "images (its val split" in line for line in said), said
    assert not any("trained on" in line for line in said)


def test_a_teacher_path_that_is_a_folder_or_missing_says_which(tmp_path, tiny_teacher):
    from edgekd.distill.objective import load_teacher
    from edgekd.errors import EdgeKDError

    with pytest.raises(EdgeKDError, match=r"is not a checkpoint file: its checkpoint is .*best\.pt$"):
        load_teacher(Path(tiny_teacher).parent)
    with pytest.raises(EdgeKDError, match=r"is not a checkpoint file: a folder holding no best\.pt$"):
        load_teacher(tmp_path)
    # a k-fold run (fold<i>/<role>/best.pt): its folder, or the best.pt it lacks, named with its folds (the
    # not-found hint had said to train the teacher into it again, replacing its kfold.json)
    kfold = tmp_path / "kf"
    for i in range(3):
        (kfold / f"fold{i}" / "teacher").mkdir(parents=True)
        shutil.copy(tiny_teacher, kfold / f"fold{i}" / "teacher" / "best.pt")
    for given in (kfold, kfold / "best.pt"):
        with pytest.raises(EdgeKDError) as err:
            load_teacher(given, "recipes/demo/teacher.yaml")
        assert str(err.value) == (f"distill.teacher: {given} is not a checkpoint file: {kfold} is a k-fold run, one "
                                  f"checkpoint per fold: {kfold / 'fold0' / 'teacher' / 'best.pt'} ... "
                                  f"{kfold / 'fold2' / 'teacher' / 'best.pt'}: give one (or train this recipe with "
                                  "--folds K: each fold's student then learns from its own fold's teacher)")
    load_teacher(kfold / "fold1" / "teacher" / "best.pt")
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "edgekd.json").write_text("{}")
    with pytest.raises(EdgeKDError, match=r"bundle is an exported bundle; give the training run's best\.pt"):
        load_teacher(tmp_path / "bundle" / "best.pt")
    with pytest.raises(EdgeKDError, match="not found .*read from the working folder"):
        load_teacher(tmp_path / "nowhere.pt")
    from edgekd.distill.run import distill_recipe  # the command that trains it, from distill.teacher_recipe

    raw = tiny_recipe(tmp_path, role="student", distill={"teacher": str(tmp_path / "t" / "best.pt"),
                                                          "teacher_recipe": "recipes/demo/teacher.yaml",
                                                          "ensemble": [str(tmp_path / "e.pt")], "terms": [{"kind": "kl"}]})
    with pytest.raises(EdgeKDError) as err:
        distill_recipe(recipe_from_dict(raw), tmp_path / "s", log=lambda m: None)
    assert str(err.value) == (f"distill.teacher: checkpoint {tmp_path / 't' / 'best.pt'} not found (run `edgekd train "
                              f"recipes/demo/teacher.yaml --out {tmp_path / 't'}` first; a relative path is read from "
                              "the working folder)")
    raw["distill"]["teacher"] = str(tiny_teacher)
    with pytest.raises(EdgeKDError, match=r"^distill.ensemble: checkpoint .*e\.pt not found \(train the teacher recipe"):
        distill_recipe(recipe_from_dict(raw), tmp_path / "s", log=lambda m: None)


def test_report_rows_of_one_recipe_and_seed_are_named_apart():
    """best.pt and last.pt of one run (or one recipe trained twice) gave two identical rows and one confusion PNG
    written over the other."""
    from edgekd.distill.report import name_apart

    rows = [{"name": "s", "seed": 0, "checkpoint": "runs/a/student/best.pt"},
            {"name": "s", "seed": 0, "checkpoint": "runs/a/student/last.pt"},
            {"name": "s", "seed": 0, "checkpoint": "runs/b/student/last.pt"},
            {"name": "s", "seed": 1, "checkpoint": "runs/c/student/best.pt"},
            {"name": "t", "seed": 0, "checkpoint": "x/best.pt"}]
    names = [r["name"] for r in name_apart(rows)]
    assert len(set(zip(names, [r["seed"] for r in rows]))) == len(rows)
    assert names[0] == "s@student-best" and names[3:] == ["s", "t"]  # only rows that clash are renamed
    assert all("/" not in n for n in names)  # they name the confusion PNG files


def test_a_report_row_is_named_after_the_data_it_scored(tiny_recipe_dict, tmp_path):
    """`report --set data.path=other.npz` scored the other file but named (and grouped) the row after the training
    set, so two models scored on one file sat in two tables; `eval` named it right."""
    import shutil

    from edgekd.distill.report import evaluate_for_report
    from edgekd.train import train_recipe

    run = train_recipe(recipe_from_dict(tiny_recipe_dict), tmp_path / "run", log=lambda s: None)
    other = tmp_path / "othermnist.npz"
    shutil.copy(tiny_recipe_dict["data"]["path"], other)
    own = evaluate_for_report(run.best_path, "test")
    moved = evaluate_for_report(run.best_path, "test", [f"data.path={other}"])
    assert own["dataset"] != "othermnist" and moved["dataset"] == "othermnist"

    # A second report into the folder of the first: the first's plots go (they had stayed beside the new ones, and
    # a stop half-way had left new plots beside the old report.json); the run folder's own plots stay.
    from edgekd.distill.report import comparison_report

    comparison_report([run.out], run.out, "test")
    first = sorted(p.name for p in run.out.glob("confusion_*_s0.png"))
    assert len(first) == 1 and (run.out / "confusion_test.png").is_file()
    comparison_report([run.out], run.out, "test", [f"data.path={other}"])
    assert sorted(p.name for p in run.out.glob("confusion_*_s0.png")) == ["confusion_othermnist_tiny_s0.png"] != first
    assert (run.out / "confusion_test.png").is_file() and (run.out / "roc_test.png").is_file()


def test_a_report_of_rows_scored_on_different_images_says_so():
    """`edgekd report` put a 40-image and an 80-image test set in one table without a word (and dropped the DeLong
    test silently)."""
    import numpy as np

    from edgekd.distill.report import auc_comparisons, different_images_note, report_markdown

    from edgekd.data.sources import Table
    from edgekd.distill.report import scored_images

    def row(name, y, role, pixels=0):
        probs = np.stack([1 - np.linspace(0.1, 0.9, len(y)), np.linspace(0.1, 0.9, len(y))], 1)
        images = np.full((len(y), 4, 4, 1), pixels, dtype=np.uint8)
        return {"name": name, "role": role, "model": "m", "seed": 0, "params": 1e3, "macs": 1e6, "split": "test",
                "images": len(y), "_y": np.asarray(y), "_probs": probs, "acc": 0.5,
                "_scored": scored_images(Table(labels=np.asarray(y), images=images))}

    a, b = row("a", [0, 1] * 20, "teacher"), row("b", [0, 1] * 40, "student")
    assert different_images_note([a, b]) == ("\n\nWarning: these rows were scored on different test images (a 40, "
                                              "b 80): their figures do not compare, and no DeLong test pairs them.")
    assert auc_comparisons([a, b]) == "" and different_images_note([a, row("c", [0, 1] * 20, "student")]) == ""
    assert auc_comparisons([a, row("c", [0, 1] * 20, "student")]).count("| c (student) |") == 1
    # the same labels on other images (two folders of one name, equal class counts) were paired by a DeLong test
    other = row("d", [0, 1] * 20, "student", pixels=7)
    assert "scored on different test images (a 40, d 40)" in different_images_note([a, other])
    assert auc_comparisons([a, other]) == ""
    assert "| a (m) | teacher | 0 | 1.0k | 1.0 | 40 |" in report_markdown("d", "test", [a, b])  # it had said 0.00M
    assert "| a (m) | teacher | 0 | 2.50M | 1.0 | 40 |" in report_markdown("d", "test", [{**a, "params": 2.5e6}, b])
    # the bootstrap line heads a table only when a row has intervals (one printed above bare figures before)
    assert "Brackets:" not in report_markdown("d", "test", [a, b])
    ci = {"acc": {"low": 0.4, "high": 0.6}}
    assert "Brackets: 95%" in report_markdown("d", "test", [{**a, "intervals": ci}, b])
    assert "| 0.5000 [0.400, 0.600] |" in report_markdown("d", "test", [{**a, "intervals": ci}, b])
    # a multi-class table says its ROC legend's AUC is the micro one (the table's is the macro: 0.72 beside 0.564)
    multi = report_markdown("d", "test", [a, b])
    assert "the ROC plot's legend gives each model's micro-average AUC" in multi and "PR-AUC" not in multi


def test_image_files_scored_are_told_apart_by_where_they_are_not_their_names(tmp_path):
    """Two folders of one name (`scans/`) hold files of the same names: other images. Files are compared by real
    path, size and modification time (not read again for every row of a report)."""
    import numpy as np

    from edgekd.data.sources import Table
    from edgekd.distill.report import scored_images

    for site in ("a", "b"):
        (tmp_path / site / "scans").mkdir(parents=True)
        for name in ("x.png", "y.png"):
            (tmp_path / site / "scans" / name).write_bytes(b"pixels of " + site.encode())
    labels = np.array([0, 1])
    table = lambda site: Table(labels=labels, paths=[str(tmp_path / site / "scans" / n) for n in ("x.png", "y.png")])  # noqa: E731
    assert scored_images(table("a")) == scored_images(table("a")) != scored_images(table("b"))
    (tmp_path / "link").symlink_to(tmp_path / "a")  # the same files reached another way
    assert scored_images(table("link")) == scored_images(table("a"))
    assert scored_images(Table(labels=labels[::-1].copy(), paths=table("a").paths)) != scored_images(table("a"))


def test_report_names_a_continual_run_folder_for_what_it_is(tmp_path):
    """A continual run folder holds model.pt, which train announces as the best checkpoint; report said it had no
    checkpoint. Scored on its recipe's top-level data, such a model would meet images its tasks trained on."""
    from edgekd.distill.report import resolve_checkpoint

    (tmp_path / "cl").mkdir()
    (tmp_path / "cl" / "model.pt").write_bytes(b"")
    with pytest.raises(EdgeKDError, match="a continual run; its figures per task are in .*continual.json"):
        resolve_checkpoint(tmp_path / "cl")
    (tmp_path / "plain").mkdir()
    with pytest.raises(EdgeKDError, match="no checkpoint \\(give a run directory holding best.pt, or a .pt file\\)"):
        resolve_checkpoint(tmp_path / "plain")


def test_kfold_refuses_what_would_see_a_folds_validation_images_before_training(tmp_path):
    """An ensemble member (trained once, on the standard split) and model.weights trained on the same data had been
    used in every fold without a word; a student with the default role 'teacher' overwrote the fold teacher's folder
    and was averaged with it as one row; a continual recipe failed after fold0/splits.json was written."""
    import torch

    from edgekd.distill.folds import refuse_weights_trained_here, run_kfold

    (tmp_path / "teacher.yaml").write_text(yaml.safe_dump(tiny_recipe(tmp_path, name="t")))
    student = {"teacher_recipe": str(tmp_path / "teacher.yaml"), "terms": [{"kind": "kl"}]}
    here = tmp_path / "here.pt"  # what refuse_weights_trained_here reads of an edgekd checkpoint: its recipe's data
    torch.save({"recipe": {"data": {"source": "builtin", "path": None}}}, here)
    elsewhere = tmp_path / "elsewhere.pt"
    torch.save({"recipe": {"data": {"source": "medmnist", "path": str(tmp_path / "other.npz")}}}, elsewhere)
    cases = [
        (tiny_recipe(tmp_path, role="student", distill={**student, "ensemble": [str(here)]}),
         r"^--folds: distill.ensemble members are checkpoints trained once, outside the folds"),
        (tiny_recipe(tmp_path, distill=student), r"^--folds: the distill recipe's role is 'teacher' \(set, or the default\)"),
        (tiny_recipe(tmp_path, role="student", distill=student, model={"weights": str(here)}),
         r"^--folds: model.weights \S+here.pt was trained by edgekd on this data \(builtin\)"),
        (tiny_recipe(tmp_path, model={"weights": str(here)}), r"^--folds: model.weights \S+here.pt was trained"),
    ]
    for raw, message in cases:
        with pytest.raises(EdgeKDError, match=message):
            run_kfold(recipe_from_dict(raw), tmp_path / "k", 2, log=lambda m: None)
        assert not (tmp_path / "k").exists()  # refused before fold0/splits.json
    said: list[str] = []  # a fixed distill.teacher is not what the folds distill from: said (it was not)
    with pytest.raises(EdgeKDError):
        run_kfold(recipe_from_dict(tiny_recipe(tmp_path, role="student", distill={**student, "teacher": str(here)},
                                               model={"weights": str(here)})), tmp_path / "k", 2, log=said.append)
    assert said == [f"k-fold: distill.teacher {here} is not used: each fold distills from its own "
                    "distill.teacher_recipe, trained on that fold"]
    with pytest.raises(EdgeKDError, match=r"^--folds: the teacher recipe's model.weights \S+here.pt was trained"):
        run_kfold(recipe_from_dict(tiny_recipe(tmp_path, role="student", distill=student)), tmp_path / "k", 2,
                  log=lambda m: None, teacher_overrides=[f"model.weights={here}"])
    # the same image files under another path (a CSV listing the folder's files) are the same images
    from conftest import write_image_folder

    folder = write_image_folder(tmp_path / "imgs", n_per_class=8)
    rows = ["path,label"] + [f"{f},{f.parent.name}" for f in sorted(folder.rglob("*.png"))]
    (tmp_path / "files.csv").write_text("\n".join(rows) + "\n")
    listed = tmp_path / "listed.pt"
    torch.save({"recipe": recipe_from_dict(tiny_recipe(tmp_path, data={
        "source": "csv", "path": str(tmp_path / "files.csv")})).to_dict()}, listed)
    with pytest.raises(EdgeKDError, match=r"^--folds: model.weights \S+listed.pt was trained by edgekd on this data"):
        refuse_weights_trained_here(recipe_from_dict(tiny_recipe(tmp_path, model={"weights": str(listed)}, data={
            "source": "imagefolder", "path": str(folder)})), "model.weights")
    # weights trained on other data (or not by edgekd) are what model.weights is for
    refuse_weights_trained_here(recipe_from_dict(tiny_recipe(tmp_path, model={"weights": str(elsewhere)})), "w")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "plain.pth")
    refuse_weights_trained_here(recipe_from_dict(tiny_recipe(tmp_path, model={"weights": str(tmp_path / "plain.pth")})), "w")
    (tmp_path / "distilling.yaml").write_text(yaml.safe_dump(tiny_recipe(tmp_path, distill=student)))
    with pytest.raises(EdgeKDError, match=r"^--folds: distill.teacher_recipe \S+distilling.yaml is itself a distill "
                                          r"recipe; the fold teacher trains on the labels alone$"):
        run_kfold(recipe_from_dict(tiny_recipe(tmp_path, role="student", distill={
            **student, "teacher_recipe": str(tmp_path / "distilling.yaml")})), tmp_path / "k", 2, log=lambda m: None)


def test_fold_teacher_data_paths_compare_as_files_and_teacher_set_errors_name_teacher_set(tmp_path):
    """`--teacher-set data.path=<the same folder>/` (or a symlink to it) was refused as other data, without naming
    the key; a bad --teacher-set key was reported as a --set."""
    from edgekd.distill.folds import same_data_value
    from edgekd.recipe import load_recipe

    (tmp_path / "scans").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "scans")
    assert same_data_value("path", f"{tmp_path}/scans/", str(tmp_path / "scans"))
    assert same_data_value("path", str(tmp_path / "link"), str(tmp_path / "scans"))
    assert not same_data_value("path", str(tmp_path), str(tmp_path / "scans"))
    assert not same_data_value("limit", 10, 20)
    with pytest.raises(EdgeKDError, match=r"^--teacher-set data.pth=x: unknown key 'data.pth'"):
        load_recipe(REPO / "recipes/demo/teacher.yaml", ["data.pth=x"], "--teacher-set")
    with pytest.raises(EdgeKDError, match=r"^--set data.pth=x: unknown key"):
        load_recipe(REPO / "recipes/demo/teacher.yaml", ["data.pth=x"])


def test_a_train_loss_a_distillation_run_does_not_use_is_warned_of():
    """`--set train.loss.name=focal` on a student changed nothing (log.csv identical) while its checkpoint's recipe
    said focal; the skin students inherited their teacher's class_weights the same way."""
    import glob

    from edgekd.distill.run import unused_train_loss
    from edgekd.recipe import load_recipe

    student = REPO / "recipes" / "demo" / "student.yaml"
    assert unused_train_loss(load_recipe(student)) is None
    said = unused_train_loss(load_recipe(student, ["train.loss.name=focal", "train.loss.label_smoothing=0.3"]))
    assert said.startswith("train.loss (name: focal, label_smoothing: 0.3) is not used by a distillation run")
    shipped = [p for p in glob.glob(str(REPO / "recipes" / "**" / "*.yaml"), recursive=True)
               if load_recipe(p).distill and unused_train_loss(load_recipe(p))]
    assert shipped == []



def test_a_missing_zip_given_to_report_is_said_missing(tmp_path):
    """A missing x.zip was "an exported bundle, not a checkpoint" (any .zip name counts as a bundle)."""
    from edgekd.distill.report import resolve_checkpoint

    with pytest.raises(EdgeKDError, match=r"nothere.zip: no checkpoint \(give a run directory holding best.pt"):
        resolve_checkpoint(tmp_path / "nothere.zip")


def test_the_auc_reference_is_the_teacher_the_student_learned_from(tmp_path):
    """With two teachers in a report, every model was tested against the smaller one, not the student's own."""
    import numpy as np

    from edgekd.distill.report import auc_comparisons

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)

    def row(name, role, teacher=None):
        p = np.clip(y * 0.6 + rng.random(60) * 0.5, 0, 1)
        return {"name": name, "role": role, "checkpoint": str(tmp_path / name / "best.pt"), "teacher": teacher,
                "_y": y, "_probs": np.stack([1 - p, p], 1), "_scored": "same"}

    rows = [row("small-teacher", "teacher"), row("big-teacher", "teacher"),
            row("student", "student", teacher=str(tmp_path / "big-teacher" / "best.pt"))]
    text = auc_comparisons(rows)
    assert "AUC vs `big-teacher` (teacher)" in text and rows[2]["auc_vs"]["reference"] == "big-teacher"
    # The recorded path is relative to where the student trained: from another folder it named the other teacher
    # (or none); the teacher's sha256, recorded too, decides.
    rows[0]["_sha256"], rows[1]["_sha256"] = "a" * 64, "b" * 64
    rows[2]["teacher"], rows[2]["_teacher_sha256"] = str(tmp_path / "small-teacher" / "best.pt"), "b" * 64
    assert "AUC vs `big-teacher` (teacher)" in auc_comparisons(rows)
    rows[2]["teacher"] = rows[2]["_teacher_sha256"] = None  # nobody's teacher in the table: the first
    assert "AUC vs `small-teacher` (teacher)" in auc_comparisons(rows)


def test_averaged_teachers_keep_a_confident_teachers_non_target_order():
    """log(mean softmax) clamped at 1e-12 put every class below it at -27.6: DKD from an ensemble of two copies of
    one confident teacher (or its TTA views, alike here) gave 12.41 where the teacher alone gives 85.11."""
    from edgekd.distill.losses import decoupled_kd
    from edgekd.distill.objective import AveragedViews, EnsembleTeacher

    logits = torch.tensor([[30.0, 0.0, -10.0, -20.0]])

    class Fixed(nn.Module):
        def forward(self, x):
            return logits.expand(len(x), -1)

    x, s, y = torch.zeros(1, 3, 4, 4), torch.tensor([[5.0, 1.0, 0.0, -1.0]]), torch.tensor([0])
    alone = decoupled_kd(s, logits, y, 4, 1, 8)
    both = EnsembleTeacher([Fixed(), Fixed()], [nn.Identity(), nn.Identity()], "mean_probs")(x)
    views = AveragedViews(Fixed(), ["original", "hflip"])(x)
    assert alone == pytest.approx(85.1058, abs=1e-3)
    for averaged in (both, views):
        assert torch.allclose(averaged, logits.log_softmax(-1), atol=1e-5)
        assert decoupled_kd(s, averaged, y, 4, 1, 8) == pytest.approx(float(alone), rel=1e-5)


def test_tckd_keeps_its_value_and_direction_for_a_confident_student():
    """1 - p_target rounds to 0 in float32 once the rest is below ~1e-7: TCKD came out 2.2e-5 (float64: 5.0e-6) and
    its gradient did not push the over-confident student's target logit down."""
    from edgekd.distill.losses import decoupled_kd

    s = torch.tensor([[18.0, 0.0, 0.0]], requires_grad=True)
    t = torch.tensor([[14.0, 0.0, 0.0]])
    value = decoupled_kd(s, t, torch.tensor([0]), 1.0, 1.0, 0.0)
    (grad,) = torch.autograd.grad(value, s)
    ref = decoupled_kd(s.detach().double().requires_grad_(), t.double(), torch.tensor([0]), 1.0, 1.0, 0.0)
    value, ref = float(value.detach()), float(ref.detach())
    assert value == pytest.approx(ref, rel=1e-3) and ref == pytest.approx(5.02e-6, rel=1e-2)
    assert grad[0, 0] > 0 and (grad[0, 1:] < 0).all()


def test_a_tap_that_says_it_is_nhwc_is_read_so_when_its_model_does_not():
    """A ViT with dynamic_img_size: its patch_embed outputs NHWC and says so (output_fmt), the model says nothing;
    'auto' had read it as NCHW, the adapter taking the grid height for its channels."""
    import timm

    from edgekd.distill.features import build_adapter
    from edgekd.models import capture_features

    student = timm.create_model("test_vit", num_classes=2, img_size=32, patch_size=8, dynamic_img_size=True).eval()
    teacher = timm.create_model("test_resnet", num_classes=2).eval()
    x = torch.zeros(2, 3, 32, 32)
    with torch.no_grad(), capture_features(student, ["patch_embed"]) as a, \
            capture_features(teacher, ["layer2"]) as b:
        student(x)
        teacher(x)
    assert a["patch_embed"].shape[1:] == (4, 4, 64)
    adapter = build_adapter(student, a["patch_embed"], "auto", teacher, b["layer2"], "auto", "patch_embed", "layer2")
    assert adapter.student_layout == "nhwc" and adapter.proj.in_channels == 64


def test_a_multi_class_roc_comparison_names_its_legend_auc_the_micro_average(tmp_path):
    """The legend's AUC (sklearn's, on the micro-averaged curve) sat beside the report's macro AUC, unnamed."""
    import numpy as np

    from edgekd.distill.report import plot_roc_comparison
    from edgekd.metrics.plots import plt

    rng = np.random.default_rng(0)
    y = np.arange(30) % 3
    probs = rng.dirichlet(np.ones(3), 30)
    seen = []
    real = plt.Figure.savefig

    def record(fig, *args, **kwargs):
        seen.extend(t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts())
        return real(fig, *args, **kwargs)

    plt.Figure.savefig = record
    try:
        binary = probs[:, :2] / probs[:, :2].sum(1, keepdims=True)
        plot_roc_comparison([{"name": "s", "role": "student", "_y": y, "_probs": probs},
                             {"name": "b", "role": "baseline", "_y": y % 2, "_probs": binary}], tmp_path / "roc.png", "t")
    finally:
        plt.Figure.savefig = real
    assert seen[0].startswith("s (student), micro-average (AUC 0.") and seen[1].startswith("b (baseline) (AUC 0.")
