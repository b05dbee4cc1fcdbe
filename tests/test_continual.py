"""Continual learning: CL metrics, EWC, LwF, rehearsal buffer, BN freeze, head expansion, end-to-end runs."""

from __future__ import annotations

import copy
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from conftest import tiny_recipe
from edgekd.continual import average_accuracy, backward_transfer, forgetting, forgetting_per_task, retention
from edgekd.continual.base import TaskStep
from edgekd.continual.bn_freeze import BNFreezePlugin, batchnorm_layers
from edgekd.continual.ewc import diagonal_fisher, ewc_penalty
from edgekd.continual.heads import resize_classifier
from edgekd.continual.lwf import kd_kl
from edgekd.continual.replay import ClassBalancedBuffer, herding_order
from edgekd.continual.run import evaluate_task
from edgekd.continual.scenarios import ContinualObjective, build_tasks
from edgekd.data import Table, build_data
from edgekd.errors import EdgeKDError
from edgekd.fileio import sha256_file
from edgekd.models import create_model, model_spec
from edgekd.recipe import ModelConfig, recipe_from_dict
from edgekd.train.checkpoint import model_from_checkpoint
from edgekd.train.trainer import SupervisedObjective, Trainer

NAN = float("nan")


def tiny_model(num_classes=2, head="linear"):
    spec = model_spec(ModelConfig(name="edgekd_cnn_tiny", head=head), num_classes, 3)
    return create_model(spec)


def quadrant_npz(path: Path, classes: int, n=(128, 32, 32), size=16, seed=0) -> Path:
    """Learnable images: class c lights quadrant c % 4 (brighter for c >= 4), plus noise."""
    arrays = {}
    for k, (split, count) in enumerate(zip(("train", "val", "test"), n)):
        rng = np.random.default_rng(seed + k)
        labels = rng.permutation(np.arange(count) % classes)
        imgs = rng.integers(0, 50, size=(count, size, size), dtype=np.uint8)
        q = size // 2
        for i, c in enumerate(labels):
            r, col = divmod(int(c) % 4, 2)
            imgs[i, r * q:(r + 1) * q, col * q:(col + 1) * q] += 100 + 100 * (int(c) >= 4)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = imgs, labels[:, None].astype(np.uint8)
    np.savez(path, **arrays)
    return path


def base_recipe(npz: Path, **continual) -> dict:
    return tiny_recipe(npz, name="cl-tiny", epochs=3, monitor="val_acc", monitor_mode=None, role="student",
                       continual=continual)


# ------------------------------------------------------------------ metrics (hand-written matrices)
R3 = [[0.9, NAN, NAN],
      [0.7, 0.8, NAN],
      [0.6, 0.5, 0.95]]


def test_average_accuracy_uses_learned_tasks_only():
    assert average_accuracy(R3) == pytest.approx((0.6 + 0.5 + 0.95) / 3)
    assert average_accuracy(R3, step=1) == pytest.approx(0.75)
    assert average_accuracy(R3, step=0) == pytest.approx(0.9)


def test_forgetting_is_best_earlier_minus_final():
    per_task = forgetting_per_task(R3)
    assert per_task[:2] == pytest.approx([0.9 - 0.6, 0.8 - 0.5])
    assert math.isnan(per_task[2])
    assert forgetting(R3) == pytest.approx(0.3)
    # The best earlier accuracy counts, not the one right after learning the task.
    improving = [[0.5, NAN, NAN], [0.8, 0.9, NAN], [0.6, 0.9, 0.9]]
    assert forgetting_per_task(improving)[0] == pytest.approx(0.2)
    assert backward_transfer(improving) == pytest.approx(((0.6 - 0.5) + (0.9 - 0.9)) / 2)


def test_backward_transfer_and_retention():
    assert backward_transfer(R3) == pytest.approx(((0.6 - 0.9) + (0.5 - 0.8)) / 2)
    assert retention(R3) == pytest.approx(0.6 / 0.9)
    assert retention(R3, task=1) == pytest.approx(0.5 / 0.8)
    no_forgetting = [[0.9, NAN], [0.9, 0.7]]
    assert forgetting(no_forgetting) == 0.0 and backward_transfer(no_forgetting) == 0.0
    assert retention(no_forgetting) == 1.0
    with pytest.raises(ValueError):
        average_accuracy([[0.5, 0.5]])


# ------------------------------------------------------------------ EWC
def test_ewc_penalty_zero_at_anchor_and_grows_with_distance():
    torch.manual_seed(0)
    model = tiny_model()
    anchor = {k: p.detach().clone() for k, p in model.named_parameters()}
    fisher = {k: torch.rand_like(p) for k, p in model.named_parameters()}
    assert ewc_penalty(model, [(fisher, anchor)]).item() == 0.0
    direction = {k: torch.randn_like(p) for k, p in model.named_parameters()}
    values = []
    for scale in (0.01, 0.1, 1.0):
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.copy_(anchor[k] + scale * direction[k])
        values.append(ewc_penalty(model, [(fisher, anchor)]).item())
    assert 0 < values[0] < values[1] < values[2]
    # Quadratic: 10x the distance gives 100x the penalty.
    assert values[2] / values[1] == pytest.approx(100.0, rel=1e-3)


def test_ewc_penalty_ignores_rows_a_grown_head_adds():
    model = tiny_model(2)
    anchor = {k: p.detach().clone() for k, p in model.named_parameters()}
    fisher = {k: torch.ones_like(p) for k, p in model.named_parameters()}
    fc = resize_classifier(model, 5)
    with torch.no_grad():
        fc.weight[2:] += 3.0
    assert ewc_penalty(model, [(fisher, anchor)]).item() == 0.0
    with torch.no_grad():
        fc.weight[0, 0] += 2.0
    assert ewc_penalty(model, [(fisher, anchor)]).item() == pytest.approx(4.0)


def test_diagonal_fisher_matches_per_sample_autograd():
    torch.manual_seed(0)
    model = tiny_model(3).eval()
    x, y = torch.randn(5, 3, 16, 16), torch.tensor([0, 2, 1, 1, 0])
    loader = [(x[:3], y[:3]), (x[3:], y[3:])]
    fisher = diagonal_fisher(model, loader, lambda logits, t: F.cross_entropy(logits, t), torch.device("cpu"))
    expected = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for i in range(5):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for k, p in model.named_parameters():
            expected[k] += p.grad ** 2 / 5
    for k in expected:
        torch.testing.assert_close(fisher[k], expected[k], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("online", [False, True])
def test_ewc_plugin_separate_terms_or_one_online_term(tmp_path, online):
    from edgekd.continual.ewc import EWCPlugin

    npz = quadrant_npz(tmp_path / "q.npz", classes=4, n=(16, 8, 8))
    rec = recipe_from_dict(base_recipe(npz, scenario="class_incremental",
                                       tasks=[{"name": "a", "classes": [0, 1]}, {"name": "b", "classes": [2, 3]}]))
    tasks = build_tasks(rec)
    torch.manual_seed(0)
    model = tiny_model(2).eval()
    plugin = EWCPlugin(weight=1.0, online=online, gamma=0.5, fisher_samples=8)
    plugin.after_task(TaskStep(model, tasks, 0, "single", torch.device("cpu")))
    first = {k: v.clone() for k, v in plugin.terms[0][0].items()}
    resize_classifier(model, 4)
    with torch.no_grad():
        model.stages[0][0].weight.add_(0.1)
    plugin.after_task(TaskStep(model, tasks, 1, "single", torch.device("cpu")))
    if not online:
        assert len(plugin.terms) == 2 and plugin.terms[0][0]["fc.weight"].shape == (2, 16)
        return
    fresh = EWCPlugin(weight=1.0, fisher_samples=8)
    fresh.after_task(TaskStep(model, tasks, 1, "single", torch.device("cpu")))
    (fisher, anchor), = plugin.terms
    conv = "stages.0.0.weight"
    torch.testing.assert_close(fisher[conv], fresh.terms[0][0][conv] + 0.5 * first[conv])
    torch.testing.assert_close(fisher["fc.weight"][:2], fresh.terms[0][0]["fc.weight"][:2] + 0.5 * first["fc.weight"])
    torch.testing.assert_close(fisher["fc.weight"][2:], fresh.terms[0][0]["fc.weight"][2:])
    torch.testing.assert_close(anchor[conv], model.stages[0][0].weight)


# ------------------------------------------------------------------ LwF / objective
def test_kd_kl_matches_hand_computation():
    s, t = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[0.0, 2.0, 0.0]])
    temp = 2.0
    ps, pt = F.softmax(s / temp, 1), F.softmax(t / temp, 1)
    hand = (pt * (pt.log() - ps.log())).sum() * temp ** 2
    assert kd_kl(s, t, temp).item() == pytest.approx(hand.item(), rel=1e-5)
    assert kd_kl(t, t, temp).item() == pytest.approx(0.0, abs=1e-7)


class _T:
    def __init__(self, index, lo, hi):
        self.index, self.lo, self.hi = index, lo, hi

    @property
    def num_classes(self):
        return self.hi - self.lo


def test_multi_head_loss_is_per_task_softmax():
    tasks = [_T(0, 0, 2), _T(1, 2, 5)]
    logits = torch.randn(4, 5)
    targets = torch.tensor([1, 3, 0, 4])
    ce = torch.nn.CrossEntropyLoss()
    multi = ContinualObjective(ce, tasks, 1, "multi").loss(logits, targets)
    hand = (F.cross_entropy(logits[[0, 2], 0:2], torch.tensor([1, 0]), reduction="sum")
            + F.cross_entropy(logits[[1, 3], 2:5], torch.tensor([1, 2]), reduction="sum")) / 4
    assert multi.item() == pytest.approx(hand.item(), rel=1e-6)
    single = ContinualObjective(ce, tasks, 1, "single").loss(logits, targets)
    assert single.item() == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-6)


