"""`hpcray doctor`: on good profiles every check is ok or skipped (exit 0); on broken ones the right check fails with
its fix and the exit code is the worst result's (1 a warning, 2 a failure). Read from `--json`, as a script would.

The local profile runs against the session's real Ray head and the real MLflow server with basic auth; the kuberay
profiles against tests/fake_kube_api.py (in this process) with the real helm and KubeRay chart, and interLink's
virtual node registered as its virtual kubelet registers it.
"""

from __future__ import annotations

import http.server
import json
import secrets
import socket
import threading
import time
import urllib.request
from importlib.metadata import version
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from tests.fake_kube_api import MINIMAL_RAYCLUSTER_CRD, FakeKubeAPI
from tests.fake_kube_scheduler import interlink_node
from tests.fixtures_servers import MlflowServer, RayHead
from tests.fixtures_tools import helm_path
from tests.hpcray_cli import run

RAY = version("ray")
NODE = "doctor-vk"
USER = "doctor-user"


def doctor(profile: Path, *args: str, env: dict[str, str] | None = None,
           timeout: float = 120) -> tuple[int, dict[str, dict[str, str]], str]:
    """(exit code, results by check, stderr) of `hpcray doctor --json`."""
    done = run("doctor", "-p", str(profile), "--json", *args, extra_env=env, timeout=timeout)
    results = json.loads(done.stdout)
    assert [set(r) for r in results] == [{"check", "status", "detail", "fix"}] * len(results)
    by_check = {r["check"]: r for r in results}
    assert len(by_check) == len(results), "a check reported twice"
    return done.returncode, by_check, done.stderr


def statuses(results: dict[str, dict[str, str]]) -> dict[str, str]:
    return {c: r["status"] for c, r in results.items()}


@pytest.fixture(scope="module")
def mlflow_user(mlflow_server: MlflowServer) -> dict[str, str]:
    """A user of the MLflow server, as the environment a researcher exports."""
    password = secrets.token_urlsafe(16)
    mlflow_server.create_user(USER, password)
    return {"MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": password}


def active_runs(server: MlflowServer, experiment: str) -> list[Any]:
    import base64

    token = base64.b64encode(f"{server.admin[0]}:{server.admin[1]}".encode()).decode()

    def call(path: str, body: dict[str, Any] | None = None) -> Any:
        req = urllib.request.Request(server.url + path, method="POST" if body else "GET",
                                     data=json.dumps(body).encode() if body else None,
                                     headers={"Authorization": f"Basic {token}",
                                              **({"Content-Type": "application/json"} if body else {})})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.load(resp)

    found = call(f"/api/2.0/mlflow/experiments/get-by-name?experiment_name={experiment}")
    runs = call("/api/2.0/mlflow/runs/search", {"experiment_ids": [found["experiment"]["experiment_id"]],
                                                "run_view_type": "ACTIVE_ONLY"})
    return list(runs.get("runs", []))


# ---------------------------------------------------------------------------------------------------------------
# The local backend: the session's Ray head, the MLflow server with basic auth
# ---------------------------------------------------------------------------------------------------------------


def local_profile(directory: Path, head: RayHead, mlflow: MlflowServer, experiment: str) -> Path:
    """A profile naming the session's head (same name and state dir, so doctor finds it up)."""
    path = directory / f"{head.backend.name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": head.backend.name, "backend": "local",
        "mlflow": {"tracking_uri": mlflow.url, "experiment": experiment, "credentials": "env"}}))
    return path


def test_a_good_local_profile_with_its_head_up_is_all_ok_and_leaves_no_run(
        ray_head: RayHead, mlflow_server: MlflowServer, mlflow_user: dict[str, str], tmp_path: Path) -> None:
    profile = local_profile(tmp_path, ray_head, mlflow_server, "doctor-local")
    env = {**mlflow_user, "HPCRAY_STATE_DIR": str(ray_head.backend.dir.parent)}
    code, results, stderr = doctor(profile, env=env)
    assert statuses(results) == {"profile": "ok", "ray": "ok", "mlflow-credentials": "ok", "ports": "skip",
                                 "mlflow": "ok", "jobs-api": "ok", "cluster-ray": "ok"}, results
    assert code == 0, stderr
    assert f"accepts user '{USER}'" in results["mlflow"]["detail"]
    assert ray_head.address in results["jobs-api"]["detail"] and f"Ray {RAY}" in results["jobs-api"]["detail"]
    assert mlflow_user["MLFLOW_TRACKING_PASSWORD"] not in json.dumps(results) + stderr
    assert active_runs(mlflow_server, "doctor-local") == []  # the write test's run was deleted

    human = run("doctor", "-p", str(profile), extra_env=env)
    assert human.returncode == 0
    lines = human.stdout.splitlines()
    assert len(lines) == len(results) and all(line.split()[0] in ("ok", "skip") for line in lines)


