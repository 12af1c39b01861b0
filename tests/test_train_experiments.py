"""Initialisation sources, layer freezing, the two-phase schedule, experiment grids, reports and tuning.

Everything runs on tiny timm test networks and a few dozen synthetic 48 px radiographs made here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from boneage.config import Config, ModelConfig, RunConfig, load_config
from boneage.errors import BoneAgeInputError
from boneage.models.init import build_model
from boneage.models.net import BoneAgeNet

TINY = {
    "data": {"val_fraction": 0.25, "num_workers": 1},
    "preprocess": {"size": 32, "crop": False},
    "augment": {"enabled": False},
    "model": {"backbone": "test_efficientnet", "pretrained": "none", "head": [16], "sex_units": 4},
    "train": {"epochs": 1, "batch_size": 8, "lr": 1e-3},
    "trainer": {"accelerator": "cpu", "devices": 1, "progress_bar": False, "log_every_n_steps": 1},
}


def _build(cfg: ModelConfig, age_mean: float = 127.0, age_std: float = 41.0) -> BoneAgeNet:
    """The network a run config's model section describes, initialised as its ``pretrained`` says."""
    return build_model(RunConfig(model=cfg).model_spec(age_mean, age_std), cfg.pretrained)


def make_rsna(root: Path, n: int = 28, seed: int = 0) -> tuple[Path, Path]:
    """A labelled folder in the RSNA training layout: images/<id>.png and labels.csv (id,boneage,male)."""
    rng = np.random.default_rng(seed)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        age = float(rng.uniform(12, 216))
        pixels = rng.random((48, 48)) * 80 + age / 216 * 160
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(images / f"{5000 + i}.png")
        rows.append({"id": 5000 + i, "boneage": round(age), "male": bool(i % 2)})
    labels = root / "labels.csv"
    pd.DataFrame(rows).to_csv(labels, index=False)
    return images, labels


@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base config file for tiny runs on synthetic data."""
    root = tmp_path_factory.mktemp("rsna")
    images, labels = make_rsna(root)
    data = yaml.safe_load(yaml.safe_dump(TINY))
    data["data"].update(images=str(images), labels=str(labels), cache_dir=str(root / "cache"))
    data["name"] = "tiny"
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def tiny_run(tiny_yaml: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished 1-epoch run (its best.ckpt serves as an initialisation source)."""
    from boneage.train.loop import train

    run = tmp_path_factory.mktemp("runs") / "tiny"
    train(load_config(tiny_yaml), run, progress=False)
    return run


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---- initialisation sources ------------------------------------------------------------------------------


def test_init_none_is_random_and_reported() -> None:

    torch.manual_seed(0)
    a = _build(ModelConfig(backbone="test_efficientnet", pretrained="none", head=[16]))
    torch.manual_seed(1)
    b = _build(ModelConfig(backbone="test_efficientnet", pretrained="none", head=[16]))
    assert a.init_report == {"source": "none", "loaded": 0, "skipped": []}
    assert not torch.equal(a.backbone.conv_stem.weight, b.backbone.conv_stem.weight)


def test_init_imagenet_loads_the_packaged_weights() -> None:
    from boneage.models.init import _offline_imagenet_state

    model = _build(ModelConfig(backbone="tf_efficientnet_lite0", pretrained="imagenet", head=[8]))
    reference = _offline_imagenet_state("tf_efficientnet_lite0")
    assert reference is not None
    key = "blocks.6.0.conv_pw.weight"
    assert torch.equal(model.backbone.state_dict()[key], reference[key])
    # the grey input: ImageNet's RGB stem summed into one channel
    assert torch.allclose(model.backbone.conv_stem.weight, reference["conv_stem.weight"].sum(1, keepdim=True))
    report = model.init_report
    assert report["source"].startswith("imagenet") and report["loaded"] == len(model.backbone.state_dict())
    assert "head.hidden.0.weight" in report["skipped"] and "sex.0.weight" in report["skipped"]


