"""`edgekd serve`: the HTTP service in-process (httpx over ASGI) and one real server process on localhost."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from conftest import REPO, random_pixels  # noqa: E402
from edgekd.errors import EdgeKDError  # noqa: E402
from edgekd.runtime import Runner  # noqa: E402
from edgekd.serve import ServeSettings, check_settings, create_app, padded_sizes  # noqa: E402
from test_runtime import _data_cfg, _tiny_model, write_manifest, write_test_bundle  # noqa: E402

NAMES = ["normal", "pneumonia"]
TOKEN = "a-test-token-of-some-length"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A two-class bundle with a calibration (temperature + bias) and a decision threshold."""
    root = write_test_bundle(tmp_path_factory.mktemp("serve") / "b", _tiny_model(classes=2), _data_cfg(), NAMES)
    meta = json.loads((root / "edgekd.json").read_text())
    meta["calibration"] = {"temperature": 1.7, "bias": [0.0, 0.3]}
    meta["decision"] = {"threshold": 0.4, "positive_index": 1}
    (root / "edgekd.json").write_text(json.dumps(meta))
    write_manifest(root)
    return root


@pytest.fixture(scope="module")
def runner(bundle) -> Runner:
    return Runner.from_bundle(bundle, tta=True, threads=1)


def png(seed: int, size: int = 20, channels: int = 3) -> bytes:
    arr = random_pixels((size, size, channels), seed=seed)
    buf = io.BytesIO()
    Image.fromarray(arr if channels == 3 else arr[..., 0]).save(buf, format="PNG")
    return buf.getvalue()


def call(app, requests):
    """Run `requests(client)` (a coroutine function) against the app in-process; returns its result."""
    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=30) as client:
            try:
                return await requests(client)
            finally:
                await app.state.service.close()
    return asyncio.run(main())


def metric_samples(text: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_predict_equals_the_runner_with_calibration_and_views(runner):
    images = [png(i) for i in range(3)]
    expected = [runner.predict(np.asarray(Image.open(io.BytesIO(b)))) for b in images]

    async def go(client):
        multipart = await client.post("/predict?views=true", files={"file": ("a.png", images[0], "image/png")})
        raw = [await client.post("/predict", content=b, headers={"content-type": "image/png"}) for b in images[1:]]
        return [multipart, *raw]

    responses = call(create_app(runner), go)
    for r, want in zip(responses, expected):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["label"] == want.label and body["index"] == want.index
        np.testing.assert_allclose([body["probs"][c] for c in NAMES], want.probs, atol=1e-6)
        np.testing.assert_allclose([body["uncalibrated"][c] for c in NAMES], want.raw_probs, atol=1e-6)
        assert len(body["bundle_id"]) == 64
    assert set(responses[0].json()["views"]) == set(runner.tta_views.names) and "views_note" not in responses[0].json()
    assert "views" not in responses[1].json()


def test_views_asked_of_a_service_without_tta_are_said_to_be_absent(bundle):
    """?views=true on a service started without --tta answered as if not asked."""
    async def go(client):
        return await client.post("/predict?views=true", content=png(1), headers={"content-type": "image/png"})

    body = call(create_app(Runner.from_bundle(bundle, tta=False, threads=1)), go).json()
    assert "views" not in body and body["views_note"].startswith("this service runs without TTA (serve --tta)")


def test_batch_endpoint_answers_each_file_and_reports_bad_ones(runner):
    files = [("files", (f"{i}.png", png(10 + i), "image/png")) for i in range(3)]
    files.insert(1, ("files", ("bad.png", png(0)[:40], "image/png")))

    async def go(client):
        return await client.post("/predict/batch", files=files)

    r = call(create_app(runner), go)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x.get("file") for x in results] == ["0.png", "bad.png", "1.png", "2.png"]
    assert results[1]["status"] == 422 and results[1]["error"].startswith("bad.png: ")
    want = runner.predict(np.asarray(Image.open(io.BytesIO(png(12)))))
    np.testing.assert_allclose([results[3]["probs"][c] for c in NAMES], want.probs, atol=1e-6)


def test_concurrent_requests_are_batched(runner):
    app = create_app(runner, ServeSettings(max_batch=8, max_wait_ms=200))

    async def go(client):
        rs = await asyncio.gather(*(client.post("/predict", content=png(i), headers={"content-type": "image/png"})
                                    for i in range(8)))
        return rs, await client.get("/metrics")

    rs, metrics = call(app, go)
    assert all(r.status_code == 200 for r in rs)
    samples = metric_samples(metrics.text)
    batches, images = samples[("edgekd_batch_size_count", ())], samples[("edgekd_batch_size_sum", ())]
    assert images == 8 and batches < 8  # at least one inference call served several clients
    assert samples[("edgekd_requests_total", (("endpoint", "/predict"), ("status", "200")))] == 8


