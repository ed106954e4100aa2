"""Choose stage-1 defaults by measurement: weight averaging (EMA) on or off, its decay, learning rate, warmup.

    python bench/stage1_defaults.py input/demo --k 5                         # the CPU model spec on the demo data
    python bench/stage1_defaults.py ../shared/rsna_sample --k 3
    python bench/stage1_defaults.py input/demo --arms "lr=0.002" "lr=0.002,ema=0.99"   # your own arms

Every arm trains all K folds of configs/resnet10t_128.yaml with its changes (the cache and folds of the data
folder are built first if missing) and reports the out-of-fold weighted log loss, and how unstable training
was: the largest epoch-to-epoch jump of the validation loss (ratio of an epoch's to the previous epoch's,
mean over folds) and the spread of the validation loss over the epochs after the first (std of its log,
mean over folds). Runs go to OUT/runs/bench_<arm>/ and are reused when rerun with the same settings.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from src import runs  # noqa: E402
from src.config import TrainConfig, load_yaml  # noqa: E402
from src.folds import make_folds  # noqa: E402
from src.metrics import weighted_log_loss  # noqa: E402
from src.prepare import load_cache, prepare  # noqa: E402
from src.train import train  # noqa: E402
from src.utils import CLASSES, ROOT, write_csv  # noqa: E402

# EMA decays above ~0.97 coincide on the CPU spec's ~175 optimizer steps: its decay warmup caps them
DEFAULT_ARMS = ["lr=0.002", "lr=0.002,ema=0.9", "lr=0.002,ema=0.99", "lr=0.001", "lr=0.001,ema=0.99",
                "lr=0.002,warmup=0.3"]


def parse_arm(text: str) -> dict:
    out = {}
    for kv in filter(None, text.split(",")):
        k, v = kv.split("=")
        out[k] = float(v)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--spec", default=str(ROOT / "configs" / "resnet10t_128.yaml"))
    ap.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, help="comma-separated setting=value changes per arm")
    ap.add_argument("--workers", type=int, default=1)
    a = ap.parse_args()
    spec = load_yaml(a.spec, TrainConfig)
    out = runs.out_root(a.data_dir)
    if not (out / "cache" / "images.npy").exists():
        prepare(a.data_dir, out / "cache", size=spec["img_size"])
    _, meta = load_cache(out / "cache")
    labels, _ = runs.labels(a.data_dir)
    folds_file = out / "bench_folds.csv"
    ok = meta[(meta.split == "train") & (meta.status == "ok")].set_index("ID")
    write_csv(make_folds(labels, ok["PatientID"], a.k, 42), folds_file)
    rows = []
    for arm in a.arms:
        change, t0 = parse_arm(arm), time.time()
        name = "bench_" + arm.replace("=", "").replace(",", "_")
        for fold in range(a.k):
            train(TrainConfig(**{**spec, **change, "data_dir": a.data_dir, "k": a.k, "folds_file": str(folds_file),
                                 "fold": fold, "run_name": name, "workers": a.workers, "log_every": 0}))
        run = runs.Run(out / "runs" / name)
        oof = run.load_oof(quiet=True)
        jumps, spreads = [], []
        for k in run.folds():
            v = pd.read_csv(run.fold_dir(k) / runs.EPOCHS)["val_wll"].to_numpy()
            jumps.append(np.max(v[1:] / v[:-1]))
            spreads.append(np.std(np.log(v[1:])))
        rows.append({"arm": arm, "OOF wll": weighted_log_loss(labels.loc[oof.index, CLASSES].to_numpy(), oof[CLASSES].to_numpy()),
                     "largest epoch jump (x)": float(np.mean(jumps)), "std log val loss": float(np.mean(spreads)),
                     "minutes": (time.time() - t0) / 60})
        print(pd.DataFrame(rows).to_string(index=False, float_format=lambda x: f"{x:.4f}"), flush=True)
    print(f"\n{Path(a.data_dir).name}, K={a.k}, spec {Path(a.spec).name}:\n| " + " | ".join(rows[0]) + " |\n|"
          + "---|" * len(rows[0]))
    for r in rows:
        print("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")


if __name__ == "__main__":
    main()
