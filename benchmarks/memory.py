"""Peak memory of a near-40-megapixel radiograph (issue #43 item 7): the CLI and the web server.

Makes its test images in a temporary folder (never in the repository) by upscaling real sample radiographs
to just under the 40 Mpx limit, as PNG and JPEG, then measures, with the source tree of ``--src``:

* ``cli``: peak RSS of one ``boneage predict --json`` process (``os.wait4``'s ``ru_maxrss``) on the 40 Mpx
  PNG, the 40 Mpx JPEG and the original sample radiograph;
* ``server``: ``boneage serve`` (default settings) in its own process; its RSS after start-up and one normal
  prediction, then its peak RSS (``VmHWM`` in ``/proc/<pid>/status``, reset after the warm-up through
  ``clear_refs``) while four clients upload the 40 Mpx PNG at once; ``server_normal_uploads``: the same
  with the original radiograph, i.e. what four concurrent requests cost anyway;
* ``predictions``: the bone age of ``--samples`` sample radiographs and of ``--upscaled`` upscaled ones, so
  two runs (e.g. before/after a change) can be compared image by image.

Results go to ``--out`` under ``--label``; a file holding both a ``before`` and an ``after`` run also gets
their comparison. The "before" tree used for benchmarks/results/memory.json was the current ``src`` with
``data/io.py``, ``web.py`` and ``cli/main.py`` from the commit before the fix (``git show 0a076d7:<file>``)::

    python benchmarks/memory.py --label after
    python benchmarks/memory.py --label before --src /tmp/before/src
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SAMPLE = ROOT.parent / "shared" / "data" / "rsna-bone-age-sample"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "memory.json"
LIMIT_PIXELS = 39_900_000  # just under the reader's 40 Mpx limit
# one of the largest sample radiographs (1230 x 1485): the smallest upscaling factor. It was 11880 (same size)
# until the blocks[1] texture density began to refuse it; results/memory.json was re-measured on 9224
BIG_ID = "9224"

PREDICT_SNIPPET = """
import json, sys
from boneage.predict import load_predictor
predictor = load_predictor()
out = {}
for path, sex in json.loads(sys.argv[1]):
    out[path] = predictor.predict(path, sex).bone_age_months
print(json.dumps(out))
"""


def labelled(sample: Path) -> dict[str, str]:
    """Image id -> sex of the sample's labels."""
    with open(sample / "labels.csv", newline="") as handle:
        return {
            row["id"]: "male" if row["male"].strip().lower() in ("true", "1") else "female"
            for row in csv.DictReader(handle)
        }