def test_validation_scores_each_sample_on_its_own_task_head():
    # Task A's rows win every argmax over the full output, but the multi-head validation (what val_acc logs)
    # scores each sample on its own task's rows, as the run's reported accuracy does.
    tasks = [_T(0, 0, 2), _T(1, 2, 5)]
    logits = np.array([[9.0, 8.0, 0.1, 0.3, 0.2], [9.0, 8.0, 0.1, 0.3, 0.2], [1.0, 2.0, 9.0, 9.0, 9.0]])
    targets = np.array([3, 2, 1])
    view = ContinualObjective(torch.nn.CrossEntropyLoss(), tasks, 1, "multi").eval_view(logits, targets)
    assert view.argmax(1).tolist() == [3, 3, 1]
    assert np.isneginf(view[0, :2]).all() and np.isneginf(view[2, 2:]).all()
    np.testing.assert_array_equal(view[0, 2:], logits[0, 2:])
    single = ContinualObjective(torch.nn.CrossEntropyLoss(), tasks, 1, "single").eval_view(logits, targets)
    np.testing.assert_array_equal(single, logits)
    # The trainer's validation applies it: a fixed "model" emitting these logits scores 2/3 with the view, 0 without.
    from edgekd.train.trainer import evaluate

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return torch.as_tensor(logits, dtype=torch.float32)[x[:, 0].long()]

    loader = [(torch.arange(3, dtype=torch.float32)[:, None], torch.as_tensor(targets))]
    objective = ContinualObjective(torch.nn.CrossEntropyLoss(), tasks, 1, "multi")
    assert evaluate(Fixed(), loader, torch.device("cpu"), view=objective.eval_view)["acc"] == pytest.approx(2 / 3)
    assert evaluate(Fixed(), loader, torch.device("cpu"))["acc"] == 0.0


def test_validation_metrics_are_each_tasks_own():
    # Task B (outputs 2..4) alone in val: over all five outputs its macro F1 counted classes 0-1 as zeros and its
    # AUC was NaN (classes 0-1 absent). Scored on its own classes they are task B's figures.
    from sklearn import metrics as skm

    from edgekd.probability import softmax

    tasks = [_T(0, 0, 2), _T(1, 2, 5)]
    rng = np.random.default_rng(0)
    targets = rng.integers(2, 5, size=30)
    logits = rng.normal(size=(30, 5))
    logits[np.arange(30), targets] += 1.0  # mostly right, not always
    objective = ContinualObjective(torch.nn.CrossEntropyLoss(), tasks, 1, "multi")
    got = objective.eval_metrics(targets, objective.eval_view(logits, targets))
    own = softmax(logits[:, 2:5])
    assert got["acc"] == pytest.approx(np.mean(own.argmax(1) == targets - 2))
    assert got["f1"] == pytest.approx(skm.f1_score(targets - 2, own.argmax(1), average="macro"))
    assert got["auc"] == pytest.approx(skm.roc_auc_score(targets - 2, own, multi_class="ovr"))
    # Single head: every seen class competes (a task-A prediction is an error), F1/AUC over task B's classes.
    single = ContinualObjective(torch.nn.CrossEntropyLoss(), tasks, 1, "single")
    got = single.eval_metrics(targets, single.eval_view(logits, targets))
    probs, pred = softmax(logits), logits.argmax(1)
    assert got["acc"] == pytest.approx(np.mean(pred == targets))
    assert got["f1"] == pytest.approx(skm.f1_score(targets, pred, labels=[2, 3, 4], average="macro"))
    assert got["auc"] == pytest.approx(np.mean([skm.roc_auc_score(targets == c, probs[:, c]) for c in (2, 3, 4)]))
    # A binary task under a single head keeps binary figures: its second class against the rest, as when trained alone.
    two = ContinualObjective(torch.nn.CrossEntropyLoss(), [_T(0, 0, 3), _T(1, 3, 5)], 1, "single")
    yb = rng.integers(3, 5, size=40)
    lb = rng.normal(size=(40, 5))
    lb[np.arange(40), yb] += 1.0
    got = two.eval_metrics(yb, two.eval_view(lb, yb))
    said = lb.argmax(1) == 4
    assert got["sensitivity"] == pytest.approx(np.mean(said[yb == 4]))
    assert got["specificity"] == pytest.approx(np.mean(~said[yb == 3]))
    assert got["auc"] == pytest.approx(skm.roc_auc_score(yb == 4, softmax(lb)[:, 4]))
    assert got["pr_auc"] == pytest.approx(skm.average_precision_score(yb == 4, softmax(lb)[:, 4]))
    # Both tasks in val (joint training): the mean of the two tasks' own figures.
    both = np.concatenate([targets, [0, 1, 0, 1]])
    logits2 = np.concatenate([logits, rng.normal(size=(4, 5))])
    got = objective.eval_metrics(both, objective.eval_view(logits2, both))
    a = skm.accuracy_score([0, 1, 0, 1], logits2[30:, :2].argmax(1))
    b = skm.accuracy_score(targets - 2, logits[:, 2:5].argmax(1))
    assert got["acc"] == pytest.approx((a + b) / 2)


def test_task_errors_name_the_task_and_the_real_problem(tmp_path):
    npz = quadrant_npz(tmp_path / "a.npz", classes=2, n=(8, 4, 4))
    raw = base_recipe(npz, tasks=[{"name": "A"}, {"name": "B", "data": {"channels": 1}}])
    # The first task's mean/std are for 3 channels: the error was "data.mean/std need 1 values", naming no task.
    with pytest.raises(EdgeKDError, match=r"^continual.tasks\[1\] \(B\): data.channels differs from the first "
                                          r"task's \(1 vs 3\)"):
        build_tasks(recipe_from_dict(raw))
    raw = base_recipe(npz, tasks=[{"name": "A"}, {"name": "B", "data": {"path": str(tmp_path / "none.npz")}}])
    with pytest.raises(EdgeKDError, match=r"^continual.tasks\[1\] \(B\): .*none.npz: MedMNIST .npz not found"):
        build_tasks(recipe_from_dict(raw))
    # A section's own check (unique names) is one line without the section's whole value.
    with pytest.raises(EdgeKDError) as err:
        recipe_from_dict(base_recipe(npz, tasks=[{"name": "A", "data": {"limit": 8}}, {"name": "A"}]))
    assert "task names must be unique, got ['A', 'A']" in str(err.value) and "limit" not in str(err.value)


def test_class_incremental_tasks_bring_new_non_empty_class_sets(tmp_path):
    npz = quadrant_npz(tmp_path / "a.npz", classes=4, n=(16, 8, 8))
    tasks = [{"name": "A", "classes": [0, 1]}, {"name": "B", "classes": [1, 2]}]
    with pytest.raises(EdgeKDError, match=r"^continual.tasks\[1\] \(B\): class 'class_1' is task 'A''s too"):
        build_tasks(recipe_from_dict(base_recipe(npz, scenario="class_incremental", tasks=tasks)))
    # The same file spelled another way (relative, via a symlink) is the same dataset: it had passed the check.
    (tmp_path / "link.npz").symlink_to(npz)
    respelled = [tasks[0], {**tasks[1], "data": {"path": os.path.relpath(tmp_path / "link.npz")}}]
    with pytest.raises(EdgeKDError, match=r"class 'class_1' is task 'A''s too"):
        build_tasks(recipe_from_dict(base_recipe(npz, scenario="class_incremental", tasks=respelled)))
    # one head in a cross-domain run: the same two competing rows (it had passed); its own heads keep them apart
    with pytest.raises(EdgeKDError, match=r"class 'class_1' is task 'A''s too \(each task of one head brings new"):
        build_tasks(recipe_from_dict(base_recipe(npz, scenario="cross_domain", head="single", tasks=tasks)))
    # ... but a model trained so before the check still scores and exports (its tasks rebuilt as recorded)
    old = build_tasks(recipe_from_dict(base_recipe(npz, scenario="cross_domain", head="single", tasks=tasks)),
                      recorded=True)
    assert [(t.name, t.lo, t.hi) for t in old] == [("A", 0, 2), ("B", 2, 4)]
    assert len(build_tasks(recipe_from_dict(base_recipe(npz, scenario="cross_domain", head="multi", tasks=tasks)))) == 2
    # A task of one class with a head of its own (or the first of a shared head) scored 1.0 on every image.
    for scenario, head, one in (("cross_domain", "multi", 1), ("class_incremental", "single", 0)):
        tasks = [{"name": "A", "classes": [0, 1]}, {"name": "B", "classes": [2]}][::1 if one else -1]
        with pytest.raises(EdgeKDError, match=r"one class \('class_2'\): a head of one class"):
            build_tasks(recipe_from_dict(base_recipe(npz, scenario=scenario, head=head, tasks=tasks)))
    # An empty class list had meant every class (the head grew by all of them again).
    with pytest.raises(EdgeKDError, match="classes.*at least 1 item"):
        recipe_from_dict(base_recipe(npz, scenario="class_incremental",
                                     tasks=[{"name": "A", "classes": [0, 1]}, {"name": "B", "classes": []}]))
    with pytest.raises(EdgeKDError, match="data.classes.*at least 1 item"):
        recipe_from_dict({**base_recipe(npz), "continual": None,
                          "data": {**base_recipe(npz)["data"], "classes": []}})


def test_a_starting_checkpoint_trained_on_a_tasks_test_images_is_refused(tmp_path):
    """A student trained on the folder with another seed holds most of task 0's test images in its training split:
    the accuracy matrix (and the export's retention gate) had been measured partly on images it trained on."""
    from conftest import write_image_folder

    from edgekd.continual.run import run_continual
    from edgekd.train.run import train_recipe

    root = write_image_folder(tmp_path / "imgs", n_per_class=12)
    data = {"source": "imagefolder", "path": str(root), "split": "stratified", "val_fraction": 0.25,
            "test_fraction": 0.25}
    student = train_recipe(recipe_from_dict({**tiny_recipe(root, epochs=1, data=data), "seed": 1}),
                           tmp_path / "student", log=lambda s: None)
    other = quadrant_npz(tmp_path / "q.npz", classes=2, n=(16, 8, 8))
    raw = tiny_recipe(root, name="cl", epochs=1, data=data, role="student",
                      continual={"checkpoint": str(student.best_path),
                                 "tasks": [{"name": "a"}, {"name": "b", "data": {"source": "medmnist",
                                                                                "path": str(other)}}]})
    with pytest.raises(EdgeKDError, match=r"^continual.checkpoint \S+best.pt trained on \d+ of task 'a''s 6 test "
                                          r"images \(its splits were drawn with other settings"):
        run_continual(recipe_from_dict(raw), tmp_path / "cl", log=lambda s: None)
    said: list[str] = []
    run_continual(recipe_from_dict({**raw, "seed": 1}), tmp_path / "cl1", log=said.append)  # its own splits
    assert not any("trained on" in line for line in said)
    # the starting checkpoint retrained into the same file, then the run resumed: refused (task 0's scores and the
    # method's anchors would have come from the new model, the card from the old)
    (tmp_path / "cl1" / "model.pt").unlink()
    (tmp_path / "cl1" / "continual.json").unlink()
    ckpt = torch.load(student.best_path, weights_only=True)
    first = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
    ckpt["state_dict"][first] = ckpt["state_dict"][first] + 0.5
    torch.save(ckpt, student.best_path)
    with pytest.raises(EdgeKDError, match=r"continual.checkpoint \S+best.pt has changed since this run began"):
        run_continual(recipe_from_dict({**raw, "seed": 1}), tmp_path / "cl1", resume=True, log=said.append)
    # train.epochs 0 from a starting checkpoint: model.pt holds that checkpoint's weights (it had said "initial
    # weights, untrained", as for a run from scratch)
    from edgekd.pipeline import check_run_inputs

    said.clear()
    check_run_inputs(recipe_from_dict({**raw, "train": {**raw["train"], "epochs": 0}}), tmp_path / "cl0", None,
                     resume=False, log=said.append)
    assert said == ["warning: train.epochs is 0: model.pt will hold the model's continual.checkpoint's weights, "
                    "not trained further"]


