"""Hyper-parameter search with Optuna over run configs: resumable studies whose trials are ordinary runs.

Kept apart from ``boneage.experiments`` (fixed grids and their result tables): a study chooses its variants
as it goes, a grid lists them up front. Both write the same run folders (``boneage.runs``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from boneage.errors import BoneAgeInputError
from boneage.train.experiments import cap_epochs

log = logging.getLogger(__name__)

__all__ = ["TUNE_SIZES", "TUNE_LAYERS", "TUNE_LR", "tune"]

TUNE_SIZES = (128, 192, 256)
TUNE_LAYERS = ("20", "50", "100", "all")
TUNE_LR = (1e-5, 1e-2)


def _import_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise BoneAgeInputError(
            "boneage tune needs Optuna, an optional dependency: pip install 'boneage[tune]' (or optuna)"
        ) from None
    return optuna


def tune(
    config: str | Path,
    trials: int,
    *,
    run_dir: str | Path | None = None,
    overrides: list[str] | None = None,
    max_epochs: int | None = None,
    sizes: tuple[int, ...] = TUNE_SIZES,
    layers: tuple[str, ...] = TUNE_LAYERS,
    lr_range: tuple[float, float] = TUNE_LR,
    progress: bool = False,
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Optuna (TPE) search over ``train.lr`` (log scale), ``preprocess.size`` and ``finetune.layers``
    minimising the best validation MAE, until the study holds ``trials`` finished trials.

    The study lives in ``run_dir/optuna.db`` (sqlite), each trial's run in ``run_dir/trial-<params hash>/``:
    re-running the same command continues the study, and a trial killed mid-training is retried with the
    same parameters, resuming its run from last.ckpt. Writes ``trials.csv`` and ``best.json`` as it goes.
    """
    optuna = _import_optuna()
    from boneage.config import load_config
    from boneage.train.loop import train

    say = echo or log.info
    base = load_config(config, overrides)
    folder = Path(run_dir) if run_dir else Path("runs") / f"tune-{base.name}"
    folder.mkdir(parents=True, exist_ok=True)
    space = {"lr": list(lr_range), "size": [int(s) for s in sizes], "layers": [str(x) for x in layers]}
    if not space["size"] or not space["layers"] or not 0 < lr_range[0] <= lr_range[1]:
        raise BoneAgeInputError("tune needs at least one size, one layers value and 0 < lr-min <= lr-max")
    for value in space["layers"]:  # a bad value fails now, not after the first trials ran
        load_config(config, [*(overrides or []), f"finetune.layers={value}"])
    storage = f"sqlite:///{(folder / 'optuna.db').absolute()}"
    if not progress:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name="tune",
        storage=storage,
        direction="minimize",
        load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=base.train.seed),
    )
    saved_space = study.user_attrs.get("search_space")
    if saved_space is None:
        study.set_user_attr("search_space", space)
        study.set_user_attr("config", str(config))
    elif saved_space != space:
        raise BoneAgeInputError(
            f"{folder} holds a study over another search space ({saved_space}); use another --run-dir"
        )
    state = optuna.trial.TrialState
    for stale in study.get_trials(deepcopy=False, states=(state.RUNNING,)):  # killed mid-trial: retry it
        study.tell(stale.number, state=state.FAIL)
        if stale.params:
            study.enqueue_trial(stale.params, skip_if_exists=False)
            say(f"trial {stale.number} was interrupted; retrying {stale.params}")

    def objective(trial: Any) -> float:
        lr = trial.suggest_float("lr", space["lr"][0], space["lr"][1], log=True)
        size = trial.suggest_categorical("size", space["size"])
        n = trial.suggest_categorical("layers", space["layers"])
        params = {"lr": lr, "size": size, "layers": n}
        digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
        cfg = load_config(
            config,
            [*(overrides or []), f"train.lr={lr!r}", f"preprocess.size={size}", f"finetune.layers={n}"],
        )
        cfg.name = f"{base.name}/trial-{digest}"
        cap_epochs(cfg, max_epochs)
        trial.set_user_attr("run_dir", str(folder / f"trial-{digest}"))
        say(f"trial {trial.number}: lr={lr:.2e} size={size} layers={n}")
        summary = train(cfg, folder / f"trial-{digest}", progress=progress)
        value = summary.get("best_val_mae")
        if value is None or not math.isfinite(float(value)):
            raise RuntimeError(f"trial {trial.number} produced no validation MAE")
        return float(value)

    def write_results(study: Any, trial: Any) -> None:
        study.trials_dataframe().to_csv(folder / "trials.csv", index=False)
        done = [t for t in study.trials if t.state == state.COMPLETE]
        if done:
            best = min(done, key=lambda t: t.value)
            (folder / "best.json").write_text(
                json.dumps(
                    {"value": best.value, "params": best.params, "trial": best.number, **best.user_attrs},
                    indent=2,
                )
            )

    complete = len(study.get_trials(deepcopy=False, states=(state.COMPLETE,)))
    remaining = max(0, trials - complete)
    started = time.time()
    if remaining:
        study.optimize(objective, n_trials=remaining, callbacks=[write_results], gc_after_trial=True)
    done = study.get_trials(deepcopy=False, states=(state.COMPLETE,))
    best = study.best_trial if done else None
    return {
        "run_dir": str(folder),
        "storage": storage,
        "trials_complete": len(done),
        "trials_run_now": remaining,
        "best_value": best.value if best else None,
        "best_params": best.params if best else None,
        "best_run_dir": best.user_attrs.get("run_dir") if best else None,
        "seconds": round(time.time() - started, 1),
    }
