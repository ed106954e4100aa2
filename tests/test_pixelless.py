"""One answer for an image without usable pixels, in every path that meets one (docs/pipeline.md "Images without
usable pixels"): where a file needs a row for every image (a run's test.csv from the cache, `src.predict
--dicom-dir`, a bundle's test predictions in a submission) the row is the training prior, the label file's class
frequencies, marked `source=prior`; the front ends, which answer per series, list the file as not scored, with its
reason, and score nothing for it."""
import shutil
import warnings

import numpy as np
import pandas as pd
import pytest
import yaml

from src.card import training_prior
from src.export import export
from src.labels import read_labels
from src.make_submission import make_submission
from src.predict import predict_run
from src.predictor import Predictor
from src.prepare import prepare
from src.serve.results import analyse
from src.utils import CLASSES, PipelineError


def label_frequencies(data_dir) -> np.ndarray:
    """The reference prior, computed here from the label file itself."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_labels(data_dir / "stage_2_train.csv")[CLASSES].mean().to_numpy()


@pytest.fixture(scope="module")
def broken_test_image(trained_run, demo_data, tmp_path_factory):
    """The demo data with one test file truncated (its own cache), and a copy of the trained run reading it."""
    root = tmp_path_factory.mktemp("pixelless")
    data = root / "demo"
    shutil.copytree(demo_data, data, symlinks=True)
    victim = sorted((data / "stage_2_test_images").glob("*.dcm"))[3]
    victim.write_bytes(victim.read_bytes()[:2000])
    prepare(data, root / "out" / "cache", size=64, jobs=1, chunk=32, quiet=True)
    runs = root / "out" / "runs"
    for kind in ("", "seq_", "boost_"):
        shutil.copytree(trained_run.parent / f"{kind}{trained_run.name}", runs / f"{kind}{trained_run.name}")
    run = runs / trained_run.name
    for cfg in run.glob("fold*/config.yaml"):
        c = yaml.safe_load(cfg.read_text())
        cfg.write_text(yaml.safe_dump({**c, "data_dir": str(data), "out_dir": str(root / "out")}))
    for f in run.glob("fold*/test*"):
        f.unlink()
    (run / "predict.json").unlink(missing_ok=True)
    return data, run, victim.stem


def test_the_cached_test_set_gives_the_prior(broken_test_image):
    data, run, victim = broken_test_image
    predict_run(run, quiet=True)
    for fold in ("fold0", "fold1"):
        t = pd.read_csv(run / fold / "test.csv", index_col="ID")
        assert t.loc[victim, "source"] == "prior" and (t.drop(index=victim)["source"] == "model").all()
        np.testing.assert_allclose(t.loc[victim, CLASSES].to_numpy(float), label_frequencies(data), rtol=1e-5)


def test_a_dicom_folder_gives_the_prior_not_nan(broken_test_image, tmp_path):
    data, run, victim = broken_test_image
    predict_run(run, dicom_dir=data / "stage_2_test_images", out=tmp_path, quiet=True)
    t = pd.read_csv(tmp_path / "fold0" / "test.csv", index_col="ID")
    assert t.loc[victim, "source"] == "prior" and not t[CLASSES].isna().any().any()
    np.testing.assert_allclose(t.loc[victim, CLASSES].to_numpy(float), label_frequencies(data), rtol=1e-5)


def test_a_bundle_in_a_submission_gives_the_prior(broken_test_image, tmp_path):
    """A bundle's test predictions: the image without pixels gets the bundle's training prior (its card's), not the
    model's mean over the readable images."""
    data, run, victim = broken_test_image
    bundle = export(run, tmp_path / "m.ichbundle", quiet=True)
    make_submission([bundle], "p", weights="equal", data_dir=data, submissions_dir=tmp_path, out_dir=run.parent.parent,
                    quiet=True)
    sub = pd.read_csv(tmp_path / "stage_2_p.csv").set_index("ID")["Label"]
    got = np.array([sub[f"{victim}_{c}"] for c in CLASSES])
    np.testing.assert_allclose(got, np.clip(label_frequencies(data), 1e-5, 1 - 1e-5), atol=1e-6)
    np.testing.assert_allclose(training_prior(Predictor.load(bundle).card, bundle), label_frequencies(data), rtol=1e-6)


def test_the_front_ends_list_it_as_not_scored(broken_test_image):
    data, run, victim = broken_test_image
    p = Predictor.load(run)
    results, skipped = analyse(p, [data / "stage_2_test_images"], cam_slices=0)
    assert [n for n in skipped["path"].map(lambda s: s.rsplit("/", 1)[-1])] == [f"{victim}.dcm"]
    assert skipped["reason"].iloc[0].startswith("pixel data too short (truncated file?)")
    assert all(victim not in set(r.table["ID"]) for r in results)


def test_a_card_without_a_prior_is_a_clear_error():
    with pytest.raises(PipelineError, match=r"m.ichbundle: its model card has no training prior .*export it again"):
        training_prior({"run": "m"}, "m.ichbundle")
