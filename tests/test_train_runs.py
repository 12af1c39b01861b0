"""The run folder record shared by `boneage train` and experiment grids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from boneage.config import load_config
from boneage.train.runs import RunDir


def test_run_dir_records_and_status(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "r").create()
    assert run.status == "new"
    run.write_config(load_config(None, ["name=x"]))
    facts = run.write_facts(seed=3, name="x")
    assert facts["seed"] == 3 and facts["git_commit"] and (run / "run.json").is_file()
    (run / "last.ckpt").write_bytes(b"")
    assert run.status == "running"
    run.write_summary({"status": "interrupted", "epochs_completed": 2})
    assert run.status == "interrupted" and run.summary["epochs_completed"] == 2
    run.write_summary({"status": "finished"})
    assert run.status == "finished"
    with pytest.raises(ValueError):
        run.write_summary({"status": "maybe"})
    assert not list(run.path.glob(".*.tmp"))  # writes are atomic


def test_older_summaries_without_status(tmp_path: Path) -> None:
    run = RunDir(tmp_path).create()
    (run / "summary.json").write_text('{"finished": false}')
    assert run.status == "interrupted"


def test_resumed_runs_keep_every_session(tmp_path: Path) -> None:
    """A run resumed in a later session (maybe at a later commit) keeps the first session's start, commit."""
    run = RunDir(tmp_path).create()
    first = {"name": "x", "seed": 1, "started": "2026-01-01T09:00:00", "git_commit": "abc"}
    (run / "run.json").write_text(json.dumps(first))
    facts = run.write_facts(seed=1, name="x")
    assert facts["sessions"][0] == {"started": "2026-01-01T09:00:00", "git_commit": "abc"}
    assert facts["sessions"][1] == {"started": facts["started"], "git_commit": facts["git_commit"]}
    again = run.write_facts(seed=1, name="x")
    assert len(again["sessions"]) == 3 and run.read_json("run.json")["sessions"] == again["sessions"]
    fresh = RunDir(tmp_path / "new").create().write_facts(seed=2, name="y")
    assert len(fresh["sessions"]) == 1
