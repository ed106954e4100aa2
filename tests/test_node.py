"""The DICOM node end to end with real parts: Debian's Orthanc as the PACS (a temporary configuration and storage on
free local ports), dcmtk's storescu and pynetdicom as the scanners sending the real CQ500 and RSNA series, and the node
itself as `python -m src.serve.node` in its own process. What the node sent back is read from Orthanc's REST API and checked
against the Predictor's own output for the same files; then a duplicate send, non-CT, broken and oversized instances,
a series over its limit, kill -9 of the node mid-series and a restart, and Orthanc down when the results are ready.

    .venv/bin/python -m pytest -q tests/test_node.py
"""
from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from pydicom.uid import (UID, CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLosslessSV1,
                        MRImageStorage)

from src.card import make_card
from src.serve.results import SYNTHETIC_WARNING, verdict_threshold
from src.serve.dicom_out import RESEARCH_USE, TYPE_CODES
from src.serve.node import Destination, key, parse_destination
from src.predictor import Predictor
from src.runs import Run
from src.utils import CLASSES, PipelineError

from .conftest import CQ500, RSNA_SAMPLE, copy_run, require_path, require_tool
from .studies import REASONS, mixed_study

ROOT = Path(__file__).resolve().parents[1]
ORTHANC = shutil.which("Orthanc") or next((p for p in ["/usr/sbin/Orthanc"] if Path(p).exists()), None)
pytestmark = [pytest.mark.skipif(ORTHANC is None,
                                 reason="Debian's orthanc package is not installed (.ci/run installs it)"),
              pytest.mark.xdist_group("node")]  # one worker runs them all (--dist loadgroup): Orthanc starts once
REAL = CQ500.exists() and RSNA_SAMPLE.exists()
TIMEOUT = 1.5                         # the node's --study-timeout in these tests
LIMIT = 200                           # its --max-study-instances: the mixed study (182 instances) fits


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str, log: Path | None = None):
    """Poll `check` until it returns something true; fail naming `what` (and the node's last log lines)."""
    end = time.time() + timeout
    while time.time() < end:
        out = check()
        if out:
            return out
        time.sleep(0.25)
    tail = "\n".join(log.read_text().splitlines()[-25:]) if log and log.exists() else ""
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")


class OrthancServer:
    """Orthanc on free local ports, its storage in a temporary folder that outlives a stop and start."""

    def __init__(self, root: Path):
        self.root, self.http, self.dicom, self.aet = root, free_port(), free_port(), "ORTHANC"
        self.node_port, self.proc = free_port(), None   # the node it knows as a modality

    def configure(self) -> None:
        (self.root / "db").mkdir(parents=True, exist_ok=True)
        (self.root / "orthanc.json").write_text(json.dumps({
            "Name": "test", "StorageDirectory": str(self.root / "db"), "IndexDirectory": str(self.root / "db"),
            "HttpPort": self.http, "DicomPort": self.dicom, "DicomAet": self.aet, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomCheckCalledAet": False, "Plugins": [],
            "DicomModalities": {"ich": ["ICH", "127.0.0.1", self.node_port]}}))

    def start(self) -> None:
        self.proc = subprocess.Popen([ORTHANC, str(self.root / "orthanc.json")], cwd=self.root,
                                     stdout=open(self.root / "orthanc.log", "ab"), stderr=subprocess.STDOUT)
        wait_for(self.up, 30, "Orthanc to answer on its REST port", self.root / "orthanc.log")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)

    def up(self) -> bool:
        try:
            return requests.get(f"http://127.0.0.1:{self.http}/system", timeout=2).ok
        except requests.ConnectionError:
            return False

    def get(self, path: str, **kw):
        r = requests.get(f"http://127.0.0.1:{self.http}{path}", timeout=30, **kw)
        r.raise_for_status()
        return r

    def series_of(self, study_uid: str, modality: str) -> list[dict]:
        """Orthanc's series of a study with one modality (expanded)."""
        r = requests.post(f"http://127.0.0.1:{self.http}/tools/find", timeout=30, json={
            "Level": "Series", "Expand": True, "Query": {"StudyInstanceUID": study_uid, "Modality": modality}})
        r.raise_for_status()
        return r.json()

    def instances(self, series: dict) -> list[pydicom.Dataset]:
        return [pydicom.dcmread(io.BytesIO(self.get(f"/instances/{i}/file").content)) for i in series["Instances"]]


