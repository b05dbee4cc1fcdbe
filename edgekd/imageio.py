"""Reading images from disk into uint8 HxWxC arrays (numpy + Pillow; DICOM through pydicom, an optional extra; shared
by training and the edge runtime)."""

from __future__ import annotations

import io
import os
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from edgekd.errors import EdgeKDError, MissingExtraError, printable, shorten

PILLOW_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".jpe": "JPEG", ".jfif": "JPEG", ".tif": "TIFF",
                  ".tiff": "TIFF", ".bmp": "BMP", ".gif": "GIF", ".webp": "WEBP"}
"""The only decoders a file reaches, chosen by its suffix: a file's suffix and its content must agree (an EPS named
.png never reaches Pillow's Ghostscript plugin, whatever Pillow has installed)."""
IMAGE_SUFFIXES = {*PILLOW_FORMATS, ".dcm"}
DICOM_MARKER = b"DICM"
"""A DICOM file (Part 10) is recognised by its content: a 128-byte preamble, then these 4 bytes, whatever its
name (PACS exports often have none, or a UID for one)."""
FRAMES_HINT = ("one image per file is read here: save the frame you mean as its own image; `edgekd predict` "
               "takes the file whole, one row per frame, or --frame N; in Python, a Runner takes "
               "edgekd.runtime.DicomFrame(path, index)")
"""How the error for a multi-frame DICOM read without a frame number ends (the CLI's; the service has its own)."""
MAX_PIXELS = 64_000_000
"""Decompression-bomb guard: larger images are refused (a 224x224 model never needs them)."""
MAX_SIDE = 32_768
"""The longest image side accepted."""
MAX_ASPECT = 200
"""The most elongated image accepted (longer side / shorter side): a 1 x 64M strip resized to a 28 px shorter
side would be 28 x 1.8G pixels."""


def check_image_size(width: int, height: int, resize: int | None = None, where: str = "image",
                     max_pixels: int = MAX_PIXELS) -> None:
    """Refuse, before decoding, an image too large (over `max_pixels`, at most MAX_PIXELS: a service may set a
    lower one), too long or too elongated, or (with `resize`, the shorter side it will be resized to) one whose
    resized copy would exceed MAX_PIXELS."""
    if width < 1 or height < 1:
        raise EdgeKDError(f"{where}: image is {width}x{height}, empty")
    limit = min(max_pixels, MAX_PIXELS)
    if width * height > limit:
        raise EdgeKDError(f"{where}: image is {width}x{height}, larger than the {limit} pixel limit")
    if max(width, height) > MAX_SIDE:
        raise EdgeKDError(f"{where}: image is {width}x{height}, a side over the {MAX_SIDE} px limit")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise EdgeKDError(f"{where}: image is {width}x{height}, more elongated than {MAX_ASPECT}:1")
    if resize is not None:
        short, long = min(width, height), max(width, height)
        if resize * int(resize * long / short) > MAX_PIXELS:
            raise EdgeKDError(f"{where}: image is {width}x{height}; resized to a {resize} px shorter side it would "
                              f"exceed the {MAX_PIXELS} pixel limit")


@dataclass(frozen=True)
class DicomFrame:
    """One frame (0-based `index`) of a multi-frame DICOM file; shown as `file.dcm#frame3` (1-based, as DICOM
    numbers frames)."""

    path: Path
    index: int

    def __post_init__(self) -> None:  # 1.7 had read as "#frame2.7", -1 as "no frame 0", "1" as a TypeError
        if isinstance(self.index, bool) or not isinstance(self.index, (int, np.integer)) or self.index < 0:
            raise EdgeKDError(f"DicomFrame({printable(str(self.path))}, {self.index!r}): the frame index is a 0-based "
                              "int >= 0")

    def __str__(self) -> str:
        return f"{self.path}#frame{self.index + 1}"


def is_dicom(path: str | Path) -> bool:
    """Whether the file holds DICOM by its content: the 'DICM' marker after the 128-byte preamble. Regular files
    only: a named pipe would block the open until something writes to it."""
    try:
        if not Path(path).is_file():
            return False
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == DICOM_MARKER


