"""Train/eval pipelines built from the recipe out of torchvision.transforms.v2 ops named by class."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchvision.transforms import v2

from edgekd.errors import EdgeKDError
from edgekd.hair import opencv, remove_hair

# Ops that work on float, normalized tensors and so run after Normalize (as timm does for RandomErasing).
POST_NORMALIZE = {"RandomErasing"}
# Ops whose output size is the model's input: `size` defaults to data.image_size and may not differ from it
# (a recipe's `size: 224` under `--set data.image_size=64` would train at 224 and evaluate at 64).
INPUT_SIZED = {"RandomResizedCrop", "RandomCrop", "CenterCrop"}
# Ops that hold a list of ops (`transforms`): each entry is built as a top-level one (RandomChoice had got strings).
NESTING = {"RandomApply", "RandomChoice", "RandomOrder", "Compose"}


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
    """`edgekd.hair.remove_hair` on a CxHxW uint8 tensor (the edge runtime runs the same function)."""

    def __init__(self, kernel: int | None = None):
        super().__init__()
        opencv()  # a missing OpenCV fails when the pipeline is built, not at the first image
        self.kernel = kernel

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        out = remove_hair(img.permute(1, 2, 0).contiguous().numpy(), self.kernel)
        return torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1)


def build_op(spec: dict[str, Any] | str) -> torch.nn.Module:
    """`{RandomRotation: {degrees: 15}}` or `"RandomHorizontalFlip"` -> a v2 transform instance."""
    if isinstance(spec, str):
        spec = {spec: {}}
    if not isinstance(spec, dict) or len(spec) != 1:
        raise EdgeKDError(f"augment: each entry must be one op name with its arguments, got {spec!r}")
    (name, kwargs), = spec.items()
    kwargs = dict(kwargs or {})  # a copy: the recipe's own op list is built again for every pipeline
    cls = getattr(v2, name, None)
    if cls is None or not isinstance(cls, type):
        raise EdgeKDError(f"augment: unknown op '{name}' (use a torchvision.transforms.v2 class name)")
    if name in NESTING and isinstance(kwargs.get("transforms"), list):
        kwargs["transforms"] = [build_op(s) for s in kwargs["transforms"]]
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise EdgeKDError(f"augment: {name}: {err}") from None


def sized_op(spec: dict[str, Any] | str, image_size: int) -> dict[str, Any] | str:
    """An INPUT_SIZED op with `size` filled in from the input size, or a one-line error if it names another; the
    ops nested in a RandomApply/RandomChoice/RandomOrder/Compose too."""
    if isinstance(spec, str):
        spec = {spec: {}}
    if isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in NESTING:
        (name, kwargs), = spec.items()
        if isinstance(kwargs, dict) and isinstance(kwargs.get("transforms"), list):
            return {name: {**kwargs, "transforms": [sized_op(s, image_size) for s in kwargs["transforms"]]}}
    if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in INPUT_SIZED):
        return spec  # build_op checks the form of every other entry
    (name, kwargs), = spec.items()
    kwargs = dict(kwargs or {})
    size = kwargs.get("size", image_size)
    sizes = [size] * 2 if isinstance(size, int) else list(size)
    if sizes != [image_size, image_size]:
        raise EdgeKDError(f"augment: {name} size {size} differs from data.image_size {image_size} (the model's "
                          "input); leave size out to follow data.image_size")
    return {name: {**kwargs, "size": image_size}}


def chw_tensor(image: np.ndarray) -> torch.Tensor:
    """A decoded uint8 (H, W, C) array as the (C, H, W) tensor the transform pipelines take, without a copy unless
    the array is not contiguous and writable (PIL's arrays are read-only, which torch.from_numpy warns of)."""
    return torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1)


