import re
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from src import dicom as D

from .conftest import CQ500, RSNA_SAMPLE


def write_ds(path, raw, *, bits, rep, intercept, slope=1.0, implicit=True, wc="40", ww="80", uid="ID_44cfc8e964",
             pixel_data=True):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.SOPInstanceUID = uid
        ds.SeriesInstanceUID = uid
    ds.Modality = "CT"
    ds.Rows, ds.Columns = raw.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, rep
    ds.RescaleIntercept, ds.RescaleSlope = intercept, slope
    ds.WindowCenter, ds.WindowWidth = wc, ww
    ds.ImagePositionPatient = [0, 0, 12.5]
    if pixel_data:
        ds.PixelData = raw.astype(np.int16 if rep else np.uint16).tobytes()
    ds.save_as(path, implicit_vr=implicit, little_endian=True, enforce_file_format=True)
    return path


def hu_of(path):
    ds = D.read_dicom(path)
    return D.to_hu(D.pixels(ds), D.rescale_params(ds))


def test_hu_12bit_unsigned(tmp_path):
    raw = np.array([[0, 1024], [1064, 4095]], np.uint16)  # hand-computed: raw - 1024
    hu = hu_of(write_ds(tmp_path / "a.dcm", raw, bits=12, rep=0, intercept=-1024))
    assert hu.tolist() == [[-1024, 0], [40, 3071]]


def test_hu_16bit_signed_explicit(tmp_path):
    raw = np.array([[-2000, 0], [1064, 2600]], np.int16)  # -2000 -> -3024: air outside the scan circle
    hu = hu_of(write_ds(tmp_path / "a.dcm", raw, bits=16, rep=1, intercept=-1024, implicit=False))
    assert hu.tolist() == [[-3024, -1024], [40, 1576]]


def test_hu_slope(tmp_path):
    raw = np.array([[100, 200]], np.uint16)
    hu = hu_of(write_ds(tmp_path / "a.dcm", raw, bits=16, rep=0, intercept=-1000, slope=2.5))
    assert hu.tolist() == [[-750, -500]]


def test_hu_intercept_bug(tmp_path):
    # BitsStored 12, unsigned, intercept 1 (> -100): add 1000, wrap at 4096, intercept -1000
    raw = np.array([[40, 3096], [1500, 3000]], np.uint16)
    hu = hu_of(write_ds(tmp_path / "a.dcm", raw, bits=12, rep=0, intercept=1))
    # 40 -> 1040 -> 40; 3096 -> 4096 -> 0 -> -1000; 1500 -> 2500 -> 1500; 3000 -> 4000 -> 3000
    assert hu.tolist() == [[40, -1000], [1500, 3000]]
    ds = D.read_dicom(tmp_path / "a.dcm")
    assert D.rescale_params(ds).fix_12bit


def test_no_fix_when_intercept_normal(tmp_path):
    raw = np.array([[3096, 0]], np.uint16)  # two pixels: a one-pixel image is flat, and refused as such
    assert hu_of(write_ds(tmp_path / "a.dcm", raw, bits=12, rep=0, intercept=-1024)).tolist() == [[2072, -1024]]


def test_window_scaling_hand_values():
    hu = np.array([-100, 0, 40, 80, 81, 1000], np.float32)
    # brain window 40/80 spans 0..80 HU: 255/80 per HU
    assert D.window(hu, 40, 80).tolist() == [0, 0, 128, 255, 255, 255]
    assert D.window(np.array([20.0]), 40, 80).item() == round(20 * 255 / 80)
    # bone 600/2800 spans -800..2000
    assert D.window(np.array([-800.0, 600.0, 2000.0]), 600, 2800).tolist() == [0, 128, 255]


