"""Recipe loading: validation errors name the key, overrides, base inheritance, every shipped recipe loads."""

import os
from pathlib import Path

import pytest
import yaml

from edgekd.errors import EdgeKDError
from edgekd.recipe import apply_overrides, load_recipe, recipe_from_dict

REPO = Path(__file__).resolve().parents[1]


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  epochz: 3\n")
    with pytest.raises(EdgeKDError, match=r"unknown key 'train.epochz'"):
        load_recipe(p)


def test_a_continual_recipe_with_a_distill_section_is_refused(tmp_path):
    """The continual runner took such a recipe and never loaded its teacher: KD looked on and was off."""
    base = REPO / "recipes/continual/retina-pneumonia/logit-finetune.yaml"
    (tmp_path / "kd.yaml").write_text(yaml.safe_dump({"base": str(base), "distill": {
        "teacher": "t.pt", "terms": [{"kind": "kl", "weight": 0.7, "temperature": 4}, {"kind": "ce", "weight": 0.3}]}}))
    with pytest.raises(EdgeKDError, match="does not use a distill section"):
        load_recipe(tmp_path / "kd.yaml")
    load_recipe(base)  # without it: fine


def test_a_set_key_of_a_section_the_recipe_lacks_is_named_as_turning_it_on():
    """--set continual.ewc.fisher_samples=200 on an LwF recipe ran EWC too, with defaults, under the LwF name."""
    from edgekd.recipe import sections_turned_on

    lwf = REPO / "recipes/continual/retina-pneumonia/logit-lwf.yaml"
    assert sections_turned_on(lwf, ["continual.ewc.fisher_samples=200", "train.epochs=1",
                                    "continual.lwf.weight=2", "continual.ewc.weight=5"]) == ["continual.ewc"]
    assert sections_turned_on(lwf, ["train.epochs=2"]) == []
    assert sections_turned_on(REPO / "recipes/demo/baseline.yaml", ["distill.teacher=t.pt"]) == ["distill"]


def test_joint_with_a_method_is_refused():
    """joint + replay ran replay under the name "joint" (continual.json said joint)."""
    with pytest.raises(EdgeKDError, match="joint trains on every task's data at once.*replay cannot be part of it"):
        load_recipe(REPO / "recipes/continual/split-fashion/joint.yaml", ["continual.replay.size=10"])


def test_ewc_gamma_without_online_is_refused():
    """It was accepted and never read (gamma decays online EWC's running Fisher only)."""
    ewc = REPO / "recipes/continual/retina-pneumonia/logit-ewc.yaml"
    with pytest.raises(EdgeKDError, match="gamma 0.1 decays online EWC's running Fisher; set online: true"):
        load_recipe(ewc, ["continual.ewc.gamma=0.1"])
    assert load_recipe(ewc, ["continual.ewc.gamma=0.1", "continual.ewc.online=true"]).continual.ewc.gamma == 0.1


