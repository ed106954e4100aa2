"""A data folder of about N labelled training slices of whole patients, for quick experiments on the full data.

    python -m src.subset input/ --n 100000                    # -> outputs/subsets/input_sub100000/
    python -m src.subset ../shared/rsna_sample --n 100 --subset-seed 1
    SUBSET=100000 bash run.sh                                 # the whole pipeline on it

The folder is in Kaggle's layout, so every step takes it as it takes the full data, and its name is its
data tag: its outputs go to outputs/<data>_sub<N>/ and never mix with the full run's. It holds symbolic
links to the chosen training DICOMs (nothing is copied), a link to the whole test folder and to the sample
submission (the submission stays valid), the original rows of stage_2_train.csv for the chosen images, the
synthetic-data marker when the source has one, and subset.json: what was asked, what was taken, the label
rates of the subset beside the full set's, and the stamp that decides reuse.

Selection: iterative stratification (Sechidis et al. 2011, the algorithm behind folds.py's
MultilabelStratifiedKFold) on per-patient label presence, with two sides, subset and rest, whose demand
is counted in slices rather than patients. The rarest class left is placed first (ties: the rarest
overall, so `any`, which the subtypes imply, never displaces one), each of its patients on the side that
still wants more patients with it; patients without a bleed then fill whichever side wants more slices.
The subset ends within the largest patient's slice count of N (tested; measured: within half of it).
On a simulated full-size set (18,000 patients, 890k slices) it was within 0.03 % of N for N = 20k to
500k, with each subtype's patient count within 3 % of its share (0.5 % at N = 100k); fold 0 of
round(total / N) folds was 1 to 11 % off N. Patients are ordered by ID and then shuffled with the seed:
the same data, N and seed give the same subset; a non-zero seed is part of the folder's name.

PatientIDs come, cheapest first, from the table an earlier subset saved beside the subsets
(<data>_patients.csv, rows kept while a file's name and size are unchanged), the full data's image cache
(OUT/cache/metadata.csv, when it was built from these very files), or the DICOM headers (read without
pixels, in parallel on all cores). Files whose header cannot be read or has no PatientID are left out
and counted, as are labelled images without a file and files without labels.

A folder made from the same files, labels, N and seed is reused (its path printed, nothing written); one
made otherwise stops the command with the difference named, unless --overwrite. The folder's path is the
last line of stdout (run.sh reads it); everything else goes to stderr.
"""
from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from tqdm import tqdm

from . import layout
from .config import parse_config, positional
from .dicom import DicomError, read_dicom
from .labels import cached_labels
from .layout import LABELS_CSV, SAMPLE_CSV, SPLITS, SYNTHETIC_MARKER, dataset_tag
from .prepare import files_fingerprint, list_files
from .stamps import Stamp, guard
from .utils import CLASSES, PipelineError, atomic_write, cli_main, write_csv, write_json

INFO = "subset.json"
METHOD = "iterative stratification on per-patient label presence, demand in slices"


def say(*a):
    print(*a, file=sys.stderr)


def subset_name(tag: str, n: int, seed: int = 0) -> str:
    return f"{tag}_sub{n}" + (f"_seed{seed}" if seed else "")


def check_layout(data_dir: Path) -> None:
    need = [LABELS_CSV, SAMPLE_CSV, SPLITS["train"] + "/", SPLITS["test"] + "/"]
    missing = [p for p in need if not (data_dir / p).exists()]
    if missing:
        raise PipelineError(f"{data_dir} is not a Kaggle-layout data folder: it lacks {', '.join(missing)} "
                            f"(python -m src.synth writes a demo one)")


# ---------------------------------------------------------------- PatientIDs
def _patients_of(paths) -> list[str]:
    out = []
    for p in paths:
        try:
            out.append(str(read_dicom(p, stop_before_pixels=True).get("PatientID", "") or ""))
        except (DicomError, ValueError, TypeError):  # an unreadable header: "" (left out and counted)
            out.append("")
    return out


def read_patient_ids(paths, jobs: int = -1, chunk: int = 500, quiet: bool = False) -> list[str]:
    """PatientID of each file from its header ("" where unreadable or absent), in the order given."""
    paths = [str(p) for p in paths]
    parts = [paths[i:i + chunk] for i in range(0, len(paths), chunk)]
    # worker processes take seconds to start, one process reads ~3,000 headers a second: few chunks stay in-process
    n_jobs = 1 if len(parts) < 20 else (os.cpu_count() if jobs in (-1, 0) else jobs)
    out: list[str] = []
    with tqdm(total=len(paths), unit="file", desc="PatientID from headers", disable=quiet, mininterval=1.0) as bar:
        for part in Parallel(n_jobs=n_jobs, return_as="generator")(delayed(_patients_of)(p) for p in parts):
            out += part
            bar.update(len(part))
    return out


