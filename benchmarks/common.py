"""What every benchmark script shares: the machine line, run-or-reuse of a recipe, record merging."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))

from edgekd.fileio import write_json  # noqa: E402

METRICS = ("acc", "auc", "f1", "sensitivity", "specificity", "pauc", "balanced_acc")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or ""


def machine() -> str:
    """e.g. '2-core x86_64 (Intel Xeon ...), no GPU, torch 2.14.1'."""
    cpu = cpu_model()
    gpu, torch_version = "no GPU", ""
    try:
        import torch
        torch_version = f", torch {torch.__version__.split('+')[0]}"
        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"{os.cpu_count()}-core {platform.machine()} ({cpu}), {gpu}{torch_version}"


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
    return json.loads(metrics_path.read_text())


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
    return json.loads((out / "metrics.json").read_text()), command


def accuracy_record(m: dict, command: str, split: str = "test") -> dict:
    """One accuracy.json record from a run's metrics.json."""
    s = m[split]
    return {"dataset": m["dataset"], "split": split, "model": m["model"], "role": m["role"], "name": m["name"],
            "params": m["params"], "macs": m["macs"], **{k: s.get(k) for k in METRICS}, "seed": m["seed"],
            "epochs_run": m["epochs_run"], "seconds_per_epoch": m["seconds_per_epoch"], "threads": m.get("threads"),
            "train_seconds": m["train_seconds"], "date": now(), "machine": machine(), "command": command}


def merge_records(path: Path, new: list[dict], key=("dataset", "split", "model", "role", "name", "seed")) -> list[dict]:
    """Replace records that match a new one on `key`; keep all others. The key holds the recipe `name`, so KD
    variants of one student (logit, feature, attention transfer: same model, role and seed) stay separate records.
    The file is a JSON list of records, or a {"records": [...], ...} object (latency.json: several scripts add
    their summaries), whose other keys are kept."""
    old = json.loads(path.read_text()) if path.is_file() else []
    doc = old if isinstance(old, dict) else None
    if doc is not None:
        old = doc.get("records", [])
    k = lambda r: tuple(r.get(f) for f in key)  # noqa: E731
    fresh = {k(r) for r in new}
    merged = [r for r in old if k(r) not in fresh] + new
    write_json(path, merged if doc is None else {**doc, "records": merged})
    return merged


def replace_section(text: str, section: str, begin: str, end: str) -> str:
    """Swap the block between the `begin`/`end` markers of RESULTS.md for `section` (append when absent)."""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        return head + section + rest.split(end, 1)[1]
    return text.rstrip() + "\n\n" + section + "\n"
