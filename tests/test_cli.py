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
from boneage.cli.main import BATCH_FIELDS

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
    runner: CliRunner, tiny_bundle: Path, real_images: list[Path], tmp_path: Path, monkeypatch
) -> None:
    """A full disk while one report is written: that report is absent (no half file), its row says so, the
    batch carries on; a re-run writes the missing report and clears the error."""
    import errno

    import boneage.report as report_module
    from boneage.files import atomic_write as real_write

    def full_disk_for_1377(path, data, **kwargs):  # type: ignore[no-untyped-def]
        if Path(path).name.startswith("1377"):
            return real_write(path, lambda handle: (handle.write("<!DOCTYPE html>"), _enospc()), **kwargs)
        return real_write(path, data, **kwargs)

    def _enospc() -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report_module, "atomic_write", full_disk_for_1377)
    reports, out = tmp_path / "reports", tmp_path / "results.csv"
    options = ["--sex", "female", "--report", str(reports), "--out", str(out), "--no-heatmap"]
    args = _predict_args(*map(str, real_images), *options, checkpoint=tiny_bundle)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in reports.iterdir()) == ["10009.png.html", "1402.png.html"]  # nothing half
    by_name = {Path(r["file"]).name: r for r in _rows(out)}
    assert len(by_name) == 3
    assert (
        "report not written" in by_name["1377.png"]["error"]
        and "No space left" in by_name["1377.png"]["error"]
    )
    assert by_name["1377.png"]["bone_age_months"]  # the prediction itself is kept
    assert by_name["1402.png"]["error"] == "" and by_name["10009.png"]["error"] == ""
    assert by_name["1402.png"]["report"] == str(reports / "1402.png.html")
    assert "2 predicted, 1 failed" in result.stderr
    monkeypatch.undo()  # space again: the re-run writes the missing report and clears the error
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert (reports / "1377.png.html").is_file()
    rows = _rows(out)
    assert len(rows) == 3 and all(r["error"] == "" for r in rows)


@pytest.mark.integration
def test_a_report_never_replaces_another_childs_across_runs(
    runner: CliRunner, tiny_bundle: Path, real_images: list[Path], tmp_path: Path
) -> None:
    """`predict a/case.png --report rep/` then `predict b/case.png --report rep/`: two children, two reports,
    each run saying where its report went; re-running a/case.png replaces its own report only."""
    a, b, rep = tmp_path / "a", tmp_path / "b", tmp_path / "rep"
    a.mkdir(), b.mkdir()
    shutil.copy(real_images[0], a / "case.png")
    shutil.copy(real_images[1], b / "case.png")
    (rep).mkdir()
    (rep / "notes.png.html").write_text("a clinician's own file")  # not a boneage report: never replaced

    def run(path: Path) -> tuple[str, Path]:
        done = runner.invoke(
            app, _predict_args(str(path), "--sex", "female", "--report", str(rep), checkpoint=tiny_bundle)
        )
        assert done.exit_code == 0, done.output
        where = [
            line.split("report: ", 1)[1] for line in done.stderr.splitlines() if line.startswith("report: ")
        ]
        assert len(where) == 1
        return done.stdout, Path(where[0])

    first_out, first = run(a / "case.png")
    second_out, second = run(b / "case.png")
    assert first == rep / "case.png.html" and second != first and second.parent == rep
    assert (
        str((a / "case.png").resolve()) in first.read_text()
        and str((b / "case.png").resolve()) in second.read_text()
    )
    before = second.read_text()
    _, again = run(a / "case.png")
    assert again == first and second.read_text() == before  # its own report, the other child's untouched
    shutil.copy(real_images[2], tmp_path / "notes.png")
    _, notes = run(tmp_path / "notes.png")
    assert (
        notes != rep / "notes.png.html" and (rep / "notes.png.html").read_text() == "a clinician's own file"
    )


