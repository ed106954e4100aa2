"""A trained model travels: the bundle predicts as its run folder does, alone in an empty folder, through every
command that takes a run; a bundle from a stranger is refused for each way it can be wrong; its stage-1 networks
as ONNX give torch's outputs; a bundle fine-tunes."""
import hashlib
import json
import shutil
import subprocess
import sys
import warnings
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

from .conftest import CQ500, RSNA_SAMPLE, copy_run, require_path

ROOT = Path(__file__).resolve().parents[1]


def real_files(demo_data) -> list[Path]:
    """Real slices of ../shared (the RSNA sample's test series and the CQ500 JPEG-Lossless series); the test is
    skipped, naming them, where they are not."""
    require_path(RSNA_SAMPLE / "stage_2_test_images", CQ500)
    return list_inputs([RSNA_SAMPLE / "stage_2_test_images", CQ500])


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


def kind_of(data: bytes) -> str:
    """What a member's bytes are, sniffed independently of the bundle code: a pickle (protocol 2 to 5 opcode), a
    torch.save file (a zip holding a data.pkl), safetensors (8-byte header length, then a JSON header), JSON, text."""
    import io
    if data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            return "torch.save" if any(n.endswith("data.pkl") for n in z.namelist()) else "zip"
    n = int.from_bytes(data[:8], "little")
    if 8 + n <= len(data) and data[8:9] == b"{":
        try:
            json.loads(data[8:8 + n])
            return "safetensors"
        except ValueError:
            pass
    try:
        json.loads(data)
        return "json"
    except ValueError:
        pass
    data.decode("utf-8")
    return "text"


def test_bundle_holds_no_pickle_and_a_manifest_of_every_member(blended):
    """Every member is what its name says (safetensors, JSON, LightGBM text), sniffed from its bytes; the sniffer
    itself tells a torch.save file and a raw pickle apart from those."""
    _, bundle = blended
    assert kind_of(pickled()) == "torch.save" and kind_of(__import__("pickle").dumps({"w": 1})) == "pickle"
    want = {".safetensors": "safetensors", ".json": "json", ".txt": "text"}
    with zipfile.ZipFile(bundle) as z:
        names = set(z.namelist())
        manifest = json.loads(z.read(B.MANIFEST))
        for n in names - {B.MANIFEST}:
            data = z.read(n)
            assert hashlib.sha256(data).hexdigest() == manifest["members"][n]["sha256"]
            assert kind_of(data) == want[Path(n).suffix], n
            if n.endswith(".txt"):
                assert data.startswith(b"tree"), n  # LightGBM's own model text
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
        require_path(CQ500)
        results, _ = analyse(p, [CQ500], cam_slices=1)
    finally:
        for kind in ("", "seq_", "boost_"):
            shutil.move(moved / f"{kind}{run.name}", run.parent / f"{kind}{run.name}")
    assert np.abs(got[CLASSES].to_numpy() - want[CLASSES].to_numpy()).max() <= 1e-6
    assert results and "never seen a real head" in " ".join(results[0].summary["notes"])
    assert list(alone.parent.iterdir()) == [alone]  # nothing written beside it


def test_demo_gives_the_same_table_from_the_bundle_as_from_the_run(blended, demo_data, tmp_path):
    run, bundle = blended
    from src.serve.results import analyse
    require_path(CQ500)
    files = [CQ500]
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
NOT_A_BUNDLE = ("refused: not a bundle (not a zip archive written by src.export, or truncated or damaged at its end): "
                "get the file again")
CHECKSUM_DIFFERS = ("refused: its bytes differ from the SHA-256 it carries (damaged in transfer or changed): get the "
                    "file again")