def test_tasks_that_cannot_share_a_loss_or_a_pipeline_are_refused_and_keep_their_data_notes(tmp_path):
    """A focal loss's scalar alpha fits two classes: a one-head run failed with an IndexError once task 2's classes
    came, after task 1 had trained. Tasks with other hair removal trained on pixels the bundle (task 0's pipeline)
    never makes. A task's data notes were dropped. Replay of a task with patient ids and one without failed in
    numpy's concatenate."""
    from edgekd.data.sources import Table

    a = quadrant_npz(tmp_path / "a.npz", classes=2, n=(16, 8, 8))
    b = quadrant_npz(tmp_path / "b.npz", classes=2, n=(16, 8, 8), seed=3)
    four = quadrant_npz(tmp_path / "four.npz", classes=4, n=(32, 16, 16))
    split = base_recipe(four, tasks=[{"name": "a", "classes": [0, 1]}, {"name": "b", "classes": [2, 3]}],
                        head="single")
    split["train"]["loss"] = {"name": "focal", "alpha": 0.25}
    with pytest.raises(EdgeKDError, match=r"^continual.tasks\[1\] \(b\): train.loss.alpha: a scalar alpha weighs "
                                          r"class 1 against class 0 of a two-class task; the data has 4 classes"):
        build_tasks(recipe_from_dict(split))  # one head: every class so far
    assert len(build_tasks(recipe_from_dict({**split, "continual": {**split["continual"], "head": "multi"}}))) == 2
    tasks = [{"name": "a"}, {"name": "b", "data": {"source": "medmnist", "path": str(b)}}]
    raw = base_recipe(a, tasks=tasks, head="multi")
    hair = copy.deepcopy(raw)
    hair["train"]["loss"] = {"name": "ce"}
    hair["continual"]["tasks"][1]["data"].update(hair_removal=True, channels=3)
    hair["data"]["channels"] = 3
    with pytest.raises(EdgeKDError, match=r"continual.tasks\[1\] \(b\): data.hair_removal differs from the first "
                                          r"task's \(True vs False\)"):
        build_tasks(recipe_from_dict(hair))
    noted = copy.deepcopy(hair)
    noted["continual"]["tasks"][1]["data"] = {"source": "medmnist", "path": str(a), "channels": 3}  # a's images again
    notes = [t.data.notes for t in build_tasks(recipe_from_dict({**noted, "data": {**noted["data"],
                                                                                    "split": "stratified"}}))]
    assert notes == [build_data(recipe_from_dict({**noted, "continual": None,
                                                  "data": {**noted["data"], "split": "stratified"}})).notes] * 2
    assert notes[0]  # data.split=stratified on a file with official splits is said
    from edgekd.continual.run import warn_about_tasks  # and a continual run says them, per task (it had not)

    said: list[str] = []
    recipe = recipe_from_dict({**noted, "data": {**noted["data"], "split": "stratified"}})
    warn_about_tasks(build_tasks(recipe), recipe.continual, said.append)
    assert f"warning: task b: {notes[1][0]}" in said and f"warning: task a: {notes[0][0]}" in said
    mixed = Table.concat([Table(labels=np.array([0, 1]), paths=["a", "b"], groups=np.array(["p1", "p2"])),
                          Table(labels=np.array([2, 3]), paths=["c", "d"])])
    assert mixed.groups is None and mixed.paths == ["a", "b", "c", "d"]


def test_a_grown_head_keeps_the_frozen_state_of_its_weight_and_bias():
    """A head frozen by model.freeze_patterns got a trainable bias from its second task on."""
    model = tiny_model(2)
    model.fc.weight.requires_grad_(False)
    model.fc.bias.requires_grad_(False)
    fc = resize_classifier(model, 4)
    assert (fc.weight.requires_grad, fc.bias.requires_grad) == (False, False)
    model.fc.bias.requires_grad_(True)
    assert resize_classifier(model, 5).bias.requires_grad


def test_under_torchrun_only_rank_0_writes_the_continual_runs_files(tmp_path, monkeypatch):
    """Every rank wrote task.pt (with its own random state: a resume took whichever rank wrote last), model.pt,
    continual.json and the plots."""
    import edgekd.continual.run as run

    npz = quadrant_npz(tmp_path / "q.npz", classes=4, n=(16, 8, 8))
    raw = base_recipe(npz, scenario="class_incremental",
                      tasks=[{"name": "a", "classes": [0, 1]}, {"name": "b", "classes": [2, 3]}])
    raw["train"]["epochs"] = 1
    monkeypatch.setattr(run, "is_main_process", lambda: False)
    monkeypatch.setattr("edgekd.train.distributed.is_main_process", lambda: False)  # the trainer asks it
    result = run.run_continual(recipe_from_dict(raw), tmp_path / "rank1", log=lambda s: None)
    assert len(result.acc_matrix) == 2  # it trained and evaluated both tasks
    written = sorted(p.name for p in (tmp_path / "rank1").rglob("*") if p.is_file())
    assert not {"task.pt", "model.pt", "continual.json", "log.csv", "task_accuracy.png"} & set(written), written


def test_a_resumed_continual_run_ends_as_the_uninterrupted_one_and_refuses_another_recipe(tmp_path, request):
    """The second task's new head rows come from the random state the first task's training left: a resumed run
    restores it from task.pt, so it retrains what was interrupted exactly as before. A task.pt of another recipe,
    or nothing to resume, is refused."""
    from edgekd.continual.run import run_continual

    npz = quadrant_npz(tmp_path / "q.npz", classes=4, n=(32, 8, 8))
    raw = base_recipe(npz, scenario="class_incremental",
                      tasks=[{"name": "a", "classes": [0, 1]}, {"name": "b", "classes": [2, 3]}])
    raw["train"]["epochs"] = 1
    raw["train"]["threads"] = 1  # applied and recorded, as in a supervised run (a continual run had ignored it)
    recipe = recipe_from_dict(raw)
    request.addfinalizer(lambda threads=torch.get_num_threads(): torch.set_num_threads(threads))  # this worker's
    torch.set_num_threads(2)
    whole = run_continual(recipe, tmp_path / "run", log=lambda s: None)
    summary = json.loads((tmp_path / "run" / "continual.json").read_text())
    assert summary["threads"] == 1 and summary["machine"]["cores"] == os.cpu_count()  # and where it trained
    want = torch.load(whole.best_path, weights_only=True)["state_dict"]
    for leftover in [*(tmp_path / "run" / "task2_b").iterdir(), tmp_path / "run" / "model.pt",
                     tmp_path / "run" / "continual.json"]:  # interrupted before task 2 ended (the resume had found a
        leftover.unlink()                                   # finished run and retrained nothing)
    # the run began from random weights (init_weights None); a resume keeps what task1's task.pt recorded
    task1 = tmp_path / "run" / "task1_a" / "task.pt"
    state = torch.load(task1, weights_only=True)
    assert "init_weights" in state and state["init_weights"] is None
    torch.save({**state, "init_weights": {"file": "/recorded/start.pt", "sha256": "ab"}}, task1)
    resumed = run_continual(recipe, tmp_path / "run", resume=True, log=lambda s: None)
    assert torch.load(resumed.best_path, weights_only=True)["init_weights"] == {"file": "/recorded/start.pt",
                                                                                "sha256": "ab"}
    got = torch.load(resumed.best_path, weights_only=True)["state_dict"]
    assert all(torch.equal(want[k], got[k]) for k in want)
    np.testing.assert_array_equal(resumed.acc_matrix, whole.acc_matrix)
    # the task done before keeps its training record in continual.json (epochs, seconds had vanished)
    steps = json.loads((tmp_path / "run" / "continual.json").read_text())["steps"]
    assert steps[0]["epochs"] == 1 and steps[0]["seconds"] > 0 and len(steps[0]["step_seconds"]) > 0
    # resuming the finished run changes nothing: model.pt (a bundle's parent, by its sha256) and continual.json
    files = {name: (tmp_path / "run" / name).read_bytes() for name in ("model.pt", "continual.json")}
    said = []
    again = run_continual(recipe, tmp_path / "run", resume=True, log=said.append)
    assert {name: (tmp_path / "run" / name).read_bytes() for name in files} == files
    assert any("finished there; nothing to resume" in line for line in said) and not any("task 1/" in line for line in said)
    np.testing.assert_array_equal(again.acc_matrix, whole.acc_matrix)

    other = recipe_from_dict({**raw, "train": {**raw["train"], "optimizer": {"name": "adam", "lr": 0.5}}})
    kept = (tmp_path / "run" / "recipe.yaml").read_text()
    with pytest.raises(EdgeKDError, match=r"run/model.pt: was trained with another recipe"):  # the finished run
        run_continual(other, tmp_path / "run", resume=True, log=lambda s: None)
    (tmp_path / "run" / "continual.json").unlink()  # an unfinished one: its task checkpoints are checked
    with pytest.raises(EdgeKDError, match=r"task1_a/task.pt: was trained with another recipe"):
        run_continual(other, tmp_path / "run", resume=True, log=lambda s: None)
    assert (tmp_path / "run" / "recipe.yaml").read_text() == kept  # the refused resume had replaced it
    with pytest.raises(EdgeKDError, match="nothing to resume"):
        run_continual(recipe, tmp_path / "typo", resume=True, log=lambda s: None)


