"""Write the Kaggle submission: the test predictions of trained models, blended, in the sample submission's order.

    python -m src.make_submission outputs/demo/runs/resnet10t_128 --name demo          # the run and its stage 2
    python -m src.make_submission RUN_A RUN_B --weights equal --name ab
    python -m src.make_submission RUN BUNDLE --weights equal --data-dir DATA            # a bundle as a member

The last step has four modules, one job each: `src.blend` fits blend weights (OUT/blends/<name>.json, the one record
of them), this command applies them and writes submissions/stage_2_<name>.csv, `src.submission` is the file's
format (built in the sample's order, clipped, validated) and `src.upload` sends a file to Kaggle.

Members: the runs given, a stage-1 run with its stage-2 runs (unless --stage1-only), weighted by src.blend's file for
exactly these members (fitted there once on the OOF predictions, or reused when up to date); each member's test
prediction is the mean of its folds' test.csv. A bundle (src.export) carries no out-of-fold predictions, so no
weights can be fitted to it: with a bundle among the sources, each source counts as one model (a run: its stages
blended by its own blend file, else its stage 1; a bundle: its own blend applied to the data's cached test images)
and the models are averaged with equal weights (`--weights equal`). Either way the submission is written by the one
path below, and its record, OUT/submissions/<name>.json, holds what made it (the members' fingerprints with their
test predictions, the blend file's, the sample submission's) and points at the blend file rather than copying it. A
submission made from the same members is skipped; one made from other members or older versions of them stops the
command (`--overwrite` writes it again).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from . import layout, submission
from .blend import blend, describe, fit_blend, members, run_blend, weight_matrix
from .bundle import is_bundle
from .cache import cache_fingerprint, cache_settings, load_cache
from .card import training_prior
from .config import parse_config, positional
from .runs import Run
from .stamps import Stamp, file_fingerprint, fingerprint, guard
from .utils import CLASSES, PipelineError, cli_main, write_json


@dataclass
class Plan:
    """What a submission is made of: its members (name -> fingerprint, and how to get its test predictions), the (6, M)
    weights to mix them with, and what the record says about them."""
    names: list[str]
    fingerprints: dict[str, str]
    tests: list[Callable[[], pd.DataFrame]]
    weights: Callable[[], np.ndarray]
    mode: str
    data_dir: Path
    out: Path
    record: Callable[[], dict]


def run_members(run_dirs, name: str, weights: str, data_dir, out_dir, stage1_only: bool, overwrite: bool) -> Plan:
    """Runs and their stages, weighted by src.blend's file for exactly these members (named after the submission)."""
    runs = members(run_dirs, stage1_only)
    d, o = runs[0].data()
    out = Path(out_dir) if out_dir else layout.out_root(d, o)
    fitted = {}

    def fit() -> np.ndarray:
        fitted.update(fit_blend([r.path for r in runs], name, weights, out, stage1_only=True,
                                overwrite=overwrite, quiet=True))
        return weight_matrix(fitted, [r.name for r in runs])

    def record() -> dict:
        scores = fitted["scores"]
        return {"blend_file": str(layout.blend_file(out, name)), "oof_images": fitted["oof_images"],
                "members": [{"run": str(r.path), "oof_wll": scores[r.name]["weighted_log_loss"]} for r in runs],
                "blend_oof_wll": scores["blend"]["weighted_log_loss"],
                "blend_oof_wll_cross_fitted": scores["blend, cross-fitted"]["weighted_log_loss"],
                "description": describe(fitted)}

    return Plan([r.name for r in runs], {r.name: r.fingerprint() for r in runs}, [r.load_test for r in runs], fit,
                weights, Path(data_dir or d), out, record)


def model_fingerprint(source, data_dir: Path, out: Path) -> str:
    """Of what a model's test predictions are made from: a run's stages and blend file, or a bundle and the cache."""
    if is_bundle(source):
        return fingerprint({"bundle": file_fingerprint(source),
                            "cache": cache_fingerprint(layout.cache_dir(data_dir, out), "test")})
    run = Run(source)
    blend_file = layout.run_blend_file(run.path)
    return fingerprint([r.fingerprint() for r in run.family()] + [file_fingerprint(blend_file) if blend_file.exists() else ""])


def model_test(source, data_dir: Path, out: Path) -> pd.DataFrame:
    """Test predictions by image ID of one model: a run's stages blended by its blend file (else its stage 1), or a
    bundle's whole model applied to the data's cached test images (images without usable pixels: the model's
    training prior, docs/pipeline.md "Images without usable pixels")."""
    if not is_bundle(source):
        run = Run(source)
        info = run_blend(run)
        if info is None:
            return run.load_test()
        fam = run.family()
        tests = [r.load_test() for r in fam]
        ids = tests[0].index
        return blend([t.loc[ids, CLASSES] for t in tests], weight_matrix(info, [r.name for r in fam]))
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
    rest = meta.loc[meta.status != "ok", "ID"]
    prior = pd.DataFrame([training_prior(p.card, source)] * len(rest), index=rest, columns=CLASSES)
    return pd.concat([table, prior])