def refused(path: Path, why: str) -> str:
    """The one-line message read_bundle refuses `path` with, checked to name the file first and hold `why`."""
    with pytest.raises(B.BundleError) as e:
        B.read_bundle(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and why in msg and "\n" not in msg, msg
    return msg


def rewrite(src: Path, dst: Path, change) -> Path:
    """A copy of a bundle with its members changed by change(members: dict name -> bytes, manifest: dict), sealed
    with a checksum that matches (as a stranger's crafted file would be): what refuses it is the member checks."""
    with zipfile.ZipFile(src) as z:
        members = {n: z.read(n) for n in z.namelist() if n != B.MANIFEST}
        manifest = json.loads(z.read(B.MANIFEST))
    change(members, manifest)
    with zipfile.ZipFile(dst, "w") as z:
        z.writestr(B.MANIFEST, json.dumps(manifest))
        for n, b in members.items():
            z.writestr(n, b)
    B.seal(dst)
    return dst


def resealed(data: bytes) -> bytes:
    """Bytes of a bundle with its checksum recomputed over them (the last 64 bytes are its hex digits)."""
    return data[:-64] + hashlib.sha256(data[:-64]).hexdigest().encode()


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
    "a member of the manifest missing": (lambda m, man: m.pop("boost/fold0/model_any.txt"), "of the manifest is missing"),
    "a path that escapes": (lambda m, man: listed(m, man, "../evil.txt", b"x"), "escapes the bundle"),
    "an absolute path": (lambda m, man: listed(m, man, "/etc/evil.txt", b"x"), "escapes the bundle"),
    "a pickle": (lambda m, man: listed(m, man, "stage1/fold9.pth", pickled()), "would need code to load"),
    "a pickle under a safe name": (lambda m, man: (listed(m, man, "stage1/fold0.safetensors", pickled())),
                                   "is not a safetensors file (SafetensorError: Error while deserializing"),
    "an unknown format version": (lambda m, man: man.__setitem__("version", 99),
                                  "format version 99 is unknown to this code (it reads 1); update the project"),
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


def test_each_bound_holds_at_its_value_and_refuses_past_it(tiny, tmp_path, monkeypatch):
    """Each bound of docs/bundles.md set to exactly what the small bundle has reads it; one less refuses it, naming
    the file and the member (the reader's checks need no trained model: the small bundle keeps them quick to
    mutate). The bounds: members, a member's declared bytes (JSON members have their own), the file's bytes, the
    members' declared bytes in all, a deflated member's ratio."""
    from fractions import Fraction
    with zipfile.ZipFile(tiny) as z:
        infos = z.infolist()
    weights = max((i for i in infos if not i.filename.endswith(".json")), key=lambda i: i.file_size)
    biggest_json = max((i for i in infos if i.filename.endswith(".json")), key=lambda i: i.file_size)
    assert weights.file_size > biggest_json.file_size  # so that the JSON bound is seen to apply to JSON only
    assert biggest_json.filename == B.MODEL and biggest_json.file_size - 1 >= z.getinfo(B.MANIFEST).file_size
    size = tiny.stat().st_size
    cases = [("MAX_MEMBERS", len(infos), f"refused: {len(infos)} members, more than a bundle may have "
                                         f"({len(infos) - 1})"),
             ("MAX_MEMBER_BYTES", weights.file_size, f"refused: member {weights.filename!r} declares "
                                                     f"{weights.file_size:,} bytes, out of bounds for a bundle member "
                                                     f"(at most {weights.file_size - 1:,})"),
             ("MAX_JSON_BYTES", biggest_json.file_size, f"refused: member {biggest_json.filename!r} declares "
                                                        f"{biggest_json.file_size:,} bytes, more than "
                                                        f"{biggest_json.file_size - 1:,}"),
             ("MAX_BUNDLE_BYTES", size, f"refused: {size:,} bytes, more than a bundle may be ({size - 1:,})")]
    want = content(B.read_bundle(tiny))
    for name, value, why in cases:
        with monkeypatch.context() as m:
            m.setattr(B, name, value)
            assert content(B.read_bundle(tiny)) == want, name
            m.setattr(B, name, value - 1)
            refused(tiny, why)
    # deflated: the members declare more than the file holds, so the total and the ratio are reached on their own
    entries = [(f"boost/{i}.txt", b"\0" * 20_000, DEFLATED) for i in range(3)]
    packed = zip_with(tmp_path / "packed.ichbundle", entries)
    with zipfile.ZipFile(packed) as z:
        infos = z.infolist()
    total, first = sum(i.file_size for i in infos), infos[1]
    ratio = max(Fraction(i.file_size, i.compress_size) for i in infos if i.compress_type == DEFLATED)
    for name, value, why in [("MAX_BUNDLE_BYTES", total, f"refused: its members declare more than {total - 1:,} "
                                                          f"bytes in all"),
                             ("MAX_RATIO", ratio, f"refused: member {first.filename!r} declares "
                                                  f"{first.file_size:,} bytes from {first.compress_size:,} compressed, "
                                                  f"more than")]:
        with monkeypatch.context() as m:
            m.setattr(B, "MAX_RATIO", 10_000)  # the other bound out of the way
            m.setattr(B, name, value)
            assert sorted(B._checked_members(packed)) == [f"boost/{i}.txt" for i in range(3)], name
            m.setattr(B, name, value - Fraction(1, 10**6) if name == "MAX_RATIO" else value - 1)
            refused(packed, why)


def test_the_checksum_is_the_sha256_of_the_bytes_before_it(tiny, tmp_path):
    """The seal, against hashlib over the file (the reference): its last 64 bytes are the hex SHA-256 of all before
    them, after the prefix in the zip comment. A bundle from before bundles were sealed (no comment) is read by the
    member checks alone: the same model, and a member changed in it still refused."""
    import hashlib
    data = tiny.read_bytes()
    assert data[-64:].decode() == hashlib.sha256(data[:-64]).hexdigest()
    assert data[-B.CHECKSUM:-64] == B.CHECKSUM_PREFIX and data[-B.CHECKSUM - 2:-B.CHECKSUM] == \
        B.CHECKSUM.to_bytes(2, "little")
    old = tmp_path / "old.ichbundle"
    with zipfile.ZipFile(tiny) as src, zipfile.ZipFile(old, "w") as dst:
        for i in src.infolist():
            dst.writestr(i, src.read(i))
    assert old.read_bytes()[-22:-18] == b"PK\x05\x06" and old.read_bytes()[-2:] == b"\0\0"
    assert content(B.read_bundle(old)) == content(B.read_bundle(tiny))
    changed = tmp_path / "changed.ichbundle"
    with zipfile.ZipFile(tiny) as src, zipfile.ZipFile(changed, "w") as dst:
        for i in src.infolist():
            dst.writestr(i, src.read(i) + (b"x" if i.filename.endswith(".txt") else b""))
    refused(changed, "its SHA-256 differs from the manifest's (changed or damaged)")
    with pytest.raises(B.BundleError, match=f"^bundle not found: {tmp_path / 'absent.ichbundle'}$"):
        B.read_bundle(tmp_path / "absent.ichbundle")


def test_the_file_hash_reads_the_first_n_bytes_in_chunks():
    """_file_sha256 against hashlib on the same bytes: at chunk boundaries (1 MiB), one byte past one, none, and past
    the end of a file (all it holds)."""
    import hashlib
    import io
    data = np.random.default_rng(0).bytes(3 << 20)
    for n in (0, 1, 1 << 20, (1 << 20) + 1, (2 << 20) + 5, len(data), len(data) + 10):
        assert B._file_sha256(io.BytesIO(data), n) == hashlib.sha256(data[:n]).hexdigest(), n


def test_a_zip_the_reader_cannot_read_is_named_with_the_reason(tiny, tmp_path):
    """A member whose bytes no longer match the zip's own CRC (resealed, so the checksum passes): the zip reader's
    error, in the refusal's words."""
    data = bytearray(tiny.read_bytes())
    with zipfile.ZipFile(tiny) as z:
        i = z.getinfo("stage1/fold0.safetensors")
    at = i.header_offset + 30 + len(i.filename) + len(i.extra) + i.compress_size - 1  # its last data byte
    data[at] ^= 0xFF
    bad = tmp_path / "bad.ichbundle"
    bad.write_bytes(resealed(bytes(data)))
    refused(bad, "refused: not a readable bundle (BadZipFile: Bad CRC-32 for file 'stage1/fold0.safetensors'): "
                 "damaged or not a bundle; get the file again")


def test_a_member_claiming_a_huge_size_is_refused_without_allocating_it(tiny, tmp_path):
    """The zip's directory says a member is 1 TB (a forged size field): refused from the directory alone."""
    bundle = tiny
    data = bytearray(bundle.read_bytes())
    name = b"stage1/fold0.safetensors"
    cd = data.rfind(b"PK\x01\x02", 0, data.rfind(name))  # the central directory entry of that member
    data[cd + 24:cd + 28] = (0xFFFFFFF0).to_bytes(4, "little")  # uncompressed size: ~4 GB
    forged = tmp_path / "forged.ichbundle"
    forged.write_bytes(resealed(bytes(data)))
    with pytest.raises(PipelineError, match="out of bounds"):
        B.read_bundle(forged)


def test_not_a_bundle_and_a_truncated_one(tiny, tmp_path):
    bundle = tiny
    junk = tmp_path / "junk.ichbundle"
    junk.write_bytes(b"hello, not a zip")
    assert refused(junk, NOT_A_BUNDLE) == f"{junk}: {NOT_A_BUNDLE}"
    data, cut = bundle.read_bytes(), tmp_path / "cut.ichbundle"
    for n in sorted({1, 22, 100, len(data) // 2, len(data) - 200, len(data) - 64, len(data) - 1}):
        cut.write_bytes(data[:n])
        assert refused(cut, NOT_A_BUNDLE) == f"{cut}: {NOT_A_BUNDLE}"


# ---------------------------------------------------------------- refusals the docs list, each crafted
def zip_with(path: Path, entries, sealed=True) -> Path:
    """A zip of (name, bytes, compression) entries, a manifest listing each (made first from the entries), sealed."""
    manifest = {"format": B.FORMAT, "version": B.VERSION, "name": "x",
                "members": {n: {"sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b)} for n, b, _ in entries}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns of a duplicate name: that is the point of one case
        with zipfile.ZipFile(path, "w") as z:
            if not any(n == B.MANIFEST for n, _, _ in entries):
                z.writestr(B.MANIFEST, json.dumps(manifest))
            for n, b, how in entries:
                z.writestr(zipfile.ZipInfo(n, (2020, 1, 1, 0, 0, 0)), b, compress_type=how)
    if sealed:
        B.seal(path)
    return path


STORED, DEFLATED = zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED
CRAFTED = {
    "no manifest": ([], "refused: no manifest.json"),
    "a duplicate name": ([("a.txt", b"one", STORED), ("a.txt", b"two", STORED)], "member 'a.txt' appears twice"),
    "a backslash in a name": ([("stage1\\fold0.txt", b"x", STORED)], "escapes the bundle or is not a plain relative"),
    "a drive letter": ([("C:/fold0.txt", b"x", STORED)], "escapes the bundle or is not a plain relative path"),
    "an empty part in a name": ([("stage1//fold0.txt", b"x", STORED)], "escapes the bundle or is not a plain relative"),
    "a dot part in a name": ([("./fold0.txt", b"x", STORED)], "escapes the bundle or is not a plain relative path"),
    "a manifest that is not JSON": ([(B.MANIFEST, b"{not json", STORED)], "refused: manifest.json is not JSON ("),
    "a disallowed kind": ([("run.sh", b"rm -rf /", STORED)], "member 'run.sh' is of a kind bundles do not hold "
                                                              "(only .json, .safetensors, .txt)"),
    "a disallowed compression method": ([("a.txt", b"x" * 100, zipfile.ZIP_BZIP2)],
                                        "member 'a.txt' uses compression method 12; bundles are stored or deflated"),
    "a deflate ratio over the bound": ([("a.txt", b"\0" * 2_000_000, DEFLATED)],
                                       "compressed, more than 200 times: out of bounds"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_bundles_are_refused_for_each_documented_reason(tmp_path, case):
    """Each refusal of docs/bundles.md that the weights-based cases above do not reach, on a sealed zip made for
    it (its own manifest lists every entry, so that only the named check can refuse it)."""
    entries, why = CRAFTED[case]
    bad = zip_with(tmp_path / "bad.ichbundle", entries)
    if case == "no manifest":
        with zipfile.ZipFile(bad, "w") as z:
            z.writestr("a.txt", b"x")
        B.seal(bad)
    with pytest.raises(B.BundleError) as e:
        B.read_bundle(bad)
    assert str(e.value).startswith(f"{bad}: refused: ") and why in str(e.value), str(e.value)


def test_a_member_holding_another_size_than_it_declares(tmp_path):
    """A deflated member whose directory declares 100 bytes more than its data inflates to (its CRC that of the
    data, so the zip reader is satisfied): refused by the size check, before its hash is compared."""
    import struct
    import zlib
    data = b"tree\n" + b"x" * 1000
    bad = zip_with(tmp_path / "bad.ichbundle", [("boost/a.txt", data, DEFLATED)], sealed=False)
    raw, name = bytearray(bad.read_bytes()), b"boost/a.txt"
    local = zipfile.ZipFile(bad).getinfo("boost/a.txt").header_offset
    central = next(i for i in range(len(raw)) if raw[i:i + 4] == b"PK\x01\x02" and raw[i + 46:i + 46 + len(name)] == name)
    for pos, at in ((local, 22), (central, 24)):  # the uncompressed size in the local header and the directory
        assert struct.unpack_from("<I", raw, pos + at)[0] == len(data)
        assert struct.unpack_from("<I", raw, pos + at - 8)[0] == zlib.crc32(data)
        struct.pack_into("<I", raw, pos + at, len(data) + 100)
    bad.write_bytes(bytes(raw))
    B.seal(bad)
    with pytest.raises(B.BundleError, match="member 'boost/a.txt' holds another size than it declares"):
        B.read_bundle(bad)


def test_members_declaring_more_than_a_bundle_may_hold_in_all(tmp_path, monkeypatch):
    """The file is small (deflated), its members declare 600 KB in all: with the bound at 500 KB, refused from the
    directory, before any member is read."""
    entries = [(f"boost/{i}.txt", b"\0" * 200_000, DEFLATED) for i in range(3)]
    bad = zip_with(tmp_path / "bad.ichbundle", entries)
    assert bad.stat().st_size < 10_000
    monkeypatch.setattr(B, "MAX_BUNDLE_BYTES", 500_000)
    monkeypatch.setattr(B, "MAX_RATIO", 10_000)
    with pytest.raises(B.BundleError, match="its members declare more than 500,000 bytes in all"):
        B.read_bundle(bad)


# ---------------------------------------------------------------- damage anywhere in the bytes
def tiny_trained() -> B.Trained:
    """A small run's predicting parts, every kind a bundle holds: a stage-1 fold with a tensor under two names (as
    the network's head is its backbone's classifier) and a run-control key, a GRU fold, a tree fold, blend, card."""
    w, g = torch.arange(1200.0), torch.full((2, 3), 0.5)  # w: a weights file larger than the JSON members
    return B.Trained("tiny", [("fold0", {"model": "resnet10t", "input_mode": "windows", "img_size": 64, "workers": 3},
                               {"w": w, "head.w": w, "b": torch.ones(2), "bn.num_batches_tracked": torch.tensor(7)})],
                     {"size": 64, "windows": [[40, 80]]},
                     seq=[("fold0", {"model": {"gru.weight": g, "out.weight": g}, "config": {"hidden": 2},
                                     "emb_dim": 3, "emb_mean": torch.zeros(3), "emb_std": torch.ones(3)})],
                     boost=[("fold0", {"threads": 1, "leaves": 4}, [f"tree {c}\n" for c in CLASSES])],
                     blend={"stage1": [1.0] * 6}, card={"synthetic": True, "note": "n" * 2000})  # model.json >
                     # the manifest, so that the JSON bound is seen to apply to each JSON member


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """tiny_trained() written by write_bundle: small enough for every byte of it to be damaged in turn."""
    path = tmp_path_factory.mktemp("tiny") / "tiny.ichbundle"
    B.write_bundle(tiny_trained(), path)
    return path


def test_a_bundle_gives_back_what_was_written(tiny, tmp_path):
    """read_bundle against the Trained that write_bundle was given (the reference): every tensor, the tied one
    still one tensor, the GRU's checkpoint, the trees' texts, blend and card, configs without run control; the card
    says which file and dtype it came from. stage2=False reads stage 1 only; an fp16 bundle reads back as float32."""
    want, got = tiny_trained(), B.read_bundle(tiny)
    assert (got.name, got.settings, got.blend) == (want.name, want.settings, want.blend)
    [(fold, cfg, sd)] = got.stage1
    assert (fold, cfg) == ("fold0", {"model": "resnet10t", "input_mode": "windows", "img_size": 64})
    assert sorted(sd) == ["b", "bn.num_batches_tracked", "head.w", "w"] and sd["head.w"] is sd["w"]
    assert sd["w"].tolist() == [float(i) for i in range(1200)] and sd["b"].tolist() == [1.0, 1.0]
    assert [v.dtype for v in (sd["w"], sd["b"])] == [torch.float32] * 2
    assert (sd["bn.num_batches_tracked"].dtype, sd["bn.num_batches_tracked"].item()) == (torch.int64, 7)
    [(fold, ck)] = got.seq
    assert (fold, ck["config"], ck["emb_dim"], type(ck["emb_dim"])) == ("fold0", {"hidden": 2}, 3, int)
    assert sorted(ck["model"]) == ["gru.weight", "out.weight"] and ck["model"]["out.weight"] is ck["model"]["gru.weight"]
    assert ck["model"]["gru.weight"].tolist() == [[0.5] * 3] * 2
    assert ck["emb_mean"].tolist() == [0.0] * 3 and ck["emb_std"].tolist() == [1.0] * 3
    assert got.boost == [("fold0", {"leaves": 4}, [f"tree {c}\n" for c in CLASSES])]
    assert got.card == {"synthetic": True, "note": "n" * 2000,
                        "bundle": {"file": str(tiny), "dtype": "float32", "versions": B.versions()}}
    only1 = B.read_bundle(tiny, stage2=False)
    assert (len(only1.stage1), only1.seq, only1.boost) == (1, [], [])
    half = tmp_path / "half.ichbundle"
    B.write_bundle(want, half, fp16=True)
    [(_, _, sd16)] = B.read_bundle(half).stage1
    assert sd16["w"].dtype == torch.float32 and sd16["w"].tolist() == sd["w"].tolist() and sd16["head.w"] is sd16["w"]
    assert sd16["bn.num_batches_tracked"].dtype == torch.int64  # integers stay integers in an fp16 bundle
    assert B.read_bundle(half).card["bundle"]["dtype"] == "float16"


def test_a_model_json_without_its_optional_keys_reads_with_their_defaults(tiny, tmp_path):
    """A model.json with no dtype, versions, GRU, trees or aliases (as a smaller exporter may write): float32, no
    versions, no stage 2, and each tensor under its one name."""
    def bare(mo):
        for k in ("dtype", "versions", "seq", "boost"):
            mo.pop(k)
        mo["stage1"][0].pop("aliases")
    bad = rewrite(tiny, tmp_path / "bare.ichbundle", model_json(bare))
    got = B.read_bundle(bad)
    assert got.card["bundle"] == {"file": str(bad), "dtype": "float32", "versions": {}}
    assert (got.seq, got.boost) == ([], [])
    assert sorted(got.stage1[0][2]) == ["b", "bn.num_batches_tracked", "w"]


def model_json(change):
    """A CASES change that rewrites model.json with change(model: dict) (its manifest entry made to match)."""
    def edit(members, manifest):
        model = json.loads(members[B.MODEL])
        change(model)
        listed(members, manifest, B.MODEL, json.dumps(model).encode())
    return edit


TINY_CASES = {
    **CASES,
    "a manifest without members": (lambda m, man: man.pop("members"), "manifest.json lists no members"),
    "model.json not JSON": (lambda m, man: listed(m, man, B.MODEL, b"{not json"), "model.json is not JSON"),
    "a model of an unknown version": (model_json(lambda mo: mo.__setitem__("version", 7)),
                                      "model.json is not an ich-bundle model of a known version"),
    "no stage-1 fold": (model_json(lambda mo: mo.__setitem__("stage1", [])), "refused: it holds no stage-1 fold"),
    "no model.json": (lambda m, man: (m.pop(B.MODEL), man["members"].pop(B.MODEL)), "refused: no model.json"),
    "an alias naming nothing": (model_json(lambda mo: mo["stage1"][0]["aliases"].__setitem__("x", "nowhere")),
                                "alias 'x' names 'nowhere', which it does not hold"),
    "a weights file it does not hold": (model_json(lambda mo: mo["seq"][0].__setitem__("weights", "seq/f9.safetensors")),
                                        "model.json names the member 'seq/f9.safetensors', which the bundle does "
                                        "not hold"),
    "a tree model it does not hold": (model_json(lambda mo: mo["boost"][0]["models"].__setitem__(0, "boost/x.txt")),
                                      "does not describe a model this code can load (KeyError: 'boost/x.txt')"),
}


@pytest.mark.parametrize("case", list(TINY_CASES))
def test_the_reader_refuses_each_way_a_bundle_can_be_wrong(tiny, tmp_path, case):
    """Each refusal above (and those only model.json can give) from read_bundle itself, on the small bundle: one
    line naming the file and the reason."""
    change, why = TINY_CASES[case]
    refused(rewrite(tiny, tmp_path / "bad.ichbundle", change), why)


def content(t: B.Trained) -> tuple:
    return (t.name, t.settings, t.blend, {k: v for k, v in t.card.items() if k != "bundle"},
            [(n, c, {k: v.tolist() for k, v in sd.items()}) for n, c, sd in t.stage1], t.boost)


def member_bytes(path: Path) -> set[int]:
    """The offsets of the members' own bytes (data and names in their local headers), from the zip's layout."""
    out = set()
    with zipfile.ZipFile(path) as z:
        for i in z.infolist():
            start = i.header_offset + 30 + len(i.filename) + len(i.extra)
            out |= set(range(i.header_offset + 30, start + i.compress_size))
    return out


def test_every_byte_flipped_or_cut_is_refused(tiny, tmp_path):
    """Bytes of a bundle XOR 0xFF one at a time: every byte of its headers, the zip's directory, the end record and
    the checksum, and every 8th of its members' data (the manifest's among them); and the file cut at those
    lengths. Every one is refused by the checksum, naming the file. With the checksum recomputed after the flip (a
    file damaged before it was sealed, or crafted), the member checks and the zip reader still refuse every flip
    in a member's bytes, each in one line; the others, in fields no reader uses (times, attributes, the local
    headers' copies), give the same model: never another exception, never other content."""
    data, bad, cut = tiny.read_bytes(), tmp_path / "bad.ichbundle", tmp_path / "cut.ichbundle"
    members, want = member_bytes(tiny), content(B.read_bundle(tiny))
    offsets = [n for n in range(len(data)) if n not in members or n % 8 == 0]
    assert len(offsets) > 1000
    bad.write_bytes(data)
    with open(bad, "r+b") as f:      # changed in place, one byte at a time (rewriting the file is slower)
        def flipped(n: int, reseal: bool):
            f.seek(n)
            f.write(bytes([data[n] ^ 0xFF]))
            if reseal:
                f.seek(len(data) - 64)
                f.write(resealed(data[:n] + bytes([data[n] ^ 0xFF]) + data[n + 1:])[-64:])
            f.flush()
            try:
                return B.read_bundle(bad)
            finally:
                f.seek(0)
                f.write(data)
                f.flush()
        end = len(data) - 22 - B.CHECKSUM   # the end record, then the comment: prefix and digits
        ends_not_a_bundle = set(range(end, end + 4)) | set(range(end + 20, end + 22 + len(B.CHECKSUM_PREFIX)))
        for n in offsets:
            with pytest.raises(B.BundleError) as e:
                flipped(n, reseal=False)
            assert str(e.value) == f"{bad}: " + (NOT_A_BUNDLE if n in ends_not_a_bundle else CHECKSUM_DIFFERS), n
        same = []
        for n in offsets[:-64]:
            try:
                got = content(flipped(n, reseal=True))
            except B.BundleError as e:
                assert str(e).startswith(f"{bad}: refused: ") and "\n" not in str(e), str(e)
                continue
            assert n not in members and got == want, n
            same.append(n)
    assert 0 < len(same) < len(offsets) // 2
    for n in offsets[::8]:
        cut.write_bytes(data[:n])
        assert refused(cut, NOT_A_BUNDLE) == f"{cut}: {NOT_A_BUNDLE}"


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


def damaged_copies(bundle: Path, folder: Path) -> dict[str, Path]:
    """A real bundle damaged five ways: a byte of a member's data, of the zip's directory, of the manifest, of the
    end record, and the file cut short."""
    data = bundle.read_bytes()
    with zipfile.ZipFile(bundle) as z:
        weights, manifest = z.getinfo("stage1/fold0.safetensors"), z.getinfo(B.MANIFEST)
    at = {"a member's data": weights.header_offset + 30 + len(weights.filename) + weights.compress_size // 2,
          "the zip's directory": data.rfind(b"PK\x01\x02") + 46,
          "the manifest": manifest.header_offset + 30 + len(manifest.filename) + 40,
          "the end record": data.rfind(b"PK\x05\x06") + 10}
    out = {}
    for what, n in at.items():
        out[what] = folder / f"{what.replace(' ', '_')}.ichbundle"
        out[what].write_bytes(data[:n] + bytes([data[n] ^ 0x01]) + data[n + 1:])
    out["cut short"] = folder / "cut.ichbundle"
    out["cut short"].write_bytes(data[: len(data) * 2 // 3])
    return out


def front_ends(bundle: Path, tmp: Path) -> dict[str, tuple]:
    """Every command that loads a bundle: its module and arguments."""
    from .test_node import free_port
    return {"src.serve.demo": ("src.serve.demo", ["--run", str(bundle), str(tmp), "--results-dir", str(tmp / "d")]),
            "src.serve.webapp": ("src.serve.webapp", ["--run", str(bundle), "--port", str(free_port())]),
            "src.serve.node": ("src.serve.node", ["--run", str(bundle), "--send-to", "127.0.0.1:9:NOBODY",
                                                  "--spool-dir", str(tmp / "spool"), "--port", str(free_port())]),
            "src.predict": ("src.predict", [str(bundle), "--dicom-dir", str(tmp), "--pred-dir", str(tmp / "p")]),
            "src.export --onnx": ("src.export", [str(bundle), "--onnx", str(tmp / "onnx")])}


def test_a_damaged_bundle_is_one_line_and_exit_2_in_every_front_end(blended, tmp_path, monkeypatch, capsys):
    """Each damaged copy is refused naming the file; each front end's main, as `python -m` runs it
    (src.utils.cli_main), given one of them: exit 2 and one line on stderr naming the file, nothing written; the
    demo's command once more in its own process."""
    import importlib

    from src.utils import cli_main
    _, bundle = blended
    copies = list(damaged_copies(bundle, tmp_path).values())
    for damaged in copies:
        with pytest.raises(B.BundleError, match=f"^{damaged}: refused: "):
            Predictor.load(damaged)
    for damaged, (name, (module, args)) in zip(copies, front_ends(bundle, tmp_path / "w").items()):
        args = [str(damaged) if a == str(bundle) else a for a in args]
        monkeypatch.setattr(sys, "argv", [module, *args])
        with pytest.raises(SystemExit) as e:
            cli_main(importlib.import_module(module).main)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f"error: {damaged}: refused: "), (name, err)
        assert len(err.strip().splitlines()) == 1, (name, err)
    assert not any(p.is_file() for p in (tmp_path / "w").rglob("*") if p.name != "node.log")
    module, args = front_ends(copies[0], tmp_path / "w")["src.serve.demo"]
    r = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith(f"error: {copies[0]}: refused: ")
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
