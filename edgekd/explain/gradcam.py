"""Grad-CAM (Selvaraju et al. 2017) for edgekd checkpoints via the `grad-cam` package, and heat-map overlay PNGs.

The target layer is a module path (default: the model's last feature stage from timm's `feature_info`); ViT
tokens and NHWC maps are laid out as NCHW with the feature taps' `to_map` (edgekd.models.taps), so any timm model works.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from edgekd.errors import EdgeKDError
from edgekd.fileio import atomic_write

DISPLAY_SIZE = 224
"""Overlays smaller than this are upscaled for viewing (a 28-px X-ray is unreadable at its own size)."""


EXPLAIN_BATCH = 32
"""Images decoded and explained at a time by `edgekd explain` (a folder's worth in one batch held every image and
its activations in memory)."""

BLANK_SPAN = 1e-6
"""A map whose values span less than this is flat: the layer's gradient for the class is zero (nothing shown)."""

MIN_CAM_SIDE = 3
"""The default layer is the last feature stage whose map is at least this many cells a side: at 28 px a
ResNet's last stage is 1x1, where Grad-CAM is a constant and shows nothing."""


def default_target_layer(model: nn.Module, input_shape: Sequence[int] | None = None) -> str:
    """The last feature stage named by timm's feature_info (with `input_shape` (C, H, W): the last one whose
    map is at least MIN_CAM_SIDE cells a side, found by a probe forward), else the last Conv2d module."""
    info = getattr(model, "feature_info", None)
    entries = [e["module"] for e in ((info.info if hasattr(info, "info") else info) or []) if e.get("module")]
    if entries and input_shape is None:
        return str(entries[-1])
    if entries:
        from edgekd.models import capture_features, resolve_layout, to_map

        was_training = model.training
        model.eval()
        with torch.no_grad(), capture_features(model, entries) as feats:
            model(torch.zeros(1, *input_shape))
        model.train(was_training)
        sides = {}
        for name in entries:
            layout = resolve_layout(model, feats[name], "auto", name)
            if layout != "vector":
                fmap = to_map(feats[name], layout, int(getattr(model, "num_prefix_tokens", 0)))
                sides[name] = min(fmap.shape[-2:])
        fine = [n for n in entries if sides.get(n, 0) >= MIN_CAM_SIDE]
        if fine or sides:
            largest = max(sides.values()) if sides else 0  # none reaches 3x3: the deepest of the largest maps
            return _reaching_the_head(model, str(fine[-1] if fine else [n for n in sides if sides[n] == largest][-1]))
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise EdgeKDError(f"{type(model).__name__}: no feature_info and no Conv2d layer; give --layer")
    return convs[-1]


def _reaching_the_head(model: nn.Module, layer: str) -> str:
    """A ViT that pools its class token: the patch tokens a block outputs never reach the head (the final norm is
    per token), so their Grad-CAM is zero everywhere; the block's first norm, whose tokens the block's attention
    mixes into the class token, is the layer to use (as pytorch-grad-cam's ViT example does)."""
    if getattr(model, "global_pool", None) == "token":
        norm = f"{layer}.norm1"
        if norm in dict(model.named_modules()):
            return norm
    return layer


def _reshape_for(model: nn.Module, layer: str, sample: torch.Tensor):
    """The grad-cam `reshape_transform` that turns the layer's output (tokens, NHWC) into NCHW, or None."""
    from edgekd.models import capture_features, resolve_layout, to_map

    was_training = model.training
    model.eval()
    with torch.no_grad(), capture_features(model, [layer]) as feats:
        model(sample[:1])
    model.train(was_training)
    layout = resolve_layout(model, feats[layer], "auto", layer)
    if layout == "vector":
        raise EdgeKDError(f"layer '{layer}' outputs a vector {tuple(feats[layer].shape)}: Grad-CAM needs a spatial "
                          "map (choose a convolutional stage with --layer)")
    if layout == "nchw":
        return None
    prefix = int(getattr(model, "num_prefix_tokens", 0)) if layout == "tokens" else 0
    return lambda out: to_map(out, layout, prefix)


