"""The edge runner: bundle -> decode, resize, crop -> backend (TTA views, normalization, model, softmax; inside the
compiled model on OpenVINO) -> calibrated (the bundle's temperature, per view) mean-softmax predictions, labelled by
the bundle's decision threshold (binary) or the top class. A multi-head bundle (edgekd.json `tasks`) has a softmax
per task's slice of the outputs: the runner predicts one task (`task=`) or all of them side by side
(`TaskPredictions`)."""

from __future__ import annotations

import numbers
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, Union

import numpy as np

from edgekd.errors import EdgeKDError
from edgekd.fileio import refuse_output_inside
from edgekd.formats import PRECISIONS
from edgekd.imageio import DicomFrame
from edgekd.probability import apply_temperature
from edgekd.runtime.backends import BACKENDS, Backend, create_backend
from edgekd.runtime.bundle import Bundle, cap_to_cores, check_embedded_artifact, check_embedded_metadata, open_bundle
from edgekd.runtime.preprocess import ImageInput, Preprocessor
from edgekd.runtime.tta import TTAViews

TTAOption = Union[bool, Sequence[str], None]


@dataclass
class Prediction:
    """One image's result: its label (the decision threshold's, or the top class), calibrated class probabilities,
    (with TTA) each view's, and the uncalibrated ones when the bundle has a calibration temperature."""

    source: str
    index: int
    label: str
    probs: np.ndarray
    class_names: list[str]
    view_probs: dict[str, np.ndarray] | None = None
    raw_probs: np.ndarray | None = None
    task: str | None = None
    """The task (head) of a multi-head bundle this prediction is for; None for a bundle with one head."""
    warning: str | None = None
    """Why this prediction says little about the image (BLANK_IMAGE), else None."""

    @property
    def prob(self) -> float:
        return float(self.probs[self.index])

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"file": self.source, **({"task": self.task} if self.task is not None else {}),
                               "label": self.label, "index": self.index, "prob": self.prob,
                               "probs": {c: float(p) for c, p in zip(self.class_names, self.probs)}}
        if self.view_probs is not None:
            out["views"] = {v: {c: float(p) for c, p in zip(self.class_names, ps)} for v, ps in self.view_probs.items()}
        if self.raw_probs is not None:
            out["uncalibrated"] = {c: float(p) for c, p in zip(self.class_names, self.raw_probs)}
        if self.warning is not None:
            out["warning"] = self.warning
        return out


BLANK_IMAGE = ("blank image: every pixel at model size has the same colour (an empty, 1x1, solid-colour or fully "
               "transparent image?); the prediction says nothing about it")


@dataclass
class TaskPredictions:
    """One image's result from a multi-head bundle without a chosen task: every task's Prediction, in the
    bundle's task order (`tasks[name]`)."""

    source: str
    tasks: dict[str, Prediction]

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.source, "tasks": {name: {k: v for k, v in p.to_dict().items() if k not in ("file", "task")}
                                               for name, p in self.tasks.items()}}


def flag_blank(result: Prediction | TaskPredictions, sized: np.ndarray) -> Prediction | TaskPredictions:
    """`result` with the BLANK_IMAGE warning when its model-size image is one colour (each channel one value, within
    a level; a solid green had passed, its channels differing from each other): a model still answers, often
    confidently, for nothing there."""
    channels = [sized[..., c] for c in range(sized.shape[-1])] if sized.ndim == 3 else [sized]
    # channel by channel: numpy's max over axis 0 of an (H*W, 3) array had taken 1.4 ms at 224 px, as long as
    # the model call (the runner ran 2x the bare call); each channel's own reduction takes 0.02 ms
    if max(int(c.max()) - int(c.min()) for c in channels) < 2:
        for p in result.tasks.values() if isinstance(result, TaskPredictions) else [result]:
            p.warning = BLANK_IMAGE
    return result


@dataclass
class Failure:
    """An input that could not be predicted (unreadable file, bad array), with the one-line reason."""

    source: str
    error: str

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.source, "error": self.error}


