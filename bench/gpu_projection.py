"""GPU-hours of the full pipeline's stage 1 for each GPU spec, from measured rates and the real counts.

    python bench/gpu_projection.py OUT/rates.json        # the rates bench/gpu_check.sh measured (bench/train_step.py)
    python bench/gpu_projection.py --public              # the same arithmetic on public throughput figures (a range)

The counts: the competition's 752,803 labelled training slices and 121,232 test slices; K folds (run.sh's default, 5):
a fold trains on (K-1)/K of the slices each of the spec's epochs and validates on the rest every epoch (one plain pass;
under EMA the raw weights once more after the last epoch: src/train.py); its OOF pass and its test predictions use
the spec's TTA (hflip: two forwards an image). Training time is the images at the training rate through the
spec's loader; validation passes at the plain inference rate; the OOF and test passes at the TTA rate (images/s with
both forwards), at the pipeline's inference batch (src.engine.infer_batch_size) where it was measured. Not counted:
the cache build and stage 2, which the CPU sets the pace of (docs/benchmarks.md: ~12 min for the cache's decoding, ~35
min for both stage-2 models on 2 cores; the GRU runs on the GPU in minutes).

--public replaces the measurement by figures from timm's published benchmarks (pytorch-image-models, results/):
training on an RTX 3090 (benchmark-train-amp-nhwc-pt112-cu113-rtx3090.csv, 224 px) and inference on an RTX 4090
(benchmark-infer-amp-nhwc-pt240-cu124-rtx4090.csv, 224 and 288 px), scaled to 256 px (training as 1/pixels; inference
on the power law through its 224 and 288 px figures) and to one H100 by assumed factors (training 2.5-4x a 3090,
inference 1.5-2.5x a 4090: between the ratios of memory bandwidth, ~3.5x, and of dense bf16 tensor throughput, 6-14x,
which eager convnets do not reach). A range to plan with, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TRAIN_SLICES, TEST_SLICES = 752_803, 121_232
INFER_BATCH_CUDA = 256  # src.engine.infer_batch_size on CUDA (tests/test_specs.py checks that they agree)

# timm's published images/s: (training at 224 px on an RTX 3090, inference at 224 and 288 px on an RTX 4090)
PUBLIC = {"seresnext50_256": ("seresnext50_32x4d", 814.69, 3641.64, 2170.0),
          "densenet121_256_25d": ("densenet121", 913.65, 3896.08, 2267.9)}
H100_OVER_3090_TRAIN, H100_OVER_4090_INFER = (2.5, 4.0), (1.5, 2.5)


def folds_default() -> int:
    """run.sh's K (5 unless the data is the generated demo)."""
    m = re.search(r"^K=\$\{K:-(\d+)\}", (ROOT / "run.sh").read_text(), re.M)
    return int(m.group(1)) if m else 5


def spec_settings(name: str) -> dict:
    """epochs, ema, tta and validate_raw of configs/<name>.yaml (TrainConfig's defaults where the file is silent)."""
    from src.config import TrainConfig, parse_config
    cfg = parse_config(TrainConfig, ["--config", str(ROOT / "configs" / f"{name}.yaml")])
    return {"epochs": cfg.epochs, "ema": cfg.ema, "tta": cfg.tta, "validate_raw": cfg.validate_raw}


def public_rates(end: int) -> dict:
    """rates.json-shaped figures from PUBLIC at the low (end 0) or high (end 1) assumption."""
    specs = {}
    for name, (_, train224, inf224, inf288) in PUBLIC.items():
        b = math.log(inf224 / inf288) / math.log((288 / 224) ** 2)  # inference rate ~ pixels^-b
        plain = inf224 * (224 / 256) ** (2 * b) * H100_OVER_4090_INFER[end]
        specs[name] = {"train_loader_images_per_s": train224 * (224 / 256) ** 2 * H100_OVER_3090_TRAIN[end],
                       "infer_plain_images_per_s": plain, "infer_batch_size": INFER_BATCH_CUDA,
                       "infer_tta": {str(INFER_BATCH_CUDA): {"images_per_s": plain / 2}}}
    return {"device": {"name": f"one H100, public figures scaled ({'low' if end == 0 else 'high'} end)"},
            "specs": specs}


