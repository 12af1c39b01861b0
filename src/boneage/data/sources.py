"""Data sources: RSNA bone age, and for pretraining NIH ChestX-ray14 (age from chest films) and MURA.

Each reader turns a dataset, as its publisher distributes it, into the tidy table the bone-age pipeline
already trains on (``id``, ``boneage``, ``male``, ``path`` plus source columns), so the same model, sex branch
and ``train()`` run unchanged: ``data.source: nih`` predicts age in months (Patient Age × 12) from a chest
film; ``data.source: mura`` puts the study's 0/1 label in ``boneage`` for ``model.task: classification``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from boneage.config import DataConfig
from boneage.errors import BoneAgeInputError

log = logging.getLogger(__name__)

__all__ = [
    "SOURCES",
    "read_nih",
    "nih_image_index",
    "read_mura",
    "read_source",
    "group_split",
    "torchxrayvision_nih_metadata",
]

SOURCES = ("rsna", "nih", "mura")

NIH_COLUMNS = (
    "Image Index",
    "Finding Labels",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
)

#: MURA does not record sex: the sex input gets the value halfway between female (0) and male (1)
UNKNOWN_SEX = 0.5

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([YMD]?)\s*$", re.IGNORECASE)
_AGE_UNIT_YEARS = {"": 1.0, "y": 1.0, "m": 1 / 12, "d": 1 / 365.25}


def _listing(items: Iterable[str], limit: int = 10) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown} and {len(items) - limit} more"


def _read_table(path: Path, **kwargs: object) -> pd.DataFrame:
    if not path.is_file():
        raise BoneAgeInputError("file not found", path)
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, **kwargs)  # type: ignore[arg-type]
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as exc:
        text = " ".join(str(exc).split())
        raise BoneAgeInputError(f"not a readable CSV ({text[:160]})", path) from None


# ---- NIH ChestX-ray14 ------------------------------------------------------------------------------------


def torchxrayvision_nih_metadata() -> Path | None:
    """``Data_Entry_2017_v2020.csv.gz`` as shipped inside an installed torchxrayvision (found without
    importing it), or None. The real NIH metadata for tests and statistics; the images are not in it."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "data" / "Data_Entry_2017_v2020.csv.gz"
        if path.is_file():
            return path
    return None