@dataclass
class Runner:
    """A compiled bundle model ready to predict; reuse one Runner for many calls (the model is compiled once). Calls
    from several threads take turns (each inference fills and runs one shared input buffer per batch size)."""

    bundle: Bundle
    backend: Backend
    precision: str
    preprocessor: Preprocessor
    tta_views: TTAViews
    tta: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    temperature: float = 1.0
    bias: list[float] | None = None
    threshold: float | None = None
    positive: int = 1
    task: str | None = None
    """Multi-head bundles: the task predicted (None: every task, side by side)."""
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)
    _owns_bundle: bool = field(default=False, repr=False, compare=False)

    @classmethod
    def from_bundle(cls, path: str | Path | Bundle, backend: str = "openvino", precision: str | None = None,
                    threads: int | None = None, tta: TTAOption = False, warmup: int = 1,
                    verify: bool = True, cache_dir: str | Path | None = None,
                    threshold: float | None = None, task: str | None = None) -> "Runner":
        """Open (and verify) a bundle and compile its `precision` model on `backend` ("openvino" or "onnx");
        `precision` None: the most precise the bundle has (fp32, else fp16, else int8).

        `tta`: False (one view), True (the bundle's views) or a list of view names. `warmup` inference rounds run
        at load, for batch 1 (with the default TTA views when `tta`), so the first real call is not the slow one;
        the warm-up also checks the model's output count. `cache_dir`: an OpenVINO model cache folder (later loads
        skip compilation). `threshold`: the decision threshold on the positive class's calibrated probability for
        this runner (default: the bundle's; a binary bundle only).
        `task`: a multi-head bundle's task to predict (default: each task's prediction, a `TaskPredictions`).
        """
        for name, value in (("backend", backend), ("precision", precision)):
            if not isinstance(value, str) and (name == "backend" or value is not None):
                raise EdgeKDError(f"{name} must be a string, got {value!r}")
        if not isinstance(path, (str, Path, Bundle)):
            raise EdgeKDError(f"expected a bundle path (folder or .zip) or an open Bundle, got {path!r}")
        backend, precision = backend.lower(), precision.lower() if precision else precision  # `--precision FP16`
        _check_options(backend, precision, threads, threshold)
        bundle = path if isinstance(path, Bundle) else open_bundle(path, verify=verify)
        _check_bundle_options(bundle, backend, cache_dir, threshold, task)
        bundle_threshold, positive = bundle.decision
        precision = precision or bundle.most_precise()
        artifact = _pick_artifact(bundle, backend, precision)
        threads = cap_to_cores(threads) if threads else bundle.threads
        preprocessor = Preprocessor(bundle.preprocess)
        heads = [tuple(t["outputs"]) for t in bundle.tasks] if bundle.tasks else None
        engine = create_backend(backend, artifact.path, bundle.io["input"], bundle.io["output"], threads,
                                artifact.inference_precision_hint, cache_dir, preprocessor, model_data=artifact.read(),
                                heads=heads)
        where = f"{bundle.source}: {artifact.path.relative_to(bundle.root).as_posix()}"
        embedded = engine.embedded_metadata()
        check_embedded_metadata(bundle.meta, embedded, where)
        check_embedded_artifact(artifact, embedded, where)
        expected = [None, *bundle.preprocess["input_size"]]
        if len(engine.input_dims) != 4 or any(d is not None and d != e for d, e in zip(engine.input_dims[1:], expected[1:])):
            raise EdgeKDError(f"{artifact.path}: model input shape {engine.input_dims} does not match edgekd.json "
                              f"preprocess.input_size {expected[1:]}")
        tta_cfg = bundle.tta
        frac = float(tta_cfg.get("center_crop_fraction", 0.875))
        names = list(tta_cfg.get("views") or ["original"]) if tta is None or isinstance(tta, bool) else tta_names(tta)
        runner = cls(bundle=bundle, backend=engine, precision=precision, preprocessor=preprocessor,
                     tta_views=TTAViews(names, frac), tta=bool(tta),
                     info={"backend": backend, "format": artifact.format, "precision": precision,
                           "artifact": artifact.path.relative_to(bundle.root).as_posix(), "threads": threads},
                     temperature=bundle.temperature, bias=bundle.calibration_bias, positive=positive,
                     threshold=bundle_threshold if threshold is None else float(threshold), task=task,
                     _owns_bundle=not isinstance(path, Bundle))
        runner.warmup(warmup)
        return runner

    def __post_init__(self) -> None:
        self._outputs = len(self.bundle.class_names)
        tasks = self.bundle.tasks or []
        self._tasks = [(t["name"], t["outputs"][0], t["outputs"][1], list(t["class_names"])) for t in tasks
                       if self.task is None or t["name"] == self.task]
        # One list, shared by every Prediction: the chosen task's classes, else the bundle's.
        self._class_names = self._tasks[0][3] if self.task is not None else self.bundle.class_names

    @property
    def class_names(self) -> list[str]:
        """The classes of this runner's predictions (a chosen task's); a multi-head bundle without a chosen task:
        every output's task-prefixed name (see `tasks`)."""
        return self._class_names

    @property
    def tasks(self) -> list[tuple[str, list[str]]] | None:
        """The (task, class names) this runner predicts, for a multi-head bundle; None for one head."""
        return [(name, names) for name, _, _, names in self._tasks] if self._tasks else None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.preprocessor.input_shape

    def warmup(self, rounds: int = 1) -> None:
        """Compile and run the image path for one image (with the default TTA views) on a black image, with the
        channels the bundle's images have (gray images for a 3-channel model take their own compiled graph)."""
        views = self.tta_views if self.tta else None
        channels = 1 if self.bundle.image_channels == 1 else self.preprocessor.channels
        for _ in range(max(0, rounds)):
            with self._lock:
                slot = self._engine().image_slot(1, views, channels)
                slot.inputs[...] = 0
                self._run(slot, 1, views)  # its output count checked: a model of other outputs fails at load

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """The bare backend call: float32 (N, C, H, W) model input -> (N, num_classes) logits."""
        batch = np.asarray(batch)
        if not np.issubdtype(batch.dtype, np.floating):  # uint8 pixels here would be read as normalized input
            raise EdgeKDError(f"model input must be float (normalized, N x C x H x W), got {batch.dtype}: for "
                              "images use predict() / predict_batch()")
        if batch.ndim != 4 or tuple(batch.shape[1:]) != self.input_shape:
            raise EdgeKDError(f"model input must have shape (N, {', '.join(map(str, self.input_shape))}), "
                              f"got {tuple(batch.shape)}")
        if batch.shape[0] == 0:
            raise EdgeKDError("model input has no rows (a batch of 0 images)")
        with self._lock:
            logits = np.array(self._engine().infer(batch))  # a copy: the next call may reuse the output memory
        return self._checked(logits, batch.shape[0])

    def _engine(self) -> Backend:
        if self.backend is None:
            raise EdgeKDError("this Runner is closed")
        return self.backend

    def _checked(self, logits: np.ndarray, rows: int) -> np.ndarray:
        if logits.shape != (rows, self._outputs):
            raise EdgeKDError(f"{self.backend.model_path}: output shape {logits.shape} does not match "
                              f"({rows}, {self._outputs} classes)")
        return logits

    def _views(self, tta: TTAOption) -> TTAViews | None:
        if tta is None:
            return self.tta_views if self.tta else None
        if tta is False:
            return None
        if tta is True:
            return self.tta_views
        return TTAViews(tta_names(tta), self.tta_views_fraction)

    @property
    def tta_views_fraction(self) -> float:
        return float(self.bundle.tta.get("center_crop_fraction", 0.875))

    def predict(self, image: ImageInput, tta: TTAOption = None) -> Prediction | TaskPredictions:
        """One image (path, PIL image or uint8 (H, W[, C]) array) -> Prediction (a multi-head bundle without a
        chosen task: TaskPredictions, every task's side by side). `tta` overrides the default."""
        views = self._views(tta)
        sized = self.preprocessor.to_model_size(image, keep_gray=True)
        # Gray images for a 3-channel model stay one channel (repeated to RGB inside the model).
        with self._lock:
            slot = self._engine().image_slot(1, views, sized.shape[-1])
            slot.inputs[0] = sized
            probs = self._run(slot, 1, views)
        return flag_blank(self._ensembled(_describe(image), probs, views), sized)

    def predict_batch(self, images: Sequence[ImageInput], tta: TTAOption = None,
                      sources: Sequence[str] | None = None) -> list[Prediction | TaskPredictions]:
        """Several images in ONE inference call (N images x V views rows); errors raise EdgeKDError."""
        images = list(_one_or_many(images))  # an iterator is read once (its names had been taken from it again)
        sized = [self.preprocessor.to_model_size(img, keep_gray=True) for img in images]
        sources = list(sources) if sources is not None else [_describe(img) for img in images]
        return self.predict_sized(sized, sources, tta)

    def _check_sized(self, image: Any, source: str) -> None:
        """A model-size image as `preprocessor.to_model_size` makes it: uint8 (crop, crop, 1 or channels); an int64
        300 had wrapped to 44, float 0..1 pixels had been truncated to 0, another size a numpy broadcast error."""
        crop, channels = self.preprocessor.crop, self.preprocessor.channels
        shape = getattr(image, "shape", None)
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
            raise EdgeKDError(f"{source}: predict_sized takes uint8 arrays (preprocessor.to_model_size), got "
                              f"{getattr(image, 'dtype', type(image).__name__)}")
        if shape not in ((crop, crop, 1), (crop, crop, channels)):
            raise EdgeKDError(f"{source}: predict_sized takes ({crop}, {crop}, 1 or {channels}) images "
                              f"(preprocessor.to_model_size), got shape {shape}")

    def predict_sized(self, sized: list[np.ndarray], sources: list[str], tta: TTAOption = None,
                      gray_graph: bool = True) -> list:
        """uint8 model-size images (`preprocessor.to_model_size`) -> one inference call (the backend builds the
        views, normalizes and returns probabilities, image by image) -> per-image mean-softmax predictions (a
        TaskPredictions per image for a multi-head bundle without a chosen task). For a caller that decodes
        elsewhere (the HTTP service decodes uploads before they queue for the model). `gray_graph`: a batch of gray
        images only may run the graph taking one channel; False: always the model's channels (one set of compiled
        graphs, as a service warms them)."""
        if len(sources) != len(sized):
            raise EdgeKDError(f"{len(sized)} images but {len(sources)} source names")
        if not sized:
            return []
        for image, source in zip(sized, sources):
            self._check_sized(image, source)
        views = self._views(tta)
        # Pixels go straight into the backend's input memory. Gray images for a 3-channel model stay one channel
        # (repeated to RGB inside the model); in a batch with color images they are broadcast to 3 channels here.
        channels = 1 if gray_graph and all(a.shape[-1] == 1 for a in sized) else self.preprocessor.channels
        with self._lock:
            slot = self._engine().image_slot(len(sized), views, channels)
            for i, image in enumerate(sized):
                slot.inputs[i] = image
            probs = self._run(slot, len(sized), views)
        v = len(views) if views is not None else 1
        return [flag_blank(self._ensembled(src, probs[i * v:(i + 1) * v], views), sized[i])
                for i, src in enumerate(sources)]

    def _run(self, slot, n_images: int, views: TTAViews | None) -> np.ndarray:
        """The slot's inference call -> float64 (n_images x V, classes) probabilities, shape checked."""
        probs = slot.run()
        rows = n_images * len(views) if views is not None else n_images
        return self._checked(probs, rows).astype(np.float64)

    def _ensembled(self, source: str, probs: np.ndarray, views: TTAViews | None) -> Prediction | TaskPredictions:
        """One image's (V, classes) view probabilities -> its Prediction (mean of the calibrated views); a multi-head
        bundle's: each task's (its slice), the chosen task's alone or all of them as TaskPredictions."""
        if self._tasks:
            preds = {name: self._single(source, probs[:, lo:hi], views, names, name)
                     for name, lo, hi, names in self._tasks}
            return preds[self.task] if self.task is not None else TaskPredictions(source, preds)
        return self._single(source, probs, views, self._class_names, None)

    def _single(self, source: str, probs: np.ndarray, views: TTAViews | None, names: list[str],
                task: str | None) -> Prediction:
        raw = probs
        probs = apply_temperature(raw, self.temperature, self.bias)
        calibrated = self.temperature != 1.0 or self.bias is not None
        if views is None:  # one view: its softmax is the prediction
            return self._prediction(source, probs[0], None, raw[0] if calibrated else None, names, task)
        return self._prediction(source, probs.mean(axis=0), dict(zip(views.names, probs)),
                                raw.mean(axis=0) if calibrated else None, names, task)

    def _prediction(self, source: str, probs: np.ndarray, view_probs: dict[str, np.ndarray] | None,
                    raw_probs: np.ndarray | None, names: list[str], task: str | None) -> Prediction:
        if self.threshold is None:
            index = int(probs.argmax())
        else:
            index = self.positive if probs[self.positive] >= self.threshold else 1 - self.positive
        return Prediction(source=source, index=index, label=names[index], probs=probs, class_names=names,
                          view_probs=view_probs, raw_probs=raw_probs, task=task)

    def predict_many(self, inputs: Iterable[ImageInput], batch: int = 16,
                     tta: TTAOption = None) -> Iterator[Prediction | Failure]:
        """Stream predictions in input order, `batch` images per inference call (memory stays bounded).

        An input that cannot be read or is invalid yields a Failure naming it; the rest go on.
        """
        if not isinstance(batch, numbers.Integral) or isinstance(batch, bool) or batch < 1:
            raise EdgeKDError(f"batch must be an integer >= 1, got {batch!r}")
        inputs = _one_or_many(inputs)
        chunk: list[tuple[str, np.ndarray]] = []
        pending: list[Prediction | Failure | None] = []  # keeps order: None marks a slot filled by the chunk
        for item in inputs:
            src = _describe(item)
            try:
                chunk.append((src, self.preprocessor.to_model_size(item, keep_gray=True)))
                pending.append(None)
            except EdgeKDError as err:
                pending.append(Failure(src, str(err)))
            except MemoryError:  # a decode or resize the size limits let through: this file fails, not the batch
                pending.append(Failure(src, f"{src}: out of memory reading the image"))
            if len(chunk) >= batch:
                yield from self._flush(chunk, pending, tta)
                chunk, pending = [], []
        yield from self._flush(chunk, pending, tta)

    def _flush(self, chunk, pending, tta) -> Iterator[Prediction | Failure]:
        preds = iter(self.predict_sized([a for _, a in chunk], [s for s, _ in chunk], tta))
        for slot in pending:
            yield next(preds) if slot is None else slot

    def close(self) -> None:
        """Drop the compiled model and, for a bundle this runner opened from a zip, its extracted files (a Bundle
        handed to from_bundle is the caller's to close). Also `with Runner.from_bundle(...) as runner:`."""
        with self._lock:
            self.backend = None  # type: ignore[assignment]
        if self._owns_bundle:
            self.bundle.close()

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()


