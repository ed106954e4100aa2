"""The demo as a person uses it: the command line on real series, and the web page driven by headless Chromium."""
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import requests

from src.demo import analyse, grad_cam, list_inputs, load_models
from src.folds import make_folds
from src.labels import read_labels
from src.predict import predict_run
from src.prepare import load_cache
from src.sequence import SeqConfig, train_sequence
from src.train import train
from src.config import TrainConfig
from src.utils import CLASSES, write_csv
from src.webapp import UploadError, save_uploads

from .conftest import CQ500, RSNA_SAMPLE

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def run_dir(demo_data, demo_cache, tmp_path_factory):
    """A small trained run with both stages, as run.sh leaves one."""
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
    return run


def real_series_dirs(demo_data):
    dirs = [d for d in (CQ500, RSNA_SAMPLE / "stage_2_test_images") if d.exists()]
    return dirs or [demo_data / "stage_2_test_images"]


def test_cli_on_real_series(run_dir, demo_data, tmp_path):
    models = load_models(run_dir)
    assert len(models.stage1) == 2 and len(models.sequence) == 2
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "notes.txt").write_text("not a dicom")
    src = next((demo_data / "stage_2_test_images").glob("*.dcm"))
    ds = pydicom.dcmread(src)
    ds.Modality = "MR"
    ds.save_as(extra / "mr.dcm")
    inputs = real_series_dirs(demo_data) + [extra]
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "src.demo", "--model", str(run_dir), *map(str, inputs), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    files = list_inputs(inputs[:-1])
    n_series = len({pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID for f in files})
    series_dirs = [d for d in out.iterdir() if d.is_dir()]
    assert len(series_dirs) == n_series
    total = 0
    for d in series_dirs:
        p = pd.read_csv(d / "predictions.csv")
        total += len(p)
        assert (np.diff(p["z"]) > 0).all()                       # slices in z order, whatever the file order
        assert ((p[CLASSES] >= 0) & (p[CLASSES] <= 1)).all().all()
        assert (d / "zplot.png").stat().st_size > 1000 and len(list(d.glob("gradcam_*.png"))) == min(4, len(p))
        assert "highest probability" in (d / "summary.md").read_text()
    assert total == len(files)
    skipped = pd.read_csv(out / "skipped.csv")
    reasons = dict(zip(skipped.path.map(lambda s: Path(s).name), skipped.reason))
    assert "unreadable DICOM" in reasons["notes.txt"] and "not a CT image (Modality MR)" == reasons["mr.dcm"]


@pytest.mark.skipif(not CQ500.exists(), reason="../shared/ct_other not present")
def test_jpeg_lossless_series_matches_training_preprocessing(run_dir):
    models = load_models(run_dir)
    results, skipped = analyse(models, list_inputs([CQ500]), cam_slices=1)
    assert len(results) == 1 and results[0].summary["slices"] == 23 and skipped.empty
    cam = next(iter(results[0].cams.values()))[1]
    assert cam.shape == (64, 64) and 0 <= cam.min() and cam.max() <= 1


def test_grad_cam_points_at_the_evidence():
    """A backbone whose feature map is the normalised image and whose 'any' logit is the mean of channel 0:
    Grad-CAM must light up exactly where channel 0 is bright (a square in the top-left), nowhere else."""
    import torch
    from torch import nn
    from src.model import Net

    class Backbone(nn.Module):
        num_features = 3

        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 6)
            with torch.no_grad():
                self.fc.weight.zero_(), self.fc.bias.zero_()
                self.fc.weight[CLASSES.index("any"), 0] = 1.0

        def forward_features(self, x):
            return x

        def forward_head(self, f, pre_logits=False):
            return f.mean(dim=(2, 3))

        def get_classifier(self):
            return self.fc

    model = Net(Backbone())
    x = torch.zeros((1, 3, 32, 32), dtype=torch.uint8)
    x[:, 0, 4:12, 4:12] = 255
    cam = grad_cam(model, x, CLASSES.index("any"))[0]
    assert cam.shape == (32, 32) and cam.max() == pytest.approx(1.0)
    assert cam[4:12, 4:12].min() > 0.99 and cam[16:, 16:].max() == 0.0


