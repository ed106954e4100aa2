"""The compact image cache (src.prepare's images.bin) against the uncompressed array it replaced (images.npy).

    python bench/cache_formats.py candidates          # formats side by side on real slices (../shared/rsna_sample)
    python bench/cache_formats.py build --files 5000  # build time of each format from the same DICOMs
    python bench/cache_formats.py epochs              # full epochs, cold and warm, on a cache 1.2x this machine's memory
    python bench/cache_formats.py all

candidates: every real slice of the sample decoded at --size (256) and stored each way: bytes per slice, the
    full data's size (874,035 slices), encode and decode CPU per slice, and the loader's CPU per augmented sample
    (SliceDataset, 3 and 9 channels, page cache warm), with "exact" checking that every decoded image equals
    today's. The baseline is today's array (a memory-mapped .npy). Candidates: LZ4 (the chosen one, read through
    PackedImages, the code the loader runs), LZ4-HC, PNG, the empty border cropped, one HU channel (int16
    clipped to 12 bits, windows applied per sample by a lookup table) compressed, and zstd and blosc2 where they
    are installed (they are not dependencies of the project: pip install zstandard blosc2).
build: `python -m src.prepare` against the previous build (decode, write rows into the .npy, the same metadata),
    on the same Kaggle-layout DICOMs (bench/scale.py's replicas of generated 256-px series), same cores.
epochs: a data set of N rows whose uncompressed array is >= 1.2x this machine's memory, made by replicating the
    real sample's series (decoding is not what this measures: rows are copied, not decoded). Today's format holds
    the rows in file order (random IDs: a series' slices lie at random places); the new one in series order.
    For each format, loader workers (1, 2) and channels (3: windows, 9: slices_windows, 2.5D), one full epoch
    (every sample once, shuffled, batch 64, augmentation on, as training reads): cold, the file's pages evicted
    first (posix_fadvise DONTNEED), and warm, its pages in memory. Today's array cannot be warm at this size, so
    its warm figure is an epoch over a smaller array of the same kind that fits (per sample, scaled to N).
    The big files are deleted at the end. Needs N x 196,608 bytes of free disk above --keep-free GB.

Writes bench/out/cache_formats.json (each section's figures) and prints Markdown tables. Timings on a shared
machine are noisy: compare the ratios measured in the same run, and repeat.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.sample_cost import per_sample_ms  # noqa: E402
from bench.scale import drop_page_cache  # noqa: E402
from src import cache as C  # noqa: E402
from src import prepare as P  # noqa: E402
from src import scans  # noqa: E402
from src.data import Augment, EpochSampler, SliceDataset, collate  # noqa: E402
from src.dicom import DEFAULT_WINDOWS, pixels, read_dicom, rescale_params, window  # noqa: E402

FULL = 874_035
OUT = ROOT / "bench" / "out"


# ---------------------------------------------------------------- real rows
def real_rows(data_dir: Path, size: int):
    """(images (n, S, S, 3) uint8 as the cache holds them, HU lookup indices (n, S, S) uint16 or None, prev, next):
    every file of a Kaggle-layout folder, in the cache's row order, with each row's neighbours in its series."""
    files = P.list_files(data_dir)
    files = files.iloc[P.row_order(files)].reset_index(drop=True)
    images, meta = scans.decode_files(files["path"].tolist(), DEFAULT_WINDOWS, size)
    hu = []
    for path in files["path"]:
        ds = read_dicom(path)
        r, px = rescale_params(ds), pixels(ds)
        if r.slope != 1 or r.intercept != int(r.intercept):
            hu = None
            break
        if r.fix_12bit:
            px = (px.astype(np.int32) + 1000) % 4096
        px = px.astype(np.int16 if px.min() < 0 else np.uint16)
        if px.shape != (size, size):
            px = cv2.resize(px, (size, size), interpolation=cv2.INTER_AREA if px.shape[0] > size else cv2.INTER_LINEAR)
        hu.append(np.clip(px.astype(np.int32) + int(r.intercept) + 1024, 0, 4095).astype(np.uint16))
    row_of = dict(zip(meta["ID"], range(len(meta))))
    prev = np.array([row_of.get(p, i) for i, p in enumerate(meta["prev_id"])])
    nxt = np.array([row_of.get(p, i) for i, p in enumerate(meta["next_id"])])
    return images, (np.stack(hu) if hu is not None else None), prev, nxt


class BlobRows:
    """Rows held as encoded blobs in memory, decoded by a candidate's decoder: what the loader would read."""

    def __init__(self, blobs, decode, shape):
        self.blobs, self.decode, self.shape = blobs, decode, shape

    def __len__(self):
        return len(self.blobs)

    def __getitem__(self, r):
        return self.decode(self.blobs[r])

    def read_rows(self, rows):
        return [self.decode(self.blobs[r]) for r in rows]

    def warm(self, rows):
        return None