def runner_notes(runner: "Runner") -> list[str]:
    """What `edgekd predict` and `serve` say of the model path a runner took that the export's gate did not check
    as it runs here (`ungated_path_note`, `int8_host_note`)."""
    return [note for note in (ungated_path_note(runner), int8_host_note(runner)) if note]


def ungated_path_note(runner: "Runner") -> str | None:
    """What to say when OpenVINO runs a bundle's ONNX file that the export's runner check did not run there: that
    check runs the ONNX model on OpenVINO only at the bundle's most precise precision, when no OpenVINO model of it
    exists (export.runner_check.checked_paths), so an ONNX INT8 file read by OpenVINO (the default backend, when
    the bundle has no OpenVINO INT8) was gated on ONNX Runtime only. (A bundle of OpenVINO FP32 and ONNX INT8 had
    been silent: its ONNX INT8 was ONNX's most precise, never the bundle's.)"""
    info = runner.info
    if info.get("backend") != "openvino" or info.get("format") != "onnx":
        return None
    if runner.precision == runner.bundle.most_precise():
        return None
    return (f"this bundle has no OpenVINO {runner.precision} model: OpenVINO runs its ONNX {runner.precision} file, "
            "which the export checked on ONNX Runtime only (--backend onnx runs it as checked)")


def int8_host_note(runner: "Runner", host: dict[str, Any] | None = None) -> str | None:
    """What to say when ONNX Runtime runs an ONNX INT8 model on an x86 CPU without INT8 dot-product instructions
    (VNNI, AMX) that the export checked on one with them: without `quantization.onnx.reduce_range`, its uint8 x
    int8 products go through AVX2's 16-bit pairwise sums there, which saturate where VNNI's 32-bit sums do not
    (ONNX Runtime's quantization guide), so this CPU may compute other results than the gate saw. `host`: this
    machine's `edgekd.host.cpu_info()` (read when None). A bundle that records no export machine (before
    2026-12-07) is taken as checked on a VNNI CPU, the machine its defaults were chosen on."""
    from edgekd.host import cpu_info

    info = runner.info
    if (info.get("backend"), info.get("format"), runner.precision) != ("onnx", "onnx", "int8"):
        return None
    settings = ((runner.bundle.meta.get("export_profile_settings") or {}).get("quantization") or {}).get("onnx") or {}
    if settings.get("reduce_range"):
        return None
    exported_on = runner.bundle.meta.get("export_host") or {}
    host = cpu_info() if host is None else host
    if str(host.get("machine", "")).lower() not in ("x86_64", "amd64") or not host.get("simd"):
        return None  # not x86, or its flags not read: nothing known
    if host.get("int8_dot_product") or exported_on.get("int8_dot_product") is False:
        return None
    return ("this CPU has no INT8 dot-product instructions (VNNI); the ONNX INT8 model was checked on a CPU with "
            "them and without quantization.onnx.reduce_range, so ONNX Runtime may compute other (saturated) results "
            "here: run the OpenVINO model, or re-export with a profile (--target FILE) whose quantization.onnx "
            "sets reduce_range: true")


