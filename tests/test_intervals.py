"""Honest figures: the weighted AUC against scikit-learn, the bootstrap over patients, the scan-level operating
point, and the report, card and demo that carry them."""
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from src.blend import fit_blend
from src.intervals import Draws, member_intervals, series_figures, uncertainty
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
    assert operating_point(y, p, 0.1) == 0.9  # a share under one series: the highest positive score
    ramp = np.arange(100) / 100  # 100 positive series: the default 95% keeps 95 of them
    assert operating_point(np.ones(100), ramp) == 0.05
    # 0.55 x 100 is 55.000000000000007 in floating point: still the 55th highest, never the 56th
    assert operating_point(np.ones(100), ramp, 0.55) == 0.45 and operating_point(np.ones(100), ramp, 0.29) == 0.71
    assert np.isnan(operating_point(np.zeros(3), np.ones(3)))
    # weighted (a bootstrap's multiplicities); the negative scored exactly at the threshold counts as flagged
    w = np.array([2, 1, 1, 1, 3, 1, 1, 1, 1, 1], float)
    assert sens_spec(y, p, 0.6, w) == pytest.approx((4 / 6, 4 / 7), abs=1e-15)
    assert sens_spec(y, p, 0.6) == pytest.approx((3 / 5, 4 / 5), abs=1e-15)
    one = np.array([1, 0, 0], float)
    assert sens_spec(one, np.array([0.5, 0.4, 0.6]), 0.5) == (1.0, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # undefined figures are NaN, without numpy's warnings
        s0, sp = sens_spec(np.zeros(3), np.array([0.1, 0.6, 0.7]), 0.5)
        s1, sp1 = sens_spec(np.ones(2), np.array([0.1, 0.6]), 0.5, np.array([0, 1.0]))
    assert np.isnan(s0) and sp == 1 / 3 and s1 == 1.0 and np.isnan(sp1)


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


# ---------------------------------------------------------------- a reference: each draw's data built by repetition
def wll(y, p):
    """The competition metric written out (tests/test_metrics.py holds it equal to scikit-learn's log loss)."""
    p = np.clip(p, 1e-15, 1 - 1e-15)
    return float(-(np.log(np.where(y == 1, p, 1 - p)) @ np.array([1, 1, 1, 1, 1, 2]) / 7).mean())


def auc_or_nan(y, p):
    return roc_auc_score(y, p) if 0 < y.sum() < len(y) else np.nan


def quantiles(values):
    v = [x for x in values if not np.isnan(x)]
    return list(np.quantile(v, [0.025, 0.975])) if v else [np.nan, np.nan]


def drawn_rows(draws: Draws, d: int, patients) -> np.ndarray:
    """Row indices of draw d: each row as often as its patient was drawn (rows of patients outside the draws never)."""
    times = {pat: draws.counts[d, i] for i, pat in enumerate(draws.index)}
    return np.repeat(np.arange(len(patients)), [times.get(pat, 0) for pat in patients])


def ref_member(y, p, prior, draws, patients) -> dict:
    losses, ratios, aucs = [], [], {c: [] for c in CLASSES}
    for d in range(len(draws.counts)):
        idx = drawn_rows(draws, d, patients)
        if not len(idx):
            continue  # this member's patients were not drawn: the draw says nothing about it
        losses.append(wll(y[idx], p[idx]))
        ratios.append(wll(y[idx], p[idx]) / wll(y[idx], prior[idx]))
        for c, name in enumerate(CLASSES):
            aucs[name].append(auc_or_nan(y[idx, c], p[idx, c]))
    return {"weighted_log_loss": quantiles(losses), "ratio_to_prior": quantiles(ratios),
            "auc": {c: quantiles(v) for c, v in aucs.items()}}


def ref_series(table: pd.DataFrame, draws: Draws, target: float) -> dict:
    """Series-level figures by hand: a series is positive when any slice is, scored by its highest p; the threshold is
    the highest one that flags at least `target` of the positive series."""
    s = table.groupby("series").agg(patient=("patient", "first"), y=("y", "max"), p=("p", "max"))
    y, p, pats = s["y"].to_numpy(float), s["p"].to_numpy(float), s["patient"].tolist()
    t = max(x for x in p if (p[y == 1] >= x).mean() >= target)

    def sens_spec(yy, pp):
        return ((pp >= t) & (yy == 1)).sum() / (yy == 1).sum() if (yy == 1).any() else np.nan, \
               ((pp < t) & (yy == 0)).sum() / (yy == 0).sum() if (yy == 0).any() else np.nan

    aucs, senses, specs = [], [], []
    for d in range(len(draws.counts)):
        idx = drawn_rows(draws, d, pats)
        aucs.append(auc_or_nan(y[idx], p[idx]))
        a, b = sens_spec(y[idx], p[idx])
        senses.append(a), specs.append(b)
    sens, spec = sens_spec(y, p)
    return {"series": len(s), "positive": int(y.sum()), "auc": auc_or_nan(y, p), "auc_ci": quantiles(aucs),
            "target_sensitivity": target, "threshold": t, "sensitivity": sens, "sensitivity_ci": quantiles(senses),
            "specificity": spec, "specificity_ci": quantiles(specs)}


def assert_same(got, want, path=""):
    """Nested dicts and lists of floats equal to 1e-12 (NaN equal to NaN)."""
    if isinstance(want, dict):
        assert set(got) == set(want), (path, set(got) ^ set(want))
        for k in want:
            assert_same(got[k], want[k], f"{path}/{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{path}[{i}]")
    else:
        assert (np.isnan(got) and np.isnan(want)) or got == pytest.approx(want, abs=1e-12), (path, got, want)


def small_cohort(seed=0, patients=12):
    """Patients of 2 to 7 slices, each slice its patient's series; labels rare enough that some draws lack a class."""
    rng = np.random.default_rng(seed)
    pats = np.repeat([f"P{i:02d}" for i in range(patients)], rng.integers(2, 8, patients))
    n = len(pats)
    y = (rng.random((n, 6)) < 0.12).astype(float)
    y[:, 5] = y[:, :5].max(1)
    p = np.clip(0.2 + 0.5 * y + rng.normal(0, 0.2, y.shape), 0.01, 0.99)
    r, c = np.nonzero(y == 1)
    p[r[:3], c[:3]] = 0.0  # certain and wrong: the metric clips them to 1e-15 (34.5 nats), never an infinite loss
    p[np.flatnonzero(y[:, 1] == 0)[:3], 1] = 1.0
    prior = np.tile(y.mean(0), (n, 1))
    prior[:, 0] = 0.0  # a class the training folds never saw, as epidural in the real sample
    prior[:, 4] = 1.0  # and one they saw on every image (tiny data): both clipped as the metric clips
    assert y[:, 0].any()
    return pats, y, p, prior


def test_draws_take_as_many_patients_as_there_are_with_replacement():
    draws = Draws(pd.Series(["b", "a", None, "c", "a"]), 500, seed=1)
    assert list(draws.index) == ["a", "b", "c"] and draws.counts.shape == (500, 3)
    assert (draws.counts.sum(1) == 3).all() and 0 < (draws.counts == 0).mean() < 1
    np.testing.assert_allclose(draws.counts.mean(0), 1, atol=0.15)  # each patient drawn once per draw on average
    w = draws.weights(["c", "x", "a", "c"])  # an unknown patient weighs 0
    np.testing.assert_array_equal(w, np.stack([draws.counts[:, 2], np.zeros(500), draws.counts[:, 0],
                                               draws.counts[:, 2]], axis=1))
    assert w.dtype == np.float64
    assert Draws([], 4, seed=0).weights(["a"]).tolist() == [[0.0]] * 4


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_member_intervals_are_the_quantiles_of_the_resampled_data():
    """Every figure's interval equals the one computed by repeating each drawn patient's rows and scoring the copy
    with scikit-learn; draws in which none of the member's patients came up are left out."""
    pats, y, p, prior = small_cohort()
    draws = Draws(np.r_[pats, ["Q1", "Q2", "Q3", "Q4", "Q5", "Q6", "Q7", "Q8"]], 40, seed=2)  # patients it never saw
    few = np.isin(pats, ["P00", "P01"])  # a member of two patients: some draws hold none of them
    # one slice of P03 and P05's slices: some draws hold that one slice once and nothing else (total weight 1)
    odd = np.r_[np.flatnonzero(pats == "P03")[:1], np.flatnonzero(pats == "P05")]
    assert sum(draws.weights(pats[odd])[d].sum() == 1 for d in range(40)) >= 2
    for rows in (slice(None), few, odd):
        got = member_intervals(y[rows], p[rows], prior[rows], draws.weights(pats[rows]))
        assert_same(got, ref_member(y[rows], p[rows], prior[rows], draws, list(pats[rows])))
    assert any(not len(drawn_rows(draws, d, list(pats[few]))) for d in range(40))


def test_every_draw_that_holds_a_row_counts_even_once():
    """Weights given by hand: a draw holding one row once counts like any other; one holding none is left out."""
    y = np.zeros((2, 6))
    y[1] = 1
    p = np.full((2, 6), 0.2)
    loss = -np.log(np.array([0.8, 0.2]))  # per row, every class alike
    w = np.array([[1, 0], [0, 2], [0, 1], [1, 1], [0, 0]], float)
    got = member_intervals(y, p, np.full((2, 6), 0.5), w)["weighted_log_loss"]
    assert got == pytest.approx(list(np.quantile([loss[0], loss[1], loss[1], loss.mean()], [0.025, 0.975])), abs=1e-12)


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("target", [0.95, 0.5, 0.05])
def test_series_figures_equal_the_hand_computed_ones(target):
    pats, y, p, _ = small_cohort(1, patients=20)
    series = np.array([f"{pat}-s{i % 2}" for i, pat in enumerate(pats)])  # two series per patient
    table = pd.DataFrame({"patient": pats, "series": series, "y": y[:, 5], "p": p[:, 5]},
                         index=[f"ID_{i}" for i in range(len(pats))])
    draws = Draws(pats, 80, seed=5)
    assert_same(series_figures(table, draws, target), ref_series(table, draws, target))


def test_uncertainty_draws_over_every_members_patients():
    """One set of draws over the patients of all members (so their intervals are comparable), the seed given, each
    member scored on its rows, its series from the metadata."""
    pats, y, p, prior = small_cohort(2)
    pats = pats.astype(object)
    pats[4] = np.nan  # a slice whose header had no PatientID: in its series, never drawn
    ids = pd.Index([f"ID_{i:03d}" for i in range(len(pats))])
    labels = pd.DataFrame(y, index=ids, columns=CLASSES)
    meta = pd.DataFrame({"PatientID": pats, "SeriesInstanceUID": [f"S-{x}" for x in pats]}, index=ids)
    meta.loc["ID_fff", :] = ["P99", "S-P99"]  # an image of the cache no member scored: not a patient of the draws
    meta.loc["ID_ffe", :] = ["P98", None]
    half = ids[: len(ids) // 2]
    oofs = {"all": pd.DataFrame(p, index=ids, columns=CLASSES),
            "half": pd.DataFrame(p[: len(half)] * 0.9, index=half, columns=CLASSES)}
    priors = {"all": prior, "half": prior[: len(half)]}
    got = uncertainty(oofs, labels, meta, priors, resamples=20, seed=7)
    draws = Draws(pats, 20, seed=7)
    assert list(draws.index) == sorted(set(pats) - {np.nan}) and len(draws.index) == 12
    assert got["bootstrap"] == {"resamples": 20, "over": "patients", "seed": 7, "patients": 12}
    for name, rows in (("all", slice(None)), ("half", slice(0, len(half)))):
        pp = oofs[name][CLASSES].to_numpy()
        assert_same(got["members"][name], ref_member(y[rows], pp, priors[name], draws, list(pats[rows])))
        table = pd.DataFrame({"patient": pats[rows], "series": meta.loc[ids[rows], "SeriesInstanceUID"].to_numpy(),
                              "y": y[rows, 5], "p": pp[:, 5]})
        assert_same(got["series"][name], ref_series(table, draws, 0.95))


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
