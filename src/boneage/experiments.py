"""Experiment grids: one base config, shared overrides and named variants, run into ``runs/NAME/VARIANT/``
and tabulated like the talk's result tables; plus ``boneage tune`` (Optuna) over lr, resolution and layers.

An experiment file (``configs/experiments/NAME.yaml``)::

    description: what the table answers
    base: ../bundled-cpu.yaml          # relative to this file (or to the working directory)
    overrides: {trainer.accelerator: auto}   # for every variant; dotted keys or nested sections
    variants:
      imagenet: {model.pretrained: imagenet}
      random: {model.pretrained: none}
    test: {images: PATH, labels: CSV}  # optional: the report adds each variant's test MAE

Importing this module is cheap (the CLI imports it at start-up): torch, Lightning, pandas and Optuna are
imported inside the functions that need them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from boneage.config import Config, build_config
from boneage.errors import BoneAgeInputError, exit_on_user_error

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
    "tune",
    "experiments_app",
    "tune_command",
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


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``extra`` merged in, section by section (``extra`` wins)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
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
    run = Path(run_dir)
    summary = _read_json(run / "summary.json")
    epochs = cfg.train.epochs if cfg is not None else None
    if summary.get("finished") and (epochs is None or int(summary.get("epochs_completed") or 0) >= epochs):
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
    from boneage.training import train

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
    from boneage.inference import Predictor

    predictor = Predictor.load(ckpt, tta=False)
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
        if not summary and (run / "metrics.csv").is_file():  # killed before its summary: what it logged
            logged = pd.read_csv(run / "metrics.csv")
            epochs = len(logged)
            best = float(logged["val_mae"].min()) if logged["val_mae"].notna().any() else None
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
            }
        )
    return pd.DataFrame(rows, columns=REPORT_COLUMNS)


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


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
) -> Any:
    """Write ``runs_dir/NAME/report.md``, ``report.csv`` and ``report.png`` (validation MAE per variant);
    returns the table (pandas DataFrame)."""
    exp = load_experiment(name, experiments_dir)
    table = collect(exp, runs_dir=runs_dir, test=test)
    out = Path(runs_dir) / exp.name
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "report.csv", index=False)
    has_test = table["test_mae"].notna().any()
    header = ["variant", "init", "backbone", "layers", "epochs", "val MAE (months)"]
    header += ["test MAE (months)"] if has_test else []
    header += ["wall time", "status"]
    lines = [f"# Experiment `{exp.name}`", ""]
    if exp.description:
        lines += [exp.description, ""]
    if exp.base is not None:
        lines += [f"Base config: `{exp.base}`; runs in `{out}/`.", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.itertuples(index=False):
        layers = str(row.layers) + (f" (head {row.head_epochs} ep)" if row.head_epochs else "")
        cells = [row.variant, row.init, row.backbone, layers, str(row.epochs), _fmt(row.best_val_mae)]
        cells += [_fmt(row.test_mae)] if has_test else []
        cells += [_duration(row.wall_time_s), row.status]
        lines.append("| " + " | ".join(cells) + " |")
    done = table.dropna(subset=["best_val_mae"])
    if len(done):
        best = done.loc[done["best_val_mae"].astype(float).idxmin()]
        lines += [
            "",
            f"Best validation MAE: **{best['variant']}**, {float(best['best_val_mae']):.2f} months.",
        ]
    lines += ["", "![validation MAE by variant](report.png)", ""]
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


# ---- hyper-parameter search ------------------------------------------------------------------------------

TUNE_SIZES = (128, 192, 256)
TUNE_LAYERS = ("20", "50", "100", "all")
TUNE_LR = (1e-5, 1e-2)


def _import_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise BoneAgeInputError(
            "boneage tune needs Optuna, an optional dependency: pip install 'boneage[tune]' (or optuna)"
        ) from None
    return optuna


def tune(
    config: str | Path,
    trials: int,
    *,
    run_dir: str | Path | None = None,
    overrides: list[str] | None = None,
    max_epochs: int | None = None,
    sizes: tuple[int, ...] = TUNE_SIZES,
    layers: tuple[str, ...] = TUNE_LAYERS,
    lr_range: tuple[float, float] = TUNE_LR,
    progress: bool = False,
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Optuna (TPE) search over ``train.lr`` (log scale), ``preprocess.size`` and ``finetune.layers``
    minimising the best validation MAE, until the study holds ``trials`` finished trials.

    The study lives in ``run_dir/optuna.db`` (sqlite), each trial's run in ``run_dir/trial-<params hash>/``:
    re-running the same command continues the study, and a trial killed mid-training is retried with the
    same parameters, resuming its run from last.ckpt. Writes ``trials.csv`` and ``best.json`` as it goes.
    """
    optuna = _import_optuna()
    from boneage.config import load_config
    from boneage.training import train

    say = echo or log.info
    base = load_config(config, overrides)
    folder = Path(run_dir) if run_dir else Path("runs") / f"tune-{base.name}"
    folder.mkdir(parents=True, exist_ok=True)
    space = {"lr": list(lr_range), "size": [int(s) for s in sizes], "layers": [str(x) for x in layers]}
    if not space["size"] or not space["layers"] or not 0 < lr_range[0] <= lr_range[1]:
        raise BoneAgeInputError("tune needs at least one size, one layers value and 0 < lr-min <= lr-max")
    for value in space["layers"]:
        from boneage.training import parse_layers

        parse_layers(value)
    storage = f"sqlite:///{(folder / 'optuna.db').absolute()}"
    if not progress:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name="tune",
        storage=storage,
        direction="minimize",
        load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=base.train.seed),
    )
    saved_space = study.user_attrs.get("search_space")
    if saved_space is None:
        study.set_user_attr("search_space", space)
        study.set_user_attr("config", str(config))
    elif saved_space != space:
        raise BoneAgeInputError(
            f"{folder} holds a study over another search space ({saved_space}); use another --run-dir"
        )
    state = optuna.trial.TrialState
    for stale in study.get_trials(deepcopy=False, states=(state.RUNNING,)):  # killed mid-trial: retry it
        study.tell(stale.number, state=state.FAIL)
        if stale.params:
            study.enqueue_trial(stale.params, skip_if_exists=False)
            say(f"trial {stale.number} was interrupted; retrying {stale.params}")

    def objective(trial: Any) -> float:
        lr = trial.suggest_float("lr", space["lr"][0], space["lr"][1], log=True)
        size = trial.suggest_categorical("size", space["size"])
        n = trial.suggest_categorical("layers", space["layers"])
        params = {"lr": lr, "size": size, "layers": n}
        digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
        cfg = load_config(
            config,
            [*(overrides or []), f"train.lr={lr!r}", f"preprocess.size={size}", f"finetune.layers={n}"],
        )
        cfg.name = f"{base.name}/trial-{digest}"
        cap_epochs(cfg, max_epochs)
        trial.set_user_attr("run_dir", str(folder / f"trial-{digest}"))
        say(f"trial {trial.number}: lr={lr:.2e} size={size} layers={n}")
        summary = train(cfg, folder / f"trial-{digest}", progress=progress)
        value = summary.get("best_val_mae")
        if value is None or not math.isfinite(float(value)):
            raise RuntimeError(f"trial {trial.number} produced no validation MAE")
        return float(value)

    def write_results(study: Any, trial: Any) -> None:
        study.trials_dataframe().to_csv(folder / "trials.csv", index=False)
        done = [t for t in study.trials if t.state == state.COMPLETE]
        if done:
            best = min(done, key=lambda t: t.value)
            (folder / "best.json").write_text(
                json.dumps(
                    {"value": best.value, "params": best.params, "trial": best.number, **best.user_attrs},
                    indent=2,
                )
            )

    complete = len(study.get_trials(deepcopy=False, states=(state.COMPLETE,)))
    remaining = max(0, trials - complete)
    started = time.time()
    if remaining:
        study.optimize(objective, n_trials=remaining, callbacks=[write_results], gc_after_trial=True)
    done = study.get_trials(deepcopy=False, states=(state.COMPLETE,))
    best = study.best_trial if done else None
    return {
        "run_dir": str(folder),
        "storage": storage,
        "trials_complete": len(done),
        "trials_run_now": remaining,
        "best_value": best.value if best else None,
        "best_params": best.params if best else None,
        "best_run_dir": best.user_attrs.get("run_dir") if best else None,
        "seconds": round(time.time() - started, 1),
    }


