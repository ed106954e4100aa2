"""Stage 2 beside the GRU: gradient-boosted trees (LightGBM) on each slice's stage-1 predictions in context.

    python -m src.boost --stage1 outputs/demo/runs/resnet10t_128 --fold 0
    python -m src.boost --stage1 outputs/demo/runs/resnet10t_128 --fold 0 --context 3 --learning-rate 0.03

Features of a slice (as the 3rd-place team and appian42 did): its six stage-1 probabilities, those of its
neighbours at -context..-1 and +1..+context in z order within its series (NaN past the series' ends:
LightGBM learns where missing values go), the series' maximum and mean per class, its position in the
series (0 at the first slice, 1 at the last) and the series' length. They are computed at once from the
flat series-ordered arrays of a SeriesSet (no loop over series: ~870k slices in ~22k series at full size).
One binary model per class reads all features (a subtype's model sees `any` and the others). By default
(`--residual`) a class's trees start from the slice's stage-1 logit (LightGBM's init_score) and learn a
correction, like the GRU's zero-initialised head: a class with no positive training slice stays near stage 1
instead of collapsing to 0, and on a synthetic set it reached a slightly lower loss than starting from the
mean.

Early stopping: each class adds trees while the log loss of the validation fold improves, stopping after
`--patience` rounds without improvement, and keeps the best number of trees; the validation fold thus
chooses the number of trees, as it chooses the GRU's epoch and stage 1's best epoch.

Speed, on one CPU thread: a fold of a synthetic set of 100k slices in 3k series takes ~25 s (6 classes,
190-330 trees each), one of 725k slices in 22k series (the full set's size) ~3.5 min; the features 0.02 s and
0.6 s of it. LightGBM's OpenMP threads busy-wait, so where other jobs share the cores `--threads 1` can beat
all cores several times over (2 shared cores: 25 s against 174 s, the same trees).

Inputs, leakage checks and the per-fold skeleton are src/stage2.py's, shared with the GRU. Outputs in
OUT/runs/boost_<stage-1 run>/fold<K>/: fingerprint.json, config.yaml, train.log, model_<class>.txt (LightGBM text
models, best number of trees), trees.csv (per class: trees kept, validation log loss, stage 1's on the same
slices, seconds), test.csv and oof.csv in stage 1's format. `BoostFold` predicts new series from their stage-1
probabilities.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd
import yaml

from . import layout
from .config import parse_config
from .metrics import per_class_log_loss
from .stage2 import FoldContext, FoldResult, SeriesSet, Stage1Inputs, logit, run_fold
from .utils import CLASSES, PipelineError, atomic_path, cli_main, write_csv

TREES = "trees.csv"


@dataclass
class BoostConfig:
    stage1: str = ""                  # stage-1 run folder (fold*/oof.csv, test.csv and their embeddings)
    fold: int = 0                     # validation fold: chooses the number of trees and gets the OOF predictions
    run_name: str = ""                # default boost_<stage-1 run name>, beside the stage-1 run
    context: int = 2                  # neighbours each side whose probabilities are features (+-1 .. +-context)
    learning_rate: float = 0.05       # shrinkage per tree: small enough that early stopping lands on a flat optimum
    num_leaves: int = 31              # leaves per tree (LightGBM's default)
    min_child_samples: int = 50       # fewest slices in a leaf: a leaf rests on several series, not one
    feature_fraction: float = 0.8     # share of features drawn per tree (neighbour features are redundant)
    lambda_l2: float = 0.0            # L2 penalty on leaf values
    residual: bool = True             # trees start from stage 1's logit and learn a correction (as the GRU does)
    max_trees: int = 1000             # at most, per class; early stopping usually ends sooner
    patience: int = 50                # stop a class after this many trees without a better validation loss
    seed: int = 0                     # LightGBM's seed (feature sampling); training is deterministic given it
    threads: int = 0                  # LightGBM threads; 0: all cores (run control, not in the fingerprint)
    overwrite: bool = False           # redo a fold made with other settings or inputs (else: stop and say)

    def __post_init__(self):
        if self.context < 0 or self.max_trees < 1 or self.patience < 1:
            raise PipelineError("context must be >= 0, max_trees and patience >= 1")
        if not 0 < self.feature_fraction <= 1:
            raise PipelineError("feature_fraction must be in (0, 1]")


def feature_names(context=2) -> list[str]:
    """Column names of `slice_features`, in order."""
    offsets = [*range(-context, 0), *range(1, context + 1)]
    blocks = ["p", *(f"{'prev' if d < 0 else 'next'}{abs(d)}" for d in offsets), "series_max", "series_mean"]
    return [f"{b}_{c}" for b in blocks for c in CLASSES] + ["position", "length"]


def slice_features(p: np.ndarray, starts: np.ndarray, lengths: np.ndarray, context=2) -> np.ndarray:
    """(N, F) float32 features of stage-1 probabilities p (N, 6) whose rows are series after series in z
    order (a SeriesSet's starts and lengths), columns as `feature_names`."""
    p = np.asarray(p, np.float32)
    n = len(p)
    if n == 0:
        return np.zeros((0, len(feature_names(context))), np.float32)
    length = np.repeat(lengths, lengths)
    i = np.arange(n) - np.repeat(starts, lengths)  # position within the series
    cols = [p]
    for d in [*range(-context, 0), *range(1, context + 1)]:
        inside = ((i + d >= 0) & (i + d < length))[:, None]
        cols.append(np.where(inside, p[np.clip(np.arange(n) + d, 0, n - 1)], np.nan))
    cols.append(np.repeat(np.maximum.reduceat(p, starts), lengths, axis=0))
    cols.append(np.repeat(np.add.reduceat(p, starts, dtype=np.float64) / lengths[:, None], lengths, axis=0))
    cols.append((i / np.maximum(length - 1, 1))[:, None])  # a one-slice series is at 0
    cols.append(length[:, None])
    return np.concatenate(cols, axis=1, dtype=np.float32)


def series_features(preds: pd.DataFrame, order: pd.DataFrame, labels=None, context=2):
    """(SeriesSet of the rows that belong to a series, their stage-1 probabilities (N, 6), features (N, F))."""
    s = SeriesSet.build(preds, None, order, labels)
    p = preds.loc[s.ids, CLASSES].to_numpy(np.float32)
    return s, p, slice_features(p, s.starts, s.lengths, context)


def lgb_params(cfg: BoostConfig) -> dict:
    return {"objective": "binary", "metric": "binary_logloss", "learning_rate": cfg.learning_rate,
            "num_leaves": cfg.num_leaves, "min_child_samples": cfg.min_child_samples,
            "feature_fraction": cfg.feature_fraction, "lambda_l2": cfg.lambda_l2, "seed": cfg.seed,
            # the same inputs give the same trees; row-wise histograms skip LightGBM's timing-based choice
            "deterministic": True, "force_row_wise": True, "num_threads": cfg.threads, "verbosity": -1}


def predict_classes(models: list[lgb.Booster], X: np.ndarray, p: np.ndarray, residual: bool) -> np.ndarray:
    """(N, 6) probabilities of the per-class models (each saved with its best number of trees)."""
    if not len(X):
        return np.zeros((0, len(CLASSES)))
    raw = np.stack([m.predict(X, raw_score=True) for m in models], axis=1)
    return 1 / (1 + np.exp(-(raw + logit(p) if residual else raw)))


def fit_classes(cfg: BoostConfig, Xtr, ytr, ptr, Xva, yva, pva) -> list[tuple[lgb.Booster, float]]:
    """One booster per class on (features, labels, stage-1 probabilities) of the training slices, early-stopped
    on the validation slices: [(booster, seconds)], CLASSES order; booster.best_iteration is the number of trees."""
    params = lgb_params(cfg)
    # binned once, relabelled per class: the bins depend on the features only
    dtr = lgb.Dataset(Xtr, np.zeros(len(Xtr)), feature_name=feature_names(cfg.context), params=params).construct()
    dva = lgb.Dataset(Xva, np.zeros(len(Xva)), reference=dtr, params=params).construct()
    col = lambda a, c: np.ascontiguousarray(a[:, c], np.float64)  # noqa: E731  (LightGBM copies strided columns)
    ltr, lva = logit(ptr), logit(pva)
    out = []
    for c in range(len(CLASSES)):
        t0 = time.time()
        dtr.set_label(col(ytr, c)), dva.set_label(col(yva, c))
        if cfg.residual:
            dtr.set_init_score(col(ltr, c)), dva.set_init_score(col(lva, c))
        m = lgb.train(params, dtr, cfg.max_trees, valid_sets=[dva],
                      callbacks=[lgb.early_stopping(cfg.patience, first_metric_only=True, verbose=False)])
        out.append((m, time.time() - t0))
    return out


def fit(cfg: BoostConfig, inputs: Stage1Inputs, ctx: FoldContext) -> FoldResult:
    """One booster per class for a fold, saved as LightGBM text; predictions by the saved models, as the API makes."""
    t0 = time.time()
    oof, order = inputs.oof, inputs.order
    in_val = (inputs.folds.reindex(oof.index) == cfg.fold).to_numpy()
    tr, ptr, Xtr = series_features(oof[~in_val], order, inputs.labels, cfg.context)
    va, pva, Xva = series_features(oof[in_val], order, inputs.labels, cfg.context)
    te, pte, Xte = series_features(inputs.test, order, context=cfg.context)
    ctx.log.info(f"stage 2 (boost) fold {cfg.fold}: {len(tr.ids)} train slices in {len(tr)} series / {len(va.ids)} in "
                 f"{len(va)} val / {len(te.ids)} in {len(te)} test, {Xtr.shape[1]} features, from {cfg.stage1}")
    rows = []
    for name, (m, sec) in zip(CLASSES, fit_classes(cfg, Xtr, tr.labels, ptr, Xva, va.labels, pva)):
        with atomic_path(ctx.run_dir / f"model_{name}.txt") as tmp:
            m.save_model(tmp, num_iteration=m.best_iteration)
        rows.append({"class": name, "trees": m.best_iteration, "seconds": round(sec, 2)})
    fold = BoostFold.load(ctx.run_dir)  # predict with the saved models, as the Python API will
    p = fold.predict_flat(Xva, pva)
    for r, loss, loss1 in zip(rows, per_class_log_loss(va.labels, p), per_class_log_loss(va.labels, pva)):
        r.update(val_log_loss=loss, stage1_val_log_loss=loss1)
    write_csv(pd.DataFrame(rows), ctx.run_dir / TREES, index=False, float_format="%.6g")
    ctx.log.info("trees per class: " + ", ".join(f"{r['class']} {r['trees']}" for r in rows)
                 + f"; features and fit {time.time() - t0:.1f}s")
    return FoldResult(va.ids, p, va.labels, pva, te.ids, fold.predict_flat(Xte, pte))


def train_boost(cfg: BoostConfig) -> Path:
    return run_fold("boost", cfg, fit, with_emb=False)


@dataclass
class BoostFold:
    """One trained boosted stage-2 fold, for prediction on new series (like sequence.SeqFold)."""
    name: str                         # fold<K>: the stage-1 fold whose outputs it reads
    models: list[lgb.Booster]         # one per class, CLASSES order
    config: dict

    @classmethod
    def load(cls, fold_dir) -> BoostFold:
        d = Path(fold_dir)
        return cls.from_texts(d.name, yaml.safe_load((d / layout.CONFIG).read_text()),
                              [(d / f"model_{c}.txt").read_text() for c in CLASSES], d)

    @classmethod
    def from_texts(cls, name: str, config: dict, texts: list[str], where="") -> BoostFold:
        """A fold from its config and its LightGBM text models (CLASSES order): a fold folder, or a bundle."""
        models = [lgb.Booster(model_str=t) for t in texts]
        if models[0].feature_name() != feature_names(config["context"]):
            raise PipelineError(f"{where or name}: the models' features are not this version's; retrain with --overwrite")
        return cls(name, models, config)

    def predict_flat(self, X: np.ndarray, p: np.ndarray) -> np.ndarray:
        """(N, 6) probabilities from features X and stage-1 probabilities p (float32) of series-ordered slices."""
        return predict_classes(self.models, X, p, self.config["residual"])

    def predict(self, series: list[np.ndarray]) -> list[np.ndarray]:
        """series: [stage-1 probabilities (L, 6) of a series' slices in z order] -> [(L, 6)]."""
        lengths = np.array([len(p) for p in series], np.int64)
        starts = np.cumsum(lengths) - lengths
        p = np.concatenate(series) if series else np.zeros((0, len(CLASSES)))
        p = np.asarray(p, np.float32)  # as in training: the residual's logit of the same float32 values
        full = lengths > 0  # an empty series adds no row; left in, it would break the per-series reductions
        out = self.predict_flat(slice_features(p, starts[full], lengths[full], self.config["context"]), p)
        return [out[a:a + n] for a, n in zip(starts, lengths)]


def main():
    train_boost(parse_config(BoostConfig, description=__doc__, prog="python -m src.boost"))


if __name__ == "__main__":
    cli_main(main)
