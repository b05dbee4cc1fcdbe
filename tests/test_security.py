"""Safe loading, checked on the package source: no unpickling anywhere a file from outside could reach.

torch.load only with weights_only=True; numpy never with allow_pickle=True; YAML only through safe_load; the edge
runtime (edgekd/runtime) imports neither torch nor any pickle-based loader. The checks parse the source (ast), so a
call split over lines or written with a keyword in another position is still seen.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "edgekd"
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else kw.value
    return None


def unsafe_loads(source: str) -> list[str]:
    """Problems in one module's source: unsafe torch.load / np.load / yaml.load / pickle.load calls."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        line = node.lineno
        if name == "torch.load" and _keyword(node, "weights_only") is not True:
            problems.append(f"line {line}: torch.load without weights_only=True")
        if name in ("np.load", "numpy.load") and _keyword(node, "allow_pickle") is True:
            problems.append(f"line {line}: np.load with allow_pickle=True")
        if name == "yaml.load" or name == "yaml.unsafe_load" or name == "yaml.full_load":
            problems.append(f"line {line}: {name} (use yaml.safe_load)")
        if name.split(".")[0] in PICKLE_MODULES and name.split(".")[-1] in ("load", "loads", "Unpickler"):
            problems.append(f"line {line}: {name}")
    return problems


def imported_modules(source: str) -> set[str]:
    mods = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module.split(".")[0])
    return mods


def package_sources(sub: str = "") -> dict[str, str]:
    root = PACKAGE / sub
    return {str(p.relative_to(PACKAGE.parent)): p.read_text() for p in sorted(root.rglob("*.py"))}


def test_the_checks_catch_unsafe_code():
    """The scanners below are only worth something if they flag what they are meant to flag."""
    bad = ("import torch, numpy as np, yaml, pickle\n"
           "a = torch.load(p)\nb = torch.load(p, map_location='cpu',\n    weights_only=False)\n"
           "c = np.load(p, allow_pickle=True)\nd = yaml.load(t)\ne = pickle.loads(b)\n")
    assert len(unsafe_loads(bad)) == 5
    assert unsafe_loads("import torch\nx = torch.load(p, map_location='cpu', weights_only=True)\n") == []
    assert {"torch", "pickle"} <= imported_modules("import torch.nn as nn\nfrom pickle import loads\n")


def test_the_recipe_yaml_loader_is_safe():
    """Recipes and profiles go through edgekd.recipe.load_yaml (duplicate keys refused, decimal integers): it must
    refuse Python object tags as yaml.safe_load does."""
    import yaml

    from edgekd.recipe import load_yaml

    for tag in ("!!python/object/apply:os.system ['echo pwned']", "!!python/name:os.system", "!!python/tuple [1]"):
        with pytest.raises(yaml.constructor.ConstructorError, match="could not determine a constructor"):
            load_yaml(f"a: {tag}\n")


def test_package_has_no_unsafe_loads():
    sources = package_sources()
    assert len(sources) > 30
    problems = [f"{path}: {p}" for path, src in sources.items() for p in unsafe_loads(src)]
    assert problems == []
    # Every torch.load in the package is one the ast check saw (no aliasing like `from torch import load`).
    assert all("from torch import load" not in src for src in sources.values())
    assert sum(src.count("torch.load(") for src in sources.values()) >= 1


def test_runtime_imports_no_torch_and_no_pickle():
    sources = package_sources("runtime")
    assert "edgekd/runtime/runner.py" in sources
    for path, src in sources.items():
        mods = imported_modules(src)
        assert "torch" not in mods, f"{path} imports torch"
        assert not mods & PICKLE_MODULES, f"{path} imports {mods & PICKLE_MODULES}"
        assert "allow_pickle=True" not in src.replace(" ", ""), path
        assert "pickle" not in src.lower(), f"{path} mentions pickle"


@pytest.mark.parametrize("module", ["edgekd.imageio", "edgekd.fileio", "edgekd.errors", "edgekd.formats",
                                    "edgekd.probability"])
def test_modules_shared_with_the_runtime_import_no_torch(module):
    """The runtime imports these: they must stay torch-free too."""
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    assert "torch" not in imported_modules(path.read_text())


def test_npz_with_pickled_objects_is_refused(tmp_path):
    """np.load(allow_pickle=False) in the data sources: an object array is an error, not code execution."""
    import numpy as np

    from edgekd.data.sources import load_medmnist
    from edgekd.errors import EdgeKDError

    np.savez(tmp_path / "d.npz", train_images=np.zeros((2, 8, 8), np.uint8),
             train_labels=np.array([{"a": 1}, {"b": 2}], dtype=object))
    with pytest.raises(EdgeKDError, match="Object arrays cannot be loaded"):
        load_medmnist(tmp_path / "d.npz")


