"""The torch-free edge runtime: open a verified bundle, preprocess like training, run OpenVINO/ONNX Runtime with TTA."""

from edgekd.imageio import DicomFrame
from edgekd.probability import softmax
from edgekd.runtime.backends import compile_for_cpu, openvino_rt_metadata
from edgekd.runtime.bundle import (MANIFEST_FILE, MAX_RESIZE_FACTOR, MAX_THREADS, METADATA_FILE, RT_INFO_SECTION,
                                   SCHEMA, Artifact, Bundle, cap_to_cores, check_embedded_metadata, is_bundle,
                                   metadata_strings, open_bundle, parse_metadata_strings, verify_manifest)
from edgekd.runtime.inputs import collect_inputs, collect_labelled
from edgekd.runtime.output import check_output_path, predictions_document, write_predictions
from edgekd.runtime.preprocess import Preprocessor, as_image_array
from edgekd.runtime.repository import Repository, is_model_repository, preprocessing_steps, write_repository
from edgekd.runtime.runner import (Failure, Prediction, Runner, TaskPredictions, check_artifact, int8_host_note,
                                   runner_notes, ungated_path_note)
from edgekd.runtime.timing import peak_rss_mb, time_alternating, time_call
from edgekd.runtime.tta import TTAViews, tta_steps

__all__ = ["MANIFEST_FILE", "MAX_RESIZE_FACTOR", "MAX_THREADS", "METADATA_FILE", "RT_INFO_SECTION", "SCHEMA",
           "Artifact", "Bundle", "DicomFrame", "Failure", "Prediction", "Preprocessor", "Repository", "Runner",
           "TTAViews", "TaskPredictions", "as_image_array", "cap_to_cores", "check_artifact",
           "check_embedded_metadata", "check_output_path", "collect_inputs", "collect_labelled", "compile_for_cpu",
           "int8_host_note", "is_bundle", "is_model_repository", "metadata_strings", "open_bundle",
           "openvino_rt_metadata", "parse_metadata_strings", "peak_rss_mb", "predictions_document",
           "preprocessing_steps", "runner_notes", "softmax", "time_alternating", "time_call", "tta_steps",
           "ungated_path_note", "verify_manifest", "write_predictions", "write_repository"]
