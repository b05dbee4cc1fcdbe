"""The trainer: learning, checkpoints (weights_only), resume, early stopping, SWA, accumulation, losses."""

import json
import math
import os

import numpy as np
import pytest
import torch

from edgekd.errors import EdgeKDError
from edgekd.recipe import recipe_from_dict
from edgekd.train.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from edgekd.train.losses import FocalLoss, build_loss
from edgekd.train.optim import build_optimizer, build_scheduler
from edgekd.train.run import train_recipe


def deep(d, **over):
    out = json.loads(json.dumps(d))
    for key, value in over.items():
        node = out
        *path, leaf = key.split("__")
        for k in path:
            node = node.setdefault(k, {})
        node[leaf] = value
    return out


def test_training_learns_and_writes_reports(tiny_recipe_dict, tmp_path):
    r = recipe_from_dict(deep(tiny_recipe_dict, train__epochs=4))
    res = train_recipe(r, tmp_path / "run", log=lambda s: None)
    assert res.test["acc"] > 0.8 and res.test["auc"] > 0.9
    for f in ("best.pt", "last.pt", "metrics.json", "log.csv", "curves.png", "confusion_test.png", "roc_test.png", "recipe.yaml"):
        assert (tmp_path / "run" / f).is_file(), f
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["params"] == res.params and m["test"]["confusion_matrix"] and m["epochs_run"] == 4
    # the machine it trained on (a benchmark reusing the run had stamped its own machine on it)
    assert m["machine"]["cores"] == os.cpu_count() and m["machine"]["torch"] == torch.__version__.split("+")[0]
    assert {"cpu", "arch", "simd", "gpu", "python"} <= set(m["machine"])


def test_checkpoint_loads_weights_only_and_rebuilds(tiny_recipe_dict, tmp_path):
    r = recipe_from_dict(deep(tiny_recipe_dict, train__epochs=1))
    res = train_recipe(r, tmp_path / "run", log=lambda s: None)
    ckpt = load_checkpoint(res.best_path)
    assert ckpt["class_names"] == ["class_0", "class_1"] and ckpt["preprocess"]["input_size"] == [3, 16, 16]
    model, _ = model_from_checkpoint(res.best_path)
    assert not model.training and model(torch.zeros(2, 3, 16, 16)).shape == (2, 2)
    # A checkpoint carrying an arbitrary Python object is refused by weights_only loading.
    evil = tmp_path / "evil.pt"
    torch.save({"format": "edgekd-checkpoint/1", "x": object()}, evil)
    with pytest.raises(EdgeKDError, match=r"not a readable checkpoint \(not a PyTorch file of tensors: torch.load "
                                          r"with weights_only=True refused it\)$"):  # not torch's paragraph
        load_checkpoint(evil)
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(EdgeKDError, match=r"metrics.json: a JSON file, not a checkpoint \(best.pt or last.pt\)$"):
        load_checkpoint(tmp_path / "metrics.json")
    from edgekd.distill.report import resolve_checkpoint

    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "edgekd.json").write_text("{}")
    with pytest.raises(EdgeKDError, match="bundle: an exported bundle, not a checkpoint"):  # 'bundle/best.pt: no ...'
        resolve_checkpoint(tmp_path / "bundle")
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(res.best_path.read_bytes()[:200])
    with pytest.raises(EdgeKDError, match="not a readable checkpoint"):
        load_checkpoint(trunc)
    nan = tmp_path / "nan.pt"
    torch.save({**ckpt, "state_dict": {k: v.clone().fill_(float("nan")) if v.is_floating_point() else v
                                       for k, v in ckpt["state_dict"].items()}}, nan)
    with pytest.raises(EdgeKDError, match=r"nan\.pt: the weights are not finite \(NaN or inf in '"):
        model_from_checkpoint(nan)
    from edgekd.train.checkpoint import load_state

    state = {k: v.clone() for k, v in ckpt["state_dict"].items()}
    buffer = next(k for k in state if k.endswith("running_var"))
    state[buffer].fill_(float("inf"))  # a buffer may hold an inf bound (a clamp): allowed
    load_state(model, state, "x")
    state[buffer].fill_(float("nan"))
    with pytest.raises(EdgeKDError, match=f"x: the weights are not finite \\(NaN or inf in '{buffer}'"):
        load_state(model, state, "x")
    newer = tmp_path / "newer.pt"
    torch.save({**ckpt, "format": "edgekd-checkpoint/9"}, newer)
    with pytest.raises(EdgeKDError, match=r"checkpoint format 'edgekd-checkpoint/9', this edgekd reads "
                                          r"'edgekd-checkpoint/1'"):
        load_checkpoint(newer)
    import zipfile

    zipped = tmp_path / "bundle.zip"  # torch.load took it for its own zip format: "file in archive is not in ..."
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("edgekd.json", "{}")
    with pytest.raises(EdgeKDError, match="a zipped exported bundle, not a checkpoint file"):
        load_checkpoint(zipped)


def test_wrong_architecture_checkpoint_is_named(tiny_recipe_dict, tmp_path):
    r = recipe_from_dict(deep(tiny_recipe_dict, train__epochs=0))
    res = train_recipe(r, tmp_path / "run", log=lambda s: None)
    # a 0-epoch run's metrics.json is standard JSON: no best value (it had been -Infinity)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert metrics["best_value"] is None and metrics["best_epoch"] == -1
    ckpt = load_checkpoint(res.best_path)
    ckpt["arch"]["num_classes"] = 5
    with pytest.raises(EdgeKDError, match=r"fc.weight' has shape \(2, 16\), the model expects \(5, 16\)"):
        model_from_checkpoint(ckpt)


