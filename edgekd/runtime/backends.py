"""Inference backends for the runner: OpenVINO (default) and ONNX Runtime, compiled once and reused per call.

Each backend has two ways in:
- `infer(x)`: the bare call, float32 (N, C, H, W) model input -> (N, classes) logits, the exported model as it is
  (parity checks, benchmarks, `Runner.infer`);
- `image_slot(n, views, channels)`: the runner's path, a `Slot` whose `inputs` take uint8 (n, H, W, C) model-size
  images and whose `run()` returns (n x V, classes) probabilities, every image's TTA views in a row. OpenVINO
  builds the views, normalizes, transposes NHWC -> NCHW and applies a log-softmax inside the compiled model (its
  PrePostProcessor), so a prediction is one copy of uint8 pixels and one inference call; ONNX Runtime does the
  same steps in numpy around the session.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from edgekd.errors import EdgeKDError, exception_line
from edgekd.probability import head_softmax
from edgekd.runtime.bundle import RT_INFO_SECTION
from edgekd.runtime.preprocess import Preprocessor
from edgekd.runtime.tta import TTAViews

BACKENDS = ("openvino", "onnx")
MAX_CACHED_REQUESTS = 4
ModelData = tuple[bytes, "bytes | None"]
"""A model file's bytes and, for OpenVINO IR, its weights' bytes."""
Heads = "list[tuple[int, int]] | None"
"""A multi-head bundle's output slices [lo, hi), one per task: the image path's softmax is taken per slice."""


def compile_for_cpu(core, model, config: dict):
    """`core.compile_model(model, "CPU", config)`, the calling thread's alternate signal stack kept as it was.

    OpenVINO's CPU plugin (2026.4) gives the compiling thread an alternate signal stack and, when the compiled
    model is destroyed, puts back the stack it found. Two models destroyed in the order they were made leave the
    thread on the first one's freed stack, and the next signal handled there (SIGTERM, Ctrl-C) crashed the
    process with a segfault (two runners, then SIGTERM). Putting the thread's own stack back right after compiling
    leaves every later restore pointing at that one."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return core.compile_model(model, "CPU", config)
    restore = _signal_stack_restorer()
    try:
        return core.compile_model(model, "CPU", config)
    finally:
        restore()


def _signal_stack_restorer() -> Callable[[], None]:
    """A function that sets the calling thread's alternate signal stack (sigaltstack, through ctypes) back to what
    it is now; a no-op where libc has no sigaltstack."""
    import ctypes

    class StackT(ctypes.Structure):
        _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]

    try:
        sigaltstack = ctypes.CDLL(None).sigaltstack
    except (OSError, AttributeError):  # not a POSIX libc
        return lambda: None
    current = StackT()
    if sigaltstack(None, ctypes.byref(current)) != 0:
        return lambda: None
    current.ss_flags &= 2  # keep SS_DISABLE (the thread had none); SS_ONSTACK cannot be set
    return lambda: sigaltstack(ctypes.byref(current), None)


class Slot:
    """One compiled input size of a backend: fill `inputs` (for OpenVINO with static shapes, the inference
    request's own memory), then `run()` returns a fresh (rows, classes) array. `request` is the OpenVINO infer
    request behind it (None for ONNX Runtime). Not thread-safe: one caller at a time, as an infer request."""

    __slots__ = ("inputs", "run", "request")

    def __init__(self, inputs: np.ndarray, run: Callable[[], np.ndarray], request=None):
        self.inputs, self.run, self.request = inputs, run, request


class Backend(Protocol):
    """A compiled model. `infer(float32 NCHW batch) -> logits` is the bare call; the runner's own path is
    `image_slot(n, views, channels)`: its `inputs` a uint8 (n, H, W, C) array to fill with model-size images
    (channels 1 for gray images and a 3-channel model, repeated to RGB inside), its `run()` -> (n x len(views),
    classes) probabilities, image by image, views in order (views None: one row per image)."""

    name: str
    model_path: Path
    input_dims: list[int | None]
    """The model's input shape, None for dynamic axes."""

    def infer(self, batch: np.ndarray) -> np.ndarray: ...

    def image_slot(self, n: int, views: TTAViews | None = None, channels: int | None = None) -> Slot: ...

    def embedded_metadata(self) -> dict[str, str]:
        """The metadata the export wrote into the model file, as string pairs ({} if none)."""


def _image_channels(channels: int | None, model_channels: int) -> int:
    """The channels of the images handed to the image path: the model's, or 1 (gray) for a 3-channel model."""
    if channels is None or channels == model_channels:
        return model_channels
    if channels == 1:
        return 1
    raise EdgeKDError(f"images with {channels} channels cannot feed a {model_channels}-channel model")


