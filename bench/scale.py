"""Scale rehearsal: every step of run.sh on generated data at two sizes, with the time and memory of each step,
their growth between the sizes, and the projection to the competition's 874,035 slices.

    python bench/scale.py                                      # 12,500 and 100,000 slices (1/8 of the full set)
    python bench/scale.py --sizes 5000 40000 --work /scratch/rehearsal --train-steps 10

1. A base data set is generated once (src.synth, 256-px slices, about 1,250 files).
2. For each size it is replicated under new patient, study, series and image IDs into a Kaggle-layout folder.
   The IDs are patched in the files' bytes (they are fixed-length strings), so a copy costs a write, not a
   DICOM encode: 100,000 files take about a minute. Labels and the sample submission follow the new IDs.
3. `bash run.sh` runs on it, exactly as a user runs it, with DEVICE_CONFIG=cpu (configs/resnet10t_128.yaml,
   128-px cache, 5 folds) and stage-1 training capped: one epoch of --train-steps batches. Everything else
   runs in full: the cache, the folds, each fold's validation and out-of-fold pass, test predictions, both
   stage-2 models, the reports and the blend.
4. A poller samples the memory of run.sh's process tree every 0.2 s: the proportional set size of anonymous
   and shared memory over all processes (loader workers' and decoders' included; the cache file's pages are
   page cache and are not counted).
5. Per step (run.sh's [run ] / [done] lines, folds summed): seconds and peak memory at both sizes, the
   exponent b of t ~ N^b, and the projection t(N2) x (874,035 / N2)^max(1, b): at least linear, because fixed
   start-up costs make small runs look sub-linear. Steps other than capped training must have b <= 1.15.

Writes WORK/scale.json and prints a Markdown table; also the loader's per-sample cost for 3 and 9 channels on the
large rehearsal's cache (the compact images.bin of src.prepare; bench/sample_cost.py), cold (its pages evicted
first: the first samples read the disk while the loader's background prefetch reads the file) and warm.
`--report-only` prints the table of an earlier rehearsal again. Needs about 19 GB of disk per 100,000 slices (13 GB
of DICOMs, 6 GB of outputs).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from joblib import Parallel, delayed

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from src.labels import to_long  # noqa: E402
from src import layout  # noqa: E402
from src.layout import SPLITS, SYNTHETIC_MARKER  # noqa: E402
from src.prepare import list_files  # noqa: E402
from src.synth import generate  # noqa: E402
from src.utils import CLASSES, write_csv  # noqa: E402

FULL = 874_035
STEP_KINDS = [("prepare cache", "prepare cache"), ("folds", "folds"), ("train", "train (5 folds, capped)"),
              ("evaluate stage 1 vs", "evaluate (members)"), ("evaluate", "evaluate (stage 1)"),
              ("predict", "predict (test, 5 folds)"), ("sequence", "stage 2: GRU (5 folds)"),
              ("boost", "stage 2: LightGBM (5 folds)"), ("blend", "blend"), ("bundle", "bundle (model file)"),
              ("submission", "submission")]


# ---------------------------------------------------------------- data
def base_set(work: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(files with their IDs, long label rows) of the base data set, generated once."""
    base = work / "base"
    if not (base / "stage_2_sample_submission.csv").exists():
        generate(base, n_patients=40, n_test_series=8, image_size=256, seed=0, overwrite=True, quiet=True)
    files = list_files(base)
    heads = [pydicom.dcmread(p, stop_before_pixels=True) for p in files["path"]]
    for tag in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID"):
        files[tag] = [str(h.get(tag, "")) for h in heads]
    return files, pd.read_csv(base / "stage_2_train.csv", dtype=str)


def new_id(old: str, replica: int, taken: set) -> str:
    """An ID of the same length and alphabet as `old`, unique in `taken` (the bytes of the file keep their size)."""
    salt = 0
    while True:
        h = hashlib.sha256(f"{old}/{replica}/{salt}".encode()).hexdigest()[: len(old) - 3]
        nid = "ID_" + h
        if nid not in taken:
            taken.add(nid)
            return nid
        salt += 1


def _write_chunk(jobs):
    for src, dst, pairs in jobs:
        data = Path(src).read_bytes()
        for old, new in pairs:
            data = data.replace(old.encode(), new.encode())
        Path(dst).write_bytes(data)


