"""Honest figures: the weighted AUC against scikit-learn, the bootstrap over patients, the scan-level operating
point, and the report, card and demo that carry them."""
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from src.blend import fit_blend
from src.intervals import Draws, member_intervals, series_figures
from src.metrics import auc_weighted, interval, operating_point, sens_spec, weighted_log_loss
from src.utils import CLASSES

from .conftest import copy_run


def test_weighted_auc_is_sklearns_with_ties_and_weights():
    rng = np.random.default_rng(0)
    for n in (5, 40, 500):
        y = (rng.random(n) < 0.3).astype(float)
        y[:2] = [0, 1]
        p = np.round(rng.random(n), 1)  # many ties
        w = rng.integers(0, 4, n).astype(float)
        w[:2] = 1
        assert auc_weighted(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
        assert auc_weighted(y, p, w) == pytest.approx(roc_auc_score(y, p, sample_weight=w), abs=1e-12)
    assert np.isnan(auc_weighted(np.zeros(4), np.arange(4.0)))


def test_operating_point_flags_the_stated_share_of_positive_series():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 1, 0], float)
    p = np.array([0.9, 0.8, 0.3, 0.05, 0.6, 0.1, 0.02, 0.2, 0.7, 0.01])
    t = operating_point(y, p, 0.8)  # 5 positives: the 4th highest keeps 4 of 5 = 80%
    assert t == 0.3
    sens, spec = sens_spec(y, p, t)
    assert sens == 0.8 and spec == 0.8  # 0.6 is the only negative at or above 0.3
    assert operating_point(y, p, 1.0) == 0.05 and sens_spec(y, p, 0.05)[0] == 1.0
    assert np.isnan(operating_point(np.zeros(3), np.ones(3)))


def test_the_bootstrap_resamples_patients_not_slices():
    """A patient's slices travel together: with 4 patients of 50 near-identical slices each, the interval is as wide
    as 4 draws allow, far wider than 200 independent slices would give."""
    rng = np.random.default_rng(1)
    patients = np.repeat(["a", "b", "c", "d"], 50)
    y = np.zeros((200, 6))
    y[:50] = 1  # patient a bleeds on every slice
    p = np.clip(y * 0.7 + 0.15 + rng.normal(0, 0.01, y.shape), 0.01, 0.99)
    p[:50, :] = 0.3  # and is predicted badly
    prior = np.full((200, 6), 0.25)
    w = Draws(patients, 300, seed=0).weights(patients)
    iv = member_intervals(y, p, prior, w)
    lo, hi = iv["weighted_log_loss"]
    point = weighted_log_loss(y, p)
    assert lo < point < hi and hi - lo > 0.5 * point
    # the same draws for every member: a member equal to another gets the same interval
    assert member_intervals(y, p, prior, Draws(patients, 300, seed=0).weights(patients)) == iv


def test_interval_is_the_central_share_and_ignores_nan():
    assert interval(np.r_[np.arange(1001.0), np.nan]) == pytest.approx([25.0, 975.0])
    assert all(np.isnan(interval([np.nan])))


def test_series_figures_score_a_series_by_its_highest_any(tmp_path):
    table = pd.DataFrame({"patient": ["a", "a", "a", "b", "b", "c"], "series": ["s1", "s1", "s1", "s2", "s2", "s3"],
                          "y": [0, 1, 0, 0, 0, 1], "p": [0.1, 0.8, 0.2, 0.3, 0.4, 0.6]},
                         index=[f"ID_{i}" for i in range(6)])
    f = series_figures(table, Draws(table["patient"], 50, seed=0), target=1.0)
    assert f["series"] == 3 and f["positive"] == 2 and f["auc"] == 1.0  # series scores 0.8 (y1), 0.4 (y0), 0.6 (y1)
    assert f["threshold"] == 0.6 and f["sensitivity"] == 1.0 and f["specificity"] == 1.0


def test_report_card_and_demo_carry_intervals_and_the_operating_point(trained_run, tmp_path):
    from src.card import card_text
    from src.serve.results import summarise
    from src.evaluate import evaluate_runs
    from src.predictor import Predictor
    run = copy_run(trained_run, "iv")
    fit_blend([run], quiet=True)
    s = evaluate_runs([run], tmp_path / "report", stage1_only=False, resamples=50)
    assert s["bootstrap"]["resamples"] == 50 and s["bootstrap"]["patients"] > 0
    for name in ("iv", "seq_iv", "boost_iv", "blend", "blend, cross-fitted"):
        lo, hi = s["intervals"][name]["weighted_log_loss"]
        assert lo <= s["runs"][name]["weighted_log_loss"] <= hi, name
        assert set(s["intervals"][name]["auc"]) == set(CLASSES)
        assert s["series"][name]["series"] > 0
    op = s["operating_point"]
    assert op["member"] == "blend" and op["sensitivity"] >= 0.95 and 0 <= op["threshold"] <= 1
    md = (tmp_path / "report" / "report.md").read_text()
    assert "95% intervals" in md and "Operating point" in md and "Scans" in md
    card = Predictor.load(run).card
    assert card["operating_point"]["threshold"] == op["threshold"] and len(card["oof_weighted_log_loss_ci"]) == 2
    assert "95% interval" in card_text(card)
    p = Predictor.load(run)
    table = pd.DataFrame({"ID": ["a", "b"], "file": ["a", "b"], "slice": [1, 2], "z": [0.0, 1.0],
                          **{c: [op["threshold"] * 0.99, op["threshold"] * 0.5] for c in CLASSES}})
    below = summarise("s", table, p.card)
    assert below["threshold"] == op["threshold"] and below["verdict"] == "no hemorrhage found"
    table.loc[0, "any"] = op["threshold"]
    assert summarise("s", table, p.card)["verdict"] == "suspected hemorrhage"
    assert "operating point" in below["threshold_from"]
