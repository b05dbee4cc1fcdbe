"""Accuracy-latency Pareto front over benchmark records: which model x format x precision x TTA is worth deploying."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

POINT_KEYS = ("model", "role", "format", "precision", "variant", "tta")
SCORE_TIE = 1e-9
"""Scores this close are equal: two formats of one model whose AUC differs in the 16th digit (float summation
order) had put the slower one on the front."""


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices (ascending latency) of the points no other point dominates, for (latency, score) pairs where lower
    latency and higher score are better. A point is dominated when another is at least as fast and at least as
    good and strictly better in one of the two (scores within SCORE_TIE are equal); exact duplicates do not dominate
    each other (both are kept)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front: list[int] = []
    best = float("-inf")
    best_latency = None
    for i in order:
        latency, score = points[i]
        if score > best + SCORE_TIE:
            front.append(i)
            best, best_latency = score, latency
        elif abs(score - best) <= SCORE_TIE and latency == best_latency:
            front.append(i)  # an exact tie with the current front point
    return front


def pareto_points(records: list[dict[str, Any]], metric: str = "acc", batch: int = 1) -> list[dict[str, Any]]:
    """Batch-`batch` records that measured both p50 latency and `metric`, one point per model x format x
    precision x variant x TTA (the first such record), with `pareto` marking the front."""
    seen: dict[tuple, dict[str, Any]] = {}
    for r in records:
        if r.get("batch") != batch or r.get("status", "ok") not in ("ok", None):
            continue
        if r.get("p50_ms") is None or r.get(metric) is None or r[metric] != r[metric]:
            continue
        seen.setdefault(tuple(r.get(k) for k in POINT_KEYS), r)
    pts = [{**{k: r.get(k) for k in POINT_KEYS}, "p50_ms": float(r["p50_ms"]), metric: float(r[metric])}
           for r in seen.values()]
    front = set(pareto_front([(p["p50_ms"], p[metric]) for p in pts]))
    for i, p in enumerate(pts):
        p["pareto"] = i in front
    return pts


def point_label(p: dict[str, Any]) -> str:
    variant = f" {p['variant']}" if p.get("variant") else ""
    return f"{p['role']} {p['format']}/{p['precision']}{variant}{' +TTA' if p.get('tta') else ''}"


def plot_pareto(panels: dict[str, list[dict[str, Any]]], path: str | Path, title: str = "") -> Path:
    """One panel per metric: every point (latency log-scale), the front connected and labelled."""
    from edgekd.metrics.plots import plt, save_figure

    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    for ax, (metric, pts) in zip(axes[0], panels.items()):
        roles = sorted({p["role"] for p in pts})
        markers = dict(zip(roles, "osD^v<>"))
        for p in pts:
            ax.scatter(p["p50_ms"], p[metric], marker=markers[p["role"]], s=42 if p["pareto"] else 22,
                       c="tab:red" if p["pareto"] else "tab:gray", alpha=0.9 if p["pareto"] else 0.6,
                       edgecolors="black" if p.get("tta") else "none")
        front = sorted((p for p in pts if p["pareto"]), key=lambda p: p["p50_ms"])
        if front:
            ax.step([p["p50_ms"] for p in front], [p[metric] for p in front], where="post", c="tab:red", lw=1.2,
                    label="Pareto front")
        for p in front:
            ax.annotate(point_label(p), (p["p50_ms"], p[metric]), fontsize=7, xytext=(4, -10),
                        textcoords="offset points")
        for role, m in markers.items():
            ax.scatter([], [], marker=m, c="tab:gray", label=role)
        ax.set_xscale("log")
        ax.set_xlabel("batch-1 latency p50 (ms, log scale)")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} vs latency ({len(pts)} configurations; black edge = TTA)", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title or "Accuracy-latency Pareto front")
    fig.tight_layout()
    return save_figure(fig, path)


def pareto_markdown(points: list[dict[str, Any]], metric: str) -> str:
    """The configurations sorted by latency, front members in bold."""
    lines = [f"| configuration | model | p50 ms | {metric} | on front |", "|---|---|---:|---:|:---:|"]
    for p in sorted(points, key=lambda p: p["p50_ms"]):
        mark = "**yes**" if p["pareto"] else ""
        lines.append(f"| {point_label(p)} | {p['model']} | {p['p50_ms']:.2f} | {p[metric]:.4f} | {mark} |")
    return "\n".join(lines)
