"""`hpcray up / status / down / gc / dashboard` through the real helm 3 and 4 against tests/fake_kube_api.py.

The fake API server and its fake KubeRay operator run in this process; hpcray runs as a real subprocess (its exit
codes, stdout/stderr and Ctrl-C are what a user sees). Pod transitions take 0.05 s per step unless a test scripts
them otherwise.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import re
import signal
import socket
import socketserver
import subprocess
import textwrap
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from hpcray import kube, targets
from hpcray.backends.kuberay import KubeRayBackend
from hpcray.errors import KubeError
from hpcray.portforward import Relay
from hpcray.profile import load_profile
from tests.fake_kube_api import MINIMAL_RAYCLUSTER_CRD, FakeKubeAPI
from tests.fake_kube_objects import PODS
from tests.fake_kuberay_operator import NODE
from tests.fixtures_tools import helm_path
from tests.hpcray_cli import run, start

PASSWORD = "pw-7f3a9c-never-leaks"
CREDENTIALS = {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": PASSWORD}


@pytest.fixture(scope="session")
def raycluster_crd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A RayCluster CRD without the 0.8 MB schema, which the fake parses with the pure-Python YAML loader in ~5 s
    per server. hpcray validates against the real schema itself before helm runs (tests/test_render.py)."""
    path = tmp_path_factory.mktemp("crd") / "rayclusters.json"
    path.write_text(json.dumps(MINIMAL_RAYCLUSTER_CRD))
    return path


@pytest.fixture
def api(charts_env: Path, raycluster_crd: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKubeAPI]:
    monkeypatch.setenv("HPCRAY_STATE_DIR", str(tmp_path / "state"))
    server = FakeKubeAPI(crds=[raycluster_crd]).start()
    try:
        yield server
    finally:
        server.stop()
    assert server.operator is not None and not server.operator.errors


@pytest.fixture
def helm4(monkeypatch: pytest.MonkeyPatch) -> str:
    """For behaviour that is hpcray's own (watching, diagnosis, locks), one helm is enough."""
    path = helm_path(4) or helm_path(3)
    if path is None:
        pytest.skip("no helm installed: run `make test` or set HPCRAY_HELM4")
    monkeypatch.setenv("HPCRAY_HELM", path)
    return path


def write_profile(tmp_path: Path, api: FakeKubeAPI, name: str = "lc", *, workers: int = 2,
                  credentials: str = "env", tracking_uri: str = "http://mlflow.example:5000") -> Path:
    kubeconfig = tmp_path / "kubeconfig"
    if not kubeconfig.exists():
        api.write_kubeconfig(kubeconfig)
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: {name}
        backend: kuberay
        kubernetes: {{namespace: default, kubeconfig: {kubeconfig}}}
        chart: {{version: 1.2.2}}
        image: {{dir: /opt/sif, name: ray, tag: sif}}
        head: {{cpu: "1", memory: 2G}}
        workers:
          cpu: {{replicas: {workers}, cpu: "1", memory: 2G, gpus: 1}}
        mlflow: {{tracking_uri: "{tracking_uri}", credentials: {credentials}}}
        """))
    return path


def hpcray(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run(*args, extra_env=CREDENTIALS, timeout=timeout)


def start_hpcray(*args: str) -> subprocess.Popen[str]:
    return start(*args, extra_env=CREDENTIALS)


def read_until(proc: subprocess.Popen[str], needle: str, timeout: float = 30) -> str:
    """stderr of a running hpcray up to the line containing needle."""
    assert proc.stderr is not None
    seen = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        seen += line
        if needle in line:
            return seen
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"never saw {needle!r}; stderr so far:\n{seen}")


def helm_releases(api: FakeKubeAPI, name: str) -> dict[int, dict[str, Any]]:
    """Helm's release records (storage Secrets) of one release, by revision, decoded."""
    out = {}
    for s in api.list("secrets", labels=f"owner=helm,name={name}"):
        blob = base64.b64decode(base64.b64decode(s["data"]["release"]))
        out[int(s["metadata"]["labels"]["version"])] = json.loads(gzip.decompress(blob))
    return out


def pods(api: FakeKubeAPI, name: str = "lc") -> list[dict[str, Any]]:
    return api.list("pods", labels=f"ray.io/cluster={name}-kuberay")


