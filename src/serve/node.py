"""A DICOM node beside a PACS: it receives head CT series over DICOM, scores them, and sends the results back as DICOM.

    python -m src.serve.node --run outputs/demo/bundles/resnet10t_128.ichbundle --send-to PACS_HOST:4242:ORTHANC
    python -m src.serve.node --run RUN --ae-title ICH --port 11112 --host 0.0.0.0 --allowed-callers ORTHANC --send-to ...

A Storage SCP (pynetdicom) under --ae-title on --host:--port (127.0.0.1 unless told otherwise; --allowed-callers
limits who may send) answers C-ECHO and takes CT images by C-STORE. Each instance is checked from its header before
it is kept (a CT Image of modality CT, not a localizer, with the series and instance UIDs, a matrix and a decoded
size a CT slice can have: `src.dicom.read_dicom` and `check_header`); what fails is refused with the reason, in the
C-STORE status and in the log. Kept instances are written atomically to the spool, one folder per series; an
instance already there counts once. A series is complete when none of its instances has come for
--series-timeout seconds: it is scored by the `Predictor` (`src.serve.results.analyse`: the run's preprocessing, folds,
stage 2 and blend; Grad-CAM of the most suspicious slices) and its results (`src.serve.dicom_out`: a Structured Report
and Secondary Capture images, in the source study) wait in the outbox until --send-to has accepted them by C-STORE,
retried with exponential backoff while it is down.

Spool (--spool-dir), every move between its folders one rename, so a node killed at any point and started again
finishes from it:
    incoming/<series>/   instances received, the series not yet quiet
    work/<series>/       the series being scored (round.txt names the scoring round)
    done/<series>/       instances scored (--keep-hours): a late instance of the series is scored with them;
                         the same instance again counts once
    failed/<series>-<time>/  series that gave no result, with reason.txt
    outbox/<series>-<round>/ results not yet delivered; sent/<...>/ delivered ones (--keep-hours)
    node.log             what came, what was refused and why, what was scored, what was delivered

Limits: one instance larger than --max-instance-mb, or an association carrying more than --max-association-mb,
aborts the association while it streams (nothing that large is held); instances beyond
--max-association-instances in one association are refused; a series beyond --max-series-instances or
--max-series-mb has the rest refused and is not scored (a partial series would be scored as if it were whole).

Research use, not a medical device: every report says so, and what the model was trained on, first.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import shutil
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, evt
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import Verification

from ..config import parse_config
from ..dicom import MAX_FILE_BYTES, DicomError, check_header, read_dicom
from ..utils import PipelineError, cli_main, get_logger, write_json

LOG = "node.log"
FOLDERS = ("tmp", "incoming", "work", "done", "failed", "outbox", "sent")
REFUSED = "refused.txt"               # in a series folder: why the series will not be scored
ROUND = "round.txt"
DELIVERED = {0x0000, 0x0001, 0xB000, 0xB006, 0xB007}  # C-STORE success and warning statuses
CANNOT_UNDERSTAND, OUT_OF_RESOURCES = 0xC000, 0xA700
MB = 1 << 20


@dataclass
class NodeConfig:
    run: str = ""                     # a run folder (its stage-2 runs come along) or a bundle (src.export)
    send_to: str = ""                 # where results go: HOST:PORT:AET of the PACS (its C-STORE SCP)
    ae_title: str = "ICH"             # this node's AE title (the PACS sends to it under this name)
    host: str = "127.0.0.1"           # address to listen on; 0.0.0.0 listens on every interface (trusted networks only)
    port: int = 11112                 # DICOM port to listen on
    allowed_callers: str = ""         # comma-separated calling AE titles accepted (empty: any caller)
    spool_dir: str = "node_spool"     # received instances, series being scored, results until delivered, node.log
    series_timeout: float = 30.0      # a series is complete when none of its instances came for this many seconds
    cam_slices: int = 4               # Grad-CAM images of this many most suspicious slices per series
    max_instance_mb: float = MAX_FILE_BYTES / MB  # a larger instance aborts its association (a CT slice is ~0.5 MB)
    max_association_mb: float = 16384.0  # an association carrying more is aborted
    max_association_instances: int = 20000  # instances accepted in one association; later ones are refused
    max_series_instances: int = 2000  # a series with more: the rest are refused and the series is not scored
    max_series_mb: float = 4096.0     # the same for the bytes of one series
    retry_first: float = 5.0          # seconds before the first retry of a failed delivery; doubled at each failure
    retry_max: float = 600.0          # the longest wait between two delivery attempts
    keep_hours: float = 24.0          # scored instances and delivered results stay this long in the spool
    device: str = "auto"              # auto (CUDA when available), cpu, cuda

    def __post_init__(self):
        if not 1 <= len(self.ae_title.strip()) <= 16:
            raise PipelineError(f"--ae-title {self.ae_title!r}: an AE title has 1 to 16 characters")
        for name in ("series_timeout", "max_instance_mb", "max_association_mb", "max_series_mb", "retry_first",
                     "retry_max", "keep_hours"):
            if not getattr(self, name) > 0:
                raise PipelineError(f"--{name.replace('_', '-')} must be > 0")

    @property
    def callers(self) -> list[str]:
        return [c.strip() for c in self.allowed_callers.split(",") if c.strip()]


@dataclass(frozen=True)
class Destination:
    host: str
    port: int
    aet: str

    def __str__(self):
        return f"{self.aet}@{self.host}:{self.port}"


def parse_destination(text: str) -> Destination:
    """HOST:PORT:AET (the host may itself hold colons: an IPv6 address)."""
    parts = text.rsplit(":", 2)
    if len(parts) != 3 or not parts[0] or not parts[1].isdigit() or not 1 <= len(parts[2]) <= 16:
        raise PipelineError(f"--send-to {text!r}: expected HOST:PORT:AET, e.g. pacs.example.org:4242:ORTHANC")
    return Destination(parts[0].strip("[]"), int(parts[1]), parts[2])


_SAFE = re.compile(r"[0-9A-Za-z_-][0-9A-Za-z._-]{0,63}")


def key(uid: str) -> str:
    """A file or folder name for a UID: the UID itself when it is a safe name, else '@' and a hash of it."""
    uid = str(uid)
    return uid if _SAFE.fullmatch(uid) else "@" + hashlib.sha1(uid.encode()).hexdigest()[:32]


def instance_problem(ds: Dataset, sop_class: str) -> str | None:
    """Why a received instance cannot be a slice of a head CT series (None: it can), from its header alone."""
    if str(sop_class) != CTImageStorage:
        return f"SOP class {pydicom.uid.UID(str(sop_class)).name}: not a CT Image; this node scores CT slices only"
    modality = str(ds.get("Modality", ""))
    if modality != "CT":
        return f"Modality {modality!r}, not CT"
    if "LOCALIZER" in [str(v).upper() for v in (ds.get("ImageType") or [])]:
        return "a localizer (scout) image, not an axial slice"
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        if not str(ds.get(kw, "")).strip():
            return f"no {kw}"
    check_header(ds)
    return None


@dataclass
class Limits:
    instance_bytes: int
    association_bytes: int
    association_instances: int
    series_instances: int
    series_bytes: int

    @classmethod
    def from_config(cls, c: NodeConfig) -> Limits:
        return cls(int(c.max_instance_mb * MB), int(c.max_association_mb * MB), c.max_association_instances,
                   c.max_series_instances, int(c.max_series_mb * MB))


@dataclass
class Spool:
    """The node's folders (module docstring). The receiving threads add instances, the main loop claims quiet series,
    scores them and files them; a lock orders the two around every rename."""
    root: Path
    limits: Limits
    log: logging.Logger
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_seen: dict = field(default_factory=dict)     # series key -> time.monotonic() of its last new instance
    counts: dict = field(default_factory=dict)        # series key -> [instances, bytes] held (incoming, work, done)

    def __post_init__(self):
        self.root = Path(self.root)
        for d in FOLDERS:
            (self.root / d).mkdir(parents=True, exist_ok=True)

    def dir(self, kind: str, series: str = "") -> Path:
        return self.root / kind / series if series else self.root / kind

    def receive(self, data: bytes, sop_class: str) -> tuple[int, str]:
        """Check and keep one instance (its bytes as a DICOM file): (C-STORE status, what happened)."""
        if len(data) > self.limits.instance_bytes:
            return CANNOT_UNDERSTAND, (f"refused: instance of {len(data) / MB:,.1f} MB, over the "
                                       f"{self.limits.instance_bytes / MB:,.0f} MB limit")
        tmp = self.dir("tmp") / f"{uuid.uuid4().hex}.dcm"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            ds = read_dicom(tmp, stop_before_pixels=True)
            why = instance_problem(ds, sop_class)
        except DicomError as e:
            why = str(e)
        if why:
            tmp.unlink()
            return CANNOT_UNDERSTAND, f"refused: {why}"
        series, name = key(ds.SeriesInstanceUID), key(ds.SOPInstanceUID) + ".dcm"
        with self.lock:
            return self._keep(tmp, series, name, len(data))

    def _keep(self, tmp: Path, series: str, name: str, size: int) -> tuple[int, str]:
        if any((self.dir(k, series) / name).exists() for k in ("incoming", "work", "done")):
            tmp.unlink()
            return 0x0000, f"duplicate of {series}/{name}: counted once"
        n, b = self.counts.get(series, (0, 0))
        incoming = self.dir("incoming", series)
        if n + 1 > self.limits.series_instances or b + size > self.limits.series_bytes:
            tmp.unlink()
            why = (f"series {series} over its limit ({self.limits.series_instances} instances, "
                   f"{self.limits.series_bytes / MB:,.0f} MB): not scored")
            incoming.mkdir(exist_ok=True)
            if not (incoming / REFUSED).exists():
                (incoming / REFUSED).write_text(why + "\n")
            self.last_seen[series] = time.monotonic()
            return OUT_OF_RESOURCES, f"refused: {why}"
        incoming.mkdir(exist_ok=True)
        os.replace(tmp, incoming / name)
        self.counts[series] = [n + 1, b + size]
        self.last_seen[series] = time.monotonic()
        return 0x0000, f"stored {series}/{name}"

    def ready(self, quiet: float) -> list[str]:
        """Series none of whose instances came for `quiet` seconds, oldest first."""
        now = time.monotonic()
        with self.lock:
            return sorted((s for s, t in self.last_seen.items() if now - t >= quiet), key=self.last_seen.get)

    def claim(self, series: str) -> tuple[Path, str] | None:
        """Move a quiet series to work/ with the instances scored before (done/): (its folder, the scoring round);
        None when it has nothing new."""
        with self.lock:
            self.last_seen.pop(series, None)
            work, incoming = self.dir("work", series), self.dir("incoming", series)
            if not (incoming.exists() or work.exists()):
                return None
            if incoming.exists():
                if work.exists():
                    _merge(incoming, work)
                else:
                    os.replace(incoming, work)
            if self.dir("done", series).exists():
                _merge(self.dir("done", series), work)
        if not (work / ROUND).exists():
            (work / ROUND).write_text(uuid.uuid4().hex[:12])
        return work, (work / ROUND).read_text().strip()

    def finish(self, series: str) -> None:
        """The series' results are in the outbox: its instances go to done/."""
        with self.lock:
            (self.dir("work", series) / ROUND).unlink(missing_ok=True)
            os.replace(self.dir("work", series), self.dir("done", series))

    def fail(self, series: str, reason: str, forget: bool = True) -> Path:
        """Set a series aside in failed/ with the reason; `forget`: a later instance of it starts it afresh (a series
        over its limit is not forgotten: what else comes of it is refused too, until a restart)."""
        with self.lock:
            dest = self.dir("failed", f"{series}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:4]}")
            os.replace(self.dir("work", series), dest)
            if forget:
                self.counts.pop(series, None)
        (dest / "reason.txt").write_text(reason + "\n")
        return dest

    def recover(self) -> list[str]:
        """After a start: partial writes removed, the counts rebuilt, series interrupted while scored returned (they
        are scored first), received series given --series-timeout from now for their sender to resume."""
        shutil.rmtree(self.dir("tmp"), ignore_errors=True)
        self.dir("tmp").mkdir()
        now = time.monotonic()
        for kind in ("incoming", "work", "done"):
            for d in sorted(p for p in self.dir(kind).iterdir() if p.is_dir()):
                files = list(d.glob("*.dcm"))
                n, b = self.counts.get(d.name, (0, 0))
                self.counts[d.name] = [n + len(files), b + sum(f.stat().st_size for f in files)]
                if kind == "incoming":
                    self.last_seen[d.name] = now
        return sorted(p.name for p in self.dir("work").iterdir() if p.is_dir())

    def prune(self, hours: float) -> None:
        """Scored instances, delivered results and failed series older than `hours` leave the spool."""
        cutoff = time.time() - hours * 3600
        for kind in ("done", "sent", "failed"):
            for d in self.dir(kind).iterdir():
                if d.is_dir() and d.stat().st_mtime < cutoff:
                    with self.lock:
                        if kind == "done" and not self.dir("incoming", d.name).exists():
                            self.counts.pop(d.name, None)
                        shutil.rmtree(d, ignore_errors=True)


