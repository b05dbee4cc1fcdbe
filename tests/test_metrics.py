"""Clinical metrics against hand-computed values."""

import numpy as np
import pytest
from sklearn import metrics as skm

from edgekd.metrics import classification_metrics, confusion, partial_auc_above_tpr


def test_binary_metrics_hand_computed():
    y = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    p1 = np.array([0.1, 0.6, 0.2, 0.9, 0.8, 0.4, 0.7, 0.95])
    m = classification_metrics(y, np.stack([1 - p1, p1], 1))
    # predictions: 0 1 0 1 1 0 1 1 -> tp=4 fn=1 tn=2 fp=1
    assert m["acc"] == pytest.approx(6 / 8)
    assert m["sensitivity"] == pytest.approx(4 / 5) and m["specificity"] == pytest.approx(2 / 3)
    assert m["balanced_acc"] == pytest.approx((4 / 5 + 2 / 3) / 2)
    # AUC: pairs (pos > neg) among 15: neg scores .1 .6 .2; pos .9 .8 .4 .7 .95 -> only 0.4<0.6 fails
    assert m["auc"] == pytest.approx(14 / 15)
    assert confusion(y, np.stack([1 - p1, p1], 1)).tolist() == [[2, 1], [1, 4]]
    # PPV = tp / (tp + fp), NPV = tn / (tn + fn); the positive class's precision, as scikit-learn gives it
    assert m["ppv"] == pytest.approx(4 / 5) and m["npv"] == pytest.approx(2 / 3)
    assert m["ppv"] == pytest.approx(skm.precision_score(y, p1 >= 0.5))
    zero = classification_metrics(y, np.stack([1 - p1, p1], 1), positive=0)
    assert (zero["ppv"], zero["npv"]) == (pytest.approx(2 / 3), pytest.approx(4 / 5))
    nothing_positive = classification_metrics(y, np.stack([np.ones(8), np.zeros(8)], 1))
    assert np.isnan(nothing_positive["ppv"]) and nothing_positive["npv"] == pytest.approx(3 / 8)


def test_partial_auc_bounds():
    y = np.array([0] * 50 + [1] * 50)
    perfect = np.r_[np.zeros(50), np.ones(50)]
    assert partial_auc_above_tpr(y, perfect) == pytest.approx(0.2)
    rng = np.random.default_rng(0)
    random_scores = rng.random(100_000)
    y_big = rng.integers(0, 2, 100_000)
    # a random classifier's ROC is the diagonal: area above TPR 0.8 under it is 0.2^2 / 2
    assert partial_auc_above_tpr(y_big, random_scores) == pytest.approx(0.02, abs=3e-3)
    assert np.isnan(partial_auc_above_tpr(np.zeros(5), np.ones(5)))


def test_multiclass_macro_metrics():
    y = np.array([0, 1, 2, 2])
    probs = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])
    m = classification_metrics(y, probs)
    assert m["acc"] == pytest.approx(0.75)
    assert m["sensitivity"] == pytest.approx((1 + 1 + 0.5) / 3)
    # specificities: class0 tn=2 fp=1 -> 2/3; class1 1; class2 1
    assert m["specificity"] == pytest.approx((2 / 3 + 1 + 1) / 3)
    # Macro one-vs-rest AUC: per class, the share of (positive, negative) pairs the positive scores higher (a tie
    # counts 1/2), then the plain mean over classes.
    # class 0: positive 0.8 vs negatives 0.1 0.1 0.6 -> 3/3. class 1: 0.8 vs 0.1 0.2 0.3 -> 3/3.
    # class 2: positives 0.7 0.1 vs negatives 0.1 0.1 -> 0.7 wins twice, 0.1 ties twice -> (2 + 2 * 0.5) / 4 = 3/4.
    assert m["auc"] == pytest.approx((1 + 1 + 3 / 4) / 3, abs=1e-12)
    # pAUC(TPR >= 0.8) per class against the rest, then the mean. Classes 0 and 1: the positive scores highest,
    # a perfect ROC: 0.2 each. Class 2: positives 0.7, 0.1 vs negatives 0.1, 0.1: the ROC runs from (0, 0.5)
    # straight to (1, 1), TPR = 0.5 + 0.5 FPR, above 0.8 for FPR >= 0.6: area int_0.6^1 (0.5x - 0.3) dx = 0.04.
    assert m["pauc"] == pytest.approx((0.2 + 0.2 + 0.04) / 3)


