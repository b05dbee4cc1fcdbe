"""The HTTP service (FastAPI on Starlette): /predict, /predict/batch, /health, /metadata, /metrics over a Runner,
uploads decoded in a thread pool before they queue, requests batched across clients (`Batcher`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from concurrent.futures import ThreadPoolExecutor
from pathlib import PureWindowsPath

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from edgekd.errors import error_line
from edgekd.runtime import Prediction, Runner
from edgekd.serve.batcher import Batcher, BatchTooLarge, QueueFull
from edgekd.serve.limits import BodyLimit, BodyTooLarge, RequestLimit, UploadsInFlightFull, UploadTimedOut
from edgekd.serve.metrics import MetricsMiddleware, ServiceMetrics
from edgekd.serve.settings import ServeSettings, check_settings, is_loopback
from edgekd.serve.uploads import UploadError, decode_upload

MAX_BATCH_FILES = 64
"""The most files one /predict/batch request may carry (fewer when --max-queue is smaller)."""
MAX_FORM_FIELDS = 64
"""Non-file parts of a multipart request (ignored, as a client may send metadata beside the image): more is 413."""
CLIENT_GONE = 499
"""The status recorded (never sent) for a request whose client hung up before its answer (nginx's code)."""


class ClientGone(Exception):
    """The client disconnected while its images waited: their inference is dropped."""


def padded_sizes(max_batch: int) -> list[int]:
    """The batch sizes inference runs at: 1 and max_batch / 4, / 2, / 1 (at most 4: OpenVINO compiles one model
    per static batch size and keeps 4), a batch padded up to the next one."""
    return sorted({1, *(max(1, max_batch // d) for d in (4, 2, 1))})


class Service:
    """The runner, its batcher, the decoding pool, the metrics: what the routes share."""

    def __init__(self, runner: Runner, settings: ServeSettings):
        self.runner, self.settings = runner, settings
        self.keep_gray = runner.bundle.image_channels == 1
        self.max_pixels = int(settings.max_megapixels * 1_000_000)
        # OpenVINO compiles per batch size: pad to a few sizes. ONNX Runtime takes any size as it comes.
        self.sizes = padded_sizes(settings.max_batch) if runner.info.get("backend") == "openvino" else None
        self.metrics = ServiceMetrics(settings.max_batch, lambda: self.batcher.depth)
        self.batcher = Batcher(self.run_batch, settings.max_batch, settings.max_wait_ms / 1000, settings.max_queue,
                               self.metrics.batch)
        self.decoders = self._decode_pool()
        self.batch_files = min(MAX_BATCH_FILES, settings.max_queue)  # a request never holds more than the queue
        self.batch_files_said = f"at most {self.batch_files}" + (
            f", the --max-queue {settings.max_queue}" if settings.max_queue < MAX_BATCH_FILES else "")
        self.bundle_id = runner.bundle.sha256
        # Which model answers, in every response (a log of responses tells fp32 from int8, TTA from none).
        self.answered_by = {"model": runner.bundle.model.get("name"), "bundle_id": self.bundle_id,
                            "format": runner.info.get("format"), "precision": runner.precision,
                            "tta_views": runner.tta_views.names if runner.tta else None, "threshold": runner.threshold}

    def run_batch(self, images: list[np.ndarray], sources: list[str]) -> list[Prediction]:
        n = len(images)
        size = next((s for s in self.sizes if s >= n), n) if self.sizes else n
        # always the model's channels (gray uploads broadcast to RGB, as the graph repeats them): one set of compiled
        # graphs, the one warmed (OpenVINO's are per channel count: a color upload among gray ones had compiled anew)
        return self.runner.predict_sized(images + [images[0]] * (size - n), sources + [sources[0]] * (size - n),
                                         gray_graph=False)[:n]

    def warm(self) -> None:
        """Compile and run every padded batch size once, so no client waits for a compile."""
        c, h, w = self.runner.input_shape
        for size in self.sizes or [1]:  # at the channels run_batch feeds (the model's)
            self.run_batch([np.zeros((h, w, c), np.uint8)] * size, ["warmup"] * size)

    def _decode_pool(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(self.settings.decode_threads, thread_name_prefix="edgekd-decode")

    def open(self) -> None:
        """At the start of each lifespan: a service closed by an earlier one serves again (see Batcher.open)."""
        if self.batcher.closing:
            self.batcher.open()
            self.decoders = self._decode_pool()

    async def decode(self, data: bytes, content_type: str | None, where: str) -> np.ndarray:
        if self.batcher.closing:  # an upload read while the shutdown began: 503, not the closed pool's error
            raise QueueFull("the service is shutting down")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.decoders, decode_upload, data, content_type, where,
                                          self.runner.preprocessor, self.keep_gray, self.max_pixels)

    def check_task(self, task: str | None, request: Request) -> None:
        """`?task=NAME`: one task's head of a multi-head bundle served for every task (400 otherwise: it had been
        ignored, every task answered); given twice, 400 (the last had been taken)."""
        if len(request.query_params.getlist("task")) > 1:
            raise UploadError("task: given more than once (one task per request)", 400)
        if task is None:
            return
        tasks = [t["name"] for t in self.runner.bundle.tasks or []]
        if not tasks:
            raise UploadError(f"task '{task}': this bundle has one head (?task= is for a bundle with one head per "
                              "task)", 400)
        if self.runner.task is not None and task != self.runner.task:
            raise UploadError(f"task '{task}': this service answers task '{self.runner.task}' only (serve --task)", 400)
        if task not in tasks:
            raise UploadError(f"task '{task}': not a task of this bundle ({', '.join(tasks)})", 400)

    def answer(self, pred: Prediction, views: bool, task: str | None = None) -> dict:
        out = pred.to_dict()
        if task is not None and "tasks" in out:  # one task's answer, as a service started with --task gives it
            out = {"file": out["file"], "task": task, **out["tasks"][task]}
        if not views:  # a multi-head bundle answers per task, each with its own views
            for part in [out, *(out.get("tasks") or {}).values()]:
                part.pop("views", None)
        elif not self.runner.tta:  # (?views=true was dropped without a word)
            out["views_note"] = "this service runs without TTA (serve --tta): one view, no per-view probabilities"
        return {**out, **self.answered_by}

    async def decode_each(self, request: Request, uploads: list[tuple[str, str | None, bytes]]) -> list:
        """A request's uploads decoded one after another (an image or its UploadError each): one request holds one
        decoding thread at a time, so a batch of large images does not hold up every other client, and the
        decoding stops when its client hangs up."""
        decoded = []
        for name, content_type, data in uploads:
            if await request.is_disconnected():
                raise ClientGone
            try:
                decoded.append(await self.decode(data, content_type, name))
            except UploadError as err:
                decoded.append(err)
        return decoded

    async def results(self, request: Request, futures: list[asyncio.Future]) -> list[Prediction]:
        """The queued images' predictions; ClientGone (their queued inference cancelled) if the client hangs up
        first."""
        answers = asyncio.gather(*futures)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({answers, gone}, return_when=asyncio.FIRST_COMPLETED)
            if answers.done():
                return answers.result()
            answers.cancel()  # the batcher skips a cancelled job
            answers.add_done_callback(_retrieved)  # its CancelledError taken: no "never retrieved" in the log
            raise ClientGone
        finally:
            gone.cancel()

    async def close(self) -> None:
        await self.batcher.close()
        await asyncio.to_thread(self.decoders.shutdown, True)  # not on the event loop: it waits for a decode


def _retrieved(future: asyncio.Future) -> None:
    """A done callback that takes a future's outcome, so asyncio does not log it as an exception never retrieved."""
    if not future.cancelled():
        future.exception()


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (after the body: the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": error_line(message)}, status_code=status, headers=headers)


def create_app(runner: Runner, settings: ServeSettings | None = None) -> FastAPI:
    """The ASGI app over a loaded Runner; its batcher starts with the first request and drains at shutdown."""
    settings = settings or ServeSettings()
    check_settings(settings)  # the same rules as `edgekd serve` (a token off loopback, sane queue sizes)
    service = Service(runner, settings)

    @contextlib.asynccontextmanager
    async def lifespan(_app):  # every padded batch size compiled before the first client (any server that runs
        service.open()  # the app's lifespan: edgekd serve's uvicorn, a library caller's)
        await asyncio.to_thread(service.warm)
        yield
        await service.close()

    # A malformed multipart body is answered 400; python-multipart also logs it to stderr as a warning.
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
    app = FastAPI(title="edgekd", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    _add_error_handlers(app)
    _add_routes(app, service, _auth(settings.token))
    # The last added runs first: metrics see every answer, the 503s of the request limit included.
    budget = None if settings.max_inflight_mb is None else int(settings.max_inflight_mb * 2**20)
    app.add_middleware(BodyLimit, max_bytes=int(settings.max_upload_mb * 2**20), timeout=settings.upload_timeout_s,
                       max_in_flight=budget)
    app.add_middleware(RequestLimit, max_requests=settings.max_concurrency)
    app.add_middleware(MetricsMiddleware, metrics=service.metrics)
    return app


def _auth(token: str | None):
    """A dependency: with a token, `Authorization: Bearer TOKEN` is required (compared in constant time)."""

    async def check(request: Request) -> None:
        if token is None:  # only this machine's clients: create_app's caller may bind any host (uvicorn.run)
            if request.client is not None and not is_loopback(request.client.host):
                raise HTTPException(403, "this service has no token: it answers this machine only (a service open "
                                         "to others needs one: serve --token, or ServeSettings(token=...))")
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    return Depends(check)


def _add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(UploadError, lambda _r, e: error(e.status, str(e)))
    app.add_exception_handler(QueueFull, lambda _r, e: error(503, f"busy: {e}", {"Retry-After": "1"}))
    app.add_exception_handler(BodyTooLarge, lambda _r, e: error(413, str(e)))
    app.add_exception_handler(UploadsInFlightFull, lambda _r, e: error(503, str(e), {"Retry-After": "1"}))
    app.add_exception_handler(BatchTooLarge, lambda _r, e: error(413, str(e)))
    app.add_exception_handler(UploadTimedOut, lambda _r, e: error(408, str(e)))
    app.add_exception_handler(ClientGone, lambda _r, e: Response(status_code=CLIENT_GONE))
    app.add_exception_handler(ClientDisconnect, lambda _r, e: Response(status_code=CLIENT_GONE))  # mid-upload
    app.add_exception_handler(HTTPException, lambda _r, e: error(e.status_code, str(e.detail), e.headers))
    app.add_exception_handler(RequestValidationError, lambda _r, e: error(
        422, "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())))
    app.add_exception_handler(Exception, lambda _r, e: error(500, f"internal error ({type(e).__name__})"))


async def _uploads(request: Request, limit: int, batch_said: str) -> list[tuple[str, str | None, bytes]]:
    """(name, declared content type, bytes) of a multipart request's files, or of a raw body.

    `limit` bounds this endpoint's files (non-file fields: MAX_FORM_FIELDS); `batch_said` says what
    /predict/batch takes.
    """
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):  # compressed bytes had been refused as "not a supported image" (422)
        raise UploadError(f"Content-Encoding {encoding[:40]!r} is not supported: send the image file's bytes as "
                          "they are (PNG and JPEG are compressed already)", 415)
    content_type = request.headers.get("content-type")
    if not (content_type or "").lower().startswith("multipart/form-data"):
        body = await request.body()
        if not body:
            raise UploadError("empty request body (send the image as the body, or as multipart 'file' fields)", 400)
        return [("upload", content_type, body)]
    try:
        form = await request.form(max_files=limit, max_fields=MAX_FORM_FIELDS)
    except HTTPException as err:  # Starlette answers max_files / max_fields with 400 and its own words
        if "Too many fields" in str(err.detail):
            raise UploadError(f"more than {MAX_FORM_FIELDS} form fields besides the files in one request",
                              413) from None
        if "Too many files" not in str(err.detail):
            raise
        raise UploadError(f"more than {limit} {'file' if limit == 1 else 'files'} in one request (/predict takes "
                          f"one file, /predict/batch {batch_said})", 413) from None
    try:  # closed here: Starlette spools a part over 1 MB to a temporary file, held until the form is closed
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not files:
            raise UploadError("multipart upload without a file part (send the image as the 'file' field)", 400)
        return [(f.filename or "upload", f.content_type, await f.read()) for f in files]
    finally:
        await form.close()


def _add_routes(app: FastAPI, service: Service, auth) -> None:
    @app.post("/predict", dependencies=[auth])
    async def predict(request: Request, views: bool = False, task: str | None = None):
        service.check_task(task, request)
        service.batcher.check_room(1)  # a full queue answers 503 before the upload is read
        uploads = await _uploads(request, 1, service.batch_files_said)
        if len(uploads) != 1:
            raise UploadError(f"/predict takes one image, got {len(uploads)} (use /predict/batch)", 400)
        name, content_type, data = uploads[0]
        image = await service.decode(data, content_type, name)
        (prediction,) = await service.results(request, service.batcher.submit([(image, name)]))
        return service.answer(prediction, views, task)

    @app.post("/predict/batch", dependencies=[auth])
    async def predict_batch(request: Request, views: bool = False, task: str | None = None):
        service.check_task(task, request)
        service.batcher.check_room(1)
        uploads = await _uploads(request, service.batch_files, service.batch_files_said)
        service.batcher.check_room(len(uploads))  # before decoding them; submit checks again
        decoded = await service.decode_each(request, uploads)
        good = [(img, name) for img, (name, _, _) in zip(decoded, uploads) if not isinstance(img, UploadError)]
        predictions = iter(await service.results(request, service.batcher.submit(good)) if good else [])
        results = [{"file": name, "error": error_line(str(img)), "status": img.status} if isinstance(img, UploadError)
                   else service.answer(next(predictions), views, task) for img, (name, _, _) in zip(decoded, uploads)]
        return {"results": results, **service.answered_by}

    @app.api_route("/health", methods=["GET", "HEAD"])  # load balancers probe with HEAD too
    async def health():
        return {"status": "draining" if service.batcher.closing else "ok", "queue": service.batcher.depth}

    @app.get("/metadata", dependencies=[auth])
    async def metadata():
        return _metadata(service)

    @app.get("/metrics", dependencies=[auth])
    async def metrics():
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def public_model(model: dict) -> dict:
    """edgekd.json's model section without paths on the training machine: no checkpoint path, and a weights file
    (`init_weights.file`, an updated bundle's parent checkpoint) by its file name; its sha256 identifies it."""
    out = {k: v for k, v in model.items() if k != "checkpoint_path"}
    init = out.get("init_weights")
    if isinstance(init, dict) and init.get("file"):
        out["init_weights"] = {**init, "file": PureWindowsPath(init["file"]).name}  # either separator
    return out


def _metadata(service: Service) -> dict:
    """The card's facts from edgekd.json, and how this service runs the model."""
    runner, meta = service.runner, service.runner.bundle.meta
    threshold, positive = runner.threshold, runner.positive
    own = runner.bundle.decision[0]  # `edgekd serve --threshold` may replace it: the decision is then not in use
    return {
        "bundle_id": service.bundle_id, "model": public_model(meta.get("model", {})), "class_names": runner.class_names,
        "input": dict(meta["preprocess"]),
        "formats": [{"format": a.format, "precision": a.precision} for a in runner.bundle.artifacts],
        "operating_point": {"calibration": meta.get("calibration"),
                            "threshold": threshold, "positive_class": runner.class_names[positive] if threshold
                            is not None else None, "decision": meta.get("decision"),
                            "threshold_from": None if threshold is None else "bundle" if threshold == own else
                            "serve --threshold (the `decision` entry, with its validation figures, is the bundle's "
                            "rule, not this service's)" if meta.get("decision") else "serve --threshold"},
        "tasks": meta.get("tasks"), "task": runner.task,
        "card": meta.get("card"), "metrics": meta.get("metrics"),
        "serving": {**runner.info, "tta_views": runner.tta_views.names if runner.tta else None,
                    "max_batch": service.settings.max_batch, "max_wait_ms": service.settings.max_wait_ms,
                    "max_queue": service.settings.max_queue, "batch_sizes": service.sizes},
        "edgekd_version": meta.get("edgekd_version"),
    }