def test_resume_matches_uninterrupted(tiny_recipe_dict, tmp_path, monkeypatch):
    """A run resumed from its epoch-1 last.pt trains only epochs 2..3, from last.pt's weights, and ends like an
    uninterrupted run. (The trainer re-seeds every epoch, so a resume that loaded nothing and retrained from
    scratch would give the same history: what was trained and from which weights is checked directly.)"""
    import shutil

    from edgekd.train.trainer import Trainer

    base = deep(tiny_recipe_dict, train__epochs=3, data__balanced_sampler=True, augment=[{"RandomHorizontalFlip": {"p": 0.5}}])
    full = train_recipe(recipe_from_dict(base), tmp_path / "full", log=lambda s: None)
    assert load_checkpoint(tmp_path / "full" / "last.pt")["trainer"]["epoch"] == 3
    # Emulate an interruption after epoch 1: a 1-epoch run of the same recipe (the trainer re-seeds per epoch, so
    # its epoch 1 replays the 3-epoch run's), its last.pt given the 3-epoch recipe's digest.
    one = deep(base, train__epochs=1)
    r1 = train_recipe(recipe_from_dict(one), tmp_path / "one", log=lambda s: None)
    state = load_checkpoint(tmp_path / "one" / "last.pt")
    assert state["trainer"]["epoch"] == 1
    state["recipe_digest"] = recipe_from_dict(base).digest()
    state["trainer"]["world_size"] = 2  # as if trained by torchrun with 2 processes
    state = {k: v for k, v in state.items() if k != "format"}

    def interrupted(name, weights):
        run = tmp_path / name
        shutil.copytree(tmp_path / "one", run)  # best.pt of epoch 1, as the interrupted run left it
        save_checkpoint(run / "last.pt", {**state, "state_dict": weights})
        return run

    trained, train_epoch = [], Trainer.train_epoch

    def spy(self, epoch, *args, **kwargs):
        trained.append(epoch)
        return train_epoch(self, epoch, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_epoch", spy)
    part_dir, logs = interrupted("part", state["state_dict"]), []
    resumed = train_recipe(recipe_from_dict(base), part_dir, resume=True, log=logs.append)
    assert f"resumed from {part_dir / 'last.pt'} after epoch 1 (training goes on at epoch 2)" in logs
    assert f"warning: {part_dir / 'last.pt'} was trained by 2 process(es), resumed by 1: the batch each step " \
        "averages (8 x processes) and the shards change" in logs
    assert trained == [1, 2]  # 0-based: epochs 2 and 3 only, epoch 1 is not trained again
    assert not [line for line in logs if "CPU thread(s)" in line]  # the same thread count: nothing to say
    assert resumed.fit.history[0]["train_loss"] == pytest.approx(r1.fit.history[0]["train_loss"])
    assert [h["train_loss"] for h in resumed.fit.history] == pytest.approx([h["train_loss"] for h in full.fit.history], rel=1e-5)
    assert resumed.test["auc"] == pytest.approx(full.test["auc"])
    # Its time and sessions count the interrupted session too (they had described the last session alone).
    metrics = json.loads((part_dir / "metrics.json").read_text())
    assert [s["from_epoch"] for s in metrics["sessions"]] == [0, 1]
    assert all(s["machine"]["cores"] == os.cpu_count() for s in metrics["sessions"])  # each session's machine
    assert metrics["train_seconds"] > state["trainer"]["train_seconds"] > 0
    # Resuming the finished run says so, trains nothing and adds no session (it had added an empty one).
    trained.clear()
    logs.clear()
    finished = load_checkpoint(part_dir / "last.pt")
    finished["trainer"]["world_size"] = 2  # a finished run warns of nothing it will not train
    save_checkpoint(part_dir / "last.pt", {k: v for k, v in finished.items() if k != "format"})
    first = json.loads((part_dir / "metrics.json").read_text())
    again = train_recipe(recipe_from_dict(base), part_dir, resume=True, log=logs.append)
    assert trained == [] and "the run had finished (3 of 3 epochs): nothing left to train; its best.pt is " \
        "evaluated again" in logs
    assert not [line for line in logs if "process(es)" in line]
    assert again.test["auc"] == pytest.approx(resumed.test["auc"])
    metrics = json.loads((part_dir / "metrics.json").read_text())
    assert [s["from_epoch"] for s in metrics["sessions"]] == [0, 1]
    # re-evaluating is no training time: the finished run's own figure (last.pt's stops at its last checkpoint)
    assert metrics["train_seconds"] == first["train_seconds"] > finished["trainer"]["train_seconds"]
    # The resumed epochs start from last.pt's weights: the same state with perturbed weights trains differently.
    g = torch.Generator().manual_seed(0)
    perturbed = {k: v + 0.5 * torch.randn(v.shape, generator=g) if v.is_floating_point() and "running" not in k
                 else v for k, v in state["state_dict"].items()}
    trained.clear()
    other = train_recipe(recipe_from_dict(base), interrupted("perturbed", perturbed), resume=True, log=lambda s: None)
    assert trained == [1, 2]
    # epoch 1's row comes from last.pt's trainer state (compared as JSON: an undefined figure, NaN, equals itself)
    assert json.dumps(other.fit.history[0], sort_keys=True) == json.dumps(resumed.fit.history[0], sort_keys=True)
    assert other.fit.history[1]["train_loss"] != pytest.approx(resumed.fit.history[1]["train_loss"], rel=1e-3)
    # Another thread count than the stopped session's (OMP_NUM_THREADS, another machine) with train.threads unset:
    # the figures may differ in the last digits; it had gone without a word (an explicit train.threads is refused).
    other_threads = torch.get_num_threads() + 3
    state["trainer"]["sessions"] = [{**state["trainer"]["sessions"][-1], "threads": other_threads}]
    trained.clear()
    logs.clear()
    moved = interrupted("threads", state["state_dict"])
    train_recipe(recipe_from_dict(base), moved, resume=True, log=logs.append)
    assert f"warning: {moved / 'last.pt'} was trained on {other_threads} CPU thread(s), resumed on " \
        f"{torch.get_num_threads()}: the figures can differ in the last digits" in " ".join(logs)


def test_resume_refuses_another_recipe(tiny_recipe_dict, tmp_path):
    train_recipe(recipe_from_dict(deep(tiny_recipe_dict, train__epochs=1)), tmp_path / "r", log=lambda s: None)
    with pytest.raises(EdgeKDError, match=r"another recipe \(train.epochs: 1 -> 2\); resume with the same"):
        train_recipe(recipe_from_dict(deep(tiny_recipe_dict, train__epochs=2)), tmp_path / "r", resume=True, log=lambda s: None)
    # The refusal names what changed (it had said "another recipe" alone), up to three keys.
    changed = deep(tiny_recipe_dict, train__epochs=3, seed=5, train__optimizer={"name": "sgd", "lr": 0.5},
                   data__batch_size=4)
    with pytest.raises(EdgeKDError, match=r"another recipe \(data.batch_size: 8 -> 4; seed: 0 -> 5; "
                                          r"train.epochs: 1 -> 3; and 2 more\)"):
        train_recipe(recipe_from_dict(changed), tmp_path / "r", resume=True, log=lambda s: None)


def test_fold_folders_a_run_leaves_from_an_earlier_one_are_named(tiny_recipe_dict, tmp_path):
    """`--folds 2` into a folder of a 3-fold run left fold2/ there without a word (the warning listed bundles and
    eval folders only)."""
    from edgekd.pipeline import check_run_inputs

    out = tmp_path / "k"
    for k in range(3):
        (out / f"fold{k}").mkdir(parents=True)
    (out / "kfold.json").write_text("{}")
    (out / "foldings").mkdir()  # not a fold folder
    recipe = recipe_from_dict(tiny_recipe_dict)
    said: list[str] = []
    check_run_inputs(recipe, out, None, resume=False, folds=2, log=said.append)
    assert said[-1] == (f"warning: {out} holds fold2 of an earlier run with more folds, which this run does not "
                        "train: it stays as it is (remove it, or train into another folder)")
    said.clear()
    check_run_inputs(recipe, out, None, resume=False, folds=3, log=said.append)
    assert not any("fold2" in line for line in said)
    check_run_inputs(recipe, out, None, resume=False, log=said.append)  # a plain run into it
    assert said[-1].startswith(f"warning: {out} holds fold0, fold1, fold2 of an earlier run with folds, which this "
                               "run is not")
    # that plain run's files replace the k-fold summary, as the other warning says (kfold.json/.md had stayed
    # beside the new metrics.json); the fold folders stay, as this one says
    (out / "kfold.md").write_text("| fold | acc |")
    train_recipe(recipe, out, log=lambda s: None)
    assert not (out / "kfold.json").exists() and not (out / "kfold.md").exists() and (out / "metrics.json").is_file()
    assert (out / "fold2").is_dir()
    from edgekd.train.run import remove_earlier_outputs  # what a new k-fold or continual run calls first

    (out / "model.pt").write_bytes(b"a continual run's")
    (out / "confusion_task1.png").write_bytes(b"png")
    (out / "notes.txt").write_text("the user's")
    remove_earlier_outputs(out)
    assert sorted(p.name for p in out.iterdir()) == ["fold0", "fold1", "fold2", "foldings", "notes.txt", "recipe.yaml"]
    # a k-fold run refused before it has results (too many folds) removes nothing: the removal comes with kfold.json
    from edgekd.pipeline import run_folds

    train_recipe(recipe, out, log=lambda s: None)
    with pytest.raises(EdgeKDError, match="too few for 40 folds"):
        run_folds(recipe, out, 40, log=lambda s: None)
    # --folds 2 beside data.folds 3 had run 2 folds without a word
    with pytest.raises(EdgeKDError, match=r"^--folds 2 with data.folds 3 in the recipe: give one count"):
        run_folds(recipe_from_dict(deep(tiny_recipe_dict, data__folds=3, data__fold=0)), out, 2, log=lambda s: None)
    assert (out / "best.pt").is_file() and (out / "metrics.json").is_file()
    # a model.weights file in --out is refused, as a teacher there is: the new run would remove it (a folder's own
    # best.pt, given to fine-tune from into the same folder)
    with pytest.raises(EdgeKDError, match=r"holds model.weights .*best.pt, which the run would write over"):
        check_run_inputs(recipe_from_dict({**tiny_recipe_dict, "model": {**tiny_recipe_dict["model"],
                                                                         "weights": str(out / "best.pt")}}),
                         out, None, resume=False, log=said.append)


def test_early_stopping_stops(tiny_recipe_dict, tmp_path):
    # lr 0 -> nothing improves after the first epoch; patience 2 -> stop after epoch 3.
    r = recipe_from_dict(deep(tiny_recipe_dict, train__epochs=10, train__optimizer={"name": "sgd", "lr": 1e-12},
                              train__early_stop={"patience": 2}, train__monitor="val_loss", train__monitor_mode="min"))
    res = train_recipe(r, tmp_path / "r", log=lambda s: None)
    assert res.fit.stopped_early and len(res.fit.history) == 3


@pytest.mark.parametrize("mode", ["min", "max"])
def test_early_stop_min_delta_counts_only_improvements_beyond_it(tiny_recipe_dict, tmp_path, monkeypatch, mode):
    """A monitor that improves by 0.03 an epoch: min_delta 0 sees six improvements; 0.05 only every other epoch
    (each compared with the best so far, not the previous epoch), which patience 2 survives; 0.1 none after the
    first, so patience 2 stops after epoch 3."""
    from edgekd.train import trainer as trainer_mod
    from edgekd.train.trainer import SupervisedObjective, Trainer

    sign = 1.0 if mode == "min" else -1.0
    sequence = [sign * v for v in (1.0, 0.97, 0.94, 0.91, 0.88, 0.85)]
    monkeypatch.setattr(trainer_mod, "monitored_value", lambda row, name, key, epoch: sequence[epoch])
    _, _, batches = _toy_batches(2)

    def fit(min_delta):
        r = recipe_from_dict(deep(tiny_recipe_dict, train__epochs=6, train__monitor="val_loss", train__monitor_mode=mode,
                                  train__early_stop={"patience": 2, "min_delta": min_delta}))
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        trainer = Trainer(r, model, _Batches(batches), SupervisedObjective(torch.nn.CrossEntropyLoss()),
                          tmp_path / str(min_delta), log=lambda s: None)
        res = trainer.fit()
        return len(res.history), res.stopped_early, res.best_epoch, res.best_value

    assert fit(0.0) == (6, False, 6, sequence[5])
    assert fit(0.05) == (6, False, 5, sequence[4])
    assert fit(0.1) == (3, True, 1, sequence[0])


def test_a_negative_min_delta_or_a_zero_patience_is_refused(tiny_recipe_dict):
    # It was accepted, and a worse epoch then counted as an improvement: best.pt replaced by worse weights.
    with pytest.raises(EdgeKDError, match=r"train.early_stop.min_delta: Input should be greater than or equal to 0"):
        recipe_from_dict(deep(tiny_recipe_dict, train__early_stop={"patience": 2, "min_delta": -0.1}))
    # patience 0 stopped after the first epoch whatever the monitor did
    with pytest.raises(EdgeKDError, match=r"train.early_stop.patience: Input should be greater than or equal to 1"):
        recipe_from_dict(deep(tiny_recipe_dict, train__early_stop={"patience": 0}))


def test_swa_and_grad_accumulation_and_clipping_run(tiny_recipe_dict, tmp_path):
    r = recipe_from_dict(deep(tiny_recipe_dict, train__epochs=3, train__grad_accum=2, train__clip_grad=1.0,
                              train__swa={"enabled": True, "start_epoch": 1}))
    res = train_recipe(r, tmp_path / "r", log=lambda s: None)
    assert (tmp_path / "r" / "swa.pt").is_file() and "swa" in res.fit.extra
    assert len(res.fit.step_seconds) == 3 * 3  # 6 batches of 8 per epoch, one optimizer step per 2, 3 epochs
    assert res.test["acc"] > 0.6


def test_swa_weights_are_the_mean_of_the_epochs_from_start_epoch_on(tiny_recipe_dict, tmp_path, monkeypatch):
    """swa.pt holds the mean of the model's parameters at the end of each epoch from swa.start_epoch on (epochs 2
    and 3 of 3 for start_epoch 1), computed here from the weights each epoch ended with; 2 models averaged."""
    from edgekd.train.trainer import Trainer

    ended, save_epoch = [], Trainer._save_epoch

    def spy(self, *args, **kwargs):  # right after the epoch's training, SWA update and validation
        ended.append((self.epoch, {k: v.detach().clone() for k, v in self.model.named_parameters()}))
        return save_epoch(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_save_epoch", spy)
    r = recipe_from_dict(deep(tiny_recipe_dict, train__epochs=3, train__swa={"enabled": True, "start_epoch": 1}))
    train_recipe(r, tmp_path / "r", log=lambda s: None)
    assert [epoch for epoch, _ in ended] == [1, 2, 3]
    averaged = [weights for epoch, weights in ended if epoch >= 2]
    swa = load_checkpoint(tmp_path / "r" / "swa.pt")["state_dict"]
    assert averaged[0] and set(averaged[0]) <= set(swa)
    for name in averaged[0]:
        mean = torch.stack([w[name] for w in averaged]).mean(0)
        torch.testing.assert_close(swa[name], mean, rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.allclose(averaged[0][k], averaged[1][k]) for k in averaged[0])  # not one constant weight
    assert int(load_checkpoint(tmp_path / "r" / "last.pt")["trainer"]["swa"]["n_averaged"]) == 2
    # metrics.json says whether best.pt is SWA's weights (its best_value is theirs, not best_epoch's log.csv row)
    summary = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert summary["best_source"] == ("swa" if summary["swa"]["used"] else "epoch")
    if summary["swa"]["used"]:
        assert summary["best_value"] == pytest.approx(summary["swa"]["value"])


class _Batches:
    """A DataModule stand-in: its train loader is a fixed list of (images, targets) batches."""

    def __init__(self, batches):
        self.batches = batches

    def loader(self, split, train=None, epoch=0, distributed=False):
        return self.batches if isinstance(self.batches, torch.utils.data.DataLoader) else list(self.batches)


def _toy_batches(n_batches: int, batch: int = 2):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n_batches * batch, 3, 2, 2, generator=g)
    targets = torch.randint(0, 3, (n_batches * batch,), generator=g)
    return images, targets, list(zip(images.split(batch), targets.split(batch)))


def _optimizer_steps(tiny_recipe_dict, tmp_path, batches, **train):
    """One Trainer epoch of a seeded linear model (12 -> 3) over `batches`: (weight, bias, their grads) as each
    optimizer step saw them, i.e. after accumulation and clipping."""
    from edgekd.train.trainer import SupervisedObjective, Trainer

    r = recipe_from_dict(deep(tiny_recipe_dict, train__epochs=1, train__optimizer={"name": "sgd", "lr": 0.1},
                              **{f"train__{k}": v for k, v in train.items()}))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    trainer = Trainer(r, model, _Batches(batches), SupervisedObjective(torch.nn.CrossEntropyLoss()), tmp_path,
                      log=lambda s: None)
    linear, steps, step = model[1], [], trainer.optimizer.step

    def spy(*args, **kwargs):
        steps.append((linear.weight.detach().clone(), linear.bias.detach().clone(),
                      linear.weight.grad.detach().clone(), linear.bias.grad.detach().clone()))
        return step(*args, **kwargs)

    trainer.optimizer.step = spy
    trainer.train_epoch(0)
    return steps


def _mean_loss_grads(weight, bias, images, targets):
    """d/d(weight, bias) of the mean cross-entropy over one batch of all of `images` (by hand, no Trainer)."""
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    loss = torch.nn.functional.cross_entropy(images.flatten(1) @ w.T + b, targets)
    return torch.autograd.grad(loss, [w, b])


def test_grad_accumulation_steps_on_the_mean_loss_of_one_big_batch(tiny_recipe_dict, tmp_path):
    """grad_accum=2 over 4 micro-batches of 2: 2 optimizer steps, each with the gradient of the mean loss of its 4
    images taken as one batch (loss / accum per micro-batch), at the weights of that step."""
    images, targets, batches = _toy_batches(4)
    steps = _optimizer_steps(tiny_recipe_dict, tmp_path, batches, grad_accum=2)
    assert len(steps) == 2
    for i, (w, b, gw, gb) in enumerate(steps):
        want_w, want_b = _mean_loss_grads(w, b, images[4 * i:4 * i + 4], targets[4 * i:4 * i + 4])
        torch.testing.assert_close(gw, want_w, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(gb, want_b, rtol=1e-5, atol=1e-7)
    assert not torch.equal(steps[0][0], steps[1][0])  # the first step did update the weights


def test_grad_accumulation_last_short_group_is_a_mean_too(tiny_recipe_dict, tmp_path):
    """5 micro-batches with grad_accum=2: the epoch's last step accumulates 1 micro-batch, and steps on that
    batch's mean-loss gradient (not half of it, as a fixed loss / accum would give)."""
    images, targets, batches = _toy_batches(5)
    steps = _optimizer_steps(tiny_recipe_dict, tmp_path, batches, grad_accum=2)
    assert len(steps) == 3
    for (w, b, gw, gb), sl in zip(steps, (slice(0, 4), slice(4, 8), slice(8, 10))):
        want_w, want_b = _mean_loss_grads(w, b, images[sl], targets[sl])
        torch.testing.assert_close(gw, want_w, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(gb, want_b, rtol=1e-5, atol=1e-7)


def test_a_cuda_session_resumes_a_cpu_run_and_class_weights_follow_the_objective(tiny_recipe_dict, tmp_path,
                                                                                    monkeypatch):
    """A run started without CUDA saved its disabled GradScaler's state, {}; resumed on a CUDA machine (AMP on),
    loading it raised. CE's class weights stayed on the CPU when the Trainer moved the model (CUDA: a device error
    at the first step); the objective now moves with it. Both run here on CPU stand-ins."""
    from edgekd.train.trainer import SupervisedObjective

    raw = deep(tiny_recipe_dict, train__epochs=1)
    train_recipe(recipe_from_dict(raw), tmp_path / "r", log=lambda s: None)
    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device, enabled=True: real("cpu", enabled=True))
    said: list[str] = []
    train_recipe(recipe_from_dict(raw), tmp_path / "r", resume=True, log=said.append)
    assert any("no AMP loss scale saved" in line for line in said), said
    weighted = SupervisedObjective(torch.nn.CrossEntropyLoss(weight=torch.ones(3)))
    assert weighted.to(torch.device("meta")).criterion.weight.device.type == "meta"


def test_focal_loss_gradients_stay_finite_for_a_confident_image_at_any_gamma():
    """gamma < 1: p_t rounded to 1.0 made (1 - p_t) ** gamma's gradient infinite, NaN under a finite loss."""
    from edgekd.train.losses import FocalLoss

    for gamma in (0.0, 0.5, 2.0):
        logits = torch.tensor([[30.0, 0.0], [0.0, 1.0], [200.0, 0.0]], requires_grad=True)
        FocalLoss(gamma=gamma)(logits, torch.tensor([0, 1, 0])).backward()
        assert torch.isfinite(logits.grad).all(), gamma


def test_grad_accumulation_weighs_a_short_last_batch_by_its_images(tiny_recipe_dict, tmp_path):
    """A DataLoader of 5 images in batches of 2 (2, 2, 1) with grad_accum=3: one step, on the mean loss of the 5
    images as one batch (each micro-batch had weighed 1/3, so the last image counted as much as two)."""
    from torch.utils.data import DataLoader, TensorDataset

    images, targets, _ = _toy_batches(3)
    loader = DataLoader(TensorDataset(images[:5], targets[:5]), batch_size=2, shuffle=False)
    steps = _optimizer_steps(tiny_recipe_dict, tmp_path, loader, grad_accum=3)
    assert len(steps) == 1
    w, b, gw, gb = steps[0]
    want_w, want_b = _mean_loss_grads(w, b, images[:5], targets[:5])
    torch.testing.assert_close(gw, want_w, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gb, want_b, rtol=1e-5, atol=1e-7)


def test_clip_grad_bounds_the_total_norm_of_the_accumulated_gradient(tiny_recipe_dict, tmp_path):
    """clip_grad=c: a step whose accumulated gradient has total norm n > c steps on that gradient scaled to norm c
    (same direction); a step with n <= c is untouched."""
    images, targets, batches = _toy_batches(4)
    free = _optimizer_steps(tiny_recipe_dict, tmp_path, batches, grad_accum=2)
    first_norm = float(torch.cat([free[0][2].flatten(), free[0][3].flatten()]).norm())
    max_norm = 0.5 * first_norm
    steps = _optimizer_steps(tiny_recipe_dict, tmp_path, batches, grad_accum=2, clip_grad=max_norm)
    assert len(steps) == 2
    torch.testing.assert_close(steps[0][0], free[0][0])  # same seeded start
    clipped = 0
    for i, (w, b, gw, gb) in enumerate(steps):
        want_w, want_b = _mean_loss_grads(w, b, images[4 * i:4 * i + 4], targets[4 * i:4 * i + 4])
        norm = float(torch.cat([want_w.flatten(), want_b.flatten()]).norm())
        scale = min(1.0, max_norm / norm)
        clipped += norm > max_norm
        torch.testing.assert_close(gw, want_w * scale, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(gb, want_b * scale, rtol=1e-5, atol=1e-7)
        assert float(torch.cat([gw.flatten(), gb.flatten()]).norm()) <= max_norm * (1 + 1e-5)
    assert clipped >= 1  # the first step's gradient (norm 2 * max_norm) was clipped to max_norm


def test_nonfinite_loss_is_an_error_or_skipped(tiny_recipe_dict, tmp_path):
    """A NaN loss on every batch: nonfinite=error stops at the first one (step 1) with its one-line message and
    writes no checkpoint; skip counts each batch (6 = 48 images / batch 8), takes no optimizer step and so leaves
    the parameters exactly as they were (no NaN reaches them)."""
    from edgekd.data import build_data
    from edgekd.train.run import build_student_model, train_model

    class NaNObjective:
        def __call__(self, model, x, y):
            logits = model(x)
            return logits.sum() * float("nan"), logits

    def setup(policy):
        r = recipe_from_dict(deep(tiny_recipe_dict, train__epochs=1, train__nonfinite=policy))
        data = build_data(r)
        model, spec = build_student_model(r, data)
        return r, data, model, spec

    r, data, model, spec = setup("error")
    message = "non-finite loss (nan) at epoch 1 step 1; lower the learning rate, or set train.nonfinite=skip"
    with pytest.raises(EdgeKDError) as info:
        train_model(r, tmp_path / "error", data, model, spec, objective=NaNObjective(), log=lambda s: None)
    assert str(info.value) == message
    assert not (tmp_path / "error" / "best.pt").exists() and not (tmp_path / "error" / "last.pt").exists()

    r, data, model, spec = setup("skip")
    before = {k: v.detach().clone() for k, v in model.named_parameters()}  # BN running stats do move (forward)
    res = train_model(r, tmp_path / "skip", data, model, spec, objective=NaNObjective(), log=lambda s: None)
    assert res.fit.nonfinite_batches == 6  # 48 images / batch 8: every batch skipped and counted
    assert res.fit.step_seconds == []  # not one optimizer step
    after = load_checkpoint(res.best_path)["state_dict"]
    assert before and all(torch.equal(after[k], v) for k, v in before.items())

    # grad_accum 3 (6 batches, 2 optimizer steps), NaN on the second batch: its whole group is dropped, the first
    # batch's gradients and the third batch too (it had stepped on the third alone, scaled 1/3)
    class SecondNaN:
        calls = 0

        def __call__(self, model, x, y):
            SecondNaN.calls += 1
            loss = torch.nn.functional.cross_entropy(model(x), y)
            return (loss * float("nan") if SecondNaN.calls == 2 else loss), model(x)

    r, data, model, spec = setup("skip")
    r = r.model_copy(update={"train": r.train.model_copy(update={"grad_accum": 3})})
    res = train_model(r, tmp_path / "accum", data, model, spec, objective=SecondNaN(), log=lambda s: None)
    assert res.fit.nonfinite_batches == 1 and len(res.fit.step_seconds) == 1  # the second group's step only
    assert SecondNaN.calls == 5  # the third batch is not even run


def test_focal_loss_hand_computed():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([0, 0])
    p = torch.softmax(logits, 1)[:, 0]
    expected = (-(1 - p) ** 2 * torch.log(p)).mean()
    assert FocalLoss(gamma=2.0)(logits, target).item() == pytest.approx(expected.item())
    assert FocalLoss(gamma=0.0)(logits, target).item() == pytest.approx(torch.nn.functional.cross_entropy(logits, target).item())
    alpha = FocalLoss(gamma=2.0, alpha=[0.25, 0.75])(logits, target).item()
    assert alpha == pytest.approx(0.25 * expected.item())


def test_focal_alpha_must_fit_the_class_count():
    """A scalar alpha on 5 classes, or two weights for five, failed training's first step with an IndexError; three
    weights for two classes passed. Each is now a one-line error before training (train.loss and the KD term)."""
    from edgekd.distill.losses import build_distill_loss

    five = torch.ones(5)

    def focal(alpha):
        return recipe_from_dict({"train": {"loss": {"name": "focal", "alpha": alpha}}}).train.loss

    with pytest.raises(EdgeKDError, match=r"^train.loss.alpha: a scalar alpha weighs class 1 against class 0 of a "
                                          r"two-class task; the data has 5 classes"):
        build_loss(focal(0.25), five)
    with pytest.raises(EdgeKDError, match=r"^train.loss.alpha: 2 weights for 5 classes \(give one per class\)$"):
        build_loss(focal([1, 1]), five)
    with pytest.raises(EdgeKDError, match="3 weights for 2 classes"):
        build_loss(focal([0.5, 0.5, 0.5]), torch.ones(2))
    assert isinstance(build_loss(focal(0.25), torch.ones(2)), FocalLoss)
    assert build_loss(focal([1, 2, 3, 4, 5]), five).alpha.tolist() == [1, 2, 3, 4, 5]
    terms = [{"kind": "kl"}, {"kind": "focal", "alpha": [1, 1]}]
    term = recipe_from_dict({"distill": {"teacher": "t.pt", "terms": terms}})
    with pytest.raises(EdgeKDError, match=r"^distill.terms\[focal\].alpha: 2 weights for 5 classes"):
        build_distill_loss(term.distill.terms, five)


def test_build_loss_uses_class_weights():
    cfg = recipe_from_dict({"train": {"loss": {"name": "ce", "class_weights": True}}}).train.loss
    loss = build_loss(cfg, torch.tensor([1.0, 3.0]))
    assert loss.weight.tolist() == [1.0, 3.0]


def test_a_gpu_index_under_torchrun_is_refused(monkeypatch):
    """torchrun sets each process's GPU from LOCAL_RANK; `train.device: cuda:0` sent every rank to GPU 0."""
    from edgekd.train import distributed
    from edgekd.train.trainer import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(distributed, "is_active", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(EdgeKDError, match=r"^train.device=cuda:0 with 2 processes: each process trains on the GPU of "
                                          r"its LOCAL_RANK \(torchrun\); give train.device cuda or auto$"):
        resolve_device("cuda:0")
    assert resolve_device("cuda") == torch.device("cuda")
    monkeypatch.setattr(distributed, "is_active", lambda: False)
    assert resolve_device("cuda:1") == torch.device("cuda:1")  # one process: any GPU it names


def test_class_weighted_ce_accumulated_over_micro_batches_is_one_big_batch():
    """torch's weighted CE divides each micro-batch by its own weights' sum: with grad_accum 4 over batches of 2 the
    minority image's gradient was 0.39x its share in the batch of 8, and at batch 1 class weights did nothing."""
    from edgekd.train.losses import ClassWeightedCE
    from edgekd.train.trainer import micro_batch_weight

    torch.manual_seed(0)
    logits, targets, weight = torch.randn(8, 2), torch.tensor([0, 0, 0, 1, 0, 0, 0, 0]), torch.tensor([0.55, 5.5])

    def grads(criterion, accum):
        x = logits.clone().requires_grad_(True)
        for step in range(accum):
            part = slice(step * 8 // accum, (step + 1) * 8 // accum)
            w = micro_batch_weight(step, accum, accum, [8 // accum] * accum, 8 // accum)
            (criterion(x[part], targets[part]) * w).backward()
        return x.grad

    ours = ClassWeightedCE(weight)
    torch.testing.assert_close(grads(ours, 4), grads(ours, 1))
    torch.testing.assert_close(grads(ours, 8), grads(ours, 1))  # batch 1: the weights still count
    torchs = torch.nn.CrossEntropyLoss(weight=weight)
    assert not torch.allclose(grads(torchs, 4), grads(torchs, 1), atol=1e-3)
    # the definition: each image's weighted loss averaged over the images, label smoothing as torch spreads it
    smoothed = ClassWeightedCE(weight, label_smoothing=0.1)(logits, targets)
    per_image = torch.nn.functional.cross_entropy(logits, targets, weight=weight, reduction="none", label_smoothing=0.1)
    assert float(smoothed) == pytest.approx(float(per_image.sum() / 8))
    plain = torch.nn.CrossEntropyLoss(weight=weight)(logits, targets)
    assert float(ClassWeightedCE(weight)(logits, targets)) == pytest.approx(float(plain * weight[targets].sum() / 8))


def test_differential_lr_and_warmup_cosine():
    from edgekd.models import create_model
    m = create_model({"name": "edgekd_cnn_tiny", "num_classes": 2, "in_chans": 3})
    r = recipe_from_dict({"train": {"epochs": 10, "optimizer": {"lr": 2e-5, "head_lr": 1e-4},
                                    "scheduler": {"name": "cosine", "warmup_epochs": 2, "min_lr": 0.0}}})
    opt = build_optimizer(m, r.train.optimizer)
    assert {g["name"]: g["lr"] for g in opt.param_groups} == {"backbone": 2e-5, "head": 1e-4}
    assert len(opt.param_groups[1]["params"]) == 2  # fc weight + bias
    sched = build_scheduler(opt, r.train.scheduler, 10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[1]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-6) and lrs[2] == pytest.approx(1e-4)
    assert lrs[2] > lrs[5] > lrs[9] and math.isclose(lrs[9], 1e-4 * (1 + math.cos(math.pi * 7 / 8)) / 2, rel_tol=1e-6)


def test_monitor_direction_is_inferred_from_the_metric_name():
    cases = {"val_loss": "min", "val_ece": "min", "train_loss": "min", "val_auc": "max", "val_pauc": "max",
             "val_acc": "max"}
    for metric, mode in cases.items():
        t = recipe_from_dict({"train": {"monitor": metric}}).train
        assert t.monitor_mode == mode, metric
        assert t.scheduler.monitor == metric and t.scheduler.mode == mode
    explicit = recipe_from_dict({"train": {"monitor": "val_loss", "monitor_mode": "max"}}).train
    assert explicit.monitor_mode == "max"
    sched = recipe_from_dict({"train": {"monitor": "val_auc", "scheduler": {"name": "plateau",
                                                                             "monitor": "val_loss"}}}).train
    assert sched.monitor_mode == "max" and sched.scheduler.mode == "min"


def test_val_loss_monitor_keeps_the_lowest_loss_epoch(tiny_recipe_dict, tmp_path):
    d = deep(tiny_recipe_dict, train__epochs=4)
    del d["train"]["monitor_mode"]  # inferred: min for a loss
    res = train_recipe(recipe_from_dict(d), tmp_path / "r", log=lambda s: None)
    losses = [h["val_loss"] for h in res.fit.history]
    assert res.fit.best_epoch == losses.index(min(losses)) + 1
    assert load_checkpoint(res.best_path)["metrics"]["val_loss"] == pytest.approx(min(losses))


def test_val_ece_is_logged_and_a_val_ece_monitor_keeps_the_lowest(tiny_recipe_dict, tmp_path):
    """The README lists *ece* among the minimized monitors: val_ece is logged each epoch (the ECE of the val softmax)
    and, inferred as min, picks the best-calibrated epoch."""
    d = deep(tiny_recipe_dict, train__epochs=3, train__monitor="val_ece")
    del d["train"]["monitor_mode"]
    res = train_recipe(recipe_from_dict(d), tmp_path / "r", log=lambda s: None)
    eces = [h["val_ece"] for h in res.fit.history]
    assert all(0.0 <= e <= 1.0 for e in eces)
    assert res.fit.best_epoch == eces.index(min(eces)) + 1
    assert load_checkpoint(res.best_path)["metrics"]["val_ece"] == pytest.approx(min(eces))


def test_an_exact_tie_of_the_monitor_goes_to_the_lower_val_loss(tiny_recipe_dict, tmp_path, monkeypatch):
    """A val AUC at 1.0 from epoch 1 on (a small, separable val split) kept epoch 1, barely trained (val ACC 0.50),
    as best.pt: a tie is now broken by the val loss."""
    import edgekd.train.trainer as trainer

    monkeypatch.setattr(trainer, "monitored_value", lambda row, *_: 1.0)  # the monitor saturated at every epoch
    res = train_recipe(recipe_from_dict(deep(tiny_recipe_dict, train__epochs=4)), tmp_path / "r", log=lambda s: None)
    losses = [h["val_loss"] for h in res.fit.history]
    assert losses.index(min(losses)) > 0  # else the test could not tell the rules apart
    assert res.fit.best_epoch == losses.index(min(losses)) + 1
    assert load_checkpoint(res.best_path)["metrics"]["val_loss"] == pytest.approx(min(losses))
    # a tie broken by the loss picks best.pt but is no improvement of the monitor: patience still runs out
    res = train_recipe(recipe_from_dict(deep(tiny_recipe_dict, train__epochs=6, train__early_stop={"patience": 2})),
                       tmp_path / "p", log=lambda s: None)
    assert len(res.fit.history) == 3 and res.fit.stopped_early


def test_plateau_scheduler_steps_on_its_own_monitor(tiny_recipe_dict, tmp_path):
    from edgekd.data import build_data
    from edgekd.train.run import build_student_model
    from edgekd.train.trainer import SupervisedObjective, Trainer

    d = deep(tiny_recipe_dict, train__monitor="val_acc",
             train__scheduler={"name": "plateau", "monitor": "val_loss", "patience": 0})
    del d["train"]["monitor_mode"]
    r = recipe_from_dict(d)
    data = build_data(r)
    model, _ = build_student_model(r, data)
    trainer = Trainer(r, model, data, SupervisedObjective(torch.nn.CrossEntropyLoss()), tmp_path, log=lambda s: None)
    trainer._step_schedule({"val_loss": 0.30, "val_acc": 0.90}, 0)
    assert trainer.scheduler.best == 0.30 and trainer.scheduler.mode == "min"
    trainer._step_schedule({"val_loss": 0.20, "val_acc": 0.50}, 1)  # loss improved, acc did not: no LR cut
    assert trainer.scheduler.best == 0.20 and trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    trainer._step_schedule({"val_loss": 0.25, "val_acc": 0.99}, 2)  # loss worse (patience 0): the LR halves
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.005)
    with pytest.raises(EdgeKDError, match="train.scheduler.monitor: 'val_loss' is not a logged metric"):
        trainer._step_schedule({"val_acc": 0.9}, 3)


def test_swa_lr_switches_to_swalr(tiny_recipe_dict, tmp_path):
    def lrs(swa):
        r = recipe_from_dict(deep(tiny_recipe_dict, train__epochs=4, train__optimizer={"name": "sgd", "lr": 0.05},
                                  train__scheduler={"name": "cosine", "min_lr": 0.0}, train__swa=swa))
        return [h["lr"] for h in train_recipe(r, tmp_path / str(len(swa)), log=lambda s: None).fit.history]

    def cosine(step):
        return 0.05 * (1 + math.cos(math.pi * step / 4)) / 2

    # the LR each epoch trained with: SWALR takes over after the epoch at start_epoch 2 (annealed in 1 epoch)
    swalr = lrs({"enabled": True, "start_epoch": 2, "lr": 0.01, "anneal_epochs": 1})
    assert swalr == pytest.approx([0.05, cosine(1), cosine(2), 0.01])
    plain = lrs({"enabled": True, "start_epoch": 2})  # without swa.lr the cosine schedule goes on
    assert plain == pytest.approx([0.05, cosine(1), cosine(2), cosine(3)])
    # the note of a differential-LR run names the epochs SWALR anneals over (it had said swa.lr ruled from the
    # start epoch, which still trains on the main schedule)
    from edgekd.train.optim import schedule_warnings

    cfg = recipe_from_dict(deep(tiny_recipe_dict, train__epochs=5, train__swa={
        "enabled": True, "start_epoch": 2, "lr": 0.0005, "anneal_epochs": 2})).train
    groups = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "name": n} for n in ("head", "backbone")],
                             lr=0.1)
    assert schedule_warnings(cfg, groups, 2) == ["note: from epoch 4 SWALR anneals every parameter group to "
                                                 "train.swa.lr 0.0005, reached at epoch 5 (head_lr's ratio ends there)"]
    # a train_ monitor: SWA's weights, scored on val, are never kept; said (best epoch kept without a word)
    train_monitor = cfg.model_copy(update={"monitor": "train_loss"})
    assert schedule_warnings(train_monitor, groups, 2)[-1].startswith(
        "warning: train.monitor train_loss is not a val_ metric, which SWA's averaged weights are scored by")


def test_swa_start_epoch_zero_is_the_first_epoch_and_null_the_last_quarter(tiny_recipe_dict, tmp_path):
    def swa_lines(start):
        logs: list[str] = []
        r = recipe_from_dict(deep(tiny_recipe_dict, train__epochs=4, train__swa={"enabled": True, "start_epoch": start}))
        train_recipe(r, tmp_path / str(start), log=logs.append)
        return [line for line in logs if "SWA over" in line or "swa.start_epoch" in line]

    assert swa_lines(0)[0].startswith("SWA over epochs 1..4")
    assert swa_lines(None)[0].startswith("SWA over epochs 4..4")  # int(0.75 x 4) = 3, 0-based
    assert swa_lines(4) == ["warning: train.swa.start_epoch 4 >= train.epochs 4: no weights will be averaged"]
    # Digests keep the old spelling of "the last quarter" (0), so runs trained before the change still resume.
    default = recipe_from_dict(tiny_recipe_dict)
    dumped = default.model_dump(mode="json", exclude={"tracking"})
    dumped["train"]["swa"]["start_epoch"] = 0
    del dumped["data"]["patient_pattern"]  # a key since 2026-12-05, left out of the digest while unset
    del dumped["data"]["hair_kernel"]  # a key since 2026-12-06, left out of the digest while hair removal is off
    del dumped["data"]["positive_class"]  # a key since 2026-12-07, left out of the digest while unset
    import hashlib
    import json
    assert default.digest() == hashlib.sha256(json.dumps(dumped, sort_keys=True).encode()).hexdigest()[:16]
    # data.dicom_patient_ids (2026-12-06) had changed every digest: runs from before it resume by the old one
    del dumped["data"]["dicom_patient_ids"]
    legacy = hashlib.sha256(json.dumps(dumped, sort_keys=True).encode()).hexdigest()[:16]
    assert default.digests() == {default.digest(), legacy} and legacy != default.digest()
    from edgekd.train.checkpoint import load_resumable

    state = load_checkpoint(tmp_path / "0" / "last.pt")
    save_checkpoint(tmp_path / "old.pt", {**{k: v for k, v in state.items() if k != "format"},
                                          "recipe_digest": legacy})
    assert load_resumable(tmp_path / "old.pt", default)["recipe_digest"] == legacy
    first = recipe_from_dict(deep(tiny_recipe_dict, train__swa={"start_epoch": 0}))
    assert first.digest() != default.digest()


def test_nan_monitor_fails_at_the_first_epoch(tiny_recipe_dict, tmp_path):
    from types import SimpleNamespace

    from edgekd.train.run import refuse_before_training
    from edgekd.train.trainer import monitored_value

    # val_pauc of a 2-class model is NaN when val holds one class only: limit to a one-class val split
    import numpy as np
    path = tmp_path / "oneclass.npz"
    z = dict(np.load(tiny_recipe_dict["data"]["path"]))
    z["val_labels"] = np.zeros_like(z["val_labels"])
    np.savez(path, **z)
    d = deep(tiny_recipe_dict, train__epochs=5, train__monitor="val_auc", data__path=str(path))
    del d["train"]["monitor_mode"]
    logs = []
    # a val split without every class is known before training: refused then (it had failed after epoch 1)
    with pytest.raises(EdgeKDError, match=r"^train.monitor val_auc: the val split has no image of class class_1 "
                                          r"\(a small data.limit or a rare class\?\), so it is undefined \(NaN\) "
                                          r"from the first epoch: monitor val_loss, or give the val split every class$"):
        train_recipe(recipe_from_dict(d), tmp_path / "r", log=logs.append)
    assert logs == [] and not (tmp_path / "r").exists()
    # ... with unreadable images skipped, the cause names them first; val_loss trains
    data = SimpleNamespace(bad_files=["x.png: truncated"], class_names=["a", "b"], num_classes=2,
                           counts=lambda: {"train": [3, 3], "val": [2, 0], "test": [1, 1]})
    with pytest.raises(EdgeKDError, match=r"class b \(unreadable images skipped \(data.on_bad_image: skip\), a"):
        refuse_before_training(recipe_from_dict(d), data, tmp_path / "r", False)
    refuse_before_training(recipe_from_dict(deep(d, train__monitor="val_loss")), data, tmp_path / "r", False)
    plateau = deep(d, train__monitor="val_loss", train__scheduler={"name": "plateau", "monitor": "val_auc"})
    with pytest.raises(EdgeKDError, match=r"^train.scheduler.monitor val_auc: the val split has no image of class b"):
        refuse_before_training(recipe_from_dict(plateau), data, tmp_path / "r", False)
    # any other NaN of the monitor is refused at the first epoch that shows it
    with pytest.raises(EdgeKDError, match=r"^train.monitor: 'val_auc' is NaN at epoch 3 \(undefined for this data"):
        monitored_value({"val_auc": float("nan")}, "val_auc", "train.monitor", 2)
    # `edgekd train` removes the run folder it made for a run refused before its first checkpoint (it left a
    # folder holding recipe.yaml); a folder that was there stays.
    import yaml
    from typer.testing import CliRunner

    from edgekd.cli import app

    (tmp_path / "nan.yaml").write_text(yaml.safe_dump(d))
    res = CliRunner().invoke(app, ["train", str(tmp_path / "nan.yaml"), "--out", str(tmp_path / "cli")])
    assert isinstance(res.exception, EdgeKDError) and not (tmp_path / "cli").exists()
    (tmp_path / "mine" / "run").mkdir(parents=True)  # an existing --out is left as it was
    res = CliRunner().invoke(app, ["train", str(tmp_path / "nan.yaml"), "--out", str(tmp_path / "mine" / "run")])
    assert isinstance(res.exception, EdgeKDError) and list((tmp_path / "mine" / "run").iterdir()) == []
    # A NaN first seen at an epoch (every class in val): refused there, after recipe.yaml was written
    import edgekd.train.trainer as trainer_mod

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer_mod, "monitored_value",
                   lambda row, name, key, epoch: monitored_value({**row, name: float("nan")}, name, key, epoch))
        (tmp_path / "ok.yaml").write_text(yaml.safe_dump(deep(tiny_recipe_dict, train__monitor="val_auc")))
        res = CliRunner().invoke(app, ["train", str(tmp_path / "ok.yaml"), "--out", str(tmp_path / "mine" / "new")])
        assert "'val_auc' is NaN at epoch 1" in str(res.exception) and (tmp_path / "mine").is_dir()
        assert not (tmp_path / "mine" / "new").exists()  # the run folder it made is removed
        res = CliRunner().invoke(app, ["train", str(tmp_path / "ok.yaml"), "--out", str(tmp_path / "mine" / "run")])
        assert isinstance(res.exception, EdgeKDError) and (tmp_path / "mine" / "run" / "recipe.yaml").is_file()


def test_a_seeded_run_repeats_its_metrics_exactly(tiny_recipe_dict, tmp_path):
    """Same recipe, seed and thread count (recorded in metrics.json): identical history, weights and test metrics,
    augmentation and a balanced sampler included."""
    recipe = deep(tiny_recipe_dict, train__epochs=2, train__threads=2, data__balanced_sampler=True,
                  augment=[{"RandomHorizontalFlip": {"p": 0.5}}, {"RandomRotation": {"degrees": 10}}])
    threads = torch.get_num_threads()
    try:
        runs = [train_recipe(recipe_from_dict(recipe), tmp_path / f"r{i}", log=lambda s: None) for i in range(2)]
    finally:
        torch.set_num_threads(threads)
    a, b = (json.loads((tmp_path / f"r{i}" / "metrics.json").read_text()) for i in range(2))
    assert a["threads"] == b["threads"] == 2
    assert [h["train_loss"] for h in runs[0].fit.history] == [h["train_loss"] for h in runs[1].fit.history]
    assert a["test"] == b["test"]
    wa, wb = (load_checkpoint(r.best_path)["state_dict"] for r in runs)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_softmax_hand_computed():
    """The numpy softmax behind every evaluation: rows of known logits give known probabilities."""
    from edgekd.probability import softmax

    logits = np.array([[0.0, math.log(3.0)], [1.0, 1.0], [0.0, math.log(2.0)]], np.float32)
    np.testing.assert_allclose(softmax(logits), [[0.25, 0.75], [0.5, 0.5], [1 / 3, 2 / 3]], rtol=1e-6)
    three = np.array([[0.0, math.log(2.0), math.log(5.0)]])
    np.testing.assert_allclose(softmax(three), [[1 / 8, 2 / 8, 5 / 8]], rtol=1e-12)
    # Stable: the row max is subtracted first (exp(1000) alone overflows).
    np.testing.assert_allclose(softmax(np.array([[1000.0, 1000.0 + math.log(3.0)]])), [[0.25, 0.75]], rtol=1e-12)
    # A continual run's multi-head view sets other tasks' logits to -inf: they get probability 0.
    np.testing.assert_allclose(softmax(np.array([[0.0, -np.inf, math.log(3.0)]])), [[0.25, 0.0, 0.75]], rtol=1e-12)


def test_evaluate_metrics_and_loss_hand_computed():
    """The trainer's evaluation on fixed logits (an identity model over two batches) equals hand-computed values."""
    from edgekd.train.trainer import evaluate

    y = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1])
    p1 = torch.tensor([0.1, 0.6, 0.2, 0.9, 0.8, 0.4, 0.7, 0.95], dtype=torch.float64)
    logits = torch.stack([torch.zeros(8, dtype=torch.float64), torch.log(p1 / (1 - p1))], 1).float()  # p(1) = p1
    loader = [(logits[:5], y[:5]), (logits[5:], y[5:])]
    m = evaluate(torch.nn.Identity(), loader, torch.device("cpu"), torch.nn.CrossEntropyLoss())
    # predictions 0 1 0 1 1 0 1 1 -> tp=4 fn=1 tn=2 fp=1; AUC: of the 15 (pos, neg) pairs only 0.4 < 0.6 fails
    assert m["acc"] == pytest.approx(6 / 8)
    assert m["sensitivity"] == pytest.approx(4 / 5) and m["specificity"] == pytest.approx(2 / 3)
    assert m["balanced_acc"] == pytest.approx((4 / 5 + 2 / 3) / 2)
    assert m["auc"] == pytest.approx(14 / 15)
    p_true = [0.9, 0.4, 0.8, 0.9, 0.8, 0.4, 0.7, 0.95]
    assert m["loss"] == pytest.approx(-sum(math.log(p) for p in p_true) / 8, rel=1e-6)


