"""Acceptance benchmark of continual learning: cross-domain retention (2 KD paths x finetune/EWC/LwF x BN freeze,
per task pair and student) and 5-task class-incremental Split Fashion-MNIST (finetune, rehearsal(200)+KD, joint).

    .venv/bin/python benchmarks/continual.py [--only cross_domain|class_incremental] [--pair retina-pneumonia]
                                             [--students cnn mobilenetv3] [--seeds 0 1 2] [--joint] [--single-head]
                                             [--force] [--set key=value ...]

Runs the recipes in recipes/continual/ through the same pipeline as `edgekd train` (outputs in
runs/continual/...; a run whose continual.json exists is reused unless --force). A pair's teacher and starting
students are trained first from its recipes when their best.pt is missing. Cross-domain records go to one file per
pair (retina-pneumonia: benchmarks/results/continual.json; pneumonia-fashion: continual_pneumonia_fashion.json),
class-incremental ones to continual_class_incremental.json, each with the command that made them; PNG plots beside.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import machine as common_machine, results_doc, run_main  # noqa: E402
from edgekd.fileio import write_json  # noqa: E402
from edgekd.pipeline import run_recipe  # noqa: E402
from edgekd.recipe import load_recipe  # noqa: E402

RECIPES = REPO / "recipes" / "continual"
RUNS = REPO / "runs" / "continual"
RESULTS = REPO / "benchmarks" / "results"
KD_PATHS = ("logit", "feature")
CROSS_METHODS = ("finetune", "ewc", "lwf")
CLASS_IL_FILE = RESULTS / "continual_class_incremental.json"
CLASS_IL_METHODS = {"finetune": "finetune", "replay-kd": "rehearsal(200)+kd", "joint": "joint"}


@dataclass(frozen=True)
class Pair:
    """A cross-domain task pair: its recipe folder, tasks, results file, teacher and starting-student recipes."""

    name: str
    task_a: str
    task_b: str
    results: Path
    students: dict[str, list[str]]  # student -> recipe overrides of the pair's (CNN) method recipes
    student_recipes: Path  # folder of <student>-<kd>-kd.yaml
    student_runs: Path  # runs/... folder of the distilled starting students
    teacher_recipe: Path | None = None
    teacher_run: Path | None = None


PAIRS = {
    "retina-pneumonia": Pair(
        "retina-pneumonia", "retinamnist", "pneumoniamnist", RESULTS / "continual.json",
        {"cnn": [], "mobilenetv3": ["data.image_size=64", "model.name=mobilenetv3_large_100"]},
        RECIPES / "retina-pneumonia" / "students", RUNS / "retina-students",
        RECIPES / "retina-pneumonia" / "teacher-28.yaml", RUNS / "retina-teacher"),
    "pneumonia-fashion": Pair(
        "pneumonia-fashion", "pneumoniamnist", "fashion_mnist", RESULTS / "continual_pneumonia_fashion.json",
        {"cnn": []}, RECIPES / "students", RUNS / "students"),
}


def machine() -> dict:
    import torch

    return common_machine(torch_threads=torch.get_num_threads(), platform=platform.platform(),
                          load_avg_at_start=[round(v, 2) for v in os.getloadavg()])


def run(recipe_path: Path, out: Path, overrides: list[str], force: bool) -> dict:
    """Run one continual recipe (or reuse its continual.json) and return the summary."""
    summary_file = out / "continual.json"
    if summary_file.is_file() and not force:
        print(f"reuse {summary_file}")
        return json.loads(summary_file.read_text())
    print(f"run {recipe_path.relative_to(REPO)} -> {out.relative_to(REPO)}", flush=True)
    recipe = load_recipe(recipe_path, overrides)
    result = run_recipe(recipe, out, log=lambda s: print("  " + s, flush=True))
    return json.loads(json.dumps(result.summary, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def seeded(name: str, seed: int) -> str:
    """A run directory name: seed 0 is the recipe's own run (no suffix), other seeds get `-s<seed>`."""
    return name + (f"-s{seed}" if seed else "")


def student_dir(pair: Pair, student: str, kd: str, seed: int) -> Path:
    """The starting student of a KD path for a seed."""
    return pair.student_runs / seeded(f"{student}-{kd}-kd", seed)


