"""Dataset over the image cache: one slice (3 windows) or its neighbours (2.5D), with CT-friendly augmentation.

The dataset knows nothing about the model: it returns uint8 CHW tensors in channels-last memory
layout (the model normalises them on the device, which moves 4x fewer bytes than float32), the six
labels, and the sample's index.
Augmentation draws from a generator seeded by (seed, epoch, index), so a sample's augmentation does
not depend on worker count or process, and a resumed run sees exactly the batches it would have seen.
The cache travels to loader workers as its path and is opened again in each (src.cache.PackedImages: rows
decompressed on demand, a 2.5D sample's adjacent rows read at once, the data set's rows read into the page cache in
the background on first use); an in-memory array (a user's decoded files) is used as it is. Samples
are assembled, flipped and warped by cv2 one 3-channel slice at a time (bench/sample_cost.py measures it).
"""
from __future__ import annotations

import math
import os
import threading

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler

from .cache import PackedImages
from .utils import CLASSES, PipelineError

# One OpenCV thread: the parallelism is the loader's worker processes, and N workers x an all-cores OpenCV pool
# oversubscribe the CPU. Set here, at import in the parent: a forked worker that calls setNumThreads after the
# parent used the pool deadlocks.
cv2.setNumThreads(1)


def neighbour_rows(meta: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """For every metadata row, the cache rows of the previous and next slice of its series.

    At a series edge (or for a slice that is not in a series) the slice itself stands in for the missing
    neighbour, so edge slices repeat."""
    row_of = dict(zip(meta["ID"], meta["row"]))
    own = meta["row"].to_numpy()
    prev = np.array([row_of.get(p, r) if p else r for p, r in zip(meta["prev_id"].fillna(""), own)], dtype=np.int64)
    nxt = np.array([row_of.get(n, r) if n else r for n, r in zip(meta["next_id"].fillna(""), own)], dtype=np.int64)
    return prev, nxt


def channels(img: np.ndarray) -> int:
    return img.shape[2] if img.ndim == 3 else 1


def join(parts: list[np.ndarray], keep: list[int] | None = None, copy=False) -> np.ndarray:
    """The first keep[k] channels (default: all) of each HWC part in turn, as one fresh HWC array, in one cv2
    pass (np.concatenate of HWC arrays is ~8x slower). A single part kept whole is returned as it is, unless copy."""
    have = [channels(p) for p in parts]
    keep = keep or have
    if len(parts) == 1 and keep == have:
        return np.array(parts[0]) if copy else parts[0]
    out = np.empty((*parts[0].shape[:2], sum(keep)), parts[0].dtype)
    if len(parts) == 1 and (have[0], keep[0]) == (4, 3):
        return cv2.cvtColor(parts[0], cv2.COLOR_BGRA2BGR, dst=out)  # ~6x faster than mixChannels
    src, dst = np.cumsum([0, *have]), np.cumsum([0, *keep])
    pairs = [int(i) for k in range(len(parts)) for c in range(keep[k]) for i in (src[k] + c, dst[k] + c)]
    cv2.mixChannels(parts, [out], pairs)
    return out


def channel_groups(img: np.ndarray) -> list[np.ndarray]:
    """img as arrays of at most 4 channels: cv2 handles more only by a slow generic path (warpAffine's is also
    inexact, coordinates rounded to 1/32 px; INTER_AREA resizing refuses non-integer scales)."""
    c = channels(img)
    return [img] if c <= 4 else [np.ascontiguousarray(img[..., k:k + 3]) for k in range(0, c, 3)]


_scratch = threading.local()


def scratch(key, shape, dtype=np.uint8) -> np.ndarray:
    """A per-thread buffer reused for intermediate images: a fresh one of this size costs a page fault every
    4 KB (glibc maps large allocations anew), as much CPU as the warp itself."""
    bufs = _scratch.__dict__.setdefault("bufs", {})
    if key not in bufs or bufs[key].shape != shape or bufs[key].dtype != dtype:
        bufs[key] = np.empty(shape, dtype)
    return bufs[key]


class Augment:
    """Flips and a small shift/scale/rotate; optional crop of the empty border around the head."""

    def __init__(self, hflip=0.5, vflip=0.0, affine=0.7, max_shift=0.06, max_scale=0.1, max_rotate=15.0):
        self.hflip, self.vflip, self.affine = hflip, vflip, affine
        self.max_shift, self.max_scale, self.max_rotate = max_shift, max_scale, max_rotate

    def __call__(self, img, rng: np.random.Generator) -> np.ndarray:
        """img: a uint8 HWC array, or the list of HWC parts whose channels, in order, make the image (views of
        the cache are fine: nothing is written in place). Each part is flipped and warped on its own, so a
        9-channel sample costs three 3-channel transforms and one merge, and its middle slice gets exactly the
        pixels it gets as a 3-channel sample."""
        parts = list(img) if isinstance(img, (list, tuple)) else channel_groups(img)
        h, w = parts[0].shape[:2]
        hflip, vflip = rng.random() < self.hflip, rng.random() < self.vflip
        flip = -1 if hflip and vflip else 1 if hflip else 0 if vflip else None
        m = None
        if rng.random() < self.affine:
            angle = rng.uniform(-self.max_rotate, self.max_rotate)
            scale = 1 + rng.uniform(-self.max_scale, self.max_scale)
            m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
            m[:, 2] += rng.uniform(-self.max_shift, self.max_shift, 2) * (w, h)
        if flip is None and m is None:
            return join(parts) if isinstance(img, (list, tuple)) else np.ascontiguousarray(img)
        # the transformed parts live in scratch buffers: copy them out, always
        out = join([self.transform(k, p, flip, m) for k, p in enumerate(parts)], list(map(channels, parts)), copy=True)
        return out if isinstance(img, (list, tuple)) else out.reshape(img.shape)

    @staticmethod
    def transform(k: int, img: np.ndarray, flip, m) -> np.ndarray:
        """Part k flipped (cv2.flip code) and warped (2x3 matrix), either or both, into scratch buffers."""
        if flip is not None:
            img = cv2.flip(img, flip, dst=scratch((k, "flip"), img.shape, img.dtype))
        if m is not None:
            h, w = img.shape[:2]
            if channels(img) == 3:  # cv2's 4-channel warp is ~2x faster than its 3-channel one, same pixels
                img = cv2.cvtColor(img, cv2.COLOR_BGR2BGRA, dst=scratch((k, "pad"), (h, w, 4), img.dtype))
            img = cv2.warpAffine(img, m, (w, h), dst=scratch((k, "warp"), img.shape, img.dtype), flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        return img


def crop_border(parts: list[np.ndarray], margin: int = 4) -> list[np.ndarray]:
    """Crop the parts of one image to the bounding box of its non-empty pixels (any channel of any part > 0),
    keeping a small margin."""
    mask = np.logical_or.reduce([p.max(axis=-1) > 0 for p in parts])
    if not mask.any():
        return parts
    ys, xs = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    y0, y1 = max(ys[0] - margin, 0), min(ys[-1] + margin + 1, mask.shape[0])
    x0, x1 = max(xs[0] - margin, 0), min(xs[-1] + margin + 1, mask.shape[1])
    return [p[y0:y1, x0:x1] for p in parts]


class SliceDataset(Dataset):
    """Samples from the cache. images: the cache's path or what load_cache returns (PackedImages: reopened lazily in
    each process), or an in-memory array; rows: cache rows of the samples; labels: (N, 6) or None."""

    def __init__(self, images, rows, labels=None, prev_rows=None, next_rows=None, mode="windows", size=None,
                 augment: Augment | None = None, crop=False, seed=0):
        self.images = PackedImages(images) if isinstance(images, (str, os.PathLike)) else images
        self.rows = np.asarray(rows, dtype=np.int64)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.float32)
        if mode != "windows" and (prev_rows is None or next_rows is None):
            raise PipelineError(f"input_mode {mode!r} needs the neighbour rows of every sample")
        self.prev_rows = None if prev_rows is None else np.asarray(prev_rows, dtype=np.int64)
        self.next_rows = None if next_rows is None else np.asarray(next_rows, dtype=np.int64)
        self.mode, self.size, self.augment, self.crop, self.seed = mode, size, augment, crop, seed
        self.epoch = 0
        self._warmed = None  # the process that asked the cache to warm this data set's rows

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.rows)

    def parts(self, i: int) -> list[np.ndarray]:
        """Sample i before augmentation as 3-channel HWC parts whose channels, in order, make it: views of the
        cache where no crop or resize is asked for (the 9-channel sample is assembled only once, at the end)."""
        r = self.rows[i]
        if self.mode == "windows":
            parts = self.read([r])
        elif self.mode == "slices":
            parts = [join(self.read([self.prev_rows[i], r, self.next_rows[i]]), [1, 1, 1])]  # their brain windows
        else:
            parts = self.read([self.prev_rows[i], r, self.next_rows[i]])
        if self.crop:
            parts = crop_border(parts)
        if self.size and parts[0].shape[:2] != (self.size, self.size):
            interp = cv2.INTER_AREA if parts[0].shape[0] > self.size else cv2.INTER_LINEAR
            parts = [cv2.resize(p, (self.size, self.size), interpolation=interp).reshape(self.size, self.size, -1)
                     for p in parts]
        return parts

    def read(self, rows: list) -> list[np.ndarray]:
        """Cache rows as HWC arrays: from a compact cache, decompressed (a 2.5D sample's adjacent rows in one read),
        and on the first call in each process the rows this data set uses are warmed into the page cache in the
        background (PackedImages.warm); from an array, views."""
        im = self.images
        if not hasattr(im, "read_rows"):
            return [np.asarray(im[r]) for r in rows]
        if self._warmed != os.getpid():
            self._warmed = os.getpid()
            im.warm(self.rows if self.mode == "windows" else np.concatenate([self.rows, self.prev_rows, self.next_rows]))
        return im.read_rows(rows)

    def image(self, i: int) -> np.ndarray:
        """The uint8 HWC input of sample i before augmentation."""
        return join(self.parts(i))

    def __getitem__(self, key):
        # key: an index, or (epoch, index) from EpochSampler(with_epoch=True). The epoch must travel with the
        # index: persistent loader workers keep their own copy of the dataset, which set_epoch never reaches
        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        parts = self.parts(i)
        if self.augment is not None:
            img = self.augment(parts, np.random.default_rng((self.seed, int(epoch), int(i))))
        else:
            img = join(parts)
        # a CHW view of the HWC bytes: channels_last layout, which the model runs in, so no transpose copy
        # here; `collate` keeps that layout for the batch
        if not img.flags.writeable or not img.flags.c_contiguous:
            img = np.array(img, order="C")  # samples left untouched are views of the read-only memmap: copy out
        x = torch.from_numpy(img).permute(2, 0, 1)
        y = torch.from_numpy(self.labels[i]) if self.labels is not None else torch.zeros(len(CLASSES))
        return x, y, i


