"""A site's own labelled scans: the label file read and matched to the studies under a folder, and the scan-level
figures with 95% intervals over patients.

    from src.serve.site import inventory, read_site_labels, match_labels, scan_figures
    studies, heads, unreadable = inventory(DIR)          # one row per study under DIR, from the headers alone
    labels = read_site_labels(FILE)                      # a plain CSV or CQ500's reads.csv: one row per scan
    matched = match_labels(labels, studies, DIR)         # each study's label row; every mismatch is an error
    figures = scan_figures(scans, draws, threshold, prevalence=0.06, classes=labels.classes)

Two label formats (docs/validate.md):
- plain: one key column, `StudyInstanceUID`, `SeriesInstanceUID` or `folder` (the folder directly under DIR that
  holds the study), then `any` and any of the five subtypes (Kaggle's names), 0 or 1; an optional `patient` column
  names the patient when the headers' PatientID does not (an anonymiser that gives every study its own).
- CQ500's reads.csv: `name`, `Category`, then `R1:ICH`, `R1:IPH`, `R1:IVH`, `R1:SDH`, `R1:EDH`, `R1:SAH` (and the
  fracture and mass-effect columns, not read) for readers R1-R3. The reference is the majority of the three readers
  per finding (ICH is `any`). A name `CQ500-CT-<n>` is the study whose PatientID is that name (CQ500's files carry
  it), or the study in the folder `CQ500-CT-<n>`, `CQ500CT<n>` or `CQ500CT<n> CQ500CT<n>` (the download's).

Anything that cannot be read is an error naming the file and the line, never a silent skip: a value other than 0
or 1, an unknown or missing column, a key given twice, a subtype without `any`, a label matching no study (or
several), a study without a label. The figures are those of src.intervals (the same bootstrap over patients,
`Draws`, and the same AUC and operating point), per scan: a scan is a study, scored by the highest slice
probability of its scored series, as the front ends' verdict is.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..intervals import Draws
from ..metrics import auc_weighted, interval, operating_point
from ..scans import list_inputs, read_headers
from ..utils import CLASSES, PipelineError

KEYS = ("StudyInstanceUID", "SeriesInstanceUID", "folder")
READERS = ("R1", "R2", "R3")
FINDINGS = {"ICH": "any", "IPH": "intraparenchymal", "IVH": "intraventricular", "SDH": "subdural", "EDH": "epidural",
            "SAH": "subarachnoid"}
SHOWN = 12             # problems listed in one error (the count of the rest follows)
BINS = 10              # reliability diagram: equal-width bins of the predicted probability
GROUPS = {"manufacturer": "Manufacturer", "scanner model": "ManufacturerModelName", "kernel": "kernel"}


@dataclass
class SiteLabels:
    path: Path
    format: str                 # "plain" or "cq500"
    key: str                    # what a row is matched on: StudyInstanceUID, SeriesInstanceUID, folder or name
    classes: list[str]          # the classes the file gives, in CLASSES order (`any` always)
    table: pd.DataFrame         # one row per scan: key, line (in the file), one 0/1 column per class, patient,
                                # votes (CQ500: readers per finding, "ICH 1/3 IPH 0/3 ...")

    def mapping(self) -> str:
        """How the rows were matched to studies, in words (the report states it)."""
        if self.format == "cq500":
            return ("CQ500 reads.csv: the reference is the majority of readers R1-R3 per finding (ICH is `any`); "
                    "a name CQ500-CT-<n> is the study whose PatientID is that name, or the one in the folder "
                    "CQ500-CT-<n>, CQ500CT<n> or 'CQ500CT<n> CQ500CT<n>' directly under the scans' folder")
        how = {"StudyInstanceUID": "the study with that StudyInstanceUID",
               "SeriesInstanceUID": "the study holding the series with that SeriesInstanceUID",
               "folder": "the study whose files lie in that folder, directly under the scans' folder"}[self.key]
        return f"plain CSV keyed by {self.key}: a row labels {how}"


class Problems:
    """Every problem of one input, raised at the end as one error naming the file."""

    def __init__(self, source):
        self.source, self.items = source, []

    def add(self, text: str) -> None:
        self.items.append(text)

    def raise_any(self, fix: str = "") -> None:
        if not self.items:
            return
        shown = "\n  ".join(self.items[:SHOWN])
        more = f"\n  ... and {len(self.items) - SHOWN} more" if len(self.items) > SHOWN else ""
        raise PipelineError(f"{self.source}: {len(self.items)} problem(s):\n  {shown}{more}" + (f"\n{fix}" if fix else ""))


def _csv_rows(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(header, [(line, fields)] of the non-blank rows)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise PipelineError(f"label file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PipelineError(f"{path}: not a readable text file ({type(e).__name__}: {e}); labels are a CSV file "
                            f"(docs/validate.md)") from None
    reader = csv.reader(io.StringIO(text))
    try:
        rows = [(reader.line_num, r) for r in reader if any(c.strip() for c in r)]
    except csv.Error as e:
        raise PipelineError(f"{path}, line {reader.line_num}: not CSV ({e})") from None
    if not rows:
        raise PipelineError(f"{path}: empty; a label file has a header and one row per scan (docs/validate.md)")
    header = [c.strip() for c in rows[0][1]]
    twice = sorted({c for c in header if header.count(c) > 1})
    if twice:
        raise PipelineError(f"{path}, line {rows[0][0]}: column(s) {twice} appear twice in the header")
    return header, rows[1:]


def _binary(v: str) -> int | None:
    return {"0": 0, "1": 1}.get(v.strip())


def read_site_labels(path) -> SiteLabels:
    """A label file in either format (told apart by its header), every row checked."""
    path = Path(path)
    header, rows = _csv_rows(path)
    if "name" in header and "R1:ICH" in header:
        labels = _cq500(path, header, rows)
    elif any(k in header for k in KEYS):
        labels = _plain(path, header, rows)
    else:
        raise PipelineError(f"{path}: neither a plain label file (a key column StudyInstanceUID, SeriesInstanceUID or "
                            f"folder, then any and the subtypes as 0/1) nor CQ500's reads.csv (name, Category, R1:ICH, "
                            f"...); the header is {header[:8]}")
    if labels.table.empty:
        raise PipelineError(f"{path}: a header and no row; a label file has one row per scan")
    _check_rows(labels)
    return labels


def _fields(header: list[str], rows, problems: Problems):
    """(line, {column: value}) of each row with as many fields as the header."""
    for line, r in rows:
        if len(r) != len(header):
            problems.add(f"line {line}: {len(r)} field(s), the header has {len(header)}")
            continue
        yield line, dict(zip(header, (c.strip() for c in r)))


def _plain(path: Path, header: list[str], rows) -> SiteLabels:
    keys = [k for k in KEYS if k in header]
    if len(keys) > 1:
        raise PipelineError(f"{path}: key columns {keys}; a label file is keyed by one of {list(KEYS)}")
    if "any" not in header:
        raise PipelineError(f"{path}: no `any` column; a plain label file gives `any` (0/1) and any of the subtypes "
                            f"{CLASSES[:5]}")
    unknown = [c for c in header if c not in {*keys, *CLASSES, "patient"}]
    if unknown:
        raise PipelineError(f"{path}: unknown column(s) {unknown}; the columns are one key ({', '.join(KEYS)}), "
                            f"{', '.join(CLASSES)} and patient (remove the others, or correct a misspelt class)")
    classes = [c for c in CLASSES if c in header]
    problems, out = Problems(path), []
    for line, rec in _fields(header, rows, problems):
        row = {"key": rec[keys[0]], "line": line, "patient": rec.get("patient", ""), "votes": ""}
        if not row["key"]:
            problems.add(f"line {line}: the {keys[0]} is empty")
        for c in classes:
            row[c] = _binary(rec[c])
            if row[c] is None:
                problems.add(f"line {line}: {c} is {rec[c]!r}; a label is 0 or 1")
        out.append(row)
    problems.raise_any()
    return SiteLabels(path, "plain", keys[0], classes, pd.DataFrame(out, columns=["key", "line", "patient", "votes",
                                                                                   *classes]))


def _cq500(path: Path, header: list[str], rows) -> SiteLabels:
    need = [f"{r}:{f}" for r in READERS for f in FINDINGS]
    missing = [c for c in need if c not in header]
    if missing:
        raise PipelineError(f"{path}: a CQ500 reads.csv without the column(s) {missing} (it has name, Category and "
                            f"R1:ICH ... R3:SAH for three readers)")
    problems, out = Problems(path), []
    for line, rec in _fields(header, rows, problems):
        row, votes = {"key": rec["name"], "line": line, "patient": rec["name"]}, []
        if not row["key"]:
            problems.add(f"line {line}: the name is empty")
        for finding, c in FINDINGS.items():
            v = [_binary(rec[f"{r}:{finding}"]) for r in READERS]
            for r, x in zip(READERS, v):
                if x is None:
                    problems.add(f"line {line}: {r}:{finding} is {rec[f'{r}:{finding}']!r}; a reader's read is 0 or 1")
            n = sum(x or 0 for x in v)
            row[c] = int(n >= 2)
            votes.append(f"{finding} {n}/3")
        row["votes"] = " ".join(votes)
        out.append(row)
    problems.raise_any()
    classes = [c for c in CLASSES if c in FINDINGS.values()]
    return SiteLabels(path, "cq500", "name", classes, pd.DataFrame(out, columns=["key", "line", "patient", "votes",
                                                                                  *classes]))


def _check_rows(labels: SiteLabels) -> None:
    """A key given twice; a subtype marked without `any` (by the majority, for CQ500)."""
    problems, t = Problems(labels.path), labels.table
    for key, g in t[t.key.duplicated(keep=False)].groupby("key", sort=False):
        problems.add(f"lines {', '.join(map(str, g.line))}: {labels.key} {key!r} is given {len(g)} times (duplicates)")
    for row in t.itertuples():
        sub = [c for c in labels.classes[:-1] if getattr(row, c) == 1]
        if sub and row.any == 0:
            problems.add(f"line {row.line}: {', '.join(sub)} is 1 but any is 0" + (" by the readers' majority" if
                                                                                   labels.format == "cq500" else ""))
    problems.raise_any()


# ---------------------------------------------------------------- the scans under a folder
def top_folder(root: Path, path) -> str:
    """The folder directly under root that holds a file ('' for a file directly in root)."""
    parts = Path(path).relative_to(root).parts
    return parts[0] if len(parts) > 1 else ""


def inventory(dicom_dir) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(one row per study under the folder: StudyInstanceUID, patient, folder (None when its files lie in several),
    series, files; the readable files' headers (src.scans.read_headers); files that are not part of a study, with
    the reason), from the headers alone."""
    root = Path(dicom_dir)
    if not root.is_dir():
        raise PipelineError(f"--dicom-dir {root}: not a folder (the site's scans, one folder in any layout)")
    heads = read_headers(list_inputs([root]))
    ok = heads[heads.status == "ok"].copy()
    if "PatientID" not in ok:
        ok["PatientID"] = ""
    no_study = ok.StudyInstanceUID == ""
    unreadable = pd.concat([heads.loc[heads.status != "ok", ["path", "reason"]],
                            ok.loc[no_study, ["path"]].assign(reason="no StudyInstanceUID: the file belongs to no study")],
                           ignore_index=True)
    ok = ok[~no_study]
    rows = []
    for study, g in ok.groupby("StudyInstanceUID", sort=True):
        folders = {top_folder(root, p) for p in g.path}
        patients = sorted(set(g.PatientID.fillna("").astype(str)) - {""})
        rows.append({"StudyInstanceUID": study, "patient": patients[0] if patients else "",
                     "folder": folders.pop() if len(folders) == 1 else None,
                     "series": sorted(set(g.SeriesInstanceUID)), "files": g.path.tolist()})
    return pd.DataFrame(rows, columns=["StudyInstanceUID", "patient", "folder", "series", "files"]), ok, unreadable