def test_wrong_type_is_named(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  epochs: many\n")
    with pytest.raises(EdgeKDError, match=r"train.epochs"):
        load_recipe(p)


def test_invalid_yaml_and_missing_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train: [unclosed\n")
    with pytest.raises(EdgeKDError, match="not valid YAML"):
        load_recipe(p)
    with pytest.raises(EdgeKDError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_overrides_parse_yaml_values(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: a\n")
    r = load_recipe(p, ["train.epochs=3", "train.optimizer.lr=1e-4", "data.mean=[0.1,0.2,0.3]", "name=b"])
    assert r.train.epochs == 3 and r.train.optimizer.lr == pytest.approx(1e-4)
    assert r.data.mean == [0.1, 0.2, 0.3] and r.name == "b"
    with pytest.raises(EdgeKDError, match="key=value"):
        apply_overrides({}, ["train.epochs"])



def test_integers_are_decimal_as_in_yaml_1_2(tmp_path):
    """PyYAML's YAML 1.1 made `seed: 010` 8 (octal), `0x10` 16 and `1:30` 90 (base 60) without a word."""
    p = tmp_path / "r.yaml"
    p.write_text("name: a\nseed: 010\ntrain: {epochs: 1_0}\n")
    r = load_recipe(p, ["data.batch_size=016"])
    assert (r.seed, r.train.epochs, r.data.batch_size) == (10, 10, 16)
    with pytest.raises(EdgeKDError, match="--set seed=0x10: seed"):
        load_recipe(p, ["seed=0x10"])
    with pytest.raises(EdgeKDError, match="--set train.epochs=1:30: train.epochs"):
        load_recipe(p, ["train.epochs=1:30"])


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_a_seed_outside_what_the_split_draws_take_is_refused(tmp_path, seed):
    """seed -1 trained until a split was carved (scikit-learn takes 0 to 2**32 - 1), then ended with an internal
    error; a seed of 1e14 overflowed the unlabeled pool's draw seeds after the teacher loaded."""
    p = tmp_path / "r.yaml"
    p.write_text("name: a\n")
    with pytest.raises(EdgeKDError, match=f"--set seed={seed}: seed: Input should be"):
        load_recipe(p, [f"seed={seed}"])
    assert load_recipe(p, [f"seed={2**32 - 1}"]).seed == 2**32 - 1


def test_overrides_reach_into_a_list_by_index_or_name():
    raw = {"continual": {"tasks": [{"name": "A"}, {"name": "B", "data": {"path": "b.npz"}}]}, "data": {"mean": [0.5]}}
    out = apply_overrides(raw, ["continual.tasks.1.data.path=c.npz", "continual.tasks.A.epochs=4",
                                "continual.tasks.-1.classes=[0, 1]", "data.mean.0=0.2"])
    assert out["continual"]["tasks"] == [{"name": "A", "epochs": 4},
                                         {"name": "B", "data": {"path": "c.npz"}, "classes": [0, 1]}]
    assert out["data"]["mean"] == [0.2] and raw["continual"]["tasks"][1]["data"]["path"] == "b.npz"
    with pytest.raises(EdgeKDError, match=r"'continual.tasks' is a list of 2; give an index 0..1 or a name \(A, B\)"):
        apply_overrides(raw, ["continual.tasks.C.epochs=4"])
    with pytest.raises(EdgeKDError, match="'data.mean.0' is not a section"):
        apply_overrides(raw, ["data.mean.0.x=1"])
    # A name finds its own item among non-mappings; a key naming one item and indexing another is refused.
    mixed = {"x": {"items": ["plain", {"name": "B"}, {"name": "0"}]}}
    assert apply_overrides(mixed, ["x.items.B.v=2"])["x"]["items"][1] == {"name": "B", "v": 2}
    with pytest.raises(EdgeKDError, match="'0' in 'x.items' is both an index and the name of item 2"):
        apply_overrides(mixed, ["x.items.0=1"])
    with pytest.raises(EdgeKDError, match="'x.items' is an empty list"):
        apply_overrides({"x": {"items": []}}, ["x.items.0=1"])


def test_base_inheritance_merges_deeply(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"name": "base", "train": {"epochs": 5, "optimizer": {"lr": 0.1}}}))
    (tmp_path / "child.yaml").write_text("base: base.yaml\nname: child\ntrain:\n  optimizer: {name: sgd}\n")
    r = load_recipe(tmp_path / "child.yaml")
    assert (r.name, r.train.epochs, r.train.optimizer.name, r.train.optimizer.lr) == ("child", 5, "sgd", 0.1)


def test_model_kwargs_are_replaced_not_merged(tmp_path):
    (tmp_path / "teacher.yaml").write_text(yaml.safe_dump(
        {"model": {"name": "swinv2_tiny_window8_256", "kwargs": {"img_size": 32, "window_size": 2}}}))
    (tmp_path / "vit.yaml").write_text("base: teacher.yaml\nmodel: {name: vit_small_patch16_224}\n")
    (tmp_path / "vit28.yaml").write_text("base: teacher.yaml\nmodel: {name: vit_small_patch16_224, "
                                         "kwargs: {img_size: 28, patch_size: 4}}\n")
    (tmp_path / "swin.yaml").write_text("base: teacher.yaml\nmodel: {drop_path_rate: 0.2}\n")
    assert load_recipe(tmp_path / "vit.yaml").model.kwargs == {}
    assert load_recipe(tmp_path / "vit28.yaml").model.kwargs == {"img_size": 28, "patch_size": 4}
    assert load_recipe(tmp_path / "swin.yaml").model.kwargs == {"img_size": 32, "window_size": 2}


def test_digest_changes_with_content():
    a = recipe_from_dict({"name": "x"})
    b = recipe_from_dict({"name": "x", "seed": 1})
    assert a.digest() != b.digest() and a.digest() == recipe_from_dict({"name": "x"}).digest()


@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in (REPO / "recipes").rglob("*.yaml")))
def test_every_shipped_recipe_validates(path):
    r = load_recipe(REPO / path)
    assert r.name


