"""Out-of-fold evaluation report of one or more runs, with the prior baseline side by side.

    python -m src.evaluate outputs/demo/runs/resnet10t_128                       # report in RUN/report/
    python -m src.evaluate outputs/demo/runs/resnet10t_128 outputs/demo/runs/seq_resnet10t_128 --out outputs/demo/report

Joins every fold's oof.csv of each run and writes: summary.json (for scripts), report.md (a table for
people), roc.png (ROC per class), calibration.png (reliability per class) and loss_curves.png (train
and validation loss per fold, from each fold's epochs.csv). The prior baseline gives every image the
label frequencies of its training folds: a model must beat it to have learnt anything.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from .labels import read_labels  # noqa: E402
from .metrics import report  # noqa: E402
from .utils import CLASSES, PipelineError, atomic_path, atomic_write, cli_main, write_json  # noqa: E402


def fold_dirs(run_dir: Path) -> list[Path]:
    dirs = sorted(p for p in Path(run_dir).glob("fold*") if p.is_dir())
    if not dirs:
        raise PipelineError(f"no fold directories in {run_dir}")
    return dirs


def load_oof(run_dir) -> pd.DataFrame:
    """All folds' OOF predictions of a run: index ID, columns fold + six classes."""
    run_dir = Path(run_dir)
    parts, unfinished = [], []
    for d in fold_dirs(run_dir):
        if (d / "oof.csv").exists():
            parts.append(pd.read_csv(d / "oof.csv", dtype={"ID": str}).set_index("ID"))
        else:
            unfinished.append(d.name)
    if not parts:
        raise PipelineError(f"no finished fold in {run_dir} (no fold*/oof.csv)")
    if unfinished:
        print(f"note: {run_dir.name}: {', '.join(unfinished)} not finished; evaluating the others")
    oof = pd.concat(parts)
    if oof.index.duplicated().any():
        raise PipelineError(f"{run_dir}: an image appears in two folds' OOF files, e.g. {oof.index[oof.index.duplicated()][:3].tolist()}")
    return oof


def run_config(run_dir) -> dict:
    cfg_path = fold_dirs(Path(run_dir))[0] / "config.yaml"
    return yaml.safe_load(cfg_path.read_text()) if cfg_path.exists() else {}


def prior_predictions(labels: pd.DataFrame, folds: pd.Series) -> np.ndarray:
    """Each image gets the label frequencies of the labelled images outside its fold (its training data)."""
    out = np.zeros((len(folds), len(CLASSES)))
    for f in np.unique(folds):
        train_rate = labels.drop(index=folds.index[folds == f])[CLASSES].mean().to_numpy()
        out[(folds == f).to_numpy()] = train_rate
    return out


def evaluate_runs(run_dirs, out_dir, labels_path=None) -> dict:
    run_dirs = [Path(r) for r in run_dirs]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if labels_path is None:
        data_dir = run_config(run_dirs[0]).get("data_dir")
        if not data_dir:
            raise PipelineError("cannot tell the data folder from the run's config.yaml; pass --labels stage_2_train.csv")
        labels_path = Path(data_dir) / "stage_2_train.csv"
    labels = read_labels(labels_path)

    results, oofs = {}, {}
    for r in run_dirs:
        oof = load_oof(r)
        missing = oof.index.difference(labels.index)
        if len(missing):
            raise PipelineError(f"{r}: {len(missing)} OOF ID(s) have no labels, e.g. {list(missing[:3])}")
        y = labels.loc[oof.index, CLASSES].to_numpy()
        results[r.name] = report(y, oof[CLASSES].to_numpy())
        results[r.name]["folds"] = sorted(int(f) for f in oof["fold"].unique())
        oofs[r.name] = oof
    first = oofs[run_dirs[0].name]
    y0 = labels.loc[first.index, CLASSES].to_numpy()
    prior = report(y0, prior_predictions(labels, first["fold"]))
    summary = {"runs": results, "prior": prior,
               "ratio_to_prior": {k: v["weighted_log_loss"] / prior["weighted_log_loss"] for k, v in results.items()}}
    if len(run_dirs) > 1:
        base = results[run_dirs[0].name]["weighted_log_loss"]
        summary["ratio_to_first"] = {k: v["weighted_log_loss"] / base for k, v in results.items()}
    write_json(summary, out_dir / "summary.json")
    write_markdown(summary, out_dir / "report.md")
    plot_roc(oofs, labels, out_dir / "roc.png")
    plot_calibration(oofs, labels, out_dir / "calibration.png")
    plot_loss_curves(run_dirs, out_dir / "loss_curves.png")
    return summary


