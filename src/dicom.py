"""DICOM -> Hounsfield units -> a windowed uint8 image: small pure functions.

The pieces (`read_dicom`, `rescale_params`, `to_hu`, `window`, `hu_to_image`) are the reference;
`dicom_to_image` is the fast path used by the cache builder and the demo. It computes the same image
through a per-file lookup table from raw pixel value to the three windowed bytes (see
`tests/test_dicom.py`, which checks the two agree).

Known traps this module handles:
- Competition files with BitsStored 12, PixelRepresentation 0 and RescaleIntercept > -100 store
  pixels shifted by 1000 with a wrap at 4096 (the well-known fix: add 1000, wrap, intercept -1000).
- WindowCenter/WindowWidth may be multi-valued; the first value is the file's own window.
- Compressed transfer syntaxes decode through pydicom's pixel handlers (pylibjpeg plugins).
- The competition's files put IDs such as `ID_44cfc8e964` in UID fields; pydicom warns about each.
  `read_dicom` silences exactly that warning and nothing else.

Wrong headers must not give a wrong image that is cached as valid, so both paths refuse (DicomError, whose
message `src.prepare` records as the file's skip reason):
- pixel data whose length is not Rows x Columns x BitsAllocated/8 (one DICOM padding byte allowed for
  odd lengths), too short or too long; for compressed syntaxes, a decoded array of another shape;
- a RescaleSlope or RescaleIntercept that is not a finite number, or a slope of 0;
- values implausible for CT (`check_ct_values`): fewer than half the pixels in [-1100, 4000] HU (air to
  dense bone), or a flat image (less than 20 HU between the 1st and 99th percentile). Real head CT
  clears both by far (the competition sample and CQ500: >= 77% in range, spreads >= 700 HU): padding
  at -3024 HU (or raw -2000/-32768) outside the scan circle covers at most ~22% of a square image, air
  is about -1000 HU, so even a slice near the vertex, mostly air, is >= ~75% in range; metal on an
  extended HU scale (up to ~30,000) is a few pixels. A wrong slope or intercept moves most pixels out
  of range (or, when tiny, flattens the image). Both paths check the HU of the same strided ~64 x 64
  subsample: ~30 us a slice, ~5% of the cache build's decode.
"""
from __future__ import annotations

import functools
import math
import os
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

# One OpenCV thread per process: decoding is parallel across processes (one per core), and a pool of all cores
# in each of them would oversubscribe the CPU (src.data sets the same for the loader's workers).
cv2.setNumThreads(1)

# (center, width) in HU. `None` stands for the file's own window (first WindowCenter/WindowWidth).
BRAIN, SUBDURAL, BONE = (40, 80), (80, 200), (600, 2800)
DEFAULT_WINDOWS = (BRAIN, SUBDURAL, BONE)

# pydicom's message for the competition's non-UID identifiers (ID_ followed by hex) in UI fields.
_KAGGLE_UID_WARNING = r"Invalid value for VR UI: 'ID_[0-9a-fA-F]+'"
# pydicom converts elements lazily, so the warning comes on first access anywhere, not only in dcmread:
# filter exactly this message for the whole process, and nothing else.
warnings.filterwarnings("ignore", message=_KAGGLE_UID_WARNING, category=UserWarning)


class DicomError(ValueError):
    """A file that cannot give a CT image; the message is the reason recorded in the summary."""


@dataclass(frozen=True)
class Rescale:
    slope: float
    intercept: float
    fix_12bit: bool  # the competition's intercept bug: add 1000, wrap at 4096, intercept -1000


# What the header may declare before anything is decoded (the reliability table's rule). CT slices are 512 x 512,
# sometimes 1024, rarely 2048; a compressed file states its decoded size in its header, and a 12 MB RLE file can
# declare 20,000 x 20,000 pixels (800 MB decoded) or a 134 MB one 65,535 x 65,535 (8.6 GB): refused from the header.
MAX_MATRIX = 2048                  # rows and columns
MAX_DECODED_BYTES = 2048 * 2048 * 4  # rows x columns x bytes per pixel x frames (16 MiB)
MAX_FILE_BYTES = 64 << 20          # a slice is ~0.5 MB uncompressed at 512 px, 8 MB at 2048 px in 16 bits
DEFER_BYTES = 256 << 10            # larger values (the pixel data) stay on disk until the header has been checked


