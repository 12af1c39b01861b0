"""How a model is trained: the run config, read from YAML, overridable with ``key=value``, validated on load.

Sections ``data``, ``augment``, ``train``, ``finetune`` and ``trainer`` say how to train; ``model`` and
``preprocess`` say what to build (they become the ``ModelSpec`` the checkpoint carries, see ``boneage.spec``).
Every section is a typed pydantic model with unknown keys forbidden and allowed values spelled out, so a typo
fails when the file is read, in one line naming the key, the value and the choices. The resolved config is
stored in every run folder: the run can be repeated from it alone.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from boneage.errors import BoneAgeInputError
from boneage.spec import ModelSpec, PreprocessSpec, check_age_bins

log = logging.getLogger(__name__)

#: architecture presets for ``model.preset``; explicit fields in the file or ``--set`` win over them
PRESETS: dict[str, dict[str, Any]] = {
    # 16BitNet as in the 2018 talk: Inception V3 + dense(32) sex input, dense 1000-1000-1 head
    "16bitnet": {"backbone": "inception_v3", "head": [1000, 1000], "sex_units": 32, "dropout": 0.0},
    "effnet-lite0": {"backbone": "tf_efficientnet_lite0", "head": [512], "sex_units": 32, "dropout": 0.2},
    "effnet-lite1": {"backbone": "tf_efficientnet_lite1", "head": [512], "sex_units": 32, "dropout": 0.2},
    "effnet-lite2": {"backbone": "tf_efficientnet_lite2", "head": [512], "sex_units": 32, "dropout": 0.2},
    "mobilenetv2": {"backbone": "mobilenetv2_100", "head": [512], "sex_units": 32, "dropout": 0.2},
}


class Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        validate_assignment=True,
        allow_inf_nan=False,
        coerce_numbers_to_str=True,
        protected_namespaces=(),
    )


PreprocessConfig = PreprocessSpec  # the run config's preprocess section is the spec's, field for field


class DataConfig(Section):
    images: str = "../shared/data/rsna-bone-age-sample/images"
    labels: str = "../shared/data/rsna-bone-age-sample/labels.csv"
    val_fraction: float = Field(0.2, ge=0, lt=1)  # the talk's 4:1 split
    seed: int = 42
    folds: int = Field(0, ge=0)  # k > 1: k-fold, `fold` picks the validation fold; 0: one stratified split
    fold: int = Field(0, ge=0)
    limit: int = Field(0, ge=0)  # use only the first N labelled images (0: all); for smoke runs
    # a CSV whose ids are never trained on nor used to pick an epoch: they are taken out of `labels` before
    # the train/validation split and, with holdout_monitor, scored each epoch as holdout_mae (a record only)
    holdout_labels: str = ""
    holdout_monitor: bool = True
    # the holdout ids ARE the validation set (they pick best.ckpt, logged as val_mae); every other id trains
    # and val_fraction/folds are not used. Needs holdout_labels
    val_from_holdout: bool = False
    # train on N of the training images (0: all): stratified by sex and age band, seeded by `seed`, nested
    # (with one seed, the 500 images of train_limit=500 are among the 2,000 of train_limit=2000)
    train_limit: int = Field(0, ge=0)
    # images drawn per training epoch (0: one pass over the training set); more than the set repeats it,
    # reshuffled each pass, so runs on subsets of different sizes get the same steps and validations
    epoch_images: int = Field(0, ge=0)
    # data.images are copies of the original radiographs saved as JPEG at this quality (0: originals, or
    # lossless). The shared 299 px set: 60 (its README). A bundle's OOD texture check remakes a clinic's
    # file the same way (squashed to preprocess.squash_size, this JPEG quality) before judging it
    copy_jpeg_quality: int = Field(0, ge=0, le=100)
    cache_dir: str = ".cache/boneage"  # preprocessed images are stored here, keyed by the preprocess settings
    num_workers: int = Field(2, ge=0)
    # shard cache (boneage.data.shards): compact checksummed shards that hold the labels too
    cache: str = ""  # PATH of a shard cache to train from alone (built there from images/labels if missing)
    # one cache: shards (boneage.data.shards). "npy" (the removed per-image .npy cache) reads as "shards", raw
    cache_format: Literal["shards"] = "shards"
    shard_format: Literal["jpeg", "png", "raw"] = "raw"  # for caches built here (raw: lossless, fastest)
    shard_quality: int = Field(95, ge=1, le=100)
    decode: Literal["auto", "device", "worker"] = "auto"  # shard images: auto = nvJPEG on a CUDA device
    cache_verify: bool = True  # check every shard's sha256 when training loads a shard cache
    # rsna: labels = RSNA CSV, images = its folder. nih: labels = Data_Entry_2017.csv, images = the folder
    # holding images_001/images/ ... images_012/images/. mura: labels = MURA-v1.1/train_image_paths.csv,
    # images = the folder holding MURA-v1.1 (boneage.sources reads both; see docs/experiments.md)
    source: Literal["rsna", "nih", "mura"] = "rsna"
    age_years: list[float] = Field(default_factory=list)  # nih: [min, max] patient age, inclusive; []: all
    views: list[str] = Field(default_factory=list)  # nih: View Position to keep, e.g. [PA]; []: all
    findings: list[str] = Field(default_factory=list)  # nih: keep images with any of these
    body_parts: list[str] = Field(default_factory=list)  # mura: e.g. [XR_HAND, XR_WRIST]; []: all

    @model_validator(mode="before")
    @classmethod
    def _cache_format(cls, values: Any) -> Any:
        """A config saved when the .npy cache existed also wrote that era's ``shard_format: jpeg`` default:
        its images were lossless, so they stay lossless (raw shards), whatever shard_format it states."""
        value = values.get("cache_format") if isinstance(values, dict) else None
        if isinstance(value, str) and value.strip().lower() == "npy":
            log.warning("data.cache_format=npy is deprecated: the .npy cache is gone, using raw shards")
            values = {**values, "cache_format": "shards", "shard_format": "raw"}
        return values


class AugmentConfig(Section):
    enabled: bool = True
    flip: float = Field(0.5, ge=0, le=1)  # probability of a horizontal flip
    shift: float = Field(0.2, ge=0, lt=1)  # fraction of the image size
    rotate: float = Field(20.0, ge=0, le=180)  # degrees
    zoom: float = Field(0.2, ge=0, lt=1)  # scale in [1 - zoom, 1 + zoom]
    gamma: float = Field(0.2, ge=0, lt=1)  # gamma in [1 - gamma, 1 + gamma]
    brightness: float = Field(0.1, ge=0, lt=1)
    contrast: float = Field(0.1, ge=0, lt=1)


class ModelConfig(Section):
    """What to build (it becomes the ModelSpec) and where its first weights come from (``pretrained``)."""

    preset: Literal["", "16bitnet", "effnet-lite0", "effnet-lite1", "effnet-lite2", "mobilenetv2"] = ""
    task: Literal["regression", "classification"] = "regression"
    backbone: str = "tf_efficientnet_lite0"
    pretrained: str = "imagenet"  # imagenet | none | PATH of a checkpoint to initialise from
    sex_units: int = Field(32, ge=1)  # 16BitNet's dense sex branch
    head: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [512])
    dropout: float = Field(0.2, ge=0, lt=1)
    in_chans: int = Field(1, ge=1, le=3)
    # 0: one output, L1 loss | N >= 2: label-distribution head over N ages across age_range (ModelSpec)
    age_bins: int = Field(0, ge=0, le=2000)
    age_range: tuple[float, float] = (0.0, 240.0)

    @model_validator(mode="after")
    def _bins_make_sense(self) -> ModelConfig:
        """The spec's own checks, when the file is read rather than when training starts."""
        check_age_bins(self.age_bins, self.age_range, self.task)
        return self


