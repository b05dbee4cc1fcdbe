"""`edgekd export`: checkpoint -> artifacts (format x precision) -> parity gate -> bundle, or nothing at all."""

from __future__ import annotations

import functools
import tempfile
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torchvision.transforms import v2

from edgekd import __version__
from edgekd.data import (build_data, build_transforms, check_class_order, check_trained_splits, checkpoint_path_hint,
                         chw_tensor)
from edgekd.errors import EdgeKDError, exception_line
from edgekd.fileio import (deferred_signals, ensure_free_space, full_disk_note, make_temp_dir, refuse_output_inside,
                           remove_trees, sha256_file, track_tree, untrack_tree)
from edgekd.export.artifact import INPUT_NAME, OUTPUT_NAME, ExportContext
from edgekd.export.bundle import (EXPLAIN_DIR, METADATA_FILE, PARITY_FILE, SCHEMA, check_target, publish,
                                  restore_interrupted_publish, staging_dir, write_bundle_files, write_zip)
from edgekd.export.clinical import as_the_bundle_decides, operating_point, positive_index, write_reliability
from edgekd.export.continual import (TaskLayout, continual_data, merge_parity_sets, retention_report, task_layout,
                                     task_metadata)
from edgekd.export.formats import FORMATS, export_plan
from edgekd.export.parity import (ParitySet, NormalizedImages, check_artifact, check_fusion, fp32_rounding,
                                  int8_speedup, parity_inputs, reference_report, untrained_views)
from edgekd.export.profile import CardConfig, ExportProfile, load_profile, loosened_tolerances, profile_digest
from edgekd.export.runner_check import runner_check
from edgekd.host import cpu_info
from edgekd.metrics import one_class_warning
from edgekd.models import count_parameters, deploy_form, forward_error
from edgekd.options import split_list
from edgekd.progress import progress_task, silent
from edgekd.recipe import apply_overrides, recipe_from_dict
from edgekd.runtime import MAX_THREADS
from edgekd.scoring import scoring_subset
from edgekd.train.checkpoint import model_from_checkpoint

SELECTION_SEED = 0
"""Which images are used for parity/calibration/metrics is fixed, so two exports of one checkpoint compare."""


class ParityGateError(EdgeKDError):
    """The export produced artifacts that do not match the PyTorch model; nothing was published."""

    multiline = True  # the summary, then one indented line per failed check

    def __init__(self, message: str, parity: dict[str, Any]):
        super().__init__(message)
        self.parity = parity


@dataclass
class ExportResult:
    out: Path
    zip_path: Path | None
    metadata: dict[str, Any]
    parity: dict[str, Any]


def with_overrides(profile: ExportProfile, parity_images: int | None = None, calib_images: int | None = None,
                   threads: int | None = None, accuracy_control: bool | None = None,
                   on_fail: str | None = None, metric_images: int | None = None) -> ExportProfile:
    """The profile with the command-line options that were given (None keeps the profile's value)."""
    counts = {"--parity-images": parity_images, "--calib-images": calib_images, "--metric-images": metric_images}
    for flag, n in counts.items():
        if n is not None and n < 1:
            raise EdgeKDError(f"{flag} must be at least 1 (got {n})")
    parity = profile.parity.model_copy(update={k: v for k, v in {
        "images": parity_images, "on_fail": on_fail, "metric_images": metric_images}.items() if v is not None})
    quant = profile.quantization.model_copy(update={k: v for k, v in {
        "calib_images": calib_images, "accuracy_control": accuracy_control}.items() if v is not None})
    update: dict[str, Any] = {"parity": parity, "quantization": quant}
    if threads is not None:
        if not 1 <= threads <= MAX_THREADS:
            raise EdgeKDError(f"--threads must be in [1, {MAX_THREADS}] (got {threads})")
        update["threads"] = threads
    return profile.model_copy(update=update)


def _sample(n_total: int, n: int | None, salt: int) -> np.ndarray:
    """A fixed random subset of indices (sorted), or all of them."""
    if n is None or n >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(SELECTION_SEED + salt).choice(n_total, size=n, replace=False))


def metric_subset(labels: np.ndarray, n: int | None) -> np.ndarray:
    """The images of a metric split the ACC/AUC gate scores: all of them, or a seeded subset of exactly `n` with the
    split's class proportions and every class in it, so AUC stays defined (parity.metric_images; scoring_subset)."""
    if n is None:
        return np.arange(len(labels))
    classes = len(np.unique(labels))
    if n < classes:
        raise EdgeKDError(f"parity.metric_images {n} is below the {classes} classes of a metric split "
                          "(each class needs an image)")
    return scoring_subset(labels, n, SELECTION_SEED + 2)


def _stack(dataset, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessed (eval pipeline) images and labels of a dataset subset."""
    xs, ys = zip(*(dataset[int(i)] for i in indices))
    return np.asarray(torch.stack(xs).numpy(), dtype=np.float32), np.asarray(ys, dtype=np.int64)  # no third copy


def _split_images(dataset, geometry, normalize) -> tuple[NormalizedImages, np.ndarray]:
    """A whole split through the eval pipeline's geometry (channels, hair removal, resize, crop), kept uint8 and
    normalized on indexing (`NormalizedImages`), and its labels."""
    n = len(dataset)
    images = None
    for i in range(n):
        arr = dataset.raw(i)
        one = geometry(chw_tensor(arr))
        if images is None:  # filled in place: a list of images and their stack had held the split twice
            images = torch.empty((n, *one.shape), dtype=torch.uint8)
        images[i] = one
    return NormalizedImages(images, normalize), np.asarray(dataset.table.labels, dtype=np.int64)[:n]


PREPROCESS_KEYS = ("image_size", "resize", "channels", "mean", "std", "hair_removal", "hair_kernel")
"""Data keys that make the bundle's preprocessing: not `--set` at export (the bundle would ship them, the gate
comparing the model with itself on the changed inputs); a new input size is the profile's input_size."""