def ensure_students(pair: Pair, students: tuple[str, ...], force: bool, seeds: tuple[int, ...] = (0,),
                    student_seeds: dict[str, tuple[int, ...]] | None = None) -> None:
    """Train the pair's teacher (seed 0) and distil each starting student per seed where its best.pt is missing."""
    log = lambda s: print("  " + s, flush=True)  # noqa: E731
    if pair.teacher_recipe and (force or not (pair.teacher_run / "best.pt").is_file()):
        print(f"train the {pair.name} teacher -> {pair.teacher_run.relative_to(REPO)}", flush=True)
        run_recipe(load_recipe(pair.teacher_recipe), pair.teacher_run, log=log)
    for seed in seeds:
        for student in (st for st in students if seed in (student_seeds or {}).get(st, seeds)):
            for kd in KD_PATHS:
                out = student_dir(pair, student, kd, seed)
                if (out / "best.pt").is_file() and not force:
                    continue
                print(f"distil the {student} {kd}-KD student (seed {seed}) -> {out.relative_to(REPO)}", flush=True)
                recipe = load_recipe(pair.student_recipes / f"{student}-{kd}-kd.yaml", [f"seed={seed}"] if seed else [])
                run_recipe(recipe, out, log=log)


def cross_domain(pair: Pair, students: tuple[str, ...], overrides: list[str], force: bool,
                 seeds: tuple[int, ...] = (0,), joint: bool = False,
                 student_seeds: dict[str, tuple[int, ...]] | None = None) -> list[dict]:
    """Every student x KD path x method x BN freeze cell, per seed (seed N > 0 re-distils the student with seed N
    and runs task B with seed N: runs/continual/<pair>/<student>-<cell>-sN); `joint`: the upper bound per student
    (logit-KD start)."""
    records, student_seeds = [], student_seeds or {}
    for seed, student, kd in ((s, st, kd) for s in seeds for st in students for kd in KD_PATHS
                              if s in student_seeds.get(st, seeds)):
        cells = [(m, bn) for m in CROSS_METHODS for bn in (False, True)] + ([("joint", False)] if joint and kd == "logit" else [])
        for method, bn in cells:
            stem = "joint" if method == "joint" else f"{kd}-{method}" + ("-bnfreeze" if bn else "")
            out = RUNS / pair.name / seeded(stem if student == "cnn" and pair.name == "pneumonia-fashion"
                                            else f"{student}-{stem}", seed)
            start = student_dir(pair, student, kd, seed) / "best.pt"
            default = student == "cnn" and seed == 0 and pair.name == "pneumonia-fashion"
            extra = [] if default else [f"seed={seed}", f"continual.checkpoint={start}", *pair.students[student]]
            s = run(RECIPES / pair.name / f"{stem}.yaml", out, [*overrides, *extra], force)
            records.append(cross_record(s, pair, student, kd, method, bn, seed, out))
    return records


def cross_record(s: dict, pair: Pair, student: str, kd: str, method: str, bn: bool, seed: int, out: Path) -> dict:
    """One cross-domain run's record from its continual summary (task A = row/column 0, task B = 1)."""
    acc = np.asarray(s["acc_matrix"], dtype=float)
    f1 = np.asarray(s["f1_matrix"], dtype=float)
    return {
        "scenario": "cross_domain", "pair": pair.name, "student": student, "task_a": pair.task_a,
        "task_b": pair.task_b, "kd": kd, "method": method, "bn_freeze": bn, "head": s["head"], "seed": seed,
        "task_a_before": acc[0, 0], "task_a_after": acc[1, 0],
        "retention": acc[1, 0] / acc[0, 0], "task_b_acc": acc[1, 1], "task_b_f1": f1[1, 1],
        "task_a_f1_before": f1[0, 0], "task_a_f1_after": f1[1, 0],
        "eval_split": s["eval_split"], "run": str(out.relative_to(REPO)),
    }


