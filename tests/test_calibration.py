"""Calibration, operating points and uncertainty (edgekd.metrics.calibration / .uncertainty)."""

import csv
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from edgekd.metrics.calibration import brier, calibration_report, ece, fit_temperature, nll
from edgekd.metrics.uncertainty import (bootstrap_intervals, choose_threshold, decide, delong_test,
                                        paired_bootstrap_auc, stratified_resamples)
from edgekd.probability import softmax

# 4 images, 2 classes. Top-class confidences 0.9, 0.6, 0.7, 0.95; correct: yes, no, yes, yes.
PROBS = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.05, 0.95]])
LABELS = np.array([0, 0, 1, 1])


def test_ece_by_hand():
    # 15 equal-width bins: 0.6 -> bin (0.5333, 0.6], 0.7 -> (0.6667, 0.7333], 0.9 -> (0.8667, 0.9], 0.95 -> (0.9333, 0.9667]
    # each bin one image: ECE = 1/4 (|0 - 0.6| + |1 - 0.7| + |1 - 0.9| + |1 - 0.95|) = 1/4 * 1.05
    assert ece(PROBS, LABELS) == pytest.approx(1.05 / 4)
    # 2 equal-mass bins: {0.6, 0.7} acc 0.5 conf 0.65; {0.9, 0.95} acc 1 conf 0.925 -> 0.5*0.15 + 0.5*0.075
    assert ece(PROBS, LABELS, bins=2, adaptive=True) == pytest.approx(0.5 * 0.15 + 0.5 * 0.075)
    # 1 bin: |accuracy 0.75 - mean confidence 0.7875|
    assert ece(PROBS, LABELS, bins=1) == pytest.approx(0.0375)


def test_brier_and_nll_by_hand():
    # sum over classes of (p - onehot)^2 per image: 0.02, 0.72, 0.18, 0.005 -> mean 0.23125
    assert brier(PROBS, LABELS) == pytest.approx((0.02 + 0.72 + 0.18 + 0.005) / 4)
    from sklearn.metrics import brier_score_loss  # two classes: twice scikit-learn's, as the card's header says

    assert brier(PROBS, LABELS) == pytest.approx(2 * brier_score_loss(LABELS, PROBS[:, 1]))
    assert nll(PROBS, LABELS) == pytest.approx(-np.mean(np.log([0.9, 0.4, 0.7, 0.95])))


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_temperature_scaling_recovers_a_known_temperature(true_t):
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, size=(4000, 3))
    labels = np.array([rng.choice(3, p=p) for p in softmax(z)])  # calibrated at z; the model reports z * T
    assert fit_temperature(z * true_t, labels) == pytest.approx(true_t, rel=0.05)


def test_temperature_scaling_lowers_ece_and_keeps_argmax():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2, size=(3000, 2))
    labels = np.array([rng.choice(2, p=p) for p in softmax(z)])
    over = z * 3.0  # overconfident
    report = calibration_report(over[:1500], labels[:1500], over[1500:], labels[1500:])
    assert report["temperature"] == pytest.approx(3.0, rel=0.1)
    assert report["test"]["after"]["ece"] < report["test"]["before"]["ece"] / 2
    assert report["test"]["after"]["nll"] < report["test"]["before"]["nll"]
    assert (softmax(over / report["temperature"]).argmax(1) == softmax(over).argmax(1)).all()


def test_a_temperature_driven_to_its_bound_is_warned_of():
    """A val split separated without a mistake drove T toward its 0.05 bound (0.084 in a re-trial) and every calibrated probability to 1.0000,
    without a word; a model fit as usual gets no warning."""
    z = np.array([[2.0, -2.0], [-1.5, 1.0], [3.0, 0.0], [0.0, 2.5]] * 5)
    y = z.argmax(1)
    report = calibration_report(z, y)
    assert report["temperature"] == 1.0  # not the degenerate fit's ~0.05: probabilities at 0 and 1 had shipped
    assert report["warning"].startswith("every val image is right, so the NLL keeps falling as T shrinks (it stopped "
                                        "near its 0.05 bound") and "T kept at 1, no calibration" in report["warning"]
    assert report["val"]["after"] == report["val"]["before"]
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2, size=(400, 2))
    assert "warning" not in calibration_report(z, np.array([rng.choice(2, p=p) for p in softmax(z)]))
    # scores unrelated to the labels: T runs to its upper bound (a re-trial's barely trained model, T = 20.0000)
    report = calibration_report(z, rng.integers(0, 2, 400))
    assert report["temperature"] > 19 and report["warning"].startswith("T stopped near its 20 bound (20): the fit wanted softer")
    right = np.array([[2.0, -2.0], [-1.5, 1.0], [3.0, 0.0], [0.0, 2.5]] * 5)  # 20 images, all right: both said
    few = calibration_report(right, right.argmax(1))  # (the bound's warning had replaced the small fit's)
    assert few["warning"].startswith("every val image is right") and "; the temperature calibration was fitted on " \
        "20 val images (fewer than 50)" in few["warning"]


