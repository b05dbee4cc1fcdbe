"""Every benchmarks/results/*.json follows the one schema (benchmarks/schema.py), and the schema catches what it
is there to catch."""

import copy
import json
import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import schema  # noqa: E402

FILES = sorted((BENCH / "results").glob("*.json"))
GOOD = {"benchmark": "x", "command": "python benchmarks/x.py", "date": "2026-12-02T10:00:00+00:00",
        "machine": {"cpu": "AMD EPYC", "cores": 2, "arch": "x86_64", "gpu": None, "torch": "2.14.1"},
        "records": [{"acc": 0.9}]}


def test_there_are_results_files():
    assert len(FILES) >= 10


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_results_file_follows_the_schema(path):
    assert schema.problems(json.loads(path.read_text())) == []


def test_a_conforming_document_passes():
    assert schema.problems(GOOD) == []


@pytest.mark.parametrize("break_it, expected", [
    (lambda d: d.update(machine="2-core x86_64 (AMD EPYC), no GPU"), "machine"),
    (lambda d: d["machine"].pop("arch"), "machine.arch"),
    (lambda d: d.update(date="2026-12-02T10:00:00"), "date"),
    (lambda d: d.update(date="2026-12-02T11:00:00+01:00"), "not UTC"),
    (lambda d: d.pop("command"), "command"),
    (lambda d: d.update(records={"acc": 0.9}), "records"),
    (lambda d: d["records"][0].update(machine="2-core"), "records.0.machine"),
    (lambda d: d.update(runtime={"m": {"machine": {"cpu": "x"}}}), ".runtime.m.machine"),
    (lambda d: d.update(summary={"started": "2026-11-23T15:11:51"}), ".summary.started"),
    (lambda d: d["records"][0].update(acc="high"), "records.0.acc"),
    (lambda d: d["records"][0].update(auc="0.93"), "records.0.auc"),  # lax float parsing had taken these
    (lambda d: d["records"][0].update(pauc=True), "records.0.pauc"),
    # a ledger's record names its own command, date and machine (a record without them had passed)
    (lambda d: d.update(benchmark="accuracy"), "records[0]: an accuracy ledger record needs its own command"),
    (lambda d: d.update(benchmark="zoo", records=[{"command": "x", "date": "2026-12-02T10:00:00+00:00"}]),
     "needs its own bench_machine"),
])
def test_schema_names_what_is_wrong(break_it, expected):
    doc = copy.deepcopy(GOOD)
    break_it(doc)
    found = schema.problems(doc)
    assert found and any(expected in p for p in found), found


def test_schema_checker_reports_a_file_it_cannot_read_as_a_problem(tmp_path, capsys):
    (tmp_path / "cut.json").write_text('{"benchmark": ')
    assert schema.main([str(tmp_path / "cut.json"), str(tmp_path / "gone.json")]) == 1
    out = capsys.readouterr().out
    assert "cut.json: not JSON: " in out and "gone.json: cannot read it" in out and "2 files, 2 problems" in out


def test_results_md_figures_regenerate_from_the_json():
    import report

    text = (BENCH / "RESULTS.md").read_text()
    assert report.render(text)[1] == []


def test_report_check_catches_a_hand_edited_figure(tmp_path):
    import report

    text = (BENCH / "RESULTS.md").read_text()
    section = report.current(text, "<!-- export:begin", "<!-- export:end -->")
    figure = re.search(r"\| (0\.\d{4}) \|", section).group(1)  # the first 4-digit figure of the table
    edited = text.replace(section, section.replace(f"| {figure} |", f"| {float(figure) + 0.01:.4f} |", 1))
    assert edited != text
    path = tmp_path / "RESULTS.md"
    path.write_text(edited)
    assert report.main(["--check", "--results-md", str(path)]) == 1
    assert report.main(["--results-md", str(path)]) == 0
    assert path.read_text() == text


