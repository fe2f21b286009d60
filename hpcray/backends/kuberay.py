"""A Ray cluster as a KubeRay release: helm installs it, hpcray.kube watches its pods until they are Ready.

Ctrl-C during `up` stops waiting at once. With --down-on-failure the release and its Secrets are removed; otherwise
they are left (the pods keep starting) and the message says `hpcray down -p PROFILE` removes them. Either way the
command exits 130. A helm killed mid-install leaves a pending release that the next `up` rolls back or uninstalls.

The Jobs API and the dashboard are reached the way the profile's `access` (or `--access`) says: a port-forward to
the head pod (hpcray.portforward), opened for one command or kept by `hpcray dashboard` for every command while it
runs; the API server's service proxy to the head's Service, with the kubeconfig's credentials; a port-forward to a
relay pod (`socat` on a regular node, forwarding to the head's Service; made on first use, owned by the RayCluster,
removed with the release) where the API server cannot reach pod IPs; or a URL (an Ingress). `auto` takes the
port-forward where the head pod's node has a real kubelet and the service proxy where it is an interLink virtual
node, whose kubelet answers port-forward with 501.

interLink profiles get a preflight against the virtual node before helm runs (hpcray.interlink), stop waiting as
soon as a pod's SLURM job has failed, and are up only once the Jobs API answers through the chosen access and the
head counts every pod's Ray node alive: the virtual kubelet runs no readiness probes and reports no init containers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from hpcray import helm, interlink, kube, portforward, targets, walltime
from hpcray.backends.base import ClusterStatus, NodeStatus, Plan, Progress, ReleaseStatus, Step
from hpcray.errors import AccessRefused, ClusterError, ClusterNotReady, CredentialsError, HpcrayError, Interrupted, \
    JobsApiRefused, KubeError
from hpcray.http import Endpoint
from hpcray.images import sif_known_missing
from hpcray.profile import Profile, profile_ref
from hpcray.render import PROFILE_LABEL, TOKEN_KEY, token_auth, token_secret_name
from hpcray.secrets import Secret
from hpcray.state import locked, state_dir, write_atomic
from hpcray.tracking import PASSWORD_VAR, SECRET_KEYS, USERNAME_VAR, Credentials, credential_plan, secret_name
from hpcray.waiting import Deadline, words

DASHBOARD_PORT = 8265
RELAY_LABEL = "hpcray.io/relay"
RELAY_WAIT_S = 180.0  # the relay pod's image pull and start
WORKERS_JOIN_S = 120.0
"""How long after the Jobs API answers `up` waits for every pod's Ray node to join the head (interLink: its pods
are Ready once their SLURM job runs, whatever Ray does in them)."""
EXPIRES = "hpcray.io/expires-at"  # release label (epoch seconds) and RayCluster annotation (RFC 3339)
HELM_TIMEOUT_S = 300.0


@dataclass
class _Install:
    """What `up` does, computed before anything is written; `plan` describes it."""

    helm: helm.Helm
    chart: Path
    labels: dict[str, str]
    values_yaml: str
    expected_workers: int
    expires_at: float | None
    secret: dict[str, Secret | str] | None
    token_auth: bool  # the pods read Ray's token from the token Secret


class KubeRayBackend:
    def __init__(self, profile: Profile) -> None:
        self.p = profile
        self.name = profile.name
        self.release = targets.release(profile)
        self.namespace = profile.kubernetes.namespace
        self.secret = secret_name(profile.name)
        self.token_secret = token_secret_name(profile.name)
        self.selector = f"{kube.CLUSTER_LABEL}={profile.raycluster_name}"
        self.head_selector = f"{self.selector},{kube.HEAD_LABEL}=head"
        self.service = f"{profile.raycluster_name}-head-svc"
        self.relay = f"{profile.raycluster_name}-relay"
        self.ref = profile_ref(profile.source)  # how the commands we suggest name the profile

    # -----------------------------------------------------------------------------------------------------------
    # up
    # -----------------------------------------------------------------------------------------------------------

    def plan(self, *, credentials: Credentials | None = None, ttl_s: float | None = None, warn: Progress,
             preflight: bool = True, access: str = "auto") -> Plan:
        """The preflight, the Secret, the helm command with its values (rendered and checked with the real `helm
        template` against KubeRay's CRD) and the wait that `up` would do."""
        install = self._prepare(credentials, ttl_s, warn)
        steps = []
        if preflight and self.p.interlink.enabled:
            steps.append(Step(interlink.preflight_step(self.p)))
        if install.secret is not None:
            shown = ", ".join(f"{k}={v}" for k, v in install.secret.items())  # a Secret formats as ******
            steps.append(Step(f"create or replace Secret {self.secret} in namespace {self.namespace}: {shown}"))
        if install.token_auth:
            steps.append(Step(f"create Secret {self.token_secret} in namespace {self.namespace} with a new random Ray "
                              f"token ({TOKEN_KEY}: ******), or keep the one it holds; the pods read it as "
                              "RAY_AUTH_TOKEN with RAY_AUTH_MODE=token"))
        steps.append(Step("run, with the values on stdin:", argv=[install.helm.path, *self._install_args(install)],
                          stdin=install.values_yaml))
        steps.append(Step(f"wait until the head and {install.expected_workers} worker pod(s) ({self.selector}) in "
                          f"namespace {self.namespace} are Ready"))
        if self.p.interlink.enabled:
            steps.append(Step(f"wait until the Jobs API answers (access: {access}) and the head counts "
                              f"{install.expected_workers + 1} Ray node(s) alive"))
        return Plan(self.name, "kuberay", steps, install.expires_at)

    def _prepare(self, credentials: Credentials | None, ttl_s: float | None, warn: Progress) -> _Install:
        from hpcray.render import check_release, dump_values, render_values

        expires_at = time.time() + ttl_s if ttl_s else None
        annotations = {EXPIRES: kube.format_time(expires_at)} if expires_at else None
        values_yaml = dump_values(render_values(self.p, annotations))
        checked = check_release(self.p, values_yaml, required=True, warn=warn)
        assert checked is not None  # required=True raises instead
        if problem := sif_known_missing(self.p):
            warn(f"hpcray: warning: {problem}")
        labels = {helm.MANAGED_LABEL: "true", PROFILE_LABEL: self.name}
        if expires_at:
            labels[EXPIRES] = str(int(expires_at))
        h = helm.find_helm()
        return _Install(h, helm.resolve_chart(h, targets.chart(self.p)), labels, values_yaml,
                        expected_workers(checked.raycluster), expires_at, self._secret_data(credentials),
                        token_auth(self.p))

    def _install_args(self, install: _Install) -> list[str]:
        return helm.upgrade_install_args(install.helm, self.release, install.chart, install.labels, HELM_TIMEOUT_S)

    def _secret_data(self, credentials: Credentials | None) -> dict[str, Secret | str] | None:
        """The Secret's data, where the credential plan has the pods read the credentials from one."""
        if credential_plan(self.p).where != "secret":
            return None
        if credentials is None:
            raise CredentialsError(f"the Ray pods read MLflow credentials from Secret {self.secret}, but none were "
                                   f"given; set {USERNAME_VAR} and {PASSWORD_VAR} (mlflow.credentials: "
                                   f"{self.p.mlflow.credentials}) or set mlflow.credentials: none")
        env = credentials.env()
        return {key: env[var] for var, key in SECRET_KEYS.items()}

    def up(self, *, timeout: float, progress: Progress, credentials: Credentials | None = None,
           ttl_s: float | None = None, down_on_failure: bool = False, access: str = "auto",
           preflight: bool = True) -> ClusterStatus:
        install = self._prepare(credentials, ttl_s, progress)  # bad input fails before anything is written
        k = kube.connect(self.release.where)
        offloaded = self.p.interlink.enabled
        with locked(self._lock(), f"`hpcray up` of {self.name}", progress):
            if preflight and offloaded:
                interlink.preflight(self.p, k, self.selector, progress)
            deadline = Deadline(timeout)
            watch = kube.PodWatch(k, self.selector, progress)
            try:
                release = self._install(install, k, progress)
                ready = watch.until(lambda pods: _ready(pods, install.expected_workers) or
                                    (offloaded and _failed(pods)), deadline=deadline, on_change=PodLines(progress))
                failed = offloaded and _failed(watch.pods)
                if ready and not failed and offloaded:
                    problem = self._ray_up(k, access, install.expected_workers, deadline, progress)
                    if problem:
                        outcome = self._after_failure(install.helm, k, down_on_failure, progress)
                        raise ClusterNotReady(f"{self.name} is not usable: {problem}; {outcome}")
            except KeyboardInterrupt:
                outcome = self._after_failure(install.helm, k, down_on_failure, progress)
                raise Interrupted(signal.SIGINT, f"interrupted while bringing up {self.name}; {outcome}") from None
            if failed or not ready:
                diagnosis = self._diagnose(k, watch, install.expected_workers)
                outcome = self._after_failure(install.helm, k, down_on_failure, progress)
                when = "cannot start" if failed else f"was not ready within {words(timeout)}"
                raise ClusterNotReady(f"{self.name} {when}: {diagnosis}; {outcome}")
            return self._status(release, [(p, kube.pod_state(p)) for p in watch.pods.values()],
                                install.expected_workers, install.expires_at)

    def _ray_up(self, k: kube.Kube, access: str, expected_workers: int, deadline: Deadline,
                progress: Progress) -> str | None:
        """Wait until the Jobs API answers through `access` and the head counts every pod's Ray node alive; why not,
        in Ray's and interLink's words, when that does not happen (None when it does)."""
        from hpcray.jobs import JobsApi
        from hpcray.jobs.api import wait_for_api

        def head_stuck() -> str | None:
            for pod in kube.list_pods(k, self.head_selector):
                log = kube.pod_log_tail(k, pod["metadata"]["name"], "ray-head")
                if line := interlink.head_cannot_reach_gcs(log):
                    return line
            return None

        def stuck_problem(line: str) -> str:
            return (f"workers cannot reach the head: the Ray head's log says \"{line}\" (its own Ray node cannot "
                    f"reach the head's address); {interlink.VPN_FIX}")

        with self.access(progress, access) as endpoint:
            api = JobsApi(endpoint)
            progress(f"pods Ready; waiting for the Ray Jobs API at {api.address} and {expected_workers + 1} Ray "
                     "node(s)")
            while True:  # in rounds: between them the head's log says whether it can ever answer
                try:
                    wait_for_api(api, min(deadline.left, 15.0), progress)
                    break
                except JobsApiRefused:
                    raise
                except ClusterError as exc:
                    if line := head_stuck():
                        return stuck_problem(line)
                    if deadline.passed:
                        return f"the Ray Jobs API did not answer through access {access}: {exc}"
            joined = Deadline(min(deadline.left, WORKERS_JOIN_S))
            alive = 0
            while not joined.passed:
                alive = api.alive_nodes()
                if alive >= expected_workers + 1:
                    progress(f"{alive} Ray node(s) alive; the Jobs API answers at {api.address}")
                    return None
                if line := head_stuck():
                    return stuck_problem(line)
                joined.sleep(2.0)
            return (f"workers cannot reach the head: the head counts {alive} of {expected_workers + 1} Ray node(s) "
                    f"alive {joined.elapsed:.0f} s after every pod was Ready (their `wait-gcs-ready` loops, which "
                    f"interLink does not report); {interlink.VPN_FIX}")

    def _install(self, install: _Install, k: kube.Kube, progress: Progress) -> helm.ReleaseInfo:
        current = helm.status(install.helm, self.release)
        recovered = helm.recover(install.helm, self.release, current)
        if recovered:
            progress(recovered)
            current = helm.status(install.helm, self.release)
        if current is not None and EXPIRES not in install.labels:
            # an upgrade without --ttl drops the earlier expiry (on install, null would be literal)
            install.labels[EXPIRES] = "null"
        if install.secret is not None:
            kube.apply_secret(k, self.secret, install.secret, {helm.MANAGED_LABEL: "true", PROFILE_LABEL: self.name})
        if install.token_auth and kube.read_secret(k, self.token_secret, TOKEN_KEY) is None:
            # once per cluster: an upgrade or a second `up` keeps the token the running Ray processes know
            from hpcray.jobs.api import new_token

            kube.apply_secret(k, self.token_secret, {TOKEN_KEY: new_token()},
                              {helm.MANAGED_LABEL: "true", PROFILE_LABEL: self.name})
            progress(f"created Secret {self.token_secret} with the cluster's Ray token")
        release = helm.upgrade_install(install.helm, self.release, self._install_args(install), install.values_yaml,
                                       HELM_TIMEOUT_S)
        verb = "installed" if release.revision == 1 else "upgraded"
        progress(f"release {self.name} {verb} (revision {release.revision}) in namespace {k.namespace}; waiting for "
                 f"the head and {install.expected_workers} worker(s) to be Ready")
        return release

    def _after_failure(self, h: helm.Helm, k: kube.Kube, down_on_failure: bool, progress: Progress) -> str:
        if not down_on_failure:
            return f"the release is left in place: `hpcray down -p {self.ref}` removes it"
        progress(f"removing release {self.name} (--down-on-failure)")
        try:
            helm.uninstall(h, self.release)
            kube.delete_secret(k, self.secret)
            kube.delete_secret(k, self.token_secret)
        except HpcrayError as exc:
            return f"removing the release failed ({exc}); run `hpcray down -p {self.ref}` once the cluster answers"
        return "the release and its Secrets were removed (--down-on-failure)"

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
                alike.setdefault((s.role, s.phase, self._why(k, s, watch.pods[s.name])), []).append(s.name)
        parts += [f"{role} {', '.join(names)} {phase}: {why}" for (role, phase, why), names in alike.items()]
        try:  # pods that ended before the watch saw them end are gone: KubeRay deleted them (and made new ones)
            rc = kube.get_raycluster(k, self.p.raycluster_name)
            parts += [f"{n.role} {n.name} {n.reason}" for n in
                      (self._replaced(d) for d in (kube.pods_kuberay_deleted(k, rc) if rc else []))
                      if n.name not in watch.pods]
        except KubeError:
            pass  # best effort, as above
        missing = {"head": 1 - sum(s.role == "head" for s in live),
                   "worker": expected_workers - sum(s.role == "worker" for s in live)}
        if any(n > 0 for n in missing.values()):
            parts.append(self._missing(k, missing))
        return "; ".join(parts)

    def _why(self, k: kube.Kube, s: kube.PodState, pod: kube.Obj) -> str:
        reasons = [self._interlink_problem(pod) or s.reason]
        try:
            reasons += [f"{reason}: {message}" for reason, message in kube.pod_warnings(k, s.name)
                        if message not in s.reason]
            if s.node:
                reasons.append(kube.node_problem(k, s.node) or "")
        except KubeError:
            pass  # the diagnosis is best effort: the reason from the pod itself is already there
        return "; ".join(r for r in reasons if r)

    def _interlink_problem(self, pod: kube.Obj) -> str | None:
        return interlink.pod_problem(pod) if self.p.interlink.enabled else None

    def _missing(self, k: kube.Kube, missing: dict[str, int]) -> str:
        counts = " and ".join(f"{n} {role} pod{'s' if n > 1 else ''}" for role, n in missing.items() if n > 0)
        rc = self.p.raycluster_name
        if kube.get_raycluster(k, rc) is None:
            return f"{counts} missing: RayCluster {rc} does not exist (was the release removed?)"
        return (f"{counts} not created yet: RayCluster {rc} exists, so check that the KubeRay operator runs "
                f"(`kubectl get pods -A -l app.kubernetes.io/name=kuberay-operator`) and `kubectl describe raycluster "
                f"{rc} -n {k.namespace}`")

    def _lock(self) -> Path:
        return state_dir(self.name) / "lifecycle.lock"

    # -----------------------------------------------------------------------------------------------------------
    # status, access, dashboard, down
    # -----------------------------------------------------------------------------------------------------------

    def tracking_uri(self) -> str | None:
        return self.p.mlflow.tracking_uri

    def results_root(self) -> str:
        """Ray's own temp dir in the head container: writable in every image (the chart mounts an emptyDir there;
        on interLink a job directory), gone with the pod."""
        return "/tmp/ray/hpcray-results"

    def status(self) -> ClusterStatus:
        release = helm.status(helm.find_helm(), self.release)
        k = kube.connect(self.release.where)
        pods = kube.list_pods(k, self.selector)
        states = [(pod, dataclasses.replace(s, reason=problem) if (problem := self._interlink_problem(pod)) else s)
                  for pod, s in ((pod, kube.pod_state(pod)) for pod in pods)]
        rc = kube.get_raycluster(k, self.p.raycluster_name)
        replaced = [self._replaced(d) for d in kube.pods_kuberay_deleted(k, rc)] if rc else []
        return self._status(release, states, expected_workers(rc) if rc else 0, expiry(rc or {}), replaced)

    def _replaced(self, d: kube.DeletedPod) -> NodeStatus:
        """A pod KubeRay deleted once it had ended (a Failed pod is not kept: a new one takes its place)."""
        code = f", exit code {d.exit_code}" if d.exit_code else ""
        why = interlink.deleted_problem(d) if self.p.interlink.enabled else f"{d.reason or d.phase}{code}"
        return NodeStatus(d.name, d.role, "Deleted", f"{d.phase}: {why}; KubeRay deleted it and made a new pod",
                          ended_at=d.at)

    def _status(self, release: helm.ReleaseInfo | None, pods: list[tuple[kube.Obj, kube.PodState]], expected: int,
                expires_at: float | None, replaced: list[NodeStatus] | None = None) -> ClusterStatus:
        deployed = release is not None and release.status == "deployed"
        states = [s for _, s in pods]
        nodes = [node_status(s) for _, s in pods]
        return ClusterStatus(
            name=self.name, backend="kuberay", exists=release is not None or bool(states),
            ready=deployed and states_ready(states, expected), node_kind="pod",
            nodes=nodes, expires_at=expires_at, address=self._forwarded(),
            tracking_uri=self.tracking_uri(), namespace=self.namespace, release=release_status(release),
            expected_workers=expected, service=self.service, ends_at=cluster_ends_at(nodes), replaced=replaced or [])

    @contextlib.contextmanager
    def access(self, progress: Progress, mode: str = "auto") -> Iterator[Endpoint]:
        """The Jobs API the way `mode` says, valid while the block runs: a URL as given; the API server's service
        proxy; a port-forward of this command's own to the head pod (as `kubectl ray job submit` does) or to the
        relay pod, closed when the block ends; `auto`: a live `hpcray dashboard` of this cluster, else the
        port-forward where the head pod's node has a real kubelet and the service proxy where it is an interLink
        virtual node. A port-forward to a pod on a virtual node is refused at once (AccessRefused), not retried."""
        from hpcray.jobs.api import with_token

        forwarded = self._forwarded() if mode == "auto" else None
        if _is_url(mode) or forwarded is not None:
            token = self._token(kube.connect(self.release.where)) if token_auth(self.p) else None
            yield with_token(Endpoint(mode.rstrip("/") if _is_url(mode) else str(forwarded)), token)
            return
        k = kube.connect(self.release.where)
        way = self._way(k, mode)
        token = self._token(k)
        if way == "service-proxy":
            yield with_token(kube.service_proxy(k, self.service, DASHBOARD_PORT), token)
            return
        with self._forward(k, 0, progress, via_relay=way == "relay").serving() as forward:
            yield with_token(Endpoint(forward.url), token)

    def _token(self, k: kube.Kube) -> Secret | None:
        """The cluster's Ray token from its Secret; None where the profile turns token authentication off or the
        image's Ray lacks it (the pods then run without)."""
        if not token_auth(self.p):
            return None
        token = kube.read_secret(k, self.token_secret, TOKEN_KEY)
        if token is None:
            raise ClusterError(f"Secret {self.token_secret} with the Ray token of {self.name} is missing in namespace "
                               f"{self.namespace}; `hpcray up -p {self.ref}` makes a new one (the pods restart "
                               "with it)")
        return token

    def _way(self, k: kube.Kube, mode: str) -> str:
        """`port-forward`, `service-proxy` or `relay`: `mode` with `auto` resolved by the Ready head pod's node.
        ClusterError when there is no Ready head, AccessRefused for a port-forward to a virtual node."""
        state = portforward.ReadyPod(k, self.head_selector).state()
        if mode in ("service-proxy", "relay"):
            return mode
        virtual = self._on_virtual_node(k, state.node)
        if mode == "port-forward" and virtual:
            raise AccessRefused(
                f"the head pod {state.name} runs on {state.node}, an interLink virtual node, whose virtual kubelet "
                f"answers port-forward with 501 Not Implemented; reach the Jobs API with --access service-proxy "
                f"(through the API server, with your kubeconfig's credentials), --access relay (a port-forward to a "
                f"relay pod on a regular node) or --access https://<the dashboard's Ingress>, or set the profile's "
                f"access key to one of them")
        return "service-proxy" if virtual else "port-forward"

    def _on_virtual_node(self, k: kube.Kube, node: str | None) -> bool:
        """Whether `node` is an interLink virtual node; where nodes may not be read, whether it is the profile's."""
        if not node:
            return False
        try:
            found = kube.read_node(k, node)
        except KubeError:
            return self.p.interlink.enabled and node == self.p.interlink.node
        return found is not None and kube.is_virtual_node(found)

    def dashboard(self, *, port: int, progress: Progress, on_ready: Callable[[str], None],
                  access: str = "auto") -> None:
        """A URL: that. Through a port-forward: serve 127.0.0.1:port → the head pod's dashboard until Ctrl-C; job
        commands use it meanwhile. Through the service proxy: a browser lacks the kubeconfig's credentials, so
        `kubectl proxy` (which adds them) is named with the address it then serves. Where the head runs with token
        authentication, the way to print the token for the dashboard's login page is named with the address."""
        def ready(url: str) -> None:
            if token_auth(self.p):
                progress(f"the dashboard asks for the cluster's Ray token; print it with `kubectl get secret "
                         f"{self.token_secret} -n {self.namespace} -o jsonpath='{{.data.{TOKEN_KEY}}}' | base64 -d`")
            on_ready(url)

        if _is_url(access):
            ready(access)
            return
        k = kube.connect(self.release.where)
        way = self._way(k, access)
        if way == "service-proxy":
            path = f"/api/v1/namespaces/{self.namespace}/services/http:{self.service}:{DASHBOARD_PORT}/proxy/"
            progress(f"the head's dashboard is reached through the Kubernetes API server's service proxy, which "
                     f"needs your kubeconfig's credentials: run `kubectl proxy --port {port or 8001}` and open the "
                     "address below")
            ready(f"http://127.0.0.1:{port or 8001}{path}")
            return
        relay = self._forward(k, port, progress, via_relay=way == "relay")
        recorded = self._dashboard_file()
        write_atomic(recorded, json.dumps({"pid": os.getpid(), "port": relay.port, "namespace": self.namespace}))
        try:
            progress(f"forwarding {relay.url} to the head pod's dashboard ({DASHBOARD_PORT}) until Ctrl-C")
            ready(relay.url)
            relay.serve_forever()
        except KeyboardInterrupt:
            progress("port-forward stopped")
        finally:
            relay.close()
            recorded.unlink(missing_ok=True)

    def _forward(self, k: kube.Kube, port: int, progress: Progress, *, via_relay: bool = False) -> portforward.Relay:
        """A port-forward to the head pod's dashboard, or to the relay pod's (made first where there is none)."""
        if not via_relay:
            return portforward.to_pod(k, self.head_selector, DASHBOARD_PORT, local_port=port, notice=progress)
        self._ensure_relay(k, progress)
        return portforward.to_pod(k, f"{RELAY_LABEL}={self.p.raycluster_name}", DASHBOARD_PORT, local_port=port,
                                  notice=progress)

    def _ensure_relay(self, k: kube.Kube, progress: Progress) -> None:
        """The relay pod, Ready: `socat` on a regular node (never the virtual node: no toleration of its taint, and
        an anti-affinity to its label) from its port 8265 to the head's Service, owned by the RayCluster so that it
        goes with the release."""
        rc = kube.get_raycluster(k, self.p.raycluster_name)
        if rc is None:
            raise ClusterError(f"RayCluster {self.p.raycluster_name} does not exist in namespace {self.namespace}; is "
                               f"the cluster up? (`hpcray up -p {self.ref}`)")
        if kube.create_pod(k, self._relay_pod(rc["metadata"]["uid"])):
            progress(f"created relay pod {self.relay} ({self.p.kubernetes.relay_image}) forwarding to "
                     f"{self.service}:{DASHBOARD_PORT}")
        selector = f"{RELAY_LABEL}={self.p.raycluster_name}"
        watch = kube.PodWatch(k, selector, progress)
        if not watch.until(lambda pods: any(kube.pod_state(p).ready for p in pods.values()),
                           deadline=Deadline(RELAY_WAIT_S), on_change=PodLines(progress)):
            why = "; ".join(f"{s.phase}: {s.reason}" for s in map(kube.pod_state, watch.pods.values())) or "gone"
            raise ClusterError(f"relay pod {self.relay} was not Ready within {words(RELAY_WAIT_S)} ({why}); check "
                               f"that regular nodes can pull kubernetes.relay_image, or use --access service-proxy")

    def _relay_pod(self, owner_uid: str) -> kube.Obj:
        not_virtual = [{"key": key, "operator": "NotIn", "values": ["virtual-kubelet"]}
                       for key in ("virtual-node.interlink/type", "type")]
        return {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": self.relay, "namespace": self.namespace,
                         "labels": {RELAY_LABEL: self.p.raycluster_name, helm.MANAGED_LABEL: "true",
                                    PROFILE_LABEL: self.name},
                         "ownerReferences": [{"apiVersion": "ray.io/v1", "kind": "RayCluster",
                                              "name": self.p.raycluster_name, "uid": owner_uid}]},
            "spec": {
                "automountServiceAccountToken": False,
                "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [{"matchExpressions": not_virtual}]}}},
                "containers": [{
                    "name": "relay", "image": self.p.kubernetes.relay_image,
                    "args": [f"TCP-LISTEN:{DASHBOARD_PORT},fork,reuseaddr",
                             f"TCP:{self.service}.{self.namespace}.svc:{DASHBOARD_PORT}"],
                    "ports": [{"name": "dashboard", "containerPort": DASHBOARD_PORT}],
                    "resources": {"requests": {"cpu": "10m", "memory": "16Mi"},
                                  "limits": {"cpu": "200m", "memory": "64Mi"}}}]}}

    def _dashboard_file(self) -> Path:
        """Where a running `hpcray dashboard` records its pid and local port (so job commands find it)."""
        return state_dir(self.name) / "dashboard.json"

    def _forwarded(self) -> str | None:
        """The address of a live `hpcray dashboard` of this cluster, if one runs."""
        try:
            info = json.loads(self._dashboard_file().read_text())
            os.kill(int(info["pid"]), 0)
        except (OSError, ValueError, KeyError):
            return None
        if info.get("namespace") != self.namespace:
            return None
        return f"http://127.0.0.1:{info['port']}"

    def plan_down(self) -> Plan:
        h = helm.find_helm()
        return Plan(self.name, "kuberay", [
            Step("run:", argv=[h.path, *helm.uninstall_args(self.release)]),
            Step(f"delete Secrets {self.secret} and {self.token_secret} and the relay pod {self.relay}, if any, in "
                 f"namespace {self.namespace}"),
            Step(f"wait until no pod labelled {self.selector} is left in namespace {self.namespace}")])

    def down(self, *, progress: Progress, timeout: float = 300.0) -> bool:
        k = kube.connect(self.release.where)
        h = helm.find_helm()
        with locked(self._lock(), f"`hpcray down` of {self.name}", progress):
            removed = helm.uninstall(h, self.release)
            progress(f"uninstalled release {self.name} from namespace {k.namespace}" if removed else
                     f"no release {self.name} in namespace {k.namespace}; nothing to uninstall")
            for name in (self.secret, self.token_secret):
                if kube.delete_secret(k, name):
                    progress(f"deleted Secret {name}")
            if kube.delete_pod(k, self.relay):  # its owner, the RayCluster, takes it too: this is sooner
                progress(f"deleted relay pod {self.relay}")
            watch = kube.PodWatch(k, self.selector, progress)
            if not watch.until(lambda pods: not pods, deadline=Deadline(timeout), on_change=PodLines(progress)):
                left = ", ".join(f"{s.name} ({s.phase})" for s in map(kube.pod_state, watch.pods.values()))
                raise ClusterNotReady(f"pods of {self.name} are still there after {words(timeout)}: {left}; a "
                                      "finalizer or an unreachable node may hold them (`kubectl describe pod`)")
            return removed


