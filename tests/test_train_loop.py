"""train(): a tiny real run writes a complete run folder, and an interrupted run resumes from last.ckpt."""

from __future__ import annotations

import csv
import json
import math
import signal
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tiny_train_config
from lightning.pytorch.callbacks import Callback

from boneage.config import config_from_dict
from boneage.data.datamodule import auto_cache_path
from boneage.data.labels import read_labels
from boneage.data.shards import ShardCache
from boneage.errors import BoneAgeInputError
from boneage.train.loop import lr_lambda, parent_seed, train


def _metrics_rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.integration
def test_one_epoch_run_writes_the_run_folder(trained_run: tuple[Path, dict], tiny_cache_dir: Path) -> None:
    run_dir, summary = trained_run
    for name in ("config.yaml", "metrics.csv", "best.ckpt", "last.ckpt", "run.json", "summary.json"):
        assert (run_dir / name).is_file(), name

    cfg = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    assert cfg.model.backbone == "test_efficientnet"
    assert cfg.preprocess.size == 32 and cfg.data.limit == 40 and cfg.train.epochs == 1

    rows = _metrics_rows(run_dir)
    assert [int(r["epoch"]) for r in rows] == [0]
    assert math.isfinite(float(rows[0]["val_mae"])) and float(rows[0]["val_mae"]) > 0
    assert math.isfinite(float(rows[0]["train_loss"]))

    facts = json.loads((run_dir / "run.json").read_text())
    assert facts["seed"] == 42
    assert facts["torch"] == torch.__version__
    assert facts["git_commit"]

    assert json.loads((run_dir / "summary.json").read_text()) == summary
    assert summary["resumed_from"] is None
    assert summary["epochs_completed"] == 1
    assert summary["train_images"] + summary["val_images"] == 40
    assert summary["val_images"] == 8  # the 4:1 split of the 40 images
    assert math.isfinite(summary["best_val_mae"])
    assert summary["best_val_mae"] == pytest.approx(float(rows[0]["val_mae"]), abs=1e-3)

    ckpt = torch.load(run_dir / "best.ckpt", map_location="cpu", weights_only=False)
    # the checkpoint carries the model spec and the sections the loop used, never data paths
    spec = ckpt["boneage_spec"]
    assert spec["backbone"] == "test_efficientnet" and spec["preprocess"]["size"] == 32
    assert "config" not in ckpt["hyper_parameters"] and "data" not in ckpt["hyper_parameters"]
    assert ckpt["hyper_parameters"]["spec"]["backbone"] == "test_efficientnet"
    assert summary["status"] == "finished"
    assert any(k.startswith("model.backbone.") for k in ckpt["state_dict"])
    # the target statistics are those of the training images, stored in the model
    assert 0 < float(ckpt["state_dict"]["model.age_mean"]) < 240

    # every image of the run preprocessed once into the cache (other tiny runs of the session share it)
    cached = set(ShardCache(auto_cache_path(cfg.data, cfg.preprocess)).labels()["id"])
    used = read_labels(cfg.data.labels, cfg.data.images).iloc[: cfg.data.limit]["id"].astype(str)
    assert set(used) <= cached


class _InterruptAfterFirstEpoch(Callback):
    """Ctrl+C as soon as epoch 0 is complete (validated and checkpointed): at the start of epoch 1."""

    def __init__(self) -> None:
        self.saw_interrupted = False

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 1:
            raise KeyboardInterrupt

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.saw_interrupted = isinstance(exception, KeyboardInterrupt) and trainer.interrupted


