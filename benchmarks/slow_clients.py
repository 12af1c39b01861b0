"""Clients that never finish their request head, against the real server (issue #43 item 6).

Starts ``boneage serve`` (the source tree of ``--src``, default settings plus any ``--serve-arg``) in its
own process on a free loopback port, measures /api/v1/health and /api/v1/predict (a real sample radiograph)
for a few seconds, then opens ``--clients`` connections that each send only
``POST /api/v1/predict HTTP/1.1\\r\\nHost: x\\r\\n`` and nothing more, and for ``--window`` seconds watches
when each is closed (and what it was told: 408 header timeout, 503 closed to make room, or nothing) while the
same health and predict probes keep running, each on a new connection as a monitor or a browser would.

Results go to ``--out`` under ``--label``. benchmarks/results/slow_clients.json holds::

    python benchmarks/slow_clients.py --label after
    python benchmarks/slow_clients.py --label after-cap-not-reached --serve-arg=--max-connections=1000
    python benchmarks/slow_clients.py --label before --src /tmp/before/src

where the "before" tree was the current ``src`` with ``data/io.py``, ``web.py`` and ``cli/main.py`` from the
commit before the fix (``git show 0a076d7:<file>``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SAMPLE = ROOT.parent / "shared" / "data" / "rsna-bone-age-sample"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "slow_clients.json"
INCOMPLETE_HEAD = b"POST /api/v1/predict HTTP/1.1\r\nHost: x\r\n"


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile: an observed value, not an interpolation."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))]


def summary(values: list[float]) -> dict[str, Any]:
    rounded = [round(v, 1) for v in values]
    return {
        "count": len(values),
        "p50": percentile(rounded, 50),
        "p95": percentile(rounded, 95),
        "max": max(rounded) if rounded else None,
    }


@dataclass
class Probes:
    """Latencies (ms) and failures of the health and predict probes."""

    health_ms: list[float] = field(default_factory=list)
    predict_ms: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def report(self) -> dict[str, Any]:
        return {
            "health_ms": summary(self.health_ms),
            "predict_ms": summary(self.predict_ms),
            "failures": len(self.failures),
            "first_failures": self.failures[:5],
        }


def probe(url: str, image: tuple[str, bytes, str], stop: threading.Event, probes: Probes) -> None:
    """Health every 0.25 s in one thread, predictions back to back in another, each on a new connection."""

    def fresh_connections() -> httpx.Client:  # one client, but a new connection for every request
        return httpx.Client(base_url=url, limits=httpx.Limits(max_keepalive_connections=0))

    def loop(
        what: str, send: Callable[[httpx.Client], httpx.Response], times: list[float], pause: float
    ) -> None:
        """One probe: ``send`` on a fresh connection until ``stop``; a 200's latency goes to ``times``."""
        client = fresh_connections()
        while not stop.is_set():
            start = time.perf_counter()
            try:
                response = send(client)
                ok = response.status_code == 200
                failure = f"{what} HTTP {response.status_code}: {response.text[:120]}"
            except httpx.HTTPError as exc:
                ok, failure = False, f"{what} {type(exc).__name__}: {exc}"
            with probes.lock:
                if ok:
                    times.append((time.perf_counter() - start) * 1000)
                else:
                    probes.failures.append(failure)
            stop.wait(pause)
        client.close()

    name, data, sex = image

    def health(client: httpx.Client) -> httpx.Response:
        return client.get("/api/v1/health", timeout=10)

    def predict(client: httpx.Client) -> httpx.Response:
        files = {"image": (name, data, "image/png")}
        return client.post("/api/v1/predict", files=files, data={"sex": sex}, timeout=60)

    threads = [
        threading.Thread(target=loop, args=("health", health, probes.health_ms, 0.25), daemon=True),
        threading.Thread(target=loop, args=("predict", predict, probes.predict_ms, 0.0), daemon=True),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(src: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "boneage", "serve", "--port", str(port), *extra]
    env = {**os.environ, "PYTHONPATH": str(src)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/api/v1/health", timeout=2).json()["model_loaded"]:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the server did not start")
        time.sleep(0.2)


def watch(socks: dict[socket.socket, float], until: float) -> dict[socket.socket, tuple[float, bytes]]:
    """Seconds after opening at which the server closed each socket, and what it sent first."""
    selector = selectors.DefaultSelector()
    received: dict[socket.socket, bytes] = {}
    for sock in socks:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        received[sock] = b""
    closed: dict[socket.socket, tuple[float, bytes]] = {}
    while len(closed) < len(socks) and time.monotonic() < until:
        for key, _ in selector.select(timeout=max(0.0, min(0.5, until - time.monotonic()))):
            sock = key.fileobj
            try:
                chunk = sock.recv(65536)  # type: ignore[union-attr]
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            if chunk:
                received[sock] += chunk  # type: ignore[index]
                continue
            closed[sock] = (time.monotonic() - socks[sock], received[sock])  # type: ignore[index]
            selector.unregister(sock)
    selector.close()
    return closed


def outcome(first_bytes: bytes) -> str:
    line = first_bytes.split(b"\r\n", 1)[0].decode("latin-1")
    return line.removeprefix("HTTP/1.1 ") if line else "closed without an answer"


def run(args: argparse.Namespace, image: tuple[str, bytes, str]) -> dict[str, Any]:
    proc, url = start_server(args.src, args.serve_arg or [])
    try:
        name, data, sex = image
        httpx.post(
            f"{url}/api/v1/predict", files={"image": (name, data, "image/png")}, data={"sex": sex}, timeout=60
        ).raise_for_status()  # warm-up
        baseline = Probes()
        stop = threading.Event()
        prober = threading.Thread(target=probe, args=(url, image, stop, baseline))
        prober.start()
        time.sleep(args.baseline)
        stop.set()
        prober.join()

        port = int(url.rsplit(":", 1)[1])
        socks: dict[socket.socket, float] = {}
        start = time.monotonic()
        for _ in range(args.clients):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(INCOMPLETE_HEAD)
            socks[sock] = time.monotonic()
        opened_s = time.monotonic() - start

        during = Probes()
        stop = threading.Event()
        prober = threading.Thread(target=probe, args=(url, image, stop, during))
        prober.start()
        closed = watch(socks, until=start + args.window)
        time.sleep(max(0.0, start + args.window - time.monotonic()))  # probe for the whole window
        stop.set()
        prober.join()
        still_open = len(socks) - len(closed)
        for sock in socks:
            sock.close()
        alive = proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    times = [seconds for seconds, _ in closed.values()]
    outcomes: dict[str, int] = {}
    for _, first in closed.values():
        outcomes[outcome(first)] = outcomes.get(outcome(first), 0) + 1
    return {
        "src": str(args.src),
        "serve_args": args.serve_arg or [],
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()],
        "clients": args.clients,
        "seconds_to_open_them": round(opened_s, 2),
        "window_s": args.window,
        "closed_within_window": len(closed),
        "still_open_at_end": still_open,
        "closed_after_s": {k: v if v is None else round(v, 2) for k, v in _close_stats(times).items()},
        "answers_before_close": outcomes,
        "probes_before": baseline.report(),
        "probes_during": during.report(),
        "server_alive_at_end": alive,
    }


