"""Mixed precision policy (the one place that decides it) and batched inference with flip TTA."""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from tqdm import tqdm


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def amp_settings(device: torch.device, mode: str = "auto") -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for full precision, whether a GradScaler is needed).

    CUDA: bfloat16 where the GPU supports it (no scaler needed: bf16 has float32's range), else float16
    with GradScaler. CPU: bfloat16 autocast (2-3x faster than float32 for ResNets on CPUs with AVX-512
    BF16, measured in bench/train_step.py)."""
    if mode == "off":
        return None, False
    if device.type == "cuda":
        if mode == "fp16" or (mode == "auto" and not torch.cuda.is_bf16_supported()):
            return torch.float16, True
        return torch.bfloat16, False
    if mode == "fp16":
        return torch.float16, False
    return torch.bfloat16, False


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def predict_loader(model, loader, device, amp_dtype=None, hflip_tta=False, channels_last=True, progress=True,
                   desc="predict"):
    """Run the model over a loader; returns (indices, probabilities (N, 6), embeddings (N, F) float16).

    With hflip_tta the probabilities and embeddings are means over the image and its mirror."""
    model.eval()
    idx_all, probs_all, emb_all = [], [], []
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for x, _, idx in tqdm(loader, desc=desc, disable=not progress, leave=False, mininterval=2.0):
        x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
        with autocast(device, amp_dtype):
            logits, emb = model(x, return_embedding=True)
            p = torch.sigmoid(logits.float())
            if hflip_tta:
                logits2, emb2 = model(torch.flip(x, dims=[3]), return_embedding=True)
                p = (p + torch.sigmoid(logits2.float())) / 2
                emb = (emb.float() + emb2.float()) / 2
        idx_all.append(idx.numpy())
        probs_all.append(p.float().cpu().numpy())
        emb_all.append(emb.float().cpu().numpy().astype(np.float16))
    if not idx_all:
        return np.zeros(0, np.int64), np.zeros((0, 6), np.float32), np.zeros((0, 0), np.float16)
    return np.concatenate(idx_all), np.concatenate(probs_all), np.concatenate(emb_all)