def cell_means(records: list[dict], head: str = "multi") -> list[dict]:
    """Cross-domain records averaged over seeds per (pair, student, KD path, method, BN freeze), with the seeds'
    population std (ddof=0, as every recorded cross_domain_means holds; the tables say so)."""
    cells: dict[tuple, list[dict]] = {}
    for r in records:
        if r["scenario"] == "cross_domain" and r["head"] == head:
            cells.setdefault((r["pair"], r["student"], r["kd"], r["method"], r["bn_freeze"]), []).append(r)
    out = []
    for (pair, student, kd, method, bn), rs in cells.items():
        keys = ("task_a_before", "task_a_after", "retention", "task_b_acc", "task_b_f1")
        mean = {k: float(np.mean([r[k] for r in rs])) for k in keys}
        std = {f"{k}_std": float(np.std([r[k] for r in rs])) for k in keys}
        out.append({"pair": pair, "student": student, "kd": kd, "method": method, "bn_freeze": bn, "head": head,
                    "task_a": rs[0]["task_a"], "task_b": rs[0]["task_b"], "seeds": [r.get("seed", 0) for r in rs],
                    **mean, **std})
    return out


def cross_domain_single_head(pair: Pair, students: tuple[str, ...], overrides: list[str], force: bool) -> list[dict]:
    """The same cross-domain runs with one expanded head and no task id at test (logit-KD path, seed 0)."""
    records = []
    for student in students:
        for method, bn in ((m, bn) for m in CROSS_METHODS for bn in (False, True)):
            stem = f"logit-{method}" + ("-bnfreeze" if bn else "")
            out = RUNS / f"{pair.name}-single-head" / (stem if student == "cnn" else f"{student}-{stem}")
            start = student_dir(pair, student, "logit", 0) / "best.pt"
            extra = [f"continual.checkpoint={start}", *pair.students[student]]
            s = run(RECIPES / pair.name / f"{stem}.yaml", out, [*overrides, "continual.head=single", *extra], force)
            records.append(cross_record(s, pair, student, "logit", method, bn, 0, out))
    return records


def class_incremental(overrides: list[str], force: bool) -> list[dict]:
    records = []
    for stem, method in CLASS_IL_METHODS.items():
        s = run(RECIPES / "split-fashion" / f"{stem}.yaml", RUNS / "split-fashion" / stem, overrides, force)
        acc = np.asarray(s["acc_matrix"], dtype=float)
        records.append({
            "scenario": "class_incremental", "dataset": "split_fashion_mnist_5x2", "method": method,
            "final_avg_acc": s["avg_acc"], "forgetting": s["forgetting"], "bwt": s["bwt"],
            "acc_matrix": [[None if np.isnan(v) else float(v) for v in row] for row in acc],
            "avg_acc_per_step": [float(np.mean(acc[i, : i + 1])) for i in range(len(acc))],
            "last_task_share": 1.0 / len(acc), "eval_split": s["eval_split"],
            "run": str((RUNS / "split-fashion" / stem).relative_to(REPO)),
        })
    return records


def goals(records: list[dict]) -> list[dict]:
    """The acceptance checks of the issues, each with the figures it compares."""
    out = []
    cross = cell_means(records)
    for pair, student, kd in sorted({(r["pair"], r["student"], r["kd"]) for r in cross}):
        mine = [r for r in cross if (r["pair"], r["student"], r["kd"]) == (pair, student, kd)]
        ft = next((r for r in mine if r["method"] == "finetune" and not r["bn_freeze"]), None)
        for method in ("ewc", "lwf"):
            r = next((r for r in mine if r["method"] == method and r["bn_freeze"]), None)
            if r is None or ft is None:
                continue
            gap = ft["task_b_acc"] - r["task_b_acc"]
            out.append({"goal": f"{pair}, {student}, {kd} KD, {method} + BN freeze: retention >= 0.99 and task-B acc "
                                f"within 2 pt of fine-tuning (mean of {len(r['seeds'])} seed(s))",
                        "retention": r["retention"], "task_b_gap_pt": 100 * gap,
                        "met": bool(r["retention"] >= 0.99 and gap <= 0.02)})
    cil = {r["method"]: r for r in records if r["scenario"] == "class_incremental"}
    if "rehearsal(200)+kd" in cil and "joint" in cil:
        ratio = cil["rehearsal(200)+kd"]["final_avg_acc"] / cil["joint"]["final_avg_acc"]
        out.append({"goal": "rehearsal(200)+KD final avg acc >= 0.8 x joint", "ratio": ratio, "met": bool(ratio >= 0.8)})
    if "finetune" in cil:
        ft = cil["finetune"]
        out.append({"goal": "fine-tune shows forgetting (final avg near the last task's share)",
                    "final_avg_acc": ft["final_avg_acc"], "forgetting": ft["forgetting"],
                    "last_task_share": ft["last_task_share"], "met": bool(ft["forgetting"] > 0.3)})
    return out


