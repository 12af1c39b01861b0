"""Turn a predicted bone age into what a clinician reads: SD score against Greulich & Pyle, flag, warnings.

The reference is the Brush Foundation table behind the Greulich & Pyle atlas (packaged as
``boneage/reference/brush_foundation_sd.csv``). The SD score follows the convention of that reference:
``z = (bone age - chronological age) / SD(chronological age, sex)``, SD interpolated linearly between
tabulated ages and clamped (with a warning) outside them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np
import pandas as pd

from boneage.data.labels import Sex, parse_sex
from boneage.errors import BoneAgeInputError

__all__ = [
    "FLAG_WITHHELD",
    "MAX_AGE_MONTHS",
    "REFERENCE_CITATION",
    "TRAINING_RANGE_MONTHS",
    "Assessment",
    "assess",
    "format_months",
    "normalize_sex",
    "parse_age",
    "reference_range",
    "reference_sd",
    "sd_score",
    "sd_table",
]

REFERENCE_CITATION = (
    "Greulich WW, Pyle SI. Radiographic Atlas of Skeletal Development of the Hand and Wrist, 2nd ed. "
    "Stanford University Press, 1959 (Brush Foundation Study). Mean and SD values: transcription found "
    "in public code, not read off the atlas itself."
)

#: Ages beyond 20 years are not paediatric bone ages; reject them as typos rather than extrapolate.
MAX_AGE_MONTHS = 240.0
#: Bone ages the model saw in training (RSNA); outside this its output is extrapolation.
TRAINING_RANGE_MONTHS = (12.0, 228.0)
#: |z| above this is conventionally called advanced / delayed.
FLAG_THRESHOLD_Z = 2.0
#: what reports show instead of the flag when a caution questions the image (issue #43 item 5)
FLAG_WITHHELD = "not shown: the image may not be what the model expects (see the first warning)"


_NUM = r"[-+]?\d+(?:[.,]\d+)?|[-+]?[.,]\d+"
_AGE_RE = re.compile(
    rf"""^\s*
    (?:(?P<years>{_NUM})\s*(?:y|yr|yrs|year|years)\.?)?
    \s*,?\s*
    (?:(?P<months>{_NUM})\s*(?:m|mo|mos|mth|mths|month|months)\.?)?
    \s*$""",
    re.VERBOSE | re.IGNORECASE,
)
_PLAIN_NUMBER_RE = re.compile(rf"^\s*(?:{_NUM})\s*$")


def _to_float(text: str) -> float:
    return float(text.replace(",", "."))


def _check_range(months: float, what: str = "age") -> float:
    if not math.isfinite(months) or months < 0 or months > MAX_AGE_MONTHS:
        raise BoneAgeInputError(
            f"{what} out of range (0 to {MAX_AGE_MONTHS:.0f} months, i.e. 0 to 20 y): got {months:g} months"
        )
    return float(months)


def parse_age(text: str | float | int | None) -> float | None:
    """Read an age as typed by a person, in months, refusing unitless text so 7 and 7 months can't mix.

    Accepts ``"7.5y"``, ``"7y6m"``, ``"7 years 6 months"``, ``"90m"``, ``"90 months"``; numbers passed as
    ``int``/``float`` are months. ``None``, empty text and NaN mean "not given" and return ``None``.
    """
    if text is None:
        return None
    if isinstance(text, bool):
        raise BoneAgeInputError(f"age must be a number of months or text like 7.5y or 90m, got {text!r}")
    if isinstance(text, (int, float, np.integer, np.floating)):
        value = float(text)
        if math.isnan(value):
            return None
        return _check_range(value)
    if not isinstance(text, str):
        raise BoneAgeInputError(f"age must be text like 7.5y or 90m, got {type(text).__name__}")
    stripped = text.strip()
    if not stripped:
        return None
    if stripped.startswith("-"):
        raise BoneAgeInputError(f"age must not be negative, got {stripped!r}")
    if _PLAIN_NUMBER_RE.match(stripped):
        raise BoneAgeInputError("age needs a unit: 7.5y or 90m")
    match = _AGE_RE.match(stripped)
    if match is None or (match.group("years") is None and match.group("months") is None):
        raise BoneAgeInputError(f"cannot read age {stripped!r}: write it like 7.5y, 7y6m or 90m")
    years = _to_float(match.group("years")) if match.group("years") is not None else None
    months = _to_float(match.group("months")) if match.group("months") is not None else None
    if years is not None and months is not None and not 0 <= months < 12:
        raise BoneAgeInputError(f"cannot read age {stripped!r}: the months after years must be 0 to 11")
    total = (years or 0.0) * 12.0 + (months or 0.0)
    return _check_range(total)


def format_months(months: float) -> str:
    """Whole years and months, the way bone ages are read out in clinic (``"10 y 3 m"``)."""
    if not math.isfinite(months):
        raise ValueError(f"cannot format non-finite age {months!r}")
    total = math.floor(abs(months) + 0.5)
    sign = "-" if months < 0 and total > 0 else ""
    return f"{sign}{total // 12} y {total % 12} m"


def normalize_sex(sex: str) -> Sex:
    """The reference table differs by sex: a ``Sex`` passes through, a spelling is parsed (API callers)."""
    found = parse_sex(sex) if isinstance(sex, str) else None
    if found is None:
        raise BoneAgeInputError(f"sex must be female or male, got {sex!r}")
    return found


@lru_cache(maxsize=1)
def _load_table() -> pd.DataFrame:
    source = resources.files("boneage").joinpath("reference", "brush_foundation_sd.csv")
    with source.open("r", encoding="utf-8") as handle:
        table = pd.read_csv(handle, comment="#")
    table["chronological_age_months"] = table["chronological_age_years"] * 12.0
    return table


def sd_table() -> pd.DataFrame:
    """The packaged Brush Foundation table plus `chronological_age_months` (a copy: cache stays intact)."""
    return _load_table().copy()


@lru_cache(maxsize=2)
def _reference_columns(sex: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    table = _load_table()
    rows = table[["chronological_age_months", f"{sex}_mean_bone_age_months", f"{sex}_sd_months"]].dropna()
    ages, means, sds = (rows[col].to_numpy(dtype=float) for col in rows.columns)
    for array in (ages, means, sds):
        array.setflags(write=False)
    return ages, means, sds


def reference_range(sex: str) -> tuple[float, float]:
    """Chronological ages (months) the table covers for this sex; outside it the SD is clamped."""
    ages, _, _ = _reference_columns(normalize_sex(sex))
    return float(ages[0]), float(ages[-1])


def reference_sd(chronological_age_months: float, sex: str) -> tuple[float, float]:
    """(mean bone age, SD) in months at this age, interpolated linearly and clamped at the table ends."""
    ages, means, sds = _reference_columns(normalize_sex(sex))
    age = float(chronological_age_months)
    if not math.isfinite(age):
        raise BoneAgeInputError(f"chronological age must be a finite number of months, got {age!r}")
    return float(np.interp(age, ages, means)), float(np.interp(age, ages, sds))


def sd_score(bone_age_months: float, chronological_age_months: float, sex: str) -> float:
    """How many reference SDs bone age is ahead of (+) or behind (-) chronological age."""
    _, sd = reference_sd(chronological_age_months, sex)
    return (float(bone_age_months) - float(chronological_age_months)) / sd


def _flag(z: float) -> str:
    if z > FLAG_THRESHOLD_Z:
        return "advanced"
    if z < -FLAG_THRESHOLD_Z:
        return "delayed"
    return "normal"


@dataclass
class Assessment:
    """One patient's result, with everything a report needs and nothing it has to recompute."""

    bone_age_months: float
    sex: str
    chronological_age_months: float | None = None
    uncertainty_months: float | None = None
    difference_months: float | None = None
    sd_months: float | None = None
    sd_score: float | None = None
    flag: str | None = None
    warnings: list[str] = field(default_factory=list)
    # issue #43 item 5: the warnings (also first in ``warnings``) that say the image may not be what the model
    # expects (turned, cut up, unstable views ...). With any, the advanced/delayed flag is not a finding:
    # ``flag`` stays None and ``flag_withheld`` says why; the SD score is still given, for the reader to weigh
    cautions: list[str] = field(default_factory=list)
    flag_withheld: str | None = None

    @property
    def flag_text(self) -> str | None:
        """What a report shows for the flag: the flag, or why it is not shown; None without an SD score."""
        return self.flag or self.flag_withheld

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only, plus the human-readable texts and citation so consumers don't reformat."""
        data: dict[str, Any] = asdict(self)
        for key, value in data.items():
            if isinstance(value, (float, np.floating)):
                data[key] = float(value) if math.isfinite(value) else None
        data["warnings"] = [str(w) for w in self.warnings]
        data["cautions"] = [str(w) for w in self.cautions]
        data["bone_age_years"] = round(self.bone_age_months / 12.0, 2)
        data["bone_age_text"] = format_months(self.bone_age_months)
        data["chronological_age_text"] = (
            format_months(self.chronological_age_months)
            if self.chronological_age_months is not None
            else None
        )
        data["reference"] = REFERENCE_CITATION
        return data