@pytest.mark.integration
def test_interrupted_run_resumes_from_last_ckpt(
    shared_sample: Path, tiny_cache_dir: Path, tmp_path: Path
) -> None:
    cfg = make_tiny_train_config(shared_sample, tiny_cache_dir, train={"epochs": 2})
    run_dir = tmp_path / "run"
    stop = _InterruptAfterFirstEpoch()
    handler = signal.getsignal(signal.SIGINT)
    try:
        train(cfg, run_dir, progress=False, callbacks=[stop])
    except SystemExit:  # Lightning ends the process after a graceful shutdown on KeyboardInterrupt
        pass
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores further Ctrl+C from then on
    assert stop.saw_interrupted  # Lightning marked the trainer interrupted
    # the interrupted run still recorded what it did
    interrupted = json.loads((run_dir / "summary.json").read_text())
    assert interrupted["status"] == "interrupted" and interrupted["epochs_completed"] == 1
    last = run_dir / "last.ckpt"
    assert last.is_file()
    first = torch.load(last, map_location="cpu", weights_only=False)
    assert first["epoch"] == 0 and first["global_step"] > 0
    assert [int(r["epoch"]) for r in _metrics_rows(run_dir)] == [0]

    assert "boneage_rng" in first  # the random streams travel with the checkpoint
    epoch0 = float(_metrics_rows(run_dir)[0]["elapsed_s"])
    (run_dir / "summary.json").unlink()  # as a session killed outright (SIGKILL) leaves the folder
    summary = train(cfg, run_dir, progress=False)
    # the training time before the kill still counts: metrics.csv recorded it
    assert summary["total_fit_seconds"] >= round(epoch0 + summary["fit_seconds"], 1) - 0.1
    assert summary["status"] == "finished"
    assert summary["resumed_from"] == str(last)
    assert summary["epochs_completed"] == 2
    assert not summary["interrupted"]
    assert [int(r["epoch"]) for r in _metrics_rows(run_dir)] == [0, 1]  # epoch 0 was not trained again
    final = torch.load(last, map_location="cpu", weights_only=False)
    assert final["global_step"] == 2 * first["global_step"]  # one more epoch of steps, not two
    assert (run_dir / "best.ckpt").is_file()
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from"] == str(last)


