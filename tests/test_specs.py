"""The GPU model specs end to end on the CPU (run.sh with DEVICE_CONFIG=gpu, one spec per test), and ImageNet weights on a machine
without network: one clear line when they cannot be had, timm's cache used when it holds them."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from src.submission import validate_file

ROOT = Path(__file__).resolve().parents[1]
VENV_READY = (ROOT / ".venv" / "requirements.installed").exists() and \
    (ROOT / ".venv" / "requirements.installed").read_bytes() == (ROOT / "requirements.txt").read_bytes()


def offline_env(tmp_path) -> dict:
    """No network (an HTTPS proxy on a closed local port: every connection is refused at once) and empty caches."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and k != "HF_HUB_OFFLINE"}
    return {**env, "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
            "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch")}


def test_pretrained_spec_offline_stops_at_once_with_one_line(demo_data, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "src.train", "--config", "configs/seresnext50_256.yaml", "--data-dir",
                        str(demo_data), "--out-dir", str(out), "--k", "2", "--fold", "0"],
                       cwd=ROOT, env=offline_env(tmp_path), capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    assert "could not fetch the pretrained ImageNet weights of 'seresnext50_32x4d'" in lines[0]
    assert "--weights FILE" in lines[0] and "--pretrained false" in lines[0]
    assert not out.exists()  # nothing written