def test_fast_path_matches_reference(tmp_path):
    rng = np.random.default_rng(0)
    for i, (bits, rep, icpt) in enumerate([(12, 0, -1024), (16, 1, -1024), (12, 0, 1)]):
        lo, hi = ((0, 4096) if rep == 0 else (-2000, 3000))
        raw = rng.integers(lo, hi, (40, 40))
        p = write_ds(tmp_path / f"{i}.dcm", raw, bits=bits, rep=rep, intercept=icpt, implicit=rep == 0)
        ds = D.read_dicom(p)
        ref = D.hu_to_image(D.to_hu(D.pixels(ds), D.rescale_params(ds)), size=None)
        assert np.array_equal(D.dicom_to_image(ds, size=None), ref)
        small_ref = D.hu_to_image(D.to_hu(D.pixels(ds), D.rescale_params(ds)), size=20)
        # resizing stored values rounds to whole units: at most one grey level apart
        assert np.abs(D.dicom_to_image(ds, size=20).astype(int) - small_ref).max() <= 2


def test_file_window_multivalued(tmp_path):
    p = write_ds(tmp_path / "a.dcm", np.array([[1024, 1064]], np.uint16), bits=12, rep=0, intercept=-1024,
                 wc=["40", "300"], ww=["80", "1500"])
    ds = D.read_dicom(p)
    assert D.resolve_windows(ds, (None, D.BONE)) == ((40.0, 80.0), (600.0, 2800.0))
    img = D.dicom_to_image(ds, windows=(None, D.SUBDURAL, D.BONE), size=None)
    assert img[0, :, 0].tolist() == [0, 128]


def test_kaggle_uid_warning_silenced_but_others_not(tmp_path):
    p = write_ds(tmp_path / "a.dcm", np.arange(16).reshape(4, 4) * 100, bits=12, rep=0, intercept=-1024,
                 uid="ID_44cfc8e964")
    q = write_ds(tmp_path / "b.dcm", np.zeros((4, 4), np.uint16), bits=12, rep=0, intercept=-1024, uid="not a uid!")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", message=D._KAGGLE_UID_WARNING, category=UserWarning)  # as the module sets
        D.header_fields(D.read_dicom(p))
        D.dicom_to_image(D.read_dicom(p), size=None)
        assert rec == []
        D.header_fields(D.read_dicom(q))
        assert any("not a uid!" in str(w.message) for w in rec)


def test_truncated_file_is_a_clear_error(tmp_path):
    p = write_ds(tmp_path / "a.dcm", np.zeros((64, 64), np.uint16), bits=12, rep=0, intercept=-1024)
    p.write_bytes(p.read_bytes()[:-3000])
    with pytest.raises(D.DicomError, match=re.escape(
            "pixel data too short (truncated file?): 5192 bytes, but Rows x Columns x BitsAllocated/8 = 64 x 64 x 16/8 = "
            "8192; the file or its Rows/Columns/BitsAllocated are wrong") + "$"):
        D.dicom_to_image(D.read_dicom(p))
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00" * 10)
    with pytest.raises(D.DicomError, match="unreadable DICOM"):
        D.read_dicom(junk)


def test_missing_pixel_data_and_tags(tmp_path):
    p = write_ds(tmp_path / "a.dcm", np.zeros((4, 4), np.uint16), bits=12, rep=0, intercept=-1024, pixel_data=False)
    with pytest.raises(D.DicomError, match="^no pixel data$"):
        D.dicom_to_image(D.read_dicom(p))
    ds = D.read_dicom(write_ds(tmp_path / "b.dcm", np.zeros((4, 4), np.uint16), bits=12, rep=0, intercept=-1024))
    del ds.RescaleIntercept
    with pytest.raises(D.DicomError, match=re.escape("missing tag(s) ['RescaleIntercept']: cannot compute Hounsfield "
                                                     "units") + "$"):
        D.dicom_to_image(ds)


