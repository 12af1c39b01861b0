"""Checkpoint → the shipped model: a model file (``boneage.modelfile``) with the facts a clinician-facing
model must state, measured here, and the ONNX graph of the same weights beside it.

The facts: the MAE on the run's validation split (which chose the checkpoint), on the held-out ids in the
training geometry and, through the full ``predict`` path, on their own (clinic-geometry) files; the TTA
spread real hands give (the threshold of the "unstable" warning); the bone-age range it was trained on; the
OOD densities and what they refuse. Everything is measured on the ONNX engine, the engine clinicians run.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from boneage.data.io import read_radiograph
from boneage.data.shards import cached_images
from boneage.errors import BoneAgeInputError
from boneage.evaluation import EvaluationReport, evaluate
from boneage.modelfile import LICENCE, Measured, ModelFacts, ModelFile, OodFacts, write_model_file
from boneage.models.export import export_model_file_onnx
from boneage.ood.fit import fit_densities
from boneage.ood.polarity import polarity_verdict
from boneage.predict import Predictor, load_predictor, oriented_pixels
from boneage.predict.torch_engine import TorchEngine
from boneage.release.runs import holdout_tables, run_config_for, run_split
from boneage.train.runs import git_commit

OOD_CALIBRATION_IMAGES = 3000  # training images kept out of the density fit, to calibrate its threshold


def save_model_file(predictor: Predictor, path: str | Path, facts: ModelFacts) -> Path:
    """The predictor's network, spec and densities with ``facts`` as a model file, plus its ONNX graph."""
    network = getattr(predictor.engine, "model", None)
    if network is None:
        raise BoneAgeInputError("a model file is written from the torch engine (it holds the network)")
    out = write_model_file(path, predictor.spec, facts, dict(network.state_dict()), predictor.ood)
    export_model_file_onnx(out)  # model.onnx beside it, from the same (upcast fp16) weights
    return out


def convert_bundle(old: str | Path, new: str | Path) -> Path:
    """An older model file (v0.1: a whole training config inside) rewritten in today's layout."""
    predictor = load_predictor(old, engine="torch", tta=False, device="cpu")
    facts = predictor.facts.model_copy(update={"converted_from": f"{Path(old).name} (older layout)"})
    return save_model_file(predictor, new, facts)


def _measured(report: EvaluationReport, plain: EvaluationReport | None = None) -> Measured:
    m = report.metrics
    return Measured(
        images=int(m["n"]),
        mae_months=round(m["mae_months"], 3),
        mae_no_tta_months=None if plain is None else round(plain.metrics["mae_months"], 3),
        rmse_months=round(m["rmse_months"], 3),
        bias_months=round(m["bias_months"], 3),
        mae_by_sex={k: round(v["mae_months"], 3) for k, v in m.get("mae_by_sex", {}).items()},
        mae_by_age_band={k: (v["n"], round(v["mae_months"], 3)) for k, v in m["mae_by_age_band"].items()},
    )