def hu_lut() -> np.ndarray:
    """(4096, 3) uint8: HU + 1024 -> the three windowed bytes, as src.dicom computes them."""
    hu = np.arange(4096, dtype=np.float32) - 1024
    return np.ascontiguousarray(np.stack([window(hu, c, w) for c, w in DEFAULT_WINDOWS], -1))


def candidates(shape) -> dict:
    """name -> (encode(image, hu) -> bytes, decode(bytes) -> HWC uint8)."""
    import lz4.block
    n, lut = int(np.prod(shape)), hu_lut()
    lz = lambda b: np.frombuffer(lz4.block.decompress(b, uncompressed_size=n, return_bytearray=True),  # noqa: E731
                                 np.uint8).reshape(shape)

    def crop_enc(img, _):
        m = img.max(-1) > 0
        ys, xs = (np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))) if m.any() else ([0, -1], [0, -1])
        box = np.array([ys[0], ys[-1] + 1, xs[0], xs[-1] + 1], np.uint16)
        return box.tobytes() + lz4.block.compress(np.ascontiguousarray(img[box[0]:box[1], box[2]:box[3]]), store_size=True)

    def crop_dec(b):
        y0, y1, x0, x1 = np.frombuffer(b[:8], np.uint16)
        out = np.zeros(shape, np.uint8)
        out[y0:y1, x0:x1] = np.frombuffer(lz4.block.decompress(b[8:]), np.uint8).reshape(y1 - y0, x1 - x0, 3)
        return out

    hu_shape = shape[:2]
    out = {
        "LZ4-HC level 3": (lambda img, _: lz4.block.compress(img, mode="high_compression", compression=3, store_size=False), lz),
        "PNG (cv2, level 1)": (lambda img, _: cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 1])[1].tobytes(),
                               lambda b: cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_UNCHANGED)),
        "border cropped + LZ4": (crop_enc, crop_dec),
        "HU int16 + LZ4, windows per sample": (lambda _, h: lz4.block.compress(h, store_size=True), lambda b: np.take(
            lut, np.frombuffer(lz4.block.decompress(b), np.uint16).reshape(hu_shape), axis=0)),
    }
    try:  # not a dependency of the project: measured where installed (pip install zstandard)
        import zstandard
        zd = zstandard.ZstdDecompressor()
        zs = lambda lvl: zstandard.ZstdCompressor(level=lvl).compress  # noqa: E731
        zdec = lambda b: np.frombuffer(zd.decompress(b, max_output_size=n), np.uint8).reshape(shape)  # noqa: E731
        out.update({
            "zstd level 1": (lambda img, _: zs(1)(img.tobytes()), zdec),
            "zstd level 3": (lambda img, _: zs(3)(img.tobytes()), zdec),
            "HU int16 + zstd 1, windows per sample": (lambda _, h: zs(1)(h.tobytes()), lambda b: np.take(
                lut, np.frombuffer(zd.decompress(b, max_output_size=n), np.uint16).reshape(hu_shape), axis=0))})
    except ImportError:
        pass
    try:
        import blosc2
        blosc2.set_nthreads(1)
        out["blosc2 zstd 1 + byte shuffle"] = (
            lambda img, _: blosc2.compress2(img.tobytes(), typesize=3, codec=blosc2.Codec.ZSTD, clevel=1,
                                            filters=[blosc2.Filter.SHUFFLE], filters_meta=[0]),
            lambda b: np.frombuffer(blosc2.decompress2(b), np.uint8).reshape(shape))
    except ImportError:
        pass
    return out


