"""``boneage node`` with real components: an Orthanc PACS on loopback ports plays the hospital, the node runs
as a subprocess (``python -m boneage node``) and dcmtk's storescu/echoscu are a second, independent client.

Covered: results (SC + SR) in the same study with the SR's bone age equal to ``boneage predict`` on the
same file; a JPEG-lossless copy and the other compressed transfer syntaxes; a duplicate send; a non-hand
image; a calling AE title that is not allowed; the destination down while results are pending; SIGTERM
draining; SIGKILL mid-batch and restart; a full spool refusing new associations.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_helpers import (
    COMPREHENSIVE_SR,
    DICOMWEB_PLUGIN,
    ORTHANC,
    NodeProcess,
    Orthanc,
    dcmtk,
    dcmtk_path,
    echoscu,
    free_port,
    radiograph_dicom,
    storescu,
    wait_until,
)
from PIL import Image
from typer.testing import CliRunner

from boneage.cli import app
from boneage.dicom.spool import Spool

pytestmark = pytest.mark.dicom

JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"


def _require_tools() -> None:
    """Orthanc and dcmtk are the test's hospital: missing in CI is a failure, elsewhere a skip."""
    missing = [tool for tool in ("storescu", "echoscu", "dcmcjpeg") if dcmtk_path(tool) is None]
    missing += [ORTHANC] if shutil.which(ORTHANC) is None else []
    if missing:
        message = f"{', '.join(missing)} not found (apt-get install orthanc dcmtk)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def test_the_independent_client_is_dcmtk_even_in_an_activated_virtualenv(monkeypatch) -> None:
    """pynetdicom's same-named ``storescu`` script in the environment's bin folder (first on PATH once the
    virtualenv is activated) takes other options: the tests must still reach dcmtk's."""
    _require_tools()
    env_bin = str(Path(sys.executable).parent)
    monkeypatch.setenv("PATH", env_bin + os.pathsep + os.environ.get("PATH", ""))
    for tool in ("storescu", "echoscu"):
        found = dcmtk_path(tool)
        assert found is not None and Path(found).parent.resolve() != Path(env_bin).resolve()
        version = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=30)
        assert "dcmtk" in (version.stdout + version.stderr).lower(), version


@pytest.fixture(scope="module")
def hands(shared_sample: Path) -> list[dict]:
    """Real radiographs with their sex and a chronological age near their bone age (as in a clinic)."""
    with open(shared_sample / "labels.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if 60 <= float(r["boneage"]) <= 200][:8]
    out = []
    for row in rows:
        pixels = np.asarray(Image.open(shared_sample / "images" / f"{row['id']}.png").convert("L"))
        study = dt.date(2025, 3, 1)
        birth = study - dt.timedelta(days=round(float(row["boneage"]) * 30.4375) + 100)
        out.append(
            {
                "pixels": pixels,
                "sex": "M" if row["male"] == "True" else "F",
                "birth": birth.strftime("%Y%m%d"),
            }
        )
    return out


def _hand_file(path: Path, hand: dict, **header: object) -> Path:
    fields = {"PatientSex": hand["sex"], "PatientBirthDate": hand["birth"], **header}
    return radiograph_dicom(path, hand["pixels"], **fields)


def _sop(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory):
    """Orthanc, and the port the node it knows as modality ``boneage`` will listen on."""
    _require_tools()
    node_port = free_port()
    plugins = (DICOMWEB_PLUGIN,) if Path(DICOMWEB_PLUGIN).is_file() else ()
    orthanc = Orthanc(tmp_path_factory.mktemp("orthanc"), node_port, plugins=plugins).start()
    yield orthanc, node_port
    orthanc.stop()


@pytest.fixture(scope="module")
def node(pacs, tmp_path_factory: pytest.TempPathFactory):
    orthanc, port = pacs
    spool = tmp_path_factory.mktemp("node") / "spool"
    proc = NodeProcess(
        spool,
        f"ORTHANC@127.0.0.1:{orthanc.dicom_port}",
        "--allow-aet",
        "ORTHANC",
        "--allow-aet",
        "STORESCU",
        "--retry-max",
        "1",
        "--workers",
        "2",
        port=port,
    ).start()
    yield proc
    proc.stop()


def _wait_results(orthanc: Orthanc, study: str, expected: tuple[int, int], timeout: float = 60) -> None:
    wait_until(
        lambda: orthanc.result_counts(study) == expected, timeout, f"{expected} SC/SR in study {study}"
    )


def test_bad_destination_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["node", "--destination", "ORTHANC-127.0.0.1", "--spool", str(tmp_path / "spool")]
    )
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "AET@host:port" in lines[0], result.output


