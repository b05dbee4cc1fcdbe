"""Shared fixtures: tiny synthetic datasets, tiny recipes, the ../shared data (skipped when absent)."""

from __future__ import annotations

import os

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


@pytest.fixture
def tiny_recipe_dict(tiny_npz) -> dict:
    """A recipe that trains edgekd_cnn_tiny for 2 epochs on 48 images of 16 px (about a second)."""
    return {
        "name": "tiny", "seed": 0,
        "data": {"source": "medmnist", "path": str(tiny_npz), "image_size": 16, "channels": 3, "batch_size": 8},
        "model": {"name": "edgekd_cnn_tiny"},
        "train": {"epochs": 2, "optimizer": {"name": "adam", "lr": 0.01}, "scheduler": {"name": "none"},
                  "monitor": "val_loss", "monitor_mode": "min"},
    }


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
