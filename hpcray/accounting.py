"""What a job and a cluster cost: queue wait, run time and GPU-hours, from the times of each allocation (a pod's
SLURM job, the local head). Pure arithmetic: the backends read the times (hpcray.backends), the flows log the result
(hpcray.tracking.log_usage) and the CLI shows it.

- An allocation's queue wait: created → running (a pod: its creationTimestamp → the container start interLink's
  SLURM plugin reports once SLURM runs the job, ~10 s late; the local head: 0).
- Its time held: running → ended, or → now while it runs. Its GPU-hours: GPUs × time held / 3600.
- A cluster: the longest queue wait of its allocations (it is whole only once the last one runs), the time from the
  first allocation running to the last ending (or now), and the sum of their GPU-hours.
- A job: its run time in Ray (start → end), the GPU-hours of the allocations while it ran (their GPUs × the overlap),
  and the queue wait of the cluster it ran on.

As MLflow metrics: PREFIX + the Usage's field names for the job, CLUSTER_PREFIX + them for its cluster (the README's
"Accounting" says what each means).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Iterable, Protocol

from hpcray.waiting import words

PREFIX, CLUSTER_PREFIX = "hpcray.", "hpcray.cluster."


class Allocation(Protocol):
    """One allocation's times, epoch seconds (hpcray.backends.base.NodeStatus has them)."""

    gpus: int
    created_at: float | None
    started_at: float | None
    ended_at: float | None


@dataclass(frozen=True)
class Usage:
    queue_wait_s: float | None  # None: no allocation known
    run_time_s: float | None  # None: nothing ran (yet)
    gpus: int
    gpu_hours: float

    def metrics(self, prefix: str) -> dict[str, float]:
        """As MLflow metrics named prefix + the field's name; an unknown time is left out."""
        values = {"queue_wait_s": self.queue_wait_s, "run_time_s": self.run_time_s, "gpus": float(self.gpus),
                  "gpu_hours": self.gpu_hours}
        return {prefix + k: round(float(v), 6) for k, v in values.items() if v is not None}

    def words(self) -> str:
        """`queued 12s; ran 3m5s; 2 GPUs; 0.103 GPU-hours`."""
        parts = [f"queued {words(self.queue_wait_s)}" if self.queue_wait_s is not None else "",
                 f"ran {words(self.run_time_s)}" if self.run_time_s is not None else "not running",
                 f"{self.gpus} GPU{'' if self.gpus == 1 else 's'}", f"{self.gpu_hours:.3f} GPU-hours"]
        return "; ".join(p for p in parts if p)


def queue_wait_s(a: Allocation, now: float) -> float | None:
    """Created → running; while still queued, created → now."""
    if a.created_at is None:
        return None
    return max(0.0, (a.started_at if a.started_at is not None else now) - a.created_at)


def held_s(a: Allocation, now: float, since: float | None = None, until: float | None = None) -> float:
    """Seconds the allocation was running, within [since, until] where given."""
    if a.started_at is None:
        return 0.0
    start = a.started_at if since is None else max(a.started_at, since)
    end = a.ended_at if a.ended_at is not None else now
    end = end if until is None else min(end, until)
    return max(0.0, end - start)


def cluster_usage(allocations: Iterable[Allocation], now: float) -> Usage:
    allocs = list(allocations)
    waits = [w for a in allocs if (w := queue_wait_s(a, now)) is not None]
    started = [a for a in allocs if a.started_at is not None]
    run = (max(a.ended_at if a.ended_at is not None else now for a in started)
           - min(a.started_at for a in started if a.started_at is not None)) if started else None
    return Usage(queue_wait_s=max(waits) if waits else None, run_time_s=max(0.0, run) if run is not None else None,
                 gpus=sum(a.gpus for a in started if a.ended_at is None),
                 gpu_hours=sum(a.gpus * held_s(a, now) for a in allocs) / 3600)


def job_usage(allocations: Iterable[Allocation], start: float | None, end: float | None, now: float) -> Usage:
    """A job that ran from `start` to `end` (epoch seconds; None: unknown, or still running) on these allocations."""
    allocs = list(allocations)
    cluster = cluster_usage(allocs, now)
    if start is None:
        return Usage(cluster.queue_wait_s, None, 0, 0.0)
    until = end if end is not None else now
    held = [a for a in allocs if held_s(a, now, start, until) > 0]
    return Usage(queue_wait_s=cluster.queue_wait_s, run_time_s=max(0.0, until - start),
                 gpus=sum(a.gpus for a in held),
                 gpu_hours=sum(a.gpus * held_s(a, now, start, until) for a in held) / 3600)


def gpus_in_flags(flags: str) -> int | None:
    """The GPUs sbatch flags ask for (`--gres=gpu:2`, `--gres=gpu:a100:2,nic:1`, `--gpus 2`, `-G a100:2`,
    `--gpus-per-node=2`; later flags win, as interLink's SLURM plugin de-duplicates them), None when none do."""
    try:
        words = shlex.split(flags)
    except ValueError:
        words = flags.split()
    found: dict[str, int] = {}
    for i, word in enumerate(words):
        key, eq, value = word.partition("=")
        key = "--gpus" if key == "-G" else key
        if key not in ("--gres", "--gpus", "--gpus-per-node"):
            continue
        if not eq:
            value = words[i + 1] if i + 1 < len(words) else ""
        count = _gres_gpus(value) if key == "--gres" else _count(value.rsplit(":", 1)[-1])
        if count is not None:
            found["--gpus" if key == "--gpus-per-node" else key] = count
    return max(found.values()) if found else None


def _gres_gpus(value: str) -> int | None:
    """`gpu`, `gpu:2`, `gpu:a100:2` among comma-separated GRES."""
    for gres in value.split(","):
        parts = gres.split(":")
        if parts[0] == "gpu":
            count = _count(parts[-1]) if len(parts) > 1 else None
            return 1 if count is None else count  # `gpu` and `gpu:a100` ask for one
    return None


def _count(text: str) -> int | None:
    return int(text) if text.isdigit() else None