class NodeProcess:
    """`python -m src.serve.node` in its own process, with the test's settings; killed or restarted at will."""

    def __init__(self, run: Path, spool: Path, send_to: str, port: int, flags: list[str]):
        self.run, self.spool, self.send_to, self.port, self.flags, self.proc = run, spool, send_to, port, flags, None
        self.log = spool / "node.log"

    def start(self, study_timeout: float = TIMEOUT) -> None:
        mark = self.log.read_text().count("listening as") if self.log.exists() else 0
        self.spool.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "src.serve.node", "--run", str(self.run), "--send-to", self.send_to, "--port",
             str(self.port), "--spool-dir", str(self.spool), "--study-timeout", str(study_timeout), "--cam-slices",
             "2", "--device", "cpu", *self.flags],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(self.spool.parent / "node.stderr", "ab"))
        wait_for(lambda: self.proc.poll() is not None or (self.log.exists() and
                                                          self.log.read_text().count("listening as") > mark),
                 180, "the node to listen", self.log)
        assert self.proc.poll() is None, (self.spool.parent / "node.stderr").read_text()[-3000:]

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(30)

    def stop(self) -> None:
        """SIGTERM: the node stops listening, finishes what it was doing and says so; the interpreter's own exit
        (torch's teardown, seconds) is not waited for."""
        stops = self.text().count(" stopped\n")
        self.proc.terminate()
        wait_for(lambda: self.proc.poll() is not None or self.text().count(" stopped\n") > stops, 60,
                 "the node to stop", self.log)
        self.proc.kill()
        self.proc.wait(30)

    def text(self) -> str:
        return self.log.read_text()


def send(port: int, datasets, calling="TESTSCU", contexts=(CTImageStorage,), source: str = "127.0.0.1",
         wait: float | None = None, syntaxes=(ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLosslessSV1)
         ) -> list[int | None]:
    """C-STORE datasets to the node in one association from `source` (pynetdicom as a modality would); their
    statuses (None: no answer within `wait` seconds, pynetdicom's defaults when None, or the association aborted)."""
    from pynetdicom import AE
    ae = AE(ae_title=calling)
    if wait is not None:
        ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = wait
    for c in contexts:  # one context per transfer syntax: each file goes in its own
        for ts in syntaxes:
            ae.add_requested_context(c, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title="ICH", bind_address=(source, 0))
    assert assoc.is_established, f"the node refused an association from {calling} at {source}"
    out = []
    try:
        for ds in datasets:
            st = assoc.send_c_store(ds) if assoc.is_established else None
            out.append(int(st.Status) if st and "Status" in st else None)
    finally:
        assoc.release() if assoc.is_established else assoc.abort()
    return out