def _export_recipe(ckpt: dict[str, Any], checkpoint: Path, overrides: list[str], input_size: int | None):
    raw = apply_overrides(ckpt["recipe"], overrides)
    before, after = ckpt["recipe"].get("data") or {}, raw.get("data") or {}
    changed = [k for k in PREPROCESS_KEYS if before.get(k) != after.get(k)]
    if changed:  # data.mean=[0.0] had shipped in the bundle, the model trained on 0.5
        raise EdgeKDError(f"--set data.{changed[0]}: the model was trained with data.{changed[0]} "
                          f"{before.get(changed[0])!r}, and the bundle's preprocessing is training's (a new input "
                          "size: the export profile's input_size)")
    if input_size is not None:
        data = raw.setdefault("data", {})
        size = data.get("image_size", 28)
        # Keep the resize/crop ratio of training (e.g. 256/224) at the new size.
        data["resize"] = round(input_size * (data.get("resize") or size) / size)
        data["image_size"] = input_size
    return recipe_from_dict(raw, where=f"{checkpoint} (embedded recipe)")


def card_explanations(model, ckpt: dict[str, Any], data, stage: Path, clinical: dict[str, Any],
                      log: Callable[[str], None]) -> list[dict]:
    """Grad-CAM overlays of a few test images for the card (explain/*.png), each with the prediction the bundle
    makes (`clinical`: its temperature and threshold); a model Grad-CAM cannot explain (or a box without the
    grad-cam package) gets a card without them, not a failed export."""
    try:
        from edgekd.explain.gradcam import card_overlays

        records = card_overlays(model, ckpt, data.dataset("test", train=False), stage / EXPLAIN_DIR,
                                data_cfg=data.cfg)  # the bundle's preprocessing (an export's input_size)
    except (EdgeKDError, ImportError) as err:
        log(f"card: no Grad-CAM overlays ({str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__})")
        return []
    return as_the_bundle_decides([{**r, "overlay": f"{EXPLAIN_DIR}/{r['overlay']}"} for r in records], clinical,
                                 list(ckpt["class_names"]))


def shipped_artifacts(artifacts: list[dict[str, Any]], records: list[dict[str, Any]], stage: Path,
                      on_fail: str) -> list[dict[str, Any]]:
    """The artifacts the bundle ships: all if every one passed; under on_fail=drop the passing ones (the files of
    the others are removed from the staging folder); under on_fail=error none when any failed."""
    failed = {(r["format"], r["precision"]) for r in records if not r["passed"]}
    if not failed:
        return artifacts
    if on_fail == "error":
        return []
    for fmt, precision in failed:
        for f in FORMATS[fmt].files(stage / FORMATS[fmt].relpath(precision)):
            f.unlink(missing_ok=True)
    return [a for a in artifacts if (a["format"], a["precision"]) not in failed]


def _check_space(model, n_artifacts: int, out: Path, zip_bundle: bool) -> Path:
    """Refuse early when the bundle or the scratch files cannot fit; the scratch root."""
    # Each artifact holds at most the FP32 weights (+ graph); the zip is one more copy of the bundle.
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    needed = n_artifacts * weight_bytes * 5 // 4 + 32 * 2**20
    ensure_free_space(out.parent, needed * (2 if zip_bundle else 1), "the bundle")
    scratch_root = Path(tempfile.gettempdir())
    ensure_free_space(scratch_root, 2 * weight_bytes + 32 * 2**20, "export scratch files")
    return scratch_root


def _check_takes_size(model: torch.nn.Module, input_size: list[int], ckpt: dict[str, Any]) -> None:
    """A profile input_size the model cannot take (a ViT built for a fixed size: timm's AssertionError) is a
    one-line error before any work (it had ended the export with exit 1 after the reference run)."""
    if input_size[-1] == ckpt["preprocess"]["input_size"][-1]:
        return
    if (err := forward_error(model, tuple(input_size))) is not None:
        raise EdgeKDError(f"export profile input_size {input_size[-1]}: the model (trained at "
                          f"{ckpt['preprocess']['input_size'][-1]} px) does not take {input_size[-1]} px inputs "
                          f"({exception_line(err)})")


def _checkpoint_data(ckpt: dict[str, Any], checkpoint: Path, data_overrides: list[str], input_size: int | None,
                     layout: TaskLayout | None = None, log: Callable[[str], None] = print):
    """The checkpoint's data (its embedded recipe with the overrides; a continual checkpoint's: all its tasks,
    global labels), checked against the model's classes."""
    if ckpt.get("recipe") is None:
        raise EdgeKDError(f"{checkpoint}: checkpoint has no embedded recipe (needed for its data)")
    recipe = _export_recipe(ckpt, checkpoint, data_overrides, input_size)
    trained = ckpt["preprocess"]["input_size"][-1]
    if input_size is not None and input_size != trained:  # accuracy may fall far (0.88 -> 0.50 in a re-trial)
        log(f"warning: exporting at input_size {input_size}, the model trained at {trained} px: its figures here are "
            "at the new size (the ACC/AUC gate compares them with PyTorch at that size, not with training's)")
    with checkpoint_path_hint(recipe):
        data = continual_data(recipe, layout, str(checkpoint)) if layout is not None else build_data(recipe)
    num_classes = ckpt["arch"]["num_classes"]
    if data.num_classes != num_classes:
        raise EdgeKDError(f"{checkpoint}: model has {num_classes} classes, its data has {data.num_classes}")
    check_class_order(list(ckpt["class_names"]), list(data.class_names), str(checkpoint), log)
    if layout is None:
        check_trained_splits(ckpt, data, recipe, str(checkpoint))
    return data


def _parity_set_of(data, profile: ExportProfile, layout: TaskLayout | None,
                   log: Callable[[str], None]) -> tuple[ParitySet, int, int]:
    """`_build_parity_set`, per task for a continual checkpoint (each task's images, merged; 3-channel warm-up
    when the tasks' images differ), with the heads the parity is checked on."""
    if layout is None:
        return _build_parity_set(data, profile, log)
    parts = [_build_parity_set(t.data, profile, lambda line, task=t.name: log(f"task {task}: {line}"))
             for t in data.tasks]  # one line per task, named (two alike lines had read as one printed twice)
    channels = {c for _, _, c in parts}
    return (merge_parity_sets([p for p, _, _ in parts], layout), sum(n for _, n, _ in parts),
            channels.pop() if len(channels) == 1 else data.preprocess["channels"])


