"""Calibration: temperature scaling fit on validation logits, and how well probabilities mean what they say.

ECE (equal-width bins, 15 by default, as in Guo et al. 2017) and adaptive ECE (equal-mass bins) on the top-class
confidence; Brier score in its multi-class form (mean over images of the squared distance between the probability
vector and the one-hot label; for two classes this is twice scikit-learn's binary `brier_score_loss`); NLL by
scikit-learn's `log_loss`. Temperature scaling divides the logits by one scalar T fit by NLL (scipy's bounded
scalar minimizer over log T); it never changes the argmax, only how confident the probabilities are. torch-free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from sklearn.metrics import log_loss

from edgekd.probability import calibrated_softmax, softmax

ECE_BINS = 15
T_BOUNDS = (0.05, 20.0)


def confidence_bins(conf: np.ndarray, bins: int = ECE_BINS) -> np.ndarray:
    """Each confidence's equal-width bin on (0, 1] (an edge goes to the lower bin): ECE, its bootstrap and the
    reliability diagram bin alike."""
    return np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    probs = np.asarray(probs, dtype=np.float64)
    return float(log_loss(np.asarray(labels), probs, labels=list(range(probs.shape[1]))))


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    """Brier's own multi-class score: the squared error summed over the classes, averaged over the images (0 to 2;
    for two classes twice scikit-learn's brier_score_loss of the positive class)."""
    probs = np.asarray(probs, dtype=np.float64)
    onehot = np.eye(probs.shape[1])[np.asarray(labels, dtype=int)]
    return float(((probs - onehot) ** 2).sum(axis=1).mean())


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS, adaptive: bool = False) -> float:
    """Expected calibration error of the top-class confidence: sum over bins of (share of images) x |accuracy -
    mean confidence|. Equal-width bins on (0, 1] (a confidence on an edge goes to the lower bin), or with
    `adaptive` equal-mass bins (the images sorted by confidence, split into `bins` groups of near-equal size)."""
    probs = np.asarray(probs, dtype=np.float64)
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == np.asarray(labels)).astype(np.float64)
    if adaptive:
        groups = np.array_split(np.argsort(conf, kind="stable"), bins)
    else:
        which = confidence_bins(conf, bins)
        groups = [np.flatnonzero(which == b) for b in range(bins)]
    n = len(conf)
    return float(sum(len(g) / n * abs(correct[g].mean() - conf[g].mean()) for g in groups if len(g)))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 that minimizes the NLL of softmax(logits / T) on (validation) logits."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=int)
    rows = np.arange(len(labels))

    def loss(log_t: float) -> float:
        z = logits / np.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        return float((np.log(np.exp(z).sum(axis=1)) - z[rows, labels]).mean())

    found = minimize_scalar(loss, bounds=tuple(np.log(T_BOUNDS)), method="bounded", options={"xatol": 1e-6})
    return float(np.exp(found.x))


