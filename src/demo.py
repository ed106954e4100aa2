"""Try a trained model on your own head CT: per-slice probabilities, a series summary and Grad-CAM maps.

    python -m src.demo --run outputs/demo/runs/resnet10t_128 /path/to/dicoms --results-dir demo_out
    python -m src.webapp --run outputs/demo/runs/resnet10t_128            # the same as a local web page

Reads any head CT series through `src.predictor.Predictor` (uncompressed or compressed DICOM, files in any
order, several series in one folder: one result each; non-CT or broken files are skipped with the reason),
with the run's own preprocessing, its fold models averaged and its sequence stage applied when it has one.

Writes, per series, in RESULTS/<series>/: predictions.csv (six probabilities per slice, in z order),
summary.json and summary.md (what the model was trained on and how well it did; per type the highest
slice probability and the slices above 0.5), zplot.png (the six probabilities along z) and, for the most
suspicious slices, gradcam_*.png (the brain window with a Grad-CAM heat map of the stage-1 models over
it). RESULTS/skipped.csv lists the files that gave no slice, with the reason.

This is a research demo, not a medical device: it was trained on one public dataset (or, after a plain
`bash run.sh` without competition data, on generated phantoms only) and has not been validated for
clinical use.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .config import parse_config, positional  # noqa: E402
from .predictor import Predictor  # noqa: E402
from .card import card_text  # noqa: E402
from .utils import CLASSES, PipelineError, atomic_path, atomic_write, cli_main, write_csv, write_json  # noqa: E402

THRESHOLD = 0.5  # used only when the run's report has chosen no operating point
DISCLAIMER = "Research demo, not a medical device."
SYNTHETIC_WARNING = ("This model was trained on generated demo data (synthetic phantoms) only: it has never seen a real "
                     "head, and its output on real scans means nothing.")


def model_notes(card: dict) -> list[str]:
    """What a reader must know about the model before reading its output, most important first."""
    notes = [SYNTHETIC_WARNING] if card.get("synthetic") else []
    return notes + [card_text(card), DISCLAIMER]


@dataclass
class SeriesResult:
    series: str
    table: pd.DataFrame               # per slice in z order: slice, ID, file, z, six probabilities
    brain: np.ndarray                 # (n, S, S) uint8 brain window of each slice
    cams: dict                        # slice position -> (class name, heat map)
    summary: dict


def verdict_threshold(card: dict | None) -> tuple[float, str]:
    """(threshold, how it was chosen): the operating point src.evaluate chose out of fold for a stated scan-level
    sensitivity, else 0.5."""
    op = (card or {}).get("operating_point") or {}
    t = op.get("threshold")
    if t is not None and t == t:
        return float(t), (f"the operating point chosen out of fold to flag {op['target_sensitivity']:.0%} of bleeding "
                          f"scans (specificity there {op['specificity']:.0%})")
    return THRESHOLD, "0.5 (the run's report has chosen no operating point)"


def summarise(series: str, table: pd.DataFrame, card: dict | None = None) -> dict:
    t, how = verdict_threshold(card)
    s = {"series": series, "slices": len(table), "threshold": t, "threshold_from": how, "types": {}}
    for c in CLASSES:
        p = table[c].to_numpy()
        above = np.flatnonzero(p >= t)
        s["types"][c] = {"max_probability": float(p.max()), "slice_of_max": int(p.argmax()) + 1,
                         "slices_above_threshold": [int(i) + 1 for i in above],
                         "ids_above_threshold": table["ID"].iloc[above].tolist()}
    s["verdict"] = "suspected hemorrhage" if s["types"]["any"]["max_probability"] >= t else "no hemorrhage found"
    s["model"] = card or {}
    s["notes"] = model_notes(card or {})
    return s


def analyse(p: Predictor, files, cam_slices: int | None = 4, progress=False):
    """(list of SeriesResult, DataFrame of skipped files with reasons)."""
    a = p.analyse(files, progress)
    results = []
    for series, g in a.table.groupby("series", sort=True):
        g = g.reset_index(drop=True)
        rows = a.meta.set_index("ID").loc[g["ID"], "row"].to_numpy()
        order = np.argsort(-g["any"].to_numpy(), kind="stable")
        chosen = order if cam_slices is None else order[:cam_slices]
        maps = p.grad_cam(a, g["ID"].iloc[chosen].tolist())
        cams = {int(pos): maps[g["ID"].iloc[pos]] for pos in chosen}
        table = g.drop(columns=["series"])
        results.append(SeriesResult(str(series), table, a.images[rows, :, :, 0], cams, summarise(str(series), table, p.card)))
    return results, a.skipped


def overlay(brain: np.ndarray, cam: np.ndarray | None, size=256) -> np.ndarray:
    """RGB uint8: brain-window image with the heat map blended where it is strong."""
    img = cv2.cvtColor(cv2.resize(brain, (size, size), interpolation=cv2.INTER_LINEAR), cv2.COLOR_GRAY2RGB)
    if cam is None:
        return img
    cam = cv2.resize(cam, (size, size), interpolation=cv2.INTER_LINEAR)
    heat = cv2.cvtColor(cv2.applyColorMap((cam * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    alpha = (np.clip((cam - 0.2) / 0.8, 0, 1) * 0.6)[..., None]
    return (img * (1 - alpha) + heat * alpha).astype(np.uint8)


def zplot(table: pd.DataFrame, path=None, title="", threshold: float = THRESHOLD):
    """The six probabilities along z, with the verdict's threshold: to a file, or PNG bytes when path is None."""
    fig, ax = plt.subplots(figsize=(8, 3.6))
    x = table["slice"]
    for c in CLASSES:
        ax.plot(x, table[c], "-o" if c == "any" else "-", ms=3, lw=2.2 if c == "any" else 1.3, label=c)
    ax.axhline(threshold, ls=":", color="grey")
    ax.set_ylim(-0.02, 1.02), ax.set_xlabel("slice (ordered by z, inferior to superior)"), ax.set_ylabel("probability")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=3, loc="upper left")
    fig.tight_layout()
    if path is None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        return buf.getvalue()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def summary_markdown(s: dict) -> str:
    card = s.get("model", {})
    lines = [f"# Series {s['series']}", ""]
    if card.get("synthetic"):
        lines += [f"> **WARNING: {SYNTHETIC_WARNING}**", ""]
    lines += [f"Model: {card_text(card)}", "", f"*{DISCLAIMER}*", "",
              f"{s['slices']} slices. Verdict at {s['threshold']:.3f} ({s['threshold_from']}): **{s['verdict']}**.", "",
              f"| type | highest probability | at slice | slices at or above {s['threshold']:.3f} |", "|---|---:|---:|---|"]
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
        zplot(r.table, d / "zplot.png", title=f"series {r.series}", threshold=r.summary["threshold"])
        for rank, (pos, (cls, cam)) in enumerate(sorted(r.cams.items(), key=lambda kv: -r.table["any"].iloc[kv[0]])):
            img = overlay(r.brain[pos], cam)
            with atomic_path(d / f"gradcam_{rank + 1}_slice{pos + 1}_{cls}.png") as tmp:
                cv2.imwrite(str(tmp), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))


