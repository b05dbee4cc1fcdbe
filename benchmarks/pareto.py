"""Accuracy (and AUC) vs batch-1 latency for every model x format x precision x TTA in latency.json, Pareto front marked.

    .venv/bin/python benchmarks/pareto.py [--latency benchmarks/results/latency.json] [--variant bare|runner|...]

Reads the records of benchmarks/latency.py (batch 1, status ok, with accuracy measured), writes
benchmarks/results/pareto.json, benchmarks/results/pareto.png and the Pareto section of benchmarks/RESULTS.md.
No measurement is made here: the figures are latency.json's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import REPO, RESULTS, existing_path, machine_line, replace_section, results_doc, run_main

from edgekd.bench.pareto import pareto_markdown, pareto_points, plot_pareto, point_label
from edgekd.errors import EdgeKDError
from edgekd.fileio import atomic_write, write_json

RESULTS_MD = REPO / "benchmarks" / "RESULTS.md"
BEGIN, END = "<!-- pareto:begin (benchmarks/pareto.py) -->", "<!-- pareto:end -->"


def section(result: dict) -> str:
    """The RESULTS.md section from a pareto.json document."""
    panels: dict[str, list[dict]] = {}
    for r in result["records"]:
        panels.setdefault(r["metric"], []).append({k: v for k, v in r.items() if k != "metric"})
    front = {m: [point_label(p) + f" ({p['model']})" for p in sorted(pts, key=lambda p: p["p50_ms"]) if p["pareto"]]
             for m, pts in panels.items()}
    return "\n".join([
        BEGIN, "## Accuracy-latency Pareto front (`benchmarks/pareto.py`)", "",
        f"`{result['command']}` on {result['date'][:10]}; the points are the batch-1 records of "
        f"`{result['source']}` (latency run: {result['latency_run'].get('date', '?')}, {machine_line(result['machine'])}). "
        "Latency is the p50 of batch-1 calls; accuracy/AUC on the test split as measured by that run.", "",
        "![Pareto](results/pareto.png)", "",
        f"Front (accuracy): {'; '.join(front['acc'])}.", "",
        f"Front (AUC): {'; '.join(front['auc'])}.", "",
        "<details><summary>every configuration (accuracy)</summary>", "", pareto_markdown(panels["acc"], "acc"), "",
        "</details>", END])


def bench_machine(bench: dict) -> dict:
    """An `edgekd bench` bench.json's machine under the results files' keys (benchmarks/schema.py Machine)."""
    m = bench["machine"]
    return {"cpu": m.get("model"), "cores": m.get("cores"), "arch": m.get("machine"), "gpu": None,
            "torch": (bench.get("versions") or {}).get("torch"), "simd": m.get("simd")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latency", type=existing_path, default=str(RESULTS / "latency.json"),
                    help="the latency ledger to read (benchmarks/latency.py writes it)")
    ap.add_argument("--variant", default=None, help="keep one variant (e.g. runner: edgekd runtime end to end)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where pareto.json/.png go")
    ap.add_argument("--results-md", type=Path, default=None, help="the RESULTS.md whose section to rewrite (default: "
                    "the repository's when --results is benchmarks/results, else none)")
    args = ap.parse_args()
    if args.results_md is None and args.results.resolve() == RESULTS.resolve():
        args.results_md = RESULTS_MD  # a trial run into another --results leaves the published section alone
    data = json.loads(open(args.latency).read())
    records = data["records"] if isinstance(data, dict) else data
    if args.variant:
        records = [r for r in records if r.get("variant") == args.variant]
    panels = {m: pareto_points(records, m) for m in ("acc", "auc")}
    if not panels["acc"]:
        raise EdgeKDError(f"{args.latency}: no batch-1 record with both latency and accuracy (run benchmarks/latency.py)")
    command = "python benchmarks/pareto.py " + " ".join(sys.argv[1:])
    is_bench = isinstance(data, dict) and data.get("schema", "").startswith("edgekd-bench/")
    source = data if is_bench else data.get("latency", {}) if isinstance(data, dict) else {}
    # One record per (metric, configuration) point; the latency run they come from is the file's machine.
    result = {**results_doc("pareto", command.strip(), [{"metric": m, **p} for m, pts in panels.items() for p in pts],
                            source=str(Path(args.latency).relative_to(REPO)) if Path(args.latency).is_relative_to(REPO)
                            else args.latency,
                            latency_run={k: source.get(k) for k in ("date", "command") if k in source}),
              "machine": bench_machine(data) if is_bench else source.get("machine") or records[0]["machine"]}
    args.results.mkdir(parents=True, exist_ok=True)
    write_json(args.results / "pareto.json", result)
    plot_pareto(panels, args.results / "pareto.png", "PneumoniaMNIST: accuracy vs batch-1 latency (p50)")
    if args.results_md is not None:
        text = args.results_md.read_text() if args.results_md.is_file() else "# Benchmark results\n"
        atomic_write(args.results_md, lambda tmp: open(tmp, "w").write(replace_section(text, section(result), BEGIN,
                                                                                       END)))
    print(section(result).split("Front (accuracy): ", 1)[1].split("\n", 1)[0])


if __name__ == "__main__":
    run_main(main)
