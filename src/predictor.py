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

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from .boost import BoostFold
from .bundle import Trained, is_bundle, read_bundle, read_run
from .data import EpochSampler, SliceDataset, collate, neighbour_rows
from .engine import amp_settings, configure_backend, pick_device, predict_loader
from .model import Net, net_from_state
from .cache import windows_from_settings
from .scans import META_COLUMNS, decode_files, list_inputs, read_headers
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
    table: pd.DataFrame               # one row per scored slice: ID, file, series, slice (1-based, z order), z, six classes
    skipped: pd.DataFrame             # path, reason of every file that gave no slice (unreadable, or no CT image)
    images: np.ndarray                # (n files decoded, S, S, 3) uint8 with the run's preprocessing
    meta: pd.DataFrame                # the decoder's metadata (rows of `images`)
    series: pd.DataFrame | None = None  # with a selector: every series of the inputs, scored or not and why


def model_identity(source) -> str:
    """What a trained model is, as a string that changes when it is retrained or re-bundled and not otherwise (the
    DICOM node's Device UID is made from it, src.serve.dicom_out): for a bundle the SHA-256 of its manifest member
    (which lists every member's SHA-256 and when the bundle was written), for a run folder the fingerprints of its
    stage-1 and stage-2 runs (each finished fold's stamp and out-of-fold predictions) and of its blend file."""
    import hashlib
    import zipfile

    from . import bundle, layout
    from .runs import Run
    from .stamps import file_fingerprint, fingerprint
    if is_bundle(source):
        with zipfile.ZipFile(source) as z:  # read_bundle has checked it; bundle's reader bounds what is read
            manifest = bundle._read(z, z.getinfo(bundle.MANIFEST), Path(source), bundle.MAX_JSON_BYTES)
        return f"bundle {bundle.MANIFEST} sha256:{hashlib.sha256(manifest).hexdigest()}"
    run = Run(source)
    blend = layout.run_blend_file(run.path)
    parts = [r.fingerprint(with_test=False) for r in run.family()] + [file_fingerprint(blend) if blend.exists() else ""]
    return f"run fingerprint:{fingerprint(parts)}"


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
    name: str                         # the run's name
    folds: list[FoldModel]
    settings: dict                    # the cache's size and windows the run was trained on
    sequence: list[SeqFold] = field(default_factory=list)
    boost: list[BoostFold] = field(default_factory=list)
    device: torch.device = torch.device("cpu")
    card: dict = field(default_factory=dict)
    batch_size: int = 64
    workers: int = 0
    blend: dict = field(default_factory=dict)  # stage1/seq/boost -> 6 weights fitted by src.blend ({}: none)
    identity: str = ""                # what the model is, read when loaded (model_identity); "" when built from parts

    @classmethod
    def load(cls, source, device="auto", stage2=True, batch_size=64, workers=0) -> Predictor:
        """Every finished stage-1 fold of a run folder (best.pth) and its stage-2 models, or a bundle's (a file)."""
        t = read_bundle(source, stage2) if is_bundle(source) else read_run(source, stage2)
        p = cls.from_parts(t, device, stage2, batch_size, workers)
        p.identity = model_identity(source)
        return p

    @classmethod
    def from_parts(cls, t: Trained, device="auto", stage2=True, batch_size=64, workers=0) -> Predictor:
        device = pick_device(device)
        configure_backend(device)
        folds = [FoldModel(name, net_from_state(cfg, sd).to(device).to(memory_format=torch.channels_last), cfg)
                 for name, cfg, sd in t.stage1]
        seq = [SeqFold.from_checkpoint(name, ck, device) for name, ck in t.seq] if stage2 else []
        boost = [BoostFold.from_texts(name, cfg, texts) for name, cfg, texts in t.boost] if stage2 else []
        return cls(t.name, folds, t.settings, seq, boost, device, t.card, batch_size, workers, dict(t.blend))

    @property
    def weights(self) -> dict[str, np.ndarray]:
        """How stage 1 and the stage-2 models are combined, per class: the OOF-fitted blend of the run's stages
        (src.blend), else the stage-2 models' mean, else stage 1 alone (renormalised over the parts it has)."""
        have = {"stage1": True, "seq": bool(self.sequence), "boost": bool(self.boost)}
        w = {k: np.broadcast_to(np.asarray(v, float), (len(CLASSES),)) for k, v in self.blend.items() if have.get(k)}
        if not w or (sum(w.values()) <= 0).any():
            w = {k: np.ones(len(CLASSES)) for k in ("seq", "boost") if have[k]} or {"stage1": np.ones(len(CLASSES))}
        total = sum(w.values())
        return {k: v / total for k, v in w.items()}

    @property
    def description(self) -> str:
        cfg = self.folds[0].config
        parts = ", ".join(f"{k} {v.mean():.2f}" for k, v in self.weights.items())
        return (f"{self.name}: {cfg['model']} @ {cfg['img_size']}px, {cfg['input_mode']}, "
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
    def analyse(self, inputs, progress=False, select=None) -> Analysis:
        """Decode files/folders with the run's preprocessing and predict every readable slice; with `select` (a
        function from the files' headers, src.scans.read_headers, to one row per series with `scored` and `reason`:
        src.serve.selector.select), only the slices of the series it chooses, read from their headers first. A chosen
        series of which no slice decodes (damaged pixels, a compression without a decoder) is listed as not scored
        with that reason, and the selector chooses again without it: the study's next eligible series is scored."""
        paths = list_inputs(inputs)
        if select is None:
            images, meta = self._decode(paths)
            return Analysis(self.score(images, meta, progress), meta.loc[meta.status != "ok", ["path", "reason"]]
                            .reset_index(drop=True), images, meta, None)
        heads = read_headers(paths)
        ok = heads[heads.status == "ok"]
        skipped = [heads.loc[heads.status != "ok", ["path", "reason"]]]
        failed: set[str] = set()
        listing = None                # the first choice's listing: its order is the one kept
        while True:  # each turn drops at least one series, so it ends
            series = select(ok[~ok["SeriesInstanceUID"].isin(failed)])
            listing = series if listing is None else listing
            chosen = set(series.loc[series.scored, "SeriesInstanceUID"])
            images, meta = self._decode(ok.loc[ok["SeriesInstanceUID"].isin(chosen), "path"].tolist())
            dead = chosen - set(meta.loc[meta.status == "ok", "SeriesInstanceUID"])
            if not dead:
                break
            failed |= dead
            skipped.append(meta.loc[meta["SeriesInstanceUID"].isin(dead) & (meta.status != "ok"), ["path", "reason"]])
        if failed:  # their rows as the first choice listed them (it saw every series), now with the reason
            gone = listing[listing["SeriesInstanceUID"].isin(failed)].assign(
                scored=False, reason="eligible, but no slice of it could be decoded (its files are listed as skipped)")
            place = {s: i for i, s in enumerate(listing["SeriesInstanceUID"])}
            series = pd.concat([series, gone], ignore_index=True).sort_values(
                "SeriesInstanceUID", key=lambda uids: uids.map(place), kind="stable").reset_index(drop=True)
        skipped.append(meta.loc[meta.status != "ok", ["path", "reason"]])
        skipped = pd.concat([s for s in skipped if len(s)] or [skipped[0]], ignore_index=True)
        return Analysis(self.score(images, meta, progress), skipped, images, meta, series)

    def _decode(self, paths: list) -> tuple[np.ndarray, pd.DataFrame]:
        """(images, meta) of the files with the run's preprocessing; empty ones for no file."""
        if paths:
            return decode_files(paths, windows_from_settings(self.settings), self.settings["size"])
        return np.zeros((0, self.settings["size"], self.settings["size"], 3), np.uint8), \
            pd.DataFrame(columns=[*META_COLUMNS, "slice_index", "series_len", "prev_id", "next_id"])

    def score(self, images, meta: pd.DataFrame, progress=False) -> pd.DataFrame:
        """One row per readable slice of `meta` (rows of `images`, decoded with this model's preprocessing: files
        decoded here, or an image cache built with the same size and windows), in series and z order: the stage-1
        folds averaged, each stage-2 model applied fold by fold to its own stage-1 fold's outputs, combined with
        the blend weights."""
        cols = ["ID", "file", "series", "slice", "z", *CLASSES]
        if not len(meta) or (meta.status != "ok").all():
            return pd.DataFrame(columns=cols)
        per_fold = self.fold_predictions(images, meta, progress)
        order = meta[meta.status == "ok"].set_index("ID").sort_values(["SeriesInstanceUID", "slice_index"])
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
        table = pd.DataFrame(sum(w * parts[k] for k, w in self.weights.items()), columns=CLASSES)
        table.insert(0, "z", order["z"].to_numpy())
        table.insert(0, "slice", order["slice_index"].to_numpy() + 1)
        table.insert(0, "series", order["SeriesInstanceUID"].astype(str).to_numpy())
        table.insert(0, "file", [Path(p).name for p in order["path"]])
        table.insert(0, "ID", ids)
        return table

    def predict(self, inputs, progress=False, select=None) -> pd.DataFrame:
        """One row per readable slice (ID, file, series, slice in z order, z, six probabilities) of every series, or of
        those `select` chooses (see analyse); files that gave no slice are named in a warning (`analyse(...).skipped`
        lists them with the reason)."""
        a = self.analyse(inputs, progress, select)
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
