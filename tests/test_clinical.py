"""SD scores against hand-computed values from the shared Brush Foundation table."""

from __future__ import annotations

import json
import math

import pytest

from boneage.clinical import (
    REFERENCE_CITATION,
    Assessment,
    assess,
    format_months,
    normalize_sex,
    parse_age,
    reference_range,
    reference_sd,
    sd_score,
    sd_table,
)
from boneage.errors import BoneAgeInputError

# Rows copied by hand from /work/shared/reference/brush-foundation-bone-age-sd.csv, so a wrong
# transcription into the package data fails here.
# age_years: (male_mean, male_sd, female_mean, female_sd)
ROWS = {
    0.25: (3.01, 0.69, 3.02, 0.72),
    5: (62.43, 8.79, 66.21, 11.65),
    6: (75.46, 9.17, 78.50, 10.23),
    10: (125.68, 9.79, 125.66, 11.73),
    11: (137.32, 10.09, 137.86, 11.94),
    16: (195.32, 12.86, 189.44, 7.31),
    17: (206.21, 13.05, None, None),
}


def test_table_matches_shared_reference() -> None:
    table = sd_table()
    assert len(table) == 24  # 0.25 y to 17 y
    assert list(table.columns[:5]) == [
        "chronological_age_years",
        "male_mean_bone_age_months",
        "male_sd_months",
        "female_mean_bone_age_months",
        "female_sd_months",
    ]
    for age, (m_mean, m_sd, f_mean, f_sd) in ROWS.items():
        row = table[table["chronological_age_years"] == age].iloc[0]
        assert row["male_mean_bone_age_months"] == pytest.approx(m_mean)
        assert row["male_sd_months"] == pytest.approx(m_sd)
        if f_mean is None:
            assert math.isnan(row["female_mean_bone_age_months"]) and math.isnan(row["female_sd_months"])
        else:
            assert row["female_mean_bone_age_months"] == pytest.approx(f_mean)
            assert row["female_sd_months"] == pytest.approx(f_sd)


def test_sd_table_is_a_copy() -> None:
    table = sd_table()
    table.loc[:, "male_sd_months"] = 999.0
    assert reference_sd(120, "male") == pytest.approx((125.68, 9.79))


@pytest.mark.parametrize(
    ("sex", "mean", "sd"),
    [("male", 125.68, 9.79), ("female", 125.66, 11.73)],
)
def test_sd_score_at_tabulated_age(sex: str, mean: float, sd: float) -> None:
    assert reference_sd(120, sex) == pytest.approx((mean, sd))
    # z uses chronological age, not the table mean
    assert sd_score(135.0, 120.0, sex) == pytest.approx((135.0 - 120.0) / sd)
    assert sd_score(100.0, 120.0, sex) == pytest.approx((100.0 - 120.0) / sd)
    assert sd_score(120.0, 120.0, sex) == 0.0


def test_sd_score_interpolated_midpoints() -> None:
    # 10.5 y = 126 months: halfway between the 10 y and 11 y rows
    male_sd = (9.79 + 10.09) / 2  # 9.94
    female_sd = (11.73 + 11.94) / 2  # 11.835
    assert reference_sd(126, "male") == pytest.approx(((125.68 + 137.32) / 2, male_sd))
    assert reference_sd(126, "female") == pytest.approx(((125.66 + 137.86) / 2, female_sd))
    assert sd_score(146.0, 126.0, "male") == pytest.approx(20.0 / 9.94)
    assert sd_score(146.0, 126.0, "female") == pytest.approx(20.0 / 11.835)
    # 5.5 y = 66 months: 5 y and 6 y rows (the table steps by a year from 5 y on)
    assert reference_sd(66, "male")[1] == pytest.approx((8.79 + 9.17) / 2)
    # a quarter of the way from 10 y to 11 y
    assert reference_sd(123, "female")[1] == pytest.approx(11.73 + 0.25 * (11.94 - 11.73))


