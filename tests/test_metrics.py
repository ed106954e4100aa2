import re
import warnings

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, log_loss, roc_auc_score

from src.metrics import (EPS, WeightedBCE, auc_weighted, per_class_accuracy, per_class_auc, per_class_log_loss, report,
                         weighted_log_loss)
from src.utils import CLASSES
from src.utils import PipelineError


def reference(y, p):
    """The competition metric from scikit-learn: every (image, class) pair is a sample weighted 1 or 2."""
    w = np.tile([1, 1, 1, 1, 1, 2], len(y))
    return log_loss(y.ravel(), np.clip(p, EPS, 1 - EPS).ravel(), sample_weight=w, labels=[0, 1])


@pytest.mark.parametrize("seed", range(5))
def test_weighted_log_loss_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    y = (rng.random((n, 6)) < 0.2).astype(float)
    p = rng.random((n, 6))
    p[rng.random((n, 6)) < 0.05] = rng.choice([0.0, 1.0])  # extremes exercise the clipping
    assert abs(weighted_log_loss(y, p) - reference(y, p)) < 1e-9


def test_any_weighs_double():
    y = np.zeros((1, 6))
    p_any = np.array([[0, 0, 0, 0, 0, 0.5]])
    p_sub = np.array([[0.5, 0, 0, 0, 0, 0]])
    assert weighted_log_loss(y, p_any) == pytest.approx(2 * weighted_log_loss(y, p_sub))
    assert weighted_log_loss(y, p_sub) == pytest.approx(np.log(2) / 7)