@pytest.mark.reliability(
    case="bad input: `hpcray doctor` with a wrong MLflow password",
    sees="`fail  mlflow  the MLflow server at … rejected user '…' (401: wrong username or password); fix: check "
         "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD …`, exit 2",
    remains="nothing: no run, no experiment")
def test_a_wrong_mlflow_password_fails_the_mlflow_check(ray_head: RayHead, mlflow_server: MlflowServer,
                                                         mlflow_user: dict[str, str], tmp_path: Path) -> None:
    profile = local_profile(tmp_path, ray_head, mlflow_server, "doctor-wrong-password")
    env = {**mlflow_user, "MLFLOW_TRACKING_PASSWORD": "not-" + mlflow_user["MLFLOW_TRACKING_PASSWORD"],
           "HPCRAY_STATE_DIR": str(ray_head.backend.dir.parent)}
    code, results, _ = doctor(profile, env=env)
    assert code == 2
    assert results["mlflow"]["status"] == "fail"
    assert f"rejected user '{USER}' (401: wrong username or password)" in results["mlflow"]["detail"]
    assert results["mlflow"]["fix"].startswith("check MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD")
    assert {c for c, r in results.items() if r["status"] == "fail"} == {"mlflow"}


@pytest.mark.reliability(
    case="bad input: `hpcray doctor` on a profile that does not load",
    sees="one result, `fail  profile  FILE:LINE: KEY: problem; fix: …` (no traceback), exit 2",
    remains="nothing")
def test_a_broken_profile_is_a_doctor_result_not_a_traceback(tmp_path: Path) -> None:
    profile = tmp_path / "broken.yaml"
    profile.write_text("name: broken\nbackend: local\nlocal: {num_cpu: 2}\n")
    code, results, stderr = doctor(profile)
    assert code == 2 and list(results) == ["profile"], results
    assert results["profile"]["status"] == "fail" and "local.num_cpu" in results["profile"]["detail"]
    assert results["profile"]["fix"] and "Traceback" not in stderr


# ---------------------------------------------------------------------------------------------------------------
# The kuberay backend: the fake Kubernetes API with an interLink virtual node, the real helm and chart
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kube_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeKubeAPI]:
    crd = tmp_path_factory.mktemp("crd") / "rayclusters.json"
    crd.write_text(json.dumps(MINIMAL_RAYCLUSTER_CRD))
    server = FakeKubeAPI(crds=[crd]).start()
    try:
        server.create({"apiVersion": "v1", "kind": "Node", **interlink_node(NODE, pod_cidr="10.10.0.0/24")})
        server.write_kubeconfig(tmp_path_factory.mktemp("kube") / "kubeconfig")
        yield server
    finally:
        server.stop()


@pytest.fixture
def kube_env(charts_env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
             mlflow_user: dict[str, str]) -> dict[str, str]:
    path = helm_path(4) or helm_path(3)
    if path is None:
        pytest.skip("no helm installed: run `make test` or set HPCRAY_HELM4")
    monkeypatch.setenv("HPCRAY_HELM", path)
    monkeypatch.setenv("HPCRAY_STATE_DIR", str(tmp_path / "state"))
    return mlflow_user


def kuberay_profile(directory: Path, api: FakeKubeAPI, mlflow: MlflowServer, *, name: str = "doc",
                    **changes: Any) -> Path:
    """The Vega shape at test size: a head and a worker on the virtual node, the SIF present, Ray as the client's."""
    assert api.kubeconfig is not None
    sif_dir = directory / "sif"
    sif_dir.mkdir(exist_ok=True)
    (sif_dir / "ray:sif").write_bytes(b"SIF")
    profile: dict[str, Any] = {
        "name": name, "backend": "kuberay",
        "kubernetes": {"kubeconfig": str(api.kubeconfig), "namespace": "default"},
        "chart": {"version": "1.2.2"},
        "image": {"dir": str(sif_dir), "name": "ray", "tag": "sif", "ray_version": RAY},
        "head": {"cpu": "1", "memory": "2G"},
        "workers": {"cpu": {"replicas": 1, "cpu": "1", "memory": "2G"}},
        "interlink": {"enabled": True, "node": NODE, "vpn_bootstrap": "ip addr add $POD_IP/32 dev lo"},
        "mlflow": {"tracking_uri": mlflow.url, "experiment": "doctor-kuberay", "credentials": "env"},
    }
    for key, value in changes.items():
        section, _, inner = key.partition("__")
        if inner:
            profile[section] = {**profile[section], inner: value}
        else:
            profile[section] = value
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(profile, sort_keys=False))
    return path


