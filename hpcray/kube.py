"""The only module that talks to the Kubernetes API (the official `kubernetes` client, imported lazily).

Waiting is watching: pods are followed with `watch.Watch().stream` from the resourceVersion of the last list,
resumed after a dropped connection or an API server restart, re-listed after 410 Gone. Every reason a pod is not
ready is put in words from what Kubernetes reports (conditions, container states, events, the node).

Requests go through the client's ApiClient (its kubeconfig loading, auth, TLS) by path, with JSON dicts in and out:
the generated CoreV1Api costs 1.6 s to import on every command, and its models reject what a server may send (an
integer quantity) and cost time on every watch event.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

from hpcray import accounting, walltime
from hpcray.errors import KubeError
from hpcray.secrets import Secret
from hpcray.waiting import Deadline

HEAD_LABEL = "ray.io/node-type"
SLURM_FLAGS = "slurm-job.vk.io/flags"  # the sbatch flags interLink's SLURM plugin puts in a pod's batch script
CLUSTER_LABEL = "ray.io/cluster"
RAYCLUSTERS = "/apis/ray.io/v1"
RECONNECT_MAX_S = 2.0
WATCH_CHUNK_S = 60  # a watch the server ends after this long is resumed from its resourceVersion at no cost

Obj = dict[str, Any]


@dataclass(frozen=True)
class Target:
    """Where on Kubernetes: a namespace, in a context of a kubeconfig (None: the kubeconfig's current context;
    $KUBECONFIG or ~/.kube/config)."""

    namespace: str = "default"
    context: str | None = None
    kubeconfig: str | None = None


@dataclass
class Kube:
    api: Any  # kubernetes.client.ApiClient
    namespace: str
    server: str

    def request(self, method: str, path: str, *, query: dict[str, Any] | None = None, body: Obj | None = None,
                timeout: Any = 30, stream: bool = False, **path_params: str) -> Any:
        """One API request; the JSON answer (or, with stream, the open response). Non-2xx raises ApiException."""
        from kubernetes.client.rest import ApiException

        headers = {"Accept": "application/json", **({"Content-Type": "application/json"} if body else {})}
        params = [(k, str(v).lower() if isinstance(v, bool) else v) for k, v in (query or {}).items()
                  if v is not None]
        method, url, headers, body_out, post = self.api.param_serialize(
            method=method, resource_path=path, path_params=path_params, query_params=params, header_params=headers,
            body=body, auth_settings=["BearerToken"])
        response = self.api.call_api(method, url, header_params=headers, body=body_out, post_params=post,
                                     _request_timeout=timeout)
        if not 200 <= response.status <= 299:
            response.read()
            raise ApiException.from_response(http_resp=response, body=None, data=None)
        if stream:
            return response.response
        response.read()
        return json.loads(response.data)


def connect(where: Target, *, check_namespace: bool = True) -> Kube:
    """A client for the target's kubeconfig and context; KubeError in one line when they are wrong."""
    from kubernetes import config
    from kubernetes.client import ApiClient, Configuration

    path = where.kubeconfig or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    if not any(os.path.isfile(f) for f in path.split(os.pathsep)):
        raise KubeError(f"kubeconfig {path} does not exist; set kubernetes.kubeconfig or $KUBECONFIG to your "
                        "cluster's kubeconfig")
    configuration = type.__call__(Configuration)
    try:
        config.load_kube_config(config_file=path, context=where.context, client_configuration=configuration,
                                persist_config=False)
    except config.ConfigException as exc:
        raise KubeError(_config_problem(str(exc), path, where.context)) from None
    configuration.retries = 0  # hpcray retries where it makes sense (the watch); elsewhere fail in one line
    kube = Kube(ApiClient(configuration), where.namespace, configuration.host)
    if check_namespace:
        with api_errors(kube, f"read namespace {kube.namespace}", namespace_check=True):
            kube.request("GET", "/api/v1/namespaces/{name}", name=kube.namespace, timeout=10)
    return kube


def _config_problem(message: str, path: str, context: str | None) -> str:
    if context and context in message:
        return (f"kube context '{context}' is not in {path}; fix kubernetes.context (see `kubectl config "
                "get-contexts`)")
    if "current-context" in message:
        return f"{path} has no current context; set kubernetes.context or run `kubectl config use-context NAME`"
    return f"{path}: {message.splitlines()[0]}; check the kubeconfig"


