import warnings

import numpy as np
import pandas as pd
import pytest

from src.folds import make_folds
from src.labels import read_labels
from src.cache import load_cache
from src.utils import CLASSES, PipelineError


def _inputs(demo_data, demo_cache):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        labels = read_labels(demo_data / "stage_2_train.csv")
    _, meta = load_cache(demo_cache / "cache")
    ok = meta[(meta.split == "train") & (meta.status == "ok")].set_index("ID")
    return labels, ok["PatientID"]


def test_no_patient_in_two_folds(demo_data, demo_cache):
    labels, patients = _inputs(demo_data, demo_cache)
    f = make_folds(labels, patients, k=3, seed=42)
    assert f.groupby("PatientID")["fold"].nunique().max() == 1
    assert set(f.fold) == {0, 1, 2}
    # the patients with two studies really have slices from two series
    _, meta = load_cache(demo_cache / "cache")
    assert meta[meta.split == "train"].groupby("PatientID").SeriesInstanceUID.nunique().max() == 2


def test_same_inputs_same_folds(demo_data, demo_cache):
    labels, patients = _inputs(demo_data, demo_cache)
    a = make_folds(labels, patients, k=3, seed=7)
    b = make_folds(labels.sample(frac=1, random_state=0), patients.sample(frac=1, random_state=1), k=3, seed=7)
    pd.testing.assert_frame_equal(a, b)


def test_label_presence_is_balanced():
    # 60 patients, 10 slices each; each subtype present in a random fifth of patients
    rng = np.random.default_rng(0)
    pats = np.repeat([f"P{i:02d}" for i in range(60)], 10)
    ids = [f"ID_{i:04x}" for i in range(600)]
    presence = rng.random((60, 5)) < 0.2
    lab = np.repeat(presence, 10, axis=0).astype(np.uint8)
    labels = pd.DataFrame(np.c_[lab, lab.max(1)], index=ids, columns=CLASSES)
    f = make_folds(labels, pd.Series(pats, index=ids), k=5, seed=42)
    per_patient = labels.join(f).groupby("PatientID").agg({**{c: "max" for c in CLASSES}, "fold": "first"})
    counts = per_patient.groupby("fold")[CLASSES].sum()
    assert (counts.max() - counts.min()).max() <= 2  # iterative stratification: even to a patient or two


def test_too_few_patients():
    labels = pd.DataFrame(0, index=["ID_1", "ID_2"], columns=CLASSES)
    with pytest.raises(PipelineError, match="2 patients"):
        make_folds(labels, pd.Series(["a", "b"], index=labels.index), k=3)


def test_your_own_folds_file_is_checked_and_never_rewritten(demo_data, demo_cache, tmp_path):
    import subprocess
    import sys
    from src.layout import ROOT as root
    labels, patients = _inputs(demo_data, demo_cache)
    mine = make_folds(labels, patients, k=2, seed=99)  # not the split --fold-seed 42 would make
    f = tmp_path / "mine.csv"
    mine.to_csv(f)
    cli = [sys.executable, "-m", "src.folds", str(demo_data), "--out-dir", str(demo_cache), "--k", "2", "--folds-file", str(f)]
    before = f.read_bytes()
    r = subprocess.run(cli, cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and f.read_bytes() == before, r.stderr
    bad = mine.copy()
    first = bad.index[bad.PatientID == bad.PatientID.iloc[0]][0]
    bad.loc[first, "fold"] = 1 - bad.loc[first, "fold"]  # one slice of a patient moved to the other fold
    bad.to_csv(f)
    r = subprocess.run(cli, cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "slices in two folds" in r.stderr and "Traceback" not in r.stderr
    mine.rename(index={mine.index[0]: "ID_notanimage"}).to_csv(f)
    r = subprocess.run(cli, cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not readable labelled train images" in r.stderr