def separable_not_perfect(seed=1, n=200):
    """Labels and scores whose per-class log loss, AUC and accuracy differ by class (the class's index sets its
    noise), with scores exactly at the 0.5 threshold among them."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 6)) < 0.3).astype(float)
    p = np.clip(0.3 + 0.3 * y + rng.normal(0, 0.05 + 0.05 * np.arange(6), (n, 6)), 0.01, 0.99)
    p[::7] = 0.5  # ties at the threshold: counted as positive predictions (p >= 0.5)
    return y, p


def test_per_class_figures_match_sklearn():
    y, p = separable_not_perfect()
    ll, auc, acc = per_class_log_loss(y, p), per_class_auc(y, p), per_class_accuracy(y, p)
    assert ll.shape == auc.shape == acc.shape == (6,)
    for c in range(6):
        assert ll[c] == pytest.approx(log_loss(y[:, c], p[:, c], labels=[0, 1]), abs=1e-12)
        assert auc[c] == pytest.approx(roc_auc_score(y[:, c], p[:, c]), abs=1e-12)
        assert acc[c] == accuracy_score(y[:, c], p[:, c] >= 0.5)
    assert len(set(np.round(acc, 6))) == 6  # the classes' figures differ: one class's figure cannot stand for another's


def test_report_holds_every_figure_by_its_name():
    y, p = separable_not_perfect(2)
    r = report(y, p)
    assert set(r) == {"weighted_log_loss", "n_images", "per_class", "mean_auc", "accuracy_any"}
    assert r["weighted_log_loss"] == pytest.approx(reference(y, p), abs=1e-12) and r["n_images"] == 200
    assert list(r["per_class"]) == CLASSES
    aucs = []
    for c, name in enumerate(CLASSES):
        assert r["per_class"][name] == pytest.approx({
            "log_loss": log_loss(y[:, c], p[:, c], labels=[0, 1]), "auc": roc_auc_score(y[:, c], p[:, c]),
            "accuracy": accuracy_score(y[:, c], p[:, c] >= 0.5), "positives": int(y[:, c].sum())}, abs=1e-12)
        aucs.append(roc_auc_score(y[:, c], p[:, c]))
    assert r["mean_auc"] == pytest.approx(np.mean(aucs), abs=1e-12)
    assert r["accuracy_any"] == accuracy_score(y[:, 5], p[:, 5] >= 0.5)


def test_auc_undefined_for_single_class_and_report():
    y = np.zeros((10, 6))
    y[:3, 5] = 1
    p = np.full((10, 6), 0.1)
    p[0, 5] = 0.2  # one positive ranked above the rest: AUC 4/7 (7 negatives, 3 positives, ties count half)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NaN where undefined, without numpy's warnings about it
        auc = per_class_auc(y, p)
        r = report(y, p)
        none = report(np.zeros((10, 6)), p)
    assert np.isnan(auc[:5]).all() and auc[5] == pytest.approx(roc_auc_score(y[:, 5], p[:, 5]), abs=1e-12)
    assert r["per_class"]["any"]["positives"] == 3 and r["n_images"] == 10
    assert r["mean_auc"] == auc[5]  # the mean over the classes where it is defined
    assert np.isnan(none["mean_auc"])  # defined nowhere: NaN


def test_labels_and_predictions_of_other_dtypes_give_the_same_metric():
    """Labels as booleans or integers and float32 predictions (what torch gives) score as float64 ones: a float32
    prediction of exactly 1 for a negative is clipped to 1 - 1e-15 in float64 (34.5 nats), not to 1.0 (infinite)."""
    y, p = separable_not_perfect(3)
    p[0, :] = 1.0
    y[0, :] = 0
    want = reference(y, p)
    assert np.isfinite(want)
    for yy in (y.astype(bool), y.astype(int)):
        assert weighted_log_loss(yy, p) == pytest.approx(want, abs=1e-12)
    p32 = p.astype(np.float32)
    assert weighted_log_loss(y, p32) == pytest.approx(reference(y, p32.astype(np.float64)), abs=1e-12)
    np.testing.assert_allclose(per_class_log_loss(y.astype(bool), p), per_class_log_loss(y, p), atol=1e-12)


def test_weighted_bce_is_the_metric_on_logits():
    """The training loss is the competition metric of sigmoid(logits) (any weighs 2 of 7), and with a mask the mean
    over the rows it marks."""
    import torch
    rng = np.random.default_rng(4)
    y = (rng.random((3, 5, 6)) < 0.3).astype(np.float32)
    logits = rng.normal(0, 2, y.shape).astype(np.float32)
    prob = 1 / (1 + np.exp(-logits.astype(np.float64)))
    loss = WeightedBCE()(torch.from_numpy(logits), torch.from_numpy(y))
    assert loss.dtype == torch.float32  # weights built in float32: a float64 loss would be slow on a GPU
    assert loss.item() == pytest.approx(weighted_log_loss(y.reshape(-1, 6), prob.reshape(-1, 6)), rel=1e-5)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, :2] = mask[2, 4] = True
    keep = mask.numpy()
    masked = WeightedBCE()(torch.from_numpy(logits), torch.from_numpy(y), mask)
    assert masked.item() == pytest.approx(weighted_log_loss(y[keep], prob[keep]), rel=1e-5)
    assert WeightedBCE()(torch.from_numpy(logits), torch.from_numpy(y), torch.zeros(3, 5)).item() == 0.0
    one = torch.zeros(3, 5, dtype=torch.bool)
    one[1, 3] = True  # one row marked: its own loss, not half of it
    assert WeightedBCE()(torch.from_numpy(logits), torch.from_numpy(y), one).item() == pytest.approx(
        weighted_log_loss(y[1, 3][None], prob[1, 3][None]), rel=1e-5)


@pytest.mark.parametrize("n", [2, 7, 60])
def test_auc_is_defined_from_one_positive_and_one_negative(n):
    rng = np.random.default_rng(n)
    y = np.zeros(n)
    y[int(rng.integers(n))] = 1
    p = np.round(rng.random(n), 1)
    w = rng.integers(1, 4, n).astype(float)
    assert auc_weighted(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert auc_weighted(y, p, w) == pytest.approx(roc_auc_score(y, p, sample_weight=w), abs=1e-12)
    assert auc_weighted(1 - y, p) == pytest.approx(roc_auc_score(1 - y, p), abs=1e-12)  # one negative


def test_auc_is_nan_without_both_labels_and_says_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for y, p, w in [(np.zeros(0), np.zeros(0), None), (np.ones(4), np.arange(4.0), None),
                        (np.zeros(4), np.arange(4.0), None), (np.r_[0, 1, 0.0], np.arange(3.0), np.r_[1, 0, 1.0]),
                        (np.r_[0, 1, 0.0], np.arange(3.0), np.r_[0, 1, 0.0])]:
            assert np.isnan(auc_weighted(y, p, w)), (y, p, w)


def test_nan_and_shape_rejected():
    with pytest.raises(PipelineError, match="^12 NaN prediction"):
        weighted_log_loss(np.zeros((2, 6)), np.full((2, 6), np.nan))
    p = np.zeros((2, 6))
    p[1, 3] = np.nan
    with pytest.raises(PipelineError, match="^1 NaN prediction"):
        per_class_auc(np.zeros((2, 6)), p)
    for y, p in [((2, 6), (2, 5)), ((2, 5), (2, 5)), ((6,), (6,)), ((2, 6, 1), (2, 6, 1)), ((3, 6), (2, 6))]:
        with pytest.raises(PipelineError, match=re.escape(f"labels {y} and predictions {p} must both be (N, 6)")):
            weighted_log_loss(np.zeros(y), np.zeros(p))