def test_recipe_key_reference_is_current_and_complete():
    """docs/recipe-keys.md is generated from the schema: regenerate it (scripts/recipe_keys.py) when a key changes."""
    from pathlib import Path

    from edgekd.recipe import DataConfig, TrainConfig, recipe_key_reference

    text = recipe_key_reference()
    assert (Path(__file__).resolve().parents[1] / "docs" / "recipe-keys.md").read_text() == text
    for key in [*(f"data.{k}" for k in DataConfig.model_fields), *(f"train.{k}" for k in TrainConfig.model_fields),
                "model.head_dropout", "train.monitor_mode",
                "train.scheduler.name", "distill.terms.[KLTerm].temperature"]:
        assert f"| `{key}` |" in text, key


def test_load_recipe_takes_one_override_as_a_string(tmp_path):
    """`load_recipe(path, "train.epochs=1")` read the string character by character (`--set 't': expected ...`)."""
    from edgekd.recipe import load_recipe

    (tmp_path / "r.yaml").write_text("name: r\n")
    assert load_recipe(tmp_path / "r.yaml", "train.epochs=3").train.epochs == 3


def test_yaml_merge_keys_unhashable_keys_and_blame_after_a_fixing_set(tmp_path):
    import yaml

    from edgekd.recipe import load_yaml

    # `<<: *anchor` merges as in yaml.safe_load (the duplicate-key check must not take `<<` for a key)
    text = "a: &x {b: 1, c: 2}\nd:\n  <<: *x\n  c: 3\n"
    assert load_yaml(text) == yaml.safe_load(text) == {"a": {"b": 1, "c": 2}, "d": {"b": 1, "c": 3}}
    with pytest.raises(yaml.YAMLError, match="found unhashable key"):  # not a TypeError
        load_yaml("? [1, 2]\n: 3\n")
    with pytest.raises(EdgeKDError, match=r"--set train=\{a: 1, a: 2\}: duplicate key 'a'"):
        apply_overrides({}, ["train={a: 1, a: 2}"])
    # the file's own problem, fixed by one --set, is not blamed for another --set's
    p = tmp_path / "r.yaml"
    p.write_text("name: a/b\n")
    with pytest.raises(EdgeKDError, match=r"^--set train.epochs=abc: train.epochs: Input should be a valid integer"):
        load_recipe(p, ["name=ok", "train.epochs=abc"])
    with pytest.raises(EdgeKDError, match=r"r.yaml: name: String should match pattern"):
        load_recipe(p, ["train.epochs=3"])
    # An in-between problem a later --set mends is not the one named: `distill.unlabeled.source` alone leaves
    # distill.terms missing, which the next --set gives; the recipe's problem with all of them is another.
    p.write_text("name: cl\ncontinual: {tasks: [{name: t1, data: {source: builtin}}, {name: t2, data: {source: builtin}}]}\n")
    with pytest.raises(EdgeKDError) as err:
        load_recipe(p, ["distill.unlabeled.source=builtin", "distill.terms=[{kind: kl}]", "distill.teacher=t.pt"])
    assert "distill.terms: Field required" not in str(err.value)
    assert str(err.value).startswith("--set distill.") and "does not use a distill section" in str(err.value)
    # mean/std against channels is a recipe check (it was found building the transforms, naming no --set)
    p.write_text("name: ok\n")
    with pytest.raises(EdgeKDError, match=r"^--set data.channels=1: data.mean/std need 1 values for "
                                          r"data.channels=1 \(mean has 3, std 3\)"):
        load_recipe(p, ["data.channels=1"])
    assert load_recipe(p, ["data.channels=1", "data.mean=[0.5]", "data.std=[0.25]"]).data.channels == 1