def _section_names():
    import report

    return sorted(report.sections())


@pytest.mark.parametrize("name", _section_names())
def test_every_section_catches_a_hand_edited_figure(name):
    """A digit changed in the first table row of any generated section (latency and runtime-latency included) is
    reported as that section's drift, and regenerating restores the text."""
    import report

    text = (BENCH / "RESULTS.md").read_text()
    (begin, end), _ = report.sections()[name]
    section = report.current(text, begin, end)
    lines = section.splitlines()
    row = next(i + 1 for i, line in enumerate(lines) if line.startswith("|---"))
    digit = max(i for i, ch in enumerate(lines[row]) if ch.isdigit())
    lines[row] = lines[row][:digit] + str((int(lines[row][digit]) + 1) % 10) + lines[row][digit + 1:]
    edited = text.replace(section, "\n".join(lines))
    assert edited != text
    regenerated, changed = report.render(edited)
    assert changed == [name]
    assert regenerated == text


def test_kd_gain_summarizes_a_recorded_row_whose_run_is_gone_and_keeps_rows_of_one_recipe_apart(tmp_path,
                                                                                                  monkeypatch):
    """Two rows of one recipe with other overrides (scratch, scratch_long) stay separate ledger records, and a row
    whose runs/ folder is gone is summarized from its record (matched by its train command)."""
    import common
    import kd_gain

    ledger = tmp_path / "accuracy.json"
    runs = tmp_path / "runs"  # empty: every run folder is gone
    monkeypatch.setattr(kd_gain, "run_dir", lambda set_name, row, seed: runs / set_name / f"{row}-s{seed}")
    monkeypatch.setattr(kd_gain, "train_command", lambda recipe, out, overrides: (  # out is outside the repo here
        f"edgekd train {recipe}{''.join(f' --set {o}' for o in overrides)} --out {out}"))

    def rec(row, seed, acc):
        spec = kd_gain.SETS["pneumonia"]["rows"][row]
        cmd = kd_gain.train_command(spec[0], kd_gain.run_dir("pneumonia", row, seed), kd_gain.overrides_of(spec, seed))
        return {"dataset": "pneumoniamnist", "split": "test", "model": "edgekd_cnn_small", "role": "student_scratch",
                "name": "pneumonia-student-scratch-28", "seed": seed, "acc": acc, "command": cmd}

    # whichever script merges last (distill.py keyed by recipe name and seed had dropped kd_gain's scratch_long)
    common.merge_records(ledger, [rec("scratch_long", 0, 0.94)], "accuracy", "a", key=common.ACCURACY_KEY)
    records = common.merge_records(ledger, [rec("scratch", 0, 0.92)], "accuracy", "b", key=common.ACCURACY_KEY)
    assert sorted(r["acc"] for r in records) == [0.92, 0.94]
    again = common.merge_records(ledger, [rec("scratch", 0, 0.93)], "accuracy", "c", key=common.ACCURACY_KEY)
    assert sorted(r["acc"] for r in again) == [0.93, 0.94]  # the same run again: its record replaced
    before = ledger.read_bytes()
    assert common.merge_records(ledger, [], "accuracy", "d", key=common.ACCURACY_KEY) == again
    assert ledger.read_bytes() == before  # nothing new: the header still names the command that added records
    found = kd_gain.finished_row("pneumonia", "scratch", 0, records)
    assert found["acc"] == 0.92 and found["row"] == "scratch"
    assert kd_gain.finished_row("pneumonia", "scratch", 1, records) is None