def read_dicom(path, stop_before_pixels: bool = False) -> pydicom.Dataset:
    """Read one file; corrupt, non-DICOM or oversized files raise DicomError naming the reason. Values larger than
    DEFER_BYTES are read only when used (the pixel data, after `check_header`)."""
    try:
        size = os.stat(path).st_size
    except OSError as e:
        raise DicomError(f"unreadable DICOM ({type(e).__name__}: {str(e)[:120]})") from e
    if size > MAX_FILE_BYTES:
        raise DicomError(f"file of {size / 2**20:,.0f} MiB, larger than a CT slice can be ({MAX_FILE_BYTES >> 20} MiB); "
                         f"multi-slice or other objects are not read")
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, defer_size=DEFER_BYTES)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, AttributeError, OverflowError,
            MemoryError) as e:
        raise DicomError(f"unreadable DICOM ({type(e).__name__}: {str(e)[:120]})") from e


def check_header(ds) -> tuple[int, int, int]:
    """(rows, columns, bits allocated) when the header declares an image a CT slice can be, else DicomError: a
    matrix within MAX_MATRIX, one sample and one frame, 8, 16 or 32 bits, a decoded size within MAX_DECODED_BYTES.
    Checked before any pixel is read or decoded."""
    for t in ("Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation"):
        if ds.get(t) in (None, ""):
            raise DicomError(f"missing tag {t}: cannot interpret the pixel data")
    try:
        rows, cols, bits = int(ds.Rows), int(ds.Columns), int(ds.BitsAllocated)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        spp = int(ds.get("SamplesPerPixel", 1) or 1)
    except (TypeError, ValueError) as e:
        raise DicomError(f"image size tags are not numbers ({e})") from e
    if not (1 <= rows <= MAX_MATRIX and 1 <= cols <= MAX_MATRIX):
        raise DicomError(f"image of {rows} x {cols} pixels: not a CT matrix (at most {MAX_MATRIX} x {MAX_MATRIX}); "
                         f"refused from its header, before decoding")
    if bits not in (8, 16, 32):
        raise DicomError(f"BitsAllocated {bits}: not 8, 16 or 32")
    if frames > 1:
        raise DicomError(f"multi-frame image ({frames} frames): export single slices")
    if spp != 1:
        raise DicomError(f"not a grayscale image (SamplesPerPixel={spp})")
    if rows * cols * bits // 8 * frames * spp > MAX_DECODED_BYTES:
        raise DicomError(f"declared image of {rows * cols * bits // 8:,} bytes decoded, more than {MAX_DECODED_BYTES:,}")
    return rows, cols, bits


def _finite(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def first_value(v, name: str = "value") -> float:
    """DICOM multi-valued fields (WindowCenter = [40, 80]) -> the first value, as a finite float.

    Values may arrive as numbers, strings (a DS field written with another VR) or multi-values;
    anything that is not a finite number raises DicomError naming the field."""
    if isinstance(v, (pydicom.multival.MultiValue, list, tuple)):
        if len(v) == 0:
            raise DicomError(f"{name} is an empty multi-valued field")
        v = v[0]
    if (f := _finite(v)) is None:
        raise DicomError(f"{name} is {str(v)[:40]!r}, not a finite number: fix the header or leave the file out")
    return f


def rescale_params(ds) -> Rescale:
    """Slope, intercept and whether the 12-bit intercept fix applies; missing tags raise DicomError."""
    missing = [t for t in ("RescaleIntercept", "RescaleSlope", "BitsStored", "PixelRepresentation")
               if ds.get(t) is None or ds.get(t) == ""]
    if missing:
        raise DicomError(f"missing tag(s) {missing}: cannot compute Hounsfield units")
    slope = first_value(ds.RescaleSlope, "RescaleSlope")
    intercept = first_value(ds.RescaleIntercept, "RescaleIntercept")
    if slope == 0:
        raise DicomError("RescaleSlope is 0: every pixel would get the same HU value; fix the header or leave "
                         "the file out")
    fix = int(ds.BitsStored) == 12 and int(ds.PixelRepresentation) == 0 and intercept > -100
    if fix:
        intercept = -1000.0
    return Rescale(slope, intercept, fix)


_NATIVE_LE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}  # Implicit / Explicit VR Little Endian


def _native_pixels(ds, rows: int, cols: int, buf: bytes) -> np.ndarray | None:
    """Zero-copy view of uncompressed 16-bit pixel data, or None where pydicom's decoder is needed.

    pydicom's `pixel_array` costs ~3 ms a slice; this costs microseconds and gives the same array
    for the layouts it accepts (checked against pixel_array on the real files in the tests)."""
    ts = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
    if ts not in _NATIVE_LE or int(ds.get("BitsAllocated", 0)) != 16:
        return None
    signed = int(ds.PixelRepresentation) == 1
    if signed and int(ds.BitsStored) != 16:
        return None  # needs sign extension from BitsStored: leave it to pydicom
    arr = np.frombuffer(buf, dtype="<i2" if signed else "<u2", count=rows * cols).reshape(rows, cols)
    bits = int(ds.BitsStored)
    if not signed and bits < 16:
        arr = arr & np.uint16((1 << bits) - 1)  # bits above BitsStored are not part of the value
    return arr


