"""Train one fold of a stage-1 slice classifier; write its out-of-fold predictions and embeddings.

    python -m src.train --fold 0 --data-dir input --model resnet18 --img-size 256 --epochs 5
    python -m src.train --fold 0 --config configs/seresnext50_256.yaml       # a model spec; run name from the file
    python -m src.train --fold 0 --config configs/resnet10t_128.yaml --resume  # continue a killed run
    python -m src.train --fold 0 --config configs/resnet10t_128.yaml --weights model.ichbundle  # fine-tune a bundle
    torchrun --nproc_per_node=4 -m src.train --fold 0 ...                     # several GPUs (DistributedDataParallel)

Outputs in OUT/runs/<run_name>/fold<K>/ (see src/layout.py): fingerprint.json (the settings and inputs that
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

# torch, timm and the modules built on them are imported where they are used, not here: `python -m src.train` on a
# fold that is already finished then says so in about a second instead of the ~7 s those imports cost on 2 cores
from . import checkpoint, layout
from .bundle import looks_like_bundle, stage1_weights
from .config import TrainConfig, parse_config, result_settings, save_yaml
from .labels import cached_labels
from .metrics import WeightedBCE, per_class_log_loss, weighted_log_loss
from .cache import cache_fingerprint, cache_settings, load_cache
from .runs import Run, load_folds
from .stamps import Stamp, announce_skip, file_fingerprint, guard
from .utils import CLASSES, PipelineError, cli_main, get_logger, write_csv, write_json, write_npy


def fold_stamp(cfg: TrainConfig, labels_sha: str) -> Stamp:
    """What a fold's trained weights depend on: its settings (all but the TTA, which only changes the final
    OOF pass: oof.json records it), the cache's train part, the folds file, the labels (`labels_sha`, the
    label file's fingerprint from labels.cached_labels) and a weights file."""
    folds_file = layout.run_folds_file(cfg.data_dir, cfg.k, cfg.fold_seed, cfg.folds_file)
    if not folds_file.exists():
        load_folds(folds_file)  # the standard message
    inputs = {"cache": cache_fingerprint(layout.cache_dir(cfg.data_dir, cfg.out_dir), "train"),
              "folds": file_fingerprint(folds_file), "labels": labels_sha}
    if cfg.weights:
        inputs["weights"] = file_fingerprint(cfg.weights) if Path(cfg.weights).exists() else "missing"
    return Stamp("train", {k: v for k, v in result_settings(cfg).items() if k != "tta"}, inputs)


def oof_tta(run_dir: Path) -> str | None:
    """The TTA the fold's OOF files were made with (None: no finished OOF pass)."""
    p = run_dir / layout.OOF_INFO
    return json.loads(p.read_text()).get("tta") if p.exists() and (run_dir / layout.OOF).exists() else None


def load_fold_data(cfg: TrainConfig, labels: pd.DataFrame):
    """Cache, labels and the fold split -> (images, train table, val table); tables hold ID, row, neighbours, labels."""
    from .data import neighbour_rows
    images, meta = load_cache(layout.cache_dir(cfg.data_dir, cfg.out_dir))
    folds = load_folds(layout.run_folds_file(cfg.data_dir, cfg.k, cfg.fold_seed, cfg.folds_file))
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


def make_dataset(images, table, cfg: TrainConfig, train: bool):
    from .data import Augment, SliceDataset
    aug = Augment(cfg.hflip, cfg.vflip, cfg.affine, cfg.max_shift, cfg.max_scale, cfg.max_rotate) if train else None
    return SliceDataset(images, table["row"], table[CLASSES].to_numpy(), table["prev_row"], table["next_row"],
                        cfg.input_mode, cfg.img_size, aug, cfg.crop_border, cfg.seed)


def make_model(cfg: TrainConfig):
    """The network a fold starts from: random, ImageNet or a weights file's backbone, or a bundle's fold (fine-tuning
    a published model: the whole network, head included)."""
    from .model import create_model
    if cfg.weights and looks_like_bundle(cfg.weights):
        fold = f"fold{cfg.fold if cfg.weights_fold < 0 else cfg.weights_fold}"
        model = create_model(cfg.model, cfg.in_chans, drop_rate=cfg.drop_rate)
        model.load_state_dict(stage1_weights(cfg.weights, fold, cfg.model, cfg.in_chans))
        return model
    return create_model(cfg.model, cfg.in_chans, cfg.pretrained, cfg.weights, cfg.drop_rate)


