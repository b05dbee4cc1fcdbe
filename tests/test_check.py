"""`edgekd check`: every shipped recipe builds and steps on synthetic data; broken recipes fail in one line."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import yaml

from edgekd.check import check_recipe, synthetic_images, synthetic_recipe
from edgekd.errors import EdgeKDError
from edgekd.recipe import load_recipe

from conftest import REPO, write_image_folder

RECIPES = sorted(str(p.relative_to(REPO)) for p in (REPO / "recipes").rglob("*.yaml"))
# Small batches keep the full-size models (ConvNeXtV2-Large at 224 px, SwinV2 at 256) at their real input size
# within the suite's time (one batch per optimizer step); in-process loading (no worker processes) for the same reason.
SMALL = ["data.batch_size=2", "data.num_workers=0", "train.grad_accum=1"]


@pytest.fixture(autouse=True)
def _from_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name their teacher_recipe relative to the repository


@pytest.mark.parametrize("path", RECIPES)
def test_every_shipped_recipe_checks_on_synthetic_data(path):
    r = check_recipe(path, SMALL, synthetic=True, steps=2)  # builds and runs each recipe; 2 steps keep the suite short
    raw = yaml.safe_load((REPO / path).read_text())
    assert r.params > 0 and r.step_seconds > 0 and r.peak_rss_mb > 0
    assert r.input_size[1] == r.input_size[2] >= 8
    assert r.train_images is None and r.epoch_seconds is None  # synthetic: no epoch estimate
    assert r.macs and r.macs > 0  # a continual recipe's too: its final model's
    if r.kind == "distill":
        assert r.teacher
    assert r.stand_ins and r.stand_ins[0].startswith(("model:", "data:"))
    # The result is the shipped file's own recipe, checked at its real input size (only data and checkpoints are
    # stood in): not a base it extends, not a smaller stand-in.
    shipped = load_recipe(path, SMALL)
    assert r.recipe == path and r.name == raw["name"] == shipped.name
    assert r.input_size == [shipped.data.channels, shipped.data.image_size, shipped.data.image_size]


def test_check_on_real_data_estimates_an_epoch(tiny_recipe_dict, tmp_path):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe_dict))
    r = check_recipe(tmp_path / "r.yaml")
    assert r.train_images == 48 and r.stand_ins == []
    assert r.epoch_seconds == pytest.approx(r.step_seconds * 6)  # 48 images / batch 8
    # the step time is the median of the steps after the first (one timed step had varied 10x under load)
    assert r.timed_steps == 4 and r.step_range[0] <= r.step_seconds <= r.step_range[1]
    import edgekd.check as check

    with pytest.MonkeyPatch.context() as mp:  # a warm-up of 9 s and one slow step under load move it little
        mp.setattr(check, "_step_seconds", lambda result: [[9.0, 0.5, 0.25, 0.3, 0.2]])
        r = check_recipe(tmp_path / "r.yaml")
        assert (r.step_seconds, r.step_range, r.timed_steps) == (pytest.approx(0.275), (0.2, 0.5), 4)
        assert r.epoch_seconds == pytest.approx(0.275 * 6)
        mp.setattr(check, "_step_seconds", lambda result: [[9.0, 0.5, 0.25], [7.0, 0.3]])  # a continual run's tasks
        assert check_recipe(tmp_path / "r.yaml").step_range == (0.25, 0.5)  # each task's warm-up left out
        mp.setattr(check, "_step_seconds", lambda result: [[0.9]])  # a train split of one batch
        r = check_recipe(tmp_path / "r.yaml")
        assert (r.step_seconds, r.timed_steps) == (0.9, 0)
        # a step of grad_accum 2 trains 2 batches: its epoch (48 images) takes 3 steps, 1000 images 62.5 of them
        # (the per-1000 figure had been per batch, grad_accum times too high)
        mp.setattr(check, "_step_seconds", lambda result: [[9.0, 0.4, 0.4]])
        r = check_recipe(tmp_path / "r.yaml", ["train.grad_accum=2"])
        assert r.grad_accum == 2 and r.epoch_seconds == pytest.approx(0.4 * 3)
        assert r.seconds_per_1000_images == pytest.approx(0.4 / 16 * 1000)


def test_synthetic_data_drops_what_only_the_real_files_have(tiny_recipe_dict, tmp_path):
    """data.dicom_patient_ids on a generated .npz had failed: "holds no DICOM files to read PatientID tags from"."""
    raw = {**tiny_recipe_dict, "data": {**tiny_recipe_dict["data"], "source": "imagefolder",
                                        "path": str(tmp_path / "absent"), "dicom_patient_ids": True}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    r = check_recipe(tmp_path / "r.yaml", synthetic=True, steps=2)
    assert r.kind == "supervised" and any("absent -> 2-class synthetic" in s for s in r.stand_ins)


def test_unknown_timm_kwarg_is_a_one_line_error(tiny_recipe_dict, tmp_path):
    bad = {**tiny_recipe_dict, "model": {"name": "resnet18", "kwargs": {"window_size": 2}}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(EdgeKDError, match="model 'resnet18': bad model.kwargs"):
        check_recipe(tmp_path / "bad.yaml", synthetic=True)


def test_nan_monitor_is_a_one_line_error(tiny_recipe_dict, tmp_path):
    z = dict(np.load(tiny_recipe_dict["data"]["path"]))
    z["val_labels"] = np.zeros_like(z["val_labels"])  # a val split of one class: AUC is undefined
    np.savez(tmp_path / "oneclass.npz", **z)
    rec = {**tiny_recipe_dict, "data": {**tiny_recipe_dict["data"], "path": str(tmp_path / "oneclass.npz")},
           "train": {**tiny_recipe_dict["train"], "monitor": "val_auc", "monitor_mode": None}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(rec))
    with pytest.raises(EdgeKDError, match=r"train.monitor val_auc: the val split has no image of class class_1 "
                                          r"\(a small data.limit or a rare class\?\), so it is undefined \(NaN\)"):
        check_recipe(tmp_path / "r.yaml")


def test_a_small_data_limit_of_the_recipe_holds_and_its_warnings_come_first(tiny_recipe_dict, tmp_path):
    """`--set data.limit=1` passed `edgekd check` (the check's own limit of two batches replaced it) and then failed
    `edgekd train` at epoch 1; the check now keeps the smaller limit and says first what train says of the data."""
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe_dict))
    said: list[str] = []
    with pytest.raises(EdgeKDError, match="train.monitor val_auc: the val split has no image of class"):
        check_recipe(tmp_path / "r.yaml", ["data.limit=1", "train.monitor=val_auc"], warn=said.append)
    assert len(said) == 3 and all(line.startswith("warning: the ") and "split has no image of class" in line
                                  for line in said)
    r = check_recipe(tmp_path / "r.yaml", ["data.limit=6"], warn=said.append)  # two classes in every split
    assert r.train_images == 6 and r.warnings == [] and len(said) == 3


def test_unlogged_monitor_is_a_one_line_error(tmp_path):
    recipe = {"name": "x", "data": {"source": "builtin", "image_size": 16}, "model": {"name": "edgekd_cnn_tiny"},
              "train": {"epochs": 1, "monitor": "val_pauc_typo"}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    # a val metric's name is known when the recipe loads (it had been found after an epoch, or the check's step)
    with pytest.raises(EdgeKDError, match=r"train: monitor 'val_pauc_typo' is not a validation metric the run logs "
                                          r"\(did you mean 'val_pauc'\?\)"):
        check_recipe(tmp_path / "r.yaml", synthetic=True)
    recipe["train"]["monitor"] = "train_loss_typo"  # train_* rows depend on the objective: the check's step finds it
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(EdgeKDError, match="train.monitor: 'train_loss_typo' is not a logged metric") as err:
        check_recipe(tmp_path / "r.yaml", synthetic=True)
    assert "val_auc" in str(err.value) and "val_ppv" not in str(err.value)  # logged, but no monitor: not offered


def test_missing_data_file_is_named(tmp_path):
    recipe = {"name": "x", "data": {"source": "medmnist", "path": str(tmp_path / "nope.npz")},
              "model": {"name": "edgekd_cnn_tiny"}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(EdgeKDError, match="nope.npz: MedMNIST .npz not found"):
        check_recipe(tmp_path / "r.yaml")
    assert check_recipe(tmp_path / "r.yaml", synthetic=True).stand_ins  # the synthetic check needs no file
    # a folder of images under the .npz source: the path exists, so "not found" had sent the user after a typo
    (tmp_path / "scans").mkdir()
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({**recipe, "data": {**recipe["data"], "path": str(tmp_path / "scans")}}))
    with pytest.raises(EdgeKDError, match=r"scans: a folder, and data.source medmnist reads a .npz file; for a folder "
                                          r"of images give --set data.source=imagefolder"):
        check_recipe(tmp_path / "r.yaml")


def test_synthetic_student_without_teacher_recipe_is_refused(tiny_recipe_dict, tmp_path):
    rec = {**tiny_recipe_dict, "distill": {"teacher": str(tmp_path / "absent.pt"), "terms": [{"kind": "kl"}]}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(rec))
    with pytest.raises(EdgeKDError, match="checkpoint not found and no distill.teacher_recipe"):
        check_recipe(tmp_path / "s.yaml", synthetic=True)
    with pytest.raises(EdgeKDError, match="absent.pt not found"):
        check_recipe(tmp_path / "s.yaml")


def test_synthetic_images_cover_every_class_and_are_learnable():
    images, labels = synthetic_images(40, 24, 3, 10, seed=0)
    assert images.shape == (40, 24, 24, 3) and images.dtype == np.uint8
    assert set(labels.tolist()) == set(range(10))
    means = [images[labels == c].mean(axis=(0, 3)) for c in range(10)]
    assert all(not np.allclose(means[a], means[b]) for a in range(10) for b in range(a + 1, 10))


def test_cli_check_prints_the_summary_and_exits_2_on_errors(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "edgekd", "check", "recipes/demo/student.yaml", "--synthetic",
                         "--set", "data.batch_size=4"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    for word in ("check ok (distill, synthetic data)", "seconds per step", "peak RSS", "resnet18", "stand-in"):
        assert word in ok.stdout, word
    (tmp_path / "bad.yaml").write_text("model: {name: no_such_net}\n")
    bad = subprocess.run([sys.executable, "-m", "edgekd", "check", str(tmp_path / "bad.yaml"), "--synthetic"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unknown timm model 'no_such_net'" in bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    ignored = subprocess.run([sys.executable, "-m", "edgekd", "check", "recipes/demo/baseline.yaml", "--classes", "3"],
                             cwd=REPO, capture_output=True, text=True, timeout=300)  # said "check ok", classes unused
    assert ignored.returncode == 2 and "--classes sets the class count of --synthetic data" in ignored.stderr
    typo = subprocess.run([sys.executable, "-m", "edgekd", "check", "recipes/continual/split-fashion/finetune.yaml",
                           "--set", "continual.replay.sise=10"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert typo.returncode == 2 and "unknown key 'continual.replay.sise'" in typo.stderr  # the one line: no warning
    assert "turns on" not in typo.stdout + typo.stderr  # that --set turns on continual.replay, before it


def test_synthetic_check_stands_in_an_unlabeled_pool(tmp_path):
    rec = yaml.safe_load((REPO / "recipes/demo/student.yaml").read_text())
    rec["distill"]["unlabeled"] = {"source": "folder", "path": str(tmp_path / "no-pool")}
    (tmp_path / "demo").mkdir()
    for name in ("baseline.yaml", "teacher.yaml"):
        (tmp_path / "demo" / name).write_text((REPO / "recipes/demo" / name).read_text())
    (tmp_path / "demo" / "student.yaml").write_text(yaml.safe_dump(rec))
    r = check_recipe(tmp_path / "demo" / "student.yaml", SMALL, synthetic=True)
    assert any(s.startswith("distill.unlabeled: ") for s in r.stand_ins) and r.step_seconds > 0
    # A pool `edgekd train` refuses is refused by the check too: with --synthetic before it is stood in (a builtin
    # test-split pool had passed), without it over the whole pool (the check had decoded only the images it drew).
    with pytest.raises(EdgeKDError, match=r"distill.unlabeled: the pool is part of the labelled data \(builtin, test\)"):
        check_recipe(tmp_path / "demo" / "student.yaml", [*SMALL, "distill.unlabeled={source: builtin, split: test}"],
                     synthetic=True)


def test_check_reads_the_whole_unlabeled_pool_as_training_does(tiny_recipe_dict, tmp_path):
    from edgekd.check import count_train_images
    from edgekd.recipe import recipe_from_dict

    pool = tmp_path / "pool"
    write_image_folder(pool, n_per_class=40, size=16)
    (pool / "zzz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # past what the check's two steps draw
    recipe = recipe_from_dict({**tiny_recipe_dict, "distill": {"teacher": "t.pt", "terms": [{"kind": "kl"}],
                                                               "unlabeled": {"source": "folder", "path": str(pool)}}})
    with pytest.raises(EdgeKDError, match="distill.unlabeled: .*zzz_corrupt.png"):
        count_train_images(recipe)


@pytest.mark.parametrize("classes", [3, 7])
def test_synthetic_classes_override_a_known_sets_class_count(tmp_path, classes):
    # RetinaMNIST has 5 grades: a synthetic file under its name brought 5 classes whatever --classes said (3), and
    # above 5 it now fails as stray labels would.
    from edgekd.data import build_data
    from edgekd.recipe import load_recipe

    recipe = synthetic_recipe(load_recipe("recipes/retina/teacher-28.yaml"), tmp_path, classes, [])
    assert build_data(recipe).num_classes == classes
    assert build_data(synthetic_recipe(load_recipe("recipes/retina/teacher-28.yaml"), tmp_path / "k",
                                       None, [])).num_classes == 5


def test_a_student_recipe_checks_from_outside_the_project(monkeypatch, tmp_path):
    """`distill.teacher_recipe: recipes/demo/teacher.yaml` is relative to the project: run from another folder it
    is found above the student recipe; a name found nowhere is an error naming the key."""
    monkeypatch.chdir(tmp_path)
    student = REPO / "recipes/demo/student.yaml"
    r = check_recipe(student, SMALL + ["train.epochs=1"], synthetic=True)
    assert r.kind == "distill" and r.teacher == "resnet18"
    with pytest.raises(EdgeKDError, match="distill.teacher_recipe nope.yaml: recipe file not found"):
        check_recipe(student, SMALL + ["distill.teacher_recipe=nope.yaml"], synthetic=True)


def test_synthetic_data_takes_the_class_count_of_an_existing_teacher(tiny_recipe_dict, tmp_path):
    """A 3-class teacher checkpoint on disk: the synthetic stand-in data has its 3 classes (it was 2, and the KL
    term refused the pair)."""
    from edgekd.recipe import recipe_from_dict
    from edgekd.train.run import train_recipe

    from conftest import write_npz

    npz = write_npz(tmp_path / "three.npz", classes=3)
    teacher = train_recipe(recipe_from_dict({**tiny_recipe_dict, "data": {**tiny_recipe_dict["data"], "path": str(npz)},
                                             "train": {**tiny_recipe_dict["train"], "epochs": 1}}),
                           tmp_path / "teacher", log=lambda s: None)
    student = tmp_path / "student.yaml"
    student.write_text(yaml.safe_dump({**tiny_recipe_dict, "data": {**tiny_recipe_dict["data"], "source": "imagefolder",
                                                                    "path": str(tmp_path / "absent")},
                                       "role": "student",
                                       "distill": {"teacher": str(teacher.best_path),
                                                   "terms": [{"kind": "kl", "weight": 1.0, "temperature": 4}]}}))
    r = check_recipe(student, SMALL, synthetic=True)
    assert r.kind == "distill" and any("3-class synthetic" in s for s in r.stand_ins)


def test_a_continual_tasks_data_warns_only_of_its_own_classes():
    """`edgekd check` on a continual recipe warned that each later task lacks every earlier task's classes (12
    lines for split-fashion): a task holds its own classes by design; a class of its own it lacks is still said."""
    from types import SimpleNamespace

    from edgekd.train import warn_about_data

    data = SimpleNamespace(bad_files=[], class_names=["retina:0", "retina:1", "pneu:0", "pneu:1"],
                           counts=lambda: {"train": [0, 0, 5, 0], "val": [0, 0, 2, 2], "test": [0, 0, 3, 3]})
    lines: list[str] = []
    warn_about_data(data, lines.append, own=(2, 4))
    assert lines == ["warning: the train split has no image of class pneu:1 (a small data.limit or a rare class?): "
                     "the model never learns it"]
    lines.clear()
    warn_about_data(data, lines.append)  # a single-task run: every class is its own
    assert len(lines) == 3 and "class retina:0, retina:1, pneu:1" in lines[0]


def test_check_warns_of_a_teacher_recipe_that_is_not_there(tmp_path, monkeypatch):
    """`check` (without --synthetic) passed a recipe whose distill.teacher_recipe does not exist without a word;
    `--folds` then failed on it. Plain `train` does not read it, so it is a warning."""
    from edgekd.train.run import untrained_checkpoint

    monkeypatch.chdir(REPO)
    teacher = untrained_checkpoint(load_recipe(REPO / "recipes/demo/teacher.yaml", ["model.name=edgekd_cnn_tiny"]),
                                   tmp_path / "t.pt")
    (tmp_path / "s.yaml").write_text(f"base: {REPO / 'recipes/demo/student.yaml'}\n"
                                     f"distill:\n  teacher: {teacher}\n  teacher_recipe: no_such_teacher.yaml\n"
                                     "model: {name: edgekd_cnn_tiny}\n")
    seen: list[str] = []
    result = check_recipe(tmp_path / "s.yaml", warn=seen.append)
    assert any(w.startswith("warning: distill.teacher_recipe no_such_teacher.yaml: recipe file not found") and
               w.endswith("(`train --folds` trains the teacher from it)") for w in result.warnings), result.warnings
    assert seen == result.warnings


def test_synthetic_check_loads_a_local_weights_file(tiny_recipe_dict, tmp_path):
    """--synthetic dropped model.weights as if it were a download: a missing or foreign file passed as "randomly
    initialised (no pretrained weights offline)"."""
    import torch

    from edgekd.models import create_model

    spec = {"name": "edgekd_cnn_tiny", "num_classes": 2, "in_chans": 3}
    torch.save(create_model(spec).state_dict(), tmp_path / "w.pth")
    for weights, error in ((tmp_path / "w.pth", None), (tmp_path / "gone.pth", "gone.pth: not found")):
        rec = {**tiny_recipe_dict, "model": {"name": "edgekd_cnn_tiny", "weights": str(weights)}}
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(rec))
        if error:
            with pytest.raises(EdgeKDError, match=error):
                check_recipe(tmp_path / "r.yaml", synthetic=True)
        else:
            assert not any("model:" in s for s in check_recipe(tmp_path / "r.yaml", synthetic=True).stand_ins)


