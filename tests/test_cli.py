"""End-to-end CLI: train one short epoch on a tiny subset, eval, metrics.json; bad input -> one line, exit 2."""

import json
import subprocess
import sys

import pytest
import yaml

from conftest import run_edgekd
from edgekd.errors import EdgeKDError


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.mark.slow
def test_train_then_eval(tmp_path, tiny_recipe_dict):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict))
    out = tmp_path / "run"
    p = run_edgekd("train", str(recipe), "--set", "train.epochs=1", "--set", "train.monitor=val_pauc", "--out", str(out))
    assert p.returncode == 0, p.stderr
    assert "best checkpoint" in p.stdout and "test" in p.stdout
    assert "tiny (4.4k)" in p.stdout  # edgekd_cnn_tiny's 4,378 parameters had shown as 0.00M
    assert "val_pauc=" in p.stdout + p.stderr  # the monitor that picks best.pt is on each epoch's line
    m = json.loads((out / "metrics.json").read_text())
    assert m["epochs_run"] == 1 and 0 <= m["test"]["acc"] <= 1
    p = run_edgekd("eval", str(out / "best.pt"), "--split", "val,test", "--out", str(tmp_path / "ev"))
    assert p.returncode == 0, p.stderr
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert set(ev) >= {"val", "test", "params"} and ev["test"]["n"] == 16
    assert ev["test"]["acc"] == pytest.approx(m["test"]["acc"])
    assert (tmp_path / "ev" / "confusion_test.png").stat().st_size > 1000


