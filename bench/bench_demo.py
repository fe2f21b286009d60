"""`make demo` wall time after install (goal ≤ 60 s): `hpcray run --profile local training hpo`, the demo's
command, in a fresh state dir each run (a new Ray head, a new MLflow sqlite store), up to everything torn down.

Besides the total, each run's output lines are time-stamped as they arrive, which splits the wall time into the
head coming up, each job (submitted → its end noticed) and the teardown.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from unittest import mock

from common import BIN, HEADER, QUIET, REPO, Result, Stats, prepare_environment

sys.path.insert(0, str(REPO))
COMMAND = "HPCRAY_STATE_DIR=$(mktemp -d) make demo"
JOBS = ("training", "hpo")
MARKS = [("head up (until its job agent listens)", re.compile(r"job agent listens after")),
         *((f"job `{job}` (from the previous mark to its end noticed)", re.compile(rf"^job {job}: (SUCCEEDED|FAILED|STOPPED)"))
           for job in JOBS),
         ("teardown (summary printed, exit)", None)]  # to the end of the command


def once() -> tuple[float, dict[str, float]]:
    """The command's wall time, and the seconds between successive marks of its output."""
    state = tempfile.mkdtemp(prefix="hpcray-bench-demo-")
    env = {**os.environ, **QUIET, "HPCRAY_STATE_DIR": state}
    try:
        start = time.perf_counter()
        proc = subprocess.Popen([str(BIN / "hpcray"), "run", "--profile", "local", *JOBS], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        stamped = [(time.perf_counter() - start, line.rstrip()) for line in proc.stdout]
        code = proc.wait()
        wall = time.perf_counter() - start
        if code != 0:
            tail = "\n".join(line for _, line in stamped[-30:])
            raise SystemExit(f"`hpcray run --profile local {' '.join(JOBS)}` failed ({code}):\n{tail}")
    finally:
        leftovers(state)
        shutil.rmtree(state, ignore_errors=True)
    phases, last = {}, 0.0
    for name, pattern in MARKS:
        at = wall if pattern is None else next((t for t, line in stamped if pattern.search(line)), None)
        if at is None:
            return wall, {}  # the output changed: report the total only
        phases[name], last = at - last, at
    return wall, phases


def leftovers(state: str) -> None:
    """`hpcray run` tears its head down itself; should anything of it be left, stop it by PID (LocalBackend.down)."""
    from hpcray.backends.local import LocalBackend
    from hpcray.profile import load_profile

    with mock.patch.dict(os.environ, {"HPCRAY_STATE_DIR": state}):
        backend = LocalBackend(load_profile("local"))
    if backend.down(progress=lambda line: print(f"  demo leftover: {line}", file=sys.stderr)):
        print("  demo: `hpcray run` left its local head behind; stopped it", file=sys.stderr)


def results(runs: int = 3) -> list[Result]:
    walls: list[float] = []
    phases: dict[str, list[float]] = {}
    for i in range(runs):
        wall, split = once()
        walls.append(wall)
        for name, seconds in split.items():
            phases.setdefault(name, []).append(seconds)
        print(f"  demo: run {i + 1}/{runs}: {wall:.1f} s ({', '.join(f'{k}: {v:.1f} s' for k, v in split.items())})",
              file=sys.stderr, flush=True)
    rows = [Result("`make demo` (after install): `hpcray run --profile local training hpo`", Stats(walls), None,
                   "≤ 60 s", COMMAND, 60.0, on="seconds")]
    rows += [Result(f"… of which {name}", Stats(samples), None, "—", COMMAND)
             for name, samples in phases.items() if len(samples) == runs]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    prepare_environment()
    rows = results(args.runs)
    print(HEADER)
    print("\n".join(r.row() for r in rows))


if __name__ == "__main__":
    main()