def _from_cache(cache: Path, files: pd.DataFrame) -> pd.Series | None:
    """PatientID by ID from a finished image cache built from exactly these training files, else None."""
    P = layout.cache_files(cache)
    stamp = Stamp.load(P["config"])
    if not (P["images"].exists() and P["meta"].exists() and stamp is not None
            and stamp.inputs.get("train_files") == files_fingerprint(files[files.split == "train"])):
        return None
    meta = pd.read_csv(P["meta"], usecols=["ID", "split", "PatientID"], dtype=str, keep_default_na=False)
    return meta[meta.split == "train"].set_index("ID")["PatientID"]


def patient_ids(data_dir, files: pd.DataFrame, table: Path, out_dir=None, jobs=-1, quiet=False) -> tuple[pd.Series, str]:
    """(PatientID of every train file by ID, "" where unknown; where they came from). Saves them to `table`."""
    train = files[files.split == "train"].set_index("ID")
    known = pd.Series(dtype=str)
    if table.exists():
        saved = pd.read_csv(table, dtype={"ID": str, "PatientID": str}, keep_default_na=False).set_index("ID")
        same = saved.index.isin(train.index) & (saved["bytes"] == train["bytes"].reindex(saved.index)).to_numpy()
        known = saved.loc[same, "PatientID"]
    todo = train.index.difference(known.index)
    if todo.empty:
        return known.reindex(train.index), f"the table saved by an earlier subset ({table})"
    cache = layout.cache_dir(data_dir, out_dir)
    cached = _from_cache(cache, files)
    if cached is not None:
        pid, source = cached.reindex(train.index).fillna(""), f"the image cache's metadata ({cache}/metadata.csv)"
        todo = pid.index[pid == ""]  # files the cache could not read at all: their header alone may still be readable
    else:
        pid = known.reindex(train.index)
        source = "the DICOM headers" + (f" ({len(known)} from the saved table {table})" if len(known) else "")
    if len(todo):
        pid.loc[todo] = read_patient_ids(train.loc[todo, "path"], jobs, quiet=quiet)
    write_csv(pd.DataFrame({"bytes": train["bytes"], "PatientID": pid}), table)
    return pid, source


# ---------------------------------------------------------------- selection
def pick_patients(presence: pd.DataFrame, sizes: pd.Series, n: int, seed: int = 0) -> pd.Index:
    """Patients holding about n slices, stratified on label presence (see the module's docstring).

    presence: one row per patient (index PatientID), 0/1 per class; sizes: slices per patient."""
    presence = presence.sort_index()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(presence))
    ids, y = presence.index[order], presence.to_numpy().astype(bool)[order]
    s = sizes.reindex(ids).to_numpy(dtype=float)
    share = n / s.sum()
    want = np.array([n, s.sum() - n])                              # slices each side still wants
    total = y.sum(0)
    want_label = np.outer([share, 1 - share], total)               # patients with each class each side still wants
    side = np.full(len(ids), -1)

    def put(i, k):
        side[i] = k
        want[k] -= s[i]
        want_label[k, y[i]] -= 1

    while (todo := side < 0).any():
        left = y[todo].sum(0)
        if not left.any():  # patients without a bleed: each to the side that wants more slices
            for i in np.flatnonzero(todo):
                put(i, int(np.argmax(want)))
            break
        rarest = np.flatnonzero(left == left[left > 0].min())  # the rarest class left, then the rarest overall
        label = rng.choice(rarest[total[rarest] == total[rarest].min()])
        for i in np.flatnonzero(todo & y[:, label]):
            w = want_label[:, label]
            best = np.flatnonzero(w == w.max())
            best = best[want[best] == want[best].max()]
            put(i, int(rng.choice(best)))
    picked = ids[side == 0]
    if picked.empty:  # n below a patient's worth of slices: the one patient closest to it
        picked = ids[[int(np.argmin(np.abs(s - n)))]]
    return picked.sort_values()


def label_rates(labels: pd.DataFrame, patients: pd.Series) -> pd.DataFrame:
    """Per class: % of slices and % of patients with it."""
    per_patient = labels.groupby(patients.reindex(labels.index).to_numpy())[CLASSES].max()
    return pd.DataFrame({"slices_pct": labels[CLASSES].mean() * 100, "patients_pct": per_patient.mean() * 100}).round(3)


