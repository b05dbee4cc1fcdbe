"""edgekd.bench: latency statistics, record schema, GEMM-peak arithmetic, n/a rows, a tiny end-to-end `edgekd bench`."""

from __future__ import annotations

import json
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import random_pixels, write_image_folder
from edgekd.bench.hardware import gemm_peak_fraction, measure_gemm_peak
from edgekd.bench.report import records_markdown
from edgekd.bench.run import (RECORD_KEYS, BenchConfig, Row, Subject, Timing, eval_subset, make_records,
                              plan_rows, run_bench, run_worker)
from edgekd.cli import app
from edgekd.errors import EdgeKDError
from edgekd.options import int_list, parse_batches, parse_list, split_list
from edgekd.runtime.timing import latency_stats

PREPROCESS = {"input_size": [3, 16, 16], "resize": 16, "center_crop": 16, "channels": 3, "scale": 1 / 255,
              "mean": [0.5] * 3, "std": [0.5] * 3}


def test_percentiles_on_a_skewed_sample():
    # 99 fast calls and one 100 ms stall: the median ignores the stall, p99 interpolates towards it.
    stats = latency_stats([1.0] * 99 + [100.0])
    assert stats["p50_ms"] == 1.0 and stats["p90_ms"] == 1.0
    assert stats["p99_ms"] == pytest.approx(1.0 + 0.01 * 99.0)  # numpy linear: 0.01 of the way from 1 to 100
    assert stats["mean_ms"] == pytest.approx(1.99)
    odd = latency_stats([5.0, 1.0, 3.0, 2.0, 4.0])
    assert odd["p50_ms"] == 3.0 and odd["p90_ms"] == pytest.approx(4.6) and odd["min_ms"] == 1.0


def test_gemm_peak_fraction_arithmetic():
    # 1 GMAC per image = 2 GFLOP; 5 images/s = 10 GFLOP/s; of a 40 GFLOP/s peak: 25 %.
    assert gemm_peak_fraction(1e9, 5.0, 40.0) == pytest.approx(0.25)
    assert gemm_peak_fraction(1e9, 5.0, 40.0, views=6) == pytest.approx(1.5)  # TTA: 6 forward passes per image
    assert gemm_peak_fraction(None, 5.0, 40.0) is None and gemm_peak_fraction(1e9, 5.0, None) is None


def test_gemm_peak_is_the_best_median_rate():
    gemm = measure_gemm_peak(threads=1, sizes=(32, 64), min_seconds=0.01, libraries=("numpy",))
    assert [r["n"] for r in gemm["all"]] == [32, 64]
    assert gemm["peak_gflops"] == max(r["gflops_p50"] for r in gemm["all"]) > 0
    assert all(r["gflops_best"] >= r["gflops_p50"] for r in gemm["all"])
    assert gemm["peak_gflops_best_call"] >= gemm["peak_gflops"]


def _subject(**kw) -> Subject:
    return Subject(role="student", name="edgekd_cnn_tiny", preprocess=PREPROCESS, class_names=["a", "b"],
                   params=1000, macs=2_000_000, **kw)


def test_records_have_the_schema_throughput_and_peak_fraction():
    subject = _subject(labels=np.array([0, 1, 1, 0]))
    timings = {str(b): {"p50_ms": p50, "p90_ms": p50 * 2, "p99_ms": p50 * 3, "mean_ms": p50, "min_ms": p50 / 2,
                        "runs": 10, "first_ms": 30 * p50} for b, p50 in ((1, 2.0), (8, 4.0))}
    result = {"timings": timings, "peak_rss_mb": 80.0, "load_s": 0.1}
    records = make_records(Row(subject, "onnx", "fp32", "bare"), result, [1, 8], threads=2, tta=False,
                           peak_gflops=10.0)
    assert [tuple(r) for r in records] == [RECORD_KEYS] * 2
    one, eight = records
    assert one["throughput"] == pytest.approx(500.0) and eight["throughput"] == pytest.approx(2000.0)
    # 2 MMACs x 2 x 2000 images/s = 8 GFLOP/s of 10
    assert eight["gemm_peak_fraction"] == pytest.approx(0.8)
    assert eight["status"] == "ok" and eight["reason"] is None and eight["p99_ms"] == 12.0
    assert (one["first_call_ms"], eight["first_call_ms"]) == (60.0, 120.0)  # per batch: a shape's first call
    json.dumps(records)  # plain JSON types only

    missing = make_records(Row(subject, "openvino", "int8", "bare"), "export parity gate: acc drop", [1, 8], 2, False, 10.0)
    assert all(r["status"] == "n/a" and r["reason"] == "export parity gate: acc drop" and r["p50_ms"] is None
               for r in missing)
    md = records_markdown(records + missing)
    assert "| edgekd_cnn_tiny | student | onnx | fp32 | bare | 8 | 4.000 |" in md
    assert "above 100% of the GEMM peak" not in md
    fast = make_records(Row(subject, "onnx", "fp32", "bare"), result, [1, 8], 2, False, peak_gflops=5.0)
    assert "1 FP32/FP16 row(s) above 100%" in records_markdown(fast)  # 8 GFLOP/s of a 5 GFLOP/s "peak"
    int8 = make_records(Row(subject, "onnx", "int8", "bare"), result, [1, 8], 2, False, peak_gflops=5.0)
    assert "above 100%" not in records_markdown(int8)  # integer kernels may pass the FP32 peak
    assert "n/a: student openvino int8 bare: export parity gate: acc drop" in md