def is_dicomdir(path: Path) -> bool:
    """Whether a file is named as a DICOMDIR (a CD's or export's index of its DICOM files, no pixels)."""
    return "DICOMDIR" in (path.name.upper(), path.stem.upper())


SYSTEM_FOLDERS = {"__MACOSX", "$RECYCLE.BIN", "System Volume Information", "@eaDir"}
"""Folders an operating system or a NAS adds to a copied folder, never a class or a source of images (`@eaDir/`: a
Synology NAS's thumbnails of every image beside it)."""


def is_hidden(path: Path) -> bool:
    """A hidden or system entry that a folder of images may carry from a Mac, a Windows share or a notebook:
    `.DS_Store`, AppleDouble `._scan.png` files, `.Trashes/`, `.ipynb_checkpoints/`, `__MACOSX/`, `@eaDir/`,
    `Thumbs.db`."""
    return path.name.startswith(".") or path.name in SYSTEM_FOLDERS or path.name.lower() == "thumbs.db"


def folder_files(folder: Path, unreadable: list[tuple[str, str]] | None = None) -> list[Path]:
    """Every file under `folder`, any depth, sorted: folders reached through a symlink included (each real folder
    once, so a link loop ends), broken links included (`is_file_or_broken_link`), hidden and system entries
    (`is_hidden`) left out. A folder that cannot be listed (no permission) is a one-line error, or with
    `unreadable` a (folder, message) entry there and the rest is listed (os.walk had skipped it without a word)."""
    files: list[Path] = []
    root = os.path.realpath(folder)
    seen: set[str] = set()

    def cannot_list(err: OSError) -> None:
        message = f"{err.filename}: folder cannot be read ({err.strerror or type(err).__name__})"
        if unreadable is None:
            raise EdgeKDError(message)
        unreadable.append((str(err.filename), message))

    for top, dirs, names in os.walk(folder, onerror=cannot_list, followlinks=True):
        real = os.path.realpath(top)
        if real in seen or (real != root and os.path.commonpath([real, root]) == real):  # a loop; a link up the tree
            dirs[:] = []  # (`cat/up -> ..` had listed the dog images as cats)
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not is_hidden(Path(d)))
        files += [Path(top) / n for n in names if not is_hidden(Path(n)) and is_file_or_broken_link(Path(top) / n)]
    return sorted(files)


def is_file_or_broken_link(path: Path) -> bool:
    """A file, or a symbolic link whose target is missing: listed, so that a link to a moved image is an unreadable
    image (named by the reader), not an image left out without a word."""
    return path.is_file() or (path.is_symlink() and not path.exists())


def subfolders(folder: Path) -> list[Path]:
    """The sub-folders of `folder` that can be classes, sorted (hidden and system folders left out)."""
    return sorted(d for d in folder.iterdir() if d.is_dir() and not is_hidden(d))


def is_image_file(path: Path) -> bool:
    """Whether a file found in a folder is an image to read: an image suffix, or DICOM by its content (PACS exports
    name files by UID, with no suffix); a DICOMDIR (`is_dicomdir`) is not (hidden files: `folder_files` leaves them
    out before this is asked)."""
    if is_dicomdir(path):
        return False
    return path.suffix.lower() in IMAGE_SUFFIXES or is_dicom(path)


