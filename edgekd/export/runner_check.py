"""The end-to-end check at export: what `edgekd predict` runs must predict what the gate checked.

The parity gate runs each artifact on inputs the export prepared with torchvision (the training eval pipeline, the
TTA views in torch, normalization). On the device the runtime's Runner does that itself: numpy resize, the views
and the normalization compiled into the graph (OpenVINO) or in numpy (ONNX Runtime), a mean of the views'
softmax. This check opens the staged bundle as the device will (manifest, embedded metadata, input shape) and gives
its Runner the parity images as decoded, at their own size. Its uncalibrated ensemble probabilities are compared
with the same artifact's on the export's inputs (the gate's logits), so the gap measured is the runner's
preprocessing alone, not quantization: a resize rounding of one uint8 level moves a probability by far less than
the default 0.01; a wrong mean, std, channel order, crop or view moves it by more. Top-1 agreement counts the
images whose two leading classes are more than `max_prob_diff` apart: a near tie may flip within the tolerance.
A continual model's parity images are each task's; with a head per task every head's softmax is compared.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgekd.export.parity import ParitySet
from edgekd.export.profile import RunnerCheck
from edgekd.formats import PRECISIONS
from edgekd.probability import softmax

BACKENDS = ("onnx", "openvino")
"""The formats checked, each by the runtime backend of its name (the one that runs its own file on the device)."""


def checked_paths(artifacts: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(format, backend) pairs the check runs: each format on its own backend, and the ONNX file on OpenVINO too when
    that is what `edgekd predict` and `serve` run by default: the most precise model is ONNX only (OpenVINO, the
    default backend, then reads the ONNX file)."""
    formats = {a["format"] for a in artifacts}
    pairs = [(fmt, fmt) for fmt in BACKENDS if fmt in formats]
    best = next(p for p in PRECISIONS if any(a["precision"] == p for a in artifacts))
    if not any(a["format"] == "openvino" and a["precision"] == best for a in artifacts):
        pairs.append(("onnx", "openvino"))
    return pairs


def runner_check(stage: Path, artifacts: list[dict[str, Any]], parity_set: ParitySet, limits: RunnerCheck,
                 threads: int | None, batch_size: int,
                 gate_logits: dict[tuple[str, str], dict[str, np.ndarray]]) -> tuple[dict, list[str]]:
    """Per format, its most precise shipped artifact run by the Runner on the parity set's decoded images vs the
    bare artifact on the parity inputs, every view (`gate_logits[(format, precision)]["logits"]`, kept by the
    gate): a record for parity.json and the failures (empty: passed)."""
    from edgekd.runtime import Preprocessor, Runner, open_bundle

    if not limits.enabled:
        return {"skipped": "parity.runner.enabled is false"}, []
    parts = parity_set.decoded_parts  # a continual model's: one block of rows per task
    if not parts:
        return {"skipped": "no decoded images to give the runner"}, []
    views = list(dict.fromkeys(parity_set.views))
    record: dict[str, Any] = {"images": sum(len(ix) for _, ix in parts), "views": views, "limits": limits.model_dump()}
    failures: list[str] = []
    bundle = open_bundle(stage)
    # At model size once (resize, crop, hair removal: the step before any backend), then each format's Runner.
    preprocessor = Preprocessor(bundle.preprocess)
    sized = [preprocessor.to_model_size(dataset.raw(i), keep_gray=True) for dataset, ix in parts for i in ix]
    sources = [f"parity image {i}" for _, ix in parts for i in ix]
    for fmt, backend in checked_paths(artifacts):
        shipped = sorted((a for a in artifacts if a["format"] == fmt), key=lambda a: PRECISIONS.index(a["precision"]))
        art = shipped[0]
        logits = gate_logits[(fmt, art["precision"])]["logits"]  # a shipped artifact passed the gate: it ran
        with Runner.from_bundle(bundle, backend=backend, precision=art["precision"], threads=threads, tta=views,
                                warmup=0) as runner:
            preds = [p for i in range(0, len(sized), batch_size)
                     for p in runner.predict_sized(sized[i:i + batch_size], sources[i:i + batch_size])]
        key = f"{fmt}/{art['precision']}" + ("" if backend == fmt else f" on {backend}")
        row = _compare_heads(preds, logits, parts, len(views), parity_set.heads, limits)
        record[key] = {"backend": backend, **row}
        failures += [f"runner check {key}: {problem}" for problem in row.pop("problems")]
    return record, failures


