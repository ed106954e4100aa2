"""Throughput of stage 1 as src.train runs it: training images/s through the spec's loader and on a batch kept on the
device, peak GPU memory, the inference rate with flip TTA at two batch sizes, and an A/B of torch.compile.

    python bench/train_step.py                                                 # the CPU spec (resnet10t, 128 px, batch 32)
    python bench/train_step.py --amp off                                       # the same in float32 (bf16's baseline)
    python bench/train_step.py --spec configs/seresnext50_256.yaml             # a GPU spec: its model, input, size,
    python bench/train_step.py --spec configs/densenet121_256_25d.yaml --compile --json rates.json  # batch, workers, EMA

What is timed is the trainer's own code: `src.train.build` makes the model, optimiser (fused AdamW on CUDA), GradScaler,
weight average (timm ModelEmaV3 at the spec's decay) and the spec's DataLoader (its workers, pinned memory,
augmentation); `src.train.train_epoch` runs `engine.train_one_epoch` with gradient clipping, the EMA update and the
lr schedule, as `fit` does; inference is `engine.predict_loader` with the embeddings, as the OOF and test passes run
it. Rates are steady state: --warmup steps first (cuDNN's autotuning, the workers starting), then --steps timed. The
loader's data set is the cache's rows repeated to (warmup + steps) x batch samples, so one pass of the sampler
covers the whole measurement and the loader never restarts (the cache is small, so it is read from memory:
docs/benchmarks.md has the cold-cache figures).

Printed as ratios against a baseline measured in the same run: (b) `train_one_epoch` on one batch kept on the device
(1.00), (a) through the real loader ((a)/(b) near 1: the loader keeps up); inference with TTA against the plain pass at
the pipeline's batch size (engine.infer_batch_size); compiled against eager on the device batch. `--json FILE` adds this
spec's figures to FILE (bench/gpu_check.sh's rates.json; bench/gpu_projection.py reads it). `--sample-cost` also
prints the loader's CPU per augmented sample for 3 and 9 channels (bench/sample_cost.py). Data: an existing cache
(--out-dir OUT with OUT/cache) or a generated data set at --size.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from src.config import TrainConfig, parse_config  # noqa: E402
from src.data import collate, neighbour_rows  # noqa: E402
from src.engine import infer_batch_size, pick_device, predict_loader  # noqa: E402
from src.cache import load_cache  # noqa: E402
from src.prepare import prepare  # noqa: E402
from src.train import Fold, build, make_dataset, train_epoch  # noqa: E402
from src.utils import CLASSES  # noqa: E402

CPU_SPEC = str(Path(__file__).resolve().parents[1] / "configs" / "resnet10t_128.yaml")


def settings(a) -> TrainConfig:
    """The spec's settings with this command's overrides; random initial weights (no ImageNet download)."""
    cfg = parse_config(TrainConfig, ["--config", a.spec])
    over = {"model": a.model, "input_mode": a.mode, "img_size": a.size, "batch_size": a.batch, "workers": a.workers,
            "amp": a.amp, "ema": a.ema, "grad_clip": a.grad_clip}
    return dataclasses.replace(cfg, pretrained=False, weights="", device=a.device, tensorboard=False,
                               **{k: v for k, v in over.items() if v is not None})


def tables(meta: pd.DataFrame, n_train: int, n_infer: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Training and inference tables (row, neighbours, labels) of the cache's readable rows repeated to n rows."""
    prev, nxt = neighbour_rows(meta)
    ok = (meta.status == "ok").to_numpy()
    base = pd.DataFrame({"row": meta["row"][ok].to_numpy(), "prev_row": prev[ok], "next_row": nxt[ok]})
    for c in CLASSES:
        base[c] = (np.arange(len(base)) % 7 == 0).astype(np.float32)  # a few positives, for the balanced sampler
    return tuple(base.iloc[np.resize(np.arange(len(base)), n)].reset_index(drop=True) for n in (n_train, n_infer))


