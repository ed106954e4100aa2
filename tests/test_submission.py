import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from src import submission
from src.blend import blend, cross_fitted, fit_weights
from src.make_submission import make_submission
from src.labels import to_long
from src.metrics import weighted_log_loss
from src.upload import has_credentials, submit
from src.utils import CLASSES, PipelineError


def sample_file(tmp_path, images):
    wide = pd.DataFrame(0.5, index=images, columns=CLASSES)
    p = tmp_path / "stage_2_sample_submission.csv"
    to_long(wide).to_csv(p, index=False)
    return p


def valid_long(images, value=0.3):
    return to_long(pd.DataFrame(value, index=images, columns=CLASSES))


IMAGES = ["ID_00a", "ID_00b", "ID_00c"]


E = re.escape


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.iloc[:-6], E("missing IDs: 6 (ID_00c_any, ID_00c_epidural, ID_00c_intraparenchymal, "
                              "ID_00c_intraventricular, ID_00c_subarachnoid, ...)") + "$"),
    (lambda d: d.iloc[:-5], E("missing IDs: 5 (ID_00c_any, ID_00c_intraparenchymal, ID_00c_intraventricular, "
                              "ID_00c_subarachnoid, ID_00c_subdural)") + "$"),
    (lambda d: pd.concat([d, pd.DataFrame({"ID": ["ID_fff_any"], "Label": [0.1]})]),
     E("extra IDs (not in the sample submission): 1 (ID_fff_any)") + "$"),
    (lambda d: d.assign(ID=np.where(np.arange(len(d)) == 2, None, d.ID)),  # an empty ID field
     E("extra IDs (not in the sample submission): 1 ((empty))\n  missing IDs: 1 (ID_00a_intraventricular)") + "$"),
    (lambda d: pd.concat([d, d.iloc[:1]]), E("duplicated IDs: 1 (ID_00a_epidural)") + "$"),
    (lambda d: d.assign(Label=np.where(np.arange(len(d)) == 4, np.nan, d.Label)),
     E("NaN or non-numeric labels: 1 (ID_00a_subdural)") + "$"),
    (lambda d: d.assign(Label=np.where(np.arange(len(d)) == 4, "high", d.Label.astype(str))),
     E("NaN or non-numeric labels: 1 (ID_00a_subdural)") + "$"),
    (lambda d: d.assign(Label=np.where(np.arange(len(d)) == 7, 1.2, d.Label)),
     E("labels outside [0, 1]: 1 (ID_00b_intraparenchymal)") + "$"),
    (lambda d: d.assign(Label=np.where(np.arange(len(d)) == 7, -1e-9, d.Label)),
     E("labels outside [0, 1]: 1 (ID_00b_intraparenchymal)") + "$"),
    (lambda d: d.iloc[::-1], E("IDs not in the sample submission's order (first difference at row 2)") + "$"),
    (lambda d: d.iloc[[0, 2, 1, *range(3, 18)]], E("IDs not in the sample submission's order (first difference at row 3)") + "$"),
    (lambda d: pd.concat([d.iloc[:-1], d.iloc[:1]]).assign(Label=np.where(np.arange(len(d)) == 0, 2.0, d.Label)),
     E("duplicated IDs: 1 (ID_00a_epidural)\n  missing IDs: 1 (ID_00c_any)\n  "
       "labels outside [0, 1]: 1 (ID_00a_epidural)") + "$"),  # every problem, one per line
])
def test_validator_catches(tmp_path, mutate, message):
    sample_ids = pd.read_csv(sample_file(tmp_path, IMAGES))["ID"]
    bad = mutate(valid_long(IMAGES)).reset_index(drop=True)
    with pytest.raises(PipelineError, match="^submission is not a valid submission:\n  (.*\n  )*" + message):
        submission.validate(bad, sample_ids)