def timed(fn, items, passes=3) -> float:
    """CPU ms per item of fn over items, best of `passes`."""
    best = math.inf
    for _ in range(passes):
        t = time.process_time()
        for it in items:
            fn(it)
        best = min(best, (time.process_time() - t) / len(items) * 1e3)
    return best


def loader_ms(images, prev, nxt, n=400) -> dict:
    """Loader CPU per augmented sample, 3 channels (windows) and 9 (slices_windows), median of 3 repeats."""
    rows = np.arange(len(prev))
    return {ch: float(np.median([per_sample_ms(SliceDataset(images, rows, None, prev, nxt, mode, augment=Augment()),
                                               n=n, seed=k) for k in range(3)]))
            for ch, mode in ((3, "windows"), (9, "slices_windows"))}


def run_candidates(a) -> dict:
    """The side-by-side table: today's array, the chosen LZ4 file (PackedImages) and the other candidates."""
    images, hu, prev, nxt = real_rows(Path(a.data), a.size)
    raw = images[0].nbytes
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        npy = Path(tmp) / "images.npy"
        np.save(npy, images)
        mm = np.load(npy, mmap_mode="r")
        res["today: uncompressed .npy (memmap)"] = {"bytes": raw, "encode_ms": 0.0, "exact": True,
                                                    "decode_ms": timed(lambda r: np.array(mm[r]), range(len(mm))),
                                                    "loader_ms": loader_ms(mm, prev, nxt)}
        blobs = [C.encode_image(x) for x in images]
        path = Path(tmp) / "images.bin"
        path.write_bytes(b"".join(blobs) + C.packed_tail(np.r_[0, np.cumsum([len(b) for b in blobs])], images.shape))
        packed = C.PackedImages(path)
        res["LZ4 (chosen: images.bin, PackedImages)"] = {
            "bytes": float(np.mean([len(b) for b in blobs])), "encode_ms": timed(C.encode_image, images),
            "decode_ms": timed(lambda r: packed.read_rows([r]), range(len(images))),
            "exact": bool(np.array_equal(packed[:], images)), "loader_ms": loader_ms(packed, prev, nxt)}
        for name, (enc, dec) in candidates(images.shape[1:]).items():
            if name.startswith("HU") and hu is None:
                continue
            src = list(zip(images, hu if hu is not None else [None] * len(images)))
            blobs = [enc(x, h) for x, h in src]
            rows = BlobRows(blobs, dec, images.shape)
            res[name] = {"bytes": float(np.mean([len(b) for b in blobs])),
                         "encode_ms": timed(lambda xh: enc(*xh), src, passes=1),
                         "decode_ms": timed(dec, blobs), "exact": all(np.array_equal(dec(b), x) for b, x in zip(blobs, images)),
                         "loader_ms": loader_ms(rows, prev, nxt)}
            print(f"  measured {name}", flush=True)
    print(f"\n{len(images)} real slices from {a.data} at {a.size} px; CPU ms on one core; loader = SliceDataset with "
          f"augmentation, per sample, page cache warm; full data = {FULL:,} slices\n")
    print("| format | KB/slice | ratio | full data GB | encode ms | decode ms/row | loader ms, 3 ch | loader ms, 9 ch "
          "| exact |\n|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, r in res.items():
        print(f"| {name} | {r['bytes'] / 1e3:.1f} | {raw / r['bytes']:.2f}x | {FULL * r['bytes'] / 1e9:.1f} | "
              f"{r['encode_ms']:.3f} | {r['decode_ms']:.3f} | {r['loader_ms'][3]:.3f} | {r['loader_ms'][9]:.3f} | "
              f"{'yes' if r['exact'] else 'NO'} |")
    return {"slices": len(images), "size": a.size, "data": str(a.data), "formats": res}


# ---------------------------------------------------------------- full epochs on a cache larger than memory
def replicated(base: np.ndarray, prev: np.ndarray, nxt: np.ndarray, n: int):
    """Row q of the big data set is base row q % len(base) (series order, replica after replica): the neighbours
    of every q, and `position`, where q lies in today's file order (a random permutation: file names are IDs)."""
    nb = len(base)
    q = np.arange(n)
    rep = q - q % nb
    p, x = np.minimum(rep + prev[q % nb], n - 1), np.minimum(rep + nxt[q % nb], n - 1)
    position = np.random.default_rng(0).permutation(n)
    return p, x, position


def write_npy(path: Path, base: np.ndarray, position: np.ndarray, block: int = 512) -> None:
    """Today's format: row position[q] holds base[q % len(base)]."""
    n, inverse = len(position), np.argsort(position)
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, *base.shape[1:]))
    for s in range(0, n, block):
        arr[s:s + block] = base[inverse[s:s + block] % len(base)]
    arr.flush()
    del arr