def peak_gb(device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def train_rates(fold: Fold, m, a) -> dict:
    """(b) images/s on one batch kept on the device, (a) through the spec's loader over one pass; peak memory of (b)."""
    warm, timed = dataclasses.replace(m, steps=a.warmup), dataclasses.replace(m, steps=a.steps)
    x, y, i = next(iter(m.tr_dl))
    on_device = itertools.repeat((x.to(fold.device), y.to(fold.device), i))
    reset_peak(fold.device)
    train_epoch(fold, warm, 0, batches=on_device)
    device_rate = train_epoch(fold, timed, 0, batches=on_device).images_per_s
    memory = peak_gb(fold.device)
    m.sampler.set_epoch(1)
    it = iter(m.tr_dl)  # one iterator for warm-up and timed steps: the loader does not restart in between
    train_epoch(fold, warm, 1, batches=it)
    loader_rate = train_epoch(fold, timed, 1, batches=it).images_per_s
    return {"train_device_images_per_s": round(device_rate, 1), "train_loader_images_per_s": round(loader_rate, 1),
            "loader_ratio": round(loader_rate / device_rate, 3), "train_peak_gb": memory}


def infer_rate(fold: Fold, m, table: pd.DataFrame, images, batch: int, tta: bool) -> tuple[float, float | None]:
    """(images/s, peak GB) of predict_loader over `table`, after a warm-up of two batches at the same size."""
    cfg, device = fold.cfg, fold.device
    ds = make_dataset(images, table, cfg, False)
    kw = dict(batch_size=batch, num_workers=cfg.workers, pin_memory=device.type == "cuda", collate_fn=collate)
    run = lambda dl: predict_loader(m.kept, dl, device, m.amp_dtype, hflip_tta=tta, channels_last=cfg.channels_last,  # noqa: E731
                                    progress=False, embeddings=True)
    run(DataLoader(torch.utils.data.Subset(ds, range(min(len(ds), 2 * batch))), **kw))
    reset_peak(device)
    t0 = time.perf_counter()
    run(DataLoader(ds, **kw))  # ends with the outputs copied to the host: the time is real
    return len(ds) / (time.perf_counter() - t0), peak_gb(device)


def compile_ab(fold: Fold, m, a) -> dict:
    """torch.compile of the trained network against eager, each on the same batch kept on the device."""
    x, y, i = next(iter(m.tr_dl))
    on_device = itertools.repeat((x.to(fold.device), y.to(fold.device), i))
    train_epoch(fold, dataclasses.replace(m, steps=a.warmup), 0, batches=on_device)
    eager_rate = train_epoch(fold, dataclasses.replace(m, steps=a.steps), 0, batches=on_device).images_per_s
    compiled = dataclasses.replace(m, parallel=torch.compile(m.trained, backend=a.compile_backend))
    t0 = time.perf_counter()
    train_epoch(fold, dataclasses.replace(compiled, steps=a.warmup), 0, batches=on_device)
    compile_s = time.perf_counter() - t0
    rate = train_epoch(fold, dataclasses.replace(compiled, steps=a.steps), 0, batches=on_device).images_per_s
    return {"backend": a.compile_backend, "compile_and_warmup_s": round(compile_s, 1),
            "eager_images_per_s": round(eager_rate, 1), "compiled_images_per_s": round(rate, 1),
            "ratio": round(rate / eager_rate, 3)}


def device_info(device) -> dict:
    info = {"device": device.type, "torch": torch.__version__, "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(name=p.name, memory_gb=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), bf16=torch.cuda.is_bf16_supported())
    return info


def merge_json(path: Path, name: str, figures: dict, info: dict) -> None:
    """Add one spec's figures to a rates file (written whole through a temporary file: a kill leaves the old one)."""
    rates = json.loads(path.read_text()) if path.exists() else {}
    rates.setdefault("device", info)
    rates.setdefault("specs", {}).setdefault(name, {}).update(figures)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(rates, indent=1))
    os.replace(tmp, path)


def measure(a, cfg: TrainConfig, images, meta, device, log) -> dict:
    """Every figure of one spec."""
    n_train = (a.warmup + a.steps) * cfg.batch_size + cfg.batch_size
    tr, va = tables(meta, n_train, a.infer_images)
    fold = Fold(cfg, 0, 1, device, Path(tempfile.gettempdir()), None, None, log)
    torch.manual_seed(0)
    m = build(fold, images, tr, va.iloc[:cfg.batch_size])
    if a.compile_only:
        return {"compile": compile_ab(fold, m, a)}
    out = {"model": cfg.model, "input_mode": cfg.input_mode, "img_size": cfg.img_size, "batch_size": cfg.batch_size,
           "workers": cfg.workers, "ema": cfg.ema, "amp": str(m.amp_dtype or "off"),
           "grad_scaler": m.scaler.is_enabled(), "steps": a.steps, "warmup": a.warmup, **train_rates(fold, m, a)}
    plain, _ = infer_rate(fold, m, va, images, infer_batch_size(device), tta=False)
    out["infer_batch_size"] = infer_batch_size(device)
    out["infer_plain_images_per_s"] = round(plain, 1)
    out["infer_tta"] = {}
    for b in a.infer_batches:
        rate, mem = infer_rate(fold, m, va, images, b, tta=True)
        out["infer_tta"][str(b)] = {"images_per_s": round(rate, 1), "peak_gb": mem}
    if a.compile:
        out["compile"] = compile_ab(fold, m, a)
    return out


def report(name: str, r: dict) -> None:
    if "model" not in r:  # --compile-only
        return report_compile(r["compile"])
    print(f"{name}: {r['model']} @ {r['img_size']}px, {r['input_mode']}, batch {r['batch_size']}, loader workers "
          f"{r['workers']}, amp {r['amp']}{' + GradScaler' if r['grad_scaler'] else ''}, EMA {r['ema']}")
    print(f"  (b) train, batch on the device: {r['train_device_images_per_s']:9.1f} images/s  1.00"
          + (f"  (peak {r['train_peak_gb']} GB)" if r["train_peak_gb"] is not None else ""))
    print(f"  (a) train, the spec's loader:   {r['train_loader_images_per_s']:9.1f} images/s  {r['loader_ratio']:.2f}")
    plain = r["infer_plain_images_per_s"]
    print(f"  inference, plain, batch {r['infer_batch_size']}:  {plain:9.1f} images/s  1.00")
    for b, v in r["infer_tta"].items():
        print(f"  inference, flip TTA, batch {b}: {v['images_per_s']:9.1f} images/s  {v['images_per_s'] / plain:.2f}"
              + (f"  (peak {v['peak_gb']} GB)" if v["peak_gb"] is not None else ""))
    if "compile" in r:
        report_compile(r["compile"])


def report_compile(c: dict) -> None:
    print(f"  train, batch on the device, eager: {c['eager_images_per_s']:9.1f} images/s  1.00")
    print(f"  the same, torch.compile ({c['backend']}): {c['compiled_images_per_s']:9.1f} images/s  {c['ratio']:.2f}  "
          f"(compile and warm-up {c['compile_and_warmup_s']} s)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", nargs="+", default=[CPU_SPEC], help="model spec file(s) (default: the CPU spec)")
    ap.add_argument("--model", help="override the spec's timm model")
    ap.add_argument("--mode", help="input mode: windows, slices or slices_windows (9 channels)")
    ap.add_argument("--size", type=int, help="input size in pixels")
    ap.add_argument("--batch", type=int, help="training batch")
    ap.add_argument("--workers", type=int, help="loader worker processes")
    ap.add_argument("--amp", help="auto, bf16, fp16 (+ GradScaler on CUDA), off")
    ap.add_argument("--ema", type=float, help="EMA decay (0: off)")
    ap.add_argument("--grad-clip", type=float, help="max gradient norm (0: off)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=30, help="timed training steps")
    ap.add_argument("--warmup", type=int, default=5, help="training steps before the timed ones")
    ap.add_argument("--infer-batches", type=int, nargs=2, help="two inference batch sizes for the TTA rate "
                    "(default: half and twice engine.infer_batch_size)")
    ap.add_argument("--infer-images", type=int, default=0, help="images per inference measurement (default 8 of the "
                    "larger batch)")
    ap.add_argument("--compile", action="store_true", help="also the A/B of torch.compile")
    ap.add_argument("--compile-only", action="store_true", help="only the A/B of torch.compile")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: tracing only)")
    ap.add_argument("--sample-cost", action="store_true", help="also the loader's CPU per augmented sample")
    ap.add_argument("--out-dir", default=None, help="an outputs folder with a finished cache/ (default: generate data)")
    ap.add_argument("--json", default=None, help="add the figures to this rates file")
    a = ap.parse_args()
    device = pick_device(a.device)
    a.infer_batches = a.infer_batches or [infer_batch_size(device) // 2, infer_batch_size(device) * 2]
    a.infer_images = a.infer_images or 8 * max(a.infer_batches)
    log = logging.getLogger("bench.train_step")
    cfgs = [settings(argparse.Namespace(**{**vars(a), "spec": s})) for s in a.spec]
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(a.out_dir) / "cache" if a.out_dir else Path(tmp) / "cache"
        if not a.out_dir:
            from src.synth import generate
            generate(Path(tmp) / "demo", n_patients=12, n_test_series=1, image_size=max(c.img_size for c in cfgs),
                     seed=0, quiet=True)
            prepare(Path(tmp) / "demo", cache, size=max(c.img_size for c in cfgs), quiet=True)
        images, meta = load_cache(cache)
        print(f"device {device_info(device)}")
        for spec, cfg in zip(a.spec, cfgs):
            name = Path(spec).stem
            r = measure(a, cfg, images, meta, device, log)
            report(name, r)
            if a.json:
                merge_json(Path(a.json), name, r, device_info(device))
        if a.sample_cost:
            sample_cost(images, meta, cfgs[0].img_size)


def sample_cost(images, meta, size: int) -> None:
    from bench.sample_cost import per_sample_ms
    from src.data import Augment, SliceDataset
    prev, nxt = neighbour_rows(meta)
    ok = (meta.status == "ok").to_numpy()
    cost = {m: per_sample_ms(SliceDataset(images, meta["row"][ok], None, prev[ok], nxt[ok], m, size, Augment()))
            for m in ("windows", "slices_windows")}
    print(f"loader CPU per augmented sample at {size} px: 3 channels {cost['windows']:.3f} ms, 9 channels "
          f"{cost['slices_windows']:.3f} ms (one worker feeds ~{1000 / cost['slices_windows']:.0f} 9-channel samples/s)")


if __name__ == "__main__":
    main()