def test_recipe_differences_name_the_changed_leaf():
    """A refused resume named `augment: [{"RandomA...<118 chars>...] -> [{"RandomA...<118 chars>...]`, both sides
    cut to the same text; it names the leaf that changed, and a path in full up to 60 characters."""
    from edgekd.recipe import recipe_differences

    aug = [{"RandomAffine": {"degrees": 10, "translate": [0.1, 0.1]}}, {"ColorJitter": {"contrast": 0.2}}]
    before = {"augment": aug, "data": {"path": "../shared/data/medmnist/pneumoniamnist.npz"}, "tracking": {"a": 1}}
    after = {"augment": [{"RandomAffine": {"degrees": 20, "translate": [0.1, 0.1]}}, aug[1]],
             "data": {"path": "/work/shared/data/medmnist/pneumoniamnist.npz"}, "tracking": {"a": 2}}
    assert recipe_differences(before, after) == [
        "augment.0.RandomAffine.degrees: 10 -> 20",
        'data.path: "../shared/data/medmnist/pneumoniamnist.npz" -> "/work/shared/data/medmnist/pneumoniamnist.npz"']
    (whole,) = recipe_differences({"augment": aug}, {"augment": aug[:1]})  # another length: the lists, cut short
    assert whole.startswith('augment: [{"RandomAffine": {"') and whole.endswith(
        ' -> [{"RandomAffine": {"degrees": 10, "translate": [0.1, 0.1]}}]')
    assert recipe_differences(before, before) == []


def test_a_runs_recipe_yaml_leaves_the_inferred_monitor_directions_unset():
    """A run's recipe.yaml had `monitor_mode: max` (inferred for val_auc) written out: run again with
    `--set train.monitor=val_loss` it kept the epoch of the highest loss. Set directions stay as set."""
    from edgekd.recipe import load_recipe, recipe_from_dict

    recipe = load_recipe(REPO / "recipes/demo/baseline.yaml")
    assert recipe.train.monitor_mode == "max" and recipe.train.scheduler.mode == "max"
    dumped = recipe.to_dict()
    assert dumped["train"]["monitor_mode"] is None and dumped["train"]["scheduler"]["mode"] is None
    dumped["train"]["monitor"] = "val_loss"
    again = recipe_from_dict(dumped)
    assert again.train.monitor_mode == "min" and again.train.scheduler.monitor == "val_loss"
    assert again.train.scheduler.mode == "min"
    assert recipe_from_dict(recipe.to_dict()).digest() == recipe.digest()
    chosen = load_recipe(REPO / "recipes/demo/baseline.yaml", ["train.monitor_mode=min"])
    assert chosen.to_dict()["train"]["monitor_mode"] == "min"  # the recipe's own choice is kept


def test_new_run_traps_are_refused_in_a_given_recipe_but_not_in_an_embedded_one(tmp_path):
    """A checkpoint trained with focal alpha and class_weights (alpha won) must still evaluate and export: the
    refusal is for new runs (load_recipe), not for recipe_from_dict of a checkpoint's embedded recipe."""
    import yaml

    from edgekd.errors import EdgeKDError
    from edgekd.recipe import load_recipe, recipe_from_dict

    raw = {"train": {"loss": {"name": "focal", "alpha": 0.25, "class_weights": True}}, "model": {"freeze_stages": -1}}
    embedded = recipe_from_dict(raw)
    assert embedded.train.loss.alpha == 0.25 and embedded.model.freeze_stages == -1
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(EdgeKDError, match=r"r.yaml: train.loss: focal loss weights classes by alpha or by "
                                          r"class_weights: give one"):
        load_recipe(tmp_path / "r.yaml")
    with pytest.raises(EdgeKDError, match=r"model.freeze_stages must be >= 0 \(got -1\)"):
        load_recipe(tmp_path / "r.yaml", ["train.loss.class_weights=false"])


