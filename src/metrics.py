"""The competition metric and the per-class figures people quote.

Weighted multi-label log loss: per image, the weighted mean over the six labels of the binary log
loss (weights 1 for each subtype, 2 for `any`), averaged over images. Probabilities are clipped to
[EPS, 1 - EPS] with EPS = 1e-15, scikit-learn's historical `log_loss` default that Kaggle's scorer used.

`WeightedBCE` is the same metric as a training loss on logits (torch), so the loss the models minimise
is the score they are judged by.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .utils import CLASS_WEIGHTS, CLASSES, PipelineError

EPS = 1e-15


def _check(y, p):
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    if y.shape != p.shape or y.ndim != 2 or y.shape[1] != len(CLASSES):
        raise PipelineError(f"labels {y.shape} and predictions {p.shape} must both be (N, {len(CLASSES)})")
    if np.isnan(p).any():
        raise PipelineError(f"{int(np.isnan(p).sum())} NaN prediction(s)")
    return y, np.clip(p, EPS, 1 - EPS)


def binary_log_loss(y, p) -> np.ndarray:
    """Element-wise binary log loss of probabilities (already clipped)."""
    return -(y * np.log(p) + (1 - y) * np.log1p(-p))


def per_class_log_loss(y, p) -> np.ndarray:
    y, p = _check(y, p)
    return binary_log_loss(y, p).mean(axis=0)


def weighted_log_loss(y, p, weights=CLASS_WEIGHTS) -> float:
    """The competition metric. y, p: (N, 6) in Kaggle's class order."""
    y, p = _check(y, p)
    w = np.asarray(weights, dtype=np.float64)
    return float((binary_log_loss(y, p) @ w / w.sum()).mean())


def per_class_auc(y, p) -> np.ndarray:
    """ROC AUC per class (auc_weighted: scikit-learn's roc_auc_score, tested equal, without its 2 s import); NaN for
    a class with only one label value present."""
    y, p = _check(y, p)
    return np.array([auc_weighted(y[:, c], p[:, c]) for c in range(y.shape[1])])


def per_class_accuracy(y, p, threshold=0.5) -> np.ndarray:
    y, p = _check(y, p)
    return ((p >= threshold) == (y >= 0.5)).mean(axis=0)


def report(y, p) -> dict:
    """All figures for one set of predictions, as plain floats (NaN where undefined)."""
    ll, auc, acc = per_class_log_loss(y, p), per_class_auc(y, p), per_class_accuracy(y, p)
    return {"weighted_log_loss": weighted_log_loss(y, p), "n_images": int(len(y)),
            "per_class": {c: {"log_loss": float(ll[i]), "auc": float(auc[i]), "accuracy": float(acc[i]),
                              "positives": int(np.asarray(y)[:, i].sum())} for i, c in enumerate(CLASSES)},
            "mean_auc": float(np.nanmean(auc)) if not np.isnan(auc).all() else float("nan"),
            "accuracy_any": float(acc[-1])}


class WeightedBCE:
    """BCE-with-logits weighted like the metric (any = 2), on (N, 6) logits and labels.

    The weights are built once, on the loss's device (not from numpy on every step: a host-to-device copy
    per step)."""

    def __init__(self, device="cpu"):
        import torch  # here: the steps that only score predictions (reports, blends) start sooner without torch
        w = torch.as_tensor(CLASS_WEIGHTS, dtype=torch.float32, device=device)
        self.w = w / w.sum()

    def __call__(self, logits, y, mask=None):
        """Mean over rows (..., 6); with a mask (...,), over the rows it marks (padded series positions are not)."""
        import torch.nn.functional as F
        per = (F.binary_cross_entropy_with_logits(logits.float(), y.float(), reduction="none") * self.w).sum(-1)
        if mask is None:
            return per.mean()
        m = mask.to(per.dtype)
        return (per * m).sum() / m.sum().clamp(min=1)


# ---------------------------------------------------------------- intervals over patients
def auc_weighted(y: np.ndarray, p: np.ndarray, w: np.ndarray | None = None, order=None) -> float:
    """ROC AUC with a weight per row (a bootstrap's multiplicities), ties counted half as the Mann-Whitney statistic
    counts them; equal to sklearn's roc_auc_score with sample_weight. `order` (argsort of p) may be given once for
    many weightings. NaN when one label value has no weight."""
    order = np.argsort(p, kind="stable") if order is None else order
    ps, ys = p[order], y[order] > 0.5
    ws = np.ones(len(p)) if w is None else np.asarray(w, float)[order]
    start = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])  # groups of equal scores
    pos = np.add.reduceat(ws * ys, start) if len(ps) else np.zeros(0)
    neg = np.add.reduceat(ws * ~ys, start) if len(ps) else np.zeros(0)
    total_pos, total_neg = pos.sum(), neg.sum()
    if total_pos <= 0 or total_neg <= 0:
        return float("nan")
    below = np.cumsum(neg) - neg
    return float((pos * (below + 0.5 * neg)).sum() / (total_pos * total_neg))


def interval(values, level: float = 0.95) -> list[float]:
    """The central `level` percentile interval of bootstrap values (NaN ones left out)."""
    v = np.asarray([x for x in values if x == x], float)
    if not len(v):
        return [float("nan"), float("nan")]
    a = (1 - level) / 2
    return [float(np.quantile(v, a)), float(np.quantile(v, 1 - a))]


def series_level(ids, groups, series, y_any, p_any) -> pd.DataFrame:
    """One row per series: its patient, whether any of its slices bleeds, and its highest predicted `any`."""
    df = pd.DataFrame({"ID": ids, "patient": groups, "series": series, "y": y_any, "p": p_any})
    return df.groupby("series").agg(patient=("patient", "first"), y=("y", "max"), p=("p", "max"))


def operating_point(y: np.ndarray, p: np.ndarray, sensitivity: float = 0.95) -> float:
    """The highest threshold whose sensitivity (share of positive series with score >= it) is at least
    `sensitivity`; NaN without a positive series."""
    pos = np.sort(p[y > 0.5])[::-1]
    if not len(pos):
        return float("nan")
    # the k-th highest positive score keeps k+1 positives above it; rounded first, as 0.55 * 100 is 55.000000000000007
    # in floating point, whose ceiling would ask for one positive more than the target needs
    k = int(np.ceil(round(sensitivity * len(pos), 9))) - 1
    return float(pos[min(max(k, 0), len(pos) - 1)])


def sens_spec(y, p, t, w=None) -> tuple[float, float]:
    w = np.ones(len(y)) if w is None else w
    pos, neg = y > 0.5, y <= 0.5
    sens = (w * (pos & (p >= t))).sum() / (w * pos).sum() if (w * pos).sum() > 0 else float("nan")
    spec = (w * (neg & (p < t))).sum() / (w * neg).sum() if (w * neg).sum() > 0 else float("nan")
    return float(sens), float(spec)