# ---------------------------------------------------------------------------------------------------------------
# The lifecycle, with helm 3 and helm 4
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.reliability(
    case="fault: `down` while pods are still terminating",
    sees="one line per pod as it goes (Terminating, deleted), then `lc: removed`; `down` again: `nothing to "
         "remove`",
    remains="nothing: no pod, release or Secret")
def test_up_upgrade_status_down_and_the_password_stays_in_the_secret(helm_bin: str, api: FakeKubeAPI,
                                                                      tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    argv_log = tmp_path / "helm-argv.log"
    shim = tmp_path / "helm"
    shim.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {argv_log}\nexec {helm_bin} "$@"\n')
    shim.chmod(0o755)
    monkeypatch.setenv("HPCRAY_HELM", str(shim))
    assert api.operator is not None
    api.operator.terminating_delay = 0.3  # `down` must wait for pods that take a while to go
    profile = write_profile(tmp_path, api)

    first = hpcray("up", "-p", str(profile), "--ttl", "1h")
    assert first.returncode == 0, first.stderr
    assert "installed (revision 1)" in first.stderr
    assert "lc: kuberay namespace default release deployed rev 1; ready; 3/3 pods Ready; 2 GPUs" in first.stdout
    assert [_ready(p) for p in pods(api)] == [True, True, True]
    secret = api.get("secrets", "lc-hpcray-mlflow")
    assert secret is not None and secret["metadata"]["labels"]["hpcray"] == "true"
    assert base64.b64decode(secret["data"]["password"]).decode() == PASSWORD
    assert base64.b64decode(secret["data"]["username"]).decode() == "alice"
    rc = api.get("rayclusters", "lc-kuberay")
    assert rc is not None and "hpcray.io/expires-at" in rc["metadata"]["annotations"]

    status = hpcray("status", "-p", str(profile), "--json")
    assert status.returncode == 0, status.stderr
    st = json.loads(status.stdout)
    assert st["exists"] and st["ready"] and st["release"]["revision"] == 1 and st["namespace"] == "default"
    assert sorted(n["role"] for n in st["nodes"]) == ["head", "worker", "worker"]
    assert sum(n["gpus"] for n in st["nodes"]) == 2
    assert 3500 < st["expires_at"] - time.time() <= 3600

    again = hpcray("up", "-p", str(profile))
    assert again.returncode == 0, again.stderr
    assert "upgraded (revision 2)" in again.stderr
    records = helm_releases(api, "lc")
    assert records[2]["info"]["status"] == "deployed" and records[1]["info"]["status"] == "superseded"
    rc = api.get("rayclusters", "lc-kuberay")
    assert rc is not None and "hpcray.io/expires-at" not in (rc["metadata"].get("annotations") or {})

    down = hpcray("down", "-p", str(profile))
    assert down.returncode == 0, down.stderr
    assert "Terminating" in down.stderr and "deleted" in down.stderr and down.stdout == "lc: removed\n"
    assert pods(api) == [] and helm_releases(api, "lc") == {} and api.get("secrets", "lc-hpcray-mlflow") is None

    twice = hpcray("down", "-p", str(profile))
    assert twice.returncode == 0, twice.stderr
    assert "no release lc in namespace default" in twice.stderr and "nothing to remove" in twice.stdout

    written = [f for f in tmp_path.rglob("*") if f.is_file()]
    leaks = [str(f) for f in written if PASSWORD.encode() in f.read_bytes()]
    outputs = first.stdout + first.stderr + again.stdout + again.stderr + status.stdout + down.stderr
    assert argv_log.read_text().count("upgrade --install lc") == 2
    assert leaks == [] and PASSWORD not in outputs  # argv of helm (the log), every file, stdout/stderr


@pytest.mark.reliability(
    case="fault: the API server rejects the RayCluster mid-install (helm 3/4)",
    sees="`helm upgrade --install lc: … quotaTicket …`, exit 2",
    remains="nothing: no release record, RayCluster or pod (rolled back)")
def test_helm_failing_mid_install_leaves_no_half_release(helm_bin: str, charts_env: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The API server rejects the RayCluster (as an admission webhook or a stricter CRD would) after helm has
    recorded the release: the rollback flag (--atomic / --rollback-on-failure) must leave nothing behind."""
    monkeypatch.setenv("HPCRAY_STATE_DIR", str(tmp_path / "state"))
    strict = tmp_path / "strict-crd.yaml"
    strict.write_text(json.dumps({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "rayclusters.ray.io"},
        "spec": {"group": "ray.io", "scope": "Namespaced",
                 "names": {"kind": "RayCluster", "listKind": "RayClusterList", "plural": "rayclusters",
                           "singular": "raycluster"},
                 "versions": [{"name": "v1", "served": True, "storage": True, "subresources": {"status": {}},
                               "schema": {"openAPIV3Schema": {"type": "object", "properties": {"spec": {
                                   "type": "object", "required": ["quotaTicket"]}}}}}]}}))
    with FakeKubeAPI(crds=[strict]) as api:
        profile = write_profile(tmp_path, api)
        done = hpcray("up", "-p", str(profile), "--timeout", "20s")
        assert done.returncode == 2, done.stderr
        [line] = done.stderr.strip().splitlines()[-1:]
        assert line.startswith("hpcray: error: helm upgrade --install lc:") and "quotaTicket" in line
        assert helm_releases(api, "lc") == {}
        assert api.list("rayclusters") == [] and pods(api) == []


@pytest.mark.parametrize("left", ["pending-install", "pending-upgrade"])
@pytest.mark.reliability(
    case="fault: a release left pending-install / pending-upgrade by a killed helm",
    sees="the next `up` says `release lc was left pending-… ; rolled it back to revision 1` / `uninstalled it`, "
         "then installs or upgrades",
    remains="one deployed release")
def test_next_up_recovers_a_release_a_killed_helm_left_pending(helm_bin: str, api: FakeKubeAPI, tmp_path: Path,
                                                               left: str) -> None:
    """A helm killed mid-operation leaves its release record pending: exactly what is forged here."""
    profile = write_profile(tmp_path, api, credentials="none")
    KubeRayBackend(load_profile(profile)).up(timeout=30, progress=lambda line: None)
    [record] = api.list("secrets", labels="owner=helm,name=lc")
    if left == "pending-install":
        _set_release_status(api, record, 1, left)
    else:
        _set_release_status(api, record, 2, left)  # helm writes revision 2 pending before touching anything

    done = hpcray("up", "-p", str(profile))
    assert done.returncode == 0, done.stderr
    if left == "pending-install":
        assert "was left pending-install with no working revision" in done.stderr and "uninstalled it" in done.stderr
        assert "installed (revision 1)" in done.stderr
    else:
        assert "was left pending-upgrade at revision 2" in done.stderr
        assert "rolled it back to revision 1" in done.stderr and "upgraded (revision 4)" in done.stderr
    statuses = {rev: r["info"]["status"] for rev, r in helm_releases(api, "lc").items()}
    latest = max(statuses)
    assert statuses[latest] == "deployed" and list(statuses.values()).count("deployed") == 1
    assert not any(s.startswith("pending") for rev, s in statuses.items() if rev != 2)  # helm's rollback keeps 2


def _set_release_status(api: FakeKubeAPI, record: dict[str, Any], revision: int, status: str) -> None:
    blob = json.loads(gzip.decompress(base64.b64decode(base64.b64decode(record["data"]["release"]))))
    blob["info"]["status"], blob["version"] = status, revision
    encoded = base64.b64encode(base64.b64encode(gzip.compress(json.dumps(blob).encode()))).decode()
    name = f"sh.helm.release.v1.lc.v{revision}"
    forged = {"apiVersion": "v1", "kind": "Secret", "type": "helm.sh/release.v1", "data": {"release": encoded},
              "metadata": {"name": name, "namespace": "default",
                           "labels": {**record["metadata"]["labels"], "status": status, "version": str(revision)}}}
    if api.get("secrets", name) is not None:
        api.delete("secrets", name)
    api.create(forged)


# ---------------------------------------------------------------------------------------------------------------
# Why not ready, timeouts and Ctrl-C
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.reliability(
    case="fault: pods never get Ready (unschedulable head, image pull failing, NotReady node)",
    sees="progress lines as it happens, then `lc was not ready within 2s: 0/3 pods Ready; head … Unschedulable …; "
         "worker … ImagePullBackOff …; node … is NotReady …`; exit 4",
    remains="nothing with --down-on-failure (no release, no Secret)")
def test_pending_head_and_image_pull_failure_are_named_then_timeout_exit_4(helm4: str, api: FakeKubeAPI,
                                                                         tmp_path: Path) -> None:
    assert api.operator is not None
    api.operator.keep_pending(group="headgroup", message="0/3 nodes are available: 3 Insufficient nvidia.com/gpu.")
    api.operator.fail_image_pull(group="cpu", message="rpc error: code = NotFound desc = manifest unknown")
    _node_not_ready(api, NODE, "KubeletNotReady", "virtual kubelet lost contact with interLink")
    profile = write_profile(tmp_path, api)

    done = hpcray("up", "-p", str(profile), "--timeout", "2s", "--down-on-failure")
    assert done.returncode == 4, done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("hpcray: error: lc was not ready within 2s: 0/3 pods Ready;")
    assert "head lc-kuberay-head-" in error and "Unschedulable: 0/3 nodes are available: 3 Insufficient" in error
    assert re.search(r"worker lc-kuberay-cpu-worker-\w+, lc-kuberay-cpu-worker-\w+ Pending: container ray-worker "
                     r"ImagePullBackOff", error)  # the same reason is said once for both
    assert 'Failed to pull image "/opt/sif/ray:sif": rpc error: code = NotFound desc = manifest unknown' in error
    assert f"node {NODE} is NotReady (KubeletNotReady: virtual kubelet lost contact with interLink)" in error
    assert "removed (--down-on-failure)" in error
    assert "Pending  Unschedulable: 0/3 nodes" in done.stderr  # the progress line said it as it happened
    assert helm_releases(api, "lc") == {} and api.get("secrets", "lc-hpcray-mlflow") is None


def test_status_names_a_pod_kuberay_replaced_and_why_it_ended(helm4: str, api: FakeKubeAPI, tmp_path: Path) -> None:
    """KubeRay deletes a pod that ended (here an evicted worker whose container was OOMKilled) and makes a new one:
    the pod is gone from the API, and `status` still says what became of it, from KubeRay's Event."""
    profile = write_profile(tmp_path, api, workers=1)
    assert hpcray("up", "-p", str(profile)).returncode == 0
    worker = next(p for p in pods(api) if p["metadata"]["labels"]["ray.io/node-type"] == "worker")
    name = worker["metadata"]["name"]
    ended = {**worker["status"], "phase": "Failed", "reason": "Evicted", "containerStatuses": [
        {**worker["status"]["containerStatuses"][0], "ready": False,
         "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled", "finishedAt": "2026-12-01T10:00:00Z"}}}]}
    api.call(lambda: api.store.replace(PODS, "default", name, {**worker, "status": ended}, subresource="status"))
    deadline = time.monotonic() + 10
    while (api.get("pods", name) or len(pods(api)) < 2) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert api.get("pods", name) is None
    status = hpcray("status", "-p", str(profile))
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert [line.split()[:3] for line in lines if " Deleted " in line] == [[name, "worker", "Deleted"]], status.stdout
    assert "Failed: OOMKilled, exit code 137; KubeRay deleted it and made a new pod" in status.stdout
    assert sum(" worker " in line for line in lines) == 2  # the new worker, another name, and the one it replaced
    assert hpcray("down", "-p", str(profile)).returncode == 0


