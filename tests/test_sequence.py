
import numpy as np
import pandas as pd
import pytest
import torch

from src.metrics import weighted_log_loss
from src.sequence import Batcher, SeqConfig, SeqFold, SeqModel, predict_series, train_sequence
from src.stage2 import SeriesSet, check_no_leak
from src.utils import CLASSES, PipelineError
from tests.conftest import write_stage1_run

K = 2


@pytest.fixture(scope="module")
def stage1(demo_data, demo_cache, tmp_path_factory):
    """A stage-1 run's files built by hand (conftest.write_stage1_run); embeddings are noisy copies of the labels."""
    return write_stage1_run(
        tmp_path_factory.mktemp("s1"), demo_data, demo_cache, K,
        oof_emb=lambda y, rng: (np.c_[y, y] + rng.normal(0, 2.0, (len(y), 12))).astype(np.float16),
        test_probs=lambda n, rng: np.full((n, len(CLASSES)), 0.1),
        test_emb=lambda n, rng: rng.normal(0, 1, (n, 12)).astype(np.float16))


def test_sequence_improves_on_noisy_stage1_and_writes_stage1_format(stage1):
    run, labels, folds, _ = stage1
    scores = []
    for k in range(K):
        d = train_sequence(SeqConfig(stage1=str(run), fold=k, epochs=25, hidden=32, seed=k))
        oof = pd.read_csv(d / "oof.csv").set_index("ID")
        s1 = pd.read_csv(run / f"fold{k}" / "oof.csv").set_index("ID").loc[oof.index]
        assert sorted(oof.index) == sorted(folds.index[folds.fold == k]) and (oof.fold == k).all()
        y = labels.loc[oof.index, CLASSES].to_numpy()
        scores.append((weighted_log_loss(y, oof[CLASSES].to_numpy()), weighted_log_loss(y, s1[CLASSES].to_numpy())))
        test = pd.read_csv(d / "test.csv").set_index("ID")
        assert len(test) == len(pd.read_csv(run / f"fold{k}" / "test.csv")) and list(test.columns) == CLASSES
    s2, s1 = np.mean(scores, axis=0)
    assert s2 < 0.9 * s1, scores  # neighbours help: the GRU beats the per-slice predictions


def test_leak_is_refused(stage1, tmp_path):
    run, labels, folds, _ = stage1
    oof0 = pd.read_csv(run / "fold0" / "oof.csv").set_index("ID")
    rows = oof0.assign(source_fold=0)
    check_no_leak(rows, folds["fold"], 1, "oof")  # fold-0 images from the fold-0 model: fine
    with pytest.raises(PipelineError, match="leak"):
        check_no_leak(rows.assign(source_fold=1), folds["fold"], 1, "oof")  # fold-0 images from a model trained on them
    with pytest.raises(PipelineError, match="leak: test inputs"):
        check_no_leak(rows.assign(source_fold=0), folds["fold"], 1, "test")
    # and from the files: a fold-1 OOF file that carries a fold-0 image is refused by the stage itself
    import shutil
    bad = tmp_path / "runs" / "bad"
    shutil.copytree(run, bad)
    o1 = pd.read_csv(bad / "fold1" / "oof.csv").set_index("ID")
    moved = oof0.iloc[:1].assign(fold=1)
    pd.concat([o1, moved]).to_csv(bad / "fold1" / "oof.csv")
    e1 = np.load(bad / "fold1" / "oof_emb.npy")
    np.save(bad / "fold1" / "oof_emb.npy", np.concatenate([e1, e1[:1]]))
    with pytest.raises(PipelineError, match="leak"):
        train_sequence(SeqConfig(stage1=str(bad), fold=0, epochs=1))


def series_set(lengths, emb_dim=4, seed=0):
    rng = np.random.default_rng(seed)
    n = sum(lengths)
    return SeriesSet(np.arange(n), rng.normal(size=(n, emb_dim)).astype(np.float16), rng.normal(size=(n, 6)).astype(np.float32),
                     None, np.r_[0, np.cumsum(lengths)[:-1]], np.array(lengths))


