"""One typed config object, read from YAML, overridable with ``key=value``; stored resolved in every run.

A run can be repeated from its folder alone because the resolved config holds every setting that shaped it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from boneage.errors import BoneAgeInputError


@dataclass
class DataConfig:
    images: str = "../shared/data/rsna-bone-age-sample/images"
    labels: str = "../shared/data/rsna-bone-age-sample/labels.csv"
    val_fraction: float = 0.2  # the talk's 4:1 split
    seed: int = 42
    folds: int = 0  # k > 1: k-fold, `fold` picks the validation fold; 0: a single stratified split
    fold: int = 0
    limit: int = 0  # use only the first N labelled images (0: all); for smoke runs
    cache_dir: str = ".cache/boneage"  # preprocessed images are stored here, keyed by the preprocess settings
    num_workers: int = 2
    # shard cache (boneage.cache): compact checksummed shards that hold the labels too
    cache: str = ""  # PATH of a shard cache to train from alone (built there from images/labels if missing)
    cache_format: str = "npy"  # npy: an .npy per image under cache_dir | shards: a shard cache there
    shard_format: str = "jpeg"  # jpeg (compact, GPU-decodable) | png | raw (lossless), for caches built here
    shard_quality: int = 95  # JPEG quality of caches built here
    decode: str = "auto"  # shard images: auto (JPEG on a CUDA device: nvJPEG there) | device | worker
    cache_verify: bool = True  # check every shard's sha256 when training loads a shard cache
    # rsna: labels = RSNA CSV, images = its folder. nih: labels = Data_Entry_2017.csv, images = the folder
    # holding images_001/images/ ... images_012/images/. mura: labels = MURA-v1.1/train_image_paths.csv,
    # images = the folder holding MURA-v1.1 (boneage.pretraining reads both; see docs/experiments.md)
    source: str = "rsna"  # rsna | nih | mura
    age_years: list[float] = field(default_factory=list)  # nih: [min, max] patient age, inclusive; []: all
    views: list[str] = field(default_factory=list)  # nih: View Position to keep, e.g. [PA]; []: all
    findings: list[str] = field(default_factory=list)  # nih: keep images with any of these, e.g. [No Finding]
    body_parts: list[str] = field(default_factory=list)  # mura: e.g. [XR_HAND, XR_WRIST]; []: all


@dataclass
class PreprocessConfig:
    size: int = 512
    crop: bool = True  # find the hand region and drop empty borders and collimator edges
    contrast: str = "percentile"  # percentile | clahe | none
    low_percentile: float = 0.5
    high_percentile: float = 99.5


@dataclass
class AugmentConfig:
    enabled: bool = True
    flip: float = 0.5  # probability of a horizontal flip
    shift: float = 0.2  # fraction of the image size
    rotate: float = 20.0  # degrees
    zoom: float = 0.2  # scale in [1 - zoom, 1 + zoom]
    gamma: float = 0.2  # gamma in [1 - gamma, 1 + gamma]
    brightness: float = 0.1
    contrast: float = 0.1


@dataclass
class ModelConfig:
    preset: str = ""  # 16bitnet | effnet-lite0 | effnet-lite2 | "" (use the fields below)
    task: str = "regression"  # regression: age in months (L1) | classification: one logit (BCE), e.g. MURA
    backbone: str = "tf_efficientnet_lite0"
    pretrained: str = "imagenet"  # imagenet | none | PATH of a checkpoint to initialise from
    sex_units: int = 32  # 16BitNet's dense sex branch
    head: list[int] = field(default_factory=lambda: [512])
    dropout: float = 0.2
    in_chans: int = 1


@dataclass
class TrainConfig:
    epochs: int = 40
    batch_size: int = 16
    optimizer: str = "adam"  # adam | adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: str = "cosine"  # cosine | exponential | constant: decays to final_lr_factor x lr
    final_lr_factor: float = 0.01
    warmup_epochs: float = 0.0
    seed: int = 42
    resume: bool = True  # continue from run_dir/last.ckpt when it exists


@dataclass
class FinetuneConfig:
    """Layer-wise fine-tuning. Phase 1 (``head_epochs`` > 0) trains the head and sex branch with the backbone
    frozen, using ``head_optimizer`` at ``head_lr``; phase 2 (or the only phase) trains the last ``layers``
    parameterised layers, counted from the output end, with the ``train`` section's optimizer and lr. The LR
    decays to ``train.final_lr_factor`` x over each phase."""

    layers: str = "all"  # N or all
    head_epochs: int = 0  # phase 1 length in epochs; 0: a single phase
    head_lr: float = 1e-3
    head_optimizer: str = "adam"  # adam | adamw | sgd


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "auto"  # auto: bf16-mixed on GPU, 32 on CPU
    log_every_n_steps: int = 10
    limit_train_batches: float = 1.0
    limit_val_batches: float = 1.0
    progress_bar: bool = True
    compile: bool = False  # torch.compile the network (in place: checkpoints keep their keys)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    name: str = "run"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Turn a YAML or command-line value into the declared field type, so a typo fails early and clearly."""
    origin = get_origin(typ)
    if typ is Any:
        return value
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, list):
            raise BoneAgeInputError(f"config key {key} must be a list, got {value!r}")
        (item_type,) = get_args(typ) or (Any,)
        return [_coerce(v, item_type, key) for v in value]
    if typ is bool:
        if isinstance(value, str):
            low = value.strip().lower()
            if low in {"true", "yes", "1", "on"}:
                return True
            if low in {"false", "no", "0", "off"}:
                return False
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):  # `--set x=1`: YAML has already made it an int
            return bool(value)
        raise BoneAgeInputError(f"config key {key} must be true or false, got {value!r}")
    if typ in (int, float):
        try:
            number = typ(value)
        except (TypeError, ValueError):
            raise BoneAgeInputError(f"config key {key} must be a number, got {value!r}") from None
        if typ is int and float(value) != number:
            raise BoneAgeInputError(f"config key {key} must be a whole number, got {value!r}")
        return number
    if typ is str:
        return "" if value is None else str(value)
    return value