def test_validator_names_a_wrong_header_and_accepts_0_and_1(tmp_path):
    sample_ids = pd.read_csv(sample_file(tmp_path, IMAGES))["ID"]
    with pytest.raises(PipelineError, match=E("sub.csv: header must be 'ID,Label', found ID,label") + "$"):
        submission.validate(valid_long(IMAGES).rename(columns={"Label": "label"}), sample_ids, name="sub.csv")
    edge = valid_long(IMAGES).assign(Label=np.tile([0.0, 1.0], 9))  # the bounds are valid probabilities
    assert submission.validate(edge, sample_ids) is None


def test_build_follows_sample_order_and_clips(tmp_path):
    sample = sample_file(tmp_path, IMAGES)
    wide = pd.DataFrame([[0, 1, 0.2, 0.3, 0.4, 1.0]] * 3, index=IMAGES[::-1], columns=CLASSES)
    long = submission.build(wide, sample)
    assert long["ID"].tolist() == pd.read_csv(sample)["ID"].tolist()
    assert long["Label"].min() == submission.CLIP and long["Label"].max() == 1 - submission.CLIP
    assert long["Label"].tolist() == [max(min(v, 1 - submission.CLIP), submission.CLIP)
                                      for i in range(3) for v in [0, 1, 0.2, 0.3, 0.4, 1.0]]
    with pytest.raises(PipelineError, match=E("predictions do not match the sample submission: missing 6 (ID_00a_any, "
                                              "ID_00a_epidural, ID_00a_intraparenchymal, ID_00a_intraventricular, "
                                              "ID_00a_subarachnoid, ...); extra 0 ()") + "$"):
        submission.build(wide.iloc[:2], sample)
    with pytest.raises(PipelineError, match=E("predictions contain NaN for 3 (ID_00c, ID_00b, ID_00a)") + "$"):
        submission.build(wide.assign(any=np.nan), sample)


def test_write_gives_six_decimals_and_no_index(tmp_path):
    sample = sample_file(tmp_path, IMAGES[:1])
    wide = pd.DataFrame([[1 / 3, 0.5, 0.25, 0.125, 2 / 3, 0.9]], index=IMAGES[:1], columns=CLASSES)
    path = submission.write(submission.build(wide, sample), tmp_path / "s.csv")
    assert path == tmp_path / "s.csv"
    assert path.read_text() == ("ID,Label\nID_00a_epidural,0.333333\nID_00a_intraparenchymal,0.500000\n"
                                "ID_00a_intraventricular,0.250000\nID_00a_subarachnoid,0.125000\n"
                                "ID_00a_subdural,0.666667\nID_00a_any,0.900000\n")


def test_fitted_weights_beat_or_equal_best_member():
    rng = np.random.default_rng(0)
    y = (rng.random((400, 6)) < 0.2).astype(float)
    good = np.clip(0.7 * y + 0.15 + rng.normal(0, 0.1, y.shape), 0.01, 0.99)
    noisy = np.clip(0.5 * y + 0.25 + rng.normal(0, 0.25, y.shape), 0.01, 0.99)
    useless = np.full_like(y, 0.5)
    for members in ([good, noisy], [noisy, useless, good], [useless]):
        for per_class in (True, False):
            w = fit_weights(y, members, per_class)
            assert w.shape == (6, len(members)) and (w >= 0).all() and np.allclose(w.sum(1), 1)
            score = weighted_log_loss(y, blend(members, w))
            assert score <= min(weighted_log_loss(y, m) for m in members) + 1e-12
    w = fit_weights(y, [good, noisy])
    assert (w[:, 0] > w[:, 1]).all()


def test_per_class_weights_use_what_each_member_is_good_at():
    """Member a knows the first three classes, member b the last three: per-class weights pick each where it is
    good and beat any single weight per member; the cross-fitted figure (weights from the other folds) is honest."""
    rng = np.random.default_rng(1)
    y = (rng.random((600, 6)) < 0.3).astype(float)
    sharp = np.clip(0.8 * y + 0.1, 0.01, 0.99)
    a = np.where(np.arange(6) < 3, sharp, 0.3)
    b = np.where(np.arange(6) < 3, 0.3, sharp)
    w = fit_weights(y, [a, b])
    assert np.allclose(w[:3, 0], 1, atol=1e-3) and np.allclose(w[3:, 1], 1, atol=1e-3)
    assert weighted_log_loss(y, blend([a, b], w)) < weighted_log_loss(y, blend([a, b], fit_weights(y, [a, b], False))) - 0.1
    folds = np.arange(600) % 3
    honest = cross_fitted(y, [a, b], folds)
    assert weighted_log_loss(y, honest) == pytest.approx(weighted_log_loss(y, blend([a, b], w)), abs=1e-3)