def model_members(sources, weights: str, data_dir, out_dir) -> Plan:
    """Whole models (runs with their stages, bundles), each counting once, averaged with equal weights."""
    if weights != "equal":
        raise PipelineError("a bundle carries no out-of-fold predictions, so blend weights cannot be fitted to it: "
                            "use --weights equal (each run or bundle given counts as one model)")
    runs = [Run(p) for p in sources if not is_bundle(p)]
    if not data_dir and not runs:
        raise PipelineError("give the data folder whose test set to predict: --data-dir DATA")
    data_dir = Path(data_dir or runs[0].data()[0])
    out = Path(out_dir) if out_dir else layout.out_root(data_dir, runs[0].data()[1] if runs else None)
    names = [str(s) for s in sources]
    m = len(sources)
    return Plan(names, {n: model_fingerprint(s, data_dir, out) for n, s in zip(names, sources)},
                [lambda s=s: model_test(s, data_dir, out) for s in sources], lambda: np.full((len(CLASSES), m), 1 / m),
                "equal models", data_dir, out, lambda: {"members": [{"model": n, "weight": 1 / m} for n in names]})


def make_submission(sources, name, weights="fit", data_dir=None, submissions_dir=None, out_dir=None, quiet=False,
                    overwrite=False, stage1_only=False) -> dict:
    """Write submissions/stage_2_<name>.csv from the sources (the one path to a submission); returns its record."""
    plan = (model_members(sources, weights, data_dir, out_dir) if any(is_bundle(p) for p in sources)
            else run_members(sources, name, weights, data_dir, out_dir, stage1_only, overwrite))
    path, record_path = layout.submission_path(name, submissions_dir), layout.submission_record(plan.out, name)
    sample = plan.data_dir / layout.SAMPLE_CSV
    stamp = Stamp("submission", {"weights": plan.mode, "sample": file_fingerprint(sample) if sample.exists() else ""},
                  plan.fingerprints)
    if guard(stamp, record_path, path.exists(), overwrite, f"the submission {path}", clear=[path, record_path],
             quiet=quiet):
        return json.loads(record_path.read_text())
    w = plan.weights()
    tests = [load() for load in plan.tests]
    ids = tests[0].index
    for n, t in zip(plan.names[1:], tests[1:]):
        if len(t) != len(ids) or not t.index.isin(ids).all():
            raise PipelineError(f"{n}: test predictions cover other images than {plan.names[0]}")
    long = submission.build(blend([t.loc[ids, CLASSES] for t in tests], w), sample)
    write_json({"stamp": stamp.to_dict(), "status": "writing the submission"}, record_path)  # the stamp first
    submission.write(long, path)
    extra = plan.record()
    info = {"name": name, "submission": str(path), "weights_mode": plan.mode, "test_images": len(ids),
            "rows": len(long), **{k: v for k, v in extra.items() if k != "description"}, "stamp": stamp.to_dict()}
    write_json(info, record_path)
    if not quiet:
        if "description" in extra:
            print(extra["description"])
        print(f"wrote {path}: {len(plan.names)} member(s), {len(long)} rows ({len(ids)} images x 6), valid against "
              f"{sample}")
    return info


@dataclass
class SubmissionConfig:
    runs: list[str] = positional(nargs="+")  # run folders (fold*/oof.csv and fold*/test.csv; a stage-1 run brings
                                             # its stage-2 runs), or bundles (with --weights equal)
    name: str = ""                    # submission name: submissions/stage_2_<name>.csv (default <data>_blend)
    weights: str = "fit"              # fit: per class, on the OOF predictions; fit-global: one per member; equal
    stage1_only: bool = False         # blend the runs as given, without their stage-2 runs
    data_dir: str = ""                # data folder with the sample submission (default: the first run's)
    submissions_dir: str = ""         # default submissions/
    overwrite: bool = False           # write again a submission made from other members (else: stop and say)


def main():
    a = parse_config(SubmissionConfig, description=__doc__, prog="python -m src.make_submission")
    first = next((r for r in a.runs if not is_bundle(r)), None)
    if not a.data_dir and first is None:
        raise PipelineError("give the data folder whose test set to predict: --data-dir DATA")
    name = a.name or f"{layout.dataset_tag(a.data_dir or Run(first).data()[0])}_blend"
    make_submission(a.runs, name, a.weights, a.data_dir or None, a.submissions_dir or None, overwrite=a.overwrite,
                    stage1_only=a.stage1_only)


if __name__ == "__main__":
    cli_main(main)