def test_rgb_jpeg_lossless_rejected_as_not_ct():
    ds = D.read_dicom(get_testdata_file("SC_rgb_jpeg_gdcm.dcm"))  # bundled offline: JPEG Lossless, RGB
    assert str(ds.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.70"
    with pytest.raises(D.DicomError, match="not a grayscale"):
        D.pixels(ds)


def test_rle_decodes_like_uncompressed():
    rle = D.read_dicom(get_testdata_file("MR_small_RLE.dcm"))
    plain = D.read_dicom(get_testdata_file("MR_small.dcm"))
    assert np.array_equal(D.pixels(rle), plain.pixel_array)


def test_jpeg2000_ct_decodes():
    ds = D.read_dicom(get_testdata_file("693_J2KI.dcm"))  # bundled: a CT slice in JPEG 2000
    hu = D.to_hu(D.pixels(ds), D.rescale_params(ds))
    ref = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)  # pydicom's own decoder
    assert hu.shape == (512, 512) and np.array_equal(hu, ref.astype(np.float32))
    assert np.array_equal(D.dicom_to_image(ds, size=None), D.hu_to_image(hu))


@pytest.mark.skipif(not CQ500.exists(), reason="../shared/ct_other not present")
def test_real_jpeg_lossless_head_ct():
    files = sorted(CQ500.glob("*.dcm"))
    ds = D.read_dicom(files[10])
    assert str(ds.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.70"
    hu = D.to_hu(D.pixels(ds), D.rescale_params(ds))
    ref = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)  # pydicom's own decoder
    assert np.array_equal(hu, ref.astype(np.float32))
    centre = hu[206:306, 206:306]
    assert -30 < np.median(centre) < 80          # brain tissue in the middle of the head
    assert np.median(hu[:20, :20]) < -900         # air (or padding) in the corner


@pytest.mark.skipif(not RSNA_SAMPLE.exists(), reason="../shared/rsna_sample not present")
def test_native_reader_equals_pydicom_on_real_files():
    for p in sorted((RSNA_SAMPLE / "stage_2_train_images").glob("*.dcm"))[::10]:
        ds = D.read_dicom(p)
        a = D.pixels(ds)
        b = pydicom.dcmread(p).pixel_array
        assert a.dtype == b.dtype and np.array_equal(a, b), p


def test_z_fallbacks(tmp_path):
    ds = D.read_dicom(write_ds(tmp_path / "a.dcm", np.zeros((4, 4), np.uint16), bits=12, rep=0, intercept=-1024))
    assert D.slice_z(ds) == (12.5, "ImagePositionPatient[2]")  # no orientation: the patient's z
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    assert D.slice_z(ds) == (12.5, "ImagePositionPatient")     # axial: along the normal (0, 0, 1) is z
    ds.ImagePositionPatient = [10, 20, 30]
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]             # sagittal: the cross product is -x, made +x
    assert D.slice_z(ds) == (10.0, "ImagePositionPatient")
    ds.ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]             # feet first: the cross product points down, made up
    assert D.slice_z(ds) == (30.0, "ImagePositionPatient")
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0, 0]         # not six numbers: ignored
    assert D.slice_z(ds) == (30.0, "ImagePositionPatient[2]")
    del ds.ImagePositionPatient
    ds.SliceLocation = "7.5"
    assert D.slice_z(ds) == (7.5, "SliceLocation")
    del ds.SliceLocation
    ds.InstanceNumber = 3
    assert D.slice_z(ds) == (3.0, "InstanceNumber")


def phantom(n, signed=True):
    """Stored values (intercept -1024) of a head-like slice: brain at 40 HU in a 1000 HU skull, air, and
    outside the scan circle -3024 HU padding (signed files) or raw 0 = -1024 HU (12-bit unsigned files)."""
    yy, xx = np.mgrid[:n, :n]
    r = np.hypot(yy - (n - 1) / 2, xx - (n - 1) / 2) / (n / 2)
    return np.select([r < 0.7, r < 0.8, r <= 1], [40, 1000, -1000], -3024 if signed else -1024) + 1024