def test_commands_other_than_train_refuse_torchrun(monkeypatch):
    """Under torchrun `check` ran once per process and failed on rank 1 looking for rank 0's files."""
    from edgekd.cli.process import refuse_torchrun_but_for_train

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(EdgeKDError, match=r"edgekd check runs in one process: run it without torchrun"):
        refuse_torchrun_but_for_train(["check", "r.yaml", "--synthetic"])
    refuse_torchrun_but_for_train(["--debug", "train", "r.yaml"])
    refuse_torchrun_but_for_train(["export", "--help"])
    monkeypatch.setenv("WORLD_SIZE", "1")
    refuse_torchrun_but_for_train(["check", "r.yaml"])


def test_a_joint_continual_recipe_counts_each_task_with_the_tasks_before_it(tmp_path):
    """Joint trains task i on tasks 1..i together: the epoch estimate had counted each task's own images (5000
    for split-fashion's joint, which trains 15000)."""
    from edgekd.check import count_train_images
    from edgekd.recipe import recipe_from_dict
    from test_continual import base_recipe, quadrant_npz

    npz = quadrant_npz(tmp_path / "q.npz", classes=4, n=(16, 8, 8))
    tasks = [{"name": "a", "classes": [0, 1]}, {"name": "b", "classes": [2, 3]}]
    sizes = []
    for joint in (False, True):
        raw = base_recipe(npz, scenario="class_incremental", tasks=tasks, joint=joint)
        sizes.append(count_train_images(recipe_from_dict(raw)))
    from edgekd.continual import build_tasks

    a, b = (len(t.data.tables["train"]) for t in build_tasks(recipe_from_dict(base_recipe(
        npz, scenario="class_incremental", tasks=tasks))))
    assert (sizes[0], sizes[1]) == (a + b, a + (a + b))