# ---- command line (``boneage experiments ...`` and ``boneage tune``) -------------------------------------

experiments_app = typer.Typer(
    no_args_is_help=True,
    help="Grids of training runs from configs/experiments/NAME.yaml, and their result tables.",
)




def _quiet() -> None:
    from boneage.training import quiet_lightning  # here, not at the top: experiments.py imports fast

    quiet_lightning()


@experiments_app.command("list")
@exit_on_user_error
def list_command(
    experiments_dir: Annotated[Path, typer.Option(help="folder of experiment files")] = EXPERIMENTS_DIR,
) -> None:
    """The experiments in configs/experiments with their variants."""
    for name in list_experiments(experiments_dir):
        exp = load_experiment(name, experiments_dir)
        typer.echo(
            f"{name}: {', '.join(exp.variants)}" + (f"  ({exp.description})" if exp.description else "")
        )


@experiments_app.command("run")
@exit_on_user_error
def run_command(
    name: Annotated[
        str, typer.Argument(help="experiment name (configs/experiments/NAME.yaml) or a YAML path")
    ],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="list variants and settings; train nothing")
    ] = False,
    max_epochs: Annotated[int | None, typer.Option(help="cap every variant's epochs (smoke runs)")] = None,
    runs_dir: Annotated[Path, typer.Option(help="runs go to RUNS_DIR/NAME/VARIANT")] = Path("runs"),
    variant: Annotated[list[str] | None, typer.Option(help="run only this variant (repeatable)")] = None,
    experiments_dir: Annotated[Path, typer.Option(help="folder of experiment files")] = EXPERIMENTS_DIR,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Train each variant into RUNS_DIR/NAME/VARIANT/, skipping finished ones and resuming killed ones."""
    if not dry_run:
        _quiet()
    records = run_grid(
        name,
        runs_dir=runs_dir,
        experiments_dir=experiments_dir,
        variants=variant,
        max_epochs=max_epochs,
        dry_run=dry_run,
        progress=progress,
        echo=lambda line: typer.echo(line, err=True),
    )
    if dry_run:
        keys = ["init", "backbone", "size", "layers", "head_epochs", "epochs", "optimizer", "lr", "status"]
        for r in records:
            typer.echo(f"{r['variant']}: " + "  ".join(f"{k}={r[k]}" for k in keys) + f"  → {r['run_dir']}")
            for line in r.get("differences", []):
                typer.echo(f"    differs from the run there: {line}")
            if "warning" in r:
                typer.echo(f"    warning: {r['warning']}")
        return
    failed = [r["variant"] for r in records if r["status"] == "failed"]
    typer.echo(json.dumps([{k: r.get(k) for k in ("variant", "status", "best_val_mae")} for r in records]))
    if failed:
        typer.echo(f"failed: {', '.join(failed)} (see error.txt in their run folders)", err=True)
        raise typer.Exit(1)


@experiments_app.command("report")
@exit_on_user_error
def report_command(
    name: Annotated[str, typer.Argument(help="experiment name or YAML path")],
    runs_dir: Annotated[Path, typer.Option(help="folder holding NAME/VARIANT runs")] = Path("runs"),
    experiments_dir: Annotated[Path, typer.Option(help="folder of experiment files")] = EXPERIMENTS_DIR,
    test: Annotated[bool, typer.Option(help="evaluate best.ckpt on the experiment's test set")] = True,
) -> None:
    """Write RUNS_DIR/NAME/report.md, report.csv and report.png from the variants' run folders."""
    exp = load_experiment(name, experiments_dir)
    report(exp, runs_dir=runs_dir, test=test)
    typer.echo((Path(runs_dir) / exp.name / "report.md").read_text())


