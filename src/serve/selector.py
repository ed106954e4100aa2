"""Which series of a study the model scores: rules on the headers alone, read from a file a site can change.

    from src.serve.selector import SeriesRules, select
    rules = SeriesRules.load()                             # configs/serve/series_rules.yaml, or a site's copy
    decisions = select(read_headers(paths), rules)         # one row per series: scored or not, and why

A PACS sends whole studies; the model learned original axial non-contrast head CT slices in a soft-tissue kernel
(docs/series.md). `classify` applies the rules of configs/serve/series_rules.yaml to one series (every slice's
header, `src.scans.read_headers`) and says the first rule it breaks, or the notes it is scored with; `select` does
it for every series of every study and picks, per study, the eligible series closest to the training data (a known
soft-tissue kernel, then a thickness in the preferred range, then the most slices), or every eligible series with
`all_series`. The demo, the page, the node and src.serve.validate pass `select` to `Predictor.analyse`.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from ..layout import ROOT
from ..utils import PipelineError

DEFAULT_RULES = ROOT / "configs" / "serve" / "series_rules.yaml"

# ConvolutionKernel per vendor -> soft or sharp. Siemens: a letter or two (H head, J, Q, B body, I, D, U, V, T, S;
# Hr, Br, Qr, ...: ADMIRE/SAFIRE "regular") and the sharpness: 10-49 soft tissue, 60 and over bone. Canon/Toshiba:
# FC and a number: below 30 soft (FC21-FC26 brain), 30-39 bone, 50-59 lung, 80-89 bone. GE and Philips by name.
SIEMENS = r"^(HR|BR|QR|JR|IR|DR|HN|HC|H|B|J|Q|D|I|U|V|T|S)(\d{2})"
CANON = r"^FC(\d{2})"
GE = {"soft": {"STANDARD", "STND", "SOFT", "SMOOTH", "BRAIN", "NEURO", "HEAD"},
      "sharp": {"BONE", "BONEPLUS", "EDGE", "LUNG", "DETAIL", "SHARP", "CHEST", "ULTRA"}}
# words that name a bone or lung kernel whatever the vendor or the spelling ("HD BONE", "BONE PLUS", "Bone" under
# another vendor's name): sharp, before any table is read
SHARP_WORDS = {"BONE", "BONEPLUS", "LUNG", "EDGE", "SHARP"}
PHILIPS = {"soft": {"A", "B", "C", "UA", "UB", "UC", "MA", "MB", "MC"},
           "sharp": {"D", "E", "L", "YA", "YB", "YC", "YD", "EA", "EB", "EC"}}


def _words(kernel: str) -> set[str]:
    """A kernel name's words ("HD BONE" -> {"HD", "BONE"})."""
    return set(re.split(r"[^A-Z0-9]+", kernel)) - {""}


def _by_number(n: int, soft: range, sharp: tuple[range, ...]) -> str:
    return "soft" if n in soft else "sharp" if any(n in r for r in sharp) else "unknown"


def _vendor_kind(vendor: str, k: str) -> str:
    if vendor == "siemens":
        m = re.match(SIEMENS, k)
        return _by_number(int(m.group(2)), range(10, 50), (range(60, 100),)) if m else "unknown"
    if vendor == "canon":
        m = re.match(CANON, k)
        return _by_number(int(m.group(1)), range(0, 30), (range(30, 40), range(50, 60), range(80, 90))) if m else "unknown"
    if vendor == "ge":  # by name, or by its words ("HD STANDARD", "SOFT TISSUE")
        return next((kind for kind, names in GE.items() if k in names or _words(k) & names), "unknown")
    return next((kind for kind, names in PHILIPS.items() if k in names), "unknown")


VENDORS = {"siemens": "siemens", "ge ": "ge", "ge": "ge", "general electric": "ge", "philips": "philips",
           "canon": "canon", "toshiba": "canon"}
# ContrastBolusAgent values that say "none", compared as words (case and punctuation dropped: "N/A" is "N A",
# "Non-contrast" is "NON CONTRAST", "-" is empty)
NO_CONTRAST = {"", "NONE", "NONE GIVEN", "NOT GIVEN", "NO", "N", "NA", "N A", "NIL", "0", "NO CONTRAST",
               "NO CONTRAST AGENT", "NON CONTRAST", "NONCONTRAST", "WITHOUT", "WITHOUT CONTRAST"}