def gradcam(model: nn.Module, inputs: torch.Tensor, layer: str | None = None,
            targets: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM maps (N, H, W) in [0, 1] at input resolution for `targets` (default: the predicted classes),
    and the model's softmax probabilities (N, K)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from edgekd.models import get_submodule

    was_training = model.training  # a caller's model in training (a callback) is handed back as it came
    try:
        layer = layer or default_target_layer(model, tuple(inputs.shape[1:]))
        module = get_submodule(model, layer)
        reshape = _reshape_for(model, layer, inputs)
        model.eval()
        with torch.no_grad():
            probs = torch.softmax(model(inputs).float(), dim=1).numpy()
        if targets is None:
            targets = probs.argmax(1).tolist()
        if len(targets) != len(inputs) or any(not 0 <= int(t) < probs.shape[1] for t in targets):
            raise EdgeKDError(f"Grad-CAM targets must be one class id in 0..{probs.shape[1] - 1} per image")
        with GradCAM(model=model, target_layers=[module], reshape_transform=reshape) as cam:
            maps = cam(input_tensor=inputs, targets=[ClassifierOutputTarget(int(t)) for t in targets])
        return np.asarray(maps, dtype=np.float32), probs
    finally:
        model.zero_grad(set_to_none=True)  # the backward pass's gradients are not the caller's
        model.train(was_training)


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45, size: int | None = DISPLAY_SIZE) -> np.ndarray:
    """uint8 (H, W, C) image + (H, W) map in [0, 1] -> uint8 RGB heat-map overlay (jet), upscaled to `size`."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]
    h, w = rgb.shape[:2]
    if size and max(h, w) < size:
        scale = size / max(h, w)
        new = (round(w * scale), round(h * scale))
        rgb = np.asarray(Image.fromarray(rgb).resize(new, Image.Resampling.BICUBIC))
        cam = np.asarray(Image.fromarray(cam.astype(np.float32), mode="F").resize(new, Image.Resampling.BILINEAR))
    return show_cam_on_image(rgb.astype(np.float32) / 255.0, np.clip(cam, 0, 1), use_rgb=True, image_weight=1 - alpha)


def save_png(array: np.ndarray, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def checkpoint_pipeline(ckpt: dict[str, Any], data_cfg=None):
    """(geometry, normalize) halves of a checkpoint's eval transform (or of `data_cfg`'s: an export at another
    input size): uint8 resize/crop, then float normalization."""
    from torchvision.transforms import v2

    from edgekd.data import build_transforms
    from edgekd.recipe import recipe_from_dict

    if data_cfg is None:
        data_cfg = recipe_from_dict(ckpt["recipe"], where="checkpoint (embedded recipe)").data
    pipeline = build_transforms(data_cfg, [], train=False)
    if not isinstance(pipeline.transforms[-1], v2.Normalize):
        raise EdgeKDError("Grad-CAM: the eval pipeline must end with Normalize")
    return v2.Compose(pipeline.transforms[:-2]), v2.Compose(pipeline.transforms[-2:])


def explain_arrays(model: nn.Module, ckpt: dict[str, Any], images: Sequence[np.ndarray], out: str | Path,
                   names: Sequence[str], layer: str | None = None, targets: Sequence[int] | None = None,
                   labels: Sequence[int] | None = None, data_cfg=None) -> list[dict[str, Any]]:
    """Grad-CAM overlays of decoded uint8 images, written as <out>/<name>_gradcam.png; one record per image
    (`data_cfg`: preprocess as it says, not as the checkpoint's recipe)."""
    from edgekd.data import chw_tensor

    geometry, normalize = checkpoint_pipeline(ckpt, data_cfg)
    sized = [geometry(chw_tensor(a)) for a in images]
    inputs = torch.stack([normalize(s) for s in sized])
    layer = layer or default_target_layer(model, tuple(inputs.shape[1:]))
    maps, probs = gradcam(model, inputs, layer, targets)
    class_names = list(ckpt["class_names"])
    out = Path(out)
    records = []
    for i, (name, img, cam) in enumerate(zip(names, sized, maps)):
        target = int(targets[i]) if targets is not None else int(probs[i].argmax())
        path = save_png(overlay(img.permute(1, 2, 0).numpy(), cam), out / f"{name}_gradcam.png")
        blank = float(cam.max() - cam.min()) < BLANK_SPAN
        peak = np.unravel_index(int(cam.argmax()), cam.shape)
        shown = layer[4:] if isinstance(model, TaskHead) else layer  # as --layer takes it (not the wrapper's net.)
        records.append({"image": name, "overlay": path.name, "layer": shown, "target": class_names[target],
                        "predicted": class_names[int(probs[i].argmax())], "prob": float(probs[i].max()),
                        "target_prob": float(probs[i][target]), "probs": [float(v) for v in probs[i]],
                        "label": None if labels is None else class_names[int(labels[i])],
                        "input_size": list(cam.shape), "blank": blank,
                        "peak_yx": None if blank else [int(peak[0]), int(peak[1])]})
    return records


class TaskHead(nn.Module):
    """One task's outputs of a model with one head per task (the logits `lo:hi`), as a model of its own; other
    attributes (a ViT's token layout) read through to the model."""

    def __init__(self, net: nn.Module, lo: int, hi: int):
        super().__init__()
        self.net, self.lo, self.hi = net, lo, hi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[:, self.lo:self.hi]

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.net, name)


