"""Atomic file writes (temp file + os.replace) and JSON output shared by every stage (no torch)."""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import math
import os
import shutil
import signal
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

from edgekd.errors import EdgeKDError


def _pid_space() -> str:
    """This host and pid namespace: two containers sharing a hostname (and a folder) have other pid namespaces, so
    neither takes the other's live temporary files for a dead process's."""
    try:
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        namespace = ""
    return hashlib.sha1(f"{socket.gethostname()}/{namespace}".encode()).hexdigest()[:6]


PID_SPACE = _pid_space()


def owner() -> str:
    """`<pid>@<host and pid namespace>-`: every temporary file and folder edgekd makes is named
    `<prefix><owner()><random><suffix>`, so that a later run can tell the leftovers of a process that was killed
    outright (SIGKILL, a power cut: no handler runs) from the work of one still running, and remove them
    (`sweep_leftovers`). The pid is read at each call (a forked process names its own files)."""
    return f"{os.getpid()}@{PID_SPACE}-"


def owner_alive(name: str) -> bool:
    """Whether the process that named a temporary entry (`owner()`) may still run: another host's always may."""
    pid, _, rest = name.partition("@")
    if not pid.isdigit() or rest[:7] != f"{PID_SPACE}-":
        return True
    if os.name == "nt":  # os.kill(pid, 0) there sends CTRL_C_EVENT (0) to the console: not asked, never probed
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):  # another user's process; a pid no process can have
        return True
    return True


def leftovers(parent: str | Path, prefix: str, suffix: str) -> list[os.DirEntry]:
    """The temporary entries `<prefix><pid>@<host>-*<suffix>` in `parent` whose process has exited (a run killed
    outright left them), sorted by name."""
    try:
        entries = [e for e in os.scandir(parent) if e.name.startswith(prefix) and e.name.endswith(suffix)]
    except OSError:
        return []
    return sorted((e for e in entries if not owner_alive(e.name[len(prefix):])), key=lambda e: e.name)


def sweep_leftovers(parent: str | Path, prefix: str, suffix: str) -> int:
    """Remove `leftovers(parent, prefix, suffix)`; the number removed."""
    removed = 0
    for entry in leftovers(parent, prefix, suffix):
        with contextlib.suppress(OSError):
            shutil.rmtree(entry.path) if entry.is_dir(follow_symlinks=False) else os.unlink(entry.path)
            removed += 1
    return removed


def make_temp_dir(prefix: str, suffix: str = "", parent: str | Path | None = None) -> Path:
    """tempfile.mkdtemp named by `owner()`, after sweeping the same kind's leftovers of killed runs from `parent`
    (default: the system's temporary folder)."""
    parent = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    sweep_leftovers(parent, prefix, suffix)
    return Path(tempfile.mkdtemp(prefix=prefix + owner(), suffix=suffix, dir=parent))


def sync_file(path: str | Path) -> None:
    """fsync a written file (a filesystem that cannot, e.g. some network shares: nothing to do)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sync_folder(folder: str | Path) -> None:
    """fsync a folder, so a rename in it survives a power loss (not on Windows, which cannot open folders)."""
    if os.name == "nt":
        return
    sync_file(folder)


def atomic_write(path: str | Path, write: Callable[[str], object], min_free_bytes: int = 0) -> Path:
    """Call write(tmp_path), then os.replace it to `path`: readers never see a half-written file (a killed run's
    temporary file is removed by the next write of the same file)."""
    path = Path(path)
    ensure_free_space(path.parent, min_free_bytes, path.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(path.parent, f".{path.name}.", ".tmp")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{owner()}", suffix=".tmp", dir=path.parent)
    except OSError as err:  # a read-only folder: name the file asked for, not the temp name
        raise EdgeKDError(f"{path}: could not be written ({err.strerror or err})") from None
    os.close(fd)
    try:
        write(tmp)
        with contextlib.suppress(OSError):  # mkstemp's file is private (0600); the result gets open()'s mode
            os.chmod(tmp, default_mode())  # (a filesystem without modes, e.g. vfat, refuses: nothing to do there)
        sync_file(tmp)  # on disk before it is named: after a power loss the file is old or new, never empty
        os.replace(tmp, path)
        sync_folder(path.parent)
    except OSError as err:  # disk full, permissions, ...: the old file (if any) is untouched
        raise EdgeKDError(f"{path}: could not be written ({err.strerror or err})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _umask_at_import() -> int:
    mask = os.umask(0o022)  # no other way to read it off Linux; at import, before any thread writes files
    os.umask(mask)
    return mask


_UMASK_AT_IMPORT = _umask_at_import()


def process_umask() -> int:
    """The process umask: read without changing it where Linux shows it (/proc/self/status), else the one the
    process had when this module was imported."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return _UMASK_AT_IMPORT


