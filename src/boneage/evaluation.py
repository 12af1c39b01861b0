"""Metrics in months, per-group tables and the two plots a bone-age paper shows.

``evaluate`` runs a ``Predictor`` over a labelled image folder; ``metrics`` works on any predictions, so a
result table can be recomputed from a saved ``preds.csv`` without the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from boneage.data.labels import read_labels
from boneage.data.shards import cached_images
from boneage.errors import BoneAgeInputError
from boneage.predict import Predictor


def age_band(months: np.ndarray, width_years: int = 2) -> np.ndarray:
    lo = (np.asarray(months) // (12 * width_years)).astype(int) * width_years
    return np.array([f"{a}-{a + width_years}y" for a in lo])


def metrics(pred: np.ndarray, ref: np.ndarray, male: np.ndarray | None = None) -> dict[str, Any]:
    """MAE, RMSE, median AE and bias in months; by sex and by 2-year band of the reference age."""
    pred, ref = np.asarray(pred, dtype=float), np.asarray(ref, dtype=float)
    err = pred - ref
    out: dict[str, Any] = {
        "n": int(len(err)),
        "mae_months": float(np.mean(np.abs(err))) if len(err) else float("nan"),
        "rmse_months": float(np.sqrt(np.mean(err**2))) if len(err) else float("nan"),
        "median_ae_months": float(np.median(np.abs(err))) if len(err) else float("nan"),
        "bias_months": float(np.mean(err)) if len(err) else float("nan"),
        "mae_baseline_mean_months": float(np.mean(np.abs(ref - ref.mean()))) if len(err) else float("nan"),
    }
    if male is not None:
        male = np.asarray(male, dtype=bool)
        out["mae_by_sex"] = {
            sex: {"n": int(mask.sum()), "mae_months": float(np.mean(np.abs(err[mask])))}
            for sex, mask in (("female", ~male), ("male", male))
            if mask.any()
        }
    bands = age_band(ref)
    out["mae_by_age_band"] = {
        band: {"n": int((bands == band).sum()), "mae_months": float(np.mean(np.abs(err[bands == band])))}
        for band in sorted(set(bands), key=lambda b: int(b.split("-")[0]))
    }
    return out


@dataclass
class EvaluationReport:
    predictions: pd.DataFrame  # id, boneage, male, predicted, uncertainty, error
    metrics: dict[str, Any]

    def table(self) -> pd.DataFrame:
        """Per-group MAE as a tidy table (group, value, n, MAE), for printing and result files."""
        rows = [("all", "all", self.metrics["n"], self.metrics["mae_months"])]
        for sex, m in self.metrics.get("mae_by_sex", {}).items():
            rows.append(("sex", sex, m["n"], m["mae_months"]))
        for band, m in self.metrics["mae_by_age_band"].items():
            rows.append(("age band", band, m["n"], m["mae_months"]))
        return pd.DataFrame(rows, columns=["group", "value", "n", "mae_months"])


def evaluate(
    predictor: Predictor,
    labels: pd.DataFrame,
    *,
    cache_dir: str | Path | None = None,
    workers: int = 2,
    progress: bool = True,
) -> EvaluationReport:
    """Predict every labelled image (needs ``id``, ``path``, ``boneage``, ``male``) and score it."""
    if cache_dir is not None:
        images = cached_images(cache_dir, predictor.preprocess, labels, workers=workers, progress=progress)
    elif len(labels):
        # decoding a clinic's full-size files is a third of the time; PIL and the resizing release the GIL
        with ThreadPoolExecutor(max(1, workers)) as pool:
            images = np.stack(list(pool.map(lambda p: predictor.prepare(p)[1], labels["path"])))
    else:
        images = np.zeros((0, predictor.preprocess.size, predictor.preprocess.size), dtype=np.uint8)
    male = labels["male"].to_numpy(dtype=bool)
    mean, spread, _ = predictor.predict_arrays(images, male)
    preds = pd.DataFrame(
        {
            "id": labels["id"].astype(str).to_numpy(),
            "boneage": labels["boneage"].to_numpy(dtype=float),
            "male": male,
            "predicted": np.round(mean, 3),
            "uncertainty": np.round(spread, 3),
        }
    )
    preds["error"] = preds["predicted"] - preds["boneage"]
    return EvaluationReport(preds, metrics(mean, preds["boneage"].to_numpy(), male))


def evaluate_folder(
    predictor: Predictor, images: str | Path, labels_csv: str | Path, **kwargs: Any
) -> EvaluationReport:
    return evaluate(predictor, read_labels(labels_csv, images), **kwargs)


def plot_predictions(preds: pd.DataFrame, out_dir: str | Path, title: str = "") -> list[Path]:
    """Predicted-vs-reference scatter and a Bland-Altman plot, as PNGs in ``out_dir``."""
    from matplotlib.figure import Figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ref, pred = preds["boneage"].to_numpy(float), preds["predicted"].to_numpy(float)
    colors = np.where(preds["male"].to_numpy(bool), "tab:blue", "tab:red")
    mae = float(np.mean(np.abs(pred - ref))) if len(ref) else float("nan")

    fig = Figure(figsize=(6, 6), dpi=100)
    ax = fig.subplots()
    ax.scatter(ref, pred, s=10, c=colors, alpha=0.7)
    lim = [0, max(240.0, float(np.nanmax(np.r_[ref, pred, 0])) + 6)]
    ax.plot(lim, lim, "k--", lw=1)
    ax.set(
        xlim=lim,
        ylim=lim,
        xlabel="reference bone age (months)",
        ylabel="predicted bone age (months)",
        title=f"{title} MAE {mae:.2f} months (n={len(ref)}); red: female, blue: male".strip(),
    )
    scatter = out / "pred_vs_ref.png"
    fig.savefig(scatter, bbox_inches="tight")

    fig = Figure(figsize=(7, 5), dpi=100)
    ax = fig.subplots()
    mean, diff = (ref + pred) / 2, pred - ref
    bias, sd = float(np.mean(diff)), float(np.std(diff, ddof=1)) if len(diff) > 1 else 0.0
    ax.scatter(mean, diff, s=10, c=colors, alpha=0.7)
    for y, style in ((bias, "-"), (bias + 1.96 * sd, "--"), (bias - 1.96 * sd, "--")):
        ax.axhline(y, color="k", ls=style, lw=1)
    ax.set(
        xlabel="mean of predicted and reference (months)",
        ylabel="predicted − reference (months)",
        title=f"Bland-Altman: bias {bias:+.2f}, limits of agreement ±{1.96 * sd:.2f} months",
    )
    bland = out / "bland_altman.png"
    fig.savefig(bland, bbox_inches="tight")
    return [scatter, bland]


def mean_and_se(d: np.ndarray) -> tuple[float, float]:
    """Mean of per-image paired differences and its standard error over images, unrounded: the one
    arithmetic every paired comparison here uses (a ship rule, and each benchmark's committed results)."""
    d = np.asarray(d, dtype=np.float64)
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))