def write_phantom(path, n, signed=True):
    return write_ds(path, phantom(n, signed), bits=16 if signed else 12, rep=int(signed), intercept=-1024,
                    implicit=not signed)


@pytest.mark.parametrize("n", [64, 1024])
@pytest.mark.parametrize("signed", [True, False])
def test_consistent_small_and_large_images_decode(tmp_path, n, signed):
    ds = D.read_dicom(write_phantom(tmp_path / "a.dcm", n, signed))
    img = D.dicom_to_image(ds, size=256)
    assert img.shape == (256, 256, 3)
    # 40 HU: (40-0)*255/80 = 127.5, (40+20)*255/200 = 76.5, (40+800)*255/2800 = 76.5, rounded half to even
    assert img[128, 128].tolist() == [128, 76, 76]
    ref = D.hu_to_image(D.to_hu(D.pixels(ds), D.rescale_params(ds)), size=256)
    assert np.abs(img.astype(int) - ref).max() <= 2


def test_odd_length_pixel_data_may_carry_one_padding_byte(tmp_path):
    ds = D.read_dicom(write_ds(tmp_path / "a.dcm", np.zeros((5, 5)), bits=16, rep=0, intercept=-1024))
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = (np.arange(25, dtype=np.uint8) * 10).tobytes()  # 25 bytes: written with one padding byte
    ds.save_as(tmp_path / "b.dcm")
    ds = D.read_dicom(tmp_path / "b.dcm")
    assert len(ds.PixelData) == 26
    assert D.pixels(ds).ravel().tolist() == list(range(0, 250, 10))
    ds.PixelData = bytes(28)
    with pytest.raises(D.DicomError, match="too long: 28 bytes.*= 25"):
        D.pixels(ds)


def test_first_value_accepts_numbers_strings_and_multivalues_only_finite():
    assert D.first_value(pydicom.multival.MultiValue(float, ["2.5", "7"]), "X") == 2.5
    assert D.first_value(" -1024 ", "X") == -1024.0
    for v, msg in [("abc", "X is 'abc', not a finite"), (float("nan"), "X is 'nan', not a finite"),
                   (["inf", "1"], "X is 'inf', not a finite"), ([], "X is an empty")]:
        with pytest.raises(D.DicomError, match=msg):
            D.first_value(v, "X")


def test_z_skips_fields_that_are_not_numbers(tmp_path):
    ds = D.read_dicom(write_ds(tmp_path / "a.dcm", np.zeros((4, 4), np.uint16), bits=12, rep=0, intercept=-1024))
    ds["ImagePositionPatient"] = pydicom.DataElement(0x00200032, "LO", "a\\b\\c")
    ds.SliceLocation = "7.5"
    assert D.slice_z(ds) == (7.5, "SliceLocation")
    del ds.SliceLocation
    assert D.slice_z(ds)[1] == "missing"


@pytest.mark.parametrize("name,want", [("ID_44cfc8e964.dcm", "ID_44cfc8e964"), ("stage_2_test_images/ID_0a1b.dcm", "ID_0a1b"),
                                       ("ID_bomb000001.dcm", "ID_bomb000001"), ("ID_44cfc8e964_copy.DCM", "ID_44cfc8e964_copy"),
                                       ("series/1.2.840.113619.2.55.3.4.15", "1.2.840.113619.2.55.3.4.15"),
                                       ("IM0001", "IM0001"), ("slice.ima", "slice")])
def test_an_image_id_is_the_whole_stem(name, want):
    """`ID_<hex>` is matched only as a whole stem: a prefix match made `ID_bomb000001.dcm` image `ID_b`."""
    assert D.image_id_from_path(name) == want


