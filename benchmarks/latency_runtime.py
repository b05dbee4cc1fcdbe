"""Acceptance benchmark of the edge runner: latency vs PyTorch eager and the bare backend, TTA cost, cold start, RSS.

    .venv/bin/python benchmarks/latency_runtime.py BUNDLE --checkpoint CKPT [--threads 2]

BUNDLE is an `edgekd export` bundle of a student and CKPT the checkpoint it was exported from (for the PyTorch
eager baseline). Everything is measured in this one run on this machine. Each callable (runner, bare backend call,
PyTorch eager, the TTA variants) runs in its own block of consecutive calls, and the blocks alternate in phases
(--phases): a deployment calls one compiled model over and over, while calling several OpenVINO models (or
OpenVINO and torch) call by call makes their worker threads and caches interfere, and the phases let a drift of
the VM's speed hit every callable alike. Ratios are reported overall (p50 / p50) and per phase. Cold start and peak
RSS are measured in fresh subprocesses that never import torch. Records merge into benchmarks/results/latency.json
(other benches' records and other models' runtime records kept; the summary, with the run's settings, goes to
`runtime[<model name>]`); `section(doc)` renders the runtime section of benchmarks/RESULTS.md, one column per model,
from that file alone (benchmarks/report.py uses it too).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import (RESULTS, existing_path, machine as common_machine, machine_line, replace_section,  # noqa: E402
                    results_doc, run_main)
from edgekd.bench.hardware import OtherCPU  # noqa: E402
from edgekd.fileio import write_json, write_text  # noqa: E402
from edgekd.runtime import Runner, TTAViews, open_bundle  # noqa: E402
from edgekd.runtime.timing import time_alternating  # noqa: E402

FIVE_VIEWS = ["original", "hflip", "vflip", "center_crop", "rot+15"]
GOALS = {"speedup_vs_torch_eager": (">=", 5.0), "runner_overhead_vs_bare": ("<=", 1.15),
         "tta5_vs_one_view": ("<=", 2.5), "cold_start_s": ("<=", 0.5), "peak_rss_mb": ("<=", 250.0)}
GOAL_NAMES = {"speedup_vs_torch_eager": ("runner vs PyTorch eager", "x"), "runner_overhead_vs_bare":
              ("runner vs bare call", "x"), "tta5_vs_one_view": ("5-view TTA vs one view", "x"),
              "cold_start_s": ("cold start", " s"), "peak_rss_mb": ("peak RSS", " MB")}
WARMUP = 30
RESULTS_JSON = RESULTS / "latency.json"
RESULTS_MD = REPO / "benchmarks" / "RESULTS.md"
MARKERS = ("<!-- latency-runtime:begin (benchmarks/latency_runtime.py) -->", "<!-- latency-runtime:end -->")

COLD_START_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import edgekd.runtime
from edgekd.runtime.timing import peak_rss_mb
t1 = time.perf_counter()
bundle, image, threads, n, cache = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
runner = edgekd.runtime.Runner.from_bundle(bundle, threads=threads, cache_dir=cache or None)
first = runner.predict(image)
t2 = time.perf_counter()
# Then a steady workload for peak RSS: n images, 5-view TTA, 16 images per call.
done = sum(1 for _ in runner.predict_many([image] * n, batch=16, tta=%r))
print(json.dumps({"import_s": t1 - t0, "load_first_s": t2 - t1, "label": first.label, "done": done,
                  "torch_loaded": "torch" in sys.modules,
                  "peak_rss_mb": peak_rss_mb()}))
""" % (FIVE_VIEWS,)


def machine() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return common_machine(platform=platform.platform(), load_avg_at_start=[round(v, 2) for v in load] if load else None)


def load_image(npz: Path) -> np.ndarray:
    with np.load(npz) as data:
        img = data["test_images"][0]
    return img[..., None] if img.ndim == 2 else img