def test_check_says_what_a_distillation_run_warns_of_before_it_trains(tmp_path):
    """`check` had printed "check ok" where `train` warns: the teacher's classes named otherwise than the data's,
    and (by the pool's own log, sent nowhere) the pool's copies of val images left out."""
    from PIL import Image

    from edgekd.train.run import train_recipe
    from edgekd.recipe import recipe_from_dict

    data = {"source": "builtin", "image_size": 16, "batch_size": 16, "limit": 48}
    teacher = train_recipe(recipe_from_dict({"name": "t", "data": data, "model": {"name": "edgekd_cnn_tiny"},
                                             "train": {"epochs": 1, "scheduler": {"name": "none"}}}),
                           tmp_path / "t", log=lambda *_: None).best_path
    pool = tmp_path / "pool"
    write_image_folder(pool, n_per_class=2, size=16)
    from edgekd.data import build_data

    val = build_data(recipe_from_dict({"name": "d", "data": data})).tables["val"]
    Image.fromarray(val.images[0][..., 0]).save(pool / "a" / "from_val.png")
    recipe = {"name": "s", "role": "student", "data": {**data, "class_names": ["no finding", "pneumonia"]},
              "model": {"name": "edgekd_cnn_tiny"}, "train": {"epochs": 1, "scheduler": {"name": "none"}},
              "distill": {"teacher": str(teacher), "terms": [{"kind": "kl", "weight": 0.7}, {"kind": "ce",
                                                                                            "weight": 0.3}],
                          "unlabeled": {"source": "folder", "path": str(pool)}}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(recipe))
    said: list[str] = []
    result = check_recipe(path, warn=said.append)
    assert any("are named otherwise" in line for line in said), said
    assert any("1 of the pool's 5 images are images of this run's val or test split" in line for line in said), said
    assert result.warnings == said and all(line.startswith("warning:") for line in said)
    said.clear()  # a teacher fed at another size than it trained at (said by train, not by check, before)
    check_recipe(path, ["distill.teacher_image_size=24"], warn=said.append)
    assert any("distill.teacher_image_size 24 but the teacher edgekd_cnn_tiny was trained at 16 px" in line
               for line in said), said


