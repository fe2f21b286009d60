"""Time, written once: durations as users write them, deadlines, and polling until something holds."""

from __future__ import annotations

import concurrent.futures
import re
import threading
import time
from typing import Any, Callable, TypeVar

T = TypeVar("T")

_DURATION = re.compile(r"^(\d+(\.\d+)?)(s|m|h|d)$")


def parse_duration(text: str) -> float:
    """'90s', '30m', '6h', '2d' → seconds. ValueError whose message is the one users see (callers add where)."""
    m = _DURATION.match(str(text).strip())
    if not m:
        raise ValueError(f"{text!r} is not a duration; write e.g. 90s, 30m, 6h or 2d")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(3)]


def words(seconds: float) -> str:
    """A duration as users read it: 90 → '1m30s', 5400 → '1h30m', 200000 → '2d7h33m' (seconds only under an hour)."""
    s = int(round(seconds))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (s, "s")]
    while len(parts) > 1 and parts[0][0] == 0:
        parts.pop(0)
    if days or hours:
        parts = [p for p in parts if p[1] != "s"]
    while len(parts) > 1 and parts[-1][0] == 0:
        parts.pop()
    return "".join(f"{n}{unit}" for n, unit in parts)


class Deadline:
    """A point in monotonic time: `left`, `passed`, and `sleep` that never sleeps past it."""

    def __init__(self, seconds: float) -> None:
        self.start = time.monotonic()
        self.at = self.start + seconds

    @property
    def left(self) -> float:
        return max(0.0, self.at - time.monotonic())

    @property
    def passed(self) -> bool:
        return time.monotonic() >= self.at

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, min(seconds, self.left)))


def poll_until(check: Callable[[], T | None], *, timeout: float, interval: float = 0.2,
               max_interval: float | None = None, every: Callable[[Deadline], None] | None = None) -> T | None:
    """Call `check` until it returns something truthy (returned) or `timeout` passes (None). The interval grows by
    half each round up to `max_interval` (default: it stays fixed); `every` is called between rounds."""
    deadline = Deadline(timeout)
    while True:
        found = check()
        if found:
            return found
        if deadline.passed:
            return None
        if every is not None:
            every(deadline)
        deadline.sleep(interval)
        if max_interval is not None:
            interval = min(interval * 1.5, max_interval)


def in_background(name: str, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
    """fn(*args) in a daemon thread; its result (or exception) in the Future. Not a pool: whoever gives up waiting
    (Ctrl-C, a time limit) goes on at once, and the process never waits at exit for work still hanging."""
    done: concurrent.futures.Future[T] = concurrent.futures.Future()

    def work() -> None:
        try:
            done.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the Future
            done.set_exception(exc)

    threading.Thread(target=work, daemon=True, name=name).start()
    return done