def _build_parity_set(data, profile: ExportProfile, log: Callable[[str], None]) -> tuple[ParitySet, int, int]:
    """The parity set, how many val images it holds, and the image channels the runner warms up for."""
    # The eval pipeline split at normalization: TTA views act on the uint8 image at model input size.
    pipeline = build_transforms(data.cfg, [], train=False)
    if not isinstance(pipeline.transforms[-1], v2.Normalize):
        raise EdgeKDError("export: the eval pipeline must end with Normalize")
    geometry, normalize = v2.Compose(pipeline.transforms[:-2]), v2.Compose(pipeline.transforms[-2:])
    val = data.dataset("val", train=False)
    picked = _sample(len(val), profile.parity.images, salt=1)
    raw_images = [val.raw(int(i)) for i in picked]
    raw = torch.stack([geometry(chw_tensor(a))
                       for a in raw_images])
    # What the runner warms up for: gray images for a 3-channel model run through their own compiled graph.
    gray = raw_images and all(a.shape[-1] == 1 for a in raw_images)
    image_channels = 1 if gray else data.preprocess["channels"]
    inputs, views = parity_inputs(raw, list(profile.tta.views), profile.tta.center_crop_fraction, normalize)
    splits = {s: _split_images(data.dataset(s, train=False), geometry, normalize) for s in ("val", "test")}
    # --metric-images: the artifacts are scored on a subset; the reference, calibration and threshold see it all
    rows = None if profile.parity.metric_images is None else {
        s: metric_subset(y, profile.parity.metric_images) for s, (_, y) in splits.items()}
    binary = len(data.class_names) == 2
    parity_set = ParitySet(inputs, views, splits, raw_source=(val, [int(i) for i in picked]), metric_rows=rows,
                           positive=positive_index(profile.decision.positive, data.class_names) if binary else 1)
    log(f"parity set: {len(picked)} val images x {len(profile.tta.views)} views; metrics on "
        + ", ".join(f"{s} ({len(parity_set.rows(s))}" + (f" of {len(y)})" if len(parity_set.rows(s)) < len(y) else ")")
                    for s, (_, y) in splits.items()))
    return parity_set, len(picked), image_channels


def _bundle_metadata(model, ckpt: dict[str, Any], checkpoint: Path, data, profile: ExportProfile,
                     reference: dict[str, Any], image_channels: int, plan=(),
                     fusion: dict[str, Any] | None = None) -> dict[str, Any]:
    """metadata.json without its artifact list. `plan`: the (format, precision) pairs built, which the recorded
    settings name (--format/--precision on the command line are not in the profile); `fusion`: `deployable`'s
    check of a fused model (its block count and figures)."""
    preprocess = data.preprocess
    train_counts = data.counts().get("train", [])
    return {
        "schema": SCHEMA, "edgekd_version": __version__,
        "created": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "model": {"name": ckpt["arch"]["name"], "role": ckpt.get("role"), "params": count_parameters(model),
                  "dataset": ckpt.get("dataset"), "recipe_digest": ckpt.get("recipe_digest"),
                  "checkpoint": checkpoint.name, "checkpoint_path": str(checkpoint.resolve()),
                  "checkpoint_sha256": sha256_file(checkpoint), "init_weights": ckpt.get("init_weights"),
                  **({"trained_input_size": ckpt["preprocess"]["input_size"][-1]}  # the profile's input_size differs
                     if ckpt["preprocess"]["input_size"][-1] != preprocess["input_size"][-1] else {}),
                  **({"fused_blocks": fusion["blocks"], "fusion_check": {k: v for k, v in fusion.items() if k != "blocks"}}
                     if fusion else {})},
        "class_names": list(ckpt["class_names"]),
        "preprocess": preprocess,
        "tta": {"views": list(profile.tta.views), "center_crop_fraction": profile.tta.center_crop_fraction,
                "ensemble": "mean_softmax"},
        "io": {"input": INPUT_NAME, "output": OUTPUT_NAME, "dynamic_batch": True},
        "metrics": {"test": reference["splits"]["test"]["metrics"], "val": reference["splits"]["val"]["metrics"],
                    "training": ckpt.get("metrics") or {}},
        "runtime": {"threads": profile.threads, "image_channels": image_channels},
        "export_host": export_host(),
        "export_profile": profile.name, "export_profile_digest": profile_digest(profile),
        "export_profile_settings": {**profile.model_dump(mode="json"),  # what `edgekd update` re-exports with
                                    **({"formats": list(dict.fromkeys(f.name for f, _ in plan)),
                                        "precisions": list(dict.fromkeys(p for _, p in plan))} if plan else {})},
        **reference["clinical"],
        "card": card_settings(profile, ckpt),
        "training_data": {"class_counts": dict(zip(ckpt["class_names"], train_counts)), **training_provenance(ckpt)},
    }


def training_provenance(ckpt: dict[str, Any]) -> dict[str, Any]:
    """What the card tells a reviewer of how the model was trained (it had given the class mix alone): the recipe,
    its epochs, data set, a data.limit subset, and the teacher a student was distilled from (model and sha256)."""
    recipe = ckpt.get("recipe") or {}
    data, train, distill = recipe.get("data") or {}, recipe.get("train") or {}, ckpt.get("distill") or {}
    return {"recipe": recipe.get("name"), "recipe_digest": ckpt.get("recipe_digest"), "dataset": ckpt.get("dataset"),
            "epochs": train.get("epochs"), "data_limit": data.get("limit"), "seed": recipe.get("seed"),
            **({"teacher": {"model": distill.get("teacher_model"), "sha256": distill.get("teacher_sha256"),
                            "ensemble_sha256": distill.get("ensemble_sha256") or []}} if distill else {})}


def export_host() -> dict[str, Any]:
    """The CPU the parity gate ran the artifacts on: its model, SIMD and whether it has INT8 dot-product
    instructions (an ONNX INT8 model without reduce_range computes otherwise on a CPU without them)."""
    info = cpu_info()
    return {"cpu": info["model"], "machine": info["machine"], "simd": info["simd"],
            "int8_dot_product": info["int8_dot_product"]}


