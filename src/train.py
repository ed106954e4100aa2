"""Train one fold of a stage-1 slice classifier; write its out-of-fold predictions and embeddings.

    python -m src.train --fold 0 --data-dir input --model resnet18 --img-size 256 --epochs 5
    python -m src.train --fold 0 --config configs/seresnext50_256.yaml       # a model spec; run name from the file
    python -m src.train --fold 0 --config configs/resnet10t_128.yaml --resume  # continue a killed run
    torchrun --nproc_per_node=4 -m src.train --fold 0 ...                     # several GPUs (DistributedDataParallel)

Outputs in OUT/runs/<run_name>/fold<K>/ (see src/runs.py): fingerprint.json (the settings and inputs that
made the fold), config.yaml, preprocess.json (the cache's size and windows), train.log (starts with the
command line), epochs.csv, best.pth and last.pth (one dict each: model, optimizer, scaler, epoch, best
score, history, config, RNG states), oof_emb.npy and, last, oof.csv: the validation fold's predictions by the
best epoch's weights, with the run's test-time augmentation (the same as src.predict applies to the test set).

A fold already trained with the same settings is skipped; one trained with other settings stops the
command before anything is written, naming the differences (`--overwrite` redoes it). `--resume` continues
from last.pth only when it was made with the same settings, also on another number of GPUs.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader

from . import runs
from .config import TrainConfig, parse_config, result_settings, save_yaml
from .data import Augment, EpochSampler, SliceDataset, collate, neighbour_rows
from .engine import adamw, amp_settings, configure_backend, pick_device, predict_loader, train_one_epoch, warmup_cosine
from .metrics import WeightedBCE, per_class_log_loss, weighted_log_loss
from .model import create_model, load_checkpoint, previous, save_checkpoint
from .prepare import cache_fingerprint, cache_settings, load_cache
from .utils import CLASSES, PipelineError, cli_main, get_logger, write_csv, write_json, write_npy


def fold_stamp(cfg: TrainConfig, labels_sha: str) -> runs.Stamp:
    """What a fold's trained weights depend on: its settings (all but the TTA, which only changes the final
    OOF pass: oof.json records it), the cache's train part, the folds file, the labels (`labels_sha`, the
    label file's fingerprint from runs.labels) and a weights file."""
    folds_file = runs.run_folds_file(cfg.data_dir, cfg.k, cfg.fold_seed, cfg.folds_file)
    if not folds_file.exists():
        runs.load_folds(folds_file)  # the standard message
    inputs = {"cache": cache_fingerprint(runs.cache_dir(cfg.data_dir, cfg.out_dir), "train"),
              "folds": runs.file_fingerprint(folds_file), "labels": labels_sha}
    if cfg.weights:
        inputs["weights"] = runs.file_fingerprint(cfg.weights) if Path(cfg.weights).exists() else "missing"
    return runs.Stamp("train", {k: v for k, v in result_settings(cfg).items() if k != "tta"}, inputs)


def oof_tta(run_dir: Path) -> str | None:
    """The TTA the fold's OOF files were made with (None: no finished OOF pass)."""
    p = run_dir / runs.OOF_INFO
    return json.loads(p.read_text()).get("tta") if p.exists() and (run_dir / runs.OOF).exists() else None


def load_fold_data(cfg: TrainConfig, labels: pd.DataFrame):
    """Cache, labels and the fold split -> (images, train table, val table); tables hold ID, row, neighbours, labels."""
    images, meta = load_cache(runs.cache_dir(cfg.data_dir, cfg.out_dir))
    folds = runs.load_folds(runs.run_folds_file(cfg.data_dir, cfg.k, cfg.fold_seed, cfg.folds_file))
    if cfg.fold not in set(folds["fold"]):
        raise PipelineError(f"--fold {cfg.fold} is not in the folds file (folds {sorted(set(folds['fold']))})")
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


