"""One study's answer as DICOM objects a PACS stores, any viewer shows and IHE AI Results (AIR) consumers read.

    from src.serve.dicom_out import Algorithm, result_objects, source_header
    algorithm = Algorithm.of(predictor)                          # once, when the model is loaded
    objects = result_objects(study, headers, algorithm)          # [SR, KOS, SC, SC, ...]; [] when nothing was scored

`study` is a `src.serve.results.StudyResult` (`analyse_study`); `headers` maps the file names of its scored slices
(`SeriesResult.table["file"]`, unique within the study: the node names its files by SOP Instance UID) to their
`source_header`. The objects go back to the PACS in the source study, as three new series with fresh UIDs and the
patient and study attributes of the source (docs/node.md, "What a viewer receives"):

- series 9901, a Comprehensive SR holding a TID 1500 Measurement Report (highdicom): first, for a model trained on
  generated data, that warning, then "research use, not a medical device"; the model and its card, the threshold
  and how it was chosen (`src.serve.results.verdict_threshold`), every series of the study scored or not and why;
  then per scored series and finding type (SNOMED CT where a code was found, `TYPE_CODES`) a measurement group with
  the series' highest slice probability, referencing that slice, and for "any" the verdict at the threshold as a
  qualitative evaluation (SNOMED CT Present / Absent); last the study's verdict. Verification UNVERIFIED, COMPLETE.
- series 9903, a Key Object Selection ("Of Interest") of the flagged slices: those at or above the threshold for
  "any", or the most suspicious one when none is.
- series 9902, Secondary Captures of the most suspicious slices with the Grad-CAM map over them (`overlay`) and a
  caption burned in, each pointing at its source slice.

Every object names the model in Contributing Equipment as IHE AIR Rev 1.1 (6.5.3.1) says: Purpose of Reference
(Newcode1, 99IHE, "Processing Algorithm"), Manufacturer, Manufacturer's Model Name, Software Versions (the code's
version) and a Device UID made from the model's identity (`device_uid`), so the same model always gives the same UID
and a retrained or re-bundled one another.
"""
from __future__ import annotations

import uuid
import warnings
from dataclasses import dataclass

import cv2
import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from ..card import card_text
from ..utils import CLASSES
from .results import SYNTHETIC_WARNING, SeriesResult, StudyResult, overlay

SCHEME = "99ICH"                      # the local coding scheme, only where no standard code was found (docs/node.md)
MANUFACTURER = "ICH research node (src.serve.node)"
RESEARCH_USE = ("Research use, not a medical device: not validated for clinical use; do not use it for diagnosis or "
                "triage.")
SR_SERIES_NUMBER, SC_SERIES_NUMBER, KO_SERIES_NUMBER = 9901, 9902, 9903
SC_SIZE = 512                         # Grad-CAM images: the source's usual matrix, whatever the model's input size


def code(value: str, meaning: str) -> hd.sr.CodedConcept:
    """A concept of the local scheme (its values stay within 16 characters)."""
    return hd.sr.CodedConcept(value, SCHEME, meaning)


# The finding types. SNOMED CT where a code could be confirmed here: 1386000 from DICOM's own code tables (pydicom's
# codedict), 21454007 and 274100004 from a tx.fhir.org expansion of SNOMED CT International (Feb 2025), 35486000
# from a second source (see docs/node.md). Epidural and intraventricular hemorrhage have SNOMED CT concepts, but no
# source in this workplace (offline) gave their identifiers, and a wrong one would claim another disease: they stay
# local until someone with a SNOMED browser fills them in here.
TYPE_CODES = {"epidural": code("EDH", "Epidural hemorrhage"),
              "intraparenchymal": hd.sr.CodedConcept("274100004", "SCT", "Cerebral hemorrhage"),
              "intraventricular": code("IVH", "Intraventricular hemorrhage"),
              "subarachnoid": hd.sr.CodedConcept("21454007", "SCT", "Subarachnoid intracranial hemorrhage"),
              "subdural": hd.sr.CodedConcept("35486000", "SCT", "Subdural intracranial hemorrhage"),
              "any": hd.sr.CodedConcept("1386000", "SCT", "Intracranial hemorrhage")}
