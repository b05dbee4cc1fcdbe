"""Rehearsal: a class-balanced buffer of earlier tasks' images (reservoir or herding selection) whose samples are
mixed into every training batch of later tasks (Avalanche's ClassBalancedBuffer + ReplayPlugin)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, RandomSampler

from edgekd.continual.base import ContinualPlugin, TaskStep
from edgekd.data import ImageDataset, Table, build_transforms, epoch_seed
from edgekd.errors import EdgeKDError


def herding_order(features: np.ndarray, m: int) -> np.ndarray:
    """iCaRL herding: greedily pick the samples whose running mean of L2-normalised features stays closest to
    the class mean; returns the first `m` picks in priority order."""
    f = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    mu = f.mean(0)
    running = np.zeros_like(mu)
    chosen: list[int] = []
    free = np.ones(len(f), dtype=bool)
    for k in range(1, min(m, len(f)) + 1):
        dist = np.linalg.norm(mu - (running + f) / k, axis=1)
        dist[~free] = np.inf
        i = int(np.argmin(dist))
        chosen.append(i)
        free[i] = False
        running += f[i]
    return np.asarray(chosen, dtype=np.int64)


@dataclass
class _ClassSlot:
    table: Table
    priority: np.ndarray  # lower = kept longer; entries sorted by it


class ClassBalancedBuffer:
    """At most `size` samples, split evenly over the classes seen (counts differ by at most one); a class with
    fewer samples than its share keeps them all and its unused share goes to the other classes.

    reservoir: each sample gets a uniform random key and a class keeps its smallest keys, which is a uniform
    sample of everything seen of that class (reservoir sampling by random priorities).
    herding: a class keeps the first samples of its herding order (iCaRL), so shrinking drops the least useful.
    """

    def __init__(self, size: int, selection: str = "reservoir", seed: int = 0):
        if selection not in ("reservoir", "herding"):
            raise EdgeKDError(f"replay.selection: unknown '{selection}' (use reservoir or herding)")
        self.size, self.selection = size, selection
        self.rng = np.random.default_rng(seed)
        self.slots: dict[int, _ClassSlot] = {}

    def __len__(self) -> int:
        return sum(len(s.table) for s in self.slots.values())

    def quotas(self, available: dict[int, int]) -> dict[int, int]:
        """Each class's share of `size`, given how many samples it has: an even split (counts differ by at most
        one) over the classes that can fill theirs; a class with fewer keeps them all and the rest is split again
        over the others (water-filling: a rare class had left its unused share empty)."""
        left, todo, out = self.size, sorted(available), {}
        while todo:
            base, extra = divmod(left, len(todo))
            share = {c: base + (1 if i < extra else 0) for i, c in enumerate(todo)}
            short = [c for c in todo if available[c] < share[c]]
            if not short:
                return {**out, **share}
            for c in short:
                out[c] = available[c]
                left -= available[c]
            todo = [c for c in todo if c not in short]
        return out

    def class_counts(self) -> dict[int, int]:
        return {c: len(s.table) for c, s in sorted(self.slots.items())}

    def update(self, table: Table, features: Callable[[Table], np.ndarray] | None = None) -> None:
        """Add a task's samples; every class (old and new) is cut back to its share of the buffer."""
        if self.selection == "herding" and features is None:
            raise EdgeKDError("replay.selection=herding needs a feature extractor")
        new_classes = [int(c) for c in np.unique(table.labels)]
        available = {c: len(slot.table) for c, slot in self.slots.items()}
        for c in new_classes:
            available[c] = available.get(c, 0) + int((table.labels == c).sum())
        quotas = self.quotas(available)
        for c in new_classes:
            rows = table.subset(np.flatnonzero(table.labels == c))
            if c in self.slots:  # a class seen again: choose among the kept samples and the new ones together
                rows = Table.concat([self.slots[c].table, rows])
            if self.selection == "reservoir":
                keys = self.rng.random(len(rows))
                if c in self.slots:
                    keys[: len(self.slots[c].priority)] = self.slots[c].priority
                order = np.argsort(keys, kind="stable")[: quotas[c]]
                self.slots[c] = _ClassSlot(rows.subset(order), keys[order])
            else:
                order = herding_order(features(rows), quotas[c])
                self.slots[c] = _ClassSlot(rows.subset(order), np.arange(len(order), dtype=np.float64))
        for c, slot in self.slots.items():
            keep = np.arange(min(len(slot.table), quotas[c]))
            self.slots[c] = _ClassSlot(slot.table.subset(keep), slot.priority[keep])

    def table(self) -> Table:
        return Table.concat([s.table for _, s in sorted(self.slots.items())])

    def tables(self) -> list[Table]:
        """The kept samples as tables of one storage each: in-memory images of one shape, or files. Tasks of other
        data (gray and RGB, 28 and 64 px, arrays and files) cannot share one array: a third task had failed in
        numpy's concatenate."""
        kinds: dict[tuple, list[Table]] = {}
        for _, slot in sorted(self.slots.items()):
            kind = ("files",) if slot.table.images is None else tuple(slot.table.images.shape[1:])
            kinds.setdefault(kind, []).append(slot.table)
        return [Table.concat(group) for group in kinds.values()]