def card_settings(profile: ExportProfile, ckpt: dict[str, Any]) -> dict[str, Any]:
    """The profile's card text; a continual model's default limitations name its tasks' data (they said "one public
    data set" and "this data set" of a model trained on retinal and chest images)."""
    card = profile.card.model_dump()
    tasks = [t["name"] for t in (ckpt.get("continual") or {}).get("tasks", [])]
    if len(tasks) > 1:
        default = CardConfig().limitations
        said = {default[0]: f"Trained and tested on the data of its {len(tasks)} tasks ({', '.join(tasks)}) in turn; "
                            "performance on other sites, scanners and populations is unknown.",
                default[1]: "Figures hold for its tasks' own validation and test splits only."}
        card["limitations"] = [said.get(line, line) for line in card["limitations"]]
    return card


def calibration_images(data, profile: ExportProfile) -> np.ndarray:
    """The INT8 calibration inputs: a fixed sample of `quantization.calib_images` training images, preprocessed by
    the eval pipeline, float32 (N, C, H, W)."""
    train = data.dataset("train", train=False)
    return _stack(train, _sample(len(train), profile.quantization.calib_images, salt=3))[0]


@dataclass
class ExportInputs:
    """What an export of a checkpoint runs its gate and INT8 calibration on, selected as `export_checkpoint`
    selects them."""

    model: torch.nn.Module
    parity_set: ParitySet
    calibration: np.ndarray
    preprocess: dict[str, Any]


def with_recipe_positive(profile: ExportProfile, data) -> ExportProfile:
    """The profile, its decision.positive taken from the recipe's data.positive_class when the profile names none
    (the class the run's sensitivity and specificity were for is the one the bundle thresholds and reports)."""
    named = getattr(getattr(data, "cfg", None), "positive_class", None)
    if named is None or "positive" in profile.decision.model_fields_set:
        return profile
    return profile.model_copy(update={"decision": profile.decision.model_copy(update={"positive": named})})


def export_inputs(checkpoint: str | Path, profile: ExportProfile | None = None, data_overrides: list[str] | None = None,
                  log: Callable[[str], None] = print) -> ExportInputs:
    """The model, parity set and calibration images of a single-task checkpoint's export, for tools that study
    the INT8 gate without exporting (benchmarks/int8_qat.py)."""
    checkpoint = Path(checkpoint)
    profile = profile or load_profile(None)
    model, ckpt = model_from_checkpoint(checkpoint)
    if task_layout(ckpt) is not None:
        raise EdgeKDError(f"{checkpoint}: a continual checkpoint; export_inputs takes single-task ones")
    data = _checkpoint_data(ckpt, checkpoint, data_overrides or [], profile.input_size, log=log)
    profile = with_recipe_positive(profile, data)
    parity_set, _, _ = _build_parity_set(data, profile, log)
    return ExportInputs(model, parity_set, calibration_images(data, profile), data.preprocess)


ROUNDING_INPUTS = 64
"""Parity inputs a model is run on in float64 (`rounding_sample`)."""


def rounding_sample(parity_set: ParitySet) -> np.ndarray:
    """At most ROUNDING_INPUTS of the parity images in their original view, spread over them, for the float64 runs
    (the rounding allowance, and the fusion check that measures it for a fused model): a wrong fusion shows on any
    input, and a float64 pass costs several times an FP32 one. The original view only, so that the allowance does
    not hang on the profile's TTA views: an ill-conditioned model's rounding differed 5e5-fold between the rows a
    6-view and a 1-view profile sampled, and its verdict with it."""
    original = parity_set.inputs[np.asarray(parity_set.views) == "original"]
    rows = original if len(original) else parity_set.inputs
    return rows[np.unique(np.linspace(0, len(rows) - 1, min(len(rows), ROUNDING_INPUTS)).round().astype(int))]


def deployable(model, profile: ExportProfile, parity_set: ParitySet, log: Callable[[str], None]
               ) -> tuple[torch.nn.Module, dict[str, Any] | None, Callable[[], float]]:
    """(the model the exporters trace and the gate judges them against, the fusion check or None, the unfused
    model's own FP32 rounding as a call measured when first asked: `fp32_rounding`). A model with
    re-parameterizable blocks comes back in its fused inference form unless the profile says `fuse: false`, once
    `check_fusion` has found it the unfused model's function (a one-line error otherwise)."""
    rounding = functools.cache(lambda: fp32_rounding(model, rounding_sample(parity_set)))
    if not profile.fuse:
        return model, None, rounding
    fused, blocks = deploy_form(model)
    if not blocks:
        return model, None, rounding
    check = check_fusion(model, fused, rounding_sample(parity_set), profile.parity.tolerances.fp32,
                         profile.parity.rounding_factor)
    if not check["passed"]:
        worst = check["worst"]
        raise EdgeKDError(f"fused form: logit diff {worst['diff']:.3g} from the unfused model run in float64 (at "
                          f"|logit| {abs(worst['reference']):.3g}) > {worst['allowed']:.3g} allowed "
                          f"({check['factor']:g}x the unfused FP32 model's own {check['unfused_fp32_max_diff']:.3g} "
                          "+ the fp32 tolerance): the fusion changed the function; `fuse: false` in the export "
                          "profile exports the training form")
    log(f"fused {blocks} re-parameterizable blocks for export (timm reparameterize_model): logits within "
        f"{check['fused_fp32_max_diff']:.2g} of the unfused model run in float64 (its own FP32 rounding "
        f"{check['unfused_fp32_max_diff']:.2g}); profile fuse: false exports the training form")
    return fused, {"blocks": blocks, **{k: v for k, v in check.items() if k != "passed"}}, \
        lambda: check["unfused_fp32_max_diff"]


