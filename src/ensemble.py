"""Blend runs (stage 1 models and stage 2 sequence models) into a Kaggle submission.

    python -m src.ensemble outputs/demo/runs/resnet10t_128 outputs/demo/runs/seq_resnet10t_128 --name demo
    python -m src.ensemble RUN_A RUN_B --weights equal --name ab

Each member's test prediction is the mean of its folds' test.csv; its OOF prediction is its folds'
oof.csv joined. Weights are equal, or fitted on the OOF predictions to minimise the weighted log loss
(non-negative, summing to 1; scipy SLSQP from equal weights; the loss is convex in the weights, and the
fit is kept only if it is at least as good as every single member and the equal blend). The blend is
clipped and written atomically to submissions/stage_2_<name>.csv in the sample submission's exact
order; the weights and scores go to OUT/ensemble/<name>.json.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from . import submission
from .evaluate import fold_dirs, load_oof, run_config
from .labels import read_labels
from .metrics import weighted_log_loss
from .utils import CLASSES, ROOT, PipelineError, cli_main, dataset_tag, out_root, write_json


def load_test(run_dir) -> pd.DataFrame:
    """Mean of the folds' test predictions of a run (index ID, six columns)."""
    parts = [pd.read_csv(d / "test.csv", dtype={"ID": str}).set_index("ID")[CLASSES]
             for d in fold_dirs(run_dir) if (d / "test.csv").exists()]
    if not parts:
        raise PipelineError(f"{run_dir}: no fold*/test.csv; run `python -m src.predict {run_dir}` (or the sequence stage) first")
    ids = parts[0].index
    for p in parts[1:]:
        if not p.index.sort_values().equals(ids.sort_values()):
            raise PipelineError(f"{run_dir}: the folds' test.csv files cover different images")
    return sum(p.loc[ids] for p in parts) / len(parts)


def fit_weights(y: np.ndarray, preds: list[np.ndarray]) -> np.ndarray:
    """Non-negative weights summing to 1 that minimise the weighted log loss of the blend."""
    m = len(preds)
    if m == 1:
        return np.ones(1)
    stack = np.stack(preds)
    loss = lambda w: weighted_log_loss(y, np.tensordot(w, stack, axes=1))  # noqa: E731
    res = minimize(loss, np.full(m, 1 / m), method="SLSQP", bounds=[(0, 1)] * m,
                   constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}], options={"ftol": 1e-10, "maxiter": 200})
    w = np.clip(res.x, 0, None)
    w = w / w.sum()
    candidates = [w, np.full(m, 1 / m), *np.eye(m)]
    return min(candidates, key=loss)


def ensemble(run_dirs, name, weights="fit", data_dir=None, submissions_dir=None, out_dir=None, quiet=False):
    run_dirs = [Path(r) for r in run_dirs]
    cfg = run_config(run_dirs[0])
    data_dir = Path(data_dir or cfg["data_dir"])
    labels = read_labels(data_dir / "stage_2_train.csv")
    oofs = [load_oof(r) for r in run_dirs]
    common = oofs[0].index
    for o in oofs[1:]:
        common = common.intersection(o.index)
    if len(common) == 0:
        raise PipelineError("the members' OOF predictions share no image: were they trained on the same folds?")
    y = labels.loc[common, CLASSES].to_numpy()
    oof_preds = [o.loc[common, CLASSES].to_numpy() for o in oofs]
    w = fit_weights(y, oof_preds) if weights == "fit" else np.full(len(run_dirs), 1 / len(run_dirs))
    member_scores = {r.name: weighted_log_loss(y, p) for r, p in zip(run_dirs, oof_preds)}
    blend_score = weighted_log_loss(y, np.tensordot(w, np.stack(oof_preds), axes=1))

    tests = [load_test(r) for r in run_dirs]
    ids = tests[0].index
    for r, t in zip(run_dirs[1:], tests[1:]):
        if set(t.index) != set(ids):
            raise PipelineError(f"{r}: test predictions cover other images than {run_dirs[0]}")
    blend = sum(wi * t.loc[ids, CLASSES] for wi, t in zip(w, tests))
    long = submission.build(blend, data_dir / "stage_2_sample_submission.csv")
    path = submission.write(long, Path(submissions_dir or ROOT / "submissions") / f"stage_2_{name}.csv")
    out_dir = Path(out_dir) if out_dir else out_root(cfg["data_dir"], cfg.get("out_dir"))
    info = {"name": name, "submission": str(path), "weights_mode": weights, "oof_images": len(common),
            "members": [{"run": str(r), "weight": float(wi), "oof_wll": member_scores[r.name]} for r, wi in zip(run_dirs, w)],
            "blend_oof_wll": blend_score, "test_images": len(ids), "rows": len(long)}
    write_json(info, out_dir / "ensemble" / f"{name}.json")
    if not quiet:
        width = max(len(r.name) for r in run_dirs) + 2
        print(f"{'member':<{width}} {'weight':>7} {'OOF wll':>9}")
        for r, wi in zip(run_dirs, w):
            print(f"{r.name:<{width}} {wi:7.3f} {member_scores[r.name]:9.5f}")
        print(f"{'blend':<{width}} {'':>7} {blend_score:9.5f}   ({len(common)} OOF images)")
        print(f"wrote {path}: {len(long)} rows ({len(ids)} images x 6), valid against {data_dir / 'stage_2_sample_submission.csv'}")
    return info


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories (fold*/oof.csv and fold*/test.csv)")
    ap.add_argument("--name", default=None, help="submission name: submissions/stage_2_<name>.csv (default <dataset>_blend)")
    ap.add_argument("--weights", choices=["fit", "equal"], default="fit")
    ap.add_argument("--data_dir", default=None, help="data folder (default: from the first run's config)")
    ap.add_argument("--submissions-dir", default=None, help="default: submissions/")
    a = ap.parse_args()
    name = a.name or f"{dataset_tag(a.data_dir or run_config(a.runs[0])['data_dir'])}_blend"
    ensemble(a.runs, name, a.weights, a.data_dir, a.submissions_dir)


if __name__ == "__main__":
    cli_main(main)
