"""Experiment tracking: TensorBoard event files and W&B offline runs written by the trainer, read back."""

from __future__ import annotations

import csv
import importlib.util
import json
import re

import pytest

from edgekd.errors import EdgeKDError
from edgekd.recipe import recipe_from_dict
from edgekd.train.run import train_recipe


def _log_rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_tensorboard_scalars_equal_log_csv_and_hold_lr_and_confusion(tiny_recipe_dict, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    raw = {**tiny_recipe_dict, "tracking": {"tensorboard": True},
           "train": {**tiny_recipe_dict["train"], "epochs": 3,
                     "optimizer": {"name": "adam", "lr": 0.01, "head_lr": 0.002}}}
    run = train_recipe(recipe_from_dict(raw), tmp_path / "run", log=lambda *_: None)
    rows = _log_rows(run.out / "log.csv")
    events = EventAccumulator(str(run.out / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    tags = events.Tags()
    for key in ("train_loss", "val_loss", "val_acc", "val_auc", "epoch_seconds"):
        logged = events.Scalars(key)
        assert [e.step for e in logged] == [int(r["epoch"]) for r in rows]
        assert [e.value for e in logged] == pytest.approx([float(r[key]) for r in rows], rel=1e-6)
    # Two param groups (backbone lr, head lr): both are logged, and log.csv's lr is the last group's.
    assert {"lr/backbone", "lr/head"} <= set(tags["scalars"])
    assert [e.value for e in events.Scalars("lr/backbone")] == pytest.approx([0.01] * 3)
    assert [e.value for e in events.Scalars("lr/head")] == pytest.approx([float(r["lr"]) for r in rows])
    images = events.Images("val/confusion_matrix")
    assert [i.step for i in images] == [1, 2, 3] and images[0].width > 0
    assert images[0].encoded_image_string.startswith(b"\x89PNG")


def test_tracking_does_not_change_the_recipe_digest(tiny_recipe_dict):
    plain = recipe_from_dict(tiny_recipe_dict)
    tracked = recipe_from_dict({**tiny_recipe_dict, "tracking": {"tensorboard": "somewhere"}})
    assert plain.digest() == tracked.digest()
    assert tracked.to_dict()["tracking"]["tensorboard"] == "somewhere"


def test_missing_tracking_package_is_a_one_line_error_naming_the_extra(tiny_recipe_dict, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    recipe = recipe_from_dict({**tiny_recipe_dict, "tracking": {"wandb": {"project": "p"}}})
    with pytest.raises(EdgeKDError, match=r"tracking.wandb: .*pip install 'edgekd\[wandb\]'") as err:
        train_recipe(recipe, tmp_path / "run", log=lambda *_: None)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run" / "best.pt").exists()


def test_wandb_offline_run_directory_holds_the_epochs(tiny_recipe_dict, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    # No network, nothing outside tmp_path: offline mode, W&B's own folders and settings under the test's.
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path / "wandb-home"),
                       "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "WANDB_CACHE_DIR": str(tmp_path / "cache"),
                       "WANDB_DATA_DIR": str(tmp_path / "data"), "WANDB_DISABLE_GIT": "true",
                       "WANDB_DISABLE_CODE": "true"}.items():
        monkeypatch.setenv(key, value)
    raw = {**tiny_recipe_dict, "tracking": {"wandb": {"project": "edgekd-test", "mode": "offline"}}}
    run = train_recipe(recipe_from_dict(raw), tmp_path / "run", log=lambda *_: None)
    runs = list((run.out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = list(runs[0].glob("run-*.wandb"))
    assert len(records) == 1
    # The run's transaction log (read by `wandb sync`): each epoch's history holds the metric as log.csv has it,
    # as W&B's HistoryItem(key, value_json) protobuf fields.
    data = records[0].read_bytes()
    rows = _log_rows(run.out / "log.csv")
    assert len(rows) == 2
    for r in rows:
        for key in ("val_loss", "train_loss"):
            value = json.dumps(float(r[key])).encode()
            assert re.search(re.escape(key.encode()) + rb"[\s\S]{1,4}" + re.escape(value), data), (key, value)
    images = list((runs[0] / "files" / "media" / "images" / "val").glob("confusion_matrix_*.png"))
    assert len(images) == len(rows)


def _offline_wandb(monkeypatch, tmp_path):
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path / "wandb-home"),
                       "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "WANDB_CACHE_DIR": str(tmp_path / "cache"),
                       "WANDB_DATA_DIR": str(tmp_path / "data"), "WANDB_DISABLE_GIT": "true",
                       "WANDB_DISABLE_CODE": "true"}.items():
        monkeypatch.setenv(key, value)


def test_interrupted_run_is_failed_in_wandb_and_resume_goes_on_in_the_same_runs(tiny_recipe_dict, tmp_path,
                                                                                  monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    from edgekd.train import tracking
    from edgekd.train.trainer import Trainer

    _offline_wandb(monkeypatch, tmp_path)
    closed, real_close = [], tracking.WandbSink.close
    monkeypatch.setattr(tracking.WandbSink, "close", lambda self, code=0: (closed.append(code), real_close(self, code)))
    real_epoch = Trainer.train_epoch

    def stop_at_second(self, epoch, *args, **kwargs):
        if epoch == 1:
            raise KeyboardInterrupt
        return real_epoch(self, epoch, *args, **kwargs)

    raw = {**tiny_recipe_dict, "train": {**tiny_recipe_dict["train"], "epochs": 3},
           "tracking": {"tensorboard": True, "wandb": {"project": "edgekd-test", "mode": "offline"}}}
    out = tmp_path / "run"
    monkeypatch.setattr(Trainer, "train_epoch", stop_at_second)
    with pytest.raises(KeyboardInterrupt):
        train_recipe(recipe_from_dict(raw), out, log=lambda *_: None)
    assert closed == [130]  # W&B records the run as failed, not finished
    monkeypatch.setattr(Trainer, "train_epoch", real_epoch)
    train_recipe(recipe_from_dict(raw), out, resume=True, log=lambda *_: None)
    assert closed == [130, 0]
    run_id = (out / "wandb_run_id").read_text().strip()
    runs = sorted((out / "wandb").glob("offline-run-*"))
    # One W&B run, two sessions (W&B adds -1 to a second folder of the same id started within the same second).
    assert len(runs) == 2 and all(re.search(rf"-{run_id}(-\d+)?$", r.name) for r in runs)
    events = sorted((out / "tensorboard").iterdir())
    # A finished run resumed trains nothing and opens no tracker (it had added an empty W&B run and event file).
    train_recipe(recipe_from_dict(raw), out, resume=True, log=lambda *_: None)
    assert closed == [130, 0] and len(list((out / "wandb").glob("offline-run-*"))) == 2
    assert sorted((out / "tensorboard").iterdir()) == events


def test_a_fold_or_task_under_an_explicit_tracking_path_gets_its_own_folder_and_wandb_run(tiny_recipe_dict, tmp_path,
                                                                                          monkeypatch):
    pytest.importorskip("tensorboard")
    from edgekd.train.tracking import Tracker, WandbSink

    tb = tmp_path / "tb"
    made = []
    monkeypatch.setattr(WandbSink, "__init__", lambda self, cfg, recipe, out, part=None, resume=False:
                        made.append((cfg.name or recipe.name, part)))
    fold = recipe_from_dict({**tiny_recipe_dict, "role": "student",
                             "data": {**tiny_recipe_dict["data"], "folds": 3, "fold": 2},
                             "tracking": {"tensorboard": str(tb), "wandb": {"project": "p"}}})
    tracker = Tracker.from_recipe(fold, tmp_path / "out" / "fold2" / "student")
    assert tracker.sinks[0].log_dir == tb / "fold2" / "student"
    tracker.sinks[0].close()
    task = Tracker.from_recipe(fold.model_copy(update={"data": fold.data.model_copy(update={"fold": None})}),
                               tmp_path / "out", part="task2_chest")
    assert task.sinks[0].log_dir == tb / "task2_chest"
    task.sinks[0].close()
    assert made == [(fold.name, "fold2/student"), (fold.name, "task2_chest")]
    plain = Tracker.from_recipe(recipe_from_dict({**tiny_recipe_dict, "tracking": {"tensorboard": str(tb)}}), tmp_path)
    assert plain.sinks[0].log_dir == tb  # a single run: the path as given
    plain.close()


def test_tensorboard_path_that_is_a_file_or_empty_is_refused(tiny_recipe_dict, tmp_path):
    (tmp_path / "x.png").write_bytes(b"x")
    recipe = recipe_from_dict({**tiny_recipe_dict, "tracking": {"tensorboard": str(tmp_path / "x.png")}})
    with pytest.raises(EdgeKDError, match=r"^tracking.tensorboard: .*x.png is a file"):
        train_recipe(recipe, tmp_path / "run", log=lambda *_: None)
    assert not (tmp_path / "run" / "best.pt").exists()
    from edgekd.recipe import refuse_new_run_traps

    with pytest.raises(EdgeKDError, match="tracking.tensorboard: an empty path"):
        refuse_new_run_traps(recipe_from_dict({**tiny_recipe_dict, "tracking": {"tensorboard": " "}}), "r")


class _Sink:
    def __init__(self, label, fail_log=False, fail_close=False):
        self.label, self.fail_log, self.fail_close = label, fail_log, fail_close
        self.epochs, self.closed = [], []

    def log_epoch(self, record):
        if self.fail_log:
            raise OSError(28, "No space left on device")
        self.epochs.append(record.epoch)

    def close(self, exit_code=0):
        self.closed.append(exit_code)
        if self.fail_close:
            raise RuntimeError("service gone\nmore lines")


def test_a_failing_sink_is_warned_and_dropped_and_training_goes_on(tiny_recipe_dict, tmp_path, monkeypatch):
    """A full disk under TensorBoard or W&B's service had ended the training after the epoch's checkpoint."""
    from edgekd.train import tracking

    full, fine = _Sink("TensorBoard", fail_log=True), _Sink("W&B")
    monkeypatch.setattr(tracking.Tracker, "from_recipe",
                        classmethod(lambda cls, *a, log=print, **k: cls([full, fine], log)))
    lines = []
    raw = {**tiny_recipe_dict, "train": {**tiny_recipe_dict["train"], "epochs": 2}}
    run = train_recipe(recipe_from_dict(raw), tmp_path / "run", log=lines.append)
    assert (run.out / "best.pt").is_file() and len(_log_rows(run.out / "log.csv")) == 2
    warned = [line for line in lines if "warning: TensorBoard failed" in line]
    assert len(warned) == 1 and "at epoch 1 (OSError: [Errno 28] No space left on device)" in warned[0]
    assert full.closed == [1] and fine.epochs == [1, 2] and fine.closed == [0]


def test_closing_goes_on_past_a_failing_sink_and_a_failed_start_closes_the_open_ones(tiny_recipe_dict, tmp_path,
                                                                                     monkeypatch):
    from edgekd.train import tracking

    lines = []
    first, second = _Sink("TensorBoard", fail_close=True), _Sink("W&B")
    tracker = tracking.Tracker([first, second], lines.append)
    tracker.close(1)
    assert first.closed == [1] and second.closed == [1]  # the W&B run is finished though TensorBoard's close failed
    assert lines == ["warning: closing TensorBoard failed (RuntimeError: service gone)"]
    tracker.close()
    assert second.closed == [1]  # closed once
    opened = _Sink("TensorBoard")
    monkeypatch.setattr(tracking, "TensorBoardSink", lambda log_dir: opened)
    monkeypatch.setattr(tracking, "require_packages", lambda tracking_cfg: None)

    def no_service(self, *a, **k):
        raise ConnectionError("W&B is unreachable")
    monkeypatch.setattr(tracking.WandbSink, "__init__", no_service)
    recipe = recipe_from_dict({**tiny_recipe_dict, "tracking": {"tensorboard": True, "wandb": {"project": "p"}}})
    with pytest.raises(ConnectionError):
        tracking.Tracker.from_recipe(recipe, tmp_path)
    assert opened.closed == [1]  # the writer opened before W&B failed is not left open


def test_an_empty_wandb_id_file_starts_a_new_run_id(tiny_recipe_dict, tmp_path, monkeypatch):
    from edgekd.train import tracking

    seen = []
    fake = type("wandb", (), {"init": staticmethod(lambda **kw: seen.append(kw["id"]))})
    monkeypatch.setitem(__import__("sys").modules, "wandb", fake)
    (tmp_path / tracking.WANDB_ID_FILE).write_text(" \n")
    recipe = recipe_from_dict({**tiny_recipe_dict, "tracking": {"wandb": {"project": "p"}}})
    tracking.WandbSink(recipe.tracking.wandb, recipe, tmp_path, resume=True)
    assert re.fullmatch(r"[0-9a-f]{16}", seen[0])  # not "" (W&B's own choice for an empty id)
    assert (tmp_path / tracking.WANDB_ID_FILE).read_text() == seen[0] + "\n"
    tracking.WandbSink(recipe.tracking.wandb, recipe, tmp_path, resume=True)
    assert seen[1] == seen[0]