@dataclass
class DemoConfig:
    inputs: list[str] = positional(nargs="+")  # DICOM files and/or folders
    run: str = ""                     # a stage-1 run folder (its stage-2 runs come along) or a bundle (src.export)
    results_dir: str = "demo_out"     # where the per-series results go
    cam_slices: int = 4               # Grad-CAM maps for this many most suspicious slices per series
    device: str = "auto"              # auto (CUDA when available), cpu, cuda


def main():
    a = parse_config(DemoConfig, description=__doc__, prog="python -m src.demo")
    if not a.run:
        raise PipelineError("--run RUN_FOLDER_OR_BUNDLE is required (e.g. outputs/demo/runs/resnet10t_128)")
    p = Predictor.load(a.run, a.device)
    print(f"model: {p.description}")
    for n in model_notes(p.card):
        print(("WARNING: " if n == SYNTHETIC_WARNING else "") + n)
    results, skipped = analyse(p, a.inputs, a.cam_slices, progress=True)
    write_outputs(results, skipped, a.results_dir)
    for r in results:
        t = r.summary["types"]
        print(f"series {r.series}: {r.summary['slices']} slices, {r.summary['verdict']}; "
              + ", ".join(f"{c} {t[c]['max_probability']:.2f}" for c in CLASSES))
    if len(skipped):
        print(f"skipped {len(skipped)} file(s):" + "".join(f"\n  {Path(p).name}: {why}" for p, why in skipped.values[:10]))
    if not results:
        raise PipelineError("no readable CT slice in the input")
    print(f"results in {a.results_dir}/")


if __name__ == "__main__":
    cli_main(main)
