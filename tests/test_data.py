"""The sample path of src/data.py against the previous numpy implementation, and the lazily opened cache.

    python -m pytest tests/test_data.py
"""
import io
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from src.cache import PackedImages, encode_image, packed_tail
from src.data import Augment, EpochSampler, SliceDataset, collate

N, S = 10, 48


# --- the reference: the numpy sample path this module had before it moved to cv2 -----------------------------
# One deliberate difference: cv2 calls on more than 4 channels (the 9-channel warp and resize) run on each
# 3-channel group. cv2 handles >4 channels by a generic path whose warpAffine rounds coordinates to 1/32 px
# (up to ~7 grey levels off exact bilinear interpolation on sharp edges) and whose INTER_AREA resize refuses
# non-integer scales (the old 9-channel mode crashed at e.g. 256 -> 224 px).

def by_groups(fn, img):
    if img.shape[-1] <= 4:
        return fn(img)
    return np.concatenate([fn(np.ascontiguousarray(img[..., k:k + 3])) for k in range(0, img.shape[-1], 3)], -1)


def ref_augment(a: Augment, img, rng):
    if rng.random() < a.hflip:
        img = img[:, ::-1]
    if rng.random() < a.vflip:
        img = img[::-1]
    if rng.random() < a.affine:
        h, w = img.shape[:2]
        angle = rng.uniform(-a.max_rotate, a.max_rotate)
        scale = 1 + rng.uniform(-a.max_scale, a.max_scale)
        m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
        m[:, 2] += rng.uniform(-a.max_shift, a.max_shift, 2) * (w, h)
        warp = lambda x: cv2.warpAffine(x, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                                        borderValue=0).reshape(x.shape)
        img = by_groups(warp, np.ascontiguousarray(img))
    return np.ascontiguousarray(img)


def ref_crop_border(img, margin=4):
    mask = img.max(axis=-1) > 0
    if not mask.any():
        return img
    ys, xs = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    y0, y1 = max(ys[0] - margin, 0), min(ys[-1] + margin + 1, img.shape[0])
    x0, x1 = max(xs[0] - margin, 0), min(xs[-1] + margin + 1, img.shape[1])
    return img[y0:y1, x0:x1]


def ref_sample(images, row, prev, nxt, mode, size=None, augment=None, crop=False, seed=0, epoch=0, i=0):
    if mode == "windows":
        img = np.asarray(images[row])
    elif mode == "slices":
        img = np.stack([images[prev, :, :, 0], images[row, :, :, 0], images[nxt, :, :, 0]], axis=-1)
    else:
        img = np.concatenate([images[prev], images[row], images[nxt]], axis=-1)
    if crop:
        img = ref_crop_border(img)
    if size and img.shape[:2] != (size, size):
        interp = cv2.INTER_AREA if img.shape[0] > size else cv2.INTER_LINEAR
        img = by_groups(lambda x: cv2.resize(x, (size, size), interpolation=interp).reshape(size, size, -1), img)
    if augment is not None:
        img = ref_augment(augment, img, np.random.default_rng((seed, epoch, int(i))))
    return np.ascontiguousarray(img)


# --- data ----------------------------------------------------------------------------------------------------

def head_images(n=N, s=S, seed=0):
    """Noise inside a different off-centre ellipse per row, zero (air) around it: sharp edges for the
    interpolation, and a border for the crop to find."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:s, :s]
    out = rng.integers(1, 256, (n, s, s, 3), dtype=np.uint8)
    for k in range(n):
        cy, cx = rng.uniform(0.35, 0.65, 2) * s
        ry, rx = rng.uniform(0.15, 0.4, 2) * s
        out[k][((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 > 1] = 0
    out[3] = 0  # an empty slice: the crop keeps it whole
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """head_images() as src.prepare's compact cache (images.bin)."""
    images = head_images()
    blobs = [encode_image(x) for x in images]
    path = tmp_path_factory.mktemp("cache") / "images.bin"
    path.write_bytes(b"".join(blobs) + packed_tail(np.r_[0, np.cumsum([len(b) for b in blobs])], images.shape))
    return path


def neighbours(n=N):
    rows = np.arange(n)[::-1].copy()  # sample order differs from cache order
    return rows, np.maximum(rows - 1, 0), np.minimum(rows + 1, n - 1)


def hwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(1, 2, 0).numpy()


AUGMENTS = {"none": None, "default": Augment(), "all": Augment(hflip=0.5, vflip=0.5, affine=0.7, max_rotate=30)}


