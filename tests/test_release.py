"""Release tooling: bundling a run (measured facts), weight averages, ship rules and paired comparisons."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_tiny_predictor, make_tiny_train_config
from safetensors import safe_open

from boneage.errors import BoneAgeInputError
from boneage.ood import TEXTURE_STAGE
from boneage.predict import load_predictor
from boneage.release.average import average_checkpoints
from boneage.release.bundle import make_bundle, save_model_file
from boneage.release.runs import run_config_for
from boneage.release.ship import ship_bar


def _meta(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["boneage"])


def test_convert_cli(tmp_path: Path, tiny_bundle: Path) -> None:
    from typer.testing import CliRunner

    from boneage.cli import app

    result = CliRunner().invoke(
        app, ["bundle", "--convert", str(tiny_bundle), "--out", str(tmp_path / "c.safetensors")]
    )
    assert result.exit_code == 0, result.output
    assert "spec" in _meta(tmp_path / "c.safetensors")
    result = CliRunner().invoke(app, ["bundle", "--out", str(tmp_path / "x.safetensors")])
    assert result.exit_code == 2 and "--checkpoint" in result.output


@pytest.fixture(scope="module")
def holdout_run(shared_sample: Path, tiny_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """(run folder, its config file, summary, held-out labels) of a tiny run with 8 held-out ids and a ship
    rule no tiny model meets; trained once for the release tests."""
    from boneage.train.loop import train

    folder = tmp_path_factory.mktemp("holdout-run")
    labels = pd.read_csv(shared_sample / "labels.csv", dtype={"id": str})
    held = labels.iloc[:8]
    holdout_csv = folder / "holdout.csv"
    held.to_csv(holdout_csv, index=False)
    cfg = make_tiny_train_config(
        shared_sample,
        tiny_cache_dir,
        data={"limit": 48, "holdout_labels": str(holdout_csv)},
        ship={"bar": 1.0, "checkpoint": "last"},
    )
    config = folder / "candidate.yaml"
    cfg.save(config)
    run = folder / "run"
    summary = train(cfg, run, progress=False)
    return run, config, summary, held


@pytest.mark.integration
def test_make_bundle_measures_the_holdout_in_both_geometries(
    holdout_run, shared_sample: Path, tmp_path: Path
) -> None:
    """With data.holdout_labels the held-out ids never train, are scored each epoch, and the bundle states
    their MAE in the training geometry and through the predict path on their own files."""
    run, _, summary, held = holdout_run
    assert summary["holdout_images"] == 8 and summary["train_images"] + summary["val_images"] == 40
    rows = pd.read_csv(run / "metrics.csv")
    assert np.isfinite(rows["holdout_mae"]).all()  # scored every epoch, a record only
    path, facts, preds = make_bundle(
        run / "best.ckpt",
        tmp_path / "m.safetensors",
        model_version="9.9.9",
        native_images=shared_sample / "images",
    )
    assert facts.heldout_training_geometry.images == 8 and facts.heldout_native.images == 8
    assert set(preds["heldout_native"]["id"]) == set(held["id"])
    assert facts.model_version == "9.9.9" and facts.validation_split.images == summary["val_images"]
    assert facts.heldout_native.mae_by_sex and facts.tta_spread_p99_months > 0
    assert facts.ood.calibration_images and facts.ood.texture_threshold
    assert facts.ood.texture_stage == TEXTURE_STAGE  # a checkpoint is fitted on today's stage, and says so
    assert {
        "orientation_val_turned_detected_at_least",
        "heldout_native_texture",
        "heldout_native_polarity_in_doubt",
    } <= set(facts.ood.flagged)
    assert "polarity_log_ratio" in preds["heldout_native"].columns  # recorded per image, as predict judges it
    predictor = load_predictor(path)
    assert predictor.facts == facts  # what was measured is what the file states, typed
    loaded = predictor.ood
    assert loaded.orientation is not None  # the orientation probe ships in the model file
    assert loaded.texture is not None  # and the texture density; letterbox: no remaking of the input
    assert loaded.copy_recipe == (0, 0)
    assert facts.ood.flagged["heldout_native"][0] >= facts.ood.flagged["heldout_native_texture"][0]
    lo, hi = facts.training_range_months
    assert 0 < lo < hi <= 240
    assert predictor.training_range == (lo, hi)
    # the same images, the same model: the letterbox geometry reads native files the way training did
    assert facts.geometry_mean_abs_difference_months < 0.5
    with pytest.raises(BoneAgeInputError, match="model version"):
        make_bundle(run / "best.ckpt", tmp_path / "n.safetensors", model_version=" ")


def test_average_state_dicts_is_the_weighted_mean() -> None:
    """Floating tensors (BatchNorm statistics included) are the weighted mean; step counters come from
    the first model; models of another shape are refused, naming the tensor."""
    import torch

    from boneage.models.surgery import average_state_dicts

    a = {"w": torch.tensor([0.0, 2.0]), "bn.running_var": torch.tensor([1.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 6.0]), "bn.running_var": torch.tensor([3.0]), "n": torch.tensor(9)}
    mean = average_state_dicts([a, b])
    assert torch.equal(mean["w"], torch.tensor([2.0, 4.0])) and mean["bn.running_var"].item() == 2.0
    assert mean["n"].item() == 3 and mean["n"].dtype == torch.int64
    assert torch.allclose(average_state_dicts([a, b], [3, 1])["w"], torch.tensor([1.0, 3.0]))
    with pytest.raises(BoneAgeInputError, match="w is"):
        average_state_dicts([a, {**b, "w": torch.zeros(3)}])
    with pytest.raises(BoneAgeInputError, match="other tensors"):
        average_state_dicts([a, {"w": b["w"], "n": b["n"]}])
    with pytest.raises(BoneAgeInputError, match="weights"):
        average_state_dicts([a, b], [1.0])


@pytest.fixture(scope="module")
def two_bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two tiny bundles of one architecture (each save exports ONNX too: made once for the soup tests).
    The second was written by other software versions: that alone does not make it another architecture."""

    folder = tmp_path_factory.mktemp("soup-ingredients")
    first, second = make_tiny_predictor(seed=0), make_tiny_predictor(seed=1, versions={"boneage": "0.0"})
    a = save_model_file(first, folder / "a.safetensors", first.facts)
    b = save_model_file(second, folder / "b.safetensors", second.facts)
    return a, b


