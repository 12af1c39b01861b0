"""The result as a Secondary Capture image: what a radiologist sees in any PACS viewer, beside the radiograph.

The page itself (hand, heatmap, numbers, "research use only", or "NOT ASSESSED" and why) is drawn by
:func:`boneage.report.secondary_capture_pixels`; this module wraps it into a DICOM object in the source's
study with highdicom (patient and study modules copied from the source, new series, a reference to the
source image) so the viewer files it under the same study.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian

__all__ = ["SC_SERIES_NUMBER", "make_sc", "source_reference"]

SC_SERIES_NUMBER = 9901


def source_reference(source: Dataset) -> DicomSequence:
    """A one-item sequence naming the source radiograph (SOP class and instance)."""
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    return DicomSequence([item])


def make_sc(
    source: Dataset,
    pixels: np.ndarray,
    *,
    series_uid: str,
    instance_uid: str,
    model_version: str,
    software_version: str,
    comments: str,
    assessed: bool,
) -> hd.sc.SCImage:
    """An RGB Secondary Capture of ``pixels`` ((H, W, 3) uint8) in ``source``'s study.

    ``comments`` (Image Comments) repeats the page's text for tools that read headers, not pixels:
    the result line, or "NOT ASSESSED: <reason>".
    """
    what = "bone age result" if assessed else "NOT ASSESSED"
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=np.ascontiguousarray(pixels, dtype=np.uint8),
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        patient_orientation=("L", "F"),  # required by highdicom for PATIENT; emptied below
        series_instance_uid=series_uid,
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=instance_uid,
        instance_number=1,
        manufacturer="boneage",
        series_description=f"boneage {model_version} {what} (research use only)"[:64],
        manufacturer_model_name="boneage",
        software_versions=software_version[:64],
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    # A page of text and pictures has no patient orientation: type 2, so present and empty.
    sc.PatientOrientation = None
    sc.BurnedInAnnotation = "YES"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.ImageComments = comments[:10240]
    sc.DerivationDescription = (
        "Bone age result page drawn by boneage from the referenced radiograph. Research use only."
    )
    sc.SourceImageSequence = source_reference(source)
    sc.ReferencedImageSequence = source_reference(source)
    return sc
