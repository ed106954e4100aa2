"""Stage 2: a bidirectional GRU over the slices of each series, on stage-1 embeddings and predictions.

    python -m src.sequence --stage1 outputs/demo/runs/resnet10t_128 --fold 0
    python -m src.sequence --stage1 outputs/demo/runs/resnet10t_128 --fold 0 --features logits --hidden 96

For each series, the slices' stage-1 embeddings (projected by a linear layer) and stage-1 logits,
ordered by z, go through a 2-layer bidirectional GRU; a per-slice head adds a correction to the
stage-1 logits (a residual: the model starts from stage 1 and learns what neighbours change).
Series of different lengths are padded and masked. Training reverses a series' order at random;
prediction averages the series and its reversal. It runs on CUDA when there is a GPU (`--device`).

Speed: all slices of all series live in flat arrays (embeddings float16) on the device, once; a batch
of series is one gather through an index matrix, so an epoch costs no Python loop over series. Batches hold
up to 64 series, fewer on small data, where the number of optimizer steps matters more (`--min-steps`).
Early stopping: training ends when the validation loss has not improved for `--patience` epochs, and
the best epoch's weights make the outputs (the validation fold is the fold whose OOF rows these are,
as for stage 1's choice of best epoch).

Optimisation is the engine's (src/engine.py): its AdamW (fused on CUDA) and its cosine schedule
(`warmup_cosine`, no warmup), stepped once an epoch (the epoch's progress e / epochs, as a per-epoch
CosineAnnealingLR would). The loop over batches is this module's own, not `engine.train_one_epoch`: a GRU batch
is a gather of whole series with a padding mask and their lengths, not the image loader's (images, labels) batch,
and it needs none of that loop's mixed precision, gradient scaling, accumulation or DDP.

Inputs, leakage checks and the per-fold skeleton are src/stage2.py's, shared with the trees (src/boost.py).
Outputs in OUT/runs/seq_<stage-1 run>/fold<K>/: fingerprint.json, config.yaml, epochs.csv, train.log, best.pth
(src.checkpoint's GRU dict), test.csv and oof.csv in stage 1's format.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import checkpoint, layout
from .config import parse_config
from .engine import adamw, pick_device, scale_lr, warmup_cosine
from .metrics import WeightedBCE, weighted_log_loss
from .stage2 import FoldContext, FoldResult, SeriesSet, Stage1Inputs, logit, run_fold
from .utils import CLASSES, PipelineError, cli_main, write_csv


@dataclass
class SeqConfig:
    stage1: str = ""                  # stage-1 run folder (fold*/oof.csv, oof_emb.npy, test.csv, test_emb.npy)
    fold: int = 0                     # validation fold
    run_name: str = ""                # default seq_<stage-1 run name>, beside the stage-1 run
    features: str = "both"            # both: embeddings + stage-1 logits; emb; logits
    hidden: int = 64                  # projection width and GRU hidden size (per direction)
    layers: int = 2                   # GRU layers
    dropout: float = 0.2              # after the projection and between GRU layers
    epochs: int = 40                  # at most; early stopping usually ends sooner
    patience: int = 6                 # stop after this many epochs without a better validation loss
    batch_size: int = 64              # series per step, at most: fewer when the data has too few series
    min_steps: int = 8                # for this many optimizer steps per epoch (the demo data: batches of 4 series;
                                      # measured there: 64 series a step gave OOF 0.060, 4 gave 0.040)
    lr: float = 3e-3                  # AdamW learning rate, cosine-decayed over `epochs`
    weight_decay: float = 1e-4        # AdamW weight decay
    reverse: float = 0.5              # probability of reversing a training series
    tta_reverse: bool = True          # average with the reversed series at prediction
    seed: int = 0                     # model init and batch order
    device: str = "auto"              # auto (CUDA when available), cpu, cuda
    overwrite: bool = False           # redo a fold made with other settings or inputs (else: stop and say)

    def __post_init__(self):
        if self.features not in ("both", "emb", "logits"):
            raise PipelineError(f"features must be both, emb or logits, not {self.features!r}")


class SeqModel(nn.Module):
    def __init__(self, emb_dim: int, hidden=64, layers=2, dropout=0.2, features="both"):
        super().__init__()
        self.features = features
        use_emb, use_logits = features in ("both", "emb"), features in ("both", "logits")
        self.proj = nn.Sequential(nn.Linear(emb_dim, hidden), nn.ReLU(), nn.Dropout(dropout)) if use_emb else None
        in_dim = (hidden if use_emb else 0) + (len(CLASSES) if use_logits else 0)
        self.gru = nn.GRU(in_dim, hidden, num_layers=layers, batch_first=True, bidirectional=True,
                          dropout=dropout if layers > 1 else 0)
        self.head = nn.Linear(2 * hidden, len(CLASSES))
        nn.init.zeros_(self.head.weight), nn.init.zeros_(self.head.bias)  # start exactly at stage 1

    def forward(self, emb, logits, lengths):
        parts = []
        if self.proj is not None:
            parts.append(self.proj(emb))
        if self.features in ("both", "logits"):
            parts.append(logits)
        x = torch.cat(parts, -1)
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return logits + self.head(out)


class Batcher:
    """A SeriesSet's arrays on the device; a batch of series is one gather through a padded index matrix."""

    def __init__(self, s: SeriesSet, device, mu=None, sd=None):
        self.s, self.device = s, device
        # on the CPU these share the arrays' memory; on a GPU they are its one copy
        on = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
        self.emb, self.logits, self.labels = on(s.emb), on(s.logits), on(s.labels)
        self.mu = None if mu is None else torch.as_tensor(mu, dtype=torch.float32, device=device)
        self.sd = None if sd is None else torch.as_tensor(sd, dtype=torch.float32, device=device)

    def rows(self, series_idx, reverse=None) -> tuple[np.ndarray, np.ndarray]:
        """(B, T) flat row of each position (N for padding; reversed series read back to front), lengths."""
        L = self.s.lengths[series_idx]
        t = np.arange(L.max())[None, :]
        pos = np.where(reverse[:, None], L[:, None] - 1 - t, t) if reverse is not None else t
        return np.where(t < L[:, None], self.s.starts[series_idx][:, None] + pos, len(self.s.ids)), L

    def batch(self, series_idx, reverse=None):
        """(embeddings, logits, labels, mask, lengths, rows) of a batch; padded positions read row 0 and are
        masked (the GRU never sees them: the batch is packed by length)."""
        rows, L = self.rows(series_idx, reverse)
        r = torch.from_numpy(rows).to(self.device)
        mask = r < len(self.s.ids)
        r = r.clamp(max=max(len(self.s.ids) - 1, 0))
        emb = None
        if self.emb is not None:
            emb = self.emb[r].float()
            if self.mu is not None:
                emb = (emb - self.mu) / self.sd
        y = self.labels[r] if self.labels is not None else None
        return emb, self.logits[r], y, mask, torch.as_tensor(L), rows