def make_optimizer(model, cfg: TrainConfig, device):
    """AdamW without weight decay on biases and norms."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return adamw([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                 cfg.lr, device)


def checkpoint(model, ema, opt, scaler, epoch, best, best_epoch, history, cfg, stamp, device) -> dict:
    """One dict: `model` is the weights the run predicts with (the average when EMA is on), `raw` the trained ones."""
    return {"model": (ema.module if ema else model).state_dict(), "raw": model.state_dict() if ema else None,
            "optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
            "best_score": best, "best_epoch": best_epoch, "history": history, "config": dataclasses.asdict(cfg),
            "stamp": stamp.id, "rng": {"torch": torch.get_rng_state(),
                                       "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []}}


def restore(path, model, ema, opt, scaler, stamp, device, log=None):
    """Load a last.pth (or, when it is corrupt, the one before it) into the live objects and RNG; returns
    (epochs done, best score, best epoch, history)."""
    try:
        ck = load_checkpoint(path)
    except PipelineError as e:
        if "corrupt" not in str(e) or not previous(path).exists():
            raise
        if log:
            log.info(f"{e}; resuming from the checkpoint before it, {previous(path).name}")
        ck = load_checkpoint(previous(path))
    if ck.get("stamp") != stamp.id:
        raise PipelineError(f"{path} was made with other settings than this run's; --overwrite starts the fold again")
    model.load_state_dict(ck["raw"] if ema else ck["model"])
    if ema:
        ema.module.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"]), scaler.load_state_dict(ck["scaler"])
    torch.set_rng_state(ck["rng"]["torch"])
    if device.type == "cuda":  # as many GPU generators as both runs have: resuming on another GPU count works
        for i, state in enumerate(ck["rng"].get("cuda", [])[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, i)
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


def validate(model, loader, device, amp_dtype, world, cfg, final=False, run_dir=None, rank=0):
    """Predictions of the whole validation set in dataset order, from every rank.

    Per epoch: probabilities only (a few MB, all-gathered). The final pass adds the run's TTA and the
    embeddings, which are large (~600 MB at full scale): each rank writes its shard to a file and rank 0
    joins them, instead of sending every rank everyone's embeddings."""
    idx, probs, emb = predict_loader(model, loader, device, amp_dtype, hflip_tta=final and cfg.tta == "hflip",
                                     channels_last=cfg.channels_last, progress=rank == 0,
                                     desc="OOF" if final else "validate", embeddings=final)
    if world == 1:
        return probs, emb
    if not final:
        parts = [None] * world
        dist.all_gather_object(parts, (idx, probs))
        idx, probs = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        return probs[np.argsort(idx, kind="stable")], None
    np.savez(run_dir / f".final_rank{rank}.npz", idx=idx, probs=probs, emb=emb)
    dist.barrier()
    if rank != 0:
        return None, None
    parts = [np.load(run_dir / f".final_rank{r}.npz") for r in range(world)]
    idx = np.concatenate([p["idx"] for p in parts])
    order = np.argsort(idx, kind="stable")
    probs, emb = np.concatenate([p["probs"] for p in parts])[order], np.concatenate([p["emb"] for p in parts])[order]
    for r in range(world):
        (run_dir / f".final_rank{r}.npz").unlink()
    return probs, emb


