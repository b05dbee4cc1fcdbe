"""The CLI's rich tables: metrics, continual accuracy matrix, corruption robustness, export parity, predictions."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table as RichTable

from edgekd.cli.console import console
from edgekd.errors import printable


def metrics_table(title: str, rows: list[dict], keys=("acc", "balanced_acc", "auc", "f1", "sensitivity",
                                                    "specificity", "ppv", "pr_auc", "pauc")) -> RichTable:
    table = RichTable(title=escape(title))  # titles name paths, which may hold [brackets]
    table.add_column("model")
    table.add_column("split")
    for k in keys:
        table.add_column({"f1": "f1 (macro)"}.get(k, k), justify="right")
    for r in rows:
        table.add_row(escape(str(r["model"])), escape(str(r["split"])), *[_fmt(r.get(k)) for k in keys])
    positives = sorted({str(r["positive_class"]) for r in rows if r.get("positive_class")})
    if positives and {"sensitivity", "specificity"} & set(keys):  # which class a two-class row's figures are of
        table.caption = escape(f"sensitivity, specificity, ppv, pr_auc, pauc: positive class "
                               f"{', '.join(positives)} (data.positive_class)")
    return table


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "-" if v != v else f"{v:.4f}"  # undefined (AUC on a split without every class), as the warnings say
    return str(v)


def continual_table(title: str, result) -> RichTable:
    """Accuracy after each task (rows) on each task (columns), then average accuracy, forgetting, BWT."""
    s = result.summary
    table = RichTable(title=escape(f"{title}: {s['method']}{' + BN freeze' if s['bn_freeze'] else ''}, "
                                   f"{s['head']} head ({s['eval_split']} accuracy)"))
    table.add_column("after task")
    for name in result.task_names:
        table.add_column(escape(name), justify="right")
    table.add_column("avg", justify="right")
    for i, (name, row) in enumerate(zip(result.task_names, result.acc_matrix)):
        avg = sum(row[: i + 1]) / (i + 1)
        table.add_row(escape(name), *[_fmt(v) if j <= i else "" for j, v in enumerate(row)], _fmt(avg))
    kept = s["retention_first_task"]
    kept = (f"{kept:.1%}" if isinstance(kept, (int, float)) and kept == kept  # NaN (or null read back from JSON):
            else f"n/a (task {escape(result.task_names[0])} had no accuracy to keep: 0 or unscored right after it "
                 "was learned)")
    table.caption = (f"avg acc {_fmt(s['avg_acc'])} · forgetting {_fmt(s['forgetting'])} · BWT {_fmt(s['bwt'])} · "
                     f"first-task retention {kept}")
    return table


def robustness_table(summary: list[dict], title: str) -> RichTable:
    names = list(summary[0]["per_corruption_acc"]) if summary else []
    table = RichTable(title=escape(title))
    # AUC beside accuracy, as robustness.md has it: a student whose accuracy held (99.7% of clean) had lost AUC
    # 0.907 -> 0.755 with only the accuracy on the console
    for col in ("model", "format", "clean acc", "clean AUC", *names, "mean corr. acc", "mean corr. AUC",
                "rel. to clean (acc)"):
        table.add_column(col.replace("_", " "), justify="left" if col in ("model", "format") else "right")
    for r in summary:
        table.add_row(escape(f"{r['model']} ({r['role']})"), f"{r['format']}/{r['precision']}", _fmt(r["clean_acc"]),
                      _fmt(r["clean_auc"]), *[_fmt(r["per_corruption_acc"][n]) for n in names],
                      _fmt(r["mean_corruption_acc"]), _fmt(r["mean_corruption_auc"]),
                      "-" if r["relative_acc"] != r["relative_acc"] else f"{r['relative_acc']:.1%}")  # as the .md
    return table


def parity_table(title: str, result) -> RichTable:
    """An export's parity table: PyTorch, then every artifact (size, differences, metrics, result)."""
    from edgekd.export import metric_subset_reference  # the torch side: only export and update print this table

    split = result.parity["metric_split"]
    table = RichTable(title=escape(f"{title}: parity with PyTorch ({result.parity['inputs']} inputs)"))
    for col in ("format", "precision", "size MB", "max abs diff", "mean abs diff", "top-1 agree",
                f"{split} acc", "test acc", "test auc", "result"):
        table.add_column(col, justify="left" if col in ("format", "precision", "result") else "right")
    sizes = {a["path"]: a["size_mb"] for a in result.metadata["artifacts"]}
    ref = result.parity["reference"]["metrics"]
    table.add_row("pytorch", "fp32", "-", "-", "-", "-", _fmt(ref[split].get("acc")), _fmt(ref["test"].get("acc")),
                  _fmt(ref["test"].get("auc")), "reference")
    subset = metric_subset_reference(result.parity)  # --metric-images: the artifacts' rows are on these images
    if subset:
        table.add_row("pytorch (subset)", "fp32", "-", "-", "-", "-", _fmt(subset[split].get("acc")),
                      _fmt(subset["test"].get("acc")), _fmt(subset["test"].get("auc")), "reference")
    for r in result.parity["artifacts"]:
        metrics = r.get("metrics", {})
        table.add_row(r["format"], r["precision"], f"{sizes[r['path']]:.3f}" if r["path"] in sizes else "-",
                      *("-" if r.get(k) is None else f"{r[k]:.2e}" for k in ("max_abs_diff", "mean_abs_diff")),
                      "-" if r.get("top1_agreement") is None else f"{r['top1_agreement']:.2%}",
                      _fmt(metrics.get(split, {}).get("acc")), _fmt(metrics.get("test", {}).get("acc")),
                      _fmt(metrics.get("test", {}).get("auc")), "pass" if r["passed"] else "[red]dropped[/]")
    for r in result.parity.get("dropped", []):
        console.print(f"[yellow]not shipped:[/] {r['format']}/{r['precision']}: {escape('; '.join(r['failures']))}")
    for r in result.parity.get("too_slow", []):
        console.print(f"[yellow]not shipped:[/] {r['format']}/{r['precision']}: {escape(r['reason'])}")
    return table


