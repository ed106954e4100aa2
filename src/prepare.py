"""Decode every DICOM once into an image cache and a per-slice metadata table.

    python -m src.prepare input/                         # cache in outputs/input/cache
    python -m src.prepare ../shared/rsna_sample --size 256 --out outputs/rsna_sample

The cache is one uint8 array `images.npy` of shape (N, size, size, 3) that the data loader memory-maps
(a sample is one slice of it: no decoding, no windowing, no resizing per epoch), and `metadata.csv`,
one row per file: ID, split, row in the array, status and reason, PatientID, Study/Series UIDs, z,
the slice's index in its series ordered by z, the series length, and the previous/next slice IDs.

Work is split into chunks of rows decoded in parallel (joblib, all cores). Each chunk writes its rows
straight into `images.partial.npy` and then records itself in `chunks/` (atomically); a rerun after a
kill skips finished chunks. Only when every chunk is done is the array renamed to `images.npy`, so
a finished cache is byte-identical to one built without interruption and a half-built one never
looks finished. Files that cannot be read are recorded with their reason and counted in
`summary.json`; their rows stay zero and they have status `skipped`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from tqdm import tqdm

from .dicom import DEFAULT_WINDOWS, DicomError, dicom_to_image, header_fields, image_id_from_path, read_dicom
from .utils import PipelineError, ROOT, cli_main, default_out_dir, out_root, write_csv, write_json

SPLITS = {"train": "stage_2_train_images", "test": "stage_2_test_images"}
META_COLUMNS = ["ID", "split", "row", "status", "reason", "path", "PatientID", "StudyInstanceUID", "SeriesInstanceUID",
                "Modality", "z", "z_source", "rows", "cols"]


def parse_windows(text: str):
    """'40,80 80,200 600,2800' -> ((40, 80), ...); 'file' stands for the file's own window."""
    out = []
    for tok in text.split():
        if tok == "file":
            out.append(None)
        else:
            c, w = tok.split(",")
            out.append((float(c), float(w)))
    if len(out) != 3:
        raise PipelineError(f"--windows needs three windows (one per channel), got {text!r}")
    return tuple(out)


def list_files(data_dir: Path) -> pd.DataFrame:
    """All DICOM files of the Kaggle layout, train then test, each sorted by name."""
    rows = []
    for split, sub in SPLITS.items():
        d = data_dir / sub
        if d.is_dir():
            rows += [(image_id_from_path(p.name), split, str(p)) for p in sorted(d.glob("*.dcm"))]
    if not rows:
        raise PipelineError(f"no DICOM files under {data_dir}/{{{','.join(SPLITS.values())}}}; "
                            f"is this a Kaggle-layout data folder? (python -m src.synth writes a demo one)")
    df = pd.DataFrame(rows, columns=["ID", "split", "path"])
    dup = df["ID"].duplicated(keep=False)
    if dup.any():
        raise PipelineError(f"image ID(s) found in more than one file: {df.loc[dup, 'path'].head(6).tolist()}")
    return df


def decode_one(path: str, windows, size: int):
    """One file -> (image or None, header dict, reason). Files of another modality are refused."""
    try:
        ds = read_dicom(path)
        head = header_fields(ds)
    except DicomError as e:
        return None, {}, str(e)
    if head["Modality"] not in ("CT", ""):
        return None, head, f"not a CT image (Modality {head['Modality']})"
    try:
        return dicom_to_image(ds, windows, size), head, ""
    except DicomError as e:
        return None, head, str(e)


def _record(image_id, split, row, path, img, head, reason) -> dict:
    """One metadata row (META_COLUMNS) for a decoded file."""
    return {"ID": image_id, "split": split, "row": row, "status": "ok" if img is not None else "skipped",
            "reason": reason, "path": path, **head}


def _process_chunk(files: pd.DataFrame, start: int, array_path: str, shape, windows, size: int, marker: str):
    arr = np.load(array_path, mmap_mode="r+")
    records = []
    for i, (image_id, split, path) in enumerate(files[["ID", "split", "path"]].itertuples(index=False)):
        img, head, reason = decode_one(path, windows, size)
        if img is not None:
            arr[start + i] = img
        records.append(_record(image_id, split, start + i, path, img, head, reason))
    arr.flush()
    del arr
    write_csv(pd.DataFrame(records, columns=META_COLUMNS), marker, index=False)
    return len(records)


