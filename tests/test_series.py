"""The series selector on a study as a PACS sends it (tests/studies.py, built from the real RSNA sample): only the
original axial soft-tissue non-contrast series is scored, every other series is listed with its reason; a site's
changed rule changes what is scored; slices are ordered along the slice normal, tilted or not."""
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from src.dicom import read_dicom, slice_z
from src.predictor import Predictor
from src.scans import decode_files, list_inputs, read_headers
from src.serve.results import analyse_study
from src.serve.selector import SeriesRules, kernel_kind, select
from src.utils import PipelineError

from .conftest import RSNA_SAMPLE
from .studies import REASONS, mixed_study

pytestmark = pytest.mark.skipif(not RSNA_SAMPLE.exists(), reason="../shared/rsna_sample (the real files) not present")

@pytest.fixture(scope="module")
def study(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixed") / "study"
    return d, mixed_study(d)


def decisions(folder, rules=None, **kw) -> pd.DataFrame:
    heads = read_headers(list_inputs([folder]))
    assert (heads.status == "ok").all()
    return select(heads, rules or SeriesRules.load(), **kw).set_index("SeriesInstanceUID")


def test_only_the_axial_soft_tissue_series_is_scored(study):
    folder, uids = study
    d = decisions(folder)
    assert len(d) == 8 and d.loc[uids["axial"], "scored"] and d.scored.sum() == 1
    for kind, why in REASONS.items():
        assert d.loc[uids[kind], "reason"] == why, kind
    assert d.loc[uids["axial"], "reason"] == "" and d.loc[uids["axial"], "notes"] == ""
    assert d.SeriesNumber.tolist() == ["1", "2", "3", "4", "5", "601", "602", "997"]  # the study's own order


def test_all_series_scores_every_eligible_one(study):
    folder, uids = study
    d = decisions(folder, all_series=True)
    assert set(d.index[d.scored]) == {uids["axial"], uids["thin"]}


def test_a_sites_rules_file_changes_what_is_scored(study, tmp_path):
    """A copy of the shipped file with two rules changed: contrast allowed, every eligible series scored."""
    folder, uids = study
    site = tmp_path / "site_rules.yaml"
    text = SeriesRules.load().source
    site.write_text(open(text).read().replace("refuse_contrast: true", "refuse_contrast: false")
                    .replace("all_series: false", "all_series: true"))
    d = decisions(folder, SeriesRules.load(site))
    assert set(d.index[d.scored]) == {uids["axial"], uids["thin"], uids["contrast"]}
    # and a stricter tilt: the sample's series tilted by 14.5 degrees is no longer scored
    strict = tmp_path / "strict.yaml"
    strict.write_text("max_tilt_degrees: 10\n")
    tilted = decisions(RSNA_SAMPLE / "stage_2_train_images", SeriesRules.load(strict), all_series=True)
    assert tilted.loc["ID_5f8484c3e0", "reason"] == ("oblique slices: the slice normal is 14 degrees from the "
                                                     "patient's z axis (at most 10)")
    assert tilted.loc["ID_44cfc8e964", "scored"]


@pytest.mark.parametrize("text,message", [("max_tilts: 10\n", r"unknown rule\(s\) \['max_tilts'\]"),
                                          ("slice_thickness_mm: 5\n", r"slice_thickness_mm must be \[low, high\]"),
                                          ("refuse_contrast: maybe\n", r"refuse_contrast must be true or false"),
                                          ("- a list\n", r"a series rules file is a YAML mapping"),
                                          ("unknown_kernel: sometimes\n", r"unknown_kernel must be allow or refuse")])
def test_a_broken_rules_file_is_a_clear_error(tmp_path, text, message):
    f = tmp_path / "rules.yaml"
    f.write_text(text)
    with pytest.raises(PipelineError, match=rf"{f}: {message}"):
        SeriesRules.load(f)


@pytest.mark.parametrize("kernel,vendor,kind", [("STANDARD", "GE MEDICAL SYSTEMS", "soft"), ("BONE", "GE MEDICAL SYSTEMS", "sharp"),
                                                ("HD BONE", "GE", "sharp"), ("BONE PLUS", "GE MEDICAL SYSTEMS", "sharp"),
                                                ("Bone", "SIEMENS", "sharp"), ("LUNG", "", "sharp"),
                                                ("HD STANDARD", "GE", "soft"), ("SOFT TISSUE", "GE", "soft"),
                                                ("BONEPLUS", "GE", "sharp"), ("H30s", "SIEMENS", "soft"),
                                                ("Hr38", "Siemens Healthineers", "soft"), ("H70h", "SIEMENS", "sharp"),
                                                ("J70h", "", "sharp"), ("FC23", "TOSHIBA", "soft"), ("FC30", "Canon", "sharp"),
                                                ("FC52", "TOSHIBA", "sharp"), ("UB", "Philips", "soft"), ("D", "Philips", "sharp"),
                                                ("YC", "Philips", "sharp"), ("Q99x", "SIEMENS", "sharp"), ("H55s", "SIEMENS", "unknown"),
                                                ("XYZ", "", "unknown"), ("", "GE", "unknown")])
def test_the_kernel_table(kernel, vendor, kind):
    assert kernel_kind(kernel, vendor) == kind


def copy_series(study, uids, kind, dest, keep):
    """The files of one series of the study whose InstanceNumber passes keep(n)."""
    folder, _ = study
    dest.mkdir(parents=True)
    for f in folder.iterdir():
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        if ds.SeriesInstanceUID == uids[kind] and keep(int(ds.InstanceNumber)):
            shutil.copy(f, dest / f.name)
    return dest


def test_missing_slices_are_refused_and_one_missing_slice_is_a_note(study, tmp_path):
    """Two slices missing in a row (a step 3 times the median, past max_gap_ratio 2.5) are refused; one is a note."""
    folder, uids = study
    two = copy_series(study, uids, "axial", tmp_path / "two", lambda n: n not in (10, 11))
    d = decisions(two)
    assert d.loc[uids["axial"], "reason"] == ("a gap of 15 mm between slices 5 mm apart: missing slices (2.5D input "
                                              "and the sequence model read neighbours)")
    one = copy_series(study, uids, "axial", tmp_path / "one", lambda n: n != 10)
    d = decisions(one)
    assert d.loc[uids["axial"], "scored"] and d.loc[uids["axial"], "notes"] == \
        "uneven spacing: largest step 10 mm, median 5 mm"


def tilt(ds: pydicom.Dataset, degrees: float, k: int, step: float) -> None:
    """Slice k of a stack tilted about x by `degrees`, `step` mm apart along its normal."""
    t = np.radians(degrees)
    row, col = np.array([1, 0, 0.0]), np.array([0, np.cos(t), np.sin(t)])
    normal = np.cross(row, col)
    ds.ImageOrientationPatient = [*row, *[round(v, 6) for v in col]]
    ds.ImagePositionPatient = [round(v, 4) for v in np.array([-125.0, -125.0, 0.0]) + k * step * normal]


def test_a_tilted_series_is_ordered_along_its_normal(study, tmp_path):
    """A 25-degree gantry tilt, files in shuffled order: slices come out in stack order, the step along the normal
    is the true 5 mm, and 2.5D neighbours follow. (The positions here step along the normal, so ImagePositionPatient[2]
    steps by 5 x cos 25 = 4.53 mm; a scanner's step it by 5 / cos(tilt), docs/series.md: the order is the same.)"""
    folder, uids = study
    src = copy_series(study, uids, "axial", tmp_path / "src", lambda n: True)
    files = sorted(src.iterdir(), key=lambda f: int(pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber))
    out = tmp_path / "tilted"
    out.mkdir()
    order = np.random.default_rng(3).permutation(len(files))
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        tilt(ds, 25, k, 5.0)
        ds.save_as(out / f"f{order[k]:03d}.dcm", enforce_file_format=True)
    last = read_dicom(out / f"f{order[-1]:03d}.dcm")
    t = np.radians(25)
    normal = np.cross([1, 0, 0], [0, np.cos(t), np.sin(t)])  # (0, -sin 25, cos 25)
    assert slice_z(last) == (pytest.approx(float(np.dot([float(v) for v in last.ImagePositionPatient], normal)), abs=1e-4),
                             "ImagePositionPatient")
    _, meta = decode_files(sorted(out.iterdir()), size=32)
    meta = meta.sort_values("slice_index")
    want = [f"f{order[k]:03d}" for k in range(len(files))]
    assert meta["ID"].tolist() == want
    assert np.allclose(np.diff(meta["z"]), 5.0, atol=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ipp_z = [float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in meta["path"]]
    assert np.allclose(np.diff(ipp_z), 5.0 * np.cos(t), atol=1e-3)  # 4.53 mm: what ordering by z would measure
    assert meta["prev_id"].tolist()[1:] == want[:-1] and meta["next_id"].tolist()[:-1] == want[1:]
    d = decisions(out)
    assert d.loc[uids["axial"], "scored"] and d.loc[uids["axial"], "tilt_degrees"] == 25.0


def test_a_sagittal_series_is_ordered_along_x(study):
    """ImagePositionPatient[2] is the same for every sagittal slice: ordered along the normal (+x), not by name."""
    folder, uids = study
    heads = read_headers(list_inputs([folder]))
    sag = heads[heads.SeriesInstanceUID == uids["sagittal"]]
    _, meta = decode_files(sag["path"].tolist(), size=32)
    meta = meta.sort_values("slice_index")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        xs = [float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[0]) for p in meta["path"]]
    # the normal of rows (0, 1, 0) x columns (0, 0, -1) is -x, made to point the way of its largest component: +x
    assert np.all(np.diff(xs) > 0) and len(set(meta["z"])) == 24


def test_the_demo_answers_once_for_the_study(study, trained_run):
    folder, uids = study
    studies, skipped = analyse_study(Predictor.load(trained_run), [folder], cam_slices=1)
    assert len(studies) == 1 and skipped.empty
    s = studies[0]
    assert s.study == uids["study"] and [r.series for r in s.scored] == [uids["axial"]]
    assert len(s.scored[0].table) == 33
    listing = s.series.set_index("SeriesInstanceUID")
    for kind, why in REASONS.items():
        assert listing.loc[uids[kind], "reason"] == why
    assert s.summary["verdict"] == s.scored[0].summary["verdict"] and s.summary["scored_series"] == [uids["axial"]]


def test_no_readable_header_gives_an_empty_listing(tmp_path):
    """Files of which none is DICOM: no series, no error (the front ends then list the files as skipped)."""
    (tmp_path / "a.dcm").write_bytes(b"x")
    heads = read_headers([tmp_path / "a.dcm"])
    d = select(heads[heads.status == "ok"], SeriesRules.load())
    assert d.empty and list(d.columns)[:2] == ["StudyInstanceUID", "SeriesInstanceUID"]


def edited(study, uids, kind, dest, change, keep=lambda n: True) -> Path:
    """A copy of one series of the study, each file changed by change(ds, instance_number) (pixels kept)."""
    copy_series(study, uids, kind, dest, keep)
    for f in dest.iterdir():
        ds = pydicom.dcmread(f)
        change(ds, int(ds.InstanceNumber))
        ds.save_as(f)
    return dest


def test_positions_from_different_tags_or_none_are_refused(study, tmp_path):
    """One slice without ImagePositionPatient (its place would be its InstanceNumber among millimetres): refused;
    none with it nor SliceLocation: refused; SliceLocation on every slice instead: scored, with a note."""
    folder, uids = study

    def drop_position(ds, n, on=lambda n: True, location=False):
        if on(n):
            if location:
                ds.SliceLocation = float(ds.ImagePositionPatient[2])
            del ds.ImagePositionPatient
    one = edited(study, uids, "axial", tmp_path / "one", lambda ds, n: drop_position(ds, n, lambda n: n == 20))
    assert decisions(one).loc[uids["axial"], "reason"] == (
        "slice positions from different tags (ImagePositionPatient on 32, InstanceNumber on 1): some slices lack "
        "ImagePositionPatient or ImageOrientationPatient, so their places are unknown")
    none = edited(study, uids, "axial", tmp_path / "none", drop_position)
    assert decisions(none).loc[uids["axial"], "reason"] == (
        "no ImagePositionPatient or SliceLocation: the slices' positions and spacing are unknown (InstanceNumber "
        "orders slices, in slices, not millimetres)")
    located = edited(study, uids, "axial", tmp_path / "located", lambda ds, n: drop_position(ds, n, location=True))
    d = decisions(located).loc[uids["axial"]]
    assert d["scored"] and d["notes"] == "positions from SliceLocation (no ImagePositionPatient)"


def test_a_feet_first_series_is_ordered_foot_to_head_as_a_head_first_one(study, tmp_path):
    """Rows running right to left (a feet-first patient): the cross product of the orientation points down; the
    order is still by rising ImagePositionPatient[2], as for the head-first series the model learned from."""
    folder, uids = study
    ffs = edited(study, uids, "axial", tmp_path / "ffs", lambda ds, n: setattr(ds, "ImageOrientationPatient",
                                                                               [-1, 0, 0, 0, 1, 0]))
    assert decisions(ffs).loc[uids["axial"], "scored"]
    _, meta = decode_files(sorted(str(f) for f in ffs.iterdir()), size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        z = [float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2])
             for p in meta.sort_values("slice_index")["path"]]
    assert len(z) == 33 and np.all(np.diff(z) > 0)


