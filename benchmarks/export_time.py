"""How long `edgekd export` takes per zoo architecture at its native input size, stage by stage (issue 17: every
student's export under 5 minutes here).

    .venv/bin/python benchmarks/export_time.py [--arch efficientnet_b2 mobilenetv3_large_100 ...]

Per architecture: a checkpoint of its zoo recipe (benchmarks/zoo.py: same recipe, overrides and data) with the
initial weights (`edgekd train ... --set train.epochs=0`: the export's work does not depend on the weights, only
its INT8 gate verdicts do, and those are the zoo's to report), then the zoo's export command — default profile,
ONNX FP32/INT8 and OpenVINO FP32/FP16/INT8, `--drop-failed`, 2 threads — timed as a whole and per stage from its
log lines (the PyTorch reference, then each artifact: build, INT8 speed check, parity and metric runs). Writes
benchmarks/results/export_time.json and the RESULTS.md section between the `export-time` markers.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, RESULTS, machine, machine_line, now, results_doc, run_main, write_section  # noqa: E402
from zoo import COMMON, EDGEKD, GOALS, ZOO, pick, ratio, sets  # noqa: E402

from edgekd.host import INT8_DOT_PRODUCT, cpu_info  # noqa: E402
from edgekd.fileio import write_json  # noqa: E402

MARKERS = ("<!-- export-time:begin -->", "<!-- export-time:end -->")
STUDENTS = [a for a, (role, _, _) in ZOO.items() if role == "student"]


def timed_lines(cmd: list[str], log_path: Path) -> tuple[int, float, list[tuple[float, str]]]:
    """Run a command, keeping each output line with the second it appeared -> (exit code, seconds, lines)."""
    print(f"$ {shlex.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    lines = []
    with subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            lines.append((time.perf_counter() - t0, line.rstrip()))
    log_path.write_text("\n".join(f"{t:8.1f} {x}" for t, x in lines) + "\n")
    return proc.returncode, time.perf_counter() - t0, lines


def stages(lines: list[tuple[float, str]], total: float) -> dict[str, float]:
    """Seconds per stage: from the parity-set line to the first artifact (the PyTorch reference and the
    operating point), then each artifact from its 'exporting' line to the next one (or to the end: bundle files)."""
    marks = [(0.0, "setup")]
    for t, line in lines:
        if line.startswith("parity set:"):
            marks.append((t, "pytorch reference"))
        elif m := re.match(r"(\S+/\S+): exporting", line):
            marks.append((t, m.group(1)))
        elif line.startswith("wrote "):
            marks.append((t, "bundle files"))
    marks.append((total, "end"))
    return {name: round(marks[i + 1][0] - t, 1) for i, (t, name) in enumerate(marks[:-1])}


def export_time(arch: str, runs: Path) -> dict:
    role, recipe, extra = ZOO[arch]
    out = runs / arch
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "train" / "best.pt"
    train_cmd = [EDGEKD, "train", recipe, *sets([*COMMON, *extra, "train.epochs=0"]), "--out", str(out / "train")]
    code, _, lines = timed_lines(train_cmd, out / "train.log")
    if code != 0:
        raise SystemExit(f"{arch}: train exited {code}: {lines[-1][1] if lines else ''}")
    bundle = out / "bundle"
    subprocess.run(["rm", "-rf", str(bundle)], check=True)
    export_cmd = [EDGEKD, "export", str(ckpt), "--format", "onnx,openvino", "--precision", "fp32,fp16,int8",
                  "--out", str(bundle), "--threads", "2", "--drop-failed"]
    code, seconds, lines = timed_lines(export_cmd, out / "export.log")
    record = {"arch": arch, "role": role, "recipe": recipe, "weights": "initial (train.epochs=0)",
              "simd": cpu_info()["simd"],
              "commands": {"train": shlex.join(train_cmd), "export": shlex.join(export_cmd)},
              "exit": code, "seconds": round(seconds, 1), "stages": stages(lines, seconds),
              "goal_seconds": GOALS["export_seconds"], "met": code == 0 and seconds <= GOALS["export_seconds"]}
    if code == 0:
        parity = json.loads((bundle / "parity.json").read_text())
        meta = json.loads((bundle / "edgekd.json").read_text())
        record["input_size"] = meta["preprocess"]["input_size"]
        record["split_images"] = parity["reference"]["split_images"]
        record["parity_inputs"] = parity["inputs"]
        record["shipped"] = [f"{a['format']}/{a['precision']}" for a in meta["artifacts"]]
        record["too_slow"] = [{"artifact": f"{d['format']}/{d['precision']}", **d["speed_vs_fp32"]}
                              for d in parity.get("too_slow", [])]
        record["int8_speed"] = {f"{a['format']}/{a['precision']}": a["speed_vs_fp32"]
                                for a in parity["artifacts"] if a.get("speed_vs_fp32")}
    print(f"{arch}: {seconds:.0f} s, stages {record['stages']}", flush=True)
    return record


def bench_fp32(arch: str, runs: Path) -> dict:
    """`edgekd bench` of the exported bundle, FP32 only (speed does not depend on the weights): PyTorch eager
    against the bare OpenVINO and ONNX Runtime calls at batch 1 and 8, each row a fresh process."""
    out = runs / arch
    cmd = [EDGEKD, "bench", str(out / "bundle"), "--checkpoint", str(out / "train" / "best.pt"), "--batch", "1,8",
           "--threads", "2", "--precision", "fp32", "--formats", "torch,openvino,onnx", "--no-compile",
           "--eval-limit", "100", "--out", str(out / "bench")]
    code, _, lines = timed_lines(cmd, out / "bench.log")
    if code != 0:
        raise SystemExit(f"{arch}: bench exited {code}: {lines[-1][1] if lines else ''}")
    rows = json.loads((out / "bench" / "bench.json").read_text())["records"]
    per_batch = {}
    for batch in (1, 8):
        eager, ov = pick(rows, format="torch", variant="eager", batch=batch), pick(rows, format="openvino", variant="bare", batch=batch)
        onnx = pick(rows, format="onnx", variant="bare", batch=batch)
        per_batch[str(batch)] = {"eager_ms": eager and eager["p50_ms"], "openvino_ms": ov and ov["p50_ms"],
                                 "onnx_ms": onnx and onnx["p50_ms"], "ov_vs_eager": ratio(eager, ov)}
    return {"command": shlex.join(cmd), "p50": per_batch}


def simd_label(record: dict) -> str:
    if "simd" not in record:
        return "not recorded"
    if record["simd"] is None:
        return "flags not read"
    vnni = any(f in (record["simd"] or []) for f in INT8_DOT_PRODUCT)
    return f"{', '.join(record['simd']) or 'no AVX'} ({'VNNI' if vnni else 'no VNNI'})"


def record_key(record: dict) -> tuple[str, tuple[str, ...] | None]:
    """One record per architecture and CPU: a run on a VM with other SIMD keeps the other VM's record."""
    return record["arch"], None if "simd" not in record else tuple(record["simd"])


