"""CPU cost of one training sample: SliceDataset.__getitem__ with augmentation, on both cache formats, against the
old numpy path.

    python bench/sample_cost.py                    # 256 px
    python bench/sample_cost.py --size 512 --n 300 --repeats 5 --no-augment

For each input mode, windows (3 channels), slices (2.5D, 3 channels) and slices_windows (9 channels),
measures the CPU time per sample (time.process_time: every thread of this process, cv2's own and page
faults included) in this single process, with training augmentation (Augment's defaults: hflip 0.5, affine 0.7),
over the same rows stored two ways (page cache warm): the uncompressed array (a memory-mapped .npy, the cache's
format until the compact one) and the compact cache src.prepare writes (images.bin: one LZ4 block per row, read
through PackedImages). The rows are the real slices of ../shared/rsna_sample decoded at --size where that folder
is there (compression depends on the pixels: noise would not compress), else generated noise inside an ellipse.
The baseline is the previous sample path (np.concatenate / np.stack, numpy flips and copies, one cv2.warpAffine
over all channels) on the array, kept below and measured in the same run, alternating with the current path;
ratios are baseline / current (> 1: the current path is cheaper). Medians of the repeats, with their min-max spread.

Other benchmarks import `per_sample_ms(dataset, n, seed)` (`from bench.sample_cost import per_sample_ms`
with the repository root on sys.path).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from src.data import Augment, SliceDataset  # noqa: E402
from src.utils import CLASSES  # noqa: E402

MODES = {"windows": 3, "slices": 3, "slices_windows": 9}


def per_sample_ms(dataset, n=300, seed=0, warmup=20) -> float:
    """CPU milliseconds per `dataset[i]` (all threads of this process), over n indices drawn at random with
    `seed`, after `warmup` samples that are not counted."""
    idx = np.random.default_rng(seed).integers(0, len(dataset), warmup + n).tolist()
    for i in idx[:warmup]:
        dataset[i]
    t = time.process_time()
    for i in idx[warmup:]:
        dataset[i]
    return (time.process_time() - t) / n * 1e3


class OldAugment(Augment):
    """The baseline: Augment as it was, numpy flips and one warp over all channels."""

    def __call__(self, img, rng):
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


class OldSliceDataset(SliceDataset):
    """The baseline: SliceDataset's sample path as it was (no crop or resize here: the cache is at --size)."""

    def image(self, i):
        r, im = self.rows[i], self.images
        if self.mode == "windows":
            return np.asarray(im[r])
        if self.mode == "slices":
            return np.stack([im[self.prev_rows[i], :, :, 0], im[r, :, :, 0], im[self.next_rows[i], :, :, 0]], axis=-1)
        return np.concatenate([im[self.prev_rows[i]], im[r], im[self.next_rows[i]]], axis=-1)

    def __getitem__(self, i):
        img = self.image(i)
        if self.augment is not None:
            img = self.augment(img, np.random.default_rng((self.seed, self.epoch, int(i))))
        if not img.flags.writeable or not img.flags.c_contiguous:
            img = np.array(img, order="C")
        x = torch.from_numpy(img).permute(2, 0, 1)
        y = torch.from_numpy(self.labels[i]) if self.labels is not None else torch.zeros(len(CLASSES))
        return x, y, i


def write_cache(path: Path, rows: int, size: int):
    """Noise inside an ellipse per slice, zero (air) around it, like a windowed head CT cache."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size] / size - 0.5
    head = (yy / 0.42) ** 2 + (xx / 0.36) ** 2 <= 1
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(rows, size, size, 3))
    for r in range(rows):
        arr[r] = rng.integers(0, 256, (size, size, 3), dtype=np.uint8) * head[..., None]
    arr.flush()


def rows_to_measure(size: int, rows: int) -> np.ndarray:
    """The real sample's slices at `size` (cycled up to `rows`), or noise in an ellipse where it is not there."""
    real = Path(__file__).resolve().parents[2] / "shared" / "rsna_sample"
    if (real / "stage_2_train_images").is_dir():
        from src.scans import decode_files
        from src.prepare import list_files
        images, _ = decode_files(list_files(real)["path"].tolist(), size=size)
        return images[np.arange(rows) % len(images)]
    with tempfile.TemporaryDirectory() as tmp:
        write_cache(Path(tmp) / "noise.npy", rows, size)
        return np.load(Path(tmp) / "noise.npy")


