"""Test-set (or any DICOM folder) predictions of every fold's best checkpoint of a run.

    python -m src.predict outputs/demo/runs/resnet10t_128                  # the cache's test images
    python -m src.predict outputs/demo/runs/resnet10t_128 --tta none
    python -m src.predict outputs/demo/runs/resnet10t_128 --dicom-dir /path/to/series --out preds/

Per fold, writes RUN/fold<K>/test.csv (ID + six probabilities) and test_emb.npy (embeddings, rows in
test.csv order) for the sequence stage; with --dicom-dir, the same files go to --out/fold<K>/.
Preprocessing is the run's own (preprocess.json and config.yaml: size, windows, input mode, 2.5D
neighbours). Test images with no usable pixel data still get a row, the training prior, and
RUN/predict_report.json lists them with the reason. Test-time augmentation: `hflip` (default) averages
each image with its mirror.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from .data import EpochSampler, SliceDataset, collate, neighbour_rows
from .evaluate import fold_dirs, run_config
from .infer import amp_settings, pick_device, predict_loader
from .labels import read_labels
from .model import model_from_checkpoint
from .prepare import decode_files, load_cache, windows_from_settings
from .utils import CLASSES, PipelineError, cli_main, out_root, write_csv, write_json, write_npy


def finished_folds(run_dir) -> list[Path]:
    folds = [d for d in fold_dirs(run_dir) if (d / "best.pth").exists() and (d / "oof.csv").exists()]
    if not folds:
        raise PipelineError(f"no trained fold in {run_dir} (fold*/best.pth with oof.csv): train first")
    return folds


def predict_images(fold_dir: Path, images, meta: pd.DataFrame, device, tta="hflip", batch_size=64, workers=0):
    """Probabilities and embeddings of fold_dir's best model for the metadata's ok rows."""
    model, cfg = model_from_checkpoint(fold_dir / "best.pth")
    model = model.to(device).to(memory_format=torch.channels_last)
    return predict_with_model(model, cfg, images, meta, device, tta, batch_size, workers, desc=f"predict {fold_dir.name}")


def slice_dataset(cfg: dict, images, meta: pd.DataFrame) -> SliceDataset:
    """The run's own input pipeline (input mode, size, crop) over the metadata's readable rows, without augmentation."""
    prev, nxt = neighbour_rows(meta)
    ok = (meta["status"] == "ok").to_numpy()
    return SliceDataset(images, meta["row"].to_numpy()[ok], prev_rows=prev[ok], next_rows=nxt[ok], mode=cfg["input_mode"],
                        size=cfg["img_size"], crop=cfg.get("crop_border", False))


def predict_with_model(model, cfg: dict, images, meta: pd.DataFrame, device, tta="hflip", batch_size=64, workers=0,
                       desc="predict", progress=True):
    """(IDs of the ok rows, probabilities, embeddings) of a loaded model."""
    ds = slice_dataset(cfg, images, meta)
    dl = DataLoader(ds, batch_size, sampler=EpochSampler(len(ds), shuffle=False), num_workers=workers, collate_fn=collate)
    amp_dtype, _ = amp_settings(device, cfg.get("amp", "auto"))
    _, probs, emb = predict_loader(model, dl, device, amp_dtype, hflip_tta=tta == "hflip", desc=desc, progress=progress)
    return meta["ID"].to_numpy()[(meta["status"] == "ok").to_numpy()], probs, emb


def training_prior(run_dir) -> np.ndarray:
    labels = read_labels(Path(run_config(run_dir)["data_dir"]) / "stage_2_train.csv")
    return labels[CLASSES].mean().to_numpy()


def write_fold_outputs(out_dir: Path, ids_ok, probs, emb, ids_missing, prior):
    """test.csv has every image: model rows, then prior rows for images without usable pixels (zero embeddings)."""
    df = pd.DataFrame(probs, columns=CLASSES, index=pd.Index(ids_ok, name="ID"))
    if len(ids_missing):
        df = pd.concat([df, pd.DataFrame([prior] * len(ids_missing), columns=CLASSES, index=pd.Index(ids_missing, name="ID"))])
        emb = np.concatenate([emb, np.zeros((len(ids_missing), emb.shape[1]), emb.dtype)])
    df.insert(0, "source", ["model"] * len(ids_ok) + ["prior"] * len(ids_missing))
    write_npy(emb, out_dir / "test_emb.npy")
    write_csv(df, out_dir / "test.csv", float_format="%.6g")


def predict_run(run_dir, tta="hflip", dicom_dir=None, out=None, device="auto", batch_size=64, workers=0, quiet=False):
    run_dir = Path(run_dir)
    device = pick_device(device)
    folds = finished_folds(run_dir)
    settings = json.loads((folds[0] / "preprocess.json").read_text())
    if dicom_dir:
        paths = sorted(p for p in Path(dicom_dir).rglob("*") if p.is_file() and not p.name.startswith("."))
        images, meta = decode_files(paths, windows_from_settings(settings), settings["size"])
        out = Path(out) if out else run_dir / "predict_folder"
    else:
        cfg = run_config(run_dir)
        root = out_root(cfg["data_dir"], cfg.get("out_dir"))
        images, meta = load_cache(root / "cache")
        meta = meta[meta.split == "test"].reset_index(drop=True)
        if meta.empty:
            raise PipelineError(f"the cache in {root / 'cache'} has no test images")
        out = run_dir
    prior = training_prior(run_dir) if not dicom_dir else np.full(len(CLASSES), np.nan)
    missing = meta[meta.status != "ok"]
    for fd in folds:
        ids, probs, emb = predict_images(fd, images, meta, device, tta, batch_size, workers)
        write_fold_outputs(out / fd.name, ids, probs, emb, missing["ID"].tolist(), prior)
    report = {"images": len(meta), "predicted": int((meta.status == "ok").sum()), "folds": [f.name for f in folds],
              "tta": tta, "without_pixels": dict(zip(missing["ID"], missing["reason"])),
              "note": "images without usable pixel data got the training label frequencies (prior)" if len(missing) else ""}
    write_json(report, out / "predict_report.json")
    if not quiet:
        print(f"predicted {report['predicted']} of {report['images']} images with {len(folds)} fold model(s), tta={tta} -> {out}"
              + (f"\n  {len(missing)} image(s) without usable pixels got the prior: {list(missing['ID'][:10])}" if len(missing) else ""))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="run directory (holding fold*/best.pth)")
    ap.add_argument("--tta", choices=["none", "hflip"], default="hflip")
    ap.add_argument("--dicom-dir", default=None, help="predict this folder of DICOMs instead of the test set")
    ap.add_argument("--out", default=None, help="with --dicom-dir: where to write (default RUN/predict_folder)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=0)
    a = ap.parse_args()
    predict_run(a.run, a.tta, a.dicom_dir, a.out, a.device, a.batch_size, a.workers)


if __name__ == "__main__":
    cli_main(main)
