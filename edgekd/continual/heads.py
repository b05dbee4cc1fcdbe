"""Expanding output layers: grow (or reset) a model's final Linear classifier while keeping the old rows, so the
logits of earlier classes are unchanged. Multi-head and single-head scenarios both use one growing Linear:
a task's head is its slice of output rows."""

from __future__ import annotations

import torch
from torch import nn

from edgekd.errors import EdgeKDError
from edgekd.models import classifier_name, get_submodule, set_submodule


def final_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """Path and module of the last Linear of the classifier (timm's own, or the end of a dropout/MLP head)."""
    path = classifier_name(model)
    head = get_submodule(model, path)
    if isinstance(head, nn.Linear):
        return path, head
    if isinstance(head, nn.Sequential):
        for name, module in reversed(list(head.named_children())):
            if isinstance(module, nn.Linear):
                return f"{path}.{name}", module
    raise EdgeKDError(f"{type(model).__name__}: classifier '{path}' is not a Linear layer; it cannot be expanded")


def num_outputs(model: nn.Module) -> int:
    return final_linear(model)[1].out_features


@torch.no_grad()
def resize_classifier(model: nn.Module, num_classes: int, keep: int | None = None) -> nn.Linear:
    """Replace the final Linear by one with `num_classes` outputs; rows 0..keep-1 are copied from the old layer
    (default: all old rows), the others freshly initialised. keep=0 resets the head."""
    path, old = final_linear(model)
    keep = min(old.out_features, num_classes) if keep is None else keep
    if keep > min(old.out_features, num_classes):
        raise EdgeKDError(f"cannot keep {keep} classifier rows: the head has {old.out_features}, new size {num_classes}")
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None).to(old.weight.device, old.weight.dtype)
    new.weight[:keep] = old.weight[:keep]
    if old.bias is not None:
        new.bias[:keep] = old.bias[:keep]
    new.weight.requires_grad_(old.weight.requires_grad)
    if old.bias is not None:  # a frozen head's bias had become trainable when the head grew
        new.bias.requires_grad_(old.bias.requires_grad)
    set_submodule(model, path, new)
    if hasattr(model, "num_classes"):
        model.num_classes = num_classes
    return new