def test_weights_in_timms_cache_are_used_without_network(tmp_path):
    """The Hugging Face cache layout timm downloads into, planted by hand: the model loads from it offline."""
    code = r"""
import sys, torch, timm
from pathlib import Path
from safetensors.torch import save_file
from huggingface_hub.constants import HF_HUB_CACHE
ref = timm.create_model("resnet10t")
torch.nn.init.constant_(ref.conv1[0].weight, 0.0123)
snap = Path(HF_HUB_CACHE) / "models--timm--resnet10t.c3_in1k"
(snap / "refs").mkdir(parents=True)
(snap / "refs" / "main").write_text("abc123")
(snap / "snapshots" / "abc123").mkdir(parents=True)
save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, snap / "snapshots" / "abc123" / "model.safetensors")
from src.model import create_model
m = create_model("resnet10t", in_chans=3, pretrained=True)
w = m.backbone.conv1[0].weight
print("same" if torch.allclose(w, torch.full_like(w, 0.0123)) else "different")
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=offline_env(tmp_path), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "same", r.stdout + r.stderr


def gpu_specs() -> list[str]:
    """The GPU model specs run.sh trains (its GPU_CONFIGS line): a spec added there is tested here too."""
    line = next(x for x in (ROOT / "run.sh").read_text().splitlines() if x.startswith("GPU_CONFIGS="))
    return [Path(p).stem for p in line.split("(", 1)[1].split(")", 1)[0].split()]


@pytest.mark.skipif(not VENV_READY, reason="run.sh's .venv is not set up (bash run.sh test sets it up)")
@pytest.mark.parametrize("spec", gpu_specs())
def test_run_sh_trains_each_gpu_spec_end_to_end_on_the_cpu(spec, tmp_path):
    """DEVICE_CONFIG=gpu, one GPU spec per test (MODELS=, so the specs' runs share the two cores): the spec read from
    its file, pretrained turned off by a flag that wins over the file, its stage 2 with embeddings and logits, the
    reports, the blend, the bundle and the submission, at a tiny size. Several specs in one ensemble are tested in
    tests/test_submission.py."""
    from src.synth import generate
    data = tmp_path / "gpuset"
    generate(data, n_patients=6, n_test_series=1, slices=(8, 9), image_size=64, seed=7, quiet=True)
    env = {**os.environ, "INPUT_DIR": str(data), "OUT_DIR": str(tmp_path / "out"), "K": "2", "DEVICE_CONFIG": "gpu",
           "MODELS": f"configs/{spec}.yaml", "CACHE_SIZE": "32", "FOLDS_FILE": str(tmp_path / "folds.csv"),
           "SUBMISSIONS_DIR": str(tmp_path / "subs"),
           "TRAIN_FLAGS": "--pretrained false --img-size 32 --epochs 1 --max-steps-per-epoch 2 --batch-size 8 --workers 0",
           "SEQ_FLAGS": "--epochs 2", "BOOST_FLAGS": "--max-trees 20", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", "run.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    runs = tmp_path / "out" / "runs"
    assert sorted(p.name for p in runs.iterdir()) == sorted([spec, f"seq_{spec}", f"boost_{spec}"])
    for k in (0, 1):
        assert (runs / spec / f"fold{k}" / "oof.csv").exists()
        assert "features: both" in (runs / f"seq_{spec}" / f"fold{k}" / "config.yaml").read_text()
        assert (runs / f"boost_{spec}" / f"fold{k}" / "oof.csv").exists()
    saved = (runs / spec / "fold0" / "config.yaml").read_text()
    wanted = [x for x in (ROOT / "configs" / f"{spec}.yaml").read_text().splitlines() if x.startswith("input_mode:")]
    assert "pretrained: false" in saved and all(x in saved for x in wanted)
    assert (tmp_path / "out" / "bundles" / f"{spec}.ichbundle").exists()
    sub = tmp_path / "subs" / "stage_2_gpuset_blend.csv"
    df = validate_file(sub, data / "stage_2_sample_submission.csv")
    assert len(df) == len(pd.read_csv(data / "stage_2_sample_submission.csv"))


def test_gpu_check_dry_run_on_the_cpu(tmp_path):
    """bench/gpu_check.sh --cpu: every phase of the one-call GPU check (setup, data, throughput of each GPU spec,
    correctness with a SIGKILLed and resumed fold through the bundle and the submission, the compile A/B, the
    projection) at tiny sizes on the CPU, so that the script cannot rot before a GPU is lent. Each phase must end
    ok, and its files must hold what docs/gpu.md reads from them."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "WORK": str(tmp_path / "work"), "PY": sys.executable}
    r = subprocess.run(["bash", "bench/gpu_check.sh", "--cpu"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    specs = gpu_specs()
    phases = json.loads((out / "phases.json").read_text())
    assert list(phases) == ["setup", "data", f"throughput {' '.join(specs)}", "correctness", f"compile {specs[0]}",
                            "projection"]
    assert {p["status"] for p in phases.values()} == {"ok"}, phases
    # flat files only, at most 8: what comes back from a GPU machine's $OUT
    assert sorted(p.name for p in out.iterdir()) == ["correctness.json", "gpu_check.log", "phases.json",
                                                     "projection.txt", "rates.json", "versions.json"]
    rates = json.loads((out / "rates.json").read_text())
    assert list(rates["specs"]) == specs
    for name, s in rates["specs"].items():
        assert s["train_device_images_per_s"] > 0 and s["train_loader_images_per_s"] > 0, name
        assert s["infer_plain_images_per_s"] > 0 and set(s["infer_tta"]) == {"8", "16"}, name
        assert s["ema"] == 0.999 and s["input_mode"] == ("slices_windows" if "25d" in name else "windows"), name
    assert rates["specs"][specs[0]]["compile"]["compiled_images_per_s"] > 0
    checks = json.loads((out / "correctness.json").read_text())
    assert [s["step"] for s in checks["steps"] if s["ok"]] == [
        "folds", "train fold 0, SIGKILL during epoch 2", "train fold 0 --resume", "train fold 1", "predict",
        "sequence fold 0", "boost fold 0", "sequence fold 1", "boost fold 1", "blend", "evaluate", "bundle", "submission",
        "submission valid"]
    assert {k: v["ok"] for k, v in checks["checks"].items()} == {
        "killed after a checkpoint, before the end": True, "fold 0 resumed and finished": True,
        "stage 1 on cpu": True, "GRU on cpu": True, "submission rows": True, "bundle written": True}
    versions = json.loads((out / "versions.json").read_text())
    torch_pin = [line.split("==")[1] for line in (ROOT / "requirements.txt").read_text().splitlines()
                 if line.startswith("torch==")]
    assert versions["packages"]["torch"]["pinned"] == torch_pin[0]
    assert versions["packages"]["torch"]["installed"].split("+")[0] == torch_pin[0]  # the .venv of requirements.txt
    assert "versions that differ from requirements.txt (0): none" in (out / "gpu_check.log").read_text()
    projection = (out / "projection.txt").read_text()
    assert all(f"| {name} | 4 |" in projection for name in specs) and "| **both specs** |" in projection


def test_gpu_projection_is_the_stated_arithmetic(monkeypatch):
    """The projection against a hand computation: 5 folds of 602,242 training and 150,561 validation slices; 4 epochs;
    validation every epoch plus the raw weights once (EMA); OOF and 121,232 test slices with flip TTA. With the raw
    weights validated every epoch (before the fix), a fold ran 1,748,074 forwards (the issue's ~1.75M); now 1,296,391."""
    import torch

    from bench import gpu_projection as G
    from src.engine import infer_batch_size
    assert G.INFER_BATCH_CUDA == infer_batch_size(torch.device("cuda"))
    rates = {"train_loader_images_per_s": 2000.0, "infer_plain_images_per_s": 6000.0,
             "infer_tta": {"64": {"images_per_s": 9999.0}, "256": {"images_per_s": 3000.0}}}
    p = G.project("seresnext50_256", rates, 5)
    assert p["train"] == pytest.approx(5 * 4 * 602_242 / 2000)
    assert p["validation"] == pytest.approx(5 * 5 * 150_561 / 6000)
    assert p["oof_and_test"] == pytest.approx(5 * (150_561 + 121_232) / 3000)  # at the pipeline's batch, 256
    assert p["forwards_per_fold"] == 1_296_391
    monkeypatch.setattr(G, "spec_settings", lambda name: {"epochs": 4, "ema": 0.999, "tta": "hflip", "validate_raw": True})
    assert G.project("seresnext50_256", rates, 5)["forwards_per_fold"] == 1_748_074
