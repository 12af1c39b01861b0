"""Read bone-age label CSVs in any of the official RSNA 2017 layouts into one tidy table.

The challenge shipped three different headers (training, validation, test) with different id,
sex and age columns; training and evaluation code should not care which one it got, and a typo in
a 12,000-row CSV should be reported by row and id rather than surface later as a NaN loss.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from enum import Enum
from pathlib import Path

import numpy as np
import pandas as pd

from boneage.errors import BoneAgeInputError

__all__ = ["Sex", "parse_sex", "read_labels", "find_image", "IMAGE_SUFFIXES", "MAX_BONE_AGE_MONTHS"]

#: Image suffixes searched for an id, in order of preference.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")

#: Upper plausibility bound for a bone age (25 years); larger values are data-entry errors.
MAX_BONE_AGE_MONTHS = 300.0

_MAX_LISTED = 10

_TRUE = {"true", "1", "1.0", "t", "yes", "y"}
_FALSE = {"false", "0", "0.0", "f", "no", "n"}
_SEX = {"m": True, "male": True, "f": False, "female": False}


_SEX_WORDS = {"m": "male", "male": "male", "boy": "male", "f": "female", "female": "female", "girl": "female"}
_SEX_FLAGS = {"true": "male", "1": "male", "false": "female", "0": "female"}


class Sex(str, Enum):
    """The child's sex, parsed once where it enters (a form, a flag, a CSV, a DICOM header) and passed on
    as this value: later layers compare it and never parse it again. It is a ``str``: JSON and CSVs
    see ``"female"`` / ``"male"``."""

    FEMALE = "female"
    MALE = "male"

    __str__ = str.__str__
    __format__ = str.__format__

    @property
    def is_male(self) -> bool:
        return self is Sex.MALE


def parse_sex(value: object, source: str | Path | None = None, *, flags: bool = False) -> Sex | None:
    """``Sex`` from the documented spellings (female/male, f/m, girl/boy, any case); ``flags`` also admits
    the texts true/false and 1/0, as in RSNA's ``male`` column, and is for label files only: typed on a form
    or the command line, ``1`` is not an obvious answer. ``None`` when not given, a one-line error when
    unreadable."""
    if isinstance(value, Sex):
        return value
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):  # only code passes a bool (RSNA's `male` column): True is male
        return Sex.MALE if value else Sex.FEMALE
    key = str(value).strip().lower()
    found = _SEX_WORDS.get(key) or (_SEX_FLAGS.get(key) if flags else None)
    if found is None:
        raise BoneAgeInputError(f"sex must be female or male (or f/m), got {value!r}", source)
    return Sex(found)


def _norm(col: str) -> str:
    """Header key: no BOM, no surrounding or repeated whitespace, lower case."""
    return " ".join(str(col).replace("\ufeff", "").split()).lower()


def _listing(items: Sequence[str], limit: int = _MAX_LISTED) -> str:
    """'a, b, c' or 'a, ..., j and 5 more', so messages stay one readable line."""
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown} and {len(items) - limit} more"


def _strip_suffix(image_id: str) -> str:
    lower = image_id.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix) and len(image_id) > len(suffix):
            return image_id[: -len(suffix)]
    return image_id


def _index_images(images_dir: Path) -> dict[str, Path]:
    """Map id -> image file for a whole folder in one directory scan (12k stat calls are slow)."""
    rank = {suffix: i for i, suffix in enumerate(IMAGE_SUFFIXES)}
    best: dict[str, tuple[int, Path]] = {}
    with os.scandir(images_dir) as entries:
        for entry in entries:
            stem, dot, ext = entry.name.rpartition(".")
            if not dot or not stem:
                continue
            r = rank.get("." + ext.lower())
            if r is None or (stem in best and best[stem][0] <= r):
                continue
            if entry.is_file():
                best[stem] = (r, Path(entry.path))
    return {stem: path for stem, (_, path) in best.items()}


def find_image(images_dir: Path, image_id: str) -> Path | None:
    """Path of ``<id>.png`` / ``.jpg`` / ``.jpeg`` / ``.dcm`` in ``images_dir`` (suffix case ignored).

    Exported folders mix ``.PNG`` and ``.png``; returns None when no such file exists.
    """
    images_dir = Path(images_dir)
    image_id = _strip_suffix(str(image_id).strip())
    for suffix in IMAGE_SUFFIXES:  # fast path: the common exact lower-case names
        candidate = images_dir / f"{image_id}{suffix}"
        if candidate.is_file():
            return candidate
    if not images_dir.is_dir():
        return None
    return _index_images(images_dir).get(image_id)


def _find_column(columns: dict[str, str], *names: str) -> str | None:
    for name in names:
        if name in columns:
            return columns[name]
    return None


def _find_age_column(columns: dict[str, str]) -> str | None:
    exact = _find_column(
        columns, "boneage", "bone age (months)", "ground truth bone age (months)", "bone age"
    )
    if exact is not None:
        return exact
    for key, original in columns.items():
        if "bone age" in key or "boneage" in key or "bone_age" in key:
            return original
    return None


def _rows(positions: Iterable[int], ids: pd.Series) -> list[str]:
    """'row N (id X)' with spreadsheet row numbers (header = row 1) for positions into ``ids``."""
    return [f"row {ids.index[i] + 2} (id {ids.iloc[i] or '?'})" for i in positions]


def read_labels(
    csv: str | Path,
    images_dir: str | Path | None = None,
    *,
    require_age: bool = True,
) -> pd.DataFrame:
    """Read an RSNA-style label CSV into columns ``id``, ``boneage``, ``male`` (+ ``path``).

    Accepted headers (case and whitespace ignored): training ``id,boneage,male``; validation
    ``Image ID,male,Bone Age (months)``; test ``Case ID,Sex[,Ground truth bone age (months)]``.
    With ``images_dir`` every id must have an image there and ``path`` holds its absolute path.
    ``require_age=False`` allows a missing bone-age column or empty cells (NaN), e.g. for inference.
    Raises :class:`BoneAgeInputError` naming the offending rows and ids.
    """
    path = Path(csv)
    raw = _read_csv(path)
    columns = {_norm(c): c for c in raw.columns}
    found = ", ".join(repr(str(c).replace("\ufeff", "").strip()) for c in raw.columns)

    id_col = _find_column(columns, "id", "image id", "case id")
    if id_col is None:
        raise BoneAgeInputError(
            f"unknown CSV layout: missing id column ('id', 'Image ID' or 'Case ID'); found columns: {found}",
            path,
        )
    layout = _norm(id_col)
    if layout == "case id":  # test layout: Sex M/F, ground truth optional
        sex_col, sex_name = _find_column(columns, "sex", "male"), "Sex"
        age_name = "Ground truth bone age (months)"
    elif layout == "image id":  # validation layout
        sex_col, sex_name = _find_column(columns, "male", "sex"), "male"
        age_name = "Bone Age (months)"
    else:  # training layout
        sex_col, sex_name = _find_column(columns, "male", "sex"), "male"
        age_name = "boneage"
    age_col = _find_age_column(columns)

    missing = [] if sex_col is not None else [sex_name]
    if age_col is None and (require_age and layout != "case id"):
        missing.append(age_name)
    if missing:
        raise BoneAgeInputError(
            f"missing column(s) {', '.join(repr(m) for m in missing)}; found columns: {found}", path
        )
    if age_col is None and require_age:
        raise BoneAgeInputError(
            f"CSV has no bone-age column (expected {age_name!r}); found columns: {found}; "
            "read it with require_age=False for unlabelled cases",
            path,
        )
    raw = raw[~(raw == "").all(axis=1)]  # ",,," lines that spreadsheets append are not cases
    if raw.empty:
        raise BoneAgeInputError("empty CSV (header but no rows)", path)

    ids = raw[id_col].astype(str).str.strip().map(_strip_suffix)
    _check_ids(ids, path)
    male = _parse_sex_column(raw[sex_col], ids, sex_col, path)
    if age_col is not None:
        boneage = _parse_age_column(raw[age_col], ids, age_col, path, require_age=require_age)
    else:
        boneage = pd.Series(np.nan, index=raw.index, dtype="float64")

    out = pd.DataFrame({"id": ids.astype(object), "boneage": boneage.astype("float64"), "male": male})
    if images_dir is not None:
        out["path"] = _image_paths(out["id"], Path(images_dir), path)
    return out.reset_index(drop=True)


def _read_csv(path: Path) -> pd.DataFrame:
    """Load every cell as text so ids like '0012' and typos survive for precise messages."""
    if not path.exists():
        raise BoneAgeInputError("label file not found", path)
    if path.is_dir():
        raise BoneAgeInputError("is a folder, not a CSV file", path)
    try:
        frame = pd.read_csv(
            path, dtype=str, keep_default_na=False, encoding="utf-8-sig", skipinitialspace=True
        )
    except pd.errors.EmptyDataError as exc:
        raise BoneAgeInputError("empty CSV", path) from exc
    except UnicodeDecodeError as exc:
        raise BoneAgeInputError("not a UTF-8 text CSV file", path) from exc
    except pd.errors.ParserError as exc:
        text = " ".join(str(exc).split())
        raise BoneAgeInputError(f"not a readable CSV ({text[:160]})", path) from exc
    except OSError as exc:
        raise BoneAgeInputError(f"cannot read file ({exc.strerror or exc})", path) from exc
    return frame.fillna("")  # short rows leave NaN even with keep_default_na=False


def _check_ids(ids: pd.Series, path: Path) -> None:
    empty = [label for label, v in ids.items() if v == "" or v.lower() == "nan"]
    if empty:
        rows = [f"row {label + 2}" for label in empty]
        raise BoneAgeInputError(f"missing id in {len(rows)} row(s): {_listing(rows)}", path)
    dup_mask = ids.duplicated(keep=False)
    if dup_mask.any():
        groups = ids[dup_mask].groupby(ids[dup_mask], sort=False).groups
        parts = [f"{key} (rows {', '.join(str(i + 2) for i in idx)})" for key, idx in groups.items()]
        raise BoneAgeInputError(f"duplicate ids: {_listing(parts)}", path)


def _parse_sex_column(values: pd.Series, ids: pd.Series, column: str, path: Path) -> pd.Series:
    is_male_flag = _norm(column) == "male"
    lookup: dict[str, bool] = (
        {**{t: True for t in _TRUE}, **{f: False for f in _FALSE}} if is_male_flag else dict(_SEX)
    )
    text = values.astype(str).str.strip().str.lower()
    parsed = text.map(lookup)
    bad = np.flatnonzero(parsed.isna().to_numpy())
    if bad.size:
        expected = "True/False" if is_male_flag else "M/F"
        details = [
            f"{r} = {values.iloc[i]!r}" if text.iloc[i] else f"{r} is empty"
            for r, i in zip(_rows(bad, ids), bad, strict=True)
        ]
        raise BoneAgeInputError(
            f"sex not recognised in column {str(column).strip()!r} (expected {expected}) in "
            f"{bad.size} row(s): {_listing(details)}",
            path,
        )
    return parsed.astype(bool)


def _parse_age_column(
    values: pd.Series, ids: pd.Series, column: str, path: Path, *, require_age: bool
) -> pd.Series:
    text = values.astype(str).str.strip()
    ages = pd.to_numeric(text, errors="coerce").astype("float64")
    blank = (text == "") | text.str.lower().isin(["nan", "na", "n/a"])
    name = str(column).strip()

    non_numeric = np.flatnonzero((ages.isna() & ~blank).to_numpy())
    if non_numeric.size:
        details = [
            f"{r} = {text.iloc[i]!r}" for r, i in zip(_rows(non_numeric, ids), non_numeric, strict=True)
        ]
        raise BoneAgeInputError(
            f"non-numeric bone age in column {name!r} in {non_numeric.size} row(s): {_listing(details)}", path
        )
    if require_age:
        missing = np.flatnonzero(blank.to_numpy())
        if missing.size:
            raise BoneAgeInputError(
                f"missing bone age in column {name!r} in {missing.size} row(s): "
                f"{_listing(_rows(missing, ids))}",
                path,
            )
    with np.errstate(invalid="ignore"):
        out_of_range = np.flatnonzero(
            (~ages.isna() & ((ages < 0) | (ages > MAX_BONE_AGE_MONTHS) | ~np.isfinite(ages))).to_numpy()
        )
    if out_of_range.size:
        details = [
            f"{r} = {text.iloc[i]}" for r, i in zip(_rows(out_of_range, ids), out_of_range, strict=True)
        ]
        raise BoneAgeInputError(
            f"bone age outside 0-{MAX_BONE_AGE_MONTHS:g} months in column {name!r} in "
            f"{out_of_range.size} row(s): {_listing(details)}",
            path,
        )
    ages[blank] = np.nan
    return ages


def _image_paths(ids: pd.Series, images_dir: Path, path: Path) -> list[str]:
    if not images_dir.is_dir():
        raise BoneAgeInputError(f"image folder not found: {images_dir}", path)
    index = _index_images(images_dir)
    missing = [i for i in ids if i not in index]
    if missing:
        raise BoneAgeInputError(
            f"no image for {len(missing)} id(s) in {images_dir} "
            f"(looked for {'/'.join(IMAGE_SUFFIXES)}): {_listing(missing)}",
            path,
        )
    return [str(index[i].absolute()) for i in ids]
