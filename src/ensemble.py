"""Blend runs (stage 1 models and stage 2 models) into a Kaggle submission.

    python -m src.ensemble outputs/demo/runs/resnet10t_128 outputs/demo/runs/seq_resnet10t_128 --name demo
    python -m src.ensemble RUN_A RUN_B --weights equal --name ab

Each member's test prediction is the mean of its folds' test.csv; its OOF prediction is its folds'
oof.csv joined. Weights are fitted on the OOF predictions per class (`--weights fit`: for each class,
non-negative weights summing to 1 that minimise that class's log loss, which minimises the metric, a weighted
sum over classes; scipy SLSQP from equal weights, kept only if at least as good as every member alone and the
equal blend), one per member (`fit-global`), or equal. The report also gives the blend's OOF loss with each
fold's weights fitted on the other folds, the honest figure. The blend is
clipped and written atomically to submissions/stage_2_<name>.csv in the sample submission's exact
order; the weights, scores and the members' fingerprints go to OUT/ensemble/<name>.json. A submission
made from the same members is skipped; one made from other members or older versions of them stops the
command (`--overwrite` writes it again).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from . import runs, submission
from .config import parse_config, positional
from .metrics import EPS, binary_log_loss, weighted_log_loss
from .utils import CLASSES, PipelineError, cli_main, dataset_tag, write_json


def fit_simplex(loss, m: int) -> np.ndarray:
    """Non-negative weights summing to 1 that minimise `loss` (SLSQP from equal weights; the log loss is convex
    in them), kept only if at least as good as the equal blend and as every member alone."""
    if m == 1:
        return np.ones(1)
    res = minimize(loss, np.full(m, 1 / m), method="SLSQP", bounds=[(0, 1)] * m,
                   constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}], options={"ftol": 1e-10, "maxiter": 200})
    w = np.clip(res.x, 0, None)
    return min([w / w.sum(), np.full(m, 1 / m), *np.eye(m)], key=loss)


def fit_weights(y: np.ndarray, preds: list[np.ndarray], per_class: bool = True) -> np.ndarray:
    """(6, M) blend weights. Per class (default): each class's weights minimise that class's log loss, which
    minimises the metric, a weighted sum of the classes' losses (members are good at different classes: on the
    demo data the GRU at epidural and subarachnoid, the trees at intraventricular and subdural). Otherwise one
    weight per member for every class."""
    stack = np.stack(preds)
    if not per_class:
        w = fit_simplex(lambda w: weighted_log_loss(y, np.tensordot(w, stack, axes=1)), len(preds))
        return np.tile(w, (len(CLASSES), 1))
    clip = lambda p: np.clip(p, EPS, 1 - EPS)  # noqa: E731
    return np.stack([fit_simplex(lambda w, c=c: binary_log_loss(y[:, c], clip(w @ stack[:, :, c])).mean(), len(preds))
                     for c in range(len(CLASSES))])


def blend(preds: list, w: np.ndarray):
    """The members' predictions (arrays or DataFrames of the six classes) mixed with (6, M) weights."""
    return sum(p * w[:, m] for m, p in enumerate(preds))


def cross_fitted(y: np.ndarray, preds: list[np.ndarray], folds: np.ndarray, per_class: bool = True) -> np.ndarray:
    """The blend of each fold's rows with weights fitted on the other folds' rows: an honest out-of-fold figure
    (weights fitted on the rows they are scored on flatter the blend a little)."""
    out = np.zeros_like(preds[0], dtype=float)
    for f in np.unique(folds):
        tr, te = folds != f, folds == f
        out[te] = blend([p[te] for p in preds], fit_weights(y[tr], [p[tr] for p in preds], per_class))
    return out


def blend_oof(oofs: list[pd.DataFrame], labels, weights="fit"):
    """(common OOF IDs, labels, member OOF predictions, (6, M) weights, folds) of the members' OOF tables."""
    common = oofs[0].index
    for o in oofs[1:]:
        common = common.intersection(o.index)
    if len(common) == 0:
        raise PipelineError("the members' OOF predictions share no image: were they trained on the same folds?")
    y = labels.loc[common, CLASSES].to_numpy()
    preds = [o.loc[common, CLASSES].to_numpy() for o in oofs]
    w = (fit_weights(y, preds, per_class=weights == "fit") if weights in ("fit", "fit-global")
         else np.full((len(CLASSES), len(oofs)), 1 / len(oofs)))
    return common, y, preds, w, oofs[0].loc[common, "fold"].to_numpy()


