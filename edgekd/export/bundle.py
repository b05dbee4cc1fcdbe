"""Writing an edge bundle: edgekd.json, sha256 manifest, parity report, deployment card; published atomically."""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

from edgekd.errors import EdgeKDError
from edgekd.formats import PRECISIONS
from edgekd.hair import describe_hair_removal
from edgekd.export.clinical import card_section, scored_on_subset
from edgekd.export.continual import continual_card_section
from edgekd.export.parity import images_for_one_flip, inputs_for_one_flip
from edgekd.fileio import (atomic_write, check_output_location, leftovers, make_temp_dir, refuse_output_in_bundle,
                           sha256_file, staging_directory, write_json, write_text)
from edgekd.runtime import MANIFEST_FILE, METADATA_FILE, SCHEMA, preprocessing_steps, tta_steps

PARITY_FILE, CARD_FILE = "parity.json", "card.md"
EXPLAIN_DIR = "explain"
"""Grad-CAM overlay PNGs shown in the card."""


def staging_dir(out: Path) -> Path:
    """A new directory next to `out` (same filesystem, so publishing is a rename)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return staging_directory(f".{out.name}.", ".tmp", out.parent)
    except OSError as err:  # it had named the hidden staging folder, not the --out the user gave
        raise EdgeKDError(f"--out {out}: cannot write in {out.parent} ({(err.strerror or str(err)).lower()})") from None


def write_manifest(root: Path) -> Path:
    """`<sha256>  <relative/posix/path>` for every file except the manifest itself, sorted by path."""
    lines = [f"{sha256_file(p)}  {p.relative_to(root).as_posix()}" for p in sorted(root.rglob("*"))
             if p.is_file() and p.relative_to(root).as_posix() != MANIFEST_FILE]
    return write_text(root / MANIFEST_FILE, "\n".join(lines) + "\n")


def check_target(out: Path) -> None:
    """Refuse to replace anything but an earlier bundle or an empty directory, or to write inside a bundle."""
    refuse_output_in_bundle(out, replaces=True)
    check_output_location(out)
    if out.suffix.lower() == ".zip" and not (out / METADATA_FILE).is_file():  # had made a folder x.zip/ (+ x.zip.zip)
        raise EdgeKDError(f"--out {out}: a bundle is a folder; for a zip too give --out {out.with_suffix('')} --zip "
                          f"(it writes {out.with_suffix('')} and {out})")
    if out.exists() and out.resolve() == Path.cwd().resolve():  # it cannot be moved aside: failed after the work
        raise EdgeKDError(f"--out {out}: the current folder; run the export from another folder")
    if out.exists() and not (out.is_dir() and ((out / METADATA_FILE).is_file() or not any(out.iterdir()))):
        raise EdgeKDError(f"--out {out}: exists and is not an edgekd bundle; choose another directory")


def restore_interrupted_publish(out: Path) -> bool:
    """A bundle that a publish killed outright between its two renames had moved aside (`.<name>.<owner>*.old`,
    its process gone) goes back to `out` when `out` is missing (the next export had swept it away)."""
    if out.exists():
        return False
    aside = next((e for e in leftovers(out.parent, f".{out.name}.", ".old") if e.is_dir(follow_symlinks=False)), None)
    if aside is not None:
        os.rename(aside.path, out)
    return aside is not None


def publish(stage: Path, out: Path) -> Path:
    """Move a finished staging directory to `out`; an earlier bundle there is replaced, never merged."""
    check_target(out)
    old = None
    if out.exists():
        old = make_temp_dir(f".{out.name}.", ".old", out.parent)
        os.rmdir(old)
        os.rename(out, old)
    try:
        os.rename(stage, out)
    except OSError:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def write_zip(root: Path, archive: Path) -> Path:
    """Zip the bundle's files at the archive root (the layout edgekd.runtime opens), written atomically."""
    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for p in sorted(root.rglob("*")):
                if p.is_file():
                    zf.write(p, p.relative_to(root).as_posix())
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    return atomic_write(archive, write, min_free_bytes=size + 16 * 2**20)


