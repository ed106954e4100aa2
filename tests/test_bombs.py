"""Decompression bombs and other sizes a file declares: refused from the header, before anything is decoded, in the
cache build, the Predictor (so the demo and its page) and the subset step; each in well under a second and without
the memory it asks for."""
import html
import json
import os
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless

from src import dicom as D
from src.scans import decode_one

ROOT = Path(__file__).resolve().parents[1]


def rle_zeros(n: int) -> bytes:
    """An RLE segment of n zero bytes: runs of 128 (header byte 0x81 = -127, then the byte)."""
    full, rest = divmod(n, 128)
    return b"\x81\x00" * full + (bytes([257 - rest, 0]) if rest > 1 else b"\x00\x00" if rest == 1 else b"")


def rle_bomb(template: Path, path: Path, rows: int, cols: int, honest: bool = True, **tags) -> Path:
    """A real slice's header with RLE Lossless pixel data declaring rows x cols 16-bit pixels. honest: the stream
    decodes to that many zeros (12.5 MB for 20,000 x 20,000); else it is a few bytes (the header alone lies)."""
    ds = pydicom.dcmread(template)
    n = rows * cols if honest else 1024
    segments = [rle_zeros(n), rle_zeros(n)]  # 16-bit: high bytes, then low bytes
    header = np.zeros(16, "<u4")
    header[0], header[1], header[2] = 2, 64, 64 + len(segments[0])
    frame = header.tobytes() + segments[0] + segments[1]
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = rows, cols, 16, 16, 15, 1
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def bombs(demo_data, tmp_path_factory):
    template = sorted((demo_data / "stage_2_train_images").glob("*.dcm"))[0]
    d = tmp_path_factory.mktemp("bombs")
    out = {"20000 honest": rle_bomb(template, d / "ID_b20000.dcm", 20000, 20000),
           "65535 claim": rle_bomb(template, d / "ID_b65535.dcm", 65535, 65535, honest=False),
           "4096 x 4096": rle_bomb(template, d / "ID_b4096.dcm", 4096, 4096, honest=False),
           "1000 frames": rle_bomb(template, d / "ID_bf1000.dcm", 512, 512, honest=False, NumberOfFrames=1000)}
    big = d / "ID_b70b.dcm"  # a file larger than a slice can be (sparse: no disk used)
    with open(big, "wb") as f:
        f.truncate(D.MAX_FILE_BYTES + 1)
    out["70 MB file"] = big
    return out


MATRIX = "pixels: not a CT matrix (at most 2048 x 2048); refused from its header, before decoding"
EXPECT = {"20000 honest": f"image of 20000 x 20000 {MATRIX}", "65535 claim": f"image of 65535 x 65535 {MATRIX}",
          "4096 x 4096": f"image of 4096 x 4096 {MATRIX}", "1000 frames": "multi-frame image (1000 frames): export single slices",
          "70 MB file": "file of 64 MiB, larger than a CT slice can be (64 MiB); multi-slice or other objects are not read"}


def test_the_honest_bomb_really_is_one(bombs):
    """The 12.5 MB file decodes (by pydicom, unchecked) to 800 MB: it is what the refusals are about."""
    ds = pydicom.dcmread(bombs["20000 honest"], stop_before_pixels=True)
    assert bombs["20000 honest"].stat().st_size < 13e6 and ds.Rows * ds.Columns * 2 == 800_000_000


@pytest.mark.parametrize("name", list(EXPECT))
def test_each_is_refused_from_its_header_in_well_under_a_second(bombs, name):
    import tracemalloc
    tracemalloc.start()
    t0 = time.perf_counter()
    img, head, reason = decode_one(str(bombs[name]), D.DEFAULT_WINDOWS, 64)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert img is None and reason == EXPECT[name], reason
    assert seconds < 1.0, seconds
    assert peak < 1 << 20, peak  # ~20 KB for the header: not even the 12.5 MB of compressed pixel data was read