@pytest.mark.parametrize("momentum, nesterov", [(0.0, False), (0.9, True)])
def test_sgd_without_momentum_builds(momentum, nesterov):
    """torch refuses nesterov=True with momentum 0: plain SGD must still be a valid recipe."""
    import torch

    from edgekd.recipe import OptimizerConfig
    from edgekd.train.optim import build_optimizer

    opt = build_optimizer(torch.nn.Linear(2, 2), OptimizerConfig(name="sgd", lr=0.1, momentum=momentum))
    assert opt.defaults["nesterov"] is nesterov and opt.defaults["momentum"] == momentum


def test_one_class_warning_names_the_split_and_its_largest_class_share():
    from edgekd.metrics import largest_class_share, one_class_warning

    assert largest_class_share([135, 389]) == pytest.approx(389 / 524) and largest_class_share([0, 7]) is None
    # The zoo's ResNet-18 at its epoch 4: val AUC 0.956, val ACC 0.366 on PneumoniaMNIST val (135 / 389).
    msg = one_class_warning("val", 0.3664, [135, 389])
    assert msg.startswith("val ACC 0.3664 is no better than") and "(0.7424)" in msg
    assert one_class_warning("val", 389 / 524, [135, 389]) is not None  # exactly the share: no better
    assert one_class_warning("val", 0.8969, [135, 389]) is None
    assert one_class_warning("test", 0.2, [10, 10, 30]) is not None
    assert one_class_warning("test", 0.61, [10, 10, 30]) is None
    assert one_class_warning("val", None, [1, 2]) is None and one_class_warning("val", 0.0, [5]) is None
    assert one_class_warning("val", 1.0, [0, 7]) is None  # only one class in the split