@contextlib.contextmanager
def api_errors(kube: Kube, what: str, *, namespace_check: bool = False) -> Iterator[None]:
    """Turn client exceptions into KubeError naming what was being done and how to fix it."""
    from kubernetes.client.rest import ApiException
    from urllib3.exceptions import HTTPError

    try:
        yield
    except ApiException as exc:
        raise KubeError(_api_problem(kube, what, exc, namespace_check)) from None
    except HTTPError as exc:
        raise KubeError(f"cannot reach the Kubernetes API at {kube.server} ({_network_reason(exc)}) to {what}; "
                        "check kubernetes.context / kubeconfig and that the API server is up") from None


def _api_problem(kube: Kube, what: str, exc: Any, namespace_check: bool) -> str:
    if exc.status == 401:
        return (f"the Kubernetes API at {kube.server} rejected our credentials (401 Unauthorized) to {what}; "
                "refresh the token in your kubeconfig")
    if exc.status == 403:
        return (f"no permission to {what} (403 Forbidden: {_api_message(exc)}); ask the cluster admin for RBAC "
                f"rights in namespace {kube.namespace}")
    if exc.status == 404 and namespace_check:
        return (f"namespace '{kube.namespace}' does not exist at {kube.server}; create it (`kubectl create "
                f"namespace {kube.namespace}`) or fix kubernetes.namespace")
    code = f"{exc.status} " if exc.status else ""  # 0 from the websocket client (port-forward)
    return f"the Kubernetes API could not {what} ({code}{_api_message(exc)})"


def _api_message(exc: Any) -> str:
    try:
        return str(json.loads(exc.body).get("message", exc.reason))
    except (TypeError, ValueError, AttributeError):
        return str(exc.reason).split(" -+-+- ")[0]  # the websocket client appends headers and body this way


def _network_reason(exc: BaseException) -> str:
    text = str(getattr(exc, "reason", None) or exc)
    for known in ("Connection refused", "Name or service not known", "timed out", "No route to host"):
        if known.lower() in text.lower():
            return known.lower()
    return text.split(":")[-1].strip() or type(exc).__name__


# ---------------------------------------------------------------------------------------------------------------
# Secrets (MLflow credentials, Ray's token): their values leave hpcray only in these request bodies
# ---------------------------------------------------------------------------------------------------------------