def check_artifact(bundle: Bundle, fmt: str, precision: str) -> None:
    """The checks `Runner.from_bundle` makes before a model answers, run on one artifact of an open bundle without
    keeping it: edgekd.json against the model file's embedded copy, the input shape, one warm-up inference's output
    count. For the commands that hand a bundle on rather than predict with it (`edgekd repository`, `edgekd
    bench`): a tampered edgekd.json would otherwise be published, or timed, without a word."""
    Runner.from_bundle(bundle, backend="onnx" if fmt == "onnx" else "openvino", precision=precision,
                       warmup=1).close()


def _check_bundle_options(bundle: Bundle, backend: str, cache_dir, threshold, task: str | None) -> None:
    """The options that depend on the bundle: a cache folder, a decision threshold, a task."""
    if cache_dir is not None and backend == "onnx":  # it had been ignored without a word
        raise EdgeKDError("cache folder (--cache-dir): OpenVINO's compiled-model cache; the onnx backend (ONNX "
                          "Runtime) has none: leave it out")
    if cache_dir is not None:  # a cache inside a bundle folder would be an unlisted file: the bundle unusable
        if Path(cache_dir).exists() and not Path(cache_dir).is_dir():
            raise EdgeKDError(f"cache folder (--cache-dir) {cache_dir}: not a folder")
        refuse_output_inside(cache_dir, [bundle.source], "cache folder (--cache-dir)")
        writable_folder(Path(cache_dir), "cache folder (--cache-dir)")
    if threshold is not None and bundle.tasks:
        raise EdgeKDError("a decision threshold is for a two-class bundle: a multi-head bundle's tasks are "
                          "decided by their top class")
    if threshold is not None and len(bundle.class_names) != 2:
        raise EdgeKDError(f"threshold {threshold}: a decision threshold needs a two-class bundle "
                          f"({len(bundle.class_names)} classes)")
    _check_task(bundle, task)


