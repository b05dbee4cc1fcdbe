"""What every benchmark script shares: the machine line, run-or-reuse of a recipe, record merging."""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))

from edgekd.fileio import write_json  # noqa: E402

METRICS = ("acc", "auc", "f1", "sensitivity", "specificity", "pauc", "balanced_acc")
# accuracy.json records are one per run: its train command (recipe, overrides, output folder) and split. Keyed by
# recipe name and seed instead, a 30-epoch variant of a recipe replaced the record of its 20-epoch run (and back).
ACCURACY_KEY = ("dataset", "split", "command")


def run_main(main: Callable[[], int | None]) -> None:
    """A script's entry point: an edgekd error (a missing checkpoint, a bad recipe), a failed edgekd command or the
    script's own refusal (`raise SystemExit("error: ...")`) is one line on stderr and exit 2, not a traceback."""
    import subprocess

    from edgekd.errors import EdgeKDError

    def fail(message: str) -> None:
        print(message, file=sys.stderr)
        sys.exit(2)

    try:
        code = main()
    except EdgeKDError as e:
        fail(f"error: {e}")
    except subprocess.CalledProcessError as e:
        cmd = e.cmd if isinstance(e.cmd, str) else " ".join(map(str, e.cmd))
        fail(f"error: `{cmd}` failed (exit {e.returncode}); its message is above")
    except SystemExit as e:  # a script's own refusal, raise SystemExit("error: ...")
        if isinstance(e.code, str):
            fail(e.code)
        raise
    sys.exit(code or 0)


def existing_path(text: str) -> Path:
    """argparse type: a file or folder that exists."""
    import argparse

    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text} does not exist")
    return path


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def machine(**extra) -> dict:
    """The machine a benchmark ran on, the same dict in every results file (benchmarks/schema.py) and in a run's
    metrics.json: {"cpu", "cores", "arch", "simd", "gpu" (None: no GPU), "python", "torch"} + `extra` (library
    versions, load averages, ...)."""
    from edgekd.host import host_record

    return host_record(**extra)


def machine_line(m: dict) -> str:
    """A results file's machine dict as prose: '2-core x86_64 (AMD EPYC, AVX-512 VNNI), no GPU, torch 2.14.1' (the
    widest SIMD kind when recorded: records before 2026-12-06 have none)."""
    torch_part = f", torch {m['torch']}" if m.get("torch") else ""
    simd = m.get("simd")
    kind = "" if simd is None else ", " + (
        "AMX" if "amx_int8" in simd else "AVX-512 VNNI" if "avx512_vnni" in simd else "AVX-VNNI" if "avx_vnni" in simd
        else "AVX-512, no VNNI" if "avx512f" in simd else "AVX2, no VNNI" if "avx2" in simd else "no AVX2")
    return f"{m['cores']}-core {m['arch']} ({m['cpu']}{kind}), {m.get('gpu') or 'no GPU'}{torch_part}"


def results_doc(benchmark: str, command: str, records: list[dict], host: dict | None = None, **extra) -> dict:
    """A results file in the one schema (benchmarks/schema.py): which command made it, when, on what machine
    (`host`, default `machine()`), and its records."""
    return {"benchmark": benchmark, "command": command, "date": now(), "machine": host or machine(), **extra,
            "records": records}


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def train_command(recipe_path: str, out: Path, overrides: list[str]) -> str:
    """The `edgekd train` command line that (re)produces the run in `out`."""
    return f"edgekd train {recipe_path}{''.join(f' --set {o}' for o in overrides)} --out {out.relative_to(REPO)}"


def finished_run(recipe, out: Path) -> dict | None:
    """metrics.json of a finished run in `out` trained from exactly `recipe`, else None."""
    import yaml

    metrics_path = out / "metrics.json"
    if not metrics_path.is_file() or not (out / "recipe.yaml").is_file():
        return None
    if yaml.safe_load((out / "recipe.yaml").read_text()) != recipe.to_dict():
        return None
    return run_metrics(metrics_path)


def run_metrics(metrics_path: Path) -> dict:
    """A run's metrics.json, with the time it was written as `date` (a reused run keeps the date it was trained)."""
    m = json.loads(metrics_path.read_text())
    written = dt.datetime.fromtimestamp(metrics_path.stat().st_mtime, dt.timezone.utc)
    return {**m, "date": m.get("date") or written.isoformat(timespec="seconds")}