def _node_not_ready(api: FakeKubeAPI, name: str, reason: str, message: str) -> None:
    node = api.get("nodes", name, None)
    assert node is not None
    node["status"]["conditions"] = [{"type": "Ready", "status": "False", "reason": reason, "message": message}]
    api.call(api.store.replace, api.resource("nodes"), None, name, node, "status")


@pytest.mark.reliability(
    case="fault: Ctrl-C during `up`",
    sees="`interrupted while bringing up lc; the release is left in place: `hpcray down -p …`` (or removed with "
         "--down-on-failure); exit 130",
    remains="the release and its Secret, or nothing with --down-on-failure")
def test_ctrl_c_during_up_keeps_or_removes_the_release_as_asked(helm4: str, api: FakeKubeAPI,
                                                                tmp_path: Path) -> None:
    assert api.operator is not None
    api.operator.keep_pending()
    profile = write_profile(tmp_path, api)

    kept = start_hpcray("up", "-p", str(profile))
    read_until(kept, "waiting for the head")
    kept.send_signal(signal.SIGINT)
    _, err = kept.communicate(timeout=30)
    assert kept.returncode == 130, err
    assert f"interrupted while bringing up lc; the release is left in place: `hpcray down -p {profile}`" in err
    assert 1 in helm_releases(api, "lc") and api.get("secrets", "lc-hpcray-mlflow") is not None

    removed = start_hpcray("up", "-p", str(profile), "--down-on-failure")
    read_until(removed, "waiting for the head")
    removed.send_signal(signal.SIGINT)
    _, err = removed.communicate(timeout=30)
    assert removed.returncode == 130, err
    assert "the release and its Secrets were removed (--down-on-failure)" in err
    assert helm_releases(api, "lc") == {} and api.get("secrets", "lc-hpcray-mlflow") is None
    assert api.get("secrets", "lc-hpcray-ray-token") is None


