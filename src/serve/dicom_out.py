"""A scored series as DICOM objects a PACS stores and any viewer shows: a Structured Report and Grad-CAM images.

    from src.serve.dicom_out import result_objects
    objects = result_objects(series_result, headers, card, model="resnet10t_128: ...")   # [SR, SC, SC, ...]

`src.serve.node` calls this for every series it scores; the objects go back to the PACS in the source study, as two new
series with fresh UIDs and the patient and study attributes of the source:

- a Comprehensive SR (highdicom): the verdict at the run's operating point and the threshold used (stated, with how
  it was chosen: `src.serve.results.verdict_threshold`), per type the series' highest slice probability and every slice at or
  above the threshold, each a number inferred from an IMAGE reference to its source instance (SOP Class and Instance
  UID), the model card (`src.card.card_text`: training data, out-of-fold figures), "research use, not a medical
  device", and first of all, for a model trained on generated data, that warning. Its evidence lists every instance
  of the source series.
- a Secondary Capture series: for the most suspicious slices, the brain window with the Grad-CAM map over it
  (`src.serve.results.overlay`) and a caption burned in (slice, probability, what the map explains, the disclaimer), each
  pointing at its source instance (Source Image Sequence).

Codes are from a local coding scheme ("99ICH", DICOM's form for private schemes): no standard code says
"probability of a subtype from a research model", and a borrowed one would claim more than this is.
"""
from __future__ import annotations

import warnings

import cv2
import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from ..card import card_text
from ..utils import CLASSES
from .results import SYNTHETIC_WARNING, SeriesResult, overlay

SCHEME = "99ICH"
MANUFACTURER = "ICH research node (src.serve.node)"
RESEARCH_USE = ("Research use, not a medical device: not validated for clinical use; do not use it for diagnosis or "
                "triage.")
SR_SERIES_NUMBER, SC_SERIES_NUMBER = 9901, 9902
SC_SIZE = 512                         # Grad-CAM images: the source's usual matrix, whatever the model's input size
# (code, meaning) per type; code values stay within 16 characters (longer ones become another attribute)
TYPE_CODES = {"epidural": ("T-EDH", "Epidural hemorrhage"),
              "intraparenchymal": ("T-IPH", "Intraparenchymal hemorrhage"),
              "intraventricular": ("T-IVH", "Intraventricular hemorrhage"),
              "subarachnoid": ("T-SAH", "Subarachnoid hemorrhage"), "subdural": ("T-SDH", "Subdural hemorrhage"),
              "any": ("T-ANY", "Any intracranial hemorrhage")}
# Patient and study attributes the SR and SC constructors read; anonymised sources (the competition's) lack most.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
          "StudyTime", "ReferringPhysicianName")
PROBABILITY = hd.sr.CodedConcept("1", "UCUM", "probability (0 to 1)")
SLICES = hd.sr.CodedConcept("{slices}", "UCUM", "slices")


def code(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value, SCHEME, meaning)


TITLE = code("ICH-RESULT", "Intracranial hemorrhage AI result (research use)")


def source_header(ds: Dataset, sop_class_uid: str | None = None) -> Dataset:
    """A received instance's header as the SR's evidence and the copy source of patient and study attributes: the
    SOP Class UID from the transfer (some archives keep it only in the file meta) and empty type-2 attributes where
    the source has none."""
    h = Dataset()
    for kw in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "SpecificCharacterSet", "SeriesNumber",
               "InstanceNumber", "ImageOrientationPatient", "SeriesDescription", *_TYPE2):
        if kw in ds:
            setattr(h, kw, ds[kw].value)
        elif kw in _TYPE2:
            setattr(h, kw, "")
    fm = getattr(ds, "file_meta", None)
    h.SOPClassUID = ds.get("SOPClassUID") or sop_class_uid or (fm.get("MediaStorageSOPClassUID") if fm else None) \
        or CTImageStorage
    return h


def _image(name: hd.sr.CodedConcept, h: Dataset, rel="INFERRED FROM") -> hd.sr.ImageContentItem:
    return hd.sr.ImageContentItem(name=name, referenced_sop_class_uid=h.SOPClassUID,
                                  referenced_sop_instance_uid=h.SOPInstanceUID, relationship_type=rel)


def _num(name, value: float, unit=PROBABILITY) -> hd.sr.NumContentItem:
    return hd.sr.NumContentItem(name=name, value=value, unit=unit, relationship_type="CONTAINS")


def _text(name, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=value, relationship_type="CONTAINS")


def type_container(cls: str, summary: dict, table, headers: dict[str, Dataset]) -> hd.sr.ContainerContentItem:
    """One type's findings: the highest slice probability and each slice at or above the threshold, each a number
    inferred from its source instance."""
    t = summary["types"][cls]
    box = hd.sr.ContainerContentItem(name=code(*TYPE_CODES[cls]), is_content_continuous=False,
                                     relationship_type="CONTAINS")
    box.ContentSequence = hd.sr.ContentSequence()
    top = _num(code("P-MAX", "Highest slice probability"), float(t["max_probability"]))
    top.ContentSequence = [_image(code("SLICE", "Slice"), headers[table["file"].iloc[t["slice_of_max"] - 1]])]
    box.ContentSequence.append(top)
    box.ContentSequence.append(_text(code("SLICE-OF-MAX", "Slice of the highest probability (z order, 1 = inferior)"),
                                     f"{t['slice_of_max']} of {len(table)}"))
    above = t["slices_above_threshold"]
    box.ContentSequence.append(_num(code("N-FLAGGED", "Slices at or above the threshold"), len(above), SLICES))
    box.ContentSequence.append(_text(code("FLAGGED-LIST", "Slices at or above the threshold (z order, 1 = inferior)"),
                                     ", ".join(map(str, above)) or "none"))
    for s in above:
        item = _num(code("P-SLICE", "Flagged slice probability"), float(table[cls].iloc[s - 1]))
        item.ContentSequence = [_image(code("SLICE", "Slice"), headers[table["file"].iloc[s - 1]])]
        box.ContentSequence.append(item)
    return box