class MixedLoader:
    """Each batch of the task loader, with a batch drawn (with replacement) from the buffer appended."""

    def __init__(self, main: DataLoader, buffer: DataLoader):
        self.main, self.buffer = main, buffer

    def __len__(self) -> int:
        return len(self.main)

    def __iter__(self):
        extra = iter(self.buffer)
        for images, targets in self.main:
            b_images, b_targets = next(extra)
            yield torch.cat([images, b_images]), torch.cat([targets, b_targets])


class ReplayData:
    """A DataModule whose training loader mixes buffer samples (with the train augmentation) into every batch;
    validation and test stay the task's own."""

    def __init__(self, data, buffer: list[Table], batch_size: int):
        self.data, self.buffer, self.batch_size = data, buffer, batch_size

    def __getattr__(self, name):
        return getattr(self.data, name)

    def loader(self, split: str, train: bool | None = None, epoch: int = 0, distributed: bool = False):
        train = split == "train" if train is None else train
        main = self.data.loader(split, train=train, epoch=epoch, distributed=distributed)
        if split != "train" or not train:
            return main
        transform = build_transforms(self.data.cfg, self.data.augment, True)
        ds = ConcatDataset([ImageDataset(table, transform) for table in self.buffer])
        gen = torch.Generator().manual_seed(epoch_seed(self.data.seed, epoch, distributed) + 7)
        sampler = RandomSampler(ds, replacement=True, num_samples=len(main) * self.batch_size, generator=gen)
        return MixedLoader(main, DataLoader(ds, batch_size=self.batch_size, sampler=sampler, drop_last=True))


@torch.no_grad()
def embed(model: nn.Module, data, table: Table, device: torch.device) -> np.ndarray:
    """Pre-logit features (timm's forward_head(pre_logits=True)) of a table's images, eval transforms."""
    was_training = model.training
    model.eval()
    ds = ImageDataset(table, build_transforms(data.cfg, [], False))
    out = []
    for images, _ in DataLoader(ds, batch_size=256):
        x = images.to(device)
        if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
            f = model.forward_head(model.forward_features(x), pre_logits=True)
        else:
            f = model(x)
        out.append(f.flatten(1).float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(out)


class ReplayPlugin(ContinualPlugin):
    """Fills the buffer after each task; later tasks train on task batches + buffer batches."""

    def __init__(self, size: int = 200, selection: str = "reservoir", batch_size: int | None = None, seed: int = 0):
        self.buffer = ClassBalancedBuffer(size, selection, seed)
        self.batch_size = batch_size

    def train_data(self, data, step: TaskStep):
        if len(self.buffer) == 0:
            return data
        return ReplayData(data, self.buffer.tables(), self.batch_size or data.cfg.batch_size)

    def after_task(self, step: TaskStep) -> None:
        data = step.task.data
        self.buffer.update(data.tables["train"], lambda t: embed(step.model, data, t, step.device))
