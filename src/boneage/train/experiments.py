"""Experiment grids: one base config, shared overrides and named variants, run into ``runs/NAME/VARIANT/``
and tabulated like the talk's result tables; plus ``boneage tune`` (Optuna) over lr, resolution and layers.

An experiment file (``configs/experiments/NAME.yaml``)::

    description: what the table answers
    base: ../sample-lite0.yaml         # relative to this file (or to the working directory)
    overrides: {trainer.accelerator: auto}   # for every variant; dotted keys or nested sections
    variants:
      imagenet: {model.pretrained: imagenet}
      random: {model.pretrained: none}
    test: {images: PATH, labels: CSV}  # optional: the report adds each variant's test MAE

Importing this module is cheap (the CLI, :mod:`boneage.cli.experiments`, imports it at start-up): torch,
Lightning, pandas and Optuna are imported inside the functions that need them.
"""

from __future__ import annotations

import json
import logging
import math
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from boneage.config import Config, build_config, deep_merge
from boneage.errors import BoneAgeInputError
from boneage.train.runs import RunDir

log = logging.getLogger(__name__)

__all__ = [
    "Experiment",
    "load_experiment",
    "list_experiments",
    "resolve",
    "cap_epochs",
    "variant_status",
    "run_grid",
    "collect",
    "report",
]

EXPERIMENTS_DIR = Path("configs/experiments")

# settings that do not change what a run computes: a finished run with other values here is still the same
_IRRELEVANT = {
    ("data", "num_workers"),
    ("data", "cache_dir"),
    ("trainer", "progress_bar"),
    ("trainer", "log_every_n_steps"),
    ("train", "resume"),
}


# ---- experiment files ------------------------------------------------------------------------------------


