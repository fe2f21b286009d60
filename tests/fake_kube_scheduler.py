"""The fake cluster's nodes, kube-scheduler and endpoints controller: pure functions over objects, no I/O.

- Nodes: `kubelet_node` (a regular node with a real kubelet, the fake API's default `fake-node-1`) and
  `interlink_node` (interLink's virtual node exactly as its virtual kubelet registers it: interLink
  `pkg/virtualkubelet/virtualkubelet.go`, `NewProviderConfig`: labels, the `virtual-node.interlink/no-schedule`
  taint, `external:///NAME` provider ID, PodCIDR, capacity = allocatable with cpu 100 / memory 3000G / pods 10000
  by default and accelerators only when configured).
- `schedule`: kube-scheduler's filters that matter here, in its order and words (NodeUnschedulable,
  TaintToleration, NodeAffinity incl. nodeSelector, NodeResourcesFit on requests summed over the node's pods vs
  allocatable), and the FailedScheduling message with its preemption tail, e.g. `0/2 nodes are available:
  1 Insufficient nvidia.com/gpu, 1 node(s) didn't match Pod's node affinity/selector. preemption: 0/2 nodes are
  available: 1 No preemption victims found for incoming pod, 1 Preemption is not helpful for scheduling.`
- `endpoints_for`: the Endpoints object the endpoints controller writes for a Service; an address a real API
  server refuses (loopback, link-local, unspecified: `ValidateNonSpecialIP`) makes the object unwritable, so a
  Service whose pods report interLink's no-VPN pod IP 127.0.0.1 has no endpoints. `routable` names the CIDRs that
  stand for a routable pod network in the box (the VPN's 127.0.X.0/24, see tests/fake_interlink.py).
"""

from __future__ import annotations

import copy
import ipaddress
import re
from fractions import Fraction
from typing import Iterable

from tests.fake_kube_objects import Obj, now_iso

INTERLINK_TAINT = "virtual-node.interlink/no-schedule"
_SUFFIXES = {"n": Fraction(1, 10**9), "u": Fraction(1, 10**6), "m": Fraction(1, 1000), "": Fraction(1),
             "k": Fraction(10**3), "M": Fraction(10**6), "G": Fraction(10**9), "T": Fraction(10**12),
             "P": Fraction(10**15), "E": Fraction(10**18), "Ki": Fraction(2**10), "Mi": Fraction(2**20),
             "Gi": Fraction(2**30), "Ti": Fraction(2**40), "Pi": Fraction(2**50), "Ei": Fraction(2**60)}
_QUANTITY = re.compile(r"^([+-]?[0-9.]+)(?:[eE]([+-]?[0-9]+)|(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]?))$")


def quantity(value: object) -> Fraction:
    """A Kubernetes resource quantity (`100m`, `2`, `1.5`, `128G`, `2Gi`, `1e3`) as an exact number."""
    m = _QUANTITY.match(str(value).strip())
    if not m:
        raise ValueError(f"quantities must match the regular expression "
                         f"'^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$': {value!r}")
    number = Fraction(m[1])
    return number * Fraction(10) ** int(m[2]) if m[2] is not None else number * _SUFFIXES[m[3]]


def _node_info(kubelet: str, os_: str, arch: str) -> Obj:
    """Every NodeSystemInfo field: Go writes them all, and the `kubernetes` client requires them."""
    return {"architecture": arch, "bootID": "", "containerRuntimeVersion": "", "kernelVersion": "",
            "kubeProxyVersion": "", "kubeletVersion": kubelet, "machineID": "", "operatingSystem": os_,
            "osImage": "", "systemUUID": ""}


def _condition(type_: str, status: str, reason: str, message: str) -> Obj:
    now = now_iso()
    return {"type": type_, "status": status, "lastHeartbeatTime": now, "lastTransitionTime": now,
            "reason": reason, "message": message}


# ---------------------------------------------------------------------------------------------------------------
# Nodes
# ---------------------------------------------------------------------------------------------------------------

