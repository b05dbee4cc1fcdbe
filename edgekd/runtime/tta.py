"""Test-time augmentation views (the KD-OCT set) on uint8 model-size images, in numpy + Pillow.

Views apply after resize + center crop and before normalization (the bundle contract), so every view of an image
has the model's input size and all of them go through one batched inference call.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from PIL import Image

from edgekd.errors import EdgeKDError
from edgekd.runtime.bundle import TTA_VIEWS
from edgekd.runtime.preprocess import center_crop, resize_bilinear

DEFAULT_CENTER_CROP_FRACTION = 0.875


def _pil(arr: np.ndarray) -> Image.Image:
    if arr.shape[-1] == 1:
        return Image.fromarray(np.ascontiguousarray(arr[..., 0]), mode="L")
    return Image.fromarray(np.ascontiguousarray(arr), mode="RGB")


def _from_pil(img: Image.Image, channels: int) -> np.ndarray:
    arr = np.asarray(img)
    return arr[..., None] if channels == 1 else arr


def rotate(arr: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate counter-clockwise about the center, bilinear, same size, corners filled with 0 (as torchvision)."""
    fill = 0 if arr.shape[-1] == 1 else (0, 0, 0)
    img = _pil(arr).rotate(degrees, resample=Image.Resampling.BILINEAR, expand=False, fillcolor=fill)
    return _from_pil(img, arr.shape[-1])


def center_zoom(arr: np.ndarray, fraction: float) -> np.ndarray:
    """Crop the central round(f*H) x round(f*W) region and resize it back to H x W (bilinear)."""
    h, w = arr.shape[:2]
    ch, cw = max(1, int(round(fraction * h))), max(1, int(round(fraction * w)))
    return resize_bilinear(center_crop(arr, ch, cw), h, w)


def view_function(name: str, center_crop_fraction: float = DEFAULT_CENTER_CROP_FRACTION) -> Callable[[np.ndarray], np.ndarray]:
    if name == "original":
        return lambda a: a
    if name == "hflip":
        return lambda a: a[:, ::-1]
    if name == "vflip":
        return lambda a: a[::-1]
    if name == "center_crop":
        return lambda a: center_zoom(a, center_crop_fraction)
    if name in ("rot+15", "rot-15"):
        degrees = 15.0 if name == "rot+15" else -15.0
        return lambda a: rotate(a, degrees)
    raise EdgeKDError(f"unknown TTA view '{name}' (use {', '.join(TTA_VIEWS)})")


class TTAViews:
    """A configured list of views: `views(img)` -> uint8 (V, H, W, C) stack, in the configured order."""

    def __init__(self, names: Sequence[str], center_crop_fraction: float = DEFAULT_CENTER_CROP_FRACTION):
        names = list(names)
        if not names:
            raise EdgeKDError("TTA needs at least one view")
        if len(set(names)) != len(names):
            raise EdgeKDError(f"TTA views repeat a name: {names}")
        if not 0 < center_crop_fraction <= 1:
            raise EdgeKDError(f"TTA center_crop_fraction must be in (0, 1], got {center_crop_fraction}")
        self.names = names
        self.functions = [view_function(n, center_crop_fraction) for n in names]

    def __len__(self) -> int:
        return len(self.names)

    def __call__(self, arr: np.ndarray) -> np.ndarray:
        return np.stack([f(arr) for f in self.functions])