def test_a_set_value_with_a_hash_is_the_text_given_and_a_number_for_a_path_says_to_quote(tmp_path):
    """`--set "data.path=Batch #3"` had trained on the folder `Batch` (YAML read the rest as a comment); a folder
    named 2024 or on was refused without saying why a folder name is not a string."""
    from edgekd.recipe import parse_override

    assert parse_override("data.path=Batch #3") == (["data", "path"], "Batch #3")
    assert parse_override("model.weights=#best.pt") == (["model", "weights"], "#best.pt")
    assert parse_override("a=[1, 2]")[1] == [1, 2] and parse_override("a=5")[1] == 5
    assert parse_override("a='x #y'")[1] == "x #y"
    p = tmp_path / "r.yaml"
    p.write_text("name: r\n")
    assert load_recipe(p, ["data.source=imagefolder", "data.path=Batch #3"]).data.path == "Batch #3"
    with pytest.raises(EdgeKDError, match=r"^--set data.path=2024: data.path: Input should be a valid string .* quote "
                                          r"a text value"):
        load_recipe(p, ["data.source=imagefolder", "data.path=2024"])



def test_a_symlinked_recipe_finds_its_base_beside_the_file_it_links_to(tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "parent.yaml").write_text("name: parent\ntrain: {epochs: 7}\n")
    (tmp_path / "recipes" / "child.yaml").write_text("base: parent.yaml\nname: child\n")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "link.yaml").symlink_to(tmp_path / "recipes" / "child.yaml")
    assert load_recipe(tmp_path / "elsewhere" / "link.yaml").train.epochs == 7  # had been "parent.yaml: not found"
    (tmp_path / "lonely.yaml").write_text("base: nope.yaml\nname: x\n")
    with pytest.raises(EdgeKDError, match=r"lonely.yaml: base: nope.yaml: recipe file not found \(looked in "):
        load_recipe(tmp_path / "lonely.yaml")
    with pytest.raises(EdgeKDError) as err:  # a relative path, no link: one folder, not the same one twice
        load_recipe(Path(os.path.relpath(tmp_path / "lonely.yaml")))
    assert str(err.value).endswith(f"(looked in {Path(os.path.relpath(tmp_path))})")


def test_settings_that_did_nothing_are_refused_for_a_new_run_but_a_checkpoints_recipe_still_loads(tmp_path):
    """data.fold without folds, swa judged on a train_ metric, head_hidden 0: refused when a run starts (load_recipe,
    the Python entry points), never when a checkpoint's stored recipe is read (eval and export of a model trained
    under them had become impossible)."""
    from edgekd.recipe import refuse_new_run_traps

    for raw, words in (({"data": {"fold": 3}}, "data.fold 3 needs data.folds"),
                       ({"train": {"swa": {"enabled": True}, "monitor": "train_loss"}}, "monitor a val_ metric"),
                       ({"model": {"head_hidden": 0}}, "head_hidden must be >= 1"),
                       ({"model": {"name": "edgekd_cnn_small", "drop_path_rate": 0.3}},  # dropped without a word
                        r"model.drop_path_rate 0.3: the edgekd_cnn_small model has no stochastic depth")):
        stored = recipe_from_dict(raw)  # as a checkpoint's recipe is read
        with pytest.raises(EdgeKDError, match=words):
            refuse_new_run_traps(stored, "r.yaml")
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
        with pytest.raises(EdgeKDError, match=words):
            load_recipe(tmp_path / "r.yaml")
    assert recipe_from_dict({"data": {"fold": 1, "folds": 3}}).data.fold == 1
    # set by a --set, the trap is named as that --set (it had been blamed on the recipe file)
    (tmp_path / "r.yaml").write_text("name: ok\n")
    with pytest.raises(EdgeKDError, match=r"^--set data.fold=2: data.fold 2 needs data.folds"):
        load_recipe(tmp_path / "r.yaml", ["train.epochs=1", "data.fold=2"])


