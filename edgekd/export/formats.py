"""The export formats as one table (name, file suffix, allowed precisions, exporter, session), addressed by name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edgekd.errors import EdgeKDError
from edgekd.export.artifact import ArtifactSession, ExportContext
from edgekd.export.onnx import export_onnx_artifact, open_onnx
from edgekd.export.openvino import export_openvino_artifact, open_openvino
from edgekd.formats import PRECISIONS


@dataclass(frozen=True)
class ExportFormat:
    name: str
    suffix: str
    precisions: tuple[str, ...]
    export: Callable[[ExportContext, str, Path], dict[str, Any]]
    """Writes the artifact at the given path; returns extra fields for its edgekd.json entry (opset, ...)."""
    open: Callable[[Path, str, int | None], ArtifactSession]
    companions: tuple[str, ...] = ()
    """Files written next to the main one (OpenVINO's .bin weights)."""

    def relpath(self, precision: str) -> str:
        """Where the artifact lives inside a bundle: onnx/model_fp32.onnx, openvino/model_int8.xml, ..."""
        return f"{self.name}/model_{precision}{self.suffix}"

    def files(self, path: Path) -> list[Path]:
        return [path, *(path.with_suffix(s) for s in self.companions)]


FORMATS: dict[str, ExportFormat] = {f.name: f for f in (
    # FP16 ONNX is left out: ONNX Runtime's CPU provider lacks FP16 kernels for most ops; OpenVINO covers FP16.
    ExportFormat("onnx", ".onnx", ("fp32", "int8"), export_onnx_artifact, open_onnx),
    ExportFormat("openvino", ".xml", PRECISIONS, export_openvino_artifact, open_openvino, (".bin",)),
)}


def export_plan(formats: list[str], precisions: list[str],
                profile: tuple[str | None, str | None] = (None, None)) -> list[tuple[ExportFormat, str]]:
    """The (format, precision) pairs to build. A pair a format does not support is skipped, but every format and
    every precision asked for must be used at least once (`--format onnx --precision fp16` is an error).
    `profile`: the export profile's name where the formats / precisions came from it (errors name it, not an
    option the user did not give)."""
    def said(option: str, value: str, source: str | None) -> str:
        return f"--{option} {value}" if source is None else f"{option} {value} (export profile {source})"

    formats, precisions = [f.lower() for f in formats or []], [p.lower() for p in precisions or []]  # as predict
    if not formats:
        raise EdgeKDError("--format: give at least one format")
    if not precisions:
        raise EdgeKDError("--precision: give at least one precision")
    for name in formats:
        if name not in FORMATS:
            raise EdgeKDError(f"--format: unknown format '{name}' (choose from {', '.join(FORMATS)})")
    for p in precisions:
        if p not in PRECISIONS:
            raise EdgeKDError(f"--precision: unknown precision '{p}' (choose from {', '.join(PRECISIONS)})")
    # FP32 first within a format: an INT8 artifact is timed against its format's FP32 (quantization.min_speedup).
    formats, precisions = list(dict.fromkeys(formats)), sorted(dict.fromkeys(precisions), key=PRECISIONS.index)
    plan = [(FORMATS[f], p) for f in formats for p in precisions if p in FORMATS[f].precisions]
    for p in precisions:
        if not any(pp == p for _, pp in plan):
            supported = "; ".join(f"{f}: {', '.join(FORMATS[f].precisions)}" for f in formats)
            raise EdgeKDError(f"{said('precision', p, profile[1])}: not supported by {', '.join(formats)} ({supported})")
    for f in formats:
        if not any(ff.name == f for ff, _ in plan):
            raise EdgeKDError(f"{said('format', f, profile[0])}: supports {', '.join(FORMATS[f].precisions)}, none "
                              "of which was asked for")
    return plan
