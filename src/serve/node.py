"""A DICOM node beside a PACS: it receives head CT studies over DICOM, scores each once, and sends the results back.

    python -m src.serve.node --run outputs/demo/bundles/resnet10t_128.ichbundle --send-to PACS_HOST:4242:ORTHANC
    python -m src.serve.node --run RUN --ae-title ICH --port 11112 --host 0.0.0.0 --allowed-callers ORTHANC --send-to ...

A Storage SCP (pynetdicom) under --ae-title on --host:--port (127.0.0.1 unless told otherwise; --allowed-callers
limits who may send) answers C-ECHO and takes every storage SOP class by C-STORE. An instance is received when its
header places it in a study (Study, Series and SOP Instance UIDs) and, for a CT image, declares a matrix and a decoded
size a CT slice can have (`src.dicom.read_dicom`, `check_header`); what fails is refused with the reason, in the
C-STORE status and in the log. A valid object the model does not score (a scout, a reformat, a dose report) is
received too, with status Success: a sender forwarding a whole study is not stopped at it. Kept instances are
written atomically to the spool, one folder per study; an instance already there counts once. A study is complete
when none of its instances has come for --study-timeout seconds: the series selector (src/serve/selector.py,
--series-rules) chooses from the headers the series the model can read, the `Predictor` scores it
(`src.serve.results.analyse_study`: the run's preprocessing, folds, stage 2 and blend; Grad-CAM of the most
suspicious slices), and its results (`src.serve.dicom_out`: a TID 1500 Measurement Report, a Key Object Selection
and Secondary Capture images, in the source study) wait in the outbox until --send-to has accepted them by C-STORE,
retried with exponential backoff while it is down.

Spool (--spool-dir), every move between its folders one rename, so a node killed at any point and started again
finishes from it:
    incoming/<study>/    instances received, the study not yet quiet
    work/<study>/        the study being scored (round.txt names the scoring round)
    done/<study>/        instances scored (--keep-hours): a late instance of the study is scored with them;
                         the same instance again counts once
    failed/<study>-<time>/   studies that gave no result, with reason.txt
    outbox/<study>-<round>/  results not yet delivered; sent/<...>/ delivered ones (--keep-hours)
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
  --max-association-instances in one association are refused; a study beyond --max-study-instances or
  --max-study-mb has the rest refused and is not scored (a partial study would be scored as if it were whole);
- disk: below --min-free-mb free on the spool's disk, instances are refused with 0xA700 (out of resources: the
  sender retries later) and nothing is scored, logged once; any failed write of the spool, the outbox or the
  results leaves its study to be retried when space returns, and the node stays up. A study with instances
  refused for space waits for them to come again (up to --keep-hours), never scored without them.
Every refusal is logged with its reason and the peer.

Research use, not a medical device: every report says so, and what the model was trained on, first.
"""
from __future__ import annotations

