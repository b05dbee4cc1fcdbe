"""The bundle's clinical operating point, fit at export: a temperature on the validation logits (calibrated
probabilities), a decision threshold chosen on validation by the profile's rule, and the test figures under both
with bootstrap intervals — for the PyTorch reference and, under the same temperature and threshold, each artifact.
The runner applies `calibration.temperature` and `decision.threshold` from edgekd.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgekd.errors import EdgeKDError
from edgekd.export.profile import ExportProfile
from edgekd.metrics import (bootstrap_intervals, calibration_report, choose_threshold, decide, delong_test,
                            plot_reliability, positive_class_index)
from edgekd.probability import apply_temperature, calibrated_softmax, softmax

RELIABILITY_FILE = "calibration.png"
OPERATING_METRICS = ("sensitivity", "specificity", "acc", "balanced_acc", "f1", "auc", "ece")


def positive_index(positive: str | int, class_names: list[str]) -> int:
    return positive_class_index(positive, class_names, "export profile: decision.positive")


def operating_point(reference: dict[str, Any], splits: dict[str, tuple[np.ndarray, np.ndarray]],
                    profile: ExportProfile, class_names: list[str]) -> dict[str, Any]:
    """{"calibration": ..., "decision": ...} for edgekd.json, from the reference logits on val and test."""
    (val_logits, test_logits), (val_y, test_y) = ((reference["splits"][s]["logits"] for s in ("val", "test")),
                                                  (splits[s][1] for s in ("val", "test")))
    calibration = None
    binary = len(class_names) == 2
    method = profile.calibration.method
    if method == "platt" and not binary:
        raise EdgeKDError(f"export profile: calibration.method platt needs a two-class model ({len(class_names)} classes)")
    if profile.decision.rule != "argmax" and not binary:  # it was dropped for argmax, silently
        raise EdgeKDError(f"export profile: decision.rule {profile.decision.rule} needs a two-class model "
                          f"({len(class_names)} classes; a multi-class bundle predicts the top class: rule argmax)")
    if "positive" in profile.decision.model_fields_set and not binary:  # it was dropped without a word
        raise EdgeKDError(f"export profile: decision.positive is for a two-class model ({len(class_names)} classes; "
                          "a multi-class bundle predicts the top class)")
    positive = positive_index(profile.decision.positive, class_names)
    rule = profile.decision.rule if binary else "argmax"
    try:  # scikit-learn's and our fits' ValueErrors (one class in val, a model ranking backwards): one line, exit 2
        if method != "none":
            calibration = calibration_report(val_logits, val_y, test_logits, test_y, method)
        p_val, p_test = (calibrated_softmax(z, *calibration_of({"calibration": calibration}))
                         for z in (val_logits, test_logits))
        threshold = choose_threshold((val_y == positive).astype(int), p_val[:, positive], rule,
                                     profile.decision.target) if binary else None
    except ValueError as err:
        key = f"decision.rule {rule}" if calibration is not None or method == "none" else f"calibration.method {method}"
        raise EdgeKDError(f"export profile: {key}: {err}") from None
    decision = {"rule": rule, "target": profile.decision.target if rule != "argmax" else None, "threshold": threshold,
                # a positive class only where there is one: a two-class model (a 10-class bundle had named one)
                **({"positive_class": class_names[positive], "positive_index": positive} if binary else {}),
                "chosen_on": "val", "val": bootstrap_intervals(val_y, p_val, threshold, positive),
                "test": bootstrap_intervals(test_y, p_test, threshold, positive)}
    return {"calibration": calibration, "decision": decision}


def scored_on_subset(parity: dict[str, Any]) -> bool:
    """Whether a parity report's artifacts were scored on a `--metric-images` subset of the metric splits."""
    ref = parity["reference"]
    return ref.get("metric_images", ref["split_images"]) != ref["split_images"]  # absent before 2026-12-06


def calibration_of(clinical: dict[str, Any]) -> tuple[float, list[float] | None]:
    """(temperature, bias) of calibrated_softmax; (1, None) without calibration."""
    calibration = clinical.get("calibration") or {}
    return float(calibration.get("temperature", 1.0)), calibration.get("bias")


