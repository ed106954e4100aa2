"""The Python phases of bench/gpu_check.sh (run that script, not this file): versions, data, correctness.

    python bench/gpu_check.py versions --out OUT                     # OUT/versions.json; differences from requirements.txt
    python bench/gpu_check.py data --work W --patients 16 --size 256  # generated data and its cache in W
    python bench/gpu_check.py correctness --work W --out OUT --spec configs/seresnext50_256.yaml --train-flags "..."

`correctness` runs the pipeline's steps on the generated data, each as its command line (`python -m src.<step> ...`,
the same flags run.sh passes), in this one process so torch is imported once, except the first fold, which trains
in a process of its own and is killed with SIGKILL during its second epoch, then resumed (`--resume`). Then the second
fold, the test predictions, the GRU (on CUDA when there is one) and LightGBM (on the CPU: its pip build has no CUDA)
for both folds, the blend, the report, the bundle and the submission, checked by the submission validator. Each
step's time and result go to OUT/correctness.json as they finish, so a phase cut short keeps what came before.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import runpy
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_json(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def pins(requirements: Path) -> dict[str, str]:
    """name -> pinned version of each `name==version` line of requirements.txt."""
    out = {}
    for line in requirements.read_text().splitlines():
        m = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s#;]+)", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def versions(out: Path) -> None:
    """Every pinned package's installed version against requirements.txt (read from the packages' metadata, without
    importing torch), the interpreter, the GPU and its driver."""
    from importlib.metadata import PackageNotFoundError, version
    rows = {}
    for name, pinned in pins(ROOT / "requirements.txt").items():
        try:
            have = version(name)
        except PackageNotFoundError:
            have = None
        rows[name] = {"pinned": pinned, "installed": have}
    info = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
            "cpus": os.cpu_count(), "packages": rows}
    try:  # the GPU as its driver sees it (torch's own view is in rates.json: bench/train_step.py)
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                             "--format=csv,noheader"], capture_output=True, text=True,
                                            timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["nvidia_smi"] = None
    write_json(info, out / "versions.json")
    differ = [f"{n} {r['installed']} (pinned {r['pinned']})" for n, r in rows.items() if r["installed"] not in
              (None, r["pinned"]) and r["installed"].split("+")[0] != r["pinned"]]
    missing = [n for n, r in rows.items() if r["installed"] is None]
    print(f"python {info['python']} ({sys.executable}); GPU {info['nvidia_smi']}")
    print(f"versions that differ from requirements.txt ({len(differ)}): {', '.join(differ) or 'none'}")
    print(f"pinned packages not installed ({len(missing)}): {', '.join(missing) or 'none'}")


def step(module: str, *args) -> None:
    """`python -m src.<module> args` in this process; an exit with an error status raises."""
    argv = sys.argv
    sys.argv = [f"src.{module}", *map(str, args)]
    try:
        runpy.run_module(f"src.{module}", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code not in (0, None):
            raise RuntimeError(f"python -m src.{module} {shlex.join(map(str, args))} exited with status {e.code}") from e
    finally:
        sys.argv = argv


def data(work: Path, patients: int, size: int, slices: tuple[int, int]) -> None:
    step("synth", "--data-dir", work / "data", "--patients", patients, "--test-series", 4, "--min-slices", slices[0],
         "--max-slices", slices[1], "--image-size", size, "--overwrite")
    step("prepare", work / "data", "--out-dir", work / "out", "--cache-size", size)


class Record:
    """correctness.json, rewritten after every step."""

    def __init__(self, path: Path):
        self.path, self.steps, self.checks = path, [], {}

    def run(self, name: str, fn, *args):
        t0 = time.perf_counter()
        print(f"--- {name}", flush=True)
        try:
            out = fn(*args)
        except BaseException as e:
            self.steps.append({"step": name, "seconds": round(time.perf_counter() - t0, 1), "ok": False,
                               "error": f"{type(e).__name__}: {e}"[:500]})
            self.save()
            raise
        self.steps.append({"step": name, "seconds": round(time.perf_counter() - t0, 1), "ok": True})
        self.save()
        return out

    def check(self, name: str, ok: bool, detail="") -> None:
        self.checks[name] = {"ok": bool(ok), "detail": str(detail)}
        self.save()
        print(f"check {name}: {'ok' if ok else 'FAILED'} {detail}", flush=True)

    def save(self) -> None:
        write_json({"steps": self.steps, "checks": self.checks}, self.path)


def kill_during_epoch_2(args: list[str], fold_dir: Path, timeout: float = 240) -> str:
    """Train a fold in a process of its own and SIGKILL it once epoch 1's line is in its log (its checkpoint is
    written before that line): the process is then in epoch 2. Returns what was on disk at the kill."""
    p = subprocess.Popen([sys.executable, "-m", "src.train", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    deadline, log = time.time() + timeout, fold_dir / "train.log"
    while not (log.exists() and "epoch 1: train loss" in log.read_text()):
        if p.poll() is not None:
            raise RuntimeError(f"the fold ended before it was killed (status {p.returncode}): {p.stderr.read()[-2000:]}")
        if time.time() > deadline:
            p.kill()
            raise RuntimeError("epoch 1 never ended")
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=60)
    from src import checkpoint
    return f"killed with status {p.returncode}; last.pth after epoch {checkpoint.load(fold_dir / 'last.pth')['epoch']}; " \
           f"oof.csv {'present' if (fold_dir / 'oof.csv').exists() else 'absent'}"


def epochs_asked(train_flags: str) -> int:
    """The --epochs of the training flags (the check needs at least 2: a kill after epoch 1, before the end)."""
    args = shlex.split(train_flags)
    return int(args[args.index("--epochs") + 1])


def correctness(work: Path, out: Path, spec: str, train_flags: str, seq_flags: str, boost_flags: str) -> None:
    """Long because it is the pipeline's sequence of steps, each with its check, in run.sh's order."""
    import pandas as pd

    from src import layout
    from src.submission import validate_file
    rec = Record(out / "correctness.json")
    data_dir, out_dir, k = work / "data", work / "out", 2
    name = Path(spec).stem
    run = layout.run_dir(out_dir, name)
    folds = ["--k", k, "--fold-seed", 42, "--folds-file", work / "folds.csv"]
    rec.run("folds", step, "folds", data_dir, "--out-dir", out_dir, *folds)
    train_args = ["--config", spec, "--data-dir", data_dir, "--out-dir", out_dir, *folds, *shlex.split(train_flags)]
    fold0 = layout.fold_dir(run, 0)
    killed = rec.run("train fold 0, SIGKILL during epoch 2", kill_during_epoch_2, [*map(str, train_args), "--fold", "0"],
                     fold0)
    done_at_kill = int(re.search(r"after epoch (\d+)", killed).group(1))  # 2 where a fast GPU got past epoch 2 first
    rec.check("killed after a checkpoint, before the end", 1 <= done_at_kill < epochs_asked(train_flags) and
              "oof.csv absent" in killed, killed)
    rec.run("train fold 0 --resume", step, "train", *train_args, "--fold", 0, "--resume")
    log0 = (fold0 / "train.log").read_text()
    epochs = len(pd.read_csv(fold0 / "epochs.csv"))
    rec.check("fold 0 resumed and finished", "resumed from" in log0 and (fold0 / "oof.csv").exists(),
              f"{epochs} epochs in epochs.csv")
    import torch
    want = "cuda" if torch.cuda.is_available() else "cpu"
    device = re.findall(r"device (\S+) x\d+; amp (.+?); model", log0)
    rec.check(f"stage 1 on {want}", [d for d, _ in device] == [want] * 2, device)  # the killed run's and the resumed one
    rec.run("train fold 1", step, "train", *train_args, "--fold", 1, "--resume")
    rec.run("predict", step, "predict", run)
    for f in range(k):
        rec.run(f"sequence fold {f}", step, "sequence", "--stage1", run, "--fold", f, *shlex.split(seq_flags))
        rec.run(f"boost fold {f}", step, "boost", "--stage1", run, "--fold", f, *shlex.split(boost_flags))
    gru_log = (layout.fold_dir(layout.stage2_dir(run, "seq"), 0) / "train.log").read_text()
    gru_device = re.findall(r"device (\S+);", gru_log)
    rec.check(f"GRU on {want}", gru_device == [want], gru_device)
    rec.run("blend", step, "blend", run, "--weights", "fit")
    rec.run("evaluate", step, "evaluate", run)
    rec.run("bundle", step, "export", run)
    subs = work / "submissions"
    rec.run("submission", step, "make_submission", run, "--name", f"{name}_check", "--data-dir", data_dir,
            "--submissions-dir", subs, "--weights", "fit")
    sub = layout.submission_path(f"{name}_check", subs)
    df = rec.run("submission valid", validate_file, sub, data_dir / "stage_2_sample_submission.csv")
    rec.check("submission rows", len(df) == len(pd.read_csv(data_dir / "stage_2_sample_submission.csv")), len(df))
    rec.check("bundle written", layout.bundle_path(run).exists(), layout.bundle_path(run))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["versions", "data", "correctness"])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "gpu_check")
    ap.add_argument("--work", type=Path)
    ap.add_argument("--patients", type=int, default=16)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--slices", type=int, nargs=2, default=(20, 24))
    ap.add_argument("--spec", default="configs/seresnext50_256.yaml")
    ap.add_argument("--train-flags", default="")
    ap.add_argument("--seq-flags", default="--features both --epochs 3")
    ap.add_argument("--boost-flags", default="--max-trees 20")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.phase == "versions":
        versions(a.out)
    elif a.phase == "data":
        data(a.work, a.patients, a.size, tuple(a.slices))
    else:
        correctness(a.work, a.out, a.spec, a.train_flags, a.seq_flags, a.boost_flags)


if __name__ == "__main__":
    main()
