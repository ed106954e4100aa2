"""Training-step throughput of the trainer's own `train_one_epoch`: the real data loader against a batch in memory.

    python bench/train_step.py --workers 1                                   # CPU: resnet10t, 128 px, batch 32
    python bench/train_step.py --model seresnext50_32x4d --size 256 --batch 64 --workers 8           # on a GPU
    python bench/train_step.py --model densenet121 --mode slices_windows --size 256 --batch 64 --workers 16 --amp fp16

(a) images/s of `src.engine.train_one_epoch` fed by the real loader (cache memmap, augmentation, workers,
collate); (b) the same function on one batch kept on the device. (a)/(b) near 1 means the loader keeps up.
Also the loader's CPU cost per augmented sample for 3 and 9 channels (bench/sample_cost.py): N workers feed
about N x 1000 / ms samples per second.
Both use the trainer's loss, optimizer (fused AdamW on CUDA), AMP policy and channels-last layout. Data: an
existing cache (--out-dir OUT with OUT/cache) or a generated dataset at --size.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.sample_cost import per_sample_ms  # noqa: E402
from src.data import Augment, EpochSampler, SliceDataset, collate, neighbour_rows  # noqa: E402
from src.engine import adamw, amp_settings, configure_backend, pick_device, train_one_epoch  # noqa: E402
from src.metrics import WeightedBCE  # noqa: E402
from src.model import create_model  # noqa: E402
from src.cache import load_cache  # noqa: E402
from src.prepare import prepare  # noqa: E402
from src.synth import generate  # noqa: E402


def endless(loader, sampler):
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet10t")
    ap.add_argument("--mode", default="windows", help="input mode: windows, slices or slices_windows (9 channels)")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--amp", default="auto", help="auto, bf16, fp16 (+ GradScaler on CUDA), off")
    ap.add_argument("--out-dir", default=None, help="an outputs folder with a finished cache/ (default: generate data)")
    a = ap.parse_args()
    device = pick_device()
    configure_backend(device)
    amp_dtype, use_scaler = amp_settings(device, a.amp)
    with tempfile.TemporaryDirectory() as tmp:
        if a.out_dir:
            cache = Path(a.out_dir) / "cache"
        else:
            generate(Path(tmp) / "demo", n_patients=12, n_test_series=1, image_size=a.size, seed=0, quiet=True)
            cache = Path(tmp) / "cache"
            prepare(Path(tmp) / "demo", cache, size=a.size, quiet=True)
        images, meta = load_cache(cache)
        prev, nxt = neighbour_rows(meta)
        ok = (meta.status == "ok").to_numpy()
        ds = SliceDataset(images, meta["row"][ok], np.zeros((ok.sum(), 6), np.float32), prev[ok], nxt[ok], a.mode,
                          a.size, Augment())
        sampler = EpochSampler(len(ds), seed=0, with_epoch=True)
        dl = DataLoader(ds, a.batch, sampler=sampler, num_workers=a.workers, collate_fn=collate, drop_last=True,
                        pin_memory=device.type == "cuda", persistent_workers=a.workers > 0)
        in_chans = 9 if a.mode == "slices_windows" else 3

        def rate(batches) -> float:
            torch.manual_seed(0)
            model = create_model(a.model, in_chans).to(device).to(memory_format=torch.channels_last)
            opt, scaler = adamw(model.parameters(), 1e-4, device), torch.amp.GradScaler(device.type, enabled=use_scaler)
            kw = dict(channels_last=True, progress=False)
            train_one_epoch(model, batches, opt, scaler, WeightedBCE(device), device, amp_dtype, steps=a.warmup, **kw)
            return train_one_epoch(model, batches, opt, scaler, WeightedBCE(device), device, amp_dtype, steps=a.steps,
                                   **kw).images_per_s

        cost = {m: per_sample_ms(SliceDataset(images, meta["row"][ok], None, prev[ok], nxt[ok], m, a.size, Augment()))
                for m in ("windows", "slices_windows")}
        x0, y0, i0 = next(iter(dl))
        batch = (x0.to(device), y0.to(device), i0)
        mem = rate(iter(lambda: batch, None))
        real = rate(endless(dl, sampler))
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, threads {torch.get_num_threads()}, amp {amp_dtype or 'off'}"
          f"{' + GradScaler' if use_scaler else ''}, {a.model} @ {a.size}px, {a.mode} ({in_chans} ch), batch {a.batch}, "
          f"loader workers {a.workers}")
    print(f"(b) batch in memory:   {mem:8.1f} images/s  1.00")
    print(f"(a) real data loader:  {real:8.1f} images/s  {real / mem:.2f}")
    print(f"loader CPU per augmented sample at {a.size} px: 3 channels {cost['windows']:.3f} ms, "
          f"9 channels {cost['slices_windows']:.3f} ms (one worker feeds ~{1000 / cost['slices_windows']:.0f} 9-channel "
          f"samples/s)")


if __name__ == "__main__":
    main()
