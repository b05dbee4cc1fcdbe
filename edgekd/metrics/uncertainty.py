"""Operating points and uncertainty: a decision threshold chosen on validation, stratified bootstrap intervals for
every reported figure, and the DeLong test / paired bootstrap for the AUC difference of two models.

Bootstrap: each resample draws, with replacement, as many images of every class as the set has (stratified, so
every resample has both classes and the same class mix), from a seeded generator; all resamples are scored at once
on (resamples x images) arrays. Intervals are percentile intervals. torch-free (numpy, scipy, scikit-learn).
"""

from __future__ import annotations

import warnings

from typing import Any

import numpy as np
from scipy.stats import norm, rankdata
from sklearn.metrics import roc_auc_score, roc_curve

from edgekd.metrics.calibration import confidence_bins
from edgekd.scoring import rank_auc

RULES = ("argmax", "sensitivity", "specificity", "youden")
INTERVAL_METRICS = ("auc", "acc", "balanced_acc", "sensitivity", "specificity", "f1", "ece")
CHUNK = 100


def choose_threshold(labels: np.ndarray, p_positive: np.ndarray, rule: str, target: float | None = None) -> float | None:
    """The decision threshold on the positive class's probability (label = positive when p >= threshold) that the
    rule picks on these (validation) images: `sensitivity` the highest threshold whose sensitivity reaches
    `target`, `specificity` the lowest whose specificity reaches it, `youden` the one maximizing sensitivity +
    specificity - 1; `argmax` None (the top class decides)."""
    if rule not in RULES:
        raise ValueError(f"unknown decision rule '{rule}' (use {', '.join(RULES)})")
    if rule == "argmax":
        return None
    if len(np.unique(np.asarray(labels))) != 2:
        raise ValueError(f"decision rule '{rule}' needs validation images of both classes")
    p_positive = np.asarray(p_positive, dtype=np.float64)
    fpr, tpr, thresholds = roc_curve(np.asarray(labels), p_positive, drop_intermediate=False)
    # roc_curve's first threshold is +inf (nothing positive): 1.0 gives that when no probability is 1.0; when one
    # is, no threshold in [0, 1] does (p >= 1.0 is positive), so that point is no candidate (it had been given as
    # 1.0, calling exactly the images at 1.0 positive, and missed its own target on the images it was chosen on)
    if p_positive.max() >= 1.0:
        fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]
    if rule == "youden":
        return threshold_between(thresholds, int(np.argmax(tpr - fpr)))
    if target is None or not 0 < target <= 1:
        raise ValueError(f"decision rule '{rule}' needs a target in (0, 1], got {target}")
    if rule == "sensitivity":
        return threshold_between(thresholds, int(np.argmax(tpr >= target - 1e-12)))
    reached = np.flatnonzero(1 - fpr >= target - 1e-12)
    # unreachable (a negative at probability 1.0 and a target of 1.0): the most specific threshold there is; the
    # bundle's val figures show the miss, and the export warns of it
    return threshold_between(thresholds, int(reached[-1] if len(reached) else np.argmax(1 - fpr)))


def threshold_between(thresholds: np.ndarray, k: int) -> float:
    """The threshold that labels these images as roc_curve's candidate k (an image's own probability; +inf: nothing
    positive, and 1.0 itself: 1.0) does, halfway to the next lower probability: on the candidate itself, an
    exported model's probability a few ulps lower had flipped that image (a sensitivity-0.97 bundle gave 0.96 on
    its own val images). No image lies between the two, so the labels chosen on are the same."""
    if thresholds[k] >= 1.0:  # +inf (nothing positive), or images at 1.0, the most specific any threshold gets
        return 1.0
    lower = thresholds[k + 1] if k + 1 < len(thresholds) else 0.0
    return float((thresholds[k] + lower) / 2)


def decide(probs: np.ndarray, threshold: float | None = None, positive: int = 1) -> np.ndarray:
    """Class indices: the top class, or for a binary model with a threshold `positive` when p[positive] >= it."""
    probs = np.asarray(probs)
    if threshold is None:
        return probs.argmax(axis=-1)
    return np.where(probs[..., positive] >= threshold, positive, 1 - positive)


