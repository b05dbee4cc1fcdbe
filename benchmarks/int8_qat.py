"""Quantization-aware fine-tuning vs the parity gate's top-1 agreement on one checkpoint (issue 17).

NNCF inserts 8-bit quantizers into the PyTorch model (`nncf.quantize` as the export's default profile sets it up:
mixed preset, first and last compute layers FP32; but fast bias correction, the only one NNCF's PyTorch backend
has). A CNN only: the transformer scheme is not set. Each row then
fine-tunes a copy of that fake-quantized model for --steps Adam steps of batch 16 on the export's calibration
images (training split only) in random versions of the TTA views, with the FP32 model as teacher, and reports the
fake-quantized model's top-1 agreement with FP32 on the gate's inputs (the export's parity set: val images x TTA
views) and on the whole val split, and its val ACC change. BatchNorm and dropout stay in eval mode.

    .venv/bin/python benchmarks/int8_qat.py CHECKPOINT [--rows ptq kl_1e-4 ...] [--steps 300] [--out DIR]

Writes DIR/int8_qat.md (a markdown table with this command and its date).
"""

from __future__ import annotations

import argparse
import copy
import logging
import shlex
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from common import REPO, existing_path, now, run_main  # noqa: E402

from edgekd.export import export_inputs  # noqa: E402
from edgekd.export.parity import torch_logits  # noqa: E402
from edgekd.export.profile import load_profile  # noqa: E402
from edgekd.fileio import write_text  # noqa: E402

COMPUTE_METATYPES = ("Conv1DOp", "Conv2DOp", "Conv3DOp", "LinearOp", "MatMulOp")
# row -> (what it tries, loss, which parameters learn, Adam lr)
ROWS = {
    "ptq": ("NNCF PTQ of the PyTorch model, no fine-tuning", None, None, 0.0),
    "kl_1e-4": ("KL(FP32 softmax, T=1), all parameters, lr 1e-4", "kl", "all", 1e-4),
    "kl_1e-3": ("KL(FP32 softmax, T=1), all parameters, lr 1e-3", "kl", "all", 1e-3),
    "mse_1e-4": ("MSE to the FP32 logits, all parameters, lr 1e-4", "mse", "all", 1e-4),
    "mse_ranges": ("MSE to the FP32 logits, quantizer ranges only, lr 1e-2", "mse", "ranges", 1e-2),
    "hinge_1e-5": ("FP32 top class must lead by 1 logit (hinge), all parameters, lr 1e-5", "hinge", "all", 1e-5),
    "hinge_1e-4": ("the same hinge, lr 1e-4", "hinge", "all", 1e-4),
}


def compute_nodes(model: torch.nn.Module, example: torch.Tensor) -> list[str]:
    """The model's conv/linear nodes in NNCF's PyTorch graph, in topological order (keep_first_last)."""
    from nncf.torch import wrap_model

    graph = wrap_model(copy.deepcopy(model).eval(), example, trace_parameters=True).get_graph()
    return [n.node_name for n in graph.topological_sort() if n.metatype.name in COMPUTE_METATYPES]


def random_views(x: torch.Tensor, g: torch.Generator, fill: list[float], crop: float) -> torch.Tensor:
    """Each normalized image as-is, h/v-flipped, rotated by up to 15 degrees, or center-cropped (crop..1)."""
    h, w = x.shape[-2:]
    out = []
    for img, kind, u in zip(x, torch.randint(0, 5, (len(x),), generator=g).tolist(),
                            torch.rand(len(x), generator=g).tolist()):
        if kind == 1:
            img = TF.horizontal_flip(img)
        elif kind == 2:
            img = TF.vertical_flip(img)
        elif kind == 3:
            img = TF.rotate(img, (2 * u - 1) * 15.0, interpolation=InterpolationMode.BILINEAR, fill=fill)
        elif kind == 4:
            f = crop + (1 - crop) * u
            img = TF.resize(TF.center_crop(img, [round(f * h), round(f * w)]), [h, w],
                            interpolation=InterpolationMode.BILINEAR, antialias=True)
        out.append(img)
    return torch.stack(out)