def test_openvino_batches_are_padded_to_a_few_compiled_sizes(runner):
    assert padded_sizes(8) == [1, 2, 4, 8] and padded_sizes(16) == [1, 4, 8, 16] and padded_sizes(1) == [1]
    service = create_app(runner, ServeSettings(max_batch=8)).state.service
    arr = np.asarray(Image.open(io.BytesIO(png(3))))
    sized = [runner.preprocessor.to_model_size(arr, keep_gray=True)] * 3
    seen = []
    original = runner.predict_sized
    runner.predict_sized = lambda images, sources, tta=None, **kw: seen.append(len(images)) or original(images, sources,
                                                                                                        **kw)
    try:
        preds = service.run_batch(sized, ["a", "b", "c"])
    finally:
        del runner.predict_sized
    assert seen == [4] and len(preds) == 3
    np.testing.assert_allclose(preds[2].probs, runner.predict(arr).probs, atol=1e-6)


def test_a_gray_bundle_serves_gray_and_color_uploads_from_the_graphs_warmed_at_start(bundle, tmp_path):
    """A bundle trained on gray images with an RGB model kept gray uploads one channel: OpenVINO compiled a second
    set of graphs for the first color upload, evicting warmed ones (4 kept), and every client waited on the
    compiles. Gray uploads now go in as RGB (the graph's own repeat): one set, all warmed at start."""
    import shutil

    gray = shutil.copytree(bundle, tmp_path / "gray")
    meta = json.loads((gray / "edgekd.json").read_text())
    meta.setdefault("runtime", {})["image_channels"] = 1
    (gray / "edgekd.json").write_text(json.dumps(meta))
    write_manifest(gray)
    runner = Runner.from_bundle(gray, backend="openvino", tta=False, threads=1)
    service = create_app(runner, ServeSettings(max_batch=4)).state.service
    service.warm()
    compiles, original = [], runner.backend._compile
    runner.backend._compile = lambda *args: compiles.append(args) or original(*args)
    gray_img = random_pixels((20, 20, 1), seed=4)
    sized = [runner.preprocessor.to_model_size(a, keep_gray=True)
             for a in (gray_img, random_pixels((20, 20, 3), seed=5))]
    for batch in ([sized[0]], [sized[1]], [sized[0], sized[1]], [sized[0]] * 3, [sized[1]] * 4):
        service.run_batch(batch, ["x"] * len(batch))
    assert compiles == []
    np.testing.assert_allclose(service.run_batch([sized[0]], ["g"])[0].probs, runner.predict(gray_img).probs,
                               atol=1e-6)


def hold_the_model(service) -> tuple[threading.Event, threading.Event]:
    """The service's model waits in its first call: (set once a batch is being run, set it to let the batch go)."""
    busy, release, original = threading.Event(), threading.Event(), service.batcher.predict

    def held_model(images, sources):
        busy.set()
        release.wait(10)
        return original(images, sources)

    service.batcher.predict = held_model
    return busy, release


def test_full_queue_answers_503_and_the_service_recovers(runner):
    app = create_app(runner, ServeSettings(max_batch=1, max_wait_ms=0, max_queue=2))
    service = app.state.service
    busy, release = hold_the_model(service)

    async def go(client):
        post = lambda i: client.post("/predict", content=png(i), headers={"content-type": "image/png"})  # noqa: E731
        running = [asyncio.ensure_future(post(0))]
        while not busy.is_set():  # the model holds request 0
            await asyncio.sleep(0.01)
        running += [asyncio.ensure_future(post(i)) for i in (1, 2)]
        while service.batcher.depth < 2:  # requests 1 and 2 fill the queue
            await asyncio.sleep(0.01)
        refused = await post(9)
        release.set()
        return refused, await asyncio.gather(*running), await post(5)

    refused, held, after = call(app, go)
    assert refused.status_code == 503 and "queue is full" in refused.json()["error"]
    assert refused.headers["retry-after"] == "1"
    assert [r.status_code for r in held] == [200, 200, 200] and after.status_code == 200


def _dicom_without_pixels() -> bytes:
    pytest.importorskip("pydicom")
    sys.path.insert(0, str(REPO / "benchmarks"))
    from serve import dicom_without_pixels  # the load test's own malformed DICOM

    return dicom_without_pixels()


def _huge_png() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (40_000, 1)).save(buf, format="PNG")
    return buf.getvalue()


