"""Shared by the benchmarks: repeat a command, summarise, and print a Markdown row. Benchmarks are not tests."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "RAY_USAGE_STATS_ENABLED": "0"}


@dataclass
class Stats:
    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def cell(self) -> str:
        return f"{self.median:.3f} s (min {min(self.samples):.3f}, max {max(self.samples):.3f}, n={len(self.samples)})"


def measure(fn: Callable[[], float | None], runs: int) -> Stats:
    """fn returns its own measured seconds, or None to be timed whole."""
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        own = fn()
        samples.append(own if own is not None else time.perf_counter() - start)
    return Stats(samples)


def timed_command(argv: list[str], env: dict[str, str] | None = None, check: bool = True) -> Callable[[], None]:
    def run() -> None:
        done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **QUIET, **(env or {})})
        if check and done.returncode != 0:
            raise SystemExit(f"benchmark command failed ({done.returncode}): {' '.join(argv)}\n{done.stderr[-2000:]}")

    return run


def row(what: str, ours: Stats, theirs: Stats | None, goal: str, command: str) -> str:
    ratio = f"{ours.median / theirs.median:.2f}×" if theirs else "—"
    return f"| {what} | {ours.cell()} | {theirs.cell() if theirs else '—'} | {ratio} | {goal} | `{command}` |"


HEADER = ("| what | hpcray | the usual way | ratio | goal | reproduce |\n"
          "|---|---|---|---|---|---|")


def machine() -> str:
    return f"{platform.node()}: {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}"