def bare_openvino(path: Path, threads: int, x: np.ndarray):
    """OpenVINO's own call, compiled for x's static shape (as the runner compiles per batch size)."""
    from edgekd.bench.worker import openvino_model

    request = openvino_model(str(path), threads, batch=x.shape[0]).create_infer_request()
    return lambda: request.infer({0: x}, share_inputs=True)


def bare_onnx(path: Path, threads: int, x: np.ndarray):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda: session.run(None, {name: x})


def torch_eager(checkpoint: Path, threads: int, image: np.ndarray):
    """PyTorch eager: the training side's eval transform + forward + softmax, and the forward alone (callables),
    and the pipeline's probabilities for the image."""
    import torch

    from edgekd.data import build_transforms
    from edgekd.recipe import recipe_from_dict
    from edgekd.train.checkpoint import model_from_checkpoint

    torch.set_num_threads(threads)
    model, ckpt = model_from_checkpoint(checkpoint)
    transform = build_transforms(recipe_from_dict(ckpt["recipe"], str(checkpoint)).data, [], train=False)
    x = transform(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))[None]

    def pipeline():
        with torch.inference_mode():
            t = transform(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))[None]
            return torch.softmax(model(t), dim=1)

    def forward():
        with torch.inference_mode():
            return model(x)

    return {"torch_pipeline": pipeline, "torch_forward": forward}, pipeline().numpy()[0].astype(np.float64)


def cold_start(bundle: Path, image_path: Path, threads: int, repeats: int, n_images: int, cache_dir: str = "") -> dict:
    """Fresh interpreters: import, load + first result, then n images with 5-view TTA for the peak RSS."""
    runs = []
    for _ in range(repeats):
        proc = subprocess.run([sys.executable, "-c", COLD_START_CHILD, str(bundle), str(image_path), str(threads),
                               str(n_images), cache_dir], capture_output=True, text=True, cwd=REPO, timeout=600)
        if proc.returncode != 0:
            raise SystemExit(f"cold-start child failed:\n{proc.stderr[-2000:]}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {"load_first_s": statistics.median(r["load_first_s"] for r in runs),
            "import_s": statistics.median(r["import_s"] for r in runs),
            "load_first_s_all": [round(r["load_first_s"], 4) for r in runs],
            "import_s_all": [round(r["import_s"], 4) for r in runs],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "torch_loaded": any(r["torch_loaded"] for r in runs),
            "images_in_rss_run": n_images}


def _round(value):
    if isinstance(value, float):
        return round(value, 4)
    return [_round(v) for v in value] if isinstance(value, list) else value


def _six(value):
    """Six decimals for ratios and seconds; three significant digits below 1e-3 (a probability difference of 1e-11
    is a figure, not 0)."""
    if not isinstance(value, float):
        return value
    return round(value, 6) if abs(value) >= 1e-3 or value == 0 else float(f"{value:.3g}")


def per_phase(num: dict, den: dict) -> list[float]:
    """num / den for each phase's p50 (time_alternating stats)."""
    return [round(a / b, 3) for a, b in zip(num["phase_p50_ms"], den["phase_p50_ms"])]


def record(meta: dict, what: str, fmt: str, batch: int, views: int, stats: dict, threads: int, precision="fp32"):
    return {"bench": "runtime", "model": meta.get("name"), "role": meta.get("role"), "format": fmt,
            "precision": precision, "batch": batch, "tta": views > 1, "views": views, "what": what,
            "threads": threads, **{k: _round(v) for k, v in stats.items()},
            "throughput": round(1000.0 * batch / stats["p50_ms"], 2)}


def _goal(key: str, goal: str) -> str:
    """'>=5.0' -> '≥5x' in the unit of GOAL_NAMES."""
    op, target = goal[:2], float(goal[2:])
    return f"{'≥' if op == '>=' else '≤'}{target:g}{GOAL_NAMES[key][1]}"


