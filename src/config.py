"""Training configuration: one dataclass of commented defaults, overridable from the command line.

    python -m src.train --fold 0 --model resnet18 --img_size 256 --epochs 5
    python -m src.train --fold 0 --config configs/seresnext50_512.yaml --lr 3e-4   # file, then flags

Precedence: defaults < `--config` YAML file < command-line flags. The resolved config is saved as
`config.yaml` in the run's fold directory and inside every checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from .utils import PipelineError


@dataclass
class TrainConfig:
    # --- data ---
    data_dir: str = "input"            # Kaggle-layout folder (stage_2_train.csv, stage_2_*_images/)
    out_dir: str = ""                  # outputs root; default outputs/<data folder name>
    k: int = 5                         # number of folds (selects folds/<tag>_k{k}_seed{fold_seed}.csv)
    fold_seed: int = 42
    folds_file: str = ""               # explicit folds CSV (overrides k / fold_seed lookup)
    fold: int = 0                      # validation fold trained against
    run_name: str = "resnet18_256"     # outputs go to OUT/runs/<run_name>/fold<fold>/
    # --- input ---
    img_size: int = 256                # network input size; the cache is resized when it differs
    input_mode: str = "windows"        # windows: brain/subdural/bone of one slice (3 ch)
                                       # slices: brain window of slices s-1, s, s+1 (3 ch, "2.5D")
                                       # slices_windows: all three windows of s-1, s, s+1 (9 ch)
    # --- augmentation (train only) ---
    hflip: float = 0.5                 # left-right flip probability (heads are near-symmetric)
    vflip: float = 0.0
    affine: float = 0.7                # probability of a small shift/scale/rotate
    max_shift: float = 0.06            # fraction of the image size
    max_scale: float = 0.1
    max_rotate: float = 15.0           # degrees
    crop_border: bool = False          # crop empty (air) border around the head before resizing
    balanced: float = 0.0              # 0: plain shuffling; >0: draw this share of each epoch from positive slices
    # --- model ---
    model: str = "resnet18"            # any timm model name
    pretrained: bool = False           # timm's ImageNet weights (needs network access once)
    weights: str = ""                  # local .pth/.safetensors backbone weights (offline machines, Kaggle)
    drop_rate: float = 0.0             # dropout before the classifier
    # --- optimisation ---
    epochs: int = 5
    batch_size: int = 32               # per process
    accum_steps: int = 1               # gradient accumulation: optimizer step every N batches
    lr: float = 1e-3                   # peak learning rate (AdamW), reached after warmup
    weight_decay: float = 1e-4
    warmup: float = 0.1                # share of all optimizer steps spent in linear warmup; then cosine to 0
    grad_clip: float = 1.0             # max gradient norm (0: off)
    amp: str = "auto"                  # auto (CUDA: bf16 if supported else fp16+GradScaler; CPU: bf16), fp16, bf16, off
    channels_last: bool = True
    workers: int = 2                   # data loader processes
    seed: int = 0                      # model init, shuffling and augmentation all follow from it
    device: str = "auto"               # auto, cpu, cuda
    # --- run control ---
    resume: bool = False               # continue from last.pth of this fold if it exists
    stop_after_epochs: int = 0         # end this invocation after N epochs (time-boxed jobs); --resume continues
    max_steps_per_epoch: int = 0       # cap on batches per epoch (smoke tests); 0: all

    def __post_init__(self):
        if self.input_mode not in ("windows", "slices", "slices_windows"):
            raise PipelineError(f"input_mode must be windows, slices or slices_windows, not {self.input_mode!r}")
        if self.amp not in ("auto", "fp16", "bf16", "off"):
            raise PipelineError(f"amp must be auto, fp16, bf16 or off, not {self.amp!r}")
        if not 0 <= self.balanced < 1:
            raise PipelineError("balanced must be in [0, 1)")

    @property
    def in_chans(self) -> int:
        return 9 if self.input_mode == "slices_windows" else 3


def _parse_bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def add_dataclass_args(ap: argparse.ArgumentParser, cls) -> None:
    for f in fields(cls):
        typ = _parse_bool if f.type in (bool, "bool") else {"int": int, "float": float, "str": str}.get(f.type, f.type)
        if f.type in (bool, "bool"):
            # `--resume` alone means true; `--resume false` also works
            ap.add_argument(f"--{f.name}", type=typ, nargs="?", const=True, default=None)
        else:
            ap.add_argument(f"--{f.name}", type=typ, default=None)


def config_from_args(cls, argv=None, description=None):
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="YAML file of overrides (flags win over it)")
    add_dataclass_args(ap, cls)
    a = ap.parse_args(argv)
    values = {}
    if a.config:
        values.update(load_yaml(a.config, cls))
    values.update({k: v for k, v in vars(a).items() if k != "config" and v is not None})
    return cls(**values)


def load_yaml(path, cls) -> dict:
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise PipelineError(f"{path}: unknown setting(s) {unknown}")
    return data


def save_yaml(cfg, path) -> None:
    from .utils import atomic_write
    with atomic_write(path) as f:
        yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)