def _export_context(model, data, metadata: dict[str, Any], profile: ExportProfile, scratch: Path,
                    parity_set: ParitySet, log: Callable[[str], None], progress=None) -> ExportContext:
    """What the exporters get: `model` in its deploy form (`deployable`); calibration images are drawn (once)
    only when an INT8 path asks."""

    def calibration() -> np.ndarray:
        if "calibration" not in ctx.cache:
            ctx.cache["calibration"] = calibration_images(data, profile)
        return ctx.cache["calibration"]

    ctx = ExportContext(model=model, input_shape=tuple(data.preprocess["input_size"]), metadata=metadata,
                        profile=profile, scratch=scratch, calibration=calibration,
                        validation=lambda: parity_set.metric_split("val"), log=log, progress=progress)
    return ctx


@dataclass
class _Outcome:
    """Every (format, precision) so far: the artifacts built, their parity records, and every failure line."""

    artifacts: list[dict[str, Any]]
    records: list[dict[str, Any]]
    failures: list[str]
    timed_formats: set[str] = field(default_factory=set)
    """Formats whose INT8 artifact is timed against their FP32 (quantization.min_speedup set, both in the plan)."""
    parity_logits: dict[tuple[str, str], dict[str, np.ndarray]] = field(default_factory=dict)
    """(format, precision) -> {"logits": the artifact's logits on the parity inputs}, for the runner check."""
    fp32_sessions: dict[str, Any] = field(default_factory=dict)
    """format -> its FP32 artifact's session, held until the export returns. Freeing the OpenVINO FP32 compiled
    model while the export goes on with the INT8 one left the process to die of SIGSEGV at the next signal it
    was sent (OpenVINO 2026.4 here; reproduced by the INT8 speed-check test followed by the deferred-signals
    test), so it is not released early."""
    too_slow: list[dict[str, Any]] = field(default_factory=list)
    """INT8 artifacts left out of the bundle for not being faster than their FP32 (quantization.min_speedup)."""
    untimed: list[dict[str, str]] = field(default_factory=list)
    """INT8 artifacts shipped untimed ({"artifact", "reason"}): no FP32 artifact of their format to time them against
    (none in the plan, or it failed to build)."""


def _export_one(fmt, precision: str, ctx: ExportContext, stage: Path, parity_set: ParitySet,
                reference: dict[str, Any], num_classes: int, outcome: _Outcome,
                rounding: Callable[[], float] | None = None) -> None:
    """One (format, precision): export, open, parity-check (`rounding`: the model's own FP32 rounding, for
    check_artifact), size; its record and failures go into `outcome` (an export or open error is a failed record,
    not an aborted export)."""
    profile, log = ctx.profile, ctx.log
    label, rel = f"{fmt.name}/{precision}", fmt.relpath(precision)
    path = stage / rel
    tolerance = getattr(profile.parity.tolerances, precision)
    log(f"{label}: exporting {rel}")
    written = False  # a full disk is named for a failed write only (not an open or an INT8 graph that cannot run)
    try:  # any error of the converter or runtime fails this artifact, named (a RuntimeError had ended the export)
        info = fmt.export(ctx, precision, path)
        written = True
        session = fmt.open(path, precision, profile.run_threads())
        speed = None if precision == "fp32" else _speed_check(fmt, precision, session, parity_set, profile, outcome,
                                                              log)  # (an INT8 graph that cannot run fails here)
    except Exception as err:
        said = ((str(err) if isinstance(err, EdgeKDError) else exception_line(err, 160))
                + ("" if written else full_disk_note(stage)))
        outcome.failures.append(f"{label}: {said}")
        outcome.records.append({"format": fmt.name, "precision": precision, "path": rel, "passed": False,
                                "failures": [said], "tolerance": tolerance.model_dump()})
        return
    if precision == "fp32" and fmt.name in outcome.timed_formats:
        outcome.fp32_sessions[fmt.name] = session
    if speed is not None and not speed["fast_enough"] and not speed.get("kept"):
        for f in fmt.files(path):
            f.unlink(missing_ok=True)
        return
    record, problems = check_artifact(session, parity_set, reference, tolerance, ctx.input_shape, num_classes,
                                      profile.parity.batch_size, profile.parity.metric_split,
                                      keep=outcome.parity_logits.setdefault((fmt.name, precision), {}),
                                      rounding=rounding if precision == "fp32" else None,
                                      rounding_factor=profile.parity.rounding_factor)
    size_mb = sum(p.stat().st_size for p in fmt.files(path)) / 2**20
    record = {"format": fmt.name, "precision": precision, "path": rel, "size_mb": round(size_mb, 4), **record,
              **({"speed_vs_fp32": speed} if speed else {}),
              "tolerance": tolerance.model_dump(), "passed": not problems, "failures": problems}
    outcome.records.append(record)
    outcome.failures += [f"{label}: {p}" for p in problems]
    outcome.artifacts.append({"format": fmt.name, "precision": precision, "path": rel, "size_mb": round(size_mb, 4),
                              **info})
    log(f"{label}: max abs diff {record.get('max_abs_diff', float('nan')):.3g}, top-1 agreement "
        f"{record.get('top1_agreement', float('nan')):.2%}{'' if not problems else ' -> FAIL'}")
    for line in record.get("ungated", []):  # parity.json keeps them beside the record
        log(f"warning: {label}: {line}")


