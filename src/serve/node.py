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
    tmp/                 an instance while its header is checked (removed whatever happens, and at start)
    node.log             what came, what was refused and why, what was scored, what was delivered

Limits (docs/node.md has the table with the defaults):
- transport (`src.serve.transport`, enforced before memory or a thread is spent): a PDU longer than --max-pdu
  (P-DATA-TF; 256 KB for any other) closes its connection before its body is read, before association too; an
  association request must be whole within --association-timeout of the connection, any later PDU within
  --network-timeout of its first byte (a trickling peer cannot extend either); at most --max-associations
  connections in all and --max-associations-per-peer from one address, more are rejected at once;
- data: one instance larger than --max-instance-mb, or an association carrying more than --max-association-mb,
  aborts the association while it streams (nothing that large is held); instances beyond
  --max-association-instances in one association are refused; a series beyond --max-series-instances or
  --max-series-mb has the rest refused and is not scored (a partial series would be scored as if it were whole);
- disk: below --min-free-mb free on the spool's disk, instances are refused with 0xA700 (out of resources: the
  sender retries later) and nothing is scored, logged once; any failed write of the spool, the outbox or the
  results leaves its series to be retried when space returns, and the node stays up. A series with instances
  refused for space waits for them to come again (up to --keep-hours), never scored without them.
Every refusal is logged with its reason and the peer.

Research use, not a medical device: every report says so, and what the model was trained on, first.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import io
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
from .transport import TransportLimits, start_server

LOG = "node.log"
FOLDERS = ("tmp", "incoming", "work", "done", "failed", "outbox", "sent")
REFUSED = "refused.txt"               # in a series folder: why the series will not be scored
MISSING = "missing.txt"               # in a series folder: SOP Instance UIDs refused for lack of space, not come again
ROUND = "round.txt"
ATTEMPTS = "attempts.txt"             # in work/<series>: how many times its scoring was started
MAX_ATTEMPTS = 3                      # a series whose scoring was started this often without finishing is set aside
RETRY_WRITE = 30.0                    # seconds before a series whose results could not be written is tried again
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
    max_pdu: int = 16384              # bytes of a P-DATA-TF PDU (advertised, enforced): a longer one closes the link
    association_timeout: float = 10.0  # seconds from a connection to its whole association request (trickle or not)
    network_timeout: float = 30.0     # seconds for any later PDU, first byte to last, and of silence between PDUs
    max_associations: int = 64        # connections open at once, in all; more are rejected (pynetdicom's default: 10)
    max_associations_per_peer: int = 16  # connections open at once from one address; more are rejected
    min_free_mb: float = 1024.0       # the spool's disk keeps this free: below it, 0xA700 and no scoring (0: no floor)
    retry_first: float = 5.0          # seconds before the first retry of a failed delivery; doubled at each failure
    retry_max: float = 600.0          # the longest wait between two delivery attempts
    keep_hours: float = 24.0          # scored instances and delivered results stay this long in the spool
    device: str = "auto"              # auto (CUDA when available), cpu, cuda

    def __post_init__(self):
        if not 1 <= len(self.ae_title.strip()) <= 16:
            raise PipelineError(f"--ae-title {self.ae_title!r}: an AE title has 1 to 16 characters")
        for name in ("series_timeout", "max_instance_mb", "max_association_mb", "max_series_mb", "retry_first",
                     "retry_max", "keep_hours", "association_timeout", "network_timeout", "max_associations",
                     "max_associations_per_peer"):
            if not getattr(self, name) > 0:
                raise PipelineError(f"--{name.replace('_', '-')} must be > 0")
        if not 1024 <= self.max_pdu <= 1 << 24:
            raise PipelineError("--max-pdu must be between 1024 and 16777216 bytes (16384 is usual)")
        if self.min_free_mb < 0:
            raise PipelineError("--min-free-mb must be >= 0 (0: no floor)")

    @property
    def callers(self) -> list[str]:
        return [c.strip() for c in self.allowed_callers.split(",") if c.strip()]

    @property
    def transport(self) -> TransportLimits:
        return TransportLimits(max_pdu=self.max_pdu, association_timeout=self.association_timeout,
                               network_timeout=self.network_timeout, max_connections=self.max_associations,
                               max_per_peer=self.max_associations_per_peer)


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
    free_bytes: int = 0               # the spool's disk keeps this much free

    @classmethod
    def from_config(cls, c: NodeConfig) -> Limits:
        return cls(int(c.max_instance_mb * MB), int(c.max_association_mb * MB), c.max_association_instances,
                   c.max_series_instances, int(c.max_series_mb * MB), int(c.min_free_mb * MB))


