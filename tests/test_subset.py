"""src.subset: whole patients, about N slices, stratified, deterministic; a valid pipeline input; reuse, refusals."""
import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

import src.subset as S
from src.labels import read_labels
from src.prepare import list_files, prepare
from src.layout import ROOT, SYNTHETIC_MARKER
from src.synth import generate
from src.utils import CLASSES, PipelineError

from .conftest import RSNA_SAMPLE

# the generated label file repeats rows on purpose, and one test flips a label
pytestmark = [pytest.mark.filterwarnings("ignore:.*exactly duplicated row:UserWarning"),
              pytest.mark.filterwarnings("ignore:.*is not the OR of the five subtypes:UserWarning")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("subset") / "gen"
    generate(d, n_patients=40, n_test_series=2, slices=(6, 10), image_size=64, positive_rate=0.7, seed=3, quiet=True)
    return d


def truth(data_dir):
    """Independent of src.subset: (labels by ID, PatientID of every train file read by pydicom itself)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        labels = read_labels(data_dir / "stage_2_train.csv")
    pid = {}
    for p in sorted((data_dir / "stage_2_train_images").glob("*.dcm")):
        try:
            pid[p.stem] = str(pydicom.dcmread(p, stop_before_pixels=True).PatientID)
        except Exception:
            pass
    return labels, pd.Series(pid)


def make(data_dir, tmp, n, **kw):
    kw.setdefault("subsets_dir", tmp / "subsets")
    kw.setdefault("out_dir", tmp / "out")  # the full data's outputs root: no cache there unless a test builds one
    return S.make_subset(data_dir, n, jobs=1, quiet=True, **kw)


def subset_ids(sub):
    return sorted(p.stem for p in (sub / "stage_2_train_images").iterdir())


def check_subset(data_dir, sub, n):
    """Everything a subset folder must be, against the source read independently; returns its image IDs."""
    labels, pid = truth(data_dir)
    ids = subset_ids(sub)
    chosen = set(pid.loc[ids])
    rest = set(pid.drop(ids))
    assert not chosen & rest  # whole patients only
    sizes = pid.loc[pid.index.isin(labels.index)].value_counts()
    assert abs(len(ids) - n) <= sizes.max()  # the stated tolerance: within the largest patient's slice count
    # every class of the full set is there whenever the subset's share of the patients having it is one or more
    share = n / sizes.sum()
    per_patient = labels.loc[pid.index.intersection(labels.index)].groupby(pid).max()
    present = per_patient.loc[list(chosen)].sum()
    big_enough = per_patient.sum() * share >= 1
    assert (present[big_enough] > 0).all(), (present, per_patient.sum() * share)
    # a valid pipeline input: list_files, the label file, the test set and sample submission, links to the originals
    files = list_files(sub)
    assert sorted(files.loc[files.split == "train", "ID"]) == ids
    full = list_files(data_dir)
    test = lambda f: f.loc[f.split == "test", ["ID", "bytes"]].reset_index(drop=True)  # noqa: E731
    pd.testing.assert_frame_equal(test(files), test(full))
    for p in files.path:
        assert os.path.samefile(p, data_dir / Path(p).parent.name / Path(p).name)
    assert all(p.is_symlink() for p in (sub / "stage_2_train_images").iterdir())
    assert filecmp.cmp(sub / "stage_2_sample_submission.csv", data_dir / "stage_2_sample_submission.csv", shallow=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sub_labels = read_labels(sub / "stage_2_train.csv")
    pd.testing.assert_frame_equal(sub_labels, labels.loc[ids])
    raw = pd.read_csv(data_dir / "stage_2_train.csv", dtype=str)
    mine = raw[raw.ID.str.rsplit("_", n=1).str[0].isin(ids)]
    assert pd.read_csv(sub / "stage_2_train.csv", dtype=str).equals(mine.reset_index(drop=True))  # the original rows
    assert (sub / SYNTHETIC_MARKER).exists() == (data_dir / SYNTHETIC_MARKER).exists()
    return ids


def test_pick_patients_stratified_and_near_n():
    rng = np.random.default_rng(0)
    n_pat = 300
    bleed = rng.random(n_pat) < 0.45
    sub = (rng.random((n_pat, 5)) < [0.08, 0.4, 0.25, 0.4, 0.4]) & bleed[:, None]
    sub[bleed & ~sub.any(1), 1] = True
    presence = pd.DataFrame(np.c_[sub, bleed].astype(int), index=[f"P{i:03d}" for i in range(n_pat)], columns=CLASSES)
    sizes = pd.Series(rng.integers(20, 61, n_pat), index=presence.index)
    ours, kfold = [], []
    for n in (300, 1500, 4000, 7000, 11000):
        share = n / sizes.sum()
        for seed in range(3):
            picked = S.pick_patients(presence, sizes, n, seed)
            ours.append(abs(sizes[picked].sum() - n))
            assert ours[-1] <= sizes.max()
            dev = presence.loc[picked, CLASSES[:5]].sum() - share * presence[CLASSES[:5]].sum()
            assert dev.abs().max() <= 1, dev  # each subtype within one patient of its share
        # the reference the brief suggests: fold 0 of round(total / n) multilabel-stratified folds
        k = max(2, round(sizes.sum() / n))
        _, val = next(MultilabelStratifiedKFold(k, shuffle=True, random_state=0).split(np.zeros(n_pat), presence))
        kfold.append(abs(sizes.iloc[val].sum() - n))
    assert np.mean(ours) < np.mean(kfold)
    # a shuffled table gives the same patients; another seed other ones
    a = S.pick_patients(presence, sizes, 4000, 5)
    assert a.equals(S.pick_patients(presence.sample(frac=1, random_state=1), sizes.sample(frac=1, random_state=2), 4000, 5))
    assert not a.equals(S.pick_patients(presence, sizes, 4000, 6))
    # all of it, and less than one patient's worth (still one patient)
    assert len(S.pick_patients(presence, sizes, int(sizes.sum()), 0)) == n_pat
    assert len(S.pick_patients(presence, sizes, 3, 0)) == 1


def test_subset_of_generated_data(data, tmp_path):
    n = 110
    sub = make(data, tmp_path, n)
    assert sub == tmp_path / "subsets" / "gen_sub110"
    ids = check_subset(data, sub, n)
    info = json.loads((sub / "subset.json").read_text())
    labels, pid = truth(data)
    assert info["slices"] == len(ids) and info["patients"] == pid.loc[ids].nunique() and info["n_asked"] == n
    rates = labels.loc[ids].mean() * 100
    assert np.allclose([info["label_rates"]["subset"]["slices_pct"][c] for c in CLASSES], rates, atol=1e-3)
    # the synthetic set's truncated file has a readable header: it is in the data like any other file
    assert info["left_out"]["files_without_readable_patient_id"] == 0
    # same inputs, same subset (another folder, so no reuse); another seed, another subset and folder
    again = make(data, tmp_path / "again", n)
    assert subset_ids(again) == ids
    assert (again / "stage_2_train.csv").read_bytes() == (sub / "stage_2_train.csv").read_bytes()
    other = make(data, tmp_path, n, seed=1)
    assert other.name == "gen_sub110_seed1" and subset_ids(other) != ids
    check_subset(data, other, n)


def test_header_path_and_cache_path_agree(data, tmp_path, monkeypatch):
    heads = make(data, tmp_path / "h", 150)  # no cache: headers
    prepare(data, tmp_path / "full" / "cache", size=16, jobs=1, chunk=512, quiet=True)
    real = S.read_patient_ids
    monkeypatch.setattr(S, "read_patient_ids", lambda *a, **k: pytest.fail("headers read despite the cache"))
    cached = make(data, tmp_path / "c", 150, out_dir=tmp_path / "full")
    assert subset_ids(cached) == subset_ids(heads)
    assert (cached / "stage_2_train.csv").read_bytes() == (heads / "stage_2_train.csv").read_bytes()
    assert "headers" in json.loads((heads / "subset.json").read_text())["patient_ids_from"]
    assert "cache" in json.loads((cached / "subset.json").read_text())["patient_ids_from"]
    # a second subset beside the first reads the table it saved, not the headers again
    second = make(data, tmp_path / "h", 60)
    assert "saved" in json.loads((second / "subset.json").read_text())["patient_ids_from"]
    monkeypatch.setattr(S, "read_patient_ids", real)
    check_subset(data, second, 60)


def test_reuse_refusal_and_unreadable_files(data, tmp_path, monkeypatch):
    src = tmp_path / "copy"
    shutil.copytree(data, src)
    labels, _ = truth(src)
    broken = sorted(labels.index)[7]
    (src / "stage_2_train_images" / f"{broken}.dcm").write_bytes(b"not a DICOM file")
    # the parallel header reader keeps the files' order and gives "" for the unreadable one
    paths, readable = sorted((src / "stage_2_train_images").iterdir()), truth(src)[1]
    assert broken not in readable
    assert S.read_patient_ids(paths, jobs=2, chunk=10, quiet=True) == [readable.get(p.stem, "") for p in paths]
    sub = make(src, tmp_path, 90)
    info = json.loads((sub / "subset.json").read_text())
    assert info["left_out"]["files_without_readable_patient_id"] == 1 and info["left_out"]["of_which_labelled"] == 1
    assert broken not in subset_ids(sub) and info["full"]["slices"] == len(labels) - 1

    # reuse: nothing read, nothing written
    before = {p: p.lstat().st_mtime_ns for p in sub.rglob("*")}
    monkeypatch.setattr(S, "patient_ids", lambda *a, **k: pytest.fail("a reused subset read PatientIDs"))
    assert make(src, tmp_path, 90) == sub
    assert {p: p.lstat().st_mtime_ns for p in sub.rglob("*")} == before
    # another N: another folder
    monkeypatch.undo()
    assert make(src, tmp_path, 70).name == "copy_sub70"

    # the source's files changed: the same folder name stops and says why, unless overwrite
    gone = next(i for i in sorted(labels.index) if i not in subset_ids(sub) and i != broken)
    (src / "stage_2_train_images" / f"{gone}.dcm").unlink()
    with pytest.raises(PipelineError, match="input train_files"):
        make(src, tmp_path, 90)
    assert {p: p.lstat().st_mtime_ns for p in sub.rglob("*")} == before
    make(src, tmp_path, 90, overwrite=True)
    assert sorted(os.listdir(src / "stage_2_test_images")) == sorted(os.listdir(data / "stage_2_test_images"))
    info2 = json.loads((sub / "subset.json").read_text())
    assert info2["stamp"]["inputs"]["train_files"] != info["stamp"]["inputs"]["train_files"]
    assert info2["left_out"]["labelled_without_file"] == 1
    check_subset(src, sub, 90)
    # the labels changed
    lab = src / "stage_2_train.csv"
    lab.write_text(re.sub(rf"^({gone}_epidural),(\d)", lambda m: f"{m[1]},{1 - int(m[2])}", lab.read_text(), flags=re.M))
    with pytest.raises(PipelineError, match="input labels"):
        make(src, tmp_path, 90)


def test_errors(data, tmp_path):
    with pytest.raises(PipelineError, match="at least 1"):
        make(data, tmp_path, 0)
    with pytest.raises(PipelineError, match="more than"):
        make(data, tmp_path, 10 ** 6)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "stage_2_train.csv").write_text("ID,Label\n")
    with pytest.raises(PipelineError, match="not a Kaggle-layout.*stage_2_train_images"):
        make(tmp_path / "flat", tmp_path, 10)
    # the CLI: the folder on stdout's last line; errors as one line and exit status 2
    cmd = [sys.executable, "-m", "src.subset", str(data), "--subsets-dir", str(tmp_path / "cli"),
           "--out-dir", str(tmp_path / "out"), "--workers", "1"]
    ok = subprocess.run(cmd + ["--n", "50"], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[-1] == str(tmp_path / "cli" / "gen_sub50")
    assert "label rates" in ok.stderr
    bad = subprocess.run(cmd + ["--n", "100000"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --n 100000 is more than")



@pytest.mark.skipif(not (RSNA_SAMPLE / "stage_2_train.csv").exists(), reason="no real sample in ../shared/rsna_sample")
def test_real_sample(tmp_path):
    sub = make(RSNA_SAMPLE, tmp_path, 100)
    ids = check_subset(RSNA_SAMPLE, sub, 100)
    assert 0 < len(ids) < 203
    assert subset_ids(make(RSNA_SAMPLE, tmp_path / "b", 100, seed=0)) == ids
