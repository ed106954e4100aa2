"""The image cache's file and its reader: what `src.prepare` builds and every step that reads images opens.

    from src.cache import load_cache
    images, meta = load_cache("outputs/demo/cache")   # PackedImages (indexes like an (N, S, S, 3) uint8 array), metadata
    images[meta.row[0]]                                # one slice's three windows

`images.bin` holds one row per file, each the slice's three windows (uint8, size x size x 3) compressed on its own
with LZ4 (lossless: the loader gets exactly the bytes `dicom_to_image` made), rows in series order, then the rows'
byte offsets and a footer. `PackedImages` reads it by path, opened on first use in each process (so DataLoader
workers open it themselves), and warms the rows a data set uses into the page cache in the background
(`page_residency` asks the kernel which pages are already in memory). `cache_config.json` is the cache's stamp:
`cache_fingerprint` is what a step that reads the cache records as its input, `cache_settings` the preprocessing
inference must repeat. The file names are `src.layout`'s; docs/benchmarks.md ("The compact cache") has the
measurements that chose this format.
"""
from __future__ import annotations

import ctypes
import fcntl
import json
import mmap
import os
import struct
import threading
from pathlib import Path

import lz4.block
import numpy as np
import pandas as pd

from . import layout
from .stamps import Stamp, fingerprint
from .utils import PipelineError


# ---------------------------------------------------------------- the compact cache file
# images.bin: the rows' LZ4 blocks one after the other, then the (N + 1) row offsets (little-endian int64), then a
# JSON footer (format, shape, where the offsets start), its length (8 bytes) and MAGIC. An all-zero row (a file that
# could not be read) is stored as 0 bytes.
MAGIC = b"ICHPACK1"
FORMAT = "lz4 rows in series order, v1"
PREFETCH_WINDOW = 8 << 20  # bytes read per call while warming the page cache


def encode_image(img: np.ndarray) -> bytes:
    """One row of the cache: the image's bytes as one LZ4 block (lossless), or b"" for an all-zero image."""
    img = np.ascontiguousarray(img, dtype=np.uint8)
    return lz4.block.compress(img, store_size=False) if img.any() else b""


def packed_tail(offsets: np.ndarray, shape) -> bytes:
    """What follows the rows in images.bin: their offsets and the footer naming the format and the shape."""
    footer = json.dumps({"format": FORMAT, "codec": "lz4.block", "dtype": "uint8", "shape": [int(v) for v in shape],
                         "offsets_at": int(offsets[-1])}, sort_keys=True).encode()
    return np.asarray(offsets, "<i8").tobytes() + footer + struct.pack("<Q", len(footer)) + MAGIC


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