def test_training_warns_when_the_best_checkpoint_calls_every_image_one_class(tiny_recipe_dict, tmp_path, monkeypatch):
    import edgekd.train.run as run

    real = run.model_from_checkpoint

    def one_class(path):  # the best checkpoint, with its head biased so every image lands in class 0
        model, ckpt = real(path)
        head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        with torch.no_grad():
            head.bias.copy_(torch.tensor([1e4, -1e4]))
        return model, ckpt

    monkeypatch.setattr(run, "model_from_checkpoint", one_class)
    lines = []
    res = train_recipe(recipe_from_dict(deep(tiny_recipe_dict, train__epochs=1)), tmp_path / "run", log=lines.append)
    warned = [s for s in lines if s.startswith(f"warning: {tmp_path / 'run' / 'best.pt'}: ")]  # which run (k-fold)
    assert len(warned) == 2 and "val ACC" in warned[0] and "test ACC" in warned[1]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["val"]["warning"] == res.val["warning"] and "largest class" in m["test"]["warning"]
    # `edgekd eval` of the same (patched) checkpoint prints the warning and writes it
    from typer.testing import CliRunner

    from edgekd.cli import app

    ev = CliRunner().invoke(app, ["eval", str(res.best_path), "--split", "test", "--out", str(tmp_path / "ev")])
    assert ev.exit_code == 0, ev.output
    assert "warning: test ACC" in " ".join(ev.output.split())
    assert "largest class" in json.loads((tmp_path / "ev" / "metrics.json").read_text())["test"]["warning"]
    # a model that learned (the same recipe, unpatched, 4 epochs) is not warned about
    monkeypatch.setattr(run, "model_from_checkpoint", real)
    lines.clear()
    res = train_recipe(recipe_from_dict(deep(tiny_recipe_dict, train__epochs=4)), tmp_path / "ok", log=lines.append)
    assert not [s for s in lines if s.startswith("warning:")] and "warning" not in res.test


