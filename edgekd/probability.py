"""Class probabilities from logits in numpy, torch-free: the training side and the edge runtime share it."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (stable: the row max is subtracted first)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T) from softmax(logits): log p differs from the logits by a per-row constant, which the
    softmax removes, so the runner can calibrate a backend's probabilities (OpenVINO's softmax is in the graph)."""
    if temperature == 1.0:
        return probs
    logp = np.log(np.maximum(np.asarray(probs, dtype=np.float64), np.finfo(np.float64).tiny))
    return softmax(logp / temperature)