def kubelet_node(name: str, *, cpu: str = "256", memory: str = "1Ti", pods: str = "110", gpus: str | None = "16",
                 address: str = "10.0.0.1") -> Obj:
    """A regular node whose kubelet is real (today's fake kubelet): large enough for every test cluster."""
    resources = {"cpu": cpu, "memory": memory, "pods": pods, **({"nvidia.com/gpu": gpus} if gpus else {})}
    return {"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                                                  "kubernetes.io/arch": "amd64"}},
            "spec": {"podCIDR": "10.244.0.0/24"},
            "status": {"capacity": dict(resources), "allocatable": dict(resources),
                       "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                       "message": "kubelet is posting ready status",
                                       "lastHeartbeatTime": now_iso(), "lastTransitionTime": now_iso()}],
                       "addresses": [{"type": "InternalIP", "address": address}],
                       "nodeInfo": _node_info("v1.33.0", "linux", "amd64")}}


def interlink_node(name: str, *, cpu: str = "100", memory: str = "3000G", pods: str = "10000",
                   accelerators: dict[str, str] | None = None, pod_cidr: str = "", internal_ip: str = "127.0.0.1",
                   kubelet_port: int = 10250, labels: dict[str, str] | None = None,
                   taints: Iterable[Obj] = ()) -> Obj:
    """The Node interLink's virtual kubelet registers (`NewProviderConfig`), Ready once its ping to the interLink
    API succeeded (`NodeConditionWithInterlink`). `accelerators`: e.g. {"nvidia.com/gpu": "4"}; a zero count is
    left out, as `GetResources` does."""
    resources = {"cpu": cpu, "memory": memory, "pods": pods,
                 **{k: v for k, v in (accelerators or {}).items() if quantity(v) != 0}}
    node_labels = {"alpha.service-controller.kubernetes.io/exclude-balancer": "true",
                   "kubernetes.io/os": "virtual-kubelet", "kubernetes.io/hostname": name,
                   "kubernetes.io/role": "agent", "node.kubernetes.io/exclude-from-external-load-balancers": "true",
                   "virtual-node.interlink/type": "virtual-kubelet", **(labels or {})}
    conditions = [_condition("Ready", "True", "KubeletPending", "kubelet is pending."),
                  _condition("OutOfDisk", "False", "KubeletHasSufficientDisk",
                             "kubelet has sufficient disk space available"),
                  _condition("MemoryPressure", "False", "KubeletHasSufficientMemory",
                             "kubelet has sufficient memory available"),
                  _condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                  _condition("NetworkUnavailable", "False", "RouteCreated", "RouteController created a route"),
                  _condition("InterlinkConnectivity", "True", "InterlinkPingSuccessful",
                             "Ping successful with code 200")]
    spec: Obj = {"providerID": f"external:///{name}",
                 "taints": [{"key": INTERLINK_TAINT, "value": "true", "effect": "NoSchedule"}, *taints]}
    if pod_cidr:
        spec["podCIDR"] = pod_cidr
    return {"metadata": {"name": name, "labels": node_labels,
                         "annotations": {"interlink.virtual-kubelet.io/ping-response": ""}},
            "spec": spec,
            "status": {"nodeInfo": _node_info("v1.33.0-vk-interlink", "linux", "virtual-kubelet"),
                       "addresses": [{"type": "InternalIP", "address": internal_ip}],
                       "daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet_port}},
                       "capacity": dict(resources), "allocatable": dict(resources), "conditions": conditions}}


def is_interlink(node: Obj) -> bool:
    return (node["metadata"].get("labels") or {}).get("virtual-node.interlink/type") == "virtual-kubelet"


# ---------------------------------------------------------------------------------------------------------------
# The scheduler
# ---------------------------------------------------------------------------------------------------------------

def pod_requests(pod: Obj) -> dict[str, Fraction]:
    """What the pod asks of a node: the containers' requests summed, or the largest init container's if larger."""
    def of(container: Obj) -> dict[str, Fraction]:
        return {k: quantity(v) for k, v in ((container.get("resources") or {}).get("requests") or {}).items()}
    total: dict[str, Fraction] = {}
    for c in pod.get("spec", {}).get("containers") or []:
        for k, v in of(c).items():
            total[k] = total.get(k, Fraction(0)) + v
    for c in pod.get("spec", {}).get("initContainers") or []:
        for k, v in of(c).items():
            total[k] = max(total.get(k, Fraction(0)), v)
    return total


def _tolerates(tolerations: list[Obj], taint: Obj) -> bool:
    for t in tolerations:
        if t.get("effect") and t["effect"] != taint.get("effect"):
            continue
        operator = t.get("operator") or "Equal"
        if operator == "Exists" and not t.get("key"):
            return True
        if t.get("key") != taint.get("key"):
            continue
        if operator == "Exists" or t.get("value", "") == taint.get("value", ""):
            return True
    return False