def _speed_check(fmt, precision: str, session, parity_set: ParitySet, profile: ExportProfile, outcome: _Outcome,
                 log: Callable[[str], None]) -> dict[str, Any] | None:
    """An INT8 artifact timed against its format's FP32 artifact (when the export built one and the profile sets
    quantization.min_speedup); one that is not fast enough goes into `outcome.too_slow`, unless that FP32 failed its
    gate (then the INT8 is the format's only model, and is kept: it had been dropped "for the FP32 to run here",
    the FP32 dropped as well). An FP32 that failed to build leaves the INT8 untimed, said why."""
    if precision != "int8":
        return None
    minimum, fp32 = profile.quantization.min_speedup, outcome.fp32_sessions.get(fmt.name)
    if minimum is not None and fp32 is None:
        failed = fmt.name in outcome.timed_formats  # in the plan, failed to build; else an INT8-only profile
        why = (f"its {fmt.name}/fp32 failed to build" if failed else f"this export builds no {fmt.name}/fp32 to "
               "time it against; quantization.min_speedup applies when it does")
        outcome.untimed.append({"artifact": f"{fmt.name}/int8", "reason": why})
        log(f"{fmt.name}/int8: speed not checked ({why})")
    if minimum is None or fp32 is None:
        return None
    speed = int8_speedup(fp32, session, parity_set.inputs, minimum)
    line = (f"{fmt.name}/int8: {speed['int8_p50_ms']:.3g} ms vs FP32 {speed['fp32_p50_ms']:.3g} ms at batch 1 "
            f"({speed['speedup']:.2f}x")
    if speed["fast_enough"]:
        log(f"{line})")
        return speed
    if any(r["format"] == fmt.name and r["precision"] == "fp32" and not r["passed"] for r in outcome.records):
        log(f"{line}, below quantization.min_speedup {minimum:g}): kept, its FP32 failed the gate")
        return {**speed, "kept": "its FP32 failed the gate: the INT8 is this format's only model"}
    reason = (f"not faster than FP32 on this CPU: {line}, below quantization.min_speedup {minimum:g}); the FP32 "
              "artifact is the one to run here")
    outcome.too_slow.append({"format": fmt.name, "precision": precision, "reason": reason, "speed_vs_fp32": speed})
    log(f"{fmt.name}/int8: left out of the bundle, {reason}")
    return speed


def _one_class_warnings(reference: dict[str, Any], parity_set: ParitySet, log: Callable[[str], None]) -> list[str]:
    """The PyTorch model's splits (per task for a continual model) whose ACC is no better than their largest
    class's share: on such a model every format agrees easily, so the gate's pass says little."""
    found = []
    for split, (_, y) in parity_set.splits.items():
        metrics = reference["splits"][split]["metrics"]
        tasks = parity_set.heads or parity_set.task_outputs
        if tasks is None:
            found.append(one_class_warning(split, metrics.get("acc"), np.bincount(y).tolist()))
            continue
        for name, lo, hi in tasks:  # each task's images (its own head, or every output competing)
            counts = np.bincount(y[(y >= lo) & (y < hi)] - lo, minlength=hi - lo).tolist()
            acc = metrics.get("tasks", {}).get(name, {}).get("acc")
            found.append(one_class_warning(f"{split} (task {name})", acc, counts))
    found = [w for w in found if w]
    for warning in found:
        log(f"warning: the checkpoint's {warning}")
    return found


def _reference(deployed, parity_set: ParitySet, profile: ExportProfile, ckpt: dict[str, Any],
               log: Callable[[str], None]) -> dict[str, Any]:
    """The PyTorch reference (`reference_report`) with what is said of it: one-class splits, TTA views it never
    trained on, and its operating point (calibration + decision)."""
    reference = reference_report(deployed, parity_set)
    reference["warnings"] = _one_class_warnings(reference, parity_set, log)
    reference["untrained_views"] = _untrained_view_note(ckpt, profile, log)
    reference["clinical"] = _clinical(reference, parity_set, profile, ckpt, log)
    return reference


def _untrained_view_note(ckpt: dict[str, Any], profile: ExportProfile, log: Callable[[str], None]) -> dict[str, str]:
    """The profile's TTA views the checkpoint's training augmentation never showed it (`untrained_views`): said
    once, and kept in parity.json (`untrained_views`)."""
    missing = untrained_views((ckpt.get("recipe") or {}).get("augment"), list(profile.tta.views))
    if missing:
        reasons = "; ".join(f"{why}: {', '.join(v for v in missing if missing[v] == why)}"
                            for why in dict.fromkeys(missing.values()))
        log(f"note: TTA view(s) {', '.join(missing)} were never shown in training ({reasons}): the parity gate "
            "checks them and the runner's TTA averages them all the same (the profile's tta.views chooses them)")
    return missing


def _parity_report(checkpoint: Path, n_images: int, profile: ExportProfile, parity_set: ParitySet,
                   reference: dict[str, Any], outcome: _Outcome) -> dict[str, Any]:
    """parity.json."""
    return {
        "checkpoint": str(checkpoint), "images": n_images, "views": list(profile.tta.views),
        "inputs": len(parity_set.inputs), "batch_size": profile.parity.batch_size,
        "metric_split": profile.parity.metric_split, "rounding_factor": profile.parity.rounding_factor,
        "reference": {"framework": f"torch {torch.__version__}",
                      "metrics": {s: r["metrics"] for s, r in reference["splits"].items()},
                      "split_images": {s: len(y) for s, (_, y) in parity_set.splits.items()},
                      "metric_images": {s: len(parity_set.rows(s)) for s in parity_set.splits},
                      **({"warnings": reference["warnings"]} if reference.get("warnings") else {}),
                      **({"untrained_views": reference["untrained_views"]} if reference.get("untrained_views")
                         else {})},
        "artifacts": outcome.records, "passed": not outcome.failures, "failures": outcome.failures,
        **({"too_slow": outcome.too_slow} if outcome.too_slow else {}),
        **({"int8_untimed": outcome.untimed} if outcome.untimed else {}),
        **({"loosened_gate": loose} if (loose := loosened_tolerances(
            profile.parity.tolerances, {r["precision"] for r in outcome.records})) else {}),
    }


def _gate(outcome: _Outcome, parity: dict[str, Any], stage: Path, on_fail: str, checkpoint: Path, out: Path,
          log: Callable[[str], None]) -> list[dict[str, Any]]:
    """The artifacts to ship, or ParityGateError when none may; under on_fail=drop `parity` lists the dropped."""
    failures, records = outcome.failures, outcome.records
    artifacts = shipped_artifacts(outcome.artifacts, records, stage, on_fail)
    if failures and not artifacts:
        raise ParityGateError(f"export of {checkpoint} failed ({len(failures)} problem"
                              f"{'s' if len(failures) > 1 else ''}); nothing was written to {out}:\n  "
                              + "\n  ".join(failures), parity)
    if failures:
        parity["dropped"] = [{"format": r["format"], "precision": r["precision"], "failures": r["failures"]}
                             for r in records if not r["passed"]]
        log(f"parity.on_fail=drop: {len(parity['dropped'])} artifact(s) left out of the bundle:\n  "
            + "\n  ".join(failures))
    return artifacts


