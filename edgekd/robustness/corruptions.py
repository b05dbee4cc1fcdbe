"""Image corruptions at 5 severities (in the spirit of ImageNet-C / MedMNIST-C) on uint8 arrays, numpy + Pillow only.

Every corruption takes a uint8 (H, W, C) image (C = 1 or 3) and returns one of the same shape and dtype, so
it can be applied to the decoded image before either the training side's or the edge runtime's preprocessing.
Randomness comes from a generator seeded by (seed, corruption, image index), not by severity: the same call
always gives the same image, independent of batching or order, and severities differ only in strength (the
same noise pattern, scaled; the same motion angle, longer).

JPEG quality, brightness (on HSV's value) and the pixelation factor are ImageNet-C's (Hendrycks & Dietterich
2019); contrast, like ImageNet-C's, pulls each channel toward its own mean. Noise and
contrast are milder than ImageNet-C's (Gaussian std .04-.20 vs .08-.38, speckle .10-.40 vs .15-.60, contrast
.60-.10 vs .40-.05): between its CIFAR-10-C and ImageNet-C levels, as a 28-px image at ImageNet-C's severity 5 is
noise or a flat field. Spatial parameters (blur sigma, motion length) are given
for a 32-pixel image and scale with the shorter side, so a 28-px MedMNIST image and a 224-px one are blurred by
the same fraction of their size (ImageNet-C's pixel values at 224 px would erase a 28-px image).
"""

from __future__ import annotations

import io
import math
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter

from edgekd.errors import EdgeKDError

SEVERITIES = (1, 2, 3, 4, 5)
REFERENCE_SIDE = 32
"""Spatial parameters below are in pixels of a REFERENCE_SIDE image; they scale with min(H, W) / 32."""

PARAMS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.04, 0.08, 0.12, 0.16, 0.20),   # std of N(0, c) added to x in [0, 1]
    "speckle_noise": (0.10, 0.15, 0.20, 0.30, 0.40),    # x + x * N(0, c)
    "gaussian_blur": (0.50, 0.80, 1.10, 1.50, 2.00),    # sigma, px at 32 px
    "motion_blur": (2.0, 3.0, 4.0, 6.0, 8.0),           # streak length, px at 32 px; random angle in [-45, 45]
    "jpeg_compression": (25, 18, 15, 10, 7),            # JPEG quality (ImageNet-C)
    "contrast": (0.60, 0.45, 0.30, 0.20, 0.10),         # (x - mean) * c + mean
    "brightness": (0.10, 0.20, 0.30, 0.40, 0.50),       # HSV value + c, clipped
    "pixelate": (0.60, 0.50, 0.40, 0.30, 0.25),         # box-downsample to c * size, nearest-upsample back
}
"""Per corruption, its parameter at severities 1..5."""


def _as_float(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32) / 255.0


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _to_pil(image: np.ndarray) -> Image.Image:
    if image.shape[-1] == 1:
        return Image.fromarray(np.ascontiguousarray(image[..., 0]), mode="L")
    return Image.fromarray(np.ascontiguousarray(image), mode="RGB")


def _from_pil(img: Image.Image, channels: int) -> np.ndarray:
    arr = np.array(img, dtype=np.uint8)  # a writable copy (np.asarray of a PIL image is read-only)
    return arr[..., None] if channels == 1 else arr


def _scale(image: np.ndarray) -> float:
    return min(image.shape[0], image.shape[1]) / REFERENCE_SIDE