def _expression_matches(expr: Obj, labels: dict[str, str]) -> bool:
    key, op, values = expr.get("key", ""), expr.get("operator", ""), expr.get("values") or []
    if op == "In":
        return labels.get(key) in values
    if op == "NotIn":
        return labels.get(key) not in values
    if op == "Exists":
        return key in labels
    if op == "DoesNotExist":
        return key not in labels
    if op in ("Gt", "Lt") and key in labels and values:
        try:
            have, want = int(labels[key]), int(values[0])
        except ValueError:
            return False
        return have > want if op == "Gt" else have < want
    return False


def _affinity_matches(pod: Obj, node: Obj) -> bool:
    labels = node["metadata"].get("labels") or {}
    spec = pod.get("spec", {})
    if any(labels.get(k) != v for k, v in (spec.get("nodeSelector") or {}).items()):
        return False
    required = ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution")
    if not required:
        return True
    return any(all(_expression_matches(e, labels) for e in term.get("matchExpressions") or [])
               and all(_expression_matches({**e, "key": f"__field__{e.get('key')}"},
                                           {"__field__metadata.name": node["metadata"]["name"]})
                       for e in term.get("matchFields") or [])
               for term in required.get("nodeSelectorTerms") or [])


def _node_failures(pod: Obj, node: Obj, pods_on_node: list[Obj]) -> tuple[list[str], bool]:
    """The reasons the node cannot take the pod (from the first failing filter, as the scheduler stops there) and
    whether they are unresolvable by preemption."""
    spec = pod.get("spec", {})
    if node.get("spec", {}).get("unschedulable") and not _tolerates(
            spec.get("tolerations") or [], {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}):
        return ["node(s) were unschedulable"], True
    for taint in node.get("spec", {}).get("taints") or []:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not _tolerates(spec.get("tolerations") or [],
                                                                                  taint):
            return [f"node(s) had untolerated taint {{{taint['key']}: {taint.get('value', '')}}}"], True
    if not _affinity_matches(pod, node):
        return ["node(s) didn't match Pod's node affinity/selector"], True
    allocatable = {k: quantity(v) for k, v in (node.get("status", {}).get("allocatable") or {}).items()}
    used: dict[str, Fraction] = {}
    for other in pods_on_node:
        for k, v in pod_requests(other).items():
            used[k] = used.get(k, Fraction(0)) + v
    reasons = []
    if len(pods_on_node) + 1 > allocatable.get("pods", Fraction(0)):
        reasons.append("Too many pods")
    for resource, want in sorted(pod_requests(pod).items()):
        if want > 0 and used.get(resource, Fraction(0)) + want > allocatable.get(resource, Fraction(0)):
            reasons.append(f"Insufficient {resource}")
    return reasons, False


def _histogram(counts: dict[str, int]) -> str:
    return ", ".join(sorted(f"{n} {reason}" for reason, n in counts.items()))


def schedule(pod: Obj, nodes: list[Obj], pods: list[Obj]) -> tuple[str | None, str]:
    """(node name, "") for the first node that fits the pod, else (None, the FailedScheduling message).
    `pods`: every pod in the cluster (those bound to a node and not finished count against it)."""
    if not nodes:
        return None, "no nodes available to schedule pods"
    failures: dict[str, int] = {}
    preemption: dict[str, int] = {}
    for node in nodes:
        on_node = [p for p in pods if p.get("spec", {}).get("nodeName") == node["metadata"]["name"]
                   and p.get("status", {}).get("phase") not in ("Succeeded", "Failed")]
        reasons, unresolvable = _node_failures(pod, node, on_node)
        if not reasons:
            return node["metadata"]["name"], ""
        for reason in reasons:
            failures[reason] = failures.get(reason, 0) + 1
        why = "Preemption is not helpful for scheduling" if unresolvable else \
            "No preemption victims found for incoming pod"
        preemption[why] = preemption.get(why, 0) + 1
    n = len(nodes)
    return None, (f"0/{n} nodes are available: {_histogram(failures)}. "
                  f"preemption: 0/{n} nodes are available: {_histogram(preemption)}.")


