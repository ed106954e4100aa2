"""Shared fixtures: one small generated dataset and its cache, built once per test session; the rule on skips.

Skips: a test that needs something absent (../shared's real files, a Debian tool) skips with a reason that names it
(`require_path`, `require_tool` below, or a skipif mark), never falls back silently to something weaker. In CI nothing
may be absent: `.ci/run` sets ICH_NO_SKIPS=1, under which every skip is reported as a failure with its reason.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# one thread per pytest-xdist worker (the workers are the parallelism; two threads each would contend for 2 cores)
os.environ.setdefault("OMP_NUM_THREADS", "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
RSNA_SAMPLE = SHARED / "rsna_sample"
CQ500 = SHARED / "ct_other" / "cq500_ct0_every10th"
NO_SKIPS = os.environ.get("ICH_NO_SKIPS") == "1"  # CI (.ci/run): a skip is a failure


def require_path(*paths: Path) -> None:
    """Skip the calling test, naming what is missing, unless every path exists (../shared's real files)."""
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (../shared beside the checkout, as in CI)")


def require_tool(*names: str) -> str:
    """The first of these programs found on PATH; else skip the calling test naming it and the Debian package
    `.ci/run` installs it from."""
    for n in names:
        if path := shutil.which(n):
            return path
    pytest.skip(f"needs {' or '.join(names)} on PATH (.ci/run installs its Debian package)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under ICH_NO_SKIPS=1 a skipped test (mark or pytest.skip, in setup or in the test) is reported failed, with the
    skip's reason: CI has every real file and tool, so a skip there hides a test that did not run."""
    outcome = yield
    rep = outcome.get_result()
    if NO_SKIPS and rep.skipped and not hasattr(rep, "wasxfail"):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = f"skipped, and ICH_NO_SKIPS=1 (CI) allows no skip: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """The same for a whole module skipped while it is collected (pytest.skip(..., allow_module_level=True))."""
    outcome = yield
    rep = outcome.get_result()
    if NO_SKIPS and rep.skipped:
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = f"skipped, and ICH_NO_SKIPS=1 (CI) allows no skip: {reason}"


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


@pytest.fixture(scope="session")
def trained_run(demo_data, demo_cache, tmp_path_factory):
    """A small trained run with both stages and test predictions, as run.sh leaves one (no blend fitted: tests that
    fit one work on a copy, copy_run)."""
    import warnings

    from src.boost import BoostConfig, train_boost
    from src.config import TrainConfig
    from src.folds import make_folds
    from src.labels import read_labels
    from src.predict import predict_run
    from src.cache import load_cache
    from src.sequence import SeqConfig, train_sequence
    from src.train import train
    from src.utils import write_csv
    out = tmp_path_factory.mktemp("demo_run")
    (out / "cache").symlink_to(demo_cache / "cache")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        labels = read_labels(demo_data / "stage_2_train.csv")
    _, meta = load_cache(demo_cache / "cache")
    ok = meta[(meta.split == "train") & (meta.status == "ok")].set_index("ID")
    folds_file = out / "folds.csv"
    write_csv(make_folds(labels, ok["PatientID"], k=2, seed=0), folds_file)
    for k in (0, 1):
        train(TrainConfig(data_dir=str(demo_data), out_dir=str(out), folds_file=str(folds_file), k=2, fold=k, run_name="m",
                          model="resnet10t", img_size=64, epochs=1, batch_size=16, workers=0, max_steps_per_epoch=3))
    run = out / "runs" / "m"
    predict_run(run, quiet=True)
    for k in (0, 1):
        train_sequence(SeqConfig(stage1=str(run), fold=k, epochs=2))
        train_boost(BoostConfig(stage1=str(run), fold=k, threads=1))
    return run


def copy_run(run: Path, name: str) -> Path:
    """A copy of a trained run and its stage-2 runs under another name beside it (same outputs root and cache)."""
    import shutil
    for kind in ("", "seq_", "boost_"):
        shutil.copytree(run.parent / f"{kind}{run.name}", run.parent / f"{kind}{name}")
    return run.parent / name


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
    from src.cache import load_cache
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
