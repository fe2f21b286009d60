"""`hpcray doctor`: every check hpcray can make before HPC hours are spent, each a Result (ok, warn, fail, skip) with
the fix when it is not ok. Nothing is created on the cluster; MLflow's preflight creates a run and deletes it (and
creates the profile's experiment where it is missing, as the first job would).

Each check takes only what it needs and reuses the code that `up`, `submit` and `run` check with (the profile loader,
helm, hpcray.kube, interLink's preflight, the SIF lookup, the Ray version rule, MLflow's preflight, the Jobs API
client). `doctor` runs those that apply to the profile's backend, each within a time limit, and yields the results
as they come. A check whose prerequisite failed is skipped, saying which.

The fix of a check that reuses an hpcray error is the part of its one-line message after the first `; ` (hpcray's
errors read "problem; fix").
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Generator, Iterator, Literal, TypeVar

from hpcray import helm, images, interlink, kube, targets
from hpcray.errors import EXIT_OK, EXIT_USAGE, HpcrayError
from hpcray.profile import Profile, load_profile, profile_ref
from hpcray.tracking import CredentialPlan, Credentials, credential_plan, preflight, takes_login
from hpcray.waiting import in_background

if TYPE_CHECKING:
    from hpcray.backends.base import Backend, ClusterStatus

Status = Literal["ok", "warn", "fail", "skip"]
Say = Callable[[str], None]
T = TypeVar("T")

EXIT_WARNING = 1
EXIT_CODES: dict[str, int] = {"ok": EXIT_OK, "skip": EXIT_OK, "warn": EXIT_WARNING, "fail": EXIT_USAGE}
"""doctor's exit code is its worst result's: 0 all ok or skipped, 1 a warning, 2 a failure (as for any unmet
precondition)."""


@dataclass(frozen=True)
class Result:
    check: str
    status: Status
    detail: str
    fix: str = ""


def exit_code(results: list[Result]) -> int:
    return max((EXIT_CODES[r.status] for r in results), default=EXIT_OK)


def line(r: Result) -> str:
    """One result as one line: status, check, what was found, and the fix when it is not ok."""
    fix = f"; fix: {r.fix}" if r.fix and r.status in ("warn", "fail") else ""
    return f"{r.status:<4}  {r.check:<18}  {r.detail}{fix}"


def _from_error(check: str, exc: HpcrayError) -> Result:
    detail, _, fix = " ".join(str(exc).split()).partition("; ")
    return Result(check, "fail", detail, fix)


def _warned(check: str, warnings: list[str], ok: str) -> Result:
    """ok, or warn with what was warned about (hpcray's `hpcray: warning: ` prefix dropped)."""
    if not warnings:
        return Result(check, "ok", ok)
    texts = [" ".join(w.split()).removeprefix("hpcray: warning: ").removeprefix("warning: ") for w in warnings]
    detail, _, fix = "; ".join(texts).partition("; ")
    return Result(check, "warn", detail, fix)


def _skip(check: str, why: str) -> Result:
    return Result(check, "skip", why)


class _TimedOut(Exception):
    pass


def _within(timeout: float, fn: Callable[..., T], *args: Any) -> T:
    """fn(*args), or _TimedOut after `timeout` seconds (the work goes on in a daemon thread, which the process does
    not wait for): no check can hang doctor on a server that never answers."""
    try:
        return in_background("hpcray-doctor-check", fn, *args).result(timeout)
    except concurrent.futures.TimeoutError:
        raise _TimedOut() from None


# ---------------------------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------------------------


def check_profile(ref: str) -> tuple[Result, Profile | None]:
    try:
        p = load_profile(ref)
    except HpcrayError as exc:
        return _from_error("profile", exc), None
    return Result("profile", "ok", f"{p.source}: valid (backend {p.backend}, cluster {p.name})"), p


def check_helm() -> tuple[Result, helm.Helm | None]:
    try:
        h = helm.find_helm()
    except HpcrayError as exc:
        return _from_error("helm", exc), None
    return Result("helm", "ok", f"helm {h.version} (major {h.major}) at {h.path}"), h


def check_chart(chart: helm.Chart, source: Path, h: helm.Helm | None, timeout: float) -> Result:
    """The chart `up` installs: chart.path, else in $HPCRAY_CHARTS_DIR or the cache, else in its repository at its
    version (asked with `helm show chart`, nothing downloaded into the cache)."""
    if chart.path:
        if chart.path.is_file():
            return Result("chart", "ok", f"{chart.path} (chart.path)")
        return Result("chart", "fail", f"{source}: chart.path: {chart.path} does not exist",
                      "point chart.path at the packaged ray-cluster chart (.tgz), or remove it to use chart.repo "
                      "and chart.version")
    if found := helm.find_chart(chart):
        return Result("chart", "ok", f"{chart.name} {chart.version} at {found}")
    filename = f"{chart.name}-{chart.version}.tgz"
    absent = [str(d) for d in helm.chart_dirs() if d != helm.cache_dir() and not d.is_dir()]
    bad_dir = f"HPCRAY_CHARTS_DIR names {', '.join(absent)}, which does not exist" if absent else ""
    where = bad_dir or f"not in HPCRAY_CHARTS_DIR nor {helm.cache_dir()}"
    if h is None:
        return Result("chart", "fail", f"{filename} is not on this machine ({where}) and without helm it cannot be "
                                       "pulled",
                      f"set HPCRAY_CHARTS_DIR to a folder with {filename}, or install helm (see the helm check)")
    try:
        helm.check_remote_chart(h, chart, timeout)
    except HpcrayError as exc:
        return Result("chart", "fail",
                      f"{filename} is not on this machine ({where}) and its repository cannot give it "
                      f"({' '.join(str(exc).split())})",
                      f"set HPCRAY_CHARTS_DIR to a folder with {filename} (or chart.path to the .tgz), or fix "
                      f"chart.repo / chart.version in {source}")
    if bad_dir:
        return Result("chart", "warn", f"{bad_dir}; `up` pulls {filename} from {chart.repo} instead",
                      "fix HPCRAY_CHARTS_DIR, or unset it")
    return Result("chart", "ok", f"{chart.name} {chart.version} is in {chart.repo}; `up` pulls it into "
                                 f"{helm.cache_dir()}")


def check_values(p: Profile) -> Result:
    """The values `up` would install, rendered by the real `helm template` and checked against KubeRay's CRD."""
    from hpcray.render import check_release, dump_values, render_values

    warnings: list[str] = []
    try:
        check_release(p, dump_values(render_values(p)), required=True, warn=warnings.append)
    except HpcrayError as exc:
        return _from_error("values", exc)
    return _warned("values", warnings, f"the RayCluster `helm template` makes passes KubeRay {p.chart.version}'s "
                                       "CRD schema")


def check_kubeconfig(where: kube.Target) -> tuple[Result, kube.Kube | None]:
    try:
        k = kube.connect(where, check_namespace=False)
    except HpcrayError as exc:
        return _from_error("kubeconfig", exc), None
    context = f"context {where.context}" if where.context else "the current context"
    path = where.kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
    return Result("kubeconfig", "ok", f"{context} of {path}: server {k.server}"), k


def check_api_server(k: kube.Kube, timeout: float) -> Result:
    try:
        version = kube.server_version(k, timeout)
    except HpcrayError as exc:
        return _from_error("api-server", exc)
    return Result("api-server", "ok", f"{k.server} answers (Kubernetes {version})")


def check_namespace(where: kube.Target) -> Result:
    try:
        kube.connect(where)
    except HpcrayError as exc:
        return _from_error("namespace", exc)
    return Result("namespace", "ok", f"namespace {where.namespace} exists")


def check_kuberay(k: kube.Kube, timeout: float) -> Result:
    try:
        served = kube.rayclusters_served(k, timeout)
    except HpcrayError as exc:
        return _from_error("kuberay", exc)
    if not served:
        return Result("kuberay", "fail", f"the API server at {k.server} does not serve ray.io/v1 RayClusters: "
                                         "KubeRay's CRDs are not installed, so helm cannot create the cluster",
                      "ask the cluster admin to install the KubeRay operator (`helm install kuberay-operator "
                      "kuberay/kuberay-operator`)")
    return Result("kuberay", "ok", "the API server serves ray.io/v1 RayClusters (KubeRay's CRD is installed)")


def check_rights(k: kube.Kube, selector: str, raycluster: str) -> Result:
    """What can be checked without creating anything: reading the pods and the RayCluster `up` watches."""
    try:
        kube.list_pods(k, selector)
        kube.get_raycluster(k, raycluster)
    except HpcrayError as exc:
        return _from_error("rights", exc)
    return Result("rights", "ok", f"may list pods and read RayClusters in namespace {k.namespace} (the right to "
                                  "create them is known only when helm does)")


def check_virtual_node(p: Profile, k: kube.Kube, selector: str) -> Result:
    """interLink's preflight, as `up` runs it before helm."""
    warnings: list[str] = []
    try:
        interlink.preflight(p, k, selector, warnings.append)
    except HpcrayError as exc:
        return _from_error("virtual-node", exc)
    vpn = ", has a PodCIDR" if p.interlink.pod_vpn else ""
    return _warned("virtual-node", warnings, f"{p.interlink.node} exists, is Ready, its taints are tolerated{vpn}, "
                                             "and it has room for the head and every worker")


def check_sif(p: Profile) -> Result:
    """The SIF file the pods run, where this machine can see its directory; skipped where only SLURM can."""
    if not p.image.dir:
        return _skip("sif", "image.dir is unset: the pods run no SIF file")
    if problem := images.sif_known_missing(p):
        detail, _, fix = problem.partition("; ")
        return Result("sif", "fail", detail, fix)
    sif = Path(p.image.sif_path)
    if sif.parent.is_dir():
        return Result("sif", "ok", f"{sif} is present")
    return _skip("sif", f"{sif.parent} is not visible from this machine (it is on the SLURM side), so whether {sif} "
                        f"exists is known only there; `hpcray pull -p {profile_ref(p.source)} --slurm` pulls it there")


def check_image_ray(image_version: str | None, client: str | None) -> Result:
    """The profile's image.ray_version against this client's Ray, by the rule `submit` applies to a running
    cluster (a different major: fail; minor: warn)."""
    from hpcray.jobs.api import check_versions

    if client is None:
        return Result("image-ray", "warn", "Ray is not installed beside hpcray here",
                      f"install hpcray with its dependencies in {sys.prefix}")
    if not image_version:
        return Result("image-ray", "warn", f"image.ray_version is unset, so the image's Ray cannot be compared with "
                                           f"this client's ({client})",
                      "set image.ray_version to the Ray inside the image")
    warnings: list[str] = []
    try:
        check_versions(image_version, client, None, warnings.append)
    except HpcrayError as exc:
        failed = _from_error("image-ray", exc)
        return dataclasses.replace(failed, detail=f"image.ray_version {image_version}: {failed.detail}")
    return _warned("image-ray", [f"image.ray_version {image_version}: {w.removeprefix('warning: ')}" for w in warnings],
                   f"image.ray_version {image_version} and this client's Ray {client} match")


def check_ray_binary() -> Result:
    """The Ray the local backend starts its head with (`python -m ray.scripts.scripts` of this Python)."""
    from hpcray.backends.local import python_module_argv
    from hpcray.jobs.api import client_ray_version

    try:
        argv = python_module_argv("ray.scripts.scripts")
    except HpcrayError as exc:
        return _from_error("ray", exc)
    return Result("ray", "ok", f"{' '.join(argv)} (Ray {client_ray_version()})")


def check_ports(dashboard_port: int) -> Result:
    from hpcray.backends.local import BLOCK, choose_ports

    try:
        ports = choose_ports(dashboard_port)
    except HpcrayError as exc:
        return _from_error("ports", exc)
    return Result("ports", "ok", f"a free block of {BLOCK} ports for the head (dashboard {ports['dashboard-port']})")


def check_credentials(plan: CredentialPlan) -> tuple[Result, Credentials | None]:
    try:
        credentials = plan.load()
    except HpcrayError as exc:
        return _from_error("mlflow-credentials", exc), None
    shown = f" ({plan.file})" if plan.file else ""
    user = f"user '{credentials.username}'" if credentials else "nothing"
    return Result("mlflow-credentials", "ok", f"{plan.source}{shown} gives {user}"), credentials


def check_mlflow(p: Profile, credentials: Credentials | None, timeout: float) -> Result:
    """MLflow's preflight: the server answers, takes the credentials, and lets this user write to the experiment
    (a run is created and deleted; a missing experiment is created, as the first job would)."""
    uri = p.mlflow.tracking_uri
    if not uri:
        return _skip("mlflow", "mlflow.tracking_uri is unset: the jobs log to no MLflow")
    if not takes_login(uri):
        return Result("mlflow", "ok", f"{uri}: a local store, nothing to reach")
    try:
        preflight(p, credentials, timeout=timeout)
    except HpcrayError as exc:
        return _from_error("mlflow", exc)
    who = f"user '{credentials.username}'" if credentials else "anonymous requests"
    return Result("mlflow", "ok", f"{uri} answers, accepts {who}, and experiment '{p.mlflow.experiment}' is writable "
                                  "(a run was created and deleted)")


def check_jobs_api(backend: Backend, access: str, image_version: str | None, progress: Say) -> list[Result]:
    """The Jobs API of a cluster that is up, through the access the job commands use, and the cluster's Ray against
    this client's and the image's."""
    from hpcray.jobs import JobsApi
    from hpcray.jobs.api import check_versions, client_ray_version

    try:
        with backend.access(progress, access) as endpoint:
            api = JobsApi(endpoint)
            found = str(api.version().get("ray_version", ""))
    except HpcrayError as exc:
        return [_from_error("jobs-api", exc)]
    results = [Result("jobs-api", "ok", f"{api.address} answers (access {access}; Ray {found or 'unknown'})")]
    client = client_ray_version()
    if not found or client is None:
        return results + [_skip("cluster-ray", "the cluster or this machine does not say its Ray version")]
    warnings: list[str] = []
    try:
        check_versions(found, client, image_version, warnings.append, address=api.address)
    except HpcrayError as exc:
        return results + [_from_error("cluster-ray", exc)]
    return results + [_warned("cluster-ray", warnings, f"the cluster runs Ray {found}, this client {client}")]


# ---------------------------------------------------------------------------------------------------------------
# All of them
# ---------------------------------------------------------------------------------------------------------------


BACKSTOP_S = 1.0
"""A check's own requests time out after `timeout`; the check as a whole is given up this much later (for the calls
that have a longer limit of their own, like helm's)."""


def doctor(ref: str, *, access: str | None = None, timeout: float = 20.0, progress: Say) -> Iterator[Result]:
    """The checks that apply to the profile's backend, in order, each within `timeout` seconds."""
    result, p = check_profile(ref)
    yield result
    if p is None:
        return
    from hpcray.backends import backend_for

    def bounded(check: str, doing: str, fn: Callable[..., T], *args: Any) -> T | Result:
        progress(f"doctor: {doing} …")
        try:
            return _within(timeout + BACKSTOP_S, fn, *args)
        except _TimedOut:
            return Result(check, "fail", f"{doing} did not finish within {timeout:.0f} s",
                          "check that it is reachable from here (a firewall that drops packets, a VPN that is down), "
                          "or give it longer with --timeout")

    way = access or p.access
    backend = backend_for(p)
    reachable = True  # the cluster's status can be read (kuberay: helm and the Kubernetes API answered)
    if p.backend == "local":
        yield check_ray_binary()
    else:
        reachable = yield from _kuberay_checks(p, bounded, timeout)
        yield check_sif(p)
        from hpcray.jobs.api import client_ray_version

        yield check_image_ray(p.image.ray_version, client_ray_version())
    plan = credential_plan(p)
    credentials = None
    if plan.where is not None:
        result, credentials = check_credentials(plan)  # not bounded: stdin may prompt
        yield result
    status = bounded("cluster", "reading the cluster's status", _cluster_status, backend) if reachable else None
    if p.backend == "local":
        up = not isinstance(status, Result) and status is not None and status.exists
        yield _skip("ports", f"local cluster {p.name} is up on its own ports") if up else \
            check_ports(p.local.dashboard_port)
    yield _mlflow(p, backend, plan, credentials, bounded, timeout)
    if status is None:
        yield _skip("jobs-api", "needs helm, the Kubernetes API and the namespace (see above)")
    elif isinstance(status, Result):
        yield status
    elif not status.ready:
        state = "is not ready" if status.exists else "is not up"
        yield _skip("jobs-api", f"cluster {status.name} {state}: the Jobs API is checked once it is "
                                f"(`hpcray up -p {profile_ref(p.source)}`)")
    else:
        found = bounded("jobs-api", "calling the Ray Jobs API", check_jobs_api, backend, way, p.image.ray_version,
                        progress)
        yield from [found] if isinstance(found, Result) else found


def _cluster_status(backend: Backend) -> ClusterStatus | Result:
    try:
        return backend.status()
    except HpcrayError as exc:
        return _from_error("cluster", exc)


def _mlflow(p: Profile, backend: Backend, plan: CredentialPlan, credentials: Credentials | None, bounded: Any,
            timeout: float) -> Result:
    if plan.where is not None and credentials is None:
        return _skip("mlflow", "no credentials (see mlflow-credentials)")
    uri = backend.tracking_uri()  # the local head's MLflow server while it runs, else the profile's
    if p.backend == "local" and p.local.mlflow_server and uri == p.mlflow.tracking_uri:
        return _skip("mlflow", "local.mlflow_server: the MLflow server starts with `up`")
    tracked = dataclasses.replace(p, mlflow=dataclasses.replace(p.mlflow, tracking_uri=uri))
    if not takes_login(uri):
        return check_mlflow(tracked, credentials, timeout)
    return bounded("mlflow", f"checking MLflow at {uri}", check_mlflow, tracked, credentials, timeout)


def _kuberay_checks(p: Profile, bounded: Any, timeout: float) -> Generator[Result, None, bool]:
    """helm, the chart, the values, and the Kubernetes side; whether helm and the API server answered."""
    result, h = check_helm()
    yield result
    chart = bounded("chart", "looking for the chart", check_chart, targets.chart(p), p.source, h, timeout)
    yield chart
    if h is not None and chart.status != "fail":
        yield bounded("values", "rendering the values with `helm template`", check_values, p)
    else:
        yield _skip("values", "needs helm and the chart (see above)")
    where = targets.kube_target(p)
    result, k = check_kubeconfig(where)
    yield result
    later = ["api-server", "namespace", "kuberay", "rights"] + (["virtual-node"] if p.interlink.enabled else [])
    if k is None:
        yield from (_skip(c, "needs the Kubernetes API (see kubeconfig)") for c in later)
        return False
    api = bounded("api-server", f"reaching the Kubernetes API at {k.server}", check_api_server, k, timeout)
    yield api
    if api.status == "fail":
        yield from (_skip(c, "needs the Kubernetes API (see api-server)") for c in later[1:])
        return False
    namespace = bounded("namespace", f"reading namespace {where.namespace}", check_namespace, where)
    yield namespace
    yield bounded("kuberay", "looking for KubeRay's RayCluster CRD", check_kuberay, k, timeout)
    selector = f"{kube.CLUSTER_LABEL}={p.raycluster_name}"
    if namespace.status == "fail":
        yield _skip("rights", f"needs namespace {where.namespace}")
    else:
        yield bounded("rights", "reading pods and RayClusters", check_rights, k, selector, p.raycluster_name)
    if p.interlink.enabled:
        yield bounded("virtual-node", f"checking interLink virtual node {p.interlink.node}", check_virtual_node, p, k,
                      selector)
    return h is not None and namespace.status != "fail"
