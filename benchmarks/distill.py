"""Acceptance benchmark of distillation: distilled student vs the same student from scratch, several seeds.

    .venv/bin/python benchmarks/distill.py [--seeds 0 1 2] [--phase scratch|kd|all] [--student small|micro] [--reuse]

Trains recipes/pneumonia/student-scratch-28.yaml and student-28.yaml (teacher: runs/bench/pneumonia/teacher/best.pt,
trained with recipes/pneumonia/teacher-28.yaml) once per seed into runs/bench/pneumonia/<role>-s<seed>/, then
merges one record per run (roles `student_scratch` / `student`) into benchmarks/results/accuracy.json (records
of other roles and datasets are kept) and writes the KD summary (means over seeds, KD gain, goals, seconds per
epoch) to benchmarks/results/distill.json. `--student micro` does the same for the smaller edgekd_cnn_micro student
(student-micro-28.yaml / student-micro-scratch-28.yaml, runs student_micro-s<seed> / student_micro_scratch-s<seed>,
results/distill_micro.json). --reuse skips a run whose metrics.json exists for the same recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

from common import (ACCURACY_KEY, REPO, RESULTS, accuracy_record, finished_run, merge_records, plain_runs,
                    refresh_results_md, results_doc, run_main, run_or_reuse, train_command)

from edgekd.fileio import write_json
from edgekd.recipe import load_recipe

RECIPES = {  # run name (run dirs runs/bench/pneumonia/<name>-s<seed>) -> recipe
    "student": "recipes/pneumonia/student-28.yaml", "student_scratch": "recipes/pneumonia/student-scratch-28.yaml",
    "student_micro": "recipes/pneumonia/student-micro-28.yaml",
    "student_micro_scratch": "recipes/pneumonia/student-micro-scratch-28.yaml",
}
STUDENTS = {  # --student: (distilled run, from-scratch run, summary file)
    "small": ("student", "student_scratch", "distill.json"),
    "micro": ("student_micro", "student_micro_scratch", "distill_micro.json"),
}
RUNS = REPO / "runs" / "bench" / "pneumonia"
GOALS = {"params_max": 5_000_000, "auc": 0.962, "acc": 0.884, "stretch_auc": 0.991, "stretch_acc": 0.946,
         "kd_gain_pts": 1.0}
METRICS = ("acc", "auc", "f1", "sensitivity", "specificity", "pauc", "balanced_acc")


def run_one(role: str, seed: int, reuse: bool) -> dict:
    out = RUNS / f"{role}-s{seed}"
    m, command = run_or_reuse(RECIPES[role], out, [f"seed={seed}"], reuse, f"{role} s{seed}")
    return accuracy_record(m, command)


def finished(role: str, seed: int) -> dict | None:
    """The record of a finished run of the current recipe, or None (not trained, or trained from another recipe)."""
    out, overrides = RUNS / f"{role}-s{seed}", [f"seed={seed}"]
    metrics = finished_run(load_recipe(REPO / RECIPES[role], overrides), out)
    return None if metrics is None else accuracy_record(metrics, train_command(RECIPES[role], out, overrides))


def summarize(records: list[dict], kd_role: str = "student", scratch_role: str = "student_scratch") -> dict:
    by_role = {}
    for role in (scratch_role, kd_role):
        rows = [r for r in records if r["role"] == role]
        if not rows:
            continue
        by_role[role] = {k: {"mean": statistics.fmean(r[k] for r in rows),
                             "std": statistics.stdev(r[k] for r in rows) if len(rows) > 1 else 0.0}
                         for k in (*METRICS, "seconds_per_epoch")}
        by_role[role].update(seeds=[r["seed"] for r in rows], params=rows[0]["params"], model=rows[0]["model"])
    out = {"records": [{"role": role, **stats} for role, stats in by_role.items()]}
    if kd_role in by_role:
        kd = by_role[kd_role]
        best = max((r for r in records if r["role"] == kd_role), key=lambda r: r["auc"])
        out["goals"] = {
            "params<=5M": kd["params"] <= GOALS["params_max"],
            "mean_auc>=.962": kd["auc"]["mean"] >= GOALS["auc"], "mean_acc>=.884": kd["acc"]["mean"] >= GOALS["acc"],
            "stretch_mean_auc>=.991": kd["auc"]["mean"] >= GOALS["stretch_auc"],
            "stretch_mean_acc>=.946": kd["acc"]["mean"] >= GOALS["stretch_acc"],
        }
        out["best_seed_by_auc"] = {k: best[k] for k in ("seed", "acc", "auc")}
    if kd_role in by_role and scratch_role in by_role and \
            set(by_role[kd_role]["seeds"]) & set(by_role[scratch_role]["seeds"]):
        # The gain compares the same seeds (same sampling order and initialization) with and without the teacher.
        paired = sorted(set(by_role[kd_role]["seeds"]) & set(by_role[scratch_role]["seeds"]))
        mean = lambda role, k: statistics.fmean(r[k] for r in records if r["role"] == role and r["seed"] in paired)  # noqa: E731
        gain = {k: 100 * (mean(kd_role, k) - mean(scratch_role, k)) for k in METRICS}
        out["kd_gain_pts"] = gain
        out["kd_gain_seeds"] = paired
        out["goals"]["kd_gain>=1pt_acc_or_auc"] = max(gain["acc"], gain["auc"]) >= GOALS["kd_gain_pts"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per seed and student")
    ap.add_argument("--phase", choices=["scratch", "kd", "all"], default="all",
                    help="train the from-scratch runs, the distilled ones, or both (the summary: every run on file)")
    ap.add_argument("--student", choices=sorted(STUDENTS), default="small",
                    help="small: edgekd_cnn_small (the benchmark student); micro: edgekd_cnn_micro")
    ap.add_argument("--reuse", action="store_true", help="skip runs whose metrics.json matches the recipe")
    ap.add_argument("--summarize", action="store_true",
                    help="train nothing: collect the finished runs of these seeds (runs not yet trained are left out)")
    args = ap.parse_args()
    os.chdir(REPO)
    kd_role, scratch_role, summary_file = STUDENTS[args.student]
    roles = {"scratch": [scratch_role], "kd": [kd_role], "all": [scratch_role, kd_role]}[args.phase]
    if args.summarize:
        new = [finished(role, seed) for role in roles for seed in args.seeds]
        new = [r for r in new if r is not None]
    else:
        new = [run_one(role, seed, args.reuse) for role in roles for seed in args.seeds]
    command = "python benchmarks/distill.py " + " ".join(sys.argv[1:])
    merged = merge_records(RESULTS / "accuracy.json", new, "accuracy", command, key=ACCURACY_KEY)
    # This student's records, every seed on file: runs of its recipes with the seed their only override (records keep
    # the recipe's role, e.g. a micro student's runs are role "student"; kd_gain's 30-epoch runs of the same recipe
    # had been counted as more seeds), relabelled with the run name.
    mine = [{**r, "role": run} for run in (scratch_role, kd_role)
            for r in plain_runs(merged, RECIPES[run], dataset="pneumoniamnist")]
    if not any(r["seed"] in args.seeds for r in mine):
        raise SystemExit(f"error: no run of seeds {args.seeds} (trained, or recorded in accuracy.json): nothing to "
                         "summarize, nothing written")
    stats = summarize(mine, kd_role, scratch_role)
    summary = results_doc("distill", command, stats.pop("records"), teacher="runs/bench/pneumonia/teacher/best.pt",
                          **stats)
    write_json(RESULTS / summary_file, summary)
    refresh_results_md()
    print(json.dumps({k: summary[k] for k in summary if k != "records"}, indent=2))
    for s in summary["records"]:
        role = s["role"]
        print(f"{role:16s} {s['model']} {s['params'] / 1e6:.2f}M seeds {s['seeds']}: " +
              " ".join(f"{k}={s[k]['mean']:.4f}±{s[k]['std']:.4f}" for k in ("acc", "auc", "f1", "seconds_per_epoch")))


if __name__ == "__main__":
    run_main(main)