def test_log_csv_grows_every_epoch(tiny_recipe_dict, tmp_path, monkeypatch):
    # It was written once, at the end of the run (of each continual task): a long run could not be followed.
    import csv

    from edgekd.train.trainer import Trainer

    rows_seen, run_epoch = [], Trainer._run_epoch

    def spy(self, epoch, *args):
        log = self.out / "log.csv"
        rows_seen.append(len(list(csv.DictReader(log.open()))) if log.is_file() else 0)
        return run_epoch(self, epoch, *args)

    monkeypatch.setattr(Trainer, "_run_epoch", spy)
    train_recipe(recipe_from_dict(deep(tiny_recipe_dict, train__epochs=3)), tmp_path / "run", log=lambda s: None)
    assert rows_seen == [0, 1, 2]


def test_class_order_check_refuses_moved_names_and_warns_on_renamed_ones():
    from edgekd.data import check_class_order

    assert check_class_order(["normal", "pneumonia"], ["NORMAL ", "Pneumonia"], "x") is None  # case and spaces
    assert "matched by index" in check_class_order(["normal", "pneumonia"], ["0", "1"], "x")
    with pytest.raises(EdgeKDError, match="class 'PNEUMONIA' is output 1 of the model but class 0 of the data"):
        check_class_order(["NORMAL", "PNEUMONIA"], ["PNEUMONIA", "NORMAL"], "x")
    with pytest.raises(EdgeKDError, match="class 'normal' is output 0 of the model but class 1"):  # one name shared
        check_class_order(["NORMAL", "PNEUMONIA"], ["bacterial", "normal"], "x")
    # Another class count: an error, not "matched by index" followed by a count error (a 5-grade teacher, 2 classes)
    said: list[str] = []
    with pytest.raises(EdgeKDError, match=r"^t: the model has 5 classes \['0', '1', '2', '3', '4'\], the data has 2 "
                                          r"\['normal', 'pneumonia'\]$"):
        check_class_order(["0", "1", "2", "3", "4"], ["normal", "pneumonia"], "t", said.append)
    assert said == []


