"""DullRazor-style hair removal for dermoscopy on uint8 (H, W, C) arrays: OpenCV only, no torch, so the training
pipeline and the edge runtime run the same function on the same pixels (needs `pip install 'edgekd[skin]'`)."""

from __future__ import annotations

import numpy as np

from edgekd.errors import EdgeKDError

KERNEL = 17
"""Black-hat structuring element (pixels, square): wider than a hair, narrower than a lesion's detail."""
THRESHOLD = 10
"""Black-hat response above which a pixel counts as hair (uint8 levels)."""


def opencv():
    """The cv2 module, or a one-line error naming the install that provides it."""
    try:
        import cv2
    except ImportError:
        raise EdgeKDError("hair removal needs OpenCV (pip install 'edgekd[skin]')") from None
    return cv2


def remove_hair(image: np.ndarray, kernel: int = KERNEL, threshold: int = THRESHOLD) -> np.ndarray:
    """Find thin dark hairs with a black-hat morphology of the gray image, fill them by Telea inpainting."""
    cv2 = opencv()
    arr = np.ascontiguousarray(image)
    gray = arr[..., 0] if arr.shape[-1] == 1 else cv2.cvtColor(arr, cv2.COLOR_RGB2GRAY)
    element = cv2.getStructuringElement(cv2.MORPH_RECT, (kernel, kernel))
    blackhat = cv2.morphologyEx(gray, cv2.MORPH_BLACKHAT, element)
    _, mask = cv2.threshold(blackhat, threshold, 255, cv2.THRESH_BINARY)
    out = cv2.inpaint(arr, mask, 1, cv2.INPAINT_TELEA)
    return out[..., None] if out.ndim == 2 else out
