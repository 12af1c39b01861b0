"""Config: YAML ← presets ← --set overrides, typed and checked; a saved config rebuilds the same object."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from boneage.config import Config, config_from_dict, load_config, parse_overrides
from boneage.errors import BoneAgeInputError

REPO = Path(__file__).resolve().parents[1]


def _yaml(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_without_file() -> None:
    cfg = load_config()
    assert cfg == Config()
    assert cfg.data.val_fraction == 0.2
    assert cfg.preprocess.contrast == "percentile"


def test_yaml_file_sets_fields_and_keeps_other_defaults(tmp_path: Path) -> None:
    path = _yaml(
        tmp_path,
        """
name: smoke
data:
  limit: 40
  seed: 7
preprocess:
  size: 96
  crop: false
model:
  backbone: test_efficientnet
  head: [64, 32]
train:
  lr: 0.0005
  epochs: 3
trainer:
  devices: [0, 1]
""",
    )
    cfg = load_config(path)
    assert cfg.name == "smoke"
    assert (cfg.data.limit, cfg.data.seed) == (40, 7)
    assert cfg.preprocess.size == 96 and cfg.preprocess.crop is False
    assert cfg.model.backbone == "test_efficientnet"
    assert cfg.model.head == [64, 32]
    assert cfg.train.lr == pytest.approx(5e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.trainer.devices == [0, 1]  # an Any field takes the value as written
    # untouched fields keep their defaults
    assert cfg.data.val_fraction == Config().data.val_fraction
    assert cfg.model.sex_units == Config().model.sex_units


def test_empty_yaml_is_defaults(tmp_path: Path) -> None:
    assert load_config(_yaml(tmp_path, "")) == Config()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("data: [1, 2\n", "not valid YAML"),
        ("- a\n- b\n", "mapping of sections"),
        ("data: 5\n", "must be a mapping"),
    ],
)
def test_bad_yaml_files(tmp_path: Path, text: str, match: str) -> None:
    path = _yaml(tmp_path, text)
    with pytest.raises(BoneAgeInputError, match=match) as info:
        load_config(path)
    assert "\n" not in str(info.value)


def test_missing_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(BoneAgeInputError, match="config file not found") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_preset_16bitnet(tmp_path: Path) -> None:
    cfg = load_config(_yaml(tmp_path, "model:\n  preset: 16bitnet\n"))
    assert cfg.model.backbone == "inception_v3"
    assert cfg.model.head == [1000, 1000]
    assert cfg.model.sex_units == 32
    assert cfg.model.dropout == 0.0


def test_preset_effnet_lite0_from_override() -> None:
    cfg = load_config(None, ["model.preset=effnet-lite0"])
    assert cfg.model.preset == "effnet-lite0"
    assert cfg.model.backbone == "tf_efficientnet_lite0"
    assert cfg.model.head == [512]


def test_explicit_fields_win_over_preset(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "model:\n  preset: 16bitnet\n  sex_units: 8\n")
    cfg = load_config(path, ["model.backbone=test_efficientnet"])
    assert cfg.model.backbone == "test_efficientnet"  # override applied after the preset
    assert cfg.model.sex_units == 8  # the file's own field applied after the preset
    assert cfg.model.head == [1000, 1000]  # what nobody overrode comes from the preset


def test_override_preset_replaces_file_preset(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "model:\n  preset: 16bitnet\n")
    cfg = load_config(path, ["model.preset=effnet-lite0"])
    assert cfg.model.backbone == "tf_efficientnet_lite0"
    assert cfg.model.head == [512]


def test_quick_yaml_with_backbone_override() -> None:
    cfg = load_config(REPO / "configs" / "quick.yaml", ["model.backbone=test_efficientnet"])
    assert cfg.name == "quick"
    assert cfg.model.preset == "effnet-lite0"
    assert cfg.model.backbone == "test_efficientnet"
    assert cfg.trainer.accelerator == "cpu"


def test_unknown_preset() -> None:
    with pytest.raises(BoneAgeInputError, match="unknown model preset 'resnet9000'"):
        load_config(None, ["model.preset=resnet9000"])


def test_overrides_scalars_lists_and_bools() -> None:
    cfg = load_config(
        None,
        [
            "train.lr=1e-4",  # YAML reads 1e-4 as text; the float field still gets a float
            "train.epochs=12",
            "model.head=[256, 64]",
            "augment.enabled=false",
            "trainer.progress_bar=no",
            "preprocess.crop=off",
            "data.val_fraction=0.25",
            "model.backbone=test_resnet",
            "model.pretrained=none",
            "data.seed=3.0",  # a whole float is a valid int
            "trainer.devices=2",
        ],
    )
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 12
    assert cfg.model.head == [256, 64]
    assert cfg.augment.enabled is False
    assert cfg.trainer.progress_bar is False
    assert cfg.preprocess.crop is False
    assert cfg.data.val_fraction == 0.25
    assert cfg.model.backbone == "test_resnet"
    assert cfg.model.pretrained == "none"
    assert cfg.data.seed == 3 and isinstance(cfg.data.seed, int)
    assert cfg.trainer.devices == 2


@pytest.mark.parametrize(("raw", "expected"), [("true", True), ("1", True), ("0", False), ("yes", True)])
def test_bool_override_spellings(raw: str, expected: bool) -> None:
    assert load_config(None, [f"augment.enabled={raw}"]).augment.enabled is expected


def test_int_field_to_float_and_string_fields() -> None:
    cfg = load_config(None, ["train.lr=1", "model.backbone=123", "model.preset="])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.model.backbone == "123"
    assert cfg.model.preset == ""


def test_overrides_beat_the_file(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "train:\n  epochs: 3\n  lr: 0.1\n")
    cfg = load_config(path, ["train.epochs=5"])
    assert cfg.train.epochs == 5
    assert cfg.train.lr == pytest.approx(0.1)


def test_parse_overrides_nests() -> None:
    assert parse_overrides(["a.b=1", "a.c=[1, 2]", "d=x"]) == {"a": {"b": 1, "c": [1, 2]}, "d": "x"}
    assert parse_overrides(None) == {}


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("train.lrr=0.1", "unknown config key 'train.lrr'"),
        ("nosuchsection.x=1", "unknown config key 'nosuchsection'"),
        ("train=3", "config section 'train' must be a mapping"),
        ("train.lr", "must look like section.key=value"),
    ],
)
def test_unknown_keys_and_bad_overrides(override: str, match: str) -> None:
    with pytest.raises(BoneAgeInputError, match=match):
        load_config(None, [override])


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("train.epochs=abc", "train.epochs must be a number"),
        ("train.epochs=2.5", "train.epochs must be a whole number"),
        ("train.lr=fast", "train.lr must be a number"),
        ("augment.enabled=maybe", "augment.enabled must be true or false"),
        ("augment.enabled=2", "augment.enabled must be true or false"),
        ("model.head=5", "model.head must be a list"),
        ("model.head=[a, 5]", "model.head.0 must be a number"),
    ],
)
def test_type_errors(override: str, match: str) -> None:
    with pytest.raises(BoneAgeInputError, match=match):
        load_config(None, [override])


def test_type_error_in_yaml_file(tmp_path: Path) -> None:
    with pytest.raises(BoneAgeInputError, match="preprocess.size must be a whole number"):
        load_config(_yaml(tmp_path, "preprocess:\n  size: 12.5\n"))


def test_round_trip_save_and_rebuild(tmp_path: Path) -> None:
    cfg = load_config(
        REPO / "configs" / "quick.yaml",
        ["model.backbone=test_efficientnet", "model.head=[16]", "trainer.devices=[0]", "data.limit=40"],
    )
    path = tmp_path / "config.yaml"
    cfg.save(path)
    data = yaml.safe_load(path.read_text())
    assert data["model"]["backbone"] == "test_efficientnet"
    again = config_from_dict(data)
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()
    # the stored config is resolved: rebuilding it does not re-apply the preset over the override
    assert again.model.preset == "effnet-lite0" and again.model.backbone == "test_efficientnet"


def test_config_from_dict_checks_keys() -> None:
    data = Config().to_dict()
    data["train"]["bogus"] = 1
    with pytest.raises(BoneAgeInputError, match="train.bogus"):
        config_from_dict(data)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("train.optimizer=adamm", "train.optimizer='adamm' is not allowed (choose 'adam', 'adamw' or 'sgd')"),
        ("data.source=nhi", "data.source='nhi' is not allowed"),
        ("preprocess.contrast=clahee", "preprocess.contrast='clahee' is not allowed"),
        ("model.task=regresion", "model.task='regresion' is not allowed"),
        ("preprocess.geometry=stretch", "preprocess.geometry='stretch' is not allowed"),
        ("train.schedule=linear", "train.schedule='linear' is not allowed"),
    ],
)
def test_values_outside_the_allowed_set_fail_at_load(override: str, match: str) -> None:
    """A typo in a value fails when the config is read, naming the key, the value and the choices."""
    with pytest.raises(BoneAgeInputError, match=match.replace("(", r"\(").replace(")", r"\)")) as info:
        load_config(None, [override])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("train.epochs=-3", "train.epochs"),
        ("train.epochs=0", "train.epochs"),
        ("train.lr=-0.1", "train.lr"),
        ("train.lr=.nan", "train.lr must be a finite number"),
        ("train.batch_size=0", "train.batch_size"),
        ("data.val_fraction=1", "data.val_fraction"),
        ("data.val_fraction=1.5", "data.val_fraction"),
        ("augment.flip=2", "augment.flip"),
        ("name=../../etc", "config key name"),
        ("name=/tmp/x", "config key name"),
        ("train.size_schedule={0: 8}", "train.size_schedule"),
    ],
)
def test_values_out_of_range_fail_at_load(override: str, match: str) -> None:
    with pytest.raises(BoneAgeInputError, match=match):
        load_config(None, [override])


def test_nested_run_names_are_allowed() -> None:
    assert load_config(None, ["name=grid/variant-1"]).name == "grid/variant-1"


def test_every_shipped_config_validates() -> None:
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        if path.parent.name == "experiments":
            continue  # grid files have their own layout (tests/test_experiments.py validates them)
        load_config(path)


def test_run_config_makes_the_model_spec() -> None:
    cfg = load_config(REPO / "configs" / "release" / "v0.12.0-stage1.yaml")
    spec = cfg.model_spec(100.0, 30.0)
    assert spec.preprocess.geometry == "squash" and spec.preprocess.size == 256
    assert (spec.backbone, spec.head, spec.age_bins) == ("tf_efficientnet_lite2", [512], 121)
    assert (spec.target_mean, spec.target_std) == (100, 30)
    assert "pretrained" not in spec.model_dump()  # how it was initialised is training history, not the model
    assert cfg.train.size_schedule == {} and cfg.train.ema_decay == pytest.approx(0.998)
    assert cfg.trainer.precision == "bf16-mixed"


def test_ship_rule_is_read_checked_and_applied() -> None:
    from boneage.release.ship import ship_decision

    cfg = config_from_dict({"ship": {"bar": 6.902, "checkpoint": "last"}})
    assert cfg.ship.bar == 6.902 and cfg.ship.checkpoint == "last"
    assert Config().ship.bar is None and Config().ship.checkpoint == "best"  # not a candidate by default
    with pytest.raises(BoneAgeInputError, match="ship"):
        config_from_dict({"ship": {"bar": 6.9, "checkpont": "last"}})  # a typo fails when read
    with pytest.raises(BoneAgeInputError, match="ship"):
        config_from_dict({"ship": {"checkpoint": "middle"}})

    # the rule as written: at or below the bar ships, above does not
    assert ship_decision(cfg, "run/last.ckpt", 6.902)["ship"] is True
    decision = ship_decision(cfg, "run/last.ckpt", 6.913)
    assert decision == {"mae": 6.913, "bar": 6.902, "checkpoint": "last", "ship": False}
    # a bar on the command line may repeat the config's, never change it; the epoch is the one fixed
    assert ship_decision(cfg, "run/last.ckpt", 6.9, bar=6.902)["ship"] is True
    with pytest.raises(BoneAgeInputError, match="differs"):
        ship_decision(cfg, "run/last.ckpt", 6.9, bar=7.5)
    with pytest.raises(BoneAgeInputError, match="last.ckpt, not best.ckpt"):
        ship_decision(cfg, "run/best.ckpt", 6.9)
    assert ship_decision(cfg, "bundle.safetensors", 6.9)["ship"] is True  # a bundle is one set of weights
    # no bar anywhere: nothing to decide against
    with pytest.raises(BoneAgeInputError, match="no ship bar"):
        ship_decision(Config(), "run/best.ckpt", 6.9)
    assert ship_decision(Config(), "run/best.ckpt", 6.9, bar=7.0)["bar"] == 7.0


def test_a_paired_ship_rule_needs_a_win_the_split_can_resolve(tmp_path: Path) -> None:
    import pandas as pd

    from boneage.release.ship import ship_bar, ship_decision

    ids = list(range(100))
    ref = [100.0] * len(ids)
    incumbent = pd.DataFrame(
        {"id": ids, "boneage": ref, "predicted": [105.0 if i % 2 else 95.0 for i in ids]}
    )
    incumbent.to_csv(tmp_path / "preds_val_split.csv", index=False)
    rule = {"bar": 5.0, "checkpoint": "last", "paired_with": str(tmp_path / "preds_val_split.csv")}
    cfg = config_from_dict({"ship": rule})
    assert cfg.ship.paired_se == 1.0  # one standard error unless the config says otherwise
    # better on every image by a varying amount: a resolved win ships (ids as strings, as evaluate() gives
    # them, against the numbers pandas would read from the CSV)
    better = pd.DataFrame(
        {"id": [str(i) for i in ids], "boneage": ref, "predicted": [104.0 + (i % 3) * 0.2 for i in ids]}
    )
    decision = ship_decision(cfg, "run/last.ckpt", 4.2, predictions=better)
    assert decision["ship"] is True and decision["paired"]["n"] == 100
    assert decision["paired"]["diff_candidate_minus_incumbent"] == pytest.approx(-0.8, abs=0.01)
    # half the images 2.1 better, half 1.9 worse: under the bar, yet a tie the 100 images cannot resolve
    noisy = pd.DataFrame({"id": ids, "boneage": ref, "predicted": [102.9 if i < 50 else 93.1 for i in ids]})
    tie = ship_decision(cfg, "run/last.ckpt", 4.9, predictions=noisy)
    assert tie["paired"]["diff_candidate_minus_incumbent"] == pytest.approx(-0.1)
    assert tie["paired"]["diff_se"] == pytest.approx(0.2, abs=0.01)
    assert tie["paired"]["pass"] is False and tie["ship"] is False
    # the bar still holds on its own, and the ids must be the incumbent's
    assert ship_decision(cfg, "run/last.ckpt", 5.1, predictions=better)["ship"] is False
    with pytest.raises(BoneAgeInputError, match="ids differ"):
        ship_decision(cfg, "run/last.ckpt", 4.2, predictions=better.iloc[:50])
    with pytest.raises(BoneAgeInputError, match="disagree on the reference ages"):  # same ids, other images
        ship_decision(cfg, "run/last.ckpt", 4.2, predictions=better.assign(boneage=better["boneage"] + 12))
    with pytest.raises(BoneAgeInputError, match="per-image predictions"):
        ship_decision(cfg, "run/last.ckpt", 4.2)
    # a missing incumbent file fails in the cheap check, before minutes of scoring
    gone = config_from_dict({"ship": {**rule, "paired_with": str(tmp_path / "nowhere.csv")}})
    with pytest.raises(BoneAgeInputError, match="paired_with"):
        ship_bar(gone, "run/last.ckpt")


def test_a_paired_only_rule_is_a_gate_decided_by_the_paired_difference(tmp_path: Path) -> None:
    import pandas as pd

    from boneage.release.ship import ship_bar, ship_decision

    ids = list(range(100))
    ref = [100.0] * len(ids)
    pd.DataFrame({"id": ids, "boneage": ref, "predicted": [107.0] * len(ids)}).to_csv(
        tmp_path / "control.csv", index=False
    )
    gate = config_from_dict({"ship": {"checkpoint": "last", "paired_with": str(tmp_path / "control.csv")}})
    assert ship_bar(gate, "run/last.ckpt") is None  # no absolute figure to reach
    # level with its control, as v0.17 stage 1 was (+0.047 ± 0.117 there): no go, whatever the MAE
    level = pd.DataFrame({"id": ids, "boneage": ref, "predicted": [106.0 if i % 2 else 92.0 for i in ids]})
    stop = ship_decision(gate, "run/last.ckpt", 7.0, predictions=level)
    assert stop["bar"] is None and stop["ship"] is False and stop["paired"]["pass"] is False
    # better image by image: go
    better = pd.DataFrame({"id": ids, "boneage": ref, "predicted": [105.0 + (i % 3) * 0.2 for i in ids]})
    go = ship_decision(gate, "run/last.ckpt", 5.2, predictions=better)
    assert go["ship"] is True
    assert go["paired"]["diff_candidate_minus_incumbent"] == pytest.approx(-1.8, abs=0.01)
    # a bar given on the command line still joins the rule, and the epoch is still the one fixed
    assert ship_decision(gate, "run/last.ckpt", 5.2, bar=5.0, predictions=better)["ship"] is False
    with pytest.raises(BoneAgeInputError, match="last.ckpt, not best.ckpt"):
        ship_bar(gate, "run/best.ckpt")