@pytest.mark.parametrize("agent,scored", [("N/A", True), ("-", True), ("Non-contrast", True), ("NONE GIVEN", True),
                                          ("no contrast agent", True), ("OMNIPAQUE 350", False)])
def test_a_stated_none_as_a_scanner_writes_it_is_no_contrast(study, tmp_path, agent, scored):
    folder, uids = study
    d = decisions(edited(study, uids, "contrast", tmp_path / "c", lambda ds, n: setattr(ds, "ContrastBolusAgent", agent)))
    assert d.loc[uids["contrast"], "scored"] == scored
    if not scored:
        assert d.loc[uids["contrast"], "reason"] == f"contrast agent {agent!r}: the model learned non-contrast CT"


def test_two_studies_never_share_a_series(study, tmp_path):
    """Two studies whose files carry no SeriesInstanceUID: one series each (not one of both, whose verdict would be
    both patients'), through the headers and the decode. Two studies naming one SeriesInstanceUID: both refused."""
    folder, uids = study
    studies = {}
    for name in ("a", "b"):
        uid = f"1.2.826.0.1.3680043.10.511.9.{len(studies) + 1}"
        studies[name] = uid
        edited(study, uids, "axial", tmp_path / "anon" / name,
               lambda ds, n, uid=uid: (delattr(ds, "SeriesInstanceUID"), setattr(ds, "StudyInstanceUID", uid)))
    heads = read_headers(list_inputs([tmp_path / "anon"]))
    d = select(heads, SeriesRules.load())
    assert d[["StudyInstanceUID", "SeriesInstanceUID", "scored"]].values.tolist() == \
        [[u, f"unknown-series-{u}", True] for u in sorted(studies.values())]
    _, meta = decode_files(heads["path"].tolist(), size=32)
    assert meta.groupby("SeriesInstanceUID")["StudyInstanceUID"].agg(["nunique", "size"]).values.tolist() == [[1, 33]] * 2
    edited(study, uids, "axial", tmp_path / "same" / "b", lambda ds, n: setattr(ds, "StudyInstanceUID", studies["b"]))
    copy_series(study, uids, "axial", tmp_path / "same" / "a", lambda n: True)
    d = select(read_headers(list_inputs([tmp_path / "same"])), SeriesRules.load())
    assert len(d) == 2 and not d.scored.any() and set(d.reason) == {
        "its SeriesInstanceUID also names a series of another study (a UID is unique): not mixed with it"}


