"""The cross-fitted blend ("blend, cross-fitted": each fold mixed with weights fitted on the other folds' rows only),
checked against a reference computed here (scipy's bounded scalar minimiser over scikit-learn's log loss), in
src.blend, in the blend file, in src.evaluate's report and in the model card.

The data make the leak visible: in fold 0 member a is sharp and b is noise, in folds 1 and 2 the other way round.
Weights fitted on the other folds lean to b for fold 0, so the honest figure is poor; weights fitted on a fold's own
rows lean to its sharp member, so a leak makes the figure far better. Every test here fails when
src.blend.fold_weights fits each fold's weights on that fold's own rows (`folds == f` for `folds != f`), which
flatters the figure README, docs/limits.md and the demo quote as the honest one.
"""
import numpy as np
import pandas as pd
import pytest
import yaml
from scipy.optimize import minimize_scalar
from sklearn.metrics import log_loss

from src.blend import cross_fitted, fit_blend, fold_weights, load_blend
from src.labels import to_long
from src.utils import CLASSES

N, K = 300, 3
EPS = 1e-15


def members_data(seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random((N, 6)) < 0.3).astype(float)
    y[:, 5] = y[:, :5].max(1)  # any: the OR of the subtypes, as in a label file
    folds = np.arange(N) % K
    sharp = np.clip(0.8 * y + 0.1 + rng.normal(0, 0.05, y.shape), 0.02, 0.98)
    noise = np.clip(0.3 + 0.15 * y + rng.normal(0, 0.25, y.shape), 0.02, 0.98)
    a = np.where((folds == 0)[:, None], sharp, noise)
    b = np.where((folds == 0)[:, None], noise, sharp)
    return y, [a, b], folds


def ref_weight(y, a, b, sample_weight=None) -> float:
    """The weight w of member a (1 - w for b) minimising scikit-learn's log loss of w a + (1 - w) b on these rows."""
    def loss(w):
        return log_loss(y.ravel(), np.clip(w * a + (1 - w) * b, EPS, 1 - EPS).ravel(), sample_weight=sample_weight,
                        labels=[0, 1])
    return minimize_scalar(loss, bounds=(0, 1), method="bounded", options={"xatol": 1e-9}).x


def reference(y, preds, folds, per_class=True, own_rows=False):
    """Per fold the (6, 2) weights fitted on the other folds' rows (own_rows: on the fold's own, the leak) and every
    row blended with its fold's weights."""
    a, b = preds
    weights, out = {}, np.zeros_like(a)
    for f in range(K):
        fit = folds == f if own_rows else folds != f
        if per_class:
            wa = np.array([ref_weight(y[fit, c], a[fit, c], b[fit, c]) for c in range(6)])
        else:  # one weight for every class: the metric's weights (any counts twice)
            sw = np.tile([1, 1, 1, 1, 1, 2], fit.sum())
            wa = np.full(6, ref_weight(y[fit], a[fit], b[fit], sw))
        weights[f] = np.stack([wa, 1 - wa], axis=1)
        te = folds == f
        out[te] = a[te] * wa + b[te] * (1 - wa)
    return weights, out


def metric(y, p):
    return log_loss(y.ravel(), np.clip(p, EPS, 1 - EPS).ravel(), sample_weight=np.tile([1, 1, 1, 1, 1, 2], len(y)),
                    labels=[0, 1])


@pytest.mark.parametrize("per_class", [True, False])
def test_cross_fitted_weights_come_from_the_other_folds_only(per_class):
    y, preds, folds = members_data()
    want_w, want = reference(y, preds, folds, per_class)
    _, leak = reference(y, preds, folds, per_class, own_rows=True)
    assert metric(y, leak) < metric(y, want) - 0.2  # the data tell a leak from the honest figure by far
    fw = fold_weights("fit" if per_class else "fit-global", y, preds, folds)
    assert sorted(fw) == [0, 1, 2]
    for f in range(K):
        np.testing.assert_allclose(fw[f], want_w[f], atol=2e-3, err_msg=f"fold {f}")
    got = cross_fitted(y, preds, folds, per_class=per_class)
    np.testing.assert_allclose(got, want, atol=2e-3)
    assert metric(y, got) == pytest.approx(metric(y, want), abs=1e-4)
    # weights given (those of a blend file) are applied as they are, fold by fold
    np.testing.assert_allclose(cross_fitted(y, preds, folds, weights=want_w), want, atol=1e-12)