def write_packed(path: Path, base: np.ndarray, n: int) -> None:
    """The new format: row q holds base[q % len(base)], rows in series order, as src.prepare writes it."""
    blobs = [C.encode_image(x) for x in base]
    sizes = np.array([len(b) for b in blobs], np.int64)
    with open(path, "wb") as f:
        for s in range(0, n, len(base)):
            f.write(b"".join(blobs[:min(len(base), n - s)]))
        f.write(C.packed_tail(np.r_[0, np.cumsum(sizes[np.arange(n) % len(base)])], (n, *base.shape[1:])))


def count(batch) -> int:
    """The loader's collate here: the samples are made (read, decoded, augmented) in the workers, and only their
    number travels back, so the pass measures the cache, not the batch transfer, which is the same for both."""
    return len(batch)


def epoch_seconds(images, rows, prev, nxt, channels: int, workers: int, fraction: float = 1.0, seed: int = 0) -> float:
    """Wall seconds of one loader pass over every sample (shuffled, batch 64, augmentation on); with fraction < 1,
    the first `fraction` of the epoch's batches, scaled to the whole epoch."""
    from torch.utils.data import DataLoader
    ds = SliceDataset(images, rows, None, prev, nxt, "windows" if channels == 3 else "slices_windows",
                      augment=Augment(), seed=seed)
    dl = DataLoader(ds, 64, sampler=EpochSampler(len(ds), seed=seed), num_workers=workers, collate_fn=count)
    stop, done = math.ceil(fraction * len(ds) / 64), 0
    t = time.perf_counter()
    for k, n in enumerate(dl):
        done += n
        if k + 1 == stop:
            break
    return (time.perf_counter() - t) * len(ds) / done


def disk_room(work: Path, need: int, keep_free: float) -> None:
    free = shutil.disk_usage(work).free
    if free - need < keep_free * 1e9:
        raise SystemExit(f"{work}: {free / 1e9:.1f} GB free, {need / 1e9:.1f} GB needed and {keep_free} GB to be left free")