_DECODE_ERRORS = (ValueError, RuntimeError, NotImplementedError, AttributeError, TypeError, KeyError)


def pixels(ds) -> np.ndarray:
    """The stored pixel values of a single-frame grayscale image (decompressing when needed)."""
    if "PixelData" not in ds:
        raise DicomError("no pixel data")
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if spp != 1 or not photometric.startswith("MONOCHROME"):
        raise DicomError(f"not a grayscale image (SamplesPerPixel={spp}, {photometric})")
    rows, cols, bits = check_header(ds)  # before the pixel data is read: a header may declare gigabytes
    elem = ds["PixelData"]
    # Encapsulated (compressed) pixel data is exactly the kind with undefined length; its size says nothing
    # about the image's, so it is checked after decoding. Native data must match the header byte for byte,
    # or Rows/Columns/BitsAllocated read the wrong pixels (one sample and one frame: checked above).
    if not elem.is_undefined_length:
        expected, actual = (rows * cols * bits + 7) // 8, len(elem.value)
        if actual not in (expected, expected + expected % 2):  # DICOM pads odd lengths with one byte
            raise DicomError(
                f"pixel data {'too short (truncated file?)' if actual < expected else 'too long'}: {actual} bytes, "
                f"but Rows x Columns x BitsAllocated/8 = {rows} x {cols} x {bits}/8 = {expected}; "
                f"the file or its Rows/Columns/BitsAllocated are wrong")
    native = _native_pixels(ds, rows, cols, elem.value)
    if native is not None:
        return native
    try:
        arr = ds.pixel_array
    except BaseException as e:
        # pyo3-based decoders (pylibjpeg-rle) report corrupt data, or a Rows/Columns smaller than the data,
        # by a PanicException, which derives from BaseException: catch that by name, and nothing else
        if not (isinstance(e, _DECODE_ERRORS) or type(e).__name__ == "PanicException"):
            raise
        ts = ds.file_meta.get("TransferSyntaxUID", "?") if hasattr(ds, "file_meta") else "?"
        raise DicomError(f"pixel data cannot be decoded as Rows x Columns = {rows} x {cols} (transfer syntax {ts}; "
                         f"{type(e).__name__}: {' '.join(str(e).split())[:200]})") from e
    if arr.shape != (rows, cols):
        raise DicomError(f"decoded pixel array has shape {arr.shape}, but Rows x Columns = {rows} x {cols}")
    return arr


def _hu(px: np.ndarray, r: Rescale, dtype=np.float32) -> np.ndarray:
    x = px.astype(np.int32)
    if r.fix_12bit:
        x = x + 1000
        x[x >= 4096] -= 4096
    return (x * dtype(r.slope) + dtype(r.intercept)).astype(dtype, copy=False)


# The plausibility rule of the module docstring.
CT_RANGE_HU = (-1100.0, 4000.0)  # air to dense bone
MIN_IN_RANGE = 0.5
MIN_SPREAD_HU = 20.0


