"""The competition metric and the per-class figures people quote.

Weighted multi-label log loss: per image, the weighted mean over the six labels of the binary log
loss (weights 1 for each subtype, 2 for `any`), averaged over images. Probabilities are clipped to
[EPS, 1 - EPS] with EPS = 1e-15, scikit-learn's historical `log_loss` default that Kaggle's scorer used.

`WeightedBCE` is the same metric as a training loss on logits (torch), so the loss the models minimise
is the score they are judged by.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

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
    """ROC AUC per class; NaN for a class with only one label value present."""
    from sklearn.metrics import roc_auc_score  # here: sklearn costs a second or two at the start of every step
    y, p = _check(y, p)
    return np.array([roc_auc_score(y[:, c], p[:, c]) if 0 < y[:, c].sum() < len(y) else np.nan
                     for c in range(y.shape[1])])


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
        w = torch.as_tensor(CLASS_WEIGHTS, dtype=torch.float32, device=device)
        self.w = w / w.sum()

    def __call__(self, logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean over rows (..., 6); with a mask (...,), over the rows it marks (padded series positions are not)."""
        per = (F.binary_cross_entropy_with_logits(logits.float(), y.float(), reduction="none") * self.w).sum(-1)
        if mask is None:
            return per.mean()
        m = mask.to(per.dtype)
        return (per * m).sum() / m.sum().clamp(min=1)
