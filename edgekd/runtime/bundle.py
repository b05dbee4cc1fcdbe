"""Opening an edge bundle (directory or .zip): safe extraction, sha256 manifest check, edgekd.json validation."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import lzma
import math
import os
import re
import stat
import weakref
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from edgekd.errors import EdgeKDError, quote, shorten, shown
from edgekd.fileio import deferred_signals, ensure_free_space, make_temp_dir, remove_tree, sha256_file
from edgekd.formats import ARTIFACT_FORMATS, PRECISIONS, TTA_VIEWS
from edgekd.host import usable_cores

SCHEMA = "edgekd-bundle/1"
RT_INFO_SECTION = "edgekd"
"""The OpenVINO rt_info section holding the export's metadata (ONNX: the model's metadata_props)."""
EMBEDDED_KEYS = {"class_names": None, "preprocess": None, "io": None, "tasks": None,
                 "tta": ("views", "center_crop_fraction"), "calibration": ("temperature", "bias"),
                 "decision": ("threshold", "positive_index", "positive_class")}
"""What the runner reads from edgekd.json (a section, or these fields of it) and the export also wrote into each model
file: they must agree. The decision's validation figures are not compared (they do not change a prediction)."""
METADATA_FILE = "edgekd.json"
MANIFEST_FILE = "manifest.sha256"
MAX_ZIP_BYTES = 4 * 2**30
"""Zip-bomb guard: a bundle never needs more than this uncompressed (and never more than the free disk space)."""
MAX_SMALL_FILE = 16 * 2**20
"""edgekd.json, manifest.sha256 and other text members are never larger than this."""
MAX_COMPRESSION_RATIO = 50
"""Model weights barely compress: a member over 1 MiB that inflates more than this is refused as a zip bomb."""
FREE_SPACE_MARGIN = 64 * 2**20


@dataclass(frozen=True)
class Artifact:
    """One exported model file of a bundle, addressed by (format, precision), with the sha256 digests the
    manifest gave it (None when the bundle was opened unverified)."""

    format: str
    precision: str
    path: Path
    inference_precision_hint: str | None = None
    """OpenVINO CPU math the export's parity gate used (f32 for FP32 artifacts)."""
    sha256: str | None = None
    weights_sha256: str | None = None
    """OpenVINO IR only: the digest of the .bin next to the .xml."""

    @property
    def weights_path(self) -> Path | None:
        return self.path.with_suffix(".bin") if self.format == "openvino" else None

    def read(self) -> tuple[bytes, bytes | None]:
        """The model's bytes (and an IR's weights), each read once and checked against its manifest digest: the
        backend compiles exactly these bytes, so a file swapped after the bundle was verified is refused, and one
        swapped after this read is never opened."""
        model = read_verified(self.path, self.sha256)
        weights = read_verified(self.weights_path, self.weights_sha256) if self.weights_path else None
        return model, weights


def metadata_strings(metadata: dict[str, Any]) -> dict[str, str]:
    """Metadata as flat string pairs (ONNX metadata_props, OpenVINO rt_info): strings as-is, the rest as JSON."""
    return {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in metadata.items()}


def parse_metadata_strings(pairs: dict[str, str]) -> dict[str, Any]:
    """Metadata read back from flat string pairs (ONNX metadata_props, OpenVINO rt_info): JSON where it parses,
    else the string."""
    out: dict[str, Any] = {}
    for k, v in pairs.items():
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def check_embedded_metadata(meta: dict[str, Any], embedded: dict[str, str], where: str) -> None:
    """edgekd.json against the copy the export embedded in a model file (EMBEDDED_KEYS): a class name, threshold or
    normalization edited in edgekd.json alone (its manifest line re-hashed) would relabel the model's outputs
    without a word. A model file without an embedded copy (not written by edgekd export) is not checked; in one
    with it, a key either side lacks counts as null (a `tasks` or `calibration` section added to edgekd.json alone
    had not been compared: the export embeds every key it writes)."""
    if not embedded:
        return
    said = parse_metadata_strings({k: v for k, v in embedded.items() if k in EMBEDDED_KEYS})
    for key, fields in EMBEDDED_KEYS.items():
        ours, theirs = (_used(v, fields) for v in (meta.get(key), said.get(key)))
        if ours != theirs:
            both = isinstance(ours, dict) and isinstance(theirs, dict)
            sub = next((f for f in dict.fromkeys([*ours, *theirs]) if ours.get(f) != theirs.get(f)), None) \
                if both else None
            name = f"{key}.{sub}" if sub else key
            shown_ours, shown_theirs = (ours.get(sub), theirs.get(sub)) if sub else (ours, theirs)
            raise EdgeKDError(f"{where}: edgekd.json {name} is {shorten(json.dumps(shown_ours), 60)}, the model file "
                              f"was exported with {shorten(json.dumps(shown_theirs), 60)} (edgekd.json edited after "
                              "export?)")


