"""What hpcray knows of interLink's virtual node, in interLink's words: the preflight before helm runs, and why a
pod offloaded to SLURM did not run (../shared/docs/interlink-facts.md has the upstream references).

- Preflight: the virtual node exists and is Ready, the profile tolerates its taints, its allocatable CPU, memory and
  GPUs (GPUs only in gpu_mode resource: in gres mode SLURM hands them out) minus what the pods already on it request
  fit the whole cluster, and it has a PodCIDR when pod-vpn is on. The scheduler would otherwise leave the pods
  Pending for the whole `up` timeout, and a missing PodCIDR fails every pod's creation.
- Diagnosis: the virtual kubelet reports a failed sbatch as reason ProviderFailed with sbatch's message, a walltime
  kill as a container terminated with reason SlurmJobTimeout, SLURM's out-of-memory kill as OOMKilled; it never
  reports init containers and runs no readiness probes, so a Ray worker whose `wait-gcs-ready` loops shows Ready:
  that is seen from the Ray side instead (the head's log, the head's count of alive nodes).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from hpcray import kube
from hpcray.errors import KubeError, PreflightFailed
from hpcray.profile import HeadSpec, Profile, quantity
from hpcray.render import VIRTUAL_NODE_TOLERATION, toleration

GPU = "nvidia.com/gpu"
GCS_UNREACHABLE = "Failed to connect to GCS"  # Ray's words when a node cannot reach the head's GCS
VPN_FIX = ("with interlink.pod_vpn the pod's address exists only once the site's VPN bootstrap has run: set "
           "interlink.vpn_bootstrap to it (node-ip-address=$POD_IP, which hpcray sets, then works), or turn "
           "pod_vpn off where the virtual kubelet builds a mesh (interlink.mesh: true)")

Obj = dict[str, Any]


# ---------------------------------------------------------------------------------------------------------------
# Preflight
# ---------------------------------------------------------------------------------------------------------------


def preflight_step(p: Profile) -> str:
    """The preflight in words, for `up --dry-run`."""
    need = cluster_needs(p)
    asked = ", ".join(f"{_shown(k, v)} {k}" for k, v in need.items())
    vpn = ", has a PodCIDR (pod-vpn)" if p.interlink.pod_vpn else ""
    return (f"check that interLink virtual node {p.interlink.node} exists, is Ready, has only taints the profile "
            f"tolerates{vpn}, and has {asked} free for the head and all workers (--skip-preflight skips this)")


def cluster_needs(p: Profile) -> dict[str, Decimal]:
    """What the head and every worker together ask the scheduler for: cpu, memory and, in gpu_mode resource,
    nvidia.com/gpu."""
    groups: list[tuple[HeadSpec, int]] = [(p.head, 1)] + [(w, w.replicas) for w in p.workers.values()]
    need: dict[str, Decimal] = {"cpu": Decimal(0), "memory": Decimal(0)}
    if p.interlink.gpu_mode == "resource" and any(g.gpus for g, _ in groups):
        need[GPU] = Decimal(0)
    for g, n in groups:
        need["cpu"] += quantity(g.cpu or "0") * n
        need["memory"] += quantity(g.memory or "0") * n
        if GPU in need:
            need[GPU] += g.gpus * n
    return need


def preflight(p: Profile, k: kube.Kube, cluster_selector: str, warn: Any) -> None:
    """PreflightFailed naming every way the virtual node cannot run the cluster, with the fix; nothing changes.
    A node hpcray may not read (RBAC) is only warned about."""
    node_name = p.interlink.node or ""
    try:
        node = kube.read_node(k, node_name)
        others = [pod for pod in kube.pods_on_node(k, node_name) if _counts(pod, cluster_selector)]
    except KubeError as exc:
        warn(f"hpcray: warning: preflight of virtual node {node_name} skipped: {exc}")
        return
    if node is None:
        raise PreflightFailed(f"interLink virtual node {node_name} does not exist (`kubectl get nodes` lists the "
                              f"nodes); fix interlink.node, or ask the site whether its virtual kubelet runs")
    problems = []
    ready, why = kube.node_ready(node)
    if not ready:
        problems.append(f"virtual node {node_name} is NotReady ({why}): its virtual kubelet has lost the interLink "
                        "API or the SLURM side; ask the site, or wait until `kubectl get node` says Ready")
    tolerations = [VIRTUAL_NODE_TOLERATION] + [toleration(t) for t in p.interlink.tolerations]
    for taint in (node.get("spec") or {}).get("taints") or []:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not any(_tolerates(t, taint) for t in tolerations):
            shown = f"{taint['key']}{'=' + taint['value'] if taint.get('value') else ''}:{taint['effect']}"
            problems.append(f"virtual node {node_name} has taint {shown}, which the profile does not tolerate; add "
                            f"to interlink.tolerations: {{key: {taint['key']}, operator: Exists, effect: "
                            f"{taint['effect']}}}")
    if p.interlink.pod_vpn and not (node.get("spec") or {}).get("podCIDR"):
        problems.append(f"virtual node {node_name} has no PodCIDR, so interLink cannot give a pod-vpn address (its "
                        "pods would fail with 'node podCIDR not found'); ask the site to set the virtual kubelet's "
                        "PodCIDR, or set interlink.pod_vpn: false")
    problems += _capacity_problems(p, node, others)
    if problems:
        raise PreflightFailed(f"preflight of {p.name} against interLink virtual node {node_name} failed, nothing "
                              f"was installed: {'; '.join(problems)} (--skip-preflight skips the check)")


def _counts(pod: Obj, cluster_selector: str) -> bool:
    """Whether a pod on the node takes capacity from this cluster: running or pending, and not one of its own
    (an upgrade replaces those)."""
    key, _, value = cluster_selector.partition("=")
    own = (pod["metadata"].get("labels") or {}).get(key) == value
    return not own and (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")


def _capacity_problems(p: Profile, node: Obj, others: list[Obj]) -> list[str]:
    allocatable = (node.get("status") or {}).get("allocatable") or {}
    used: dict[str, Decimal] = {}
    for pod in others:
        for res, value in pod_requests(pod).items():
            used[res] = used.get(res, Decimal(0)) + value
    problems = []
    for res, need in cluster_needs(p).items():
        if res == GPU and need == 0:
            continue
        have = quantity(str(allocatable.get(res, "0")))
        free = have - used.get(res, Decimal(0))
        if need <= free:
            continue
        where = (f"{_shown(res, have)} allocatable, {_shown(res, used[res])} already requested by "
                 f"{len(others)} other pod(s)" if used.get(res) else f"{_shown(res, have)} allocatable")
        if res == GPU and have == 0:
            fix = ("it advertises none: set interlink.gpu_mode: gres (GPUs through --gres only), or ask the site to "
                   "advertise nvidia.com/gpu on the virtual node")
        else:
            fix = (f"lower head/workers {res if res != GPU else 'gpus'} or the worker replicas, or ask the site to "
                   "raise the virtual node's capacity")
        problems.append(f"the cluster asks for {_shown(res, need)} {res} in all, but virtual node "
                        f"{p.interlink.node} has {_shown(res, free)} free ({where}); {fix}")
    return problems


def pod_requests(pod: Obj) -> dict[str, Decimal]:
    """What a pod asks the scheduler for, by resource: its containers' requests (a limit alone counts as the
    request), or its largest init container's where that is more, as kube-scheduler counts."""

    def of(container: Obj) -> dict[str, Decimal]:
        r = container.get("resources") or {}
        return {k: quantity(str(v)) for k, v in {**(r.get("limits") or {}), **(r.get("requests") or {})}.items()}

    spec = pod.get("spec") or {}
    total: dict[str, Decimal] = {}
    for c in spec.get("containers") or []:
        for k, v in of(c).items():
            total[k] = total.get(k, Decimal(0)) + v
    for c in spec.get("initContainers") or []:
        for k, v in of(c).items():
            total[k] = max(total.get(k, Decimal(0)), v)
    return total


