"""Rebuild edgekd/data/builtin/pneumoniamnist_mini.npz: a seeded, class-stratified subset of PneumoniaMNIST.

Usage: python scripts/make_builtin_dataset.py ../shared/data/medmnist/pneumoniamnist.npz
"""

import sys
from pathlib import Path

import numpy as np

SIZES = {"train": 1000, "val": 200, "test": 300}


def main(src: str) -> None:
    rng = np.random.default_rng(2024)
    npz = np.load(src)
    out = {}
    for split, n in SIZES.items():
        labels = npz[f"{split}_labels"].reshape(-1)
        # Per class: half the images from each class where possible, so the demo trains balanced.
        picks = []
        for c in np.unique(labels):
            idx = np.flatnonzero(labels == c)
            picks.append(rng.choice(idx, size=min(len(idx), n // 2), replace=False))
        idx = np.sort(np.concatenate(picks))
        out[f"{split}_images"] = npz[f"{split}_images"][idx]
        out[f"{split}_labels"] = npz[f"{split}_labels"][idx]
    dst = Path(__file__).resolve().parents[1] / "edgekd/data/builtin/pneumoniamnist_mini.npz"
    np.savez_compressed(dst, **out)
    print(dst, {k: v.shape for k, v in out.items()})


if __name__ == "__main__":
    main(sys.argv[1])
