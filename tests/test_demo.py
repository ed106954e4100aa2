"""The demo as a person uses it: the command line on real series, and the web page driven by headless Chromium;
and the web page's upload handling against the app in-process: the limits the page states are the ones enforced,
while the body streams; every refusal is the page with a message; nothing is left in the temp dir; captions and the
JSON in the page's scripts are escaped once and safely.

    .venv/bin/python -m pytest -q tests/test_demo.py
"""
import asyncio
import contextlib
import html
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import zipfile
from pathlib import Path

import httpx2
import numpy as np
import pandas as pd
import pydicom
import pytest
import requests
from starlette.testclient import TestClient

import src.serve.webapp as W
from src.serve.results import analyse
from src.labels import read_labels
from src.predict import predict_run
from src.predictor import Predictor, grad_cam
from src.scans import list_inputs
from src.cache import load_cache
from src.utils import CLASSES, write_csv
from src.serve.webapp import create_app

from .conftest import CQ500, RSNA_SAMPLE, require_path
from .studies import REASONS, mixed_study

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def run_dir(trained_run):
    return trained_run


def real_series_dirs(demo_data):
    """The real series of ../shared (the CQ500 JPEG-Lossless head, the RSNA sample's test series): skipped, with the
    reason, where they are not."""
    require_path(CQ500, RSNA_SAMPLE / "stage_2_test_images")
    return [CQ500, RSNA_SAMPLE / "stage_2_test_images"]


def test_cli_on_real_series(run_dir, demo_data, tmp_path):
    p = Predictor.load(run_dir)
    assert len(p.folds) == 2 and len(p.sequence) == 2
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "notes.txt").write_text("not a dicom")
    src = next((demo_data / "stage_2_test_images").glob("*.dcm"))
    ds = pydicom.dcmread(src)
    ds.Modality = "MR"
    ds.save_as(extra / "mr.dcm")
    inputs = real_series_dirs(demo_data) + [extra]
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "src.serve.demo", "--run", str(run_dir), *map(str, inputs), "--results-dir", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    # the model was trained on generated data: the command says so, before any result
    assert "WARNING: This model was trained on generated demo data" in r.stdout
    files = list_inputs(inputs[:-1])
    heads = {f: pydicom.dcmread(f, stop_before_pixels=True) for f in files}
    studies = {h.StudyInstanceUID for h in heads.values()}
    study_dirs = sorted(d for d in out.iterdir() if d.is_dir())
    assert len(study_dirs) == len(studies | {ds.StudyInstanceUID})  # one result per study, the MR copy's too
    total = 0
    for d in study_dirs:
        assert "Verdict at" in (d / "summary.md").read_text()
        for s in (x for x in d.iterdir() if x.is_dir()):  # one folder per scored series
            pr = pd.read_csv(s / "predictions.csv")
            total += len(pr)
            assert (np.diff(pr["z"]) > 0).all()                       # slices in order, whatever the file order
            assert ((pr[CLASSES] >= 0) & (pr[CLASSES] <= 1)).all().all()
            assert (s / "zplot.png").stat().st_size > 1000 and len(list(s.glob("gradcam_*.png"))) == min(4, len(pr))
            md = (s / "summary.md").read_text()
            assert "highest probability" in md and "never seen a real head" in md and "not a medical device" in md
            assert f"Trained on '{demo_data.name}'" in md
    assert total == len(files)
    series = pd.read_csv(out / "series.csv", keep_default_na=False)
    # the MR copy is a one-file series of its own study's MR series: listed, not scored, with the reason
    mr = series[series.SeriesInstanceUID == ds.SeriesInstanceUID]
    assert mr.scored.tolist() == [False] and mr.reason.tolist() == ["Modality MR, not CT"]
    assert series.scored.sum() == len(studies)
    assert "not scored: no series of this study" in (out / ds.StudyInstanceUID / "summary.md").read_text()
    skipped = pd.read_csv(out / "skipped.csv")
    reasons = dict(zip(skipped.path.map(lambda s: Path(s).name), skipped.reason))
    assert list(reasons) == ["notes.txt"] and "unreadable DICOM" in reasons["notes.txt"]


