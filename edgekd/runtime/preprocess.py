"""The training side's eval preprocessing re-done in numpy + Pillow, driven by a bundle's `preprocess` spec.

Mirrors `edgekd.data.transforms.build_transforms(train=False)` (torchvision v2): channels -> hair removal (when
the bundle says so; the same `edgekd.hair` function as training) -> resize shorter side
(bilinear, antialias) -> center crop (zero padding if too small) -> float32 * scale -> (x - mean) / std -> NCHW.
The float steps use the same float32 operations in the same order, so without a resize the result is bit-exact;
after one, Pillow's and torch's fixed-point antialiased filters differ by at most 2 uint8 levels on a few pixels.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image

from edgekd.errors import EdgeKDError, exception_line
from edgekd.hair import opencv, recorded_kernel, remove_hair
from edgekd.imageio import DicomFrame, check_image_size, pil_to_array, read_image

ImageInput = Union[str, Path, DicomFrame, Image.Image, np.ndarray]

# ITU-R 601 luma weights as torchvision's rgb_to_grayscale uses them (float32, truncated back to uint8).
LUMA = (np.float32(0.2989), np.float32(0.587), np.float32(0.114))


def as_image_array(image: ImageInput, resize: int | None = None) -> np.ndarray:
    """A path, DICOM frame, PIL image or uint8 array -> uint8 (H, W, C) with C 1 or 3; anything else is a one-line error.
    `resize`: the shorter side the caller resizes to; an image whose resized copy would be too large is refused
    first (for a file: from its header, before decoding)."""
    if not isinstance(image, np.ndarray):
        if isinstance(image, (str, Path)):
            return read_image(image, resize)
        if isinstance(image, DicomFrame):
            return read_image(image.path, resize, frame=image.index)
        if isinstance(image, Image.Image):
            if image.format is None and (image.mode in ("I", "F") or image.mode.startswith("I;")):
                # made in memory (Image.fromarray of int32 or float pixels, a DICOM's pixel_array without its VOI
                # window): stretched by its own min..max, its label had flipped; an int32 array is refused too. A
                # 16-bit image opened from a file reads as its path does (and as training read the file).
                raise EdgeKDError(f"a PIL image of mode '{image.mode}' made in memory (more than 8 bits a pixel) "
                                  "would be stretched by its own min..max: give an 8-bit image (mode L or RGB, or a "
                                  "uint8 array), or the file it came from")
            check_image_size(*image.size, resize)
            try:  # Image.open decodes lazily: a truncated file fails here, as one input's error
                return pil_to_array(image)
            except (OSError, SyntaxError, ValueError, struct.error) as err:
                raise EdgeKDError(f"PIL image: corrupt or truncated ({exception_line(err)})") from None
        raise EdgeKDError(f"expected an image path, PIL image or numpy array, got {type(image).__name__}")
    if image.ndim == 2:
        image = image[..., None]
    elif image.ndim != 3:
        hint = " (one image per call: use predict_batch for several)" if image.ndim == 4 else ""
        raise EdgeKDError(f"expected an image array of shape (H, W) or (H, W, C), got shape {image.shape}{hint}")
    if image.shape[-1] not in (1, 3, 4):
        raise EdgeKDError(f"expected 1, 3 or 4 channels in the last axis (H, W, C), got shape {image.shape}")
    if image.dtype != np.uint8:
        raise EdgeKDError(f"expected a uint8 image array (0..255), got dtype {image.dtype}; "
                          "read files with edgekd.imageio.read_image")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise EdgeKDError(f"empty image array of shape {image.shape}")
    check_image_size(image.shape[1], image.shape[0], resize, f"<array {image.shape[0]}x{image.shape[1]}>")
    return image[..., :3] if image.shape[-1] == 4 else image


def to_channels(arr: np.ndarray, channels: int) -> np.ndarray:
    """gray -> RGB by repetition, RGB -> gray by luminance (as torchvision, bit for bit: float32 weights, its
    fused multiply-adds, truncated)."""
    c = arr.shape[-1]
    if c == channels:
        return arr
    if c == 1 and channels == 3:
        return np.repeat(arr, 3, axis=-1)
    if c == 3 and channels == 1:
        # torch's r * w0, then two fused multiply-adds (add_(g, alpha=w1)): one rounding to float32 per step.
        # Each step is exact in float64 (8-bit pixels times 24-bit weights), so rounding it once to float32 is
        # the FMA; separate float32 multiply and add had put 21 of the 16.7M colours one level lower.
        rgb, w = arr.astype(np.float64), [np.float64(v) for v in LUMA]
        luma = (rgb[..., 0] * w[0]).astype(np.float32)
        for i in (1, 2):
            luma = (luma.astype(np.float64) + rgb[..., i] * w[i]).astype(np.float32)
        return luma.astype(np.uint8)[..., None]
    raise EdgeKDError(f"cannot convert a {c}-channel image to {channels} channels")


def resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    """torchvision's rule for an int size: the shorter side becomes `size`, the longer keeps the aspect (floor)."""
    short, long = (width, height) if width <= height else (height, width)
    if short == size:
        return height, width
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def resize_bilinear(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize uint8 (H, W, C) with Pillow's antialiased bilinear filter (what torchvision's uint8 path matches)."""
    if arr.shape[:2] == (height, width):
        return arr
    if arr.shape[-1] == 1:
        img = Image.fromarray(np.ascontiguousarray(arr[..., 0]), mode="L")
        return np.asarray(img.resize((width, height), Image.Resampling.BILINEAR))[..., None]
    if arr.shape[-1] == 3:
        img = Image.fromarray(np.ascontiguousarray(arr), mode="RGB")
        return np.asarray(img.resize((width, height), Image.Resampling.BILINEAR))
    raise EdgeKDError(f"cannot resize an image with {arr.shape[-1]} channels")


def center_crop(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """Central crop with torchvision's anchor (round half to even) and zero padding when the image is smaller."""
    h, w = arr.shape[:2]
    if height > h or width > w:
        pad_top = (height - h) // 2 if height > h else 0
        pad_bottom = (height - h + 1) // 2 if height > h else 0
        pad_left = (width - w) // 2 if width > w else 0
        pad_right = (width - w + 1) // 2 if width > w else 0
        arr = np.pad(arr, ((pad_top, pad_bottom), (pad_left, pad_right), (0, 0)))
        h, w = arr.shape[:2]
    top, left = int(round((h - height) / 2.0)), int(round((w - width) / 2.0))
    return arr[top:top + height, left:left + width]