def test_check_folds_refuses_what_train_folds_refuses_then_checks_fold_one(tiny_npz, tmp_path):
    """`edgekd check --folds` had been "No such option": a KD-OCT recipe's 5-fold run could be checked only by
    starting it. Now: the same refusals before training, then fold 1's run with an untrained fold teacher."""
    from conftest import tiny_recipe

    teacher_raw = tiny_recipe(tiny_npz, name="fold-teacher")
    (tmp_path / "teacher.yaml").write_text(yaml.safe_dump(teacher_raw))
    raw = tiny_recipe(tiny_npz, name="fold-student", role="student",
                      distill={"teacher_recipe": str(tmp_path / "teacher.yaml"),
                               "terms": [{"kind": "kl", "weight": 0.7}, {"kind": "ce", "weight": 0.3}]})
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    said: list[str] = []
    r = check_recipe(tmp_path / "s.yaml", folds=3, warn=said.append, teacher_overrides=["name=fold-teacher-b"])
    assert said[0].startswith("k-fold: the data has no patient ids: folds are image-level")
    assert said[-1] == "k-fold: checking fold 1 of 3 (image-level), held out as validation" and said == r.warnings
    assert r.kind == "distill"
    teacher_line = next(s for s in r.stand_ins if s.startswith("distill.teacher (the fold teacher): untrained "))
    assert f"train --folds trains it from {tmp_path / 'teacher.yaml'} on each fold" in teacher_line
    assert r.train_images == 42  # train and val pooled (48 + 16), fold 1's 22 held out
    # what train --folds refuses, refused here before any step
    with pytest.raises(EdgeKDError, match="--folds with a distill recipe needs distill.teacher_recipe"):
        (tmp_path / "n.yaml").write_text(yaml.safe_dump({**raw, "distill": {**raw["distill"], "teacher_recipe": None,
                                                                              "teacher": "t.pt"}}))
        check_recipe(tmp_path / "n.yaml", folds=3)
    with pytest.raises(EdgeKDError, match="not with --synthetic"):
        check_recipe(tmp_path / "s.yaml", folds=3, synthetic=True)
    with pytest.raises(EdgeKDError, match="--teacher-set overrides the fold teacher's recipe: give --folds too"):
        check_recipe(tmp_path / "s.yaml", teacher_overrides=["seed=1"])
    with pytest.raises(EdgeKDError, match="--teacher-set"):  # train --folds refuses a seed for the teacher
        check_recipe(tmp_path / "s.yaml", folds=3, teacher_overrides=["seed=1"])
    plain = tiny_recipe(tiny_npz, name="plain")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(plain))
    assert check_recipe(tmp_path / "p.yaml", folds=2).train_images == 32  # half of the pooled 64 (48 without)
    with pytest.raises(EdgeKDError, match=r"--teacher-set is for --folds with a distill recipe"):  # as train says
        check_recipe(tmp_path / "p.yaml", folds=2, teacher_overrides=["seed=1"])