# ---------------------------------------------------------------------------------------------------------------
# Endpoints
# ---------------------------------------------------------------------------------------------------------------

def _is_ready(pod: Obj) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in pod.get("status", {}).get("conditions") or [])


def special_ip(ip: str, routable: Iterable[str] = ()) -> bool:
    """An address the API server refuses in Endpoints, unless it lies in one of the box's routable CIDRs."""
    address = ipaddress.ip_address(ip)
    if any(address in ipaddress.ip_network(cidr) for cidr in routable):
        return False
    return address.is_loopback or address.is_link_local or address.is_unspecified or address.is_multicast


def _target_port(port: Obj, pod: Obj) -> int | None:
    target = port.get("targetPort", port["port"])
    if isinstance(target, int) or str(target).isdigit():
        return int(target)
    for container in pod.get("spec", {}).get("containers") or []:
        for p in container.get("ports") or []:
            if p.get("name") == target:
                return int(p["containerPort"])
    return None


def endpoints_for(service: Obj, pods: list[Obj], routable: Iterable[str] = ()) -> Obj | None:
    """The Endpoints object for a Service with a selector, or None when the controller could not write it (an
    address the API server refuses)."""
    meta, selector = service["metadata"], service.get("spec", {}).get("selector") or {}
    chosen = [p for p in pods if p["metadata"].get("namespace") == meta["namespace"] and selector
              and all((p["metadata"].get("labels") or {}).get(k) == v for k, v in selector.items())
              and p.get("status", {}).get("podIP") and not p["metadata"].get("deletionTimestamp")
              and p.get("status", {}).get("phase") not in ("Succeeded", "Failed")]
    if any(special_ip(p["status"]["podIP"], routable) for p in chosen):
        return None
    subsets: dict[tuple[tuple[str, int], ...], Obj] = {}
    for pod in chosen:
        ports = []
        for port in service.get("spec", {}).get("ports") or []:
            target = _target_port(port, pod)
            if target is not None:
                ports.append({**({"name": port["name"]} if port.get("name") else {}), "port": target,
                              "protocol": port.get("protocol", "TCP"),
                              **({"appProtocol": port["appProtocol"]} if port.get("appProtocol") else {})})
        key = tuple((p.get("name", ""), p["port"]) for p in ports)
        subset = subsets.setdefault(key, {"ports": ports})
        address = {"ip": pod["status"]["podIP"], "nodeName": pod["spec"].get("nodeName", ""),
                   "targetRef": {"kind": "Pod", "namespace": meta["namespace"], "name": pod["metadata"]["name"],
                                 "uid": pod["metadata"]["uid"]}}
        subset.setdefault("addresses" if _is_ready(pod) else "notReadyAddresses", []).append(address)
    labels = {**(meta.get("labels") or {}), "endpoints.kubernetes.io/managed-by": "endpoint-controller"}
    out: Obj = {"apiVersion": "v1", "kind": "Endpoints",
                "metadata": {"name": meta["name"], "namespace": meta["namespace"], "labels": labels}}
    if subsets:
        out["subsets"] = [copy.deepcopy(s) for _, s in sorted(subsets.items())]
    return out


def ready_addresses(endpoints: Obj | None, port_name: str) -> list[tuple[Obj, int]]:
    """(address, port) of the ready endpoints serving the named service port."""
    found = []
    for subset in (endpoints or {}).get("subsets") or []:
        for port in subset.get("ports") or []:
            if port.get("name", "") == port_name:
                found += [(a, port["port"]) for a in subset.get("addresses") or []]
    return found


def cluster_hosts(endpoints: list[Obj], hostname: str) -> str:
    """/etc/hosts standing in for cluster DNS: each Service name (`svc.ns.svc.cluster.local` and shorter forms)
    at its first ready endpoint, as DNS answers for a headless Service."""
    lines = [f"127.0.0.1 localhost {hostname}"]
    for ep in sorted(endpoints, key=lambda e: (e["metadata"]["namespace"], e["metadata"]["name"])):
        ips = [a["ip"] for s in ep.get("subsets") or [] for a in s.get("addresses") or []]
        if ips:
            name, ns = ep["metadata"]["name"], ep["metadata"]["namespace"]
            lines.append(f"{ips[0]} {name}.{ns}.svc.cluster.local {name}.{ns}.svc {name}.{ns}")
    return "\n".join(lines) + "\n"