def make_bundle(
    checkpoint: str | Path,
    out_path: str | Path,
    *,
    model_version: str,
    native_images: str | Path | None = None,
    cache_dir: str | Path | None = None,
    ood_train_images: int = 3000,
    progress: bool = False,
    on_step: Callable[[str], None] | None = None,
) -> tuple[Path, ModelFacts, dict[str, pd.DataFrame]]:
    """Checkpoint → model file with its measured facts, and the per-image predictions behind them.

    With ``data.holdout_labels`` in the run config, accuracy is measured on those never-trained-on ids:
    in the training geometry (the cached training images) and, reading each file as ``predict`` does, on
    their native-aspect files. Warning thresholds come from the run's validation split (training ids), so
    the held-out ids judge the model and nothing else."""
    say = on_step or (lambda _msg: None)
    if not str(model_version).strip():
        raise BoneAgeInputError("a bundle needs a model version (--model-version, e.g. 0.13.0)")
    cfg = run_config_for(checkpoint)
    source = ModelFile.read(checkpoint)
    torch_side = load_predictor(checkpoint, engine="torch", tta=False, device="cpu")  # holds the network
    assert isinstance(torch_side.engine, TorchEngine)
    predictor = load_predictor(checkpoint)  # measured on the engine clinicians run
    plain = load_predictor(checkpoint, tta=False)
    cache = cache_dir or cfg.data.cache_dir
    dm, val = run_split(cfg)
    assert dm.labels is not None
    train_ages = dm.labels.iloc[dm.train_idx]["boneage"].to_numpy(float)
    say(f"validation split ({len(val)} training-set ids, TTA)")
    val_report = evaluate(predictor, val, cache_dir=cache, progress=progress)
    spread = val_report.predictions["uncertainty"].to_numpy(float)

    n_fit = min(ood_train_images, len(dm.train_idx))
    say(f"OOD densities: features of {n_fit} training images")
    train = dm.train_set
    order = np.random.default_rng(0).permutation(len(train))
    fit_idx = np.sort(order[:n_fit])
    cal_idx = np.sort(order[n_fit : n_fit + OOD_CALIBRATION_IMAGES])
    male = train.male.numpy() > 0.5
    pre = predictor.spec.preprocess
    recipe = (pre.squash_size, cfg.data.copy_jpeg_quality) if pre.geometry == "squash" else (0, 0)
    if recipe[1] == 0:
        recipe = (0, 0)
    density, ood_report = fit_densities(
        lambda images, m: plain.predict_arrays(images, m, features=True)[3],
        plain.texture_statistics,
        (train.array(fit_idx), male[fit_idx]),
        (train.array(cal_idx), male[cal_idx]),
        (dm.val_set.array(), dm.val_set.male.numpy() > 0.5),
        recipe,
        # the stage both engines' graphs tap: today's choice for a checkpoint, a bundle's own for a bundle
        torch_side.engine.model.texture_stage,
    )
    for p in (predictor, plain, torch_side):
        p.ood = density
    facts = ModelFacts(
        model_version=str(model_version).strip(),
        created=datetime.date.today().isoformat(),
        git_commit=git_commit(),
        source_checkpoint=Path(checkpoint).name,
        licence=LICENCE,
        train_images=int(len(dm.train_idx)),
        training_range_months=(float(train_ages.min()), float(train_ages.max())),
        # the "unstable" warning: 1.5 x the 99th percentile of the TTA spread on real validation hands
        tta_spread_p99_months=round(float(np.percentile(spread, 99)) * 1.5, 2),
        validation_split=Measured(images=len(val), mae_months=round(val_report.metrics["mae_months"], 3)),
        averaged_from=source.facts.averaged_from,
        batchnorm=source.facts.batchnorm,
    )
    copies = f", JPEG q{cfg.data.copy_jpeg_quality} copies" if cfg.data.copy_jpeg_quality else ""
    trained_on = f"{len(dm.train_idx)} radiographs of {Path(cfg.data.labels).parent.name}{copies}"
    predictions: dict[str, pd.DataFrame] = {"val_split": val_report.predictions}
    if cfg.data.holdout_labels:
        held, native = holdout_tables(cfg, Path(native_images) if native_images else None)
        trained_on += f"; {len(held)} ids of {Path(cfg.data.holdout_labels).parent.name} held out"
        say(f"held-out ids, training geometry ({len(held)} images)")
        rep = evaluate(predictor, held, cache_dir=cache, progress=progress)
        rep_plain = evaluate(plain, held, cache_dir=cache, progress=progress)
        held_scores = plain.ood_scores(cached_images(cache, plain.preprocess, held, progress=False))
        ood_report["flagged"]["heldout_training_geometry"] = [
            int(density.refuses(held_scores).sum()),
            len(held),
        ]
        facts.heldout_training_geometry = _measured(rep, rep_plain)
        predictions["heldout_training_geometry"] = rep.predictions
        if native is not None:
            say(f"held-out ids, native-aspect files through the predict path ({len(native)} images)")
            nat = evaluate(predictor, native, progress=progress)  # no cache: read and preprocess each file
            nat_plain = evaluate(plain, native, progress=progress)
            _native_refusals(plain, native, nat, ood_report)
            facts.heldout_native = _measured(nat, nat_plain)
            merged = nat.predictions.merge(rep.predictions, on="id", suffixes=("", "_train_geometry"))
            facts.geometry_mean_abs_difference_months = round(
                float(np.mean(np.abs(merged["predicted"] - merged["predicted_train_geometry"]))), 3
            )
            predictions["heldout_native"] = nat.predictions
    facts.trained_on = trained_on
    facts.ood = OodFacts(**ood_report)
    path = save_model_file(torch_side, out_path, facts)
    return path, facts, predictions


def _native_refusals(
    plain: Predictor, native: pd.DataFrame, report: EvaluationReport, ood: dict[str, Any]
) -> None:
    """The refusal rule's scores on every native file (read once each, as ``predict`` reads it), recorded
    per image and as counts: the pooled and texture densities, and the polarity in doubt, each as
    ``Predictor.polarity_check`` and ``check_distribution`` judge it (an image assessed inverted back is
    scored as assessed)."""
    density = plain.ood
    assert density is not None
    pooled, tex, polarity, doubted = [], [], [], []  # a missing score (None) becomes NaN in the arrays below
    for path in native["path"]:
        screen = plain.polarity_check(oriented_pixels(read_radiograph(path)))
        pooled.append(screen.pooled)
        tex.append(screen.texture)
        polarity.append(screen.polarity)
        doubted.append(polarity_verdict(screen.polarity) == "in doubt")
    pooled_scores = np.asarray(pooled, dtype=float)
    flagged = density.refuses(pooled_scores)
    ood["flagged"]["heldout_native_pooled"] = [int(flagged.sum()), len(native)]
    report.predictions["ood_score"] = np.round(pooled_scores, 4)
    if density.texture is not None:
        tex_scores = np.asarray(tex, dtype=float)
        tex_flagged = density.texture.refuses(tex_scores)
        flagged |= tex_flagged
        ood["flagged"]["heldout_native_texture"] = [int(tex_flagged.sum()), len(native)]
        report.predictions["ood_texture_score"] = np.round(tex_scores, 4)
    in_doubt = np.asarray(doubted, dtype=bool)
    flagged |= in_doubt
    ood["flagged"]["heldout_native_polarity_in_doubt"] = [int(in_doubt.sum()), len(native)]
    report.predictions["polarity_log_ratio"] = np.round(np.asarray(polarity, dtype=float), 4)
    ood["flagged"]["heldout_native"] = [int(flagged.sum()), len(native)]
