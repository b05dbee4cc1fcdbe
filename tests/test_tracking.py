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