def test_when_the_chosen_series_cannot_be_decoded_the_next_one_is_scored(study, trained_run, tmp_path):
    """The axial series' pixel data cut short on every file: the study is scored from its next eligible series (the
    1 mm one), the axial series listed with the reason and its files as skipped, the listing in the study's order."""
    folder, uids = study
    dest = tmp_path / "study"
    shutil.copytree(folder, dest)
    for f in dest.iterdir():
        ds = pydicom.dcmread(f)
        if ds.SeriesInstanceUID == uids["axial"]:
            ds.PixelData = ds.PixelData[:100]
            ds.save_as(f)
    (s,), skipped = analyse_study(Predictor.load(trained_run), [dest], cam_slices=0)
    assert [r.series for r in s.scored] == [uids["thin"]] and len(s.scored[0].table) == 33
    listing = s.series.set_index("SeriesInstanceUID")
    assert listing.loc[uids["axial"], "reason"] == \
        "eligible, but no slice of it could be decoded (its files are listed as skipped)"
    assert listing.loc[uids["thin"], "reason"] == "" and listing.SeriesNumber.tolist() == \
        ["1", "2", "3", "4", "5", "601", "602", "997"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        axial = {str(f) for f in dest.iterdir() if pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID ==
                 uids["axial"]}
    assert set(skipped["path"]) == axial and len(axial) == 33


def test_the_built_in_defaults_are_the_shipped_rules():
    """A site's rules file may name only the rules it changes; the others come from the dataclass, which must say
    what configs/serve/series_rules.yaml says."""
    import dataclasses
    assert dataclasses.replace(SeriesRules(), source="") == dataclasses.replace(SeriesRules.load(), source="")