def _runner_gate(stage: Path, metadata: dict[str, Any], parity: dict[str, Any], parity_set: ParitySet,
                 profile: ExportProfile, explanations: list, checkpoint: Path, out: Path, outcome: "_Outcome",
                 log: Callable[[str], None]) -> None:
    """The end-to-end runner check on the staged bundle (export/runner_check.py): ParityGateError on a failure,
    else its record joins parity.json and the card (the bundle's files rewritten)."""
    record, failures = runner_check(stage, metadata["artifacts"], parity_set, profile.parity.runner,
                                    profile.run_threads(), profile.parity.batch_size, outcome.parity_logits)
    parity["runner"] = record
    if failures:
        parity.update(passed=False, failures=[*parity["failures"], *failures])
        raise ParityGateError(f"export of {checkpoint} failed the runner check; nothing was written to {out}:\n  "
                              + "\n  ".join(failures), parity)
    if "skipped" not in record:
        log("runner check: " + "; ".join(f"{k} max |dp| {v['max_prob_diff']:.2g}, top-1 {v['top1_agreement_decisive']:.2%}"
                                         for k, v in record.items() if isinstance(v, dict) and "backend" in v))
    write_bundle_files(stage, metadata, parity, explanations)


def _clinical(reference: dict[str, Any], parity_set: ParitySet, profile: ExportProfile, ckpt: dict[str, Any],
              log: Callable[[str], None]) -> dict[str, Any]:
    """The operating point (calibration + decision); none for a multi-head model (both need a single task)."""
    if parity_set.heads is not None:
        asked = [f"{key} {value}" for key, value, default in (
            ("decision.rule", profile.decision.rule, "argmax"),
            ("calibration.method", profile.calibration.method, "temperature")) if value not in (default, "none")]
        if asked:  # a single-head multi-class model refuses such a rule; a multi-head one had dropped it silently
            raise EdgeKDError(f"export profile {profile.origin}: {', '.join(asked)} is for a single-head model; a "
                              "multi-head model's heads each label by their top class (use the defaults)")
        log("multi-head model: no calibration temperature or decision threshold (labels: each head's top class)")
        return {}
    clinical = operating_point(reference, parity_set.splits, profile, list(ckpt["class_names"]))
    if (clinical.get("calibration") or {}).get("warning"):
        log(f"warning: calibration: {clinical['calibration']['warning']}")
    decision = clinical.get("decision") or {}
    if decision.get("rule") in ("sensitivity", "specificity"):  # the threshold reaching the target is not in [0, 1]
        got = ((decision.get("val") or {}).get(decision["rule"]) or {}).get("value")
        if got is not None and got < decision["target"] - 1e-9:
            log(f"warning: decision: no threshold reaches {decision['rule']} {decision['target']:g} on val (it gives "
                f"{got:.4f} at {decision['threshold']:.6g}: images at probability 1.0)")
    return clinical


def _continual_metadata(layout: TaskLayout | None, continual: dict[str, Any] | None,
                        lineage: dict[str, Any] | None) -> dict[str, Any]:
    """edgekd.json's `continual` (accuracy matrix, retention, gate), `tasks` (multi-head) and `lineage` keys."""
    extra: dict[str, Any] = {"continual": continual} if continual else {}
    tasks = task_metadata(layout) if layout is not None else None
    if tasks:
        extra["tasks"] = tasks
    if lineage:
        extra["lineage"] = lineage
    return extra


def _note_profile(profile: ExportProfile, plan, log: Callable[[str], None]) -> None:
    """What the export is told before its work: threads over the cores, a gate looser than the defaults."""
    if profile.threads and profile.run_threads() != profile.threads:
        log(f"threads {profile.threads} is over this machine's {profile.run_threads()} cores: the export runs on "
            f"{profile.run_threads()}; the bundle's hint stays {profile.threads} (a runner caps it to its cores)")
    loose = loosened_tolerances(profile.parity.tolerances, {p for _, p in plan})
    if loose:
        log(f"warning: export profile {profile.origin} loosens the parity gate: {'; '.join(loose)} (the card says so)")


def _retention_gate(layout: TaskLayout, profile: ExportProfile, allow_forgetting: bool | str,
                    log: Callable[[str], None]) -> dict[str, Any]:
    """`retention_report`, with a warning whenever a miss is let through: by the user's --allow-forgetting (it had
    passed without a word on the console, only the card saying so) or by someone else (bench, which times any
    model: `allow_forgetting` names it)."""
    continual = retention_report(layout, profile.min_retention, allow_forgetting)
    if continual["misses"] and allow_forgetting:
        who = allow_forgetting if isinstance(allow_forgetting, str) else "--allow-forgetting"
        log(f"warning: the retention gate would refuse this model ({'; '.join(continual['misses'])}); "
            f"{who} exports it all the same and its card says so")
    return continual


def export_arguments(profile: ExportProfile | str | Path | None, formats: list[str] | str | None,
                     precisions: list[str] | str | None) -> tuple[ExportProfile, list[tuple[str, str]]]:
    """export_checkpoint's profile (an ExportProfile, or a name or file as --target takes: a name had been an
    AttributeError) and its plan of (format, precision), formats and precisions given as text as the CLI takes them
    ("onnx" had been read as o, n, n, x; "onnx,openvino")."""
    profile = profile if isinstance(profile, ExportProfile) else load_profile(profile)
    formats, precisions = (split_list(v) if isinstance(v, str) else v for v in (formats, precisions))
    return profile, export_plan(formats or profile.formats, precisions or profile.precisions,
                                (None if formats else profile.origin, None if precisions else profile.origin))