def write_run(root, name, data_dir, preds, ids, folds, stage1=None):
    """A finished run of K folds: each fold's config.yaml and oof.csv (its rows, with the fold column)."""
    run = root / "runs" / name
    for f in range(K):
        d = run / f"fold{f}"
        d.mkdir(parents=True)
        cfg = {"data_dir": str(data_dir), "out_dir": str(root), "k": K, "fold_seed": 0, "model": "m"}
        if stage1:
            cfg["stage1"] = str(stage1)
        (d / "config.yaml").write_text(yaml.safe_dump(cfg))
        te = folds == f
        oof = pd.DataFrame(preds[te], index=pd.Index(ids[te], name="ID"), columns=CLASSES)
        oof.insert(0, "fold", f)
        oof.to_csv(d / "oof.csv")
    return run


def family(tmp_path, seed=1):
    """A stage-1 run m and its GRU run seq_m (members a and b), with their label file; the reference's figures."""
    y, preds, folds = members_data(seed)
    ids = np.array([f"ID_{i:04x}" for i in range(N)])
    data = tmp_path / "data"
    data.mkdir()
    to_long(pd.DataFrame(y.astype(int), index=ids, columns=CLASSES)).to_csv(data / "stage_2_train.csv", index=False)
    out = tmp_path / "out"
    run = write_run(out, "m", data, preds[0], ids, folds)
    write_run(out, "seq_m", data, preds[1], ids, folds, stage1=run)
    want_w, want = reference(y, preds, folds)
    _, leak = reference(y, preds, folds, own_rows=True)
    assert metric(y, leak) < metric(y, want) - 0.2
    return run, want_w, metric(y, want)


def test_the_blend_file_holds_the_other_folds_weights_and_the_honest_figure(tmp_path):
    run, want_w, honest = family(tmp_path)
    info = fit_blend([run], quiet=True)
    assert [m["name"] for m in info["members"]] == ["m", "seq_m"] and info["weights_mode"] == "fit"
    assert load_blend(run.parent.parent / "blends" / "m.json")["fold_weights"] == info["fold_weights"]
    assert sorted(info["fold_weights"]) == ["0", "1", "2"]
    for f in range(K):
        got = np.array([info["fold_weights"][str(f)][n] for n in ("m", "seq_m")]).T
        np.testing.assert_allclose(got, want_w[f], atol=2e-3, err_msg=f"fold {f}")
    assert info["scores"]["blend, cross-fitted"]["weighted_log_loss"] == pytest.approx(honest, abs=1e-4)


def test_the_report_and_the_card_carry_the_honest_figure(tmp_path):
    """src.evaluate's report applies the file's fold weights, and the model card (what the demo shows) quotes it."""
    from src.card import run_card
    from src.evaluate import evaluate_runs
    from src.runs import Run
    run, _, honest = family(tmp_path)
    info = fit_blend([run], quiet=True)
    s = evaluate_runs([run], tmp_path / "report", stage1_only=False, resamples=10)
    assert s["runs"]["blend, cross-fitted"]["weighted_log_loss"] == pytest.approx(honest, abs=1e-4)
    assert s["runs"]["blend, cross-fitted"]["weighted_log_loss"] == pytest.approx(
        info["scores"]["blend, cross-fitted"]["weighted_log_loss"], rel=1e-12)
    card = run_card(Run(run))  # RUN/card.json, written by the report
    assert card["stage"] == "blend of stage1, seq, per-class weights"
    assert card["oof_weighted_log_loss"] == pytest.approx(honest, abs=1e-4)
