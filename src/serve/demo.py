"""Try a trained model on your own head CT studies: one result per study, per-slice probabilities, Grad-CAM maps.

    python -m src.serve.demo --run outputs/demo/bundles/resnet10t_128.ichbundle /path/to/study --results-dir demo_out
    python -m src.serve.webapp --run outputs/demo/bundles/resnet10t_128.ichbundle      # the same as a local web page

Reads a study as a PACS exports it (uncompressed or compressed DICOM, files in any order, several series and
studies in one folder) through `src.predictor.Predictor`, with the run's own preprocessing, its fold models averaged
and its stage 2 applied. The series selector (src/serve/selector.py, rules in configs/serve/series_rules.yaml or
--series-rules FILE; docs/series.md) reads every series' headers first and scores, per study, the one series closest
to the training data (original axial soft-tissue non-contrast slices; --all-series: every eligible one). Every other
series is listed with the reason it was not scored.

Writes RESULTS/series.csv (every series of every study: scored or not, why, notes), RESULTS/skipped.csv (files that
gave no slice, with the reason), and per study RESULTS/<study>/summary.json and summary.md (the model card, the
study's verdict, every series), with a folder per scored series: predictions.csv (six probabilities per slice, in
order along the slice normal), summary.json and summary.md (per type the highest slice probability and the slices
at or above the verdict's threshold), zplot.png and, for the most suspicious slices, gradcam_*.png.

This is a research demo, not a medical device: it was trained on one public dataset (or, after a plain
`bash run.sh` without competition data, on generated phantoms only) and has not been validated for
clinical use.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import pandas as pd

from ..card import card_text
from ..config import parse_config, positional
from ..predictor import Predictor
from ..utils import CLASSES, PipelineError, atomic_path, atomic_write, cli_main, write_csv, write_json
from .results import DISCLAIMER, SYNTHETIC_WARNING, analyse_study, model_notes, overlay, zplot
from .selector import SERIES_COLUMNS, SeriesRules


def model_header(title: str, card: dict) -> list[str]:
    """What a page says first: its title, the generated-data warning, the model card and the disclaimer."""
    warning = [f"> **WARNING: {SYNTHETIC_WARNING}**", ""] if card.get("synthetic") else []
    return [f"# {title}", "", *warning, f"Model: {card_text(card)}", "", f"*{DISCLAIMER}*", ""]


def summary_markdown(s: dict) -> str:
    lines = model_header(f"Series {s['series']}", s.get("model", {})) + [
        f"{s['slices']} slices. Verdict at {s['threshold']:.3f} ({s['threshold_from']}): **{s['verdict']}**.", "",
        f"| type | highest probability | at slice | slices at or above {s['threshold']:.3f} |", "|---|---:|---:|---|"]
    for c, t in s["types"].items():
        lines.append(f"| {c} | {t['max_probability']:.3f} | {t['slice_of_max']} | "
                     f"{', '.join(map(str, t['slices_above_threshold'])) or '-'} |")
    return "\n".join(lines) + "\n"


def study_markdown(s: dict) -> str:
    """The study's page: the model first, then the verdict, then every series, scored or not and why."""
    lines = model_header(f"Study {s['study']}", s.get("model", {})) + [
        f"Verdict at {s['threshold']:.3f} ({s['threshold_from']}): **{s['verdict']}**.", "",
        f"Series (chosen by the rules of {s['series_rules']}):", "",
        "| series | description | files | scored | why not / notes |", "|---|---|---:|---|---|"]
    for r in s["series"]:
        lines.append(f"| {r['SeriesNumber'] or r['SeriesInstanceUID']} | {r['SeriesDescription'] or '-'} | {r['files']} | "
                     f"{'yes' if r['scored'] else 'no'} | {(r['reason'] or r['notes'] or '-').replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def safe_name(series: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in series)[:80]


def write_series(r, d: Path) -> None:
    """One scored series' files in folder d."""
    write_csv(r.table, d / "predictions.csv", index=False, float_format="%.5f")
    write_json(r.summary, d / "summary.json")
    with atomic_write(d / "summary.md") as f:
        f.write(summary_markdown(r.summary))
    zplot(r.table, d / "zplot.png", title=f"series {r.series}", threshold=r.summary["threshold"])
    for rank, (pos, (cls, cam)) in enumerate(sorted(r.cams.items(), key=lambda kv: -r.table["any"].iloc[kv[0]])):
        img = overlay(r.brain[pos], cam)
        with atomic_path(d / f"gradcam_{rank + 1}_slice{pos + 1}_{cls}.png") as tmp:
            cv2.imwrite(str(tmp), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))