def _nest(data: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1, "c": {"d.e": 2}}`` → ``{"a": {"b": 1}, "c": {"d": {"e": 2}}}``."""
    out: dict[str, Any] = {}
    for key, value in (data or {}).items():
        parts = str(key).split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise BoneAgeInputError(f"override {key!r} conflicts with a value set for {part!r}")
        value = _nest(value) if isinstance(value, dict) else value
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]] = deep_merge(node[parts[-1]], value)
        else:
            node[parts[-1]] = value
    return out


@dataclass
class Experiment:
    """A base config, overrides shared by all variants, and named variants (each a dict of overrides)."""

    name: str
    variants: dict[str, dict[str, Any]]
    base: Path | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    test: dict[str, str] | None = None
    source: Path | None = None

    @classmethod
    def from_dict(cls, name: str, data: dict[str, Any], *, folder: Path | None = None) -> Experiment:
        """Build from a mapping shaped like an experiment file; relative ``base`` is looked up in ``folder``
        (the file's folder) first, then in the working directory."""
        if not _safe_name(name):
            raise BoneAgeInputError(f"experiment name {name!r} must be a plain folder name")
        if not isinstance(data, dict):
            raise BoneAgeInputError(f"experiment {name!r} must be a mapping with base and variants")
        unknown = set(data) - {"base", "overrides", "variants", "description", "test"}
        if unknown:
            raise BoneAgeInputError(
                f"experiment {name!r}: unknown key(s) {', '.join(sorted(unknown))} "
                "(base, overrides, variants, description, test)"
            )
        variants = data.get("variants") or {}
        if not isinstance(variants, dict) or not variants:
            raise BoneAgeInputError(f"experiment {name!r} declares no variants (variants: NAME: overrides)")
        for vname, over in variants.items():
            if not _safe_name(str(vname)):
                raise BoneAgeInputError(
                    f"experiment {name!r}: variant name {vname!r} must be a plain folder name"
                )
            if over is not None and not isinstance(over, dict):
                raise BoneAgeInputError(f"experiment {name!r}: variant {vname!r} must map keys to values")
        base = data.get("base")
        base_path = None
        if base:
            base_path = Path(str(base))
            if not base_path.is_absolute() and folder is not None and (folder / base_path).is_file():
                base_path = folder / base_path
            if not base_path.is_file():
                raise BoneAgeInputError(f"experiment {name!r}: base config not found", base)
        test = data.get("test")
        if test is not None and (not isinstance(test, dict) or not {"images", "labels"} <= set(test)):
            raise BoneAgeInputError(f"experiment {name!r}: test must give images and labels")
        return cls(
            name=name,
            variants={str(k): _nest(v or {}) for k, v in variants.items()},
            base=base_path,
            overrides=_nest(data.get("overrides") or {}),
            description=str(data.get("description") or "").strip(),
            test={k: str(v) for k, v in test.items()} if test else None,
        )

    def config(self, variant: str, max_epochs: int | None = None) -> Config:
        """The resolved config of one variant: base ← shared overrides ← variant overrides."""
        if variant not in self.variants:
            raise BoneAgeInputError(
                f"experiment {self.name!r} has no variant {variant!r} (has: {', '.join(self.variants)})"
            )
        data: dict[str, Any] = {}
        if self.base is not None:
            try:
                data = yaml.safe_load(self.base.read_text()) or {}
            except yaml.YAMLError as exc:
                raise BoneAgeInputError(f"not valid YAML ({str(exc).splitlines()[0]})", self.base) from None
        data = deep_merge(deep_merge(_nest(data), self.overrides), self.variants[variant])
        data["name"] = f"{self.name}/{variant}"
        try:
            cfg = build_config(data)
        except BoneAgeInputError as exc:
            raise BoneAgeInputError(f"experiment {self.name!r}, variant {variant!r}: {exc}") from None
        cap_epochs(cfg, max_epochs)
        return cfg


def _safe_name(name: str) -> bool:
    return bool(name) and name not in {".", ".."} and all(c.isalnum() or c in "-_.+" for c in name)


def list_experiments(experiments_dir: str | Path | None = None) -> list[str]:
    folder = Path(experiments_dir) if experiments_dir else EXPERIMENTS_DIR
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def load_experiment(
    name: str | Path | Experiment | dict[str, Any], experiments_dir: str | Path | None = None
) -> Experiment:
    """An experiment by name (``configs/experiments/NAME.yaml``), by path, or as given (object or dict)."""
    if isinstance(name, Experiment):
        return name
    if isinstance(name, dict):
        return Experiment.from_dict(
            str(name.get("name", "experiment")), {k: v for k, v in name.items() if k != "name"}
        )
    folder = Path(experiments_dir) if experiments_dir else EXPERIMENTS_DIR
    text = str(name)
    path = Path(text)
    if not (path.suffix in {".yaml", ".yml"} and path.is_file()):
        path = folder / f"{text}.yaml"
    if not path.is_file():
        known = ", ".join(list_experiments(folder)) or "none"
        raise BoneAgeInputError(f"no experiment {text!r} in {folder} (known: {known})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise BoneAgeInputError(f"not valid YAML ({str(exc).splitlines()[0]})", path) from None
    exp = Experiment.from_dict(path.stem, data, folder=path.parent)
    exp.source = path
    return exp


def cap_epochs(cfg: Config, max_epochs: int | None) -> Config:
    """Shorten a run to ``max_epochs`` (for smoke runs): phase 1 and warm-up keep their share of the run; a
    two-phase run keeps at least one epoch of each phase when ``max_epochs`` ≥ 2."""
    if max_epochs is None or max_epochs <= 0 or cfg.train.epochs <= max_epochs:
        return cfg
    scale = max_epochs / cfg.train.epochs
    head = cfg.finetune.head_epochs
    if head > 0:
        head = min(max(1, round(head * scale)), max_epochs - 1) if max_epochs >= 2 else 0
    cfg.finetune.head_epochs = head
    cfg.train.warmup_epochs = cfg.train.warmup_epochs * scale
    cfg.train.epochs = max_epochs
    return cfg


def resolve(
    name: str | Path | Experiment | dict[str, Any],
    *,
    experiments_dir: str | Path | None = None,
    max_epochs: int | None = None,
    variants: list[str] | None = None,
) -> tuple[Experiment, dict[str, Config]]:
    """The experiment and the resolved config of each (selected) variant, in file order."""
    exp = load_experiment(name, experiments_dir)
    chosen = list(exp.variants) if not variants else list(variants)
    return exp, {v: exp.config(v, max_epochs) for v in chosen}


# ---- running a grid --------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _flat(data: dict[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, (*prefix, key)))
        else:
            out[(*prefix, key)] = value
    return out


def config_differences(run_dir: Path, cfg: Config) -> list[str]:
    """Settings of the run already in ``run_dir`` that differ from ``cfg`` ("train.epochs: 1 → 30")."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return []
    from boneage.config import config_from_dict

    try:
        saved = config_from_dict(yaml.safe_load(saved_path.read_text()) or {}).to_dict()
    except (yaml.YAMLError, BoneAgeInputError) as exc:
        return [f"config.yaml unreadable ({exc})"]
    old, new = _flat(saved), _flat(cfg.to_dict())
    diffs = []
    for key in sorted(set(old) | set(new)):
        if key in _IRRELEVANT or old.get(key) == new.get(key):
            continue
        diffs.append(f"{'.'.join(key)}: {old.get(key)!r} → {new.get(key)!r}")
    return diffs


def variant_status(run_dir: str | Path, cfg: Config | None = None) -> str:
    """``finished`` (summary.json says so, for ``cfg``'s epochs), ``partial`` (a run to resume), ``failed``
    (error.txt from the last attempt) or ``new``."""
    run = RunDir(run_dir)
    summary = run.summary
    epochs = cfg.train.epochs if cfg is not None else None
    if run.status == "finished" and (epochs is None or int(summary.get("epochs_completed") or 0) >= epochs):
        return "finished"
    if (run / "error.txt").is_file():
        return "failed"
    if (run / "last.ckpt").is_file() or summary:
        return "partial"
    return "new"


def _describe(cfg: Config) -> dict[str, Any]:
    m, t, f = cfg.model, cfg.train, cfg.finetune
    return {
        "init": _init_label(m.pretrained),
        "backbone": m.backbone,
        "task": m.task,
        "source": cfg.data.source,
        "size": cfg.preprocess.size,
        "layers": f.layers,
        "head_epochs": f.head_epochs,
        "epochs": t.epochs,
        "optimizer": t.optimizer,
        "lr": t.lr,
    }


def _init_label(pretrained: str) -> str:
    init = (pretrained or "none").strip()
    return "random" if init.lower() in {"none", "random", ""} else init


def run_grid(
    name: str | Path | Experiment | dict[str, Any],
    *,
    runs_dir: str | Path = "runs",
    experiments_dir: str | Path | None = None,
    variants: list[str] | None = None,
    max_epochs: int | None = None,
    dry_run: bool = False,
    progress: bool = False,
    stop_on_error: bool = False,
    callbacks: list[Any] | None = None,
    echo: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Train every variant (or those named) into ``runs_dir/NAME/VARIANT/``; returns one record per variant.

    A variant whose summary.json says finished is skipped and a killed one resumes from its last.ckpt, so a
    grid can be re-run until done. A run folder holding another config is an error (say ``--runs-dir``). A
    failing variant is recorded (``error.txt``) and the grid goes on, unless ``stop_on_error``.
    ``dry_run`` resolves and checks everything and trains nothing.
    """
    exp, configs = resolve(name, experiments_dir=experiments_dir, max_epochs=max_epochs, variants=variants)
    say = echo or log.info
    root = Path(runs_dir) / exp.name
    records: list[dict[str, Any]] = []
    for vname, cfg in configs.items():
        run = root / vname
        status = variant_status(run, cfg)
        diffs = config_differences(run, cfg) if status != "new" else []
        record: dict[str, Any] = {"variant": vname, "run_dir": str(run), "status": status, **_describe(cfg)}
        init = cfg.model.pretrained.strip()
        if init.lower() not in {"imagenet", "none", "random", ""} and not Path(init).is_file():
            record["warning"] = f"init checkpoint {init} does not exist yet"
        if diffs:
            record["status"] = "conflict"
            record["differences"] = diffs
        records.append(record)
    conflicts = [r for r in records if r["status"] == "conflict"]
    if conflicts and not dry_run:
        first = conflicts[0]
        raise BoneAgeInputError(
            f"{first['run_dir']} holds a run of another config ({'; '.join(first['differences'][:3])}); "
            "use another --runs-dir, or delete that folder to start it again"
        )
    if dry_run:
        return records
    from boneage.train.loop import train

    for record in records:
        vname, run = record["variant"], Path(record["run_dir"])
        if record["status"] == "finished":
            say(f"{exp.name}/{vname}: finished, skipped")
            record["status"] = "skipped"
            continue
        say(f"{exp.name}/{vname}: {'resuming' if record['status'] == 'partial' else 'training'}")
        (run / "error.txt").unlink(missing_ok=True)
        try:
            summary = train(configs[vname], run, progress=progress, callbacks=list(callbacks or []))
        except Exception as exc:  # a grid goes on; the error stays beside the run
            run.mkdir(parents=True, exist_ok=True)
            (run / "error.txt").write_text(f"{type(exc).__name__}: {exc}\n\n{traceback.format_exc()}")
            record.update(status="failed", error=f"{type(exc).__name__}: {exc}")
            say(f"{exp.name}/{vname}: failed ({type(exc).__name__}: {exc})")
            if stop_on_error:
                raise
            continue
        record.update(
            status="finished" if summary.get("finished") else "stopped",
            best_val_mae=summary.get("best_val_mae"),
            fit_seconds=summary.get("fit_seconds"),
        )
    return records


# ---- result tables ---------------------------------------------------------------------------------------

REPORT_COLUMNS = [
    "experiment",
    "variant",
    "init",
    "backbone",
    "layers",
    "head_epochs",
    "epochs",
    "best_val_mae",
    "test_mae",
    "wall_time_s",
    "status",
    "size",
    "train_images",
    "last_val_mae",
    "train_images_per_s",
]


def _test_mae(exp: Experiment, run: Path, progress: bool = False) -> float | None:
    """MAE of the variant's best.ckpt on the experiment's test set; cached in test.json by checkpoint time."""
    if not exp.test:
        return None
    ckpt = run / "best.ckpt"
    if not ckpt.is_file():
        return None
    cached = _read_json(run / "test.json")
    stamp = ckpt.stat().st_mtime
    if cached.get("checkpoint_mtime") == stamp and cached.get("test") == exp.test:
        return cached.get("mae_months")
    from boneage.evaluation import evaluate_folder
    from boneage.predict import load_predictor

    predictor = load_predictor(ckpt, tta=False)
    result = evaluate_folder(predictor, exp.test["images"], exp.test["labels"], progress=progress)
    mae = float(result.metrics["mae_months"])
    (run / "test.json").write_text(
        json.dumps({"checkpoint_mtime": stamp, "test": exp.test, "mae_months": mae, "n": result.metrics["n"]})
    )
    return mae


def collect(
    name: str | Path | Experiment | dict[str, Any],
    *,
    runs_dir: str | Path = "runs",
    experiments_dir: str | Path | None = None,
    test: bool = True,
) -> Any:
    """One row per declared variant (pandas DataFrame, columns ``REPORT_COLUMNS``), from the run folders;
    variants not run yet have empty results and status ``new``."""
    import pandas as pd

    exp, configs = resolve(name, experiments_dir=experiments_dir)
    rows = []
    for vname, declared in configs.items():
        run = Path(runs_dir) / exp.name / vname
        saved = run / "config.yaml"
        cfg = declared
        if saved.is_file():
            from boneage.config import config_from_dict

            cfg = config_from_dict(yaml.safe_load(saved.read_text()) or {})
        summary = _read_json(run / "summary.json")
        status = variant_status(run, cfg)
        wall = summary.get("total_fit_seconds", summary.get("fit_seconds"))
        epochs, best = summary.get("epochs_completed", 0), summary.get("best_val_mae")
        logged = _metrics(run)
        if not summary and logged is not None:  # killed before its summary: what it logged
            epochs = len(logged)
            best = float(logged["val_mae"].min()) if logged["val_mae"].notna().any() else None
        train_images = summary.get("train_images")
        last_val = speed = None
        if logged is not None and len(logged):
            last_val = float(logged["val_mae"].iloc[-1]) if pd.notna(logged["val_mae"].iloc[-1]) else None
            per_epoch = cfg.data.epoch_images or train_images
            if per_epoch:
                per_epoch = max(1, int(per_epoch) // cfg.train.batch_size) * cfg.train.batch_size  # drop_last
                speed = _throughput(logged, cfg.finetune.head_epochs, per_epoch)
        rows.append(
            {
                "experiment": exp.name,
                "variant": vname,
                "init": _init_label(cfg.model.pretrained),
                "backbone": cfg.model.backbone,
                "layers": cfg.finetune.layers,
                "head_epochs": cfg.finetune.head_epochs,
                "epochs": epochs,
                "best_val_mae": best,
                "test_mae": _test_mae(exp, run) if test else None,
                "wall_time_s": wall,
                "status": status,
                "size": cfg.preprocess.size,
                "train_images": train_images,
                "last_val_mae": last_val,
                "train_images_per_s": speed,
            }
        )
    return pd.DataFrame(rows, columns=REPORT_COLUMNS)


def _metrics(run: Path) -> Any:
    """The run's metrics.csv (one row per epoch, across resumes), or None."""
    import pandas as pd

    path = run / "metrics.csv"
    if not path.is_file():
        return None
    try:
        logged = pd.read_csv(path)
    except (OSError, ValueError, pd.errors.ParserError):
        return None
    return logged if {"epoch", "val_mae", "elapsed_s"} <= set(logged.columns) else None


def _throughput(logged: Any, head_epochs: int, per_epoch: int) -> float | None:
    """Training images per second over the epochs of the last phase (fine-tuning, after ``head_epochs``),
    from metrics.csv's ``elapsed_s`` (which counts on across resumes). Validation and checkpointing are in
    that time; the first epoch also carries Lightning's start-up, so it is left out when there are more."""
    rows = logged.reset_index(drop=True)
    later = rows.index[rows["epoch"] >= head_epochs]
    if len(later) == 0:
        return None
    first, last = int(later[0]), int(later[-1])
    if first == 0 and last >= 1:
        first = 1  # measure from the end of epoch 0
    start = float(rows["elapsed_s"].iloc[first - 1]) if first >= 1 else 0.0
    seconds = float(rows["elapsed_s"].iloc[last]) - start
    epochs = last - first + 1
    return epochs * per_epoch / seconds if seconds > 0 else None


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _count(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{int(value):,}"


def _duration(seconds: Any) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "–"
    s = float(seconds)
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def report(
    name: str | Path | Experiment | dict[str, Any],
    *,
    runs_dir: str | Path = "runs",
    experiments_dir: str | Path | None = None,
    test: bool = True,
    out: str | Path | None = None,
) -> Any:
    """Write ``report.md``, ``report.csv`` and ``report.png`` (validation MAE per variant) into ``out``
    (default ``runs_dir/NAME``, beside the runs); returns the table (pandas DataFrame)."""
    exp = load_experiment(name, experiments_dir)
    table = collect(exp, runs_dir=runs_dir, test=test)
    runs = Path(runs_dir) / exp.name
    out = Path(out) if out is not None else runs
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "report.csv", index=False)
    has_test = table["test_mae"].notna().any()
    header = ["variant", "init", "backbone", "size", "layers", "train images", "epochs", "val MAE (months)"]
    header += ["last-epoch val MAE"]
    header += ["test MAE (months)"] if has_test else []
    header += ["train img/s", "wall time", "status"]
    lines = [f"# Experiment `{exp.name}`", ""]
    if exp.description:
        lines += [exp.description, ""]
    if exp.base is not None:
        lines += [f"Base config: `{exp.base}`; runs in `{runs}/`.", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.itertuples(index=False):
        layers = str(row.layers) + (f" (head {row.head_epochs} ep)" if row.head_epochs else "")
        cells = [row.variant, row.init, row.backbone, str(row.size), layers, _count(row.train_images)]
        cells += [str(row.epochs), _fmt(row.best_val_mae), _fmt(row.last_val_mae)]
        cells += [_fmt(row.test_mae)] if has_test else []
        cells += [_fmt(row.train_images_per_s, 1), _duration(row.wall_time_s), row.status]
        lines.append("| " + " | ".join(cells) + " |")
    done = table.dropna(subset=["best_val_mae"])
    if len(done):
        best = done.loc[done["best_val_mae"].astype(float).idxmin()]
        lines += [
            "",
            f"Best validation MAE: **{best['variant']}**, {float(best['best_val_mae']):.2f} months.",
        ]
    lines += [
        "",
        "val MAE: the best epoch's (it picks best.ckpt); last-epoch val MAE: the final epoch's. train img/s: "
        "training images per second over the last phase's epochs (validation included), from metrics.csv.",
        "",
        "![validation MAE by variant](report.png)",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    _bar_chart(table, out / "report.png", exp.name)
    return table


def _bar_chart(table: Any, path: Path, title: str) -> Path:
    from matplotlib.figure import Figure  # Agg canvas: no display needed

    labels = list(table["variant"])
    val = [float(v) if v is not None and v == v else 0.0 for v in table["best_val_mae"]]
    test = [float(v) if v is not None and v == v else 0.0 for v in table["test_mae"]]
    fig = Figure(figsize=(max(5.0, 1.1 * len(labels) + 2), 4), dpi=100)
    ax = fig.subplots()
    x = range(len(labels))
    width = 0.4 if any(test) else 0.7
    bars = ax.bar([i - (width / 2 if any(test) else 0) for i in x], val, width, label="validation")
    ax.bar_label(bars, labels=[f"{v:.1f}" if v else "not run" for v in val], fontsize=8)
    if any(test):
        tbars = ax.bar([i + width / 2 for i in x], test, width, label="test")
        ax.bar_label(tbars, labels=[f"{v:.1f}" if v else "" for v in test], fontsize=8)
        ax.legend()
    ax.set_xticks(list(x), labels, rotation=20, ha="right")
    ax.set(ylabel="MAE (months)", title=f"{title}: best validation MAE by variant")
    fig.savefig(path, bbox_inches="tight")
    return path
