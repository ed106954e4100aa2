"""Train one fold of a stage-1 slice classifier; write its out-of-fold predictions and embeddings.

    python -m src.train --fold 0 --data_dir input --model resnet18 --img_size 256 --epochs 5
    python -m src.train --fold 0 --resume                          # continue a killed run
    torchrun --nproc_per_node=4 -m src.train --fold 0 ...          # several GPUs (DistributedDataParallel)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_endpoint=HOST:29500 -m src.train --fold 0 ...

Outputs in OUT/runs/<run_name>/fold<K>/: config.yaml, preprocess.json (the cache's size and windows), train.log (starts with the command line),
epochs.csv (train loss, validation weighted log loss, per-class log loss, seconds), last.pth and
best.pth (one dict each: model, optimizer, scaler, scheduler, epoch, best score, config, RNG states),
oof.csv (ID, fold, six probabilities of the best epoch's model on the validation fold) and
oof_emb.npy (the pooled features before the head, rows in oof.csv order) for the sequence stage.
oof.csv is written last: its presence means the fold is finished.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from .config import TrainConfig, config_from_args, save_yaml
from .data import Augment, EpochSampler, SliceDataset, collate, neighbour_rows
from .folds import load_folds, run_folds_file
from .infer import amp_settings, autocast, pick_device, predict_loader
from .labels import read_labels
from .metrics import per_class_log_loss, weighted_log_loss
from .model import create_model, load_checkpoint, save_checkpoint
from .prepare import cache_settings, load_cache
from .utils import CLASS_WEIGHTS, CLASSES, PipelineError, cli_main, get_logger, out_root, write_csv, write_json, write_npy


def run_dir_of(cfg: TrainConfig) -> Path:
    return out_root(cfg.data_dir, cfg.out_dir) / "runs" / cfg.run_name / f"fold{cfg.fold}"


class WarmupCosine:
    """LR multiplier: linear warmup over `warmup` steps, then cosine decay to 0 at `total` steps."""

    def __init__(self, warmup: int, total: int):
        self.warmup, self.total = max(1, warmup), max(1, total)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        t = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return 0.5 * (1 + math.cos(math.pi * t))


def weighted_bce(logits, y):
    """BCE-with-logits weighted as the metric (any = 2): the training loss is the metric itself."""
    w = torch.as_tensor(CLASS_WEIGHTS, dtype=torch.float32, device=logits.device)
    return (F.binary_cross_entropy_with_logits(logits.float(), y, reduction="none") * w).sum(1).div(w.sum()).mean()


def load_fold_data(cfg: TrainConfig):
    """Cache, labels and the fold split -> (images, train table, val table); tables hold ID, row, neighbours, labels."""
    images, meta = load_cache(out_root(cfg.data_dir, cfg.out_dir) / "cache")
    folds = load_folds(run_folds_file(cfg.data_dir, cfg.k, cfg.fold_seed, cfg.folds_file))
    if cfg.fold not in set(folds["fold"]):
        raise PipelineError(f"--fold {cfg.fold} is not in the folds file (folds {sorted(set(folds['fold']))})")
    labels = read_labels(Path(cfg.data_dir) / "stage_2_train.csv")
    prev_row, next_row = neighbour_rows(meta)
    meta = meta.assign(prev_row=prev_row, next_row=next_row).set_index("ID")
    ok = meta[meta.status == "ok"]
    missing = folds.index.difference(ok.index)
    if len(missing):
        raise PipelineError(f"{len(missing)} fold ID(s) are not readable images in the cache, e.g. {list(missing[:5])}: "
                            f"rebuild the folds for this cache (python -m src.folds)")
    table = folds.join(ok[["row", "prev_row", "next_row", "SeriesInstanceUID"]]).join(labels[CLASSES])
    return images, table[table.fold != cfg.fold], table[table.fold == cfg.fold]


def make_dataset(images, table, cfg: TrainConfig, train: bool) -> SliceDataset:
    aug = Augment(cfg.hflip, cfg.vflip, cfg.affine, cfg.max_shift, cfg.max_scale, cfg.max_rotate) if train else None
    return SliceDataset(images, table["row"], table[CLASSES].to_numpy(), table["prev_row"], table["next_row"],
                        cfg.input_mode, cfg.img_size, aug, cfg.crop_border, cfg.seed)


def make_optimizer(model, cfg: TrainConfig, total_steps: int):
    """AdamW (no weight decay on biases and norms) with linear warmup then cosine decay."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0}],
                            lr=cfg.lr)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(int(cfg.warmup * total_steps), total_steps))