PRESENT, ABSENT = codes.cid241.Present, codes.cid241.Absent           # SCT 52101004, 272519000 (CID 241)
PROBABILITY = hd.sr.CodedConcept("122157", "DCM", "Probability")
NO_UNITS = codes.UCUM.NoUnits                                        # UCUM "1"
THRESHOLD = hd.sr.CodedConcept("122411", "DCM", "Threshold Value")
PROCEDURE = codes.SCT.ComputedTomographyOfHead                       # SCT 303653007
QUALITATIVE = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")   # TID 1500's container
PROCESSING_ALGORITHM = hd.sr.CodedConcept("Newcode1", "99IHE", "Processing Algorithm")  # IHE AIR Rev 1.1, 6.5.3.1
NOTE = {k: code(k, m) for k, m in (
    ("WARNING", "Warning"), ("INTENDED-USE", "Intended use"), ("MODEL", "Model"), ("MODEL-CARD", "Model card"),
    ("THRESHOLD-FROM", "How the threshold was chosen"), ("SCORED", "Series scored"),
    ("NOT-SCORED", "Series not scored"), ("OBJECTS", "Other result objects"), ("VERDICT", "Verdict"))}
# Patient and study attributes the SR, KOS and SC constructors read; anonymised sources (the competition's) lack most.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
          "StudyTime", "ReferringPhysicianName")


def device_uid(identity: str) -> str:
    """The DICOM Device UID of a model: '2.25.' and a name-based UUID (RFC 4122 version 5, the form PS3.5 B.2
    allows) of its identity alone (`src.predictor.model_identity`), so the same model always gets the same UID and
    another model another. (pydicom's generate_uid ignores its entropy sources without a prefix.)"""
    if not identity:
        raise ValueError("a model without an identity gets no Device UID: load it with Predictor.load(RUN_OR_BUNDLE)")
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, 'ich-model ' + identity).int}"


@dataclass(frozen=True)
class Algorithm:
    """The model as the result objects name it (IHE AIR's Contributing Equipment, the SR's device observer)."""
    name: str                         # Manufacturer's Model Name and the observer's name (at most 64 characters)
    description: str                  # what the SR says about the model (Predictor.description)
    version: str                      # Software Versions: the project's code version (src.bundle.code_version)
    uid: str                          # Device UID (device_uid of the model's identity)

    @classmethod
    def of(cls, p) -> Algorithm:
        """Of a loaded `src.predictor.Predictor`."""
        from ..bundle import code_version
        return cls(f"ICH model {p.name}"[:64], p.description, code_version()[:64], device_uid(p.identity))


def contributing_equipment(alg: Algorithm) -> Dataset:
    """The Contributing Equipment item IHE AIR asks for (highdicom's own class knows DCM purposes only)."""
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = [PROCESSING_ALGORITHM]
    item.Manufacturer, item.ManufacturerModelName = MANUFACTURER, alg.name
    item.SoftwareVersions, item.DeviceUID = alg.version, alg.uid
    item.ContributionDescription = "Research model: probabilities of intracranial hemorrhage per slice (research use)"
    return item


def _equip(obj: Dataset, alg: Algorithm) -> Dataset:
    """The AIR item first in the object's Contributing Equipment, before the ones highdicom adds (itself, the
    source's scanner), and the code's version as the object's own Software Versions."""
    obj.ContributingEquipmentSequence = [contributing_equipment(alg), *obj.get("ContributingEquipmentSequence", [])]
    obj.SoftwareVersions = alg.version
    return obj


def source_header(ds: Dataset, sop_class_uid: str | None = None) -> Dataset:
    """A received instance's header as the SR's evidence and the copy source of patient and study attributes: the
    SOP Class UID from the transfer (some archives keep it only in the file meta) and empty type-2 attributes where
    the source has none."""
    h = Dataset()
    for kw in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "SpecificCharacterSet", "SeriesNumber",
               "InstanceNumber", "ImageOrientationPatient", "SeriesDescription", "BodyPartExamined", "Laterality", "Rows",
               "Columns", *_TYPE2):
        if kw in ds:
            setattr(h, kw, ds[kw].value)
        elif kw in _TYPE2:
            setattr(h, kw, "")
    fm = getattr(ds, "file_meta", None)
    h.SOPClassUID = ds.get("SOPClassUID") or sop_class_uid or (fm.get("MediaStorageSOPClassUID") if fm else None) \
        or CTImageStorage
    return h


