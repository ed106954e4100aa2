"""The model: a timm backbone with 6 outputs, behind a tiny factory; and safe checkpoint I/O.

Weights: none (random init), timm's pretrained weights (`pretrained=True`, needs network access once),
or a local `.pth`/`.safetensors` file, which timm loads through `pretrained_cfg_overlay=dict(file=...)`:
it drops a classifier of another size and adapts the first convolution to 9 input channels.

Checkpoints load with `torch.load(weights_only=True)`: a file that would run code when unpickled is
refused instead of executed. A `--weights` file that timm cannot use (garbage, carries code, not a state
dict) or of which no tensor fits the model (timm would silently keep random weights) is a PipelineError
naming the file.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from torch import nn

from .utils import CLASSES, PipelineError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Net(nn.Module):
    """uint8 images in, logits (and optionally the pooled embedding) out.

    Normalisation lives here so every caller (train, predict, demo) feeds the same raw cache bytes."""

    def __init__(self, backbone: nn.Module, in_chans: int = 3, drop_rate: float = 0.0):
        super().__init__()
        self.backbone = backbone
        reps = in_chans // 3
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN * reps).view(1, -1, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD * reps).view(1, -1, 1, 1) * 255, persistent=False)
        self.dropout = nn.Dropout(drop_rate)
        self.head = backbone.get_classifier()

    @property
    def num_features(self) -> int:
        return self.backbone.num_features

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std

    def forward(self, x: torch.Tensor, return_embedding: bool = False):
        fmap = self.backbone.forward_features(self.normalise(x))
        emb = self.backbone.forward_head(fmap, pre_logits=True)
        logits = self.head(self.dropout(emb))
        return (logits, emb) if return_embedding else logits


def create_model(name: str, in_chans: int = 3, pretrained: bool = False, weights: str = "", drop_rate: float = 0.0) -> Net:
    import timm  # here, not at the top: steps that only read checkpoints (stage 2, reports) start 1-2 s sooner
    kw = dict(num_classes=len(CLASSES), in_chans=in_chans)
    if weights:
        if not Path(weights).exists():
            raise PipelineError(f"weights file not found: {weights}")
        fix = "pass a state dict of tensors of this architecture (torch.save(model.state_dict(), PATH), .safetensors)"
        # Read here with timm's own loader (weights_only torch.load, or safetensors) to see what the file holds,
        # then again by timm to adapt it; the errors of either come in many types.
        try:
            sd = timm.models.load_state_dict(str(weights))
            if not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
                raise ValueError("not a state dict of tensors")
            backbone = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)), **kw)
        except Exception as e:
            if "Unknown model" in str(e):
                raise PipelineError(f"unknown timm model {name!r}") from e
            why = (str(e).strip().splitlines() or ["empty or truncated file"])[0][:200]
            raise PipelineError(f"weights file {weights} refused ({type(e).__name__}: {why}); {fix}") from e
        # timm loads non-strictly once the classifier is replaced: a file of another model would load nothing
        if not set(sd) & set(backbone.state_dict()):
            raise PipelineError(f"weights file {weights}: none of its {len(sd)} tensors "
                                f"({', '.join(list(sd)[:3])}, ...) belong to {name!r}; {fix}")
    else:
        try:
            backbone = timm.create_model(name, pretrained=pretrained, **kw)
        except RuntimeError as e:
            if "not find" in str(e) or "Unknown model" in str(e):
                raise PipelineError(f"unknown timm model {name!r}") from e
            raise
        except Exception as e:  # no network for pretrained weights
            if pretrained:
                raise PipelineError(f"could not fetch pretrained weights for {name!r} ({type(e).__name__}); "
                                    f"offline, pass a local file with --weights PATH") from e
            raise
    return Net(backbone, in_chans, drop_rate)


def save_checkpoint(state: dict, path, keep_previous: bool = False) -> None:
    """Atomic and on disk before it replaces the old file (fsync): neither a kill nor a machine crash leaves a
    truncated checkpoint under the real name. keep_previous: the old file stays as <name>.prev, a fallback."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if keep_previous and path.exists():
        os.replace(path, previous(path))
    os.replace(tmp, path)


def previous(path) -> Path:
    return Path(path).with_name(Path(path).name + ".prev")


def load_checkpoint(path, map_location="cpu") -> dict:
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


def model_from_checkpoint(path, map_location="cpu") -> tuple[Net, dict]:
    """(model in eval mode with the checkpoint's weights, the checkpoint's config dict)."""
    ckpt = load_checkpoint(path, map_location)
    cfg = ckpt["config"]
    model = create_model(cfg["model"], 9 if cfg["input_mode"] == "slices_windows" else 3, drop_rate=0.0)
    model.load_state_dict(ckpt["model"])
    return model.eval(), cfg
