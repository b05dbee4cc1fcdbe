"""data.positive_class: which class of a two-class task the sensitivity, specificity, PR-AUC and pAUC are for, in
training's log, eval, report and export (a sorted `covid/normal` folder puts the class of interest first)."""

import csv
import json

import numpy as np
import pytest
import yaml

from edgekd.errors import EdgeKDError
from edgekd.metrics import classification_metrics
from edgekd.recipe import recipe_from_dict
from edgekd.train.run import evaluate_checkpoint, train_recipe


@pytest.fixture
def runs(tiny_recipe_dict, tmp_path):
    """The same tiny run twice: class 0 named positive, and the default (class 1). One epoch: a model that misses
    some images of one class (sensitivity 0.625, specificity 1.0), so the two classes' figures differ."""
    base = dict(tiny_recipe_dict, train={**tiny_recipe_dict["train"], "epochs": 1})
    first = dict(base, data={**base["data"], "positive_class": "class_0"})
    zero = train_recipe(recipe_from_dict(first), tmp_path / "zero", log=lambda s: None)
    one = train_recipe(recipe_from_dict(base), tmp_path / "one", log=lambda s: None)
    return zero, one


def test_the_named_class_is_the_one_every_two_class_figure_is_of(runs, tmp_path):
    zero, one = runs
    # same seed, same data: the same model, scored from the other class
    assert zero.test["acc"] == one.test["acc"] and zero.test["auc"] == pytest.approx(one.test["auc"])
    assert zero.test["sensitivity"] == one.test["specificity"] != one.test["sensitivity"]
    assert zero.test["specificity"] == one.test["sensitivity"]
    assert (zero.test["positive_class"], one.test["positive_class"]) == ("class_0", "class_1")
    assert zero.test["intervals"]["sensitivity"]["value"] == zero.test["sensitivity"]
    # the epoch log: val_sensitivity of class 0
    rows = list(csv.DictReader((zero.out / "log.csv").open()))
    ref = list(csv.DictReader((one.out / "log.csv").open()))
    assert [r["val_sensitivity"] for r in rows] == [r["val_specificity"] for r in ref]
    # eval of the checkpoint keeps the model's positive class
    ev = evaluate_checkpoint(zero.best_path, tmp_path / "eval", splits=("test",), log=lambda s: None)["test"]
    assert ev["sensitivity"] == zero.test["sensitivity"] and ev["positive_class"] == "class_0"
    # PR-AUC and pAUC are the named class's too, as scikit-learn gives them for it
    y, probs = np.array([0, 0, 1, 1, 0]), np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.45, 0.55], [0.2, 0.8]])
    flipped = classification_metrics(1 - y, probs[:, ::-1], 1)
    for key in ("sensitivity", "specificity", "pr_auc", "pauc", "auc"):
        assert classification_metrics(y, probs, 0)[key] == pytest.approx(flipped[key]), key


def test_export_thresholds_the_recipes_positive_class_unless_the_profile_names_one(runs, tmp_path):
    from edgekd.export import export_checkpoint, load_profile

    zero, _ = runs
    profile = tmp_path / "p.yaml"
    profile.write_text(yaml.safe_dump({"formats": ["onnx"], "precisions": ["fp32"], "parity": {"images": 8}}))
    export_checkpoint(zero.best_path, tmp_path / "b0", profile=load_profile(profile), log=lambda *_: None)
    decision = json.loads((tmp_path / "b0" / "edgekd.json").read_text())["decision"]
    assert (decision["positive_index"], decision["positive_class"]) == (0, "class_0")
    assert decision["test"]["sensitivity"]["value"] == zero.test["sensitivity"]
    profile.write_text(yaml.safe_dump({"formats": ["onnx"], "precisions": ["fp32"], "parity": {"images": 8},
                                       "decision": {"positive": 1}}))
    export_checkpoint(zero.best_path, tmp_path / "b1", profile=load_profile(profile), log=lambda *_: None)
    assert json.loads((tmp_path / "b1" / "edgekd.json").read_text())["decision"]["positive_index"] == 1