def test_a_task_of_its_own_head_reading_an_earlier_tasks_data_and_classes_is_warned_of(tmp_path):
    """Task B's data.path left at task A's, one head per task: the run learned and scored task A twice and reported
    its "retention" without a word."""
    from edgekd.continual.run import run_continual
    from edgekd.continual.scenarios import repeated_tasks

    npz = quadrant_npz(tmp_path / "q.npz", classes=2, n=(16, 8, 8))
    other = quadrant_npz(tmp_path / "other.npz", classes=2, n=(16, 8, 8))
    same = base_recipe(npz, tasks=[{"name": "a"}, {"name": "b", "data": {"path": str(tmp_path / "." / "q.npz")}}])
    assert repeated_tasks(build_tasks(recipe_from_dict(same))) == [
        f"warning: task 'b' reads the same data ({tmp_path / '.' / 'q.npz'}) and classes as task 'a': it learns "
        "that task again; give it its own data.path"]
    assert repeated_tasks(build_tasks(recipe_from_dict(
        base_recipe(npz, tasks=[{"name": "a"}, {"name": "b", "data": {"path": str(other)}}])))) == []
    assert repeated_tasks(build_tasks(recipe_from_dict(  # other classes of the same data: a task of its own
        base_recipe(quadrant_npz(tmp_path / "q4.npz", classes=4, n=(16, 8, 8)),
                    tasks=[{"name": "a", "classes": [0, 1]}, {"name": "b", "classes": [2, 3]}])))) == []
    said: list[str] = []
    run_continual(recipe_from_dict({**same, "train": {**same["train"], "epochs": 1}}), tmp_path / "run",
                  log=said.append)
    assert any(line.startswith("warning: task 'b' reads the same data") for line in said)


def test_a_replay_buffer_below_the_classes_it_rehearses_is_warned_of(tmp_path):
    """replay.size 3 over 10 classes kept classes 0-2 only and never replayed 3-9, without a word."""
    from edgekd.continual.scenarios import task_warnings

    npz = quadrant_npz(tmp_path / "q4.npz", classes=4, n=(16, 8, 8))
    tasks = [{"name": "a", "classes": [0, 1]}, {"name": "b", "classes": [2]}, {"name": "c", "classes": [3]}]
    for size in (1, 3, 5):  # tasks a and b hold the 3 classes replayed (c is last: never replayed)
        recipe = recipe_from_dict(base_recipe(npz, scenario="class_incremental", head="single", tasks=tasks,
                                              replay={"size": size}))
        said = task_warnings(build_tasks(recipe), recipe.continual)
        assert said == ([] if size >= 3 else [
            "warning: continual.replay.size 1 is below the 3 classes of the tasks before the last: the buffer keeps "
            "one image of 1 of them, the others are never replayed"])


def test_a_run_stopped_while_writing_its_plots_is_not_finished_and_its_resume_writes_them(tmp_path, monkeypatch):
    """continual.json (with model.pt, what --resume takes for a finished run) was written before the plots: a
    Ctrl-C in between left a run whose resume said "finished" and never wrote task_accuracy.png."""
    import edgekd.continual.run as run

    npz = quadrant_npz(tmp_path / "q.npz", classes=4, n=(16, 8, 8))
    raw = base_recipe(npz, scenario="class_incremental",
                      tasks=[{"name": "a", "classes": [0, 1]}, {"name": "b", "classes": [2, 3]}])
    raw["train"]["epochs"] = 1
    recipe = recipe_from_dict(raw)
    write_plots = run._write_plots

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "_write_plots", stopped)
    with pytest.raises(KeyboardInterrupt):
        run.run_continual(recipe, tmp_path / "run", log=lambda s: None)
    assert (tmp_path / "run" / "model.pt").is_file() and not (tmp_path / "run" / "continual.json").exists()
    monkeypatch.setattr(run, "_write_plots", write_plots)
    said: list[str] = []
    run.run_continual(recipe, tmp_path / "run", resume=True, log=said.append)
    assert not any("nothing to resume" in line for line in said)
    assert (tmp_path / "run" / "task_accuracy.png").is_file() and (tmp_path / "run" / "continual.json").is_file()


def stop_in_task_2(monkeypatch):
    """Make a continual run stop (KeyboardInterrupt) as its second task begins to train; returns the real
    _train_task, to put back."""
    import edgekd.continual.run as cl

    real = cl._train_task

    def stopped(recipe, model, tasks, i, *args, **kwargs):
        if i == 1:
            raise KeyboardInterrupt
        return real(recipe, model, tasks, i, *args, **kwargs)

    monkeypatch.setattr(cl, "_train_task", stopped)
    return real


