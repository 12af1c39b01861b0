"""The ``boneage`` command through typer's CliRunner: predict (single, batch with resume, report), evaluate,
train, and user errors as one line with exit code 2."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from boneage.cli import app

REPO = Path(__file__).resolve().parents[1]
IDS = ["1377", "1402", "10009"]


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(scope="module")
def real_images(shared_sample: Path) -> list[Path]:
    paths = [shared_sample / "images" / f"{i}.png" for i in IDS]
    assert all(p.is_file() for p in paths)
    return paths


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_help(runner: CliRunner) -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("train", "evaluate", "predict", "export", "bundle"):
        assert command in result.stdout
    result = runner.invoke(app, ["predict", "--help"])
    assert result.exit_code == 0 and "--sex" in result.stdout and "--checkpoint" in result.stdout


@pytest.mark.integration
def test_predict_json_one_object_per_line(
    runner: CliRunner, tiny_bundle: Path, real_images: list[Path]
) -> None:
    args = [
        "predict",
        *map(str, real_images[:2]),
        "--sex",
        "female",
        "--checkpoint",
        str(tiny_bundle),
        "--json",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = _lines(result.stdout)
    assert len(lines) == 2
    for line, path in zip(lines, real_images[:2], strict=True):
        data = json.loads(line)
        assert data["file"] == str(path)
        assert isinstance(data["bone_age_months"], float)
        assert data["sex"] == "female"
        assert data["uncertainty_months"] >= 0
        assert len(data["tta_views_months"]) == 6


@pytest.mark.integration
def test_predict_plain_text_with_age(runner: CliRunner, tiny_bundle: Path, real_images: list[Path]) -> None:
    args = ["predict", str(real_images[0]), "--sex", "m", "--age", "10y", "--checkpoint", str(tiny_bundle)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "bone age" in result.stdout and "SD score" in result.stdout and "male" in result.stdout


def test_bad_file_is_one_line_exit_2(runner: CliRunner, tiny_bundle: Path, tmp_path: Path) -> None:
    bad = tmp_path / "notes.png"
    bad.write_text("this is a text file, not a radiograph\n")
    result = runner.invoke(app, ["predict", str(bad), "--sex", "female", "--checkpoint", str(tiny_bundle)])
    assert result.exit_code == 2
    errors = _lines(result.stderr)
    assert len(errors) == 1
    assert str(bad) in errors[0] and errors[0].startswith("error:")
    assert "Traceback" not in result.output


@pytest.mark.integration
def test_missing_sex_exit_2(runner: CliRunner, tiny_bundle: Path, real_images: list[Path]) -> None:
    result = runner.invoke(app, ["predict", str(real_images[0]), "--checkpoint", str(tiny_bundle)])
    assert result.exit_code == 2
    assert "sex is required" in result.stderr
    assert len(_lines(result.stderr)) == 1


def test_missing_checkpoint_exit_2(runner: CliRunner, tmp_path: Path) -> None:
    image = tmp_path / "x.png"
    Image.new("L", (64, 64), 128).save(image)
    result = runner.invoke(
        app, ["predict", str(image), "--sex", "f", "--checkpoint", str(tmp_path / "no.ckpt")]
    )
    assert result.exit_code == 2
    assert "model file not found" in result.stderr and "no.ckpt" in result.stderr


@pytest.mark.integration
def test_batch_csv_with_a_bad_file_and_resume(
    runner: CliRunner, tiny_bundle: Path, real_images: list[Path], tmp_path: Path
) -> None:
    folder = tmp_path / "batch"
    folder.mkdir()
    for path in real_images:
        shutil.copy(path, folder / path.name)
    (folder / "broken.png").write_text("not an image")
    (folder / "readme.txt").write_text("ignored: not an image suffix")
    sexes = tmp_path / "sexes.csv"
    sexes.write_text("id,boneage,male\n1377,,False\n1402,,True\n10009,,True\n")
    out = tmp_path / "results.csv"
    args = [
        "predict",
        str(folder),
        "--out",
        str(out),
        "--sex-from",
        str(sexes),
        "--checkpoint",
        str(tiny_bundle),
    ]

    first = runner.invoke(app, args)
    assert first.exit_code == 2  # one file failed
    rows = _rows(out)
    assert len(rows) == 4
    by_name = {Path(r["file"]).name: r for r in rows}
    assert set(by_name) == {"1377.png", "1402.png", "10009.png", "broken.png"}
    assert by_name["broken.png"]["error"] and "broken.png" in by_name["broken.png"]["error"]
    assert by_name["broken.png"]["bone_age_months"] == ""
    for name, sex in (("1377.png", "female"), ("1402.png", "male"), ("10009.png", "male")):
        assert by_name[name]["error"] == ""
        assert by_name[name]["sex"] == sex
        assert float(by_name[name]["bone_age_months"]) == pytest.approx(
            12 * float(by_name[name]["bone_age_years"]), abs=0.07
        )
    assert "3 predicted, 1 failed" in first.stderr

    second = runner.invoke(app, args)
    assert second.exit_code == 2  # the bad file is tried again and fails again
    rows = _rows(out)
    done = [r for r in rows if not r["error"]]
    assert len(done) == 3  # the successful rows are not written twice
    assert len({r["file"] for r in done}) == 3
    assert [Path(r["file"]).name for r in rows if r["error"]] == ["broken.png"]  # replaced, not appended
    assert "0 predicted, 1 failed, 3 already in" in second.stderr


@pytest.mark.integration
def test_report_writes_html(
    runner: CliRunner, tiny_bundle: Path, real_images: list[Path], tmp_path: Path
) -> None:
    reports = tmp_path / "reports"
    args = [
        "predict",
        str(real_images[0]),
        "--sex",
        "female",
        "--age",
        "12y",
        "--checkpoint",
        str(tiny_bundle),
    ]
    result = runner.invoke(app, [*args, "--report", str(reports)])
    assert result.exit_code == 0, result.output
    html = list(reports.glob("*.html"))
    assert len(html) == 1
    text = html[0].read_text()
    assert "<html" in text.lower() and "data:image/png;base64," in text
    assert "1377" in html[0].name


@pytest.fixture(scope="module")
def ten_labels(shared_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    lines = (shared_sample / "labels.csv").read_text().splitlines()
    path = tmp_path_factory.mktemp("labels") / "ten.csv"
    path.write_text("\n".join(lines[:11]) + "\n")
    return path


@pytest.mark.integration
def test_evaluate_json_plots_and_csv(
    runner: CliRunner, tiny_bundle: Path, shared_sample: Path, ten_labels: Path, tmp_path: Path
) -> None:
    plots, preds = tmp_path / "plots", tmp_path / "preds.csv"
    args = [
        "evaluate",
        "--checkpoint",
        str(tiny_bundle),
        "--images",
        str(shared_sample / "images"),
        "--labels",
        str(ten_labels),
        "--json",
        "--plots",
        str(plots),
        "--out",
        str(preds),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = _lines(result.stdout)
    assert len(lines) == 1  # exactly one JSON object, nothing else on stdout
    m = json.loads(lines[0])
    assert m["n"] == 10
    assert m["mae_months"] > 0 and m["rmse_months"] >= m["mae_months"]
    assert sum(s["n"] for s in m["mae_by_sex"].values()) == 10
    assert sorted(p.name for p in plots.glob("*.png")) == ["bland_altman.png", "pred_vs_ref.png"]
    for png in plots.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(_rows(preds)) == 10


def test_evaluate_bad_labels_exit_2(runner: CliRunner, tiny_bundle: Path, tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text("name,age\nx,1\n")
    args = ["evaluate", "--checkpoint", str(tiny_bundle), "--images", str(tmp_path), "--labels", str(labels)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert str(labels) in result.stderr


def test_export_unknown_format_exit_2(runner: CliRunner, tiny_bundle: Path, tmp_path: Path) -> None:
    args = [
        "export",
        "--out",
        str(tmp_path / "m.tflite"),
        "--format",
        "tflite",
        "--checkpoint",
        str(tiny_bundle),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "unknown export format 'tflite'" in result.stderr


def test_train_unknown_key_exit_2(runner: CliRunner, tmp_path: Path) -> None:
    args = [
        "train",
        str(REPO / "configs" / "quick.yaml"),
        "--set",
        "train.epochz=1",
        "--run-dir",
        str(tmp_path),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "unknown config key 'train.epochz'" in result.stderr


@pytest.mark.integration
def test_train_quick_yaml_tiny(
    runner: CliRunner, shared_sample: Path, tiny_cache_dir: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / ("run-with-a-long-folder-name-" + "x" * 60)  # longer than a terminal line
    sets = [
        f"data.images={shared_sample / 'images'}",
        f"data.labels={shared_sample / 'labels.csv'}",
        f"data.cache_dir={tiny_cache_dir}",
        "data.limit=40",
        "data.num_workers=1",
        "preprocess.size=32",
        "train.epochs=1",
        "train.batch_size=16",
        "model.backbone=test_efficientnet",
        "model.pretrained=none",
        "model.head=[16]",
        "model.sex_units=8",
        "trainer.progress_bar=false",
    ]
    args = ["train", str(REPO / "configs" / "quick.yaml"), "--run-dir", str(run_dir), "--no-progress"]
    for item in sets:
        args += ["--set", item]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # the summary is printed as valid JSON
    assert summary["epochs_completed"] == 1
    assert summary["train_images"] + summary["val_images"] == 40
    for name in ("config.yaml", "metrics.csv", "best.ckpt", "last.ckpt", "summary.json"):
        assert (run_dir / name).is_file(), name
    saved = (run_dir / "config.yaml").read_text()
    assert "test_efficientnet" in saved and "effnet-lite0" in saved  # preset first, then the override


# ---- hardening: outputs checked first, arguments checked first, exact resume, distinct reports ----------
def _predict_args(*extra: str, checkpoint: Path) -> list[str]:
    return ["predict", *extra, "--checkpoint", str(checkpoint)]


def _one_error_line(result, needle: str) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    errors = _lines(result.stderr)
    assert len(errors) == 1, errors
    assert errors[0].startswith("error:") and needle in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize(
    ("option", "where", "needle"),
    [
        ("--out", "folder", "is a folder"),
        ("--out", "/proc/boneage-results.csv", "cannot write in /proc"),
        ("--out", "file/x.csv", "cannot create the folder"),
        ("--report", "/proc/rep", "cannot create the folder /proc/rep"),
        ("--report", "file", "is a file"),
        ("--report", "file/reports", "cannot create the folder"),
    ],
    ids=[
        "out-is-folder",
        "out-in-proc",
        "out-parent-is-file",
        "report-in-proc",
        "report-is-file",
        "report-parent-is-file",
    ],
)
def test_unwritable_output_fails_before_the_model_loads(
    runner: CliRunner, tmp_path: Path, option: str, where: str, needle: str
) -> None:
    image = tmp_path / "hand.png"
    Image.new("L", (64, 64), 128).save(image)
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("a file, not a folder")
    target = where if where.startswith("/") else str(tmp_path / where)
    missing_model = tmp_path / "no-such-model.ckpt"  # loading it would fail: the output check must come first
    result = runner.invoke(
        app, _predict_args(str(image), "--sex", "female", option, target, checkpoint=missing_model)
    )
    line = _one_error_line(result, needle)
    assert line.startswith(f"error: {target}: ")
    assert "checkpoint" not in line


def test_unwritable_report_does_not_leave_a_header_only_csv(runner: CliRunner, tmp_path: Path) -> None:
    folder = tmp_path / "scans"
    folder.mkdir()
    Image.new("L", (64, 64), 128).save(folder / "hand.png")
    out = tmp_path / "res" / "x.csv"
    args = _predict_args(
        str(folder),
        "--out",
        str(out),
        "--sex",
        "female",
        "--report",
        "/proc/rep",
        checkpoint=tmp_path / "no.ckpt",
    )
    _one_error_line(runner.invoke(app, args), "/proc/rep")
    assert not out.exists() and not out.parent.exists()  # nothing left behind, not even the folder


@pytest.mark.parametrize(
    ("option", "value", "needle"),
    [
        ("--age", "seven", "error: --age: cannot read age 'seven'"),
        ("--age", "400m", "error: --age: age out of range"),
        ("--sex", "1", "error: --sex: sex must be female or male"),
        ("--sex", "true", "got 'true'"),
    ],
)
def test_bad_age_or_sex_fails_at_once_with_one_line(
    runner: CliRunner, tiny_bundle: Path, tmp_path: Path, option: str, value: str, needle: str
) -> None:
    """Checked before the model loads and before any image is decoded: one line, not one per image."""
    for i in range(3):
        Image.new("L", (64, 64), 128).save(tmp_path / f"hand{i}.png")
    extra = ["--sex", "female"] if option == "--age" else []
    result = runner.invoke(app, _predict_args(str(tmp_path), *extra, option, value, checkpoint=tiny_bundle))
    _one_error_line(result, needle)
    missing = runner.invoke(
        app, _predict_args(str(tmp_path), *extra, option, value, checkpoint=tmp_path / "no.ckpt")
    )
    _one_error_line(missing, needle)  # the model is never loaded


@pytest.mark.integration
def test_report_that_cannot_be_written_does_not_stop_the_batch(
    runner: CliRunner, tiny_bundle: Path, real_images: list[Path], tmp_path: Path
) -> None:
    reports, out = tmp_path / "reports", tmp_path / "results.csv"
    (reports / "1377.png.html").mkdir(parents=True)  # this report's file name is taken by a folder
    options = ["--sex", "female", "--report", str(reports), "--out", str(out), "--no-heatmap"]
    args = _predict_args(*map(str, real_images), *options, checkpoint=tiny_bundle)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    written = sorted(p.name for p in reports.glob("*.html") if p.is_file())
    assert written == ["10009.png.html", "1402.png.html"]
    by_name = {Path(r["file"]).name: r for r in _rows(out)}
    assert len(by_name) == 3
    assert "report not written" in by_name["1377.png"]["error"]
    assert by_name["1377.png"]["bone_age_months"]  # the prediction itself is kept
    assert by_name["1402.png"]["error"] == "" and by_name["10009.png"]["error"] == ""
    assert "2 predicted, 1 failed" in result.stderr
    (reports / "1377.png.html").rmdir()  # fixed: the re-run writes the missing report and clears the error
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert (reports / "1377.png.html").is_file()
    rows = _rows(out)
    assert len(rows) == 3 and all(r["error"] == "" for r in rows)


@pytest.mark.integration
def test_reports_never_overwrite_each_other(
    runner: CliRunner, tiny_bundle: Path, real_images: list[Path], tmp_path: Path
) -> None:
    folder = tmp_path / "batch"
    folder.mkdir()
    shutil.copy(real_images[0], folder / "case1.png")
    Image.open(real_images[1]).convert("L").save(folder / "case1.jpg", quality=95)
    shutil.copy(real_images[2], folder / "case 2.png")
    shutil.copy(real_images[0], folder / "case_2.png")
    reports = tmp_path / "reports"
    args = _predict_args(
        str(folder), "--sex", "male", "--report", str(reports), "--no-heatmap", checkpoint=tiny_bundle
    )
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in reports.glob("*.html"))
    assert len(names) == 4, names
    assert {"case1.png.html", "case1.jpg.html", "case_2.png.html"} <= set(names)
    assert [n for n in names if n.startswith("case_2.png-")]  # the sanitised twin gets a short hash
    pages = {p.name: p.read_text() for p in reports.glob("*.html")}
    assert len(set(pages.values())) == 4


@pytest.mark.integration
def test_resume_replaces_error_rows_and_keeps_every_written_row(
    runner: CliRunner, tiny_bundle: Path, real_images: list[Path], tmp_path: Path
) -> None:
    folder = tmp_path / "batch"
    folder.mkdir()
    shutil.copy(real_images[0], folder / "a.png")
    (folder / "b.png").write_text("not yet an image")
    out = tmp_path / "results.csv"
    # rows of earlier runs, including the duplicate error rows older versions appended, and a user's column
    out.write_text(
        "file,sex,bone_age_months,bone_age_years,uncertainty_months,chronological_age_months,"
        "difference_months,sd_score,flag,warnings,error,note\n"
        f"{tmp_path / 'elsewhere.png'},female,100.0,8.33,1.0,,,,,,,keep me\n"
        f"{folder / 'b.png'},,,,,,,,,,{folder / 'b.png'}: old error,\n"
        f"{folder / 'b.png'},,,,,,,,,,{folder / 'b.png'}: older error,\n"
    )
    args = _predict_args(str(folder), "--out", str(out), "--sex", "female", checkpoint=tiny_bundle)
    first = runner.invoke(app, args)
    assert first.exit_code == 2
    rows = _rows(out)
    assert [Path(r["file"]).name for r in rows] == ["elsewhere.png", "b.png", "a.png"]
    assert rows[0]["note"] == "keep me" and rows[0]["bone_age_months"] == "100.0"
    assert "not an image" in rows[1]["error"] and "old error" not in rows[1]["error"]

    shutil.copy(real_images[1], folder / "b.png")  # fixed: it succeeds on the re-run
    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    rows = _rows(out)
    assert [Path(r["file"]).name for r in rows] == ["elsewhere.png", "b.png", "a.png"]  # one row each
    assert all(r["error"] == "" for r in rows) and rows[1]["bone_age_months"]
    assert "1 predicted, 0 failed, 1 already in" in second.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batch", "results.csv"]  # no temporary files left


@pytest.mark.integration
def test_invalid_dicom_date_is_a_warning_the_user_sees(
    runner: CliRunner, tiny_bundle: Path, real_images: list[Path], tmp_path: Path
) -> None:
    from conftest import write_dicom

    pixels = np.asarray(Image.open(real_images[0]).convert("L"))
    path = write_dicom(
        tmp_path / "hand.dcm", pixels, PatientSex="F", PatientBirthDate="20100115", StudyDate="20231345"
    )
    result = runner.invoke(app, _predict_args(str(path), "--json", checkpoint=tiny_bundle))
    assert result.exit_code == 0, result.output
    data = json.loads(_lines(result.stdout)[0])
    assert data["chronological_age_months"] is None
    assert any("StudyDate '20231345' is not a valid date" in w for w in data["warnings"]), data["warnings"]
