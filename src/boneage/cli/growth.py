"""``boneage calibrate`` and ``boneage growth-schema``: the issue #45 commands.

``calibrate`` fits a site's per-sex correction of the bone age to its own readers (``boneage.growth``),
cross-validates it on the same radiographs and writes it only when it helps; ``predict``, ``evaluate``,
``serve`` (and the DICOM node through ``assess_image``) then take ``--calibration site.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from boneage.cli._common import exit_on_user_error, out
from boneage.errors import BoneAgeInputError

ENGINE_HELP = "onnx (ONNX Runtime, no torch), torch (the research Predictor), or auto (onnx when installed)"


def _table(calibration: Any) -> list[str]:
    """The cross-validation verdict per sex, as the clinician reads it."""
    lines = [
        f"{'sex':<7}{'n':>5}  {'MAE before':>10}  {'MAE after (CV)':>14}  {'bias before':>11}  "
        f"{'bias after (CV)':>15}  correction"
    ]
    for sex in ("female", "male"):
        c = calibration.correction(sex)
        verdict = (
            f"kept: {c.intercept:+.2f} + {c.slope:.3f} x predicted" if c.applied else f"not kept ({c.reason})"
        )
        lines.append(
            f"{sex:<7}{c.n:>5}  {c.mae_before_months:>10.2f}  {c.mae_after_months:>14.2f}  "
            f"{c.bias_before_months:>+11.2f}  {c.bias_after_months:>+15.2f}  {verdict}"
        )
    return lines


@exit_on_user_error
def calibrate_command(
    images: Annotated[Path, typer.Option(help="folder of the site's radiographs named <id>.png (or .dcm)")],
    labels: Annotated[Path, typer.Option(help="the site's readings: CSV with id, bone age (months) and sex")],
    out_path: Annotated[Path, typer.Option("--out", help="where to write the calibration, e.g. site.json")],
    checkpoint: Annotated[Path | None, typer.Option(help="checkpoint (default: the bundled model)")] = None,
    engine: Annotated[str | None, typer.Option(help=ENGINE_HELP)] = None,
    tta: Annotated[bool, typer.Option(help="average test-time augmented views (as predict does)")] = True,
    as_json: Annotated[
        bool, typer.Option("--json", help="print the calibration (or refusal) as JSON")
    ] = False,
) -> None:
    """Fit a per-sex linear correction of the bone age to a site's own readings (at least 50 radiographs per
    sex), judge it by cross-validation on them, and write it only if it lowers the mean absolute error."""
    from boneage.data.labels import read_labels
    from boneage.growth import check_calibration_counts, fit_calibration, predict_labelled
    from boneage.predict import load_predictor

    if out_path.is_dir():
        raise BoneAgeInputError("is a folder; --out takes a file name, e.g. site.json", out_path)
    if not out_path.parent.is_dir():
        raise BoneAgeInputError("the folder for --out does not exist", out_path)
    table = read_labels(labels, images)
    check_calibration_counts(table["male"].to_numpy(bool), labels)  # before the model loads
    predictor = load_predictor(checkpoint, engine=engine, tta=tta)
    predicted = predict_labelled(predictor, table["path"], table["male"].to_numpy(bool))
    calibration = fit_calibration(
        predicted,
        table["boneage"].to_numpy(float),
        table["male"].to_numpy(bool),
        model=predictor.info,
        tta=tta,
        labels=str(labels),
        source=labels,
    )
    if as_json:
        print(json.dumps({"written": calibration.helps, **calibration.model_dump(mode="json")}))
    else:
        for line in _table(calibration):
            out.print(line, highlight=False, soft_wrap=True)
    if not calibration.helps:
        raise BoneAgeInputError(
            "no calibration written: the correction does not help for either sex in "
            f"{calibration.folds}-fold cross-validation on these radiographs (no difference from these "
            "readings that a per-sex line corrects beyond chance)",
            labels,
        )
    calibration.save(out_path)
    if not as_json:
        out.print(f"wrote {out_path} ({calibration.cases} cases)", highlight=False, soft_wrap=True)


def growth_schema_command() -> None:
    """Print the JSON schema of the growth export record (the "growth" object of predict --json)."""
    from boneage.growth import GrowthExport

    print(json.dumps(GrowthExport.model_json_schema(), indent=2))
