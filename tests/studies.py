"""A study as a PACS sends it, built from the real RSNA sample: the series the model should score and every kind of
series it must not.

    from tests.studies import mixed_study
    study = mixed_study(tmp_path / "study")     # {"axial": series UID, "bone": ..., ...}; files in tmp_path/study/

From the sample's series ID_44cfc8e964 (33 axial 5 mm slices of a head with a bleed: IPH, IVH, SAH and SDH), with
valid UIDs and the patient and study attributes a scanner writes:

| kind | series | what it is |
|---|---|---|
| axial | 2 | the source slices: ORIGINAL\\PRIMARY\\AXIAL, kernel STANDARD (GE), 5 mm: the one to score |
| thin | 3 | the same slices labelled 1 mm thick: eligible, but further from the training data |
| bone | 4 | the same slices in kernel BONE |
| contrast | 5 | the same slices with ContrastBolusAgent IOHEXOL |
| sagittal | 601 | 24 sagittal reformats of the volume: DERIVED\\SECONDARY\\REFORMATTED, normal along x |
| coronal | 602 | 24 coronal reformats: normal along y |
| localizer | 1 | one lateral scout: ORIGINAL\\PRIMARY\\LOCALIZER |
| dose | 997 | an X-Ray Radiation Dose SR: a valid object that is no image |
"""
from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from src import dicom as D

from .conftest import RSNA_SAMPLE

SOURCE_SERIES = "ID_44cfc8e964"
# what the series selector says of every series but the axial one (configs/serve/series_rules.yaml's defaults)
REASONS = {"localizer": "ImageType LOCALIZER: not an original axial acquisition",
           "thin": "eligible, but series 2 of the study is closer to the training data (one result per study; "
                   "--all-series scores every eligible series)",
           "bone": "kernel BONE: a bone or sharp kernel, not soft tissue",
           "contrast": "contrast agent 'IOHEXOL': the model learned non-contrast CT",
           "sagittal": "ImageType DERIVED/REFORMATTED/SECONDARY: not an original axial acquisition",
           "coronal": "ImageType DERIVED/REFORMATTED/SECONDARY: not an original axial acquisition",
           "dose": "Modality SR, not CT"}

DOSE_SR = "1.2.840.10008.5.1.4.1.1.88.67"  # X-Ray Radiation Dose SR Storage
ROOT = "1.2.826.0.1.3680043.8.498."       # pydicom's UID root