def cq500_folders(name: str) -> set[str]:
    """The folder names CQ500's download gives the scan `name` (CQ500-CT-0: CQ500CT0 CQ500CT0)."""
    short = name.replace("-", "")
    return {name, short, f"{short} {short}"}


def _candidates(labels: SiteLabels, studies: pd.DataFrame) -> list[list[str]]:
    """Per label row, the studies it names."""
    by = {"StudyInstanceUID": {u: [u] for u in studies.StudyInstanceUID}, "SeriesInstanceUID": {}, "folder": {},
          "patient": {}}
    for s in studies.itertuples():
        for series in s.series:
            by["SeriesInstanceUID"].setdefault(series, []).append(s.StudyInstanceUID)
        if s.folder:
            by["folder"].setdefault(s.folder, []).append(s.StudyInstanceUID)
        if s.patient:
            by["patient"].setdefault(s.patient, []).append(s.StudyInstanceUID)
    if labels.format == "cq500":
        return [sorted(set(by["patient"].get(k, [])).union(*[by["folder"].get(f, []) for f in cq500_folders(k)]))
                for k in labels.table.key]
    return [sorted(set(by[labels.key].get(k, []))) for k in labels.table.key]


def match_labels(labels: SiteLabels, studies: pd.DataFrame, dicom_dir, unreadable: int = 0) -> pd.DataFrame:
    """The studies, each with its label row (key, line, the classes, patient, votes); a label naming no study or
    several, a study named by two rows, a study without a label: one error listing each."""
    problems = Problems(f"{labels.path} against the scans under {dicom_dir}")
    owner: dict[str, list[int]] = {}
    for i, (row, found) in enumerate(zip(labels.table.itertuples(), _candidates(labels, studies))):
        if not found:
            problems.add(f"line {row.line}: {labels.key} {row.key!r} names no study under {dicom_dir} (a label "
                         f"without scans)")
        elif len(found) > 1:
            problems.add(f"line {row.line}: {labels.key} {row.key!r} names {len(found)} studies ({', '.join(found[:3])}"
                         f"); key the labels by StudyInstanceUID")
        else:
            owner.setdefault(found[0], []).append(i)
    for study, idx in owner.items():
        if len(idx) > 1:
            problems.add(f"lines {', '.join(str(labels.table.line.iloc[i]) for i in idx)} all label study {study} "
                         f"(duplicates)")
    for s in studies.itertuples():
        if s.StudyInstanceUID not in owner:
            problems.add(f"study {s.StudyInstanceUID} (folder {s.folder or '-'!s}, patient {s.patient or '-'}, "
                         f"{len(s.files)} files) has no label (scans without a label): add a row for it, or move it "
                         f"out of {dicom_dir}")
    hint = (f"({unreadable} file(s) under {dicom_dir} could not be read at all; a study of only such files is not "
            f"found)") if unreadable else ""
    problems.raise_any(hint)
    rows = {study: labels.table.iloc[idx[0]] for study, idx in owner.items()}
    got = pd.DataFrame([rows[s] for s in studies.StudyInstanceUID]).reset_index(drop=True)
    return pd.concat([studies.reset_index(drop=True), got.rename(columns={"patient": "label_patient"})], axis=1)


