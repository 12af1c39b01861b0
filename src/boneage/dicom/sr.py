"""The result as a DICOM Structured Report that a RIS or a reporting tool can read without parsing text.

Template TID 1500 (Measurement Report) with one TID 1501 measurement group, built with highdicom. Codes:

- **Bone age**: LOINC ``85151-9`` "Bone age" (the quantitative "XR Bone age" observation, in months, UCUM
  ``mo``). LOINC, not a private code, because it is the term a RIS/EHR interface (HL7 v2, FHIR) already
  uses for this observation, and DICOM SR carries LOINC (``LN``) concept names as readily as its own.
- **Bone age method**: LOINC ``85150-1`` "Bone age method" = SNOMED CT ``252956001`` "Greulich and Pyle bone
  age assessment": the model reproduces Greulich & Pyle readings (the RSNA labels) and its SD score uses the
  Greulich & Pyle (Brush Foundation) reference. The same SNOMED CT code is the Procedure Reported.
- **Chronological age**: DCM ``121033`` "Subject Age" (the DICOM concept for the subject's age at the
  study), in months.
- **SD score and the reference**: TID 311 Measurement Statistical Properties of the bone age: DCM ``121416``
  "Z-Score of measurement", DCM ``121414`` "Standard deviation of population" and SCT ``373098007`` "Mean
  Value of population" (the reference mean, equal to the chronological age by the reference's definition),
  with the population description and authority (the Greulich & Pyle citation) as text; CID 222 normality
  (SCT "Normal", "Abnormally High", "Abnormally Low") from the |z| > 2 flag.
- **Uncertainty**: TID 310 upper and lower measurement uncertainty (the spread of the test-time views).
- **Model and version**: TID 4019 Algorithm Identification (DCM ``111001`` Algorithm Name "boneage",
  ``111003`` Algorithm Version) on the group and on the bone age, and the device observer context.

A refused image gets no SR at all (the Secondary Capture says why): a report without a bone age would be a
document a RIS could mistake for a result.
"""

from __future__ import annotations

from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from boneage.clinical import REFERENCE_CITATION, Assessment

__all__ = ["BONE_AGE", "BONE_AGE_METHOD", "GREULICH_PYLE", "SUBJECT_AGE", "make_sr"]

BONE_AGE = Code("85151-9", "LN", "Bone age")
BONE_AGE_METHOD = Code("85150-1", "LN", "Bone age method")
GREULICH_PYLE = Code("252956001", "SCT", "Greulich and Pyle bone age assessment")
SUBJECT_AGE = Code("121033", "DCM", "Subject Age")
MONTHS = Code("mo", "UCUM", "month")
Z_SCORE = codes.CID227.ZScoreOfMeasurement  # (121416, DCM, "Z-Score of measurement")
POPULATION_SD = codes.CID226.StandardDeviationOfPopulation  # (121414, DCM)
POPULATION_MEAN = codes.CID226.MeanValueOfPopulation  # (373098007, SCT)
NO_UNITS = Code("1", "UCUM", "no units")
NORMALITY = {
    "normal": codes.CID222.Normal,
    "advanced": codes.CID222.AbnormallyHigh,
    "delayed": codes.CID222.AbnormallyLow,
}
SR_SERIES_NUMBER = 9902


def _num(name: Code, value: float, unit: Code) -> hd.sr.NumContentItem:
    return hd.sr.NumContentItem(
        name=name,
        value=round(float(value), 4),
        unit=unit,
        relationship_type=hd.sr.RelationshipTypeValues.HAS_PROPERTIES,
    )


def _uncertainty_in_months(node: Dataset) -> None:
    """highdicom writes TID 310's measurement uncertainty with unit "no units"; ours is in months, the unit
    of the bone age it qualifies."""
    for item in node.get("ContentSequence", []):
        name = item.get("ConceptNameCodeSequence")
        if item.get("ValueType") == "NUM" and name and "measurement uncertainty" in str(name[0].CodeMeaning):
            unit = item.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0]
            unit.CodeValue, unit.CodingSchemeDesignator, unit.CodeMeaning = (
                MONTHS.value,
                "UCUM",
                MONTHS.meaning,
            )
        _uncertainty_in_months(item)


def make_sr(
    source: Dataset,
    assessment: Assessment,
    *,
    series_uid: str,
    instance_uid: str,
    tracking_uid: str,
    device_uid: str,
    model_version: str,
    software_version: str,
    station: str | None = None,
) -> hd.sr.ComprehensiveSR:
    """A Comprehensive SR in ``source``'s study, with the bone age of ``assessment`` as coded measurements
    and a reference to ``source`` (the radiograph it was measured on)."""
    algorithm = hd.sr.AlgorithmIdentification(name="boneage", version=model_version)
    a = assessment
    properties: dict[str, Any] = {}
    if a.uncertainty_months is not None:
        properties["upper_measurement_uncertainty"] = round(float(a.uncertainty_months), 4)
        properties["lower_measurement_uncertainty"] = round(float(a.uncertainty_months), 4)
    if a.sd_score is not None and a.sd_months is not None and a.chronological_age_months is not None:
        properties["measurement_statistical_properties"] = hd.sr.MeasurementStatisticalProperties(
            values=[
                _num(Z_SCORE, a.sd_score, NO_UNITS),
                _num(POPULATION_MEAN, a.chronological_age_months, MONTHS),
                _num(POPULATION_SD, a.sd_months, MONTHS),
            ],
            description=f"Greulich & Pyle reference, {a.sex}s of the same chronological age",
            authority=REFERENCE_CITATION[:1024],
        )
        if a.flag in NORMALITY:
            properties["normality"] = NORMALITY[a.flag]
    image = hd.sr.SourceImageForMeasurement.from_source_image(source)
    measurements = [
        hd.sr.Measurement(
            name=BONE_AGE,
            value=round(float(a.bone_age_months), 4),
            unit=MONTHS,
            algorithm_id=algorithm,
            properties=hd.sr.MeasurementProperties(**properties) if properties else None,
            referenced_images=[image],
        )
    ]
    if a.chronological_age_months is not None:
        measurements.append(
            hd.sr.Measurement(
                name=SUBJECT_AGE, value=round(float(a.chronological_age_months), 4), unit=MONTHS
            )
        )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier="bone age"),
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=BONE_AGE_METHOD, value=GREULICH_PYLE)],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid,
            name=(station or "boneage")[:64],
            manufacturer_name="boneage",
            model_name=f"boneage {model_version}"[:64],
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=GREULICH_PYLE,
        imaging_measurements=[group],
    )
    sr = hd.sr.ComprehensiveSR(
        evidence=[source],
        content=report[0],
        series_instance_uid=series_uid,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=instance_uid,
        instance_number=1,
        manufacturer="boneage",
        is_complete=True,
        is_final=False,  # research use: never the definitive means of communicating a finding
        is_verified=False,
        series_description=f"boneage {model_version} bone age SR (research use only)"[:64],
        manufacturer_model_name="boneage",
        software_versions=software_version[:64],
    )
    _uncertainty_in_months(sr)
    description = "Bone age estimated by boneage from the referenced radiograph. Research use only."
    if a.cautions:  # issue #43 item 5: no normality is coded above; say why
        description = f"CAUTION: {a.cautions[0]} (no normality given). " + description
    sr.DerivationDescription = description[:1024]
    return sr