def row_loss(kind: str, out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    if kind == "kl":
        return F.kl_div(F.log_softmax(out, 1), F.softmax(ref, 1), reduction="batchmean")
    if kind == "mse":
        return F.mse_loss(out, ref)
    top = ref.argmax(1)
    rival = out.masked_fill(F.one_hot(top, out.shape[1]).bool(), float("-inf")).max(1).values
    return F.relu(1.0 - (out.gather(1, top[:, None])[:, 0] - rival)).mean()


def fine_tune(teacher, student, images: np.ndarray, kind: str, which: str, lr: float, steps: int,
              fill: list[float], crop: float) -> tuple[float, float]:
    """Adam steps on random views of `images`; returns the mean loss of the first and last 20 steps."""
    g = torch.Generator().manual_seed(0)
    student.eval()
    params = []
    for name, p in student.named_parameters():
        if p.is_floating_point():  # NNCF keeps integer buffers among the parameters; they never learn
            learns = which == "all" or any(key in name for key in ("_scale_param_storage", "input_low", "input_range"))
            p.requires_grad_(learns)
            params += [p] if learns else []
    opt = torch.optim.Adam(params, lr=lr)
    data, losses = torch.from_numpy(images), []
    for _ in range(steps):
        x = random_views(data[torch.randint(0, len(data), (16,), generator=g)], g, fill, crop)
        with torch.no_grad():
            ref = teacher(x)
        loss = row_loss(kind, student(x), ref)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return float(np.mean(losses[:20])), float(np.mean(losses[-20:]))


def main() -> None:
    import nncf

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=existing_path, help="a trained checkpoint (best.pt)")
    ap.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "int8_qat")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    nncf.set_log_level(logging.ERROR)

    profile = load_profile(None)
    inputs = export_inputs(args.checkpoint, profile)
    model, parity_set, calib = inputs.model, inputs.parity_set, inputs.calibration
    x_val, y_val = parity_set.splits["val"]
    ref_gate, ref_val = torch_logits(model, parity_set.inputs).argmax(1), torch_logits(model, x_val).argmax(1)
    pre = inputs.preprocess
    fill = [-m / s for m, s in zip(pre["mean"], pre["std"])]
    compute = compute_nodes(model, torch.from_numpy(calib[:2]))
    kwargs = {"subset_size": len(calib), "preset": nncf.QuantizationPreset.MIXED, "fast_bias_correction": True,
              "ignored_scope": nncf.IgnoredScope(names=list(dict.fromkeys(compute[:1] + compute[-1:])))}
    base = nncf.quantize(copy.deepcopy(model), nncf.Dataset([torch.from_numpy(calib[i:i + 1])
                                                             for i in range(len(calib))]), **kwargs)

    lines = [f"`{shlex.join(['python', 'benchmarks/int8_qat.py', *sys.argv[1:]])}` ({now()}; "
             f"{len(calib)} calibration images, {args.steps} steps of batch 16, {torch.get_num_threads()} threads)", "",
             "| row | loss first -> last 20 steps | top-1 (gate inputs) | top-1 (val split) | val ΔACC (pt) | s |",
             "|---|---|---:|---:|---:|---:|"]
    for name in args.rows:
        what, kind, which, lr = ROWS[name]
        student, start, losses = copy.deepcopy(base), time.time(), "-"
        if kind is not None:
            first, last = fine_tune(model, student, calib, kind, which, lr, args.steps, fill,
                                    profile.tta.center_crop_fraction)
            losses = f"{first:.4f} -> {last:.4f}"
        gate = float((torch_logits(student, parity_set.inputs).argmax(1) == ref_gate).mean())
        pred = torch_logits(student, x_val).argmax(1)
        lines.append(f"| {what} | {losses} | {gate:.2%} | {float((pred == ref_val).mean()):.2%} | "
                     f"{100 * float((pred == y_val).mean() - (ref_val == y_val).mean()):+.2f} | "
                     f"{time.time() - start:.0f} |")
        print(lines[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "int8_qat.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    run_main(main)