def write_bundle_files(stage: Path, metadata: dict[str, Any], parity: dict[str, Any],
                       explanations: list[dict[str, Any]] | None = None) -> None:
    write_json(stage / PARITY_FILE, parity)
    write_text(stage / CARD_FILE, deployment_card(metadata, parity, explanations))
    write_json(stage / METADATA_FILE, metadata)
    write_manifest(stage)


def _pct(v: Any) -> str:
    return "-" if v is None or v != v else f"{100 * v:.2f}%"


def _num(v: Any, fmt: str = ".4f") -> str:
    return "-" if v is None or v != v else format(v, fmt)


def metric_subset_reference(parity: dict[str, Any]) -> dict[str, Any] | None:
    """PyTorch's metrics on the `--metric-images` subset the artifacts were scored on; None when they were scored
    on the whole splits (or no artifact was scored)."""
    if not scored_on_subset(parity):
        return None
    return next((r["reference_metrics"] for r in parity["artifacts"] if r.get("reference_metrics")), None)


def _subset_note(parity: dict[str, Any]) -> str:
    ref = parity["reference"]
    if not metric_subset_reference(parity):
        return ""
    counts = ", ".join(f"{s} {ref['metric_images'][s]} of {n}" for s, n in ref["split_images"].items())
    return (f" Except: the artifacts were scored on a `--metric-images` subset ({counts} images); the `pytorch` row "
            "is on the whole splits, `pytorch (subset)` on the artifacts' images.")


def _gate_images(parity: dict[str, Any]) -> str:
    """Which images of the metric split the ACC/AUC drops were gated on, and whether one image can move ACC
    past the limit."""
    split = parity["metric_split"]
    total = parity["reference"]["split_images"].get(split)
    n = parity["reference"].get("metric_images", {}).get(split, total)  # absent from bundles before 2026-12-06
    if not n:
        return f"gated on the `{split}` split: no images"
    where = (f"every image of the `{split}` split" if n == total else
             f"a seeded subset of the `{split}` split with its class proportions (`--metric-images`)")
    tasks = next((t for r in parity["artifacts"] if (t := (r.get("metrics", {}).get(split) or {}).get("tasks"))),
                 None)  # each task's ACC is gated: one of its images moves it by 1/its own count
    smallest = min(((m["n"], name) for name, m in (tasks or {}).items() if m.get("n")), default=None)
    text = (f"gated on {where} ({n} images: one image moves ACC by {100 / n:.2g} points" if smallest is None else
            f"gated on {where} ({n} images, each task's ACC gated too: one image moves the ACC of task "
            f"'{smallest[1]}' ({smallest[0]} images, the fewest) by {100 / smallest[0]:.2g} points")
    limits = [r["tolerance"].get("acc_drop") for r in parity["artifacts"] if r["tolerance"].get("acc_drop")]
    if limits and 1 / (smallest[0] if smallest else n) > min(limits):
        text += f", more than the {min(limits) * 100:g}-point limit, so the ACC gate cannot resolve it here"
    return text + ")"


