"""Multilabel-stratified K folds over patients, written to folds/ as a CSV keyed by image ID.

    python -m src.folds --k 5 --fold-seed 42                      # data input/, file folds/input_k5_seed42.csv
    python -m src.folds ../shared/rsna_sample --k 3

Every slice of a patient lands in one fold (a patient's slices are near-duplicates of each other, so
splitting them would leak). Patients are stratified on per-patient label presence (does the patient
have any slice of each subtype, and any bleed at all) with iterative stratification, which keeps the
rare subtypes (epidural) spread evenly. Only labelled slices that the cache could read are assigned;
labelled images without a file or with an unreadable one are counted and named, and left out.
Same inputs, same file: patients are sorted before the seeded split. The standard file
(folds/<data>_k<K>_seed<S>.csv) that no longer matches its data is rewritten, and the runs trained on the
old one then stop (their fingerprint names the folds file). A file of your own (`--folds-file` elsewhere)
that exists is never rewritten: it is checked (known, readable, labelled images; each patient in one fold;
folds 0..K-1) and used as it is.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

from . import layout
from .config import parse_config, positional
from .labels import cached_labels
from .cache import load_cache
from .runs import load_folds
from .stamps import announce_run, announce_skip
from .utils import CLASSES, PipelineError, cli_main, write_csv


def make_folds(labels: pd.DataFrame, patients: pd.Series, k: int = 5, seed: int = 42) -> pd.DataFrame:
    """labels: wide table by image ID; patients: PatientID by image ID. Returns ID, PatientID, fold."""
    ids = labels.index.intersection(patients.index)
    if len(ids) == 0:
        raise PipelineError("no labelled image has a PatientID in the metadata: do the label IDs match the files?")
    df = labels.loc[ids].copy()
    df["PatientID"] = patients.loc[ids].to_numpy()
    per_patient = df.groupby("PatientID")[CLASSES].max().sort_index()
    n = len(per_patient)
    if n < k:
        raise PipelineError(f"{n} patients cannot fill {k} folds; use --k {max(2, n)} or fewer")
    mskf = MultilabelStratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    fold_of = pd.Series(-1, index=per_patient.index)
    for f, (_, val) in enumerate(mskf.split(np.zeros(n), per_patient.to_numpy())):
        fold_of.iloc[val] = f
    df["fold"] = df["PatientID"].map(fold_of).astype(int)
    out = df[["PatientID", "fold"]].sort_index()
    out.index.name = "ID"
    return out


@dataclass
class FoldsConfig:
    data_dir: str = positional("input")  # Kaggle-layout data folder
    out_dir: str = ""                    # outputs root holding cache/ (default outputs/<data folder name>)
    k: int = 5                           # number of folds
    fold_seed: int = 42                  # seed of the stratified split
    folds_file: str = ""                 # where to write (default folds/<data folder name>_k<K>_seed<SEED>.csv)


def check_folds(folds: pd.DataFrame, ok: pd.DataFrame, labels: pd.DataFrame, k: int, path) -> None:
    """A folds file made elsewhere must fit this data: its images readable and labelled, patients whole."""
    unknown = folds.index.difference(ok.index.intersection(labels.index))
    if len(unknown):
        raise PipelineError(f"{path}: {len(unknown)} image(s) are not readable labelled train images of this data, "
                            f"e.g. {list(unknown[:5])}: is it the folds file of another data folder?")
    if not set(folds["fold"]) <= set(range(k)):
        raise PipelineError(f"{path}: folds {sorted(set(folds['fold']))}, but --k {k} asks for 0..{k - 1}")
    split = folds.assign(p=ok.loc[folds.index, "PatientID"]).groupby("p")["fold"].nunique()
    if (split > 1).any():
        raise PipelineError(f"{path}: {int((split > 1).sum())} patient(s) have slices in two folds "
                            f"(e.g. {list(split.index[split > 1][:3])}): their slices would leak across folds")


def main():
    a = parse_config(FoldsConfig, description=__doc__, prog="python -m src.folds")
    _, meta = load_cache(layout.cache_dir(a.data_dir, a.out_dir))
    train = meta[meta.split == "train"].set_index("ID")
    ok = train[train.status == "ok"]
    labels, _ = cached_labels(a.data_dir, a.out_dir)
    unlabelled = ok.index.difference(labels.index)
    if len(unlabelled):
        raise PipelineError(f"{len(unlabelled)} train image(s) have no label rows in stage_2_train.csv, "
                            f"e.g. {list(unlabelled[:5])}: labels and images do not match")
    no_file, unreadable = labels.index.difference(train.index), labels.index.intersection(train.index[train.status != "ok"])
    for what, ids in (("have no file", no_file), ("have an unreadable file (see the cache's summary.json)", unreadable)):
        if len(ids):
            print(f"note: {len(ids)} labelled image(s) {what} and are left out of the folds: {list(ids[:10])}")
    path = layout.run_folds_file(a.data_dir, a.k, a.fold_seed, a.folds_file)
    if path.exists() and path.resolve() != layout.folds_path(a.data_dir, a.k, a.fold_seed).resolve():
        own = load_folds(path)
        check_folds(own, ok, labels, a.k, path)  # the user's own file: checked, never rewritten
        missing = ok.index.intersection(labels.index).difference(own.index)
        if len(missing):
            print(f"note: {path} leaves out {len(missing)} labelled image(s) of this data, e.g. {list(missing[:5])}")
        announce_skip(f"folds {path} (your own file, kept as it is)")
        return
    folds = make_folds(labels, ok["PatientID"], a.k, a.fold_seed)
    if path.exists() and load_folds(path).equals(folds):
        announce_skip(f"folds {path}")
        return
    announce_run()
    if path.exists():
        print(f"note: {path} did not match this data (a different dataset under the same name?); rewriting it. "
              f"Runs trained on the old folds will stop and say so (their fingerprint names the folds file).")
    write_csv(folds, path)
    per_fold = folds.join(labels).groupby("fold")[CLASSES].mean().mul(100).round(1)
    per_fold.insert(0, "patients", folds.groupby("fold")["PatientID"].nunique())
    per_fold.insert(1, "slices", folds.groupby("fold").size())
    print(f"wrote {path}: {len(folds)} slices of {folds.PatientID.nunique()} patients in {a.k} folds "
          f"(label rates in %):\n{per_fold.to_string()}")


if __name__ == "__main__":
    cli_main(main)