GOOD_KUBERAY = {"profile": "ok", "helm": "ok", "chart": "ok", "values": "ok", "kubeconfig": "ok",
                "api-server": "ok", "namespace": "ok", "kuberay": "ok", "rights": "ok", "virtual-node": "ok",
                "sif": "ok", "image-ray": "ok", "mlflow-credentials": "ok", "mlflow": "ok", "jobs-api": "skip"}


def test_a_good_kuberay_profile_is_all_ok_and_creates_nothing(kube_api: FakeKubeAPI, kube_env: dict[str, str],
                                                               mlflow_server: MlflowServer, tmp_path: Path) -> None:
    before = len(kube_api.requests)
    code, results, stderr = doctor(kuberay_profile(tmp_path, kube_api, mlflow_server), env=kube_env)
    assert statuses(results) == GOOD_KUBERAY, results
    assert code == 0, stderr
    assert f"{NODE} exists, is Ready" in results["virtual-node"]["detail"]
    assert "cluster doc is not up" in results["jobs-api"]["detail"]
    writes = [r for r in list(kube_api.requests)[before:] if r.split()[0] not in ("GET",)]
    assert writes == []  # nothing created, changed or deleted on the cluster
    assert "doctor: reaching the Kubernetes API at" in stderr  # progress on stderr, results on stdout


def test_with_a_kuberay_cluster_up_doctor_reaches_its_jobs_api_through_the_port_forward(
        kube_api: FakeKubeAPI, kube_env: dict[str, str], mlflow_server: MlflowServer, ray_head: RayHead,
        tmp_path: Path) -> None:
    """The head pod (on a regular node) runs the session's real Ray head: doctor opens the port-forward the job
    commands would (access auto) and reads the running cluster's Ray version."""
    profile = kuberay_profile(tmp_path, kube_api, mlflow_server, name="docup", interlink={"enabled": False})
    assert run("up", "-p", str(profile), extra_env=kube_env, timeout=120).returncode == 0
    host, port = ray_head.address.removeprefix("http://").split(":")
    kube_api.serve_pod_port("ray.io/cluster=docup-kuberay,ray.io/node-type=head", 8265, (host, int(port)))
    try:
        forwards = sum("/portforward" in r for r in kube_api.requests)
        code, results, stderr = doctor(profile, env=kube_env)
        assert code == 0, (results, stderr)
        assert "virtual-node" not in results  # not an interLink profile
        assert results["jobs-api"]["status"] == "ok" and "access auto" in results["jobs-api"]["detail"]
        assert results["cluster-ray"] == {"check": "cluster-ray", "status": "ok",
                                          "detail": f"the cluster runs Ray {RAY}, this client {RAY}", "fix": ""}
        assert sum("/portforward" in r for r in kube_api.requests) > forwards
    finally:
        assert run("down", "-p", str(profile), extra_env=kube_env, timeout=120).returncode == 0


@pytest.mark.reliability(
    case="bad input: `hpcray doctor` where the chart is nowhere: HPCRAY_CHARTS_DIR names a missing folder and the "
         "repository cannot be reached",
    sees="`fail  chart  ray-cluster-1.2.2.tgz is not on this machine (HPCRAY_CHARTS_DIR names …, which does not "
         "exist) and its repository cannot give it (…); fix: set HPCRAY_CHARTS_DIR to a folder with …`; the values "
         "check skipped; exit 2",
    remains="nothing (no chart downloaded)")
