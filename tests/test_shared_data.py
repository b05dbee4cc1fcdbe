"""The real datasets in ../shared/data (skipped when absent): loaders, official splits, class subsets, limits."""

import numpy as np

from edgekd.data import build_data, load_source
from edgekd.recipe import recipe_from_dict


def test_pneumoniamnist_official_splits_and_classes(shared_data):
    src = load_source("medmnist", str(shared_data / "medmnist" / "pneumoniamnist.npz"))
    assert src.class_names == ["normal", "pneumonia"]
    sizes = {k: len(t) for k, t in src.tables.items()}
    assert sizes == {"train": 3882, "val": 524, "test": 624}  # ../shared/data/README.md
    assert np.bincount(src.tables["val"].labels).tolist() == [135, 389]
    assert np.bincount(src.tables["test"].labels).tolist() == [234, 390]
    assert src.tables["test"].images.shape[1:] == (28, 28, 1) and src.tables["test"].images.dtype == np.uint8
    # The recipe's `split: given` keeps the official test split exactly (the paper's comparison needs it).
    dm = build_data(recipe_from_dict({"data": {"source": "medmnist", "image_size": 28, "channels": 3,
                                              "path": str(shared_data / "medmnist" / "pneumoniamnist.npz")}}))
    assert len(dm.tables["test"]) == 624 and np.array_equal(dm.tables["test"].labels, src.tables["test"].labels)
    x, y = next(iter(dm.loader("test", train=False)))
    assert tuple(x.shape[1:]) == (3, 28, 28)


def test_fashion_mnist_idx_files_class_subset_and_limit(shared_data):
    src = load_source("fashion_mnist", str(shared_data / "fashion-mnist"))
    assert len(src.tables["train"]) == 60000 and len(src.tables["test"]) == 10000
    assert src.class_names[:2] == ["t-shirt", "trouser"] and len(src.class_names) == 10
    assert np.bincount(src.tables["test"].labels).tolist() == [1000] * 10
    # One Split Fashion-MNIST task: two classes renumbered 0..1, and `limit`: a stratified subset of every split.
    dm = build_data(recipe_from_dict({"data": {"source": "fashion_mnist", "path": str(shared_data / "fashion-mnist"),
                                              "image_size": 28, "classes": [4, 6], "limit": 500}}))
    assert dm.class_names == [src.class_names[4], src.class_names[6]]
    train = dm.tables["train"].labels
    assert len(train) == 500 and set(np.unique(train)) == {0, 1} and abs(int((train == 0).sum()) - 250) <= 1
    assert np.bincount(dm.tables["test"].labels).tolist() == [250, 250]