def test_a_new_run_into_a_finished_ones_folder_removes_its_results_first(tmp_path, monkeypatch):
    """A new continual run into a finished run's folder, stopped in its second task: the old model.pt and
    continual.json had stayed beside the new tasks (export shipped the old model) and the resume command the
    stop printed was refused on that model.pt. Now they go when the new run starts, and the resume finishes."""
    import edgekd.continual.run as cl

    npz = quadrant_npz(tmp_path / "q.npz", classes=4, n=(32, 8, 8))
    raw = base_recipe(npz, scenario="class_incremental",
                      tasks=[{"name": "a", "classes": [0, 1]}, {"name": "b", "classes": [2, 3]}])
    raw["train"]["epochs"] = 1
    cl.run_continual(recipe_from_dict(raw), tmp_path / "run", log=lambda s: None)
    assert (tmp_path / "run" / "model.pt").is_file() and (tmp_path / "run" / "task2_b" / "task.pt").is_file()
    new = recipe_from_dict({**raw, "train": {**raw["train"], "epochs": 2}})
    real = stop_in_task_2(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        cl.run_continual(new, tmp_path / "run", log=lambda s: None)
    left = {p.relative_to(tmp_path / "run").as_posix() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert not left & {"model.pt", "continual.json", "task_accuracy.png", "task2_b/task.pt"}, left
    assert not (tmp_path / "run" / "task2_b").exists()  # emptied, so removed (the run had not reached it)
    assert "task1_a/task.pt" in left  # the new run's
    monkeypatch.setattr(cl, "_train_task", real)
    resumed = cl.run_continual(new, tmp_path / "run", resume=True, log=lambda s: None)
    assert torch.load(resumed.best_path, weights_only=True)["recipe"]["train"]["epochs"] == 2


def test_ewc_at_weight_zero_ends_as_fine_tuning_does(tmp_path):
    """EWC's Fisher loader took a draw from torch's generator after task 1, so the next task's new head rows (and
    batches) came from another stream than fine-tuning's: at weight 0 the two runs of one seed had ended apart."""
    from edgekd.continual.run import run_continual

    npz = quadrant_npz(tmp_path / "q.npz", classes=4, n=(32, 8, 8))
    raw = base_recipe(npz, scenario="class_incremental",
                      tasks=[{"name": "a", "classes": [0, 1]}, {"name": "b", "classes": [2, 3]}])
    raw["train"]["epochs"] = 1
    plain = run_continual(recipe_from_dict(raw), tmp_path / "ft", log=lambda s: None)
    raw["continual"]["ewc"] = {"weight": 0.0, "fisher_samples": 8}
    ewc = run_continual(recipe_from_dict(raw), tmp_path / "ewc", log=lambda s: None)
    a, b = (torch.load(r.best_path, weights_only=True)["state_dict"] for r in (plain, ewc))
    assert all(torch.equal(a[k], b[k]) for k in a)
    np.testing.assert_array_equal(plain.acc_matrix, ewc.acc_matrix)


def test_a_new_run_into_an_interrupted_ones_folder_says_it_removes_its_task_checkpoints(tmp_path, monkeypatch):
    """Without --resume, an interrupted run's task.pt files went without a word (a finished run's results are
    warned of by remove_earlier_outputs)."""
    import edgekd.continual.run as cl

    npz = quadrant_npz(tmp_path / "q.npz", classes=4, n=(32, 8, 8))
    raw = base_recipe(npz, scenario="class_incremental",
                      tasks=[{"name": "a", "classes": [0, 1]}, {"name": "b", "classes": [2, 3]}])
    raw["train"]["epochs"] = 1
    real = stop_in_task_2(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        cl.run_continual(recipe_from_dict(raw), tmp_path / "run", log=lambda s: None)
    assert (tmp_path / "run" / "task1_a" / "task.pt").is_file()
    monkeypatch.setattr(cl, "_train_task", real)
    said: list[str] = []
    cl.run_continual(recipe_from_dict(raw), tmp_path / "run", log=said.append)
    assert [line for line in said if "task checkpoints" in line] == [
        f"warning: {tmp_path / 'run'} holds an earlier run's task checkpoints (task1_a): they are removed (a new run; "
        "--resume goes on from them instead)"]
    said.clear()  # a finished run is warned of once, by its results
    cl.run_continual(recipe_from_dict(raw), tmp_path / "run", log=said.append)
    assert [line for line in said if "already holds a run" in line or "task checkpoints" in line] == [
        f"warning: {tmp_path / 'run'} already holds a run (model.pt, continual.json): its files are replaced by this "
        "one; anything else there (a bundle, eval folders, task folders of other tasks) stays from the earlier run"]


def test_a_task_that_calls_everything_one_class_is_warned_of():
    """The export warned of a task whose ACC is no better than its largest class's share; train and eval had not."""
    from edgekd.continual.run import task_one_class_warnings

    scores = [{"task": "a", "acc": 0.625, "confusion_matrix": [[5, 0], [3, 0]]},  # all called class 0: 5 of 8
              {"task": "b", "acc": 0.9, "confusion_matrix": [[4, 1], [0, 5]]}]
    found = task_one_class_warnings(scores, "test")
    assert len(found) == 1 and found[0].startswith("test (task a) ACC 0.6250 is no better than calling every")
    assert "a task forgotten while the later ones were learned" in found[0]  # not a collapsed best epoch
    assert "(0.6250)" in found[0] and "plain fine-tuning" not in found[0]  # said of EWC, LwF and replay runs too
    scores.reverse()  # the last task: nothing came after it to forget it
    (last,) = task_one_class_warnings(scores, "test")
    assert last.startswith("test (task a)") and "the last task, not learned" in last and "forgotten" not in last


# ------------------------------------------------------------------ rehearsal buffer
def _table(labels, seed=0):
    labels = np.asarray(labels, dtype=np.int64)
    images = np.random.default_rng(seed).integers(0, 255, size=(len(labels), 4, 4, 1), dtype=np.uint8)
    return Table(labels=labels, images=images)


@pytest.mark.parametrize("selection", ["reservoir", "herding"])
def test_buffer_stays_class_balanced_and_within_size(selection):
    buf = ClassBalancedBuffer(size=20, selection=selection, seed=0)
    feats = lambda t: t.images.reshape(len(t), -1).astype(np.float64)  # noqa: E731
    buf.update(_table([0] * 50 + [1] * 7, seed=1), feats)
    # A class with fewer samples than its share keeps them all, and the others take the rest (it had stayed empty).
    assert buf.class_counts() == {0: 13, 1: 7}
    buf.update(_table([2] * 30 + [3] * 30 + [4] * 30, seed=2), feats)
    counts = buf.class_counts()
    assert len(buf) <= 20 and set(counts) == {0, 1, 2, 3, 4}
    assert counts == {0: 4, 1: 4, 2: 4, 3: 4, 4: 4}
    buf.update(_table([5] * 9 + [6] * 9, seed=3), feats)
    counts = buf.class_counts()
    assert len(buf) <= 20 and max(counts.values()) - min(counts.values()) <= 1 and sum(counts.values()) == 20
    table = buf.table()
    assert np.bincount(table.labels).tolist() == [counts[c] for c in range(7)]


def test_buffer_shares_a_rare_class_leaves_unused():
    """Water-filling: 1000 and 30 images had kept 100 + 30 of a 200 buffer; a rare class is common in medical data."""
    buf = ClassBalancedBuffer(size=200, selection="reservoir", seed=0)
    buf.update(_table([0] * 1000 + [1] * 30, seed=1))
    assert buf.class_counts() == {0: 170, 1: 30}
    buf.update(_table([2] * 500 + [3] * 500 + [4] * 500, seed=2))
    assert buf.class_counts() == {0: 43, 1: 30, 2: 43, 3: 42, 4: 42}
    assert buf.quotas({0: 5, 1: 2, 2: 1}) == {0: 5, 1: 2, 2: 1}  # fewer samples than size: all kept
    assert buf.quotas({}) == {}


def test_a_buffer_of_tasks_with_other_images_replays_them_all(tmp_path):
    """Gray 4 px arrays, RGB 6 px arrays and image files in one buffer: Table.concat had failed (a third task of
    other data); each storage is its own table, all replayed through the task's train transform."""
    from edgekd.continual.replay import ReplayData

    buf = ClassBalancedBuffer(size=12, selection="reservoir", seed=0)
    buf.update(_table([0] * 4 + [1] * 4, seed=1))
    rgb = np.random.default_rng(2).integers(0, 255, size=(8, 6, 6, 3), dtype=np.uint8)
    buf.update(Table(labels=np.array([2] * 4 + [3] * 4), images=rgb))
    files = []
    for i in range(4):
        Image.fromarray(rgb[i]).save(tmp_path / f"{i}.png")
        files.append(str(tmp_path / f"{i}.png"))
    buf.update(Table(labels=np.array([4] * 4), paths=files))
    tables = buf.tables()
    assert [t.images.shape[1:] if t.images is not None else "files" for t in tables] == [(4, 4, 1), (6, 6, 3), "files"]
    assert sorted(np.concatenate([t.labels for t in tables]).tolist()) == sorted(
        label for c, n in buf.class_counts().items() for label in [c] * n)
    npz = quadrant_npz(tmp_path / "q.npz", classes=2, n=(16, 8, 8))
    data = build_tasks(recipe_from_dict(base_recipe(npz, tasks=[{"name": "a"}, {"name": "b"}])))[1].data
    replayed = [t for _, targets in ReplayData(data, tables, 4).loader("train") for t in targets[-4:].tolist()]
    kinds = [{0, 1}, {2, 3}, {4}]  # gray arrays, RGB arrays, files: each replayed, at the task's size
    assert set(replayed) <= {0, 1, 2, 3, 4} and all(kind & set(replayed) for kind in kinds), replayed


def test_reservoir_shrinks_to_a_subset_of_what_it_kept():
    buf = ClassBalancedBuffer(size=12, selection="reservoir", seed=0)
    first = _table([0] * 40 + [1] * 40, seed=1)
    buf.update(first)
    kept = {arr.tobytes() for arr in buf.table().images[buf.table().labels == 0]}
    buf.update(_table([2] * 40, seed=2))
    after = {arr.tobytes() for arr in buf.table().images[buf.table().labels == 0]}
    assert len(after) == 4 and after <= kept


def test_herding_picks_the_sample_nearest_the_mean_first():
    feats = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [1.0, 0.1]])
    order = herding_order(feats, 3)
    assert order[0] == 2 and len(set(order.tolist())) == 3


# ------------------------------------------------------------------ plug-ins: the values they add, the data they mix
CPU = torch.device("cpu")


def linear_model(inputs=12, outputs=6):
    """No BatchNorm, no dropout: the same logits in train and eval mode, so hand computations are exact."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(inputs, outputs))


def hand_kd(student: torch.Tensor, teacher: torch.Tensor, temp: float) -> torch.Tensor:
    """T^2 * mean over rows of sum_c p_t (log p_t - log p_s), softmax at temperature T."""
    ps, pt = F.softmax(student / temp, 1), F.softmax(teacher / temp, 1)
    return (pt * (pt.log() - ps.log())).sum(1).mean() * temp ** 2


@pytest.mark.parametrize("head", ["single", "multi"])
def test_lwf_penalty_is_alpha_times_kd_on_the_old_outputs_only(head):
    from edgekd.continual.lwf import LwFPlugin

    tasks = [_T(0, 0, 2), _T(1, 2, 4), _T(2, 4, 6)]
    model = linear_model()
    x, y = torch.randn(5, 3, 2, 2), torch.tensor([4, 5, 4, 5, 4])
    plugin = LwFPlugin(alpha=0.7, temperature=3.0)
    plugin.before_task(TaskStep(model, tasks, 0, head, CPU))
    assert plugin.penalty(None, x, y, model(x)) is None  # the first task has nothing to remember
    plugin.before_task(TaskStep(model, tasks, 2, head, CPU))
    # The model as it was before the task: nothing to distil.
    assert plugin.penalty(None, x, y, model(x)).item() == pytest.approx(0.0, abs=1e-6)
    old_w, old_b = model[1].weight.detach().clone(), model[1].bias.detach().clone()
    with torch.no_grad():
        model[1].weight.add_(torch.randn_like(model[1].weight))
        model[1].bias.add_(torch.randn_like(model[1].bias))
    logits = model(x)
    got = plugin.penalty(None, x, y, logits)
    old_logits = x.flatten(1) @ old_w.T + old_b
    # multi-head: one softmax per old task's head; single head: one softmax over every old class (0..3).
    ranges = [(0, 2), (2, 4)] if head == "multi" else [(0, 4)]
    want = 0.7 * sum(hand_kd(logits[:, lo:hi].detach(), old_logits[:, lo:hi], 3.0) for lo, hi in ranges)
    assert want.item() > 0.01
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    # It trains the current model: the gradient reaches the old classes' rows, never the new task's.
    got.backward()
    assert model[1].weight.grad[:4].abs().sum() > 0 and model[1].weight.grad[4:].abs().sum() == 0
    # The new task's outputs are free: moving them changes nothing.
    with torch.no_grad():
        model[1].weight[4:] += 5.0
    assert plugin.penalty(None, x, y, model(x)).item() == pytest.approx(got.item(), rel=1e-5)
    plugin.after_task(TaskStep(model, tasks, 2, head, CPU))
    assert plugin.penalty(None, x, y, model(x)) is None


def test_ewc_penalty_is_half_lambda_times_fisher_weighted_squared_distance():
    from types import SimpleNamespace

    from edgekd.continual.ewc import EWCPlugin

    model = linear_model(3, 2)
    trainer = SimpleNamespace(model=model)
    plugin = EWCPlugin(weight=3.0)
    assert plugin.penalty(trainer, None, None, None) is None  # no task learned yet
    anchor = {k: p.detach().clone() for k, p in model.named_parameters()}
    fisher = {"1.weight": torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.0, 3.0]]), "1.bias": torch.tensor([4.0, 0.25])}
    plugin.terms = [(fisher, anchor)]
    assert plugin.penalty(trainer, None, None, None).item() == 0.0  # theta = theta*
    with torch.no_grad():
        model[1].weight.add_(torch.tensor([[0.1, -0.2, 5.0], [1.0, 7.0, -0.3]]))
        model[1].bias.add_(torch.tensor([0.5, -2.0]))
    # (lambda / 2) * sum_i F_i (theta_i - theta*_i)^2; a zero Fisher leaves a weight free however far it moves.
    hand = 3.0 / 2 * (1.0 * 0.1 ** 2 + 2.0 * 0.2 ** 2 + 0.0 * 5.0 ** 2 + 0.5 * 1.0 ** 2 + 0.0 * 7.0 ** 2
                      + 3.0 * 0.3 ** 2 + 4.0 * 0.5 ** 2 + 0.25 * 2.0 ** 2)
    got = plugin.penalty(trainer, None, None, None)
    assert got.item() == pytest.approx(hand, rel=1e-5)
    # It pulls back towards the anchor: d/dtheta = lambda * F * (theta - theta*).
    got.backward()
    torch.testing.assert_close(model[1].bias.grad, torch.tensor([3.0 * 4.0 * 0.5, 3.0 * 0.25 * -2.0]))
    # Separate EWC: one term per finished task, summed.
    second = {k: v + 1.0 for k, v in anchor.items()}
    plugin.terms.append(({k: torch.full_like(v, 2.0) for k, v in fisher.items()}, second))
    current = {k: p.detach() for k, p in model.named_parameters()}
    extra = 3.0 / 2 * sum((2.0 * (current[k] - second[k]) ** 2).sum().item() for k in current)
    assert plugin.penalty(trainer, None, None, None).item() == pytest.approx(hand + extra, rel=1e-5)
    assert EWCPlugin(weight=0.0).penalty(trainer, None, None, None) is None


def test_ewc_fisher_after_a_task_is_non_negative_and_non_zero_where_the_task_loss_depends(tmp_path):
    from edgekd.continual.ewc import EWCPlugin

    npz = quadrant_npz(tmp_path / "q.npz", classes=4, n=(16, 8, 8))
    tasks = build_tasks(recipe_from_dict(base_recipe(npz, tasks=[{"name": "a", "classes": [0, 1]},
                                                                 {"name": "b", "classes": [2, 3]}])))
    torch.manual_seed(0)
    model = tiny_model(4).eval()
    plugin = EWCPlugin(weight=1.0, fisher_samples=8)
    plugin.after_task(TaskStep(model, tasks, 1, "multi", CPU))  # task b: outputs 2..3 under a multi-head layout
    (fisher, anchor), = plugin.terms
    assert set(fisher) == {k for k, p in model.named_parameters() if p.requires_grad}
    assert all((f >= 0).all() for f in fisher.values())
    # Every layer before the head shapes task b's logits, and so do task b's rows of the head.
    assert all(f.sum() > 0 for k, f in fisher.items() if not k.startswith("fc."))
    assert (fisher["fc.weight"][2:].sum(1) > 0).all() and (fisher["fc.bias"][2:] > 0).all()
    # Task a's head plays no part in task b's loss: its Fisher is zero, so EWC leaves it free.
    assert (fisher["fc.weight"][:2] == 0).all() and (fisher["fc.bias"][:2] == 0).all()
    assert all(torch.equal(anchor[k], p) for k, p in model.named_parameters())


class _OneBatch:
    """A DataModule stand-in whose every loader is the same single batch."""

    def __init__(self, images, targets):
        self.batch = (images, targets)

    def loader(self, split, train=None, epoch=0, distributed=False):
        return [self.batch]


@pytest.mark.parametrize("method", ["lwf", "ewc"])
def test_a_plugins_penalty_is_added_to_the_loss_the_trainer_optimizes(tmp_path, method):
    from edgekd.continual.ewc import EWCPlugin
    from edgekd.continual.lwf import LwFPlugin

    npz = quadrant_npz(tmp_path / "q.npz", classes=2, n=(8, 4, 4))
    recipe = recipe_from_dict({k: v for k, v in base_recipe(npz).items() if k != "continual"})
    model = linear_model(12, 4)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    tasks = [_T(0, 0, 2), _T(1, 2, 4)]
    if method == "lwf":
        plugin = LwFPlugin(alpha=0.5, temperature=2.0)
        plugin.before_task(TaskStep(model, tasks, 1, "single", CPU))
    else:
        plugin = EWCPlugin(weight=4.0)
        plugin.terms = [({k: torch.rand_like(v) for k, v in before.items()}, before)]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    x, y = torch.randn(6, 3, 2, 2), torch.tensor([2, 3, 2, 3, 3, 2])
    with torch.no_grad():
        logits = model(x)
        if method == "lwf":
            old = x.flatten(1) @ before["1.weight"].T + before["1.bias"]
            want = 0.5 * hand_kd(logits[:, :2], old[:, :2], 2.0).item()
        else:
            fisher, anchor = plugin.terms[0]
            want = 2.0 * sum((fisher[k] * (p - anchor[k]) ** 2).sum().item() for k, p in model.named_parameters())
    assert want > 0.01

    def train_loss(plugins):
        # One batch: the epoch's loss is the loss of the starting weights, before the optimizer step.
        objective = SupervisedObjective(torch.nn.CrossEntropyLoss())
        trainer = Trainer(recipe, copy.deepcopy(model), _OneBatch(x, y), objective, tmp_path / "run", plugins=plugins,
                          log=lambda s: None)
        return trainer.train_epoch(0)["train_loss"]

    plain = train_loss([])
    assert plain == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert train_loss([plugin]) - plain == pytest.approx(want, rel=1e-4)


def test_replay_mixes_buffer_images_into_every_training_batch_of_a_later_task(tmp_path):
    from edgekd.continual.replay import ReplayPlugin
    from edgekd.data import ImageDataset, build_transforms

    npz = quadrant_npz(tmp_path / "q.npz", classes=4, n=(32, 8, 8))
    two = [{"name": "a", "classes": [0, 1]}, {"name": "b", "classes": [2, 3]}]
    tasks = build_tasks(recipe_from_dict(base_recipe(npz, scenario="class_incremental", tasks=two)))
    model = tiny_model(2)
    plugin = ReplayPlugin(size=6, batch_size=4, seed=0)
    first = TaskStep(model, tasks, 0, "single", CPU)
    assert plugin.train_data(tasks[0].data, first) is tasks[0].data  # nothing to replay yet
    plugin.after_task(first)
    # At most `size` samples, split evenly over task a's classes, each one of task a's training images.
    assert plugin.buffer.class_counts() == {0: 3, 1: 3}
    buf = plugin.buffer.table()
    train_a = tasks[0].data.tables["train"]
    label_of = {img.tobytes(): int(lab) for img, lab in zip(train_a.images, train_a.labels)}
    assert len(buf) == 6 and all(label_of.get(img.tobytes()) == lab for img, lab in zip(buf.images, buf.labels))

    data_b = tasks[1].data
    mixed = plugin.train_data(data_b, TaskStep(model, tasks, 1, "single", CPU))
    # Without augmentation (16 px images at 16 px) the train pipeline is the eval one: buffer pixels are comparable.
    eval_buf = ImageDataset(buf, build_transforms(data_b.cfg, [], False))
    buffer_pixels = {eval_buf[i][0].numpy().tobytes(): eval_buf[i][1] for i in range(len(eval_buf))}
    main = list(data_b.loader("train", epoch=0))
    batches = list(mixed.loader("train", epoch=0))
    assert len(batches) == len(main) == 2 and len(mixed.loader("train", epoch=0)) == 2
    replayed = set()
    for (images, targets), (own_images, own_targets) in zip(batches, main):
        n = len(own_targets)
        assert len(images) == len(targets) == n + 4  # the task's batch, then 4 buffer samples
        assert torch.equal(images[:n], own_images) and torch.equal(targets[:n], own_targets)
        assert set(own_targets.tolist()) <= {2, 3}
        for img, lab in zip(images[n:], targets[n:].tolist()):
            assert buffer_pixels[img.numpy().tobytes()] == lab and lab in (0, 1)
            replayed.add(img.numpy().tobytes())
    assert len(replayed) >= 2
    # Validation and test stay the task's own.
    for split in ("val", "test"):
        got, want = next(iter(mixed.loader(split, train=False))), next(iter(data_b.loader(split, train=False)))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # After task b the buffer still holds 6, every class seen so far with its share (6 over 4 classes).
    resize_classifier(model, 4)
    plugin.after_task(TaskStep(model, tasks, 1, "single", CPU))
    assert plugin.buffer.class_counts() == {0: 2, 1: 2, 2: 1, 3: 1}


# ------------------------------------------------------------------ BN freeze, head expansion
def test_swa_with_bn_freeze_is_refused(tmp_path):
    """SWA's update_bn recomputed the BatchNorm statistics on the current task's images, undoing bn_freeze."""
    raw = base_recipe(quadrant_npz(tmp_path / "q.npz", classes=2, n=(8, 4, 4)), bn_freeze=True,
                      tasks=[{"name": "a"}, {"name": "b"}])
    raw["train"]["swa"] = {"enabled": True}
    with pytest.raises(EdgeKDError, match=r"train.swa with continual.bn_freeze: SWA recomputes the BatchNorm "
                                         r"statistics"):
        recipe_from_dict(raw)
    raw["continual"]["bn_freeze"] = False
    assert recipe_from_dict(raw).train.swa.enabled


def test_adam_decay_on_idle_multi_heads_is_refused(tmp_path):
    """Plain Adam's L2 term on rows with a zero loss gradient steps them by lr * sign(p): the old heads went to 0."""
    raw = base_recipe(quadrant_npz(tmp_path / "q.npz", classes=2, n=(8, 4, 4)), tasks=[{"name": "a"}, {"name": "b"}])
    raw["train"]["optimizer"] = {"name": "adam", "lr": 1e-3, "weight_decay": 1e-4}
    with pytest.raises(EdgeKDError, match=r"adam with weight_decay 0.0001 in a multi-head continual run .* use "
                                         r"name adamw or weight_decay 0"):
        recipe_from_dict(raw)
    # What trains the old rows (replay, LwF, joint) or decays them as a whole (AdamW), or no decay: accepted.
    for extra in ({"replay": {"size": 4}}, {"lwf": {"alpha": 1.0}}, {"joint": True}, {"head": "single"}):
        assert recipe_from_dict({**raw, "continual": {**raw["continual"], **extra}}).train.optimizer.name == "adam"
    for optimizer in ({"name": "adamw", "weight_decay": 1e-4}, {"name": "adam", "weight_decay": 0}):
        assert recipe_from_dict({**raw, "train": {**raw["train"], "optimizer": optimizer}}).continual.head == "multi"


def test_adam_decay_moves_rows_without_gradient_and_adamw_keeps_their_argmax():
    """The arithmetic the refusal rests on, on a 4-row head whose rows 0-1 get no loss gradient."""
    for name, moved in (("adam", True), ("adamw", False)):
        torch.manual_seed(0)
        head = torch.nn.Linear(8, 4)
        old = head.weight[:2].detach().clone()
        x = torch.randn(64, 8)
        opt = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name](head.parameters(), lr=1e-2, weight_decay=1e-4)
        for _ in range(100):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(head(x)[:, 2:], torch.randint(0, 2, (64,))).backward()
            opt.step()
        shrink = head.weight[:2].detach().abs().mean() / old.abs().mean()
        assert (shrink < 0.5) == moved, (name, float(shrink))
        if not moved:  # AdamW scales row and bias alike: the old task's predictions stay
            assert torch.allclose(head.weight[:2], old * (1 - 1e-2 * 1e-4) ** 100, atol=1e-6)


