"""The only place that runs helm: argument lists (never a shell string), Helm 3 and 4, stderr → one line."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from hpcray.errors import ChartError, HelmError, ReleaseNotFound, ToolMissing
from hpcray.kube import Target
from hpcray.state import write_atomic

SUPPORTED_MAJORS = (3, 4)


@dataclass(frozen=True)
class Chart:
    """A chart reference: a packaged chart file (`path`), or `name` at `version` in the repository `repo`."""

    name: str
    version: str
    repo: str
    path: Path | None = None


@dataclass(frozen=True)
class Release:
    """One release, by name, where it lives: what every helm command of a release takes."""

    name: str
    where: Target


@dataclass(frozen=True)
class Helm:
    path: str
    version: str  # e.g. "3.18.0"

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    @property
    def rollback_flag(self) -> str:
        """Helm 4 renamed --atomic."""
        return "--rollback-on-failure" if self.major >= 4 else "--atomic"


def find_helm() -> Helm:
    """$HPCRAY_HELM, else helm on PATH, else one beside the running Python (where `make install` puts it)."""
    chosen = os.environ.get("HPCRAY_HELM")
    if chosen:  # asked for by name: never silently replaced by another helm
        if not os.access(chosen, os.X_OK) or os.path.isdir(chosen):
            raise ToolMissing(f"HPCRAY_HELM={chosen} is not an executable file; point it at helm 3 or 4, or unset it "
                              "to use the helm on PATH")
        return _probe(chosen)
    beside = Path(sys.executable).parent / "helm"
    for c in (shutil.which("helm"), str(beside)):
        if c and os.access(c, os.X_OK) and not os.path.isdir(c):
            return _probe(c)
    raise ToolMissing(f"helm not found on PATH nor at {beside}; install helm 3 or 4 there (`make install` does), "
                      "or set HPCRAY_HELM to one")


@lru_cache(maxsize=8)
def _probe(path: str) -> Helm:
    try:
        out = subprocess.run([path, "version", "--short"], capture_output=True, text=True, timeout=30)
    except OSError as exc:
        raise ToolMissing(f"{path} cannot run ({exc.strerror}); reinstall helm with `make install`") from None
    m = re.match(r"v?(\d+\.\d+\.\d+)", out.stdout.strip())
    if not m:
        raise ToolMissing(f"{path} did not report a version ({out.stderr.strip()[:120]}); is it really helm?")
    helm = Helm(path, m.group(1))
    if helm.major not in SUPPORTED_MAJORS:
        raise ToolMissing(f"{path} is helm {helm.version}; hpcray supports helm 3 and 4 — install one with "
                          "`make install` or set HPCRAY_HELM")
    return helm


def kube_args(where: Target) -> list[str]:
    return ["--namespace", where.namespace, *context_args(where)]


def context_args(where: Target) -> list[str]:
    """The kube context and kubeconfig, without a namespace (for operations across namespaces)."""
    args: list[str] = []
    if where.context:
        args += ["--kube-context", where.context]
    if where.kubeconfig:
        args += ["--kubeconfig", where.kubeconfig]
    return args


def run(helm: Helm, args: list[str], *, stdin: str | None = None, timeout: float | None = None,
        what: str = "helm") -> subprocess.CompletedProcess[str]:
    """Run helm; on failure raise HelmError with stderr reduced to one actionable line."""
    env = {**os.environ, "HELM_NO_PLUGINS": "1"}
    try:
        done = subprocess.run([helm.path, *args], input=stdin, capture_output=True, text=True, timeout=timeout,
                              env=env)
    except subprocess.TimeoutExpired:
        raise HelmError(f"{what}: helm did not finish within {timeout:.0f}s; check the cluster is reachable") from None
    if done.returncode < 0:  # killed (OOM killer, a cancelled CI job): what it was doing is half done
        import signal

        raise HelmError(f"{what}: helm was killed by {signal.Signals(-done.returncode).name} before it finished; run "
                        "the command again (`hpcray up` recovers a release a killed helm left pending)")
    if done.returncode != 0:
        if re.search(_NOT_FOUND, done.stderr):
            raise ReleaseNotFound(f"{what}: no such release")
        raise HelmError(f"{what}: {explain(done.stderr)}")
    return done


_NOT_FOUND = r"release: not found|release not found"


_EXPLANATIONS: list[tuple[str, str]] = [
    (r'context "([^"]+)" does not exist',
     "kube context '{0}' is not in your kubeconfig; fix kubernetes.context (see `kubectl config get-contexts`)"),
    (r'(?i:kubernetes cluster unreachable): Get "(\w+://[^/"]+)',
     "the Kubernetes API at {0} is unreachable; check kubernetes.context / kubeconfig and that the API server is up"),
    (r"(?i:kubernetes cluster unreachable)",
     "the Kubernetes cluster is unreachable; check kubernetes.context / kubeconfig and that the API server is up"),
    (r"(?:dial tcp|lookup) ([^\s:]+)[^\n]*(?:connection refused|no such host|i/o timeout|network is unreachable)",
     "cannot reach {0} (network error); check the address and your connection"),
    (r'namespaces "([^"]+)" not found',
     "namespace '{0}' does not exist; create it (`kubectl create namespace {0}`) or fix kubernetes.namespace"),
    (r"another operation \(install/upgrade/rollback\) is in progress",
     "the release is locked by another helm operation (or one that was killed); wait, or run `hpcray up` again "
     "to recover it"),
    (r"has no deployed releases",
     "the release exists only in a failed state; `hpcray up` recovers it, or `hpcray down` removes it"),
    (r"chart \"([^\"]+)\" version \"([^\"]+)\" not found|no chart version found for ([^\s]+)",
     "chart version not found in the repository; fix chart.version (see `helm search repo kuberay --versions`)"),
    (r"forbidden|Unauthorized|is forbidden",
     "the Kubernetes API refused us (no permission); check your credentials and RBAC in namespace"),
]


def explain(stderr: str) -> str:
    text = stderr.strip()
    for pattern, message in _EXPLANATIONS:
        m = re.search(pattern, text)
        if m:
            groups = [g for g in m.groups() if g]
            return message.format(*groups) if groups else message
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    last = lines[-1] if lines else "helm failed without a message"
    return re.sub(r"^Error:\s*", "", last)


# ---------------------------------------------------------------------------------------------------------------
# Charts: a local .tgz, one in $HPCRAY_CHARTS_DIR or the cache, else `helm pull` from the repository
# ---------------------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(root) / "hpcray" / "charts"


def chart_dirs() -> list[Path]:
    """Where packaged charts are looked for: each folder of $HPCRAY_CHARTS_DIR, then the cache."""
    dirs = [Path(d) for d in os.environ.get("HPCRAY_CHARTS_DIR", "").split(os.pathsep) if d]
    return dirs + [cache_dir()]


def find_chart(chart: Chart) -> Path | None:
    """`<name>-<version>.tgz` in $HPCRAY_CHARTS_DIR or the cache; None when none has it."""
    filename = f"{chart.name}-{chart.version}.tgz"
    return next((d / filename for d in chart_dirs() if (d / filename).is_file()), None)


def resolve_chart(helm: Helm | None, chart: Chart) -> Path:
    """A local packaged chart: its path, one in $HPCRAY_CHARTS_DIR or the cache, else pulled into the cache."""
    if chart.path:
        return chart.path
    filename = f"{chart.name}-{chart.version}.tgz"
    if found := find_chart(chart):
        return found
    if helm is None:
        helm = find_helm()
    dest = cache_dir()
    dest.mkdir(parents=True, exist_ok=True)
    try:
        run(helm, ["pull", chart.name, "--repo", chart.repo, "--version", chart.version, "--destination", str(dest)],
            timeout=120, what=f"helm pull {chart.name} {chart.version}")
    except HelmError as exc:
        raise ChartError(f"chart {chart.name} {chart.version} is not available locally and could not be pulled "
                         f"from {chart.repo} ({exc}); set chart.path to a .tgz or HPCRAY_CHARTS_DIR to a folder of "
                         "charts") from None
    return dest / filename


def check_remote_chart(helm: Helm, chart: Chart, timeout: float) -> None:
    """That the chart's repository answers and has the chart at its version (`helm show chart`); HelmError says why
    not. Nothing is written to hpcray's chart cache."""
    run(helm, ["show", "chart", chart.name, "--repo", chart.repo, "--version", chart.version], timeout=timeout,
        what=f"helm show chart {chart.name} --version {chart.version} --repo {chart.repo}")


