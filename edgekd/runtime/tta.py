"""Test-time augmentation views (the KD-OCT set) on uint8 model-size images, in numpy.

Views apply after resize + center crop and before normalization (the bundle contract), so every view of an image
has the model's input size and all of them go through one batched inference call.

The two resampling views follow torchvision's tensor geometry (what the training side and the export's parity
check use): the center crop view is `center_crop` then a bilinear resize (align_corners=False), the rotations are
`F.rotate(..., BILINEAR, fill=0)` (grid_sample with zero padding, the rim blended with the fill through the
resampled coverage mask). Both are fixed linear maps of the image for a given size, so each is precomputed once per
image size as 4 source pixels + 4 weights per output pixel and applied with one gather (measured: the 5 KD-OCT
views of a 28 px gray image 110 us through Pillow, 50 us this way), which matters when 5 views share one call.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from edgekd.errors import EdgeKDError
from edgekd.formats import TTA_VIEWS

DEFAULT_CENTER_CROP_FRACTION = 0.875
WEIGHT_GRID = 2.0 ** 14


class BilinearMap:
    """A precomputed bilinear resampling of (H, W) images: output pixel i = rint(sum_k weight[i, k] * src[index[i, k]])
    (index H*W is a zero pixel, for samples outside the image)."""

    def __init__(self, height: int, width: int, src_y: np.ndarray, src_x: np.ndarray, zero_outside: bool,
                 coverage: bool = False):
        """`src_y`, `src_x`: (H, W) source coordinates (pixel-center units) of every output pixel. zero_outside:
        neighbours outside the image read 0 (grid_sample's zero padding); else coordinates are clamped to the edge."""
        self.shape = (height, width)
        y0, x0 = np.floor(src_y), np.floor(src_x)
        ly, lx = src_y - y0, src_x - x0
        y0, x0 = y0.astype(np.int64), x0.astype(np.int64)
        index, weight = [], []
        for dy, wy in ((0, 1.0 - ly), (1, ly)):
            for dx, wx in ((0, 1.0 - lx), (1, lx)):
                yy, xx = y0 + dy, x0 + dx
                inside = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
                if not zero_outside:
                    yy, xx, inside = np.clip(yy, 0, height - 1), np.clip(xx, 0, width - 1), np.ones_like(inside)
                index.append(np.where(inside, yy * width + xx, height * width))
                weight.append(np.where(inside, wy * wx, 0.0))
        self.index = np.stack(index, axis=-1).reshape(-1, 4)
        w = np.stack(weight, axis=-1).reshape(-1, 4)
        if coverage:
            # torchvision's fill blending: the image resampled with zero padding, times the resampled all-ones
            # mask (the coverage), folded into the weights.
            w = w * w.sum(axis=1, keepdims=True)
        # Weights on a 2^-14 grid: with 8-bit pixels every product and every partial sum is exact in float32, so
        # the view is the same bits whatever the summation order (numpy here, a compiled model's gather + sum).
        self.weight = (np.rint(w * WEIGHT_GRID) / WEIGHT_GRID).astype(np.float32)

    def __call__(self, arr: np.ndarray) -> np.ndarray:
        h, w, c = arr.shape
        if (h, w) != self.shape:
            raise EdgeKDError(f"TTA map built for {self.shape[0]}x{self.shape[1]} images, got {h}x{w}")
        src = np.zeros((c, h * w + 1), dtype=np.float32)  # channel-major, plus the zero pixel
        src[:, :-1] = arr.reshape(h * w, c).T
        out = np.einsum("cpk,pk->pc", np.take(src, self.index, axis=1), self.weight)  # 4 neighbours -> 1 pixel
        np.rint(out, out=out)  # weights sum to <= 1 (+ the grid's rounding): the result stays in 0..255
        return out.astype(np.uint8).reshape(h, w, c)


def center_zoom_map(height: int, width: int, fraction: float) -> BilinearMap:
    """The central round(f*H) x round(f*W) region (torchvision's crop anchor) resized back to H x W, bilinear with
    align_corners=False (source coordinates clamped at the crop's edges, as torch's upsampling does)."""
    ch, cw = max(1, int(round(fraction * height))), max(1, int(round(fraction * width)))
    top, left = int(round((height - ch) / 2.0)), int(round((width - cw) / 2.0))

    def coords(n_out: int, n_in: int) -> np.ndarray:
        src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        return np.clip(src, 0, n_in - 1)

    ys, xs = np.meshgrid(coords(height, ch), coords(width, cw), indexing="ij")
    return BilinearMap(height, width, ys + top, xs + left, zero_outside=False)


def rotation_map(height: int, width: int, degrees: float) -> BilinearMap:
    """Counter-clockwise rotation about the image center, same size, bilinear, fill 0 — torchvision's F.rotate:
    the inverse map [[cos, -sin], [sin, cos]] (y down) of output pixel centers relative to the center."""
    a = math.radians(degrees)
    cos, sin = math.cos(a), math.sin(a)
    yo, xo = np.meshgrid(np.arange(height) + 0.5 - height / 2, np.arange(width) + 0.5 - width / 2, indexing="ij")
    xs, ys = cos * xo - sin * yo, sin * xo + cos * yo
    return BilinearMap(height, width, ys + height / 2 - 0.5, xs + width / 2 - 0.5, zero_outside=True, coverage=True)


PERMUTATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "original": lambda a: a, "hflip": lambda a: a[:, ::-1], "vflip": lambda a: a[::-1]}
"""The views that only move pixels, on (H, W, ...) arrays."""


