"""Honest figures: 95% intervals from a bootstrap over patients, and the scan-level operating point.

A figure on a few hundred real images moves with a seed; read without its spread it misleads. src.evaluate asks
this module, for every member of a report (and the blend): the weighted log loss, its ratio to the prior, the
AUC per class, each with the central 95% of `resamples` bootstrap draws over patients (a draw takes as many
patients as there are, with replacement, each with all their slices; the same draws for every member, so their
intervals are comparable). Patients, not slices, are resampled: a patient's slices are near-copies of each other,
and resampling slices would make the intervals several times too narrow.

Clinicians read scans, not slices. The series-level figures take each series' highest `any` as its score and
whether any of its slices bleeds as its label: the AUC of that score, and the sensitivity and specificity at the
operating point, the highest threshold that flags at least `sensitivity` (0.95) of the bleeding series out of fold.
The demo, its page and the DICOM node say "suspected hemorrhage" above that threshold, and state it.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .metrics import EPS, auc_weighted, binary_log_loss, interval, operating_point, sens_spec, series_level
from .utils import CLASS_WEIGHTS, CLASSES

RESAMPLES = 200       # enough for a 95% interval to two digits; each costs six AUCs per member
SENSITIVITY = 0.95    # the share of bleeding series the operating point must flag


class Draws:
    """`resamples` bootstrap draws over patients: per draw, how often each patient was drawn (the same draws for
    every member, so their intervals are comparable). `weights(patients)` turns them into per-row weights."""

    def __init__(self, patients, resamples: int, seed: int):
        self.index = pd.Index(sorted(pd.Series(patients).dropna().unique()))
        rng = np.random.default_rng(seed)
        n = len(self.index)
        self.counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(resamples)]) \
            if n else np.zeros((resamples, 0), int)

    def weights(self, patients) -> np.ndarray:
        """(draws, rows): each row weighs as often as its patient was drawn (0 for an unknown patient)."""
        codes = self.index.get_indexer(pd.Series(patients))
        padded = np.concatenate([self.counts, np.zeros((len(self.counts), 1), int)], axis=1)
        return padded[:, np.where(codes < 0, len(self.index), codes)].astype(float)


def member_intervals(y: np.ndarray, p: np.ndarray, prior: np.ndarray, weights: np.ndarray) -> dict:
    """95% intervals of one member's figures over the draws (weights: (draws, rows)): weighted log loss, ratio to
    the prior, AUC per class."""
    w_cls = CLASS_WEIGHTS / CLASS_WEIGHTS.sum()
    loss = binary_log_loss(y, np.clip(p, EPS, 1 - EPS)) @ w_cls  # per image: the metric's summand
    loss0 = binary_log_loss(y, np.clip(prior, EPS, 1 - EPS)) @ w_cls
    keep = weights.sum(1) > 0
    weights = weights[keep]
    total = weights.sum(1)
    wll, ratio = weights @ loss / total, (weights @ loss) / (weights @ loss0)
    auc = {}
    for c, name in enumerate(CLASSES):
        order = np.argsort(p[:, c], kind="stable")
        auc[name] = interval([auc_weighted(y[:, c], p[:, c], w, order) for w in weights])
    return {"weighted_log_loss": interval(wll), "ratio_to_prior": interval(ratio), "auc": auc}


def series_figures(table: pd.DataFrame, draws: Draws, target: float = SENSITIVITY) -> dict:
    """Series-level AUC of the highest `any`, and the operating point with its sensitivity and specificity, with
    intervals. table: per image ID, patient, series, y (label of `any`), p (predicted `any`)."""
    s = series_level(table.index, table["patient"], table["series"], table["y"], table["p"])
    y, p = s["y"].to_numpy(float), s["p"].to_numpy(float)
    t = operating_point(y, p, target)
    sens, spec = sens_spec(y, p, t)
    order = np.argsort(p, kind="stable")
    aucs, senses, specs = [], [], []
    for w in draws.weights(s["patient"]):
        aucs.append(auc_weighted(y, p, w, order))
        a, b = sens_spec(y, p, t, w)
        senses.append(a), specs.append(b)
    return {"series": len(s), "positive": int(y.sum()), "auc": auc_weighted(y, p, None, order), "auc_ci": interval(aucs),
            "target_sensitivity": target, "threshold": t, "sensitivity": sens, "sensitivity_ci": interval(senses),
            "specificity": spec, "specificity_ci": interval(specs)}


def uncertainty(oofs: dict, labels: pd.DataFrame, meta: pd.DataFrame, priors: dict, resamples: int = RESAMPLES,
                seed: int = 0) -> dict:
    """Intervals of every member (name -> OOF table with the six classes, index ID) and its series-level figures.
    meta: PatientID and SeriesInstanceUID by image ID; priors: name -> the prior's predictions on its rows."""
    patients_all = meta["PatientID"]
    draws = Draws(patients_all.reindex(pd.Index(set().union(*[o.index for o in oofs.values()]))), resamples, seed)
    out = {"bootstrap": {"resamples": resamples, "over": "patients", "seed": seed,
                         "patients": int(patients_all.reindex(next(iter(oofs.values())).index).nunique())},
           "members": {}, "series": {}}
    for name, oof in oofs.items():
        ids = oof.index
        y = labels.loc[ids, CLASSES].to_numpy(float)
        p = oof[CLASSES].to_numpy(float)
        pat = patients_all.reindex(ids).to_numpy()
        out["members"][name] = member_intervals(y, p, priors[name], draws.weights(pat))
        table = pd.DataFrame({"patient": pat, "series": meta["SeriesInstanceUID"].reindex(ids).to_numpy(),
                              "y": y[:, -1], "p": p[:, -1]}, index=ids).dropna(subset=["series"])
        out["series"][name] = series_figures(table, draws)
    return out