def _finite(value: float, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise BoneAgeInputError(f"{what} must be a number, got {value!r}") from exc
    if not math.isfinite(number):
        raise BoneAgeInputError(f"{what} must be a finite number, got {value!r}")
    return number


def assess(
    bone_age_months: float,
    sex: str,
    chronological_age_months: float | None = None,
    *,
    uncertainty_months: float | None = None,
    warnings: Iterable[str] = (),
    training_range: tuple[float, float] | None = None,
    cautions: Iterable[str] = (),
) -> Assessment:
    """Compare a predicted bone age with the reference and collect every caveat the reader must see.
    ``training_range``: the bone ages the model was trained on (its bundle records them). ``cautions``: the
    warnings saying the image may not be what the model expects (``Prediction.cautions``); they lead the
    warnings, and with any the advanced/delayed flag is withheld (a caveat under a confident label is a
    footnote nobody reads)."""
    sex_norm = normalize_sex(sex)
    bone = _finite(bone_age_months, "bone age")
    doubts = list(dict.fromkeys(str(w) for w in cautions))
    notes = [*doubts, *(str(w) for w in warnings if str(w) not in doubts)]
    lo, hi = training_range or TRAINING_RANGE_MONTHS
    if bone < lo or bone > hi:
        notes.append(f"prediction outside the range the model was trained on ({lo:.0f}–{hi:.0f} months)")

    uncertainty = None
    if uncertainty_months is not None:
        uncertainty = _finite(uncertainty_months, "uncertainty")
        if uncertainty < 0:
            raise BoneAgeInputError(f"uncertainty must not be negative, got {uncertainty:g} months")

    result = Assessment(
        bone_age_months=bone, sex=sex_norm, uncertainty_months=uncertainty, warnings=notes, cautions=doubts
    )
    if chronological_age_months is None:
        return result

    chron = _check_range(_finite(chronological_age_months, "chronological age"), "chronological age")
    result.chronological_age_months = chron
    result.difference_months = bone - chron
    first, last = reference_range(sex_norm)
    if chron < first or chron > last:  # no SD to divide by: an SD score there would be invented
        notes.append(
            f"no SD score: chronological age {format_months(chron)} is outside the Greulich & Pyle reference "
            f"table for {sex_norm}s ({format_months(first)} to {format_months(last)})"
        )
        return result
    _, sd = reference_sd(chron, sex_norm)
    z = (bone - chron) / sd
    result.sd_months = sd
    result.sd_score = z
    if doubts:
        result.flag_withheld = FLAG_WITHHELD
    else:
        result.flag = _flag(z)
    return result