# ---------------------------------------------------------------------------------------------------------------
# Pods in words, readiness, and the progress lines (hpcray.backends.fleet reads releases the same way)
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
                      f"(age {words(s.age())})")


def _is_url(access: str) -> bool:
    return access.startswith(("http://", "https://"))


def _failed(pods: dict[str, kube.Obj]) -> bool:
    """Whether a pod on interLink's virtual node will never run: the virtual kubelet neither retries nor restarts."""
    return any(interlink.pod_problem(p) for p in pods.values())


def _ready(pods: dict[str, kube.Obj], expected_workers: int) -> bool:
    return states_ready([kube.pod_state(p) for p in pods.values()], expected_workers)


def states_ready(states: list[kube.PodState], expected_workers: int) -> bool:
    ready = [s for s in states if s.ready]
    return any(s.role == "head" for s in ready) and sum(s.role == "worker" for s in ready) >= expected_workers


def expected_workers(raycluster: dict[str, Any]) -> int:
    return sum(int(g.get("replicas") or 0) for g in raycluster.get("spec", {}).get("workerGroupSpecs") or [])


def expiry(raycluster: dict[str, Any]) -> float | None:
    return kube.parse_time((raycluster.get("metadata", {}).get("annotations") or {}).get(EXPIRES, ""))


def node_status(s: kube.PodState) -> NodeStatus:
    return NodeStatus(s.name, s.role, s.phase, s.reason, round(s.age(), 1), s.gpus, created_at=s.created,
                      started_at=s.started, ended_at=s.ended, time_limit_s=s.time_limit_s)


def cluster_ends_at(nodes: list[NodeStatus]) -> float | None:
    """When the first live pod's SLURM allocation ends (a pod already ended or going away no longer counts)."""
    return walltime.cluster_end(walltime.allocation_end(n.started_at, n.time_limit_s) for n in nodes
                                if n.phase in ("Running", "Ready"))


def release_status(r: helm.ReleaseInfo | None) -> ReleaseStatus | None:
    return None if r is None else ReleaseStatus(r.status, r.revision, r.chart, r.updated)