def check_embedded_artifact(artifact: "Artifact", embedded: dict[str, str], where: str) -> None:
    """The format and precision edgekd.json lists a model file under against the ones the export embedded in it:
    two entries' paths swapped (manifest re-hashed) had run an INT8 file reported as FP32."""
    said = parse_metadata_strings({k: embedded[k] for k in ("format", "precision") if k in embedded})
    for key, ours in (("format", artifact.format), ("precision", artifact.precision)):
        if key in said and said[key] != ours:
            raise EdgeKDError(f"{where}: edgekd.json lists it as {key} {ours}, the model file was exported as "
                              f"{shorten(json.dumps(said[key]), 40)} (edgekd.json edited after export?)")


def _used(value: Any, fields: tuple[str, ...] | None) -> Any:
    """The compared part of a section, as edgekd.json stores it (NaN as null)."""
    value = json.loads(json.dumps(value, allow_nan=True), parse_constant=lambda _c: None)
    if fields is not None and isinstance(value, dict):
        return {f: value.get(f) for f in fields}
    return value


@dataclass
class Bundle:
    """A verified bundle on disk: its root directory, parsed metadata and artifacts."""

    root: Path
    meta: dict[str, Any]
    source: Path
    artifacts: list[Artifact] = field(default_factory=list)
    _cleanup: Any = field(default=None, repr=False, compare=False)
    """A zip bundle's: removes the extracted temp dir (when the Bundle is collected, at exit, or on close())."""

    def close(self) -> None:
        """Remove a zip bundle's extracted files now (a folder bundle has none); its artifacts are unreadable
        after."""
        if self._cleanup is not None:
            self._cleanup()

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
        """The export profile's thread hint, at most this machine's cores (None: the backend's default)."""
        threads = (self.meta.get("runtime") or {}).get("threads")
        return cap_to_cores(threads) if isinstance(threads, int) and threads > 0 else None

    @property
    def image_channels(self) -> int | None:
        """The channels of the images the model was trained on (1: gray), recorded at export; None if unknown."""
        channels = (self.meta.get("runtime") or {}).get("image_channels")
        return channels if channels in (1, 3) else None

    @property
    def model(self) -> dict[str, Any]:
        return self.meta.get("model", {})

    @property
    def temperature(self) -> float:
        """The calibration temperature fit at export (1.0 for a bundle without one: raw softmax)."""
        return float((self.meta.get("calibration") or {}).get("temperature", 1.0))

    @property
    def calibration_bias(self) -> list[float] | None:
        """The per-class bias added after the temperature (Platt scaling), or None."""
        return (self.meta.get("calibration") or {}).get("bias")

    @property
    def decision(self) -> tuple[float | None, int]:
        """(threshold on the positive class's calibrated probability or None for argmax, positive class index)."""
        decision = self.meta.get("decision") or {}
        return decision.get("threshold"), int(decision.get("positive_index", 1))

    @property
    def tasks(self) -> list[dict[str, Any]] | None:
        """A multi-head bundle's tasks (name, class_names, outputs [lo, hi) of the logits), in output order; None
        for a bundle with one head (every bundle before multi-head export)."""
        return self.meta.get("tasks")

    @property
    def sha256(self) -> str:
        """The bundle's identity: the sha256 of its manifest.sha256, which lists every file's sha256."""
        return hashlib.sha256((self.root / MANIFEST_FILE).read_bytes()).hexdigest()

    def most_precise(self) -> str:
        """The most precise precision of the bundle's models: fp32, else fp16, else int8. A backend that cannot
        run that one is an error naming what the bundle has, never a quieter fallback to INT8."""
        have = {a.precision for a in self.artifacts}
        return next((p for p in PRECISIONS if p in have), "fp32")

    def artifact(self, fmt: str, precision: str, choose: Callable[[str], str] | None = None) -> Artifact:
        """The model of a format and precision, named in any case (`--precision FP16`). `choose(format)`: the
        option that picks a format's model, for the refusal's hint (default `--backend <format>`)."""
        for art in self.artifacts:
            if art.format == fmt.lower() and art.precision == precision.lower():
                return art
        have = ", ".join(f"{a.format}/{a.precision}" for a in self.artifacts) or "none"
        others = [a.format for a in self.artifacts if a.precision == precision.lower()]
        if not others:  # whatever the backend: naming one had read as if another backend could run it
            raise EdgeKDError(f"{self.source}: no {precision} model in the bundle (it has: {have})")
        option = (choose or (lambda f: f"--backend {f}"))(others[0])
        raise EdgeKDError(f"{self.source}: no {fmt} {precision} model in the bundle (it has: {have}; {option} "
                          f"runs its {others[0]} {precision} model)")


