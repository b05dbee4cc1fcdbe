"""Shared fixtures and helpers: tiny synthetic datasets and recipes, random pixels, a plain ONNX export, the
`python -m edgekd` subprocess, the ../shared data (skipped when absent)."""

from __future__ import annotations

import os
import subprocess
import sys

# Tiny models on tiny images: one thread is faster than two fighting for the same cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def random_pixels(shape: tuple, seed: int = 0, high: int = 256, dtype=np.uint8) -> np.ndarray:
    """Uniform random pixels in [0, high) from their own seeded generator (independent of test order)."""
    return np.random.default_rng(seed).integers(0, high, size=shape, dtype=dtype)


def make_images(n: int, size: int = 16, channels: int = 1, seed: int = 0, classes: int = 2):
    """Learnable images: class c has a bright square at a class-specific position, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    rng.shuffle(labels)
    imgs = rng.integers(0, 60, size=(n, size, size, channels), dtype=np.uint8)
    q = size // 2
    for i, c in enumerate(labels):
        r, col = divmod(int(c) % 4, 2)
        imgs[i, r * q:(r + 1) * q, col * q:(col + 1) * q] += 150
    return imgs, labels


def write_npz(path: Path, n=(48, 16, 16), size=16, channels=1, classes=2, seed=0) -> Path:
    arrays = {}
    for split, count, s in zip(("train", "val", "test"), n, (seed, seed + 1, seed + 2)):
        imgs, labels = make_images(count, size, channels, s, classes)
        arrays[f"{split}_images"] = imgs[..., 0] if channels == 1 else imgs
        arrays[f"{split}_labels"] = labels[:, None].astype(np.uint8)
    np.savez(path, **arrays)
    return path


@pytest.fixture
def tiny_npz(tmp_path) -> Path:
    return write_npz(tmp_path / "tiny.npz")


def tiny_recipe(npz: Path, name: str = "tiny", image_size: int = 16, batch_size: int = 8, epochs: int = 2,
                monitor: str | None = "val_loss", monitor_mode: str | None = "min", **sections) -> dict:
    """A recipe dict: edgekd_cnn_tiny on a medmnist-style npz, Adam lr 0.01 without a schedule. `monitor=None`
    leaves train.monitor at its default; other keyword arguments are top-level sections, a dict merged into the
    one above it (`model={"kwargs": ...}`, `continual={...}`, `role="student"`)."""
    raw = {
        "name": name, "seed": 0,
        "data": {"source": "medmnist", "path": str(npz), "image_size": image_size, "channels": 3,
                 "batch_size": batch_size},
        "model": {"name": "edgekd_cnn_tiny"},
        "train": {"epochs": epochs, "optimizer": {"name": "adam", "lr": 0.01}, "scheduler": {"name": "none"}},
    }
    if monitor is not None:
        raw["train"]["monitor"] = monitor
        if monitor_mode is not None:
            raw["train"]["monitor_mode"] = monitor_mode
    for key, value in sections.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and key in raw else value
    return raw


@pytest.fixture
def tiny_recipe_dict(tiny_npz) -> dict:
    """A recipe that trains edgekd_cnn_tiny for 2 epochs on 48 images of 16 px (about a second)."""
    return tiny_recipe(tiny_npz)


def write_image_folder(root: Path, n_per_class: int = 6, size: int = 16, classes=("a", "b")) -> Path:
    for ci, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        imgs, _ = make_images(n_per_class, size, 3, seed=ci, classes=1)
        for i, arr in enumerate(imgs):
            Image.fromarray(arr).save(d / f"{name}_{i}.png")
    return root


@pytest.fixture
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED


def export_plain_onnx(model: torch.nn.Module, path: Path, example: torch.Tensor, input_name: str = "input") -> Path:
    """torch.onnx's TorchScript exporter with a dynamic batch axis and the bundle's io names, none of edgekd's
    export code: a reference ONNX file for runtime tests, or a foreign one (another input name) to be refused."""
    torch.onnx.export(model, (example,), str(path), input_names=[input_name], output_names=["logits"],
                      dynamic_axes={input_name: {0: "batch"}, "logits": {0: "batch"}}, opset_version=18, dynamo=False)
    return path


def run_edgekd(*args, cwd=None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m edgekd ARGS` in a minimal environment (one OpenMP thread, PATH only), output captured as text."""
    return subprocess.run([sys.executable, "-m", "edgekd", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