def default_mode(directory: bool = False) -> int:
    """The mode a plain open() or mkdir() gives under the umask (0644 / 0755 under the usual 022). mkstemp and
    mkdtemp make private files (0600 / 0700), which a service or container running as another user could not read
    once published; published outputs get this mode instead."""
    return (0o777 if directory else 0o666) & ~process_umask()


def staging_directory(prefix: str, suffix: str, parent: Path) -> Path:
    """A new uniquely named staging directory in `parent` (same filesystem, so publishing it is a rename), with
    the umask's mode: it becomes the published directory."""
    path = make_temp_dir(prefix, suffix, parent)
    with contextlib.suppress(OSError):  # a filesystem without modes refuses: nothing to do there
        os.chmod(path, default_mode(directory=True))
    return path


def ensure_free_space(folder: str | Path, needed_bytes: int, what: str) -> None:
    """Refuse a large write up front (nothing written yet) when the disk holding `folder` lacks the room."""
    if needed_bytes <= 0:
        return
    folder = Path(folder).absolute()
    probe = next((p for p in (folder, *folder.parents) if p.exists()), Path("/"))  # folder may not exist yet
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise EdgeKDError(f"{folder}: not enough free disk space for {what} (needs about "
                          f"{needed_bytes / 2**20:.0f} MiB, {free / 2**20:.0f} MiB free)")


LOW_DISK_BYTES = 64 * 2**20
"""Below this much free space a failed write is put down to a full disk (ONNX and OpenVINO name an iostream or
write error, not the disk)."""


def full_disk_note(folder: str | Path) -> str:
    """A note that the disk holding `folder` is (nearly) full, for the error of a write that failed there ("" if
    it is not)."""
    folder = Path(folder).absolute()
    probe = next((p for p in (folder, *folder.parents) if p.exists()), Path("/"))
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return ""
    return (f" (the disk holding {probe} has {free / 2**20:.0f} MiB free: a full disk is the likely cause)"
            if free < LOW_DISK_BYTES else "")


def refuse_unusable_path(out: str | Path, option: str = "--out", is_file: bool = False) -> None:
    """An output path starting with `~` (no shell expands it after `--out=`: it had made a folder named ~), or a
    folder that is a symlink to nothing (it had failed as "file exists"; a file is written where the link points)."""
    if str(out).startswith("~"):
        raise EdgeKDError(f"{option} {out}: starts with '~', which no shell expanded here (as after {option}=): give "
                          "the full path (or $HOME/...)")
    if not is_file and Path(out).is_symlink() and not Path(out).exists():
        raise EdgeKDError(f"{option} {out}: a symlink to {os.path.realpath(out)}, which does not exist (make that "
                          "folder, or give another path)")


def check_output_location(out: str | Path, option: str = "--out", is_file: bool = False) -> None:
    """Refuse, before any work, an output that cannot be written: its nearest existing folder is a file or takes no
    new entry (read-only, /proc). Probed with a temporary folder, removed again; a long run had found out only at
    its end, with a misleading free-space error. `is_file`: `out` is a file to write (its folder is checked)."""
    refuse_unusable_path(out, option, is_file)
    target = Path(out).absolute().parent if is_file else Path(out).absolute()
    ancestor = next((p for p in (target, *target.parents) if p.exists()), Path("/"))
    if not ancestor.is_dir():
        raise EdgeKDError(f"{option} {out}: {ancestor} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".edgekd-probe-", dir=ancestor))
    except OSError as err:
        what = "write a file in" if is_file and ancestor == target else "make a folder under"
        raise EdgeKDError(f"{option} {out}: cannot {what} {ancestor} ({err.strerror or type(err).__name__})") from None


def to_jsonable(obj: Any) -> Any:
    """NaN and ±inf -> None (a 0-epoch run's best value had been written as -Infinity, which JSON has not),
    numpy scalars/arrays -> Python, so files stay standard JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return to_jsonable(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | Path, data: Any) -> Path:
    """JSON, ASCII-escaped: a file name that is not valid UTF-8 (a surrogate escape) is written as its \\udcXX."""
    text = json.dumps(to_jsonable(data), indent=2) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_text(path: str | Path, text: str) -> Path:
    """UTF-8 text; a file name that is not valid UTF-8 (decoded by Python as surrogate escapes) is written back as
    its original bytes, so a CSV row names the file exactly."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8", errors="surrogateescape"))