def test_names_that_share_an_id_prefix_do_not_collide(tmp_path):
    """Two files `ID_bomb000001.dcm` and `ID_bomb000002.dcm` (a user's names) are two images in the cache build."""
    from src.prepare import list_files
    raw = np.full((16, 16), 1000, np.uint16)
    for n in ("ID_bomb000001", "ID_bomb000002"):
        (tmp_path / "stage_2_test_images").mkdir(exist_ok=True)
        write_ds(tmp_path / "stage_2_test_images" / f"{n}.dcm", raw, bits=16, rep=0, intercept=-1024)
    assert sorted(list_files(tmp_path)["ID"]) == ["ID_bomb000001", "ID_bomb000002"]


def test_first_value_names_the_field_and_shows_forty_characters():
    with pytest.raises(D.DicomError, match=re.escape("value is 'abc', not a finite number: fix the header or leave the "
                                                     "file out") + "$"):
        D.first_value("abc")
    long = "x" * 39 + "yz"  # 41 characters: the message shows the first 40
    with pytest.raises(D.DicomError, match=re.escape(f"W is '{'x' * 39}y', not a finite number")):
        D.first_value(long, "W")


def header(**tags):
    """A consistent 4 x 4 16-bit header (read from a written file), with tags set or, when None, deleted."""
    ds = pydicom.Dataset()
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation = 4, 4, 16, 12, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    return with_tags(ds, tags)


def with_tags(ds, tags: dict):
    """ds with each tag set, or deleted where its value is None."""
    for k, v in tags.items():
        if v is None:
            delattr(ds, k)
        else:
            setattr(ds, k, v)
    return ds


@pytest.mark.parametrize("tags, message", [
    ({"Rows": None}, "missing tag Rows: cannot interpret the pixel data"),
    ({"Columns": ""}, "missing tag Columns: cannot interpret the pixel data"),  # present, but empty
    ({"PixelRepresentation": None}, "missing tag PixelRepresentation: cannot interpret the pixel data"),
    ({"SamplesPerPixel": 3}, "not a grayscale image (SamplesPerPixel=3)"),
    ({"NumberOfFrames": 2}, "multi-frame image (2 frames): export single slices"),
    ({"BitsAllocated": 12}, "BitsAllocated 12: not 8, 16 or 32"),
    ({"Rows": 2049}, "image of 2049 x 4 pixels: not a CT matrix (at most 2048 x 2048); refused from its header, "
                     "before decoding"),
    ({"Columns": 0}, "image of 4 x 0 pixels: not a CT matrix"),
    ({"Rows": 2048, "Columns": 2048, "BitsAllocated": 32, "NumberOfFrames": 1},
     None),  # 16 MiB decoded: the bound itself is allowed (and the largest a header that passes the rest can declare)
])
def test_check_header_refuses_each_declared_size_with_its_reason(tags, message):
    ds = header(**tags)
    if message is None:
        assert D.check_header(ds) == (2048, 2048, 32)
        return
    with pytest.raises(D.DicomError, match="^" + re.escape(message)):
        D.check_header(ds)


def test_check_header_takes_absent_or_empty_frames_and_samples_as_one():
    assert D.check_header(header()) == (4, 4, 16)
    assert D.check_header(header(NumberOfFrames="", SamplesPerPixel="")) == (4, 4, 16)
    assert D.check_header(header(NumberOfFrames=1, SamplesPerPixel=1)) == (4, 4, 16)


@pytest.mark.parametrize("intercept, fix", [(-100.0, False), (-99.5, True), (0.0, True), (-1024.0, False)])
def test_the_12_bit_intercept_fix_applies_above_minus_100(intercept, fix):
    r = D.rescale_params(header(RescaleIntercept=intercept))
    assert (r.fix_12bit, r.intercept) == (fix, -1000.0 if fix else intercept)
    assert D.rescale_params(header(RescaleIntercept=intercept, BitsStored=16)).fix_12bit is False
    assert D.rescale_params(header(RescaleIntercept=intercept, PixelRepresentation=1)).fix_12bit is False


def test_rescale_tags_present_but_empty_are_missing():
    with pytest.raises(D.DicomError, match=re.escape("missing tag(s) ['RescaleSlope']: cannot compute Hounsfield units")):
        D.rescale_params(header(RescaleSlope=""))


