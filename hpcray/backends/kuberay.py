"""A Ray cluster as a KubeRay release: helm installs it, hpcray.kube watches its pods until they are Ready.

Ctrl-C during `up` stops waiting at once. With --down-on-failure the release and its Secret are removed; otherwise
they are left (the pods keep starting) and the message says `hpcray down -p NAME` removes them. Either way the
command exits 130. A helm killed mid-install leaves a pending release that the next `up` rolls back or uninstalls.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import socket
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from hpcray import helm, kube
from hpcray.backends.base import ClusterStatus, NodeStatus, Progress
from hpcray.errors import ClusterError, ClusterNotReady, CredentialsError, HpcrayError, Interrupted, KubeError
from hpcray.profile import Profile, profile_ref
from hpcray.render import PROFILE_LABEL
from hpcray.secrets import Secret
from hpcray.state import make_private, state_dir
from hpcray.tracking import PASSWORD_VAR, USERNAME_VAR

DASHBOARD_PORT = 8265
EXPIRES = "hpcray.io/expires-at"  # release label (epoch seconds) and RayCluster annotation (RFC 3339)
HELM_TIMEOUT_S = 300.0
INSTANCE_LABEL = "app.kubernetes.io/instance"  # the chart labels the RayCluster with its release


class UpInterrupted(Interrupted):
    """Ctrl-C during `up`; the message says whether the release was removed or left."""

    def __init__(self, message: str) -> None:
        super().__init__(signal.SIGINT)
        self.args = (message,)


@dataclass
class Plan:
    """What `up` will do, computed without touching the cluster (and all `--dry-run` shows)."""

    helm: helm.Helm
    argv: list[str]
    values_yaml: str
    labels: dict[str, str]
    expected_workers: int
    expires_at: float | None
    secret: dict[str, Secret | str] | None


class KubeRayBackend:
    def __init__(self, profile: Profile) -> None:
        self.p = profile
        self.name = profile.name
        self.ref = profile_ref(profile.source)  # how commands we suggest name the profile

    @property
    def selector(self) -> str:
        return f"{kube.CLUSTER_LABEL}={self.p.raycluster_name}"

    # -----------------------------------------------------------------------------------------------------------
    # up
    # -----------------------------------------------------------------------------------------------------------

    def plan(self, *, env: dict[str, Secret | str] | None = None, ttl_s: float | None = None,
             warn: Progress) -> Plan:
        """Render the values and check them with the real `helm template` against KubeRay's CRD."""
        from hpcray.render import check_release, dump_values, render_values

        expires_at = time.time() + ttl_s if ttl_s else None
        annotations = {EXPIRES: kube.format_time(expires_at)} if expires_at else None
        values_yaml = dump_values(render_values(self.p, annotations))
        checked = check_release(self.p, values_yaml, required=True, warn=warn)
        assert checked is not None  # required=True raises instead
        _warn_missing_sif(self.p, warn)
        labels = {helm.MANAGED_LABEL: "true", PROFILE_LABEL: self.p.name}
        if expires_at:
            labels[EXPIRES] = str(int(expires_at))
        h = helm.find_helm()
        argv = helm.upgrade_install_args(h, self.p, helm.resolve_chart(h, self.p), labels, HELM_TIMEOUT_S)
        return Plan(h, argv, values_yaml, labels, _expected_workers(checked.raycluster), expires_at,
                    self._secret_data(env))

    def _secret_data(self, env: dict[str, Secret | str] | None) -> dict[str, Secret | str] | None:
        m = self.p.mlflow
        needed = m.credentials != "none" and m.deliver == "secret" and bool(m.tracking_uri)
        if not needed:
            return None
        if not env or USERNAME_VAR not in env or PASSWORD_VAR not in env:
            raise CredentialsError(f"the Ray pods read MLflow credentials from Secret {self.p.secret_name}, but none "
                                   f"were given; set {USERNAME_VAR} and {PASSWORD_VAR} (mlflow.credentials: "
                                   f"{m.credentials}) or set mlflow.credentials: none")
        return {"username": env[USERNAME_VAR], "password": env[PASSWORD_VAR]}

    def up(self, *, timeout: float, progress: Progress, env: dict[str, Secret | str] | None = None,
           ttl_s: float | None = None, down_on_failure: bool = False) -> ClusterStatus:
        plan = self.plan(env=env, ttl_s=ttl_s, warn=progress)  # bad input fails before anything is written
        k = kube.connect(self.p)
        with lifecycle_lock(self.p.name, "up", progress):
            started = time.monotonic()
            watch = kube.PodWatch(k, self.selector, progress)
            try:
                release = self._install(plan, k, progress)
                ready = watch.until(lambda pods: _ready(pods, plan.expected_workers), deadline=started + timeout,
                                    on_change=PodLines(progress))
            except KeyboardInterrupt:
                outcome = self._after_failure(plan.helm, k, down_on_failure, progress)
                raise UpInterrupted(f"interrupted while bringing up {self.name}; {outcome}") from None
            if not ready:
                diagnosis = self._diagnose(k, watch, plan.expected_workers)
                outcome = self._after_failure(plan.helm, k, down_on_failure, progress)
                raise ClusterNotReady(f"{self.name} was not ready within {_seconds(timeout)}: {diagnosis}; {outcome}")
            return self._status(release, [kube.pod_state(p) for p in watch.pods.values()], plan.expected_workers,
                                plan.expires_at)

    def _install(self, plan: Plan, k: kube.Kube, progress: Progress) -> helm.Release:
        current = helm.status(plan.helm, self.p)
        recovered = helm.recover(plan.helm, self.p, current)
        if recovered:
            progress(recovered)
            current = helm.status(plan.helm, self.p)
        labels = dict(plan.labels)
        if current is not None and EXPIRES not in labels:
            labels[EXPIRES] = "null"  # an upgrade without --ttl drops the earlier expiry (on install, null is literal)
        if plan.secret is not None:
            kube.apply_secret(k, self.p.secret_name, plan.secret, {helm.MANAGED_LABEL: "true",
                                                                    PROFILE_LABEL: self.p.name})
        release = helm.upgrade_install(plan.helm, self.p, plan.values_yaml, labels, HELM_TIMEOUT_S)
        verb = "installed" if release.revision == 1 else "upgraded"
        progress(f"release {self.name} {verb} (revision {release.revision}) in namespace {k.namespace}; waiting for "
                 f"the head and {plan.expected_workers} worker(s) to be Ready")
        return release

    def _after_failure(self, h: helm.Helm, k: kube.Kube, down_on_failure: bool, progress: Progress) -> str:
        if not down_on_failure:
            return f"the release is left in place: `hpcray down -p {self.ref}` removes it"
        progress(f"removing release {self.name} (--down-on-failure)")
        try:
            helm.uninstall(h, self.p)
            kube.delete_secret(k, self.p.secret_name)
        except HpcrayError as exc:
            return f"removing the release failed ({exc}); run `hpcray down -p {self.ref}` once the cluster answers"
        return "the release and its Secret were removed (--down-on-failure)"

    def _diagnose(self, k: kube.Kube, watch: kube.PodWatch, expected_workers: int) -> str:
        states = [kube.pod_state(p) for p in watch.pods.values()]
        live = [s for s in states if s.phase != "Terminating"]
        ready = sum(s.ready for s in live)
        parts = [f"{ready}/{expected_workers + 1} pods Ready"]
        if watch.lost:
            parts.append(f"the Kubernetes API was unreachable at the end ({watch.lost})")
            return "; ".join(parts)
        alike: dict[tuple[str, str, str], list[str]] = {}  # pods not ready for the same reason are named together
        for s in sorted(live, key=lambda s: (s.role != "head", s.name)):
            if not s.ready:
                alike.setdefault((s.role, s.phase, self._why(k, s)), []).append(s.name)
        parts += [f"{role} {', '.join(names)} {phase}: {why}" for (role, phase, why), names in alike.items()]
        missing = {"head": 1 - sum(s.role == "head" for s in live),
                   "worker": expected_workers - sum(s.role == "worker" for s in live)}
        if any(n > 0 for n in missing.values()):
            parts.append(self._missing(k, missing))
        return "; ".join(parts)

    def _why(self, k: kube.Kube, s: kube.PodState) -> str:
        reasons = [s.reason]
        try:
            reasons += [f"{reason}: {message}" for reason, message in kube.pod_warnings(k, s.name)
                        if message not in s.reason]
            if s.node:
                reasons.append(kube.node_problem(k, s.node) or "")
        except KubeError:
            pass  # the diagnosis is best effort: the reason from the pod itself is already there
        return "; ".join(r for r in reasons if r)

    def _missing(self, k: kube.Kube, missing: dict[str, int]) -> str:
        counts = " and ".join(f"{n} {role} pod{'s' if n > 1 else ''}" for role, n in missing.items() if n > 0)
        rc = self.p.raycluster_name
        if kube.get_raycluster(k, rc) is None:
            return f"{counts} missing: RayCluster {rc} does not exist (was the release removed?)"
        return (f"{counts} not created yet: RayCluster {rc} exists, so check that the KubeRay operator runs "
                f"(`kubectl get pods -A -l app.kubernetes.io/name=kuberay-operator`) and `kubectl describe raycluster "
                f"{rc} -n {k.namespace}`")

    # -----------------------------------------------------------------------------------------------------------
    # status, address, down
    # -----------------------------------------------------------------------------------------------------------

    def status(self) -> ClusterStatus:
        release = helm.status(helm.find_helm(), self.p)
        k = kube.connect(self.p)
        states = [kube.pod_state(p) for p in kube.list_pods(k, self.selector)]
        rc = kube.get_raycluster(k, self.p.raycluster_name)
        expected = _expected_workers(rc) if rc else 0
        return self._status(release, states, expected, _expiry(rc or {}))

    def _status(self, release: helm.Release | None, states: list[kube.PodState], expected_workers: int,
                expires_at: float | None) -> ClusterStatus:
        deployed = release is not None and release.status == "deployed"
        return ClusterStatus(
            name=self.name, backend="kuberay", exists=release is not None or bool(states),
            ready=deployed and _states_ready(states, expected_workers), address=self._forwarded(), nodes=[_node(s) for s in states], expires_at=expires_at,
            details={"namespace": self.p.kubernetes.namespace, "release_status": release.status if release else None,
                     "revision": release.revision if release else None, "chart": release.chart if release else None,
                     "expected_workers": expected_workers, "service": f"{self.p.raycluster_name}-head-svc",
                     "in_cluster_address": f"http://{self.p.raycluster_name}-head-svc.{self.p.kubernetes.namespace}"
                                           f".svc:{DASHBOARD_PORT}"})

    @contextlib.contextmanager
    def reach(self, progress: Progress) -> Iterator[str]:
        """A live `hpcray dashboard` of this cluster, else a port-forward of this command's own to the head pod
        (as `kubectl ray job submit` does), closed when the block ends."""
        forwarded = self._forwarded()
        if forwarded is not None:
            yield forwarded
            return
        relay = self._relay(port=0, progress=progress)
        threading.Thread(target=relay.serve_forever, name="port-forward", daemon=True).start()
        try:
            yield f"http://127.0.0.1:{relay.port}"
        finally:
            relay.close()

    def _forwarded(self) -> str | None:
        """The address of a live `hpcray dashboard` of this cluster, if one runs."""
        path = state_file(self.name)
        try:
            info = json.loads(path.read_text())
            os.kill(int(info["pid"]), 0)
        except (OSError, ValueError, KeyError):
            return None
        if info.get("namespace") != self.p.kubernetes.namespace:
            return None
        return f"http://127.0.0.1:{info['port']}"

    def down(self, *, progress: Progress, timeout: float = 300.0) -> bool:
        k = kube.connect(self.p)
        h = helm.find_helm()
        with lifecycle_lock(self.p.name, "down", progress):
            removed = helm.uninstall(h, self.p)
            progress(f"uninstalled release {self.name} from namespace {k.namespace}" if removed else
                     f"no release {self.name} in namespace {k.namespace}; nothing to uninstall")
            if kube.delete_secret(k, self.p.secret_name):
                progress(f"deleted Secret {self.p.secret_name}")
            watch = kube.PodWatch(k, self.selector, progress)
            if not watch.until(lambda pods: not pods, deadline=time.monotonic() + timeout, on_change=PodLines(progress)):
                left = ", ".join(f"{s.name} ({s.phase})" for s in map(kube.pod_state, watch.pods.values()))
                raise ClusterNotReady(f"pods of {self.name} are still there after {_seconds(timeout)}: {left}; a "
                                      "finalizer or an unreachable node may hold them (`kubectl describe pod`)")
            return removed

    # -----------------------------------------------------------------------------------------------------------
    # dashboard: a local port relayed to the head's 8265, reconnecting when the upstream drops
    # -----------------------------------------------------------------------------------------------------------

    def dashboard(self, *, port: int, progress: Progress, on_ready: Callable[[str], None]) -> None:
        """Serve 127.0.0.1:port → head pod :8265 until Ctrl-C."""
        k = kube.connect(self.p)
        relay = self._relay(port=port, progress=progress, k=k)
        state = state_file(self.name)
        make_private(state.parent)
        state.write_text(json.dumps({"pid": os.getpid(), "port": relay.port, "namespace": k.namespace}))
        try:
            on_ready(f"http://127.0.0.1:{relay.port}")
            relay.serve_forever()
        except KeyboardInterrupt:
            progress("port-forward stopped")
        finally:
            relay.close()
            state.unlink(missing_ok=True)

    def _relay(self, *, port: int, progress: Progress, k: kube.Kube | None = None) -> Relay:
        k = k or kube.connect(self.p)
        head = HeadPod(k, f"{self.selector},{kube.HEAD_LABEL}=head")
        head.name()  # no Ready head pod: say so now, not as a connection that fails later

        def upstream() -> Any:
            return kube.open_pod_port(k, head.name(), DASHBOARD_PORT)

        return Relay(upstream, port=port, notice=progress, on_failure=head.forget)


