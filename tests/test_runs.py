"""The output layout's owner: the label table parsed once per data folder, fingerprints and the reuse rule."""
import os
import shutil
import warnings

import pandas as pd
import pytest

import src.labels as L
from src import runs, stamps
from src.utils import CLASSES, PipelineError


def test_labels_are_parsed_once_per_data_folder(demo_data, tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(demo_data / "stage_2_train.csv", data / "stage_2_train.csv")
    calls = []
    real = L.read_labels
    monkeypatch.setattr(L, "read_labels", lambda p: calls.append(p) or real(p))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first, sha = L.cached_labels(data, tmp_path / "out")
        again, sha2 = L.cached_labels(data, tmp_path / "out")
        assert len(calls) == 1 and sha == sha2  # the second step read the cached table
        pd.testing.assert_frame_equal(first, again)
        assert first.equals(real(data / "stage_2_train.csv"))  # the cached table is the parsed one, to the byte
        st = (data / "stage_2_train.csv").stat()
        os.utime(data / "stage_2_train.csv", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, same content
        L.cached_labels(data, tmp_path / "out")
        assert len(calls) == 1
        text = (data / "stage_2_train.csv").read_text().splitlines()
        line = next(i for i, t in enumerate(text) if t.endswith(",0") and "_any" in t)
        text[line] = text[line][:-1] + "1"  # one label changed: parsed again, another fingerprint
        (data / "stage_2_train.csv").write_text("\n".join(text) + "\n")
        changed, sha3 = L.cached_labels(data, tmp_path / "out")
    assert len(calls) == 2 and sha3 != sha and changed["any"].sum() == first["any"].sum() + 1


def test_a_run_without_config_is_a_clear_error(tmp_path):
    (tmp_path / "runs" / "r" / "fold0").mkdir(parents=True)
    with pytest.raises(PipelineError, match="no config.yaml"):
        runs.Run(tmp_path / "runs" / "r").config()
    with pytest.raises(PipelineError, match="no fold folders"):
        runs.Run(tmp_path).folds()


def test_guard_skips_continues_stops_and_overwrites(tmp_path):
    out = tmp_path / "step"
    stamp_file = out / "fingerprint.json"
    a = stamps.Stamp("x", {"lr": 0.1, "size": 128}, {"cache": "c1"})
    assert stamps.guard(a, stamp_file, done=False, overwrite=False, what="x") is False  # nothing there: run
    out.mkdir()
    a.save(stamp_file)
    assert stamps.guard(a, stamp_file, done=False, overwrite=False, what="x") is False  # same, unfinished: continue
    assert stamps.guard(a, stamp_file, done=True, overwrite=False, what="x") is True    # same, finished: skip
    b = stamps.Stamp("x", {"lr": 0.2, "size": 128}, {"cache": "c2"})
    with pytest.raises(PipelineError) as e:
        stamps.guard(b, stamp_file, done=True, overwrite=False, what="step x")
    assert "lr: 0.1 -> 0.2" in str(e.value) and "input cache: c1 -> c2" in str(e.value) and "size" not in str(e.value)
    assert stamp_file.exists()  # nothing removed without --overwrite
    (out / "result.csv").write_text("old")
    assert stamps.guard(b, stamp_file, done=True, overwrite=True, what="x", clear=[out]) is False
    assert not out.exists()  # the old output is gone before the redo starts


def test_stamp_ignores_key_order_and_finds_no_difference_in_equal_settings():
    a = stamps.Stamp("train", {"a": 1, "b": [1, 2]}, {"cache": "z"})
    b = stamps.Stamp("train", {"b": [1, 2], "a": 1}, {"cache": "z"})
    assert a.id == b.id and stamps.Stamp("train", {"a": 2, "b": [1, 2]}, {"cache": "z"}).id != a.id


def test_run_fingerprint_follows_the_outputs_bytes(tmp_path):
    """A fold retrained with the same settings but other results makes downstream steps stale."""
    d = tmp_path / "runs" / "r" / "fold0"
    d.mkdir(parents=True)
    stamps.Stamp("train", {"lr": 0.1}).save(d / "fingerprint.json")
    pd.DataFrame(0.1, index=pd.Index(["ID_a"], name="ID"), columns=["fold", *CLASSES]).to_csv(d / "oof.csv")
    run = runs.Run(tmp_path / "runs" / "r")
    f1 = run.fingerprint()
    pd.DataFrame(0.2, index=pd.Index(["ID_a"], name="ID"), columns=["fold", *CLASSES]).to_csv(d / "oof.csv")
    assert run.fingerprint() != f1
