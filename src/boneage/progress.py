"""Progress reporting for long library loops without a terminal library: a ``(done, total)`` callback.

Library functions take ``progress``: a callback ``(done, total) -> None``, ``True`` (report it: through the
display a front end installed with :func:`use_display`, else as ``logging`` INFO lines every 10 %) or
``False``/``None`` (silent). The CLI installs a rich progress bar as the display, so code paths it cannot
hand a callback to (training's preprocessing, say) still draw one; the library itself never imports rich.
This module imports the standard library only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
"""Called with (done, total) as work completes."""

ProgressOption = bool | ProgressCallback | None
"""What a library function's ``progress`` argument accepts."""

Display = Callable[[str], AbstractContextManager[ProgressCallback]]
"""description → context manager yielding a callback (e.g. one drawing a progress bar while it is open)."""

_display: Display | None = None


@contextmanager
def use_display(display: Display | None) -> Iterator[None]:
    """Within the block, ``progress=True`` reports through ``display`` instead of logging."""
    global _display
    previous, _display = _display, display
    try:
        yield
    finally:
        _display = previous


def _silent(done: int, total: int) -> None:
    pass


class LogProgress:
    """A callback that logs ``description: done/total`` at every tenth of the way (and at the end)."""

    def __init__(self, description: str, logger: logging.Logger | None = None) -> None:
        self.description = description
        self.logger = logger or log
        self.step = -1

    def __call__(self, done: int, total: int) -> None:
        if total <= 0:
            return
        step = min(10, done * 10 // total)
        if step > self.step:
            self.step = step
            self.logger.info("%s: %d/%d", self.description, done, total)


@contextmanager
def tracker(progress: ProgressOption, description: str) -> Iterator[ProgressCallback]:
    """The ``(done, total)`` callback a loop should call, for a function's ``progress`` argument."""
    if callable(progress):
        yield progress
    elif not progress:
        yield _silent
    elif _display is not None:
        with _display(description) as callback:
            yield callback
    else:
        yield LogProgress(description)
