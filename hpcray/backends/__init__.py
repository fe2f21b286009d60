"""Where a Ray cluster lives: a local head on this machine, or a KubeRay release on Kubernetes."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hpcray.backends.base import Backend
    from hpcray.profile import Profile


def backend_for(profile: "Profile") -> "Backend":
    """The backend the profile names; imported lazily so `hpcray --help` stays fast."""
    if profile.backend == "local":
        from hpcray.backends.local import LocalBackend

        return LocalBackend(profile)
    from hpcray.backends.kuberay import KubeRayBackend

    return KubeRayBackend(profile)
