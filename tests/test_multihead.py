"""Continual models at the edge: the retention gate, multi-head export (parity per head), task selection in the
runner and `edgekd predict --task`, and `edgekd update` from a bundle to a new one with lineage."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import run_edgekd, tiny_recipe
from edgekd.continual import retention_misses, retention_per_task
from edgekd.errors import EdgeKDError
from edgekd.export import RetentionGateError, export_checkpoint, profile_from_dict
from edgekd.export.continual import TaskLayout, retention_report
from edgekd.pipeline import run_recipe
from edgekd.probability import softmax
from edgekd.recipe import recipe_from_dict
from edgekd.runtime import Prediction, Runner, TaskPredictions, open_bundle
from edgekd.train.checkpoint import model_from_checkpoint
from test_continual import quadrant_npz

NAN = float("nan")
QUIET = lambda *a, **k: None  # noqa: E731
FAST = profile_from_dict({"formats": ["onnx", "openvino"], "parity": {"images": 8}})


# ------------------------------------------------------------------ the gate's arithmetic (hand-written matrices)
R = [[0.90, NAN, NAN],
     [0.88, 0.80, NAN],
     [0.85, 0.79, 0.95]]


def test_retention_gate_on_a_hand_written_matrix():
    assert retention_per_task(R) == pytest.approx([0.85 / 0.90, 0.79 / 0.80, 1.0])
    # Task 0 keeps 94.4%, task 1 98.75%: only task 0 misses 0.98; the last task is never gated.
    assert retention_misses(R, 0.98) == [(0, pytest.approx(0.85 / 0.90))]
    assert [j for j, _ in retention_misses(R, 0.99)] == [0, 1]
    assert retention_misses(R, 0.94) == []
    # A task never learned (accuracy 0 right after it) has no retention: it misses (it had passed without a word)
    ((j, kept),) = retention_misses([[0.0, NAN], [0.5, 0.9]], 0.98)
    assert j == 0 and math.isnan(kept)
    layout = TaskLayout("single", "class_incremental", [{"name": n, "outputs": [0, 1], "class_names": ["x"]}
                                                        for n in ("A", "B")], [[0.0, NAN], [0.0, 0.9]])
    with pytest.raises(RetentionGateError, match="task 'A': never learned, no retention to keep \\(accuracy 0.0000 "
                                                 "after learning it, 0.0000 now\\)"):
        retention_report(layout, 0.98, allow_forgetting=False)


def test_retention_report_refuses_with_one_line_per_miss():
    layout = TaskLayout("multi", "cross_domain", [{"name": n, "outputs": [0, 1], "class_names": ["x"]}
                                                  for n in ("A", "B", "C")], R)
    with pytest.raises(RetentionGateError) as err:
        retention_report(layout, 0.99, allow_forgetting=False)
    lines = str(err.value).splitlines()
    assert len(lines) == 3 and "task 'A': retention 0.9444 < min_retention 0.99" in lines[1]
    assert "task 'B': retention 0.9875" in lines[2]
    report = retention_report(layout, 0.99, allow_forgetting=True)
    assert report["gate"] == "allowed forgetting" and len(report["misses"]) == 2
    assert report["allowed_by"] == "--allow-forgetting"
    assert retention_report(layout, 0.99, allow_forgetting="a bench")["allowed_by"] == "a bench"
    assert "allowed_by" not in retention_report(layout, 0.9, allow_forgetting="a bench")  # nothing was let through
    assert report["forgetting"][:2] == pytest.approx([0.05, 0.01])
    assert retention_report(layout, 0.9, allow_forgetting=False)["gate"] == "passed"


# ------------------------------------------------------------------ a student, its bundle, a multi-head update
def _base(npz: Path) -> dict:
    raw = tiny_recipe(npz, name="mh", image_size=8, epochs=1, monitor="val_acc", monitor_mode=None, role="student")
    raw["train"]["optimizer"]["weight_decay"] = 0.0
    return raw


def _continual_recipe(root: Path, npz_a: Path, npz_b: Path) -> dict:
    raw = _base(npz_a)
    # A large step on task B: the shared backbone moves and task A's accuracy drops (the run is seeded).
    raw["train"]["optimizer"]["lr"] = 0.05
    raw["continual"] = {"tasks": [{"name": "A"}, {"name": "B", "data": {"path": str(npz_b)}}]}
    return raw


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihead")
    npz_a = quadrant_npz(root / "a.npz", classes=2, n=(64, 16, 16), size=8, seed=0)
    npz_b = quadrant_npz(root / "b.npz", classes=3, n=(64, 16, 16), size=8, seed=5)
    student = run_recipe(recipe_from_dict(_base(npz_a)), root / "student", log=QUIET)
    parent = export_checkpoint(student.best_path, root / "parent", profile=FAST, log=QUIET).out
    raw = _continual_recipe(root, npz_a, npz_b)
    raw["continual"]["checkpoint"] = str(student.best_path)
    cl = run_recipe(recipe_from_dict(raw), root / "cl", log=QUIET)
    bundle = export_checkpoint(cl.best_path, root / "bundle", profile=FAST, allow_forgetting=True, log=QUIET).out
    recipe_file = root / "update.yaml"
    recipe_file.write_text(yaml.safe_dump(_continual_recipe(root, npz_a, npz_b)))
    return {"root": root, "student": student.best_path, "parent": parent, "cl": cl, "bundle": bundle,
            "recipe": recipe_file}


def test_multi_head_bundle_records_tasks_and_passes_parity_per_head(world):
    meta = json.loads((world["bundle"] / "edgekd.json").read_text())
    assert meta["tasks"] == [{"name": "A", "class_names": ["class_0", "class_1"], "outputs": [0, 2]},
                             {"name": "B", "class_names": ["class_0", "class_1", "class_2"], "outputs": [2, 5]}]
    assert "calibration" not in meta and "decision" not in meta  # fit for one task only: skipped, card says so
    acc = np.asarray(world["cl"].acc_matrix, dtype=float)
    assert meta["continual"]["acc_matrix"][1] == pytest.approx(acc[1].tolist())
    assert meta["continual"]["retention"][0] == pytest.approx(acc[1, 0] / acc[0, 0])
    parity = json.loads((world["bundle"] / "parity.json").read_text())
    assert {r["format"] for r in parity["artifacts"]} == {"onnx", "openvino"}
    for rec in parity["artifacts"]:
        assert rec["passed"] and set(rec["heads"]) == {"A", "B"}
        assert rec["heads"]["B"]["outputs"] == [2, 5] and rec["heads"]["B"]["max_abs_diff"] < 1e-4
        # each head's agreement is on its own task's parity inputs, half of them each
        assert rec["heads"]["A"]["inputs"] == rec["heads"]["B"]["inputs"] == parity["inputs"] // 2
        # a task's ACC is gated on its own test images: one of them moves it by 1/its count
        n_task = min(m["n"] for m in rec["metrics"]["val"]["tasks"].values())
        assert rec["acc_resolution"]["val"] == pytest.approx(1 / n_task)
        assert n_task < parity["reference"]["split_images"]["val"]
    # the runner (each task's images, every head's softmax) is checked against the gated artifact, as for one head
    # (it had been skipped for every continual bundle)
    runner = parity["runner"]
    assert "skipped" not in runner and runner["images"] == 2 * FAST.parity.images
    for key in ("onnx/fp32", "openvino/fp32"):
        assert set(runner[key]["heads"]) == {"A", "B"} and runner[key]["max_prob_diff"] < 0.01
    # Metrics are per task (task id given): each task's test accuracy is its entry in the matrix's final row (after
    # the last task, on the test split: continual.eval_split's default).
    test = meta["metrics"]["test"]["tasks"]
    assert set(test) == {"A", "B"}
    assert test["A"]["acc"] == pytest.approx(acc[-1, 0]) and test["B"]["acc"] == pytest.approx(acc[-1, 1])
    assert meta["metrics"]["test"]["acc"] == pytest.approx(acc[-1].mean())  # the headline: their mean
    card = (world["bundle"] / "card.md").read_text()
    assert "## Continual learning" in card and "## Parity per head" in card and "No calibration" in card
    assert "one image moves the ACC of task '" in card and f"({n_task} images, the fewest) by " in card
    pytorch_row = next(line for line in card.splitlines() if line.startswith("| pytorch | fp32 | - |"))
    assert pytorch_row.split("|")[6:8] == [" - ", " - "]  # no mean of a binary sensitivity and a macro recall
    # its limitation names its tasks' data ("one public data set" of a model of two data sets before)
    assert "- Trained and tested on the data of its 2 tasks (A, B) in turn; performance on other sites" in card
    assert "one public data set" not in card and "this data set" not in card
    assert "- Figures hold for its tasks' own validation and test splits only." in card
    # the runner check, head by head
    assert "(`onnx` backend): head A: max |Δp| " in card and ", head B: max |Δp| " in card


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_runner_predicts_each_task_equal_to_pytorch(world, backend):
    model, _ = model_from_checkpoint(world["cl"].best_path)
    images = [np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8) for i in range(3)]
    both = Runner.from_bundle(world["bundle"], backend=backend)
    x = np.stack([both.preprocessor(img) for img in images])
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    for task, (lo, hi) in (("A", (0, 2)), ("B", (2, 5))):
        runner = Runner.from_bundle(world["bundle"], backend=backend, task=task)
        preds = runner.predict_batch(images)
        assert all(isinstance(p, Prediction) and p.task == task for p in preds)
        np.testing.assert_allclose(np.stack([p.probs for p in preds]), softmax(logits[:, lo:hi]), atol=1e-5)
        assert runner.class_names == (["class_0", "class_1"] if task == "A" else ["class_0", "class_1", "class_2"])
    side = both.predict_batch(images)
    assert all(isinstance(p, TaskPredictions) and list(p.tasks) == ["A", "B"] for p in side)
    np.testing.assert_allclose(side[0].tasks["B"].probs, softmax(logits[:1, 2:5])[0], atol=1e-5)
    # With TTA each task's probabilities are the mean of its views' softmaxes: one distribution per head.
    tta_b = Runner.from_bundle(world["bundle"], backend=backend, tta=True, task="B").predict(images[0])
    tta_all = Runner.from_bundle(world["bundle"], backend=backend, tta=True).predict(images[0])
    np.testing.assert_allclose(tta_all.tasks["B"].probs, tta_b.probs, atol=1e-6)
    assert tta_b.probs.sum() == pytest.approx(1.0) and len(tta_b.view_probs) == len(both.tta_views)
    assert tta_all.tasks["A"].probs.sum() == pytest.approx(1.0)


def test_single_head_bundle_has_no_tasks(world):
    runner = Runner.from_bundle(world["parent"], backend="onnx")
    assert runner.tasks is None and open_bundle(world["parent"]).tasks is None
    assert isinstance(runner.predict(np.zeros((8, 8, 3), np.uint8)), Prediction)
    from edgekd.errors import EdgeKDError
    with pytest.raises(EdgeKDError, match="has one head"):
        Runner.from_bundle(world["parent"], backend="onnx", task="A")
    with pytest.raises(EdgeKDError, match="no task 'C'.*A, B"):
        Runner.from_bundle(world["bundle"], backend="onnx", task="C")
    with pytest.raises(EdgeKDError, match="a multi-head bundle's tasks are decided by their top class"):
        Runner.from_bundle(world["bundle"], backend="onnx", task="B", threshold=0.5)  # said as a class-count problem


@pytest.mark.slow
def test_predict_cli_task_and_side_by_side(world, tmp_path):
    from PIL import Image

    img = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(img)
    p = run_edgekd("predict", world["bundle"], img, "--task", "B", "--backend", "onnx", "--out", tmp_path / "b.csv")
    assert p.returncode == 0, p.stderr
    rows = list(csv.DictReader((tmp_path / "b.csv").open()))
    assert rows[0]["task"] == "B" and {"p_class_0", "p_class_1", "p_class_2"} <= set(rows[0])
    p = run_edgekd("predict", world["bundle"], img, "--tta", "--out", tmp_path / "all.json")
    assert p.returncode == 0, p.stderr
    pred = json.loads((tmp_path / "all.json").read_text())["predictions"][0]
    assert set(pred["tasks"]) == {"A", "B"} and len(pred["tasks"]["B"]["probs"]) == 3
    assert math.isclose(sum(pred["tasks"]["A"]["probs"].values()), 1.0, abs_tol=1e-6)
    p = run_edgekd("predict", world["bundle"], img, "--backend", "onnx", "--out", tmp_path / "all.csv")
    header = (tmp_path / "all.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["file", "A:label", "A:index"] and "B:p_class_2" in header


@pytest.mark.slow
def test_export_cli_refuses_forgetting_unless_allowed(world, tmp_path):
    acc = np.asarray(world["cl"].acc_matrix, dtype=float)
    assert acc[1, 0] / acc[0, 0] < 0.98  # the premise: this seeded run forgets task A
    out = tmp_path / "refused"
    p = run_edgekd("export", world["cl"].best_path, "--out", out, "--format", "onnx", "--parity-images", "4")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    misses = [line for line in p.stderr.splitlines() if "retention" in line and "task 'A'" in line]
    assert len(misses) == 1 and not out.exists()
    p = run_edgekd("export", world["cl"].best_path, "--out", out, "--format", "onnx", "--parity-images", "4",
                   "--allow-forgetting")
    assert p.returncode == 0, p.stderr
    assert json.loads((out / "edgekd.json").read_text())["continual"]["gate"] == "allowed forgetting"


@pytest.mark.slow
def meta_artifacts(bundle: Path) -> list[str]:
    return sorted(f"{a['format']}/{a['precision']}" for a in json.loads((bundle / "edgekd.json").read_text())["artifacts"])


def test_update_from_a_bundle_gated_parity_checked_with_lineage(world, tmp_path):
    from edgekd.update import update_bundle

    with pytest.raises(EdgeKDError, match=r"--set continual.checkpoint: edgekd update starts from the bundle's own"):
        update_bundle(world["parent"], world["recipe"], tmp_path / "x", run_dir=tmp_path / "run0", profile=FAST,
                      overrides=["continual.checkpoint=other.pt"], log=QUIET)  # had been replaced without a word

    refused = tmp_path / "refused"
    said: list[str] = []
    with pytest.raises(RetentionGateError, match="task 'A'") as err:
        update_bundle(world["parent"], world["recipe"], refused, run_dir=tmp_path / "run1", profile=FAST,
                      log=said.append)
    assert not refused.exists() and "no bundle was written" in str(err.value)
    assert said[-1] == f"update: no bundle was written; the continual run stays in {tmp_path / 'run1'}"
    assert f"(the same command with --resume --run-dir {tmp_path / 'run1'} --allow-forgetting exports this run " \
        "anyway, without training it again)" in str(err.value)  # plain --allow-forgetting trained a new run
    said.clear()  # ... and it does
    update_bundle(world["parent"], world["recipe"], refused, run_dir=tmp_path / "run1", profile=FAST,
                  log=said.append, resume=True, allow_forgetting=True)
    assert f"update: the continual run in {tmp_path / 'run1'} finished; exporting it" in said and refused.is_dir()
    assert [m for m in said if m.startswith("warning: the retention gate would refuse")][0].endswith(
        "--allow-forgetting exports it all the same and its card says so")  # had passed without a word
    assert [m.split(":")[0] for m in said if "parity set:" in m] == ["task A", "task B"]  # one named line per task
    lenient = FAST.model_copy(update={"min_retention": 0.0})
    out = tmp_path / "v2"
    said.clear()
    result = update_bundle(world["parent"], world["recipe"], out, run_dir=tmp_path / "run2", profile=lenient,
                           log=said.append)
    assert not any("which this update did not export" in m for m in said), said  # the parent's formats
    assert meta_artifacts(out) == json.loads((out / "edgekd.json").read_text())["lineage"]["parent_artifacts"]
    said.clear()  # a profile without the parent's OpenVINO model: said (the parent's export chose it on its command line)
    update_bundle(world["parent"], world["recipe"], tmp_path / "v3", run_dir=tmp_path / "run3", log=said.append,
                  profile=lenient.model_copy(update={"formats": ["onnx"]}))
    assert any(m.startswith("warning: the parent had openvino/fp32, which this update did not export") for m in said)
    meta = json.loads((out / "edgekd.json").read_text())
    assert meta["lineage"]["parent_bundle_sha256"] == open_bundle(world["parent"]).sha256
    assert meta["lineage"]["parent_checkpoint_sha256"] == \
        json.loads((world["parent"] / "edgekd.json").read_text())["model"]["checkpoint_sha256"]
    assert meta["continual"]["gate"] == "passed" and [t["name"] for t in meta["tasks"]] == ["A", "B"]
    assert result.export.parity["passed"]
    card = (out / "card.md").read_text()
    assert "## Lineage" in card and "| parent |" in card and "this bundle, task B" in card
    lineage = card.split("## Lineage")[1].split("\n## ")[0]
    # the mean over tasks shows acc and auc only (a binary head's sensitivity averaged with a multi-class head's
    # macro recall is no figure), and every row its image count
    mean = next(line for line in lineage.splitlines()
                if line.startswith("| this bundle (unweighted mean over tasks)"))
    assert mean.split("|")[4:6] == [" - ", " - "]
    n_test = meta["metrics"]["test"]["tasks"]["A"]["n"]
    assert f"| {n_test} |" in next(line for line in lineage.splitlines() if line.startswith("| this bundle, task A"))
    assert "Compare the parent with this bundle's row of the parent's task" in lineage
    # A bundle whose checkpoint changed since its export is refused.
    from edgekd.update import parent_of

    ckpt = Path(json.loads((world["parent"] / "edgekd.json").read_text())["model"]["checkpoint_path"])
    saved = ckpt.read_bytes()
    try:
        ckpt.write_bytes(saved + b"x")
        with pytest.raises(EdgeKDError, match="changed since the export"):
            parent_of(world["parent"])
        ckpt.unlink()  # moved: the error says how to go on
        with pytest.raises(EdgeKDError, match=r"is not there any more \(moved\? give the moved file, sha256 [0-9a-f]{12}"
                                              r"\.\.\., as the source instead"):
            parent_of(world["parent"])
    finally:
        ckpt.write_bytes(saved)


@pytest.mark.slow
def test_update_from_a_checkpoint_records_it_as_the_parent(world, tmp_path):
    """A checkpoint is a zip too (torch.save): it must be read as a checkpoint, not refused as a bundle without
    edgekd.json, and the card's lineage names it."""
    from edgekd.runtime import is_bundle
    from edgekd.update import parent_of, update_bundle

    assert not is_bundle(world["student"]) and is_bundle(world["parent"])
    checkpoint, lineage = parent_of(world["student"])
    assert checkpoint == world["student"] and "parent_bundle" not in lineage
    # its test figures, as its bundle recorded them at export (the card's parent row had been empty)
    exported = json.loads((world["parent"] / "edgekd.json").read_text())["metrics"]["test"]
    figures = lineage["parent_test_metrics"]
    assert set(figures) == set(exported)  # the layout a bundle parent's has (it had been the whole eval record)
    assert figures["n"] == exported["n"] and figures["acc"] == pytest.approx(exported["acc"])
    assert figures["auc"] == pytest.approx(exported["auc"], abs=1e-6)
    out = tmp_path / "v2"
    lenient = FAST.model_copy(update={"min_retention": 0.0})
    update_bundle(world["student"], world["recipe"], out, run_dir=tmp_path / "run", profile=lenient, log=QUIET,
                  zip_bundle=True)
    meta = json.loads((out / "edgekd.json").read_text())
    assert open_bundle(tmp_path / "v2.zip").sha256 == open_bundle(out).sha256  # update --zip, as export --zip
    assert meta["lineage"]["parent_checkpoint_sha256"] == lineage["parent_checkpoint_sha256"]
    card = (out / "card.md").read_text()
    assert f"Updated from checkpoint `{lineage['parent_checkpoint']}`" in card
    assert f"| parent | {figures['acc']:.4f} |" in card


