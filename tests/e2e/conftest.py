"""Browser tests: register the ``e2e`` marker here so the suite runs without pyproject changes."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: drives the web page in headless Chromium")