class HeadPod:
    """The name of the head pod, looked up again after an upstream failure (the head may have been recreated)."""

    def __init__(self, k: kube.Kube, selector: str) -> None:
        self.k, self.selector = k, selector
        self._name: str | None = None

    def name(self) -> str:
        if self._name is None:
            running = [kube.pod_state(p) for p in kube.list_pods(self.k, self.selector)]
            ready = [s for s in running if s.phase == "Ready"]
            if not ready:
                raise ClusterError(f"no Ready head pod ({self.selector}) in namespace {self.k.namespace}; is the "
                                   "cluster up? (`hpcray status`)")
            self._name = ready[0].name
        return self._name

    def forget(self) -> None:
        self._name = None


class Relay:
    """Accept on 127.0.0.1:port; relay each connection to a fresh upstream socket from `open_upstream`.

    An upstream that cannot be opened (API server restarting, head pod recreated) is retried with backoff for up
    to `retry_s` while the client waits, so a dropped port-forward heals on the next request."""

    def __init__(self, open_upstream: Callable[[], Any], *, port: int = 0, notice: Progress,
                 on_failure: Callable[[], None] = lambda: None, retry_s: float = 15.0) -> None:
        self.open_upstream, self.notice, self.on_failure, self.retry_s = open_upstream, notice, on_failure, retry_s
        try:
            self.listener = socket.create_server(("127.0.0.1", port))
        except OSError as exc:
            raise ClusterError(f"cannot listen on 127.0.0.1:{port} ({exc.strerror}); pick another with --port") \
                from None
        self.port: int = self.listener.getsockname()[1]
        self.broken = False  # the last upstream attempt failed: say so once, and once when it heals

    def serve_forever(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def _serve(self, client: socket.socket) -> None:
        with contextlib.closing(client):
            upstream = self._connect()
            if upstream is not None:
                with contextlib.closing(upstream):
                    _pipe(client, upstream)

    def _connect(self) -> Any | None:
        deadline, backoff = time.monotonic() + self.retry_s, 0.1
        while True:
            try:
                upstream = self.open_upstream()
            except Exception as exc:  # noqa: BLE001 - socket, websocket and API failures alike: retried, said once
                if not self.broken:
                    self.notice(f"port-forward lost ({exc}); reconnecting")
                self.broken = True
                self.on_failure()
                if time.monotonic() + backoff > deadline:
                    self.notice(f"port-forward: gave up on this connection after {self.retry_s:.0f}s")
                    return None
                time.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            if self.broken:
                self.notice("port-forward reconnected")
                self.broken = False
            return upstream


def _pipe(a: Any, b: Any) -> None:
    """Copy bytes both ways until either side closes."""
    peers = {a.fileno(): b, b.fileno(): a}
    socks = {a.fileno(): a, b.fileno(): b}
    while True:
        readable, _, _ = select.select(list(socks.values()), [], [], 60)
        for s in readable:
            try:
                data = s.recv(65536)
                if not data:
                    return
                peers[s.fileno()].sendall(data)
            except OSError:
                return


# ---------------------------------------------------------------------------------------------------------------
# Pods in words, readiness, and the progress lines
# ---------------------------------------------------------------------------------------------------------------


class PodLines:
    """One progress line per pod whenever its phase or reason changes (not on every event)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.last: dict[str, tuple[str, str]] = {}

    def __call__(self, name: str, pod: kube.Obj | None) -> None:
        if pod is None:
            if self.last.pop(name, None) is not None:
                self.progress(f"  {name}  deleted")
            return
        s = kube.pod_state(pod)
        if self.last.get(name) == (s.phase, s.reason):
            return
        self.last[name] = (s.phase, s.reason)
        self.progress(f"  {s.name}  {s.role}  {s.phase}{'  ' + s.reason if s.reason else ''}  "
                      f"(age {_seconds(s.age())})")


def _ready(pods: dict[str, kube.Obj], expected_workers: int) -> bool:
    return _states_ready([kube.pod_state(p) for p in pods.values()], expected_workers)


def _states_ready(states: list[kube.PodState], expected_workers: int) -> bool:
    ready = [s for s in states if s.ready]
    return any(s.role == "head" for s in ready) and sum(s.role == "worker" for s in ready) >= expected_workers


def _expected_workers(raycluster: dict[str, Any]) -> int:
    return sum(int(g.get("replicas") or 0) for g in raycluster.get("spec", {}).get("workerGroupSpecs") or [])


def _node(s: kube.PodState) -> NodeStatus:
    return NodeStatus(s.name, s.role, s.phase, s.reason, round(s.age(), 1), s.gpus)


def _seconds(s: float) -> str:
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.0f}m"
    return f"{s / 3600:.1f}h"


def _warn_missing_sif(p: Profile, warn: Progress) -> None:
    """hpcray.images knows when the SIF file is missing (when its directory is visible from here)."""
    try:
        from hpcray.images import sif_known_missing
    except ImportError:
        return
    problem = sif_known_missing(p)
    if problem:
        warn(f"hpcray: warning: {problem}")


def state_file(name: str) -> Path:
    """Where a running `hpcray dashboard` records its pid and local port (so `address()` finds it)."""
    return state_dir(name) / "dashboard.json"


@contextlib.contextmanager
def lifecycle_lock(name: str, command: str, progress: Progress) -> Iterator[None]:
    """One `up`/`down` of a cluster at a time on this machine: a second one waits, and says for whom."""
    path = make_private(state_dir(name)) / "lifecycle.lock"
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().split() or ["?", "another command"]
            progress(f"waiting for `hpcray {holder[1]}` of {name} (pid {holder[0]}) to finish; Ctrl-C it there, or "
                     f"`kill {holder[0]}`")
            fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()} {command}")
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()


# ---------------------------------------------------------------------------------------------------------------
# Every hpcray release in the context: `status --all` and `gc`
# ---------------------------------------------------------------------------------------------------------------


def all_clusters(p: Profile) -> list[ClusterStatus]:
    """Every release hpcray made in the profile's context (all namespaces), with its pods and expiry."""
    h = helm.find_helm()
    releases = helm.list_releases(h, p, all_namespaces=True)
    k = kube.connect(p, check_namespace=False)
    pods: dict[tuple[str, str], list[kube.PodState]] = {}
    for pod in kube.list_pods(k, PROFILE_LABEL, all_namespaces=True):
        meta = pod["metadata"]
        key = (meta.get("namespace", ""), (meta.get("labels") or {}).get(PROFILE_LABEL, ""))
        pods.setdefault(key, []).append(kube.pod_state(pod))
    clusters = _rayclusters(k)
    out = []
    for r in releases:
        rc = clusters.get((r.namespace, r.name), {})
        expected = _expected_workers(rc)
        states = pods.get((r.namespace, r.name), [])
        out.append(ClusterStatus(
            name=r.name, backend="kuberay", exists=True,
            ready=r.status == "deployed" and _states_ready(states, expected), nodes=[_node(s) for s in states],
            expires_at=_expiry(rc),
            details={"namespace": r.namespace, "release_status": r.status, "revision": r.revision, "chart": r.chart,
                     "expected_workers": expected, "updated": r.updated}))
    return out


def _rayclusters(k: kube.Kube) -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for rc in kube.list_rayclusters(k):
        meta = rc.get("metadata", {})
        release = (meta.get("labels") or {}).get(INSTANCE_LABEL)
        if release:
            out[(meta.get("namespace", ""), release)] = rc
    return out


def _expiry(rc: dict[str, Any]) -> float | None:
    return kube.parse_time((rc.get("metadata", {}).get("annotations") or {}).get(EXPIRES, ""))


@dataclass
class Expired:
    name: str
    namespace: str
    expired_at: float


def gc(p: Profile, *, dry_run: bool, progress: Progress, now: float | None = None) -> list[Expired]:
    """Uninstall every hpcray release whose expiry has passed (releases without one, or not made by hpcray, stay)."""
    now = time.time() if now is None else now
    expired = [Expired(c.name, c.details["namespace"], c.expires_at) for c in all_clusters(p)
               if c.expires_at is not None and c.expires_at <= now]
    if dry_run:
        return expired
    h = helm.find_helm()
    for e in expired:
        target = replace(p, name=e.name, kubernetes=replace(p.kubernetes, namespace=e.namespace))
        helm.uninstall(h, target)
        kube.delete_secret(kube.connect(target, check_namespace=False), target.secret_name)
        progress(f"uninstalled expired release {e.name} in namespace {e.namespace} (expired "
                 f"{kube.format_time(e.expired_at)})")
    return expired
