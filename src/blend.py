"""Blend weights: fitted once on the members' out-of-fold predictions and written as one file beside the runs.

    python -m src.blend outputs/demo/runs/resnet10t_128          # its stages -> OUT/blends/resnet10t_128.json
    python -m src.blend RUN_A RUN_B --name ab                     # both models, all their stages
    python -m src.blend RUN_A RUN_B --name ab --stage1-only --weights equal

Members: the runs given; a stage-1 run brings its stage-2 runs (seq_<run>, boost_<run>) that have finished folds,
unless --stage1-only. Weights (`--weights`): `fit` (default), per class, non-negative and summing to 1, minimising
that class's log loss on the OOF predictions (which minimises the metric, a weighted sum over classes: members
are good at different classes), scipy SLSQP from equal weights and kept only if at least as good as every member
alone and the equal blend; `fit-global`, one weight per member for every class; `equal`; `best`, the single
member with the lowest OOF loss. `--shrink S` moves fitted weights a share S of the way toward equal.

Weights fitted and scored on the same predictions flatter themselves, so the file also holds each fold's
weights fitted on the other folds ("cross-fitted") and the OOF loss they give: the figure to expect on new data.

The file (OUT/blends/<name>.json; a stage-1 run's own stages under the run's name) is the one source of blend
weights: src.make_submission applies them to the test predictions, the Predictor (and so the demo, the page and a
bundle) to new scans, and src.evaluate shows them. Its stamp holds the members' fingerprints: a blend of the
same members is not fitted again, and one whose members changed stops the step (`--overwrite` refits it).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import layout
from .config import parse_config, positional
from .labels import cached_labels
from .metrics import EPS, binary_log_loss, per_class_auc, weighted_log_loss
from .runs import Run
from .stamps import Stamp, guard
from .utils import CLASSES, PipelineError, cli_main, write_json

MODES = ("fit", "fit-global", "equal", "best")


# ---------------------------------------------------------------- fitting
def fit_simplex(loss, m: int) -> np.ndarray:
    """Non-negative weights summing to 1 that minimise `loss` (SLSQP from equal weights; the log loss is convex
    in them), kept only if at least as good as the equal blend and as every member alone."""
    if m == 1:
        return np.ones(1)
    from scipy.optimize import minimize  # here: scipy's import costs a second at the start of every step that imports this
    res = minimize(loss, np.full(m, 1 / m), method="SLSQP", bounds=[(0, 1)] * m,
                   constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}], options={"ftol": 1e-10, "maxiter": 200})
    w = np.clip(res.x, 0, None)
    return min([w / w.sum(), np.full(m, 1 / m), *np.eye(m)], key=loss)


def fit_weights(y: np.ndarray, preds: list[np.ndarray], per_class: bool = True) -> np.ndarray:
    """(6, M) blend weights: per class (each class's weights minimise that class's log loss), else one weight per
    member for every class."""
    stack = np.stack(preds)
    if not per_class:
        w = fit_simplex(lambda w: weighted_log_loss(y, np.tensordot(w, stack, axes=1)), len(preds))
        return np.tile(w, (len(CLASSES), 1))
    clip = lambda p: np.clip(p, EPS, 1 - EPS)  # noqa: E731
    return np.stack([fit_simplex(lambda w, c=c: binary_log_loss(y[:, c], clip(w @ stack[:, :, c])).mean(), len(preds))
                     for c in range(len(CLASSES))])


def weights_for(mode: str, y, preds, shrink: float = 0.0) -> np.ndarray:
    """(6, M) weights of a mode on these rows; `shrink` moves fitted weights that share of the way toward equal."""
    if mode not in MODES:
        raise PipelineError(f"--weights must be one of {', '.join(MODES)}, not {mode!r}")
    equal = np.full((len(CLASSES), len(preds)), 1 / len(preds))
    if mode == "equal":
        return equal
    if mode == "best":  # the one member with the lowest loss on these rows, alone
        w = np.eye(len(preds))[int(np.argmin([weighted_log_loss(y, p) for p in preds]))]
        return np.tile(w, (len(CLASSES), 1))
    w = fit_weights(y, preds, per_class=mode == "fit")
    return (1 - shrink) * w + shrink * equal


def blend(preds: list, w: np.ndarray):
    """The members' predictions (arrays or DataFrames of the six classes) mixed with (6, M) weights."""
    return sum(p * w[:, m] for m, p in enumerate(preds))