def rsna(path) -> pydicom.Dataset:
    """A competition file as an archive would send it: its SOP Class UID (kept only in the file meta) in the data
    set."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    return ds


def series_files(folder: Path) -> dict[str, list[Path]]:
    """SeriesInstanceUID -> its files, for a folder of real slices."""
    out = {}
    for f in sorted(folder.glob("*.dcm")):
        out.setdefault(str(pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID), []).append(f)
    return out


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def predictor(trained_run):
    """The tiny trained run (a copy, as `p.run`) with a card whose scan-level operating point (as src.evaluate writes
    it) the node must apply and state: a threshold inside the range of this model's outputs on CQ500, so that some
    slices are flagged and some are not."""
    run = copy_run(trained_run, "node_op")
    p = Predictor.load(run, "cpu")
    p.run, p.expected = run, {}       # files -> what the Predictor says of them, computed once
    require_path(CQ500)
    any_ = np.sort(expected(p, sorted(CQ500.glob("*.dcm")))[0]["any"].to_numpy())
    card = make_card(Run(run))
    card["operating_point"] = {"member": run.name, "threshold": float(any_[len(any_) // 2]), "target_sensitivity": 0.95,
                               "sensitivity": 0.96, "specificity": 0.4}
    (run / "card.json").write_text(json.dumps(card))
    p.card = card                     # what the node reads from card.json when it loads the run
    return p


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    o = OrthancServer(tmp_path_factory.mktemp("orthanc"))
    o.configure()
    o.start()
    yield o
    if o.proc.poll() is None:
        o.stop()


@pytest.fixture(scope="module")
def node(predictor, pacs, tmp_path_factory):
    n = NodeProcess(predictor.run, tmp_path_factory.mktemp("node") / "spool",
                    f"127.0.0.1:{pacs.dicom}:{pacs.aet}", pacs.node_port,
                    ["--allowed-callers", "TESTSCU,STORESCU", "--max-instance-mb", "2", "--max-study-instances", str(LIMIT),
                     "--retry-first", "0.5", "--retry-max", "2"])
    n.start()
    yield n
    if n.proc.poll() is None:
        n.stop()


def expected(predictor, files) -> tuple[dict, dict]:
    """The Predictor's own table for the files, and SOPInstanceUID -> its row."""
    k = tuple(map(str, files))
    if k not in predictor.expected:
        t = predictor.predict(files)
        uid = {f.name: str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in map(Path, files)}
        predictor.expected[k] = t, {uid[f]: row for f, row in zip(t["file"], t.to_dict("records"))}
    return predictor.expected[k]


def sr_findings(sr: pydicom.Dataset) -> dict:
    """The SR's content as plain values: the texts at its root by code (a list for those that repeat: the series
    scored and not scored), the threshold, the study's verdict (present / absent), and per scored series and type its
    highest slice probability with the instance it references (TID 1500, read back with highdicom)."""
    import highdicom as hd
    out = {"types": {}, "SCORED": [], "NOT-SCORED": []}
    for item in sr.ContentSequence:
        c = item.ConceptNameCodeSequence[0].CodeValue
        if item.ValueType == "TEXT":
            out[c].append(item.TextValue) if c in ("SCORED", "NOT-SCORED") else out.__setitem__(c, item.TextValue)
        elif item.ValueType == "NUM" and c == "122411":  # Threshold Value
            out["THRESHOLD"] = float(item.MeasuredValueSequence[0].FloatingPointValue)
        elif item.ValueType == "CONTAINER" and c == "C0034375":  # the study's qualitative evaluation
            out["VERDICT"] = item.ContentSequence[0].ConceptCodeSequence[0].CodeMeaning
    cls_of = {v.value: k for k, v in TYPE_CODES.items()}
    for g in hd.sr.MeasurementReport.from_sequence([sr]).get_image_measurement_groups():
        (m,) = g.get_measurements()
        (img,) = m.referenced_images
        out["types"][cls_of[g.finding_type.value]] = {"max": m.value, "max_at": img.referenced_sop_instance_uid}
    return out


def results_in(pacs: OrthancServer, study_uid: str, n_sr: int = 1):
    """(SR datasets, KO datasets, SC datasets) once the node's results for a study are in Orthanc."""
    def ready():
        srs, kos, scs = (pacs.series_of(study_uid, m) for m in ("SR", "KO", "OT"))
        return (srs, kos, scs) if len(srs) >= n_sr and len(kos) >= n_sr and \
            sum(len(s["Instances"]) for s in scs) >= 2 * n_sr else None
    return ready