def replicate(work: Path, n: int) -> Path:
    """A Kaggle-layout folder of about n slices: whole series of the base set, replica after replica."""
    out = work / f"data_{n}"
    if (out / "stage_2_sample_submission.csv").exists():
        return out
    files, labels_long = base_set(work)
    for sub in SPLITS.values():
        (out / sub).mkdir(parents=True, exist_ok=True)
    series = list(files.groupby("SeriesInstanceUID", sort=False))
    taken, jobs, id_map, total, r = set(), [], {}, 0, 0
    while total < n:
        for uid, g in series:
            if total >= n:
                break
            ids = {c: {v: new_id(v, r, taken) for v in g[c].unique()} for c in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID")}
            for row in g.itertuples():
                img = new_id(row.ID, r, taken)
                id_map[(row.ID, r)] = img
                pairs = [(row.ID, img)] + [(old, new) for m in ids.values() for old, new in m.items()]
                jobs.append((row.path, str(out / SPLITS[row.split] / f"{img}.dcm"), pairs))
            total += len(g)
        r += 1
    Parallel(n_jobs=os.cpu_count())(delayed(_write_chunk)(jobs[i:i + 2000]) for i in range(0, len(jobs), 2000))
    # labels: the base's long rows (duplicates included) under the new IDs, replica by replica
    lab = labels_long.assign(image=labels_long["ID"].str.rsplit("_", n=1).str[0],
                             subtype=labels_long["ID"].str.rsplit("_", n=1).str[1])
    rows = [lab.assign(ID=lab["image"].map(lambda i, r=r: id_map.get((i, r))) + "_" + lab["subtype"])
            for r in range(r)]
    long = pd.concat(rows).dropna(subset=["ID"])[["ID", "Label"]]
    write_csv(long, out / "stage_2_train.csv", index=False)
    split_of = dict(zip(files["ID"], files["split"]))
    test = [new for (old, _), new in id_map.items() if split_of[old] == "test"]
    write_csv(to_long(pd.DataFrame(0.5, index=pd.Index(test, name="ID"), columns=CLASSES)),
              out / "stage_2_sample_submission.csv", index=False)
    (out / SYNTHETIC_MARKER).write_text(f"bench/scale.py replica of src.synth data, {total} slices\n")
    return out


# ---------------------------------------------------------------- measurement
def tree(pid: int) -> list[int]:
    """pid and all its descendants, from /proc."""
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def tree_memory_kb(pid: int) -> int:
    total = 0
    for p in tree(pid):
        try:
            text = Path(f"/proc/{p}/smaps_rollup").read_text()
        except OSError:
            continue
        total += sum(int(m) for m in re.findall(r"^Pss_(?:Anon|Shmem):\s+(\d+)", text, re.M))
    return total


def run_pipeline(data: Path, work: Path, n: int, train_steps: int) -> dict:
    """bash run.sh on `data`; per step: seconds and peak memory (MB)."""
    tag = f"out_{n}"
    # a rehearsal measures a whole run: outputs of an earlier (or killed) one would make steps skip
    for old in (work / tag, work / f"folds_{n}.csv", work / f"subs_{n}"):
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
    env = {**os.environ, "INPUT_DIR": str(data), "OUT_DIR": str(work / tag), "K": "5", "DEVICE_CONFIG": "cpu",
           "FOLDS_FILE": str(work / f"folds_{n}.csv"), "SUBMISSIONS_DIR": str(work / f"subs_{n}"),
           "TRAIN_FLAGS": f"--epochs 1 --max-steps-per-epoch {train_steps}", "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(["bash", "run.sh"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    samples, events, log = [], [], open(work / f"run_{n}.log", "w")
    done = threading.Event()

    def poll():
        while not done.is_set():
            samples.append((time.time(), tree_memory_kb(p.pid)))
            time.sleep(0.2)

    threading.Thread(target=poll, daemon=True).start()
    for line in p.stdout:
        log.write(line)
        m = re.match(r"\[(run |done|skip)\] (.+?)(?: in \d+s| \(up to date\))?$", line.strip())
        if m:
            events.append((time.time(), m.group(1), m.group(2)))
    p.wait()
    done.set()
    log.close()
    if p.returncode != 0:
        raise SystemExit(f"run.sh failed at size {n}: see {work / f'run_{n}.log'}")
    steps, start = {}, {}
    for t, kind, name in events:
        if kind == "run ":
            start[name] = t
        elif kind == "done" and name in start:
            mem = max((kb for ts, kb in samples if start[name] <= ts <= t), default=0) / 1024
            steps[name] = {"seconds": t - start[name], "peak_mb": mem}
    return steps


def kind_of(name: str) -> str:
    return next(label for prefix, label in STEP_KINDS if name.startswith(prefix))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs=2, default=[12_500, 100_000])
    ap.add_argument("--work", default=str(ROOT / "bench" / "out" / "scale"))
    ap.add_argument("--train-steps", type=int, default=20, help="stage-1 batches per fold (one epoch)")
    ap.add_argument("--report-only", action="store_true", help="print the table of WORK/scale.json again")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    if a.report_only:
        return report(work, json.loads((work / "scale.json").read_text()), a.sizes[1])
    result = {"sizes": {}, "train_steps": a.train_steps}
    for n in a.sizes:
        t0 = time.time()
        data = replicate(work, n)
        slices = len(list_files(data))
        print(f"size {n}: {slices} slices in {data} (made in {time.time() - t0:.0f}s); running run.sh", flush=True)
        steps = run_pipeline(data, work, n, a.train_steps)
        per_kind = {}
        for name, s in steps.items():
            k = per_kind.setdefault(kind_of(name), {"seconds": 0.0, "peak_mb": 0.0, "steps": 0})
            k["seconds"] += s["seconds"]
            k["peak_mb"] = max(k["peak_mb"], s["peak_mb"])
            k["steps"] += 1
        result["sizes"][str(slices)] = {"steps": steps, "kinds": per_kind}
        (work / "scale.json").write_text(json.dumps(result, indent=2))
    report(work, result, a.sizes[1])


def drop_page_cache(path: Path):
    """Evict a file's pages from the page cache (fsync first: dirty pages cannot be dropped; no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def loader_cost(cache_dir: Path, n: int = 300) -> dict:
    """The loader's per-sample cost for 3 and 9 channels on a cache: CPU ms (all threads, page faults included)
    and wall ms, cold (the file's pages evicted first: the first samples read the disk, and the data set's
    background prefetch, PackedImages.warm, the rest) and warm (the same samples again, from the page cache)."""
    from bench.sample_cost import per_sample_ms
    from src.data import Augment, SliceDataset, neighbour_rows
    from src.cache import load_cache
    images, meta = load_cache(cache_dir)
    prev, nxt = neighbour_rows(meta)
    ok = (meta.status == "ok").to_numpy()
    out = {}
    for mode in ("windows", "slices_windows"):
        ds = SliceDataset(images, meta["row"][ok], None, prev[ok], nxt[ok], mode, images.shape[1], Augment())
        drop_page_cache(layout.cache_files(cache_dir)["images"])
        r = {}
        for state in ("cold", "warm"):
            t = time.perf_counter()
            r[f"{state}_cpu_ms"] = per_sample_ms(ds, n=n, warmup=0)
            r[f"{state}_wall_ms"] = (time.perf_counter() - t) / n * 1e3
        out[mode] = r
    return out


def report(work: Path, result: dict, large: int):
    """Print the Markdown table (and the loader's cost on the large rehearsal's cache); store both."""
    (n1, r1), (n2, r2) = [(int(k), v["kinds"]) for k, v in result["sizes"].items()]
    lines = [f"| step | s @ {n1:,} | s @ {n2:,} | exponent | projected s @ {FULL:,} | peak MB @ {n1:,} | peak MB @ {n2:,} "
             f"| memory exponent |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for _, label in STEP_KINDS:
        if label not in r1 or label not in r2:
            continue
        a1, a2 = r1[label], r2[label]
        b = math.log(a2["seconds"] / a1["seconds"]) / math.log(n2 / n1)
        bm = math.log(max(a2["peak_mb"], 1) / max(a1["peak_mb"], 1)) / math.log(n2 / n1)
        proj = a2["seconds"] * (FULL / n2) ** max(1.0, b)
        flag = " (!)" if b > 1.15 and not label.startswith("train") else ""
        lines.append(f"| {label} | {a1['seconds']:.0f} | {a2['seconds']:.0f} | {b:.2f}{flag} | {proj:,.0f} | "
                     f"{a1['peak_mb']:.0f} | {a2['peak_mb']:.0f} | {bm:.2f} |")
        result.setdefault("table", {})[label] = {"exponent": b, "projected_seconds": proj, "memory_exponent": bm}
    total2 = sum(v["seconds"] for v in r2.values())
    lines.append(f"| **whole run.sh** | {sum(v['seconds'] for v in r1.values()):.0f} | {total2:.0f} | | "
                 f"{sum(v['projected_seconds'] for v in result['table'].values()):,.0f} | | | |")
    cache = work / f"out_{large}" / "cache"
    cost = result["per_sample_ms"] = loader_cost(cache)
    (work / "scale.json").write_text(json.dumps(result, indent=2))
    print("\n".join(lines))
    print(f"\nloader per sample on {cache} with augmentation, ms (CPU / wall), cold = read from disk, warm = page cache:")
    for mode, ch in (("windows", 3), ("slices_windows", 9)):
        c = cost[mode]
        print(f"  {ch} channels: cold {c['cold_cpu_ms']:.3f} / {c['cold_wall_ms']:.3f}, "
              f"warm {c['warm_cpu_ms']:.3f} / {c['warm_wall_ms']:.3f}")

if __name__ == "__main__":
    main()
