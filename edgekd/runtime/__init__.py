"""The torch-free edge runtime: open a verified bundle, preprocess like training, run OpenVINO/ONNX Runtime with TTA."""

from edgekd.probability import softmax
from edgekd.runtime.bundle import Artifact, Bundle, open_bundle, verify_manifest
from edgekd.runtime.preprocess import Preprocessor
from edgekd.runtime.runner import Failure, Prediction, Runner
from edgekd.runtime.tta import TTAViews

__all__ = ["Artifact", "Bundle", "Failure", "Prediction", "Preprocessor", "Runner", "TTAViews", "open_bundle",
           "softmax", "verify_manifest"]