def test_a_failed_run_folder_is_removed_only_if_it_holds_nothing_but_its_recipe(tmp_path):
    from edgekd.fileio import removed_if_only

    def fail_after(make):
        with pytest.raises(KeyboardInterrupt):
            with removed_if_only(tmp_path / "run", ("recipe.yaml",)) as out:
                make(out)
                raise KeyboardInterrupt

    fail_after(lambda out: (out / "fold0").mkdir(parents=True) or (out / "fold0" / "recipe.yaml").write_text("x"))
    assert not (tmp_path / "run").exists()
    fail_after(lambda out: (out / "tb").mkdir(parents=True) or (out / "tb" / "events.out").write_text("x"))
    assert (tmp_path / "run" / "tb" / "events.out").is_file()  # tracker logs of the crash stay
    (tmp_path / "run" / "tb" / "events.out").unlink()
    fail_after(lambda out: (out / "recipe.yaml").write_text("x"))
    assert (tmp_path / "run").is_dir()  # it was there before: never touched


def test_a_killed_runs_temporary_files_are_swept_by_the_next_run(tmp_path):
    """SIGKILL runs no handler: staging folders beside --out, /tmp scratch, `.best.pt.*.tmp` files and a bench's
    work/ (with its image copy) had stayed for good. Every temporary entry is named by its process, and a later
    run of the same kind removes those whose process is gone, never a live one's."""
    import subprocess
    import sys

    from edgekd.bench.run import WORK_MARKER, remove_killed_runs_work
    from edgekd.fileio import atomic_write, owner, staging_directory

    OWNER = owner()

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    host = OWNER.split("@", 1)[1]
    gone_dir = tmp_path / f".bundle.{dead}@{host}abc.tmp"
    gone_file = tmp_path / f".best.pt.{dead}@{host}xyz.tmp"
    live_dir = tmp_path / f".bundle.{OWNER}live.tmp"
    other_host = tmp_path / f".bundle.{dead}@zzzzzz-abc.tmp"
    old_style = tmp_path / ".bundle.q1w2e3.tmp"
    for d in (gone_dir, live_dir, other_host, old_style):
        d.mkdir()
    gone_file.write_bytes(b"half a checkpoint")
    stage = staging_directory(".bundle.", ".tmp", tmp_path)
    atomic_write(tmp_path / "best.pt", lambda tmp: open(tmp, "wb").write(b"x"))
    assert not gone_dir.exists() and not gone_file.exists()
    assert live_dir.is_dir() and other_host.is_dir() and old_style.is_dir() and stage.is_dir()
    assert stage.name.startswith(f".bundle.{OWNER}")
    work = tmp_path / "bench" / "work"
    work.mkdir(parents=True)
    (work / WORK_MARKER).write_text(OWNER)
    assert not remove_killed_runs_work(work) and work.is_dir()  # this process is alive
    (work / WORK_MARKER).write_text(f"{dead}@{host}")
    assert remove_killed_runs_work(work) and not work.exists()


def test_files_are_read_as_bytes_and_no_process_is_signalled_on_windows(tmp_path, monkeypatch):
    """Windows' CRT opens a file in text mode without O_BINARY (CRLF read as LF, 0x1A as the end: another sha256
    there than on Linux); os.kill(pid, 0) there sends a console Ctrl-C (CTRL_C_EVENT is 0)."""
    import hashlib
    import os

    from edgekd import fileio

    opened: list[int] = []
    real_open = os.open
    monkeypatch.setattr(os, "O_BINARY", 0x8000, raising=False)
    monkeypatch.setattr(os, "open", lambda path, flags, *a: (opened.append(flags), real_open(path, flags & ~0x8000, *a))[1])
    data = b"a\r\nb\x1ac"
    (tmp_path / "f").write_bytes(data)
    assert fileio.sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest() and opened[-1] & 0x8000
    monkeypatch.setattr(os, "name", "nt")
    monkeypatch.setattr(os, "kill", lambda *a: pytest.fail("signalled"))
    assert fileio.owner_alive(f"{os.getpid()}@{fileio.PID_SPACE}-x")


def test_staged_files_leave_no_folder_they_made_on_a_failure_or_a_stop(tmp_path):
    """--out n1/n2/n3 refused: n1/n2 had stayed (only the last level was removed); a stop signal during the block
    had left the new --out (its removal was in a finally the exit skips): the folders made are tracked now."""
    from edgekd import fileio

    with pytest.raises(RuntimeError):
        with fileio.staged_files(tmp_path / "n1" / "n2" / "n3"):
            raise RuntimeError("refused")
    assert not (tmp_path / "n1").exists()
    with fileio.staged_files(tmp_path / "a" / "b") as stage:
        assert tmp_path / "a" in fileio.TRACKED_TREES  # what a stop signal's handler removes
        (stage / "r.json").write_text("{}")
    assert (tmp_path / "a" / "b" / "r.json").is_file() and tmp_path / "a" not in fileio.TRACKED_TREES
    (tmp_path / "kept").mkdir()
    with fileio.staged_files(tmp_path / "kept" / "new"):
        assert tmp_path / "kept" not in fileio.TRACKED_TREES and tmp_path / "kept" / "new" in fileio.TRACKED_TREES