def report_content(r: SeriesResult, headers: dict[str, Dataset], model: str,
                   sc_series: str | None) -> hd.sr.ContainerContentItem:
    """The SR's content tree: what a reader must know about the model first, then the verdict, then the types."""
    s, card = r.summary, r.summary.get("model", {})
    root = hd.sr.ContainerContentItem(name=TITLE, is_content_continuous=False)
    items = []
    if card.get("synthetic"):
        items.append(_text(code("WARNING", "Warning"), SYNTHETIC_WARNING))
    items += [_text(code("INTENDED-USE", "Intended use"), RESEARCH_USE),
              _text(code("VERDICT", "Verdict"), s["verdict"]),
              _num(code("THRESHOLD", "Threshold on the highest slice probability of 'any'"), float(s["threshold"])),
              _text(code("THRESHOLD-FROM", "How the threshold was chosen"), s["threshold_from"]),
              _text(code("MODEL", "Model"), model),
              _text(code("MODEL-CARD", "Model card"), card_text(card))]
    for key, value, name in (("oof_weighted_log_loss", "OOF-WLL", "Out-of-fold weighted log loss"),
                             ("oof_auc_any", "OOF-AUC-ANY", "Out-of-fold AUC (any)")):
        if isinstance(card.get(key), (int, float)) and card[key] == card[key]:
            items.append(_num(code(value, name), float(card[key]), hd.sr.CodedConcept("1", "UCUM", "no units")))
    src = headers[r.table["file"].iloc[0]]
    items.append(_text(code("SOURCE", "Source series"),
                       f"{src.SeriesInstanceUID} ({src.get('SeriesDescription') or 'no description'}): "
                       f"{s['slices']} slices scored"))
    if sc_series:
        items.append(_text(code("OVERLAYS", "Grad-CAM images"),
                           f"series {SC_SERIES_NUMBER} ({sc_series}): the {len(r.cams)} most suspicious slices"))
    items += [type_container(c, s, r.table, headers) for c in CLASSES]
    root.ContentSequence = hd.sr.ContentSequence(items)
    return root


def structured_report(r: SeriesResult, headers: dict[str, Dataset], model: str, sc_series: str | None = None,
                      series_uid: str | None = None) -> hd.sr.ComprehensiveSR:
    """The SR of one scored series; `headers` maps the table's file names to `source_header`s."""
    evidence = [headers[f] for f in r.table["file"]]
    return hd.sr.ComprehensiveSR(
        evidence=evidence, content=report_content(r, headers, model, sc_series),
        series_instance_uid=series_uid or hd.UID(), series_number=SR_SERIES_NUMBER, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False,
        series_description="ICH AI result (research use)", transfer_syntax_uid=ExplicitVRLittleEndian)


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


def overlay_images(r: SeriesResult, headers: dict[str, Dataset], series_uid: str | None = None) -> list[hd.sc.SCImage]:
    """Secondary Capture images of the Grad-CAM maps, most suspicious slice first."""
    synthetic = bool(r.summary.get("model", {}).get("synthetic"))
    series_uid = series_uid or hd.UID()
    out = []
    ranked = sorted(r.cams.items(), key=lambda kv: -r.table["any"].iloc[kv[0]])
    for rank, (pos, (cls, cam)) in enumerate(ranked, 1):
        row, h = r.table.iloc[pos], headers[r.table["file"].iloc[pos]]
        lines = [(f"slice {pos + 1}/{len(r.table)}  any {row['any']:.3f}  map: {cls} ({row[cls]:.3f})",
                  (255, 255, 255)),
                 ("RESEARCH USE - NOT A MEDICAL DEVICE", (255, 255, 0))]
        if synthetic:
            lines.append(("MODEL TRAINED ON GENERATED DATA ONLY", (255, 64, 64)))
        img = caption(overlay(r.brain[pos], cam, SC_SIZE), lines)
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=h, pixel_array=img, photometric_interpretation="RGB", bits_allocated=8,
            coordinate_system="PATIENT", patient_orientation=patient_orientation(h), series_instance_uid=series_uid,
            series_number=SC_SERIES_NUMBER, sop_instance_uid=hd.UID(), instance_number=rank,
            manufacturer=MANUFACTURER, series_description="ICH AI Grad-CAM (research use)",
            transfer_syntax_uid=ExplicitVRLittleEndian)
        sc.BurnedInAnnotation = "YES"
        sc.ImageComments = f"Grad-CAM of '{cls}' on slice {pos + 1} of {len(r.table)} (z order). {RESEARCH_USE}"
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = h.SOPClassUID, h.SOPInstanceUID
        sc.SourceImageSequence = [ref]
        sc.DerivationDescription = "Brain window of the source slice with a Grad-CAM heat map of the model over it"
        out.append(sc)
    return out


def result_objects(r: SeriesResult, headers: dict[str, Dataset], model: str) -> list[pydicom.Dataset]:
    """The SR and the Secondary Capture images of one scored series (SR first)."""
    sc_series = hd.UID() if r.cams else None
    with warnings.catch_warnings():
        # the patient's name is copied as the source has it, even as one component ("CQ500-CT-0")
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name",
                                category=UserWarning)
        images = overlay_images(r, headers, sc_series) if r.cams else []
        return [structured_report(r, headers, model, sc_series), *images]