def test_bn_freeze_keeps_running_stats_and_affine_through_training(tmp_path):
    npz = quadrant_npz(tmp_path / "q.npz", classes=2)
    recipe = recipe_from_dict({k: v for k, v in base_recipe(npz).items() if k != "continual"})
    data = build_data(recipe)
    torch.manual_seed(0)
    model = tiny_model(2)
    bns = batchnorm_layers(model)
    # Non-trivial statistics (as after task A), so "unchanged" cannot hold by accident.
    for m in bns:
        m.running_mean.uniform_(-1, 1)
        m.running_var.uniform_(0.5, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plugin = BNFreezePlugin()
    plugin.before_task(TaskStep(model, [], 1, "multi", torch.device("cpu")))
    trainer = Trainer(recipe, model, data, SupervisedObjective(torch.nn.CrossEntropyLoss()), tmp_path / "run",
                      plugins=[plugin], log=lambda s: None)
    trainer.fit()
    after = model.state_dict()
    bn_names = [n for n, m in model.named_modules() if m in bns]
    bn_keys = [k for k in after if k.rpartition(".")[0] in bn_names]
    assert bn_keys and all(torch.equal(before[k], after[k]) for k in bn_keys)
    conv = "stages.0.0.weight"
    assert not torch.equal(before[conv], after[conv])
    assert all(p.requires_grad for m in bns for p in m.parameters())  # restored after the fit


@pytest.mark.parametrize("head", ["linear", "dropout_linear", "mlp"])
def test_head_expansion_keeps_old_class_logits(head):
    torch.manual_seed(0)
    model = tiny_model(3, head).eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        old = model(x)
        resize_classifier(model, 7)
        new = model(x)
    assert new.shape == (4, 7)
    torch.testing.assert_close(new[:, :3], old)


def test_head_reset_and_bad_keep():
    model = tiny_model(3)
    resize_classifier(model, 2, keep=0)
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 2)
    with pytest.raises(EdgeKDError):
        resize_classifier(model, 4, keep=3)


