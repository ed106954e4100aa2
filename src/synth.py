"""Synthetic head CT in the exact Kaggle layout, so the whole pipeline can run without the real data.

    python -m src.synth --data-dir input/demo --patients 40 --test-series 8 --data-seed 0

Writes `stage_2_train.csv`, `stage_2_sample_submission.csv`, `stage_2_train_images/ID_*.dcm` and
`stage_2_test_images/ID_*.dcm`. Each series is a stack of axial slices (5 mm apart) through an
elliptical head: scalp, skull (bone), brain (grey/white), ventricles and sulci (CSF), air. Bleeds of the
five subtypes, in acute blood at 60-85 HU, each span several consecutive slices, drawn where that
subtype occurs:

- epidural: a lens against the inner table; subdural: a crescent along it;
- subarachnoid: thin lines in sulci near the cortex; intraparenchymal: a blob in brain tissue;
- intraventricular: blood layering in the ventricles.

A slice's label for a subtype is 1 exactly when that subtype's drawn region covers at least
`MIN_PIXELS` pixels of it (smaller cross-sections are not drawn), and `any` is their OR.

The real data's oddities are reproduced: 12-bit unsigned implicit-VR files and 16-bit signed
explicit-VR files (air at -3024 HU outside the scan circle), multi-valued windows, a few files with the
intercept bug, one truncated (corrupt) file, a few exactly duplicated label rows, a series whose
images are not 256 px. Everything follows from the seed. A marker file (layout.SYNTHETIC_MARKER) says
the folder is generated, so models trained on it are labelled as such wherever they are shown.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from . import dicom  # noqa: F401  (installs the filter for the IDs we write into UID fields, as the real files have)
from .config import parse_config
from .labels import to_long
from .layout import SYNTHETIC_MARKER
from .utils import CLASSES, PipelineError, atomic_write, cli_main, write_csv


MIN_PIXELS = 12            # a drawn cross-section smaller than this is left out (and not labelled)
SLICE_GAP_MM = 5.0
FOV_MM = 250.0


@dataclass
class Bleed:
    kind: str
    k0: int                # first slice index
    length: int            # number of slices it spans
    hu: float
    theta: float           # position angle on the head outline (radians)
    size: float            # scale (mm)
    rho: float = 0.5       # IPH: normalised distance from the centre
    extra: dict = field(default_factory=dict)

    def strength(self, k: int) -> float:
        """Cross-section scale on slice k: largest mid-way, smaller at the ends."""
        if not self.k0 <= k < self.k0 + self.length:
            return 0.0
        return float(np.sin(np.pi * (k - self.k0 + 0.5) / self.length)) ** 0.5


def _ids(rng, n, hexlen):
    """n distinct random IDs, in the order drawn (a dict, not a set: set order varies between processes)."""
    out = {}
    while len(out) < n:
        out["ID_" + "".join(rng.choice(list("0123456789abcdef"), hexlen))] = None
    return list(out)


def draw_slice(rng, n_px: int, k: int, n_slices: int, head: dict, bleeds: list[Bleed]):
    """One slice in HU (float32, n_px x n_px) and its label vector (5 subtypes + any).

    Long because it is one drawing, anatomy first and then each bleed type in turn over it; split, each piece
    would need the whole coordinate frame passed to it."""
    spacing = FOV_MM / n_px
    c = (np.arange(n_px) - n_px / 2 + 0.5) * spacing
    X, Y = np.meshgrid(c - head["dx"], c - head["dy"])
    ca, sa = np.cos(head["rot"]), np.sin(head["rot"])
    X, Y = ca * X + sa * Y, -sa * X + ca * Y

    t = (k + 0.5) / n_slices
    s = float(np.sqrt(max(0.05, 1 - ((t - 0.45) / 0.62) ** 2)))  # head narrows to the vertex and base
    a, b = head["a"] * s, head["b"] * s                          # inner table semi-axes (mm)
    rho = np.sqrt((X / a) ** 2 + (Y / b) ** 2)
    theta = np.arctan2(Y / b, X / a)
    skull_t = head["skull"] / min(a, b)

    img = np.full((n_px, n_px), -1000.0, np.float32)
    img[rho < 1 + skull_t + 4.0 / min(a, b)] = 40.0                    # scalp
    img[rho < 1 + skull_t] = head["bone_hu"]                          # skull
    brain = rho < 1.0
    img[brain] = 38.0                                                 # cortex (grey matter)
    img[rho < 0.78] = 27.0                                            # white matter
    # sulci: short CSF clefts running in from the cortex
    for phi in head["sulci"]:
        d = np.abs(np.sin(theta - phi)) * rho * min(a, b)
        img[(d < 0.9) & (rho > 0.82) & (rho < 0.99) & (np.cos(theta - phi) > 0)] = 8.0
    vent = np.zeros_like(brain)
    if 0.3 < t < 0.72:                                                # lateral ventricles in mid slices
        vs = np.sin(np.pi * (t - 0.3) / 0.42)
        for side in (-1, 1):
            vent |= ((X - side * 8.0) / (5.0 * vs + 1)) ** 2 + ((Y + 4.0) / (20.0 * vs + 2)) ** 2 < 1
        img[vent] = 5.0

    labels = np.zeros(6, np.uint8)
    for bl in bleeds:
        f = bl.strength(k)
        if f == 0:
            continue
        if bl.kind == "epidural":
            px, py = a * np.cos(bl.theta), b * np.sin(bl.theta)
            tang = np.arctan2(b * np.cos(bl.theta), -a * np.sin(bl.theta))
            u = (X - px) * np.cos(tang) + (Y - py) * np.sin(tang)
            v = -(X - px) * np.sin(tang) + (Y - py) * np.cos(tang)
            mask = ((u / (bl.size * 1.6 * f)) ** 2 + (v / (bl.size * 0.7 * f)) ** 2 < 1) & brain
        elif bl.kind == "subdural":
            w = 0.5 + 0.4 * f
            dth = np.angle(np.exp(1j * (theta - bl.theta)))
            thick = bl.size * 0.5 * f * np.cos(np.clip(dth / w, -1, 1) * np.pi / 2) / min(a, b)
            mask = brain & (np.abs(dth) < w) & (rho > 1 - thick)
        elif bl.kind == "subarachnoid":
            mask = np.zeros_like(brain)
            for j in range(-2, 3):
                phi = bl.theta + 0.16 * j
                d = np.abs(np.sin(theta - phi)) * rho * min(a, b)
                mask |= (d < 1.3) & (rho > 0.97 - 0.25 * f) & (rho < 0.995) & (np.cos(theta - phi) > 0)
            mask &= brain
        elif bl.kind == "intraparenchymal":
            cx, cy = bl.rho * a * np.cos(bl.theta), bl.rho * b * np.sin(bl.theta)
            r = np.hypot(X - cx, Y - cy)
            phi = np.arctan2(Y - cy, X - cx)
            mask = (r < bl.size * f * (1 + 0.2 * np.sin(3 * phi + bl.extra["phase"]))) & brain & ~vent
        elif bl.kind == "intraventricular":
            # blood settles in the dependent (posterior) part of the ventricles
            mask = vent & (Y > -4.0 + 20.0 * (0.2 - 0.5 * f))
        else:
            raise ValueError(bl.kind)
        if mask.sum() < MIN_PIXELS:
            continue
        img[mask] = bl.hu
        labels[CLASSES.index(bl.kind)] = 1
    labels[5] = labels[:5].max()
    img += rng.normal(0, 4.0, img.shape).astype(np.float32) * (img > -500)  # CT noise inside the head
    return img, labels


def make_series_plan(rng, n_slices: int, positive: bool, first_kind: str) -> tuple[dict, list[Bleed]]:
    head = dict(a=rng.uniform(62, 72), b=rng.uniform(78, 88), skull=rng.uniform(5, 7), bone_hu=rng.uniform(900, 1500),
                dx=rng.uniform(-8, 8), dy=rng.uniform(-8, 8), rot=rng.uniform(-0.15, 0.15),
                sulci=rng.uniform(-np.pi, np.pi, rng.integers(6, 12)))
    bleeds: list[Bleed] = []
    if positive:
        others = [c for c in CLASSES[:5] if c != first_kind]
        kinds = [first_kind] + list(rng.choice(others, size=rng.choice([0, 0, 1, 2]), replace=False))
        for kind in kinds:
            length = int(rng.integers(3, max(4, min(8, n_slices // 2))))
            lo, hi = (0.35, 0.68) if kind == "intraventricular" else (0.15, 0.85)  # IVH only where ventricles are
            lo, hi = int(lo * n_slices), int(hi * n_slices) - length
            k0 = int(rng.integers(lo, max(lo + 1, hi)))
            size = {"epidural": 14, "subdural": 16, "subarachnoid": 1, "intraparenchymal": 11,
                    "intraventricular": 1}[kind] * rng.uniform(0.8, 1.3)
            bleeds.append(Bleed(str(kind), k0, length, float(rng.uniform(60, 85)), float(rng.uniform(-np.pi, np.pi)),
                                float(size), rho=float(rng.uniform(0.2, 0.55)), extra={"phase": float(rng.uniform(0, 6))}))
    return head, bleeds


def write_ct(path, hu: np.ndarray, *, image_id, patient, study, series, z, spacing, style: str, multi_window: bool):
    """Write one slice as a DICOM file in one of the real data's encodings.

    style: 'u12' (Implicit VR, BitsStored 12, unsigned, intercept -1024), 's16' (Explicit VR, signed,
    -3024 HU outside the scan circle), 'bug' (12-bit unsigned with RescaleIntercept 1: the intercept bug).
    """
    n = hu.shape[0]
    h = np.rint(hu).astype(np.int32)
    if style == "s16":
        yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
        h = np.where(xx ** 2 + yy ** 2 > (n / 2) ** 2, -3024, h)
        raw, bits, rep, intercept = (h + 1024).astype(np.int16), 16, 1, -1024.0
    elif style == "u12":
        raw, bits, rep, intercept = np.clip(h + 1024, 0, 4095).astype(np.uint16), 12, 0, -1024.0
    elif style == "bug":
        raw, bits, rep, intercept = (np.clip(h, -1000, 3095) % 4096).astype(np.uint16), 12, 0, 1.0
    else:
        raise ValueError(style)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[image_id])
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if style != "s16" else ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = image_id          # like the real files: an ID, not a valid UID
    ds.Modality = "CT"
    ds.PatientID = patient
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.StudyID = ""
    ds.ImagePositionPatient = [-FOV_MM / 2, -FOV_MM / 2, round(float(z), 6)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = n, n
    ds.PixelSpacing = [round(spacing, 6), round(spacing, 6)]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, rep
    ds.WindowCenter = [40, 40] if multi_window else 40
    ds.WindowWidth = [80, 80] if multi_window else 80
    ds.RescaleIntercept = intercept
    ds.RescaleSlope = 1.0
    ds.PixelData = raw.tobytes()
    with atomic_write(path, "wb") as f:
        ds.save_as(f, implicit_vr=style != "s16", little_endian=True, enforce_file_format=True)


def generate(out_dir, n_patients=40, n_test_series=8, slices=(20, 28), image_size=256, positive_rate=0.6, seed=0,
             overwrite=False, quiet=False):
    """Write a synthetic Kaggle-layout dataset; returns the wide label table of the train images.

    Long because the real data's oddities (file styles, windows, the intercept bug, a truncated file, duplicated
    label rows, another matrix size) are each placed here, in the order the seed draws them."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise PipelineError(f"{out} is not empty; pass --overwrite to replace it")
        shutil.rmtree(out)
    (out / "stage_2_train_images").mkdir(parents=True)
    (out / "stage_2_test_images").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    t0 = time.time()

    # patients: a few have two studies, so folds must group by patient rather than by series
    patients = _ids(rng, n_patients, 8)
    series_plan = [(p, "train") for p in patients] + [(p, "train") for p in patients[: max(1, n_patients // 10)]]
    test_patients = _ids(rng, n_test_series, 8)
    series_plan += [(p, "test") for p in test_patients]
    n_series = len(series_plan)
    n_slices = rng.integers(slices[0], slices[1] + 1, n_series)
    all_ids = iter(_ids(rng, int(n_slices.sum()), 9))
    study_ids = _ids(rng, n_series, 10)
    series_ids = _ids(rng, n_series, 10)
    styles = rng.choice(["u12", "s16"], n_series)
    sizes = np.full(n_series, image_size)
    sizes[1] = int(image_size * 1.25)  # one series at another matrix size: the cache must resize it
    bug_series = {2, 5}               # series written with the 12-bit intercept bug

    rows = []
    for si, (patient, split) in enumerate(series_plan):
        # every subtype occurs: positive series take turns at which subtype they are sure to have
        head, bleeds = make_series_plan(rng, int(n_slices[si]), positive=rng.random() < positive_rate,
                                        first_kind=CLASSES[si % 5])
        z0 = rng.uniform(-50, 150)
        for k in range(int(n_slices[si])):
            hu, lab = draw_slice(rng, int(sizes[si]), k, int(n_slices[si]), head, bleeds)
            image_id = next(all_ids)
            style = "bug" if si in bug_series else str(styles[si])
            write_ct(out / f"stage_2_{split}_images" / f"{image_id}.dcm", hu, image_id=image_id, patient=patient,
                     study=study_ids[si], series=series_ids[si], z=z0 + SLICE_GAP_MM * k,
                     spacing=FOV_MM / sizes[si], style=style, multi_window=bool(rng.random() < 0.3))
            rows.append((image_id, split, *lab))
    df = pd.DataFrame(rows, columns=["ID", "split", *CLASSES]).set_index("ID")

    train = df[df.split == "train"][CLASSES]
    corrupt = train.index[len(train) // 3]
    p = out / "stage_2_train_images" / f"{corrupt}.dcm"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])  # a truncated file, like ID_6431af929 in the real set

    shuffled = train.sample(frac=1.0, random_state=seed)     # the real CSV is not in slice order
    long = to_long(shuffled)
    dup = long.sample(n=5, random_state=seed)                 # the real CSV repeats some rows exactly
    long = pd.concat([long, dup], ignore_index=True)
    write_csv(long, out / "stage_2_train.csv", index=False)
    test = pd.DataFrame(0.5, index=df.index[df.split == "test"], columns=CLASSES)
    (out / SYNTHETIC_MARKER).write_text("Generated by `python -m src.synth` (synthetic phantoms, not real head CT).\n"
                                        f"seed {seed}, {n_patients} patients, {n_test_series} test series\n")
    write_csv(to_long(test), out / "stage_2_sample_submission.csv", index=False)
    if not quiet:
        pos = train[train["any"] == 1]
        print(f"wrote {len(train)} train slices ({len(pos)} with a bleed; per subtype "
              f"{train[CLASSES[:5]].sum().to_dict()}), {len(test)} test slices, "
              f"{n_series} series to {out} in {time.time() - t0:.1f}s; truncated file: {corrupt}")
    return train


@dataclass
class SynthConfig:
    data_dir: str = "input/demo"      # dataset folder to create (Kaggle layout)
    patients: int = 40                # train patients (a tenth get a second study)
    test_series: int = 8              # test series (one patient each)
    min_slices: int = 20              # slices per series, at least
    max_slices: int = 28              # slices per series, at most
    image_size: int = 256             # matrix size of most series (real data: 512)
    positive_rate: float = 0.6        # share of series with a bleed
    data_seed: int = 0                # everything generated follows from it
    overwrite: bool = False           # replace a non-empty folder


def main():
    a = parse_config(SynthConfig, description=__doc__, prog="python -m src.synth")
    generate(a.data_dir, a.patients, a.test_series, (a.min_slices, a.max_slices), a.image_size, a.positive_rate,
             a.data_seed, a.overwrite)


if __name__ == "__main__":
    cli_main(main)
