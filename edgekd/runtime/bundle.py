"""Opening an edge bundle (directory or .zip): safe extraction, sha256 manifest check, edgekd.json validation."""

from __future__ import annotations

import json
import shutil
import stat
import tempfile
import weakref
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from edgekd.errors import EdgeKDError
from edgekd.fileio import sha256_file

SCHEMA = "edgekd-bundle/1"
METADATA_FILE = "edgekd.json"
MANIFEST_FILE = "manifest.sha256"
FORMATS = ("onnx", "openvino")
PRECISIONS = ("fp32", "fp16", "int8")
TTA_VIEWS = ("original", "hflip", "vflip", "center_crop", "rot+15", "rot-15")
MAX_ZIP_BYTES = 4 * 2**30
"""Zip-bomb guard: a bundle never needs more than this uncompressed."""


@dataclass(frozen=True)
class Artifact:
    """One exported model file of a bundle, addressed by (format, precision)."""

    format: str
    precision: str
    path: Path
    inference_precision_hint: str | None = None
    """OpenVINO CPU math the export's parity gate used (f32 for FP32 artifacts)."""


@dataclass
class Bundle:
    """A verified bundle on disk: its root directory, parsed metadata and artifacts."""

    root: Path
    meta: dict[str, Any]
    source: Path
    artifacts: list[Artifact] = field(default_factory=list)

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def preprocess(self) -> dict[str, Any]:
        return self.meta["preprocess"]

    @property
    def tta(self) -> dict[str, Any]:
        return self.meta.get("tta") or {"views": list(TTA_VIEWS), "center_crop_fraction": 0.875,
                                        "ensemble": "mean_softmax"}

    @property
    def io(self) -> dict[str, Any]:
        return self.meta["io"]

    @property
    def threads(self) -> int | None:
        """The export profile's thread hint (None: the backend's default, all cores)."""
        threads = (self.meta.get("runtime") or {}).get("threads")
        return threads if isinstance(threads, int) and threads > 0 else None

    @property
    def image_channels(self) -> int | None:
        """The channels of the images the model was trained on (1: gray), recorded at export; None if unknown."""
        channels = (self.meta.get("runtime") or {}).get("image_channels")
        return channels if channels in (1, 3) else None

    @property
    def model(self) -> dict[str, Any]:
        return self.meta.get("model", {})

    def artifact(self, fmt: str, precision: str) -> Artifact:
        for art in self.artifacts:
            if art.format == fmt and art.precision == precision:
                return art
        have = ", ".join(f"{a.format}/{a.precision}" for a in self.artifacts) or "none"
        raise EdgeKDError(f"{self.source}: no {fmt} {precision} model in the bundle (it has: {have})")


