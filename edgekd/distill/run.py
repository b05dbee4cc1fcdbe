"""Distillation recipe -> student checkpoint: the one trainer with a DistillObjective around a frozen teacher."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from edgekd.data import build_data, check_class_order, check_model_splits
from edgekd.distill.objective import build_objective, load_teacher, warn_teacher_input_mismatch
from edgekd.distill.unlabeled import build_unlabeled
from edgekd.errors import EdgeKDError
from edgekd.fileio import sha256_file
from edgekd.progress import silent
from edgekd.recipe import entry_arguments
from edgekd.train.checkpoint import load_checkpoint
from edgekd.train.run import RunResult, build_student_model, loss_class_weights, train_model
from edgekd.train.trainer import resolve_device, seed_everything

ADAPTER_KEY = "kd_adapters"
"""Checkpoint key of the feature-KD adapters: beside, never inside, the student's state_dict (export ignores it)."""


def check_same_pool(saved: dict, pool, path: Path) -> None:
    """A resumed run's unlabeled pool must hold the images it held (compared by content digest), as its labelled
    splits must: with others it would not end as the uninterrupted run would have."""
    then = ((saved.get("distill") or {}).get("unlabeled_pool") or {}).get("content_digest")
    now = pool.record.get("content_digest") if pool is not None else None
    if then is not None and then != now:
        was = saved["distill"]["unlabeled_pool"]["images"]
        raise EdgeKDError(f"{path}: distill.unlabeled: the pool's images changed since this run started ({was} "
                          f"images then, {pool.record['images'] if pool is not None else 0} now, other content); "
                          "restore them, or train into a new folder")


def unused_train_loss(recipe) -> str | None:
    """A distillation run trains on distill.terms: a train.loss other than the default (inherited from a teacher
    recipe, or --set) does nothing, and had been recorded in the checkpoint's recipe as if it had."""
    from edgekd.recipe import LossConfig

    default = LossConfig()
    if recipe.train.loss == default:
        return None
    given = ", ".join(f"{k}: {v}" for k, v in recipe.train.loss.model_dump().items() if v != getattr(default, k))
    return (f"train.loss ({given}) is not used by a distillation run: its loss is distill.terms (a ce or focal term "
            "takes label_smoothing and class_weights); set train.loss back to {name: ce} to quiet this")


def long_term_warmups(recipe) -> list[str]:
    """A term whose warm-up lasts the whole run never reaches its weight: said, not silently trained at a share."""
    epochs = recipe.train.epochs
    return [f"warning: distill.terms.{i} ({t.kind}) warmup_epochs {t.warmup_epochs} > train.epochs {epochs}: the term "
            f"ends the run at {epochs / t.warmup_epochs:.0%} of its weight"
            for i, t in enumerate(recipe.distill.terms) if getattr(t, "warmup_epochs", 0) > epochs]


def check_same_teachers(saved: dict, digests: dict[str, str], path: Path) -> None:
    """A resumed run's teacher (and ensemble members) must be the files it started with, compared by sha256: a
    teacher retrained into the same best.pt would distill the rest of the run from another model, silently."""
    then = saved.get("distill") or {}
    recorded = dict(zip([then.get("teacher"), *(then.get("ensemble") or [])],
                        [then.get("teacher_sha256"), *(then.get("ensemble_sha256") or [])]))
    for teacher, digest in digests.items():
        was = recorded.get(teacher)
        if was is not None and was != digest:
            raise EdgeKDError(f"{path}: distill teacher {teacher} changed since this run started (sha256 {was[:12]}... "
                              f"then, {digest[:12]}... now): restore it, or train into a new folder")