def test_female_has_no_17_year_row() -> None:
    assert reference_range("female") == (3.0, 192.0)
    assert reference_range("male") == (3.0, 204.0)
    # male interpolates up to 17 y, female clamps at 16 y (7.31) instead of inventing a 17 y value
    assert reference_sd(198, "male")[1] == pytest.approx((12.86 + 13.05) / 2)
    assert reference_sd(198, "female") == pytest.approx((189.44, 7.31))
    assert reference_sd(204, "female") == pytest.approx((189.44, 7.31))
    result = assess(210.0, "female", 198.0)  # beyond the female table: no SD score, one line saying why
    assert result.sd_months is None and result.sd_score is None and result.flag is None
    assert result.difference_months == pytest.approx(12.0)
    assert [w for w in result.warnings if "no SD score" in w] == [
        "no SD score: chronological age 16 y 6 m is outside the Greulich & Pyle reference table for "
        "females (0 y 3 m to 16 y 0 m)"
    ]
    # a male at the same age is inside the table
    assert not any("reference table" in w for w in assess(210.0, "male", 198.0).warnings)


def test_no_sd_score_outside_the_table() -> None:
    """The table's SD is looked up, never invented: outside its ages there is no SD score and no flag (an
    age of 0y0m once gave SD +117 from the 3-month row)."""
    assert reference_sd(0, "male") == pytest.approx((3.01, 0.69))  # the lookup itself clamps
    assert reference_sd(230, "male") == pytest.approx((206.21, 13.05))
    for bone, chron in ((14.0, 1.0), (14.0, 0.0), (220.0, 216.0)):
        result = assess(bone, "male", chron)
        assert result.sd_score is None and result.sd_months is None and result.flag is None
        assert result.chronological_age_months == chron and result.difference_months == bone - chron
        assert sum("no SD score" in w for w in result.warnings) == 1
    # exactly at the ends is inside the table: no warning
    assert not any("reference table" in w for w in assess(20.0, "male", 3.0).warnings)
    assert not any("reference table" in w for w in assess(200.0, "male", 204.0).warnings)


def test_flags_just_beyond_two_sd() -> None:
    sd = 9.79  # male, 10 y
    assert assess(120 + 2.001 * sd, "male", 120).flag == "advanced"
    assert assess(120 - 2.001 * sd, "male", 120).flag == "delayed"
    assert assess(120 + 1.999 * sd, "male", 120).flag == "normal"
    assert assess(120 - 1.999 * sd, "male", 120).flag == "normal"
    assert assess(120, "male").flag is None


def test_assess_fields() -> None:
    result = assess(135.0, "F", 120.0, uncertainty_months=4.5, warnings=["image was rotated"])
    assert isinstance(result, Assessment)
    assert result.sex == "female"
    assert result.difference_months == pytest.approx(15.0)
    assert result.sd_months == pytest.approx(11.73)
    assert result.sd_score == pytest.approx(15.0 / 11.73)
    assert result.flag == "normal"
    assert result.uncertainty_months == 4.5
    assert result.warnings == ["image was rotated"]

    bare = assess(135.0, "male")
    assert bare.chronological_age_months is None
    assert bare.difference_months is None and bare.sd_score is None and bare.sd_months is None
    assert bare.warnings == []


@pytest.mark.parametrize("bone", [11.0, 228.5, 0.0, 240.0])
def test_assess_warns_outside_training_range(bone: float) -> None:
    warnings = assess(bone, "male").warnings
    assert "prediction outside the range the model was trained on (12–228 months)" in warnings


@pytest.mark.parametrize("bone", [12.0, 100.0, 228.0])
def test_assess_no_warning_inside_training_range(bone: float) -> None:
    assert assess(bone, "male").warnings == []


def test_assess_rejects_bad_numbers() -> None:
    with pytest.raises(BoneAgeInputError, match="finite"):
        assess(float("nan"), "male")
    with pytest.raises(BoneAgeInputError, match="out of range"):
        assess(100.0, "male", 300.0)
    with pytest.raises(BoneAgeInputError, match="out of range"):
        assess(100.0, "male", -1.0)
    with pytest.raises(BoneAgeInputError, match="uncertainty"):
        assess(100.0, "male", uncertainty_months=-1.0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("M", "male"),
        ("m", "male"),
        ("Male", "male"),
        (" BOY ", "male"),
        ("F", "female"),
        ("female", "female"),
        ("Girl", "female"),
        ("FEMALE", "female"),
    ],
)
def test_sex_normalisation(text: str, expected: str) -> None:
    assert normalize_sex(text) == expected
    assert assess(100.0, text).sex == expected


