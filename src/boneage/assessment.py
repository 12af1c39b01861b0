"""One radiograph in, one clinical result out: prediction, SD score, heatmap and report.

The CLI, the batch job and the web app all call ``assess_image`` so they give the same answer, the same
warnings and the same report for the same file.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from boneage.clinical import Assessment, assess, format_months, parse_age
from boneage.data.io import Radiograph
from boneage.errors import BoneAgeInputError
from boneage.growth import Calibration, GrowthWorkup, History, check_height_cm, growth_workup, read_history
from boneage.predict import Prediction, Predictor

AGE_CONFLICT_MONTHS = 1.0


@dataclass
class Result:
    prediction: Prediction
    assessment: Assessment
    heatmap_png: bytes | None = None
    workup: GrowthWorkup | None = None  # issue #45: adult/target height, follow-up, calibration, export

    @property
    def radiograph_png(self) -> bytes:
        return png_bytes(self.prediction.image) if self.prediction.image is not None else b""

    def to_dict(self, images: bool = False) -> dict[str, Any]:
        """JSON-safe result; ``images`` adds the heatmap (and the model's input) as base64 PNG."""
        data = {
            "file": self.prediction.source,
            **self.assessment.to_dict(),
            "tta_views_months": [round(v, 2) for v in self.prediction.views_months],
        }
        if self.workup is not None:
            data.update(self.workup.to_dict())
        if images:
            data["heatmap_png_base64"] = (
                base64.b64encode(self.heatmap_png).decode() if self.heatmap_png else None
            )
            data["input_png_base64"] = base64.b64encode(self.radiograph_png).decode()
        return data


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image)).save(buf, format="PNG")
    return buf.getvalue()


def heatmap_overlay_png(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> bytes:
    """Grad-CAM in a jet colour map blended over the greyscale input, so anatomy stays readable."""
    from matplotlib import colormaps

    grey = np.repeat(np.asarray(image, dtype=np.float32)[..., None] / 255.0, 3, axis=2)
    heat = colormaps["jet"](np.clip(cam, 0, 1))[..., :3]
    blend = (1 - alpha) * grey + alpha * heat
    return png_bytes(np.clip(np.rint(blend * 255), 0, 255).astype(np.uint8))


def resolve_age(given: str | float | None, radiograph: Radiograph | None) -> tuple[float | None, list[str]]:
    """Chronological age in months: the flag wins over the DICOM dates, and a disagreement is reported, as
    are header dates that were present but unreadable (e.g. StudyDate 20231345)."""
    months = parse_age(given)
    header = radiograph.chronological_age_months if radiograph is not None else None
    notes: list[str] = list(radiograph.header_warnings) if radiograph is not None else []
    if header is not None and (header < 0 or header > 240):
        notes.append(f"DICOM dates give an implausible age ({header:.0f} months); ignored")
        header = None
    if months is not None and header is not None and abs(months - header) > AGE_CONFLICT_MONTHS:
        notes.append(
            f"age given as {format_months(months)} but the DICOM dates say {format_months(header)}; "
            f"using {format_months(months)}"
        )
    return (months if months is not None else header), notes


def assess_image(
    predictor: Predictor,
    image: str | Path | bytes | Radiograph,
    sex: str | None = None,
    age: str | float | None = None,
    *,
    name: str | None = None,
    heatmap: bool = True,
    height_cm: float | None = None,
    mother_height_cm: float | None = None,
    father_height_cm: float | None = None,
    history: History | str | Path | bytes | None = None,
    calibration: Calibration | None = None,
) -> Result:
    """Predict, compare with the Greulich & Pyle reference, and draw the heatmap for one radiograph.

    The growth work-up (``boneage.growth``) rides along: ``height_cm`` gives the Bayley-Pinneau adult height,
    both parents' heights the Tanner target height, ``history`` (earlier results, or a path to them) the
    follow-up, and ``calibration`` corrects the bone age for a site here, so every caller reports the same
    corrected value and says so."""
    # the child's numbers are checked before the model runs (a typo costs nothing)
    check_height_cm(height_cm, "height")
    mothers = check_height_cm(mother_height_cm, "mother's height", parent=True)
    fathers = check_height_cm(father_height_cm, "father's height", parent=True)
    if (mothers is None) != (fathers is None):
        raise BoneAgeInputError("the target height needs both the mother's and the father's height")
    if history is not None and not isinstance(history, History):
        history = read_history(history)
    if calibration is not None:
        calibration.check_model(predictor.info)
    pred = predictor.predict(image, sex, name=name)
    chron, notes = resolve_age(age, pred.radiograph)
    bone, uncertainty, use = pred.bone_age_months, pred.uncertainty_months, None
    if calibration is not None:
        views = getattr(predictor, "views", None)
        use = calibration.use(pred.sex, bone, uncertainty, tta=None if views is None else len(views) > 1)
        bone, uncertainty = use.bone_age_months, use.uncertainty_months
        notes += use.notes
    result = assess(
        bone,
        pred.sex,
        chron,
        uncertainty_months=uncertainty,
        warnings=[*pred.warnings, *notes],
        training_range=predictor.training_range,
        cautions=pred.cautions,  # issue #43 item 5: they lead, and withhold the advanced/delayed flag
    )
    workup = growth_workup(
        sex=result.sex,
        bone_age_months=result.bone_age_months,
        chronological_age_months=result.chronological_age_months,
        uncertainty_months=result.uncertainty_months,
        sd_score=result.sd_score,
        source=pred.source,
        height_cm=height_cm,
        mother_height_cm=mothers,
        father_height_cm=fathers,
        history=history,
        calibration=use,
    )
    result.warnings.extend(workup.warnings())
    heat = None
    if heatmap and pred.image is not None:
        cam = predictor.heatmap(pred)  # None: this model's graph has no heatmap
        heat = heatmap_overlay_png(pred.image, cam) if cam is not None else None
    return Result(pred, result, heat, workup)


def write_report(result: Result, predictor: Predictor, out_dir: str | Path, name: str | None = None) -> Path:
    """The one-page HTML report for a result (radiograph, heatmap, SD chart, numbers, caveats)."""
    from boneage.report import write_html_report  # matplotlib: only when a report is written

    source = result.prediction.source
    stem = name or Path(source).name or "report"
    owner = str(Path(source).resolve()) if source and Path(source).exists() else source
    return write_html_report(
        result.assessment,
        result.radiograph_png,
        result.heatmap_png,
        out_dir,
        stem,
        model_info=predictor.info,
        workup=result.workup,
        owner=owner,
    )