def test_predictor_api_applies_stage_2_like_the_test_set(run_dir, demo_data):
    """Predictor.predict on the test images gives what the pipeline wrote for them: its stage-2 models' test.csv
    (each stage-2 fold reading its own stage-1 fold's outputs, by the stage's own code), combined with the run's
    blend weights (here, without a report: the GRU and the booster averaged)."""
    p = Predictor.load(run_dir)
    assert len(p.sequence) == len(p.boost) == 2 and set(p.weights) == {"seq", "boost"}
    assert all(np.allclose(w, 0.5) for w in p.weights.values())
    df = p.predict([demo_data / "stage_2_test_images"])
    assert list(df.columns) == ["ID", "file", "series", "slice", "z", *CLASSES]
    for _, g in df.groupby("series"):
        assert (np.diff(g["z"]) > 0).all() and g["slice"].tolist() == list(range(1, len(g) + 1))
    mean = lambda kind: sum(pd.read_csv(run_dir.parent / f"{kind}_{run_dir.name}" / f"fold{k}" / "test.csv",  # noqa: E731
                                        index_col="ID")[CLASSES] for k in (0, 1)) / 2
    want = (mean("seq") + mean("boost")) / 2
    got = df.set_index("ID")[CLASSES]
    assert np.allclose(got.to_numpy(), want.loc[got.index].to_numpy(), atol=1e-4)
    s1 = Predictor.load(run_dir, stage2=False).predict([demo_data / "stage_2_test_images"]).set_index("ID")[CLASSES]
    assert not np.allclose(s1.loc[got.index].to_numpy(), got.to_numpy(), atol=1e-4)  # stage 2 did change something
    assert p.card["images"] > 0 and p.card["patients"] > 0 and p.card["synthetic"] is True


@pytest.mark.skipif(not CQ500.exists(), reason="../shared/ct_other not present")
def test_jpeg_lossless_series_matches_training_preprocessing(run_dir):
    results, skipped = analyse(Predictor.load(run_dir), [CQ500], cam_slices=1)
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


@pytest.fixture(scope="module")
def app(run_dir):
    return create_app(run_dir)


@pytest.fixture
def client(app):
    return TestClient(app)


@pytest.fixture
def tmp(tmp_path, monkeypatch):
    """The temp dir the app makes its upload folders in, to see what is written there and what is left."""
    d = tmp_path / "uploads"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def refused(r, status, message, tmp):
    assert r.status_code == status and r.headers["content-type"].startswith("text/html")
    error = re.search(r"<div class='err' id='error'>(.*?)</div>", r.text)
    assert error and message in html.unescape(error.group(1)), r.text[:500]
    assert "<a href='/'>Back</a>" in r.text and "Traceback" not in r.text
    assert not list(tmp.iterdir())  # the upload's folder is gone


def post_streamed(app, body, headers):
    """POST through httpx's ASGI transport, which hands the app one chunk of the body per receive()."""
    async def go():
        async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://demo") as c:
            return await c.post("/analyse", content=body, headers=headers)
    return asyncio.run(go())


def on_disk(folder):
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


PART = b'--XyZ\r\nContent-Disposition: form-data; name="files"; filename="big.dcm"\r\n\r\n'
MULTIPART = {"content-type": "multipart/form-data; boundary=XyZ"}


def test_too_large_by_content_length_is_refused_before_reading(app, tmp, monkeypatch):
    monkeypatch.setattr(W, "MAX_BYTES", 50_000)
    pulled = []

    async def body():
        for _ in range(10):
            pulled.append(1)
            yield b"\0" * 10_000
    r = post_streamed(app, body(), {**MULTIPART, "content-length": "100000"})
    refused(r, 413, "larger than", tmp)
    assert not pulled


def test_chunked_body_is_capped_while_it_streams(app, tmp, monkeypatch):
    monkeypatch.setattr(W, "MAX_BYTES", 100_000)
    chunk, sent, peak = 8192, 0, 0

    async def body():  # 1.6 MB in all, declared nowhere: chunked, no Content-Length
        nonlocal sent, peak
        yield PART
        for _ in range(200):
            peak = max(peak, on_disk(tmp))  # the app has handled every earlier chunk when it asks for the next
            sent += chunk
            yield b"\0" * chunk
        yield b"\r\n--XyZ--\r\n"
    r = post_streamed(app, body(), MULTIPART)
    assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
    refused(r, 413, "larger than", tmp)
    assert sent <= W.MAX_BYTES + chunk               # stopped reading at the limit
    assert 0 < peak <= W.MAX_BYTES + chunk          # written as it came, never past the limit


