"""Load test for the web API: N concurrent clients post real radiographs to /api/v1/predict (heatmaps on:
every response carries one).

Starts the app with uvicorn on 127.0.0.1 (free port, background thread, the model of ``--checkpoint`` or the
bundled one), sends a bounded number of requests within a hard time limit, and prints throughput, p50/p95
latency and the error count. ``--engine`` runs one or more engines one after the other in the same process,
side by side (both run the same hook-free graph, no model lock). Exit status 1 if any request failed, 2 if the
server could not serve a model.

    python benchmarks/load_test.py --engine onnx --engine torch     # 16 clients, bundled model
    python benchmarks/load_test.py --checkpoint tiny.safetensors --requests 160 --clients 16
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import platform
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from boneage.web import background_server, create_app

DEFAULT_SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "rsna-bone-age-sample"


@dataclass
class Tally:
    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    refused: int = 0  # 422 "does not look like a PA left-hand radiograph": the OOD check answering
    unfinished: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def load_images(sample: Path, limit: int) -> list[tuple[str, bytes, str]]:
    """(name, bytes, sex) of the first ``limit`` labelled radiographs, read once: the disk is not measured."""
    with open(sample / "labels.csv", newline="") as handle:
        rows = list(itertools.islice(csv.DictReader(handle), limit))
    if not rows:
        raise SystemExit(f"no labelled radiographs in {sample}")
    out = []
    for row in rows:
        path = sample / "images" / f"{row['id']}.png"
        sex = "male" if row["male"].strip().lower() in ("true", "1") else "female"
        out.append((path.name, path.read_bytes(), sex))
    return out


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: an observed latency, not an interpolation."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))]


def client_loop(
    url: str,
    images: list[tuple[str, bytes, str]],
    tickets: itertools.count,
    total: int,
    deadline: float,
    tally: Tally,
) -> None:
    with httpx.Client(base_url=url) as client:
        while True:
            ticket = next(tickets)
            remaining = deadline - time.monotonic()
            if ticket >= total or remaining <= 0:
                return
            name, data, sex = images[ticket % len(images)]
            start = time.perf_counter()
            try:
                response = client.post(
                    "/api/v1/predict",
                    files={"image": (name, data, "image/png")},
                    data={"sex": sex, "age": "10y"},
                    timeout=remaining,
                )
            except httpx.TimeoutException:
                with tally.lock:
                    tally.unfinished += 1  # cut off by the overall time limit, not refused by the server
                continue
            except httpx.HTTPError as exc:
                with tally.lock:
                    tally.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            elapsed = (time.perf_counter() - start) * 1000
            body = response.json() if response.status_code == 200 else {}
            ok = isinstance(body.get("bone_age_months"), float) and bool(body.get("heatmap_png_base64"))
            with tally.lock:
                if ok:
                    tally.latencies_ms.append(elapsed)
                elif response.status_code == 422 and "does not look like" in response.text:
                    tally.refused += 1
                else:
                    tally.errors.append(f"HTTP {response.status_code}: {response.text[:200]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help=".safetensors bundle or .ckpt (default: the bundled model)")
    parser.add_argument("--sample", type=Path, default=DEFAULT_SAMPLE, help="images/ and labels.csv folder")
    parser.add_argument("--requests", type=int, default=160, help="total requests (default 160)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--time-limit", type=float, default=120.0, help="hard stop in seconds (default 120)")
    parser.add_argument("--workers", type=int, default=2, help="server inference worker threads (default 2)")
    parser.add_argument("--images", type=int, default=32, help="distinct radiographs to cycle through")
    parser.add_argument(
        "--engine",
        action="append",
        choices=["torch", "onnx"],
        help="engine(s) to measure, in order (repeatable; default: onnx)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the summaries here (JSON)")
    args = parser.parse_args(argv)

    images = load_images(args.sample, args.images)
    summaries = []
    status = 0
    for engine in args.engine or ["onnx"]:
        code, summary = run_engine(args, images, engine)
        status = max(status, code)
        if summary:
            summaries.append(summary)
    if args.out is not None:
        from boneage.files import atomic_write

        record = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "load_average_1min": round(os.getloadavg()[0], 2),
            "clients": args.clients,
            "requests": args.requests,
            "workers": args.workers,
            "engines": summaries,
        }
        atomic_write(args.out, json.dumps(record, indent=2) + "\n")
    if len(summaries) > 1:
        base = summaries[0]
        print("side by side (same machine, same run)")
        for s in summaries:
            ratio = s["throughput"] / base["throughput"] if base["throughput"] else float("nan")
            print(
                f"  {s['engine']:<6} {s['throughput']:.2f} requests/s (x{ratio:.2f} the first), "
                f"p95 {s['p95_ms']:.0f} ms, {s['errors']} errors, {s['refused']} refused (OOD)"
            )
    return status


def run_engine(
    args: argparse.Namespace, images: list[tuple[str, bytes, str]], engine: str
) -> tuple[int, dict | None]:
    """One server on ``engine`` under the load; (exit status, summary numbers)."""
    app = create_app(args.checkpoint, workers=args.workers, engine=engine)
    with background_server(app) as url:
        health = httpx.get(f"{url}/api/v1/health").json()
        if not health["model_loaded"]:
            print(f"server has no model: {health['model_error']}", file=sys.stderr)
            return 2, None
        model = httpx.get(f"{url}/api/v1/model").json()
        name, data, sex = images[0]
        warm = time.perf_counter()
        httpx.post(
            f"{url}/api/v1/predict",
            files={"image": (name, data, "image/png")},
            data={"sex": sex},
            timeout=args.time_limit,
        ).raise_for_status()
        warm_ms = (time.perf_counter() - warm) * 1000

        tally = Tally()
        tickets = itertools.count()
        start = time.monotonic()
        deadline = start + args.time_limit
        threads = [
            threading.Thread(
                target=client_loop, daemon=True, args=(url, images, tickets, args.requests, deadline, tally)
            )
            for _ in range(args.clients)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=max(0.0, deadline + 5 - time.monotonic()))
        wall = time.monotonic() - start

    done = len(tally.latencies_ms)
    attempted = done + len(tally.errors) + tally.unfinished + tally.refused
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"
    print(f"boneage web API load test: {engine} engine")
    print(f"  machine      {machine}")
    print(
        f"  model        {model.get('backbone')} ({model.get('input_size')} px), "
        f"model version {model.get('model_version')}"
    )
    print(
        f"  load         {args.clients} clients, {args.requests} requests max, "
        f"{args.time_limit:g} s limit, {args.workers} server workers, {len(images)} distinct radiographs"
    )
    print(f"  warm-up      1 request in {warm_ms:.0f} ms (not counted)")
    print(
        f"  completed    {done} ok, {tally.refused} refused by the OOD check (422), {len(tally.errors)} "
        f"errors, {tally.unfinished} cut off at the time limit, {args.requests - attempted} not started, "
        f"in {wall:.1f} s (throughput and latency count the ok requests)"
    )
    if done:
        print(f"  throughput   {done / wall:.2f} requests/s")
        print(
            f"  latency      p50 {percentile(tally.latencies_ms, 50):.0f} ms, "
            f"p95 {percentile(tally.latencies_ms, 95):.0f} ms, max {max(tally.latencies_ms):.0f} ms"
        )
    for error in tally.errors[:5]:
        print(f"  error        {error}")
    summary = {
        "engine": engine,
        "throughput": done / wall if done else 0.0,
        "p95_ms": percentile(tally.latencies_ms, 95) if done else float("nan"),
        "errors": len(tally.errors),
        "refused": tally.refused,
    }
    return (1 if tally.errors or not done else 0), summary


if __name__ == "__main__":
    sys.exit(main())