@pytest.mark.parametrize("text", ["", "x", "unknown", "males", "w"])
def test_sex_errors(text: str) -> None:
    with pytest.raises(BoneAgeInputError, match="sex must be female or male"):
        assess(100.0, text)
    with pytest.raises(BoneAgeInputError, match="sex must be female or male"):
        reference_sd(100.0, text)


@pytest.mark.parametrize(
    ("text", "months"),
    [
        ("7.5y", 90.0),
        ("7.5 y", 90.0),
        ("7y6m", 90.0),
        ("7 y 6 m", 90.0),
        ("7 years 6 months", 90.0),
        ("7 years", 84.0),
        ("7yrs", 84.0),
        ("90m", 90.0),
        ("90 months", 90.0),
        ("90 mo", 90.0),
        ("7,5y", 90.0),
        ("  10Y3M ", 123.0),
        ("0m", 0.0),
        ("20y", 240.0),
        (90, 90.0),
        (90.5, 90.5),
        (None, None),
        ("", None),
        (float("nan"), None),
    ],
)
def test_parse_age(text: str | float | None, months: float | None) -> None:
    assert parse_age(text) == months


@pytest.mark.parametrize("text", ["7", "7.5", " 90 "])
def test_parse_age_needs_a_unit(text: str) -> None:
    with pytest.raises(BoneAgeInputError, match=r"age needs a unit: 7\.5y or 90m"):
        parse_age(text)


@pytest.mark.parametrize("value", ["241m", "20y1m", "21 years", -1, 240.5])
def test_parse_age_out_of_range(value: str | float) -> None:
    with pytest.raises(BoneAgeInputError, match="age out of range"):
        parse_age(value)


@pytest.mark.parametrize("text", ["-1", "-3", "-1m", "-0.5y", " -2y6m"])
def test_a_negative_age_is_named_as_such(text: str) -> None:
    """`--age -1` once said "age needs a unit": the problem is the sign, whatever the unit."""
    with pytest.raises(BoneAgeInputError, match="age must not be negative"):
        parse_age(text)


@pytest.mark.parametrize("text", ["seven years", "7 weeks", "7y 6", "y", "7y14m", "7d"])
def test_parse_age_unreadable(text: str) -> None:
    with pytest.raises(BoneAgeInputError):
        parse_age(text)


def test_parse_age_rejects_bool() -> None:
    with pytest.raises(BoneAgeInputError):
        parse_age(True)


@pytest.mark.parametrize(
    ("months", "text"),
    [
        (123.0, "10 y 3 m"),
        (123.4, "10 y 3 m"),
        (123.6, "10 y 4 m"),
        (0.0, "0 y 0 m"),
        (11.5, "1 y 0 m"),
        (120.0, "10 y 0 m"),
        (-14.0, "-1 y 2 m"),
        (-0.2, "0 y 0 m"),
    ],
)
def test_format_months(months: float, text: str) -> None:
    assert format_months(months) == text


def test_to_dict_is_json_safe() -> None:
    result = assess(123.4, "girl", 120.0, uncertainty_months=3.2, warnings=["note"])
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["sex"] == "female"
    assert data["bone_age_months"] == pytest.approx(123.4)
    assert data["bone_age_years"] == pytest.approx(10.28)
    assert data["bone_age_text"] == "10 y 3 m"
    assert data["chronological_age_text"] == "10 y 0 m"
    assert data["sd_score"] == pytest.approx(3.4 / 11.73)
    assert data["flag"] == "normal"
    assert data["uncertainty_months"] == pytest.approx(3.2)
    assert data["warnings"] == ["note"]
    assert data["reference"] == REFERENCE_CITATION

    bare = json.loads(json.dumps(assess(50.0, "M").to_dict(), allow_nan=False))
    assert bare["chronological_age_text"] is None
    assert bare["flag"] is None


def test_citation() -> None:
    assert "Greulich WW, Pyle SI" in REFERENCE_CITATION
    assert "1959" in REFERENCE_CITATION
    assert "Brush Foundation" in REFERENCE_CITATION
    assert "not read off the atlas itself" in REFERENCE_CITATION
