"""Latency timing helpers: interleaving within a group, alternating phases across groups."""

import pytest

from edgekd.runtime.timing import latency_stats, time_alternating, time_call


def test_latency_stats_percentiles():
    stats = latency_stats([1.0, 2.0, 3.0, 4.0, 5.0])
    assert stats["p50_ms"] == 3.0 and stats["min_ms"] == 1.0 and stats["runs"] == 5
    with pytest.raises(ValueError):
        latency_stats([])


def test_alternating_groups_never_mix_within_a_phase():
    calls = []
    groups = [{"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, {"t": lambda: calls.append("t")}]
    stats = time_alternating(groups, phases=3, warmup=1, rounds=6)
    # Per phase: group 1 warm-up (a, b once each), 2 interleaved rounds, then group 2 warm-up + 2 rounds.
    phase = ["a", "b", "a", "b", "a", "b", "t", "t", "t"]
    assert calls == phase * 3
    assert stats["a"]["runs"] == stats["t"]["runs"] == 6 and len(stats["t"]["phase_p50_ms"]) == 3
    with pytest.raises(ValueError, match="repeat"):
        time_alternating([{"a": lambda: None}, {"a": lambda: None}])


def test_time_call_reports_the_first_call_apart(monkeypatch):
    """An engine that compiles on first use (OpenVINO per input shape) pays in the first warm-up call: bench's
    load_s had left it out of sight. `first_ms` is that call; the timed samples are the later ones."""
    from edgekd.runtime import timing

    clock = iter(range(0, 10_000))  # perf_counter in seconds: one tick per reading ...
    calls = []

    def fn():
        calls.append(1)
        if len(calls) == 1:
            for _ in range(4):  # ... and the first call reads it 4 more times: 5 s in all
                next(clock)

    monkeypatch.setattr(timing.time, "perf_counter", lambda: float(next(clock)))
    stats = time_call(fn, warmup=3, min_runs=5, max_runs=5, min_seconds=0)
    assert stats["first_ms"] == 5000.0 and stats["runs"] == 5 and stats["p50_ms"] == 1000.0
    assert len(calls) == 8


def test_without_warm_up_the_first_call_is_still_apart_from_the_samples(monkeypatch):
    """--warmup 0 put the first call (an OpenVINO compile) among the samples, p99 191 ms beside 0.27 ms, and
    left first_call_ms empty."""
    from edgekd.runtime import timing

    clock = iter(range(0, 10_000))
    calls = []

    def fn():
        calls.append(1)
        if len(calls) == 1:
            for _ in range(9):
                next(clock)

    monkeypatch.setattr(timing.time, "perf_counter", lambda: float(next(clock)))
    stats = time_call(fn, warmup=0, min_runs=4, max_runs=4, min_seconds=0)
    assert stats["first_ms"] == 10_000.0 and stats["runs"] == 4 and stats["p99_ms"] == 1000.0 and len(calls) == 5


def test_time_alternating_takes_the_rounds_asked_and_rss_is_read_from_a_closed_file():
    import warnings

    from edgekd.runtime.timing import peak_rss_mb

    stats = time_alternating([{"a": lambda: None}, {"b": lambda: None}], phases=3, warmup=0, rounds=200)
    assert stats["a"]["runs"] == stats["b"]["runs"] == 200  # 3 phases of 66 had given 198
    assert time_alternating([{"a": lambda: None}], phases=5, warmup=0, rounds=3)["a"]["runs"] == 5  # one a phase
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        assert peak_rss_mb() > 0


def test_cpu_info_prefers_the_cpu_model_and_says_unread_flags_are_unknown(monkeypatch, tmp_path):
    """platform.processor() is "x86_64" on Fedora/RHEL (and "arm"/"i386" on macOS): /proc/cpuinfo's model name was
    never read there; and a machine whose flags cannot be read (no /proc/cpuinfo flags line) was recorded as having
    no VNNI, which silenced the ONNX INT8 note on a device without it."""
    import edgekd.host as host

    monkeypatch.setattr(host.platform, "processor", lambda: "x86_64")
    info = host.cpu_info()
    if any(line.startswith("model name") for line in open("/proc/cpuinfo")):
        assert info["model"] != "x86_64"
    assert info["cores"] >= 1 and isinstance(info["simd"], list)
    real_path = host.Path

    def no_cpuinfo(p, *a):
        return real_path(tmp_path / "missing") if str(p) == "/proc/cpuinfo" else real_path(p, *a)

    monkeypatch.setattr(host, "Path", no_cpuinfo)
    unread = host.cpu_info()
    assert unread["simd"] is None and unread["int8_dot_product"] is None and unread["model"] == "x86_64"