@pytest.mark.integration
def test_resumed_run_ends_where_an_uninterrupted_one_does(
    shared_sample: Path, tiny_cache_dir: Path, tmp_path: Path
) -> None:
    """Resume restores weights, optimiser, schedule and the random streams (augmentation, shuffling):
    a run interrupted after epoch 0 and resumed ends with the weights of a run that never stopped."""
    cfg = make_tiny_train_config(shared_sample, tiny_cache_dir, train={"epochs": 2})
    train(cfg, tmp_path / "straight", progress=False)
    handler = signal.getsignal(signal.SIGINT)
    try:
        train(cfg, tmp_path / "resumed", progress=False, callbacks=[_InterruptAfterFirstEpoch()])
    except SystemExit:
        pass
    finally:
        signal.signal(signal.SIGINT, handler)
    train(cfg, tmp_path / "resumed", progress=False)
    a = torch.load(tmp_path / "straight" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "resumed" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.integration
def test_bad_optimizer_is_a_user_error(shared_sample: Path, tiny_cache_dir: Path, tmp_path: Path) -> None:
    # a typo in the optimiser fails when the config is built, before any image is read
    with pytest.raises(BoneAgeInputError, match="train.optimizer='rmsprop' is not allowed"):
        make_tiny_train_config(shared_sample, tiny_cache_dir, train={"optimizer": "rmsprop"})


@pytest.mark.parametrize("kind", ["cosine", "exponential"])
def test_lr_decays_to_the_final_factor(kind: str) -> None:
    f = lr_lambda(kind, total=100, warmup=0, final=0.01)
    values = [f(step) for step in range(101)]
    assert values[0] == pytest.approx(1.0)
    assert values[100] == pytest.approx(0.01)
    assert all(a >= b - 1e-12 for a, b in zip(values, values[1:], strict=False))  # never increases
    assert f(500) == pytest.approx(0.01)  # past the end it stays at the final factor
    if kind == "exponential":
        assert f(50) == pytest.approx(0.1)  # geometric: halfway is sqrt(final)
    else:
        assert f(50) == pytest.approx(0.505)  # cosine: halfway is the mean of 1 and final


def test_lr_warmup_then_decay() -> None:
    f = lr_lambda("cosine", total=110, warmup=10, final=0.1)
    assert [f(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert f(10) == pytest.approx(1.0)
    assert f(110) == pytest.approx(0.1)


def test_lr_constant_and_unknown() -> None:
    f = lr_lambda("constant", total=10, warmup=0, final=0.01)
    assert {f(s) for s in range(20)} == {1.0}
    with pytest.raises(BoneAgeInputError, match="unknown LR schedule 'linear'"):
        lr_lambda("linear", total=10, warmup=0, final=0.01)


@pytest.mark.parametrize(
    ("asked", "native_bf16", "expected"),
    [
        ("auto", True, "bf16-mixed"),
        ("auto", False, "32-true"),
        ("bf16-mixed", False, "32-true"),
        ("bf16-mixed", True, "bf16-mixed"),
        ("16-mixed", True, "32-true"),
    ],
)
def test_cpu_precision_follows_the_cpu(monkeypatch, asked: str, native_bf16: bool, expected: str) -> None:
    """bf16 autocast only where the CPU has bf16 units (it is emulated, and slower, elsewhere); fp16 needs
    a GPU. Either way a CPU run trains instead of failing."""
    from boneage import training
    from boneage.config import build_config

    monkeypatch.setattr(training, "cpu_has_bf16", lambda: native_bf16)
    cfg = build_config({}, ["trainer.accelerator=cpu", f"trainer.precision={asked}"])
    assert training._device_settings(cfg) == ("cpu", expected)


def test_label_distribution_loss_fits_a_batch() -> None:
    """The DLDL-v2 loss (KL to Gaussian label distributions + L1 of the expected age) is smallest at the
    right ages: a few Adam steps on one batch bring the expected ages towards the labels."""
    from boneage.train.loop import BoneAgeModule

    torch.manual_seed(0)
    spec = {"backbone": "test_efficientnet", "head": [16], "sex_units": 4, "dropout": 0.0, "age_bins": 41}
    module = BoneAgeModule(spec, train={"label_sigma": 6.0})
    module.model.set_target_stats(120.0, 40.0)
    images, male = torch.rand(4, 1, 32, 32), torch.tensor([0.0, 1.0, 0.0, 1.0])
    age = torch.tensor([30.0, 80.0, 150.0, 200.0])
    module.model.train()
    opt = torch.optim.Adam(module.model.parameters(), lr=1e-2)
    first_loss, first = module.distribution_loss(images, male, age)
    for _ in range(60):
        loss, months = module.distribution_loss(images, male, age)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * float(first_loss.detach())
    assert float((months.detach() - age).abs().mean()) < 0.5 * float((first.detach() - age).abs().mean())


@pytest.mark.integration
def test_label_distribution_run_trains_and_predicts(
    shared_sample: Path, tiny_cache_dir: Path, tmp_path: Path
) -> None:
    """A real (tiny) run with ``model.age_bins``: its checkpoint carries the bins in its spec and predicts
    through the ordinary Predictor, inside the bins' age range."""
    from boneage.predict import load_predictor

    cfg = make_tiny_train_config(
        shared_sample, tiny_cache_dir, model={"age_bins": 24, "age_range": [0, 240]}, train={"label_sigma": 8}
    )
    summary = train(cfg, tmp_path / "run", progress=False)
    assert math.isfinite(summary["best_val_mae"])
    predictor = load_predictor(tmp_path / "run" / "best.ckpt", engine="torch")
    assert predictor.spec.age_bins == 24 and predictor.engine.model.head.out.out_features == 24
    image = sorted((shared_sample / "images").glob("*.png"))[0]
    pred = predictor.predict(image, "female")
    assert 0 < pred.bone_age_months < 240


def test_a_cycle_from_its_parent_with_the_parent_s_seed_is_warned(tmp_path: Path, caplog) -> None:
    """Same seed as the parent's checkpoint: the first epoch would replay the parent's augmented views."""
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"train": {"seed": 42}}}, ckpt)
    with caplog.at_level("WARNING", logger="boneage.train.loop"):
        assert parent_seed(str(ckpt), 42) == 42
    assert "replays" in caplog.text and "train.seed" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="boneage.train.loop"):
        assert parent_seed(str(ckpt), 7) == 42  # a new seed: recorded, no warning
    assert caplog.text == ""
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")  # no training record: nothing to compare
    assert parent_seed(str(tmp_path / "foreign.ckpt"), 42) is None
    for other in ("imagenet", "none", None, str(tmp_path / "model.safetensors"), str(tmp_path / "gone.ckpt")):
        assert parent_seed(other, 42) is None
