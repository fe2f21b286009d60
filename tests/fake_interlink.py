"""interLink's virtual kubelet for one virtual node, in front of its SLURM plugin (tests/fake_interlink_plugin.py)
over the real single-node SLURM: what happens to a pod the scheduler binds to the virtual node.

As interLink does it (interlink-hq/interLink pkg/virtualkubelet: virtualkubelet.go `CreatePod`/`DeletePod`/
`statusLoop`, execute.go `RemoteExecution`/`checkPodsStatus`; virtual-kubelet node/pod.go; facts in
../shared/docs/interlink-facts.md):

- The Node is registered as interLink registers it (tests/fake_kube_scheduler.py `interlink_node`).
- CreatePod: with `interlink.eu/pod-vpn` the first free address of the node's PodCIDR (from .2, at most .250,
  skipping every `interlink.eu/pod-ip` already annotated) is written to the pod's `interlink.eu/pod-ip`; without a
  PodCIDR the creation fails with "node podCIDR not found". The pod IP is that address, else 127.0.0.1. A creation
  error is the virtual-kubelet library's `handleProviderError`: reason ProviderFailed, the error as message, phase
  Pending (Failed with restartPolicy Never). The pod is Pending (Initialized, PodScheduled) until SLURM runs it.
- Env: secretKeyRef, configMapKeyRef, fieldRef, resourceFieldRef and envFrom are resolved to plain values (the
  library's PopulateEnvironmentVariables; `$(VAR)` references expanded) before the plugin sees the pod; Secret and
  ConfigMap volumes travel as objects.
- The plugin's create runs asynchronously; its failure (sbatch's stderr, "unsupported hostPath type ...") makes the
  pod Failed with reason ProviderFailed and the plugin's message (interLink #471/#501), every container terminated.
- Status: every `poll_s` seconds (interLink: a 5 s status loop over a plugin cache of 10 s) the plugin's container
  statuses become the pod's: any running → phase Running, conditions just Ready=True; all terminated → Succeeded
  (reason Completed) or Failed (reason `Error: N`). A terminated container keeps the plugin's reason where it gives
  one (SlurmJobTimeout, OOMKilled), as interLink's facts sheet reports, else Completed / `Error: N`. The plugin never
  reports init containers: a worker whose `wait-gcs-ready` loops is Running and Ready as soon as its job runs.
- DeletePod: scancel and the job directory goes (the plugin), the job's networks go (the box), the containers are
  terminated with VKProviderPodContainerDeleted, then the pod object goes.
- The kubelet API: logs are the plugin's (job.out + run-<container>.out); port-forward, exec and attach answer
  501 (tests/fake_kube_proxy.py).
"""

from __future__ import annotations

import base64
import concurrent.futures
import copy
import ipaddress
import re
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any, Callable

from tests.fake_interlink_plugin import PluginError, SlurmPlugin
from tests.fake_kube_objects import CONFIGMAPS, NODES, PODS, SECRETS, ApiError, Obj, now_iso
from tests.fake_kube_scheduler import interlink_node, quantity

if TYPE_CHECKING:
    from tests.fake_interlink_net import PodNetwork
    from tests.fake_kube_api import FakeKubeAPI

_FIELD = re.compile(r"^metadata\.(labels|annotations)\[['\"]?(.+?)['\"]?\]$")
_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)|\$\$")


class EnvError(Exception):
    """A reference the virtual kubelet cannot resolve (missing Secret, ConfigMap or key)."""


def _condition(type_: str, status: bool) -> Obj:
    return {"type": type_, "status": "True" if status else "False"}


def _expand(value: str, env: dict[str, str]) -> str:
    return _REF.sub(lambda m: "$" if m[0] == "$$" else env.get(m[1], m[0]), value)


