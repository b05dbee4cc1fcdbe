"""k-fold driver (KD-OCT protocol): per fold train the teacher, distill the student, report mean ± std."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgekd.data import FILE_SOURCES, data_path_key, load_source, split_listing, split_tables
from edgekd.distill.unlabeled import check_pool_for_folds
from edgekd.errors import EdgeKDError
from edgekd.fileio import deferred_signals, write_json, write_text
from edgekd.host import host_record
from edgekd.progress import silent
from edgekd.recipe import find_recipe_file, load_recipe, recipe_from_dict

SUMMARY_METRICS = ("acc", "balanced_acc", "auc", "f1", "sensitivity", "specificity", "pauc")


def fold_recipe(recipe, folds: int, fold: int, split: str, **distill_over):
    raw = recipe.to_dict()
    raw["data"].update(folds=folds, fold=fold, split=split)
    if distill_over and raw.get("distill"):
        raw["distill"].update(distill_over)
    return recipe_from_dict(raw, where=f"{recipe.name} fold {fold}")


def fold_teacher(teacher_base, recipe, folds: int, fold: int, split: str):
    """The fold teacher's recipe for `fold`: the teacher recipe on the student's folds, with the student's seed (the
    folds are drawn with it)."""
    return fold_recipe(teacher_base.model_copy(update={"seed": recipe.seed}), folds, fold, split)


def split_mode(recipe, log: Callable[[str], None]) -> str:
    """Patient-level folds whenever the source has patient ids, so no patient is in two folds."""
    if recipe.data.split == "patient":
        return "patient"
    if recipe.data.patient_pattern or recipe.data.dicom_patient_ids:
        where = ("the file names (data.patient_pattern)" if recipe.data.patient_pattern else
                 "the DICOM files' PatientID (data.dicom_patient_ids)")
        log(f"k-fold: patient ids from {where}: folds are patient-level")
        return "patient"
    source = load_source(recipe.data.source, recipe.data.path)
    if source.tables and all(t.groups is not None for t in source.tables.values()):
        log("k-fold: the data has patient ids: folds are patient-level (data.split=patient)")
        return "patient"
    log("k-fold: the data has no patient ids: folds are image-level, so one patient's images can be in two folds "
        "(give ids: a CSV patient_id column, data.patient_pattern or data.dicom_patient_ids)")
    return recipe.data.split


def same_data_value(key: str, a: Any, b: Any) -> bool:
    """Whether a data key of the fold teacher's recipe equals the student's (paths: the same file or folder,
    however spelled: a trailing slash, a relative path or a symlink)."""
    return data_path_key(a) == data_path_key(b) if key == "path" else a == b


def kfold_preflight(recipe, folds: int, recipe_path: str | Path | None = None,
                    teacher_overrides: list[str] | None = None, log: Callable[[str], None] = print):
    """What `train --folds` checks before anything trains (`edgekd check --folds` too): the fold teacher's recipe,
    leaks between folds, the unlabeled pool, the fold unit (patient or image) and that the data holds `folds`
    folds (fold 0's splits drawn). Returns (split, the fold teacher's recipe or None)."""
    if teacher_overrides and not recipe.distill:  # (it had been ignored by run_kfold)
        raise EdgeKDError("--teacher-set is for --folds with a distill recipe (the teacher trained on each fold)")
    teacher_base = fold_teacher_recipe(recipe, recipe_path, teacher_overrides) if recipe.distill else None
    if recipe.distill and recipe.distill.teacher:  # README says so; the log had not
        log(f"k-fold: distill.teacher {recipe.distill.teacher} is not used: each fold distills from its own "
            "distill.teacher_recipe, trained on that fold")
    refuse_fold_leaks(recipe, teacher_base)
    check_pool_for_folds(recipe, folds)  # before the first teacher trains (a bad pool had failed after it)
    split = split_mode(recipe, log)
    split_tables(fold_recipe(recipe, folds, 0, split))  # folds the data cannot hold: refused before anything goes
    return split, teacher_base


def run_kfold(recipe, out: str | Path, folds: int, log: Callable[[str], None] | None = print, progress=None,
              recipe_path: str | Path | None = None, teacher_overrides: list[str] | None = None,
              resume: bool = False) -> dict[str, Any]:
    """Train `folds` times, fold i held out as validation; with a distill section, each fold first trains
    `distill.teacher_recipe` on the same fold and distills from that teacher (no held-out image is ever seen
    by the teacher). Writes fold<i>/<role>/ runs, kfold.json and kfold.md; returns the summary. `resume`: a fold
    run that finished is kept, one cut short goes on from its last.pt, the rest train (fold_run)."""
    log = log or silent  # log=None: say nothing
    from edgekd.distill.run import distill_recipe
    from edgekd.train.distributed import is_main_process
    from edgekd.train import remove_earlier_outputs, train_recipe

    out = Path(out)
    if resume and next(out.glob("fold*/*/last.pt"), None) is None:
        raise EdgeKDError(f"{out}: no fold run to resume (no fold<i>/<role>/last.pt)")
    main = is_main_process()
    split, teacher_base = kfold_preflight(recipe, folds, recipe_path, teacher_overrides, log)
    if main and not resume:  # an earlier k-fold run's folds and summary go now, its later folds included: a stop
        with deferred_signals():  # in fold 2 had left them beside the new fold 1, and --resume refused them
            for run_dir in [out, *(d for d in out.glob("fold*/*") if d.is_dir())]:
                remove_earlier_outputs(run_dir)
            for fold_splits in out.glob("fold*/splits.json"):
                fold_splits.unlink()
    rows: list[dict[str, Any]] = []
    for fold in range(folds):
        fold_dir = out / f"fold{fold}"
        log(f"k-fold: fold {fold + 1}/{folds} (held out as validation; runs in {fold_dir})")
        rec = fold_recipe(recipe, folds, fold, split)
        if teacher_base is not None:
            t_rec = fold_teacher(teacher_base, recipe, folds, fold, split)
            t_res = fold_run(train_recipe, t_rec, fold_dir / "teacher", resume, log, progress)
            rows.append(_row(fold, "teacher", t_rec, t_res))
            s_rec = fold_recipe(recipe, folds, fold, split, teacher=str(t_res.best_path.resolve()))  # --out spelled any way
            s_res = fold_run(distill_recipe, s_rec, fold_dir / s_rec.role, resume, log, progress)
            rows.append(_row(fold, s_rec.role, s_rec, s_res))
        else:
            res = fold_run(train_recipe, rec, fold_dir / rec.role, resume, log, progress)
            rows.append(_row(fold, rec.role, rec, res))
        if main:  # once the fold's runs took it (a refused --resume had rewritten it beside the earlier models)
            write_fold_splits(fold_dir / "splits.json", rec)
    summary = summarize_folds(rows)
    unit = "patient" if split == "patient" else "image"
    table = folds_markdown(summary, recipe.name, folds, unit)
    result = {"name": recipe.name, "folds": folds, "split": split, "fold_unit": unit, "runs": rows,
              "summary": summary, "table_markdown": table, "machine": host_record()}
    if main:  # (a resumed run's top: what an earlier run left there goes as this one's results come)
        with deferred_signals():
            remove_earlier_outputs(out)
            write_json(out / "kfold.json", result)
            write_text(out / "kfold.md", table + "\n")
    return result


def fold_teacher_recipe(recipe, recipe_path: str | Path | None, teacher_overrides: list[str] | None):
    """A distill recipe's `distill.teacher_recipe` (with --teacher-set), the teacher each fold trains: refused
    when absent, when --teacher-set gives it a seed, or when its data differs from the student's (other folds).
    A `seed:` in the teacher's file is replaced by the student's (the folds are drawn with it)."""
    if not recipe.distill.teacher_recipe:
        raise EdgeKDError("--folds with a distill recipe needs distill.teacher_recipe (the teacher is "
                          "retrained on each fold so it never sees that fold's validation images)")
    teacher_base = load_recipe(find_recipe_file(recipe.distill.teacher_recipe, "distill.teacher_recipe",
                                                recipe_path), teacher_overrides, "--teacher-set")
    if any(o.split("=", 1)[0].strip() == "seed" for o in teacher_overrides or []):
        raise EdgeKDError("--teacher-set seed=...: the fold teacher takes the student's seed (the folds are drawn "
                          "with it)")
    same = ("source", "path", "classes", "class_names", "limit", "test_fraction", "patient_pattern",
            "dicom_patient_ids")
    differ = [f"data.{k}: {getattr(teacher_base.data, k)!r} vs {getattr(recipe.data, k)!r}" for k in same
              if not same_data_value(k, getattr(teacher_base.data, k), getattr(recipe.data, k))]
    if differ:
        raise EdgeKDError(f"distill.teacher_recipe {recipe.distill.teacher_recipe}: its data must match the "
                          f"student's so both see the same folds ({'; '.join(differ)}, teacher vs student; "
                          "--teacher-set data.path=... changes the teacher's)")
    return teacher_base


def refuse_fold_leaks(recipe, teacher_base) -> None:
    """What k-fold cannot keep apart from each fold's validation images, or cannot run per fold, refused before
    anything trains: a continual recipe (its tasks have data of their own), a fold teacher that distills or
    learns tasks itself, distill.ensemble (checkpoints trained once, outside the folds), a model.weights file that
    edgekd trained on this same data (its train split holds most of every fold's validation images), and a
    student whose role is the fold teacher's folder name."""
    if recipe.continual is not None:
        raise EdgeKDError("--folds: a continual recipe learns tasks of their own data; k-fold takes a supervised or "
                          "distill recipe")
    if teacher_base is None:
        return refuse_weights_trained_here(recipe, "model.weights")
    if teacher_base.distill is not None or teacher_base.continual is not None:
        raise EdgeKDError(f"--folds: distill.teacher_recipe {recipe.distill.teacher_recipe} is itself a "
                          f"{'distill' if teacher_base.distill else 'continual'} recipe; the fold teacher trains "
                          "on the labels alone")
    if recipe.distill.ensemble:
        raise EdgeKDError("--folds: distill.ensemble members are checkpoints trained once, outside the folds, so "
                          "each has seen fold images it would be validated on; k-fold retrains only the "
                          "teacher_recipe per fold: set distill.ensemble=[]")
    if recipe.role == "teacher":
        raise EdgeKDError("--folds: the distill recipe's role is 'teacher' (set, or the default), the folder of each "
                          "fold's teacher; set role: student (or student_scratch, baseline)")
    refuse_weights_trained_here(recipe, "model.weights")
    refuse_weights_trained_here(teacher_base, "the teacher recipe's model.weights")


def refuse_weights_trained_here(recipe, key: str) -> None:
    """Under --folds: a model.weights file that is an edgekd checkpoint trained on the recipe's own data (the same
    data.path, or image files of its train and val splits however listed: a CSV of the folder's files) has trained
    on every fold's validation images. Weights from elsewhere (the hub, another data set) are fine; an unreadable
    file is left to the model build to report."""
    weights = recipe.model.weights
    if not weights or Path(weights).suffix.lower() == ".safetensors" or not Path(weights).is_file():
        return
    import torch

    try:
        ckpt = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception:  # the model build names what is wrong with it
        return
    data = ((ckpt.get("recipe") or {}).get("data") or {}) if isinstance(ckpt, dict) else {}
    here = recipe.data.path or recipe.data.source  # the built-in set has no path
    if data and (same_data_value("path", data.get("path"), recipe.data.path) if data.get("path") and recipe.data.path
                 else not data.get("path") and not recipe.data.path and data.get("source") == recipe.data.source) \
            or shares_image_files(ckpt.get("recipe") if isinstance(ckpt, dict) else None, recipe):
        raise EdgeKDError(f"--folds: {key} {weights} was trained by edgekd on this data ({here}), so it has seen "
                          "most of every fold's validation images; start from weights trained elsewhere")


def shares_image_files(trained: dict | None, recipe) -> bool:
    """Whether a checkpoint's recipe (`trained`) trained on image files of `recipe`'s train or val split (the k-fold
    pool), both read from files (ImageFolder or CSV, either of them); False where a split cannot be rebuilt."""
    if not trained or (trained.get("data") or {}).get("source") not in FILE_SOURCES or \
            recipe.data.source not in FILE_SOURCES:
        return False
    try:
        seen = split_tables(recipe_from_dict(trained, where="model.weights (embedded recipe)"))[0]["train"].paths
        ours = split_tables(recipe)[0]
    except EdgeKDError:
        return False
    pool = {os.path.realpath(p) for split in ("train", "val") for p in ours[split].paths or []}
    return any(os.path.realpath(p) in pool for p in seen or [])


def fold_run(train: Callable, recipe, out: Path, resume: bool, log: Callable[[str], None], progress):
    """One fold's run: with `resume`, a finished run of this same recipe is kept (its metrics.json, written after
    its last.pt) and a run cut short goes on from its last.pt (another recipe's is refused there); otherwise, or
    with neither file, it trains from the start."""
    from edgekd.train.checkpoint import load_checkpoint
    from edgekd.train.run import RunResult

    from edgekd.train import remove_earlier_outputs
    from edgekd.train.distributed import is_main_process

    last, metrics = out / "last.pt", out / "metrics.json"
    if not resume or not last.is_file():
        if is_main_process():  # quietly: the top-level warning said --out's earlier run is replaced, folds and all
            remove_earlier_outputs(out)  # (each fold run had repeated it for its folder)
        return train(recipe, out, log=log, progress=progress)
    if metrics.is_file() and metrics.stat().st_mtime >= last.stat().st_mtime and (out / "best.pt").is_file() \
            and load_checkpoint(last).get("recipe_digest") in recipe.digests():
        done = json.loads(metrics.read_text())
        log(f"k-fold: {out} finished earlier: kept")
        return RunResult(out, out / "best.pt", done["test"], done["val"], done["params"], done["macs"], None)
    return train(recipe, out, resume=True, log=log, progress=progress)


def write_fold_splits(path: Path, recipe) -> None:
    """What a fold trains, selects and tests on, for an audit: per split its image files (file-backed data) and
    patient ids (when the data has them), else its class counts only (in-memory arrays). Listed as split, before
    `data.on_bad_image: skip` drops unreadable files (the run's log names those)."""
    tables, names, _ = split_tables(recipe)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, split_listing(tables, names))


