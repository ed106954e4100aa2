"""Blend runs (stage 1 models and stage 2 models) into a Kaggle submission.

    python -m src.ensemble outputs/demo/runs/resnet10t_128 outputs/demo/runs/seq_resnet10t_128 --name demo
    python -m src.ensemble RUN_A RUN_B --weights equal --name ab

Each member's test prediction is the mean of its folds' test.csv; its OOF prediction is its folds'
oof.csv joined. Weights are equal, or fitted on the OOF predictions to minimise the weighted log loss
(non-negative, summing to 1; scipy SLSQP from equal weights; the loss is convex in the weights, and the
fit is kept only if it is at least as good as every single member and the equal blend). The blend is
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
from scipy.optimize import minimize

from . import runs, submission
from .config import parse_config, positional
from .metrics import weighted_log_loss
from .utils import CLASSES, PipelineError, cli_main, dataset_tag, write_json


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


def blend_oof(members: list[runs.Run], labels, weights="fit"):
    """(common OOF IDs, labels, member OOF predictions, weights) of a set of runs."""
    oofs = [r.load_oof() for r in members]  # says which folds are unfinished, if any
    common = oofs[0].index
    for o in oofs[1:]:
        common = common.intersection(o.index)
    if len(common) == 0:
        raise PipelineError("the members' OOF predictions share no image: were they trained on the same folds?")
    y = labels.loc[common, CLASSES].to_numpy()
    preds = [o.loc[common, CLASSES].to_numpy() for o in oofs]
    w = fit_weights(y, preds) if weights == "fit" else np.full(len(members), 1 / len(members))
    return common, y, preds, w


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
    common, y, oof_preds, w = blend_oof(members, labels, weights)
    member_scores = {m.name: weighted_log_loss(y, p) for m, p in zip(members, oof_preds)}
    blend_score = weighted_log_loss(y, np.tensordot(w, np.stack(oof_preds), axes=1))

    tests = [m.load_test() for m in members]
    ids = tests[0].index
    for m, t in zip(members[1:], tests[1:]):
        if len(t) != len(ids) or not t.index.isin(ids).all():
            raise PipelineError(f"{m.path}: test predictions cover other images than {members[0].path}")
    blend = sum(wi * t.loc[ids, CLASSES] for wi, t in zip(w, tests))
    long = submission.build(blend, data_dir / "stage_2_sample_submission.csv")
    write_json({"stamp": stamp.to_dict(), "status": "writing the submission"}, info_path)  # the stamp first
    submission.write(long, path)
    info = {"name": name, "submission": str(path), "weights_mode": weights, "oof_images": len(common),
            "members": [{"run": str(m.path), "weight": float(wi), "oof_wll": member_scores[m.name]} for m, wi in zip(members, w)],
            "blend_oof_wll": blend_score, "test_images": len(ids), "rows": len(long), "stamp": stamp.to_dict()}
    write_json(info, info_path)
    if not quiet:
        width = max(len(m.name) for m in members) + 2
        print(f"{'member':<{width}} {'weight':>7} {'OOF wll':>9}")
        for m, wi in zip(members, w):
            print(f"{m.name:<{width}} {wi:7.3f} {member_scores[m.name]:9.5f}")
        print(f"{'blend':<{width}} {'':>7} {blend_score:9.5f}   ({len(common)} OOF images)")
        print(f"wrote {path}: {len(long)} rows ({len(ids)} images x 6), valid against {data_dir / 'stage_2_sample_submission.csv'}")
    return info


@dataclass
class EnsembleConfig:
    runs: list[str] = positional(nargs="+")  # run folders (fold*/oof.csv and fold*/test.csv)
    name: str = ""                    # submission name: submissions/stage_2_<name>.csv (default <data>_blend)
    weights: str = "fit"              # fit (on the OOF predictions) or equal
    data_dir: str = ""                # data folder with the sample submission (default: the first run's)
    submissions_dir: str = ""         # default submissions/
    overwrite: bool = False           # write again a submission made from other members (else: stop and say)


def main():
    a = parse_config(EnsembleConfig, description=__doc__, prog="python -m src.ensemble")
    if a.weights not in ("fit", "equal"):
        raise PipelineError(f"--weights must be fit or equal, not {a.weights!r}")
    name = a.name or f"{dataset_tag(a.data_dir or runs.Run(a.runs[0]).data()[0])}_blend"
    ensemble(a.runs, name, a.weights, a.data_dir or None, a.submissions_dir or None, overwrite=a.overwrite)


if __name__ == "__main__":
    cli_main(main)