def check_results(pacs, predictor, node, files, sc_count=2) -> pydicom.Dataset:
    """The node's SR, key images and Grad-CAM series for one real series are in its study in Orthanc and say what the
    Predictor says."""
    src = pydicom.dcmread(files[0], stop_before_pixels=True)
    srs, kos, scs = wait_for(results_in(pacs, str(src.StudyInstanceUID)), 120, f"results of {src.SeriesInstanceUID}",
                             node.log)
    assert len(srs) == len(kos) == len(scs) == 1, (srs, kos, scs)
    [sr] = pacs.instances(srs[0])
    table, by_uid = expected(predictor, files)
    # in the source study, patient copied, fresh valid UIDs
    assert sr.StudyInstanceUID == src.StudyInstanceUID and sr.PatientID == src.PatientID
    for u in (sr.SeriesInstanceUID, sr.SOPInstanceUID):
        assert UID(u).is_valid and u != src.SeriesInstanceUID, u
    assert sr.SOPClassUID == pydicom.uid.ComprehensiveSRStorage and sr.Modality == "SR"
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500" and sr.VerificationFlag == "UNVERIFIED"
    # the evidence is the source series, every scored instance
    [study] = sr.CurrentRequestedProcedureEvidenceSequence
    [ref_series] = study.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == src.SeriesInstanceUID
    assert {str(r.ReferencedSOPInstanceUID) for r in ref_series.ReferencedSOPSequence} == set(by_uid)
    # the numbers are the Predictor's, at the card's operating point, stated
    f = sr_findings(sr)
    threshold, how = verdict_threshold(predictor.card)
    assert f["THRESHOLD"] == pytest.approx(threshold, abs=1e-12) and f["THRESHOLD-FROM"].startswith(how)
    assert "operating point chosen out of fold" in how
    assert f["VERDICT"] == ("Present" if table["any"].max() >= threshold else "Absent")
    assert f["INTENDED-USE"] == RESEARCH_USE and f["WARNING"] == SYNTHETIC_WARNING  # the demo model: generated data
    assert "Trained on" in f["MODEL-CARD"] and f"{threshold:.3f}" in f["MODEL-CARD"]
    assert len(f["SCORED"]) == 1 and src.SeriesInstanceUID in f["SCORED"][0]
    for c in CLASSES:
        t = f["types"][c]
        assert t["max"] == pytest.approx(table[c].max(), abs=1e-5), c
        assert by_uid[t["max_at"]][c] == pytest.approx(table[c].max(), abs=1e-5)
    # the key images are the flagged slices (at or above the threshold for 'any'; the top one when none is)
    [ko] = pacs.instances(kos[0])
    keys = {str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for i in ko.ContentSequence if i.ValueType == "IMAGE"}
    flagged = {u for u, row in by_uid.items() if row["any"] >= threshold}
    assert keys == (flagged or {max(by_uid, key=lambda u: by_uid[u]["any"])})
    # the Grad-CAM images decode, from Orthanc's file and as Orthanc renders them, and point at their source slices
    images = pacs.instances(scs[0])
    assert len(images) == sc_count
    top = table.sort_values("any", ascending=False, kind="stable")
    top_uids = [u for u, row in by_uid.items() if row["any"] >= top["any"].iloc[sc_count - 1]]
    for im in images:
        assert UID(im.SOPInstanceUID).is_valid
        assert im.SeriesInstanceUID not in (sr.SeriesInstanceUID, src.SeriesInstanceUID)
        assert im.StudyInstanceUID == src.StudyInstanceUID and im.BurnedInAnnotation == "YES"
        px = im.pixel_array
        assert px.ndim == 3 and px.shape[2] == 3 and px.dtype == np.uint8 and px.std() > 5
        assert str(im.SourceImageSequence[0].ReferencedSOPInstanceUID) in top_uids
    png = pacs.get(f"/instances/{scs[0]['Instances'][0]}/preview").content
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return sr


# ---------------------------------------------------------------- tests

