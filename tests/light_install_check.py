"""The light install's proof (``make test-light``), run by that venv's Python, not by pytest.

In a fresh venv with only ``pip install .[serve]``: torch must be absent, ``boneage predict`` must give a
bone age for a real radiograph, and the web app must answer one prediction and serve /docs offline.
Usage: python tests/light_install_check.py SHARED_SAMPLE_FOLDER
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

TRAINING = ("torch", "timm", "kornia", "lightning", "torchvision")


def main(sample: Path) -> int:
    for name in TRAINING:
        try:
            __import__(name)
        except ImportError:
            continue
        raise SystemExit(f"light install check: {name} is importable; this venv is not light")
    image = sorted((sample / "images").glob("*.png"))[0]
    exe = shutil.which("boneage", path=str(Path(sys.executable).parent))
    start = time.perf_counter()
    done = subprocess.run(
        [exe, "predict", str(image), "--sex", "male", "--age", "10y", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"boneage predict failed ({done.returncode}): {done.stderr.strip()}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert isinstance(result["bone_age_months"], float), result
    print(f"light install: predict {image.name} -> {result['bone_age_months']:.1f} months in {wall:.2f} s")

    train = subprocess.run([exe, "train", "configs/quick.yaml"], capture_output=True, text=True, check=False)
    assert train.returncode == 2 and "boneage[train]" in train.stderr, (train.returncode, train.stderr)

    from boneage.web import background_server, create_app

    with background_server(create_app(workers=2)) as url:
        boundary = uuid.uuid4().hex
        body = b"".join(
            [
                f'--{boundary}\r\nContent-Disposition: form-data; name="sex"\r\n\r\nmale\r\n'.encode(),
                f'--{boundary}\r\nContent-Disposition: form-data; name="age"\r\n\r\n10y\r\n'.encode(),
                f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{image.name}"\r\n'
                "Content-Type: image/png\r\n\r\n".encode(),
                image.read_bytes(),
                f"\r\n--{boundary}--\r\n".encode(),
            ]
        )
        request = urllib.request.Request(
            f"{url}/api/v1/predict",
            data=body,
            method="POST",
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
        assert abs(answer["bone_age_months"] - result["bone_age_months"]) < 1e-3, answer
        assert answer["heatmap_png_base64"], "no heatmap"
        with urllib.request.urlopen(f"{url}/docs", timeout=30) as response:
            page = response.read().decode()
        assert "/docs-assets/swagger-ui-bundle.js" in page and "cdn" not in page.lower(), page[:500]
        with urllib.request.urlopen(f"{url}/docs-assets/swagger-ui-bundle.js", timeout=30) as response:
            assert response.status == 200
    print("light install: web request ok (heatmap included), /docs offline")

    # the DICOM node's assessment step (boneage node): a radiograph as DICOM in, SC + SR out
    import numpy as np
    import pydicom
    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from boneage.dicom.node import accepted_transfer_syntaxes
    from boneage.dicom.worker import process
    from boneage.predict import load_predictor

    assert "1.2.840.10008.1.2.4.70" in accepted_transfer_syntaxes(), "no JPEG lossless decoder installed"
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.PatientSex = "CR", "LIGHT", "M"
    pixels = np.asarray(Image.open(image).convert("L"))
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = pixels.tobytes()
    dicom_path = Path(f"/tmp/boneage-light-{uuid.uuid4().hex}.dcm")
    pydicom.dcmwrite(dicom_path, ds, enforce_file_format=True)
    try:
        outcome = process(dicom_path, load_predictor(engine="onnx"))
    finally:
        dicom_path.unlink()
    assert outcome.kind == "assessed" and set(outcome.files) == {"sc.dcm", "sr.dcm"}, outcome.detail
    leaked = [m for m in TRAINING if m in sys.modules]
    assert not leaked, leaked
    print(f"light install: DICOM node step -> {outcome.detail}, SC + SR; no torch")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