def as_the_bundle_decides(records: list[dict[str, Any]], clinical: dict[str, Any],
                          class_names: list[str]) -> list[dict[str, Any]]:
    """Grad-CAM card records with the bundle's prediction: its calibrated probabilities and decision threshold
    applied to the PyTorch softmax ("predicted", "prob"); the card had shown the uncalibrated top class."""
    if not clinical.get("decision"):
        return records
    threshold, positive = clinical["decision"]["threshold"], clinical["decision"].get("positive_index", 1)
    out = []
    for r in records:
        p = apply_temperature(np.asarray([r["probs"]]), *calibration_of(clinical))[0]
        k = int(decide(p, threshold, positive))
        out.append({**r, "predicted": class_names[k], "prob": float(p[k]), "uncalibrated_prob": r["prob"]})
    return out


def artifact_operating_point(art_logits: np.ndarray, labels: np.ndarray, ref_logits: np.ndarray,
                             clinical: dict[str, Any]) -> dict[str, Any]:
    """One artifact on one split under the bundle's temperature and threshold: its figures with intervals, how
    far its calibrated probabilities are from the reference's, and the DeLong test of its AUC against it."""
    threshold, positive = clinical["decision"]["threshold"], clinical["decision"].get("positive_index", 1)
    p_art = calibrated_softmax(art_logits, *calibration_of(clinical))
    p_ref = calibrated_softmax(ref_logits, *calibration_of(clinical))
    out = {"figures": bootstrap_intervals(labels, p_art, threshold, positive),
           "calibrated_prob_mean_abs_diff": float(np.abs(p_art - p_ref).mean()),
           "calibrated_prob_max_abs_diff": float(np.abs(p_art - p_ref).max())}
    if p_art.shape[1] == 2 and len(np.unique(labels)) == 2:
        out["auc_vs_reference"] = delong_test((labels == positive).astype(int), p_art[:, positive], p_ref[:, positive])
    return out


def write_reliability(stage: Path, reference: dict[str, Any], splits: dict[str, tuple[np.ndarray, np.ndarray]],
                      clinical: dict[str, Any]) -> str | None:
    """The test split's reliability diagram before and after temperature scaling, in the bundle."""
    calibration = clinical.get("calibration")
    if not calibration:
        return None
    logits, y = reference["splits"]["test"]["logits"], splits["test"][1]
    plot_reliability({"uncalibrated": (softmax(logits), y),
                      calibration["method"]: (calibrated_softmax(logits, *calibration_of(clinical)), y)},
                     stage / RELIABILITY_FILE, "test split reliability")
    return RELIABILITY_FILE


def _ci(f: dict[str, float] | None) -> str:
    if not f or f.get("value") is None or f["value"] != f["value"]:
        return "-"
    return f"{f['value']:.3f} [{f['low']:.3f}, {f['high']:.3f}]"


def provenance_text(trained: dict[str, Any]) -> str:
    """The card's sentence of how the model was trained (`training_provenance`); "" for a bundle from before."""
    if not trained.get("recipe"):
        return ""
    teacher = trained.get("teacher")
    return (f" Recipe `{trained['recipe']}` (digest {str(trained.get('recipe_digest'))[:12]}), {trained.get('epochs')} "
            f"epochs, seed {trained.get('seed')}, on {trained.get('dataset')}"
            + (f", a seeded subset of at most {trained['data_limit']} images per split (data.limit)"
               if trained.get("data_limit") else "")
            + (f"; distilled from a {teacher.get('model')} teacher (sha256 {str(teacher.get('sha256'))[:12]}"
               + (f", and {len(teacher['ensemble_sha256'])} ensemble members" if teacher.get("ensemble_sha256") else "")
               + ")" if teacher else "") + ".")


