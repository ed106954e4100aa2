import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from src.config import TrainConfig, config_from_args
from src.data import EpochSampler, SliceDataset, neighbour_rows
from src.folds import make_folds
from src.labels import read_labels
from src.model import create_model, load_checkpoint, save_checkpoint
from src.prepare import load_cache
from src.train import WarmupCosine, train
from src.utils import CLASSES, PipelineError, write_csv

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folds_file(demo_data, demo_cache, tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        labels = read_labels(demo_data / "stage_2_train.csv")
    _, meta = load_cache(demo_cache / "cache")
    ok = meta[(meta.split == "train") & (meta.status == "ok")].set_index("ID")
    p = tmp_path_factory.mktemp("folds") / "folds.csv"
    write_csv(make_folds(labels, ok["PatientID"], k=2, seed=1), p)
    return p


def tiny_cfg(demo_data, demo_cache, folds_file, out, **kw):
    base = dict(data_dir=str(demo_data), out_dir=str(out), folds_file=str(folds_file), k=2, fold=0, run_name="t",
                model="resnet10t", img_size=48, epochs=1, batch_size=16, workers=0, max_steps_per_epoch=4, lr=2e-3)
    base.update(kw)
    return TrainConfig(**base)


def link_cache(demo_cache, out):
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "cache").exists():
        (out / "cache").symlink_to(demo_cache / "cache")


def test_one_epoch_writes_oof_embeddings_checkpoint(demo_data, demo_cache, folds_file, tmp_path):
    link_cache(demo_cache, tmp_path)
    cfg = tiny_cfg(demo_data, demo_cache, folds_file, tmp_path)
    run = train(cfg)
    folds = pd.read_csv(folds_file).set_index("ID")
    oof = pd.read_csv(run / "oof.csv").set_index("ID")
    assert sorted(oof.index) == sorted(folds.index[folds.fold == 0])
    assert list(oof.columns) == ["fold", *CLASSES] and ((oof[CLASSES] >= 0) & (oof[CLASSES] <= 1)).all().all()
    emb = np.load(run / "oof_emb.npy")
    assert emb.shape == (len(oof), create_model("resnet10t").num_features)
    ck = load_checkpoint(run / "best.pth")
    assert {"model", "optimizer", "scaler", "scheduler", "epoch", "best_score", "config", "rng"} <= set(ck)
    assert ck["config"]["model"] == "resnet10t" and ck["epoch"] == 1
    assert (run / "config.yaml").exists()
    assert "command:" in (run / "train.log").read_text().splitlines()[0]
    e = pd.read_csv(run / "epochs.csv")
    assert {"train_loss", "val_wll", "seconds", *[f"val_ll_{c}" for c in CLASSES]} <= set(e.columns)