# ---------------------------------------------------------------- the folder
def make_subset(data_dir, n: int, seed: int = 0, subsets_dir=None, out_dir=None, jobs: int = -1,
                overwrite: bool = False, quiet: bool = False) -> Path:
    """Make (or reuse) the subset folder of `data_dir`; returns its path."""
    data_dir = Path(data_dir)
    check_layout(data_dir)
    if n < 1:
        raise PipelineError(f"--n must be at least 1 (the number of labelled training slices wanted), not {n}")
    files = list_files(data_dir)
    train = files[files.split == "train"].set_index("ID")
    if n > len(train):
        raise PipelineError(f"--n {n} is more than the {len(train)} training files in {data_dir}")
    labels, label_sha = cached_labels(data_dir, out_dir)
    tag = dataset_tag(data_dir)
    subsets_dir = layout.subsets_dir(subsets_dir)
    dest = subsets_dir / subset_name(tag, n, seed)
    stamp = Stamp("subset", {"n": n, "seed": seed, "method": METHOD},
                       {"train_files": files_fingerprint(train.reset_index()), "labels": label_sha})
    if guard(stamp, dest / INFO, (dest / INFO).exists(), overwrite, f"the subset folder {dest}",
             exists=dest.exists(), clear=[dest], quiet=True, redo="--overwrite (remakes the subset folder; "
             "the outputs made from the old one then stop at their own fingerprint checks)"):
        if not quiet:
            say(f"up to date: {dest} (made from the same files, labels, N and seed)")
        return dest

    pid, pid_source = patient_ids(data_dir, files, subsets_dir / f"{tag}_patients.csv", out_dir, jobs, quiet)
    unknown = pid.index[pid == ""]
    usable = labels.index.intersection(pid.index.difference(unknown))
    left_out = {"files_without_readable_patient_id": len(unknown),
                "of_which_labelled": len(unknown.intersection(labels.index)),
                "labelled_without_file": len(labels.index.difference(train.index)),
                "files_without_labels": len(train.index.difference(labels.index))}
    if n > len(usable):
        raise PipelineError(f"--n {n} is more than the {len(usable)} labelled training slices of {data_dir} "
                            f"with a readable PatientID ({left_out})")
    patients = pid.loc[usable]
    per = labels.loc[usable]
    chosen_patients = pick_patients(per.groupby(patients.to_numpy())[CLASSES].max(),
                                    patients.value_counts(), n, seed)
    chosen = usable[patients.isin(chosen_patients).to_numpy()].sort_values()
    rates = pd.concat({"subset": label_rates(labels.loc[chosen], patients), "full": label_rates(per, patients)}, axis=1)
    info = {"stamp": stamp.to_dict(), "source": str(data_dir.resolve()), "n_asked": n, "seed": seed, "method": METHOD,
            "slices": len(chosen), "patients": len(chosen_patients),
            "full": {"slices": len(usable), "patients": int(patients.nunique())}, "patient_ids_from": pid_source,
            "left_out": left_out, "label_rates": {k: rates[k].to_dict() for k in ("subset", "full")}}
    write_folder(dest, data_dir, train.loc[chosen, "path"], set(chosen), info)
    if not quiet:
        lo = left_out
        say(f"subset {dest.name}: {len(chosen)} labelled slices of {len(chosen_patients)} patients, asked for about {n} "
            f"(the full set: {len(usable)} slices of {info['full']['patients']} patients), seed {seed}\n"
            f"  PatientIDs from {pid_source}\n  left out: {lo['files_without_readable_patient_id']} file(s) without a "
            f"readable PatientID ({lo['of_which_labelled']} labelled), {lo['labelled_without_file']} labelled image(s) "
            f"without a file, {lo['files_without_labels']} file(s) without labels\n"
            f"  label rates in % of slices and of patients:\n{rates.round(2).to_string()}\n  written to {dest}")
    return dest


def write_folder(dest: Path, data_dir: Path, train_paths: pd.Series, keep: set, info: dict) -> None:
    """The subset folder: links to the chosen training files, the whole test folder and the sample submission, the
    chosen images' rows of the label file, the generated-data marker, subset.json. Built under a temporary name
    and renamed when complete, so a killed build never looks finished."""
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / SPLITS["train"]).mkdir(parents=True)
    src = data_dir.resolve()
    for name in train_paths.map(lambda p: Path(p).name):
        os.symlink(src / SPLITS["train"] / name, tmp / SPLITS["train"] / name)
    os.symlink(src / SPLITS["test"], tmp / SPLITS["test"], target_is_directory=True)
    os.symlink(src / SAMPLE_CSV, tmp / SAMPLE_CSV)
    if (src / SYNTHETIC_MARKER).exists():
        shutil.copy2(src / SYNTHETIC_MARKER, tmp / SYNTHETIC_MARKER)
    with open(src / LABELS_CSV, newline="") as f, atomic_write(tmp / LABELS_CSV, newline="") as out:
        out.write(next(f))
        out.writelines(line for line in f if line.split(",", 1)[0].rpartition("_")[0] in keep)
    write_json(info, tmp / INFO)
    os.replace(tmp, dest)


@dataclass
class SubsetConfig:
    data_dir: str = positional("input")  # Kaggle-layout data folder to take the subset from
    n: int = 0                           # labelled training slices wanted (about: whole patients are taken)
    subset_seed: int = 0                 # seed of the stratified pick; a non-zero seed is part of the folder's name
    subsets_dir: str = ""                # where subset folders go (default outputs/subsets); a folder's name is its
                                         # data tag, <data>_sub<N>[_seed<S>]
    out_dir: str = ""                    # outputs root of the full data, whose cache/metadata.csv gives the
                                         # PatientIDs when it exists (default outputs/<data folder name>)
    workers: int = -1                    # processes reading DICOM headers (-1: all cores)
    overwrite: bool = False              # remake a subset folder made from other files or settings (else: stop and say)


def main():
    c = parse_config(SubsetConfig, description=__doc__, prog="python -m src.subset")
    print(make_subset(c.data_dir, c.n, c.subset_seed, c.subsets_dir or None, c.out_dir or None, c.workers, c.overwrite))


if __name__ == "__main__":
    cli_main(main)