def card_section(metadata: dict[str, Any], parity: dict[str, Any]) -> list[str]:
    """The card's intended use, training data, operating point and calibration sections."""
    card, decision, calibration = metadata.get("card") or {}, metadata.get("decision"), metadata.get("calibration")
    lines = ["", "## Intended use and limitations", "", card.get("intended_use", ""), "",
             *[f"- {x}" for x in card.get("limitations", [])]]
    trained = metadata.get("training_data") or {}
    counts = trained.get("class_counts")
    if counts:
        total = sum(counts.values())
        lines += ["", "## Training data", "", "Class mix of the training split: "
                  + ", ".join(f"{c} {n} ({n / total:.1%})" for c, n in counts.items()) + "."
                  + provenance_text(trained)]
    if decision:
        rule, calibrated = decision["rule"], "calibrated " if calibration else ""
        how = (f"the top class (argmax of the {calibrated or 'uncalibrated softmax '}probabilities)" if rule == "argmax"
               else f"`{decision['positive_class']}` when its {calibrated or 'uncalibrated (softmax) '}probability >= "
               f"{decision['threshold']:.4f}, the threshold chosen on the validation split for {rule}"
               + (f" >= {decision['target']:g}" if decision.get("target") and rule != "youden" else ""))
        ref = parity["reference"]
        subset = (f" The formats' rows are on a `--metric-images` subset of {ref['metric_images']['test']} of the "
                  f"{ref['split_images']['test']} test images, PyTorch's on all of them."
                  if scored_on_subset(parity) else "")
        single = ("" if len((metadata.get("tta") or {}).get("views") or []) <= 1 else
                  " Calibration, threshold and figures are of single-view predictions (the original image); with "
                  "TTA (`--tta`) the label " + ("thresholds" if decision.get("threshold") is not None else
                                                "is the top class of") + " the mean of the views' probabilities, "
                  "whose spread differs, so these figures are not those of TTA predictions.")
        binary = decision.get("positive_class") is not None
        same = (("calibration and threshold." if binary else "calibration (the top class: no threshold).")
                if calibration else "threshold (no calibration: raw softmax)." if binary else "top class (raw softmax).")
        lines += ["", "## Operating point", "", f"Label: {how}. Test figures with 95% intervals (stratified bootstrap, "
                  "1000 resamples" + ("; Wilson score for acc, sensitivity and specificity" if binary else "")
                  + "); every format below is scored under the same " + same
                  + (" Its AUC is of the calibrated probabilities (temperature scaling can move a multi-class macro "
                     "AUC), the per-format table's of the raw softmax." if calibration and not binary else "")
                  + ("" if binary else " Sensitivity and specificity are macro means over the classes.")
                  + subset + single, "",
                  "| model | " + " | ".join(OPERATING_METRICS) + f" | {calibrated}p vs PyTorch (mean abs) |",
                  "|---|" + "---|" * (len(OPERATING_METRICS) + 1),
                  "| pytorch fp32 | " + " | ".join(_ci(decision["test"].get(m)) for m in OPERATING_METRICS) + " | - |"]
        for rec in (r for r in parity["artifacts"] if r["passed"] and r.get("operating_point")):
            op = rec["operating_point"]["test"]
            lines.append(f"| {rec['format']} {rec['precision']} | "
                         + " | ".join(_ci(op["figures"].get(m)) for m in OPERATING_METRICS)
                         + f" | {op['calibrated_prob_mean_abs_diff']:.2e} |")
    if calibration:
        how = (f"Platt scaling: p = sigmoid((z1 - z0) / {calibration['temperature']:.4f} + {calibration['bias'][1]:.4f})"
               if calibration["method"] == "platt" else f"Temperature scaling: T = {calibration['temperature']:.4f}")
        lines += ["", "## Calibration", "", f"{how}, fit by NLL on "
                  f"{calibration['fit_images']} validation images; ECE with {calibration['bins']} equal-width bins."
                  + (f" **Warning:** {calibration['warning']}." if calibration.get("warning") else ""), "",
                  "| split | | ECE | adaptive ECE | Brier (sum over classes) | NLL |", "|---|---|---|---|---|---|"]
        for split in ("val", "test"):
            for when in ("before", "after"):
                f = calibration[split][when]
                lines.append(f"| {split} | {when} | {f['ece']:.4f} | {f['adaptive_ece']:.4f} | {f['brier']:.4f} | "
                             f"{f['nll']:.4f} |")
        if metadata.get("reliability"):
            lines += ["", f"![reliability diagram]({metadata['reliability']})"]
    return lines