# ------------------------------------------------------------------ recipe + scenarios
def test_recipe_section_is_typed(tmp_path):
    npz = quadrant_npz(tmp_path / "q.npz", classes=4)
    two = [{"name": "a", "classes": [0, 1]}, {"name": "b", "classes": [2, 3]}]
    rec = recipe_from_dict(base_recipe(npz, scenario="class_incremental", tasks=two, replay={"size": 8}))
    assert rec.continual.head == "single" and rec.continual.replay.selection == "reservoir"
    assert recipe_from_dict(base_recipe(npz, tasks=two)).continual.head == "multi"
    with pytest.raises(EdgeKDError, match="unknown key 'continual.ewc.lam'"):
        recipe_from_dict(base_recipe(npz, tasks=two, ewc={"lam": 1}))
    with pytest.raises(EdgeKDError, match="head 'single'"):
        recipe_from_dict(base_recipe(npz, scenario="class_incremental", head="multi", tasks=two))
    tasks = build_tasks(rec)
    assert [(t.lo, t.hi) for t in tasks] == [(0, 2), (2, 4)]
    assert set(tasks[1].data.tables["train"].labels.tolist()) == {2, 3}
    assert tasks[1].data.class_names[2:] == ["b:class_2", "b:class_3"]



def test_plugins_are_built_from_the_registry_in_order(tmp_path):
    from edgekd.continual.ewc import EWCPlugin
    from edgekd.continual.lwf import LwFPlugin
    from edgekd.continual.plugins import PLUGINS, build_plugins
    from edgekd.continual.replay import ReplayPlugin
    from edgekd.recipe import ContinualConfig

    assert set(PLUGINS) <= set(ContinualConfig.model_fields)  # every registered key is a recipe section
    npz = quadrant_npz(tmp_path / "q.npz", classes=4)
    two = [{"name": "a", "classes": [0, 1]}, {"name": "b", "classes": [2, 3]}]
    cfg = recipe_from_dict(base_recipe(npz, tasks=two, bn_freeze=True, ewc={"weight": 5.0}, lwf={"alpha": 0.5},
                                       replay={"size": 8})).continual
    plugins = build_plugins(cfg, seed=3)
    assert [type(p) for p in plugins] == [BNFreezePlugin, EWCPlugin, LwFPlugin, ReplayPlugin]
    assert build_plugins(recipe_from_dict(base_recipe(npz, tasks=two)).continual, seed=0) == []