def task_model(model: nn.Module, ckpt: dict[str, Any], task: str | None, layer: str | None,
               where: str) -> tuple[nn.Module, dict[str, Any], str | None]:
    """(model, checkpoint, layer) to explain: a model with one head per task as the chosen task's head (its class
    names; the layer found on the model itself, under `net.`). One softmax over every head's outputs would mix the
    tasks; a checkpoint of one task so far needs no --task."""
    from edgekd.continual import task_head

    chosen = task_head(ckpt, task, where, "Grad-CAM of one softmax over every head's outputs would mix the tasks")
    if chosen is None:
        return model, ckpt, layer
    from edgekd.models import get_submodule

    if layer is not None:
        if layer.startswith("net.") and not hasattr(model, "net"):  # as an earlier explain.json recorded it
            layer = layer[4:]
        get_submodule(model, layer)  # a wrong --layer named as given, not under the wrapper's `net.`
    layer = layer or default_target_layer(model, tuple(ckpt["preprocess"]["input_size"]))
    lo, hi = chosen["outputs"]
    return (TaskHead(model, lo, hi), {**ckpt, "class_names": list(chosen["class_names"]), "task": chosen["name"]},
            f"net.{layer}")


def explain_files(checkpoint: str | Path, images: Sequence[str | Path], out: str | Path, layer: str | None = None,
                  target: str | None = None, task: str | None = None,
                  skipped: list[dict[str, str]] | None = None) -> list[dict[str, Any]]:
    """`edgekd explain`: Grad-CAM overlay PNGs for image files; writes explain.json beside them. `task`: a model
    with one head per task explains that task's head. `skipped`: a list to collect unreadable files in ({file,
    error}, also in explain.json), as `edgekd predict` skips them; None: the first one is the error."""
    from edgekd.fileio import check_output_location, refuse_output_inside, staged_files, write_json
    from edgekd.train.checkpoint import model_from_checkpoint

    if isinstance(images, (str, Path)):  # one path given bare had been read letter by letter ("i: image file not
        images = [images]  # found" for "imgs/a.png")
    if not images:
        raise EdgeKDError("explain: give at least one image")
    check_output_location(out)  # a file or read-only folder: before the model is loaded and run
    refuse_output_inside(out, [checkpoint])  # nor into a bundle (its manifest would refuse it after) or a repository
    model, ckpt = model_from_checkpoint(checkpoint)
    model, ckpt, layer = task_model(model, ckpt, task, layer, str(checkpoint))
    class_names = list(ckpt["class_names"])
    targets = None
    if target is not None and ckpt.get("task") and target.startswith(f"{ckpt['task']}:"):
        target = target.split(":", 1)[1]  # TASK:CLASS, as the model's class names spell it
    if target is not None:
        if target not in class_names and not (target.isdigit() and int(target) < len(class_names)):
            raise EdgeKDError(f"--target '{target}': not a class ({', '.join(class_names)}) or class id")
        tid = class_names.index(target) if target in class_names else int(target)
        targets = [tid] * len(images)
    names = unique_names([Path(p).stem for p in images])
    out = Path(out)

    def remove_stale(stage: Path) -> None:  # an earlier run's overlays not replaced would contradict the new json
        for stale in earlier_overlays(out):
            if not (stage / stale).exists():
                (out / stale).unlink(missing_ok=True)

    # staged inside --out, then moved up: a failure in a later batch leaves --out as it was, and a stop half-way
    # no longer leaves two models' overlays beside the older json
    with staged_files(out, last="explain.json", before_publish=remove_stale) as stage:
        records = []
        for start in range(0, len(images), EXPLAIN_BATCH):  # decoded and explained a batch at a time
            arrays, kept = readable(images, range(start, min(start + EXPLAIN_BATCH, len(images))), skipped)
            got = explain_arrays(model, ckpt, arrays, stage, [names[i] for i in kept], layer,
                                 [targets[i] for i in kept] if targets is not None else None) if kept else []
            records += [{**rec, "file": str(images[i])} for rec, i in zip(got, kept)]
        if not records:  # (skipped: every one unreadable)
            raise EdgeKDError(f"explain: no readable image ({skipped[0]['file']}: {skipped[0]['error']})")
        write_json(stage / "explain.json", {"checkpoint": str(checkpoint), "method": "Grad-CAM",
                                            **({"task": ckpt["task"]} if ckpt.get("task") else {}),
                                            "images": records, **({"skipped": skipped} if skipped else {})})
    return records