def section(doc: dict) -> str:
    runs: dict[str, list[str]] = {}  # each command (with its date and note) -> the architectures it measured
    for r in doc["records"]:
        runs.setdefault(f"`{r['command']}` — {r['date'][:16]}Z; {r['note']}", []).append(r["arch"])
    lines = [MARKERS[0], "## Export time per architecture (`benchmarks/export_time.py`)", "",
             *[f"- {run}: {', '.join(archs)}" for run, archs in runs.items()], "",
             f"The latest run's machine: {machine_line(doc['machine'])}; a record from another VM names its CPU's "
             "SIMD in its row. Each model's zoo recipe with its initial weights (the export's work "
             "does not depend on them; INT8 gate verdicts do, and are the zoo's), exported by the zoo's command (default profile, ONNX FP32/INT8 + OpenVINO "
             f"FP32/FP16/INT8, 2 threads). Goal: ≤ {GOALS['export_seconds']:.0f} s per student.", "",
             "The CPU's SIMD decides INT8 speed-ups (VNNI dot-product instructions or not) and, with the VM's load, "
             "the seconds: records from different VMs of this kind are kept side by side, each with the SIMD it read "
             "('not recorded': before the record kept it).", "",
             "| model | CPU SIMD | input | val + test images | export s | goal | PyTorch reference s | per artifact s | "
             "INT8 vs FP32 at batch 1 | not shipped (too slow) |", "|---|---|---|---|---:|---|---:|---|---|---|"]
    for r in doc["records"]:
        st = r["stages"]
        arts = ", ".join(f"{k} {v:.0f}" for k, v in st.items() if "/" in k)
        speed = "; ".join(f"{k} {v['int8_p50_ms']:.1f} vs {v['fp32_p50_ms']:.1f} ms ({v['speedup']:.2f}x)"
                          for k, v in {**r.get("int8_speed", {}),
                                       **{d["artifact"]: d for d in r.get("too_slow", [])}}.items())
        size = "x".join(map(str, r.get("input_size", [])[1:])) or "-"
        imgs = sum(r.get("split_images", {}).values()) or "-"
        lines.append(f"| {r['arch']} | {simd_label(r)} | {size} | {imgs} | {r['seconds']:.0f} | {'met' if r['met'] else 'MISSED'} | "
                     f"{st.get('pytorch reference', 0):.0f} | {arts} | {speed or '-'} | "
                     f"{', '.join(d['artifact'] for d in r.get('too_slow', [])) or '-'} |")
    benched = [r for r in doc["records"] if r.get("bench_fp32")]
    if benched:
        lines += ["", "FP32 speed of the same bundles (`--bench`: `edgekd bench`, a fresh process per row, 2 threads, p50 ms; "
                  "goal OpenVINO FP32 ≥ 2x PyTorch eager at batch 1):", "",
                  "| model | CPU SIMD | batch | PyTorch eager | OpenVINO FP32 | ONNX Runtime FP32 | OpenVINO / eager |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r in benched:
            for batch, b in r["bench_fp32"]["p50"].items():
                ms = ["-" if b[k] is None else f"{b[k]:.2f}" for k in ("eager_ms", "openvino_ms", "onnx_ms")]
                ratio = "-" if b["ov_vs_eager"] is None else f"{b['ov_vs_eager']:.2f}x"
                lines.append(f"| {r['arch']} | {simd_label(r)} | {batch} | {' | '.join(ms)} | {ratio} |")
    lines += ["", MARKERS[1]]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=STUDENTS, choices=list(ZOO))
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "export_time")
    parser.add_argument("--note", default="one export at a time", help="how quiet the machine was")
    parser.add_argument("--render", action="store_true", help="only rewrite the RESULTS.md section from the json")
    parser.add_argument("--bench", action="store_true",
                        help="also bench each bundle's FP32 (eager vs OpenVINO vs ONNX Runtime, batch 1 and 8)")
    args = parser.parse_args()
    path = RESULTS / "export_time.json"
    if args.render:
        write_section(section(json.loads(path.read_text())), *MARKERS)
        return 0
    command = shlex.join([".venv/bin/python", "benchmarks/export_time.py", *sys.argv[1:]])
    old = {record_key(r): r for r in json.loads(path.read_text())["records"]} if path.is_file() else {}
    for arch in args.arch:
        record = {**export_time(arch, args.runs), "command": command, "note": args.note}
        if args.bench:
            record["bench_fp32"] = bench_fp32(arch, args.runs)
        record["date"], record["machine"] = now(), machine()  # a ledger: rows from several VMs
        old[record_key(record)] = record
    doc = results_doc("export_time", command, list(old.values()), note=args.note)
    write_json(path, doc)
    write_section(section(doc), *MARKERS)
    print(f"wrote {path} and the RESULTS.md section")
    return 0


if __name__ == "__main__":
    run_main(main)
