import re
import warnings

import numpy as np
import pandas as pd
import pytest

from src.labels import read_labels, to_long
from src.utils import CLASSES, PipelineError


def _write(tmp_path, rows, name="train.csv"):
    p = tmp_path / name
    pd.DataFrame(rows, columns=["ID", "Label"]).to_csv(p, index=False)
    return p


def _image_rows(image, labels):
    return [(f"{image}_{c}", v) for c, v in zip(CLASSES, labels)]


def test_wide_table_in_kaggle_order(tmp_path):
    rows = _image_rows("ID_0a1", [0, 1, 0, 0, 0, 1]) + _image_rows("ID_0b2", [0, 0, 0, 0, 0, 0])
    rows = rows[::-1]  # order of the file must not matter
    wide = read_labels(_write(tmp_path, rows))
    assert list(wide.columns) == CLASSES
    assert wide.loc["ID_0a1"].tolist() == [0, 1, 0, 0, 0, 1]
    assert wide.loc["ID_0b2"].sum() == 0


def test_exact_duplicates_dropped_with_warning(tmp_path):
    rows = _image_rows("ID_0a1", [1, 0, 0, 0, 0, 1])
    rows = rows + rows[:2]
    with pytest.warns(UserWarning, match="dropped 2 exactly duplicated"):
        wide = read_labels(_write(tmp_path, rows))
    assert len(wide) == 1 and wide.loc["ID_0a1", "epidural"] == 1


def test_conflicting_duplicate_names_the_id(tmp_path):
    rows = _image_rows("ID_0a1", [1, 0, 0, 0, 0, 1]) + [("ID_0a1_epidural", 0)]
    p = _write(tmp_path, rows)
    with pytest.raises(PipelineError, match=re.escape(f"{p}: 1 ID(s) appear with different labels, cannot tell which is "
                                                      f"right: ['ID_0a1_epidural']. Remove the wrong rows and rerun.")):
        read_labels(p)


def test_malformed_id_reports_line(tmp_path):
    rows = _image_rows("ID_0a1", [0] * 6) + [("0a1_epidural", 0)]
    p = _write(tmp_path, rows)
    with pytest.raises(PipelineError, match=re.escape(f"{p}: 1 malformed ID(s), expected ID_<hex>_<subtype>; first at "
                                                      f"line(s) [8]: ['0a1_epidural']") + "$"):
        read_labels(p)


def test_unknown_subtype_reports_line(tmp_path):
    rows = [("ID_0a1_epidurall", 0)] + _image_rows("ID_0a1", [0] * 6)
    p = _write(tmp_path, rows)
    with pytest.raises(PipelineError, match=re.escape(f"{p}: unknown subtype(s) ['epidurall'] at line(s) [2]; known: "
                                                      f"{CLASSES}") + "$"):
        read_labels(p)


def test_non_binary_label_rejected(tmp_path):
    rows = _image_rows("ID_0a1", [0, 0, 0, 0, 0, 2])
    p = _write(tmp_path, rows)
    with pytest.raises(PipelineError, match=re.escape(f"{p}: labels must be 0 or 1; bad value(s) at line(s) [7]: ['2']")
                       + "$"):
        read_labels(p)


def test_any_not_or_is_counted(tmp_path):
    rows = _image_rows("ID_0a1", [1, 0, 0, 0, 0, 0]) + _image_rows("ID_0b2", [0, 0, 0, 0, 0, 1]) \
        + _image_rows("ID_0c3", [0, 0, 1, 0, 0, 1])
    p = _write(tmp_path, rows)
    with pytest.warns(UserWarning, match=re.escape(f"{p}: 2 image(s) where 'any' is not the OR of the five subtypes")):
        wide = read_labels(p)
    assert wide.loc[["ID_0a1", "ID_0b2", "ID_0c3"], "any"].tolist() == [0, 1, 1]  # counted, not changed


def test_incomplete_image_rejected(tmp_path):
    rows = _image_rows("ID_0a1", [0] * 6)[:5]
    p = _write(tmp_path, rows)
    with pytest.raises(PipelineError, match=re.escape(f"{p}: every image needs all six subtypes; 1 incomplete image(s): "
                                                      f"['ID_0a1']") + "$"):
        read_labels(p)


def test_long_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    wide = pd.DataFrame(rng.integers(0, 2, (7, 6)), columns=CLASSES,
                        index=[f"ID_{i:03x}" for i in range(7)]).astype(np.uint8)
    long = to_long(wide)
    assert long["ID"].iloc[0] == "ID_000_epidural" and long["ID"].iloc[5] == "ID_000_any"
    p = tmp_path / "x.csv"
    long.to_csv(p, index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = read_labels(p)
    pd.testing.assert_frame_equal(back, wide.rename_axis("ID"), check_dtype=False)


def _write_lines(tmp_path, lines):
    p = tmp_path / "train.csv"
    p.write_text("\n".join(lines) + "\n")
    return p


@pytest.mark.parametrize("bad_row, message", [
    ("0a1_epidural,0", "malformed ID"),
    ("ID_0b2_epidurall,0", "unknown subtype"),
    ("ID_0b2_epidural,7", "0 or 1"),
])
def test_line_numbers_count_blank_lines(tmp_path, bad_row, message):
    lines = ["ID,Label", ""] + [f"{i},{v}" for i, v in _image_rows("ID_0a1", [0] * 6)] + ["", "", bad_row, ""]
    line = lines.index(bad_row) + 1  # the line an editor shows
    with pytest.raises(PipelineError, match=rf"{message}.*line\(s\) \[{line}\]"):
        read_labels(_write_lines(tmp_path, lines))


def test_blank_lines_do_not_change_the_table(tmp_path):
    rows = [f"{i},{v}" for i, v in _image_rows("ID_0a1", [1, 0, 0, 0, 0, 1]) + _image_rows("ID_0b2", [0] * 6)]
    plain = read_labels(_write_lines(tmp_path, ["ID,Label"] + rows))
    spaced = read_labels(_write_lines(tmp_path, ["ID,Label", ""] + rows[:7] + ["", ""] + rows[7:] + ["", ""]))
    pd.testing.assert_frame_equal(spaced, plain)


@pytest.mark.parametrize("content, message", [
    (b"", r"empty file \(0 bytes\)"),
    (b"ID,Label\n", "no label rows"),
    (b"ID,Label\n\n\n", "no label rows"),
    ("ID,Label\nID_0a1_\u00e9pidural,0\n".encode("latin-1"), "not UTF-8"),
    (b"ID,Label\nID_0a1_any,0,1\n", "more fields than the header"),
    (b"ID,Label\nID_0a1_any,0\nID_0a1_epidural,0,1\n", r"cannot be read as CSV \(.*line 3"),
    (b"ID,Label\nNA,NA\n", r"labels must be 0 or 1.*line\(s\) \[2\]"),  # 'NA' is text, not a missing row
])
def test_unreadable_label_files_name_the_file(tmp_path, content, message):
    p = tmp_path / "train.csv"
    p.write_bytes(content)
    with pytest.raises(PipelineError, match=re.escape(str(p)) + f".*{message}"):
        read_labels(p)
