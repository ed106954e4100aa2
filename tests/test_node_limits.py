"""The DICOM node under attack and fault, on loopback: `python -m src.serve.node` in its own process, attacked by raw
sockets and pynetdicom from other loopback addresses (127.0.0.2 and up: the per-address limits see them as other
peers) while a legitimate peer (TESTSCU on 127.0.0.1) keeps sending. Each attack checks, while it runs, that the
legitimate peer is served, that the node's resident memory (its /proc status) and threads stay under a bound, and,
after it, that nothing is left behind (no temporary file, no connection slot held, the node still up); and that the
node logged whom it refused and why. The node's spool is on a small tmpfs the module mounts, so that the last
tests can fill its disk for real.

The limits are the node's flags, set small here so that each attack takes seconds: --association-timeout and
--network-timeout 2 s, --max-associations 30, --max-associations-per-peer 20, and small data limits.

The limits on data (--max-association-mb, --max-association-instances, --max-study-mb), the disk floor driven
in-process (the unit test that stands in where no tmpfs can be mounted) and --keep-hours pruning are here too.

    .venv/bin/python -m pytest -q tests/test_node_limits.py
"""
from __future__ import annotations

import copy
import io
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from .test_node import NodeProcess, free_port, wait_for
from .test_node import send as node_send

pytestmark = pytest.mark.xdist_group("node")  # beside test_node.py's node, one at a time: both are heavy
ASSOC_S = 2.0                         # the node's --association-timeout and --network-timeout here
MAX_ALL, MAX_PEER = 30, 20            # its --max-associations and --max-associations-per-peer
FLOOR_MB = 1                          # its --min-free-mb
FLAGS = ["--allowed-callers", "TESTSCU", "--association-timeout", str(ASSOC_S), "--network-timeout", str(ASSOC_S),
         "--max-associations", str(MAX_ALL), "--max-associations-per-peer", str(MAX_PEER), "--max-instance-mb", "1",
         "--max-association-mb", "3", "--max-association-instances", "8", "--max-study-mb", "2",
         "--min-free-mb", str(FLOOR_MB), "--retry-first", "60", "--retry-max", "60"]
MB = 1 << 20
RSS_BOUND = 64 * MB                   # what an attack may add to the node's resident memory


# ---------------------------------------------------------------- DICOM objects and PDUs
def study_of(series: str) -> str:
    """The study of a test series: each its own (the node groups instances by study, and its limits are a study's)."""
    return generate_uid(entropy_srcs=[series])


def study_key(series: str) -> str:
    from src.serve.node import key
    return key(study_of(series))


def ct(series: str, rows: int = 64, study: str | None = None, seed: int = 0) -> Dataset:
    """Slice `seed` of an axial CT series the node keeps and the selector scores (five or more of them): plausible HU
    noise (the header checks and the decoder's plausibility rule pass), a 256 mm field of view, slices 1 mm apart."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality, ds.PatientID = CTImageStorage, generate_uid(), "CT", "ATTACK"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study or study_of(series), series
    ds.Rows = ds.Columns = rows
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 16, 16, 15, 1, 1
    ds.PhotometricInterpretation, ds.RescaleSlope, ds.RescaleIntercept = "MONOCHROME2", 1, -1024
    ds.ImagePositionPatient, ds.PixelSpacing = [0, 0, seed], [256 / rows, 256 / rows]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelData = np.random.default_rng(seed).integers(0, 2000, (rows, rows), dtype=np.int16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = CTImageStorage, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def mr(series: str) -> Dataset:
    ds = ct(series, rows=512)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.Modality = "MR"
    return ds


def nested_file(path: Path, depth: int) -> Path:
    """A CT file whose header holds a private sequence nested `depth` deep (undefined lengths), before the series
    UID: reading its header recurses `depth` times."""
    ds = ct(generate_uid())
    head, tail = Dataset(), Dataset()
    for el in ds:
        (head if el.tag.group < 9 else tail).add(el)
    head.file_meta = ds.file_meta
    a = io.BytesIO()
    pydicom.dcmwrite(a, head, enforce_file_format=True)
    sq = struct.pack("<HH2sHI", 0x0009, 0x1010, b"SQ", 0, 0xFFFFFFFF) + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    end = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    path.write_bytes(a.getvalue() + sq * depth + end * depth + dataset_bytes(tail))
    return path


def dataset_bytes(ds: Dataset) -> bytes:
    b = DicomBytesIO()
    b.is_little_endian, b.is_implicit_VR = True, False
    write_dataset(b, ds)
    return b.getvalue()


def association_request(calling: str = "TESTSCU") -> bytes:
    """The bytes of an A-ASSOCIATE-RQ from `calling` to ICH (Verification and CT Image Storage), by pynetdicom's
    own encoder."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, ImplementationClassUIDNotification, MaximumLengthNotification
    from pynetdicom.presentation import build_context
    from pynetdicom.sop_class import Verification
    from pynetdicom.transport import AddressInformation
    p = A_ASSOCIATE()
    p.calling_ae_title, p.called_ae_title, p.application_context_name = calling, "ICH", "1.2.840.10008.3.1.1.1"
    ml, ic = MaximumLengthNotification(), ImplementationClassUIDNotification()
    ml.maximum_length_received, ic.implementation_class_uid = 16384, "1.2.826.0.1.3680043.9.7433"
    p.user_information = [ml, ic]
    cxs = [build_context(Verification), build_context(CTImageStorage, ExplicitVRLittleEndian)]
    for i, cx in enumerate(cxs):
        cx.context_id = 2 * i + 1
    p.presentation_context_definition_list = cxs
    p.calling_presentation_address = AddressInformation("127.0.0.1", 0)
    p.called_presentation_address = AddressInformation("127.0.0.1", 11112)
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(p)
    return pdu.encode()


