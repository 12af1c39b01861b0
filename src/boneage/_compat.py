"""Old module paths (before the 0.13 layout) keep importing for one more release, with a DeprecationWarning
naming the new one, so notebooks and scripts written against 0.12 still run while they are updated.

A meta-path finder maps each old name to its new module by name only: nothing here imports the package's
parts, so the layout's one-way imports stay intact."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

MOVED = {
    "boneage.augment": "boneage.data.augment",
    "boneage.bundle": "boneage.release.bundle",
    "boneage.cache": "boneage.data.shards",
    "boneage.experiments": "boneage.train.experiments",
    "boneage.inference": "boneage.predict",
    "boneage.io": "boneage.data.io",
    "boneage.labels": "boneage.data.labels",
    "boneage.preprocess": "boneage.data.preprocess",
    "boneage.runs": "boneage.train.runs",
    "boneage.runtime": "boneage.predict",
    "boneage.sources": "boneage.data.sources",
    "boneage.training": "boneage.train.loop",
    "boneage.tuning": "boneage.train.tuning",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(
        self, fullname: str, path: object, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = MOVED[spec.name]
        warnings.warn(
            f"{spec.name} moved to {new} in boneage 0.13; the old path goes in 0.14",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:
        """The module is the new one, already executed."""


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