def write_markdown(summary: dict, path):
    names = list(summary["runs"])
    cols = names + ["prior"]
    get = lambda n: summary["prior"] if n == "prior" else summary["runs"][n]  # noqa: E731
    lines = ["# Out-of-fold evaluation", "",
             f"Images: {get(names[0])['n_images']}. Metric: weighted multi-label log loss (any x2). "
             "Prior = training-fold label frequencies for every image.", "",
             "| | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols),
             "| **weighted log loss** | " + " | ".join(f"**{get(n)['weighted_log_loss']:.4f}**" for n in cols) + " |",
             "| ratio to prior | " + " | ".join(f"{summary['ratio_to_prior'].get(n, 1.0):.3f}" for n in cols) + " |"]
    if "ratio_to_first" in summary:
        lines.append("| ratio to first run | " + " | ".join(f"{summary['ratio_to_first'].get(n, float('nan')):.3f}" for n in names) + " | |")
    lines.append("| mean AUC | " + " | ".join(f"{get(n)['mean_auc']:.4f}" for n in cols) + " |")
    for c in CLASSES:
        lines.append(f"| {c}: log loss / AUC / acc@0.5 | " + " | ".join(
            f"{get(n)['per_class'][c]['log_loss']:.4f} / {get(n)['per_class'][c]['auc']:.3f} / {get(n)['per_class'][c]['accuracy']:.3f}"
            for n in cols) + " |")
    lines += ["", "Plots: roc.png, calibration.png, loss_curves.png", ""]
    with atomic_write(path) as f:
        f.write("\n".join(lines))


def _save(fig, path):
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)


def _legend(axes):
    for ax in axes.ravel():  # the first panel that has labelled lines (a class may have no positives)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
            return


def plot_roc(oofs: dict, labels, path):
    fig, axes = plt.subplots(2, 3, figsize=(12, 7.5))
    for ax, c in zip(axes.ravel(), CLASSES):
        for name, oof in oofs.items():
            y = labels.loc[oof.index, c].to_numpy()
            if 0 < y.sum() < len(y):
                fpr, tpr, _ = roc_curve(y, oof[c])
                ax.plot(fpr, tpr, label=name)
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set_title(c if ax.lines[:-1] else f"{c} (no positives)"), ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
    _legend(axes)
    fig.suptitle("ROC per class (out of fold)")
    _save(fig, path)


def plot_calibration(oofs: dict, labels, path, bins=10):
    fig, axes = plt.subplots(2, 3, figsize=(12, 7.5))
    edges = np.linspace(0, 1, bins + 1)
    for ax, c in zip(axes.ravel(), CLASSES):
        for name, oof in oofs.items():
            p, y = oof[c].to_numpy(), labels.loc[oof.index, c].to_numpy()
            b = np.clip(np.digitize(p, edges) - 1, 0, bins - 1)
            keep = [i for i in range(bins) if (b == i).any()]
            ax.plot([p[b == i].mean() for i in keep], [y[b == i].mean() for i in keep], "o-", label=name, ms=3)
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set_title(c), ax.set_xlabel("predicted probability"), ax.set_ylabel("observed frequency")
    _legend(axes)
    fig.suptitle("Calibration (reliability) per class, 10 bins")
    _save(fig, path)


def plot_loss_curves(run_dirs, path):
    fig, axes = plt.subplots(1, len(run_dirs), figsize=(6 * len(run_dirs), 4), squeeze=False)
    for ax, r in zip(axes[0], run_dirs):
        for d in fold_dirs(r):
            if (d / "epochs.csv").exists():
                e = pd.read_csv(d / "epochs.csv")
                line, = ax.plot(e["epoch"], e["train_loss"], "--", alpha=0.7)
                ax.plot(e["epoch"], e["val_wll"], "-", color=line.get_color(), label=f"{d.name} val")
        ax.set_title(f"{r.name}: train (dashed) / validation (solid)"), ax.set_xlabel("epoch")
        ax.set_ylabel("weighted log loss (log scale)"), ax.set_yscale("log")  # early spikes would flatten the rest
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    _save(fig, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories (each holding fold*/oof.csv)")
    ap.add_argument("--out", default=None, help="report folder (default: FIRST_RUN/report)")
    ap.add_argument("--labels", default=None, help="stage_2_train.csv (default: from the run's config.yaml)")
    a = ap.parse_args()
    out = Path(a.out) if a.out else Path(a.runs[0]) / "report"
    s = evaluate_runs(a.runs, out, a.labels)
    print((out / "report.md").read_text())
    print(f"report: {out}")
    return s


if __name__ == "__main__":
    cli_main(main)