BAD_UPLOADS = {
    "empty body": (lambda: b"", "image/png", 400, "empty"),
    "truncated png": (lambda: png(1)[:60], "image/png", 422, "truncated"),
    "huge dimensions": (_huge_png, "image/png", 422, "limit"),
    "wrong content type": (lambda: png(1), "text/plain", 415, "not an image"),
    "type contradicts content": (lambda: png(1), "image/jpeg", 415, "content is PNG"),
    "not an image": (lambda: b"%PDF-1.4 hello", "application/octet-stream", 422, "not a supported image"),
    "dicom without pixels": (_dicom_without_pixels, "application/dicom", 422, "upload: "),
    "multi-page tiff": (lambda: _pages("TIFF"), "image/tiff", 422, "a TIFF of 2 pages"),
}


def _pages(fmt: str) -> bytes:
    buf = io.BytesIO()
    first, second = (Image.fromarray(np.full((8, 8), v, np.uint8)) for v in (10, 200))
    first.save(buf, fmt, save_all=True, append_images=[second])
    return buf.getvalue()


def test_each_malformed_upload_is_a_4xx_json_line_and_good_requests_still_work(runner):
    cases = {name: (make(), ctype, status, words) for name, (make, ctype, status, words) in BAD_UPLOADS.items()}

    async def go(client):
        out = {}
        for name, (data, ctype, _, _) in cases.items():
            out[name] = await client.post("/predict", content=data, headers={"content-type": ctype})
        out["multipart text file"] = await client.post("/predict", data={"x": "1"},
                                                          files={"y": ("y", b"", "text/plain")})
        out["good"] = await client.post("/predict", files={"file": ("g.png", png(2), "image/png")})
        out["gzip"] = await client.post("/predict", content=gzip.compress(png(2)),
                                        headers={"content-type": "image/png", "content-encoding": "gzip"})
        return out

    async def batch(client):  # an empty body is the request's error, not one file's (it was 200 + a 400 item)
        return await client.post("/predict/batch", content=b"", headers={"content-type": "image/png"})

    empty = call(create_app(runner), batch)
    assert empty.status_code == 400 and "empty request body" in empty.json()["error"]
    out = call(create_app(runner, ServeSettings(max_upload_mb=1)), go)
    for name, (_, _, status, words) in cases.items():
        r = out[name]
        assert r.status_code == status, (name, r.text)
        assert list(r.json()) == ["error"] and "\n" not in r.json()["error"] and words in r.json()["error"], name
    assert out["multipart text file"].status_code == 415
    assert out["gzip"].status_code == 415 and "Content-Encoding 'gzip' is not supported" in out["gzip"].json()["error"]
    assert out["good"].status_code == 200 and out["good"].json()["label"] in NAMES


def test_a_dicom_upload_without_pydicom_is_415_naming_the_extra(runner, monkeypatch):
    """The core install has no pydicom: a DICOM upload had been a 422, as if the file were broken."""
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom fails, as on the core install
    dicom = b"\0" * 128 + b"DICM" + b"\0" * 64

    async def go(client):
        return await client.post("/predict", content=dicom, headers={"content-type": "application/dicom"})

    r = call(create_app(runner), go)
    assert r.status_code == 415 and "needs pydicom (pip install 'edgekd[dicom]')" in r.json()["error"]


def test_body_over_the_upload_limit_is_413(runner):
    async def go(client):
        return await client.post("/predict", content=b"\x89PNG" + b"0" * 2**20, headers={"content-type": "image/png"})

    r = call(create_app(runner, ServeSettings(max_upload_mb=0.5)), go)
    assert r.status_code == 413 and "limit" in r.json()["error"] and r.content.startswith(b'{"error":"')  # as others


def test_a_service_pixel_limit_refuses_larger_images_before_decoding(runner):
    """--max-megapixels: the runtime's 64-MP limit is per decode, ~200 MB of RGB per decoder thread; an operator
    can set a lower one for the service. Checked from the header: a 422 naming the limit; smaller images pass."""
    async def go(client):
        big = await client.post("/predict", content=png(0, size=40), headers={"content-type": "image/png"})
        small = await client.post("/predict", content=png(1, size=20), headers={"content-type": "image/png"})
        return big, small

    big, small = call(create_app(runner, ServeSettings(max_megapixels=0.001)), go)
    assert big.status_code == 422 and "image is 40x40, larger than the 1000 pixel limit" in big.json()["error"]
    assert small.status_code == 200
    from edgekd.errors import EdgeKDError

    for value in (0, 65):
        with pytest.raises(EdgeKDError, match=r"--max-megapixels must be in \(0, 64\]"):
            create_app(runner, ServeSettings(max_megapixels=value))


