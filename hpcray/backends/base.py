"""The small interface every place a Ray cluster can live implements (see submitit's executors)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Protocol

from hpcray.secrets import Secret

Progress = Callable[[str], None]
"""Receives one human-readable line per change while a backend waits (pod phases, head start-up)."""


@dataclass
class NodeStatus:
    name: str
    role: str  # "head" | "worker"
    phase: str  # Pending | Running | Ready | Terminating | Failed | ...
    reason: str = ""
    age_s: float = 0.0
    gpus: int = 0


@dataclass
class ClusterStatus:
    name: str
    backend: str  # "local" | "kuberay"
    exists: bool
    ready: bool
    address: str | None = None  # dashboard / Jobs API address, e.g. http://127.0.0.1:8265
    nodes: list[NodeStatus] = field(default_factory=list)
    expires_at: float | None = None  # epoch seconds, from --ttl
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


class Backend(Protocol):
    """A Ray cluster described by one profile. `submit` talks to `reach()` and cares about nothing else."""

    name: str

    def up(
        self,
        *,
        timeout: float,
        progress: Progress,
        env: dict[str, Secret | str] | None = None,
        ttl_s: float | None = None,
        down_on_failure: bool = False,
    ) -> ClusterStatus:
        """Create (or upgrade) the cluster and return once head and all workers are ready.

        ``env`` reaches every Ray process of the cluster (MLflow credentials), never argv or a file.
        Raises ClusterNotReady with a diagnosis on timeout; ``down_on_failure`` then removes what was created
        (a backend whose half-started cluster is useless, like the local one, always removes it).
        """
        ...

    def reach(self, progress: Progress) -> ContextManager[str]:
        """The Jobs API (dashboard) address of a cluster that is up, valid while the with-block runs (a backend may
        open a port-forward for it); ClusterError if the cluster is not up."""
        ...

    def status(self) -> ClusterStatus:
        ...

    def down(self, *, progress: Progress, timeout: float = 300.0) -> bool:
        """Remove the cluster and wait until nothing of it is left. False if there was nothing to remove."""
        ...
