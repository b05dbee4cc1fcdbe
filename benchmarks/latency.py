"""Latency benchmark: teacher and student in torch/onnx/openvino x fp32/int8 x batch 1/8/32 (+ TTA), in one run.

    .venv/bin/python benchmarks/latency.py [--teacher CKPT] [--student CKPT] [--threads 2] [--seconds 2]

Runs `edgekd bench` (edgekd.bench.run_bench) on the student with the teacher alongside: PyTorch eager and
torch.compile, bare ONNX Runtime / OpenVINO calls and the edgekd runner, each (model, format, precision, variant)
in a fresh process (peak RSS), accuracy/AUC on the test split, the FP32 GEMM peak measured in the same run. Then
the edgekd runner with the bundle's TTA views (OpenVINO). Checkpoints are exported (parity-gated) into
runs/bench/latency/ and reused while unchanged. Records (bench "latency") merge into
benchmarks/results/latency.json, keeping the runtime benchmark's records and summary; its "latency" summary holds
the goals, the OpenVINO layer profiles and the run's settings, and `section(doc)` renders the latency section of
benchmarks/RESULTS.md from that file alone (benchmarks/report.py uses it too).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from common import REPO, RESULTS, machine, merge_records, now, replace_section, run_main

from edgekd.bench.report import records_markdown
from edgekd.bench.run import VARIANTS, BenchConfig, Timing, run_bench
from edgekd.fileio import write_json, write_text

RUNS = REPO / "runs" / "bench" / "pneumonia"
OUT = REPO / "runs" / "bench" / "latency"
RESULTS_MD = REPO / "benchmarks" / "RESULTS.md"
MARKERS = ("<!-- latency:begin (benchmarks/latency.py) -->", "<!-- latency:end -->")
MERGE_KEY = ("bench", "model", "role", "format", "precision", "variant", "batch", "tta")
PRIMARY = {"torch": "eager", "onnx": "bare", "openvino": "bare"}
"""The variant that stands for a format in the goals: the framework's own call, no edgekd preprocessing."""
QUIET_OTHER_CORES = 0.25
GOALS = {"int8_speedup": 2.0, "student_speedup": 10.0, "acc_loss_pts": 1.0, "gemm_fraction_b32": 0.40}


def find(records, **kw):
    return next((r for r in records if all(r.get(k) == v for k, v in kw.items()) and r["status"] == "ok"), None)


def pts(a, b):
    return None if a is None or b is None else 100.0 * (a - b)


def goals(records: list[dict], batches: list[int]) -> dict:
    """The three goals from the measured records; every comparison is listed, none is picked."""
    int8 = []
    for role in ("student", "teacher"):
        for fmt in ("openvino", "onnx"):
            for b in batches:
                f32 = find(records, role=role, format=fmt, precision="fp32", variant=PRIMARY[fmt], batch=b)
                i8 = find(records, role=role, format=fmt, precision="int8", variant=PRIMARY[fmt], batch=b)
                if f32 and i8:
                    speedup, loss = i8["throughput"] / f32["throughput"], pts(f32["acc"], i8["acc"])
                    int8.append({"role": role, "format": fmt, "batch": b, "speedup": speedup, "acc_loss_pts": loss,
                                 "met": speedup >= GOALS["int8_speedup"] and loss is not None
                                 and loss <= GOALS["acc_loss_pts"]})
    student = []
    for fmt in ("torch", "onnx", "openvino"):
        for precision in ("fp32", "int8"):
            for b in batches:
                s = find(records, role="student", format=fmt, precision=precision, variant=PRIMARY[fmt], batch=b)
                t = find(records, role="teacher", format=fmt, precision=precision, variant=PRIMARY[fmt], batch=b)
                if s and t:
                    speedup, loss = s["throughput"] / t["throughput"], pts(t["acc"], s["acc"])
                    student.append({"format": fmt, "precision": precision, "batch": b, "speedup": speedup,
                                    "acc_loss_pts": loss, "met": speedup >= GOALS["student_speedup"]
                                    and loss is not None and loss <= GOALS["acc_loss_pts"]})
    gemm = [{"role": r["role"], "format": r["format"], "precision": r["precision"], "variant": r["variant"],
             "fraction": r["gemm_peak_fraction"], "met": r["gemm_peak_fraction"] >= GOALS["gemm_fraction_b32"]}
            for r in records if r["status"] == "ok" and r["batch"] == 32 and r["gemm_peak_fraction"] is not None]
    return {"openvino_int8_vs_fp32": int8, "student_vs_teacher": student, "batch32_gemm_peak_fraction": gemm}