# ---------------------------------------------------------------------------------------------------------------
# Faults: the watch across drops, restarts and 410 Gone; two `up` at once
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.reliability(
    case="fault: the API server drops the readiness watch, restarts, and compacts (410 Gone)",
    sees="`lost the watch on pods (…); reconnecting`, `watch on pods resumed`, then ready; exit 0",
    remains="the cluster, ready")
def test_watch_resumes_after_drop_restart_and_410(helm4: str, api: FakeKubeAPI, tmp_path: Path) -> None:
    assert api.operator is not None
    api.operator.mode = "manual"  # pods stay Pending until make_ready
    profile = write_profile(tmp_path, api)
    proc = start_hpcray("up", "-p", str(profile), "--timeout", "60s")
    read_until(proc, "waiting for the head")
    time.sleep(0.3)
    assert api.drop_watches(abrupt=True) >= 1
    time.sleep(0.3)
    api.restart()
    api.compact()  # whatever resourceVersion the client resumes from is now too old: 410 Gone, list again
    time.sleep(0.3)
    api.operator.make_ready(cluster="lc-kuberay")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "3/3 pods Ready" in out
    assert "lost the watch on pods" in err and "watch on pods resumed" in err


@pytest.mark.reliability(
    case="fault: two `up` of one profile at once",
    sees="the second says `waiting for `hpcray up` of lc (pid N) to finish …`; both exit 0",
    remains="one release: revision 1 superseded, revision 2 deployed")
