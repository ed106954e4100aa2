"""The model: a timm backbone with 6 outputs, behind a tiny factory.

Weights: none (random init), timm's ImageNet weights (`pretrained=True`), or a local `.pth`/`.safetensors`
file. Both reach timm as a local file through `pretrained_cfg_overlay=dict(file=...)`, which drops a classifier
of another size and adapts the first convolution to 9 input channels. The ImageNet file is found by
`pretrained_file`: in the Hugging Face or torch hub cache (no network needed), else downloaded once; a machine
that can reach neither stops at once with one line naming the model and the two ways on (`--weights FILE`,
`--pretrained false`), where timm alone would retry for ~45 s and end in a traceback.

A `--weights` file that timm cannot use (garbage, carries code, not a state dict) or of which no tensor fits the
model (timm would silently keep random weights) is a PipelineError naming the file. `net_from_state` builds the
network from a checkpoint's config and weights (src.checkpoint reads them, with `weights_only=True`).
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from .utils import CLASSES, PipelineError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Net(nn.Module):
    """uint8 images in, logits (and optionally the pooled embedding) out.

    Normalisation lives here so every caller (train, predict, demo) feeds the same raw cache bytes. The classifier
    is the backbone's own (`head`), registered once: a module registered twice lists its tensors twice in
    `state_dict()`, and timm's ModelEmaV3, which walks that list, then averages them twice a step."""

    def __init__(self, backbone: nn.Module, in_chans: int = 3, drop_rate: float = 0.0):
        super().__init__()
        self.backbone = backbone
        reps = in_chans // 3
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN * reps).view(1, -1, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD * reps).view(1, -1, 1, 1) * 255, persistent=False)
        self.dropout = nn.Dropout(drop_rate)

    @property
    def head(self) -> nn.Module:
        """The classifier: the backbone's, not a second registration of it."""
        return self.backbone.get_classifier()

    @property
    def num_features(self) -> int:
        return self.backbone.num_features

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints and bundles written before the classifier was registered once hold it a second time under
        # head.*, the same tensors as the backbone's: that copy is dropped, so they still load.
        for k in [k for k in state_dict if k.startswith(prefix + "head.")]:
            del state_dict[k]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std

    def forward(self, x: torch.Tensor, return_embedding: bool = False):
        fmap = self.backbone.forward_features(self.normalise(x))
        emb = self.backbone.forward_head(fmap, pre_logits=True)
        logits = self.head(self.dropout(emb))
        return (logits, emb) if return_embedding else logits


class OnnxNet(nn.Module):
    """A stage-1 network as its ONNX export sees it: uint8 images in, probabilities and the pooled embedding out."""

    def __init__(self, net: Net):
        super().__init__()
        self.net = net

    def forward(self, x):
        logits, emb = self.net(x, return_embedding=True)
        return torch.sigmoid(logits.float()), emb.float()


def pretrained_file(name: str) -> str:
    """A local file of timm's ImageNet weights for model `name`: from the Hugging Face hub cache or torch hub's,
    else downloaded once (then cached). PipelineError at once when neither a cache nor the network has them."""
    import timm
    cfg = timm.models.get_pretrained_cfg(name) if timm.is_model(name) else None
    if not timm.is_model(name):
        raise PipelineError(f"unknown timm model {name!r}")
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise PipelineError(f"timm has no pretrained weights for {name!r}: train it with --pretrained false, "
                            f"or give a weights file with --weights FILE")
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    repo, _, rev = (cfg.hf_hub_id or "").partition("@")
    names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    for fn in names if repo else []:
        hit = try_to_load_from_cache(repo, fn, revision=rev or None)
        if isinstance(hit, str) and Path(hit).exists():
            return hit
    torch_hub = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url or "").path).name
    if cfg.url and torch_hub.is_file():
        return str(torch_hub)
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname if repo else urlparse(cfg.url).hostname
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") and bool(repo)
    why = "HF_HUB_OFFLINE is set" if offline else None if _reachable(host) else f"{host} cannot be reached"
    if why is None:
        try:
            if not repo:
                from timm.models._hub import download_cached_file
                return download_cached_file(cfg.url)
            for fn in names:
                try:
                    return hf_hub_download(repo, fn, revision=rev or None)
                except Exception as e:  # noqa: BLE001  (a missing file name: try the next one)
                    if "EntryNotFound" not in type(e).__name__ or fn == names[-1]:
                        raise
        except Exception as e:  # noqa: BLE001  (network errors come in many types)
            why = f"{type(e).__name__}: {' '.join(str(e).split())[:120]}"
    from huggingface_hub.constants import HF_HUB_CACHE
    raise PipelineError(f"could not fetch the pretrained ImageNet weights of {name!r} ({why}; not in the Hugging Face "
                        f"cache {HF_HUB_CACHE} either): pass a local weights "
                        f"file with --weights FILE, or train from random weights with --pretrained false")


def _reachable(host: str, timeout: float = 5.0) -> bool:
    """Whether a TCP connection to host:443 (or to the HTTPS proxy, when one is set) opens within `timeout`."""
    proxy = next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy") if os.environ.get(k)), "")
    u = urlparse(proxy) if proxy else None
    try:
        socket.create_connection((u.hostname, u.port or 80) if u else (host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def create_model(name: str, in_chans: int = 3, pretrained: bool = False, weights: str = "", drop_rate: float = 0.0) -> Net:
    import timm  # here, not at the top: steps that only read checkpoints (stage 2, reports) start 1-2 s sooner
    kw = dict(num_classes=len(CLASSES), in_chans=in_chans)
    if pretrained and not weights:
        weights = pretrained_file(name)
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
            backbone = timm.create_model(name, **kw)
        except RuntimeError as e:
            if "not find" in str(e) or "Unknown model" in str(e):
                raise PipelineError(f"unknown timm model {name!r}") from e
            raise
    return Net(backbone, in_chans, drop_rate)


def net_from_state(config: dict, state_dict: dict) -> Net:
    """A stage-1 network in eval mode from its config (model, input_mode) and weights."""
    model = create_model(config["model"], 9 if config["input_mode"] == "slices_windows" else 3, drop_rate=0.0)
    model.load_state_dict(state_dict)
    return model.eval()