def test_the_page_file_limit_is_the_one_enforced(client, tmp):
    n = int(re.search(r"up to (\d+) files", client.get("/").text).group(1))
    files = [("files", (f"{i}.dcm", b"x")) for i in range(n)]
    r = client.post("/analyse", files=files)
    assert r.status_code == 200 and "Too many files" not in r.text
    assert "No series the model can read in the upload" in r.text and f"Skipped files ({n})" in r.text
    assert not list(tmp.iterdir())
    refused(client.post("/analyse", files=files + [("files", ("one-more.dcm", b"x"))]), 400, f"more than {n} files", tmp)


@pytest.mark.parametrize("content_type, body, status, message", [
    ("multipart/form-data; boundary=XyZ", b"not multipart at all", 400, "malformed multipart"),
    ("multipart/form-data; boundary=XyZ", PART + b"cut short", 400, "malformed multipart"),
    ("multipart/form-data", PART + b"x\r\n--XyZ--\r\n", 415, "not a file upload"),
    ("application/json", b"{}", 415, "not a file upload"),
], ids=["not multipart", "cut short", "no boundary", "not a form"])
def test_bad_requests_are_refused_with_the_page(client, tmp, content_type, body, status, message):
    refused(client.post("/analyse", content=body, headers={"content-type": content_type}), status, message, tmp)


def test_framework_refusals_are_the_page_too(client, tmp):
    refused(client.get("/analyse"), 405, "Method Not Allowed", tmp)
    refused(client.get("/nowhere"), 404, "Not Found", tmp)


def test_zip_entries_cannot_escape(client, tmp):
    def zipped(entries):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for name, data in entries.items():
                z.writestr(name, data)
        return buf.getvalue()
    refused(client.post("/analyse", files=[("files", ("s.zip", zipped({"a.dcm": b"x", "../../evil.txt": b"owned"})))]),
            400, "outside", tmp)
    r = client.post("/analyse", files=[("files", ("s.zip", zipped({"series/a.dcm": b"x", "b.dcm": b"y"}))),
                                       ("files", ("../../c.dcm", b"z"))])
    assert r.status_code == 200 and all(f"<li>{n}: unreadable DICOM" in r.text for n in ("a.dcm", "b.dcm", "c.dcm"))
    assert not list(tmp.iterdir())  # nothing written outside the upload's folder, and that is gone


def test_zips_count_uncompressed(client, tmp, monkeypatch):
    monkeypatch.setattr(W, "MAX_BYTES", 100_000)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("a.dcm", b"\0" * 1_000_000)
    assert len(buf.getvalue()) < 10_000
    refused(client.post("/analyse", files=[("files", ("bomb.zip", buf.getvalue()))]), 413, "once unpacked", tmp)
    monkeypatch.setattr(W, "MAX_FILES", 2)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i in range(3):
            z.writestr(f"{i}.dcm", b"x")
    refused(client.post("/analyse", files=[("files", ("three.zip", buf.getvalue()))]), 400, "more than 2 files", tmp)


def test_captions_are_escaped_once_and_cannot_close_the_script(client, demo_data):
    files = sorted((demo_data / "stage_2_test_images").glob("*.dcm"))
    series = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    five = [f for f in files if pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID == series][:5]
    names = ["a&b.dcm", "x</script><img src=x onerror=alert(1)>.dcm", "c.dcm", "d.dcm", "e.dcm"]  # 5: a series
    r = client.post("/analyse", files=[("files", (n, f.read_bytes())) for n, f in zip(names, five)])
    assert r.status_code == 200 and r.text.count("<script>") == r.text.count("</script>") == 1
    script = re.search(r"<script>(.*?)</script>", r.text, re.S).group(1)
    data = re.search(r"const f=(\[.*?\]);", script).group(1)
    assert not set("<>&") & set(data)
    captions = " ".join(f["caption"] for f in json.loads(data))  # what the page sets as the caption's textContent
    assert "(a&b.dcm)" in captions and "(script><img src=x onerror=alert(1)>.dcm)" in captions  # the base name
    assert "<img src=x" not in r.text


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(run_dir):
    with W.launched(run_dir) as (url, _):
        yield url