Optimizer = Literal["adam", "adamw", "sgd"]


class TrainConfig(Section):
    epochs: int = Field(40, ge=1)
    batch_size: int = Field(16, ge=1)
    optimizer: Optimizer = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    schedule: Literal["cosine", "exponential", "constant"] = "cosine"  # decays to final_lr_factor x lr
    final_lr_factor: float = Field(0.01, gt=0, le=1)
    warmup_epochs: float = Field(0.0, ge=0)
    seed: int = 42
    resume: bool = True  # continue from run_dir/last.ckpt when it exists
    # progressive resizing: {first epoch: input size}; training batches are downsized on the fly from the
    # cached preprocess.size images (validation always at preprocess.size); {}: always preprocess.size
    size_schedule: dict[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=32)]] = Field(
        default_factory=dict
    )
    ema_decay: float = Field(0.0, ge=0, lt=1)  # > 0: validate, checkpoint and ship an EMA of the weights
    # model.age_bins > 0: the standard deviation (months) of the Gaussian label distribution each target
    # becomes; the loss is KL(label distribution || softmax) plus L1 of the expected age (DLDL-v2)
    label_sigma: float = Field(6.0, gt=0)


class FinetuneConfig(Section):
    """Layer-wise fine-tuning. Phase 1 (``head_epochs`` > 0) trains the head and sex branch with the backbone
    frozen, using ``head_optimizer`` at ``head_lr``; phase 2 (or the only phase) trains the last ``layers``
    parameterised layers, counted from the output end, with the ``train`` section's optimizer and lr. The LR
    decays to ``train.final_lr_factor`` x over each phase."""

    layers: Annotated[int, Field(ge=1)] | Literal["all"] = "all"
    head_epochs: int = Field(0, ge=0)  # phase 1 length in epochs; 0: a single phase
    head_lr: float = Field(1e-3, gt=0)
    head_optimizer: Optimizer = "adam"

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, value: Any) -> Any:
        text = str(value).strip().lower()
        return int(text) if text.isdigit() else text


