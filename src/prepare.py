"""Decode every DICOM once into an image cache and a per-slice metadata table.

    python -m src.prepare input/                                  # cache in outputs/input/cache
    python -m src.prepare ../shared/rsna_sample --cache-size 256 --out-dir outputs/rsna_sample

The cache is one uint8 array `images.npy` of shape (N, size, size, 3) that the data loader memory-maps
(a sample is one slice of it: no decoding, no windowing, no resizing per epoch), and `metadata.csv`,
one row per file: ID, split, row in the array, status and reason, PatientID, Study/Series UIDs, z,
the slice's index in its series ordered by z, the series length, and the previous/next slice IDs.
The label file is parsed here once into `labels.csv` beside them (see labels.cached_labels).

Work is split into chunks of rows decoded in parallel (joblib, all cores). Each chunk writes its rows
straight into `images.partial.npy` and then records itself in `chunks/` (atomically); a rerun after a
kill skips finished chunks. Only when every chunk is done is the array renamed to `images.npy`, so
a finished cache is byte-identical to one built without interruption and a half-built one never
looks finished. Files that cannot be read are recorded with their reason and counted in
`summary.json`; their rows stay zero and they have status `skipped`. Labelled images without a file
are counted there too.

`cache_config.json` is the cache's stamp: its size and windows and the names and sizes of its files.
A finished cache is reused only when they all match; otherwise the command stops and says what differs
(`--overwrite` rebuilds). Before a build starts, free disk space is checked against the array's size:
N x size x size x 3 bytes, e.g. 874,035 x 256 x 256 x 3 = 171.8 GB for the competition's train + test.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from tqdm import tqdm

from . import layout
from .config import parse_config, positional
from .dicom import DEFAULT_WINDOWS, DicomError, dicom_to_image, header_fields, image_id_from_path, read_dicom
from .labels import cached_labels
from .layout import SPLITS, SYNTHETIC_MARKER
from .stamps import Stamp, announce_skip, fingerprint, guard
from .utils import PipelineError, cli_main, write_csv, write_json
META_COLUMNS = ["ID", "split", "row", "status", "reason", "path", "PatientID", "StudyInstanceUID", "SeriesInstanceUID",
                "Modality", "z", "z_source", "rows", "cols"]


def parse_windows(text: str):
    """'40,80 80,200 600,2800' -> ((40, 80), ...); 'file' stands for the file's own window."""
    out = []
    for tok in text.split():
        if tok == "file":
            out.append(None)
            continue
        try:
            c, w = (float(v) for v in tok.split(","))
        except ValueError:
            raise PipelineError(f"--windows: {tok!r} is not 'center,width' in HU (e.g. 40,80) or 'file'") from None
        if not (np.isfinite(c) and np.isfinite(w) and w > 0):
            raise PipelineError(f"--windows: {tok!r} needs a finite center and a width > 0")
        out.append((c, w))
    if len(out) != 3:
        raise PipelineError(f"--windows needs three windows (one per channel), got {text!r}")
    return tuple(out)


def list_files(data_dir: Path) -> pd.DataFrame:
    """All DICOM files of the Kaggle layout, train then test, each sorted by name, with their sizes."""
    rows = []
    for split, sub in SPLITS.items():
        d = Path(data_dir) / sub
        if d.is_dir():
            with os.scandir(d) as it:
                rows += sorted((image_id_from_path(e.name), split, e.path, e.stat().st_size)
                               for e in it if e.name.endswith(".dcm"))
    if not rows:
        raise PipelineError(f"no DICOM files under {data_dir}/{{{','.join(SPLITS.values())}}}; "
                            f"is this a Kaggle-layout data folder? (python -m src.synth writes a demo one)")
    df = pd.DataFrame(rows, columns=["ID", "split", "path", "bytes"])
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
    """Decode a chunk's files into one buffer and write it at the chunk's rows with a single pwrite: no memory
    map of the whole array (whose flush would write back every worker's dirty pages, not just this chunk's)."""
    buf = np.zeros((len(files), *shape[1:]), np.uint8)
    records = []
    for i, (image_id, split, path) in enumerate(files[["ID", "split", "path"]].itertuples(index=False)):
        img, head, reason = decode_one(path, windows, size)
        if img is not None:
            buf[i] = img
        records.append(_record(image_id, split, start + i, path, img, head, reason))
    offset = np.load(array_path, mmap_mode="r").offset + start * buf[0].nbytes
    fd = os.open(array_path, os.O_WRONLY)
    try:
        view, written = memoryview(buf).cast("B"), 0
        while written < len(view):  # pwrite may write less than asked
            written += os.pwrite(fd, view[written:], offset + written)
    finally:
        os.close(fd)
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