def warn_about_distill(recipe, data, teacher_ckpts: list[dict], log: Callable[[str], None]) -> None:
    """What a distillation run warns of before it trains (`edgekd check` says the same): a train.loss the terms
    leave unused, a term warm-up longer than the run, a teacher fed other inputs than it trained on (hair removal,
    distill.teacher_image_size: `warn_teacher_input_mismatch`), and per teacher (distill.teacher, then distill.ensemble's)
    splits it shares with the student's val/test and class names it gives otherwise (another order: an error)."""
    cfg = recipe.distill
    unused = unused_train_loss(recipe)
    if unused:
        log(f"warning: {unused}")
    for line in long_term_warmups(recipe):
        log(line)
    logit_terms = any(t.kind in ("kl", "dkd") for t in cfg.terms)
    warn_teacher_input_mismatch(teacher_ckpts, data.preprocess, cfg.teacher_image_size, log)
    for path, ckpt in zip((cfg.teacher, *cfg.ensemble), teacher_ckpts):
        check_model_splits(f"distill.teacher {path}", ckpt, data, log,
                           val_effect="the student's best epoch is chosen on images its teacher has seen")
        if logit_terms:
            check_class_order(list(ckpt.get("class_names") or []), list(data.class_names), f"distill: teacher {path}",
                              log)


def distill_recipe(recipe, out: str | Path, resume: bool = False, log: Callable[[str], None] | None = print,
                   progress=None) -> RunResult:
    """Train the recipe's student against `distill.teacher`; writes the same files as a supervised run."""
    log = log or silent  # log=None: say nothing
    recipe, out = entry_arguments(recipe, out)
    cfg = recipe.distill
    if cfg is None:
        raise EdgeKDError("this recipe has no distill section: train it with `edgekd train` as a supervised run (in "
                          "Python: edgekd.pipeline.run_recipe)")
    if not cfg.teacher:
        raise EdgeKDError("distill.teacher: no teacher checkpoint set (distill.teacher_recipe is used by --folds "
                          "only; train the teacher first and --set distill.teacher=<best.pt>)")
    seed_everything(recipe.seed, recipe.train.deterministic)
    data = build_data(recipe)
    teacher, teacher_ckpt = load_teacher(cfg.teacher, cfg.teacher_recipe)
    ensemble = [load_teacher(path, key="distill.ensemble") for path in cfg.ensemble]
    warn_about_distill(recipe, data, [teacher_ckpt, *(c for _, c in ensemble)], log)
    model, spec = build_student_model(recipe, data, out / "last.pt" if resume else None)
    pool = build_unlabeled(recipe, data, log)  # refused if it holds a val or test image
    objective = build_objective(cfg, model, teacher, teacher_ckpt, data.preprocess, loss_class_weights(data),
                                recipe.augment, data.num_classes, log=log, ensemble=ensemble, unlabeled=pool)
    objective.to(resolve_device(recipe.train.device))
    digests = {str(p): sha256_file(p) for p in (cfg.teacher, *cfg.ensemble)}
    if resume and (out / "last.pt").is_file():
        saved = load_checkpoint(out / "last.pt")
        check_same_teachers(saved, digests, out / "last.pt")
        check_same_pool(saved, pool, out / "last.pt")
        if saved.get(ADAPTER_KEY):
            objective.load_adapter_state(saved[ADAPTER_KEY])
    teacher_metrics = teacher_ckpt.get("metrics") or {}
    extra_meta = {
        "distill": {"teacher": str(cfg.teacher), "ensemble": list(cfg.ensemble),
                    "teacher_sha256": digests[str(cfg.teacher)],
                    "ensemble_sha256": [digests[str(p)] for p in cfg.ensemble],
                    "teacher_model": teacher_ckpt["arch"]["name"],
                    "teacher_val": teacher_metrics, "terms": [t.model_dump() for t in cfg.terms],
                    "unlabeled": cfg.unlabeled.model_dump() if cfg.unlabeled else None,
                    "unlabeled_pool": pool.record if pool else None},
        # The adapters' state_dict tensors share storage with their parameters, which the optimizer updates
        # in place: every checkpoint written during training holds the current adapter weights (for --resume).
        ADAPTER_KEY: objective.adapter_state(),
    }
    return train_model(recipe, out, data, model, spec, objective=objective, resume=resume, log=log,
                       progress=progress, extra_meta=extra_meta)