def test_token_is_required_except_for_health(runner):
    async def go(client):
        auth = {"authorization": f"Bearer {TOKEN}"}
        return (await client.post("/predict", content=png(1)), await client.get("/metadata"),
                await client.get("/metadata", headers={"authorization": "Bearer wrong-token-wrong-token"}),
                await client.get("/health"), await client.get("/metadata", headers=auth),
                await client.post("/predict", content=png(1), headers=auth))

    anon, meta, wrong, health, meta_ok, ok = call(create_app(runner, ServeSettings(token=TOKEN)), go)
    assert anon.status_code == meta.status_code == wrong.status_code == 401
    assert "token" in anon.json()["error"] and anon.headers["www-authenticate"] == "Bearer"
    assert health.status_code == 200 and ok.status_code == 200
    facts = meta_ok.json()
    assert facts["class_names"] == NAMES and facts["operating_point"]["threshold"] == 0.4
    assert facts["input"]["input_size"] == [3, 16, 16] and facts["serving"]["batch_sizes"] == [1, 2, 4, 8]
    assert facts["input"]["mean"] and facts["input"]["std"]  # the whole preprocessing a client may replicate


def test_metadata_says_whether_the_threshold_is_the_bundles_or_the_services(bundle, runner):
    """`serve --threshold 0.99` had shown threshold 0.99 beside the bundle's decision and its validation figures,
    as if they held at 0.99."""
    async def go(client):
        return (await client.get("/metadata")).json()["operating_point"]

    own = call(create_app(runner), go)
    assert own["threshold"] == 0.4 and own["threshold_from"] == "bundle"
    other = call(create_app(Runner.from_bundle(bundle, threads=1, threshold=0.99)), go)
    assert other["threshold"] == 0.99 and other["decision"]["threshold"] == 0.4
    assert other["threshold_from"].startswith("serve --threshold") and "not this service's" in other["threshold_from"]


def test_metrics_parse_and_count_requests_and_errors(runner):
    async def go(client):
        for i in range(3):
            await client.post("/predict", content=png(i))
        await client.post("/predict", content=b"")
        await client.get("/health")
        return await client.get("/metrics")

    r = call(create_app(runner), go)
    assert r.headers["content-type"].startswith("text/plain")
    samples = metric_samples(r.text)
    assert samples[("edgekd_requests_total", (("endpoint", "/predict"), ("status", "200")))] == 3
    assert samples[("edgekd_request_errors_total", (("endpoint", "/predict"), ("status", "400")))] == 1
    assert samples[("edgekd_request_latency_seconds_count", (("endpoint", "/predict"),))] == 4
    assert samples[("edgekd_requests_in_flight", ())] == 1  # the /metrics request itself


def test_serve_refuses_another_host_without_a_token(bundle):
    from edgekd.serve import check_settings
    from edgekd.errors import EdgeKDError

    with pytest.raises(EdgeKDError, match="token"):
        check_settings(ServeSettings(host="0.0.0.0"))
    check_settings(ServeSettings(host="0.0.0.0", token=TOKEN))
    check_settings(ServeSettings(host="::1"))


@pytest.mark.parametrize("key, option", [("max_inflight_mb", "--max-inflight-mb"), ("max_upload_mb", "--max-upload-mb"),
                                         ("upload_timeout_s", "--upload-timeout"), ("max_wait_ms", "--max-wait-ms")])
def test_serve_refuses_an_infinite_limit_by_name(key, option):
    """--max-inflight-mb inf had ended in an OverflowError; --upload-timeout inf had served with no timeout."""
    from edgekd.errors import EdgeKDError

    with pytest.raises(EdgeKDError, match=f"^{option} inf: not a finite number$"):
        check_settings(ServeSettings(**{key: float("inf")}))