# ---------------------------------------------------------------- figures, per scan
def _fig(value, draws) -> dict:
    return {"value": float(value), "ci": interval(draws)}


def _rates(w: np.ndarray, pos: np.ndarray, flag: np.ndarray, prevalence: float) -> dict:
    """Sensitivity, specificity, PPV and NPV at the sample's prevalence and at `prevalence`, for one weighting (n,)
    or many (draws, n)."""
    tp, fn = w @ (pos & flag), w @ (pos & ~flag)
    fp, tn = w @ (~pos & flag), w @ (~pos & ~flag)
    with np.errstate(invalid="ignore", divide="ignore"):
        sens, spec = tp / (tp + fn), tn / (tn + fp)
        a, b = sens * prevalence, (1 - spec) * (1 - prevalence)
        c, d = spec * (1 - prevalence), (1 - sens) * prevalence
        return {"sensitivity": sens, "specificity": spec, "ppv_site": tp / (tp + fp), "npv_site": tn / (tn + fn),
                "ppv_stated": a / (a + b), "npv_stated": c / (c + d)}


def at_threshold(y, p, t: float, weights: np.ndarray, prevalence: float) -> dict:
    """Counts and every rate at threshold t (a scan is flagged when its score reaches t), with intervals."""
    pos, flag = np.asarray(y) > 0.5, np.asarray(p) >= t
    point = _rates(np.ones(len(pos)), pos, flag, prevalence)
    many = _rates(weights, pos, flag, prevalence)
    out = {"threshold": float(t), "stated_prevalence": prevalence, "site_prevalence": float(pos.mean()),
           "counts": {"true_positive": int((pos & flag).sum()), "false_negative": int((pos & ~flag).sum()),
                      "false_positive": int((~pos & flag).sum()), "true_negative": int((~pos & ~flag).sum())}}
    out.update({k: _fig(point[k], many[k]) for k in point})
    return out


