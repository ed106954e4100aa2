"""The serving side's shared answer: a scored series, its summary and verdict, and the pictures of it.

    from src.serve.results import analyse_study
    studies, skipped = analyse_study(Predictor.load(BUNDLE), ["/path/to/study/"])   # one StudyResult per study

`analyse_study` lets the series selector (src/serve/selector.py) choose, per study, the series the model can read,
runs a `Predictor` over them, and returns per study every series (scored or not, and why), the scored series and the
study's verdict. Each scored series (`SeriesResult`) has its per-slice table, the brain window of each slice,
Grad-CAM maps of the most suspicious slices and its summary (`summarise`): per type the highest slice probability
and the slices at or above the verdict's threshold, and the verdict itself, given at the operating point the run's
report chose out of fold, or the site's own one in a site copy of a bundle (src.serve.validate; `verdict_threshold`). `analyse` scores every readable series, no selector. `model_notes` is what a reader must know
about the model first (the generated-data warning, the model card, the research-use disclaimer). The demo CLI, the
page, the DICOM node and its DICOM writer all take their answer from here, so the four cannot disagree.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..card import card_text  # noqa: E402
from ..predictor import Predictor  # noqa: E402
from ..utils import CLASSES, atomic_path  # noqa: E402
from .selector import SeriesRules, select  # noqa: E402

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
    """(threshold, how it was chosen): a site's own operating point when src.serve.validate wrote one into the card
    (a site copy of a bundle), else the one src.evaluate chose out of fold for a stated scan-level sensitivity, else
    0.5."""
    op = (card or {}).get("operating_point") or {}
    t = op.get("threshold")
    if t is not None and t == t and op.get("source") == "site":
        s = op["site"]
        return float(t), (f"the site's operating point, chosen on {s['scans']} of its own labelled scans "
                          f"({s['positive']} bleeding; labels {s['labels']}, {s['date']}) to flag "
                          f"{op['target_sensitivity']:.0%} of bleeding scans (specificity there {op['specificity']:.0%})")
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


@dataclass
class StudyResult:
    study: str                        # StudyInstanceUID
    series: pd.DataFrame              # every series of the study, scored or not, and why (selector.SERIES_COLUMNS)
    scored: list[SeriesResult]        # the series scored: the one closest to the training data, or every eligible one
    summary: dict                     # the study's verdict (from the scored series), threshold, and every series listed


def analyse_study(p: Predictor, files, cam_slices: int | None = 4, progress=False, rules: SeriesRules | None = None,
                  all_series: bool | None = None) -> tuple[list[StudyResult], pd.DataFrame]:
    """(one StudyResult per study in the files, DataFrame of files that gave no slice with their reasons): the series
    selector (`rules`, default configs/serve/series_rules.yaml) chooses what is scored, from the headers alone."""
    rules = rules or SeriesRules.load()
    a = p.analyse(files, progress, select=lambda heads: select(heads, rules, all_series))
    by_series = {r.series: r for r in series_results(p, a, cam_slices)}
    studies = []
    for study, listing in a.series.groupby("StudyInstanceUID", sort=False):
        listing = listing.reset_index(drop=True)
        for i in listing.index[listing.scored & ~listing.SeriesInstanceUID.isin(list(by_series))]:
            listing.loc[i, ["scored", "reason"]] = False, "no slice of it could be decoded (the files are listed as skipped)"
        scored = [by_series[s] for s in listing.loc[listing.scored, "SeriesInstanceUID"]]
        for r in scored:
            r.summary["selection_notes"] = listing.loc[listing.SeriesInstanceUID == r.series, "notes"].iloc[0]
        studies.append(StudyResult(str(study), listing, scored, study_summary(str(study), listing, scored, p.card, rules)))
    return studies, a.skipped


def study_summary(study: str, listing: pd.DataFrame, scored: list[SeriesResult], card: dict, rules: SeriesRules) -> dict:
    """The study's answer: flagged when a scored series is; "not scored" when no series could be."""
    t, how = verdict_threshold(card)
    if scored:
        verdict = "suspected hemorrhage" if any(r.summary["verdict"] == "suspected hemorrhage" for r in scored) \
            else "no hemorrhage found"
    else:
        verdict = "not scored: no series of this study is one the model can read (see the reasons)"
    return {"study": study, "verdict": verdict, "threshold": t, "threshold_from": how,
            "scored_series": [r.series for r in scored], "series_rules": rules.source,
            "series": listing.to_dict(orient="records"), "model": card or {}, "notes": model_notes(card or {})}


def analyse(p: Predictor, files, cam_slices: int | None = 4, progress=False):
    """(list of SeriesResult, DataFrame of skipped files with reasons): every readable series, no selector."""
    a = p.analyse(files, progress)
    return series_results(p, a, cam_slices), a.skipped


def series_results(p: Predictor, a, cam_slices: int | None = 4) -> list[SeriesResult]:
    """One SeriesResult per series of an analysis' table, with Grad-CAM maps of its most suspicious slices."""
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
    return results


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
    ax.set_ylim(-0.02, 1.02), ax.set_ylabel("probability")
    ax.set_xlabel("slice (ordered along the slice normal; axial: inferior to superior)")
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