def nih_image_index(root: str | Path) -> dict[str, Path]:
    """Image file name → path for NIH images as unpacked: ``root/images_001/images/*.png`` …
    ``images_012``, also ``root/images/*.png`` and ``root/*.png`` (one directory scan per folder)."""
    root = Path(root)
    if not root.is_dir():
        raise BoneAgeInputError("NIH image folder not found", root)
    folders = [root, root / "images"]
    with os.scandir(root) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.is_dir() and entry.name.lower().startswith("images_"):
                folders += [Path(entry.path) / "images", Path(entry.path)]
    index: dict[str, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.lower().endswith(".png") and entry.name not in index and entry.is_file():
                    index[entry.name] = Path(entry.path)
    return index


def _parse_nih_ages(values: pd.Series, ids: pd.Series, path: Path) -> np.ndarray:
    """Whole years as in the 2017/2020 files; also "058Y", "006M", "020D" as some mirrors write them."""
    years = pd.to_numeric(values.str.strip(), errors="coerce").to_numpy(dtype=float, copy=True)
    bad: list[str] = []
    for i in np.flatnonzero(np.isnan(years) | (years < 0)):
        text = str(values.iloc[i])
        m = _AGE.match(text)
        if m:
            years[i] = float(m.group(1)) * _AGE_UNIT_YEARS[m.group(2).lower()]
        else:
            bad.append(f"row {i + 2} ({ids.iloc[i]}) = {text!r}")
    if bad:
        raise BoneAgeInputError(
            f"Patient Age not a number of years in {len(bad)} row(s): {_listing(bad)}", path
        )
    return years


def read_nih(
    csv: str | Path,
    images_dir: str | Path | None = None,
    *,
    age_years: list[float] | tuple[float, float] | None = None,
    views: Iterable[str] | None = None,
    findings: Iterable[str] | None = None,
) -> pd.DataFrame:
    """NIH ChestX-ray14 ``Data_Entry_2017.csv`` (also the ``_v2020`` file, plain or .gz) → tidy table.

    Columns: ``id`` (image name without .png), ``boneage`` (age in months = Patient Age × 12), ``male``,
    ``path`` ("" without ``images_dir``), ``patient``, ``age_years``, ``view``, ``findings``, ``follow_up``.
    Filters: ``age_years=[lo, hi]`` keeps lo ≤ age ≤ hi years; ``views`` e.g. ``["PA"]``; ``findings`` keeps
    images with any of these labels, e.g. ``["No Finding"]``. With ``images_dir``, rows whose image is not
    there are dropped with a warning (the set comes as 12 archives; part of it is still usable); none found
    is an error.
    """
    path = Path(csv)
    raw = _read_table(path)
    raw.columns = [str(c).replace("\ufeff", "").strip() for c in raw.columns]
    missing = [c for c in NIH_COLUMNS if c not in raw.columns]
    if missing:
        raise BoneAgeInputError(
            f"not NIH ChestX-ray14 metadata: missing column(s) {', '.join(map(repr, missing))}; "
            f"found {', '.join(map(repr, raw.columns[:12]))}",
            path,
        )
    names = raw["Image Index"].str.strip()
    sex = raw["Patient Gender"].str.strip().str.upper()
    bad_sex = np.flatnonzero(~sex.isin(["M", "F"]).to_numpy())
    if bad_sex.size:
        rows = [f"row {i + 2} ({names.iloc[i]}) = {raw['Patient Gender'].iloc[i]!r}" for i in bad_sex]
        raise BoneAgeInputError(f"Patient Gender not M/F in {len(rows)} row(s): {_listing(rows)}", path)
    years = _parse_nih_ages(raw["Patient Age"], names, path)
    table = pd.DataFrame(
        {
            "id": names.str.replace(r"\.png$", "", regex=True, flags=re.IGNORECASE).astype(object),
            "boneage": years * 12.0,
            "male": (sex == "M").to_numpy(),
            "path": "",
            "patient": raw["Patient ID"].str.strip().astype(object),
            "age_years": years,
            "view": raw["View Position"].str.strip().str.upper().astype(object),
            "findings": raw["Finding Labels"].str.strip().astype(object),
            "follow_up": pd.to_numeric(
                raw.get("Follow-up #", pd.Series("", index=raw.index)), errors="coerce"
            ),
            "file": names.astype(object),
        }
    )
    keep = np.ones(len(table), dtype=bool)
    if age_years:
        if len(age_years) != 2 or float(age_years[0]) > float(age_years[1]):
            raise BoneAgeInputError(f"age_years must be [min, max] in years, got {list(age_years)!r}")
        lo, hi = float(age_years[0]), float(age_years[1])
        keep &= ((table["age_years"] >= lo) & (table["age_years"] <= hi)).to_numpy()
    view_set = {v.strip().upper() for v in views or []}
    if view_set:
        keep &= table["view"].isin(view_set).to_numpy()
    finding_set = sorted({f.strip().lower() for f in findings or [] if f.strip()})
    if finding_set:  # any of the image's |-separated labels
        pattern = r"(?:^|\|)\s*(?:" + "|".join(map(re.escape, finding_set)) + r")\s*(?:\||$)"
        keep &= table["findings"].str.lower().str.contains(pattern, regex=True).to_numpy(dtype=bool)
    table = table[keep].reset_index(drop=True)
    if images_dir is not None and len(table):
        index = nih_image_index(images_dir)
        found = table["file"].map(lambda name: str(index[name].absolute()) if name in index else "")
        absent = int((found == "").sum())
        if absent == len(table):
            raise BoneAgeInputError(
                f"none of the {len(table)} selected NIH images is here (expected images_001/images/*.png …)",
                images_dir,
            )
        if absent:
            log.warning(
                "%d of %d selected NIH images are not under %s; using the rest",
                absent,
                len(table),
                images_dir,
            )
        table["path"] = found
        table = table[found != ""].reset_index(drop=True)
    return table.drop(columns=["file"])


# ---- MURA ------------------------------------------------------------------------------------------------


def _mura_root(csv: Path, root: str | Path | None) -> Path:
    """The folder the CSV's ``MURA-v1.1/...`` paths are relative to: given, or the CSV folder's parent."""
    return Path(root) if root else csv.resolve().parent.parent


def read_mura(
    csv: str | Path,
    root: str | Path | None = None,
    *,
    body_parts: Iterable[str] | None = None,
    studies_csv: str | Path | None = None,
    check_images: bool = True,
) -> pd.DataFrame:
    """MURA ``MURA-v1.1/{train,valid}_image_paths.csv`` (+ ``*_labeled_studies.csv``) → tidy table.

    Columns: ``id``, ``boneage`` (the study's label, 1 = abnormal, as float: the pipeline's target column),
    ``male`` (0.5: MURA records no sex), ``path``, ``patient``, ``study``, ``body_part`` (e.g. XR_HAND),
    ``abnormal``, ``split``. Labels come from the labeled-studies CSV beside the paths CSV (or
    ``studies_csv``); without one, from the study folder's ``_positive``/``_negative`` suffix. Paths are
    resolved against ``root``, by default the folder holding ``MURA-v1.1``. ``body_parts`` keeps e.g.
    ``["XR_HAND", "WRIST"]``.
    """
    path = Path(csv)
    raw = _read_table(path, header=None)
    if raw.empty:
        raise BoneAgeInputError("empty MURA path list", path)
    rels = raw.iloc[:, 0].str.strip().str.replace("\\", "/", regex=False)
    rels = rels[rels.str.lower().str.endswith((".png", ".jpg", ".jpeg"))].reset_index(drop=True)
    if rels.empty:
        raise BoneAgeInputError(
            "no image paths in it (expected MURA-v1.1/train/XR_.../image1.png lines)", path
        )
    parts = rels.str.split("/")
    bad = [r for r, p in zip(rels, parts, strict=True) if len(p) < 5 or not p[-4].upper().startswith("XR_")]
    if bad:
        raise BoneAgeInputError(
            f"{len(bad)} path(s) not in MURA's layout .../<split>/XR_<PART>/<patient>/<study>/<image>: "
            f"{_listing(bad, 3)}",
            path,
        )
    study = parts.map(lambda p: "/".join(p[-5:-1]))
    table = pd.DataFrame(
        {
            "id": parts.map(lambda p: "-".join(p[-5:-1] + [Path(p[-1]).stem])).astype(object),
            "male": UNKNOWN_SEX,
            "path": "",
            "patient": parts.map(lambda p: p[-3]).astype(object),
            "study": study.astype(object),
            "body_part": parts.map(lambda p: p[-4].upper()).astype(object),
            "split": parts.map(lambda p: p[-5]).astype(object),
            "rel": rels,
        }
    )
    labels = _mura_study_labels(path, studies_csv)
    if labels is not None:
        abnormal = table["study"].map(labels)
        unlabelled = table.loc[abnormal.isna(), "study"].unique().tolist()
        if unlabelled:
            raise BoneAgeInputError(
                f"{len(unlabelled)} stud(ies) have images but no label: {_listing(unlabelled, 3)}", path
            )
    else:
        name = table["study"].str.rsplit("/", n=1).str[-1].str.lower()
        abnormal = pd.Series(
            np.select([name.str.endswith("_positive"), name.str.endswith("_negative")], [1, 0], -1)
        )
        if (abnormal < 0).any():
            raise BoneAgeInputError(
                "no labeled-studies CSV beside the path list, and study folders lack _positive/_negative",
                path,
            )
    table["abnormal"] = abnormal.astype(int).to_numpy()
    table["boneage"] = table["abnormal"].astype(float)
    wanted = {b.strip().upper() for b in body_parts or []}
    if wanted:
        wanted |= {f"XR_{b}" for b in wanted if not b.startswith("XR_")}
        table = table[table["body_part"].isin(wanted)].reset_index(drop=True)
    top = _mura_root(path, root)
    table["path"] = [str((top / rel).absolute()) for rel in table["rel"]]
    if check_images:
        absent = [p for p in table["path"] if not Path(p).is_file()]
        if absent:
            raise BoneAgeInputError(f"{len(absent)} MURA image(s) not found: {_listing(absent, 3)}", top)
    columns = ["id", "boneage", "male", "path", "patient", "study", "body_part", "abnormal", "split"]
    return table[columns]


def _mura_study_labels(paths_csv: Path, studies_csv: str | Path | None) -> dict[str, int] | None:
    """``study (split/XR_PART/patient/studyN_x) → 0/1`` from ``*_labeled_studies.csv`` (no header)."""
    if studies_csv is None:
        guess = paths_csv.with_name(paths_csv.name.replace("image_paths", "labeled_studies"))
        if guess == paths_csv or not guess.is_file():
            return None
        studies_csv = guess
    p = Path(studies_csv)
    raw = _read_table(p, header=None)
    if raw.shape[1] < 2:
        raise BoneAgeInputError("expected two columns: study folder, 0/1 label", p)
    out: dict[str, int] = {}
    for i, (folder, label) in enumerate(zip(raw.iloc[:, 0], raw.iloc[:, 1], strict=True)):
        bits = [b for b in str(folder).strip().replace("\\", "/").split("/") if b]
        if len(bits) < 4 or str(label).strip() not in {"0", "1"}:
            if i == 0:  # a header line
                continue
            raise BoneAgeInputError(f"row {i + 1}: expected 'MURA-v1.1/<split>/XR_.../<study>/,0|1'", p)
        out["/".join(bits[-4:])] = int(str(label).strip())
    return out


# ---- any source → the data module ------------------------------------------------------------------------


def read_source(d: DataConfig) -> pd.DataFrame:
    """The tidy table of ``data.source`` with the config's filters (``path`` filled)."""
    source = d.source.strip().lower()
    if source == "rsna":
        from boneage.data.labels import read_labels

        return read_labels(d.labels, d.images)
    if source == "nih":
        return read_nih(d.labels, d.images, age_years=d.age_years, views=d.views, findings=d.findings)
    if source == "mura":
        return read_mura(d.labels, d.images or None, body_parts=d.body_parts)
    raise BoneAgeInputError(f"unknown data.source {d.source!r} ({', '.join(SOURCES)})")


def group_split(
    groups: pd.Series, val_fraction: float = 0.2, seed: int = 42, folds: int = 0, fold: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) row indices with every patient on one side, so follow-up films of a validation
    patient never appear in training."""
    from sklearn.model_selection import GroupKFold, GroupShuffleSplit

    g = groups.astype(str).to_numpy()
    if len(set(g)) < 2:
        raise BoneAgeInputError("need images of at least 2 patients to split into training and validation")
    idx = np.arange(len(g))
    if folds and folds > 1:
        if not 0 <= fold < folds:
            raise BoneAgeInputError(f"fold {fold} is not in 0..{folds - 1}")
        train, val = list(GroupKFold(n_splits=folds).split(idx, groups=g))[fold]
    else:
        splitter = GroupShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
        train, val = next(splitter.split(idx, groups=g))
    return np.sort(train), np.sort(val)