def test_eval_export_and_distill_refuse_data_whose_classes_are_in_another_order(tiny_recipe_dict, tmp_path):
    """The same classes in another order inverted every metric (test AUC 0.95 -> 0.05), a calibration fit and the
    KD target, without a word: eval, export and a teacher whose classes moved are refused."""
    from edgekd.distill.run import distill_recipe
    from edgekd.export.run import _checkpoint_data
    from edgekd.train.run import evaluate_checkpoint

    res = train_recipe(recipe_from_dict(deep(tiny_recipe_dict, train__epochs=1)), tmp_path / "run", log=lambda s: None)
    swapped = deep(tiny_recipe_dict, data__class_names=["class_1", "class_0"])
    with pytest.raises(EdgeKDError, match="class 'class_1' is output 1 of the model but class 0 of the data"):
        evaluate_checkpoint(res.best_path, tmp_path / "eval", recipe_from_dict(swapped))
    assert not (tmp_path / "eval" / "metrics.json").exists()
    ckpt = load_checkpoint(res.best_path)
    with pytest.raises(EdgeKDError, match="class 'class_1' is output 1"):
        _checkpoint_data(ckpt, res.best_path, ["data.class_names=[class_1,class_0]"], None)
    student = deep(swapped, distill={"teacher": str(res.best_path),
                                     "terms": [{"kind": "kl", "weight": 1.0, "temperature": 4}]})
    with pytest.raises(EdgeKDError, match="distill: teacher .*best.pt: class 'class_1' is output 1"):
        distill_recipe(recipe_from_dict(student), tmp_path / "student", log=lambda s: None)
    renamed = []  # other names, nothing moved: matched by index, said as a warning
    evaluate_checkpoint(res.best_path, tmp_path / "eval2",
                        recipe_from_dict(deep(tiny_recipe_dict, data__class_names=["healthy", "sick"])),
                        log=renamed.append)
    assert len(renamed) == 1 and renamed[0].startswith("warning:") and "matched by index" in renamed[0]
    # report too (it checked the class count only, and printed the inverted figures); a report that fails midway
    # leaves the earlier one whole (its files had been removed first)
    from edgekd.distill.report import comparison_report

    with pytest.raises(EdgeKDError, match="class 'class_1' is output 1 of the model but class 0 of the data"):
        comparison_report([res.best_path], tmp_path / "rep", overrides=["data.class_names=[class_1,class_0]"],
                          log=lambda s: None)
    comparison_report([res.best_path], tmp_path / "rep", log=lambda s: None)
    before = {p.name: p.read_bytes() for p in (tmp_path / "rep").iterdir()}
    import edgekd.metrics.plots as plots

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plots, "plot_confusion", full_disk)
        with pytest.raises(OSError):
            comparison_report([res.best_path], tmp_path / "rep", log=lambda s: None)
    assert {p.name: p.read_bytes() for p in (tmp_path / "rep").iterdir()} == before and "report.json" in before


def test_log_csv_has_each_param_groups_lr_under_differential_lr(tiny_recipe_dict, tmp_path):
    import csv

    rec = deep(tiny_recipe_dict, train__epochs=1, train__optimizer={"name": "adam", "lr": 0.001, "head_lr": 0.01})
    train_recipe(recipe_from_dict(rec), tmp_path / "run", log=lambda s: None)
    (row,) = list(csv.DictReader((tmp_path / "run" / "log.csv").open()))
    assert float(row["lr_backbone"]) == pytest.approx(0.001) and float(row["lr_head"]) == pytest.approx(0.01)
    assert float(row["lr"]) == float(row["lr_head"])