def _no_space(e: BaseException | None) -> OSError | None:
    """The failed write for lack of space (the disk or quota full) in `e` or what caused it, worth retrying when
    space returns; None when `e` is something else. A writer may re-raise it under its own message (pydicom names
    the tag it was writing, and the errno is only in the cause)."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return e
        e = e.__cause__
    return None


def _short(e: BaseException) -> str:
    """An exception in one line: the first of its message (pydicom's carry a whole traceback)."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"


@dataclass
class DiskFloor:
    """The free space the spool's disk keeps. Below the floor (or after a write failed for space) the node is 'low':
    it refuses instances and scores nothing until the floor and one largest instance fit again (so the state does
    not flap around the floor); each change is logged once."""
    path: Path
    floor: int
    margin: int                       # bytes above the floor to leave the low state: the largest instance
    log: logging.Logger
    is_low: bool = False
    recoveries: int = 0               # times space has come back (what waited for it is tried again at once)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def free(self) -> int:
        return shutil.disk_usage(self.path).free

    def low(self, incoming: int = 0) -> str | None:
        """Why `incoming` more bytes cannot be written now (None: they can)."""
        free = self.free()
        if free >= self.floor + self.margin if self.is_low else free - incoming >= self.floor:
            self._set(False, "")
            return None
        why = f"the spool's disk has {free / MB:,.1f} MB free, below --min-free-mb {self.floor / MB:g} MB"
        self._set(True, why)
        return why

    def failed(self, e: OSError, what: str) -> str:
        why = f"{what} could not be written ({e.strerror or e})"
        self._set(True, why)
        return why

    def _set(self, low: bool, why: str) -> None:
        with self.lock:
            if low and not self.is_low:
                self.log.warning(f"disk: {why}; instances are refused with 0xA700 (out of resources: senders retry) "
                                 f"and no series is scored until space returns")
            elif not low and self.is_low:
                self.recoveries += 1
                self.log.info(f"disk: {self.free() / MB:,.1f} MB free again; receiving and scoring resume")
            self.is_low = low


def uids_of(data: bytes) -> tuple[str, str] | None:
    """The (series, instance) keys of an instance's bytes, read from memory without keeping it (None: unreadable)."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True,
                             specific_tags=["SeriesInstanceUID", "SOPInstanceUID"])
        series, sop = str(ds.get("SeriesInstanceUID", "")), str(ds.get("SOPInstanceUID", ""))
    except Exception:  # noqa: BLE001  (any parse failure: the instance cannot be attributed, nothing more)
        return None
    return (key(series), key(sop)) if series and sop else None


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
    missing: dict = field(default_factory=dict)       # series key -> [time.time() of the first, {SOP UIDs}] refused
                                                      # for lack of space and not come again

    def __post_init__(self):
        self.root = Path(self.root)
        for d in FOLDERS:
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.disk = DiskFloor(self.root, self.limits.free_bytes, self.limits.instance_bytes, self.log)

    def dir(self, kind: str, series: str = "") -> Path:
        return self.root / kind / series if series else self.root / kind

    def receive(self, data: bytes, sop_class: str) -> tuple[int, str]:
        """Check and keep one instance (its bytes as a DICOM file): (C-STORE status, what happened). Its temporary
        file is gone when this returns, whatever happened."""
        if len(data) > self.limits.instance_bytes:
            return CANNOT_UNDERSTAND, (f"refused: instance of {len(data) / MB:,.1f} MB, over the "
                                       f"{self.limits.instance_bytes / MB:,.0f} MB limit")
        low = self.disk.low(len(data))
        if low:
            return self._out_of_space(data, low)
        tmp = self.dir("tmp") / f"{uuid.uuid4().hex}.dcm"
        try:
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:
                return self._out_of_space(data, self.disk.failed(e, "an instance"))
            try:
                ds = read_dicom(tmp, stop_before_pixels=True)
                why = instance_problem(ds, sop_class)
            except DicomError as e:
                why = str(e)
            if why:
                return CANNOT_UNDERSTAND, f"refused: {why}"
            series, name = key(ds.SeriesInstanceUID), key(ds.SOPInstanceUID) + ".dcm"
            with self.lock:
                code, what = self._keep(tmp, series, name, len(data))
            return self._out_of_space(data, what) if code is None else (code, what)
        finally:
            tmp.unlink(missing_ok=True)   # a kept instance was renamed away: this removes only what was not kept

    def _out_of_space(self, data: bytes, why: str) -> tuple[int, str]:
        """Refuse an instance for lack of space (transient: the sender retries); its series waits for it. A copy of
        an instance already kept needs no space: it counts once, as always."""
        uids = uids_of(data)
        if uids is None:
            return OUT_OF_RESOURCES, f"refused for now: {why}"
        series, name = uids
        with self.lock:
            if any((self.dir(k, series) / f"{name}.dcm").exists() for k in ("incoming", "work", "done")):
                self._arrived(series, name)
                return 0x0000, f"duplicate of {series}/{name}.dcm: counted once"
            self._note_missing(series, name)
        return OUT_OF_RESOURCES, f"refused for now: {why}"

    def _note_missing(self, series: str, name: str) -> None:
        self.missing.setdefault(series, [time.time(), set()])[1].add(name)
        self.last_seen[series] = time.monotonic()
        self._write_missing(series)

    def _arrived(self, series: str, name: str) -> None:
        entry = self.missing.get(series)
        if entry and name in entry[1]:
            entry[1].discard(name)
            if not entry[1]:
                del self.missing[series]
            self._write_missing(series)

    def _write_missing(self, series: str) -> None:
        """missing.txt in the series' incoming folder (best effort: on a full disk the node remembers it in memory)."""
        d = self.dir("incoming", series)
        try:
            if self.missing.get(series):
                d.mkdir(exist_ok=True)
                since, uids = self.missing[series]
                (d / MISSING).write_text(f"{since}\n" + "".join(f"{u}\n" for u in sorted(uids)))
            elif (d / MISSING).exists():
                (d / MISSING).unlink()
        except OSError:
            pass

    def _keep(self, tmp: Path, series: str, name: str, size: int) -> tuple[int | None, str]:
        """(status, what happened); status None: it could not be written (the reason follows)."""
        if any((self.dir(k, series) / name).exists() for k in ("incoming", "work", "done")):
            self._arrived(series, name[:-4])
            return 0x0000, f"duplicate of {series}/{name}: counted once"
        n, b = self.counts.get(series, (0, 0))
        incoming = self.dir("incoming", series)
        if n + 1 > self.limits.series_instances or b + size > self.limits.series_bytes:
            why = (f"series {series} over its limit ({self.limits.series_instances} instances, "
                   f"{self.limits.series_bytes / MB:,.0f} MB): not scored")
            self.last_seen[series] = time.monotonic()
            try:
                incoming.mkdir(exist_ok=True)
                if not (incoming / REFUSED).exists():
                    (incoming / REFUSED).write_text(why + "\n")
            except OSError as e:
                return None, self.disk.failed(e, "a series' refusal note")
            return OUT_OF_RESOURCES, f"refused: {why}"
        try:
            incoming.mkdir(exist_ok=True)
            os.replace(tmp, incoming / name)
        except OSError as e:
            return None, self.disk.failed(e, "an instance")
        self.counts[series] = [n + 1, b + size]
        self.last_seen[series] = time.monotonic()
        self._arrived(series, name[:-4])
        return 0x0000, f"stored {series}/{name}"

    def ready(self, quiet: float, hold: float) -> list[str]:
        """Series none of whose instances came for `quiet` seconds, oldest first; one waiting for instances refused
        for lack of space is ready only after `hold` seconds (then it is set aside)."""
        now, wall = time.monotonic(), time.time()
        with self.lock:
            quiet_ones = [s for s, t in self.last_seen.items() if now - t >= quiet and
                          (s not in self.missing or wall - self.missing[s][0] >= hold)]
            return sorted(quiet_ones, key=self.last_seen.get)

    def claim(self, series: str) -> tuple[Path, str] | None:
        """Move a quiet series to work/ with the instances scored before (done/): (its folder, the scoring round);
        None when it has nothing new. OSError: a write failed (what was moved stays in work/ for a retry)."""
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
            for f in (ROUND, ATTEMPTS):
                (self.dir("work", series) / f).unlink(missing_ok=True)
            os.replace(self.dir("work", series), self.dir("done", series))

    def fail(self, series: str, reason: str, forget: bool = True) -> Path:
        """Set a series aside in failed/ with the reason; `forget`: a later instance of it starts it afresh (a series
        over its limit is not forgotten: what else comes of it is refused too, until a restart)."""
        with self.lock:
            dest = self.dir("failed", f"{series}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:4]}")
            os.replace(self.dir("work", series), dest)
            self.missing.pop(series, None)
            if forget:
                self.counts.pop(series, None)
        try:
            (dest / "reason.txt").write_text(reason + "\n")
        except OSError:
            pass                      # the reason is in the log too
        return dest

    def recover(self) -> list[str]:
        """After a start: partial writes removed (tmp/, unfinished outbox entries), the counts and the instances
        still missing rebuilt, series interrupted while scored returned (they are scored first), received series
        given --series-timeout from now for their sender to resume."""
        shutil.rmtree(self.dir("tmp"), ignore_errors=True)
        self.dir("tmp").mkdir()
        for stray in self.dir("outbox").glob(".*.tmp"):
            shutil.rmtree(stray, ignore_errors=True)
        now = time.monotonic()
        for kind in ("incoming", "work", "done"):
            for d in sorted(p for p in self.dir(kind).iterdir() if p.is_dir()):
                files = list(d.glob("*.dcm"))
                n, b = self.counts.get(d.name, (0, 0))
                self.counts[d.name] = [n + len(files), b + sum(f.stat().st_size for f in files)]
                if (d / MISSING).exists():
                    since, *uids = (d / MISSING).read_text().split()
                    self.missing[d.name] = [float(since), set(uids)]
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
        """Write an entry whole (a temporary folder, then one rename); on any failure nothing of it is left."""
        tmp, final = self.root / "outbox" / f".{name}.tmp", self.root / "outbox" / name
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            for i, ds in enumerate(objects):
                ds.save_as(tmp / f"{i:03d}_{ds.Modality}.dcm", enforce_file_format=True)
            write_json(summary, tmp / "summary.json")
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
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
                sent = self.root / "sent" / entry.name
                for f in entry.iterdir():  # the .dcm files have gone one by one; the rest follows
                    os.replace(f, sent / f.name)
                entry.rmdir()
            except Exception as e:  # any failure of one delivery, whatever raised it, is retried: the node goes on
                failures += 1
                wait = min(self.retry_max, self.retry_first * 2 ** (failures - 1))
                self.attempts[entry.name] = (failures, time.monotonic() + wait)
                self.log.warning(f"not delivered: {entry.name} to {self.dest} ({type(e).__name__}: {e}); "
                                 f"attempt {failures}, next in {wait:.0f} s; the results stay in {entry}")
                continue
            self.attempts.pop(entry.name, None)
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
            try:
                self.deliver_due()
            except Exception as e:  # the outbox unreadable for a moment (a full or failing disk): tried again
                self.log.error(f"outbox: {type(e).__name__}: {e}; tried again")


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
    low_disk: int = 0                 # of the refused: for lack of space
    aborted: bool = False


REJECTIONS = {  # pynetdicom's A-ASSOCIATE-RJ (source, reason) -> what the log says
    (1, 3): "calling AE title {caller!r} is not in --allowed-callers",
    (1, 7): "the called AE title is not this node's --ae-title",
    (1, 2): "application context not supported (not DICOM)",
    (2, 2): "protocol version not supported",
    (3, 2): "local limit exceeded ({max} associations open, --max-associations)",
}


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
        assoc = event.assoc
        caller, rj = assoc.requestor.ae_title, assoc.acceptor.primitive
        why = REJECTIONS.get((rj.result_source, rj.diagnostic), "the association request was not acceptable "
                                                              f"(source {rj.result_source}, reason {rj.diagnostic})")
        self.log.warning(f"association from {caller} ({assoc.requestor.address}:{assoc.requestor.port}) refused: "
                         + why.format(caller=caller, max=len(assoc.ae.active_associations)))

    def on_close(self, event) -> None:
        link = self.links.pop(event.assoc, None)
        if link:
            how = "aborted" if event.event.name == "EVT_ABORTED" else "ended"
            if how == "aborted" and event.assoc.dul.idle_timer_expired():
                how = "aborted (silent for over --network-timeout)"
            self.log.info(f"association from {link.caller} {how}: {link.stored} stored, {link.duplicates} duplicate(s), "
                          f"{link.refused} refused" + (f" ({link.low_disk} for lack of space)" if link.low_disk else "")
                          + f", {link.bytes / MB:,.1f} MB")

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
                self.log.warning(f"association from {link.caller} ({link.address}) aborted: {over}")
                event.assoc.abort(block=False)  # inside its reader thread: blocking would wait on itself

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
            link.low_disk += what.startswith("refused for now")
            if not what.startswith("refused for now"):  # lack of space: logged once by the disk floor, counted here
                self.log.warning(f"{link.caller} ({link.address}) {sop}: {what}")
        status = Dataset()
        status.Status = code
        if code:
            status.ErrorComment = what[:64]
        return status


def start_scp(cfg: NodeConfig, receiver: Receiver, log: logging.Logger):
    ae = AE(ae_title=cfg.ae_title)
    for cx in AllStoragePresentationContexts:  # every storage class: a non-CT instance gets a reason, not a rejection
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    if cfg.callers:
        ae.require_calling_aet = cfg.callers

    def refuse(peer: str, why: str) -> None:
        log.warning(f"connection from {peer} refused: {why}")
    try:
        return start_server(ae, (cfg.host, cfg.port), cfg.transport, refuse, evt_handlers=receiver.handlers())
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
        self.retry: dict[str, float] = {}  # series in work/ -> time.monotonic() when it is tried again
        self.told: set[str] = set()        # of those, the ones whose failure is logged
        self.spool = Spool(Path(self.cfg.spool_dir), Limits.from_config(self.cfg), self.log)
        self.outbox = Outbox(self.spool.root, parse_destination(self.cfg.send_to), self.cfg.ae_title, self.log,
                             self.cfg.retry_first, self.cfg.retry_max)

    def process(self, series: str) -> None:
        """Score one series and file its results. A write that fails for lack of space leaves the series in work/,
        tried again after RETRY_WRITE seconds with space back; any other failure sets it aside in failed/."""
        try:
            self._process(series)
            self.retry.pop(series, None)
            self.told.discard(series)
        except Exception as e:  # noqa: BLE001  (whatever it is, one series must not stop the node)
            space = _no_space(e)
            why = _short(space or e)
            if space is None:
                try:
                    dest = self.spool.fail(series, why)
                    self.retry.pop(series, None)
                    self.told.discard(series)
                    self.log.error(f"series {series} not scored or filed ({why}); its instances are in {dest}")
                    return
                except OSError:
                    pass
            if series not in self.told:  # once, not at every retry
                self.told.add(series)
                if space is not None:
                    self.spool.disk.failed(space, f"the results of series {series}")
                self.log.error(f"series {series}: {why}; kept in work/, tried again every {RETRY_WRITE:.0f} s "
                               f"and as soon as space returns")
            self.retry[series] = time.monotonic() + RETRY_WRITE

    def _why_not_scored(self, series: str, work: Path) -> str:
        """Why a claimed series is set aside rather than scored ('' when it is scored); counts the start."""
        if (work / REFUSED).exists():
            return (work / REFUSED).read_text().strip()
        missing = self.spool.missing.get(series) or ([0, (work / MISSING).read_text().split()[1:]]
                                                      if (work / MISSING).exists() else None)
        if missing and missing[1]:
            return (f"{len(missing[1])} instance(s) refused for lack of space did not come again within --keep-hours "
                    f"{self.cfg.keep_hours:g}: an incomplete series is not scored; send the series again")
        started = int((work / ATTEMPTS).read_text() or 0) if (work / ATTEMPTS).exists() else 0
        if started >= MAX_ATTEMPTS:
            return (f"its scoring was started {started} times and never finished (the node was killed or crashed "
                    f"during it each time): set aside so that it cannot stop the node again")
        (work / ATTEMPTS).write_text(str(started + 1))
        return ""

    def _process(self, series: str) -> None:
        claimed = self.spool.claim(series)
        if claimed is None:
            return
        work, round_id = claimed
        name = f"{series}-{round_id}"
        if self.outbox.has(name):  # scored before the node was stopped; only the filing was left
            self.spool.finish(series)
            return
        why = self._why_not_scored(series, work)
        if why:
            dest = self.spool.fail(series, why, forget=not (work / REFUSED).exists())
            self.log.warning(f"series {series} not scored: {why} -> {dest}")
            return
        n, t0 = len(list(work.glob("*.dcm"))), time.time()
        self.log.info(f"series {series} complete: {n} instance(s); scoring")
        try:
            objects, summary = score_series(self.predictor, work, self.cfg.cam_slices, self.log)
        except Exception as e:  # one series that cannot be scored, for whatever reason, must not stop the node
            dest = self.spool.fail(series, f"{type(e).__name__}: {e}")
            self.log.error(f"series {series} not scored ({type(e).__name__}: {e}); its instances are in {dest}")
            return
        (work / ATTEMPTS).unlink(missing_ok=True)  # scoring ended: only a start that never ended counts
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
        self.retry.update({s: 0.0 for s in pending})
        server = start_scp(self.cfg, Receiver(self.spool, self.log, self.cfg.callers), self.log)
        sender = threading.Thread(target=self.outbox.run, args=(self.stop,), name="outbox", daemon=True)
        sender.start()
        waiting = {"series interrupted while scored (scored first)": len(pending),
                   "series received before a stop (complete after --series-timeout)": len(self.spool.last_seen),
                   "result(s) to deliver": len(self.outbox.pending())}
        self.log.info(f"listening as {self.cfg.ae_title} on {self.cfg.host}:{self.cfg.port}; results to "
                      f"{self.outbox.dest}; spool {self.spool.root}"
                      + "".join(f"; {n} {what}" for what, n in waiting.items() if n))
        try:
            self._loop()
        finally:
            for assoc in server.active_associations:  # a sender still connected would hold the shutdown up
                assoc.abort()
            server.shutdown()
            self.stop.set()
            sender.join(timeout=90)
            lock.close()
            self.log.info("stopped")

    def _loop(self) -> None:
        """Score what is due (series to retry first, the interrupted ones among them, then quiet ones) while the disk
        has space (what waited for space is retried as soon as it returns); prune every quarter of --keep-hours (at
        most every 10 minutes)."""
        pruned, every, hold = 0.0, min(600.0, self.cfg.keep_hours * 900), self.cfg.keep_hours * 3600
        recoveries = 0
        while not self.stop.is_set():
            if not self.spool.disk.low():
                if self.spool.disk.recoveries != recoveries:  # space is back: what waited for it goes now
                    recoveries = self.spool.disk.recoveries
                    self.retry = dict.fromkeys(self.retry, 0.0)
                now = time.monotonic()
                due = [s for s, t in sorted(self.retry.items(), key=lambda kv: kv[1]) if t <= now]
                for series in dict.fromkeys(due + self.spool.ready(self.cfg.series_timeout, hold)):
                    self.process(series)
                    if self.stop.is_set() or self.spool.disk.is_low:
                        break
            if time.monotonic() - pruned > every:
                self.spool.prune(self.cfg.keep_hours)
                pruned = time.monotonic()
            self.stop.wait(0.2)


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