def hu_image(*parts):
    """A 100 x 100 image (slope 1, intercept 0: stored values are HU) of (count, value) parts, shuffled."""
    px = np.concatenate([np.full(n, v, np.int16) for n, v in parts])
    assert px.size == 10000
    return np.random.default_rng(0).permutation(px).reshape(100, 100)


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("parts, message", [
    # in range means [-1100, 4000] HU, bounds included; exactly half in range is enough
    (((2500, -1100), (2500, 4000), (5000, -3024)), None),
    (((2499, -1100), (2500, 4000), (5001, -3024)), "implausible CT values: 50% of pixels in [-1100, 4000] HU"),
    (((2501, -1101), (2500, 4001), (4999, 0)), "implausible CT values: 50% of pixels"),  # 49.99%: just outside
    # the spread is from the 1st to the 99th percentile (sorted values 100 and 9899 of 10,000): 20 HU is enough
    (((100, -20), (9800, 0), (100, 20)), "flat image: 1st to 99th percentile span 0 HU"),
    (((200, -10), (9600, 0), (200, 10)), None),
])
def test_plausibility_bounds(parts, message):
    r = D.Rescale(1.0, 0.0, False)
    px = hu_image(*parts)
    if message is None:
        assert D.check_ct_values(px, r) is None
    else:
        with pytest.raises(D.DicomError, match="^" + re.escape(message)):
            D.check_ct_values(px, r)


def no_decoder(monkeypatch):
    """pydicom's pixel_array made to fail: what still decodes was read by the module's own native path."""
    def fail(self):
        raise AssertionError("pydicom's decoder was used")
    monkeypatch.setattr(pydicom.Dataset, "pixel_array", property(fail))


@pytest.mark.parametrize("implicit", [True, False])
@pytest.mark.parametrize("bits, rep, raw", [
    (12, 0, [[5, 4095], [1 << 12 | 7, 0xF000 | 100]]),  # bits above BitsStored (overlays, junk) are not the value
    (16, 0, [[0, 65535], [1 << 12 | 7, 40000]]),
    (16, 1, [[-32768, 32767], [-1, 0]]),
])
def test_uncompressed_16_bit_pixels_are_read_without_pydicoms_decoder(tmp_path, monkeypatch, implicit, bits, rep, raw):
    """The fast path (microseconds, not pydicom's ~3 ms) for native little-endian 16-bit data, equal to pydicom's
    array; 12-bit signed data needs sign extension and goes to pydicom."""
    p = write_ds(tmp_path / "a.dcm", np.array(raw), bits=bits, rep=rep, intercept=-1024, implicit=implicit)
    want = D.read_dicom(p).pixel_array
    no_decoder(monkeypatch)
    got = D.pixels(D.read_dicom(p))
    assert got.dtype == want.dtype and np.array_equal(got, want), (got, want)
    signed12 = write_ds(tmp_path / "s.dcm", np.array([[0x0FFB, 5], [0x0800, 0x07FF]], np.uint16).view(np.int16),
                        bits=12, rep=1, intercept=-1024, implicit=implicit)
    with pytest.raises(AssertionError, match="pydicom's decoder was used"):
        D.pixels(D.read_dicom(signed12))
    monkeypatch.undo()
    assert D.pixels(D.read_dicom(signed12)).tolist() == [[-5, 5], [-2048, 2047]]  # sign-extended from 12 bits


def test_size_tags_that_are_not_numbers_and_a_one_pixel_wide_image():
    ds = header()
    ds.add_new(0x00280010, "LO", "abc")  # Rows written as text
    with pytest.raises(D.DicomError, match=r"^image size tags are not numbers \(invalid literal for int\(\)"):
        D.check_header(ds)
    assert D.check_header(header(Columns=1, Rows=1)) == (1, 1, 16)


