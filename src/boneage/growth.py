"""The growth work-up around a bone age: adult height, target height, follow-up and a site's calibration.

A paediatric endocrinologist reads a bone age together with the child's height, the parents' heights and the
earlier visits. This module holds that clinical arithmetic, each figure with its method, source and limits,
and no figure where the method does not apply:

* **Bayley–Pinneau adult height** (Bayley & Pinneau, J Pediatr 1952;40:423–441): current height divided by the
  per cent of mature height reached at the Greulich–Pyle bone age, read from the average, accelerated or
  retarded table as bone age minus chronological age decides. Tables: ``reference/bayley_pinneau.csv`` (where
  they came from and how they were cross-checked is in its header); the method's own published error:
  ``reference/bayley_pinneau_error.csv``.
* **Tanner mid-parental target height** (Tanner, Goldstein & Whitehouse, Arch Dis Child 1970;45:755–762):
  (father + mother ± 13 cm) / 2, range ± 8.5 cm.
* **Follow-up**: bone age velocity between visits (bone-age months per chronological year) with the
  uncertainty of the two predictions, the trajectory, and a warning when bone age goes backwards.
* **Calibration to a site**: a per-sex linear correction of the model's bone age to the site's own readings,
  judged by cross-validation and refused when it does not help (:class:`Calibration`).
* **Export**: :class:`GrowthExport`, a versioned record with the fields growth-chart software reads
  (``bone_age``, ``bone_age_type``, ``bone_age_sds``, ``bone_age_centile`` as in the RCPCH growth API).

It imports only ``errors``, ``clinical`` and ``labels``; the front ends (assessment, report, CLI, web) call
it.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from enum import Enum
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from boneage import __version__
from boneage.clinical import format_months, parse_age
from boneage.data.labels import Sex, parse_sex
from boneage.errors import BoneAgeInputError
from boneage.files import atomic_write

__all__ = [
    "BAYLEY_PINNEAU_CITATION",
    "BAYLEY_PINNEAU_LIMITS",
    "EXPORT_SCHEMA_VERSION",
    "TANNER_CITATION",
    "AdultHeightPrediction",
    "Calibration",
    "CalibrationUse",
    "FollowUp",
    "GrowthExport",
    "GrowthWorkup",
    "History",
    "MaturityColumn",
    "SexCorrection",
    "TargetHeight",
    "Visit",
    "bayley_pinneau_column",
    "bayley_pinneau_table",
    "centile_from_sds",
    "check_calibration_counts",
    "check_height_cm",
    "fit_calibration",
    "follow_up",
    "growth_workup",
    "percent_of_mature_height",
    "predict_adult_height",
    "predict_labelled",
    "read_history",
    "target_height",
]

INCH_CM = 2.54

# ---- sources ----------------------------------------------------------------------------------------------
BAYLEY_PINNEAU_CITATION = (
    "Bayley N, Pinneau SR. Tables for predicting adult height from skeletal age: revised for use with the "
    "Greulich-Pyle hand standards. J Pediatr 1952;40:423-441 (Tables IIA-IIE boys, IIIA-IIIF girls; "
    "reprinted in Greulich & Pyle, Radiographic Atlas of Skeletal Development of the Hand and Wrist, "
    "2nd ed., 1959). Percentages from three public transcriptions that agree after cross-checking (RCPCH "
    "growth-references, vilda-calc, bone-age web app); error SD from the paper's Tables IV/V (validating "
    "sample), one transcription."
)
TANNER_CITATION = (
    "Tanner JM, Goldstein H, Whitehouse RH. Standards for children's height at ages 2-9 years allowing for "
    "height of parents. Arch Dis Child 1970;45:755-762: target height = (father + mother + 13 cm) / 2 for "
    "boys, (father + mother - 13 cm) / 2 for girls, range +/- 8.5 cm (as tabulated in BMC Pediatr "
    "2025;26:30, Table 1)."
)
BAYLEY_PINNEAU_LIMITS = (
    "Derived in 1952 from healthy children of two Californian longitudinal studies (Guidance Study, Berkeley "
    "Growth Study); adult heights have risen since and the tables have not been updated (Tarim, J Pediatr "
    "Endocrinol 2016;1:1002).",
    "Known to overestimate adult height when bone age is accelerated and to underestimate it when bone age "
    "is retarded (Tarim, Turk J Pediatr 2013;55:485-492).",
    "Not validated for children with conditions or treatments that change growth or maturation (e.g. "
    "precocious or delayed puberty under treatment, growth hormone, skeletal dysplasias, Turner syndrome, "
    "chronic disease).",
    "The bone age here is the model's estimate (validation MAE about 7 months), not an expert Greulich-Pyle "
    "reading; the published error assumes an expert reading, so the real error is larger.",
)
FOLLOW_UP_METHOD = (
    "Bone age velocity = change in bone age (months) / change in chronological age (years) between visits; "
    "its uncertainty = sqrt(u1^2 + u2^2) / years, from the two predictions' stated uncertainties (spread "
    "over test-time views), which do not include the model's systematic error. A child maturing at the "
    "average tempo gains 12 bone-age months per year."
)
CALIBRATION_METHOD = (
    "Per-sex least-squares line from the model's bone age to the site's readings (corrected = a + b x "
    "predicted), judged by k-fold cross-validation on the site's radiographs: kept for a sex only if the "
    "cross-validated gain in mean absolute error is above zero with 95% confidence (paired, normal "
    "approximation)."
)

#: Plausible heights (cm): outside them a number is a typo (or inches), not a child or a parent.
CHILD_HEIGHT_RANGE_CM = (40.0, 220.0)
PARENT_HEIGHT_RANGE_CM = (120.0, 230.0)
#: Tanner 1970's range around the target height.
TANNER_RANGE_CM = 8.5
TANNER_SEX_OFFSET_CM = 13.0
#: Mature heights printed in the Bayley-Pinneau tables' bodies (inches), per sex: beyond them, extrapolation.
_PRINTED_MATURE_IN = {Sex.MALE: (60.0, 81.0), Sex.FEMALE: (51.0, 75.0)}
EXPORT_SCHEMA_ID = "boneage/growth-export"
EXPORT_SCHEMA_VERSION = "1.0"
CALIBRATION_KIND = "boneage-calibration"
CALIBRATION_VERSION = 1
MIN_CASES_PER_SEX = 50
CALIBRATION_FOLDS = 5
#: A fitted slope outside this is not a site's reading style but a unit or label error (years vs months).
PLAUSIBLE_SLOPE = (0.5, 1.5)
MAX_HISTORY_VISITS = 500
HISTORY_MAX_BYTES = 2 * 1024 * 1024
_MODEL_KEYS = ("model_version", "backbone", "created", "git_commit")


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(float(value), digits)


def _finite(value: object, what: str, source: str | Path | None = None) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise BoneAgeInputError(f"{what} must be a number, got {value!r}", source) from None
    if not math.isfinite(number):
        raise BoneAgeInputError(f"{what} must be a finite number, got {value!r}", source)
    return number


def check_height_cm(
    value: object, what: str = "height", source: str | Path | None = None, *, parent: bool = False
) -> float | None:
    """A height in cm, or None when not given; a typo (or inches) is a one-line error, not a prediction."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    number = _finite(value.strip() if isinstance(value, str) else value, what, source)
    lo, hi = PARENT_HEIGHT_RANGE_CM if parent else CHILD_HEIGHT_RANGE_CM
    if not lo <= number <= hi:
        raise BoneAgeInputError(f"{what} must be in cm, {lo:g} to {hi:g}; got {number:g}", source)
    return number