def fold_weights(mode: str, y, preds, folds: np.ndarray, shrink: float = 0.0) -> dict[int, np.ndarray]:
    """Per fold, the weights fitted on the other folds' rows."""
    return {int(f): weights_for(mode, y[folds != f], [p[folds != f] for p in preds], shrink) for f in np.unique(folds)}


def cross_fitted(y: np.ndarray, preds: list[np.ndarray], folds: np.ndarray, per_class: bool = True,
                 weights: dict | None = None) -> np.ndarray:
    """Each fold's rows blended with weights fitted on the other folds' rows: the honest out-of-fold figure.
    `weights` (fold -> (6, M)) applies weights fitted before instead of fitting them."""
    weights = weights or fold_weights("fit" if per_class else "fit-global", y, preds, folds)
    out = np.zeros_like(preds[0], dtype=float)
    for f in np.unique(folds):
        te = folds == f
        out[te] = blend([p[te] for p in preds], np.asarray(weights[int(f)]))
    return out


# ---------------------------------------------------------------- members and their OOF predictions
def members(paths, stage1_only: bool = False) -> list[Run]:
    """The runs to blend: each given run, a stage-1 run followed by its stage-2 runs unless stage1_only; once each."""
    out = []
    for r in map(Run, paths):
        for m in ([r] if stage1_only or r.is_stage2() else r.family()):
            if m.path.resolve() not in [o.path.resolve() for o in out]:
                out.append(m)
    if len({m.name for m in out}) < len(out):
        raise PipelineError("two members have the same run name: " + ", ".join(str(m.path) for m in out))
    return out


def oof_table(oofs: list[pd.DataFrame], labels: pd.DataFrame):
    """(common OOF IDs, labels (N, 6), member predictions [(N, 6)], fold of each row) of the members' OOF tables."""
    common = oofs[0].index
    for o in oofs[1:]:
        common = common.intersection(o.index)
    if len(common) == 0:
        raise PipelineError("the members' OOF predictions share no image: were they trained on the same folds?")
    missing = common.difference(labels.index)
    if len(missing):
        raise PipelineError(f"{len(missing)} OOF image(s) have no labels, e.g. {list(missing[:3])}")
    return (common, labels.loc[common, CLASSES].to_numpy(), [o.loc[common, CLASSES].to_numpy() for o in oofs],
            oofs[0].loc[common, "fold"].to_numpy())


def blend_stamp(runs: list[Run], mode: str, shrink: float = 0.0) -> Stamp:
    settings = {"weights": mode, "members": [r.name for r in runs], **({"shrink": shrink} if shrink else {})}
    return Stamp("blend", settings, {r.name: r.fingerprint(with_test=False) for r in runs})


def default_name(runs: list[Run]) -> str:
    """A stage-1 run's own stages are named after it; other sets need a name."""
    firsts = [r for r in runs if not r.is_stage2()]
    if len(firsts) == 1 and all(r.path.resolve() in [m.path.resolve() for m in firsts[0].family()] for r in runs):
        return firsts[0].name
    raise PipelineError("name the blend of these runs: --name NAME")


def blend_path(runs: list[Run], name: str, out_dir=None) -> Path:
    return layout.blend_file(Path(out_dir) if out_dir else layout.run_out_root(runs[0].path), name)


# ---------------------------------------------------------------- the file
def fit_blend(run_dirs, name: str = "", weights: str = "fit", out_dir=None, stage1_only=False, overwrite=False,
              quiet=False, labels=None, shrink: float = 0.0) -> dict:
    """Fit (or reuse, when up to date) the blend of the runs; returns the blend file's content."""
    runs = members(run_dirs, stage1_only)
    name = name or default_name(runs)
    path = blend_path(runs, name, out_dir)
    stamp = blend_stamp(runs, weights, shrink)
    if guard(stamp, path, path.exists(), overwrite, f"the blend {path}", clear=[path], quiet=quiet):
        return load_blend(path)
    if labels is None:
        labels, _ = cached_labels(*runs[0].data())
    common, y, preds, folds = oof_table([r.load_oof(quiet) for r in runs], labels)
    w = weights_for(weights, y, preds, shrink)
    fw = fold_weights(weights, y, preds, folds, shrink)
    honest = cross_fitted(y, preds, folds, weights=fw)
    scores = {r.name: score(y, p) for r, p in zip(runs, preds)}
    scores.update({"blend": score(y, blend(preds, w)), "blend, cross-fitted": score(y, honest)})
    info = {"name": name, "weights_mode": weights, "shrink": shrink, "oof_images": len(common),
            "members": [{"name": r.name, "path": str(r.path), "kind": layout.stage2_kind(r.path) if r.is_stage2()
                         else "stage1"} for r in runs],
            "weights": {r.name: w[:, i].tolist() for i, r in enumerate(runs)},
            "fold_weights": {str(f): {r.name: fw[f][:, i].tolist() for i, r in enumerate(runs)} for f in fw},
            "scores": scores, "stamp": stamp.to_dict()}
    write_json(info, path)
    if not quiet:
        print(describe(info) + f"\nwrote {path}")
    return info