def writable_folder(folder: Path, what: str) -> None:
    """`folder` made if missing, and writable: OpenVINO's own failure to create it had been a C++ exception of two
    lines (exit 1), and a read-only one cached nothing without a word."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise EdgeKDError(f"{what} {folder}: cannot create it ({err.strerror or err})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise EdgeKDError(f"{what} {folder}: not writable (OpenVINO would cache nothing there)")


def _check_options(backend: str, precision: str | None, threads, threshold) -> None:
    if backend not in BACKENDS:
        raise EdgeKDError(f"unknown backend '{backend}' (use {', '.join(BACKENDS)})")
    if precision is not None and precision not in PRECISIONS:
        raise EdgeKDError(f"unknown precision '{precision}' (use {', '.join(PRECISIONS)})")
    if threads is not None and (not isinstance(threads, numbers.Integral) or isinstance(threads, bool) or threads < 1):
        raise EdgeKDError(f"threads must be an integer >= 1, got {threads!r}")
    if threshold is not None and (not isinstance(threshold, numbers.Real) or isinstance(threshold, bool)
                                  or not 0 <= threshold <= 1):  # NaN fails the range test too
        raise EdgeKDError(f"threshold must be a number in [0, 1], got {threshold!r}")


def tta_names(tta) -> list[str]:
    """A TTA option's view names: a list of names, or one string of comma-separated names ("hflip,vflip")."""
    if isinstance(tta, str):
        return [v.strip() for v in tta.split(",") if v.strip()]
    if isinstance(tta, (list, tuple)) and all(isinstance(v, str) for v in tta):
        return list(tta)
    raise EdgeKDError(f"tta: expected true/false, a list of view names or 'name,name', got {tta!r}")


