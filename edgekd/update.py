"""`edgekd update`: continual training from a deployed student (a bundle names its checkpoint), then the retention
gate, then export with parity to a new bundle that records its parent (lineage)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edgekd.errors import EdgeKDError
from edgekd.fileio import check_output_location, held_folder, refuse_output_inside, removed_if_only, sha256_file
from edgekd.progress import silent
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
        return source, {"parent_checkpoint": str(source.resolve()), "parent_checkpoint_sha256": sha256_file(source),
                        "parent_test_metrics": checkpoint_test_figures(source)}
    from edgekd.runtime import open_bundle

    bundle = open_bundle(source)
    model = bundle.model
    path, digest = model.get("checkpoint_path"), model.get("checkpoint_sha256")
    if not path or not digest:
        raise EdgeKDError(f"{source}: edgekd.json records no checkpoint path and sha256 (exported by an older edgekd); "
                          "give the checkpoint itself instead of the bundle")
    checkpoint = Path(path)
    if not checkpoint.is_file():
        raise EdgeKDError(f"{source}: its checkpoint {checkpoint} is not there any more (moved? give the moved file, "
                          f"sha256 {digest[:12]}..., as the source instead, with --target "
                          f"{bundle.meta.get('export_profile')}: the new bundle's lineage then names that checkpoint, "
                          "not this bundle and its profile)")
    if sha256_file(checkpoint) != digest:
        raise EdgeKDError(f"{source}: its checkpoint {checkpoint} changed since the export (sha256 differs from "
                          "edgekd.json model.checkpoint_sha256)")
    if load_checkpoint(checkpoint).get("recipe_digest") != model.get("recipe_digest"):
        raise EdgeKDError(f"{source}: the recipe digest of {checkpoint} differs from the bundle's "
                          f"({model.get('recipe_digest')})")
    return checkpoint, {"parent_bundle": str(source.resolve()), "parent_bundle_sha256": bundle.sha256,
                        "parent_created": bundle.meta.get("created"), "parent_checkpoint": str(checkpoint),
                        "parent_checkpoint_sha256": digest,
                        "parent_test_metrics": (bundle.meta.get("metrics") or {}).get("test"),
                        "parent_continual": bundle.meta.get("continual"),
                        "parent_export_profile": bundle.meta.get("export_profile"),
                        "parent_export_profile_digest": bundle.meta.get("export_profile_digest"),
                        "parent_export_profile_settings": bundle.meta.get("export_profile_settings"),
                        "parent_artifacts": sorted(f"{a.format}/{a.precision}" for a in bundle.artifacts)}


def checkpoint_test_figures(checkpoint: Path) -> dict[str, Any] | None:
    """A parent checkpoint's test figures on its own recipe's data, as a parent bundle records them (the card's
    lineage row had been empty for a checkpoint); None for a continual checkpoint, or when that data cannot be read
    here (a data path from another machine: the row stays empty, as before)."""
    import tempfile

    from edgekd.train import evaluate_checkpoint, load_checkpoint

    if load_checkpoint(checkpoint).get("continual"):  # scored per task by `edgekd eval`, not one figure set
        return None
    from edgekd.export import REPORTED_METRICS

    try:
        with tempfile.TemporaryDirectory(prefix="edgekd-parent-") as tmp:  # its metrics.json and plots are not kept
            test = evaluate_checkpoint(checkpoint, tmp, log=lambda line: None)["test"]
    except EdgeKDError:
        return None
    # the keys a bundle records (it had been the whole eval record: intervals, confusion, calibration)
    return {**{k: test[k] for k in REPORTED_METRICS if k in test}, "n": test.get("n")}


def update_bundle(source: str | Path, recipe_path: str | Path, out: str | Path, overrides: list[str] | None = None,
                  run_dir: str | Path | None = None, profile=None, allow_forgetting: bool = False,
                  log: Callable[[str], None] | None = print, progress=None, zip_bundle: bool = False,
                  resume: bool = False, on_run_dir: Callable[[Path], None] | None = None) -> UpdateResult:
    """Learn the continual recipe's tasks starting from the parent's student (its first task is the student's),
    then export the result (retention gate, parity gate) to `out` with the parent's lineage. `profile` None: the
    parent's export profile when it can still be read (update_profile). `resume`: continue the continual run an
    interrupted update left in `run_dir`. `on_run_dir`: told the run folder once it is chosen (the CLI's resume
    hint on Ctrl-C)."""
    log = log or silent  # log=None: say nothing
    from edgekd.export import RetentionGateError, export_checkpoint
    from edgekd.recipe import warn_sections_turned_on

    out = check_update_out(Path(out), source)
    checkpoint, lineage = parent_of(source)
    recipe = update_recipe(recipe_path, overrides or [], checkpoint, source)
    warn_sections_turned_on(recipe_path, overrides or [], log)
    lineage["recipe"] = f"{recipe.name} ({recipe.digest()})"
    if note := first_task_data_note(recipe, checkpoint):
        log(f"warning: {note}")
        lineage["data_note"] = note
    run_dir = update_run_dir(run_dir, recipe.name, out, resume)
    # inside --out, the export would find --out not a bundle, after training
    if Path(run_dir).resolve().is_relative_to(Path(out).resolve()):
        raise EdgeKDError(f"--run-dir {run_dir}: is inside --out {out}, the bundle the export writes; give a run "
                          "folder outside it")
    refuse_output_inside(run_dir, [source], "--run-dir")
    check_output_location(run_dir, "--run-dir")
    if on_run_dir is not None:
        on_run_dir(run_dir)
    settings = lineage.pop("parent_export_profile_settings", None)  # not copied into the child's edgekd.json
    inherited = profile is None
    profile = profile or update_profile(lineage.get("parent_export_profile"),  # before training: a bad one
                                        lineage.get("parent_export_profile_digest"), log, settings)  # fails now
    result = continual_run(recipe, run_dir, checkpoint, resume, log, progress)
    if inherited:
        profile = fit_profile_to_classes(profile, result.best_path, log)
    try:
        exported = export_checkpoint(result.best_path, out, profile=profile, zip_bundle=zip_bundle,
                                     allow_forgetting=allow_forgetting, lineage=lineage, log=log, progress=progress)
    except EdgeKDError as err:  # a gate (retention, parity) or any other refusal of the export
        log(f"update: no bundle was written; the continual run stays in {run_dir}")
        if isinstance(err, RetentionGateError):  # the run stays: no bundle, and plain --allow-forgetting trains anew
            raise RetentionGateError(err.lines, f"the same command with --resume --run-dir {run_dir} "
                                     "--allow-forgetting exports this run anyway, without training it again",
                                     "no bundle was written") from None
        if str(err).startswith("export profile:"):  # e.g. a --target's two-class rule for a 5-class child
            raise EdgeKDError(f"{err}; the trained run stays in {run_dir}: the same command with another --target "
                              f"and --resume --run-dir {run_dir} exports it without training again") from None
        raise
    lost = sorted(set(lineage.get("parent_artifacts") or []) - {f"{a['format']}/{a['precision']}"
                                                              for a in exported.metadata.get("artifacts", [])})
    if lost:  # formats chosen on export's command line are not in the profile it records
        log(f"warning: the parent had {', '.join(lost)}, which this update did not export (its profile does not ask "
            "for them, or the gate left them out); give --target FILE with them to export them too")
    return UpdateResult(result, exported, lineage)


def check_update_out(out: Path, source: str | Path) -> Path:
    """--out refused inside the parent (named as such) and when its zip is the parent; an earlier bundle there
    is replaced whole, as export does (check_target)."""
    from edgekd.export import check_target, zip_beside

    refuse_output_inside(out, [source], replaces=True)
    zipped = zip_beside(out)  # written with --zip, removed as stale when --out is replaced
    if zipped.exists() and zipped.resolve() == Path(source).resolve():
        raise EdgeKDError(f"--out {out}: its zip {zipped} is the parent bundle, which the export would replace or "
                          "remove; give another --out")
    check_target(out)
    return out


def update_recipe(recipe_path: str | Path, overrides: list[str], checkpoint: Path, source: str | Path):
    """The continual recipe an update trains: continual.checkpoint set to the parent's; a recipe that is not
    continual, retrains the deployed head (checkpoint_task: false), or a multi-head parent is refused."""
    from edgekd.recipe import load_recipe, parse_override

    given = load_recipe(recipe_path, overrides)
    if any(parse_override(text)[0] == ["continual", "checkpoint"] for text in overrides):  # replaced without a word
        raise EdgeKDError("--set continual.checkpoint: edgekd update starts from the bundle's own checkpoint (SOURCE); "
                          "to start from another, give that checkpoint as SOURCE")
    if given.continual is None:  # before the override adds a bare section
        raise EdgeKDError(f"{recipe_path}: edgekd update needs a continual recipe (a continual: section with tasks)")
    if not given.continual.checkpoint_task:
        raise EdgeKDError(f"{recipe_path}: continual.checkpoint_task is false, which retrains the deployed task's "
                          "head from scratch; edgekd update continues the deployed model (train a new student with "
                          "edgekd train instead)")
    refuse_multi_head_parent(checkpoint, source)
    return load_recipe(recipe_path, [*overrides, f"continual.checkpoint={json.dumps(str(checkpoint.resolve()))}"])


def continual_run(recipe, run_dir: Path, checkpoint: Path, resume: bool, log: Callable[[str], None], progress):
    """The update's continual run: trained (or resumed) in `run_dir`; with `resume`, a run that finished there
    (an update stopped during its export) is read back as it is and exported."""
    from edgekd.continual import finished_run, run_continual
    from edgekd.train.checkpoint import load_checkpoint

    done = finished_run(run_dir, recipe) if resume else None
    if done is not None:
        began = (load_checkpoint(done.best_path).get("init_weights") or {}).get("sha256")
        if began and began != sha256_file(checkpoint):  # its lineage would name the new parent, its weights the old
            raise EdgeKDError(f"--resume: the continual run in {run_dir} began from another {checkpoint} (sha256 "
                              f"{began[:12]} then, {sha256_file(checkpoint)[:12]} now): the parent changed since; "
                              "update without --resume")
        log(f"update: the continual run in {run_dir} finished; exporting it")
        return done
    log(f"update: continual training from {checkpoint} into {run_dir}")
    # stopped before its first checkpoint (Ctrl-C in the first epoch): a new run folder goes again, so the same
    # command can be run again (a folder of recipe.yaml alone could neither be resumed nor reused)
    # held: two `--resume --run-dir X` had both trained into X
    with removed_if_only(run_dir, ("recipe.yaml",)), held_folder(run_dir, "update"):
        return run_continual(recipe, run_dir, resume=resume, log=log, progress=progress)


def first_task_data_note(recipe, checkpoint: Path) -> str | None:
    """When the recipe's first task (the deployed one) reads other data than the parent was trained on: the retention
    gate and the card's lineage then compare the parent's test figures on one set with this model's on another (an
    update of a demo-set student with a recipe on the full PneumoniaMNIST had passed silently)."""
    from edgekd.continual import task_data_section
    from edgekd.data import data_path_key
    from edgekd.train.checkpoint import load_checkpoint

    parent = load_checkpoint(checkpoint)
    theirs = (parent.get("recipe") or {}).get("data") or {}
    ours = task_data_section(recipe, recipe.continual.tasks[0])
    if (theirs.get("source"), data_path_key(theirs.get("path"))) == (ours.get("source"), data_path_key(ours.get("path"))):
        if theirs.get("limit") == ours.get("limit") or same_test_images(recipe, ours, parent):
            return None
        per = lambda d: f"data.limit {d['limit']}" if d.get("limit") else "no data.limit"  # noqa: E731
        return (f"the first task '{recipe.continual.tasks[0].name}' reads its data with {per(ours)}, the deployed "
                f"model was scored with {per(theirs)}: the card's lineage compares the parent's test figures on other "
                "test images than this model's (the retention gate scores the parent again on this model's)")
    where = lambda d: f"{d.get('source')} {d.get('path') or ''}".strip()  # noqa: E731
    return (f"the first task '{recipe.continual.tasks[0].name}' reads {where(ours)}, not the data the deployed model "
            f"was trained on ({where(theirs)}): the retention gate and the card's lineage compare the parent's test "
            "figures on one set with this model's on another")


def same_test_images(recipe, data_section: dict, parent: dict) -> bool:
    """Whether the first task's data (`data_section`) holds the very test images the parent recorded it was scored
    on (its `data_splits`): two data.limit values at or above the test split's size keep all of it (a limit of 600
    and one of 400 on a 400-image test split had been warned of as other test images)."""
    recorded = (parent.get("data_splits") or {}).get("test")
    if not recorded:  # a checkpoint from before 2026-12-06 records none
        return False
    from edgekd.data import build_data
    from edgekd.recipe import DataConfig

    data = build_data(recipe.model_copy(update={"data": DataConfig.model_validate(data_section), "continual": None}))
    now = data.split_fingerprint(("test",)).get("test", {})
    return all(now.get(key) == value for key, value in recorded.items())


def refuse_multi_head_parent(checkpoint: Path, source: str | Path) -> None:
    """A parent with one head per task cannot learn more tasks yet: its first task would have to be all its heads."""
    from edgekd.train.checkpoint import load_checkpoint

    cont = load_checkpoint(checkpoint).get("continual") or {}
    if cont.get("head") == "multi":
        tasks = ", ".join(str(t.get("name")) for t in cont.get("tasks", []))
        raise EdgeKDError(f"{source}: a student with one head per task ({tasks}) cannot be updated again (a continual "
                          "run starts from one task's head, whatever the new recipe's continual.head); update its "
                          "single-task parent with a recipe of all the tasks")


def update_run_dir(run_dir: str | Path | None, name: str, out: Path, resume: bool = False) -> Path:
    """The continual run's folder, new or empty: one holding an earlier run is never reused (a bundle may name its
    model.pt, and a refused update would still have replaced it); the default runs/<recipe>-update-<out name> takes
    the first free -2, -3, ... suffix. With `resume`: the --run-dir given (the continual run refuses one that holds
    nothing to resume, or another recipe's run)."""
    taken = lambda folder: folder.exists() and (not folder.is_dir() or any(folder.iterdir()))  # noqa: E731
    if resume:
        if run_dir is None:  # the default may have taken a -2, -3 suffix: the log of the interrupted run names it
            raise EdgeKDError("--resume needs --run-dir: the folder the interrupted update trained in (its first "
                              "line, 'update: continual training from ... into DIR', names it)")
        if not Path(run_dir).is_dir():  # said before the data is built (it had been, minutes later)
            raise EdgeKDError(f"--run-dir {run_dir}: no such folder, nothing to resume (give the folder the "
                              "interrupted update trained in)")
        return Path(run_dir)  # a finished run there is exported as it is (continual_run), never retrained
    if run_dir is not None:
        run_dir = Path(run_dir)
        if taken(run_dir):
            raise EdgeKDError(f"--run-dir {run_dir}: is not empty (an earlier run's model.pt may be named by a bundle); "
                              "give a new or empty folder")
        return run_dir
    base = Path("runs") / f"{name}-update-{out.name}"
    return next(p for p in (base, *(base.with_name(f"{base.name}-{i}") for i in range(2, 10_000))) if not taken(p))


def _changed_keys(base: dict, other: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two settings mappings."""
    keys = []
    for key in sorted(set(base) | set(other)):
        a, b = base.get(key), other.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(prefix + key)
    return keys


def fit_profile_to_classes(profile, checkpoint: Path, log: Callable[[str], None]):
    """The parent's export settings for a child that is not two-class (one head over the old and new classes): a
    two-class operating point (decision rule, positive class) and Platt calibration do not apply, and the export had
    refused them after training. They go back to the defaults, with a note when the parent had chosen them."""
    from edgekd.export import load_profile
    from edgekd.train.checkpoint import load_checkpoint

    classes = len(load_checkpoint(checkpoint)["class_names"])
    if classes == 2:
        return profile
    defaults = load_profile(None)
    decision, method = profile.decision, profile.calibration.method
    chosen = ([f"decision.rule {decision.rule}"] if decision.rule != "argmax" else []) \
        + ([f"decision.positive {decision.positive!r}"] if decision.positive != defaults.decision.positive else []) \
        + (["calibration.method platt"] if method == "platt" else [])
    calibration = defaults.calibration if method == "platt" else profile.calibration
    if chosen:
        log(f"note: the updated model has {classes} classes, so the parent's two-class {', '.join(chosen)} do not "
            f"apply: it predicts the top class (calibration: {calibration.method})")
    return profile.model_copy(update={"decision": defaults.decision, "calibration": calibration})


def update_profile(name: str | None, digest: str | None, log: Callable[[str], None],
                   settings: dict | None = None):
    """The parent's export profile, so an update keeps its precisions, views and calibration: the settings its
    edgekd.json records (since 2026-12-06, whatever the profile's name: a file of the user's own without a `name`
    had been re-exported with the defaults), else the defaults or a shipped profile by the name edgekd.json
    records (a note when its digest differs from the parent's: other settings, or another edgekd); the defaults,
    with a warning, for a profile of the user's own (--target FILE exports with it)."""
    from edgekd.export import load_profile, profile_digest, profile_from_dict, shipped_profiles

    if isinstance(settings, dict):
        try:
            profile = profile_from_dict(settings, where="the parent's export_profile_settings")
        except EdgeKDError as err:  # recorded by another edgekd whose keys differ
            log(f"note: {err}; exporting with the profile named {name} instead")
        else:
            named = load_profile(None if name in (None, "default") else name) if name in (
                None, "default", *shipped_profiles()) else None
            changed = [] if named is None else _changed_keys(named.model_dump(mode="json"), settings)
            log(f"update: exporting with the parent's export settings (profile {name}, as its edgekd.json records "
                "them" + (f"; they differ from that profile in {', '.join(changed)}: the parent's command-line "
                          "options or an edited copy" if changed else "")
                + "; --target PROFILE to choose another)")
            return profile
    if name in (None, "default"):
        profile = load_profile(None)
    elif name in shipped_profiles():
        profile = load_profile(name)
        log(f"update: exporting with the parent's profile {name} (--target PROFILE to choose another)")
    else:
        log(f"warning: the parent was exported with a profile of its own ({name}): the update exports with the "
            "defaults; give --target FILE to export with that profile")
        return load_profile(None)
    if digest and profile_digest(profile) != digest:
        log(f"note: the settings of profile {name} differ from the parent's export (export_profile_digest {digest}): "
            "another edgekd version, or other settings under that name")
    return profile
