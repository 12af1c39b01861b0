"""Checkpoint → the shipped model: an fp16 safetensors file with its ``ModelSpec`` and model-card facts,
and the ONNX graph of the same weights beside it (``model.onnx``) for the torch-free engine.

The file carries what prediction needs and nothing about how the model was trained (no data paths, no
optimiser). ``make_bundle`` also measures the facts a clinician-facing model must state: its MAE on the
held-out ids (in the training geometry, and on the clinic-geometry files through the full ``predict`` path),
the TTA spread real hands give (the threshold of the "unlike a hand" warning) and the bone-age range it was
trained on.
``Predictor.load`` reads both this layout and v0.1's; ``convert_bundle`` rewrites a v0.1 file in this one.
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import yaml

from boneage import __version__
from boneage.config import RunConfig, config_from_dict
from boneage.errors import BoneAgeInputError
from boneage.evaluation import align_predictions, evaluate, mean_and_se, read_predictions
from boneage.inference import AVERAGE_RECORDS, Predictor, export_bundle_onnx
from boneage.io import read_radiograph
from boneage.labels import read_labels
from boneage.ood import (
    TEXTURE_COMPONENTS,
    TEXTURE_STAGE,
    FeatureDensity,
    OrientationProbe,
    rotation_ratios,
    turned,
)
from boneage.runs import git_commit
from boneage.runtime import oriented_pixels

if TYPE_CHECKING:
    from boneage.data import BoneAgeDataModule
    from boneage.spec import ModelSpec

log = logging.getLogger(__name__)

LICENCE = "RSNA Pediatric Bone Age data: non-commercial research and education use only"


def save_bundle(predictor: Predictor, path: str | Path, facts: dict[str, Any] | None = None) -> Path:
    """fp16 safetensors with the spec and facts in its metadata (and the OOD density, fp32, when the
    predictor has one), plus the ONNX graph of the same weights beside it (``model.onnx``, fp16
    initializers, in-graph Grad-CAM) for ``boneage.runtime``: two files, together well under 25 MB."""
    import torch
    from safetensors.torch import save_file

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.half() if v.is_floating_point() and not k.startswith(("age_", "pixel_")) else v).contiguous()
        for k, v in predictor.model.state_dict().items()
    }
    if predictor.ood is not None:
        state.update({k: torch.from_numpy(v).contiguous() for k, v in predictor.ood.to_tensors().items()})
    meta = {
        **{k: v for k, v in predictor.meta.items() if k not in {"source", "config", "spec"}},
        **(facts or {}),
        "spec": predictor.spec.model_dump(),
    }
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(state, str(tmp), metadata={"boneage": json.dumps(meta)})
    tmp.replace(out)
    export_bundle_onnx(out)  # model.onnx beside it, from the same (upcast fp16) weights: the light engine
    return out


def convert_bundle(old: str | Path, new: str | Path) -> Path:
    """A v0.1 bundle (whole training config in its metadata) rewritten with only its model spec."""
    predictor = Predictor.load(old, tta=False)
    return save_bundle(predictor, new, {"converted_from": "v0.1 layout"})


# the JPEG quality of the shared 299 px training copies (../shared/data/rsna-bone-age-299/README.md)
TRAINING_COPY_QUALITY = 60
OOD_QUANTILE = 0.995
OOD_MARGIN = 1.25
OOD_CALIBRATION_IMAGES = 3000  # training images kept out of the density fit, to calibrate its threshold
ORIENTATION_IMAGES = 1000  # training images shown in all five orientations to fit the orientation probe


def _cached_images(predictor: Predictor, table: pd.DataFrame, cache: str | Path) -> np.ndarray:
    from boneage.cache import cached_images

    return cached_images(cache, predictor.preprocess, table, workers=2, progress=False)


def fit_ood(
    plain: Predictor, dm: Any, n_train: int, cache: str | Path
) -> tuple[FeatureDensity, dict[str, Any]]:
    """The feature density of ``boneage.ood`` and its orientation probe, with what they were measured to do.

    Three disjoint sets of training ids (never the held-out ones): ``n_train`` images fit the density;
    its threshold is the ``OOD_QUANTILE`` of the scores of up to ``OOD_CALIBRATION_IMAGES`` others plus
    the validation split, times ``OOD_MARGIN`` (v0.2 calibrated on the 569 validation images alone, whose
    99.5% quantile is about their third-largest score: too noisy for a 1% false-refusal target). The
    probe learns from the first ``ORIENTATION_IMAGES`` of the fit set in all five orientations, and the
    validation split, upright and turned, measures it."""
    rng = np.random.default_rng(0)
    train = dm.train_set
    order = rng.permutation(len(train))
    fit_idx = np.sort(order[:n_train])
    cal_idx = np.sort(order[n_train : n_train + OOD_CALIBRATION_IMAGES])
    male_all = train.male.numpy() > 0.5

    def features(images: np.ndarray, male: np.ndarray) -> np.ndarray:
        return plain.predict_arrays(images, male, features=True)[3]

    images = train.array(fit_idx)
    feats = features(images, male_all[fit_idx])
    density = FeatureDensity.fit(feats)
    val = dm.val_set
    val_images, val_male = val.array(), val.male.numpy() > 0.5
    val_feats = features(val_images, val_male)
    cal_feats = features(train.array(cal_idx), male_all[cal_idx]) if len(cal_idx) else val_feats[:0]
    density.calibrate(np.concatenate([cal_feats, val_feats]), OOD_QUANTILE, OOD_MARGIN)
    # orientation: the probe, fitted on turned training images, judged on the turned validation split
    n_orient = min(ORIENTATION_IMAGES, len(fit_idx))
    orient_feats = features(turned(images[:n_orient]), np.tile(male_all[fit_idx][:n_orient], 4))
    density.orientation = OrientationProbe.fit(feats[:n_orient], orient_feats)
    turned_feats = features(turned(val_images), np.tile(val_male, 4))
    val_scores, cal_scores = density.score(val_feats), density.score(cal_feats)
    texture_report = _fit_texture(plain, density, images, train, cal_idx, val_images)
    ratios = rotation_ratios(val_scores, density.score(turned_feats))
    density.rotation_ratio = float(np.quantile(ratios, OOD_QUANTILE) * OOD_MARGIN)  # for older runtimes
    probe = density.orientation
    # a turned image's other orientations include the upright one, so score(turned) / score(upright) is a
    # lower bound of its ratio: above the confirm ratio, the warning is certain to be confirmed
    turned_ratio_floor = density.score(turned_feats) / np.maximum(np.tile(val_scores, 4), 1e-9)
    report = {
        "ood_train_images": len(fit_idx),
        "ood_calibration_images": len(cal_idx) + len(val_feats),
        "ood_calibration": f"{OOD_MARGIN} x the {OOD_QUANTILE:.1%} quantile of the scores of "
        f"{len(cal_idx)} training images outside the fit and the {len(val_feats)}-image validation split",
        "ood_flagged_val_split": [int(density.refuses(val_scores).sum()), len(val_scores)],
        "ood_flagged_calibration_train": [int(density.refuses(cal_scores).sum()), len(cal_scores)],
        "orientation_train_images": n_orient,
        "orientation_val_upright_flagged": [
            int(density.looks_turned(val_feats, ratios).sum()),
            len(val_feats),
        ],
        "orientation_val_upright_flagged_probe_alone": [
            int((probe.upright_probability(val_feats) < probe.limit).sum()),
            len(val_feats),
        ],
        "orientation_val_turned_detected_at_least": [
            int(density.looks_turned(turned_feats, turned_ratio_floor).sum()),
            len(turned_feats),
        ],
        **texture_report,
    }
    return density, report


def _fit_texture(
    plain: Predictor,
    density: FeatureDensity,
    fit_images: np.ndarray,
    train: Any,
    cal_idx: np.ndarray,
    val_images: np.ndarray,
) -> dict[str, Any]:
    """The texture density (``boneage.ood``): early-stage statistics of the same fit images, calibrated
    like the pooled density. A squash model's training images are the 299 px JPEG copies already, so they
    are used as cached; ``predict`` remakes every input that way first (``density.copy_recipe``)."""
    fit_stats = plain.texture_statistics(fit_images)
    if fit_stats is None or not fit_stats.size:
        return {"ood_texture": "not fitted: this backbone has no EfficientNet-layout stage to tap"}
    texture = FeatureDensity.fit(fit_stats, components=TEXTURE_COMPONENTS)
    cal_stats = plain.texture_statistics(train.array(cal_idx)) if len(cal_idx) else fit_stats[:0]
    val_stats = plain.texture_statistics(val_images)
    assert cal_stats is not None and val_stats is not None
    texture.calibrate(np.concatenate([cal_stats, val_stats]), OOD_QUANTILE, OOD_MARGIN)
    density.texture = texture
    pre = plain.spec.preprocess
    # a squash-geometry model was trained on the shared 299 px JPEG copies: inputs are remade that way
    # first; any other model's statistics are taken from its plain input
    density.copy_recipe = (pre.squash_size, TRAINING_COPY_QUALITY) if pre.geometry == "squash" else (0, 0)
    return {
        "ood_texture_stage": TEXTURE_STAGE,
        "ood_texture_components": int(len(texture.variances)),
        "ood_texture_threshold": round(texture.threshold, 3),
        "ood_texture_copy_recipe": list(density.copy_recipe),
        "ood_texture_flagged_val_split": [
            int(texture.refuses(texture.score(val_stats)).sum()),
            len(val_stats),
        ],
        "ood_texture_flagged_calibration_train": [
            int(texture.refuses(texture.score(cal_stats)).sum()),
            len(cal_stats),
        ],
    }


def run_config_for(checkpoint: str | Path) -> RunConfig:
    """The run config a checkpoint was trained with: the run folder's config.yaml (v0.1 checkpoints also
    carried it inside)."""
    ckpt = Path(checkpoint)
    saved = ckpt.parent / "config.yaml"
    if saved.is_file():
        return config_from_dict(yaml.safe_load(saved.read_text()) or {}, source=saved)
    import torch

    blob = torch.load(ckpt, map_location="cpu", weights_only=False)
    hp = blob.get("hyper_parameters", {}) if isinstance(blob, dict) else {}
    if "config" in hp:
        return config_from_dict(hp["config"], source=ckpt)
    raise BoneAgeInputError(
        "no config.yaml beside the checkpoint: cannot tell which images it trained on", ckpt
    )


def run_split(cfg: RunConfig) -> tuple[BoneAgeDataModule, pd.DataFrame]:
    """The run's data module, set up with the split it trained on, and its validation table: the images
    that choose (checkpoints, ship rules) and calibrate, so every report on a candidate scores the same
    ids."""
    from boneage.data import BoneAgeDataModule

    dm = BoneAgeDataModule(
        cfg.data.model_copy(update={"holdout_monitor": False}), cfg.preprocess, progress=False
    )
    dm.setup("fit")
    assert dm.labels is not None
    return dm, dm.labels.iloc[dm.val_idx].reset_index(drop=True)


def ship_bar(cfg: RunConfig, model: str | Path, bar: float | None = None) -> float | None:
    """The bar of the ship rule written in the candidate's config (``ship``). A bar given on the command line
    must equal it, and the model must be the checkpoint the rule names, so a decision cannot quietly use
    another bar or another epoch than the one fixed before training. Cheap: check it before scoring.

    None only for a paired-only rule (``ship.paired_with`` and no bar): a go/no-go gate on a line's first
    stage, which asks to beat its control image by image and has no absolute figure to reach."""
    rule = cfg.ship
    if rule.bar is None and bar is None and rule.paired_with is None:
        raise BoneAgeInputError(
            "no ship bar: the config's ship.bar and ship.paired_with are unset and no bar was given", model
        )
    if rule.bar is not None and bar is not None and abs(bar - rule.bar) > 1e-9:
        raise BoneAgeInputError(f"bar {bar} differs from the config's ship.bar {rule.bar}", model)
    if rule.paired_with is not None and not Path(rule.paired_with).expanduser().is_file():
        raise BoneAgeInputError("the incumbent's per-image predictions (ship.paired_with) are missing", model)
    name = Path(model).name
    if name.endswith(".ckpt") and name != f"{rule.checkpoint}.ckpt":
        raise BoneAgeInputError(f"the config's ship rule offers {rule.checkpoint}.ckpt, not {name}", model)
    if rule.bar is not None:
        return rule.bar
    return None if bar is None else float(bar)


def ship_decision(
    cfg: RunConfig,
    model: str | Path,
    mae: float,
    bar: float | None = None,
    predictions: pd.DataFrame | None = None,
) -> dict[str, Any]:
    """The ship rule applied to the candidate's measured MAE (see ``ship_bar``) and, when the rule names an
    incumbent's per-image predictions (``ship.paired_with``), to the paired difference on the same ids.
    A paired-only rule (no bar) decides by the paired difference alone."""
    chosen = ship_bar(cfg, model, bar)
    decision: dict[str, Any] = {
        "mae": round(float(mae), 3),
        "bar": chosen,
        "checkpoint": cfg.ship.checkpoint,
        "ship": chosen is None or bool(mae <= chosen),  # no bar: the paired condition alone decides
    }
    if cfg.ship.paired_with is not None:
        paired = paired_with_incumbent(cfg, model, predictions)
        decision["paired"] = paired
        decision["ship"] = decision["ship"] and paired["pass"]
    return decision


def paired_with_incumbent(
    cfg: RunConfig, model: str | Path, predictions: pd.DataFrame | None
) -> dict[str, Any]:
    """|error|(candidate) − |error|(incumbent) per image, its mean and standard error, and whether the mean is
    at most ``-ship.paired_se`` standard errors. Both must cover exactly the same ids: a paired difference
    over another split would compare different images."""
    source = Path(str(cfg.ship.paired_with)).expanduser()
    if predictions is None:
        raise BoneAgeInputError(
            "the ship rule is paired, so it needs the candidate's per-image predictions", model
        )
    incumbent = read_predictions(source)
    candidate = predictions.set_index(predictions["id"].astype(str))  # ids are strings, as the reader's
    ref, preds = align_predictions([(str(source), incumbent), ("the candidate", candidate)], same_ids=True)
    errors = preds.sub(ref, axis=0).abs()
    d = (errors[1] - errors[0]).to_numpy(float)
    diff, se = mean_and_se(d)
    return {
        "incumbent": str(cfg.ship.paired_with),
        "n": len(d),
        "diff_candidate_minus_incumbent": round(diff, 3),
        "diff_se": round(se, 3),
        "needs_at_most": round(-cfg.ship.paired_se * se, 3),
        "pass": bool(diff <= -cfg.ship.paired_se * se),
    }


def holdout_tables(cfg: RunConfig, native_images: Path | None) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The held-out ids in the training geometry (from data.images) and, when their own files exist, in
    the clinic's geometry (the holdout CSV's folder, or ``native_images``). Public because every report on
    a candidate model (the bundle, ``benchmarks/ensemble_check.py``) must score the same two tables."""
    from boneage.data import holdout_mask

    d = cfg.data
    labels = read_labels(d.labels, d.images)
    train_geometry = labels[holdout_mask(labels, d.holdout_labels)].reset_index(drop=True)
    folder = native_images or Path(d.holdout_labels).parent / "images"
    native = read_labels(d.holdout_labels, folder) if folder.is_dir() else None
    return train_geometry, native


