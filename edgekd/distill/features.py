"""Feature KD's trainable side: adapters from student to teacher channels, parameter-free map readers, spatial
alignment (the taps and layouts they read are in edgekd.models.taps)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgekd.models import channels_of, resolve_layout, to_map, tokens_to_map


def align_spatial(student: torch.Tensor, teacher: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Make two NCHW maps the same HxW. pool: average-pool the larger down to the smaller grid (per axis);
    interpolate: resize the student map to the teacher's grid (bilinear; an area average when it shrinks both axes,
    so a 4x smaller grid averages every student position instead of sampling two of each four; at 2x both are the
    2x2 block means)."""
    if student.shape[-2:] == teacher.shape[-2:]:
        return student, teacher
    if mode == "interpolate":
        shrinks = student.shape[-2] >= teacher.shape[-2] and student.shape[-1] >= teacher.shape[-1]
        if shrinks:
            return F.interpolate(student, size=teacher.shape[-2:], mode="area"), teacher
        return F.interpolate(student, size=teacher.shape[-2:], mode="bilinear", align_corners=False), teacher
    size = (min(student.shape[-2], teacher.shape[-2]), min(student.shape[-1], teacher.shape[-1]))
    return F.adaptive_avg_pool2d(student, size), F.adaptive_avg_pool2d(teacher, size)


class FeatureAdapter(nn.Module):
    """Maps a student layer's output onto the teacher layer's channels: a 1x1 conv on maps, a linear layer on
    ViT tokens (the same map applied per position). Trained with the student, never saved in its weights."""

    def __init__(self, student_layout: str, student_channels: int, teacher_layout: str, teacher_channels: int,
                 student_prefix_tokens: int = 0, teacher_prefix_tokens: int = 0):
        super().__init__()
        self.student_layout, self.teacher_layout = student_layout, teacher_layout
        self.student_prefix, self.teacher_prefix = student_prefix_tokens, teacher_prefix_tokens
        if student_layout == "tokens":
            self.proj = nn.Linear(student_channels, teacher_channels)
        else:
            self.proj = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        if self.student_layout == "tokens":
            return tokens_to_map(self.proj(feature), self.student_prefix)
        return self.proj(to_map(feature, self.student_layout))

    def teacher_map(self, feature: torch.Tensor) -> torch.Tensor:
        return to_map(feature, self.teacher_layout, self.teacher_prefix)


def layout_and_prefix(model: nn.Module, feature: torch.Tensor, layout: str,
                      layer: str | None = None) -> tuple[str, int]:
    """A tapped output's resolved layout (`layer`: the tap's path, whose own output_fmt counts) and, for tokens,
    the model's count of class/register tokens to drop."""
    resolved = resolve_layout(model, feature, layout, layer)
    return resolved, int(getattr(model, "num_prefix_tokens", 0)) if resolved == "tokens" else 0


def build_adapter(student: nn.Module, student_feature: torch.Tensor, student_layout: str,
                  teacher: nn.Module, teacher_feature: torch.Tensor, teacher_layout: str,
                  student_layer: str | None = None, teacher_layer: str | None = None) -> FeatureAdapter:
    """An adapter sized from probe outputs of the two tapped layers (named, for their own output format)."""
    s_layout, s_prefix = layout_and_prefix(student, student_feature, student_layout, student_layer)
    t_layout, t_prefix = layout_and_prefix(teacher, teacher_feature, teacher_layout, teacher_layer)
    adapter = FeatureAdapter(s_layout, channels_of(student_feature, s_layout), t_layout,
                             channels_of(teacher_feature, t_layout), s_prefix, t_prefix)
    # Check the token grids now so a bad layer choice fails before training starts.
    with torch.no_grad():
        adapter(student_feature)
        adapter.teacher_map(teacher_feature)
    return adapter


class FeatureMaps(nn.Module):
    """Reads two tapped outputs as NCHW maps without learning anything (attention transfer needs no adapter:
    the channel reduction makes any channel counts comparable)."""

    def __init__(self, student_layout: str, teacher_layout: str, student_prefix_tokens: int = 0,
                 teacher_prefix_tokens: int = 0):
        super().__init__()
        self.student_layout, self.teacher_layout = student_layout, teacher_layout
        self.student_prefix, self.teacher_prefix = student_prefix_tokens, teacher_prefix_tokens

    def student_map(self, feature: torch.Tensor) -> torch.Tensor:
        return to_map(feature, self.student_layout, self.student_prefix)

    def teacher_map(self, feature: torch.Tensor) -> torch.Tensor:
        return to_map(feature, self.teacher_layout, self.teacher_prefix)


def build_feature_maps(student: nn.Module, student_feature: torch.Tensor, student_layout: str,
                       teacher: nn.Module, teacher_feature: torch.Tensor, teacher_layout: str,
                       student_layer: str | None = None, teacher_layer: str | None = None) -> FeatureMaps:
    """A FeatureMaps reader with layouts resolved from probe outputs of the two tapped layers."""
    s_layout, s_prefix = layout_and_prefix(student, student_feature, student_layout, student_layer)
    t_layout, t_prefix = layout_and_prefix(teacher, teacher_feature, teacher_layout, teacher_layer)
    maps = FeatureMaps(s_layout, t_layout, s_prefix, t_prefix)
    with torch.no_grad():  # a bad layer choice (e.g. a token grid that is not square) fails before training
        maps.student_map(student_feature)
        maps.teacher_map(teacher_feature)
    return maps
