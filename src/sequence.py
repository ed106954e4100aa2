"""Stage 2: a bidirectional GRU over the slices of each series, on stage-1 embeddings and predictions.

    python -m src.sequence --stage1 outputs/demo/runs/resnet10t_128 --fold 0
    python -m src.sequence --stage1 outputs/demo/runs/resnet10t_128 --fold 0 --features logits --hidden 96

For each series, the slices' stage-1 embeddings (projected by a linear layer) and stage-1 logits,
ordered by z, go through a 2-layer bidirectional GRU; a per-slice head adds a correction to the
stage-1 logits (a residual: the model starts from stage 1 and learns what neighbours change).
Series of different lengths are padded and masked. Training reverses a series' order at random;
prediction averages the series and its reversal.

No leakage. Every stage-2 input of an image is a stage-1 output from a model that never trained on
that image: train and validation rows use the stage-1 OOF files (image in fold j <- stage-1 model of
fold j), stage-2 fold K trains on folds != K and is validated on fold K, and its test inputs are the
test embeddings of stage-1 fold K. `assemble` checks this from the files and refuses otherwise.

Outputs in OUT/runs/<run_name>/fold<K>/ (run_name defaults to seq_<stage-1 run name>): config.yaml,
epochs.csv, best.pth, oof.csv and test.csv in stage 1's format, so src.evaluate and src.ensemble
treat stage 2 as one more run.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from .config import config_from_args, save_yaml
from .evaluate import fold_dirs, run_config
from .folds import load_folds, run_folds_file
from .labels import read_labels
from .metrics import weighted_log_loss
from .model import load_checkpoint, save_checkpoint
from .prepare import load_cache
from .train import weighted_bce
from .utils import CLASSES, PipelineError, cli_main, get_logger, out_root, write_csv


@dataclass
class SeqConfig:
    stage1: str = ""                  # stage-1 run directory (fold*/oof.csv, oof_emb.npy, test.csv, test_emb.npy)
    fold: int = 0
    run_name: str = ""                # default seq_<stage-1 run name>, beside the stage-1 run
    features: str = "both"            # both: embeddings + stage-1 logits; emb; logits
    hidden: int = 64                  # projection width and GRU hidden size (per direction)
    layers: int = 2
    dropout: float = 0.2
    epochs: int = 40
    batch_size: int = 8               # series per step
    lr: float = 2e-3
    weight_decay: float = 1e-4
    reverse: float = 0.5              # probability of reversing a training series
    tta_reverse: bool = True          # average with the reversed series at prediction
    seed: int = 0

    def __post_init__(self):
        if self.features not in ("both", "emb", "logits"):
            raise PipelineError(f"features must be both, emb or logits, not {self.features!r}")


def logit(p):
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


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


def load_stage1_outputs(stage1: Path, which: str, fold: int | None = None) -> pd.DataFrame:
    """oof (all folds) or test (one fold) outputs: index ID; columns source_fold, six probabilities, emb (array)."""
    parts = []
    for d in fold_dirs(stage1):
        k = int(d.name.replace("fold", ""))
        if which == "test" and k != fold:
            continue
        csv, npy = (d / "oof.csv", d / "oof_emb.npy") if which == "oof" else (d / "test.csv", d / "test_emb.npy")
        if not csv.exists() or not npy.exists():
            raise PipelineError(f"{d}: missing {csv.name} or {npy.name}; finish stage 1 "
                                f"({'src.train' if which == 'oof' else 'src.predict'}) for fold {k} first")
        df = pd.read_csv(csv, dtype={"ID": str}).set_index("ID")
        emb = np.load(npy).astype(np.float32)
        if len(emb) != len(df):
            raise PipelineError(f"{npy}: {len(emb)} rows but {csv.name} has {len(df)}")
        df = df[CLASSES].assign(source_fold=k)
        df["emb"] = list(emb)
        parts.append(df)
    if not parts:
        raise PipelineError(f"{stage1}: no stage-1 {which} outputs{'' if fold is None else f' for fold {fold}'}")
    return pd.concat(parts)


def check_no_leak(rows: pd.DataFrame, folds: pd.Series, fold: int, split: str) -> None:
    """Every stage-1 output used by stage-2 fold `fold` must come from a model that never saw the image."""
    if split == "test":
        bad = rows.index[rows["source_fold"] != fold]
        if len(bad):
            raise PipelineError(f"leak: test inputs of stage-2 fold {fold} must come from stage-1 fold {fold}; "
                                f"{len(bad)} do not, e.g. {list(bad[:3])}")
        return
    image_fold = folds.reindex(rows.index)
    unknown = rows.index[image_fold.isna()]
    if len(unknown):
        raise PipelineError(f"{len(unknown)} stage-1 OOF image(s) are not in the folds file, e.g. {list(unknown[:3])}")
    bad = np.flatnonzero(rows["source_fold"].to_numpy() != image_fold.to_numpy())
    if len(bad):
        i = bad[0]
        raise PipelineError(f"leak: {len(bad)} stage-1 input(s) come from a model trained on that image "
                            f"(e.g. {rows.index[i]}: image in fold {int(image_fold.iloc[i])}, output of stage-1 fold "
                            f"{int(rows['source_fold'].iloc[i])}); stage-2 inputs must be out-of-fold")


def assemble(cfg: SeqConfig):
    """(train series, val series, test series, embedding dim); a series is (IDs in z order, emb, logits, labels)."""
    stage1 = Path(cfg.stage1)
    s1 = run_config(stage1)
    _, meta = load_cache(out_root(s1["data_dir"], s1.get("out_dir")) / "cache")
    meta = meta[meta.status == "ok"].set_index("ID")
    folds = load_folds(run_folds_file(s1["data_dir"], s1["k"], s1["fold_seed"], s1.get("folds_file")))["fold"]
    labels = read_labels(Path(s1["data_dir"]) / "stage_2_train.csv")

    oof = load_stage1_outputs(stage1, "oof")
    check_no_leak(oof, folds, cfg.fold, "oof")
    test = load_stage1_outputs(stage1, "test", cfg.fold)
    check_no_leak(test, folds, cfg.fold, "test")

    def series_of(rows: pd.DataFrame, with_labels: bool):
        rows = rows[rows.index.isin(meta.index)]
        m = meta.loc[rows.index, ["SeriesInstanceUID", "slice_index"]]
        out_series = []
        for _, g in m.sort_values(["SeriesInstanceUID", "slice_index"]).groupby("SeriesInstanceUID", sort=True):
            ids = g.index.to_numpy()
            r = rows.loc[ids]
            out_series.append((ids, np.stack(r["emb"].to_numpy()), logit(r[CLASSES].to_numpy()).astype(np.float32),
                               labels.loc[ids, CLASSES].to_numpy(np.float32) if with_labels else None))
        return out_series

    in_val = folds.reindex(oof.index).to_numpy() == cfg.fold
    tr, va = series_of(oof[~in_val], True), series_of(oof[in_val], True)
    te = series_of(test, False)
    return tr, va, te, oof["emb"].iloc[0].shape[0], test


def batchify(series, idx, reverse_flags=None):
    """Pad a list of series into (emb, logits, labels, mask, lengths) tensors."""
    chosen = [series[i] for i in idx]
    n, T = len(chosen), max(len(s[0]) for s in chosen)
    E, C = chosen[0][1].shape[1], len(CLASSES)
    emb, lg, y, mask = np.zeros((n, T, E), np.float32), np.zeros((n, T, C), np.float32), np.zeros((n, T, C), np.float32), np.zeros((n, T), bool)
    for j, (ids, e, l_, lab) in enumerate(chosen):
        L = len(ids)
        if reverse_flags is not None and reverse_flags[j]:
            e, l_, lab = e[::-1], l_[::-1], None if lab is None else lab[::-1]
        emb[j, :L], lg[j, :L], mask[j, :L] = e, l_, True
        if lab is not None:
            y[j, :L] = lab
    lengths = torch.as_tensor([len(s[0]) for s in chosen])
    return torch.from_numpy(emb), torch.from_numpy(lg), torch.from_numpy(y), torch.from_numpy(mask), lengths


@torch.no_grad()
def predict_series(model, series, tta_reverse=True, batch_size=32):
    """Per-slice probabilities for every series: list aligned with `series`."""
    model.eval()
    out = []
    for s in range(0, len(series), batch_size):
        idx = list(range(s, min(s + batch_size, len(series))))
        e, l_, _, mask, lengths = batchify(series, idx)
        p = torch.sigmoid(model(e, l_, lengths))
        if tta_reverse:
            e2, l2, _, _, _ = batchify(series, idx, reverse_flags=[True] * len(idx))
            p2 = torch.sigmoid(model(e2, l2, lengths))
            for j, L in enumerate(lengths.tolist()):  # undo the reversal of the valid part only
                p[j, :L] = (p[j, :L] + p2[j, :L].flip(0)) / 2
        out += [p[j, :L].numpy() for j, L in enumerate(lengths.tolist())]
    return out


def standardise(tr, va, te):
    """Scale embeddings with the training series' mean and std (stage-1 features have arbitrary scale)."""
    allv = np.concatenate([s[1] for s in tr])
    mu, sd = allv.mean(0), allv.std(0) + 1e-6
    fix = lambda ss: [(i, (e - mu) / sd, l_, y) for i, e, l_, y in ss]  # noqa: E731
    return fix(tr), fix(va), fix(te), (mu, sd)


