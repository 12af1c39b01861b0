"""``boneage train``, ``evaluate``, ``predict``, ``export``, ``bundle``, ``average`` and ``serve``: the
top-level commands.

The sub-commands (``boneage cache ...``, ``boneage experiments ...``, ``boneage tune``) live in their own
modules of this package and are attached to :data:`app` in ``boneage/cli/__init__.py``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from boneage.cli._common import err, exit_on_user_error, out
from boneage.errors import BoneAgeInputError
from boneage.files import atomic_write

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Pediatric bone age from left-hand radiographs. Research use only, not a medical device.",
)

ENGINE_HELP = "onnx (ONNX Runtime, no torch) or torch; default: onnx when onnxruntime is installed"
RUNTIME_GONE = (
    "--runtime is gone: each engine runs its own runtime now; use --engine onnx (ONNX Runtime) or "
    "--engine torch (torch)"
)


def _load_predictor(checkpoint: Path | None, engine: str | None, runtime: str | None, *, tta: bool) -> Any:
    """The predictor of ``--engine``; the removed ``--runtime`` gets one line naming its replacement."""
    from boneage.predict import load_predictor

    if runtime is not None:
        raise BoneAgeInputError(RUNTIME_GONE)
    return load_predictor(checkpoint, engine=engine, tta=tta)


@app.command()
@exit_on_user_error
def train(
    config: Annotated[Path, typer.Argument(help="YAML config, e.g. configs/quick.yaml")],
    run_dir: Annotated[Path | None, typer.Option(help="run folder (default runs/<name>)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. train.lr=1e-4")] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Train a model; writes config.yaml, metrics.csv, best.ckpt and last.ckpt to the run folder."""
    from boneage.config import load_config
    from boneage.train.loop import quiet_lightning
    from boneage.train.loop import train as run_training

    quiet_lightning()
    cfg = load_config(config, set_)
    folder = run_dir or Path("runs") / cfg.name
    summary = run_training(cfg, folder, progress=progress)
    print(json.dumps(summary, indent=2))  # plain print: rich would wrap long paths inside the JSON