def source_slices() -> list[pydicom.Dataset]:
    """The source series' slices in order along z."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        files = [pydicom.dcmread(f) for f in sorted((RSNA_SAMPLE / "stage_2_train_images").glob("*.dcm"))]
    series = [ds for ds in files if ds.SeriesInstanceUID == SOURCE_SERIES]
    return sorted(series, key=lambda ds: float(ds.ImagePositionPatient[2]))


def patient_and_study(ds: Dataset, study_uid: str) -> None:
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Mixed", "ICH-TEST-1", "19600101", "O"
    ds.StudyInstanceUID, ds.StudyID, ds.AccessionNumber = study_uid, "1", "A1"
    ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName = "20260101", "120000", ""
    ds.Manufacturer, ds.ManufacturerModelName = "GE MEDICAL SYSTEMS", "Test Scanner"
    ds.FrameOfReferenceUID = generate_uid(ROOT + "9.")


def file_meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def image(pixels_hu: np.ndarray, *, study: str, series: str, number: int, description: str, image_type: str,
          iop, ipp, spacing, thickness: float, instance: int, kernel="STANDARD", contrast="") -> Dataset:
    """A CT Image Storage object holding HU values (int16, intercept -1024)."""
    ds = Dataset()
    uid = generate_uid(ROOT)
    ds.file_meta = file_meta(CTImageStorage, uid)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, uid, "CT"
    patient_and_study(ds, study)
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription, ds.InstanceNumber = series, number, description, instance
    ds.ImageType = image_type.split("\\")
    ds.ImageOrientationPatient, ds.ImagePositionPatient = [float(v) for v in iop], [float(v) for v in ipp]
    ds.PixelSpacing, ds.SliceThickness = [float(v) for v in spacing], thickness
    ds.ConvolutionKernel, ds.KVP = kernel, 120
    if contrast:
        ds.ContrastBolusAgent = contrast
    ds.Rows, ds.Columns = pixels_hu.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    ds.WindowCenter, ds.WindowWidth = 40, 80
    ds.PixelData = np.clip(np.rint(pixels_hu) + 1024, -32768, 32767).astype("<i2").tobytes()
    return ds


def volume(slices) -> np.ndarray:
    """(z, y, x) HU of the source slices."""
    return np.stack([D.to_hu(D.pixels(ds), D.rescale_params(ds)) for ds in slices])


def reformats(vol, slices, *, study, series, number, axis: str, n=24, rows=128) -> list[Dataset]:
    """n sagittal (axis x) or coronal (axis y) planes through the volume, resampled to `rows` along z."""
    first, px = slices[0], [float(v) for v in slices[0].PixelSpacing]
    x0, y0, _ = (float(v) for v in first.ImagePositionPatient)
    z_top = float(slices[-1].ImagePositionPatient[2])
    z_mm = (z_top - float(first.ImagePositionPatient[2])) / (rows - 1)
    out = []
    for k, c in enumerate(np.linspace(64, vol.shape[2] - 64, n).astype(int)):
        plane = (vol[:, :, c] if axis == "x" else vol[:, c, :])[::-1]  # superior first: rows run head to foot
        plane = cv2.resize(plane.astype(np.float32), (plane.shape[1], rows), interpolation=cv2.INTER_LINEAR)
        if axis == "x":
            iop, ipp = (0, 1, 0, 0, 0, -1), (x0 + c * px[1], y0, z_top)
        else:
            iop, ipp = (1, 0, 0, 0, 0, -1), (x0, y0 + c * px[0], z_top)
        out.append(image(plane, study=study, series=series, number=number, instance=k + 1,
                         description=f"{'SAG' if axis == 'x' else 'COR'} MPR", image_type="DERIVED\\SECONDARY\\REFORMATTED",
                         iop=iop, ipp=ipp, spacing=(z_mm, px[0]), thickness=2.0))
    return out


def dose_report(study: str, series: str) -> Dataset:
    ds = Dataset()
    uid = generate_uid(ROOT)
    ds.file_meta = file_meta(DOSE_SR, uid)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = DOSE_SR, uid, "SR"
    patient_and_study(ds, study)
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription, ds.InstanceNumber = series, 997, "Dose Report", 1
    ds.ValueType, ds.CompletionFlag, ds.VerificationFlag = "CONTAINER", "COMPLETE", "UNVERIFIED"
    ds.ContentDate, ds.ContentTime = "20260101", "120500"
    return ds


def mixed_study(dest: Path) -> dict[str, str]:
    """Write the study (module docstring) into dest/, one file per object; returns kind -> SeriesInstanceUID (and
    "study" -> its StudyInstanceUID)."""
    dest.mkdir(parents=True, exist_ok=True)
    slices = source_slices()
    vol = volume(slices)
    study = generate_uid(ROOT)
    uids = {"study": study, **{k: generate_uid(ROOT) for k in ("axial", "thin", "bone", "contrast", "sagittal",
                                                                "coronal", "localizer", "dose")}}
    objects = []
    for kind, number, desc, kw in (("axial", 2, "HEAD 5mm", {}), ("thin", 3, "HEAD 1mm", {"thickness": 1.0}),
                                   ("bone", 4, "HEAD 5mm BONE", {"kernel": "BONE"}),
                                   ("contrast", 5, "HEAD 5mm +C", {"contrast": "IOHEXOL"})):
        for i, (ds, hu) in enumerate(zip(slices, vol)):
            objects.append(image(hu, study=study, series=uids[kind], number=number, description=desc, instance=i + 1,
                                 image_type="ORIGINAL\\PRIMARY\\AXIAL", iop=ds.ImageOrientationPatient,
                                 ipp=ds.ImagePositionPatient, spacing=ds.PixelSpacing, **{"thickness": 5.0, **kw}))
    objects += reformats(vol, slices, study=study, series=uids["sagittal"], number=601, axis="x")
    objects += reformats(vol, slices, study=study, series=uids["coronal"], number=602, axis="y")
    scout = cv2.resize(vol.mean(axis=2)[::-1].astype(np.float32), (512, 256))
    objects.append(image(scout, study=study, series=uids["localizer"], number=1, description="SCOUT", instance=1,
                         image_type="ORIGINAL\\PRIMARY\\LOCALIZER", iop=(0, 1, 0, 0, 0, -1),
                         ipp=(0, -125, float(slices[-1].ImagePositionPatient[2])), spacing=(0.7, 0.49), thickness=1.0))
    objects.append(dose_report(study, uids["dose"]))
    rng = np.random.default_rng(0)
    for i in rng.permutation(len(objects)):  # file names say nothing about the order
        objects[i].save_as(dest / f"IM{i:04d}", enforce_file_format=True)
    return uids