def _starts_like_a_zip(path: Path) -> bool:
    """A file that begins with a zip's local-file signature (a zip cut short fails zipfile.is_zipfile)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def not_a_bundle(source: Path) -> EdgeKDError:
    """Why a file that is neither a folder nor a whole zip is no bundle."""
    if _starts_like_a_zip(source):
        return EdgeKDError(f"{source}: a truncated or corrupt zip (its central directory is missing): copy the bundle "
                           "again")
    if source.suffix.lower() == ".zip":  # named .zip, but not a zip at all: "expected a .zip file" read oddly
        return EdgeKDError(f"{source}: not a zip file (it does not start like one): not a bundle")
    return EdgeKDError(f"{source}: not a bundle (expected a directory or a .zip file)")


def open_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Open a bundle directory or .zip; with `verify`, every file must match manifest.sha256.

    Nothing in a bundle may be a symlink or a special file. A zip's names, sizes and manifest are checked before
    anything is written; it is extracted (each member hashed on the way) into a private temporary directory,
    removed when the Bundle is garbage-collected or the process exits. edgekd.json is parsed from the bytes that
    were verified, and `Artifact.read` hands a backend the verified bytes of its model.
    """
    source = Path(path)
    if not source.exists():
        raise EdgeKDError(f"{source}: bundle not found")
    if source.is_dir():
        root, tmp, zip_digests = source, None, None
    elif zipfile.is_zipfile(source):
        tmp = None
        try:
            with deferred_signals():  # the temp dir and its name in one step: a kill cannot orphan it
                tmp = make_temp_dir("edgekd-bundle-")  # a killed run's extraction is swept
            root, zip_digests = extract_zip(source, tmp, verify=verify)
        except BaseException:
            if tmp is not None:
                remove_tree(tmp)
            raise
    else:
        raise not_a_bundle(source)
    if zip_digests is None and not (root / METADATA_FILE).exists() and not (root / MANIFEST_FILE).exists():
        run = "; a training run: export it first (edgekd export)" if (root / "best.pt").is_file() else ""
        raise EdgeKDError(f"{source}: not a bundle (no {METADATA_FILE} or {MANIFEST_FILE} in it){run}")
    try:
        files = regular_files(root, source)
        if not verify:
            digests = {}
        elif zip_digests is not None:  # hashed while extracted into the private temp dir: checked already
            digests = zip_digests
        else:
            digests = verify_manifest(root, source, files)
        meta = parse_metadata(read_verified(root / METADATA_FILE, digests.get(METADATA_FILE), root, source,
                                            MAX_SMALL_FILE), source)
        artifacts = []
        for a in meta["artifacts"]:
            art = Artifact(a["format"], a["precision"], root / a["path"], a.get("inference_precision_hint"),
                           digests.get(PurePosixPath(a["path"]).as_posix()))
            for file in filter(None, (art.path, art.weights_path)):
                if file.relative_to(root).as_posix() not in files:
                    raise EdgeKDError(f"{source}: {shown(file.relative_to(root).as_posix())} is listed in "
                                      "edgekd.json but missing")
            if art.weights_path is not None:
                art = dataclasses.replace(art, weights_sha256=digests.get(art.weights_path.relative_to(root).as_posix()))
            artifacts.append(art)
        bundle = Bundle(root=root, meta=meta, source=source, artifacts=artifacts)
        if tmp is not None:
            bundle._cleanup = weakref.finalize(bundle, remove_tree, tmp)
    except BaseException:
        if tmp is not None:
            remove_tree(tmp)
        raise
    return bundle