def apply_secret(kube: Kube, name: str, data: dict[str, Secret | str], labels: dict[str, str]) -> None:
    """Create the Secret, or replace it when it exists."""
    from kubernetes.client.rest import ApiException

    encoded = {k: base64.b64encode((v.reveal() if isinstance(v, Secret) else v).encode()).decode()
               for k, v in data.items()}
    body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "data": encoded,
            "metadata": {"name": name, "namespace": kube.namespace, "labels": labels}}
    with api_errors(kube, f"write Secret {name}"):
        try:
            kube.request("POST", "/api/v1/namespaces/{ns}/secrets", ns=kube.namespace, body=body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            kube.request("PUT", "/api/v1/namespaces/{ns}/secrets/{name}", ns=kube.namespace, name=name, body=body)


def read_secret(kube: Kube, name: str, key: str) -> Secret | None:
    """One key of a Secret, or None when the Secret or the key is absent."""
    from kubernetes.client.rest import ApiException

    with api_errors(kube, f"read Secret {name}"):
        try:
            found = kube.request("GET", "/api/v1/namespaces/{ns}/secrets/{name}", ns=kube.namespace, name=name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
    value = (found.get("data") or {}).get(key)
    return Secret(base64.b64decode(value).decode()) if value else None


def delete_secret(kube: Kube, name: str) -> bool:
    """False when there was no such Secret."""
    return _delete(kube, "secrets", name, f"Secret {name}")


def _delete(kube: Kube, resource: str, name: str, what: str) -> bool:
    """DELETE one object of a core resource (`secrets`, `pods`) in the target's namespace; False when it was absent."""
    from kubernetes.client.rest import ApiException

    with api_errors(kube, f"delete {what}"):
        try:
            kube.request("DELETE", f"/api/v1/namespaces/{{ns}}/{resource}/{{name}}", ns=kube.namespace, name=name)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
    return True


# ---------------------------------------------------------------------------------------------------------------
# Pods and RayClusters, read once
# ---------------------------------------------------------------------------------------------------------------


def list_pods(kube: Kube, selector: str, *, all_namespaces: bool = False) -> list[Obj]:
    with api_errors(kube, f"list pods ({selector})"):
        if all_namespaces:
            return kube.request("GET", "/api/v1/pods", query={"labelSelector": selector})["items"]
        return kube.request("GET", "/api/v1/namespaces/{ns}/pods", ns=kube.namespace,
                            query={"labelSelector": selector})["items"]


def get_raycluster(kube: Kube, name: str) -> Obj | None:
    from kubernetes.client.rest import ApiException

    with api_errors(kube, f"read RayCluster {name}"):
        try:
            return kube.request("GET", RAYCLUSTERS + "/namespaces/{ns}/rayclusters/{name}", ns=kube.namespace,
                                name=name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise


def server_version(kube: Kube, timeout: float = 10) -> str:
    """The API server's Kubernetes version (`/version`)."""
    with api_errors(kube, "read the server's version"):
        return str(kube.request("GET", "/version", timeout=timeout).get("gitVersion", "unknown"))


def rayclusters_served(kube: Kube, timeout: float = 10) -> bool:
    """Whether the API server serves KubeRay's RayCluster resource (its CRD is installed)."""
    from kubernetes.client.rest import ApiException

    with api_errors(kube, "read the ray.io/v1 API group"):
        try:
            found = kube.request("GET", RAYCLUSTERS, timeout=timeout)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
    return any(r.get("name") == "rayclusters" for r in found.get("resources") or [])


def list_rayclusters(kube: Kube) -> list[Obj]:
    """RayClusters in every namespace (empty when the CRD is not installed)."""
    from kubernetes.client.rest import ApiException

    with api_errors(kube, "list RayClusters"):
        try:
            return kube.request("GET", RAYCLUSTERS + "/rayclusters")["items"]
        except ApiException as exc:
            if exc.status == 404:
                return []
            raise


# ---------------------------------------------------------------------------------------------------------------
# A pod in words
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PodState:
    name: str
    role: str  # head | worker
    phase: str  # Pending | Running | Ready | Terminating | Failed | Succeeded | Unknown
    reason: str  # why it is not ready yet, in Kubernetes' words ("" when ready)
    created: float  # epoch seconds
    gpus: int
    node: str | None
    started: float | None = None  # epoch seconds: its first container running (on interLink: its SLURM job running)
    ended: float | None = None  # epoch seconds: its last container terminated, once all are
    time_limit_s: float | None = None  # its SLURM --time (slurm-job.vk.io/flags); None: none known

    @property
    def ready(self) -> bool:
        return self.phase == "Ready"

    def age(self, now: float | None = None) -> float:
        return max(0.0, (now or time.time()) - self.created)


def pod_state(pod: Obj) -> PodState:
    meta, spec, status = pod["metadata"], pod.get("spec") or {}, pod.get("status") or {}
    created = parse_time(meta.get("creationTimestamp") or "") or time.time()
    flags = (meta.get("annotations") or {}).get(SLURM_FLAGS, "")
    gpus = accounting.gpus_in_flags(flags) if flags else None
    if gpus is None:  # interLink makes no sbatch flag of the limit, but a regular node's kubelet allocates it
        gpus = sum(int(float(((c.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu", 0)))
                   for c in spec.get("containers") or [])
    phase = status.get("phase") or "Pending"
    conditions = {c["type"]: c for c in status.get("conditions") or []}
    ready = conditions.get("Ready", {}).get("status") == "True"
    if meta.get("deletionTimestamp"):
        shown, reason = "Terminating", "being deleted"
    elif phase == "Running" and ready:
        shown, reason = "Ready", ""
    else:
        shown, reason = phase, _not_ready_reason(status, conditions)
    role = (meta.get("labels") or {}).get(HEAD_LABEL, "worker")
    return PodState(meta["name"], role, shown, reason, created, gpus, spec.get("nodeName"),
                    *_run_times(status.get("containerStatuses") or []), time_limit_s=_time_limit(flags))


def _time_limit(flags: str) -> float | None:
    try:
        return walltime.time_limit(flags)
    except ValueError:  # a --time sbatch refuses: no limit hpcray can count with
        return None


def _run_times(statuses: list[Obj]) -> tuple[float | None, float | None]:
    """(first container start, last container end once all have ended) from the containers' states: what
    interLink's SLURM plugin reports as the SLURM job's start and end (`startedAt`, `finishedAt`)."""
    starts, ends = [], []
    for c in statuses:
        state = c.get("state") or {}
        current = state.get("running") or state.get("terminated") or {}
        if started := parse_time(current.get("startedAt") or ""):
            starts.append(started)
        if ended := parse_time((state.get("terminated") or {}).get("finishedAt") or ""):
            ends.append(ended)
    all_ended = bool(statuses) and len(ends) == len(statuses)
    return (min(starts) if starts else None), (max(ends) if all_ended else None)


def _not_ready_reason(status: Obj, conditions: dict[str, Obj]) -> str:
    for c in status.get("initContainerStatuses") or []:
        state = c.get("state") or {}
        if "waiting" in state:
            return f"init container {c['name']} waiting: {_waiting(state['waiting'])}"
        if "running" in state:
            return f"init container {c['name']} running"
    for c in status.get("containerStatuses") or []:
        state = c.get("state") or {}
        if "waiting" in state:
            text = _waiting(state["waiting"])
            last = (c.get("lastState") or {}).get("terminated")
            if last and state["waiting"].get("reason") == "CrashLoopBackOff":
                text += f" (last exit code {last.get('exitCode')}{_suffix(last.get('reason'))})"
            return f"container {c['name']} {text}"
        if "terminated" in state:
            t = state["terminated"]
            return f"container {c['name']} exited with code {t.get('exitCode')}{_suffix(t.get('reason'))}"
    scheduled = conditions.get("PodScheduled")
    if scheduled is not None and scheduled.get("status") == "False":
        return f"{scheduled.get('reason') or 'Unschedulable'}: {scheduled.get('message') or 'not scheduled yet'}"
    ready = conditions.get("Ready")
    if ready is not None and ready.get("status") == "False":
        return f"not Ready: {ready.get('message') or ready.get('reason') or 'readiness probe failing'}"
    return status.get("reason") or status.get("message") or "not scheduled yet"


def _waiting(waiting: Obj) -> str:
    reason = waiting.get("reason") or "waiting"
    return f"{reason}: {waiting['message']}" if waiting.get("message") else reason


def _suffix(reason: str | None) -> str:
    return f": {reason}" if reason else ""


def pod_warnings(kube: Kube, pod_name: str) -> list[tuple[str, str]]:
    """The pod's latest distinct Warning events as (reason, message): FailedScheduling, Failed (image pull), ...
    Newest last; the kubelet's bare "Error: ErrImagePull" echoes of a container's waiting reason are left out."""
    with api_errors(kube, f"list events of pod {pod_name}"):
        events = kube.request("GET", "/api/v1/namespaces/{ns}/events", ns=kube.namespace,
                              query={"fieldSelector": f"involvedObject.name={pod_name}"})["items"]
    warnings = sorted((e for e in events if e.get("type") == "Warning"), key=_event_time)
    seen: dict[str, tuple[str, str]] = {}
    for e in warnings:
        message = e.get("message") or ""
        if not re.fullmatch(r"Error: \w+", message):
            seen.pop(message, None)
            seen[message] = (e.get("reason") or "", message)
    return list(seen.values())[-3:]


@dataclass(frozen=True)
class DeletedPod:
    """A pod KubeRay deleted because it had ended (it makes a new pod, with a new name, in its place): what the
    Event it recorded on the RayCluster says of it."""

    name: str
    role: str  # head | worker
    phase: str  # the pod's phase then: Failed | Succeeded | Running (its Ray container ended, restartPolicy Never)
    reason: str  # the Ray container's terminated reason (SlurmJobTimeout, OOMKilled, Error, ...); "" if none
    exit_code: int | None
    at: float  # epoch seconds


VK_DELETED = "VKProviderPodContainerDeleted"  # virtual-kubelet: a container it ended because its pod was deleted
# KubeRay 1.2: reason Deleted, "Deleted head Pod NAME; ..."; 1.3 on: DeletedHeadPod/DeletedWorkerPod, "ns/NAME"
_DELETED = re.compile(r"Deleted (head|worker) Pod (?:[^/;\s]+/)?([^;\s]+); Pod status: (\w*); .*"
                      r"Ray container terminated status: (.*)$", re.S)


def pods_kuberay_deleted(kube: Kube, raycluster: Obj) -> list[DeletedPod]:
    """The pods KubeRay deleted after they ended (e.g. at SLURM's walltime), oldest first, from its Events on this
    RayCluster (by uid: not a former one of the same name). KubeRay deletes a pod still terminating again, and
    records that again: by then interLink's virtual kubelet has marked its containers VK_DELETED, which is never why
    a pod ended, so the Event that says why is the one kept (Event times are whole seconds: the order of two in one
    second is unknown). Events live about an hour (the API server's --event-ttl)."""
    uid = raycluster["metadata"]["uid"]
    with api_errors(kube, f"list events of RayCluster {raycluster['metadata']['name']}"):
        events = kube.request("GET", "/api/v1/namespaces/{ns}/events", ns=kube.namespace,
                              query={"fieldSelector": f"involvedObject.uid={uid}"})["items"]
    seen: list[DeletedPod] = []
    for e in events:
        if m := _DELETED.match(e.get("message") or ""):
            terminated = m[4]  # Go's %v of a *ContainerStateTerminated: &ContainerStateTerminated{ExitCode:1,...}
            reason, code = re.search(r"\bReason:([^,]*),", terminated), re.search(r"\bExitCode:(-?\d+),", terminated)
            seen.append(DeletedPod(m[2], m[1], m[3], reason[1] if reason else "", int(code[1]) if code else None,
                                   parse_time(e.get("firstTimestamp") or "") or _event_time(e)))
    first: dict[str, DeletedPod] = {}
    for d in sorted(seen, key=lambda d: (d.reason == VK_DELETED, d.at)):
        first.setdefault(d.name, d)
    return sorted(first.values(), key=lambda d: d.at)


def _event_time(event: Obj) -> float:
    for key in ("lastTimestamp", "eventTime", "firstTimestamp"):
        if event.get(key):
            return parse_time(event[key]) or 0.0
    return parse_time(event["metadata"].get("creationTimestamp") or "") or 0.0


def node_problem(kube: Kube, node: str) -> str | None:
    """Why the node (e.g. interLink's virtual node) cannot run pods, or None when it is Ready or unreadable."""
    from kubernetes.client.rest import ApiException
    from urllib3.exceptions import HTTPError

    try:
        n = kube.request("GET", "/api/v1/nodes/{name}", name=node, timeout=10)
    except (ApiException, HTTPError):
        return None  # nodes are cluster-scoped: many users may not read them, and this is only a hint
    for c in (n.get("status") or {}).get("conditions") or []:
        if c["type"] == "Ready" and c.get("status") != "True":
            why = ": ".join(x for x in (c.get("reason"), c.get("message")) if x) or "no reason given"
            return f"node {node} is NotReady ({why})"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Nodes (interLink's virtual node) and what the pods on one ask for
# ---------------------------------------------------------------------------------------------------------------

VIRTUAL_NODE_TAINT = "virtual-node.interlink/no-schedule"


def read_node(kube: Kube, name: str) -> Obj | None:
    """The Node, or None when there is none of that name; KubeError when it cannot be read (nodes are
    cluster-scoped: many users may not read them)."""
    from kubernetes.client.rest import ApiException

    with api_errors(kube, f"read node {name}"):
        try:
            return kube.request("GET", "/api/v1/nodes/{name}", name=name, timeout=10)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise


def is_virtual_node(node: Obj) -> bool:
    """An interLink virtual node: its virtual kubelet serves no port-forward, exec or attach (501)."""
    labels = node["metadata"].get("labels") or {}
    taints = (node.get("spec") or {}).get("taints") or []
    return ("virtual-kubelet" in (labels.get("virtual-node.interlink/type"), labels.get("type"))
            or any(t.get("key") == VIRTUAL_NODE_TAINT for t in taints))


def node_ready(node: Obj) -> tuple[bool, str]:
    """Whether the node's Ready condition is True, and its reason and message when not."""
    for c in (node.get("status") or {}).get("conditions") or []:
        if c["type"] == "Ready":
            why = ": ".join(x for x in (c.get("reason"), c.get("message")) if x) or "no reason given"
            return c.get("status") == "True", why
    return False, "it reports no Ready condition"


def pods_on_node(kube: Kube, node: str) -> list[Obj]:
    """Every pod bound to the node, in all namespaces (what the scheduler counts against its allocatable)."""
    with api_errors(kube, f"list the pods on node {node}"):
        return kube.request("GET", "/api/v1/pods", query={"fieldSelector": f"spec.nodeName={node}"})["items"]


def create_pod(kube: Kube, body: Obj) -> bool:
    """Create the pod; False when one of its name is there already (left as it is)."""
    from kubernetes.client.rest import ApiException

    name = body["metadata"]["name"]
    with api_errors(kube, f"create pod {name}"):
        try:
            kube.request("POST", "/api/v1/namespaces/{ns}/pods", ns=kube.namespace, body=body)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
    return True


def delete_pod(kube: Kube, name: str) -> bool:
    """False when there was no such pod."""
    return _delete(kube, "pods", name, f"pod {name}")


def pod_log_tail(kube: Kube, pod: str, container: str, lines: int = 50) -> str:
    """The last lines of a container's log ("" when the kubelet serves none)."""
    from kubernetes.client.rest import ApiException
    from urllib3.exceptions import HTTPError

    try:
        response = kube.request("GET", "/api/v1/namespaces/{ns}/pods/{name}/log", ns=kube.namespace, name=pod,
                                query={"container": container, "tailLines": lines}, timeout=10, stream=True)
        return response.data.decode("utf-8", "replace")
    except (ApiException, HTTPError, OSError):
        return ""


# ---------------------------------------------------------------------------------------------------------------
# The API server's service proxy: a Service's port through the API server, with the kubeconfig's credentials
# ---------------------------------------------------------------------------------------------------------------


def service_proxy(kube: Kube, service: str, port: int) -> Any:
    """An hpcray.http.Endpoint for `port` of `service` through the API server
    (`/api/v1/namespaces/NS/services/http:NAME:PORT/proxy`), carrying the kubeconfig's credentials: its bearer
    token (as a Secret), its client certificate and the CA it trusts."""
    import ssl

    from hpcray.http import Endpoint

    c = kube.api.configuration
    headers: dict[str, str | Secret] = {}
    token = (c.auth_settings().get("BearerToken") or {}).get("value")  # refreshes an exec plugin's token
    if token:
        headers["Authorization"] = Secret(token)
    context = None
    if c.host.startswith("https://"):
        context = ssl.create_default_context(cafile=c.ssl_ca_cert) if c.verify_ssl else \
            ssl._create_unverified_context()  # the kubeconfig's insecure-skip-tls-verify
        if c.cert_file:
            context.load_cert_chain(c.cert_file, c.key_file)
    base = f"{c.host.rstrip('/')}/api/v1/namespaces/{kube.namespace}/services/http:{service}:{port}/proxy"
    return Endpoint(base, headers, context)


# ---------------------------------------------------------------------------------------------------------------
# Watching pods until a condition holds
# ---------------------------------------------------------------------------------------------------------------

PodChange = Callable[[str, Obj | None], None]
"""Called with the pod name and the pod, or None when it was deleted."""


class PodWatch:
    """The pods matching a label selector, kept current by a watch that survives drops and restarts."""

    def __init__(self, kube: Kube, selector: str, notice: Callable[[str], None]) -> None:
        self.kube, self.selector, self.notice = kube, selector, notice
        self.pods: dict[str, Obj] = {}
        self.lost: str | None = None  # why the API server is out of reach, while it is
        self._rv: str | None = None

    def until(self, condition: Callable[[dict[str, Obj]], bool], *, deadline: Deadline,
              on_change: PodChange | None = None) -> bool:
        """Block until condition(pods) holds (True) or the deadline passes (False)."""
        from kubernetes.client.rest import ApiException
        from urllib3.exceptions import HTTPError

        backoff = 0.1
        while True:
            try:
                if self._rv is None:
                    self._relist(on_change)
                    if condition(self.pods):
                        return True
                if deadline.passed:
                    return False
                if self._stream(condition, deadline, on_change):
                    return True
                backoff = 0.1
            except ApiException as exc:
                if exc.status == 410:  # our resourceVersion is too old: list again
                    self._rv = None
                    continue
                if exc.status in (401, 403):
                    raise KubeError(_api_problem(self.kube, f"watch pods ({self.selector})", exc, False)) from None
                self._lose(f"{exc.status} {exc.reason}")
            except (HTTPError, OSError) as exc:
                self._lose(_network_reason(exc))
            if deadline.left <= backoff:
                return False
            deadline.sleep(backoff)
            backoff = min(backoff * 2, RECONNECT_MAX_S)

    def _relist(self, on_change: PodChange | None) -> None:
        listed = self.kube.request("GET", "/api/v1/namespaces/{ns}/pods", ns=self.kube.namespace,
                                   query={"labelSelector": self.selector}, timeout=(5, 30))
        self._back()
        fresh = {p["metadata"]["name"]: p for p in listed["items"]}
        for name in [n for n in self.pods if n not in fresh]:
            del self.pods[name]
            if on_change:
                on_change(name, None)
        for name, pod in fresh.items():
            old = self.pods.get(name)
            self.pods[name] = pod
            if on_change and (old is None or _rv(old) != _rv(pod)):
                on_change(name, pod)
        self._rv = listed["metadata"]["resourceVersion"]

    def _stream(self, condition: Callable[[dict[str, Obj]], bool], deadline: Deadline,
                on_change: PodChange | None) -> bool:
        from kubernetes import watch

        seconds = max(1, min(WATCH_CHUNK_S, math.ceil(deadline.left)))
        w = watch.Watch()
        stream = w.stream(self._list_pods, self.kube.namespace, label_selector=self.selector,
                          resource_version=self._rv, allow_watch_bookmarks=True, timeout_seconds=seconds,
                          _request_timeout=(5, seconds + 15))
        try:
            for event in stream:
                self._back()
                kind, pod = event["type"], event["object"]
                self._rv = _rv(pod) or self._rv
                if kind == "BOOKMARK":
                    continue
                name = pod["metadata"]["name"]
                if kind == "DELETED":
                    self.pods.pop(name, None)
                else:
                    self.pods[name] = pod
                if on_change:
                    on_change(name, None if kind == "DELETED" else pod)
                if condition(self.pods):
                    return True
        finally:
            w.stop()
            stream.close()
        return False

    def _list_pods(self, namespace: str, *, label_selector: str, resource_version: str, allow_watch_bookmarks: bool,
                   timeout_seconds: int, watch: bool, _preload_content: bool, _request_timeout: Any) -> Any:
        """The pods' list/watch endpoint in the calling convention of Watch.stream; having no return type Watch
        could read, its events stay JSON dicts."""
        query = {"labelSelector": label_selector, "resourceVersion": resource_version, "watch": watch,
                 "allowWatchBookmarks": allow_watch_bookmarks, "timeoutSeconds": timeout_seconds}
        return self.kube.request("GET", "/api/v1/namespaces/{ns}/pods", ns=namespace, query=query,
                                 timeout=_request_timeout, stream=not _preload_content)

    def _lose(self, reason: str) -> None:
        if self.lost is None:
            self.notice(f"lost the watch on pods ({reason}); reconnecting")
        self.lost = reason

    def _back(self) -> None:
        if self.lost is not None:
            self.notice("watch on pods resumed")
            self.lost = None


def _rv(obj: Obj) -> str | None:
    return obj.get("metadata", {}).get("resourceVersion")


# ---------------------------------------------------------------------------------------------------------------
# Port-forward to a pod (the head's dashboard)
# ---------------------------------------------------------------------------------------------------------------


def open_pod_port(kube: Kube, pod: str, port: int) -> Any:
    """A socket connected to `port` of `pod` through the API server's portforward (websocket) endpoint."""
    from kubernetes.client import CoreV1Api
    from kubernetes.stream import portforward

    with api_errors(kube, f"port-forward to pod {pod}"):
        pf = portforward(CoreV1Api(kube.api).connect_get_namespaced_pod_portforward, pod, kube.namespace,
                         ports=str(port))
    return pf.socket(port)


def parse_time(text: str) -> float | None:
    """An RFC 3339 time (as in annotations) to epoch seconds."""
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def format_time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