def test_runner_rows_score_the_label_the_runner_gives(tmp_path):
    """A runner row's ACC counts the runner's own labels (the bundle's operating point, e.g. a threshold), not the
    argmax of its probabilities; AUC is from the probabilities either way."""
    subject = _subject(labels=np.array([0, 1, 1, 0]))
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.7, 0.3], [0.8, 0.2]])  # argmax: 3 of 4 right
    np.save(tmp_path / "p.npy", probs)
    np.save(tmp_path / "y.npy", np.array([0, 1, 1, 1]))  # a low threshold: image 2 right, image 3 wrong
    timings = {"1": {"p50_ms": 1.0, "p90_ms": 1.0, "p99_ms": 1.0, "mean_ms": 1.0, "min_ms": 1.0, "runs": 3}}
    base = {"timings": timings, "probs": str(tmp_path / "p.npy")}
    bare = make_records(Row(subject, "onnx", "fp32", "bare"), base, [1], 1, False, None)[0]
    runner = make_records(Row(subject, "onnx", "fp32", "runner"), {**base, "labels": str(tmp_path / "y.npy")},
                          [1], 1, False, None)[0]
    assert bare["acc"] == 0.75 and runner["acc"] == 0.75 and bare["auc"] == runner["auc"] == 1.0  # ranks unchanged
    np.save(tmp_path / "y.npy", np.array([0, 1, 1, 0]))
    runner = make_records(Row(subject, "onnx", "fp32", "runner"), {**base, "labels": str(tmp_path / "y.npy")},
                          [1], 1, False, None)[0]
    assert runner["acc"] == 1.0 and bare["acc"] == 0.75


def test_eval_subset_keeps_every_class_and_is_seeded():
    labels = np.array([0] * 200 + [1] * 150 + [2] * 40 + [3] * 8 + [4] * 2)  # RetinaMNIST-like: a rare grade
    for n in (5, 6, 8, 40):
        picked = eval_subset(labels, n)
        assert len(picked) == n == len(set(picked)) and set(labels[picked]) == {0, 1, 2, 3, 4}
        assert (picked == eval_subset(labels, n)).all() and (np.diff(picked) > 0).all()
    counts = np.bincount(labels[eval_subset(labels, 100)], minlength=5)
    assert counts.sum() == 100 and abs(counts[0] - 50) <= 2 and abs(counts[1] - 37) <= 2  # the class mix
    assert len(eval_subset(labels, 3)) == 3  # fewer than the classes: still exactly n
    assert (eval_subset(labels, 1000) == np.arange(len(labels))).all()
    assert not (eval_subset(labels, 40, seed=1) == eval_subset(labels, 40)).all()


def test_plan_rows_and_option_parsing():
    rows = plan_rows(_subject(), ["torch", "openvino"], ["fp32", "int8"],
                     {"torch": ("eager", "compile"), "openvino": ("bare",)})
    assert [(r.format, r.precision, r.variant) for r in rows] == [
        ("torch", "fp32", "eager"), ("torch", "fp32", "compile"), ("openvino", "fp32", "bare"),
        ("openvino", "int8", "bare")]  # no torch int8: lower precisions come from the exports
    assert parse_batches("32,1,8,1") == [1, 8, 32]
    assert split_list(" onnx, ,torch ") == ["onnx", "torch"] and split_list("") is None and split_list(None) is None
    assert int_list("1, 3,5", "--severities") == [1, 3, 5] and int_list(None, "--severities") is None
    with pytest.raises(EdgeKDError, match="--severities: expected comma-separated integers, got '1,x'"):
        int_list("1,x", "--severities")
    with pytest.raises(EdgeKDError, match="--batch: expected comma-separated integers"):
        parse_batches("1,x")
    assert parse_list("onnx, torch", ("torch", "onnx"), "--formats") == ["onnx", "torch"]
    with pytest.raises(EdgeKDError, match="--formats: unknown value 'tpu'"):
        parse_list("tpu", ("torch", "onnx"), "--formats")
    with pytest.raises(EdgeKDError, match="--batch"):
        parse_batches("0,8")


def test_a_failing_worker_is_reported_not_raised(tmp_path):
    images = tmp_path / "x.npy"
    np.save(images, np.zeros((2, 16, 16, 3), dtype=np.uint8))
    job = {"kind": "onnx", "variant": "bare", "precision": "fp32", "threads": 1, "batches": [1], "views": None,
           "preprocess": PREPROCESS, "images": str(images), "model_path": str(tmp_path / "missing.onnx"),
           "timing": {"warmup": 0, "min_runs": 1, "min_seconds": 0}}
    result = run_worker(job, tmp_path, timeout=120)
    assert "missing.onnx" in result["error"]
    records = make_records(Row(_subject(), "onnx", "fp32", "bare"), result, [1], 1, False, None)
    assert records[0]["status"] == "n/a" and "missing.onnx" in records[0]["reason"]


