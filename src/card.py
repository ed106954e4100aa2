"""What a trained run knows about itself, for whoever reads its predictions: the model card.

    from src.card import run_card, card_text
    card_text(run_card(Run("outputs/demo/runs/resnet10t_128")))

The data it was trained on (folder, images, patients, whether it was generated), its folds, and its out-of-fold
figures: those of the blend of its stages (the cross-fitted ones, the honest figures) when src.blend has fitted
one, else stage 1's. src.evaluate writes it to RUN/card.json, so it travels with a copied run folder; the demo,
the page and a bundle show it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from . import layout
from .runs import Run
from .utils import CLASSES, PipelineError


def run_card(run: Run) -> dict:
    """RUN/card.json when src.evaluate wrote one, else what can be read now."""
    p = run.path / layout.CARD
    if p.exists():
        return json.loads(p.read_text())
    return make_card(run)


def make_card(run: Run, report: dict | None = None) -> dict:
    """The card of a stage-1 run; `report` (the summary src.evaluate made of the run and its stages) adds the
    intervals of the figures shown and the scan-level operating point."""
    from .blend import run_blend
    cfg = run.config()
    data_dir, out_dir = cfg.get("data_dir", ""), cfg.get("out_dir", "")
    card = {"run": run.name, "model": cfg.get("model"), "img_size": cfg.get("img_size"), "data_dir": str(data_dir),
            "data": layout.dataset_tag(data_dir) if data_dir else "unknown", "folds": run.finished_folds(),
            "images": None, "patients": None, "synthetic": None, "oof_weighted_log_loss": None, "oof_auc_any": None,
            "stage": "stage 1"}
    try:
        folds = pd.read_csv(layout.run_folds_file(data_dir, cfg["k"], cfg["fold_seed"], cfg.get("folds_file")),
                            usecols=["ID", "PatientID"], dtype=str)
        card["images"], card["patients"] = len(folds), int(folds["PatientID"].nunique())
    except (OSError, ValueError, KeyError):
        pass
    card["prior"] = label_frequencies(data_dir, out_dir)
    summary = layout.cache_files(layout.cache_dir(data_dir, out_dir))["summary"]
    if summary.exists():
        card["synthetic"] = bool(json.loads(summary.read_text()).get("synthetic", False))
    elif data_dir:
        card["synthetic"] = (Path(data_dir) / layout.SYNTHETIC_MARKER).exists() or None
    info = run_blend(run)
    if info is not None and len(info["members"]) > 1:
        best = info["scores"]["blend, cross-fitted"]  # the honest figure: each fold's weights from the other folds
        card["stage"] = "blend of " + ", ".join(m["kind"] for m in info["members"]) + ", per-class weights"
    else:
        best = stage1_scores(run, data_dir, out_dir)
    if best:
        card.update(oof_weighted_log_loss=best["weighted_log_loss"], oof_auc_any=best["auc_any"])
    shown = "blend, cross-fitted" if card["stage"] != "stage 1" else run.name
    if report and shown in report.get("intervals", {}):
        iv = report["intervals"][shown]
        card.update(oof_weighted_log_loss_ci=iv["weighted_log_loss"], oof_auc_any_ci=iv["auc"]["any"],
                    intervals=f"95% intervals over {report['bootstrap']['patients']} patients "
                              f"({report['bootstrap']['resamples']} bootstrap draws)")
    if report and report.get("operating_point"):
        card["operating_point"] = report["operating_point"]
    return card


def label_frequencies(data_dir, out_dir) -> dict | None:
    """Each class's share of the training images (the label file's), or None when it cannot be read."""
    from .labels import cached_labels
    try:
        labels, _ = cached_labels(data_dir, out_dir)
    except (PipelineError, OSError, KeyError):
        return None
    return {c: float(v) for c, v in labels[CLASSES].mean().items()}


def training_prior(card: dict, source) -> np.ndarray:
    """The answer for an image without usable pixels, wherever a file needs a row for every image (test.csv, a
    submission): the model's training label frequencies (the card's `prior`), in CLASSES order. The front ends, which
    answer per series, list such a file as not scored instead (docs/pipeline.md "Images without usable pixels")."""
    prior = card.get("prior")
    if not prior or any(prior.get(c) is None for c in CLASSES):
        raise PipelineError(f"{source}: its model card has no training prior (made by an older version): for a run "
                            f"folder run `python -m src.evaluate RUN`, for a bundle export it again from its run "
                            f"(python -m src.export RUN --overwrite)")
    return np.array([prior[c] for c in CLASSES], dtype=float)


def stage1_scores(run: Run, data_dir, out_dir) -> dict | None:
    """The stage-1 OOF weighted log loss and AUC of `any`, from the run's files (None when they cannot be read)."""
    from .blend import score
    from .labels import cached_labels
    try:
        oof = run.load_oof(quiet=True)
        labels, _ = cached_labels(data_dir, out_dir)
    except (PipelineError, OSError, KeyError):
        return None
    ids = oof.index.intersection(labels.index)
    return score(labels.loc[ids, CLASSES].to_numpy(), oof.loc[ids, CLASSES].to_numpy()) if len(ids) else None


def card_text(card: dict) -> str:
    """One paragraph a person can read next to the model's output."""
    def fmt(v, f="{:.4f}"):
        return "unknown" if v is None or (isinstance(v, float) and np.isnan(v)) else f.format(v)
    def ci(key, f="{:.4f}"):
        v = card.get(key)
        return f" (95% interval {fmt(v[0], f)}-{fmt(v[1], f)})" if v else ""
    s = (f"Trained on '{card.get('data', 'unknown')}' ({card.get('data_dir', '?')}): {fmt(card.get('images'), '{:,}')} "
         f"images of {fmt(card.get('patients'), '{:,}')} patients, {len(card.get('folds') or [])} fold model(s). "
         f"Out of fold ({card.get('stage', 'stage 1')}): weighted log loss {fmt(card.get('oof_weighted_log_loss'))}"
         f"{ci('oof_weighted_log_loss_ci')}, AUC(any) {fmt(card.get('oof_auc_any'), '{:.3f}')}"
         f"{ci('oof_auc_any_ci', '{:.3f}')}.")
    op = card.get("operating_point")
    if op and op.get("threshold") == op.get("threshold"):
        where = (f"scans among the site's {op['site']['scans']} labelled scans it was chosen on "
                 f"({op['site']['date']})" if op.get("source") == "site" else "series out of fold")
        s += (f" Scans: a series is flagged when its highest `any` reaches {op['threshold']:.3f}, which flagged "
              f"{fmt(op.get('sensitivity'), '{:.0%}')} of the bleeding {where} (specificity "
              f"{fmt(op.get('specificity'), '{:.0%}')}).")
    return s