def test_train_never_writes_over_its_own_inputs_and_says_when_it_replaces_a_run(tiny_recipe_dict, tmp_path,
                                                                                monkeypatch):
    """A student recipe copied from its teacher kept the teacher's name, so runs/<name>: the student's best.pt
    replaced the teacher it was distilling from, exit 0. A recipe inside --out was replaced by the run's copy."""
    import yaml
    from typer.testing import CliRunner

    from edgekd.cli import app

    teacher = train_recipe(recipe_from_dict(tiny_recipe_dict), tmp_path / "t", log=lambda s: None).best_path
    before = teacher.read_bytes()
    student = deep(tiny_recipe_dict, role="student",
                   distill={"teacher": str(teacher), "terms": [{"kind": "kl", "weight": 1.0}]})
    (tmp_path / "student.yaml").write_text(yaml.safe_dump(student))
    res = CliRunner().invoke(app, ["train", str(tmp_path / "student.yaml"), "--out", str(tmp_path / "t")])
    assert isinstance(res.exception, EdgeKDError) and "holds distill.teacher" in str(res.exception)
    assert teacher.read_bytes() == before
    (tmp_path / "t" / "recipe.yaml").write_text(yaml.safe_dump(tiny_recipe_dict))
    res = CliRunner().invoke(app, ["train", str(tmp_path / "t" / "recipe.yaml"), "--out", str(tmp_path / "t")])
    assert "writes its recipe.yaml over the recipe file" in str(res.exception)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["train", "student.yaml", "--out", ""])
    assert "the current folder" in str(res.exception)
    # into a folder holding another run, with a teacher that is no checkpoint: refused, without first saying that
    # the earlier run's files are replaced (they were not)
    (tmp_path / "scan.pt").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    bad = deep(student, distill={"teacher": str(tmp_path / "scan.pt"), "terms": [{"kind": "kl", "weight": 1.0}]})
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    res = CliRunner().invoke(app, ["train", "bad.yaml", "--out", "t"])
    assert isinstance(res.exception, EdgeKDError) and "already holds a run" not in res.output
    assert teacher.read_bytes() == before
    # into a folder holding another run: said, then done
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(deep(tiny_recipe_dict, train__epochs=0)))
    res = CliRunner().invoke(app, ["train", "plain.yaml", "--out", "t"])
    assert res.exit_code == 0, res.output
    assert "t already holds a run (best.pt, last.pt, metrics.json)" in " ".join(res.output.split())
    assert "train.epochs is 0" in res.output and teacher.read_bytes() != before
    # a teacher in a subfolder of --out is not written over by a plain distillation run: allowed
    nested = train_recipe(recipe_from_dict(tiny_recipe_dict), tmp_path / "nest" / "teacher", log=lambda s: None)
    student["distill"]["teacher"] = str(nested.best_path)
    (tmp_path / "student2.yaml").write_text(yaml.safe_dump(deep(student, train__epochs=1)))
    res = CliRunner().invoke(app, ["train", "student2.yaml", "--out", "nest"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "nest" / "best.pt").is_file() and nested.best_path.is_file()


def test_a_train_section_that_asks_for_what_it_will_not_get_is_warned(tiny_recipe_dict, tmp_path):
    """A warmup as long as the run, a warmup under the plateau schedule, a head_lr with the head frozen, SWA that
    early stopping ends before it starts: each had been dropped without a word."""
    logs: list[str] = []
    long_warmup = deep(tiny_recipe_dict, train__epochs=2, train__scheduler={"name": "cosine", "warmup_epochs": 5})
    train_recipe(recipe_from_dict(long_warmup), tmp_path / "a", log=logs.append)
    assert "warning: train.scheduler.warmup_epochs 5 >= train.epochs 2: the warmup is cut to 1 epoch(s), the cosine " \
        "decay to one" in logs
    logs.clear()
    plateau = deep(tiny_recipe_dict, train__epochs=1, train__scheduler={"name": "plateau", "warmup_epochs": 2},
                   train__optimizer={"head_lr": 0.01}, model__freeze_patterns=["fc"])
    train_recipe(recipe_from_dict(plateau), tmp_path / "b", log=logs.append)
    assert "warning: train.scheduler.warmup_epochs 2: the plateau schedule has no warmup (cosine only); not used" in logs
    assert any(line.startswith("warning: train.optimizer.head_lr 0.01: the model has no trainable classifier head")
               for line in logs), logs
    logs.clear()
    # no epoch after the first improves by 1e9: patience 1 stops the run at epoch 2, before SWA's epoch 6
    stops = deep(tiny_recipe_dict, train__epochs=8, train__monitor="val_loss",
                 train__early_stop={"patience": 1, "min_delta": 1e9}, train__swa={"enabled": True, "start_epoch": 6})
    result = train_recipe(recipe_from_dict(stops), tmp_path / "c", log=logs.append)
    assert result.fit.stopped_early and len(result.fit.history) == 2
    assert "warning: the run ended at epoch 2, before train.swa.start_epoch 6: no weights were averaged; best.pt is " \
        "the best epoch's" in logs
    assert json.loads((tmp_path / "c" / "metrics.json").read_text())["swa"]["used"] is False


def test_python_entry_points_take_a_recipe_path_or_dict_and_refuse_other_types(tiny_recipe_dict, tmp_path):
    import yaml

    from edgekd.distill.run import distill_recipe
    from edgekd.pipeline import run_recipe

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**tiny_recipe_dict, "train": {**tiny_recipe_dict["train"], "epochs": 1}}))
    by_path = run_recipe(str(path), tmp_path / "a", log=lambda *_: None)  # had been AttributeError: 'str' ... 'distill'
    by_dict = train_recipe({**tiny_recipe_dict, "train": {**tiny_recipe_dict["train"], "epochs": 1}}, tmp_path / "b",
                           log=lambda *_: None)
    assert by_path.test["auc"] == pytest.approx(by_dict.test["auc"])
    for call in (train_recipe, distill_recipe, run_recipe):
        with pytest.raises(EdgeKDError, match="expected a Recipe .* got int"):
            call(5, tmp_path / "c")
        with pytest.raises(EdgeKDError, match="out: expected the run's folder as a path, got None"):
            call(recipe_from_dict(tiny_recipe_dict), None)
    assert not (tmp_path / "c").exists()


def test_a_new_run_into_an_earlier_runs_folder_stopped_half_way_leaves_no_mix(tiny_recipe_dict, tmp_path,
                                                                               monkeypatch):
    """A run stopped in the folder of an earlier one had left its best.pt beside the earlier run's metrics.json,
    splits.json and plots (seed 0's figures describing seed 1's weights)."""
    from edgekd.train.trainer import Trainer

    out = tmp_path / "run"
    train_recipe(recipe_from_dict(tiny_recipe_dict), out, log=lambda *_: None)
    assert (out / "metrics.json").is_file() and (out / "confusion_test.png").is_file()
    real = Trainer.train_epoch

    def stop_at_second(self, epoch, *args, **kwargs):
        if epoch == 1:
            raise KeyboardInterrupt
        return real(self, epoch, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_epoch", stop_at_second)
    with pytest.raises(KeyboardInterrupt):
        train_recipe(recipe_from_dict({**tiny_recipe_dict, "seed": 1}), out, log=lambda *_: None)
    left = sorted(p.name for p in out.iterdir())
    assert "metrics.json" not in left and "splits.json" not in left and "confusion_test.png" not in left, left
    assert load_checkpoint(out / "last.pt")["trainer"]["epoch"] == 1  # the new run's, resumable


def test_a_resumed_run_does_not_need_its_starting_weights_file(tiny_recipe_dict, tmp_path):
    """--resume loads last.pt over the model; it had still required model.weights, failing once the file moved."""
    from edgekd.models import create_model

    weights = tmp_path / "start.pth"
    torch.save(create_model({"name": "edgekd_cnn_tiny", "num_classes": 2, "in_chans": 3}).state_dict(), weights)
    recipe = recipe_from_dict({**tiny_recipe_dict, "model": {"name": "edgekd_cnn_tiny", "weights": str(weights)}})
    first = train_recipe(recipe, tmp_path / "run", log=lambda *_: None)
    from edgekd.fileio import sha256_file
    assert load_checkpoint(first.best_path)["init_weights"] == {"file": str(weights.resolve()),
                                                                 "sha256": sha256_file(weights)}  # provenance
    recorded = load_checkpoint(first.best_path)["init_weights"]
    last = tmp_path / "run" / "last.pt"
    stopped = load_checkpoint(last)  # as if stopped after epoch 1: the resume trains epoch 2 and writes last.pt
    stopped["trainer"]["epoch"], stopped["trainer"]["history"] = 1, stopped["trainer"]["history"][:1]
    save_checkpoint(last, stopped)
    weights.write_bytes(b"another file now")  # a resume keeps what the run started from, without reading it
    finished = train_recipe(recipe, tmp_path / "run", resume=True, log=lambda *_: None)
    assert load_checkpoint(last)["trainer"]["epoch"] == 2 and load_checkpoint(last)["init_weights"] == recorded
    weights.unlink()
    again = train_recipe(recipe, tmp_path / "run", resume=True, log=lambda *_: None)
    assert json.dumps(again.test, sort_keys=True) == json.dumps(finished.test, sort_keys=True)  # (NaN equals itself)
    with pytest.raises(EdgeKDError, match="start.pth: not found"):  # a new run still needs it
        train_recipe(recipe, tmp_path / "other", log=lambda *_: None)


def test_a_second_training_into_a_folder_in_use_is_refused(tiny_recipe_dict, tmp_path):
    """Two trainings into one --out both exited 0, the first reporting files the second had replaced."""
    import subprocess
    import sys

    from edgekd.fileio import held_folder

    out = tmp_path / "run"
    out.mkdir()
    with held_folder(out, "training"):
        with pytest.raises(EdgeKDError, match=r"run: another edgekd training is writing into this folder now"):
            train_recipe(recipe_from_dict(tiny_recipe_dict), out, log=lambda *_: None)
        probe = ("import sys; from edgekd.fileio import held_folder\n"
                 "try:\n    with held_folder(sys.argv[1], 'run'): print('got it')\n"
                 "except Exception as e: print(e)")
        other = subprocess.run([sys.executable, "-c", probe, str(out)], capture_output=True, text=True, check=True)
        assert "another edgekd run is writing" in other.stdout  # another process is refused as well
    assert list(out.iterdir()) == []  # refused before writing anything; no lock file either
    train_recipe(recipe_from_dict(tiny_recipe_dict), out, log=lambda *_: None)  # free again


def test_a_folder_another_run_holds_is_never_removed_as_new(tmp_path):
    """Two runs started together both saw --out as new; the one refused by the lock removed the other's folder
    (holding only its recipe.yaml) on its way out."""
    from edgekd.fileio import FolderInUseError, removed_if_only

    out = tmp_path / "run"
    with pytest.raises(FolderInUseError):
        with removed_if_only(out, ("recipe.yaml",)):
            out.mkdir()
            (out / "recipe.yaml").write_text("the other run's\n")
            raise FolderInUseError("busy")
    assert (out / "recipe.yaml").read_text() == "the other run's\n"
    with pytest.raises(EdgeKDError):  # any other refusal still takes a new folder away
        with removed_if_only(tmp_path / "new", ("recipe.yaml",)):
            (tmp_path / "new").mkdir()
            (tmp_path / "new" / "recipe.yaml").write_text("mine\n")
            raise EdgeKDError("refused")
    assert not (tmp_path / "new").exists()


def test_the_python_api_refuses_what_edgekd_train_refuses_and_a_kfold_run_holds_its_folder(tiny_recipe_dict, tmp_path,
                                                                                           monkeypatch):
    """run_recipe/run_folds had skipped `edgekd train`'s --out checks (a run into the working folder wrote its
    files there), and a k-fold run locked only each fold's run: a second k-fold run into the same --out retrained
    a finished fold between two of the first run's folds, whose kfold.json then described files no longer there."""
    from edgekd.fileio import held_folder
    from edgekd.pipeline import run_folds, run_recipe

    monkeypatch.chdir(tmp_path)
    for call in (lambda: run_recipe(tiny_recipe_dict, ".", log=lambda *_: None),
                 lambda: run_folds(tiny_recipe_dict, ".", 2, log=lambda *_: None)):
        with pytest.raises(EdgeKDError, match=r"^--out .*: the current folder; give the run a folder of its own$"):
            call()
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.npz"]  # the recipe's data; nothing written beside it
    import yaml

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "recipe.yaml").write_text(yaml.safe_dump(tiny_recipe_dict))  # the recipe is --out/recipe.yaml
    with pytest.raises(EdgeKDError, match="writes its recipe.yaml over the recipe file"):
        run_recipe(tiny_recipe_dict, tmp_path / "sub", log=lambda *_: None, recipe_path=tmp_path / "sub" / "recipe.yaml")
    with pytest.raises(EdgeKDError, match="writes its recipe.yaml over the recipe file"):  # given as its path
        run_recipe(tmp_path / "sub" / "recipe.yaml", tmp_path / "sub", log=lambda *_: None)
    out = tmp_path / "kf"
    with held_folder(out, "k-fold run"):
        with pytest.raises(EdgeKDError, match=r"kf: another edgekd k-fold run is writing into this folder now"):
            run_folds(tiny_recipe_dict, out, 2, log=lambda *_: None)
    assert list(out.iterdir()) == []  # refused before any fold