def centile_from_sds(sds: float | None) -> float | None:
    """The centile (0-100) of an SD score under the normal distribution, as growth charts plot it."""
    if sds is None or not math.isfinite(sds):
        return None
    return 50.0 * (1.0 + math.erf(sds / math.sqrt(2.0)))


def _sex(value: object, source: str | Path | None = None) -> Sex:
    found = parse_sex(value, source)
    if found is None:
        raise BoneAgeInputError("sex must be female or male", source)
    return found


# ---- Bayley-Pinneau ---------------------------------------------------------------------------------------
class MaturityColumn(str, Enum):
    """Which Bayley-Pinneau table applies: bone age within a year of chronological age, or a year or more
    ahead of it, or a year or more behind it (the tables' own definitions)."""

    AVERAGE = "average"
    ACCELERATED = "accelerated"
    RETARDED = "retarded"

    __str__ = str.__str__


@lru_cache(maxsize=1)
def _bp_frame() -> pd.DataFrame:
    source = resources.files("boneage").joinpath("reference", "bayley_pinneau.csv")
    with source.open("r", encoding="utf-8") as handle:
        return pd.read_csv(handle, comment="#")


@lru_cache(maxsize=1)
def _bp_error_frame() -> pd.DataFrame:
    source = resources.files("boneage").joinpath("reference", "bayley_pinneau_error.csv")
    with source.open("r", encoding="utf-8") as handle:
        return pd.read_csv(handle, comment="#")