def files_fingerprint(files: pd.DataFrame) -> str:
    """Of the files' split, names and sizes: a file added, removed, renamed or rewritten changes it."""
    return fingerprint("\n".join(f"{sp}/{Path(p).name}:{n}" for sp, p, n in
                                       files[["split", "path", "bytes"]].itertuples(index=False)))


def prepare_stamp(files: pd.DataFrame, size: int, windows, limit=0) -> Stamp:
    """Train and test files are fingerprinted apart: training depends on the train part only, so a changed
    test set (the stage-2 test folder added later, a corrupt test file replaced) never makes a trained fold stale."""
    return Stamp("prepare", {"size": size, "windows": [list(w) if w else "file" for w in windows],
                                  "limit": int(limit or 0)},
                      {f"{split}_files": files_fingerprint(files[files.split == split]) for split in SPLITS})


def cache_stamp(cache_dir) -> Stamp:
    """The stamp of a finished cache."""
    P = cache_paths(Path(cache_dir))
    stamp = Stamp.load(P["config"]) if P["images"].exists() else None
    if stamp is None:
        raise PipelineError(f"no finished image cache in {cache_dir}: run `python -m src.prepare DATA_DIR` first")
    return stamp


def cache_fingerprint(cache_dir, split: str) -> str:
    """What a step that reads one split of the cache records as its `cache` input: the cache's settings and
    that split's files (training: train; test predictions: test)."""
    stamp = cache_stamp(cache_dir)
    return fingerprint({"settings": stamp.settings, "files": stamp.inputs.get(f"{split}_files")})


def check_disk(path: Path, need: int, have_already: int = 0) -> None:
    """Stop before a build that cannot fit: a full disk kills a worker with SIGBUS halfway through."""
    free = shutil.disk_usage(path).free
    if need - have_already > free:
        gb = lambda b: f"{b / 1e9:,.1f} GB"  # noqa: E731
        raise PipelineError(f"the image cache needs {gb(need)} ({gb(need - have_already)} still to write) but "
                            f"{path} has {gb(free)} free: free space, put the outputs on a larger disk "
                            f"(--out-dir / OUT_DIR), or use a smaller --cache-size (the size grows with its square)")


def labelled_but_missing(data_dir: Path, cache_dir: Path, files: pd.DataFrame) -> list[str]:
    """IDs in stage_2_train.csv without a file in stage_2_train_images (dropped from training: said, not silent)."""
    if not (data_dir / "stage_2_train.csv").exists():
        return []
    labels, _ = cached_labels(data_dir, cache=cache_dir)  # parsed once here; later steps read the cached table
    return sorted(labels.index.difference(files.loc[files.split == "train", "ID"]))


def prepare(data_dir, cache_dir=None, size=256, windows=DEFAULT_WINDOWS, jobs=-1, chunk=128, limit=None,
            quiet=False, overwrite=False, out_dir=None) -> dict:
    """Build (or finish) the cache; returns the summary dict. A finished cache made with the same settings
    and files is kept; one made with others stops the build (`overwrite` rebuilds it)."""
    data_dir = Path(data_dir)
    cache_dir = Path(cache_dir) if cache_dir else layout.cache_dir(data_dir, out_dir)
    P = cache_paths(cache_dir)
    t0 = time.time()
    files = list_files(data_dir)
    if limit:
        files = files.iloc[:limit]
    stamp = prepare_stamp(files, size, windows, limit)
    if guard(stamp, P["config"], P["images"].exists(), overwrite, f"the image cache {cache_dir}",
                  exists=P["images"].exists(), clear=[P["images"], P["meta"], P["summary"]],
                  redo="--overwrite (rebuilds the whole cache)"):
        if not quiet:
            announce_skip(f"image cache {cache_dir}")
        return json.loads(P["summary"].read_text())

    cache_dir.mkdir(parents=True, exist_ok=True)
    shape = (len(files), size, size, 3)
    open_partial(P, stamp, shape, chunk, data_dir, quiet)
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
    return finish(P, files, [markers[s] for s in starts], data_dir, cache_dir, size, t0, quiet)