import errno
import fcntl
import filecmp
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
LOG_BYTES = 20 << 20                  # node.log is rotated past this (node.log.1 to .5 kept): 120 MB at most
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
    study_timeout: float = 30.0       # a study is complete when none of its instances came for this many seconds
    cam_slices: int = 4               # Grad-CAM images of this many most suspicious slices per scored series
    series_rules: str = ""            # which series of a study are scored (default configs/serve/series_rules.yaml)
    all_series: bool = False          # score every eligible series of a study, not only the one closest to training
    max_instance_mb: float = MAX_FILE_BYTES / MB  # a larger instance aborts its association (a CT slice is ~0.5 MB)
    max_association_mb: float = 16384.0  # an association carrying more is aborted
    max_association_instances: int = 20000  # instances accepted in one association; later ones are refused
    max_study_instances: int = 10000  # a study with more: the rest are refused and the study is not scored
    max_study_mb: float = 8192.0      # the same for the bytes of one study
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
        for name in ("study_timeout", "max_instance_mb", "max_association_mb", "max_study_mb", "retry_first",
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
    """Why a received instance cannot be received (None: it can), from its header alone: the UIDs that place it in
    a study, and for a CT image a matrix and a decoded size a CT slice can have. A valid object the model does not
    score (a scout, a reformat, an MR image, a dose report, an SR) is received: the series selector lists it with its
    reason when the study is scored, and a sender sending the whole study is not stopped at it."""
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        if not str(ds.get(kw, "")).strip():
            return f"no {kw}"
    if str(sop_class) == CTImageStorage:
        check_header(ds)
    return None


def not_scored(ds: Dataset, sop_class: str) -> str:
    """A note for the log when an instance obviously cannot be scored ('' when the selector decides at scoring)."""
    if str(sop_class) != CTImageStorage:
        return f"kept with its study, not scored: SOP class {pydicom.uid.UID(str(sop_class)).name}, not a CT image"
    if "LOCALIZER" in [str(v).upper() for v in (ds.get("ImageType") or [])]:
        return "kept with its study, not scored: a localizer (scout) image"
    return ""


@dataclass
class Limits:
    instance_bytes: int
    association_bytes: int
    association_instances: int
    study_instances: int
    study_bytes: int
    free_bytes: int = 0               # the spool's disk keeps this much free

    @classmethod
    def from_config(cls, c: NodeConfig) -> Limits:
        return cls(int(c.max_instance_mb * MB), int(c.max_association_mb * MB), c.max_association_instances,
                   c.max_study_instances, int(c.max_study_mb * MB), int(c.min_free_mb * MB))


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
    """The (study, instance) keys of an instance's bytes, read from memory without keeping it (None: unreadable)."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True,
                             specific_tags=["StudyInstanceUID", "SOPInstanceUID"])
        study, sop = str(ds.get("StudyInstanceUID", "")), str(ds.get("SOPInstanceUID", ""))
    except Exception:  # noqa: BLE001  (any parse failure: the instance cannot be attributed, nothing more)
        return None
    return (key(study), key(sop)) if study and sop else None


@dataclass
class Spool:
    """The node's folders (module docstring). The receiving threads add instances, the main loop claims quiet studies,
    scores them and files them; a lock orders the two around every rename."""
    root: Path
    limits: Limits
    log: logging.Logger
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_seen: dict = field(default_factory=dict)     # study key -> time.monotonic() of its last new instance
    counts: dict = field(default_factory=dict)        # study key -> [instances, bytes] held (incoming, work, done)
    missing: dict = field(default_factory=dict)       # study key -> [time.time() of the first, {SOP UIDs}] refused
                                                      # for lack of space and not come again

    def __post_init__(self):
        self.root = Path(self.root)
        for d in FOLDERS:
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.disk = DiskFloor(self.root, self.limits.free_bytes, self.limits.instance_bytes, self.log)

    def dir(self, kind: str, study: str = "") -> Path:
        return self.root / kind / study if study else self.root / kind

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
            study, name = key(ds.StudyInstanceUID), key(ds.SOPInstanceUID) + ".dcm"
            note = not_scored(ds, sop_class)
            with self.lock:
                code, what = self._keep(tmp, study, name, len(data))
            if code is None:
                return self._out_of_space(data, what)
            return code, f"{what} ({note})" if note and code == 0x0000 else what
        finally:
            tmp.unlink(missing_ok=True)   # a kept instance was renamed away: this removes only what was not kept

    def _out_of_space(self, data: bytes, why: str) -> tuple[int, str]:
        """Refuse an instance for lack of space (transient: the sender retries); its study waits for it. A copy of
        an instance already kept needs no space: it counts once, as always."""
        uids = uids_of(data)
        if uids is None:
            return OUT_OF_RESOURCES, f"refused for now: {why}"
        study, name = uids
        with self.lock:
            if any((self.dir(k, study) / f"{name}.dcm").exists() for k in ("incoming", "work", "done")):
                self._arrived(study, name)
                return 0x0000, f"duplicate of {study}/{name}.dcm: counted once"
            self._note_missing(study, name)
        return OUT_OF_RESOURCES, f"refused for now: {why}"

    def _note_missing(self, study: str, name: str) -> None:
        self.missing.setdefault(study, [time.time(), set()])[1].add(name)
        self.last_seen[study] = time.monotonic()
        self._write_missing(study)

    def _arrived(self, study: str, name: str) -> None:
        entry = self.missing.get(study)
        if entry and name in entry[1]:
            entry[1].discard(name)
            if not entry[1]:
                del self.missing[study]
            self._write_missing(study)

    def _write_missing(self, study: str) -> None:
        """missing.txt in the study's incoming folder (best effort: on a full disk the node remembers it in memory)."""
        d = self.dir("incoming", study)
        try:
            if self.missing.get(study):
                d.mkdir(exist_ok=True)
                since, uids = self.missing[study]
                (d / MISSING).write_text(f"{since}\n" + "".join(f"{u}\n" for u in sorted(uids)))
            elif (d / MISSING).exists():
                (d / MISSING).unlink()
        except OSError:
            pass

    def _keep(self, tmp: Path, study: str, name: str, size: int) -> tuple[int | None, str]:
        """(status, what happened); status None: it could not be written (the reason follows)."""
        held = next((self.dir(k, study) / name for k in ("incoming", "work", "done")
                     if (self.dir(k, study) / name).exists()), None)
        if held is not None:
            self._arrived(study, name[:-4])
            if not filecmp.cmp(tmp, held, shallow=False):  # a resend in another transfer syntax, or a forgery
                return 0x0000, (f"duplicate of {study}/{name} with other bytes than the copy held: the first copy "
                                f"is kept, this one dropped")
            return 0x0000, f"duplicate of {study}/{name}: counted once"
        n, b = self.counts.get(study, (0, 0))
        incoming = self.dir("incoming", study)
        if n + 1 > self.limits.study_instances or b + size > self.limits.study_bytes:
            why = (f"study {study} over its limit ({self.limits.study_instances} instances, "
                   f"{self.limits.study_bytes / MB:,.0f} MB): not scored")
            self.last_seen[study] = time.monotonic()
            try:
                incoming.mkdir(exist_ok=True)
                if not (incoming / REFUSED).exists():
                    (incoming / REFUSED).write_text(why + "\n")
            except OSError as e:
                return None, self.disk.failed(e, "a study's refusal note")
            return OUT_OF_RESOURCES, f"refused: {why}"
        try:
            incoming.mkdir(exist_ok=True)
            os.replace(tmp, incoming / name)
        except OSError as e:
            return None, self.disk.failed(e, "an instance")
        self.counts[study] = [n + 1, b + size]
        self.last_seen[study] = time.monotonic()
        self._arrived(study, name[:-4])
        return 0x0000, f"stored {study}/{name}"

    def ready(self, quiet: float, hold: float) -> list[str]:
        """Studies none of whose instances came for `quiet` seconds, oldest first; one waiting for instances refused
        for lack of space is ready only after `hold` seconds (then it is set aside)."""
        now, wall = time.monotonic(), time.time()
        with self.lock:
            quiet_ones = [s for s, t in self.last_seen.items() if now - t >= quiet and
                          (s not in self.missing or wall - self.missing[s][0] >= hold)]
            return sorted(quiet_ones, key=self.last_seen.get)

    def claim(self, study: str) -> tuple[Path, str] | None:
        """Move a quiet study to work/ with the instances scored before (done/): (its folder, the scoring round);
        None when it has nothing new. OSError: a write failed (what was moved stays in work/ for a retry)."""
        with self.lock:
            self.last_seen.pop(study, None)
            work, incoming = self.dir("work", study), self.dir("incoming", study)
            if not (incoming.exists() or work.exists()):
                return None
            if incoming.exists():
                if work.exists():
                    _merge(incoming, work)
                else:
                    os.replace(incoming, work)
            if self.dir("done", study).exists():
                _merge(self.dir("done", study), work)
        if not (work / ROUND).exists():
            (work / ROUND).write_text(uuid.uuid4().hex[:12])
        return work, (work / ROUND).read_text().strip()

    def finish(self, study: str) -> None:
        """The study's results are in the outbox: its instances go to done/."""
        with self.lock:
            for f in (ROUND, ATTEMPTS):
                (self.dir("work", study) / f).unlink(missing_ok=True)
            os.replace(self.dir("work", study), self.dir("done", study))

    def fail(self, study: str, reason: str, forget: bool = True) -> Path:
        """Set a study aside in failed/ with the reason; `forget`: a later instance of it starts it afresh (a study
        over its limit is not forgotten: what else comes of it is refused too, until a restart)."""
        with self.lock:
            dest = self.dir("failed", f"{study}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:4]}")
            os.replace(self.dir("work", study), dest)
            self.missing.pop(study, None)
            if forget:
                self.counts.pop(study, None)
        try:
            (dest / "reason.txt").write_text(reason + "\n")
        except OSError:
            pass                      # the reason is in the log too
        return dest

    def recover(self) -> list[str]:
        """After a start: partial writes removed (tmp/, unfinished outbox entries), the counts and the instances
        still missing rebuilt, studies interrupted while scored returned (they are scored first), received studies
        given --study-timeout from now for their sender to resume."""
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
        """Scored instances, delivered results and failed studies older than `hours` leave the spool."""
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
    command: int = 0                  # bytes of the command set now streaming
    instances: int = 0
    stored: int = 0
    duplicates: int = 0
    refused: int = 0
    low_disk: int = 0                 # of the refused: for lack of space
    aborted: bool = False


class OneLine(logging.Filter):
    """Every log record one line: control characters in what a peer sent (a UID, a description, an AE title) are
    escaped, so that none can write a line of its own into node.log."""

    ESCAPES = {i: f"\\x{i:02x}" for i in range(32)} | {10: "\\n", 13: "\\r", 9: "\\t"}

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if any(c < " " for c in msg):
            record.msg, record.args = msg.translate(self.ESCAPES), ()
        return True


def reader_failures(log: logging.Logger, default):
    """A threading.excepthook: an association's reader thread that a malformed message breaks inside pynetdicom
    (an IndexError on a one-byte PDV, a KeyError on an unknown context) is one log line naming the peer, not a
    traceback; any other thread's exception goes to `default`."""
    from pynetdicom.association import Association
    from pynetdicom.dul import DULServiceProvider

    def hook(args) -> None:
        thread = args.thread
        if not isinstance(thread, (DULServiceProvider, Association)):
            return default(args)
        assoc = thread if isinstance(thread, Association) else getattr(thread, "assoc", None)
        who = f"{assoc.requestor.ae_title} ({assoc.requestor.address}:{assoc.requestor.port})" if assoc else "a peer"
        log.warning(f"association from {who} ended: a message pynetdicom could not read "
                    f"({args.exc_type.__name__}: {str(args.exc_value)[:120]})")
    return hook


COMMAND_BYTES = 64 << 10  # a DIMSE command set (C-STORE-RQ, C-ECHO-RQ) is a few hundred bytes; more is an attack

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
            self.log.info(f"association from {link.caller} ({link.address}) {how}: {link.stored} stored, "
                          f"{link.duplicates} duplicate(s), "
                          f"{link.refused} refused" + (f" ({link.low_disk} for lack of space)" if link.low_disk else "")
                          + f", {link.bytes / MB:,.1f} MB")

    def on_pdu(self, event) -> None:
        """Count the data as it streams: an instance or an association over its limit is aborted before it is held."""
        if not isinstance(event.pdu, P_DATA_TF):
            return
        link = self.link(event.assoc)
        for item in event.pdu.presentation_data_value_items:
            data = item.presentation_data_value or b"\x01"
            link.bytes += len(data) - 1
            lim = self.limits
            if data[0] & 1:           # a command fragment: pynetdicom keeps them in memory until the last one
                link.command += len(data) - 1
                over = f"a command set over {COMMAND_BYTES // 1024} KB" if link.command > COMMAND_BYTES else ""
                if data[0] & 2:
                    link.command = 0
            else:
                link.current += len(data) - 1
                over = f"an instance over {lim.instance_bytes / MB:,.0f} MB" if link.current > lim.instance_bytes else ""
                if data[0] & 2:       # the instance's last fragment
                    link.current = 0
            if not over and link.bytes > lim.association_bytes:
                over = f"over {lim.association_bytes / MB:,.0f} MB in one association"
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
            (self.log.warning if "other bytes" in what else
             self.log.info if what.startswith("duplicate") or "not scored" in what else self.log.debug)(
                f"{link.caller} {sop}: {what}")
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
    ae.require_called_aet = True      # an association for another AE title is a sender configured wrong: rejected

    def refuse(peer: str, why: str) -> None:
        log.warning(f"connection from {peer} refused: {why}")
    try:
        return start_server(ae, (cfg.host, cfg.port), cfg.transport, refuse, evt_handlers=receiver.handlers())
    except OSError as e:
        raise PipelineError(f"cannot listen on {cfg.host}:{cfg.port} ({e.strerror or e}): another program uses the "
                            f"port, or the address is not this machine's; choose --port / --host") from e


def score_study(p, algorithm, work: Path, cfg: NodeConfig, log: logging.Logger) -> tuple[list[Dataset], dict]:
    """The result objects of one study folder (the SR first, the key images, the Grad-CAM captures; none when no
    series of it could be scored) and its summary: the series selector chooses what is scored."""
    from .dicom_out import result_objects, source_header
    from .results import analyse_study
    from .selector import SeriesRules
    files = sorted(work.glob("*.dcm"))
    studies, skipped = analyse_study(p, files, cfg.cam_slices, rules=SeriesRules.load(cfg.series_rules or None),
                                     all_series=cfg.all_series or None)
    for path, why in skipped.values:
        log.warning(f"  skipped {Path(path).name}: {why}")
    if not studies:
        raise DicomError(f"no readable DICOM object among {len(files)} instance(s)")
    if len(studies) > 1:  # one folder per StudyInstanceUID: only a hash collision of two UIDs could do this
        raise DicomError(f"{len(studies)} studies in one folder: {[s.study for s in studies]}")
    study = studies[0]
    used = {f for r in study.scored for f in r.table["file"]}
    headers = {f.name: source_header(read_dicom(f, stop_before_pixels=True)) for f in files if f.name in used}
    objects = result_objects(study, headers, algorithm)
    summary = {**study.summary, "skipped": {Path(a).name: b for a, b in skipped.values}}
    return objects, summary


@dataclass
class Node:
    """The node's main loop: quiet studies are scored one at a time, in the order they went quiet; delivery runs
    beside it in its own thread."""
    cfg: NodeConfig
    predictor: object
    log: logging.Logger
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        self.retry: dict[str, float] = {}  # studies in work/ -> time.monotonic() when it is tried again
        self.told: set[str] = set()        # of those, the ones whose failure is logged
        self.spool = Spool(Path(self.cfg.spool_dir), Limits.from_config(self.cfg), self.log)
        self.outbox = Outbox(self.spool.root, parse_destination(self.cfg.send_to), self.cfg.ae_title, self.log,
                             self.cfg.retry_first, self.cfg.retry_max)
        self._algorithm = None

    @property
    def algorithm(self):
        """The model as every result object names it (IHE AIR Contributing Equipment), made once."""
        if self._algorithm is None:
            from .dicom_out import Algorithm
            self._algorithm = Algorithm.of(self.predictor)
        return self._algorithm

    def process(self, study: str) -> None:
        """Score one study and file its results. A write that fails for lack of space leaves the study in work/,
        tried again after RETRY_WRITE seconds with space back; any other failure sets it aside in failed/."""
        try:
            self._process(study)
            self.retry.pop(study, None)
            self.told.discard(study)
        except Exception as e:  # noqa: BLE001  (whatever it is, one study must not stop the node)
            space = _no_space(e)
            why = _short(space or e)
            if space is None:
                try:
                    dest = self.spool.fail(study, why)
                    self.retry.pop(study, None)
                    self.told.discard(study)
                    self.log.error(f"study {study} not scored or filed ({why}); its instances are in {dest}")
                    return
                except OSError:
                    pass
            if study not in self.told:  # once, not at every retry
                self.told.add(study)
                if space is not None:
                    self.spool.disk.failed(space, f"the results of study {study}")
                self.log.error(f"study {study}: {why}; kept in work/, tried again every {RETRY_WRITE:.0f} s "
                               f"and as soon as space returns")
            self.retry[study] = time.monotonic() + RETRY_WRITE

    def _why_not_scored(self, study: str, work: Path) -> str:
        """Why a claimed study is set aside rather than scored ('' when it is scored); counts the start."""
        if (work / REFUSED).exists():
            return (work / REFUSED).read_text().strip()
        missing = self.spool.missing.get(study) or ([0, (work / MISSING).read_text().split()[1:]]
                                                      if (work / MISSING).exists() else None)
        if missing and missing[1]:
            return (f"{len(missing[1])} instance(s) refused for lack of space did not come again within --keep-hours "
                    f"{self.cfg.keep_hours:g}: an incomplete study is not scored; send the study again")
        started = int((work / ATTEMPTS).read_text() or 0) if (work / ATTEMPTS).exists() else 0
        if started >= MAX_ATTEMPTS:
            return (f"its scoring was started {started} times and never finished (the node was killed or crashed "
                    f"during it each time): set aside so that it cannot stop the node again")
        (work / ATTEMPTS).write_text(str(started + 1))
        return ""

    def _process(self, study: str) -> None:
        claimed = self.spool.claim(study)
        if claimed is None:
            return
        work, round_id = claimed
        name = f"{study}-{round_id}"
        if self.outbox.has(name):  # scored before the node was stopped; only the filing was left
            self.spool.finish(study)
            return
        why = self._why_not_scored(study, work)
        if why:
            dest = self.spool.fail(study, why, forget=not (work / REFUSED).exists())
            self.log.warning(f"study {study} not scored: {why} -> {dest}")
            return
        n, t0 = len(list(work.glob("*.dcm"))), time.time()
        self.log.info(f"study {study} complete: {n} instance(s); scoring")
        try:
            objects, summary = score_study(self.predictor, self.algorithm, work, self.cfg, self.log)
        except Exception as e:  # one study that cannot be scored, for whatever reason, must not stop the node
            dest = self.spool.fail(study, f"{type(e).__name__}: {e}")
            self.log.error(f"study {study} not scored ({type(e).__name__}: {e}); its instances are in {dest}")
            return
        (work / ATTEMPTS).unlink(missing_ok=True)  # scoring ended: only a start that never ended counts
        for row in summary["series"]:
            self.log.info(f"  series {row['SeriesNumber'] or row['SeriesInstanceUID']} ({row['files']} instance(s)): "
                          + (f"scored{'; ' + row['notes'] if row['notes'] else ''}" if row["scored"]
                             else f"not scored: {row['reason']}"))
        if not objects:  # nothing the model can read: said in the log, nothing sent; a later series is scored then
            self.spool.finish(study)
            self.log.warning(f"study {study} not scored: no series of it is one the model can read (reasons above)")
            return
        self.outbox.put(name, objects, summary)
        self.spool.finish(study)
        self.log.info(f"study {study} scored in {time.time() - t0:.1f} s: {summary['verdict']} (threshold "
                      f"{summary['threshold']:.3f}; series {', '.join(summary['scored_series'])}); {len(objects)} "
                      f"object(s) for {self.outbox.dest} in outbox/{name}")

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
        waiting = {"studies interrupted while scored (scored first)": len(pending),
                   "studies received before a stop (complete after --study-timeout)": len(self.spool.last_seen),
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
        """Score what is due (studies to retry first, the interrupted ones among them, then quiet ones) while the disk
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
                for study in dict.fromkeys(due + self.spool.ready(self.cfg.study_timeout, hold)):
                    self.process(study)
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
    log = get_logger("src.serve.node", Path(cfg.spool_dir) / LOG, max_bytes=LOG_BYTES)
    log.addFilter(OneLine())
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # the node logs what matters, once, in its words
    threading.excepthook = reader_failures(log, threading.excepthook)
    from ..predictor import Predictor
    from .results import SYNTHETIC_WARNING, model_notes
    from .selector import SeriesRules
    rules = SeriesRules.load(cfg.series_rules or None)  # a broken rules file stops the node before it listens
    p = Predictor.load(cfg.run, cfg.device)
    log.info(f"model: {p.description}; series rules: {rules.source}")
    for note in model_notes(p.card):
        log.info(("WARNING: " if note == SYNTHETIC_WARNING else "") + note)
    node = Node(cfg, p, log)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: node.stop.set())
    node.serve()


if __name__ == "__main__":
    cli_main(main)
