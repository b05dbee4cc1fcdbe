"""The names of the artifact formats and precisions, torch-free: the exporter's format table, the runtime's bundle
checks and the benchmark's options all take them from here."""

ARTIFACT_FORMATS = ("onnx", "openvino")
"""The formats `edgekd export` writes into a bundle (what each supports: `edgekd.export.FORMATS`)."""
PRECISIONS = ("fp32", "fp16", "int8")
TTA_VIEWS = ("original", "hflip", "vflip", "center_crop", "rot+15", "rot-15")
"""The test-time-augmentation views a bundle may name (KD-OCT's five plus the other rotation), in default order."""
