"""DullRazor-style hair removal for dermoscopy on uint8 (H, W, C) arrays: OpenCV only, no torch, so the training
pipeline and the edge runtime run the same function on the same pixels (needs `pip install 'edgekd[skin]'`)."""

from __future__ import annotations

import numpy as np

from edgekd.errors import EdgeKDError

KERNEL = 17
"""DullRazor's black-hat structuring element (pixels, square) on a dermoscopy image of REFERENCE_SIDE px: wider
than a hair, narrower than a lesion. A dark structure narrower than the element counts as hair and is inpainted."""
REFERENCE_SIDE = 1024
"""The shorter side KERNEL is meant for; `hair_kernel` scales the element to other image sizes."""
LEGACY_KERNEL = KERNEL
"""The element of checkpoints and bundles made before `data.hair_kernel` existed: KERNEL px at any image size."""
THRESHOLD = 10
"""Black-hat response above which a pixel counts as hair (uint8 levels)."""


def opencv():
    """The cv2 module, or a one-line error naming the install that provides it."""
    try:
        import cv2
    except ImportError:
        raise EdgeKDError("hair removal needs OpenCV (pip install 'edgekd[skin]')") from None
    return cv2


def hair_kernel(height: int, width: int, kernel: int | None = None) -> int:
    """The black-hat element for an image: `kernel` when given (data.hair_kernel), else KERNEL scaled to the shorter
    side: KERNEL x side / REFERENCE_SIDE, rounded, an even number plus 1, at least 3. That is 17 px at 1024 px and
    3 px on a 133 px ISIC 2024 crop, where a fixed 17 px had inpainted lesions narrower than that as hair."""
    if kernel is not None:
        return int(kernel)
    return max(3, int(round(KERNEL * min(height, width) / REFERENCE_SIDE)) | 1)


def recorded_kernel(preprocess: dict) -> int | None:
    """The element a preprocess (a bundle's, a checkpoint's) records: its hair_kernel (None: scaled to the image),
    or LEGACY_KERNEL for one made before the key existed."""
    return preprocess["hair_kernel"] if "hair_kernel" in preprocess else LEGACY_KERNEL


def hair_element(preprocess: dict) -> str:
    """A preprocess's black-hat element in words ("17 px", "the scaled element"), an absent key read as the old
    17 px: what a KD teacher, a starting checkpoint or a repository version is compared by."""
    kernel = recorded_kernel(preprocess)
    return f"a {kernel} px element" if kernel is not None else "the element scaled to the image"


def describe_hair_removal(preprocess: dict) -> str:
    """How a bundle's (or checkpoint's) preprocess removes hair, in words; "" when it does not."""
    if not preprocess.get("hair_removal"):
        return ""
    kernel = recorded_kernel(preprocess)
    element = (f"a {kernel} px black-hat element" if kernel is not None else
               f"a black-hat element of {KERNEL} px per {REFERENCE_SIDE} px of the image's shorter side (rounded, "
               "an even number plus 1, at least 3)")
    return f"DullRazor hair removal on the decoded image, {element}, threshold {THRESHOLD}, Telea inpainting"


def remove_hair(image: np.ndarray, kernel: int | None = None, threshold: int = THRESHOLD) -> np.ndarray:
    """Find thin dark hairs with a black-hat morphology of the gray image, fill them by Telea inpainting.
    `kernel`: the element's side in px (None: scaled to the image, `hair_kernel`)."""
    cv2 = opencv()
    arr = np.ascontiguousarray(image)
    gray = arr[..., 0] if arr.shape[-1] == 1 else cv2.cvtColor(arr, cv2.COLOR_RGB2GRAY)
    kernel = hair_kernel(arr.shape[0], arr.shape[1], kernel)
    element = cv2.getStructuringElement(cv2.MORPH_RECT, (kernel, kernel))
    blackhat = cv2.morphologyEx(gray, cv2.MORPH_BLACKHAT, element)
    _, mask = cv2.threshold(blackhat, threshold, 255, cv2.THRESH_BINARY)
    out = cv2.inpaint(arr, mask, 1, cv2.INPAINT_TELEA)
    return out[..., None] if out.ndim == 2 else out