def pdu_header(kind: int, length: int) -> bytes:
    return struct.pack(">BBL", kind, 0, length)


# ---------------------------------------------------------------- peers
def raw(node, source: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", node.port), timeout=10, source_address=(source, 0))


def closed(s: socket.socket, within: float) -> bytes | None:
    """What the node sent before closing the connection, once it has closed it within `within` seconds (None: still
    open). Reads only: a peer that trickles keeps its own sending to itself."""
    got, end = b"", time.monotonic() + within
    while time.monotonic() < end:
        s.settimeout(max(0.001, min(0.2, end - time.monotonic())))
        try:
            data = s.recv(4096)
        except TimeoutError:
            continue
        except OSError:
            return got
        if not data:
            return got
        got += data
        end = max(end, time.monotonic() + 1.0)  # an answer came: its close follows
    return None


def associate(node, calling="TESTSCU", source="127.0.0.1"):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = 20
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    return ae.associate("127.0.0.1", node.port, ae_title="ICH", bind_address=(source, 0))


def send(node, datasets, source="127.0.0.1", contexts=(CTImageStorage,), wait: float = 20) -> list[int | None]:
    """C-STORE datasets in one association from TESTSCU at `source` (Explicit VR Little Endian); their statuses
    (None: no answer within `wait` seconds; pynetdicom waits that long for an answer even once the association is
    aborted)."""
    return node_send(node.port, datasets, contexts=contexts, source=source, wait=wait,
                     syntaxes=(ExplicitVRLittleEndian,))


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS (bytes) and Threads of a process, from /proc."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k == "VmRSS":
            out["rss"] = int(v.split()[0]) * 1024
        elif k == "Threads":
            out["threads"] = int(v)
    return out


class Watch:
    """While an attack runs: the legitimate peer (TESTSCU at 127.0.0.1) sends a C-ECHO and a C-STORE (the same
    instance each time: counted once) every 0.3 s, each must succeed; the node's RSS and threads are sampled."""

    def __init__(self, node, legit: Dataset):
        self.node, self.legit, self.stop = node, legit, threading.Event()
        self.served, self.failures, self.peak = 0, [], {}
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.base = proc_status(self.node.proc.pid)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(60)

    def _run(self):
        while not self.stop.is_set():
            for k, v in proc_status(self.node.proc.pid).items():
                self.peak[k] = max(self.peak.get(k, 0), v)
            t0 = time.monotonic()
            assoc = associate(self.node)
            if not assoc.is_established:
                self.failures.append(f"not associated after {time.monotonic() - t0:.1f} s")
            else:
                echo, store = assoc.send_c_echo(), assoc.send_c_store(self.legit)
                ok = echo and echo.Status == 0 and store and store.Status == 0
                assoc.release()
                self.served += bool(ok)
                if not ok:
                    self.failures.append(f"echo {echo}, store {store}")
            self.stop.wait(0.3)

    def check(self, min_served: int = 2) -> None:
        """The legitimate peer was served every time (at least `min_served` times since the attack began), memory
        and threads stayed bounded, no slot is left held."""
        end = time.monotonic() + 30
        while self.served + len(self.failures) < min_served and time.monotonic() < end:
            time.sleep(0.1)
        self.__exit__()
        assert self.failures == [] and self.served >= min_served, (self.served, self.failures)
        grew = self.peak["rss"] - self.base["rss"]
        assert grew < RSS_BOUND, f"the node's RSS grew by {grew / MB:.0f} MB"
        assert self.peak["threads"] <= self.base["threads"] + 3 * (MAX_ALL + MAX_PEER) + 4, self.peak
        wait_for(lambda: proc_status(self.node.proc.pid)["threads"] <= self.base["threads"], 3 * ASSOC_S + 5,
                 "the node's connection threads to end", self.node.log)
        assert self.node.proc.poll() is None and not list((self.node.spool / "tmp").iterdir())


def log_after(node, mark: int) -> str:
    return node.text()[mark:]


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    """A 24 MB tmpfs for the node's spool (CI runs as root); None where mounting is not allowed."""
    path = tmp_path_factory.mktemp("tmpfs")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(path)], capture_output=True, text=True)
    yield path if r.returncode == 0 else None
    if r.returncode == 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture(scope="module")