def _top1_resolution(parity: dict[str, Any]) -> str:
    """A sentence when a single differing input fails a top-1 agreement limit (too few parity inputs; a multi-head
    model's: its task with the fewest, each head gated on its own task's inputs)."""
    heads = [h["inputs"] for r in parity["artifacts"] for h in (r.get("heads") or {}).values() if h.get("inputs")]
    inputs = min(heads) if heads else parity["inputs"]
    if not inputs:
        return ""
    limits = sorted({r["tolerance"]["top1_agreement"] for r in parity["artifacts"]
                     if (n := inputs_for_one_flip(r["tolerance"].get("top1_agreement"))) and inputs < n})
    if not limits:
        return ""
    text = (f" With {inputs} inputs a single differing top-1 prediction fails the "
            f"{' / '.join(f'{t:.2%}' for t in limits)} top-1 limit: ")
    views = len(parity.get("views") or [1])
    pool = parity.get("reference", {}).get("split_images", {}).get("val")
    short = [(t, n) for t in limits if pool is not None and (n := images_for_one_flip(t, views)) > pool]
    if short:  # the strictest limits the val split cannot give room, whatever --parity-images says
        return text + (f"the {' / '.join(f'{t:.2%}' for t, _ in short)} limit takes {short[-1][1]} parity images, "
                       f"more than the val split's {pool}, so a single near-tied input fails it at any "
                       "`--parity-images` here" + (f"; more parity images give the {limits[0]:.2%} limit room."
                                                   if len(short) < len(limits) else "."))
    return text + "more parity images (`--parity-images`) give that gate room for one near-tied input."


def default_run_line(artifacts: list[dict[str, Any]]) -> str:
    """What `edgekd predict` and `serve` run without --backend/--precision: the most precise model, on OpenVINO
    (its own IR, else the ONNX file, which OpenVINO reads; the runner check covers that path too)."""
    precision = next(p for p in PRECISIONS if any(a["precision"] == p for a in artifacts))
    fmt = "openvino" if any(a["format"] == "openvino" and a["precision"] == precision for a in artifacts) else "onnx"
    others = [p for p in PRECISIONS if p != precision and any(a["precision"] == p for a in artifacts)]
    options = (["`--backend onnx` runs the ONNX file on ONNX Runtime"] if any(a["format"] == "onnx" for a in artifacts)
               else []) + ([f"`--precision {'|'.join(others)}` picks another model of the bundle"] if others else [])
    return (f"Without options both run the {fmt} {precision.upper()} model on OpenVINO (the default backend)"
            + "".join(f"; {o}" for o in options) + ".")


def _runner_lines(record: dict[str, Any] | None) -> list[str]:
    """The runner check: `edgekd predict`'s own preprocessing on the decoded images vs the gated artifact."""
    if not record:
        return []
    if "skipped" in record:
        return ["", f"Runner check: not run ({record['skipped']})."]
    def figures(v: dict[str, Any]) -> str:
        return (f"max |Δp| {v['max_prob_diff']:.2g}, top-1 agreement {_pct(v['top1_agreement_decisive'])} "
                f"({v['near_ties']} near ties left out)")

    checked = "; ".join(f"{k} (`{v['backend']}` backend): " + (", ".join(f"head {h}: {figures(hv)}"
                                                                          for h, hv in v["heads"].items())
                                                               if v.get("heads") else figures(v))
                        for k, v in record.items() if isinstance(v, dict) and "backend" in v)
    return ["", f"Runner check: the runtime's Runner, given the {record['images']} images as decoded (its own resize, "
            "TTA views and normalization), against the same artifact on the inputs above, TTA-averaged "
            f"probabilities: {checked}."]


