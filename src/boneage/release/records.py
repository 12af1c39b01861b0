"""The records a release keeps beside its recipe (``configs/release/<version>/``): the facts its model file
states, the per-image predictions behind them (so a later candidate can be paired with it image by image),
the metrics by sex and age band, the plots, and its training curves against CPU time."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from boneage.evaluation import metrics, plot_predictions
from boneage.files import atomic_write
from boneage.modelfile import ModelFacts

RADIOLOGIST_MAE = 7.32  # RSNA 2017 challenge paper (Halabi et al., Radiology 2019): a radiologist's MAE


def write_records(
    out: str | Path,
    facts: ModelFacts,
    predictions: dict[str, pd.DataFrame],
    run_dir: Path | None = None,
    prior_runs: list[Path] | None = None,
) -> list[Path]:
    """Facts, predictions, metrics and plots of a freshly bundled model into ``out``; returns the files."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    written = [atomic_write(folder / "facts.json", json.dumps(facts.public(), indent=2) + "\n")]
    for name, table in predictions.items():
        written.append(atomic_write(folder / f"preds_{name}.csv", table.to_csv(index=False)))
        if name.startswith("heldout"):
            m = metrics(table["predicted"], table["boneage"], table["male"])
            written.append(atomic_write(folder / f"metrics_{name}.json", json.dumps(m, indent=2) + "\n"))
    native = predictions.get("heldout_native")
    if native is not None:
        written += plot_predictions(native, folder, title=f"v{facts.model_version}, held-out, TTA:")
    if run_dir is not None:
        chain = [*(prior_runs or []), run_dir]
        for i, run in enumerate(chain, start=1):
            if (run / "metrics.csv").is_file():
                shutil.copy(run / "metrics.csv", folder / f"metrics_stage{i}.csv")
                written.append(folder / f"metrics_stage{i}.csv")
        written.append(mae_vs_time(chain, folder / "mae_vs_time.png", facts))
    return written


def mae_vs_time(runs: list[Path], out_png: Path, facts: ModelFacts) -> Path:
    """Validation-split and held-out MAE per epoch against cumulative CPU training time over the stages of a
    release (a warm-started stage's own clock starts at zero, so the stages are laid end to end)."""
    from matplotlib.figure import Figure

    parts, starts, offset = [], [], 0.0
    for run in runs:
        part = pd.read_csv(run / "metrics.csv")
        if parts:
            starts.append(offset)
        parts.append(part.assign(elapsed_s=part["elapsed_s"] + offset))
        offset += float(part["elapsed_s"].iloc[-1])
    m = pd.concat(parts, ignore_index=True)
    hours = m["elapsed_s"].to_numpy(float) / 3600
    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.subplots()
    ax.plot(hours, m["val_mae"], "o-", label="validation split (training ids; chose each checkpoint)")
    if "holdout_mae" in m and m["holdout_mae"].notna().any():
        ax.plot(hours, m["holdout_mae"], "s-", label="held-out ids, training copies, single view")
    lines: list[tuple[str, Any, str]] = [("radiologist (RSNA 2017 paper)", RADIOLOGIST_MAE, "r:")]
    if facts.heldout_native is not None:
        lines.insert(
            0, ("held-out, native files, predict path + TTA", facts.heldout_native.mae_months, "k--")
        )
    for label, value, style in lines:
        ax.axhline(value, color=style[0], ls=style[1:], lw=1, label=f"{label}: {value:.2f}")
    for i, start in enumerate(starts):
        ax.axvline(start / 3600, color="grey", lw=1, ls="-.", label="next stage starts" if i == 0 else None)
    top = float(np.nanmax(m["val_mae"].to_numpy(float)[1:])) if len(m) > 1 else 20.0
    ax.set(
        xlabel="cumulative training time (hours)",
        ylabel="MAE (months)",
        title=f"Model {facts.model_version}: MAE vs training time (EMA weights)",
        ylim=(0, max(20.0, top)),
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(out_png, bbox_inches="tight")
    return out_png