@exit_on_user_error
def tune_command(
    config: Annotated[Path, typer.Argument(help="YAML config to tune, e.g. configs/quick.yaml")],
    trials: Annotated[int, typer.Option(help="finished trials the study should hold")] = 20,
    run_dir: Annotated[Path | None, typer.Option(help="study folder (default runs/tune-<name>)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. train.epochs=10")] = None,
    max_epochs: Annotated[int | None, typer.Option(help="cap each trial's epochs")] = None,
    sizes: Annotated[str, typer.Option(help="image sizes to try, comma-separated")] = ",".join(
        map(str, TUNE_SIZES)
    ),
    layers: Annotated[str, typer.Option(help="finetune.layers values to try")] = ",".join(TUNE_LAYERS),
    lr_min: Annotated[float, typer.Option(help="smallest learning rate")] = TUNE_LR[0],
    lr_max: Annotated[float, typer.Option(help="largest learning rate")] = TUNE_LR[1],
    progress: Annotated[bool, typer.Option(help="show progress bars")] = False,
) -> None:
    """Optuna search over learning rate, resolution and fine-tuned layers minimising validation MAE;
    resumable from RUN_DIR/optuna.db."""
    _quiet()
    try:
        size_list = tuple(int(s) for s in sizes.split(",") if s.strip())
    except ValueError:
        raise BoneAgeInputError(f"--sizes must be whole numbers separated by commas, got {sizes!r}") from None
    result = tune(
        config,
        trials,
        run_dir=run_dir,
        overrides=set_,
        max_epochs=max_epochs,
        sizes=size_list,
        layers=tuple(x.strip() for x in layers.split(",") if x.strip()),
        lr_range=(lr_min, lr_max),
        progress=progress,
        echo=lambda line: typer.echo(line, err=True),
    )
    typer.echo(json.dumps(result, indent=2))