def run_or_reuse(recipe_path: str, out: Path, overrides: list[str], reuse: bool, tag: str) -> tuple[dict, str]:
    """Train `recipe_path` into `out` (or reuse a finished run of the identical recipe); -> (metrics.json, command)."""
    from edgekd.pipeline import run_recipe
    from edgekd.recipe import load_recipe

    recipe = load_recipe(REPO / recipe_path, overrides)
    command = train_command(recipe_path, out, overrides)
    if reuse and (metrics := finished_run(recipe, out)) is not None:
        print(f"reusing {out / 'metrics.json'}", flush=True)
        return metrics, command
    print(f"$ {command}", flush=True)
    run_recipe(recipe, out, log=lambda m: print(f"  [{tag}] {m}", flush=True))
    return run_metrics(out / "metrics.json"), command


def plain_runs(records: list[dict], recipe_path: str, dataset: str | None = None, split: str = "test") -> list[dict]:
    """accuracy.json records of runs of `recipe_path` with no override but the seed (in any output folder: kd_gain's
    `scratch-s0` is distill.py's `student_scratch-s0`), the latest per seed, in seed order. A run of the recipe with
    other overrides (kd_gain's 30-epoch `scratch_long`, an ensemble teacher) is another experiment, left out."""
    import re

    pattern = re.compile(rf"edgekd train {re.escape(recipe_path)}( --set seed=\d+)? --out \S+")
    latest: dict[int, dict] = {}
    for r in records:
        if (r.get("split") == split and dataset in (None, r.get("dataset")) and pattern.fullmatch(r.get("command", ""))
                and r.get("date", "") >= latest.get(r.get("seed"), {}).get("date", "")):
            latest[r.get("seed")] = r
    return [latest[s] for s in sorted(latest)]


def accuracy_record(m: dict, command: str, split: str = "test") -> dict:
    """One accuracy.json record from a run's metrics.json."""
    s = m[split]
    return {"dataset": m["dataset"], "split": split, "model": m["model"], "role": m["role"], "name": m["name"],
            "params": m["params"], "macs": m["macs"], **{k: s.get(k) for k in METRICS}, "seed": m["seed"],
            "epochs_run": m["epochs_run"], "seconds_per_epoch": m["seconds_per_epoch"], "threads": m.get("threads"),
            "train_seconds": m["train_seconds"], "date": m.get("date") or now(),
            "machine": m.get("machine") or machine(),  # where it trained (a reused run's); older runs: here
            "command": command}


def merge_records(path: Path, new: list[dict], benchmark: str, command: str, key: tuple[str, ...]) -> list[dict]:
    """Replace records that match a new one on `key` (ACCURACY_KEY for accuracy.json); keep all others. For ledger
    files that several commands add to (accuracy.json, latency.json): every record carries its own `command`,
    `date` and `machine`; the file's header names the latest command that added records. Other header keys are
    kept. With no new record the file is left as it is."""
    doc = json.loads(path.read_text()) if path.is_file() else {}
    if not new:
        return doc.get("records", [])
    k = lambda r: tuple(r.get(f) for f in key)  # noqa: E731
    fresh = {k(r) for r in new}
    merged = [r for r in doc.get("records", []) if k(r) not in fresh] + new
    write_json(path, {**doc, **results_doc(benchmark, command, merged)})
    return merged


def refresh_results_md() -> None:
    """Every RESULTS.md section again from its JSON (benchmarks/report.py): a script that adds to accuracy.json
    changes the accuracy section too, which `report.py --check` (in the test suite) would find stale."""
    import report

    report.main([])


def write_section(section: str, begin: str, end: str, path: Path | None = None) -> Path:
    """Replace this benchmark's marked section of RESULTS.md (or `path`) with `section`; other sections stay."""
    from edgekd.fileio import write_text

    path = path or REPO / "benchmarks" / "RESULTS.md"
    return write_text(path, replace_section(path.read_text(), section, begin, end))


def replace_section(text: str, section: str, begin: str, end: str) -> str:
    """Swap the block between the `begin`/`end` markers of RESULTS.md for `section` (append when absent)."""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        return head + section + rest.split(end, 1)[1]
    return text.rstrip() + "\n\n" + section + "\n"
