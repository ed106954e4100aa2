"""Kaggle's long label format (`ID_<image>_<subtype>,Label`) to one row per image, and back.

    python -m src.labels input/stage_2_train.csv      # prints a per-class summary

The real `stage_2_train.csv` repeats some rows. Exact repeats are dropped; a repeat that disagrees
stops the run and names the IDs, because no rule can tell which of the two labels is right.
"""
from __future__ import annotations

import argparse
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from .utils import CLASSES, PipelineError, cli_main

_ID_RE = re.compile(r"^ID_([0-9a-fA-F]+)_([a-z]+)$")


def split_long_ids(ids: pd.Series, source="labels") -> pd.DataFrame:
    """`ID_<hex>_<subtype>` -> columns image_id (`ID_<hex>`) and subtype; bad IDs raise with line numbers."""
    parts = ids.astype(str).str.extract(_ID_RE)
    bad = parts[0].isna()
    if bad.any():
        lines = (np.flatnonzero(bad.to_numpy()) + 2)[:5]  # +2: 1-based and the header line
        raise PipelineError(
            f"{source}: {int(bad.sum())} malformed ID(s), expected ID_<hex>_<subtype>; "
            f"first at line(s) {lines.tolist()}: {ids[bad].head(5).tolist()}")
    unknown = ~parts[1].isin(CLASSES)
    if unknown.any():
        lines = (np.flatnonzero(unknown.to_numpy()) + 2)[:5]
        raise PipelineError(
            f"{source}: unknown subtype(s) {sorted(set(parts[1][unknown]))[:5]} at line(s) {lines.tolist()}; "
            f"known: {CLASSES}")
    return pd.DataFrame({"image_id": "ID_" + parts[0], "subtype": parts[1]}, index=ids.index)


def read_labels(path) -> pd.DataFrame:
    """Read stage_2_train.csv into a DataFrame indexed by image ID with the six classes (uint8)."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"label file not found: {path} (expected Kaggle's stage_2_train.csv)")
    raw = pd.read_csv(path, dtype={"ID": str, "Label": str})
    if list(raw.columns) != ["ID", "Label"]:
        raise PipelineError(f"{path}: header must be 'ID,Label', found {list(raw.columns)}")
    labels = pd.to_numeric(raw["Label"], errors="coerce")
    bad = labels.isna() | ~labels.isin([0, 1])
    if bad.any():
        lines = (np.flatnonzero(bad.to_numpy()) + 2)[:5]
        raise PipelineError(f"{path}: labels must be 0 or 1; bad value(s) at line(s) {lines.tolist()}: "
                            f"{raw['Label'][bad].head(5).tolist()}")
    raw["Label"] = labels.astype(np.uint8)
    parts = split_long_ids(raw["ID"], source=str(path))
    raw = pd.concat([raw, parts], axis=1)

    n_before = len(raw)
    raw = raw.drop_duplicates(subset=["ID", "Label"])
    n_exact = n_before - len(raw)
    conflict = raw["ID"].duplicated(keep=False)
    if conflict.any():
        ids = sorted(raw.loc[conflict, "ID"].unique())
        raise PipelineError(f"{path}: {len(ids)} ID(s) appear with different labels, cannot tell which is right: "
                            f"{ids[:10]}{' ...' if len(ids) > 10 else ''}. Remove the wrong rows and rerun.")
    if n_exact:
        warnings.warn(f"{path}: dropped {n_exact} exactly duplicated row(s)", stacklevel=2)

    wide = raw.pivot(index="image_id", columns="subtype", values="Label").reindex(columns=CLASSES)
    missing = wide.isna().any(axis=1)
    if missing.any():
        raise PipelineError(f"{path}: every image needs all six subtypes; {int(missing.sum())} incomplete image(s): "
                            f"{wide.index[missing].tolist()[:10]}")
    wide = wide[CLASSES].astype(np.uint8).sort_index()
    wide.index.name = "ID"
    wide.columns.name = None

    inconsistent = (wide[CLASSES[:5]].max(axis=1) != wide["any"]).sum()
    if inconsistent:
        warnings.warn(f"{path}: {int(inconsistent)} image(s) where 'any' is not the OR of the five subtypes",
                      stacklevel=2)
    return wide


def to_long(wide: pd.DataFrame) -> pd.DataFrame:
    """One row per image with the six columns -> Kaggle's `ID,Label` rows (image-major, Kaggle's class order)."""
    missing = [c for c in CLASSES if c not in wide.columns]
    if missing:
        raise PipelineError(f"prediction table lacks column(s) {missing}")
    values = wide[CLASSES].to_numpy()
    ids = np.repeat(wide.index.to_numpy().astype(str), len(CLASSES))
    subtypes = np.tile(np.array(CLASSES), len(wide))
    return pd.DataFrame({"ID": np.char.add(np.char.add(ids, "_"), subtypes), "Label": values.reshape(-1)})


def read_sample_submission(path) -> tuple[pd.Series, list[str]]:
    """Return the sample submission's long IDs (in order) and its image IDs (first-seen order)."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"sample submission not found: {path}")
    df = pd.read_csv(path, dtype={"ID": str})
    if "ID" not in df.columns:
        raise PipelineError(f"{path}: no 'ID' column")
    parts = split_long_ids(df["ID"], source=str(path))
    return df["ID"], list(dict.fromkeys(parts["image_id"]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", help="stage_2_train.csv")
    args = ap.parse_args()
    wide = read_labels(args.csv)
    print(f"{len(wide)} images")
    print((wide.mean() * 100).round(2).to_string())


if __name__ == "__main__":
    cli_main(main)
