"""Training: the LightningModule and the loop (``loop``), the run folder (``runs``), experiment grids
(``experiments``) and Optuna searches (``tuning``). ``train`` needs the training stack; importing this package
does not load it (the CLI lists grids without torch)."""

from typing import Any

__all__ = ["train"]


def __getattr__(name: str) -> Any:
    if name == "train":
        from boneage.train.loop import train

        return train
    raise AttributeError(f"module 'boneage.train' has no attribute {name!r}")
