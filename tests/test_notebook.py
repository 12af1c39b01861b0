"""notebooks/demo.ipynb executes top to bottom (quick mode: 32 px, 40 images, one epoch, a tiny network)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "demo.ipynb"


def test_demo_notebook_executes(shared_sample: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")

    # a kernel spec for this very interpreter, so the kernel sees this environment's packages
    kernels = tmp_path / "jupyter" / "kernels" / "boneage-test"
    kernels.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "boneage test",
        "language": "python",
    }
    (kernels / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("BONEAGE_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("BONEAGE_NOTEBOOK_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("MPLBACKEND", "Agg")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=300,
        kernel_name="boneage-test",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    started = time.time()
    client.execute()
    elapsed = time.time() - started

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert (
        len(images) >= 6
    )  # radiographs, age histogram, learning curve, 2 evaluation plots, report, prediction
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "best validation MAE" in text and "predicted" in text
    runs = tmp_path / "runs"
    assert (runs / "quick" / "best.ckpt").is_file()
    report = (runs / "notebook-layers" / "report.csv").read_text().splitlines()
    assert len(report) == 3 and report[1].startswith("notebook-layers,all-layers")
    assert elapsed < 240, f"notebook took {elapsed:.0f} s in quick mode"