def _text(name, value: str, rel="CONTAINS") -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=value, relationship_type=rel)


def _header(r: SeriesResult, pos: int, headers: dict[str, Dataset]) -> Dataset:
    """The header of the slice at table position `pos` (0-based, z order) of a scored series."""
    return headers[r.table["file"].iloc[pos]]


def _label(listing_row) -> str:
    """'series 601 (SAG MPR)': how the SR names a series of the study."""
    number = listing_row["SeriesNumber"]
    name = f"series {number}" if number not in ("", None) and number == number else "series without a number"
    return f"{name} ({listing_row['SeriesDescription'] or 'no description'})"


def flagged_slices(r: SeriesResult, threshold: float) -> list[int]:
    """Table positions (0-based) of the slices at or above the threshold for "any", or of the most suspicious one when
    none is: the key images."""
    p = r.table["any"].to_numpy()
    above = np.flatnonzero(p >= threshold)
    return [int(i) for i in above] if len(above) else [int(p.argmax())]


def measurement_group(r: SeriesResult, cls: str, label: str, headers: dict[str, Dataset], alg: Algorithm,
                      threshold: float) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """One finding type of one scored series (TID 1501): the series' highest slice probability, derived as the
    maximum over its slices and referencing that slice; for "any" also the verdict at the threshold."""
    p = r.table[cls].to_numpy()
    top = int(p.argmax())
    h = _header(r, top, headers)
    measurement = hd.sr.Measurement(
        name=PROBABILITY, value=float(p[top]), unit=NO_UNITS, derivation=codes.SCT.Maximum,
        referenced_images=[hd.sr.SourceImageForMeasurement(h.SOPClassUID, h.SOPInstanceUID)])
    verdict = [hd.sr.QualitativeEvaluation(TYPE_CODES[cls], PRESENT if p[top] >= threshold else ABSENT)] \
        if cls == "any" else None
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"{cls}, {label}"),
        finding_type=TYPE_CODES[cls], algorithm_id=hd.sr.AlgorithmIdentification(alg.name, alg.version),
        measurements=[measurement], qualitative_evaluations=verdict)


def preamble(study: StudyResult, alg: Algorithm, others: str) -> list:
    """What a reader must know before the findings, most important first: for a model trained on generated data that
    warning, the intended use, the model and its card, the threshold and how it was chosen, and every series of the
    study, scored or not and why."""
    s, card = study.summary, study.summary.get("model", {})
    items = [_text(NOTE["WARNING"], SYNTHETIC_WARNING)] if card.get("synthetic") else []
    items += [_text(NOTE["INTENDED-USE"], RESEARCH_USE), _text(NOTE["MODEL"], alg.description)]
    items.append(_text(NOTE["MODEL-CARD"], card_text(card)))
    items += [hd.sr.NumContentItem(name=THRESHOLD, value=float(s["threshold"]), unit=NO_UNITS,
                                   relationship_type="CONTAINS"),
              _text(NOTE["THRESHOLD-FROM"], f"{s['threshold_from']}; applied to the highest slice probability of "
                                             f"'{TYPE_CODES['any'].meaning}'")]
    for _, row in study.series.iterrows():
        if row["scored"]:
            notes = f"; notes: {row['notes']}" if row["notes"] else ""
            items.append(_text(NOTE["SCORED"], f"{_label(row)}, {row['SeriesInstanceUID']}: {row['slices']} "
                                               f"slices scored{notes}"))
        else:
            items.append(_text(NOTE["NOT-SCORED"], f"{_label(row)}, {row['SeriesInstanceUID']}, {row['files']} "
                                                   f"file(s): {row['reason']}"))
    return items + [_text(NOTE["OBJECTS"], others)]