def test_serve_refuses_a_port_in_use_before_loading_the_model(bundle):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "edgekd", "serve", str(bundle), "--port", str(port),
                               "--backend", "onnx", "--threads", "1"], cwd=REPO, capture_output=True, text=True,
                              timeout=120, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert f"--port {port}: cannot listen on 127.0.0.1" in lines[0] and "serving" not in proc.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _started_server(bundle, port: int, *options: str) -> subprocess.Popen:
    """`edgekd serve` as a process on `port`, answering /health."""
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen([sys.executable, "-m", "edgekd", "serve", str(bundle), "--port", str(port),
                             "--backend", "onnx", "--threads", "1", *options],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "timeout"
        time.sleep(0.2)


def _post_in_background(base: str, result: dict) -> threading.Thread:
    def post():
        try:
            result["r"] = httpx.post(f"{base}/predict", content=png(2), headers={"content-type": "image/png"},
                                     timeout=20)
        except httpx.TransportError as err:
            result["r"] = err
    worker = threading.Thread(target=post)
    worker.start()
    return worker


def test_real_server_answers_and_finishes_in_flight_requests_on_sigterm(bundle, tmp_path):
    """`edgekd serve` as a process: requests over TCP; SIGTERM while a request waits in the batcher (a long
    --max-wait-ms holds it there): it is still answered, then the process exits 0."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = None
    try:
        proc = _started_server(bundle, port, "--max-wait-ms", "3000", "--max-batch", "4", "--max-concurrency", "2")
        # Idle and half-sent connections, more than --max-concurrency: they hold no request slot (uvicorn's
        # connection limit counted them, and they locked every client out).
        idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(4)]
        for sock in idle:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        first = httpx.post(f"{base}/predict", content=png(1), headers={"content-type": "image/png"}, timeout=10)
        assert first.status_code == 200 and first.json()["label"] in NAMES
        for sock in idle:
            sock.close()
        result = {}
        worker = _post_in_background(base, result)
        time.sleep(1.0)  # the request now waits in the batcher for up to 3 s
        proc.send_signal(signal.SIGTERM)
        worker.join(20)
        assert result["r"].status_code == 200 and result["r"].json()["label"] in NAMES
        assert proc.wait(timeout=30) == 0, proc.stdout.read()
    finally:
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_second_sigint_stops_the_server_at_once_with_status_130_and_no_traceback(bundle):
    """Ctrl-C twice while a request waits: uvicorn's forced exit, which does not answer it, ends the process as
    interrupted (130), not with a graceful shutdown's 0, and without the traceback of the cancelled lifespan."""
    port = _free_port()
    proc = None
    try:
        proc = _started_server(bundle, port, "--max-wait-ms", "8000", "--max-batch", "4")
        result = {}
        worker = _post_in_background(f"http://127.0.0.1:{port}", result)
        time.sleep(1.0)  # the request now waits in the batcher for up to 8 s
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
        output = proc.stdout.read()
        worker.join(20)
        assert code == 130, output
        assert "Traceback" not in output and "CancelledError" not in output, output
        assert "interrupted" in output.splitlines(), output
    finally:
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def test_the_service_never_imports_torch():
    code = ("import sys, edgekd.serve, edgekd.serve.app, edgekd.serve.server; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'timm')]; "
            "assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("fmt, suffix", [("PNG", ".png"), ("JPEG", ".jpg"), ("TIFF", ".tif"), ("BMP", ".bmp")])
def test_upload_bytes_decode_like_the_file(tmp_path, fmt, suffix):
    from edgekd.imageio import read_image, read_image_bytes, sniff_format

    path = tmp_path / f"x{suffix}"
    Image.fromarray(random_pixels((12, 10, 3), seed=4)).save(path, format=fmt)
    data = path.read_bytes()
    assert sniff_format(data) == fmt
    np.testing.assert_array_equal(read_image_bytes(data, "x"), read_image(path))


def test_create_app_applies_the_services_rules(runner):
    """A library caller building the app (then `uvicorn.run(app, host=...)`) gets the rules `edgekd serve` has."""
    from edgekd.errors import EdgeKDError

    for settings, words in ((ServeSettings(host="0.0.0.0"), "without a token"),
                            (ServeSettings(token="short"), "at least 16 characters"),
                            # a secret file's newline: no header could carry it, every request got 401
                            (ServeSettings(token=TOKEN + "\n"), r"holds '\\n': a bearer token is printable ASCII"),
                            (ServeSettings(token="clé " + TOKEN), r"holds ' ', 'é'"),
                            (ServeSettings(max_batch=0), "--max-batch must be >= 1"),
                            (ServeSettings(max_queue=1, max_batch=8), "--max-queue 1 must be at least")):
        with pytest.raises(EdgeKDError, match=words):
            create_app(runner, settings)


def test_an_app_without_a_token_answers_this_machine_only_and_warms_up_in_its_lifespan(bundle):
    """create_app checked settings.host, which a library caller's `uvicorn.run(app, host="0.0.0.0")` never sets: the
    app answered anyone without a token. And only `edgekd serve` warmed the model up: a library caller's first
    clients waited on OpenVINO's compiles."""
    from starlette.testclient import TestClient

    runner = Runner.from_bundle(bundle, backend="openvino", tta=False, threads=1)
    compiles, original = [], runner.backend._compile
    runner.backend._compile = lambda *args: compiles.append(args) or original(*args)
    app = create_app(runner, ServeSettings(max_batch=4))
    png_ = {"content": png(2), "headers": {"content-type": "image/png"}}
    with TestClient(app, client=("10.1.2.3", 5000)) as other:  # entering runs the lifespan's startup
        warmed = len(compiles)
        refused = other.post("/predict", **png_)
        health = other.get("/health")
    assert warmed > 0 and refused.status_code == 403 and health.status_code == 200  # (batch 1 compiled at load)
    assert refused.json()["error"].startswith("this service has no token: it answers this machine only")
    with TestClient(create_app(runner, ServeSettings(max_batch=4)), client=("::ffff:127.0.0.1", 5000)) as local:
        assert local.post("/predict", **png_).status_code == 200
        service = local.app.state.service
        image = runner.preprocessor.to_model_size(random_pixels((20, 20, 3), seed=1))
        for size in padded_sizes(4):
            service.run_batch([image] * size, ["x"] * size)
    assert len(compiles) == warmed  # every padded batch size was compiled before the first client
    with TestClient(create_app(runner, ServeSettings(max_batch=4, token=TOKEN)), client=("10.1.2.3", 5000)) as c:
        assert c.post("/predict", **png_).status_code == 401
        assert c.post("/predict", content=png(2), headers={"content-type": "image/png",
                                                            "authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_requests_over_the_limit_get_a_json_503_counted_in_the_metrics(runner):
    """--max-concurrency bounds requests being answered (503 with Retry-After before the upload is read); /health
    stays open; the refusals are counted."""
    app = create_app(runner, ServeSettings(max_batch=1, max_wait_ms=0, max_concurrency=1))
    service = app.state.service
    busy, release = hold_the_model(service)

    async def go(client):
        held = asyncio.ensure_future(client.post("/predict", content=png(0), headers={"content-type": "image/png"}))
        while not busy.is_set():
            await asyncio.sleep(0.01)
        refused = await client.post("/predict", content=png(1), headers={"content-type": "image/png"})
        health, scraped = await client.get("/health"), await client.get("/metrics")  # monitoring sees it busy
        release.set()
        return refused, health, scraped, await held, await client.get("/metrics")

    refused, health, scraped, held, metrics = call(app, go)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"].startswith("busy: 1 requests are being answered (at most 1)")
    assert health.status_code == 200 and held.status_code == 200 and scraped.status_code == 200
    assert metric_samples(metrics.text)[("edgekd_requests_total", (("endpoint", "/predict"), ("status", "503")))] == 1


def test_a_batch_larger_than_the_queue_is_413_not_a_retry(runner):
    files = [("files", (f"{i}.png", png(i), "image/png")) for i in range(5)]

    async def go(client):
        return await client.post("/predict/batch", files=files), await client.post("/predict/batch", files=files[:4])

    too_many, fits = call(create_app(runner, ServeSettings(max_batch=2, max_queue=4)), go)
    assert too_many.status_code == 413 and too_many.json()["error"] == (
        "more than 4 files in one request (/predict takes one file, /predict/batch at most 4, the --max-queue 4)")
    assert fits.status_code == 200 and len(fits.json()["results"]) == 4


def test_more_files_than_an_endpoint_takes_is_413_in_our_words(runner):
    """Starlette answers a multipart over max_files or max_fields with 400 "Too many ..."; the README says 413."""
    tiny = png(1, size=8)

    async def go(client):
        return (await client.post("/predict/batch", files=[("files", (f"{i}.png", tiny, "image/png"))
                                                            for i in range(65)]),
                await client.post("/predict", files=[("file", (f"{i}.png", tiny, "image/png")) for i in range(2)]),
                await client.post("/predict", files=[("file", ("a.png", tiny, "image/png"))],
                                  data={"a": "1", "b": "2"}),
                await client.post("/predict", files=[("file", ("a.png", tiny, "image/png"))],
                                  data={f"f{i}": "1" for i in range(65)}),
                await client.post("/predict", files={"a": (None, "1"), "b": (None, "2")}),
                await client.head("/health"))

    batch, single, fields, many_fields, no_file, head = call(create_app(runner, ServeSettings(max_queue=100)), go)
    assert batch.status_code == 413 and batch.json()["error"] == (
        "more than 64 files in one request (/predict takes one file, /predict/batch at most 64)")
    assert single.status_code == 413 and single.json()["error"].startswith("more than 1 file in one request")
    # Text fields beside the image are metadata a client may send: ignored (two had been 413 "more than 1 field").
    assert fields.status_code == 200 and "label" in fields.json()
    assert many_fields.status_code == 413 and many_fields.json()["error"] == (
        "more than 64 form fields besides the files in one request")
    assert no_file.status_code == 400 and "without a file part" in no_file.json()["error"]
    assert head.status_code == 200  # load balancers probe with HEAD


def test_uploads_held_at_once_have_a_budget(runner):
    """Concurrency x upload size was the only bound on request bodies held in memory (256 x 64 MiB). With
    --max-inflight-mb, a request that would pass the budget gets 503 + Retry-After: before its upload is read when
    it declares its length, as it streams when it does not; the budget is free again once a request is answered."""
    settings = ServeSettings(max_upload_mb=0.01, max_inflight_mb=0.01)  # 10,485 bytes each
    held = asyncio.Event()

    async def slow_body():  # request A: 6,000 bytes in flight for a while
        yield b"x" * 6000
        held.set()
        await asyncio.sleep(0.5)
        yield b"x" * 10

    async def streamed():  # request C: no declared length
        yield b"y" * 3000
        yield b"y" * 3000

    async def go(client):
        a = asyncio.create_task(client.post("/predict", content=slow_body(), headers={"content-type": "image/png"}))
        await held.wait()
        b = await client.post("/predict", content=b"z" * 6000, headers={"content-type": "image/png"})
        c = await client.post("/predict", content=streamed(), headers={"content-type": "image/png"})
        first = await a
        after = await client.post("/predict", content=b"z" * 6000, headers={"content-type": "image/png"})
        return first, b, c, after

    first, declared, streaming, after = call(create_app(runner, settings), go)
    assert first.status_code == 422  # not an image, but read and answered
    assert declared.status_code == 503 and declared.headers["retry-after"] == "1"
    assert declared.json()["error"] == ("busy: the uploads being answered hold 6000 bytes, and this one would pass "
                                        "the 10485 byte budget (--max-inflight-mb); retry later")
    assert streaming.status_code == 503 and "byte budget" in streaming.json()["error"]
    assert after.status_code == 422  # A answered: its bytes are free again
    with pytest.raises(EdgeKDError, match="--max-inflight-mb 0.005 must be at least --max-upload-mb 0.01"):
        check_settings(ServeSettings(max_upload_mb=0.01, max_inflight_mb=0.005))


def test_a_stalled_upload_is_408(runner):
    async def slow_body():
        yield png(1)[:20]
        await asyncio.sleep(3)
        yield png(1)[20:]

    async def go(client):
        return await client.post("/predict", content=slow_body(), headers={"content-type": "image/png"})

    r = call(create_app(runner, ServeSettings(upload_timeout_s=0.3)), go)
    assert r.status_code == 408 and "no data for 0.3 s" in r.json()["error"]

    async def steady_body():  # slower in all than the timeout, never silent for that long: it goes on
        data = png(1)
        for i in range(0, len(data), 16):
            await asyncio.sleep(0.05)
            yield data[i:i + 16]

    async def go_steady(client):
        return await client.post("/predict", content=steady_body(), headers={"content-type": "image/png"})

    assert len(png(1)) // 16 * 0.05 > 0.3
    assert call(create_app(runner, ServeSettings(upload_timeout_s=0.3)), go_steady).status_code == 200


def test_every_answer_names_the_model_that_gave_it(runner):
    async def go(client):
        return (await client.post("/predict", content=png(1), headers={"content-type": "image/png"}),
                await client.post("/predict/batch", files=[("files", ("a.png", png(2), "image/png"))]),
                await client.get("/metadata"))

    one, batch, meta = call(create_app(runner), go)
    for body in (one.json(), batch.json()):
        assert body["format"] == runner.info["format"] and body["precision"] == runner.precision
        assert body["tta_views"] == runner.tta_views.names and body["threshold"] == 0.4
    assert "checkpoint_path" not in meta.json()["model"]  # the training machine's file system stays private


def test_a_client_that_hangs_up_is_dropped_not_answered(runner):
    """A disconnect while images wait cancels their queued inference (the batcher skips them) and stops the
    decoding of a batch's remaining files; the cancelled wait leaves nothing in the log (asyncio had logged
    "_GatheringFuture exception was never retrieved" with a CancelledError traceback for every hang-up)."""
    import gc

    from edgekd.serve.app import ClientGone

    class Gone:
        async def receive(self):
            return {"type": "http.disconnect"}

        async def is_disconnected(self):
            return True

    service = create_app(runner).state.service

    async def go():
        logged = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: logged.append(context["message"]))
        future = asyncio.get_running_loop().create_future()
        with pytest.raises(ClientGone):
            await service.results(Gone(), [future])
        assert future.cancelled()
        await asyncio.sleep(0)  # the cancelled gather finishes; collected, it would log an unretrieved exception
        await asyncio.sleep(0)
        gc.collect()
        assert logged == []
        with pytest.raises(ClientGone):
            await service.decode_each(Gone(), [("a.png", "image/png", png(1))])
        await service.close()

    asyncio.run(go())


@pytest.mark.parametrize("declared, fmt", [("image/jpg", "JPEG"), ("image/x-png", "PNG"), ("image/pjpeg", "JPEG")])
def test_the_non_standard_image_types_clients_send_are_accepted(declared, fmt):
    from edgekd.serve.uploads import check_upload

    buf = io.BytesIO()
    Image.fromarray(random_pixels((8, 8, 3), seed=1)).save(buf, format=fmt)
    check_upload(buf.getvalue(), declared, "a")  # no UploadError


def test_a_request_cancelled_by_the_shutdown_gets_a_json_503():
    """uvicorn cancels what is unanswered when the grace period ends: a JSON 503, not a dropped connection and a
    CancelledError traceback; the request slot is given back either way."""
    from edgekd.serve.limits import RequestLimit

    async def cancelled_app(scope, receive, send):
        raise asyncio.CancelledError

    async def go():
        sent = []

        async def send(message):
            sent.append(message)

        limit = RequestLimit(cancelled_app, max_requests=2)
        await limit({"type": "http", "path": "/predict", "headers": []}, None, send)
        return limit.active, sent

    active, sent = asyncio.run(go())
    assert active == 0 and sent[0]["status"] == 503 and (b"retry-after", b"1") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["error"].startswith("the service shut down before this request was answered")


def test_metadata_names_a_parent_weights_file_without_its_path():
    """An updated bundle's /metadata gave init_weights.file, the parent checkpoint's absolute path on the training
    machine (the README says it stays private, as checkpoint_path does)."""
    from edgekd.serve.app import public_model

    model = {"name": "edgekd_cnn", "checkpoint_path": "/home/me/runs/cl/model.pt",
             "init_weights": {"file": "/home/me/runs/student/best.pt", "sha256": "ab" * 32}}
    assert public_model(model) == {"name": "edgekd_cnn", "init_weights": {"file": "best.pt", "sha256": "ab" * 32}}
    assert public_model({"init_weights": {"file": "C:\\Users\\me\\best.pt"}})["init_weights"]["file"] == "best.pt"
    hub = {"init_weights": {"hub": "timm/resnet18.a1_in1k", "revision": "abc", "sha256": "cd" * 32}}
    assert public_model(hub) == hub and model["init_weights"]["file"].startswith("/home")  # the bundle's own is kept


def test_a_task_asked_of_a_one_head_bundle_is_refused(runner):
    async def go(client):
        return await client.post("/predict?task=A", content=png(1), headers={"content-type": "image/png"})

    r = call(create_app(runner), go)
    assert r.status_code == 400 and r.json()["error"].startswith("task 'A': this bundle has one head")


def test_an_app_serves_again_in_a_second_lifespan(runner):
    """`closing` was never reset and both pools were shut for good: a second lifespan answered every request 503."""
    from starlette.testclient import TestClient

    app = create_app(runner, ServeSettings(max_batch=2))
    png_ = {"content": png(3), "headers": {"content-type": "image/png"}}
    answers = []
    for _ in range(2):
        with TestClient(app, client=("127.0.0.1", 5000)) as client:
            answers.append(client.post("/predict", **png_))
    assert [a.status_code for a in answers] == [200, 200], answers[1].text
    assert answers[0].json() == answers[1].json()


def test_a_submit_after_close_starts_no_task_and_a_short_result_list_fails_the_batch():
    from edgekd.serve.batcher import Batcher, QueueFull

    image = np.zeros((2, 2, 3), np.uint8)

    async def late_submit():
        batcher = Batcher(lambda images, sources: list(range(len(images))), max_batch=2, max_wait=0)
        assert await batcher.submit([(image, "a")])[0] == 0
        await batcher.close()
        task = batcher.task
        with pytest.raises(QueueFull, match="shutting down"):
            batcher.submit([(image, "b")])
        return task is batcher.task and task.done()

    assert asyncio.run(late_submit())  # no new batcher task that nothing would stop

    async def short_results():
        batcher = Batcher(lambda images, sources: [0], max_batch=2, max_wait=0.5)
        futures = batcher.submit([(image, "a"), (image, "b")])
        done = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 5)
        await batcher.close()
        return done

    results = asyncio.run(short_results())  # each request gets the error instead of waiting for ever
    assert all(isinstance(r, RuntimeError) and "1 results for 2 images" in str(r) for r in results)


def test_a_multipart_form_is_closed_after_its_files_are_read(runner, monkeypatch):
    """Starlette spools a part over 1 MB to a temporary file that stays open until the form is closed."""
    from starlette.datastructures import FormData

    closed, real_close = [], FormData.close

    async def close(self):
        closed.append(len(self))
        await real_close(self)
    monkeypatch.setattr(FormData, "close", close)
    app = create_app(runner, ServeSettings(max_batch=2))

    async def go(client):
        ok = await client.post("/predict", files={"file": ("a.png", png(4), "image/png")})
        empty = await client.post("/predict", files={"note": (None, "x")})
        return ok, empty

    ok, empty = call(app, go)
    assert ok.status_code == 200 and empty.status_code == 400
    assert closed == [1, 1]  # both forms, the refused one too
