"""Submitting jobs: `hpcray submit` vs `ray job submit` against the same Ray head, interleaved run by run.

Rows: `--no-wait` (goal ≤ 0.5×), `--no-wait` with a small working dir (uploaded once, then found by hash), and
following a 1 s job to its end (goal ≤ 0.3×; Ray's CLI waits for its log tail, which closes ~5 s after the job),
of which the command's own part (goal ≤ 0.10 s), split at the head's marks: before it accepted the job, after the job
ended.
Without --address a local head is started with the project's LocalBackend (its own state dir) and taken down
afterwards.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Callable

from common import (BIN, HEADER, QUIET, REPO, Result, Stats, loadavg, local_head, machine, measure, measure_pair,
                    prepare_environment, timed, timed_command)

sys.path.insert(0, str(REPO))
COMMAND = "python bench/bench_submit.py"


def ray_cli_env() -> dict[str, str]:
    """Ray's job CLI sends its token only with RAY_AUTH_MODE=token; hpcray finds it like `ray start` does."""
    from hpcray.jobs import ray_token

    return {**QUIET, "RAY_AUTH_MODE": "token"} if ray_token() else dict(QUIET)


def times_on_head(address: str, submission_id: str) -> tuple[float, float]:
    """When the head accepted the job (start_time) and saw it end (end_time), in seconds since the epoch."""
    with urllib.request.urlopen(f"{address}/api/jobs/{submission_id}", timeout=30) as resp:
        info = json.load(resp)
    return info["start_time"] / 1000, info["end_time"] / 1000


def following(address: str, argv: list[str], env: dict[str, str] | None,
              parts: dict[str, list[float]]) -> Callable[[], float]:
    """Runs `argv --submission-id ID -- sleep 1`; returns its wall time and records what the command itself adds
    (wall − the job's accepted→ended time on the head), split at the head's two marks: before it accepted the job
    (the command's start, imports, checks, the submission) and after the job ended (noticing the end, the last of
    the log, the exit). The head runs on this machine, so both clocks are the same."""
    def run() -> float:
        sid = f"bench-{uuid.uuid4().hex[:12]}"
        started = time.time()
        wall = timed(timed_command([*argv, "--address", address, "--submission-id", sid, "--", "sleep", "1"], env=env))
        exited = time.time()
        accepted, ended = times_on_head(address, sid)
        parts["own"].append(wall - (ended - accepted))
        parts["before"].append(accepted - started)
        parts["after"].append(exited - ended)
        return wall

    return run


def results(address: str, runs: int = 5) -> list[Result]:
    hpcray, ray = str(BIN / "hpcray"), str(BIN / "ray")
    env = ray_cli_env()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp) / "wd"
        workdir.mkdir()
        (workdir / "main.py").write_text("print('hello from the working dir')\n")

        def pair(what: str, argv: list[str], goal: str, limit: float | None) -> None:
            ours, theirs = measure_pair(timed_command([hpcray, "submit", "--address", address, *argv]),
                                        timed_command([ray, "job", "submit", "--address", address, *argv], env=env),
                                        runs)
            rows.append(Result(what, ours, theirs, goal, COMMAND, limit))

        pair("`submit --no-wait -- echo hi`", ["--no-wait", "--", "echo", "hi"], "≤ 0.5×", 0.5)
        pair("`submit --no-wait --working-dir D -- python main.py`",
             ["--no-wait", "--working-dir", str(workdir), "--", "python", "main.py"], "—", None)
        ours_parts: dict[str, list[float]] = {"own": [], "before": [], "after": []}
        theirs_parts: dict[str, list[float]] = {"own": [], "before": [], "after": []}
        ours, theirs = measure_pair(following(address, [hpcray, "submit"], None, ours_parts),
                                    following(address, [ray, "job", "submit"], env, theirs_parts), runs)
        rows.append(Result("`submit -- sleep 1`, following to the end", ours, theirs, "≤ 0.3×", COMMAND, 0.3))
        rows.append(Result("… of which the command's own part (wall − the job's accepted→ended time on the head)",
                           Stats(ours_parts["own"]), Stats(theirs_parts["own"]), "≤ 0.10 s", COMMAND, 0.10,
                           on="seconds"))
        rows.append(Result("… of which before the head accepted the job (start, imports, checks, submission)",
                           Stats(ours_parts["before"]), Stats(theirs_parts["before"]), "—", COMMAND))
        rows.append(Result("… of which after the job ended (noticing the end, the rest of the log, exit)",
                           Stats(ours_parts["after"]), Stats(theirs_parts["after"]), "—", COMMAND))
        floor = measure(timed_command([str(BIN / "python"), "-c", "import click, yaml, urllib.request"]), runs)
        rows.append(Result("for reference: a Python that imports the libraries hpcray's CLI stands on (click, PyYAML, "
                           "urllib) and exits", floor, None, "—", COMMAND))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--address", help="Jobs API of a running Ray head (default: start a local one)")
    args = ap.parse_args()
    prepare_environment()
    load = loadavg()
    with local_head(args.address) as address:
        rows = results(address, args.runs)
    print(f"Machine: {machine()}; load average at start {load}; Ray head at {address}\n")
    print(HEADER)
    print("\n".join(r.row() for r in rows))


if __name__ == "__main__":
    main()