def structured_report(study: StudyResult, headers: dict[str, Dataset], alg: Algorithm, others: str) -> hd.sr.ComprehensiveSR:
    """The SR of one study (TID 1500): the preamble, a measurement group per scored series and type, the verdict."""
    t = float(study.summary["threshold"])
    label = {row["SeriesInstanceUID"]: _label(row) for _, row in study.series.iterrows()}
    groups = [measurement_group(r, c, label[r.series], headers, alg, t) for r in study.scored for c in CLASSES]
    observer = hd.sr.ObserverContext(codes.DCM.Device, hd.sr.DeviceObserverIdentifyingAttributes(
        uid=alg.uid, name=alg.name, manufacturer_name=MANUFACTURER, model_name=alg.name))
    report = hd.sr.MeasurementReport(hd.sr.ObservationContext(observer_device_context=observer), PROCEDURE, groups)
    root = report[0].ContentSequence
    first = next(i for i, item in enumerate(root) if item.RelationshipType == "CONTAINS")
    for k, item in enumerate(preamble(study, alg, others)):
        root.insert(first + k, item)
    flagged = study.summary["verdict"] == "suspected hemorrhage"
    box = hd.sr.ContainerContentItem(name=QUALITATIVE, relationship_type="CONTAINS")
    box.ContentSequence = hd.sr.ContentSequence([
        hd.sr.CodeContentItem(TYPE_CODES["any"], PRESENT if flagged else ABSENT, relationship_type="CONTAINS"),
        _text(NOTE["VERDICT"], f"{study.summary['verdict']} (the study; research use, not a medical device)")])
    root.append(box)
    evidence = [headers[f] for r in study.scored for f in r.table["file"]]
    sr = hd.sr.ComprehensiveSR(
        evidence=evidence, content=report[0], series_instance_uid=hd.UID(), series_number=SR_SERIES_NUMBER,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER, is_complete=True, is_final=False,
        is_verified=False, series_description="ICH AI result (research use)", transfer_syntax_uid=ExplicitVRLittleEndian)
    return _equip(sr, alg)


def key_objects(study: StudyResult, headers: dict[str, Dataset], alg: Algorithm) -> hd.ko.KeyObjectSelectionDocument:
    """The flagged slices of every scored series as a Key Object Selection ("Of Interest")."""
    t = float(study.summary["threshold"])
    keys = [_header(r, pos, headers) for r in study.scored for pos in flagged_slices(r, t)]
    observer = hd.sr.ObserverContext(codes.DCM.Device, hd.sr.DeviceObserverIdentifyingAttributes(
        uid=alg.uid, name=alg.name, manufacturer_name=MANUFACTURER, model_name=alg.name))
    why = (f"Slices whose probability of '{TYPE_CODES['any'].meaning}' is at or above {t:g} (the most suspicious slice "
           f"when none is), by {alg.name}. {RESEARCH_USE}")
    content = hd.ko.KeyObjectSelection(document_title=codes.DCM.OfInterest, referenced_objects=keys,
                                       observer_device_context=observer, description=why)
    ko = hd.ko.KeyObjectSelectionDocument(
        evidence=keys, content=content, series_instance_uid=hd.UID(), series_number=KO_SERIES_NUMBER,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER,
        transfer_syntax_uid=ExplicitVRLittleEndian)
    ko.SeriesDescription = "ICH AI key images (research use)"
    return _equip(ko, alg)