def node(trained_run, disk, tmp_path_factory):
    root = disk if disk is not None else tmp_path_factory.mktemp("spool_disk")
    n = NodeProcess(trained_run, root / "spool", f"127.0.0.1:{free_port()}:NOBODY", free_port(), FLAGS)
    n.start(study_timeout=1.0)
    series = generate_uid()
    legit = [ct(series, seed=i) for i in range(5)]
    n.legit = legit[0]
    assert send(n, legit) == [0] * 5  # its study is scored once, before any attack: later copies count once
    wait_for(lambda: f"study {study_key(series)} scored" in n.text(), 120, "the legitimate study", n.log)
    yield n
    if n.proc.poll() is None:
        n.stop()


# ---------------------------------------------------------------- transport
def test_trickled_association_requests_are_dropped_at_the_deadline(node):
    """25 connections from one address, each 46 bytes of an A-ASSOCIATE-RQ then a byte every 0.4 s: 20 (the
    per-peer limit) wait, 5 are rejected at once; all 20 are closed at --association-timeout although they go on
    trickling; meanwhile the legitimate peer is served."""
    rq, mark = association_request(), len(node.text())
    with Watch(node, node.legit) as watch:
        conns = [raw(node, "127.0.0.2") for _ in range(25)]
        for c in conns:
            c.sendall(rq[:46])
        t0, closed_at, sent = time.monotonic(), {}, 46
        while time.monotonic() - t0 < ASSOC_S + 3 and len(closed_at) < 25:
            for i, c in enumerate(conns):
                if i not in closed_at and closed(c, 0.01) is not None:
                    closed_at[i] = time.monotonic() - t0
            for i, c in enumerate(conns):
                if i not in closed_at:
                    c.send(rq[sent:sent + 1])
            sent += 1
            time.sleep(0.4)
        watch.check()
    times = sorted(closed_at.values())
    assert len(times) == 25 and times[25 - MAX_PEER - 1] < 0.5 and ASSOC_S - 0.3 < times[25 - MAX_PEER], \
        (times, log_after(node, mark)[-3000:])
    assert sent < len(rq)             # still trickling when they were closed
    log = log_after(node, mark)
    assert log.count("refused: an association request (A-ASSOCIATE-RQ) not received whole within 2 s") == MAX_PEER
    assert log.count(f"refused: {MAX_PEER} connections from 127.0.0.2 open, its limit (--max-associations-per-peer "
                     f"{MAX_PEER})") == 25 - MAX_PEER
    assert "connection from 127.0.0.2:" in log


def test_an_unlisted_caller_cannot_shut_out_a_listed_one(node):
    """11 trickling connections and 11 whole association requests from a caller not in --allowed-callers: the
    requests are rejected with the reason, the trickles dropped at the deadline, the listed caller served."""
    mark = len(node.text())
    with Watch(node, node.legit) as watch:
        trickles = [raw(node, "127.0.0.3") for _ in range(11)]
        for c in trickles:
            c.sendall(association_request("STRANGER")[:46])
        rejected = [associate(node, "STRANGER", "127.0.0.3").is_rejected for _ in range(5)]
        assert all(closed(c, ASSOC_S + 3) is not None for c in trickles)
        watch.check()
    assert rejected == [True] * 5
    log = log_after(node, mark)
    assert log.count("association from STRANGER (127.0.0.3:") == 5
    assert log.count("refused: calling AE title 'STRANGER' is not in --allowed-callers") == 5


def test_idle_connections_are_capped_per_address_and_closed(node):
    """200 idle TCP connections from one address: 20 held until --association-timeout, 180 rejected at once;
    threads stay bounded and the legitimate peer is served."""
    mark = len(node.text())
    with Watch(node, node.legit) as watch:
        conns = [raw(node, "127.0.0.4") for _ in range(200)]
        answers = [closed(c, ASSOC_S + 3) for c in conns]
        watch.check()
    rj = bytes.fromhex("03000000000400020302")  # A-ASSOCIATE-RJ: transient, provider (presentation), local limit
    assert sum(a == rj for a in answers) == 200 - MAX_PEER and sum(a == b"" for a in answers) == MAX_PEER
    log = log_after(node, mark)
    assert log.count("connection from 127.0.0.4:") == 200
    assert log.count(f"refused: no association request within {ASSOC_S:g} s") == MAX_PEER


def test_many_addresses_fill_the_node_but_not_for_its_known_peer(node):
    """Idle connections from 3 addresses (20 + 20 + 20) fill the node's --max-associations (30): the rest are
    rejected naming that limit; the legitimate peer, known from earlier associations, is served from its reserve."""
    mark = len(node.text())
    with Watch(node, node.legit) as watch:
        conns = [raw(node, f"127.0.0.{5 + i // MAX_PEER}") for i in range(3 * MAX_PEER)]
        answers = [closed(c, ASSOC_S + 3) for c in conns]
        watch.check()
    held, rejected = sum(a == b"" for a in answers), sum(bool(a) for a in answers)
    assert held in (MAX_ALL - 1, MAX_ALL)  # less the legitimate peer's connection when it was open at that moment
    assert held + rejected == 3 * MAX_PEER
    assert log_after(node, mark).count(f"connections open, the node's limit (--max-associations {MAX_ALL})") \
        == rejected
    assert not associate(node, "TESTSCU", "127.0.0.9").is_rejected  # slots free again


