"""Experiment tracking: the trainer hands each epoch's log row to the sinks a recipe's `tracking:` asks for.

TensorBoard (torch.utils.tensorboard's SummaryWriter, needs the `tensorboard` package) and Weights & Biases
(`wandb`) are optional; log.csv (written by the run) stays the default. The trainer calls `Tracker` in one
place per epoch, whatever sinks there are.
"""

from __future__ import annotations

import contextlib
import importlib.util
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgekd.errors import EdgeKDError, exception_line
from edgekd.fileio import write_text

PACKAGES = {"tensorboard": ("tensorboard", "track"), "wandb": ("wandb", "wandb")}
"""tracking key -> (the package it needs, the edgekd extra that installs it)."""


@dataclass
class EpochRecord:
    """What one epoch reports: its log row (as in log.csv), the learning rate of every optimizer param group,
    and the validation labels and predicted classes (the confusion matrix)."""

    epoch: int
    row: dict[str, Any]
    lrs: dict[str, float]
    """Param group name (backbone, head, all) -> its learning rate in this epoch."""
    val_labels: np.ndarray
    val_predicted: np.ndarray
    class_names: list[str]

    def scalars(self) -> dict[str, float]:
        """Every numeric metric of the row (keyed as in log.csv) and lr/<group name> per param group."""
        out = {k: float(v) for k, v in self.row.items()
               if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        out.update({f"lr/{name}": lr for name, lr in self.lrs.items()})
        return out

    def confusion_figure(self):
        from edgekd.metrics import confusion_figure
        from sklearn.metrics import confusion_matrix

        k = len(self.class_names)
        cm = confusion_matrix(self.val_labels.astype(int), self.val_predicted.astype(int), labels=list(range(k)))
        return confusion_figure(cm, self.class_names, f"validation, epoch {self.epoch}")


class Sink(Protocol):
    def log_epoch(self, record: EpochRecord) -> None: ...
    def close(self, exit_code: int = 0) -> None: ...


def require_packages(tracking) -> None:
    """A one-line error, before any training, for each sink whose package is not installed, and for a
    `tracking.tensorboard` path that is a file."""
    wanted = [key for key in PACKAGES if getattr(tracking, key, None)]
    for key in wanted:
        package, extra = PACKAGES[key]
        if importlib.util.find_spec(package) is None:
            raise EdgeKDError(f"tracking.{key}: the '{package}' package is not installed "
                              f"(pip install 'edgekd[{extra}]', or remove tracking.{key} from the recipe)")
    tb = tracking.tensorboard
    if isinstance(tb, str) and Path(tb).exists() and not Path(tb).is_dir():
        raise EdgeKDError(f"tracking.tensorboard: {tb} is a file; give a folder for the event files")


def exit_code_of(error: BaseException) -> int:
    """The exit code a tracker records for a fit that ended with `error`: 130 for Ctrl-C, as the CLI exits, 1 for
    any other error."""
    return 130 if isinstance(error, KeyboardInterrupt) else 1


class TensorBoardSink:
    """Scalars per epoch (every logged metric, lr per param group) and the validation confusion matrix image."""

    label = "TensorBoard"

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log_epoch(self, record: EpochRecord) -> None:
        for key, value in record.scalars().items():
            self.writer.add_scalar(key, value, record.epoch)
        self.writer.add_figure("val/confusion_matrix", record.confusion_figure(), record.epoch)  # closes it
        self.writer.flush()

    def close(self, exit_code: int = 0) -> None:
        self.writer.close()


WANDB_ID_FILE = "wandb_run_id"
"""The W&B run id of a run folder's training, kept in the folder, so that `train --resume` goes on in that run."""


class WandbSink:
    """A W&B run: the same scalars at step = epoch, the confusion matrix as an image, the recipe as its config.

    A resumed training continues its W&B run (the id kept in `<out>/wandb_run_id`); a fold or task of a k-fold or
    continual run (`part`) is its own W&B run, named `<name>-<part>`, grouped under the run's name."""

    label = "W&B"

    def __init__(self, cfg, recipe, out: Path, part: str | None = None, resume: bool = False):
        import wandb

        self.wandb = wandb
        folder = Path(cfg.dir) if cfg.dir else out
        folder.mkdir(parents=True, exist_ok=True)
        id_file = out / WANDB_ID_FILE
        # an empty file (none is written half since it is atomic; one emptied by hand) is no id
        run_id = (id_file.read_text().strip() or None) if resume and id_file.is_file() else None
        if run_id is None:
            run_id = secrets.token_hex(8)  # W&B ids: lowercase letters and digits (64 bits: no collision)
            out.mkdir(parents=True, exist_ok=True)
            write_text(id_file, run_id + "\n")
        name = cfg.name or recipe.name
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=f"{name}-{part.replace('/', '-')}"
                              if part else name, group=name if part else None, tags=cfg.tags, mode=cfg.mode,
                              dir=str(folder), config=recipe.to_dict(), reinit="create_new", id=run_id,
                              resume="allow")

    def log_epoch(self, record: EpochRecord) -> None:
        from edgekd.metrics import plt

        fig = record.confusion_figure()
        self.run.log({**record.scalars(), "val/confusion_matrix": self.wandb.Image(fig)}, step=record.epoch)
        plt.close(fig)

    def close(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)  # non-zero: W&B marks the run failed


