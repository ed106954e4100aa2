"""Training-step throughput: the real data loader against a batch already in memory.

    python bench/train_step.py                                   # CPU: resnet10t, 128 px, batch 32
    python bench/train_step.py --model resnet18 --size 256 --batch 64 --amp auto --workers 8   # on a GPU

(a) images/s of the full step fed by the real loader (cache memmap, augmentation, workers, collate);
(b) images/s of the same step on one batch kept on the device. (a)/(b) near 1 means the loader keeps
up. Data: an existing cache (--out OUT with OUT/cache) or a small generated dataset.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from src.data import Augment, EpochSampler, SliceDataset, collate  # noqa: E402
from src.infer import amp_settings, autocast, pick_device  # noqa: E402
from src.model import create_model  # noqa: E402
from src.prepare import load_cache, prepare  # noqa: E402
from src.synth import generate  # noqa: E402
from src.train import weighted_bce  # noqa: E402


def step_fn(model, opt, scaler, device, amp_dtype):
    def step(x, y):
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            loss = weighted_bce(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt), scaler.update(), opt.zero_grad(set_to_none=True)
        return loss
    return step


def timed(step, batches, warmup, device):
    t = None
    n = 0
    for i, (x, y) in enumerate(batches):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t, n = time.perf_counter(), 0
        loss = step(x, y)
        n += len(x)
    loss.item()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet10t")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--amp", default="auto")
    ap.add_argument("--out", default=None, help="an outputs folder with a finished cache/ (default: generate demo data)")
    a = ap.parse_args()
    device = pick_device()
    amp_dtype, use_scaler = amp_settings(device, a.amp)
    with tempfile.TemporaryDirectory() as tmp:
        if a.out:
            cache = Path(a.out) / "cache"
        else:
            generate(Path(tmp) / "demo", n_patients=12, n_test_series=1, image_size=a.size, seed=0, quiet=True)
            cache = Path(tmp) / "cache"
            prepare(Path(tmp) / "demo", cache, size=a.size, quiet=True)
        images, meta = load_cache(cache)
        ok = meta[meta.status == "ok"]
        labels = np.zeros((len(ok), 6), np.float32)
        ds = SliceDataset(images, ok["row"], labels, size=a.size, augment=Augment())
        n_batches = a.steps + a.warmup
        sampler = EpochSampler(len(ds), seed=0)
        dl = DataLoader(ds, a.batch, sampler=sampler, num_workers=a.workers, collate_fn=collate, drop_last=True,
                        pin_memory=device.type == "cuda", persistent_workers=a.workers > 0)

        def loader_batches():
            epoch = 0
            while True:
                sampler.set_epoch(epoch)
                for x, y, _ in dl:
                    yield x, y
                epoch += 1

        def run(batches):
            torch.manual_seed(0)
            model = create_model(a.model).to(device).to(memory_format=torch.channels_last).train()
            opt = torch.optim.AdamW(model.parameters(), 1e-4)
            scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
            gen = iter(batches)
            return timed(step_fn(model, opt, scaler, device, amp_dtype), (next(gen) for _ in range(n_batches)), a.warmup, device)

        x0, y0, _ = next(iter(dl))
        x0, y0 = x0.to(device), y0.to(device)
        mem = run(iter(lambda: (x0, y0), None))
        real = run(loader_batches())
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {name}, threads {torch.get_num_threads()}, amp {amp_dtype or 'off'}{' + GradScaler' if use_scaler else ''}, "
          f"{a.model} @ {a.size}px, batch {a.batch}, loader workers {a.workers}")
    print(f"(b) batch in memory:   {mem:8.1f} images/s  1.00")
    print(f"(a) real data loader:  {real:8.1f} images/s  {real / mem:.2f}")


if __name__ == "__main__":
    main()
