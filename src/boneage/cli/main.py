"""``boneage train``, ``evaluate``, ``predict``, ``export``, ``bundle`` and ``serve``: the top-level commands.

The sub-commands (``boneage cache ...``, ``boneage experiments ...``, ``boneage tune``) live in their own
modules of this package and are attached to :data:`app` in ``boneage/cli/__init__.py``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from boneage.cli._common import err, exit_on_user_error, out
from boneage.errors import BoneAgeInputError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Pediatric bone age from left-hand radiographs. Research use only, not a medical device.",
)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp"}




@app.command()
@exit_on_user_error
def train(
    config: Annotated[Path, typer.Argument(help="YAML config, e.g. configs/quick.yaml")],
    run_dir: Annotated[Path | None, typer.Option(help="run folder (default runs/<name>)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. train.lr=1e-4")] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Train a model; writes config.yaml, metrics.csv, best.ckpt and last.ckpt to the run folder."""
    from boneage.config import load_config
    from boneage.training import quiet_lightning
    from boneage.training import train as run_training

    quiet_lightning()
    cfg = load_config(config, set_)
    folder = run_dir or Path("runs") / cfg.name
    summary = run_training(cfg, folder, progress=progress)
    print(json.dumps(summary, indent=2))  # plain print: rich would wrap long paths inside the JSON


