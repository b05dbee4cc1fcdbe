"""Progress bars: the stages add their tasks to the CLI's rich progress bar and advance them; without one, nothing."""

from __future__ import annotations

import io

import numpy as np
from rich.console import Console
from rich.progress import Progress

from edgekd.progress import progress_task


class RecordingProgress(Progress):
    """A real rich Progress (on a string buffer) that remembers each task's last state when it is removed."""

    def __init__(self):
        super().__init__(console=Console(file=io.StringIO(), force_terminal=True), auto_refresh=False)
        self.removed: list[tuple[str, float | None, float]] = []
        self.descriptions: list[str] = []

    def update(self, task_id, **kwargs):
        if kwargs.get("description"):
            self.descriptions.append(kwargs["description"])
        super().update(task_id, **kwargs)

    def remove_task(self, task_id):
        task = self._tasks[task_id]
        self.removed.append((task.description, task.total, task.completed))
        super().remove_task(task_id)


def test_progress_task_advances_clamps_and_removes_its_task():
    progress = RecordingProgress()
    with progress_task(progress, "work", 3) as advance:
        advance(0, "work: first")
        for _ in range(5):  # a second pass over the same items does not overrun the bar
            advance()
        assert len(progress.tasks) == 1 and progress.tasks[0].completed == 3
    assert progress.tasks == [] and progress.removed == [("work: first", 3, 3)]


def test_the_last_step_is_drawn_before_the_task_goes():
    """The bar redraws on a timer: a stage ending between two redraws had left its last frame but one on screen."""
    progress = RecordingProgress()
    with progress:
        with progress_task(progress, "work", 3) as advance:
            advance(3)
        drawn = progress.console.file.getvalue()
    assert "100%" in drawn


def test_without_a_progress_bar_advance_does_nothing(capfd):
    """Library calls and tests pass no bar: nothing is printed (on stdout or stderr, by Python or below it), not
    when the task starts, advances or ends."""
    with progress_task(None, "work", 2) as advance:
        assert advance() is None and advance(3, "ignored") is None
    with progress_task(None, "unknown length", None) as advance:
        advance()
    assert capfd.readouterr() == ("", "")


def test_corruption_eval_advances_per_condition_and_model():
    from edgekd.robustness.evaluate import Predictor, corruption_records

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(6)]
    labels = np.array([0, 1] * 3)
    predictors = [Predictor(f"m{k}", "student", "onnx", "fp32", ["a", "b"],
                            lambda batch: np.tile([0.3, 0.7], (len(batch), 1))) for k in range(2)]
    progress = RecordingProgress()
    corruption_records(predictors, images, labels, ["gaussian_noise", "gaussian_blur"], [1, 3], log=lambda *_: None,
                       progress=progress)
    assert [(total, done) for _, total, done in progress.removed] == [(10, 10)]  # (clean + 2 x 2) x 2 models
    assert "gaussian_blur s3: m1 (student) onnx/fp32" in progress.descriptions


def test_export_advances_per_artifact_and_calibration_image(tmp_path):
    from edgekd.export import export_checkpoint, profile_from_dict
    from test_export import make_checkpoint, quiet

    ckpt = make_checkpoint(tmp_path, "edgekd_cnn_tiny")
    profile = profile_from_dict({"parity": {"images": 4}, "quantization": {"calib_images": 8}})
    progress = RecordingProgress()
    try:
        export_checkpoint(ckpt, tmp_path / "bundle", ["onnx"], ["fp32", "int8"], profile, log=quiet,
                          progress=progress)
    except Exception as err:  # the tiny untrained model may miss the INT8 gate: progress is shown all the same
        if type(err).__name__ != "ParityGateError":
            raise
    finished = {d.split(":")[0] if "calibration" in d else "export": (t, c) for d, t, c in progress.removed}
    assert finished["onnx int8"] == (8, 8)
    assert finished["export"] == (2, 2)
    assert "export onnx/int8" in progress.descriptions


def test_eval_advances_per_batch(tiny_recipe_dict, tmp_path):
    from edgekd.recipe import recipe_from_dict
    from edgekd.train.run import evaluate_checkpoint, train_recipe

    raw = {**tiny_recipe_dict, "train": {**tiny_recipe_dict["train"], "epochs": 1}}
    run = train_recipe(recipe_from_dict(raw), tmp_path / "run", log=lambda *_: None)
    progress = RecordingProgress()
    evaluate_checkpoint(run.best_path, tmp_path / "eval", splits=("val", "test"), progress=progress)
    assert progress.removed == [("eval val", 2, 2), ("eval test", 2, 2)]  # 16 images each, batches of 8