def contrast_words(agent: str) -> str:
    """A ContrastBolusAgent value as upper-case words, punctuation dropped (what NO_CONTRAST is compared with)."""
    return re.sub(r"[^A-Z0-9]+", " ", agent.upper()).strip()


@dataclass
class SeriesRules:
    """The rules of configs/serve/series_rules.yaml (each is documented there)."""
    sop_classes: list = field(default_factory=lambda: ["1.2.840.10008.5.1.4.1.1.2"])
    refused_image_types: list = field(default_factory=lambda: ["DERIVED", "SECONDARY", "REFORMATTED", "MPR", "MIP",
                                                               "MINIP", "LOCALIZER", "PROJECTION IMAGE", "CURVED"])
    max_tilt_degrees: float = 40.0
    unknown_kernel: str = "allow"
    slice_thickness_mm: list = field(default_factory=lambda: [0.5, 10.0])
    slice_spacing_mm: list = field(default_factory=lambda: [0.4, 10.0])
    field_of_view_mm: list = field(default_factory=lambda: [120.0, 500.0])
    min_slices: int = 5
    max_slices: int = 1000
    max_gap_ratio: float = 2.5
    uneven_ratio: float = 1.25
    refuse_contrast: bool = True
    preferred_thickness_mm: list = field(default_factory=lambda: [2.5, 5.0])
    all_series: bool = False
    source: str = "built-in defaults"  # the file the rules came from (not a rule)

    @classmethod
    def load(cls, path=None) -> SeriesRules:
        """The rules of `path` (default configs/serve/series_rules.yaml); an unknown key or a wrong value is an error
        naming the file and the key."""
        path = Path(path) if path else DEFAULT_RULES
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise PipelineError(f"{path}: not a readable series rules file ({type(e).__name__}: {e})") from e
        if not isinstance(data, dict):
            raise PipelineError(f"{path}: a series rules file is a YAML mapping of rule: value")
        names = {f.name for f in dataclasses.fields(cls)} - {"source"}
        unknown = sorted(set(data) - names)
        if unknown:
            raise PipelineError(f"{path}: unknown rule(s) {unknown}; the rules are {sorted(names)} "
                                f"(configs/serve/series_rules.yaml documents each)")
        rules = cls(**data, source=str(path))
        rules.check(path)
        return rules

    def check(self, path) -> None:
        for name in ("slice_thickness_mm", "slice_spacing_mm", "field_of_view_mm", "preferred_thickness_mm"):
            v = getattr(self, name)
            if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v) and v[0] <= v[1]):
                raise PipelineError(f"{path}: {name} must be [low, high] in mm, got {v!r}")
        if self.unknown_kernel not in ("allow", "refuse"):
            raise PipelineError(f"{path}: unknown_kernel must be allow or refuse, got {self.unknown_kernel!r}")
        for name in ("max_tilt_degrees", "max_gap_ratio", "uneven_ratio", "min_slices", "max_slices"):
            if not isinstance(getattr(self, name), (int, float)) or isinstance(getattr(self, name), bool) \
                    or getattr(self, name) <= 0:
                raise PipelineError(f"{path}: {name} must be a number > 0, got {getattr(self, name)!r}")
        for name in ("refuse_contrast", "all_series"):
            if not isinstance(getattr(self, name), bool):
                raise PipelineError(f"{path}: {name} must be true or false, got {getattr(self, name)!r}")


def kernel_kind(kernel: str, manufacturer: str) -> str:
    """'soft', 'sharp' or 'unknown' for a ConvolutionKernel, by the vendor's table; when the vendor is not named,
    by every table, and a kernel two tables read differently stays unknown."""
    k = kernel.upper().split("\\")[0].strip()
    if not k:
        return "unknown"
    if _words(k) & SHARP_WORDS:
        return "sharp"
    m = manufacturer.lower()
    vendor = next((v for name, v in VENDORS.items() if m.startswith(name) or f" {name}" in f" {m}"), None)
    kinds = {_vendor_kind(v, k) for v in ([vendor] if vendor else ["siemens", "canon", "ge", "philips"])} - {"unknown"}
    return kinds.pop() if len(kinds) == 1 else "unknown"


def _span(values: pd.Series) -> str:
    v = values.dropna().unique()
    return "" if len(v) == 0 else f"{v[0]:g}" if len(v) == 1 else f"{v.min():g}-{v.max():g}"


