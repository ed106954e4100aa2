import shutil

import numpy as np
import pandas as pd
import pytest

from src.boost import BoostConfig, BoostFold, feature_names, series_features, train_boost
from src.make_submission import make_submission
from src.evaluate import evaluate_runs
from src.metrics import weighted_log_loss
from src.stage2 import check_no_leak
from src.utils import CLASSES, PipelineError
from tests.conftest import write_stage1_run

K = 2
SMALL = dict(min_child_samples=5, num_leaves=7, learning_rate=0.1, patience=20, threads=1)  # ~60 training slices


@pytest.fixture(scope="module")
def stage1(demo_data, demo_cache, tmp_path_factory):
    """A stage-1 run's files built by hand (conftest.write_stage1_run); the booster reads no embeddings."""
    return write_stage1_run(tmp_path_factory.mktemp("s1"), demo_data, demo_cache, K,
                            oof_emb=lambda y, rng: np.zeros((len(y), 2), np.float16),
                            test_probs=lambda n, rng: rng.uniform(0, 0.3, (n, len(CLASSES))),
                            test_emb=lambda n, rng: np.zeros((n, 2), np.float16))


@pytest.fixture(scope="module")
def boosted(stage1):
    run = stage1[0]
    return [train_boost(BoostConfig(stage1=str(run), fold=k, **SMALL)) for k in range(K)]


def test_features_by_hand():
    # series a: i3, i1 (z order); series b: i2, i4, i0; i5 has no series. Rows shuffled.
    order = pd.DataFrame({"SeriesInstanceUID": ["b", "a", "b", "a", "b", ""], "slice_index": [2, 1, 0, 0, 1, 0]},
                         index=pd.Index([f"i{j}" for j in range(6)], name="ID"))
    v = {"i0": .1, "i1": .2, "i2": .3, "i3": .4, "i4": .5, "i5": .6}
    preds = pd.DataFrame({c: [v[i] + j / 100 for i in v] for j, c in enumerate(CLASSES)}, index=list(v)).iloc[::-1]
    s, p, X = series_features(preds, order)
    assert s.ids.tolist() == ["i3", "i1", "i2", "i4", "i0"] and s.lengths.tolist() == [2, 3]
    n = np.nan
    # per slice: p, prev2, prev1, next1, next2, series max, series mean (class 0; class j adds j/100), position, length
    want = {"i3": ([.4, n, n, .2, n, .4, .3], 0, 2), "i1": ([.2, n, .4, n, n, .4, .3], 1, 2),
            "i2": ([.3, n, n, .5, .1, .5, .3], 0, 3), "i4": ([.5, n, .3, .1, n, .5, .3], .5, 3),
            "i0": ([.1, .3, .5, n, n, .5, .3], 1, 3)}
    got = pd.DataFrame(X, index=s.ids, columns=feature_names(2))
    for i, (blocks, pos, length) in want.items():
        expect = [b + j / 100 for b in blocks for j in range(6)] + [pos, length]
        np.testing.assert_allclose(got.loc[i].to_numpy(), expect, rtol=1e-6, atol=1e-6, err_msg=i)
    assert np.allclose(p, preds.loc[s.ids, CLASSES].to_numpy())
    # one neighbour each side: the same values, the outer ones left out
    X1 = pd.DataFrame(series_features(preds, order, context=1)[2], index=s.ids, columns=feature_names(1))
    assert np.allclose(X1, got[feature_names(1)], equal_nan=True)


def test_leak_is_refused(stage1, tmp_path):
    run, labels, folds, _ = stage1
    bad = tmp_path / "runs" / "bad"
    shutil.copytree(run, bad)
    o0, o1 = (pd.read_csv(bad / f"fold{k}" / "oof.csv", index_col="ID") for k in range(K))
    # an OOF file of fold 1 that carries a fold-0 image: its output comes from a model trained on that image
    pd.concat([o1, o0.iloc[:1].assign(fold=1)]).to_csv(bad / "fold1" / "oof.csv")
    np.save(bad / "fold1" / "oof_emb.npy", np.zeros((len(o1) + 1, 2), np.float16))
    with pytest.raises(PipelineError, match="leak: 1 stage-1 input"):
        train_boost(BoostConfig(stage1=str(bad), fold=0, **SMALL))
    assert not (tmp_path / "runs" / "boost_bad").exists()  # refused before anything was written
    # test inputs: fold K's own; another fold's are refused, and without fold K's file it stops rather than borrow
    check_no_leak(o0.assign(source_fold=1), folds["fold"], 1, "test")
    with pytest.raises(PipelineError, match="leak: test inputs"):
        check_no_leak(o0.assign(source_fold=0), folds["fold"], 1, "test")
    shutil.copy(run / "fold1" / "oof.csv", bad / "fold1" / "oof.csv")
    shutil.copy(run / "fold1" / "oof_emb.npy", bad / "fold1" / "oof_emb.npy")
    (bad / "fold1" / "test.csv").unlink()
    with pytest.raises(PipelineError, match="fold1: missing"):
        train_boost(BoostConfig(stage1=str(bad), fold=1, **SMALL))
    assert not (tmp_path / "runs" / "boost_bad").exists()