def open_partial(P: dict, stamp: Stamp, shape, chunk: int, data_dir: Path, quiet: bool) -> None:
    """images.partial.npy and chunks/ of this build: kept when a killed build with the same stamp left them, else
    made anew (a partial build of other settings is never reused), after the disk check."""
    build = json.loads(P["config"].read_text()) if P["config"].exists() else {}
    partial_ok = P["partial"].exists() and (Stamp.load(P["config"]) or stamp).id == stamp.id \
        and build.get("chunk") == chunk  # chunk markers name their first row: another --chunk cannot resume them
    if not partial_ok:
        if P["partial"].exists() and not quiet:
            print("a partial cache made with other settings or files is discarded")
        shutil.rmtree(P["chunks"], ignore_errors=True)
        P["partial"].unlink(missing_ok=True)
        check_disk(P["partial"].parent, int(np.prod(shape)))
        write_json({**stamp.to_dict(), "data_dir": str(data_dir.resolve()), "n_files": shape[0], "chunk": chunk,
                    "format": "uint8 (N, size, size, 3) npy, rows as metadata.csv"}, P["config"])
        np.lib.format.open_memmap(P["partial"], mode="w+", dtype=np.uint8, shape=shape).flush()  # sparse, zeros
    else:
        check_disk(P["partial"].parent, int(np.prod(shape)), P["partial"].stat().st_blocks * 512)
    P["chunks"].mkdir(exist_ok=True)


def finish(P: dict, files: pd.DataFrame, markers: list, data_dir: Path, cache_dir: Path, size: int, t0: float,
           quiet: bool) -> dict:
    """Join the chunks' records into metadata.csv, write summary.json, and rename the array: the cache is complete."""
    meta = pd.concat([pd.read_csv(m, dtype={"reason": str, "PatientID": str}, keep_default_na=False,
                                  na_values={"z": [""]}) for m in markers], ignore_index=True)
    if len(meta) != len(files) or not (meta["row"].to_numpy() == np.arange(len(files))).all():
        raise PipelineError(f"{cache_dir}: the chunk records cover {len(meta)} of {len(files)} files; the partial build "
                            f"is inconsistent: delete {P['partial']} and {P['chunks']} and run again")
    meta = order_series(meta.sort_values("row").reset_index(drop=True))
    write_csv(meta, P["meta"], index=False)
    skipped = meta[meta.status != "ok"]
    missing = labelled_but_missing(data_dir, cache_dir, files)
    summary = {"data_dir": str(data_dir), "slices": len(meta), "done": int((meta.status == "ok").sum()),
               "skipped": len(skipped), "skipped_reasons": dict(Counter(skipped["reason"])),
               "skipped_ids": skipped["ID"].tolist()[:100],
               "labelled_missing_files": len(missing), "labelled_missing_ids": missing[:100],
               "z_sources": dict(Counter(meta.loc[meta.status == "ok", "z_source"])),
               "series": int(meta.loc[meta.status == "ok", "SeriesInstanceUID"].nunique()),
               "synthetic": (data_dir / SYNTHETIC_MARKER).exists(),
               "seconds_this_run": round(time.time() - t0, 2), "size": size}
    write_json(summary, P["summary"])
    os.replace(P["partial"], P["images"])  # the moment the cache becomes complete
    shutil.rmtree(P["chunks"], ignore_errors=True)
    if not quiet:
        print(f"cached {summary['done']} of {summary['slices']} slices in {summary['series']} series to {cache_dir} "
              f"in {summary['seconds_this_run']}s; skipped {summary['skipped']}"
              + "".join(f"\n  skipped {i}: {r}" for i, r in zip(skipped["ID"][:20], skipped["reason"][:20]))
              + (f"\n  {len(missing)} labelled image(s) have no file in {SPLITS['train']}/ and are left out: "
                 f"{missing[:10]}" if missing else ""))
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
    st = cache_stamp(cache_dir).settings
    return {"size": st["size"], "windows": st["windows"]}


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


@dataclass
class PrepareConfig:
    data_dir: str = positional("input")  # Kaggle-layout data folder
    out_dir: str = ""                    # outputs root (default outputs/<data folder name>); the cache goes in OUT/cache
    cache_size: int = 256                # cached image size in pixels (square)
    windows: str = "40,80 80,200 600,2800"  # three 'center,width' HU windows, or 'file' for the file's own
    workers: int = -1                    # decoding processes (-1: all cores)
    chunk: int = 128                     # slices per work unit (the unit of resume)
    limit: int = 0                       # only the first N files (a quick look); 0: all
    overwrite: bool = False              # rebuild a cache made with other settings or files (else: stop and say)


def main():
    c = parse_config(PrepareConfig, description=__doc__, prog="python -m src.prepare")
    prepare(c.data_dir, layout.cache_dir(c.data_dir, c.out_dir), c.cache_size, parse_windows(c.windows), c.workers,
            c.chunk, c.limit, overwrite=c.overwrite)


if __name__ == "__main__":
    cli_main(main)
