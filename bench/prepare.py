"""Benchmark of the DICOM hot path on real files, against the plain path public solutions use.

    python bench/prepare.py ../shared/rsna_sample --size 256

(a) baseline: what many public kernels do in their Dataset for every sample, every epoch:
    pydicom.dcmread, pixel_array, float rescale, three np.clip windows, cv2.resize;
(b) this project's cache build, per slice on one core (src.prepare.decode_one: native pixel read,
    resize of stored values, one lookup table for all three windows);
(c) reading samples from the finished cache as the training loader does (SliceDataset.__getitem__ and
    the batch collate, per sample): rows decompressed from the compact cache (images.bin), whose size per slice
    is printed against the uncompressed array's (bench/cache_formats.py compares the formats in full).
All three run in this process over the same files (page cache warm for all), best of 3 passes.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from src.data import SliceDataset, collate  # noqa: E402
from src.dicom import DEFAULT_WINDOWS  # noqa: E402
from src.cache import load_cache  # noqa: E402
from src.scans import decode_one  # noqa: E402
from src.prepare import list_files, prepare  # noqa: E402


def baseline(path, size):
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    chans = [np.clip((hu - (c - w / 2)) / w, 0, 1) for c, w in DEFAULT_WINDOWS]
    return cv2.resize(np.stack(chans, -1), (size, size))


def rate(fn, items, passes=3):
    best = float("inf")
    for _ in range(passes):
        t = time.perf_counter()
        for it in items:
            fn(it)
        best = min(best, time.perf_counter() - t)
    return len(items) / best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir", nargs="?", default=str(Path(__file__).resolve().parents[2] / "shared" / "rsna_sample"))
    ap.add_argument("--size", type=int, default=256)
    a = ap.parse_args()
    import warnings
    warnings.filterwarnings("ignore", message=r"Invalid value for VR UI")  # the baseline reads raw pydicom too
    files = list_files(Path(a.data_dir))["path"].tolist()
    ra = rate(lambda p: baseline(p, a.size), files)
    rb = rate(lambda p: decode_one(p, DEFAULT_WINDOWS, a.size), files)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        prepare(a.data_dir, Path(tmp) / "cache", size=a.size, quiet=True)
        full = len(files) / (time.perf_counter() - t)
        images, meta = load_cache(Path(tmp) / "cache")
        per_slice = (Path(tmp) / "cache" / "images.bin").stat().st_size / len(images)
        ds = SliceDataset(images, meta["row"], size=a.size)
        batches = np.random.default_rng(0).integers(0, len(ds), (100, 32))
        rc = rate(lambda b: collate([ds[i] for i in b]), batches) * batches.shape[1]
    print(f"files: {len(files)} real DICOMs from {a.data_dir}, output {a.size}x{a.size}x3")
    print(f"(a) baseline per-sample decode (1 core):       {ra:9.0f} slices/s  1.0x")
    print(f"(b) cache build, per slice per core:           {rb:9.0f} slices/s  {rb / ra:.1f}x")
    print(f"    cache build, whole run on all cores:       {full:9.0f} slices/s  {full / ra:.1f}x (incl. process start)")
    print(f"(c) sample from the cache (loader + collate):  {rc:9.0f} samples/s {rc / ra:.0f}x")
    print(f"    cache size: {per_slice:,.0f} bytes a slice, {a.size * a.size * 3 / per_slice:.2f}x smaller than the "
          f"uncompressed {a.size * a.size * 3:,}")


if __name__ == "__main__":
    main()