def write_outputs(studies, skipped, out_dir) -> None:
    """RESULTS/series.csv (every series, scored or not and why), skipped.csv (files that gave no slice), and per
    study RESULTS/<study>/summary.json and summary.md with a folder per scored series."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(skipped, out / "skipped.csv", index=False)
    write_csv(pd.concat([s.series for s in studies], ignore_index=True) if studies
              else pd.DataFrame(columns=SERIES_COLUMNS), out / "series.csv", index=False)
    for s in studies:
        d = out / safe_name(s.study)
        write_json(s.summary, d / "summary.json")
        with atomic_write(d / "summary.md") as f:
            f.write(study_markdown(s.summary))
        for r in s.scored:
            write_series(r, d / safe_name(r.series))


@dataclass
class DemoConfig:
    inputs: list[str] = positional(nargs="+")  # DICOM files and/or folders: one or more studies, as a PACS sends them
    run: str = ""                     # a stage-1 run folder (its stage-2 runs come along) or a bundle (src.export)
    results_dir: str = "demo_out"     # where the results go: one folder per study, one inside it per scored series
    cam_slices: int = 4               # Grad-CAM maps for this many most suspicious slices per series
    series_rules: str = ""            # which series are scored (default configs/serve/series_rules.yaml; docs/series.md)
    all_series: bool = False          # score every eligible series of a study, not only the one closest to training
    device: str = "auto"              # auto (CUDA when available), cpu, cuda


def main():
    a = parse_config(DemoConfig, description=__doc__, prog="python -m src.serve.demo")
    if not a.run:
        raise PipelineError("--run RUN_FOLDER_OR_BUNDLE is required (e.g. outputs/demo/runs/resnet10t_128)")
    rules = SeriesRules.load(a.series_rules or None)
    p = Predictor.load(a.run, a.device)
    print(f"model: {p.description}")
    for n in model_notes(p.card):
        print(("WARNING: " if n == SYNTHETIC_WARNING else "") + n)
    studies, skipped = analyse_study(p, a.inputs, a.cam_slices, progress=True, rules=rules,
                                     all_series=a.all_series or None)
    write_outputs(studies, skipped, a.results_dir)
    for s in studies:
        print(f"study {s.study}: {s.summary['verdict']}")
        for row in s.series.itertuples():
            name = row.SeriesNumber or row.SeriesInstanceUID
            if row.scored:
                t = next(r for r in s.scored if r.series == row.SeriesInstanceUID).summary
                print(f"  series {name} ({row.files} files): scored, {t['verdict']}; "
                      + ", ".join(f"{c} {t['types'][c]['max_probability']:.2f}" for c in CLASSES)
                      + (f" [{row.notes}]" if row.notes else ""))
            else:
                print(f"  series {name} ({row.files} files): not scored: {row.reason}")
    if len(skipped):
        print(f"skipped {len(skipped)} file(s):" + "".join(f"\n  {Path(p).name}: {why}" for p, why in skipped.values[:10]))
    if not any(s.scored for s in studies):
        raise PipelineError("no series the model can read in the input (series.csv and the lines above say why)")
    print(f"results in {a.results_dir}/")


if __name__ == "__main__":
    cli_main(main)