@pytest.mark.slow
def test_bench_end_to_end_on_a_tiny_checkpoint(tmp_path, tiny_recipe_dict):
    """train (tiny, 16 px) -> `edgekd bench` exports, times torch/ONNX/OpenVINO in fresh processes, scores the test set."""
    from edgekd.recipe import recipe_from_dict
    from edgekd.train.run import train_recipe

    ckpt = train_recipe(recipe_from_dict(tiny_recipe_dict), tmp_path / "run", log=lambda *_: None).best_path
    out = tmp_path / "bench"
    res = CliRunner().invoke(app, ["bench", str(ckpt), "--formats", "torch,onnx,openvino", "--precision", "fp32",
                                   "--batch", "1,4", "--threads", "1", "--seconds", "0", "--min-runs", "3",
                                   "--warmup", "1", "--no-compile", "--parity-images", "8", "--keep-work",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "bench.json").read_text())
    records = summary["records"]
    assert {(r["format"], r["variant"]) for r in records} == {
        ("torch", "eager"), ("onnx", "bare"), ("onnx", "runner"), ("openvino", "bare"), ("openvino", "runner")}
    assert all(tuple(r) == RECORD_KEYS and r["status"] == "ok" for r in records), [r["reason"] for r in records]
    assert {r["batch"] for r in records} == {1, 4} and all(r["threads"] == 1 for r in records)
    for r in records:
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert r["throughput"] == pytest.approx(1000 * r["batch"] / r["p50_ms"])
        assert r["gemm_peak_fraction"] == pytest.approx(
            2 * r["macs"] * r["throughput"] / (summary["gemm"]["peak_gflops"] * 1e9))
    # FP32 exports pass a 1e-4 parity gate: every format scores the 16 test images alike.
    assert len({round(r["acc"], 6) for r in records}) == 1 and 0 <= records[0]["acc"] <= 1
    rss = {r["format"]: r["peak_rss_mb"] for r in records}
    assert rss["onnx"] < rss["torch"] and rss["openvino"] < rss["torch"]
    # The torch row's size is its weights (FP32: 4 bytes a parameter, plus buffers), not the checkpoint file
    torch_row = next(r for r in records if r["format"] == "torch")
    assert 4 * torch_row["params"] / 2**20 <= torch_row["size_mb"] < ckpt.stat().st_size / 2**20
    workers = [json.loads(p.read_text()) for p in (out / "work").glob("job-*-result.json")]
    assert {w["kind"] for w in workers} == {"gemm", "torch", "onnx", "openvino"}
    assert not any(w["torch_loaded"] for w in workers if w["kind"] in ("onnx", "openvino"))  # torch-free rows
    assert (out / "bench.md").read_text().count("| edgekd_cnn_tiny |") == len(records)
    assert (out / "bench.png").stat().st_size > 0
    assert summary["versions"]["edgekd"] and summary["versions"]["onnxruntime"] and summary["versions"]["torch"]
    (bundle,) = out.glob("bundle-*")  # exported into the out dir

    # The export is reused by a bench with the same export settings only (other settings: another export).
    from edgekd.bench.run import _export

    logs: list[str] = []
    _export(ckpt, bundle, [("onnx", "fp32")], 1, 8, None, [], logs.append)  # the bench's own: 1 thread, 8 images
    assert logs[0].startswith("reusing the export")
    _export(ckpt, bundle, [("onnx", "fp32")], 1, 6, None, [], logs.append)
    assert logs[1].startswith("exporting")
    # Other weights under the same path, copied with an older mtime (cp -p, rsync -t, a restore): not reused.
    import os
    import shutil

    import torch

    from edgekd.bench.run import bundle_reusable

    meta = json.loads((bundle / "edgekd.json").read_text())
    kept = tmp_path / "kept.pt"
    shutil.copy2(ckpt, kept)
    payload = torch.load(ckpt, map_location="cpu", weights_only=True)
    first = next(k for k, v in payload["state_dict"].items() if v.is_floating_point())
    payload["state_dict"][first] = payload["state_dict"][first] + 0.1
    torch.save(payload, tmp_path / "other.pt")
    shutil.copy2(tmp_path / "other.pt", ckpt)
    os.utime(ckpt, (1, 1))  # older than the bundle
    assert meta["export_profile_digest"]
    assert not bundle_reusable(bundle, ckpt, [("onnx", "fp32")], meta["export_profile_digest"])
    shutil.copy2(kept, ckpt)
    assert bundle_reusable(bundle, ckpt, [("onnx", "fp32")], meta["export_profile_digest"])

    # The bundle alone: no checkpoint -> torch rows are n/a with the reason; no data -> random images, no accuracy.
    quick = Timing(warmup=0, min_runs=2, min_seconds=0)
    bundle_only = run_bench(BenchConfig(bundle, tmp_path / "b2", formats="torch,onnx", precisions="fp32", batches="1",
                                        gemm=False, timing=quick, variants={"torch": ("eager",), "onnx": ("bare",)}),
                            log=lambda *_: None)
    assert bundle_only.records[0]["status"] == "n/a" and "--checkpoint" in bundle_only.records[0]["reason"]
    assert bundle_only.records[1]["status"] == "ok"
    assert not (tmp_path / "b2" / "work").exists()  # without keep_work: only bench.json/.md/.png stay
    # ... and the command says why its accuracy cells are empty (the note had been in bench.json only)
    res = CliRunner().invoke(app, ["bench", str(bundle), "--formats", "onnx", "--precision", "fp32", "--batch", "1",
                                   "--threads", "1", "--seconds", "0", "--min-runs", "2", "--warmup", "0",
                                   "--out", str(tmp_path / "b2cli")])
    assert res.exit_code == 0, res.output
    assert "no test data (give --data DIR, a labelled folder, a recipe, or a checkpoint): timed on random images, no accuracy" in \
        " ".join(res.output.split())
    # the checkpoint the bundle's edgekd.json names is said (the note had only said "pass --checkpoint")
    assert f"its edgekd.json names the checkpoint it was exported from, {ckpt.resolve()}: --checkpoint with it" in \
        " ".join(res.output.split())
    # Every row n/a: an error, and nothing written (it had claimed a chart it never drew).
    with pytest.raises(EdgeKDError, match="no row could run .*--checkpoint"):
        run_bench(BenchConfig(bundle, tmp_path / "b7", formats="torch", precisions="fp32", batches="1", gemm=False),
                  log=lambda *_: None)
    assert not (tmp_path / "b7").exists()
    with pytest.raises(EdgeKDError, match="no format offers these precisions"):  # no row planned at all
        run_bench(BenchConfig(bundle, tmp_path / "b8", formats="torch", precisions="int8", batches="1", gemm=False),
                  log=lambda *_: None)
    # A zipped bundle: its extracted copy lives through the rows (the bare rows read its files).
    from edgekd.export.bundle import write_zip

    zipped = write_zip(bundle, tmp_path / "bundle.zip")
    from_zip = run_bench(BenchConfig(zipped, tmp_path / "bz", formats="onnx", precisions="fp32", batches="1",
                                     gemm=False, timing=quick), log=lambda *_: None)  # the bundle: ONNX only by now
    assert [(r["variant"], r["status"]) for r in from_zip.records] == [("bare", "ok"), ("runner", "ok")], \
        [r["reason"] for r in from_zip.records]
    (tmp_path / "b5" / "work").mkdir(parents=True)  # a work/ the run did not make is left alone
    (tmp_path / "b5" / "work" / "mine.txt").write_text("keep")
    from edgekd.bench.hardware import OtherCPU

    said: list[str] = []
    with mock.patch.object(OtherCPU, "cores", lambda self: 0.97):  # another job on the machine during the run
        run_bench(BenchConfig(bundle, tmp_path / "b5", formats="onnx", precisions="fp32", batches="1", gemm=False,
                              timing=quick, variants={"onnx": ("bare",)}), log=said.append)
    assert (tmp_path / "b5" / "work" / "mine.txt").read_text() == "keep"
    assert any(line.startswith("warning: other processes used 0.97 cores") for line in said), said
    assert any("no accuracy" in n for n in bundle_only.summary["subjects"][0]["notes"])

    # A bundle the runtime refuses (edgekd.json edited after export, manifest re-hashed) is an error, not an n/a
    # runner row beside a timed bare row of its model (it had exited 0).
    from edgekd.export.bundle import write_manifest

    edited = tmp_path / "edited"
    shutil.copytree(bundle, edited)
    meta = json.loads((edited / "edgekd.json").read_text())
    meta["preprocess"]["mean"] = [0.2] * len(meta["preprocess"]["mean"])
    (edited / "edgekd.json").write_text(json.dumps(meta))
    write_manifest(edited)
    with pytest.raises(EdgeKDError, match="edgekd.json preprocess.mean is .* the model file was exported with"):
        run_bench(BenchConfig(edited, tmp_path / "b7", formats="onnx", precisions="fp32", batches="1", gemm=False,
                              timing=quick), log=lambda *_: None)
    assert not (tmp_path / "b7").exists()

    # An unreadable teacher is refused before the model is exported (nothing written).
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(EdgeKDError, match="empty.pt"):
        run_bench(BenchConfig(ckpt, tmp_path / "b4", formats="onnx", precisions="fp32", batches="1", gemm=False,
                              teacher=tmp_path / "empty.pt"), log=lambda *_: None)
    assert not (tmp_path / "b4").exists()
    # A --data folder without images fails after the checks: the output folder it made is removed again.
    (tmp_path / "noimg").mkdir()
    with pytest.raises(EdgeKDError):
        run_bench(BenchConfig(bundle, tmp_path / "b3", formats="onnx", precisions="fp32", batches="1", gemm=False,
                              data_folder=tmp_path / "noimg"), log=lambda *_: None)
    assert not (tmp_path / "b3").exists()
    # Into an --out that was there: the bundle this run exported goes, one from an earlier run stays.
    (tmp_path / "b6" / "bundle-old").mkdir(parents=True)
    with pytest.raises(EdgeKDError):
        run_bench(BenchConfig(ckpt, tmp_path / "b6", formats="onnx", precisions="fp32", batches="1", gemm=False,
                              export_options={"parity_images": 8}, data_folder=tmp_path / "noimg"), log=lambda *_: None)
    assert sorted(p.name for p in (tmp_path / "b6").iterdir()) == ["bundle-old"]