def test_resume_gives_same_weights(demo_data, demo_cache, folds_file, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    link_cache(demo_cache, a), link_cache(demo_cache, b)
    kw = dict(epochs=3, max_steps_per_epoch=3, hflip=0.5, affine=0.8, drop_rate=0.2, balanced=0.3)
    train(tiny_cfg(demo_data, demo_cache, folds_file, a, **kw))
    run_b = train(tiny_cfg(demo_data, demo_cache, folds_file, b, stop_after_epochs=1, **kw))
    assert load_checkpoint(run_b / "last.pth")["epoch"] == 1 and not (run_b / "oof.csv").exists()
    train(tiny_cfg(demo_data, demo_cache, folds_file, b, resume=True, **kw))
    wa = load_checkpoint(a / "runs/t/fold0/last.pth")["model"]
    wb = load_checkpoint(run_b / "last.pth")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    pd.testing.assert_frame_equal(pd.read_csv(a / "runs/t/fold0/oof.csv"), pd.read_csv(run_b / "oof.csv"))
    assert len(pd.read_csv(run_b / "epochs.csv")) == 3


def test_ddp_two_processes_gloo(demo_data, demo_cache, folds_file, tmp_path):
    import socket
    link_cache(demo_cache, tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", "-m", "src.train",
           "--data_dir", str(demo_data), "--out_dir", str(tmp_path), "--folds_file", str(folds_file), "--fold", "1",
           "--run_name", "ddp", "--model", "resnet10t", "--img_size", "48", "--epochs", "1", "--batch_size", "8",
           "--workers", "0", "--max_steps_per_epoch", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs/ddp/fold1"
    folds = pd.read_csv(folds_file).set_index("ID")
    oof = pd.read_csv(run / "oof.csv").set_index("ID")
    # every validation image exactly once, gathered from both ranks (the sampler gave each half)
    assert sorted(oof.index) == sorted(folds.index[folds.fold == 1])
    assert np.load(run / "oof_emb.npy").shape[0] == len(oof)
    log = (run / "train.log").read_text()
    assert log.count("command:") == 1 and "x2" in log  # only rank 0 writes


def test_neighbours_repeat_at_series_edges():
    meta = pd.DataFrame({"ID": ["a", "b", "c", "x"], "row": [10, 11, 12, 13],
                         "prev_id": ["", "a", "b", ""], "next_id": ["b", "c", "", ""]})
    prev, nxt = neighbour_rows(meta)
    assert prev.tolist() == [10, 10, 11, 13] and nxt.tolist() == [11, 12, 12, 13]
    images = np.zeros((14, 4, 4, 3), np.uint8)
    for r in range(14):
        images[r, :, :, 0] = r  # brain channel holds the row number
        images[r, :, :, 1:] = 100 + r
    ds = SliceDataset(images, meta["row"], prev_rows=prev, next_rows=nxt, mode="slices")
    assert [int(ds[0][0][c, 0, 0]) for c in range(3)] == [10, 10, 11]   # first slice repeats itself
    assert [int(ds[2][0][c, 0, 0]) for c in range(3)] == [11, 12, 12]   # last slice repeats itself
    assert [int(ds[3][0][c, 0, 0]) for c in range(3)] == [13, 13, 13]   # a lone slice
    ds9 = SliceDataset(images, meta["row"], prev_rows=prev, next_rows=nxt, mode="slices_windows")
    assert ds9[1][0][:, 0, 0].tolist() == [10, 110, 110, 11, 111, 111, 12, 112, 112]


def test_sampler_shards_cover_everything_once():
    s0, s1 = (EpochSampler(11, shuffle=True, seed=3, rank=r, world=2, pad=False) for r in (0, 1))
    assert sorted(list(s0) + list(s1)) == list(range(11))
    padded = [list(EpochSampler(11, seed=3, rank=r, world=2)) for r in (0, 1)]
    assert len(padded[0]) == len(padded[1]) == 6
    bal = EpochSampler(1000, seed=0, positives=np.arange(1000) < 50, balanced=0.5)
    assert 0.45 < np.mean(np.array(list(bal)) < 50) < 0.55


def test_checkpoint_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    p = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": Evil()}, p)
    with pytest.raises(PipelineError, match="not a plain-tensor checkpoint"):
        load_checkpoint(p)
    assert not (tmp_path / "pwned").exists()
    good = tmp_path / "good.pth"
    save_checkpoint({"model": {"w": torch.ones(2)}, "epoch": 3, "config": {"a": 1}}, good)
    assert load_checkpoint(good)["epoch"] == 3


def test_local_weights_file(tmp_path):
    from safetensors.torch import save_file
    src = create_model("resnet10t").backbone
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(1000, sd["fc.weight"].shape[1]), torch.zeros(1000)  # an ImageNet head
    f = tmp_path / "w.safetensors"
    save_file(sd, str(f))
    m = create_model("resnet10t", weights=str(f))
    assert torch.equal(m.backbone.conv1[0].weight, sd["conv1.0.weight"])
    assert m.backbone.fc.weight.shape[0] == 6  # the 1000-class head was dropped, not loaded
    m9 = create_model("resnet10t", in_chans=9, weights=str(f))  # timm adapts the stem to 9 channels
    assert m9.backbone.conv1[0].weight.shape[1] == 9
    with pytest.raises(PipelineError, match="not found"):
        create_model("resnet10t", weights=str(tmp_path / "missing.pth"))


def test_config_flags_file_and_errors(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("model: resnet34\nlr: 0.01\n")
    cfg = config_from_args(TrainConfig, ["--config", str(f), "--lr", "0.5", "--resume", "--fold", "2"])
    assert (cfg.model, cfg.lr, cfg.resume, cfg.fold) == ("resnet34", 0.5, True, 2)
    f.write_text("modle: x\n")
    with pytest.raises(PipelineError, match="modle"):
        config_from_args(TrainConfig, ["--config", str(f)])
    with pytest.raises(PipelineError, match="input_mode"):
        TrainConfig(input_mode="3d")


def test_warmup_cosine():
    s = WarmupCosine(10, 110)
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.5) and s(110) == pytest.approx(0.0)