def test_a_calibration_fitted_on_few_images_or_worse_on_test_is_warned_of():
    """10 val images (2 of one class) gave T 0.33: test NLL 0.442 -> 0.468, and the card said nothing."""
    rng = np.random.default_rng(3)
    z = rng.normal(0, 2, size=(2000, 2))
    y = np.array([rng.choice(2, p=p) for p in softmax(z)])  # calibrated at T = 1
    good = calibration_report(z[:1000], y[:1000], z[1000:], y[1000:])
    assert "warning" not in good  # many images, test NLL no worse
    few = calibration_report(z[:12], y[:12], z[1000:], y[1000:])
    assert few["fit_images"] == 12 and few["warning"].startswith("the temperature calibration was fitted on 12 val "
                                                                 "images (fewer than 50)")
    worse = few["test"]["after"]["nll"] > 1.01 * few["test"]["before"]["nll"]
    assert ("makes the test split's NLL worse" in few["warning"]) == worse
    flipped = calibration_report(z[:1000] * 0.3, y[:1000], z[1000:] * 3, y[1000:])  # fit wants sharper; test is over
    assert flipped["test"]["after"]["nll"] > flipped["test"]["before"]["nll"]
    assert flipped["warning"].startswith("the temperature calibration makes the test split's NLL worse (")
    assert "makes the test split's ECE worse (" in flipped["warning"]  # the fit minimizes NLL: ECE said apart


def test_choose_threshold_rules_by_hand():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    # Each threshold is placed halfway between the probability that decides and the next lower one (the labels
    # it chose on, with a margin for an exported model's few-ulp differences).
    # sensitivity >= 0.75: the highest threshold keeping 3 of 4 positives is at 0.7 (next lower 0.6); >= 1.0 at 0.4
    assert choose_threshold(y, p, "sensitivity", 0.75) == pytest.approx(0.65)
    assert choose_threshold(y, p, "sensitivity", 1.0) == pytest.approx(0.35)
    # specificity >= 1.0: the lowest threshold above every negative is at 0.7
    assert choose_threshold(y, p, "specificity", 1.0) == pytest.approx(0.65)
    # Youden: at 0.7, 0.75 + 1 - 1 = 0.75; at 0.4, 1 + 0.75 - 1 = 0.75 (first max: the higher threshold)
    assert choose_threshold(y, p, "youden") == pytest.approx(0.65)
    assert choose_threshold(y, p[::-1].copy(), "sensitivity", 0.5) == pytest.approx(0.25)  # at 0.3, next lower 0.2
    exported = np.nextafter(p, 0)  # an artifact's probabilities one ulp lower: the same labels, target kept
    for target in (0.75, 1.0):
        t = choose_threshold(y, p, "sensitivity", target)
        assert (decide(np.c_[1 - exported, exported], t) == decide(np.c_[1 - p, p], t)).all()
    low = np.array([0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.02])
    assert choose_threshold(y, low, "sensitivity", 1.0) == pytest.approx(0.01)  # below the lowest: halfway to 0
    assert choose_threshold(y, p, "argmax") is None
    assert (decide(np.stack([1 - p, p], 1), 0.7) == (p >= 0.7)).all()
    with pytest.raises(ValueError, match="target"):
        choose_threshold(y, p, "sensitivity", None)


def test_the_nothing_positive_threshold_is_never_given_as_1_when_a_probability_is_1():
    """roc_curve's +inf point (nothing positive) had been given as 1.0, which calls the images at exactly 1.0
    positive: a specificity-1.0 rule with a negative at 1.0 chose 1.0 and gave specificity 0.5 on its own images.
    That target is out of reach in [0, 1]: the most specific threshold is chosen (the export warns); where no
    probability is 1.0, 1.0 still means nothing positive."""
    y = np.array([0, 0, 1, 1])
    at_one = np.array([1.0, 0.2, 0.9, 0.8])
    assert choose_threshold(y, at_one, "specificity", 1.0) == 1.0  # the most specific there is: 1 of 2 negatives
    assert choose_threshold(y, at_one, "specificity", 0.5) == pytest.approx(0.5)  # reachable: at 0.8, to 0.2
    below = np.array([0.95, 0.2, 0.9, 0.8])
    t = choose_threshold(y, below, "specificity", 1.0)
    assert t == 1.0 and (decide(np.c_[1 - below, below], t)[y == 0] == 0).all()
    assert choose_threshold(y, at_one, "sensitivity", 1.0) == pytest.approx(0.5)


def test_stratified_resamples_keep_the_class_mix_and_are_seeded():
    y = np.array([0] * 7 + [1] * 3)
    a, b = stratified_resamples(y, 50, seed=3), stratified_resamples(y, 50, seed=3)
    assert (a == b).all() and a.shape == (50, 10)
    assert ((y[a] == 1).sum(axis=1) == 3).all()
    assert not (stratified_resamples(y, 50, seed=4) == a).all()


