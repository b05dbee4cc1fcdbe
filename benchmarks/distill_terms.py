"""Which KD terms help on PneumoniaMNIST: logit KD vs + feature KD vs + attention transfer (and another teacher).

    .venv/bin/python benchmarks/distill_terms.py [--seeds 0] [--reuse] [--variants feature attention] [--train-logit]

Trains recipes/pneumonia/student-feature-28.yaml and student-at-28.yaml (teacher: runs/bench/pneumonia/teacher/best.pt)
and student-r18teacher-28.yaml (logit KD from the ResNet-18 teacher) once per seed into runs/bench/pneumonia/<variant>-s<seed>/ and merges one record per run into
benchmarks/results/accuracy.json. The logit-KD (student-28.yaml) and from-scratch rows are read from accuracy.json
(benchmarks/distill.py writes them; --train-logit trains missing logit-KD seeds here). Writes
benchmarks/results/distill_terms.json and the KD-terms section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

from common import (ACCURACY_KEY, METRICS, REPO, RESULTS, accuracy_record, machine_line, merge_records, plain_runs,
                    refresh_results_md, results_doc, run_main, run_or_reuse)

from edgekd.fileio import write_json
from edgekd.recipe import load_recipe

VARIANTS = {  # variant -> (recipe, run dir prefix, what the loss is)
    "scratch": ("recipes/pneumonia/student-scratch-28.yaml", "student_scratch", "CE only (no teacher)"),
    "logit": ("recipes/pneumonia/student-28.yaml", "student", "0.7 KL(T=4) + 0.3 CE"),
    "logit_r18": ("recipes/pneumonia/student-r18teacher-28.yaml", "student_r18t", "0.7 KL(T=4) + 0.3 CE, ResNet-18 teacher"),
    "feature": ("recipes/pneumonia/student-feature-28.yaml", "student_feature", "logit KD + 0.5 MSE(adapter(stages.2), layer3)"),
    "attention": ("recipes/pneumonia/student-at-28.yaml", "student_at", "logit KD + 500 AT x 3 pairs (stages.0-2 -> layer1-3)"),
}
TRAINED_HERE = ("feature", "attention", "logit_r18")
RUNS = REPO / "runs" / "bench" / "pneumonia"
BEGIN, END = "<!-- distill-terms:begin (benchmarks/distill_terms.py) -->", "<!-- distill-terms:end -->"


def section(result: dict) -> str:
    """The RESULTS.md section from a distill_terms.json document."""
    rows, seeds = result["records"], result["seeds"]
    cols = ("acc", "auc", "f1", "sensitivity", "specificity", "seconds_per_epoch")
    teacher_model = load_recipe(REPO / "recipes/pneumonia/teacher-28.yaml").model.name
    lines = [BEGIN, "## KD terms: logit vs feature vs attention transfer (`benchmarks/distill_terms.py`)", "",
             f"`{result['command'].strip()}` on {result['date'][:10]}, {machine_line(result['machine'])}. PneumoniaMNIST 28 px test "
             f"split; teacher `{result['teacher']}` ({teacher_model}; logit_r18: the ResNet-18 teacher), student "
             f"{rows[0]['model'] if rows else '-'}; seeds {seeds} "
             f"({'one seed: differences of a point or less are within seed noise' if len(seeds) == 1 else 'mean ± std'}). "
             "Seconds per epoch: 1 torch thread, with another training job on the other core.",
             "", "| variant | loss | params | seeds | " + " | ".join(cols) + " |", "|---|---|---:|---|" + "---:|" * len(cols)]
    for r in rows:
        cells = ["-" if r[k]["mean"] is None else (f"{r[k]['mean']:.4f}" + (f" ± {r[k]['std']:.4f}" if len(r["seeds"]) > 1 else ""))
                 for k in cols]
        lines.append(f"| {r['variant']} | {r['loss']} | {r['params'] / 1e6:.2f}M | {r['seeds']} | " + " | ".join(cells) + " |")
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--reuse", action="store_true", help="skip runs whose metrics.json matches the recipe")
    ap.add_argument("--train-logit", action="store_true", help="train logit-KD seeds missing from accuracy.json")
    ap.add_argument("--variants", nargs="*", choices=TRAINED_HERE, default=list(TRAINED_HERE),
                    help="which variants to train now; none: only rebuild the table (it shows every variant in accuracy.json)")
    args = ap.parse_args()
    os.chdir(REPO)
    existing = json.loads((RESULTS / "accuracy.json").read_text()) if (RESULTS / "accuracy.json").is_file() else []
    existing = existing.get("records", []) if isinstance(existing, dict) else existing
    to_train = list(args.variants)
    if args.train_logit:
        have = {r.get("seed") for r in plain_runs(existing, VARIANTS["logit"][0], dataset="pneumoniamnist")}
        to_train += ["logit"] if any(s not in have for s in args.seeds) else []
    new = []
    for variant in to_train:
        recipe, prefix, _ = VARIANTS[variant]
        for seed in args.seeds:
            m, command = run_or_reuse(recipe, RUNS / f"{prefix}-s{seed}", [f"seed={seed}"], args.reuse, f"{variant} s{seed}")
            new.append(accuracy_record(m, command))
    command = "python benchmarks/distill_terms.py " + " ".join(sys.argv[1:])
    merged = merge_records(RESULTS / "accuracy.json", new, "accuracy", command, key=ACCURACY_KEY)
    rows = []
    for variant, (recipe, _, loss) in VARIANTS.items():
        # runs of the variant's recipe with only the seed set (matched by recipe name, kd_gain's 30-epoch runs of the
        # from-scratch recipe had been averaged in as more seeds)
        recs = [r for r in plain_runs(merged, recipe, dataset="pneumoniamnist") if r.get("seed") in args.seeds]
        if not recs:
            continue
        row = {"variant": variant, "recipe": recipe, "loss": loss, "model": recs[0]["model"],
               "params": recs[0]["params"], "seeds": sorted(r["seed"] for r in recs)}
        for k in (*METRICS, "seconds_per_epoch"):
            vals = [r[k] for r in recs if r.get(k) is not None]
            row[k] = {"mean": statistics.fmean(vals) if vals else None,
                      "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
        rows.append(row)
    if not rows:
        raise SystemExit(f"error: no run of seeds {args.seeds} of any variant (trained, or recorded in accuracy.json): "
                         "nothing to summarize, nothing written")
    result = results_doc("distill_terms", command, rows, teacher="runs/bench/pneumonia/teacher/best.pt", seeds=args.seeds)
    write_json(RESULTS / "distill_terms.json", result)
    refresh_results_md()  # the KD-terms section among them (report.py renders it from the file just written)
    for r in rows:
        print(f"{r['variant']:10s} seeds {r['seeds']}: acc {r['acc']['mean']:.4f} auc {r['auc']['mean']:.4f} "
              f"f1 {r['f1']['mean']:.4f} s/epoch {r['seconds_per_epoch']['mean']:.1f}")


if __name__ == "__main__":
    run_main(main)
