"""Native-resolution export zoo: the seeds' own students and teachers through `edgekd train`, `edgekd export` and
`edgekd bench` at their input sizes, on upsampled PneumoniaMNIST (28 px official val/test, upsampled by the
recipe's resize; no pretrained weights are reachable here, so every model trains from scratch).

    .venv/bin/python benchmarks/zoo.py [--arch mobilenetv3_large_100 resnet18 ...] [--reuse]

Per architecture: train its shipped full-size recipe with the overrides below (`--set`), check for a sane model
(val AUC >= 0.9, and val and test ACC above the share of the split's largest class: a model that ranks well but
calls nearly every image one class is flagged, and its row marked in the table), export with the default profile
to ONNX FP32/INT8 and OpenVINO FP32/FP16/INT8 (timed), bench PyTorch eager / torch.compile, ONNX Runtime and
OpenVINO (bare call and the edgekd runner) at batch 1 and 8 on 2 threads. Each step is the CLI command recorded
beside its figures in benchmarks/results/zoo.json (one record per architecture, replaced when re-run); the
RESULTS.md zoo section is rewritten from that file.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from common import (REPO, RESULTS, finished_run, machine_line, now, positive_int, replace_section, results_doc,
                    run_main)  # noqa: E402

from edgekd.fileio import write_json, write_text  # noqa: E402
from edgekd.metrics import largest_class_share  # noqa: E402
from edgekd.recipe import load_recipe  # noqa: E402

ZOO_JSON = RESULTS / "zoo.json"
DATA = "../shared/data/medmnist/pneumoniamnist.npz"
EDGEKD = str(REPO / ".venv" / "bin" / "edgekd")
# The recipe data section pointed at the MedMNIST file (official val/test splits), from-scratch training.
# data.patient_pattern: the OCT recipes read patient ids from Kermany file names, which a MedMNIST .npz has not.
COMMON = ["data.source=medmnist", f"data.path={DATA}", "data.split=given", "data.num_workers=2",
          "model.pretrained=false", "data.hair_removal=false", "data.patient_pattern=null", "train.amp=false"]
# KD-OCT's heavy augmentation (RandAugment, erasing, ...) keeps a from-scratch EfficientNet-B2 at chance for the
# few epochs the zoo trains (train loss 3.0 and val AUC 0.57 after 2 epochs): the zoo trains it with the chest X-ray
# recipes' milder set.
LIGHT_AUGMENT = ("augment=[{RandomResizedCrop: {scale: [0.8, 1.0]}}, {RandomRotation: {degrees: 10}}, "
                 "{ColorJitter: {brightness: 0.2, contrast: 0.2}}]")
# arch -> (role, recipe, extra overrides). LRs for training from scratch (the recipes' are for fine-tuning).
# Label smoothing on the hard-swish students: trained from scratch without it MobileNetV3 reached logits ~200 and
# its INT8 artifacts were refused (OV 94.8% top-1 agreement); smoothing keeps logits, and activations, bounded.
ZOO = {
    "mobilenetv3_large_100": ("student", "recipes/pneumonia/student-scratch.yaml",
                              ["train.optimizer.lr=2e-3", "train.loss.label_smoothing=0.1"]),
    "resnet18": ("student", "recipes/pneumonia/student-resnet18.yaml",
                 ["distill=null", "role=student_scratch", "train.optimizer.lr=1e-3"]),
    "efficientnet_b2": ("student", "recipes/oct/student-scratch.yaml",
                        ["data.image_size=288", "data.resize=320", "train.optimizer.lr=1e-3",
                         "train.scheduler.warmup_epochs=1", "train.loss.label_smoothing=0.1", LIGHT_AUGMENT]),
    # ViT-S/16 from scratch under the skin recipe's plateau schedule at a constant 3e-4 and its heavy augmentation
    # did not learn (train loss 0.64-0.67 over 5 epochs, val AUC 0.72): the zoo gives it a warm-up and cosine decay
    # at the recipe's 1e-4, batches of 16 (twice the optimizer steps for the same compute) and the milder set.
    "vit_small_patch16_224": ("student", "recipes/skin/student-scratch.yaml",
                              ["data.resize=224", "data.batch_size=16", "train.optimizer.lr=1e-4",
                               "train.scheduler={name: cosine, warmup_epochs: 1, min_lr: 1.0e-6}", LIGHT_AUGMENT]),
    "resnet50": ("teacher", "recipes/pneumonia/teacher.yaml", ["train.optimizer.lr=1e-3", "train.optimizer.head_lr=null"]),
    "resnet101": ("teacher", "recipes/crossdomain/teacher.yaml",
                  ["train.optimizer.lr=1e-3", "train.optimizer.head_lr=null", "model.freeze_stages=0"]),
    "convnextv2_tiny": ("teacher", "recipes/oct/teacher.yaml",
                        ["model.name=convnextv2_tiny", "train.optimizer.lr=1e-3", "train.optimizer.head_lr=null",
                         "train.grad_accum=1", "train.swa.enabled=false"]),
    "swinv2_tiny_window8_256": ("teacher", "recipes/skin/teacher.yaml",
                                ["train.optimizer.lr=5e-4", "train.optimizer.head_lr=null"]),
}
SANE_VAL_AUC = 0.9
GOALS = {"ov_fp32_vs_eager": 2.0, "ov_int8_vs_fp32": 1.5, "onnx_int8_vs_fp32": 1.0, "runner_vs_bare": 1.15,
         "export_seconds": 300.0, "int8_acc_drop": 0.01, "int8_auc_drop": 0.005}


def run(cmd: list[str], log_path: Path) -> float:
    """Run a CLI command (stdout+stderr to a log), fail loudly; -> seconds."""
    print(f"$ {shlex.join(cmd)}", flush=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log_path.open("w") as fh:
        code = subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - t0
    if code != 0:
        tail = log_path.read_text().strip().splitlines()[-3:]
        raise RuntimeError(f"exit {code} after {seconds:.0f}s: {' | '.join(tail)}")
    return seconds


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def pick(records: list[dict], **want) -> dict | None:
    return next((r for r in records if all(r.get(k) == v for k, v in want.items()) and r["status"] == "ok"), None)


def ratio(a: dict | None, b: dict | None) -> float | None:
    """How many times faster b is than a (p50 of a / p50 of b)."""
    return None if not a or not b else a["p50_ms"] / b["p50_ms"]


def goals(bench: list[dict], parity: dict, export_seconds: float) -> dict:
    out = {}
    for batch in (1, 8):
        eager = pick(bench, format="torch", variant="eager", batch=batch)
        ov = {p: pick(bench, format="openvino", precision=p, variant="bare", batch=batch) for p in ("fp32", "int8")}
        ox = {p: pick(bench, format="onnx", precision=p, variant="bare", batch=batch) for p in ("fp32", "int8")}
        runner = pick(bench, format="openvino", precision="fp32", variant="runner", batch=batch)
        out[f"batch{batch}"] = {"ov_fp32_vs_eager": ratio(eager, ov["fp32"]), "ov_int8_vs_fp32": ratio(ov["fp32"], ov["int8"]),
                                "onnx_int8_vs_fp32": ratio(ox["fp32"], ox["int8"]),
                                "runner_vs_bare": None if not runner or not ov["fp32"] else runner["p50_ms"] / ov["fp32"]["p50_ms"]}
    drops = {f"{a['format']}_{a['precision']}": a.get("metric_drop", {}).get("val", {}) for a in parity["artifacts"]}
    out["export_seconds"] = export_seconds
    out["int8_drops_val"] = {k: v for k, v in drops.items() if k.endswith("int8")}
    return out


def zoo_arch(arch: str, runs: Path, reuse: bool, epochs: int, limit: int | None, eval_limit: int) -> dict:
    role, recipe, extra = ZOO[arch]
    out = runs / arch
    overrides = [*COMMON, *extra, f"train.epochs={epochs}", "train.early_stop.patience=null"]
    if limit:
        overrides.append(f"data.limit={limit}")
    train_cmd = [EDGEKD, "train", recipe, *sets(overrides), "--out", str(out / "train")]
    metrics_path = out / "train" / "metrics.json"
    trained_here = reuse and finished_run(load_recipe(REPO / recipe, overrides), out / "train") is not None
    if not trained_here:  # reuse only a run of exactly this recipe and these overrides
        run(train_cmd, out / "train.log")
        for stale in ("bundle", "export_seconds.json"):
            subprocess.run(["rm", "-rf", str(out / stale)], check=True)
    m = json.loads(metrics_path.read_text())
    sane, why = sanity(m)
    if not sane:
        print(f"{arch}: not a sane model ({why}); its row is marked", flush=True)
    record = {"arch": arch, "role": role, "recipe": recipe,
              "params": m["params"], "macs": m["macs"], "epochs_run": m["epochs_run"],
              "seconds_per_epoch": m["seconds_per_epoch"], "val_auc": m["val"].get("auc"),
              "test_acc": m["test"].get("acc"), "test_auc": m["test"].get("auc"), "sane": sane,
              **({"not_sane": why} if not sane else {}),
              "train_images": sum(m["counts"]["train"]), "commands": {"train": shlex.join(train_cmd)}}
    ckpt = out / "train" / "best.pt"
    record["input_size"] = list(_preprocess(ckpt)["input_size"])
    bundle = out / "bundle"
    export_cmd = [EDGEKD, "export", str(ckpt), "--format", "onnx,openvino", "--precision", "fp32,fp16,int8",
                  "--out", str(bundle), "--threads", "2", "--drop-failed"]
    record["commands"]["export"] = shlex.join(export_cmd)
    try:
        if bundle.exists() and reuse:
            seconds = json.loads((out / "export_seconds.json").read_text())["seconds"]
        else:
            if bundle.exists():
                subprocess.run(["rm", "-rf", str(bundle)], check=True)
            seconds = run(export_cmd, out / "export.log")
            write_json(out / "export_seconds.json", {"seconds": seconds})
        record["export"] = {"passed": True, "seconds": round(seconds, 1)}
    except RuntimeError as err:
        record["export"] = {"passed": False, "error": str(err)}
        return record
    parity = json.loads((bundle / "parity.json").read_text())
    record["parity"] = [{k: a.get(k) for k in ("format", "precision", "size_mb", "max_abs_diff", "top1_agreement",
                                                "allclose_violations", "metric_drop", "split_images", "passed",
                                                "failures", "per_view", "speed_vs_fp32")}
                        for a in parity["artifacts"]]
    record["not_shipped"] = parity.get("dropped", []) + parity.get("too_slow", [])
    bench_cmd = [EDGEKD, "bench", str(bundle), "--checkpoint", str(ckpt), "--batch", "1,8", "--threads", "2",
                 "--precision", "fp32,fp16,int8", "--eval-limit", str(eval_limit), "--out", str(out / "bench")]
    record["commands"]["bench"] = shlex.join(bench_cmd)
    run(bench_cmd, out / "bench.log")
    bench = json.loads((out / "bench" / "bench.json").read_text())
    rows = bench["records"] if isinstance(bench, dict) else bench
    record["bench"] = [{k: r.get(k) for k in ("format", "precision", "variant", "batch", "p50_ms", "p99_ms",
                                                "throughput", "peak_rss_mb", "size_mb", "acc", "auc", "status",
                                                "reason")} for r in rows if r.get("role") != "teacher" or role == "teacher"]
    record["goals"] = goals(rows, parity, seconds)
    # The bench's own machine reading: SIMD/INT8 dot-product support and how quiet it was (other processes' cores).
    bm = dict(bench.get("machine") or {}) if isinstance(bench, dict) else {}
    record["bench_machine"] = {("arch" if k == "machine" else k): v for k, v in bm.items()} or None
    record["date"] = now()
    return record


def sanity(metrics: dict) -> tuple[bool, str]:
    """(sane, why not) from a run's metrics.json: val AUC >= SANE_VAL_AUC, and ACC above the share of the largest
    class on val and on test (a model that ranks but whose 0.5 threshold calls nearly every image one class)."""
    auc = metrics["val"].get("auc") or 0.0
    if auc < SANE_VAL_AUC:
        return False, f"val AUC {auc:.3f} < {SANE_VAL_AUC}"
    for split in ("val", "test"):
        acc, share = metrics[split].get("acc") or 0.0, largest_class_share(metrics["counts"][split])
        if share is not None and acc <= share:
            return False, (f"{split} ACC {acc:.4f} is no better than its largest class's share {share:.4f} "
                           f"(val AUC {auc:.3f})")
    return True, ""


def _preprocess(ckpt: Path) -> dict:
    from edgekd.train.checkpoint import load_checkpoint

    return load_checkpoint(ckpt)["preprocess"]


def markdown(doc: dict) -> str:
    commands: dict[str, list[str]] = {}
    for rec in doc["records"]:
        commands.setdefault(rec["command"], []).append(f"{rec['arch']} ({rec['date'][:16]}Z)")
    lines = ["<!-- zoo:begin -->", "## Native-resolution export zoo", "",
             *[f"- `{cmd}`: {', '.join(archs)}" for cmd, archs in commands.items()], "",
             f"{machine_line(doc['machine'])}. Upsampled PneumoniaMNIST (official val/test), "
             "every model trained from scratch through its shipped full-size recipe (overrides in zoo.json), exported "
             "with the default profile, benched with `edgekd bench --threads 2` (PyTorch eager, ONNX Runtime and "
             "OpenVINO bare calls and the edgekd runner; fresh process per row). p50 ms at batch 1 / batch 8.", "",
             "| model | role | input | params | val AUC | test ACC | export s | eager | OV FP32 | OV FP16 | OV INT8 | "
             "ONNX FP32 | ONNX INT8 | runner/bare b1 | runner/bare b8 |", "|" + "---|" * 15]

    def p50(rec, fmt, prec, var, batch):
        r = next((b for b in rec.get("bench", []) if b["format"] == fmt and b["precision"] == prec
                  and b["variant"] == var and b["batch"] == batch and b["status"] == "ok"), None)
        return f"{r['p50_ms']:.1f}" if r else "-"

    for rec in doc["records"]:
        cells = [f"{p50(rec, f, p, v, 1)} / {p50(rec, f, p, v, 8)}" for f, p, v in (
            ("torch", "fp32", "eager"), ("openvino", "fp32", "bare"), ("openvino", "fp16", "bare"),
            ("openvino", "int8", "bare"), ("onnx", "fp32", "bare"), ("onnx", "int8", "bare"))]
        g = rec.get("goals", {})
        rb = [g.get(f"batch{b}", {}).get("runner_vs_bare") for b in (1, 8)]
        exp = rec.get("export", {})
        lines.append(f"| {rec['arch']} | {rec['role']} | {rec['input_size'][-1]} | {rec['params'] / 1e6:.1f}M | "
                     f"{rec['val_auc']:.3f} | {rec['test_acc']:.3f}{'' if rec.get('sane', True) else ' (not sane)'} | "
                     f"{exp.get('seconds', 'FAIL')} | " + " | ".join(cells) + " | "
                     + " | ".join("-" if v is None else f"{v:.2f}x" for v in rb) + " |")
    flagged = [f"{rec['arch']}: {rec['not_sane']}" for rec in doc["records"] if rec.get("not_sane")]
    if flagged:
        lines += ["", "Not sane (its speed figures stand; its accuracy and INT8 agreement describe a degenerate "
                  "model): " + "; ".join(flagged) + "."]
    quiet = [f"{rec['arch']}: {m.get('other_processes_cpu_cores', float('nan')):.2f} other cores, "
             f"INT8 dot product {'yes' if m.get('int8_dot_product') else 'no'} ({', '.join(m.get('simd') or []) or 'no AVX'})"
             for rec in doc["records"] if (m := rec.get("bench_machine"))]
    if quiet:
        lines += ["", "Bench machine per row (what `edgekd bench` read: other processes' CPU use during the run, the CPU's "
                  "SIMD): " + "; ".join(quiet) + ". Rows without it predate that reading."]
    lines += ["", "<!-- zoo:end -->"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=list(ZOO), choices=list(ZOO))
    parser.add_argument("--epochs", type=positive_int, default=3, help="training epochs per architecture")
    parser.add_argument("--limit", type=int, default=None, help="data.limit: at most N images per split")
    parser.add_argument("--eval-limit", type=positive_int, default=400,
                        help="bench --eval-limit: a stratified, seeded subset of N test images")
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "zoo")
    parser.add_argument("--reuse", action="store_true", help="reuse finished train/export steps in --runs")
    parser.add_argument("--render", action="store_true", help="only rewrite the RESULTS.md section from zoo.json")
    args = parser.parse_args()
    if args.render:
        write_section(json.loads(ZOO_JSON.read_text()))
        return 0
    command = shlex.join([".venv/bin/python", "benchmarks/zoo.py", *sys.argv[1:]])
    previous = json.loads(ZOO_JSON.read_text()) if ZOO_JSON.is_file() else {"records": []}
    records = [r for r in previous["records"] if r["arch"] not in args.arch]
    for arch in args.arch:
        try:
            rec = zoo_arch(arch, args.runs, args.reuse, args.epochs, args.limit, args.eval_limit)
        except RuntimeError as err:
            print(f"{arch}: {err}", flush=True)
            rec = {"arch": arch, "role": ZOO[arch][0], "recipe": ZOO[arch][1], "error": str(err), "date": now()}
        rec["command"] = command
        records.append(rec)
        doc = results_doc("zoo", command, records, goals=GOALS)
        write_json(ZOO_JSON, doc)
    write_section(doc)
    print(f"wrote {ZOO_JSON} and the RESULTS.md zoo section")
    return 0


def write_section(doc: dict) -> None:
    """The RESULTS.md zoo section from a zoo.json document (the records that reached the benchmark)."""
    results_md = REPO / "benchmarks" / "RESULTS.md"
    ok = [r for r in doc["records"] if "bench" in r]
    write_text(results_md, replace_section(results_md.read_text(), markdown({**doc, "records": ok}),
                                           "<!-- zoo:begin -->", "<!-- zoo:end -->"))


if __name__ == "__main__":
    run_main(main)