def _resampling_map(name: str, center_crop_fraction: float) -> Callable[[int, int], BilinearMap]:
    """(H, W) -> the BilinearMap of a resampling view."""
    if name == "center_crop":
        return lambda h, w: center_zoom_map(h, w, center_crop_fraction)
    if name in ("rot+15", "rot-15"):
        degrees = 15.0 if name == "rot+15" else -15.0
        return lambda h, w: rotation_map(h, w, degrees)
    raise EdgeKDError(f"unknown TTA view '{name}' (use {', '.join(TTA_VIEWS)})")


def view_function(name: str, center_crop_fraction: float = DEFAULT_CENTER_CROP_FRACTION) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 (H, W, C) -> the view, same shape. Resampling views build their map on first use per image size."""
    if name in PERMUTATIONS:
        return PERMUTATIONS[name]
    return _cached(_resampling_map(name, center_crop_fraction))


def _cached(build: Callable[[int, int], BilinearMap]) -> Callable[[np.ndarray], np.ndarray]:
    maps: dict[tuple[int, int], BilinearMap] = {}

    def apply(arr: np.ndarray) -> np.ndarray:
        key = arr.shape[:2]
        m = maps.get(key)
        if m is None:
            if len(maps) >= 8:  # a runner sees one model input size; bound the cache for odd callers anyway
                maps.clear()
            m = maps[key] = build(*key)
        return m(arr)

    return apply


def linear_map(name: str, height: int, width: int,
               center_crop_fraction: float = DEFAULT_CENTER_CROP_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """A view as a linear map of the flattened image: (H*W, 4) source pixel indices (H*W reads a zero pixel) and
    (H*W, 4) float32 weights, so that the view is rint(sum_k weight[:, k] * image[index[:, k]]) -- exactly what
    `view_function(name)` computes. The original and the flips are permutations (one weight 1); a compiled model
    applies all views with one gather."""
    if name in PERMUTATIONS:
        src = PERMUTATIONS[name](np.arange(height * width).reshape(height, width)).reshape(-1)
        index = np.stack([src] + [np.full_like(src, height * width)] * 3, axis=-1)
        weight = np.zeros(index.shape, dtype=np.float32)
        weight[:, 0] = 1.0
        return index, weight
    m = _resampling_map(name, center_crop_fraction)(height, width)
    return m.index, m.weight


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
        self.center_crop_fraction = float(center_crop_fraction)
        self.functions = [view_function(n, center_crop_fraction) for n in names]
        self.key = (*names, self.center_crop_fraction)
        """What identifies this view set (names in order and the crop fraction): equal keys, equal views."""
        self._hash = hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TTAViews) and other.key == self.key

    def __hash__(self) -> int:  # a compiled model per view set is cached by it
        return self._hash

    def linear_maps(self, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """All views' `linear_map`s stacked: (V, H*W, 4) indices and (V, H*W, 4) weights."""
        maps = [linear_map(n, height, width, self.center_crop_fraction) for n in self.names]
        return tuple(np.stack(parts) for parts in zip(*maps))

    def __len__(self) -> int:
        return len(self.names)

    def __call__(self, arr: np.ndarray) -> np.ndarray:
        return np.stack([f(arr) for f in self.functions])


def tta_steps(tta: dict) -> str:
    """A bundle's TTA views (edgekd.json `tta`) as `TTAViews` makes them, in one sentence for a card or README."""
    made = {"original": "the image itself", "hflip": "mirrored left-right", "vflip": "mirrored top-bottom",
            "center_crop": f"its central {float(tta.get('center_crop_fraction', DEFAULT_CENTER_CROP_FRACTION)):.4g} "
                           "resized back to the input size (bilinear, torchvision's tensor geometry)",
            "rot+15": "rotated 15 degrees counter-clockwise about its center (bilinear, zero fill)",
            "rot-15": "rotated 15 degrees clockwise (bilinear, zero fill)"}
    return ("With TTA (`--tta`) each view is made from the uint8 input-size image of the resize-and-crop step, "
            "rounded back to uint8, then normalized; all views go through the model in one batch and the prediction "
            "is the mean of their softmax: " + "; ".join(f"{v}: {made.get(v, v)}" for v in tta["views"]) + ".")
