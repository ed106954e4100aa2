"""The Kaggle submission file's format: built from a wide prediction table, validated against the sample submission.

src.make_submission writes one with it, src.upload checks one with it before sending it.

A valid stage-2 file has the header `ID,Label`, exactly the IDs of `stage_2_sample_submission.csv`
in its order (six rows per image), no NaN, and every value in [0, 1]. A file that is empty, not UTF-8
or not a CSV is refused with the same kind of message (PipelineError: `error: ...`, exit code 2 in CLIs).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .labels import read_sample_submission, read_user_csv, to_long
from .utils import CLASSES, PipelineError, write_csv

# Submissions are clipped away from 0 and 1: one confident mistake at 1e-15 costs 34 nats, at 1e-5 only 11.5.
CLIP = 1e-5


def _few(ids, n=5):
    ids = list(ids)
    return f"{len(ids)} ({', '.join(map(str, ids[:n]))}{', ...' if len(ids) > n else ''})"


def validate(df: pd.DataFrame, sample_ids: pd.Series, name="submission") -> None:
    """Raise PipelineError describing every way df differs from a valid submission."""
    if list(df.columns) != ["ID", "Label"]:
        raise PipelineError(f"{name}: header must be 'ID,Label', found {','.join(map(str, df.columns))}")
    problems = []
    ids = df["ID"].fillna("(empty)").astype(str)  # an empty field reads as NaN, which cannot be sorted with IDs
    dup = ids[ids.duplicated()]
    if len(dup):
        problems.append(f"duplicated IDs: {_few(dup.unique())}")
    have, want = set(ids), set(sample_ids)
    if have - want:
        problems.append(f"extra IDs (not in the sample submission): {_few(sorted(have - want))}")
    if want - have:
        problems.append(f"missing IDs: {_few(sorted(want - have))}")
    if not problems and not (ids.to_numpy() == sample_ids.to_numpy()).all():
        first = int(np.argmax(ids.to_numpy() != sample_ids.to_numpy()))
        # a file read by read_user_csv is indexed by its line numbers, blank lines counted
        where = f"line {df.index[first]}" if df.index.name == "line" else f"row {first + 2}"
        problems.append(f"IDs not in the sample submission's order (first difference at {where})")
    labels = pd.to_numeric(df["Label"], errors="coerce")
    if labels.isna().any():
        problems.append(f"NaN or non-numeric labels: {_few(ids[labels.isna()])}")
    out = (labels < 0) | (labels > 1)
    if out.any():
        problems.append(f"labels outside [0, 1]: {_few(ids[out])}")
    if problems:
        raise PipelineError(f"{name} is not a valid submission:\n  " + "\n  ".join(problems))


def build(wide: pd.DataFrame, sample_path) -> pd.DataFrame:
    """Wide predictions (index image ID, six columns) -> long submission in the sample's order, validated."""
    sample_ids, _ = read_sample_submission(sample_path)
    if wide[CLASSES].isna().any().any():
        raise PipelineError(f"predictions contain NaN for {_few(wide.index[wide[CLASSES].isna().any(axis=1)])}")
    long = to_long(wide.assign(**{c: np.clip(wide[c].to_numpy(dtype=float), CLIP, 1 - CLIP) for c in CLASSES}))
    have, want = set(long["ID"]), set(sample_ids)
    if have != want:
        raise PipelineError("predictions do not match the sample submission: "
                            f"missing {_few(sorted(want - have))}; extra {_few(sorted(have - want))}")
    long = long.set_index("ID").loc[sample_ids.to_numpy()].reset_index()
    validate(long, sample_ids)
    return long


def write(long: pd.DataFrame, path) -> Path:
    write_csv(long, path, index=False, float_format="%.6f")
    return Path(path)


def validate_file(path, sample_path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"submission file not found: {path}")
    df = read_user_csv(path, "a submission CSV with header ID,Label (python -m src.make_submission writes one)",
                       dtype={"ID": str})
    sample_ids, _ = read_sample_submission(sample_path)
    validate(df, sample_ids, name=str(path))
    return df.reset_index(drop=True)