def test_a_yaml_boolean_is_not_taken_for_a_number():
    """`epochs: true` trained 1 epoch; a key that takes a bool (train.amp) still does."""
    with pytest.raises(EdgeKDError, match=r"train.epochs: a number is expected, not true"):
        recipe_from_dict({"train": {"epochs": True}})
    with pytest.raises(EdgeKDError, match=r"data.batch_size: a number is expected, not false"):
        recipe_from_dict({"data": {"batch_size": False}})
    assert recipe_from_dict({"train": {"amp": True, "epochs": 3}}).train.amp is True
    with pytest.raises(EdgeKDError, match=r"data.channels: a number is expected, not true"):  # Literal[1, 3]: gray
        recipe_from_dict({"data": {"channels": True}})
    with pytest.raises(EdgeKDError, match=r"data.std: numbers are expected, not true/false"):  # a list's items
        recipe_from_dict({"data": {"std": [True, 0.5, 0.5]}})
    for value in ("no", 1):  # the other way round: "no" had been false, 1 true
        with pytest.raises(EdgeKDError, match=rf"train.amp: true or false is expected, not {value!r}"):
            recipe_from_dict({"train": {"amp": value}})


def _tiny_raw(sets: dict) -> dict:
    raw = {"name": "t", "data": {"source": "builtin"}, "model": {"name": "edgekd_cnn_tiny"},
           "train": {"optimizer": {"name": "adam", "lr": 0.01}, "monitor": "val_loss"}}
    for section, values in sets.items():
        for key, value in values.items():
            raw[section][key] = {**raw[section].get(key, {}), **value} if isinstance(value, dict) else value
    return raw


@pytest.mark.parametrize("sets, words", [
    # found after a whole epoch: "not a logged metric"
    ({"train": {"monitor": "val_AUC"}}, r"train: monitor 'val_AUC' is not a validation metric the run logs \(did you "
                                        r"mean 'val_auc'\?\); choose from val_loss, val_acc,"),
    ({"train": {"scheduler": {"name": "plateau", "monitor": "val_los"}}}, r"scheduler.monitor 'val_los' .*'val_loss'"),
    # PPV/NPV are NaN in an epoch that calls no image positive (negative): not monitors
    ({"train": {"monitor": "val_ppv"}}, r"monitor 'val_ppv' is logged but cannot pick a checkpoint: it is undefined "
                                        r"in an epoch that calls no image positive"),
    ({"data": {"image_size": 30000}}, r"data.image_size: .*less than or equal to 4096"),  # the runtime's limit; had
    # been an allocator RuntimeError, exit 1
])
def test_a_monitor_the_run_does_not_log_is_refused_at_load(sets, words):
    with pytest.raises(EdgeKDError, match=words):
        recipe_from_dict(_tiny_raw(sets))


@pytest.mark.parametrize("sets, words", [
    # cosine had raised the rate toward it: lr 0.001 -> 0.43 over 4 epochs, val loss 0.69 -> 72
    ({"train": {"scheduler": {"min_lr": 0.5}}}, r"scheduler.min_lr 0.5 is not below the learning rate 0.01"),
    ({"train": {"optimizer": {"name": "adam", "lr": 0.01, "head_lr": 1e-5}, "scheduler": {"min_lr": 1e-4}}},
     r"scheduler.min_lr 0.0001 is not below the learning rate 1e-05"),
    # the export then failed ("class 'a' is output 1 of the model but class 0 of the data")
    ({"data": {"class_names": ["a", "a"]}}, r"data.class_names: 'a' is given twice"),
    ({"data": {"class_names": [" ", "b"]}}, r"data.class_names: a class name is blank"),
    ({"data": {"path": ""}}, r"data.path: is blank"),  # had read the working directory
])
def test_a_min_lr_or_class_names_that_cannot_work_are_refused_for_a_new_run_only(sets, words, tmp_path):
    """New-run traps: a checkpoint trained under them still evaluates and exports (its embedded recipe loads)."""
    raw = _tiny_raw(sets)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(EdgeKDError, match=words):
        load_recipe(tmp_path / "r.yaml")
    recipe_from_dict(raw)  # as embedded in a checkpoint
    plateau = _tiny_raw({"train": {"scheduler": {"name": "plateau", "min_lr": 0.5}}})  # a floor: the rate never drops
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(plateau))
    assert load_recipe(tmp_path / "p.yaml").train.scheduler.min_lr == 0.5


