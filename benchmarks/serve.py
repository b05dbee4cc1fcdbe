"""Load and fault test of `edgekd serve` (issue 23): 1, 4 and 16 concurrent clients posting real test images
(the built-in PneumoniaMNIST mini test split as PNG) with >= 5% malformed uploads mixed in.

    .venv/bin/python benchmarks/serve.py [BUNDLE] [--requests 10000] [--threads 2]

Starts `edgekd serve BUNDLE` on a free localhost port, then per concurrency level sends its share of the requests
from async httpx clients: p50/p90/p99 latency of the good requests, throughput (all requests / wall time), good
requests that failed or got another label than the Runner on the same image, bad uploads not answered 4xx. The
server's RSS at start and end (/proc via psutil), the CPU other processes used meanwhile (cores; the server and this
process subtracted), then SIGTERM and the server's exit status. Writes benchmarks/results/serve.json and the
RESULTS.md section between `<!-- serve:begin -->` / `<!-- serve:end -->` (or only `--out FILE` for a trial run).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from common import (REPO, RESULTS, machine, machine_line, results_doc, run_main,  # noqa: E402
                    write_section)

from edgekd.fileio import write_json  # noqa: E402

MARKERS = ("<!-- serve:begin -->", "<!-- serve:end -->")
NPZ = REPO / "edgekd" / "data" / "builtin" / "pneumoniamnist_mini.npz"
LEVELS = (1, 4, 16)
GOALS = {"throughput_x": 3.0, "p99_over_p50": 10.0, "rss_growth_mb": 50.0, "bad_fraction": 0.05}


def png_bytes(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def bad_uploads(good: bytes) -> list[tuple[str, bytes, str]]:
    """(kind, body, content type) of the malformed uploads mixed into the traffic."""
    from PIL import Image

    huge = io.BytesIO()
    Image.new("1", (10_000, 8_000)).save(huge, format="PNG")  # 80 M pixels in ~10 KB: refused from the header
    bad = [("empty body", b"", "image/png"), ("truncated PNG", good[: len(good) // 2], "image/png"),
           ("huge dimensions", huge.getvalue(), "image/png"), ("wrong content type", good, "text/plain"),
           ("not an image", b"%PDF-1.4\n" + bytes(200), "application/octet-stream")]
    try:
        bad.append(("DICOM without pixel data", dicom_without_pixels(), "application/dicom"))
    except ImportError:
        print("pydicom is not installed: the DICOM case is left out", flush=True)
    return bad


def dicom_without_pixels() -> bytes:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.PatientName = "Bench^NoPixels"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_images(bundle: Path, threads: int, backend: str) -> tuple[list[bytes], list[str], list[int]]:
    """The test split as PNG bytes, the Runner's label for each (same bundle, backend) and the true labels."""
    from edgekd.runtime import Runner

    data = np.load(NPZ)
    images, labels = data["test_images"], data["test_labels"].ravel().astype(int).tolist()
    runner = Runner.from_bundle(bundle, backend=backend, threads=threads)
    expected = [p.label for p in runner.predict_batch(list(images))]
    runner.close()
    return [png_bytes(a) for a in images], expected, labels


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: Path, args) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "edgekd", "serve", str(bundle), "--port", str(port), "--backend", args.backend,
               "--threads", str(args.threads), "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
               "--max-queue", str(args.max_queue)]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"error: the server did not start: {proc.communicate()[1][-2000:]}")


class LevelStats:
    """What one concurrency level measured."""

    def __init__(self):
        self.latencies: list[float] = []
        self.good = self.bad = self.good_failed = self.label_mismatch = self.correct = self.bad_not_4xx = 0
        self.statuses: dict[str, int] = {}