def peak_of(code: str) -> dict:
    """Run python code in a fresh process; it prints a JSON line, to which the process's peak resident memory is added
    (VmHWM: the high-water mark of this program's own memory; ru_maxrss would carry the forking parent's over exec)."""
    wrapped = code + ("\nimport json as _j\nfrom pathlib import Path as _P\n"
                      "_hwm = next(l for l in _P('/proc/self/status').read_text().splitlines() if l.startswith('VmHWM'))\n"
                      "print(_j.dumps({'peak_mb': int(_hwm.split()[1]) / 1024}))\n")
    r = subprocess.run([sys.executable, "-c", wrapped], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = {}
    for line in r.stdout.splitlines():
        if line.startswith("{"):
            out.update(json.loads(line))
    return out


def test_the_cache_build_skips_them_and_stays_small(bombs, demo_data, tmp_path):
    """src.prepare over real-layout data with the bombs among the slices: finished, each bomb skipped with its reason,
    the whole build's peak memory under 0.5 GB."""
    data = tmp_path / "data"
    (data / "stage_2_train_images").mkdir(parents=True)
    (data / "stage_2_test_images").mkdir()
    for f in sorted((demo_data / "stage_2_train_images").glob("*.dcm"))[:20]:
        (data / "stage_2_train_images" / f.name).symlink_to(f)
    for name, f in bombs.items():
        (data / "stage_2_test_images" / f.name).symlink_to(f)
    res = peak_of(textwrap.dedent(f"""
        import json, time
        import pandas as pd
        from src.prepare import prepare
        t0 = time.perf_counter()
        prepare({str(data)!r}, {str(tmp_path / 'cache')!r}, size=64, jobs=1, chunk=8, quiet=True)
        meta = pd.read_csv({str(tmp_path / 'cache' / 'metadata.csv')!r})
        print(json.dumps({{"seconds": time.perf_counter() - t0,
                           "reasons": dict(zip(meta.ID, meta.reason.fillna("")))}}))
    """))
    for name, f in bombs.items():
        assert res["reasons"][f.stem] == EXPECT[name], (name, res["reasons"][f.stem])
    assert res["peak_mb"] < 512, res["peak_mb"]


def native_slice(template: Path, path: Path, n: int, seed: int = 0) -> Path:
    """A real slice's header with n x n uncompressed 16-bit pixels of plausible CT values (about 0 HU, spread
    100 HU): n * n * 2 bytes of pixel data, from 512 px on above the 256 KB that stay on disk until used."""
    from pydicom.uid import ExplicitVRLittleEndian
    ds = pydicom.dcmread(template)
    raw = np.random.default_rng(seed).normal(1024, 100, (n, n)).astype("<i2")
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = n, n, 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept, ds.Modality = 1, -1024, "CT"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PixelData = raw.tobytes()
    ds["PixelData"].VR = "OW"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_pixel_data_stays_on_disk_until_the_header_passes(bombs, demo_data, tmp_path):
    """docs/reliability.md: values over 256 KB (the pixel data) stay on disk until the header has passed. Counted in a
    fresh process as the bytes it reads (/proc/self/io rchar) while decode_one refuses each file: a few KB of
    header, where the honest bomb's pixel data is 12.5 MB and the native one's 16.8 MB. A 512 x 512 slice whose header
    passes is read whole (the count sees pixel reads). Fails when src/dicom.py read_dicom reads eagerly
    (`defer_size=None`)."""
    template = sorted((demo_data / "stage_2_train_images").glob("*.dcm"))[0]
    good = native_slice(template, tmp_path / "ID_good.dcm", 512)
    files = {"20000 honest": bombs["20000 honest"], "native 2900": native_slice(template, tmp_path / "ID_n2900.dcm", 2900),
             "512 slice": good}
    assert files["native 2900"].stat().st_size > 2900 * 2900 * 2
    res = peak_of(textwrap.dedent(f"""
        import json
        from pathlib import Path
        from src import dicom as D
        from src.scans import decode_one
        def rchar():
            return int(next(l.split()[1] for l in Path('/proc/self/io').read_text().splitlines() if l.startswith('rchar')))
        decode_one({str(good)!r}, D.DEFAULT_WINDOWS, 64)  # the imports a decode needs, read before counting
        out = {{}}
        for name, path in {json.dumps({k: str(v) for k, v in files.items()})}.items():
            r0 = rchar()
            img, head, reason = decode_one(path, D.DEFAULT_WINDOWS, 64)
            out[name] = {{"bytes": rchar() - r0, "reason": reason, "ok": img is not None}}
        print(json.dumps(out))
    """))
    assert res["512 slice"]["ok"] and res["512 slice"]["bytes"] >= 512 * 512 * 2, res["512 slice"]
    for name, n in (("20000 honest", 20000), ("native 2900", 2900)):
        assert res[name]["reason"] == f"image of {n} x {n} {MATRIX}", res[name]
        assert not res[name]["ok"] and res[name]["bytes"] < 64 << 10, (name, res[name])


def test_the_subset_step_reads_their_headers_without_their_pixels(bombs):
    from src.subset import _patients_of
    ids = _patients_of([str(bombs["20000 honest"]), str(bombs["70 MB file"])])
    assert ids[0] != "" and ids[1] == ""  # the header is read (deferred pixels); the oversized file is left out


def test_the_page_refuses_them_and_stays_small(bombs, trained_run, demo_data):
    """The demo page in its own process: the bombs uploaded with a real slice; the page names each refused file,
    and its peak memory grows by less than 100 MB (its baseline, torch and the model, is reported)."""
    import requests

    from src.serve.webapp import launched
    with launched(trained_run) as (url, proc):
        def hwm():
            return int(next(line.split()[1] for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                            if line.startswith("VmHWM")))
        before = hwm()
        real = sorted((demo_data / "stage_2_test_images").glob("*.dcm"))[0]
        files = [("files", (f.name, f.read_bytes(), "application/dicom"))
                 for f in [real] + [f for name, f in bombs.items() if name != "70 MB file"]]
        t0 = time.perf_counter()
        r = requests.post(url + "/analyse", files=files, timeout=120)
        seconds = time.perf_counter() - t0
        grown = (hwm() - before) / 1024
    # the real slice is analysed (200) and each bomb is listed with its reason
    assert r.status_code == 200, r.text[:2000]
    for name in ("20000 honest", "65535 claim", "4096 x 4096", "1000 frames"):
        assert f"<li>{bombs[name].name}: {html.escape(EXPECT[name])}</li>" in r.text, (name, r.text[:3000])
    assert grown < 100, f"the page grew by {grown:.0f} MB (from {before / 1024:.0f} MB)"
    assert seconds < 10, seconds


def one_entry_zip(z: Path, signature: bytes, at: int, value: bytes) -> Path:
    """An upload's zip of one entry, the bytes at `at` of its last `signature` record replaced by `value`."""
    z.parent.mkdir(parents=True)
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("a.dcm", b"x")
    data = bytearray(z.read_bytes())
    pos = data.rfind(signature) + at
    data[pos:pos + len(value)] = value
    z.write_bytes(bytes(data))
    return z


def test_a_zip_declaring_too_many_entries_is_refused_before_its_directory_is_read(tmp_path):
    from src.serve.webapp import MAX_FILES, UploadError, unpack_zips, zip_directory
    z = one_entry_zip(tmp_path / "up" / "00000" / "many.zip", b"PK\x05\x06", 8,
                      (60000).to_bytes(2, "little") * 2)  # entries on this disk, entries in all
    assert zip_directory(z)[0] == 60000 > MAX_FILES
    with pytest.raises(UploadError, match="declares 60000 entries"):
        unpack_zips([z], 0)


def test_a_zip_whose_directory_is_larger_than_its_entries_take_is_refused_before_it_is_read(tmp_path):
    """The end record declares one entry but a directory of 3 MB (8 million entries would make it 400 MB, which
    zipfile reads whole, by its size, before any count is checked): refused from the end record."""
    from src.serve.webapp import MAX_FILES, ZIP_DIRECTORY_BYTES, UploadError, unpack_zips, zip_directory
    z = one_entry_zip(tmp_path / "up" / "00000" / "wide.zip", b"PK\x05\x06", 12,
                      (3_000_000).to_bytes(4, "little"))  # the directory's size
    assert zip_directory(z) == (1, 3_000_000)
    with pytest.raises(UploadError) as e:
        unpack_zips([z], 0)
    assert str(e.value) == (f"a zip archive whose directory is 3,000,000 bytes, more than {MAX_FILES} entries take "
                            f"({MAX_FILES * ZIP_DIRECTORY_BYTES:,}): refused before it is read")


@pytest.mark.parametrize("entries,message", [
    ([("a", b"x"), ("a/b.dcm", b"y")], "zip entry 'a/b.dcm' collides with another entry of the archive"),
    ([("a.dcm", b"x"), ("a.dcm", b"y")], "zip entry 'a.dcm' collides with another entry of the archive")])
def test_zip_entries_that_collide_are_refused(tmp_path, entries, message):
    import warnings
    from src.serve.webapp import UploadError, unpack_zips
    z = tmp_path / "up" / "00000" / "c.zip"
    z.parent.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns of the duplicate name: that is the case
        with zipfile.ZipFile(z, "w") as f:
            for name, data in entries:
                f.writestr(name, data)
    with pytest.raises(UploadError, match=message):
        unpack_zips([z], 0)


def test_a_zip_that_zipfile_cannot_read_is_a_message(tmp_path):
    from src.serve.webapp import UploadError, unpack_zips
    z = one_entry_zip(tmp_path / "up" / "00000" / "broken.zip", b"PK\x01\x02", 0, b"XXXX")  # no directory entry
    with pytest.raises(UploadError, match="^broken.zip: not a readable zip archive \\(BadZipFile: "):
        unpack_zips([z], 0)
