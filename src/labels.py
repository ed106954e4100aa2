"""Kaggle's long label format (`ID_<image>_<subtype>,Label`) to one row per image, and back.

    python -m src.labels input/stage_2_train.csv      # prints a per-class summary

The label file is parsed once per data folder: `cached_labels` keeps the wide table in OUT/cache/labels.csv
beside the source's size, time and hash, and every step reads that (~0.3 s against ~16 s at full size).
The real `stage_2_train.csv` repeats some rows. Exact repeats are dropped; a repeat that disagrees
stops the run and names the IDs, because no rule can tell which of the two labels is right.
Every CSV the pipeline reads from the user goes through `read_user_csv`: an empty, non-UTF-8 or ragged file
is a PipelineError naming the file, and errors give the row's line number in the file (blank lines
included).
"""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import layout
from .config import parse_config, positional
from .stamps import file_fingerprint
from .utils import CLASSES, PipelineError, cli_main, write_csv, write_json

_ID_RE = re.compile(r"^ID_([0-9a-fA-F]+)_([a-z]+)$")


def read_user_csv(path, what: str, **kw) -> pd.DataFrame:
    """pd.read_csv of a user's file, indexed by each row's line number in the file (header: line 1).

    The ways a file can fail to be a CSV (empty, not UTF-8, rows longer than the header, unparsable)
    raise PipelineError naming the file and `what` it should be. pandas would skip blank lines and so
    shift positional line numbers: they are read as empty rows, numbered, then dropped."""
    path = Path(path)
    try:  # only empty fields are missing: 'NA' or 'null' stay text and fail validation where they stand
        df = pd.read_csv(path, skip_blank_lines=False, keep_default_na=False, na_values=[""], **kw)
    except pd.errors.EmptyDataError:
        raise PipelineError(f"{path}: {'empty file (0 bytes)' if path.stat().st_size == 0 else 'no header on line 1'}; "
                            f"expected {what}") from None
    except UnicodeDecodeError as e:
        raise PipelineError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start:e.start + 1].hex()}); "
                            f"expected {what}, saved as UTF-8 CSV") from None
    except (pd.errors.ParserError, OSError) as e:
        raise PipelineError(f"{path}: cannot be read as CSV ({str(e).strip().splitlines()[0][:160]}); "
                            f"expected {what}") from None
    if not isinstance(df.index, pd.RangeIndex):  # pandas made the first column the index: rows outgrow the header
        raise PipelineError(f"{path}: rows have more fields than the header {list(df.columns)}; expected {what}")
    df.index = pd.RangeIndex(2, len(df) + 2, name="line")
    return df.dropna(how="all")


def split_long_ids(ids: pd.Series, source="labels") -> pd.DataFrame:
    """`ID_<hex>_<subtype>` -> columns image_id (`ID_<hex>`) and subtype; bad IDs raise with their line
    numbers, which are the index of `ids` (as `read_user_csv` gives them)."""
    parts = ids.astype(str).str.extract(_ID_RE)
    bad = parts[0].isna()
    if bad.any():
        lines = ids.index[bad][:5]
        raise PipelineError(
            f"{source}: {int(bad.sum())} malformed ID(s), expected ID_<hex>_<subtype>; "
            f"first at line(s) {lines.tolist()}: {ids[bad].head(5).tolist()}")
    unknown = ~parts[1].isin(CLASSES)
    if unknown.any():
        lines = ids.index[unknown][:5]
        raise PipelineError(
            f"{source}: unknown subtype(s) {sorted(set(parts[1][unknown]))[:5]} at line(s) {lines.tolist()}; "
            f"known: {CLASSES}")
    return pd.DataFrame({"image_id": "ID_" + parts[0], "subtype": parts[1]}, index=ids.index)


def read_labels(path) -> pd.DataFrame:
    """Read stage_2_train.csv into a DataFrame indexed by image ID with the six classes (uint8)."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"label file not found: {path} (expected Kaggle's stage_2_train.csv)")
    raw = read_user_csv(path, "Kaggle's stage_2_train.csv (header ID,Label)", dtype={"ID": str, "Label": str})
    if list(raw.columns) != ["ID", "Label"]:
        raise PipelineError(f"{path}: header must be 'ID,Label', found {list(raw.columns)}")
    if raw.empty:
        raise PipelineError(f"{path}: no label rows under the header; expected Kaggle's stage_2_train.csv")
    labels = pd.to_numeric(raw["Label"], errors="coerce")
    bad = labels.isna() | ~labels.isin([0, 1])
    if bad.any():
        lines = raw.index[bad][:5]
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


def cached_labels(data_dir, out_dir=None, cache=None) -> tuple[pd.DataFrame, str]:
    """(wide label table by image ID, the label file's fingerprint), from OUT/cache/labels.csv (or `cache`)
    when that was made from the same file: parsing the 4.5 M-row long format costs ~16 s, reading this ~0.3 s."""
    src = Path(data_dir) / layout.LABELS_CSV
    if not src.exists():
        read_labels(src)  # the standard error message
    cache = Path(cache) if cache else layout.cache_dir(data_dir, out_dir)
    files = layout.cache_files(cache)
    table, info = files["labels"], files["labels_info"]
    st = src.stat()
    quick = {"source": str(src.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if table.exists() and info.exists():
        rec = json.loads(info.read_text())
        if {k: rec.get(k) for k in quick} == quick or (rec.get("size") == st.st_size and
                                                       rec.get("sha") == file_fingerprint(src)):
            return pd.read_csv(table, dtype={"ID": str}).set_index("ID").astype(np.uint8), rec["sha"]
    wide = read_labels(src)
    sha = file_fingerprint(src)
    try:
        write_csv(wide, table)
        write_json({**quick, "sha": sha, "images": len(wide)}, info)
    except OSError:  # a read-only outputs folder: parse every time rather than fail
        pass
    return wide, sha


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
    df = read_user_csv(path, "Kaggle's stage_2_sample_submission.csv (header ID,Label)", dtype={"ID": str})
    if "ID" not in df.columns:
        raise PipelineError(f"{path}: no 'ID' column")
    if df.empty:
        raise PipelineError(f"{path}: no rows under the header; expected Kaggle's stage_2_sample_submission.csv")
    parts = split_long_ids(df["ID"], source=str(path))
    return df["ID"].reset_index(drop=True), list(dict.fromkeys(parts["image_id"]))


@dataclass
class LabelsConfig:
    csv: str = positional("input/stage_2_train.csv")  # a label file in Kaggle's long format (stage_2_train.csv)


def main():
    a = parse_config(LabelsConfig, description=__doc__, prog="python -m src.labels")
    wide = read_labels(a.csv)
    print(f"{len(wide)} images")
    print((wide.mean() * 100).round(2).to_string())


if __name__ == "__main__":
    cli_main(main)
