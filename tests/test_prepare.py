import json
import shutil

import numpy as np
import pandas as pd
import pytest

import src.cache as C
import src.prepare as P
from src.scans import order_series
from src.dicom import read_dicom
from src.stamps import Stamp


def test_cache_contents_and_skipped_file(demo_data, demo_cache):
    images, meta = C.load_cache(demo_cache / "cache")
    n_files = len(list(demo_data.glob("stage_2_*_images/*.dcm")))
    assert images.shape == (n_files, 64, 64, 3) and images.dtype == np.uint8
    summary = json.loads((demo_cache / "cache" / "summary.json").read_text())
    assert summary["skipped"] == 1 and summary["done"] == n_files - 1
    bad = meta[meta.status != "ok"]
    assert bad.reason.iloc[0].startswith("pixel data too short (truncated file?): "), bad.reason.iloc[0]
    assert not images[bad.row.iloc[0]].any()  # skipped rows stay zero
    # every ok row holds the image of its file, and the 320 px series was resized
    row = meta[meta.status == "ok"].iloc[5]
    from src.dicom import dicom_to_image
    assert np.array_equal(images[row.row], dicom_to_image(read_dicom(row.path), size=64))
    assert (meta.cols > 128).any()


def test_slices_ordered_by_z_not_by_name(demo_cache):
    _, meta = C.load_cache(demo_cache / "cache")
    ok = meta[meta.status == "ok"]
    for _, s in ok.groupby("SeriesInstanceUID"):
        s = s.sort_values("slice_index")
        assert s.slice_index.tolist() == list(range(len(s)))
        assert (np.diff(s.z.to_numpy()) > 0).all()
        assert (s.series_len == len(s)).all()
        assert s.prev_id.iloc[0] == "" and s.next_id.iloc[-1] == ""
        assert s.prev_id.iloc[1:].tolist() == s.ID.iloc[:-1].tolist()
        assert s.next_id.iloc[:-1].tolist() == s.ID.iloc[1:].tolist()
    # file names are random IDs, so name order is not z order in at least one series
    assert any(not s.sort_values("ID").z.is_monotonic_increasing for _, s in ok.groupby("SeriesInstanceUID"))


def test_order_series_on_shuffled_rows():
    meta = pd.DataFrame({"ID": list("abcde"), "status": "ok", "SeriesInstanceUID": ["s"] * 3 + ["t"] * 2,
                         "z": [5.0, -1.0, 2.5, 9.0, 3.0]})
    out = order_series(meta.sample(frac=1, random_state=1)).set_index("ID")
    assert out.slice_index.to_dict() == {"a": 2, "b": 0, "c": 1, "d": 1, "e": 0}
    assert out.loc["c", "prev_id"] == "b" and out.loc["c", "next_id"] == "a" and out.loc["e", "next_id"] == "d"


def test_rows_follow_series_and_z(demo_cache):
    """A series' slices are adjacent rows in z order (train before test), so a 2.5D sample reads one place."""
    _, meta = C.load_cache(demo_cache / "cache")
    ok = meta[meta.status == "ok"].sort_values("row")
    assert ok.split.tolist() == sorted(ok.split.tolist(), key=lambda split: split != "train")
    for _, s in ok.groupby("SeriesInstanceUID"):
        between = meta[(meta.row >= s.row.min()) & (meta.row <= s.row.max())]
        assert (between.status != "ok").sum() == len(between) - len(s)  # only unreadable files in between
        assert s.slice_index.tolist() == list(range(len(s)))  # in z order


@pytest.fixture(scope="module")
def ref48(demo_data, tmp_path_factory):
    """A cache built without interruption (48 px, chunks of 16), which the killed builds must equal."""
    ref = tmp_path_factory.mktemp("ref48")
    P.prepare(demo_data, ref, size=48, jobs=1, chunk=16, quiet=True)
    return ref


def kill_on(monkeypatch, name, when):
    """Make P.<name> raise KeyboardInterrupt (a kill) on the call for which when(args, kwargs) holds."""
    real = getattr(P, name)

    def dies(*a, **k):
        if when(a, k):
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(P, name, dies)