def test_the_service_answers_every_task_or_the_chosen_one(world):
    """`edgekd serve` on a multi-head bundle: each task's prediction side by side (views stripped per task unless
    asked for), or one task's with `--task`; /metadata lists the tasks."""
    import io

    from PIL import Image
    from test_serve import call

    from edgekd.runtime import Runner
    from edgekd.serve import create_app

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8), dtype=np.uint8)).save(buf, format="PNG")

    async def go(client):
        answer = await client.post("/predict", content=buf.getvalue(), headers={"content-type": "image/png"})
        return answer, await client.get("/metadata")

    both, meta = call(create_app(Runner.from_bundle(world["bundle"], tta=True, threads=1)), go)
    assert both.status_code == 200 and set(both.json()["tasks"]) == {"A", "B"}
    assert all("views" not in t for t in both.json()["tasks"].values())
    assert [t["name"] for t in meta.json()["tasks"]] == ["A", "B"] and meta.json()["task"] is None
    one, _ = call(create_app(Runner.from_bundle(world["bundle"], task="B", threads=1)), go)
    assert one.json()["task"] == "B" and len(one.json()["probs"]) == 3

    # ?task=: one task's answer from a service of every task (it had been ignored: every task answered)
    def asking(task):
        async def go_task(client):
            png = {"content": buf.getvalue(), "headers": {"content-type": "image/png"}}
            return (await client.post(f"/predict?task={task}", **png),
                    await client.post(f"/predict/batch?task={task}", files=[("files", ("a.png", buf.getvalue(),
                                                                                       "image/png"))]))
        return go_task

    every = Runner.from_bundle(world["bundle"], tta=True, threads=1)
    single, batch = call(create_app(every), asking("A"))
    assert single.status_code == 200 and single.json()["task"] == "A" and "tasks" not in single.json()
    assert single.json()["probs"] == pytest.approx(both.json()["tasks"]["A"]["probs"])
    assert batch.json()["results"][0]["task"] == "A" and "views" not in batch.json()["results"][0]
    refused, _ = call(create_app(every), asking("C"))
    assert refused.status_code == 400 and refused.json()["error"] == "task 'C': not a task of this bundle (A, B)"
    other, _ = call(create_app(Runner.from_bundle(world["bundle"], task="B", threads=1)), asking("A"))
    assert other.status_code == 400 and "answers task 'B' only" in other.json()["error"]
    twice, _ = call(create_app(every), asking("A&task=B"))
    assert twice.status_code == 400 and twice.json()["error"] == "task: given more than once (one task per request)"


