"""Experiment tracking: the trainer hands each epoch's log row to the sinks a recipe's `tracking:` asks for.

TensorBoard (torch.utils.tensorboard's SummaryWriter, needs the `tensorboard` package) and Weights & Biases
(`wandb`) are optional; log.csv (written by the run) stays the default. The trainer calls `Tracker` in one
place per epoch, whatever sinks there are.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgekd.errors import EdgeKDError

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
    def close(self) -> None: ...


def require_packages(tracking) -> None:
    """A one-line error, before any training, for each sink whose package is not installed."""
    wanted = [key for key in PACKAGES if getattr(tracking, key, None)]
    for key in wanted:
        package, extra = PACKAGES[key]
        if importlib.util.find_spec(package) is None:
            raise EdgeKDError(f"tracking.{key}: the '{package}' package is not installed "
                              f"(pip install 'edgekd[{extra}]', or remove tracking.{key} from the recipe)")


class TensorBoardSink:
    """Scalars per epoch (every logged metric, lr per param group) and the validation confusion matrix image."""

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log_epoch(self, record: EpochRecord) -> None:
        for key, value in record.scalars().items():
            self.writer.add_scalar(key, value, record.epoch)
        self.writer.add_figure("val/confusion_matrix", record.confusion_figure(), record.epoch)  # closes it
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A W&B run: the same scalars at step = epoch, the confusion matrix as an image, the recipe as its config."""

    def __init__(self, cfg, recipe, out: Path):
        import wandb

        self.wandb = wandb
        folder = Path(cfg.dir) if cfg.dir else out
        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name or recipe.name, tags=cfg.tags,
                              mode=cfg.mode, dir=str(folder), config=recipe.to_dict(), reinit="create_new")

    def log_epoch(self, record: EpochRecord) -> None:
        from edgekd.metrics import plt

        fig = record.confusion_figure()
        self.run.log({**record.scalars(), "val/confusion_matrix": self.wandb.Image(fig)}, step=record.epoch)
        plt.close(fig)

    def close(self) -> None:
        self.run.finish()


class Tracker:
    """The sinks of a recipe's `tracking:` section (none: nothing happens); closed when the fit ends."""

    def __init__(self, sinks: list[Sink]):
        self.sinks = sinks

    @classmethod
    def from_recipe(cls, recipe, out: Path) -> "Tracker":
        tracking = recipe.tracking
        require_packages(tracking)
        sinks: list[Sink] = []
        if tracking.tensorboard:
            tb = tracking.tensorboard
            sinks.append(TensorBoardSink(Path(tb) if isinstance(tb, str) else out / "tensorboard"))
        if tracking.wandb is not None:
            sinks.append(WandbSink(tracking.wandb, recipe, out))
        return cls(sinks)

    def log_epoch(self, record: EpochRecord) -> None:
        for sink in self.sinks:
            sink.log_epoch(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