def test_kd_gain_ceiling_scores_every_ensemble_of_teachers_and_seeds(tmp_path, monkeypatch):
    """--ceiling: each finished teacher and seed of the reference row, every mean-of-softmax ensemble of them, and
    the test ACC a distilled student needs (reference mean + 1.5 pt)."""
    import numpy as np

    import edgekd.distill.report
    import kd_gain

    y = np.array([0, 0, 1, 1])
    probs = {  # P(class 1) per image; runs with a best.pt
        "teacher": [0.9, 0.1, 0.8, 0.8],            # 3 of 4 right
        "scratch_long-s0": [0.05, 0.45, 0.3, 0.9],  # 3 of 4 right
        "scratch_long-s1": [0.2, 0.2, 0.35, 0.45],  # 2 of 4 right
    }
    for name in probs:
        (tmp_path / name).mkdir()
        (tmp_path / name / "best.pt").write_bytes(b"")
    monkeypatch.setattr(kd_gain, "REPO", tmp_path / "repo")  # teachers live under REPO/runs/bench/<set>/
    bench = tmp_path / "repo" / "runs" / "bench" / "pneumonia"
    bench.mkdir(parents=True)
    (bench / "teacher").symlink_to(tmp_path / "teacher")
    monkeypatch.setattr(kd_gain, "run_dir", lambda set_name, row, seed: tmp_path / f"{row}-s{seed}")

    def fake(checkpoint, split):
        p = np.array(probs[checkpoint.parent.name])
        return {"_y": y, "_probs": np.stack([1 - p, p], axis=1)}

    monkeypatch.setattr(edgekd.distill.report, "evaluate_for_report", fake)
    c = kd_gain.ceiling("pneumonia", "scratch_long", [0, 1, 2])  # seed 2 has no run: left out
    assert len(c["rows"]) == 7  # 3 singles, 3 pairs, 1 triple
    assert c["reference_acc"] == pytest.approx(0.625) and c["needed_acc"] == pytest.approx(0.64)
    triple = next(r for r in c["rows"] if len(r["members"]) == 3)
    assert triple["test"]["acc"] == pytest.approx(0.75)  # mean P(1) [0.38, 0.25, 0.48, 0.72]: image 3 wrong
    pair = next(r for r in c["rows"] if r["members"] == ["teacher", "scratch_long-s0"])
    assert pair["test"]["acc"] == pytest.approx(1.0)  # mean P(1) [0.475, 0.275, 0.55, 0.85]: the two fix each other
    assert c["best_test"]["members"] == ["teacher", "scratch_long-s0"] and c["any_reaches_needed"]
    assert "| teacher + scratch_long-s0 (best on test) |" in "\n".join(kd_gain.ceiling_markdown(c))


@pytest.mark.parametrize("val_auc, val_acc, test_acc, sane, reason", [
    (0.95, 0.90, 0.80, True, ""),
    (0.85, 0.90, 0.80, False, "val AUC 0.850 < 0.9"),
    # ranks well on val, but at 0.5 calls nearly every image normal (the zoo's ResNet-18 at epoch 4: val ACC 0.366)
    (0.956, 0.366, 0.80, False, "val ACC 0.3660 is no better than its largest class's share 0.7424"),
    (0.944, 0.90, 0.383, False, "test ACC 0.3830 is no better"),
    (0.944, 0.90, 0.625, False, "test ACC 0.6250 is no better"),  # exactly the share 390/624
    (0.944, 0.90, 0.6251, True, ""),
])
def test_zoo_sanity_flags_a_model_at_or_below_the_majority_share(val_auc, val_acc, test_acc, sane, reason):
    import zoo

    metrics = {"val": {"auc": val_auc, "acc": val_acc}, "test": {"acc": test_acc},
               "counts": {"val": [135, 389], "test": [234, 390]}}
    ok, why = zoo.sanity(metrics)
    assert ok is sane and why.startswith(reason)


