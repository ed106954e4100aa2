"""Decode every DICOM once into a compact image cache and a per-slice metadata table.

    python -m src.prepare input/                                  # cache in outputs/input/cache
    python -m src.prepare ../shared/rsna_sample --cache-size 256 --out-dir outputs/rsna_sample

The cache is `images.bin`: one row per file, each the slice's three windows (uint8, size x size x 3) compressed
on its own with LZ4 (lossless: the loader gets exactly the bytes `dicom_to_image` made, ~4x smaller on real head
CT, ~0.06 ms to decompress a 256-px row), rows in series order, (split, SeriesInstanceUID, z, ID), so a 2.5D
sample's three slices are adjacent on disk, then the rows' byte offsets and a footer (src.cache reads it). Beside
it `metadata.csv`, one row per file: ID, split, row in the cache, status and reason, PatientID, Study/Series UIDs,
z, the slice's index in its series ordered by z, the series length, and the previous/next slice IDs. The label file
is parsed here once into `labels.csv` beside them (see labels.cached_labels). docs/benchmarks.md ("The compact
cache") has the measurements that chose this format.

The build first reads every file's header (series and z) to fix the row order, saved in `chunks/order.npy`. Then
chunks of rows are decoded in parallel (joblib, all cores); each writes its compressed rows to `chunks/<row>.bin`
and then records itself in `chunks/<row>.csv` (both atomically). The parent appends finished chunks, in row
order, to `images.partial.bin` and records how far it got in `chunks/appended.json`; a rerun after a kill cuts the
partial file back to that point and decodes only the chunks not done. When every chunk is in, the offsets and
the footer are appended and the file is renamed to `images.bin`, so a finished cache is byte-identical to one built
without interruption and a half-built one never looks finished. Files that cannot be read are recorded with their
reason and counted in `summary.json`; their rows are empty (zeros) and they have status `skipped`. Labelled images
without a file are counted there too.

`cache_config.json` is the cache's stamp: its size, windows and format and the names and sizes of its files. A
finished cache is reused only when they all match; otherwise the command stops and says what differs
(`--overwrite` rebuilds). Before a build starts, free disk space is checked against an upper estimate of the
cache's size, a third of N x size x size x 3 bytes: 57 GB for the competition's 874,035 files at 256 px, which
measure ~40 GB (the uncompressed array was 171.8 GB).
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
from .cache import FORMAT, encode_image, packed_tail
from .config import parse_config, positional
from .dicom import DEFAULT_WINDOWS, DicomError, header_fields, image_id_from_path, read_dicom
from .labels import cached_labels
from .layout import SPLITS, SYNTHETIC_MARKER
from .scans import META_COLUMNS, decode_one, order_series, record
from .stamps import Stamp, fingerprint, guard
from .utils import PipelineError, atomic_write, cli_main, write_csv, write_json, write_npy


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


# ---------------------------------------------------------------- the build
def _series_keys(paths: list[str]) -> list[tuple[str, float]]:
    """(SeriesInstanceUID, z) from each file's header; ("", nan) where the header cannot be read."""
    out = []
    for p in paths:
        try:
            head = header_fields(read_dicom(p, stop_before_pixels=True))
            out.append((head["SeriesInstanceUID"], head["z"]))
        except DicomError:
            out.append(("", float("nan")))
    return out


def row_order(files: pd.DataFrame, jobs: int = 1, quiet: bool = True) -> np.ndarray:
    """The cache's rows as positions in `files`: by split (train, then test), series, z and ID, so the slices of a
    series are adjacent rows in z order; files without a series (or with an unreadable header) follow the series
    of their split, by ID."""
    paths = files["path"].tolist()
    parts = [paths[i:i + 1024] for i in range(0, len(paths), 1024)]
    keys: list = []
    # worker processes take seconds to start and one reads ~3,000 headers a second: a few parts stay in-process
    with tqdm(total=len(paths), unit="file", desc="series and z", disable=quiet, mininterval=1.0) as bar:
        for part in Parallel(n_jobs=1 if len(parts) < 8 else jobs, return_as="generator")(
                delayed(_series_keys)(p) for p in parts):
            keys += part
            bar.update(len(part))
    series = [k[0] for k in keys]
    df = pd.DataFrame({"split": files["split"].map({s: i for i, s in enumerate(SPLITS)}).to_numpy(),
                       "alone": [s == "" for s in series], "series": series, "z": [k[1] for k in keys],
                       "ID": files["ID"].to_numpy()})
    return df.sort_values(["split", "alone", "series", "z", "ID"], na_position="last", kind="stable").index.to_numpy()


