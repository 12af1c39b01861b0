"""read_labels: the three RSNA layouts give one tidy table; every data error names its rows and ids."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from boneage.data.labels import find_image, read_labels
from boneage.errors import BoneAgeInputError


def _csv(tmp_path: Path, text: str, name: str = "labels.csv", encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding=encoding)
    return path


def _error(csv: Path, **kwargs: object) -> str:
    with pytest.raises(BoneAgeInputError) as info:
        read_labels(csv, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert message.startswith(f"{csv}: ")  # source is always the CSV
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------------------------
# layouts


def test_training_layout(tmp_path: Path) -> None:
    csv = _csv(
        tmp_path, "id,boneage,male\n1377,180,False\n1402,24,True\n1404,30.5,false\n1405,1,1\n1406,2,0\n"
    )
    df = read_labels(csv)
    assert list(df.columns) == ["id", "boneage", "male"]
    assert df["id"].tolist() == ["1377", "1402", "1404", "1405", "1406"]
    assert all(isinstance(i, str) for i in df["id"])
    assert df["boneage"].dtype == np.float64
    assert df["boneage"].tolist() == [180.0, 24.0, 30.5, 1.0, 2.0]
    assert df["male"].dtype == bool
    assert df["male"].tolist() == [False, True, False, True, False]
    assert df.index.tolist() == list(range(5))


def test_validation_layout(tmp_path: Path) -> None:
    csv = _csv(tmp_path, "Image ID,male,Bone Age (months)\n1386,False,30\n1392,True,162\n")
    df = read_labels(csv)
    assert list(df.columns) == ["id", "boneage", "male"]
    assert df.to_dict("list") == {"id": ["1386", "1392"], "boneage": [30.0, 162.0], "male": [False, True]}


def test_test_layout_with_ground_truth(tmp_path: Path) -> None:
    csv = _csv(tmp_path, "Case ID,Sex,Ground truth bone age (months)\n4360,M,168.9\n4361,F,169.2\n")
    df = read_labels(csv)
    assert df.to_dict("list") == {"id": ["4360", "4361"], "boneage": [168.9, 169.2], "male": [True, False]}


def test_test_layout_any_bone_age_column(tmp_path: Path) -> None:
    csv = _csv(tmp_path, "Case ID,Sex,Mean Bone Age Reading\n4360,m,100\n")
    assert read_labels(csv)["boneage"].tolist() == [100.0]


def test_test_layout_without_ages(tmp_path: Path) -> None:
    csv = _csv(tmp_path, "Case ID,Sex\n4360,M\n4361,F\n")
    df = read_labels(csv, require_age=False)
    assert list(df.columns) == ["id", "boneage", "male"]
    assert df["boneage"].isna().all() and df["boneage"].dtype == np.float64
    assert df["male"].tolist() == [True, False]
    message = _error(csv)
    assert "no bone-age column" in message and "'Case ID', 'Sex'" in message


def test_header_bom_whitespace_and_case(tmp_path: Path) -> None:
    csv = _csv(tmp_path, " ID , BoneAge , Male \n 1377 , 180 , TRUE \n", encoding="utf-8-sig")
    assert csv.read_bytes().startswith(b"\xef\xbb\xbf")
    df = read_labels(csv)
    assert df.to_dict("list") == {"id": ["1377"], "boneage": [180.0], "male": [True]}


def test_ids_with_suffix_and_extra_columns(tmp_path: Path) -> None:
    csv = _csv(tmp_path, "id,boneage,male,site\n1377.png,180,False,a\n0012.PNG,24,True,b\n")
    df = read_labels(csv)
    assert df["id"].tolist() == ["1377", "0012"]  # leading zeros survive: ids are strings
    assert list(df.columns) == ["id", "boneage", "male"]


def test_missing_ages_allowed_only_without_require_age(tmp_path: Path) -> None:
    csv = _csv(tmp_path, "id,boneage,male\n1,10,True\n2,,False\n")
    df = read_labels(csv, require_age=False)
    assert df["boneage"].iloc[0] == 10.0 and math.isnan(df["boneage"].iloc[1])
    message = _error(csv)
    assert "missing bone age" in message and "row 3 (id 2)" in message


def test_images_dir_adds_absolute_paths(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for name in ("1.png", "2.JPG", "3.jpeg", "4.dcm", "5.txt", "1.jpg"):
        (images / name).write_bytes(b"x")
    csv = _csv(tmp_path, "id,boneage,male\n1,10,True\n2,20,False\n3,30,True\n4,40,False\n")
    df = read_labels(csv, images)
    assert list(df.columns) == ["id", "boneage", "male", "path"]
    names = [Path(p).name for p in df["path"]]
    assert names == ["1.png", "2.JPG", "3.jpeg", "4.dcm"]  # .png preferred over .jpg for id 1
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in df["path"])
    assert all(isinstance(p, str) for p in df["path"])


def test_find_image(tmp_path: Path) -> None:
    (tmp_path / "7.PNG").write_bytes(b"x")
    (tmp_path / "8.dcm").write_bytes(b"x")
    (tmp_path / "9.txt").write_bytes(b"x")
    assert find_image(tmp_path, "7") == tmp_path / "7.PNG"
    assert find_image(tmp_path, "8") == tmp_path / "8.dcm"
    assert find_image(tmp_path, "9") is None
    assert find_image(tmp_path, "10") is None
    assert find_image(tmp_path / "missing", "7") is None


# ----------------------------------------------------------------------------------------------
# errors


def test_missing_file(tmp_path: Path) -> None:
    assert "not found" in _error(tmp_path / "nope.csv")


def test_unreadable_binary(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_bytes(b"\xff\xfe\x00\x81\x9a" * 50)
    message = _error(path)
    assert "CSV" in message


def test_empty_csv(tmp_path: Path) -> None:
    assert "empty CSV" in _error(_csv(tmp_path, ""))
    assert "empty CSV" in _error(_csv(tmp_path, "id,boneage,male\n", name="header_only.csv"))


def test_unknown_layout_lists_columns(tmp_path: Path) -> None:
    message = _error(_csv(tmp_path, "patient,age,gender\n1,10,M\n"))
    assert "unknown CSV layout" in message
    assert "'patient', 'age', 'gender'" in message


def test_missing_columns_named(tmp_path: Path) -> None:
    message = _error(_csv(tmp_path, "id,boneage\n1,10\n"))
    assert "missing column(s) 'male'" in message and "found columns: 'id', 'boneage'" in message
    message = _error(_csv(tmp_path, "id,note\n1,x\n", name="b.csv"))
    assert "'male'" in message and "'boneage'" in message
    message = _error(_csv(tmp_path, "Image ID,male\n1,True\n", name="c.csv"))
    assert "'Bone Age (months)'" in message


def test_duplicate_ids(tmp_path: Path) -> None:
    message = _error(_csv(tmp_path, "id,boneage,male\n1,10,True\n2,20,True\n1,30,False\n2.png,5,True\n"))
    assert "duplicate ids" in message
    assert "1 (rows 2, 4)" in message and "2 (rows 3, 5)" in message


def test_non_numeric_age(tmp_path: Path) -> None:
    message = _error(_csv(tmp_path, "id,boneage,male\n1,10,True\n2,ten,True\n"))
    assert "non-numeric bone age" in message and "row 3 (id 2) = 'ten'" in message
    # require_age=False does not excuse a typo
    assert "non-numeric" in _error(
        _csv(tmp_path, "id,boneage,male\n2,1O,True\n", name="b.csv"), require_age=False
    )


@pytest.mark.parametrize("value", ["-1", "301", "1e9", "inf"])
def test_age_out_of_range(tmp_path: Path, value: str) -> None:
    message = _error(_csv(tmp_path, f"id,boneage,male\n1,10,True\n77,{value},False\n"))
    assert "outside 0-300 months" in message and "row 3 (id 77)" in message


def test_age_bounds_inclusive(tmp_path: Path) -> None:
    df = read_labels(_csv(tmp_path, "id,boneage,male\n1,0,True\n2,300,False\n"))
    assert df["boneage"].tolist() == [0.0, 300.0]


def test_sex_not_recognised_or_missing(tmp_path: Path) -> None:
    message = _error(_csv(tmp_path, "id,boneage,male\n1,10,True\n2,20,maybe\n3,30,\n"))
    assert "sex not recognised" in message
    assert "row 3 (id 2) = 'maybe'" in message and "row 4 (id 3) is empty" in message
    message = _error(_csv(tmp_path, "Case ID,Sex\n1,X\n", name="t.csv"), require_age=False)
    assert "expected M/F" in message and "row 2 (id 1)" in message


def test_missing_id(tmp_path: Path) -> None:
    assert "missing id in 1 row(s): row 3" in _error(_csv(tmp_path, "id,boneage,male\n1,5,True\n,10,True\n"))


def test_spreadsheet_blank_rows_are_dropped_and_rows_still_numbered(tmp_path: Path) -> None:
    csv = _csv(tmp_path, "id,boneage,male\n1,10,True\n,,\n2,20,False\n,,\n")
    assert read_labels(csv)["id"].tolist() == ["1", "2"]
    bad = _csv(tmp_path, "id,boneage,male\n1,10,True\n,,\n2,x,False\n", name="bad.csv")
    assert "row 4 (id 2) = 'x'" in _error(bad)
    assert "empty CSV" in _error(_csv(tmp_path, "id,boneage,male\n,,\n", name="blank.csv"))


def test_missing_images_listed_and_capped(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "0.png").write_bytes(b"x")
    rows = "".join(f"{i},{i + 1},True\n" for i in range(13))
    csv = _csv(tmp_path, "id,boneage,male\n" + rows)
    message = _error(csv, images_dir=images)
    assert "no image for 12 id(s)" in message
    assert "1, 2, 3, 4, 5, 6, 7, 8, 9, 10 and 2 more" in message
    assert "image folder not found" in _error(csv, images_dir=tmp_path / "nowhere")


def test_error_lists_capped_at_ten(tmp_path: Path) -> None:
    rows = "".join(f"{i},-{i + 1},True\n" for i in range(25))
    message = _error(_csv(tmp_path, "id,boneage,male\n" + rows))
    assert "in 25 row(s)" in message and message.endswith("and 15 more")
    assert message.count("(id ") == 10


# ----------------------------------------------------------------------------------------------
# real data


@pytest.mark.integration
def test_real_shared_labels(shared_sample: Path) -> None:
    df = read_labels(shared_sample / "labels.csv", shared_sample / "images")
    assert len(df) == 1001
    assert list(df.columns) == ["id", "boneage", "male", "path"]
    assert df["id"].is_unique and df.index.equals(pd.RangeIndex(1001))
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in df["path"])
    assert Path(df["path"].iloc[0]).stem == df["id"].iloc[0]
    assert df["boneage"].between(12, 228).all()
    assert df["boneage"].min() < 30 and df["boneage"].max() > 200
    assert df["male"].any() and (~df["male"]).any()
    assert 0.3 < df["male"].mean() < 0.7
    row = df.set_index("id").loc["1377"]
    assert row["boneage"] == 180.0 and not row["male"]
