"""``python -m boneage`` runs the CLI (also what DDP launchers re-execute)."""

from boneage.cli import app

app()