def test_parallel_associations_up_to_the_documented_limit(node):
    """20 associations at once from one peer are all accepted (pynetdicom's default refused half of them); one more
    is rejected with the setting to raise."""
    import threading
    mark = len(node.text())
    assocs, done = [], threading.Event()

    def keep_alive():  # the node drops an association idle for --network-timeout (2 s here): opening 20 one after
        while not done.wait(0.2):  # another can take longer on a loaded machine, so each open one is echoed
            for a in list(assocs):
                if a.is_established:
                    a.send_c_echo()
    with Watch(node, node.legit) as watch:
        pinger = threading.Thread(target=keep_alive, daemon=True)
        pinger.start()
        for _ in range(MAX_PEER):
            assocs.append(associate(node, "TESTSCU", "127.0.0.10"))
        extra = associate(node, "TESTSCU", "127.0.0.10")
        done.set()
        pinger.join()
        echoes = [a.send_c_echo().Status if a.is_established else None for a in assocs]
        for a in assocs:
            a.release()
        watch.check()
    assert echoes == [0] * MAX_PEER and extra.is_rejected
    assert f"127.0.0.10 open, its limit (--max-associations-per-peer {MAX_PEER})" in log_after(node, mark)


def test_a_pdu_declaring_a_gigabyte_is_refused_from_its_header(node):
    """A P-DATA-TF header declaring 1 GB inside an association, then three A-ASSOCIATE-RQ headers declaring 1 GB
    from callers that never associated, each followed by data as fast as the socket takes it: each connection is
    closed at its header, the node's memory does not grow."""
    mark = len(node.text())
    with Watch(node, node.legit) as watch:
        c = raw(node, "127.0.0.11")
        c.sendall(association_request())
        assert c.recv(6)[0] == 0x02   # A-ASSOCIATE-AC: associated
        for i in range(4):
            if i:
                c = raw(node, "127.0.0.11")
            c.sendall(pdu_header(0x04 if i == 0 else 0x01, 1 << 30))
            sent, chunk = 0, b"\0" * (1 << 20)
            try:
                while sent < 256 * MB:
                    c.sendall(chunk)
                    sent += len(chunk)
            except OSError:
                pass
            assert sent < 32 * MB, f"the node read {sent / MB:.0f} MB of a PDU over its maximum"
            c.close()
        watch.check()
    log = log_after(node, mark)
    assert log.count("refused: a P-DATA-TF PDU declaring 1,073,741,824 bytes, over the 16,384-byte maximum") == 1
    assert log.count("refused: a type 0x01 PDU declaring 1,073,741,824 bytes, over the 262,144-byte maximum") == 3


def test_a_pdu_trickled_inside_an_association_is_dropped(node):
    """Associated, then a P-DATA-TF of 1000 bytes sent one byte every 0.25 s: closed at --network-timeout from its
    first byte, although bytes keep coming."""
    mark = len(node.text())
    with Watch(node, node.legit) as watch:
        c = raw(node, "127.0.0.12")
        c.sendall(association_request())
        assert c.recv(6)[0] == 0x02
        c.sendall(pdu_header(0x04, 1000))
        t0, got = time.monotonic(), None
        while got is None and time.monotonic() - t0 < ASSOC_S + 3:
            try:
                c.send(b"\0")
            except OSError:
                break
            got = closed(c, 0.25)
        watch.check()
    assert ASSOC_S - 0.5 < time.monotonic() - t0 < ASSOC_S + 3
    assert "127.0.0.12:" in log_after(node, mark) and "refused: a PDU not received whole within 2 s" in log_after(
        node, mark)


# ---------------------------------------------------------------- data limits (issue 32: each untested before)
def test_an_association_over_its_megabytes_is_aborted(node):
    """--max-association-mb 3: eight 0.5 MB instances (MR images: each valid, stored, not scored) in one association;
    the association is aborted while the one that passes 3 MB streams."""
    mark, images = len(node.text()), [mr(generate_uid()) for _ in range(8)]
    size = len(dataset_bytes(images[0]))  # what the association carries of each (the data set, no file meta)
    fit = 3 * MB // size              # instances carried whole before the limit
    statuses = send(node, images, contexts=(MRImageStorage,), wait=2)
    assert fit == 5 and statuses == [0] * fit + [None] * (8 - fit)
    assert "aborted: over 3 MB in one association" in log_after(node, mark)


def test_instances_over_the_association_count_are_refused(node):
    """--max-association-instances 8: the ninth instance of one association is refused with 0xA700."""
    mark = len(node.text())
    assert send(node, [node.legit] * 9) == [0] * 8 + [0xA700]
    assert "refused: over 8 instances in one association" in log_after(node, mark)


