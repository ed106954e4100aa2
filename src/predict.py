"""Test-set (or any DICOM folder) predictions of every fold's best checkpoint of a run.

    python -m src.predict outputs/demo/runs/resnet10t_128                  # the cache's test images
    python -m src.predict outputs/demo/runs/resnet10t_128 --dicom-dir /path/to/series --pred-dir preds/

Per fold, writes RUN/fold<K>/test.csv (ID + six probabilities) and test_emb.npy (embeddings, rows in
test.csv order) for the sequence stage, and RUN/predict.json (its stamp: the run's fingerprint and the
cache's; and a report); with --dicom-dir, the same files go to --pred-dir/fold<K>/. Preprocessing and
test-time augmentation are the run's own (preprocess.json and config.yaml: size, windows, input mode, 2.5D
neighbours, `tta`), the very settings its out-of-fold predictions were made with, so stage 2 and the
blend weights are fitted on what they are applied to. Test images with no usable pixel data still get a
row, the training prior, and predict.json lists them with the reason. Predictions up to date with the run
and the cache are skipped; stale ones stop the command (`--overwrite` redoes them).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import layout
from .config import parse_config, positional
from .bundle import is_bundle
from .card import training_prior
from .cache import cache_fingerprint, load_cache, windows_from_settings
from .scans import decode_files, list_inputs
from .runs import Run
from .stamps import Stamp, guard
from .utils import CLASSES, PipelineError, cli_main, write_csv, write_json, write_npy


@dataclass
class PredictConfig:
    run: str = positional(None)       # run folder (OUT/runs/<run>, holding fold*/best.pth), or a bundle (--dicom-dir)
    dicom_dir: str = ""               # predict this folder of DICOMs instead of the cache's test images
    pred_dir: str = ""                # with --dicom-dir: where to write (default RUN/predict_folder)
    device: str = "auto"              # auto (CUDA when available), cpu, cuda
    batch_size: int = 0               # images per forward pass (0: by device, src.engine.infer_batch_size)
    workers: int = 4                  # data loader processes (pinned memory on CUDA); at most the cores less one
    overwrite: bool = False           # redo predictions made from another state of the run or cache


def write_fold_outputs(out_dir: Path, ids_ok, probs, emb, ids_missing, prior):
    """test.csv has every image: model rows, then prior rows for images without usable pixels (zero embeddings)."""
    df = pd.DataFrame(probs, columns=CLASSES, index=pd.Index(ids_ok, name="ID"))
    if len(ids_missing):
        df = pd.concat([df, pd.DataFrame([prior] * len(ids_missing), columns=CLASSES, index=pd.Index(ids_missing, name="ID"))])
        emb = np.concatenate([emb, np.zeros((len(ids_missing), emb.shape[1]), emb.dtype)])
    df.insert(0, "source", ["model"] * len(ids_ok) + ["prior"] * len(ids_missing))
    write_npy(emb, out_dir / layout.TEST_EMB)
    write_csv(df, out_dir / layout.TEST, float_format="%.6g")


def predict_run(run_dir, dicom_dir=None, out=None, device="auto", batch_size=0, workers=4, overwrite=False, quiet=False):
    from .engine import infer_batch_size, pick_device
    from .predictor import Predictor  # torch and timm: after the up-to-date check, not before
    run, batch_size = Run(run_dir), batch_size or infer_batch_size(pick_device(device))
    workers = max(0, min(workers, (os.cpu_count() or 1) - 1))  # leave a core to the model
    if is_bundle(run_dir) and not (dicom_dir and out):
        raise PipelineError(f"{run_dir} is a bundle: it predicts DICOM files, --dicom-dir DIR --pred-dir OUT "
                            f"(a run folder also predicts its data's cached test set)")
    if dicom_dir:
        p = Predictor.load(run.path, device, stage2=False, batch_size=batch_size, workers=0)
        images, meta = decode_files(list_inputs([dicom_dir]), windows_from_settings(p.settings), p.settings["size"])
        out, stamp = Path(out) if out else run.path / "predict_folder", None
    else:
        data_dir, out_dir = run.data()
        cache = layout.cache_dir(data_dir, out_dir)
        ks = run.finished_folds()
        stamp = Stamp("predict", {"tta": run.config().get("tta", "hflip")},
                           {"run": run.fingerprint(with_test=False), "cache": cache_fingerprint(cache, "test")})
        done = bool(ks) and all((run.fold_dir(k) / layout.TEST).exists() for k in ks)
        if guard(stamp, run.path / layout.PREDICT, done, overwrite, f"the test predictions of {run.path}",
                 clear=[run.fold_dir(k) / f for k in ks for f in (layout.TEST, layout.TEST_EMB)] + [run.path / layout.PREDICT],
                 quiet=quiet):
            return run.path
        p = Predictor.load(run.path, device, stage2=False, batch_size=batch_size, workers=workers)
        images, meta = load_cache(cache)
        meta = meta[meta.split == "test"].reset_index(drop=True)
        if meta.empty:
            raise PipelineError(f"the cache in {cache} has no test images")
        out = run.path
    missing = meta[meta.status != "ok"]
    prior = training_prior(p.card, run.path) if len(missing) else None
    if stamp:  # the stamp first: a kill before the last test.csv leaves a stamped, unfinished step that reruns
        write_json({"stamp": stamp.to_dict(), "status": "running"}, out / layout.PREDICT)
    for name, o in p.iter_fold_predictions(images, meta, progress=not quiet):
        write_fold_outputs(out / name, o.ids, o.probs, o.emb, missing["ID"].tolist(), prior)
    report = {"images": len(meta), "predicted": int((meta.status == "ok").sum()), "folds": [f.name for f in p.folds],
              "tta": p.folds[0].config.get("tta", "hflip"), "without_pixels": dict(zip(missing["ID"], missing["reason"])),
              "note": "images without usable pixel data got the training label frequencies (prior)" if len(missing) else ""}
    write_json({**report, "stamp": stamp.to_dict()} if stamp else report, out / layout.PREDICT)
    if not quiet:
        print(f"predicted {report['predicted']} of {report['images']} images with {len(p.folds)} fold model(s), "
              f"tta={report['tta']} -> {out}"
              + (f"\n  {len(missing)} image(s) without usable pixels got the prior: {list(missing['ID'][:10])}" if len(missing) else ""))
    return out


def main():
    a = parse_config(PredictConfig, description=__doc__, prog="python -m src.predict")
    if not a.run:
        raise PipelineError("give the run folder: python -m src.predict OUT/runs/<run>")
    predict_run(a.run, a.dicom_dir, a.pred_dir, a.device, a.batch_size, a.workers, a.overwrite)


if __name__ == "__main__":
    cli_main(main)
