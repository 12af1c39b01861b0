"""The DICOM node's parts without a network: the spool's crash-safe steps and bounds, and the result objects
(Secondary Capture and Structured Report) made from a real radiograph with the bundled model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import write_dicom
from PIL import Image
from pydicom.uid import generate_uid

from boneage.dicom.spool import Spool, valid_uid
from boneage.dicom.worker import derived_uid, process

HAND_ID = "1377"  # a boy, bone age 180 months in labels.csv


def _radiograph(path: Path, pixels: np.ndarray, **header: object) -> Path:
    """A CR image as a modality sends it: its study, series and the header facts the node reads."""
    fields = {
        "PatientName": "Müller^Jörg",
        "SpecificCharacterSet": "ISO_IR 100",
        "PatientID": "P1",
        "StudyInstanceUID": generate_uid(),
        "SeriesInstanceUID": generate_uid(),
        "AccessionNumber": "ACC1",
        "StudyDate": "20250301",
        "StudyTime": "101500",
    }
    fields.update(header)
    return write_dicom(path, pixels, **fields)


@pytest.fixture(scope="module")
def predictor():
    from boneage.predict import load_predictor

    return load_predictor(engine="onnx")


@pytest.fixture(scope="module")
def hand_pixels(shared_sample: Path) -> np.ndarray:
    return np.asarray(Image.open(shared_sample / "images" / f"{HAND_ID}.png").convert("L"))


# ---- spool ------------------------------------------------------------------------------------------------
def test_spool_steps_survive_a_restart_and_skip_duplicates(tmp_path: Path) -> None:
    """receive → assess → send, with a "crash" (a new Spool on the same folder) after each step: nothing
    acknowledged is lost, nothing finished is redone, and a UID seen before is a duplicate."""
    spool = Spool(tmp_path)
    assert spool.claim("1.2.3") is None
    assert spool.claim("1.2.3") == "in progress"
    spool.store("1.2.3", b"DICOM", study="9.9", calling="PACS")
    assert spool.claim("1.2.3") == "duplicate" and spool.pending == 1
    (spool.incoming / "1.2.4.dcm").write_bytes(b"renamed into place, crashed before the ledger row")
    (spool.tmp / ".half.tmp").write_bytes(b"half")

    spool = Spool(tmp_path)  # restart
    todo = spool.recover()
    assert todo == {"assess": ["1.2.3", "1.2.4"], "send": []} and spool.pending == 2
    assert not list(spool.tmp.iterdir())
    assert spool.begin_assessment("1.2.3") == 1
    spool.put_results("1.2.3", {"sc.dcm": b"sc", "sr.dcm": b"sr"}, outcome="assessed", detail="bone age 1")
    assert not spool.incoming_path("1.2.3").exists()
    assert [p.name for p in spool.result_files("1.2.3")] == ["sc.dcm", "sr.dcm"]
    spool.finish_without_results("1.2.4", outcome="ignored", detail="own result")

    spool = Spool(tmp_path)  # restart with a result waiting to be sent
    assert spool.recover() == {"assess": [], "send": ["1.2.3"]}
    assert spool.mark_retry("1.2.3", 60.0) == 1 and spool.due() == []
    assert spool.next_due() is not None and spool.next_due() > 0
    spool = Spool(tmp_path)
    spool.recover()  # a restart tries at once instead of waiting out the backoff
    assert [item.uid for item in spool.due()] == ["1.2.3"]
    spool.mark_sent("1.2.3")
    assert spool.pending == 0 and spool.pending_bytes == 0 and not spool.outbox_path("1.2.3").exists()
    assert spool.claim("1.2.3") == "duplicate" and spool.claim("1.2.4") == "duplicate"
    assert spool.counts() == {"sent": 1, "ignored": 1}


def test_spool_is_bounded(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_pending=2, max_bytes=10)
    assert spool.full_reason() is None
    spool.claim("1.1")
    spool.store("1.1", b"12345", study=None, calling=None)
    assert "MiB pending" in (spool.full_reason(incoming_bytes=6) or "")
    spool.claim("1.2")
    spool.store("1.2", b"1", study=None, calling=None)
    assert spool.full_reason() == "2 instances pending (limit 2)"
    huge = Spool(tmp_path / "other", min_free_bytes=1 << 60)
    assert "free on the spool's disk" in (huge.full_reason() or "")


def test_valid_uid() -> None:
    assert valid_uid("1.2.840.10008.5.1.4.1.1.1")
    for bad in ("", "1.2.x", "../etc", "1" * 65, "1..2"):
        assert not valid_uid(bad)


# ---- result objects ---------------------------------------------------------------------------------------
def _content(ds: pydicom.Dataset) -> list[pydicom.Dataset]:
    """Every content item of an SR tree, depth first."""
    out = []
    for item in ds.get("ContentSequence", []):
        out.append(item)
        out.extend(_content(item))
    return out


def _code(item: pydicom.Dataset) -> tuple[str, str]:
    name = item.ConceptNameCodeSequence[0]
    return name.CodeValue, name.CodingSchemeDesignator


def _num(items: list[pydicom.Dataset], code: tuple[str, str]) -> pydicom.Dataset:
    found = [i for i in items if i.ValueType == "NUM" and _code(i) == code]
    assert len(found) == 1, code
    return found[0]


def test_results_of_an_assessed_radiograph(predictor, hand_pixels: np.ndarray, tmp_path: Path) -> None:
    """SC and SR in the source's study (patient and study modules copied, names in their character set),
    new series named after boneage and the model version, the bone age and its context as coded values,
    references to the source; the same instance assessed again gives the very same UIDs."""
    from boneage.assessment import assess_image

    path = _radiograph(tmp_path / "hand.dcm", hand_pixels, PatientSex="M", PatientBirthDate="20100101")
    outcome = process(path, predictor)
    assert outcome.kind == "assessed" and set(outcome.files) == {"sc.dcm", "sr.dcm"}
    source = pydicom.dcmread(path)
    expected = assess_image(predictor, path).assessment
    version = predictor.facts.model_version

    sr = pydicom.dcmread(_save(tmp_path / "sr.dcm", outcome.files["sr.dcm"]))
    sc = pydicom.dcmread(_save(tmp_path / "sc.dcm", outcome.files["sc.dcm"]))
    for result in (sr, sc):
        assert result.StudyInstanceUID == source.StudyInstanceUID
        assert (result.PatientName, result.PatientID, result.AccessionNumber) == ("Müller^Jörg", "P1", "ACC1")
        assert result.SpecificCharacterSet == "ISO_IR 100"
        assert result.SeriesInstanceUID != source.SeriesInstanceUID
        assert result.SOPInstanceUID != source.SOPInstanceUID
        assert "boneage" in result.SeriesDescription and version in result.SeriesDescription
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33" and sr.Modality == "SR"
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and sc.BurnedInAnnotation == "YES"
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID

    items = _content(sr)
    bone_age = _num(items, ("85151-9", "LN"))
    assert bone_age.ConceptNameCodeSequence[0].CodeMeaning == "Bone age"
    value = float(bone_age.MeasuredValueSequence[0].NumericValue)
    assert value == pytest.approx(expected.bone_age_months, abs=1e-3)
    assert bone_age.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "mo"
    assert float(_num(items, ("121033", "DCM")).MeasuredValueSequence[0].NumericValue) == pytest.approx(
        expected.chronological_age_months, abs=1e-3
    )
    z = float(_num(items, ("121416", "DCM")).MeasuredValueSequence[0].NumericValue)
    assert z == pytest.approx(expected.sd_score, abs=1e-3)
    texts = {_code(i): i.TextValue for i in items if i.ValueType == "TEXT"}
    assert texts[("111001", "DCM")] == "boneage" and texts[("111003", "DCM")] == version
    assert "Greulich" in texts[("121406", "DCM")]  # Reference Authority: the reference used
    codes = {_code(i): i.ConceptCodeSequence[0].CodeValue for i in items if i.ValueType == "CODE"}
    assert codes[("85150-1", "LN")] == "252956001"  # Bone age method: Greulich and Pyle
    assert f"{expected.bone_age_months:.1f}" in sc.ImageComments and "research use only" in sc.ImageComments
    assert sc.pixel_array.shape == (1024, 1024, 3)

    again = process(path, predictor)
    assert {
        k: pydicom.dcmread(_save(tmp_path / f"again-{k}", v)).SOPInstanceUID for k, v in again.files.items()
    } == {
        "sc.dcm": sc.SOPInstanceUID,
        "sr.dcm": sr.SOPInstanceUID,
    }
    assert sc.SOPInstanceUID == derived_uid(source.SOPInstanceUID, version, "sc")


def _save(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_refused_images_get_a_not_assessed_capture_and_no_number(
    predictor, hand_pixels: np.ndarray, tmp_path: Path
) -> None:
    """No sex in the header, an image that is not a hand, pixels that cannot be decoded: an SC that says
    NOT ASSESSED and why, no SR, no bone age anywhere; our own result sent back is ignored."""
    stripes = ((np.arange(900)[:, None] // 12 % 2) * 255 * np.ones((1, 700))).astype(np.uint8)
    cases = {
        "PatientSex": _radiograph(tmp_path / "nosex.dcm", hand_pixels, PatientBirthDate="20100101"),
        "does not look like a PA left-hand radiograph": _radiograph(
            tmp_path / "stripes.dcm", stripes, PatientSex="F", PatientBirthDate="20100101"
        ),
    }
    broken = _radiograph(tmp_path / "broken.dcm", hand_pixels, PatientSex="F")
    ds = pydicom.dcmread(broken)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]  # truncated in transit
    ds.save_as(broken, enforce_file_format=True)
    cases["pixel data"] = broken
    for reason, path in cases.items():
        outcome = process(path, predictor)
        assert outcome.kind == "refused" and reason in outcome.detail, outcome.detail
        assert set(outcome.files) == {"sc.dcm"}
        sc = pydicom.dcmread(_save(tmp_path / "sc.dcm", outcome.files["sc.dcm"]))
        assert sc.ImageComments.startswith("NOT ASSESSED: ") and reason in sc.ImageComments
        assert "months" not in sc.ImageComments and "NOT ASSESSED" in sc.SeriesDescription
        assert sc.StudyInstanceUID == pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID

    own = process(tmp_path / "sc.dcm", predictor)
    assert own.kind == "ignored" and not own.files
    crashed = process(cases["PatientSex"], predictor, attempts=4)
    assert crashed.kind == "refused" and "stopped the node 3 times" in crashed.detail


def test_secondary_capture_pixels_without_any_image() -> None:
    from boneage.report import secondary_capture_pixels

    page = secondary_capture_pixels(None, None, reason="not a readable DICOM file", model_version="x")
    assert page.shape == (1024, 1024, 3) and page.dtype == np.uint8 and page.max() > 0
    with pytest.raises(ValueError):
        secondary_capture_pixels(None, None)


def test_destinations_are_checked_before_anything_starts() -> None:
    from boneage.dicom.node import Destination, _stow_failures, parse_destination
    from boneage.errors import BoneAgeInputError

    assert parse_destination("ORTHANC@127.0.0.1:4242") == Destination("ORTHANC", "127.0.0.1", 4242)
    assert parse_destination("PACS@[::1]:104") == Destination("PACS", "::1", 104)
    assert str(parse_destination("http://pacs:8042/dicom-web/")) == "http://pacs:8042/dicom-web"
    for bad in (
        "ORTHANC-127.0.0.1",
        "ORTHANC@host",
        "A@h:70000",
        "WAY_TOO_LONG_AE_TITLE@h:1",
        "http://",
        "x@h:0",
    ):
        with pytest.raises(BoneAgeInputError, match="--destination"):
            parse_destination(bad)
    assert _stow_failures(b'{"00081198": {"vr": "SQ"}, "00081199": {"vr": "SQ", "Value": [{}, {}]}}') == 0
    assert _stow_failures(b'{"00081198": {"vr": "SQ", "Value": [{}]}}') == 1
    assert _stow_failures(b"<html>proxy error</html>") == 1


def test_a_site_calibration_reaches_the_node_s_results(
    predictor, hand_pixels: np.ndarray, tmp_path: Path, site_calibration: Path
) -> None:
    """`boneage node --calibration site.json`: the SR's bone age is the calibrated one, the capture says it
    is calibrated, by which file and from what, the same as `boneage predict --calibration`."""
    from boneage.assessment import assess_image
    from boneage.growth import Calibration

    calibration = Calibration.load(site_calibration)
    path = _radiograph(tmp_path / "hand.dcm", hand_pixels, PatientSex="M", PatientBirthDate="20100101")
    outcome = process(path, predictor, calibration=calibration)
    assert outcome.kind == "assessed"
    expected = assess_image(predictor, path, calibration=calibration)
    sr = pydicom.dcmread(_save(tmp_path / "sr.dcm", outcome.files["sr.dcm"]))
    value = float(_num(_content(sr), ("85151-9", "LN")).MeasuredValueSequence[0].NumericValue)
    assert value == pytest.approx(expected.assessment.bone_age_months, abs=1e-3)
    uncalibrated = expected.workup.calibration.bone_age_uncalibrated_months
    assert abs(value - uncalibrated) > 0.5  # the shifted site really moved it
    sc = pydicom.dcmread(_save(tmp_path / "sc.dcm", outcome.files["sc.dcm"]))
    assert "calibrated to the site with site.json (110 cases)" in sc.ImageComments
    assert f"uncalibrated {uncalibrated:.1f} months" in sc.ImageComments
