"""What a shipped model states about itself: a typed, versioned record, validated when the file is read.

The model card, the web page's footer, the HTML report and the API read their figures from here, so a
figure exists once: in the model file, measured when it was made (``boneage.release``). Files written before
this record existed (v0.1 to v0.12.0) kept their facts as one flat, untyped dict; ``ModelFacts.from_record``
maps that layout onto this one, so those files still load.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from boneage.errors import BoneAgeInputError
from boneage.spec import one_line

#: the layout of ``ModelFacts``; bump when a field changes meaning
FACTS_VERSION = 2

LICENCE = "RSNA Pediatric Bone Age data: non-commercial research and education use only"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class Measured(_Strict):
    """The model scored on one named set of radiographs (months; TTA unless the name says otherwise)."""

    images: int = Field(ge=0)
    mae_months: float
    mae_no_tta_months: float | None = None
    rmse_months: float | None = None
    bias_months: float | None = None
    mae_by_sex: dict[str, float] = Field(default_factory=dict)
    mae_by_age_band: dict[str, tuple[int, float]] = Field(default_factory=dict)  # band → (n, MAE)


class OodFacts(_Strict):
    """The refusal checks' thresholds and what they were measured to do (``boneage.ood``)."""

    threshold: float | None = None
    rotation_ratio: float | None = None
    train_images: int | None = None
    calibration_images: int | None = None
    calibration: str | None = None
    orientation_train_images: int | None = None
    texture_stage: int | None = None
    texture_components: int | None = None
    texture_threshold: float | None = None
    texture_copy_recipe: tuple[int, int] | None = None
    texture_note: str | None = None  # why there is no texture density, when there is none
    # what each check flagged: name → (flagged, of how many)
    flagged: dict[str, tuple[int, int]] = Field(default_factory=dict)


class ModelFacts(_Strict):
    """Everything a model file says about the model beside its spec and weights."""

    facts_version: int = FACTS_VERSION
    model_version: str = "unversioned"
    created: str | None = None
    git_commit: str | None = None
    source_checkpoint: str | None = None
    licence: str | None = None
    trained_on: str | None = None
    train_images: int | None = None
    training_range_months: tuple[float, float] | None = None
    # the "unlike a hand" warning: views disagreeing more than this (months)
    tta_spread_p99_months: float | None = None
    validation_split: Measured | None = None  # training ids that chose the checkpoint
    heldout_training_geometry: Measured | None = None  # never-trained ids, as the training copies
    heldout_native: Measured | None = None  # the same ids as a clinic's files, through the predict path
    geometry_mean_abs_difference_months: float | None = None
    ood: OodFacts | None = None
    averaged_from: list[dict[str, Any]] | None = None  # a weight average: of which models
    batchnorm: dict[str, Any] | None = None  # how an average's BatchNorm statistics were made
    converted_from: str | None = None
    # facts of an older file that this version does not interpret (kept, shown nowhere)
    legacy: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def parse(cls, data: dict[str, Any], source: object = None) -> ModelFacts:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise BoneAgeInputError(f"invalid model facts ({one_line(exc)})", source) from None

    @classmethod
    def from_record(cls, meta: dict[str, Any], source: object = None) -> ModelFacts:
        """The facts of a model file's metadata in either layout (``facts`` record, or v0.1–v0.12 flat)."""
        if "facts" in meta:
            if not isinstance(meta["facts"], dict):
                raise BoneAgeInputError("invalid model facts (not a record)", source)
            return cls.parse(meta["facts"], source)
        return cls.parse(_from_flat({k: v for k, v in meta.items() if k not in {"spec", "config"}}), source)

    def headline(self) -> dict[str, Any] | None:
        """The one accuracy figure to quote beside the model (page footer, report, README): the held-out
        clinic files first, as a clinic's radiographs reach the model."""
        for measured, what in (
            (self.heldout_native, "held-out radiographs in their own aspect ratio"),
            (self.heldout_training_geometry, "held-out radiographs as training copies"),
            (self.validation_split, "the validation split"),
        ):
            if measured is not None:
                return {"mae_months": measured.mae_months, "images": measured.images, "on": what}
        return None

    def public(self) -> dict[str, Any]:
        """JSON for anyone (API, report): no file paths, no unknown legacy fields."""
        return self.model_dump(mode="json", exclude_none=True, exclude={"legacy"})