def is_torch_file_head(head: bytes) -> bool:
    """Whether a file's first bytes are torch.save's: a zip, or an older torch's pickle (protocol byte 0x80)."""
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def sha256_file(path: str | Path, follow_symlinks: bool = True) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (bundle manifests); `follow_symlinks=False` refuses a symlink
    (OSError) instead of hashing what it points at."""
    digest = hashlib.sha256()
    # O_BINARY: Windows' CRT opens in text mode without it (CRLF read as LF, a 0x1A byte read as the end)
    flags = os.O_RDONLY | getattr(os, "O_BINARY", 0) | (0 if follow_symlinks else getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(os.open(path, flags), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def refuse_output_inside(out: str | Path, inputs: list[str | Path], option: str = "--out",
                         replaces: bool = False) -> None:
    """An output never replaces or lands inside an input (a bundle being read, the checkpoint exported): both
    are compared as resolved paths (symlinks and `..` followed). `replaces`: the output may be an earlier bundle
    that is replaced whole (refuse_output_in_bundle), so no input may lie inside it either (a best.pt kept in the
    bundle folder it is exported over had been deleted with the old bundle)."""
    refuse_unusable_path(out, option)
    target = Path(out).resolve()
    for given in inputs:
        source = Path(given).resolve()
        if target.is_relative_to(source):
            raise EdgeKDError(f"{option} {out}: is inside the input {given}; write the output elsewhere")
        if replaces and source.is_relative_to(target) and target.is_dir():
            raise EdgeKDError(f"{option} {out}: holds the input {given}, which replacing it would delete; move the "
                              "input out of it, or write the output elsewhere")
    refuse_output_in_bundle(out, option, replaces)


def refuse_output_in_bundle(out: str | Path, option: str = "--out", replaces: bool = False) -> None:
    """An output never lands inside an existing bundle (a folder below one with a manifest), nor onto one unless it
    `replaces` it (export; train's check_run_dir says its own): the manifest would not list the new files, and the
    runtime then refuses the bundle. Nor inside a Triton / OpenVINO Model Server repository."""
    from edgekd.runtime.bundle import MANIFEST_FILE
    from edgekd.runtime.repository import is_model_repository

    target = Path(out).resolve()
    bundle = next((parent for parent in target.parents if (parent / MANIFEST_FILE).is_file()), None)
    if bundle is not None:
        raise EdgeKDError(f"{option} {out}: is inside the bundle {bundle}, whose manifest would no longer match "
                          "its files (the bundle would be refused); write the output elsewhere")
    # a report written as a model's version folder: the server loads the highest version, one with no model
    repository = next((parent for parent in list(target.parents)[:-1] if is_model_repository(parent)), None)
    if repository is not None:
        raise EdgeKDError(f"{option} {out}: is inside the model repository {repository}, which a server may be "
                          "reading (a folder there is a model or a version to it); write the output elsewhere")
    if not replaces and (target / MANIFEST_FILE).is_file():
        raise EdgeKDError(f"{option} {out}: is a bundle, whose manifest would no longer match its files; write the "
                          "output elsewhere")


def refuse_other_metrics(out: str | Path, checkpoint: str | Path, writes: bool = True, option: str = "--out") -> None:
    """An eval that `writes` metrics.json never replaces one in `out` that is not an earlier eval's (one naming its
    `checkpoint`): a training run's folder had lost its record (best epoch, val figures, sessions) to the eval's."""
    out, checkpoint = Path(out), Path(checkpoint)  # (an out that is a file: check_output_location, staged_files)
    default = checkpoint.parent / f"eval_{checkpoint.stem}"
    if writes and (out / "metrics.json").is_file() and earlier_eval(out) is None:
        raise EdgeKDError(f"{option} {out}: holds a metrics.json that is not an earlier eval's (a training run's?), "
                          f"which this evaluation would replace; write it elsewhere (the default is {default})")
    if writes and any((out / name).is_file() for name in ("last.pt", "model.pt")):  # still training: no metrics.json
        raise EdgeKDError(f"{option} {out}: a training run's folder (its metrics.json is the run's, written at its "
                          f"end); write the evaluation elsewhere (the default is {default})")


def earlier_eval(out: str | Path) -> dict | None:
    """The metrics.json in `out` when an earlier `edgekd eval` wrote it (it names its `checkpoint`), else None."""
    try:
        earlier = json.loads((Path(out) / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return earlier if isinstance(earlier, dict) and "checkpoint" in earlier else None


STOP_SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP")) if s is not None)
"""The signals that stop a run (those this platform has): held by deferred_signals, guarded by the CLI."""


@contextlib.contextmanager
def deferred_signals():
    """Hold SIGINT/SIGTERM/SIGHUP back for the block (delivered when it ends): creating a temp dir and recording
    its name is then one step, so a kill cannot land between them and leave the dir unnamed and uncleaned.

    The Python-level handlers are swapped for one that only records the signal, and the recorded signals are
    re-raised (signal.raise_signal) once the old handlers are back. Blocking the signals with pthread_sigmask would
    not do: it masks the calling thread only, and the kernel hands a process-directed signal to any other thread
    (ONNX Runtime's, OpenMP's), whose delivery Python then acts on in the main thread, inside the block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    old = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s, handler in old.items():
        if handler not in (signal.SIG_IGN, None):
            signal.signal(s, lambda signum, _frame: held.append(signum))
    try:
        yield
    finally:
        for s, handler in old.items():
            if handler is not None:
                signal.signal(s, handler)
        for signum in held:
            signal.raise_signal(signum)