def order_series(meta: pd.DataFrame) -> pd.DataFrame:
    """Add slice_index, series_len, prev_id and next_id: each series ordered by z (ID breaks ties).

    Slices that could not be read take no place in their series (slice_index -1)."""
    meta = meta.copy()
    meta["slice_index"] = -1
    meta["series_len"] = 0
    meta["prev_id"] = ""
    meta["next_id"] = ""
    ok = meta[(meta.status == "ok") & (meta.SeriesInstanceUID.fillna("") != "")]
    ok = ok.sort_values(["SeriesInstanceUID", "z", "ID"], na_position="last")
    g = ok.groupby("SeriesInstanceUID", sort=False)
    idx = g.cumcount()
    meta.loc[ok.index, "slice_index"] = idx.to_numpy()
    meta.loc[ok.index, "series_len"] = g["ID"].transform("size").to_numpy()
    meta.loc[ok.index, "prev_id"] = g["ID"].shift(1).fillna("").to_numpy()
    meta.loc[ok.index, "next_id"] = g["ID"].shift(-1).fillna("").to_numpy()
    return meta


def cache_paths(cache_dir: Path) -> dict:
    return {k: cache_dir / v for k, v in dict(images="images.npy", partial="images.partial.npy", meta="metadata.csv",
                                              summary="summary.json", config="cache_config.json",
                                              chunks="chunks").items()}


def prepare(data_dir, cache_dir=None, size=256, windows=DEFAULT_WINDOWS, jobs=-1, chunk=128, limit=None,
            quiet=False) -> dict:
    """Build (or finish) the cache; returns the summary dict."""
    data_dir = Path(data_dir)
    cache_dir = Path(cache_dir) if cache_dir else default_out_dir(data_dir) / "cache"
    P = cache_paths(cache_dir)
    t0 = time.time()
    files = list_files(data_dir)
    if limit:
        files = files.iloc[:limit]
    fingerprint = hashlib.sha256("\n".join(files["path"]).encode()).hexdigest()[:16]
    config = {"data_dir": str(data_dir.resolve()), "size": size, "windows": [list(w) if w else "file" for w in windows],
              "n_files": len(files), "files_sha": fingerprint, "format": "uint8 (N, size, size, 3) npy, rows as metadata.csv"}

    if P["images"].exists() and P["meta"].exists() and P["config"].exists():
        if json.loads(P["config"].read_text()) == config:
            if not quiet:
                print(f"cache up to date: {cache_dir}")
            return json.loads(P["summary"].read_text())
        if not quiet:
            print(f"cache settings or files changed; rebuilding {cache_dir}")
        P["images"].unlink()

    cache_dir.mkdir(parents=True, exist_ok=True)
    shape = (len(files), size, size, 3)
    partial_ok = P["partial"].exists() and P["config"].exists() and json.loads(P["config"].read_text()) == config
    if not partial_ok:  # settings changed or first run: start clean
        shutil.rmtree(P["chunks"], ignore_errors=True)
        P["partial"].unlink(missing_ok=True)
        write_json(config, P["config"])
        np.lib.format.open_memmap(P["partial"], mode="w+", dtype=np.uint8, shape=shape).flush()  # sparse, zeros
    P["chunks"].mkdir(exist_ok=True)

    starts = list(range(0, len(files), chunk))
    markers = {s: P["chunks"] / f"{s:09d}.csv" for s in starts}
    todo = [s for s in starts if not markers[s].exists()]
    if not quiet and len(todo) < len(starts):
        print(f"resuming: {len(starts) - len(todo)} of {len(starts)} chunks already done")
    n_jobs = os.cpu_count() if jobs in (-1, 0, None) else jobs
    tasks = (delayed(_process_chunk)(files.iloc[s:s + chunk], s, str(P["partial"]), shape, windows, size, str(markers[s]))
             for s in todo)
    with tqdm(total=sum(min(chunk, len(files) - s) for s in todo), unit="slice", desc="prepare", disable=quiet,
              mininterval=1.0) as bar:
        for n in Parallel(n_jobs=n_jobs, return_as="generator_unordered")(tasks):
            bar.update(n)

    meta = pd.concat([pd.read_csv(markers[s], dtype={"reason": str, "PatientID": str}, keep_default_na=False,
                                  na_values={"z": [""]}) for s in starts], ignore_index=True)
    meta = order_series(meta.sort_values("row").reset_index(drop=True))
    write_csv(meta, P["meta"], index=False)
    skipped = meta[meta.status != "ok"]
    summary = {"data_dir": str(data_dir), "slices": len(meta), "done": int((meta.status == "ok").sum()),
               "skipped": len(skipped), "skipped_reasons": dict(Counter(skipped["reason"])),
               "skipped_ids": skipped["ID"].tolist()[:100], "z_sources": dict(Counter(meta.loc[meta.status == "ok", "z_source"])),
               "series": int(meta.loc[meta.status == "ok", "SeriesInstanceUID"].nunique()),
               "seconds_this_run": round(time.time() - t0, 2), "size": size}
    write_json(summary, P["summary"])
    os.replace(P["partial"], P["images"])  # the moment the cache becomes complete
    shutil.rmtree(P["chunks"], ignore_errors=True)
    if not quiet:
        print(f"cached {summary['done']} of {summary['slices']} slices in {summary['series']} series to {cache_dir} "
              f"in {summary['seconds_this_run']}s; skipped {summary['skipped']}"
              + "".join(f"\n  skipped {i}: {r}" for i, r in zip(skipped["ID"][:20], skipped["reason"][:20])))
    return summary