def template(helm: Helm, chart: Chart, release: Release, values_yaml: str) -> str:
    """`helm template` of the chart as the release, with the given values (passed on stdin, never written to disk)."""
    args = ["template", release.name, str(resolve_chart(helm, chart)), "--namespace", release.where.namespace,
            "--values", "-"]
    return run(helm, args, stdin=values_yaml, timeout=60, what="helm template").stdout


OPERATOR_CHART = "kuberay-operator"


def raycluster_crd_schema(helm: Helm | None, chart: Chart) -> dict[str, Any] | None:
    """The RayCluster openAPIV3Schema for the chart's KubeRay version: from $HPCRAY_CRD_DIR, a crds/ folder beside
    the charts, or the kuberay-operator chart of the same version (from the same repository). None when none can
    be had.

    The v1 schema is cached as JSON beside the charts, keyed by its source file: parsing the 0.8 MB CRD YAML costs
    ~1 s per command, reading the JSON ~20 ms."""
    import hashlib

    version = chart.version
    dirs = [Path(d) for d in os.environ.get("HPCRAY_CRD_DIR", "").split(os.pathsep) if d]
    dirs += [d / "crds" for d in chart_dirs()]
    source = next((d / f"ray.io_rayclusters-{version}.yaml" for d in dirs
                   if (d / f"ray.io_rayclusters-{version}.yaml").is_file()), None)
    if source is None:
        try:
            source = resolve_chart(helm, Chart(OPERATOR_CHART, version, chart.repo))
        except (ChartError, ToolMissing):
            return None
    st = source.stat()
    key = hashlib.sha256(f"{source.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = cache_dir() / f"raycluster-schema-{version}-{key}.json"
    try:
        return dict(json.loads(cached.read_text()))
    except (OSError, ValueError):
        pass
    schema = _schema_from(source)
    if schema is not None:
        write_atomic(cached, json.dumps(schema), mode=0o644)
    return schema


def _schema_from(source: Path) -> dict[str, Any] | None:
    import yaml

    if source.suffix == ".tgz":
        with tarfile.open(source) as tar:
            member = tar.extractfile("kuberay-operator/crds/ray.io_rayclusters.yaml")
            if member is None:
                return None
            text = member.read().decode()
    else:
        text = source.read_text()
    crd = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    for v in crd["spec"]["versions"]:
        if v["name"] == "v1":
            return dict(v["schema"]["openAPIV3Schema"])
    return None


# ---------------------------------------------------------------------------------------------------------------
# Releases: install/upgrade, uninstall, list, status, history, and recovery of one a killed helm left behind
# ---------------------------------------------------------------------------------------------------------------

MANAGED_LABEL = "hpcray"  # every release hpcray makes carries hpcray=true, so `helm list -l hpcray=true` finds them
PENDING = ("pending-install", "pending-upgrade", "pending-rollback", "uninstalling")


@dataclass(frozen=True)
class ReleaseInfo:
    """A release as helm reports it."""

    name: str
    namespace: str
    revision: int
    status: str  # deployed | failed | pending-install | pending-upgrade | superseded | ...
    chart: str = ""
    updated: str = ""


def upgrade_install_args(helm: Helm, release: Release, chart: Path, labels: dict[str, str],
                         timeout_s: float) -> list[str]:
    """`helm upgrade --install`, values on stdin. The rollback flag makes a failed install leave no release behind;
    helm's own wait covers only the RayCluster object: the pods are watched by hpcray.kube."""
    label_arg = ",".join(f"{k}={v}" for k, v in labels.items())
    args = ["upgrade", "--install", release.name, str(chart), *kube_args(release.where), "--values", "-",
            "--labels", label_arg, helm.rollback_flag, "--timeout", f"{max(1, int(timeout_s))}s", "--output", "json"]
    if helm.major >= 4:
        args.append("--wait=hookOnly")  # --rollback-on-failure would otherwise wait with kstatus on the RayCluster
    return args


def upgrade_install(helm: Helm, release: Release, argv: list[str], values_yaml: str, timeout_s: float) \
        -> ReleaseInfo:
    """Run the argv `upgrade_install_args` made for the release."""
    done = run(helm, argv, stdin=values_yaml, timeout=timeout_s + 30, what=f"helm upgrade --install {release.name}")
    return _release_of(json.loads(done.stdout))


def uninstall_args(release: Release, timeout_s: float = 300) -> list[str]:
    return ["uninstall", release.name, *kube_args(release.where), "--timeout", f"{int(timeout_s)}s"]


def uninstall(helm: Helm, release: Release, timeout_s: float = 300) -> bool:
    """Remove the release; False when there was none."""
    done = _run_or_missing(helm, uninstall_args(release, timeout_s), timeout=timeout_s + 30,
                           what=f"helm uninstall {release.name}")
    return done is not None


def status(helm: Helm, release: Release) -> ReleaseInfo | None:
    done = _run_or_missing(helm, ["status", release.name, *kube_args(release.where), "--output", "json"], timeout=60,
                           what=f"helm status {release.name}")
    return None if done is None else _release_of(json.loads(done.stdout))


def history(helm: Helm, release: Release) -> list[ReleaseInfo]:
    done = _run_or_missing(helm, ["history", release.name, *kube_args(release.where), "--output", "json"],
                           timeout=60, what=f"helm history {release.name}")
    if done is None:
        return []
    return [ReleaseInfo(release.name, release.where.namespace, int(r["revision"]), r["status"], r.get("chart", ""),
                        r.get("updated", "")) for r in json.loads(done.stdout)]


def list_releases(helm: Helm, where: Target) -> list[ReleaseInfo]:
    """Releases made by hpcray (any status) in every namespace of the target's context."""
    every_status = ["--all"] if helm.major == 3 else []  # helm 4 lists every status by default and has no --all
    done = run(helm, ["list", "--selector", f"{MANAGED_LABEL}=true", *every_status, "--all-namespaces",
                      *context_args(where), "--output", "json"], timeout=60, what="helm list")
    return [ReleaseInfo(r["name"], r["namespace"], int(r["revision"]), r["status"], r.get("chart", ""),
                        r.get("updated", "")) for r in json.loads(done.stdout or "[]")]


def rollback(helm: Helm, release: Release, revision: int, timeout_s: float = 300) -> None:
    run(helm, ["rollback", release.name, str(revision), *kube_args(release.where), "--timeout", f"{int(timeout_s)}s"],
        timeout=timeout_s + 30, what=f"helm rollback {release.name} {revision}")


def recover(helm: Helm, release: Release, current: ReleaseInfo | None) -> str | None:
    """Bring a release (`current`, from status()) that a killed or failed helm left pending-* or failed back to
    something `upgrade --install` accepts. Returns what was done, in words, or None when nothing needed doing.

    The caller holds the release's lock, so a pending release is not another hpcray's install in progress."""
    if current is None or current.status not in (*PENDING, "failed"):
        return None
    good = [r for r in history(helm, release) if r.status in ("deployed", "superseded")
            and r.revision < current.revision]
    if current.status == "failed" and good:
        return None  # helm upgrades a failed release that has a deployed revision before it
    if good:
        rollback(helm, release, good[-1].revision)
        return (f"release {release.name} was left {current.status} at revision {current.revision} (a helm that was "
                f"killed or failed); rolled it back to revision {good[-1].revision}")
    uninstall(helm, release)
    return (f"release {release.name} was left {current.status} with no working revision (a helm that was killed or "
            "failed); uninstalled it")


def _run_or_missing(helm: Helm, args: list[str], *, timeout: float, what: str) \
        -> subprocess.CompletedProcess[str] | None:
    """run(), but None where helm says the release does not exist."""
    try:
        return run(helm, args, timeout=timeout, what=what)
    except ReleaseNotFound:
        return None


def _release_of(data: dict[str, Any]) -> ReleaseInfo:
    info = data.get("info", {})
    return ReleaseInfo(data["name"], data.get("namespace", ""), int(data.get("version", 0)), info.get("status", ""),
                       _chart_name(data.get("chart", {})), info.get("last_deployed", ""))


def _chart_name(chart: dict[str, Any]) -> str:
    meta = chart.get("metadata", {})
    return f"{meta.get('name', '')}-{meta.get('version', '')}" if meta else ""
