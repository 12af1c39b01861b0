"""What a model *is*: everything needed to turn a radiograph into the network's input and its output
into months.

A ``ModelSpec`` is the only record a checkpoint or a bundle carries about its model, and the only thing the
predictor, export and the web app read (``boneage.modelfile`` reads it from a file, older layouts too). How
the model was trained (data paths, optimiser, epochs) lives in the run config (``boneage.config``) and never
travels with the weights, so renaming a training option can never break loading a model. It plays the part
timm's ``PretrainedCfg`` plays for timm: small and inference-facing.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from boneage.errors import BoneAgeInputError

#: the ModelSpec layout version; a bundle or checkpoint from another layout is converted by ``from_record``
SPEC_VERSION = 2

# ImageNet statistics of a greyscale image (the mean of the RGB means and stds)
GREY_MEAN, GREY_STD = 0.449, 0.226


class Strict(BaseModel):
    """Unknown keys and values outside the allowed set fail when read, not minutes later."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class PreprocessSpec(Strict):
    """The deterministic radiograph → uint8 square image step, identical in training and inference."""

    size: int = Field(512, ge=32, le=4096)
    crop: bool = True  # find the hand region and drop empty borders and collimator edges
    contrast: Literal["percentile", "clahe", "none"] = "percentile"
    low_percentile: float = Field(0.5, ge=0, le=50)
    high_percentile: float = Field(99.5, ge=50, le=100)
    # letterbox: keep the frame's proportions | squash: resize the whole frame to squash_size² first, as the
    # 299 px RSNA copies were made (a model trained on those must see a clinic's file squashed the same way)
    geometry: Literal["letterbox", "squash"] = "letterbox"
    squash_size: int = Field(299, ge=32, le=4096)
    # axis: turn the hand's long axis upright (second moments of the hand mask) before the crop, a label-free
    # form of the registration in Iglovikov et al.; none: as found
    align: Literal["none", "axis"] = "none"
    # how the crop box becomes the square input. pad: keep the hand's proportions, black bars fill the rest
    # (14% of the input on average on the 299 px copies); stretch: resize the box to the square, so every
    # input pixel is hand region (more pixels across the hand, its proportions changed the same way in
    # training and inference)
    fit: Literal["pad", "stretch"] = "pad"
    # remove: black outside the hand's silhouette (soft tissue kept; markers, labels and collimator light
    # blanked), a label-free form of Iglovikov et al.'s background removal | keep: every pixel of the crop
    background: Literal["keep", "remove"] = "keep"


class ModelSpec(Strict):
    """Preprocessing, network shape, task and target normalisation of one trained model."""

    spec_version: int = SPEC_VERSION
    preprocess: PreprocessSpec = Field(default_factory=PreprocessSpec)
    backbone: str = "tf_efficientnet_lite0"
    in_chans: int = Field(1, ge=1, le=3)
    sex_units: int = Field(32, ge=1)
    head: list[int] = Field(default_factory=lambda: [512])
    dropout: float = Field(0.2, ge=0, lt=1)
    # regression: bone age in months | classification: one logit (e.g. MURA abnormality pretraining)
    task: Literal["regression", "classification"] = "regression"
    # 0: the head outputs one z-score of the age | N >= 2: N logits over ages evenly spaced across
    # age_range (months), trained on Gaussian label distributions (label-distribution learning with
    # expectation regression, DLDL-v2, Gao et al. 2018); the output is the softmax's expected age
    age_bins: int = Field(0, ge=0, le=2000)
    age_range: tuple[float, float] = (0.0, 240.0)
    # the head predicts z-scores of the training targets; these turn them back into months
    target_mean: float = 127.0
    target_std: float = Field(41.0, gt=0)
    pixel_mean: float = GREY_MEAN
    pixel_std: float = Field(GREY_STD, gt=0)
    versions: dict[str, str] = Field(default_factory=dict)  # boneage, timm, torch that trained it

    @model_validator(mode="after")
    def _bins_make_sense(self) -> ModelSpec:
        check_age_bins(self.age_bins, self.age_range, self.task)
        return self

    @classmethod
    def parse(cls, data: dict[str, Any], source: object = None) -> ModelSpec:
        """Validate a stored spec; problems become one readable line naming the source."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise BoneAgeInputError(f"invalid model spec ({one_line(exc)})", source) from None


def check_age_bins(age_bins: int, age_range: tuple[float, float], task: str) -> None:
    """Shared by the spec and the run config's model section, so a bad setting fails when a file is read."""
    if age_bins == 1:
        raise ValueError("age_bins must be 0 (one output) or at least 2")
    if age_bins and task != "regression":
        raise ValueError("age_bins needs task=regression")
    if age_range[1] <= age_range[0]:
        raise ValueError(f"age_range {age_range} must go from low to high")


def one_line(exc: ValidationError) -> str:
    """Pydantic's report as one line per problem, joined: the key, what was given, what is allowed."""
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        given = err.get("input")
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key {key!r}")
            continue
        allowed = (err.get("ctx") or {}).get("expected")
        msg = f"{key}={given!r}: " + (f"expected {allowed}" if allowed else err["msg"])
        parts.append(msg)
    return "; ".join(parts)
