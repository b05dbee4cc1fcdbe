"""Explanations of PyTorch models: Grad-CAM heat maps and overlays."""

from edgekd.explain.gradcam import card_overlays, explain_files

__all__ = ["card_overlays", "explain_files"]
