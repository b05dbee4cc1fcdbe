"""Corruption robustness of the PneumoniaMNIST teacher, the distilled student and the student's INT8 export.

    .venv/bin/python benchmarks/robustness.py [--teacher CKPT] [--student CKPT] [--limit N] [--reuse-bundle]

Exports the student with `edgekd export --format openvino --precision fp32,int8` (parity gate included) into
runs/bench/robustness/student-bundle, then scores the teacher (PyTorch), the student (PyTorch) and every artifact of
the bundle (edgekd.runtime) on the same corrupted test images: 8 corruptions x 5 severities + clean
(edgekd.robustness). Writes benchmarks/results/robustness.json (records {model, role, format, precision,
corruption, severity, acc, auc} and the summary), benchmarks/results/robustness.png and the robustness section of
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from common import REPO, RESULTS, existing_path, machine_line, positive_int, replace_section, results_doc, run_main

from edgekd.fileio import atomic_write, write_json
from edgekd.robustness.evaluate import CLEAN, corruption_markdown, run_corruption_eval

RUNS = REPO / "runs" / "bench" / "pneumonia"
OUT = REPO / "runs" / "bench" / "robustness"
RESULTS_MD = REPO / "benchmarks" / "RESULTS.md"
BEGIN, END = "<!-- robustness:begin (benchmarks/robustness.py) -->", "<!-- robustness:end -->"


def _rel(path) -> str:
    p = Path(path)
    return str(p.relative_to(REPO)) if p.is_absolute() and p.is_relative_to(REPO) else str(path)


def export_student(student: Path, bundle: Path, reuse: bool) -> str:
    command = [sys.executable, "-m", "edgekd", "export", str(student), "--format", "openvino", "--precision",
               "fp32,int8", "--out", str(bundle)]
    shown = "edgekd export " + " ".join(shlex.quote(_rel(a)) for a in command[4:])
    if reuse and (bundle / "edgekd.json").is_file():
        print(f"reusing {bundle}", flush=True)
        return shown
    print(f"$ {shown}", flush=True)
    subprocess.run(command, check=True, cwd=REPO)
    return shown


def by_severity(records: list[dict]) -> list[str]:
    """Mean accuracy over the 8 corruptions at each severity, per model/format."""
    keys = list(dict.fromkeys((r["model"], r["role"], r["format"], r["precision"]) for r in records))
    lines = ["| model | role | format | clean | " + " | ".join(f"severity {s}" for s in range(1, 6)) + " |",
             "|---|---|---|---:|" + "---:|" * 5]
    for key in keys:
        mine = [r for r in records if (r["model"], r["role"], r["format"], r["precision"]) == key]
        clean = next(r["acc"] for r in mine if r["corruption"] == CLEAN)
        cells = [f"{np.mean([r['acc'] for r in mine if r['severity'] == s]):.4f}" for s in range(1, 6)]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]}/{key[3]} | {clean:.4f} | " + " | ".join(cells) + " |")
    return lines


def section(result: dict) -> str:
    """The RESULTS.md section from a robustness.json document."""
    res = result
    rel_line = "; ".join(f"{s['role']} {s['model']} {s['format']}/{s['precision']}: mean corruption accuracy "
                         f"{s['mean_corruption_acc']:.4f} vs clean {s['clean_acc']:.4f} = {s['relative_acc']:.1%} of clean "
                         f"({-s['acc_drop_pts']:+.1f} pts), mean corruption AUC {s['mean_corruption_auc']:.4f} vs "
                         f"{s['clean_auc']:.4f}" for s in res["summary"])
    counts = res["class_counts"]
    names = res["class_names"]
    counts_line = " / ".join(f"{n} {c} ({c / sum(counts):.1%})" for n, c in zip(names, counts))
    majority, majority_name = max(counts) / sum(counts), names[counts.index(max(counts))]
    return "\n".join([
        BEGIN, "## Corruption robustness (`benchmarks/robustness.py`)", "",
        f"`{result['command']}` on {result['date'][:10]}, {machine_line(result['machine'])}. PneumoniaMNIST test split "
        f"({res['images']} images), 8 corruptions x 5 severities (edgekd.robustness: ImageNet-C-style, numpy/Pillow, "
        f"seed {res['seed']}; each corruption is applied to the decoded 28 px image before each model's own "
        f"preprocessing, so every model sees identical pixels). Teacher `{result['teacher']}`, student "
        f"`{result['student']}`, and the student's bundle from `{result['export_command']}` run by edgekd.runtime.", "",
        f"Mean corruption accuracy relative to clean: {rel_line}.", "",
        f"Read accuracy with the class balance in mind: the test split is {counts_line}, so a model that drifts to "
        f"predicting one class under heavy corruption scores {majority:.4f} (all {majority_name}) without "
        "seeing anything; accuracy that rises again at high severity is that drift, not robustness. AUC (in "
        "robustness.json per condition, and its mean above) does not reward it.", "",
        "![robustness](results/robustness.png)", "",
        corruption_markdown(res["summary"], "Accuracy per corruption (mean over severities 1-5)"), "",
        "Mean accuracy over the 8 corruptions per severity:", "", *by_severity(res["records"]), "", END])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", type=existing_path, default=str(RUNS / "teacher" / "best.pt"), help="teacher checkpoint")
    ap.add_argument("--student", type=existing_path, default=str(RUNS / "student-s0" / "best.pt"),
                    help="student checkpoint (exported to every format)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--limit", type=positive_int, default=None, help="a fixed random subset of N test images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reuse-bundle", action="store_true", help="keep an existing exported bundle")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where robustness.json/.png go")
    ap.add_argument("--results-md", type=Path, default=None, help="the RESULTS.md whose section to rewrite (default: "
                    "the repository's when --results is benchmarks/results, else none)")
    args = ap.parse_args()
    if args.results_md is None and args.results.resolve() == RESULTS.resolve():
        args.results_md = RESULTS_MD  # a trial run into another --results leaves the published section alone
    os.chdir(REPO)
    bundle = args.out / "student-bundle"
    export_cmd = export_student(args.student, bundle, args.reuse_bundle)
    sources = [args.teacher, args.student, bundle]
    res = run_corruption_eval(sources, args.out, None, "test", seed=args.seed, limit=args.limit,
                              threads=args.threads, log=lambda m: print(m, flush=True))
    command = "python benchmarks/robustness.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result = results_doc("robustness", command.strip(), res["records"], export_command=export_cmd,
                         teacher=_rel(args.teacher), student=_rel(args.student), bundle=_rel(bundle), split="test",
                         images=res["images"], seed=args.seed, corruptions=res["corruptions"],
                         severities=res["severities"], class_names=res["class_names"],
                         class_counts=res["class_counts"], summary=res["summary"])
    write_json(args.results / "robustness.json", result)
    shutil.copyfile(args.out / "robustness.png", args.results / "robustness.png")
    if args.results_md is not None:
        text = args.results_md.read_text() if args.results_md.is_file() else "# Benchmark results\n"
        atomic_write(args.results_md, lambda tmp: open(tmp, "w").write(replace_section(text, section(result), BEGIN,
                                                                                       END)))
    for s in result["summary"]:
        print(f"{s['role']} {s['format']}/{s['precision']}: {s['relative_acc']:.1%} of clean accuracy")


if __name__ == "__main__":
    run_main(main)
