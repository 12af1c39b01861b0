"""The ``boneage`` command: a thin typer layer over the Python API (training, evaluation, prediction, export).

Every user mistake arrives as a ``BoneAgeInputError`` and leaves as one line on stderr with exit code 2
(:func:`boneage.cli._common.exit_on_user_error`). This package is the only part of boneage that imports
typer or rich; the library reports progress through :mod:`boneage.progress` callbacks.

``main``: train, evaluate, predict, export, bundle, serve; ``cache``: ``boneage cache ...``;
``experiments``: ``boneage experiments ...`` and ``boneage tune``; ``release``: ``boneage release ...``;
``growth``: ``boneage calibrate`` and ``boneage growth-schema``; ``node``: ``boneage node`` (the DICOM
node).
"""

from __future__ import annotations

import sys

from boneage.cli.cache import cache_app
from boneage.cli.experiments import experiments_app, tune_command
from boneage.cli.growth import calibrate_command, growth_schema_command
from boneage.cli.main import app
from boneage.cli.node import node_command
from boneage.cli.release import release_app

app.add_typer(cache_app, name="cache")
app.add_typer(experiments_app, name="experiments")
app.add_typer(release_app, name="release")
app.command("tune")(tune_command)
app.command("calibrate")(calibrate_command)
app.command("growth-schema")(growth_schema_command)
app.command("node")(node_command)

__all__ = ["app", "main"]


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())