def _parity_section(parity: dict[str, Any], tta: dict[str, Any]) -> list[str]:
    """The card's parity table (every artifact, shipped or not) and the ones left out."""
    counts = ", ".join(f"{s}: {n} images" for s, n in parity["reference"]["split_images"].items())
    lines = ["", f"({counts}.)", "", "## Parity with PyTorch", "",
             f"{parity['images']} validation images x {len(tta['views'])} TTA views = {parity['inputs']} inputs, "
             f"run at batch 1 and batch {parity['batch_size']}; values pass when |artifact - PyTorch| <= "
             f"max_abs + rtol·|PyTorch| on every logit (an FP32 artifact exceeding it: plus "
             f"{parity.get('rounding_factor', 10):g}x the model's own FP32 distance from a float64 run of it, which "
             f"the tolerance column then gives). The ACC/AUC drops are {_gate_images(parity)}."
             + _top1_resolution(parity), "",
             "| format | precision | max abs diff | mean abs diff | top-1 agreement | ACC drop | AUC drop | tolerance | result |",
             "|---|---|---|---|---|---|---|---|---|"]
    for rec in parity["artifacts"]:
        drop = rec.get("metric_drop", {}).get(parity["metric_split"], {})
        tol = ", ".join(f"{k} {v:g}" for k, v in rec["tolerance"].items() if v is not None) or "-"
        if rec.get("fp32_rounding") is not None:  # value_check allowed the model's own FP32 rounding on top
            tol += f", + {parity.get('rounding_factor', 10):g}x the model's FP32 rounding {rec['fp32_rounding']:.2e}"
        lines.append(f"| {rec['format']} | {rec['precision']} | {_num(rec.get('max_abs_diff'), '.2e')} | "
                     f"{_num(rec.get('mean_abs_diff'), '.2e')} | {_pct(rec.get('top1_agreement'))} | "
                     f"{_num(drop.get('acc'))} | {_num(drop.get('auc'))} | {tol} | "
                     f"{'pass' if rec['passed'] else 'FAIL (not shipped)'} |")
    if parity.get("loosened_gate"):
        lines += ["", "**The gate is looser than edgekd's defaults** (the export profile's settings): "
                  f"{'; '.join(parity['loosened_gate'])}. A \"pass\" above is against these limits; the default "
                  "gate might have refused the artifact."]
    lines += _runner_lines(parity.get("runner"))
    if parity.get("dropped"):
        lines += ["", "## Not shipped", "", "These artifacts were built and failed the gate; `parity.on_fail: drop` "
                  "(the profile's, or `edgekd export --drop-failed`) left them out of this bundle:", ""]
        lines += [f"- {d['format']} {d['precision']}: {'; '.join(d['failures'])}" for d in parity["dropped"]]
    if parity.get("too_slow"):
        lines += ["", "## Not shipped: INT8 slower than FP32", "", "These INT8 artifacts were built and timed against "
                  "the FP32 artifact of their format at export (batch 1, interleaved calls, the export machine); "
                  "an INT8 model that is not faster buys nothing on that CPU but its smaller file, so the profile "
                  "(`quantization.min_speedup`) left it out:", ""]
        lines += [f"- {d['format']} {d['precision']}: {d['reason']}" for d in parity["too_slow"]]
    if parity.get("int8_untimed"):
        lines += ["", "INT8 speed not checked (no FP32 artifact of the format to time it against; `edgekd bench "
                  "CHECKPOINT` exports and times both):", ""]
        lines += [f"- {u['artifact']}: {u['reason']}" for u in parity["int8_untimed"]]
    return lines


def _quantization_section(metadata: dict[str, Any]) -> list[str]:
    """How each shipped INT8 artifact was quantized (the exporter's note: tool, scheme, calibration, FP32 layers)."""
    notes = [a for a in metadata["artifacts"] if a.get("quantization")]
    if not notes:
        return []
    return ["", "## How the INT8 artifacts were made", ""] + [
        f"- {a['format']} {a['precision']}: {a['quantization']}" for a in notes]


