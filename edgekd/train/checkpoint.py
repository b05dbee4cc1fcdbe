"""The one checkpoint format: plain data + tensors, written atomically, read with weights_only=True."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgekd.errors import EdgeKDError, shorten
from edgekd.fileio import atomic_write, is_torch_file_head
from edgekd.models import create_model
from edgekd.recipe import recipe_differences
from edgekd.runtime import METADATA_FILE, is_bundle

FORMAT = "edgekd-checkpoint/1"


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    payload = {"format": FORMAT, **payload}
    size = sum(t.numel() * t.element_size() for t in payload.get("state_dict", {}).values())
    return atomic_write(path, lambda tmp: torch.save(payload, tmp), min_free_bytes=2 * size + 16 * 2**20)


def checkpoints_in_folder(path: Path) -> str:
    """What a folder given where a checkpoint file belongs holds instead: its checkpoint (best.pt; a continual
    run's model.pt), a k-fold run's one per fold, or '' (none)."""
    found = next((path / n for n in ("best.pt", "model.pt") if (path / n).is_file()), None)
    if found:
        return f"its checkpoint is {found}"
    runs: dict[str, list[Path]] = {}  # edgekd train --folds: fold<i>/<role>/best.pt, each without its fold's val
    for found in path.glob("fold*/*/best.pt"):
        if found.parent.parent.name[4:].isdigit():
            runs.setdefault(found.parent.name, []).append(found)
    if not runs:
        return ""
    spans = []
    for role in sorted(runs):
        ordered = sorted(runs[role], key=lambda p: int(p.parent.parent.name[4:]))  # fold10 after fold9
        spans.append(f"{ordered[0]}" + (f" ... {ordered[-1]}" if len(ordered) > 1 else ""))
    return f"a k-fold run, one checkpoint per fold{' and role' if len(runs) > 1 else ''}: {'; '.join(spans)}"


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read an edgekd checkpoint safely (no pickle code execution) and check its format."""
    path = Path(path)
    if path.is_dir():
        what = "an exported bundle" if (path / METADATA_FILE).is_file() else "a folder"
        hint = checkpoints_in_folder(path)
        raise EdgeKDError(f"{path}: {what}, not a checkpoint file (best.pt){'; ' + hint if hint else ''}")
    if not path.is_file():
        raise EdgeKDError(f"{path}: checkpoint not found")
    if path.suffix.lower() == ".zip" and is_bundle(path):  # torch.load read it as a torch zip and failed obscurely
        raise EdgeKDError(f"{path}: a zipped exported bundle, not a checkpoint file (best.pt)")
    if path.suffix.lower() in (".json", ".yaml", ".yml", ".csv", ".md", ".txt"):  # torch.load's words would follow
        raise EdgeKDError(f"{path}: a {path.suffix[1:].upper()} file, not a checkpoint (best.pt or last.pt)")
    exported = {".onnx": "an ONNX model", ".xml": "an OpenVINO IR file", ".bin": "an OpenVINO IR weights file"}
    if path.suffix.lower() in exported and (path.suffix.lower() != ".bin" or path.with_suffix(".xml").is_file()):
        raise EdgeKDError(f"{path}: {exported[path.suffix.lower()]}, not a checkpoint: give the training run's "
                          "best.pt")
    with path.open("rb") as fh:  # torch.save writes a zip; older torch a pickle (protocol byte 0x80)
        head = fh.read(4)
    if head and not is_torch_file_head(head):  # a text file gave "KeyError: 101"
        raise EdgeKDError(f"{path}: not a readable checkpoint (not a PyTorch file: neither a torch.save zip nor a pickle)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's message explains its weights_only defaults at length
        raise EdgeKDError(f"{path}: not a readable checkpoint (not a PyTorch file of tensors: torch.load with "
                          "weights_only=True refused it)") from None
    except Exception as err:  # torch raises RuntimeError/EOFError/zipfile errors
        raise EdgeKDError(f"{path}: not a readable checkpoint ({type(err).__name__}: "
                          f"{shorten(str(err).splitlines()[0], 100) if str(err) else 'truncated or corrupt'})") from None
    given = ckpt.get("format") if isinstance(ckpt, dict) else None
    if isinstance(given, str) and given.startswith(FORMAT.rsplit("/", 1)[0] + "/") and given != FORMAT:
        raise EdgeKDError(f"{path}: checkpoint format {given!r}, this edgekd reads {FORMAT!r} (a newer or older "
                          "edgekd wrote it)")
    if given != FORMAT:
        raise EdgeKDError(f"{path}: not an edgekd checkpoint (missing format '{FORMAT}')")
    for key in ("arch", "state_dict", "class_names", "preprocess"):
        if key not in ckpt:
            raise EdgeKDError(f"{path}: checkpoint lacks '{key}'")
    return with_legacy_hair_kernel(ckpt)


def with_legacy_hair_kernel(ckpt: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint trained with hair removal before data.hair_kernel existed removed hair with a 17 px element at
    every image size: its preprocess and recipe say so, so that evaluating, exporting or resuming it removes hair as
    its training did (the new default scales the element to the image)."""
    from edgekd.hair import LEGACY_KERNEL, recorded_kernel

    pre = ckpt["preprocess"]
    if isinstance(pre, dict) and pre.get("hair_removal"):
        pre["hair_kernel"] = recorded_kernel(pre)
    recipe = ckpt.get("recipe") if isinstance(ckpt.get("recipe"), dict) else {}
    data = recipe.get("data")
    if isinstance(data, dict) and "hair_kernel" not in data:  # a recipe from before the key (now always dumped)
        tasks = (recipe.get("continual") or {}).get("tasks") or []  # a task's own data may turn hair removal on
        for section in (data, *(t.get("data") for t in tasks if isinstance(t, dict))):
            if isinstance(section, dict) and section.get("hair_removal") and "hair_kernel" not in section:
                section["hair_kernel"] = LEGACY_KERNEL
    return ckpt


def load_resumable(path: str | Path, recipe) -> dict[str, Any]:
    """A checkpoint a run resumes from (a trainer's last.pt, a continual task's task.pt or model.pt): written by this
    very recipe (same digest), else a one-line error."""
    ckpt = load_checkpoint(path)
    if ckpt.get("recipe_digest") not in recipe.digests():
        changed = recipe_differences(ckpt.get("recipe") or {}, recipe.to_dict()) if ckpt.get("recipe") else []
        named = (f" ({'; '.join(changed[:3])}{f'; and {len(changed) - 3} more' if len(changed) > 3 else ''})"
                 if changed else "")
        then = ((ckpt.get("recipe") or {}).get("data") or {}).get("resize")
        resize = (f" (a run started before data.resize followed --set data.image_size, 2026-12-07: add --set "
                  f"data.resize={then})" if len(changed) == 1 and changed[0].startswith("data.resize:") else "")
        raise EdgeKDError(f"{path}: was trained with another recipe{named}; resume with the same recipe and --set "
                          f"values{resize}")
    return ckpt


def load_state(model: nn.Module, state_dict: dict[str, torch.Tensor], where: str) -> None:
    """load_state_dict with a one-line error for another architecture or class count."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        raise EdgeKDError(f"{where}: weights do not fit {type(model).__name__} "
                          f"({len(missing)} missing, {len(unexpected)} unexpected keys, e.g. "
                          f"{(missing or unexpected)[0]!r})")
    for k, v in state_dict.items():
        if own[k].shape != v.shape:
            raise EdgeKDError(f"{where}: '{k}' has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)} "
                              "(another architecture or class count?)")
    check_finite(model, state_dict, where)
    model.load_state_dict(state_dict)


def check_finite(model: nn.Module, state_dict: dict[str, torch.Tensor], where: str) -> None:
    """Weights with NaN or inf (buffers: NaN; a buffer may hold an inf bound) are a one-line error naming the file
    and tensor: they failed later, in scikit-learn ("Input contains NaN"), without naming the file."""
    params = {k for k, _ in model.named_parameters()}
    for k, t in state_dict.items():
        if not (torch.is_tensor(t) and t.is_floating_point()):
            continue
        if (not torch.isfinite(t).all()) if k in params else bool(torch.isnan(t).any()):
            raise EdgeKDError(f"{where}: the weights are not finite (NaN or inf in '{k}'): the run that wrote it "
                              "diverged or the file was altered")


def model_from_checkpoint(path_or_ckpt: str | Path | dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint describes, load its weights, return (model in eval mode, checkpoint)."""
    ckpt = path_or_ckpt if isinstance(path_or_ckpt, dict) else load_checkpoint(path_or_ckpt)
    where = str(path_or_ckpt) if not isinstance(path_or_ckpt, dict) else "checkpoint"
    model = create_model(ckpt["arch"], pretrained=False)
    load_state(model, ckpt["state_dict"], where)
    return model.eval(), ckpt