def test_results_arrive_in_the_same_study_with_the_bone_age_of_predict(
    pacs, node: NodeProcess, hands: list[dict], tmp_path: Path
) -> None:
    """Two radiographs (one JPEG-lossless compressed) uploaded to Orthanc and sent by Orthanc to the node:
    each study gets one SC and one SR in new series of their own, referencing the source, and the SR's bone
    age equals ``boneage predict`` on the same file within 0.05 months."""
    orthanc, _ = pacs
    plain = _hand_file(tmp_path / "plain.dcm", hands[0])
    raw = _hand_file(tmp_path / "raw.dcm", hands[1])
    lossless = tmp_path / "lossless.dcm"
    subprocess.run([dcmtk("dcmcjpeg"), "+e1", str(raw), str(lossless)], check=True, capture_output=True)
    assert pydicom.dcmread(lossless).file_meta.TransferSyntaxUID == JPEG_LOSSLESS_SV1

    uploaded = {path: orthanc.upload(path) for path in (plain, lossless)}
    orthanc.send_to_node([instance for instance, _ in uploaded.values()])
    predicted = {}
    for path in uploaded:
        run = CliRunner().invoke(app, ["predict", str(path), "--json"])
        assert run.exit_code == 0, run.output
        predicted[path] = json.loads(run.stdout.strip().splitlines()[-1])["bone_age_months"]

    for path, (_, study) in uploaded.items():
        _wait_results(orthanc, study, (1, 1))
        source = pydicom.dcmread(path, stop_before_pixels=True)
        results = orthanc.results(study)
        sc, sr = results["sc"][0], results["sr"][0]
        for obj in (sc, sr):
            assert obj.StudyInstanceUID == source.StudyInstanceUID and obj.PatientID == source.PatientID
            assert obj.SeriesInstanceUID != source.SeriesInstanceUID and "boneage" in obj.SeriesDescription
        assert sc.SeriesInstanceUID != sr.SeriesInstanceUID
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert sr.SOPClassUID == COMPREHENSIVE_SR
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        bone_age = [
            item
            for item in _items(sr)
            if item.ValueType == "NUM" and item.ConceptNameCodeSequence[0].CodeValue == "85151-9"
        ]
        value = float(bone_age[0].MeasuredValueSequence[0].NumericValue)
        assert value == pytest.approx(predicted[path], abs=0.05), path.name
        assert "NOT ASSESSED" not in sc.ImageComments and f"{value:.1f}" in sc.ImageComments

    received = {e["sop"]: e for e in node.events("received")}
    assert received[_sop(lossless)]["transfer_syntax"] == JPEG_LOSSLESS_SV1  # decoded by the node itself
    assert received[_sop(plain)]["calling"] == "ORTHANC"


def _items(ds: pydicom.Dataset) -> list[pydicom.Dataset]:
    out = []
    for item in ds.get("ContentSequence", []):
        out.append(item)
        out.extend(_items(item))
    return out


def test_a_duplicate_send_is_acknowledged_and_not_assessed_again(
    pacs, node: NodeProcess, hands: list[dict], tmp_path: Path
) -> None:
    orthanc, _ = pacs
    path = _hand_file(tmp_path / "dup.dcm", hands[2])
    instance, study = orthanc.upload(path)
    orthanc.send_to_node([instance])
    _wait_results(orthanc, study, (1, 1))
    sop = _sop(path)
    orthanc.send_to_node([instance])  # Orthanc sends it again
    again = storescu(node, [path])  # and another client too
    assert again.returncode == 0, again.stderr
    wait_until(
        lambda: len([e for e in node.events("duplicate") if e["sop"] == sop]) == 2, 20, "two duplicates"
    )
    assert len([e for e in node.events("assessed") if e["sop"] == sop]) == 1
    assert len([e for e in node.events("sent") if e["sop"] == sop]) == 1
    assert orthanc.result_counts(study) == (1, 1)


