"""KD on unlabeled images (issue 19): the pool, its stream, the loss on unlabeled batches, a run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import run_edgekd, write_image_folder, write_npz
from edgekd.distill.losses import KDBatch, decoupled_kd, kl_divergence
from edgekd.distill.objective import build_objective, freeze_teacher
from edgekd.distill.unlabeled import UnlabeledImages, UnlabeledStream, unlabeled_table
from edgekd.errors import EdgeKDError
from edgekd.models import create_model
from edgekd.recipe import DistillConfig, UnlabeledConfig, recipe_from_dict
from test_distill import S, T, Y, hand_ce, hand_kl, pre, teacher_ckpt, tiny, tiny_recipe, tiny_teacher  # noqa: F401


def distill_cfg(terms, **kw) -> DistillConfig:
    return DistillConfig.model_validate({"teacher": "t.pt", "terms": terms, **kw})


# ---------------------------------------------------------------- the pool

def test_a_folder_pool_takes_every_image_at_any_depth_and_ignores_other_files(tmp_path):
    write_image_folder(tmp_path / "pool", n_per_class=3, classes=("x", "y"))  # 6 images
    (tmp_path / "pool" / "y" / "deeper").mkdir()
    (tmp_path / "pool" / "y" / "y_0.png").rename(tmp_path / "pool" / "y" / "deeper" / "y_0.png")  # any depth
    (tmp_path / "pool" / "notes.txt").write_text("not an image")
    table = unlabeled_table(UnlabeledConfig(source="folder", path=str(tmp_path / "pool")))
    assert len(table) == 6 and all(p.endswith(".png") for p in table.paths)
    limited = unlabeled_table(UnlabeledConfig(source="folder", path=str(tmp_path / "pool"), limit=4))
    assert len(limited) == 4 and set(limited.paths) <= set(table.paths)
    assert limited.paths == unlabeled_table(UnlabeledConfig(source="folder", path=str(tmp_path / "pool"),
                                                            limit=4)).paths  # the same subset every time


def test_a_labelled_source_gives_one_split_and_its_labels_are_never_yielded(tmp_path):
    npz = write_npz(tmp_path / "d.npz", n=(10, 4, 6))
    table = unlabeled_table(UnlabeledConfig(source="medmnist", path=str(npz), split="test"))
    assert len(table) == 6
    item = UnlabeledImages(table, lambda img: img.float())[0]
    assert isinstance(item, torch.Tensor) and item.shape == (1, 16, 16)  # an image, no (image, label) pair


@pytest.mark.parametrize("cfg, message", [
    ({"source": "folder", "path": "nowhere"}, "folder nowhere not found"),
    ({"source": "medmnist", "path": "d.npz", "split": "all"}, "has no 'all' split"),
    ({"source": "medmnist", "path": "nope.npz"}, "^distill.unlabeled: nope.npz: MedMNIST .npz not found"),
])
def test_a_bad_pool_is_a_one_line_error(tmp_path, monkeypatch, cfg, message):
    monkeypatch.chdir(tmp_path)
    write_npz(tmp_path / "d.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EdgeKDError, match=message) as err:
        unlabeled_table(UnlabeledConfig(**cfg))
    assert "\n" not in str(err.value)


def test_an_empty_folder_pool_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EdgeKDError, match="no images under"):
        unlabeled_table(UnlabeledConfig(source="folder", path=str(tmp_path / "empty")))


@pytest.mark.parametrize("pool, data, refused", [
    ({"source": "medmnist", "path": "d.npz", "split": "test"}, {"source": "medmnist", "path": "d.npz"}, True),
    ({"source": "medmnist", "path": "./d.npz", "split": "val"}, {"source": "medmnist", "path": "d.npz"}, True),
    ({"source": "medmnist", "path": "d.npz", "split": "train"},
     {"source": "medmnist", "path": "d.npz", "split": "stratified"}, True),  # the recipe re-splits the file
    ({"source": "folder", "path": "imgs"}, {"source": "imagefolder", "path": "imgs"}, True),
    ({"source": "builtin", "split": "val"}, {"source": "builtin"}, True),
    ({"source": "folder", "path": "imgs/test"}, {"source": "imagefolder", "path": "imgs"}, True),  # inside it
    ({"source": "folder", "path": "imgs/train/normal"}, {"source": "imagefolder", "path": "imgs"}, False),
    ({"source": "folder", "path": "imgs/train"}, {"source": "imagefolder", "path": "imgs", "split": "stratified"},
     True),
    ({"source": "medmnist", "path": "d.npz", "split": "train"}, {"source": "medmnist", "path": "d.npz"}, False),
    ({"source": "medmnist", "path": "other.npz", "split": "test"}, {"source": "medmnist", "path": "d.npz"}, False),
])
def test_a_pool_that_holds_the_runs_own_val_or_test_images_is_refused(tmp_path, monkeypatch, pool, data, refused):
    from edgekd.distill.unlabeled import refuse_held_out_pool
    from edgekd.recipe import DataConfig

    monkeypatch.chdir(tmp_path)
    if refused:
        with pytest.raises(EdgeKDError, match="holds images this run validates and tests on|this run splits that "
                                              "data itself .data.split stratified., so its validation images"):
            refuse_held_out_pool(UnlabeledConfig(**pool), DataConfig(**data))
    else:
        refuse_held_out_pool(UnlabeledConfig(**pool), DataConfig(**data))


def _given_folder(root, splits=("train", "val", "test")):
    for i, split in enumerate(splits):
        write_image_folder(root / split, n_per_class=4, size=16, classes=("a", "b"))
        for p in (root / split).rglob("*.png"):  # each split's own pixels (write_image_folder draws per class)
            p.rename(p.with_name(f"{split}_{p.name}"))
            img = np.asarray(Image.open(p.with_name(f"{split}_{p.name}")))
            Image.fromarray(np.clip(img.astype(int) + 7 * (i + 1), 0, 255).astype(np.uint8)).save(
                p.with_name(f"{split}_{p.name}"))
    return root


def test_a_pool_never_holds_a_val_or_test_image_under_any_path(tmp_path):
    """The path rules let these through: a copy or a folder of links to the test images, a folder holding the
    data folder, the train/ folder val is carved from, the built-in set's own file named by its path. Compared
    by content, such images leave the pool (with a warning); a pool of nothing else is refused."""
    import shutil

    from conftest import tiny_recipe as recipe_dict
    from edgekd.data import build_data
    from edgekd.data.sources import BUILTIN_DIR
    from edgekd.distill.unlabeled import build_unlabeled

    def build(data: dict, pool: dict, said: list | None = None):
        raw = recipe_dict(tmp_path / "unused.npz", data=data, distill={"teacher": "t.pt", "unlabeled": pool,
                                                                        "terms": [{"kind": "kl"}]})
        recipe = recipe_from_dict(raw)
        return build_unlabeled(recipe, build_data(recipe), log=(said if said is not None else []).append)

    folder = {"source": "imagefolder", "path": str(_given_folder(tmp_path / "data" / "given"))}
    shutil.copytree(tmp_path / "data" / "given" / "test", tmp_path / "copy")
    (tmp_path / "links").mkdir()
    for p in sorted((tmp_path / "data" / "given" / "test").rglob("*.png"))[:2]:
        (tmp_path / "links" / p.name).symlink_to(p)
    for pool in ("copy", "links"):
        with pytest.raises(EdgeKDError, match=r"distill.unlabeled: (8 of the pool's 8|2 of the pool's 2) images are "
                                              r"images of this run's val or test split \(compared by content"):
            build(folder, {"source": "folder", "path": str(tmp_path / pool)})
    with pytest.raises(EdgeKDError, match="300 of the pool's 300 images are images of this run's val or test split"):
        build({"source": "builtin", "path": None, "channels": 1, "image_size": 28, "mean": [0.5], "std": [0.5]},
              {"source": "medmnist", "path": str(BUILTIN_DIR / "pneumoniamnist_mini.npz"), "split": "test"})
    said: list[str] = []  # the folder holding the data folder: its train images stay, val's and test's leave
    stream = build(folder, {"source": "folder", "path": str(tmp_path / "data")}, said)
    assert (stream.record["images"], stream.record["left_out"]) == (8, 16)
    assert any(line.startswith("warning: distill.unlabeled: 16 of the pool's 24 images are images of this run's "
                               "val or test split") for line in said), said
    carved = {"source": "imagefolder", "path": str(_given_folder(tmp_path / "two", ("train", "test")))}
    stream = build(carved, {"source": "folder", "path": str(tmp_path / "two" / "train")})  # val carved from train/
    assert stream.record["left_out"] > 0 and stream.record["images"] + stream.record["left_out"] == 8
    write_image_folder(tmp_path / "outside", n_per_class=3, size=16, classes=("x", "y"))
    stream = build(folder, {"source": "folder", "path": str(tmp_path / "outside")})
    assert (stream.record["images"], stream.record["skipped"], stream.record["left_out"]) == (6, 0, 0)
    assert len(stream.record["content_digest"]) == 32


def test_a_folder_of_pngs_saved_from_the_npz_val_and_test_splits_leaves_the_pool(tmp_path):
    """File bytes and array pixels never matched: a folder of PNG copies of the .npz's own val and test images
    stayed in the pool whole (32 of 32), and the student was taught on the images it is tested on. Decoded pixels
    match; gray and RGB alike."""
    from conftest import tiny_recipe as recipe_dict
    from edgekd.data import build_data
    from edgekd.distill.unlabeled import build_unlabeled

    for channels in (1, 3):
        npz = write_npz(tmp_path / f"d{channels}.npz", channels=channels)
        pool = tmp_path / f"pool{channels}"
        pool.mkdir()
        with np.load(npz) as arrays:
            held = [a for split in ("val", "test") for a in arrays[f"{split}_images"]]
            train = arrays["train_images"][:3]
        for i, a in enumerate([*held, *train]):
            Image.fromarray(a).save(pool / f"{i}.png")
        recipe = recipe_from_dict(recipe_dict(npz, distill={"teacher": "t.pt", "terms": [{"kind": "kl"}],
                                                            "unlabeled": {"source": "folder", "path": str(pool)}}))
        said: list[str] = []
        stream = build_unlabeled(recipe, build_data(recipe), log=said.append)
        assert (stream.record["images"], stream.record["left_out"]) == (3, len(held)), said
        assert any(f"{len(held)} of the pool's {len(held) + 3} images are images of this run's val or test split"
                   in line for line in said), said


def test_a_resumed_run_refuses_a_pool_whose_images_changed():
    from edgekd.distill.run import check_same_pool

    saved = {"distill": {"unlabeled_pool": {"images": 60, "content_digest": "a" * 32}}}
    same, other = UnlabeledStream.__new__(UnlabeledStream), UnlabeledStream.__new__(UnlabeledStream)
    same.record, other.record = {"images": 60, "content_digest": "a" * 32}, {"images": 90, "content_digest": "b" * 32}
    check_same_pool(saved, same, "last.pt")
    check_same_pool({"distill": {"unlabeled_pool": None}}, other, "last.pt")  # a checkpoint from before the record
    with pytest.raises(EdgeKDError, match=r"last.pt: distill.unlabeled: the pool's images changed since this run "
                                          r"started \(60 images then, 90 now"):
        check_same_pool(saved, other, "last.pt")


def test_the_schema_wants_a_path_except_for_the_builtin_set():
    with pytest.raises(EdgeKDError, match="source folder needs a path"):
        recipe_from_dict({"distill": {"teacher": "t.pt", "terms": [{"kind": "kl"}], "unlabeled": {}}})
    recipe_from_dict({"distill": {"teacher": "t.pt", "terms": [{"kind": "kl"}], "unlabeled": {"source": "builtin"}}})


def test_the_stream_is_endless_seeded_and_reshuffled_per_pass(tmp_path):
    npz = write_npz(tmp_path / "d.npz", n=(10, 4, 4))
    ds = UnlabeledImages(unlabeled_table(UnlabeledConfig(source="medmnist", path=str(npz))), lambda img: img.float())

    def draw(seed, n=7):
        stream = UnlabeledStream(ds, batch_size=4, seed=seed)
        return [stream.next() for _ in range(n)], stream

    first, stream = draw(0)
    again, _ = draw(0)
    other, _ = draw(1)
    assert all(b.shape == (4, 1, 16, 16) for b in first)  # 10 images, batches of 4: the ragged 2 are dropped
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # a seeded run repeats itself
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    assert stream.passes == 3  # 2 batches per pass, 7 batches: 3 passes ended
    assert not torch.equal(torch.cat(first[:2]), torch.cat(first[2:4]))  # each pass in a new order

    stream.set_epoch(1)  # a new epoch restarts the stream: what it draws depends on (seed, epoch) alone
    epoch1 = [stream.next() for _ in range(3)]
    resumed = UnlabeledStream(ds, batch_size=4, seed=0)
    resumed.set_epoch(1)  # as a run resumed at epoch 1 does
    assert all(torch.equal(a, resumed.next()) for a in epoch1)
    assert not torch.equal(epoch1[0], first[0]) or not torch.equal(epoch1[1], first[1])


# ---------------------------------------------------------------- the loss on unlabeled images

class FixedStream:
    def __init__(self, images: torch.Tensor):
        self.images = images

    def next(self) -> torch.Tensor:
        return self.images


def test_unlabeled_batches_add_weight_times_the_teacher_terms_and_skip_the_label_terms():
    torch.manual_seed(0)
    student, teacher = tiny("edgekd_cnn_tiny"), freeze_teacher(tiny("test_resnet"))
    terms = [{"kind": "kl", "weight": 0.7, "temperature": 4}, {"kind": "ce", "weight": 0.3}]
    x, y, u = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 0, 1]), torch.randn(5, 3, 16, 16)
    plain = build_objective(distill_cfg(terms), student, teacher, teacher_ckpt("test_resnet"), pre(16), None,
                            num_classes=2, log=lambda m: None)
    with_pool = build_objective(distill_cfg(terms, unlabeled={"source": "folder", "path": "p", "weight": 0.5}),
                                student, teacher, teacher_ckpt("test_resnet"), pre(16), None, num_classes=2,
                                log=lambda m: None, unlabeled=FixedStream(u))
    student.eval()  # BatchNorm in eval: the same input gives the same logits in every call below
    labelled, _ = plain(student, x, y)
    total, logits = with_pool(student, x, y)
    with torch.no_grad():
        s_u, t_u = student(u), teacher(u)
    want = labelled + 0.5 * 0.7 * kl_divergence(s_u, t_u, 4.0)  # no CE on the unlabeled batch
    torch.testing.assert_close(total, want)
    assert logits.shape == (4, 2)  # the labelled batch's logits, for the trainer's bookkeeping
    assert set(with_pool.last_parts) == {"0_kl", "1_ce", "unlabeled_0_kl"}
    grads = torch.autograd.grad(total, list(student.parameters()))
    plain_grads = torch.autograd.grad(plain(student, x, y)[0], list(student.parameters()))
    assert any(not torch.allclose(a, b) for a, b in zip(grads, plain_grads))  # the unlabeled term reaches the student


def test_kl_on_an_unlabeled_batch_matches_hand_computed_values():
    loss = build_objective(distill_cfg([{"kind": "kl", "weight": 1.0, "temperature": 2}, {"kind": "ce"}]),
                           torch.nn.Identity(), torch.nn.Identity(), teacher_ckpt("test_resnet"), pre(16), None,
                           log=lambda m: None).loss
    batch = KDBatch(torch.tensor(S), torch.tensor(Y), torch.tensor(T))
    unlabeled, parts = loss(batch, labelled=False)
    assert unlabeled.item() == pytest.approx(hand_kl(S, T, 2.0), rel=1e-5)
    labelled, _ = loss(batch)
    assert labelled.item() == pytest.approx(hand_kl(S, T, 2.0) + hand_ce(S, Y), rel=1e-5)
    assert set(parts) == {"0_kl"}


def test_dkd_on_an_unlabeled_batch_takes_the_teachers_top_class_as_the_target():
    torch.manual_seed(0)
    student = create_model({"name": "edgekd_cnn_tiny", "num_classes": 3, "in_chans": 3})
    teacher = freeze_teacher(create_model({"name": "test_resnet", "num_classes": 3, "in_chans": 3}))
    u = torch.randn(6, 3, 16, 16)
    cfg = distill_cfg([{"kind": "dkd", "weight": 1.0, "temperature": 4, "alpha": 1.0, "beta": 8.0}],
                      unlabeled={"source": "folder", "path": "p"})
    ckpt = {**teacher_ckpt("test_resnet"), "arch": {"name": "test_resnet", "num_classes": 3, "kwargs": {}}}
    objective = build_objective(cfg, student, teacher, ckpt, pre(16), None,
                                num_classes=3, log=lambda m: None, unlabeled=FixedStream(u))
    student.eval()
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([0, 2])
    total, _ = objective(student, x, y)
    with torch.no_grad():
        s_x, t_x, s_u, t_u = student(x), teacher(x), student(u), teacher(u)
    want = decoupled_kd(s_x, t_x, y, 4.0, 1.0, 8.0) + decoupled_kd(s_u, t_u, t_u.argmax(1), 4.0, 1.0, 8.0)
    torch.testing.assert_close(total, want)


# ---------------------------------------------------------------- end to end

def test_a_student_trains_on_an_image_folder_pool_from_the_cli_and_repeats_itself(tmp_path, tiny_teacher,
                                                                                   monkeypatch):
    from typer.testing import CliRunner

    from edgekd.cli import app
    from edgekd.train.checkpoint import load_checkpoint

    epochs = []
    set_epoch = UnlabeledStream.set_epoch
    monkeypatch.setattr(UnlabeledStream, "set_epoch", lambda self, e: (epochs.append(e), set_epoch(self, e)))
    write_image_folder(tmp_path / "pool", n_per_class=10, size=20, classes=("scans", "more"))
    raw = tiny_recipe(tmp_path, name="tiny-unlabeled", role="student", train={"epochs": 2},
                      distill={"teacher": str(tiny_teacher),
                               "unlabeled": {"source": "folder", "path": str(tmp_path / "pool"), "batch_size": 8},
                               "terms": [{"kind": "kl", "weight": 0.7, "temperature": 4}, {"kind": "ce", "weight": 0.3}]})
    (tmp_path / "student.yaml").write_text(yaml.safe_dump(raw))
    runs = []
    for name in ("a", "b"):
        result = CliRunner().invoke(app, ["train", str(tmp_path / "student.yaml"), "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        assert "20 unlabeled images" in result.output
        runs.append(json.loads((tmp_path / name / "metrics.json").read_text())["test"])
    assert runs[0]["acc"] == runs[1]["acc"] and runs[0]["auc"] == runs[1]["auc"]
    assert epochs == [0, 1, 0, 1]  # the trainer restarts the pool at each epoch (2 per run): exact --resume
    meta = load_checkpoint(tmp_path / "a" / "best.pt")["distill"]
    assert meta["unlabeled"]["path"] == str(tmp_path / "pool")
    pool = json.loads((tmp_path / "a" / "metrics.json").read_text())["unlabeled_pool"]
    assert pool == meta["unlabeled_pool"] and pool["images"] == 20  # what the pool was, in the run's records

    raw["distill"]["unlabeled"]["path"] = str(tmp_path / "missing")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    bad = run_edgekd("train", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "c"))
    assert bad.returncode != 0 and "distill.unlabeled: folder" in bad.stderr and "missing not found" in bad.stderr
    assert "Traceback" not in bad.stderr + bad.stdout and not (tmp_path / "c" / "best.pt").exists()


def test_a_k_fold_run_refuses_its_pool_before_the_first_teacher_trains(tmp_path):
    """A pool the folds' runs refuse (the train split of data the folds re-split) or a missing folder had been
    refused only after fold 1's teacher had trained."""
    for pool, words in ((["distill.unlabeled.source=builtin"], "this run splits that data itself (data.folds)"),
                        (["distill.unlabeled.source=folder", f"distill.unlabeled.path={tmp_path / 'none'}"],
                         "not found")):
        res = run_edgekd("train", Path(__file__).parents[1] / "recipes/demo/student.yaml", "--out", str(tmp_path / "kf"), "--folds", "2",
                         *[a for p in pool for a in ("--set", p)])
        assert res.returncode == 2 and words in res.stderr and "Traceback" not in res.stderr, res.stderr
        assert "epoch" not in res.stdout and not (tmp_path / "kf").exists()



def test_an_unlabeled_stream_never_repeats_a_pass_across_epochs():
    """Seeded (seed * 1000 + epoch) * 1000 + pass: pass 1000 of epoch 0 was pass 0 of epoch 1, the same batches."""
    import torch

    from edgekd.distill.unlabeled import UnlabeledStream

    data = torch.utils.data.TensorDataset(torch.arange(64))
    stream = UnlabeledStream(data, batch_size=64, seed=3)

    def order(epoch, passes):
        stream.epoch, stream.passes = epoch, passes
        return next(iter(stream._loader()))[0].tolist()

    assert order(0, 1000) != order(1, 0)
    assert order(0, 5) == order(0, 5) and order(2, 7) != order(2, 8)
    stream.epoch, stream.passes = 1, 2  # under 1000 passes: the generator recorded runs used, unchanged
    assert stream._loader().generator.initial_seed() == (3 * 1000 + 1) * 1000 + 2
