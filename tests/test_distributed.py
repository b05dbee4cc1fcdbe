"""Multi-process training: `torchrun -m edgekd train` with 2 CPU processes (gloo) keeps the ranks identical."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import write_npz
from edgekd.errors import EdgeKDError
from edgekd.train import distributed


def test_launch_env_reads_torchrun_variables(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.launch_env() is None and distributed.is_main_process()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.launch_env() is None
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.launch_env() == distributed.LaunchEnv(rank=3, world_size=4, local_rank=1)
    assert not distributed.is_main_process()
    monkeypatch.delenv("RANK")
    with pytest.raises(EdgeKDError, match="launch multi-process training with torchrun"):
        distributed.launch_env()


def test_weights_digest_sees_parameters_and_buffers():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    first = distributed.weights_digest(model)
    model[1].running_mean += 1e-6
    assert distributed.weights_digest(model) != first
    model[1].running_mean -= 1e-6
    model[0].weight.data[0, 0, 0, 0] += 1e-6
    assert distributed.weights_digest(model) != first


@pytest.mark.slow
def test_two_cpu_processes_train_identical_weights(tmp_path):
    """2 ranks distill a student (KL + CE + feature KD through an adapter that lives outside the model), each on half
    of the data per epoch (its shard of the balanced sampler's draw); gradients all-reduced (DDP for the model, by hand for the adapter),
    BN buffers from rank 0: both end with the same weights as rank 0's last.pt, and only rank 0 wrote checkpoints."""
    from edgekd.recipe import recipe_from_dict
    from edgekd.train.run import train_recipe

    npz = write_npz(tmp_path / "tiny.npz", n=(50, 16, 16))
    recipe = {"name": "ddp", "seed": 0,
              "data": {"source": "medmnist", "path": str(npz), "image_size": 16, "channels": 3, "batch_size": 8},
              "augment": [{"RandomHorizontalFlip": {"p": 0.5}}],
              "model": {"name": "edgekd_cnn_tiny"},
              "train": {"epochs": 2, "optimizer": {"name": "adamw", "lr": 0.01}, "scheduler": {"name": "cosine"},
                        "monitor": "val_loss", "monitor_mode": "min", "device": "cpu"}}
    teacher = train_recipe(recipe_from_dict({**recipe, "name": "teacher", "train": {**recipe["train"], "epochs": 1}}),
                           tmp_path / "teacher", log=lambda *_: None).best_path
    recipe["data"]["balanced_sampler"] = True  # the student's: sharded across the ranks
    recipe["distill"] = {"teacher": str(teacher), "terms": [
        {"kind": "kl", "weight": 0.5, "temperature": 4}, {"kind": "ce", "weight": 0.5},
        {"kind": "feature_mse", "weight": 1.0, "student": "stages.0", "teacher": "stages.1"}]}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    debug = tmp_path / "ranks"
    env = {**os.environ, "OMP_NUM_THREADS": "1", distributed.DEBUG_DIR_ENV: str(debug)}
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "edgekd", "train", str(tmp_path / "tiny.yaml"), "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((debug / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    assert ranks[0]["objective_sha256"] is not None  # the feature-KD adapter is trained ...
    assert ranks[0]["objective_sha256"] == ranks[1]["objective_sha256"]  # ... and stays in sync
    # Each rank saw its own half (its shard of the balanced draw of 50, 2 x 25) every epoch, not the whole set.
    # (25 per rank in batches of 8 would end in a batch of one image, which sits the epoch out: 24)
    assert [r["samples_seen"] for r in ranks] == [2 * (math.ceil(50 / 2) - 1)] * 2
    assert ranks[0]["checkpoints_written"] >= 2 and ranks[1]["checkpoints_written"] == 0
    # Each rank's own random stream: the global torch state every augmentation and dropout draw comes from (the
    # loader has no workers here) starts each epoch elsewhere per rank; it was the same, and the k-th image of each
    # shard was flipped alike
    assert None not in (ranks[0]["random_state_sha256"], ranks[1]["random_state_sha256"])
    assert ranks[0]["random_state_sha256"] != ranks[1]["random_state_sha256"]

    from edgekd.train.checkpoint import model_from_checkpoint

    last, ckpt = model_from_checkpoint(tmp_path / "run" / "last.pt")
    assert distributed.weights_digest(last) == ranks[0]["weights_sha256"]
    assert ckpt["trainer"]["epoch"] == 2 and len(ckpt["trainer"]["history"]) == 2
    assert proc.stdout.count("best checkpoint") == 1  # rank 1 printed no table
    assert proc.stderr.count("epoch 2/2") == 1  # nor epoch logs
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2 and metrics["test"]["n"] == 16
    assert metrics["processes"] == 2 and ckpt["trainer"]["world_size"] == 2
    # each term's epoch mean over both ranks' shards, beside the weighted sum
    import csv

    for row in csv.DictReader((tmp_path / "run" / "log.csv").open()):
        kl, ce, mse = (float(row[k]) for k in ("train_0_kl", "train_1_ce", "train_2_feature_mse"))
        assert float(row["train_loss"]) == pytest.approx(0.5 * kl + 0.5 * ce + mse, rel=1e-5)


def test_a_failing_rank_is_one_error_line_and_the_other_says_it_stopped(tmp_path):
    """rank 0 cannot write best.pt (a folder is in its place): its error is the one line that names the cause; rank
    1, whose collective lost its peer, says it stopped (it printed a gloo RuntimeError, which torchrun then named
    as the root cause)."""
    npz = write_npz(tmp_path / "tiny.npz", n=(20, 8, 8))
    recipe = {"name": "ddp-fail", "seed": 0,
              "data": {"source": "medmnist", "path": str(npz), "image_size": 16, "channels": 3, "batch_size": 8},
              "model": {"name": "edgekd_cnn_tiny"}, "train": {"epochs": 1, "device": "cpu"}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    (tmp_path / "run" / "best.pt").mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "edgekd", "train", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert any("best.pt" in line and "error: rank" not in line for line in errors), proc.stderr[-3000:]
    assert not any("RuntimeError" in line or "gloo" in line for line in errors), errors
    assert all("best.pt" in line or line == "error: rank 1: stopped: another rank failed (its error says why)"
               for line in errors), errors


def test_rank_prefix_and_peer_failure(monkeypatch):
    from edgekd.cli.process import peer_failure, rank_prefix

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert rank_prefix() == "rank 1: "
    assert peer_failure(RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [::1]:1234"))
    assert peer_failure(ValueError("bad value")) is None
    assert peer_failure(ConnectionResetError(104, "Connection reset by peer")) is None  # a download's, say
    from edgekd.cli.console import STATE

    monkeypatch.setitem(STATE, "on_interrupt", lambda: "resume it: edgekd train r.yaml --out o --resume")
    assert peer_failure(RuntimeError("Connection closed by peer")) == "stopped: another rank failed (its error says why)"
    monkeypatch.setenv("RANK", "0")
    assert rank_prefix() == ""
    assert peer_failure(RuntimeError("Connection closed by peer")) == (  # a rank killed by SIGKILL says nothing
        "stopped: another rank failed (its error says why); resume it: edgekd train r.yaml --out o --resume")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert peer_failure(RuntimeError("Connection closed by peer")) is None
