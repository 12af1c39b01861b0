"""Ship rules: a candidate model against the incumbent, decided by a rule written before the candidate
trained (``ship`` in its run config), on the validation split only, so the held-out ids judge nothing.

A rule has a bar (the incumbent's 6-view TTA MAE on the same split) and may add a paired condition: the
mean per-image difference |error| − |error of the incumbent| must be at most ``-paired_se`` standard errors
(``boneage.evaluation.paired_difference``, the one paired statistic in the project).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pandas as pd

from boneage.config import RunConfig
from boneage.errors import BoneAgeInputError
from boneage.evaluation import align_predictions, evaluate, mean_and_se, read_predictions
from boneage.predict import load_predictor
from boneage.release.runs import run_split


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


def check_candidate(
    model: str | Path, cfg: RunConfig, *, bar: float | None = None, record_only: bool = False
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Score ``model`` on its run's validation split (6-view TTA) and apply the config's ship rule: (the
    decision record, the per-image predictions for later paired comparisons). ``record_only`` scores a model
    without a rule (an old bundle) and takes no decision."""
    if record_only and bar is not None:
        raise BoneAgeInputError("a record-only check takes no decision, so no bar", model)
    if not record_only:
        ship_bar(cfg, model, bar)  # a wrong bar or checkpoint fails here, before minutes of scoring
    table = run_split(cfg)[1]
    predictor = load_predictor(Path(model).expanduser())
    started = time.perf_counter()
    rep = evaluate(predictor, table, cache_dir=cfg.data.cache_dir, progress=False)
    mae = float(rep.metrics["mae_months"])
    decision = (
        {"mae": round(mae, 3), "ship": None, "decision": "none: recorded only"}
        if record_only
        else ship_decision(cfg, model, mae, bar, predictions=rep.predictions)
    )
    result = {
        "model": str(model),
        "config": cfg.name,
        "split": "validation split (training ids), 6-view TTA",
        "n": len(table),
        **decision,
        "seconds": round(time.perf_counter() - started, 1),
    }
    return result, rep.predictions
