"""Real components for the DICOM node's tests and benchmark: an Orthanc PACS on loopback ports with a
temporary configuration, the node as a subprocess (``python -m boneage node``), and its log lines parsed."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.uid import generate_uid

ORTHANC = os.environ.get("BONEAGE_TEST_ORTHANC", "/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"  # Debian package orthanc-dicomweb
CR = "1.2.840.10008.5.1.4.1.1.1"
SC = "1.2.840.10008.5.1.4.1.1.7"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``check`` until it returns something truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def radiograph_dicom(path: Path, pixels: np.ndarray, **header: Any) -> Path:
    """A CR radiograph as a modality sends it (its own study and series), written with conftest's writer."""
    from conftest import write_dicom

    fields: dict[str, Any] = {
        "PatientName": "Test^Child",
        "PatientID": "P" + generate_uid()[-8:],
        "StudyInstanceUID": generate_uid(),
        "SeriesInstanceUID": generate_uid(),
        "StudyDate": "20250301",
        "StudyTime": "101500",
        "AccessionNumber": "A" + generate_uid()[-6:],
        "Modality": "CR",
        "BodyPartExamined": "HAND",
    }
    fields.update(header)
    return write_dicom(path, pixels, sop_class=CR, **fields)


class Orthanc:
    """Orthanc 1.x with its storage in ``root`` and the node declared as modality ``boneage``."""

    def __init__(
        self, root: Path, node_port: int, node_aet: str = "BONEAGE", plugins: tuple[str, ...] = ()
    ) -> None:
        self.root = root
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.config = root / "orthanc.json"
        root.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            json.dumps(
                {
                    "Name": "boneage-test",
                    "DicomAet": "ORTHANC",
                    "DicomPort": self.dicom_port,
                    "HttpPort": self.http_port,
                    "StorageDirectory": str(root / "storage"),
                    "IndexDirectory": str(root / "storage"),
                    "RemoteAccessAllowed": False,
                    "AuthenticationEnabled": False,
                    "DicomModalities": {"boneage": [node_aet, "127.0.0.1", node_port]},
                    "DicomScuTimeout": 30,
                    "Plugins": list(plugins),
                    "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
                    "StorageCompression": False,
                }
            )
        )
        self.proc: subprocess.Popen | None = None

    def start(self) -> Orthanc:
        log = open(self.root / "orthanc.log", "ab")  # noqa: SIM115 - kept open by the child
        self.proc = subprocess.Popen([ORTHANC, str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: self._alive(), 30, "Orthanc to answer its REST API")
        return self

    def _alive(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            log = (self.root / "orthanc.log").read_text(errors="replace")[-2000:]
            raise AssertionError(f"Orthanc exited with {self.proc.returncode}: {log}")
        try:
            self.get("/system")
            return True
        except (OSError, urllib.error.URLError):
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def request(self, method: str, path: str, body: bytes | None = None, timeout: float = 60) -> Any:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        with urllib.request.urlopen(req, timeout=timeout) as response:
            data = response.read()
        try:
            return json.loads(data)
        except ValueError:
            return data

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def upload(self, path: Path) -> tuple[str, str]:
        """POST a DICOM file; returns (instance id, study id) in Orthanc's own identifiers."""
        answer = self.request("POST", "/instances", path.read_bytes())
        return answer["ID"], answer["ParentStudy"]

    def send_to_node(self, instance_ids: list[str], synchronous: bool = True) -> Any:
        body = {"Resources": instance_ids, "Synchronous": synchronous, "Asynchronous": not synchronous}
        return self.request("POST", "/modalities/boneage/store", json.dumps(body).encode())

    def study_objects(self, study_id: str) -> list[pydicom.Dataset]:
        """Every instance of a study as a pydicom data set (results are small; radiographs are read too)."""
        out = []
        for item in self.get(f"/studies/{study_id}/instances"):
            data = self.request("GET", f"/instances/{item['ID']}/file")
            out.append(pydicom.dcmread(__import__("io").BytesIO(data)))
        return out

    def results(self, study_id: str) -> dict[str, list[pydicom.Dataset]]:
        """The node's results filed in a study: {"sc": [...], "sr": [...]}."""
        objects = [d for d in self.study_objects(study_id) if str(d.get("Manufacturer", "")) == "boneage"]
        return {
            "sc": [d for d in objects if d.SOPClassUID == SC],
            "sr": [d for d in objects if d.SOPClassUID == COMPREHENSIVE_SR],
        }

    def result_counts(self, study_id: str) -> tuple[int, int]:
        """(SC, SR) of the node in a study, from Orthanc's index (cheap: no download)."""
        sc = sr = 0
        for series in self.get(f"/studies/{study_id}/series"):
            tags = series["MainDicomTags"]
            if tags.get("Manufacturer") != "boneage":
                continue
            n = len(series["Instances"])
            if tags.get("Modality") == "SR":
                sr += n
            else:
                sc += n
        return sc, sr


class NodeProcess:
    """``python -m boneage node`` as radiology IT runs it, with its stderr log kept in a file."""

    def __init__(
        self, spool: Path, destination: str, *extra: str, aet: str = "BONEAGE", port: int | None = None
    ) -> None:
        self.spool = spool
        self.port = port or free_port()
        self.aet = aet
        self.log_path = spool.parent / f"{spool.name}-node.log"
        self.args = [
            sys.executable,
            "-m",
            "boneage",
            "node",
            "--aet",
            aet,
            "--port",
            str(self.port),
            "--host",
            "127.0.0.1",
            "--destination",
            destination,
            "--spool",
            str(spool),
            *extra,
        ]
        self.proc: subprocess.Popen | None = None
        self._offset = 0

    def start(self, timeout: float = 90) -> NodeProcess:
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept open by the child
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)
        wait_until(self._listening, timeout, "the node to listen")
        return self

    def _listening(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"node exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
        return any(e["event"] == "listening" for e in self.events(since_start=True))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self, name: str | None = None, *, since_start: bool = False) -> list[dict[str, str]]:
        """The node's ``key=value`` log lines as dicts (``event`` is the step), oldest first."""
        text = self.log()
        if since_start:
            text = self.log_path.read_bytes()[self._offset :].decode(errors="replace")
        out = []
        for line in text.splitlines():
            if " event=" not in line:
                continue
            fields = {}
            for token in shlex.split(line[line.index(" event=") + 1 :]):
                key, _, value = token.partition("=")
                fields[key] = value
            if name is None or fields.get("event") == name:
                out.append(fields)
        return out

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait(10)

    def stop(self, timeout: float = 60) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"node did not stop within {timeout} s after SIGTERM") from None