def test_bootstrap_intervals_are_deterministic_and_bracket_the_value():
    rng = np.random.default_rng(2)
    y = (rng.random(300) < 0.4).astype(int)
    s = rng.normal(y * 1.2, 1.0)
    probs = np.stack([1 - norm.cdf(s), norm.cdf(s)], 1)
    one = bootstrap_intervals(y, probs, threshold=0.5, seed=7)
    assert one == bootstrap_intervals(y, probs, threshold=0.5, seed=7)
    assert one["auc"]["value"] == pytest.approx(roc_auc_score(y, probs[:, 1]))
    for m, ci in one.items():
        assert ci["low"] <= ci["value"] <= ci["high"], m
        assert ci["high"] - ci["low"] > 0, m


def test_a_two_class_proportions_interval_keeps_a_width_at_zero_and_one():
    """A model calling everything positive printed "sensitivity 1.000 [1.000, 1.000]" and "specificity 0.000
    [0.000, 0.000]": the stratified bootstrap cannot move a proportion of 0 or 1. Wilson's can, and agrees with
    SciPy's and the textbook formula elsewhere."""
    y = np.r_[np.ones(20, int), np.zeros(30, int)]
    probs = np.tile([0.2, 0.8], (50, 1))  # every image called positive
    ci = bootstrap_intervals(y, probs, threshold=0.5)
    assert ci["sensitivity"]["value"] == 1.0 and 0.80 < ci["sensitivity"]["low"] < 1.0 == ci["sensitivity"]["high"]
    assert ci["specificity"]["value"] == 0.0 and ci["specificity"]["low"] == 0.0 < ci["specificity"]["high"] < 0.15
    z, p, n = norm.ppf(0.975), 0.4, 50  # acc 20/50 by the formula
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert (ci["acc"]["low"], ci["acc"]["high"]) == pytest.approx((centre - half, centre + half))


def test_bootstrap_auc_interval_covers_the_true_value_at_about_the_nominal_rate():
    # Binormal scores: positives N(d, 1), negatives N(0, 1) -> true AUC = Phi(d / sqrt(2)).
    d, n_pos, n_neg, trials = 1.5, 60, 90, 120
    true_auc = norm.cdf(d / np.sqrt(2))
    rng = np.random.default_rng(11)
    hits = 0
    for t in range(trials):
        y = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
        s = np.r_[rng.normal(d, 1, n_pos), rng.normal(0, 1, n_neg)]
        ci = bootstrap_intervals(y, np.stack([1 - norm.cdf(s), norm.cdf(s)], 1), seed=t)["auc"]
        hits += ci["low"] <= true_auc <= ci["high"]
    assert 0.88 <= hits / trials <= 0.99  # nominal 0.95; percentile intervals run slightly narrow


def _asah():
    rows = list(csv.DictReader((Path(__file__).parent / "data" / "asah.csv").open()))
    y = np.array([r["outcome"] == "Poor" for r in rows], dtype=int)
    return y, {k: np.array([float(r[k]) for r in rows]) for k in ("wfns", "s100b", "ndka")}


def test_delong_matches_proc_on_the_asah_data():
    """pROC's published figures (its tests: roc.test(r.wfns, r.s100b), cov(...)) on its aSAH data set."""
    y, m = _asah()
    t = delong_test(y, m["wfns"], m["s100b"])
    assert t["auc_a"] == pytest.approx(0.8236789, abs=1e-7) and t["auc_b"] == pytest.approx(0.7313686, abs=1e-7)
    assert t["z"] == pytest.approx(2.20898359144091, rel=1e-10)
    assert t["p_value"] == pytest.approx(0.0271757822291882, rel=1e-10)
    assert t["covariance"][0][1] == pytest.approx(0.00119615567376754, rel=1e-10)
    assert delong_test(y, m["wfns"], m["ndka"])["covariance"][0][1] == pytest.approx(-0.000532967856762438, rel=1e-10)
    assert delong_test(y, m["ndka"], m["s100b"])["covariance"][0][1] == pytest.approx(-0.000756164938056579, rel=1e-10)
    same = delong_test(y, m["wfns"], m["wfns"])
    assert same["diff"] == 0 and same["p_value"] == 1.0


