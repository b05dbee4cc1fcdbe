"""The accuracy-latency Pareto front on hand-made points, and points from benchmark records."""

from __future__ import annotations

import pytest

from edgekd.bench.pareto import pareto_front, pareto_points, plot_pareto


def test_front_of_hand_made_points():
    pts = [(10.0, 0.90),   # 0: front (only slower points score higher)
           (5.0, 0.80),    # 1: front (fastest)
           (12.0, 0.89),   # 2: dominated by 0 (slower, worse)
           (20.0, 0.95),   # 3: front (best score)
           (20.0, 0.93),   # 4: dominated by 3 (same latency, worse)
           (7.0, 0.80),    # 5: dominated by 1 (slower, same score)
           (30.0, 0.95)]   # 6: dominated by 3 (slower, same score)
    assert pareto_front(pts) == [1, 0, 3]


@pytest.mark.parametrize("pts,want", [
    ([], []),
    ([(1.0, 0.5)], [0]),
    ([(1.0, 0.5), (1.0, 0.5)], [0, 1]),                    # exact duplicates: neither dominates the other
    ([(3.0, 0.9), (2.0, 0.8), (1.0, 0.7)], [2, 1, 0]),      # a monotone trade-off: all on the front
    ([(1.0, 0.9), (2.0, 0.8), (3.0, 0.7)], [0]),            # one point dominates all
    ([(0.11, 0.9704251588866972), (0.23, 0.9704251588866973)], [0]),  # AUCs equal but for float summation order
])
def test_front_edge_cases(pts, want):
    assert pareto_front(pts) == want


def test_front_matches_brute_force_dominance():
    import random
    rng = random.Random(0)
    pts = [(rng.choice([1, 2, 3, 4, 5]) * 1.0, rng.choice([0.6, 0.7, 0.8, 0.9])) for _ in range(40)]
    dominated = {i for i, (l1, s1) in enumerate(pts) for (l2, s2) in pts
                 if l2 <= l1 and s2 >= s1 and (l2 < l1 or s2 > s1)}
    assert sorted(pareto_front(pts)) == sorted(set(range(len(pts))) - dominated)


def test_points_from_records_filter_batch_status_and_missing_metric(tmp_path):
    def rec(fmt, prec, p50, acc, batch=1, status="ok", tta=False, auc=0.9):
        return {"model": "cnn", "role": "student", "format": fmt, "precision": prec, "variant": "bare", "tta": tta,
                "batch": batch, "p50_ms": p50, "acc": acc, "auc": auc, "status": status}
    records = [rec("openvino", "int8", 1.0, 0.90), rec("openvino", "fp32", 2.0, 0.91),
               rec("onnx", "fp32", 3.0, 0.905), rec("onnx", "int8", 1.5, None),     # no accuracy: left out
               rec("torch", "fp32", 0.5, 0.99, batch=8), rec("torch", "fp32", 9.0, 0.95, status="n/a"),
               rec("openvino", "fp32", 6.0, 0.93, tta=True)]
    pts = pareto_points(records, "acc")
    assert [(p["format"], p["precision"], p["tta"], p["pareto"]) for p in pts] == [
        ("openvino", "int8", False, True), ("openvino", "fp32", False, True), ("onnx", "fp32", False, False),
        ("openvino", "fp32", True, True)]
    path = plot_pareto({"acc": pts, "auc": pareto_points(records, "auc")}, tmp_path / "p.png")
    assert path.stat().st_size > 1000


def test_the_pareto_script_reads_a_bench_json(tmp_path):
    """`benchmarks/pareto.py --latency bench.json` (edgekd bench's output, its machine at the top under its own
    key names) ended in a KeyError traceback."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    rec = {"model": "cnn", "role": "student", "variant": "bare", "tta": False, "batch": 1, "status": "ok", "auc": 0.9}
    bench = {"schema": "edgekd-bench/1", "date": "2026-12-07T08:00:00+00:00", "command": "edgekd bench m.pt",
             "versions": {"torch": "2.14.1"},
             "machine": {"model": "AMD EPYC", "cores": 2, "machine": "x86_64", "simd": ["avx2", "fma"]},
             "records": [{**rec, "format": "onnx", "precision": "fp32", "p50_ms": 2.0, "acc": 0.91},
                         {**rec, "format": "onnx", "precision": "int8", "p50_ms": 1.0, "acc": 0.90}]}
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    p = subprocess.run([sys.executable, str(repo / "benchmarks" / "pareto.py"), "--latency", str(tmp_path / "bench.json"),
                        "--results", str(tmp_path / "out")], capture_output=True, text=True, cwd=repo)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    result = json.loads((tmp_path / "out" / "pareto.json").read_text())
    sys.path.insert(0, str(repo / "benchmarks"))
    from schema import problems

    assert problems(result) == [] and result["machine"]["cpu"] == "AMD EPYC" and result["machine"]["torch"] == "2.14.1"
    assert result["latency_run"] == {"date": bench["date"], "command": bench["command"]}
    assert sum(r["pareto"] for r in result["records"] if r["metric"] == "acc") == 2  # faster int8, more accurate fp32