def test_a_non_hand_image_comes_back_not_assessed_and_without_a_number(
    pacs, node: NodeProcess, tmp_path: Path
):
    orthanc, _ = pacs
    stripes = ((np.arange(900)[:, None] // 12 % 2) * 255 * np.ones((1, 700))).astype(np.uint8)
    path = radiograph_dicom(tmp_path / "stripes.dcm", stripes, PatientSex="F", PatientBirthDate="20150101")
    instance, study = orthanc.upload(path)
    orthanc.send_to_node([instance])
    _wait_results(orthanc, study, (1, 0))
    sc = orthanc.results(study)["sc"][0]
    assert sc.ImageComments.startswith("NOT ASSESSED: does not look like a PA left-hand radiograph")
    assert "months" not in sc.ImageComments and "NOT ASSESSED" in sc.SeriesDescription
    refused = [e for e in node.events("refused") if e["sop"] == _sop(path)]
    assert len(refused) == 1 and "bone_age_months" not in refused[0]


def test_compressed_transfer_syntaxes_are_accepted_and_decoded(
    node: NodeProcess, hands: list[dict], tmp_path: Path
) -> None:
    """JPEG baseline, JPEG 2000, JPEG-LS and deflate, sent by storescu in their own transfer syntax. The
    header has no PatientSex, so each is refused for that reason, which comes only after the pixels were
    decoded (an undecodable file is refused for its pixel data instead), and no model time is spent."""
    from pydicom.uid import JPEG2000Lossless, JPEGLSLossless

    base = _hand_file(tmp_path / "base.dcm", hands[3], PatientSex="")
    cases = {}
    baseline = tmp_path / "jpeg-baseline.dcm"
    subprocess.run([dcmtk("dcmcjpeg"), "+eb", str(base), str(baseline)], check=True, capture_output=True)
    cases["1.2.840.10008.1.2.4.50"] = (_fresh(baseline), ["-xy"])
    for uid, option in ((JPEG2000Lossless, "-xv"), (JPEGLSLossless, "-xt")):
        ds = pydicom.dcmread(base)
        ds.compress(uid)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        path = tmp_path / f"{uid}.dcm"
        ds.save_as(path, enforce_file_format=True)
        cases[str(uid)] = (path, [option])
    cases["1.2.840.10008.1.2.1.99"] = (_fresh(base), ["-xd"])
    for syntax, (path, options) in cases.items():
        sent = storescu(node, [path], *options)
        assert sent.returncode == 0, (syntax, sent.stderr)
    for syntax, (path, _) in cases.items():
        sop = _sop(path)
        received = wait_until(lambda s=sop: [e for e in node.events("received") if e["sop"] == s], 20, syntax)
        assert received[0]["transfer_syntax"] == syntax
        refused = wait_until(lambda s=sop: [e for e in node.events("refused") if e["sop"] == s], 30, syntax)
        assert "PatientSex" in refused[0]["reason"], (syntax, refused[0]["reason"])


def _fresh(path: Path) -> Path:
    """The same file as a new instance (a new SOP Instance UID), in its transfer syntax."""
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    out = path.with_name(path.stem + "-fresh.dcm")
    ds.save_as(out, enforce_file_format=True)
    return out


def test_a_calling_ae_title_not_allowed_is_rejected(node: NodeProcess) -> None:
    rejected = echoscu(node, "INTRUDER")
    assert rejected.returncode != 0 and "reject" in (rejected.stdout + rejected.stderr).lower()
    wait_until(
        lambda: [e for e in node.events("association_rejected") if e["calling"] == "INTRUDER"], 10, "log"
    )
    assert echoscu(node, "STORESCU").returncode == 0


def test_results_wait_for_a_destination_that_is_down(
    pacs, node: NodeProcess, hands: list[dict], tmp_path: Path
) -> None:
    """Orthanc stopped while a result is pending: the node keeps it in its outbox and retries with
    backoff; Orthanc started again receives it in the study."""
    orthanc, _ = pacs
    path = _hand_file(tmp_path / "outage.dcm", hands[4])
    _, study = orthanc.upload(path)
    sop = _sop(path)
    orthanc.stop()
    try:
        assert storescu(node, [path]).returncode == 0
        wait_until(
            lambda: [e for e in node.events("retry") if e["sop"] == sop], 60, "a retry while Orthanc is down"
        )
    finally:
        orthanc.start()
    _wait_results(orthanc, study, (1, 1))
    sent = wait_until(lambda: [e for e in node.events("sent") if e["sop"] == sop], 10, "the sent log line")
    assert len(sent) == 1 and int(sent[0]["attempts"]) >= 2


def test_sigterm_drains_what_was_received(pacs, node: NodeProcess, hands: list[dict], tmp_path: Path) -> None:
    """SIGTERM right after a C-STORE was acknowledged: the node assesses it, sends the results, exits 0."""
    orthanc, _ = pacs
    path = _hand_file(tmp_path / "drain.dcm", hands[5])
    _, study = orthanc.upload(path)
    assert storescu(node, [path]).returncode == 0
    node.signal(signal.SIGTERM)
    assert node.proc is not None and node.proc.wait(60) == 0
    stopped = node.events("stopped")
    assert stopped and stopped[-1]["drained"] == "True" and stopped[-1]["to_send"] == "0"
    assert orthanc.result_counts(study) == (1, 1)
    patient = pydicom.dcmread(path, stop_before_pixels=True)
    log = node.log()  # everything this node did in this module: no patient name or ID in it
    assert str(patient.PatientName) not in log and "Child" not in log and patient.PatientID not in log


def _ledger(spool: Path, uids: list[str], *states: str) -> set[str]:
    """Those of ``uids`` the node's ledger holds in ``states`` (read through its own ``Spool``): what it will
    not do again after a restart."""
    ledger = Spool(spool)
    try:
        return {uid for uid in uids if ledger.state(uid) in states}
    finally:
        ledger.close()


def test_sigkill_mid_batch_then_restart_finishes_everything_once(
    pacs, hands: list[dict], tmp_path: Path
) -> None:
    """Four radiographs acknowledged, the node SIGKILLed as soon as the first is assessed, started again on
    the same spool: every study gets its SC and SR; what the ledger held as assessed (or sent) at the kill is
    not assessed (or sent) again. The ledger, not the log, is the record: the kill may fall between an
    instance's commit and its log line."""
    orthanc, _ = pacs
    spool = tmp_path / "spool"
    node = NodeProcess(spool, f"ORTHANC@127.0.0.1:{orthanc.dicom_port}", "--workers", "2").start()
    files, studies = [], []
    for i in range(4):
        path = _hand_file(tmp_path / f"batch{i}.dcm", hands[i])
        studies.append(orthanc.upload(path)[1])
        files.append(path)
    everything = sorted(_sop(p) for p in files)
    try:
        assert storescu(node, files).returncode == 0
        wait_until(lambda: node.events("assessed"), 60, "the first assessment")
        node.kill()
        logged = {e["sop"] for e in node.events("assessed")}
        assessed_before = _ledger(spool, everything, "assessed", "sent")
        sent_before = _ledger(spool, everything, "sent")
        assert logged <= assessed_before  # a logged assessment was committed first
        assert len(assessed_before) < 4, "the kill came too late to test anything"
        node.start()
        for study in studies:
            _wait_results(orthanc, study, (1, 1))

        def all_sent() -> bool:  # the node logs "sent" just after Orthanc has the objects
            return (
                sorted(sent_before | {e["sop"] for e in node.events("sent", since_start=True)}) == everything
            )

        wait_until(all_sent, 20, "a sent line for every instance")
        after = node.events(since_start=True)
        listening = [e for e in after if e["event"] == "listening"][0]
        assert int(listening["to_assess"]) == 4 - len(assessed_before)
        assessed_after = [e["sop"] for e in after if e["event"] == "assessed"]
        sent_after = [e["sop"] for e in after if e["event"] == "sent"]
        assert not assessed_before & set(assessed_after) and not sent_before & set(sent_after)
        assert sorted(assessed_before | set(assessed_after)) == everything
        assert len(assessed_after) == len(set(assessed_after)) and len(sent_after) == len(set(sent_after))
        assert _ledger(spool, everything, "sent") == set(everything)
    finally:
        node.stop()


def test_stow_rs_destination(pacs, hands: list[dict], tmp_path: Path) -> None:
    """The second kind of destination: results sent by STOW-RS to Orthanc's DICOMweb plugin land in the
    study like the C-STORE ones."""
    orthanc, _ = pacs
    if not Path(DICOMWEB_PLUGIN).is_file():
        message = f"{DICOMWEB_PLUGIN} not found (apt-get install orthanc-dicomweb)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    node = NodeProcess(tmp_path / "spool", f"{orthanc.url}/dicom-web", "--workers", "1").start()
    try:
        path = _hand_file(tmp_path / "stow.dcm", hands[6])
        _, study = orthanc.upload(path)
        assert storescu(node, [path]).returncode == 0
        _wait_results(orthanc, study, (1, 1))
        sent = wait_until(lambda: node.events("sent"), 10, "the sent line")
        assert sent[0]["destination"] == f"{orthanc.url}/dicom-web" and sent[0]["objects"] == "sc,sr"
    finally:
        assert node.stop() == 0


def test_a_full_spool_refuses_new_associations(hands: list[dict], tmp_path: Path) -> None:
    """One pending instance allowed and a destination that is down: the first C-STORE is accepted, the
    next association is refused (A-ASSOCIATE-RJ) with a clear log line, not accepted and dropped."""
    _require_tools()
    node = NodeProcess(
        tmp_path / "spool", f"NOBODY@127.0.0.1:{free_port()}", "--max-pending", "1", "--retry-max", "1"
    ).start()
    try:
        first = _hand_file(tmp_path / "first.dcm", hands[6], PatientSex="")
        second = _hand_file(tmp_path / "second.dcm", hands[7])
        assert storescu(node, [first]).returncode == 0
        wait_until(lambda: node.events("retry"), 30, "the result waiting for its destination")
        refused = storescu(node, [second])
        assert refused.returncode != 0 and "Local Limit Exceeded" in refused.stderr, refused.stderr
        wait_until(lambda: node.events("association_refused"), 10, "the refusal's log line")
        line = node.events("association_refused")[0]
        assert "spool full" in line["reason"] and line["calling"] == "STORESCU"
        assert not [e for e in node.events("received") if e["sop"] == _sop(second)]
        assert node.proc is not None and node.proc.poll() is None
    finally:
        assert node.stop() == 0
