"""Shared by the benchmarks: repeat a command, summarise, and print a Markdown row. Benchmarks are not tests."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "RAY_USAGE_STATS_ENABLED": "0"}


def prepare_environment() -> None:
    """Quiet commands, and hpcray's modules with their .pyc as a user's installed copy has them: a shell with
    PYTHONDONTWRITEBYTECODE would have every measured hpcray start recompile the checkout's modules (~50 ms)
    while Ray's, installed by pip, are compiled."""
    os.environ.update(QUIET)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "hpcray")], check=True,
                   stdout=subprocess.DEVNULL)


@dataclass
class Stats:
    samples: list[float]
    unit: str = "s"  # seconds, or "×" for a ratio such as bytes fetched over a log's size

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def cell(self) -> str:
        value = f"{self.median:.3f} s" if self.unit == "s" else f"{self.median:.3f}{self.unit}"
        return f"{value} (min {min(self.samples):.3f}, max {max(self.samples):.3f}, n={len(self.samples)})"


@dataclass
class Result:
    """One row of docs/BENCHMARKS.md: hpcray's figure, the usual way's, and the goal it is held to.

    ``limit`` bounds the ratio hpcray/usual (``on="ratio"``) or hpcray's median itself, in its unit (any other
    ``on``: "seconds", "value").
    """

    what: str
    ours: Stats
    theirs: Stats | None
    goal: str
    command: str
    limit: float | None = None
    on: str = "ratio"

    @property
    def ratio(self) -> float | None:
        return self.ours.median / self.theirs.median if self.theirs else None

    @property
    def met(self) -> bool | None:
        if self.limit is None:
            return None
        value = self.ratio if self.on == "ratio" else self.ours.median
        return value is not None and value <= self.limit

    def row(self) -> str:
        ratio = f"{self.ratio:.2f}×" if self.ratio is not None else "—"
        met = {None: "—", True: "met", False: "**missed**"}[self.met]
        return (f"| {self.what} | {self.ours.cell()} | {self.theirs.cell() if self.theirs else '—'} | {ratio} | "
                f"{self.goal} | {met} | `{self.command}` |")


HEADER = ("| what | hpcray | the usual way | ratio | goal | goal met | reproduce |\n"
          "|---|---|---|---|---|---|---|")


def row(what: str, ours: Stats, theirs: Stats | None, goal: str, command: str) -> str:
    return Result(what, ours, theirs, goal, command).row()


def timed(fn: Callable[[], float | None]) -> float:
    """fn returns its own measured seconds, or None to be timed whole."""
    start = time.perf_counter()
    own = fn()
    return own if own is not None else time.perf_counter() - start


def measure(fn: Callable[[], float | None], runs: int) -> Stats:
    return Stats([timed(fn) for _ in range(runs)])


def measure_pair(ours: Callable[[], float | None], theirs: Callable[[], float | None], runs: int,
                 warmup: int = 0) -> tuple[Stats, Stats]:
    """Interleaved (ours, theirs, ours, theirs, …) so that both sides run under the same load of the machine;
    ``warmup`` rounds of each are run first and not counted."""
    for _ in range(warmup):
        ours()
        theirs()
    a, b = [], []
    for _ in range(runs):
        a.append(timed(ours))
        b.append(timed(theirs))
    return Stats(a), Stats(b)


def timed_command(argv: list[str], env: dict[str, str] | None = None, check: bool = True) -> Callable[[], None]:
    def run() -> None:
        done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **QUIET, **(env or {})})
        if check and done.returncode != 0:
            raise SystemExit(f"benchmark command failed ({done.returncode}): {' '.join(argv)}\n{done.stderr[-2000:]}")

    return run


@contextlib.contextmanager
def local_head(address: str | None = None) -> Iterator[str]:
    """The Jobs API address of a Ray head: ``address`` as given, or a fresh head of the `local` profile started by
    hpcray's LocalBackend in a state dir of its own ($HPCRAY_STATE_DIR while it runs; a user's own
    `hpcray up -p local` is left alone) and taken down by PID afterwards (LocalBackend.down), whatever happens."""
    if address:
        yield address
        return
    sys.path.insert(0, str(REPO))
    from unittest import mock

    from hpcray.backends.local import LocalBackend
    from hpcray.profile import load_profile

    state = tempfile.mkdtemp(prefix="hpcray-bench-")
    say = lambda line: print(f"  head: {line}", file=sys.stderr)  # noqa: E731
    # The commands measured inherit this state dir too (the local profile's default MLflow store lives there).
    with mock.patch.dict(os.environ, {"HPCRAY_STATE_DIR": state, **QUIET}):
        # without Ray's token auth: the benchmarks reach the head by address with urllib and Ray's own CLI, as a Ray
        # of the user's own, and compare with numbers measured before hpcray turned the token on
        backend = LocalBackend(dataclasses.replace(load_profile("local"), auth="none"))  # binds its state dir now
        try:
            backend.up(timeout=300, progress=say)
            yield backend.address()
        finally:
            backend.down(progress=say)
            shutil.rmtree(state, ignore_errors=True)


def loadavg() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def machine() -> str:
    return f"{platform.node()}: {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}"
