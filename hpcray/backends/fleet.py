"""Every KubeRay release hpcray made in a kube context, whatever profile made it: `status --all` and `gc`."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

from hpcray import helm, kube
from hpcray.backends.base import ClusterStatus, Progress
from hpcray.backends.kuberay import expected_workers, expiry, node_status, release_status, states_ready
from hpcray.render import PROFILE_LABEL, token_secret_name
from hpcray.tracking import secret_name

INSTANCE_LABEL = "app.kubernetes.io/instance"  # the chart labels the RayCluster with its release


def clusters(where: kube.Target) -> list[ClusterStatus]:
    """Every release hpcray made in the target's context (all namespaces), with its pods and expiry."""
    releases = helm.list_releases(helm.find_helm(), where)
    k = kube.connect(where, check_namespace=False)
    pods: dict[tuple[str, str], list[kube.PodState]] = {}
    for pod in kube.list_pods(k, PROFILE_LABEL, all_namespaces=True):
        meta = pod["metadata"]
        key = (meta.get("namespace", ""), (meta.get("labels") or {}).get(PROFILE_LABEL, ""))
        pods.setdefault(key, []).append(kube.pod_state(pod))
    rayclusters = _rayclusters(k)
    out = []
    for r in releases:
        rc = rayclusters.get((r.namespace, r.name), {})
        expected = expected_workers(rc)
        states = pods.get((r.namespace, r.name), [])
        name = rc.get("metadata", {}).get("name")
        out.append(ClusterStatus(
            name=r.name, backend="kuberay", exists=True,
            ready=r.status == "deployed" and states_ready(states, expected), node_kind="pod",
            nodes=[node_status(s) for s in states], expires_at=expiry(rc), namespace=r.namespace,
            release=release_status(r), expected_workers=expected, service=f"{name}-head-svc" if name else None))
    return out


def _rayclusters(k: kube.Kube) -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for rc in kube.list_rayclusters(k):
        meta = rc.get("metadata", {})
        release = (meta.get("labels") or {}).get(INSTANCE_LABEL)
        if release:
            out[(meta.get("namespace", ""), release)] = rc
    return out


@dataclass
class Expired:
    name: str
    namespace: str
    expired_at: float


def gc(where: kube.Target, *, dry_run: bool, progress: Progress, now: float | None = None) -> list[Expired]:
    """Uninstall every hpcray release whose expiry has passed (releases without one, or not made by hpcray, stay)."""
    now = time.time() if now is None else now
    expired = [Expired(c.name, c.namespace or "", c.expires_at) for c in clusters(where)
               if c.expires_at is not None and c.expires_at <= now]
    if dry_run:
        return expired
    h = helm.find_helm()
    for e in expired:
        there = replace(where, namespace=e.namespace)
        helm.uninstall(h, helm.Release(e.name, there))
        k = kube.connect(there, check_namespace=False)
        for name in (secret_name(e.name), token_secret_name(e.name)):
            kube.delete_secret(k, name)
        progress(f"uninstalled expired release {e.name} in namespace {e.namespace} (expired "
                 f"{kube.format_time(e.expired_at)})")
    return expired
