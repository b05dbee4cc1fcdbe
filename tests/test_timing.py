"""Latency timing helpers: interleaving within a group, alternating phases across groups."""

import pytest

from edgekd.runtime.timing import latency_stats, time_alternating


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