async def one_request(client, i: int, traffic, stats: LevelStats) -> None:
    """Request number i: a malformed upload every `bad_every`-th, else the next test image."""
    images, expected, labels, bad, bad_every = traffic
    is_bad = i % bad_every == bad_every - 1
    if is_bad:
        kind, body, ctype = bad[(i // bad_every) % len(bad)]
    else:
        k = i % len(images)
        body, ctype = images[k], "image/png"
    start = time.perf_counter()
    try:
        r = await client.post("/predict", content=body, headers={"content-type": ctype})
        status, answer = r.status_code, (r.json() if r.status_code == 200 else None)
    except Exception as err:  # a transport error counts as a failed request
        status, answer = type(err).__name__, None
    elapsed = time.perf_counter() - start
    stats.statuses[str(status)] = stats.statuses.get(str(status), 0) + 1
    if is_bad:
        stats.bad += 1
        stats.bad_not_4xx += not (isinstance(status, int) and 400 <= status < 500)
        return
    stats.good += 1
    stats.latencies.append(elapsed)
    if answer is None:
        stats.good_failed += 1
        return
    stats.label_mismatch += answer["label"] != expected[k]
    stats.correct += answer["index"] == labels[k]


async def run_level(base: str, concurrency: int, n: int, offset: int, traffic) -> tuple[LevelStats, float]:
    import httpx

    stats, counter = LevelStats(), iter(range(offset, offset + n))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client_loop(client):
        for i in counter:
            await one_request(client, i, traffic, stats)

    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        return stats, time.perf_counter() - start


def level_record(concurrency: int, stats: LevelStats, seconds: float) -> dict:
    ms = np.asarray(stats.latencies) * 1000
    pct = lambda q: round(float(np.percentile(ms, q)), 3) if len(ms) else None  # noqa: E731
    total = stats.good + stats.bad
    return {"concurrency": concurrency, "requests": total, "good": stats.good, "bad": stats.bad,
            "seconds": round(seconds, 3), "throughput_rps": round(total / seconds, 1),
            "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99), "good_failed": stats.good_failed,
            "label_mismatch_vs_runner": stats.label_mismatch,
            "label_match_rate": round(1 - stats.label_mismatch / max(stats.good - stats.good_failed, 1), 6),
            "accuracy": round(stats.correct / max(stats.good, 1), 4), "bad_not_4xx": stats.bad_not_4xx,
            "statuses": stats.statuses}


class ServerWatch:
    """The server's RSS and CPU time (psutil), the machine's busy CPU (/proc/stat) since construction."""

    def __init__(self, pid: int):
        import psutil

        from edgekd.bench.hardware import OtherCPU

        self.proc, self.other = psutil.Process(pid), OtherCPU
        self.start = (time.monotonic(), OtherCPU.busy_seconds(), OtherCPU.own_seconds(), self.cpu())
        self.rss_start_mb = self.rss_mb()

    def cpu(self) -> float:
        t = self.proc.cpu_times()
        return t.user + t.system

    def rss_mb(self) -> float:
        return self.proc.memory_info().rss / 2**20

    def other_cores(self) -> float | None:
        now = (time.monotonic(), self.other.busy_seconds(), self.other.own_seconds(), self.cpu())
        if self.start[1] is None or now[1] is None:
            return None
        others = (now[1] - self.start[1]) - (now[2] - self.start[2]) - (now[3] - self.start[3])
        return round(max(0.0, others / (now[0] - self.start[0])), 3)


def summary(records: list[dict], rss: tuple[float, float], exit_code: int | None) -> dict:
    by = {r["concurrency"]: r for r in records}
    one, top = by[min(by)], by[max(by)]
    total = sum(r["requests"] for r in records)
    bad = sum(r["bad"] for r in records)
    out = {"requests": total, "bad_fraction": round(bad / total, 4),
           "good_failed": sum(r["good_failed"] for r in records), "bad_not_4xx": sum(r["bad_not_4xx"] for r in records),
           "throughput_x": round(top["throughput_rps"] / one["throughput_rps"], 2),
           "p99_over_p50": round(top["p99_ms"] / one["p50_ms"], 2), "rss_start_mb": round(rss[0], 1),
           "rss_end_mb": round(rss[1], 1), "rss_growth_mb": round(rss[1] - rss[0], 1), "server_exit": exit_code}
    out["goals"] = {"throughput_x": out["throughput_x"] >= GOALS["throughput_x"],
                    "p99_over_p50": out["p99_over_p50"] <= GOALS["p99_over_p50"],
                    "no_failed_good": out["good_failed"] == 0 and out["bad_not_4xx"] == 0,
                    "requests": total >= 10_000 and out["bad_fraction"] >= GOALS["bad_fraction"],
                    "rss": abs(out["rss_growth_mb"]) <= GOALS["rss_growth_mb"], "clean_exit": exit_code == 0}
    return out


def section(doc: dict) -> str:
    """The RESULTS.md section from a serve.json document."""
    s, st = doc["summary"], doc["settings"]
    lines = [MARKERS[0], "## `edgekd serve` under load (`benchmarks/serve.py`)", "",
             f"`{doc['command']}` — {doc['date'][:16]}Z, {machine_line(doc['machine'])}; other processes used "
             f"{doc['other_cpu_cores']} cores meanwhile. Bundle `{doc['bundle']}` on {st['backend']}, {st['threads']} "
             f"threads, max batch {st['max_batch']}, max wait {st['max_wait_ms']} ms; clients: async httpx in one "
             f"process; {s['bad_fraction']:.0%} malformed uploads mixed in ({', '.join(doc['bad_kinds'])}).", "",
             "| clients | requests | req/s | p50 ms | p90 ms | p99 ms | good failed | label ≠ Runner | bad not 4xx "
             "| accuracy |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in doc["records"]:
        lines.append(f"| {r['concurrency']} | {r['requests']} | {r['throughput_rps']:.0f} | {r['p50_ms']:.2f} | "
                     f"{r['p90_ms']:.2f} | {r['p99_ms']:.2f} | {r['good_failed']} | {r['label_mismatch_vs_runner']} | "
                     f"{r['bad_not_4xx']} | {r['accuracy']:.4f} |")
    g = s["goals"]
    mark = lambda ok: "met" if ok else "MISSED"  # noqa: E731
    lines += ["", f"Throughput at {doc['records'][-1]['concurrency']} clients {s['throughput_x']}x one client "
              f"(goal >= {GOALS['throughput_x']:g}x: {mark(g['throughput_x'])}); p99 there {s['p99_over_p50']}x the "
              f"single-client p50 (goal <= {GOALS['p99_over_p50']:g}x: {mark(g['p99_over_p50'])}); {s['requests']} "
              f"requests, {s['good_failed']} good failed, {s['bad_not_4xx']} bad not 4xx ({mark(g['no_failed_good'])}, "
              f"size {mark(g['requests'])}); server RSS {s['rss_start_mb']} -> {s['rss_end_mb']} MB "
              f"({mark(g['rss'])}); exit after SIGTERM: {s['server_exit']} ({mark(g['clean_exit'])}).", "", MARKERS[1]]
    return "\n".join(lines)


def measure(args, traffic) -> tuple[list[dict], tuple[float, float], float | None, int | None]:
    proc, base = start_server(args.bundle, args)
    try:
        asyncio.run(run_level(base, 4, 64, 0, traffic))  # warm the connections and the server's code paths
        watch = ServerWatch(proc.pid)
        records, offset = [], 0
        for i, concurrency in enumerate(LEVELS):  # --requests in all: the first levels take the remainder
            share = args.requests // len(LEVELS) + (i < args.requests % len(LEVELS))
            stats, seconds = asyncio.run(run_level(base, concurrency, share, offset, traffic))
            offset += share
            records.append(level_record(concurrency, stats, seconds))
            print(f"{concurrency:>2} clients: {records[-1]}", flush=True)
        rss, other = (watch.rss_start_mb, watch.rss_mb()), watch.other_cores()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return records, rss, other, code


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", nargs="?", type=Path, default=REPO / "runs" / "demo" / "student" / "bundle",
                    help="the bundle to serve (default: make demo's)")
    ap.add_argument("--requests", type=int, default=10_000, help="total over the three concurrency levels")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", default="openvino")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--max-queue", type=int, default=64)
    ap.add_argument("--bad-every", type=int, default=20, help="every Nth request is malformed (20: 5%%)")
    ap.add_argument("--out", type=Path, default=None, help="write only this file (a trial run; RESULTS.md untouched)")
    args = ap.parse_args(argv)
    if not args.bundle.exists():
        print(f"error: {args.bundle}: no bundle (run `make demo` first, or pass a bundle)", file=sys.stderr)
        return 2
    images, expected, labels = test_images(args.bundle, args.threads, args.backend)
    bad = bad_uploads(images[0])
    records, rss, other, code = measure(args, (images, expected, labels, bad, args.bad_every))
    import onnxruntime
    import openvino

    doc = results_doc("serve", shlex.join([".venv/bin/python", "benchmarks/serve.py", *argv]), records,
                      host=machine(onnxruntime=onnxruntime.__version__, openvino=openvino.get_version()),
                      bundle=str(args.bundle), settings={k: getattr(args, k) for k in
                      ("backend", "threads", "max_batch", "max_wait_ms", "max_queue", "bad_every")},
                      bad_kinds=[k for k, _, _ in bad], other_cpu_cores=other, summary=summary(records, rss, code))
    print(f"summary: {doc['summary']}", flush=True)
    if args.out is not None:
        write_json(args.out, doc)
        print(f"wrote {args.out}")
        return 0
    write_json(RESULTS / "serve.json", doc)
    write_section(section(doc), *MARKERS)
    print(f"wrote {RESULTS / 'serve.json'} and the RESULTS.md section")
    return 0


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