# ------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_class_incremental_two_tasks_end_to_end(tmp_path):
    npz = quadrant_npz(tmp_path / "q.npz", classes=4)
    raw = base_recipe(npz, scenario="class_incremental",
                      tasks=[{"name": "a", "classes": [0, 1]}, {"name": "b", "classes": [2, 3]}],
                      replay={"size": 8, "selection": "herding", "batch_size": 8},
                      lwf={"alpha": 0.5, "temperature": 2.0}, bn_freeze=True)
    # With BatchNorm frozen the tiny net needs a gentler step and a few more epochs to learn task 2 reliably.
    raw["train"].update(epochs=5, optimizer={"name": "adam", "lr": 0.003})
    from edgekd.pipeline import run_recipe

    result = run_recipe(recipe_from_dict(raw), tmp_path / "run", log=lambda s: None)
    acc = np.asarray(result.acc_matrix, dtype=float)
    assert acc.shape == (2, 2) and math.isnan(acc[0, 1]) and np.all(np.isfinite(acc[np.tril_indices(2)]))
    summary = json.loads((tmp_path / "run" / "continual.json").read_text())
    assert summary["method"] == "replay+lwf" and summary["head"] == "single"
    assert summary["avg_acc"] == pytest.approx(acc[1].mean())
    assert summary["forgetting"] == pytest.approx(acc[0, 0] - acc[1, 0])
    assert len(summary["final"]) == 2 and len(summary["final"][0]["confusion_matrix"]) == 2
    assert (tmp_path / "run" / "task_accuracy.png").is_file()
    model, ckpt = model_from_checkpoint(result.best_path)
    assert ckpt["arch"]["num_classes"] == 4 and len(ckpt["class_names"]) == 4
    assert [t["outputs"] for t in ckpt["continual"]["tasks"]] == [[0, 2], [2, 4]]
    # The tiny tasks are learnable: the first is learned, and the second too despite frozen BN statistics.
    assert acc[0, 0] > 0.7 and acc[1, 1] > 0.7
    # `edgekd eval model.pt` scores the run's own tasks as the run did (the top-level data section is neither the
    # tasks' data nor the model's classes): the last row of the accuracy matrix, and its mean.
    from typer.testing import CliRunner

    from edgekd.cli import app

    split = summary["eval_split"]
    res = CliRunner().invoke(app, ["eval", str(result.best_path), "--split", split, "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    evaluated = json.loads((tmp_path / "ev" / "metrics.json").read_text())[split]
    assert [evaluated["per_task"][t]["acc"] for t in ("a", "b")] == pytest.approx(acc[1].tolist())
    assert evaluated["acc"] == pytest.approx(acc[1].mean()) and "task b" in res.output
    # --set overrides the embedded recipe and still scores the tasks (the data moved: the same figures)
    moved = tmp_path / "moved.npz"
    moved.write_bytes(npz.read_bytes())
    res = CliRunner().invoke(app, ["eval", str(result.best_path), "--split", split, "--set", f"data.path={moved}",
                                   "--out", str(tmp_path / "ev2")])
    assert res.exit_code == 0, res.output
    again = json.loads((tmp_path / "ev2" / "metrics.json").read_text())[split]
    assert again["acc"] == pytest.approx(evaluated["acc"]) and set(again["per_task"]) == {"a", "b"}


@pytest.mark.slow
def test_cross_domain_from_checkpoint_keeps_task_a_head(tmp_path):
    from edgekd.pipeline import run_recipe

    npz_a = quadrant_npz(tmp_path / "a.npz", classes=2, seed=0)
    npz_b = quadrant_npz(tmp_path / "b.npz", classes=3, seed=5)
    sup = {k: v for k, v in base_recipe(npz_a).items() if k != "continual"}
    first = run_recipe(recipe_from_dict(sup), tmp_path / "a", log=lambda s: None)
    student, _ = model_from_checkpoint(first.best_path)
    raw = base_recipe(npz_a, checkpoint=str(first.best_path), tasks=[
        {"name": "A"}, {"name": "B", "data": {"path": str(npz_b)}}], ewc={"weight": 10.0, "fisher_samples": 16})
    raw["train"]["optimizer"]["weight_decay"] = 0.0
    said: list[str] = []
    result = run_recipe(recipe_from_dict(raw), tmp_path / "cl", log=said.append)
    summary = result.summary
    assert summary["method"] == "ewc" and summary["tasks"] == ["A", "B"]
    assert not any("model.name" in line for line in said)  # the recipe names the checkpoint's model
    said.clear()
    other = {**raw, "model": {"name": "edgekd_cnn_small"}}  # the checkpoint is what trains: said so
    run_recipe(recipe_from_dict({**other, "train": {**raw["train"], "epochs": 1}}), tmp_path / "cl2", log=said.append)
    assert any("holds model edgekd_cnn_tiny; the recipe's model.name edgekd_cnn_small is not used" in line for line in said)
    kept = (tmp_path / "cl2" / "recipe.yaml").read_text()  # and the run's recipe.yaml says so (it named the other)
    assert kept.startswith("# continual.checkpoint ") and "the recipe's model.name edgekd_cnn_small is not used" in kept
    assert recipe_from_dict(yaml.safe_load(kept)).model.name == "edgekd_cnn_small"  # still the recipe as given
    # The recipe's freezing applies to the checkpoint's model too (it had been ignored there).
    frozen = {**raw, "model": {**raw.get("model", {}), "freeze_stages": 1}, "train": {**raw["train"], "epochs": 1}}
    run_recipe(recipe_from_dict(frozen), tmp_path / "cl3", log=lambda s: None)
    kept, _ = model_from_checkpoint(tmp_path / "cl3" / "model.pt")
    torch.testing.assert_close(kept.stages[0][0].weight, student.stages[0][0].weight)
    # Task 1 is the checkpoint's: evaluated as is, not retrained.
    assert first.test["acc"] == pytest.approx(summary["acc_matrix"][0][0])
    final, ckpt = model_from_checkpoint(result.best_path)
    assert ckpt["arch"]["num_classes"] == 5
    # Where it started is recorded, as edgekd train records its weights file (a bundle's card names it).
    assert ckpt["init_weights"] == {"file": str(first.best_path.resolve()), "sha256": sha256_file(first.best_path)}
    task_b = torch.load(tmp_path / "cl" / "task2_B" / "task.pt", weights_only=True)
    assert task_b["init_weights"] == ckpt["init_weights"]
    # Multi-head: task B's loss never reaches task A's rows of the output layer.
    torch.testing.assert_close(final.fc.weight[:2], student.fc.weight)
    assert not torch.equal(final.stages[0][0].weight, student.stages[0][0].weight)
    assert (tmp_path / "cl" / "confusion_task2.png").is_file()
    # The last epoch's logged val_acc is task B's accuracy with its own head (the weights the run goes on with).
    import csv

    log_rows = list(csv.DictReader((tmp_path / "cl" / "task2_B" / "log.csv").open()))
    val_b = evaluate_task(final, build_tasks(recipe_from_dict(raw)), "multi", 1, 1, "val", torch.device("cpu"))
    assert float(log_rows[-1]["val_acc"]) == pytest.approx(val_b["acc"], abs=1e-9)
    # ... and its F1 and AUC are over task B's three classes, so defined (over all five outputs AUC was NaN).
    assert float(log_rows[-1]["val_f1"]) == pytest.approx(val_b["f1"], abs=1e-9)
    assert math.isfinite(float(log_rows[-1]["val_auc"]))
    # EWC's penalty, as added to the loss, has a column of its own (task 1 had none: no earlier task)
    assert 0 < float(log_rows[-1]["train_ewc"]) < float(log_rows[-1]["train_loss"])
    with pytest.raises(EdgeKDError, match=r"outputs, but the first task 'B' has \d classes \(the first task must be "
                                          r"the checkpoint's; with edgekd train, checkpoint_task: false retrains its "
                                          r"head instead\)$"):  # update refuses checkpoint_task: false
        bad = base_recipe(npz_b, checkpoint=str(first.best_path), tasks=[{"name": "B"}, {"name": "A2"}])
        run_recipe(recipe_from_dict(bad), tmp_path / "bad", log=lambda s: None)
    # As many classes, but others than the checkpoint learned: its outputs would be trained as the wrong classes.
    with pytest.raises(EdgeKDError, match=r"learned the classes \['class_0', 'class_1'\], but the first task 'B' "
                                          r"has \['class_1', 'class_2'\]"):
        bad = base_recipe(npz_b, checkpoint=str(first.best_path), tasks=[{"name": "B", "classes": [1, 2]},
                                                                          {"name": "A2", "classes": [0, 2]}])
        run_recipe(recipe_from_dict(bad), tmp_path / "bad2", log=lambda s: None)


@pytest.mark.slow
def test_replay_retains_task_a_where_plain_fine_tuning_forgets_it(tmp_path):
    # Class-incremental, one head: fine-tuning on task b alone drives every prediction to b's classes (task a's
    # accuracy falls to 0 for seeds 0-7), a buffer of 8 task-a images keeps it (1.0 for the same seeds).
    from edgekd.pipeline import run_recipe

    npz = quadrant_npz(tmp_path / "q.npz", classes=4)
    two = [{"name": "a", "classes": [0, 1]}, {"name": "b", "classes": [2, 3]}]
    after_b = {}
    for method, section in (("finetune", {}), ("replay", {"replay": {"size": 8}})):
        raw = base_recipe(npz, scenario="class_incremental", tasks=two, **section)
        acc = run_recipe(recipe_from_dict(raw), tmp_path / method, log=lambda s: None).acc_matrix
        assert acc[0][0] > 0.9  # task a was learned before task b came
        after_b[method] = acc[1][0]
    assert after_b["replay"] - after_b["finetune"] >= 0.5


def test_joint_training_repeats_gray_images_to_rgb_beside_an_rgb_task():
    """Retina (RGB) + chest X-ray (gray): joint batches need one layout; the gray pixels are repeated, as the
    per-task pipeline does for a 3-channel model, and an RGB-only or gray-only mix is left as it is."""
    import numpy as np

    from edgekd.continual.scenarios import same_channel_count
    from edgekd.data import Table

    rng = np.random.default_rng(0)
    gray = Table(labels=np.zeros(2), images=rng.integers(0, 255, (2, 4, 4, 1), dtype=np.uint8))
    rgb = Table(labels=np.ones(3), images=rng.integers(0, 255, (3, 4, 4, 3), dtype=np.uint8))
    out = same_channel_count([gray, rgb])
    assert out[0].images.shape == (2, 4, 4, 3) and out[1] is rgb
    assert all(np.array_equal(out[0].images[..., c], gray.images[..., 0]) for c in range(3))
    assert same_channel_count([gray, gray])[0] is gray


def test_a_continual_run_into_a_folder_in_use_is_refused_and_a_refused_new_folder_goes(tmp_path):
    from edgekd.fileio import held_folder
    from edgekd.pipeline import run_recipe

    npz = quadrant_npz(tmp_path / "a.npz", classes=2, n=(8, 4, 4))
    raw = base_recipe(npz, tasks=[{"name": "A"}, {"name": "B"}])
    (tmp_path / "busy").mkdir()
    with held_folder(tmp_path / "busy", "continual run"):
        with pytest.raises(EdgeKDError, match="another edgekd continual run is writing into this folder now"):
            run_recipe(recipe_from_dict(raw), tmp_path / "busy", log=lambda *_: None)
    bad = base_recipe(npz, tasks=[{"name": "A"}, {"name": "B", "data": {"path": str(tmp_path / "none.npz")}}])
    with pytest.raises(EdgeKDError, match="none.npz"):
        run_recipe(recipe_from_dict(bad), tmp_path / "new", log=lambda *_: None)
    assert not (tmp_path / "new").exists()  # made to be locked, removed again: nothing was written


def test_the_continual_table_says_when_the_first_task_has_no_retention():
    """A first task scored 0 right after learning it has no retention (NaN; null once read back from JSON): the
    caption had printed 'nan%'."""
    from types import SimpleNamespace

    from edgekd.cli.tables import continual_table
    from edgekd.continual.metrics import retention

    acc = [[0.0, float("nan")], [0.4, 0.9]]
    for kept in (retention(acc, 0), None):
        summary = {"method": "ewc", "bn_freeze": False, "head": "multi", "eval_split": "test", "avg_acc": 0.65,
                   "forgetting": -0.4, "bwt": 0.4, "retention_first_task": kept}
        table = continual_table("run", SimpleNamespace(summary=summary, task_names=["oct", "xray"], acc_matrix=acc))
        assert table.caption.endswith("first-task retention n/a (task oct had no accuracy to keep: 0 or unscored "
                                      "right after it was learned)")
        assert "nan" not in table.caption
    summary["retention_first_task"] = 0.5
    assert continual_table("run", SimpleNamespace(summary=summary, task_names=["oct", "xray"],
                                                  acc_matrix=acc)).caption.endswith("retention 50.0%")


def test_two_plugins_of_one_class_log_a_penalty_each():
    """A second plugin of the same class overwrote the first's log.csv column."""
    from edgekd.train.trainer import Plugin, penalty_name

    class ScalePlugin(Plugin):
        pass

    assert penalty_name(ScalePlugin(), {"0_kl": 1.0}) == "scale"
    assert penalty_name(ScalePlugin(), {"scale": 1.0}) == "scale_2"
    assert penalty_name(ScalePlugin(), {"scale": 1.0, "scale_2": 2.0}) == "scale_3"
    named = ScalePlugin()
    named.name = "l2"
    assert penalty_name(named, {"scale": 1.0}) == "l2"


def test_loss_part_columns_follow_the_term_order():
    from edgekd.train.trainer import part_order

    names = ["ewc", "unlabeled_10_kl", "10_ce", "2_kl", "unlabeled_2_kl", "0_feature_mse", "lwf"]
    assert sorted(names, key=part_order) == ["0_feature_mse", "2_kl", "10_ce", "unlabeled_2_kl", "unlabeled_10_kl",
                                             "ewc", "lwf"]


def test_a_starting_checkpoint_that_removed_hair_otherwise_is_refused(tmp_path):
    """A student from before data.hair_kernel (17 px) continued under a recipe with the scaled element: its own task
    was scored and trained on other pixels than it learned from, and the retention gate compared the two."""
    pytest.importorskip("cv2")
    from edgekd.continual.run import starting_model
    from edgekd.train.run import untrained_checkpoint

    npz = quadrant_npz(tmp_path / "q.npz", classes=2, n=(16, 8, 8))
    other = quadrant_npz(tmp_path / "q2.npz", classes=2, n=(16, 8, 8))

    def recipe(hair: dict, **continual):
        return recipe_from_dict(tiny_recipe(npz, name="cl", epochs=1, role="student", data=hair,
                                            continual=continual or None))

    student = untrained_checkpoint(recipe({"hair_removal": True, "hair_kernel": 17}), tmp_path / "s.pt")
    tasks = [{"name": "a"}, {"name": "b", "data": {"source": "medmnist", "path": str(other)}}]
    for hair, said in (({"hair_removal": True}, "hair removal with a 17 px element in its training, with the element "
                                                "scaled to the image in the recipe's data"),
                       ({"hair_removal": False}, "hair removal with a 17 px element in its training, with none in the "
                                                 "recipe's data")):
        rec = recipe(hair, checkpoint=str(student), tasks=tasks)
        with pytest.raises(EdgeKDError, match=f"^continual.checkpoint {re.escape(str(student))}: {said}; set "):
            starting_model(rec, build_tasks(rec), log=lambda s: None)
    rec = recipe({"hair_removal": True, "hair_kernel": 17}, checkpoint=str(student), tasks=tasks)
    starting_model(rec, build_tasks(rec), log=lambda s: None)  # the same element: accepted


def test_a_missing_continual_checkpoint_names_its_key(tmp_path):
    """"runs/.../best.pt: checkpoint not found" had not said which setting to fix."""
    from edgekd.continual.run import starting_model

    raw = base_recipe(quadrant_npz(tmp_path / "q.npz", classes=2, n=(8, 4, 4)), tasks=[{"name": "a"}, {"name": "b"}],
                      checkpoint=str(tmp_path / "none" / "best.pt"))
    recipe = recipe_from_dict(raw)
    with pytest.raises(EdgeKDError, match=r"^continual.checkpoint .*none/best.pt: checkpoint not found \(train the "
                                          r"starting student first, or --set continual.checkpoint=PATH\)$"):
        starting_model(recipe, build_tasks(recipe), log=lambda *_: None)


def test_a_one_head_continual_checkpoint_says_its_first_task_must_hold_all_its_classes(tmp_path):
    """Continuing a class-incremental model (one head over 4 classes) from a 2-class first task failed with advice
    that `edgekd update` refuses (checkpoint_task: false), not saying what the first task must be."""
    from edgekd.pipeline import run_recipe

    npz = quadrant_npz(tmp_path / "q.npz", classes=4, n=(16, 8, 8))
    grown = run_recipe(recipe_from_dict({**base_recipe(npz, scenario="class_incremental", tasks=[
        {"name": "a", "classes": [0, 1]}, {"name": "b", "classes": [2, 3]}]), "train": {
            "epochs": 1, "optimizer": {"name": "adam", "lr": 0.01}, "scheduler": {"name": "none"},
            "monitor": "val_acc"}}), tmp_path / "cl", log=lambda s: None)
    again = base_recipe(npz, scenario="class_incremental", checkpoint=str(grown.best_path),
                        tasks=[{"name": "a", "classes": [0, 1]}, {"name": "c", "classes": [2, 3]}])
    with pytest.raises(EdgeKDError, match=r"4 outputs, but the first task 'a' has 2 classes \(the first task must be "
                                          r"the checkpoint's; it is one head over the tasks a, b, so the first task "
                                          r"must hold all its classes in order \(class_0, class_1, class_2, class_3\);"):
        run_recipe(recipe_from_dict(again), tmp_path / "again", log=lambda s: None)


def test_eval_corruptions_of_a_continual_checkpoint_without_data_is_refused_before_the_eval(tmp_path):
    """The per-task evaluation ran and printed its tables, then the corruption eval refused the checkpoint's data."""
    from typer.testing import CliRunner

    from edgekd.cli import app
    from edgekd.continual.run import run_continual

    npz = quadrant_npz(tmp_path / "q.npz", classes=4, n=(32, 8, 8))
    raw = base_recipe(npz, scenario="class_incremental",
                      tasks=[{"name": "a", "classes": [0, 1]}, {"name": "b", "classes": [2, 3]}])
    raw["train"]["epochs"] = 1
    run = run_continual(recipe_from_dict(raw), tmp_path / "run", log=lambda s: None)
    for option in ("--corruptions", "--failures"):
        res = CliRunner().invoke(app, ["eval", str(run.best_path), option, "--out", str(tmp_path / "ev")])
        assert isinstance(res.exception, EdgeKDError), res.output
        assert "learned several tasks' data; give the data to score with --data" in str(res.exception)
        assert res.output.strip() == ""  # nothing evaluated or printed first
        assert not (tmp_path / "ev").exists()
