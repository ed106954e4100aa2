"""Before a site trusts a model: validate a bundle on the site's own labelled scans (docs/validate.md).

    python -m src.serve.validate --run model.ichbundle --dicom-dir SITE/ --labels labels.csv --report-dir val/
    python -m src.serve.validate --run model.ichbundle --dicom-dir CQ500/ --labels reads.csv --prevalence 0.06
    python -m src.serve.validate ... --choose-threshold sensitivity=0.95 --site-bundle model_site.ichbundle

Scores every study under --dicom-dir through src.serve.results.analyse_study: the series selector chooses the
series, as in the demo, the page and the node (a study with no series the model can read is listed with every
series' reason and left out of the figures). A scan's score per class is the highest slice probability of its
scored series, what the front ends' verdict reads. The scores are compared with the site's scan-level labels
(src.serve.site: a plain CSV or CQ500's reads.csv), matched to the studies before anything is scored, so a label
without scans or scans without a label stop the command at once.

Writes into --report-dir: report.md (what was scored, what not and why; the model card; the bundle's own
out-of-fold figures against this site's, the headline; every figure with a 95% interval from a bootstrap over
patients; the same per manufacturer, scanner model and kernel; the site's threshold), summary.json (the same, for
scripts), scans.csv (one row per scan: label, scores, scored or why not), series.csv (every series, as the demo
lists them), skipped.csv (files that gave no slice), roc.png and reliability.png. Each study's scores are kept in
REPORT_DIR/scores/ as soon as it is scored, so a run killed half-way goes on where it stopped; a changed model,
series rules or file rescores that study.

--choose-threshold sensitivity=S picks the site's operating point on its own scans, with its interval; with
--site-bundle FILE it also writes a copy of the bundle (the original untouched) whose model card carries that
threshold and where it came from, and whose manifest records the change. The demo, the page and the node give
their verdict at it (src.serve.results.verdict_threshold says so).
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..bundle import MANIFEST, Trained, is_bundle, read_bundle, read_run, write_bundle  # noqa: E402
from ..card import card_text  # noqa: E402
from ..config import parse_config  # noqa: E402
from ..evaluate import roc_points  # noqa: E402
from ..intervals import RESAMPLES, Draws  # noqa: E402
from ..predictor import Predictor  # noqa: E402
from ..stamps import file_fingerprint, fingerprint  # noqa: E402
from ..utils import CLASSES, PipelineError, atomic_path, atomic_write, cli_main, write_csv, write_json  # noqa: E402
from .results import DISCLAIMER, SYNTHETIC_WARNING, analyse_study, verdict_threshold  # noqa: E402
from .selector import SERIES_COLUMNS, SeriesRules  # noqa: E402
from .site import (GROUPS, at_threshold, by_group, choose_threshold, inventory, match_labels, parse_target,  # noqa: E402
                   read_site_labels, scan_figures)

SCORES_VERSION = 1  # of a kept study's scores (REPORT_DIR/scores/): bump when a change of the code alters them
SCAN_COLUMNS = ["StudyInstanceUID", "patient", "folder", "label_line", "scored", "reason", "notes", "series",
                "slices", "Manufacturer", "ManufacturerModelName", "kernel"]


@dataclass
class ValidateConfig:
    run: str = ""                     # the bundle (or run folder) to validate
    dicom_dir: str = ""               # the site's labelled scans: one folder, any layout (a PACS export, CQ500's folders)
    labels: str = ""                  # scan-level labels: a plain CSV (StudyInstanceUID, SeriesInstanceUID or folder;
                                      # any and subtypes as 0/1) or CQ500's reads.csv (docs/validate.md)
    report_dir: str = "validation"    # where report.md, summary.json, scans.csv and the plots go
    prevalence: float = 0.06          # a stated prevalence of bleeds for PPV and NPV, beside the site's own
    choose_threshold: str = ""        # sensitivity=0.95: pick the site's operating point on its own scans
    site_bundle: str = ""             # with --choose-threshold: write a copy of the bundle with the site's threshold
    overwrite: bool = False           # replace an existing --site-bundle file
    resamples: int = RESAMPLES        # bootstrap draws over patients for the 95% intervals
    seed: int = 0                     # the bootstrap's seed
    series_rules: str = ""            # which series are scored (default configs/serve/series_rules.yaml; docs/series.md)
    device: str = "auto"              # auto (CUDA when available), cpu, cuda


# ---------------------------------------------------------------- scoring, study by study, resumable
def model_key(source) -> str:
    """What the scores depend on in the model: a bundle's bytes, a run's outputs (src.export's stamp)."""
    if is_bundle(source):
        return file_fingerprint(source)
    from ..export import export_stamp
    from ..runs import Run
    return export_stamp(Run(source), False).id


def study_key(model: str, rules: SeriesRules, files) -> str:
    """The code's version, the model, the series rules and each file's path, size and time: what a kept score was
    made from."""
    stats = [(str(f), Path(f).stat().st_size, Path(f).stat().st_mtime_ns) for f in files]
    rules = {k: v for k, v in dataclasses.asdict(rules).items() if k != "source"}
    return fingerprint({"version": SCORES_VERSION, "model": model, "rules": rules, "files": stats})


def score_study(p: Predictor, files, heads: pd.DataFrame, rules: SeriesRules) -> dict:
    """One study's scan row (scored or why not, its scores per class), its series listing and its skipped files."""
    studies, skipped = analyse_study(p, files, cam_slices=0, rules=rules)
    s = studies[0]
    listing = s.series
    row = {"StudyInstanceUID": s.study, "scored": bool(s.scored), "reason": "", "notes": "", "series": "", "slices": 0,
           "Manufacturer": "", "ManufacturerModelName": "", "kernel": "", **{f"p_{c}": float("nan") for c in CLASSES}}
    if s.scored:
        chosen = listing[listing.scored]
        mine = heads[heads.SeriesInstanceUID.isin(chosen.SeriesInstanceUID)]
        row.update(series=" ".join(r.series for r in s.scored), slices=int(sum(len(r.table) for r in s.scored)),
                   notes="; ".join(n for n in chosen.notes if n), kernel="/".join(sorted(set(chosen.kernel) - {""})),
                   **{c: _mode(mine[c]) for c in ("Manufacturer", "ManufacturerModelName")},
                   **{f"p_{c}": float(max(r.table[c].max() for r in s.scored)) for c in CLASSES})
    else:
        row["reason"] = "no series the model can read: " + "; ".join(
            f"series {r.SeriesNumber or r.SeriesInstanceUID}: {r.reason}" for r in listing.itertuples())
    return {"row": row, "series": listing.to_dict(orient="records"), "skipped": skipped.to_dict(orient="records")}


def _mode(values: pd.Series) -> str:
    v = values.fillna("").astype(str)
    v = v[v != ""]
    return str(v.mode().iloc[0]) if len(v) else ""


def _kept(path: Path) -> dict:
    """A kept study's scores, or {} (none, or a damaged file: the study is scored again)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def score_studies(predictor, matched: pd.DataFrame, heads: pd.DataFrame, rules: SeriesRules, cache: Path,
                  model: str, progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(one row per study, every series, skipped files), each study's result kept in `cache` once scored and
    reused while its model, rules and files are unchanged. predictor(): the Predictor, built when a study first
    needs it (a resumed run whose studies are all kept builds none)."""
    rows, series, skipped, reused = [], [], [], 0
    for i, s in enumerate(matched.itertuples()):
        key = study_key(model, rules, s.files)
        path = cache / f"{hashlib.sha256(s.StudyInstanceUID.encode()).hexdigest()[:20]}.json"
        kept = _kept(path)
        if kept.get("key") == key:
            out, reused = kept["result"], reused + 1
        else:
            out = score_study(predictor(), s.files, heads, rules)
            write_json({"key": key, "result": out}, path)
        rows.append(out["row"]), series.extend(out["series"]), skipped.extend(out["skipped"])
        if progress:
            r = out["row"]
            print(f"[{i + 1}/{len(matched)}] study {s.StudyInstanceUID}: " + (
                f"any {r['p_any']:.3f} ({r['slices']} slices)" if r["scored"] else "not scored")
                + (" (kept from an earlier run)" if kept.get("key") == key else ""))
    if progress and reused:
        print(f"{reused} of {len(matched)} studies' scores kept from an earlier run ({cache})")
    return (pd.DataFrame(rows), pd.DataFrame(series, columns=SERIES_COLUMNS),
            pd.DataFrame(skipped, columns=["path", "reason"]))


def scan_table(matched: pd.DataFrame, rows: pd.DataFrame, classes) -> pd.DataFrame:
    """One row per scan: the study, its label (y_<class>), its scores (p_<class>), scored or why not. The patient
    is the label file's when it names one, else the headers' PatientID, else the study itself."""
    m = matched.set_index("StudyInstanceUID")
    t = rows.set_index("StudyInstanceUID").loc[m.index]
    patient = m.label_patient.where(m.label_patient != "", m.patient)
    t.insert(0, "patient", patient.where(patient != "", "study " + m.index.to_series()))
    t.insert(1, "folder", m.folder.fillna(""))
    t.insert(2, "label_line", m.line.astype(int))
    t.insert(3, "label_key", m.key)
    for c in classes:
        t[f"y_{c}"] = m[c].astype(int)
    if "votes" in m and (m.votes != "").any():
        t["reader_votes"] = m.votes
    t["flagged"] = False
    return t.reset_index()[[*SCAN_COLUMNS[:4], "label_key", *SCAN_COLUMNS[4:],
                            *[f"y_{c}" for c in classes], *[f"p_{c}" for c in CLASSES], "flagged",
                            *(["reader_votes"] if "reader_votes" in t else [])]]


# ---------------------------------------------------------------- figures against the bundle's own
def out_of_fold(card: dict) -> dict:
    """The bundle's own out-of-fold operating point (a site copy keeps its original's under `out_of_fold`)."""
    op = card.get("operating_point") or {}
    return (op.get("out_of_fold") or {}) if op.get("source") == "site" else op


def comparison(card: dict, scored: pd.DataFrame, draws: Draws, prevalence: float, figures: dict) -> list[dict]:
    """Training (out of fold) against this site: AUC of `any` per scan, and sensitivity and specificity at the
    bundle's out-of-fold threshold; each with both intervals and the drop."""
    oof, nan = out_of_fold(card), {"value": float("nan"), "ci": [float("nan")] * 2}
    rows = []

    def add(name, training, site):
        rows.append({"figure": name, "training": training, "site": site, "drop": training["value"] - site["value"]})

    site_auc = figures["auc"].get("any", nan)
    if oof.get("auc") is not None:
        add("AUC of `any`, per scan", {"value": oof["auc"], "ci": oof.get("auc_ci") or nan["ci"]}, site_auc)
    elif card.get("oof_auc_any") is not None:
        add("AUC of `any` (training: per image, the run's report chose no scan-level figure)",
            {"value": card["oof_auc_any"], "ci": card.get("oof_auc_any_ci") or nan["ci"]}, site_auc)
    t = oof.get("threshold")
    if t is not None and t == t:
        w = draws.weights(scored.patient)
        at = at_threshold(scored.y_any.to_numpy(float), scored.p_any.to_numpy(float), t, w[w.sum(1) > 0], prevalence)
        for k in ("sensitivity", "specificity"):
            add(f"{k} at the bundle's out-of-fold threshold {t:.4f}",
                {"value": oof.get(k, float("nan")), "ci": oof.get(f"{k}_ci") or nan["ci"]}, at[k])
    return rows


def site_operating_point(chosen: dict, card: dict, scored: pd.DataFrame, cfg: ValidateConfig) -> dict:
    """The card's operating_point of a site copy: the site's threshold, how it was chosen and on what, and the
    bundle's own out-of-fold one."""
    at = chosen["at_threshold"]
    return {"source": "site", "threshold": chosen["threshold"], "threshold_ci": chosen["threshold_ci"],
            "target_sensitivity": chosen["target_sensitivity"], "series": len(scored),
            "positive": int(scored.y_any.sum()), "sensitivity": at["sensitivity"]["value"],
            "sensitivity_ci": at["sensitivity"]["ci"], "specificity": at["specificity"]["value"],
            "specificity_ci": at["specificity"]["ci"],
            "site": {"scans": len(scored), "positive": int(scored.y_any.sum()), "patients": int(scored.patient.nunique()),
                     "dicom_dir": str(cfg.dicom_dir), "labels": Path(cfg.labels).name,
                     "labels_sha256": file_fingerprint(cfg.labels), "date": datetime.date.today().isoformat(),
                     "made_by": "python -m src.serve.validate"},
            "out_of_fold": out_of_fold(card) or None}


def write_site_bundle(trained: Trained, source, out, op: dict) -> dict:
    """A copy of the bundle `source` (or a bundle of the run), read as `trained`, whose card's operating_point is
    `op`; the manifest records what it was made from and what changed. Returns the manifest."""
    card = {k: v for k, v in trained.card.items() if k != "bundle"}   # what read_bundle added about the file read
    old = trained.card.get("bundle") or {}
    before = verdict_threshold(card)
    derived = {"file": str(source), "name": trained.name, "versions": old.get("versions")}
    if is_bundle(source):
        derived["sha256"] = hashlib.sha256(Path(source).read_bytes()).hexdigest()
        with zipfile.ZipFile(source) as z:
            derived["created"] = json.loads(z.read(MANIFEST)).get("created")
    else:
        derived["run_fingerprint"] = model_key(source)
    t = dataclasses.replace(trained, card={**card, "operating_point": op})
    after = verdict_threshold(t.card)
    provenance = {"derived_from": derived, "made_by": "python -m src.serve.validate",
                  "change": {"card.operating_point": {"from": {"threshold": before[0], "how": before[1]},
                                                      "to": {"threshold": after[0], "how": after[1]}}}}
    return write_bundle(t, out, fp16=old.get("dtype") == "float16", provenance=provenance)


# ---------------------------------------------------------------- the report
def _f(fig, fmt="{:.3f}") -> str:
    """A figure with its interval: 0.912 [0.850, 0.960]; '-' where undefined."""
    if fig is None:
        return "-"
    v, ci = fig["value"], fig.get("ci") or [float("nan")] * 2
    num = lambda x: "-" if x is None or x != x else fmt.format(x)  # noqa: E731
    return num(v) if v != v else f"{num(v)} [{num(ci[0])}, {num(ci[1])}]"


def _n(k: int, one: str, many: str = "") -> str:
    """1 scan, 3 scans."""
    return f"{k} {one}" if k == 1 else f"{k} {many or one + 's'}"


def scored_markdown(s: dict) -> list[str]:
    i, n = s["inputs"], s["scans"]
    lines = ["## What was scored", "",
             f"{_n(n['studies'], 'study', 'studies')} under `{i['dicom_dir']}` ({_n(n['files'], 'file')}), "
             f"labelled by `{i['labels']}` ({i['mapping']}). Series chosen by the rules of `{i['series_rules']}`.", "",
             f"**Scored: {_n(n['scored'], 'scan')} of {_n(n['patients'], 'patient')}, {n['bleeding']} bleeding by the "
             f"labels.** "
             f"Not scored: {len(s['not_scored'])}, left out of every figure" + (":" if s["not_scored"] else "."), ""]
    if s["not_scored"]:
        lines += ["| study | folder | label line | why not |", "|---|---|---:|---|"]
        lines += [f"| {r['StudyInstanceUID']} | {r['folder'] or '-'} | {r['label_line']} | {r['reason'].replace('|', '/')} |"
                  for r in s["not_scored"]]
        lines.append("")
    lines.append(f"Files that gave no slice: {n['skipped_files']} (skipped.csv lists each with its reason). "
                 f"Every series and why it was or was not scored: series.csv; every scan: scans.csv.")
    return lines + [""]


def model_markdown(s: dict) -> list[str]:
    return ["## The model", "", card_text(s["model"]), "", f"*{DISCLAIMER}*", "",
                    f"Verdict threshold: `any` >= {s['threshold']['value']:.4f}: {s['threshold']['from']}.", ""]


def headline_markdown(s: dict) -> list[str]:
    rows = s["comparison"]
    lines = ["## Training against this site (the headline)", ""]
    if not rows:
        return lines + ["The bundle's card holds no out-of-fold figure to compare with (run `python -m src.evaluate` "
                        "on its run and export it again).", ""]
    r = rows[0]
    lines += [f"**{r['figure']}: {_f(r['training'])} out of fold on the training data, {_f(r['site'])} on these "
              f"{_n(s['scans']['scored'], 'scan')}" + (f": a drop of {r['drop']:.3f}.**" if r["drop"] == r["drop"] else
                                                 " (undefined here: it needs bleeding and clean scans).**"), "",
              "| figure | training (out of fold) | this site | drop |", "|---|---|---|---:|"]
    lines += [f"| {r['figure']} | {_f(r['training'])} | {_f(r['site'])} | "
              f"{'-' if r['drop'] != r['drop'] else format(r['drop'], '.3f')} |" for r in rows]
    return lines + [""]


def rates_markdown(at: dict, how: str) -> list[str]:
    c, pct = at["counts"], "{:.1%}"
    return [f"At the threshold `any` >= {at['threshold']:.4f} ({how}): {c['true_positive']} true positive, "
            f"{c['false_positive']} false positive, {c['true_negative']} true negative, {c['false_negative']} false "
            f"negative scans.", "", "| figure | value [95% interval] |", "|---|---|",
            f"| sensitivity | {_f(at['sensitivity'], pct)} |", f"| specificity | {_f(at['specificity'], pct)} |",
            f"| PPV at this site's prevalence ({at['site_prevalence']:.1%}) | {_f(at['ppv_site'], pct)} |",
            f"| NPV at this site's prevalence | {_f(at['npv_site'], pct)} |",
            f"| PPV at a prevalence of {at['stated_prevalence']:.1%} (stated) | {_f(at['ppv_stated'], pct)} |",
            f"| NPV at a prevalence of {at['stated_prevalence']:.1%} (stated) | {_f(at['npv_stated'], pct)} |", ""]


def figures_markdown(s: dict) -> list[str]:
    f, b = s["figures"], s["bootstrap"]
    lines = [f"## Figures at this site: {_n(f['scans'], 'scan')}, 95% intervals from {b['resamples']} bootstrap draws "
             f"over {_n(b['patients'], 'patient')}", "", "A figure shown as - is undefined here: an AUC needs bleeding "
             "and clean scans, a sensitivity bleeding ones, a PPV a flagged scan.", "", "| class | bleeding scans | AUC | Brier score |", "|---|---:|---|---|"]
    lines += [f"| {c} | {f['positive'][c]} | {_f(f['auc'].get(c))} | {_f(f['brier'][c], '{:.4f}')} |"
              for c in s["classes"]]
    lines += ["", *rates_markdown(f["at_threshold"], s["threshold"]["from"])]
    cal = f["calibration"]
    lines += [f"Calibration of `any`: mean predicted {_f(cal['mean_predicted'])} against an observed share of "
              f"{_f(cal['observed'])}; expected calibration error {_f(cal['ece'])} (reliability.png).", "",
              "| predicted | scans | mean predicted | observed |", "|---|---:|---:|---:|"]
    lines += [f"| {x['bin'][0]:.1f}-{x['bin'][1]:.1f} | {x['scans']} | {x['mean_predicted']:.3f} | {x['observed']:.3f} |"
              for x in cal["bins"]]
    return lines + [""]


def groups_markdown(s: dict) -> list[str]:
    if not s["by"]:
        return ["## By manufacturer, scanner model and kernel", "", "The headers name none of them.", ""]
    pct, lines = "{:.1%}", ["## By manufacturer, scanner model and kernel", ""]
    for name, groups in s["by"].items():
        lines += [f"### {name}", "", "| value | scans | bleeding | AUC of `any` | sensitivity | specificity | PPV (site) "
                  "| Brier of `any` |", "|---|---:|---:|---|---|---|---|---|"]
        for v, f in groups.items():
            a = f["at_threshold"]
            lines.append(f"| {v} | {f['scans']} | {f['positive']['any']} | {_f(f['auc'].get('any'))} | "
                         f"{_f(a['sensitivity'], pct)} | {_f(a['specificity'], pct)} | {_f(a['ppv_site'], pct)} | "
                         f"{_f(f['brier']['any'], '{:.4f}')} |")
        lines.append("")
    missing = [n for n in GROUPS if n not in s["by"]]
    return lines + ([f"Not in the headers: {', '.join(missing)}.", ""] if missing else [])


def site_markdown(s: dict) -> list[str]:
    c = s.get("site_threshold")
    if not c:
        return []
    lines = ["## This site's threshold", "",
             f"Chosen on these scans to flag at least {c['target_sensitivity']:.0%} of the bleeding ones: `any` >= "
             f"{_f({'value': c['threshold'], 'ci': c['threshold_ci']}, '{:.4f}')} (the interval: the threshold chosen "
             f"again on each bootstrap draw). The rates below are measured on the scans it was chosen on, so they "
             f"flatter it: confirm them on scans it has not seen.", ""]
    lines += rates_markdown(c["at_threshold"], "the site's threshold")
    if s.get("site_bundle"):
        lines += [f"Site copy of the bundle: `{s['site_bundle']}` (the original is untouched); its card's operating "
                  f"point is this threshold and says where it came from, its manifest records the change. The demo, "
                  f"the page and the node give their verdict at it.", ""]
    return lines


def report_markdown(s: dict) -> str:
    lines = [f"# Validation of {s['model'].get('run', 'the model')} on a site's own scans", ""]
    if s["model"].get("synthetic"):
        lines += [f"> **WARNING: {SYNTHETIC_WARNING}**", ""]
    for part in (scored_markdown, model_markdown, headline_markdown, figures_markdown, groups_markdown, site_markdown):
        lines += part(s)
    return "\n".join(lines + ["Plots: roc.png (ROC per class, the threshold marked), reliability.png.", ""])


def _save(fig, path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def plot_roc(scored: pd.DataFrame, classes, threshold: float, path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for c in classes:
        y, p = scored[f"y_{c}"].to_numpy(float), scored[f"p_{c}"].to_numpy(float)
        if 0 < y.sum() < len(y):
            fpr, tpr = roc_points(y, p)
            ax.plot(fpr, tpr, lw=2.2 if c == "any" else 1.2, label=c)
    y, p = scored.y_any.to_numpy(float) > 0.5, scored.p_any.to_numpy(float) >= threshold
    if y.any() and (~y).any():
        ax.plot([(p & ~y).sum() / (~y).sum()], [(p & y).sum() / y.sum()], "ko", label=f"any >= {threshold:.3f}")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("false positive rate (1 - specificity)"), ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title(f"ROC per scan ({len(scored)} scans)", fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    _save(fig, path)


def plot_reliability(calibration: dict, path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    bins = calibration["bins"]
    ax.plot([b["mean_predicted"] for b in bins], [b["observed"] for b in bins], "o-")
    for b in bins:
        ax.annotate(str(b["scans"]), (b["mean_predicted"], b["observed"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlim(0, 1), ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("predicted probability of `any` (bin mean)"), ax.set_ylabel("observed share of bleeding scans")
    ax.set_title("Reliability of `any` per scan (scans per bin marked)", fontsize=10)
    _save(fig, path)


def _plain(obj):
    """summary.json without NaN (JSON has none): null where a figure is undefined."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (float, np.floating)) and obj != obj:
        return None
    return obj


# ---------------------------------------------------------------- the command
def check_config(cfg: ValidateConfig) -> float | None:
    """Every setting checked before anything is read; returns the sensitivity target of --choose-threshold."""
    for flag, v in (("--run", cfg.run), ("--dicom-dir", cfg.dicom_dir), ("--labels", cfg.labels)):
        if not v:
            raise PipelineError(f"{flag} is required (python -m src.serve.validate --run BUNDLE --dicom-dir DIR "
                                f"--labels FILE)")
    if not 0 < cfg.prevalence < 1:
        raise PipelineError(f"--prevalence {cfg.prevalence}: a prevalence is between 0 and 1 (e.g. 0.06)")
    if cfg.resamples < 1:
        raise PipelineError(f"--resamples {cfg.resamples}: at least 1")
    target = parse_target(cfg.choose_threshold) if cfg.choose_threshold else None
    if cfg.site_bundle:
        out = Path(cfg.site_bundle)
        if target is None:
            raise PipelineError("--site-bundle needs --choose-threshold sensitivity=S (the threshold it carries)")
        if out.exists() and out.resolve() == Path(cfg.run).resolve():
            raise PipelineError(f"--site-bundle {out} is the bundle validated: the original stays untouched, name "
                                f"another file")
        if out.exists() and not cfg.overwrite:
            raise PipelineError(f"--site-bundle {out} exists; pass --overwrite to replace it")
    return target


def score_site(cfg: ValidateConfig, progress: bool = True):
    """(labels, rules, the trained parts, one row per scan, files, skipped files): the labels read and matched to
    the studies under --dicom-dir first (a mismatch stops here, before anything is scored), then every study
    scored; scans.csv, series.csv and skipped.csv written."""
    labels = read_site_labels(cfg.labels)
    studies, heads, unreadable = inventory(cfg.dicom_dir)
    matched = match_labels(labels, studies, cfg.dicom_dir, len(unreadable))
    rules = SeriesRules.load(cfg.series_rules or None)
    trained = read_bundle(cfg.run) if is_bundle(cfg.run) else read_run(cfg.run)
    predictor = functools.cache(lambda: Predictor.from_parts(trained, cfg.device))
    out = Path(cfg.report_dir)
    rows, series, skipped = score_studies(predictor, matched, heads, rules, out / "scores", model_key(cfg.run), progress)
    scans = scan_table(matched, rows, labels.classes)
    scans["flagged"] = scans.scored & (scans.p_any >= verdict_threshold(trained.card)[0])
    skipped = pd.concat([unreadable, skipped], ignore_index=True)
    write_csv(scans, out / "scans.csv", index=False)  # full precision: a site can recompute every figure from it
    write_csv(series, out / "series.csv", index=False)
    write_csv(skipped, out / "skipped.csv", index=False)
    return labels, rules, trained, scans, len(heads) + len(unreadable), skipped


def site_summary(cfg: ValidateConfig, labels, rules: SeriesRules, card: dict, scans: pd.DataFrame, files: int,
                 skipped: pd.DataFrame) -> tuple[dict, pd.DataFrame, Draws]:
    """(summary.json's content, the scored scans, the bootstrap draws over their patients). The summary: what was scored and what not, the model, the comparison with its out-of-fold
    figures, the figures (overall and by manufacturer, scanner model and kernel), all with intervals over patients."""
    scored = scans[scans.scored].reset_index(drop=True)
    if scored.empty:
        raise PipelineError(f"no study under {cfg.dicom_dir} has a series the model can read ({cfg.report_dir}/"
                            f"scans.csv and series.csv say why)")
    t, how = verdict_threshold(card)
    draws = Draws(scored.patient, cfg.resamples, cfg.seed)
    figures = scan_figures(scored, draws, t, cfg.prevalence, labels.classes)
    patients = int(scored.patient.nunique())
    return {"inputs": {"run": str(cfg.run), "dicom_dir": str(cfg.dicom_dir), "labels": str(cfg.labels),
                       "format": labels.format, "key": labels.key, "mapping": labels.mapping(),
                       "series_rules": rules.source},
            "scans": {"studies": len(scans), "files": files, "scored": len(scored), "patients": patients,
                      "bleeding": int(scored.y_any.sum()), "skipped_files": len(skipped)},
            "not_scored": scans.loc[~scans.scored, ["StudyInstanceUID", "folder", "label_line", "reason"]
                                    ].to_dict("records"),
            "model": card, "classes": labels.classes, "threshold": {"value": t, "from": how},
            "bootstrap": {"resamples": cfg.resamples, "over": "patients", "seed": cfg.seed, "patients": patients},
            "comparison": comparison(card, scored, draws, cfg.prevalence, figures), "figures": figures,
            "by": by_group(scored, draws, t, cfg.prevalence, labels.classes)}, scored, draws


def validate(cfg: ValidateConfig, progress: bool = True) -> dict:
    """The command: returns summary.json's content."""
    target = check_config(cfg)
    labels, rules, trained, scans, files, skipped = score_site(cfg, progress)
    s, scored, draws = site_summary(cfg, labels, rules, trained.card, scans, files, skipped)
    if target is not None:
        s["site_threshold"] = choose_threshold(scored.y_any, scored.p_any, target, draws, scored.patient, cfg.prevalence)
        if cfg.site_bundle:
            op = site_operating_point(s["site_threshold"], trained.card, scored, cfg)
            s["site_bundle_manifest"] = write_site_bundle(trained, cfg.run, cfg.site_bundle, op)
            s["site_bundle"] = str(cfg.site_bundle)
    out = Path(cfg.report_dir)
    plot_roc(scored, labels.classes, s["threshold"]["value"], out / "roc.png")
    plot_reliability(s["figures"]["calibration"], out / "reliability.png")
    write_json(_plain(s), out / "summary.json")
    with atomic_write(out / "report.md") as f:
        f.write(report_markdown(s))
    return s


def main(argv=None):
    cfg = parse_config(ValidateConfig, argv, description=__doc__, prog="python -m src.serve.validate")
    s = validate(cfg)
    n, head = s["scans"], s["comparison"][0] if s["comparison"] else None
    print(f"scored {n['scored']} of {n['studies']} scans ({n['bleeding']} bleeding, {n['patients']} patients); "
          f"{len(s['not_scored'])} not scored (report.md says why)")
    if head:
        print(f"{head['figure']}: {_f(head['training'])} out of fold, {_f(head['site'])} here")
    at = s["figures"]["at_threshold"]
    print(f"at any >= {at['threshold']:.4f}: sensitivity {_f(at['sensitivity'])}, specificity "
          f"{_f(at['specificity'])}, PPV at {at['stated_prevalence']:.0%} prevalence {_f(at['ppv_stated'])}")
    if "site_threshold" in s:
        c = s["site_threshold"]
        print(f"site threshold for sensitivity {c['target_sensitivity']:.0%}: any >= "
              f"{_f({'value': c['threshold'], 'ci': c['threshold_ci']}, '{:.4f}')}"
              + (f"; site copy of the bundle: {s['site_bundle']}" if "site_bundle" in s else ""))
    print(f"report: {Path(cfg.report_dir) / 'report.md'}")
    return s


if __name__ == "__main__":
    cli_main(main)