@app.command()
@exit_on_user_error
def evaluate(
    images: Annotated[Path, typer.Option(help="folder of radiographs named <id>.png")],
    labels: Annotated[Path, typer.Option(help="RSNA label CSV (training, validation or test layout)")],
    checkpoint: Annotated[Path | None, typer.Option(help="checkpoint (default: the bundled model)")] = None,
    out_csv: Annotated[Path | None, typer.Option("--out", help="write per-image predictions here")] = None,
    plots: Annotated[Path | None, typer.Option(help="write pred-vs-ref and Bland-Altman PNGs here")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print exactly one JSON object")] = False,
    tta: Annotated[bool, typer.Option(help="average test-time augmented views")] = True,
    cache_dir: Annotated[Path | None, typer.Option(help="reuse/keep preprocessed images here")] = None,
    runtime: Annotated[str, typer.Option(help="torch, onnx or auto (onnxruntime when installed)")] = "auto",
) -> None:
    """MAE, RMSE, median AE, MAE by sex and 2-year age band of a model on a labelled folder."""
    from boneage.evaluation import evaluate_folder, plot_predictions
    from boneage.inference import Predictor

    predictor = Predictor.load(checkpoint, tta=tta, runtime=runtime)
    report = evaluate_folder(predictor, images, labels, cache_dir=cache_dir, progress=not as_json)
    if out_csv:
        out_csv.parent.mkdir(parents=True, exist_ok=True)
        report.predictions.to_csv(out_csv, index=False)
    if plots:
        plot_predictions(report.predictions, plots)
    if as_json:
        print(json.dumps(report.metrics))
        return
    m = report.metrics
    out.print(
        f"n={m['n']}  MAE {m['mae_months']:.2f}  RMSE {m['rmse_months']:.2f}  "
        f"median AE {m['median_ae_months']:.2f} months  (predicting the mean: "
        f"{m['mae_baseline_mean_months']:.2f})"
    )
    out.print(report.table().to_string(index=False, float_format=lambda v: f"{v:.2f}"))


def _collect_images(inputs: list[Path]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            files += sorted(p for p in item.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(item)
    return files


def _sex_table(path: Path) -> dict[str, str]:
    from boneage.labels import read_labels

    table = read_labels(path, require_age=False)
    return {str(i): ("male" if m else "female") for i, m in zip(table["id"], table["male"], strict=True)}


BATCH_FIELDS = [
    "file",
    "sex",
    "bone_age_months",
    "bone_age_years",
    "uncertainty_months",
    "chronological_age_months",
    "difference_months",
    "sd_score",
    "flag",
    "warnings",
    "error",
]


@app.command()
@exit_on_user_error
def predict(
    images: Annotated[list[Path], typer.Argument(help="radiograph file(s) (PNG, JPEG, DICOM) or a folder")],
    sex: Annotated[str | None, typer.Option(help="female or male (default: DICOM PatientSex)")] = None,
    age: Annotated[
        str | None, typer.Option(help="chronological age, e.g. 7.5y or 90m (default: DICOM dates)")
    ] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="checkpoint (default: the bundled model)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object per image")] = False,
    report: Annotated[Path | None, typer.Option(help="write one HTML report per image here")] = None,
    out_csv: Annotated[Path | None, typer.Option("--out", help="batch: append one CSV row per image")] = None,
    sex_from: Annotated[Path | None, typer.Option(help="batch: CSV giving each image id's sex")] = None,
    heatmap: Annotated[bool, typer.Option(help="compute the Grad-CAM heatmap (for --report)")] = True,
    tta: Annotated[bool, typer.Option(help="average test-time augmented views")] = True,
    runtime: Annotated[str, typer.Option(help="torch, onnx or auto (onnxruntime when installed)")] = "auto",
) -> None:
    """Bone age (months, years), SD score against Greulich & Pyle, uncertainty, heatmap and report."""
    from rich.progress import Progress

    from boneage.assessment import assess_image, write_report
    from boneage.inference import Predictor

    files = _collect_images(images)
    if not files:
        raise BoneAgeInputError("no radiographs found", ", ".join(map(str, images)))
    sexes = _sex_table(sex_from) if sex_from else {}
    done: set[str] = set()
    if out_csv and out_csv.is_file():
        with out_csv.open(newline="") as f:
            done = {row["file"] for row in csv.DictReader(f) if not row.get("error")}
    todo = [p for p in files if str(p) not in done]
    predictor = Predictor.load(checkpoint, tta=tta, runtime=runtime)
    batch = len(files) > 1 or out_csv is not None
    writer = None
    handle = None
    if out_csv:
        out_csv.parent.mkdir(parents=True, exist_ok=True)
        new = not out_csv.is_file() or out_csv.stat().st_size == 0
        handle = out_csv.open("a", newline="")
        writer = csv.DictWriter(handle, fieldnames=BATCH_FIELDS)
        if new:
            writer.writeheader()
    failures = 0
    try:
        with Progress(console=err, disable=not batch or as_json, transient=True) as bar:
            task = bar.add_task("predicting", total=len(todo))
            for path in todo:
                row: dict[str, Any] = {"file": str(path)}
                try:
                    result = assess_image(
                        predictor,
                        path,
                        sex or sexes.get(path.stem),
                        age,
                        heatmap=heatmap and report is not None,
                    )
                    a = result.assessment
                    row.update(
                        sex=a.sex,
                        bone_age_months=round(a.bone_age_months, 2),
                        bone_age_years=round(a.bone_age_months / 12, 2),
                        uncertainty_months=round(a.uncertainty_months or 0, 2),
                        chronological_age_months=_r(a.chronological_age_months),
                        difference_months=_r(a.difference_months),
                        sd_score=_r(a.sd_score),
                        flag=a.flag or "",
                        warnings=" | ".join(a.warnings),
                        error="",
                    )
                    if report:
                        write_report(result, predictor, report)
                    if as_json:
                        print(json.dumps(result.to_dict()))
                    elif not writer:
                        _print_result(result)
                except BoneAgeInputError as exc:
                    failures += 1
                    row["error"] = str(exc)
                    err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
                if writer and handle:
                    writer.writerow(row)
                    handle.flush()
                bar.advance(task)
    finally:
        if handle:
            handle.close()
    if batch and not as_json:
        skipped = len(files) - len(todo)
        err.print(
            f"{len(todo) - failures} predicted, {failures} failed, {skipped} already in {out_csv}"
            if out_csv
            else f"{len(todo) - failures} predicted, {failures} failed"
        )
    if failures:
        raise typer.Exit(2)


def _r(value: float | None) -> float | str:
    return round(value, 2) if value is not None else ""


def _print_result(result: Any) -> None:
    from boneage.clinical import format_months

    a = result.assessment
    text = format_months(a.bone_age_months)
    line = f"{result.prediction.source}: bone age {a.bone_age_months:.1f} months ({text})"
    line += f" ± {a.uncertainty_months:.1f}, {a.sex}"
    if a.chronological_age_months is not None:
        line += (
            f"; chronological age {a.chronological_age_months:.1f} months, difference "
            f"{a.difference_months:+.1f}, SD score {a.sd_score:+.2f} ({a.flag})"
        )
    out.print(line, highlight=False, soft_wrap=True)
    for w in a.warnings:
        err.print(f"[yellow]warning:[/yellow] {w}", highlight=False, soft_wrap=True)


@app.command()
@exit_on_user_error
def export(
    out_path: Annotated[Path, typer.Option("--out", help="output file, e.g. model.onnx")],
    fmt: Annotated[str, typer.Option("--format", help="onnx")] = "onnx",
    checkpoint: Annotated[Path | None, typer.Option(help="checkpoint (default: the bundled model)")] = None,
) -> None:
    """Export the network to ONNX for onnxruntime (dynamic batch; TTA stays in the caller)."""
    from boneage.inference import Predictor, export_onnx

    if fmt != "onnx":
        raise BoneAgeInputError(f"unknown export format {fmt!r} (onnx)")
    export_onnx(Predictor.load(checkpoint), out_path)
    out.print(f"wrote {out_path}")


@app.command()
@exit_on_user_error
def bundle(
    checkpoint: Annotated[Path | None, typer.Option(help="best.ckpt of a training run")] = None,
    out_path: Annotated[Path, typer.Option("--out", help="output .safetensors")] = Path("model.safetensors"),
    version: Annotated[str, typer.Option(help="model version recorded in the metadata")] = "0.2.0",
    convert: Annotated[
        Path | None, typer.Option(help="rewrite a v0.1 bundle (whole training config inside) as a model spec")
    ] = None,
    native_images: Annotated[
        Path | None, typer.Option(help="held-out ids' native-aspect files (default: beside the holdout CSV)")
    ] = None,
) -> None:
    """Turn a training checkpoint into the bundled-model format (fp16 safetensors + model spec + measured
    facts: held-out MAE in both geometries, TTA-spread threshold, training range)."""
    from boneage.bundle import convert_bundle, make_bundle

    if convert is not None:
        path = convert_bundle(convert, out_path)
        out.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
        return
    if checkpoint is None:
        raise BoneAgeInputError("pass --checkpoint CKPT (or --convert OLD_BUNDLE)")
    path, meta = make_bundle(
        checkpoint,
        out_path,
        version=version,
        native_images=native_images,
        on_step=lambda msg: err.print(f"measuring: {msg}", highlight=False),
    )
    meta.pop("_predictions", None)
    print(json.dumps(meta, indent=2))
    out.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


@app.command()
@exit_on_user_error
def serve(
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8000,
    checkpoint: Annotated[Path | None, typer.Option(help="checkpoint (default: the bundled model)")] = None,
) -> None:
    """Start the web page and REST API (FastAPI + uvicorn)."""
    from boneage.web import serve as run_server

    run_server(host=host, port=port, checkpoint=checkpoint)
