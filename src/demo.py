"""Try a trained model on your own head CT: per-slice probabilities, a series summary and Grad-CAM maps.

    python -m src.demo --model outputs/demo/runs/resnet10t_128 /path/to/dicoms --out demo_out
    python -m src.demo serve --model outputs/demo/runs/resnet10t_128          # web page on http://127.0.0.1:7860

Reads any head CT series: uncompressed or compressed (JPEG Lossless, JPEG 2000, RLE), files in any
order (ordered by z), several series in one folder (one result each). Non-CT or non-image DICOMs are
skipped with the reason. The preprocessing is the run's own (its cache size and windows, input mode
and 2.5D neighbours, from preprocess.json and config.yaml); the stage-1 fold models are averaged, and
the sequence stage (`seq_<run>` beside the run) is applied when the run has one.

Writes, per series, in OUT/<series>/: predictions.csv (six probabilities per slice, in z order),
summary.json and summary.md (per type: the highest slice probability and the slices above 0.5),
zplot.png (the six probabilities along z) and, for the most suspicious slices, gradcam_*.png (the brain
window with a Grad-CAM heat map of the stage-1 models over it). OUT/skipped.csv lists skipped files.

This is a research demo, not a medical device: it was trained on one public dataset and has not been
validated for clinical use.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from .infer import pick_device  # noqa: E402
from .model import load_checkpoint, model_from_checkpoint  # noqa: E402
from .predict import finished_folds, predict_with_model, slice_dataset  # noqa: E402
from .prepare import decode_files, windows_from_settings  # noqa: E402
from .sequence import SeqModel, logit, predict_series  # noqa: E402
from .utils import CLASSES, PipelineError, atomic_path, atomic_write, cli_main, write_csv, write_json  # noqa: E402

THRESHOLD = 0.5


@dataclass
class Models:
    """A run's fold models loaded once (the web server keeps them between requests)."""
    run_dir: Path
    stage1: list                      # [(fold name, model, config dict)]
    settings: dict                    # cache size and windows the run was trained on
    sequence: list = field(default_factory=list)  # [(fold name, SeqModel, mean, std, config)]
    device: torch.device = torch.device("cpu")

    @property
    def description(self) -> str:
        cfg = self.stage1[0][2]
        seq = f" + sequence stage ({len(self.sequence)} folds)" if self.sequence else ""
        return f"{self.run_dir.name}: {cfg['model']} @ {cfg['img_size']}px, {cfg['input_mode']}, {len(self.stage1)} fold(s){seq}"


def load_models(run_dir, device="auto") -> Models:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PipelineError(f"run directory not found: {run_dir}")
    device = pick_device(device)
    folds = finished_folds(run_dir)
    stage1 = []
    for fd in folds:
        model, cfg = model_from_checkpoint(fd / "best.pth")
        stage1.append((fd.name, model.to(device).to(memory_format=torch.channels_last), cfg))
    settings = json.loads((folds[0] / "preprocess.json").read_text())
    seq = []
    seq_dir = run_dir.parent / f"seq_{run_dir.name}"
    for fd in sorted(seq_dir.glob("fold*")) if seq_dir.is_dir() else []:
        if not (fd / "best.pth").exists() or not any(fd.name == f for f, _, _ in stage1):
            continue
        ck = load_checkpoint(fd / "best.pth")
        c = ck["config"]
        m = SeqModel(ck["emb_dim"], c["hidden"], c["layers"], c["dropout"], c["features"])
        m.load_state_dict(ck["model"])
        seq.append((fd.name, m.eval(), ck["emb_mean"].numpy(), ck["emb_std"].numpy(), c))
    return Models(run_dir, stage1, settings, seq, device)


def list_inputs(inputs) -> list[Path]:
    files = []
    for p in map(Path, inputs):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        elif p.is_file():
            files.append(p)
        else:
            raise PipelineError(f"not a file or folder: {p}")
    if not files:
        raise PipelineError("no files given")
    return files


def grad_cam(model, x: torch.Tensor, class_idx: int) -> np.ndarray:
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


