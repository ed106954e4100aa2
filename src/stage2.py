"""What both stage-2 models share: their inputs (stage 1's out-of-fold and test outputs, leak-checked, ordered
into series) and the per-fold skeleton (naming, fingerprint guard, config, log, outputs in stage 1's format).

    python -m src.sequence --stage1 RUN --fold K      # the GRU over each series (src/sequence.py)
    python -m src.boost --stage1 RUN --fold K         # boosted trees on each slice in context (src/boost.py)

No leakage. Every stage-2 input of an image is a stage-1 output from a model that never trained on that image:
train and validation rows use the stage-1 OOF files (image in fold j <- stage-1 model of fold j), stage-2 fold K
trains on folds != K and is validated on fold K, and its test inputs are the test outputs of stage-1 fold K.
`check_no_leak` checks this from the files and refuses otherwise.

Outputs of a stage-2 fold, in OUT/runs/<kind>_<stage-1 run>/fold<K>/ (src.layout): fingerprint.json, config.yaml,
train.log, the model's own files, test.csv (test images outside any readable series keep their stage-1
prediction) and, last, oof.csv: src.evaluate, src.blend and src.make_submission treat a stage-2 run as one more run.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from . import layout
from .config import result_settings, save_yaml
from .labels import cached_labels
from .metrics import weighted_log_loss
from .cache import load_cache
from .runs import Run, load_folds
from .stamps import Stamp, guard
from .utils import CLASSES, PipelineError, get_logger, write_csv


def logit(p):
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))



@dataclass
class SeriesSet:
    """The slices of many series in flat arrays, series after series, each in z order."""
    ids: np.ndarray                   # (N,) image IDs
    emb: np.ndarray | None            # (N, E) float16 stage-1 embeddings, or None when unused
    logits: np.ndarray                # (N, 6) float32 stage-1 logits
    labels: np.ndarray | None         # (N, 6) float32, or None (test)
    starts: np.ndarray                # (S,) first row of each series
    lengths: np.ndarray               # (S,) slices per series

    def __len__(self):
        return len(self.starts)

    @classmethod
    def build(cls, preds: pd.DataFrame, emb, order: pd.DataFrame, labels: pd.DataFrame | None = None,
              rows=None) -> SeriesSet:
        """preds: stage-1 probabilities (index ID); emb: their embeddings, row rows[i] for preds row i (rows
        default: 0..n-1; emb may be a StackedRows of per-fold memory maps); order: SeriesInstanceUID and
        slice_index by ID. Slices without a series (unreadable) are left out. Embeddings are copied once."""
        m = order.reindex(preds.index)
        keep = np.flatnonzero(m["SeriesInstanceUID"].notna().to_numpy() & (m["SeriesInstanceUID"] != "").to_numpy())
        m = m.iloc[keep]
        srt = np.lexsort((m["slice_index"].to_numpy(), pd.factorize(m["SeriesInstanceUID"], sort=True)[0]))
        pos = keep[srt]
        uid = m["SeriesInstanceUID"].to_numpy()[srt]
        starts = np.flatnonzero(np.r_[True, uid[1:] != uid[:-1]]) if len(uid) else np.zeros(0, np.int64)
        ids = preds.index.to_numpy()[pos]
        src = pos if rows is None else np.asarray(rows)[pos]
        return cls(ids, None if emb is None else (emb.take(src) if isinstance(emb, StackedRows) else np.asarray(emb)[src]),
                   logit(preds[CLASSES].to_numpy()[pos]).astype(np.float32),
                   None if labels is None else labels.loc[ids, CLASSES].to_numpy(np.float32),
                   starts, np.diff(np.r_[starts, len(uid)]))


class StackedRows:
    """Several row arrays (the folds' memory-mapped embeddings) read as one, without concatenating them:
    at full scale the OOF embeddings are ~3 GB, and each copy of them costs as much."""

    def __init__(self, parts):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self):
        return int(self.starts[-1])

    def take(self, pos) -> np.ndarray:
        pos = np.asarray(pos, np.int64)
        out = np.empty((len(pos), self.parts[0].shape[1]), self.parts[0].dtype)
        which = np.searchsorted(self.starts, pos, side="right") - 1
        for k, part in enumerate(self.parts):
            sel = np.flatnonzero(which == k)
            if len(sel):
                out[sel] = part[pos[sel] - self.starts[k]]
        return out


@dataclass
class Stage1Inputs:
    """The stage-1 outputs a stage-2 fold may use (rows carry `source_fold`, the stage-1 fold that made them)."""
    oof: pd.DataFrame                 # every image's OOF probabilities (index ID)
    oof_emb: StackedRows | None       # their embeddings, rows in `oof` order (None when the model reads none)
    test: pd.DataFrame                # stage-1 fold K's test probabilities
    test_emb: np.ndarray | None
    folds: pd.Series                  # fold of each labelled image
    labels: pd.DataFrame
    order: pd.DataFrame               # SeriesInstanceUID and slice_index by ID, readable slices only


def check_no_leak(rows: pd.DataFrame, folds: pd.Series, fold: int, split: str) -> None:
    """Every stage-1 output used by stage-2 fold `fold` must come from a model that never saw the image."""
    if split == "test":
        bad = rows.index[rows["source_fold"] != fold]
        if len(bad):
            raise PipelineError(f"leak: test inputs of stage-2 fold {fold} must come from stage-1 fold {fold}; "
                                f"{len(bad)} do not, e.g. {list(bad[:3])}")
        return
    image_fold = folds.reindex(rows.index)
    unknown = rows.index[image_fold.isna()]
    if len(unknown):
        raise PipelineError(f"{len(unknown)} stage-1 OOF image(s) are not in the folds file, e.g. {list(unknown[:3])}")
    bad = np.flatnonzero(rows["source_fold"].to_numpy() != image_fold.to_numpy())
    if len(bad):
        i = bad[0]
        raise PipelineError(f"leak: {len(bad)} stage-1 input(s) come from a model trained on that image "
                            f"(e.g. {rows.index[i]}: image in fold {int(image_fold.iloc[i])}, output of stage-1 fold "
                            f"{int(rows['source_fold'].iloc[i])}); stage-2 inputs must be out-of-fold")


def stage1_inputs(stage1: Run, fold: int, with_emb=True) -> Stage1Inputs:
    """The stage-1 outputs stage-2 fold `fold` may use, leak-checked. Rows carry `source_fold`, the stage-1 fold
    that made them."""
    s1 = stage1.config()
    _, meta = load_cache(layout.cache_dir(s1["data_dir"], s1.get("out_dir")))
    order = meta[meta.status == "ok"].set_index("ID")[["SeriesInstanceUID", "slice_index"]]
    folds = load_folds(layout.run_folds_file(s1["data_dir"], s1["k"], s1["fold_seed"], s1.get("folds_file")))["fold"]
    labels, _ = cached_labels(s1["data_dir"], s1.get("out_dir"))
    parts, embs = [], []
    for k in stage1.folds():
        df, emb = stage1.fold_outputs("oof", k)
        parts.append(df[CLASSES].assign(source_fold=k))
        embs.append(emb)
    oof = pd.concat(parts)
    check_no_leak(oof, folds, fold, "oof")
    test, test_emb = stage1.fold_outputs("test", fold)
    test = test[CLASSES].assign(source_fold=fold)
    check_no_leak(test, folds, fold, "test")
    return Stage1Inputs(oof, StackedRows(embs) if with_emb else None, test, test_emb if with_emb else None, folds,
                        labels, order)



@dataclass
class FoldResult:
    """What a stage-2 model predicts for its fold: validation slices (the OOF rows) and test slices."""
    val_ids: np.ndarray
    val_probs: np.ndarray
    val_labels: np.ndarray
    val_stage1: np.ndarray            # stage 1's probabilities of the same slices, for the log
    test_ids: np.ndarray
    test_probs: np.ndarray


@dataclass
class FoldContext:
    """Where a stage-2 fold writes its own files, its log, and the stamp its checkpoint records."""
    run_dir: Path
    log: object
    stamp: Stamp


def run_fold(kind: str, cfg, fit: Callable, with_emb: bool = True, step: str | None = None) -> Path:
    """The skeleton of one stage-2 fold: name and guard it, save its config, call `fit(cfg, inputs, context)
    -> FoldResult`, and write its outputs (test.csv, then oof.csv, whose presence means the fold is finished)."""
    if not cfg.stage1:
        raise PipelineError("--stage1 RUN_DIR is required (a stage-1 run with OOF and test outputs)")
    stage1 = Run(cfg.stage1)
    run = Run(stage1.path.parent / cfg.run_name) if cfg.run_name else stage1.stage2(kind)
    run_dir = run.fold_dir(cfg.fold)
    stamp = Stamp(step or kind, result_settings(cfg), {"stage1": stage1.fingerprint()})
    if guard(stamp, run_dir / layout.STAMP, (run_dir / layout.FINISHED).exists(), cfg.overwrite,
             f"stage-2 fold {cfg.fold} of {run.name} ({run_dir})", clear=[run_dir]):
        return run_dir
    inputs = stage1_inputs(stage1, cfg.fold, with_emb)
    run_dir.mkdir(parents=True, exist_ok=True)
    stamp.save(run_dir / layout.STAMP)
    save_yaml(cfg, run_dir / layout.CONFIG)
    log = get_logger(f"{kind}.{run.name}.{cfg.fold}", run_dir / layout.LOG)
    r = fit(cfg, inputs, FoldContext(run_dir, log, stamp))
    oof = pd.DataFrame(r.val_probs, columns=CLASSES, index=pd.Index(r.val_ids, name="ID"))
    oof.insert(0, "fold", cfg.fold)
    test = pd.DataFrame(r.test_probs, columns=CLASSES, index=pd.Index(r.test_ids, name="ID"))
    rest = inputs.test.index.difference(test.index)  # test images outside any readable series keep stage 1's
    write_csv(pd.concat([test, inputs.test.loc[rest, CLASSES]]), run_dir / layout.TEST, float_format="%.6g")
    write_csv(oof, run_dir / layout.OOF, float_format="%.6g")  # last: its presence means the fold is finished
    log.info(f"stage 2 ({kind}) fold {cfg.fold}: val weighted log loss {weighted_log_loss(r.val_labels, r.val_probs):.5f} "
             f"(stage 1 on the same slices: {weighted_log_loss(r.val_labels, r.val_stage1):.5f}) -> {run_dir / layout.OOF}")
    return run_dir
