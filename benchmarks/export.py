"""Acceptance benchmark of `edgekd export`: parity and clinical metrics of every artifact on the test split.

    .venv/bin/python benchmarks/export.py --checkpoint runs/bench/pneumonia/student/best.pt [--checkpoint ...]

Each checkpoint is exported to ONNX FP32/INT8 and OpenVINO FP32/FP16/INT8 through the same code path as
`edgekd export` (the shipped profile cpu-all, parity gate included). Every artifact is then compared with the
PyTorch model on the WHOLE test split of the checkpoint's recipe data (PneumoniaMNIST: 624 images): max/mean abs
logit difference, top-1 agreement, ACC/AUC and their drop (fractions). Records replace earlier records of the
same checkpoint in benchmarks/results/export.json. Acceptance: ONNX and OpenVINO FP32 max-abs <= 1e-4 and 100%
top-1 agreement; OpenVINO INT8 (NNCF) ACC drop <= 0.01 and AUC drop <= 0.005.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import existing_path, machine, results_doc, run_main  # noqa: E402

from edgekd.export import ParityGateError, export_checkpoint, load_profile, with_overrides  # noqa: E402
from edgekd.fileio import write_json  # noqa: E402
from edgekd.train.checkpoint import load_checkpoint  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "export.json"
FP32_MAX_ABS, INT8_ACC_DROP, INT8_AUC_DROP = 1e-4, 0.01, 0.005


def records_for(checkpoint: Path, parity: dict, gate_passed: bool, seconds: float) -> list[dict]:
    ckpt = load_checkpoint(checkpoint)
    ref = parity["reference"]["metrics"]["test"]
    out = []
    for rec in parity["artifacts"]:
        test_parity = rec.get("split_parity", {}).get("test", {})
        test = rec.get("metrics", {}).get("test", {})
        drop = rec.get("metric_drop", {}).get("test", {})
        out.append({
            "model": ckpt["arch"]["name"], "role": ckpt.get("role"), "checkpoint": str(checkpoint),
            "recipe_digest": ckpt.get("recipe_digest"), "format": rec["format"], "precision": rec["precision"],
            "split": "test", "images": parity["reference"]["split_images"]["test"],
            "max_abs_diff": test_parity.get("max_abs_diff"), "mean_abs_diff": test_parity.get("mean_abs_diff"),
            "top1_agreement": test_parity.get("top1_agreement"),
            "acc": test.get("acc"), "auc": test.get("auc"), "acc_drop": drop.get("acc"), "auc_drop": drop.get("auc"),
            "torch_acc": ref.get("acc"), "torch_auc": ref.get("auc"), "size_mb": rec.get("size_mb"),
            "gate": {"passed": rec["passed"], "inputs": parity["inputs"], "max_abs_diff": rec.get("max_abs_diff"),
                     "top1_agreement": rec.get("top1_agreement"), "failures": rec["failures"]},
            "export_gate_passed": gate_passed, "export_seconds": round(seconds, 1),
        })
    return out


def acceptance(records: list[dict]) -> dict:
    def find(fmt, prec):
        return next((r for r in records if r["format"] == fmt and r["precision"] == prec), None)

    result = {}
    for fmt in ("onnx", "openvino"):
        r = find(fmt, "fp32")
        result[f"{fmt}_fp32"] = bool(r and r["max_abs_diff"] is not None and r["max_abs_diff"] <= FP32_MAX_ABS
                                     and r["top1_agreement"] == 1.0)
    r = find("openvino", "int8")
    result["openvino_int8"] = bool(r and r["acc_drop"] is not None and r["acc_drop"] <= INT8_ACC_DROP
                                   and r["auc_drop"] is not None and r["auc_drop"] <= INT8_AUC_DROP)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", action="append", type=existing_path, required=True,
                        help="a checkpoint to export (repeat for more)")
    parser.add_argument("--profile", type=Path, default="cpu-all")
    parser.add_argument("--bundles", type=Path, default=REPO / "runs" / "bench" / "export" / "bundles")
    parser.add_argument("--parity-images", type=int, default=64)
    parser.add_argument("--calib-images", type=int, default=300)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="override a key of the checkpoint's recipe, e.g. data.path=...")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()

    profile = with_overrides(load_profile(args.profile), args.parity_images, args.calib_images, args.threads)
    # Compare on the whole test split, not a capped subset.
    profile = profile.model_copy(update={"parity": profile.parity.model_copy(update={"metric_images": None})})
    new = []  # the file holds this command's records only (one command per results file)
    for checkpoint in args.checkpoint:
        name = f"{checkpoint.parent.name}-{checkpoint.stem}"
        t0 = time.perf_counter()
        try:
            result = export_checkpoint(checkpoint, args.bundles / name, profile=profile, data_overrides=args.overrides,
                                       log=lambda m: print(m, flush=True))
            parity, passed = result.parity, True
        except ParityGateError as err:
            print(err, flush=True)
            parity, passed = err.parity, False
        new += records_for(checkpoint, parity, passed, time.perf_counter() - t0)
    accepted = {str(c): acceptance([r for r in new if r["checkpoint"] == str(c)]) for c in args.checkpoint}
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/export.py", *sys.argv[1:]])
    import nncf
    import onnxruntime
    import openvino

    host = machine(onnxruntime=onnxruntime.__version__, openvino=openvino.__version__, nncf=nncf.__version__)
    write_json(args.results, results_doc(
        "export", command, new, host, profile=profile.name,
        acceptance_rule={"fp32_max_abs_diff": FP32_MAX_ABS, "fp32_top1_agreement": 1.0,
                         "openvino_int8_acc_drop": INT8_ACC_DROP, "openvino_int8_auc_drop": INT8_AUC_DROP},
        acceptance=accepted))
    print(f"{'checkpoint':40} {'format':9} {'prec':5} {'max_abs':>9} {'top1':>7} {'acc':>7} {'auc':>7} "
          f"{'acc_drop':>9} {'auc_drop':>9} {'MB':>8}")
    for r in new:
        def f(v, fmt):
            return "-" if v is None else format(v, fmt)
        print(f"{r['checkpoint'][-40:]:40} {r['format']:9} {r['precision']:5} {f(r['max_abs_diff'], '.2e'):>9} "
              f"{f(r['top1_agreement'], '.4f'):>7} {f(r['acc'], '.4f'):>7} {f(r['auc'], '.4f'):>7} "
              f"{f(r['acc_drop'], '.4f'):>9} {f(r['auc_drop'], '.4f'):>9} {f(r['size_mb'], '.3f'):>8}")
    print("acceptance:", json.dumps(accepted))
    print(f"wrote {args.results}")
    return 0 if all(all(v.values()) for v in accepted.values()) else 1


if __name__ == "__main__":
    run_main(main)
