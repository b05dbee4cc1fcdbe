"""Inference backends for the runner: OpenVINO (default) and ONNX Runtime, compiled once and reused per call."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Protocol

import numpy as np

from edgekd.errors import EdgeKDError

BACKENDS = ("openvino", "onnx")
MAX_CACHED_REQUESTS = 4


class Backend(Protocol):
    """A compiled model: `infer(float32 NCHW batch) -> float32 (N, num_classes) logits`.

    The runner's own path is `input_buffer((N, C, H, W))` (a float32 array to fill) then `run()`: a backend that
    owns its input memory hands that out, so preprocessing writes straight into it with no extra copy.
    """

    name: str
    model_path: Path
    input_dims: list[int | None]
    """The model's input shape, None for dynamic axes."""

    def infer(self, batch: np.ndarray) -> np.ndarray: ...

    def input_buffer(self, shape: tuple[int, ...]) -> np.ndarray: ...

    def run(self) -> np.ndarray: ...


class OpenVINOBackend:
    """OpenVINO CPU plugin. FP32 math is pinned (INFERENCE_PRECISION_HINT=f32) so results match the export's parity
    check; the CPU plugin may otherwise pick bf16/fp16 on capable CPUs. Reads OpenVINO IR (.xml) or ONNX.

    The model is compiled once per batch size with a static input shape (the batch axis fixed): for the small
    models edgekd ships, a dynamic-shape compile costs ~3x the compile time and ~1.7x the latency of a static one
    (benchmarks/RESULTS.md, runtime section). The runner uses few sizes (1 image, 1 x V TTA views, its chunk size and
    the last partial chunk), and at most MAX_CACHED_REQUESTS compiled sizes are kept. `static_shapes=False`
    compiles one dynamic-batch model instead (many different batch sizes, or a model whose H/W are dynamic).
    """

    name = "openvino"

    def __init__(self, model_path: str | Path, input_name: str, output_name: str, threads: int | None = None,
                 inference_precision: str = "f32", cache_dir: str | Path | None = None, static_shapes: bool = True):
        import openvino as ov

        self.model_path = Path(model_path)
        self.core = ov.Core()
        try:
            model = self.core.read_model(str(self.model_path))
        except Exception as err:  # OpenVINO raises RuntimeError subclasses with long messages
            raise EdgeKDError(f"{self.model_path}: OpenVINO cannot read the model ({str(err).splitlines()[0][:120]})") from None
        input_port = _find_port(model.inputs, input_name, self.model_path, "input")
        _find_port(model.outputs, output_name, self.model_path, "output")
        shape = input_port.get_partial_shape()
        dims = [None if d.is_dynamic else d.get_length() for d in shape] if shape.rank.is_static else []
        self.input_dims = [None, *dims[1:]] if len(dims) == 4 else dims
        """The model's input shape, batch axis reported as None (any batch size works)."""
        self.input_name, self.output_name = input_name, output_name
        self.config = {"INFERENCE_PRECISION_HINT": inference_precision, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = int(threads)
        if cache_dir:
            # OpenVINO's model cache: later processes import the compiled blob instead of compiling (cold start).
            self.config["CACHE_DIR"] = str(cache_dir)
        self.model = model
        self.static_shapes = static_shapes and len(dims) == 4 and all(d is not None for d in dims[1:])
        self.dynamic = None
        if not self.static_shapes:
            if len(dims) == 4 and dims[0] is not None:
                # A static batch axis would force one request per image: make it dynamic once, at load.
                model.reshape({input_port.get_any_name(): ov.PartialShape([-1, *[d for d in shape][1:]])})
            self.dynamic = self.core.compile_model(model, "CPU", self.config)
        # One (compiled model, infer request) per batch size: a request re-allocates its buffers whenever the input
        # shape changes, and the runner alternates between shapes (1 image, N images x V TTA views, the last chunk).
        self.requests: OrderedDict[int, tuple[object, object, object]] = OrderedDict()
        self._current: tuple[object, object, object] | None = None
        self._pending: np.ndarray | None = None

    def _request(self, batch_size: int):
        """(infer request, its input array, its output tensor) for this batch size, compiled on first use."""
        entry = self.requests.get(batch_size)
        if entry is not None:
            self.requests.move_to_end(batch_size)
            return entry
        if self.static_shapes:
            import openvino as ov

            model = self.model.clone()
            model.reshape({self.input_name: ov.PartialShape([batch_size, *self.input_dims[1:]])})
            compiled = self.core.compile_model(model, "CPU", self.config)
        else:
            compiled = self.dynamic
        request = compiled.create_infer_request()
        input_array = request.get_tensor(compiled.input(self.input_name)).data if self.static_shapes else None
        entry = (request, input_array, request.get_tensor(compiled.output(self.output_name)))
        self.requests[batch_size] = entry
        while len(self.requests) > MAX_CACHED_REQUESTS:
            self.requests.popitem(last=False)
        return entry

    def infer(self, batch: np.ndarray) -> np.ndarray:
        np.copyto(self.input_buffer(batch.shape), batch, casting="same_kind")
        return self.run()

    def input_buffer(self, shape: tuple[int, ...]) -> np.ndarray:
        """Static shape: the request's own input memory (filling it skips OpenVINO's Python input dispatcher,
        ~40 us per call, a sixth of a small CNN's batch-1 latency). Dynamic: a new array, handed over at `run`."""
        self._current = self._request(shape[0])
        input_array = self._current[1]
        if input_array is None:
            input_array = self._pending = np.empty(shape, dtype=np.float32)
        return input_array

    def run(self) -> np.ndarray:
        """Run on the last `input_buffer`, filled; the logits are copied (the request reuses its output memory)."""
        request, input_array, output = self._current
        if input_array is None:
            request.infer({self.input_name: self._pending}, share_inputs=True)
            self._pending = None
        else:
            # start_async + wait: infer() would also build a Python dict of the outputs, which is not needed here.
            request.start_async()
            request.wait()
        return output.data.copy()


class ONNXRuntimeBackend:
    """ONNX Runtime CPU execution provider with full graph optimizations and a fixed intra-op thread count."""

    name = "onnx"

    def __init__(self, model_path: str | Path, input_name: str, output_name: str, threads: int | None = None):
        import onnxruntime as ort

        self.model_path = Path(model_path)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        if threads:
            options.intra_op_num_threads = int(threads)
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.model_path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types
            raise EdgeKDError(f"{self.model_path}: ONNX Runtime cannot load the model ({str(err).splitlines()[0][:120]})") from None
        port = _find_port(self.session.get_inputs(), input_name, self.model_path, "input")
        _find_port(self.session.get_outputs(), output_name, self.model_path, "output")
        self.input_dims = [d if isinstance(d, int) else None for d in port.shape]
        self.input_name, self.output_name = input_name, output_name
        self._pending: np.ndarray | None = None

    def infer(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        return self.session.run([self.output_name], {self.input_name: batch})[0]

    def input_buffer(self, shape: tuple[int, ...]) -> np.ndarray:
        self._pending = np.empty(shape, dtype=np.float32)
        return self._pending

    def run(self) -> np.ndarray:
        batch, self._pending = self._pending, None
        return self.session.run([self.output_name], {self.input_name: batch})[0]


def _port_names(port) -> set[str]:
    if hasattr(port, "get_names"):
        return set(port.get_names())
    return {port.name}


def _find_port(ports, name: str, path: Path, kind: str):
    for port in ports:
        if name in _port_names(port):
            return port
    have = sorted(n for p in ports for n in _port_names(p))
    raise EdgeKDError(f"{path}: the model has no {kind} named '{name}' (it has: {', '.join(have) or 'none'})")


def create_backend(name: str, model_path: str | Path, input_name: str, output_name: str,
                   threads: int | None = None, inference_precision: str | None = None,
                   cache_dir: str | Path | None = None) -> Backend:
    """`cache_dir` applies to OpenVINO only (ONNX Runtime sessions build in milliseconds for these models)."""
    if name == "openvino":
        return OpenVINOBackend(model_path, input_name, output_name, threads, inference_precision or "f32", cache_dir)
    if name == "onnx":
        return ONNXRuntimeBackend(model_path, input_name, output_name, threads)
    raise EdgeKDError(f"unknown backend '{name}' (use {', '.join(BACKENDS)})")