def _merge(src: Path, dst: Path) -> None:
    """Move src's files into dst (those dst lacks), then remove src."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name != ROUND and not (dst / f.name).exists():
            os.replace(f, dst / f.name)
    shutil.rmtree(src)


class DeliveryError(RuntimeError):
    """The destination did not take a result; the message says how."""


@dataclass
class Outbox:
    """Results waiting for the destination: one folder per scored series, sent whole by C-STORE, retried with
    exponential backoff; what the destination accepted moves to sent/."""
    root: Path
    dest: Destination
    ae_title: str
    log: logging.Logger
    retry_first: float = 5.0
    retry_max: float = 600.0
    attempts: dict = field(default_factory=dict)      # entry name -> (failures, time.monotonic() of the next try)

    def put(self, name: str, objects: list[Dataset], summary: dict) -> Path:
        """Write an entry whole (a temporary folder, then one rename)."""
        tmp, final = self.root / "outbox" / f".{name}.tmp", self.root / "outbox" / name
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for i, ds in enumerate(objects):
            ds.save_as(tmp / f"{i:03d}_{ds.Modality}.dcm", enforce_file_format=True)
        write_json(summary, tmp / "summary.json")
        os.replace(tmp, final)
        return final

    def has(self, name: str) -> bool:
        return (self.root / "outbox" / name).exists() or (self.root / "sent" / name).exists()

    def pending(self) -> list[Path]:
        return sorted(p for p in (self.root / "outbox").iterdir() if p.is_dir() and not p.name.startswith("."))

    def deliver_due(self) -> None:
        for entry in self.pending():
            failures, due = self.attempts.get(entry.name, (0, 0.0))
            if time.monotonic() < due:
                continue
            try:
                n = self.send(entry)
            except Exception as e:  # any failure of one delivery, whatever raised it, is retried: the node goes on
                failures += 1
                wait = min(self.retry_max, self.retry_first * 2 ** (failures - 1))
                self.attempts[entry.name] = (failures, time.monotonic() + wait)
                self.log.warning(f"not delivered: {entry.name} to {self.dest} ({type(e).__name__}: {e}); "
                                 f"attempt {failures}, next in {wait:.0f} s; the results stay in {entry}")
                continue
            self.attempts.pop(entry.name, None)
            sent = self.root / "sent" / entry.name
            for f in entry.iterdir():  # the .dcm files have gone one by one; the rest follows
                os.replace(f, sent / f.name)
            entry.rmdir()
            self.log.info(f"delivered: {entry.name}, {n} object(s) to {self.dest}")

    def send(self, entry: Path) -> int:
        """C-STORE every DICOM file of an entry to the destination; each accepted file moves to sent/ at once."""
        files = sorted(entry.glob("*.dcm"))
        sent = self.root / "sent" / entry.name
        sent.mkdir(parents=True, exist_ok=True)
        if not files:
            return 0
        ae = AE(ae_title=self.ae_title)
        ae.connection_timeout, ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = 10, 30, 60, 60
        for c in sorted({str(pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID) for f in files}):
            ae.add_requested_context(c, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        assoc = ae.associate(self.dest.host, self.dest.port, ae_title=self.dest.aet)
        if not assoc.is_established:
            raise DeliveryError("no association: the destination is down, unreachable, or refused this AE title")
        try:
            for f in files:
                status = assoc.send_c_store(f)
                code = status.get("Status") if status else None
                if code is None:
                    raise DeliveryError(f"{f.name}: no answer (connection lost or timed out)")
                if code not in DELIVERED:
                    raise DeliveryError(f"{f.name}: refused with status 0x{code:04X} {status.get('ErrorComment', '')}")
                os.replace(f, sent / f.name)
        finally:
            assoc.release() if assoc.is_established else assoc.abort()
        return len(files)

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(0.5):
            self.deliver_due()


@dataclass
class Link:
    """What one association has brought so far."""
    caller: str
    address: str
    bytes: int = 0
    current: int = 0                  # bytes of the instance now streaming
    instances: int = 0
    stored: int = 0
    duplicates: int = 0
    refused: int = 0
    aborted: bool = False


class Receiver:
    """The SCP's event handlers: C-ECHO, C-STORE into the spool, the streaming limits, one log line per event that
    matters."""

    def __init__(self, spool: Spool, log: logging.Logger, callers: list[str]):
        self.spool, self.log, self.callers, self.links = spool, log, callers, {}
        self.limits = spool.limits

    def handlers(self) -> list:
        return [(evt.EVT_C_ECHO, lambda e: 0x0000), (evt.EVT_C_STORE, self.on_store), (evt.EVT_PDU_RECV, self.on_pdu),
                (evt.EVT_ESTABLISHED, self.on_open), (evt.EVT_RELEASED, self.on_close),
                (evt.EVT_ABORTED, self.on_close), (evt.EVT_REJECTED, self.on_rejected)]

    def link(self, assoc) -> Link:
        if assoc not in self.links:
            self.links[assoc] = Link(assoc.requestor.ae_title, f"{assoc.requestor.address}:{assoc.requestor.port}")
        return self.links[assoc]

    def on_open(self, event) -> None:
        link = self.link(event.assoc)
        self.log.info(f"association from {link.caller} ({link.address})")

    def on_rejected(self, event) -> None:
        caller = event.assoc.requestor.ae_title
        why = (f"calling AE title {caller!r} is not in --allowed-callers" if self.callers and caller not in self.callers
               else "the association request was not acceptable")
        self.log.warning(f"association from {caller} ({event.assoc.requestor.address}) refused: {why}")

    def on_close(self, event) -> None:
        link = self.links.pop(event.assoc, None)
        if link:
            how = "aborted" if event.event.name == "EVT_ABORTED" else "ended"
            self.log.info(f"association from {link.caller} {how}: {link.stored} stored, {link.duplicates} duplicate(s), "
                          f"{link.refused} refused, {link.bytes / MB:,.1f} MB")

    def on_pdu(self, event) -> None:
        """Count the data as it streams: an instance or an association over its limit is aborted before it is held."""
        if not isinstance(event.pdu, P_DATA_TF):
            return
        link = self.link(event.assoc)
        for item in event.pdu.presentation_data_value_items:
            data = item.presentation_data_value or b"\x01"
            if data[0] & 1:           # a command fragment
                continue
            link.current += len(data) - 1
            link.bytes += len(data) - 1
            lim = self.limits
            over = (f"an instance over {lim.instance_bytes / MB:,.0f} MB" if link.current > lim.instance_bytes
                    else f"over {lim.association_bytes / MB:,.0f} MB in one association"
                    if link.bytes > lim.association_bytes else "")
            if data[0] & 2:           # the instance's last fragment
                link.current = 0
            if over and not link.aborted:
                link.aborted = True
                self.log.warning(f"association from {link.caller} aborted: {over}")
                event.assoc.abort()

    def on_store(self, event) -> Dataset:
        link = self.link(event.assoc)
        sop = str(event.request.AffectedSOPInstanceUID)
        link.instances += 1
        if link.instances > self.limits.association_instances:
            code = OUT_OF_RESOURCES
            what = f"refused: over {self.limits.association_instances} instances in one association"
        else:
            try:
                code, what = self.spool.receive(event.encoded_dataset(), str(event.request.AffectedSOPClassUID))
            except Exception as e:  # an instance that breaks the reader in an unforeseen way is refused, not fatal
                code, what = CANNOT_UNDERSTAND, f"refused: unreadable ({type(e).__name__}: {str(e)[:200]})"
        if code == 0x0000:
            link.duplicates += what.startswith("duplicate")
            link.stored += not what.startswith("duplicate")
            (self.log.info if what.startswith("duplicate") else self.log.debug)(f"{link.caller} {sop}: {what}")
        else:
            link.refused += 1
            self.log.warning(f"{link.caller} {sop}: {what}")
        status = Dataset()
        status.Status = code
        if code:
            status.ErrorComment = what[:64]
        return status


def start_scp(cfg: NodeConfig, receiver: Receiver):
    ae = AE(ae_title=cfg.ae_title)
    for cx in AllStoragePresentationContexts:  # every storage class: a non-CT instance gets a reason, not a rejection
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    if cfg.callers:
        ae.require_calling_aet = cfg.callers
    try:
        return ae.start_server((cfg.host, cfg.port), block=False, evt_handlers=receiver.handlers())
    except OSError as e:
        raise PipelineError(f"cannot listen on {cfg.host}:{cfg.port} ({e.strerror or e}): another program uses the "
                            f"port, or the address is not this machine's; choose --port / --host") from e


def score_series(p, work: Path, cam_slices: int, log: logging.Logger) -> tuple[list[Dataset], dict]:
    """The result objects of one series folder (SR first) and the demo's summary of it."""
    from .results import analyse
    from .dicom_out import result_objects, source_header
    files = sorted(work.glob("*.dcm"))
    results, skipped = analyse(p, files, cam_slices)
    for path, why in skipped.values:
        log.warning(f"  skipped {Path(path).name}: {why}")
    if not results:
        raise DicomError(f"no readable CT slice among {len(files)} instance(s)")
    used = {f for r in results for f in r.table["file"]}
    headers = {f.name: source_header(read_dicom(f, stop_before_pixels=True)) for f in files if f.name in used}
    objects = [o for r in results for o in result_objects(r, headers, p.description)]
    summary = {**results[0].summary, "skipped": {Path(a).name: b for a, b in skipped.values},
               "series_scored": [r.series for r in results]}
    return objects, summary


