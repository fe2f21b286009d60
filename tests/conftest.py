"""Shared test set-up: quiet environments, and the server fixtures that live in tests/fixtures_*.py."""

from __future__ import annotations

import os

import pytest

from hpcray.state import QUIET_ENV

os.environ.update(QUIET_ENV)

pytest_plugins: list[str] = ["tests.fixtures_tools", "tests.fixtures_slurm", "tests.fixtures_servers"]


@pytest.fixture(autouse=True, scope="session")
def _private_data_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    """`down` archives jobs under $XDG_DATA_HOME: the tests' own, never the user's ~/.local/share."""
    os.environ["XDG_DATA_HOME"] = str(tmp_path_factory.mktemp("xdg-data"))