class TrainerConfig(Section):
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps", "tpu"] = "auto"
    devices: Any = "auto"
    num_nodes: int = Field(1, ge=1)
    strategy: str = "auto"
    precision: Literal[
        "auto", "32-true", "32", "16-mixed", "bf16-mixed", "bf16-true", "16-true", "64-true"
    ] = "auto"  # auto: bf16-mixed on GPU, 32 on CPU
    log_every_n_steps: int = Field(10, ge=1)
    limit_train_batches: float = Field(1.0, gt=0)
    limit_val_batches: float = Field(1.0, ge=0)
    progress_bar: bool = True
    compile: bool = False  # torch.compile the network (in place: checkpoints keep their keys)


class ShipConfig(Section):
    """A bundled-model candidate's ship rule, written before it trains so the numbers cannot choose it:
    the ``checkpoint`` it offers (``last``: the final epoch, fixed in advance; ``best``: the epoch the
    validation split picked; ``soup``: the weight average ``boneage average`` writes) ships only if its
    6-view TTA MAE on the validation split is at or below ``bar`` (the incumbent's figure measured the same
    way). No bar and no ``paired_with``: the run is not a candidate.

    ``paired_with`` adds a second condition for a candidate close to the incumbent: the incumbent's
    per-image predictions on the same split (the ``preds_val_split.csv`` its own check wrote); the candidate
    ships only if its mean paired difference |error| − |error of the incumbent| is at most ``-paired_se``
    standard errors, so a tie the split cannot resolve no longer passes as a win. With ``paired_with`` and
    no ``bar`` the rule is a go/no-go gate (a line's first stage against its paired control): the paired
    condition alone decides."""

    bar: float | None = Field(None, gt=0)
    checkpoint: Literal["last", "best", "soup"] = "best"
    paired_with: str | None = None
    paired_se: float = Field(1.0, ge=0)


class RunConfig(Section):
    name: str = "run"
    data: DataConfig = Field(default_factory=DataConfig)
    preprocess: PreprocessSpec = Field(default_factory=PreprocessSpec)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    ship: ShipConfig = Field(default_factory=ShipConfig)

    @field_validator("name")
    @classmethod
    def _name_stays_inside_runs(cls, value: str) -> str:
        """The name becomes a folder under runs/: it may nest (grid/variant) but never climb out."""
        path = PurePosixPath(value.replace("\\", "/"))
        if not value.strip() or path.is_absolute() or ".." in path.parts or ":" in value:
            raise ValueError("must be a relative name inside the runs folder (no '..', no absolute path)")
        return value

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="python")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def model_spec(self, target_mean: float = 127.0, target_std: float = 41.0) -> ModelSpec:
        """The spec of the model this run trains (target statistics come from its training split)."""
        from importlib.metadata import PackageNotFoundError, version

        from boneage import __version__

        versions = {"boneage": __version__}
        for package in ("timm", "torch"):
            try:
                versions[package] = version(package).split("+")[0]
            except PackageNotFoundError:  # pragma: no cover - training always has both
                pass
        m = self.model
        return ModelSpec(
            preprocess=self.preprocess.model_copy(),
            backbone=m.backbone,
            in_chans=m.in_chans,
            sex_units=m.sex_units,
            head=list(m.head),
            dropout=m.dropout,
            task=m.task,
            age_bins=m.age_bins,
            age_range=m.age_range,
            target_mean=float(target_mean),
            target_std=max(float(target_std), 1e-3),
            versions=versions,
        )


