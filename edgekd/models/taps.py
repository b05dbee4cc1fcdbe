"""Feature taps: the outputs of modules by path (forward hooks), and their layouts (ViT tokens, NHWC, NCHW,
vectors) laid out as NCHW maps. Feature KD and Grad-CAM read layers through these."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from edgekd.errors import EdgeKDError
from edgekd.models.factory import get_submodule


@contextmanager
def capture_features(model: nn.Module, paths: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of the modules at `paths` during the forward passes inside the block.

    Forward hooks work on any timm model (CNN stages, ViT blocks, Swin layers) without model-specific code;
    they are removed on exit so the student carries no hooks into evaluation or export. Each output is copied as it
    leaves its module: a later in-place op (a BatchNorm's output through `ReLU(inplace=True)`) had turned a
    tapped BatchNorm's values into the ReLU's.
    """
    found: dict[str, torch.Tensor] = {}
    handles = []

    def hook_for(path: str):
        def hook(_module, _inputs, output):
            found[path] = (output[0] if isinstance(output, (tuple, list)) else output).clone()
        return hook

    try:
        for path in paths:
            handles.append(get_submodule(model, path).register_forward_hook(hook_for(path)))
        yield found
    finally:
        for h in handles:
            h.remove()


def output_format(module: nn.Module) -> str | None:
    """A timm module's `output_fmt` as 'NCHW'/'NHWC' (a string, or timm's Format enum), or None."""
    fmt = getattr(module, "output_fmt", None)
    return None if fmt is None else str(getattr(fmt, "value", fmt)).upper()


def resolve_layout(model: nn.Module, feature: torch.Tensor, layout: str, layer: str | None = None) -> str:
    """'auto': 2-D -> vector, 3-D -> tokens, 4-D -> the tapped `layer`'s timm `output_fmt`, else the model's (NHWC
    for Swin, or a ViT's patch_embed with dynamic_img_size; else NCHW)."""
    if layout != "auto":
        want = {"tokens": 3, "nchw": 4, "nhwc": 4}[layout]
        if feature.dim() != want:
            raise EdgeKDError(f"feature layout '{layout}' needs a {want}-D output, got shape {tuple(feature.shape)}"
                              + (f" from '{layer}'" if layer else ""))
        return layout
    if feature.dim() == 2:
        return "vector"
    if feature.dim() == 3:
        return "tokens"
    if feature.dim() == 4:  # the tapped module says first: a ViT's model says nothing, its NHWC patch_embed does
        module = None
        if layer:
            try:
                module = model.get_submodule(layer)
            except AttributeError:
                module = None
        if isinstance(module, (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d)):
            return "nchw"  # torch's 2-D layers are NCHW whatever the model declares (Swin's patch_embed.proj)
        fmt = (output_format(module) if module is not None else None) or output_format(model) or "NCHW"
        return "nhwc" if fmt == "NHWC" else "nchw"
    raise EdgeKDError(f"cannot use a {feature.dim()}-D layer output (shape {tuple(feature.shape)}) for feature KD")


def channels_of(feature: torch.Tensor, layout: str) -> int:
    return feature.shape[1] if layout in ("nchw", "vector") else feature.shape[-1]


def tokens_to_map(tokens: torch.Tensor, prefix_tokens: int) -> torch.Tensor:
    """(B, prefix + h*w, C) -> (B, C, h, w): drop class/register tokens, lay patch tokens on their square grid. A
    layer whose output has no prefix tokens though the model has them (CaiT's and XCiT's blocks before their class
    token joins, a ViT's patch_embed) is read whole: a square count of tokens without the prefix, not with it."""
    n = tokens.shape[1]
    if math.isqrt(n - prefix_tokens) ** 2 != n - prefix_tokens and math.isqrt(n) ** 2 == n:
        prefix_tokens = 0
    patches = tokens[:, prefix_tokens:]
    n = patches.shape[1]
    side = math.isqrt(n)
    if side * side != n:
        raise EdgeKDError(f"{n} patch tokens (after {prefix_tokens} prefix tokens) do not form a square grid")
    return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)


def to_map(feature: torch.Tensor, layout: str, prefix_tokens: int = 0) -> torch.Tensor:
    """Any tapped output -> an NCHW map."""
    if layout == "nchw":
        return feature
    if layout == "nhwc":
        return feature.permute(0, 3, 1, 2)
    if layout == "tokens":
        return tokens_to_map(feature, prefix_tokens)
    if layout == "vector":
        return feature[:, :, None, None]
    raise ValueError(layout)