@lru_cache(maxsize=8)
def _bp_arrays(sex: str, column: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    rows = _bp_frame()
    rows = rows[(rows["sex"] == sex) & (rows["column"] == column)].sort_values("skeletal_age_months")
    months = rows["skeletal_age_months"].to_numpy(dtype=float)
    percent = rows["percent"].to_numpy(dtype=float)
    months.setflags(write=False)
    percent.setflags(write=False)
    return months, percent, tuple(dict.fromkeys(rows["table"]))


def bayley_pinneau_table(sex: str, column: MaturityColumn | str) -> pd.DataFrame:
    """The transcribed table for one sex and column (skeletal age, months, per cent, source table)."""
    sex_norm, col = _sex(sex), MaturityColumn(column)
    rows = _bp_frame()
    return rows[(rows["sex"] == sex_norm.value) & (rows["column"] == col.value)].reset_index(drop=True)


def bayley_pinneau_column(bone_age_months: float, chronological_age_months: float) -> MaturityColumn:
    """The table Bayley & Pinneau prescribe: accelerated when bone age is one year or more ahead of
    chronological age, retarded when one year or more behind, average otherwise."""
    diff = float(bone_age_months) - float(chronological_age_months)
    if diff >= 12.0:
        return MaturityColumn.ACCELERATED
    if diff <= -12.0:
        return MaturityColumn.RETARDED
    return MaturityColumn.AVERAGE


def percent_of_mature_height(sex: str, bone_age_months: float, column: MaturityColumn | str) -> float | None:
    """Per cent of adult height reached at this bone age, linearly interpolated between the tabulated
    skeletal ages (3-month steps); None outside the table."""
    months, percent, _ = _bp_arrays(_sex(sex).value, MaturityColumn(column).value)
    age = float(bone_age_months)
    if not months[0] <= age <= months[-1]:
        return None
    return float(np.interp(age, months, percent))


def prediction_error_sd_cm(sex: str, age_months: float) -> float | None:
    """SD of the prediction error in Bayley & Pinneau's validating sample (Tables IV/V) at this age, in cm,
    interpolated between the tabulated half-years; None outside 8-18 y, where the paper gives none."""
    rows = _bp_error_frame()
    rows = rows[rows["sex"] == _sex(sex).value].sort_values("age_months")
    ages = rows["age_months"].to_numpy(dtype=float)
    if not ages[0] <= float(age_months) <= ages[-1]:
        return None
    return float(np.interp(float(age_months), ages, rows["sd_error_in"].to_numpy(dtype=float))) * INCH_CM


class AdultHeightPrediction(BaseModel):
    """A Bayley-Pinneau adult height prediction, or the one line saying why there is none."""

    model_config = ConfigDict(frozen=True)

    method: Literal["bayley-pinneau"] = "bayley-pinneau"
    method_text: str = "Bayley-Pinneau (1952) adult height prediction from Greulich-Pyle bone age"
    height_cm: float
    sex: Sex
    bone_age_months: float
    chronological_age_months: float | None
    bayley_pinneau_column: MaturityColumn | None = None
    bayley_pinneau_tables: list[str] = Field(default_factory=list)
    percent_of_mature_height: float | None = None
    predicted_adult_height_cm: float | None = None
    predicted_adult_height_error_sd_cm: float | None = None
    predicted_adult_height_range_cm: tuple[float, float] | None = None
    not_available: str | None = None
    notes: list[str] = Field(default_factory=list)
    source: str = BAYLEY_PINNEAU_CITATION
    limits: tuple[str, ...] = BAYLEY_PINNEAU_LIMITS


def _out_of_table(sex: Sex, column: MaturityColumn, bone_age: float) -> str:
    months, percent, _ = _bp_arrays(sex.value, column.value)
    first, last = format_months(months[0]), format_months(months[-1])
    what = f"the Bayley-Pinneau {column.value} table for {'boys' if sex is Sex.MALE else 'girls'}"
    if bone_age < months[0]:
        return (
            f"no adult height prediction: bone age {format_months(bone_age)} is below {what} "
            f"(starts at {first})"
        )
    if sex is Sex.MALE and column is MaturityColumn.RETARDED:
        return (
            f"no adult height prediction: {what} covers {first} to {last} only (Table IIE); no verified "
            "continuation for older retarded bone ages was found, so none is extrapolated "
            "(see docs/growth.md)"
        )
    if percent[-1] >= 100.0:
        return (
            f"no adult height prediction: bone age {format_months(bone_age)} is beyond {what}, which reaches "
            f"100% at {last}: growth is complete and the current height is the adult height"
        )
    return f"no adult height prediction: bone age {format_months(bone_age)} is beyond {what} (ends at {last})"


def predict_adult_height(
    height_cm: float,
    sex: str,
    bone_age_months: float,
    chronological_age_months: float | None,
    *,
    bone_age_uncertainty_months: float | None = None,
) -> AdultHeightPrediction:
    """Bayley-Pinneau: adult height = current height / (per cent of mature height at this bone age / 100),
    the per cent from the table that bone age minus chronological age selects, with the published error SD
    at this age. Outside the tables, or without the chronological age that picks the table, no number."""
    height = check_height_cm(height_cm, "height")
    if height is None:
        raise BoneAgeInputError("height is required for an adult height prediction")
    sex_norm = _sex(sex)
    bone = _finite(bone_age_months, "bone age")
    chron = (
        None if chronological_age_months is None else _finite(chronological_age_months, "chronological age")
    )
    base: dict[str, Any] = {
        "height_cm": round(height, 1),
        "sex": sex_norm,
        "bone_age_months": round(bone, 2),
        "chronological_age_months": _round(chron),
    }
    notes: list[str] = []
    if chron is None:  # the three tables never give the same per cent at one bone age: the column matters
        return AdultHeightPrediction(
            **base,
            not_available=(
                "no adult height prediction: Bayley-Pinneau needs the chronological age to choose the "
                "average, accelerated or retarded table"
            ),
        )
    column = bayley_pinneau_column(bone, chron)
    diff = bone - chron
    unc = bone_age_uncertainty_months or 0.0
    if unc > 0 and min(abs(diff - 12.0), abs(diff + 12.0)) < unc:
        notes.append(
            f"table choice is borderline: bone age - chronological age = {diff:+.1f} months, within the "
            f"bone age's uncertainty (+/- {unc:.1f}) of the one-year limit"
        )
    pct = percent_of_mature_height(sex_norm, bone, column)
    if pct is None:
        return AdultHeightPrediction(
            **base, bayley_pinneau_column=column, not_available=_out_of_table(sex_norm, column, bone)
        )
    predicted = height / (pct / 100.0)
    lo_in, hi_in = _PRINTED_MATURE_IN[sex_norm]
    if not lo_in * INCH_CM <= predicted <= hi_in * INCH_CM:
        notes.append(
            f"predicted height lies outside the mature heights printed in the tables "
            f"({lo_in * INCH_CM:.0f}-{hi_in * INCH_CM:.0f} cm): an extrapolation"
        )
    sd = prediction_error_sd_cm(sex_norm, chron)  # Tables IV/V are by age at prediction
    if sd is None:
        notes.append(
            "no published error at this age: Bayley & Pinneau's Tables IV/V cover ages 8 to 18 years only"
        )
    tables = list(_bp_arrays(sex_norm.value, column.value)[2])
    return AdultHeightPrediction(
        **base,
        bayley_pinneau_column=column,
        bayley_pinneau_tables=list(tables),
        percent_of_mature_height=round(pct, 2),
        predicted_adult_height_cm=round(predicted, 1),
        predicted_adult_height_error_sd_cm=_round(sd, 1),
        predicted_adult_height_range_cm=(
            None if sd is None else (round(predicted - 2 * sd, 1), round(predicted + 2 * sd, 1))
        ),
        notes=notes,
    )


# ---- Tanner target height ---------------------------------------------------------------------------------
class TargetHeight(BaseModel):
    """The mid-parental target height with Tanner's range: the family's expectation, not a prediction."""

    model_config = ConfigDict(frozen=True)

    method: Literal["tanner-1970"] = "tanner-1970"
    method_text: str = "Tanner mid-parental target height"
    mother_height_cm: float
    father_height_cm: float
    sex: Sex
    target_height_cm: float
    target_height_range_cm: tuple[float, float]
    source: str = TANNER_CITATION
    limits: tuple[str, ...] = (
        "Assumes both biological parents' measured adult heights and a child growing as healthy children do; "
        "it does not allow for the secular trend or for parents of extreme height.",
    )


def target_height(mother_height_cm: float, father_height_cm: float, sex: str) -> TargetHeight:
    """Tanner 1970: (father + mother + 13 cm) / 2 for a boy, (father + mother - 13 cm) / 2 for a girl,
    with a range of +/- 8.5 cm."""
    mother = check_height_cm(mother_height_cm, "mother's height", parent=True)
    father = check_height_cm(father_height_cm, "father's height", parent=True)
    if mother is None or father is None:
        raise BoneAgeInputError("the target height needs both the mother's and the father's height")
    sex_norm = _sex(sex)
    offset = TANNER_SEX_OFFSET_CM if sex_norm is Sex.MALE else -TANNER_SEX_OFFSET_CM
    mid = (mother + father + offset) / 2.0
    return TargetHeight(
        mother_height_cm=mother,
        father_height_cm=father,
        sex=sex_norm,
        target_height_cm=round(mid, 1),
        target_height_range_cm=(round(mid - TANNER_RANGE_CM, 1), round(mid + TANNER_RANGE_CM, 1)),
    )


# ---- follow-up across visits ------------------------------------------------------------------------------
class Visit(BaseModel):
    """One visit's bone age as the follow-up needs it."""

    label: str
    chronological_age_months: float
    bone_age_months: float
    uncertainty_months: float = 0.0
    sd_score: float | None = None
    date: dt.date | None = None
    calibration: str | None = None
    current: bool = False


class History(BaseModel):
    """A child's earlier visits, read from a predict --json output, a batch CSV or a history file."""

    source: str
    sex: Sex
    visits: list[Visit]
    skipped: int = 0


class Interval(BaseModel):
    """Bone age velocity between two visits."""

    from_visit: str
    to_visit: str
    years: float
    bone_age_change_months: float
    combined_uncertainty_months: float
    velocity_months_per_year: float
    velocity_uncertainty_months_per_year: float
    backwards: bool = False


class FollowUp(BaseModel):
    """Velocity, trajectory and warnings across visits (or why there are none)."""

    method: Literal["bone-age-velocity"] = "bone-age-velocity"
    method_text: str = FOLLOW_UP_METHOD
    history: str
    visits: list[Visit]
    intervals: list[Interval] = Field(default_factory=list)
    overall: Interval | None = None
    warnings: list[str] = Field(default_factory=list)
    not_available: str | None = None

    @property
    def latest(self) -> Interval | None:
        return self.intervals[-1] if self.intervals else None


def _records(text: str, source: str) -> list[dict[str, Any]]:
    """JSON (one object, an array, {"visits": [...]}, or one object per line) or CSV rows."""
    stripped = text.strip()
    if not stripped:
        raise BoneAgeInputError("history is empty", source)
    if stripped[0] in "[{":
        try:
            data: Any = json.loads(stripped)
        except json.JSONDecodeError:
            try:
                data = [json.loads(line) for line in stripped.splitlines() if line.strip()]
            except json.JSONDecodeError as exc:
                raise BoneAgeInputError(f"not valid JSON (line {exc.lineno}: {exc.msg})", source) from None
        if isinstance(data, dict):
            data = data["visits"] if isinstance(data.get("visits"), list) else [data]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise BoneAgeInputError("JSON history must hold visit objects", source)
        return data
    try:
        return [dict(row) for row in csv.DictReader(io.StringIO(stripped))]
    except csv.Error as exc:
        raise BoneAgeInputError(f"not a readable CSV ({exc})", source) from None


def _visit_age(record: Mapping[str, Any], where: str, source: str) -> float | None:
    for key in ("chronological_age_months",):
        value = record.get(key)
        if value not in (None, ""):
            return _finite(value, f"{where}: chronological age", source)
    for key in ("chronological_age", "age"):
        value = record.get(key)
        if value not in (None, ""):
            try:
                return parse_age(value)
            except BoneAgeInputError as exc:
                raise BoneAgeInputError(f"{where}: {exc.problem}", source) from None
    return None


def read_history(data: str | Path | bytes, name: str | None = None) -> History:
    """A child's earlier results: the JSON ``predict --json`` writes (one object per line), a batch CSV of
    ``predict --out``, or a history file ``{"visits": [{"chronological_age": "9y6m", "bone_age_months": 110,
    "uncertainty_months": 2.1, "sex": "female", "date": "2024-03-01"}, ...]}``. Visits must be in order and of
    one sex; failed batch rows are skipped. Every problem is one line naming the file."""
    if isinstance(data, bytes):
        source = name or "history"
        raw = data
    else:
        path = Path(data)
        source = name or str(path)
        try:
            if path.stat().st_size > HISTORY_MAX_BYTES:
                raise BoneAgeInputError(f"history larger than {HISTORY_MAX_BYTES // 1048576} MB", source)
            raw = path.read_bytes()
        except OSError as exc:
            raise BoneAgeInputError(
                f"cannot read the history ({exc.strerror or type(exc).__name__})", source
            ) from None
    if len(raw) > HISTORY_MAX_BYTES:
        raise BoneAgeInputError(f"history larger than {HISTORY_MAX_BYTES // 1048576} MB", source)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BoneAgeInputError("history is not UTF-8 text (JSON or CSV)", source) from None
    records = _records(text, source)
    if len(records) > MAX_HISTORY_VISITS:
        raise BoneAgeInputError(f"history has {len(records)} visits; at most {MAX_HISTORY_VISITS}", source)
    visits: list[Visit] = []
    sexes: list[tuple[Sex, str]] = []
    skipped = 0
    for number, record in enumerate(records, start=1):
        label = Path(str(record.get("file") or "")).name or str(record.get("label") or f"visit {number}")
        where = f"visit {number} ({label})" if label != f"visit {number}" else label
        if str(record.get("error") or "").strip() or record.get("bone_age_months") in (None, ""):
            skipped += 1  # a failed batch row or a row without a result: nothing to follow
            continue
        sex = parse_sex(record.get("sex"), source)
        if sex is None:
            raise BoneAgeInputError(f"{where} has no sex", source)
        sexes.append((sex, where))
        age = _visit_age(record, where, source)
        if age is None:
            raise BoneAgeInputError(
                f"{where} has no chronological age: velocity needs the age at every visit", source
            )
        unc = record.get("uncertainty_months")
        uncertainty = 0.0 if unc in (None, "") else _finite(unc, f"{where}: uncertainty", source)
        if uncertainty < 0:
            raise BoneAgeInputError(f"{where}: uncertainty must not be negative", source)
        date_text = record.get("date") or record.get("study_date")
        try:
            date = dt.date.fromisoformat(str(date_text).strip()[:10]) if date_text else None
        except ValueError:
            raise BoneAgeInputError(f"{where}: date {date_text!r} is not YYYY-MM-DD", source) from None
        calibration = record.get("calibration")
        sd = record.get("sd_score")
        visits.append(
            Visit(
                label=label,
                chronological_age_months=age,
                bone_age_months=_finite(record["bone_age_months"], f"{where}: bone age", source),
                uncertainty_months=uncertainty,
                sd_score=None if sd in (None, "") else _finite(sd, f"{where}: SD score", source),
                date=date,
                calibration=(calibration.get("file") if isinstance(calibration, dict) else calibration)
                or None,
            )
        )
    if not visits:
        raise BoneAgeInputError("history holds no visit with a bone age", source)
    first_sex, first_where = sexes[0]
    for sex, where in sexes[1:]:
        if sex is not first_sex:
            raise BoneAgeInputError(f"mixed sexes: {first_where} is {first_sex}, {where} is {sex}", source)
    for earlier, later in zip(visits, visits[1:], strict=False):
        _check_order(earlier, later, source)
    return History(source=source, sex=first_sex, visits=visits, skipped=skipped)


def _check_order(earlier: Visit, later: Visit, source: str) -> None:
    if later.chronological_age_months <= earlier.chronological_age_months:
        raise BoneAgeInputError(
            f"visits out of order: {later.label} (age {format_months(later.chronological_age_months)}) "
            f"is not after {earlier.label} (age {format_months(earlier.chronological_age_months)})",
            source,
        )
    if earlier.date is not None and later.date is not None and later.date <= earlier.date:
        raise BoneAgeInputError(
            f"dates out of order: {later.label} ({later.date}) is not after {earlier.label} ({earlier.date})",
            source,
        )


def _interval(a: Visit, b: Visit) -> Interval:
    years = (b.chronological_age_months - a.chronological_age_months) / 12.0
    change = b.bone_age_months - a.bone_age_months
    combined = math.hypot(a.uncertainty_months, b.uncertainty_months)
    return Interval(
        from_visit=a.label,
        to_visit=b.label,
        years=round(years, 3),
        bone_age_change_months=round(change, 2),
        combined_uncertainty_months=round(combined, 2),
        velocity_months_per_year=round(change / years, 2),
        velocity_uncertainty_months_per_year=round(combined / years, 2),
        backwards=change < -combined,
    )


def follow_up(history: History, current: Visit | None, sex: str) -> FollowUp:
    """Velocity between consecutive visits (the earlier ones and this one), the whole span's velocity, and a
    warning wherever bone age went backwards by more than the two predictions' combined uncertainty. A
    history of the other sex, or a visit not after the last one, is refused."""
    sex_norm = _sex(sex)
    if history.sex is not sex_norm:
        raise BoneAgeInputError(
            f"the history is for a {history.sex.value} child and this radiograph is {sex_norm.value}",
            history.source,
        )
    visits = list(history.visits)
    notes: list[str] = []
    if history.skipped:
        notes.append(f"{history.skipped} row(s) of the history without a bone age were skipped")
    if current is None:
        return FollowUp(
            history=history.source,
            visits=visits,
            warnings=notes,
            not_available="no bone age velocity: this visit has no chronological age",
        )
    _check_order(visits[-1], current, history.source)
    visits.append(current)
    intervals = [_interval(a, b) for a, b in zip(visits, visits[1:], strict=False)]
    for step in intervals:
        if step.years < 0.5:
            notes.append(
                f"{step.from_visit} to {step.to_visit}: interval under 6 months, the velocity is dominated "
                "by the uncertainty of the two bone ages"
            )
        if step.backwards:
            notes.append(
                f"bone age went backwards from {step.from_visit} to {step.to_visit}: "
                f"{step.bone_age_change_months:+.1f} months, more than the combined uncertainty "
                f"(+/- {step.combined_uncertainty_months:.1f}); check the radiographs (positioning, hand, "
                "exposure) and any change of calibration"
            )
    labels = {v.calibration for v in visits}
    if len(labels) > 1:
        notes.append(
            "visits were read with different calibrations ("
            + ", ".join(sorted(str(x) if x else "uncalibrated" for x in labels))
            + "): compare them with care"
        )
    overall = _interval(visits[0], visits[-1]) if len(visits) > 2 else None
    return FollowUp(
        history=history.source, visits=visits, intervals=intervals, overall=overall, warnings=notes
    )


# ---- calibration to a site ---------------------------------------------------------------------------------
class SexCorrection(BaseModel):
    """One sex's line and what cross-validation said about it."""

    n: int
    intercept: float = 0.0
    slope: float = 1.0
    applied: bool = False
    mae_before_months: float
    mae_after_months: float
    bias_before_months: float
    bias_after_months: float
    mae_gain_months: float
    mae_gain_ci_low_months: float
    reason: str = ""


class Calibration(BaseModel):
    """A site's per-sex correction of the model's bone age, with the evidence that it helps.

    Written by ``boneage calibrate`` (only when it helps) and read by ``--calibration``. Applied inside
    ``assess_image`` so every front end (CLI, web, DICOM node) gives the corrected value, and says so.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["boneage-calibration"] = CALIBRATION_KIND
    version: Literal[1] = CALIBRATION_VERSION
    created: str
    boneage_version: str = __version__
    model: dict[str, Any]
    tta: bool
    labels: str
    cases: int
    folds: int = CALIBRATION_FOLDS
    method: str = CALIBRATION_METHOD
    female: SexCorrection
    male: SexCorrection
    name: str | None = Field(default=None, exclude=True)  # the file it was read from (not stored in it)

    @property
    def helps(self) -> bool:
        return self.female.applied or self.male.applied

    def correction(self, sex: str) -> SexCorrection:
        return self.male if _sex(sex) is Sex.MALE else self.female

    def apply(self, sex: str, months: float) -> float:
        """Corrected bone age for this sex (unchanged where the correction did not help)."""
        c = self.correction(sex)
        return c.intercept + c.slope * float(months) if c.applied else float(months)

    def describe(self) -> str:
        return f"calibrated with {self.name or 'a site calibration'} ({self.cases} cases)"

    def check_model(self, info: Mapping[str, Any], source: str | Path | None = None) -> None:
        """Refuse a calibration fitted for another model: its line would correct the wrong errors."""
        mine = {k: self.model.get(k) for k in _MODEL_KEYS}
        theirs = {k: info.get(k) for k in _MODEL_KEYS}
        if mine != theirs:
            differ = ", ".join(
                f"{k} {mine[k]!r} vs {theirs[k]!r}" for k in _MODEL_KEYS if mine[k] != theirs[k]
            )
            raise BoneAgeInputError(
                f"was fitted for another model ({differ}); calibrate again for this one",
                source or self.name,
            )

    def use(
        self, sex: str, months: float, uncertainty: float | None, *, tta: bool | None = None
    ) -> CalibrationUse:
        """The corrected value with everything an output must say about it."""
        c = self.correction(sex)
        corrected = self.apply(sex, months)
        unc = None if uncertainty is None else float(uncertainty) * (abs(c.slope) if c.applied else 1.0)
        notes = []
        if c.applied:
            notes.append(
                f"{self.describe()}: bone age {corrected:.1f} months = {c.intercept:+.2f} + {c.slope:.3f} x "
                f"{float(months):.1f} (uncorrected)"
            )
        else:
            notes.append(
                f"{self.describe()}: no correction for {_sex(sex).value}s (it did not help in "
                f"cross-validation); bone age {float(months):.1f} months is the model's"
            )
        if tta is not None and tta != self.tta:
            notes.append(
                f"calibration was fitted {'with' if self.tta else 'without'} test-time augmentation, this "
                f"prediction is {'with' if tta else 'without'} it"
            )
        return CalibrationUse(
            file=self.name,
            cases=self.cases,
            sex_cases=c.n,
            applied=c.applied,
            intercept=c.intercept,
            slope=c.slope,
            bone_age_months=corrected,
            bone_age_uncalibrated_months=float(months),
            uncertainty_months=unc,
            uncertainty_uncalibrated_months=uncertainty,
            notes=notes,
        )

    def save(self, path: str | Path) -> Path:
        return atomic_write(path, self.model_dump_json(indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise BoneAgeInputError(
                f"cannot read the calibration ({exc.strerror or type(exc).__name__})", p
            ) from None
        except UnicodeDecodeError:
            raise BoneAgeInputError("not a boneage calibration (not UTF-8 JSON)", p) from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BoneAgeInputError(f"not valid JSON (line {exc.lineno}: {exc.msg})", p) from None
        if not isinstance(data, dict) or data.get("kind") != CALIBRATION_KIND:
            raise BoneAgeInputError('not a boneage calibration file (no "kind": "boneage-calibration")', p)
        if data.get("version") != CALIBRATION_VERSION:
            raise BoneAgeInputError(f"calibration format version {data.get('version')!r} is not supported", p)
        try:
            calibration = cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first.get("loc", ())) or "file"
            raise BoneAgeInputError(f"damaged calibration ({where}: {first.get('msg')})", p) from None
        if not calibration.helps:
            raise BoneAgeInputError("this calibration corrects nothing (it did not help for either sex)", p)
        return calibration.model_copy(update={"name": p.name})


class CalibrationUse(BaseModel):
    """What one prediction's output says about its calibration."""

    file: str | None
    cases: int
    sex_cases: int
    applied: bool
    intercept: float
    slope: float
    bone_age_months: float
    bone_age_uncalibrated_months: float
    uncertainty_months: float | None
    uncertainty_uncalibrated_months: float | None
    notes: list[str] = Field(default_factory=list)


def check_calibration_counts(male: Sequence[bool] | np.ndarray, source: str | Path | None = None) -> None:
    """At least ``MIN_CASES_PER_SEX`` labelled radiographs of each sex, checked before any model runs."""
    flags = np.asarray(male, dtype=bool)
    counts = {Sex.FEMALE: int((~flags).sum()), Sex.MALE: int(flags.sum())}
    short = {s: MIN_CASES_PER_SEX - n for s, n in counts.items() if n < MIN_CASES_PER_SEX}
    if short:
        parts = [
            f"{counts[s]} {s.value} ({short[s]} missing)" if s in short else f"{counts[s]} {s.value}"
            for s in (Sex.FEMALE, Sex.MALE)
        ]
        raise BoneAgeInputError(
            f"calibration needs at least {MIN_CASES_PER_SEX} labelled radiographs per sex: "
            + ", ".join(parts),
            source,
        )


def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares intercept and slope of y on x (numpy only: the base install has no scikit-learn)."""
    if len(x) < 2 or float(np.var(x)) == 0.0:
        return float(np.mean(y) - np.mean(x)), 1.0
    slope, intercept = np.polyfit(x, y, 1)
    return float(intercept), float(slope)


def _cross_validated(pred: np.ndarray, ref: np.ndarray, folds: int) -> np.ndarray:
    """Out-of-fold corrected predictions: folds interleaved along the sorted readings, so every fold spans
    the whole age range; deterministic, so the same data always gives the same verdict."""
    order = np.argsort(ref, kind="stable")
    fold = np.empty(len(ref), dtype=int)
    fold[order] = np.arange(len(ref)) % folds
    out = np.empty(len(ref), dtype=float)
    for k in range(folds):
        test = fold == k
        a, b = _line(pred[~test], ref[~test])
        out[test] = a + b * pred[test]
    return out


def _sex_correction(pred: np.ndarray, ref: np.ndarray, folds: int) -> SexCorrection:
    corrected = _cross_validated(pred, ref, folds)
    before, after = np.abs(pred - ref), np.abs(corrected - ref)
    gain = before - after
    se = float(np.std(gain, ddof=1) / math.sqrt(len(gain))) if len(gain) > 1 else float("inf")
    ci_low = float(np.mean(gain)) - 1.96 * se
    intercept, slope = _line(pred, ref)
    applied, reason = ci_low > 0, ""
    if not applied:
        reason = "the cross-validated gain in MAE is not above zero with 95% confidence"
    elif not PLAUSIBLE_SLOPE[0] <= slope <= PLAUSIBLE_SLOPE[1]:
        applied = False
        reason = f"implausible slope {slope:.2f}: check that the labels are bone ages in months"
    return SexCorrection(
        n=len(ref),
        intercept=round(intercept, 4),
        slope=round(slope, 5),
        applied=applied,
        mae_before_months=round(float(before.mean()), 3),
        mae_after_months=round(float(after.mean()), 3),
        bias_before_months=round(float(np.mean(pred - ref)), 3),
        bias_after_months=round(float(np.mean(corrected - ref)), 3),
        mae_gain_months=round(float(np.mean(gain)), 3),
        mae_gain_ci_low_months=round(ci_low, 3),
        reason=reason,
    )


def fit_calibration(
    predicted: Sequence[float] | np.ndarray,
    reference: Sequence[float] | np.ndarray,
    male: Sequence[bool] | np.ndarray,
    *,
    model: Mapping[str, Any],
    tta: bool,
    labels: str,
    folds: int = CALIBRATION_FOLDS,
    source: str | Path | None = None,
) -> Calibration:
    """Fit the per-sex lines and cross-validate them; the result says per sex whether it helps
    (``Calibration.helps``: whether there is anything worth writing)."""
    pred = np.asarray(predicted, dtype=float)
    ref = np.asarray(reference, dtype=float)
    flags = np.asarray(male, dtype=bool)
    if not (len(pred) == len(ref) == len(flags)):
        raise ValueError("predicted, reference and male must have the same length")
    if not (np.all(np.isfinite(pred)) and np.all(np.isfinite(ref))):
        raise BoneAgeInputError("bone ages must be finite numbers", source)
    check_calibration_counts(flags, source)
    per_sex = {
        sex: _sex_correction(pred[mask], ref[mask], folds)
        for sex, mask in (("female", ~flags), ("male", flags))
    }
    return Calibration(
        created=dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        model={k: model.get(k) for k in _MODEL_KEYS},
        tta=tta,
        labels=Path(labels).name,
        cases=len(ref),
        folds=folds,
        **per_sex,
    )


def predict_labelled(
    predictor: Any,
    paths: Iterable[str | Path],
    male: Sequence[bool] | np.ndarray,
    *,
    batch_size: int = 32,
    on_progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """The model's bone age (months) for labelled radiographs, preprocessed and run in batches as
    ``evaluate`` does (no per-image report, no OOD pass): what a calibration is fitted to."""
    files = [Path(p) for p in paths]
    flags = np.asarray(male, dtype=bool)
    out: list[np.ndarray] = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        images = np.stack([predictor.prepare(path)[1] for path in chunk])
        out.append(np.asarray(predictor.predict_arrays(images, flags[start : start + len(chunk)])[0], float))
        if on_progress is not None:
            on_progress(min(start + batch_size, len(files)), len(files))
    return np.concatenate(out) if out else np.zeros(0)


# ---- the export record and the whole work-up ---------------------------------------------------------------
class GrowthExport(BaseModel):
    """The versioned record growth-chart software reads (field names as in the RCPCH growth API:
    ``bone_age`` in decimal years, ``bone_age_type``, ``bone_age_sds``, ``bone_age_centile``, plus the adult
    and target height). ``GrowthExport.model_json_schema()`` documents it; ``schema_version`` changes when a
    field's meaning does."""

    model_config = ConfigDict(frozen=True)

    schema_id: Literal["boneage/growth-export"] = EXPORT_SCHEMA_ID
    schema_version: Literal["1.0"] = EXPORT_SCHEMA_VERSION
    sex: Sex = Field(description="female or male")
    chronological_age: float | None = Field(None, description="decimal years at the radiograph")
    bone_age: float = Field(description="bone age in decimal years (Greulich & Pyle scale)")
    bone_age_type: Literal["greulich-pyle"] = "greulich-pyle"
    bone_age_sds: float | None = Field(
        None, description="(bone age - chronological age) / SD at this age, Brush Foundation reference"
    )
    bone_age_centile: float | None = Field(
        None, description="centile (0-100) of bone_age_sds, normal distribution"
    )
    bone_age_text: str = Field(description="the bone age as read out, with its source")
    bone_age_calibrated: bool = Field(
        False, description="true when a site calibration corrected the bone age"
    )
    bone_age_uncalibrated: float | None = Field(None, description="the model's own bone age in decimal years")
    calibration_file: str | None = None
    height_cm: float | None = Field(None, description="the child's height at the radiograph")
    predicted_adult_height_cm: float | None = None
    predicted_adult_height_range_cm: tuple[float, float] | None = Field(
        None, description="+/- 2 SD of the Bayley-Pinneau validating-sample error at this age"
    )
    predicted_adult_height_error_sd_cm: float | None = None
    predicted_adult_height_method: Literal["bayley-pinneau"] | None = None
    percent_of_mature_height: float | None = None
    bayley_pinneau_column: MaturityColumn | None = None
    predicted_adult_height_note: str | None = Field(None, description="why there is no prediction")
    target_height_cm: float | None = None
    target_height_range_cm: tuple[float, float] | None = None
    target_height_method: Literal["tanner-1970"] | None = None
    bone_age_velocity: float | None = Field(None, description="bone-age months per year since the last visit")
    bone_age_velocity_uncertainty: float | None = None


class GrowthWorkup(BaseModel):
    """Everything this module adds to one result; ``to_dict`` merges into the result's JSON."""

    export: GrowthExport
    adult_height: AdultHeightPrediction | None = None
    target_height: TargetHeight | None = None
    follow_up: FollowUp | None = None
    calibration: CalibrationUse | None = None

    @property
    def trajectory(self) -> list[tuple[float, float, float]]:
        """Earlier visits as (chronological age, bone age, uncertainty) in months, for the SD chart."""
        if self.follow_up is None:
            return []
        return [
            (v.chronological_age_months, v.bone_age_months, v.uncertainty_months)
            for v in self.follow_up.visits
            if not v.current
        ]

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"growth": self.export.model_dump(mode="json")}
        for key in ("adult_height", "target_height", "follow_up", "calibration"):
            value = getattr(self, key)
            if value is not None:
                data[key] = value.model_dump(mode="json")
        if self.calibration is not None:
            data["bone_age_uncalibrated_months"] = round(self.calibration.bone_age_uncalibrated_months, 2)
        return data

    def lines(self) -> list[str]:
        """The work-up as short plain-text lines (CLI output), each with its method."""
        out: list[str] = []
        if self.adult_height is not None:
            a = self.adult_height
            if a.predicted_adult_height_cm is None:
                out.append(f"adult height (Bayley-Pinneau): {a.not_available}")
            else:
                err = (
                    f", published error SD {a.predicted_adult_height_error_sd_cm:.1f} cm (+/- 2 SD "
                    f"{a.predicted_adult_height_range_cm[0]:.1f}-{a.predicted_adult_height_range_cm[1]:.1f})"
                    if a.predicted_adult_height_range_cm is not None
                    else ", no published error at this age"
                )
                out.append(
                    f"predicted adult height (Bayley-Pinneau, {a.bayley_pinneau_column} table): "
                    f"{a.predicted_adult_height_cm:.1f} cm ({a.percent_of_mature_height:.1f}% of adult "
                    f"height reached at {a.height_cm:.1f} cm){err}"
                )
        if self.target_height is not None:
            t = self.target_height
            out.append(
                f"target height (Tanner mid-parental): {t.target_height_cm:.1f} cm "
                f"(range {t.target_height_range_cm[0]:.1f}-{t.target_height_range_cm[1]:.1f})"
            )
        if self.follow_up is not None:
            f = self.follow_up
            if f.not_available:
                out.append(f"follow-up: {f.not_available}")
            for step in f.intervals:
                out.append(
                    f"bone age velocity {step.from_visit} -> {step.to_visit}: "
                    f"{step.velocity_months_per_year:.1f} +/- "
                    f"{step.velocity_uncertainty_months_per_year:.1f} bone-age months per year "
                    f"over {step.years:.2f} y"
                )
        return out

    def warnings(self) -> list[str]:
        out = list(self.adult_height.notes) if self.adult_height else []
        if self.follow_up is not None:
            out += self.follow_up.warnings
        return out  # the calibration's notes are the assessment's warnings (assess_image puts them there)