def score(y, p) -> dict:
    auc = per_class_auc(y, p)
    return {"weighted_log_loss": weighted_log_loss(y, p), "auc_any": float(auc[-1])}


def load_blend(path) -> dict:
    path = Path(path)
    try:
        info = json.loads(path.read_text())
        if not isinstance(info.get("weights"), dict) or not info.get("members"):
            raise ValueError("no members or weights")
    except (OSError, ValueError) as e:
        raise PipelineError(f"{path}: not a blend file ({e}); make it with python -m src.blend") from e
    return info


def current_blend(runs: list[Run], name: str, out_dir=None) -> dict | None:
    """The blend file of exactly these members when it is up to date with them, else None."""
    path = blend_path(runs, name, out_dir)
    if not path.exists():
        return None
    info = load_blend(path)
    st = Stamp.load(path)
    if st is None or st.inputs != blend_stamp(runs, st.settings.get("weights", "fit")).inputs \
            or st.settings.get("members") != [r.name for r in runs]:
        return None
    return info


def run_blend(run: Run) -> dict | None:
    """The blend of a stage-1 run's own stages (OUT/blends/<run>.json) when it is up to date with them, else None:
    what the Predictor applies."""
    return current_blend(run.family(), run.name)


def weight_matrix(info: dict, names: list[str], fold=None) -> np.ndarray:
    """(6, M) weights of the named members from a blend file (one fold's cross-fitted ones when fold is given)."""
    src = info["weights"] if fold is None else info["fold_weights"][str(fold)]
    return np.array([src[n] for n in names]).T


def describe(info: dict) -> str:
    names = list(info["weights"])
    width = max(map(len, names + ["blend, cross-fitted"])) + 2
    lines = [f"{'member':<{width}} {'weights (' + ' / '.join(c[:3] for c in CLASSES) + ')':>36} {'OOF wll':>9}"]
    for n in names:
        lines.append(f"{n:<{width}} {' / '.join(f'{x:.2f}' for x in info['weights'][n]):>36} "
                     f"{info['scores'][n]['weighted_log_loss']:9.5f}")
    for n in ("blend", "blend, cross-fitted"):
        lines.append(f"{n:<{width}} {'':>36} {info['scores'][n]['weighted_log_loss']:9.5f}")
    return "\n".join(lines) + f"\n({info['oof_images']} OOF images; cross-fitted: each fold's weights fitted on the others)"


@dataclass
class BlendConfig:
    runs: list[str] = positional(nargs="+")  # run folders; a stage-1 run brings its stage-2 runs
    name: str = ""                    # OUT/blends/<name>.json; default: the stage-1 run's name (its own stages)
    weights: str = "fit"              # fit: per class, on the OOF predictions; fit-global: one per member; equal;
                                      # best: the single member with the lowest OOF loss
    shrink: float = 0.0               # move fitted weights this share of the way toward equal (0: none, 1: equal)
    stage1_only: bool = False         # blend the runs as given, without their stage-2 runs
    out_dir: str = ""                 # outputs root (default: the first run's)
    overwrite: bool = False           # refit a blend whose members changed (else: stop and say)


def main():
    a = parse_config(BlendConfig, description=__doc__, prog="python -m src.blend")
    if not 0 <= a.shrink <= 1:
        raise PipelineError(f"--shrink must be between 0 and 1, not {a.shrink}")
    fit_blend(a.runs, a.name, a.weights, a.out_dir or None, a.stage1_only, a.overwrite, shrink=a.shrink)


if __name__ == "__main__":
    cli_main(main)
