"""The demo's closing prediction: write a fixed set of test-split images of the built-in PneumoniaMNIST subset as
PNGs (the first N per class, names say the true class), then score `edgekd predict`'s CSV on them.

Usage: python scripts/demo_images.py OUT_DIR [--per-class 4]
       python scripts/demo_images.py --score PREDICTIONS.csv      (numpy + Pillow only)
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image

BUILTIN = Path(__file__).resolve().parents[1] / "edgekd" / "data" / "builtin" / "pneumoniamnist_mini.npz"
CLASS_NAMES = ("normal", "pneumonia")  # PneumoniaMNIST label order


def write_images(out: Path, per_class: int) -> None:
    with np.load(BUILTIN) as npz:
        images, labels = npz["test_images"], npz["test_labels"].reshape(-1)
    out.mkdir(parents=True, exist_ok=True)
    for label, name in enumerate(CLASS_NAMES):
        for i in np.flatnonzero(labels == label)[:per_class]:
            path = out / f"test{i:03d}_{name}.png"
            Image.fromarray(images[i]).save(path)
    print(f"wrote the first {per_class} test images of each class to {out}")


def score(predictions: Path) -> None:
    """Accuracy of the predicted labels against the true class in each file name."""
    rows = list(csv.DictReader(predictions.open()))
    right = sum(Path(r["file"]).stem.rsplit("_", 1)[-1] == r["label"] for r in rows)
    print(f"demo prediction: {right} of {len(rows)} fixed test images right ({right / max(len(rows), 1):.0%})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, nargs="?")
    ap.add_argument("--per-class", type=int, default=4)
    ap.add_argument("--score", type=Path, help="score a predictions CSV of these images instead")
    args = ap.parse_args()
    if args.score:
        score(args.score)
    elif args.out:
        write_images(args.out, args.per_class)
    else:
        ap.error("give OUT_DIR or --score PREDICTIONS.csv")


if __name__ == "__main__":
    main()