def test_init_from_a_checkpoint_loads_matching_tensors_and_lists_skipped(tiny_run: Path) -> None:
    from boneage.modelfile import ModelFile

    ckpt = tiny_run / "best.ckpt"
    source = ModelFile.read(ckpt).network_state()
    # same backbone, wider head: backbone and sex branch load, the head's first layer cannot
    cfg = ModelConfig(backbone="test_efficientnet", pretrained=str(ckpt), head=[32], sex_units=4)
    model = _build(cfg, age_mean=100.0, age_std=30.0)
    state = model.state_dict()
    assert torch.equal(state["backbone.conv_stem.weight"], source["backbone.conv_stem.weight"])
    assert torch.equal(state["sex.0.weight"], source["sex.0.weight"])
    report = model.init_report
    assert report["source"] == str(ckpt)
    assert {"head.hidden.0.weight", "head.hidden.0.bias", "head.out.weight"} <= set(report["skipped"])
    assert not any(k.startswith("backbone.") for k in report["skipped"])
    # the new task's target statistics are kept, not the checkpoint's
    assert float(model.age_mean) == 100.0 and float(model.age_std) == 30.0

    with pytest.raises(BoneAgeInputError, match="no backbone tensor of the checkpoint fits"):
        _build(ModelConfig(backbone="test_resnet", pretrained=str(ckpt), head=[7], sex_units=3))
    with pytest.raises(BoneAgeInputError, match="model file not found"):
        _build(ModelConfig(backbone="test_efficientnet", pretrained=str(tiny_run / "nope.ckpt")))


def test_training_from_a_checkpoint_records_the_init_in_summary(
    tiny_yaml: Path, tiny_run: Path, tmp_path: Path
):
    from boneage.train.loop import train

    cfg = load_config(tiny_yaml, [f"model.pretrained={tiny_run / 'best.ckpt'}", "model.head=[24]"])
    summary = train(cfg, tmp_path / "from-ckpt", progress=False)
    saved = json.loads((tmp_path / "from-ckpt" / "summary.json").read_text())
    assert saved["init"] == summary["init"]
    assert saved["init"]["source"] == str(tiny_run / "best.ckpt")
    assert "head.hidden.0.weight" in saved["init"]["skipped"] and saved["init"]["loaded"] > 50
    assert saved["finished"] is True and saved["epochs_completed"] == 1


# ---- layer-wise freezing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", ["test_efficientnet", "test_resnet"])
def test_freeze_counts_for_several_n(backbone: str) -> None:
    from boneage.models.net import BoneAgeNet
    from boneage.models.surgery import freeze_all_but, parameterised_layers

    model = BoneAgeNet(backbone, [16], sex_units=4)
    layers = parameterised_layers(model)
    total = sum(p.numel() for p in model.parameters())
    # counted from the output end: the head's dense layers, then the sex branch, then the backbone backwards
    assert layers[-1] is model.head.out and layers[-3] is model.sex[0]
    counts = []
    for n in (1, 2, 3, 5, 10, len(layers) - 1):
        expected = sum(p.numel() for layer in layers[-n:] for p in layer.parameters(recurse=False))
        assert freeze_all_but(model, n) == expected == trainable(model)
        frozen = [m for m in layers[:-n] if any(p.requires_grad for p in m.parameters(recurse=False))]
        assert not frozen
        counts.append(expected)
    assert counts == sorted(counts) and len(set(counts)) == len(counts)
    assert freeze_all_but(model, 1) == 17  # Linear(16, 1)
    assert freeze_all_but(model, "all") == total == trainable(model)
    assert freeze_all_but(model, len(layers) + 50) == total


def test_phase_one_trains_head_and_sex_branch_only() -> None:
    from boneage.train.loop import BoneAgeModule

    cfg = Config()
    cfg.model = ModelConfig(backbone="test_resnet", pretrained="none", head=[16], sex_units=4)
    cfg.finetune.head_epochs, cfg.finetune.layers = 2, "4"
    module = BoneAgeModule.from_config(cfg)
    head_and_sex = sum(p.numel() for p in [*module.model.head.parameters(), *module.model.sex.parameters()])
    assert [module.phase_for_epoch(e) for e in range(4)] == [1, 1, 2, 2]
    assert module.apply_phase(1) == head_and_sex == trainable(module.model)
    assert not any(p.requires_grad for p in module.model.backbone.parameters())
    from boneage.models.surgery import freeze_all_but

    phase2 = module.apply_phase(2)
    assert phase2 == freeze_all_but(module.model, 4) and phase2 > head_and_sex
    with pytest.raises(BoneAgeInputError, match="finetune.layers"):
        load_config(None, ["finetune.layers=twenty"])