def test_report_refuses_a_table_of_two_positive_classes_and_states_the_one(runs, tmp_path):
    from edgekd.distill.report import comparison_report

    zero, one = runs
    with pytest.raises(EdgeKDError, match=r"different positive classes \(class_0 in .*class_1 in .*--set "
                                          r"data.positive_class"):
        comparison_report([zero.out, one.out], tmp_path / "rep", log=lambda *_: None)
    assert not (tmp_path / "rep").exists()
    out = comparison_report([zero.out, one.out], tmp_path / "rep", overrides=["data.positive_class=class_0"],
                            log=lambda *_: None)
    assert [r["sensitivity"] for r in out["rows"]] == [zero.test["sensitivity"]] * 2
    assert "positive class's: `class_0`" in out["markdown"]
    # a multi-class set in the same report: the --set is the two-class runs' (it had refused the 3-class run)
    from conftest import write_npz

    raw = dict(recipe_from_dict({"name": "three", "data": {"source": "medmnist", "image_size": 16, "batch_size": 8,
                                                          "path": str(write_npz(tmp_path / "three.npz", classes=3))},
                                 "model": {"name": "edgekd_cnn_tiny"}, "train": {"epochs": 1}}).to_dict())
    three = train_recipe(recipe_from_dict(raw), tmp_path / "three", log=lambda s: None)
    out = comparison_report([zero.out, one.out, three.out], tmp_path / "rep3",
                            overrides=["data.positive_class=class_0"], log=lambda *_: None)
    assert {r["dataset"]: r["positive_class"] for r in out["rows"]} == {"tiny": "class_0", "three": None}


@pytest.mark.parametrize("value, error", [
    ("covid", r"data.positive_class 'covid' is not a class index or one of class_0, class_1"),
    (2, r"data.positive_class 2 is not a class index"),
])
def test_a_positive_class_the_data_lacks_is_one_line_before_training(tiny_recipe_dict, tmp_path, value, error):
    from edgekd.data import build_data

    raw = dict(tiny_recipe_dict, data={**tiny_recipe_dict["data"], "positive_class": value})
    with pytest.raises(EdgeKDError, match=error):
        build_data(recipe_from_dict(raw))


def test_positive_class_is_refused_for_multi_class_data_booleans_and_continual(tmp_path, tiny_recipe_dict):
    from conftest import write_npz

    from edgekd.data import build_data

    three = write_npz(tmp_path / "three.npz", classes=3)
    raw = dict(tiny_recipe_dict, data={**tiny_recipe_dict["data"], "path": str(three), "positive_class": 0})
    with pytest.raises(EdgeKDError, match=r"data.positive_class is for a two-class task; this data has 3 classes"):
        build_data(recipe_from_dict(raw))
    with pytest.raises(EdgeKDError, match="positive_class"):
        recipe_from_dict(dict(tiny_recipe_dict, data={**tiny_recipe_dict["data"], "positive_class": True}))
    continual = dict(tiny_recipe_dict, continual={"tasks": [{"name": "a", "data": {"positive_class": 0}},
                                                            {"name": "b"}]})
    with pytest.raises(EdgeKDError, match="data.positive_class is for a single-task run"):
        recipe_from_dict(continual)


def test_an_unset_positive_class_leaves_the_digest_as_before(tiny_recipe_dict):
    """Runs trained before the key resume and are reused: the digest leaves the unset key out."""
    before = recipe_from_dict(tiny_recipe_dict).digest()
    assert recipe_from_dict(dict(tiny_recipe_dict, data={**tiny_recipe_dict["data"], "positive_class": None})
                            ).digest() == before
    assert recipe_from_dict(dict(tiny_recipe_dict, data={**tiny_recipe_dict["data"], "positive_class": 0})
                            ).digest() != before


def test_a_numeric_class_name_given_as_a_number_is_read_as_the_name_or_refused_as_ambiguous():
    """Folders named 1 and 2: YAML and --set read `data.positive_class: 2` as the number 2."""
    from edgekd.metrics import positive_class_index

    assert positive_class_index(2, ["1", "2"]) == 1 and positive_class_index("1", ["1", "2"]) == 0
    assert positive_class_index(1, ["0", "1"]) == 1 and positive_class_index(None, ["a", "b"]) == 1
    with pytest.raises(EdgeKDError, match=r"positive_class 1: ambiguous, label id 1 is class '2' and 1 is also the "
                                          r"name of label id 0"):
        positive_class_index(1, ["1", "2"])