def readable(images: Sequence[str | Path], indices: range,
             skipped: list[dict[str, str]] | None) -> tuple[list[np.ndarray], list[int]]:
    """The decoded images of `indices` and which they are; an unreadable one raises, or with a `skipped` list goes
    there."""
    from edgekd.imageio import read_image

    arrays, kept = [], []
    for i in indices:
        try:
            arrays.append(read_image(images[i]))
        except EdgeKDError as err:
            if skipped is None:
                raise
            skipped.append({"file": str(images[i]), "error": str(err)})
            continue
        kept.append(i)
    return arrays, kept


def earlier_overlays(out: Path) -> list[str]:
    """The overlay files an earlier `edgekd explain` into `out` listed in its explain.json (none if unreadable)."""
    import json

    try:
        listed = json.loads((out / "explain.json").read_text())["images"]
        return [Path(r["overlay"]).name for r in listed if str(r.get("overlay", "")).endswith("_gradcam.png")]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def unique_names(stems: Sequence[str]) -> list[str]:
    """The stems, each repeated one suffixed _2, _3, ... past every name already given (x, x, x_2 -> x, x_3, x_2)."""
    taken = set(stems)
    names: list[str] = []
    for stem in stems:
        name, k = stem, 2
        while name in names or (name != stem and name in taken):
            name, k = f"{stem}_{k}", k + 1
        names.append(name)
    return names


def card_overlays(model: nn.Module, ckpt: dict[str, Any], dataset, out: str | Path, n: int = 4,
                  seed: int = 0, data_cfg=None) -> list[dict[str, Any]]:
    """Grad-CAM overlays of `n` test images for a deployment card: a fixed seeded pick, classes taken in turn
    (so every class is shown when n allows); records carry the true label and the prediction. `data_cfg`: the
    bundle's preprocessing (an export at another input size than the checkpoint's)."""
    labels = np.asarray(dataset.table.labels)
    order = np.random.default_rng(seed).permutation(len(labels))
    queues = [list(order[labels[order] == c]) for c in np.unique(labels)]
    picked: list[int] = []
    while len(picked) < min(n, len(labels)):
        for q in queues:
            if q and len(picked) < n:
                picked.append(int(q.pop(0)))
    names = [f"test{i}" for i in picked]
    return explain_arrays(model, ckpt, [dataset.raw(i) for i in picked], out, names,
                          labels=[int(labels[i]) for i in picked], data_cfg=data_cfg)
