"""Explanations of PyTorch models: Grad-CAM heat maps and overlays."""
