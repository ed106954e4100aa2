"""The DICOM objects one study's answer becomes (src/serve/dicom_out.py), on a study built from the real RSNA sample
(tests/studies.py: the axial series, its 1 mm, bone and contrast copies, sagittal and coronal reformats, a scout and a
dose report), scored by the session's tiny trained run and written to files:

- every object passes dicom3tools' `dciodvfy` with no error; the warnings left are listed in WARNINGS (why: there
  and in docs/node.md, "What a viewer receives");
- dcmtk's `dsr2html` renders the SR;
- the SR read back (pydicom, highdicom): TID 1500, the finding codes, each probability the StudyResult's to the bit
  and referencing its slice, the verdict as a qualitative evaluation, every series not scored with its reason, the
  research statements before the findings, IHE AIR's Contributing Equipment with a Device UID that is the model's;
- the Key Object Selection holds exactly the flagged slices; the Secondary Captures state the body part and point
  at their source slices.
"""
from __future__ import annotations

import dataclasses
import hashlib
import html
import re
import shutil
import subprocess
import warnings
import zipfile
from pathlib import Path

import highdicom as hd
import numpy as np
import pandas as pd
import pydicom
import pytest

from .conftest import RSNA_SAMPLE, copy_run

pytestmark = pytest.mark.skipif(not RSNA_SAMPLE.is_dir(), reason="needs the real sample in ../shared/rsna_sample "
                                                                  "(read-only data beside the checkout)")

# The finding codes, written out here as the reference (docs/node.md names their sources).
FINDINGS = {"epidural": ("EDH", "99ICH"), "intraparenchymal": ("274100004", "SCT"),
            "intraventricular": ("IVH", "99ICH"), "subarachnoid": ("21454007", "SCT"),
            "subdural": ("35486000", "SCT"), "any": ("1386000", "SCT")}
PRESENT, ABSENT = ("52101004", "SCT"), ("272519000", "SCT")
# What dciodvfy (dicom3tools 1.00~20220618) still warns about, and why:
# - 99ICH: the local scheme of the concepts no standard code was found for (two finding types, and the names of the
#   SR's text items: warning, intended use, model, series not scored, ...); one warning per coded item that uses it.
# - Device UID: IHE AIR (Rev 1.1, 6.5.3.1) puts the model's Device UID in the Contributing Equipment item; this
#   dciodvfy's copy of the standard does not list Device UID there, and calls the object "Standard Extended".
LOCAL = "Warning - Unrecognized defined term <99ICH> for value 1 of attribute <Coding Scheme Designator>"
WARNINGS = {LOCAL,
            "Warning - Attribute is not present in standard DICOM IOD - (0x0018,0x1002) UI Device UID",
            "Warning - Dicom dataset contains attributes not present in standard DICOM IOD - this is a Standard "
            "Extended SOP Class"}


@dataclasses.dataclass
class Answer:
    study: object                     # StudyResult
    objects: list[Path]               # SR, KOS, SCs as files
    uids: dict                        # tests.studies.mixed_study's series UIDs
    sop: dict                         # file name -> SOP Instance UID of the study's files (read here with pydicom)
    algorithm: object


def write(objects, dest: Path) -> list[Path]:
    dest.mkdir(parents=True)
    for i, o in enumerate(objects):
        o.save_as(dest / f"{i:02d}.dcm", enforce_file_format=True)
    return sorted(dest.glob("*.dcm"))


def flagged_variant(study, card: dict, t: float):
    """The same study answered at another operating point, its summaries made by src.serve.results itself."""
    from src.serve.results import StudyResult, study_summary, summarise
    from src.serve.selector import SeriesRules
    card = {**card, "operating_point": {"threshold": t, "target_sensitivity": 0.95, "specificity": 0.5}}
    scored = [dataclasses.replace(r, summary=summarise(r.series, r.table, card)) for r in study.scored]
    return StudyResult(study.study, study.series, scored, study_summary(study.study, study.series, scored, card,
                                                                         SeriesRules.load()))


