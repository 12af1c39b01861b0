"""One exception type for everything a user can get wrong, so every front end can report it the same way."""

from __future__ import annotations

from pathlib import Path


class BoneAgeInputError(ValueError):
    """Bad input from a user: a one-line message that names the file and the problem.

    The CLI turns it into exit code 2 and the web app into a 4xx response.
    """

    def __init__(self, problem: str, source: str | Path | None = None) -> None:
        self.problem = problem
        self.source = str(source) if source is not None else None
        message = f"{self.source}: {problem}" if self.source else problem
        super().__init__(message.replace("\n", " "))
