"""Write a few test-split images of the built-in PneumoniaMNIST subset as PNGs, for `edgekd predict` in the demo.

Usage: python scripts/demo_images.py OUT_DIR [--per-class 2]   (numpy + Pillow only; names say the true class)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

BUILTIN = Path(__file__).resolve().parents[1] / "edgekd" / "data" / "builtin" / "pneumoniamnist_mini.npz"
CLASS_NAMES = ("normal", "pneumonia")  # PneumoniaMNIST label order


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--per-class", type=int, default=2)
    args = ap.parse_args()
    with np.load(BUILTIN) as npz:
        images, labels = npz["test_images"], npz["test_labels"].reshape(-1)
    args.out.mkdir(parents=True, exist_ok=True)
    for label, name in enumerate(CLASS_NAMES):
        for i in np.flatnonzero(labels == label)[:args.per_class]:
            path = args.out / f"test{i:03d}_{name}.png"
            Image.fromarray(images[i]).save(path)
            print(path)


if __name__ == "__main__":
    main()