def fake_run(root, name, data_dir, oof_value, test_images, folds=(0, 1), test_base=0.2):
    labels = pd.read_csv(data_dir / "labels_wide.csv", index_col=0)
    for k in folds:
        d = root / name / f"fold{k}"
        d.mkdir(parents=True)
        (d / "config.yaml").write_text(yaml.safe_dump({"data_dir": str(data_dir), "out_dir": str(root)}))
        ids = labels.index[k::2]
        oof = pd.DataFrame(np.clip(labels.loc[ids].to_numpy() * oof_value + (1 - oof_value) / 2, 0, 1), index=ids, columns=CLASSES)
        oof.insert(0, "fold", k)
        oof.rename_axis("ID").to_csv(d / "oof.csv")
        pd.DataFrame(test_base + 0.1 * k, index=pd.Index(test_images, name="ID"), columns=CLASSES).to_csv(d / "test.csv")
    return root / name


def test_make_submission_writes_a_valid_submission(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(1)
    train_ids = [f"ID_{i:03x}" for i in range(40)]
    lab = pd.DataFrame((rng.random((40, 6)) < 0.3).astype(int), index=train_ids, columns=CLASSES)
    lab["any"] = lab[CLASSES[:5]].max(axis=1)
    lab.to_csv(data / "labels_wide.csv")
    to_long(lab).to_csv(data / "stage_2_train.csv", index=False)
    test_ids = ["ID_a01", "ID_a02"]
    sample_file(data, test_ids)
    a = fake_run(tmp_path / "out" / "runs", "a", data, 0.8, test_ids)
    b = fake_run(tmp_path / "out" / "runs", "b", data, 0.2, test_ids, test_base=0.6)
    info = make_submission([a, b], "t", data_dir=data, submissions_dir=tmp_path / "subs", out_dir=tmp_path / "out", quiet=True)
    sub = submission.validate_file(tmp_path / "subs" / "stage_2_t.csv", data / "stage_2_sample_submission.csv")
    assert len(sub) == 12
    assert info["blend_oof_wll"] <= min(m["oof_wll"] for m in info["members"]) + 1e-12
    # the submission applies the weights fitted once on OOF (the blend file), not equal ones: member a (0.25, the
    # mean of its folds' 0.2 and 0.3) is far better out of fold than b (0.65), so the fitted blend leans to a
    w = json.loads(Path(info["blend_file"]).read_text())["weights"]
    assert min(w["a"]) > 0.7, w
    want = {f"{i}_{c}": w["a"][k] * 0.25 + w["b"][k] * 0.65 for i in test_ids for k, c in enumerate(CLASSES)}
    np.testing.assert_allclose(sub["Label"], [round(want[i], 6) for i in sub["ID"]], atol=1e-6)
    assert np.abs(sub["Label"] - 0.45).min() > 0.05  # equal weights would give 0.45
    assert not list((tmp_path / "subs").glob(".*"))  # no temporary file left behind
    c = fake_run(tmp_path / "out" / "runs", "c", data, 0.8, ["ID_a01"])
    with pytest.raises(PipelineError, match="other images"):
        make_submission([a, c], "x", data_dir=data, submissions_dir=tmp_path / "subs", quiet=True)
    # the same members again: nothing is redone; a member whose predictions changed: stop, and --overwrite redoes
    kw = dict(data_dir=data, submissions_dir=tmp_path / "subs", out_dir=tmp_path / "out", quiet=True)
    mtime = (tmp_path / "subs" / "stage_2_t.csv").stat().st_mtime_ns
    assert make_submission([a, b], "t", **kw)["blend_oof_wll"] == info["blend_oof_wll"]
    assert (tmp_path / "subs" / "stage_2_t.csv").stat().st_mtime_ns == mtime
    oof = pd.read_csv(b / "fold0" / "oof.csv", index_col=0)
    oof[CLASSES] = oof[CLASSES] * 0.9
    oof.to_csv(b / "fold0" / "oof.csv")
    with pytest.raises(PipelineError, match=r"input b: .*changed"):
        make_submission([a, b], "t", **kw)
    assert (tmp_path / "subs" / "stage_2_t.csv").stat().st_mtime_ns == mtime
    assert make_submission([a, b], "t", overwrite=True, **kw)["members"][1]["oof_wll"] != info["members"][1]["oof_wll"]


def test_submit_dry_run_and_missing_credentials(tmp_path, monkeypatch, capsys):
    sample = sample_file(tmp_path, IMAGES)
    f = tmp_path / "sub.csv"
    valid_long(IMAGES).to_csv(f, index=False)
    assert submit(f, "msg", sample, dry_run=True) == 0
    out = capsys.readouterr().out
    assert "competitions submit -c rsna-intracranial-hemorrhage-detection" in out and str(f) in out
    for k in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "nokaggle"))
    assert not has_credentials()
    with pytest.raises(PipelineError, match="no Kaggle credentials"):
        submit(f, "msg", sample)
    pd.read_csv(f).iloc[:-1].to_csv(f, index=False)
    with pytest.raises(PipelineError, match="missing IDs"):
        submit(f, "msg", sample, dry_run=True)


