import dataclasses
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from src import checkpoint, stamps
from src.config import TrainConfig, build_parser, field_comments, parse_config
from src.data import EpochSampler, SliceDataset, collate, neighbour_rows
from src.engine import train_one_epoch, warmup_cosine
from src.folds import make_folds
from src.labels import read_labels
from src.metrics import WeightedBCE, weighted_log_loss
from src.model import create_model
from src.cache import load_cache
from src.train import train
from src.utils import CLASSES, PipelineError, write_csv

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
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
                model="resnet10t", img_size=48, epochs=1, batch_size=16, workers=0, max_steps_per_epoch=4, lr=2e-3,
                tensorboard=False)
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
    ck = checkpoint.load(run / "best.pth")
    assert {"model", "optimizer", "scaler", "epoch", "best_score", "config", "rng", "stamp"} <= set(ck)
    assert ck["config"]["model"] == "resnet10t" and ck["epoch"] == 1
    assert (run / "config.yaml").exists() and ck["stamp"] == stamps.Stamp.load(run / "fingerprint.json").id
    assert "command:" in (run / "train.log").read_text().splitlines()[0]
    e = pd.read_csv(run / "epochs.csv")
    assert {"train_loss", "val_wll", "seconds", *[f"val_ll_{c}" for c in CLASSES]} <= set(e.columns)
    assert not cfg.tensorboard and not (run / "tb").exists()  # TensorBoard curves switched off


RESUME_KW = dict(epochs=3, max_steps_per_epoch=3, hflip=0.5, affine=0.8, drop_rate=0.2, balanced=0.3, ema=0.9)


@pytest.fixture(scope="session")  # session: built once on the worker of the "resume" group, whatever runs between
def uninterrupted(demo_data, demo_cache, folds_file, tmp_path_factory):
    """A fold trained in one go with RESUME_KW: what an interrupted and resumed fold must end as."""
    a = tmp_path_factory.mktemp("uninterrupted")
    link_cache(demo_cache, a)
    return train(tiny_cfg(demo_data, demo_cache, folds_file, a, **RESUME_KW))


def assert_same_fold(a: Path, b: Path) -> None:
    """Bit-identical weights (the weight average and the trained weights alike) and the same OOF predictions."""
    for key in ("model", "raw"):
        wa, wb = checkpoint.load(a / "last.pth")[key], checkpoint.load(b / "last.pth")[key]
        assert set(wa) == set(wb), key
        assert [k for k in wa if not torch.equal(wa[k], wb[k])] == [], key
    pd.testing.assert_frame_equal(pd.read_csv(a / "oof.csv"), pd.read_csv(b / "oof.csv"))


@pytest.mark.xdist_group("resume")
def test_resume_gives_same_weights(demo_data, demo_cache, folds_file, uninterrupted, tmp_path):
    b = tmp_path / "b"
    link_cache(demo_cache, b)
    run_b = train(tiny_cfg(demo_data, demo_cache, folds_file, b, stop_after_epochs=1, **RESUME_KW))
    assert checkpoint.load(run_b / "last.pth")["epoch"] == 1 and not (run_b / "oof.csv").exists()
    train(tiny_cfg(demo_data, demo_cache, folds_file, b, resume=True, **RESUME_KW))
    assert_same_fold(uninterrupted, run_b)
    ck = checkpoint.load(run_b / "last.pth")
    assert not all(torch.equal(ck["model"][k], ck["raw"][k]) for k in ck["raw"])  # the average is not the raw weights
    assert "val_wll_raw" in pd.read_csv(run_b / "epochs.csv").columns
    assert len(pd.read_csv(run_b / "epochs.csv")) == 3


def cli_args(cfg: TrainConfig) -> list[str]:
    """`python -m src.train` flags giving exactly cfg."""
    out = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if v != f.default:
            out += [f"--{f.name.replace('_', '-')}", str(v).lower() if isinstance(v, bool) else str(v)]
    return out


