"""Layering: the CLI (``boneage.cli``, typer + rich) is a package over the library, never the other way round.

No library module (``src/boneage/*.py``) imports typer, rich or ``boneage.cli`` (``__main__`` excepted: it
runs the CLI), not even inside a function, and importing a library module in a fresh interpreter leaves
typer unloaded.
"""

from __future__ import annotations

import ast
import logging
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "boneage"
FRONT_END_ONLY = {"typer", "rich"}
LIBRARY = sorted(PACKAGE.glob("*.py"))


def _imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` statement anywhere in the file names (absolute, as written)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _is_cli(name: str) -> bool:
    return name == "boneage.cli" or name.startswith("boneage.cli.")


def test_the_cli_is_a_package() -> None:
    assert (PACKAGE / "cli" / "__init__.py").is_file()
    assert not (PACKAGE / "cli.py").exists()
    assert LIBRARY and all(p.parent == PACKAGE for p in LIBRARY)


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: p.name)
def test_library_module_imports_no_typer_rich_or_cli(path: Path) -> None:
    imported = _imported_modules(path)
    entry_point = path.name == "__main__.py"  # ``python -m boneage`` runs the CLI: it may import boneage.cli
    front_end = sorted(
        name
        for name in imported
        if name.split(".")[0] in FRONT_END_ONLY or (_is_cli(name) and not entry_point)
    )
    assert not front_end, f"{path.name} imports {', '.join(front_end)}; only boneage/cli/ may"


@pytest.mark.parametrize("module", ["boneage.data", "boneage.cache", "boneage.experiments", "boneage.errors"])
def test_importing_a_library_module_does_not_load_typer(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "print(sorted(m for m in ('typer', 'boneage.cli') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]", f"{module} loads {result.stdout.strip()}"


def test_light_library_modules_do_not_load_rich() -> None:
    """The cheap modules the CLI imports at start-up stay free of terminal libraries."""
    code = (
        "import sys, boneage.cache, boneage.experiments, boneage.errors, boneage.progress\n"
        "print(sorted(m for m in ('typer', 'rich') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


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
