"""``boneage experiments list|run|report`` and ``boneage tune``: the CLI over :mod:`boneage.experiments`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from boneage.cli._common import exit_on_user_error
from boneage.errors import BoneAgeInputError
from boneage.train.experiments import EXPERIMENTS_DIR, list_experiments, load_experiment, report, run_grid
from boneage.train.tuning import TUNE_LAYERS, TUNE_LR, TUNE_SIZES, tune

experiments_app = typer.Typer(
    no_args_is_help=True,
    help="Grids of training runs from configs/experiments/NAME.yaml, and their result tables.",
)


def _quiet() -> None:
    from boneage.train.loop import quiet_lightning  # here, not at the top: the CLI starts fast

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
    out: Annotated[Path | None, typer.Option(help="write the report here (default RUNS_DIR/NAME)")] = None,
) -> None:
    """Write report.md, report.csv and report.png (into RUNS_DIR/NAME, or --out) from the variants' runs."""
    exp = load_experiment(name, experiments_dir)
    report(exp, runs_dir=runs_dir, test=test, out=out)
    typer.echo(((out or Path(runs_dir) / exp.name) / "report.md").read_text())


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