def test_two_concurrent_ups_of_one_profile_take_turns(helm4: str, api: FakeKubeAPI, tmp_path: Path) -> None:
    profile = write_profile(tmp_path, api)
    procs = [start_hpcray("up", "-p", str(profile)) for _ in range(2)]
    results = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert any("waiting for `hpcray up` of lc (pid " in err for _, err in results)
    statuses = {rev: r["info"]["status"] for rev, r in helm_releases(api, "lc").items()}
    assert statuses == {1: "superseded", 2: "deployed"}


# ---------------------------------------------------------------------------------------------------------------
# gc, --all, --dry-run
# ---------------------------------------------------------------------------------------------------------------


def test_gc_removes_only_expired_hpcray_releases(helm4: str, api: FakeKubeAPI, tmp_path: Path) -> None:
    quiet = lambda line: None  # noqa: E731
    for name, ttl in (("old", 0.5), ("young", 3600.0), ("forever", None)):
        p = load_profile(write_profile(tmp_path, api, name, workers=0, credentials="none"))
        KubeRayBackend(p).up(timeout=30, progress=quiet, ttl_s=ttl)
    chart = Path(os.environ["HPCRAY_CHARTS_DIR"]) / "ray-cluster-1.2.2.tgz"
    other = subprocess.run([helm4, "install", "other", str(chart), "--kubeconfig", str(tmp_path / "kubeconfig"), "--namespace", "default",
                            "--set-string", "annotations.hpcray\\.io/expires-at=2000-01-01T00:00:00Z"],
                           capture_output=True, text=True)
    assert other.returncode == 0, other.stderr  # expired by the annotation, but not made by hpcray
    time.sleep(0.6)
    profile = str(tmp_path / "old.yaml")

    listed = hpcray("status", "--all", "-p", profile, "--json")
    assert listed.returncode == 0, listed.stderr
    assert sorted(c["name"] for c in json.loads(listed.stdout)) == ["forever", "old", "young"]

    dry = hpcray("gc", "--dry-run", "-p", profile)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith("would uninstall old (namespace default, expired ") and "found 1" in dry.stdout
    assert helm_releases(api, "old")

    gc = hpcray("gc", "-p", profile)
    assert gc.returncode == 0, gc.stderr
    assert "uninstalled expired release old in namespace default" in gc.stderr and "removed 1" in gc.stdout
    assert helm_releases(api, "old") == {} and api.get("secrets", "old-hpcray-ray-token") is None
    assert all(helm_releases(api, n) for n in ("young", "forever", "other"))
    assert api.get("secrets", "young-hpcray-ray-token") is not None