def average_checkpoints(
    sources: list[str | Path],
    out_path: str | Path,
    *,
    weights: list[float] | None = None,
    config: str | Path | None = None,
    bn_images: int = 0,
    bn_seed: int = 0,
) -> Path:
    """Checkpoints or bundles of one architecture → one checkpoint holding their weighted mean (a model
    soup; ``boneage.models.average_state_dicts``), with ``config.yaml`` beside it so it bundles and
    scores like a trained run. The config gives the data split that judges it: ``config``, or else the
    run config of the first ``.ckpt`` source. With ``bn_images`` the BatchNorm statistics are then
    re-estimated on that many training-split images (``batchnorm_from_training_images``) instead of
    averaged. Bundles' OOD densities are not averaged: a soup's features differ, so ``make_bundle`` fits
    its own."""
    import torch

    from boneage.inference import OOD_PREFIX, read_model_file
    from boneage.models import average_state_dicts, mixing_shares
    from boneage.runtime import file_digest

    paths = [Path(s).expanduser() for s in sources]
    if len(paths) < 2:
        raise BoneAgeInputError("averaging needs at least two models")
    shares = mixing_shares(len(paths), weights)  # bad weights or no split fail before any model is read
    if bn_images < 0:
        raise BoneAgeInputError(f"bn_images must be 0 (average the statistics) or more, got {bn_images}")
    if config is not None:
        from boneage.config import load_config

        cfg = load_config(config)
    else:
        ckpts = [p for p in paths if p.suffix == ".ckpt"]
        if not ckpts:
            raise BoneAgeInputError("no .ckpt among the models: pass the run config that gives the split")
        cfg = run_config_for(ckpts[0])
    specs, states = [], []
    for p in paths:
        _facts, spec, state = read_model_file(p)
        specs.append(spec)
        states.append({k: v for k, v in state.items() if not k.startswith(OOD_PREFIX)})
    first = specs[0].model_dump()
    for p, spec in zip(paths[1:], specs[1:], strict=True):
        other = spec.model_dump()
        # "versions" records the software that wrote each file, not what the weights mean
        differ = sorted(
            k for k in first.keys() | other.keys() if k != "versions" and first.get(k) != other.get(k)
        )
        if differ:
            raise BoneAgeInputError(
                f"its model spec differs from {paths[0].name}'s in {', '.join(differ)}", p
            )
    mean = average_state_dicts(states, shares)
    batchnorm = None
    if bn_images:
        mean, batchnorm = batchnorm_from_training_images(mean, specs[0], cfg, bn_images, bn_seed)
    out = Path(out_path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    from boneage.experiments import config_differences  # how a grid tells its saved run config from a new one

    differ = config_differences(out.parent, cfg)
    if differ:
        raise BoneAgeInputError(
            f"a different config.yaml is already there ({'; '.join(differ[:3])}): write the average "
            "elsewhere",
            out.parent / "config.yaml",
        )
    cfg.save(out.parent / "config.yaml")
    blob = {
        "state_dict": {f"model.{k}": v for k, v in mean.items()},
        "boneage_spec": first,
        "averaged_from": [
            # the name and digest, not the path: a bundle made from this must not carry a local folder
            {"file": p.name, "sha256": file_digest(p), "weight": round(w, 6)}
            for p, w in zip(paths, shares, strict=True)
        ],
        **({"batchnorm": batchnorm} if batchnorm else {}),
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "git_commit": git_commit(),
    }
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save(blob, tmp)
    tmp.replace(out)
    return out


def batchnorm_from_training_images(
    state: dict[str, Any], spec: ModelSpec, cfg: RunConfig, n: int, seed: int = 0, batch_size: int = 32
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state with re-estimated BatchNorm statistics, a record of how): ``n`` images drawn (``seed``) from
    the run's training split, preprocessed as the model's spec says, under the run's augmentation, because
    that is how the ingredients' own statistics were gathered during training."""
    import torch

    from boneage.augment import Augment
    from boneage.data import to_float
    from boneage.models import BoneAgeNet, reestimate_batchnorm

    if cfg.preprocess != spec.preprocess:  # the split's cached images must be what the models see
        raise BoneAgeInputError(f"the run config {cfg.name!r} preprocesses otherwise than the models' spec")
    dm, _ = run_split(cfg)
    train = dm.train_set  # the run's cached training images, as fit_ood reads them
    rows = np.sort(np.random.default_rng(seed).choice(len(train), size=min(n, len(train)), replace=False))
    images, male = torch.from_numpy(train.array(rows)), train.male[rows]
    model = BoneAgeNet.from_spec(spec)
    model.load_state_dict(state)
    augment = Augment(cfg.augment)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(images), batch_size):
            x = to_float(images[start : start + batch_size, None])
            yield augment(x), male[start : start + batch_size]

    with torch.random.fork_rng():  # the augmentation draws from its own seeded stream
        torch.manual_seed(seed)
        seen = reestimate_batchnorm(model, batches())
    record = {"images": seen, "seed": seed, "split": "training", "augmented": augment.enabled}
    log.info("re-estimated BatchNorm statistics on %d training images", seen)
    return dict(model.state_dict()), record