Config = RunConfig  # the name most code and notebooks know


_TYPE_WORDS = {
    "int_parsing": "must be a number",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "int_type": "must be a whole number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "finite_number": "must be a finite number",
    "string_type": "must be text",
}


def _section_fields(key: str) -> list[str]:
    node: Any = RunConfig
    for part in key.split(".")[:-1]:
        field = node.model_fields.get(part)
        node = field.annotation if field is not None else None
        if not (isinstance(node, type) and issubclass(node, BaseModel)):
            return []
    return list(node.model_fields)


def _config_error(exc: ValidationError, source: object = None) -> BoneAgeInputError:
    """The first problem as one line: the key, the value given, the allowed values or range."""
    err = exc.errors()[0]
    loc = [
        str(p) for p in err["loc"] if not str(p).startswith(("function-", "int", "literal", "constrained"))
    ]
    key = ".".join(p for p in loc if p not in {"union_tag"})
    given = err.get("input")
    kind = err["type"]
    if kind == "extra_forbidden":
        known = ", ".join(_section_fields(key))
        return BoneAgeInputError(f"unknown config key {key!r} (known here: {known})", source)
    if kind in {"model_type", "model_attributes_type"}:
        return BoneAgeInputError(f"config section {key!r} must be a mapping, got {given!r}", source)
    if kind == "literal_error":
        allowed = (err.get("ctx") or {}).get("expected", "")
        return BoneAgeInputError(f"config key {key}={given!r} is not allowed (choose {allowed})", source)
    words = _TYPE_WORDS.get(kind)
    if words is None:
        words = err["msg"][0].lower() + err["msg"][1:]
    if kind.startswith(("int_", "float_")) and isinstance(given, list):
        words = "must be a number"
    return BoneAgeInputError(f"config key {key} {words}, got {given!r}", source)


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """``["train.lr=1e-4", "model.head=[256,64]"]`` → nested dict; values are parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise BoneAgeInputError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        if isinstance(value, str) and _looks_numeric(value):
            value = float(value)  # YAML 1.1 reads 1e-4 as text
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise BoneAgeInputError(f"override {item!r} sets a key inside a value")
            node = child
        node[parts[-1]] = value
    return nested


def _looks_numeric(text: str) -> bool:
    try:
        return math.isfinite(float(text)) and any(c.isdigit() for c in text)
    except ValueError:
        return False


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``, section by section (a new dict; neither input changes)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults ← YAML file ← ``--set`` overrides; presets in ``model.preset`` fill model fields first."""
    data: dict[str, Any] = {}
    p = Path(path) if path is not None else None
    if p is not None:
        if not p.is_file():
            raise BoneAgeInputError("config file not found", p)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise BoneAgeInputError(f"not valid YAML ({str(exc).splitlines()[0]})", p) from None
        if not isinstance(data, dict):
            raise BoneAgeInputError("config must be a mapping of sections", p)
    return build_config(data, overrides, source=p)


def build_config(
    data: dict[str, Any], overrides: list[str] | None = None, *, source: object = None
) -> RunConfig:
    """Defaults ← nested ``data`` (sections as in a YAML file) ← ``key=value`` overrides, presets first."""
    extra = parse_overrides(overrides)
    for layer in (data, extra):
        for name, section in layer.items():
            if name in RunConfig.model_fields and name != "name" and not isinstance(section, dict):
                raise BoneAgeInputError(f"config section {name!r} must be a mapping, got {section!r}", source)
    merged = deep_merge(data, extra)
    model = merged.get("model") or {}
    preset = model.get("preset")
    if preset:
        if preset not in PRESETS:
            raise BoneAgeInputError(f"unknown model preset {preset!r} (known: {', '.join(PRESETS)})", source)
        merged["model"] = {**PRESETS[preset], **model}
    return config_from_dict(merged, source=source)


def config_from_dict(data: dict[str, Any], *, source: object = None) -> RunConfig:
    """Rebuild a resolved config (a run folder's config.yaml): presets are not reapplied."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise _config_error(exc, source) from None