def test_a_study_over_its_megabytes_is_refused_and_not_scored(node):
    """--max-study-mb 2: of five 0.5 MB slices of one study three fit (with their headers), the rest are refused
    with 0xA700, and the study is set aside unscored."""
    series, mark = generate_uid(), len(node.text())
    assert send(node, [ct(series, rows=512, seed=i) for i in range(5)]) == [0, 0, 0, 0xA700, 0xA700]
    study = study_key(series)
    wait_for(lambda: f"study {study} not scored: study {study} over its limit" in node.text(), 30,
             "the study to be set aside", node.log)
    assert f"study {study} complete" not in log_after(node, mark)
    [reason] = (node.spool / "failed").glob(f"{study}-*/reason.txt")
    assert "over its limit (10000 instances, 2 MB)" in reason.read_text()


def test_a_deeply_nested_header_is_refused_and_leaves_no_file(node, tmp_path):
    """Five instances whose header nests a sequence 5,000 deep (the reader recurses out): each refused with 0xC000,
    nothing of them left in the spool."""
    from pynetdicom import _config
    files = [nested_file(tmp_path / f"deep{i}.dcm", 5000) for i in range(5)]
    mark, before = len(node.text()), set(node.spool.rglob("*"))
    _config.STORE_SEND_CHUNKED_DATASET = True  # the file's bytes as they are (pydicom could not encode them either)
    try:
        statuses = send(node, files)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    assert statuses == [0xC000] * 5
    assert log_after(node, mark).count("refused: unreadable (RecursionError") == 5
    after = {p for p in set(node.spool.rglob("*")) - before if p.name != "node.log"}
    assert after == set() and not list((node.spool / "tmp").iterdir())


# ---------------------------------------------------------------- the disk (the last tests: they fill it)
def fill(disk: Path, leave: int) -> Path:
    """A ballast file on the tmpfs leaving `leave` bytes free (to a page)."""
    ballast = disk / "ballast"
    ballast.unlink(missing_ok=True)
    free = shutil.disk_usage(disk).free
    with open(ballast, "wb") as f:
        f.truncate(0)
        f.write(b"\0" * max(0, free - leave))
    return ballast


def test_below_the_floor_instances_wait_with_0xa700(node, disk):
    """The spool's disk is left 0.55 MB above --min-free-mb: of eight 0.13 MB slices of a series four fit (each
    takes 33 pages of 4 KB), the rest get 0xA700 (retry later), logged once; the node keeps serving (a copy of a kept instance needs no space). Space
    comes back: the series, still without four of its slices, is not scored; the sender retries them: it is scored
    whole."""
    if disk is None:
        pytest.skip("mounting a tmpfs is not allowed here (CI runs as root); test_the_disk_floor_in_process covers "
                    "the free-space check")
    series, mark = generate_uid(), len(node.text())
    study = study_key(series)
    slices = [ct(series, rows=256, seed=i) for i in range(8)]
    ballast = fill(disk, FLOOR_MB * MB + int(0.55 * MB))
    try:
        with Watch(node, node.legit) as watch:
            assert send(node, slices) == [0] * 4 + [0xA700] * 4
            assert send(node, slices[4:]) == [0xA700] * 4   # still no space: refused again, not logged again
            watch.check()
        log = log_after(node, mark)
        assert log.count("disk: the spool's disk has") == 1 and "4 refused (4 for lack of space)" in log
        assert len((node.spool / "incoming" / study / "missing.txt").read_text().split()) == 1 + 4
    finally:
        ballast.unlink()
    wait_for(lambda: "MB free again; receiving and scoring resume" in log_after(node, mark), 10, "space to return",
             node.log)
    time.sleep(2.5)                   # past --study-timeout with space: the series still waits for its four
    assert f"study {study} complete" not in log_after(node, mark)
    assert send(node, slices[4:]) == [0] * 4
    wait_for(lambda: f"study {study} scored" in node.text(), 60, "the whole study to be scored", node.log)
    log = log_after(node, mark)
    assert log.count("MB free again") == 1 and f"study {study} complete: 8 instance(s)" in log
    assert not (node.spool / "done" / study / "missing.txt").exists()
    assert not list(node.spool.rglob("*.tmp")) and not any(f.stat().st_size == 0 for f in node.spool.rglob("*.dcm"))


def test_results_that_cannot_be_written_wait_and_a_restart_does_not_crash_loop(node, disk):
    """The disk fills while a series is scored (free above the floor, less than its results): the results are not
    written, the series stays in work/, the node stays up. Killed and restarted on the full disk, it tries again
    and stays up (no crash loop). Space comes back: the results are written at once."""
    if disk is None:
        pytest.skip("mounting a tmpfs is not allowed here (CI runs as root); test_disk_floor_unit covers the check")
    series, mark = generate_uid(), len(node.text())
    study = study_key(series)
    assert send(node, [ct(series, rows=256, seed=i) for i in range(5)]) == [0] * 5
    ballast = fill(disk, FLOOR_MB * MB + int(0.2 * MB))   # above the floor; the results need 1.8 MB
    try:
        wait_for(lambda: f"study {study}: OSError: [Errno 28] No space left on device" in node.text(), 60,
                 "the results to fail for lack of space", node.log)
        assert (node.spool / "work" / study).is_dir() and not list((node.spool / "outbox").glob(f"{study}-*"))
        node.kill9()
        node.start(study_timeout=1.0)
        wait_for(lambda: log_after(node, mark).count(f"study {study}: OSError: [Errno 28]") == 2, 60,
                 "the restarted node to try again", node.log)
        time.sleep(2)
        assert node.proc.poll() is None and associate(node).send_c_echo().Status == 0
        assert not list(node.spool.rglob(".*.tmp")) and not list((node.spool / "tmp").iterdir())
    finally:
        ballast.unlink()
    wait_for(lambda: list((node.spool / "outbox").glob(f"{study}-*/summary.json")), 60, "the results", node.log)
    assert "Traceback" not in (node.spool.parent / "node.stderr").read_text()