@dataclass
class Node:
    """The node's main loop: quiet series are scored one at a time, in the order they went quiet; delivery runs
    beside it in its own thread."""
    cfg: NodeConfig
    predictor: object
    log: logging.Logger
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        self.spool = Spool(Path(self.cfg.spool_dir), Limits.from_config(self.cfg), self.log)
        self.outbox = Outbox(self.spool.root, parse_destination(self.cfg.send_to), self.cfg.ae_title, self.log,
                             self.cfg.retry_first, self.cfg.retry_max)

    def process(self, series: str) -> None:
        claimed = self.spool.claim(series)
        if claimed is None:
            return
        work, round_id = claimed
        name = f"{series}-{round_id}"
        if self.outbox.has(name):  # scored before the node was stopped; only the filing was left
            self.spool.finish(series)
            return
        if (work / REFUSED).exists():
            dest = self.spool.fail(series, (work / REFUSED).read_text().strip(), forget=False)
            self.log.warning(f"series {series} not scored: {(dest / REFUSED).read_text().strip()} -> {dest}")
            return
        n, t0 = len(list(work.glob("*.dcm"))), time.time()
        self.log.info(f"series {series} complete: {n} instance(s); scoring")
        try:
            objects, summary = score_series(self.predictor, work, self.cfg.cam_slices, self.log)
        except Exception as e:  # one series that cannot be scored, for whatever reason, must not stop the node
            dest = self.spool.fail(series, f"{type(e).__name__}: {e}")
            self.log.error(f"series {series} not scored ({type(e).__name__}: {e}); its instances are in {dest}")
            return
        self.outbox.put(name, objects, summary)
        self.spool.finish(series)
        any_ = summary["types"]["any"]
        self.log.info(f"series {series} scored in {time.time() - t0:.1f} s: {summary['slices']} slice(s), "
                      f"{summary['verdict']} (highest 'any' {any_['max_probability']:.3f}, threshold "
                      f"{summary['threshold']:.3f}); {len(objects)} object(s) for {self.outbox.dest} in outbox/{name}")

    def serve(self) -> None:
        """Listen, score and deliver until `stop` is set."""
        lock = open(self.spool.root / "node.lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise PipelineError(f"another node is using the spool {self.spool.root}; give this one another "
                                f"--spool-dir") from e
        pending = self.spool.recover()
        server = start_scp(self.cfg, Receiver(self.spool, self.log, self.cfg.callers))
        sender = threading.Thread(target=self.outbox.run, args=(self.stop,), name="outbox", daemon=True)
        sender.start()
        waiting = {"series interrupted while scored (scored first)": len(pending),
                   "series received before a stop (complete after --series-timeout)": len(self.spool.last_seen),
                   "result(s) to deliver": len(self.outbox.pending())}
        self.log.info(f"listening as {self.cfg.ae_title} on {self.cfg.host}:{self.cfg.port}; results to "
                      f"{self.outbox.dest}; spool {self.spool.root}"
                      + "".join(f"; {n} {what}" for what, n in waiting.items() if n))
        pruned = 0.0
        try:
            while not self.stop.is_set():
                for series in pending + self.spool.ready(self.cfg.series_timeout):
                    self.process(series)
                pending = []
                if time.monotonic() - pruned > 600:
                    self.spool.prune(self.cfg.keep_hours)
                    pruned = time.monotonic()
                self.stop.wait(0.2)
        finally:
            for assoc in server.active_associations:  # a sender still connected would hold the shutdown up
                assoc.abort()
            server.shutdown()
            self.stop.set()
            sender.join(timeout=90)
            lock.close()
            self.log.info("stopped")


def main():
    cfg = parse_config(NodeConfig, description=__doc__, prog="python -m src.serve.node")
    if not cfg.run:
        raise PipelineError("--run RUN_FOLDER_OR_BUNDLE is required "
                            "(e.g. outputs/demo/bundles/resnet10t_128.ichbundle)")
    if not cfg.send_to:
        raise PipelineError("--send-to HOST:PORT:AET is required: where the results go (the PACS's DICOM port and "
                            "AE title, e.g. pacs.example.org:4242:ORTHANC)")
    parse_destination(cfg.send_to)
    Path(cfg.spool_dir).mkdir(parents=True, exist_ok=True)
    log = get_logger("src.serve.node", Path(cfg.spool_dir) / LOG)
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # the node logs what matters, once, in its words
    from ..predictor import Predictor
    from .results import SYNTHETIC_WARNING, model_notes
    p = Predictor.load(cfg.run, cfg.device)
    log.info(f"model: {p.description}")
    for note in model_notes(p.card):
        log.info(("WARNING: " if note == SYNTHETIC_WARNING else "") + note)
    node = Node(cfg, p, log)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: node.stop.set())
    node.serve()


if __name__ == "__main__":
    cli_main(main)