def _row(fold: int, role: str, recipe, res) -> dict[str, Any]:
    return {"fold": fold, "role": role, "name": recipe.name, "model": recipe.model.name, "params": res.params,
            "macs": res.macs, "out": str(Path(res.out).resolve()),
            "val": {k: res.val.get(k) for k in SUMMARY_METRICS}, "test": {k: res.test.get(k) for k in SUMMARY_METRICS},
            "confusion_val": res.val["confusion_matrix"], "confusion_test": res.test["confusion_matrix"],
            "class_names": res.val["class_names"]}


def summarize_folds(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """{role: {split: {metric: {mean, std, n}}}} over folds; std is the sample std (ddof=1), NaNs skipped."""
    out: dict[str, Any] = {}
    for role in dict.fromkeys(r["role"] for r in rows):
        out[role] = {}
        for split in ("val", "test"):
            stats = {}
            for k in SUMMARY_METRICS:
                vals = np.array([r[split][k] for r in rows if r["role"] == role and r[split][k] is not None], float)
                vals = vals[~np.isnan(vals)]
                stats[k] = {"mean": float(vals.mean()) if len(vals) else float("nan"),  # (written as null)
                            "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0 if len(vals) else float("nan"),
                            "n": int(len(vals))}
            out[role][split] = stats
    return out


def folds_markdown(summary: dict[str, Any], name: str, folds: int, unit: str = "patient") -> str:
    """The summary table; `unit`: what a fold holds whole, "patient" or "image" (the data had no patient ids)."""
    level = ("patient-level folds (no patient in two folds)" if unit == "patient" else
             "image-level folds: the data has no patient ids, so one patient's images can be in two folds")
    lines = [f"### {name}: {folds}-fold cross-validation (mean ± sample std over folds; val = the held-out fold)", "",
             f"{level.capitalize()}.", "",
             "The held-out fold also chose each fold's best epoch, so its figures lean optimistic; test, the split no "
             "fold trains or selects on, is the unbiased estimate.", "",
             "| role | split | " + " | ".join(SUMMARY_METRICS) + " |",
             "|---|---|" + "---:|" * len(SUMMARY_METRICS)]
    for role, splits in summary.items():
        for split, stats in splits.items():
            cells = [fold_cell(stats[k], folds) for k in SUMMARY_METRICS]
            lines.append(f"| {role} | {split} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fold_cell(stat: dict[str, float], folds: int) -> str:
    """mean ± std of a metric over the folds where it is defined, their count when not all (a one-class fold has
    no AUC): "-" for none (it had read "nan ± 0.0000"), no std for one (it had read "± 0.0000")."""
    if stat["n"] == 0:
        return "-"
    if stat["n"] == 1:
        return f"{stat['mean']:.4f} (1 of {folds} folds)"
    return f"{stat['mean']:.4f} ± {stat['std']:.4f}" + (f" ({stat['n']} of {folds} folds)" if stat["n"] < folds else "")