def _process_chunk(files: pd.DataFrame, start: int, windows, size: int, data: str, marker: str):
    """Decode a chunk's files (cache rows start, start + 1, ...) and write their compressed rows to `data` and
    their records, with each row's length in bytes, to `marker`: both atomically, the marker last, so a chunk
    with a marker has its data. Returns (start, files done)."""
    blobs, records = [], []
    for i, (image_id, split, path) in enumerate(files[["ID", "split", "path"]].itertuples(index=False)):
        img, head, reason = decode_one(path, windows, size)
        blobs.append(b"" if img is None else encode_image(img))
        records.append({**record(image_id, split, start + i, path, img, head, reason), "nbytes": len(blobs[-1])})
    with atomic_write(data, "wb") as f:
        f.write(b"".join(blobs))
    write_csv(pd.DataFrame(records, columns=[*META_COLUMNS, "nbytes"]), marker, index=False)
    return start, len(records)


def chunk_files(P: dict, start: int) -> tuple[Path, Path]:
    """(compressed rows, records) of the chunk whose first row is `start`."""
    return P["chunks"] / f"{start:09d}.bin", P["chunks"] / f"{start:09d}.csv"


def files_fingerprint(files: pd.DataFrame) -> str:
    """Of the files' split, names and sizes: a file added, removed, renamed or rewritten changes it."""
    return fingerprint("\n".join(f"{sp}/{Path(p).name}:{n}" for sp, p, n in
                                       files[["split", "path", "bytes"]].itertuples(index=False)))


def prepare_stamp(files: pd.DataFrame, size: int, windows, limit=0) -> Stamp:
    """Train and test files are fingerprinted apart: training depends on the train part only, so a changed
    test set (the stage-2 test folder added later, a corrupt test file replaced) never makes a trained fold stale.
    The settings name the cache's format, so a cache of another format is never read as this one."""
    return Stamp("prepare", {"size": size, "windows": [list(w) if w else "file" for w in windows],
                             "limit": int(limit or 0), "format": FORMAT},
                 {f"{split}_files": files_fingerprint(files[files.split == split]) for split in SPLITS})


def estimated_bytes(n: int, size: int) -> int:
    """An upper estimate of a cache's size: a third of the uncompressed images (real head CT compresses ~4.3x at
    256 px, docs/benchmarks.md "The compact cache"), plus the row offsets."""
    return n * size * size * 3 // 3 + 8 * (n + 1)