def plot_cross_domain(cross: list[dict], path: Path) -> Path:
    """Retention and task-B accuracy per cell of one pair (bars; blue: BN frozen)."""
    from edgekd.metrics.plots import plt, save_figure

    fig, axes = plt.subplots(1, 2, figsize=(max(11, 0.5 * len(cross)), 4))
    labels = ["\n".join([r["student"], r["kd"], r["method"]] + (["+BN frz"] if r["bn_freeze"] else [])) for r in cross]
    x = np.arange(len(cross))
    colors = ["C0" if r["bn_freeze"] else "C7" for r in cross]
    axes[0].bar(x, [100 * r["retention"] for r in cross], yerr=[100 * r["retention_std"] for r in cross], color=colors)
    axes[0].axhline(99, color="r", ls="--", lw=1, label="99% goal")
    axes[0].set_ylabel(f"task-A ({cross[0]['task_a']}) retention %")
    axes[0].set_ylim(min(50, min(100 * r["retention"] for r in cross) - 5), 105)
    axes[1].bar(x, [100 * r["task_b_acc"] for r in cross], yerr=[100 * r["task_b_acc_std"] for r in cross], color=colors)
    axes[1].set_ylabel(f"task-B ({cross[0]['task_b']}) acc %")
    axes[1].set_ylim(50, 100)
    for ax in axes:
        ax.set_xticks(x, labels, fontsize=6)
    axes[0].legend()
    n_seeds = max(len(r["seeds"]) for r in cross)
    fig.suptitle(f"Cross-domain {cross[0]['task_a']} -> {cross[0]['task_b']} (multi-head; blue: BN frozen"
                 + (f"; mean of {n_seeds} seeds" if n_seeds > 1 else "") + ")")
    return save_figure(fig, path)


def plot(records: list[dict]) -> list[Path]:
    from edgekd.metrics.plots import plt, save_figure

    paths = []
    cross = cell_means(records)
    for pair in sorted({r["pair"] for r in cross}):
        name = "continual_cross_domain" + ("" if pair == "pneumonia-fashion" else f"_{pair.replace('-', '_')}")
        paths.append(plot_cross_domain([r for r in cross if r["pair"] == pair], RESULTS / f"{name}.png"))
    cil = [r for r in records if r["scenario"] == "class_incremental"]
    if cil:
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in cil:
            steps = np.arange(1, len(r["avg_acc_per_step"]) + 1)
            ax.plot(steps, r["avg_acc_per_step"], marker="o", label=r["method"])
        ax.plot(steps, 1.0 / steps, "k:", label="last task's share (1/t)")
        ax.set_xlabel("after task"), ax.set_ylabel("average accuracy over tasks seen")
        ax.set_ylim(0, 1.02), ax.grid(alpha=0.3), ax.legend()
        ax.set_title("Split Fashion-MNIST, class-incremental (5 x 2 classes)")
        paths.append(save_figure(fig, RESULTS / "continual_class_incremental.png"))
    return paths


