"""Bundle a training run's chosen checkpoint (its ship rule's) and write every figure the model card states.

    python benchmarks/bundled_model_report.py --run-dir ~/.cache/boneage/runs/bundled-v0.3 \
        --prior-run ~/.cache/boneage/runs/bundled-v0.2 --bundle src/boneage/assets/model.safetensors \
        --out docs/results/bundled-v0.3

Writes into ``--out``: ``facts.json`` (what the bundle's metadata holds, plus timings), per-image predictions
on the held-out ids in both geometries (``preds_native.csv``, ``preds_299.csv``), ``metrics_native.json`` (MAE
by sex and 2-year age band, bias, RMSE), the pred-vs-reference and Bland-Altman plots of the native files,
``mae_vs_time.png`` (validation-split and held-out MAE per epoch against cumulative training time, from the
run's metrics.csv) and a copy of the run's config, metrics.csv and summary.json (not the checkpoint).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd


def mae_vs_time(
    metrics_csv: Path,
    out_png: Path,
    final: dict[str, float],
    title: str = "Bundled model",
    prior: Path | list[Path] | None = None,
) -> Path:
    """``prior``: the metrics.csv of the run(s) this one was initialised from, oldest first, so the time axis
    counts every CPU hour behind the model (a warm-started run's own clock starts at zero)."""
    from matplotlib.figure import Figure

    m = pd.read_csv(metrics_csv)
    starts: list[float] = []
    chain = [prior] if isinstance(prior, Path) else list(prior or [])
    if chain:
        runs, offset = [], 0.0
        for csv in [*chain, metrics_csv]:
            part = pd.read_csv(csv)
            if runs:
                starts.append(offset)
            runs.append(part.assign(elapsed_s=part["elapsed_s"] + offset))
            offset += float(part["elapsed_s"].iloc[-1])
        m = pd.concat(runs, ignore_index=True)
    hours = m["elapsed_s"].to_numpy(float) / 3600
    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.subplots()
    ax.plot(hours, m["val_mae"], "o-", label="validation split (5% of training ids; chose each checkpoint)")
    if "holdout_mae" in m and m["holdout_mae"].notna().any():
        ax.plot(hours, m["holdout_mae"], "s-", label="1,001 held-out ids, 299 px copies, single view")
    for label, value, style in (
        ("held-out, native PNGs, predict path + TTA", final.get("native_mae_months"), "k--"),
        ("radiologist (RSNA 2017 paper)", 7.32, "r:"),
    ):
        if value:
            ax.axhline(value, color=style[0], ls=style[1:], lw=1, label=f"{label}: {value:.2f}")
    for i, start in enumerate(starts):
        label = "warm start from the prior run" if i == 0 else None
        ax.axvline(start / 3600, color="grey", lw=1, ls="-.", label=label)
    ax.set(
        xlabel="cumulative training time on 2 CPU cores (hours)",
        ylabel="MAE (months)",
        title=f"{title}: MAE vs CPU training time (EMA weights)",
        ylim=(0, max(20.0, float(np.nanmax(m["val_mae"].to_numpy(float)[1:] if len(m) > 1 else [20])))),
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(out_png, bbox_inches="tight")
    return out_png


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--bundle", type=Path, default=Path("src/boneage/assets/model.safetensors"))
    ap.add_argument("--out", type=Path, default=Path("docs/results/bundled-v0.3"))
    ap.add_argument("--version", default=None, help="model version (default: the package's)")
    ap.add_argument(
        "--prior-run",
        type=Path,
        nargs="+",
        default=[],
        help="run folder(s) this run was initialised from, oldest first (their curves and CPU hours)",
    )
    ap.add_argument(
        "--checkpoint", default=None, help="default: the run config's ship.checkpoint (best, last or soup)"
    )
    ap.add_argument(
        "--training-run",
        type=Path,
        default=None,
        help="the run whose metrics.csv and summary.json describe the training (default: --run-dir; for a "
        "weight average, the last trained ingredient's run folder, its earlier ones as --prior-run)",
    )
    args = ap.parse_args()
    trained = args.training_run or args.run_dir

    from boneage.bundle import make_bundle
    from boneage.evaluation import metrics, plot_predictions

    if args.version is None:
        from boneage import __version__

        args.version = __version__
    from boneage.bundle import run_config_for

    cfg = run_config_for(args.run_dir / "last.ckpt")  # the run folder's config.yaml
    if args.checkpoint is None:
        args.checkpoint = f"{cfg.ship.checkpoint}.ckpt"
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    path, facts = make_bundle(
        args.run_dir / args.checkpoint,
        args.bundle,
        version=args.version,
        on_step=lambda msg: print(f"[{time.perf_counter() - started:6.1f} s] {msg}", flush=True),
    )
    preds = facts.pop("_predictions", None)
    summary = json.loads((trained / "summary.json").read_text())
    facts["bundle_bytes"] = path.stat().st_size
    onnx_file = path.with_suffix(".onnx")
    facts["onnx_bytes"] = onnx_file.stat().st_size if onnx_file.is_file() else None
    facts["bundle_seconds"] = round(time.perf_counter() - started, 1)
    facts["training_wall_seconds"] = summary.get("total_fit_seconds")
    facts["epochs_completed"] = summary.get("epochs_completed")
    if args.prior_run:
        facts["prior_run_training_seconds"] = round(
            sum(
                json.loads((run / "summary.json").read_text()).get("total_fit_seconds") or 0.0
                for run in args.prior_run
            ),
            1,
        )
        facts["prior_runs"] = [run.name for run in args.prior_run]
    # written now and once more after the CLI run below: a failure there keeps the bundle's facts
    (args.out / "facts.json").write_text(json.dumps(facts, indent=2))
    if preds is not None:
        native, square = preds["native"], preds["train_geometry"]
        native.to_csv(args.out / "preds_native.csv", index=False)
        square.to_csv(args.out / "preds_299.csv", index=False)
        m = metrics(native["predicted"], native["boneage"], native["male"])
        (args.out / "metrics_native.json").write_text(json.dumps(m, indent=2))
        m299 = metrics(square["predicted"], square["boneage"], square["male"])
        (args.out / "metrics_299.json").write_text(json.dumps(m299, indent=2))
        plot_predictions(native, args.out, title=f"v{args.version}, 1,001 held-out native PNGs, TTA:")
    for name in ("config.yaml", "metrics.csv", "summary.json", "run.json"):
        source = args.run_dir if name == "config.yaml" else trained
        if (source / name).is_file():
            shutil.copy(source / name, args.out / name)
    if preds is not None:
        # the literal clinician path: `boneage predict DIR --out CSV --sex-from CSV` on the native files
        import subprocess
        import sys

        holdout = Path(cfg.data.holdout_labels)
        out_csv = args.out / "cli_predict_native.csv"
        out_csv.unlink(missing_ok=True)
        t0 = time.perf_counter()
        cmd = [
            str(Path(sys.executable).with_name("boneage")),
            "predict",
            str(holdout.parent / "images"),
            "--out",
            str(out_csv),
            "--sex-from",
            str(holdout),
            "--checkpoint",
            str(path),
        ]
        subprocess.run(cmd, check=False, capture_output=True)
        cli = pd.read_csv(out_csv)
        cli["id"] = cli["file"].map(lambda f: Path(f).stem)
        ref = pd.read_csv(holdout, dtype={"id": str})
        joined = cli.merge(ref, on="id")
        facts["cli_predict_native_images"] = int(joined["bone_age_months"].notna().sum())
        facts["cli_predict_native_mae_months"] = round(
            float(np.mean(np.abs(joined["bone_age_months"] - joined["boneage"]))), 3
        )
        facts["cli_predict_native_seconds"] = round(time.perf_counter() - t0, 1)
        (args.out / "facts.json").write_text(json.dumps(facts, indent=2))
    prior = [run / "metrics.csv" for run in args.prior_run]
    mae_vs_time(
        trained / "metrics.csv",
        args.out / "mae_vs_time.png",
        facts,
        f"Bundled model v{args.version}",
        prior,
    )
    print(json.dumps({k: v for k, v in facts.items() if not k.startswith("native_mae_by")}, indent=2))


if __name__ == "__main__":
    main()
