"""Crash safety: `kill -9` mid-training, then `edgekd train --resume` ends exactly like an uninterrupted run."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import write_npz

EPOCHS = 5


def _command(recipe: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "edgekd", "train", str(recipe), "--out", str(out), *extra]


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(var, None)
    return env


def _last_epoch(out: Path) -> int:
    """The epoch recorded in last.pt (0 while there is none). last.pt is replaced atomically, never half-written."""
    from edgekd.train.checkpoint import load_checkpoint

    if not (out / "last.pt").is_file():
        return 0
    return int(load_checkpoint(out / "last.pt")["trainer"]["epoch"])


def _history(out: Path) -> list[dict[str, str]]:
    rows = list(csv.DictReader((out / "log.csv").open()))
    for r in rows:
        r.pop("epoch_seconds")  # wall time differs; everything else must not
    return rows


@pytest.mark.slow
def test_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path):
    npz = write_npz(tmp_path / "d.npz", n=(640, 32, 32))
    recipe = {"name": "resume", "seed": 3,
              "data": {"source": "medmnist", "path": str(npz), "image_size": 16, "channels": 3, "batch_size": 8},
              # Random augmentation, shuffling, AdamW moments and a cosine schedule: all must be restored or replayed.
              "augment": [{"RandomAffine": {"degrees": 10, "translate": [0.1, 0.1]}},
                          {"RandomHorizontalFlip": {"p": 0.5}}],
              "model": {"name": "edgekd_cnn_tiny", "drop_rate": 0.2},
              "train": {"epochs": EPOCHS, "optimizer": {"name": "adamw", "lr": 0.005, "weight_decay": 0.01},
                        "scheduler": {"name": "cosine", "warmup_epochs": 1}, "monitor": "val_loss",
                        "monitor_mode": "min", "device": "cpu"}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))

    full = subprocess.run(_command(path, tmp_path / "full"), env=_env(), capture_output=True, text=True, timeout=900)
    assert full.returncode == 0, full.stderr[-2000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(_command(path, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while _last_epoch(out) < 1 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.1)  # into the next epoch
        assert proc.poll() is None, "training finished before it could be killed: make the epochs longer"
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = _last_epoch(out)
    assert 1 <= done < EPOCHS
    assert not (out / "metrics.json").exists()  # the killed run never got to its reports

    (out / ".last.pt.crashed.tmp").write_bytes(b"half a checkpoint")  # as if killed inside torch.save
    resumed = subprocess.run(_command(path, out, "--resume"), env=_env(), capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {out / 'last.pt'} after epoch {done} (training goes on at epoch {done + 1})" in resumed.stderr
    assert f"epoch {done}/{EPOCHS} " not in resumed.stderr  # finished epochs are not trained again

    assert _history(out) == _history(tmp_path / "full")
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (out, tmp_path / "full"))
    for key in ("val", "test", "best_epoch", "best_value", "epochs_run"):
        assert a[key] == b[key], key
    assert _last_epoch(out) == EPOCHS
    assert not list(out.glob(".*.tmp"))


def test_a_run_from_before_the_following_resize_is_told_how_to_resume(tmp_path):
    """--set data.image_size now takes a recipe file's data.resize along; a run started before kept the file's
    resize, and its resume failed on "data.resize: 34 -> 17" with advice the user had followed."""
    from edgekd.errors import EdgeKDError
    from edgekd.pipeline import run_recipe
    from edgekd.recipe import load_recipe
    from conftest import tiny_recipe

    raw = tiny_recipe(write_npz(tmp_path / "t.npz"), epochs=2, image_size=32)
    raw["data"]["resize"] = 34
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    before = load_recipe(tmp_path / "r.yaml", ["data.image_size=16", "data.resize=34"])  # as such a run had it
    run_recipe(before, tmp_path / "run", log=None)
    now = load_recipe(tmp_path / "r.yaml", ["data.image_size=16"])
    assert now.data.resize == 17
    with pytest.raises(EdgeKDError, match=r"\(data.resize: 34 -> 17\); resume with the same recipe and --set values "
                                          r"\(a run started before data.resize followed --set data.image_size, "
                                          r"2026-12-07: add --set data.resize=34\)"):
        run_recipe(now, tmp_path / "run", resume=True, log=None)
