"""Fingerprints of what made each output, and the one guard every step asks before it writes anything.

Every step writes a *stamp* beside its output: the step and its code version, the settings that change the result,
and the fingerprints of its inputs (the cache's files and settings, the folds file, the label file, an upstream
run). Before a step writes anything it compares the stamp it would write with the one there (`guard`): the same
and finished -> the step is skipped; the same and unfinished -> it continues (resume); other settings -> it stops,
naming each difference and how to redo it, unless `--overwrite` says to redo it, in which case the old output is
removed first (so a killed redo never leaves old files under a new stamp). Run-control settings (resume, workers,
device, paths, names) are not part of a stamp: they do not change what a step computes.

Under run.sh (ICH_STEP_STATUS names a file) a step tells run.sh whether it ran or was skipped, and a step that
runs prints run.sh's `[run ] <step>` line itself (ICH_STEP_NAME), so run.sh needs no output path to know.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .utils import PipelineError, write_json


def fingerprint(obj) -> str:
    """A short, stable hash of JSON-able data (key order does not matter)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_fingerprint(path) -> str:
    """Hash of a file's bytes (folds files, label files: a few to a hundred MB, well under a second)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()[:16]


# A step's code version: bump it when a change of the code alters what the step outputs for the same settings
# and inputs (a decoding fix, a new feature), so outputs of the old code are not reused as if they were current.
VERSIONS = {"prepare": 3, "train": 3, "predict": 2, "sequence": 2, "boost": 1, "evaluate": 3, "submission": 1}


@dataclass
class Stamp:
    """What made an output: the step (and its code version), the settings that change its result, and its
    inputs' fingerprints."""
    step: str
    settings: dict
    inputs: dict = field(default_factory=dict)
    version: int | None = None

    def __post_init__(self):
        if self.version is None:
            self.version = VERSIONS.get(self.step, 1)

    @property
    def id(self) -> str:
        return fingerprint({"step": self.step, "version": self.version, "settings": self.settings, "inputs": self.inputs})

    def to_dict(self) -> dict:
        return {"step": self.step, "version": self.version, "fingerprint": self.id, "settings": self.settings,
                "inputs": self.inputs}

    def save(self, path) -> None:
        write_json(self.to_dict(), path)

    @staticmethod
    def load(path) -> Stamp | None:
        path = Path(path)
        if not path.exists():
            return None
        d = json.loads(path.read_text())
        d = d.get("stamp", d)  # a stamp may sit inside a larger record (predict.json, a submission's record)
        if not isinstance(d, dict) or "step" not in d or "settings" not in d:
            return None  # written by an older version: no fingerprint
        return Stamp(d["step"], d["settings"], d.get("inputs", {}), d.get("version", 0))

    def differences(self, old: Stamp | None) -> list[str]:
        """Human-readable differences from an older stamp: 'lr: 0.002 -> 0.001', 'input cache: changed'."""
        if old is None:
            return ["no fingerprint (made by an older version of this project, or by hand)"]
        out = [f"code version of step {self.step}: {old.version} -> {self.version}"] if old.version != self.version else []
        for k in sorted(set(old.settings) | set(self.settings)):
            a, b = old.settings.get(k, "(unset)"), self.settings.get(k, "(unset)")
            if a != b:
                out.append(f"{k}: {a} -> {b}")
        for k in sorted(set(old.inputs) | set(self.inputs)):
            if old.inputs.get(k) != self.inputs.get(k):
                out.append(f"input {k}: {old.inputs.get(k, '(none)')} -> {self.inputs.get(k, '(none)')} (it changed)")
        return out or [f"step {old.step} -> {self.step}"]


def announce_skip(what: str) -> None:
    """An up-to-date step says so; under run.sh (ICH_STEP_STATUS names a file) it tells run.sh, which prints
    its own [skip] line."""
    status = os.environ.get("ICH_STEP_STATUS")
    if status:
        Path(status).write_text("skip\n")
    else:
        print(f"up to date: {what}")


def announce_run() -> None:
    """A step that is about to compute prints run.sh's `[run ] <step>` line (once per run.sh step)."""
    name, status = os.environ.get("ICH_STEP_NAME"), os.environ.get("ICH_STEP_STATUS")
    if name and status and Path(status).read_text() == "":
        Path(status).write_text("run\n")
        print(f"[run ] {name}", flush=True)


REDO = "add --overwrite to this command"  # how to redo most steps; guard's default


def guard(stamp: Stamp, stamp_file: Path, done: bool, overwrite: bool, what: str, clear=None, exists=None,
          redo: str = REDO, quiet: bool = False) -> bool:
    """Decide whether a step runs, before it writes anything. True: skip (up to date, and said so: `announce_skip`,
    unless quiet); False: run (announced, and the old output cleared first when it is redone).

    stamp_file: where the output's stamp lives; done: whether the output is complete; what: the output, for the
    messages ("the blend OUT/blends/x.json"); exists: whether any of the output is there (default: the stamp or a
    complete output); clear: the paths to remove before an overwrite; redo: how to redo it, for the message."""
    old = Stamp.load(stamp_file)
    if exists is None:
        exists = old is not None or done
    if not exists:
        announce_run()
        return False
    if old is not None and old.id == stamp.id:
        if not done:
            announce_run()
        elif not quiet:
            announce_skip(what)
        return done  # finished: skip; unfinished: the step continues it
    diffs = stamp.differences(old)
    if not overwrite:
        raise PipelineError(
            f"{what} was made with other settings than this run's:\n    " + "\n    ".join(diffs) +
            f"\n  It was not reused and nothing was written. To redo it with the new settings: {redo}"
            "\n  (OVERWRITE=1 bash run.sh redoes every stale step); to keep it, run with its old settings"
            " or give the new run another name.")
    announce_run()
    print(f"redoing {what}: " + "; ".join(diffs))
    for p in clear or []:
        p = Path(p)
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    return False