@pytest.mark.parametrize("args, message", [(["nope.pt"], "no such checkpoint or bundle"),
                                           ([".", "--batch", "0"], "--batch: batch sizes must be in [1, 1024]"),
                                           ([".", "--batch", "8,100000"], "--batch: batch sizes must be in [1, "
                                                                          "1024], got '8,100000'"),  # filled memory
                                           ([".", "--threads", "2000"], "--threads must be in [1, 1024], got 2000"),
                                           ([".", "--formats", "tflite"], "--formats: unknown value 'tflite'"),
                                           ([".", "-f", "tflite", "-p", "FP32"], "--formats: unknown value 'tflite'"),
                                           ([".", "--batch", "1,,8"], "--batch '1,,8': a blank item in the comma"),
                                           ([".", "--formats", ",onnx"], "--formats ',onnx': a blank item"),
                                           (["b", "--data", "nodir"], "--data nodir: no such file or folder (a data "
                                                                      "recipe, or a labelled image folder)"),
                                           (["adir"], "a folder that is not an edgekd bundle"),
                                           (["empty.pt"], "empty.pt"),
                                           (["b", "--eval-limit", "5"], "--eval-limit: b is a bundle, which holds "
                                                                        "no test images")])  # it was ignored
def test_bad_options_are_one_line_errors(tmp_path, args, message):
    (tmp_path / "adir").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "edgekd.json").write_text("{}")  # what marks a bundle folder (open_bundle checks the rest)
    (tmp_path / "empty.pt").write_bytes(b"")
    proc = subprocess.run([sys.executable, "-m", "edgekd", "bench", *args, "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_other_cpu_subtracts_own_cpu_time(monkeypatch):
    """Machine busy time minus this process tree's CPU time, per wall second: own work is not 'other load'."""
    import time

    from edgekd.bench.hardware import OtherCPU

    clock = iter([100.0, 102.0])
    busy = iter([50.0, 53.0])   # the machine was busy 3 CPU-seconds in 2 s ...
    own = iter([10.0, 12.5])    # ... 2.5 of them ours (self + children)
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(OtherCPU, "busy_seconds", staticmethod(lambda: next(busy)))
    monkeypatch.setattr(OtherCPU, "own_seconds", staticmethod(lambda: next(own)))
    assert OtherCPU().cores() == pytest.approx(0.25)

    busy, own, clock = iter([50.0, 51.0]), iter([10.0, 12.0]), iter([100.0, 101.0])  # rounding: never negative
    assert OtherCPU().cores() == 0.0
    monkeypatch.setattr(OtherCPU, "busy_seconds", staticmethod(lambda: None))  # no /proc/stat
    assert OtherCPU().cores() is None


def test_other_cpu_reads_this_machine():
    """Real /proc/stat and getrusage: a child burning CPU counts as other load until it is waited for; once reaped,
    getrusage(RUSAGE_CHILDREN) holds its time and it is this process tree's own (subtracted)."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    from edgekd.bench.hardware import OtherCPU

    before = OtherCPU.own_seconds()
    end = time.process_time() + 0.05
    while time.process_time() < end:
        pass
    assert OtherCPU.own_seconds() >= before + 0.04
    meter = OtherCPU()
    if meter.start is None:
        pytest.skip("no /proc/stat on this platform")
    burn = "import time\nwhile time.process_time() < 0.3:\n    pass\nprint(time.process_time(), flush=True)"
    child = subprocess.Popen([sys.executable, "-c", burn], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        burned = float(child.stdout.read())  # end of output: the child is done but not reaped yet
        unreaped = meter.cores() * (time.monotonic() - meter.start[0])
    finally:
        child.stdout.close()
        child.wait()
    reaped = meter.cores() * (time.monotonic() - meter.start[0])
    assert burned >= 0.3
    # Other load on the machine only adds to the first reading, so a lower bound holds however busy it is; the
    # half-margins absorb /proc/stat's clock ticks and the few ms between the readings.
    assert unreaped >= 0.5 * burned, (unreaped, burned)
    assert unreaped - reaped >= 0.5 * burned, (unreaped, reaped, burned)
    cpus = sum(line.startswith("cpu") and line[3:4].isdigit() for line in Path("/proc/stat").read_text().splitlines())
    assert 0.0 <= meter.cores() <= cpus + 0.5  # cores, not clock ticks


def test_bench_images_give_bare_and_runner_the_same_pixels():
    """Benchmark images are stored at the resize stage: the bare rows (cropped by ModelInputs) equal the
    runtime's preprocessing of the original image, and the runner's own resize + crop of them is a no-op resize
    and the same crop -- for a model whose eval resize (20) is larger than its crop (16)."""
    import numpy as np

    from edgekd.bench.worker import ModelInputs
    from edgekd.data import preprocess_spec
    from edgekd.recipe import DataConfig
    from edgekd.runtime import Preprocessor

    spec = preprocess_spec(DataConfig(image_size=16, resize=20, channels=3, mean=[0.4, 0.5, 0.6], std=[0.2, 0.3, 0.25]))
    pre = Preprocessor(spec)
    raw = [random_pixels((28, 28, 3), i) for i in range(3)]
    stored = np.stack([pre.to_resize_size(a) for a in raw])
    assert stored.shape == (3, 20, 20, 3)
    expected = np.stack([pre(a) for a in raw])
    np.testing.assert_array_equal(ModelInputs({"preprocess": spec}).rows(stored), expected)
    np.testing.assert_array_equal(np.stack([pre(a) for a in stored]), expected)  # the runner's path
    # the old way (model-size images re-preprocessed by the runner) would zoom them again:
    model_size = np.stack([pre.to_model_size(a) for a in raw])
    assert np.abs(np.stack([pre(a) for a in model_size]) - expected).max() > 0.1


def test_a_stop_during_the_export_into_an_out_that_was_there_removes_this_runs_work(tmp_path, monkeypatch):
    """The stop signal's handler removes the tracked folders before the process ends: the out folder when this
    run made it, else the work/ it made inside an out that was there (it was left behind)."""
    import edgekd.bench.run as bench_run
    from edgekd.fileio import TRACKED_TREES

    seen = []

    def stopped(cfg, work, log):
        seen.append(set(TRACKED_TREES))
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_run, "_subjects", stopped)
    monkeypatch.setattr(bench_run, "check_source", lambda path: None)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("an earlier run's")
    with pytest.raises(KeyboardInterrupt):
        bench_run.run_bench(BenchConfig(source=tmp_path / "model.pt", out=tmp_path / "out"), log=lambda *_: None)
    assert seen == [{tmp_path / "out" / "work"}]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep.txt"]
    with pytest.raises(KeyboardInterrupt):
        bench_run.run_bench(BenchConfig(source=tmp_path / "model.pt", out=tmp_path / "new"), log=lambda *_: None)
    assert seen[-1] == {tmp_path / "new"} and not (tmp_path / "new").exists() and not TRACKED_TREES


def test_a_gemm_peak_that_moved_during_the_run_is_flagged_and_first_calls_get_a_column():
    """Four runs within 15 minutes printed GEMM peaks of 143-343 GFLOP/s unqualified (one run: 270 before, 11 after);
    and a bench that records first calls shows them, while results recorded before the key existed do not."""
    from edgekd.bench.report import gemm_spread_note, records_markdown

    steady = {"peak_gflops": 300.0, "other_measurement": {"peak_gflops": 250.0}}
    moved = {"peak_gflops": 270.0, "other_measurement": {"peak_gflops": 11.0}}
    assert gemm_spread_note(steady) == "" and gemm_spread_note({"peak_gflops": 300.0}) == ""
    assert gemm_spread_note(moved).startswith(" (measured again: 11.0 GFLOP/s; the machine's speed changed")
    old = {"model": "m", "status": "ok", "p50_ms": 1.0}
    assert "1st call ms" not in records_markdown([old])
    table = records_markdown([old, {**old, "first_call_ms": 38.25}])
    assert "| 1st call ms |" in table and "| 38.2 |" in table


def test_two_bundles_in_one_folder_get_their_own_default_bench_folder(tmp_path, monkeypatch):
    """Without --out, two bundles in runs/ both wrote runs/bench/, the second replacing the first without a word."""
    from edgekd.bench.run import default_bench_out

    (tmp_path / "b1").mkdir()
    (tmp_path / "b3.zip").write_bytes(b"PK")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "best.pt").write_bytes(b"")
    assert default_bench_out(tmp_path / "b1") == tmp_path / "b1-bench"
    assert default_bench_out(tmp_path / "b3.zip") == tmp_path / "b3-bench"
    assert default_bench_out(tmp_path / "run" / "best.pt") == tmp_path / "run" / "bench"
    # `bench .` from inside the bundle: it had built "-bench" (the empty name of ".")
    monkeypatch.chdir(tmp_path / "b1")
    assert default_bench_out(".") == tmp_path / "b1-bench" and default_bench_out("..") == tmp_path.parent / (
        tmp_path.name + "-bench")


def test_torch_rows_run_the_model_in_the_form_its_bundle_was_exported(tmp_path, monkeypatch):
    """A bundle exported with `fuse: false` had been timed against a fused PyTorch model."""
    from types import SimpleNamespace

    import edgekd.models
    import edgekd.runtime
    from edgekd.bench import run as bench_run
    from edgekd.bench.worker import torch_model

    fused: list[bool] = []
    monkeypatch.setattr(edgekd.models, "deploy_form", lambda m: (fused.append(True), (m, 1))[1])
    monkeypatch.setattr("edgekd.train.checkpoint.model_from_checkpoint",
                        lambda path: (__import__("torch").nn.Identity(), {}))
    torch_model("ckpt.pt", 1, compile_=False, fuse=False)
    torch_model("ckpt.pt", 1, compile_=False)
    assert fused == [True]

    def bundle_with(settings):
        return SimpleNamespace(meta={"artifacts": [], "export_profile_settings": settings}, root=tmp_path,
                               tta={"views": ["original"]})

    for settings, expected in (({"fuse": False}, False), ({"fuse": True}, True), (None, True)):
        monkeypatch.setattr(edgekd.runtime, "open_bundle", lambda path, s=settings: bundle_with(s))
        subject = Subject(role="student", name="s", preprocess={}, class_names=["a", "b"])
        bench_run._add_bundle_artifacts(subject, tmp_path)
        assert subject.fuse is expected


def test_an_undefined_auc_is_a_dash_in_the_tables_not_nan():
    """bench's warning says an undefined AUC is shown as '-'; the terminal table and bench.md printed 'nan'."""
    from edgekd.bench.report import cell

    assert cell({"auc": float("nan")}, "auc", "{:.4f}") == "-"
    assert cell({"auc": 0.91234}, "auc", "{:.4f}") == "0.9123"
    assert cell({"status": "error"}, "p50_ms", "{:.3f}") == "n/a"


def test_bench_rows_remove_hair_once_as_the_runtime_does():
    """The bench stores each test image hair-removed at its decoded size (`to_resize_size`); its bare rows and the
    runner then ran hair removal again on the resized copy, so a hair-removal model was scored on other pixels."""
    pytest.importorskip("cv2")
    from edgekd.bench.worker import ModelInputs
    from edgekd.data.transforms import preprocess_spec
    from edgekd.recipe import recipe_from_dict
    from edgekd.runtime import Preprocessor

    pre = preprocess_spec(recipe_from_dict({"data": {"image_size": 40, "resize": 48, "hair_removal": True}}).data)
    rng = np.random.default_rng(0)
    raw = rng.integers(150, 200, size=(96, 96, 3), dtype=np.uint8)
    raw[:, ::9] = 20  # dark hair-like lines, 1 px wide
    raw[30:60, 30:60] = (90, 60, 50)  # a lesion
    stored = Preprocessor(pre).to_resize_size(raw)
    rows = ModelInputs({"preprocess": pre}).rows(stored[None])
    assert np.allclose(rows[0], Preprocessor(pre)(raw), atol=1e-6)  # the runtime on the decoded image


def test_threads_above_the_cores_are_timed_at_the_cores_and_said(tmp_path):
    """--threads 100000 measured its GEMM peak and first row for minutes; predict caps it at the cores."""
    from edgekd.bench.run import _resolved
    from edgekd.runtime import cap_to_cores

    said: list[str] = []
    cores = cap_to_cores(1024)
    cfg = _resolved(BenchConfig(tmp_path / "m.pt", tmp_path / "o", threads=cores + 1), said.append)
    assert cfg.threads == cores and said == [f"warning: --threads {cores + 1} is more than the {cores} cores this "
                                             f"process may use: timed at {cores}"]
    assert _resolved(BenchConfig(tmp_path / "m.pt", tmp_path / "o", threads=cores), said.append).threads == cores
    assert len(said) == 1


def test_an_eval_limit_below_the_class_count_says_which_classes_it_lost():
    """--eval-limit 3 on five grades scored 3 grades without a word (AUC '-'); --eval-limit 1 gave acc 1.0."""
    from edgekd.bench.run import eval_subset, warn_of_classes_the_subset_lacks

    labels = np.repeat(np.arange(5), 8)
    said: list[str] = []
    picked = eval_subset(labels, 3)
    warn_of_classes_the_subset_lacks(labels, picked, list("abcde"), said.append)
    lost = [c for c in "abcde" if "abcde".index(c) not in labels[picked]]
    assert len(lost) == 2 and said == [
        f"warning: the --eval-limit 3 subset holds no images of {', '.join(lost)}: AUC, PR-AUC and pAUC are undefined "
        "on it (null, shown as -); sensitivity, specificity, recall and F1 are means over the classes it holds (a "
        "limit below the 5 classes present cannot keep one of each)"]
    said.clear()
    warn_of_classes_the_subset_lacks(labels, eval_subset(labels, 5), list("abcde"), said.append)
    held = np.repeat([0, 1, 3], 4)  # a folder without b and e: its own warning says so, not this one
    warn_of_classes_the_subset_lacks(held, eval_subset(held, 10), list("abcde"), said.append)
    assert said == []


def test_a_model_and_its_teacher_of_the_same_role_are_exported_apart_and_sources_are_never_replaced(tmp_path,
                                                                                                  tiny_recipe_dict):
    """Two checkpoints of the default role: the teacher's export had replaced the model's (both in bundle-teacher)
    and the model's rows timed the teacher; a source bundle at the teacher's export folder had been overwritten;
    a --checkpoint of another model had given a bundle another model's torch rows, params and MACs."""
    from edgekd.recipe import recipe_from_dict
    from edgekd.train.run import train_recipe

    small = train_recipe(recipe_from_dict(tiny_recipe_dict), tmp_path / "small", log=lambda *_: None).best_path
    big_recipe = {**tiny_recipe_dict, "model": {"name": "edgekd_cnn"}}
    big = train_recipe(recipe_from_dict(big_recipe), tmp_path / "big", log=lambda *_: None).best_path
    quick = Timing(warmup=0, min_runs=2, min_seconds=0)
    one = {"onnx": ("bare",)}
    res = run_bench(BenchConfig(small, tmp_path / "o", formats="onnx", precisions="fp32", batches="1", gemm=False,
                                timing=quick, variants=one, teacher=big, keep_work=True), log=lambda *_: None)
    subjects = {s["role"]: s for s in res.summary["subjects"]}
    assert set(subjects) == {"student", "teacher"}
    assert "bundle-student" in subjects["student"]["artifacts"]["onnx/fp32"]
    assert "bundle-teacher" in subjects["teacher"]["artifacts"]["onnx/fp32"]
    params = {r["role"]: r["params"] for r in res.records}
    assert params["student"] < params["teacher"]

    bundle = tmp_path / "o" / "bundle-teacher"
    with pytest.raises(EdgeKDError, match="would replace it"):  # the source bundle is the teacher's export folder
        run_bench(BenchConfig(bundle, tmp_path / "o", formats="onnx", precisions="fp32", batches="1", gemm=False,
                              timing=quick, variants=one, teacher=big), log=lambda *_: None)
    assert (bundle / "edgekd.json").is_file()
    with pytest.raises(EdgeKDError, match="not the checkpoint .* was exported from"):
        run_bench(BenchConfig(bundle, tmp_path / "o2", formats="onnx", precisions="fp32", batches="1", gemm=False,
                              timing=quick, variants=one, checkpoint=small), log=lambda *_: None)
    with pytest.raises(EdgeKDError, match="is a checkpoint already"):
        run_bench(BenchConfig(small, tmp_path / "o3", formats="onnx", precisions="fp32", batches="1", gemm=False,
                              timing=quick, variants=one, checkpoint=big), log=lambda *_: None)
    res = CliRunner().invoke(app, ["bench", str(bundle), "--formats", "onnx", "--parity-images", "8"])
    assert res.exit_code != 0 and "nothing is exported here" in str(res.exception)

    # A run after one with --keep-work had written its job files and image copy into that work/ and left them
    kept = sorted(p.name for p in (tmp_path / "o" / "work").iterdir())
    run_bench(BenchConfig(tmp_path / "o" / "bundle-student", tmp_path / "o", formats="onnx", precisions="fp32",
                          batches="1", gemm=False, timing=quick, variants=one), log=lambda *_: None)
    assert sorted(p.name for p in (tmp_path / "o" / "work").iterdir()) == kept


def test_bench_data_in_another_class_order_is_refused(tmp_path, tiny_recipe_dict):
    """--data whose classes are the model's in another order scored every row inverted (ACC 0 for a perfect
    model) without a word; eval, export and the distill report refuse it."""
    from edgekd.bench.run import Subject, attach_test_images
    from edgekd.recipe import recipe_from_dict

    recipe = recipe_from_dict({**tiny_recipe_dict, "data": {**tiny_recipe_dict["data"],
                                                             "class_names": ["class_1", "class_0"]}})
    subject = Subject(role="model", name="m", preprocess=PREPROCESS, class_names=["class_0", "class_1"])
    with pytest.raises(EdgeKDError, match="class 'class_1' is output 1 of the model but class 0 of the data"):
        attach_test_images(subject, recipe, tmp_path, None, lambda *_: None)


def test_peak_rss_is_read_per_batch_and_min_runs_above_the_cap_is_kept():
    """RSS had been read once after the largest batch and given to every batch's record; --min-runs 8000 had
    stopped at 5000 calls and been said as 8000."""
    s = _subject()
    result = {"timings": {str(b): {"p50_ms": 1.0, "p90_ms": 1.0, "p99_ms": 1.0, "mean_ms": 1.0, "min_ms": 1.0,
                                   "runs": 3} for b in (1, 8)},
              "peak_rss_mb": 200.0, "peak_rss_mb_by_batch": {"1": 80.0, "8": 200.0}, "load_s": 0.1}
    recs = make_records(Row(s, "onnx", "fp32", "bare"), result, [1, 8], 1, False, None)
    assert [r["peak_rss_mb"] for r in recs] == [80.0, 200.0]
    assert Timing(min_runs=8000).max_runs == 8000 and Timing().max_runs == 5000


def test_worker_results_stay_in_work_whatever_the_folder_is_called(tmp_path):
    """`job_path.replace(".json", ...)` rewrote the folder names too: --out x.json.d sent results to x-result.json.d."""
    work = tmp_path / "x.json.d" / "work"
    work.mkdir(parents=True)
    result = run_worker({"kind": "nope", "variant": "bare"}, work, timeout=120)
    assert "error" in result
    assert not (tmp_path / "x-result.json.d").exists()


def test_the_bench_table_takes_paths_and_names_as_text_and_bench_md_has_the_notes():
    """A bundle under a folder named 'a[/x]' had ended the run with a MarkupError after its files were written."""
    from rich.console import Console

    from edgekd.bench.report import records_table

    s = Subject(role="student", name="net[/x]", preprocess=PREPROCESS, class_names=["a", "b"])
    result = {"timings": {"1": {"p50_ms": 1.0, "p90_ms": 1.0, "p99_ms": 1.0, "mean_ms": 1.0, "min_ms": 1.0,
                                "runs": 3}}, "peak_rss_mb": 50.0, "load_s": 0.1}
    recs = make_records(Row(s, "onnx", "fp32", "bare"), result, [1], 1, False, None)
    console = Console(record=True, width=200)
    console.print(records_table(recs, "runs/a[/x]/bundle: 1 thread(s)"))
    text = console.export_text()
    assert "runs/a[/x]/bundle" in text and "net[/x]" in text
    summary = {"machine": {"cores": 2, "machine": "x86_64", "model": "cpu", "simd": [], "load_avg_at_start": 0,
                           "load_avg_at_end": 0}, "command": "edgekd bench", "date": "d", "threads": 1, "tta": False,
               "timing": {"warmup": 0, "min_runs": 3, "min_seconds": 0},
               "subjects": [{"role": "model", "model": "m", "notes": ["hair removal (data.hair_removal) is not timed"]}]}
    assert "- note: model m: hair removal (data.hair_removal) is not timed" in records_markdown(recs, summary)


@pytest.mark.slow
def test_a_row_whose_worker_failed_exits_1_and_is_listed(tmp_path, tiny_recipe_dict, monkeypatch):
    """A timed-out or killed worker's row was an n/a like a format the bundle lacks, and bench exited 0: CI could
    not tell a crash from a missing artifact."""
    import edgekd.bench.run as bench_run
    from edgekd.recipe import recipe_from_dict
    from edgekd.train.run import train_recipe

    ckpt = train_recipe(recipe_from_dict(tiny_recipe_dict), tmp_path / "run", log=lambda *_: None).best_path
    real = bench_run.run_worker
    monkeypatch.setattr(bench_run, "run_worker", lambda job, work, timeout, **kw: (
        {"error": "worker exited with code -9: killed"} if job["kind"] == "openvino" else
        real(job, work, timeout, **kw)))
    out = tmp_path / "bench"
    res = CliRunner().invoke(app, ["bench", str(ckpt), "--formats", "onnx,openvino", "--precision", "fp32",
                                   "--batch", "1", "--threads", "1", "--seconds", "0", "--min-runs", "2",
                                   "--warmup", "0", "--parity-images", "8", "--out", str(out)])
    assert res.exit_code == 1, res.output
    summary = json.loads((out / "bench.json").read_text())
    failed = summary["failed_rows"]
    assert failed and all(r.split()[1] == "openvino/fp32" and r.endswith("worker exited with code -9: killed")
                          for r in failed), failed
    assert f"{len(failed)} row(s) failed (bench.json lists them in failed_rows)" in " ".join(res.output.split())
    assert all("failed" not in r for r in summary["records"])
    assert {r["format"] for r in summary["records"] if r["status"] == "ok"} == {"onnx"}


def test_the_default_precisions_are_a_bundles_own(tmp_path, monkeypatch):
    """`bench BUNDLE` took fp32,int8 by default: a bundle's OpenVINO fp16 model was left out without a word."""
    from types import SimpleNamespace

    import edgekd.runtime
    from edgekd.bench.run import default_precisions

    closed = []
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "edgekd.json").write_text("{}")  # is_bundle: a folder holding edgekd.json
    for held, expected in ((["fp16", "fp32"], "fp32,fp16"), (["int8", "fp16"], "fp16,int8"), (["fp32"], "fp32")):
        monkeypatch.setattr(edgekd.runtime, "open_bundle", lambda path, verify=True, h=held: SimpleNamespace(
            artifacts=[SimpleNamespace(precision=p) for p in h], close=lambda: closed.append(path)))
        assert default_precisions(tmp_path / "b") == expected
    assert len(closed) == 3  # a zip's extracted files removed
    assert default_precisions(tmp_path / "model.pt") == "fp32,int8"  # a checkpoint: exported first


def test_without_torch_the_no_data_note_asks_only_for_a_folder(tmp_path, monkeypatch):
    """On the core install "give --data RECIPE or a checkpoint" (and "--checkpoint adds the torch rows") named
    what then failed with "needs the Python package 'torch'"."""
    import edgekd.bench.run as bench_run
    from edgekd.bench.run import attach_synthetic_images

    real = bench_run.find_spec
    monkeypatch.setattr(bench_run, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    subject = Subject(role="student", name="m", preprocess={"input_size": [3, 8, 8], "resize": 8},
                      class_names=["a", "b"])
    attach_synthetic_images(subject, tmp_path, 2)
    assert subject.notes[-1] == ("no test data (give --data DIR, a labelled folder): timed on random images, "
                                 "no accuracy")


def test_without_torch_a_torch_row_says_so_before_asking_for_a_checkpoint(tmp_path, monkeypatch):
    """`bench -f torch` on a device had said "no checkpoint (pass --checkpoint with a bundle)", and with
    --checkpoint that PyTorch was missing."""
    import edgekd.bench.run as bench_run
    from edgekd.bench.run import row_job

    subject = Subject(role="student", name="m", preprocess={"input_size": [3, 8, 8], "resize": 8},
                      class_names=["a", "b"])
    row = Row(subject, "torch", "fp32", "bare")
    assert row_job(row, [1], 1, False, Timing(), tmp_path, False, None) == ("no checkpoint (pass --checkpoint with a "
                                                                            "bundle)")
    real = bench_run.find_spec
    monkeypatch.setattr(bench_run, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    assert row_job(row, [1], 1, False, Timing(), tmp_path, False, None) == ("PyTorch is not installed (the "
                                                                            "edgekd[train] extra)")


def test_bench_data_holding_the_models_own_training_images_is_warned_of(tmp_path):
    """`bench --data DIR` scored a folder of the model's training images (68 of 80) without a word, where
    `eval --data DIR` warns; a folder of new images gets no warning."""
    import shutil

    from PIL import Image

    from edgekd.bench.run import attach_folder_images
    from edgekd.recipe import recipe_from_dict
    from edgekd.train.run import train_recipe

    train = write_image_folder(tmp_path / "train", n_per_class=8, size=16)
    raw = {"name": "f", "data": {"source": "imagefolder", "path": str(train), "image_size": 16, "batch_size": 8,
                                 "channels": 3, "val_fraction": 0.25, "test_fraction": 0.25},
           "model": {"name": "edgekd_cnn_tiny"}, "train": {"epochs": 1, "scheduler": {"name": "none"}}}
    best = train_recipe(recipe_from_dict(raw), tmp_path / "run", log=lambda *_: None).best_path
    shutil.copytree(train, tmp_path / "copy")
    fresh = tmp_path / "fresh"
    for c, name in enumerate(("a", "b")):
        (fresh / name).mkdir(parents=True)
        Image.fromarray(random_pixels((16, 16, 3), seed=90 + c)).save(fresh / name / "new.png")
    for folder, copies in ((tmp_path / "copy", True), (fresh, False)):
        said: list[str] = []
        subject = Subject(role="model", name="m", preprocess=PREPROCESS, class_names=["a", "b"], checkpoint=best)
        attach_folder_images(subject, folder, tmp_path, None, said.append)
        warned = [s for s in said if "identical in content to the checkpoint's own train or val images" in s]
        assert bool(warned) == copies and bool(subject.notes) == copies, said
        assert not copies or warned[0].startswith(f"warning: model: 12 of the 16 images in {folder} are identical")
