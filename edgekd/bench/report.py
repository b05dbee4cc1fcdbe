"""Benchmark records as a markdown table, a rich terminal table and a throughput chart (PNG)."""

from __future__ import annotations

from pathlib import Path

COLUMNS = (  # (header, record key, format)
    ("model", "model", "{}"), ("role", "role", "{}"), ("format", "format", "{}"), ("precision", "precision", "{}"),
    ("variant", "variant", "{}"), ("batch", "batch", "{}"), ("p50 ms", "p50_ms", "{:.3f}"),
    ("p90 ms", "p90_ms", "{:.3f}"), ("p99 ms", "p99_ms", "{:.3f}"), ("img/s", "throughput", "{:.1f}"),
    ("params M", "params", "params"), ("MMACs", "macs", "macs"), ("size MB", "size_mb", "{:.2f}"),
    ("RSS MB", "peak_rss_mb", "{:.0f}"), ("1st call ms", "first_call_ms", "{:.1f}"), ("acc", "acc", "{:.4f}"),
    ("auc", "auc", "{:.4f}"), ("% GEMM peak", "gemm_peak_fraction", "pct"),
)


OPTIONAL_KEYS = ("first_call_ms",)
"""Columns shown only when a record has them (results recorded before the key existed leave them out)."""


def shown_columns(records: list[dict]) -> list[tuple[str, str, str]]:
    return [c for c in COLUMNS if c[1] not in OPTIONAL_KEYS or any(r.get(c[1]) is not None for r in records)]


GEMM_SPREAD = 1.5
"""Before/after GEMM peaks further apart than this factor: the machine's speed changed during the run."""


def gemm_over_peak_note(records: list[dict]) -> str | None:
    """A sentence when FP32/FP16 rows run above 100% of the FP32 GEMM peak (no float model outruns the machine's
    own FP32 matrix multiply, INT8 may): the peak was measured low."""
    over = [r for r in records if r.get("precision") in ("fp32", "fp16") and (r.get("gemm_peak_fraction") or 0) > 1]
    if not over:
        return None
    return (f"{len(over)} FP32/FP16 row(s) above 100% of the FP32 GEMM peak: the peak was measured low (a busy "
            "machine, or too short a measurement); read their % GEMM peak as an upper bound")


def gemm_spread_note(gemm: dict) -> str:
    """' (measured again: X GFLOP/s; ...)' when the GEMM peak measured before and after the rows disagree by more than
    GEMM_SPREAD (a busy spell: four runs on one machine printed 143-343 GFLOP/s, one run 270 vs 11), else ''."""
    other = (gemm.get("other_measurement") or {}).get("peak_gflops")
    peak = gemm.get("peak_gflops")
    if not peak or not other or peak / other <= GEMM_SPREAD:
        return ""
    return (f" (measured again: {other:.1f} GFLOP/s; the machine's speed changed during the run, so % GEMM peak is "
            "rough)")


def cell(record: dict, key: str, fmt: str) -> str:
    value = record.get(key)
    if value is None or value != value:  # NaN: an AUC with a class absent from the scored images, said as "-"
        return "n/a" if key == "p50_ms" and record.get("status") != "ok" else "-"
    if fmt == "params" or fmt == "macs":
        return f"{value / 1e6:.2f}"
    if fmt == "pct":
        return f"{100 * value:.1f}"
    return fmt.format(value)


