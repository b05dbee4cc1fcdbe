"""Class probabilities from logits in numpy, torch-free: the training side and the edge runtime share it."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (stable: the row max is subtracted first)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def head_softmax(logits: np.ndarray, heads: list[tuple[int, int]] | None = None) -> np.ndarray:
    """softmax over each head's slice [lo, hi) of the outputs (a multi-head model's tasks side by side), or over
    all of them (heads None)."""
    if heads is None:
        return softmax(logits)
    z = np.asarray(logits, dtype=np.float64)
    return np.concatenate([softmax(z[..., lo:hi]) for lo, hi in heads], axis=-1)


def calibrated_softmax(logits: np.ndarray, temperature: float = 1.0, bias: np.ndarray | None = None) -> np.ndarray:
    """softmax(logits / T + bias): temperature scaling (bias None) or, for two classes, Platt scaling."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    return softmax(z if bias is None else z + np.asarray(bias, dtype=np.float64))


def apply_temperature(probs: np.ndarray, temperature: float, bias: np.ndarray | None = None) -> np.ndarray:
    """calibrated_softmax(logits, T, bias) from softmax(logits): log p differs from the logits by a per-row
    constant, which the softmax removes (T scales it, still per row), so the runner can calibrate a backend's
    probabilities (OpenVINO's softmax is in the graph)."""
    if temperature == 1.0 and bias is None:
        return probs
    logp = np.log(np.maximum(np.asarray(probs, dtype=np.float64), np.finfo(np.float64).tiny))
    return calibrated_softmax(logp, temperature, bias)