def paired_difference(a: pd.Series, b: pd.Series) -> dict[str, Any]:
    """Two models' absolute errors on the same ids (Series by id) → each MAE and the paired difference B − A
    (negative: B is better) with its standard error and the errors' correlation, over their common ids."""
    a, b = a.align(b, join="inner")
    diff, se = mean_and_se((b - a).to_numpy(float))
    return {
        "n": len(a),
        "mae_a": round(float(a.mean()), 3),
        "mae_b": round(float(b.mean()), 3),
        "diff_b_minus_a": round(diff, 3),
        "diff_se": round(se, 3),
        "corr_abs_errors": round(float(np.corrcoef(a, b)[0, 1]), 3),
    }


def compare_prediction_files(
    a: str | Path, b: str | Path, column_a: str = "predicted", column_b: str = "predicted"
) -> dict[str, Any]:
    """The paired difference B − A of two per-image prediction CSVs over the ids both answered; the files
    must agree on the reference age of every shared id."""
    ref, preds = align_predictions(
        [(str(a), read_predictions(a, column_a)), (str(b), read_predictions(b, column_b))]
    )
    errors = [preds[k].sub(ref).abs().dropna() for k in (0, 1)]
    names = {"a": str(a) if column_a == "predicted" else f"{a}:{column_a}"}
    names["b"] = str(b) if column_b == "predicted" else f"{b}:{column_b}"
    return {**names, **paired_difference(*errors)}


def read_predictions(csv: str | Path, column: str = "predicted") -> pd.DataFrame:
    """``boneage`` and the prediction ``column`` (as ``predicted``) by string id from any per-image CSV
    written here (``evaluate --out``, a ship check, a bundle report), shared by the paired ship rule and the
    benchmarks that pair such files, so ids read as numbers in one and as strings in another cannot miss."""
    t = pd.read_csv(csv, dtype={"id": str})
    missing = {"id", "boneage", column} - set(t.columns)
    if missing:
        raise BoneAgeInputError(f"no {', '.join(sorted(missing))} column", csv)
    return t.set_index("id")[["boneage", column]].rename(columns={column: "predicted"})


def align_predictions(
    tables: Sequence[tuple[str, pd.DataFrame]], *, same_ids: bool = False
) -> tuple[pd.Series, pd.DataFrame]:
    """The reference ages and every table's ``predicted`` column (column k for the k-th table) over the ids
    all tables share, once each shared id is found to carry the same reference age in every table. Why one
    check: two files that agree on ids but not on ages hold other images or other labels, and pairing them
    would compare nothing; the ship rule and every benchmark that pairs files must refuse the same things.
    ``same_ids`` also refuses tables whose id sets differ (a ship rule pairs exactly one split). Each table
    comes with a name for messages and is indexed by id with ``boneage`` and ``predicted`` columns, as
    ``read_predictions`` gives it."""
    if not tables:
        raise BoneAgeInputError("no prediction tables to align")
    for name, t in tables:
        if not t.index.is_unique:  # one id, two rows: a concatenated file; pairing would multiply rows
            dup = t.index[t.index.duplicated()][0]
            raise BoneAgeInputError(f"id {dup} appears more than once", name)
    name0, first = tables[0]
    common = first.index
    for name, t in tables[1:]:
        if same_ids and set(t.index) != set(first.index):
            raise BoneAgeInputError(f"its ids differ from {name0}'s ({len(t)} vs {len(first)})", name)
        common = common.intersection(t.index)
    ref = first.loc[common, "boneage"].astype(float)
    for name, t in tables[1:]:
        same = np.isclose(t.loc[common, "boneage"].to_numpy(float), ref.to_numpy())
        if not same.all():
            raise BoneAgeInputError(
                f"{name} and {name0} disagree on the reference ages of {int((~same).sum())} shared ids: "
                "not the same images"
            )
    preds = pd.concat([t.loc[common, "predicted"] for _, t in tables], axis=1, keys=range(len(tables)))
    return ref, preds