def tta_rate(r: dict) -> tuple[float, str]:
    """The TTA rate at the pipeline's batch where measured, else the best measured; and which batch it was."""
    tta = {int(b): v["images_per_s"] for b, v in r.get("infer_tta", {}).items()}
    if not tta:
        return float("nan"), "-"
    b = INFER_BATCH_CUDA if INFER_BATCH_CUDA in tta else max(tta, key=tta.get)
    return tta[b], str(b)


def project(name: str, r: dict, k: int) -> dict:
    """Seconds of one spec's stage 1 over k folds, by part, and the forwards a fold runs."""
    s = spec_settings(name)
    train_n = round(TRAIN_SLICES * (k - 1) / k)
    val_n = TRAIN_SLICES - train_n
    passes = s["epochs"] * (2 if s["ema"] and s["validate_raw"] else 1) + (1 if s["ema"] and not s["validate_raw"] else 0)
    flips = 2 if s["tta"] == "hflip" else 1
    train_rate = r.get("train_loader_images_per_s") or r.get("train_device_images_per_s") or float("nan")
    tta, tta_batch = tta_rate(r)
    plain = r.get("infer_plain_images_per_s") or 2 * tta  # two forwards an image under TTA
    if flips == 1:
        tta = plain
    fold = {"train": s["epochs"] * train_n / train_rate, "validation": passes * val_n / plain,
            "oof_and_test": (val_n + TEST_SLICES) / tta}
    return {**{p: k * v for p, v in fold.items()}, "epochs": s["epochs"], "train_rate": train_rate, "plain": plain,
            "tta": tta, "tta_batch": tta_batch, "forwards_per_fold": passes * val_n + flips * (val_n + TEST_SLICES),
            "train_images_per_fold": s["epochs"] * train_n, "validation_passes": passes}


def table(rates: dict, k: int) -> str:
    lines = [f"device: {rates.get('device', {}).get('name', rates.get('device'))}; {k} folds; "
             f"{TRAIN_SLICES:,} training and {TEST_SLICES:,} test slices",
             "| spec | epochs | train img/s | inference img/s (plain / TTA, batch) | train images a fold | inference "
             "forwards a fold | train h | inference h | stage-1 GPU-hours |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    total = 0.0
    for name, r in rates.get("specs", {}).items():
        p = project(name, r, k)
        hours = (p["train"] + p["validation"] + p["oof_and_test"]) / 3600
        total += hours
        lines.append(f"| {name} | {p['epochs']} | {p['train_rate']:,.0f} | {p['plain']:,.0f} / {p['tta']:,.0f} "
                     f"({p['tta_batch']}) | {p['train_images_per_fold']:,} | {p['forwards_per_fold']:,} | "
                     f"{p['train'] / 3600:.2f} | {(p['validation'] + p['oof_and_test']) / 3600:.2f} | {hours:.2f} |")
    lines.append(f"| **both specs** | | | | | | | | **{total:.2f}** |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rates", nargs="?", help="rates.json from bench/gpu_check.sh (bench/train_step.py --json)")
    ap.add_argument("--public", action="store_true", help="public throughput figures instead (a low and a high end)")
    ap.add_argument("--k", type=int, default=0, help="folds (default: run.sh's)")
    a = ap.parse_args()
    k = a.k or folds_default()
    if a.public:
        print("\n\n".join(table(public_rates(end), k) for end in (0, 1)))
    elif a.rates:
        print(table(json.loads(Path(a.rates).read_text()), k))
    else:
        ap.error("give rates.json, or --public")


if __name__ == "__main__":
    main()