def fmt_num(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def goals_markdown(g: dict, profiles: list[dict], cpu: dict) -> str:
    lines = [f"**INT8 vs FP32** (goal: OpenVINO INT8 throughput >= {GOALS['int8_speedup']:.0f}x FP32 at <= 1 pt "
             "ACC loss; ONNX Runtime shown too)", "",
             "| role | format | batch | INT8/FP32 throughput | ACC loss (pts) | met |", "|---|---|---:|---:|---:|---|"]
    lines += [f"| {r['role']} | {r['format']} | {r['batch']} | {r['speedup']:.2f}x | {fmt_num(r['acc_loss_pts'])} | "
              f"{'yes' if r['met'] else 'no'} |" for r in g["openvino_int8_vs_fp32"]]
    lines += ["", f"**Student vs teacher** (goal: >= {GOALS['student_speedup']:.0f}x faster at <= 1 pt ACC loss; "
              "same format, precision and batch)", "",
              "| format | precision | batch | student/teacher throughput | ACC loss (pts) | met |",
              "|---|---|---:|---:|---:|---|"]
    lines += [f"| {r['format']} | {r['precision']} | {r['batch']} | {r['speedup']:.2f}x | {fmt_num(r['acc_loss_pts'])} "
              f"| {'yes' if r['met'] else 'no'} |" for r in g["student_vs_teacher"]]
    lines += ["", f"**Batch 32 vs the FP32 GEMM peak** (goal: >= {GOALS['gemm_fraction_b32']:.0%} of the measured "
              "peak; fraction = 2 x MACs x images/s / peak)", "",
              "| role | format | precision | variant | % of peak | met |", "|---|---|---|---|---:|---|"]
    lines += [f"| {r['role']} | {r['format']} | {r['precision']} | {r['variant']} | {100 * r['fraction']:.1f} | "
              f"{'yes' if r['met'] else 'no'} |" for r in g["batch32_gemm_peak_fraction"]]
    if profiles:
        lines += ["", f"**OpenVINO layer profile** (PERF_COUNT, batch {profiles[0]['batch']}; CPU SIMD: "
                  f"{', '.join(cpu['simd']) or 'none'}; INT8 dot-product instructions (VNNI/AMX): "
                  f"{'yes' if cpu['int8_dot_product'] else 'no'})", "",
                  "| role | precision | total ms | time by kernel precision | time by layer type (top 3) | top layer |",
                  "|---|---|---:|---|---|---|"]
        for p in profiles:
            top = p["top_layers"][0] if p["top_layers"] else {}
            lines.append(f"| {p['role']} | {p['precision']} | {p['total_ms']:.2f} | "
                         + ", ".join(f"{k} {v:.0%}" for k, v in p["time_share_by_exec_precision"].items()) + " | "
                         + ", ".join(f"{k} {v:.0%}" for k, v in list(p["time_share_by_type"].items())[:3])
                         + f" | {top.get('type', '-')} `{top.get('exec_type', '-')}` {top.get('ms', 0):.2f} ms |")
    return "\n".join(lines)


def explanations(g: dict, profiles: list[dict], cpu: dict, summary: dict) -> list[str]:
    """Plain statements read off the measurements for each goal that was not met."""
    notes = []
    ov = [r for r in g["openvino_int8_vs_fp32"] if r["format"] == "openvino"]
    if ov and not all(r["met"] for r in ov):
        share = {p["role"]: p["time_share_by_exec_precision"] for p in profiles if p["precision"] == "int8"}
        i8 = {role: sum(v for k, v in s.items() if k.lower() in ("i8", "u8")) for role, s in share.items()}
        notes.append("OpenVINO INT8 vs FP32: measured "
                     + ", ".join(f"{r['role']} batch {r['batch']} {r['speedup']:.2f}x" for r in ov)
                     + ". This CPU has " + ("" if cpu["int8_dot_product"] else "no ")
                     + "INT8 dot-product instructions (VNNI/AMX); the INT8 profile shows "
                     + ", ".join(f"{role} {v:.0%}" for role, v in i8.items())
                     + " of layer time in INT8 (i8/u8) kernels, the rest in FP32 kernels and reorders.")
    gm = g["batch32_gemm_peak_fraction"]
    if gm and not any(r["met"] for r in gm):
        best = max(gm, key=lambda r: r["fraction"])
        notes.append(f"GEMM peak: the best batch-32 row reaches {100 * best['fraction']:.1f}% ({best['role']} "
                     f"{best['format']} {best['precision']} {best['variant']}) of "
                     f"{summary['gemm']['peak_gflops']:.1f} GFLOP/s; at 28x28 input the convolutions are small "
                     "(few output pixels per filter), so memory traffic and per-layer overhead dominate, see the "
                     "layer profile.")
    st = g["student_vs_teacher"]
    if st and not any(r["met"] for r in st):
        subj = {s["role"]: s for s in summary["subjects"]}
        if "student" in subj and "teacher" in subj and subj["student"]["macs"] and subj["teacher"]["macs"]:
            notes.append(f"Student vs teacher: the student does {subj['teacher']['macs'] / subj['student']['macs']:.1f}x "
                         f"fewer MACs ({subj['student']['macs'] / 1e6:.1f}M vs {subj['teacher']['macs'] / 1e6:.1f}M per "
                         "image), which bounds its speed-up; measured speed-ups are listed above.")
    return notes


def rel(path: Path) -> str:
    return os.path.relpath(path, REPO)


def status_line(lat: dict) -> str:
    """Quiet or provisional, from the other processes' CPU use the bench measured (main run, TTA run)."""
    others = lat["other_processes_cpu_cores"]
    if not lat["provisional"]:
        return (f"Measured on a quiet machine (other processes used {', '.join(f'{o:.2f}' for o in others)} cores on "
                "average during the main and TTA runs).")
    return (f"**PROVISIONAL / NOISY**: measured while other jobs were running (other processes used {others} cores "
            f"on average during the main and TTA runs, on {lat['cpu']['cores']} cores). Absolute latencies and ratios "
            "are not final; re-run on a quiet machine. PyTorch rows suffer most: its OpenMP threads spin-wait for each "
            "other, so one descheduled thread stalls every layer.")


def main_run_header(lat: dict) -> dict:
    """The main run's bench summary as far as `records_markdown` prints it above its table (command, date, machine,
    load averages, threads, timing, GEMM peak), from the latency summary."""
    cpu = lat["cpu"]
    return {"command": lat["command"], "date": lat["main_run"]["date"], "threads": lat["threads"], "tta": False,
            "timing": lat["timing"], "gemm": lat["gemm"],
            "machine": {"cores": cpu["cores"], "machine": lat["machine"]["arch"], "model": cpu["model"],
                        "simd": cpu["simd"], "load_avg_at_start": lat["load_avg_at_start"],
                        "load_avg_at_end": lat["main_run"]["load_avg_at_end"],
                        "other_processes_cpu_cores": lat["other_processes_cpu_cores"][0]}}


def section(doc: dict) -> str:
    """The latency section of RESULTS.md from latency.json: its "latency" summary and the records of that run."""
    lat = doc["latency"]
    ours = [r for r in doc["records"] if r.get("bench") == "latency" and r["date"] == lat["date"]]
    tta = [r for r in ours if r["tta"]]
    parts = [MARKERS[0], "## Latency: model x format x precision x batch (x TTA)", "", status_line(lat), ""]
    if lat["note"]:
        parts += [lat["note"], ""]
    parts += [f"Teacher `{lat['teacher']}`, student `{lat['student']}`. Variants: "
              "`eager`/`compile` = PyTorch / torch.compile; `bare` = the ONNX Runtime or OpenVINO call on a "
              "preprocessed batch; `runner` = `edgekd.runtime.Runner` from uint8 images (preprocessing + inference "
              "+ softmax). Each row ran in a fresh process (peak RSS of that process); acc/AUC on the whole test "
              "split. Raw figures: `benchmarks/results/latency.json` (bench `latency`), "
              f"`{lat['bench_dir']}/bench.json`.", "",
              records_markdown([r for r in ours if not r["tta"]], main_run_header(lat)).rstrip(), ""]
    if tta:
        parts += [f"TTA with the edgekd runner (OpenVINO): every image in all {tta[0]['views']} of the bundle's views, "
                  "in one call per batch; latency per batch of images, throughput in images/s:", "",
                  records_markdown(tta).rstrip(), ""]
    parts += ["### Goals", "", goals_markdown(lat["goals"], lat["profiles"], lat["cpu"]), ""]
    notes = explanations(lat["goals"], lat["profiles"], lat["cpu"], lat)
    if notes:
        parts += ["Why goals are not met (from the measurements above):", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(parts).rstrip() + "\n" + MARKERS[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", type=Path, default=RUNS / "teacher" / "best.pt")
    ap.add_argument("--student", type=Path, default=RUNS / "student-s0" / "best.pt")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--batches", default="1,8,32", help="batch sizes, comma-separated")
    ap.add_argument("--seconds", type=float, default=2.0, help="minimum timed seconds per measurement")
    ap.add_argument("--min-runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--no-tta", action="store_true", help="skip the TTA runner rows")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--results", type=Path, default=RESULTS / "latency.json")
    ap.add_argument("--note", default="", help="a line added to the RESULTS.md section (e.g. which student)")
    ap.add_argument("--results-md", type=Path, default=None, help="the RESULTS.md whose latency section to rewrite "
                    "(default: the repository's when --results is its latency.json, else none)")
    args = ap.parse_args()
    if args.results_md is None and args.results.resolve() == (RESULTS / "latency.json").resolve():
        args.results_md = RESULTS_MD  # a trial run into another --results leaves the published section alone
    if not all(b.strip().isdigit() and int(b) > 0 for b in args.batches.split(",")):
        ap.error(f"--batches {args.batches}: comma-separated batch sizes >= 1, e.g. 1,8,32")
    for name in ("teacher", "student", "out", "results", "results_md"):
        if getattr(args, name) is not None:
            setattr(args, name, getattr(args, name).resolve())
    os.chdir(REPO)  # checkpoints' recipes name their data relative to the repository
    for what, path in (("--teacher", args.teacher), ("--student", args.student)):
        if not path.is_file():
            have = sorted(str(p.relative_to(REPO)) for p in RUNS.glob("*/best.pt"))
            raise SystemExit(f"{what} {path}: not found (trained checkpoints: {', '.join(have) or 'none'})")
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/latency.py", *sys.argv[1:]])
    timing = Timing(warmup=args.warmup, min_runs=args.min_runs, min_seconds=args.seconds)
    variants = {**VARIANTS, "torch": ("eager",)} if args.no_compile else VARIANTS
    log = lambda m: print(f"  {m}", flush=True)  # noqa: E731

    main_run = run_bench(BenchConfig(args.student, args.out, "torch,onnx,openvino", "fp32,int8", args.batches,
                                     args.threads, teacher=args.teacher, timing=timing, variants=variants,
                                     profile=True, role="student", command=command), log=log)
    records = main_run.records
    summary = main_run.summary
    if not args.no_tta:
        tta_run = run_bench(BenchConfig(args.student, args.out / "tta", "openvino", "fp32,int8", "1,8", args.threads,
                                        tta=True, teacher=args.teacher, timing=timing,
                                        variants={"openvino": ("runner",)}, role="student",
                                        gemm_info=summary["gemm"], export_options={"bundle_root": args.out},
                                        command=command), log=log)
        records = records + tta_run.records
    load_end = [round(v, 2) for v in os.getloadavg()]

    date, host = now(), machine()
    g = goals(main_run.records, summary["batches"])
    cpu = {k: summary["machine"][k] for k in ("model", "cores", "simd", "int8_dot_product")}
    # Quiet = other processes used at most a quarter of a core on average during the run (the load average counts
    # this benchmark's own threads, so it cannot tell; edgekd.bench.hardware.OtherCPU).
    runs = [main_run] if args.no_tta else [main_run, tta_run]
    others = [r.summary["machine"].get("other_processes_cpu_cores") for r in runs]
    quiet = all(o is not None and o <= QUIET_OTHER_CORES for o in others)
    tagged = [{"bench": "latency", **r, "date": date, "machine": host, "command": command} for r in records]
    merge_records(args.results, tagged, "latency", command, key=MERGE_KEY)
    doc = json.loads(args.results.read_text())
    # Everything section() renders is kept here, so RESULTS.md regenerates from this file (benchmarks/report.py).
    doc["latency"] = {"date": date, "command": command, "machine": host, "cpu": cpu, "threads": summary["threads"],
                      "timing": summary["timing"], "teacher": rel(args.teacher), "student": rel(args.student),
                      "note": args.note,
                      "main_run": {"date": summary["date"], "load_avg_at_end": summary["machine"]["load_avg_at_end"]},
                      "load_avg_at_start": summary["machine"]["load_avg_at_start"], "load_avg_at_end": load_end,
                      "other_processes_cpu_cores": others, "provisional": not quiet, "gemm": summary["gemm"],
                      "goals": g, "profiles": summary["profiles"], "subjects": summary["subjects"],
                      "bench_dir": rel(args.out)}
    write_json(args.results, doc)
    text = section(doc)
    if args.results_md is not None:
        write_text(args.results_md, replace_section(args.results_md.read_text(), text, *MARKERS))
    print(text)
    print(f"{'quiet' if quiet else 'PROVISIONAL (busy machine)'}: other processes {others} cores; wrote "
          f"{args.results}" + (f" and the latency section of {args.results_md}" if args.results_md else ""))


if __name__ == "__main__":
    run_main(main)