def restore(path, model, opt, scaler, sched, device):
    """Load a last.pth into the live objects and RNG; returns (epochs done, best score, best epoch, history)."""
    ck = load_checkpoint(path)
    model.load_state_dict(ck["model"]), opt.load_state_dict(ck["optimizer"])
    scaler.load_state_dict(ck["scaler"]), sched.load_state_dict(ck["scheduler"])
    torch.set_rng_state(ck["rng"]["torch"])
    if device.type == "cuda" and ck["rng"].get("cuda"):
        torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
    return ck["epoch"], ck["best_score"], ck["best_epoch"], ck["history"]


def setup_distributed(device_name: str):
    """(rank, world size, device); initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name)
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cpu":  # share the cores between the processes
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    return rank, world, device


def gather(obj, world):
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def evaluate(model, loader, device, amp_dtype, world, cfg, progress=True):
    """Predictions for the whole validation set, gathered from every rank, in dataset order."""
    idx, probs, emb = predict_loader(model, loader, device, amp_dtype, channels_last=cfg.channels_last,
                                     progress=progress, desc="validate")
    parts = gather((idx, probs, emb), world)
    idx = np.concatenate([p[0] for p in parts])
    order = np.argsort(idx, kind="stable")
    return np.concatenate([p[1] for p in parts])[order], np.concatenate([p[2] for p in parts])[order]


def train(cfg: TrainConfig) -> Path:
    rank, world, device = setup_distributed(cfg.device)
    main_proc = rank == 0
    run_dir = run_dir_of(cfg)
    log = get_logger(f"train.{cfg.run_name}.{cfg.fold}", run_dir / "train.log" if main_proc else None)
    if main_proc:
        run_dir.mkdir(parents=True, exist_ok=True)
        log.info("command: " + " ".join([Path(sys.executable).name, "-m", "src.train", *sys.argv[1:]]))
        save_yaml(cfg, run_dir / "config.yaml")
        # the cache's size and windows: predict and the demo repeat exactly this preprocessing on new files
        write_json(cache_settings(out_root(cfg.data_dir, cfg.out_dir) / "cache"), run_dir / "preprocess.json")
    images, tr, va = load_fold_data(cfg)
    amp_dtype, use_scaler = amp_settings(device, cfg.amp)
    if main_proc:
        log.info(f"fold {cfg.fold}: {len(tr)} train / {len(va)} val slices; device {device} x{world}; "
                 f"amp {amp_dtype or 'off'}{' + GradScaler' if use_scaler else ''}; model {cfg.model} @ {cfg.img_size}px")

    torch.manual_seed(cfg.seed)  # same initial weights on every rank and in a resumed run
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = create_model(cfg.model, cfg.in_chans, cfg.pretrained, cfg.weights, cfg.drop_rate).to(device, memory_format=fmt)
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model

    tr_ds, va_ds = make_dataset(images, tr, cfg, True), make_dataset(images, va, cfg, False)
    sampler = EpochSampler(len(tr_ds), True, cfg.seed, rank, world, positives=tr["any"].to_numpy() > 0, balanced=cfg.balanced)
    loader_kw = dict(num_workers=cfg.workers, pin_memory=device.type == "cuda", persistent_workers=False, collate_fn=collate)
    tr_dl = DataLoader(tr_ds, cfg.batch_size, sampler=sampler, drop_last=len(tr_ds) > cfg.batch_size * world, **loader_kw)
    va_dl = DataLoader(va_ds, cfg.batch_size * 2, sampler=EpochSampler(len(va_ds), False, rank=rank, world=world, pad=False),
                       **loader_kw)

    steps_per_epoch = min(len(tr_dl), cfg.max_steps_per_epoch or len(tr_dl))
    opt, sched = make_optimizer(model, cfg, cfg.epochs * math.ceil(steps_per_epoch / cfg.accum_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    start_epoch, best, best_epoch, history = 0, float("inf"), -1, []
    if cfg.resume and (run_dir / "last.pth").exists():
        start_epoch, best, best_epoch, history = restore(run_dir / "last.pth", model, opt, scaler, sched, device)
        if main_proc:
            log.info(f"resumed from {run_dir / 'last.pth'} after epoch {start_epoch} (best {best:.5f})")

    for epoch in range(start_epoch, cfg.epochs):
        if cfg.stop_after_epochs and epoch - start_epoch >= cfg.stop_after_epochs:
            log.info(f"stopping after {cfg.stop_after_epochs} epoch(s) as asked; continue with --resume")
            return run_dir
        t0, seen, loss_sum = time.time(), 0, 0.0
        net.train(), sampler.set_epoch(epoch), tr_ds.set_epoch(epoch)
        bar = tqdm(tr_dl, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not main_proc, mininterval=2.0)
        for step, (x, y, _) in enumerate(bar):
            if step >= steps_per_epoch:
                break
            x, y = x.to(device, non_blocking=True).contiguous(memory_format=fmt), y.to(device, non_blocking=True)
            with autocast(device, amp_dtype):
                loss = weighted_bce(net(x), y)
            scaler.scale(loss / cfg.accum_steps).backward()
            if (step + 1) % cfg.accum_steps == 0 or step + 1 == steps_per_epoch:
                if cfg.grad_clip:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scaler.step(opt), scaler.update(), opt.zero_grad(set_to_none=True), sched.step()
            seen, loss_sum = seen + len(x), loss_sum + loss.item() * len(x)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", img_s=f"{seen * world / (time.time() - t0):.0f}", refresh=False)
        train_secs = time.time() - t0
        probs, _ = evaluate(model, va_dl, device, amp_dtype, world, cfg, progress=main_proc)
        y_val = va[CLASSES].to_numpy()
        score = weighted_log_loss(y_val, probs)
        improved = score < best
        best, best_epoch = (score, epoch) if improved else (best, best_epoch)
        row = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "val_wll": score,
               **{f"val_ll_{c}": float(v) for c, v in zip(CLASSES, per_class_log_loss(y_val, probs))},
               "lr": sched.get_last_lr()[0], "train_images_per_s": seen * world / train_secs, "seconds": time.time() - t0}
        history.append(row)
        if main_proc:
            ck = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                  "scheduler": sched.state_dict(), "epoch": epoch + 1, "best_score": best, "best_epoch": best_epoch,
                  "history": history,
                  "config": dataclasses.asdict(cfg), "rng": {"torch": torch.get_rng_state(),
                  "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []}}
            save_checkpoint(ck, run_dir / "last.pth")
            if improved:
                save_checkpoint(ck, run_dir / "best.pth")
            write_csv(pd.DataFrame(history), run_dir / "epochs.csv", index=False, float_format="%.6g")
            log.info(f"epoch {epoch + 1}: train loss {row['train_loss']:.4f}, val wll {score:.4f}{' (best)' if improved else ''}, "
                     f"{row['train_images_per_s']:.0f} img/s, {row['seconds']:.0f}s")

    # out-of-fold predictions and embeddings from the best epoch's weights
    if main_proc:
        model.load_state_dict(load_checkpoint(run_dir / "best.pth")["model"])
    if world > 1:  # every rank needs rank 0's best weights for the sharded final pass
        for t in model.state_dict().values():
            dist.broadcast(t, 0)
    probs, emb = evaluate(model, va_dl, device, amp_dtype, world, cfg, progress=main_proc)
    if main_proc:
        oof = pd.DataFrame(probs, columns=CLASSES, index=va.index)
        oof.insert(0, "fold", cfg.fold)
        write_npy(emb, run_dir / "oof_emb.npy")
        write_csv(oof, run_dir / "oof.csv", float_format="%.6g")
        log.info(f"fold {cfg.fold} done: best epoch {best_epoch + 1}, OOF weighted log loss "
                 f"{weighted_log_loss(va[CLASSES].to_numpy(), probs):.5f} -> {run_dir / 'oof.csv'}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return run_dir


def main():
    cfg = config_from_args(TrainConfig, description=__doc__)
    train(cfg)


if __name__ == "__main__":
    cli_main(main)
