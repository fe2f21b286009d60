"""A fake KubeRay operator, with the kube-scheduler, the endpoints controller and the kubelet of regular nodes,
living inside FakeKubeAPI.

KubeRay 1.2.2: a RayCluster gets a head pod `<name>-head-xxxxx`, `replicas` worker pods per worker group
`<name>-<group>-worker-xxxxx` and a head Service `<name>-head-svc`, built as KubeRay builds them
(tests/fake_kuberay_pods.py: command, env, `wait-gcs-ready` init container, ports); replicas are reconciled on
update; `.status.state` becomes "ready" once every pod is ready and is never cleared. Pods go away through the API
server's garbage collection when their RayCluster does.

Pods that end are replaced, as KubeRay 1.2.2's RayCluster controller does it (ray-project/kuberay
ray-operator/controllers/ray/raycluster_controller.go `reconcilePods` and `shouldDeletePod`; the form of PR #2217,
merged 2024-08-09 for v1.2.0, unchanged since, e.g. at 0055bf3): a head or worker pod whose phase is Failed or
Succeeded is deleted whatever its restartPolicy (so also the chart's default Always), and so is a Running pod whose
Ray container (the first) has terminated when its restartPolicy is Never. Each deletion is recorded as an Event on
the RayCluster (reason `Deleted`, from `raycluster-controller`: "Deleted head Pod NAME; Pod status: Failed; Pod
restart policy: Always; Ray container terminated status: &ContainerStateTerminated{...,Reason:SlurmJobTimeout,...}",
Go's rendering of the container's terminated state; KubeRay ≥ 1.3 says `DeletedHeadPod` / "ns/NAME"). A reconcile
that deletes a head does nothing else; one that deletes workers of a group creates none. KubeRay lists pods still
terminating and counts them, so the replacement — a new pod, a new generated name and uid (`Created` Event "Created
head pod NAME"; a worker's "Created worker pod " names none, a 1.2 bug) — comes once the old pod object is gone; a
pod still listed is deleted (and the Event recorded) again on every reconcile. On interLink's virtual node nothing
restarts a container, so a SLURM walltime kill (the plugin's `SlurmJobTimeout`) makes the pod Failed, KubeRay
deletes it and a new pod queues for a new SLURM job: the Failed pod and its reason stay visible only in that Event.

Every pod without a node is scheduled like kube-scheduler does (tests/fake_kube_scheduler.py: taints,
nodeSelector/affinity, requests vs allocatable); one that fits nowhere stays Pending with the scheduler's
FailedScheduling message. A pod bound to an interLink virtual node is handed to that node's virtual kubelet
(tests/fake_interlink.py); on a regular node this fake kubelet moves it scheduled → Running → Ready, `delay`
seconds per step (`mode = "auto"`), or leaves it until the test says (`mode = "manual"`). Rules (`keep_pending`,
`fail_image_pull`, `crash`, `make_ready`) select pods by namespace/cluster/group/pod, apply to matching pods now
and to those created later, and override the scheduler; the latest matching rule wins. Control methods may be
called from any thread.
"""

from __future__ import annotations

import asyncio
import copy
import time
import traceback
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal

from tests.fake_kube_objects import ENDPOINTS, EVENTS, NODES, PODS, SERVICES, ApiError, Obj, now_iso
from tests.fake_kube_scheduler import endpoints_for, kubelet_node, schedule
from tests.fake_kube_store import Change
from tests.fake_kuberay_pods import build_pod, head_service, head_service_name

if TYPE_CHECKING:
    from tests.fake_kube_api import FakeKubeAPI, Resource

TICK_S = 0.05
NODE = "fake-node-1"
AUTO_STEPS = {"pending": "scheduled", "scheduled": "running", "running": "ready", "unfit": "scheduled"}
RESCHEDULE_S = 1.0  # how often a pod that fits nowhere is tried again


@dataclass(frozen=True)
class PodSelector:
    """Which pods a rule is about; None matches anything. `group` is "headgroup" or a worker groupName."""
    namespace: str | None = "default"
    cluster: str | None = None
    group: str | None = None
    pod: str | None = None

    def __call__(self, pod: Obj) -> bool:
        labels = pod["metadata"].get("labels", {})
        return ((self.namespace is None or pod["metadata"].get("namespace") == self.namespace)
                and (self.cluster is None or labels.get("ray.io/cluster") == self.cluster)
                and (self.group is None or labels.get("ray.io/group") == self.group)
                and (self.pod is None or pod["metadata"]["name"] == self.pod))