def _need_preprocessor(backend) -> Preprocessor:
    if backend.preprocessor is None:
        raise EdgeKDError(f"{backend.model_path}: this {backend.name} backend was built without a preprocessing "
                          "spec, so it takes model input only (use infer)")
    return backend.preprocessor


def _cached(slots: OrderedDict, key: tuple, build: Callable[[], Slot]) -> Slot:
    """slots[key], built on first use; the least recently used beyond MAX_CACHED_REQUESTS are dropped."""
    slot = slots.get(key)
    if slot is None:
        slot = slots[key] = build()
        while len(slots) > MAX_CACHED_REQUESTS:
            slots.popitem(last=False)
    else:
        slots.move_to_end(key)
    return slot


def openvino_rt_metadata(model) -> dict[str, str]:
    """The export's metadata in an OpenVINO model's rt_info section, as string pairs ({} if none)."""
    if not model.has_rt_info([RT_INFO_SECTION]):
        return {}
    return {k: v.astype(str) for k, v in model.get_rt_info()[RT_INFO_SECTION].items()}  # OVAny values


class OpenVINOBackend:
    """OpenVINO CPU plugin. FP32 math is pinned (INFERENCE_PRECISION_HINT=f32) so results match the export's parity
    check; the CPU plugin may otherwise pick bf16/fp16 on capable CPUs. Reads OpenVINO IR (.xml) or ONNX.

    The image path compiles the model with the bundle's preprocessing in front (OpenVINO PrePostProcessor: uint8
    NHWC -> float32, the TTA views, x * scale, - mean, / std per channel, NHWC -> NCHW) and a log-softmax behind
    (probabilities taken in float64), built from `preprocessor` (the bundle's spec). The views are one gather + weighted sum of 4 source pixels + rounding
    (`TTAViews.linear_maps`, exact in float32, so the same pixels as the numpy views); the float steps are torch's,
    in torch's order, so probabilities match the numpy preprocessing + bare call within float rounding.

    Every model is compiled per batch size with a static input shape (the batch axis fixed): for the small models
    edgekd ships, a dynamic-shape compile costs ~3x the compile time and ~1.7x the latency of a static one
    (benchmarks/RESULTS.md, runtime section). The runner uses few sizes (1 image, 1 x V TTA views, its chunk size and
    the last partial chunk), and at most MAX_CACHED_REQUESTS compiled models are kept. `static_shapes=False`
    compiles dynamic-batch models instead (many different batch sizes, or a model whose H/W are dynamic).
    """

    name = "openvino"

    def __init__(self, model_path: str | Path, input_name: str, output_name: str, threads: int | None = None,
                 inference_precision: str = "f32", cache_dir: str | Path | None = None, static_shapes: bool = True,
                 preprocessor: Preprocessor | None = None, model_data: ModelData | None = None, heads: Heads = None):
        import openvino as ov

        self.model_path = Path(model_path)
        self.core = ov.Core()
        try:
            model = (self.core.read_model(str(self.model_path)) if model_data is None
                     else self.core.read_model(model_data[0], model_data[1] or b""))
        except Exception as err:  # OpenVINO raises RuntimeError subclasses with long messages
            raise EdgeKDError(f"{self.model_path}: OpenVINO cannot read the model ({exception_line(err, 120)})") from None
        input_port = _find_port(model.inputs, input_name, self.model_path, "input")
        _find_port(model.outputs, output_name, self.model_path, "output")
        shape = input_port.get_partial_shape()
        dims = [None if d.is_dynamic else d.get_length() for d in shape] if shape.rank.is_static else []
        self.input_dims = [None, *dims[1:]] if len(dims) == 4 else dims
        """The model's input shape, batch axis reported as None (any batch size works)."""
        self.input_name, self.output_name = input_name, output_name
        self.preprocessor, self.heads = preprocessor, heads
        self.config = {"INFERENCE_PRECISION_HINT": inference_precision, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = int(threads)
        if cache_dir:
            # OpenVINO's model cache: later processes import the compiled blob instead of compiling (cold start).
            self.config["CACHE_DIR"] = str(cache_dir)
        if len(dims) == 4 and dims[0] is not None:
            # A static batch axis in the file would force one request per image: make it dynamic once, at load.
            model.reshape({input_port.get_any_name(): ov.PartialShape([-1, *[d for d in shape][1:]])})
        self.model = model
        self.static_shapes = static_shapes and len(dims) == 4 and all(d is not None for d in dims[1:])
        # One Slot (infer request + its input and output memory) per (kind, input shape, TTA views): a request
        # re-allocates its buffers whenever the input shape changes, and the runner alternates between shapes
        # (1 image, a chunk of N images, the last chunk). kind is "images" (the runner's path) or "tensor" (the
        # bare model).
        self.slots: OrderedDict[tuple, Slot] = OrderedDict()
        self._dynamic: dict[tuple, object] = {}

    def embedded_metadata(self) -> dict[str, str]:
        return openvino_rt_metadata(self.model)

    def _compile(self, kind: str, batch_size: int | None, views: TTAViews | None, channels: int | None):
        """The model (with the image pre/post-processing for kind "images", taking `channels`-channel images)
        compiled for this static number of inputs, or with a dynamic batch axis when batch_size is None."""
        import openvino as ov

        model = self.model.clone()
        rows = batch_size * len(views) if batch_size is not None and views is not None else batch_size
        if rows is not None:
            model.reshape({self.input_name: ov.PartialShape([rows, *self.input_dims[1:]])})
        if kind == "images":
            model = _with_image_processing(model, self.input_name, self.output_name, _need_preprocessor(self), views,
                                           batch_size, channels, self.heads)
        return compile_for_cpu(self.core, model, self.config)

    def _new_slot(self, kind: str, shape: tuple[int, ...], views: TTAViews | None) -> Slot:
        """A compiled request for `shape` inputs: uint8 (n, H, W, C) images or the model's float32 tensor.

        Static shapes: the inputs are the request's own memory (filling it skips OpenVINO's Python input
        dispatcher, ~40 us per call, a sixth of a small CNN's batch-1 latency) and `run` is one synchronous call
        on the calling thread (start_async + wait hands the job to a worker thread and back, ~10-20 us more on
        this class of CPU); share_outputs: no result dict of copies. Dynamic: one dynamic-batch model per (kind,
        channels), inputs handed over at each call; TTA views are built in numpy (the graph's gather needs a
        static number of images). Results are copies (the request reuses its output memory)."""
        n, channels = shape[0], shape[-1] if kind == "images" else None
        gray = kind == "images" and channels == 1  # fed as (n, 1, H, W): the same memory as (n, H, W, 1)
        if self.static_shapes:
            compiled = self._compile(kind, n, views, channels)
            request = compiled.create_infer_request()
            # PrePostProcessor keeps the tensor names on the nodes it adds, so the names still find the ports.
            inputs = request.get_tensor(_find_port(compiled.inputs, self.input_name, self.model_path, "input")).data
            outputs = request.get_tensor(_find_port(compiled.outputs, self.output_name, self.model_path, "output")).data
            infer = request.infer

            def run() -> np.ndarray:
                infer(share_outputs=True)
                return probabilities(outputs) if kind == "images" else outputs.copy()

            return Slot(inputs.reshape(shape) if gray else inputs, run, request)

        dynamic_key = (kind, channels)
        if dynamic_key not in self._dynamic:
            self._dynamic[dynamic_key] = self._compile(kind, None, None, channels)
        compiled = self._dynamic[dynamic_key]
        request = compiled.create_infer_request()
        output = _find_port(compiled.outputs, self.output_name, self.model_path, "output")
        inputs = np.empty(shape, dtype=np.uint8 if kind == "images" else np.float32)

        def run_dynamic() -> np.ndarray:
            rows = inputs if views is None else np.concatenate([views(a) for a in inputs])
            if gray:
                rows = rows.reshape(rows.shape[0], 1, *rows.shape[1:3])
            request.infer({self.input_name: rows}, share_inputs=True)
            data = request.get_tensor(output).data
            return probabilities(data) if kind == "images" else data.copy()

        return Slot(inputs, run_dynamic, request)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        slot = _cached(self.slots, ("tensor", batch.shape), lambda: self._new_slot("tensor", batch.shape, None))
        np.copyto(slot.inputs, batch, casting="same_kind")
        return slot.run()

    def image_slot(self, n: int, views: TTAViews | None = None, channels: int | None = None) -> Slot:
        def build() -> Slot:
            c, h, w = _need_preprocessor(self).input_shape
            return self._new_slot("images", (n, h, w, _image_channels(channels, c)), views)

        return _cached(self.slots, ("images", n, views, channels), build)


def _with_image_processing(model, input_name: str, output_name: str, pre: Preprocessor,
                           views: TTAViews | None = None, n_images: int | None = None, channels: int | None = None,
                           heads: Heads = None):
    """OpenVINO PrePostProcessor: uint8 NHWC images in (one channel: declared NCHW, the same memory), with `views`
    every image's TTA views (image-major), then (x * scale - mean) / std, NCHW to the model, log-softmax out (per
    head's slice with `heads`). With views the number of images must be static. `channels` 1 for a 3-channel model:
    gray images, repeated to the 3 channels after the views (gray -> RGB)."""
    import openvino as ov
    import openvino.opset13 as ops
    from openvino.preprocess import PrePostProcessor

    c, h, w = pre.input_shape
    c_in = channels or c
    n = n_images if n_images is not None else -1
    ppp = PrePostProcessor(model)
    port = ppp.input(input_name)
    port.model().set_layout(ov.Layout("NCHW"))
    if c_in == 1:
        # Gray: (n, H, W, 1) pixels are the same memory as (n, 1, H, W), so the tensor is declared NCHW and needs
        # no transpose; a 3-channel model gets the channel repeated after the views.
        port.tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NCHW"))
        port.tensor().set_shape(ov.PartialShape([n, 1, h, w]))
    else:
        port.tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
        if views is not None:
            port.tensor().set_shape(ov.PartialShape([n, h, w, c_in]))
    steps = port.preprocess().convert_element_type(ov.Type.f32)
    if views is not None:
        out_shape = (n_images * len(views), 1, h, w) if c_in == 1 else (n_images * len(views), h, w, c_in)
        steps.custom(lambda node: _views_graph(node, views, n_images, h, w, c_in, out_shape))
    if c_in != c:
        # x * ones(C) repeats the channel: an elementwise op the plugin fuses with the normalization (a Concat
        # or Tile here runs as a reference kernel, ~6 us for a 28 px image).
        steps.custom(lambda node: ops.multiply(node, ops.constant(np.ones((1, c, 1, 1), dtype=np.float32))).output(0))
    steps.custom(lambda node: ops.multiply(node, ops.constant(np.float32(pre.scale))).output(0))
    steps.mean([float(v) for v in pre.mean.ravel()]).scale([float(v) for v in pre.std.ravel()])
    ppp.output(output_name).postprocess().custom(lambda node: _log_softmax_graph(node, heads))
    return ppp.build()


def _log_softmax_graph(node, heads: Heads):
    """Log-softmax over the outputs, or over each head's slice (VariadicSplit, a log-softmax each, Concat): the
    graph's float32 softmax had rounded a probability below ~1e-38 to 0, which no temperature then recovered
    (calibrated OpenVINO probabilities disagreed with ONNX Runtime's float64 ones); `probabilities` exponentiates
    in float64."""
    import openvino.opset13 as ops

    if heads is None:
        return ops.log_softmax(node, 1).output(0)
    parts = ops.variadic_split(node, ops.constant(np.int64(1)),
                               ops.constant(np.array([hi - lo for lo, hi in heads], dtype=np.int64)))
    return ops.concat([ops.log_softmax(parts.output(i), 1) for i in range(len(heads))], 1).output(0)


def probabilities(log_probs: np.ndarray) -> np.ndarray:
    """The image graph's float32 log-probabilities as float64 probabilities (a new array)."""
    return np.exp(np.asarray(log_probs, dtype=np.float64))


def _views_graph(node, views: TTAViews, n: int, h: int, w: int, c: int, out_shape: tuple[int, ...]):
    """float32 (n, H, W, C) pixel values (or (n, 1, H, W): the same for one channel) -> `out_shape` (n x V views,
    image-major, NHWC or for one channel NCHW): C zero pixel values appended, per output value and view 4 gathered
    source values times their weights, summed, rounded half to even (as numpy's rint). Everything on flat
    (n, values) rows, each channel's indices spread over the pixel-channel axis: four gathers of whole rows + one
    elementwise sum (which the CPU plugin fuses), with a long innermost axis (a trailing axis of size C made the
    fused sum ~8x slower)."""
    import openvino.opset13 as ops

    index, weight = views.linear_maps(h, w)  # (V, H*W, 4); index H*W is the zero pixel
    channel = np.arange(c, dtype=np.int64)
    index = index[:, :, None, :].astype(np.int64) * c + channel[None, None, :, None]  # (V, H*W, C, 4)
    weight = np.broadcast_to(weight[:, :, None, :], index.shape)
    shape = lambda *dims: ops.constant(np.array(dims, dtype=np.int64))  # noqa: E731
    x = ops.reshape(node, shape(n, h * w * c), False)
    x = ops.concat([x, ops.constant(np.zeros((n, c), dtype=np.float32))], 1)
    total = None
    for k in range(4):
        taken = ops.gather(x, ops.constant(index[..., k].reshape(-1).astype(np.int32)), ops.constant(np.int64(1)))
        term = ops.multiply(taken, ops.constant(np.ascontiguousarray(weight[..., k]).reshape(1, -1)))
        total = term if total is None else ops.add(total, term)
    return ops.reshape(ops.round(total, "half_to_even"), shape(*out_shape), False).output(0)


class ONNXRuntimeBackend:
    """ONNX Runtime CPU execution provider with full graph optimizations and a fixed intra-op thread count."""

    name = "onnx"

    def __init__(self, model_path: str | Path, input_name: str, output_name: str, threads: int | None = None,
                 preprocessor: Preprocessor | None = None, model_data: ModelData | None = None, heads: Heads = None):
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
            self.session = ort.InferenceSession(str(self.model_path) if model_data is None else model_data[0], options,
                                                providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types
            raise EdgeKDError(f"{self.model_path}: ONNX Runtime cannot load the model ({exception_line(err, 120)})") from None
        port = _find_port(self.session.get_inputs(), input_name, self.model_path, "input")
        out_port = _find_port(self.session.get_outputs(), output_name, self.model_path, "output")
        self.input_dims = [d if isinstance(d, int) else None for d in port.shape]
        if self.input_dims and self.input_dims[0] is not None:  # batches and TTA views had failed in ONNX Runtime
            raise EdgeKDError(f"{self.model_path}: the model's batch axis is fixed at {self.input_dims[0]}; the onnx "
                              "backend needs a dynamic one (edgekd export writes it; --backend openvino reshapes it)")
        self.input_name, self.output_name = input_name, output_name
        self.preprocessor, self.heads = preprocessor, heads
        classes = out_port.shape  # the named output's (the first output had sized the buffer)
        self.classes = classes[-1] if len(classes) == 2 and isinstance(classes[-1], int) else None
        self.slots: OrderedDict[tuple, Slot] = OrderedDict()

    def embedded_metadata(self) -> dict[str, str]:
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        return self.session.run([self.output_name], {self.input_name: batch})[0]

    def image_slot(self, n: int, views: TTAViews | None = None, channels: int | None = None) -> Slot:
        """The numpy TTA views and preprocessing (edgekd.runtime.tta/preprocess) into a float32 array bound to the
        session's input (ONNX Runtime I/O binding: no per-call input/output dispatch), the session, a float64
        softmax. Slots are kept per (n, views, channels) like OpenVINO's."""
        return _cached(self.slots, (n, views, channels), lambda: self._new_image_slot(n, views, channels))

    def _new_image_slot(self, n: int, views: TTAViews | None, channels: int | None) -> Slot:
        pre = _need_preprocessor(self)
        c, h, w = pre.input_shape
        images = np.empty((n, h, w, _image_channels(channels, c)), dtype=np.uint8)
        rows = n * len(views) if views is not None else n
        x = np.empty((rows, c, h, w), dtype=np.float32)
        binding = self.session.io_binding()
        binding.bind_input(self.input_name, "cpu", 0, np.float32, list(x.shape), x.ctypes.data)
        if self.classes is not None:
            logits = np.empty((rows, self.classes), dtype=np.float32)
            binding.bind_output(self.output_name, "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        else:  # an output of unknown width: ONNX Runtime allocates it
            binding.bind_output(self.output_name, "cpu")

        def run() -> np.ndarray:
            pre.normalize(images if views is None else np.concatenate([views(a) for a in images]), out=x)
            self.session.run_with_iobinding(binding)
            return head_softmax(logits if self.classes is not None else binding.copy_outputs_to_cpu()[0], self.heads)

        return Slot(images, run)


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
                   cache_dir: str | Path | None = None, preprocessor: Preprocessor | None = None,
                   model_data: ModelData | None = None, heads: Heads = None) -> Backend:
    """`cache_dir` applies to OpenVINO only (ONNX Runtime sessions build in milliseconds for these models).
    `preprocessor` (the bundle's spec) enables the image path (`image_slot`). `model_data`: the model's bytes
    (and an OpenVINO IR's weights) to compile instead of reading `model_path` (which then only names it), so
    a runner compiles the bytes its bundle check verified (`Artifact.read`). `heads`: a multi-head bundle's output
    slices, each with its own softmax on the image path."""
    if name == "openvino":
        return OpenVINOBackend(model_path, input_name, output_name, threads, inference_precision or "f32", cache_dir,
                               preprocessor=preprocessor, model_data=model_data, heads=heads)
    if name == "onnx":
        return ONNXRuntimeBackend(model_path, input_name, output_name, threads, preprocessor, model_data, heads)
    raise EdgeKDError(f"unknown backend '{name}' (use {', '.join(BACKENDS)})")
