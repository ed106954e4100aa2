"""Settings: one dataclass of commented defaults per step, and the one command-line convention of all steps.

    python -m src.train --fold 0 --model resnet18 --img-size 256 --epochs 5
    python -m src.train --fold 0 --config configs/seresnext50_256.yaml --lr 3e-4   # file, then flags
    python -m src.train --help                                                     # every setting, with its comment

Every field of a step's dataclass is a flag, in hyphenated form (`--batch-size`) with the underscore form
(`--batch_size`) kept as an alias; `--help` shows the comment written beside the field. A flag name means
one thing in every step: `--data-dir` is a Kaggle-layout data folder, `--out-dir` the outputs root
(outputs/<data folder name>), `--seed` a model's seed (folds have `--fold-seed`, generated data `--data-seed`).
Precedence: defaults < `--config` YAML file < flags. The resolved config of a training run is saved as
`config.yaml` beside its outputs and inside every checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import io
import re
import tokenize
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from .utils import PipelineError


def positional(default=None, nargs="?", help=None):
    """A dataclass field given on the command line without a flag (`python -m src.evaluate RUN ...`)."""
    if nargs in ("+", "*"):
        return field(default_factory=list, metadata={"positional": nargs})
    return field(default=default, metadata={"positional": nargs})


def short(default, flag: str):
    """A field that also has a one-letter flag (submit's -m)."""
    return field(default=default, metadata={"short": flag})


@dataclass
class TrainConfig:
    # --- data ---
    data_dir: str = "input"            # Kaggle-layout folder (stage_2_train.csv, stage_2_*_images/)
    out_dir: str = ""                  # outputs root; default outputs/<data folder name>
    k: int = 5                         # number of folds (selects folds/<data>_k{k}_seed{fold_seed}.csv)
    fold_seed: int = 42                # seed the folds file was made with
    folds_file: str = ""               # explicit folds CSV (overrides the k / fold_seed lookup)
    fold: int = 0                      # validation fold trained against
    run_name: str = ""                 # OUT/runs/<run_name>/fold<fold>/; default: the --config file's name,
                                       # else <model>_<img_size> (+ _<input_mode> unless windows)
    # --- input ---
    img_size: int = 256                # network input size; the cache is resized when it differs
    input_mode: str = "windows"        # windows: brain/subdural/bone of one slice (3 ch)
                                       # slices: brain window of slices s-1, s, s+1 (3 ch, "2.5D")
                                       # slices_windows: all three windows of s-1, s, s+1 (9 ch)
    # --- augmentation (train only) ---
    hflip: float = 0.5                 # left-right flip probability (heads are near-symmetric)
    vflip: float = 0.0                 # up-down flip probability
    affine: float = 0.7                # probability of a small shift/scale/rotate
    max_shift: float = 0.06            # fraction of the image size
    max_scale: float = 0.1             # relative zoom, +-
    max_rotate: float = 15.0           # degrees, +-
    crop_border: bool = False          # crop empty (air) border around the head before resizing
    balanced: float = 0.0              # 0: plain shuffling; >0: draw this share of each epoch from positive slices
    tta: str = "hflip"                 # test-time augmentation of the OOF and the test predictions alike: hflip, none
    # --- model ---
    model: str = "resnet18"            # any timm model name
    pretrained: bool = False           # timm's ImageNet weights (needs network access once)
    weights: str = ""                  # local .pth/.safetensors backbone weights (offline machines, Kaggle), or a
                                       # bundle (src.export) to fine-tune: its stage-1 network, head included
    weights_fold: int = -1             # with a bundle as --weights: which of its folds (-1: the same as --fold)
    drop_rate: float = 0.0             # dropout before the classifier
    # --- optimisation ---
    epochs: int = 5                    # passes over the training folds
    batch_size: int = 32               # per process
    accum_steps: int = 1               # gradient accumulation: optimizer step every N batches
    lr: float = 1e-3                   # peak learning rate (AdamW), reached after warmup
    weight_decay: float = 1e-4         # AdamW weight decay (not on biases and norms)
    warmup: float = 0.1                # share of training spent in linear warmup; then cosine to 0
    grad_clip: float = 1.0             # max gradient norm (0: off)
    ema: float = 0.0                   # decay of an exponential moving average of the weights (0: off); the
                                       # average is what the run validates and predicts with, its decay warming up
                                       # from 0 over the first steps (timm ModelEmaV3); the raw weights are scored
                                       # once, after the last epoch (every epoch with --validate-raw)
    amp: str = "auto"                  # auto (CUDA: bf16 if supported else fp16+GradScaler; CPU: bf16 where the
                                       # CPU has it natively, else float32), fp16, bf16, off
    channels_last: bool = True         # NHWC memory layout (faster convolutions with AMP)
    seed: int = 0                      # model init, shuffling and augmentation all follow from it
    max_steps_per_epoch: int = 0       # cap on batches per epoch (smoke tests, rehearsals); 0: all
    # --- run control (not part of the run's fingerprint) ---
    workers: int = 2                   # data loader processes
    device: str = "auto"               # auto, cpu, cuda
    log_every: int = 50                # steps between loss readings (each one waits for the GPU)
    val_batch_size: int = 0            # images per forward pass of validation and the OOF pass (0: by device,
                                       # src.engine.infer_batch_size: 256 on CUDA, 64 on the CPU; docs/gpu.md)
    validate_raw: bool = False         # under EMA, also score the raw weights every epoch (a second validation
                                       # pass each epoch); else once, after the last epoch
    tensorboard: bool = True           # TensorBoard curves in the fold's tb/ folder: loss and lr every log_every
                                       # steps, validation figures every epoch (tensorboard --logdir OUT/runs)
    resume: bool = False               # continue from last.pth of this fold if it exists
    overwrite: bool = False            # redo a fold that was trained with other settings (else: stop and say)
    stop_after_epochs: int = 0         # end this invocation after N epochs (time-boxed jobs); --resume continues

    def __post_init__(self):
        if self.input_mode not in ("windows", "slices", "slices_windows"):
            raise PipelineError(f"input_mode must be windows, slices or slices_windows, not {self.input_mode!r}")
        if self.amp not in ("auto", "fp16", "bf16", "off"):
            raise PipelineError(f"amp must be auto, fp16, bf16 or off, not {self.amp!r}")
        if self.tta not in ("hflip", "none"):
            raise PipelineError(f"tta must be hflip or none, not {self.tta!r}")
        if not 0 <= self.balanced < 1:
            raise PipelineError("balanced must be in [0, 1)")
        if not self.run_name:
            self.run_name = default_run_name(self.model, self.img_size, self.input_mode)

    @property
    def in_chans(self) -> int:
        return 9 if self.input_mode == "slices_windows" else 3


# settings that say how or where a step runs, not what it computes: left out of fingerprints
RUN_CONTROL = {"data_dir", "out_dir", "folds_file", "run_name", "workers", "device", "log_every", "resume",
               "overwrite", "stop_after_epochs", "stage1", "threads", "tensorboard", "val_batch_size", "validate_raw"}


def default_run_name(model: str, img_size: int, input_mode: str = "windows") -> str:
    return f"{model}_{img_size}" + ("" if input_mode == "windows" else f"_{input_mode}")


def result_settings(cfg) -> dict:
    """The settings of a config that change what a step computes (its fingerprint's settings)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUN_CONTROL}


def _parse_bool(v) -> bool:
    """A flag's or a file's boolean: true/false, yes/no, on/off, 1/0 (YAML has already made `true` a bool)."""
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    if isinstance(v, str):
        if v.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if v.strip().lower() in ("0", "false", "no", "off"):
            return False
    return _refuse(v, "true or false")


def _parse_int(v) -> int:
    """A whole number from a flag or a file: 3, "3", 3.0; never a bool (YAML's `yes`) or a fraction (2.5 is not 2)."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and re.fullmatch(r"\s*[-+]?\d+\s*", v):
        return int(v)
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    return _refuse(v, "a whole number")


def _parse_float(v) -> float:
    """A number from a flag or a file: 0.5, "2e-3" (YAML 1.1 reads `2e-3` as text), 3."""
    if not isinstance(v, bool) and isinstance(v, (int, float, str)):
        try:
            return float(v)
        except ValueError:
            pass
    return _refuse(v, "a number")


def _parse_str(v) -> str:
    """Text; a number in a file is taken as its text (run_name: 2024); a list or a bool is refused."""
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        return _refuse(v, "text")
    return str(v)


def _parse_list(v) -> list:
    """A list of texts: a YAML list, or one text of space-separated items."""
    if isinstance(v, str):
        return v.split()
    if isinstance(v, (list, tuple)) and all(isinstance(x, (str, int, float)) and not isinstance(x, bool) for x in v):
        return [str(x) for x in v]
    return _refuse(v, "a list of texts")


def _refuse(v, what):
    # ArgumentTypeError: argparse prints its message as it is ("argument --epochs: expected a whole number, ...")
    raise argparse.ArgumentTypeError(f"expected {what}, got {v!r}")


# by annotation text; each takes a flag's string or a value YAML already typed
_TYPES = {"int": _parse_int, "float": _parse_float, "str": _parse_str, "bool": _parse_bool, "list[str]": _parse_list}


def type_name(f) -> str:
    """A field's annotation as text ("int", "list[str]"), whether or not its module postpones annotations."""
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", None) if not hasattr(f.type, "__args__") \
        else str(f.type)


@functools.lru_cache(maxsize=None)
def field_comments(cls) -> dict[str, str]:
    """The comment beside each field in the class's source, continued on the comment-only lines below it."""
    out, current, line = {}, None, -1
    for tok in tokenize.generate_tokens(io.StringIO(inspect.getsource(cls)).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4:  # a statement of the class body
            current = tok.string if re.match(r"\s{4}\w+\s*:", tok.line) else None
            line = tok.start[0]
        elif tok.type == tokenize.COMMENT and current:
            text = tok.string.lstrip("#").strip()
            if tok.start[0] == line:
                out[current] = text
            elif current in out and tok.line.strip().startswith("#") and not text.startswith("---"):
                out[current] += " " + text
    return out


def build_parser(cls, description=None, prog=None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    comments = field_comments(cls)
    ap.add_argument("--config", default=None, help="YAML file of settings (flags win over it)")
    for f in fields(cls):
        typ = type_name(f)
        default = f.default if f.default is not dataclasses.MISSING else (f.default_factory() if f.default_factory
                                                                           is not dataclasses.MISSING else None)
        help_ = comments.get(f.name, "").replace("%", "%%")  # argparse formats help with %
        if "positional" in f.metadata:
            ap.add_argument(f.name, nargs=f.metadata["positional"], default=None,
                            help=f"{help_} (default: {default})" if default not in (None, [], "") else help_)
            continue
        names = ([f.metadata["short"]] if "short" in f.metadata else []) + [f"--{f.name.replace('_', '-')}"]
        if "_" in f.name:
            names.append(f"--{f.name}")
        shown = f"{help_} (default: {default!r})" if help_ else f"(default: {default!r})"
        if typ == "bool":  # `--resume` alone means true; `--resume false` also works
            ap.add_argument(*names, dest=f.name, type=_parse_bool, nargs="?", const=True, default=None, help=shown)
        elif typ.startswith("list"):
            ap.add_argument(*names, dest=f.name, nargs="+", default=None, help=shown)
        else:
            ap.add_argument(*names, dest=f.name, type=_TYPES.get(typ, str), default=None, help=shown)
    return ap


def parse_config(cls, argv=None, description=None, prog=None):
    """Defaults < --config YAML < flags -> an instance of cls. A YAML file named NAME.yaml also names the run
    (run_name NAME) when the class has a run_name and neither the file nor a flag sets it."""
    a = build_parser(cls, description, prog).parse_args(argv)
    values = {}
    if a.config:
        values.update(load_yaml(a.config, cls))
        if "run_name" in {f.name for f in fields(cls)}:
            values.setdefault("run_name", Path(a.config).stem)
    values.update({k: v for k, v in vars(a).items() if k != "config" and v is not None})
    return cls(**values)



def load_yaml(path, cls) -> dict:
    """A YAML file of settings, each coerced to its field's type (YAML reads `2e-3` as a string)."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise PipelineError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: expected 'setting: value' lines")
    types = {f.name: type_name(f) for f in fields(cls)}
    unknown = sorted(set(data) - set(types))
    if unknown:
        raise PipelineError(f"{path}: unknown setting(s) {unknown}; see --help for the known ones")
    out = {}
    for k, v in data.items():
        if v is None:
            raise PipelineError(f"{path}: {k}: has no value (write '{k}: VALUE', or leave the line out for the default)")
        try:
            out[k] = _TYPES[types[k]](v)
        except argparse.ArgumentTypeError as e:
            raise PipelineError(f"{path}: {k}: {e}") from e
    return out


def save_yaml(cfg, path) -> None:
    from .utils import atomic_write
    with atomic_write(path) as f:
        yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)
