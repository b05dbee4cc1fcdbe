"""Clinical classification metrics from labels and probabilities, all computed by scikit-learn."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn import metrics as skm

from edgekd.errors import EdgeKDError


def partial_auc_above_tpr(y_true: np.ndarray, score: np.ndarray, min_tpr: float = 0.8) -> float:
    """Partial AUC over the region TPR >= min_tpr, in [0, 1 - min_tpr] (the ISIC 2024 challenge metric).

    As in the challenge's scorer: flip labels and scores so the TPR band becomes an FPR band, take
    scikit-learn's McClish-standardized partial AUC up to max_fpr = 1 - min_tpr, and undo the standardization.
    """
    y_true = np.asarray(y_true)
    if len(np.unique(y_true)) < 2:
        return float("nan")
    max_fpr = 1.0 - min_tpr
    v_gt = np.abs(y_true - 1)
    v_pred = -np.asarray(score, dtype=np.float64)
    scaled = skm.roc_auc_score(v_gt, v_pred, max_fpr=max_fpr)
    return float(0.5 * max_fpr**2 + (max_fpr - 0.5 * max_fpr**2) / (1.0 - 0.5) * (scaled - 0.5))


def positive_class_index(positive: str | int | None, class_names: list[str], key: str = "data.positive_class") -> int:
    """The index of a two-class task's positive class, given by name or index (None: index 1, the second class:
    MedMNIST's and a sorted folder's "pneumonia" after "normal"); a one-line error naming `key` otherwise."""
    if positive is None:
        return 1
    if isinstance(positive, int) and not isinstance(positive, bool) and str(positive) in class_names:
        # folders named 1 and 2: YAML and --set read `2` as a number
        named = class_names.index(str(positive))
        if named != positive and 0 <= positive < len(class_names):
            raise EdgeKDError(f"{key} {positive}: ambiguous, label id {positive} is class {class_names[positive]!r} "
                              f"and {positive!r} is also the name of label id {named}; give the name quoted as "
                              f"a string ('{class_names[positive]}' or '{positive}')")
        return named
    if isinstance(positive, int) and not isinstance(positive, bool) and 0 <= positive < len(class_names):
        return positive
    if isinstance(positive, str) and positive in class_names:
        return class_names.index(positive)
    raise EdgeKDError(f"{key} {positive!r} is not a class index or one of {', '.join(class_names)}")


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, positive: int = 1,
                           classes: list[int] | None = None) -> dict[str, float]:
    """acc, balanced acc, macro F1/precision/recall, sensitivity/specificity, AUC, PR-AUC, pAUC(TPR>=0.8).

    Binary: sensitivity/specificity/AUC/PR-AUC/pAUC for class `positive`, and its PPV (its precision) and NPV. Multi-class: macro one-vs-rest AUC and
    pAUC (the ISIC 2024 formula per class against the rest, then the mean), macro sensitivity (= recall) and
    macro specificity; AUC, PR-AUC and pAUC are NaN unless every class is present.

    `classes`: score only these columns' classes (the macro averages and one-vs-rest AUCs run over them; two
    classes are scored as binary, `positive` indexing the pair), while the prediction is still the argmax over
    every column; a prediction of another class is an error (a class-incremental model scored on one task's
    classes while every class it knows competes).
    """
    y_true = np.asarray(y_true).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    k = probs.shape[1]
    y_pred = probs.argmax(1)
    labels = list(range(k)) if classes is None else [int(c) for c in classes]
    out: dict[str, float] = {
        "acc": skm.accuracy_score(y_true, y_pred),
        "balanced_acc": _quiet(skm.balanced_accuracy_score, y_true, y_pred),
        # Undefined per-class figures (recall of a class without images, precision of one never predicted) are
        # left out of the macro mean, as sensitivity leaves them out (as 0: recall 0.33 beside sensitivity 0.5)
        "f1": skm.f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=np.nan),
        "precision": skm.precision_score(y_true, y_pred, labels=labels, average="macro", zero_division=np.nan),
        "recall": skm.recall_score(y_true, y_pred, labels=labels, average="macro", zero_division=np.nan),
    }
    cm = skm.confusion_matrix(y_true, y_pred, labels=list(range(k)))
    present = np.unique(y_true)
    if len(labels) == 2:  # binary: the positive class against the rest (a scored pair: its second class)
        out.update(_positive_class_figures(y_true, y_pred, probs[:, labels[positive]], labels[positive]))
    else:
        fn = cm.sum(1) - np.diag(cm)
        fp = cm.sum(0) - np.diag(cm)
        tn = cm.sum() - cm.sum(1) - fp
        with np.errstate(invalid="ignore", divide="ignore"):
            spec = tn / (tn + fp)
            sens = np.diag(cm) / (np.diag(cm) + fn)
        scored = [c for c in present if c in labels]
        out["sensitivity"], out["specificity"] = _mean_of_defined(sens[scored]), _mean_of_defined(spec[scored])
        if set(labels) <= set(present.tolist()):  # one-vs-rest per class, then the macro mean (as scikit-learn's ovr)
            out["auc"] = float(np.mean([skm.roc_auc_score(y_true == c, probs[:, c]) for c in labels]))
            out["pr_auc"] = float(np.mean([skm.average_precision_score(y_true == c, probs[:, c]) for c in labels]))
            out["pauc"] = float(np.mean([partial_auc_above_tpr((y_true == c).astype(int), probs[:, c])
                                         for c in labels]))
        else:
            out["auc"] = out["pr_auc"] = out["pauc"] = float("nan")
    return {key: float(v) for key, v in out.items()}


def _positive_class_figures(y_true: np.ndarray, y_pred: np.ndarray, score: np.ndarray, cls: int) -> dict[str, float]:
    """Class `cls` against the rest: sensitivity, specificity, its precision (PPV) and the other side's (NPV) --
    what a positive or negative call is worth at this split's prevalence (macro precision averages the two) --
    and AUC, PR-AUC, pAUC of its probability `score` (NaN unless both sides have images)."""
    is_pos, said_pos = y_true == cls, y_pred == cls
    tp, fn = int((is_pos & said_pos).sum()), int((is_pos & ~said_pos).sum())
    fp, tn = int((~is_pos & said_pos).sum()), int((~is_pos & ~said_pos).sum())
    ratio = lambda a, b: a / (a + b) if a + b else float("nan")  # noqa: E731
    out = {"sensitivity": ratio(tp, fn), "specificity": ratio(tn, fp), "ppv": ratio(tp, fp), "npv": ratio(tn, fn)}
    pos, both = is_pos.astype(int), bool(is_pos.any() and (~is_pos).any())
    out["auc"] = skm.roc_auc_score(pos, score) if both else float("nan")
    out["pr_auc"] = skm.average_precision_score(pos, score) if both else float("nan")
    out["pauc"] = partial_auc_above_tpr(pos, score) if both else float("nan")
    return out


def largest_class_share(counts: list[int]) -> float | None:
    """The accuracy of calling every image of a split its largest class; None for a split holding fewer than two
    classes (nothing to compare with)."""
    if sum(c > 0 for c in counts) < 2:
        return None
    return max(counts) / sum(counts)


ONE_CLASS_ADVICE = ("the model may call nearly everything one class; check the training curves (e.g. a best epoch "
                    "chosen by AUC where ACC collapsed) before exporting it")


def one_class_warning(split: str, acc: float | None, counts: list[int], advice: str = ONE_CLASS_ADVICE) -> str | None:
    """A warning when a model's accuracy on a split is no better than calling every image the split's largest class
    (a model can rank well, high AUC, while its argmax calls nearly everything one class); None otherwise."""
    majority = largest_class_share(counts)
    if acc is None or majority is None or acc > majority:
        return None
    return (f"{split} ACC {acc:.4f} is no better than calling every {split} image its largest class "
            f"({majority:.4f}): {advice}")


def confusion(y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
    k = np.asarray(probs).shape[1]
    return skm.confusion_matrix(np.asarray(y_true).astype(int), np.asarray(probs).argmax(1), labels=list(range(k)))


def _quiet(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args)


def _mean_of_defined(values: np.ndarray) -> float:
    """The mean of the finite values; NaN, without numpy's 'Mean of empty slice' warning, when there are none (a
    split of one class has no negatives to give a specificity)."""
    defined = values[np.isfinite(values)]
    return float(defined.mean()) if len(defined) else float("nan")
