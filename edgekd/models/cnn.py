"""A small custom CNN baseline, registered with timm so `create_model('edgekd_cnn')` works like any timm model."""

from __future__ import annotations

import torch
from torch import nn
from timm.models import load_state_dict, register_model


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class SmallCNN(nn.Module):
    """Conv-BN-ReLU blocks that halve the resolution, global average pooling, dropout, linear head.

    Exposes the timm interface edgekd relies on: forward_features, forward_head, get_classifier,
    reset_classifier, feature_info and group_matcher.
    """

    def __init__(self, num_classes: int = 2, in_chans: int = 3, widths: tuple[int, ...] = (32, 64, 128),
                 drop_rate: float = 0.2):
        super().__init__()
        self.num_classes, self.drop_rate = num_classes, drop_rate
        chans = [in_chans, *widths]
        self.stages = nn.Sequential(*[_block(chans[i], chans[i + 1]) for i in range(len(widths))])
        self.num_features = widths[-1]
        self.feature_info = [dict(num_chs=w, reduction=2 ** (i + 1), module=f"stages.{i}") for i, w in enumerate(widths)]
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.pretrained_cfg = {"classifier": "fc"}

    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^stages\.0", "blocks": r"^stages\.(\d+)"}

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.pool(x).flatten(1))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create(pretrained: bool, widths: tuple[int, ...], **kwargs) -> SmallCNN:
    weights = (kwargs.get("pretrained_cfg_overlay") or {}).get("file")  # model.weights
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "drop_path_rate"):
        kwargs.pop(key, None)
    if pretrained and not weights:
        raise ValueError("the edgekd_cnn models have no hub weights")  # create_model says so first, with the fix
    model = SmallCNN(widths=widths, **kwargs)
    if weights:
        load_backbone(model, weights)
    return model


def load_backbone(model: SmallCNN, path: str) -> None:
    """Load a weights file's convolutional blocks into `model` (timm's reader: a plain state dict, .safetensors, or
    a checkpoint's `state_dict`, an edgekd checkpoint included); its head is replaced after, so it is left out."""
    state = {k: v for k, v in load_state_dict(path).items() if not k.startswith("fc.")}
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    wrong = [f"'{k}' {tuple(v.shape)} where this model has {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if wrong or missing:
        raise ValueError("not this model's weights: " + (wrong[0] if wrong else
                         f"{len(missing)} of its {len(own)} weights missing, e.g. '{missing[0]}'"))
    model.load_state_dict(state, strict=False)


@register_model
def edgekd_cnn(pretrained: bool = False, **kwargs) -> SmallCNN:
    """The baseline: 3 double-conv blocks, 32/64/128 channels (~0.29M parameters)."""
    return _create(pretrained, (32, 64, 128), **kwargs)


@register_model
def edgekd_cnn_small(pretrained: bool = False, **kwargs) -> SmallCNN:
    """The edge student: the baseline's layout at 12/24/48 channels (~41k parameters, 4.3M MACs at 28 px)."""
    return _create(pretrained, (12, 24, 48), **kwargs)


@register_model
def edgekd_cnn_micro(pretrained: bool = False, **kwargs) -> SmallCNN:
    """A smaller edge student: 8/16/32 channels (~18k parameters, 2.0M MACs at 28 px), every width a multiple of
    the 8 float32 lanes of an AVX2 register."""
    return _create(pretrained, (8, 16, 32), **kwargs)


@register_model
def edgekd_cnn_tiny(pretrained: bool = False, **kwargs) -> SmallCNN:
    """A very small variant for tests: 8/16 channels."""
    return _create(pretrained, (8, 16), **kwargs)
