"""Choose stage-1 defaults by measurement over several seeds, and the blend on small data.

    python bench/stage1_defaults.py ../shared/rsna_sample --k 3 --seeds 3                  # the default arms
    python bench/stage1_defaults.py ../shared/rsna_sample --k 3 --seeds 3 --arms "" "lr=0.001" "img_size=96"
    python bench/stage1_defaults.py ../shared/rsna_sample --k 3 --seeds 3 --arms "" --stage2   # + GRU, trees, blends
    python bench/stage1_defaults.py input/demo --k 5 --seeds 1 --arms "" "lr=0.002,warmup=0.3,ema=0.9"

An arm is a set of changes to the spec (configs/resnet10t_128.yaml by default; "" is the spec as it is). For each
seed s, the folds are made with seed s (other patients in each fold) and the model trains with seed s, so the
spread over seeds holds both the data split's luck and the training's. Every arm trains all K folds per seed;
arms of the same seed share the folds, so their difference is paired. Printed per arm: the out-of-fold weighted
log loss and its ratio to the prior (each image: its training folds' label frequencies), mean and standard
deviation over seeds, the AUC of `any`, and the paired gap to the first arm, flagged `*` only when the mean gap
is larger than twice its standard error over seeds: smaller gaps are what the seed alone moves.

--stage2 also fits, per seed, both stage-2 models of the arm's run (GRU on the stage-1 logits, as run.sh does on
the CPU, and the trees), then scores blends cross-fitted (each fold mixed with weights fitted on the other
folds): per-class weights, one weight per member, the best single member (chosen on the other folds), and
per-class weights shrunk halfway toward equal.

Runs go to OUT/runs/bench_<arm>_s<seed>/ and are reused when rerun with the same settings; results are appended
to bench/out/stage1_defaults.jsonl; --report-only prints the table of the rows already there.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from src import layout  # noqa: E402
from src.blend import blend, fold_weights, oof_table  # noqa: E402
from src.boost import BoostConfig, train_boost  # noqa: E402
from src.config import TrainConfig, load_yaml  # noqa: E402
from src.evaluate import prior_predictions  # noqa: E402
from src.folds import make_folds  # noqa: E402
from src.labels import cached_labels  # noqa: E402
from src.layout import ROOT  # noqa: E402
from src.metrics import per_class_auc, weighted_log_loss  # noqa: E402
from src.predict import predict_run  # noqa: E402
from src.cache import load_cache  # noqa: E402
from src.prepare import prepare  # noqa: E402
from src.runs import Run  # noqa: E402
from src.sequence import SeqConfig, train_sequence  # noqa: E402
from src.train import train  # noqa: E402
from src.utils import CLASSES, write_csv  # noqa: E402

DEFAULT_ARMS = ["", "lr=0.001", "lr=0.004", "warmup=0.1", "ema=0", "ema=0.99", "epochs=4", "epochs=10",
                "img_size=96", "img_size=160", "input_mode=slices"]
TYPES = {"lr": float, "warmup": float, "ema": float, "epochs": int, "img_size": int, "batch_size": int,
         "input_mode": str, "max_rotate": float, "affine": float, "drop_rate": float, "weight_decay": float,
         "hflip": float, "balanced": float, "model": str, "crop_border": lambda v: v in ("1", "true", "True")}
BLENDS = ("per class", "one per member", "best member", "per class, shrunk to equal")


def parse_arm(text: str) -> dict:
    out = {}
    for kv in filter(None, text.split(",")):
        k, v = kv.split("=")
        out[k] = TYPES.get(k, float)(v)
    return out


def arm_name(text: str) -> str:
    return "bench_" + (text.replace("=", "").replace(",", "_").replace(".", "p") or "spec")


def out_for(data_dir, size: int, spec_size: int) -> Path:
    """The spec's own outputs folder (its cache at the spec's size, as run.sh builds it), or, for an arm of another
    image size, a folder whose cache is built at that size: images are never up- or down-sampled from another cache."""
    out = layout.out_root(data_dir)
    if size != spec_size:
        out = out.with_name(f"{out.name}_bench{size}")
    if not (out / "cache" / "images.bin").exists():
        prepare(data_dir, out / "cache", size=size, quiet=True)
    return out


def run_arm(a, spec, change, name, seed, folds_file) -> Run:
    cfg = {**spec, **change, "data_dir": a.data_dir, "k": a.k, "folds_file": str(folds_file), "run_name": name,
           "workers": a.workers, "log_every": 0, "seed": seed, "tensorboard": False}
    cfg["out_dir"] = str(out_for(a.data_dir, cfg["img_size"], spec["img_size"]))
    for fold in range(a.k):
        train(TrainConfig(**{**cfg, "fold": fold}))
    return Run(layout.run_dir(Path(cfg["out_dir"]), name))


def blend_scores(run: Run, labels) -> dict:
    """Cross-fitted OOF losses of the blend variants of the run, its GRU and its trees."""
    predict_run(run.path, quiet=True)
    for k in run.folds():
        train_sequence(SeqConfig(stage1=str(run.path), fold=k, features="logits"))
        train_boost(BoostConfig(stage1=str(run.path), fold=k, threads=2))
    members = run.family()
    _, y, preds, folds = oof_table([m.load_oof(quiet=True) for m in members], labels)
    out = {f"member {m.name.split('_')[0] if m.is_stage2() else 'stage1'}": weighted_log_loss(y, p)
           for m, p in zip(members, preds)}
    fw = {"per class": fold_weights("fit", y, preds, folds), "one per member": fold_weights("fit-global", y, preds, folds),
          "best member": fold_weights("best", y, preds, folds),  # the member best on the other folds, alone
          "per class, shrunk to equal": fold_weights("fit", y, preds, folds, shrink=0.5)}
    for kind in BLENDS:
        mixed = np.zeros_like(preds[0])
        for f in np.unique(folds):
            te = folds == f
            mixed[te] = blend([p[te] for p in preds], fw[kind][int(f)])
        out[f"blend {kind}"] = weighted_log_loss(y, mixed)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 of the folds and the model")
    ap.add_argument("--spec", default=str(ROOT / "configs" / "resnet10t_128.yaml"))
    ap.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, help="comma-separated setting=value changes per arm")
    ap.add_argument("--stage2", action="store_true", help="also GRU, trees and blend variants per seed")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--report-only", action="store_true",
                    help="print the table of the arms' rows already in bench/out/stage1_defaults.jsonl (the latest row "
                         "of each arm and seed), training nothing")
    a = ap.parse_args()
    log = ROOT / "bench" / "out" / "stage1_defaults.jsonl"
    if a.report_only:
        df = pd.DataFrame([json.loads(line) for line in log.read_text().splitlines() if line.strip()])
        df = df[(df["data"] == Path(a.data_dir).resolve().name) & (df["k"] == a.k) & (df["seed"] < a.seeds)]
        arms = [arm or "(spec)" for arm in a.arms]
        df = df[df["arm"].isin(arms)].drop_duplicates(["arm", "seed"], keep="last")
        df = df.sort_values("arm", key=lambda c: c.map(arms.index), kind="stable")
        print(summary(df.dropna(axis=1, how="all")))
        return
    spec = load_yaml(a.spec, TrainConfig)
    out = out_for(a.data_dir, spec["img_size"], spec["img_size"])
    _, meta = load_cache(out / "cache")
    labels, _ = cached_labels(a.data_dir)
    ok = meta[(meta.split == "train") & (meta.status == "ok")].set_index("ID")
    rows = []
    log.parent.mkdir(parents=True, exist_ok=True)
    for seed in range(a.seeds):
        folds_file = out / f"bench_folds_k{a.k}_s{seed}.csv"
        if not folds_file.exists():
            write_csv(make_folds(labels, ok["PatientID"], a.k, seed), folds_file)
        for arm in a.arms:
            t0 = time.time()
            run = run_arm(a, spec, parse_arm(arm), f"{arm_name(arm)}_s{seed}", seed, folds_file)
            oof = run.load_oof(quiet=True)
            y = labels.loc[oof.index, CLASSES].to_numpy()
            p = oof[CLASSES].to_numpy()
            prior = weighted_log_loss(y, prior_predictions(labels.loc[oof.index], oof["fold"]))
            row = {"data": Path(a.data_dir).resolve().name, "k": a.k, "arm": arm or "(spec)", "seed": seed,
                   "wll": weighted_log_loss(y, p), "prior": prior, "auc_any": float(per_class_auc(y, p)[-1]),
                   "minutes": (time.time() - t0) / 60}
            if a.stage2:
                row.update(blend_scores(run, labels))
            row["ratio"] = row["wll"] / prior
            rows.append(row)
            with open(log, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    print(summary(pd.DataFrame(rows)))


def summary(df: pd.DataFrame) -> str:
    """Per arm: mean and sd over seeds, and the paired gap to the first arm with its flag."""
    metrics = [c for c in df.columns if c == "wll" or c == "ratio" or c == "auc_any" or c.startswith(("member", "blend"))]
    first = df["arm"].iloc[0]
    lines = [f"{df['data'].iloc[0]}, K={df['k'].iloc[0]}, seeds {sorted(int(s) for s in df['seed'].unique())}",
             "| arm | " + " | ".join(f"{m} (mean +- sd)" for m in metrics) + " | gap in wll to " + first + " |",
             "|---|" + "---:|" * (len(metrics) + 1)]
    base = df[df.arm == first].set_index("seed")["wll"]
    for arm, g in df.groupby("arm", sort=False):
        g = g.set_index("seed")
        cells = [f"{g[m].mean():.4f} +- {g[m].std(ddof=1) if len(g) > 1 else float('nan'):.4f}" for m in metrics]
        d = (g["wll"] - base.reindex(g.index)).dropna()
        se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
        flag = " *" if arm != first and len(d) > 1 and abs(d.mean()) > 2 * se else ""
        gap = "-" if arm == first else f"{d.mean():+.4f} (se {se:.4f}){flag}"
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {gap} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