def stratified_resamples(labels: np.ndarray, n_resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """(n_resamples, n) image indices: per class, as many draws with replacement as the class has."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts = [idx[rng.integers(0, len(idx), size=(n_resamples, len(idx)))]
             for idx in (np.flatnonzero(labels == c) for c in np.unique(labels))]
    return np.concatenate(parts, axis=1)


def _ece_rows(probs: np.ndarray, y: np.ndarray, bins: int) -> np.ndarray:
    conf = probs.max(axis=-1)
    correct = probs.argmax(axis=-1) == y
    which = confidence_bins(conf, bins)
    rows, n = conf.shape
    flat = (np.arange(rows)[:, None] * bins + which).ravel()
    gap = (np.bincount(flat, correct.ravel().astype(float), rows * bins)
           - np.bincount(flat, conf.ravel(), rows * bins))
    return np.abs(gap).reshape(rows, bins).sum(axis=1) / n


def metric_rows(labels: np.ndarray, probs: np.ndarray, threshold: float | None = None, positive: int = 1,
                bins: int = 15) -> dict[str, np.ndarray]:
    """INTERVAL_METRICS for each row of (rows, n) labels and (rows, n, k) probabilities, at once. Macro over
    classes for multi-class (sensitivity = balanced ACC there); binary sensitivity/specificity for `positive`."""
    k = probs.shape[-1]
    pred = decide(probs, threshold if k == 2 else None, positive)
    recall, spec, f1, held = [], [], [], []
    for c in range(k):
        tp = ((pred == c) & (labels == c)).sum(axis=1)
        fn = ((pred != c) & (labels == c)).sum(axis=1)
        fp = ((pred == c) & (labels != c)).sum(axis=1)
        tn = labels.shape[1] - tp - fn - fp
        with np.errstate(invalid="ignore", divide="ignore"):
            recall.append(tp / (tp + fn))
            spec.append(tn / (tn + fp))
            held.append(tp + fn > 0)
            f1.append(np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), np.nan))
    with warnings.catch_warnings():  # a class without images and predictions is left out of the macro means, as
        warnings.simplefilter("ignore", RuntimeWarning)  # classification_metrics does (it had counted as 0 here)
        recall_mean, f1_mean = np.nanmean(recall, axis=0), np.nanmean(f1, axis=0)
        spec_mean = np.nanmean(np.where(held, spec, np.nan), axis=0)  # multi-class: over the classes the split holds
    out = {"acc": (pred == labels).mean(axis=1), "balanced_acc": recall_mean, "f1": f1_mean,
           "ece": _ece_rows(probs, labels, bins)}
    if k == 2:
        out.update(sensitivity=recall[positive], specificity=spec[positive],
                   auc=rank_auc(labels, probs[..., positive], positive))
    else:
        out.update(sensitivity=recall_mean, specificity=spec_mean,
                   auc=np.mean([rank_auc(labels, probs[..., c], c) for c in range(k)], axis=0))
    return out


def bootstrap_intervals(labels: np.ndarray, probs: np.ndarray, threshold: float | None = None, positive: int = 1,
                        n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, dict[str, float]]:
    """{metric: {value, low, high}}: the figure on all images and its stratified bootstrap percentile interval
    (ECE's shifted by the bootstrap's estimate of its upward bias). A two-class model's accuracy, sensitivity and
    specificity, proportions of fixed counts, get the Wilson score interval instead (`wilson_interval`): at 0 or 1
    the stratified bootstrap's interval had no width ("sensitivity 1.000 [1.000, 1.000]", read as certainty)."""
    labels = np.asarray(labels, dtype=int)
    probs = np.asarray(probs, dtype=np.float64)
    point = metric_rows(labels[None], probs[None], threshold, positive)
    idx = stratified_resamples(labels, n_resamples, seed)
    # Scored CHUNK resamples at a time: (chunk, images, classes) arrays stay small for large test sets.
    parts = [metric_rows(labels[idx[i:i + CHUNK]], probs[idx[i:i + CHUNK]], threshold, positive)
             for i in range(0, n_resamples, CHUNK)]
    boot = {m: np.concatenate([p[m] for p in parts]) for m in INTERVAL_METRICS}
    alpha = (1 - level) / 2
    out = {}
    for m in INTERVAL_METRICS:
        value, low, high = float(point[m][0]), np.nanquantile(boot[m], alpha), np.nanquantile(boot[m], 1 - alpha)
        if m == "ece":  # resampling with replacement inflates ECE (duplicates sharpen the bins): the percentile
            bias = float(np.nanmean(boot[m])) - value  # interval could lie wholly above the figure; shifted back
            low, high = max(0.0, low - bias), high - bias  # by the bootstrap's bias estimate
        out[m] = {"value": value, "low": float(low), "high": float(high)}
    if probs.shape[-1] == 2:
        counts = {"acc": len(labels), "sensitivity": int((labels == positive).sum()),
                  "specificity": int((labels != positive).sum())}
        for m, n in counts.items():
            if n and out[m]["value"] == out[m]["value"]:
                out[m]["low"], out[m]["high"] = wilson_interval(round(out[m]["value"] * n), n, level)
    return out


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (SciPy's binomtest), which keeps a width at 0/n and n/n."""
    from scipy.stats import binomtest

    ci = binomtest(successes, n).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def paired_bootstrap_auc(labels: np.ndarray, score_a: np.ndarray, score_b: np.ndarray, positive: int = 1,
                         n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """AUC(a) - AUC(b) on the same images: the difference, its interval, and a two-sided bootstrap p-value."""
    labels = np.asarray(labels, dtype=int)
    idx = stratified_resamples(labels, n_resamples, seed)
    diff = (rank_auc(labels[idx], np.asarray(score_a)[idx], positive)
            - rank_auc(labels[idx], np.asarray(score_b)[idx], positive))
    value = float((rank_auc(labels[None], np.asarray(score_a)[None], positive)
                   - rank_auc(labels[None], np.asarray(score_b)[None], positive))[0])
    alpha = (1 - level) / 2
    p = min(1.0, 2 * min((diff <= 0).mean(), (diff >= 0).mean()))
    return {"diff": value, "low": float(np.quantile(diff, alpha)), "high": float(np.quantile(diff, 1 - alpha)),
            "p_value": float(p), "resamples": n_resamples}


def delong_test(labels: np.ndarray, score_a: np.ndarray, score_b: np.ndarray, positive: int = 1) -> dict[str, Any]:
    """DeLong, DeLong & Clarke-Pearson (1988) test of AUC(a) = AUC(b) for two scores on the same images, with the
    structural components computed from mid-ranks as in Sun & Xu (2014). -> aucs, difference, its variance, z, p.
    The variance needs 2 or more images of each class: with fewer, var, z and p are None (numpy had printed
    "Degrees of freedom <= 0" and divide warnings, and z came out 0 or inf)."""
    labels = np.asarray(labels)
    pos, neg = labels == positive, labels != positive
    m, n = int(pos.sum()), int(neg.sum())
    if min(m, n) < 2:
        aucs = [float(roc_auc_score(pos, s)) if m and n else float("nan") for s in (score_a, score_b)]
        return {"auc_a": aucs[0], "auc_b": aucs[1], "diff": aucs[0] - aucs[1], "var": None, "z": None,
                "p_value": None, "covariance": None,
                "note": f"no DeLong test: {m} positive and {n} negative images (2 or more of each needed)"}
    aucs, v10, v01 = [], [], []
    for score in (np.asarray(score_a, dtype=np.float64), np.asarray(score_b, dtype=np.float64)):
        x, y = score[pos], score[neg]
        tz = rankdata(np.concatenate([x, y]))
        tx, ty = rankdata(x), rankdata(y)
        aucs.append((tz[:m].sum() - m * (m + 1) / 2) / (m * n))
        v10.append((tz[:m] - tx) / n)        # per positive: share of negatives it outranks
        v01.append(1 - (tz[m:] - ty) / m)    # per negative: share of positives that outrank it
    s10, s01 = np.cov(np.array(v10)), np.cov(np.array(v01))
    cov = s10 / m + s01 / n
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    diff = float(aucs[0] - aucs[1])
    z = diff / np.sqrt(var) if var > 0 else (0.0 if diff == 0 else float("inf"))
    return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "diff": diff, "var": var, "z": float(z),
            "p_value": float(2 * norm.sf(abs(z))), "covariance": cov.tolist()}