def test_average_checkpoints_makes_a_scorable_soup(
    tmp_path: Path, shared_sample: Path, two_bundles: tuple[Path, Path]
) -> None:
    """Two bundles of one architecture → soup.ckpt holding their mean, config.yaml beside it (the split
    that judges it), a record of its sources; it loads and predicts like any checkpoint, a ship rule can
    name it, and a model of another architecture is refused."""
    import torch

    from boneage.modelfile import ModelFile

    a, b = two_bundles
    cfg_path = tmp_path / "run.yaml"
    cfg = make_tiny_train_config(shared_sample, tmp_path / "cache", ship={"bar": 7.0, "checkpoint": "soup"})
    cfg.save(cfg_path)
    with pytest.raises(BoneAgeInputError, match="no .ckpt"):
        average_checkpoints([a, b], tmp_path / "x" / "soup.ckpt")
    soup = average_checkpoints([a, b], tmp_path / "soup" / "soup.ckpt", config=cfg_path)
    sa, sb, ss = (ModelFile.read(p).network_state() for p in (a, b, soup))
    key = next(k for k in ss if k.endswith("conv_stem.weight"))
    assert torch.allclose(ss[key], (sa[key] + sb[key]) / 2)
    assert run_config_for(soup).ship.checkpoint == "soup"
    assert ship_bar(run_config_for(soup), soup) == 7.0
    p = load_predictor(soup, engine="torch")
    assert [s["weight"] for s in p.facts.averaged_from] == [0.5, 0.5]
    assert p.facts.averaged_from[0]["file"] == "a.safetensors"  # no local folder in what may ship
    assert len(p.facts.averaged_from[1]["sha256"]) == 64
    # a folder already holding another run's config is not overwritten
    other_cfg = tmp_path / "other.yaml"
    make_tiny_train_config(shared_sample, tmp_path / "cache", name="other").save(other_cfg)
    with pytest.raises(BoneAgeInputError, match="different config.yaml"):
        average_checkpoints([a, b], tmp_path / "soup" / "soup2.ckpt", config=other_cfg)
    # the same run config again (e.g. a re-run) is the same split: accepted
    assert average_checkpoints([a, b], tmp_path / "soup" / "soup.ckpt", config=cfg_path) == soup
    assert run_config_for(soup).name == "tiny"
    x = np.full((2, 64, 64), 120, np.uint8)
    assert np.isfinite(p.predict_arrays(x, np.array([True, False]))[0]).all()
    # the average of a model with itself is that model
    same = average_checkpoints([a, a], tmp_path / "same" / "soup.ckpt", config=cfg_path)
    pa = load_predictor(a, engine="torch", tta=False).predict_arrays(x, np.array([True, False]))[0]
    ps = load_predictor(same, engine="torch", tta=False).predict_arrays(x, np.array([True, False]))[0]
    np.testing.assert_allclose(ps, pa, atol=1e-4)
    small = make_tiny_predictor(size=32)
    other = save_model_file(small, tmp_path / "c.safetensors", small.facts)
    with pytest.raises(BoneAgeInputError, match="spec differs .* preprocess"):
        average_checkpoints([a, other], tmp_path / "y" / "soup.ckpt", config=cfg_path)