def make_optimizer(model, cfg: TrainConfig, device):
    """AdamW without weight decay on biases and norms."""
    from .engine import adamw
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return adamw([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                 cfg.lr, device)


def setup_distributed(device_name: str):
    """(rank, world size, device); initialises the process group when launched by torchrun."""
    import torch
    import torch.distributed as dist
    
    from .engine import pick_device
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
    import torch.distributed as dist
    
    from .engine import predict_loader
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
    import torch.distributed as dist
    rank, world, device = setup_distributed(cfg.device)
    try:
        return _train(cfg, rank, world, device)
    finally:  # every exit path of a distributed run, errors included, ends the process group
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class Fold:
    """One invocation's fold: its settings, where it runs, where it writes, and what it records."""
    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    run_dir: Path
    stamp: Stamp
    labels: pd.DataFrame
    log: object = None

    @property
    def is_rank0(self) -> bool:
        """Rank 0 (the only process of a one-process run) writes the fold's files and logs."""
        return self.rank == 0

    def sync(self, value):
        """Rank 0's value on every rank (a no-op on one process)."""
        import torch.distributed as dist
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, 0)
        return box[0]


def _train(cfg: TrainConfig, rank: int, world: int, device) -> Path:
    fold = plan_fold(cfg, rank, world, device)
    if fold is None:
        return Run.of(cfg.data_dir, cfg.out_dir, cfg.run_name).fold_dir(cfg.fold)
    start_fold(fold)
    images, tr, va = load_fold_data(fold.cfg, fold.labels)
    parts = build(fold, images, tr, va)
    y_val = va[CLASSES].to_numpy()
    if not fit(fold, parts, y_val):
        return fold.run_dir  # stopped after --stop-after-epochs; --resume continues
    write_oof(fold, parts, va, y_val)
    return fold.run_dir


def plan_fold(cfg: TrainConfig, rank: int, world: int, device) -> Fold | None:
    """Before anything is written: same settings as what is there, or stop (or redo with --overwrite). None: the
    fold is finished with these settings (skip). Only the TTA changed: the training is kept and the final OOF pass
    is redone from last.pth."""
    import torch.distributed as dist
    
    from .model import pretrained_file
    run_dir = Run.of(cfg.data_dir, cfg.out_dir, cfg.run_name).fold_dir(cfg.fold)
    if cfg.pretrained and not cfg.weights:  # offline without cached ImageNet weights: stop before anything is written
        pretrained_file(cfg.model)
    elif cfg.weights and not Path(cfg.weights).is_file():
        raise PipelineError(f"weights file not found: {cfg.weights}")
    elif cfg.weights and looks_like_bundle(cfg.weights):  # a bundle that cannot give this fold: stop before writing
        stage1_weights(cfg.weights, f"fold{cfg.fold if cfg.weights_fold < 0 else cfg.weights_fold}", cfg.model, cfg.in_chans)
    labels, labels_sha = cached_labels(cfg.data_dir, cfg.out_dir)
    stamp = fold_stamp(cfg, labels_sha)
    now = progress(cfg, stamp)
    fold = Fold(cfg, rank, world, device, run_dir, stamp, labels)
    if world > 1:
        dist.barrier()  # every rank has read the files before rank 0 changes them
    if now.redo_oof:
        fold.cfg = dataclasses.replace(cfg, resume=True)
        if fold.is_rank0:
            print(f"fold {cfg.fold}: redoing the OOF pass with tta {cfg.tta} (was {now.oof_tta}); the training is kept")
            for f in (layout.OOF, layout.OOF_EMB, layout.OOF_INFO):
                (run_dir / f).unlink(missing_ok=True)
    skip = guard(stamp, run_dir / layout.STAMP, now.finished, cfg.overwrite,
                 f"fold {cfg.fold} of run {cfg.run_name} ({run_dir})", clear=[run_dir],
                 exists=any((run_dir / f).exists() for f in (layout.LAST, layout.OOF, layout.STAMP))) if fold.is_rank0 else False
    if fold.sync(skip):
        return None
    return fold