TRACKED_TREES: set[Path] = set()
"""Temp dirs a stop signal must not leave behind (`track_tree`); the CLI's signal handler removes them before the
stop unwinds the stack, since a native library interrupted mid-call may crash the process on the way out."""


def track_tree(path: str | Path) -> Path:
    """Register a temp dir for `remove_tracked_trees` (untrack it once the code that made it has removed it)."""
    TRACKED_TREES.add(Path(path))
    return Path(path)


def untrack_tree(path: str | Path | None) -> None:
    if path is not None:
        TRACKED_TREES.discard(Path(path))


TRACKED_LOCKS: set[Path] = set()
"""held_output's lock files, removed with the tracked trees when a stop signal ends an export at once; unlike a
tracked tree, one does not tell the signal handler an export is under way (an update's training unwinds as usual)."""


def remove_tracked_trees() -> None:
    """Remove every tracked temp dir and lock file now (a stop signal's handler, before unwinding)."""
    for path in list(TRACKED_TREES):
        shutil.rmtree(path, ignore_errors=True)
        TRACKED_TREES.discard(path)
    for path in list(TRACKED_LOCKS):
        with contextlib.suppress(OSError):
            path.unlink()
        TRACKED_LOCKS.discard(path)


def remove_trees(paths: list[str | Path | None]) -> None:
    """remove_tree each existing path (None and missing paths are skipped)."""
    for path in paths:
        if path is not None and Path(path).exists():
            remove_tree(path)


def remove_tree(path: str | Path) -> None:
    """shutil.rmtree(path, ignore_errors=True) with SIGINT/SIGTERM/SIGHUP held back until it is done: a kill that
    lands during the cleanup of a temp dir is delivered after it, instead of stopping the removal half-way."""
    with deferred_signals():
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def removed_if_only(path: str | Path, names: tuple[str, ...]):
    """Run a block that makes the folder `path`; if the block fails and the folder is new and every file in it
    (any depth) matches one of `names` (file names or fnmatch patterns: recipe.yaml, a run refused before its first
    checkpoint or log; *.png, an evaluation's plots), it is removed again. A folder that was there, or holds
    anything else (a checkpoint, tracker logs, a file another program put there), is kept."""
    path = Path(path)
    new = not path.exists()
    try:
        yield path
    except BaseException as err:
        if isinstance(err, FolderInUseError):  # the folder is another run's, however new it looked
            raise
        if new and path.is_dir() and all(p.is_dir() or any(fnmatch.fnmatchcase(p.name, n) for n in names)
                                         for p in path.rglob("*")):
            remove_tree(path)
        raise