@pytest.mark.parametrize("mode", ["windows", "slices", "slices_windows"])
@pytest.mark.parametrize("aug", list(AUGMENTS))
@pytest.mark.parametrize("size,crop", [(None, False), (36, False), (24, False), (64, False), (None, True), (40, True)])
def test_samples_equal_the_numpy_reference(cache, mode, aug, size, crop):
    images = head_images()
    rows, prev, nxt = neighbours()
    labels = np.random.default_rng(1).random((N, 6)).astype(np.float32)
    ds = SliceDataset(cache, rows, labels, prev, nxt, mode=mode, size=size, augment=AUGMENTS[aug], crop=crop, seed=5)
    got = {}
    for epoch in range(3):
        ds.set_epoch(epoch)
        got.update({(epoch, i): ds[i] for i in range(N)})  # all kept first: no sample may share a buffer
    for (epoch, i), (x, y, idx) in got.items():
        want = ref_sample(images, rows[i], prev[i], nxt[i], mode, size, AUGMENTS[aug], crop, 5, epoch, i)
        assert x.dtype == torch.uint8 and x.shape == (want.shape[2], *want.shape[:2])
        assert hwc(x).flags.c_contiguous  # channels-last bytes, which collate relies on
        np.testing.assert_array_equal(hwc(x), want, err_msg=f"{mode} {aug} size={size} crop={crop} epoch={epoch} i={i}")
        assert idx == i and torch.equal(y, torch.from_numpy(labels[i]))
    changed = [not np.array_equal(hwc(got[0, i][0]), hwc(got[1, i][0])) for i in range(N)]
    if aug == "none":
        assert not any(changed)  # without augmentation every epoch gives the same samples
    else:
        assert any(changed)  # the epoch reseeds the augmentation


def test_nine_channels_are_the_three_channel_samples_of_each_slice(cache):
    """With the same (seed, epoch, index) every slice of a 9-channel sample gets the transform, and the pixels,
    that slice gets as a 3-channel sample."""
    rows, prev, nxt = neighbours()
    kw = dict(augment=Augment(hflip=0.5, vflip=0.5), seed=2)
    ds9 = SliceDataset(cache, rows, None, prev, nxt, mode="slices_windows", **kw)
    ds3 = [SliceDataset(cache, r, **kw) for r in (prev, rows, nxt)]
    for epoch in range(4):
        for d in (ds9, *ds3):
            d.set_epoch(epoch)
        for i in range(N):
            assert torch.equal(ds9[i][0], torch.cat([d[i][0] for d in ds3]))


def test_warp_is_bilinear_interpolation(cache):
    """The augmented sample against bilinear interpolation computed in float32 channel by channel: within
    1 grey level (cv2's rounding of its fixed-point coordinates)."""
    rows, prev, nxt = neighbours()
    aug = Augment(hflip=0, affine=1.0, max_rotate=30)
    ds = SliceDataset(cache, rows, None, prev, nxt, mode="slices_windows", augment=aug, seed=9)
    for i in range(N):
        img = ds.image(i).astype(np.float32)
        rng = np.random.default_rng((9, 0, i))
        rng.random(3)
        h, w = img.shape[:2]
        m = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-30, 30), 1 + rng.uniform(-0.1, 0.1))
        m[:, 2] += rng.uniform(-0.06, 0.06, 2) * (w, h)
        want = np.stack([cv2.warpAffine(np.ascontiguousarray(img[..., c]), m, (w, h), flags=cv2.INTER_LINEAR)
                         for c in range(9)], -1)
        assert np.abs(hwc(ds[i][0]).astype(np.float32) - want).max() <= 1


@pytest.mark.parametrize("shape", [(S, S), (S, S, 1), (S, S, 3), (S, S, 4), (S, S, 9)])
def test_augment_of_a_plain_array(shape):
    img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    aug = Augment(hflip=0.5, vflip=0.5, affine=0.7)
    for k in range(8):
        ref = img if len(shape) == 3 else img[..., None]
        want = ref_augment(aug, ref, np.random.default_rng(k)).reshape(shape)
        np.testing.assert_array_equal(aug(img, np.random.default_rng(k)), want)


# --- the cache opened lazily in each process -------------------------------------------------------------------