@pytest.mark.integration
def test_outputs_follow_the_umask_and_unicode_names_keep_their_letters(
    runner: CliRunner, tiny_bundle: Path, real_images: list[Path], tmp_path: Path
) -> None:
    import os

    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(real_images[0], src / "手 Müller.png")
    previous = os.umask(0o022)
    try:
        out, rep = tmp_path / "r.csv", tmp_path / "rep"
        done = runner.invoke(
            app,
            _predict_args(
                str(src), "--sex", "female", "--out", str(out), "--report", str(rep), checkpoint=tiny_bundle
            ),
        )
    finally:
        os.umask(previous)
    assert done.exit_code == 0, done.output
    assert oct(out.stat().st_mode & 0o777) == "0o644"
    (report,) = rep.iterdir()
    assert report.name == "手_Müller.png.html" and oct(report.stat().st_mode & 0o777) == "0o644"


@pytest.mark.integration
def test_a_pacs_export_folder_is_walked_and_dicom_found_by_content(
    runner: CliRunner, tiny_bundle: Path, shared_sample: Path, tmp_path: Path
) -> None:
    """IM0001 (DICOM, no suffix), sub/IM0002.dcm, a DICOMDIR (read, not an image), a README and a hidden file:
    two radiographs, sub-folders walked by default, not with --no-recursive; a DICOMDIR named alone is
    read for the files it lists."""
    import pydicom
    from conftest import write_dicom
    from pydicom.fileset import FileSet

    pacs = tmp_path / "pacs"
    (pacs / "sub").mkdir(parents=True)
    pixels = np.asarray(Image.open(shared_sample / "images" / "1377.png").convert("L"))
    from pydicom.uid import generate_uid

    study = {
        "StudyDate": "20240102",
        "StudyTime": "101500",
        "StudyID": "1",
        "SeriesNumber": 1,
        "StudyInstanceUID": generate_uid(),
        "SeriesInstanceUID": generate_uid(),
    }
    write_dicom(pacs / "IM0001", pixels, PatientSex="F", InstanceNumber=1, **study)
    write_dicom(pacs / "sub" / "IM0002.dcm", pixels, PatientSex="M", InstanceNumber=2, **study)
    (pacs / "README.txt").write_text("exported by the PACS")
    (pacs / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    fileset = FileSet()
    for name in ("IM0001", "sub/IM0002.dcm"):
        fileset.add(pydicom.dcmread(pacs / name))
    media = tmp_path / "media"
    fileset.write(media)
    out = tmp_path / "r.csv"
    done = runner.invoke(app, _predict_args(str(pacs), "--out", str(out), checkpoint=tiny_bundle))
    assert done.exit_code == 0, done.output
    assert sorted(Path(r["file"]).name for r in _rows(out)) == ["IM0001", "IM0002.dcm"]
    assert {r["sex"] for r in _rows(out)} == {"female", "male"}
    flat = tmp_path / "flat.csv"
    done = runner.invoke(
        app, _predict_args(str(pacs), "--no-recursive", "--out", str(flat), checkpoint=tiny_bundle)
    )
    assert done.exit_code == 0 and [Path(r["file"]).name for r in _rows(flat)] == ["IM0001"]
    listed = tmp_path / "listed.csv"
    done = runner.invoke(
        app, _predict_args(str(media / "DICOMDIR"), "--out", str(listed), checkpoint=tiny_bundle)
    )
    assert done.exit_code == 0, done.output
    assert len(_rows(listed)) == 2 and not any(r["file"].endswith("DICOMDIR") for r in _rows(listed))


@pytest.mark.integration
def test_a_batch_takes_each_images_age_from_the_table(
    runner: CliRunner, tiny_bundle: Path, real_images: list[Path], tmp_path: Path
) -> None:
    table = tmp_path / "cases.csv"
    table.write_text("id,male,age\n1377,False,15y\n1402,True,2y6m\n")
    out = tmp_path / "r.csv"
    done = runner.invoke(
        app,
        _predict_args(
            *map(str, real_images), "--sex-from", str(table), "--out", str(out), checkpoint=tiny_bundle
        ),
    )
    assert done.exit_code == 2  # 10009 is not in the table and its PNG does not state a sex
    rows = {Path(r["file"]).stem: r for r in _rows(out)}
    assert rows["1377"]["chronological_age_months"] == "180.0" and rows["1377"]["sd_score"] != ""
    assert rows["1402"]["chronological_age_months"] == "30.0" and rows["1402"]["sex"] == "male"
    assert f"its id '10009' is not in {table}" in rows["10009"]["error"]
    table.write_text("id,male,age\n1377,False,15\n")
    bad = runner.invoke(
        app, _predict_args(str(real_images[0]), "--sex-from", str(table), checkpoint=tiny_bundle)
    )
    line = _one_error_line(bad, "age needs a unit")
    assert str(table) in line and "id 1377" in line


@pytest.mark.integration
def test_ctrl_c_says_what_was_done_and_how_to_resume(
    runner: CliRunner, tiny_bundle: Path, real_images: list[Path], tmp_path: Path, monkeypatch
) -> None:
    import boneage.assessment as assessment

    real = assessment.assess_image
    calls = []

    def interrupted_second(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(assessment, "assess_image", interrupted_second)
    out = tmp_path / "r.csv"
    done = runner.invoke(
        app, _predict_args(*map(str, real_images), "--sex", "male", "--out", str(out), checkpoint=tiny_bundle)
    )
    assert done.exit_code == 130
    assert (
        f"interrupted: 1 of 3 radiographs done; the results so far are whole in {out}"
        in done.stderr.replace("\n", " ")
    )
    assert "run the same command again" in done.stderr
    assert [Path(r["file"]).name for r in _rows(out)] == ["1377.png"]
    monkeypatch.undo()
    again = runner.invoke(
        app, _predict_args(*map(str, real_images), "--sex", "male", "--out", str(out), checkpoint=tiny_bundle)
    )
    assert again.exit_code == 0 and len(_rows(out)) == 3 and "1 already in" in again.stderr


@pytest.mark.integration
def test_messages_name_the_real_problem(
    runner: CliRunner, tiny_bundle: Path, real_images: list[Path], tmp_path: Path
) -> None:
    from conftest import write_dicom

    line = _one_error_line(
        runner.invoke(
            app, _predict_args(str(real_images[0]), "--sex", "f", "--age", "-1", checkpoint=tiny_bundle)
        ),
        "must not be negative",
    )
    assert "--age" in line
    noise = np.random.default_rng(0).integers(0, 255, (64, 48), dtype=np.uint8)
    other = write_dicom(tmp_path / "o.dcm", noise, PatientSex="O")
    line = _one_error_line(
        runner.invoke(app, _predict_args(str(other), checkpoint=tiny_bundle)), "sex is required"
    )
    assert "PatientSex is 'O', neither F nor M" in line
    line = _one_error_line(
        runner.invoke(app, ["predict", str(real_images[0]), "--sex", "f", "--checkpoint", str(tmp_path)]),
        "is a folder, not a model file",
    )
    graph = tmp_path / "model.onnx"
    graph.write_bytes(b"onnx")
    _one_error_line(
        runner.invoke(app, ["predict", str(real_images[0]), "--sex", "f", "--checkpoint", str(graph)]),
        "pass the .safetensors beside it",
    )
    done = runner.invoke(
        app,
        _predict_args(str(real_images[0]), "--sex", "f", "--age", "0y0m", "--json", checkpoint=tiny_bundle),
    )
    assert done.exit_code == 0, done.output
    data = json.loads(done.stdout)
    assert data["sd_score"] is None and data["flag"] is None
    assert any(w.startswith("no SD score: chronological age 0 y 0 m is outside") for w in data["warnings"])


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


# ---- issue #45: the growth work-up, follow-up and a site's calibration -------------------------------------
@pytest.fixture(scope="module")
def earlier_visit(
    runner: CliRunner, real_images: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A real earlier result of the bundled model (predict --json) for a girl of 14 y: the history."""
    result = runner.invoke(
        app, ["predict", str(real_images[0]), "--sex", "female", "--age", "14y", "--no-tta", "--json"]
    )
    assert result.exit_code == 0, result.output
    path = tmp_path_factory.mktemp("history") / "child.json"
    path.write_text(result.stdout)
    return path


@pytest.mark.integration
def test_predict_growth_work_up_json(
    runner: CliRunner, real_images: list[Path], earlier_visit: Path, site_calibration: Path
) -> None:
    args = [
        "predict",
        str(real_images[0]),
        "--sex",
        "female",
        "--age",
        "15y",
        "--no-tta",
        "--json",
        "--height",
        "158.5",
        "--mother-height",
        "162",
        "--father-height",
        "178",
        "--history",
        str(earlier_visit),
        "--calibration",
        str(site_calibration),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    calibration = data["calibration"]
    assert calibration["file"] == "site.json" and calibration["cases"] == 110 and calibration["applied"]
    raw = calibration["bone_age_uncalibrated_months"]
    assert data["bone_age_uncalibrated_months"] == pytest.approx(raw, abs=0.01)
    assert data["bone_age_months"] == pytest.approx(calibration["intercept"] + calibration["slope"] * raw)
    assert any(w.startswith("calibrated with site.json (110 cases)") for w in data["warnings"])
    adult = data["adult_height"]
    assert adult["method"] == "bayley-pinneau" and "J Pediatr 1952" in adult["source"] and adult["limits"]
    assert (adult["predicted_adult_height_cm"] is None) == (adult["not_available"] is not None)
    assert data["target_height"]["target_height_cm"] == pytest.approx((162 + 178 - 13) / 2)
    follow = data["follow_up"]
    assert [v["current"] for v in follow["visits"]] == [False, True]
    step = follow["intervals"][0]
    assert step["years"] == pytest.approx(1.0)
    # the earlier visit was uncalibrated, this one is: the follow-up says so
    assert any("different calibrations" in w for w in follow["warnings"])
    growth = data["growth"]
    assert growth["schema_version"] == "1.0" and growth["bone_age_type"] == "greulich-pyle"
    assert growth["bone_age"] == pytest.approx(data["bone_age_months"] / 12, abs=0.001)
    assert growth["bone_age_calibrated"] and growth["calibration_file"] == "site.json"
    assert growth["target_height_cm"] == data["target_height"]["target_height_cm"]
    assert growth["bone_age_velocity"] == step["velocity_months_per_year"]


@pytest.mark.integration
def test_predict_growth_work_up_plain_text_and_report(
    runner: CliRunner, real_images: list[Path], tmp_path: Path
) -> None:
    reports = tmp_path / "reports"
    args = [
        "predict",
        str(real_images[0]),
        "--sex",
        "female",
        "--age",
        "14y",
        "--no-tta",
        "--height",
        "158",
        "--report",
        str(reports),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "predicted adult height (Bayley-Pinneau" in result.stdout
    html = next(reports.glob("*.html")).read_text()
    assert "Bayley–Pinneau method" in html and "J Pediatr 1952;40:423-441" in html and "Limits" in html


@pytest.mark.integration
def test_batch_csv_gains_the_growth_columns_only_when_given(
    runner: CliRunner, real_images: list[Path], site_calibration: Path, tmp_path: Path
) -> None:
    plain, calibrated = tmp_path / "plain.csv", tmp_path / "calibrated.csv"
    base = ["predict", *map(str, real_images[:2]), "--sex", "female", "--no-tta"]
    assert runner.invoke(app, [*base, "--out", str(plain)]).exit_code == 0
    assert (
        runner.invoke(
            app, [*base, "--out", str(calibrated), "--calibration", str(site_calibration)]
        ).exit_code
        == 0
    )
    with plain.open() as f:
        assert csv.DictReader(f).fieldnames == BATCH_FIELDS
    rows = _rows(calibrated)
    assert len(rows) == 2
    for row in rows:
        assert row["calibration"] == "site.json"
        assert float(row["bone_age_uncalibrated_months"]) != pytest.approx(float(row["bone_age_months"]))
        assert "calibrated with site.json" in row["warnings"]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--mother-height", "160"], "needs both parents' heights: add --father-height"),
        (["--height", "1450"], "error: --height: height must be in cm"),
        (["--father-height", "70", "--mother-height", "160"], "error: --father-height: father's height"),
        (["--calibration", "MISSING"], "cannot read the calibration"),
        (["--history", "MISSING"], "cannot read the history"),
    ],
)
def test_growth_options_fail_before_the_model_loads(
    runner: CliRunner, tmp_path: Path, extra: list[str], needle: str
) -> None:
    image = tmp_path / "hand.png"
    Image.new("L", (64, 64), 128).save(image)
    extra = [str(tmp_path / "nope.json") if x == "MISSING" else x for x in extra]
    result = runner.invoke(
        app, _predict_args(str(image), "--sex", "female", *extra, checkpoint=tmp_path / "no.ckpt")
    )
    line = _one_error_line(result, needle)
    assert "checkpoint" not in line


def test_history_out_of_order_or_of_the_other_sex_fails_before_the_model_loads(
    runner: CliRunner, tmp_path: Path
) -> None:
    image = tmp_path / "hand.png"
    Image.new("L", (64, 64), 128).save(image)
    history = tmp_path / "child.json"
    history.write_text(
        '{"file": "b.png", "sex": "male", "chronological_age_months": 120, "bone_age_months": 118}\n'
        '{"file": "a.png", "sex": "male", "chronological_age_months": 108, "bone_age_months": 100}\n'
    )
    args = _predict_args(
        str(image), "--sex", "male", "--history", str(history), checkpoint=tmp_path / "no.ckpt"
    )
    line = _one_error_line(runner.invoke(app, args), "visits out of order")
    assert str(history) in line
    history.write_text(
        '{"file": "a.png", "sex": "male", "chronological_age_months": 108, "bone_age_months": 100}'
    )
    args = _predict_args(
        str(image), "--sex", "female", "--history", str(history), checkpoint=tmp_path / "no.ckpt"
    )
    _one_error_line(runner.invoke(app, args), "the history is for a male child, --sex says female")
    second = tmp_path / "other.png"
    Image.new("L", (64, 64), 128).save(second)
    args = _predict_args(
        str(image), str(second), "--sex", "male", "--height", "140", checkpoint=tmp_path / "no.ckpt"
    )
    _one_error_line(runner.invoke(app, args), "--height describe one child: give one radiograph, not 2")


def _site_labels(table, readings, path: Path) -> Path:
    path.write_text(
        "id,boneage,male\n"
        + "".join(f"{i},{r:.2f},{m}\n" for i, r, m in zip(table["id"], readings, table["male"], strict=True))
    )
    return path


def test_calibrate_with_too_few_radiographs_says_how_many_are_missing(
    runner: CliRunner, shared_sample: Path, ten_labels: Path, tmp_path: Path
) -> None:
    out = tmp_path / "site.json"
    result = runner.invoke(
        app,
        [
            "calibrate",
            "--images",
            str(shared_sample / "images"),
            "--labels",
            str(ten_labels),
            "--out",
            str(out),
            "--checkpoint",
            str(tmp_path / "no.ckpt"),
        ],
    )
    line = _one_error_line(result, "at least 50 labelled radiographs per sex")
    assert "missing" in line and "checkpoint" not in line and not out.exists()


@pytest.mark.integration
def test_calibrate_writes_a_calibration_that_helps_and_refuses_one_that_does_not(
    runner: CliRunner,
    shared_sample: Path,
    sample_predictions,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """The command end to end on 110 real radiographs; the model's predictions are the session's (the same
    bundled model, no TTA), so the radiographs are not predicted a second time."""
    from conftest import shifted_readings

    import boneage.growth

    by_path = dict(zip(map(str, sample_predictions["path"]), sample_predictions["predicted"], strict=True))
    monkeypatch.setattr(
        boneage.growth,
        "predict_labelled",
        lambda predictor, paths, male: np.array([by_path[str(p)] for p in paths]),
    )
    images = str(shared_sample / "images")
    shifted = _site_labels(sample_predictions, shifted_readings(sample_predictions), tmp_path / "site.csv")
    out = tmp_path / "site.json"
    result = runner.invoke(
        app, ["calibrate", "--images", images, "--labels", str(shifted), "--out", str(out), "--no-tta"]
    )
    assert result.exit_code == 0, result.output
    assert "kept:" in result.stdout and f"wrote {out} (110 cases)" in result.stdout
    saved = json.loads(out.read_text())
    assert saved["kind"] == "boneage-calibration" and saved["female"]["applied"] and saved["male"]["applied"]
    assert not list(tmp_path.glob(".site.json.*"))  # no temporary file left behind

    plain = _site_labels(sample_predictions, sample_predictions["boneage"], tmp_path / "plain.csv")
    refused = tmp_path / "refused.json"
    result = runner.invoke(
        app, ["calibrate", "--images", images, "--labels", str(plain), "--out", str(refused), "--no-tta"]
    )
    _one_error_line(result, "no calibration written")
    assert "not kept" in result.stdout and not refused.exists()


@pytest.mark.integration
def test_evaluate_with_calibration_scores_the_corrected_bone_ages(
    runner: CliRunner, shared_sample: Path, ten_labels: Path, site_calibration: Path
) -> None:
    args = [
        "evaluate",
        "--images",
        str(shared_sample / "images"),
        "--labels",
        str(ten_labels),
        "--no-tta",
        "--json",
        "--calibration",
        str(site_calibration),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["calibration"]["file"] == "site.json" and data["calibration"]["cases"] == 110
    assert data["n"] == 10 and data["mae_months"] != pytest.approx(
        data["calibration"]["uncalibrated"]["mae_months"]
    )


def test_calibration_for_another_model_is_refused(
    runner: CliRunner, tiny_bundle: Path, real_images: list[Path], site_calibration: Path
) -> None:
    args = [
        "predict",
        str(real_images[0]),
        "--sex",
        "female",
        "--checkpoint",
        str(tiny_bundle),
        "--calibration",
        str(site_calibration),
    ]
    _one_error_line(runner.invoke(app, args), "was fitted for another model")


def test_growth_schema_command(runner: CliRunner) -> None:
    result = runner.invoke(app, ["growth-schema"])
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert schema["properties"]["schema_version"]["const"] == "1.0"
    assert {"bone_age", "bone_age_sds", "bone_age_centile", "predicted_adult_height_cm"} <= set(
        schema["properties"]
    )


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_runtime_is_gone_and_its_message_names_the_replacement(
    runner: CliRunner, command: str, real_images: list[Path], tmp_path: Path
) -> None:
    args = [command, str(real_images[0]), "--sex", "f"] if command == "predict" else [command]
    if command == "evaluate":
        args += ["--images", str(tmp_path), "--labels", str(tmp_path / "l.csv")]
    line = _one_error_line(runner.invoke(app, [*args, "--runtime", "onnx"]), "--runtime is gone")
    assert "--engine onnx" in line and "--engine torch" in line
    bad = runner.invoke(app, ["predict", str(real_images[0]), "--sex", "f", "--engine", "auto-ish"])
    _one_error_line(bad, "unknown engine 'auto-ish' (onnx or torch)")
