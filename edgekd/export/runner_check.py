"""The end-to-end check at export: what `edgekd predict` runs must predict what the gate checked.

The parity gate runs each artifact on inputs the export prepared with torchvision (the training eval pipeline, the
TTA views in torch, normalization). On the device the runtime's Runner does that itself: numpy resize, the views
and the normalization compiled into the graph (OpenVINO) or in numpy (ONNX Runtime), a mean of the views'
softmax. This check opens the staged bundle with that Runner (verifying it as the device will: manifest, embedded
metadata, input shape) and gives it the parity images as decoded, at their own size. Its uncalibrated ensemble
probabilities are compared with the same artifact's on the export's inputs, so the gap measured is the runner's
preprocessing alone, not quantization: a resize rounding of one uint8 level moves a probability by far less than
the default 0.01; a wrong mean, std, channel order, crop or view moves it by more.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgekd.export.formats import FORMATS
from edgekd.export.parity import ParitySet, run_batched
from edgekd.export.profile import RunnerCheck
from edgekd.formats import PRECISIONS
from edgekd.probability import softmax

BACKEND_OF_FORMAT = {"onnx": "onnx", "openvino": "openvino"}
"""The runtime backend that runs each format's own file on the device."""


def runner_check(stage: Path, artifacts: list[dict[str, Any]], parity_set: ParitySet, limits: RunnerCheck,
                 threads: int | None, batch_size: int,
                 gate_logits: dict[tuple[str, str], dict[str, np.ndarray]] | None = None) -> tuple[dict[str, Any], list[str]]:
    """Per format, its most precise shipped artifact run by the Runner on the parity set's decoded images vs the
    bare artifact on the parity inputs (every view; its logits from the gate when `gate_logits` has them, else run
    again): a record for parity.json and the failures (empty: passed)."""
    from edgekd.runtime import Runner

    raw_images = parity_set.raw_images
    if not limits.enabled or parity_set.heads is not None or not raw_images:
        reason = ("off (parity.runner.enabled: false)" if not limits.enabled else
                  "a multi-head bundle" if parity_set.heads is not None else "a continual checkpoint's parity set")
        return {"skipped": reason}, []
    views = list(dict.fromkeys(parity_set.views))
    record: dict[str, Any] = {"images": len(raw_images), "views": views, "limits": limits.model_dump()}
    failures: list[str] = []
    for fmt, backend in BACKEND_OF_FORMAT.items():
        shipped = sorted((a for a in artifacts if a["format"] == fmt), key=lambda a: PRECISIONS.index(a["precision"]))
        if not shipped:
            continue
        art = shipped[0]
        logits = (gate_logits or {}).get((fmt, art["precision"]), {}).get("logits")
        if logits is None:
            logits = run_batched(FORMATS[fmt].open(stage / art["path"], art["precision"], threads), parity_set.inputs,
                                 batch_size)
        bare = softmax(logits.astype(np.float64))
        expected = bare.reshape(len(views), len(raw_images), -1).mean(axis=0)
        with Runner.from_bundle(stage, backend=backend, precision=art["precision"], threads=threads, tta=views,
                                warmup=0) as runner:
            preds = [p for i in range(0, len(raw_images), batch_size)
                     for p in runner.predict_batch(raw_images[i:i + batch_size])]
        got = np.stack([p.probs if p.raw_probs is None else p.raw_probs for p in preds])
        diff = np.abs(got - expected)
        agree = float((got.argmax(1) == expected.argmax(1)).mean())
        key = f"{fmt}/{art['precision']}"
        record[key] = {"backend": backend, "max_prob_diff": float(diff.max()), "mean_prob_diff": float(diff.mean()),
                       "top1_agreement": agree}
        if limits.max_prob_diff is not None and diff.max() > limits.max_prob_diff:
            failures.append(f"runner check {key}: the runner's probabilities on the decoded images differ from the "
                            f"artifact's on the export's inputs by {diff.max():.3g} > {limits.max_prob_diff} (its "
                            "preprocessing does not match the training eval pipeline)")
        if limits.top1_agreement is not None and agree < limits.top1_agreement:
            failures.append(f"runner check {key}: top-1 agreement {agree:.2%} < {limits.top1_agreement:.2%} between "
                            "the runner and the artifact on the same images")
    return record, failures