@contextlib.contextmanager
def served(app, **limits):
    """app served as the page is (src.serve.webapp.server_config, with `limits`) by uvicorn in a thread of this
    process, where a test's monkeypatching reaches it."""
    import uvicorn
    srv = uvicorn.Server(W.server_config(app, "127.0.0.1", free_port(), **limits))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    deadline = time.time() + 60
    while not srv.started:
        assert t.is_alive() and time.time() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{srv.config.port}"
    finally:
        srv.should_exit = True
        t.join(timeout=10)


def test_bad_upload_gives_a_message_not_a_trace(server):
    r = requests.post(server + "/analyse", files=[("files", ("junk.dcm", b"\x00" * 100))], timeout=60)
    assert r.status_code == 200 and "No series the model can read in the upload" in r.text and "Traceback" not in r.text
    assert "junk.dcm: unreadable DICOM" in r.text
    r = requests.post(server + "/analyse", files=[], timeout=60)  # requests sends no form at all for no files
    assert r.status_code == 415 and "not a file upload" in r.text and "Traceback" not in r.text


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs Debian's chromium)")
def test_browser_upload_shows_summary_and_a_refusal(server, app, demo_data, tmp_path, tmp, monkeypatch):
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
        # what the model knows comes first: it was trained on generated data, and it is no medical device
        assert page.locator("#synthetic-warning").is_visible()
        assert "never seen a real head" in page.inner_text("#synthetic-warning")
        assert "not a medical device" in page.inner_text("#model-card")
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
        assert page.locator("#synthetic-warning").is_visible() and "AUC(any)" in page.inner_text("#model-card")
        assert page.locator(".series-list").count() == 1  # one study: its series listed, scored or not
        page.screenshot(path=str(shot), full_page=True)

        # a refusal shown in the page: the app served in-process, its size limit small enough for one file to pass
        monkeypatch.setattr(W, "MAX_BYTES", 100_000)
        big = tmp_path / "big.dcm"
        big.write_bytes(b"\0" * 1_000_000)
        with served(app) as url:
            page.goto(url)
            page.set_input_files("#files", [str(big)])
            with page.expect_response(url + "/analyse") as response:
                page.click("#submit")
            assert response.value.status == 413
            assert "larger than" in page.inner_text("#error")
            page.click("text=Back")
            page.wait_for_selector("#files")
        browser.close()
    assert shot.stat().st_size > 10_000
    assert not list(tmp.iterdir())


def test_the_page_scores_only_the_axial_series_of_a_mixed_study(client, tmp_path):
    """A study as a PACS sends it (tests/studies.py: the real sample's axial series, its thin, bone and contrast
    copies, reformats, a scout and a dose report) uploaded whole: one study, one scored series, every other series
    in the page's table with the selector's reason."""
    require_path(RSNA_SAMPLE)
    uids = mixed_study(tmp_path / "study")
    files = sorted((tmp_path / "study").iterdir())
    r = client.post("/analyse", files=[("files", (f.name, f.read_bytes())) for f in files])
    assert r.status_code == 200
    assert r.text.count('<section class="study"') == 1 and r.text.count('<section class="series"') == 1
    assert f"<h3>Series {uids['axial']}</h3>" in r.text and "<b>33 slices</b>" in r.text
    rows = re.findall(r"<tr class='(pos|)'><td>([^<]*)</td><td>[^<]*</td><td>(\d+)</td><td>(yes|no)</td>"
                      r"<td class='why'>([^<]*)</td></tr>", r.text)
    assert len(rows) == 8 and [row[3] for row in rows].count("yes") == 1
    why = {number: html.unescape(reason) for _, number, _, _, reason in rows}
    assert why["2"] == "-"  # the axial series, scored without a note
    for kind, number in (("localizer", "1"), ("thin", "3"), ("bone", "4"), ("contrast", "5"), ("sagittal", "601"),
                         ("coronal", "602"), ("dose", "997")):
        assert why[number] == REASONS[kind], kind


