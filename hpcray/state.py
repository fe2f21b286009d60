"""Where hpcray keeps what it must remember between commands (local heads, port-forwards, locks)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Callable, Iterator

QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
}
"""Set in every environment hpcray builds: `import mlflow` and Ray otherwise call outside hosts."""


def state_root() -> Path:
    root = os.environ.get("HPCRAY_STATE_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "hpcray"
    )
    return Path(root)


def state_dir(cluster: str) -> Path:
    """Where one cluster's state lives; made private (0700) by the first command that writes there, so looking
    up a cluster that was never started leaves nothing behind."""
    return state_root() / cluster


def make_private(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def write_atomic(path: Path, data: str | bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` in one step (a reader sees the old or the new file, never half), mode `mode`;
    its directory is made private if missing."""
    make_private(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


@contextlib.contextmanager
def locked(path: Path, holder: str, waiting: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `path` while the block runs; `holder` names this command in words (e.g. "`hpcray
    up` of lc") and is recorded with this pid for whoever waits. A second process waits for the lock; `waiting`, when
    given, is first told for whom: "waiting for `hpcray up` of lc (pid N) to finish; …". Released by the kernel when
    the process dies, so a crashed command never leaves it held."""
    make_private(path.parent)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting is not None:
                fh.seek(0)
                pid, _, who = fh.read().partition(" ")
                pid = pid or "?"
                waiting(f"waiting for {who or 'another hpcray command'} (pid {pid}) to finish; Ctrl-C it there, or "
                        f"`kill {pid}`")
            fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()} {holder}")
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()