def test_names_destinations_and_command_line_errors(tmp_path):
    assert key("1.2.840.113619.2.55") == "1.2.840.113619.2.55" and key("ID_44cfc8e964") == "ID_44cfc8e964"
    for uid in ("../../etc", ".", "..", "a/b", "x" * 65, "", "1.2 3"):  # never a path outside its folder
        assert key(uid).startswith("@") and len(key(uid)) == 33, uid
    assert parse_destination("pacs.example.org:4242:ORTHANC") == Destination("pacs.example.org", 4242, "ORTHANC")
    assert parse_destination("[::1]:104:PACS") == Destination("::1", 104, "PACS")
    for bad in ("pacs:port:AET", "pacs:4242", "pacs:4242:" + "A" * 17, ":4242:AET"):
        with pytest.raises(PipelineError, match="HOST:PORT:AET"):
            parse_destination(bad)
    for args, says in ((["--send-to", "pacs:4242:ORTHANC"], "--run"), (["--run", "r"], "--send-to"),
                       (["--run", "r", "--send-to", "pacs:4242:ORTHANC", "--study-timeout", "0"], "--study-timeout")):
        r = subprocess.run([sys.executable, "-m", "src.serve.node", *args, "--spool-dir", str(tmp_path)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and says in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_echo_and_callers(node):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification
    for calling, ok in (("TESTSCU", True), ("STRANGER", False)):
        ae = AE(ae_title=calling)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="ICH")
        assert assoc.is_established == ok
        if ok:
            assert assoc.send_c_echo().Status == 0
            assoc.release()
    wait_for(lambda: "calling AE title 'STRANGER' is not in --allowed-callers" in node.text(), 10, "the refusal logged")


@pytest.mark.skipif(not REAL, reason="the real series in ../shared are absent")
def test_real_series_come_back_as_sr_and_images_in_their_study(node, pacs, predictor):
    cq500 = sorted(CQ500.glob("*.dcm"))
    test_series = list(series_files(RSNA_SAMPLE / "stage_2_test_images").values())[0]
    storescu = require_tool("storescu")
    # dcmtk, as a scanner or an archive would send; -xs proposes JPEG Lossless, the files' syntax
    r = subprocess.run([storescu, "-xs", "-aet", "STORESCU", "-aec", "ICH", "127.0.0.1", str(node.port),
                        *map(str, cq500)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert send(node.port, [rsna(f) for f in test_series]) == [0] * len(test_series)
    sr = check_results(pacs, predictor, node, cq500)
    check_results(pacs, predictor, node, test_series)
    sr.save_as(node.spool.parent / "sr.dcm")  # dcmtk renders the report as a viewer would
    html = subprocess.run([require_tool("dsr2html"), str(node.spool.parent / "sr.dcm")], capture_output=True,
                          text=True).stdout
    assert "Imaging Measurement Report" in html and "Research use, not a medical device" in html


@pytest.mark.skipif(not REAL, reason="the real series in ../shared are absent")
def test_duplicates_count_once_and_bad_instances_are_refused_or_skipped(node, pacs, predictor):
    files = list(series_files(RSNA_SAMPLE / "stage_2_test_images").values())[1]
    good = [rsna(f) for f in files]
    mr = rsna(files[0])
    mr.SOPClassUID, mr.Modality, mr.SOPInstanceUID = MRImageStorage, "MR", pydicom.uid.generate_uid()
    mr.SeriesInstanceUID = pydicom.uid.generate_uid()  # an MR series of the same study
    mr.file_meta.MediaStorageSOPClassUID = MRImageStorage
    huge_header = rsna(files[1])
    huge_header.Rows = huge_header.Columns = 4096
    huge_header.SOPInstanceUID = pydicom.uid.generate_uid()
    truncated = rsna(files[2])  # a header that passes, pixel data that does not: skipped when the series is scored
    truncated.SOPInstanceUID, truncated.PixelData = pydicom.uid.generate_uid(), truncated.PixelData[:4000]
    lone = rsna(files[3])       # the only instance of its series, and broken: that series fails, nothing else
    lone.SeriesInstanceUID, lone.SOPInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    lone.PixelData = lone.PixelData[:4000]
    statuses = send(node.port, good[:20] + good[:5] + [mr, huge_header, truncated, lone] + good[20:] + good[-3:],
                    contexts=(CTImageStorage, MRImageStorage))
    # the MR image is valid: stored with its study and listed as not scored; the 4096-pixel header is not a CT slice
    assert statuses == [0] * 25 + [0, 0xC000, 0, 0] + [0] * (len(good) - 20 + 3)
    # an instance larger than --max-instance-mb aborts its association while it streams
    big = rsna(files[4])
    big.SOPInstanceUID, big.Rows, big.Columns = pydicom.uid.generate_uid(), 1024, 1024
    big.PixelData = np.zeros((1024, 1024), np.int16).tobytes()
    assert send(node.port, [big]) == [None]
    sr = check_results(pacs, predictor, node, files)  # every good instance once, the truncated one not among them
    log = node.text()
    assert f"skipped {truncated.SOPInstanceUID}.dcm: pixel data too short" in log
    assert "kept with its study, not scored: SOP class MR Image Storage, not a CT image" in log
    assert "image of 4096 x 4096 pixels" in log and "aborted: an instance over 2 MB" in log
    assert "8 duplicate(s), 1 refused" in log  # good[:5] and good[-3:] again, in the same association
    # the MR image and the one broken instance of another series are listed in the study's report, not scored
    not_scored = sr_findings(sr)["NOT-SCORED"]
    assert any(mr.SeriesInstanceUID in t and t.endswith("Modality MR, not CT") for t in not_scored), not_scored
    assert any(lone.SeriesInstanceUID in t and t.endswith("1 slice(s): a head CT series has 5 to 1000")
               for t in not_scored), not_scored
    assert not list(node.spool.rglob(f"{big.SOPInstanceUID}*"))  # nothing of the aborted instance was kept


@pytest.mark.skipif(not REAL, reason="the real series in ../shared are absent")
def test_a_study_over_its_limit_is_refused_and_not_scored(node, pacs):
    study = pydicom.uid.generate_uid()
    copies = []
    for _ in range(LIMIT + 1):        # one small slice under LIMIT + 1 instance UIDs: one more than the limit
        ds = rsna(sorted((RSNA_SAMPLE / "stage_2_test_images").glob("*.dcm"))[0])
        ds.StudyInstanceUID, ds.SOPInstanceUID = study, pydicom.uid.generate_uid()
        ds.Rows = ds.Columns = 16
        ds.PixelData = np.full((16, 16), 1024, np.uint16 if ds.PixelRepresentation == 0 else np.int16).tobytes()
        copies.append(ds)
    assert send(node.port, copies) == [0] * LIMIT + [0xA700]
    wait_for(lambda: f"study {key(study)} not scored" in node.text(), 60, "the study over its limit to be set aside",
             node.log)
    time.sleep(1)
    assert pacs.series_of(study, "SR") == []


@pytest.mark.skipif(not REAL, reason="the real series in ../shared are absent")
def test_killed_mid_series_restarts_from_its_spool(node, pacs, predictor):
    files = list(series_files(RSNA_SAMPLE / "stage_2_train_images").values())[0]
    half = len(files) // 2
    from pynetdicom import AE
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", node.port, ae_title="ICH")
    for f in files[:half]:
        assert assoc.send_c_store(rsna(f)).Status == 0
    node.kill9()                      # mid-series, mid-association, before the series could be quiet
    assoc.abort()
    assert len(list((node.spool / "incoming").glob("*/*.dcm"))) == half
    node.start(study_timeout=4)      # the time a restarted node gives its senders to resume
    # the sender resumes, re-sending a few it had sent: they count once
    assert send(node.port, [rsna(f) for f in files[half - 3:]]) == [0] * (len(files) - half + 3)
    # killed again while it scores the series: restarted, it scores it again, first, and delivers one result
    study = key(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    wait_for(lambda: f"study {study} complete: {len(files)} instance(s); scoring" in node.text(), 60,
             "the scoring to start", node.log)
    node.kill9()
    assert (node.spool / "work" / study / "round.txt").exists()
    assert not list((node.spool / "outbox").glob(f"{study}-*")) and not list((node.spool / "sent").glob(f"{study}-*"))
    node.start()
    assert "1 studies interrupted while scored (scored first)" in node.text().rsplit("listening as", 1)[1]
    check_results(pacs, predictor, node, files)
    assert node.text().count(f"study {study} complete: {len(files)} instance(s); scoring") == 2


@pytest.mark.skipif(not REAL, reason="the real series in ../shared are absent")
def test_a_whole_study_sent_by_a_default_storescu_gets_one_answer_from_its_axial_series(node, pacs, predictor,
                                                                                       tmp_path):
    """A study as a PACS forwards it (tests/studies.py: the real sample's axial series with its thin, bone and
    contrast copies, sagittal and coronal reformats, a scout and a dose report), sent whole by dcmtk's storescu with
    its defaults (+sd +r, and no --no-halt: it stops at the first failed store): every instance gets through, and
    the study gets one report, from the axial series, listing every other series with its reason."""
    uids = mixed_study(tmp_path / "study")
    r = subprocess.run([require_tool("storescu"), "+sd", "+r", "-aet", "STORESCU", "-aec", "ICH", "127.0.0.1",
                        str(node.port), str(tmp_path / "study")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    files = sorted(tmp_path / "study" / f.name for f in (tmp_path / "study").iterdir())
    axial = [f for f in files if pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID == uids["axial"]]
    assert len(axial) == 33
    sr = check_results(pacs, predictor, node, axial)
    f = sr_findings(sr)
    listed = {t.split(", ")[1]: t for t in f["NOT-SCORED"]}
    assert len(listed) == 7 and uids["axial"] in f["SCORED"][0]
    for kind, why in REASONS.items():
        assert listed[uids[kind]].endswith(f": {why}"), kind
    assert len(pacs.series_of(uids["study"], "SR")) == 1  # one answer for the whole study


@pytest.mark.skipif(not REAL, reason="the real series in ../shared are absent")
def test_a_late_instance_rescores_its_series(node, pacs, predictor):
    """A series scored and delivered, then one more of its instances: the series is scored again with all of them
    (the earlier ones from done/), and a second report covering every instance says what the Predictor says of
    the whole series."""
    files = list(series_files(RSNA_SAMPLE / "stage_2_train_images").values())[2]
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    assert send(node.port, [rsna(f) for f in files[:-1]]) == [0] * (len(files) - 1)
    wait_for(results_in(pacs, study), 120, "the first report", node.log)
    assert send(node.port, [rsna(files[-1])]) == [0]
    srs, _, _ = wait_for(results_in(pacs, study, n_sr=2), 120, "the second report", node.log)
    reports = [sr for s in srs for sr in pacs.instances(s)]
    evidence = [{str(r.ReferencedSOPInstanceUID) for r in sr.CurrentRequestedProcedureEvidenceSequence[0]
                 .ReferencedSeriesSequence[0].ReferencedSOPSequence} for sr in reports]
    table, by_uid = expected(predictor, files)
    assert sorted(map(len, evidence)) == [len(files) - 1, len(files)]
    whole = reports[[len(e) for e in evidence].index(len(files))]
    assert evidence[[len(e) for e in evidence].index(len(files))] == set(by_uid)
    assert sr_findings(whole)["types"]["any"]["max"] == pytest.approx(table["any"].max(), abs=1e-5)


@pytest.mark.skipif(not REAL, reason="the real series in ../shared are absent")
def test_results_wait_while_the_pacs_is_down(node, pacs, predictor):
    files = list(series_files(RSNA_SAMPLE / "stage_2_train_images").values())[1]
    pacs.stop()
    try:
        assert send(node.port, [rsna(f) for f in files]) == [0] * len(files)
        wait_for(lambda: node.text().count("not delivered:") >= 2, 120, "two failed deliveries", node.log)
        assert list((node.spool / "outbox").glob("*/*.dcm"))
    finally:
        pacs.start()
    check_results(pacs, predictor, node, files)
    wait_for(lambda: not list((node.spool / "outbox").glob("*/*.dcm")), 30, "the outbox to empty", node.log)
    assert "attempt 2, next in 1 s" in node.text()