@dataclass(frozen=True)
class Progress:
    """Where a fold's folder stands against the settings asked for: the one judge of whether a fold is finished
    (for `main`'s check before torch is imported, and for plan_fold)."""
    same_settings: bool               # its fingerprint.json is the one these settings make
    trained: bool                     # ... and its last.pth exists: the training is done, or can be resumed
    oof_tta: str | None               # the TTA of its finished OOF pass (None: no finished OOF pass)
    tta: str                          # the TTA asked for

    @property
    def finished(self) -> bool:
        """Nothing to do: trained with these settings, and its OOF pass made with this TTA."""
        return self.same_settings and self.oof_tta == self.tta

    @property
    def redo_oof(self) -> bool:
        """Only the TTA changed: keep the training, redo the final OOF pass from last.pth."""
        return self.trained and self.oof_tta not in (None, self.tta)


def progress(cfg: TrainConfig, stamp: Stamp | None = None) -> Progress:
    """The fold's Progress; `stamp` (fold_stamp's) is computed when not given and there is one to compare with (a
    fold not started asks for no input: plan_fold's checks, the ImageNet weights first, speak before the folds file)."""
    run_dir = Run.of(cfg.data_dir, cfg.out_dir, cfg.run_name).fold_dir(cfg.fold)
    old = Stamp.load(run_dir / layout.STAMP)
    if old is not None:
        stamp = stamp or fold_stamp(cfg, cached_labels(cfg.data_dir, cfg.out_dir)[1])
    same = old is not None and old.id == stamp.id
    return Progress(same, same and (run_dir / layout.LAST).exists(), oof_tta(run_dir), cfg.tta)


def start_fold(fold: Fold) -> None:
    """The fold's folder: its log (starting with the command line), stamp, resolved config and preprocessing."""
    cfg = fold.cfg
    fold.log = get_logger(f"train.{cfg.run_name}.{cfg.fold}", fold.run_dir / layout.LOG if fold.is_rank0 else None)
    if fold.is_rank0:
        fold.run_dir.mkdir(parents=True, exist_ok=True)
        fold.log.info("command: " + " ".join([Path(sys.executable).name, "-m", "src.train", *sys.argv[1:]]))
        fold.stamp.save(fold.run_dir / layout.STAMP)
        save_yaml(cfg, fold.run_dir / layout.CONFIG)
        # the cache's size and windows: predict and the demo repeat exactly this preprocessing on new files
        write_json(cache_settings(layout.cache_dir(cfg.data_dir, cfg.out_dir)), fold.run_dir / layout.PREPROCESS)


@dataclass
class Parts:
    """What the epochs work with: one name per role of the network."""
    trained: torch.nn.Module          # the network the optimiser trains (its raw weights)
    parallel: torch.nn.Module         # `trained` as the training step runs it: in DistributedDataParallel on several
                                      # processes, `trained` itself on one
    ema: ModelEmaV3 | None            # the weight average's updater (None: no EMA)
    kept: torch.nn.Module             # the weights validated, kept in best.pth and used for the OOF pass: the
                                      # EMA's average under EMA, else `trained`
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loss_fn: WeightedBCE
    sampler: EpochSampler
    tr_dl: DataLoader
    va_dl: DataLoader
    steps: int                        # batches per epoch
    amp_dtype: torch.dtype | None


