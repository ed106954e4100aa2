"""A trained model travels: the bundle predicts as its run folder does, alone in an empty folder, through every
command that takes a run; a bundle from a stranger is refused for each way it can be wrong; its stage-1 networks
as ONNX give torch's outputs; a bundle fine-tunes."""
import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import src.bundle as B
from src.blend import fit_blend
from src.export import export, export_onnx
from src.predictor import Predictor
from src.scans import list_inputs
from src.cache import windows_from_settings
from src.scans import decode_files
from src.utils import CLASSES, PipelineError

from .conftest import CQ500, RSNA_SAMPLE, copy_run

ROOT = Path(__file__).resolve().parents[1]


def real_files(demo_data) -> list[Path]:
    """Real slices when ../shared is there (the RSNA sample's test series and the CQ500 JPEG-Lossless series)."""
    dirs = [d for d in (RSNA_SAMPLE / "stage_2_test_images", CQ500) if d.exists()]
    return list_inputs(dirs or [demo_data / "stage_2_test_images"])


@pytest.fixture(scope="module")
def blended(trained_run):
    """A copy of the trained run with the blend of its stages fitted, and its bundle."""
    run = copy_run(trained_run, "b")
    fit_blend([run], quiet=True)
    return run, export(run, quiet=True)


def test_bundle_predicts_what_the_run_folder_predicts(blended, demo_data):
    run, bundle = blended
    files = real_files(demo_data)
    a, b = Predictor.load(run), Predictor.load(bundle)
    assert set(a.weights) == set(b.weights) == {"stage1", "seq", "boost"}  # the blend travels
    for k in a.weights:
        assert np.allclose(a.weights[k], b.weights[k], atol=0)
    pa, pb = a.predict(files), b.predict(files)
    assert len(pa) > 0 and pa[["ID", "series", "slice"]].equals(pb[["ID", "series", "slice"]])
    assert np.abs(pa[CLASSES].to_numpy() - pb[CLASSES].to_numpy()).max() <= 1e-6
    card = b.card
    assert card["images"] > 0 and card["synthetic"] is True and "blend of" in card["stage"]
    assert {"torch", "timm", "lightgbm", "code"} <= set(card["bundle"]["versions"])


def test_bundle_holds_no_pickle_and_a_manifest_of_every_member(blended):
    _, bundle = blended
    with zipfile.ZipFile(bundle) as z:
        names = set(z.namelist())
        manifest = json.loads(z.read(B.MANIFEST))
        for n in names - {B.MANIFEST}:
            assert hashlib.sha256(z.read(n)).hexdigest() == manifest["members"][n]["sha256"]
            assert n.endswith((".json", ".safetensors", ".txt")), n
            assert b"\x80\x04" not in z.read(n)[:2]  # no pickle protocol header
    assert set(manifest["members"]) == names - {B.MANIFEST}
    assert {f"stage1/fold{k}.safetensors" for k in (0, 1)} | {f"seq/fold{k}.safetensors" for k in (0, 1)} <= names
    assert {f"boost/fold0/model_{c}.txt" for c in CLASSES} <= names and B.MODEL in names
    model = json.loads(zipfile.ZipFile(bundle).read(B.MODEL))
    assert model["preprocess"]["size"] == 64 and model["stage1"][0]["config"]["input_mode"] == "windows"
    assert "data_dir" not in model["stage1"][0]["config"]  # run control (paths, workers) stays home


def test_a_bundle_alone_in_an_empty_folder_predicts_real_dicoms(blended, demo_data, tmp_path, monkeypatch):
    """No outputs/, no caches, not even the run it came from (moved away), run from an empty folder: the demo's
    analysis of real files, as its command line and page make it."""
    from src.serve.results import analyse
    run, bundle = blended
    alone = tmp_path / "empty" / "model.ichbundle"
    alone.parent.mkdir()
    shutil.copy(bundle, alone)
    files = real_files(demo_data)
    want = Predictor.load(run).predict(files)
    moved = tmp_path / "moved"
    moved.mkdir()
    for kind in ("", "seq_", "boost_"):  # the run folders out of the way: the bundle must not need them
        shutil.move(run.parent / f"{kind}{run.name}", moved / f"{kind}{run.name}")
    monkeypatch.chdir(alone.parent)
    try:
        p = Predictor.load("model.ichbundle")
        got = p.predict(files)
        results, _ = analyse(p, [d for d in (CQ500,) if d.exists()] or [demo_data / "stage_2_test_images"], cam_slices=1)
    finally:
        for kind in ("", "seq_", "boost_"):
            shutil.move(moved / f"{kind}{run.name}", run.parent / f"{kind}{run.name}")
    assert np.abs(got[CLASSES].to_numpy() - want[CLASSES].to_numpy()).max() <= 1e-6
    assert results and "never seen a real head" in " ".join(results[0].summary["notes"])
    assert list(alone.parent.iterdir()) == [alone]  # nothing written beside it


