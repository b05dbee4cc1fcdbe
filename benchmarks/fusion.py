"""What fusing re-parameterizable blocks buys at export (`edgekd export` traces `edgekd.models.deploy_form`, timm's
reparameterize_model; profile `fuse: false` exports the training form).

    .venv/bin/python benchmarks/fusion.py [--arch repvgg_a0 mobileone_s0 fastvit_t8] [--size 224] [--note '...']

Per architecture (initial weights: speed does not depend on them, 2 classes, batch 1, 2 threads): the training form
and the fused form in PyTorch eager, ONNX Runtime FP32 and OpenVINO FP32 (f32 math), every (engine, form) timed in
its own block of calls, the blocks in alternating phases (edgekd.runtime.timing.time_alternating, as the export's
INT8 speed check: timed call by call, two forms of one engine slow the faster one), plus params, MACs and the largest logit difference between the forms relative to the
largest logit. Writes benchmarks/results/fusion.json and the RESULTS.md section between the `fusion` markers.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import warnings
from pathlib import Path

import timm
import torch
from common import RESULTS, machine_line, results_doc, run_main, write_section  # noqa: E402

from edgekd.bench.worker import onnx_session, openvino_request  # noqa: E402
from edgekd.fileio import write_json  # noqa: E402
from edgekd.models import count_macs, count_parameters, deploy_form  # noqa: E402
from edgekd.runtime.timing import time_alternating  # noqa: E402

MARKERS = ("<!-- fusion:begin -->", "<!-- fusion:end -->")
ENGINES = ("pytorch eager", "onnxruntime fp32", "openvino fp32")


def engines(model: torch.nn.Module, x: torch.Tensor, work: Path, tag: str, threads: int) -> dict[str, object]:
    """engine -> a callable running `model` on `x` there (ONNX as the export writes it: opset 18, dynamic batch)."""
    onnx_path = work / f"{tag}.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(onnx_path), input_names=["input"], output_names=["logits"], opset_version=18,
                          dynamo=False, dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    import openvino as ov

    xml = work / f"{tag}.xml"
    ov.save_model(ov.convert_model(str(onnx_path)), str(xml))
    arr = x.numpy()
    ort_run, ov_run = onnx_session(str(onnx_path), threads), openvino_request(str(xml), threads)

    def eager():
        with torch.no_grad():
            model(x)

    return {"pytorch eager": eager, "onnxruntime fp32": lambda: ort_run(arr), "openvino fp32": lambda: ov_run(arr)}


def measure(arch: str, size: int, threads: int, rounds: int) -> list[dict]:
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=2, pretrained=False).eval()
    fused, blocks = deploy_form(model)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        probe = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))
        ref, out = model(probe), fused(probe)
    rel = float((out - ref).abs().max() / ref.abs().max())
    with tempfile.TemporaryDirectory() as tmp:
        forms = {"training": engines(model, x, Path(tmp), "training", threads),
                 "fused": engines(fused, x, Path(tmp), "fused", threads)}
        groups = [{f"{e}|{form}": forms[form][e]} for e in ENGINES for form in forms]
        stats = time_alternating(groups, phases=5, rounds=rounds)
    base = {"arch": arch, "input": size, "threads": threads, "fused_blocks": blocks,
            "params": count_parameters(model), "params_fused": count_parameters(fused),
            "macs": count_macs(model, (3, size, size)), "macs_fused": count_macs(fused, (3, size, size)),
            "max_rel_logit_diff": rel}
    records = []
    for e in ENGINES:
        train_ms, fused_ms = stats[f"{e}|training"]["p50_ms"], stats[f"{e}|fused"]["p50_ms"]
        records.append({**base, "engine": e, "p50_ms_training": train_ms, "p50_ms_fused": fused_ms,
                        "speedup": train_ms / fused_ms, "p99_ms_fused": stats[f"{e}|fused"]["p99_ms"]})
        print(f"{arch} {e}: training {train_ms:.2f} ms, fused {fused_ms:.2f} ms ({train_ms / fused_ms:.2f}x)",
              flush=True)
    return records


def section(doc: dict) -> str:
    lines = [MARKERS[0], "## Fusing re-parameterizable blocks at export (`benchmarks/fusion.py`)", "",
             f"`{doc['command']}` on {doc['date'][:10]}, {machine_line(doc['machine'])}. "
             "Initial weights, batch 1, p50 ms; "
             + ("each engine and form timed in its own block of calls, the blocks in alternating phases."
                if doc.get("timing") == "blocks" else "each engine's two forms timed interleaved, call by call.")
             + (f" Note: {doc['note']}." if doc.get("note") else ""),
             "", "| model | blocks fused | params | MACs | max rel. logit diff | engine | training form | fused | speed-up |",
             "|---|---:|---|---|---:|---|---:|---:|---:|"]
    for r in doc["records"]:
        lines.append(f"| {r['arch']} ({r['input']} px) | {r['fused_blocks']} | {r['params'] / 1e6:.2f}M → "
                     f"{r['params_fused'] / 1e6:.2f}M | {r['macs'] / 1e9:.2f}G → {r['macs_fused'] / 1e9:.2f}G | "
                     f"{r['max_rel_logit_diff']:.1e} | {r['engine']} | {r['p50_ms_training']:.2f} | "
                     f"{r['p50_ms_fused']:.2f} | {r['speedup']:.2f}x |")
    return "\n".join(lines + ["", MARKERS[1]])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", nargs="+", default=["repvgg_a0", "mobileone_s0", "fastvit_t8"])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=100, help="timed calls per engine and form")
    ap.add_argument("--note", default="", help="how quiet the machine was, kept in the results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    records = [r for arch in args.arch for r in measure(arch, args.size, args.threads, args.rounds)]
    command = "python benchmarks/fusion.py " + shlex.join(sys.argv[1:])
    doc = results_doc("fusion", command, records, note=args.note, timing="blocks")
    write_json(RESULTS / "fusion.json", doc)
    write_section(section(doc), *MARKERS)
    return 0


if __name__ == "__main__":
    run_main(main)
