"""Small shared helpers: atomic writes, the class list, output locations, logging.

Every file the pipeline produces is written through `atomic_write` (a temporary file in the same
folder, then `os.replace`), so a killed run never leaves a half-written output that a rerun would
mistake for a finished one.
"""
from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

# Kaggle's order; every table and array in the project uses it.
CLASSES = ["epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any"]
CLASS_WEIGHTS = np.array([1, 1, 1, 1, 1, 2], dtype=np.float64)  # the competition metric's weights

class PipelineError(RuntimeError):
    """An error in the user's data or command that the message explains; CLIs print it without a trace."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _as_created(tmp) -> None:
    """The permissions an ordinary open() would have given (mkstemp makes files 0600: a bundle or a submission
    would then be unreadable to the colleague it is for)."""
    os.chmod(tmp, 0o666 & ~_umask())


@contextlib.contextmanager
def atomic_write(path, mode="w", **kw):
    """Open a temporary file beside `path`; on success rename it over `path`, on error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _as_created(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_path(path):
    """Context manager giving a temporary path beside `path` (for writers that want a file name)."""
    path = Path(path)

    @contextlib.contextmanager
    def _cm():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
        os.close(fd)
        try:
            yield Path(tmp)
            _as_created(tmp)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    return _cm()


def write_csv(df: pd.DataFrame, path, **kw):
    with atomic_write(path, newline="") as f:
        df.to_csv(f, **kw)


def write_json(obj, path):
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, default=_json_default)
        f.write("\n")


def write_npy(arr, path):
    with atomic_write(path, "wb") as f:
        np.save(f, arr)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (Path,)):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def get_logger(name: str, log_file=None, max_bytes: int = 0) -> logging.Logger:
    """A logger to stderr and, with log_file, to that file too (with max_bytes, rotated past it: the file and five
    older ones, log_file.1 to .5, so that a server's log cannot fill its disk)."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if not logger.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(h)
    if log_file is not None:
        log_file = str(Path(log_file).resolve())
        if not any(getattr(h, "baseFilename", None) == log_file for h in logger.handlers):
            Path(log_file).parent.mkdir(parents=True, exist_ok=True)
            fh = logging.handlers.RotatingFileHandler(log_file, maxBytes=max_bytes, backupCount=5) if max_bytes \
                else logging.FileHandler(log_file)
            fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            logger.addHandler(fh)
    return logger


def cli_main(fn):
    """Run a CLI entry point; PipelineError becomes a one-line message and exit status 2."""
    try:
        return fn()
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
