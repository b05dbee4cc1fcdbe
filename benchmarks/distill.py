"""Acceptance benchmark of distillation: distilled student vs the same student from scratch, several seeds.

    .venv/bin/python benchmarks/distill.py [--seeds 0 1 2] [--phase scratch|kd|all] [--reuse]

Trains recipes/pneumonia/student-scratch-28.yaml and student-28.yaml (teacher: runs/bench/pneumonia/teacher/best.pt,
trained with recipes/pneumonia/teacher-28.yaml) once per seed into runs/bench/pneumonia/<role>-s<seed>/, then
merges one record per run (roles `student_scratch` / `student`) into benchmarks/results/accuracy.json (records
of other roles and datasets are kept) and writes the KD summary (means over seeds, KD gain, goals, seconds per
epoch) to benchmarks/results/distill.json. --reuse skips a run whose metrics.json exists for the same recipe.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgekd.fileio import write_json  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
RECIPES = {"student_scratch": "recipes/pneumonia/student-scratch-28.yaml", "student": "recipes/pneumonia/student-28.yaml"}
RUNS = REPO / "runs" / "bench" / "pneumonia"
GOALS = {"params_max": 5_000_000, "auc": 0.962, "acc": 0.884, "stretch_auc": 0.991, "stretch_acc": 0.946,
         "kd_gain_pts": 1.0}
METRICS = ("acc", "auc", "f1", "sensitivity", "specificity", "pauc", "balanced_acc")


def machine() -> str:
    gpu = "no GPU"
    try:
        import torch
        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"{os.cpu_count()}-core {platform.machine()}, {gpu}"


def run_one(role: str, seed: int, reuse: bool) -> dict:
    from edgekd.pipeline import run_recipe
    from edgekd.recipe import load_recipe

    recipe = load_recipe(REPO / RECIPES[role], [f"seed={seed}"])
    out = RUNS / f"{role}-s{seed}"
    metrics_path = out / "metrics.json"
    command = f"edgekd train {RECIPES[role]} --set seed={seed} --out {out.relative_to(REPO)}"
    if reuse and metrics_path.is_file() and (out / "recipe.yaml").is_file():
        import yaml
        if yaml.safe_load((out / "recipe.yaml").read_text()) == recipe.to_dict():
            print(f"reusing {metrics_path}")
            return record(json.loads(metrics_path.read_text()), command)
    print(f"$ {command}", flush=True)
    run_recipe(recipe, out, log=lambda m: print(f"  [{role} s{seed}] {m}", flush=True))
    return record(json.loads(metrics_path.read_text()), command)


def record(m: dict, command: str) -> dict:
    test = m["test"]
    return {"dataset": m["dataset"], "split": "test", "model": m["model"], "role": m["role"], "name": m["name"],
            "params": m["params"], "macs": m["macs"], **{k: test.get(k) for k in METRICS}, "seed": m["seed"],
            "epochs_run": m["epochs_run"], "seconds_per_epoch": m["seconds_per_epoch"],
            "train_seconds": m["train_seconds"], "command": command}


def merge_records(path: Path, new: list[dict]) -> list[dict]:
    """Replace records with the same (dataset, split, model, role, seed); keep everyone else's."""
    old = json.loads(path.read_text()) if path.is_file() else {}
    records = old.get("records", []) if isinstance(old, dict) else old
    key = lambda r: (r.get("dataset"), r.get("split"), r.get("model"), r.get("role"), r.get("seed"))  # noqa: E731
    fresh = {key(r) for r in new}
    merged = [r for r in records if key(r) not in fresh] + new
    out = dict(old) if isinstance(old, dict) else {}
    out["records"] = merged
    write_json(path, out)
    return merged


def summarize(records: list[dict]) -> dict:
    by_role = {}
    for role in ("student_scratch", "student"):
        rows = [r for r in records if r["role"] == role]
        if not rows:
            continue
        by_role[role] = {k: {"mean": statistics.fmean(r[k] for r in rows),
                             "std": statistics.stdev(r[k] for r in rows) if len(rows) > 1 else 0.0}
                         for k in (*METRICS, "seconds_per_epoch")}
        by_role[role].update(seeds=[r["seed"] for r in rows], params=rows[0]["params"], model=rows[0]["model"])
    out = {"by_role": by_role}
    if "student" in by_role:
        kd = by_role["student"]
        best = max((r for r in records if r["role"] == "student"), key=lambda r: r["auc"])
        out["goals"] = {
            "params<=5M": kd["params"] <= GOALS["params_max"],
            "mean_auc>=.962": kd["auc"]["mean"] >= GOALS["auc"], "mean_acc>=.884": kd["acc"]["mean"] >= GOALS["acc"],
            "stretch_mean_auc>=.991": kd["auc"]["mean"] >= GOALS["stretch_auc"],
            "stretch_mean_acc>=.946": kd["acc"]["mean"] >= GOALS["stretch_acc"],
        }
        out["best_seed_by_auc"] = {k: best[k] for k in ("seed", "acc", "auc")}
    if "student" in by_role and "student_scratch" in by_role:
        gain = {k: 100 * (by_role["student"][k]["mean"] - by_role["student_scratch"][k]["mean"]) for k in METRICS}
        out["kd_gain_pts"] = gain
        out["goals"]["kd_gain>=1pt_acc_or_auc"] = max(gain["acc"], gain["auc"]) >= GOALS["kd_gain_pts"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--phase", choices=["scratch", "kd", "all"], default="all")
    ap.add_argument("--reuse", action="store_true", help="skip runs whose metrics.json matches the recipe")
    args = ap.parse_args()
    os.chdir(REPO)
    roles = {"scratch": ["student_scratch"], "kd": ["student"], "all": ["student_scratch", "student"]}[args.phase]
    new = [run_one(role, seed, args.reuse) for role in roles for seed in args.seeds]
    merged = merge_records(RESULTS / "accuracy.json", new)
    mine = [r for r in merged if r["role"] in ("student", "student_scratch") and r.get("dataset") == "pneumoniamnist"
            and r.get("command", "").startswith("edgekd train recipes/pneumonia/student")]
    summary = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
               "command": "python benchmarks/distill.py " + " ".join(sys.argv[1:]),
               "teacher": "runs/bench/pneumonia/teacher/best.pt", **summarize(mine)}
    write_json(RESULTS / "distill.json", summary)
    print(json.dumps({k: summary[k] for k in summary if k not in ("by_role",)}, indent=2))
    for role, s in summary.get("by_role", {}).items():
        print(f"{role:16s} {s['model']} {s['params'] / 1e6:.2f}M seeds {s['seeds']}: " +
              " ".join(f"{k}={s[k]['mean']:.4f}±{s[k]['std']:.4f}" for k in ("acc", "auc", "f1", "seconds_per_epoch")))


if __name__ == "__main__":
    main()