@pytest.mark.parametrize("where", ["decoding the third chunk", "before appending a decoded chunk",
                                   "after the footer, before the rename"])
def test_resume_after_kill_gives_identical_cache(demo_data, ref48, tmp_path, monkeypatch, where):
    ref, out = ref48, tmp_path / "killed"
    if where == "decoding the third chunk":
        kill_on(monkeypatch, "_process_chunk", lambda a, k: a[1] == 32)
    elif where == "before appending a decoded chunk":  # chunk 16 decoded (data and record written), not appended
        kill_on(monkeypatch, "append_ready", lambda a, k: a[4]["chunks"] == 1 and 16 in a[3])
    else:
        kill_on(monkeypatch, "write_summary", lambda a, k: True)
    with pytest.raises(KeyboardInterrupt):
        P.prepare(demo_data, out, size=48, jobs=1, chunk=16, quiet=True)
    assert not (out / "images.bin").exists() and (out / "images.partial.bin").exists()
    monkeypatch.undo()

    done, real = [], P._process_chunk
    monkeypatch.setattr(P, "_process_chunk", lambda *a, **k: done.append(a[1]) or real(*a, **k))
    P.prepare(demo_data, out, size=48, jobs=1, chunk=16, quiet=True)
    # finished chunks are not redone (chunk 16 was decoded and recorded before the kill): only those after them are
    n_files = len(pd.read_csv(ref / "metadata.csv"))
    assert done == ([] if where == "after the footer, before the rename" else list(range(32, n_files, 16))), done
    assert (out / "images.bin").read_bytes() == (ref / "images.bin").read_bytes()
    pd.testing.assert_frame_equal(pd.read_csv(out / "metadata.csv"), pd.read_csv(ref / "metadata.csv"))
    assert not list(out.glob("*.partial*")) and not (out / "chunks").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_rerun_is_a_no_op_and_settings_change_stops_unless_overwrite(demo_data, tmp_path, monkeypatch):
    P.prepare(demo_data, tmp_path, size=32, jobs=1, chunk=64, quiet=True)
    before = (tmp_path / "images.bin").read_bytes()
    monkeypatch.setattr(P, "_process_chunk", lambda *a, **k: pytest.fail("should not decode again"))
    P.prepare(demo_data, tmp_path, size=32, jobs=1, chunk=64, quiet=True)
    with pytest.raises(P.PipelineError, match=r"size: 32 -> 24"):  # another size: stop, nothing written
        P.prepare(demo_data, tmp_path, size=24, jobs=1, chunk=64, quiet=True)
    assert (tmp_path / "images.bin").read_bytes() == before
    monkeypatch.undo()
    P.prepare(demo_data, tmp_path, size=24, jobs=1, chunk=64, quiet=True, overwrite=True)
    assert C.load_cache(tmp_path)[0].shape[1] == 24


def test_the_format_is_in_the_fingerprint_and_an_old_cache_stops(demo_data, tmp_path, monkeypatch):
    """A cache of another format (here: the uncompressed images.npy of code version 2) is stale: the build stops
    naming the differences, load_cache says what to do, and --overwrite replaces it."""
    P.prepare(demo_data, tmp_path, size=32, jobs=1, chunk=64, quiet=True)
    train_fp = C.cache_fingerprint(tmp_path, "train")
    monkeypatch.setattr(P, "FORMAT", "another format")
    files = P.list_files(demo_data)
    assert P.prepare_stamp(files, 32, P.DEFAULT_WINDOWS).id != Stamp.load(tmp_path / "cache_config.json").id
    config = json.loads((tmp_path / "cache_config.json").read_text())
    config["settings"]["format"] = "another format"
    (tmp_path / "other.json").write_text(json.dumps(config))
    monkeypatch.setattr(C, "cache_stamp", lambda d: Stamp.load(tmp_path / "other.json"))
    assert C.cache_fingerprint(tmp_path, "train") == train_fp  # same images: trained runs stay valid
    monkeypatch.undo()
    config = json.loads((tmp_path / "cache_config.json").read_text())
    config["version"] = 2
    del config["settings"]["format"]
    (tmp_path / "cache_config.json").write_text(json.dumps(config))
    (tmp_path / "images.bin").rename(tmp_path / "images.npy")
    with pytest.raises(P.PipelineError, match=r"(?s)code version of step prepare: 2 -> 3.*format: \(unset\) -> "):
        P.prepare(demo_data, tmp_path, size=32, jobs=1, chunk=64, quiet=True)
    with pytest.raises(P.PipelineError, match=r"images.npy there is the uncompressed format.*--overwrite"):
        C.load_cache(tmp_path)
    P.prepare(demo_data, tmp_path, size=32, jobs=1, chunk=64, quiet=True, overwrite=True)
    assert not (tmp_path / "images.npy").exists() and C.cache_fingerprint(tmp_path, "train") == train_fp