def _explanation_section(explanations: list[dict[str, Any]] | None, calibrated: bool = True) -> list[str]:
    """The card's Grad-CAM table, when there are overlays."""
    if not explanations:
        return []
    lines = ["", "## Where the model looks (Grad-CAM)", "",
             f"Grad-CAM of the PyTorch model's top class at layer `{explanations[0]['layer']}` of the PyTorch checkpoint, "
             f"on {len(explanations)} test images (a fixed pick, classes in turn). Red = regions that raised "
             "that class's score; check they lie on anatomy, not on labels, borders or devices. "
             f"Predicted and p as the bundle gives them ({'calibrated, ' if calibrated else ''}its decision "
             "threshold) on the PyTorch model's logits: an FP16 or INT8 model's p differs by its parity figures "
             "above.", "",
             "| image | label | predicted (p) | Grad-CAM |", "|---|---|---|---|"]
    cell = lambda text: str(text).replace("|", "\\|")  # noqa: E731  a class named `a|b` had split the row
    for e in explanations:
        other = (f"; the map is of {cell(e['target'])}, the top class" if e.get("target", e["predicted"]) !=
                 e["predicted"] else "")
        flat = " (flat map: nothing highlighted at this layer)" if e.get("blank") else ""
        lines.append(f"| {cell(e['image'])} | {cell(e.get('label') or '-')} | {cell(e['predicted'])} "
                     f"({e['prob']:.3f}{other}) | ![{cell(e['image'])}]({e['overlay']}){flat} |")
    if any(e.get("blank") for e in explanations):  # a flat map had read as evidence
        lines += ["", f"{sum(bool(e.get('blank')) for e in explanations)} of {len(explanations)} maps are flat: "
                  "the layer shows nothing for them (`edgekd explain --layer` with an earlier layer may)."]
    return lines


def _figures_row(name: str, metrics: dict[str, Any], keys=("acc", "auc", "sensitivity", "specificity")) -> str:
    """A lineage row: the figures of `keys` ('-' for the others) and the image count."""
    cells = [_num(metrics.get(k)) if k in keys else "-" for k in ("acc", "auc", "sensitivity", "specificity")]
    n = metrics.get("n")
    return f"| {name} | " + " | ".join(cells) + f" | {n if n is not None else '-'} |"


def _lineage_section(metadata: dict[str, Any]) -> list[str]:
    """The card's lineage (a bundle made by `edgekd update`): the parent bundle and both versions' test figures
    (PyTorch reference; this version per task when it has heads)."""
    lineage = metadata.get("lineage")
    if not lineage:
        return []
    parent = (f"bundle `{lineage['parent_bundle']}` (sha256 of its {MANIFEST_FILE}: `{lineage['parent_bundle_sha256']}`"
              f", created {lineage.get('parent_created')}, checkpoint sha256 `{lineage.get('parent_checkpoint_sha256')}`)"
              if lineage.get("parent_bundle") else f"checkpoint `{lineage.get('parent_checkpoint')}` (sha256 "
              f"`{lineage.get('parent_checkpoint_sha256')}`)")
    lines = ["", "## Lineage", "", f"Updated from {parent} by continual training with recipe `{lineage.get('recipe')}`."
             + (f" Note: {lineage['data_note']}." if lineage.get("data_note") else ""),
             "", "| version (test split) | acc | auc | sensitivity | specificity | images |",
             "|---|---|---|---|---|---|", _figures_row("parent", lineage.get("parent_test_metrics") or {})]
    test = (metadata.get("metrics") or {}).get("test") or {}
    tasks = test.get("tasks") or {}
    heads = bool(metadata.get("tasks"))  # one head per task; else one head over every task's classes
    # a mean over tasks of a binary head's sensitivity and a multi-class head's macro recall is no figure: acc, auc
    lines.append(_figures_row("this bundle (unweighted mean over tasks)", test, ("acc", "auc")) if tasks and heads
                 else _figures_row("this bundle (every task's images and classes)" if tasks else "this bundle", test))
    lines += [_figures_row(f"this bundle, task {name}", m, ("acc",) if not heads else
                           ("acc", "auc", "sensitivity", "specificity")) for name, m in tasks.items()]
    if tasks:
        lines += ["", "Compare the parent with this bundle's row of the parent's task, not with the "
                  + ("mean: the mean includes the new tasks (each task counts once, whatever its image count)."
                     if heads else "whole model's: that row scores the new tasks' images and classes too.")
                  + " Each row is scored on the test images of its own export's data (the images column), so a "
                  "`data.limit` in the update's recipe scores fewer images than the parent's. "
                  + ("Sensitivity and specificity are the positive class's for a task of 2 classes, macro over its "
                     "classes otherwise." if heads else "A task's row is its images with every class competing "
                     "(one head, no task id), as `edgekd eval` scores it: ACC only.")]
    return lines