@pytest.fixture(scope="module")
def answers(trained_run, tmp_path_factory):
    """(the study as scored, at the run's threshold; the same at a threshold that flags some slices), written."""
    from src.predictor import Predictor
    from src.serve.dicom_out import Algorithm, result_objects, source_header
    from src.serve.results import analyse_study

    from .studies import mixed_study
    root = tmp_path_factory.mktemp("dicom_out")
    uids = mixed_study(root / "study")
    p = Predictor.load(trained_run)
    (study,), _ = analyse_study(p, [root / "study"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        heads = {f.name: pydicom.dcmread(f, stop_before_pixels=True) for f in (root / "study").iterdir()}
    headers = {n: source_header(heads[n]) for r in study.scored for n in r.table["file"]}
    sop = {n: str(h.SOPInstanceUID) for n, h in heads.items()}
    alg = Algorithm.of(p)
    p_any = study.scored[0].table["any"].to_numpy()
    flagged = flagged_variant(study, p.card, float(np.sort(p_any)[-3]))  # the top three slices and ties
    return [Answer(s, write(result_objects(s, headers, alg), root / name), uids, sop, alg)
            for s, name in ((study, "plain"), (flagged, "flagged"))]


def dciodvfy(path: Path) -> list[str]:
    r = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line.strip() for line in (r.stdout + r.stderr).splitlines() if line.strip()]


def codes_of(ds, scheme: str) -> int:
    """How many code sequence items of `ds` (nested) use `scheme`."""
    n = 0
    for elem in ds.iterall():
        if elem.VR == "SQ":
            n += sum(1 for item in elem.value if item.get("CodingSchemeDesignator") == scheme)
    return n


def test_every_object_passes_dciodvfy_with_no_error(answers):
    """Each object of both answers: no error line, and every warning one of WARNINGS, the 99ICH ones exactly the
    SR's uses of the local scheme. The warnings that remain: "Unrecognized defined term <99ICH>", once per coded
    item of the local scheme (two finding types with no confirmed SNOMED CT code, the names of the SR's text items);
    "Device UID not present in standard DICOM IOD" and so "Standard Extended SOP Class": IHE AIR puts the model's
    Device UID in the Contributing Equipment item, which this dciodvfy's copy of the standard does not list."""
    for a in answers:
        assert len(a.objects) == 6  # SR, KOS, 4 Grad-CAM images
        for f in a.objects:
            lines = dciodvfy(f)
            assert [line for line in lines if line.startswith("Error")] == [], f
            found = [line for line in lines if line.startswith("Warning")]
            assert set(found) <= WARNINGS, (f, set(found) - WARNINGS)
            assert found.count(LOCAL) == codes_of(pydicom.dcmread(f), "99ICH")


def test_dsr2html_renders_the_sr(answers, tmp_path):
    sr = answers[0].objects[0]
    r = subprocess.run(["dsr2html", str(sr), str(tmp_path / "sr.html")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    text = html.unescape((tmp_path / "sr.html").read_text())
    for meaning in ("Epidural hemorrhage", "Cerebral hemorrhage", "Intraventricular hemorrhage",
                    "Subarachnoid intracranial hemorrhage", "Subdural intracranial hemorrhage",
                    "Intracranial hemorrhage", "Imaging Measurement Report", "UNVERIFIED", "Research use, not a "
                    "medical device"):
        assert meaning in text, meaning


def root_items(ds) -> list:
    return list(ds.ContentSequence)


def name(item) -> tuple[str, str]:
    c = item.ConceptNameCodeSequence[0]
    return c.CodeValue, c.CodingSchemeDesignator


def test_the_sr_is_a_tid_1500_report_of_the_study(answers):
    """Template, flags, finding codes, and per scored series and type the highest slice probability (the
    StudyResult's, to the bit) derived as the maximum and referencing the slice it came from."""
    for a in answers:
        ds = pydicom.dcmread(a.objects[0])
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33" and ds.SeriesNumber == 9901  # Comprehensive SR
        assert (ds.ContentTemplateSequence[0].MappingResource, ds.ContentTemplateSequence[0].TemplateIdentifier) \
            == ("DCMR", "1500")
        assert (ds.VerificationFlag, ds.CompletionFlag) == ("UNVERIFIED", "COMPLETE")
        assert (ds.StudyInstanceUID, ds.PatientID) == (a.uids["study"], "ICH-TEST-1")
        groups = hd.sr.MeasurementReport.from_sequence([ds]).get_image_measurement_groups()
        (r,) = a.study.scored
        assert r.series == a.uids["axial"] and len(groups) == 6
        for cls, g in zip(("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any"),
                          groups):
            assert (g.finding_type.value, g.finding_type.scheme_designator) == FINDINGS[cls]
            (m,) = g.get_measurements()
            assert (m.name.value, m.name.scheme_designator, m.name.meaning) == ("122157", "DCM", "Probability")
            assert m.value == float(r.table[cls].max())
            assert (m.derivation.value, m.derivation.scheme_designator) == ("56851009", "SCT")  # Maximum
            (img,) = m.referenced_images
            assert img.referenced_sop_instance_uid == a.sop[r.table["file"].iloc[int(r.table[cls].argmax())]]


def test_the_verdict_is_a_qualitative_evaluation(answers):
    """'any' carries present / absent at the threshold, and so does the study's evaluation at the end; the plain
    answer (the tiny model, 0.5) finds nothing, the other (its third-highest slice probability) finds a bleed."""
    expected = {"no hemorrhage found": ABSENT, "suspected hemorrhage": PRESENT}
    verdicts = [a.study.summary["verdict"] for a in answers]
    assert verdicts == ["no hemorrhage found", "suspected hemorrhage"]
    for a in answers:
        ds = pydicom.dcmread(a.objects[0])
        groups = hd.sr.MeasurementReport.from_sequence([ds]).get_image_measurement_groups()
        (q,) = groups[-1].get_qualitative_evaluations()
        assert (q.name.value, q.name.scheme_designator) == FINDINGS["any"]
        assert (q.value.value, q.value.scheme_designator) == expected[a.study.summary["verdict"]]
        last = root_items(ds)[-1]
        assert name(last) == ("C0034375", "UMLS")  # TID 1500's Qualitative Evaluations
        code = last.ContentSequence[0]
        assert name(code) == FINDINGS["any"]
        c = code.ConceptCodeSequence[0]
        assert (c.CodeValue, c.CodingSchemeDesignator) == expected[a.study.summary["verdict"]]
        threshold = next(i for i in root_items(ds) if name(i) == ("122411", "DCM"))
        assert float(threshold.MeasuredValueSequence[0].FloatingPointValue) == a.study.summary["threshold"]


def test_the_research_statements_come_first_and_every_series_is_listed(answers):
    """Among the report's content (after language, observer and procedure), the generated-data warning first, then
    the intended use, all before the findings; each series not scored as a text with its reason."""
    from src.serve.dicom_out import RESEARCH_USE
    from src.serve.results import SYNTHETIC_WARNING
    a = answers[0]
    assert a.study.summary["model"]["synthetic"]  # the session's run: generated data
    items = root_items(pydicom.dcmread(a.objects[0]))
    content = [i for i in items if i.RelationshipType == "CONTAINS"]
    assert [(name(i), i.TextValue) for i in content[:2]] == [(("WARNING", "99ICH"), SYNTHETIC_WARNING),
                                                              (("INTENDED-USE", "99ICH"), RESEARCH_USE)]
    findings = next(k for k, i in enumerate(content) if name(i) == ("126010", "DCM"))  # Imaging Measurements
    assert findings > 2
    not_scored = [i.TextValue for i in content if name(i) == ("NOT-SCORED", "99ICH")]
    listing = a.study.series.set_index("SeriesInstanceUID")
    kinds = ("thin", "bone", "contrast", "sagittal", "coronal", "localizer", "dose")
    assert sorted(t.split(", ")[1] for t in not_scored) == sorted(a.uids[k] for k in kinds)
    for t in not_scored:
        reason = listing.loc[t.split(", ")[1], "reason"]
        assert reason and t.endswith(f": {reason}")
    assert any("ImageType LOCALIZER" in t for t in not_scored) and any("kernel BONE" in t for t in not_scored)
    scored = [i.TextValue for i in content if name(i) == ("SCORED", "99ICH")]
    assert len(scored) == 1 and a.uids["axial"] in scored[0]


def test_contributing_equipment_names_the_model_as_ihe_air_asks(answers):
    """On every object: Purpose "Processing Algorithm", the code's version, and the Device UID made from the
    model's identity, which is also the SR's device observer."""
    from src.bundle import code_version
    a = answers[0]
    for f in a.objects:
        ds = pydicom.dcmread(f)
        item = ds.ContributingEquipmentSequence[0]
        purpose = item.PurposeOfReferenceCodeSequence[0]
        assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == \
            ("Newcode1", "99IHE", "Processing Algorithm")
        assert item.Manufacturer == "ICH research node (src.serve.node)" and item.ManufacturerModelName == "ICH model m"
        assert item.SoftwareVersions == code_version() != "unknown"
        assert item.DeviceUID == a.algorithm.uid and re.fullmatch(r"2\.25\.\d+", item.DeviceUID)
    observer = [i for i in root_items(pydicom.dcmread(a.objects[0])) if name(i) == ("121012", "DCM")]
    assert [i.UID for i in observer] == [a.algorithm.uid]  # Device Observer UID


def bump_oof(run: Path) -> None:
    """A retrained run: one out-of-fold probability of fold 0 differs (as GPU kernels make it differ)."""
    f = run / "fold0" / "oof.csv"
    df = pd.read_csv(f)
    df.iloc[0, -1] = (df.iloc[0, -1] + 0.5) % 1
    df.to_csv(f, index=False)


def test_the_device_uid_is_the_model_s(trained_run, answers, tmp_path):
    """The same model gives the same UID (twice, and loaded as the node loads it); a retrained run another; a bundle
    its own, made from the SHA-256 of its manifest member, and a bundle of the retrained run another."""
    from src.bundle import read_run, write_bundle
    from src.predictor import Predictor, model_identity
    from src.serve.dicom_out import device_uid
    assert device_uid(model_identity(trained_run)) == device_uid(model_identity(trained_run)) == answers[0].algorithm.uid
    retrained = copy_run(trained_run, "m_dicom_retrained")
    try:
        assert device_uid(model_identity(retrained)) == answers[0].algorithm.uid  # a copy is the same model
        bump_oof(retrained)
        assert device_uid(model_identity(retrained)) != answers[0].algorithm.uid
        write_bundle(read_run(trained_run), tmp_path / "a.ichbundle")
        write_bundle(read_run(retrained), tmp_path / "b.ichbundle")
    finally:
        for kind in ("", "seq_", "boost_"):
            shutil.rmtree(retrained.parent / f"{kind}{retrained.name}", ignore_errors=True)
    manifest = zipfile.ZipFile(tmp_path / "a.ichbundle").read("manifest.json")
    assert model_identity(tmp_path / "a.ichbundle").endswith(hashlib.sha256(manifest).hexdigest())
    a_uid = device_uid(model_identity(tmp_path / "a.ichbundle"))
    assert Predictor.load(tmp_path / "a.ichbundle", stage2=False).identity == model_identity(tmp_path / "a.ichbundle")
    assert a_uid not in (answers[0].algorithm.uid, device_uid(model_identity(tmp_path / "b.ichbundle")))
    with pytest.raises(ValueError, match="Predictor.load"):
        device_uid("")


def test_the_key_objects_are_the_flagged_slices(answers):
    """At or above the threshold for 'any', each referenced in the content and the evidence; the top slice when none
    is; in the source study, as series 9903."""
    for a in answers:
        ds = pydicom.dcmread(a.objects[1])
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.59" and ds.SeriesNumber == 9903
        assert ds.StudyInstanceUID == a.uids["study"]
        t = a.study.summary["threshold"]
        table = a.study.scored[0].table
        above = table.loc[table["any"] >= t, "file"]
        want = {a.sop[f] for f in (above if len(above) else table.loc[[table["any"].idxmax()], "file"])}
        images = [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in ds.ContentSequence
                  if i.ValueType == "IMAGE"]
        evidence = [s.ReferencedSOPInstanceUID for st in ds.CurrentRequestedProcedureEvidenceSequence
                    for se in st.ReferencedSeriesSequence for s in se.ReferencedSOPSequence]
        assert sorted(images) == sorted(want) == sorted(evidence)
    assert [len(pydicom.dcmread(a.objects[1]).CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
                .ReferencedSOPSequence) for a in answers] == [1, 3]


def test_the_secondary_captures_state_the_body_part_and_point_at_their_slice(answers):
    """Laterality is General Series' type 2C, for paired body parts: each SC says it shows a head (so none is due)
    and references the slice its caption names, the most suspicious slices of the scored series."""
    a = answers[0]
    r = a.study.scored[0]
    refs = []
    for f in a.objects[2:]:
        ds = pydicom.dcmread(f)
        assert ds.SeriesNumber == 9902 and ds.BodyPartExamined == "HEAD" and "Laterality" not in ds
        pos = int(re.search(r"on slice (\d+) of", ds.ImageComments).group(1)) - 1
        ref = ds.SourceImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == a.sop[r.table["file"].iloc[pos]]
        assert ref.ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
        refs.append(pos)
    assert sorted(refs) == sorted(r.cams) and refs == sorted(refs, key=lambda p: -r.table["any"].iloc[p])


def test_a_study_with_nothing_scored_gets_no_objects(answers):
    from src.serve.dicom_out import result_objects
    assert result_objects(dataclasses.replace(answers[0].study, scored=[]), {}, answers[0].algorithm) == []