def _one_or_many(inputs):
    """A single image given where a collection is expected: that one input. A path (str/Path), DicomFrame, PIL
    image, (H, W) or (H, W, C) array with C 1, 3 or 4 (a string would otherwise be read character by character, an
    array row by row); an (N, H, W) stack of gray images or an (N, H, W, C) array is N images."""
    one_array = isinstance(inputs, np.ndarray) and (inputs.ndim == 2 or
                                                    (inputs.ndim == 3 and inputs.shape[-1] in (1, 3, 4)))
    if isinstance(inputs, (str, Path, DicomFrame)) or one_array:
        return [inputs]
    if type(inputs).__module__.startswith("PIL.") and hasattr(inputs, "getbands"):  # a PIL image, without importing PIL
        return [inputs]
    if not isinstance(inputs, Iterable):
        raise EdgeKDError(f"expected images (paths, PIL images or uint8 arrays) or an iterable of them, got "
                          f"{type(inputs).__name__}")
    return inputs


def _describe(image: Any) -> str:
    if isinstance(image, (str, Path, DicomFrame)):
        return str(image)
    if isinstance(image, np.ndarray):
        return "<array " + "x".join([str(d) for d in image.shape]) + ">"
    return f"<{type(image).__name__}>"


def _check_task(bundle: Bundle, task: str | None) -> None:
    if task is None:
        return
    names = [t["name"] for t in bundle.tasks or []]
    if not names:
        raise EdgeKDError(f"{bundle.source}: task '{task}' given, but the bundle's model has one head over all its "
                          "classes, which takes no task (leave --task out)")
    if task not in names:
        raise EdgeKDError(f"{bundle.source}: no task '{task}' in the bundle (it has: {', '.join(names)})")


def _pick_artifact(bundle: Bundle, backend: str, precision: str):
    """OpenVINO runs its own IR, else the ONNX file of that precision; ONNX Runtime runs only ONNX."""
    if backend == "openvino":
        for fmt in ("openvino", "onnx"):
            for art in bundle.artifacts:
                if art.format == fmt and art.precision == precision:
                    return art
        return bundle.artifact("openvino", precision)  # raises with the list of what exists
    return bundle.artifact("onnx", precision)