def test_an_export_profile_that_is_not_utf8_text_is_one_line(tmp_path):
    from edgekd.export import load_profile

    (tmp_path / "p.yaml").write_bytes(bytes(range(128, 256)))  # a binary file had ended as UnicodeDecodeError, exit 1
    with pytest.raises(EdgeKDError, match=r"p.yaml: is not UTF-8 text \(an export profile is a YAML file\)"):
        load_profile(tmp_path / "p.yaml")
    (tmp_path / "c.yaml").write_text("card:\n  intended_use: café triage\n", encoding="utf-8")
    assert load_profile(tmp_path / "c.yaml").card.intended_use == "café triage"


def test_an_inferred_continual_head_is_not_written_out():
    """A recipe.yaml of a cross-domain run had `head: multi` written out: run again as class_incremental, it was
    refused ("use head 'single'"), though the recipe itself never chose a head."""
    tasks = [{"name": "a", "classes": [0]}, {"name": "b", "classes": [1]}]
    raw = {"name": "c", "data": {"source": "builtin"}, "train": {"optimizer": {"name": "adamw"}},
           "continual": {"scenario": "cross_domain", "tasks": tasks}}
    recipe = recipe_from_dict(raw)
    assert recipe.continual.head == "multi" and recipe.to_dict()["continual"]["head"] is None
    written = recipe.to_dict()
    written["continual"]["scenario"] = "class_incremental"
    assert recipe_from_dict(written).continual.head == "single"
    assert recipe_from_dict(written).digest() != recipe.digest()
    chosen = recipe_from_dict({**raw, "continual": {**raw["continual"], "head": "multi"}})
    assert chosen.to_dict()["continual"]["head"] == "multi" and chosen.digest() == recipe.digest()


