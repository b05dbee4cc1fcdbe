"""Reading images from disk into uint8 HxWxC arrays (numpy + Pillow only; shared by training and the edge runtime)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from edgekd.errors import EdgeKDError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".dcm"}
MAX_PIXELS = 64_000_000
"""Decompression-bomb guard: larger images are refused (a 224x224 model never needs them)."""


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file to a uint8 array of shape (H, W, 1) or (H, W, 3).

    16-bit images are rescaled to 8 bit by their own range, RGBA/LA lose alpha, CMYK/palette become RGB.
    Any failure raises EdgeKDError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise EdgeKDError(f"{path}: image file not found")
    if path.stat().st_size == 0:
        raise EdgeKDError(f"{path}: empty file")
    if path.suffix.lower() == ".dcm":
        return read_dicom(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise EdgeKDError(f"{path}: image is {w}x{h}, larger than the {MAX_PIXELS} pixel limit")
                img.load()
                return pil_to_array(img)
    except EdgeKDError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise EdgeKDError(f"{path}: image exceeds the decompression-bomb pixel limit") from None
    except UnidentifiedImageError:
        raise EdgeKDError(f"{path}: not an image (cannot identify the file format)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise EdgeKDError(f"{path}: corrupt or truncated image ({str(err).splitlines()[0][:80]})") from None


def pil_to_array(img: Image.Image) -> np.ndarray:
    """A PIL image of any common mode -> uint8 (H, W, 1) for gray or (H, W, 3) for color."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        return _rescale_to_uint8(arr)[..., None]
    if img.mode in ("1", "L"):
        return np.asarray(img.convert("L"), dtype=np.uint8)[..., None]
    if img.mode == "LA":
        return np.asarray(img.convert("L"), dtype=np.uint8)[..., None]
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _rescale_to_uint8(arr: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(arr)), float(np.max(arr))
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise EdgeKDError("image holds NaN or Inf values")
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.round((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def read_dicom(path: Path) -> np.ndarray:
    """DICOM through pydicom (optional extra), windowed by the file's own Window Center/Width tags."""
    try:
        import pydicom
    except ImportError:
        raise EdgeKDError(f"{path}: reading DICOM needs pydicom (pip install 'edgekd[dicom]')") from None
    try:
        ds = pydicom.dcmread(str(path))
        arr = ds.pixel_array.astype(np.float64)
    except Exception as err:  # pydicom raises many types for bad files
        raise EdgeKDError(f"{path}: unreadable DICOM ({type(err).__name__})") from None
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    arr = arr * slope + intercept
    center, width = getattr(ds, "WindowCenter", None), getattr(ds, "WindowWidth", None)
    if center is not None and width is not None:
        center = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
        width = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
        arr = np.clip(arr, center - width / 2, center + width / 2)
    out = _rescale_to_uint8(arr)
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        out = 255 - out
    if out.ndim == 2:
        out = out[..., None]
    return out
