"""Walltime, as SLURM counts it: the `--time` a pod's batch job gets, when the allocation ends, what is left of it,
whether a job's `max_runtime` fits, and when hpcray stops a job so that it can checkpoint first. Pure functions.

SLURM ends every pod at its `--time` (interLink's SLURM plugin then reports the container terminated with reason
SlurmJobTimeout), counted from the job's start, which the plugin reports as the container's `running.startedAt`. A
cluster ends with its first pod to end: the head takes the Jobs API with it, a worker its share of the trials.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable

from hpcray.waiting import words

TIMEOUT_REASON = "SlurmJobTimeout"
"""The terminated reason interLink's SLURM plugin gives a container whose job reached its time limit."""

_SLURM_TIME = re.compile(r"^(?:(?P<days>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?"
                         r"|(?P<a>\d+)(?::(?P<b>\d+)(?::(?P<c>\d+))?)?)$")
_UNLIMITED = ("UNLIMITED", "INFINITE")


def parse_slurm_time(text: str) -> float | None:
    """A SLURM time limit in seconds, None for no limit ("UNLIMITED", "INFINITE" or 0, as sbatch takes them).

    Formats (sbatch --time): M, M:S, H:M:S, D-H, D-H:M, D-H:M:S. ValueError whose message is the user's.
    """
    value = str(text).strip()
    if value.upper() in _UNLIMITED:
        return None
    m = _SLURM_TIME.match(value)
    if not m:
        raise ValueError(f"{text!r} is not a SLURM time limit; write minutes (90), M:S, H:M:S (04:00:00), D-H, "
                         "D-H:M, D-H:M:S (1-12:00:00) or UNLIMITED")
    if m["days"] is not None:
        seconds = int(m["days"]) * 86400 + int(m["dh"]) * 3600 + int(m["dm"] or 0) * 60 + int(m["ds"] or 0)
    elif m["c"] is not None:
        seconds = int(m["a"]) * 3600 + int(m["b"]) * 60 + int(m["c"])
    else:
        seconds = int(m["a"]) * 60 + int(m["b"] or 0)
    return float(seconds) if seconds else None


def time_flag(flags: str | Iterable[str]) -> str | None:
    """The value of the last `--time`/`-t` among sbatch flags (the plugin keeps the last of a key), else None."""
    words = shlex.split(flags) if isinstance(flags, str) else [w for f in flags for w in shlex.split(f)]
    found = None
    for i, word in enumerate(words):
        if word.startswith("--time="):
            found = word.split("=", 1)[1]
        elif word in ("--time", "-t") and i + 1 < len(words):
            found = words[i + 1]
        elif word.startswith("-t") and len(word) > 2 and not word.startswith("--"):
            found = word[2:]
    return found


def time_limit(flags: str | Iterable[str]) -> float | None:
    """Seconds a pod with these sbatch flags may run; None without a limit (or with the site's default)."""
    value = time_flag(flags)
    return None if value is None else parse_slurm_time(value)


def allocation_end(started_at: float | None, limit_s: float | None) -> float | None:
    """When SLURM ends a job that started at `started_at` (epoch seconds) with this limit; None if unknown."""
    if started_at is None or limit_s is None:
        return None
    return started_at + limit_s


def cluster_end(ends: Iterable[float | None]) -> float | None:
    """A cluster ends with its first pod to end (known ends only); None when no pod's end is known."""
    known = [e for e in ends if e is not None]
    return min(known) if known else None


def stop_at(ends_at: float | None, margin_s: float) -> float | None:
    """When hpcray stops a job gracefully: `margin_s` before the allocation ends."""
    return None if ends_at is None else ends_at - margin_s


def fit_problem(job: str, max_runtime_s: float | None, left_s: float | None, *, max_runtime: str = "") -> str | None:
    """Why a job that may run `max_runtime_s` won't fit the `left_s` seconds left, or None when it fits (or either
    is unknown)."""
    if max_runtime_s is None or left_s is None or max_runtime_s <= left_s:
        return None
    shown = max_runtime or words(max_runtime_s)
    return (f"job {job} has max_runtime {shown} but only {words(max(left_s, 0.0))} of the allocation is left before "
            f"hpcray stops it")


def left_words(ends_at: float | None, now: float) -> str:
    """'walltime 23m left', 'walltime ended 2m ago', or 'no walltime known'."""
    if ends_at is None:
        return "no walltime known"
    left = ends_at - now
    return f"walltime {words(left)} left" if left > 0 else f"walltime ended {words(-left)} ago"
