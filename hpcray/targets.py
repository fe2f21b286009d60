"""A profile's places, as the narrow targets that helm.py and kube.py take (they never see a Profile)."""

from __future__ import annotations

from hpcray import helm, kube
from hpcray.profile import Profile


def kube_target(p: Profile) -> kube.Target:
    k = p.kubernetes
    return kube.Target(k.namespace, k.context, str(p.resolve_path(k.kubeconfig)) if k.kubeconfig else None)


def release(p: Profile) -> helm.Release:
    return helm.Release(p.release, kube_target(p))


def chart(p: Profile) -> helm.Chart:
    c = p.chart
    return helm.Chart(c.name, c.version, c.repo, p.resolve_path(c.path) if c.path else None)
