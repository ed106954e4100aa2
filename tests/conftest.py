"""Shared fixtures: one small generated dataset and its cache, built once per test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
RSNA_SAMPLE = SHARED / "rsna_sample"
CQ500 = SHARED / "ct_other" / "cq500_ct0_every10th"


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    from src.synth import generate
    d = tmp_path_factory.mktemp("demo") / "demo"
    generate(d, n_patients=10, n_test_series=2, slices=(10, 12), image_size=128, positive_rate=0.7, seed=3, quiet=True)
    return d


@pytest.fixture(scope="session")
def demo_cache(demo_data, tmp_path_factory):
    from src.prepare import prepare
    out = tmp_path_factory.mktemp("out")
    prepare(demo_data, out / "cache", size=64, jobs=1, chunk=32, quiet=True)
    return out