def train_sequence(cfg: SeqConfig) -> Path:
    stage1 = Path(cfg.stage1)
    run_name = cfg.run_name or f"seq_{stage1.name}"
    run_dir = stage1.parent / run_name / f"fold{cfg.fold}"
    run_dir.mkdir(parents=True, exist_ok=True)
    log = get_logger(f"seq.{run_name}.{cfg.fold}", run_dir / "train.log")
    save_yaml(cfg, run_dir / "config.yaml")
    tr, va, te, emb_dim, test_rows = assemble(cfg)
    tr, va, te, (mu, sd) = standardise(tr, va, te)
    log.info(f"stage 2 fold {cfg.fold}: {len(tr)} train / {len(va)} val / {len(te)} test series from {stage1}")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = SeqModel(emb_dim, cfg.hidden, cfg.layers, cfg.dropout, cfg.features)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    y_val = np.concatenate([s[3] for s in va])
    best, history = float("inf"), []
    for epoch in range(cfg.epochs):
        t0, model_loss, n = time.time(), 0.0, 0
        model.train()
        order = rng.permutation(len(tr))
        for s in range(0, len(order), cfg.batch_size):
            idx = order[s:s + cfg.batch_size]
            e, l_, y, mask, lengths = batchify(tr, idx, reverse_flags=rng.random(len(idx)) < cfg.reverse)
            out = model(e, l_, lengths)
            loss = weighted_bce(out[mask], y[mask])
            opt.zero_grad(set_to_none=True), loss.backward(), opt.step()
            model_loss, n = model_loss + loss.item() * int(mask.sum()), n + int(mask.sum())
        sched.step()
        p_val = np.concatenate(predict_series(model, va, cfg.tta_reverse))
        score = weighted_log_loss(y_val, p_val)
        history.append({"epoch": epoch + 1, "train_loss": model_loss / n, "val_wll": score, "seconds": time.time() - t0})
        if score < best:
            best = score
            save_checkpoint({"model": model.state_dict(), "config": dataclasses.asdict(cfg), "emb_dim": emb_dim,
                             "emb_mean": torch.from_numpy(mu), "emb_std": torch.from_numpy(sd), "epoch": epoch + 1,
                             "best_score": best}, run_dir / "best.pth")
    write_csv(pd.DataFrame(history), run_dir / "epochs.csv", index=False, float_format="%.6g")
    stage1_val = weighted_log_loss(y_val, 1 / (1 + np.exp(-np.concatenate([s[2] for s in va]))))

    model.load_state_dict(load_checkpoint(run_dir / "best.pth")["model"])
    ids_val = np.concatenate([s[0] for s in va])
    oof = pd.DataFrame(np.concatenate(predict_series(model, va, cfg.tta_reverse)), columns=CLASSES, index=pd.Index(ids_val, name="ID"))
    oof.insert(0, "fold", cfg.fold)
    test = pd.DataFrame(np.concatenate(predict_series(model, te, cfg.tta_reverse)), columns=CLASSES,
                        index=pd.Index(np.concatenate([s[0] for s in te]), name="ID"))
    # test images outside any readable series keep their stage-1 prediction (the predict step's prior)
    rest = test_rows.index.difference(test.index)
    test = pd.concat([test, test_rows.loc[rest, CLASSES]])
    write_csv(test, run_dir / "test.csv", float_format="%.6g")
    write_csv(oof, run_dir / "oof.csv", float_format="%.6g")
    log.info(f"stage 2 fold {cfg.fold}: val weighted log loss {weighted_log_loss(y_val, oof[CLASSES].to_numpy()):.5f} "
             f"(stage 1 on the same slices: {stage1_val:.5f}) -> {run_dir / 'oof.csv'}")
    return run_dir


def main():
    cfg = config_from_args(SeqConfig, description=__doc__)
    if not cfg.stage1:
        raise PipelineError("--stage1 RUN_DIR is required (a stage-1 run with OOF and test outputs)")
    train_sequence(cfg)


if __name__ == "__main__":
    cli_main(main)