def _upload(name, data):
    class U:  # the two attributes save_uploads uses of starlette's UploadFile
        filename = name
        file = io.BytesIO(data)
    return U()


def test_zip_entries_cannot_escape(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("series/a.dcm", b"x")
        z.writestr("../../evil.txt", b"owned")
    with pytest.raises(UploadError, match="outside"):
        save_uploads([_upload("s.zip", buf.getvalue())], tmp_path)
    assert not (tmp_path.parent / "evil.txt").exists() and not (tmp_path.parent.parent / "evil.txt").exists()
    ok = io.BytesIO()
    with zipfile.ZipFile(ok, "w") as z:
        z.writestr("series/a.dcm", b"x")
        z.writestr("b.dcm", b"y")
    dest = tmp_path / "ok"
    dest.mkdir()
    paths = save_uploads([_upload("s.zip", ok.getvalue()), _upload("../../c.dcm", b"z")], dest)
    assert sorted(p.name for p in paths) == ["a.dcm", "b.dcm", "c.dcm"]
    assert all(p.resolve().is_relative_to(dest.resolve()) for p in paths)


def test_upload_limits(tmp_path, monkeypatch):
    import src.webapp as W
    monkeypatch.setattr(W, "MAX_BYTES", 10)
    with pytest.raises(UploadError, match="larger than"):
        save_uploads([_upload("a.dcm", b"0123456789ab")], tmp_path)
    monkeypatch.setattr(W, "MAX_FILES", 2)
    with pytest.raises(UploadError, match="more than 2 files"):
        save_uploads([_upload(f"{i}.dcm", b"1") for i in range(3)], tmp_path)
    with pytest.raises(UploadError, match="no files"):
        save_uploads([], tmp_path)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(run_dir):
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "src.demo", "serve", "--model", str(run_dir), "--port", str(port)],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if requests.get(url, timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        assert p.poll() is None, p.stdout.read().decode()[-2000:]
        assert time.time() < deadline, "server did not start"
        time.sleep(0.5)
    yield url
    p.terminate()
    p.wait(timeout=10)


def test_bad_upload_gives_a_message_not_a_trace(server):
    r = requests.post(server + "/analyse", files=[("files", ("junk.dcm", b"\x00" * 100))], timeout=60)
    assert r.status_code == 200 and "No readable CT slice" in r.text and "Traceback" not in r.text
    assert "junk.dcm: unreadable DICOM" in r.text
    r = requests.post(server + "/analyse", files=[], timeout=60)
    assert r.status_code in (400, 422) and "Traceback" not in r.text


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs Debian's chromium)")
def test_browser_upload_shows_summary(server, demo_data, tmp_path):
    from playwright.sync_api import sync_playwright
    folder = real_series_dirs(demo_data)[0]
    files = sorted(str(p) for p in folder.glob("*.dcm"))
    shot = Path(os.environ.get("DEMO_SCREENSHOT", tmp_path / "demo.png"))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1200, "height": 1000})
        page.goto(server)
        page.set_input_files("#files", files)
        page.click("#submit")
        page.wait_for_selector(".summary", timeout=300_000)
        texts = page.locator(".summary").all_inner_texts()
        n_series = len({pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID for f in files})
        assert len(texts) == n_series  # one summary per series in the upload
        counts = [int(re.search(r"(\d+) slices", t).group(1)) for t in texts]
        assert sum(counts) == len(files)
        for text in texts:
            assert "highest probability" in text and all(c in text for c in CLASSES)
        assert page.locator("#slice0").get_attribute("src").startswith("data:image/png;base64,")
        page.fill("#range0", "1")
        page.dispatch_event("#range0", "input")
        assert page.inner_text("#caption0").startswith(f"slice 1/{counts[0]}")
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.stat().st_size > 10_000
