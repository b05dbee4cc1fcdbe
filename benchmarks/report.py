"""Regenerate the figures of benchmarks/RESULTS.md from benchmarks/results/*.json, or check that they match.

    .venv/bin/python benchmarks/report.py           # rewrite every generated section from its JSON
    .venv/bin/python benchmarks/report.py --check   # exit 1 and name each section that differs from its JSON

Every section between `<!-- NAME:begin ... -->` and `<!-- NAME:end -->` markers is rendered by the function the
measuring script itself uses (so a re-run and this report write the same text), from the results files alone;
text outside the markers is commentary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable

from common import (METRICS, REPO, RESULTS, existing_path, machine_line, plain_runs, replace_section,  # noqa: E402
                    run_main)

RESULTS_MD = REPO / "benchmarks" / "RESULTS.md"


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _fmt(v, spec=".4f") -> str:
    return "-" if v is None else format(v, spec)


def _mean_std(recs: list[dict], key: str) -> str:
    vals = [r[key] for r in recs if r.get(key) is not None]
    if not vals:
        return "-"
    return f"{statistics.fmean(vals):.4f}" + (f" ± {statistics.stdev(vals):.4f}" if len(vals) > 1 else "")


# --- sections whose JSON has no renderer in its script (hand-copied tables before) ---------------------------------

def accuracy_section(doc: dict) -> str:
    """Teachers and the baseline CNN per dataset vs the MedMNIST v2 paper rows (accuracy.json)."""
    from accuracy import PAPER
    from kd_gain import SETS

    paper = {**{ds: rows for ds, rows in PAPER.items()}, "retinamnist": SETS["retina"]["medmnist"]}
    lines = ["<!-- accuracy:begin (benchmarks/report.py from accuracy.json) -->",
             "## Teacher accuracy vs the MedMNIST v2 paper (`benchmarks/accuracy.py`, `benchmarks/kd_gain.py`)", "",
             "Official test splits of `../shared/data/medmnist/*.npz` (the PneumoniaMNIST train split here is reduced, "
             "see `../shared/data/README.md`); one row per training run, named by its output folder under runs/bench/ "
             "(seed and schedule are in the name; each row's full command is in its record).", ""]
    for ds in sorted({r["dataset"] for r in doc["records"]}):
        recs = [r for r in doc["records"] if r["dataset"] == ds and r["role"] in ("teacher", "baseline")]
        if not recs:
            continue
        lines += [f"### {ds}", "", "| run | model | params | MMACs | test ACC | test AUC | F1 | sensitivity | specificity "
                  "| s/epoch | date | machine |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
        for r in sorted(recs, key=lambda r: r["name"]):
            lines.append(f"| `{run_label(r)}` | {r['model']} | {r['params'] / 1e6:.2f}M | {r['macs'] / 1e6:.1f} | "
                         f"{_fmt(r['acc'])} | {_fmt(r['auc'])} | {_fmt(r.get('f1'))} | {_fmt(r.get('sensitivity'))} | "
                         f"{_fmt(r.get('specificity'))} | {r['seconds_per_epoch']:.1f} | {r['date'][:16]}Z | "
                         f"{machine_line(r['machine'])} |")
        for name, (auc, acc) in paper.get(ds, {}).items():
            lines.append(f"| MedMNIST v2 {name} | | | | {acc} | {auc} | | | | | paper | |")
        lines.append("")
    lines.append("<!-- accuracy:end -->")
    return "\n".join(lines)


def run_label(record: dict) -> str:
    """A ledger record's run as its output folder below runs/bench/ (`demo/scratch24-s1`): the recipe name alone
    (`demo-baseline`) had named 18 rows of other seeds and schedules alike."""
    words = record.get("command", "").split()
    out = words[words.index("--out") + 1] if "--out" in words[:-1] else None
    return out.removeprefix("runs/bench/") if out else record["name"]


def export_section(doc: dict) -> str:
    """Export parity and INT8 accuracy per checkpoint and artifact (export.json)."""
    lines = ["<!-- export:begin (benchmarks/report.py from export.json) -->",
             "## Export parity and INT8 accuracy (`benchmarks/export.py`)", "",
             f"`{doc['command']}` on {doc['date'][:16]}Z, {machine_line(doc['machine'])}; onnxruntime "
             f"{doc['machine'].get('onnxruntime', '?')}, openvino {doc['machine'].get('openvino', '?')}, nncf "
             f"{doc['machine'].get('nncf', '?')}. Profile `{doc['profile']}`. Each artifact vs the PyTorch model it was "
             "exported from, on the whole test split; drops are fractions (0.01 = 1 point; negative = the artifact "
             "scored higher).", "",
             "| model | role | format | precision | max abs diff | top-1 agreement | ACC | AUC | ACC drop | AUC drop "
             "| size (MB) | gate |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in doc["records"]:
        lines.append(f"| {r['model']} | {r['role']} | {r['format']} | {r['precision']} | {r['max_abs_diff']:.2g} | "
                     f"{r['top1_agreement']:.4f} | {r['acc']:.4f} | {r['auc']:.4f} | {r['acc_drop']:.4f} | "
                     f"{r['auc_drop']:.4f} | {r['size_mb']:.3g} | {'pass' if r['export_gate_passed'] else 'FAIL'} |")
    rule = doc["acceptance_rule"]
    lines += ["", f"Acceptance ({', '.join(f'{k} {v}' for k, v in rule.items())}): "
              + "; ".join(f"`{ckpt}` " + ("met" if all(v.values()) else "MISSED: " + ", ".join(k for k, ok in v.items()
                                                                                         if not ok))
                          for ckpt, v in doc["acceptance"].items()) + ".", "", "<!-- export:end -->"]
    return "\n".join(lines)


def distill_section(doc: dict, accuracy: dict, title: str, marker: str) -> str:
    """A distill.py summary (per-role means) and the per-seed accuracy.json records it summarizes, when still there."""
    lines = [f"<!-- {marker}:begin (benchmarks/report.py from {doc['_file']} and accuracy.json) -->", title, "",
             f"`{doc['command']}` on {doc['date'][:16]}Z, {machine_line(doc['machine'])}; teacher `{doc['teacher']}`. "
             "PneumoniaMNIST official test split; mean ± std over seeds.", "",
             "| run | model | params | seeds | " + " | ".join(METRICS) + " | s/epoch |",
             "|---|---|---:|---|" + "---:|" * (len(METRICS) + 1)]
    for r in doc["records"]:
        lines.append(f"| {r['role']} | {r['model']} | {r['params'] / 1e6:.3f}M | {r['seeds']} | "
                     + " | ".join(f"{r[k]['mean']:.4f} ± {r[k]['std']:.4f}" for k in METRICS)
                     + f" | {r['seconds_per_epoch']['mean']:.1f} |")
    gain = doc.get("kd_gain_pts")
    if gain:
        lines += ["", f"KD gain (same seeds {doc['kd_gain_seeds']}): " + ", ".join(f"{k} {v:+.2f} pt" for k, v in gain.items())
                  + ". Goals: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in doc.get("goals", {}).items()) + "."]
    # Per-seed rows: the accuracy.json records of the summarized runs that are still the ones on file (a later
    # benchmark that retrains a recipe replaces its records).
    from distill import RECIPES

    # runs of the summarized recipes with only the seed set (by recipe name, kd_gain's 30-epoch runs had been listed
    # as more seeds)
    seeds = [a for r in doc["records"] for a in plain_runs(accuracy["records"], RECIPES[r["role"]], "pneumoniamnist")
             if a["date"] <= doc["date"]]
    if seeds:
        lines += ["", "| recipe | seed | acc | auc | f1 | sensitivity | specificity | s/epoch |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| `{a['name']}` | {a['seed']} | " + " | ".join(_fmt(a.get(k)) for k in
                  ("acc", "auc", "f1", "sensitivity", "specificity")) + f" | {a['seconds_per_epoch']:.1f} |"
                  for a in sorted(seeds, key=lambda a: (a["name"], a["seed"]))]
    else:
        lines += ["", "The per-seed records of these runs were replaced in accuracy.json by later runs of the same "
                  "recipes (see the kd-gain section); the means above are this summary's own."]
    lines += ["", f"<!-- {marker}:end -->"]
    return "\n".join(lines)


def continual_section(docs: list[dict]) -> str:
    import continual

    lines = ["<!-- continual:begin (benchmarks/report.py from continual*.json) -->",
             "## Continual learning (`benchmarks/continual.py`)", ""]
    for doc in docs:
        lines.append(f"- `{doc['benchmark']}` ({doc['_file']}): `{doc['command']}`, {doc['started'][:16]}Z–"
                     f"{doc['date'][11:16]}Z, {machine_line(doc['machine'])}")
    records = [r for doc in docs for r in doc["records"]]
    lines += ["", continual.markdown(records, continual.goals(records)), "", "<!-- continual:end -->"]
    return "\n".join(lines)


def continual_docs() -> list[dict]:
    """The continual results files that exist: one per cross-domain pair, then the class-incremental one."""
    names = ["continual.json", "continual_pneumonia_fashion.json", "continual_class_incremental.json"]
    return [{**load(n), "_file": n} for n in names if (RESULTS / n).is_file()]


# --- the registry: marker -> (results files, renderer) -------------------------------------------------------------

def sections() -> dict[str, tuple[tuple[str, str], Callable[[], str]]]:
    import calibration
    import distill_terms
    import export_time
    import fusion
    import hostile
    import kd_gain
    import latency
    import latency_runtime
    import pareto
    import robustness
    import serve
    import zoo

    def with_file(name):
        return {**load(name), "_file": name}

    ok_zoo = lambda: {**load("zoo.json"), "records": [r for r in load("zoo.json")["records"] if "bench" in r]}  # noqa: E731
    out = {
        "accuracy": (("<!-- accuracy:begin", "<!-- accuracy:end -->"), lambda: accuracy_section(load("accuracy.json"))),
        "export": (("<!-- export:begin", "<!-- export:end -->"), lambda: export_section(load("export.json"))),
        "distill": (("<!-- distill:begin", "<!-- distill:end -->"),
                    lambda: distill_section(with_file("distill.json"), load("accuracy.json"),
                                            "## Distillation on PneumoniaMNIST (`benchmarks/distill.py`)", "distill")),
        "distill-micro": (("<!-- distill-micro:begin", "<!-- distill-micro:end -->"),
                          lambda: distill_section(with_file("distill_micro.json"), load("accuracy.json"),
                                                  "### A smaller student: `edgekd_cnn_micro` (`distill.py --student micro`)",
                                                  "distill-micro")),
        "continual": (("<!-- continual:begin", "<!-- continual:end -->"),
                      lambda: continual_section(continual_docs())),
        "distill-terms": ((distill_terms.BEGIN, distill_terms.END), lambda: distill_terms.section(load("distill_terms.json"))),
        "robustness": ((robustness.BEGIN, robustness.END), lambda: robustness.section(load("robustness.json"))),
        "pareto": ((pareto.BEGIN, pareto.END), lambda: pareto.section(load("pareto.json"))),
        "zoo": (("<!-- zoo:begin -->", "<!-- zoo:end -->"), lambda: zoo.markdown(ok_zoo())),
        "hostile": (hostile.MARKERS, lambda: hostile.section(load("hostile.json"))),
        "latency": (latency.MARKERS, lambda: latency.section(load("latency.json"))),
        "latency-runtime": (latency_runtime.MARKERS, lambda: latency_runtime.section(load("latency.json"))),
    }
    if (RESULTS / "calibration.json").is_file():
        out["calibration"] = (calibration.MARKERS, lambda: calibration.section(load("calibration.json")))
    if (RESULTS / "export_time.json").is_file():
        out["export-time"] = (export_time.MARKERS, lambda: export_time.section(load("export_time.json")))
    if (RESULTS / "fusion.json").is_file():
        out["fusion"] = (fusion.MARKERS, lambda: fusion.section(load("fusion.json")))
    if (RESULTS / "serve.json").is_file():
        out["serve"] = (serve.MARKERS, lambda: serve.section(load("serve.json")))
    for name in kd_gain.SETS:
        if (RESULTS / f"distill_{name}.json").is_file():
            out[f"kd-gain:{name}"] = (kd_gain.markers(name), lambda n=name: kd_gain.markdown(n, load(f"distill_{n}.json")))
    return out


def current(text: str, begin: str, end: str) -> str | None:
    """The section of `text` from the line starting with `begin` through `end`, or None."""
    if begin not in text or end not in text:
        return None
    start = text.index(begin)
    return text[start:text.index(end, start) + len(end)]


def render(text: str) -> tuple[str, list[str]]:
    """(RESULTS.md with every section regenerated, names of the sections that changed)."""
    changed = []
    for name, ((begin, end), make) in sections().items():
        new = make()
        old = current(text, begin, end)
        if old != new:
            changed.append(name)
            text = text.replace(old, new) if old is not None else replace_section(text, new, begin, end)
    return text, changed


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 when a section differs from its JSON")
    ap.add_argument("--results-md", type=existing_path, default=str(RESULTS_MD), help="the RESULTS.md to render or check")
    args = ap.parse_args(argv)
    text, changed = render(args.results_md.read_text())
    if args.check:
        for name in changed:
            print(f"{args.results_md.name}: section '{name}' differs from its JSON (run benchmarks/report.py)")
        return 1 if changed else 0
    from edgekd.fileio import write_text

    write_text(args.results_md, text)
    print(f"regenerated {len(changed)} section(s): {', '.join(changed) or 'none changed'}")
    return 0


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
