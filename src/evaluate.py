"""Out-of-fold evaluation report of one or more runs, with the prior baseline side by side.

    python -m src.evaluate outputs/demo/runs/resnet10t_128          # the run, its stage-2 runs and their blend
    python -m src.evaluate RUN_A RUN_B --blend ab --report-dir reports/ab
    python -m src.evaluate RUN --stage1-only

Members: the runs given, a stage-1 run followed by its stage-2 runs unless --stage1-only (as src.blend takes them).
Their blend is shown when src.blend has fitted one for exactly these members and it is up to date (a stage-1 run's
own stages: the blend named after the run; others: --blend NAME); the report never fits weights, it shows the
file's, applied to the OOF predictions, and the cross-fitted figure (each fold mixed with weights fitted on the
other folds: the honest one).

Writes into OUT/report/<first run>/ (or --report-dir): summary.json (for scripts), report.md (a table for people,
every member and the blend side by side), roc.png (ROC per class), calibration.png (reliability per class) and
loss_curves.png (train and validation loss per fold, from each fold's epochs.csv). The prior baseline gives every
image the label frequencies of its training folds: a model must beat it to have learnt anything (its AUC is
undefined, "-": it is constant within a fold). A report is a view: its stamp holds its members' and its blend's
fingerprints, and it is written again whenever they change. A stage-1 run's report also writes RUN/card.json
(src.card): what the run was trained on and how well it did, which the demo shows.
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

from . import layout  # noqa: E402
from .blend import blend, current_blend, default_name, members, oof_table, weight_matrix  # noqa: E402
from .card import make_card  # noqa: E402
from .intervals import RESAMPLES, uncertainty  # noqa: E402
from .config import parse_config, positional  # noqa: E402
from .labels import cached_labels, read_labels  # noqa: E402
from .metrics import report  # noqa: E402
from .cache import load_cache  # noqa: E402
from .stamps import Stamp, file_fingerprint, guard  # noqa: E402
from .utils import CLASSES, PipelineError, atomic_path, atomic_write, cli_main, write_json  # noqa: E402


def prior_predictions(labels: pd.DataFrame, folds: pd.Series) -> np.ndarray:
    """Each image gets the label frequencies of the labelled images outside its fold (its training data)."""
    out = np.zeros((len(folds), len(CLASSES)))
    for f in np.unique(folds):
        train_rate = labels.drop(index=folds.index[folds == f])[CLASSES].mean().to_numpy()
        out[(folds == f).to_numpy()] = train_rate
    return out


def shown_blend(run_list, blend_name=None) -> tuple[dict | None, Path | None]:
    """The up-to-date blend file of exactly these members (by --blend NAME, else a stage-1 run's own), or None."""
    if len(run_list) < 2:
        return None, None
    try:
        name = blend_name or default_name(run_list)
    except PipelineError:
        return None, None
    info = current_blend(run_list, name)
    return (info, layout.blend_file(layout.run_out_root(run_list[0].path), name)) if info else (None, None)


def evaluate_runs(run_dirs, out_dir=None, labels_path=None, quiet=False, blend_name=None, stage1_only=True,
                  resamples: int = RESAMPLES) -> dict:
    """The report of the runs (each one as given unless stage1_only is False: then a stage-1 run brings its
    stage-2 runs); returns summary.json's content."""
    run_list = members(run_dirs, stage1_only)
    out_dir = Path(out_dir) if out_dir else layout.report_dir(run_list[0].path)
    info, info_path = shown_blend(run_list, blend_name)
    inputs = {r.name: r.fingerprint(with_test=False) for r in run_list}
    if info_path is not None:
        inputs["blend"] = file_fingerprint(info_path)
    stamp = Stamp("evaluate", {"labels": str(labels_path or ""), "resamples": resamples}, inputs)
    files = layout.report_files(out_dir)
    if guard(stamp, files["summary"], files["markdown"].exists(), True, f"the report {out_dir}",
             exists=files["summary"].exists(), quiet=quiet):  # a view: rewritten, never refused, when its inputs change
        return json.loads(files["summary"].read_text())
    labels = read_labels(labels_path) if labels_path else cached_labels(*run_list[0].data())[0]
    results, oofs = {}, {}
    for r in run_list:
        oof = r.load_oof()
        missing = oof.index.difference(labels.index)
        if len(missing):
            raise PipelineError(f"{r.path}: {len(missing)} OOF ID(s) have no labels, e.g. {list(missing[:3])}")
        results[r.name] = report(labels.loc[oof.index, CLASSES].to_numpy(), oof[CLASSES].to_numpy())
        results[r.name]["folds"] = sorted(int(f) for f in oof["fold"].unique())
        oofs[r.name] = oof
    if info is not None:  # the blend src.blend fitted, applied: all rows with its weights, and fold by fold
        common, y, preds, folds = oof_table(list(oofs.values()), labels)
        names = list(oofs)
        mixed = blend(preds, weight_matrix(info, names))
        honest = np.zeros_like(mixed)
        for f in np.unique(folds):
            honest[folds == f] = blend([p[folds == f] for p in preds], weight_matrix(info, names, fold=int(f)))
        results["blend"] = {**report(y, mixed), "weights": {n: info["weights"][n] for n in names}}
        results["blend, cross-fitted"] = report(y, honest)
        oofs["blend"] = pd.DataFrame(mixed, index=common, columns=CLASSES).assign(fold=folds)
        oofs["blend, cross-fitted"] = pd.DataFrame(honest, index=common, columns=CLASSES).assign(fold=folds)
    summary = summarise(results, oofs, run_list, labels, stamp)
    if info_path is not None:
        summary["blend_file"] = str(info_path)
    add_uncertainty(summary, oofs, labels, run_list, resamples, "blend" if info is not None else run_list[0].name)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_roc(oofs, labels, files["roc"])
    plot_calibration(oofs, labels, files["calibration"])
    plot_loss_curves(run_list, files["loss_curves"])
    write_markdown(summary, files["markdown"])
    write_json(summary, files["summary"])
    for r in run_list:  # a stage-1 run carries what it was trained on and how well it did
        if not r.is_stage2():
            write_json(make_card(r, summary), r.path / layout.CARD)
    return summary


def add_uncertainty(summary: dict, oofs: dict, labels, run_list, resamples: int, applied: str) -> None:
    """95% intervals over patients for every member, series-level figures, and the operating point of the member
    the Predictor applies (the blend when there is one), into the summary. Needs the cache's metadata (patients and
    series); without it the report says so and goes on."""
    try:
        _, meta = load_cache(layout.cache_dir(*run_list[0].data()))
    except (PipelineError, KeyError, OSError) as e:
        summary["intervals_note"] = f"no intervals: the runs' cache metadata (patients, series) is not readable ({e})"
        return
    meta = meta.drop_duplicates("ID").set_index("ID")[["PatientID", "SeriesInstanceUID"]]
    priors = {n: prior_predictions(labels, o["fold"]) for n, o in oofs.items()}
    u = uncertainty(oofs, labels, meta, priors, resamples)
    summary["bootstrap"], summary["intervals"], summary["series"] = u["bootstrap"], u["members"], u["series"]
    summary["operating_point"] = {"member": applied, **u["series"][applied]}


def summarise(results: dict, oofs: dict, run_list, labels, stamp) -> dict:
    """summary.json: every member's figures, the prior's, and their ratios."""
    first = oofs[run_list[0].name]
    prior = report(labels.loc[first.index, CLASSES].to_numpy(), prior_predictions(labels, first["fold"]))
    prior["mean_auc"] = float("nan")  # constant within a fold: no ranking, no AUC
    for c in CLASSES:
        prior["per_class"][c]["auc"] = float("nan")
    summary = {"runs": results, "prior": prior,
               "ratio_to_prior": {k: v["weighted_log_loss"] / prior["weighted_log_loss"] for k, v in results.items()},
               "stamp": stamp.to_dict()}
    if len(run_list) > 1:
        base = results[run_list[0].name]["weighted_log_loss"]
        summary["ratio_to_first"] = {k: v["weighted_log_loss"] / base for k, v in results.items()}
    if "blend" in results:
        summary["blend_weights"] = results["blend"]["weights"]
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
    lines += intervals_markdown(summary, names)
    lines += ["", "Plots: " + ", ".join(layout.REPORT_FILES[k] for k in ("roc", "calibration", "loss_curves")), ""]
    with atomic_write(path) as f:
        f.write("\n".join(lines))


def intervals_markdown(summary: dict, names: list[str]) -> list[str]:
    """The intervals table, the series-level table and the operating point, for report.md."""
    if "intervals" not in summary:
        return ["", summary.get("intervals_note", "")]
    b, iv, se = summary["bootstrap"], summary["intervals"], summary["series"]
    ci = lambda v, f="{:.3f}": "[" + ", ".join(_num(x, f) for x in v) + "]"  # noqa: E731
    names = [n for n in names if n in iv]
    lines = ["", f"## 95% intervals: {b['resamples']} bootstrap draws over the {b['patients']} patients", "",
             "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names),
             "| weighted log loss | " + " | ".join(f"{summary['runs'][n]['weighted_log_loss']:.4f} "
                                                  f"{ci(iv[n]['weighted_log_loss'], '{:.4f}')}" for n in names) + " |",
             "| ratio to prior | " + " | ".join(f"{summary['ratio_to_prior'][n]:.3f} {ci(iv[n]['ratio_to_prior'])}"
                                               for n in names) + " |"]
    for c in CLASSES:
        lines.append(f"| AUC {c} | " + " | ".join(f"{_num(summary['runs'][n]['per_class'][c]['auc'], '{:.3f}')} "
                                                  f"{ci(iv[n]['auc'][c])}" for n in names) + " |")
    lines += ["", "## Scans: each series scored by its highest `any`", "",
              "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names),
              "| series (bleeding) | " + " | ".join(f"{se[n]['series']} ({se[n]['positive']})" for n in names) + " |",
              "| AUC | " + " | ".join(f"{_num(se[n]['auc'], '{:.3f}')} {ci(se[n]['auc_ci'])}" for n in names) + " |"]
    op = summary.get("operating_point")
    if op:
        lines += ["", f"Operating point ({op['member']}, what the Predictor applies): `any` >= {_num(op['threshold'], '{:.4f}')} "
                  f"flags at least {op['target_sensitivity']:.0%} of the bleeding series out of fold: sensitivity "
                  f"{_num(op['sensitivity'], '{:.3f}')} {ci(op['sensitivity_ci'])}, specificity "
                  f"{_num(op['specificity'], '{:.3f}')} {ci(op['specificity_ci'])}. The demo, its page and the DICOM "
                  f"node give their verdict at this threshold."]
    return lines


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


def roc_points(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) at every distinct threshold, from (0, 0) to (1, 1)."""
    order = np.argsort(-p, kind="stable")
    ys, ps = y[order] > 0.5, p[order]
    last = np.r_[ps[1:] != ps[:-1], True]  # the end of each group of equal scores
    tp, fp = np.cumsum(ys)[last], np.cumsum(~ys)[last]
    return np.r_[0, fp / max(fp[-1], 1)], np.r_[0, tp / max(tp[-1], 1)]


def plot_roc(oofs: dict, labels, path):
    fig, axes = plt.subplots(2, 3, figsize=(12, 7.5))
    for ax, c in zip(axes.ravel(), CLASSES):
        for name, oof in oofs.items():
            y = labels.loc[oof.index, c].to_numpy()
            if 0 < y.sum() < len(y):
                fpr, tpr = roc_points(y, oof[c].to_numpy())
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
            e_csv = r.fold_dir(k) / layout.EPOCHS
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
    runs: list[str] = positional(nargs="+")  # run folders (each holding fold*/oof.csv); a stage-1 run brings its
                                             # stage-2 runs
    report_dir: str = ""              # where the report goes (default: OUT/report/<first run>)
    blend: str = ""                   # show the blend OUT/blends/<blend>.json (default: a stage-1 run's own)
    stage1_only: bool = False         # the runs as given, without their stage-2 runs
    labels: str = ""                  # stage_2_train.csv (default: the runs' data folder, via its parsed copy)
    resamples: int = RESAMPLES        # bootstrap draws over patients for the 95% intervals


def main():
    a = parse_config(EvalConfig, description=__doc__, prog="python -m src.evaluate")
    run_list = members(a.runs, a.stage1_only)
    out = Path(a.report_dir) if a.report_dir else layout.report_dir(run_list[0].path)
    s = evaluate_runs([r.path for r in run_list], out, a.labels or None, blend_name=a.blend or None,
                      resamples=a.resamples)
    if layout.report_files(out)["markdown"].exists():
        print(layout.report_files(out)["markdown"].read_text())
    print(f"report: {out}")
    return s


if __name__ == "__main__":
    cli_main(main)