def overlay(brain: np.ndarray, cam: np.ndarray | None, size=256) -> np.ndarray:
    """RGB uint8: brain-window image with the heat map blended where it is strong."""
    img = cv2.cvtColor(cv2.resize(brain, (size, size), interpolation=cv2.INTER_LINEAR), cv2.COLOR_GRAY2RGB)
    if cam is None:
        return img
    cam = cv2.resize(cam, (size, size), interpolation=cv2.INTER_LINEAR)
    heat = cv2.cvtColor(cv2.applyColorMap((cam * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    alpha = (np.clip((cam - 0.2) / 0.8, 0, 1) * 0.6)[..., None]
    return (img * (1 - alpha) + heat * alpha).astype(np.uint8)


@dataclass
class SeriesResult:
    series: str
    table: pd.DataFrame               # per slice in z order: ID, file, z, six probabilities
    brain: np.ndarray                 # (n, S, S) uint8 brain window of each slice
    cams: dict                        # slice position -> (class name, heat map)
    summary: dict


def summarise(series: str, table: pd.DataFrame) -> dict:
    s = {"series": series, "slices": len(table), "threshold": THRESHOLD, "types": {}}
    for c in CLASSES:
        p = table[c].to_numpy()
        above = np.flatnonzero(p >= THRESHOLD)
        s["types"][c] = {"max_probability": float(p.max()), "slice_of_max": int(p.argmax()) + 1,
                         "slices_above_threshold": [int(i) + 1 for i in above],
                         "ids_above_threshold": table["ID"].iloc[above].tolist()}
    s["verdict"] = "suspected hemorrhage" if s["types"]["any"]["max_probability"] >= THRESHOLD else "no hemorrhage found"
    return s


def analyse(models: Models, files, cam_slices: int | None = 4, progress=False):
    """(list of SeriesResult, DataFrame of skipped files with reasons)."""
    images, meta = decode_files(files, windows_from_settings(models.settings), models.settings["size"])
    skipped = meta.loc[meta.status != "ok", ["path", "reason"]].reset_index(drop=True)
    if (meta.status != "ok").all():
        return [], skipped

    per_fold = {}
    for name, model, cfg in models.stage1:
        ids, probs, emb = predict_with_model(model, cfg, images, meta, models.device, tta="hflip", progress=progress,
                                             desc=f"{name}")
        per_fold[name] = (pd.DataFrame(probs, index=ids, columns=CLASSES), emb)
    stage1 = sum(p for p, _ in per_fold.values()) / len(per_fold)

    ok = meta[meta.status == "ok"].set_index("ID")
    results = []
    for series, g in ok.sort_values(["SeriesInstanceUID", "slice_index"]).groupby("SeriesInstanceUID", sort=False):
        ids = g.index.to_numpy()
        probs = stage1.loc[ids, CLASSES].to_numpy()
        if models.sequence:
            outs = []
            for name, seq, mu, sd, c in models.sequence:
                p1, emb = per_fold[name]
                pos = p1.index.get_indexer(ids)
                s = [(ids, (emb[pos].astype(np.float32) - mu) / sd, logit(p1.loc[ids, CLASSES].to_numpy()).astype(np.float32), None)]
                outs.append(predict_series(seq, s, c.get("tta_reverse", True))[0])
            probs = np.mean(outs, axis=0)
        table = pd.DataFrame(probs, columns=CLASSES)
        table.insert(0, "z", g["z"].to_numpy())
        table.insert(0, "file", [Path(p).name for p in g["path"]])
        table.insert(0, "ID", ids)
        table.insert(0, "slice", np.arange(1, len(ids) + 1))
        rows = g["row"].to_numpy()
        brain = images[rows, :, :, 0]
        order = np.argsort(-table["any"].to_numpy())
        chosen = order if cam_slices is None else order[:cam_slices]
        cams = {}
        sub = meta.set_index("ID").loc[ids].reset_index()
        for _, model, cfg in models.stage1:
            ds = slice_dataset(cfg, images, sub)
            for pos in chosen:
                cls = CLASSES.index(max(CLASSES[:5], key=lambda c: table[c].iloc[pos])) \
                    if table["any"].iloc[pos] >= THRESHOLD else CLASSES.index("any")
                x = ds[int(pos)][0].unsqueeze(0).to(models.device)
                cam = grad_cam(model, x, cls)[0]
                prev = cams.get(int(pos), (CLASSES[cls], 0))[1]
                cams[int(pos)] = (CLASSES[cls], prev + cam / len(models.stage1))
        results.append(SeriesResult(str(series), table, brain, cams, summarise(str(series), table)))
    return results, skipped


def zplot(table: pd.DataFrame, path=None, title=""):
    fig, ax = plt.subplots(figsize=(8, 3.6))
    x = table["slice"]
    for c in CLASSES:
        ax.plot(x, table[c], "-o" if c == "any" else "-", ms=3, lw=2.2 if c == "any" else 1.3, label=c)
    ax.axhline(THRESHOLD, ls=":", color="grey")
    ax.set_ylim(-0.02, 1.02), ax.set_xlabel("slice (ordered by z, inferior to superior)"), ax.set_ylabel("probability")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=3, loc="upper left")
    fig.tight_layout()
    if path is None:
        import io
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        return buf.getvalue()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def summary_markdown(s: dict) -> str:
    lines = [f"# Series {s['series']}", "", f"{s['slices']} slices. Verdict at {THRESHOLD}: **{s['verdict']}**.", "",
             "| type | highest probability | at slice | slices above 0.5 |", "|---|---:|---:|---|"]
    for c, t in s["types"].items():
        lines.append(f"| {c} | {t['max_probability']:.3f} | {t['slice_of_max']} | "
                     f"{', '.join(map(str, t['slices_above_threshold'])) or '-'} |")
    return "\n".join(lines) + "\n"


def safe_name(series: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in series)[:80]


def write_outputs(results, skipped, out_dir) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(skipped, out / "skipped.csv", index=False)
    for r in results:
        d = out / safe_name(r.series)
        write_csv(r.table, d / "predictions.csv", index=False, float_format="%.5f")
        write_json(r.summary, d / "summary.json")
        with atomic_write(d / "summary.md") as f:
            f.write(summary_markdown(r.summary))
        zplot(r.table, d / "zplot.png", title=f"series {r.series}")
        for rank, (pos, (cls, cam)) in enumerate(sorted(r.cams.items(), key=lambda kv: -r.table["any"].iloc[kv[0]])):
            img = overlay(r.brain[pos], cam)
            with atomic_path(d / f"gradcam_{rank + 1}_slice{pos + 1}_{cls}.png") as tmp:
                cv2.imwrite(str(tmp), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))


def main():
    argv = sys.argv[1:]
    if argv and argv[0] == "serve":
        ap = argparse.ArgumentParser(prog="python -m src.demo serve", description="local web page for the demo")
        ap.add_argument("--model", required=True, help="stage-1 run directory")
        ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
        ap.add_argument("--port", type=int, default=7860)
        a = ap.parse_args(argv[1:])
        from .webapp import serve
        return serve(a.model, a.host, a.port)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="stage-1 run directory (fold*/best.pth); seq_<run> beside it is used too")
    ap.add_argument("inputs", nargs="+", help="DICOM files and/or folders")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--cam-slices", type=int, default=4, help="Grad-CAM maps for this many most suspicious slices per series")
    a = ap.parse_args(argv)
    models = load_models(a.model)
    print(f"model: {models.description}")
    results, skipped = analyse(models, list_inputs(a.inputs), a.cam_slices, progress=True)
    write_outputs(results, skipped, a.out)
    for r in results:
        t = r.summary["types"]
        print(f"series {r.series}: {r.summary['slices']} slices, {r.summary['verdict']}; "
              + ", ".join(f"{c} {t[c]['max_probability']:.2f}" for c in CLASSES))
    if len(skipped):
        print(f"skipped {len(skipped)} file(s):" + "".join(f"\n  {Path(p).name}: {why}" for p, why in skipped.values[:10]))
    if not results:
        raise PipelineError("no readable CT slice in the input")
    print(f"results in {a.out}/")


if __name__ == "__main__":
    cli_main(main)
