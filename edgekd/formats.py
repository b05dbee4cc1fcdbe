"""The names of the artifact formats and precisions, torch-free: the exporter's format table, the runtime's bundle
checks and the benchmark's options all take them from here; and how a parameter count is shown."""

ARTIFACT_FORMATS = ("onnx", "openvino")
"""The formats `edgekd export` writes into a bundle (what each supports: `edgekd.export.FORMATS`)."""
PRECISIONS = ("fp32", "fp16", "int8")
TTA_VIEWS = ("original", "hflip", "vflip", "center_crop", "rot+15", "rot-15")
"""The test-time-augmentation views a bundle may name (KD-OCT's five plus the other rotation), in default order."""


def param_count(n: int) -> str:
    """A parameter count as the tables show it: 1.23M from 0.1M up, else 4.4k (a 4.4k-parameter model had shown as
    0.00M)."""
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"