# ---------------------------------------------------------------- in process: the free-space check, pruning
def spool_in(tmp_path, floor_mb: float, free: list[int]):
    """A Spool on tmp_path whose disk reports free[0] bytes free (the test moves it), and its log lines."""
    import logging

    from src.serve.node import Limits, Spool
    class Lines(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())
    lines, log = [], logging.getLogger(f"test.spool.{tmp_path.name}")
    log.handlers[:] = [Lines()]
    log.setLevel(logging.INFO)
    sp = Spool(tmp_path / "spool", Limits(1 * MB, 3 * MB, 8, 100, 2 * MB, int(floor_mb * MB)), log)
    sp.disk.free = lambda: free[0]
    return sp, lines


def encoded(ds: Dataset) -> bytes:
    b = io.BytesIO()
    pydicom.dcmwrite(b, ds, enforce_file_format=True)
    return b.getvalue()


def test_the_disk_floor_in_process(tmp_path):
    """The free-space check without a small disk: with the floor's bytes and one instance free, it is kept; with
    less, 0xA700, its series waits for it, logged once however many are refused, a kept one's copy still counts
    once; kept refusing until the floor and one largest instance fit again, then logged once more."""
    from src.serve.node import OUT_OF_RESOURCES
    free = [10 * MB]
    sp, lines = spool_in(tmp_path, 3, free)
    series = generate_uid()
    study = study_key(series)
    a, b, c = (encoded(ct(series, seed=i)) for i in range(3))
    assert sp.receive(a, CTImageStorage)[0] == 0
    free[0] = 3 * MB + len(b) - 1
    assert [sp.receive(x, CTImageStorage)[0] for x in (b, c, b)] == [OUT_OF_RESOURCES] * 3
    assert sp.receive(a, CTImageStorage) == (0, f"duplicate of {study}/{pydicom.dcmread(io.BytesIO(a)).SOPInstanceUID}"
                                                ".dcm: counted once")
    assert [ln.startswith("disk: the spool's disk has") for ln in lines] == [True]
    assert len(sp.missing[study][1]) == 2 and sp.ready(0, hold=3600) == []  # it waits for them
    free[0] = 3 * MB + len(b)         # enough for b, not yet the floor and the largest instance (1 MB)
    assert sp.receive(b, CTImageStorage)[0] == OUT_OF_RESOURCES and len(lines) == 1
    free[0] = 4 * MB
    assert [sp.receive(x, CTImageStorage)[0] for x in (b, c)] == [0, 0]
    assert len(lines) == 2 and "free again" in lines[1] and study not in sp.missing
    assert sp.ready(0, hold=3600) == [study] and not list((sp.root / "tmp").iterdir())


def test_writes_that_fail_leave_no_file_and_answer_0xa700(tmp_path, monkeypatch):
    """A write of the spool failing for space (ENOSPC) answers 0xA700 and leaves no temporary file, and neither does
    an instance whose reading fails in an unforeseen way (here RecursionError)."""
    import errno

    import src.serve.node as N
    sp, lines = spool_in(tmp_path, 0, [100 * MB])

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(N.os, "fsync", full)
    assert sp.receive(encoded(ct(generate_uid())), CTImageStorage)[0] == N.OUT_OF_RESOURCES
    monkeypatch.undo()
    assert "an instance could not be written (No space left on device)" in lines[0]
    assert not list((sp.root / "tmp").iterdir())
    monkeypatch.setattr(N, "read_dicom", lambda *a, **k: (_ for _ in ()).throw(RecursionError("deep")))
    sp.disk.is_low = False
    with pytest.raises(RecursionError):
        sp.receive(encoded(ct(generate_uid())), CTImageStorage)
    assert not list((sp.root / "tmp").iterdir())


