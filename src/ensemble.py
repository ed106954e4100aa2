"""Blend runs (stage-1 and stage-2 models) into a Kaggle submission.

    python -m src.ensemble outputs/demo/runs/resnet10t_128 --name demo                # the run and its stage 2
    python -m src.ensemble RUN_A RUN_B --weights equal --name ab

Members and weights are src.blend's: each run given, a stage-1 run with its stage-2 runs (unless --stage1-only),
and the weights of OUT/blends/<name>.json, fitted there once on the OOF predictions (or reused when that file is
up to date with the members). Each member's test prediction is the mean of its folds' test.csv. The blend is
clipped and written atomically to submissions/stage_2_<name>.csv in the sample submission's exact order,
validated (src/submission.py); what made it (the members' fingerprints with their test predictions, the
weighting, the sample submission) goes to OUT/ensemble/<name>.json. A submission made from the same members is
skipped; one made from other members or older versions of them stops the command (`--overwrite` writes it again).

A bundle (src.export) can be a member too: `python -m src.ensemble RUN BUNDLE --weights equal --data-dir DATA`.
It carries no out-of-fold predictions, so no weights can be fitted to it: each source given then counts as one
model (a run: the blend of its stages by its blend file, else its stage 1; a bundle: its own blend, applied to the
data's cached test images), and the models are averaged with equal weights.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from . import layout, submission
from .blend import blend, describe, fit_blend, members, run_blend, weight_matrix
from .bundle import is_bundle
from .config import parse_config, positional
from .cache import cache_fingerprint, cache_settings, load_cache
from .runs import Run
from .stamps import Stamp, announce_skip, file_fingerprint, fingerprint, guard
from .utils import CLASSES, PipelineError, cli_main, write_json


def ensemble(run_dirs, name, weights="fit", data_dir=None, submissions_dir=None, out_dir=None, quiet=False,
             overwrite=False, stage1_only=False):
    if any(is_bundle(p) for p in run_dirs):
        return ensemble_models(run_dirs, name, weights, data_dir, submissions_dir, out_dir, quiet, overwrite)
    runs = members(run_dirs, stage1_only)
    d, o = runs[0].data()
    data_dir = Path(data_dir or d)
    out = Path(out_dir) if out_dir else layout.out_root(d, o)
    path, info_path = layout.submission_path(name, submissions_dir), layout.ensemble_json(out, name)
    sample = data_dir / layout.SAMPLE_CSV
    stamp = Stamp("ensemble", {"weights": weights, "sample": file_fingerprint(sample) if sample.exists() else ""},
                  {m.name: m.fingerprint() for m in runs})
    if guard(stamp, info_path, path.exists(), overwrite, f"the submission {path}", clear=[path, info_path],
             redo="add --overwrite to this command"):
        if not quiet:
            announce_skip(f"submission {path}")
        return json.loads(info_path.read_text())
    fitted = fit_blend([r.path for r in runs], name, weights, out, stage1_only=True, overwrite=overwrite, quiet=True)
    w = weight_matrix(fitted, [r.name for r in runs])
    tests = [m.load_test() for m in runs]
    ids = tests[0].index
    for m, t in zip(runs[1:], tests[1:]):
        if len(t) != len(ids) or not t.index.isin(ids).all():
            raise PipelineError(f"{m.path}: test predictions cover other images than {runs[0].path}")
    long = submission.build(blend([t.loc[ids, CLASSES] for t in tests], w), sample)
    write_json({"stamp": stamp.to_dict(), "status": "writing the submission"}, info_path)  # the stamp first
    submission.write(long, path)
    scores = fitted["scores"]
    info = {"name": name, "submission": str(path), "weights_mode": weights, "oof_images": fitted["oof_images"],
            "blend_file": str(layout.blend_file(out, name)),
            "members": [{"run": str(m.path), "weights": dict(zip(CLASSES, map(float, w[:, i]))),
                         "oof_wll": scores[m.name]["weighted_log_loss"]} for i, m in enumerate(runs)],
            "blend_oof_wll": scores["blend"]["weighted_log_loss"],
            "blend_oof_wll_cross_fitted": scores["blend, cross-fitted"]["weighted_log_loss"],
            "test_images": len(ids), "rows": len(long), "stamp": stamp.to_dict()}
    write_json(info, info_path)
    if not quiet:
        print(describe(fitted))
        print(f"wrote {path}: {len(long)} rows ({len(ids)} images x 6), valid against {sample}")
    return info


def model_fingerprint(source, data_dir: Path, out: Path) -> str:
    """Of what a model's test predictions are made from: a run's stages and blend file, or a bundle and the cache."""
    if is_bundle(source):
        return fingerprint({"bundle": file_fingerprint(source),
                            "cache": cache_fingerprint(layout.cache_dir(data_dir, out), "test")})
    run = Run(source)
    blend_file = layout.run_blend_file(run.path)
    return fingerprint([r.fingerprint() for r in run.family()] + [file_fingerprint(blend_file) if blend_file.exists() else ""])


def model_test(source, data_dir: Path, out: Path) -> tuple[str, pd.DataFrame]:
    """(name, test predictions by image ID) of one model: a run's stages blended by its blend file (else its stage 1),
    or a bundle's whole model applied to the data's cached test images."""
    if not is_bundle(source):
        run = Run(source)
        info = run_blend(run)
        if info is None:
            return run.name, run.load_test()
        fam = run.family()
        tests = [r.load_test() for r in fam]
        ids = tests[0].index
        return run.name, blend([t.loc[ids, CLASSES] for t in tests], weight_matrix(info, [r.name for r in fam]))
    from .predictor import Predictor
    p = Predictor.load(source)
    cache = layout.cache_dir(data_dir, out)
    built = cache_settings(cache)
    if (built["size"], built["windows"]) != (p.settings["size"], p.settings["windows"]):
        raise PipelineError(f"{source} was trained on {p.settings['size']}-px images with windows {p.settings['windows']}, "
                            f"but the cache {cache} holds {built['size']} px with {built['windows']}: build a cache with "
                            f"its settings (python -m src.prepare DATA --cache-size {p.settings['size']} --out-dir ...)")
    images, meta = load_cache(cache)
    meta = meta[meta.split == "test"].reset_index(drop=True)
    table = p.score(images, meta, progress=True).set_index("ID")[CLASSES]
    rest = meta.loc[meta.status != "ok", "ID"]  # no usable pixels: the model's mean over the readable test images
    return p.name, pd.concat([table, pd.DataFrame([table.mean().to_numpy()] * len(rest), index=rest, columns=CLASSES)])


def ensemble_models(sources, name, weights, data_dir, submissions_dir=None, out_dir=None, quiet=False, overwrite=False):
    """The submission of whole models (runs with their stages, bundles) averaged with equal weights."""
    if weights != "equal":
        raise PipelineError("a bundle carries no out-of-fold predictions, so blend weights cannot be fitted to it: "
                            "use --weights equal (each run or bundle given counts as one model)")
    runs = [Run(p) for p in sources if not is_bundle(p)]
    if not data_dir and not runs:
        raise PipelineError("give the data folder whose test set to predict: --data-dir DATA")
    data_dir = Path(data_dir or runs[0].data()[0])
    out = Path(out_dir) if out_dir else layout.out_root(data_dir, runs[0].data()[1] if runs else None)
    path, info_path = layout.submission_path(name, submissions_dir), layout.ensemble_json(out, name)
    sample = data_dir / layout.SAMPLE_CSV
    stamp = Stamp("ensemble", {"weights": "equal models", "sample": file_fingerprint(sample) if sample.exists() else ""},
                  {str(src): model_fingerprint(src, data_dir, out) for src in sources})
    if guard(stamp, info_path, path.exists(), overwrite, f"the submission {path}", clear=[path, info_path],
             redo="add --overwrite to this command"):
        if not quiet:
            announce_skip(f"submission {path}")
        return json.loads(info_path.read_text())
    models = [model_test(src, data_dir, out) for src in sources]
    ids = models[0][1].index
    for n, t in models[1:]:
        if len(t) != len(ids) or not t.index.isin(ids).all():
            raise PipelineError(f"{n}: test predictions cover other images than {models[0][0]}")
    long = submission.build(sum(t.loc[ids] for _, t in models) / len(models), sample)
    write_json({"stamp": stamp.to_dict(), "status": "writing the submission"}, info_path)
    submission.write(long, path)
    info = {"name": name, "submission": str(path), "weights_mode": "equal models", "test_images": len(ids),
            "members": [{"model": str(src), "name": n, "weight": 1 / len(models)} for src, (n, _) in zip(sources, models)],
            "rows": len(long), "stamp": stamp.to_dict()}
    write_json(info, info_path)
    if not quiet:
        print(f"wrote {path}: {len(models)} model(s) averaged, {len(long)} rows, valid against {sample}")
    return info


@dataclass
class EnsembleConfig:
    runs: list[str] = positional(nargs="+")  # run folders (fold*/oof.csv and fold*/test.csv; a stage-1 run brings
                                             # its stage-2 runs), or bundles (with --weights equal)
    name: str = ""                    # submission name: submissions/stage_2_<name>.csv (default <data>_blend)
    weights: str = "fit"              # fit: per class, on the OOF predictions; fit-global: one per member; equal
    stage1_only: bool = False         # blend the runs as given, without their stage-2 runs
    data_dir: str = ""                # data folder with the sample submission (default: the first run's)
    submissions_dir: str = ""         # default submissions/
    overwrite: bool = False           # write again a submission made from other members (else: stop and say)


def main():
    a = parse_config(EnsembleConfig, description=__doc__, prog="python -m src.ensemble")
    first = next((r for r in a.runs if not is_bundle(r)), None)
    if not a.data_dir and first is None:
        raise PipelineError("give the data folder whose test set to predict: --data-dir DATA")
    name = a.name or f"{layout.dataset_tag(a.data_dir or Run(first).data()[0])}_blend"
    ensemble(a.runs, name, a.weights, a.data_dir or None, a.submissions_dir or None, overwrite=a.overwrite,
             stage1_only=a.stage1_only)


if __name__ == "__main__":
    cli_main(main)
