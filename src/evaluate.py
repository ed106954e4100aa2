"""Out-of-fold evaluation report of one or more runs, with the prior baseline side by side.

    python -m src.evaluate outputs/demo/runs/resnet10t_128                       # report in RUN/report/
    python -m src.evaluate outputs/demo/runs/resnet10t_128 outputs/demo/runs/seq_resnet10t_128 \
        outputs/demo/runs/boost_resnet10t_128 --report-dir outputs/demo/report/resnet10t_128

Joins every fold's oof.csv of each run and, given several runs, their blend (weights fitted on the OOF
predictions, as src.ensemble fits them), and writes: summary.json (for scripts), report.md (a table for
people, every member and the blend side by side), roc.png (ROC per class), calibration.png (reliability per class) and loss_curves.png (train
and validation loss per fold, from each fold's epochs.csv). The prior baseline gives every image the
label frequencies of its training folds: a model must beat it to have learnt anything (its AUC is
undefined, "-": it is constant within a fold). The report's summary.json records the fingerprints of the
runs it describes; a rerun with the same runs is skipped, with changed runs it is written again. A stage-1
run's report also writes RUN/card.json: what the run was trained on and how well it did, which the demo shows.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from . import runs  # noqa: E402
from .config import parse_config, positional  # noqa: E402
from .ensemble import blend, blend_oof, cross_fitted  # noqa: E402
from .labels import read_labels  # noqa: E402
from .metrics import report  # noqa: E402
from .utils import CLASSES, PipelineError, atomic_path, atomic_write, cli_main, write_json  # noqa: E402


def prior_predictions(labels: pd.DataFrame, folds: pd.Series) -> np.ndarray:
    """Each image gets the label frequencies of the labelled images outside its fold (its training data)."""
    out = np.zeros((len(folds), len(CLASSES)))
    for f in np.unique(folds):
        train_rate = labels.drop(index=folds.index[folds == f])[CLASSES].mean().to_numpy()
        out[(folds == f).to_numpy()] = train_rate
    return out


def evaluate_runs(run_dirs, out_dir, labels_path=None, quiet=False) -> dict:
    run_list = [runs.Run(r) for r in run_dirs]
    out_dir = Path(out_dir)
    stamp = runs.Stamp("evaluate", {"labels": str(labels_path or "")},
                       {r.name: r.fingerprint(with_test=False) for r in run_list})
    old = runs.Stamp.load(out_dir / "summary.json")
    if old and old.id == stamp.id and (out_dir / "report.md").exists():
        if not quiet:
            runs.announce_skip(f"report {out_dir}")
        return json.loads((out_dir / "summary.json").read_text())
    labels = read_labels(labels_path) if labels_path else runs.labels(*run_list[0].data())[0]

    results, oofs = {}, {}
    for r in run_list:
        oof = r.load_oof()
        missing = oof.index.difference(labels.index)
        if len(missing):
            raise PipelineError(f"{r.path}: {len(missing)} OOF ID(s) have no labels, e.g. {list(missing[:3])}")
        y = labels.loc[oof.index, CLASSES].to_numpy()
        results[r.name] = report(y, oof[CLASSES].to_numpy())
        results[r.name]["folds"] = sorted(int(f) for f in oof["fold"].unique())
        oofs[r.name] = oof
    if len(run_list) > 1:  # the members' blend, with the ensembler's OOF-fitted weights, as one more column
        common, y, preds, w, folds = blend_oof(list(oofs.values()), labels)  # per class, as src.ensemble fits them
        mixed = blend(preds, w)
        results["blend"] = {**report(y, mixed), "weights": {n: w[:, i].tolist() for i, n in enumerate(oofs)}}
        results["blend, cross-fitted"] = report(y, cross_fitted(y, preds, folds))  # weights fitted on the other folds
        oofs["blend"] = pd.DataFrame(mixed, index=common, columns=CLASSES)
    first = oofs[run_list[0].name]
    y0 = labels.loc[first.index, CLASSES].to_numpy()
    prior = report(y0, prior_predictions(labels, first["fold"]))
    prior["mean_auc"] = float("nan")  # constant within a fold: no ranking, no AUC
    for c in CLASSES:
        prior["per_class"][c]["auc"] = float("nan")
    summary = {"runs": results, "prior": prior,
               "ratio_to_prior": {k: v["weighted_log_loss"] / prior["weighted_log_loss"] for k, v in results.items()},
               "stamp": stamp.to_dict()}
    if len(run_list) > 1:
        base = results[run_list[0].name]["weighted_log_loss"]
        summary["ratio_to_first"] = {k: v["weighted_log_loss"] / base for k, v in results.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_roc(oofs, labels, out_dir / "roc.png")
    plot_calibration(oofs, labels, out_dir / "calibration.png")
    plot_loss_curves(run_list, out_dir / "loss_curves.png")
    if "blend" in results:
        summary["blend_weights"] = results["blend"]["weights"]
        print("blend weights per class (" + "/".join(c[:3] for c in CLASSES) + "), fitted on the OOF predictions: "
              + "; ".join(f"{n} " + "/".join(f"{x:.2f}" for x in v) for n, v in summary["blend_weights"].items()))
    write_markdown(summary, out_dir / "report.md")
    write_json(summary, out_dir / "summary.json")
    for r in run_list:  # a stage-1 run carries what it was trained on and how well it did
        if "stage1" not in r.config():
            write_json(runs.make_card(r), r.path / runs.CARD)
    return summary


def write_markdown(summary: dict, path):
    names = list(summary["runs"])
    cols = names + ["prior"]
    get = lambda n: summary["prior"] if n == "prior" else summary["runs"][n]  # noqa: E731
    lines = ["# Out-of-fold evaluation", "",
             f"Images: {get(names[0])['n_images']}. Metric: weighted multi-label log loss (any x2). "
             "Prior = training-fold label frequencies for every image." + (
                 " Blend = the members mixed with per-class weights fitted on these OOF predictions; "
                 "cross-fitted = each fold mixed with weights fitted on the other folds (the honest figure)."
                 if "blend" in summary["runs"] else ""), "",
             "| | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols),
             "| **weighted log loss** | " + " | ".join(f"**{get(n)['weighted_log_loss']:.4f}**" for n in cols) + " |",
             "| ratio to prior | " + " | ".join(f"{summary['ratio_to_prior'].get(n, 1.0):.3f}" for n in cols) + " |"]
    if "blend_weights" in summary:
        members = list(summary["blend_weights"])
        lines.append("| weights in the blend, per class (" + " / ".join(c[:3] for c in CLASSES) + ") | "
                     + " | ".join(" / ".join(f"{x:.2f}" for x in summary["blend_weights"][n]) for n in members)
                     + " |" + " |" * (len(cols) - len(members)))
    if "ratio_to_first" in summary:
        lines.append("| ratio to first run | " + " | ".join(f"{summary['ratio_to_first'].get(n, float('nan')):.3f}" for n in names) + " | |")
    lines.append("| mean AUC | " + " | ".join(_num(get(n)["mean_auc"], "{:.4f}") for n in cols) + " |")
    for c in CLASSES:
        lines.append(f"| {c}: log loss / AUC / acc@0.5 | " + " | ".join(
            f"{get(n)['per_class'][c]['log_loss']:.4f} / {_num(get(n)['per_class'][c]['auc'], '{:.3f}')} / "
            f"{get(n)['per_class'][c]['accuracy']:.3f}" for n in cols) + " |")
    lines += ["", "Plots: roc.png, calibration.png, loss_curves.png", ""]
    with atomic_write(path) as f:
        f.write("\n".join(lines))


def _num(v, fmt) -> str:
    return "-" if v is None or v != v else fmt.format(v)


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


def plot_loss_curves(run_list, path):
    fig, axes = plt.subplots(1, len(run_list), figsize=(6 * len(run_list), 4), squeeze=False)
    for ax, r in zip(axes[0], run_list):
        for k in r.folds():
            e_csv = r.fold_dir(k) / runs.EPOCHS
            if e_csv.exists():
                e = pd.read_csv(e_csv)
                line, = ax.plot(e["epoch"], e["train_loss"], "--", alpha=0.7)
                ax.plot(e["epoch"], e["val_wll"], "-", color=line.get_color(), label=f"fold{k} val")
        ax.set_title(f"{r.name}: train (dashed) / validation (solid)"), ax.set_xlabel("epoch")
        ax.set_ylabel("weighted log loss (log scale)"), ax.set_yscale("log")  # early spikes would flatten the rest
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    _save(fig, path)


@dataclass
class EvalConfig:
    runs: list[str] = positional(nargs="+")  # run folders (each holding fold*/oof.csv)
    report_dir: str = ""              # where the report goes (default: FIRST_RUN/report)
    labels: str = ""                  # stage_2_train.csv (default: the runs' data folder, via its parsed copy)


def main():
    a = parse_config(EvalConfig, description=__doc__, prog="python -m src.evaluate")
    out = Path(a.report_dir) if a.report_dir else Path(a.runs[0]) / "report"
    s = evaluate_runs(a.runs, out, a.labels or None)
    if (out / "report.md").exists():
        print((out / "report.md").read_text())
    print(f"report: {out}")
    return s


if __name__ == "__main__":
    cli_main(main)