def test_validate_file_reads_blank_lines_and_reports_file_lines(tmp_path):
    sample = sample_file(tmp_path, IMAGES)
    lines = valid_long(IMAGES).to_csv(index=False).splitlines()
    f = tmp_path / "sub.csv"
    f.write_text("\n".join(lines[:3] + [""] + lines[3:] + ["", ""]) + "\n")
    got = submission.validate_file(f, sample)
    pd.testing.assert_frame_equal(got, valid_long(IMAGES))  # the rows as written, indexed 0..17, blank lines gone
    lines[5], lines[6] = lines[6], lines[5]  # rows 5 and 6 swapped: after the blank line, the first is on line 7
    f.write_text("\n".join(lines[:3] + [""] + lines[3:]) + "\n")
    with pytest.raises(PipelineError, match=E(f"{f} is not a valid submission:\n  IDs not in the sample submission's "
                                              f"order (first difference at line 7)") + "$"):
        submission.validate_file(f, sample)
    with pytest.raises(PipelineError, match=E(f"submission file not found: {tmp_path / 'nope.csv'}") + "$"):
        submission.validate_file(tmp_path / "nope.csv", sample)


@pytest.mark.parametrize("content, message", [
    (b"", r"empty file \(0 bytes\)"),
    ("ID,Label\nID_00a_\u00e9,0.5\n".encode("latin-1"), "not UTF-8"),
    (b"\n\nID,Label\n", "no header on line 1"),
])
def test_unreadable_submission_names_the_file(tmp_path, content, message):
    sample = sample_file(tmp_path, IMAGES)
    f = tmp_path / "sub.csv"
    f.write_bytes(content)
    with pytest.raises(PipelineError, match=re.escape(str(f)) + f": {message}.*; expected a submission CSV with header "
                                            f"ID,Label \\(python -m src.make_submission writes one\\)"):
        submission.validate_file(f, sample)
    with pytest.raises(PipelineError, match=re.escape(str(f)) + f": {message}"):
        submission.validate_file(sample, f)  # the same file given as the sample submission


def test_the_kaggle_client_runs():
    """src.upload hands the file to the official client: it must start (kaggle 2.2.4 imports `six` without
    declaring it; requirements.txt pins it)."""
    import subprocess
    import sys

    from src.upload import kaggle_command
    exe = kaggle_command("f.csv", "m")[0]
    r = subprocess.run([exe, "competitions", "submit", "--help"], capture_output=True, text=True, timeout=120,
                       env={"HOME": "/nonexistent", "PATH": str(Path(sys.executable).parent)})
    assert r.returncode == 0 and "usage: kaggle competitions submit" in r.stdout, r.stderr[-1000:]