def series_geometry(g: pd.DataFrame) -> dict:
    """Slices, median step along the normal, largest step, duplicated positions and tilt of one series' headers."""
    z = np.sort(g["z"].dropna().to_numpy(float))
    steps = np.diff(z)
    med = float(np.median(steps)) if len(steps) else float("nan")
    cos = g["normal_z"].dropna()
    return {"slices": len(g), "spacing_mm": med, "max_step_mm": float(steps.max()) if len(steps) else float("nan"),
            "duplicates": int((steps < 0.1 * med).sum()) if med > 0 else 0,
            "tilt_degrees": math.degrees(math.acos(min(1.0, float(cos.min())))) if len(cos) else float("nan")}


def classify(g: pd.DataFrame, rules: SeriesRules) -> tuple[str, list[str], dict]:
    """(the first rule one series breaks, '' when none; notes it is scored with; its geometry) from its slices'
    headers (src.scans.read_headers rows)."""
    first = g.iloc[0]
    geo = series_geometry(g)
    notes = []
    other = sorted(set(g["Modality"]) - {"CT", ""})
    if other:
        return f"Modality {other[0]}, not CT", notes, geo
    sop = sorted(set(g["SOPClassUID"]) - {""} - set(rules.sop_classes))
    if sop:
        return f"not a CT image (SOP class {sop[0]})", notes, geo
    if (g["frames"] > 1).any():
        return "a multi-frame object, not single slices", notes, geo
    types = set("\\".join(g["ImageType"]).split("\\")) - {""}
    bad = sorted(types & {t.upper() for t in rules.refused_image_types})
    if bad:
        return f"ImageType {'/'.join(bad)}: not an original axial acquisition", notes, geo
    if not types:
        notes.append("no ImageType in the headers (taken as an original acquisition)")
    if not geo["tilt_degrees"] == geo["tilt_degrees"]:
        return "no ImageOrientationPatient: the slice plane is unknown", notes, geo
    if geo["tilt_degrees"] > rules.max_tilt_degrees:
        plane = "sagittal or coronal" if geo["tilt_degrees"] > 60 else "oblique"
        return (f"{plane} slices: the slice normal is {geo['tilt_degrees']:.0f} degrees from the patient's z axis "
                f"(at most {rules.max_tilt_degrees:g})"), notes, geo
    kernels = sorted(set(g["ConvolutionKernel"]) - {""})
    kinds = {kernel_kind(k, str(first["Manufacturer"])) for k in kernels} or {"unknown"}
    if "sharp" in kinds:
        return f"kernel {'/'.join(kernels)}: a bone or sharp kernel, not soft tissue", notes, geo
    if "unknown" in kinds:
        if rules.unknown_kernel == "refuse":
            return f"kernel {'/'.join(kernels) or '(none given)'}: not in the kernel table", notes, geo
        notes.append(f"kernel {'/'.join(kernels) or '(none given)'} not in the kernel table (allowed)")
    agents = sorted({a for a in g["ContrastBolusAgent"] if contrast_words(a) not in NO_CONTRAST})
    if rules.refuse_contrast and agents:
        return f"contrast agent {agents[0]!r}: the model learned non-contrast CT", notes, geo
    return geometry_problem(g, geo, rules, notes), notes, geo


def geometry_problem(g: pd.DataFrame, geo: dict, rules: SeriesRules, notes: list) -> str:
    """The first geometry rule the series breaks ('' when none); an uneven spacing within the gap rule is a note."""
    sources = g["z_source"].value_counts()
    if len(sources) > 1:  # positions in one series from different tags are not comparable (mm along two axes, or
        # slice numbers beside millimetres): a slice would be put in the wrong place, silently
        return ("slice positions from different tags (" + ", ".join(f"{s} on {n}" for s, n in sources.items()) +
                "): some slices lack ImagePositionPatient or ImageOrientationPatient, so their places are unknown")
    if sources.index[0] in ("InstanceNumber", "missing"):
        return ("no ImagePositionPatient or SliceLocation: the slices' positions and spacing are unknown "
                "(InstanceNumber orders slices, in slices, not millimetres)")
    if sources.index[0] == "SliceLocation":
        notes.append("positions from SliceLocation (no ImagePositionPatient)")
    lo, hi = rules.min_slices, rules.max_slices
    if not lo <= geo["slices"] <= hi:
        return f"{geo['slices']} slice(s): a head CT series has {lo} to {hi}"
    thick = g["SliceThickness"].dropna()
    a, b = rules.slice_thickness_mm
    if len(thick) and not ((thick >= a) & (thick <= b)).all():
        return f"slice thickness {_span(thick)} mm, outside {a:g}-{b:g} mm"
    a, b = rules.slice_spacing_mm
    if geo["duplicates"]:
        notes.append(f"{geo['duplicates']} slice(s) at the position of another (a repeated or overlapping slice: its "
                     f"neighbour is its twin)")
    if not a <= geo["spacing_mm"] <= b:
        return f"slices {geo['spacing_mm']:.3g} mm apart, outside {a:g}-{b:g} mm"
    ratio = geo["max_step_mm"] / geo["spacing_mm"]
    if ratio > rules.max_gap_ratio:
        return (f"a gap of {geo['max_step_mm']:.3g} mm between slices {geo['spacing_mm']:.3g} mm apart: missing "
                f"slices (2.5D input and the sequence model read neighbours)")
    if ratio > rules.uneven_ratio:
        notes.append(f"uneven spacing: largest step {geo['max_step_mm']:.3g} mm, median {geo['spacing_mm']:.3g} mm")
    fov = (g["pixel_mm"] * g["cols"]).dropna()
    a, b = rules.field_of_view_mm
    if len(fov) and not ((fov >= a) & (fov <= b)).all():
        return f"field of view {_span(fov.round(0))} mm, outside a head's {a:g}-{b:g} mm"
    return ""