def test_bad_recipe_key_is_one_line(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("train:\n  epochs: 1\n  optimiser: {lr: 1}\n")
    assert_one_line_error(run_edgekd("train", str(r), "--out", str(tmp_path / "o")), "unknown key 'train.optimiser'")
    assert not (tmp_path / "o").exists()


def test_bad_set_value_and_missing_checkpoint(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("name: x\n")
    assert_one_line_error(run_edgekd("train", str(r), "--set", "train.epochs=-3"), "train.epochs")
    assert_one_line_error(run_edgekd("eval", str(tmp_path / "none.pt")), "checkpoint not found")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert_one_line_error(run_edgekd("eval", str(tmp_path / "junk.pt")), "not a readable checkpoint")


def test_a_data_file_given_where_a_recipe_or_folder_goes_says_what_to_give(tmp_path):
    """`eval --data manifest.csv` said "a recipe must be a YAML mapping"; data.path of a folder for a CSV source said
    "CSV manifest not found" of a folder that is there."""
    (tmp_path / "manifest.csv").write_text("path,label\na.png,benign\n")
    assert_one_line_error(run_edgekd("eval", str(tmp_path / "junk.pt"), "--data", str(tmp_path / "manifest.csv")),
                          f"--data {tmp_path / 'manifest.csv'}: a data file, not a recipe or a labelled folder: to "
                          f"score its test split, drop --data and give --set data.source=csv --set data.path=")
    from edgekd.data.sources import load_csv

    with pytest.raises(EdgeKDError, match=r"a folder, not a CSV manifest \(data.source csv\): give the manifest "
                                          r"file, e.g. data.path=.*manifest.csv$"):
        load_csv(tmp_path)


def test_help_lists_commands():
    p = run_edgekd("--help")
    assert p.returncode == 0 and "train" in p.stdout and "eval" in p.stdout


def test_help_shows_no_value_type_beside_a_flag():
    """A flag takes no value: `--tta <bool>` would invite `--tta true` (typer 0.29 prints it so by default)."""
    p = run_edgekd("predict", "--help")
    assert p.returncode == 0 and "--tta" in p.stdout and "<bool>" not in p.stdout
    assert "<str>" in p.stdout  # options that take a value keep their type
    # Python types are not shown either: a repeatable option's element type, an int range's `<int>`, and the
    # usage line's CHECKPOINT (typer 0.29: `<list[str]>`, `<int range>`, `{checkpoint}`).
    p = run_edgekd("eval", "--help")
    assert "eval [OPTIONS] CHECKPOINT" in p.stdout and "{checkpoint}" not in p.stdout
    assert "--set" in p.stdout and "<list[" not in p.stdout and " range>" not in p.stdout and "<int>" in p.stdout
    p = run_edgekd("predict", "--help")  # a variadic argument: INPUTS... <str>
    assert "predict [OPTIONS] BUNDLE INPUTS..." in p.stdout and "inputs..." in p.stdout and "<list[" not in p.stdout


def test_help_fits_80_columns_without_truncation():
    """rich squeezes the options table to the terminal; a wide column once cut `--no-accuracy-control` and a
    profile path in `export --help` to `--no-accuracy-co…` at 80 columns (the width of a captured run)."""
    for command in ("train", "check", "eval", "export", "update", "predict", "repository", "serve", "bench",
                    "explain"):
        p = run_edgekd(command, "--help")
        assert p.returncode == 0 and "…" not in p.stdout, (command, p.stdout)
    assert "--no-accuracy-control" in run_edgekd("export", "--help").stdout
    short = run_edgekd("export", "-h")  # -h as everywhere else, the same text (it had kept the docstring's breaks)
    assert short.returncode == 0 and "edgekd export [OPTIONS]" in short.stdout and "--no-accuracy-control" in short.stdout
    assert short.stdout == run_edgekd("export", "--help").stdout


def test_export_refuses_both_accuracy_control_flags(tmp_path):
    assert_one_line_error(run_edgekd("export", str(tmp_path / "x.pt"), "--accuracy-control", "--no-accuracy-control"),
                          "give one")


def test_the_cli_package_runs_as_a_module():
    proc = subprocess.run([sys.executable, "-m", "edgekd.cli", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("edgekd "), proc.stderr


def test_a_usage_error_is_one_line_naming_the_help(tmp_path):
    """An option value out of range, an unknown option, a missing argument: one `error:` line and exit 2, like
    every other bad input (click's usage box was four lines)."""
    assert_one_line_error(run_edgekd("bench", str(tmp_path / "x.pt"), "--threads", "0"), "'--threads'",
                          "bench --help")
    assert_one_line_error(run_edgekd("predict", "--no-such-option"), "No such option: --no-such-option",
                          "predict --help")
    assert_one_line_error(run_edgekd("export"), "Missing argument", "export --help")


def test_an_interrupted_update_says_how_to_resume_it(tmp_path, monkeypatch):
    """Ctrl-C during an update printed only `interrupted`: it names the run folder chosen (the default may carry a
    -2 suffix) in the resume command."""
    from typer.testing import CliRunner

    import edgekd.update
    from edgekd.cli import app
    from edgekd.cli.console import STATE
    from edgekd.errors import EdgeKDError

    def started(*args, on_run_dir=None, **kwargs):
        (tmp_path / "runs" / "u-2").mkdir(parents=True)
        on_run_dir(tmp_path / "runs" / "u-2")
        raise EdgeKDError("stopped")

    monkeypatch.setattr(edgekd.update, "update_bundle", started)
    monkeypatch.setitem(STATE, "on_interrupt", None)
    CliRunner().invoke(app, ["update", "parent", "r.yaml", "--out", "v2", "--set", "train.epochs=1", "--zip"])
    assert STATE["on_interrupt"]() == (f"resume it: edgekd update parent r.yaml --out v2 --resume --run-dir "
                                       f"{tmp_path / 'runs' / 'u-2'} --set train.epochs=1 --zip")


def test_eval_whose_reader_went_away_still_writes_its_results(tmp_path, tiny_recipe_dict):
    """`edgekd eval ... | true`: rich ended the command with exit 1 at the first table, without a word, and the
    staged results folder was removed; the rest of stdout is now discarded and the files written."""
    from edgekd.recipe import recipe_from_dict
    from edgekd.train.run import train_recipe

    ckpt = train_recipe(recipe_from_dict(tiny_recipe_dict), tmp_path / "run", log=lambda *_: None).best_path
    out = tmp_path / "ev"
    proc = subprocess.Popen([sys.executable, "-m", "edgekd", "eval", str(ckpt), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    proc.stdout.close()  # the reader is gone before the first table
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, err
    assert (out / "metrics.json").is_file() and "Traceback" not in err


def test_tables_sent_to_a_file_or_pipe_keep_every_cell_whole(capsys):
    """At 160 columns rich cut cells to "…" when stdout was no terminal: a bench's img/s, a predicted file's path,
    and onnx/int8 and onnx/fp32 rows looked alike in a CI log."""
    from rich.table import Table

    from edgekd.cli.console import PIPED_WIDTH, out_console

    assert out_console.width == PIPED_WIDTH  # pytest's stdout is no terminal
    cells = ["mobilenetv3_large_100_with_a_long_name", "openvino", "int8"] + [f"{33756.123456 + i:.6f}"
                                                                           for i in range(14)]
    table = Table(title="bench: " + "/very/long/path" * 8)
    for i in range(len(cells)):
        table.add_column(f"column {i}")
    table.add_row(*cells)
    out_console.print(table)
    out = capsys.readouterr().out
    assert "…" not in out and "33769.123456" in out and cells[0] in out