class FakeKubeRayOperator:
    """Reconciles RayClusters into pods and a head Service, and plays scheduler/kubelet for those pods."""

    def __init__(self, api: FakeKubeAPI, *, mode: Literal["auto", "manual"] = "auto", delay: float = 0.05,
                 terminating_delay: float = 0.0) -> None:
        self.api, self.store = api, api.store
        self.mode = mode
        self.delay = delay  # seconds per automatic step
        self.terminating_delay = terminating_delay  # seconds a deleted pod on a node stays Terminating
        self.errors: list[str] = []  # tracebacks of the operator's own failures; a test can assert it is empty
        self._rules: list[tuple[PodSelector, str, dict[str, Any]]] = []
        self._stages: dict[tuple[str, str], str] = {}  # pod → stage it was last put in
        self._plans: dict[tuple[str, str], tuple[str, float]] = {}  # pod → (next stage, monotonic due time)
        self._dirty: set[tuple[str, str]] = set()  # RayClusters to reconcile
        self._task: asyncio.Task[None] | None = None
        self.store.listeners.append(self._on_change)
        self._endpoints_dirty: set[str] = set()  # namespaces whose Endpoints to recompute
        if self.store.find(NODES, None, NODE) is None:  # the regular node, with a kubelet played by this fake
            self.store.create(NODES, kubelet_node(NODE))

    # -- test controls (any thread) ------------------------------------------------------------------------------
    def keep_pending(self, *, namespace: str | None = "default", cluster: str | None = None,
                     group: str | None = None, pod: str | None = None, reason: str = "Unschedulable",
                     message: str = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.") -> None:
        """Matching pods stay Pending: PodScheduled False with reason/message, and a FailedScheduling Event."""
        self._rule(PodSelector(namespace, cluster, group, pod), "unschedulable", reason=reason, message=message)

    def fail_image_pull(self, *, namespace: str | None = "default", cluster: str | None = None,
                        group: str | None = None, pod: str | None = None,
                        message: str = "rpc error: code = NotFound desc = manifest unknown") -> None:
        """Matching pods get scheduled, then ErrImagePull and (`delay` later) ImagePullBackOff, with Failed Events."""
        self._rule(PodSelector(namespace, cluster, group, pod), "errimagepull", message=message)

    def crash(self, *, namespace: str | None = "default", cluster: str | None = None, group: str | None = None,
              pod: str | None = None, exit_code: int = 1) -> None:
        """Matching pods run, and their first container is in CrashLoopBackOff after exiting with `exit_code`."""
        self._rule(PodSelector(namespace, cluster, group, pod), "crashloop", exit_code=exit_code)

    def make_ready(self, *, namespace: str | None = "default", cluster: str | None = None, group: str | None = None,
                   pod: str | None = None) -> None:
        """Matching pods are Running and Ready now (overrides earlier rules)."""
        self._rule(PodSelector(namespace, cluster, group, pod), "ready")

    def set_pod_phase(self, pod: str, phase: str, *, namespace: str = "default", ready: bool = False,
                      reason: str = "", message: str = "") -> None:
        """Write one existing pod's status.phase and Ready condition directly (no rule, no further steps)."""
        def run() -> None:
            obj = self.store.get(PODS, namespace, pod)
            self._plans.pop((namespace, pod), None)
            self._stages[(namespace, pod)] = "set"
            status = copy.deepcopy(obj.get("status", {}))
            status.update(phase=phase, reason=reason, message=message)
            status["conditions"] = [c for c in status.get("conditions", []) if c["type"] != "Ready"] + [
                _condition("Ready", ready, "" if ready else "ContainersNotReady")]
            self._write_status(obj, status)
        self.api.call(run)

    def _rule(self, selector: PodSelector, fate: str, **params: Any) -> None:
        def run() -> None:
            self._rules.append((selector, fate, params))
            for pod in self.store.list(PODS, selector.namespace):
                if selector(pod) and self._virtual(pod) is None and not pod["metadata"].get("deletionTimestamp"):
                    self._enter(pod, fate, params)
        self.api.call(run)

    # -- wiring to the server's loop -----------------------------------------------------------------------------
    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start working on the server's loop; every RayCluster is reconciled (also after an API restart)."""
        self._task = loop.create_task(self._run())
        rc = self._rc_resource()
        self._dirty |= {(o["metadata"]["namespace"], o["metadata"]["name"]) for o in self.store.list(rc)} if rc else set()

    def detach(self) -> None:
        """Stop working (the server is stopping); plans are kept for the next attach."""
        if self._task:
            self._task.cancel()
        self._task = None

    async def _run(self) -> None:
        while True:
            self._guard(self._reconcile_dirty)
            self._guard(self._tick)
            await asyncio.sleep(TICK_S)

    def _guard(self, fn: Any) -> None:
        try:
            fn()
        except Exception:  # kept for the test to see; the operator goes on like a real controller would
            self.errors.append(traceback.format_exc())

    def _on_change(self, change: Change) -> None:
        obj = change.new or change.old
        assert obj is not None
        meta = obj["metadata"]
        if change.res.kind == "RayCluster" and change.res.group == "ray.io":
            old_gen = (change.old or {}).get("metadata", {}).get("generation")
            if change.new is not None and old_gen != meta.get("generation"):
                self._dirty.add((meta["namespace"], meta["name"]))
        elif change.res is PODS:
            self._endpoints_dirty.add(meta["namespace"])
            if self._is_ours(obj):
                self._dirty.add((meta["namespace"], meta["labels"]["ray.io/cluster"]))
            if change.old is None and change.new is not None:
                self._start_pod(change.new)
            elif change.new is None:
                self._stages.pop(_key(obj), None)
                self._plans.pop(_key(obj), None)
            elif meta.get("deletionTimestamp") and not (change.old or {}).get("metadata", {}).get("deletionTimestamp"):
                vk = self.api.virtual_kubelets.get(obj["spec"].get("nodeName", ""))
                if vk is not None:
                    self._guard(lambda: vk.delete_pod(obj))  # the virtual kubelet ends the job, removes the pod
                else:
                    self._plans[_key(obj)] = ("gone", time.monotonic() + self.terminating_delay)  # kubelet stops it
        elif change.res is SERVICES:
            self._endpoints_dirty.add(meta["namespace"])
            if change.new is None and self.store.find(ENDPOINTS, meta["namespace"], meta["name"]) is not None:
                self.store.delete(ENDPOINTS, meta["namespace"], meta["name"])

    # -- reconciling RayClusters ---------------------------------------------------------------------------------
    def _rc_resource(self) -> Resource | None:
        return self.store.resource("ray.io", "v1", "rayclusters")

    @staticmethod
    def _is_ours(pod: Obj) -> bool:
        return "ray.io/cluster" in pod["metadata"].get("labels", {})

    def _reconcile_dirty(self) -> None:
        while self._dirty:
            namespace, name = self._dirty.pop()
            rc_res = self._rc_resource()
            rc = self.store.find(rc_res, namespace, name) if rc_res else None
            if rc_res and rc and not rc["metadata"].get("deletionTimestamp"):
                self._reconcile(rc_res, rc)

    def _reconcile(self, rc_res: Resource, rc: Obj) -> None:
        spec, name, ns = rc.get("spec", {}), rc["metadata"]["name"], rc["metadata"]["namespace"]
        groups: dict[str, tuple[Obj, int, str]] = {"headgroup": (spec.get("headGroupSpec", {}), 1, "head")}
        for wg in spec.get("workerGroupSpecs") or []:
            groups[wg["groupName"]] = (wg, wg.get("replicas", 0) * wg.get("numOfHosts", 1), "worker")
        if self.store.find(SERVICES, ns, head_service_name(name)) is None:
            self.store.create(SERVICES, head_service(rc))
        listed = self.store.list(PODS, ns, f"ray.io/cluster={name}")  # terminating pods too, as KubeRay's cache
        for group, (group_spec, want, node_type) in groups.items():
            have = [p for p in listed if p["metadata"]["labels"].get("ray.io/group") == group]
            ended = [p for p in have if _should_delete(p)] if node_type == "worker" or len(have) == 1 else []
            for pod in ended:
                self.store.delete(PODS, ns, pod["metadata"]["name"])
                self._rc_event(rc, "Deleted", f"Deleted {node_type} Pod {_deleted_words(pod)}")
            if ended:
                break  # KubeRay returns an error and requeues: nothing else is reconciled this time
            for _ in range(want - len(have)):
                pod = self.store.create(PODS, build_pod(rc, node_type, group_spec))
                named = pod["metadata"]["name"] if node_type == "head" else ""  # a worker's: unnamed in 1.2
                self._rc_event(rc, "Created", f"Created {node_type} pod {named}")
            for extra in have[want:]:
                self.store.delete(PODS, ns, extra["metadata"]["name"])
                if node_type == "worker":
                    self._rc_event(rc, "Deleted", f"Deleted Pod {extra['metadata']['name']}")
        live = [p for p in listed if not p["metadata"].get("deletionTimestamp")]
        for orphan in (p for p in live if p["metadata"]["labels"].get("ray.io/group") not in groups):
            self.store.delete(PODS, ns, orphan["metadata"]["name"])
        self._update_status(rc_res, rc)

    def _rc_event(self, rc: Obj, reason: str, message: str) -> None:
        """A Normal Event about the RayCluster from KubeRay's recorder; a repeat counts up, as Kubernetes does."""
        ns, now = rc["metadata"]["namespace"], now_iso()
        same = [e for e in self.store.list(EVENTS, ns, fields=f"involvedObject.uid={rc['metadata']['uid']}")
                if (e["reason"], e["message"]) == (reason, message)]
        if same:
            self.store.replace(EVENTS, ns, same[0]["metadata"]["name"],
                               {**same[0], "count": same[0]["count"] + 1, "lastTimestamp": now})
            return
        try:
            self.store.create(EVENTS, {
                "metadata": {"name": f"{rc['metadata']['name']}.{uuid.uuid4().hex[:16]}", "namespace": ns},
                "involvedObject": {"kind": "RayCluster", "apiVersion": "ray.io/v1", "namespace": ns,
                                   "name": rc["metadata"]["name"], "uid": rc["metadata"]["uid"],
                                   "resourceVersion": rc["metadata"].get("resourceVersion", "")},
                "reason": reason, "message": message, "type": "Normal",
                "source": {"component": "raycluster-controller"}, "reportingComponent": "raycluster-controller",
                "firstTimestamp": now, "lastTimestamp": now, "count": 1})
        except ApiError:  # the namespace is going away
            pass

    def _update_status(self, rc_res: Resource, rc: Obj) -> None:
        """KubeRay 1.2.2's status: counts, endpoints, head addresses; state "ready" once, never cleared."""
        name, ns, spec = rc["metadata"]["name"], rc["metadata"]["namespace"], rc.get("spec", {})
        pods = [p for p in self.store.list(PODS, ns, f"ray.io/cluster={name}")
                if not p["metadata"].get("deletionTimestamp")]
        workers = [p for p in pods if p["metadata"]["labels"].get("ray.io/node-type") == "worker"]
        head = next((p for p in pods if p["metadata"]["labels"].get("ray.io/node-type") == "head"), None)
        groups = spec.get("workerGroupSpecs") or []
        desired = sum(g.get("replicas", 0) * g.get("numOfHosts", 1) for g in groups)
        svc = self.store.find(SERVICES, ns, head_service_name(name))
        old = rc.get("status") or {}
        status = {**old, "desiredWorkerReplicas": desired,
                  "minWorkerReplicas": sum(g.get("minReplicas", 0) * g.get("numOfHosts", 1) for g in groups),
                  "maxWorkerReplicas": sum(g.get("maxReplicas", 0) * g.get("numOfHosts", 1) for g in groups),
                  "availableWorkerReplicas": sum(p["status"].get("phase") == "Running" for p in workers),
                  "readyWorkerReplicas": sum(_is_ready(p) for p in workers),
                  "endpoints": {p["name"]: str(p["port"]) for p in (svc or {}).get("spec", {}).get("ports") or []},
                  "head": {"podName": head["metadata"]["name"] if head else "",
                           "podIP": (head or {}).get("status", {}).get("podIP", ""),
                           "serviceName": head_service_name(name), "serviceIP": (svc or {}).get("spec", {}).get("clusterIP", "")},
                  "observedGeneration": rc["metadata"].get("generation", 1)}
        if head and len(workers) == desired and all(_is_ready(p) for p in pods):
            status["state"] = "ready"
        if {k: v for k, v in status.items() if k != "lastUpdateTime"} != \
                {k: v for k, v in old.items() if k != "lastUpdateTime"}:
            status["lastUpdateTime"] = now_iso()
            self.store.replace(rc_res, ns, name, {**rc, "status": status}, subresource="status")

    # -- scheduler and kubelet -----------------------------------------------------------------------------------
    def _start_pod(self, pod: Obj) -> None:
        if (vk := self._virtual(pod)) is not None:
            self._guard(lambda: vk.create_pod(pod))  # created already bound to a virtual node
            return
        self._stages[_key(pod)] = "pending"
        fate = next(((f, p) for sel, f, p in reversed(self._rules) if sel(pod)), None)
        if fate:
            self._enter(pod, *fate)

    def _virtual(self, pod: Obj) -> Any:
        return self.api.virtual_kubelets.get(pod.get("spec", {}).get("nodeName") or "")

    def _tick(self) -> None:
        now = time.monotonic()
        if self.mode == "auto":
            for key, stage in list(self._stages.items()):
                if stage in AUTO_STEPS and key not in self._plans:
                    self._plans[key] = (AUTO_STEPS[stage], now + (RESCHEDULE_S if stage == "unfit" else self.delay))
        for key, (stage, due) in list(self._plans.items()):
            if due > now or self._plans.get(key) != (stage, due):
                continue
            del self._plans[key]
            pod = self.store.find(PODS, *key)
            if pod is not None and stage == "gone":
                self.store.delete(PODS, key[0], key[1], grace_seconds=0)
            elif pod is not None and not pod["metadata"].get("deletionTimestamp"):
                self._enter(pod, stage, {})
        for namespace in list(self._endpoints_dirty):
            self._endpoints_dirty.discard(namespace)
            self._write_endpoints(namespace)

    def _write_endpoints(self, namespace: str) -> None:
        """The endpoints controller: one Endpoints object per Service with a selector, from its pods."""
        pods = self.store.list(PODS, namespace)
        for svc in self.store.list(SERVICES, namespace):
            if not svc.get("spec", {}).get("selector"):
                continue
            want = endpoints_for(svc, pods, self.api.pod_network.cidrs if self.api.pod_network else ())
            live = self.store.find(ENDPOINTS, namespace, svc["metadata"]["name"])
            if want is None:
                continue  # an address the API server refuses: the controller's write fails
            if live is None:
                self.store.create(ENDPOINTS, want)
            elif (live.get("subsets"), live["metadata"].get("labels")) != (want.get("subsets"),
                                                                           want["metadata"]["labels"]):
                body = {**live, "metadata": {**live["metadata"], "labels": want["metadata"]["labels"]}}
                body.pop("subsets", None)
                self.store.replace(ENDPOINTS, namespace, svc["metadata"]["name"], {**body, **(
                    {"subsets": want["subsets"]} if "subsets" in want else {})})
        self.api.write_cluster_dns()

    def _bind(self, pod: Obj, node: str) -> Obj:
        key, name = _key(pod), pod["metadata"]["name"]
        pod = self.store.replace(PODS, key[0], name, {**pod, "spec": {**pod["spec"], "nodeName": node}})
        self._event(pod, "Normal", "Scheduled", f"Successfully assigned {key[0]}/{name} to {node}", "default-scheduler")
        return pod

    def _enter(self, pod: Obj, stage: str, params: dict[str, Any]) -> None:
        """Put a pod in a stage: write its spec/status as the scheduler and kubelet would, and their Events."""
        key, name = _key(pod), pod["metadata"]["name"]
        self._stages[key] = stage
        self._plans.pop(key, None)
        containers = pod["spec"].get("containers", [])
        image = next((c.get("image", "") for c in containers), "")
        if stage == "unschedulable":
            self._write_status(pod, {"phase": "Pending", "conditions": [
                _condition("PodScheduled", False, params["reason"], params["message"])]})
            self._event(pod, "Warning", "FailedScheduling", params["message"], "default-scheduler")
            return
        if stage == "scheduled" and not pod["spec"].get("nodeName"):
            nodes = self.store.list(NODES)
            node, message = schedule(pod, nodes, self.store.list(PODS))
            if node is None:
                self._stages[key] = "unfit"
                scheduled = next((c for c in pod.get("status", {}).get("conditions") or []
                                  if c["type"] == "PodScheduled"), {})
                if scheduled.get("message") != message:
                    self._write_status(pod, {"phase": "Pending", "conditions": [
                        _condition("PodScheduled", False, "Unschedulable", message)]})
                self._event(pod, "Warning", "FailedScheduling", message, "default-scheduler")
                return
            pod = self._bind(pod, node)
        elif not pod["spec"].get("nodeName"):
            pod = self._bind(pod, NODE)  # a test's rule: onto the regular node, whatever the scheduler says
        vk = self._virtual(pod)
        if vk is not None:
            self._stages.pop(key, None)
            vk.create_pod(pod)
            return
        if stage == "scheduled":
            self._write_status(pod, _pod_status("Pending", containers, {"waiting": {"reason": "ContainerCreating"}}))
        elif stage == "errimagepull":
            self._write_status(pod, _pod_status("Pending", containers, {"waiting": {
                "reason": "ErrImagePull", "message": params["message"]}}))
            self._event(pod, "Warning", "Failed", f'Failed to pull image "{image}": {params["message"]}', "kubelet")
            self._event(pod, "Warning", "Failed", "Error: ErrImagePull", "kubelet")
            self._plans[key] = ("imagepullbackoff", time.monotonic() + self.delay)
        elif stage == "imagepullbackoff":
            self._write_status(pod, _pod_status("Pending", containers, {"waiting": {
                "reason": "ImagePullBackOff", "message": f'Back-off pulling image "{image}"'}}))
            self._event(pod, "Normal", "BackOff", f'Back-off pulling image "{image}"', "kubelet")
            self._event(pod, "Warning", "Failed", "Error: ImagePullBackOff", "kubelet")
        elif stage == "crashloop":
            status = _pod_status("Running", containers, {"running": {"startedAt": now_iso()}}, ready=False)
            first = status["containerStatuses"][0] if containers else {}
            first.update(restartCount=1, state={"waiting": {
                "reason": "CrashLoopBackOff",
                "message": f"back-off 10s restarting failed container={first.get('name')} pod={name}"}},
                lastState={"terminated": {"exitCode": params["exit_code"], "reason": "Error",
                                          "startedAt": now_iso(), "finishedAt": now_iso()}})
            self._write_status(pod, status)
            self._event(pod, "Warning", "BackOff", f"Back-off restarting failed container {first.get('name')} in "
                                                   f"pod {name}", "kubelet")
        elif stage in ("running", "ready"):
            self._write_status(pod, _pod_status("Running", containers, {"running": {"startedAt": now_iso()}},
                                                ready=stage == "ready"))
            if stage == "running" or not any(e["reason"] == "Started" for e in self._events(pod)):
                for reason, msg in (("Pulled", f'Container image "{image}" already present on machine'),
                                    ("Created", "Created container"), ("Started", "Started container")):
                    self._event(pod, "Normal", reason, msg, "kubelet")

    def _write_status(self, pod: Obj, status: Obj) -> None:
        live = self.store.find(PODS, *_key(pod))
        if live is None:
            return
        if status["phase"] == "Running":
            status = {**status, "podIP": f"10.244.0.{sum(map(ord, live['metadata']['name'])) % 250 + 2}",
                      "hostIP": "10.0.0.1", "startTime": live.get("status", {}).get("startTime", now_iso())}
        self.store.replace(PODS, *_key(pod), {**live, "status": status}, subresource="status")

    def _events(self, pod: Obj) -> list[Obj]:
        return self.store.list(EVENTS, pod["metadata"]["namespace"], fields=f"involvedObject.name={pod['metadata']['name']}")

    def _event(self, pod: Obj, type_: str, reason: str, message: str, component: str) -> None:
        """A core/v1 Event about the pod; a repeat of the same reason and message counts up, as Kubernetes does."""
        ns, now = pod["metadata"]["namespace"], now_iso()
        same = [e for e in self._events(pod) if (e["reason"], e["message"]) == (reason, message)]
        if same:
            ev = same[0]
            self.store.replace(EVENTS, ns, ev["metadata"]["name"], {**ev, "count": ev["count"] + 1, "lastTimestamp": now})
            return
        try:
            self.store.create(EVENTS, {
                "metadata": {"name": f"{pod['metadata']['name']}.{uuid.uuid4().hex[:16]}", "namespace": ns},
                "involvedObject": {"kind": "Pod", "apiVersion": "v1", "namespace": ns, "name": pod["metadata"]["name"],
                                   "uid": pod["metadata"]["uid"]},
                "reason": reason, "message": message, "type": type_, "source": {"component": component},
                "reportingComponent": component, "firstTimestamp": now, "lastTimestamp": now, "count": 1})
        except ApiError:  # the namespace is going away
            pass


def _ray_terminated(pod: Obj) -> Obj | None:
    """getRayContainerStateTerminated: the first container's terminated state, found by name (None if not)."""
    containers = pod.get("spec", {}).get("containers") or [{}]
    status = next((c for c in (pod.get("status") or {}).get("containerStatuses") or []
                   if c.get("name") == containers[0].get("name")), {})
    return (status.get("state") or {}).get("terminated")


def _should_delete(pod: Obj) -> bool:
    """shouldDeletePod of KubeRay 1.2.2 (see the module's docstring)."""
    phase = (pod.get("status") or {}).get("phase")
    if phase in ("Failed", "Succeeded"):
        return True
    return phase == "Running" and _ray_terminated(pod) is not None and pod["spec"].get("restartPolicy") == "Never"


def _go_time(text: str | None) -> str:
    """A metav1.Time as Go's %v prints it."""
    when = datetime.fromisoformat(text.replace("Z", "+00:00")) if text else datetime(1, 1, 1, tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S +0000 UTC")


def _deleted_words(pod: Obj) -> str:
    """The rest of KubeRay 1.2.2's Deleted Event: name, phase, restartPolicy, the Ray container's terminated state
    as Go's %v prints a *corev1.ContainerStateTerminated."""
    t = _ray_terminated(pod)
    state = "nil" if t is None else (
        f"&ContainerStateTerminated{{ExitCode:{t.get('exitCode', 0)},Signal:{t.get('signal', 0)},"
        f"Reason:{t.get('reason', '')},Message:{t.get('message', '')},StartedAt:{_go_time(t.get('startedAt'))},"
        f"FinishedAt:{_go_time(t.get('finishedAt'))},ContainerID:{t.get('containerID', '')},}}")
    return (f"{pod['metadata']['name']}; Pod status: {(pod.get('status') or {}).get('phase', '')}; Pod restart policy: "
            f"{pod['spec'].get('restartPolicy', '')}; Ray container terminated status: {state}")


def _key(pod: Obj) -> tuple[str, str]:
    return pod["metadata"]["namespace"], pod["metadata"]["name"]


def _is_ready(pod: Obj) -> bool:
    status = pod.get("status", {})
    return status.get("phase") == "Running" and any(
        c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", []))


def _condition(type_: str, ok: bool, reason: str = "", message: str = "") -> Obj:
    out = {"type": type_, "status": "True" if ok else "False", "lastTransitionTime": now_iso()}
    return {**out, **({"reason": reason} if reason else {}), **({"message": message} if message else {})}


def _pod_status(phase: str, containers: list[Obj], state: Obj, ready: bool = False) -> Obj:
    started = "running" in state
    return {"phase": phase, "conditions": [
        _condition("PodScheduled", True), _condition("Initialized", True),
        _condition("ContainersReady", ready, "" if ready else "ContainersNotReady"),
        _condition("Ready", ready, "" if ready else "ContainersNotReady")],
        "containerStatuses": [{"name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": ready,
                               "started": started, "restartCount": 0, "state": copy.deepcopy(state)}
                              for c in containers]}