def read_verified(path: Path, digest: str | None, root: Path | None = None, source: Path | None = None,
                  max_bytes: int | None = None) -> bytes:
    """A regular file's bytes, read once through a descriptor that does not follow symlinks; with `digest`, they
    must hash to it (the file changed since the manifest check otherwise); with `max_bytes`, a larger file is
    refused before it is read. Errors name `source` (the bundle as the user gave it) and the path relative to
    `root`."""
    where = source or root or path.parent
    rel = path.relative_to(root).as_posix() if root is not None else path.name
    try:
        # O_BINARY: Windows' CRT reads in text mode without it (the model bytes changed, the digest refused)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise EdgeKDError(f"{where}: {rel} is missing") from None
    except OSError as err:
        raise EdgeKDError(f"{where}: {rel} cannot be opened ({err.strerror}; a symlink?)") from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise EdgeKDError(f"{where}: {rel} is not a regular file")
        if max_bytes is not None and info.st_size > max_bytes:
            raise EdgeKDError(f"{where}: {rel} is {info.st_size / 2**20:.0f} MiB, over the {max_bytes / 2**20:.0f} MiB "
                              "a metadata file may have")
        data = fh.read()
    if digest is not None and hashlib.sha256(data).hexdigest() != digest:
        raise EdgeKDError(f"{where}: {rel} changed since the bundle was verified (its sha256 no longer matches "
                          f"{MANIFEST_FILE}): refusing to load it")
    return data


def regular_files(root: Path, source: Path | None = None) -> set[str]:
    """The bundle's files (relative POSIX paths); a symlink or a special file (FIFO, device, socket) anywhere
    under `root` is refused: a bundle is plain files only, so nothing it names can point outside it."""
    source = source or root
    found: set[str] = set()
    for folder, dirs, names in os.walk(root, followlinks=False):
        for name in [*dirs, *names]:
            path = Path(folder, name)
            rel = path.relative_to(root).as_posix()
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                raise EdgeKDError(f"{source}: {shown(rel)} vanished while the bundle was checked") from None
            if stat.S_ISLNK(mode):
                raise EdgeKDError(f"{source}: {shown(rel)} is a symlink (a bundle holds plain files only)")
            if stat.S_ISREG(mode):
                found.add(rel)
            elif not stat.S_ISDIR(mode):
                raise EdgeKDError(f"{source}: {shown(rel)} is not a regular file (a bundle holds plain files only)")
    return found


def _safe_member_path(name: str, archive: Path) -> PurePosixPath:
    posix = PurePosixPath(name.replace("\\", "/"))
    if posix.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise EdgeKDError(f"{archive}: refusing zip member with an absolute path: {shown(name)}")
    if ".." in posix.parts:
        raise EdgeKDError(f"{archive}: refusing zip member that escapes the bundle: {shown(name)}")
    return posix


def extract_zip(archive: Path, dest: Path, verify: bool = True) -> tuple[Path, dict[str, str] | None]:
    """Extract a bundle zip into `dest`; returns the folder holding edgekd.json and (with `verify`) the manifest's
    digests, every extracted file having matched its own.

    Before a byte is written: member names (no absolute paths, `..`, symlinks, duplicates, encryption), sizes
    (each member's and the total against MAX_ZIP_BYTES and the free space under `dest`, compression ratios) and,
    with `verify`, the manifest: every member must be listed in it. While extracting, a member may not grow past
    its declared size and must hash to its listed digest.
    """
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            prefix = _zip_prefix(archive, members)
            names: set[str] = set()
            total = 0
            for info in members:
                name = _safe_member_path(info.filename, archive).as_posix()
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise EdgeKDError(f"{archive}: refusing symlink zip member: {shown(info.filename)}")
                if info.flag_bits & 0x1:
                    raise EdgeKDError(f"{archive}: {shown(info.filename)} is encrypted (bundles are not)")
                if name in names:
                    raise EdgeKDError(f"{archive}: {shown(info.filename)} appears twice in the zip")
                if not name.startswith(prefix):
                    raise EdgeKDError(f"{archive}: {shown(info.filename)} is outside the bundle folder {prefix!r}")
                names.add(name)
                if info.file_size > 2**20 and info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1):
                    raise EdgeKDError(f"{archive}: {shown(info.filename)} inflates {info.file_size / max(info.compress_size, 1):.0f}x "
                                      f"(over {MAX_COMPRESSION_RATIO}x: a zip bomb, not a model)")
                total += info.file_size
            if total > MAX_ZIP_BYTES:
                raise EdgeKDError(f"{archive}: uncompressed size {total / 2**30:.1f} GiB is over the "
                                  f"{MAX_ZIP_BYTES / 2**30:.0f} GiB limit")
            ensure_free_space(dest, total + FREE_SPACE_MARGIN, f"extracting {archive.name}")
            listed = _zip_manifest(zf, archive, prefix, names) if verify else {}
            for info in members:
                name = _safe_member_path(info.filename, archive)
                target = dest.joinpath(*name.parts)
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    _extract_member(zf, info, target, listed.get(name.as_posix()[len(prefix):]), archive)
                except (OSError, EOFError, lzma.LZMAError) as err:  # a bad stream, a member that is a folder too
                    raise EdgeKDError(f"{archive}: {shown(info.filename)} cannot be extracted "
                                      f"({shorten(str(err) or type(err).__name__, 120)})") from None
    except zipfile.BadZipFile as err:
        raise EdgeKDError(f"{archive}: corrupt zip ({err})") from None
    except (RuntimeError, NotImplementedError, zlib.error) as err:  # unsupported compression, bad deflate stream
        raise EdgeKDError(f"{archive}: cannot be extracted ({shorten(str(err), 120)})") from None
    return (dest.joinpath(*PurePosixPath(prefix).parts) if prefix else dest), (listed if verify else None)