def check_ct_values(px: np.ndarray, r: Rescale) -> None:
    """Refuse stored values whose HU cannot be a CT slice (the rule in the module docstring)."""
    step = max(1, min(px.shape) // 64)
    with np.errstate(over="ignore", invalid="ignore"):  # an absurd slope gives inf or NaN: out of range
        # sorted for the percentiles: np.partition is slower on the many equal values of padding and air
        hu = np.sort(_hu(px[::step, ::step], r), axis=None)
    lo, hi = CT_RANGE_HU
    inside = np.count_nonzero((hu >= lo) & (hu <= hi)) / hu.size
    if inside < MIN_IN_RANGE:
        raise DicomError(f"implausible CT values: {inside:.0%} of pixels in [{lo:g}, {hi:g}] HU (air to dense bone), "
                         f"at least {MIN_IN_RANGE:.0%} expected (median {hu[hu.size // 2]:.4g} HU); "
                         f"RescaleSlope {r.slope:g} or RescaleIntercept {r.intercept:g} is probably wrong")
    p1, p99 = hu[hu.size // 100], hu[-1 - hu.size // 100]
    if p99 - p1 < MIN_SPREAD_HU:
        raise DicomError(f"flat image: 1st to 99th percentile span {p99 - p1:.3g} HU, at least {MIN_SPREAD_HU:g} "
                         f"expected; a blank slice, or RescaleSlope {r.slope:g} is wrong")


def to_hu(px: np.ndarray, r: Rescale) -> np.ndarray:
    """Stored values -> Hounsfield units (float32); values implausible for CT raise DicomError."""
    check_ct_values(px, r)
    return _hu(px, r)


def window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """Map [center - width/2, center + width/2] linearly onto 0..255 (uint8), clipping outside."""
    lo = center - width / 2.0
    x = (hu.astype(np.float32) - np.float32(lo)) * np.float32(255.0 / width)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def resolve_windows(ds, windows) -> tuple[tuple[float, float], ...]:
    """Replace `None` entries by the file's own window (first value of multi-valued fields)."""
    out = []
    for w in windows:
        if w is None:
            if ds is None or ds.get("WindowCenter") is None or ds.get("WindowWidth") is None:
                raise DicomError("the file's own window was requested but WindowCenter/WindowWidth are missing")
            w = (first_value(ds.WindowCenter, "WindowCenter"), first_value(ds.WindowWidth, "WindowWidth"))
        c, wd = float(w[0]), float(w[1])
        if not (math.isfinite(c) and math.isfinite(wd) and wd > 0):
            raise DicomError(f"window ({c}, {wd}): the center must be finite and the width finite and > 0")
        out.append((c, wd))
    return tuple(out)


def hu_to_image(hu: np.ndarray, windows=DEFAULT_WINDOWS, size: int | None = None) -> np.ndarray:
    """HU image -> uint8 (size, size, len(windows)); resized (area-averaged HU) before windowing."""
    windows = resolve_windows(None, windows)  # the same window checks as the fast path
    if size is not None and hu.shape != (size, size):
        hu = cv2.resize(hu, (size, size), interpolation=cv2.INTER_AREA if hu.shape[0] > size else cv2.INTER_LINEAR)
    return np.stack([window(hu, c, w) for c, w in windows], axis=-1)


@functools.lru_cache(maxsize=64)
def _lut(signed: bool, slope: float, intercept: float, windows: tuple) -> np.ndarray:
    """(65536, C) uint8 table: raw stored value (offset by 32768 when signed) -> windowed bytes."""
    raw = np.arange(65536, dtype=np.int64) - (32768 if signed else 0)
    hu = (raw * np.float32(slope) + np.float32(intercept)).astype(np.float32)
    return np.ascontiguousarray(np.stack([window(hu, c, w) for c, w in windows], axis=-1))


def dicom_to_image(ds, windows=DEFAULT_WINDOWS, size: int | None = 256) -> np.ndarray:
    """Fast path: dataset -> uint8 (size, size, C). Same result as hu_to_image(to_hu(...)), up to the
    rounding of resized values to whole stored units."""
    r = rescale_params(ds)
    px = pixels(ds)
    check_ct_values(px, r)
    windows = resolve_windows(ds, windows)
    if r.fix_12bit:
        x = px.astype(np.int32) + 1000
        x[x >= 4096] -= 4096
        px = x.astype(np.int16)
    if px.dtype not in (np.int16, np.uint16):
        if px.min() < -32768 or px.max() > 65535:
            raise DicomError(f"pixel values out of 16-bit range ({px.min()}..{px.max()})")
        px = px.astype(np.int16 if px.min() < 0 else np.uint16)
    if size is not None and px.shape != (size, size):
        interp = cv2.INTER_AREA if px.shape[0] > size else cv2.INTER_LINEAR
        px = cv2.resize(px, (size, size), interpolation=interp)
    signed = px.dtype == np.int16
    lut = _lut(signed, r.slope, r.intercept, windows)
    idx = px.view(np.uint16) ^ np.uint16(0x8000) if signed else px  # int16 + 32768 without a copy to int32
    return np.take(lut, idx, axis=0)  # ~5x faster than lut[idx] for a 2-D table


def _vector(v, n: int) -> np.ndarray | None:
    """A multi-valued field of n finite numbers as a float array, else None."""
    if not isinstance(v, (pydicom.multival.MultiValue, list, tuple)) or len(v) != n:
        return None
    out = [_finite(x) for x in v]
    return None if any(x is None for x in out) else np.array(out, float)


def slice_normal(ds) -> np.ndarray | None:
    """The unit normal of the slice plane (row direction x column direction of ImageOrientationPatient), in the
    patient's coordinates, pointing the way of its largest component (for an axial slice: up, towards the head);
    None when the orientation is missing, not numbers or degenerate. The sign is fixed because the cross product's
    depends on how the rows and columns run: a feet-first series (rows running right to left) has a normal pointing
    down, and ordering along it would put its slices top to bottom, the other way from the head-first series the
    model learned from (2.5D neighbours and the sequence model read them in order)."""
    iop = _vector(ds.get("ImageOrientationPatient"), 6)
    if iop is None:
        return None
    n = np.cross(iop[:3], iop[3:])
    norm = float(np.linalg.norm(n))
    if norm <= 1e-6:
        return None
    return n / norm * (1.0 if n[int(np.argmax(np.abs(n)))] > 0 else -1.0)


def slice_z(ds) -> tuple[float, str]:
    """The slice's position along its series' axis, and where it came from.

    ImagePositionPatient projected on the slice normal when both it and ImageOrientationPatient are there: the
    distance along the normal orders the slices of any stack, a tilted gantry's or a sagittal reformat's (whose
    ImagePositionPatient[2] is constant), and equals ImagePositionPatient[2] for an untilted axial slice; else
    ImagePositionPatient[2]; else SliceLocation; else InstanceNumber (orders slices, in units of slices, not mm). A
    field that is not a finite number counts as missing. The source is kept in the metadata so a series ordered by a
    fallback can be told apart."""
    ipp = _vector(ds.get("ImagePositionPatient"), 3)
    if ipp is not None:
        n = slice_normal(ds)
        if n is not None:
            return float(ipp @ n), "ImagePositionPatient"
        return float(ipp[2]), "ImagePositionPatient[2]"
    for source in ("SliceLocation", "InstanceNumber"):
        if (z := _finite(ds.get(source))) is not None:
            return z, source
    return float("nan"), "missing"


def _text(ds, keyword: str) -> str:
    v = ds.get(keyword)
    if isinstance(v, (pydicom.multival.MultiValue, list, tuple)):
        return "\\".join(str(x).strip() for x in v)
    return "" if v is None else str(v).strip()


def series_fields(ds) -> dict:
    """What a series selector reads from a slice's header (src.serve.selector): what the object is (SOP class,
    ImageType), how it was made (kernel, vendor, contrast) and its geometry (orientation, thickness, pixel spacing,
    matrix). Missing fields are empty strings or NaN, never a guess."""
    n = slice_normal(ds)
    spacing = _vector(ds.get("PixelSpacing"), 2)
    return {
        "SOPClassUID": _text(ds, "SOPClassUID"), "ImageType": _text(ds, "ImageType").upper(),
        "SeriesNumber": _text(ds, "SeriesNumber"), "SeriesDescription": _text(ds, "SeriesDescription"),
        "Manufacturer": _text(ds, "Manufacturer"), "ManufacturerModelName": _text(ds, "ManufacturerModelName"),
        "ConvolutionKernel": _text(ds, "ConvolutionKernel"), "ContrastBolusAgent": _text(ds, "ContrastBolusAgent"),
        "SliceThickness": _finite(ds.get("SliceThickness")) if _finite(ds.get("SliceThickness")) is not None else np.nan,
        "pixel_mm": float(spacing.mean()) if spacing is not None else np.nan,
        "normal_z": float(abs(n[2])) if n is not None else np.nan,  # |cos| of the normal's angle to the patient's z axis
        "frames": int(_finite(ds.get("NumberOfFrames")) or 1),
    }


def header_fields(ds) -> dict:
    """The identifiers and geometry the metadata table keeps for every slice."""
    z, z_source = slice_z(ds)
    return {
        "PatientID": str(ds.get("PatientID", "")),
        "StudyInstanceUID": str(ds.get("StudyInstanceUID", "")),
        "SeriesInstanceUID": str(ds.get("SeriesInstanceUID", "")),
        "SOPInstanceUID": str(ds.get("SOPInstanceUID", "")),
        "Modality": str(ds.get("Modality", "")),
        "z": z,
        "z_source": z_source,
        "rows": int(ds.get("Rows", 0) or 0),
        "cols": int(ds.get("Columns", 0) or 0),
    }


def image_id_from_path(path) -> str:
    """A file's image ID: its stem. Kaggle names files `ID_<hex>.dcm`, and `ID_44cfc8e964.dcm` is image
    `ID_44cfc8e964`; any other name keeps its whole stem too (`ID_bomb000001.dcm` is `ID_bomb000001`, never `ID_b`, so
    such names cannot collide). Only a letters-only extension (.dcm, .DCM, .ima, .dicom) is dropped: files named by
    their SOP Instance UID (`1.2.840.113619.2.55.3.4.15`) keep every part of it."""
    name = str(path).replace("\\", "/").rsplit("/", 1)[-1]
    stem, dot, ext = name.rpartition(".")
    return stem if dot and stem and ext.isalpha() else name