def test_demo_gives_the_same_table_from_the_bundle_as_from_the_run(blended, demo_data, tmp_path):
    run, bundle = blended
    from src.serve.results import analyse
    files = [d for d in (CQ500,) if d.exists()] or [demo_data / "stage_2_test_images"]
    a, _ = analyse(Predictor.load(run), files, cam_slices=1)
    b, _ = analyse(Predictor.load(bundle), files, cam_slices=1)
    assert [r.series for r in a] == [r.series for r in b]
    for ra, rb in zip(a, b):
        assert ra.summary["verdict"] == rb.summary["verdict"]
        assert np.abs(ra.table[CLASSES].to_numpy() - rb.table[CLASSES].to_numpy()).max() <= 1e-6


def test_fp16_bundle_is_smaller_and_close(blended, demo_data, tmp_path):
    run, bundle = blended
    half = export(run, tmp_path / "half.ichbundle", fp16=True, quiet=True)
    with zipfile.ZipFile(bundle) as z32, zipfile.ZipFile(half) as z16:
        s32, s16 = (z.getinfo("stage1/fold0.safetensors").file_size for z in (z32, z16))
    assert s16 < 0.55 * s32
    files = real_files(demo_data)[:12]
    a, b = Predictor.load(bundle).predict(files), Predictor.load(half).predict(files)
    assert np.abs(a[CLASSES].to_numpy() - b[CLASSES].to_numpy()).max() < 1e-2


def test_export_is_skipped_when_up_to_date_and_readable_by_others(blended):
    import os
    run, bundle = blended
    mtime = bundle.stat().st_mtime_ns
    assert export(run, quiet=True) == bundle and bundle.stat().st_mtime_ns == mtime
    mask = os.umask(0)
    os.umask(mask)
    assert bundle.stat().st_mode & 0o777 == 0o666 & ~mask  # as open() makes files, not mkstemp's 0600


# ---------------------------------------------------------------- refusals
def rewrite(src: Path, dst: Path, change) -> Path:
    """A copy of a bundle with its members changed by change(members: dict name -> bytes, manifest: dict)."""
    with zipfile.ZipFile(src) as z:
        members = {n: z.read(n) for n in z.namelist() if n != B.MANIFEST}
        manifest = json.loads(z.read(B.MANIFEST))
    change(members, manifest)
    with zipfile.ZipFile(dst, "w") as z:
        z.writestr(B.MANIFEST, json.dumps(manifest))
        for n, b in members.items():
            z.writestr(n, b)
    return dst


def listed(members, manifest, name, data):
    members[name] = data
    manifest["members"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def pickled() -> bytes:
    import io
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buf)
    return buf.getvalue()