def test_a_damaged_cache_file_stops_with_its_name(demo_cache, tmp_path):
    shutil.copytree(demo_cache / "cache", tmp_path / "c")
    path = tmp_path / "c" / "images.bin"
    data = path.read_bytes()
    for damaged in (data[:-5], data[:len(data) // 2], b"not a cache at all" * 10):
        path.write_bytes(damaged)
        with pytest.raises(P.PipelineError, match=r"images.bin is not a complete image cache.*--overwrite"):
            C.load_cache(tmp_path / "c")
    offsets = C.load_cache(demo_cache / "cache")[0].offsets
    row = int(np.argmax(np.diff(offsets[:len(offsets) // 2]) > 0))  # a stored (non-empty) row
    bad = bytearray(data)
    bad[offsets[row]:offsets[row + 1]] = b"\xff" * int(offsets[row + 1] - offsets[row])
    path.write_bytes(bytes(bad))
    images, _ = C.load_cache(tmp_path / "c")
    with pytest.raises(P.PipelineError, match=f"row {row}"):
        images[row]


def test_a_changed_file_is_caught(demo_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    P.prepare(data, tmp_path / "c", size=32, jobs=1, chunk=64, quiet=True)
    train_fp, test_fp = (C.cache_fingerprint(tmp_path / "c", s) for s in ("train", "test"))
    f = next((data / "stage_2_test_images").glob("*.dcm"))
    f.write_bytes(f.read_bytes() + b"\0\0")  # same name, other content (another size)
    with pytest.raises(P.PipelineError, match="input test_files"):
        P.prepare(data, tmp_path / "c", size=32, jobs=1, chunk=64, quiet=True)
    P.prepare(data, tmp_path / "c", size=32, jobs=1, chunk=64, quiet=True, overwrite=True)
    # what training depends on did not change, so trained folds stay valid; test predictions are stale
    assert C.cache_fingerprint(tmp_path / "c", "train") == train_fp and C.cache_fingerprint(tmp_path / "c", "test") != test_fp


def test_disk_space_is_checked_before_anything_is_written(demo_data, tmp_path, monkeypatch):
    files = len(P.list_files(demo_data))
    need = P.estimated_bytes(files, 64)
    monkeypatch.setattr(P.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12 - need + 1, need - 1))
    with pytest.raises(P.PipelineError) as e:
        P.prepare(demo_data, tmp_path / "c", size=64, jobs=1, quiet=True)
    assert f"{need / 1e9:,.1f} GB" in str(e.value) and f"{(need - 1) / 1e9:,.1f} GB free" in str(e.value)
    assert not (tmp_path / "c" / "images.partial.bin").exists()


def test_labelled_images_without_files_are_counted(demo_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    gone = sorted((data / "stage_2_train_images").glob("*.dcm"))[:2]
    for f in gone:
        f.unlink()
    s = P.prepare(data, tmp_path / "c", size=32, jobs=1, chunk=64, quiet=True)
    assert s["labelled_missing_files"] == 2 and s["labelled_missing_ids"] == sorted(f.stem for f in gone)


def test_parallel_equals_serial(demo_data, demo_cache, tmp_path):
    P.prepare(demo_data, tmp_path, size=64, jobs=2, chunk=32, quiet=True)
    assert (tmp_path / "images.bin").read_bytes() == (demo_cache / "cache" / "images.bin").read_bytes()


def test_not_a_data_folder(tmp_path):
    with pytest.raises(P.PipelineError, match="no DICOM files"):
        P.prepare(tmp_path, tmp_path / "c", quiet=True)