def test_export_one_class_warning_is_per_task_on_a_multi_head_model():
    from edgekd.export.parity import ParitySet
    from edgekd.export.run import _one_class_warnings

    # task A: outputs 0-1 (labels 0, 1), task B: outputs 2-4 (labels 2, 3, 4); val holds 6 of A and 6 of B
    y = np.array([0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    split = (np.zeros((12, 3, 8, 8), np.float32), y)
    reference = {"splits": {"val": {"metrics": {"acc": 0.5, "tasks": {"A": {"acc": 4 / 6}, "B": {"acc": 0.5}}}}}}
    lines = []
    found = _one_class_warnings(reference, ParitySet(split[0], [], {"val": split}, [("A", 0, 2), ("B", 2, 5)]),
                                lines.append)
    # A at 4/6 is exactly its largest class's share (4 of 6): warned; B at 0.5 is over 2/6: not warned
    assert found == [w.split("checkpoint's ", 1)[1] for w in lines] and len(found) == 1
    assert found[0].startswith("val (task A) ACC 0.6667 is no better") and "(0.6667)" in found[0]


def test_a_single_head_decision_or_calibration_on_a_multi_head_model_is_refused_not_dropped():
    """A profile's sensitivity rule or Platt scaling was dropped without a word for a multi-head model (a
    single-head multi-class one refuses such a rule)."""
    from edgekd.export.parity import ParitySet
    from edgekd.export.run import _clinical

    y = np.array([0, 1, 2, 3, 4, 2])
    x = np.zeros((6, 3, 8, 8), np.float32)
    heads = ParitySet(x, [], {"val": (x, y)}, [("A", 0, 2), ("B", 2, 5)])
    for raw, said in (({"decision": {"rule": "sensitivity", "target": 0.9}}, "decision.rule sensitivity"),
                      ({"calibration": {"method": "platt"}}, "calibration.method platt")):
        with pytest.raises(EdgeKDError, match=rf"^export profile default: {said} is for a single-head model; a "
                                              "multi-head model's heads each label by their top class"):
            _clinical({}, heads, profile_from_dict(raw), {"class_names": []}, lambda *_: None)
    assert _clinical({}, heads, profile_from_dict({}), {"class_names": []}, lambda *_: None) == {}


def test_update_runs_in_a_folder_per_output_bundle(world, tmp_path, monkeypatch):
    """Two updates of one parent to two bundles must not share a run folder: the second would overwrite the
    checkpoint the first bundle names (it then failed its manifest check)."""
    import edgekd.continual
    from edgekd.update import update_bundle

    seen = []

    def stop(recipe, run_dir, **_):
        seen.append(Path(run_dir))
        raise RuntimeError("stop before training")

    monkeypatch.setattr(edgekd.continual, "run_continual", stop)
    monkeypatch.chdir(tmp_path)
    for out in ("v2", "v2b"):
        with pytest.raises(RuntimeError, match="stop before training"):
            update_bundle(world["parent"], world["recipe"], tmp_path / out, log=QUIET)
    assert len(set(seen)) == 2 and [p.name.rsplit("-", 1)[-1] for p in seen] == ["v2", "v2b"]
    # A folder holding an earlier run (a bundle may name its model.pt; a refused re-run had replaced it) is not reused:
    # the default takes the next free suffix, a --run-dir given is refused.
    seen[0].mkdir(parents=True)
    (seen[0] / "model.pt").write_bytes(b"an earlier update's model")
    with pytest.raises(RuntimeError, match="stop before training"):
        update_bundle(world["parent"], world["recipe"], tmp_path / "elsewhere" / "v2", log=QUIET)
    assert seen[-1] == seen[0].with_name(seen[0].name + "-2")
    with pytest.raises(EdgeKDError, match="is not empty"):
        update_bundle(world["parent"], world["recipe"], tmp_path / "v3", run_dir=seen[0], log=QUIET)
    assert (seen[0] / "model.pt").read_bytes() == b"an earlier update's model"


def test_update_refuses_what_would_break_the_parent_or_retrain_its_task(world, tmp_path, monkeypatch):
    import edgekd.continual
    from edgekd.update import update_bundle

    monkeypatch.setattr(edgekd.continual, "run_continual", lambda *a, **k: pytest.fail("trained"))
    parent = tmp_path / "parent"
    shutil.copytree(world["parent"], parent)
    with pytest.raises(EdgeKDError, match="is inside the input"):  # it wrote card.md etc. into the parent
        update_bundle(parent, world["recipe"], parent / "sub", run_dir=tmp_path / "r", log=QUIET)
    with pytest.raises(EdgeKDError, match="--run-dir .* is inside the input"):
        update_bundle(parent, world["recipe"], tmp_path / "v2", run_dir=parent / "run", log=QUIET)
    assert sorted(p.name for p in parent.iterdir()) == sorted(p.name for p in world["parent"].iterdir())
    with pytest.raises(EdgeKDError, match="checkpoint_task is false"):  # it threw the deployed head away, gate passed
        update_bundle(parent, world["recipe"], tmp_path / "v2", ["continual.checkpoint_task=false"],
                      run_dir=tmp_path / "r", log=QUIET)
    with pytest.raises(EdgeKDError, match=r"one head per task \(A, B\) cannot be updated again"):
        update_bundle(world["cl"].best_path, world["recipe"], tmp_path / "v3", run_dir=tmp_path / "r", log=QUIET)
    # --resume: the folder must be named (the default may have taken a suffix) and unfinished
    with pytest.raises(EdgeKDError, match="--resume needs --run-dir"):
        update_bundle(parent, world["recipe"], tmp_path / "v2", resume=True, log=QUIET)
    with pytest.raises(EdgeKDError, match=r"--run-dir .*nowhere: no such folder, nothing to resume"):  # up front
        update_bundle(parent, world["recipe"], tmp_path / "v2", resume=True, run_dir=tmp_path / "nowhere", log=QUIET)
    # A finished run (an update stopped during its export) is exported as it is, not trained (run_continual fails
    # the test if called): here its retention gate refuses it.
    with pytest.raises(RetentionGateError, match="task 'A'"):
        update_bundle(parent, world["recipe"], tmp_path / "v2", run_dir=world["cl"].out, resume=True, log=QUIET,
                      profile=FAST)
    with pytest.raises(EdgeKDError, match="--run-dir .* is inside --out .*v9, the bundle the export writes"):
        update_bundle(parent, world["recipe"], tmp_path / "v9", run_dir=tmp_path / "v9" / "run", log=QUIET)
    passed = {}

    def record(recipe, run_dir, **kwargs):
        passed.update(kwargs, run_dir=run_dir)
        raise RuntimeError("stop before training")

    monkeypatch.setattr(edgekd.continual, "run_continual", record)
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "task1_A").mkdir()
    with pytest.raises(RuntimeError, match="stop before training"):  # a non-empty folder is taken as it is
        update_bundle(parent, world["recipe"], tmp_path / "v2", run_dir=tmp_path / "cut", resume=True, log=QUIET)
    assert passed["resume"] is True and passed["run_dir"] == tmp_path / "cut"
    shutil.copytree(world["parent"], tmp_path / "earlier")  # an earlier bundle at --out is replaced, as export does
    with pytest.raises(RuntimeError, match="stop before training"):  # (it was refused: "whose manifest would ...")
        update_bundle(parent, world["recipe"], tmp_path / "earlier", run_dir=tmp_path / "r2", log=QUIET)

    def stopped_in_first_epoch(recipe, run_dir, **kwargs):  # as run_continual leaves it before its first checkpoint
        (run_dir / "task2_B").mkdir(parents=True)
        (run_dir / "recipe.yaml").write_text("name: x\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(edgekd.continual, "run_continual", stopped_in_first_epoch)
    with pytest.raises(KeyboardInterrupt):  # the new folder goes: it could neither be resumed nor reused
        update_bundle(parent, world["recipe"], tmp_path / "v2", run_dir=tmp_path / "early", log=QUIET)
    assert not (tmp_path / "early").exists()


def test_update_never_replaces_the_parent_zip_resumes_only_its_own_run_and_keeps_the_parents_resize(world, tmp_path):
    """`update q.zip ... --out q` had removed q.zip as the stale zip of the bundle it replaced (both copies of the
    parent gone); a resumed finished run had been exported with the lineage of a parent retrained since; a first
    task resized otherwise than the parent was trained had been trained and exported at the new resize."""
    from edgekd.continual import run_continual
    from edgekd.train.checkpoint import load_checkpoint
    from edgekd.update import continual_run, update_bundle

    (tmp_path / "q.zip").write_bytes(b"PK")  # refused before it is read
    with pytest.raises(EdgeKDError, match=r"--out \S+q: its zip \S+q.zip is the parent bundle"):
        update_bundle(tmp_path / "q.zip", world["recipe"], tmp_path / "q", run_dir=tmp_path / "r", log=QUIET)
    recipe = recipe_from_dict(load_checkpoint(world["cl"].best_path)["recipe"])
    other = tmp_path / "other.pt"
    other.write_bytes(world["student"].read_bytes() + b"retrained")
    with pytest.raises(EdgeKDError, match=r"--resume: the continual run in \S+ began from another \S+other.pt"):
        continual_run(recipe, world["cl"].out, other, True, QUIET, None)
    raw = load_checkpoint(world["cl"].best_path)["recipe"]
    raw["continual"]["tasks"][0]["data"]["resize"] = 12
    raw["data"]["resize"] = 12
    with pytest.raises(EdgeKDError, match=r"preprocess resize=8 but the recipe's data gives 12"):
        run_continual(recipe_from_dict(raw), tmp_path / "resized", log=QUIET)


def test_a_finished_continual_run_is_read_back_as_it_is(world):
    """`update --resume` after a stop during the export: the finished run is exported, not trained again (its
    model.pt may be named by a bundle already)."""
    from edgekd.continual import finished_run
    from edgekd.train.checkpoint import load_checkpoint

    model = world["cl"].best_path
    before = model.read_bytes()
    done = finished_run(world["cl"].out, recipe_from_dict(load_checkpoint(model)["recipe"]))
    assert done.best_path == model and model.read_bytes() == before
    np.testing.assert_array_equal(np.asarray(done.acc_matrix, float), np.asarray(world["cl"].acc_matrix, float))
    assert finished_run(world["cl"].out / "nowhere", None) is None


def test_an_update_from_a_folder_whose_name_reads_as_yaml_keeps_the_path(world, tmp_path):
    """The parent's path went through --set's YAML parsing: a folder named 'exp: v2' became a mapping, refused as a
    --set the user never typed."""
    from edgekd.update import update_recipe

    parent = tmp_path / "exp: v2" / "best.pt"
    parent.parent.mkdir()
    shutil.copy(world["student"], parent)
    recipe = update_recipe(world["recipe"], [], parent, parent)
    assert recipe.continual.checkpoint == str(parent.resolve())


def test_update_exports_with_the_parent_profile():
    from edgekd.export import load_profile, profile_digest
    from edgekd.update import update_profile

    said: list[str] = []
    shipped = update_profile("cpu-onnx-fp32", profile_digest(load_profile("cpu-onnx-fp32")), said.append)
    assert shipped == load_profile("cpu-onnx-fp32") and said == [
        "update: exporting with the parent's profile cpu-onnx-fp32 (--target PROFILE to choose another)"]
    assert update_profile("default", "0" * 16, said.append) == load_profile(None) and "differ" in said[-1]
    assert update_profile("my-own", None, said.append) == load_profile(None) and said[-1].startswith("warning:")


def test_an_update_to_more_than_two_classes_leaves_the_parents_two_class_settings(monkeypatch):
    """An update with one head over old and new classes exported with the parent's recorded settings, whose every
    default (decision.positive 1) read as set: the export refused 'decision.positive is for a two-class model'
    after training, every time."""
    import edgekd.train.checkpoint as checkpoint
    from edgekd.export import load_profile, profile_from_dict
    from edgekd.update import fit_profile_to_classes, update_profile

    classes = {"n": 7}
    monkeypatch.setattr(checkpoint, "load_checkpoint",
                        lambda path: {"class_names": [str(i) for i in range(classes["n"])]})
    said: list[str] = []
    recorded = update_profile("default", None, said.append, load_profile(None).model_dump(mode="json"))
    assert "positive" in recorded.decision.model_fields_set  # what the export refused
    fitted = fit_profile_to_classes(recorded, Path("model.pt"), said.append)
    assert "positive" not in fitted.decision.model_fields_set and len(said) == 1  # defaults: nothing to say
    assert fitted.calibration == recorded.calibration and fitted.formats == recorded.formats
    binary = profile_from_dict({"formats": ["onnx"], "calibration": {"method": "platt"},
                                "decision": {"rule": "sensitivity", "target": 0.95, "positive": "pneumonia"}})
    fitted = fit_profile_to_classes(binary, Path("model.pt"), said.append)
    assert fitted.decision == load_profile(None).decision and fitted.calibration.method == "temperature"
    assert fitted.formats == ["onnx"] and said[-1] == (
        "note: the updated model has 7 classes, so the parent's two-class decision.rule sensitivity, "
        "decision.positive 'pneumonia', calibration.method platt do not apply: it predicts the top class "
        "(calibration: temperature)")
    classes["n"] = 2  # still two classes: the parent's operating point stays
    assert fit_profile_to_classes(binary, Path("model.pt"), said.append) is binary and len(said) == 2


def test_update_of_a_plain_folder_is_refused_by_name(tmp_path):
    # It was sha256-summed as a checkpoint: "error: 21: is a directory".
    from edgekd.errors import EdgeKDError
    from edgekd.update import parent_of

    (tmp_path / "run").mkdir()
    with pytest.raises(EdgeKDError, match="run: a folder that is not an edgekd bundle"):
        parent_of(tmp_path / "run")


def test_corruption_eval_and_explain_refuse_a_multi_head_model(world, tmp_path):
    """One softmax over every head's outputs mixed the tasks (7 of 200 X-rays 'predicted' as fashion classes)."""
    from edgekd.explain.gradcam import explain_files
    from edgekd.robustness.evaluate import bundle_predictors, checkpoint_predictor

    with pytest.raises(EdgeKDError, match="one head per task"):
        bundle_predictors(world["bundle"])
    with pytest.raises(EdgeKDError, match="one head per task"):
        checkpoint_predictor(world["cl"].best_path)
    with pytest.raises(EdgeKDError, match="one head per task"):
        explain_files(world["cl"].best_path, [tmp_path / "x.png"], tmp_path / "cam")


def test_update_exports_with_the_settings_the_parent_records_whatever_its_profile_was_called():
    """A parent exported with a user's profile without `name:` (recorded as "default") or an edited copy keeping
    a shipped name was re-exported with the defaults or the shipped file: other views, threads and formats."""
    from edgekd.export import load_profile, profile_digest, profile_from_dict
    from edgekd.update import update_profile

    own = profile_from_dict({"formats": ["onnx"], "threads": 1, "tta": {"views": ["original"]}})
    assert own.name == "default"
    said: list[str] = []
    got = update_profile(own.name, profile_digest(own), said.append, own.model_dump(mode="json"))
    assert got == own and got != load_profile(None) and said == [
        "update: exporting with the parent's export settings (profile default, as its edgekd.json records them; "
        "they differ from that profile in formats, threads, tta.views: the parent's command-line options or an "
        "edited copy; --target PROFILE to choose another)"]
    said.clear()
    update_profile("default", None, said.append, load_profile(None).model_dump(mode="json"))
    assert "differ" not in said[0]
    stale = {**own.model_dump(mode="json"), "removed_key": 1}  # recorded by an edgekd with other keys
    assert update_profile("cpu-onnx-fp32", None, said.append, stale) == load_profile("cpu-onnx-fp32")
    assert said[-2].startswith("note: the parent's export_profile_settings: unknown key 'removed_key'")


def test_an_update_whose_first_task_reads_other_data_says_so(world, tmp_path):
    """An update of a demo-set student with a recipe on the full PneumoniaMNIST passed silently: the retention gate
    and the card compared the parent's test figures on one set with the child's on another."""
    import shutil

    from edgekd.export.bundle import _lineage_section
    from edgekd.update import first_task_data_note, update_recipe

    same = update_recipe(world["recipe"], [], world["student"], world["student"])
    assert first_task_data_note(same, world["student"]) is None
    other = shutil.copy(world["root"] / "a.npz", tmp_path / "elsewhere.npz")
    moved = update_recipe(world["recipe"], [f"continual.tasks.0.data.path={other}"], world["student"], world["student"])
    note = first_task_data_note(moved, world["student"])
    assert note.startswith("the first task 'A' reads medmnist ") and "elsewhere.npz, not the data the deployed" in note
    card = "\n".join(_lineage_section({"lineage": {"parent_checkpoint": "p.pt", "data_note": note}, "metrics": {}}))
    assert f"Note: {note}." in card
    # the same data with another data.limit: the card's parent row is on other test images (400 vs 624 had been
    # compared without a word)
    limited = update_recipe(world["recipe"], ["continual.tasks.0.data.limit=8"], world["student"], world["student"])
    assert first_task_data_note(limited, world["student"]).startswith(
        "the first task 'A' reads its data with data.limit 8, the deployed model was scored with no data.limit")
    # a limit above every split's size keeps the very test images the parent was scored on: no note (a limit of
    # 600 against the parent's 400-image test split had been warned of as other test images)
    whole = update_recipe(world["recipe"], ["continual.tasks.0.data.limit=100000"], world["student"], world["student"])
    assert first_task_data_note(whole, world["student"]) is None


def test_a_one_head_update_card_compares_the_parent_with_its_task_row_not_a_mean():
    """A one-head child's lineage table gave its pooled figures a 'per task' reading; its task rows now come from
    each task's images with every class competing (ACC only: a task's pair is no binary problem of the model)."""
    from edgekd.export.bundle import _lineage_section

    test = {"acc": 0.5, "auc": 0.8, "sensitivity": 0.4, "specificity": 0.9, "n": 700,
            "tasks": {"retina": {"acc": 0.3, "f1": 0.2, "n": 400}, "pneumonia": {"acc": 0.75, "f1": 0.7, "n": 300}}}
    card = _lineage_section({"lineage": {"parent_checkpoint": "p.pt"}, "metrics": {"test": test}})
    assert "| this bundle (every task's images and classes) | 0.5000 | 0.8000 | 0.4000 | 0.9000 | 700 |" in card
    assert "| this bundle, task retina | 0.3000 | - | - | - | 400 |" in card
    assert not any("unweighted mean" in line for line in card) and "ACC only" in card[-1]
    heads = _lineage_section({"lineage": {"parent_checkpoint": "p.pt"}, "metrics": {"test": test},
                              "tasks": [{"name": "retina"}, {"name": "pneumonia"}]})
    assert any(line.startswith("| this bundle (unweighted mean over tasks) | 0.5000 | 0.8000 | - | - |")
               for line in heads)


def test_bench_times_a_continual_model_and_refuses_to_score_it_as_one_softmax(world, tmp_path):
    """bench of a multi-head bundle with --data: the runner row failed ('TaskPredictions' object has no attribute
    'probs') and the bare rows scored one softmax over every head; a continual checkpoint was scored on its first
    data section ("has 5 classes, the student model 7")."""
    from edgekd.bench.run import BenchConfig, Timing, run_bench

    quick = Timing(warmup=0, min_runs=2, min_seconds=0)
    done = run_bench(BenchConfig(world["bundle"], tmp_path / "b", formats="torch,onnx", precisions="fp32",
                                 batches="1", gemm=False, timing=quick, checkpoint=world["cl"].best_path,
                                 variants={"torch": ("eager",), "onnx": ("bare", "runner")}), log=lambda *_: None)
    assert [r["status"] for r in done.records] == ["ok", "ok", "ok"]
    assert all(r.get("acc") is None for r in done.records)
    notes = json.dumps(json.loads((tmp_path / "b" / "bench.json").read_text()))
    assert "a continual-learning model (one head per task): timed on random images" in notes
    # the checkpoint itself, though task A's retention is below the profile's min_retention: exported and timed
    # (the gate had refused it, naming an --allow-forgetting bench does not have)
    said: list[str] = []
    alone = run_bench(BenchConfig(world["cl"].best_path, tmp_path / "c", formats="onnx", precisions="fp32",
                                  batches="1", gemm=False, timing=quick, variants={"onnx": ("bare",)},
                                  keep_work=True), log=said.append)
    assert [r["status"] for r in alone.records] == ["ok"] and alone.records[0].get("acc") is None
    # ... said, and its card names bench, not an --allow-forgetting nobody gave
    assert any(line.startswith("warning: the retention gate would refuse this model (task 'A': retention")
               and line.endswith("edgekd bench, which times a model whatever its retention; not for deployment "
                                 "exports it all the same and its card says so") for line in said), said
    card = next((tmp_path / "c").rglob("card.md")).read_text()
    assert "(exported by edgekd bench, which times a model whatever its retention; not for deployment):" in card
    assert "--allow-forgetting" not in card
    folder = tmp_path / "labelled"
    for name in ("A:class_0", "A:class_1"):
        (folder / name).mkdir(parents=True)
    with pytest.raises(EdgeKDError, match=r"^--data: the student is a continual-learning model \(one head per task\), "
                                          r"scored per task by `edgekd eval`"):
        run_bench(BenchConfig(world["bundle"], tmp_path / "refused", formats="onnx", precisions="fp32", batches="1",
                              gemm=False, timing=quick, data_folder=folder), log=lambda *_: None)
    assert not (tmp_path / "refused").exists()


def test_a_multi_head_models_top1_agreement_is_its_lowest_heads():
    """The card and console showed the argmax over both heads' outputs (98.96%) beside the per-head gate's FAIL
    (97.40%)."""
    from edgekd.export.parity import head_parity, top1_agreement

    ref = np.array([[5.0, 0.0, 0.0, 1.0, 0.0], [5.0, 0.0, 1.0, 0.0, 0.0],
                    [0.0, 5.0, 0.0, 0.0, 1.0], [0.0, 5.0, 1.0, 0.0, 0.0]])
    art = ref.copy()
    art[0, 3:] = [0.0, 1.0]  # head B flips on row 0 and row 2: the argmax over all five outputs (head A's 5) agrees
    art[2, 3:] = [1.0, 0.0]
    heads = [("A", 0, 2), ("B", 2, 5)]
    assert top1_agreement(art, ref) == 1.0  # over every output: all four agree
    assert top1_agreement(art, ref, heads) == 0.5  # head B: 2 of 4
    record, failures = head_parity(art, ref, heads, 0.98)
    assert top1_agreement(art, ref, heads) == min(h["top1_agreement"] for h in record.values())
    assert failures and failures[0].startswith("head 'B'")


def test_a_heads_top1_agreement_is_taken_on_its_own_tasks_inputs():
    """Head B's flips on its own task's rows had been diluted by head A's rows (where B's answer is no
    prediction): 2 of 4 rows read 50%, but B's own 2 rows both flip."""
    from edgekd.export.parity import head_parity, label_heads, top1_agreement

    ref = np.array([[5.0, 0.0, 0.0, 1.0, 0.0], [5.0, 0.0, 1.0, 0.0, 0.0],
                    [0.0, 5.0, 0.0, 0.0, 1.0], [0.0, 5.0, 1.0, 0.0, 0.0]])
    art = ref.copy()
    art[2, 3:] = [1.0, 0.0]  # head B flips on rows 2 and 3 (task B's), head A's rows 0 and 1 agree on B too
    art[3, 2:] = [0.0, 2.0, 0.0]
    heads, rows = [("A", 0, 2), ("B", 2, 5)], np.array([0, 0, 1, 1])
    assert top1_agreement(art, ref, heads) == 0.5
    assert top1_agreement(art, ref, heads, rows) == 0.0
    record, failures = head_parity(art, ref, heads, 0.98, input_heads=rows)
    assert record["A"]["top1_agreement"] == 1.0 and record["A"]["inputs"] == 2
    assert record["B"]["top1_agreement"] == 0.0 and record["B"]["inputs"] == 2
    assert record["B"]["max_abs_diff"] == 2.0  # values over every row: every output is the artifact's to reproduce
    assert failures == ["head 'B': top-1 agreement 0.00% < 98.00% (2 of 2 differ)"]
    # a head with no rows of its own in a slice (one view's rows, say) is left out, not counted as 0 or 1
    assert top1_agreement(art[:2], ref[:2], heads, rows[:2]) == 1.0
    assert label_heads(np.array([1, 4, 2, 0, 7]), heads).tolist() == [0, 1, 1, 0, -1]


def test_serve_says_which_task_it_serves(world, monkeypatch):
    from typer.testing import CliRunner

    import edgekd.serve
    from edgekd.cli import app

    served = []
    monkeypatch.setattr(edgekd.serve, "serve", lambda runner, settings: served.append(runner.task))
    monkeypatch.setattr(edgekd.serve, "check_port_free", lambda host, port: None)
    res = CliRunner().invoke(app, ["serve", str(world["bundle"]), "--task", "B", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert served == ["B"] and ", task B) at http://" in " ".join(res.output.split())
    res = CliRunner().invoke(app, ["serve", str(world["bundle"]), "--threads", "1"])
    assert ", every task) at http://" in " ".join(res.output.split())


def test_eval_scores_a_labelled_folder_by_the_head_of_the_task_given(world, tmp_path):
    """`eval --data DIR` refused every model with one head per task (one softmax would mix them) and had no --task."""
    from PIL import Image
    from typer.testing import CliRunner

    from edgekd.cli import app
    from edgekd.explain.gradcam import checkpoint_pipeline
    from edgekd.imageio import read_image

    rng = np.random.default_rng(3)
    folder, labels, inputs = tmp_path / "xrays", [], []
    for c in range(3):
        (folder / f"class_{c}").mkdir(parents=True)
        for k in range(3):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / f"class_{c}" / f"{k}.png")
            labels.append(c)
            inputs.append(folder / f"class_{c}" / f"{k}.png")
    res = CliRunner().invoke(app, ["eval", str(world["cl"].best_path), "--data", str(folder), "--task", "B",
                                   "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    model, ckpt = model_from_checkpoint(world["cl"].best_path)
    geometry, normalize = checkpoint_pipeline(ckpt)
    x = torch.stack([normalize(geometry(torch.from_numpy(read_image(f).copy()).permute(2, 0, 1))) for f in inputs])
    with torch.no_grad():
        predicted = model.eval()(x)[:, 2:5].argmax(1).numpy()  # task B's outputs [2, 5)
    assert saved["task"] == "B" and saved["folder"]["n"] == 9
    assert saved["folder"]["acc"] == pytest.approx(float(np.mean(predicted == np.array(labels))))
    for args, said in (([], "one head per task; give --task (A, B): one softmax over every head's outputs would mix"),
                       (["--task", "C"], "--task C: not a task of"),
                       (["--task", "A", "--data", str(world["root"] / "b.npz")], "--task A: chooses the head that "
                                                                                 "scores a labelled folder")):
        data = [] if "--data" in args else ["--data", str(folder)]
        res = CliRunner().invoke(app, ["eval", str(world["cl"].best_path), *data, *args, "--out", str(tmp_path / "x")])
        assert res.exit_code != 0 and said in str(res.exception), (args, res.output, res.exception)
    res = CliRunner().invoke(app, ["eval", str(world["student"]), "--data", str(folder), "--task", "A",
                                   "--out", str(tmp_path / "x")])
    assert res.exit_code != 0 and "--task A: " in str(res.exception) and "has one head" in str(res.exception)
    res = CliRunner().invoke(app, ["eval", str(world["parent"]), "--corruptions", "--data", str(folder), "--task", "A",
                                   "--out", str(tmp_path / "x")])  # a bundle: --task had been ignored
    assert res.exit_code != 0 and "--task A: chooses a checkpoint's head" in str(res.exception)
    assert not (tmp_path / "x").exists()


def test_explain_takes_a_task_of_a_multi_head_model(world, tmp_path):
    """explain refused every model with one head per task, one of a single task too, and had no --task."""
    from PIL import Image

    from edgekd.explain.gradcam import explain_files

    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)).save(image)
    records = explain_files(world["cl"].best_path, [image], tmp_path / "cam", task="B", target="class_2")
    (rec,) = records
    from edgekd.explain.gradcam import checkpoint_pipeline
    from edgekd.imageio import read_image

    model, ckpt = model_from_checkpoint(world["cl"].best_path)
    geometry, normalize = checkpoint_pipeline(ckpt)
    x = normalize(geometry(torch.from_numpy(read_image(image).copy()).permute(2, 0, 1)))[None]
    with torch.no_grad():
        head_b = torch.softmax(model.eval()(x)[:, 2:5], 1)[0].numpy()  # task B's outputs [2, 5)
    assert rec["probs"] == pytest.approx(head_b.tolist(), abs=1e-5)
    assert rec["target"] == "class_2" and not rec["layer"].startswith("net.")
    # the layer recorded is one --layer takes (it had been the wrapper's net.<layer>, which --layer refused), and the
    # wrapper's spelling, from an earlier explain.json, is taken too
    for given in (rec["layer"], f"net.{rec['layer']}"):
        again = explain_files(world["cl"].best_path, [image], tmp_path / "cam_l", task="B", target="class_2",
                              layer=given)
        assert again[0]["layer"] == rec["layer"] and again[0]["peak_yx"] == rec["peak_yx"]
    assert json.loads((tmp_path / "cam" / "explain.json").read_text())["task"] == "B"
    with pytest.raises(EdgeKDError, match=r"one head per task; give --task \(A, B\)"):
        explain_files(world["cl"].best_path, [image], tmp_path / "cam2")
    with pytest.raises(EdgeKDError, match=r"^--task C: not a task of .* \(A, B\)$"):
        explain_files(world["cl"].best_path, [image], tmp_path / "cam2", task="C")
    with pytest.raises(EdgeKDError, match=r"^--task A: .* has one head"):
        explain_files(world["student"], [image], tmp_path / "cam2", task="A")
    with pytest.raises(EdgeKDError, match=r"--target 'A:class_0': not a class \(class_0, class_1, class_2\)"):
        explain_files(world["cl"].best_path, [image], tmp_path / "cam2", task="B", target="A:class_0")
    spelled = explain_files(world["cl"].best_path, [image], tmp_path / "cam3", task="B", target="B:class_1")
    assert spelled[0]["target"] == "class_1"  # TASK:CLASS, as the model's class names are
    with pytest.raises(EdgeKDError) as wrong_layer:
        explain_files(world["cl"].best_path, [image], tmp_path / "cam2", task="B", layer="nope")
    assert "net." not in str(wrong_layer.value)  # the layer as the user named it


def test_the_runner_check_of_a_multi_head_bundle_compares_each_head():
    from types import SimpleNamespace

    from edgekd.export.profile import RunnerCheck
    from edgekd.export.runner_check import _compare_heads

    rng = np.random.default_rng(0)
    parts = [(None, [0, 1, 2]), (None, [0, 1])]  # two tasks' images; two views each: rows view-major per task
    logits = rng.normal(size=(2 * 5, 5)) * 3
    heads = [("A", 0, 2), ("B", 2, 5)]

    def mean_probs(lo, hi):
        blocks = [logits[:6, lo:hi], logits[6:, lo:hi]]
        return np.concatenate([softmax(b).reshape(2, len(b) // 2, -1).mean(0) for b in blocks])

    right = {name: mean_probs(lo, hi) for name, lo, hi in heads}
    preds = [SimpleNamespace(tasks={n: SimpleNamespace(probs=right[n][i]) for n in right}) for i in range(5)]
    row = _compare_heads(preds, logits, parts, 2, heads, RunnerCheck())
    assert row["problems"] == [] and row["max_prob_diff"] < 1e-12 and set(row["heads"]) == {"A", "B"}
    preds[3].tasks["B"].probs = right["B"][3][::-1]  # head B answers image 3 with its classes reversed
    row = _compare_heads(preds, logits, parts, 2, heads, RunnerCheck())
    assert row["problems"] and all(p.startswith("head 'B': ") for p in row["problems"])
    assert row["heads"]["A"]["max_prob_diff"] < 1e-12 < row["heads"]["B"]["max_prob_diff"] == row["max_prob_diff"]


def test_the_runner_checks_a_heads_top1_agreement_on_its_own_tasks_images():
    """Head A answering task B's images differently is no prediction of the runner's; on A's own images it agrees."""
    from types import SimpleNamespace

    from edgekd.export.profile import RunnerCheck
    from edgekd.export.runner_check import _compare_heads

    parts = [(None, [0, 1]), (None, [0, 1])]  # task A's two images, then task B's; one view
    logits = np.array([[4.0, 0.0, 4.0, 0.0, 0.0], [0.0, 4.0, 0.0, 4.0, 0.0],
                       [4.0, 0.0, 4.0, 0.0, 0.0], [0.0, 4.0, 0.0, 0.0, 4.0]])
    heads = [("A", 0, 2), ("B", 2, 5)]
    probs = {name: softmax(logits[:, lo:hi]) for name, lo, hi in heads}
    preds = [SimpleNamespace(tasks={n: SimpleNamespace(probs=p[i].copy()) for n, p in probs.items()}) for i in range(4)]
    preds[2].tasks["A"].probs = probs["A"][2][::-1].copy()  # head A flips on task B's images only
    preds[3].tasks["A"].probs = probs["A"][3][::-1].copy()
    row = _compare_heads(preds, logits, parts, 1, heads, RunnerCheck(max_prob_diff=None))
    assert row["heads"]["A"]["top1_agreement"] == 1.0 and row["problems"] == []
    assert row["heads"]["A"]["max_prob_diff"] > 0.9  # the probabilities are still compared on every image
    preds[0].tasks["A"].probs = probs["A"][0][::-1].copy()  # now on one of its own
    row = _compare_heads(preds, logits, parts, 1, heads, RunnerCheck(max_prob_diff=None))
    assert row["heads"]["A"]["top1_agreement"] == 0.5 and row["problems"][0].startswith("head 'A': top-1 agreement")


def test_a_one_head_continual_cards_grad_cam_picks_from_every_tasks_images():
    """The card's Grad-CAM of a class-incremental model took the last task's test images only (its 4 "classes in
    turn" were all bag/boot): the tasks' test sets are joined, labels global, as one dataset."""
    from types import SimpleNamespace

    from edgekd.export.continual import JoinedDataset

    class Part:
        def __init__(self, labels, tag):
            self.table, self.tag = SimpleNamespace(labels=np.asarray(labels)), tag

        def __len__(self):
            return len(self.table.labels)

        def __getitem__(self, i):
            return i

        def raw(self, i):
            return (self.tag, i)

    joined = JoinedDataset([Part([0, 1, 0], "a"), Part([2, 3], "b"), Part([4, 5, 4], "c")])
    assert joined.table.labels.tolist() == [0, 1, 0, 2, 3, 4, 5, 4] and len(joined) == 8
    assert [joined.raw(i) for i in range(8)] == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("c", 0),
                                                 ("c", 1), ("c", 2)]


def test_the_cards_top1_resolution_counts_a_heads_own_inputs():
    """Each head is gated on its own task's inputs: 2 tasks x 32 gave 64 inputs in all, enough for one flip under a
    98% limit, and the card said nothing, though each head's 32 are not."""
    from edgekd.export.bundle import _top1_resolution

    heads = {"A": {"inputs": 32}, "B": {"inputs": 32}}
    parity = {"inputs": 64, "views": ["original"], "reference": {"split_images": {"val": 500}},
              "artifacts": [{"tolerance": {"top1_agreement": 0.98}, "heads": heads}]}
    assert _top1_resolution(parity).startswith(" With 32 inputs a single differing top-1 prediction fails the 98.00%")
    assert _top1_resolution({**parity, "artifacts": [{"tolerance": {"top1_agreement": 0.98}}]}) == ""  # one head