def trickle(url: str, declared: int, every: float, stop: threading.Event, out: dict) -> None:
    """An upload that never finishes: headers declaring `declared` bytes, a file part's header, then 1 KB every
    `every` seconds; what the page answered (its status line) and when go in `out`."""
    host, port = url.split("//")[1].split(":")
    s = socket.create_connection((host, int(port)), timeout=30)
    t0 = time.monotonic()
    s.sendall(f"POST /analyse HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary=XyZ\r\n"
              f"Content-Length: {declared}\r\n\r\n".encode() + PART)
    s.settimeout(every)
    answer = b""
    while not stop.is_set() and b"\r\n" not in answer:
        try:
            data = s.recv(4096)
            if not data:
                break
            answer += data
        except TimeoutError:
            try:
                s.sendall(b"\0" * 1024)
            except OSError:
                pass
    out.update(status=answer.split(b"\r\n")[0].decode(), seconds=time.monotonic() - t0)
    s.close()


def test_uploads_are_capped_and_one_that_trickles_is_cut_at_its_time_limit(run_dir, tmp):
    """The page with --max-uploads 2 --upload-seconds 2: two uploads declaring 400 MB that trickle a kilobyte at a
    time hold two temp folders; a third is answered 503 (busy, retry later) at once, keeping nothing; at 2 s each
    trickle is answered 408 and its folder is gone; then the page takes an upload again."""
    app = create_app(run_dir, max_uploads=2, upload_seconds=2.0)
    stop, answers = threading.Event(), [{}, {}]
    with served(app) as url:
        threads = [threading.Thread(target=trickle, args=(url, 400 << 20, 0.2, stop, a), daemon=True) for a in answers]
        for t in threads:
            t.start()
        try:
            deadline = time.monotonic() + 30
            while len(list(tmp.iterdir())) < 2:
                assert time.monotonic() < deadline, "the two uploads did not start"
                time.sleep(0.05)
            busy = requests.post(url + "/analyse", files=[("files", ("a.dcm", b"x"))], timeout=30)
            assert busy.status_code == 503 and busy.headers["retry-after"] == "60"
            assert "The page is busy: 2 upload(s) are under way" in html.unescape(busy.text)
            assert len(list(tmp.iterdir())) == 2  # the third kept nothing
            for t in threads:
                t.join(30)
        finally:
            stop.set()
        assert [a["status"] for a in answers] == ["HTTP/1.1 408 Request Timeout"] * 2
        assert all(1.9 < a["seconds"] < 10 for a in answers), answers
        assert not list(tmp.iterdir())  # removed at once, with the answer
        again = requests.post(url + "/analyse", files=[("files", ("a.dcm", b"x"))], timeout=60)
        assert again.status_code == 200 and "a.dcm: unreadable DICOM" in again.text


