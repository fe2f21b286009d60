"""The interface every place a Ray cluster can live implements (see submitit's executors), and what it returns.

Callers (hpcray.flows) never ask which backend they hold: the interface covers planning (`--dry-run`), bringing up,
access to the Jobs API, the dashboard, the MLflow tracking URI, status and teardown.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Protocol

if TYPE_CHECKING:
    from hpcray.accounting import Usage
    from hpcray.http import Endpoint
    from hpcray.tracking import Credentials

Progress = Callable[[str], None]
"""Receives one human-readable line per change while a backend works (pod phases, head start-up)."""


@dataclass
class Step:
    """One thing a command would do, in words (secrets shown as ******), with the command it would run, if any."""

    what: str
    argv: list[str] | None = None
    stdin: str | None = None  # what that command would read on stdin (helm's values)


@dataclass
class Plan:
    """What `up` or `down` would do, computed without changing anything: all that `--dry-run` prints."""

    cluster: str
    backend: str
    steps: list[Step]
    expires_at: float | None = None  # epoch seconds, from --ttl

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class NodeStatus:
    name: str
    role: str  # "head" | "worker"
    phase: str  # Pending | Running | Ready | Terminating | Failed | ...
    reason: str = ""
    age_s: float = 0.0
    gpus: int = 0
    created_at: float | None = None  # epoch seconds: the pod created, the local head started
    started_at: float | None = None  # epoch seconds: running (a pod: its SLURM job running, as interLink reports)
    ended_at: float | None = None  # epoch seconds: its containers all terminated (a pod's SLURM job ended)
    time_limit_s: float | None = None  # its SLURM --time; None: no limit known


@dataclass
class ReleaseStatus:
    """The Helm release of a KubeRay cluster."""

    status: str  # deployed | failed | pending-install | ...
    revision: int
    chart: str = ""
    updated: str = ""


@dataclass
class HeadProcess:
    """The local head's process: what `down` stops, and where its log is."""

    pid: int
    temp_dir: str
    ports: dict[str, int]
    log: str


@dataclass
class ClusterStatus:
    name: str
    backend: str  # "local" | "kuberay"
    exists: bool
    ready: bool
    node_kind: str = "Ray node"  # what `nodes` are: "Ray node" (local) or "pod" (kuberay)
    nodes: list[NodeStatus] = field(default_factory=list)
    expires_at: float | None = None  # epoch seconds, from --ttl
    address: str | None = None  # a dashboard / Jobs API address reachable from here now, e.g. http://127.0.0.1:8265
    tracking_uri: str | None = None  # where the cluster's jobs log to MLflow
    namespace: str | None = None  # kuberay: the release's namespace
    release: ReleaseStatus | None = None  # kuberay
    expected_workers: int = 0  # kuberay: worker pods the RayCluster asks for
    service: str | None = None  # kuberay: the head's Service (dashboard port 8265 inside the cluster)
    head: HeadProcess | None = None  # local
    usage: Usage | None = None  # queue wait, run time and GPU-hours so far (hpcray.flows.status)
    ends_at: float | None = None  # epoch seconds: the first pod's SLURM allocation ends (hpcray.walltime)
    replaced: list[NodeStatus] = field(default_factory=list)  # kuberay: pods that ended, which KubeRay deleted and
    # made new ones for (phase "Deleted", reason: why they ended, ended_at: when), from its Events on the RayCluster

    def time_left_s(self, now: float | None = None) -> float | None:
        """Seconds until the allocation ends (negative once it has); None when no end is known."""
        return None if self.ends_at is None else self.ends_at - (time.time() if now is None else now)

    def to_json(self) -> dict[str, Any]:
        left = self.time_left_s()
        return {**asdict(self), "time_left_s": None if left is None else round(left, 1)}


class Backend(Protocol):
    """A Ray cluster described by one profile."""

    name: str

    def plan(self, *, credentials: Credentials | None = None, ttl_s: float | None = None, warn: Progress,
             preflight: bool = True, access: str = "auto") -> Plan:
        """What `up` would do with these arguments, checked as far as possible without changing anything (the
        values rendered and checked against KubeRay's CRD; the preflight against interLink's virtual node; the
        local head that would start)."""
        ...

    def up(self, *, timeout: float, progress: Progress, credentials: Credentials | None = None,
           ttl_s: float | None = None, down_on_failure: bool = False, access: str = "auto",
           preflight: bool = True) -> ClusterStatus:
        """Create (or upgrade) the cluster and return once head and all workers are ready (where the pods' Ready
        does not say so, interLink's, once the Jobs API answers through ``access`` and every Ray node is alive).

        ``preflight``: first check that the place the pods go can take them (PreflightFailed, nothing installed).

        ``credentials`` go where hpcray.tracking.credential_plan says (a Kubernetes Secret the pods reference, the
        local head's environment), never argv or a file. Raises ClusterNotReady with a diagnosis on timeout;
        ``down_on_failure`` then removes what was created (a backend whose half-started cluster is useless, like the
        local one, always removes it).
        """
        ...

    def access(self, progress: Progress, mode: str = "auto") -> ContextManager[Endpoint]:
        """The Jobs API (dashboard) of a cluster that is up, valid while the with-block runs, reached the way
        ``mode`` says (the profile's `access` values: auto, port-forward, service-proxy, or a URL): the backend opens
        whatever the way there needs (a port-forward to the head pod) and closes it afterwards. The endpoint carries
        the cluster's Ray token where its head runs with token authentication. ClusterError if the cluster is not
        up, AccessRefused if ``mode`` cannot work for it."""
        ...

    def dashboard(self, *, port: int, progress: Progress, on_ready: Callable[[str], None],
                  access: str = "auto") -> None:
        """Make the dashboard reachable on this machine and call ``on_ready(url)``; where that needs a forward
        (kuberay: 127.0.0.1:port → the head's 8265) serve it until Ctrl-C."""
        ...

    def tracking_uri(self) -> str | None:
        """Where jobs on this cluster log to MLflow (a server the backend started, or the profile's)."""
        ...

    def results_root(self) -> str:
        """A directory on the head under which each job gets its own results directory (HPCRAY_RESULTS_DIR), which
        `down` archives before the cluster goes."""
        ...

    def status(self) -> ClusterStatus:
        ...

    def plan_down(self) -> Plan:
        """What `down` would do; changes nothing."""
        ...

    def down(self, *, progress: Progress, timeout: float = 300.0) -> bool:
        """Remove the cluster and wait until nothing of it is left. False if there was nothing to remove."""
        ...