def test_a_continual_tasks_own_data_section_is_checked_for_new_run_traps(tmp_path):
    """A task's data.fold without folds, or hair_kernel without hair removal, ran (the recipe's own data was checked,
    not the task's)."""
    raw = {"name": "cl", "data": {"source": "builtin"}, "train": {"optimizer": {"name": "adamw"}},
           "continual": {"tasks": [{"name": "a", "classes": [0]}, {"name": "b", "classes": [1], "data": {"fold": 1}}]}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(EdgeKDError, match=r"continual.tasks.b.data.fold 1 needs data.folds"):
        load_recipe(tmp_path / "c.yaml")
    raw["continual"]["tasks"][1]["data"] = {"hair_kernel": 5}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(EdgeKDError, match=r"continual.tasks.b.data.hair_kernel 5: hair removal is off"):
        load_recipe(tmp_path / "c.yaml")
    recipe_from_dict(raw)  # as a checkpoint embeds it: still loads
    raw["continual"]["tasks"][1]["data"] = {"limit": 8}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert load_recipe(tmp_path / "c.yaml").continual.tasks[1].data == {"limit": 8}


def test_a_tilde_in_a_path_key_is_the_home_folder(tmp_path, monkeypatch):
    """`data.path: ~/scans` (or `--set data.path=~/x`, which the shell leaves as it is) had been read as a folder
    named `~` in the working directory: "not found"."""
    monkeypatch.setenv("HOME", str(tmp_path))
    demo = REPO / "recipes/demo/student.yaml"
    recipe = load_recipe(demo, ["data.path=~/scans.npz", "distill.teacher=~/t.pt", "distill.ensemble=[~/e.pt, x.pt]",
                                "model.weights=~/w.pth", "tracking.tensorboard=~/tb"])
    assert recipe.data.path == str(tmp_path / "scans.npz") and recipe.distill.teacher == str(tmp_path / "t.pt")
    assert recipe.distill.ensemble == [str(tmp_path / "e.pt"), "x.pt"] and recipe.model.weights == str(tmp_path / "w.pth")
    assert recipe.tracking.tensorboard == str(tmp_path / "tb")
    assert load_recipe(demo, ["data.path=a~b", "tracking.tensorboard=true"]).data.path == "a~b"
    as_paths = recipe_from_dict({"data": {"source": "medmnist", "path": Path("~/x.npz")},  # pathlib in a dict
                                 "model": {"weights": tmp_path / "w.pth"}})  # had been "should be a valid string"
    assert as_paths.data.path == str(tmp_path / "x.npz") and as_paths.model.weights == str(tmp_path / "w.pth")
    assert as_paths.digest() == recipe_from_dict(as_paths.to_dict()).digest()


@pytest.mark.parametrize("sets, words", [
    (["distill.teacher_views=[original, hflip, original]"], r"teacher_views: a view is given twice"),
    (["distill.teacher=t.pt", "distill.ensemble=[e.pt, t.pt]"], r"distill.ensemble: a teacher checkpoint is given twice"),
])
def test_a_teacher_view_or_member_given_twice_is_refused(sets, words, tmp_path):
    """Each had counted twice in the teacher's average without a word; a member given by a link to the teacher
    too."""
    with pytest.raises(EdgeKDError, match=words):
        load_recipe(REPO / "recipes/demo/student.yaml", sets)
    (tmp_path / "t.pt").write_bytes(b"x")
    (tmp_path / "link.pt").symlink_to(tmp_path / "t.pt")
    with pytest.raises(EdgeKDError, match="by path or a link to it"):
        load_recipe(REPO / "recipes/demo/student.yaml", [f"distill.teacher={tmp_path / 't.pt'}",
                                                          f"distill.ensemble=[{tmp_path / 'link.pt'}]"])
    assert len(load_recipe(REPO / "recipes/demo/student.yaml", ["distill.teacher_views=[original, hflip]"])
               .distill.teacher_views) == 2


def test_an_overridden_image_size_takes_the_eval_resize_along():
    """`--set data.image_size=96` on the skin teacher (resize 272 for 256) left resize at 272: validation, test,
    export and the device resized to 272 and cropped the middle 96 px, 35% of what training saw."""
    from edgekd.recipe import warn_sections_turned_on

    skin = REPO / "recipes/skin/teacher.yaml"
    assert load_recipe(skin).data.resize == 272
    assert load_recipe(skin, ["data.image_size=96"]).data.resize == 102  # 96 * 272 / 256
    assert load_recipe(skin, ["data.image_size=96", "data.resize=96"]).data.resize == 96  # chosen: kept
    assert load_recipe(skin, ["data.resize=300"]).data.resize == 300
    assert load_recipe(REPO / "recipes/demo/teacher.yaml", ["data.image_size=56"]).data.resize is None  # no resize
    said = []
    warn_sections_turned_on(skin, ["data.image_size=96"], said.append)
    assert said == ["note: data.resize 272 -> 102, following --set data.image_size (the recipe's 272/256 eval "
                    "resize-to-crop ratio kept; give data.resize to choose another)"]
    said.clear()
    warn_sections_turned_on(skin, ["data.image_size=96", "data.resize=96"], said.append)
    assert said == []


def test_a_dict_recipe_may_name_its_base_file(tmp_path, monkeypatch):
    """run_recipe({"base": "baseline.yaml", ...}) had failed as "unknown key 'base'"; a dict's base is a path from
    the working folder, merged as a YAML file's is."""
    from edgekd.recipe import as_recipe

    monkeypatch.chdir(REPO)
    recipe = as_recipe({"base": "recipes/demo/student.yaml", "train": {"epochs": 3}})
    assert recipe.digest() == load_recipe("recipes/demo/student.yaml", ["train.epochs=3"]).digest()
    assert recipe.distill is not None  # the student's own base chain (baseline.yaml) is followed
    for bad in ("recipes/demo/nope.yaml", 3, ""):
        with pytest.raises(EdgeKDError, match=r"^recipe: base: .*: not a recipe file \(a dict's base: is a path"):
            as_recipe({"base": bad})


def test_overrides_may_be_a_dict_of_dotted_keys():
    """`load_recipe(path, {"train.epochs": 3})` had been a TypeError (unhashable type: 'slice')."""
    demo = REPO / "recipes/demo/baseline.yaml"
    recipe = load_recipe(demo, {"train.epochs": 3, "data.class_names": ["a", "b"], "model.name": "edgekd_cnn_small"})
    assert recipe.train.epochs == 3 and recipe.data.class_names == ["a", "b"]
    assert recipe.digest() == load_recipe(demo, ["train.epochs=3", "data.class_names=[a, b]",
                                                 "model.name=edgekd_cnn_small"]).digest()
