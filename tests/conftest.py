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


def write_stage1_run(root: Path, demo_data: Path, demo_cache: Path, k: int, oof_emb, test_probs, test_emb):
    """A stage-1 run's files built by hand for the stage-2 tests, in the pipeline's layout under root/runs/s1:
    per-slice OOF predictions are the truth drowned in noise (so a slice's neighbours and its series carry
    information), each fold's OOF rows are that fold's images. The embeddings and test predictions come from
    oof_emb(y, rng), test_probs(n, rng) and test_emb(n, rng), called in that order per fold (one rng, seed 0).
    Returns (run folder, labels, folds, metadata of the readable slices indexed by ID)."""
    import warnings

    import numpy as np
    import pandas as pd
    import yaml

    from src.folds import make_folds
    from src.labels import read_labels
    from src.prepare import load_cache
    from src.utils import CLASSES, write_csv
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        labels = read_labels(demo_data / "stage_2_train.csv")
    _, meta = load_cache(demo_cache / "cache")
    ok = meta[meta.status == "ok"].set_index("ID")
    folds = make_folds(labels, ok[ok.split == "train"]["PatientID"], k=k, seed=0)
    folds_file = root / "folds.csv"
    write_csv(folds, folds_file)
    rng = np.random.default_rng(0)
    run, test_ids = root / "runs" / "s1", ok.index[ok.split == "test"]
    for f in range(k):
        d = run / f"fold{f}"
        d.mkdir(parents=True)
        (d / "config.yaml").write_text(yaml.safe_dump({"data_dir": str(demo_data), "out_dir": str(demo_cache),
                                                       "folds_file": str(folds_file), "k": k, "fold_seed": 0}))
        ids = folds.index[folds.fold == f]
        y = labels.loc[ids, CLASSES].to_numpy(float)
        p = 1 / (1 + np.exp(-(np.log(0.1 / 0.9) + 4 * y + rng.normal(0, 1.8, y.shape))))
        oof = pd.DataFrame(p, index=pd.Index(ids, name="ID"), columns=CLASSES)
        oof.insert(0, "fold", f)
        oof.to_csv(d / "oof.csv")
        np.save(d / "oof_emb.npy", oof_emb(y, rng))
        pd.DataFrame(test_probs(len(test_ids), rng), index=pd.Index(test_ids, name="ID"), columns=CLASSES
                     ).assign(source="model").to_csv(d / "test.csv")
        np.save(d / "test_emb.npy", test_emb(len(test_ids), rng))
    return run, labels, folds, ok
