"""A trained run as one object: load it, predict head CT series, see where it looks.

    from src.predictor import Predictor
    p = Predictor.load("outputs/demo/runs/resnet10t_128")   # every finished fold, and the run's stage 2
    df = p.predict(["/path/to/series/"])                     # files and/or folders of DICOMs
    df.groupby("series")["any"].max()                        # one row per readable slice, in z order
    p.card                                                   # what the run was trained on, and how well it did

`predict` reads any head CT DICOMs (uncompressed or JPEG Lossless / JPEG 2000 / RLE, any file order,
several series) with exactly the run's preprocessing (its cache size and windows, input mode, 2.5D
neighbours, test-time augmentation), averages the stage-1 fold models, and applies the run's stage-2 models
(the GRU, seq_<run>, and the boosted trees, boost_<run>) by their own code: each stage-2 fold reads its own
stage-1 fold's outputs, as it did on the test set. Stage 1 and the stage-2 models are combined with the
blend weights the run's report fitted on their out-of-fold predictions (`card["blend_weights"]`); without a
report, the stage-2 models present are averaged. `analyse` returns the decoded images and skipped files too, and `grad_cam` the
heat maps of the stage-1 models. src.predict (the test set), the demo's command line and its page all use
this class.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from . import runs
from .data import EpochSampler, SliceDataset, collate, neighbour_rows
from .engine import amp_settings, configure_backend, pick_device, predict_loader
from .model import Net, model_from_checkpoint
from .prepare import decode_files, windows_from_settings
from .boost import BoostFold
from .sequence import SeqFold
from .utils import CLASSES, PipelineError


@dataclass
class FoldModel:
    """One stage-1 fold's best weights with the config it was trained with."""
    name: str                         # fold<K>
    model: Net
    config: dict


@dataclass
class FoldOutput:
    """A stage-1 fold's predictions for the readable rows of a metadata table."""
    ids: np.ndarray                   # image IDs, metadata order
    probs: np.ndarray                 # (n, 6)
    emb: np.ndarray                   # (n, F) float16


@dataclass
class Analysis:
    """What `Predictor.analyse` found in a set of files."""
    table: pd.DataFrame               # one row per readable slice: ID, file, series, slice (1-based, z order), z, six classes
    skipped: pd.DataFrame             # path, reason of every file that gave no slice
    images: np.ndarray                # (n files, S, S, 3) uint8 decoded with the run's preprocessing
    meta: pd.DataFrame                # the decoder's metadata (rows of `images`)


def list_inputs(inputs) -> list[Path]:
    """Files, and every file under folders (hidden ones excluded)."""
    files = []
    for p in map(Path, [inputs] if isinstance(inputs, (str, Path)) else inputs):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        elif p.is_file():
            files.append(p)
        else:
            raise PipelineError(f"not a file or folder: {p}")
    if not files:
        raise PipelineError("no files given")
    return files


def slice_dataset(cfg: dict, images, meta: pd.DataFrame) -> SliceDataset:
    """The run's own input pipeline (input mode, size, crop) over the metadata's readable rows, without augmentation."""
    prev, nxt = neighbour_rows(meta)
    ok = (meta["status"] == "ok").to_numpy()
    return SliceDataset(images, meta["row"].to_numpy()[ok], prev_rows=prev[ok], next_rows=nxt[ok], mode=cfg["input_mode"],
                        size=cfg["img_size"], crop=cfg.get("crop_border", False))


def grad_cam(model: Net, x: torch.Tensor, class_idx: int) -> np.ndarray:
    """Grad-CAM on the backbone's last feature map: (N, H, W) maps in [0, 1] at the input size."""
    model.eval()
    with torch.enable_grad():
        fmap = model.backbone.forward_features(model.normalise(x))
        if fmap.requires_grad:
            fmap.retain_grad()
        else:  # frozen backbone: make the map itself the leaf we differentiate against
            fmap = fmap.detach().requires_grad_(True)
        logits = model.head(model.backbone.forward_head(fmap, pre_logits=True))
        logits[:, class_idx].sum().backward()
    weights = fmap.grad.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * fmap).sum(1)).detach().float().cpu().numpy()
    model.zero_grad(set_to_none=True)
    out = np.zeros((len(cam), x.shape[2], x.shape[3]), np.float32)
    for i, c in enumerate(cam):
        c = cv2.resize(c, (x.shape[3], x.shape[2]), interpolation=cv2.INTER_LINEAR)
        out[i] = c / c.max() if c.max() > 0 else c
    return out