def read_image(path: str | Path, resize: int | None = None, frame: int | None = None) -> np.ndarray:
    """Decode an image file to a uint8 array of shape (H, W, 1) or (H, W, 3).

    16-bit images are rescaled to 8 bit by their own range, RGBA/LA lose alpha, CMYK/palette become RGB. DICOM is
    recognised by its content (`is_dicom`) and read by pydicom (`frame`: 0-based, for a multi-frame file); other
    files reach only the Pillow decoder of their suffix (PILLOW_FORMATS). The size limits of `check_image_size`
    (with `resize`: the shorter side the caller will resize to) are checked from the header, before decoding. Any
    failure, MemoryError included, raises EdgeKDError naming the file.
    """
    path = Path(path)
    where = printable(str(path))
    if path.is_dir():
        raise EdgeKDError(f"{where}: a folder, not an image file")
    if path.is_symlink() and not path.exists():
        raise EdgeKDError(f"{where}: a broken symbolic link (its target {printable(os.readlink(path))} is missing)")
    if not path.is_file():
        raise EdgeKDError(f"{where}: " + ("not a regular file (a device, pipe or socket)" if path.exists()
                                          else "image file not found"))
    if path.stat().st_size == 0:
        raise EdgeKDError(f"{where}: empty file")
    if is_dicom(path):
        return read_dicom(path, resize, frame)
    if frame is not None:  # a frame of a PNG had been ignored, its result named file.png#frame6
        raise EdgeKDError(f"{where}: not DICOM, so it has no frame {frame + 1} (a frame is one image of a multi-frame "
                          "DICOM file)")
    suffix = path.suffix.lower()
    if suffix in (".dcm", ".dicom", "") and looks_like_bare_dicom(_head(path, 8)):
        raise EdgeKDError(f"{where}: {NO_PREAMBLE}")
    if suffix == ".dcm":
        raise EdgeKDError(f"{where}: not DICOM (no 'DICM' marker after the 128-byte preamble)")
    if suffix not in IMAGE_SUFFIXES:
        raise EdgeKDError(f"{where}: not a supported image type (use {', '.join(sorted(IMAGE_SUFFIXES))}, or DICOM "
                          "of any name)")
    fmt = PILLOW_FORMATS[suffix]
    if fmt == "TIFF" and _turned_tiff(path, resize, where):  # Pillow 13 scrambles an uncompressed TIFF tagged
        # orientation 5-8 opened from a path; the same bytes from memory decode upright
        try:
            data = path.read_bytes()
        except OSError as err:
            raise EdgeKDError(f"{where}: cannot be read ({err.strerror})") from None
        return _decode_pillow(io.BytesIO(data), fmt, where, resize)
    return _decode_pillow(path, fmt, where, resize)


def _turned_tiff(path: Path, resize: int | None, where: str) -> bool:
    """Whether a TIFF's header tags it with a transposing orientation (5-8), its size checked first; False when
    the header cannot be read (the decode says why)."""
    try:
        with Image.open(path, formats=["TIFF"]) as img:
            turned = img.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
            if turned:
                check_image_size(*img.size, resize, where)
            return turned
    except EdgeKDError:
        raise
    except Exception:
        return False