def test_delong_with_one_image_of_a_class_gives_no_test_and_no_numpy_warning():
    """A test split with one malignant image: numpy printed 'Degrees of freedom <= 0' and divide warnings during
    `edgekd export`, and z came out 0."""
    import warnings

    y = np.array([1, 0, 0, 0, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = delong_test(y, np.array([0.9, 0.1, 0.95, 0.3, 0.2]), np.array([0.8, 0.1, 0.2, 0.3, 0.4]))
    assert t["auc_a"] == pytest.approx(0.75) and t["auc_b"] == pytest.approx(1.0) and t["diff"] == pytest.approx(-0.25)
    assert t["z"] is None and t["p_value"] is None and t["note"].startswith("no DeLong test: 1 positive and 4 negative")


def test_paired_bootstrap_auc_difference():
    y, m = _asah()
    r = paired_bootstrap_auc(y, m["wfns"], m["s100b"], seed=0)
    assert r["diff"] == pytest.approx(0.8236789 - 0.7313686, abs=1e-6)
    assert r["low"] < r["diff"] < r["high"] and 0 < r["p_value"] < 0.2
    assert paired_bootstrap_auc(y, m["wfns"], m["wfns"])["p_value"] == 1.0


# ---------------------------------------------------------------- the bundle's operating point, end to end
@pytest.fixture(scope="module")
def calibrated_bundle(tmp_path_factory):
    """A tiny binary checkpoint exported with a 95%-sensitivity operating point (ONNX + OpenVINO FP32)."""
    import yaml
    from conftest import write_npz

    from edgekd.export import export_checkpoint, load_profile
    from edgekd.recipe import recipe_from_dict
    from edgekd.train.run import train_recipe

    root = tmp_path_factory.mktemp("calibrated")
    tiny = {"name": "tiny", "seed": 0,
            "data": {"source": "medmnist", "path": str(write_npz(root / "tiny.npz")), "image_size": 16,
                     "channels": 3, "batch_size": 8},
            "model": {"name": "edgekd_cnn_tiny"},
            # one epoch: a model that errs on val (2 epochs separated it, and a perfect val split is not calibrated)
            "train": {"epochs": 1, "optimizer": {"name": "adam", "lr": 0.01}, "scheduler": {"name": "none"},
                      "monitor": "val_loss", "monitor_mode": "min"}}
    ckpt = train_recipe(recipe_from_dict(tiny), root / "run", log=lambda *_: None).best_path
    profile_path = root / "profile.yaml"
    profile_path.write_text(yaml.safe_dump({"precisions": ["fp32"], "parity": {"images": 8},
                                            "decision": {"rule": "sensitivity", "target": 0.95}}))
    out = root / "bundle"
    export_checkpoint(ckpt, out, profile=load_profile(profile_path), log=lambda *_: None)
    return out, tiny


def _images(tiny, n=12):
    data = np.load(tiny["data"]["path"])
    return [a for a in data["test_images"][:n]]


def test_export_records_temperature_threshold_and_card(calibrated_bundle):
    import json

    out, _ = calibrated_bundle
    meta = json.loads((out / "edgekd.json").read_text())
    t, d = meta["calibration"]["temperature"], meta["decision"]
    assert 0 < t != 1.0 and d["rule"] == "sensitivity" and 0 <= d["threshold"] <= 1
    # the threshold was chosen on validation for sensitivity >= 0.95
    assert d["val"]["sensitivity"]["value"] >= 0.95
    for m in ("sensitivity", "specificity", "auc", "ece"):
        ci = d["test"][m]
        assert ci["low"] <= ci["value"] <= ci["high"]
    parity = json.loads((out / "parity.json").read_text())
    for rec in parity["artifacts"]:  # every artifact under the same temperature and threshold
        op = rec["operating_point"]["test"]
        assert op["calibrated_prob_mean_abs_diff"] < 1e-5 and "figures" in op
    card = (out / "card.md").read_text()
    assert "## Operating point" in card and "## Calibration" in card and "not a medical device" in card
    assert f"{d['threshold']:.4f}" in card and (out / "calibration.png").stat().st_size > 1000
    # TTA moves the probabilities the threshold applies to: the card says its figures are single-view ones
    single = "Calibration, threshold and figures are of single-view predictions (the original image)"
    assert (single in card) == (len(meta["tta"]["views"]) > 1)
    assert "Wilson score for acc, sensitivity and specificity" in card.split("## Operating point", 1)[1]
    trained = meta["training_data"]  # how it was trained, for a reviewer (the card had given the class mix alone)
    assert trained["epochs"] >= 1 and trained["recipe_digest"] == meta["model"]["recipe_digest"]
    assert f"Recipe `{trained['recipe']}` (digest {trained['recipe_digest'][:12]}), {trained['epochs']} epochs" in card
    assert "teacher" not in trained and "distilled from" not in card
    from edgekd.export.clinical import provenance_text

    said = provenance_text({**trained, "data_limit": 600, "teacher": {"model": "resnet18", "sha256": "ab" * 32,
                                                                       "ensemble_sha256": []}})
    assert said.endswith("a seeded subset of at most 600 images per split (data.limit); distilled from a resnet18 "
                         "teacher (sha256 abababababab).")


def test_a_multi_class_cards_operating_point_names_no_threshold_and_says_its_macro_means():
    """A 5-grade card had said "scored under the same calibration and threshold" and "the label thresholds the
    mean" with no threshold, and shown a calibrated AUC beside the per-format table's raw one unexplained."""
    from edgekd.export.clinical import card_section

    ci = {"value": 0.5, "low": 0.4, "high": 0.6}
    metadata = {"decision": {"rule": "argmax", "threshold": None, "test": {m: ci for m in ("acc", "auc")}},
                "calibration": {"method": "temperature", "temperature": 0.7, "fit_images": 100, "bins": 15, **{
                    split: {when: {"ece": 0.1, "adaptive_ece": 0.1, "brier": 0.5, "nll": 1.0}
                            for when in ("before", "after")} for split in ("val", "test")}},
                "tta": {"views": ["original", "hflip"]}}
    parity = {"reference": {"split_images": {"test": 10}}, "artifacts": []}
    text = "\n".join(card_section(metadata, parity))
    operating = text.split("## Operating point", 1)[1].split("\n## ", 1)[0]
    assert "under the same calibration (the top class: no threshold)." in operating and "Wilson" not in operating
    assert "Its AUC is of the calibrated probabilities" in operating
    assert "Sensitivity and specificity are macro means over the classes." in operating
    assert "the label is the top class of the mean of the views' probabilities" in operating


def test_runner_applies_the_bundle_temperature_and_threshold_on_both_backends(calibrated_bundle):
    import json

    from edgekd.probability import apply_temperature
    from edgekd.runtime import Runner

    out, tiny = calibrated_bundle
    meta = json.loads((out / "edgekd.json").read_text())
    t, threshold = meta["calibration"]["temperature"], meta["decision"]["threshold"]
    images = _images(tiny)
    got = {}
    for backend in ("onnx", "openvino"):
        preds = Runner.from_bundle(out, backend=backend).predict_batch(images)
        probs = np.stack([p.probs for p in preds])
        raw = np.stack([p.raw_probs for p in preds])
        np.testing.assert_allclose(probs, apply_temperature(raw, t), atol=1e-12)
        assert [p.index for p in preds] == list(decide(probs, threshold))
        got[backend] = (probs, [p.label for p in preds])
    assert np.abs(got["onnx"][0] - got["openvino"][0]).max() <= 1e-5 and got["onnx"][1] == got["openvino"][1]
    # a per-call threshold overrides the bundle's
    strict = Runner.from_bundle(out, backend="onnx", threshold=1.0).predict_batch(images)
    assert [p.index for p in strict] == list(decide(got["onnx"][0], 1.0))


def test_a_bundle_without_calibration_predicts_raw_softmax_argmax(calibrated_bundle, tmp_path):
    """Bundles exported before calibration existed: no temperature, argmax labels, probabilities as before."""
    import json
    import shutil

    from edgekd.export.bundle import write_manifest
    from edgekd.runtime import Runner

    out, tiny = calibrated_bundle
    old = tmp_path / "old"
    shutil.copytree(out, old)
    meta = json.loads((old / "edgekd.json").read_text())
    gone = ("calibration", "decision", "card", "training_data", "reliability")
    for key in gone:
        meta.pop(key)
    (old / "edgekd.json").write_text(json.dumps(meta))
    import onnx  # such a bundle's model files never held them either (the runner compares the two)

    for model_path in (old / "onnx").glob("*.onnx"):
        model = onnx.load(str(model_path))
        kept = [(p.key, p.value) for p in model.metadata_props if p.key not in gone]
        del model.metadata_props[:]
        for key, value in kept:
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(model, str(model_path))
    (old / "manifest.sha256").unlink()
    write_manifest(old)
    images = _images(tiny)
    new = Runner.from_bundle(out, backend="onnx").predict_batch(images)
    plain = Runner.from_bundle(old, backend="onnx").predict_batch(images)
    for p, q in zip(plain, new):
        assert p.raw_probs is None and p.index == int(p.probs.argmax())
        np.testing.assert_allclose(p.probs, q.raw_probs, atol=1e-12)


def test_predict_cli_shows_calibrated_and_uncalibrated_and_takes_a_threshold(calibrated_bundle, tmp_path):
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from edgekd.cli import app

    out, tiny = calibrated_bundle
    paths = []
    for i, a in enumerate(_images(tiny, 4)):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(a).save(paths[-1])
    res = CliRunner().invoke(app, ["predict", str(out), *map(str, paths), "--backend", "onnx", "--threshold", "0",
                                   "--out", str(tmp_path / "p.json")])
    assert res.exit_code == 0, res.output
    assert "calibrated (T=" in res.output and "uncal." in res.output
    doc = json.loads((tmp_path / "p.json").read_text())
    meta = json.loads((out / "edgekd.json").read_text())
    positive = meta["decision"]["positive_class"]
    assert doc["threshold"] == 0 and all(p["label"] == positive for p in doc["predictions"])  # p >= 0 always
    assert doc["positive_class"] == positive  # the class the threshold is on, beside it
    assert all(set(p["uncalibrated"]) == set(p["probs"]) for p in doc["predictions"])
    res = CliRunner().invoke(app, ["predict", str(out), str(paths[0]), "--threshold", "1.5"])
    assert res.exit_code != 0
    for bad, said in (("nan", "nan: not a number"), ("-0.1", "-0.1 is outside [0, 1]")):  # nan: "<= 1" had been said
        res = CliRunner().invoke(app, ["predict", str(out), str(paths[0]), "--threshold", bad])
        assert res.exit_code == 2 and said in res.output, res.output


def test_platt_scaling_recovers_a_known_slope_and_bias():
    from edgekd.metrics.calibration import fit_platt
    from edgekd.probability import calibrated_softmax

    rng = np.random.default_rng(5)
    z = rng.normal(0, 2, size=(4000, 2))
    d = z[:, 1] - z[:, 0]
    labels = (rng.random(4000) < 1 / (1 + np.exp(-(0.5 * d - 1.0)))).astype(int)  # true a = 0.5, b = -1
    t, bias = fit_platt(z, labels)
    assert 1 / t == pytest.approx(0.5, rel=0.1) and bias[1] == pytest.approx(-1.0, abs=0.15)
    p = calibrated_softmax(z, t, bias)
    np.testing.assert_allclose(p[:, 1], 1 / (1 + np.exp(-(d / t + bias[1]))), rtol=1e-9)
    with pytest.raises(ValueError, match="two-class"):
        fit_platt(np.zeros((4, 3)), np.array([0, 1, 2, 0]))


def test_runtime_applies_platt_from_probabilities():
    from edgekd.probability import apply_temperature, calibrated_softmax

    z = np.random.default_rng(6).normal(0, 3, size=(50, 2))
    np.testing.assert_allclose(apply_temperature(softmax(z), 2.0, [0.0, -0.7]), calibrated_softmax(z, 2.0, [0.0, -0.7]),
                               atol=1e-12)


def test_a_platt_bundle_runs_the_same_calibration_as_export(calibrated_bundle, tmp_path):
    import json

    import yaml

    from edgekd.export import export_checkpoint, load_profile
    from edgekd.probability import apply_temperature
    from edgekd.runtime import Runner

    out, tiny = calibrated_bundle
    ckpt = out.parent / "run" / "best.pt"
    profile = tmp_path / "p.yaml"
    profile.write_text(yaml.safe_dump({"formats": ["onnx"], "precisions": ["fp32"], "parity": {"images": 8},
                                       "calibration": {"method": "platt"}}))
    export_checkpoint(ckpt, tmp_path / "b", profile=load_profile(profile), log=lambda *_: None)
    cal = json.loads((tmp_path / "b" / "edgekd.json").read_text())["calibration"]
    assert cal["method"] == "platt" and len(cal["bias"]) == 2 and cal["bias"][0] == 0.0
    preds = Runner.from_bundle(tmp_path / "b", backend="onnx").predict_batch(_images(tiny))
    for p in preds:
        np.testing.assert_allclose(p.probs, apply_temperature(p.raw_probs, cal["temperature"], cal["bias"]), atol=1e-12)
    parity = json.loads((tmp_path / "b" / "parity.json").read_text())
    assert parity["artifacts"][0]["operating_point"]["test"]["calibrated_prob_mean_abs_diff"] < 1e-5
    # The corruption eval's and failure analysis' rows are the model's argmax, a checkpoint's and a bundle's alike:
    # the Platt bias moves the calibrated probabilities' argmax (a hidden threshold), so they score the raw softmax.
    from edgekd.robustness.evaluate import bundle_predictors

    (predictor,) = bundle_predictors(tmp_path / "b")
    np.testing.assert_allclose(predictor.predict(list(_images(tiny))), np.stack([p.raw_probs for p in preds]),
                               atol=1e-7)


def test_a_threshold_on_the_class_at_index_0_labels_by_that_class(calibrated_bundle, tmp_path):
    """An abnormal/normal folder layout sorts the positive class first: the threshold must apply to p[0]."""
    import io
    import json

    import httpx
    import yaml
    from PIL import Image

    from edgekd.export import export_checkpoint, load_profile
    from edgekd.runtime import Runner
    from edgekd.serve import create_app

    out, tiny = calibrated_bundle
    profile = tmp_path / "p.yaml"
    profile.write_text(yaml.safe_dump({"precisions": ["fp32"], "parity": {"images": 8},
                                       "decision": {"positive": 0, "rule": "sensitivity", "target": 0.95}}))
    bundle = tmp_path / "b"
    export_checkpoint(out.parent / "run" / "best.pt", bundle, profile=load_profile(profile), log=lambda *_: None)
    meta = json.loads((bundle / "edgekd.json").read_text())
    d = meta["decision"]
    assert d["positive_index"] == 0 and d["positive_class"] == meta["class_names"][0]
    images = _images(tiny, 24)
    first = Runner.from_bundle(bundle, backend="onnx").predict_batch(images)
    # At t = min(p0, p1) of an image, "class 0 when p0 >= t" says 0 and "class 1 when p1 >= t" says 1: these
    # thresholds tell a runner that thresholds the positive class from one that thresholds index 1.
    # (1e-6 below: OpenVINO's float32 graph and ONNX Runtime's probabilities differ in the last digits)
    thresholds = [None] + [float(min(p.probs)) - 1e-6 for p in first[:3]]
    for backend in ("onnx", "openvino"):
        for i, t in enumerate(thresholds):
            preds = Runner.from_bundle(bundle, backend=backend, threshold=t).predict_batch(images)
            t = d["threshold"] if t is None else t
            assert [p.index for p in preds] == [0 if p.probs[0] >= t else 1 for p in preds], (backend, t)
            if i:
                assert preds[i - 1].index == 0
    # the service labels by the same rule
    runner = Runner.from_bundle(bundle, backend="onnx", threads=1)
    app = create_app(runner)
    buf = io.BytesIO()
    Image.fromarray(images[0]).save(buf, format="PNG")

    async def ask():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=30) as client:
            try:
                return (await client.post("/predict", files={"file": ("a.png", buf.getvalue(), "image/png")})).json()
            finally:
                await app.state.service.close()

    import asyncio

    got = asyncio.run(ask())
    p0 = got["probs"][meta["class_names"][0]]
    assert got["index"] == (0 if p0 >= d["threshold"] else 1) == first[0].index


def test_a_threshold_rule_on_a_multi_class_model_is_refused():
    # It was dropped for argmax without a word: edgekd.json said argmax, the profile said sensitivity 0.95.
    from edgekd.errors import EdgeKDError
    from edgekd.export.clinical import operating_point
    from edgekd.export.profile import DecisionConfig, load_profile

    rng = np.random.default_rng(0)
    y = np.arange(30) % 3
    reference = {"splits": {s: {"logits": rng.normal(size=(30, 3))} for s in ("val", "test")}}
    splits = {s: (None, y) for s in ("val", "test")}
    profile = load_profile(None)
    names = ["a", "b", "c"]
    assert operating_point(reference, splits, profile, names)["decision"]["rule"] == "argmax"
    strict = profile.model_copy(update={"decision": DecisionConfig(rule="sensitivity", target=0.95)})
    with pytest.raises(EdgeKDError, match=r"decision.rule sensitivity needs a two-class model \(3 classes"):
        operating_point(reference, splits, strict, names)
    named = profile.model_copy(update={"decision": DecisionConfig(positive=2)})  # had been dropped without a word
    with pytest.raises(EdgeKDError, match=r"decision.positive is for a two-class model \(3 classes"):
        operating_point(reference, splits, named, names)


def test_a_target_without_a_target_rule_and_a_boolean_positive_are_refused():
    """`rule: youden, target: 0.9` had printed "youden >= 0.9" on the card; `positive: false` had meant class 0."""
    from pydantic import ValidationError

    from edgekd.export.profile import DecisionConfig

    for rule in ("youden", "argmax"):
        with pytest.raises(ValidationError, match=f"decision.target is for the sensitivity and specificity rules; "
                                                  f"rule '{rule}' has none"):
            DecisionConfig(rule=rule, target=0.9)
    with pytest.raises(ValidationError, match="not true/false"):
        DecisionConfig(rule="youden", positive=False)
    assert DecisionConfig(rule="youden", positive=0).positive == 0


def test_a_misspelled_method_or_a_one_class_split_is_refused():
    """calibration_report(method="plat") fitted a temperature and recorded "plat"; a threshold rule on validation
    images of one class returned 1.0 with only a scikit-learn warning."""
    logits = np.array([[0.0, 1.0], [1.0, 0.0], [0.5, 0.2]])
    with pytest.raises(ValueError, match="unknown calibration method 'plat'"):
        calibration_report(logits, np.array([1, 0, 0]), method="plat")
    with pytest.raises(ValueError, match="needs validation images of both classes"):
        choose_threshold(np.ones(10), np.linspace(0, 1, 10), "youden")


def test_the_ece_interval_is_shifted_by_the_bootstraps_bias_and_holds_its_figure():
    """A well-calibrated model's ECE 0.0205 came with a 95% interval of [0.0247, 0.0701]: resampling with
    replacement inflates ECE, so the plain percentile interval can lie wholly above the figure."""
    from edgekd.metrics.uncertainty import metric_rows

    rng = np.random.default_rng(0)
    p = rng.uniform(0.05, 0.95, 500)
    y = (rng.random(500) < p).astype(int)  # calibrated by construction
    probs = np.stack([1 - p, p], 1)
    ci = bootstrap_intervals(y, probs, seed=3)
    idx = stratified_resamples(y, 1000, seed=3)
    boot = metric_rows(y[idx], probs[idx])["ece"]
    assert np.quantile(boot, 0.025) > ci["ece"]["value"]  # the percentile interval misses the figure here
    bias = boot.mean() - ci["ece"]["value"]
    assert ci["ece"]["low"] == pytest.approx(max(0.0, np.quantile(boot, 0.025) - bias))
    assert ci["ece"]["high"] == pytest.approx(np.quantile(boot, 0.975) - bias)
    assert ci["ece"]["low"] <= ci["ece"]["value"] <= ci["ece"]["high"]
    assert ci["balanced_acc"]["low"] == pytest.approx(np.quantile(metric_rows(y[idx], probs[idx])["balanced_acc"],
                                                                  0.025))  # unshifted


def test_a_multi_class_operating_point_names_no_positive_class():
    """A 10-class class-incremental bundle's edgekd.json named 'class 1' its positive class (a binary notion); a
    multi-class decision is the top class, with no positive class, and its card and Grad-CAM rows still work."""
    from edgekd.export.clinical import as_the_bundle_decides, operating_point
    from edgekd.export.profile import profile_from_dict

    rng = np.random.default_rng(0)
    y = {s: rng.integers(0, 3, 60) for s in ("val", "test")}
    logits = {s: rng.normal(size=(60, 3)) + 2 * np.eye(3)[y[s]] for s in ("val", "test")}
    names = ["a", "b", "c"]
    point = operating_point({"splits": {s: {"logits": logits[s]} for s in y}},
                            {s: (None, y[s]) for s in y}, profile_from_dict({}), names)
    decision = point["decision"]
    assert decision["rule"] == "argmax" and decision["threshold"] is None
    assert "positive_class" not in decision and "positive_index" not in decision
    assert 0 < decision["test"]["acc"]["value"] <= 1
    rows = as_the_bundle_decides([{"probs": [0.1, 0.7, 0.2], "prob": 0.7}], point, names)
    assert rows[0]["predicted"] == "b"


def test_a_card_without_calibration_does_not_call_its_probabilities_calibrated(calibrated_bundle, tmp_path):
    import yaml

    from edgekd.export import export_checkpoint, load_profile

    out, _ = calibrated_bundle
    profile = tmp_path / "p.yaml"
    profile.write_text(yaml.safe_dump({"formats": ["onnx"], "precisions": ["fp32"], "parity": {"images": 8},
                                       "calibration": {"method": "none"}, "decision": {"rule": "youden"}}))
    export_checkpoint(out.parent / "run" / "best.pt", tmp_path / "b", profile=load_profile(profile),
                      log=lambda *_: None)
    card = (tmp_path / "b" / "card.md").read_text()
    operating = card.split("## Operating point", 1)[1].split("\n## ", 1)[0]
    assert "uncalibrated (softmax) probability >=" in operating and "no calibration: raw softmax" in operating
    assert "calibrated p" not in operating and "temperature" not in operating
    assert "## Calibration" not in card
    assert "not at the operating point" in card.split("## Clinical metrics per format", 1)[1]


def test_export_warns_when_no_threshold_reaches_the_decision_target():
    """A negative validation image at probability 1.0 and a specificity target of 1.0: no threshold in [0, 1]
    reaches it (p >= 1.0 is positive); the bundle's val figures show the miss and the export says so."""
    from edgekd.export.parity import ParitySet
    from edgekd.export.profile import profile_from_dict
    from edgekd.export.run import _clinical

    y = np.array([0, 0, 1, 1, 0, 1])
    logits = np.array([[0.0, 60.0], [3.0, 0.0], [0.0, 4.0], [0.0, 2.0], [2.0, 0.0], [0.0, 3.0]])
    x = np.zeros((6, 3, 2, 2), np.float32)
    parity_set = ParitySet(x, [], {"val": (x, y), "test": (x, y)})
    reference = {"splits": {s: {"logits": logits} for s in ("val", "test")}}
    profile = profile_from_dict({"decision": {"rule": "specificity", "target": 1.0}, "calibration": {"method": "none"}})
    said: list[str] = []
    clinical = _clinical(reference, parity_set, profile, {"class_names": ["normal", "pneumonia"]}, said.append)
    assert clinical["decision"]["threshold"] == 1.0
    assert said == ["warning: decision: no threshold reaches specificity 1 on val (it gives 0.6667 at 1: images "
                    "at probability 1.0)"]


def test_an_operating_point_that_cannot_be_fit_is_a_one_line_profile_error():
    """A one-class val split under rule youden, or Platt scaling of a model ranking the classes backwards, ended in
    a raw ValueError (the CLI's unforeseen-error path, exit 1); Platt on one class fitted without a word."""
    from edgekd.errors import EdgeKDError
    from edgekd.export import profile_from_dict
    from edgekd.export.clinical import operating_point

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(40, 2))
    one_class = np.zeros(40, dtype=int)
    both = np.arange(40) % 2

    def fit(val_y, profile):
        reference = {"splits": {"val": {"logits": logits}, "test": {"logits": logits}}}
        splits = {"val": (None, val_y), "test": (None, both)}
        return operating_point(reference, splits, profile_from_dict(profile), ["normal", "disease"])

    with pytest.raises(EdgeKDError, match=r"^export profile: decision.rule youden: .*both classes"):
        fit(one_class, {"calibration": {"method": "none"}, "decision": {"rule": "youden"}})
    with pytest.raises(EdgeKDError, match=r"^export profile: calibration.method platt: Platt scaling needs validation "
                                          r"images of both classes$"):
        fit(one_class, {"calibration": {"method": "platt"}})
    backwards = np.where(logits[:, 1] > logits[:, 0], 0, 1)  # the model ranks the classes backwards
    with pytest.raises(EdgeKDError, match=r"^export profile: calibration.method platt: .*non-positive slope"):
        fit(backwards, {"calibration": {"method": "platt"}})
    assert fit(1 - backwards, {"calibration": {"method": "platt"}})["calibration"] is not None
