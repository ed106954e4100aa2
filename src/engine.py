"""The engine: device and precision policy (the one place that decides mixed precision), one training epoch,
and the batched inference loop with flip TTA.

src.train calls `train_one_epoch` once per epoch and `predict_loader` to validate; src.predictor uses
`predict_loader` for test sets and a clinician's files; bench/train_step.py times `train_one_epoch` itself.

GPU habits, each for a reason: the loss is accumulated on the device and read back only every `log_every`
steps (`.item()` waits for the GPU); DistributedDataParallel skips its gradient all-reduce on
accumulation micro-steps (`no_sync`); inference keeps its outputs on the device until the end; cuDNN picks
its fastest kernels for the fixed input size (`cudnn.benchmark`); AdamW is fused where CUDA offers it.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        from .utils import PipelineError
        raise PipelineError(f"--device {name}: no CUDA device is visible here (use --device auto or cpu)")
    return torch.device(name)


def amp_settings(device: torch.device, mode: str = "auto") -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for full precision, whether a GradScaler is needed).

    CUDA: bfloat16 where the GPU supports it (no scaler needed: bf16 has float32's range), else float16
    with GradScaler. CPU: bfloat16 autocast only where the CPU computes it natively (`cpu_has_native_bf16`);
    elsewhere float32, because emulated bf16 is many times slower than float32 (docs/benchmarks.md, "the
    training step and the loader", has both measurements and their command)."""
    if mode == "off":
        return None, False
    if device.type == "cuda":
        if mode == "fp16" or (mode == "auto" and not torch.cuda.is_bf16_supported()):
            return torch.float16, True
        return torch.bfloat16, False
    if mode == "fp16":
        return torch.float16, False
    if mode == "auto" and not cpu_has_native_bf16():
        return None, False
    return torch.bfloat16, False


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (x86: AVX-512 BF16 or AMX-BF16; Arm: BF16), as torch's cpuinfo
    reads them from the processor: oneDNN then computes bfloat16 in hardware, not by emulation. (torch's
    `_is_mkldnn_bf16_supported` answers another question: it also says yes on AVX-512 CPUs without BF16.)"""
    try:
        caps = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):  # a torch without the query: unknown, and float32 is safe
        return False
    return any(bool(caps.get(k)) for k in ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16"))


def infer_batch_size(device: torch.device) -> int:
    """Images per inference forward pass, by device: 256 on CUDA (launch overhead a small share of a pass, a few GB
    of activations: the arithmetic is in docs/gpu.md), 64 on the CPU (larger batches gain nothing there)."""
    return 256 if device.type == "cuda" else 64


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def configure_backend(device: torch.device) -> None:
    """cuDNN autotuning (inputs have one fixed size) and TF32 matmuls for what runs outside autocast."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def adamw(param_groups, lr: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step on CUDA; each group remembers its peak lr as `base_lr`."""
    opt = torch.optim.AdamW(param_groups, lr=lr, fused=device.type == "cuda")
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    return opt


def scale_lr(opt: torch.optim.Optimizer, factor: float) -> None:
    """Each group's lr becomes its peak (`base_lr`, see `adamw`) x factor: how a schedule is applied."""
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * factor


def warmup_cosine(t: float, warmup: float) -> float:
    """LR multiplier at training progress t in (0, 1]: linear warmup over the first `warmup` share, then cosine
    to 0. A function of progress, not of a step counter, so a run resumed with another number of GPUs (other
    steps per epoch) continues on the same curve."""
    if warmup > 0 and t < warmup:
        return t / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (t - warmup) / max(1e-12, 1 - warmup))))


@dataclass
class EpochResult:
    loss: float          # mean training loss over the epoch's samples
    images: int          # samples seen by this process
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def train_one_epoch(net, loader, opt, scaler, loss_fn, device, amp_dtype=None, *, steps: int, accum_steps: int = 1,
                    grad_clip: float = 0.0, lr_at=None, channels_last: bool = True, ema=None, ema_step0: int = 0,
                    log_every: int = 50, progress: bool = True, desc: str = "train", on_log=None) -> EpochResult:
    """One pass of `steps` batches: forward under autocast, scaled backward, an optimizer step every
    `accum_steps` batches (gradient clipping, the lr of `lr_at(step)` x each group's base_lr, EMA update).

    net may be wrapped in DistributedDataParallel; `ema` (a timm ModelEmaV3 or None) follows the unwrapped
    model after each optimizer step, told the run's optimizer step count (ema_step0 before this epoch) for
    its decay warmup. Every `log_every` steps (the only host sync inside the loop) the running mean loss goes to
    the progress bar and to `on_log(step, loss, lr)` (the TensorBoard curves)."""
    net.train()
    model = net.module if hasattr(net, "module") else net
    params = [p for g in opt.param_groups for p in g["params"]]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    loss_sum, seen, opt_steps, t0 = torch.zeros((), device=device), 0, 0, time.perf_counter()
    # islice: exactly `steps` batches are drawn, and an iterator the caller passes stays usable afterwards
    bar = tqdm(itertools.islice(loader, steps), total=steps, desc=desc, disable=not progress, leave=False, mininterval=2.0)
    for step, (x, y, _) in enumerate(bar):
        x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
        y = y.to(device, non_blocking=True)
        boundary = (step + 1) % accum_steps == 0 or step + 1 == steps
        # DDP all-reduces gradients in backward: only needed on the micro-step that ends an accumulation
        sync = contextlib.nullcontext() if boundary or not hasattr(net, "no_sync") else net.no_sync()
        with sync:
            with autocast(device, amp_dtype):
                loss = loss_fn(net(x), y)
            scaler.scale(loss / accum_steps).backward()
        if boundary:
            if lr_at is not None:
                scale_lr(opt, lr_at(step))
            if grad_clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            opt_steps += 1
            if ema is not None:
                ema.update(model, step=ema_step0 + opt_steps)
        loss_sum += loss.detach().float() * len(x)
        seen += len(x)
        if (progress or on_log) and log_every and (step + 1) % log_every == 0:  # the only host sync inside the loop
            running = loss_sum.item() / seen
            bar.set_postfix(loss=f"{running:.4f}", img_s=f"{seen / (time.perf_counter() - t0):.0f}", refresh=False)
            if on_log is not None:
                on_log(step, running, opt.param_groups[0]["lr"])
    mean = loss_sum.item() / max(seen, 1)  # waits for the last step, so the time below is real
    return EpochResult(mean, seen, time.perf_counter() - t0)


@torch.no_grad()
def predict_loader(model, loader, device, amp_dtype=None, hflip_tta=False, channels_last=True, progress=True,
                   desc="predict", embeddings=True):
    """Run the model over a loader; returns (indices, probabilities (N, 6) float32, embeddings (N, F) float16
    or None). With hflip_tta the probabilities and embeddings are means over the image and its mirror.
    Outputs stay on the device until the end (no per-batch wait for the GPU)."""
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
        idx_all.append(idx)
        probs_all.append(p.float())
        if embeddings:
            emb_all.append(emb.to(torch.float16))
    if not idx_all:
        return np.zeros(0, np.int64), np.zeros((0, 6), np.float32), (np.zeros((0, 0), np.float16) if embeddings else None)
    idx = torch.cat(idx_all).numpy()
    probs = torch.cat(probs_all).cpu().numpy()
    return idx, probs, (torch.cat(emb_all).cpu().numpy() if embeddings else None)
