"""PNG plots: confusion matrix, ROC curves, training curves (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay  # noqa: E402

from edgekd.fileio import atomic_write  # noqa: E402


def save_figure(fig, path: str | Path) -> Path:
    """Write `fig` as a PNG at `path` (via a temporary file, so a reader never sees half a PNG) and close it."""
    try:  # atomic_write removes its temp file whatever stops the write (a Ctrl-C left half a .tmp.png behind)
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    finally:
        plt.close(fig)


def confusion_figure(cm: np.ndarray, class_names: list[str], title: str = ""):
    """The confusion matrix as a matplotlib figure (a PNG file, a TensorBoard or W&B image)."""
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(class_names), 1.0 + 0.8 * len(class_names)))
    ConfusionMatrixDisplay(cm, display_labels=class_names).plot(ax=ax, colorbar=False, cmap="Blues",
                                                               xticks_rotation=45 if len(class_names) > 3 else 0)
    ax.set_title(title or "Confusion matrix")
    fig.tight_layout()  # long names ("pneumonia:normal") inside the figure: TensorBoard and W&B draw it as it is
    return fig


def plot_confusion(cm: np.ndarray, class_names: list[str], path: str | Path, title: str = "") -> Path:
    return save_figure(confusion_figure(cm, class_names, title), path)


def roc_line(ax, truth: np.ndarray, score: np.ndarray, name: str) -> None:
    """One ROC curve on `ax` (scikit-learn's), its legend AUC to 4 decimals (at 2, a 0.9504 and a 0.9544 model had
    read alike)."""
    disp = RocCurveDisplay.from_predictions(truth, score, name=name, ax=ax)
    disp.line_.set_label(f"{name} (AUC {disp.roc_auc:.4f})")


def finish_roc(ax, title: str, positive: str | None = None) -> None:
    """The chance line, the axes named as rates (scikit-learn's labels said "(Positive label: 1)" of every curve,
    whichever class it was), the positive class in the title, the legend where the curves are not."""
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("False positive rate (1 - specificity)"), ax.set_ylabel("True positive rate (sensitivity)")
    ax.set_title(title + (f"\npositive class: {positive}" if positive else ""))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize="small")


def plot_roc(y_true: np.ndarray, probs: np.ndarray, class_names: list[str], path: str | Path, title: str = "",
             positive: int = 1) -> Path:
    """A two-class task's ROC of its `positive` class; one-vs-rest per class for more."""
    fig, ax = plt.subplots(figsize=(5, 5))
    y_true = np.asarray(y_true).astype(int)
    binary = len(class_names) == 2
    for c in [positive] if binary else range(len(class_names)):
        if 0 < (y_true == c).sum() < len(y_true):
            roc_line(ax, y_true == c, probs[:, c], class_names[c])
    finish_roc(ax, title or "ROC", class_names[positive] if binary else None)
    return save_figure(fig, path)


def plot_curves(history: list[dict], path: str | Path, title: str = "") -> Path:
    """Loss (train/val) and the val metrics per epoch, from the trainer's history rows."""
    epochs = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    # Two different losses: the training objective (focal, KD terms, EWC...) and cross-entropy on val.
    for key, label in (("train_loss", "train: the training objective"), ("val_loss", "val: cross-entropy")):
        if any(key in h for h in history):
            a1.plot(epochs, [h.get(key, np.nan) for h in history], label=label, marker=".")
    a1.set_xlabel("epoch"), a1.set_title("loss"), a1.legend()
    for key in ("val_acc", "val_auc", "val_f1", "val_pauc"):
        if any(key in h for h in history):
            a2.plot(epochs, [h.get(key, np.nan) for h in history], label=key, marker=".")
    a2.set_xlabel("epoch"), a2.set_title("validation"), a2.legend()
    for ax in (a1, a2):  # whole epochs (a short run had ticks at 1.25, 1.5, ...)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    return save_figure(fig, path)