def test_reestimate_batchnorm_takes_the_plain_average_of_its_batches() -> None:
    """The statistics become the average over the batches given (not an exponential blend with the old
    ones), weights stay, dropout stays off, and the layers' momentum and the model's mode come back."""
    import torch
    from torch import nn

    from boneage.models.surgery import reestimate_batchnorm

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(1, momentum=0.1)
            self.drop = nn.Dropout(0.5)

        def forward(self, image: torch.Tensor, male: torch.Tensor) -> torch.Tensor:
            out = self.drop(self.bn(image)).mean((1, 2, 3))
            assert not self.drop.training
            return out + male

    net = Net().eval()
    net.bn.running_mean.fill_(50.0)
    weight = net.bn.weight.detach().clone()
    batches = [torch.full((4, 1, 3, 3), 2.0), torch.full((4, 1, 3, 3), 4.0)]
    batches[1][0] = 10.0  # a spread inside the second batch
    seen = reestimate_batchnorm(net, [(b, torch.zeros(4)) for b in batches])
    assert seen == 8
    assert net.bn.running_mean.item() == pytest.approx((2.0 + batches[1].mean().item()) / 2)
    assert net.bn.running_var.item() == pytest.approx(batches[1].var().item() / 2, rel=1e-4)
    assert net.bn.momentum == 0.1 and not net.training and torch.equal(net.bn.weight, weight)
    kept = net.bn.running_mean.clone()
    with pytest.raises(BoneAgeInputError, match="no images"):  # nothing to learn from: statistics kept
        reestimate_batchnorm(net, [])
    assert torch.equal(net.bn.running_mean, kept) and net.bn.momentum == 0.1


def test_average_with_batchnorm_reestimated(
    tmp_path: Path, shared_sample: Path, two_bundles: tuple[Path, Path]
) -> None:
    """`--bn-images N`: the soup's weights are still the mean, its BatchNorm statistics are those of N
    training-split images (not the ingredients' mean), the record says so, and a seed repeats it."""
    import torch

    from boneage.modelfile import ModelFile

    a, b = two_bundles
    cfg_path = tmp_path / "run.yaml"  # preprocessing as the bundles' spec (64 px): the images they would see
    make_tiny_train_config(shared_sample, tmp_path / "cache", preprocess={"size": 64}).save(cfg_path)
    plain = average_checkpoints([a, b], tmp_path / "plain" / "soup.ckpt", config=cfg_path)
    bn = average_checkpoints([a, b], tmp_path / "bn" / "soup.ckpt", config=cfg_path, bn_images=12)
    again = average_checkpoints([a, b], tmp_path / "again" / "soup.ckpt", config=cfg_path, bn_images=12)
    sp, sb, sa = (ModelFile.read(p).network_state() for p in (plain, bn, again))
    conv = next(k for k in sp if k.endswith("conv_stem.weight"))
    stat = next(k for k in sp if k.endswith("running_var"))
    assert torch.allclose(sb[conv], sp[conv])
    assert not torch.allclose(sb[stat], sp[stat]) and torch.equal(sb[stat], sa[stat])
    p = load_predictor(bn, engine="torch")
    assert p.facts.batchnorm == {"images": 12, "seed": 0, "split": "training", "augmented": True}
    assert load_predictor(plain, engine="torch").facts.batchnorm is None
    x = np.full((2, 64, 64), 120, np.uint8)
    assert np.isfinite(p.predict_arrays(x, np.array([True, False]))[0]).all()
    with pytest.raises(BoneAgeInputError, match="bn_images"):
        average_checkpoints([a, b], tmp_path / "neg" / "soup.ckpt", config=cfg_path, bn_images=-1)
    other = tmp_path / "other.yaml"  # a run whose cached images are 32 px: not what these models see
    make_tiny_train_config(shared_sample, tmp_path / "cache").save(other)
    with pytest.raises(BoneAgeInputError, match="preprocesses otherwise"):
        average_checkpoints([a, b], tmp_path / "px" / "soup.ckpt", config=other, bn_images=4)