def gaussian_noise(image: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    x = _as_float(image)
    return _to_uint8(x + rng.normal(0.0, c, size=x.shape).astype(np.float32))


def speckle_noise(image: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    x = _as_float(image)
    return _to_uint8(x + x * rng.normal(0.0, c, size=x.shape).astype(np.float32))


def gaussian_blur(image: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    sigma = c * _scale(image)
    return _from_pil(_to_pil(image).filter(ImageFilter.GaussianBlur(radius=sigma)), image.shape[-1])


def motion_blur(image: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """Mean of the image shifted along a centred straight streak of `length` pixels at a random angle in
    [-45, 45] degrees; sub-pixel shifts are bilinear, borders edge-padded."""
    length = max(2.0, c * _scale(image))
    angle = math.radians(rng.uniform(-45.0, 45.0))
    taps = max(2, int(math.ceil(length)) + 1)
    steps = np.linspace(-(length - 1) / 2.0, (length - 1) / 2.0, taps)  # centred: no net translation
    pad = int(math.ceil(length / 2.0)) + 2
    x = np.pad(image.astype(np.float32), ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    h, w = image.shape[:2]
    acc = np.zeros(image.shape, dtype=np.float32)
    for t in steps:
        dy, dx = t * math.sin(angle), t * math.cos(angle)
        y0, x0 = math.floor(dy), math.floor(dx)
        fy, fx = dy - y0, dx - x0
        for oy, wy in ((y0, 1.0 - fy), (y0 + 1, fy)):
            for ox, wx in ((x0, 1.0 - fx), (x0 + 1, fx)):
                if wy * wx:
                    acc += (wy * wx) * x[pad + oy:pad + oy + h, pad + ox:pad + ox + w]
    return np.clip(acc / len(steps) + 0.5, 0, 255).astype(np.uint8)


def jpeg_compression(image: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    buf = io.BytesIO()
    _to_pil(image).save(buf, format="JPEG", quality=int(c))
    buf.seek(0)
    with Image.open(buf) as img:
        return _from_pil(img.convert("L" if image.shape[-1] == 1 else "RGB"), image.shape[-1])


def contrast(image: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """Toward each channel's mean, as ImageNet-C (one mean over all channels had shifted an RGB image's hue)."""
    x = _as_float(image)
    mean = x.mean(axis=(0, 1), keepdims=True)
    return _to_uint8((x - mean) * c + mean)


def brightness(image: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """+c on HSV's value, as ImageNet-C: with hue and saturation kept, an RGB pixel's channels scale together by
    V'/V (a black pixel, without hue, becomes gray V'); a gray image gets +c. (+c on each RGB channel had washed
    the colors out.)"""
    x = _as_float(image)
    if x.shape[-1] == 1:
        return _to_uint8(x + c)
    value = x.max(axis=-1, keepdims=True)
    lifted = np.minimum(value + c, 1.0)
    return _to_uint8(np.where(value > 0, x * (lifted / np.maximum(value, 1e-12)), lifted))


def pixelate(image: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """ImageNet-C's factors, not its exact pixels: it BOX-resizes to int(c * side) and BOX-resizes back, which at
    28 px is not monotone in severity (the change per severity measured 8.3, 8.0, 9.8, 12.8, 12.7 grey levels on a
    test image: 14 px doubles back exactly, 16 px does not). The small side here is rounded and the way back
    NEAREST: blockier as the severity grows, at any size (at 224 px severity 3 it is 90 px where ImageNet-C's is
    89)."""
    h, w = image.shape[:2]
    small = (max(1, int(round(w * c))), max(1, int(round(h * c))))
    img = _to_pil(image).resize(small, Image.Resampling.BOX).resize((w, h), Image.Resampling.NEAREST)
    return _from_pil(img, image.shape[-1])


CORRUPTIONS: dict[str, Callable[[np.ndarray, float, np.random.Generator], np.ndarray]] = {
    "gaussian_noise": gaussian_noise, "speckle_noise": speckle_noise, "gaussian_blur": gaussian_blur,
    "motion_blur": motion_blur, "jpeg_compression": jpeg_compression, "contrast": contrast,
    "brightness": brightness, "pixelate": pixelate,
}
CORRUPTION_IDS = {name: i for i, name in enumerate(CORRUPTIONS)}


def check_names(names: list[str] | None) -> list[str]:
    """None -> all corruptions; unknown names are a one-line error."""
    if not names:
        return list(CORRUPTIONS)
    bad = [n for n in names if n not in CORRUPTIONS]
    if bad:
        raise EdgeKDError(f"unknown corruption '{bad[0]}' (known: {', '.join(CORRUPTIONS)})")
    return list(names)


def check_severities(severities: list[int] | None) -> list[int]:
    if not severities:
        return list(SEVERITIES)
    bad = [s for s in severities if s not in SEVERITIES]
    if bad:
        raise EdgeKDError(f"corruption severity must be 1..5, got {bad[0]}")
    return list(severities)


def corrupt(image: np.ndarray, name: str, severity: int, seed: int = 0, index: int = 0) -> np.ndarray:
    """Apply corruption `name` at `severity` (1..5) to a uint8 (H, W[, C]) image; deterministic in (seed, index)."""
    fn = CORRUPTIONS.get(name)
    if fn is None:
        check_names([name])
    if severity not in SEVERITIES:
        check_severities([severity])
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise EdgeKDError(f"corruptions need a uint8 image, got dtype {image.dtype}")
    squeeze = image.ndim == 2
    if squeeze:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise EdgeKDError(f"corruptions need a (H, W), (H, W, 1) or (H, W, 3) image, got shape {image.shape}")
    rng = np.random.default_rng([seed, CORRUPTION_IDS[name], index])
    out = fn(image, PARAMS[name][severity - 1], rng)
    return out[..., 0] if squeeze else out
