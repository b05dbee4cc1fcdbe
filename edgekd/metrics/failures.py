"""Failure analysis: the most confused (true, predicted) class pairs and a PNG grid of their example images."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np


def confused_pairs(y_true: np.ndarray, probs: np.ndarray, top: int = 5,
                   predicted: np.ndarray | None = None) -> list[dict[str, Any]]:
    """The `top` off-diagonal (true, predicted) pairs by count (ties: by true, then predicted class id).

    Each pair: count, rate (share of that true class's images), and the image indices ordered by the wrong
    class's probability, most confident mistakes first (the ones a clinician should look at). `predicted`: the
    labels given (a bundle's decision threshold); default the top class.
    """
    y_true = np.asarray(y_true).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    pred = probs.argmax(1) if predicted is None else np.asarray(predicted).astype(int)
    wrong = np.flatnonzero(pred != y_true)
    counts: dict[tuple[int, int], list[int]] = {}
    for i in wrong:
        counts.setdefault((int(y_true[i]), int(pred[i])), []).append(int(i))
    ranked = sorted(counts.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:top]
    out = []
    for (t, p), idx in ranked:
        idx = sorted(idx, key=lambda i: (-probs[i, p], i))
        out.append({"true": t, "pred": p, "count": len(idx), "rate": len(idx) / int((y_true == t).sum()),
                    "indices": idx, "confidence": [float(probs[i, p]) for i in idx]})
    return out


def plot_failure_grid(images: Sequence[np.ndarray], pairs: list[dict[str, Any]], class_names: list[str],
                      path: str | Path, per_pair: int = 6, title: str = "") -> Path:
    """One row per confused pair: its most confident mistakes with the wrong class's probability."""
    from edgekd.metrics.plots import plt, save_figure

    rows = max(1, len(pairs))
    cols = max(1, min(per_pair, max((p["count"] for p in pairs), default=1)))
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols + 1.6, 1.7 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, pair in enumerate(pairs):
        label = f"{class_names[pair['true']]} → {class_names[pair['pred']]}\n{pair['count']} ({pair['rate']:.1%})"
        axes[r, 0].text(-0.15, 0.5, label, transform=axes[r, 0].transAxes, ha="right", va="center", fontsize=8)
        for c, (i, conf) in enumerate(zip(pair["indices"][:cols], pair["confidence"][:cols])):
            img = np.asarray(images[i])
            axes[r, c].imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
            axes[r, c].set_title(f"#{i} p={conf:.2f}", fontsize=7)
    if not pairs:
        axes[0, 0].text(0.5, 0.5, "no mistakes", ha="center", va="center")
    fig.suptitle(title or "Most confused class pairs (most confident mistakes first)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