class PackedImages:
    """images.bin by its path, opened on first use in each process; indexes like the (N, S, S, 3) uint8 array it
    stands for (`images[row]`, `images[rows]`, `images[row, :, :, 0]`, `len`, `shape`, `dtype`), each row
    decompressed on demand (a read-only array per row, as the memory map gave; `images[rows]` is writable).

    Pickles as the path alone, so DataLoader workers (fork, spawn or forkserver) open the file themselves.
    `read_rows` reads rows that lie close together (a 2.5D sample's slices) with one read; `warm` reads the
    rows a data set will use into the page cache in a background thread, once per process."""

    def __init__(self, path):
        self.path, self._fd, self._offsets, self._shape = str(path), None, None, None

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def _bad(self, what: str) -> PipelineError:
        return PipelineError(f"{self.path} is not a complete image cache ({what}): delete it and build the cache "
                             f"again (python -m src.prepare DATA_DIR --overwrite)")

    def _open(self) -> None:
        """Read the footer and the offsets; a truncated, foreign or corrupt file stops with its name and the fix."""
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise self._bad(f"{type(e).__name__}: {e.strerror}") from e
        try:
            size = os.fstat(fd).st_size
            tail = os.pread(fd, 16, max(size - 16, 0))
            if size < 16 or tail[8:] != MAGIC:
                raise self._bad("no footer: a partial or foreign file")
            n = struct.unpack("<Q", tail[:8])[0]
            foot = json.loads(os.pread(fd, n, size - 16 - n)) if n <= size - 16 else {}
            if foot.get("format") != FORMAT:
                raise self._bad(f"format {foot.get('format')!r}, this code reads {FORMAT!r}")
            shape, at = tuple(foot["shape"]), foot["offsets_at"]
            if at + 8 * (shape[0] + 1) + n + 16 != size:
                raise self._bad("its size does not match its footer")
            offsets = np.frombuffer(os.pread(fd, 8 * (shape[0] + 1), at), "<i8")
            if offsets[0] != 0 or offsets[-1] != at or (np.diff(offsets) < 0).any():
                raise self._bad("inconsistent row offsets")
        except (ValueError, KeyError, TypeError, IndexError) as e:  # a footer that is not ours
            os.close(fd)
            raise self._bad(f"unreadable footer: {e}") from e
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._offsets, self._shape, self._row_bytes = fd, offsets, shape, int(np.prod(shape[1:]))

    @property
    def offsets(self) -> np.ndarray:
        if self._fd is None:
            self._open()
        return self._offsets

    @property
    def shape(self) -> tuple:
        if self._fd is None:
            self._open()
        return self._shape

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __len__(self):
        return self.shape[0]

    def _read(self, start: int, n: int) -> bytes:
        data = os.pread(self._fd, n, start) if n else b""
        if len(data) != n:
            raise self._bad(f"{n} bytes at {start} asked, {len(data)} read: truncated")
        return data

    def _decode(self, blob, row: int) -> np.ndarray:
        if len(blob) == 0:
            return np.zeros(self._shape[1:], np.uint8)
        try:  # into bytes: ~1.5x faster than lz4's return_bytearray, at the price of a read-only array
            raw = lz4.block.decompress(blob, uncompressed_size=self._row_bytes)
        except lz4.block.LZ4BlockError as e:
            raise self._bad(f"row {row} does not decompress: {e}") from e
        if len(raw) != self._row_bytes:
            raise self._bad(f"row {row} decompresses to {len(raw)} bytes, not {self._row_bytes}")
        return np.frombuffer(raw, np.uint8).reshape(self._shape[1:])

    def read_rows(self, rows) -> list[np.ndarray]:
        """The images of `rows` (ints in range), each a read-only array of its own (a row asked twice is decoded
        once and given twice). Rows within a few rows' bytes of each other come from one read."""
        off, rows = self.offsets, [int(r) for r in rows]
        if len(rows) == 1:
            r = rows[0]
            return [self._decode(self._read(int(off[r]), int(off[r + 1] - off[r])), r)]
        lo, hi = min(off[r] for r in rows), max(off[r + 1] for r in rows)
        done = {}
        if hi - lo <= 4 * self._row_bytes:
            buf = memoryview(self._read(int(lo), int(hi - lo)))
            for r in rows:
                if r not in done:
                    done[r] = self._decode(buf[off[r] - lo:off[r + 1] - lo], r)
        else:
            for r in rows:
                if r not in done:
                    done[r] = self._decode(self._read(int(off[r]), int(off[r + 1] - off[r])), r)
        return [done[r] for r in rows]

    def __getitem__(self, key):
        key, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        n = len(self)
        if isinstance(key, (int, np.integer)) or (isinstance(key, np.ndarray) and key.ndim == 0):
            r = int(key) + (n if int(key) < 0 else 0)
            if not 0 <= r < n:
                raise IndexError(f"row {int(key)} out of range for {n} rows")
            img = self.read_rows([r])[0]
            return img[rest] if rest else img
        if isinstance(key, slice):
            rows = np.arange(n)[key]
        else:
            k = np.asarray(key)
            rows = np.flatnonzero(k) if k.dtype == bool else np.where(k < 0, k + n, k).astype(np.int64)
            if k.dtype == bool and k.shape != (n,):
                raise IndexError(f"boolean index of shape {k.shape} for {n} rows")
            if len(rows) and (rows.min() < 0 or rows.max() >= n):
                raise IndexError(f"rows out of range for {n} rows")
        out = np.empty((len(rows), *self.shape[1:]), np.uint8)
        for i in range(0, len(rows), 64):
            for j, img in enumerate(self.read_rows(rows[i:i + 64]) if len(rows[i:i + 64]) else []):
                out[i + j] = img
        return out[(slice(None), *rest)] if rest else out

    def __array__(self, dtype=None, copy=None):
        return self[:] if dtype is None else self[:].astype(dtype)

    def spans(self, rows=None, gap: int = 1 << 20) -> list[tuple[int, int]]:
        """The byte ranges holding `rows` (default: all), ranges less than `gap` apart merged."""
        off = self.offsets
        if rows is None:
            return [(0, int(off[-1]))] if off[-1] else []
        r = np.unique(np.asarray(rows, np.int64))
        s, e = off[r], off[r + 1]
        cut = np.flatnonzero(s[1:] - e[:-1] > gap)
        starts, ends = s[np.r_[0, cut + 1]], e[np.r_[cut, len(r) - 1]]
        return [(int(a), int(b)) for a, b in zip(starts, ends) if b > a]

    def warm(self, rows=None) -> threading.Thread | None:
        """Start reading the bytes of `rows` (default: all) into the page cache in a background thread, when they
        fit in half of this machine's memory: a first epoch on a cold disk then reads the file sequentially
        instead of one random read per sample. Processes take turns (a lock on the file), and pages already in
        memory are skipped, so of N loader workers one reads the disk and the others find it done. ICH_PREFETCH=0
        turns it off."""
        if os.environ.get("ICH_PREFETCH", "1") == "0":
            return None
        spans = self.spans(rows)
        if not spans or sum(b - a for a, b in spans) > physical_memory() // 2:
            return None
        t = threading.Thread(target=prefetch, args=(self.path, spans), name="cache-prefetch", daemon=True)
        t.start()
        return t