def dcmtk_path(tool: str) -> str | None:
    """dcmtk's own ``tool``, never the Python environment's: pynetdicom installs console scripts of the same
    names (``storescu``, ``echoscu``) in its bin folder, which an activated virtualenv puts first on PATH,
    and they take other options (``-xy``) and print other messages."""
    own = {Path(sys.prefix, "bin").resolve(), Path(sys.executable).parent.resolve()}
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and Path(d).resolve() not in own]
    return shutil.which(tool, path=os.pathsep.join(dirs))


def dcmtk(tool: str) -> str:
    path = dcmtk_path(tool)
    if path is None:
        raise AssertionError(f"dcmtk's {tool} not found (apt-get install dcmtk)")
    return path


def storescu(
    node: NodeProcess, files: list[Path], *options: str, aet: str = "STORESCU"
) -> subprocess.CompletedProcess:
    """dcmtk's storescu: a second, independent DICOM client sending straight to the node."""
    return subprocess.run(
        [
            dcmtk("storescu"),
            "-aet",
            aet,
            "-aec",
            node.aet,
            *options,
            "127.0.0.1",
            str(node.port),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def echoscu(node: NodeProcess, aet: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [dcmtk("echoscu"), "-aet", aet, "-aec", node.aet, "127.0.0.1", str(node.port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
