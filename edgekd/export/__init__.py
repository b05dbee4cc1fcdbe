"""Export: ONNX and OpenVINO artifacts (FP32/FP16/INT8), the parity gate, metadata and the hashed edge bundle."""

from edgekd.export.bundle import check_target, metric_subset_reference
from edgekd.export.continual import RetentionGateError
from edgekd.export.formats import FORMATS, ExportFormat, export_plan
from edgekd.export.parity import REPORTED_METRICS
from edgekd.export.profile import ExportProfile, load_profile, profile_digest, profile_from_dict, shipped_profiles
from edgekd.export.run import (ExportInputs, ExportResult, ParityGateError, export_checkpoint, export_inputs,
                               with_overrides, zip_beside)

__all__ = ["FORMATS", "REPORTED_METRICS", "ExportFormat", "ExportInputs", "ExportProfile", "ExportResult",
           "ParityGateError", "RetentionGateError", "check_target", "export_checkpoint", "export_inputs", "export_plan",
           "load_profile", "metric_subset_reference", "profile_digest", "profile_from_dict", "shipped_profiles",
           "with_overrides", "zip_beside"]