def test_average_cli(tmp_path: Path, shared_sample: Path, two_bundles: tuple[Path, Path]) -> None:
    """`boneage average A B --out soup.ckpt [--bn-images N]` writes the soup; a bad weight count is one
    line, exit 2."""
    from typer.testing import CliRunner

    from boneage.cli import app

    a, b = two_bundles
    cfg_path = tmp_path / "run.yaml"
    make_tiny_train_config(shared_sample, tmp_path / "cache", preprocess={"size": 64}).save(cfg_path)
    out = tmp_path / "soup" / "soup.ckpt"
    runner = CliRunner()
    done = runner.invoke(
        app, ["average", str(a), str(b), "--out", str(out), "--config", str(cfg_path), "--bn-images", "4"]
    )
    assert done.exit_code == 0, done.output
    assert out.is_file() and (out.parent / "config.yaml").is_file()
    assert load_predictor(out, engine="torch").facts.batchnorm["images"] == 4
    bad = runner.invoke(
        app, ["average", str(a), str(b), "--out", str(out), "--config", str(cfg_path), "--weight", "1"]
    )
    assert bad.exit_code == 2 and "1 weights for 2 models" in bad.stderr
    assert len([line for line in bad.stderr.splitlines() if line.strip()]) == 1


def test_background_removal_travels_in_the_bundle(tmp_path: Path, shared_sample: Path) -> None:
    """A model trained with ``preprocess.background: remove`` must see a clinic's file blanked the same way:
    the setting is part of the spec the bundle carries, and the loaded predictor prepares the same pixels."""

    image = shared_sample / "images" / "1377.png"
    removed = make_tiny_predictor(size=64, preprocess={"background": "remove"})
    saved = save_model_file(removed, tmp_path / "bg.safetensors", removed.facts)
    loaded = load_predictor(saved, engine="torch")
    assert loaded.spec.preprocess.background == "remove"
    np.testing.assert_array_equal(loaded.prepare(image)[1], removed.prepare(image)[1])
    kept = make_tiny_predictor(size=64).prepare(image)[1]
    blanked = loaded.prepare(image)[1]
    assert int((blanked == 0).sum()) > int((kept == 0).sum())  # more of the input is black ...
    assert np.all(blanked <= kept)  # ... and blanking only darkens (edges averaged with black when resized)


@pytest.mark.integration
def test_the_release_commands_check_bundle_and_compare(
    holdout_run, shared_sample: Path, tmp_path: Path
) -> None:
    """`boneage release check` applies the rule written in the config (exit 1 when it does not ship, the
    per-image predictions written for later pairing); `release bundle` bundles the checkpoint the rule names
    with its records; `release compare` pairs two prediction files."""
    from typer.testing import CliRunner

    from boneage.cli import app

    run, config, _, _ = holdout_run
    runner = CliRunner()
    check = runner.invoke(
        app,
        [
            "release",
            "check",
            "--model",
            str(run / "last.ckpt"),
            "--config",
            str(config),
            "--out",
            str(tmp_path / "check"),
        ],
    )
    assert check.exit_code == 1, check.output
    decision = json.loads((tmp_path / "check" / "ship_rule.json").read_text())
    assert decision["ship"] is False and decision["bar"] == 1.0 and decision["n"] == 8
    wrong = runner.invoke(
        app, ["release", "check", "--model", str(run / "best.ckpt"), "--config", str(config)]
    )
    assert wrong.exit_code == 2 and "offers last.ckpt, not best.ckpt" in wrong.stderr
    records = tmp_path / "records"
    done = runner.invoke(
        app,
        [
            "release",
            "bundle",
            "--run-dir",
            str(run),
            "--model-version",
            "9.9.9",
            "--out",
            str(tmp_path / "m.safetensors"),
            "--records",
            str(records),
            "--native-images",
            str(shared_sample / "images"),
        ],
    )
    assert done.exit_code == 0, done.output
    facts = json.loads((records / "facts.json").read_text())
    assert facts["model_version"] == "9.9.9" and facts["source_checkpoint"] == "last.ckpt"
    for name in (
        "preds_val_split.csv",
        "preds_heldout_native.csv",
        "metrics_heldout_native.json",
        "mae_vs_time.png",
        "bland_altman.png",
    ):
        assert (records / name).is_file(), name
    compare = runner.invoke(
        app,
        [
            "release",
            "compare",
            str(tmp_path / "check" / "preds_val_split.csv"),
            str(records / "preds_val_split.csv"),
            "--out",
            str(tmp_path / "paired.json"),
        ],
    )
    assert compare.exit_code == 0, compare.output
    paired = json.loads((tmp_path / "paired.json").read_text())
    assert paired["n"] == 8 and abs(paired["diff_b_minus_a"]) < 0.05  # the same model, two engines' rounding