def caption(img: np.ndarray, lines: list[tuple[str, tuple[int, int, int]]]) -> np.ndarray:
    """The image with a black band below it carrying `lines` (text, RGB colour)."""
    h = 8 + 22 * len(lines)
    band = np.zeros((h, img.shape[1], 3), np.uint8)
    for i, (text, colour) in enumerate(lines):
        cv2.putText(band, text, (8, 20 + 22 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.5, colour, 1, cv2.LINE_AA)
    return np.ascontiguousarray(np.concatenate([img, band]))


_AXES = {(0, 1): "L", (0, -1): "R", (1, 1): "P", (1, -1): "A", (2, 1): "H", (2, -1): "F"}


def patient_orientation(h: Dataset) -> tuple[str, str]:
    """The patient directions of the image's rows and columns (the dominant axis of each direction cosine);
    axial L/P where the source states none."""
    try:
        iop = [float(v) for v in h.ImageOrientationPatient]
    except (AttributeError, TypeError, ValueError):
        return "L", "P"
    if len(iop) != 6:
        return "L", "P"
    out = []
    for cos in (iop[:3], iop[3:]):
        axis = int(np.argmax(np.abs(cos)))
        out.append(_AXES[(axis, 1 if cos[axis] >= 0 else -1)])
    return out[0], out[1]


def overlay_images(r: SeriesResult, headers: dict[str, Dataset], alg: Algorithm, series_uid: str,
                   first_number: int = 1) -> list[hd.sc.SCImage]:
    """Secondary Capture images of one series' Grad-CAM maps, most suspicious slice first."""
    synthetic = bool(r.summary.get("model", {}).get("synthetic"))
    out = []
    ranked = sorted(r.cams.items(), key=lambda kv: -r.table["any"].iloc[kv[0]])
    for rank, (pos, (cls, cam)) in enumerate(ranked):
        row, h = r.table.iloc[pos], _header(r, pos, headers)
        lines = [(f"slice {pos + 1}/{len(r.table)}  any {row['any']:.3f}  map: {cls} ({row[cls]:.3f})",
                  (255, 255, 255)),
                 ("RESEARCH USE - NOT A MEDICAL DEVICE", (255, 255, 0))]
        if synthetic:
            lines.append(("MODEL TRAINED ON GENERATED DATA ONLY", (255, 64, 64)))
        img = caption(overlay(r.brain[pos], cam, SC_SIZE), lines)
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=h, pixel_array=img, photometric_interpretation="RGB", bits_allocated=8,
            coordinate_system="PATIENT", patient_orientation=patient_orientation(h), series_instance_uid=series_uid,
            series_number=SC_SERIES_NUMBER, sop_instance_uid=hd.UID(), instance_number=first_number + rank,
            manufacturer=MANUFACTURER, series_description="ICH AI Grad-CAM (research use)",
            transfer_syntax_uid=ExplicitVRLittleEndian)
        # Laterality (General Series, type 2C) is for paired body parts: the part is stated (a head: no laterality)
        sc.BodyPartExamined = h.get("BodyPartExamined") or "HEAD"
        if h.get("Laterality"):
            sc.Laterality = h.Laterality
        sc.BurnedInAnnotation = "YES"
        sc.ImageComments = f"Grad-CAM of '{cls}' on slice {pos + 1} of {len(r.table)} (z order). {RESEARCH_USE}"
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = h.SOPClassUID, h.SOPInstanceUID
        sc.SourceImageSequence = [ref]
        sc.DerivationDescription = "Brain window of the source slice with a Grad-CAM heat map of the model over it"
        out.append(_equip(sc, alg))
    return out


def result_objects(study: StudyResult, headers: dict[str, Dataset], alg: Algorithm) -> list[pydicom.Dataset]:
    """The SR, the Key Object Selection and the Secondary Captures of one study's answer (SR first); [] for a study
    of which no series was scored (its reasons are in `study.series`: nothing to report on)."""
    if not study.scored:
        return []
    sc_series = hd.UID()
    n_cams = sum(len(r.cams) for r in study.scored)
    others = (f"key images: series {KO_SERIES_NUMBER} (Key Object Selection, the flagged slices); Grad-CAM images: "
              f"series {SC_SERIES_NUMBER} ({n_cams} image(s), the most suspicious slices)")
    with warnings.catch_warnings():
        # the patient's name is copied as the source has it, even as one component ("CQ500-CT-0")
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name",
                                category=UserWarning)
        images, number = [], 1
        for r in study.scored:
            images += overlay_images(r, headers, alg, sc_series, number)
            number += len(r.cams)
        return [structured_report(study, headers, alg, others), key_objects(study, headers, alg), *images]