@contextlib.contextmanager
def staged_files(out: str | Path, last: str | None = None, before_publish: Callable[[Path], None] | None = None):
    """A staging folder inside `out` (a hidden `.edgekd-stage.<owner>...tmp`, on `out`'s own filesystem: `out` may
    be a mount point) for a block to write its files into. When the block ends without error the files move up
    into `out` with stop signals held, `last` (an index listing the others) last; `before_publish(stage)` runs
    first in that window (e.g. to remove an earlier run's files the new ones would contradict). A failure or stop
    before then leaves `out` as it was (a folder this call made is removed again), and the staging folder is
    always removed: `out` holds all of one run's files or none, never a mix of two runs'."""
    check_output_location(out)  # a file or a read-only folder: refused before the block's work, not at its end
    target = Path(out).resolve() if Path(out).is_symlink() else Path(out)
    made_dirs = [p for p in (target, *target.parents) if not p.exists()]  # deepest first: --out a/b/c makes three
    with deferred_signals():  # tracked: a stop signal removes them (the CLI exits without unwinding)
        target.mkdir(parents=True, exist_ok=True)
        if made_dirs:
            track_tree(made_dirs[-1])
        stage = track_tree(staging_directory(".edgekd-stage.", ".tmp", target))
    try:
        yield stage
        with deferred_signals():
            if before_publish is not None:
                before_publish(stage)
            for made_file in sorted(stage.iterdir(), key=lambda p: p.name == last):
                if made_file.is_dir() and (target / made_file.name).is_dir():
                    shutil.rmtree(target / made_file.name)
                os.replace(made_file, target / made_file.name)
            if made_dirs:  # published: they stay, a later stop too
                untrack_tree(made_dirs[-1])
                made_dirs = []
    finally:
        remove_tree(stage)
        untrack_tree(stage)
        if made_dirs:  # refused or stopped: the folders this call made go again (a stop signal's handler too)
            untrack_tree(made_dirs[-1])
            for folder in made_dirs:
                with contextlib.suppress(OSError):
                    folder.rmdir()


class FolderInUseError(EdgeKDError):
    """Another edgekd process holds the output folder (held_folder): nothing of it is removed on the way out."""


@contextlib.contextmanager
def held_output(path: str | Path, what: str):
    """Hold an exclusive lock on an output that is replaced whole (a bundle folder renamed into place, so not a
    folder to lock itself) for the block: a second edgekd process writing the same output is refused in one line
    (two `edgekd update --out B` at once had both said "wrote B"). The lock is flock on a hidden
    `.<name>.edgekd-lock` beside it, removed at the end (one a killed process left is taken over). Where flock is
    missing (Windows) or the folder is not writable (the writer's own error says so) nothing is locked."""
    path = Path(path).resolve() if Path(path).is_symlink() else Path(path)  # where a link's writer writes
    lock = path.parent / f".{path.name}.edgekd-lock"
    made = [p for p in [path.parent, *path.parent.parents] if not p.exists()]  # removed again if left empty
    fd = None
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        while fd is None:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode("utf-8", "replace").strip() or "process"
                os.close(fd)
                raise FolderInUseError(f"{path}: another edgekd {holder} is writing it now; wait for it to end or "
                                       "give another --out") from None
            try:  # its last holder may have removed the file between our open and flock: lock the one there now
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                fd = None
        os.ftruncate(fd, 0)
        os.pwrite(fd, what.encode(), 0)  # who holds it, for the refusal of the next
    except (ImportError, OSError):  # no flock, or a folder we cannot write (nor lock)
        if fd is not None:
            os.close(fd)
        fd = None
    if fd is not None:
        TRACKED_LOCKS.add(lock)  # a stop signal that ends an export at once removes it too
    try:
        yield
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(lock)
            TRACKED_LOCKS.discard(lock)
            os.close(fd)
        for folder in made:  # deepest first: a refused export leaves no empty folders behind
            with contextlib.suppress(OSError):
                folder.rmdir()


@contextlib.contextmanager
def held_folder(folder: str | Path, what: str):
    """Hold an exclusive lock on `folder` (made if missing) for the block: a second edgekd process writing into it
    is refused in one line (two trainings into one --out had both exited 0, the first reporting files the second
    had replaced).
    flock on the folder itself: no lock file is left, and the lock ends with the process, killed outright too.
    Where flock is missing (Windows) nothing is locked."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderInUseError(f"{folder}: another edgekd {what} is writing into this folder now; wait for it "
                                   "to end or give another --out") from None
        except OSError:  # a filesystem without flock: run unlocked, as before
            pass
        yield
    finally:
        os.close(fd)
