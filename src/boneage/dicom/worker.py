"""One received instance in, its result objects out: the node's assessment step, free of any networking.

The same ``assess_image`` as ``boneage predict`` and the web page (sex and ages from the DICOM header), then
a Secondary Capture (always) and a Structured Report (only with a bone age). Every failure an image can
cause becomes a refusal with a one-line reason and a "not assessed" Secondary Capture, never an exception
out of :func:`process` and never a number.

Result UIDs are derived from the source SOP Instance UID and the model version (name-based UUIDs as
``2.25.`` UIDs, ISO/IEC 9834-8), so assessing the same instance again after a crash makes the very same
instances, which the destination stores once.
"""

from __future__ import annotations

import io
import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from boneage import __version__
from boneage.assessment import assess_image
from boneage.clinical import format_months
from boneage.data.io import Radiograph, read_radiograph
from boneage.errors import BoneAgeInputError
from boneage.growth import Calibration
from boneage.predict import Predictor
from boneage.report import secondary_capture_pixels

__all__ = ["MAX_ASSESS_ATTEMPTS", "Outcome", "derived_uid", "process", "reference_dataset"]

LOG = logging.getLogger("boneage.node")

#: An instance whose assessment was started this many times without finishing (the process died each
#: time) is not tried again: it gets a "not assessed" result instead of crashing the node forever.
MAX_ASSESS_ATTEMPTS = 3

_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "boneage/dicom-node/results")

#: Patient and study attributes highdicom copies from the source; DICOM type 2 (may be empty, not absent).
_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


@dataclass
class Outcome:
    """What became of one instance: ``kind`` assessed, refused or ignored; ``files`` the objects to send."""

    kind: str
    detail: str
    files: dict[str, bytes] = field(default_factory=dict)
    log: dict[str, Any] = field(default_factory=dict)


def derived_uid(*parts: str) -> str:
    """A UID fixed by ``parts`` (source UID, model version, role): the same inputs, the same UID. A
    name-based (SHA-1) UUID as a ``2.25.`` UID, the ISO/IEC 9834-8 form DICOM allows without a root."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, '|'.join(str(p) for p in parts)).int}"


def reference_dataset(path: str | Path) -> Dataset:
    """The source's header without pixels, with the type 2 attributes highdicom copies present (empty when
    the modality left them out), so the results carry the source's patient and study modules."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    for keyword in _TYPE2:
        if keyword not in ds or ds[keyword].value is None:
            setattr(ds, keyword, "")
    return ds


def is_own_result(ds: Dataset) -> bool:
    """Our own Secondary Capture sent back to us (a PACS rule forwarding every SC of the study): assessing
    it would answer with another result, and so on forever."""
    return str(ds.get("Manufacturer", "")) == "boneage" and str(ds.get("SeriesDescription", "")).startswith(
        "boneage"
    )


def _encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def process(
    path: Path,
    predictor: Predictor,
    *,
    attempts: int = 1,
    station: str | None = None,
    calibration: Calibration | None = None,
) -> Outcome:
    """Assess the instance at ``path`` and build its result objects; never raises for a bad image."""
    model_version = predictor.facts.model_version
    software = f"boneage {__version__}"
    try:
        source = reference_dataset(path)
    except Exception as exc:  # a file that passed the C-STORE but is not readable DICOM after all
        return Outcome("ignored", f"not a readable DICOM header ({_one_line(exc, 160)}); no result possible")
    source_uid = str(source.get("SOPInstanceUID", "")) or path.stem
    if is_own_result(source):
        return Outcome("ignored", "a boneage result sent back to the node; not assessed again")
    if not source.get("StudyInstanceUID"):
        return Outcome("ignored", "no Study Instance UID: a result could not be filed in the study")

    uids = {
        role: derived_uid(source_uid, model_version, role)
        for role in ("sc-series", "sc", "sr-series", "sr", "tracking")
    }
    result = None
    radiograph: Radiograph | None = None
    reason: str | None = None
    if attempts > MAX_ASSESS_ATTEMPTS:
        reason = f"its assessment stopped the node {attempts - 1} times; not tried again"
    else:
        try:
            radiograph = read_radiograph(path, name=source_uid)
            if radiograph.sex is None:
                reason = (
                    "the DICOM header gives no PatientSex (M or F), and the bone age reference differs by sex"
                )
            else:
                result = assess_image(
                    predictor, radiograph, heatmap=True, name=source_uid, calibration=calibration
                )
        except BoneAgeInputError as exc:
            reason = exc.problem
        except Exception as exc:  # a library failure must become a refusal, not a dead worker
            LOG.error("event=error step=assess sop=%s error=%s", source_uid, type(exc).__name__)
            LOG.debug("traceback of the error above", exc_info=True)
            reason = f"internal error while assessing ({type(exc).__name__}); see the node's log"
    reason = _one_line(reason) if reason else None

    if result is not None:
        a = result.assessment
        comments = f"Bone age {a.bone_age_months:.1f} months ({format_months(a.bone_age_months)})"
        if a.cautions:  # issue #43 item 5: the doubt about the image leads
            comments = f"CAUTION: {a.cautions[0]}. " + comments
        if a.uncertainty_months is not None:
            comments += f" ± {a.uncertainty_months:.1f}"
        if a.chronological_age_months is not None and a.sd_score is not None:
            comments += (
                f"; chronological age {a.chronological_age_months:.1f} months; difference "
                f"{a.difference_months:+.1f} months; SD score {a.sd_score:+.2f} "
                f"({a.flag_text}, Greulich & Pyle)"
            )
        use = result.workup.calibration if result.workup is not None else None
        if use is not None and use.applied:
            comments += (
                f"; calibrated to the site with {use.file} ({use.cases} cases), uncalibrated "
                f"{use.bone_age_uncalibrated_months:.1f} months"
            )
        comments += f"; boneage model {model_version}; research use only"
        pixels = secondary_capture_pixels(
            a,
            radiograph.pixels if radiograph else None,
            heatmap_png=result.heatmap_png,
            model_version=model_version,
        )
    else:
        comments = f"NOT ASSESSED: {reason}; boneage model {model_version}; research use only"
        pixels = secondary_capture_pixels(
            None, radiograph.pixels if radiograph else None, reason=reason, model_version=model_version
        )

    from boneage.dicom.sc import make_sc

    files = {
        "sc.dcm": _encode(
            make_sc(
                source,
                pixels,
                series_uid=uids["sc-series"],
                instance_uid=uids["sc"],
                model_version=model_version,
                software_version=software,
                comments=comments,
                assessed=result is not None,
            )
        )
    }
    if result is None:
        return Outcome("refused", reason or "not assessed", files, {"sc": uids["sc"]})

    from boneage.dicom.sr import make_sr

    files["sr.dcm"] = _encode(
        make_sr(
            source,
            result.assessment,
            series_uid=uids["sr-series"],
            instance_uid=uids["sr"],
            tracking_uid=uids["tracking"],
            device_uid=derived_uid("boneage-device", station or "boneage"),
            model_version=model_version,
            software_version=software,
            station=station,
        )
    )
    a = result.assessment
    fields = {
        "bone_age_months": round(a.bone_age_months, 2),
        "uncertainty_months": round(a.uncertainty_months or 0.0, 2),
        "sd_score": None if a.sd_score is None else round(a.sd_score, 2),
        "warnings": len(a.warnings),
        "sc": uids["sc"],
        "sr": uids["sr"],
    }
    return Outcome("assessed", f"bone age {a.bone_age_months:.2f} months", files, fields)
