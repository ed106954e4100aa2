"""Multilabel-stratified K folds over patients, written to folds/ as a CSV keyed by image ID.

    python -m src.folds --k 5 --seed 42                      # data input/, file folds/input_k5_seed42.csv
    python -m src.folds ../shared/rsna_sample --k 3 --seed 42

Every slice of a patient lands in one fold (a patient's slices are near-duplicates of each other, so
splitting them would leak). Patients are stratified on per-patient label presence (does the patient
have any slice of each subtype, and any bleed at all) with iterative stratification, which keeps the
rare subtypes (epidural) spread evenly. Only labelled slices that the cache could read are assigned.
Same inputs, same file: patients are sorted before the seeded split.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

from .labels import read_labels
from .prepare import load_cache
from .utils import CLASSES, ROOT, PipelineError, cli_main, dataset_tag, out_root, write_csv


def folds_path(data_dir, k: int, seed: int) -> Path:
    return ROOT / "folds" / f"{dataset_tag(data_dir)}_k{k}_seed{seed}.csv"


def run_folds_file(data_dir, k: int, seed: int, folds_file=None) -> Path:
    """The folds file a run uses: the explicit one when given, else the standard one for (data, k, seed)."""
    return Path(folds_file) if folds_file else folds_path(data_dir, k, seed)


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


def load_folds(path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"folds file not found: {path} (run `python -m src.folds DATA_DIR --k K --seed S`)")
    return pd.read_csv(path, dtype={"ID": str, "PatientID": str}).set_index("ID")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir", nargs="?", default=str(ROOT / "input"))
    ap.add_argument("--out", default=None, help="output folder holding cache/ (default outputs/<data folder name>)")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--folds-file", default=None, help="where to write (default folds/<data folder name>_k<K>_seed<SEED>.csv)")
    a = ap.parse_args()
    out = out_root(a.data_dir, a.out)
    _, meta = load_cache(out / "cache")
    ok = meta[(meta.split == "train") & (meta.status == "ok")].set_index("ID")
    labels = read_labels(Path(a.data_dir) / "stage_2_train.csv")
    unlabelled = ok.index.difference(labels.index)
    if len(unlabelled):
        raise PipelineError(f"{len(unlabelled)} train image(s) have no label rows in stage_2_train.csv, "
                            f"e.g. {list(unlabelled[:5])}: labels and images do not match")
    folds = make_folds(labels, ok["PatientID"], a.k, a.seed)
    path = run_folds_file(a.data_dir, a.k, a.seed, a.folds_file)
    if path.exists() and load_folds(path).equals(folds):
        print(f"folds up to date: {path}")
        return
    if path.exists():
        print(f"note: {path} did not match this data (a different dataset under the same name?); rewriting it. "
              f"Runs trained on the old folds in the outputs folder are stale: delete them.")
    write_csv(folds, path)
    per_fold = folds.join(labels).groupby("fold")[CLASSES].mean().mul(100).round(1)
    per_fold.insert(0, "patients", folds.groupby("fold")["PatientID"].nunique())
    per_fold.insert(1, "slices", folds.groupby("fold").size())
    print(f"wrote {path}: {len(folds)} slices of {folds.PatientID.nunique()} patients in {a.k} folds "
          f"(label rates in %):\n{per_fold.to_string()}")


if __name__ == "__main__":
    cli_main(main)
