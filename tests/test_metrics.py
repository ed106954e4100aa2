import numpy as np
import pytest
from sklearn.metrics import accuracy_score, log_loss, roc_auc_score

from src.metrics import EPS, per_class_accuracy, per_class_auc, per_class_log_loss, report, weighted_log_loss
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


def test_per_class_figures_match_sklearn():
    rng = np.random.default_rng(1)
    y = (rng.random((200, 6)) < 0.3).astype(float)
    p = np.clip(y * 0.6 + rng.random((200, 6)) * 0.5, 0, 1)
    for c in range(6):
        assert per_class_log_loss(y, p)[c] == pytest.approx(log_loss(y[:, c], p[:, c], labels=[0, 1]), abs=1e-9)
        assert per_class_auc(y, p)[c] == pytest.approx(roc_auc_score(y[:, c], p[:, c]))
        assert per_class_accuracy(y, p)[c] == pytest.approx(accuracy_score(y[:, c], p[:, c] >= 0.5))


def test_auc_undefined_for_single_class_and_report():
    y = np.zeros((10, 6))
    y[:3, 5] = 1
    p = np.full((10, 6), 0.1)
    auc = per_class_auc(y, p)
    assert np.isnan(auc[:5]).all() and auc[5] == 0.5
    r = report(y, p)
    assert r["per_class"]["any"]["positives"] == 3 and r["n_images"] == 10


def test_nan_and_shape_rejected():
    with pytest.raises(PipelineError, match="NaN"):
        weighted_log_loss(np.zeros((2, 6)), np.full((2, 6), np.nan))
    with pytest.raises(PipelineError, match="must both be"):
        weighted_log_loss(np.zeros((2, 6)), np.zeros((2, 5)))
