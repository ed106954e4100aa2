"""DICOM files to slices of series: the per-file record, the series order, and a user's files decoded for inference.

    from src.scans import decode_files, list_inputs
    images, meta = decode_files(list_inputs(["/path/to/study/"]), size=256)   # (N, S, S, 3) uint8, metadata

`decode_one` turns one file into its windowed image and header fields, or the reason it gives none (the cache build
calls it for every file of a data set); `order_series` places each readable slice in its series; `decode_files`
decodes a user's files in memory with a run's preprocessing, for the Predictor. The pixel work is `src.dicom`'s.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from joblib import Parallel, delayed

from .dicom import (DEFAULT_WINDOWS, DicomError, check_header, dicom_to_image, header_fields, image_id_from_path,
                    read_dicom, series_fields)
from .utils import PipelineError


def list_inputs(inputs) -> list[Path]:
    """Files, and every file under folders (hidden ones excluded)."""
    files = []
    for p in map(Path, [inputs] if isinstance(inputs, (str, Path)) else inputs):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        elif p.is_file():
            files.append(p)
        else:
            raise PipelineError(f"not a file or folder: {p}")
    if not files:
        raise PipelineError("no files given")
    return files


UNKNOWN_SERIES = "unknown-series"  # the series of a user's files that carry no SeriesInstanceUID


def unknown_series(study: str) -> str:
    """The series of a study's files that carry no SeriesInstanceUID: one per study, so that two studies' such files
    are never taken as one series (series are keyed by SeriesInstanceUID alone downstream)."""
    return f"{UNKNOWN_SERIES}-{study}" if study else UNKNOWN_SERIES  # a folder name too: no colon


def read_one_header(path: str) -> dict:
    """One file's header, pixels left on disk: status ok with header_fields and series_fields, or skipped with the
    reason the file cannot be read (an image whose header declares what no CT slice can be, a decompression bomb, is
    refused here, before its pixels are looked at)."""
    try:
        ds = read_dicom(path, stop_before_pixels=True)
        if ds.get("Rows") is not None:  # an image: what its header declares is checked before anything else
            check_header(ds)
        head = {**header_fields(ds), **series_fields(ds)}
    except DicomError as e:
        return {"path": str(path), "status": "skipped", "reason": str(e)}
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as e:  # a malformed element read lazily
        return {"path": str(path), "status": "skipped", "reason": f"unreadable header ({type(e).__name__}: {str(e)[:120]})"}
    head["SeriesInstanceUID"] = head["SeriesInstanceUID"] or unknown_series(head["StudyInstanceUID"])
    return {"path": str(path), "status": "ok", "reason": "", **head}


def read_headers(paths, jobs: int = 1) -> pd.DataFrame:
    """Every file's header (read_one_header), one row per file in the order given: what a series selector reads
    before any pixel is decoded."""
    rows = Parallel(n_jobs=jobs)(delayed(read_one_header)(str(p)) for p in paths) if jobs != 1 \
        else [read_one_header(str(p)) for p in paths]
    df = pd.DataFrame(rows)
    for c in ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "SOPClassUID", "ImageType", "SeriesNumber",
              "SeriesDescription", "Manufacturer", "ConvolutionKernel", "ContrastBolusAgent"):
        df[c] = df[c].fillna("").astype(str) if c in df else ""
    return df


META_COLUMNS = ["ID", "split", "row", "status", "reason", "path", "PatientID", "StudyInstanceUID", "SeriesInstanceUID",
                "Modality", "z", "z_source", "rows", "cols"]


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


def record(image_id, split, row, path, img, head, reason) -> dict:
    """One metadata row (META_COLUMNS) for a decoded file."""
    return {"ID": image_id, "split": split, "row": row, "status": "ok" if img is not None else "skipped",
            "reason": reason, "path": path, **head}


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
        records.append(record(image_id, split, i, p, img, head, reason))
    meta = pd.DataFrame(records, columns=META_COLUMNS)
    meta["z"] = pd.to_numeric(meta["z"], errors="coerce")
    # a user's files without a SeriesInstanceUID are taken as one series rather than left unordered
    uid = meta["SeriesInstanceUID"].astype(object).where(meta["SeriesInstanceUID"].notna(), "").astype(str)
    placeholder = meta["StudyInstanceUID"].fillna("").astype(str).map(unknown_series)
    meta["SeriesInstanceUID"] = uid.where((uid != "") | (meta.status != "ok"), placeholder)
    return images, order_series(meta)