@torch.no_grad()
def predict_series(model, batcher: Batcher, tta_reverse=True, batch_size=256) -> np.ndarray:
    """Per-slice probabilities (N, 6), rows in the SeriesSet's order; series batched by length."""
    model.eval()
    n = len(batcher.s.ids)
    out = torch.zeros(n + 1, len(CLASSES), device=batcher.device)
    order = np.argsort(batcher.s.lengths, kind="stable")
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        passes = [None, np.ones(len(idx), bool)] if tta_reverse else [None]
        for rev in passes:
            emb, lg, _, _, lengths, rows = batcher.batch(idx, rev)
            p = torch.sigmoid(model(emb, lg, lengths))
            out.index_add_(0, torch.from_numpy(rows.reshape(-1)).to(batcher.device), p.reshape(-1, p.shape[-1]) / len(passes))
    return out[:n].cpu().numpy()


def embedding_stats(emb: np.ndarray, chunk=65536) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std per feature, in float64 over chunks (no float32 copy of a multi-GB array)."""
    s = np.zeros(emb.shape[1]), np.zeros(emb.shape[1])
    for i in range(0, len(emb), chunk):
        x = np.asarray(emb[i:i + chunk], np.float64)
        s[0].__iadd__(x.sum(0)), s[1].__iadd__((x * x).sum(0))
    mu = s[0] / max(len(emb), 1)
    return mu.astype(np.float32), np.sqrt(np.maximum(s[1] / max(len(emb), 1) - mu * mu, 0) + 1e-12).astype(np.float32) + 1e-6


def fit(cfg: SeqConfig, inputs: Stage1Inputs, ctx: FoldContext) -> FoldResult:
    """Train the GRU of one fold (early-stopped on its validation fold), save its best weights, predict."""
    use_emb, device = cfg.features != "logits", pick_device(cfg.device)
    oof, folds = inputs.oof, inputs.folds
    in_val = (folds.reindex(oof.index) == cfg.fold).to_numpy()
    tr = SeriesSet.build(oof[~in_val], inputs.oof_emb, inputs.order, inputs.labels, rows=np.flatnonzero(~in_val))
    va = SeriesSet.build(oof[in_val], inputs.oof_emb, inputs.order, inputs.labels, rows=np.flatnonzero(in_val))
    te = SeriesSet.build(inputs.test, inputs.test_emb, inputs.order)
    mu, sd = embedding_stats(tr.emb) if use_emb else (None, None)
    btr, bva, bte = (Batcher(s, device, mu, sd) for s in (tr, va, te))
    batch = max(1, min(cfg.batch_size, len(tr) // cfg.min_steps))
    ctx.log.info(f"stage 2 fold {cfg.fold}: {len(tr)} train / {len(va)} val / {len(te)} test series from {cfg.stage1}; "
             f"device {device}; {batch} series a step")
    torch.manual_seed(cfg.seed)
    emb_dim = tr.emb.shape[1] if use_emb else 0
    model = SeqModel(max(emb_dim, 1), cfg.hidden, cfg.layers, cfg.dropout, cfg.features).to(device)
    best, best_state, history = train_epochs(cfg, model, btr, bva, va.labels, batch, device, ctx.log)
    model.load_state_dict(best_state)
    epoch = int(np.argmin([h["val_wll"] for h in history])) + 1
    checkpoint.save(checkpoint.gru(best_state, cfg, emb_dim, mu, sd, epoch, best, ctx.stamp), ctx.run_dir / layout.BEST)
    write_csv(pd.DataFrame(history), ctx.run_dir / layout.EPOCHS, index=False, float_format="%.6g")
    return FoldResult(va.ids, predict_series(model, bva, cfg.tta_reverse), va.labels, 1 / (1 + np.exp(-va.logits)),
                      te.ids, predict_series(model, bte, cfg.tta_reverse))


def train_epochs(cfg: SeqConfig, model, btr: Batcher, bva: Batcher, y_val, batch: int, device, log):
    """Epochs until the validation loss stops improving for `patience` epochs: (best loss, its weights, history)."""
    rng = np.random.default_rng(cfg.seed)
    opt = adamw([{"params": list(model.parameters()), "weight_decay": cfg.weight_decay}], cfg.lr, torch.device(device))
    loss_fn = WeightedBCE(device)
    best, best_state, bad, history = float("inf"), None, 0, []
    for epoch in range(cfg.epochs):
        t0, loss_sum, n = time.time(), torch.zeros((), device=device), 0
        scale_lr(opt, warmup_cosine(epoch / cfg.epochs, 0.0))
        model.train()
        perm = rng.permutation(len(btr.s))
        for b in range(0, len(perm), batch):
            idx = perm[b:b + batch]
            emb, lg, y, mask, lengths, _ = btr.batch(idx, rng.random(len(idx)) < cfg.reverse)
            loss = loss_fn(model(emb, lg, lengths), y, mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * int(lengths.sum())
            n += int(lengths.sum())
        score = weighted_log_loss(y_val, predict_series(model, bva, cfg.tta_reverse))
        history.append({"epoch": epoch + 1, "train_loss": loss_sum.item() / max(n, 1), "val_wll": score,
                        "seconds": time.time() - t0})
        if score < best - 1e-6:
            best, best_state, bad = score, copy.deepcopy(model.state_dict()), 0
        else:
            bad += 1
            if bad >= cfg.patience:
                log.info(f"early stop after epoch {epoch + 1}: no improvement for {cfg.patience} epochs")
                break
    log.info(f"best validation loss {best:.5f} after {len(history)} epochs")
    return best, best_state, history


def train_sequence(cfg: SeqConfig) -> Path:
    return run_fold("seq", cfg, fit, with_emb=cfg.features != "logits", step="sequence")


@dataclass
class SeqFold:
    """One trained stage-2 fold, for prediction on new series (the demo, the Predictor)."""
    name: str
    model: SeqModel
    mu: np.ndarray | None
    sd: np.ndarray | None
    config: dict
    device: torch.device

    @classmethod
    def load(cls, fold_dir, device=torch.device("cpu")) -> SeqFold:
        return cls.from_checkpoint(Path(fold_dir).name, checkpoint.load(Path(fold_dir) / layout.BEST), device)

    @classmethod
    def from_checkpoint(cls, name: str, ck: dict, device=torch.device("cpu")) -> SeqFold:
        """A GRU fold from src.checkpoint's dict (a best.pth, or the same tensors read from a bundle)."""
        c = ck["config"]
        m = SeqModel(max(ck["emb_dim"], 1), c["hidden"], c["layers"], c["dropout"], c["features"])
        m.load_state_dict(ck["model"])
        as_np = lambda t: None if t is None else t.numpy()  # noqa: E731
        return cls(name, m.to(device).eval(), as_np(ck["emb_mean"]), as_np(ck["emb_std"]), c, device)

    def predict(self, series: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        """series: [(stage-1 embeddings (L, E), stage-1 probabilities (L, 6)) in z order] -> [(L, 6)]."""
        lengths = np.array([len(p) for _, p in series])
        starts = np.r_[0, np.cumsum(lengths)[:-1]]
        use_emb = self.config["features"] != "logits"
        s = SeriesSet(np.arange(lengths.sum()), np.concatenate([e for e, _ in series]).astype(np.float16) if use_emb else None,
                      logit(np.concatenate([p for _, p in series])).astype(np.float32), None, starts, lengths)
        p = predict_series(self.model, Batcher(s, self.device, self.mu, self.sd), self.config.get("tta_reverse", True))
        return [p[a:a + n] for a, n in zip(starts, lengths)]


def main():
    train_sequence(parse_config(SeqConfig, description=__doc__, prog="python -m src.sequence"))


if __name__ == "__main__":
    cli_main(main)