def write_packed(path: Path, images: np.ndarray):
    from src.cache import encode_image, packed_tail
    blobs = [encode_image(x) for x in images]
    path.write_bytes(b"".join(blobs) + packed_tail(np.r_[0, np.cumsum([len(b) for b in blobs])], images.shape))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--rows", type=int, default=200, help="slices in the generated cache")
    ap.add_argument("--n", type=int, default=400, help="samples per measurement")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-augment", action="store_true", help="the validation path instead")
    ap.add_argument("--cv2-threads", type=int, default=None, help="cv2.setNumThreads (default: 1, as src.data sets it for the loader)")
    a = ap.parse_args()
    if a.cv2_threads is not None:
        cv2.setNumThreads(a.cv2_threads)
    rows = np.arange(a.rows)
    prev, nxt = np.maximum(rows - 1, 0), np.minimum(rows + 1, a.rows - 1)
    labels = np.zeros((a.rows, len(CLASSES)), np.float32)
    images = rows_to_measure(a.size, a.rows)
    aug = (lambda cls: None) if a.no_augment else (lambda cls: cls())
    kinds = ("old", "npy", "packed")
    with tempfile.TemporaryDirectory() as tmp:
        path, packed = Path(tmp) / "images.npy", Path(tmp) / "images.bin"
        np.save(path, images)
        write_packed(packed, images)
        ds = {}
        for mode in MODES:
            ds["old", mode] = OldSliceDataset(path, rows, labels, prev, nxt, mode, augment=aug(OldAugment))
            ds["old", mode].images = np.load(path, mmap_mode="r")  # exactly as before: the memmap itself
            ds["npy", mode] = SliceDataset(path, rows, labels, prev, nxt, mode, augment=aug(Augment))
            ds["packed", mode] = SliceDataset(packed, rows, labels, prev, nxt, mode, augment=aug(Augment))
        ms = {(k, mode): [] for k in kinds for mode in MODES}
        for rep in range(a.repeats):
            for mode in MODES:
                for k in kinds:
                    ms[k, mode].append(per_sample_ms(ds[k, mode], a.n, seed=rep))
        ratio = packed.stat().st_size / path.stat().st_size
    print(f"cache {a.rows} x {a.size}x{a.size}x3 uint8, compact file {ratio:.2f}x the array's size, "
          f"{'no augmentation' if a.no_augment else 'augmentation hflip 0.5 affine 0.7'}, {a.n} samples x "
          f"{a.repeats} repeats, cv2 threads {cv2.getNumThreads()}; CPU ms per sample: median (min-max)")
    span = lambda v: f"{np.median(v):6.3f} ({min(v):.3f}-{max(v):.3f})"  # noqa: E731
    print(f"{'mode':16s}{'ch':>3s}  {'baseline (old numpy, .npy)':>26s}  {'current, .npy':>22s}  "
          f"{'current, compact':>22s}  {'baseline/compact':>16s}")
    for mode, ch in MODES.items():
        o, n = ms["old", mode], ms["packed", mode]
        r = [x / y for x, y in zip(o, n)]
        print(f"{mode:16s}{ch:3d}  {span(o):>26s}  {span(ms['npy', mode]):>22s}  {span(n):>22s}  "
              f"{np.median(r):7.2f}x ({min(r):.2f}-{max(r):.2f})")


if __name__ == "__main__":
    main()