def collate(batch):
    """Stack samples into an (N, C, H, W) uint8 batch that stays channels-last (a plain memcpy per sample;
    torch's default_collate would transpose every sample to the standard layout)."""
    xs, ys, idx = zip(*batch)
    x = torch.stack([t.permute(1, 2, 0) for t in xs]).permute(0, 3, 1, 2)
    return x, torch.stack(ys), torch.as_tensor(idx)


class EpochSampler(Sampler):
    """Deterministic per-epoch order, sharded across processes (a distributed sampler).

    shuffle=False keeps the given order (evaluation); `balanced` > 0 draws that share of each epoch from
    the positive samples (with replacement) and the rest from the negatives. Every rank gets the same
    number of samples (the order is padded by wrapping around), as DistributedDataParallel needs.
    with_epoch=True yields (epoch, index) pairs, so the dataset's augmentation follows the epoch in every
    loader worker, persistent ones included."""

    def __init__(self, n, shuffle=True, seed=0, rank=0, world=1, positives=None, balanced=0.0, pad=True,
                 with_epoch=False):
        self.n, self.shuffle, self.seed, self.rank, self.world = n, shuffle, seed, rank, world
        self.positives = None if positives is None else np.asarray(positives, dtype=bool)
        self.balanced, self.pad, self.epoch, self.with_epoch = balanced, pad, 0, with_epoch

    def set_epoch(self, epoch):
        self.epoch = epoch

    def order(self) -> np.ndarray:
        rng = np.random.default_rng((self.seed, self.epoch, 7919))
        if not self.shuffle:
            return np.arange(self.n)
        if self.balanced > 0 and self.positives is not None and self.positives.any() and (~self.positives).any():
            pos, neg = np.flatnonzero(self.positives), np.flatnonzero(~self.positives)
            n_pos = int(round(self.n * self.balanced))
            idx = np.concatenate([rng.choice(pos, n_pos, replace=True), rng.choice(neg, self.n - n_pos, replace=True)])
            return rng.permutation(idx)
        return rng.permutation(self.n)

    def __iter__(self):
        idx = self.order()
        if self.world > 1:
            per = math.ceil(len(idx) / self.world) if self.pad else None
            if self.pad:
                idx = np.resize(idx, per * self.world)  # wraps around
            idx = idx[self.rank::self.world]
        return iter([(self.epoch, i) for i in idx.tolist()] if self.with_epoch else idx.tolist())

    def __len__(self):
        if self.world == 1:
            return self.n
        return math.ceil(self.n / self.world) if self.pad else len(range(self.rank, self.n, self.world))
