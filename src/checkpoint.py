"""Checkpoints: what one holds, written atomically, read safely, and a training state restored from one.

A stage-1 checkpoint is one dict (`stage1`): `model` (the weights the run validates and predicts with: the
average when EMA is on), `raw` (the trained weights under EMA, else None), optimizer, scaler, epoch, best score
and epoch, history, config, the fold's stamp and the RNG states. A GRU checkpoint (`gru`) holds the model, its
config, the embedding statistics it normalises with, its epoch, best score and stamp. src.train, src.sequence
and the Predictor (through model.py and sequence.py, which build the networks) all read and write them here.

Written atomically and on disk before they replace the old file (fsync): neither a kill nor a machine crash leaves
a truncated checkpoint under the real name; `keep_previous` keeps the old one as <name>.prev, which `restore`
falls back to when the newest is corrupt. Read with `torch.load(weights_only=True)`: a file that would run code
when unpickled is refused, not executed.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
from pathlib import Path

from .utils import PipelineError


def previous(path) -> Path:
    return Path(path).with_name(Path(path).name + ".prev")


def save(state: dict, path, keep_previous: bool = False) -> None:
    import torch
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if keep_previous and path.exists():
        os.replace(path, previous(path))
    os.replace(tmp, path)


def load(path, map_location="cpu") -> dict:
    import torch
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refuses anything that would run code when unpickled
        raise PipelineError(f"{path} is not a plain-tensor checkpoint and was not loaded (it may contain code): "
                            f"{str(e).splitlines()[0][:200]}") from e
    except Exception as e:  # a zip archive cut short, zero bytes, a stray file under the name
        raise PipelineError(f"{path} is truncated or corrupt and was not loaded ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:160] if str(e) else 'no detail'})") from e


def stage1(trained, ema, opt, scaler, epoch, best, best_epoch, history, cfg, stamp, device) -> dict:
    """A stage-1 training state: `model` is the weights the run predicts with (the average when EMA is on), `raw`
    the trained network's own under EMA."""
    import torch
    return {"model": (ema.module if ema else trained).state_dict(), "raw": trained.state_dict() if ema else None,
            "optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
            "best_score": best, "best_epoch": best_epoch, "history": history, "config": dataclasses.asdict(cfg),
            "stamp": stamp.id, "rng": {"torch": torch.get_rng_state(),
                                       "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []}}


def restore(path, trained, ema, opt, scaler, stamp, device, log=None) -> tuple[int, float, int, list]:
    """Load a stage-1 last.pth (or, when it is corrupt, the one before it) into the live objects and the RNG;
    returns (epochs done, best score, best epoch, history).

    Also across precisions: a fold saved where no GradScaler ran (bfloat16 or float32: an empty scaler state)
    and resumed where float16 needs one (a GPU without bfloat16) starts a fresh scaler, which finds its scale
    within a few steps; the other way, the saved scale is not needed and a disabled scaler ignores it."""
    import torch
    try:
        ck = load(path)
    except PipelineError as e:
        if "corrupt" not in str(e) or not previous(path).exists():
            raise
        if log:
            log.info(f"{e}; resuming from the checkpoint before it, {previous(path).name}")
        ck = load(previous(path))
    if ck.get("stamp") != stamp.id:
        raise PipelineError(f"{path} was made with other settings than this run's; --overwrite starts the fold again")
    trained.load_state_dict(ck["raw"] if ema else ck["model"])
    if ema:
        ema.module.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    if scaler.is_enabled() and not ck["scaler"]:
        if log:
            log.info(f"{Path(path).name} was saved without a GradScaler (bfloat16 or float32); float16 here: a fresh one")
    else:
        scaler.load_state_dict(ck["scaler"])
    torch.set_rng_state(ck["rng"]["torch"])
    if device.type == "cuda":  # as many GPU generators as both runs have: resuming on another GPU count works
        for i, state in enumerate(ck["rng"].get("cuda", [])[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, i)
    return ck["epoch"], ck["best_score"], ck["best_epoch"], ck["history"]


def gru(state_dict: dict, cfg, emb_dim: int, mu, sd, epoch: int, best: float, stamp) -> dict:
    """A trained GRU fold: weights (on the CPU), config, the embedding mean and std it normalises with."""
    import torch
    as_t = lambda a: None if a is None else torch.from_numpy(a)  # noqa: E731
    return {"model": {k: v.cpu() for k, v in state_dict.items()}, "config": dataclasses.asdict(cfg),
            "emb_dim": emb_dim, "emb_mean": as_t(mu), "emb_std": as_t(sd), "epoch": epoch, "best_score": best,
            "stamp": stamp.id}