def test_a_run_folder_given_as_a_checkpoint_names_its_checkpoint(tmp_path):
    # a continual run's folder holds model.pt, not best.pt: the error had named no checkpoint for it
    for name in ("best.pt", "model.pt"):
        run = tmp_path / name.split(".")[0]
        run.mkdir()
        (run / name).write_bytes(b"PK\x03\x04")
        with pytest.raises(EdgeKDError, match=rf"a folder, not a checkpoint file \(best.pt\); its checkpoint is "
                                              rf"\S+/{name.split('.')[0]}/{name}$"):
            load_checkpoint(run)
    kfold = tmp_path / "kf"  # edgekd train --folds: fold<i>/<role>/best.pt
    for i in range(2):
        (kfold / f"fold{i}" / "teacher").mkdir(parents=True)
        (kfold / f"fold{i}" / "teacher" / "best.pt").write_bytes(b"PK\x03\x04")
    with pytest.raises(EdgeKDError, match=r"a folder, not a checkpoint file \(best.pt\); a k-fold run, one checkpoint "
                                          r"per fold: \S+/fold0/teacher/best.pt \.\.\. \S+/fold1/teacher/best.pt$"):
        load_checkpoint(kfold)
    for i in range(2, 11):  # a distill k-fold run: both roles, fold10 after fold9
        for role in ("student", "teacher"):
            (kfold / f"fold{i}" / role).mkdir(parents=True, exist_ok=True)
            (kfold / f"fold{i}" / role / "best.pt").write_bytes(b"PK\x03\x04")
    with pytest.raises(EdgeKDError, match=r"a k-fold run, one checkpoint per fold and role: \S+/fold2/student/best.pt "
                                          r"\.\.\. \S+/fold10/student/best.pt; \S+/fold0/teacher/best.pt \.\.\. "
                                          r"\S+/fold10/teacher/best.pt$"):
        load_checkpoint(kfold)


def test_swa_batchnorm_update_leaves_a_last_batch_of_one_image_out(tiny_recipe_dict, tmp_path):
    """Training drops a lone last image; SWA's update_bn (train mode) got it and ended a finished run at a BatchNorm
    of 1x1 maps: no metrics.json, and --resume failed again."""
    from edgekd.data import build_data
    from edgekd.train.run import train_recipe

    raw = {**tiny_recipe_dict, "model": {"name": "test_resnet"},
           "train": {**tiny_recipe_dict["train"], "epochs": 2, "swa": {"enabled": True, "start_epoch": 1}}}
    n = len(build_data(recipe_from_dict(raw)).tables["train"])
    raw["data"] = {**raw["data"], "batch_size": n - 1}  # n images: a last batch of one
    run = train_recipe(recipe_from_dict(raw), tmp_path / "run", log=lambda *_: None)
    assert (run.out / "swa.pt").is_file() and (run.out / "metrics.json").is_file()


def test_one_image_batches_through_a_batchnorm_at_1x1_are_the_recipes_problem(tiny_recipe_dict, tmp_path):
    """data.batch_size 1 on a model whose map reaches 1x1 (ResNet-18 at 28 px) ended with torch's "Expected more
    than 1 value per channel when training" as an internal error."""
    from edgekd.train.run import train_recipe

    raw = {**tiny_recipe_dict, "model": {"name": "test_resnet"},
           "data": {**tiny_recipe_dict["data"], "batch_size": 1}}
    with pytest.raises(EdgeKDError, match=r"^data.batch_size 1: a training batch of one image reached a BatchNorm "
                                          r"layer with one value per channel .*data.image_size 16"):
        train_recipe(recipe_from_dict(raw), tmp_path / "run", log=lambda *_: None)


def test_the_early_stop_line_names_a_best_epoch_that_only_broke_a_tie():
    """An epoch tying the best monitor at a lower val loss becomes best.pt (marked *) without resetting the
    patience; "did not improve for 8 epochs" two epochs after a * had read as a contradiction."""
    from types import SimpleNamespace

    from edgekd.train.trainer import Trainer

    t = Trainer.__new__(Trainer)
    t.cfg = SimpleNamespace(monitor="val_auc")
    t.epoch, t.bad_epochs, t.best_epoch = 9, 8, 7
    assert t._early_stop_line(8) == ("early stop: val_auc did not improve for 8 epochs (last at epoch 1; best.pt is "
                                     "epoch 7's, which tied epoch 1's at a lower val loss)")
    t.best_epoch = 1
    assert t._early_stop_line(8) == "early stop: val_auc did not improve for 8 epochs (last at epoch 1)"


def test_more_threads_than_cores_are_warned_of(tiny_recipe_dict, monkeypatch):
    """train.threads 16 on 2 cores had run without a word (predict and export cap theirs)."""
    import edgekd.train.run as run

    said, torch_threads = [], torch.get_num_threads()
    monkeypatch.setattr(run, "usable_cores", lambda: 2)
    try:
        run.apply_threads(recipe_from_dict(deep(tiny_recipe_dict, train__threads=16)), said.append)
        run.apply_threads(recipe_from_dict(deep(tiny_recipe_dict, train__threads=2)), said.append)
    finally:
        torch.set_num_threads(torch_threads)
    assert said == ["warning: train.threads 16 is more than the 2 cores this process may use: they oversubscribe "
                    "them (slower, not faster)"]


def test_a_run_says_its_data_in_one_line_hair_removal_included(tiny_recipe_dict, tmp_path):
    """A skin run had not said whether it removed hair, nor how many images each split held."""
    pytest.importorskip("cv2")
    from edgekd.recipe import recipe_from_dict
    from edgekd.train.run import train_recipe

    for hair, tail in ((False, "16 px"), (True, "16 px; DullRazor hair removal on the decoded image, a ")):
        said: list[str] = []
        raw = {**tiny_recipe_dict, "data": {**tiny_recipe_dict["data"], "hair_removal": hair}, "train":
               {**tiny_recipe_dict["train"], "epochs": 1}}
        train_recipe(recipe_from_dict(raw), tmp_path / f"h{hair}", log=said.append)
        (line,) = [s for s in said if s.startswith("data: ")]
        assert line.startswith("data: tiny, 48 train / 16 val / 16 test images, 2 classes, " + tail), line
        assert ("hair" in line) == hair


def test_the_data_line_says_which_splits_were_drawn_and_whether_by_patient(tmp_path):
    """A run on a folder without patient ids had carved val and test by image without saying so (one patient's
    images may then sit in two splits); a CSV's patient_id column draws them by patient."""
    import shutil

    from conftest import write_image_folder

    from edgekd.data import build_data
    from edgekd.recipe import recipe_from_dict
    from edgekd.train.run import data_summary

    root = write_image_folder(tmp_path / "imgs", n_per_class=18)
    raw = {"name": "f", "model": {"name": "edgekd_cnn_tiny"}, "data": {"source": "imagefolder", "path": str(root),
                                                                     "image_size": 16}}
    recipe = recipe_from_dict(raw)
    assert data_summary(build_data(recipe), recipe).endswith("16 px; val and test drawn by image (no patient ids)")
    files = sorted(root.rglob("*.png"))
    rows = ["path,label,patient_id"] + [f"{f},{f.parent.name},p{i // 2}" for i, f in enumerate(files)]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    recipe = recipe_from_dict({**raw, "data": {**raw["data"], "source": "csv", "path": str(tmp_path / "m.csv")}})
    assert data_summary(build_data(recipe), recipe).endswith("16 px; val and test drawn by patient")
    rows = ["path,label,patient_id"] + [f"{f},{f.parent.name},p{i}" for i, f in enumerate(files)]
    (tmp_path / "one.csv").write_text("\n".join(rows) + "\n")  # one image a patient: stratified may split it
    recipe = recipe_from_dict({**raw, "data": {**raw["data"], "source": "csv", "path": str(tmp_path / "one.csv"),
                                               "split": "stratified"}})
    assert data_summary(build_data(recipe), recipe).endswith("; val and test drawn by image (data.split stratified)")
    (root / "train").mkdir()  # given splits: nothing drawn, nothing said
    for split in ("train", "val", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for f in sorted((root / cls).glob("*.png"))[:4]:
                (root / split / cls / f"{split}-{f.name}").write_bytes(f.read_bytes())
    for cls in ("a", "b"):
        shutil.rmtree(root / cls)
    recipe = recipe_from_dict(raw)
    assert data_summary(build_data(recipe), recipe).endswith("classes, 16 px")


def test_python_entry_points_take_plain_values_and_give_the_threads_back(tiny_recipe_dict, tmp_path):
    """From Python: log=None had been a TypeError, a data recipe given as a file an AttributeError, splits="val"
    read as v, a, l, and train.threads=1 had left the caller's process on one thread."""
    import yaml

    from edgekd.pipeline import run_recipe
    from edgekd.train.run import evaluate_checkpoint

    torch.set_num_threads(2)
    raw = {**tiny_recipe_dict, "train": {**tiny_recipe_dict["train"], "epochs": 1, "threads": 1}}
    run = run_recipe(raw, tmp_path / "run", log=None)
    assert torch.get_num_threads() == 2
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["threads"] == 1
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(raw))
    a = evaluate_checkpoint(run.best_path, tmp_path / "a", str(tmp_path / "data.yaml"), "val,test", log=None)
    b = evaluate_checkpoint(run.best_path, tmp_path / "b", raw, ("val", "test"), log=None)
    assert a["val"]["acc"] == b["val"]["acc"] and a["test"]["auc"] == b["test"]["auc"]
    assert evaluate_checkpoint(run.best_path, tmp_path / "c", splits="val", log=None)["val"]["n"] == 16
    with pytest.raises(EdgeKDError, match="data_recipe: expected a Recipe .*, a recipe file path or a dict, "
                                          "got int"):
        evaluate_checkpoint(run.best_path, tmp_path / "d", 7)


def test_export_arguments_take_a_profile_name_and_one_format_as_text():
    """export_checkpoint(profile="cpu-onnx-fp32") had been an AttributeError, formats="onnx" the formats o, n, n, x."""
    from edgekd.export.run import export_arguments

    profile, plan = export_arguments("cpu-onnx-fp32", "onnx", "fp32")
    assert profile.formats == ["onnx"] and [(f.name, p) for f, p in plan] == [("onnx", "fp32")]
    assert [(f.name, p) for f, p in export_arguments(None, ["onnx", "openvino"], ["fp32"])[1]] == [
        ("onnx", "fp32"), ("openvino", "fp32")]
    assert [(f.name, p) for f, p in export_arguments(None, "onnx, openvino", "fp32")[1]] == [
        ("onnx", "fp32"), ("openvino", "fp32")]  # as the CLI's --format takes them