def _tolerates(t: Obj, taint: Obj) -> bool:
    if t.get("effect") and t["effect"] != taint.get("effect"):
        return False
    if t.get("operator") == "Exists":
        return not t.get("key") or t["key"] == taint.get("key")
    return t.get("key") == taint.get("key") and (t.get("value") or "") == (taint.get("value") or "")


def _shown(res: str, value: Decimal) -> str:
    if res == "memory":
        return f"{round(value / 10**9, 1).normalize():f}G"
    return f"{value.normalize():f}"


# ---------------------------------------------------------------------------------------------------------------
# Diagnosis
# ---------------------------------------------------------------------------------------------------------------


def pod_problem(pod: Obj) -> str | None:
    """Why a pod on the virtual node will not run, in interLink's words with the fix; None when nothing says so.
    A pod with such a problem stays as it is: the virtual kubelet neither retries nor restarts it."""
    status = pod.get("status") or {}
    if status.get("reason") == "ProviderFailed":
        return (f"interLink could not start its SLURM job (ProviderFailed: {status.get('message') or 'no message'});"
                " fix what sbatch or the plugin says (interlink.slurm flags, partition, account, volumes)")
    for c in status.get("containerStatuses") or []:
        if killed := _killed(((c.get("state") or {}).get("terminated") or {}).get("reason"), f"container {c['name']}"):
            return killed
    if status.get("phase") == "Failed":
        return (f"its SLURM job ended ({kube.pod_state(pod).reason}); `kubectl logs {pod['metadata']['name']}` shows "
                "the job's output")
    return None


def deleted_problem(pod: kube.DeletedPod) -> str:
    """Why a pod KubeRay deleted and replaced had ended, in interLink's words where it has them."""
    code = f", exit code {pod.exit_code}" if pod.exit_code else ""
    return _killed(pod.reason, "its Ray container") or f"its SLURM job ended ({pod.reason or pod.phase}{code})"


def _killed(reason: str | None, where: str) -> str | None:
    if reason == "SlurmJobTimeout":
        return (f"its SLURM job reached the walltime and was killed (SlurmJobTimeout, {where}); raise "
                "interlink.slurm.time, or give the jobs less to do")
    if reason == "OOMKilled":
        return f"its SLURM job ran out of memory (OOMKilled, {where}); raise the memory of head/workers"
    return None


def head_cannot_reach_gcs(log: str) -> str | None:
    """The head's log line saying its own Ray node cannot reach its GCS, if it does."""
    return next((line.strip() for line in reversed(log.splitlines()) if GCS_UNREACHABLE in line), None)

