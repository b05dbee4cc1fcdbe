"""What every format shares: the export context handed to an exporter and the session a parity check runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from torch import nn

from edgekd.export.profile import ExportProfile

INPUT_NAME, OUTPUT_NAME = "input", "logits"
EXPORT_BATCH = 2
"""The example batch the graph is traced with; parity runs at other batch sizes to prove the axis is dynamic."""


@dataclass
class ExportContext:
    """The model and everything an exporter may need; fp32 intermediates are cached for the INT8 paths."""

    model: nn.Module
    input_shape: tuple[int, int, int]
    metadata: dict[str, Any]
    profile: ExportProfile
    scratch: Path
    calibration: Callable[[], np.ndarray]
    """Lazily built (N, C, H, W) float32 calibration inputs (preprocessed training images)."""
    validation: Callable[[], tuple[np.ndarray, np.ndarray]]
    """Lazily built (inputs, labels) of the validation split, for NNCF's accuracy-controlled mode."""
    log: Callable[[str], None] = print
    cache: dict[str, Any] = field(default_factory=dict)
    progress: Any = None
    """The CLI's rich progress bar (edgekd.progress.progress_task), or None: calibration passes show on it."""

    def example_input(self):
        import torch

        return torch.randn(EXPORT_BATCH, *self.input_shape, generator=torch.Generator().manual_seed(0))


@dataclass
class ArtifactSession:
    """An exported model loaded for inference: its io signature and a run function (float32 NCHW -> logits)."""

    input_names: list[str]
    output_names: list[str]
    input_shape: list[int | None]
    """None marks a dynamic dimension."""
    output_shape: list[int | None]
    run: Callable[[np.ndarray], np.ndarray]