def test_report_blends_the_members_and_the_predictor_applies_that_blend(run_dir, tmp_path):
    """src.blend fits the blend of a run's three members on their OOF predictions; src.evaluate shows it (and the
    prior without an AUC); the stage-1 run's card carries its figures, and the Predictor combines its stages so."""
    from src.blend import blend, cross_fitted, fit_blend, fit_weights
    from src.evaluate import evaluate_runs
    from src.metrics import weighted_log_loss
    runs_dir = run_dir.parent
    for kind in ("", "seq_", "boost_"):  # a copy of the run, so the other tests' run keeps no report
        shutil.copytree(runs_dir / f"{kind}m", runs_dir / f"{kind}m2")
    members = [runs_dir / "m2", runs_dir / "seq_m2", runs_dir / "boost_m2"]
    report_dir = runs_dir.parent / "report" / "m2"
    assert "blend" not in evaluate_runs(members, report_dir)["runs"]  # the report shows a blend; it never fits one
    fit_blend([runs_dir / "m2"], quiet=True)  # the run and its stages: OUT/blends/m2.json
    s = evaluate_runs(members, report_dir)
    labels = pd.read_csv(runs_dir.parent / "cache" / "labels.csv", index_col="ID")
    oofs = [pd.concat(pd.read_csv(m / f"fold{k}" / "oof.csv", index_col="ID") for k in (0, 1)) for m in members]
    ids = oofs[0].index
    y = labels.loc[ids, CLASSES].to_numpy()
    preds = [o.loc[ids, CLASSES].to_numpy() for o in oofs]
    w = fit_weights(y, preds)
    assert np.allclose(np.array(list(s["blend_weights"].values())).T, w, atol=1e-6)
    mixed = weighted_log_loss(y, blend(preds, w))
    assert s["runs"]["blend"]["weighted_log_loss"] == pytest.approx(mixed, rel=1e-9)
    assert mixed <= min(s["runs"][m.name]["weighted_log_loss"] for m in members) + 1e-12
    honest = weighted_log_loss(y, cross_fitted(y, preds, oofs[0].loc[ids, "fold"].to_numpy()))
    assert s["runs"]["blend, cross-fitted"]["weighted_log_loss"] == pytest.approx(honest, rel=1e-9)
    md = (report_dir / "report.md").read_text()
    assert "| | m2 | seq_m2 | boost_m2 | blend | blend, cross-fitted | prior |" in md and "weights in the blend" in md
    assert md.count(" / - / ") == len(CLASSES)  # the prior's AUC is undefined: shown as "-"
    p = Predictor.load(runs_dir / "m2")
    for i, part in enumerate(("stage1", "seq", "boost")):
        assert np.allclose(p.weights[part], w[:, i], atol=1e-6)
    assert p.card["oof_weighted_log_loss"] == pytest.approx(honest) and "blend of" in p.card["stage"]


def peer_closed(s: socket.socket) -> bool:
    """Whether the other end has closed `s` without answering: an end of stream, or a reset (a close with our bytes
    unread); an answer is not a close."""
    try:
        data = s.recv(100)
    except ConnectionResetError:
        return True
    assert data == b"", data[:100]
    return True


def test_slow_headers_and_too_many_connections_are_closed_while_a_visitor_is_served(run_dir):
    """The page with --header-seconds 1 --max-connections-per-address 5: five connections from 127.0.0.1 trickle a
    request's headers (slowloris); a sixth from there is closed at once; a visitor from 127.0.0.2 gets the page
    meanwhile; at 1 s the five are closed, though they keep sending, and 127.0.0.1 is served again."""
    import http.client
    app = W.create_app(run_dir)

    def visit(source: str) -> int:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=20, source_address=(source, 0))
        c.request("GET", "/")
        status = c.getresponse().status
        c.close()
        return status

    with served(app, header_seconds=1.0, max_per_address=5) as url:
        port = int(url.rsplit(":", 1)[1])
        slow = [socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.1", 0))
                for _ in range(5)]
        t0 = time.monotonic()
        for s in slow:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        time.sleep(0.2)
        extra = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.1", 0))
        extra.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert peer_closed(extra)  # closed at once, unanswered
        assert visit("127.0.0.2") == 200
        alive = set(range(5))
        while alive and time.monotonic() - t0 < 5:
            for i in list(alive):
                try:
                    slow[i].sendall(b"X-Slow: 1\r\n")
                    slow[i].settimeout(0.05)
                    if peer_closed(slow[i]):
                        alive.discard(i)
                except TimeoutError:
                    pass
                except BrokenPipeError:  # closed by the page before this send
                    alive.discard(i)
            time.sleep(0.1)
        closed_after = time.monotonic() - t0
        assert not alive and 0.9 < closed_after < 3, closed_after
        assert visit("127.0.0.1") == 200
        for s in [*slow, extra]:
            s.close()


def test_a_file_name_with_a_control_character_is_refused_in_words(client, tmp):
    body = (b"--B\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a\x00b.dcm\"\r\n"
            b"Content-Type: application/octet-stream\r\n\r\nxx\r\n--B--\r\n")
    r = client.post("/analyse", content=body, headers={"content-type": "multipart/form-data; boundary=B"})
    assert r.status_code == 400 and "a file name with a control character (&#x27;a\\x00b.dcm&#x27;): rename the " \
        "file" in r.text
    assert not list(tmp.iterdir())