def test_keep_hours_prunes_what_is_older(tmp_path):
    """A node with --keep-hours 0.001 (3.6 s; pruned every quarter of it) removes scored instances, delivered
    results and failed series older than that, and keeps younger ones."""
    import logging

    from src.serve.node import Node, NodeConfig
    spool = tmp_path / "spool"
    old, young = time.time() - 3600, time.time()
    for kind in ("done", "sent", "failed"):
        for name, t in (("old", old), ("young", young)):
            d = spool / kind / name
            d.mkdir(parents=True)
            (d / "x.dcm").write_bytes(b"x")
            os.utime(d, (t, t))
    cfg = NodeConfig(run="unused", send_to=f"127.0.0.1:{free_port()}:NOBODY", port=free_port(), spool_dir=str(spool),
                     keep_hours=0.001, min_free_mb=0)
    node = Node(cfg, None, logging.getLogger("test.prune"))
    t = threading.Thread(target=node.serve, daemon=True)
    t.start()
    try:
        wait_for(lambda: not any((spool / k / "old").exists() for k in ("done", "sent", "failed")), 10,
                 "the old folders to be pruned")
        assert all((spool / k / "young" / "x.dcm").exists() for k in ("done", "sent", "failed"))
        assert "old" not in node.spool.counts and "young" in node.spool.counts
    finally:
        node.stop.set()
        t.join(30)


# ---------------------------------------------------------------- an attack run's findings (2026-12-07)
def request_with(contexts: int = 2, syntaxes_per_context: int = 1) -> bytes:
    """association_request() with its CT Image Storage context repeated to `contexts` contexts, each proposing
    `syntaxes_per_context` transfer syntaxes (Explicit VR Little Endian repeated): the PDU pynetdicom's encoder will
    not write past 128 contexts, built here from its bytes."""
    base = association_request()
    body = bytearray(base[6:])
    pos, items = 68, []
    while pos < len(body):
        n = int.from_bytes(body[pos + 2:pos + 4], "big")
        items.append(bytes(body[pos:pos + 4 + n]))
        pos += 4 + n
    app, verification, ct, user = items[0], items[1], items[2], items[3]
    subs, sub = [], 8                 # the CT context's sub-items: abstract syntax, transfer syntax
    while sub < len(ct):
        n = int.from_bytes(ct[sub + 2:sub + 4], "big")
        subs.append(ct[sub:sub + 4 + n])
        sub += 4 + n
    value = ct[4:8] + subs[0] + subs[1] * syntaxes_per_context
    ct = bytes([0x20, 0]) + len(value).to_bytes(2, "big") + value
    out = bytes(body[:68]) + app + verification + ct * (contexts - 1) + user
    return bytes([0x01, 0]) + len(out).to_bytes(4, "big") + out


def test_association_requests_proposing_more_than_a_sender_needs_are_refused_before_negotiation(node):
    """3,000 presentation contexts in 180 KB (under the 256 KB request limit; each cost half a CPU-second to
    negotiate) and 4 contexts of 600 transfer syntaxes (and Verification's): each answered A-ASSOCIATE-RJ at once, with the reason; the
    standard's most, 128 contexts, is accepted. Sent over and over from 8 connections meanwhile, they leave the
    legitimate peer served."""
    mark = len(node.text())
    from pynetdicom.presentation import build_context
    from pynetdicom.sop_class import Verification
    many, wide, most = request_with(3000), request_with(5, 600), request_with(128, 2)
    wide_syntaxes = len(build_context(Verification).transfer_syntax) + 4 * 600  # Verification's, then 4 x 600
    assert 150_000 < len(many) < 256 << 10
    c = raw(node, "127.0.0.13")
    c.sendall(most)
    assert c.recv(6)[0] == 0x02       # A-ASSOCIATE-AC
    c.close()
    stop = threading.Event()

    def flood(source):
        while not stop.is_set():
            try:
                s = raw(node, source)
                s.sendall(many)
                closed(s, 2)
                s.close()
            except OSError:
                pass
    with Watch(node, node.legit) as watch:
        for request, why in ((many, "proposing 3,000 presentation contexts, over the standard's 128"),
                             (wide, f"proposing {wide_syntaxes:,} transfer syntaxes, over 2,048")):
            c = raw(node, "127.0.0.13")
            c.sendall(request)
            answer = closed(c, 5)
            assert answer is not None and answer[:1] == b"\x03", answer  # A-ASSOCIATE-RJ, then the close
        floods = [threading.Thread(target=flood, args=(f"127.0.0.{20 + i % 4}",), daemon=True) for i in range(8)]
        for t in floods:
            t.start()
        time.sleep(4)                 # the legitimate peer is served throughout (strangers fill the node, it has a
        stop.set()                    # reserve), then the floods stop and their connections end
        for t in floods:
            t.join(10)
        watch.check(min_served=3)
    log = log_after(node, mark)
    assert "127.0.0.13:" in log and "refused: an A-ASSOCIATE-RQ proposing 3,000 presentation contexts, over the " \
        "standard's 128" in log and f"refused: an A-ASSOCIATE-RQ proposing {wide_syntaxes:,} transfer syntaxes, over " \
        "2,048" in log


