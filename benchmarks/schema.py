"""The one schema of every `benchmarks/results/*.json` file (pydantic), and a checker.

    .venv/bin/python benchmarks/schema.py [FILE ...]     # default: every results file; exit 1 on a violation

A results file is an object with the `benchmark` it belongs to, the `command` that wrote it, the UTC `date` it was
written, the `machine` it ran on and its `records`. A record names its own `command` / `date` / `machine` when the
file is a ledger that several commands add to (accuracy.json, latency.json, zoo.json: its `bench_machine`, edgekd
bench's record of the machine); otherwise the file's apply. A record's metrics (acc, auc, ...) are numbers, null, or
a summary dict (mean, std). Other keys (summaries, goals, settings) are free, but any machine dict and any
`date`/`started`/`finished` they hold follow the same rules.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, StrictFloat, StrictInt, ValidationError, field_validator

RESULTS = Path(__file__).resolve().parent / "results"
DATE_KEYS = ("date", "started", "finished")


def _utc(value: dt.datetime) -> dt.datetime:
    if value.utcoffset() != dt.timedelta(0):
        raise ValueError(f"{value.isoformat()} is not UTC (offset +00:00 expected)")
    return value


class Machine(BaseModel):
    """What `benchmarks/common.machine()` returns; extra keys (library versions, load averages) are allowed."""
    model_config = ConfigDict(extra="allow")
    cpu: str
    cores: int
    arch: str
    gpu: str | None
    torch: str | None
    simd: list[str] | None = None
    """The CPU's SIMD features that decide kernel speed and float sums (edgekd.host.cpu_info); absent
    from records before 2026-12-06."""


Metric = StrictFloat | StrictInt | dict[str, Any] | None  # a run's figure, or a summary's {mean, std}; not "0.9"


class Record(BaseModel):
    model_config = ConfigDict(extra="allow")
    command: str | None = None
    date: AwareDatetime | None = None
    machine: Machine | None = None
    acc: Metric = None
    auc: Metric = None
    f1: Metric = None
    sensitivity: Metric = None
    specificity: Metric = None
    balanced_acc: Metric = None
    pauc: Metric = None

    _utc_date = field_validator("date")(lambda cls, v: v if v is None else _utc(v))


LEDGERS = {"accuracy": "machine", "latency": "machine", "zoo": "bench_machine"}
"""Files that several commands add to: benchmark -> the key of each record's machine."""


def _ledger_problems(doc: dict) -> list[str]:
    """Each record of a ledger says which command made it, when, and on what machine."""
    machine_key = LEDGERS.get(doc.get("benchmark"))
    if machine_key is None:
        return []
    name = doc["benchmark"]
    return [f"records[{i}]: {'an' if name[0] in 'aeiou' else 'a'} {name} ledger record needs its own {key}"
            for i, r in enumerate(doc["records"]) for key in ("command", "date", machine_key) if not r.get(key)]


class ResultsFile(BaseModel):
    model_config = ConfigDict(extra="allow")
    benchmark: str
    command: str
    date: AwareDatetime
    machine: Machine
    records: list[Record]

    _utc_date = field_validator("date")(lambda cls, v: _utc(v))


def _nested_problems(value: Any, where: str) -> list[str]:
    """Machine dicts and dates anywhere below the top level (summaries, per-model blocks) follow the same rules."""
    out = []
    if isinstance(value, dict):
        for key, sub in value.items():
            here = f"{where}.{key}"
            if key == "machine" and not isinstance(sub, dict):
                out.append(f"{here}: a machine must be a dict (cpu, cores, arch, gpu, torch), got {type(sub).__name__}")
            elif key == "machine":
                try:
                    Machine.model_validate(sub)
                except ValidationError as err:
                    out += [f"{here}: {e['loc'][0] if e['loc'] else ''} {e['msg']}" for e in err.errors()]
            elif key in DATE_KEYS and isinstance(sub, str):
                try:
                    _utc(dt.datetime.fromisoformat(sub))
                except ValueError as err:
                    out.append(f"{here}: {err}")
            else:
                out += _nested_problems(sub, here)
    elif isinstance(value, list):
        for i, sub in enumerate(value):
            out += _nested_problems(sub, f"{where}[{i}]")
    return out


def problems(doc: Any) -> list[str]:
    """Every way `doc` (a parsed results file) breaks the schema; [] when it conforms."""
    try:
        ResultsFile.model_validate(doc)
    except ValidationError as err:
        return [f"{'.'.join(map(str, e['loc'])) or '<file>'}: {e['msg']}" for e in err.errors()]
    return _ledger_problems(doc) + _nested_problems(doc, "")


def file_problems(path: Path) -> list[str]:
    """problems() of a file, or why it could not be read as JSON."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        return [f"cannot read it: {getattr(err, 'strerror', None) or err}"]
    except json.JSONDecodeError as err:
        return [f"not JSON: {err}"]
    return problems(doc)


def main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", type=Path, help="results files (default: every benchmarks/results/*.json)")
    paths = ap.parse_args(argv).files or sorted(RESULTS.glob("*.json"))
    bad = 0
    for path in paths:
        for p in file_problems(path):
            print(f"{path.name}: {p}")
            bad += 1
    print(f"{len(paths)} files, {bad} problems")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