def prefetch(path: str, spans: list[tuple[int, int]], window: int = PREFETCH_WINDOW) -> int:
    """Read the byte ranges `spans` of `path` in order, skipping windows whose pages are all in memory, while
    holding an exclusive flock on the file. Returns the bytes read. Best effort: an error ends it quietly."""
    done = 0
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return 0
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        resident = page_residency(fd)
        buf = memoryview(bytearray(window))
        for a, b in spans:
            for o in range(a, b, window):
                n = min(window, b - o)
                if resident is None or not resident(o, n):
                    done += os.preadv(fd, [buf[:n]], o)
    except OSError:
        pass
    finally:
        os.close(fd)  # releases the lock
    return done


def page_residency(fd: int):
    """A function (offset, length) -> whether every page of that range of the file is in the page cache (mincore
    on a read-only map of the file), or None where that cannot be asked (then every window is read)."""
    try:
        size = os.fstat(fd).st_size
        mincore = ctypes.CDLL(None, use_errno=True).mincore
        mincore.argtypes, mincore.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p], ctypes.c_int
        view = np.frombuffer(mmap.mmap(fd, size, access=mmap.ACCESS_READ), np.uint8)  # unmapped when view goes
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    base, page = view.ctypes.data, mmap.PAGESIZE

    def resident(offset: int, length: int) -> bool:
        a = offset - offset % page
        vec = np.zeros((offset + length - a + page - 1) // page, np.uint8)
        ok = mincore(base + a, offset + length - a, vec.ctypes.data) == 0
        return ok and bool(view is not None and (vec & 1).all())

    return resident


def cache_stamp(cache_dir) -> Stamp:
    """The stamp of a finished cache."""
    P = layout.cache_files(Path(cache_dir))
    stamp = Stamp.load(P["config"]) if P["images"].exists() else None
    if stamp is None:
        raise PipelineError(f"no finished image cache in {cache_dir}: run `python -m src.prepare DATA_DIR` first")
    return stamp


def cache_fingerprint(cache_dir, split: str) -> str:
    """What a step that reads one split of the cache records as its `cache` input: the cache's settings and
    that split's files (training: train; test predictions: test). Not the storage format: the cache is lossless, so
    every format gives the model the same images (tests/test_data.py), and a format change leaves trained runs valid."""
    stamp = cache_stamp(cache_dir)
    settings = {k: v for k, v in stamp.settings.items() if k != "format"}
    return fingerprint({"settings": settings, "files": stamp.inputs.get(f"{split}_files")})


def cache_settings(cache_dir) -> dict:
    """The preprocessing a cache was built with (size and windows), which inference must repeat."""
    st = cache_stamp(cache_dir).settings
    return {"size": st["size"], "windows": st["windows"]}


def windows_from_settings(settings: dict):
    return tuple(None if w == "file" else tuple(w) for w in settings["windows"])


def load_cache(cache_dir):
    """(images: PackedImages, indexed by metadata's `row`; metadata) of a finished cache; a clear error where there
    is none."""
    P = layout.cache_files(Path(cache_dir))
    if not P["images"].exists() or not P["meta"].exists():
        old = (f" ({P['old_images'].name} there is the uncompressed format of an older version: rebuild it with "
               f"--overwrite)") if P["old_images"].exists() else ""
        raise PipelineError(f"no finished image cache in {cache_dir}{old}: run `python -m src.prepare DATA_DIR` first")
    meta = pd.read_csv(P["meta"], dtype={"reason": str, "prev_id": str, "next_id": str, "PatientID": str},
                       keep_default_na=False, na_values={"z": [""]})
    images = PackedImages(P["images"])
    if len(images) != len(meta):
        raise PipelineError(f"{P['images']} has {len(images)} rows but {P['meta']} {len(meta)}: the cache is "
                            f"inconsistent; rebuild it (python -m src.prepare DATA_DIR --overwrite)")
    return images, meta
