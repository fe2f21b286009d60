"""Cold start: `hpcray --help` vs `ray job --help` (goal ≤ 0.15×), interleaved, after one warm-up run of each
(files in the page cache, as for a user's second command)."""

from __future__ import annotations

import argparse

from common import BIN, HEADER, Result, measure_pair, prepare_environment, timed_command

COMMAND = "python bench/bench_cli.py"


def results(runs: int = 7) -> list[Result]:
    ours, theirs = measure_pair(timed_command([str(BIN / "hpcray"), "--help"]),
                                timed_command([str(BIN / "ray"), "job", "--help"]), runs, warmup=1)
    return [Result("cold start: `hpcray --help` vs `ray job --help`", ours, theirs, "≤ 0.15×", COMMAND, 0.15)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    prepare_environment()
    rows = results(args.runs)
    print(HEADER)
    print("\n".join(r.row() for r in rows))


if __name__ == "__main__":
    main()