def test_a_missing_chart_dir_fails_the_chart_check(kube_api: FakeKubeAPI, kube_env: dict[str, str],
                                                    mlflow_server: MlflowServer, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "no-charts"
    monkeypatch.setenv("HPCRAY_CHARTS_DIR", str(missing))
    profile = kuberay_profile(tmp_path, kube_api, mlflow_server, chart__repo="http://127.0.0.1:9/charts/")
    code, results, _ = doctor(profile, env=kube_env)
    assert code == 2
    chart = results["chart"]
    assert chart["status"] == "fail" and f"HPCRAY_CHARTS_DIR names {missing}, which does not exist" in chart["detail"]
    assert "127.0.0.1:9" in chart["detail"]
    assert chart["fix"].startswith("set HPCRAY_CHARTS_DIR to a folder with ray-cluster-1.2.2.tgz")
    assert results["values"]["status"] == "skip"
    assert {c for c, r in results.items() if r["status"] == "fail"} == {"chart"}


class HangingApiServer(http.server.ThreadingHTTPServer):
    """An API server that answers /version and then never answers anything else (an overloaded or half-dead one)."""

    daemon_threads = True

    def __init__(self) -> None:
        self.release = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                if self.path == "/version":
                    body = json.dumps({"major": "1", "minor": "33", "gitVersion": "v1.33.0"}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                else:
                    outer.release.wait(60)

            def log_message(self, *args: Any) -> None:
                pass

        outer = self
        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()


@pytest.mark.reliability(
    case="fault: `hpcray doctor` while the Kubernetes API server is down, accepts connections and never answers, or "
         "answers /version and then hangs",
    sees="`fail  api-server  cannot reach the Kubernetes API at … (connection refused | timed out) …`, or `fail  "
         "namespace  reading namespace default did not finish within 2 s; fix: check that it is reachable from here "
         "…`; the checks that need it skipped; exit 2 within seconds (`--timeout 2s`)",
    remains="nothing")
def test_an_unreachable_api_server_fails_fast_and_skips_what_needs_it(kube_api: FakeKubeAPI, kube_env: dict[str, str],
                                                                      mlflow_server: MlflowServer,
                                                                      tmp_path: Path) -> None:
    silent = socket.create_server(("127.0.0.1", 0))  # the kernel accepts; nothing ever answers
    refused = socket.create_server(("127.0.0.1", 0))
    refused_port = refused.getsockname()[1]
    refused.close()
    hanging = HangingApiServer()

    def doctor_at(port: int) -> dict[str, dict[str, str]]:
        config = yaml.safe_load(Path(str(kube_api.kubeconfig)).read_text())
        config["clusters"][0]["cluster"]["server"] = f"http://127.0.0.1:{port}"
        kubeconfig = tmp_path / f"kubeconfig-{port}"
        kubeconfig.write_text(yaml.safe_dump(config))
        profile = kuberay_profile(tmp_path, kube_api, mlflow_server,
                                  kubernetes={"kubeconfig": str(kubeconfig), "namespace": "default"})
        started = time.monotonic()
        code, results, _ = doctor(profile, "--timeout", "2s", env=kube_env)
        assert time.monotonic() - started < 60
        assert code == 2
        assert results["jobs-api"]["status"] == "skip", results["jobs-api"]
        return results

    try:
        for port, says in ((refused_port, "connection refused"), (silent.getsockname()[1], "timed out")):
            results = doctor_at(port)
            api = results["api-server"]
            assert api["status"] == "fail" and says in api["detail"] and f"127.0.0.1:{port}" in api["detail"], api
            assert api["fix"].startswith("check kubernetes.context / kubeconfig and that the API server is up")
            for needs in ("namespace", "kuberay", "rights", "virtual-node"):
                assert results[needs]["status"] == "skip", results[needs]

        results = doctor_at(hanging.server_address[1])
        assert results["api-server"]["status"] == "ok"
        namespace = results["namespace"]  # kube's own limit for this read is 10 s: doctor's 2 s ended it
        assert namespace == {"check": "namespace", "status": "fail",
                             "detail": "reading namespace default did not finish within 2 s",
                             "fix": "check that it is reachable from here (a firewall that drops packets, a VPN that "
                                    "is down), or give it longer with --timeout"}
        assert results["rights"]["status"] == "skip"
    finally:
        silent.close()
        hanging.close()


@pytest.mark.reliability(
    case="bad input: `hpcray doctor` on a profile whose kubernetes.namespace does not exist",
    sees="`fail  namespace  namespace 'nowhere' does not exist at …; fix: create it (`kubectl create namespace "
         "nowhere`) or fix kubernetes.namespace`, exit 2",
    remains="nothing: the namespace is not created")
def test_a_missing_namespace_fails_the_namespace_check(kube_api: FakeKubeAPI, kube_env: dict[str, str],
                                                        mlflow_server: MlflowServer, tmp_path: Path) -> None:
    profile = kuberay_profile(tmp_path, kube_api, mlflow_server,
                              kubernetes={"kubeconfig": str(kube_api.kubeconfig), "namespace": "nowhere"})
    code, results, _ = doctor(profile, env=kube_env)
    assert code == 2
    assert results["namespace"]["status"] == "fail"
    assert "namespace 'nowhere' does not exist" in results["namespace"]["detail"]
    assert results["namespace"]["fix"].startswith("create it (`kubectl create namespace nowhere`)")
    assert results["rights"]["status"] == "skip"
    assert kube_api.get("namespaces", "nowhere", None) is None


@pytest.mark.reliability(
    case="bad input: `hpcray doctor` against a Kubernetes cluster without KubeRay's CRDs",
    sees="`fail  kuberay  the API server at … does not serve ray.io/v1 RayClusters: KubeRay's CRDs are not "
         "installed, so helm cannot create the cluster; fix: ask the cluster admin to install the KubeRay operator …`, "
         "exit 2",
    remains="nothing")
def test_a_cluster_without_kuberay_fails_the_kuberay_check(kube_env: dict[str, str], mlflow_server: MlflowServer,
                                                           tmp_path: Path) -> None:
    with FakeKubeAPI(crds=[], operator=False) as bare:
        bare.create({"apiVersion": "v1", "kind": "Node", **interlink_node(NODE, pod_cidr="10.10.0.0/24")})
        bare.write_kubeconfig(tmp_path / "kubeconfig")
        code, results, _ = doctor(kuberay_profile(tmp_path, bare, mlflow_server), env=kube_env)
    assert code == 2
    assert results["kuberay"]["status"] == "fail" and "does not serve ray.io/v1 RayClusters" in \
        results["kuberay"]["detail"]
    assert results["kuberay"]["fix"].startswith("ask the cluster admin to install the KubeRay operator")
    assert {c for c, r in results.items() if r["status"] == "fail"} == {"kuberay"}


@pytest.mark.reliability(
    case="bad input: `hpcray doctor` on an interLink profile whose virtual node does not exist",
    sees="`fail  virtual-node  preflight of … failed, nothing was installed: interLink virtual node … does not "
         "exist (`kubectl get nodes` lists the nodes); fix: fix interlink.node, or ask the site …`, exit 2",
    remains="nothing")
def test_a_missing_virtual_node_fails_the_preflight_check(kube_api: FakeKubeAPI, kube_env: dict[str, str],
                                                           mlflow_server: MlflowServer, tmp_path: Path) -> None:
    profile = kuberay_profile(tmp_path, kube_api, mlflow_server,
                              interlink__node="vega-virtual-node")
    code, results, _ = doctor(profile, env=kube_env)
    assert code == 2
    node = results["virtual-node"]
    assert node["status"] == "fail" and "virtual node vega-virtual-node does not exist" in node["detail"]
    assert node["fix"].startswith("fix interlink.node")
    assert {c for c, r in results.items() if r["status"] == "fail"} == {"virtual-node"}


@pytest.mark.reliability(
    case="bad input: `hpcray doctor` on a profile whose image.ray_version differs from the client's Ray (another "
         "major version; another minor version)",
    sees="major: `fail  image-ray  the cluster runs Ray 1.13.0 but this client has Ray …; fix: install ray==1.13.0 "
         "here or use an image with Ray …`, exit 2; minor: `warn  image-ray …`, exit 1",
    remains="nothing")
def test_an_image_ray_version_far_from_the_clients_fails_and_a_near_one_warns(
        kube_api: FakeKubeAPI, kube_env: dict[str, str], mlflow_server: MlflowServer, tmp_path: Path) -> None:
    far = kuberay_profile(tmp_path, kube_api, mlflow_server, name="far", image__ray_version="1.13.0")
    code, results, _ = doctor(far, env=kube_env)
    assert code == 2
    image = results["image-ray"]
    assert image["status"] == "fail" and f"runs Ray 1.13.0 but this client has Ray {RAY}" in image["detail"]
    assert image["fix"] == f"install ray==1.13.0 here or use an image with Ray {RAY}"

    major, minor = (int(x) for x in RAY.split(".")[:2])
    near = kuberay_profile(tmp_path, kube_api, mlflow_server, name="near",
                           image__ray_version=f"{major}.{minor + 1}.0")
    code, results, _ = doctor(near, env=kube_env)
    assert results["image-ray"]["status"] == "warn", results["image-ray"]
    assert {r["status"] for c, r in results.items() if c != "image-ray"} <= {"ok", "skip"}
    assert code == 1


def test_doctor_help_documents_its_exit_codes() -> None:
    done = run("doctor", "--help")
    assert done.returncode == 0
    assert "0 all ok or skipped, 1 a warning, 2 a failure" in " ".join(done.stdout.split())