def test_multiclass_pauc_needs_every_class():
    y = np.array([0, 1, 1, 0])
    probs = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.7, 0.2], [0.6, 0.3, 0.1]])
    m = classification_metrics(y, probs)
    assert np.isnan(m["pauc"]) and np.isnan(m["auc"])
    # class 2 has no image and is never predicted: recall, F1 and precision are means over classes 0 and 1, as
    # sensitivity is (it had counted as 0: recall 2/3 beside sensitivity 1, documented equal; precision 2/3)
    assert m["recall"] == m["sensitivity"] == 1.0 and m["f1"] == 1.0 and m["precision"] == 1.0
    wrong = classification_metrics(y, np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]]))
    # class 2 predicted once, never true: its F1 is 0 (a false positive), its recall undefined
    assert wrong["recall"] == pytest.approx((1 + 0.5) / 2) == wrong["sensitivity"]
    assert wrong["f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    # the bootstrap's point figures (metrics.json intervals, an export's edgekd.json) follow the same rules
    from edgekd.metrics.uncertainty import metric_rows

    for p in (probs, np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])):
        rows, ref = metric_rows(y[None], p[None]), classification_metrics(y, p)
        for key in ("f1", "balanced_acc", "sensitivity", "specificity"):
            assert rows[key][0] == pytest.approx(ref[key]), key


def test_a_figure_interrupted_mid_write_leaves_no_file(tmp_path, monkeypatch):
    """Ctrl-C while a PNG was written left `curves.png.tmp.png` (0 bytes) in the run folder."""
    import matplotlib.pyplot as plt

    from edgekd.metrics.plots import save_figure

    fig, _ = plt.subplots()
    save_figure(fig, tmp_path / "ok.png")
    assert (tmp_path / "ok.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def interrupted(self, fname, **kwargs):
        open(fname, "wb").close()  # the file exists, empty, when the interrupt lands
        raise KeyboardInterrupt

    fig, _ = plt.subplots()
    monkeypatch.setattr(type(fig), "savefig", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_figure(fig, tmp_path / "curves.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.png"]
    assert not plt.fignum_exists(fig.number)  # closed all the same


def test_a_one_class_multiclass_split_has_nan_specificity_without_a_numpy_warning():
    """A 5-class split holding one image (data.limit=1) has no negatives: its specificity is NaN. numpy's 'Mean of
    empty slice' warning had reached the user as a bare 'warning: Mean of empty slice'."""
    import warnings

    probs = np.array([[0.1, 0.6, 0.1, 0.1, 0.1]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = classification_metrics(np.array([1]), probs, classes=list(range(5)))
    assert m["sensitivity"] == 1.0 and np.isnan(m["specificity"])
    two = classification_metrics(np.array([1, 2]), np.array([[0.1, 0.6, 0.1, 0.1, 0.1], [0.1, 0.6, 0.1, 0.1, 0.1]]),
                                 classes=list(range(5)))
    assert two["sensitivity"] == 0.5 and two["specificity"] == 0.5  # class 1: 0 of 1 negatives right; class 2: 1 of 1


def test_plots_label_roc_axes_for_every_class_and_tick_whole_epochs(tmp_path, monkeypatch):
    import edgekd.metrics.plots as plots

    figs = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figs.append(fig) or path)
    y = np.array([0, 1, 2, 2, 1, 0])
    probs = np.eye(3)[[0, 1, 2, 1, 1, 0]] * 0.7 + 0.1
    plots.plot_roc(y, probs, ["a", "b", "c"], tmp_path / "roc.png")
    ax = figs[-1].axes[0]  # scikit-learn had labelled every class's curve "(Positive label: 1)"
    assert "Positive label" not in ax.get_xlabel() + ax.get_ylabel() and "sensitivity" in ax.get_ylabel()
    # a two-class ROC names its positive class; legends give AUC to 4 decimals (0.9504 and 0.9544 read alike at 2)
    yb = np.array([0, 0, 1, 1, 0, 1])
    plots.plot_roc(yb, np.stack([1 - np.array([.1, .3, .8, .35, .4, .9]), [.1, .3, .8, .35, .4, .9]], 1),
                   ["normal", "pneumonia"], tmp_path / "roc2.png", "t", positive=0)
    ax = figs[-1].axes[0]
    assert ax.get_title() == "t\npositive class: normal"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["normal (AUC 0.8889)"]
    plots.plot_curves([{"epoch": e, "train_loss": 1 / e, "val_acc": 0.5} for e in (1, 2, 3)], tmp_path / "c.png")
    for ax in figs[-1].axes:
        figs[-1].canvas.draw()
        assert all(float(t).is_integer() for t in ax.get_xticks()), ax.get_xticks()