def _decode_pillow(source: Path | io.BytesIO, fmt: str, where: str, resize: int | None,
                   max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Pillow's decoder for `fmt` only, the size limits checked from the header; every failure one EdgeKDError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source, formats=[fmt]) as img:
                check_single_frame(img, fmt, where)  # on the page decoded (a TIFF's first may be a thumbnail)
                check_image_size(*img.size, resize, where, max_pixels)
                img.load()
                return pil_to_array(upright(img))
    except EdgeKDError as err:
        if str(err).startswith(where):
            raise
        raise EdgeKDError(f"{where}: {err}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise EdgeKDError(f"{where}: image exceeds the decompression-bomb pixel limit") from None
    except UnidentifiedImageError:
        said = " as its suffix says" if isinstance(source, Path) else ""
        raise EdgeKDError(f"{where}: not an image (the content is not {fmt}{said})") from None
    except MemoryError:
        raise EdgeKDError(f"{where}: out of memory decoding the image") from None
    except (OSError, SyntaxError, ValueError, struct.error) as err:
        raise EdgeKDError(f"{where}: corrupt or truncated image ({shorten(str(err).splitlines()[0] if str(err) else type(err).__name__, 80)})") from None


def check_single_frame(img: Image.Image, fmt: str, where: str) -> None:
    """A multi-page TIFF or an animated GIF/WEBP/PNG is refused: the model sees one image, and classifying the
    first frame alone, without a word, could answer for a page nobody meant. A camera JPEG's preview (MPO) and a
    TIFF's reduced-resolution pages (thumbnails, pyramid levels: NewSubfileType bit 0) are not other images."""
    frames = getattr(img, "n_frames", 1)
    if frames <= 1 or img.format == "MPO":
        return
    if fmt == "TIFF":
        full = list(_full_resolution_pages(img))
        img.seek(full[0] if len(full) == 1 else 0)  # the one full-resolution page, wherever its thumbnail is
        if len(full) <= 1:
            return
        frames = len(full)
    kind = "pages" if fmt == "TIFF" else "frames"
    raise EdgeKDError(f"{where}: a {fmt} of {frames} {kind} (one image per file is read: save the "
                      f"{kind[:-1]} you mean as its own image)")


def _full_resolution_pages(img: Image.Image):
    for i in range(img.n_frames):
        img.seek(i)
        if not int(img.tag_v2.get(NEW_SUBFILE_TYPE, 0)) & 1:
            yield i


NEW_SUBFILE_TYPE = 254
"""TIFF tag: bit 0 set = a reduced-resolution version of another page in the file."""


MAGIC = ((b"\x89PNG\r\n\x1a\n", 0, "PNG"), (b"\xff\xd8\xff", 0, "JPEG"), (b"II*\x00", 0, "TIFF"),
         (b"MM\x00*", 0, "TIFF"), (b"BM", 0, "BMP"), (b"GIF87a", 0, "GIF"), (b"GIF89a", 0, "GIF"),
         (b"WEBP", 8, "WEBP"), (b"DICM", 128, "DICOM"))
"""(signature, offset, format): how an image's first bytes name its format (DICOM: the preamble's DICM)."""


def sniff_format(data: bytes) -> str | None:
    """The image format the bytes start with (PNG, JPEG, TIFF, BMP, GIF, WEBP, DICOM), or None."""
    for magic, offset, fmt in MAGIC:
        if data[offset:offset + len(magic)] == magic and (fmt != "WEBP" or data[:4] == b"RIFF"):
            return fmt
    return None


def read_image_bytes(data: bytes, where: str = "upload", resize: int | None = None,
                     frames_hint: str = FRAMES_HINT, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode an image held in memory (an upload) like `read_image` a file, the decoder chosen by the content's
    own signature (`sniff_format`), nothing written to disk. `frames_hint` ends the error for a multi-frame DICOM
    (what the caller can do instead); `max_pixels`: a lower pixel limit than MAX_PIXELS (a service's)."""
    where = printable(where)
    if not data:
        raise EdgeKDError(f"{where}: empty file")
    fmt = sniff_format(data)
    if fmt is None and looks_like_bare_dicom(data[:8]):
        raise EdgeKDError(f"{where}: {NO_PREAMBLE}")
    if fmt is None:
        raise EdgeKDError(f"{where}: not a supported image (PNG, JPEG, TIFF, BMP, GIF, WEBP or DICOM expected)")
    if fmt == "DICOM":
        return read_dicom(io.BytesIO(data), resize, where=where, frames_hint=frames_hint, max_pixels=max_pixels)
    return _decode_pillow(io.BytesIO(data), fmt, where, resize, max_pixels)


EXIF_ORIENTATION = 0x0112


def upright(img: Image.Image) -> Image.Image:
    """A decoded file's image with its EXIF (or TIFF) orientation tag applied as a viewer applies it, so a camera
    photo stored sideways is classified as it is seen. Files only: a PIL image a caller hands over is taken as it
    is (one turned by hand keeps the tag in its info, and would be turned twice)."""
    return ImageOps.exif_transpose(img) if img.getexif().get(EXIF_ORIENTATION, 1) != 1 else img


STRIP_ROWS = 256
"""pil_to_array converts and copies this many rows at a time into its one array, so a 64-MP photo's decode holds
the decoded image and the array only (a whole-image convert("RGB") copy and Pillow's tobytes had doubled it)."""


def pil_to_array(img: Image.Image) -> np.ndarray:
    """A PIL image of any common mode -> uint8 (H, W, 1) for gray or (H, W, 3) for color."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _rescale_to_uint8(np.asarray(img))[..., None]  # its own dtype: one float copy, made there
    mode = "L" if img.mode in ("1", "L", "LA") else "RGB"
    width, height = img.size
    out = np.empty((height, width, 1 if mode == "L" else 3), dtype=np.uint8)
    for top in range(0, height, STRIP_ROWS):  # a mode conversion is per pixel: strip by strip gives the same pixels
        strip = img.crop((0, top, width, min(height, top + STRIP_ROWS)))
        strip = strip if strip.mode == mode else strip.convert(mode)
        out[top:top + strip.height] = np.asarray(strip, dtype=np.uint8).reshape(strip.height, width, -1)
    return out


def _rescale_to_uint8(arr: np.ndarray, span: tuple[float, float] | None = None) -> np.ndarray:
    """`span` (black, white) to 0..255, clipped; without it the image's own min..max. One float64 copy of `arr`,
    worked in place (a 64-MP 16-bit image had taken four: ~2 GB per decode, for an upload of a few hundred KB)."""
    own = float(np.min(arr)), float(np.max(arr))
    if not np.isfinite(own).all():
        raise EdgeKDError("image holds NaN or Inf values")
    lo, hi = span or own  # lo > hi: a window whose black is the larger value (see _voi_span)
    if hi == lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    work = np.array(arr, dtype=np.float64)  # a copy: the caller's array (pydicom's) is left as it was
    work -= lo
    work *= 255.0 / (hi - lo)
    np.clip(work, 0, 255, out=work)
    return np.round(work, out=work).astype(np.uint8)


def _pydicom(where: str):
    try:
        import pydicom
        import pydicom.pixels
    except ImportError:
        raise MissingExtraError(f"{where}: reading DICOM needs pydicom (pip install 'edgekd[dicom]')") from None
    return pydicom


PIXEL_DATA = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def dicom_header(path: Path | io.BytesIO, where: str | None = None):
    """The dataset of a DICOM file (or bytes in memory named `where`), its pixel data deferred (not read); a
    one-line error if unreadable."""
    where = where or printable(str(path))
    pydicom = _pydicom(where)
    try:
        return pydicom.dcmread(_dicom_source(path), defer_size="1 KB")
    except Exception as err:  # pydicom raises many types for bad files
        raise EdgeKDError(f"{where}: unreadable DICOM ({type(err).__name__})") from None


def _dicom_source(path: Path | io.BytesIO):
    """What pydicom reads: a file's path, or the in-memory bytes from their start."""
    if isinstance(path, io.BytesIO):
        path.seek(0)
        return path
    return str(path)


def dicom_frames(path: Path) -> int:
    """The frame count of a DICOM file (its NumberOfFrames; 1 for a single image)."""
    return _frame_count(dicom_header(path))


def _frame_count(ds) -> int:
    try:
        return max(1, int(getattr(ds, "NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _voi_span(pixels, ds) -> tuple[float, float] | None:
    """The output values of the file's VOI transform (window or VOI LUT) a viewer shows as (black, white), read by
    sending the extremes of the input through pydicom's own `apply_voi_lut`. A window's black is what the lowest
    input maps to (pydicom swaps its output range under a negative RescaleSlope, so black can be the larger value); a
    VOI LUT's is its lowest output (a LUT may invert on purpose). None when the file has no VOI transform (the
    extremes come back unchanged)."""
    ends = np.array([-2**40, 2**40], dtype=np.int64)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # SIGMOID windowing's exp overflows at the extremes
            mapped = np.asarray(pixels.apply_voi_lut(ends.copy(), ds), dtype=np.float64)
    except Exception:  # an odd LUT that maps the image but not the extremes: the image's own range, as before
        return None
    black, white = float(mapped[0]), float(mapped[1])
    if (black, white) == (float(ends[0]), float(ends[1])) or black == white:
        return None
    return (black, white) if not ds.get("VOILUTSequence") else (min(black, white), max(black, white))


ENHANCED_FRAME_TAGS = {"PixelValueTransformationSequence": ("RescaleSlope", "RescaleIntercept", "RescaleType"),
                       "FrameVOILUTSequence": ("WindowCenter", "WindowWidth", "VOILUTFunction")}
"""An enhanced multi-frame file's functional-group macros -> the top-level tags pydicom's LUT functions read."""


def prepare_pixel_header(ds, frame: int | None) -> None:
    """Make the header say what pydicom's modality and VOI functions read, in place: an enhanced file's rescale and
    window of `frame` (its per-frame functional group, else the shared one) become top-level tags; an empty
    RescaleSlope or RescaleIntercept takes its identity value (both empty: no rescale)."""
    index = frame or 0  # a single-frame enhanced file has its one per-frame item too
    per_frame, shared = ds.get("PerFrameFunctionalGroupsSequence"), ds.get("SharedFunctionalGroupsSequence")
    groups = [per_frame[index] if per_frame and len(per_frame) > index else None, shared[0] if shared else None]
    for macro, tags in ENHANCED_FRAME_TAGS.items():
        item = next((g.get(macro)[0] for g in groups if g is not None and g.get(macro)), None)
        for tag in tags if item is not None else ():
            if tag in item and item[tag].value not in (None, ""):
                setattr(ds, tag, item[tag].value)
    empty = [tag for tag in ("RescaleSlope", "RescaleIntercept") if tag in ds and ds[tag].value in (None, "")]
    if len(empty) == 2:
        del ds.RescaleSlope, ds.RescaleIntercept
    elif empty:  # one empty: its identity value, so the other (e.g. an intercept of -1024) still applies
        setattr(ds, empty[0], 1 if empty[0] == "RescaleSlope" else 0)


def _stored_span(ds) -> tuple[float, float] | None:
    """An unsigned image of 8 bits or fewer with no rescale and no window: its stored range (0..2^BitsStored-1) to
    0..255, as an 8-bit PNG reads (a 1-bit mask comes out 0/255); None for the others (their own min..max)."""
    bits = int(ds.get("BitsStored", 0) or 0)
    rescale = (float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)) != (1.0, 0.0)
    if not 0 < bits <= 8 or int(ds.get("PixelRepresentation", 0) or 0) or ds.get("ModalityLUTSequence") or rescale:
        return None
    return 0.0, float(2**bits - 1)


MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"
"""The SOP class of a DICOMDIR (Media Storage Directory Storage)."""


def no_pixel_data(ds) -> str:
    """Why a DICOM without pixel data is no image: a DICOMDIR, a non-image object (its SOP class and Modality), or a
    header that ends before any of that (a truncated file)."""
    sop = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", "") or "")
    if sop == MEDIA_DIRECTORY or "DirectoryRecordSequence" in ds:
        return "a DICOMDIR (the index of a DICOM file set), not an image: give the image files it lists"
    if not ds.get("SOPClassUID") and not ds.get("Modality"):
        return "a DICOM header without pixel data or SOP class: a truncated file, or not an image"
    name = getattr(ds.get("SOPClassUID"), "name", "") or str(ds.get("SOPClassUID", "") or "")
    kind = ", ".join(x for x in (name, f"Modality {ds.Modality}" if ds.get("Modality") else "") if x)
    return f"a DICOM without pixel data ({kind}): not an image"


def _head(path: Path, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


DICOM_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"OB", b"OD", b"OF",
             b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM", b"UC", b"UI", b"UL", b"UN",
             b"UR", b"US", b"UT", b"UV"}


def looks_like_bare_dicom(head: bytes) -> bool:
    """Whether bytes start like a DICOM data set written without the Part 10 preamble and 'DICM' marker: a group
    0002 or 0008 element (little or big endian) followed by a known VR (explicit VR), or by a little-endian length
    under 64 KiB (implicit VR, the usual encoding of such files)."""
    if len(head) < 8 or head[:2] not in (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08"):
        return False
    return head[4:6] in DICOM_VRS or int.from_bytes(head[4:8], "little") < 2**16


NO_PREAMBLE = ("a DICOM data set without the Part 10 header (no 128-byte preamble and 'DICM' marker), which is not "
               "read here: save it as a DICOM file (e.g. pydicom: ds.save_as(path, enforce_file_format=True))")


def read_dicom(path: Path | io.BytesIO, resize: int | None = None, frame: int | None = None,
               where: str | None = None, frames_hint: str = FRAMES_HINT, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """One image (or frame) of a DICOM file through pydicom (optional extra): the modality LUT (rescale slope and
    intercept, or a Modality LUT Sequence), then the VOI LUT (a VOI LUT Sequence, else the Window Center/Width),
    both pydicom's own; scaled to 0..255 by the VOI transform's output range, as a viewer shows the image (without
    one: by the image's own range); MONOCHROME1 inverted (0 is white there). Colour
    images come out RGB. The size limits are checked from Rows/Columns, before any pixel is decoded. `path` may be
    bytes in memory (an upload), named `where` in errors; `frames_hint` ends the error for a multi-frame file with no
    `frame` given."""
    where = where or printable(str(path))
    ds = dicom_header(path, where)
    if not any(tag in ds for tag in PIXEL_DATA):
        raise EdgeKDError(f"{where}: {no_pixel_data(ds)}")
    frames = _frame_count(ds)
    if frame is None and frames > 1:
        raise EdgeKDError(f"{where}: a DICOM of {frames} frames ({frames_hint})")
    if frame is not None and not 0 <= frame < frames:
        raise EdgeKDError(f"{where}: no frame {frame + 1} (the file has {frames})")
    check_image_size(int(getattr(ds, "Columns", 0) or 0), int(getattr(ds, "Rows", 0) or 0), resize, where,
                     max_pixels)
    pixels = _pydicom(where).pixels
    photometric = str(getattr(ds, "PhotometricInterpretation", "") or "")
    try:
        arr = pixels.pixel_array(_dicom_source(path), index=frame if frames > 1 else None)
        span = None
        if photometric == "PALETTE COLOR":  # palette indices -> RGB through the file's own lookup tables
            arr = pixels.apply_color_lut(arr, ds)[..., :3]  # an alpha table's fourth channel left out
            bits = int(ds.RedPaletteColorLookupTableDescriptor[2])  # the entries' depth, whatever word holds them
            span = (0.0, float(2**bits - 1))
        elif int(getattr(ds, "SamplesPerPixel", 1) or 1) > 1:
            span = (0.0, 255.0) if arr.dtype == np.uint8 else None  # 8-bit colour as stored, as a PNG reads
        else:
            prepare_pixel_header(ds, frame)
            span = _stored_span(ds)
            arr = pixels.apply_voi_lut(pixels.apply_modality_lut(arr, ds), ds)
            span = _voi_span(pixels, ds) or span
    except MemoryError:
        raise EdgeKDError(f"{where}: out of memory decoding the DICOM") from None
    except Exception as err:  # pydicom raises many types for bad files; odd tag values too
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        tried = "all available plugins" in str(err) and "not support" in str(err)  # Pillow: no 12-bit JPEG
        if syntax is not None and syntax.is_compressed and ("missing dependencies" in str(err) or tried):
            said = shorten(str(err).split("plugins:", 1)[-1].strip(), 120) + "; " if tried else ""
            raise EdgeKDError(f"{where}: no decoder here for its {syntax.name} pixel data ({said}pydicom needs a "
                              "plugin: pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg, or pyjpegls for "
                              "JPEG-LS)") from None
        reason = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or "-"
        reason = re.sub(r"\s*<[\w.]+ object at 0x[0-9a-f]+>", "", reason)  # Pillow names its in-memory buffer
        raise EdgeKDError(f"{where}: unreadable DICOM pixel data ({type(err).__name__}: {shorten(reason, 200)})"
                          ) from None
    try:
        out = arr if arr.dtype == np.uint8 and span == (0.0, 255.0) else \
            _rescale_to_uint8(arr, span)
    except EdgeKDError as err:  # e.g. a RescaleSlope of NaN: the message names the file like every other
        raise EdgeKDError(f"{where}: {err}") from None
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        out = 255 - out
    return out[..., None] if out.ndim == 2 else out