def _head_parity_section(parity: dict[str, Any]) -> list[str]:
    """The card's per-head parity table of a multi-head bundle."""
    rows = [(r, name, h) for r in parity["artifacts"] for name, h in (r.get("heads") or {}).items()]
    if not rows:
        return []
    lines = ["", "## Parity per head", "", "Each task's slice of the logits vs PyTorch: values on every parity "
             "input, top-1 agreement within the head on its own task's inputs, gated per head.", "",
             "| format | precision | head | max abs diff | top-1 agreement |", "|---|---|---|---|---|"]
    lines += [f"| {r['format']} | {r['precision']} | {name} | {_num(h['max_abs_diff'], '.2e')} | "
              f"{_pct(h['top1_agreement'])} |" for r, name, h in rows]
    return lines


def _provenance_lines(model: dict[str, Any]) -> list[str]:
    """Where the checkpoint's training started from, and whether the artifacts are its fused form."""
    init, lines = model.get("init_weights"), []
    if isinstance(init, dict) and init.get("file"):
        lines.append(f"- Initialised from the weights file {init['file']}"
                     + (f" (sha256 `{init['sha256']}`)" if init.get("sha256") else ""))
    elif isinstance(init, dict) and init.get("hub"):
        pinned = (f" ({init.get('filename') or 'weights'} of {init['repo']} at revision `{init['revision']}`, sha256 "
                  f"`{init['sha256']}`)" if init.get("sha256") else " (no revision recorded)")
        lines.append(f"- Initialised from timm's pretrained weights of {init['hub']}{pinned}")
    if model.get("fused_blocks"):
        check = model.get("fusion_check") or {}
        lines.append(f"- Exported in its fused inference form: {model['fused_blocks']} re-parameterizable blocks folded "
                     "(timm reparameterize_model)" + (
                         f"; its logits are within {check['fused_fp32_max_diff']:.2g} of the unfused checkpoint run in "
                         f"float64 on {check.get('inputs')} parity inputs (the unfused FP32 model's own rounding: "
                         f"{check['unfused_fp32_max_diff']:.2g}), and the artifacts are gated against it"
                         if "fused_fp32_max_diff" in check else ""))
    return lines


def _checkpoint_warnings(parity: dict[str, Any]) -> list[str]:
    """The export's warnings about the checkpoint itself (a split or task no better than its largest class): they
    had been on the console only, so a continual model whose task collapsed to one class showed a retention above
    100% and a passed gate on its card, nothing else."""
    warned = parity["reference"].get("warnings")
    if not warned:
        return []
    return ["", "Warnings about the checkpoint itself (every format agrees easily with a model like this, so the "
            "parity figures above say little of it):", "", *[f"- {w}" for w in warned]]