def is_bundle(path: str | Path) -> bool:
    """Whether `path` is meant as a bundle: a folder holding edgekd.json, any `.zip` (missing, truncated or not a
    bundle: open_bundle says which), or a zip of another name holding edgekd.json at its root or in its one top
    folder. A checkpoint is a zip too (torch.save) but has none; open_bundle verifies the rest."""
    path = Path(path)
    if path.is_dir():
        return (path / METADATA_FILE).is_file()
    if path.suffix.lower() == ".zip":
        return True
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return METADATA_FILE in names or any(n.count("/") == 1 and n.endswith(f"/{METADATA_FILE}") for n in names)


def _zip_prefix(archive: Path, members: list[zipfile.ZipInfo]) -> str:
    """'' when edgekd.json is at the zip's root, 'folder/' for a zip of the bundle folder itself."""
    names = [m.filename for m in members]
    if METADATA_FILE in names:
        return ""
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) == 1 and f"{next(iter(tops))}/{METADATA_FILE}" in names:
        return f"{next(iter(tops))}/"
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):  # torch.save's zip layout
        raise EdgeKDError(f"{archive}: a PyTorch checkpoint, not a bundle; export it first (edgekd export)")
    raise EdgeKDError(f"{archive}: no {METADATA_FILE} at the top of the zip")


def _zip_manifest(zf: zipfile.ZipFile, archive: Path, prefix: str, names: set[str]) -> dict[str, str]:
    """The zip's manifest (read into memory, bounded), every member listed in it: checked before extraction."""
    name = prefix + MANIFEST_FILE
    if name not in names:
        raise EdgeKDError(f"{archive}: {MANIFEST_FILE} is missing (not a bundle, or an unverified copy)")
    info = zf.getinfo(name)
    if info.file_size > MAX_SMALL_FILE:
        raise EdgeKDError(f"{archive}: {MANIFEST_FILE} is {info.file_size / 2**20:.0f} MiB (a manifest is a few lines)")
    listed = parse_manifest(zf.read(info).decode("utf-8", "replace"), archive)
    present = {member[len(prefix):] for member in names}
    for rel in sorted(present - {MANIFEST_FILE} - set(listed)):
        raise EdgeKDError(f"{archive}: {shown(rel)} is not listed in {MANIFEST_FILE}")
    for rel in sorted(set(listed) - present):
        raise EdgeKDError(f"{archive}: {shown(rel)} is listed in {MANIFEST_FILE} but missing")
    return listed


def _extract_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, digest: str | None,
                    archive: Path) -> None:
    """Copy one member, never more bytes than it declares, hashing on the way (`digest`: must match)."""
    h = hashlib.sha256()
    written = 0
    with zf.open(info) as src, open(target, "xb") as dst:
        for block in iter(lambda: src.read(1 << 20), b""):
            written += len(block)
            if written > info.file_size:
                raise EdgeKDError(f"{archive}: {shown(info.filename)} holds more bytes than the zip declares")
            h.update(block)
            dst.write(block)
    if digest is not None and h.hexdigest() != digest:
        raise EdgeKDError(f"{archive}: {shown(info.filename)} does not match its sha256 in {MANIFEST_FILE} "
                          "(modified or corrupt)")


def parse_manifest(text: str, source: Path) -> dict[str, str]:
    """manifest.sha256 lines `<sha256>  <relative/path>` -> {path: digest}; a malformed line is an error."""
    listed: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(None, 1)
        digest = parts[0].lower()
        if len(parts) != 2 or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise EdgeKDError(f"{source}: {MANIFEST_FILE} line {lineno} is not '<sha256>  <path>'")
        rel = parts[1].strip().lstrip("*")  # '*' marks binary mode in sha256sum output
        posix = PurePosixPath(rel)
        if posix.is_absolute() or ".." in posix.parts:
            raise EdgeKDError(f"{source}: {MANIFEST_FILE} line {lineno} names a path outside the bundle: {shown(rel)}")
        if posix.as_posix() in listed:  # the last line had won; `sha256sum -c` checks every line
            raise EdgeKDError(f"{source}: {MANIFEST_FILE} line {lineno} lists {shown(rel)} a second time")
        listed[posix.as_posix()] = digest
    return listed