def build_transforms(data_cfg, augment: list, train: bool) -> v2.Compose:
    """The pipeline a CxHxW uint8 tensor goes through. Eval: resize, center crop, normalize.

    Train: resize to the input size, the recipe's augment ops in order, normalize, then post-normalize ops.
    """
    size = data_cfg.image_size
    if len(data_cfg.mean) != data_cfg.channels or len(data_cfg.std) != data_cfg.channels:
        raise EdgeKDError(f"data.mean/std need {data_cfg.channels} values for data.channels={data_cfg.channels}")
    ops: list[torch.nn.Module] = [ToChannels(data_cfg.channels)]
    if data_cfg.hair_removal:
        ops.append(HairRemoval(data_cfg.hair_kernel))
    post: list[torch.nn.Module] = []
    if train:
        ops.append(v2.Resize(size, antialias=True))
        ops.append(v2.CenterCrop(size))
        for spec in augment:
            op = build_op(sized_op(spec, size))
            (post if type(op).__name__ in POST_NORMALIZE else ops).append(op)
    else:
        ops.append(v2.Resize(data_cfg.resize or size, antialias=True))
        ops.append(v2.CenterCrop(size))
    pixels = len(ops)  # the uint8 steps: their output's shape is the model's input
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(data_cfg.mean), list(data_cfg.std))]
    pipeline = v2.Compose(ops + post)
    if train and augment:
        check_augment(pipeline, size, data_cfg.channels, pixels)
    return pipeline


AUGMENT_DRAWS = 8
"""How many times `check_augment` runs the train pipeline: a random op that changes the size half the time
(RandomZoomOut) shows in 8 draws but once in 256."""


def check_augment(pipeline: v2.Compose, size: int, channels: int = 3, pixel_steps: int | None = None) -> None:
    """Run the train pipeline on a random image a few times (seeded): an op that cannot take the pipeline's uint8
    images (e.g. `Normalize` among the augment ops) had failed at the first batch with a traceback, and one that
    changes the size (Pad, Resize, RandomZoomOut, a crop inside RandomApply) trained at another size than eval and
    export use, or failed to stack a batch. The shape is read after the first `pixel_steps` steps (before
    Normalize, which broadcast a `Grayscale` op's one channel back to three). Only the CPU generator is seeded
    and restored: torch.manual_seed had also reset every GPU's stream to 0 at each epoch's loader."""
    image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ops = pipeline.transforms
    steps = len(ops) if pixel_steps is None else pixel_steps
    shaped = v2.Compose(ops[:steps])
    rest = v2.Compose(ops[steps:]) if steps < len(ops) else (lambda pixels: pixels)  # (an empty Compose is refused)
    state = torch.random.get_rng_state()
    shapes = set()
    try:
        torch.default_generator.manual_seed(0)
        for _ in range(AUGMENT_DRAWS):  # each draw through the whole pipeline once, its shape read on the way
            pixels = shaped(image)
            shapes.add(tuple(pixels.shape))
            rest(pixels)
    except EdgeKDError:
        raise
    except Exception as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise EdgeKDError(f"augment: the train pipeline fails on an image ({type(err).__name__}: {detail})") from None
    finally:  # the random ops' draws do not shift the run's seeded stream
        torch.random.set_rng_state(state)
    if bad_channels := sorted({s[0] for s in shapes} - {channels}):
        raise EdgeKDError(f"augment: the train pipeline gives {'/'.join(map(str, bad_channels))}-channel images, not "
                          f"data.channels {channels} (the model's input): an op changes the channels (Grayscale: "
                          f"give num_output_channels: {channels}); leave it out or match data.channels")
    other = sorted(s for s in shapes if s != (channels, size, size))
    if other:
        sizes = ", ".join("x".join(map(str, s[1:])) for s in other[:3]) + (", ..." if len(other) > 3 else "")
        raise EdgeKDError(f"augment: the train pipeline gives {sizes} "
                          f"images, not data.image_size {size} (the model's input at eval and export): an op changes "
                          "the size (Pad, Resize, RandomZoomOut, a crop inside RandomApply); follow it with "
                          "RandomCrop or CenterCrop, or leave it out")


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
        **({"hair_kernel": data_cfg.hair_kernel} if data_cfg.hair_removal else {}),  # null: scaled per image
    }
