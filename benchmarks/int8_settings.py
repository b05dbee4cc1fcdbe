"""INT8 quantization settings vs the default parity gate on one checkpoint: each row is an `edgekd export` of its
ONNX and OpenVINO INT8 artifacts with the default profile plus that row's `quantization` keys (tolerances never
change; failing artifacts are dropped, not fatal), read back from parity.json.

    .venv/bin/python benchmarks/int8_settings.py CHECKPOINT [--rows base per_tensor ...] [--out DIR]

Writes DIR/int8_settings.md (a markdown table: top-1 agreement on the gate's inputs, val ACC / AUC drop, pass).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

from common import REPO, existing_path, now, run_main  # noqa: E402

from edgekd.errors import EdgeKDError  # noqa: E402
from edgekd.export import export_checkpoint, profile_from_dict  # noqa: E402
from edgekd.fileio import write_text  # noqa: E402

HARD_SWISH_ONNX = ["Mul", "HardSigmoid", "HardSwish", "Sigmoid"]
HARD_SWISH_OV = ["Multiply", "HSwish", "HSigmoid", "Sigmoid", "Swish"]
# row -> (what it tries, the profile's quantization keys)
ROWS = {
    "base": ("defaults: ORT MinMax per-channel; NNCF mixed preset, full bias correction", {}),
    "per_tensor": ("ORT per-tensor weights; NNCF performance preset (symmetric activations)",
                   {"onnx": {"per_channel": False}, "preset": "performance"}),
    "percentile": ("ORT percentile 99.999 calibration; NNCF fast bias correction",
                   {"onnx": {"calibrate_method": "percentile"}, "fast_bias_correction": True}),
    "entropy": ("ORT entropy calibration + 7-bit weights; first and last layers quantized too, on both backends "
                "(no keep_first_last)",
                {"onnx": {"calibrate_method": "entropy", "reduce_range": True}, "keep_first_last": False}),
    "float_swish": ("hard-swish / sigmoid / SE multiply ops left FP32 on both backends",
                    {"onnx": {"exclude_op_types": HARD_SWISH_ONNX}, "openvino": {"ignored_types": HARD_SWISH_OV}}),
    "calib_1000": ("1000 calibration images (default 300)", {"calib_images": 1000}),
    "all_int8": ("first and last layers quantized too (no keep_first_last), nothing else changed",
                 {"keep_first_last": False}),
}


def run_row(checkpoint: Path, keys: dict, scratch: Path) -> list[dict]:
    profile = profile_from_dict({"parity": {"on_fail": "drop"}, "quantization": keys})
    out = scratch / "bundle"
    try:
        export_checkpoint(checkpoint, out, ["onnx", "openvino"], ["int8"], profile, log=lambda *_: None)
        parity = json.loads((out / "parity.json").read_text())
    except EdgeKDError as err:  # every artifact failed: the gate's error carries parity.json's content
        parity = getattr(err, "parity", None)
        if parity is None:
            raise
    rows = []
    for rec in parity["artifacts"]:
        drop = rec["metric_drop"]["val"]
        rows.append({"format": rec["format"], "top1": rec["top1_agreement"], "acc_drop": drop["acc"],
                     "auc_drop": drop["auc"], "passed": rec.get("passed", False)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=existing_path, help="a trained checkpoint (best.pt)")
    ap.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "int8_settings")
    args = ap.parse_args()
    lines = [f"`{shlex.join(['python', 'benchmarks/int8_settings.py', *sys.argv[1:]])}` ({now()})", "",
             "| setting | keys | ONNX top-1 | ONNX ΔACC / ΔAUC | OV top-1 | OV ΔACC / ΔAUC |",
             "|---|---|---:|---|---:|---|"]
    for name in args.rows:
        what, keys = ROWS[name]
        with tempfile.TemporaryDirectory() as tmp:
            rows = {r["format"]: r for r in run_row(args.checkpoint, keys, Path(tmp))}
        cells = [f"{rows[f]['top1']:.2%}{' pass' if rows[f]['passed'] else ''} | "
                 f"{rows[f]['acc_drop'] * 100:+.2f} pt / {rows[f]['auc_drop']:+.4f}" for f in ("onnx", "openvino")]
        lines.append(f"| {what} | `{json.dumps(keys)}` | {' | '.join(cells)} |")
        print(lines[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "int8_settings.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    run_main(main)