def records_markdown(records: list[dict], summary: dict | None = None) -> str:
    """The records as one markdown table (n/a rows with their reason below it), headed by command, date, machine."""
    lines = []
    if summary:
        m = summary["machine"]
        gemm = summary.get("gemm") or {}
        lines += [f"- command: `{summary['command']}`", f"- date: {summary['date']}",
                  f"- machine: {m['cores']}-core {m['machine']} ({m['model']}; {', '.join(m['simd']) or 'no AVX'}), "
                  f"load average at start {m['load_avg_at_start']}, at end {m['load_avg_at_end']}"
                  + ("" if m.get("other_processes_cpu_cores") is None else
                     f"; other processes used {m['other_processes_cpu_cores']:.2f} cores on average during the run"),
                  f"- threads: {summary['threads']}; TTA: {'yes' if summary['tta'] else 'no'}; timing: "
                  f"{summary['timing']['warmup']} warm-up calls, then >= {summary['timing']['min_runs']} calls "
                  f"and >= {summary['timing']['min_seconds']} s per measurement"]
        if summary.get("runner_accuracy") == "operating_point":  # runs before it scored runner rows by argmax
            lines.append("- accuracy: runner rows label an image as `edgekd predict` does (the bundle's calibrated "
                         "probabilities, TTA views averaged after its temperature, and its operating point: a "
                         "threshold if it has one); torch and bare rows take the argmax of the mean raw softmax, so "
                         "with a calibrated or thresholded bundle the two can differ on the same model")
        if summary.get("versions"):
            lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in summary["versions"].items()))
        if gemm.get("peak_gflops"):
            lines.append(f"- FP32 GEMM peak: {gemm['peak_gflops']:.1f} GFLOP/s ({gemm['library']} {gemm['n']}^3 "
                         f"matmul, median call; fastest call {gemm['peak_gflops_best_call']:.1f})"
                         + gemm_spread_note(gemm))
        elif gemm:
            lines.append(f"- FP32 GEMM peak: not measured ({gemm.get('error')})")
        lines.append("")
    columns = shown_columns(records)
    lines.append("| " + " | ".join(h for h, _, _ in columns) + " |")
    lines.append("|" + "|".join("---" if i < 6 else "---:" for i in range(len(columns))) + "|")
    for r in records:
        lines.append("| " + " | ".join(cell(r, k, f) for _, k, f in columns) + " |")
    if note := gemm_over_peak_note(records):
        lines += ["", f"- {note}"]
    notes = [f"- note: {sub['role']} {sub['model']}: {n}" for sub in (summary or {}).get("subjects", [])
             for n in sub.get("notes", [])]  # e.g. a hair-removal model's untimed preprocessing (bench.json only)
    if notes:
        lines += ["", *notes]
    failed = {(r["role"], r["format"], r["precision"], r["variant"]): r["reason"] for r in records
              if r.get("status") != "ok"}
    if failed:
        lines.append("")
        lines += [f"- n/a: {' '.join(k)}: {reason}" for k, reason in failed.items()]
    return "\n".join(lines) + "\n"


def records_table(records: list[dict], title: str = ""):
    """A rich Table of the records (the terminal view of `edgekd bench`)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(title))  # a path with '[/x]' in it had ended the run after its files were written
    columns = shown_columns(records)
    for i, (header, _, _) in enumerate(columns):
        table.add_column(header, justify="left" if i < 5 else "right")
    for r in records:
        style = None if r.get("status") == "ok" else "dim"
        table.add_row(*[escape(cell(r, k, f)) for _, k, f in columns], style=style)
    return table


def throughput_chart(records: list[dict], path: str | Path, title: str = "") -> Path | None:
    """Horizontal bars: images/s of every measured row (log scale), one bar per batch size."""
    import numpy as np

    from edgekd.metrics.plots import plt, save_figure

    ok = [r for r in records if r.get("status") == "ok"]
    if not ok:
        return None
    rows = list(dict.fromkeys((r["role"], r["model"], r["format"], r["precision"], r["variant"]) for r in ok))
    batches = sorted({r["batch"] for r in ok})
    value = {(r["role"], r["model"], r["format"], r["precision"], r["variant"], r["batch"]): r["throughput"] for r in ok}
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.32 * len(rows) * max(1, len(batches)) ** 0.5))
    height = 0.8 / len(batches)
    y = np.arange(len(rows))
    for i, b in enumerate(batches):
        ax.barh(y + i * height, [value.get((*row, b), 0) for row in rows], height, label=f"batch {b}")
    ax.set_yticks(y + height * (len(batches) - 1) / 2)
    ax.set_yticklabels([f"{role} {model} {fmt} {prec} {var}" for role, model, fmt, prec, var in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("throughput (images/s, log scale)")
    ax.set_title(title or "throughput")
    ax.legend(fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return save_figure(fig, path)
