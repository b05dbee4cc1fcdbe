"""One benchmark row in a fresh process: load a model, time it per batch size, read peak RSS, score the test images.

    python -m edgekd.bench.worker JOB.json

A fresh process per (model, format, precision, variant) keeps peak RSS honest (no torch, no other model in the
process) and keeps one format's threads from spinning over another's. ONNX Runtime and OpenVINO jobs import no
torch. The result (timings, peak RSS, errors) is written as JSON to job["result"], probabilities to job["probs"].
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import numpy as np

from edgekd.fileio import atomic_write
from edgekd.probability import softmax
from edgekd.runtime.backends import compile_for_cpu
from edgekd.runtime.preprocess import Preprocessor
from edgekd.runtime.timing import peak_rss_mb, time_call
from edgekd.runtime.tta import TTAViews

Infer = Callable[[np.ndarray], np.ndarray]
"""float32 (rows, C, H, W) model input -> (rows, classes) logits."""


class ModelInputs:
    """uint8 images (at the resize stage or model size) -> the float32 rows the model sees: the model-size crop
    of every image in each TTA view (or the crop alone)."""

    def __init__(self, job: dict):
        self.preprocessor = Preprocessor(job["preprocess"])
        # the stored images had hair removal at their decoded size (Preprocessor.to_resize_size; a second pass on
        # the resized copy had changed the pixels every row scored): not again here, nor in the runner's rows
        self.preprocessor.hair_removal = False
        views = job.get("views")
        self.views = TTAViews(views, job.get("center_crop_fraction", 0.875)) if views else None
        self.n_views = len(self.views) if self.views else 1

    def rows(self, images: np.ndarray) -> np.ndarray:
        sized = [self.preprocessor.to_model_size(a) for a in images]
        stack = np.stack(sized) if self.views is None else np.concatenate([self.views(a) for a in sized])
        return self.preprocessor.normalize(stack)

    def mean_probs(self, logits: np.ndarray) -> np.ndarray:
        """Per-image mean softmax over its views (the runtime's TTA ensemble)."""
        probs = softmax(logits)
        return probs.reshape(-1, self.n_views, probs.shape[-1]).mean(axis=1)


def take(images: np.ndarray, n: int) -> np.ndarray:
    """The first n images, cycling when the test set is smaller than the batch."""
    return np.ascontiguousarray(images[np.arange(n) % len(images)])


def onnx_session(path: str, threads: int) -> Infer:
    """A bare ONNX Runtime CPU session (the same session options as edgekd.runtime's backend)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def openvino_config(threads: int, perf_count: bool = False) -> dict:
    # f32 math as the export's parity gate and the runtime use (this CPU plugin may otherwise pick bf16/fp16).
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
    if perf_count:
        config["PERF_COUNT"] = True
    return config


def openvino_model(path: str, threads: int, perf_count: bool = False, batch: int | None = None, model=None):
    """The model compiled for the CPU; with `batch`, for that static input shape (the batch axis fixed), which
    compiles faster and runs faster than the dynamic-batch model for small CNNs (the edge runner does the same).
    `model`: an ov.Model already read (changed in place: give a clone)."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(path) if model is None else model
    if batch is not None:
        port = model.inputs[0]
        model.reshape({port.get_any_name(): ov.PartialShape([batch, *list(port.get_partial_shape())[1:]])})
    return compile_for_cpu(core, model, openvino_config(threads, perf_count))


def openvino_request(path: str, threads: int) -> Infer:
    """Bare OpenVINO: one static-shape compiled model and infer request per batch size (compiled at its first
    call, the row's first_call_ms). The engine's import and the model's read happen here, in load_s, as ONNX
    Runtime's session is made in onnx_session: it had been read in the first call, load_s ~0."""
    import openvino as ov

    requests: dict[int, object] = {}
    read = ov.Core().read_model(path)

    def infer(x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        if n not in requests:
            requests[n] = openvino_model(path, threads, batch=n, model=read.clone()).create_infer_request()
        return np.array(requests[n].infer({0: x}, share_inputs=True)[0])

    return infer


def torch_model(checkpoint: str, threads: int, compile_: bool, fuse: bool = True) -> Infer:
    import torch

    from edgekd.models import deploy_form
    from edgekd.train.checkpoint import model_from_checkpoint

    torch.set_num_threads(threads)
    model = model_from_checkpoint(checkpoint)[0]
    model = deploy_form(model)[0] if fuse else model  # as the export traced it (profile fuse)
    if compile_:
        model = torch.compile(model, dynamic=False)

    def infer(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()

    return infer


def openvino_profile(path: str, rows: np.ndarray, threads: int, rounds: int = 20, top: int = 12) -> dict:
    """OpenVINO's per-layer counters after `rounds` inferences: where the time goes and in which precision.

    The exec type (e.g. `jit_avx2_FP32`, `brgconv_avx2_I8`) tells whether a layer ran INT8 kernels, which explains
    an INT8 speed-up (or its absence) on a CPU with or without VNNI dot-product instructions.
    """
    request = openvino_model(path, threads, perf_count=True, batch=rows.shape[0]).create_infer_request()
    for _ in range(rounds):
        request.infer({0: rows}, share_inputs=True)
    layers = [{"name": p.node_name, "type": p.node_type, "exec_type": p.exec_type,
               "ms": p.real_time.total_seconds() * 1e3} for p in request.get_profiling_info()
              if str(p.status).endswith("EXECUTED")]
    total = sum(p["ms"] for p in layers) or float("nan")
    by_type: dict[str, float] = {}
    by_precision: dict[str, float] = {}
    for p in layers:
        by_type[p["type"]] = by_type.get(p["type"], 0.0) + p["ms"]
        precision = p["exec_type"].rsplit("_", 1)[-1] if "_" in p["exec_type"] else p["exec_type"]
        by_precision[precision] = by_precision.get(precision, 0.0) + p["ms"]
    share = lambda d: {k: round(v / total, 4) for k, v in sorted(d.items(), key=lambda kv: -kv[1])}  # noqa: E731
    return {"batch": int(rows.shape[0]), "total_ms": total, "layers_executed": len(layers),
            "time_share_by_type": share(by_type), "time_share_by_exec_precision": share(by_precision),
            "top_layers": sorted(layers, key=lambda p: -p["ms"])[:top]}


def build(job: dict, inputs: ModelInputs) -> tuple[Callable[[np.ndarray], Callable[[], object]],
                                                    Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]]:
    """-> (timed callable for a batch of uint8 images, (probabilities, labels) for a batch of uint8 images; labels
    only for a runner row: the class index its operating point gives, as `edgekd predict` labels an image)."""
    kind, variant, threads = job["kind"], job["variant"], int(job["threads"])
    if variant == "runner":
        from edgekd.runtime import Runner

        runner = Runner.from_bundle(job["bundle"], backend=kind, precision=job["precision"], threads=threads,
                                    warmup=0)
        runner.preprocessor.hair_removal = False  # done once on the stored images, at their decoded size
        tta = list(job["views"]) if job.get("views") else False

        def runner_scores(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            predictions = runner.predict_batch(list(images), tta=tta)
            return np.stack([p.probs for p in predictions]), np.asarray([p.index for p in predictions])

        return (lambda images: (lambda: runner.predict_batch(list(images), tta=tta))), runner_scores
    if kind == "torch":
        infer = torch_model(job["model_path"], threads, compile_=variant == "compile", fuse=job.get("fuse", True))
    elif kind == "onnx":
        infer = onnx_session(job["model_path"], threads)
    elif kind == "openvino":
        infer = openvino_request(job["model_path"], threads)
    else:
        raise ValueError(f"unknown job kind '{kind}'")

    def timed(images: np.ndarray) -> Callable[[], object]:
        rows = inputs.rows(images)  # preprocessing stays outside the timed call: this is the bare model
        return lambda: infer(rows)

    return timed, lambda images: (inputs.mean_probs(infer(inputs.rows(images))), None)


def evaluate(scores_of: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]], images: np.ndarray,
             batch: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(probabilities, labels or None) of every image, `batch` images per call; the last chunk is padded to `batch`
    (by repeating its images) so no new input shape appears (torch.compile would recompile, OpenVINO reallocate)."""
    probs, labels = [], []
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        n = len(chunk)
        p, y = scores_of(take(chunk, batch))
        probs.append(p[:n])
        labels.append(None if y is None else y[:n])
    return np.concatenate(probs), None if not labels or labels[0] is None else np.concatenate(labels)


def run_job(job: dict) -> dict:
    result: dict = {"kind": job["kind"], "variant": job["variant"], "precision": job.get("precision")}
    if job["kind"] == "gemm":
        from edgekd.bench.hardware import measure_gemm_peak

        result["gemm"] = measure_gemm_peak(int(job["threads"]), tuple(job.get("sizes") or (512, 1024, 2048)),
                                           float(job.get("min_seconds", 0.5)))
        return result
    images = np.load(job["images"], mmap_mode="r")
    inputs = ModelInputs(job)
    t0 = time.perf_counter()
    timed, probs_of = build(job, inputs)
    result["load_s"] = time.perf_counter() - t0
    timing = job.get("timing") or {}
    result["timings"], result["peak_rss_mb_by_batch"] = {}, {}
    for batch in sorted(job["batches"]):  # ascending: the process's peak after each is that batch's
        result["timings"][str(batch)] = time_call(timed(take(images, batch)), **timing)
        result["peak_rss_mb_by_batch"][str(batch)] = peak_rss_mb()
    # Read before scoring the test set, whose arrays would count too: this is the peak of loading and inferring.
    result["peak_rss_mb"] = peak_rss_mb()
    if job.get("evaluate"):
        limit = job.get("eval_limit")
        subset = images if not limit else images[:limit]
        probs, labels = evaluate(probs_of, subset, max(job["batches"]))
        np.save(job["probs"], probs)
        result["probs"] = job["probs"]
        if labels is not None:
            probs_path = Path(job["probs"])
            result["labels"] = str(probs_path.with_name(probs_path.name.replace("-probs.npy", "-labels.npy")))
            np.save(result["labels"], labels)
    if job.get("profile_batch") and job["kind"] == "openvino" and job["variant"] == "bare":
        result["profile"] = openvino_profile(job["model_path"], inputs.rows(take(images, job["profile_batch"])),
                                             int(job["threads"]))
    result["torch_loaded"] = "torch" in sys.modules
    return result


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[0]).read_text())
    try:
        result = run_job(job)
        code = 0
    except Exception as err:  # reported by the parent as this row's "n/a" reason
        message = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        result = {"error": f"{type(err).__name__}: {message}", "traceback": traceback.format_exc()[-4000:]}
        code = 1
    # atomic: a worker killed mid-write leaves no half a result for the parent to parse (NaN kept as json writes it)
    atomic_write(job["result"], lambda tmp: Path(tmp).write_text(json.dumps(result)))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