@pytest.mark.xdist_group("resume")
def test_a_fold_killed_by_sigkill_resumes_to_the_uninterrupted_result(demo_data, demo_cache, folds_file, uninterrupted,
                                                                     tmp_path):
    """The training process is killed for real (SIGKILL: no handler, no cleanup, as the OOM killer or a lost machine
    would) during epoch 2, once epoch 1's checkpoint is on disk; `--resume` then ends with bit-identical weights
    and the same OOF file as a fold trained in one go, as src/train.py promises. Fails when a resume does not
    restore the whole state (weights, EMA, optimizer, RNG, epoch), or when a kill leaves a checkpoint unreadable."""
    import signal
    import time
    link_cache(demo_cache, tmp_path)
    cfg = tiny_cfg(demo_data, demo_cache, folds_file, tmp_path, **RESUME_KW)
    run = tmp_path / "runs" / "t" / "fold0"
    p = subprocess.Popen([sys.executable, "-m", "src.train", *cli_args(cfg)], cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    deadline = time.time() + 240
    # epoch 1's line is logged after its checkpoints are written: the process is then in epoch 2
    while not ((run / "train.log").exists() and "epoch 1: train loss" in (run / "train.log").read_text()):
        assert p.poll() is None, p.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "epoch 1 never ended"
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)
    assert p.wait(timeout=60) == -signal.SIGKILL
    # epoch 2 when a slow machine got past its checkpoint before the kill landed; never the finished fold
    assert checkpoint.load(run / "last.pth")["epoch"] in (1, 2) and not (run / "oof.csv").exists()
    train(dataclasses.replace(cfg, resume=True))
    log = (run / "train.log").read_text()
    assert log.count("command:") == 2 and "resumed from" in log
    assert len(pd.read_csv(run / "epochs.csv")) == 3
    assert_same_fold(uninterrupted, run)


def torchrun(nproc, args, tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}", "-m",
           "src.train", *args]
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)