def test_dry_run_prints_helm_command_and_values_and_touches_nothing(helm_bin: str, api: FakeKubeAPI,
                                                                    tmp_path: Path) -> None:
    profile = write_profile(tmp_path, api)
    before = len(api.requests)
    up = hpcray("up", "-p", str(profile), "--dry-run", "--ttl", "2h")
    assert up.returncode == 0, up.stderr
    assert f"{helm_bin} upgrade --install lc " in up.stdout and "--values -" in up.stdout
    assert "--labels hpcray=true,hpcray.io/profile=lc,hpcray.io/expires-at=" in up.stdout
    assert "Secret lc-hpcray-mlflow in namespace default: username=alice, password=******" in up.stdout
    assert "secretKeyRef" in up.stdout and "hpcray.io/expires-at" in up.stdout  # the values follow the command
    down = hpcray("down", "-p", str(profile), "--dry-run")
    assert down.returncode == 0, down.stderr
    assert f"{helm_bin} uninstall lc --namespace default" in down.stdout
    assert PASSWORD not in up.stdout + up.stderr + down.stdout + down.stderr
    assert len(api.requests) == before and api.list("secrets") == []


@pytest.mark.parametrize("uri", ["file:///tmp/hpcray-test-mlruns", "sqlite:////tmp/hpcray-test-mlflow.db"])
def test_a_local_tracking_store_takes_no_credentials_secret(helm4: str, api: FakeKubeAPI, tmp_path: Path,
                                                            uri: str) -> None:
    """The reproduced bug: with `mlflow.tracking_uri: file:///…`, `credentials: env` and both variables exported,
    `up` failed asking to export them (render and the backend disagreed on who needs credentials)."""
    profile = write_profile(tmp_path, api, workers=0, tracking_uri=uri)  # credentials: env, both exported
    dry = hpcray("up", "-p", str(profile), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "lc-hpcray-mlflow" not in dry.stdout  # no credentials Secret, and no pod reads one
    assert "MLFLOW_TRACKING_PASSWORD" not in dry.stdout
    done = hpcray("up", "-p", str(profile))
    assert done.returncode == 0, done.stderr
    assert "lc: kuberay namespace default release deployed rev 1; ready; 1/1 pods Ready" in done.stdout
    assert api.get("secrets", "lc-hpcray-mlflow") is None
    [head] = pods(api)
    env = {e["name"]: e for e in head["spec"]["containers"][0]["env"]}
    assert env["MLFLOW_TRACKING_URI"]["value"] == uri and "MLFLOW_TRACKING_PASSWORD" not in env


# ---------------------------------------------------------------------------------------------------------------
# One-line Kubernetes errors, and the dashboard port-forward's reconnects
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.reliability(
    case="bad input: namespace, context, token, server or kubeconfig wrong (the kube client)",
    sees="one line each: `namespace 'nowhere' does not exist`, `kube context 'elsewhere' is not in …`, `401 "
         "Unauthorized`, `cannot reach the Kubernetes API`, `kubeconfig … does not exist`",
    remains="nothing")
def test_kubernetes_errors_are_one_actionable_line(api: FakeKubeAPI, tmp_path: Path) -> None:
    p = load_profile(write_profile(tmp_path, api))

    def problem(**changes: Any) -> str:
        for key, value in changes.items():
            setattr(p.kubernetes, key, value)
        with pytest.raises(KubeError) as info:
            kube.connect(targets.kube_target(p))
        assert "\n" not in str(info.value)
        return str(info.value)

    assert "namespace 'nowhere' does not exist" in problem(namespace="nowhere")
    assert "kube context 'elsewhere' is not in" in problem(namespace="default", context="elsewhere")
    with FakeKubeAPI(token="right", operator=False, crds=[]) as guarded:
        wrong_token = guarded.write_kubeconfig(tmp_path / "wrong-token", token="wrong")
        assert "401 Unauthorized" in problem(context=None, kubeconfig=str(wrong_token))
    assert "cannot reach the Kubernetes API" in problem()  # that server has stopped
    assert "does not exist; set kubernetes.kubeconfig" in problem(kubeconfig=str(tmp_path / "none"))


def test_jobs_reach_the_head_through_a_port_forward_of_their_own_or_hpcray_dashboard(
        helm4: str, api: FakeKubeAPI, ray_head: Any, tmp_path: Path) -> None:
    """The Ray head "inside" the fake head pod is a real local one: submit/list/logs open the kubelet port-forward
    through the real kubernetes client's websocket themselves; `hpcray dashboard` keeps one that they then use."""
    profile = write_profile(tmp_path, api, workers=1, credentials="none", tracking_uri="")
    assert hpcray("up", "-p", str(profile)).returncode == 0
    host, port = ray_head.address.removeprefix("http://").split(":")
    api.serve_pod_port("ray.io/node-type=head", 8265, (host, int(port)))

    done = hpcray("submit", "-p", str(profile), "--json", "--", "echo through-the-port-forward")
    assert done.returncode == 0, done.stderr
    assert "through-the-port-forward" in done.stderr  # with --json the job's output goes to stderr
    submitted = json.loads(done.stdout)
    job_id = submitted["submission_id"]
    assert submitted["status"] == "SUCCEEDED" and submitted["address"].startswith("http://127.0.0.1:")
    assert submitted["address"] != ray_head.address  # a port-forward of the command's own, not the head itself
    assert any("/pods/lc-kuberay-head" in r and "/portforward" in r for r in api.requests)
    listed = hpcray("list", "-p", str(profile), "--json")
    assert listed.returncode == 0 and job_id in {j["submission_id"] for j in json.loads(listed.stdout)}

    dashboard = start_hpcray("dashboard", "-p", str(profile), "--port", "0")
    try:
        assert dashboard.stdout is not None
        url = re.search(r"dashboard: (http://127\.0\.0\.1:\d+)", dashboard.stdout.readline())
        assert url, dashboard.stderr
        before = sum("/portforward" in r for r in api.requests)
        with urllib.request.urlopen(f"{url[1]}/api/version", timeout=30) as response:
            assert "ray_version" in json.loads(response.read())
        assert sum("/portforward" in r for r in api.requests) > before
        logs = hpcray("logs", "-p", str(profile), job_id)  # through the dashboard's address (dashboard.json)
        assert logs.returncode == 0 and "through-the-port-forward" in logs.stdout
    finally:
        dashboard.send_signal(signal.SIGINT)
        dashboard.wait(timeout=30)
    assert not (tmp_path / "state" / "lc" / "dashboard.json").exists()


def test_run_on_kuberay_brings_up_runs_through_its_port_forward_and_tears_down(
        helm4: str, api: FakeKubeAPI, ray_head: Any, tmp_path: Path) -> None:
    profile = write_profile(tmp_path, api, workers=1, credentials="none", tracking_uri="")
    profile.write_text(profile.read_text() + "jobs:\n  hello: {entrypoint: 'echo hello-from-the-head-pod'}\n")
    host, port = ray_head.address.removeprefix("http://").split(":")
    api.serve_pod_port("ray.io/node-type=head", 8265, (host, int(port)))

    done = hpcray("run", "-p", str(profile), "hello", "--json", timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["jobs"][0]["status"] == "SUCCEEDED" and report["torn_down"] is True
    assert "hello-from-the-head-pod" in done.stderr
    assert pods(api) == [] and helm_releases(api, "lc") == {}


@pytest.mark.reliability(
    case="fault: a job command against a kuberay cluster with no Ready head pod",
    sees="`no Ready head pod (ray.io/cluster=…) in namespace default; is the cluster up?`, exit 2 at once",
    remains="nothing")
def test_jobs_against_a_cluster_without_a_ready_head_say_so_at_once(helm4: str, api: FakeKubeAPI,
                                                                    tmp_path: Path) -> None:
    profile = write_profile(tmp_path, api, credentials="none", tracking_uri="")
    started = time.monotonic()
    listed = hpcray("list", "-p", str(profile))
    assert listed.returncode == 2 and time.monotonic() - started < 20
    assert listed.stderr.strip().splitlines()[-1].startswith("hpcray: error: no Ready head pod"), listed.stderr


@pytest.mark.reliability(
    case="fault: the dashboard port-forward's upstream drops",
    sees="`port-forward lost (…); reconnecting`, then `port-forward reconnected`; the waiting request is served",
    remains="the port-forward, working")
def test_port_forward_relay_reconnects_when_the_upstream_drops(tmp_path: Path) -> None:
    """The relay against a local TCP echo target that the test stops and restarts at will (the fake API's
    portforward endpoint, used end to end above, forwards to one target that stays up): the upstream opener stands
    in for kube.open_pod_port."""
    echoes = [_EchoServer(0)]
    port = echoes[0].port
    notices: list[str] = []
    forgotten: list[bool] = []
    relay = Relay(lambda: socket.create_connection(("127.0.0.1", port), timeout=1), notice=notices.append,
                  on_failure=lambda: forgotten.append(True), retry_s=10)
    threading.Thread(target=relay.serve_forever, daemon=True).start()
    try:
        assert _roundtrip(relay.port, b"hello") == b"hello"
        echoes[0].close()  # the upstream goes away (API server restart, head pod recreated)
        threading.Timer(0.5, lambda: echoes.append(_EchoServer(port))).start()
        assert _roundtrip(relay.port, b"again") == b"again"  # the relay waited for the upstream to come back
        assert notices[0].startswith("port-forward lost (") and notices[-1] == "port-forward reconnected"
        assert forgotten  # the head pod is looked up again after a failure
    finally:
        relay.close()
        for e in echoes[1:]:
            e.close()


class _EchoServer:
    def __init__(self, port: int) -> None:
        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                while data := self.request.recv(4096):
                    self.request.sendall(data)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _roundtrip(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(data)
        return s.recv(len(data))


def _ready(pod: dict[str, Any]) -> bool:
    status = pod.get("status", {})
    return status.get("phase") == "Running" and any(
        c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", []))


def _pod_with(status: dict[str, Any], *, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "p", "labels": {"ray.io/node-type": "head"},
                            "creationTimestamp": "2026-01-01T00:00:00Z"}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:01:00Z"
    return {"metadata": meta, "spec": {"containers": [{"name": "ray-head", "resources": {
        "limits": {"nvidia.com/gpu": "2"}}}]}, "status": status}


@pytest.mark.parametrize(("status", "phase", "reason"), [
    ({"phase": "Pending", "initContainerStatuses": [{"name": "wait-gcs", "state": {"waiting": {
        "reason": "PodInitializing"}}}]}, "Pending", "init container wait-gcs waiting: PodInitializing"),
    ({"phase": "Running", "containerStatuses": [{"name": "ray-head", "state": {"waiting": {
        "reason": "CrashLoopBackOff", "message": "back-off 10s"}}, "lastState": {"terminated": {
            "exitCode": 137, "reason": "OOMKilled"}}}]},
     "Running", "container ray-head CrashLoopBackOff: back-off 10s (last exit code 137: OOMKilled)"),
    ({"phase": "Running", "conditions": [{"type": "Ready", "status": "False", "message":
        "containers with unready status: [ray-head]"}]},
     "Running", "not Ready: containers with unready status: [ray-head]"),
    ({"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}, "Ready", ""),
    ({}, "Pending", "not scheduled yet"),
])
def test_a_pod_in_words(status: dict[str, Any], phase: str, reason: str) -> None:
    s = kube.pod_state(_pod_with(status))
    assert (s.phase, s.reason, s.role, s.gpus) == (phase, reason, "head", 2)


def test_a_deleted_pod_is_terminating() -> None:
    s = kube.pod_state(_pod_with({"phase": "Running"}, deleting=True))
    assert (s.phase, s.reason) == ("Terminating", "being deleted")


def test_both_backends_implement_the_whole_backend_interface() -> None:
    """flows.py calls only what hpcray.backends.base.Backend declares: each backend has each of those methods, with
    the same parameters (a backend may not drop one its callers pass)."""
    import inspect

    from hpcray.backends.base import Backend
    from hpcray.backends.local import LocalBackend

    declared = {name: inspect.signature(f) for name, f in vars(Backend).items()
                if callable(f) and not name.startswith("_")}
    assert {"plan", "up", "access", "dashboard", "tracking_uri", "status", "plan_down", "down"} <= set(declared)
    for backend in (LocalBackend, KubeRayBackend):
        for name, signature in declared.items():
            assert list(inspect.signature(getattr(backend, name)).parameters) == list(signature.parameters), \
                f"{backend.__name__}.{name}"