def check_disk(path: Path, need: int, have_already: int = 0) -> None:
    """Stop before a build that cannot fit (a full disk would stop it halfway)."""
    free = shutil.disk_usage(path).free
    if need - have_already > free:
        gb = lambda b: f"{b / 1e9:,.1f} GB"  # noqa: E731
        raise PipelineError(f"the image cache needs up to {gb(need)} ({gb(need - have_already)} still to write) but "
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
    P = layout.cache_files(cache_dir)
    t0 = time.time()
    files = list_files(data_dir)
    if limit:
        files = files.iloc[:limit]
    stamp = prepare_stamp(files, size, windows, limit)
    if guard(stamp, P["config"], P["images"].exists(), overwrite, f"the image cache {cache_dir}",
             exists=P["images"].exists() or P["old_images"].exists(),
             clear=[P["images"], P["meta"], P["summary"], P["old_images"]], redo="--overwrite (rebuilds the whole cache)",
             quiet=quiet):
        return json.loads(P["summary"].read_text())

    cache_dir.mkdir(parents=True, exist_ok=True)
    n_jobs = os.cpu_count() if jobs in (-1, 0, None) else jobs
    open_partial(P, stamp, len(files), size, chunk, data_dir, quiet)
    order = P["chunks"] / "order.npy"
    if not order.exists():
        write_npy(row_order(files, n_jobs, quiet), order)
    files = files.iloc[np.load(order)].reset_index(drop=True)  # row r of the cache is file r of this table
    write_rows(P, files, windows, size, chunk, n_jobs, quiet)
    return finish(P, files, chunk, data_dir, cache_dir, size, t0, quiet)


def open_partial(P: dict, stamp: Stamp, n: int, size: int, chunk: int, data_dir: Path, quiet: bool) -> None:
    """images.partial.bin and chunks/ of this build: kept when a killed build with the same stamp left them, else
    made anew (a partial build of other settings is never reused), after the disk check."""
    build = json.loads(P["config"].read_text()) if P["config"].exists() else {}
    partial_ok = P["partial"].exists() and (Stamp.load(P["config"]) or stamp).id == stamp.id \
        and build.get("chunk") == chunk  # chunk files name their first row: another --chunk cannot resume them
    if not partial_ok:
        if (P["partial"].exists() or P["old_partial"].exists()) and not quiet:
            print("a partial cache made with other settings or files is discarded")
        shutil.rmtree(P["chunks"], ignore_errors=True)
        P["partial"].unlink(missing_ok=True)
        P["old_partial"].unlink(missing_ok=True)
        check_disk(P["partial"].parent, estimated_bytes(n, size))
        write_json({**stamp.to_dict(), "data_dir": str(data_dir.resolve()), "n_files": n, "chunk": chunk,
                    "format": f"{FORMAT}: images.bin (PackedImages), rows as metadata.csv"}, P["config"])
        P["partial"].write_bytes(b"")
    else:
        have = sum(p.stat().st_size for p in [P["partial"], *P["chunks"].glob("*.bin")])
        check_disk(P["partial"].parent, estimated_bytes(n, size), have)
    P["chunks"].mkdir(exist_ok=True)


def write_rows(P: dict, files: pd.DataFrame, windows, size: int, chunk: int, jobs: int, quiet: bool) -> None:
    """Decode the chunks not done yet, in parallel, and append each finished one, in row order, to the partial
    file, recording in chunks/appended.json how far the file is complete: where a rerun after a kill starts."""
    starts = list(range(0, len(files), chunk))
    progress = P["chunks"] / "appended.json"
    state = json.loads(progress.read_text()) if progress.exists() else {"chunks": 0, "bytes": 0}
    ready = {s for s in starts[state["chunks"]:] if all(p.exists() for p in chunk_files(P, s))}
    todo = [s for s in starts[state["chunks"]:] if s not in ready]
    if not quiet and len(todo) < len(starts):
        print(f"resuming: {len(starts) - len(todo)} of {len(starts)} chunks already done")
    tasks = (delayed(_process_chunk)(files.iloc[s:s + chunk], s, windows, size, *map(str, chunk_files(P, s)))
             for s in todo)
    with open(P["partial"], "r+b") as out, tqdm(total=sum(min(chunk, len(files) - s) for s in todo), unit="slice",
                                                 desc="prepare", disable=quiet, mininterval=1.0) as bar:
        out.truncate(state["bytes"])  # drops what a killed run appended after its last record
        state = append_ready(P, out, starts, ready, state)
        for s, n in Parallel(n_jobs=jobs, return_as="generator_unordered")(tasks):
            ready.add(s)
            bar.update(n)
            state = append_ready(P, out, starts, ready, state)
    if state["chunks"] != len(starts):
        raise PipelineError(f"{P['partial']}: {state['chunks']} of {len(starts)} chunks appended after every chunk "
                            f"was decoded; delete {P['partial']} and {P['chunks']} and run again")


def append_ready(P: dict, out, starts: list, ready: set, state: dict) -> dict:
    """Append the decoded chunks that come next in row order to `out`, make them durable, then record the new end
    and remove their chunk data. Returns the new state {chunks appended, bytes}."""
    k, end = state["chunks"], state["bytes"]
    moved = []
    while k < len(starts) and starts[k] in ready:
        data = chunk_files(P, starts[k])[0].read_bytes()
        out.seek(end)
        out.write(data)
        end, k = end + len(data), k + 1
        moved.append(starts[k - 1])
    if not moved:
        return state
    out.flush()
    os.fsync(out.fileno())
    state = {"chunks": k, "bytes": end}
    write_json(state, P["chunks"] / "appended.json")
    for s in moved:
        chunk_files(P, s)[0].unlink()
    return state


def finish(P: dict, files: pd.DataFrame, chunk: int, data_dir: Path, cache_dir: Path, size: int, t0: float,
           quiet: bool) -> dict:
    """Join the chunks' records into metadata.csv, append the row offsets and footer, write summary.json, and rename
    the file: the cache is complete."""
    meta = pd.concat([pd.read_csv(chunk_files(P, s)[1], dtype={"reason": str, "PatientID": str},
                                  keep_default_na=False, na_values={"z": [""]})
                      for s in range(0, len(files), chunk)], ignore_index=True)
    offsets = np.concatenate([[0], np.cumsum(meta.pop("nbytes").to_numpy(np.int64))])
    if len(meta) != len(files) or not (meta["row"].to_numpy() == np.arange(len(files))).all() \
            or not (meta["ID"].to_numpy() == files["ID"].to_numpy()).all() or offsets[-1] != P["partial"].stat().st_size:
        raise PipelineError(f"{cache_dir}: the chunk records do not match the {len(files)} files or the partial "
                            f"file; the partial build is inconsistent: delete {P['partial']} and {P['chunks']} and "
                            f"run again")
    with open(P["partial"], "ab") as f:
        f.write(packed_tail(offsets, (len(files), size, size, 3)))
        f.flush()
        os.fsync(f.fileno())
    meta = order_series(meta)
    write_csv(meta, P["meta"], index=False)
    summary = write_summary(P, meta, data_dir, cache_dir, files, size, t0)
    os.replace(P["partial"], P["images"])  # the moment the cache becomes complete
    shutil.rmtree(P["chunks"], ignore_errors=True)
    if not quiet:
        skipped, missing = meta[meta.status != "ok"], summary["labelled_missing_ids"]
        print(f"cached {summary['done']} of {summary['slices']} slices in {summary['series']} series to {cache_dir} "
              f"({P['images'].stat().st_size / 1e6:,.1f} MB) in {summary['seconds_this_run']}s; skipped "
              f"{summary['skipped']}"
              + "".join(f"\n  skipped {i}: {r}" for i, r in zip(skipped["ID"][:20], skipped["reason"][:20]))
              + (f"\n  {summary['labelled_missing_files']} labelled image(s) have no file in {SPLITS['train']}/ and "
                 f"are left out: {missing[:10]}" if missing else ""))
    return summary


def write_summary(P: dict, meta: pd.DataFrame, data_dir: Path, cache_dir: Path, files: pd.DataFrame, size: int,
                  t0: float) -> dict:
    skipped = meta[meta.status != "ok"]
    missing = labelled_but_missing(data_dir, cache_dir, files)
    summary = {"data_dir": str(data_dir), "slices": len(meta), "done": int((meta.status == "ok").sum()),
               "skipped": len(skipped), "skipped_reasons": dict(Counter(skipped["reason"])),
               "skipped_ids": skipped["ID"].tolist()[:100],
               "labelled_missing_files": len(missing), "labelled_missing_ids": missing[:100],
               "z_sources": dict(Counter(meta.loc[meta.status == "ok", "z_source"])),
               "series": int(meta.loc[meta.status == "ok", "SeriesInstanceUID"].nunique()),
               "synthetic": (data_dir / SYNTHETIC_MARKER).exists(),
               "seconds_this_run": round(time.time() - t0, 2), "size": size,
               "bytes": P["partial"].stat().st_size, "format": FORMAT}
    write_json(summary, P["summary"])
    return summary


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