def _visit_label(source: str) -> str:
    return Path(source).name or "this visit"


def growth_workup(
    *,
    sex: str,
    bone_age_months: float,
    chronological_age_months: float | None,
    uncertainty_months: float | None,
    sd_score: float | None,
    source: str,
    height_cm: float | None = None,
    mother_height_cm: float | None = None,
    father_height_cm: float | None = None,
    history: History | None = None,
    calibration: CalibrationUse | None = None,
) -> GrowthWorkup:
    """The adult height, target height, follow-up and export for one (already assessed) bone age."""
    sex_norm = _sex(sex)
    height = check_height_cm(height_cm, "height")
    mother = check_height_cm(mother_height_cm, "mother's height", parent=True)
    father = check_height_cm(father_height_cm, "father's height", parent=True)
    if (mother is None) != (father is None):
        raise BoneAgeInputError("the target height needs both the mother's and the father's height")
    adult = (
        None
        if height is None
        else predict_adult_height(
            height,
            sex_norm,
            bone_age_months,
            chronological_age_months,
            bone_age_uncertainty_months=uncertainty_months,
        )
    )
    target = None if mother is None or father is None else target_height(mother, father, sex_norm)
    follow = None
    if history is not None:
        current = (
            None
            if chronological_age_months is None
            else Visit(
                label=_visit_label(source),
                chronological_age_months=chronological_age_months,
                bone_age_months=bone_age_months,
                uncertainty_months=uncertainty_months or 0.0,
                sd_score=sd_score,
                calibration=calibration.file if calibration is not None else None,
                current=True,
            )
        )
        follow = follow_up(history, current, sex_norm)
    latest = follow.latest if follow is not None else None
    text = f"{format_months(bone_age_months)} (Greulich & Pyle scale; boneage model"
    if calibration is not None and calibration.applied:
        text += f", calibrated with {calibration.file} ({calibration.cases} cases)"
    text += ")"
    export = GrowthExport(
        sex=sex_norm,
        chronological_age=_round(
            None if chronological_age_months is None else chronological_age_months / 12, 3
        ),
        bone_age=round(bone_age_months / 12.0, 3),
        bone_age_sds=_round(sd_score, 3),
        bone_age_centile=_round(centile_from_sds(sd_score), 1),
        bone_age_text=text,
        bone_age_calibrated=bool(calibration is not None and calibration.applied),
        bone_age_uncalibrated=(
            None if calibration is None else round(calibration.bone_age_uncalibrated_months / 12.0, 3)
        ),
        calibration_file=None if calibration is None else calibration.file,
        height_cm=None if height is None else round(height, 1),
        predicted_adult_height_cm=None if adult is None else adult.predicted_adult_height_cm,
        predicted_adult_height_range_cm=None if adult is None else adult.predicted_adult_height_range_cm,
        predicted_adult_height_error_sd_cm=None
        if adult is None
        else adult.predicted_adult_height_error_sd_cm,
        predicted_adult_height_method=(
            "bayley-pinneau" if adult is not None and adult.predicted_adult_height_cm is not None else None
        ),
        percent_of_mature_height=None if adult is None else adult.percent_of_mature_height,
        bayley_pinneau_column=None if adult is None else adult.bayley_pinneau_column,
        predicted_adult_height_note=None if adult is None else adult.not_available,
        target_height_cm=None if target is None else target.target_height_cm,
        target_height_range_cm=None if target is None else target.target_height_range_cm,
        target_height_method=None if target is None else "tanner-1970",
        bone_age_velocity=None if latest is None else latest.velocity_months_per_year,
        bone_age_velocity_uncertainty=None if latest is None else latest.velocity_uncertainty_months_per_year,
    )
    return GrowthWorkup(
        export=export, adult_height=adult, target_height=target, follow_up=follow, calibration=calibration
    )