def deployment_card(metadata: dict[str, Any], parity: dict[str, Any],
                    explanations: list[dict[str, Any]] | None = None) -> str:
    """The markdown card shipped with a bundle: what the model is, how well each artifact does, where it looks
    (Grad-CAM overlays of a few test images, when given), how to run it."""
    model, pre, tta = metadata["model"], metadata["preprocess"], metadata["tta"]
    ref = parity["reference"]["metrics"]
    splits = list(ref)
    lines = [
        f"# {model['name']} ({model.get('role') or 'model'}) — edge deployment card", "",
        f"- Dataset: {model.get('dataset')}; classes: {', '.join(metadata['class_names'])}",
        f"- Parameters: {model['params']:,}; recipe digest `{model.get('recipe_digest')}`; "
        f"edgekd {metadata['edgekd_version']}; created {metadata['created']}",
        *_provenance_lines(model),
        f"- Input: {pre['input_size']} {pre['layout']} float32 named `{metadata['io']['input']}`, output "
        f"`{metadata['io']['output']}` (N, {len(metadata['class_names'])}), dynamic batch"
        + (f"; **the model trained at {model['trained_input_size']} px** and is exported at another size (the "
           "export profile's input_size): every figure here is at the exported size"
           if model.get("trained_input_size") else ""),
        f"- Preprocessing: {pre['channel_order']}, "
        + (f"{describe_hair_removal(pre)}, " if pre.get("hair_removal") else "")
        + f"resize shorter side to {pre['resize']} ({pre['interpolation']}), "
        f"center crop {pre['center_crop']}, x*{pre['scale']:.6g}, mean {pre['mean']}, std {pre['std']}",
        f"- TTA views: {', '.join(tta['views'])} (mean of softmax)",
        "", "## Clinical metrics per format", "",
        ("PyTorch is the checkpoint the artifacts were exported from, in the fused form they hold; "
         if model.get("fused_blocks") else "PyTorch is the checkpoint the artifacts were exported from; ") +
        "every row is measured on the same images "
        "(original view), each image labelled by the model's top class (argmax of its raw softmax), not at the "
        "operating point: the bundle's own labels are in the operating point table." + _subset_note(parity), "",
    ]
    header = "| format | precision | size (MB) | " + " | ".join(
        f"{s} {k}" for s in splits for k in ("acc", "auc", "sens", "spec")) + " |"
    lines += [header, "|" + "---|" * (3 + 4 * len(splits))]

    heads = bool(metadata.get("tasks"))  # one head per task: a mean of one head's sensitivity and another's macro

    def row(name: str, prec: str, size: Any, metrics: dict[str, dict[str, float]]) -> str:  # recall is no figure
        cells = [_num(None if heads and k in ("sensitivity", "specificity") else metrics.get(s, {}).get(k))
                 for s in splits for k in ("acc", "auc", "sensitivity", "specificity")]
        return f"| {name} | {prec} | {size} | " + " | ".join(cells) + " |"

    lines.append(row("pytorch", "fp32", "-", ref))
    subset = metric_subset_reference(parity)
    if subset:
        lines.append(row("pytorch (subset)", "fp32", "-", subset))
    sizes = {(a["format"], a["precision"]): a["size_mb"] for a in metadata["artifacts"]}
    for rec in (r for r in parity["artifacts"] if r["passed"]):
        lines.append(row(rec["format"], rec["precision"], _num(sizes.get((rec["format"], rec["precision"])), ".3f"),
                         rec.get("metrics", {})))
    lines += _checkpoint_warnings(parity) + card_section(metadata, parity)
    if metadata.get("continual"):
        lines += continual_card_section(metadata["continual"], metadata.get("tasks"))
    lines += (_lineage_section(metadata) + _head_parity_section(parity) + _parity_section(parity, tta)
              + _quantization_section(metadata) + _explanation_section(explanations, bool(metadata.get("calibration"))))
    return "\n".join(lines + _run_section(metadata))


def _run_section(metadata: dict[str, Any]) -> list[str]:
    """How to run the bundle, and the preprocessing step by step for code that feeds its models itself."""
    return ["", "## Run", "", "```", "edgekd predict <this bundle> IMAGE... [--tta]",
            "edgekd serve <this bundle> [--tta]    # an HTTP service (the serve extra)", "```", "",
            default_run_line(metadata["artifacts"]), "",
            "## Preprocessing, step by step", "",
            "What `edgekd predict`, `serve` and `Runner` do to an image (`edgekd.json` `preprocess` and `tta`); "
            "code that feeds the ONNX or OpenVINO model itself must do the same:", "",
            *preprocessing_steps(metadata["preprocess"]), "", tta_steps(metadata["tta"]), "",
            "Every file is listed with its sha256 in `manifest.sha256`; `edgekd.json` holds the metadata and "
            "`parity.json` the full parity report.", ""]
