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


def test_each_weights_mode_and_the_shrink():
    """equal: 1/M; best: the member with the lowest metric alone (every class); fit-global: one row for every class;
    shrink S: that share of the way from the fitted weights toward equal; an unknown mode: one clear error."""
    from src.blend import MODES, fit_weights, weights_for
    from src.utils import PipelineError
    y, preds, _ = members_data(2)
    third = np.full_like(preds[0], 0.3)
    members = [preds[0], preds[1], third]
    np.testing.assert_array_equal(weights_for("equal", y, members), np.full((6, 3), 1 / 3))
    best = int(np.argmin([metric(y, p) for p in members]))
    assert best == 1  # member b is sharp on two folds of three
    np.testing.assert_array_equal(weights_for("best", y, members), np.tile(np.eye(3)[best], (6, 1)))
    fit = weights_for("fit", y, members)
    np.testing.assert_array_equal(fit, fit_weights(y, members))
    assert np.allclose(fit.sum(1), 1) and (fit >= 0).all()
    glob = weights_for("fit-global", y, members)
    np.testing.assert_array_equal(glob, fit_weights(y, members, per_class=False))
    assert (glob == glob[0]).all()
    for s in (0.25, 1.0):
        np.testing.assert_allclose(weights_for("fit", y, members, shrink=s), (1 - s) * fit + s / 3, atol=1e-15)
    fw = fold_weights("fit", y, members, np.arange(N) % K, shrink=0.5)
    for f, w in fw.items():
        other = np.arange(N) % K != f
        np.testing.assert_allclose(w, 0.5 * fit_weights(y[other], [m[other] for m in members]) + 0.5 / 3, atol=1e-15)
    with pytest.raises(PipelineError, match="^--weights must be one of fit, fit-global, equal, best, not 'mean'$"):
        weights_for("mean", y, members)
    assert MODES == ("fit", "fit-global", "equal", "best")


def test_the_blend_file_whole_and_when_it_is_fitted_again(tmp_path, capsys):
    """Every field of the blend file against values computed here (member scores: scikit-learn); its printout; the
    same members again: reused, not rewritten; another mode: stopped naming the change, unless overwrite."""
    from sklearn.metrics import roc_auc_score

    from src.utils import PipelineError
    run, want_w, honest = family(tmp_path)
    y, preds, folds = members_data(1)
    info = fit_blend([run], shrink=0.1)
    out = capsys.readouterr().out
    path = run.parent.parent / "blends" / "m.json"
    from src.blend import describe
    assert out.endswith(describe(info) + f"\nwrote {path}\n"), out
    assert set(info) == {"name", "weights_mode", "shrink", "oof_images", "members", "weights", "fold_weights", "scores",
                         "stamp"}
    assert (info["name"], info["weights_mode"], info["shrink"], info["oof_images"]) == ("m", "fit", 0.1, N)
    assert info["members"] == [{"name": "m", "path": str(run), "kind": "stage1"},
                               {"name": "seq_m", "path": str(run.parent / "seq_m"), "kind": "seq"}]
    assert load_blend(path) == info
    w = np.array([info["weights"]["m"], info["weights"]["seq_m"]]).T
    from src.blend import fit_weights
    np.testing.assert_allclose(w, 0.9 * fit_weights(y, preds) + 0.05, atol=1e-12)
    mixed = preds[0] * w[:, 0] + preds[1] * w[:, 1]
    for name, p in (("m", preds[0]), ("seq_m", preds[1]), ("blend", mixed)):
        assert info["scores"][name] == pytest.approx({"weighted_log_loss": metric(y, p),
                                                      "auc_any": roc_auc_score(y[:, 5], p[:, 5])}, abs=1e-9), name
    shrunk = {f: 0.9 * np.asarray(v) + 0.05 for f, v in want_w.items()}
    want = np.concatenate([preds[0][folds == f] * shrunk[f][:, 0] + preds[1][folds == f] * shrunk[f][:, 1]
                           for f in range(K)])
    order = np.concatenate([np.flatnonzero(folds == f) for f in range(K)])
    assert info["scores"]["blend, cross-fitted"]["weighted_log_loss"] == pytest.approx(metric(y[order], want), abs=1e-4)
    assert info["stamp"]["settings"] == {"weights": "fit", "members": ["m", "seq_m"], "shrink": 0.1}

    mtime = path.stat().st_mtime_ns
    assert fit_blend([run], shrink=0.1, quiet=True) == info and path.stat().st_mtime_ns == mtime
    with pytest.raises(PipelineError, match=r"(?s)the blend .*m\.json was made with other settings.*weights: fit -> equal"):
        fit_blend([run], weights="equal", shrink=0.1, quiet=True)
    assert path.stat().st_mtime_ns == mtime
    again = fit_blend([run], weights="equal", overwrite=True, quiet=True)
    assert again["weights"] == {"m": [0.5] * 6, "seq_m": [0.5] * 6} and load_blend(path) == again
    assert fit_blend([run], run.name, "equal", stage1_only=True, out_dir=tmp_path / "o1", quiet=True)["members"] == [
        {"name": "m", "path": str(run), "kind": "stage1"}]


def test_oof_table_keeps_the_shared_images_and_names_what_is_wrong():
    from src.blend import oof_table
    from src.utils import PipelineError
    ids = [f"ID_{i}" for i in range(6)]
    labels = pd.DataFrame(np.eye(6, dtype=int), index=ids, columns=CLASSES)

    def oof(rows, value, fold):
        return pd.DataFrame(value, index=[ids[i] for i in rows], columns=CLASSES).assign(fold=fold)
    a, b = oof([0, 1, 2, 3], 0.1, [0, 0, 1, 1]), oof([3, 2, 1, 5], 0.2, [9, 9, 9, 9])
    common, y, preds, folds = oof_table([a, b], labels)
    assert list(common) == ["ID_1", "ID_2", "ID_3"]  # in the first member's order
    np.testing.assert_array_equal(y, np.eye(6)[1:4])
    np.testing.assert_array_equal(preds[0], np.full((3, 6), 0.1))
    np.testing.assert_array_equal(preds[1], np.full((3, 6), 0.2))
    assert folds.tolist() == [0, 1, 1]  # the first member's folds
    with pytest.raises(PipelineError, match=r"^the members' OOF predictions share no image: were they trained on the "
                                            r"same folds\?$"):
        oof_table([oof([0], 0.1, 0), oof([1], 0.1, 0)], labels)
    with pytest.raises(PipelineError, match=r"^1 OOF image\(s\) have no labels, e.g. \['ID_x'\]$"):
        oof_table([pd.concat([a, pd.DataFrame(0.1, index=["ID_x"], columns=CLASSES).assign(fold=0)])], labels)