def test_padding_and_reverse_tta_are_exact():
    torch.manual_seed(0)
    m = SeqModel(4, hidden=8, layers=2, dropout=0.0)
    torch.nn.init.normal_(m.head.weight)  # not the zero init, so the GRU matters
    s = series_set([3, 7, 5])
    together = predict_series(m, Batcher(s, "cpu"), tta_reverse=False)
    for a, L in zip(s.starts, s.lengths):  # padding does not leak into shorter series
        alone = SeriesSet(s.ids[a:a + L], s.emb[a:a + L], s.logits[a:a + L], None, np.array([0]), np.array([L]))
        assert np.allclose(predict_series(m, Batcher(alone, "cpu"), tta_reverse=False), together[a:a + L], atol=1e-6)
    rev = SeriesSet(s.ids, np.concatenate([s.emb[a:a + L][::-1] for a, L in zip(s.starts, s.lengths)]),
                    np.concatenate([s.logits[a:a + L][::-1] for a, L in zip(s.starts, s.lengths)]), None, s.starts, s.lengths)
    fwd_rev = predict_series(m, Batcher(rev, "cpu"), tta_reverse=False)
    tta = predict_series(m, Batcher(s, "cpu"), tta_reverse=True)
    for a, L in zip(s.starts, s.lengths):
        assert np.allclose(tta[a:a + L], (together[a:a + L] + fwd_rev[a:a + L][::-1]) / 2, atol=1e-6)
    emb, lg, y, mask, lengths, rows = Batcher(s, "cpu").batch(np.array([0, 1]), np.array([False, True]))
    assert emb.shape == (2, 7, 4) and int(mask.sum()) == 10 and lengths.tolist() == [3, 7]
    assert rows[1].tolist() == list(range(9, 2, -1)) and rows[0].tolist()[3:] == [15] * 4  # reversed; padding -> N


def test_series_are_built_in_z_order_from_any_row_order():
    order = pd.DataFrame({"SeriesInstanceUID": ["b", "a", "b", "a", "b"], "slice_index": [2, 1, 0, 0, 1]},
                         index=pd.Index(["i0", "i1", "i2", "i3", "i4"], name="ID"))
    preds = pd.DataFrame(0.5, index=order.index[::-1], columns=CLASSES)
    emb = np.arange(5)[::-1, None].astype(np.float16)  # emb row i belongs to preds row i
    s = SeriesSet.build(preds, emb, order)
    assert s.ids.tolist() == ["i3", "i1", "i2", "i4", "i0"] and s.lengths.tolist() == [2, 3]
    assert s.emb[:, 0].tolist() == [3, 1, 2, 4, 0]


def test_zero_init_head_starts_at_stage1():
    m = SeqModel(4, hidden=8)
    s = SeriesSet(np.arange(4), np.zeros((4, 4), np.float16), np.full((4, 6), 0.3, np.float32), None, np.array([0]), np.array([4]))
    assert np.allclose(predict_series(m, Batcher(s, "cpu")), 1 / (1 + np.exp(-0.3)))


def test_early_stopping_and_rerun(stage1):
    """Training stops `patience` epochs after the best one, well before the epoch cap (fails when early stopping is
    disabled: all 30 epochs run), and the best epoch's weights are the ones kept."""
    run, labels, folds, ok = stage1
    d = train_sequence(SeqConfig(stage1=str(run), fold=0, epochs=30, patience=2, lr=0.05, hidden=16, run_name="es"))
    e = pd.read_csv(d / "epochs.csv")
    best = int(e["val_wll"].idxmin())
    assert len(e) == best + 1 + 2 < 30  # stopped 2 epochs after the best
    assert (e["val_wll"].iloc[best + 1:] >= e["val_wll"].iloc[best] - 1e-6).all()  # no better epoch after it
    assert f"early stop after epoch {len(e)}: no improvement for 2 epochs" in (d / "train.log").read_text()
    ck = torch.load(d / "best.pth", weights_only=True)
    assert ck["epoch"] == best + 1
    mtime = (d / "oof.csv").stat().st_mtime_ns
    train_sequence(SeqConfig(stage1=str(run), fold=0, epochs=30, patience=2, lr=0.05, hidden=16, run_name="es"))
    assert (d / "oof.csv").stat().st_mtime_ns == mtime  # same settings and inputs: up to date
    with pytest.raises(PipelineError, match="hidden: 16 -> 24"):
        train_sequence(SeqConfig(stage1=str(run), fold=0, epochs=30, patience=2, lr=0.05, hidden=24, run_name="es"))
    # the saved fold predicts new series like the pipeline did: SeqFold on fold 0's validation series
    sf = SeqFold.load(d)
    oof = pd.read_csv(d / "oof.csv", index_col="ID")
    s1 = pd.read_csv(run / "fold0" / "oof.csv", index_col="ID")
    emb = np.load(run / "fold0" / "oof_emb.npy")
    g = ok.loc[oof.index].sort_values(["SeriesInstanceUID", "slice_index"]).groupby("SeriesInstanceUID")
    series = [g_.index for _, g_ in g]
    pos = [s1.index.get_indexer(ids) for ids in series]
    got = sf.predict([(emb[p], s1[CLASSES].to_numpy()[p]) for p in pos])
    for ids, p in zip(series, got):
        assert np.allclose(p, oof.loc[ids, CLASSES].to_numpy(), atol=1e-5)


def test_stacked_rows_read_like_their_concatenation():
    from src.stage2 import StackedRows
    parts = [np.arange(12).reshape(4, 3), np.arange(12, 21).reshape(3, 3), np.zeros((0, 3), int)]
    pos = np.array([6, 0, 4, 3, 5, 6])
    assert np.array_equal(StackedRows(parts).take(pos), np.concatenate(parts)[pos])