def build(fold: Fold, images, tr: pd.DataFrame, va: pd.DataFrame) -> Parts:
    """Model, data and optimisation of a fold."""
    import torch
    from timm.utils import ModelEmaV3
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader
    
    from .data import EpochSampler, collate
    from .engine import amp_settings, configure_backend, infer_batch_size
    cfg, device, rank, world = fold.cfg, fold.device, fold.rank, fold.world
    amp_dtype, use_scaler = amp_settings(device, cfg.amp)
    configure_backend(device)
    if fold.is_rank0:
        fold.log.info(f"fold {cfg.fold}: {len(tr)} train / {len(va)} val slices; device {device} x{world}; amp "
                      f"{amp_dtype or 'off'}{' + GradScaler' if use_scaler else ''}; model {cfg.model} @ {cfg.img_size}px")
    torch.manual_seed(cfg.seed)  # same initial weights on every rank and in a resumed run
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    trained = make_model(cfg).to(device, memory_format=fmt)
    parallel = DistributedDataParallel(trained, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else trained
    tr_ds, va_ds = make_dataset(images, tr, cfg, True), make_dataset(images, va, cfg, False)
    sampler = EpochSampler(len(tr_ds), True, cfg.seed, rank, world, positives=tr["any"].to_numpy() > 0,
                           balanced=cfg.balanced, with_epoch=True)
    loader_kw = dict(num_workers=cfg.workers, pin_memory=device.type == "cuda", collate_fn=collate,
                     persistent_workers=cfg.workers > 0)
    tr_dl = DataLoader(tr_ds, cfg.batch_size, sampler=sampler, drop_last=len(tr_ds) > cfg.batch_size * world, **loader_kw)
    va_dl = DataLoader(va_ds, cfg.val_batch_size or infer_batch_size(device),
                       sampler=EpochSampler(len(va_ds), False, rank=rank, world=world, pad=False), **loader_kw)
    ema = ModelEmaV3(trained, decay=cfg.ema, use_warmup=True) if cfg.ema else None
    return Parts(trained, parallel, ema, ema.module if ema else trained, make_optimizer(trained, cfg, device),
                 torch.amp.GradScaler(device.type, enabled=use_scaler), WeightedBCE(device), sampler, tr_dl, va_dl,
                 min(len(tr_dl), cfg.max_steps_per_epoch or len(tr_dl)), amp_dtype)


def fit(fold: Fold, m: Parts, y_val: np.ndarray) -> bool:
    """The epochs: train, validate (`kept`; under EMA the raw weights too, once after the last epoch or, with
    --validate-raw, every epoch), checkpoint (best.pth before last.pth: a kill between the two redoes the epoch).
    False when stopped early by --stop-after-epochs."""
    cfg, device, world, last = fold.cfg, fold.device, fold.world, fold.run_dir / layout.LAST
    start, best, best_epoch, history = 0, float("inf"), -1, []
    if cfg.resume and last.exists():
        start, best, best_epoch, history = checkpoint.restore(last, m.trained, m.ema, m.opt, m.scaler, fold.stamp,
                                                              device, fold.log if fold.is_rank0 else None)
        if fold.is_rank0:
            fold.log.info(f"resumed from {last} after epoch {start} (best {best:.5f})")
    tb = Curves(fold.run_dir / layout.TENSORBOARD if fold.is_rank0 and cfg.tensorboard else None)
    for epoch in range(start, cfg.epochs):
        if cfg.stop_after_epochs and epoch - start >= cfg.stop_after_epochs:
            if fold.is_rank0:
                fold.log.info(f"stopping after {cfg.stop_after_epochs} epoch(s) as asked; continue with --resume")
            tb.close()
            return False
        res = train_epoch(fold, m, epoch, on_log=tb.step_logger(epoch * m.steps))
        row = {"epoch": epoch + 1, "train_loss": res.loss, **score_epoch(fold, m, y_val, epoch + 1 == cfg.epochs),
               "lr": m.opt.param_groups[0]["lr"], "train_images_per_s": res.images_per_s * world, "seconds": res.seconds}
        improved = row["val_wll"] < best
        best, best_epoch = (row["val_wll"], epoch) if improved else (best, best_epoch)
        history.append(row)
        tb.epoch(epoch + 1, row, (epoch + 1) * m.steps)
        if fold.is_rank0:
            ck = checkpoint.stage1(m.trained, m.ema, m.opt, m.scaler, epoch + 1, best, best_epoch, history, cfg,
                                   fold.stamp, device)
            if improved:
                checkpoint.save(ck, fold.run_dir / layout.BEST)
            checkpoint.save(ck, last, keep_previous=True)
            write_csv(pd.DataFrame(history), fold.run_dir / layout.EPOCHS, index=False, float_format="%.6g")
            fold.log.info(f"epoch {epoch + 1}: train loss {res.loss:.4f}, val wll {row['val_wll']:.4f}"
                          f"{' (best)' if improved else ''}" + (f" (raw weights {row['val_wll_raw']:.4f})"
                                                                  if "val_wll_raw" in row else "") + ", "
                          f"{res.images_per_s * world:.0f} img/s, {res.seconds:.0f}s")
    tb.close()
    return True


def train_epoch(fold: Fold, m: Parts, epoch: int, batches=None, on_log=None):
    """One epoch of training as `fit` runs it: `train_one_epoch` with clipping, EMA and the lr schedule, a function
    of training progress (so a fold resumed on another number of GPUs continues on the same curve). `batches`
    (default: the training loader, for this epoch) is where bench/train_step.py feeds its own."""
    from .engine import train_one_epoch, warmup_cosine
    cfg, steps = fold.cfg, m.steps
    if batches is None:
        m.sampler.set_epoch(epoch)  # the epoch travels with each index to the workers
    return train_one_epoch(m.parallel, m.tr_dl if batches is None else batches, m.opt, m.scaler, m.loss_fn, fold.device,
                           m.amp_dtype, steps=steps, accum_steps=cfg.accum_steps, grad_clip=cfg.grad_clip,
                           channels_last=cfg.channels_last,
                           lr_at=lambda s: warmup_cosine((epoch * steps + s + 1) / (cfg.epochs * steps), cfg.warmup),
                           ema=m.ema, ema_step0=epoch * -(-steps // cfg.accum_steps), log_every=cfg.log_every,
                           progress=fold.is_rank0 and batches is None, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                           on_log=on_log)


def score_epoch(fold: Fold, m: Parts, y_val: np.ndarray, last_epoch: bool) -> dict:
    """An epoch's validation figures of `kept`; under EMA also of the raw weights (`val_wll_raw`), after the last
    epoch only unless --validate-raw: a second pass over the validation fold for a figure that matters at the end."""
    cfg, run = fold.cfg, (fold.device, m.amp_dtype, fold.world, fold.cfg)
    probs, _ = validate(m.kept, m.va_dl, *run, rank=fold.rank)
    row = {"val_wll": weighted_log_loss(y_val, probs),
           **{f"val_ll_{c}": float(v) for c, v in zip(CLASSES, per_class_log_loss(y_val, probs))}}
    if m.ema is not None and (cfg.validate_raw or last_epoch):
        row["val_wll_raw"] = weighted_log_loss(y_val, validate(m.trained, m.va_dl, *run, rank=fold.rank)[0])
    return row


class Curves:
    """TensorBoard event files of a fold (off: `folder` None): per logged step the training loss and the learning
    rate, per epoch the validation figures of the weights the run keeps and, under EMA, of the raw ones."""

    def __init__(self, folder):
        self.w = None
        if folder is not None:
            from torch.utils.tensorboard import SummaryWriter  # here: the writer's import costs a second
            self.w = SummaryWriter(str(folder))

    def step_logger(self, step0: int):
        if self.w is None:
            return None
        return lambda step, loss, lr: (self.w.add_scalar("train/loss", loss, step0 + step + 1),
                                       self.w.add_scalar("train/lr", lr, step0 + step + 1))

    def epoch(self, epoch: int, row: dict, step: int) -> None:
        if self.w is None:
            return
        for k, v in row.items():
            if k.startswith("val_"):
                self.w.add_scalar(f"val/{k[4:]}", v, epoch)
        self.w.add_scalar("train/epoch_loss", row["train_loss"], epoch)
        self.w.add_scalar("train/images_per_s", row["train_images_per_s"], epoch)
        self.w.flush()

    def close(self) -> None:
        if self.w is not None:
            self.w.close()


def write_oof(fold: Fold, m: Parts, va: pd.DataFrame, y_val: np.ndarray) -> None:
    """Out-of-fold predictions and embeddings of the best epoch's weights, with the run's TTA; oof.csv last."""
    import torch.distributed as dist
    cfg, run_dir = fold.cfg, fold.run_dir
    if fold.is_rank0:
        m.kept.load_state_dict(checkpoint.load(run_dir / layout.BEST)["model"])
    if fold.world > 1:  # every rank needs rank 0's best weights for the sharded final pass
        for t in m.kept.state_dict().values():
            dist.broadcast(t, 0)
    probs, emb = validate(m.kept, m.va_dl, fold.device, m.amp_dtype, fold.world, cfg, final=True, run_dir=run_dir,
                          rank=fold.rank)
    if fold.is_rank0:
        oof = pd.DataFrame(probs, columns=CLASSES, index=va.index)
        oof.insert(0, "fold", cfg.fold)
        write_npy(emb, run_dir / layout.OOF_EMB)
        best_epoch = checkpoint.load(run_dir / layout.BEST)["best_epoch"]
        write_json({"tta": cfg.tta, "best_epoch": best_epoch + 1}, run_dir / layout.OOF_INFO)
        write_csv(oof, run_dir / layout.OOF, float_format="%.6g")  # last: its presence means the fold is finished
        fold.log.info(f"fold {cfg.fold} done: best epoch {best_epoch + 1}, OOF weighted log loss "
                      f"{weighted_log_loss(y_val, probs):.5f} (tta {cfg.tta}) -> {run_dir / layout.OOF}")
    if fold.world > 1:
        dist.barrier()


def main():
    cfg = parse_config(TrainConfig, description=__doc__, prog="python -m src.train")
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 and progress(cfg).finished:  # decided before torch is imported
        announce_skip(f"fold {cfg.fold} of {cfg.run_name}")
        return
    train(cfg)


if __name__ == "__main__":
    cli_main(main)