def fit_platt(logits: np.ndarray, labels: np.ndarray) -> tuple[float, list[float]]:
    """Platt scaling of a two-class model: p(1) = sigmoid(a (z1 - z0) + b), fit by NLL; -> (T = 1 / a, bias [0, b])
    in the form calibrated_softmax takes."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.shape[1] != 2:
        raise ValueError("Platt scaling needs a two-class model (use temperature scaling)")
    d, y = logits[:, 1] - logits[:, 0], np.asarray(labels, dtype=float)
    if len(np.unique(y)) < 2:  # the fit "succeeded" on one class, a slope toward that class alone
        raise ValueError("Platt scaling needs validation images of both classes")

    def loss(params: np.ndarray) -> float:
        s = params[0] * d + params[1]
        return float(np.mean(np.logaddexp(0, s) - y * s))  # -log sigmoid(s) for y=1, -log(1-sigmoid(s)) for y=0

    a, b = minimize(loss, x0=np.array([1.0, 0.0]), method="Nelder-Mead",
                    options={"xatol": 1e-7, "fatol": 1e-10, "maxiter": 2000}).x
    if a <= 0:
        raise ValueError(f"Platt scaling found a non-positive slope ({a:.3g}): the scores rank the classes backwards")
    return float(1.0 / a), [0.0, float(b)]


def calibration_figures(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {"ece": ece(probs, labels), "adaptive_ece": ece(probs, labels, adaptive=True),
            "brier": brier(probs, labels), "nll": nll(probs, labels)}


def calibration_report(val_logits: np.ndarray, val_labels: np.ndarray, test_logits: np.ndarray | None = None,
                       test_labels: np.ndarray | None = None, method: str = "temperature") -> dict[str, Any]:
    """Fit the calibration (temperature, or Platt for two classes) on validation; the figures before and after on
    validation (and on test when given)."""
    if method not in ("temperature", "platt"):
        raise ValueError(f"unknown calibration method '{method}' (use temperature or platt)")
    if method == "platt":
        temperature, bias = fit_platt(val_logits, val_labels)
    else:
        temperature, bias = fit_temperature(val_logits, val_labels), None
    out: dict[str, Any] = {"method": method, "temperature": temperature, "fitted_on": "val",
                           "fit_images": int(len(val_labels)), "bins": ECE_BINS}
    if method == "temperature" and (np.asarray(val_logits).argmax(1) == np.asarray(val_labels)).all():
        # the fit is degenerate: its T (near the 0.05 bound) had shipped, every calibrated probability at 0 or 1 (a
        # raw 0.71 shown as 1.0000 to a clinician); no calibration is the honest answer
        out["warning"] = (f"every val image is right, so the NLL keeps falling as T shrinks (it stopped near its "
                          f"{T_BOUNDS[0]:g} bound, {temperature:.3g}, every probability at 0 or 1): T kept at 1, no "
                          "calibration; a val split the model makes mistakes on (more images, or harder ones) "
                          "calibrates")
        temperature = out["temperature"] = 1.0
    elif method == "temperature" and temperature > T_BOUNDS[1] * 0.95:
        out["warning"] = (f"T stopped near its {T_BOUNDS[1]:g} bound ({temperature:.3g}): the fit wanted softer "
                          "probabilities than the bound allows (scores that barely follow the val labels, or logits "
                          "far too confident), so the calibrated probabilities are not the NLL optimum; check the "
                          "model's training before trusting them")
    if bias is not None:
        out["bias"] = bias
    for split, logits, labels in (("val", val_logits, val_labels), ("test", test_logits, test_labels)):
        if logits is None:
            continue
        logits = np.asarray(logits, dtype=np.float64)
        out[split] = {"before": calibration_figures(softmax(logits), labels),
                      "after": calibration_figures(calibrated_softmax(logits, temperature, bias), labels),
                      "images": int(len(labels))}
    if note := held_out_warning(out):  # beside a bound's warning, not instead of it
        out["warning"] = f"{out['warning']}; {note}" if out.get("warning") else note
    return out


def worse_than(before: float, key: str) -> float:
    """The figure above which a calibration made `key` worse, beyond the noise of a fit that changes little: NLL
    by more than 1%, ECE by more than 0.01 (a 15-bin ECE moves that much between samples of a thousand images)."""
    return before * 1.01 if key == "nll" else before + 0.01


MIN_FIT_IMAGES = 50
"""A calibration fitted on fewer val images than this is warned of (10 images, 2 of one class, had given T 0.33)."""


def held_out_warning(report: dict[str, Any]) -> str | None:
    """What a calibration report's figures say against trusting it: fitted on fewer than MIN_FIT_IMAGES val images,
    or making the test split's NLL, or either split's ECE, worse (`worse_than`; the fit is kept: test only reports,
    it does not choose)."""
    n = report["fit_images"]
    said = [f"was fitted on {n} val images (fewer than {MIN_FIT_IMAGES})"] if n < MIN_FIT_IMAGES else []
    for split, key in (("test", "nll"), ("val", "ece"), ("test", "ece")):  # ECE: the fit minimizes NLL, not ECE
        figures = report.get(split)
        if figures is not None and figures["after"][key] > worse_than(figures["before"][key], key):
            said.append(f"makes the {split} split's {key.upper()} worse ({figures['before'][key]:.3f} -> "
                        f"{figures['after'][key]:.3f})")
    if not said:
        return None
    return (f"the {report['method']} calibration {' and '.join(said)}: its probabilities may be less honest than "
            "the raw ones; a larger val split calibrates, or calibration.method none in the export profile keeps "
            "the raw softmax")


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Per equal-width bin: its range, image count, mean confidence and accuracy (the reliability diagram's data)."""
    probs = np.asarray(probs, dtype=np.float64)
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(labels)
    which = confidence_bins(conf, bins)
    return [{"low": b / bins, "high": (b + 1) / bins, "count": int((which == b).sum()),
             "confidence": float(conf[which == b].mean()) if (which == b).any() else None,
             "accuracy": float(correct[which == b].mean()) if (which == b).any() else None} for b in range(bins)]


def plot_reliability(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str) -> Path:
    """A reliability diagram: accuracy vs confidence per bin for each named (probs, labels), and the diagonal."""
    from edgekd.metrics.plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfectly calibrated")
    for name, (probs, labels) in curves.items():
        pts = [b for b in reliability_bins(probs, labels) if b["count"]]
        ax.plot([b["confidence"] for b in pts], [b["accuracy"] for b in pts], "o-",
                label=f"{name} (ECE {ece(probs, labels):.3f})")
    ax.set(xlabel="confidence (top-class probability)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=title)
    ax.legend(loc="upper left", fontsize=8)
    return save_figure(fig, path)
