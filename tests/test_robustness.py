"""Corruptions (deterministic, growing with severity, shape/dtype kept) and the corruption evaluation."""

from __future__ import annotations

import numpy as np
import pytest

from edgekd.errors import EdgeKDError
from edgekd.robustness.corruptions import CORRUPTIONS, SEVERITIES, corrupt


def textured(size: int = 28, channels: int = 1, seed: int = 0) -> np.ndarray:
    """A mid-grey image with smooth structure and fine texture (every corruption has something to change)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    img = 100 + 60 * np.sin(xx / 3.0) * np.cos(yy / 4.0) + rng.integers(0, 30, (size, size))
    return np.repeat(img.astype(np.uint8)[..., None], channels, axis=-1)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
@pytest.mark.parametrize("channels", [1, 3])
def test_corruption_is_deterministic_and_grows_with_severity(name, channels):
    img = textured(28, channels)
    changes = []
    for severity in SEVERITIES:
        out = corrupt(img, name, severity, seed=3, index=7)
        assert out.shape == img.shape and out.dtype == np.uint8
        assert np.array_equal(out, corrupt(img.copy(), name, severity, seed=3, index=7))
        changes.append(np.abs(out.astype(np.float64) - img).mean())
    assert changes[0] > 0.5, f"{name} severity 1 barely changes the image"
    assert all(b > a for a, b in zip(changes, changes[1:])), f"{name}: change per severity {changes}"


@pytest.mark.parametrize("name", ["gaussian_noise", "speckle_noise", "motion_blur"])
def test_random_corruptions_depend_on_seed_and_image_index(name):
    img = textured(32)
    a = corrupt(img, name, 3, seed=0, index=0)
    assert not np.array_equal(a, corrupt(img, name, 3, seed=1, index=0))
    assert not np.array_equal(a, corrupt(img, name, 3, seed=0, index=1))


def test_corrupt_accepts_2d_and_rejects_bad_input():
    img = textured(16)[..., 0]
    assert corrupt(img, "pixelate", 5).shape == (16, 16)
    with pytest.raises(EdgeKDError, match="unknown corruption 'fog'"):
        corrupt(img, "fog", 1)
    with pytest.raises(EdgeKDError, match="1..5"):
        corrupt(img, "contrast", 6)
    with pytest.raises(EdgeKDError, match="uint8"):
        corrupt(img.astype(np.float32), "contrast", 1)
