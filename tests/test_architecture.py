"""The package's shape: parts that import only the parts above them (imports inside functions count), no
import cycles, the CLI framework only in ``boneage.cli``, and a torch-free path that never loads torch.

The order below is the README's layout paragraph; a new module must find its place in it."""

from __future__ import annotations

import ast
import logging
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "boneage"

#: each part may import itself and the parts before it, nothing after it
LAYERS: list[tuple[str, ...]] = [
    ("boneage", "boneage._compat", "boneage.errors", "boneage.progress", "boneage.files"),
    ("boneage.spec",),
    ("boneage.config",),
    ("boneage.data",),
    ("boneage.ood",),
    ("boneage.modelfile",),
    ("boneage.models",),
    ("boneage.predict",),
    ("boneage.evaluation",),
    ("boneage.train",),
    ("boneage.release",),
    ("boneage.clinical", "boneage.growth"),
    ("boneage.report",),
    ("boneage.assessment",),
    ("boneage.dicom",),
    ("boneage.cli", "boneage.web", "boneage.__main__"),
]
FRONT_END_ONLY = {"typer", "rich", "click"}
TRAINING_MODULES = ("torch", "timm", "kornia", "lightning", "pytorch_lightning", "torchvision", "sklearn")


def _module_name(path: Path) -> str:
    name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return name.removesuffix(".__init__")


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _layer(name: str) -> int:
    """The rank of the most specific part containing ``name`` (-1: none)."""
    best, best_len = -1, -1
    for rank, parts in enumerate(LAYERS):
        for part in parts:
            if (name == part or name.startswith(part + ".")) and len(part) > best_len:
                best, best_len = rank, len(part)
    return best


def _imports(name: str) -> set[str]:
    """Every boneage module (or name inside one) an import statement anywhere in the module names."""
    path = MODULES[name]
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def _internal_edges(name: str) -> set[str]:
    return {t for t in _imports(name) if t in MODULES and t != name and not MODULES[t].name == "__init__.py"}


def test_every_module_has_a_place_in_the_layout() -> None:
    orphans = sorted(n for n in MODULES if _layer(n) < 0)
    assert not orphans, f"add these to LAYERS (and the README's layout): {orphans}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_flow_one_way(name: str) -> None:
    upward = sorted(t for t in _imports(name) if t.startswith("boneage.") and _layer(t) > _layer(name) >= 0)
    assert not upward, f"{name} imports {upward}, which come after it in the layout"


def test_no_import_cycles_counting_imports_inside_functions() -> None:
    edges = {n: _internal_edges(n) for n in MODULES}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(edges[node]):
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep) :], dep])
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for n in sorted(edges):
        if n not in state:
            visit(n, [n])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_only_the_cli_imports_typer_or_rich(name: str) -> None:
    if name.startswith("boneage.cli") or name == "boneage.__main__":
        return
    front_end = sorted(t for t in _imports(name) if t.split(".")[0] in FRONT_END_ONLY)
    assert not front_end, f"{name} imports {front_end}; only boneage.cli may"


_LOADED = "import sys, {module}\nprint(sorted(m for m in {mods!r} if m in sys.modules))"


@pytest.mark.parametrize(
    "module",
    [
        "boneage.predict",
        "boneage.modelfile",
        "boneage.assessment",
        "boneage.report",
        "boneage.web",
        "boneage.evaluation",
        "boneage.data.shards",
        "boneage.cli",
    ],
)
def test_the_clinical_path_never_loads_the_training_stack(module: str) -> None:
    forbidden = TRAINING_MODULES if module == "boneage.cli" else (*TRAINING_MODULES, "typer")
    code = _LOADED.format(module=module, mods=forbidden)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]", f"{module} loads {result.stdout.strip()}"


def test_progress_goes_to_a_callback_the_front_end_or_logging(caplog: pytest.LogCaptureFixture) -> None:
    from contextlib import contextmanager

    from boneage.progress import tracker, use_display

    calls: list[tuple[str, int, int]] = []
    with tracker(lambda d, t: calls.append(("callback", d, t)), "ignored") as tick:
        tick(1, 2)
    with tracker(False, "silent") as tick:
        tick(1, 2)

    @contextmanager
    def display(description: str):  # type: ignore[no-untyped-def]
        yield lambda d, t: calls.append((description, d, t))

    with use_display(display), tracker(True, "shown") as tick:
        tick(2, 2)
    assert calls == [("callback", 1, 2), ("shown", 2, 2)]
    with caplog.at_level(logging.INFO, logger="boneage.progress"), tracker(True, "logged") as tick:
        for done in range(101):
            tick(done, 100)
    logged = [r.getMessage() for r in caplog.records]
    assert logged[0] == "logged: 0/100" and logged[-1] == "logged: 100/100" and len(logged) == 11


def test_old_module_paths_still_import_with_a_deprecation_warning() -> None:
    """0.12's public spellings keep working for one release (``boneage._compat``), each naming its new
    home."""
    code = (
        "import warnings\n"
        "warnings.simplefilter('error', DeprecationWarning)\n"
        "try:\n"
        "    import boneage.runtime\n"
        "except DeprecationWarning as w:\n"
        "    print('warned:', w)\n"
        "warnings.simplefilter('ignore')\n"
        "from boneage.inference import Predictor\n"
        "from boneage.predict import load_predictor\n"
        "from boneage.labels import read_labels\n"
        "import boneage.cache, boneage.data.shards, boneage.io\n"
        "same = boneage.cache is boneage.data.shards\n"
        "print(Predictor.load is load_predictor, same, read_labels.__module__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    moved = "boneage.runtime moved to boneage.predict in boneage 0.13; the old path goes in 0.14"
    assert lines[0] == f"warned: {moved}"
    assert lines[1] == "True True boneage.data.labels"