def view_mean_probs(logits: np.ndarray, parts: list[tuple[Any, list[int]]], n_views: int) -> np.ndarray:
    """The artifact's TTA-averaged softmax per image from its gate logits, whose rows are view-major within each
    part's block (a continual model's merged set: one block per task)."""
    out, start = [], 0
    for _, indices in parts:
        block = logits[start:start + n_views * len(indices)].astype(np.float64)
        out.append(softmax(block).reshape(n_views, len(indices), -1).mean(axis=0))
        start += n_views * len(indices)
    return np.concatenate(out)


def _compare_heads(preds: list, logits: np.ndarray, parts: list[tuple[Any, list[int]]], n_views: int,
                   heads: list[tuple[str, int, int]] | None, limits: RunnerCheck) -> dict[str, Any]:
    """_compare of the runner's predictions: one softmax, or each head's (a multi-head bundle's runner answers
    every task with its own head); a multi-head row holds every head's and the worst figures over them."""
    if heads is None:
        got = np.stack([p.probs if p.raw_probs is None else p.raw_probs for p in preds])
        return _compare(got, view_mean_probs(logits, parts, n_views), limits)
    per_head = {}  # task i's images are parts[i]: a head's top-1 agreement is taken on its own task's images
    owner = np.repeat(np.arange(len(parts)), [len(ix) for _, ix in parts]) if len(parts) == len(heads) else None
    for i, (name, lo, hi) in enumerate(heads):
        got = np.stack([p.tasks[name].probs for p in preds])
        per_head[name] = _compare(got, view_mean_probs(logits[:, lo:hi], parts, n_views), limits,
                                  None if owner is None else owner == i)
    rows = list(per_head.values())
    return {"max_prob_diff": max(r["max_prob_diff"] for r in rows),
            "mean_prob_diff": float(np.mean([r["mean_prob_diff"] for r in rows])),
            "top1_agreement": min(r["top1_agreement"] for r in rows), "near_ties": sum(r["near_ties"] for r in rows),
            "top1_agreement_decisive": min(r["top1_agreement_decisive"] for r in rows),
            "problems": [f"head '{name}': {p}" for name, r in per_head.items() for p in r.pop("problems")],
            "heads": per_head}


def _compare(got: np.ndarray, expected: np.ndarray, limits: RunnerCheck,
             own: np.ndarray | None = None) -> dict[str, Any]:
    """The runner's probabilities against the artifact's: figures and the limits they break; top-1 agreement on
    the rows `own` marks (a head's own task's images; None: every row)."""
    diff = np.abs(got - expected)
    if own is not None:
        got, expected = got[own], expected[own]
    top2 = np.sort(expected, axis=1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) > (limits.max_prob_diff or 0.0)
    agree = got.argmax(1) == expected.argmax(1)
    decided = float(agree[decisive].mean()) if decisive.any() else 1.0
    row = {"max_prob_diff": float(diff.max()), "mean_prob_diff": float(diff.mean()),
           "top1_agreement": float(agree.mean()) if len(agree) else 1.0, "near_ties": int((~decisive).sum()),
           "top1_agreement_decisive": decided, "problems": []}
    if limits.max_prob_diff is not None and diff.max() > limits.max_prob_diff:
        row["problems"].append(f"the runner's probabilities on the decoded images differ from the artifact's on "
                               f"the export's inputs by {diff.max():.3g} > {limits.max_prob_diff} (the runtime's "
                               "resize and crop give this model other inputs than the export's torchvision pipeline: "
                               "a wrong mean, std or view does this, and so does a model very sensitive to "
                               "resampling, e.g. at a small input size; a profile with tta.views [original] tells whether "
                               "a view is the cause)")
    if limits.top1_agreement is not None and decided < limits.top1_agreement:
        row["problems"].append(f"top-1 agreement {decided:.2%} < {limits.top1_agreement:.2%} between the runner and "
                               "the artifact on the same images (near ties left out)")
    return row
