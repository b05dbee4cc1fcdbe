"""`edgekd update`: continual training from a deployed student (a bundle names its checkpoint), then the retention
gate, then export with parity to a new bundle that records its parent (lineage)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edgekd.errors import EdgeKDError
from edgekd.fileio import sha256_file
from edgekd.runtime import is_bundle


@dataclass
class UpdateResult:
    """The continual run (accuracy matrix) and the export of its model (the new bundle)."""

    continual: Any
    export: Any
    lineage: dict[str, Any]


def parent_of(source: str | Path) -> tuple[Path, dict[str, Any]]:
    """(the student checkpoint to continue from, the lineage the new bundle records) of a bundle or a checkpoint.

    A bundle (verified against its manifest) names its checkpoint by path and sha256 in edgekd.json: the file must
    still be there, unchanged, and carry the recipe digest the bundle recorded."""
    from edgekd.train.checkpoint import load_checkpoint

    source = Path(source)
    if source.is_dir() and not is_bundle(source):
        raise EdgeKDError(f"{source}: a folder that is not an edgekd bundle (no edgekd.json); give a bundle or a "
                          "checkpoint (best.pt)")
    if not is_bundle(source):
        return source, {"parent_checkpoint": str(source.resolve()), "parent_checkpoint_sha256": sha256_file(source)}
    from edgekd.runtime import open_bundle

    bundle = open_bundle(source)
    model = bundle.model
    path, digest = model.get("checkpoint_path"), model.get("checkpoint_sha256")
    if not path or not digest:
        raise EdgeKDError(f"{source}: edgekd.json records no checkpoint path and sha256 (exported by an older edgekd); "
                          "give the checkpoint itself instead of the bundle")
    checkpoint = Path(path)
    if not checkpoint.is_file():
        raise EdgeKDError(f"{source}: its checkpoint {checkpoint} is not there any more")
    if sha256_file(checkpoint) != digest:
        raise EdgeKDError(f"{source}: its checkpoint {checkpoint} changed since the export (sha256 differs from "
                          "edgekd.json model.checkpoint_sha256)")
    if load_checkpoint(checkpoint).get("recipe_digest") != model.get("recipe_digest"):
        raise EdgeKDError(f"{source}: the recipe digest of {checkpoint} differs from the bundle's "
                          f"({model.get('recipe_digest')})")
    return checkpoint, {"parent_bundle": str(source), "parent_bundle_sha256": bundle.sha256,
                        "parent_created": bundle.meta.get("created"), "parent_checkpoint": str(checkpoint),
                        "parent_checkpoint_sha256": digest,
                        "parent_test_metrics": (bundle.meta.get("metrics") or {}).get("test"),
                        "parent_continual": bundle.meta.get("continual")}


def update_bundle(source: str | Path, recipe_path: str | Path, out: str | Path, overrides: list[str] | None = None,
                  run_dir: str | Path | None = None, profile=None, allow_forgetting: bool = False,
                  log: Callable[[str], None] = print, progress=None) -> UpdateResult:
    """Learn the continual recipe's tasks starting from the parent's student (its first task is the student's),
    then export the result (retention gate, parity gate) to `out` with the parent's lineage."""
    from edgekd.continual import run_continual
    from edgekd.export import check_target, export_checkpoint, load_profile
    from edgekd.recipe import load_recipe

    out = Path(out)
    check_target(out)
    if Path(source).resolve() == out.resolve():
        raise EdgeKDError(f"--out {out}: is the parent bundle; write the update to a new directory")
    checkpoint, lineage = parent_of(source)
    if load_recipe(recipe_path, overrides or []).continual is None:  # before the override adds a bare section
        raise EdgeKDError(f"{recipe_path}: edgekd update needs a continual recipe (a continual: section with tasks)")
    recipe = load_recipe(recipe_path, [*(overrides or []), f"continual.checkpoint={checkpoint.resolve()}"])
    lineage["recipe"] = f"{recipe.name} ({recipe.digest()})"
    # One run folder per output bundle: a second update must not overwrite the checkpoint an earlier bundle names.
    run_dir = Path(run_dir) if run_dir is not None else Path("runs") / f"{recipe.name}-update-{out.name}"
    log(f"update: continual training from {checkpoint} into {run_dir}")
    result = run_continual(recipe, run_dir, log=log, progress=progress)
    exported = export_checkpoint(result.best_path, out, profile=profile or load_profile(None),
                                 allow_forgetting=allow_forgetting, lineage=lineage, log=log, progress=progress)
    return UpdateResult(result, exported, lineage)
