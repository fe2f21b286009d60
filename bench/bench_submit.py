"""Submitting jobs: `hpcray submit` vs `ray job submit` against the same Ray head.

Rows: `--no-wait` (goal ≤ 0.5×), `--no-wait` with a small working dir (uploaded once, then found by hash), and
following a 1 s job to its end (goal ≤ 0.3×; Ray's CLI waits for its log tail, which closes ~5 s after the job).
Without --address a local head is started with the project's LocalBackend and taken down afterwards.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from common import BIN, HEADER, REPO, QUIET, machine, measure, row, timed_command

sys.path.insert(0, str(REPO))


@contextmanager
def ray_head(address: str | None) -> Iterator[str]:
    if address:
        yield address
        return
    from hpcray.backends import backend_for
    from hpcray.profile import load_profile

    backend = backend_for(load_profile("local"))
    backend.up(timeout=120, progress=lambda line: print(line, file=sys.stderr))
    try:
        yield backend.address()
    finally:
        backend.down(progress=lambda line: print(line, file=sys.stderr))


def ray_cli_env() -> dict[str, str]:
    """Ray's job CLI sends its token only with RAY_AUTH_MODE=token; hpcray finds it like `ray start` does."""
    from hpcray.jobs import ray_token

    return {**QUIET, "RAY_AUTH_MODE": "token"} if ray_token() else dict(QUIET)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--address", help="Jobs API of a running Ray head (default: start a local one)")
    args = ap.parse_args()
    hpcray, ray = str(BIN / "hpcray"), str(BIN / "ray")
    os.environ.update(QUIET)
    with ray_head(args.address) as address, tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp) / "wd"
        workdir.mkdir()
        (workdir / "main.py").write_text("print('hello from the working dir')\n")
        env = ray_cli_env()
        rows = []

        def pair(what: str, ours_argv: list[str], theirs_argv: list[str], goal: str) -> None:
            ours = measure(timed_command([hpcray, "submit", "--address", address, *ours_argv]), args.runs)
            theirs = measure(timed_command([ray, "job", "submit", "--address", address, *theirs_argv], env=env),
                             args.runs)
            rows.append(row(what, ours, theirs, goal, "python bench/bench_submit.py"))

        pair("`submit --no-wait -- echo hi`", ["--no-wait", "--", "echo", "hi"], ["--no-wait", "--", "echo", "hi"],
             "≤ 0.5×")
        pair("`submit --no-wait --working-dir D -- python main.py`",
             ["--no-wait", "--working-dir", str(workdir), "--", "python", "main.py"],
             ["--no-wait", "--working-dir", str(workdir), "--", "python", "main.py"], "—")
        pair("`submit -- sleep 1`, following to the end", ["--", "sleep", "1"], ["--", "sleep", "1"], "≤ 0.3×")
    print(f"Machine: {machine()}; Ray head at {address}\n")
    print(HEADER)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