def preference(g: pd.DataFrame, notes: list[str], rules: SeriesRules) -> tuple:
    """Sort key of an eligible series, best first: a known soft-tissue kernel, a preferred thickness, most slices."""
    thick = g["SliceThickness"].dropna()
    lo, hi = rules.preferred_thickness_mm
    spacing = series_geometry(g)["spacing_mm"]
    t = float(thick.median()) if len(thick) else spacing
    return (any("kernel" in n for n in notes), not lo <= t <= hi, -len(g))


SERIES_COLUMNS = ["StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "files", "slices",
                  "spacing_mm", "tilt_degrees", "kernel", "scored", "reason", "notes"]


def select(headers: pd.DataFrame, rules: SeriesRules | None = None, all_series: bool | None = None) -> pd.DataFrame:
    """One row per series of `headers` (readable files only: src.scans.read_headers rows with status ok), in study and
    series-number order: whether it is scored and, when not, why (a rule, or "another series of the study was
    closer to the training data"); notes it is scored with."""
    rules = rules or SeriesRules.load()
    every = rules.all_series if all_series is None else all_series
    rows = []
    studies_of = headers.groupby("SeriesInstanceUID")["StudyInstanceUID"].nunique()
    for (study, series), g in headers.groupby(["StudyInstanceUID", "SeriesInstanceUID"], sort=False):
        why, notes, geo = classify(g, rules)
        if studies_of[series] > 1:  # downstream a series is its SeriesInstanceUID: two studies' slices would mix
            why = "its SeriesInstanceUID also names a series of another study (a UID is unique): not mixed with it"
        rows.append({"StudyInstanceUID": study, "SeriesInstanceUID": series, "SeriesNumber": g["SeriesNumber"].iloc[0],
                     "SeriesDescription": g["SeriesDescription"].iloc[0], "files": len(g), "slices": geo["slices"],
                     "spacing_mm": round(geo["spacing_mm"], 3), "tilt_degrees": round(geo["tilt_degrees"], 1),
                     "kernel": "/".join(sorted(set(g["ConvolutionKernel"]) - {""})), "scored": not why,
                     "reason": why, "notes": "; ".join(notes), "_key": preference(g, notes, rules) if not why else None})
    out = pd.DataFrame(rows, columns=[*SERIES_COLUMNS, "_key"]).astype({"scored": bool})
    if not every:
        for _, idx in out[out["scored"]].groupby("StudyInstanceUID").groups.items():
            best = min(idx, key=lambda i: out.at[i, "_key"])
            for i in idx:
                if i != best:
                    out.at[i, "scored"] = False
                    out.at[i, "reason"] = (f"eligible, but series {out.at[best, 'SeriesNumber'] or out.at[best, 'SeriesInstanceUID']}"
                                           f" of the study is closer to the training data (one result per study; "
                                           f"--all-series scores every eligible series)")
    num = pd.to_numeric(out["SeriesNumber"], errors="coerce")
    return out.assign(_n=num).sort_values(["StudyInstanceUID", "_n", "SeriesInstanceUID"], na_position="last") \
        .drop(columns=["_key", "_n"]).reset_index(drop=True)