def ensemble(run_dirs, name, weights="fit", data_dir=None, submissions_dir=None, out_dir=None, quiet=False,
             overwrite=False):
    members = [runs.Run(r) for r in run_dirs]
    if len({m.name for m in members}) < len(members):
        raise PipelineError("the same run is named twice")
    d, o = members[0].data()
    data_dir = Path(data_dir or d)
    path = runs.submission_path(name, submissions_dir)
    info_path = runs.ensemble_json(Path(out_dir) if out_dir else runs.out_root(d, o), name)
    stamp = runs.Stamp("ensemble", {"weights": weights, "sample": runs.file_fingerprint(
        data_dir / "stage_2_sample_submission.csv") if (data_dir / "stage_2_sample_submission.csv").exists() else ""},
        {m.name: m.fingerprint() for m in members})
    if runs.guard(stamp, info_path, path.exists(), overwrite, f"the submission {path}", clear=[path, info_path],
                  redo="add --overwrite to this command"):
        if not quiet:
            runs.announce_skip(f"submission {path}")
        return json.loads(info_path.read_text())
    labels, _ = runs.labels(d, o)
    common, y, oof_preds, w, folds = blend_oof([m.load_oof() for m in members], labels, weights)  # load_oof names unfinished folds
    member_scores = {m.name: weighted_log_loss(y, p) for m, p in zip(members, oof_preds)}
    blend_score = weighted_log_loss(y, blend(oof_preds, w))
    honest = weighted_log_loss(y, cross_fitted(y, oof_preds, folds, weights == "fit")) if weights != "equal" else blend_score

    tests = [m.load_test() for m in members]
    ids = tests[0].index
    for m, t in zip(members[1:], tests[1:]):
        if len(t) != len(ids) or not t.index.isin(ids).all():
            raise PipelineError(f"{m.path}: test predictions cover other images than {members[0].path}")
    long = submission.build(blend([t.loc[ids, CLASSES] for t in tests], w), data_dir / "stage_2_sample_submission.csv")
    write_json({"stamp": stamp.to_dict(), "status": "writing the submission"}, info_path)  # the stamp first
    submission.write(long, path)
    info = {"name": name, "submission": str(path), "weights_mode": weights, "oof_images": len(common),
            "members": [{"run": str(m.path), "weights": dict(zip(CLASSES, map(float, w[:, i]))), "oof_wll": member_scores[m.name]}
                        for i, m in enumerate(members)],
            "blend_oof_wll": blend_score, "blend_oof_wll_cross_fitted": honest, "test_images": len(ids), "rows": len(long),
            "stamp": stamp.to_dict()}
    write_json(info, info_path)
    if not quiet:
        width = max(len(m.name) for m in members) + 2
        print(f"{'member':<{width}} {'weights (' + ' / '.join(c[:3] for c in CLASSES) + ')':>36} {'OOF wll':>9}")
        for i, m in enumerate(members):
            print(f"{m.name:<{width}} {' / '.join(f'{x:.2f}' for x in w[:, i]):>36} {member_scores[m.name]:9.5f}")
        print(f"{'blend':<{width}} {'':>36} {blend_score:9.5f}   ({len(common)} OOF images; "
              f"{honest:.5f} with each fold's weights fitted on the other folds)")
        print(f"wrote {path}: {len(long)} rows ({len(ids)} images x 6), valid against {data_dir / 'stage_2_sample_submission.csv'}")
    return info


@dataclass
class EnsembleConfig:
    runs: list[str] = positional(nargs="+")  # run folders (fold*/oof.csv and fold*/test.csv)
    name: str = ""                    # submission name: submissions/stage_2_<name>.csv (default <data>_blend)
    weights: str = "fit"              # fit: per class, on the OOF predictions; fit-global: one per member; equal
    data_dir: str = ""                # data folder with the sample submission (default: the first run's)
    submissions_dir: str = ""         # default submissions/
    overwrite: bool = False           # write again a submission made from other members (else: stop and say)


def main():
    a = parse_config(EnsembleConfig, description=__doc__, prog="python -m src.ensemble")
    if a.weights not in ("fit", "fit-global", "equal"):
        raise PipelineError(f"--weights must be fit, fit-global or equal, not {a.weights!r}")
    name = a.name or f"{dataset_tag(a.data_dir or runs.Run(a.runs[0]).data()[0])}_blend"
    ensemble(a.runs, name, a.weights, a.data_dir or None, a.submissions_dir or None, overwrite=a.overwrite)


if __name__ == "__main__":
    cli_main(main)