CASES = {
    "a member's hash differs": (lambda m, man: m.__setitem__("stage1/fold0.safetensors",
                                                              m["stage1/fold0.safetensors"][:-4] + b"\0\0\0\0"),
                                "SHA-256 differs from the manifest"),
    "a member not in the manifest": (lambda m, man: m.__setitem__("extra.txt", b"hello"),
                                     "'extra.txt' is not in the manifest"),
    "a member of the manifest missing": (lambda m, man: m.pop("seq/fold1.safetensors"), "of the manifest is missing"),
    "a path that escapes": (lambda m, man: listed(m, man, "../evil.txt", b"x"), "escapes the bundle"),
    "an absolute path": (lambda m, man: listed(m, man, "/etc/evil.txt", b"x"), "escapes the bundle"),
    "a pickle": (lambda m, man: listed(m, man, "stage1/fold9.pth", pickled()), "would need code to load"),
    "a pickle under a safe name": (lambda m, man: (listed(m, man, "stage1/fold0.safetensors", pickled())),
                                   "not a safetensors file"),
    "an unknown format version": (lambda m, man: man.__setitem__("version", 99), "format version 99 is unknown"),
    "another format": (lambda m, man: man.__setitem__("format", "zip of something"), "is not an ich-bundle manifest"),
    "a model.json this code cannot read": (lambda m, man: listed(m, man, B.MODEL, b'{"format": "ich-bundle", '
                                                                 b'"version": 1}'), "does not describe a model"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bundle_is_refused_with_the_file_and_the_reason(blended, tmp_path, case):
    _, bundle = blended
    change, why = CASES[case]
    bad = rewrite(bundle, tmp_path / "bad.ichbundle", change)
    with pytest.raises(PipelineError) as e:
        Predictor.load(bad)
    assert str(bad) in str(e.value) and why in str(e.value), str(e.value)


def test_sizes_out_of_bounds_are_refused_before_reading(blended, tmp_path, monkeypatch):
    _, bundle = blended
    monkeypatch.setattr(B, "MAX_MEMBER_BYTES", 1000)  # every weights file is larger
    with pytest.raises(PipelineError, match="declares .* bytes, out of bounds"):
        B.read_bundle(bundle)
    monkeypatch.setattr(B, "MAX_MEMBER_BYTES", 2 << 30)
    monkeypatch.setattr(B, "MAX_MEMBERS", 3)
    with pytest.raises(PipelineError, match="members, more than a bundle may have"):
        B.read_bundle(bundle)


def test_a_member_claiming_a_huge_size_is_refused_without_allocating_it(blended, tmp_path):
    """The zip's directory says a member is 1 TB (a forged size field): refused from the directory alone."""
    _, bundle = blended
    data = bytearray(bundle.read_bytes())
    name = b"stage1/fold0.safetensors"
    cd = data.rfind(b"PK\x01\x02", 0, data.rfind(name))  # the central directory entry of that member
    data[cd + 24:cd + 28] = (0xFFFFFFF0).to_bytes(4, "little")  # uncompressed size: ~4 GB
    forged = tmp_path / "forged.ichbundle"
    forged.write_bytes(bytes(data))
    with pytest.raises(PipelineError, match="out of bounds"):
        B.read_bundle(forged)


def test_not_a_bundle_and_a_truncated_one(blended, tmp_path):
    _, bundle = blended
    junk = tmp_path / "junk.ichbundle"
    junk.write_bytes(b"hello, not a zip")
    with pytest.raises(PipelineError, match="not a zip archive"):
        B.read_bundle(junk)
    cut = tmp_path / "cut.ichbundle"
    cut.write_bytes(bundle.read_bytes()[: bundle.stat().st_size // 2])
    with pytest.raises(PipelineError, match="refused"):
        B.read_bundle(cut)


# ---------------------------------------------------------------- ONNX, fine-tuning, the ensemble
def test_onnx_gives_torchs_outputs_on_real_slices(blended, demo_data, tmp_path):
    import onnxruntime as ort
    _, bundle = blended
    paths = export_onnx(bundle, tmp_path / "onnx")
    p = Predictor.load(bundle, stage2=False)
    images, meta = decode_files(real_files(demo_data)[:20], windows_from_settings(p.settings), p.settings["size"])
    x = np.ascontiguousarray(images[(meta.status == "ok").to_numpy()].transpose(0, 3, 1, 2))
    for path, f in zip(paths, p.folds):
        got, emb = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x})
        with torch.no_grad():
            logits, want_emb = f.model.float()(torch.from_numpy(x), return_embedding=True)
        assert got.shape == (len(x), 6)
        assert np.abs(got - torch.sigmoid(logits).numpy()).max() <= 1e-4
        assert np.abs(emb - want_emb.numpy()).max() <= 1e-3


def test_fine_tuning_starts_from_the_bundles_fold(blended, demo_data):
    from src.config import TrainConfig
    from src.train import make_model
    _, bundle = blended
    cfg = TrainConfig(data_dir=str(demo_data), model="resnet10t", img_size=64, fold=1, weights=str(bundle))
    got = make_model(cfg).state_dict()
    ref = B.read_bundle(bundle, stage2=False).stage1[1]
    assert ref[0] == "fold1" and all(torch.equal(got[k], v) for k, v in ref[2].items())
    cfg0 = TrainConfig(data_dir=str(demo_data), model="resnet10t", img_size=64, fold=1, weights=str(bundle), weights_fold=0)
    assert torch.equal(make_model(cfg0).state_dict()["backbone.fc.weight"], B.read_bundle(bundle).stage1[0][2]["backbone.fc.weight"])
    with pytest.raises(PipelineError, match="resnet18 on 3"):
        make_model(TrainConfig(data_dir=str(demo_data), model="resnet18", fold=0, weights=str(bundle)))


def test_a_submission_takes_a_bundle_with_equal_weights(blended, demo_data, tmp_path):
    from src.make_submission import make_submission
    from src.submission import validate_file
    run, bundle = blended
    out = run.parent.parent
    with pytest.raises(PipelineError, match="--weights equal"):
        make_submission([run, bundle], "mix", data_dir=demo_data, submissions_dir=tmp_path, out_dir=out, quiet=True)
    info = make_submission([run, bundle], "mix", weights="equal", data_dir=demo_data, submissions_dir=tmp_path, out_dir=out,
                    quiet=True)
    sub = validate_file(tmp_path / "stage_2_mix.csv", demo_data / "stage_2_sample_submission.csv")
    assert len(info["members"]) == 2 and len(sub) == len(pd.read_csv(demo_data / "stage_2_sample_submission.csv"))
