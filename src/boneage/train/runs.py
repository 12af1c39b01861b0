"""The run folder: one record shared by ``boneage train`` and experiment grids.

config.yaml    the resolved run config (the run can be repeated from it)
run.json       facts: seed, git commit, versions, device, start time (and each resumed session's)
metrics.csv    one row per epoch (written by the training loop)
summary.json   the outcome, with ``status``: running | finished | interrupted | failed
best.ckpt, last.ckpt, error.txt (a failed grid variant)
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

STATUSES = ("running", "finished", "interrupted", "failed")


def git_commit() -> str:
    """The source tree's commit, so a result can be traced to the code that produced it."""
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                cwd=Path(__file__).parent,
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class RunDir:
    """Reads and writes the files of one run folder; writes are atomic (a reader never sees half a file)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def create(self) -> RunDir:
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    def _write(self, name: str, text: str) -> Path:
        target = self.path / name
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(target)
        return target

    def write_config(self, cfg: Any) -> Path:
        import yaml

        return self._write("config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    def write_facts(self, seed: int, name: str, **extra: Any) -> dict[str, Any]:
        """The top-level facts are this session's; ``sessions`` lists every session's start and commit, so a
        run resumed across sessions (and code changes) still shows where each part came from."""
        facts: dict[str, Any] = {
            "name": name,
            "seed": seed,
            "git_commit": git_commit(),
            "python": platform.python_version(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **extra,
        }
        before = self.read_json("run.json")
        sessions = before.get("sessions")
        if not isinstance(sessions, list):  # a run.json from before sessions were kept: its one session
            first = {k: before.get(k) for k in ("started", "git_commit")}
            sessions = [first] if before.get("started") else []
        facts["sessions"] = [*sessions, {"started": facts["started"], "git_commit": facts["git_commit"]}]
        self._write("run.json", json.dumps(facts, indent=2))
        return facts

    def read_json(self, name: str) -> dict[str, Any]:
        try:
            data = json.loads((self.path / name).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    @property
    def summary(self) -> dict[str, Any]:
        return self.read_json("summary.json")

    def write_summary(self, summary: dict[str, Any]) -> Path:
        if summary.get("status") not in STATUSES:
            raise ValueError(f"summary status must be one of {STATUSES}")
        return self._write("summary.json", json.dumps(summary, indent=2))

    @property
    def status(self) -> str:
        """finished | interrupted | failed | running (a summary says so) | new (nothing recorded yet)."""
        summary = self.summary
        if summary.get("status") in STATUSES:
            return str(summary["status"])
        if summary:  # written before summaries had a status
            return "finished" if summary.get("finished") else "interrupted"
        if (self.path / "error.txt").is_file():
            return "failed"
        return "running" if (self.path / "last.ckpt").is_file() else "new"
