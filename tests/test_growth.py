"""Issue #45 maths: Bayley-Pinneau against the cells Bayley & Pinneau printed, Tanner target height, the
follow-up across visits, the growth export, and a site calibration fitted on real radiographs."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from conftest import shifted_readings

from boneage.errors import BoneAgeInputError
from boneage.growth import (
    EXPORT_SCHEMA_VERSION,
    MIN_CASES_PER_SEX,
    Calibration,
    GrowthExport,
    MaturityColumn,
    Visit,
    bayley_pinneau_column,
    bayley_pinneau_table,
    centile_from_sds,
    check_calibration_counts,
    fit_calibration,
    follow_up,
    growth_workup,
    percent_of_mature_height,
    predict_adult_height,
    read_history,
    target_height,
)

INCH = 2.54

# Published worked examples: cells of the printed tables (Bayley & Pinneau 1952, as transcribed whole by
# rcpch/growth-references). Each cell is the authors' own estimated mature height (inches) for a child of the
# row's current height (inches) at the column's skeletal age. One girl and one boy per column; the table
# whose cell it is. In T1's IIIB and IIID the row labels are printed one row off (labels 58 and 56 hold the
# cells of current heights 55 and 55): the cells are used with the heights their values imply.
WORKED_EXAMPLES = [
    # table, sex, column, current height (in), skeletal age (months), printed mature height (in)
    ("IIA", "male", "average", 50, 120, 63.8),
    ("IIA", "male", "average", 60, 120, 76.5),
    ("IIB", "male", "average", 60, 180, 62.0),
    ("IIC", "male", "accelerated", 50, 108, 69.4),
    ("IID", "male", "accelerated", 60, 156, 70.6),
    ("IIE", "male", "retarded", 50, 120, 61.6),
    ("IIIA", "female", "average", 50, 120, 58.0),
    ("IIIB", "female", "average", 55, 156, 57.4),
    ("IIIC", "female", "accelerated", 50, 120, 60.4),
    ("IIID", "female", "accelerated", 55, 156, 58.2),
    ("IIIE", "female", "retarded", 50, 120, 57.2),
    ("IIIF", "female", "retarded", 55, 156, 57.1),
]
# Chronological age that makes bone age minus chronological age pick each column.
AGE_SHIFT = {"average": 0.0, "accelerated": -18.0, "retarded": +18.0}


@pytest.mark.parametrize(("table", "sex", "column", "height_in", "sa", "mature_in"), WORKED_EXAMPLES)
def test_bayley_pinneau_reproduces_the_printed_cells(
    table: str, sex: str, column: str, height_in: float, sa: float, mature_in: float
) -> None:
    pct = percent_of_mature_height(sex, sa, column)
    assert pct is not None
    assert round(height_in / pct * 100.0, 1) == pytest.approx(mature_in)  # the authors rounded to 0.1 in
    result = predict_adult_height(height_in * INCH, sex, sa, sa + AGE_SHIFT[column])
    assert result.bayley_pinneau_column == MaturityColumn(column)
    assert table in result.bayley_pinneau_tables
    assert result.predicted_adult_height_cm == pytest.approx(mature_in * INCH, abs=0.05 * INCH + 0.05)
    assert result.not_available is None


def test_cross_checked_cells_hold_the_agreed_values() -> None:
    """The six cells where the RCPCH percent row differed from the two other transcriptions (see the CSV
    header): the values the printed table bodies support."""
    assert percent_of_mature_height("male", 138, "accelerated") == pytest.approx(78.6)  # IIC 11-6
    assert percent_of_mature_height("male", 204, "accelerated") == pytest.approx(99.0)  # IID 17-0
    assert percent_of_mature_height("female", 210, "average") == pytest.approx(99.95)  # IIIB 17-6
    assert percent_of_mature_height("female", 135, "accelerated") == pytest.approx(88.7)  # IIIC 11-3
    assert percent_of_mature_height("female", 162, "accelerated") == pytest.approx(96.3)  # IIID 13-6
    assert percent_of_mature_height("female", 210, "accelerated") == pytest.approx(99.95)  # IIID 17-6
    girls = bayley_pinneau_table("female", "average")
    assert {82, 94, 106} <= set(girls["skeletal_age_months"])  # 6-10, 7-10, 8-10: the G&P female standards


@pytest.mark.parametrize("sex", ["female", "male"])
@pytest.mark.parametrize("column", list(MaturityColumn))
def test_tables_rise_with_bone_age_and_end_where_the_paper_does(sex: str, column: MaturityColumn) -> None:
    table = bayley_pinneau_table(sex, column)
    assert np.all(np.diff(table["skeletal_age_months"]) > 0)
    assert np.all(np.diff(table["percent"]) >= 0) and table["percent"].between(60, 100).all()
    ranges = {
        ("female", "average"): (72, 216),
        ("female", "accelerated"): (84, 210),
        ("female", "retarded"): (72, 204),
        ("male", "average"): (84, 222),
        ("male", "accelerated"): (84, 204),
        ("male", "retarded"): (72, 156),  # Table IIE; no verified continuation (the documented gap)
    }
    months = table["skeletal_age_months"]
    assert (months.min(), months.max()) == ranges[(sex, column.value)]


def test_column_is_chosen_by_one_year_of_bone_age_minus_chronological_age() -> None:
    assert bayley_pinneau_column(132, 120) is MaturityColumn.ACCELERATED
    assert bayley_pinneau_column(131.9, 120) is MaturityColumn.AVERAGE
    assert bayley_pinneau_column(108.1, 120) is MaturityColumn.AVERAGE
    assert bayley_pinneau_column(108, 120) is MaturityColumn.RETARDED


def test_between_tabulated_ages_the_percent_is_interpolated() -> None:
    assert percent_of_mature_height("female", 121.5, "average") == pytest.approx((86.2 + 87.4) / 2)


def test_no_number_outside_the_tables_or_without_the_age_that_picks_one() -> None:
    young = predict_adult_height(110, "female", 60, 60)
    assert young.predicted_adult_height_cm is None and "below" in young.not_available
    late = predict_adult_height(150, "male", 170, 200)  # retarded boy above 13-0: the gap
    assert late.predicted_adult_height_cm is None and "Table IIE" in late.not_available
    assert late.bayley_pinneau_column is MaturityColumn.RETARDED
    done = predict_adult_height(165, "female", 220, 220)
    assert done.predicted_adult_height_cm is None and "growth is complete" in done.not_available
    no_age = predict_adult_height(140, "female", 130, None)
    assert no_age.predicted_adult_height_cm is None and "chronological age" in no_age.not_available
    for result in (young, late, done, no_age):
        assert "\n" not in result.not_available


def test_published_error_and_its_limits() -> None:
    girl = predict_adult_height(130, "female", 120, 120)
    assert girl.predicted_adult_height_error_sd_cm == pytest.approx(1.37 * INCH, abs=0.05)  # Table IV, 10-0
    lo, hi = girl.predicted_adult_height_range_cm
    assert hi - lo == pytest.approx(4 * girl.predicted_adult_height_error_sd_cm, abs=0.2)
    young = predict_adult_height(120, "female", 84, 84)  # 7 y: Tables IV/V start at 8 y
    assert young.predicted_adult_height_cm is not None and young.predicted_adult_height_error_sd_cm is None
    assert any("8 to 18 years" in note for note in young.notes)
    assert "J Pediatr 1952;40:423-441" in girl.source and len(girl.limits) >= 3
    borderline = predict_adult_height(140, "male", 143, 132, bone_age_uncertainty_months=2.0)
    assert any("borderline" in note for note in borderline.notes)


def test_height_typos_are_one_line_errors() -> None:
    with pytest.raises(BoneAgeInputError, match="in cm"):
        predict_adult_height(4.6, "male", 120, 120)  # feet, not cm
    with pytest.raises(BoneAgeInputError, match="in cm"):
        predict_adult_height(1400, "male", 120, 120)
    with pytest.raises(BoneAgeInputError, match="both"):
        growth_workup(
            sex="male",
            bone_age_months=120,
            chronological_age_months=120,
            uncertainty_months=1,
            sd_score=0.0,
            source="x.png",
            mother_height_cm=160,
        )


def test_tanner_target_height_worked_example() -> None:
    # (165 + 178 + 13) / 2 = 178 cm for a boy, (165 + 178 - 13) / 2 = 165 cm for a girl, range +/- 8.5 cm:
    # the worked example of calculatorlib.com/height-calculator, formula of Tanner et al. 1970 as tabulated in
    # BMC Pediatr 2025;26:30 Table 1 (and rcpchgrowth's mid_parental_height).
    boy = target_height(165, 178, "male")
    assert boy.target_height_cm == 178.0 and boy.target_height_range_cm == (169.5, 186.5)
    girl = target_height(165, 178, "female")
    assert girl.target_height_cm == 165.0 and girl.target_height_range_cm == (156.5, 173.5)
    with pytest.raises(BoneAgeInputError, match="mother"):
        target_height(65, 178, "female")  # inches


def test_centile_from_sds() -> None:
    assert centile_from_sds(0.0) == pytest.approx(50.0)
    assert centile_from_sds(2.0) == pytest.approx(97.725, abs=0.01)
    assert centile_from_sds(None) is None


# ---- follow-up ---------------------------------------------------------------------------------------------
def _predict_json(age: float, bone: float, unc: float, sex: str = "female", name: str = "v.png") -> str:
    return json.dumps(
        {
            "file": f"/data/{name}",
            "sex": sex,
            "chronological_age_months": age,
            "bone_age_months": bone,
            "uncertainty_months": unc,
            "sd_score": 0.1,
            "warnings": [],
        }
    )


def test_history_from_predict_json_lines_gives_velocity_and_its_uncertainty(tmp_path: Path) -> None:
    path = tmp_path / "child.json"
    path.write_text(
        _predict_json(96, 90, 3.0, name="a.png") + "\n" + _predict_json(108, 100, 4.0, name="b.png")
    )
    history = read_history(path)
    assert history.sex == "female" and [v.label for v in history.visits] == ["a.png", "b.png"]
    current = Visit(
        label="c.png", chronological_age_months=114, bone_age_months=108, uncertainty_months=0.0, current=True
    )
    result = follow_up(history, current, "female")
    first, second = result.intervals
    assert first.velocity_months_per_year == pytest.approx(10.0)  # 10 bone-age months in 1 year
    assert first.velocity_uncertainty_months_per_year == pytest.approx(5.0)  # hypot(3, 4) / 1 y
    assert second.velocity_months_per_year == pytest.approx(16.0)  # 8 months in half a year
    assert result.overall.velocity_months_per_year == pytest.approx(12.0)
    assert not any(step.backwards for step in result.intervals)


def test_bone_age_going_backwards_beyond_the_uncertainty_is_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "history.json"
    path.write_text(
        json.dumps(
            {
                "visits": [
                    {
                        "label": "2023",
                        "date": "2023-03-01",
                        "chronological_age": "8y",
                        "bone_age_months": 100,
                        "uncertainty_months": 2,
                        "sex": "m",
                    },
                ]
            }
        )
    )
    history = read_history(path)
    small = follow_up(
        history,
        Visit(
            label="now", chronological_age_months=108, bone_age_months=98, uncertainty_months=2, current=True
        ),
        "male",
    )
    assert not small.intervals[0].backwards and not any("backwards" in w for w in small.warnings)
    big = follow_up(
        history,
        Visit(
            label="now", chronological_age_months=108, bone_age_months=92, uncertainty_months=2, current=True
        ),
        "male",
    )
    assert big.intervals[0].backwards and any("backwards" in w for w in big.warnings)


def test_history_from_a_batch_csv_skips_failed_rows(tmp_path: Path) -> None:
    path = tmp_path / "batch.csv"
    path.write_text(
        "file,sex,bone_age_months,bone_age_years,uncertainty_months,chronological_age_months,difference_months,"
        "sd_score,flag,warnings,error\n"
        "a.png,male,100,8.3,2,96,4,0.4,normal,,\n"
        "broken.png,,,,,,,,,,broken.png: cannot read image\n"
        "b.png,male,110,9.2,2,108,2,0.2,normal,,\n"
    )
    history = read_history(path)
    assert [v.label for v in history.visits] == ["a.png", "b.png"] and history.skipped == 1


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (_predict_json(108, 100, 1) + "\n" + _predict_json(96, 90, 1), "out of order"),
        (_predict_json(96, 90, 1) + "\n" + _predict_json(108, 100, 1, sex="male"), "mixed sexes"),
        ('{"visits": [{"bone_age_months": 90, "sex": "f"}]}', "no chronological age"),
        (
            '{"visits": [{"bone_age_months": 90, "sex": "f", "age": "9y", "date": "2024-05-01"},'
            ' {"bone_age_months": 99, "sex": "f", "age": "10y", "date": "2023-05-01"}]}',
            "dates out of order",
        ),
        ("{not json", "not valid JSON"),
        ("", "empty"),
    ],
)
def test_bad_histories_are_refused_with_one_line(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "history.json"
    path.write_text(content)
    with pytest.raises(BoneAgeInputError, match=problem) as info:
        read_history(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_history_of_the_other_sex_or_an_earlier_visit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "child.json"
    path.write_text(_predict_json(120, 118, 1))
    history = read_history(path)
    later = Visit(label="now", chronological_age_months=130, bone_age_months=126, current=True)
    with pytest.raises(BoneAgeInputError, match="female child"):
        follow_up(history, later, "male")
    earlier = Visit(label="now", chronological_age_months=110, bone_age_months=106, current=True)
    with pytest.raises(BoneAgeInputError, match="out of order"):
        follow_up(history, earlier, "female")
    no_age = follow_up(history, None, "female")
    assert no_age.intervals == [] and "chronological age" in no_age.not_available


# ---- export ------------------------------------------------------------------------------------------------
def test_export_carries_the_growth_chart_fields_in_a_versioned_schema(tmp_path: Path) -> None:
    history = tmp_path / "h.json"
    history.write_text(_predict_json(108, 104, 2.0))
    workup = growth_workup(
        sex="female",
        bone_age_months=126.0,
        chronological_age_months=120.0,
        uncertainty_months=2.0,
        sd_score=0.5,
        source="/x/now.png",
        height_cm=140.0,
        mother_height_cm=165.0,
        father_height_cm=178.0,
        history=read_history(history),
    )
    data = workup.to_dict()
    export = data["growth"]
    assert (
        export["schema_version"] == EXPORT_SCHEMA_VERSION and export["schema_id"] == "boneage/growth-export"
    )
    assert export["bone_age"] == pytest.approx(10.5) and export["bone_age_type"] == "greulich-pyle"
    assert export["bone_age_sds"] == pytest.approx(0.5) and export["bone_age_centile"] == pytest.approx(69.1)
    assert export["predicted_adult_height_cm"] == data["adult_height"]["predicted_adult_height_cm"]
    assert export["predicted_adult_height_method"] == "bayley-pinneau" and export["target_height_cm"] == 165.0
    assert export["bone_age_velocity"] == pytest.approx(22.0)  # 22 bone-age months in one year
    schema = GrowthExport.model_json_schema()
    for field in (
        "bone_age",
        "bone_age_type",
        "bone_age_sds",
        "bone_age_centile",
        "predicted_adult_height_cm",
        "target_height_cm",
        "schema_version",
    ):
        assert field in schema["properties"], field
    assert workup.trajectory == [(108.0, 104.0, 2.0)]


# ---- calibration on real radiographs -----------------------------------------------------------------------
def test_too_few_labelled_radiographs_say_how_many_are_missing() -> None:
    with pytest.raises(BoneAgeInputError, match=r"32 female \(18 missing\), 61 male"):
        check_calibration_counts([False] * 32 + [True] * 61, "labels.csv")
    assert MIN_CASES_PER_SEX == 50


@pytest.mark.integration
def test_calibration_recovers_a_known_per_sex_shift_on_real_radiographs(
    sample_predictions, site_calibration: Path
) -> None:
    table = sample_predictions
    calibration = Calibration.load(site_calibration)
    assert calibration.helps and calibration.name == "site.json" and calibration.cases == len(table)
    assert calibration.tta is False and calibration.model["backbone"]
    for sex, slope in (("female", 1.08), ("male", 0.93)):
        c = calibration.correction(sex)
        assert c.applied and c.n >= MIN_CASES_PER_SEX
        assert c.mae_after_months < 0.75 * c.mae_before_months  # cross-validated, not in-sample
        assert abs(c.bias_before_months) > 8 and abs(c.bias_after_months) < 1.5
        assert c.slope == pytest.approx(slope, abs=0.1)
    # applied: the corrected bone ages are far closer to the site's readings than the model's own
    readings = shifted_readings(table)
    sexes = np.where(table["male"], "male", "female")
    corrected = np.array([calibration.apply(s, p) for s, p in zip(sexes, table["predicted"], strict=True)])
    assert np.mean(np.abs(corrected - readings)) < 0.75 * np.mean(np.abs(table["predicted"] - readings))
    mode = stat.S_IMODE(os.stat(site_calibration).st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # written with the umask's permissions (not mkstemp's 0600)


@pytest.mark.integration
def test_calibration_finds_nothing_to_correct_on_the_plain_sample(sample_predictions) -> None:
    calibration = fit_calibration(
        sample_predictions["predicted"],
        sample_predictions["boneage"],
        sample_predictions["male"],
        model={"model_version": "x"},
        tta=False,
        labels="labels.csv",
    )
    assert not calibration.helps
    for sex in ("female", "male"):
        c = calibration.correction(sex)
        assert not c.applied and c.mae_gain_ci_low_months <= 0 and "95% confidence" in c.reason


def test_a_calibration_for_another_model_or_a_damaged_file_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "site.json"
    bad.write_text('{"kind": "boneage-calibration", "version": 1, "cases": "many"}')
    with pytest.raises(BoneAgeInputError, match="damaged calibration") as info:
        Calibration.load(bad)
    assert str(bad) in str(info.value)
    bad.write_text("[]")
    with pytest.raises(BoneAgeInputError, match="not a boneage calibration"):
        Calibration.load(bad)
    rng = np.random.default_rng(0)
    ref = rng.uniform(20, 200, 120)
    male = np.arange(120) % 2 == 0
    calibration = fit_calibration(
        ref * 0.9 + 15 + rng.normal(0, 3, 120),
        ref,
        male,
        model={"model_version": "1", "backbone": "b"},
        tta=True,
        labels="l.csv",
    )
    with pytest.raises(BoneAgeInputError, match="another model"):
        calibration.check_model({"model_version": "2", "backbone": "b"})
    calibration.check_model({"model_version": "1", "backbone": "b"})


def test_predict_labelled_is_the_plain_pass_evaluate_makes(sample_predictions) -> None:
    """What a calibration is fitted to (``boneage calibrate``) is the model's single-view bone age, the same
    figures ``evaluate`` gives for those files (the session's ``sample_predictions`` are taken from it)."""
    from boneage.growth import predict_labelled
    from boneage.predict import load_predictor

    rows = sample_predictions.iloc[[0, 1, 2, -3, -2, -1]]
    got = predict_labelled(load_predictor(tta=False), rows["path"], rows["male"].to_numpy(bool), batch_size=4)
    np.testing.assert_allclose(got, rows["predicted"].to_numpy(float), atol=0.01)