def verify_manifest(root: Path, source: Path | None = None, files: set[str] | None = None) -> dict[str, str]:
    """Check manifest.sha256 against the files: each listed file present and matching, no unlisted file, no
    symlink or special file; returns {path: digest}."""
    source = source or root
    files = regular_files(root, source) if files is None else files
    if MANIFEST_FILE not in files:
        raise EdgeKDError(f"{source}: {MANIFEST_FILE} is missing (not a bundle, or an unverified copy)")
    manifest = read_verified(root / MANIFEST_FILE, None, root, source, MAX_SMALL_FILE)
    listed = parse_manifest(manifest.decode("utf-8", "replace"), source)
    for rel, digest in listed.items():
        if rel not in files:
            raise EdgeKDError(f"{source}: {shown(rel)} is listed in {MANIFEST_FILE} but missing")
        if sha256_file(root / rel, follow_symlinks=False) != digest:
            raise EdgeKDError(f"{source}: {shown(rel)} does not match its sha256 in {MANIFEST_FILE} (modified or "
                              "corrupt)")
    for rel in sorted(files):
        if rel != MANIFEST_FILE and rel not in listed:
            raise EdgeKDError(f"{source}: {shown(rel)} is not listed in {MANIFEST_FILE}")
    return listed


def parse_metadata(data: bytes, source: Path) -> dict[str, Any]:
    """edgekd.json bytes -> the validated metadata; NaN and Infinity (which Python's json accepts) are refused."""
    def no_constants(name: str):
        raise ValueError(f"{name} is not a JSON number")

    try:
        meta = json.loads(data.decode("utf-8"), parse_constant=no_constants)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise EdgeKDError(f"{source}: {METADATA_FILE} is not valid JSON ({shorten(str(err), 120)})") from None
    validate_metadata(meta, f"{source}: {METADATA_FILE}")
    return meta