def cross_table(cross: list[dict], head: str) -> list[str]:
    """One markdown table of a pair's cells (mean ± std over seeds)."""
    pm = lambda r, k, f="{:.4f}": f.format(r[k]) + (f" ± {f.format(r[k + '_std'])}" if len(r["seeds"]) > 1 else "")  # noqa: E731
    seeds = sorted({s for r in cross for s in r["seeds"]})
    lines = [f"{cross[0]['task_a']} -> {cross[0]['task_b']}, {head}-head, seeds: {seeds}"
             + (" (mean ± population std over seeds, numpy's ddof=0; the kd-gain and distill tables give the sample "
                "std, ddof=1)" if len(seeds) > 1 else ""),
             "| student | KD | method | BN freeze | task A before | task A after | retention | task B acc | task B F1 |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in cross:
        lines.append(f"| {r['student']} | {r['kd']} | {r['method']} | {'yes' if r['bn_freeze'] else 'no'} | "
                     f"{pm(r, 'task_a_before')} | {pm(r, 'task_a_after')} | {100 * r['retention']:.1f}%"
                     + (f" ± {100 * r['retention_std']:.1f}" if len(r["seeds"]) > 1 else "")
                     + f" | {pm(r, 'task_b_acc')} | {pm(r, 'task_b_f1')} |")
    return lines + [""]


def markdown(records: list[dict], checks: list[dict]) -> str:
    lines = []
    for head in ("multi", "single"):
        cross = cell_means(records, head)
        for pair in sorted({r["pair"] for r in cross}, reverse=True):
            lines += cross_table([r for r in cross if r["pair"] == pair], head)
    cil = [r for r in records if r["scenario"] == "class_incremental"]
    if cil:
        lines += ["| method | final avg acc | forgetting | BWT | avg acc after each task |", "|---|---:|---:|---:|---|"]
        for r in cil:
            lines.append(f"| {r['method']} | {r['final_avg_acc']:.4f} | {r['forgetting']:.4f} | {r['bwt']:.4f} | "
                         + " / ".join(f"{v:.3f}" for v in r["avg_acc_per_step"]) + " |")
        lines.append("")
    for c in checks:
        lines.append(f"- {'MET' if c['met'] else 'NOT MET'}: {c['goal']} — "
                     + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in c.items()
                                 if k not in ("goal", "met")))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["cross_domain", "class_incremental"])
    ap.add_argument("--pair", choices=sorted(PAIRS), default="pneumonia-fashion",
                    help="Cross-domain task pair (default: the first one measured, so its recorded command re-runs it).")
    ap.add_argument("--students", nargs="+", default=None, help="Starting students (default: all of the pair's).")
    ap.add_argument("--force", action="store_true", help="Re-run even when a run's continual.json exists.")
    ap.add_argument("--joint", action="store_true", help="Also run joint training (the upper bound) per student.")
    ap.add_argument("--single-head", action="store_true",
                    help="Also run the cross-domain recipes with one expanded head and no task id (logit-KD path).")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="Recipe override for every run.")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="Cross-domain seeds (student distillation and task B); the tables and goals use the mean.")
    ap.add_argument("--student-seeds", nargs="+", default=[], metavar="STUDENT=S,S",
                    help="Fewer seeds for a slow student, e.g. mobilenetv3=0 (a subset of --seeds).")
    args = ap.parse_args()
    pair = PAIRS[args.pair]
    students = tuple(args.students or pair.students)
    unknown = set(students) - set(pair.students)
    if unknown:
        ap.error(f"--students: {sorted(unknown)} not among {sorted(pair.students)} for {pair.name}")
    student_seeds = {}
    for item in args.student_seeds:
        name, _, seeds = item.partition("=")
        if name not in students or not all(s.strip().isdigit() for s in seeds.split(",")):
            ap.error(f"--student-seeds {item}: give STUDENT=S,S with a student of {list(students)} and integer seeds")
        student_seeds[name] = tuple(int(s) for s in seeds.split(","))
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    info = machine()
    records = []
    if args.only in (None, "cross_domain"):
        ensure_students(pair, students, False, tuple(args.seeds), student_seeds)
        records += cross_domain(pair, students, args.overrides, args.force, tuple(args.seeds), args.joint,
                                student_seeds)
        if args.single_head:
            records += cross_domain_single_head(pair, students, args.overrides, args.force)
    if args.only in (None, "class_incremental"):
        records += class_incremental(args.overrides, args.force)  # from scratch: no teacher or student needed
    # One file per pair / scenario, each holding the records of the command that wrote it.
    env = [f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"] if "OMP_NUM_THREADS" in os.environ else []
    command = " ".join([*env, "python", "benchmarks/continual.py", *sys.argv[1:]])
    for scenario, out_file in (("cross_domain", pair.results), ("class_incremental", CLASS_IL_FILE)):
        mine = [r for r in records if r["scenario"] == scenario]
        if mine:
            extra = {"cross_domain_means": cell_means(mine)} if scenario == "cross_domain" else {}
            write_json(out_file, results_doc(f"continual/{scenario}", command, mine, info, started=started,
                                             overrides=args.overrides, goals=goals(mine), **extra))
            print(f"wrote {out_file.relative_to(REPO)}")
    files = [p.results for p in PAIRS.values()] + [CLASS_IL_FILE]
    records = [r for f in files if f.is_file() for r in json.loads(f.read_text())["records"]]
    plot(records)
    print(markdown(records, goals(records)))


if __name__ == "__main__":
    run_main(main)
