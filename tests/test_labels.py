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
    with pytest.raises(PipelineError, match="ID_0a1_epidural"):
        read_labels(_write(tmp_path, rows))


def test_malformed_id_reports_line(tmp_path):
    rows = _image_rows("ID_0a1", [0] * 6) + [("0a1_epidural", 0)]
    with pytest.raises(PipelineError, match=r"line\(s\) \[8\]"):
        read_labels(_write(tmp_path, rows))


def test_unknown_subtype_reports_line(tmp_path):
    rows = [("ID_0a1_epidurall", 0)] + _image_rows("ID_0a1", [0] * 6)
    with pytest.raises(PipelineError, match=r"epidurall.*line\(s\) \[2\]"):
        read_labels(_write(tmp_path, rows))


def test_non_binary_label_rejected(tmp_path):
    rows = _image_rows("ID_0a1", [0, 0, 0, 0, 0, 2])
    with pytest.raises(PipelineError, match="0 or 1"):
        read_labels(_write(tmp_path, rows))


def test_any_not_or_is_counted(tmp_path):
    rows = _image_rows("ID_0a1", [1, 0, 0, 0, 0, 0]) + _image_rows("ID_0b2", [0, 0, 0, 0, 0, 1]) \
        + _image_rows("ID_0c3", [0, 0, 1, 0, 0, 1])
    with pytest.warns(UserWarning, match="2 image"):
        read_labels(_write(tmp_path, rows))


def test_incomplete_image_rejected(tmp_path):
    rows = _image_rows("ID_0a1", [0] * 6)[:5]
    with pytest.raises(PipelineError, match="ID_0a1"):
        read_labels(_write(tmp_path, rows))


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
