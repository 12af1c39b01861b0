"""End-to-end speed of ``boneage node`` through a real PACS: upload to Orthanc → result visible in the study.

Starts Orthanc (Debian's ``/usr/sbin/Orthanc``, temporary configuration, loopback ports) and the node as a
subprocess (``python -m boneage node``, ``--workers`` default one per core), then for each study: POST the
radiograph (real RSNA sample image wrapped as a CR DICOM with PatientSex, PatientBirthDate, StudyDate) to
Orthanc's REST API and ask Orthanc to C-STORE it to the node; a poller follows Orthanc's change log and
stamps the moment the study holds the node's Secondary Capture and Structured Report (only the SC for an
image the node refuses). Two phases:

- **burst**: ``--burst`` studies uploaded back to back (a modality or a PACS pushing a backlog): throughput in
  studies per minute (first upload → last result visible), the latency of each study, and the node's peak
  RSS (``VmHWM`` from /proc, plus RSS sampled every 0.1 s).
- **steady**: ``--steady`` studies at ``--rate`` studies per minute (the goal's load): latency p50/p95.

Writes ``benchmarks/results/node_throughput.json`` (``--out``) with the machine, the load average before and
after, the worker count and the command.

    .venv/bin/python benchmarks/node_throughput.py                     # 50-study burst + 20 at 30/min
    .venv/bin/python benchmarks/node_throughput.py --burst 10 --steady 5   # a quick look
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' Orthanc and node helpers (and conftest's DICOM writer)

from dicom_helpers import NodeProcess, Orthanc, free_port, radiograph_dicom  # noqa: E402

DEFAULT_SAMPLE = ROOT.parent / "shared" / "data" / "rsna-bone-age-sample"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: an observed latency, not an interpolation."""
    ordered = sorted(values)
    rank = max(1, int(np.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def make_studies(sample: Path, count: int, folder: Path, offset: int = 0) -> list[Path]:
    """``count`` CR radiographs, each its own study, from the labelled sample images."""
    with open(sample / "labels.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))[offset : offset + count]
    out = []
    for row in rows:
        pixels = np.asarray(Image.open(sample / "images" / f"{row['id']}.png").convert("L"))
        study = dt.date(2025, 3, 1)
        birth = study - dt.timedelta(days=round(float(row["boneage"]) * 30.4375))
        out.append(
            radiograph_dicom(
                folder / f"{row['id']}.dcm",
                pixels,
                PatientSex="M" if row["male"] == "True" else "F",
                PatientBirthDate=birth.strftime("%Y%m%d"),
            )
        )
    return out


class Watcher:
    """Follows Orthanc's change log; records when each watched study holds the node's SC and SR."""

    def __init__(self, orthanc: Orthanc, node: NodeProcess) -> None:
        self.orthanc, self.node = orthanc, node
        self.done: dict[str, float] = {}
        self.results: dict[str, set[str]] = {}
        self.since = int(orthanc.get("/changes?last")["Last"])
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            page = self.orthanc.get(f"/changes?since={self.since}&limit=1000")
            for change in page["Changes"]:
                if change["ChangeType"] == "NewSeries":
                    series = self.orthanc.get(f"/series/{change['ID']}")
                    if series["MainDicomTags"].get("Manufacturer") == "boneage":
                        kind = "sr" if series["MainDicomTags"].get("Modality") == "SR" else "sc"
                        self.results.setdefault(series["ParentStudy"], set()).add(kind)
            self.since = page["Last"]
            refused = None
            now = time.perf_counter()
            for study, kinds in self.results.items():
                if study in self.done or "sc" not in kinds:
                    continue
                if "sr" in kinds:
                    self.done[study] = now
                else:  # a refused image gets only the SC: look it up in the node's log once
                    if refused is None:
                        refused = {e["sop"] for e in self.node.events("refused")}
                    if self.refused_study(study, refused):
                        self.done[study] = now
            time.sleep(0.05)

    def refused_study(self, study: str, refused: set[str]) -> bool:
        instances = self.orthanc.get(f"/studies/{study}/instances")
        return any(i["MainDicomTags"].get("SOPInstanceUID") in refused for i in instances)


def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def run_phase(orthanc: Orthanc, watcher: Watcher, files: list[Path], interval: float) -> dict[str, float]:
    """Upload each file (then ask Orthanc to send it to the node) every ``interval`` s (0: back to back);
    returns {study: upload start}."""
    started: dict[str, float] = {}
    t0 = time.perf_counter()
    for i, path in enumerate(files):
        wait = t0 + i * interval - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        start = time.perf_counter()
        instance, study = orthanc.upload(path)
        started[study] = start
        orthanc.send_to_node([instance])
    return started


def wait_done(watcher: Watcher, studies: dict[str, float], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(s in watcher.done for s in studies):
        time.sleep(0.1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sample", type=Path, default=DEFAULT_SAMPLE)
    parser.add_argument("--burst", type=int, default=50)
    parser.add_argument("--steady", type=int, default=20)
    parser.add_argument("--rate", type=float, default=30.0, help="steady phase: studies per minute")
    parser.add_argument("--workers", type=int, default=0, help="node workers (0: one per core)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "node_throughput.json")
    args = parser.parse_args()

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="boneage-node-bench-") as tmp:
        work = Path(tmp)
        (work / "files").mkdir()
        burst_files = make_studies(args.sample, args.burst, work / "files")
        steady_files = make_studies(args.sample, args.steady, work / "files", offset=args.burst)
        node_port = free_port()
        orthanc = Orthanc(work / "orthanc", node_port).start()
        node = NodeProcess(
            work / "spool",
            f"ORTHANC@127.0.0.1:{orthanc.dicom_port}",
            "--workers",
            str(args.workers),
            port=node_port,
        )
        try:
            node.start()
            assert node.proc is not None
            pid = node.proc.pid
            rss_idle = rss_kib(pid, "VmRSS")
            watcher = Watcher(orthanc, node)
            watcher.thread.start()
            samples: list[int] = []
            sampling = threading.Event()

            def sample() -> None:
                while not sampling.is_set():
                    samples.append(rss_kib(pid, "VmRSS"))
                    time.sleep(0.1)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            burst = run_phase(orthanc, watcher, burst_files, 0.0)
            uploaded = time.perf_counter()
            wait_done(watcher, burst, 600)
            sampling.set()
            sampler.join()
            peak_hwm = rss_kib(pid, "VmHWM")
            burst_lat = [watcher.done[s] - t for s, t in burst.items() if s in watcher.done]
            first = min(burst.values())
            last = max(watcher.done[s] for s in burst if s in watcher.done)
            steady = run_phase(orthanc, watcher, steady_files, 60.0 / args.rate)
            wait_done(watcher, steady, 300)
            steady_lat = [watcher.done[s] - t for s, t in steady.items() if s in watcher.done]
            watcher.stop.set()
            workers = int(node.events("listening")[0]["workers"])
            refused = len(node.events("refused"))
            assess_s = [float(e["seconds"]) for e in node.events("assessed")]
        finally:
            node.stop()
            orthanc.stop()
    load_after = os.getloadavg()

    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    result = {
        "benchmark": "node_throughput",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["python benchmarks/node_throughput.py", *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version()},
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "node_workers": workers,
        "path": "Orthanc REST upload → Orthanc C-STORE to the node → assess (TTA, heatmap) → SC + SR C-STORE "
        "to Orthanc → both visible in the study (Orthanc change log, polled every 50 ms)",
        "burst": {
            "studies": len(burst),
            "completed": len(burst_lat),
            "upload_seconds": round(uploaded - first, 2),
            "seconds": round(last - first, 2),
            "studies_per_minute": round(len(burst_lat) / (last - first) * 60, 1),
            "latency_p50_s": round(percentile(burst_lat, 50), 2),
            "latency_p95_s": round(percentile(burst_lat, 95), 2),
            "latency_max_s": round(max(burst_lat), 2),
            "node_rss_idle_mib": round(rss_idle / 1024, 1),
            "node_rss_peak_sampled_mib": round(max(samples) / 1024, 1) if samples else None,
            "node_rss_high_water_mib": round(peak_hwm / 1024, 1),
        },
        "steady": {
            "studies": len(steady),
            "completed": len(steady_lat),
            "rate_per_minute": args.rate,
            "latency_p50_s": round(percentile(steady_lat, 50), 2) if steady_lat else None,
            "latency_p95_s": round(percentile(steady_lat, 95), 2) if steady_lat else None,
            "latency_max_s": round(max(steady_lat), 2) if steady_lat else None,
        },
        "assessment_seconds_p50": round(percentile(assess_s, 50), 2) if assess_s else None,
        "refused_images": refused,
        "goal": {"studies_per_minute": 30, "latency_p95_s": 5.0},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if len(burst_lat) == len(burst) and len(steady_lat) == len(steady) else 1


if __name__ == "__main__":
    sys.exit(main())