def brier(y, p, w=None) -> float:
    w = np.ones(len(y)) if w is None else w
    return float(w @ (np.asarray(p) - np.asarray(y)) ** 2 / w.sum())


def calibration(y, p, weights: np.ndarray) -> dict:
    """Reliability in BINS equal-width bins (scans, mean predicted, observed share), the expected calibration
    error (bins weighted by their scans) and the mean predicted against the observed share, with intervals."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    b = np.clip(np.digitize(p, np.linspace(0, 1, BINS + 1)) - 1, 0, BINS - 1)
    onehot = (b[:, None] == np.arange(BINS)).astype(float)           # (n, bins)

    def ece(w):
        n, sp, sy = w @ onehot, w @ (onehot * p[:, None]), w @ (onehot * y[:, None])
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.nansum(np.abs(sy - sp), axis=-1) / n.sum(axis=-1)

    bins = [{"bin": [k / BINS, (k + 1) / BINS], "scans": int((b == k).sum()), "mean_predicted": float(p[b == k].mean()),
             "observed": float(y[b == k].mean())} for k in range(BINS) if (b == k).any()]
    total = weights.sum(1)
    return {"bins": bins, "ece": _fig(ece(np.ones(len(y))), ece(weights)),
            "mean_predicted": _fig(p.mean(), weights @ p / total), "observed": _fig(y.mean(), weights @ y / total)}


def scan_figures(scans: pd.DataFrame, draws: Draws, threshold: float, prevalence: float, classes) -> dict:
    """The figures of scored scans (patient, y_<class> 0/1, p_<class> the scan's score): AUC per class with both
    label values present, Brier score per class, every rate at `threshold` on `any`, calibration of `any`."""
    w = draws.weights(scans["patient"])
    w = w[w.sum(1) > 0]
    out = {"scans": len(scans), "patients": int(scans["patient"].nunique()), "positive": {}, "auc": {}, "brier": {}}
    for c in classes:
        y, p = scans[f"y_{c}"].to_numpy(float), scans[f"p_{c}"].to_numpy(float)
        out["positive"][c] = int(y.sum())
        out["brier"][c] = _fig(brier(y, p), [brier(y, p, x) for x in w])
        if 0 < y.sum() < len(y):
            order = np.argsort(p, kind="stable")
            out["auc"][c] = _fig(auc_weighted(y, p, None, order), [auc_weighted(y, p, x, order) for x in w])
    y, p = scans["y_any"].to_numpy(float), scans["p_any"].to_numpy(float)
    out["at_threshold"] = at_threshold(y, p, threshold, w, prevalence)
    out["calibration"] = calibration(y, p, w)
    return out


def by_group(scans: pd.DataFrame, draws: Draws, threshold: float, prevalence: float, classes) -> dict:
    """The figures per manufacturer, scanner model and kernel, for each the headers name (a value the headers do
    not give is '(not in the headers)')."""
    out = {}
    for name, col in GROUPS.items():
        values = scans[col].fillna("").astype(str)
        if not (values != "").any():
            continue
        out[name] = {v or "(not in the headers)": scan_figures(g, draws, threshold, prevalence, classes)
                     for v, g in scans.groupby(values.to_numpy(), sort=True)}
    return out


def parse_target(text: str) -> float:
    """`sensitivity=0.95` -> 0.95."""
    name, _, value = text.partition("=")
    try:
        target = float(value)
    except ValueError:
        target = float("nan")
    if name.strip() != "sensitivity" or not 0 < target <= 1:
        raise PipelineError(f"--choose-threshold {text!r}: expected sensitivity=S with 0 < S <= 1 (the share of "
                            f"bleeding scans the site's threshold must flag), e.g. sensitivity=0.95")
    return target


def choose_threshold(y, p, target: float, draws: Draws, patients, prevalence: float) -> dict:
    """The highest threshold flagging at least `target` of the bleeding scans (src.metrics.operating_point), its
    interval (the threshold chosen again on each bootstrap draw) and the rates there (on the scans it was chosen
    on: optimistic, stated)."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    t = operating_point(y, p, target)
    if t != t:
        raise PipelineError("--choose-threshold: no bleeding scan among the scored scans, so no threshold can be "
                            "chosen for a sensitivity")
    w = draws.weights(patients)
    w = w[w.sum(1) > 0]
    ts = [operating_point(np.repeat(y, x.astype(int)), np.repeat(p, x.astype(int)), target) for x in w]
    return {"target_sensitivity": target, "threshold": float(t), "threshold_ci": interval(ts),
            "at_threshold": at_threshold(y, p, t, w, prevalence)}