def train(cfg: TrainConfig) -> Path:
    rank, world, device = setup_distributed(cfg.device)
    try:
        return _train(cfg, rank, world, device)
    finally:  # every exit path of a distributed run, errors included, ends the process group
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, rank: int, world: int, device) -> Path:
    main_proc, run = rank == 0, runs.Run.of(cfg.data_dir, cfg.out_dir, cfg.run_name)
    run_dir = run.fold_dir(cfg.fold)
    # ---- before anything is written: same settings as what is there, or stop (or redo with --overwrite)
    labels, labels_sha = runs.labels(cfg.data_dir, cfg.out_dir)
    stamp = fold_stamp(cfg, labels_sha)
    trained_as_asked = (runs.Stamp.load(run_dir / runs.STAMP) or stamp).id == stamp.id and (run_dir / runs.LAST).exists()
    oof_was = oof_tta(run_dir)
    redo_oof = trained_as_asked and oof_was not in (None, cfg.tta)
    if world > 1:
        dist.barrier()  # every rank has read the files before rank 0 changes them
    if redo_oof:  # only the TTA changed: keep the training, redo the final OOF pass from last.pth (all epochs done)
        cfg = dataclasses.replace(cfg, resume=True)
        if main_proc:
            print(f"fold {cfg.fold}: redoing the OOF pass with tta {cfg.tta} (was {oof_was}); the training is kept")
            for f in (runs.OOF, runs.OOF_EMB, runs.OOF_INFO):
                (run_dir / f).unlink(missing_ok=True)
    skip = runs.guard(stamp, run_dir / runs.STAMP, not redo_oof and oof_was == cfg.tta, cfg.overwrite,
                      f"fold {cfg.fold} of run {cfg.run_name} ({run_dir})", clear=[run_dir],
                      exists=any((run_dir / f).exists() for f in (runs.LAST, runs.OOF, runs.STAMP)),
                      redo="add --overwrite to this command") if main_proc else False
    if world > 1:
        flag = [skip]
        dist.broadcast_object_list(flag, 0)
        skip = flag[0]
    if skip:
        if main_proc:
            runs.announce_skip(f"fold {cfg.fold} of {cfg.run_name} ({run_dir / runs.OOF})")
        return run_dir
    log = get_logger(f"train.{cfg.run_name}.{cfg.fold}", run_dir / runs.LOG if main_proc else None)
    if main_proc:
        run_dir.mkdir(parents=True, exist_ok=True)
        log.info("command: " + " ".join([Path(sys.executable).name, "-m", "src.train", *sys.argv[1:]]))
        stamp.save(run_dir / runs.STAMP)
        save_yaml(cfg, run_dir / runs.CONFIG)
        # the cache's size and windows: predict and the demo repeat exactly this preprocessing on new files
        write_json(cache_settings(runs.cache_dir(cfg.data_dir, cfg.out_dir)), run_dir / runs.PREPROCESS)
    images, tr, va = load_fold_data(cfg, labels)
    amp_dtype, use_scaler = amp_settings(device, cfg.amp)
    configure_backend(device)
    if main_proc:
        log.info(f"fold {cfg.fold}: {len(tr)} train / {len(va)} val slices; device {device} x{world}; "
                 f"amp {amp_dtype or 'off'}{' + GradScaler' if use_scaler else ''}; model {cfg.model} @ {cfg.img_size}px")

    # ---- model, data, optimisation
    torch.manual_seed(cfg.seed)  # same initial weights on every rank and in a resumed run
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = create_model(cfg.model, cfg.in_chans, cfg.pretrained, cfg.weights, cfg.drop_rate).to(device, memory_format=fmt)
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    tr_ds, va_ds = make_dataset(images, tr, cfg, True), make_dataset(images, va, cfg, False)
    sampler = EpochSampler(len(tr_ds), True, cfg.seed, rank, world, positives=tr["any"].to_numpy() > 0,
                           balanced=cfg.balanced, with_epoch=True)
    loader_kw = dict(num_workers=cfg.workers, pin_memory=device.type == "cuda", collate_fn=collate,
                     persistent_workers=cfg.workers > 0)
    tr_dl = DataLoader(tr_ds, cfg.batch_size, sampler=sampler, drop_last=len(tr_ds) > cfg.batch_size * world, **loader_kw)
    va_dl = DataLoader(va_ds, cfg.batch_size * 2, sampler=EpochSampler(len(va_ds), False, rank=rank, world=world, pad=False),
                       **loader_kw)
    steps = min(len(tr_dl), cfg.max_steps_per_epoch or len(tr_dl))
    opt, loss_fn = make_optimizer(model, cfg, device), WeightedBCE(device)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    ema = ModelEmaV3(model, decay=cfg.ema, use_warmup=True) if cfg.ema else None
    eval_model = ema.module if ema else model  # the weights that are validated, kept and used for the OOF pass
    start, best, best_epoch, history = 0, float("inf"), -1, []
    if cfg.resume and (run_dir / runs.LAST).exists():
        start, best, best_epoch, history = restore(run_dir / runs.LAST, model, ema, opt, scaler, stamp, device,
                                                   log if main_proc else None)
        if main_proc:
            log.info(f"resumed from {run_dir / runs.LAST} after epoch {start} (best {best:.5f})")
    y_val = va[CLASSES].to_numpy()

    # ---- epochs: train, validate, checkpoint (best.pth before last.pth: a kill between the two redoes the epoch)
    for epoch in range(start, cfg.epochs):
        if cfg.stop_after_epochs and epoch - start >= cfg.stop_after_epochs:
            if main_proc:
                log.info(f"stopping after {cfg.stop_after_epochs} epoch(s) as asked; continue with --resume")
            return run_dir
        sampler.set_epoch(epoch)  # the epoch travels with each index to the workers
        res = train_one_epoch(net, tr_dl, opt, scaler, loss_fn, device, amp_dtype, steps=steps,
                              accum_steps=cfg.accum_steps, grad_clip=cfg.grad_clip, channels_last=cfg.channels_last,
                              lr_at=lambda s, e=epoch: warmup_cosine((e * steps + s + 1) / (cfg.epochs * steps), cfg.warmup),
                              ema=ema, ema_step0=epoch * -(-steps // cfg.accum_steps),
                              log_every=cfg.log_every, progress=main_proc, desc=f"epoch {epoch + 1}/{cfg.epochs}")
        probs, _ = validate(eval_model, va_dl, device, amp_dtype, world, cfg, rank=rank)
        score = weighted_log_loss(y_val, probs)
        raw = {"val_wll_raw": weighted_log_loss(y_val, validate(model, va_dl, device, amp_dtype, world, cfg, rank=rank)[0])
               } if ema else {}
        improved = score < best
        best, best_epoch = (score, epoch) if improved else (best, best_epoch)
        history.append({"epoch": epoch + 1, "train_loss": res.loss, "val_wll": score,
                        **{f"val_ll_{c}": float(v) for c, v in zip(CLASSES, per_class_log_loss(y_val, probs))},
                        **raw, "lr": opt.param_groups[0]["lr"], "train_images_per_s": res.images_per_s * world,
                        "seconds": res.seconds})
        if main_proc:
            ck = checkpoint(model, ema, opt, scaler, epoch + 1, best, best_epoch, history, cfg, stamp, device)
            if improved:
                save_checkpoint(ck, run_dir / runs.BEST)
            save_checkpoint(ck, run_dir / runs.LAST, keep_previous=True)
            write_csv(pd.DataFrame(history), run_dir / runs.EPOCHS, index=False, float_format="%.6g")
            log.info(f"epoch {epoch + 1}: train loss {res.loss:.4f}, val wll {score:.4f}{' (best)' if improved else ''}"
                     + (f" (raw weights {raw['val_wll_raw']:.4f})" if raw else "") + ", "
                     f"{res.images_per_s * world:.0f} img/s, {res.seconds:.0f}s")

    # ---- out-of-fold predictions and embeddings of the best epoch's weights, with the run's TTA
    if main_proc:
        eval_model.load_state_dict(load_checkpoint(run_dir / runs.BEST)["model"])
    if world > 1:  # every rank needs rank 0's best weights for the sharded final pass
        for t in eval_model.state_dict().values():
            dist.broadcast(t, 0)
    probs, emb = validate(eval_model, va_dl, device, amp_dtype, world, cfg, final=True, run_dir=run_dir, rank=rank)
    if main_proc:
        oof = pd.DataFrame(probs, columns=CLASSES, index=va.index)
        oof.insert(0, "fold", cfg.fold)
        write_npy(emb, run_dir / runs.OOF_EMB)
        write_json({"tta": cfg.tta, "best_epoch": best_epoch + 1}, run_dir / runs.OOF_INFO)
        write_csv(oof, run_dir / runs.OOF, float_format="%.6g")  # last: its presence means the fold is finished
        log.info(f"fold {cfg.fold} done: best epoch {best_epoch + 1}, OOF weighted log loss "
                 f"{weighted_log_loss(y_val, probs):.5f} (tta {cfg.tta}) -> {run_dir / runs.OOF}")
    if world > 1:
        dist.barrier()
    return run_dir


def main():
    train(parse_config(TrainConfig, description=__doc__, prog="python -m src.train"))


if __name__ == "__main__":
    cli_main(main)