def test_ddp_two_processes_then_resume_on_one(demo_data, demo_cache, folds_file, tmp_path):
    """2 processes (gloo) train epoch 1 and stop; 1 process resumes: another process count continues the run, on
    the same learning-rate curve. Each process of 2 takes half the batches an epoch, so the schedule must follow
    training progress, not a step counter: the lr after each epoch is lr x warmup_cosine(epoch / epochs) (fails
    when the schedule counts optimizer steps, which the resumed run takes twice as many of per epoch)."""
    link_cache(demo_cache, tmp_path)
    args = ["--data-dir", str(demo_data), "--out-dir", str(tmp_path), "--folds-file", str(folds_file), "--k", "2",
            "--fold", "1", "--run-name", "ddp", "--model", "resnet10t", "--img-size", "32", "--epochs", "2",
            "--batch-size", "8", "--workers", "0", "--lr", "0.002", "--warmup", "0.2"]
    folds = pd.read_csv(folds_file).set_index("ID")
    n_train = int((folds.fold != 1).sum())
    assert -(-n_train // 2) // 8 != n_train // 8  # the premise: the steps of an epoch differ between 2 and 1 process
    r = torchrun(2, args + ["--stop-after-epochs", "1"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs/ddp/fold1"
    assert checkpoint.load(run / "last.pth")["epoch"] == 1 and not (run / "oof.csv").exists()
    log = (run / "train.log").read_text()
    assert log.count("command:") == 1 and "x2" in log  # only rank 0 writes
    r = subprocess.run([sys.executable, "-m", "src.train", *args, "--resume"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    oof = pd.read_csv(run / "oof.csv").set_index("ID")
    assert sorted(oof.index) == sorted(folds.index[folds.fold == 1])  # every validation image exactly once
    assert np.load(run / "oof_emb.npy").shape[0] == len(oof) and len(pd.read_csv(run / "epochs.csv")) == 2
    assert "resumed from" in (run / "train.log").read_text()
    lr = pd.read_csv(run / "epochs.csv")["lr"].to_numpy()
    assert np.allclose(lr, [0.002 * warmup_cosine(e / 2, 0.2) for e in (1, 2)], rtol=1e-5, atol=1e-12), lr


def test_ddp_error_ends_every_process_with_the_message(demo_data, demo_cache, folds_file, tmp_path):
    link_cache(demo_cache, tmp_path)
    r = torchrun(2, ["--data-dir", str(demo_data), "--out-dir", str(tmp_path), "--folds-file", str(folds_file),
                     "--fold", "7", "--model", "resnet10t", "--workers", "0"], tmp_path)
    assert r.returncode != 0 and "--fold 7 is not in the folds file" in r.stderr


def test_finished_fold_is_skipped_and_other_settings_stop_before_writing(demo_data, demo_cache, folds_file, tmp_path):
    link_cache(demo_cache, tmp_path)
    run = train(tiny_cfg(demo_data, demo_cache, folds_file, tmp_path, epochs=1))
    files = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.iterdir()}
    train(tiny_cfg(demo_data, demo_cache, folds_file, tmp_path, epochs=1))  # same settings: up to date
    for other in (dict(lr=0.01), dict(model="resnet14t", resume=True)):  # another model under --resume too
        with pytest.raises(PipelineError) as e:
            train(tiny_cfg(demo_data, demo_cache, folds_file, tmp_path, epochs=1, **other))
        key = next(iter(other))
        assert f"{key}: {getattr(tiny_cfg(demo_data, demo_cache, folds_file, tmp_path), key)} -> {other[key]}" in str(e.value)
        assert "--overwrite" in str(e.value)
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.iterdir()} == files  # nothing written
    train(tiny_cfg(demo_data, demo_cache, folds_file, tmp_path, epochs=1, lr=0.01, overwrite=True))
    assert checkpoint.load(run / "best.pth")["config"]["lr"] == 0.01


def test_oof_is_made_like_the_test_predictions(demo_data, demo_cache, folds_file, tmp_path):
    """The OOF file comes from the same TTA as src.predict applies to the test set: predicting the validation
    images through the Predictor gives the OOF values; without the flip it would not."""
    from src.predictor import Predictor
    link_cache(demo_cache, tmp_path)
    run = train(tiny_cfg(demo_data, demo_cache, folds_file, tmp_path, epochs=1, amp="off", tta="hflip"))
    oof = pd.read_csv(run / "oof.csv").set_index("ID")
    images, meta = load_cache(tmp_path / "cache")
    meta = meta[meta.ID.isin(oof.index)].reset_index(drop=True)
    p = Predictor.load(run.parent)
    out = p.fold_predictions(images, meta)["fold0"]
    pred = pd.DataFrame(out.probs, index=out.ids, columns=CLASSES).loc[oof.index]
    assert np.allclose(pred.to_numpy(), oof[CLASSES].to_numpy(), atol=2e-5)
    p.folds[0].config["tta"] = "none"
    plain = pd.DataFrame(p.fold_predictions(images, meta)["fold0"].probs, index=out.ids, columns=CLASSES).loc[oof.index]
    assert not np.allclose(plain.to_numpy(), oof[CLASSES].to_numpy(), atol=2e-5)


def test_best_checkpoint_is_written_before_last(demo_data, demo_cache, folds_file, tmp_path, monkeypatch):
    order, real = [], checkpoint.save
    monkeypatch.setattr(checkpoint, "save", lambda ck, path, **kw: order.append(Path(path).name) or real(ck, path, **kw))
    link_cache(demo_cache, tmp_path)
    train(tiny_cfg(demo_data, demo_cache, folds_file, tmp_path, epochs=2))
    assert order[:2] == ["best.pth", "last.pth"]  # epoch 1 always improves on infinity


def test_train_one_epoch_reads_the_loss_once_and_skips_allreduce_on_micro_steps(monkeypatch):
    """No host sync per step: Tensor.item runs once per epoch (with logging off); with accumulation over 4
    batches, a DistributedDataParallel model's no_sync covers the 3 micro-steps of every 4."""
    import contextlib
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 6))
    entered = []

    class FakeDDP(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module = m

        def forward(self, x):
            return self.module(x.float())

        @contextlib.contextmanager
        def no_sync(self):
            entered.append(1)
            yield

    batches = [(torch.rand(4, 3, 2, 2), torch.randint(0, 2, (4, 6)).float(), torch.arange(4)) for _ in range(8)]
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    calls = []
    real_item = torch.Tensor.item
    # only the engine's own reads count (AdamW reads its CPU step counters with .item(): no GPU wait)
    monkeypatch.setattr(torch.Tensor, "item", lambda self: (sys._getframe(1).f_code.co_filename.endswith("engine.py")
                                                            and calls.append(1)) or real_item(self))
    res = train_one_epoch(FakeDDP(model), batches, opt, torch.amp.GradScaler("cpu", enabled=False), WeightedBCE(),
                          torch.device("cpu"), steps=8, accum_steps=4, channels_last=False, progress=False, log_every=0)
    assert len(calls) == 1 and len(entered) == 6 and res.images == 32


def test_weighted_bce_is_the_metric():
    rng = np.random.default_rng(0)
    logits, y = rng.normal(0, 2, (50, 6)), (rng.random((50, 6)) < 0.3).astype(float)
    loss = WeightedBCE()(torch.tensor(logits), torch.tensor(y)).item()
    assert loss == pytest.approx(weighted_log_loss(y, 1 / (1 + np.exp(-logits))), rel=1e-5)
    mask = torch.tensor(rng.random(50) < 0.5)
    masked = WeightedBCE()(torch.tensor(logits), torch.tensor(y), mask).item()
    assert masked == pytest.approx(weighted_log_loss(y[mask.numpy()], 1 / (1 + np.exp(-logits[mask.numpy()]))), rel=1e-5)


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
        checkpoint.load(p)
    assert not (tmp_path / "pwned").exists()
    good = tmp_path / "good.pth"
    checkpoint.save({"model": {"w": torch.ones(2)}, "epoch": 3, "config": {"a": 1}}, good)
    assert checkpoint.load(good)["epoch"] == 3


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
    f.write_text("model: resnet34\nlr: 2e-3\n")  # YAML reads 2e-3 as a string: coerced to the field's type
    cfg = parse_config(TrainConfig, ["--config", str(f), "--lr", "0.5", "--resume", "--fold", "2", "--batch-size", "7"])
    assert (cfg.model, cfg.lr, cfg.resume, cfg.fold, cfg.batch_size) == ("resnet34", 0.5, True, 2, 7)
    assert cfg.run_name == "exp"                                    # a spec file names the run
    assert parse_config(TrainConfig, ["--config", str(f)]).lr == 0.002
    assert parse_config(TrainConfig, ["--batch_size", "9"]).batch_size == 9  # the underscore alias
    assert parse_config(TrainConfig, ["--model", "resnet10t", "--img-size", "96"]).run_name == "resnet10t_96"
    assert TrainConfig(model="densenet121", input_mode="slices").run_name == "densenet121_256_slices"
    f.write_text("modle: x\n")
    with pytest.raises(PipelineError, match="modle"):
        parse_config(TrainConfig, ["--config", str(f)])
    f.write_text("epochs: many\n")
    with pytest.raises(PipelineError, match="epochs"):
        parse_config(TrainConfig, ["--config", str(f)])
    with pytest.raises(PipelineError, match="input_mode"):
        TrainConfig(input_mode="3d")


def test_every_step_help_shows_each_setting_with_its_comment():
    import importlib
    steps = {"train": "TrainConfig", "sequence": "SeqConfig", "prepare": "PrepareConfig", "folds": "FoldsConfig",
             "predict": "PredictConfig", "evaluate": "EvalConfig", "make_submission": "SubmissionConfig", "synth": "SynthConfig",
             "serve.demo": "DemoConfig", "labels": "LabelsConfig", "upload": "UploadConfig", "serve.webapp": "ServeConfig", "boost": "BoostConfig", "subset": "SubsetConfig",
             "blend": "BlendConfig", "export": "ExportConfig", "serve.node": "NodeConfig"}
    for mod, cls_name in steps.items():
        cls = getattr(importlib.import_module(f"src.{mod}"), cls_name)
        comments = field_comments(cls)
        help_text = " ".join(build_parser(cls).format_help().split())
        assert set(comments) == {f.name for f in dataclasses.fields(cls)}, mod  # a comment for fields only
        for f in dataclasses.fields(cls):
            assert comments.get(f.name), f"{mod}: {f.name} has no comment"
            assert " ".join(comments[f.name].split())[:40] in help_text, (mod, f.name)
            if "positional" not in f.metadata:
                assert f"--{f.name.replace('_', '-')}" in help_text, (mod, f.name)
    r = subprocess.run([sys.executable, "-m", "src.train", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--batch-size BATCH_SIZE, --batch_size BATCH_SIZE" in r.stdout
    assert "brain window of slices s-1, s, s+1" in " ".join(r.stdout.split())


def test_warmup_cosine():
    assert warmup_cosine(0.05, 0.1) == pytest.approx(0.5) and warmup_cosine(0.1, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(0.55, 0.1) == pytest.approx(0.5) and warmup_cosine(1.0, 0.1) == pytest.approx(0.0)
    assert warmup_cosine(0.5, 0.0) == pytest.approx(0.5)


def test_a_changed_tta_redoes_only_the_oof_pass(demo_data, demo_cache, folds_file, tmp_path):
    link_cache(demo_cache, tmp_path)
    run = train(tiny_cfg(demo_data, demo_cache, folds_file, tmp_path, epochs=2, tta="hflip"))
    kept = {f: (run / f).read_bytes() for f in ("best.pth", "last.pth", "epochs.csv", "fingerprint.json")}
    before = pd.read_csv(run / "oof.csv")
    train(tiny_cfg(demo_data, demo_cache, folds_file, tmp_path, epochs=2, tta="none"))
    assert {f: (run / f).read_bytes() for f in kept} == kept  # not retrained
    assert json.loads((run / "oof.json").read_text())["tta"] == "none"
    assert not np.allclose(pd.read_csv(run / "oof.csv")[CLASSES], before[CLASSES])


def test_a_corrupt_last_checkpoint_falls_back_to_the_one_before(demo_data, demo_cache, folds_file, tmp_path):
    link_cache(demo_cache, tmp_path)
    run = train(tiny_cfg(demo_data, demo_cache, folds_file, tmp_path, epochs=3, stop_after_epochs=2))
    assert checkpoint.load(run / "last.pth.prev")["epoch"] == 1
    (run / "last.pth").write_bytes((run / "last.pth").read_bytes()[:1000])  # a crash while it was written
    with pytest.raises(PipelineError, match="truncated or corrupt"):
        checkpoint.load(run / "last.pth")
    train(tiny_cfg(demo_data, demo_cache, folds_file, tmp_path, epochs=3, resume=True))
    assert len(pd.read_csv(run / "epochs.csv")) == 3 and (run / "oof.csv").exists()
    assert "resuming from the checkpoint before it" in (run / "train.log").read_text()


def test_tensorboard_curves_are_written_and_can_be_switched_off(demo_data, demo_cache, folds_file, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    link_cache(demo_cache, tmp_path)
    run = train(tiny_cfg(demo_data, demo_cache, folds_file, tmp_path, epochs=2, max_steps_per_epoch=4, log_every=2,
                         ema=0.9, tensorboard=True))
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "val/wll", "val/wll_raw", "val/ll_any"} <= tags
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6, 8]  # every 2 steps, across the 2 epochs
    epochs = pd.read_csv(run / "epochs.csv")
    assert [round(e.value, 5) for e in acc.Scalars("val/wll")] == [round(v, 5) for v in epochs["val_wll"]]
    assert acc.Scalars("train/lr")[-1].value < acc.Scalars("train/lr")[0].value  # the cosine decay, as trained
    # switched off: test_one_epoch_writes_oof_embeddings_checkpoint's run (tensorboard false) has no tb/


def cpuinfo_flags() -> set[str]:
    """The processor's feature flags as the Linux kernel reports them (x86 `flags`, Arm `Features`)."""
    text = Path("/proc/cpuinfo").read_text()
    return {f for line in text.splitlines() if line.split(":")[0].strip() in ("flags", "Features")
            for f in line.split(":", 1)[1].split()}


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="no /proc/cpuinfo (not Linux): nothing to compare with")
def test_cpu_autocast_only_where_the_cpu_computes_bf16_natively(monkeypatch):
    """Emulated bf16 is many times slower than float32 (docs/benchmarks.md): auto picks float32 there, bf16 where
    native. The detection is tested for real, against an independent reading of this machine's processor (the
    kernel's /proc/cpuinfo flags, where the code asks torch's cpuinfo, which reads the processor itself); only the
    other kind of processor, which this machine is not, is mocked, at torch's processor query. Fails when the
    detection does not follow the processor's bf16 instructions (a constant answer, or torch's
    _is_mkldnn_bf16_supported, which says yes on every AVX-512 CPU)."""
    import src.engine as E
    cpu = torch.device("cpu")
    flags = cpuinfo_flags()
    native = bool(flags & {"avx512_bf16", "amx_bf16"}) or (os.uname().machine == "aarch64" and "bf16" in flags)
    assert E.cpu_has_native_bf16() is native
    assert E.amp_settings(cpu, "auto") == ((torch.bfloat16, False) if native else (None, False))
    assert E.amp_settings(cpu, "bf16") == (torch.bfloat16, False) and E.amp_settings(cpu, "off") == (None, False)
    caps = dict(torch.cpu.get_capabilities())
    other = {k: False for k in ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")} if native else {"avx512_bf16": True}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {**caps, **other})
    assert E.cpu_has_native_bf16() is (not native)
    assert E.amp_settings(cpu, "auto") == ((None, False) if native else (torch.bfloat16, False))
    assert E.amp_settings(cpu, "bf16") == (torch.bfloat16, False) and E.amp_settings(cpu, "off") == (None, False)


def test_ema_averages_each_distinct_tensor_once_a_step():
    """After N optimizer steps of the real epoch loop, the EMA of every distinct tensor of the network (the
    classifier included) equals the closed form e_N = d_N e_(N-1) + (1 - d_N) w_N from e_0 = the initial weights,
    with w_t the trained weights after step t and d_t timm's warmed-up decay, 1 - (1 + (t - 1))^(-2/3) capped at
    the decay (0 at t = 1). Fails when a tensor is listed twice in state_dict (the classifier registered a second
    time as Net.head), which ModelEmaV3 then averages twice a step."""
    from timm.utils import ModelEmaV3

    from src.engine import adamw
    torch.manual_seed(0)
    model = create_model("resnet10t")
    sd = model.state_dict()
    ptrs = [v.data_ptr() for v in sd.values() if v.numel()]
    assert len(ptrs) == len(set(ptrs))  # no tensor listed twice
    decay, steps = 0.9, 6
    ema = ModelEmaV3(model, decay=decay, use_warmup=True)
    trained, real_update = [], ema.update

    def spy(m, step=None):
        trained.append((step, {k: v.detach().clone() for k, v in m.state_dict().items()}))
        real_update(m, step=step)

    ema.update = spy
    e = {k: v.detach().clone() for k, v in ema.module.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 256, (4, 3, 32, 32), generator=gen, dtype=torch.uint8),
                torch.randint(0, 2, (4, 6), generator=gen).float(), torch.arange(4)) for _ in range(steps)]
    train_one_epoch(model, batches, adamw(model.parameters(), 1e-2, torch.device("cpu")),
                    torch.amp.GradScaler("cpu", enabled=False), WeightedBCE(), torch.device("cpu"), steps=steps,
                    grad_clip=1.0, lr_at=lambda s: warmup_cosine((s + 1) / steps, 0.2), ema=ema, ema_step0=0,
                    channels_last=False, progress=False, log_every=0)
    assert [s for s, _ in trained] == list(range(1, steps + 1))
    for t, w in trained:
        d = 0.0 if t == 1 else min(decay, 1 - t ** (-2 / 3))
        e = {k: d * e[k] + (1 - d) * w[k] if w[k].is_floating_point() else w[k] for k in e}
    got = ema.module.state_dict()
    assert set(got) == set(e)
    for k in e:
        assert torch.allclose(got[k].float(), e[k].float(), rtol=1e-5, atol=1e-6), k
    fc = "backbone.fc.weight"
    assert not torch.allclose(got[fc], trained[-1][1][fc]) and not torch.allclose(got[fc], trained[0][1][fc])


def test_a_fold_resumes_across_precisions(demo_data, demo_cache, folds_file, tmp_path, monkeypatch):
    """A fold started where the GPU has bfloat16 (no GradScaler: an empty scaler state in last.pth) resumes where
    it has not (float16 + GradScaler), and then back again: one epoch under each. Which precision the device offers
    is the one thing mocked (engine.amp_settings, with `--amp auto` every time: the settings are the same, the device
    is not); the autocast dtypes and the scaler are real. Fails when an empty scaler state is loaded into an enabled
    scaler."""
    import src.engine as E
    link_cache(demo_cache, tmp_path)
    device = {"bf16": (torch.bfloat16, False), "fp16": (torch.float16, True)}
    kw = dict(img_size=32, batch_size=8, epochs=3, max_steps_per_epoch=2)
    run = tmp_path / "runs" / "t" / "fold0"
    for epoch, precision in enumerate(("bf16", "fp16", "bf16"), 1):
        monkeypatch.setattr(E, "amp_settings", lambda dev, mode="auto", p=precision: device[p])
        train(tiny_cfg(demo_data, demo_cache, folds_file, tmp_path, resume=epoch > 1, stop_after_epochs=1, **kw))
        ck = checkpoint.load(run / "last.pth")
        assert ck["epoch"] == epoch and bool(ck["scaler"]) is (precision == "fp16"), epoch
    assert (run / "oof.csv").exists() and len(pd.read_csv(run / "epochs.csv")) == 3
    log = (run / "train.log").read_text()
    assert log.count("last.pth was saved without a GradScaler (bfloat16 or float32); float16 here: a fresh one") == 1
    builds = [line for line in log.splitlines() if " val slices; device " in line]  # one per invocation
    assert [b.split("; amp ")[1].split("; model")[0] for b in builds] == [
        "torch.bfloat16", "torch.float16 + GradScaler", "torch.bfloat16"]


@pytest.mark.xdist_group("resume")
def test_raw_weights_are_validated_once_at_the_end_unless_asked(demo_data, demo_cache, folds_file, uninterrupted,
                                                                  tmp_path):
    """Under EMA the raw weights are scored after the last epoch only (a second validation pass every epoch would
    double the validation cost for a figure that matters at the end), and every epoch with --validate-raw. The
    figure is the raw weights' own: last.pth's `raw` tensors scored on the validation fold independently give it.
    Fails when the raw weights are validated every epoch by default."""
    from src.engine import amp_settings, infer_batch_size, predict_loader
    from src.train import load_fold_data, make_dataset
    e = pd.read_csv(uninterrupted / "epochs.csv")  # 3 epochs under EMA
    assert e["val_wll_raw"].notna().tolist() == [False, False, True]
    link_cache(demo_cache, tmp_path)
    every = train(tiny_cfg(demo_data, demo_cache, folds_file, tmp_path, epochs=2, max_steps_per_epoch=2, ema=0.9,
                           validate_raw=True))
    assert pd.read_csv(every / "epochs.csv")["val_wll_raw"].notna().tolist() == [True, True]
    cfg = tiny_cfg(demo_data, demo_cache, folds_file, tmp_path, **RESUME_KW)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        images, _, va = load_fold_data(cfg, read_labels(demo_data / "stage_2_train.csv"))
    model = create_model("resnet10t", drop_rate=cfg.drop_rate)
    model.load_state_dict(checkpoint.load(uninterrupted / "last.pth")["raw"])
    cpu = torch.device("cpu")  # the validation pass's batches and precision
    dl = torch.utils.data.DataLoader(make_dataset(images, va, cfg, False), infer_batch_size(cpu), collate_fn=collate)
    _, probs, _ = predict_loader(model, dl, cpu, amp_settings(cpu, cfg.amp)[0], progress=False, embeddings=False)
    assert e["val_wll_raw"].iloc[-1] == pytest.approx(weighted_log_loss(va[CLASSES].to_numpy(), probs), abs=2e-6)
    assert e["val_wll_raw"].iloc[-1] != pytest.approx(e["val_wll"].iloc[-1], abs=1e-4)  # not the average's figure


def test_weights_saved_with_the_classifier_twice_still_load():
    """Checkpoints and bundles written before the classifier was registered once hold it also under head.*: they
    load, into the one classifier (fails when that old copy is refused as unexpected keys)."""
    torch.manual_seed(0)
    sd = create_model("resnet10t").state_dict()
    old = {**sd, "head.weight": sd["backbone.fc.weight"], "head.bias": sd["backbone.fc.bias"]}
    m = create_model("resnet10t")
    m.load_state_dict(old)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in sd.items()) and set(m.state_dict()) == set(sd)
    assert m.head is m.backbone.fc