def _cells(s: dict, recs: list[dict]) -> list[str]:
    """One model's column of the runtime table: its recorded run's p50s and ratios (summary + records)."""
    def p50(what, fmt="openvino", views=1):
        return next(r["p50_ms"] for r in recs
                    if (r["what"], r["format"], r["batch"], r["views"]) == (what, fmt, 1, views))

    res, cold, cached = s["results"], s["cold_start"], s["cold_start_with_openvino_cache"]
    phases = res.get("speedup_vs_torch_eager_per_phase")
    diff = res.get("runner_vs_torch_max_abs_prob_diff")
    onnx = ("skipped: " + res["onnx_skipped"] if "onnx_skipped" in res else
            f"{p50('runner', 'onnx'):.3f} / {p50('bare', 'onnx'):.3f} ms = {res['onnx_runner_overhead_vs_bare']:.2f}x")
    vs_torch = (f"{p50('torch_eager_pipeline', 'torch'):.3f} / {p50('runner'):.3f} ms = "
                f"**{res['speedup_vs_torch_eager']:.2f}x** (phases {min(phases):.1f}–{max(phases):.1f}x)"
                if phases else "no checkpoint given")
    return [vs_torch,
            f"{p50('runner'):.3f} / {p50('bare'):.3f} ms = **{res['runner_overhead_vs_bare']:.2f}x**",
            f"{p50('runner', views=5):.3f} ms = **{res['tta5_vs_one_view']:.2f}x**; OpenVINO's own b5/b1: "
            f"{res['bare_b5_vs_b1']:.2f}x",
            f"{cold['load_first_s']:.3f} s (imports +{cold['import_s']:.2f} s; {cached['load_first_s']:.3f} s with the "
            "OpenVINO model cache)",
            f"{cold['peak_rss_mb']:.0f} MB over {cold['images_in_rss_run']} images (torch "
            f"{'imported' if cold['torch_loaded'] else 'never imported'})",
            "-" if diff is None else f"max abs {diff:.1e}", onnx]


