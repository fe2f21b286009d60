"""Cold start: `hpcray --help` vs `ray job --help` (goal ≤ 0.15×)."""

from __future__ import annotations

import argparse

from common import BIN, HEADER, measure, row, timed_command


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    ours = measure(timed_command([str(BIN / "hpcray"), "--help"]), args.runs)
    theirs = measure(timed_command([str(BIN / "ray"), "job", "--help"]), args.runs)
    print(HEADER)
    print(row("cold start: `--help`", ours, theirs, "≤ 0.15×", "python bench/bench_cli.py"))


if __name__ == "__main__":
    main()