def test_outputs_in_stage1_format_and_better_than_stage1(stage1, boosted, tmp_path):
    run, labels, folds, ok = stage1
    scores, oofs = [], []
    for k, d in enumerate(boosted):
        oof = pd.read_csv(d / "oof.csv", index_col="ID")
        assert sorted(oof.index) == sorted(folds.index[folds.fold == k]) and (oof.fold == k).all()
        assert list(oof.columns) == ["fold", *CLASSES] and ((oof[CLASSES] >= 0) & (oof[CLASSES] <= 1)).all().all()
        test = pd.read_csv(d / "test.csv", index_col="ID")
        assert sorted(test.index) == sorted(ok.index[ok.split == "test"]) and list(test.columns) == CLASSES
        trees = pd.read_csv(d / "trees.csv")
        assert trees["class"].tolist() == CLASSES and (trees.trees >= 1).all()
        assert all((d / f"model_{c}.txt").exists() for c in CLASSES)
        y = labels.loc[oof.index, CLASSES].to_numpy()
        s1 = pd.read_csv(run / f"fold{k}" / "oof.csv", index_col="ID").loc[oof.index, CLASSES].to_numpy()
        scores.append((weighted_log_loss(y, oof[CLASSES].to_numpy()), weighted_log_loss(y, s1)))
        oofs.append(oof)
    s2, s1 = np.mean(scores, axis=0)
    assert s2 < s1, scores  # neighbours and series statistics help: the trees beat the per-slice predictions
    boost_run = boosted[0].parent
    summary = evaluate_runs([run, boost_run], tmp_path / "report")
    pooled = pd.concat(oofs)
    assert summary["runs"]["boost_s1"]["weighted_log_loss"] == pytest.approx(
        weighted_log_loss(labels.loc[pooled.index, CLASSES].to_numpy(), pooled[CLASSES].to_numpy()))
    info = make_submission([run, boost_run], "t", submissions_dir=tmp_path / "sub", out_dir=tmp_path / "out", quiet=True)
    assert [m["run"] for m in info["members"]] == [str(run), str(boost_run)]
    assert info["test_images"] == (ok.split == "test").sum()


def test_rerun_is_skipped_and_other_settings_stop(stage1, boosted):
    run, d = stage1[0], boosted[0]
    mtime = (d / "oof.csv").stat().st_mtime_ns
    train_boost(BoostConfig(stage1=str(run), fold=0, **{**SMALL, "threads": 2}))  # threads: how, not what
    assert (d / "oof.csv").stat().st_mtime_ns == mtime
    with pytest.raises(PipelineError, match="num_leaves: 7 -> 15"):
        train_boost(BoostConfig(stage1=str(run), fold=0, **{**SMALL, "num_leaves": 15}))
    assert (d / "oof.csv").stat().st_mtime_ns == mtime


def test_boost_fold_predicts_new_series_as_the_pipeline_did(stage1, boosted):
    run, _, _, ok = stage1
    d = boosted[0]
    oof = pd.read_csv(d / "oof.csv", index_col="ID")
    s1 = pd.read_csv(run / "fold0" / "oof.csv", index_col="ID")
    g = ok.loc[oof.index].sort_values(["SeriesInstanceUID", "slice_index"]).groupby("SeriesInstanceUID")
    series = [ids.index for _, ids in g][::-1]  # any order of series; slices in z order
    got = BoostFold.load(d).predict([s1.loc[ids, CLASSES].to_numpy() for ids in series])
    for ids, p in zip(series, got):
        assert np.allclose(p, oof.loc[ids, CLASSES].to_numpy(), atol=1e-5)

