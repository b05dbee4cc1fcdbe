"""KD on unlabeled images: a pool of images without labels, drawn batch by batch beside the labelled loader."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from edgekd.data import (ImageDataset, Table, build_transforms, list_images, load_source, split_folders,
                         stratified_subset, validate_images)
from edgekd.errors import EdgeKDError


class UnlabeledImages(Dataset):
    """Yields transformed image tensors only (a labelled table's labels are never read)."""

    def __init__(self, table: Table, transform):
        self.images = ImageDataset(table, transform)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i][0]


def unlabeled_table(cfg, on_bad_image: str = "error", log=print, skipped: list[str] | None = None) -> Table:
    """The pool the recipe's `distill.unlabeled` names, as a table (labels all 0 and unused); `skipped` gets the
    error line of each unreadable file left out (data.on_bad_image: skip)."""
    if cfg.source == "folder":
        root = Path(cfg.path)
        if not root.is_dir():
            raise EdgeKDError(f"distill.unlabeled: {root} is a file, not a folder of images" if root.exists() else
                              f"distill.unlabeled: folder {root} not found")
        paths = [str(p) for p in list_images(root)]
        if not paths:
            raise EdgeKDError(f"distill.unlabeled: no images under {root}")
        table = Table(labels=np.zeros(len(paths), dtype=np.int64), paths=paths)
    else:
        try:
            tables = load_source(cfg.source, cfg.path).tables
        except EdgeKDError as err:
            raise EdgeKDError(f"distill.unlabeled: {err}") from None
        if cfg.split not in tables:
            raise EdgeKDError(f"distill.unlabeled: {cfg.path or cfg.source} has no '{cfg.split}' split "
                              f"(it has {', '.join(tables)})")
        table = tables[cfg.split]
    if cfg.limit:  # data.limit's subset rule (a labelled source keeps its class mix), seed 0 for every run
        table = table.subset(stratified_subset(table.labels, cfg.limit, seed=0))
    try:
        table, dropped = validate_images(table, on_bad_image)
    except EdgeKDError as err:
        raise EdgeKDError(f"distill.unlabeled: {err}") from None
    if dropped:
        log(f"distill.unlabeled: skipped {len(dropped)} unreadable images (data.on_bad_image: skip)")
        if skipped is not None:
            skipped.extend(dropped)
    if len(table) == 0:
        raise EdgeKDError("distill.unlabeled: no readable images in the pool")
    return table


class UnlabeledStream:
    """An endless, seeded iterator of unlabeled batches with the recipe's train transform on every image. Each
    epoch restarts it (`set_epoch`): epoch e's k-th pass over the pool is shuffled by a generator seeded from
    (seed, e, k), so a run repeats itself and a run resumed at epoch e draws what the uninterrupted run drew.
    Under DDP each rank passes its own rank as `offset`, so the ranks draw different batches."""

    def __init__(self, dataset: UnlabeledImages, batch_size: int, seed: int, num_workers: int = 0, offset: int = 0):
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        self.seed = seed + 7919 * offset
        self.epoch = self.passes = 0
        self._it: Iterator[torch.Tensor] | None = None
        self.record: dict[str, object] = {}
        """What the pool was (build_unlabeled): images, skipped, content_digest; kept in the checkpoints."""

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.passes, self._it = epoch, 0, None

    def _loader(self) -> DataLoader:
        """This pass's shuffle (and worker seeds): (seed, epoch, pass) packed in decimal, as recorded runs drew them,
        while both counts are under 1000; past that a hash of the three (pass 1000 of an epoch had repeated pass 0
        of the next)."""
        if self.epoch < 1000 and self.passes < 1000:
            seed = (self.seed * 1000 + self.epoch) * 1000 + self.passes
        else:
            seed = int(np.random.SeedSequence([self.seed, self.epoch, self.passes]).generate_state(1, np.uint64)[0] >> 1)
        gen = torch.Generator().manual_seed(seed)
        return DataLoader(self.dataset, batch_size=min(self.batch_size, len(self.dataset)), shuffle=True,
                          generator=gen, num_workers=self.num_workers, drop_last=True)

    def next(self) -> torch.Tensor:
        if self._it is None:
            self._it = iter(self._loader())
        try:
            return next(self._it)
        except StopIteration:
            self.passes += 1
            self._it = iter(self._loader())
            return next(self._it)