def _close_stats(times: list[float]) -> dict[str, float | None]:
    return {
        "min": min(times) if times else None,
        "p50": percentile(times, 50),
        "p95": percentile(times, 95),
        "max": max(times) if times else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=ROOT / "src", help="source tree to serve (PYTHONPATH)")
    parser.add_argument("--label", default="after", help="name of this run in the results file")
    parser.add_argument("--clients", type=int, default=300, help="connections with an unfinished head")
    parser.add_argument("--window", type=float, default=30.0, help="seconds they must be closed within")
    parser.add_argument("--baseline", type=float, default=5.0, help="seconds of probes before the clients")
    parser.add_argument("--serve-arg", action="append", help="extra `boneage serve` argument (repeatable)")
    parser.add_argument("--sample", type=Path, default=DEFAULT_SAMPLE, help="images/ and labels.csv folder")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON (runs merged by label)")
    args = parser.parse_args(argv)

    with open(args.sample / "labels.csv", newline="") as handle:
        row = next(csv.DictReader(handle))
    path = args.sample / "images" / f"{row['id']}.png"
    image = (
        path.name,
        path.read_bytes(),
        "male" if row["male"].strip().lower() in ("true", "1") else "female",
    )
    result = run(args, image)
    print(
        f"{args.label}: {result['closed_within_window']}/{args.clients} closed within {args.window:g} s "
        f"(after {result['closed_after_s']}), answers {result['answers_before_close']}; "
        f"health during {result['probes_during']['health_ms']}, predict during "
        f"{result['probes_during']['predict_ms']}, {result['probes_during']['failures']} failed probes"
    )
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results["benchmark"] = "benchmarks/slow_clients.py"
    results["machine"] = (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"
    )
    results["image"] = path.name
    results.setdefault("runs", {})[args.label] = result
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0 if result["closed_within_window"] == args.clients else 1


if __name__ == "__main__":
    sys.exit(main())