def small_file(tmp_path, **tags):
    """A 2 x 2 16-bit file with plausible values, tags set on its dataset (None: deleted)."""
    raw = np.array([[0, 1000], [1040, 2000]])
    return with_tags(D.read_dicom(write_ds(tmp_path / "s.dcm", raw, bits=16, rep=0, intercept=-1024)), tags)


@pytest.mark.parametrize("tags, message", [
    ({"SamplesPerPixel": 3}, "not a grayscale image (SamplesPerPixel=3, MONOCHROME2)"),
    ({"PhotometricInterpretation": "RGB"}, "not a grayscale image (SamplesPerPixel=1, RGB)"),
    ({"PhotometricInterpretation": "PALETTE COLOR"}, "not a grayscale image (SamplesPerPixel=1, PALETTE COLOR)"),
    ({"PixelData": bytes(10)}, "pixel data too long: 10 bytes, but Rows x Columns x BitsAllocated/8 = 2 x 2 x 16/8 = 8"),
    ({"PixelData": bytes(6)}, "pixel data too short (truncated file?): 6 bytes"),
])
def test_pixels_refuses_what_is_not_one_grayscale_image_of_its_size(tmp_path, tags, message):
    with pytest.raises(D.DicomError, match="^" + re.escape(message)):
        D.pixels(small_file(tmp_path, **tags))


@pytest.mark.parametrize("tags", [{}, {"SamplesPerPixel": None, "PhotometricInterpretation": None},
                                  {"SamplesPerPixel": ""}, {"PhotometricInterpretation": "MONOCHROME1"}])
def test_pixels_takes_absent_samples_and_photometric_as_grayscale(tmp_path, tags):
    assert D.pixels(small_file(tmp_path, **tags)).tolist() == [[0, 1000], [1040, 2000]]


def test_only_odd_lengths_take_a_padding_byte(tmp_path):
    ds = D.read_dicom(write_ds(tmp_path / "a.dcm", np.zeros((3, 9)), bits=16, rep=0, intercept=-1024))
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = bytes(28)  # 27 pixels and one padding byte
    assert D.pixels(ds).shape == (3, 9)
    ds.PixelData = bytes(29)
    with pytest.raises(D.DicomError, match="^pixel data too long: 29 bytes"):
        D.pixels(ds)


def test_read_dicom_says_why_a_file_is_unreadable(tmp_path):
    import os
    missing = tmp_path / ("x" * 150 + ".dcm")  # a long name: the reason keeps the first 120 characters of the error
    try:
        os.stat(missing)
    except OSError as e:
        want = f"unreadable DICOM (FileNotFoundError: {str(e)[:120]})"
    with pytest.raises(D.DicomError) as got:
        D.read_dicom(missing)
    assert str(got.value) == want and len(str(got.value)) < len(str(missing))
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00" * 10)
    try:
        pydicom.dcmread(junk, defer_size=D.DEFER_BYTES)
    except Exception as e:  # what pydicom itself says of the file
        want = f"unreadable DICOM ({type(e).__name__}: {str(e)[:120]})"
        assert len(str(e)) > 120
    with pytest.raises(D.DicomError) as got:
        D.read_dicom(junk)
    assert str(got.value) == want


def test_read_dicom_reads_a_file_of_the_size_bound_and_can_stop_before_pixels(tmp_path):
    at_bound = tmp_path / "bound.dcm"
    with open(at_bound, "wb") as f:
        f.truncate(D.MAX_FILE_BYTES)  # sparse: exactly the bound is read (and is no DICOM)
    with pytest.raises(D.DicomError, match=r"^unreadable DICOM \("):
        D.read_dicom(at_bound)
    p = write_ds(tmp_path / "a.dcm", np.zeros((4, 4)), bits=16, rep=0, intercept=-1024)
    assert "PixelData" in D.read_dicom(p) and "PixelData" not in D.read_dicom(p, stop_before_pixels=True)
