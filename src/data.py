"""Dataset over the image cache: one slice (3 windows) or its neighbours (2.5D), with CT-friendly augmentation.

The dataset knows nothing about the model: it returns uint8 CHW tensors in channels-last memory
layout (the model normalises them on the device, which moves 4x fewer bytes than float32), the six
labels, and the sample's index.
Augmentation draws from a generator seeded by (seed, epoch, index), so a sample's augmentation does
not depend on worker count or process, and a resumed run sees exactly the batches it would have seen.
"""
from __future__ import annotations

import math

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler

from .utils import CLASSES, PipelineError


def neighbour_rows(meta: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """For every metadata row, the cache rows of the previous and next slice of its series.

    At a series edge (or for a slice that is not in a series) the slice itself stands in for the missing
    neighbour, so edge slices repeat."""
    row_of = dict(zip(meta["ID"], meta["row"]))
    own = meta["row"].to_numpy()
    prev = np.array([row_of.get(p, r) if p else r for p, r in zip(meta["prev_id"].fillna(""), own)], dtype=np.int64)
    nxt = np.array([row_of.get(n, r) if n else r for n, r in zip(meta["next_id"].fillna(""), own)], dtype=np.int64)
    return prev, nxt


class Augment:
    """Flips and a small shift/scale/rotate; optional crop of the empty border around the head."""

    def __init__(self, hflip=0.5, vflip=0.0, affine=0.7, max_shift=0.06, max_scale=0.1, max_rotate=15.0):
        self.hflip, self.vflip, self.affine = hflip, vflip, affine
        self.max_shift, self.max_scale, self.max_rotate = max_shift, max_scale, max_rotate

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.random() < self.hflip:
            img = img[:, ::-1]
        if rng.random() < self.vflip:
            img = img[::-1]
        if rng.random() < self.affine:
            h, w = img.shape[:2]
            angle = rng.uniform(-self.max_rotate, self.max_rotate)
            scale = 1 + rng.uniform(-self.max_scale, self.max_scale)
            m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
            m[:, 2] += rng.uniform(-self.max_shift, self.max_shift, 2) * (w, h)
            out = cv2.warpAffine(np.ascontiguousarray(img), m, (w, h), flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            img = out.reshape(img.shape)
        return np.ascontiguousarray(img)


def crop_border(img: np.ndarray, margin: int = 4) -> np.ndarray:
    """Crop to the bounding box of non-empty pixels (any channel > 0), keeping a small margin."""
    mask = img.max(axis=-1) > 0
    if not mask.any():
        return img
    ys, xs = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    y0, y1 = max(ys[0] - margin, 0), min(ys[-1] + margin + 1, img.shape[0])
    x0, x1 = max(xs[0] - margin, 0), min(xs[-1] + margin + 1, img.shape[1])
    return img[y0:y1, x0:x1]


class SliceDataset(Dataset):
    """Samples from the cache. rows: cache rows of the samples; labels: (N, 6) or None."""

    def __init__(self, images, rows, labels=None, prev_rows=None, next_rows=None, mode="windows", size=None,
                 augment: Augment | None = None, crop=False, seed=0):
        self.images, self.rows = images, np.asarray(rows, dtype=np.int64)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.float32)
        if mode != "windows" and (prev_rows is None or next_rows is None):
            raise PipelineError(f"input_mode {mode!r} needs the neighbour rows of every sample")
        self.prev_rows = None if prev_rows is None else np.asarray(prev_rows, dtype=np.int64)
        self.next_rows = None if next_rows is None else np.asarray(next_rows, dtype=np.int64)
        self.mode, self.size, self.augment, self.crop, self.seed = mode, size, augment, crop, seed
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.rows)

    def image(self, i: int) -> np.ndarray:
        """The uint8 HWC input of sample i before augmentation."""
        r = self.rows[i]
        if self.mode == "windows":
            img = np.asarray(self.images[r])
        elif self.mode == "slices":
            img = np.stack([self.images[self.prev_rows[i], :, :, 0], self.images[r, :, :, 0],
                            self.images[self.next_rows[i], :, :, 0]], axis=-1)
        else:
            img = np.concatenate([self.images[self.prev_rows[i]], self.images[r], self.images[self.next_rows[i]]], axis=-1)
        if self.crop:
            img = crop_border(img)
        if self.size and img.shape[:2] != (self.size, self.size):
            interp = cv2.INTER_AREA if img.shape[0] > self.size else cv2.INTER_LINEAR
            img = cv2.resize(img, (self.size, self.size), interpolation=interp).reshape(self.size, self.size, -1)
        return img

    def __getitem__(self, i):
        img = self.image(i)
        if self.augment is not None:
            img = self.augment(img, np.random.default_rng((self.seed, self.epoch, int(i))))
        # a CHW view of the HWC bytes: channels_last layout, which the model runs in, so no transpose copy
        # here; `collate` keeps that layout for the batch
        if not img.flags.writeable or not img.flags.c_contiguous:
            img = np.array(img, order="C")  # un-augmented samples are views of the read-only memmap: copy out
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
    number of samples (the order is padded by wrapping around), as DistributedDataParallel needs."""

    def __init__(self, n, shuffle=True, seed=0, rank=0, world=1, positives=None, balanced=0.0, pad=True):
        self.n, self.shuffle, self.seed, self.rank, self.world = n, shuffle, seed, rank, world
        self.positives = None if positives is None else np.asarray(positives, dtype=bool)
        self.balanced, self.pad, self.epoch = balanced, pad, 0

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
        return iter(idx.tolist())

    def __len__(self):
        if self.world == 1:
            return self.n
        return math.ceil(self.n / self.world) if self.pad else len(range(self.rank, self.n, self.world))
