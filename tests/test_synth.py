import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from src.dicom import DicomError, pixels, read_dicom, rescale_params, to_hu
from src.labels import read_labels
from src.synth import MIN_PIXELS, generate
from src.utils import CLASSES, PipelineError


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes(tmp_path):
    # two processes with different string-hash seeds, as two runs of `python -m src.synth` are
    root = Path(__file__).resolve().parents[1]
    for name, hash_seed, seed in (("a", "1", "11"), ("b", "2", "11"), ("c", "1", "12")):
        subprocess.run([sys.executable, "-m", "src.synth", "--data-dir", str(tmp_path / name), "--patients", "3",
                        "--test-series", "1", "--min-slices", "6", "--max-slices", "7", "--image-size", "64", "--data-seed", seed],
                       cwd=root, env={**os.environ, "PYTHONHASHSEED": hash_seed}, check=True, capture_output=True)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")
    with pytest.raises(PipelineError, match="not empty"):
        generate(tmp_path / "a", n_patients=3, quiet=True)


def test_layout_oddities_and_labels_follow_pixels(demo_data):
    with pytest.warns(UserWarning, match="dropped 5 exactly duplicated"):
        labels = read_labels(demo_data / "stage_2_train.csv")
    assert (labels[CLASSES[:5]].max(axis=1) == labels["any"]).all()
    assert labels[CLASSES[:5]].sum().min() > 0  # every subtype occurs
    styles, windows, truncated = set(), 0, 0
    blood_pos, blood_neg = [], []
    for p in sorted((demo_data / "stage_2_train_images").glob("*.dcm")):
        try:
            ds = read_dicom(p)
            hu = to_hu(pixels(ds), rescale_params(ds))
        except DicomError as e:  # the generator writes one truncated file on purpose; nothing else may fail
            assert str(e).startswith("pixel data too short (truncated file?)"), (p.name, e)
            truncated += 1
            continue
        styles.add((str(ds.file_meta.TransferSyntaxUID), int(ds.BitsStored), int(ds.PixelRepresentation),
                    rescale_params(ds).fix_12bit))
        windows += isinstance(ds.WindowCenter, pydicom.multival.MultiValue)
        n_blood = int(((hu >= 55) & (hu <= 95)).sum())
        (blood_pos if labels.loc[p.stem, "any"] else blood_neg).append(n_blood)
    assert truncated == 1 and windows > 0
    assert {s[:3] for s in styles} >= {("1.2.840.10008.1.2", 12, 0), ("1.2.840.10008.1.2.1", 16, 1)}
    assert any(s[3] for s in styles)  # intercept-bug files
    # labels follow from what was drawn: acute blood (60-85 HU plus noise) only where a label says so
    assert min(blood_pos) >= MIN_PIXELS * 0.8
    assert max(blood_neg) < MIN_PIXELS / 2
