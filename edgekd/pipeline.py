"""Recipe dispatch on top of the stages: supervised training, distillation or continual learning; k-fold runs."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Callable

from edgekd.errors import EdgeKDError
from edgekd.fileio import (check_output_location, held_folder, refuse_output_in_bundle, refuse_unusable_path,
                           removed_if_only)
from edgekd.progress import silent
from edgekd.recipe import entry_arguments


def check_run_dir(out: str | Path) -> None:
    """Refuse a training --out that is a file or holds an exported bundle (training files written into a bundle
    break its manifest, and the next export into it would delete them)."""
    from edgekd.runtime.bundle import METADATA_FILE
    from edgekd.runtime.repository import is_model_repository

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise EdgeKDError(f"--out {out}: is a file; training writes a directory")
    if (out / METADATA_FILE).is_file():
        raise EdgeKDError(f"--out {out}: holds an exported bundle ({METADATA_FILE}); train into another directory")
    if out.is_dir() and is_model_repository(out):
        raise EdgeKDError(f"--out {out}: holds a model repository (Triton or OpenVINO Model Server) a server may "
                          "be reading; train into another directory")


def check_run_inputs(recipe, out: str | Path, recipe_path: str | Path | None, resume: bool, folds: int | None = None,
                     log: Callable[[str], None] = print) -> None:
    """Before a run starts: refuse an --out that would write over the run's own inputs or that is the working
    folder; warn when it already holds another run whose files a k-fold run replaces (other files of it stay; a
    single or continual run warns as it clears them, once its inputs are checked).

    A run writes its files at the top of --out, a continual run also task<i>/ and a k-fold run fold<i>/: a teacher,
    ensemble member or model.weights file in --out itself (or anywhere under it, for those two) would be written
    over, as would the recipe file when it is --out/recipe.yaml. A k-fold run trains its teacher per fold, so
    distill.teacher is not read there."""
    refuse_unusable_path(out)  # before resolving: `~/runs`, a symlink to nothing
    out = Path(out).resolve()
    if out == Path.cwd().resolve():
        raise EdgeKDError(f"--out {out}: the current folder; give the run a folder of its own")
    refuse_output_in_bundle(out, replaces=True)  # --out a bundle: check_run_dir's own message
    check_output_location(out)
    subfolders = folds is not None or recipe.continual is not None
    inputs = {} if folds is not None or recipe.distill is None else {
        "distill.teacher": recipe.distill.teacher,
        **{f"distill.ensemble[{i}]": p for i, p in enumerate(recipe.distill.ensemble)}}
    if recipe.continual is not None:
        inputs["continual.checkpoint"] = recipe.continual.checkpoint
    inputs["model.weights"] = recipe.model.weights  # e.g. the folder's own best.pt, which a new run removes
    for key, given in inputs.items():
        where = Path(given).resolve() if given else None
        if where is not None and (where.parent == out or (subfolders and where.is_relative_to(out))):
            raise EdgeKDError(f"--out {out}: holds {key} {given}, which the run would write over; train into "
                              "another folder (a recipe copied from its teacher keeps the teacher's name, and so "
                              "its default runs/<name>: give the copy its own name)")
    if recipe_path is not None and not resume and Path(recipe_path).resolve() == out / "recipe.yaml":
        raise EdgeKDError(f"--out {out}: the run writes its recipe.yaml over the recipe file {recipe_path}; "
                          "train into another folder")
    if recipe.train.epochs == 0:
        start = "continual.checkpoint's weights, not trained further" if recipe.continual and \
            recipe.continual.checkpoint else "initial weights, untrained"
        log(f"warning: train.epochs is 0: {'model.pt' if recipe.continual else 'best.pt'} will hold the model's {start}")
    from edgekd.train import RUN_MARKERS  # the training side: only a run checks its --out

    found = [f for f in RUN_MARKERS if (out / f).exists()]
    if folds:  # a k-fold run cut short has fold runs but no kfold.json yet
        found += [p.relative_to(out).as_posix() for k in range(folds) for p in sorted((out / f"fold{k}").glob("*/last.pt"))]
    if found and not resume and folds:  # a single or continual run says so as it clears them (remove_earlier_outputs)
        log(f"warning: {out} already holds a run ({', '.join(found[:4])}{', ...' if len(found) > 4 else ''}): its files are replaced by this one; "
            "anything else there (a bundle, eval folders, task folders of other tasks) stays from the earlier run")
    numbers = sorted(int(p.name[4:]) for p in out.glob("fold*") if p.is_dir() and p.name[4:].isdigit())
    stale = [f"fold{k}" for k in numbers if k >= (folds or 0)]  # fold2 before fold10
    if stale and not resume:
        log(f"warning: {out} holds {', '.join(stale)} of an earlier run with {'more ' if folds else ''}folds, "
            f"which this run {'does not train' if folds else 'is not'}: "
            + ("they stay as they are (remove them" if len(stale) > 1 else "it stays as it is (remove it")
            + ", or train into another folder)")


def checked_entry(recipe, out: str | Path, recipe_path: str | Path | None, resume: bool, folds: int | None,
                  log: Callable[[str], None]):
    """(recipe, out, recipe file) of a run, after `edgekd train`'s --out checks (`check_run_dir`,
    `check_run_inputs`); a recipe given as a path is its own recipe file."""
    recipe_path = recipe_path or (recipe if isinstance(recipe, (str, Path)) else None)
    recipe, out = entry_arguments(recipe, out)
    check_run_dir(out)
    check_run_inputs(recipe, out, recipe_path, resume, folds, log)
    return recipe, out, recipe_path


def run_recipe(recipe, out: str | Path, resume: bool = False, log: Callable[[str], None] | None = print, progress=None,
               recipe_path: str | Path | None = None):
    """Run one recipe to a checkpoint: the recipe's sections say which stage trains it. The --out checks of
    `edgekd train` come first (`check_run_inputs`; `recipe_path`: the recipe's file, never written over; a recipe
    given as a path is that file)."""
    log = log or silent  # log=None: say nothing
    recipe, out, _ = checked_entry(recipe, out, recipe_path, resume, None, log)
    if recipe.continual:
        from edgekd.continual.run import run_continual
        from edgekd.train.distributed import is_main_process

        # made now to be locked; removed again if refused before its first file (not when the lock is refused:
        # the folder is then another run's, however new it looked)
        with removed_if_only(out, ()), held_folder(out, "continual run") if is_main_process() else nullcontext():
            return run_continual(recipe, out, resume=resume, log=log, progress=progress)
    if recipe.distill:
        from edgekd.distill.run import distill_recipe
        return distill_recipe(recipe, out, resume=resume, log=log, progress=progress)
    from edgekd.train.run import train_recipe
    return train_recipe(recipe, out, resume=resume, log=log, progress=progress)


def run_folds(recipe, out: str | Path, folds: int, log: Callable[[str], None] | None = print, progress=None,
              recipe_path: str | Path | None = None, teacher_overrides: list[str] | None = None,
              resume: bool = False) -> dict:
    """k-fold cross-validation (KD-OCT protocol); implemented by the distillation stage's fold driver
    (`recipe_path`: the recipe's file, where a relative `distill.teacher_recipe` is also looked for). The whole
    of `out` is held for the run's length (each fold's runs also hold their own folders)."""
    log = log or silent  # log=None: say nothing
    if folds < 2:
        raise EdgeKDError("--folds must be at least 2")
    recipe, out, recipe_path = checked_entry(recipe, out, recipe_path, resume, folds, log)
    set_folds = recipe.data.folds
    if set_folds is not None and set_folds != folds:  # --folds sets data.folds and data.fold for each fold
        raise EdgeKDError(f"--folds {folds} with data.folds {set_folds} in the recipe: give one count (--folds "
                          "sets data.folds and data.fold for each fold)")
    from edgekd.distill.folds import run_kfold
    from edgekd.train.distributed import is_main_process

    # a second k-fold run into the same --out had retrained a finished fold between two of the first run's folds
    with removed_if_only(out, ()), held_folder(out, "k-fold run") if is_main_process() else nullcontext():
        return run_kfold(recipe, out, folds, log=log, progress=progress, recipe_path=recipe_path,
                         teacher_overrides=teacher_overrides, resume=resume)
