"""Train/eval pipelines built from the recipe out of torchvision.transforms.v2 ops named by class."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchvision.transforms import v2

from edgekd.errors import EdgeKDError

# Ops that work on float, normalized tensors and so run after Normalize (as timm does for RandomErasing).
POST_NORMALIZE = {"RandomErasing"}


class ToChannels(torch.nn.Module):
    """Make a CxHxW image have `channels` channels: gray -> RGB by repetition, RGB -> gray by luminance."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        c = img.shape[-3]
        if c == self.channels:
            return img
        if c == 1 and self.channels == 3:
            return img.expand(*img.shape[:-3], 3, *img.shape[-2:]).clone()
        if c == 3 and self.channels == 1:
            return v2.functional.rgb_to_grayscale(img)
        raise EdgeKDError(f"cannot convert a {c}-channel image to {self.channels} channels")


class HairRemoval(torch.nn.Module):
    """DullRazor-style hair removal for dermoscopy: black-hat morphology finds hairs, inpainting fills them.

    Needs OpenCV (`pip install 'edgekd[skin]'`).
    """

    def __init__(self, kernel: int = 17, threshold: int = 10):
        super().__init__()
        try:
            import cv2
        except ImportError:
            raise EdgeKDError("data.hair_removal needs OpenCV (pip install 'edgekd[skin]')") from None
        self.cv2, self.kernel, self.threshold = cv2, kernel, threshold

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        cv2 = self.cv2
        arr = img.permute(1, 2, 0).contiguous().numpy()
        gray = arr[..., 0] if arr.shape[-1] == 1 else cv2.cvtColor(arr, cv2.COLOR_RGB2GRAY)
        k = cv2.getStructuringElement(cv2.MORPH_RECT, (self.kernel, self.kernel))
        blackhat = cv2.morphologyEx(gray, cv2.MORPH_BLACKHAT, k)
        _, mask = cv2.threshold(blackhat, self.threshold, 255, cv2.THRESH_BINARY)
        out = cv2.inpaint(arr, mask, 1, cv2.INPAINT_TELEA)
        if out.ndim == 2:
            out = out[..., None]
        return torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1)


def build_op(spec: dict[str, Any] | str) -> torch.nn.Module:
    """`{RandomRotation: {degrees: 15}}` or `"RandomHorizontalFlip"` -> a v2 transform instance."""
    if isinstance(spec, str):
        spec = {spec: {}}
    if not isinstance(spec, dict) or len(spec) != 1:
        raise EdgeKDError(f"augment: each entry must be one op name with its arguments, got {spec!r}")
    (name, kwargs), = spec.items()
    kwargs = kwargs or {}
    cls = getattr(v2, name, None)
    if cls is None or not isinstance(cls, type):
        raise EdgeKDError(f"augment: unknown op '{name}' (use a torchvision.transforms.v2 class name)")
    if name == "RandomApply":
        inner = [build_op(s) for s in kwargs.pop("transforms", [])]
        return v2.RandomApply(inner, **kwargs)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise EdgeKDError(f"augment: {name}: {err}") from None


def build_transforms(data_cfg, augment: list, train: bool) -> v2.Compose:
    """The pipeline a CxHxW uint8 tensor goes through. Eval: resize, center crop, normalize.

    Train: resize to the input size, the recipe's augment ops in order, normalize, then post-normalize ops.
    """
    size = data_cfg.image_size
    if len(data_cfg.mean) != data_cfg.channels or len(data_cfg.std) != data_cfg.channels:
        raise EdgeKDError(f"data.mean/std need {data_cfg.channels} values for data.channels={data_cfg.channels}")
    ops: list[torch.nn.Module] = [ToChannels(data_cfg.channels)]
    if data_cfg.hair_removal:
        ops.append(HairRemoval())
    post: list[torch.nn.Module] = []
    if train:
        ops.append(v2.Resize(size, antialias=True))
        ops.append(v2.CenterCrop(size))
        for spec in augment:
            op = build_op(spec)
            (post if type(op).__name__ in POST_NORMALIZE else ops).append(op)
    else:
        ops.append(v2.Resize(data_cfg.resize or size, antialias=True))
        ops.append(v2.CenterCrop(size))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(data_cfg.mean), list(data_cfg.std))]
    return v2.Compose(ops + post)


def preprocess_spec(data_cfg) -> dict[str, Any]:
    """The eval pipeline as plain data: what an exported model's runtime must reproduce."""
    return {
        "input_size": [data_cfg.channels, data_cfg.image_size, data_cfg.image_size],
        "resize": data_cfg.resize or data_cfg.image_size,
        "resize_mode": "shorter_side",
        "interpolation": "bilinear",
        "center_crop": data_cfg.image_size,
        "channels": data_cfg.channels,
        "channel_order": "RGB" if data_cfg.channels == 3 else "L",
        "gray_to_rgb": "repeat",
        "scale": 1.0 / 255.0,
        "mean": list(data_cfg.mean),
        "std": list(data_cfg.std),
        "layout": "NCHW",
        "hair_removal": bool(data_cfg.hair_removal),
    }