def section(doc: dict) -> str:
    """The runtime section of RESULTS.md from latency.json: one column per model in `runtime` (in the order
    measured), each from its summary and the `bench: runtime` records of that run."""
    models = sorted(doc["runtime"].items(), key=lambda kv: kv[1]["date"])
    lines = [MARKERS[0], "## Edge runner latency, TTA, cold start, RSS (`benchmarks/latency_runtime.py`)", "",
             "Recorded runs (`bench: runtime` records and `runtime[<model>]` summaries in "
             "`benchmarks/results/latency.json`):"]
    for name, s in models:
        t, m = s["timing"], s["machine"]
        lines.append(f"- `{name}` ({s['model']['role']}, {s['model']['params']} params): `{s['command']}` on "
                     f"{s['date'][:16]}Z, {machine_line(m)}; {s['threads']} threads; input {s['image']}; "
                     f"{t['rounds']} timed calls per callable in {t['phases']} alternating phases after {t['warmup']} "
                     f"warm-up calls; cold start: median of {t['cold_repeats']} fresh processes; load average at start "
                     f"{m['load_avg_at_start']}, at end {s['load_avg_at_end']}; other processes used "
                     + ("n/a" if s["other_processes_cpu_cores"] is None else f"{s['other_processes_cpu_cores']:.3f}")
                     + " cores on average")
    goal = {k: _goal(k, g["goal"]) for _, s in models for k, g in s["goals"].items()}
    rows = [("runner OpenVINO FP32 batch 1 vs PyTorch eager (eval transform + forward + softmax)",
             goal.get("speedup_vs_torch_eager", "")),
            ("runner vs bare OpenVINO call (`request.infer({input: x})` on a preprocessed float32 batch)",
             goal.get("runner_overhead_vs_bare", "")),
            ("5-view TTA (one call) vs one view", goal.get("tta5_vs_one_view", "")),
            ("cold start, load + first result (fresh process, excl. imports)", goal.get("cold_start_s", "")),
            ("peak RSS, fresh process, 5-view TTA", goal.get("peak_rss_mb", "")),
            ("runner probs vs PyTorch probs, same image", "≤ export tolerance"),
            ("runner vs bare ONNX Runtime call (I/O binding)", "(goals are stated for OpenVINO)")]
    cols = [_cells(s, [r for r in doc["records"] if r.get("bench") == "runtime" and r.get("model") == name
                       and r.get("date") == s["date"]]) for name, s in models]
    lines += ["", "| measure (p50) | " + " | ".join(f"`{name}`" for name, _ in models) + " | goal |",
              "|---|" + "---|" * len(models) + "---|"]
    lines += [f"| {label} | " + " | ".join(c[i] for c in cols) + f" | {g} |" for i, (label, g) in enumerate(rows)]
    met = []
    for name, s in models:
        missed = [f"{GOAL_NAMES[k][0]} {g['value']:.2f}{GOAL_NAMES[k][1]}, goal {_goal(k, g['goal'])}"
                  for k, g in s["goals"].items() if not g["met"]]
        met.append(f"`{name}` {len(s['goals']) - len(missed)} of {len(s['goals'])}"
                   + (f" (missed: {'; '.join(missed)})" if missed else ""))
    lines += ["", "Goals met in the recorded runs: " + ", ".join(met) + ".", MARKERS[1]]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=existing_path, help="an exported bundle (folder)")
    ap.add_argument("--checkpoint", type=existing_path, help="the checkpoint the bundle was exported from (PyTorch baseline)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rounds", type=int, default=800, help="timed calls per callable, over all phases")
    ap.add_argument("--phases", type=int, default=8, help="alternating phases (one block per callable in each)")
    ap.add_argument("--images", type=Path, default=REPO / "edgekd/data/builtin/pneumoniamnist_mini.npz",
                    help="an .npz with test_images; the first one is the benchmark input")
    ap.add_argument("--cold-repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS_JSON)
    ap.add_argument("--results-md", type=Path, help="the RESULTS.md whose runtime section to rewrite (default: "
                    "benchmarks/RESULTS.md when --out is benchmarks/results/latency.json; a scratch --out leaves it)")
    args = ap.parse_args()

    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    host = machine()
    other_cpu = OtherCPU()
    bundle = open_bundle(args.bundle)
    meta = bundle.model
    image = load_image(args.images)
    T = args.threads
    records, results = [], {}

    # OpenVINO FP32: runner, bare call and the PyTorch eager baseline, each in its own block per phase.
    ov_runner = Runner.from_bundle(bundle, backend="openvino", threads=T)
    x1 = ov_runner.preprocessor(image)[None]
    bundle_views = list(bundle.tta.get("views") or FIVE_VIEWS)
    x5 = ov_runner.preprocessor.normalize(TTAViews(FIVE_VIEWS)(ov_runner.preprocessor.to_model_size(image)))
    ov_path = ov_runner.bundle.root / ov_runner.info["artifact"]
    fns = {"runner": lambda: ov_runner.predict(image), "bare": bare_openvino(ov_path, T, x1),
           # The backend's own call on a float32 model input without the runner around it: x copied into the
           # request's input memory, run without arguments (edgekd.runtime.backends.OpenVINOBackend.infer).
           "bare_prealloc": lambda: ov_runner.backend.infer(x1)}
    if args.checkpoint:
        torch_fns, torch_probs = torch_eager(args.checkpoint, T, image)
        fns.update(torch_fns)
    # TTA cost: one view vs 5 (and the bundle's) views, one Runner per setting as a deployment would have.
    tta_runners = {n: Runner.from_bundle(bundle, backend="openvino", threads=T, tta=v)
                   for n, v in (("one", False), ("tta5", FIVE_VIEWS), ("tta_bundle", bundle_views))
                   if n != "tta_bundle" or bundle_views != FIVE_VIEWS}
    fns.update({"runner_one_view": lambda: tta_runners["one"].predict(image),
                "runner_tta5": lambda: tta_runners["tta5"].predict(image), "bare_b5": bare_openvino(ov_path, T, x5)})
    if bundle_views != FIVE_VIEWS:
        fns["runner_tta_bundle"] = lambda: tta_runners["tta_bundle"].predict(image)
    ov = time_alternating([{name: fn} for name, fn in fns.items()], phases=args.phases, warmup=WARMUP,
                          rounds=args.rounds)
    del tta_runners
    fmt = ov_runner.info["format"]
    records += [record(meta, "runner", fmt, 1, 1, ov["runner"], T), record(meta, "bare", fmt, 1, 1, ov["bare"], T),
                record(meta, "bare_prealloc", fmt, 1, 1, ov["bare_prealloc"], T),
                record(meta, "runner", fmt, 1, 5, ov["runner_tta5"], T), record(meta, "bare", fmt, 5, 1, ov["bare_b5"], T)]
    if "runner_tta_bundle" in ov:
        records.append(record(meta, "runner", fmt, 1, len(bundle_views), ov["runner_tta_bundle"], T))
    runner_probs = ov_runner.predict(image).probs

    # ONNX Runtime FP32, the same comparison.
    try:
        ort_runner = Runner.from_bundle(bundle, backend="onnx", threads=T)
        ort_path = ort_runner.bundle.root / ort_runner.info["artifact"]
        ort_tta = Runner.from_bundle(bundle, backend="onnx", threads=T, tta=FIVE_VIEWS)
        ort = time_alternating([{"runner": lambda: ort_runner.predict(image)}, {"bare": bare_onnx(ort_path, T, x1)},
                                {"runner_tta5": lambda: ort_tta.predict(image)}],
                               phases=args.phases, warmup=WARMUP, rounds=args.rounds)
        records += [record(meta, "runner", "onnx", 1, 1, ort["runner"], T),
                    record(meta, "bare", "onnx", 1, 1, ort["bare"], T),
                    record(meta, "runner", "onnx", 1, 5, ort["runner_tta5"], T)]
        results["onnx_runner_overhead_vs_bare"] = ort["runner"]["p50_ms"] / ort["bare"]["p50_ms"]
        del ort_runner
    except Exception as err:  # a bundle without ONNX FP32 still gets the OpenVINO figures
        results["onnx_skipped"] = str(err)

    if args.checkpoint:
        records += [record(meta, "torch_eager_pipeline", "torch", 1, 1, ov["torch_pipeline"], T),
                    record(meta, "torch_eager_forward", "torch", 1, 1, ov["torch_forward"], T)]
        results["speedup_vs_torch_eager"] = ov["torch_pipeline"]["p50_ms"] / ov["runner"]["p50_ms"]
        results["speedup_vs_torch_eager_per_phase"] = per_phase(ov["torch_pipeline"], ov["runner"])
        results["speedup_forward_vs_bare"] = ov["torch_forward"]["p50_ms"] / ov["bare"]["p50_ms"]
        results["runner_vs_torch_max_abs_prob_diff"] = float(np.abs(runner_probs - torch_probs).max())

    results["runner_overhead_vs_bare"] = ov["runner"]["p50_ms"] / ov["bare"]["p50_ms"]
    results["runner_overhead_vs_bare_per_phase"] = per_phase(ov["runner"], ov["bare"])
    results["runner_overhead_vs_bare_prealloc"] = ov["runner"]["p50_ms"] / ov["bare_prealloc"]["p50_ms"]
    results["tta5_vs_one_view"] = ov["runner_tta5"]["p50_ms"] / ov["runner_one_view"]["p50_ms"]
    results["tta5_vs_one_view_per_phase"] = per_phase(ov["runner_tta5"], ov["runner_one_view"])
    results["bare_b5_vs_b1"] = ov["bare_b5"]["p50_ms"] / ov["bare"]["p50_ms"]
    if "runner_tta_bundle" in ov:
        results[f"tta{len(bundle_views)}_vs_one_view"] = ov["runner_tta_bundle"]["p50_ms"] / ov["runner_one_view"]["p50_ms"]

    with tempfile.TemporaryDirectory() as tmp:
        from PIL import Image

        png = Path(tmp) / "input.png"
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(png)
        cold = cold_start(args.bundle, png, T, args.cold_repeats, n_images=256)
        cache = str(Path(tmp) / "ov-cache")
        cold_start(args.bundle, png, T, 1, n_images=1, cache_dir=cache)  # fills the cache
        cold_cached = cold_start(args.bundle, png, T, args.cold_repeats, n_images=1, cache_dir=cache)
    results["cold_start_s"] = cold["load_first_s"]
    results["cold_start_cached_s"] = cold_cached["load_first_s"]
    results["cold_start_with_import_s"] = cold["load_first_s"] + cold["import_s"]
    results["peak_rss_mb"] = cold["peak_rss_mb"]

    goals = {}
    for key, (op, target) in GOALS.items():
        if key in results:
            value = results[key]
            goals[key] = {"value": round(value, 4), "goal": f"{op}{target}",
                          "met": value >= target if op == ">=" else value <= target}
    command = " ".join([Path(sys.executable).name, *sys.argv])
    summary = {"date": started, "command": command, "machine": host,
               "load_avg_at_end": [round(v, 2) for v in os.getloadavg()],
               "other_processes_cpu_cores": other_cpu.cores(), "bundle": str(args.bundle),
               "checkpoint": str(args.checkpoint) if args.checkpoint else None, "model": meta, "threads": T,
               "timing": {"phases": args.phases, "rounds": args.rounds, "warmup": WARMUP,
                          "cold_repeats": args.cold_repeats},
               "image": f"{args.images.name}: test_images[0] {tuple(image.shape)}",
               "goals": goals, "results": {k: _six(v) for k, v in results.items()},
               "cold_start": cold, "cold_start_with_openvino_cache": cold_cached}

    # A ledger shared with benchmarks/latency.py: this model's runtime records replace its earlier ones, and each
    # record names the command, date and machine that produced it.
    doc = json.loads(args.out.read_text()) if args.out.exists() else {}
    kept = [r for r in doc.get("records", []) if not (r.get("bench") == "runtime" and r.get("model") == meta.get("name"))]
    tagged = [{**r, "date": started, "command": command, "machine": host} for r in records]
    doc = {**doc, **results_doc("latency", command, kept + tagged),
           "runtime": {**(doc.get("runtime") or {}), meta.get("name"): summary}}
    write_json(args.out, doc)
    results_md = args.results_md or (RESULTS_MD if args.out.resolve() == RESULTS_JSON.resolve() else None)
    if results_md is not None:
        write_text(results_md, replace_section(results_md.read_text(), section(doc), *MARKERS))

    print(f"{'what':22s} {'format':9s} {'batch':>5s} {'views':>5s} {'p50_ms':>9s} {'p90_ms':>9s} {'p99_ms':>9s}")
    for r in records:
        print(f"{r['what']:22s} {r['format']:9s} {r['batch']:5d} {r['views']:5d} {r['p50_ms']:9.3f} "
              f"{r['p90_ms']:9.3f} {r['p99_ms']:9.3f}")
    for key, g in goals.items():
        print(f"{key:28s} {g['value']:10.3f}  goal {g['goal']:8s} {'met' if g['met'] else 'NOT met'}")
    for key, v in results.items():
        if key not in goals:
            print(f"{key:28s} {v}")
    print(f"load average start {host['load_avg_at_start']} end {summary['load_avg_at_end']}; other processes used "
          f"{summary['other_processes_cpu_cores']} cores on average; wrote {args.out}"
          + (f" and the runtime section of {results_md}" if results_md else ""))


if __name__ == "__main__":
    run_main(main)
