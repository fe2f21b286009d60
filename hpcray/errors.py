"""The failures a user can act on.

Each error carries the fix in its message; ``cli.py`` prints it on one line and exits with ``exit_code``.
Exit codes: 0 success, 1 a job failed, 2 bad input or an unmet precondition, 3 a job was stopped,
4 a wait timed out, 128+N interrupted by signal N (130 SIGINT, 143 SIGTERM).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_JOB_STOPPED = 3
EXIT_TIMEOUT = 4


class HpcrayError(Exception):
    """Base of every error a user can fix; the message says what to do."""

    exit_code = EXIT_USAGE


class ProfileError(HpcrayError):
    """A profile file is malformed, has an unknown key, a wrong type or a missing value."""

    def __init__(self, file: str, key: str, problem: str) -> None:
        self.file, self.key, self.problem = file, key, problem
        where = f"{file}: {key}: " if key else f"{file}: "
        super().__init__(where + problem)


class TemplateError(HpcrayError):
    """A values template refers to something the profile does not define, or is not valid Jinja."""


class ValuesError(HpcrayError):
    """The rendered RayCluster would be wrong: CRD schema violation or an interLink misconfiguration."""


class ChartError(HpcrayError):
    """The KubeRay chart cannot be found or fetched."""


class ToolMissing(HpcrayError):
    """An external program hpcray needs (helm, sbatch, singularity) is not installed or is unsupported."""


class HelmError(HpcrayError):
    """helm failed; the message is helm's stderr reduced to one actionable line."""


class ReleaseNotFound(HelmError):
    """helm says the release does not exist (where one was expected: upgrade of a removed release, rollback)."""


class KubeError(HpcrayError):
    """The Kubernetes API is unreachable, refuses us, or lacks the namespace/context asked for."""


class ClusterNotReady(HpcrayError):
    """The Ray cluster did not become ready within --timeout; the message carries the diagnosis."""

    exit_code = EXIT_TIMEOUT


class ClusterError(HpcrayError):
    """The Ray cluster is not there or cannot be reached (no head, head died, dashboard unreachable)."""


class RayVersionError(HpcrayError):
    """The cluster's Ray major version differs from the client's."""


class JobNotFound(HpcrayError):
    """No job with the given submission id exists on the cluster."""


class WorkingDirTooLarge(HpcrayError):
    """The working dir exceeds Ray's upload limit; reported before uploading."""


class TrackingError(HpcrayError):
    """MLflow preflight failed: server down, credentials rejected, or experiment not writable."""


class CredentialsError(HpcrayError):
    """MLflow credentials are missing, or their file is readable by others."""


class SlurmError(HpcrayError):
    """sbatch/scontrol failed or a SLURM job ended badly; the message carries the job's error output."""


class SlurmTimeout(SlurmError):
    """A SLURM job did not end within --timeout; it keeps running."""

    exit_code = EXIT_TIMEOUT


class ImageError(HpcrayError):
    """The SIF image is missing or its pull failed."""


class OutputError(HpcrayError):
    """A file hpcray was asked to write (`render -o FILE`) cannot be written."""


class Interrupted(HpcrayError):
    """hpcray was interrupted by a signal; the message says what was cleaned up or left (default: cleaned up)."""

    def __init__(self, signum: int, message: str | None = None) -> None:
        import signal

        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(message or f"interrupted by {signal.Signals(signum).name}; cleaned up")


class UnknownJob(HpcrayError):
    """A job name the profile does not define."""


class JobsApiRefused(ClusterError):
    """The Ray Jobs API answers but refuses us (401/403): a missing or wrong Ray token, or a proxy in front of it."""


class RayApiMoved(HpcrayError):
    """The installed Ray lacks the packaging helpers hpcray uploads working dirs with (outside the tested range)."""


class AccessRefused(ClusterError):
    """The way to the Jobs API asked for cannot work for this cluster (a port-forward to a pod on an interLink
    virtual node, whose kubelet answers 501; a Kubernetes-only mode for the local backend); the message names the
    ones that work."""


class PreflightFailed(HpcrayError):
    """The interLink virtual node cannot run the cluster as the profile asks (missing, NotReady, a taint not
    tolerated, too little CPU/memory/GPU, no PodCIDR for pod-vpn); checked before helm runs, nothing installed."""


class WalltimeTooShort(HpcrayError):
    """A job's max_runtime does not fit what is left of its cluster's SLURM allocation (`--must-fit`)."""