def make_bundle(
    checkpoint: str | Path,
    out_path: str | Path,
    *,
    version: str = __version__,
    native_images: str | Path | None = None,
    cache_dir: str | Path | None = None,
    ood_train_images: int = 3000,
    progress: bool = False,
    on_step: Callable[[str], None] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Checkpoint → bundled model with its measured facts (see the module docstring).

    With ``data.holdout_labels`` in the run config, accuracy is measured on those never-trained-on ids:
    in the training geometry (the cached training images) and, through ``Predictor.predict``'s own file
    reading, on their native-aspect files. Warning thresholds come from the run's validation split
    (training ids), so the held-out ids judge the model and nothing else. Without a holdout, the run's
    own validation split is used, as v0.1 did.
    """
    say = on_step or (lambda _msg: None)
    cfg = run_config_for(checkpoint)
    predictor = Predictor.load(checkpoint, runtime="auto")
    plain = Predictor.load(checkpoint, tta=False, runtime="auto")
    cache = cache_dir or cfg.data.cache_dir
    dm, val = run_split(cfg)
    assert dm.labels is not None
    train_ages = dm.labels.iloc[dm.train_idx]["boneage"].to_numpy(float)
    say(f"validation split ({len(val)} training-set ids, TTA)")
    val_report = evaluate(predictor, val, cache_dir=cache, progress=progress)
    spread = val_report.predictions["uncertainty"].to_numpy(float)
    say(f"OOD density: features of {min(ood_train_images, len(dm.train_idx))} training images")
    predictor.ood, ood_report = fit_ood(plain, dm, ood_train_images, cache)
    plain.ood = predictor.ood
    facts: dict[str, Any] = {
        "version": version,
        "backbone": predictor.spec.backbone,
        "input_size": predictor.spec.preprocess.size,
        "geometry": predictor.spec.preprocess.geometry,
        "train_images": int(len(dm.train_idx)),
        "training_range_months": [float(train_ages.min()), float(train_ages.max())],
        "val_split_images": int(len(val)),
        "val_split_mae_months": round(val_report.metrics["mae_months"], 3),
        # the "unlike a hand" warning: 1.5 x the 99th percentile of the TTA spread on real validation hands
        "tta_spread_p99_months": round(float(np.percentile(spread, 99)) * 1.5, 2),
        "ood_threshold": round(predictor.ood.threshold, 3),
        "ood_rotation_ratio": round(predictor.ood.rotation_ratio, 3),
        **ood_report,
        "created": datetime.date.today().isoformat(),
        "git_commit": git_commit(),
        "source_checkpoint": Path(checkpoint).name,
        "licence": LICENCE,
    }
    facts.update({k: predictor.meta[k] for k in AVERAGE_RECORDS if k in predictor.meta})
    if cfg.data.holdout_labels:
        held, native = holdout_tables(cfg, Path(native_images) if native_images else None)
        say(f"held-out ids, training geometry ({len(held)} images)")
        rep = evaluate(predictor, held, cache_dir=cache, progress=progress)
        rep_plain = evaluate(plain, held, cache_dir=cache, progress=progress)
        held_images = _cached_images(plain, held, cache)
        held_scores = plain.ood_scores(held_images, held["male"].to_numpy(bool))
        facts["ood_flagged_train_geometry"] = [int(predictor.ood.refuses(held_scores).sum()), len(held)]
        facts.update(
            trained_on=f"{len(dm.train_idx)} RSNA Pediatric Bone Age 2017 training radiographs (squashed "
            f"299 px copies); {len(held)} ids of {Path(cfg.data.holdout_labels).parent.name} held out",
            validation_images=len(held),
            val_mae_months=round(rep.metrics["mae_months"], 3),
            val_mae_no_tta_months=round(rep_plain.metrics["mae_months"], 3),
            val_rmse_months=round(rep.metrics["rmse_months"], 3),
            val_bias_months=round(rep.metrics["bias_months"], 3),
        )
        if native is not None:
            say(f"held-out ids, native-aspect files through the predict path ({len(native)} images)")
            nat = evaluate(predictor, native, progress=progress)  # no cache: read and preprocess each file
            nat_plain = evaluate(plain, native, progress=progress)
            pooled, tex = [], []
            for path in native["path"]:  # one read per file: the scores the refusal rule judges, as predict
                rad = read_radiograph(path)
                score, texture_score = plain.refusal_scores(oriented_pixels(rad), None)
                pooled.append(np.nan if score is None else score)
                tex.append(np.nan if texture_score is None else texture_score)
            nat_scores = np.asarray(pooled, dtype=float)
            flagged = predictor.ood.refuses(nat_scores)
            facts["ood_flagged_native_pooled"] = [int(flagged.sum()), len(native)]
            nat.predictions["ood_score"] = np.round(nat_scores, 4)
            if predictor.ood.texture is not None:
                tex = np.asarray(tex, dtype=float)
                tex_flagged = predictor.ood.texture.refuses(tex)
                flagged |= tex_flagged
                facts["ood_flagged_native_texture"] = [
                    int(tex_flagged.sum()),
                    len(native),
                ]
                nat.predictions["ood_texture_score"] = np.round(tex, 4)
            facts["ood_flagged_native"] = [int(flagged.sum()), len(native)]
            merged = nat.predictions.merge(rep.predictions, on="id", suffixes=("", "_train_geometry"))
            facts.update(
                native_images=len(native),
                native_mae_months=round(nat.metrics["mae_months"], 3),
                native_mae_no_tta_months=round(nat_plain.metrics["mae_months"], 3),
                native_rmse_months=round(nat.metrics["rmse_months"], 3),
                native_bias_months=round(nat.metrics["bias_months"], 3),
                geometry_mean_abs_difference_months=round(
                    float(np.mean(np.abs(merged["predicted"] - merged["predicted_train_geometry"]))), 3
                ),
                native_mae_by_sex={
                    k: round(v["mae_months"], 3) for k, v in nat.metrics["mae_by_sex"].items()
                },
                native_mae_by_age_band={
                    k: [v["n"], round(v["mae_months"], 3)] for k, v in nat.metrics["mae_by_age_band"].items()
                },
            )
            facts["_predictions"] = {"native": nat.predictions, "train_geometry": rep.predictions}
    else:
        rep_plain = evaluate(plain, val, cache_dir=cache, progress=progress)
        facts.update(
            trained_on=f"{len(dm.train_idx)} RSNA Pediatric Bone Age 2017 training radiographs "
            "(stratified split)",
            validation_images=len(val),
            val_mae_months=round(val_report.metrics["mae_months"], 3),
            val_mae_no_tta_months=round(rep_plain.metrics["mae_months"], 3),
            val_rmse_months=round(val_report.metrics["rmse_months"], 3),
        )
    predictions = facts.pop("_predictions", None)
    path = save_bundle(predictor, out_path, facts)
    if predictions is not None:
        facts["_predictions"] = predictions  # for the caller's reports; not stored in the bundle
    return path, facts