def test_a_command_set_that_never_ends_is_aborted_at_its_bound(node):
    """Associated, then P-DATA-TF PDUs of command fragments that never say "last" (pynetdicom keeps them in memory):
    aborted once they pass 64 KB, logged with the peer; the node's memory does not grow."""
    mark = len(node.text())
    with Watch(node, node.legit) as watch:
        c = raw(node, "127.0.0.14")
        c.sendall(association_request())
        assert c.recv(6)[0] == 0x02
        fragment = b"\x00" * 16000
        pdv = (len(fragment) + 2).to_bytes(4, "big") + bytes([1, 0x01]) + fragment  # context 1, command, not last
        pdu = pdu_header(0x04, len(pdv)) + pdv
        sent = 0
        try:
            while sent < 64 * MB:     # after the abort pynetdicom reads and drops what still comes, until its close
                c.sendall(pdu)
                sent += len(fragment)
        except OSError:
            pass
        assert closed(c, ASSOC_S + 5) is not None, "the connection is still open"
        c.close()
        watch.check()
    assert "association from TESTSCU (127.0.0.14:" in log_after(node, mark) and \
        "aborted: a command set over 64 KB" in log_after(node, mark)


def test_a_message_pynetdicom_cannot_read_is_one_line_naming_the_peer(node):
    """Associated, then a PDV of one byte (pynetdicom's reader raises IndexError on it): one line in node.log naming
    the peer, no traceback; a request that is not one (garbage after a valid header) is a line too."""
    mark = len(node.text())
    stderr = node.spool.parent / "node.stderr"
    err_mark = stderr.stat().st_size
    c = raw(node, "127.0.0.15")
    c.sendall(association_request())
    assert c.recv(6)[0] == 0x02
    c.sendall(pdu_header(0x04, 5) + (1).to_bytes(4, "big") + b"\x01")
    closed(c, 5)
    c.close()
    g = raw(node, "127.0.0.16")
    g.sendall(pdu_header(0x01, 100) + b"\xff" * 100)
    closed(g, 5)
    g.close()
    wait_for(lambda: "127.0.0.16:" in log_after(node, mark), 10, "the malformed request's line", node.log)
    log = log_after(node, mark)
    assert "association from TESTSCU (127.0.0.15:" in log and "ended: a message pynetdicom could not read (" in log
    assert "refused: an association request that could not be read (malformed), or a peer that left first" in log
    assert "Traceback" not in stderr.read_bytes()[err_mark:].decode(errors="replace")


def test_values_a_peer_sent_cannot_write_a_line_of_their_own():
    """What a peer sends (a SeriesDescription, a UID) reaches node.log with its control characters escaped."""
    import logging

    from src.serve.node import OneLine
    record = logging.LogRecord("node", logging.INFO, "", 0, "series %s scored", ("HEAD\n2026 FORGED\r\x1b[2J",), None)
    assert OneLine().filter(record) and record.getMessage() == "series HEAD\\n2026 FORGED\\r\\x1b[2J scored"


def test_an_association_for_another_ae_title_is_rejected(node):
    mark = len(node.text())
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="NOT_THE_NODE")
    assert assoc.is_rejected
    wait_for(lambda: "the called AE title is not this node's --ae-title" in log_after(node, mark), 10,
             "the rejection's line", node.log)


def test_a_uid_with_a_line_break_does_not_forge_a_log_line(node):
    """Five slices whose SeriesInstanceUID holds a line break and a fake log line: stored and scored, and the node's
    log gives the UID on its own line, escaped (the attack run's forged line is not there)."""
    mark = len(node.text())
    series = generate_uid() + "\n2026-01-01 00:00:00,000 FORGED LINE"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns of the invalid UID: that is the attack
        assert send(node, [ct(series, study=generate_uid(), seed=i) for i in range(5)]) == [0] * 5
    wait_for(lambda: "\\n2026-01-01 00:00:00,000 FORGED LINE" in log_after(node, mark), 60, "the study's lines",
             node.log)
    assert not [line for line in log_after(node, mark).splitlines() if line.startswith("2026-01-01 00:00:00,000 FORGED")]


def test_the_log_is_rotated_so_it_cannot_fill_the_disk(tmp_path):
    """get_logger with max_bytes (the node's node.log: 20 MB): past it the file is rotated, five older ones kept."""
    from src.utils import get_logger
    log = get_logger("test.rotation", tmp_path / "node.log", max_bytes=2000)
    for i in range(400):
        log.info(f"connection from 127.0.0.{i % 250}:1 refused: a line of about sixty bytes {i}")
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["node.log", *(f"node.log.{i}" for i in range(1, 6))]
    assert all((tmp_path / f).stat().st_size <= 2000 for f in files)
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()


def test_a_copy_with_other_bytes_is_dropped_with_a_warning(node):
    """An instance sent again under its SOP Instance UID with other pixels: Success (the sender's job goes on), the
    first copy kept, and a warning that the copies differ; the same bytes again are a plain duplicate."""
    mark, first = len(node.text()), ct(generate_uid(), study=generate_uid(), seed=1)
    forged = copy.deepcopy(first)
    forged.PixelData = np.zeros((64, 64), np.int16).tobytes()
    assert send(node, [first, first, forged]) == [0, 0, 0]
    log = log_after(node, mark)
    assert log.count("with other bytes than the copy held: the first copy is kept, this one dropped") == 1
    assert log.count(": counted once") == 1
