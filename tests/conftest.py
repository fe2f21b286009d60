"""Shared test set-up: quiet environments, and the server fixtures that live in tests/fixtures_*.py."""

from __future__ import annotations

import os

from hpcray.state import QUIET_ENV

os.environ.update(QUIET_ENV)

pytest_plugins: list[str] = ["tests.fixtures_tools", "tests.fixtures_slurm", "tests.fixtures_servers"]