def test_the_machine_record_says_its_simd_kind():
    """Two VMs both recorded as "2-core x86_64 (AMD EPYC)", one with AVX-512 VNNI and one AVX2-only, gave one seeded
    command two results; a record now carries the SIMD features and the prose line names the kind."""
    from common import machine, machine_line

    base = {"cpu": "AMD EPYC", "cores": 2, "arch": "x86_64", "gpu": None, "torch": "2.14.1"}
    assert machine_line(base) == "2-core x86_64 (AMD EPYC), no GPU, torch 2.14.1"  # older records: as they were
    assert machine_line({**base, "simd": ["avx2", "fma"]}) == "2-core x86_64 (AMD EPYC, AVX2, no VNNI), no GPU, torch 2.14.1"
    assert "AVX-512 VNNI" in machine_line({**base, "simd": ["avx2", "avx512f", "avx512_vnni"]})
    assert "AMX" in machine_line({**base, "simd": ["avx512_vnni", "amx_int8"]})
    assert "AVX-VNNI" in machine_line({**base, "simd": ["avx2", "fma", "avx_vnni"]})  # Alder Lake: VNNI on AVX2
    assert machine_line({**base, "simd": None}) == machine_line(base)  # not read (another arch): nothing said
    here = machine()
    assert isinstance(here["simd"], list) and schema.Machine.model_validate(here).simd == here["simd"]


def test_summaries_read_the_seed_only_runs_of_a_recipe_one_per_seed():
    """distill.py and distill_terms.py matched records by recipe name (or a command prefix): kd_gain's 30-epoch runs
    of the same recipe were averaged in as more seeds ([0, 0, 1, 1, 2, 2])."""
    import common

    def rec(out, seed, acc, date, extra=""):
        return {"dataset": "pneumoniamnist", "split": "test", "seed": seed, "acc": acc, "date": date,
                "command": f"edgekd train recipes/p/scratch.yaml{extra} --set seed={seed} --out runs/bench/p/{out}"}

    records = [rec("scratch-s0", 0, 0.90, "2026-12-02T09:00:00+00:00"),
               rec("student_scratch-s0", 0, 0.91, "2026-12-03T09:00:00+00:00"),  # the same run, later: it counts
               rec("scratch_long-s0", 0, 0.95, "2026-12-06T09:00:00+00:00", " --set train.epochs=30"),
               rec("scratch-s1", 1, 0.92, "2026-12-02T09:00:00+00:00"),
               {**rec("scratch-s2", 2, 0.5, "2026-12-02T09:00:00+00:00"), "split": "val"},
               {**rec("x-s0", 0, 0.5, "2026-12-02T09:00:00+00:00"), "command": "edgekd train recipes/p/scratch.yaml "
                                                                                 "--out runs/x"}]  # seed 0 by default
    found = common.plain_runs(records, "recipes/p/scratch.yaml", dataset="pneumoniamnist")
    assert [(r["seed"], r["acc"]) for r in found] == [(0, 0.91), (1, 0.92)]
    assert common.plain_runs(records, "recipes/p/scratch.yaml", dataset="retinamnist") == []
    assert common.plain_runs(records, "recipes/p/scratch", dataset="pneumoniamnist") == []  # the whole path only


@pytest.mark.parametrize("raise_it, expected", [
    ("edgekd", "error: runs/x/best.pt: checkpoint not found"),
    ("script", "error: nothing to summarize, nothing written"),
    ("subprocess", "error: `edgekd export x` failed (exit 2); its message is above"),
])
def test_a_benchmark_scripts_error_is_one_line_and_exit_2(raise_it, expected, capsys):
    import subprocess

    import common

    from edgekd.errors import EdgeKDError

    def main():
        if raise_it == "edgekd":
            raise EdgeKDError("runs/x/best.pt: checkpoint not found")
        if raise_it == "script":
            raise SystemExit("error: nothing to summarize, nothing written")
        raise subprocess.CalledProcessError(2, ["edgekd", "export", "x"])

    with pytest.raises(SystemExit) as exited:
        common.run_main(main)
    assert exited.value.code == 2 and capsys.readouterr().err == expected + "\n"
    with pytest.raises(SystemExit) as exited:
        common.run_main(lambda: 1)  # a script's own exit code goes through
    assert exited.value.code == 1