def open_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Open a bundle directory or .zip; with `verify`, every file must match manifest.sha256.

    A zip is extracted to a private temporary directory (removed when the Bundle is garbage-collected);
    members with absolute paths, `..` components or symlinks are refused before anything is written.
    """
    source = Path(path)
    if not source.exists():
        raise EdgeKDError(f"{source}: bundle not found")
    if source.is_dir():
        root = source
        tmp = None
    elif zipfile.is_zipfile(source):
        tmp = Path(tempfile.mkdtemp(prefix="edgekd-bundle-"))
        try:
            root = extract_zip(source, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    else:
        raise EdgeKDError(f"{source}: not a bundle (expected a directory or a .zip file)")
    try:
        if verify:
            verify_manifest(root, source)
        meta = read_metadata(root, source)
        artifacts = [Artifact(a["format"], a["precision"], root / a["path"], a.get("inference_precision_hint"))
                     for a in meta["artifacts"]]
        for art in artifacts:
            if not art.path.is_file():
                raise EdgeKDError(f"{source}: {art.path.relative_to(root).as_posix()} is listed in edgekd.json but missing")
            if art.format == "openvino" and not art.path.with_suffix(".bin").is_file():
                raise EdgeKDError(f"{source}: {art.path.with_suffix('.bin').relative_to(root).as_posix()} is missing")
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    bundle = Bundle(root=root, meta=meta, source=source, artifacts=artifacts)
    if tmp is not None:
        weakref.finalize(bundle, shutil.rmtree, tmp, True)
    return bundle


def _safe_member_path(name: str, archive: Path) -> PurePosixPath:
    posix = PurePosixPath(name.replace("\\", "/"))
    if posix.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise EdgeKDError(f"{archive}: refusing zip member with an absolute path: {name}")
    if ".." in posix.parts:
        raise EdgeKDError(f"{archive}: refusing zip member that escapes the bundle: {name}")
    return posix


def extract_zip(archive: Path, dest: Path) -> Path:
    """Extract a bundle zip into `dest` after checking every member; returns the folder holding edgekd.json."""
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            total = 0
            for info in members:
                _safe_member_path(info.filename, archive)
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise EdgeKDError(f"{archive}: refusing symlink zip member: {info.filename}")
                total += info.file_size
            if total > MAX_ZIP_BYTES:
                raise EdgeKDError(f"{archive}: uncompressed size {total / 2**30:.1f} GiB is over the "
                                  f"{MAX_ZIP_BYTES / 2**30:.0f} GiB limit")
            for info in members:
                target = dest.joinpath(*_safe_member_path(info.filename, archive).parts)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
    except zipfile.BadZipFile as err:
        raise EdgeKDError(f"{archive}: corrupt zip ({err})") from None
    if (dest / METADATA_FILE).is_file():
        return dest
    # A zip of the bundle folder itself holds one top-level directory.
    subdirs = [p for p in dest.iterdir() if p.is_dir()]
    if len(subdirs) == 1 and (subdirs[0] / METADATA_FILE).is_file():
        return subdirs[0]
    raise EdgeKDError(f"{archive}: no {METADATA_FILE} at the top of the zip")


def verify_manifest(root: Path, source: Path | None = None) -> dict[str, str]:
    """Check manifest.sha256 against the files: each listed file present and matching, no unlisted file."""
    source = source or root
    manifest = root / MANIFEST_FILE
    if not manifest.is_file():
        raise EdgeKDError(f"{source}: {MANIFEST_FILE} is missing (not a bundle, or an unverified copy)")
    listed: dict[str, str] = {}
    for lineno, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(None, 1)
        digest = parts[0].lower()
        if len(parts) != 2 or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise EdgeKDError(f"{source}: {MANIFEST_FILE} line {lineno} is not '<sha256>  <path>'")
        rel = parts[1].strip().lstrip("*")  # '*' marks binary mode in sha256sum output
        posix = PurePosixPath(rel)
        if posix.is_absolute() or ".." in posix.parts:
            raise EdgeKDError(f"{source}: {MANIFEST_FILE} line {lineno} names a path outside the bundle: {rel}")
        listed[posix.as_posix()] = digest
    for rel, digest in listed.items():
        file = root / rel
        if not file.is_file():
            raise EdgeKDError(f"{source}: {rel} is listed in {MANIFEST_FILE} but missing")
        if sha256_file(file) != digest:
            raise EdgeKDError(f"{source}: {rel} does not match its sha256 in {MANIFEST_FILE} (modified or corrupt)")
    for file in sorted(root.rglob("*")):
        rel = file.relative_to(root).as_posix()
        if file.is_file() and rel != MANIFEST_FILE and rel not in listed:
            raise EdgeKDError(f"{source}: {rel} is not listed in {MANIFEST_FILE}")
    return listed


def read_metadata(root: Path, source: Path | None = None) -> dict[str, Any]:
    source = source or root
    path = root / METADATA_FILE
    if not path.is_file():
        raise EdgeKDError(f"{source}: {METADATA_FILE} is missing")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EdgeKDError(f"{source}: {METADATA_FILE} is not valid JSON ({err})") from None
    validate_metadata(meta, f"{source}: {METADATA_FILE}")
    return meta


def _require(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise EdgeKDError(f"{where}: {message}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate_metadata(meta: Any, where: str = METADATA_FILE) -> None:
    """Check the keys the runtime relies on (schema edgekd-bundle/1); the first problem raises EdgeKDError."""
    _require(isinstance(meta, dict), where, "must be a JSON object")
    _require(meta.get("schema") == SCHEMA, where, f"schema must be '{SCHEMA}', got {meta.get('schema')!r}")
    names = meta.get("class_names")
    _require(isinstance(names, list) and len(names) >= 1 and all(isinstance(n, str) for n in names), where,
             "class_names must be a non-empty list of strings")

    pre = meta.get("preprocess")
    _require(isinstance(pre, dict), where, "preprocess must be an object")
    size = pre.get("input_size")
    _require(isinstance(size, list) and len(size) == 3 and all(isinstance(v, int) and v > 0 for v in size), where,
             "preprocess.input_size must be [channels, height, width] of positive integers")
    channels = pre.get("channels")
    _require(channels in (1, 3) and channels == size[0], where,
             "preprocess.channels must be 1 or 3 and equal input_size[0]")
    for key in ("resize", "center_crop"):
        _require(isinstance(pre.get(key), int) and pre[key] > 0, where, f"preprocess.{key} must be a positive integer")
    _require(pre["center_crop"] == size[1] == size[2], where,
             "preprocess.center_crop must equal the input height and width")
    _require(pre.get("resize_mode", "shorter_side") == "shorter_side", where,
             "preprocess.resize_mode must be 'shorter_side'")
    _require(pre.get("interpolation", "bilinear") == "bilinear", where,
             "preprocess.interpolation must be 'bilinear'")
    _require(pre.get("layout", "NCHW") == "NCHW", where, "preprocess.layout must be 'NCHW'")
    _require(pre.get("gray_to_rgb", "repeat") == "repeat", where, "preprocess.gray_to_rgb must be 'repeat'")
    _require(pre.get("channel_order", "RGB" if channels == 3 else "L") in ("RGB", "BGR", "L"), where,
             "preprocess.channel_order must be RGB, BGR or L")
    _require(_is_number(pre.get("scale")) and pre["scale"] > 0, where, "preprocess.scale must be a positive number")
    for key in ("mean", "std"):
        vals = pre.get(key)
        _require(isinstance(vals, list) and len(vals) == channels and all(_is_number(v) for v in vals), where,
                 f"preprocess.{key} must be a list of {channels} numbers")
    _require(all(v != 0 for v in pre["std"]), where, "preprocess.std must not contain 0")
    _require(isinstance(pre.get("hair_removal", False), bool), where, "preprocess.hair_removal must be true or false")

    tta = meta.get("tta")
    if tta is not None:
        _require(isinstance(tta, dict), where, "tta must be an object")
        views = tta.get("views", [])
        _require(isinstance(views, list) and all(v in TTA_VIEWS for v in views), where,
                 f"tta.views must be a list of {', '.join(TTA_VIEWS)}")
        frac = tta.get("center_crop_fraction", 0.875)
        _require(_is_number(frac) and 0 < frac <= 1, where, "tta.center_crop_fraction must be in (0, 1]")
        _require(tta.get("ensemble", "mean_softmax") == "mean_softmax", where, "tta.ensemble must be 'mean_softmax'")

    io = meta.get("io")
    _require(isinstance(io, dict) and isinstance(io.get("input"), str) and isinstance(io.get("output"), str), where,
             "io must name the model's input and output")

    arts = meta.get("artifacts")
    _require(isinstance(arts, list) and len(arts) >= 1, where, "artifacts must be a non-empty list")
    for i, art in enumerate(arts):
        at = f"artifacts[{i}]"
        _require(isinstance(art, dict), where, f"{at} must be an object")
        _require(art.get("format") in FORMATS, where, f"{at}.format must be one of {', '.join(FORMATS)}")
        _require(art.get("precision") in PRECISIONS, where, f"{at}.precision must be one of {', '.join(PRECISIONS)}")
        path = art.get("path")
        _require(isinstance(path, str) and path and not PurePosixPath(path).is_absolute()
                 and ".." not in PurePosixPath(path).parts, where, f"{at}.path must be a relative path inside the bundle")
        _require(art.get("inference_precision_hint") in (None, "f32", "f16", "bf16"), where,
                 f"{at}.inference_precision_hint must be f32, f16 or bf16")
        suffix = ".onnx" if art["format"] == "onnx" else ".xml"
        _require(path.endswith(suffix), where, f"{at}.path must end with {suffix} for format {art['format']}")
