"""One exception type for everything a user can get wrong, so every front end can report it the same way."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class BoneAgeInputError(ValueError):
    """Bad input from a user: a one-line message that names the file and the problem.

    The CLI turns it into exit code 2 and the web app into a 4xx response.
    """

    def __init__(self, problem: str, source: str | Path | None = None) -> None:
        self.problem = problem
        self.source = str(source) if source is not None else None
        message = f"{self.source}: {problem}" if self.source else problem
        super().__init__(message.replace("\n", " "))


def exit_on_user_error(fn: F) -> F:
    """CLI commands: a ``BoneAgeInputError`` becomes one line on stderr and exit code 2, never a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BoneAgeInputError as exc:
            import typer
            from rich.console import Console

            Console(stderr=True).print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]