def decode_files(paths, windows=DEFAULT_WINDOWS, size=256, jobs=1, split="test"):
    """Decode a list of files in memory (for a folder of a user's DICOMs, not a whole dataset):
    (uint8 images (N, size, size, 3), metadata in the cache's format with series ordering)."""
    paths = [str(p) for p in paths]
    if not paths:
        raise PipelineError("no files to decode")
    results = Parallel(n_jobs=jobs)(delayed(decode_one)(p, windows, size) for p in paths)  # n_jobs=1: in-process
    images = np.zeros((len(paths), size, size, 3), np.uint8)
    records = []
    ids = [image_id_from_path(p) for p in paths]
    if len(set(ids)) < len(ids):  # stems can repeat across folders: fall back to the full path
        ids = paths
    for i, (p, image_id, (img, head, reason)) in enumerate(zip(paths, ids, results)):
        if img is not None:
            images[i] = img
        records.append(_record(image_id, split, i, p, img, head, reason))
    meta = pd.DataFrame(records, columns=META_COLUMNS)
    meta["z"] = pd.to_numeric(meta["z"], errors="coerce")
    # a user's files without a SeriesInstanceUID are taken as one series rather than left unordered
    uid = meta["SeriesInstanceUID"].fillna("").astype(str)
    meta["SeriesInstanceUID"] = uid.where((uid != "") | (meta.status != "ok"), "unknown-series")
    return images, order_series(meta)


def cache_settings(cache_dir) -> dict:
    """The preprocessing a cache was built with (size and windows), which inference must repeat."""
    cfg = json.loads((Path(cache_dir) / "cache_config.json").read_text())
    return {"size": cfg["size"], "windows": cfg["windows"]}


def windows_from_settings(settings: dict):
    return tuple(None if w == "file" else tuple(w) for w in settings["windows"])


def load_cache(cache_dir):
    """(memory-mapped images, metadata) of a finished cache; a clear error where there is none."""
    P = cache_paths(Path(cache_dir))
    if not P["images"].exists() or not P["meta"].exists():
        raise PipelineError(f"no finished image cache in {cache_dir}: run `python -m src.prepare DATA_DIR` first")
    meta = pd.read_csv(P["meta"], dtype={"reason": str, "prev_id": str, "next_id": str, "PatientID": str},
                       keep_default_na=False, na_values={"z": [""]})
    return np.load(P["images"], mmap_mode="r"), meta


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir", nargs="?", default=str(ROOT / "input"), help="Kaggle-layout data folder (default input/)")
    ap.add_argument("--out", default=None, help="output folder (default outputs/<data folder name>); cache goes in OUT/cache")
    ap.add_argument("--size", type=int, default=256, help="cached image size in pixels (square)")
    ap.add_argument("--windows", default="40,80 80,200 600,2800",
                    help="three 'center,width' HU windows, or 'file' for the file's own (default brain/subdural/bone)")
    ap.add_argument("--jobs", type=int, default=-1, help="worker processes (-1: all cores)")
    ap.add_argument("--chunk", type=int, default=128, help="slices per work unit (the unit of resume)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N files (for a quick look)")
    a = ap.parse_args()
    out = out_root(a.data_dir, a.out)
    prepare(a.data_dir, out / "cache", a.size, parse_windows(a.windows), a.jobs, a.chunk, a.limit)


if __name__ == "__main__":
    cli_main(main)
