"""Expanding `edgekd predict` inputs (files, folders, globs) into an ordered list of image paths."""

from __future__ import annotations

import glob
from pathlib import Path

from edgekd.imageio import IMAGE_SUFFIXES


def collect_inputs(specs: list[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files as given, folders recursively (image suffixes only, sorted), globs expanded (sorted).

    Returns (paths, problems): a spec matching nothing is a (spec, message) problem, not an exception,
    so one typo does not stop a batch run. A path reached twice is kept once, at its first position.
    """
    paths: list[Path] = []
    problems: list[tuple[str, str]] = []
    seen: set[Path] = set()

    def add(p: Path) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            paths.append(p)

    for spec in specs:
        text = str(spec)
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                problems.append((text, f"{path}: folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})"))
            for p in found:
                add(p)
        elif path.exists():
            add(path)
        elif glob.has_magic(text):
            found = sorted(Path(p) for p in glob.glob(text, recursive=True))
            files = [p for p in found if p.is_file()]
            if not files:
                problems.append((text, f"{text}: pattern matches no files"))
            for p in files:
                add(p)
        else:
            problems.append((text, f"{path}: no such file or folder"))
    return paths, problems