# ---- the flat layout of v0.1–v0.12.0 files ----------------------------------------------------------------
_MEASURED = {  # flat prefix → (field, key suffix → Measured field)
    "heldout_training_geometry": ("validation_images", "val_"),
    "heldout_native": ("native_images", "native_"),
}
_OOD_FLAGGED = {
    "ood_flagged_val_split": "val_split",
    "ood_flagged_calibration_train": "calibration_train",
    "ood_flagged_train_geometry": "heldout_training_geometry",
    "ood_flagged_native_pooled": "heldout_native_pooled",
    "ood_flagged_native_texture": "heldout_native_texture",
    "ood_flagged_native": "heldout_native",
    "ood_texture_flagged_val_split": "texture_val_split",
    "ood_texture_flagged_calibration_train": "texture_calibration_train",
    "orientation_val_upright_flagged": "orientation_val_upright",
    "orientation_val_upright_flagged_probe_alone": "orientation_val_upright_probe_alone",
    "orientation_val_turned_detected_at_least": "orientation_val_turned_detected_at_least",
}
_OOD_PLAIN = {
    "ood_threshold": "threshold",
    "ood_rotation_ratio": "rotation_ratio",
    "ood_train_images": "train_images",
    "ood_calibration_images": "calibration_images",
    "ood_calibration": "calibration",
    "orientation_train_images": "orientation_train_images",
    "ood_texture_stage": "texture_stage",
    "ood_texture_components": "texture_components",
    "ood_texture_threshold": "texture_threshold",
    "ood_texture_copy_recipe": "texture_copy_recipe",
    "ood_texture": "texture_note",
}
_PLAIN = (
    "created",
    "git_commit",
    "source_checkpoint",
    "licence",
    "trained_on",
    "train_images",
    "training_range_months",
    "tta_spread_p99_months",
    "geometry_mean_abs_difference_months",
    "averaged_from",
    "batchnorm",
    "converted_from",
)
# the spec says these; the flat layout repeated them
_FROM_SPEC = {"backbone", "input_size", "geometry"}


def _from_flat(flat: dict[str, Any]) -> dict[str, Any]:
    left = dict(flat)
    out: dict[str, Any] = {"facts_version": FACTS_VERSION}
    if "version" in left:
        out["model_version"] = str(left.pop("version"))
    for key in _PLAIN:
        if key in left:
            out[key] = left.pop(key)
    for field, (count_key, prefix) in _MEASURED.items():
        if f"{prefix}mae_months" in left and count_key in left:
            measured: dict[str, Any] = {
                "images": left.pop(count_key),
                "mae_months": left.pop(f"{prefix}mae_months"),
            }
            for suffix in (
                "mae_no_tta_months",
                "rmse_months",
                "bias_months",
                "mae_by_sex",
                "mae_by_age_band",
            ):
                if f"{prefix}{suffix}" in left:
                    measured[suffix] = left.pop(f"{prefix}{suffix}")
            out[field] = measured
    if "val_split_mae_months" in left and "val_split_images" in left:
        out["validation_split"] = {
            "images": left.pop("val_split_images"),
            "mae_months": left.pop("val_split_mae_months"),
        }
    ood: dict[str, Any] = {}
    for key, name in _OOD_PLAIN.items():
        if key in left:
            ood[name] = left.pop(key)
    flagged = {name: left.pop(key) for key, name in _OOD_FLAGGED.items() if key in left}
    if flagged:
        ood["flagged"] = flagged
    if ood:
        out["ood"] = ood
    for key in _FROM_SPEC:
        left.pop(key, None)
    if left:
        out["legacy"] = left
    return out