def run_epochs(a) -> dict:
    """Cold and warm epochs of both formats on a data set whose uncompressed array is >= 1.2x memory."""
    base, _, bprev, bnxt = real_rows(Path(a.data), a.size)
    row_bytes, mem = base[0].nbytes, C.physical_memory()
    n = a.rows or math.ceil(1.2 * mem / row_bytes)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    prev, nxt, pos = replicated(base, bprev, bnxt, n)
    configs = [(w, ch) for ch in a.channels for w in a.workers]
    res = {"rows": n, "memory_bytes": mem, "row_bytes": row_bytes, "today": {}, "compact": {},
           "today_fraction": a.today_fraction, "compact_fraction": a.compact_fraction}
    say = lambda *x: print(*x, flush=True)  # noqa: E731
    if "today" in a.formats:
        old = work / "images.npy"
        disk_room(work, n * row_bytes, a.keep_free)
        t = time.perf_counter()
        write_npy(old, base, pos)
        res["today_bytes"], res["today_write_s"] = old.stat().st_size, time.perf_counter() - t
        say(f"today's format: {n:,} rows, {res['today_bytes'] / 1e9:.1f} GB ({res['today_bytes'] / mem:.2f}x memory)")
        for w, ch in configs:
            drop_page_cache(old)
            res["today"][f"{w},{ch}"] = {"cold_s": epoch_seconds(str(old), pos, pos[prev], pos[nxt], ch, w, a.today_fraction)}
            say(f"  today, {w} worker(s), {ch} channels, cold: {res['today'][f'{w},{ch}']['cold_s']:.1f} s")
        old.unlink()
        m = min(n, int(a.warm_fraction * mem / row_bytes))  # an array of the same kind that fits in memory
        pm, xm, posm = replicated(base, bprev, bnxt, m)
        small = work / "images_small.npy"
        write_npy(small, base, posm)
        C.prefetch(str(small), [(0, small.stat().st_size)])
        for w, ch in configs:
            s = epoch_seconds(str(small), posm, posm[pm], posm[xm], ch, w, min(1.0, a.today_fraction * n / m))
            res["today"][f"{w},{ch}"]["warm_s"] = s * n / m
            say(f"  today, {w} worker(s), {ch} channels, warm: {s:.1f} s for {m:,} rows -> {s * n / m:.1f} s for {n:,}")
        small.unlink()
    new = work / "images.bin"
    t = time.perf_counter()
    write_packed(new, base, n)
    res["compact_bytes"], res["compact_write_s"] = new.stat().st_size, time.perf_counter() - t
    say(f"compact format: {res['compact_bytes'] / 1e9:.2f} GB")
    rows = np.arange(n)
    for w, ch in configs:
        drop_page_cache(new)
        cold = epoch_seconds(C.PackedImages(new), rows, prev, nxt, ch, w, a.compact_fraction)
        C.prefetch(str(new), C.PackedImages(new).spans())
        warm = epoch_seconds(C.PackedImages(new), rows, prev, nxt, ch, w, a.compact_fraction)
        res["compact"][f"{w},{ch}"] = {"cold_s": cold, "warm_s": warm}
        say(f"  compact, {w} worker(s), {ch} channels: cold {cold:.1f} s, warm {warm:.1f} s")
    new.unlink()
    epochs_table(res)
    return res


def epochs_table(res: dict) -> None:
    n = res["rows"]
    today = res.get("today_bytes", n * res["row_bytes"])
    print(f"\n{n:,} samples a full epoch; today's array {today / 1e9:.1f} GB "
          f"({today / res['memory_bytes']:.2f}x this machine's {res['memory_bytes'] / 2**30:.0f} GiB), "
          f"the compact file {res['compact_bytes'] / 1e9:.2f} GB"
          + "".join(f"; {k}'s epochs timed on their first {res[k + '_fraction']:.0%} and scaled"
                    for k in ("today", "compact") if res.get(k + "_fraction", 1) < 1) + "\n")
    print("| workers | channels | today cold s | today warm s | compact cold s | compact warm s | cold: today / compact "
          "| compact: warm / cold |\n|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key, new in res["compact"].items():
        w, ch = key.split(",")
        old = res["today"].get(key, {"cold_s": math.nan, "warm_s": math.nan})
        print(f"| {w} | {ch} | {old['cold_s']:.0f} | {old['warm_s']:.0f} | {new['cold_s']:.0f} | {new['warm_s']:.0f} | "
              f"{old['cold_s'] / new['cold_s']:.1f}x | {new['warm_s'] / new['cold_s']:.2f} |")


# ---------------------------------------------------------------- build time
def _old_chunk(paths: list, start: int, array_path: str, size: int) -> list:
    """The previous build's work unit: decode, then one pwrite of the chunk's rows into the .npy."""
    buf, records = np.zeros((len(paths), size, size, 3), np.uint8), []
    for i, p in enumerate(paths):
        img, head, reason = scans.decode_one(p, DEFAULT_WINDOWS, size)
        if img is not None:
            buf[i] = img
        records.append({"ID": Path(p).stem, "row": start + i, "status": "ok" if img is not None else "skipped", **head})
    offset = np.load(array_path, mmap_mode="r").offset + start * buf[0].nbytes
    fd = os.open(array_path, os.O_WRONLY)
    try:
        os.pwrite(fd, buf, offset)
    finally:
        os.close(fd)
    return records


def old_build(data: Path, out: Path, size: int, jobs: int, chunk: int = 128) -> None:
    """Today's build, as it was: rows in file order, the metadata ordered by series."""
    from joblib import Parallel, delayed
    paths = P.list_files(data)["path"].tolist()
    out.mkdir(parents=True, exist_ok=True)
    arr = np.lib.format.open_memmap(out / "images.npy", mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3))
    arr.flush()
    del arr
    recs = Parallel(n_jobs=jobs)(delayed(_old_chunk)(paths[s:s + chunk], s, str(out / "images.npy"), size)
                                 for s in range(0, len(paths), chunk))
    scans.order_series(pd.DataFrame([r for c in recs for r in c])).to_csv(out / "metadata.csv", index=False)