@app.command()
@exit_on_user_error
def evaluate(
    images: Annotated[Path, typer.Option(help="folder of radiographs named <id>.png")],
    labels: Annotated[Path, typer.Option(help="RSNA label CSV (training, validation or test layout)")],
    checkpoint: Annotated[Path | None, typer.Option(help="checkpoint (default: the bundled model)")] = None,
    out_csv: Annotated[Path | None, typer.Option("--out", help="write per-image predictions here")] = None,
    plots: Annotated[Path | None, typer.Option(help="write pred-vs-ref and Bland-Altman PNGs here")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print exactly one JSON object")] = False,
    tta: Annotated[bool, typer.Option(help="average test-time augmented views")] = True,
    cache_dir: Annotated[Path | None, typer.Option(help="reuse/keep preprocessed images here")] = None,
    engine: Annotated[str | None, typer.Option(help=ENGINE_HELP)] = None,
    runtime: Annotated[str | None, typer.Option(hidden=True, help="removed: use --engine")] = None,
    calibration: Annotated[Path | None, typer.Option(help=CALIBRATION_HELP)] = None,
) -> None:
    """MAE, RMSE, median AE, MAE by sex and 2-year age band of a model on a labelled folder."""
    from boneage.evaluation import evaluate_folder, plot_predictions

    site = _load_calibration(calibration)
    predictor = _load_predictor(checkpoint, engine, runtime, tta=tta)
    if site is not None:
        site.check_model(predictor.info, calibration)
    report = evaluate_folder(predictor, images, labels, cache_dir=cache_dir, progress=not as_json)
    raw_metrics = None
    if site is not None:  # issue #45: the corrected bone ages are scored, the model's own shown beside them
        report, raw_metrics = _calibrated_report(report, site)
    if out_csv:
        out_csv.parent.mkdir(parents=True, exist_ok=True)
        report.predictions.to_csv(out_csv, index=False)
    if plots:
        plot_predictions(report.predictions, plots)
    if as_json:
        data = dict(report.metrics)
        if site is not None:
            data["calibration"] = {
                "file": site.name,
                "cases": site.cases,
                "fitted_with_tta": site.tta,
                "uncalibrated": raw_metrics,
            }
        print(json.dumps(data))
        return
    m = report.metrics
    if site is not None and raw_metrics is not None:
        note = (
            ""
            if site.tta == tta
            else f" (fitted {'with' if site.tta else 'without'} TTA, evaluated otherwise)"
        )
        out.print(
            f"{site.describe()}{note}; without it: MAE {raw_metrics['mae_months']:.2f}, "
            f"bias {raw_metrics['bias_months']:+.2f} months",
            highlight=False,
            soft_wrap=True,
        )
    out.print(
        f"n={m['n']}  MAE {m['mae_months']:.2f}  RMSE {m['rmse_months']:.2f}  "
        f"median AE {m['median_ae_months']:.2f} months  (predicting the mean: "
        f"{m['mae_baseline_mean_months']:.2f})"
    )
    out.print(report.table().to_string(index=False, float_format=lambda v: f"{v:.2f}"))


CALIBRATION_HELP = "a site calibration written by `boneage calibrate` (corrects the bone age; outputs say so)"


def _load_calibration(path: Path | None) -> Any:
    """The ``--calibration`` file, read and checked before any model loads."""
    if path is None:
        return None
    from boneage.growth import Calibration

    return Calibration.load(path)


def _calibrated_report(report: Any, site: Any) -> tuple[Any, dict[str, Any]]:
    """The evaluation re-scored on calibrated bone ages; the model's own metrics returned beside it."""
    import numpy as np

    from boneage.evaluation import EvaluationReport, metrics

    preds = report.predictions.copy()
    sexes = np.where(preds["male"].to_numpy(bool), "male", "female")
    preds["predicted_uncalibrated"] = preds["predicted"]
    preds["predicted"] = [round(site.apply(s, v), 3) for s, v in zip(sexes, preds["predicted"], strict=True)]
    preds["error"] = preds["predicted"] - preds["boneage"]
    scored = metrics(preds["predicted"].to_numpy(), preds["boneage"].to_numpy(), preds["male"].to_numpy(bool))
    return EvaluationReport(preds, scored), report.metrics


AGE_COLUMNS = ("age", "chronological_age_months")


def _case_table(path: Path) -> dict[str, tuple[str, float | None]]:
    """``--sex-from``: each image id's sex and, when the table has an ``age`` column (text as ``--age``
    takes it: 9y6m, 114m) or a ``chronological_age_months`` column (a number), its chronological age. The
    layout is an RSNA label CSV's (``id`` + ``male`` True/False, or ``Case ID`` + ``Sex`` M/F); a bone-age
    column may be present and is ignored."""
    import pandas as pd

    from boneage.clinical import parse_age
    from boneage.data.labels import read_labels

    table = read_labels(path, require_age=False)
    raw = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    raw = raw[~(raw == "").all(axis=1)]
    columns = {str(c).strip().lower(): c for c in raw.columns}
    age_col = next((columns[c] for c in AGE_COLUMNS if c in columns), None)
    ages: list[float | None] = [None] * len(table)
    if age_col is not None:
        numeric = str(age_col).strip().lower() == "chronological_age_months"
        for i, (case, text) in enumerate(zip(table["id"], raw[age_col].str.strip(), strict=True)):
            try:
                ages[i] = parse_age(float(text) if numeric and text else text)
            except (BoneAgeInputError, ValueError) as exc:
                problem = exc.problem if isinstance(exc, BoneAgeInputError) else f"not a number: {text!r}"
                raise BoneAgeInputError(f"id {case}, column {age_col!r}: {problem}", path) from None
    return {
        str(i): ("male" if m else "female", age)
        for i, m, age in zip(table["id"], table["male"], ages, strict=True)
    }


BATCH_FIELDS = [
    "file",
    "sex",
    "bone_age_months",
    "bone_age_years",
    "uncertainty_months",
    "chronological_age_months",
    "difference_months",
    "sd_score",
    "flag",
    "warnings",
    "report",
    "error",
]


def _os_problem(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _writable_folder(folder: Path, label: Path, created: list[Path]) -> None:
    """Create ``folder`` if needed and prove a file can be written in it (permissions, read-only mounts and
    /proc all answer only to a real attempt); a problem is one line naming ``label``. Folders this creates
    are added to ``created``."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BoneAgeInputError(f"cannot create the folder {folder} ({_os_problem(exc)})", label) from None
    finally:
        created += [p for p in missing if p.is_dir()]
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".boneage-", suffix=".tmp"):
            pass
    except OSError as exc:
        raise BoneAgeInputError(f"cannot write in {folder} ({_os_problem(exc)})", label) from None


def _check_outputs(out_csv: Path | None, report: Path | None) -> None:
    """``--out`` and ``--report`` checked before the model loads, so a typo costs nothing; when one of them
    is refused, the folders the check created for the other are removed again."""
    created: list[Path] = []
    try:
        if out_csv is not None:
            if out_csv.is_dir():
                raise BoneAgeInputError("is a folder; --out takes a CSV file name, e.g. results.csv", out_csv)
            _writable_folder(out_csv.parent, out_csv, created)
        if report is not None:
            if report.exists() and not report.is_dir():
                raise BoneAgeInputError("is a file; --report takes a folder for the HTML reports", report)
            _writable_folder(report, report, created)
    except BoneAgeInputError:
        for folder in created:  # deepest first; each is empty (the probe file is gone)
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


class _BatchCSV:
    """The ``--out`` CSV of a batch: one row per file, resumable, never losing a row already written.

    Rows of earlier runs are read first; a file with a successful row is skipped, a failed one is tried again
    and its new row replaces the old. After every image the whole table is written to a temporary file and
    renamed over the CSV (``boneage.files.atomic_write``), so the CSV on disk is always a whole table of
    whole rows, one per file: a full disk, a crash or Ctrl+C leave the previous table, never a fragment row.
    """

    def __init__(self, path: Path, extra_fields: list[str] | tuple[str, ...] = ()) -> None:
        self.path = path
        at = BATCH_FIELDS.index("warnings")  # growth work-up columns, only when their inputs are given
        self.fields = [*BATCH_FIELDS[:at], *extra_fields, *BATCH_FIELDS[at:]]
        self.rows: dict[str, dict[str, Any]] = {}
        if path.is_file():
            self._read()

    @staticmethod
    def succeeded(row: dict[str, Any]) -> bool:
        """A complete row without an error (a row cut short by an older version has no ``error`` value)."""
        return row.get("error") == "" and row.get("bone_age_months") not in (None, "")

    def _read(self) -> None:
        try:
            with self.path.open(newline="", encoding="utf-8-sig") as f:  # -sig: saved again by Excel
                reader = csv.DictReader(f)
                header = [name for name in (reader.fieldnames or []) if name]
                rows = list(reader)
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            problem = _os_problem(exc) if isinstance(exc, OSError) else type(exc).__name__
            raise BoneAgeInputError(f"cannot read the existing results CSV ({problem})", self.path) from None
        if header and "file" not in header:
            raise BoneAgeInputError(
                "is not a boneage results CSV (no 'file' column); choose another --out", self.path
            )
        self.fields += [name for name in header if name not in self.fields]  # a user's extra columns stay
        for row in rows:
            key = row.get("file")
            if not key:
                continue
            old = self.rows.get(key)
            if old is None or self.succeeded(row) or not self.succeeded(old):
                self.rows[key] = row  # a success is kept over errors, else the latest row wins
                # (dict order stays the first appearance)

    def done(self, file: str) -> bool:
        row = self.rows.get(file)
        return row is not None and self.succeeded(row)

    def _write_table(self, handle: Any) -> None:
        writer = csv.DictWriter(handle, fieldnames=self.fields, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.rows.values())

    def save(self) -> None:
        try:
            atomic_write(self.path, self._write_table)
        except OSError as exc:
            raise BoneAgeInputError(f"cannot write the results CSV ({_os_problem(exc)})", self.path) from None

    def add(self, row: dict[str, Any]) -> None:
        """The row of one file, kept whole on disk at once (a retried file's row replaces its old one)."""
        self.rows[row["file"]] = row
        self.save()


@app.command()
@exit_on_user_error
def predict(
    images: Annotated[list[Path], typer.Argument(help="radiograph file(s) (PNG, JPEG, DICOM) or a folder")],
    sex: Annotated[str | None, typer.Option(help="female or male (default: DICOM PatientSex)")] = None,
    age: Annotated[
        str | None, typer.Option(help="chronological age, e.g. 7.5y or 90m (default: DICOM dates)")
    ] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="checkpoint (default: the bundled model)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object per image")] = False,
    report: Annotated[Path | None, typer.Option(help="write one HTML report per image here")] = None,
    out_csv: Annotated[
        Path | None, typer.Option("--out", help="batch: one CSV row per image; a re-run retries failed ones")
    ] = None,
    sex_from: Annotated[
        Path | None,
        typer.Option(help="batch: CSV of each image id's sex (id,male or Case ID,Sex) and optionally age"),
    ] = None,
    recursive: Annotated[
        bool, typer.Option(help="walk sub-folders of a folder (DICOM found by content, DICOMDIR read)")
    ] = True,
    heatmap: Annotated[bool, typer.Option(help="compute the Grad-CAM heatmap (for --report)")] = True,
    tta: Annotated[bool, typer.Option(help="average test-time augmented views")] = True,
    engine: Annotated[str | None, typer.Option(help=ENGINE_HELP)] = None,
    runtime: Annotated[str | None, typer.Option(hidden=True, help="removed: use --engine")] = None,
    height: Annotated[
        float | None, typer.Option(help="the child's height in cm: Bayley-Pinneau adult height prediction")
    ] = None,
    mother_height: Annotated[
        float | None, typer.Option(help="mother's height in cm (with --father-height: Tanner target height)")
    ] = None,
    father_height: Annotated[float | None, typer.Option(help="father's height in cm")] = None,
    history: Annotated[
        Path | None,
        typer.Option(help="earlier results of this child (predict --json output, batch CSV or history file)"),
    ] = None,
    calibration: Annotated[Path | None, typer.Option(help=CALIBRATION_HELP)] = None,
) -> None:
    """Bone age (months, years), SD score against Greulich & Pyle, uncertainty, heatmap and report; with
    the child's and parents' heights, earlier results or a site calibration, the growth work-up too."""
    from rich.progress import Progress

    from boneage.clinical import parse_age
    from boneage.data.labels import parse_sex

    # Everything a user can get wrong is checked before the model loads and before any image is decoded.
    given_sex = parse_sex(sex, "--sex")  # the documented spellings only: `--sex 1` is not an answer
    try:
        given_age = parse_age(age)
    except BoneAgeInputError as exc:
        raise BoneAgeInputError(exc.problem, "--age") from None
    growth = _GrowthOptions(height, mother_height, father_height, history, calibration)
    if growth.history is not None and given_sex is not None and growth.history.sex is not given_sex:
        raise BoneAgeInputError(
            f"the history is for a {growth.history.sex.value} child, --sex says {given_sex.value}", history
        )
    _check_outputs(out_csv, report)
    from boneage.data.io import find_radiographs

    files = find_radiographs(images, recursive=recursive)
    if not files:
        raise BoneAgeInputError("no radiographs found", ", ".join(map(str, images)))
    if len(files) > 1 and growth.per_child:
        raise BoneAgeInputError(
            f"{' '.join(growth.per_child)} describe one child: give one radiograph, not {len(files)}"
        )
    cases = _case_table(sex_from) if sex_from else {}
    results = _BatchCSV(out_csv, growth.columns) if out_csv else None
    todo = [p for p in files if not (results and results.done(str(p)))]
    names: dict[str, str] = {}
    if report:
        from boneage.report import report_names

        names = report_names(files)
    predictor = _load_predictor(checkpoint, engine, runtime, tta=tta)
    if growth.calibration is not None:
        growth.calibration.check_model(predictor.info, calibration)
    batch = len(files) > 1 or out_csv is not None
    failures = done = 0
    if results:
        results.save()  # whole rows only, one per file, from the start
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(Progress(console=err, disable=not batch or as_json, transient=True))
        task = bar.add_task("predicting", total=len(todo))
        try:
            for path in todo:
                row = _predict_one(
                    path,
                    predictor,
                    given_sex,
                    given_age,
                    cases,
                    sex_from,
                    report,
                    names,
                    heatmap,
                    as_json,
                    results is not None,
                    growth,
                )
                failures += bool(row.get("error"))
                done += 1
                if results:
                    results.add(row)
                bar.advance(task)
        except KeyboardInterrupt:
            bar.stop()
            where = f"; the results so far are whole in {out_csv}" if out_csv else ""
            err.print(
                f"interrupted: {done} of {len(todo)} radiographs done{where}; run the same command again "
                + (
                    "to carry on where it stopped"
                    if out_csv
                    else "(with --out FILE.csv to make a batch resumable)"
                ),
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(130) from None
    if batch and not as_json:
        skipped = len(files) - len(todo)
        err.print(
            f"{len(todo) - failures} predicted, {failures} failed, {skipped} already in {out_csv}"
            if out_csv
            else f"{len(todo) - failures} predicted, {failures} failed"
        )
    if failures:
        raise typer.Exit(2)


def _predict_one(
    path: Path,
    predictor: Any,
    given_sex: Any,
    given_age: float | None,
    cases: dict[str, tuple[str, float | None]],
    table: Path | None,
    report: Path | None,
    names: dict[str, str],
    heatmap: bool,
    as_json: bool,
    batch_csv: bool,
    growth: Any,
) -> dict[str, Any]:
    """One radiograph of ``predict``: its CSV row (``error`` set on failure; the batch carries on)."""
    from boneage.assessment import assess_image, write_report

    row: dict[str, Any] = {"file": str(path)}
    case_sex, case_age = cases.get(path.stem, (None, None))
    try:
        result = assess_image(
            predictor,
            path,
            given_sex or case_sex,
            given_age if given_age is not None else case_age,
            heatmap=heatmap and report is not None,
            **growth.kwargs,
        )
    except BoneAgeInputError as exc:
        if table is not None and path.stem not in cases and exc.problem.startswith("sex is required"):
            exc = BoneAgeInputError(  # say which table lacked the id
                f"sex is required: its id {path.stem!r} is not in {table} and the file does not state it",
                path,
            )
        row["error"] = str(exc)
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return row
    a = result.assessment
    row.update(
        sex=a.sex,
        bone_age_months=round(a.bone_age_months, 2),
        bone_age_years=round(a.bone_age_months / 12, 2),
        uncertainty_months=round(a.uncertainty_months or 0, 2),
        chronological_age_months=_r(a.chronological_age_months),
        difference_months=_r(a.difference_months),
        sd_score=_r(a.sd_score),
        flag=a.flag_text or "",  # "not shown: ..." under a caution
        warnings=" | ".join(a.warnings),
        error="",
    )
    row.update(_growth_columns(result, growth.columns))
    if report:
        try:
            written = write_report(result, predictor, report, name=names[str(path)])
        except (OSError, ValueError) as exc:  # one report must not stop the batch
            problem = _os_problem(exc) if isinstance(exc, OSError) else _one_line(exc)
            row["error"] = f"{path}: report not written in {report} ({problem})"
            line = escape(row["error"])
            err.print(f"[red]error:[/red] {line}", highlight=False, soft_wrap=True)
        else:
            row["report"] = str(written)
            err.print(f"report: {written}", highlight=False, soft_wrap=True)
    if as_json:
        extra = {"report": row["report"]} if "report" in row else {}
        print(json.dumps({**result.to_dict(), **extra}))
    elif not batch_csv:
        _print_result(result)
    return row


class _GrowthOptions:
    """predict's issue #45 options, checked before the model loads: what to pass to ``assess_image``, which
    batch columns they add, and which of them describe one child."""

    def __init__(
        self,
        height: float | None,
        mother: float | None,
        father: float | None,
        history: Path | None,
        calibration: Path | None,
    ) -> None:
        from boneage.growth import check_height_cm, read_history

        self.height = check_height_cm(height, "height", "--height")
        self.mother = check_height_cm(mother, "mother's height", "--mother-height", parent=True)
        self.father = check_height_cm(father, "father's height", "--father-height", parent=True)
        if (self.mother is None) != (self.father is None):
            missing = "--father-height" if self.father is None else "--mother-height"
            raise BoneAgeInputError(f"the Tanner target height needs both parents' heights: add {missing}")
        self.history = read_history(history) if history is not None else None
        self.calibration = _load_calibration(calibration)
        self.per_child = [
            flag
            for flag, value in (
                ("--height", self.height),
                ("--mother-height", self.mother),
                ("--father-height", self.father),
                ("--history", self.history),
            )
            if value is not None
        ]
        self.columns: list[str] = []
        if self.calibration is not None:
            self.columns += ["bone_age_uncalibrated_months", "calibration"]
        if self.height is not None:
            self.columns += [
                "height_cm",
                "predicted_adult_height_cm",
                "predicted_adult_height_error_sd_cm",
                "percent_of_mature_height",
                "bayley_pinneau_column",
                "predicted_adult_height_note",
            ]
        if self.mother is not None:
            self.columns += ["target_height_cm", "target_height_range_cm"]
        if self.history is not None:
            self.columns += ["bone_age_velocity", "bone_age_velocity_uncertainty"]

    @property
    def kwargs(self) -> dict[str, Any]:
        return {
            "height_cm": self.height,
            "mother_height_cm": self.mother,
            "father_height_cm": self.father,
            "history": self.history,
            "calibration": self.calibration,
        }


def _growth_columns(result: Any, columns: list[str]) -> dict[str, Any]:
    """The batch row's issue #45 cells, from the result's export record."""
    if not columns or result.workup is None:
        return {}
    export = result.workup.export.model_dump(mode="json")
    row: dict[str, Any] = {}
    for name in columns:
        if name == "bone_age_uncalibrated_months":
            value = (
                result.workup.calibration.bone_age_uncalibrated_months if result.workup.calibration else None
            )
        elif name == "calibration":
            value = result.workup.export.calibration_file
        else:
            value = export.get(name)
        if isinstance(value, list):
            value = "-".join(f"{v:g}" for v in value)
        row[name] = "" if value is None else (round(value, 2) if isinstance(value, float) else value)
    return row


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def _r(value: float | None) -> float | str:
    return round(value, 2) if value is not None else ""


def _print_result(result: Any) -> None:
    from boneage.clinical import format_months

    a = result.assessment
    for w in a.cautions:  # issue #43 item 5: a doubt about the image comes before the numbers
        err.print(f"[yellow]caution:[/yellow] {w}", highlight=False, soft_wrap=True)
    text = format_months(a.bone_age_months)
    line = f"{result.prediction.source}: bone age {a.bone_age_months:.1f} months ({text})"
    calibrated = result.workup.calibration if result.workup is not None else None
    if calibrated is not None and calibrated.applied:
        line += f" [calibrated; model's own {calibrated.bone_age_uncalibrated_months:.1f}]"
    line += f" ± {a.uncertainty_months:.1f}, {a.sex}"
    if a.chronological_age_months is not None:
        line += (
            f"; chronological age {a.chronological_age_months:.1f} months, difference "
            f"{a.difference_months:+.1f}, SD score {a.sd_score:+.2f} ({a.flag_text})"
        )
    out.print(line, highlight=False, soft_wrap=True)
    if result.workup is not None:
        for text in result.workup.lines():
            out.print(f"  {text}", highlight=False, soft_wrap=True)
    for w in a.warnings:
        if w not in a.cautions:
            err.print(f"[yellow]warning:[/yellow] {w}", highlight=False, soft_wrap=True)


@app.command()
@exit_on_user_error
def export(
    out_path: Annotated[Path, typer.Option("--out", help="output file, e.g. model.onnx")],
    fmt: Annotated[str, typer.Option("--format", help="onnx")] = "onnx",
    checkpoint: Annotated[Path | None, typer.Option(help="checkpoint (default: the bundled model)")] = None,
) -> None:
    """Export the network to ONNX for onnxruntime (dynamic batch; TTA stays in the caller), stamped with
    the digest of the weights it came from, so the onnx engine can use it beside them."""
    from boneage.modelfile import bundled_model_path
    from boneage.models.export import export_model_file_onnx

    if fmt != "onnx":
        raise BoneAgeInputError(f"unknown export format {fmt!r} (onnx)")
    export_model_file_onnx(checkpoint or bundled_model_path(), out_path)
    out.print(f"wrote {out_path}")


@app.command()
@exit_on_user_error
def bundle(
    checkpoint: Annotated[Path | None, typer.Option(help="best.ckpt of a training run")] = None,
    out_path: Annotated[Path, typer.Option("--out", help="output .safetensors")] = Path("model.safetensors"),
    model_version: Annotated[
        str | None, typer.Option("--model-version", "--version", help="the model's own version, e.g. 0.13.0")
    ] = None,
    convert: Annotated[
        Path | None, typer.Option(help="rewrite a v0.1 bundle (whole training config inside) as a model spec")
    ] = None,
    native_images: Annotated[
        Path | None, typer.Option(help="held-out ids' native-aspect files (default: beside the holdout CSV)")
    ] = None,
) -> None:
    """Turn a training checkpoint into the bundled-model format (fp16 safetensors + model spec + measured
    facts: held-out MAE in both geometries, TTA-spread threshold, training range) plus the ONNX graph of
    the same weights beside it (same name, .onnx)."""
    from boneage.release.bundle import convert_bundle, make_bundle

    if convert is not None:
        path = convert_bundle(convert, out_path)
        out.print(f"wrote {path} and {path.with_suffix('.onnx').name} ({_sizes(path)})")
        return
    if checkpoint is None:
        raise BoneAgeInputError("pass --checkpoint CKPT (or --convert OLD_BUNDLE)")
    if not model_version:
        raise BoneAgeInputError("pass --model-version (the model's own version, e.g. 0.13.0)")
    path, facts, _predictions = make_bundle(
        checkpoint,
        out_path,
        model_version=model_version,
        native_images=native_images,
        on_step=lambda msg: err.print(f"measuring: {msg}", highlight=False),
    )
    print(json.dumps(facts.public(), indent=2))
    out.print(f"wrote {path} and {path.with_suffix('.onnx').name} ({_sizes(path)})")


@app.command()
@exit_on_user_error
def average(
    models: Annotated[list[Path], typer.Argument(help="two or more checkpoints or bundles")],
    out_path: Annotated[Path, typer.Option("--out", help="output checkpoint (ship rules name it soup.ckpt)")],
    weight: Annotated[
        list[float] | None, typer.Option(help="one share per model, in order (default: equal shares)")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="run config giving the split (default: the first .ckpt's own)")
    ] = None,
    bn_images: Annotated[
        int,
        typer.Option(help="re-estimate BatchNorm statistics on this many training images (0: average them)"),
    ] = 0,
    bn_seed: Annotated[int, typer.Option(help="seed of those images and their augmentation")] = 0,
) -> None:
    """Average the weights of models fine-tuned from one start (a model soup) into one checkpoint, with
    config.yaml beside it: score it with `evaluate`, judge it with a ship rule, bundle it with `bundle`."""
    from boneage.release.average import average_checkpoints

    path = average_checkpoints(
        list(models), out_path, weights=weight or None, config=config, bn_images=bn_images, bn_seed=bn_seed
    )
    out.print(f"wrote {path} (the mean of {len(models)} models) and {path.parent / 'config.yaml'}")


def _sizes(path: Path) -> str:
    onnx = path.with_suffix(".onnx")
    a, b = path.stat().st_size / 1e6, onnx.stat().st_size / 1e6 if onnx.is_file() else 0.0
    return f"{a:.1f} + {b:.1f} = {a + b:.1f} MB"


@app.command()
@exit_on_user_error
def serve(
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8000,
    checkpoint: Annotated[Path | None, typer.Option(help="checkpoint (default: the bundled model)")] = None,
    engine: Annotated[str | None, typer.Option(help=ENGINE_HELP)] = None,
    workers: Annotated[int, typer.Option(help="inference worker threads (default: one per CPU core)")] = 0,
    calibration: Annotated[Path | None, typer.Option(help=CALIBRATION_HELP)] = None,
    # issue #43 items 6 and 8: upload size, request-head deadline and connection cap
    max_upload_mb: Annotated[float, typer.Option(help="largest accepted upload in MB", min=0.001)] = 20,
    header_timeout: Annotated[
        float,
        typer.Option(help="seconds a client gets to send the request headers (then 408)", min=0.1),
    ] = 10,
    max_connections: Annotated[
        int,
        typer.Option(help="open connections at most; beyond it the longest idle one is closed", min=1),
    ] = 100,
) -> None:
    """Start the web page and REST API (FastAPI + uvicorn)."""
    from boneage.web import serve as run_server

    site = _load_calibration(calibration)
    run_server(
        host=host,
        port=port,
        checkpoint=checkpoint,
        engine=engine,
        workers=workers or None,
        calibration=site,
        max_upload_mb=max_upload_mb,
        header_timeout_s=header_timeout,
        max_connections=max_connections,
    )