def upscale(source: Path, folder: Path, fmt: str) -> Path:
    """``source`` upscaled (bicubic) to just under 40 Mpx, written to ``folder`` as PNG or JPEG."""
    with Image.open(source) as im:
        factor = math.sqrt(LIMIT_PIXELS / (im.width * im.height))
        big = im.resize((int(im.width * factor), int(im.height * factor)), Image.Resampling.BICUBIC)
    path = folder / f"{source.stem}-40mpx.{fmt.lower().replace('jpeg', 'jpg')}"
    big.save(path, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return path


def env_for(src: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(src)}


def cli_peak(src: Path, image: Path, sex: str) -> dict[str, Any]:
    """Peak RSS (MB, the child's own ``ru_maxrss`` from ``os.wait4``) and bone age of one
    ``boneage predict --json`` process."""
    cmd = [sys.executable, "-m", "boneage", "predict", str(image), "--sex", sex, "--json"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env_for(src), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    streams: dict[str, bytes] = {}
    readers = [
        threading.Thread(target=lambda n=name, f=pipe: streams.__setitem__(n, f.read()))
        for name, pipe in (("out", proc.stdout), ("err", proc.stderr))
    ]
    for reader in readers:
        reader.start()
    _, status, usage = os.wait4(proc.pid, 0)  # reaped here, not by Popen: its rusage is this child's alone
    proc.returncode = os.waitstatus_to_exitcode(status)
    for reader in readers:
        reader.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed: {streams['err'].decode()[-500:]}")
    result = json.loads(streams["out"].decode().strip().splitlines()[-1])
    return {
        "image": image.name,
        "pixels": _pixels(image),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "seconds": round(time.perf_counter() - start, 2),
        "bone_age_months": round(result["bone_age_months"], 3),
    }


def _pixels(image: Path) -> str:
    with Image.open(image) as im:
        return f"{im.width}x{im.height} ({im.width * im.height / 1e6:.1f} Mpx)"


def _status_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_peak(src: Path, big: Path, normal: Path, sex: str, uploads: int) -> dict[str, Any]:
    """RSS of ``boneage serve`` after a warm-up, and its peak while ``uploads`` clients send ``big``."""
    port = _free_port()
    cmd = [sys.executable, "-m", "boneage", "serve", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env_for(src), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/api/v1/health", timeout=2).json()["model_loaded"]:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.2)

        def post(path: Path) -> httpx.Response:
            files = {"image": (path.name, path.read_bytes(), "application/octet-stream")}
            return httpx.post(f"{url}/api/v1/predict", files=files, data={"sex": sex}, timeout=300)

        post(normal).raise_for_status()  # warm-up: the first inference allocates the runtime's arenas
        time.sleep(0.5)
        idle = _status_mb(proc.pid, "VmRSS")
        reset = True
        try:
            Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        except OSError:
            reset = False
        statuses: list[int] = []
        start = time.perf_counter()
        threads = [
            threading.Thread(target=lambda: statuses.append(post(big).status_code)) for _ in range(uploads)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - start
        peak = _status_mb(proc.pid, "VmHWM")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {
        "image": big.name,
        "uploads_at_once": uploads,
        "statuses": sorted(statuses),
        "rss_after_warmup_mb": idle,
        "peak_rss_mb": peak,
        "peak_is_for_the_uploads_only": reset,
        "seconds": round(elapsed, 2),
    }


def predictions(src: Path, images: list[tuple[Path, str]]) -> dict[str, float]:
    """Bone age (TTA, as the CLI) of each image, by the tree ``src``, in one process."""
    arg = json.dumps([[str(p), s] for p, s in images])
    out = subprocess.run(
        [sys.executable, "-c", PREDICT_SNIPPET, arg], env=env_for(src), capture_output=True, text=True
    )
    if out.returncode:
        raise SystemExit(f"predictions failed: {out.stderr[-500:]}")
    return {Path(k).name: round(v, 4) for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def compare(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Memory change and per-image bone-age differences between two runs."""
    b, a = before["predictions"], after["predictions"]
    native = [abs(a[k] - b[k]) for k in a if k in b and "40mpx" not in k]
    upscaled = {k: round(a[k] - b[k], 3) for k in a if k in b and "40mpx" in k}
    return {
        "cli_peak_rss_mb (before, after)": {
            row["image"]: [row["peak_rss_mb"], after_row["peak_rss_mb"]]
            for row, after_row in zip(before["cli"], after["cli"], strict=True)
        },
        "server_peak_rss_mb (before, after)": [
            before["server"]["peak_rss_mb"],
            after["server"]["peak_rss_mb"],
        ],
        "sample_radiographs_compared": len(native),
        "sample_max_abs_difference_months": round(max(native), 4) if native else None,
        "upscaled_difference_months (after - before)": upscaled,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=ROOT / "src", help="source tree to measure (PYTHONPATH)")
    parser.add_argument("--label", default="after", help="name of this run in the results file")
    parser.add_argument("--sample", type=Path, default=DEFAULT_SAMPLE, help="images/ and labels.csv folder")
    parser.add_argument("--samples", type=int, default=40, help="sample radiographs whose bone age to record")
    parser.add_argument(
        "--upscaled", type=int, default=6, help="radiographs to upscale to 40 Mpx and predict"
    )
    parser.add_argument("--uploads", type=int, default=4, help="simultaneous 40 Mpx uploads to the server")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON (runs merged by label)")
    args = parser.parse_args(argv)

    sexes = labelled(args.sample)
    images = args.sample / "images"
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="boneage-memory-") as tmp:
        folder = Path(tmp)
        normal = images / f"{BIG_ID}.png"
        big_png, big_jpg = upscale(normal, folder, "PNG"), upscale(normal, folder, "JPEG")
        sex = sexes[BIG_ID]
        cli = [cli_peak(args.src, path, sex) for path in (big_png, big_jpg, normal)]
        for row in cli:
            print(f"cli     {row['image']:<22} {row['pixels']:<24} peak {row['peak_rss_mb']:7.1f} MB")
        server = server_peak(args.src, big_png, normal, sex, args.uploads)
        reference = server_peak(args.src, normal, normal, sex, args.uploads)  # the same, normal radiographs
        for row in (server, reference):
            print(
                f"server  {args.uploads} x {row['image']}: {row['rss_after_warmup_mb']:.0f} MB after warm-up,"
                f" peak {row['peak_rss_mb']:.0f} MB, statuses {row['statuses']}"
            )
        ids = [i for i in sexes if (images / f"{i}.png").is_file()]
        picked = [(images / f"{i}.png", sexes[i]) for i in ids[: args.samples]]
        upscaled = [(upscale(images / f"{i}.png", folder, "PNG"), sexes[i]) for i in ids[: args.upscaled]]
        bone_ages = predictions(args.src, picked + upscaled + [(big_png, sex), (big_jpg, sex)])

    run = {
        "src": str(args.src),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_average_1_5_15min": [round(x, 2) for x in (*load_before[:2], os.getloadavg()[2])],
        "cli": cli,
        "server": server,
        "server_normal_uploads": reference,
        "predictions": bone_ages,
    }
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results["benchmark"] = "benchmarks/memory.py"
    results["machine"] = (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"
    )
    results.setdefault("runs", {})[args.label] = run
    if {"before", "after"} <= results["runs"].keys():
        results["comparison"] = compare(results["runs"]["before"], results["runs"]["after"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