def _require(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise EdgeKDError(f"{where}: {message}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


MAX_INPUT_SIDE = 4096
"""The largest model input height/width a bundle may declare."""
MAX_RESIZE_FACTOR = 4
"""preprocess.resize is at most this many times the crop (and at least half of it): 256 for 224 is 1.14x."""
MAX_THREADS = 1024


def cap_to_cores(threads: int) -> int:
    """A thread count at most the cores this process may run on (its CPU affinity where the OS tells it)."""
    return min(threads, usable_cores())
MAX_CLASSES = 10_000


def _validate_preprocess(pre: Any, where: str) -> None:
    """metadata.preprocess: the eval pipeline the runtime reproduces."""
    _require(isinstance(pre, dict), where, "preprocess must be an object")
    size = pre.get("input_size")
    _require(isinstance(size, list) and len(size) == 3
             and all(isinstance(v, int) and not isinstance(v, bool) and 0 < v for v in size), where,
             "preprocess.input_size must be [channels, height, width] of positive integers")
    _require(max(size[1:]) <= MAX_INPUT_SIDE, where,
             f"preprocess.input_size {size[1]}x{size[2]} is over the {MAX_INPUT_SIDE} px limit")
    channels = pre.get("channels")
    _require(channels in (1, 3) and channels == size[0], where,
             "preprocess.channels must be 1 or 3 and equal input_size[0]")
    for key in ("resize", "center_crop"):
        _require(isinstance(pre.get(key), int) and not isinstance(pre[key], bool) and pre[key] > 0, where,
                 f"preprocess.{key} must be a positive integer")
    _require(pre["center_crop"] == size[1] == size[2], where,
             "preprocess.center_crop must equal the input height and width")
    crop = pre["center_crop"]
    _require(crop // 2 <= pre["resize"] <= MAX_RESIZE_FACTOR * crop, where,
             f"preprocess.resize {pre['resize']} is out of range for a {crop} px input ({crop // 2} to "
             f"{MAX_RESIZE_FACTOR * crop})")
    _require(pre.get("resize_mode", "shorter_side") == "shorter_side", where,
             "preprocess.resize_mode must be 'shorter_side'")
    _require(pre.get("interpolation", "bilinear") == "bilinear", where,
             "preprocess.interpolation must be 'bilinear'")
    _require(pre.get("layout", "NCHW") == "NCHW", where, "preprocess.layout must be 'NCHW'")
    _require(pre.get("gray_to_rgb", "repeat") == "repeat", where, "preprocess.gray_to_rgb must be 'repeat'")
    _require(pre.get("channel_order", "RGB" if channels == 3 else "L") in ("RGB", "BGR", "L"), where,
             "preprocess.channel_order must be RGB, BGR or L")
    _require(_is_number(pre.get("scale")) and 1e-6 <= pre["scale"] <= 1e3, where,
             "preprocess.scale must be a finite number in [1e-6, 1e3]")
    for key, lo, hi in (("mean", -1e4, 1e4), ("std", 1e-6, 1e4)):
        vals = pre.get(key)
        _require(isinstance(vals, list) and len(vals) == channels and all(_is_number(v) for v in vals), where,
                 f"preprocess.{key} must be a list of {channels} finite numbers")
        _require(all(lo <= v <= hi for v in vals), where, f"preprocess.{key} values must be in [{lo:g}, {hi:g}]")
    _require(isinstance(pre.get("hair_removal", False), bool), where, "preprocess.hair_removal must be true or false")
    kernel = pre.get("hair_kernel")
    _require(kernel is None or (isinstance(kernel, int) and not isinstance(kernel, bool) and 3 <= kernel <= 4096),
             where, "preprocess.hair_kernel must be null or a whole number of pixels in [3, 4096]")


def _validate_runtime_and_tta(meta: dict, where: str) -> None:
    """The optional runtime hints and TTA settings."""
    runtime = meta.get("runtime")
    if runtime is not None:
        _require(isinstance(runtime, dict), where, "runtime must be an object")
        threads = runtime.get("threads")
        _require(threads is None or (isinstance(threads, int) and not isinstance(threads, bool)
                                     and 1 <= threads <= MAX_THREADS), where,
                 f"runtime.threads must be null or an integer in [1, {MAX_THREADS}]")
        _require(runtime.get("image_channels") in (None, 1, 3), where, "runtime.image_channels must be 1, 3 or null")

    tta = meta.get("tta")
    if tta is not None:
        _require(isinstance(tta, dict), where, "tta must be an object")
        views = tta.get("views", [])
        _require(isinstance(views, list) and all(v in TTA_VIEWS for v in views), where,
                 f"tta.views must be a list of {', '.join(TTA_VIEWS)}")
        frac = tta.get("center_crop_fraction", 0.875)
        _require(_is_number(frac) and 0 < frac <= 1, where, "tta.center_crop_fraction must be in (0, 1]")
        _require(tta.get("ensemble", "mean_softmax") == "mean_softmax", where, "tta.ensemble must be 'mean_softmax'")


def _validate_operating_point(meta: dict, where: str) -> None:
    """The optional calibration temperature and decision threshold (bundles before them have neither)."""
    calibration = meta.get("calibration")
    if calibration is not None:
        _require(isinstance(calibration, dict) and _is_number(calibration.get("temperature"))
                 and 0 < calibration["temperature"] <= 1000, where, "calibration.temperature must be a number in (0, 1000]")
        bias = calibration.get("bias")
        _require(bias is None or (isinstance(bias, list) and len(bias) == len(meta.get("class_names") or [])
                                  and all(_is_number(b) and abs(b) <= 1000 for b in bias)), where,
                 "calibration.bias must be null or one number in [-1000, 1000] per class")
    decision = meta.get("decision")
    if decision is not None:
        _require(isinstance(decision, dict), where, "decision must be an object")
        threshold, positive = decision.get("threshold"), decision.get("positive_index", 1)
        _require(threshold is None or (_is_number(threshold) and 0 <= threshold <= 1), where,
                 "decision.threshold must be null or a number in [0, 1]")
        _require(threshold is None or len(meta.get("class_names") or []) == 2, where,
                 "decision.threshold needs a two-class model")
        _require(isinstance(positive, int) and 0 <= positive < len(meta.get("class_names") or []), where,
                 "decision.positive_index must be a class index")
        named = decision.get("positive_class")
        _require(named is None or named == (meta.get("class_names") or [None])[positive], where,
                 "decision.positive_class must be the class name at decision.positive_index")


def _validate_tasks(meta: dict, where: str) -> None:
    """The optional `tasks` of a multi-head bundle: names, class names and output slices that tile class_names in
    order; no calibration or threshold (they are fit for one task)."""
    tasks = meta.get("tasks")
    if tasks is None:
        return
    _require(isinstance(tasks, list) and len(tasks) >= 1, where, "tasks must be a non-empty list")
    end = 0
    for i, task in enumerate(tasks):
        at = f"tasks[{i}]"
        _require(isinstance(task, dict) and isinstance(task.get("name"), str) and 0 < len(task["name"]) <= 200,
                 where, f"{at}.name must be a name of 1 to 200 characters")
        outputs, names = task.get("outputs"), task.get("class_names")
        _require(isinstance(outputs, list) and len(outputs) == 2 and all(type(v) is int for v in outputs)
                 and outputs[0] == end and outputs[1] > end, where,
                 f"{at}.outputs must be [{end}, end] with end > {end} (the slices tile the outputs in order)")
        _require(isinstance(names, list) and len(names) == outputs[1] - outputs[0]
                 and all(isinstance(n, str) and 0 < len(n) <= 200 for n in names) and len(set(names)) == len(names),
                 where, f"{at}.class_names must name each of its {outputs[1] - outputs[0]} outputs once")
        end = outputs[1]
    _require(end == len(meta["class_names"]), where, f"tasks cover {end} outputs, class_names has "
             f"{len(meta['class_names'])}")
    _require(len({t["name"] for t in tasks}) == len(tasks), where, "task names must be unique")
    _require(meta.get("calibration") is None and (meta.get("decision") or {}).get("threshold") is None, where,
             "a multi-head bundle has no calibration or decision threshold")


def _validate_artifacts(arts: Any, where: str) -> None:
    """metadata.artifacts: a non-empty list of (format, precision, relative path) the runtime can open."""
    _require(isinstance(arts, list) and len(arts) >= 1, where, "artifacts must be a non-empty list")
    for i, art in enumerate(arts):
        at = f"artifacts[{i}]"
        _require(isinstance(art, dict), where, f"{at} must be an object")
        _require(art.get("format") in ARTIFACT_FORMATS, where,
                 f"{at}.format must be one of {', '.join(ARTIFACT_FORMATS)}")
        _require(art.get("precision") in PRECISIONS, where, f"{at}.precision must be one of {', '.join(PRECISIONS)}")
        path = art.get("path")
        _require(isinstance(path, str) and path and not PurePosixPath(path).is_absolute()
                 and ".." not in PurePosixPath(path).parts, where, f"{at}.path must be a relative path inside the bundle")
        # f32: the arithmetic the export's parity gate ran the artifact in (a bf16 hint, accepted before, had run it
        # in other maths than the gate checked: probabilities 1e-3 away, the card still saying fp32)
        _require(art.get("inference_precision_hint") in (None, "f32"), where,
                 f"{at}.inference_precision_hint must be f32 (the arithmetic the export's parity gate checked)")
        suffix = ".onnx" if art["format"] == "onnx" else ".xml"
        _require(path.endswith(suffix), where, f"{at}.path must end with {suffix} for format {art['format']}")
    pairs = [(a["format"], a["precision"]) for a in arts]
    paths = [PurePosixPath(a["path"]).as_posix() for a in arts]
    _require(len(set(pairs)) == len(pairs) and len(set(paths)) == len(paths), where,
             "artifacts must list each (format, precision) and each path once")


def validate_metadata(meta: Any, where: str = METADATA_FILE) -> None:
    """Check the keys the runtime relies on (schema edgekd-bundle/1) and their bounds, before anything is
    allocated from them: finite preprocessing numbers, std > 0, input and resize sizes within MAX_INPUT_SIDE and
    MAX_RESIZE_FACTOR of each other, a thread hint within MAX_THREADS. The first problem raises EdgeKDError."""
    _require(isinstance(meta, dict), where, "must be a JSON object")
    schema = meta.get("schema")
    version = re.fullmatch(r"edgekd-bundle/(\d+)", schema) if isinstance(schema, str) else None
    newer = version is not None and int(version.group(1)) > 1
    _require(schema == SCHEMA, where, f"schema must be '{SCHEMA}', got {quote(schema, 60)}"
             + (" (written by a newer edgekd: upgrade edgekd here, pip install -U edgekd)" if newer else ""))
    names = meta.get("class_names")
    _require(isinstance(names, list) and 1 <= len(names) <= MAX_CLASSES
             and all(isinstance(n, str) and 0 < len(n) <= 200 for n in names), where,
             f"class_names must be a list of 1 to {MAX_CLASSES} names (1 to 200 characters each)")
    _require(len(set(names)) == len(names), where, "class_names must be unique (a probability per name had been "
             "lost)")

    _validate_preprocess(meta.get("preprocess"), where)
    _validate_runtime_and_tta(meta, where)
    _validate_operating_point(meta, where)
    _validate_tasks(meta, where)
    io = meta.get("io")
    _require(isinstance(io, dict) and isinstance(io.get("input"), str) and isinstance(io.get("output"), str), where,
             "io must name the model's input and output")

    _validate_artifacts(meta.get("artifacts"), where)
