"""``boneage release ...``: the release tooling of the shipped model (see ``configs/release/README.md``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from boneage.cli._common import err, exit_on_user_error, out
from boneage.errors import BoneAgeInputError
from boneage.files import atomic_write

release_app = typer.Typer(
    no_args_is_help=True,
    help="Ship rules, bundles and re-measurement of the shipped model (needs the training stack).",
)


@release_app.command("check")
@exit_on_user_error
def check(
    model: Annotated[Path, typer.Option(help="the candidate: a checkpoint or a bundle")],
    config: Annotated[Path, typer.Option(help="its run config (gives the split and the ship rule)")],
    bar: Annotated[float | None, typer.Option(help="the config's ship.bar, repeated (months)")] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="folder for ship_rule.json and predictions")
    ] = None,
    record_only: Annotated[bool, typer.Option(help="score without a rule: no bar, no decision")] = False,
) -> None:
    """Apply a candidate's ship rule: its 6-view TTA MAE on the validation split against the rule written in
    its config before it trained. Exit 0 ships, 1 does not."""
    from boneage.config import load_config
    from boneage.release.ship import check_candidate

    cfg = load_config(config)
    result, predictions = check_candidate(model, cfg, bar=bar, record_only=record_only)
    result["config"] = str(config)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(out_dir / "preds_val_split.csv", predictions.to_csv(index=False))
        atomic_write(out_dir / "ship_rule.json", json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if result.get("ship") is False:
        raise typer.Exit(1)


@release_app.command("compare")
@exit_on_user_error
def compare(
    a: Annotated[Path, typer.Argument(help="the incumbent's per-image predictions (CSV)")],
    b: Annotated[Path, typer.Argument(help="the candidate's per-image predictions (CSV)")],
    column_a: Annotated[str, typer.Option(help="A's prediction column")] = "predicted",
    column_b: Annotated[str, typer.Option(help="B's prediction column")] = "predicted",
    out_json: Annotated[Path | None, typer.Option("--out", help="write the result here (JSON)")] = None,
) -> None:
    """Two models' predictions on the same ids, paired image by image: B − A and its standard error."""
    from boneage.evaluation import compare_prediction_files

    result = compare_prediction_files(a, b, column_a, column_b)
    if out_json is not None:
        atomic_write(out_json, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


@release_app.command("bundle")
@exit_on_user_error
def bundle(
    run_dir: Annotated[Path, typer.Option(help="the last stage's run folder")],
    model_version: Annotated[str, typer.Option(help="the model's own version, e.g. 0.13.0")],
    out_path: Annotated[Path, typer.Option("--out", help="the model file to write (.safetensors)")],
    records: Annotated[Path, typer.Option(help="folder for the release records")],
    prior_run: Annotated[
        list[Path] | None, typer.Option(help="earlier stages' run folders, oldest first")
    ] = None,
    checkpoint: Annotated[str | None, typer.Option(help="default: the run config's ship.checkpoint")] = None,
    native_images: Annotated[
        Path | None, typer.Option(help="held-out ids' own files (default: images/ beside the holdout CSV)")
    ] = None,
) -> None:
    """Bundle the checkpoint a run's ship rule names, measure its facts, and write the release records."""
    from boneage.release.bundle import make_bundle
    from boneage.release.records import write_records
    from boneage.release.runs import run_config_for

    cfg = run_config_for(run_dir / "last.ckpt")
    ckpt = run_dir / f"{checkpoint or cfg.ship.checkpoint}.ckpt"
    if not ckpt.is_file():
        raise BoneAgeInputError("checkpoint not found (train the release first: make release-train)", ckpt)
    path, facts, predictions = make_bundle(
        ckpt,
        out_path,
        model_version=model_version,
        native_images=native_images,
        on_step=lambda m: err.print(f"measuring: {m}"),
    )
    write_records(records, facts, predictions, run_dir, list(prior_run or []))
    out.print(f"wrote {path}, {path.with_suffix('.onnx').name} and the records in {records}")


@release_app.command("measure")
@exit_on_user_error
def measure(
    images: Annotated[Path, typer.Option(help="the held-out ids' own files")] = Path(
        "../shared/data/rsna-bone-age-sample/images"
    ),
    labels: Annotated[Path, typer.Option(help="their labels")] = Path(
        "../shared/data/rsna-bone-age-sample/labels.csv"
    ),
    model: Annotated[Path | None, typer.Option(help="model file (default: the bundled model)")] = None,
    out_json: Annotated[Path | None, typer.Option("--out", help="write the result here (JSON)")] = None,
    tolerance: Annotated[float, typer.Option(help="months the re-measured MAE may differ by")] = 0.05,
) -> None:
    """Re-measure a model file's held-out MAE through the predict path (6-view TTA) and compare it with the
    figure the file states. Exit 1 when they differ by more than the tolerance."""
    from boneage.evaluation import evaluate_folder
    from boneage.predict import load_predictor

    predictor = load_predictor(model)
    stated = predictor.facts.heldout_native
    report = evaluate_folder(predictor, images, labels, progress=True)
    got = round(float(report.metrics["mae_months"]), 3)
    result = {
        "model_version": predictor.facts.model_version,
        "images": int(report.metrics["n"]),
        "mae_months": got,
        "stated_mae_months": None if stated is None else stated.mae_months,
        "agrees": stated is not None and abs(got - stated.mae_months) <= tolerance,
    }
    if out_json is not None:
        atomic_write(out_json, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if not result["agrees"]:
        raise typer.Exit(1)