@dataclass
class Predictor:
    run: runs.Run
    folds: list[FoldModel]
    settings: dict                    # the cache's size and windows the run was trained on
    sequence: list[SeqFold] = field(default_factory=list)
    boost: list[BoostFold] = field(default_factory=list)
    device: torch.device = torch.device("cpu")
    card: dict = field(default_factory=dict)
    batch_size: int = 64
    workers: int = 0

    @classmethod
    def load(cls, run_dir, device="auto", stage2=True, batch_size=64, workers=0) -> Predictor:
        """Every finished stage-1 fold of the run (best.pth), and its sequence stage when there is one."""
        run = runs.Run(run_dir)
        if not run.path.is_dir():
            raise PipelineError(f"run folder not found: {run.path}")
        if run.name.startswith(tuple(f"{k}_" for k in runs.STAGE2_KINDS)) and "stage1" in run.config():
            raise PipelineError(f"{run.path} is a stage-2 run: load its stage-1 run ({run.config()['stage1']})")
        device = pick_device(device)
        configure_backend(device)
        ks = [k for k in run.finished_folds() if (run.fold_dir(k) / runs.BEST).exists()]
        if not ks:
            raise PipelineError(f"no trained fold in {run.path} (fold*/best.pth with oof.csv): train first")
        folds = []
        for k in ks:
            model, cfg = model_from_checkpoint(run.fold_dir(k) / runs.BEST)
            folds.append(FoldModel(f"fold{k}", model.to(device).to(memory_format=torch.channels_last), cfg))
        settings = json.loads((run.fold_dir(ks[0]) / runs.PREPROCESS).read_text())
        seq, boost = [], []
        if stage2:
            s2, b2 = run.stage2("seq"), run.stage2("boost")
            seq = [SeqFold.load(s2.fold_dir(k), device) for k in ks if (s2.fold_dir(k) / runs.OOF).exists()]
            boost = [BoostFold.load(b2.fold_dir(k)) for k in ks if (b2.fold_dir(k) / runs.OOF).exists()]
        return cls(run, folds, settings, seq, boost, device, runs.run_card(run), batch_size, workers)

    @property
    def weights(self) -> dict[str, np.ndarray]:
        """How stage 1 and the stage-2 models are combined, per class: the report's OOF-fitted blend, else the
        stage-2 models' mean, else stage 1 alone (renormalised over the parts this Predictor has)."""
        have = {"stage1": True, "seq": bool(self.sequence), "boost": bool(self.boost)}
        w = {k: np.broadcast_to(np.asarray(v, float), (len(CLASSES),)) for k, v in
             (self.card.get("blend_weights") or {}).items() if have.get(k)}
        if not w or (sum(w.values()) <= 0).any():
            w = {k: np.ones(len(CLASSES)) for k in ("seq", "boost") if have[k]} or {"stage1": np.ones(len(CLASSES))}
        total = sum(w.values())
        return {k: v / total for k, v in w.items()}

    @property
    def description(self) -> str:
        cfg = self.folds[0].config
        parts = ", ".join(f"{k} {v.mean():.2f}" for k, v in self.weights.items())
        return (f"{self.run.name}: {cfg['model']} @ {cfg['img_size']}px, {cfg['input_mode']}, "
                f"{len(self.folds)} fold(s); stages combined as {parts} (mean weight over the classes)")

    # ---- stage 1
    def iter_fold_predictions(self, images, meta: pd.DataFrame, progress=False):
        """(fold name, FoldOutput) of each stage-1 fold in turn, with the run's TTA, for the readable rows of
        `meta`: one fold's embeddings in memory at a time."""
        ids = meta["ID"].to_numpy()[(meta["status"] == "ok").to_numpy()]
        for f in self.folds:
            ds = slice_dataset(f.config, images, meta)
            dl = DataLoader(ds, self.batch_size, sampler=EpochSampler(len(ds), shuffle=False), num_workers=self.workers,
                            collate_fn=collate, pin_memory=self.device.type == "cuda")
            amp_dtype, _ = amp_settings(self.device, f.config.get("amp", "auto"))
            _, probs, emb = predict_loader(f.model, dl, self.device, amp_dtype, hflip_tta=f.config.get("tta", "hflip") == "hflip",
                                           desc=f"predict {f.name}", progress=progress)
            yield f.name, FoldOutput(ids, probs, emb)

    def fold_predictions(self, images, meta: pd.DataFrame, progress=False) -> dict[str, FoldOutput]:
        """Each stage-1 fold's probabilities and embeddings for the readable rows of `meta`, with the run's TTA."""
        return dict(self.iter_fold_predictions(images, meta, progress))

    # ---- files -> table
    def analyse(self, inputs, progress=False) -> Analysis:
        """Decode files/folders with the run's preprocessing and predict every readable slice."""
        paths = list_inputs(inputs)
        images, meta = decode_files(paths, windows_from_settings(self.settings), self.settings["size"])
        skipped = meta.loc[meta.status != "ok", ["path", "reason"]].reset_index(drop=True)
        cols = ["ID", "file", "series", "slice", "z", *CLASSES]
        if (meta.status != "ok").all():
            return Analysis(pd.DataFrame(columns=cols), skipped, images, meta)
        per_fold = self.fold_predictions(images, meta, progress)
        ok = meta[meta.status == "ok"].set_index("ID")
        order = ok.sort_values(["SeriesInstanceUID", "slice_index"])
        ids = order.index.to_numpy()
        stage1 = {n: pd.DataFrame(o.probs, index=o.ids, columns=CLASSES) for n, o in per_fold.items()}
        parts = {"stage1": sum(s.loc[ids].to_numpy() for s in stage1.values()) / len(stage1)}
        if self.sequence or self.boost:
            groups = [g.index.to_numpy() for _, g in order.groupby("SeriesInstanceUID", sort=False)]
            cuts = np.cumsum([len(g) for g in groups])[:-1]

            def per_series(fold_name):  # a stage-1 fold's outputs split by series, in the table's order
                o = per_fold[fold_name]
                return np.split(pd.Index(o.ids).get_indexer(np.concatenate(groups)), cuts), o

            if self.sequence:
                outs = []
                for sf in self.sequence:
                    pos, o = per_series(sf.name)
                    outs.append(np.concatenate(sf.predict([(o.emb[p], o.probs[p]) for p in pos])))
                parts["seq"] = np.mean(outs, axis=0)
            if self.boost:
                outs = []
                for bf in self.boost:
                    pos, o = per_series(bf.name)
                    outs.append(np.concatenate(bf.predict([o.probs[p] for p in pos])))
                parts["boost"] = np.mean(outs, axis=0)
        probs = sum(w * parts[k] for k, w in self.weights.items())
        table = pd.DataFrame(probs, columns=CLASSES)
        table.insert(0, "z", order["z"].to_numpy())
        table.insert(0, "slice", order["slice_index"].to_numpy() + 1)
        table.insert(0, "series", order["SeriesInstanceUID"].astype(str).to_numpy())
        table.insert(0, "file", [Path(p).name for p in order["path"]])
        table.insert(0, "ID", ids)
        return Analysis(table, skipped, images, meta)

    def predict(self, inputs, progress=False) -> pd.DataFrame:
        """One row per readable slice (ID, file, series, slice in z order, z, six probabilities); files that gave
        no slice are named in a warning (`analyse(...).skipped` lists them with the reason)."""
        a = self.analyse(inputs, progress)
        if len(a.skipped):
            warnings.warn(f"{len(a.skipped)} file(s) gave no CT slice, e.g. "
                          + "; ".join(f"{Path(p).name}: {r}" for p, r in a.skipped.values[:3]), stacklevel=2)
        return a.table

    def grad_cam(self, a: Analysis, ids, class_name: str | None = None) -> dict[str, tuple[str, np.ndarray]]:
        """Heat maps of the stage-1 models (averaged over folds) for the given slice IDs of an analysis:
        ID -> (class explained, (S, S) map in [0, 1]). The class is `class_name`, else the most likely subtype
        where `any` >= 0.5, else `any`."""
        t = a.table.set_index("ID")
        ok = a.meta[a.meta.status == "ok"].reset_index(drop=True)
        pos_of = pd.Index(ok["ID"])
        out = {}
        for f in self.folds:
            ds = slice_dataset(f.config, a.images, ok)
            for i in ids:
                row = t.loc[i]
                cls = class_name or (max(CLASSES[:5], key=lambda c: row[c]) if row["any"] >= 0.5 else "any")
                x = ds[int(pos_of.get_loc(i))][0].unsqueeze(0).to(self.device)
                cam = grad_cam(f.model, x, CLASSES.index(cls))[0]
                prev = out.get(i, (cls, 0))[1]
                out[i] = (cls, prev + cam / len(self.folds))
        return out
