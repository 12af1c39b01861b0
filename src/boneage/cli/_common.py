"""What every ``boneage`` command shares: the consoles, user errors as exit code 2, and progress bars."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import Any, TypeVar

import typer
from rich.console import Console

from boneage.errors import BoneAgeInputError
from boneage.progress import ProgressCallback, use_display

F = TypeVar("F", bound=Callable[..., Any])

err = Console(stderr=True)
out = Console()


@contextmanager
def rich_progress(description: str) -> Iterator[ProgressCallback]:
    """A transient rich progress bar on stderr, driven by the library's ``(done, total)`` callback."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    columns = (
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def exit_on_user_error(fn: F) -> F:
    """CLI commands: a ``BoneAgeInputError`` becomes one line on stderr and exit code 2, never a traceback.

    While the command runs, library code called with ``progress=True`` draws :func:`rich_progress` bars.
    """

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with use_display(rich_progress):
                return fn(*args, **kwargs)
        except BoneAgeInputError as exc:
            Console(stderr=True).print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]
