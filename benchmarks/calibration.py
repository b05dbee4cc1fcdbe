"""Clinical operating point on PneumoniaMNIST: the teacher and the distilled student, calibrated and thresholded.

    .venv/bin/python benchmarks/calibration.py [--reuse] [--target 0.95]

Trains (or reuses) recipes/pneumonia/teacher-28.yaml into runs/bench/pneumonia/teacher and the distilled student
recipes/pneumonia/student-28.yaml (seed 0) into runs/bench/pneumonia/kd-s0, exports each with
`edgekd export --profile <ONNX + OpenVINO FP32/INT8, decision: sensitivity >= target>`, and records from each bundle
(edgekd.json, parity.json): the temperature fit on validation, ECE / adaptive ECE / Brier / NLL before and after on
validation and test, the threshold chosen on validation, and the test sensitivity, specificity, ... with 95%
stratified bootstrap intervals for PyTorch and every artifact under the same temperature and threshold, and the
mean distance of each artifact's calibrated probabilities from PyTorch's. Writes benchmarks/results/calibration.json,
the reliability diagrams benchmarks/results/calibration_<role>.png and the RESULTS.md section.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from common import REPO, RESULTS, machine_line, results_doc, run_main, run_or_reuse, write_section  # noqa: E402

import yaml  # noqa: E402

from edgekd.fileio import write_json  # noqa: E402

RUNS = {"teacher": ("recipes/pneumonia/teacher-28.yaml", REPO / "runs/bench/pneumonia/teacher"),
        "student": ("recipes/pneumonia/student-28.yaml", REPO / "runs/bench/pneumonia/kd-s0")}
MARKERS = ("<!-- calibration:begin (benchmarks/calibration.py) -->", "<!-- calibration:end -->")
GOALS = {"ece_after_max": 0.03, "test_sensitivity_min": 0.93, "int8_calibrated_prob_mean_abs_max": 0.01}
FIGURES = ("sensitivity", "specificity", "acc", "balanced_acc", "auc", "ece")


def export(role: str, ckpt: Path, out: Path, target: float, reuse: bool) -> str:
    profile = out.parent / f"{out.name}-profile.yaml"
    profile.parent.mkdir(parents=True, exist_ok=True)
    profile.write_text(yaml.safe_dump({"name": f"calibration-{role}", "formats": ["onnx", "openvino"],
                                       "precisions": ["fp32", "int8"], "threads": 2,
                                       "decision": {"rule": "sensitivity", "target": target}}))
    cmd = [str(REPO / ".venv/bin/edgekd"), "export", str(ckpt), "--target", str(profile), "--out", str(out)]
    shown = shlex.join(["edgekd", *cmd[1:]]).replace(str(REPO) + "/", "")
    if reuse and (out / "edgekd.json").is_file():
        print(f"reusing {out}", flush=True)
        return shown
    shutil.rmtree(out, ignore_errors=True)
    print(f"$ {shown}", flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)
    return shown


def record(role: str, out: Path, train_cmd: str, export_cmd: str) -> dict:
    meta = json.loads((out / "edgekd.json").read_text())
    parity = json.loads((out / "parity.json").read_text())
    cal, dec = meta["calibration"], meta["decision"]
    formats = {"pytorch fp32": {"figures": dec["test"], "calibrated_prob_mean_abs_diff": 0.0}}
    for a in parity["artifacts"]:
        op = a["operating_point"]["test"]
        formats[f"{a['format']} {a['precision']}"] = {
            "figures": op["figures"], "calibrated_prob_mean_abs_diff": op["calibrated_prob_mean_abs_diff"],
            "auc_vs_pytorch_p": (op.get("auc_vs_reference") or {}).get("p_value"), "passed": a["passed"]}
    png = RESULTS / f"calibration_{role}.png"
    shutil.copyfile(out / meta["reliability"], png)
    return {"role": role, "model": meta["model"]["name"], "temperature": cal["temperature"],
            "fit_images": cal["fit_images"], "calibration": {s: cal[s] for s in ("val", "test")},
            "decision": {k: dec[k] for k in ("rule", "target", "threshold", "positive_class")},
            "val_sensitivity": dec["val"]["sensitivity"], "test_images": cal["test"]["images"],
            "formats": formats, "reliability_png": png.name, "commands": {"train": train_cmd, "export": export_cmd}}


def goals(rec: dict) -> dict:
    test = rec["calibration"]["test"]
    ece_ok = test["after"]["ece"] <= max(GOALS["ece_after_max"], test["before"]["ece"] / 2)
    int8 = [f for name, f in rec["formats"].items() if name.endswith("int8")]
    return {"ece": {"before": test["before"]["ece"], "after": test["after"]["ece"], "met": ece_ok},
            "test_sensitivity": {name: f["figures"]["sensitivity"]["value"] for name, f in rec["formats"].items()},
            "test_sensitivity_met": all(f["figures"]["sensitivity"]["value"] >= GOALS["test_sensitivity_min"]
                                        for f in rec["formats"].values()),
            "int8_calibrated_prob_mean_abs": [f["calibrated_prob_mean_abs_diff"] for f in int8],
            "int8_met": all(f["calibrated_prob_mean_abs_diff"] <= GOALS["int8_calibrated_prob_mean_abs_max"]
                            for f in int8)}


def _ci(f: dict) -> str:
    return f"{f['value']:.3f} [{f['low']:.3f}, {f['high']:.3f}]"


def section(doc: dict) -> str:
    lines = [MARKERS[0], "## Calibration and operating point (`benchmarks/calibration.py`)", "",
             f"`{doc['command']}` on {doc['date'][:16]}Z, {machine_line(doc['machine'])}. PneumoniaMNIST official "
             "val (temperature and threshold fit) and test splits; intervals are 95% stratified bootstrap (1000 "
             f"resamples, seed 0). Goals: test ECE after scaling ≤ {GOALS['ece_after_max']} or at most half the "
             f"uncalibrated ECE; test sensitivity ≥ {GOALS['test_sensitivity_min']} at the threshold chosen on val "
             f"for sensitivity ≥ {doc['target']}; INT8 calibrated probabilities within "
             f"{GOALS['int8_calibrated_prob_mean_abs_max']} (mean abs) of PyTorch's.", ""]
    for rec in doc["records"]:
        g = rec["goals"]
        lines += [f"### {rec['role']}: {rec['model']}", "",
                  f"Train: `{rec['commands']['train']}`; export: `{rec['commands']['export']}`. Temperature "
                  f"T = {rec['temperature']:.4f} ({rec['fit_images']} val images); threshold on p("
                  f"{rec['decision']['positive_class']}) = {rec['decision']['threshold']:.4f} (val sensitivity "
                  f"{_ci(rec['val_sensitivity'])}).", "",
                  "| split | | ECE | adaptive ECE | Brier | NLL |", "|---|---|---:|---:|---:|---:|"]
        for split in ("val", "test"):
            for when in ("before", "after"):
                f = rec["calibration"][split][when]
                lines.append(f"| {split} | {when} | {f['ece']:.4f} | {f['adaptive_ece']:.4f} | {f['brier']:.4f} | "
                             f"{f['nll']:.4f} |")
        lines += ["", f"Test ({rec['test_images']} images) at that threshold:", "",
                  "| format | " + " | ".join(FIGURES) + " | calibrated p vs PyTorch (mean abs) |",
                  "|---|" + "---|" * (len(FIGURES) + 1)]
        for name, f in rec["formats"].items():
            lines.append(f"| {name} | " + " | ".join(_ci(f["figures"][m]) for m in FIGURES)
                         + f" | {f['calibrated_prob_mean_abs_diff']:.2e} |")
        lines += ["", f"![reliability {rec['role']}](results/{rec['reliability_png']})", "",
                  f"- ECE: {g['ece']['before']:.4f} → {g['ece']['after']:.4f}: {'met' if g['ece']['met'] else 'MISSED'}",
                  f"- test sensitivity ≥ {GOALS['test_sensitivity_min']} in every format: "
                  f"{'met' if g['test_sensitivity_met'] else 'MISSED'} ("
                  + ", ".join(f"{k} {v:.3f}" for k, v in g["test_sensitivity"].items()) + ")",
                  "- INT8 calibrated probabilities vs PyTorch: "
                  + ", ".join(f"{v:.4f}" for v in g["int8_calibrated_prob_mean_abs"])
                  + f" mean abs: {'met' if g['int8_met'] else 'MISSED'}", ""]
    lines.append(MARKERS[1])
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reuse", action="store_true", help="reuse finished runs and bundles")
    ap.add_argument("--target", type=float, default=0.95, help="validation sensitivity the threshold must reach")
    args = ap.parse_args()
    if not 0 < args.target <= 1:
        ap.error(f"--target {args.target}: a sensitivity in (0, 1]")
    command = shlex.join(["python", "benchmarks/calibration.py", *sys.argv[1:]])
    records = []
    for role, (recipe, out) in RUNS.items():
        _, train_cmd = run_or_reuse(recipe, out, [], args.reuse, role)
        bundle = REPO / "runs/bench/calibration" / role
        export_cmd = export(role, out / "best.pt", bundle, args.target, args.reuse)
        rec = record(role, bundle, train_cmd, export_cmd)
        rec["goals"] = goals(rec)
        records.append(rec)
    doc = results_doc("calibration", command, records, target=args.target, goals=GOALS)
    write_json(RESULTS / "calibration.json", doc)
    write_section(section(doc), *MARKERS)
    print(section(doc))
    return 0


if __name__ == "__main__":
    run_main(main)