class Tracker:
    """The sinks of a recipe's `tracking:` section (none: nothing happens); closed when the fit ends. A sink that
    fails (a full disk, W&B's service) is said in a warning through `log` and dropped: training goes on, log.csv
    keeps every epoch (it had ended the training after the epoch's checkpoint was saved)."""

    def __init__(self, sinks: list[Sink], log: Callable[[str], object] = print):
        self.sinks, self.log = sinks, log

    @classmethod
    def from_recipe(cls, recipe, out: Path, part: str | None = None, resume: bool = False,
                    log: Callable[[str], object] = print) -> "Tracker":
        """`part`: the fold or task this training is of a larger run (default: `fold<k>/<role>` for a recipe with
        `data.fold`): its event files go to `<tracking.tensorboard>/<part>` when that is a path (the default
        `<out>/tensorboard` is the part's own already), and it names its W&B run. `resume`: a resumed training."""
        tracking = recipe.tracking
        require_packages(tracking)
        if part is None and recipe.data.fold is not None:
            part = f"fold{recipe.data.fold}/{recipe.role}"
        sinks: list[Sink] = []
        try:
            if tracking.tensorboard:
                tb = tracking.tensorboard
                sinks.append(TensorBoardSink(Path(tb) / (part or "") if isinstance(tb, str) else out / "tensorboard"))
            if tracking.wandb is not None:
                sinks.append(WandbSink(tracking.wandb, recipe, out, part, resume))
        except BaseException:  # W&B failed to start: the TensorBoard writer already open is closed
            cls(sinks, log).close(1)
            raise
        return cls(sinks, log)

    def log_epoch(self, record: EpochRecord) -> None:
        for sink in list(self.sinks):
            try:
                sink.log_epoch(record)
            except Exception as err:
                self.log(f"warning: {sink_label(sink)} failed at epoch {record.epoch} ({exception_line(err)}); it "
                         "is closed and training goes on (log.csv keeps every epoch)")
                self.sinks.remove(sink)
                with contextlib.suppress(Exception):
                    sink.close(1)

    def close(self, exit_code: int = 0) -> None:
        """Every sink is closed, whichever fails (a W&B run had been left unfinished after TensorBoard's)."""
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            try:
                sink.close(exit_code)
            except Exception as err:
                self.log(f"warning: closing {sink_label(sink)} failed ({exception_line(err)})")


def sink_label(sink: Sink) -> str:
    return getattr(sink, "label", type(sink).__name__)
