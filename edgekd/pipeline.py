"""Recipe dispatch on top of the stages: supervised training, distillation or continual learning; k-fold runs."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from edgekd.errors import EdgeKDError


def check_run_dir(out: str | Path) -> None:
    """Refuse a training --out that is a file or holds an exported bundle (training files written into a bundle
    break its manifest, and the next export into it would delete them)."""
    from edgekd.runtime.bundle import METADATA_FILE

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise EdgeKDError(f"--out {out}: is a file; training writes a directory")
    if (out / METADATA_FILE).is_file():
        raise EdgeKDError(f"--out {out}: holds an exported bundle ({METADATA_FILE}); train into another directory")


def run_recipe(recipe, out: str | Path, resume: bool = False, log: Callable[[str], None] = print, progress=None):
    """Run one recipe to a checkpoint: the recipe's sections say which stage trains it."""
    check_run_dir(out)
    if recipe.continual:
        from edgekd.continual.run import run_continual
        return run_continual(recipe, out, resume=resume, log=log, progress=progress)
    if recipe.distill:
        from edgekd.distill.run import distill_recipe
        return distill_recipe(recipe, out, resume=resume, log=log, progress=progress)
    from edgekd.train.run import train_recipe
    return train_recipe(recipe, out, resume=resume, log=log, progress=progress)


def run_folds(recipe, out: str | Path, folds: int, log: Callable[[str], None] = print, progress=None,
              recipe_path: str | Path | None = None, teacher_overrides: list[str] | None = None) -> dict:
    """k-fold cross-validation (KD-OCT protocol); implemented by the distillation stage's fold driver
    (`recipe_path`: the recipe's file, where a relative `distill.teacher_recipe` is also looked for)."""
    if folds < 2:
        raise EdgeKDError("--folds must be at least 2")
    check_run_dir(out)
    from edgekd.distill.folds import run_kfold
    return run_kfold(recipe, out, folds, log=log, progress=progress, recipe_path=recipe_path,
                     teacher_overrides=teacher_overrides)