def export_checkpoint(checkpoint: str | Path, out: str | Path, formats: list[str] | str | None = None,
                      precisions: list[str] | str | None = None, profile: ExportProfile | str | None = None,
                      zip_bundle: bool = False, data_overrides: list[str] | None = None,
                      log: Callable[[str], None] | None = print, allow_forgetting: bool | str = False,
                      lineage: dict[str, Any] | None = None, progress=None) -> ExportResult:
    """Export a checkpoint to every (format, precision), gate each artifact on parity with PyTorch, and publish
    a bundle at `out` only if all pass (else raise ParityGateError listing every failure; `out` is untouched).
    `profile`, `formats`, `precisions`: as `export_arguments` takes them; `log` None: silent. A continual
    checkpoint first passes the retention gate (RetentionGateError unless `allow_forgetting`); a
    multi-head one is parity-checked per head. `lineage` (from `edgekd update`) goes into edgekd.json.
    `progress`: the CLI's progress bar (one step per artifact, INT8 calibration images), or None."""
    checkpoint, named, (out, replacing), log = Path(checkpoint), Path(out), export_target(out), log or silent
    refuse_output_inside(out, [checkpoint], replaces=True)  # a best.pt kept in the bundle it replaces
    profile, plan = export_arguments(profile, formats, precisions)
    model, ckpt = model_from_checkpoint(checkpoint)
    layout = task_layout(ckpt)
    continual = _retention_gate(layout, profile, allow_forgetting, log) if layout is not None else None
    scratch_root = _check_space(model, len(plan), out, zip_bundle)
    data = _checkpoint_data(ckpt, checkpoint, data_overrides or [], profile.input_size, layout, log)
    _check_takes_size(model, data.preprocess["input_size"], ckpt)
    profile = with_recipe_positive(profile, data)
    _note_profile(profile, plan, log)
    parity_set, n_images, image_channels = _parity_set_of(data, profile, layout, log)
    deployed, fusion, rounding = deployable(model, profile, parity_set, log)
    reference = _reference(deployed, parity_set, profile, ckpt, log)
    metadata = {**_bundle_metadata(model, ckpt, checkpoint, data, profile, reference, image_channels, plan, fusion),
                **_continual_metadata(layout, continual, lineage)}
    explain_data = None if parity_set.heads is not None else data  # one head: every task's test images

    stage = scratch = None
    timed = {f.name for f, p in plan if p == "int8"} & {f.name for f, p in plan if p == "fp32"}
    outcome = _Outcome([], [], [], timed_formats=timed if profile.quantization.min_speedup is not None else set())
    try:
        with deferred_signals():  # a kill now is delivered after both names are set: the finally removes them
            # Tracked: a stop signal removes them before unwinding (a native call it interrupts may crash the exit).
            stage = track_tree(staging_dir(out))
            scratch = track_tree(make_temp_dir("edgekd-export-", parent=scratch_root))
        ctx = _export_context(deployed, data, metadata, profile, scratch, parity_set, log, progress)
        with progress_task(progress, "export", len(plan)) as advance:
            for fmt, precision in plan:
                advance(0, f"export {fmt.name}/{precision}")
                _export_one(fmt, precision, ctx, stage, parity_set, reference, ckpt["arch"]["num_classes"], outcome,
                            rounding)
                advance()
        parity = _parity_report(checkpoint, n_images, profile, parity_set, reference, outcome)
        artifacts = _gate(outcome, parity, stage, profile.parity.on_fail, checkpoint, out, log)
        metadata = {**metadata, "artifacts": artifacts, "parity": PARITY_FILE,
                    "reliability": write_reliability(stage, reference, parity_set.splits, reference["clinical"])}
        explanations = (card_explanations(model, ckpt, explain_data, stage, reference["clinical"], log)
                        if explain_data is not None else [])
        write_bundle_files(stage, metadata, parity, explanations)
        _runner_gate(stage, metadata, parity, parity_set, profile, explanations, checkpoint, out, outcome, log)
        publish_held(stage, out, replacing, log, named)
    finally:
        remove_trees([scratch, stage])
        untrack_tree(scratch)
        untrack_tree(stage)
    zip_path = _zip_after_publish(out, replacing, zip_bundle, log, named)
    log(f"wrote {out}/ ({METADATA_FILE}, {len(artifacts)} artifacts)" + (f" and {zip_path}" if zip_path else ""))
    return ExportResult(out, zip_path, metadata, parity)


def export_target(out: str | Path) -> tuple[Path, bool]:
    """--out checked (`check_target`), through a symlink to the bundle it points to (the link itself had become a
    new folder), and whether it holds a bundle this export replaces."""
    out = Path(out).resolve() if Path(out).is_symlink() else Path(out)
    restore_interrupted_publish(out)  # a bundle a killed export had moved aside comes back before anything else
    check_target(out)
    return out, (out / METADATA_FILE).is_file()


def zip_beside(folder: Path) -> Path:
    """`<folder>.zip`, beside it."""
    return folder.parent / f"{folder.name}.zip"


def publish_held(stage: Path, out: Path, replacing: bool, log: Callable[[str], None],
                 named: Path | None = None) -> None:
    """`publish` and, for a replaced bundle, its zip's removal, with stop signals held: a stop between publish's
    renames had left neither bundle at --out; one after it, while the new zip was written, the old model's zip
    beside the new folder. `named`: --out as given, a symlink to `out` (its zip goes too)."""
    with deferred_signals():
        publish(stage, out)
        if replacing:
            for archive in dict.fromkeys(zip_beside(p) for p in (out, named or out)):
                remove_stale_zip(archive, log)


def _zip_after_publish(out: Path, replacing: bool, zip_bundle: bool, log: Callable[[str], None],
                       named: Path | None = None) -> Path | None:
    """`<--out as given>.zip` written (--zip: a symlinked --out's name, not its target's, as README says);
    says when a bundle was replaced (whose zip went at publish)."""
    if replacing:
        log(f"replaced the earlier bundle in {out}")
    if zip_bundle:
        return write_zip(out, zip_beside(named or out))
    return None


def remove_stale_zip(archive: Path, log: Callable[[str], None]) -> None:
    """An export without --zip that replaced a bundle removes its `<out>.zip` (`archive`) when it is a bundle's zip:
    left there it would hold another model than the folder of its name, and a zip is what gets copied to a device.
    Other files stay, and so does a zip with no bundle folder beside it (it may be the only copy)."""
    try:
        with zipfile.ZipFile(archive) as zf:
            bundled = METADATA_FILE in zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return None
    if bundled:
        archive.unlink()
        log(f"removed {archive}: the zip of the bundle this export replaced (--zip writes a new one)")
    return None
