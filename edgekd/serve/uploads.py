"""Uploaded images -> model-size arrays, before they queue for the model: the declared content type checked,
the bytes decoded in memory by the runtime's decoders (edgekd.imageio) with their size limits."""

from __future__ import annotations

import numpy as np

from edgekd.errors import EdgeKDError, MissingExtraError, shown
from edgekd.imageio import MAX_PIXELS, read_image_bytes, sniff_format
from edgekd.runtime import Preprocessor

MULTI_FRAME_HINT = "the service takes one image per upload: send each frame as its own single-frame file"
CONTENT_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/tiff": "TIFF", "image/bmp": "BMP",
                 "image/gif": "GIF", "image/webp": "WEBP", "application/dicom": "DICOM",
                 # the non-standard names clients still send
                 "image/jpg": "JPEG", "image/pjpeg": "JPEG", "image/x-png": "PNG", "image/x-ms-bmp": "BMP",
                 "image/dicom": "DICOM", "application/octet-stream": None, "": None}
"""Accepted declared types -> the format the content must then have (None: any image; the content decides)."""


class UploadError(EdgeKDError):
    """A bad upload: a one-line reason and the HTTP status it is answered with."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


def check_upload(data: bytes, content_type: str | None, where: str) -> None:
    """Empty body -> 400; a declared type that is not an image, or that the content contradicts -> 415."""
    declared = (content_type or "").split(";")[0].strip().lower()
    if declared not in CONTENT_TYPES:
        raise UploadError(f"{where}: content type {shown(declared, 80)} is not an image (send PNG, JPEG, TIFF, "
                          "BMP, GIF, WEBP, DICOM or application/octet-stream)", 415)
    if not data:
        raise UploadError(f"{where}: empty upload", 400)
    found, wanted = sniff_format(data), CONTENT_TYPES[declared]
    if wanted is not None and found is not None and found != wanted:
        raise UploadError(f"{where}: declared {declared} but the content is {found}", 415)


def decode_upload(data: bytes, content_type: str | None, where: str, preprocessor: Preprocessor,
                  keep_gray: bool, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Bytes of one upload -> the uint8 model-size image (`Preprocessor.to_model_size`); UploadError otherwise.
    `max_pixels`: the service's pixel limit (--max-megapixels), checked from the header before decoding."""
    where = shown(where, 120)
    check_upload(data, content_type, where)
    try:
        image = read_image_bytes(data, where, preprocessor.resize, frames_hint=MULTI_FRAME_HINT,
                                 max_pixels=max_pixels)
        return preprocessor.to_model_size(image, keep_gray=keep_gray)
    except UploadError:
        raise
    except MissingExtraError as err:  # DICOM without pydicom: a type this service cannot take (had been 422)
        raise UploadError(str(err), 415) from None
    except EdgeKDError as err:
        raise UploadError(str(err), 422) from None
    except MemoryError:
        raise UploadError(f"{where}: out of memory decoding the image", 422) from None