def run_build(a) -> dict:
    """Seconds to build each format from the same DICOMs, with the same cores, alternating, best of 2."""
    from bench.scale import replicate
    work = Path(a.work)
    data = replicate(work, a.files)
    n = len(P.list_files(data))
    times = {"today": [], "compact": []}
    for _ in range(2):
        for kind in times:
            out = work / f"build_{kind}"
            shutil.rmtree(out, ignore_errors=True)
            t = time.perf_counter()
            if kind == "today":
                old_build(data, out, a.size, a.jobs)
            else:
                P.prepare(data, out, size=a.size, jobs=a.jobs, quiet=True)
            times[kind].append(time.perf_counter() - t)
    size = {"today": (work / "build_today" / "images.npy").stat().st_size,
            "compact": (work / "build_compact" / "images.bin").stat().st_size}
    for kind in times:
        shutil.rmtree(work / f"build_{kind}", ignore_errors=True)
    print(f"\nbuild from {n:,} DICOMs ({data}), {a.size} px, {a.jobs} processes, best of 2\n")
    print("| format | seconds | slices/s | bytes/slice |\n|---|---:|---:|---:|")
    for kind, t in times.items():
        print(f"| {kind} | {min(t):.1f} | {n / min(t):.0f} | {size[kind] / n:,.0f} |")
    return {"files": n, "size": a.size, "jobs": a.jobs, "seconds": times, "bytes": size}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["candidates", "build", "epochs", "all"])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "rsna_sample"), help="real Kaggle-layout slices")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--work", default=str(OUT / "cache_formats"), help="where the large files go (deleted after)")
    ap.add_argument("--rows", type=int, default=0, help="epochs: rows of the data set (default: 1.2x memory)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--channels", type=int, nargs="+", default=[3, 9])
    ap.add_argument("--warm-fraction", type=float, default=0.25, help="today's warm array, as a share of memory")
    ap.add_argument("--today-fraction", type=float, default=1.0,
                    help="time this share of today's epochs (as many samples on the warm array) and scale: its cold "
                         "epoch at 1.2x memory takes ~15 min (3 channels) to ~45 min (9) per configuration here")
    ap.add_argument("--compact-fraction", type=float, default=1.0,
                    help="the same for the compact format's epochs (its cold epochs start with the prefetch, so a "
                         "part of an epoch is a harder test of cold against warm than the whole)")
    ap.add_argument("--formats", nargs="+", default=["today", "compact"], choices=["today", "compact"])
    ap.add_argument("--tag", default="", help="kept apart under this name in the results file")
    ap.add_argument("--keep-free", type=float, default=15.0, help="GB of disk to leave free")
    ap.add_argument("--files", type=int, default=5000, help="build: DICOM files")
    ap.add_argument("--jobs", type=int, default=os.cpu_count())
    a = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    result_file = OUT / "cache_formats.json"
    results = json.loads(result_file.read_text()) if result_file.exists() else {}
    for what, fn in (("candidates", run_candidates), ("build", run_build), ("epochs", run_epochs)):
        if a.what in (what, "all"):
            key = f"{what} {a.tag}".strip()
            results[key] = {**fn(a), "when": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count()}
            result_file.write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