def _merge(obj: Any, data: dict[str, Any], prefix: str = "") -> Any:
    hints = get_type_hints(type(obj))
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in hints:
            known = ", ".join(hints)
            raise BoneAgeInputError(f"unknown config key {full!r} (known here: {known})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise BoneAgeInputError(f"config section {full!r} must be a mapping")
            _merge(current, value, prefix=f"{full}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], full))
    return obj


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """``["train.lr=1e-4", "model.head=[256,64]"]`` → nested dict; values are parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise BoneAgeInputError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults ← YAML file ← ``--set`` overrides; presets in ``model.preset`` fill model fields first."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise BoneAgeInputError("config file not found", p)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise BoneAgeInputError(f"not valid YAML ({str(exc).splitlines()[0]})", p) from None
        if not isinstance(data, dict):
            raise BoneAgeInputError("config must be a mapping of sections", p)
    return build_config(data, overrides)


def build_config(data: dict[str, Any], overrides: list[str] | None = None) -> Config:
    """Defaults ← nested ``data`` (sections as in a YAML file) ← ``key=value`` overrides, presets first."""
    extra = parse_overrides(overrides)
    cfg = Config()
    preset = (extra.get("model", {}) or {}).get("preset") or (data.get("model", {}) or {}).get("preset")
    if preset:
        from boneage.models import PRESETS

        if preset not in PRESETS:
            raise BoneAgeInputError(f"unknown model preset {preset!r} (known: {', '.join(PRESETS)})")
        _merge(cfg.model, PRESETS[preset], prefix="model.")
    _merge(cfg, data)
    _merge(cfg, extra)
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config saved in a checkpoint or run folder (already resolved: presets are not reapplied)."""
    return _merge(Config(), data)
