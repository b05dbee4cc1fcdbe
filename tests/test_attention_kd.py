"""Attention-transfer KD: the loss against hand-computed values, zero for equal maps, gradients, recipe wiring."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import REPO
from edgekd.distill.features import FeatureMaps
from edgekd.distill.losses import AttentionTransfer, KDBatch, attention_transfer, build_distill_loss
from edgekd.distill.objective import build_objective, freeze_teacher
from edgekd.errors import EdgeKDError
from edgekd.models import create_model
from edgekd.recipe import DistillConfig, load_recipe


def l2_normalized(values):
    norm = math.sqrt(sum(v * v for v in values))
    return [v / norm for v in values]


def test_attention_loss_matches_hand_computed():
    # student: 2 channels on a 2x2 grid; teacher: 1 channel (channel counts need not match)
    student = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]], [[1.0, -2.0], [0.0, 0.0]]]])
    teacher = torch.tensor([[[[2.0, 0.0], [0.0, 0.0]]]])
    # channel mean of squares: student [(1+1)/2, (0+4)/2, 0, (1+0)/2] = [1, 2, 0, 0.5]; teacher [4, 0, 0, 0]
    qs, qt = l2_normalized([1.0, 2.0, 0.0, 0.5]), l2_normalized([4.0, 0.0, 0.0, 0.0])
    want = sum((a - b) ** 2 for a, b in zip(qs, qt)) / 4
    assert float(attention_transfer(student, teacher)) == pytest.approx(want, rel=1e-6)


def test_attention_loss_aligns_grids_by_interpolation():
    # a 4x4 student attention map is interpolated (bilinear, factor 2: the 2x2 block means) to the 2x2 teacher grid
    student = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    teacher = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    sq = (student ** 2)[0, 0]
    blocks = [float(sq[r:r + 2, c:c + 2].mean()) for r in (0, 2) for c in (0, 2)]
    qs, qt = l2_normalized(blocks), [1.0, 0.0, 0.0, 0.0]
    want = sum((a - b) ** 2 for a, b in zip(qs, qt)) / 4
    assert float(attention_transfer(student, teacher, spatial="interpolate")) == pytest.approx(want, rel=1e-5)


def test_attention_loss_is_zero_for_identical_maps_and_positive_otherwise():
    feat = torch.randn(3, 4, 5, 5)
    # same spatial attention: teacher = the student's channels repeated and scaled (different channel count)
    teacher = torch.cat([feat, feat], dim=1) * 3.0
    assert float(attention_transfer(feat, teacher)) == pytest.approx(0.0, abs=1e-7)
    assert float(attention_transfer(feat, torch.randn(3, 8, 5, 5))) > 1e-4


def test_attention_term_in_the_weighted_sum():
    cfg = DistillConfig.model_validate({"teacher": "t.pt", "terms": [
        {"kind": "attention", "weight": 250, "student": "s", "teacher": "t"}, {"kind": "ce", "weight": 1.0}]})
    loss = build_distill_loss(cfg.terms, None, {0: FeatureMaps("nchw", "nchw")})
    assert isinstance(loss.terms[0], AttentionTransfer) and loss.student_layers == ["s"] and loss.teacher_layers == ["t"]
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 2, 2)
    logits, y = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 1])
    total, parts = loss(KDBatch(logits, y, None, {"s": s}, {"t": t}))
    want = 250 * float(attention_transfer(s, t)) + float(nn.functional.cross_entropy(logits, y))
    assert float(total) == pytest.approx(want, rel=1e-5)
    assert parts["0_attention"] == pytest.approx(float(attention_transfer(s, t)), rel=1e-5)


def tiny(name: str, **kw) -> nn.Module:
    return create_model({"name": name, "num_classes": 2, "in_chans": 3, "kwargs": kw})


def pre(size: int) -> dict:
    return {"input_size": [3, size, size], "channels": 3, "mean": [0.5] * 3, "std": [0.5] * 3}


def test_attention_kd_gradients_reach_the_student_not_the_teacher():
    student, teacher = tiny("edgekd_cnn_tiny"), freeze_teacher(tiny("test_resnet"))
    cfg = DistillConfig.model_validate({"teacher": "t.pt", "terms": [
        {"kind": "kl", "weight": 0.7}, {"kind": "ce", "weight": 0.3},
        {"kind": "attention", "student": "stages.1", "teacher": "layer2"}]})
    obj = build_objective(cfg, student, teacher, {"arch": {"name": "test_resnet", "num_classes": 2},
                                                  "preprocess": pre(32)}, pre(16), None, log=lambda m: None)
    assert obj.parameters() == []  # attention transfer trains nothing besides the student
    loss, logits = obj(student, torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 0, 1]))
    assert obj.last_parts["2_attention"] > 0
    student.zero_grad()
    at_batch = _batch(obj, student)
    obj.loss.terms[2](at_batch).backward()
    assert student.stages[0][0].weight.grad.abs().sum() > 0     # through the tapped stage into earlier layers
    assert student.fc.weight.grad is None                        # the head is after the tap: no AT gradient
    assert all(p.grad is None for p in teacher.parameters())
    assert at_batch.teacher_features["layer2"].requires_grad is False


def _batch(obj, student) -> KDBatch:
    from edgekd.models import capture_features
    x = torch.randn(4, 3, 16, 16)
    with capture_features(student, obj.loss.student_layers) as feats:
        logits = student(x)
    t_logits, t_feats = obj.teacher_outputs(x)
    return KDBatch(logits, torch.tensor([0, 1, 0, 1]), t_logits, dict(feats), t_feats)


def test_attention_recipe_validation():
    only_at = DistillConfig.model_validate({"teacher": "t.pt", "terms": [
        {"kind": "attention", "student": "a", "teacher": "b"}, {"kind": "ce"}]})
    assert only_at.terms[0].weight == 500 and only_at.terms[0].spatial == "interpolate"
    cfg = DistillConfig.model_validate({"teacher": "t.pt", "cache_teacher_logits": True, "terms": [
        {"kind": "attention", "student": "stages.1", "teacher": "layer2"}, {"kind": "kl"}]})
    with pytest.raises(EdgeKDError, match="attention"):
        build_objective(cfg, tiny("edgekd_cnn_tiny"), tiny("test_resnet"),
                        {"arch": {"name": "test_resnet", "num_classes": 2}, "preprocess": pre(16)}, pre(16), None,
                        log=lambda m: None)


def test_pneumonia_at_recipe_matches_the_logit_and_feature_kd_recipes():
    at, logit, feature = (load_recipe(REPO / f"recipes/pneumonia/{n}.yaml")
                          for n in ("student-at-28", "student-28", "student-feature-28"))
    assert at.model == logit.model == feature.model and at.distill.teacher == logit.distill.teacher
    assert at.data == logit.data and at.train == logit.train
    assert [t.kind for t in at.distill.terms].count("attention") == 3


def test_taps_that_never_run_or_do_not_keep_the_batch_and_a_teacher_size_it_cannot_take_are_refused():
    """A SwinV2 window attention tapped as a teacher feature gives (batch x windows, N, C) (here its shape on a
    made-up tensor): every student image had been matched with windows of the first teacher image, silently. A module timm's fused attention never calls had
    been a KeyError; a teacher_image_size a fixed-grid teacher cannot take, timm's AssertionError at the first step
    (after the run had cleared its folder)."""
    from edgekd.distill.objective import check_tap

    with pytest.raises(EdgeKDError, match=r"^distill.terms: the teacher's module 'layers.0.blocks.0.attn' gives an "
                                          r"output of shape \(32, 4, 8\) for 2 images, its first axis not the batch"):
        check_tap("teacher", "layers.0.blocks.0.attn", torch.zeros(32, 4, 8), 2)
    with pytest.raises(EdgeKDError, match=r"^distill.terms: the student's module 'blocks.0.attn.attn_drop' gave no "
                                          r"output in an eval-mode forward pass"):
        check_tap("student", "blocks.0.attn.attn_drop", None, 2)
    check_tap("student", "blocks.0", torch.zeros(2, 5, 8), 2)
    kl = [{"kind": "kl", "weight": 0.7}, {"kind": "ce", "weight": 0.3}]
    vit = freeze_teacher(tiny("vit_tiny_patch16_224", img_size=32, depth=1, embed_dim=32, num_heads=2))
    teacher_ckpt = {"arch": {"name": "vit_tiny_patch16_224", "num_classes": 2}, "preprocess": pre(32)}
    unused = {"kind": "feature_mse", "student": "stages.1", "teacher": "blocks.0.attn.attn_drop"}  # fused attention
    cfg = DistillConfig.model_validate({"teacher": "t.pt", "terms": [*kl, unused]})
    with pytest.raises(EdgeKDError, match="the teacher's module 'blocks.0.attn.attn_drop' gave no output"):
        build_objective(cfg, tiny("edgekd_cnn_tiny"), vit, teacher_ckpt, pre(16), None, log=lambda m: None)
    cfg = DistillConfig.model_validate({"teacher": "t.pt", "teacher_image_size": 64, "terms": kl})
    with pytest.raises(EdgeKDError, match=r"^distill.teacher_image_size 64: the teacher vit_tiny_patch16_224 \(trained "
                                          r"at 32 px\) does not take 64 px input \(AssertionError: .*\); set "
                                          r"distill.teacher_image_size: 32, or null"):
        build_objective(cfg, tiny("edgekd_cnn_tiny"), vit, teacher_ckpt, pre(16), None, log=lambda m: None)
    cfg = DistillConfig.model_validate({"teacher": "t.pt", "teacher_image_size": 48, "terms": kl})
    build_objective(cfg, tiny("edgekd_cnn_tiny"), freeze_teacher(tiny("test_resnet")),  # a CNN takes 48 px
                    {"arch": {"name": "test_resnet", "num_classes": 2}, "preprocess": pre(32)}, pre(16), None,
                    log=lambda m: None)
    from edgekd.models.taps import resolve_layout  # a forced layout that does not fit names the tapped module

    with pytest.raises(EdgeKDError, match=r"^feature layout 'tokens' needs a 3-D output, got shape \(2, 2, 2, 8\) "
                                          r"from 'layers.3'$"):
        resolve_layout(vit, torch.zeros(2, 2, 2, 8), "tokens", "layers.3")
