"""Where hpcray keeps what it must remember between commands (local heads, port-forwards, locks)."""

from __future__ import annotations

import os
from pathlib import Path

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