class FakeVirtualKubelet:
    """`FakeVirtualKubelet(api, node=..., plugin=...).start()`; the fake scheduler hands it the pods it binds."""

    def __init__(self, api: FakeKubeAPI, *, node: str, plugin: SlurmPlugin, pod_network: PodNetwork | None = None,
                 poll_s: float = 1.0, cpu: str = "100", memory: str = "3000G", pods: str = "10000",
                 accelerators: dict[str, str] | None = None, pod_cidr: str = "",
                 labels: dict[str, str] | None = None, taints: tuple[Obj, ...] = (),
                 volume_wait_s: float = 300.0) -> None:
        self.api, self.node, self.plugin, self.pod_network = api, node, plugin, pod_network
        self.poll_s, self.volume_wait_s = poll_s, volume_wait_s
        self.node_object = interlink_node(node, cpu=cpu, memory=memory, pods=pods, accelerators=accelerators,
                                          pod_cidr=pod_cidr, labels=labels, taints=taints)
        self.errors: list[str] = []  # tracebacks of the fake's own failures; a test can assert it is empty
        self._remote = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"interlink-{node}")
        self._pods: dict[str, Obj] = {}  # uid → the pod as handed to the plugin
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def start(self) -> FakeVirtualKubelet:
        def register() -> None:
            if self.api.store.find(NODES, None, self.node) is None:
                self.api.store.create(NODES, copy.deepcopy(self.node_object))
            self.api.virtual_kubelets[self.node] = self
        self.api.call(register)
        self._poller = threading.Thread(target=self._poll, name=f"interlink-status-{self.node}", daemon=True)
        self._poller.start()
        return self

    def stop(self) -> None:
        """Stop polling and end every job this node runs (scancel, job directories, networks)."""
        self._stop.set()
        if self._poller:
            self._poller.join(timeout=30)
        for pod in list(self._pods.values()):
            self._end(pod)
        self._remote.shutdown(wait=True)
        self.api.call(lambda: self.api.virtual_kubelets.pop(self.node, None))

    def job_id(self, pod: Obj) -> str | None:
        job = self.plugin.jobs.get(pod["metadata"]["uid"])
        return job.jid if job else None

    # -- CreatePod (on the API server's loop) --------------------------------------------------------------------
    def create_pod(self, pod: Obj) -> None:
        uid = pod["metadata"]["uid"]
        if uid in self._pods:
            return
        try:
            offloaded = self._resolve_env(pod)
            pod, pod_ip = self._pod_ip(pod)
        except (EnvError, _CreateError) as exc:
            self._provider_failed(pod, str(exc), async_failure=False)
            return
        offloaded["metadata"]["annotations"] = copy.deepcopy(pod["metadata"].get("annotations") or {})
        self._pods[uid] = offloaded
        self._write(pod, {"phase": "Pending", "hostIP": pod_ip, "podIP": pod_ip, "startTime": now_iso(),
                          "conditions": [_condition("Initialized", True), _condition("Ready", False),
                                         _condition("PodScheduled", True)],
                          "containerStatuses": [self._container_status(c, {"waiting": {}})
                                                for c in pod["spec"].get("containers") or []]})
        self._remote.submit(self._guard, self._create_remote, offloaded)

    def _pod_ip(self, pod: Obj) -> tuple[Obj, str]:
        annotations = pod["metadata"].get("annotations") or {}
        if "interlink.eu/pod-vpn" not in annotations:
            return pod, annotations.get("interlink.eu/pod-ip", "127.0.0.1")
        used = {(p["metadata"].get("annotations") or {}).get("interlink.eu/pod-ip")
                for p in self.api.store.list(PODS, None)}
        cidr = self.api.store.get(NODES, None, self.node).get("spec", {}).get("podCIDR", "")
        if not cidr:
            raise _CreateError("node podCIDR not found")
        candidates = list(ipaddress.ip_network(cidr, strict=False))[2:-1]
        free = next((str(a) for a in candidates if str(a) not in used and 2 <= int(str(a).split(".")[-1]) <= 250),
                    None)
        if free is None:
            raise _CreateError("no free IP found")
        live = self.api.store.get(PODS, pod["metadata"]["namespace"], pod["metadata"]["name"])
        meta = {**live["metadata"], "annotations": {**annotations, "interlink.eu/pod-ip": free}}
        return self.api.store.replace(PODS, meta["namespace"], meta["name"], {**live, "metadata": meta}), free

    def _resolve_env(self, pod: Obj) -> Obj:
        out = copy.deepcopy(pod)
        for c in (out["spec"].get("initContainers") or []) + (out["spec"].get("containers") or []):
            env: dict[str, str] = {}
            order: list[str] = []

            def put(name: str, value: str) -> None:
                if name not in env:
                    order.append(name)
                env[name] = value
            for source in c.pop("envFrom", None) or []:
                ref = source.get("configMapRef") or source.get("secretRef") or {}
                data = self._data(pod, "configmap" if "configMapRef" in source else "secret", ref.get("name", ""),
                                  ref.get("optional", False))
                for key, value in sorted((data or {}).items()):
                    put(source.get("prefix", "") + key, value)
            for var in c.get("env") or []:
                put(var["name"], _expand(var["value"], env) if "value" in var else
                    self._value_from(pod, c, var.get("valueFrom") or {}))
            c["env"] = [{"name": n, "value": env[n]} for n in order]
        return out

    def _data(self, pod: Obj, kind: str, name: str, optional: bool) -> dict[str, str] | None:
        res = CONFIGMAPS if kind == "configmap" else SECRETS
        obj = self.api.store.find(res, pod["metadata"]["namespace"], name)
        if obj is None:
            if optional:
                return None
            raise EnvError(f'{kind} "{name}" not found')
        if res is SECRETS:
            return {k: base64.b64decode(v).decode(errors="replace") for k, v in (obj.get("data") or {}).items()}
        return dict(obj.get("data") or {})

    def _value_from(self, pod: Obj, container: Obj, source: Obj) -> str:
        for kind, key in (("configMapKeyRef", "configmap"), ("secretKeyRef", "secret")):
            if kind in source:
                ref = source[kind]
                data = self._data(pod, key, ref.get("name", ""), ref.get("optional", False))
                if data is None:
                    return ""
                if ref["key"] not in data:
                    if ref.get("optional"):
                        return ""
                    what = "ConfigMap" if key == "configmap" else "Secret"
                    raise EnvError(f"couldn't find key {ref['key']} in {what} "
                                   f"{pod['metadata']['namespace']}/{ref.get('name', '')}")
                return data[ref["key"]]
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            meta, spec, status = pod["metadata"], pod["spec"], pod.get("status", {})
            simple = {"metadata.name": meta["name"], "metadata.namespace": meta["namespace"],
                      "metadata.uid": meta["uid"], "spec.nodeName": spec.get("nodeName", ""),
                      "spec.serviceAccountName": spec.get("serviceAccountName", ""),
                      "status.hostIP": status.get("hostIP", ""), "status.podIP": status.get("podIP", "")}
            if path in simple:
                return simple[path]
            if m := _FIELD.match(path):
                return (meta.get(m[1]) or {}).get(m[2], "")
            raise EnvError(f"unsupported fieldPath: {path}")
        if "resourceFieldRef" in source:
            ref = source["resourceFieldRef"]
            target = next((c for c in pod["spec"].get("containers") or []
                           if c["name"] == (ref.get("containerName") or container["name"])), container)
            scope, _, name = ref["resource"].partition(".")
            value = quantity(((target.get("resources") or {}).get(scope) or {}).get(name, 0))
            divisor = quantity(ref.get("divisor", "1"))
            return str(-(-(value / divisor).numerator // (value / divisor).denominator))
        return ""

    def _create_remote(self, pod: Obj) -> None:
        """RemoteExecution(CREATE): wait for the pod's Secret/ConfigMap volumes, then the plugin's create."""
        deadline = time.monotonic() + self.volume_wait_s
        while True:
            found = self.api.call(self._volume_objects, pod)
            if found is not None or time.monotonic() > deadline:
                break
            time.sleep(2)
        if found is None:
            self.api.call(self._failed, pod, "CFGMaps/Secrets not found", "")
            return
        try:
            self.plugin.create(pod, *found)
        except PluginError as exc:
            self.api.call(self._provider_failed, pod, f"Unexpected error occured while creating Pods. Status "
                                                      f"code: 500. Check InterLink's logs for further informations: "
                                                      f"{exc}", True)

    def _volume_objects(self, pod: Obj) -> tuple[dict[str, Obj], dict[str, Obj]] | None:
        secrets, configmaps = {}, {}
        ns = pod["metadata"]["namespace"]
        for v in pod["spec"].get("volumes") or []:
            if "secret" in v:
                if (obj := self.api.store.find(SECRETS, ns, v["secret"].get("secretName", ""))) is None:
                    return None
                secrets[obj["metadata"]["name"]] = obj
            elif "configMap" in v:
                if (obj := self.api.store.find(CONFIGMAPS, ns, v["configMap"].get("name", ""))) is None:
                    return None
                configmaps[obj["metadata"]["name"]] = obj
        return secrets, configmaps

    def _provider_failed(self, pod: Obj, message: str, async_failure: bool) -> None:
        """handleProviderError for CreatePod errors; interLink's own Failed status for the plugin's."""
        live = self.api.store.find(PODS, pod["metadata"]["namespace"], pod["metadata"]["name"])
        if live is None:
            return
        status = copy.deepcopy(live.get("status") or {})
        failed = async_failure or live["spec"].get("restartPolicy") == "Never"
        status.update(phase="Failed" if failed else "Pending", reason="ProviderFailed", message=message)
        if async_failure:
            status["containerStatuses"] = [
                self._container_status(c, {"terminated": {"exitCode": 1, "reason": "ProviderFailed",
                                                          "message": message, "finishedAt": now_iso()}})
                for c in live["spec"].get("containers") or []]
        self._write(live, status)

    def _failed(self, pod: Obj, reason: str, message: str) -> None:
        live = self.api.store.find(PODS, pod["metadata"]["namespace"], pod["metadata"]["name"])
        if live is not None:
            self._write(live, {**(live.get("status") or {}), "phase": "Failed", "reason": reason,
                               **({"message": message} if message else {})})

    # -- status ----------------------------------------------------------------------------------------------
    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            for uid, pod in list(self._pods.items()):
                if self._stop.is_set():
                    return
                try:
                    statuses = self.plugin.status(pod)
                    if statuses is None:
                        continue
                    self.api.call(self._apply, pod, statuses)
                    if statuses and all("terminated" in s["state"] for s in statuses):
                        self._pods.pop(uid, None)  # a finished job: nothing more to ask; its node is released
                        jid = self.job_id(pod)
                        if jid and self.pod_network is not None:
                            self.pod_network.end_job(jid)
                except Exception:  # kept for the test to see; the loop goes on like interLink's
                    self.errors.append(traceback.format_exc())

    def _container_status(self, container: Obj, state: Obj, ready: bool = False) -> Obj:
        return {"name": container["name"], "image": container.get("image", ""), "imageID": "", "ready": ready,
                "restartCount": 0, "state": state}

    def _apply(self, pod: Obj, statuses: list[Obj]) -> None:
        """checkPodsStatus: the plugin's container statuses → the pod's status."""
        live = self.api.store.find(PODS, pod["metadata"]["namespace"], pod["metadata"]["name"])
        if live is None or live["metadata"].get("uid") != pod["metadata"]["uid"] or \
                live["metadata"].get("deletionTimestamp") or live.get("status", {}).get("phase") in ("Failed",
                                                                                                   "Succeeded"):
            return
        status = copy.deepcopy(live.get("status") or {})
        images = {c["name"]: c.get("image", "") for c in live["spec"].get("containers") or []}
        terminated, failed_reason, running, out = 0, "", False, []
        for cs in statuses:
            state = {k: {kk: vv for kk, vv in v.items() if vv is not None} for k, v in cs["state"].items()}
            ready = False
            if "terminated" in state:
                terminated += 1
                code = state["terminated"].get("exitCode", 0)
                if code != 0:
                    failed_reason = f"Error: {code}"
                state["terminated"].setdefault("reason", "Completed" if code == 0 else f"Error: {code}")
            elif "running" in state:
                running = ready = True
            out.append({"name": cs["name"], "image": images.get(cs["name"], ""), "imageID": "", "ready": ready,
                        "restartCount": 0, "state": state})
        status["containerStatuses"] = out
        if statuses and terminated == len(statuses):
            if failed_reason:
                status.update(phase="Failed", reason=failed_reason)
            else:
                status["conditions"] = [*(status.get("conditions") or []), _condition("Ready", False)]
                status.update(phase="Succeeded", reason="Completed")
        elif running and status.get("phase") != "Running":
            status.update(phase="Running", conditions=[_condition("Ready", True)], reason="Running")
        if status != live.get("status"):
            self._write(live, status)

    def _write(self, pod: Obj, status: Obj) -> None:
        live = self.api.store.find(PODS, pod["metadata"]["namespace"], pod["metadata"]["name"])
        if live is not None:
            self.api.store.replace(PODS, live["metadata"]["namespace"], live["metadata"]["name"],
                                   {**live, "status": status}, subresource="status")

    # -- DeletePod, logs -----------------------------------------------------------------------------------------
    def delete_pod(self, pod: Obj) -> None:
        """On the API server's loop: the pod is marked for deletion."""
        self._pods.pop(pod["metadata"]["uid"], None)
        status = copy.deepcopy(pod.get("status") or {})
        status["reason"] = "VKProviderPodDeleted"
        for cs in status.get("containerStatuses") or []:
            cs.update(ready=False, state={"terminated": {"exitCode": 0, "reason": "VKProviderPodContainerDeleted",
                                                         "message": "VK provider terminated container upon deletion",
                                                         "finishedAt": now_iso()}})
        self._write(pod, status)

        def remote() -> None:
            self._end(pod)
            self.api.call(self._remove, pod)
        self._remote.submit(self._guard, remote)

    def _end(self, pod: Obj) -> None:
        jid = self.plugin.delete(pod)
        if jid and self.pod_network is not None:
            self.pod_network.end_job(jid)

    def _remove(self, pod: Obj) -> None:
        live = self.api.store.find(PODS, pod["metadata"]["namespace"], pod["metadata"]["name"])
        if live is not None and live["metadata"]["uid"] == pod["metadata"]["uid"]:
            try:
                self.api.store.delete(PODS, pod["metadata"]["namespace"], pod["metadata"]["name"], grace_seconds=0)
            except ApiError:
                pass

    def logs(self, pod: Obj, container: str, tail: int | None) -> str:
        return self.plugin.logs(pod, container, tail)

    def _guard(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:  # kept for the test to see
            self.errors.append(traceback.format_exc())


class _CreateError(Exception):
    """CreatePod's own refusal (pod-vpn without a PodCIDR, no free IP)."""