class ArrayRecorder(pickle.Pickler):
    """Pickles to memory, recording every numpy array it meets."""

    def __init__(self):
        self.buf = io.BytesIO()
        super().__init__(self.buf, protocol=pickle.HIGHEST_PROTOCOL)
        self.arrays = []

    def reducer_override(self, obj):
        if isinstance(obj, np.ndarray):
            self.arrays.append(obj)
        return NotImplemented


def pickled(obj):
    p = ArrayRecorder()
    p.dump(obj)
    return p.arrays, len(p.buf.getvalue())


@pytest.mark.parametrize("source", ["path", "PackedImages"])
def test_dataset_pickles_without_its_images(cache, source):
    images = {"path": cache, "PackedImages": PackedImages(cache)}[source]
    rows, prev, nxt = neighbours()
    labels = np.zeros((N, 6), np.float32)
    ds = SliceDataset(images, rows, labels, prev, nxt, mode="slices_windows", augment=Augment())
    ds[0]  # the map is open now, and still must not travel
    assert isinstance(ds.images, PackedImages)
    arrays, size = pickled(ds)
    assert {id(a) for a in arrays} <= {id(ds.rows), id(ds.labels), id(ds.prev_rows), id(ds.next_rows)}
    assert size < head_images().nbytes / 10
    for i in range(N):
        assert torch.equal(pickle.loads(pickle.dumps(ds))[i][0], ds[i][0])


def test_in_memory_arrays_stay_in_memory(cache, tmp_path):
    """The demo's decoded images, a slice of a map, a writable map and a map of a raw file are used as they are
    (and pickled whole: the recorder does see image arrays when they are there)."""
    mem = head_images()
    mem.tofile(tmp_path / "raw.u8")
    np.save(tmp_path / "images.npy", mem)
    raw = np.memmap(tmp_path / "raw.u8", np.uint8, "r", shape=mem.shape)
    rows, prev, nxt = neighbours()
    lazy = SliceDataset(cache, rows, None, prev, nxt, mode="slices_windows", augment=Augment())
    npy = tmp_path / "images.npy"
    for images in (mem, np.load(npy, mmap_mode="r"), np.load(npy, mmap_mode="r")[:], np.load(npy, mmap_mode="c"), raw):
        ds = SliceDataset(images, rows, None, prev, nxt, mode="slices_windows", augment=Augment())
        assert ds.images is images
        assert any(np.shares_memory(a, images) for a in pickled(ds)[0])
        for i in range(N):
            assert torch.equal(ds[i][0], lazy[i][0])


def test_spawned_workers_load_the_same_batches(cache):
    rows, prev, nxt = neighbours()
    labels = np.random.default_rng(0).random((N, 6)).astype(np.float32)
    ds = SliceDataset(head_images(), rows, labels, prev, nxt, mode="slices_windows",
                      augment=Augment(), seed=3)
    ds.set_epoch(2)

    def batches(**kw):
        return list(DataLoader(ds, 3, sampler=EpochSampler(N, seed=1), collate_fn=collate, **kw))

    local = batches()
    spawned = batches(num_workers=2, multiprocessing_context="spawn")
    assert len(spawned) == len(local) == 4
    for a, b in zip(local, spawned):
        assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_persistent_workers_follow_the_epoch(cache):
    """The epoch travels with each index: persistent workers (which keep their own copy of the dataset, out of
    set_epoch's reach) augment epoch 2 as epoch 2, exactly as a loader in the main process does."""
    rows, prev, nxt = neighbours()
    ds = SliceDataset(head_images(), rows, None, prev, nxt, mode="windows", augment=Augment(), seed=3)
    sampler = EpochSampler(N, seed=1, with_epoch=True)

    def epochs(**kw):
        dl = DataLoader(ds, 4, sampler=sampler, collate_fn=collate, **kw)
        out = []
        for e in range(3):
            sampler.set_epoch(e)
            out.append(torch.cat([x for x, _, _ in dl]))
        return out

    local = epochs()
    workers = epochs(num_workers=2, persistent_workers=True)
    assert all(torch.equal(a, b) for a, b in zip(local, workers))
    order = [list(sampler) for sampler.epoch in range(3)]
    # re-sorted into index order, each epoch's images differ: the augmentation is drawn anew each epoch
    by_index = [x[np.argsort([i for _, i in o])] for x, o in zip(local, order)]
    assert not torch.equal(by_index[0], by_index[1]) and not torch.equal(by_index[1], by_index[2])


# --- the compact cache (src.prepare's images.bin) ----------------------------------------------------------------

@pytest.fixture(scope="module")
def packed(cache):
    return cache


