"""Accuracy against the MedMNIST v2 paper: teacher and custom-CNN baseline per dataset, on the official test split.

    .venv/bin/python benchmarks/accuracy.py [--datasets pneumoniamnist] [--seeds 0] [--reuse]

Trains recipes/<workflow>/<role>-28.yaml (--roles: teacher, baseline, teacher-resnet18, ...) into
runs/bench/<workflow>/<role> and merges one record per run (the role its recipe names) into
benchmarks/results/accuracy.json (its records; other records, e.g. the students of benchmarks/distill.py, are
kept). Needs ../shared/data/medmnist/<dataset>.npz.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from common import (ACCURACY_KEY, REPO, RESULTS, accuracy_record, merge_records, refresh_results_md, run_main,
                    run_or_reuse)
from kd_gain import SETS as KD_SETS

# MedMNIST v2 (Yang et al. 2023), Table: test AUC / ACC at 28 px unless noted.
PAPER = {
    "pneumoniamnist": {"ResNet-18 (28)": (0.944, 0.854), "ResNet-50 (224)": (0.962, 0.884),
                       "Google AutoML Vision": (0.991, 0.946)},
    "octmnist": {"ResNet-18 (28)": (0.943, 0.743), "ResNet-50 (224)": (0.958, 0.776),
                 "Google AutoML Vision": (0.963, 0.771)},
    "dermamnist": {"ResNet-18 (28)": (0.917, 0.735), "ResNet-50 (224)": (0.912, 0.731),
                   "Google AutoML Vision": (0.914, 0.768)},
    "retinamnist": KD_SETS["retina"]["medmnist"],
}
WORKFLOW = {"pneumoniamnist": "pneumonia", "octmnist": "oct", "dermamnist": "skin", "retinamnist": "retina"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", choices=sorted(WORKFLOW), default=["pneumoniamnist"],
                    help="MedMNIST sets, read from ../shared/data/medmnist/<dataset>.npz")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed (seed 0 in runs/.../<role>)")
    ap.add_argument("--roles", nargs="+", default=["teacher", "baseline"],
                    help="recipes/<workflow>/<role>-28.yaml of each dataset's workflow")
    ap.add_argument("--reuse", action="store_true", help="skip runs whose recipe.yaml matches and metrics.json exists")
    args = ap.parse_args()
    os.chdir(REPO)
    missing = [f"recipes/{WORKFLOW[ds]}/{role}-28.yaml" for ds in args.datasets for role in args.roles
               if not (REPO / "recipes" / WORKFLOW[ds] / f"{role}-28.yaml").is_file()]
    if missing:
        ap.error(f"no recipe {', '.join(missing)} (--roles names recipes/<workflow>/<role>-28.yaml)")
    new = []
    for ds in args.datasets:
        npz = Path("../shared/data/medmnist") / f"{ds}.npz"
        if not npz.is_file():
            print(f"skip {ds}: {npz} is absent")
            continue
        wf = WORKFLOW[ds]
        for role in args.roles:
            recipe = f"recipes/{wf}/{role}-28.yaml"
            for seed in args.seeds:
                suffix = "" if seed == 0 else f"-s{seed}"
                out = REPO / "runs" / "bench" / wf / f"{role}{suffix}"
                m, cmd = run_or_reuse(recipe, out, [f"seed={seed}"] if seed else [],
                                      args.reuse, f"{ds} {role} s{seed}")
                rec = accuracy_record(m, cmd)
                paper_auc, paper_acc = PAPER[ds]["ResNet-18 (28)"]
                rec["paper_resnet18_28"] = {"auc": paper_auc, "acc": paper_acc}
                new.append(rec)
                print(f"{ds} {role} seed {seed}: acc={rec['acc']:.4f} auc={rec['auc']:.4f} "
                      f"(MedMNIST v2 ResNet-18 (28): auc {paper_auc} acc {paper_acc})", flush=True)
    if not new:
        raise SystemExit("error: no dataset file found: nothing trained, accuracy.json unchanged")
    command = shlex.join(["python", "benchmarks/accuracy.py", *sys.argv[1:]])
    merge_records(RESULTS / "accuracy.json", new, "accuracy", command, key=ACCURACY_KEY)
    refresh_results_md()


if __name__ == "__main__":
    run_main(main)