def refuse_held_out_pool(cfg, data_cfg) -> None:
    """A pool drawn from the labelled data's own file or folder may only be its given train split (the file's
    train split, or the `train/` folder of a given-split image folder): any other part of it (val, test, or a
    source the recipe splits itself) holds images the run validates or reports on."""
    if cfg.source == "builtin" and data_cfg.source == "builtin":
        overlaps, train_only = True, cfg.split == "train"
    elif cfg.path is None or data_cfg.path is None:
        return
    else:
        pool, data = Path(cfg.path).resolve(), Path(data_cfg.path).resolve()
        overlaps = pool.is_relative_to(data)
        train = split_folders(data).get("train", data / "train") if data.is_dir() else data / "train"
        train_only = ((pool == data and cfg.source != "folder" and cfg.split == "train")
                      or pool.is_relative_to(train))
    if overlaps and not train_only:
        raise EdgeKDError(f"distill.unlabeled: the pool is part of the labelled data ({cfg.path or cfg.source}, "
                          f"{cfg.split if cfg.source != 'folder' else 'every image under it'}) beyond its given "
                          "train split, so it holds images this run validates and tests on; use the train split "
                          "or other images")
    if overlaps and (data_cfg.split != "given" or data_cfg.folds is not None):
        how = "data.folds" if data_cfg.folds is not None else f"data.split {data_cfg.split}"
        raise EdgeKDError(f"distill.unlabeled: the pool is the labelled data's train split ({cfg.path or cfg.source})"
                          f", but this run splits that data itself ({how}), so its validation images come from that "
                          "split too; use other images")


def leave_out_held_images(pool: Table, tables: dict[str, Table], log=print) -> tuple[Table, list[str], int]:
    """The pool without the images of `tables` (the run's val and test splits), compared by content
    (`Table.fingerprints`: the same file bytes or array pixels, whatever the path, link or copy; decoded pixels,
    `Table.pixel_fingerprints`, when one side is files and the other arrays): the student is
    never taught on an image it is validated or tested on. A data set's own duplicates (MedMNIST's train split
    holds a few of its val images' pixels) are left out with a warning; a pool of nothing else is an error.
    -> (the pool kept, its fingerprints, how many were left out)."""
    prints = pool.fingerprints()
    # Files against arrays (a folder of PNGs saved from the .npz the run reads): by decoded pixels, as file bytes
    # and array pixels never match (every val and test image had stayed in such a pool)
    by_pixels = any((table.images is None) != (pool.images is None) for table in tables.values())
    compared = pool.pixel_fingerprints() if by_pixels else prints
    held = {fp for table in tables.values() for fp in (table.pixel_fingerprints() if by_pixels else
                                                       table.fingerprints())}
    keep = [i for i, fp in enumerate(compared) if fp not in held]
    left = len(prints) - len(keep)
    if left:
        first = next(i for i, fp in enumerate(compared) if fp in held)
        example = pool.paths[first] if pool.paths is not None else f"image #{first}"
        said = (f"{left} of the pool's {len(prints)} images are images of this run's {' or '.join(tables)} split "
                f"(compared by content, e.g. {example})")
        if not keep:
            raise EdgeKDError(f"distill.unlabeled: {said}: the student would be taught on images it is validated or "
                              "tested on; use other images")
        log(f"warning: distill.unlabeled: {said}; left out of the pool")
        pool, prints = pool.subset(np.asarray(keep, dtype=np.int64)), [prints[i] for i in keep]
    return pool, prints, left


def check_pool_for_folds(recipe, folds: int) -> None:
    """Before a k-fold run trains its first teacher: the pool is allowed (`refuse_held_out_pool`, as each fold's
    run will judge it) and reads. Each fold's run leaves out that fold's val and test images."""
    cfg = recipe.distill.unlabeled if recipe.distill else None
    if cfg is None:
        return
    refuse_held_out_pool(cfg, recipe.data.model_copy(update={"folds": folds}))
    unlabeled_table(cfg, recipe.data.on_bad_image, lambda *_: None)


def build_unlabeled(recipe, data, log=print) -> UnlabeledStream | None:
    """The recipe's `distill.unlabeled` pool as a stream (None when the recipe has none), without the images of
    the run's val and test splits (`data`: the run's DataModule, whose `bad_files` get the pool's skipped
    files). The stream's `record` says what the pool was (images, skipped, left out, content digest)."""
    cfg = recipe.distill.unlabeled if recipe.distill else None
    if cfg is None:
        return None
    refuse_held_out_pool(cfg, recipe.data)
    skipped: list[str] = []
    table = unlabeled_table(cfg, recipe.data.on_bad_image, log, skipped)
    table, prints, left = leave_out_held_images(table, {s: data.tables[s] for s in ("val", "test")
                                                        if s in data.tables}, log)
    data.bad_files.extend(f"distill.unlabeled: {line}" for line in skipped)
    dataset = UnlabeledImages(table, build_transforms(recipe.data, recipe.augment, train=True))
    batch = cfg.batch_size or recipe.data.batch_size
    log(f"distill: {len(table)} unlabeled images ({cfg.source} {cfg.path or ''}), {min(batch, len(table))} per "
        f"step, teacher terms x{cfg.weight:g} on them")
    from edgekd.train import process_rank

    stream = UnlabeledStream(dataset, batch, recipe.seed, recipe.data.num_workers, offset=process_rank())
    stream.record = {"images": len(table), "skipped": len(skipped), "left_out": left,
                     "content_digest": hashlib.blake2b("".join(sorted(prints)).encode(), digest_size=16).hexdigest()}
    return stream