def test_two_phase_schedule_switches_optimiser_and_resumes_across_the_boundary(
    tiny_yaml: Path, tmp_path: Path
) -> None:
    import lightning as L

    from boneage.train.loop import train

    seen: list[tuple[int, str, int, int]] = []

    class Watch(L.Callback):
        def __init__(self, stop_after: int | None = None) -> None:
            self.stop_after = stop_after

        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            opt = trainer.optimizers[0]
            seen.append(
                (trainer.current_epoch, type(opt).__name__, pl_module.phase, trainable(pl_module.model))
            )
            # frozen batch norms keep their statistics (eval mode); trainable ones (also unfrozen ones) update
            norms = [m for m in pl_module.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
            assert norms and all(m.training == m.weight.requires_grad for m in norms)
            if trainer.current_epoch == self.stop_after:
                trainer.should_stop = True  # a kill right after the last phase-1 epoch was saved

    overrides = ["train.epochs=3", "finetune.head_epochs=1", "finetune.layers=6", "train.optimizer=sgd"]
    overrides += ["train.lr=1e-4", "finetune.head_lr=1e-3", "train.final_lr_factor=0.01"]
    cfg = load_config(tiny_yaml, overrides)
    run = tmp_path / "two-phase"
    first = train(cfg, run, progress=False, callbacks=[Watch(stop_after=0)])
    assert first["finished"] is False and first["epochs_completed"] == 1
    assert [p["optimizer"] for p in first["phases"]] == ["adam"]

    second = train(load_config(tiny_yaml, overrides), run, progress=False, callbacks=[Watch()])
    assert second["resumed_from"] == str(run / "last.ckpt")
    assert second["finished"] is True and second["epochs_completed"] == 3
    # resumed with the phase-1 optimiser state, then switched at the boundary before training on
    assert [(p["phase"], p["optimizer"], p["from_epoch"]) for p in second["phases"]] == [(2, "sgd", 1)]
    from boneage.models.net import BoneAgeNet
    from boneage.models.surgery import freeze_all_but

    reference = BoneAgeNet("test_efficientnet", [16], sex_units=4)
    head_and_sex = sum(p.numel() for p in [*reference.head.parameters(), *reference.sex.parameters()])
    assert [s[:3] for s in seen] == [(0, "Adam", 1), (1, "SGD", 2), (2, "SGD", 2)]
    assert seen[0][3] == head_and_sex and seen[1][3] == freeze_all_but(reference, 6) > head_and_sex
    # the LR decays to 0.01x within each phase
    metrics = pd.read_csv(run / "metrics.csv")
    assert list(metrics["epoch"]) == [0, 1, 2]
    assert metrics["lr"].iloc[0] == pytest.approx(1e-5, rel=1e-3)
    assert metrics["lr"].iloc[2] == pytest.approx(1e-6, rel=1e-3)
    assert 1e-6 < metrics["lr"].iloc[1] < 1e-4
    assert second["total_fit_seconds"] >= second["fit_seconds"]


# ---- experiment grids and reports ------------------------------------------------------------------------


def write_experiment(folder: Path, base: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    spec = {
        "description": "two tiny variants",
        "base": str(base),
        "overrides": {"train.epochs": 1, "finetune": {"head_epochs": 0}},
        "variants": {
            "all-layers": {"finetune.layers": "all"},
            "last-5": {"finetune.layers": 5, "train.lr": 3e-3},
        },
    }
    path = folder / "tiny-grid.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_grid_runs_resumes_after_a_kill_and_reports(tiny_yaml: Path, tmp_path: Path) -> None:
    from boneage.train.experiments import report, run_grid

    exps = tmp_path / "experiments"
    write_experiment(exps, tiny_yaml)
    runs = tmp_path / "runs"

    plan = run_grid("tiny-grid", runs_dir=runs, experiments_dir=exps, dry_run=True)
    assert [(r["variant"], r["layers"], r["status"]) for r in plan] == [
        ("all-layers", "all", "new"),
        ("last-5", 5, "new"),
    ]
    assert not runs.exists()

    # the grid was killed after its first variant: only that one finished
    first = run_grid("tiny-grid", runs_dir=runs, experiments_dir=exps, variants=["all-layers"])
    assert [r["status"] for r in first] == ["finished"]
    done = runs / "tiny-grid" / "all-layers" / "summary.json"
    stamp = done.stat().st_mtime_ns
    assert not (runs / "tiny-grid" / "last-5").exists()

    again = run_grid("tiny-grid", runs_dir=runs, experiments_dir=exps)
    assert [(r["variant"], r["status"]) for r in again] == [("all-layers", "skipped"), ("last-5", "finished")]
    assert done.stat().st_mtime_ns == stamp  # untouched
    saved = load_config(runs / "tiny-grid" / "last-5" / "config.yaml")
    assert saved.finetune.layers == 5 and saved.train.lr == 3e-3 and saved.name == "tiny-grid/last-5"

    # a different config for an existing run folder is refused, not silently mixed
    changed = {"name": "tiny-grid", "base": str(tiny_yaml), "variants": {"last-5": {"train.epochs": 2}}}
    with pytest.raises(BoneAgeInputError, match="another config"):
        run_grid(changed, runs_dir=runs)
    conflict = run_grid(changed, runs_dir=runs, dry_run=True)[0]
    assert conflict["status"] == "conflict" and any("train.epochs" in d for d in conflict["differences"])

    table = report("tiny-grid", runs_dir=runs, experiments_dir=exps)
    out = runs / "tiny-grid"
    assert (out / "report.png").stat().st_size > 1000
    csv = pd.read_csv(out / "report.csv")
    assert list(csv["variant"]) == ["all-layers", "last-5"] and len(table) == 2
    assert {
        "experiment",
        "variant",
        "init",
        "layers",
        "epochs",
        "best_val_mae",
        "test_mae",
        "wall_time_s",
    } <= set(csv.columns)
    assert csv["best_val_mae"].notna().all() and (csv["epochs"] == 1).all()
    assert list(csv["layers"].astype(str)) == ["all", "5"] and list(csv["init"]) == ["random", "random"]
    md = (out / "report.md").read_text()
    assert "| all-layers | random |" in md and "| last-5 | random |" in md and "Best validation MAE" in md


class _StopAfterFirstEpoch:
    """A Lightning callback that ends fit after epoch 0, as a killed session would (last.ckpt is written)."""

    def __new__(cls):  # built lazily: importing lightning at collection time slows every test file
        from lightning.pytorch.callbacks import Callback

        class Stop(Callback):
            def on_train_epoch_end(self, trainer, pl_module) -> None:
                trainer.should_stop = True

        return Stop()


def test_grid_resumes_an_interrupted_variant_with_holdout_validation_and_subsets(
    tiny_yaml: Path, tmp_path: Path
) -> None:
    """The CPU grids' settings end to end on a tiny network: validation = the holdout ids, a stratified
    training subset drawn for a fixed number of images per epoch; a variant stopped after its first epoch
    resumes from last.ckpt on the next run_grid and the finished one is skipped."""
    from boneage.train.experiments import report, run_grid

    labels = pd.read_csv(load_config(tiny_yaml).data.labels)
    holdout = tmp_path / "holdout.csv"
    labels.iloc[::4].to_csv(holdout, index=False)  # 7 of the 28 ids validate
    spec = {
        "name": "cpu-like",
        "base": str(tiny_yaml),
        "overrides": {
            "data": {"holdout_labels": str(holdout), "val_from_holdout": True, "epoch_images": 24},
            "train.epochs": 2,
        },
        "variants": {"n12": {"data.train_limit": 12}, "all": {}},
    }
    runs = tmp_path / "runs"
    stopped = run_grid(spec, runs_dir=runs, variants=["n12"], callbacks=[_StopAfterFirstEpoch()])
    assert [r["status"] for r in stopped] == ["stopped"]
    n12 = runs / "cpu-like" / "n12"
    assert (n12 / "last.ckpt").is_file()
    assert json.loads((n12 / "summary.json").read_text())["epochs_completed"] == 1
    assert [r["status"] for r in run_grid(spec, runs_dir=runs, dry_run=True)] == ["partial", "new"]

    records = run_grid(spec, runs_dir=runs)
    assert [(r["variant"], r["status"]) for r in records] == [("n12", "finished"), ("all", "finished")]
    summary = json.loads((n12 / "summary.json").read_text())
    assert summary["resumed_from"] == str(n12 / "last.ckpt") and summary["epochs_completed"] == 2
    assert (summary["train_images"], summary["val_images"], summary["holdout_images"]) == (12, 7, 0)
    assert list(pd.read_csv(n12 / "metrics.csv")["epoch"]) == [0, 1]  # epoch 0 was not trained again
    full = json.loads((runs / "cpu-like" / "all" / "summary.json").read_text())
    assert (full["train_images"], full["val_images"]) == (21, 7)
    assert [r["status"] for r in run_grid(spec, runs_dir=runs)] == ["skipped", "skipped"]

    table = report(spec, runs_dir=runs, out=tmp_path / "docs" / "cpu-like")
    assert list(table["train_images"]) == [12, 21] and list(table["size"]) == [32, 32]
    assert table["last_val_mae"].notna().all() and (table["train_images_per_s"] > 0).all()
    md = (tmp_path / "docs" / "cpu-like" / "report.md").read_text()
    assert "| n12 | random | test_efficientnet | 32 | all | 12 | 2 |" in md and "train img/s" in md
    assert (tmp_path / "docs" / "cpu-like" / "report.png").is_file()


# may change the bundled recipe: they choose on training ids (a 5% split, or 20% where the grid says why)
RECIPE_GRIDS = {
    "cpu-align",
    "cpu-upsample",
    "cpu-preprocess",
    "cpu-fit-wide",
    "cpu-fit-split7",
    "cpu-head",
    "cpu-background",
}
# diagnostic grids: they choose nothing for the bundle but pick on a 5% split of the training ids, as grid 6
TRAINING_SPLIT_GRIDS = RECIPE_GRIDS | {"cpu-detail"}
# grid 7b re-asks grid 7 on a selection split four times larger; grid 7c once more on a fresh draw of it
WIDE_SPLIT = {"cpu-fit-wide", "cpu-fit-split7"}


def test_report_lists_variants_not_run_yet_and_test_mae(
    tiny_yaml: Path, tiny_run: Path, tmp_path: Path
) -> None:
    from boneage.train.experiments import report

    cfg = load_config(tiny_yaml)
    spec = {
        "name": "with-test",
        "base": str(tiny_yaml),
        "variants": {"done": {}, "pending": {"train.lr": 1e-4}, "killed": {"train.lr": 3e-4}},
        "test": {"images": cfg.data.images, "labels": cfg.data.labels},
    }
    runs = tmp_path / "runs"
    done = runs / "with-test" / "done"
    done.mkdir(parents=True)
    for name in ("best.ckpt", "config.yaml", "summary.json"):
        (done / name).write_bytes((tiny_run / name).read_bytes())
    killed = runs / "with-test" / "killed"  # a run killed before writing its summary
    killed.mkdir()
    for name in ("last.ckpt", "metrics.csv"):
        (killed / name).write_bytes((tiny_run / name).read_bytes())
    table = report(spec, runs_dir=runs)
    assert list(table["status"]) == ["finished", "new", "partial"]
    assert table["test_mae"].iloc[0] > 0 and pd.isna(table["test_mae"].iloc[1])
    logged = pd.read_csv(tiny_run / "metrics.csv")
    assert table["epochs"].iloc[2] == 1 and table["best_val_mae"].iloc[2] == pytest.approx(
        logged["val_mae"].min()
    )
    assert json.loads((done / "test.json").read_text())["n"] == 28
    md = (runs / "with-test" / "report.md").read_text()
    assert "test MAE" in md and "| pending |" in md


def test_experiment_files_resolve_and_errors_are_readable(tmp_path: Path) -> None:
    from boneage.train.experiments import cap_epochs, list_experiments, load_experiment, resolve

    shipped = Path(__file__).resolve().parents[1] / "configs" / "experiments"
    assert {"imagenet-vs-random", "chest-0-20-finetune", "chest-0-100-finetune", "backbones"} <= set(
        list_experiments(shipped)
    )
    _, cfgs = resolve("chest-0-20-finetune", experiments_dir=shipped)
    assert [c.finetune.layers for c in cfgs.values()] == [20, 30, 50, 100]
    c = cfgs["layers-20"]
    assert (c.model.pretrained, c.train.optimizer, c.train.lr, c.finetune.head_epochs) == (
        "runs/chest-0-20/best.ckpt",
        "sgd",
        1e-4,
        5,
    )
    _, cfgs = resolve("chest-0-100-finetune", experiments_dir=shipped, max_epochs=4)
    assert [(c.finetune.layers, c.train.epochs, c.finetune.head_epochs) for c in cfgs.values()] == [
        (3, 4, 1),
        ("all", 4, 1),
    ]
    _, cfgs = resolve("backbones", experiments_dir=shipped)
    assert cfgs["16bitnet-inception-v3"].model.backbone == "inception_v3"
    assert cfgs["16bitnet-inception-v3"].model.head == [1000, 1000]
    assert cfgs["effnet-lite2"].model.backbone == "tf_efficientnet_lite2"
    _, cfgs = resolve("imagenet-vs-random", experiments_dir=shipped)
    assert [c.model.pretrained for c in cfgs.values()] == ["imagenet", "none"]

    cfg = Config()
    cfg.train.epochs, cfg.finetune.head_epochs = 30, 5
    assert (cap_epochs(cfg, 1).train.epochs, cfg.finetune.head_epochs) == (1, 0)
    with pytest.raises(BoneAgeInputError, match="no experiment 'nope'"):
        load_experiment("nope", shipped)
    with pytest.raises(BoneAgeInputError, match="unknown config key 'train.lrr'"):
        resolve({"name": "x", "variants": {"a": {"train.lrr": 1}}})
    with pytest.raises(BoneAgeInputError, match="no variants"):
        load_experiment({"name": "x", "variants": {}})


def test_cli_experiments_and_tune_are_wired(tiny_yaml: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from boneage.cli import app

    exps = tmp_path / "experiments"
    write_experiment(exps, tiny_yaml)
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "experiments",
            "run",
            "tiny-grid",
            "--dry-run",
            "--experiments-dir",
            str(exps),
            "--runs-dir",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    assert (
        "all-layers: init=random" in result.output
        and "last-5:" in result.output
        and "layers=5" in result.output
    )
    result = runner.invoke(app, ["experiments", "run", "missing", "--experiments-dir", str(exps)])
    assert result.exit_code == 2 and "no experiment 'missing'" in result.output
    result = runner.invoke(
        app,
        ["experiments", "report", "tiny-grid", "--experiments-dir", str(exps), "--runs-dir", str(tmp_path)],
    )
    assert result.exit_code == 0, result.output
    assert "| all-layers | random |" in result.output and (tmp_path / "tiny-grid" / "report.csv").is_file()
    result = runner.invoke(app, ["tune", "--help"])
    assert result.exit_code == 0 and "--trials" in result.output


def test_tune_continues_its_study(tiny_yaml: Path, tmp_path: Path) -> None:
    pytest.importorskip("optuna")
    from boneage.train.tuning import tune

    folder = tmp_path / "tune"
    kwargs = {"run_dir": folder, "sizes": (32,), "layers": ("5", "all"), "lr_range": (1e-4, 1e-2)}
    first = tune(tiny_yaml, 1, **kwargs)
    assert first["trials_complete"] == 1 and first["trials_run_now"] == 1
    # a trial killed mid-training stays RUNNING: the next call marks it failed and retries its parameters
    import optuna

    study = optuna.load_study(study_name="tune", storage=first["storage"])
    space = {
        "lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
        "size": optuna.distributions.CategoricalDistribution([32]),
        "layers": optuna.distributions.CategoricalDistribution(["5", "all"]),
    }
    killed = study.ask(space)
    second = tune(tiny_yaml, 2, **kwargs)
    assert second["trials_complete"] == 2 and second["trials_run_now"] == 1
    states = [
        (t.state.name, t.params)
        for t in optuna.load_study(study_name="tune", storage=first["storage"]).trials
    ]
    assert states[1] == ("FAIL", killed.params) and states[2] == ("COMPLETE", killed.params)
    assert (folder / "optuna.db").is_file() and (folder / "best.json").is_file()
    trials = pd.read_csv(folder / "trials.csv")
    assert list(trials["state"]) == ["COMPLETE", "FAIL", "COMPLETE"]
    assert {"params_lr", "params_size", "params_layers"} <= set(trials.columns)
    assert Path(second["best_run_dir"], "summary.json").is_file()
    with pytest.raises(BoneAgeInputError, match="another search space"):
        tune(tiny_yaml, 3, **{**kwargs, "sizes": (48,)})


def test_tune_without_optuna_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tiny_yaml: Path) -> None:
    import builtins

    from boneage.train.tuning import tune

    real_import = builtins.__import__

    def fake_import(name: str, *args, **kwargs):
        if name == "optuna":
            raise ImportError("no optuna")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(BoneAgeInputError, match="pip install"):
        tune(tiny_yaml, 1)


def test_experiments_module_imports_without_torch() -> None:
    import subprocess
    import sys

    code = "import sys, boneage.experiments; print('torch' in sys.modules, 'lightning' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ}, check=True
    )
    assert out.stdout.split() == ["False", "False"]