class Preprocessor:
    """Turns images into the model's float32 NCHW input, exactly as the training side's eval pipeline."""

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self.channels = int(spec["channels"])
        self.resize = int(spec["resize"])
        self.crop = int(spec["center_crop"])
        self.bgr = spec.get("channel_order") == "BGR"
        self.hair_removal = bool(spec.get("hair_removal", False))
        # null: scaled to each image; absent (a bundle from before data.hair_kernel): 17 px at any size
        self.hair_kernel = recorded_kernel(spec)
        if self.hair_removal:
            opencv()  # refuse the bundle at load on a box without OpenCV, not at the first image
        # torch's float32 operations in torch's order, so results stay bit-exact: x * scale, - mean, / std.
        self.scale = np.float32(spec["scale"])
        self.mean = np.asarray(spec["mean"], dtype=np.float32)[None, :, None, None]
        self.std = np.asarray(spec["std"], dtype=np.float32)[None, :, None, None]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.channels, self.crop, self.crop

    def to_model_size(self, image: ImageInput, keep_gray: bool = False) -> np.ndarray:
        """Decode + channels + resize + center crop: the uint8 (H, W, C) image TTA views are built from.

        `keep_gray`: a gray image stays (H, W, 1) for a 3-channel model (`normalize` broadcasts it), so resize and
        TTA views work on one channel instead of three identical ones; the result is the same.
        """
        arr = as_image_array(image, self.resize)
        if self.hair_removal or not (keep_gray and arr.shape[-1] == 1):
            arr = to_channels(arr, self.channels)
        if self.hair_removal:  # on the decoded image, before any resize: where training applies it
            arr = remove_hair(arr, self.hair_kernel)
        if not (self.resize == self.crop == arr.shape[0] == arr.shape[1]):  # else already the model's size
            arr = resize_bilinear(arr, *resized_size(arr.shape[0], arr.shape[1], self.resize))
            arr = center_crop(arr, self.crop, self.crop)
        if self.bgr:
            arr = arr[..., ::-1]
        return arr

    def to_resize_size(self, image: ImageInput) -> np.ndarray:
        """Decode + channels + resize, center-cropped to a (resize, resize) square: the stage before the model's
        crop, so `to_model_size` of it is `to_model_size` of a square image. What a benchmark stores so that the
        bare model (given the crop) and the runner (given this, doing its own crop) see the same pixels. Hair removal,
        when the bundle has it, runs here on the decoded image: what takes the result must not run it again."""
        arr = to_channels(as_image_array(image, self.resize), self.channels)
        if self.hair_removal:
            arr = remove_hair(arr, self.hair_kernel)
        arr = resize_bilinear(arr, *resized_size(arr.shape[0], arr.shape[1], self.resize))
        return center_crop(arr, self.resize, self.resize)

    def normalize(self, batch_hwc: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """uint8 (N, H, W, C) -> float32 (N, C, H, W): (x * scale - mean) / std per channel, as torch computes it.

        `out`: a float32 (N, C, H, W) array to write into (the backend's input memory), else a new one. A gray
        (N, H, W, 1) batch for a 3-channel model is broadcast to the 3 channels (gray -> RGB by repetition).
        """
        n, h, w, c = batch_hwc.shape
        if c != self.channels and c != 1:
            raise EdgeKDError(f"expected {self.channels} channels (or 1 to repeat), got a batch of shape {batch_hwc.shape}")
        if out is None:
            out = np.empty((n, self.channels, h, w), dtype=np.float32)
        np.copyto(out, batch_hwc.transpose(0, 3, 1, 2), casting="unsafe")  # uint8 -> float32 is exact
        out *= self.scale
        out -= self.mean
        out /= self.std
        return out

    def __call__(self, image: ImageInput) -> np.ndarray:
        """One image -> float32 (C, H, W)."""
        return self.normalize(self.to_model_size(image)[None])[0]