def test_packed_images_behave_like_the_array(packed):
    arr, im = head_images(), PackedImages(packed)
    assert im.shape == arr.shape and im.dtype == arr.dtype and len(im) == len(arr)
    np.testing.assert_array_equal(im[4], arr[4])
    np.testing.assert_array_equal(im[-1], arr[-1])
    np.testing.assert_array_equal(im[4, 1:5, :, 2], arr[4, 1:5, :, 2])
    np.testing.assert_array_equal(im[[7, 2, 2]], arr[[7, 2, 2]])
    np.testing.assert_array_equal(im[2:9:3, :, :, 0], arr[2:9:3, :, :, 0])
    mask = np.arange(N) % 3 == 0
    np.testing.assert_array_equal(im[mask], arr[mask])
    np.testing.assert_array_equal(np.asarray(im), arr)
    assert not im[3].any()  # the empty slice, stored as 0 bytes
    with pytest.raises(IndexError):
        im[N]
    again = pickle.loads(pickle.dumps(im))
    assert again.path == im.path and again._fd is None and len(pickle.dumps(im)) < 200  # reopened, not carried
    np.testing.assert_array_equal(again[7], arr[7])


def test_adjacent_rows_are_read_at_once(packed, monkeypatch):
    im, reads = PackedImages(packed), []
    real = im._read
    monkeypatch.setattr(im, "_read", lambda start, n: reads.append(n) or real(start, n))
    got = im.read_rows([4, 5, 6])
    assert len(reads) == 1 and all(np.array_equal(g, head_images()[r]) for g, r in zip(got, (4, 5, 6)))


@pytest.mark.parametrize("mode", ["windows", "slices", "slices_windows"])
def test_samples_from_the_compact_cache_equal_those_from_the_array(cache, packed, mode):
    rows, prev, nxt = neighbours()
    for kw in ({}, dict(augment=Augment(), seed=4), dict(size=36, crop=True, augment=Augment(vflip=0.5))):
        a = SliceDataset(head_images(), rows, None, prev, nxt, mode=mode, **kw)
        b = SliceDataset(packed, rows, None, prev, nxt, mode=mode, **kw)
        for epoch in range(2):
            a.set_epoch(epoch)
            b.set_epoch(epoch)
            for i in range(N):
                assert torch.equal(a[i][0], b[i][0]), (mode, kw, epoch, i)


def test_the_compact_cache_pickles_as_its_path_and_spawned_workers_read_it(packed):
    rows, prev, nxt = neighbours()
    labels = np.random.default_rng(0).random((N, 6)).astype(np.float32)
    ds = SliceDataset(PackedImages(packed), rows, labels, prev, nxt, mode="slices_windows", augment=Augment(), seed=3)
    ds[0]  # opened (and warming) in this process: still only the path travels
    assert isinstance(ds.images, PackedImages)
    arrays, size = pickled(ds)
    assert {id(a) for a in arrays} <= {id(ds.rows), id(ds.labels), id(ds.prev_rows), id(ds.next_rows)}
    assert size < 3000

    def batches(**kw):
        return list(DataLoader(ds, 3, sampler=EpochSampler(N, seed=1), collate_fn=collate, **kw))

    local, spawned = batches(), batches(num_workers=2, multiprocessing_context="spawn")
    assert len(spawned) == len(local) == 4
    for a, b in zip(local, spawned):
        assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_warming_reads_what_is_not_in_memory(packed, tmp_path, monkeypatch):
    import os
    import shutil

    from src.cache import PackedImages, page_residency, prefetch
    # a copy of its own: other tests' background warm-ups may still be reading the shared file
    packed = Path(shutil.copy(packed, tmp_path / "images.bin"))
    im = PackedImages(packed)
    fd = os.open(packed, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages cannot be evicted
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        resident = page_residency(fd)
        if resident is None:
            pytest.skip("mincore is not available here")
        if resident(0, os.fstat(fd).st_size):
            pytest.skip("the kernel kept the file's pages in memory")
    finally:
        os.close(fd)
    assert prefetch(str(packed), im.spans()) > 0
    assert prefetch(str(packed), im.spans()) == 0  # all resident now: nothing read
    t = im.warm([1, 2])
    t.join()
    assert im.spans([1, 2]) == [(int(im.offsets[1]), int(im.offsets[3]))]
    monkeypatch.setenv("ICH_PREFETCH", "0")
    assert im.warm() is None
