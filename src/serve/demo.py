"""Try a trained model on your own head CT: per-slice probabilities, a series summary and Grad-CAM maps.

    python -m src.serve.demo --run outputs/demo/runs/resnet10t_128 /path/to/dicoms --results-dir demo_out
    python -m src.serve.webapp --run outputs/demo/runs/resnet10t_128            # the same as a local web page

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

from dataclasses import dataclass
from pathlib import Path

import cv2

from ..card import card_text
from ..config import parse_config, positional
from ..predictor import Predictor
from ..utils import CLASSES, PipelineError, atomic_path, atomic_write, cli_main, write_csv, write_json
from .results import DISCLAIMER, SYNTHETIC_WARNING, analyse, model_notes, overlay, zplot


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
    a = parse_config(DemoConfig, description=__doc__, prog="python -m src.serve.demo")
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