def model_run(runner, precision: str) -> str:
    """`onnx fp32`, and `on openvino` when another runtime than the format's own runs it (the title had said onnx
    while OpenVINO ran the file)."""
    backend = runner.info.get("backend", runner.info["format"])
    return f"{runner.info['format']} {precision}" + ("" if backend == runner.info["format"] else f" on {backend}")


def task_predictions_table(title: str, runner, results: list) -> RichTable:
    """A multi-head bundle's predictions, every task's label and probability side by side."""
    from edgekd.runtime import Failure

    table = RichTable(title=escape(f"{title}: {model_run(runner, runner.precision)}, one head per task"))
    table.add_column("file")
    for name, _ in runner.tasks:
        table.add_column(escape(f"{name} label"))  # task and class names are the user's: no rich markup
        table.add_column(escape(f"{name} prob"), justify="right")
    for r in results:
        cells = (["[red]error[/]", "-"] * len(runner.tasks) if isinstance(r, Failure) else
                 [c for name, _ in runner.tasks for c in (escape(r.tasks[name].label), f"{r.tasks[name].prob:.4f}")])
        table.add_row(escape(printable(r.source)), *cells)
    return table


def predictions_table(title: str, runner, results: list, precision: str, tta_option) -> RichTable:
    """One row per image: label, probability (and uncalibrated), every class's probability."""
    from edgekd.runtime import Failure

    names = runner.class_names
    views = runner.tta_views.names if tta_option else []  # spaced in the title: rot+15 holds a '+'
    calibrated = runner.temperature != 1.0 or runner.bias is not None
    rule = (f", label: p({names[runner.positive]}) >= {runner.threshold:.6g}" if runner.threshold is not None
            else "")  # 6 significant digits: a 0.99999 threshold is not shown as 1.0000
    table = RichTable(title=escape(f"{title}: {model_run(runner, precision)}"
                                   + (f", task {runner.task}" if runner.task else "")
                                   + (f", TTA of {len(views)} views ({' '.join(views)})" if tta_option else "")
                                   + (f", calibrated (T={runner.temperature:.3g}{', Platt' if runner.bias else ''})"
                                      if calibrated else "") + rule))
    raw_cols = ["p(label) uncal."] if calibrated else []  # every class's uncalibrated probability: --out
    for col in ("file", "label", "p(label)", *raw_cols, *names):
        table.add_column(escape(col), justify="left" if col in ("file", "label") else "right")
    for r in results:
        if isinstance(r, Failure):
            table.add_row(escape(printable(r.source)), "[red]error[/]", "-", *["-"] * (len(raw_cols) + len(names)))
        else:
            raw = [f"{r.raw_probs[r.index]:.4f}"] if r.raw_probs is not None else ["-"] * len(raw_cols)
            table.add_row(escape(printable(r.source)), escape(r.label), f"{r.prob:.4f}", *raw,
                          *[f"{p:.4f}" for p in r.probs])
    return table
