"""run.sh end to end on a tiny dataset: killed during stage-1 training and started again; then rerun with a changed
cache size and a changed model flag, which must both be caught before anything is written."""
import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from src.submission import validate_file

ROOT = Path(__file__).resolve().parents[1]
VENV_READY = (ROOT / ".venv" / "requirements.installed").exists() and \
    (ROOT / ".venv" / "requirements.installed").read_bytes() == (ROOT / "requirements.txt").read_bytes()


@pytest.mark.skipif(not VENV_READY, reason="run.sh's .venv is not set up (bash run.sh test sets it up)")
def test_killed_run_resumes_without_redoing_finished_folds(tmp_path):
    from src.synth import generate
    data = tmp_path / "tinyset"
    generate(data, n_patients=6, n_test_series=1, slices=(8, 9), image_size=64, seed=5, quiet=True)
    env = {**os.environ, "INPUT_DIR": str(data), "OUT_DIR": str(tmp_path / "out"), "K": "2", "DEVICE_CONFIG": "cpu",
           "FOLDS_FILE": str(tmp_path / "folds.csv"), "SUBMISSIONS_DIR": str(tmp_path / "subs"),
           "TRAIN_FLAGS": "--img-size 48 --epochs 2 --max-steps-per-epoch 2 --workers 0", "SEQ_FLAGS": "--epochs 2",
           "OMP_NUM_THREADS": "2"}
    runs = tmp_path / "out" / "runs" / "resnet10t_128"

    # first run: killed (the whole process group, as Ctrl-C or a lost session would) once fold 1 is training
    p = subprocess.Popen(["bash", "run.sh"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         start_new_session=True)
    deadline = time.time() + 240
    while not (runs / "fold1" / "config.yaml").exists():
        assert p.poll() is None, p.stdout.read().decode()[-3000:]
        assert time.time() < deadline, "fold 1 never started"
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert (runs / "fold0" / "oof.csv").exists() and not (runs / "fold1" / "oof.csv").exists()
    fold0_mtime = (runs / "fold0" / "oof.csv").stat().st_mtime_ns

    # second run: finishes, skipping what was done
    r = subprocess.run(["bash", "run.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    for skipped in ("[skip] setup", "[skip] prepare cache", "[skip] folds", "[skip] train resnet10t_128 fold 0"):
        assert skipped in out, out
    assert "[run ] train resnet10t_128 fold 1" in out and "total:" in out
    assert (runs / "fold0" / "oof.csv").stat().st_mtime_ns == fold0_mtime  # fold 0 not redone
    sub = tmp_path / "subs" / "stage_2_tinyset_blend.csv"
    df = validate_file(sub, data / "stage_2_sample_submission.csv")
    assert len(df) == 6 * len(pd.read_csv(data / "stage_2_sample_submission.csv")) // 6
    assert (tmp_path / "out" / "report" / "resnet10t_128" / "summary.json").exists()

    # third run: everything is done, nothing is recomputed
    r = subprocess.run(["bash", "run.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "[run ]" not in r.stdout and "[done]" not in r.stdout, r.stdout

    # a changed setting is never reused silently: the run stops, names the difference, and writes nothing
    snapshot = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*") if p.is_file()}
    for change, expect in (({"CACHE_SIZE": "96"}, "size: 128 -> 96"),
                           ({"TRAIN_FLAGS": env["TRAIN_FLAGS"] + " --lr 0.01"}, "lr: 0.002 -> 0.01")):
        r = subprocess.run(["bash", "run.sh"], cwd=ROOT, env={**env, **change}, capture_output=True, text=True, timeout=600)
        assert r.returncode == 2 and expect in r.stderr and "OVERWRITE=1" in r.stderr, r.stdout + r.stderr
        assert "Traceback" not in r.stderr
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*") if p.is_file()} == snapshot
