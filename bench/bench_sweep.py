"""An HPO-style sweep: N short jobs (`python -c 'print(1)'`) submitted and followed to their end, one after the
other, by hpcray and by a loop of `ray job submit`, against the same Ray head.

hpcray: `hpcray submit --address A -- python -c 'print(1)'` (submits, follows the logs until the job ends, exits
with the job's code); Ray: `ray job submit --address A -- python -c 'print(1)'` (submits, tails the logs until
they close). Both are what a shell loop over a sweep's points would run. The two sides alternate job by job so
that both see the same load; each side's total is the sum of its N jobs' wall times.
"""

from __future__ import annotations

import argparse

from bench_submit import ray_cli_env
from common import (BIN, HEADER, Result, Stats, loadavg, local_head, machine, prepare_environment, timed,
                    timed_command)

ENTRYPOINT = ["python", "-c", "print(1)"]  # both CLIs quote an argv after `--`: python -c 'print(1)'
SHOWN = "python -c 'print(1)'"


def results(address: str, jobs: int = 50) -> list[Result]:
    ours = timed_command([str(BIN / "hpcray"), "submit", "--address", address, "--", *ENTRYPOINT])
    theirs = timed_command([str(BIN / "ray"), "job", "submit", "--address", address, "--", *ENTRYPOINT],
                           env=ray_cli_env())
    a, b = [], []
    for i in range(jobs):
        a.append(timed(ours))
        b.append(timed(theirs))
        if (i + 1) % 10 == 0:
            print(f"  sweep: {i + 1}/{jobs} jobs each (hpcray {sum(a):.0f} s, ray {sum(b):.0f} s so far)",
                  flush=True)
    what = (f"HPO sweep: {jobs} jobs `{SHOWN}`, each submitted and followed to its end, one after the other; "
            f"**total {sum(a):.0f} s vs {sum(b):.0f} s** ({sum(a) / sum(b):.2f}×); cells: per job")
    return [Result(what, Stats(a), Stats(b), "—", f"python bench/bench_sweep.py --jobs {jobs}")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=50)
    ap.add_argument("--address", help="Jobs API of a running Ray head (default: start a local one)")
    args = ap.parse_args()
    prepare_environment()
    load = loadavg()
    with local_head(args.address) as address:
        rows = results(address, args.jobs)
    print(f"Machine: {machine()}; load average at start {load}; Ray head at {address}\n")
    print(HEADER)
    print("\n".join(r.row() for r in rows))


if __name__ == "__main__":
    main()
