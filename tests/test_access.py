"""hpcray against interLink as it really is, in the site in a box (tests/fake_site_box.py: real SLURM, real Ray
started by SLURM jobs, a virtual kubelet that answers port-forward with 501): the ways to the Jobs API (`access`),
the preflight against the virtual node before helm runs, and the diagnosis in interLink's words.

One cluster (`acc`, a head and a worker) serves the job commands through every access, and `run` ends it; a
head-only cluster with a one-minute walltime is started first, so that SLURM kills it while the other tests run.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from tests.fake_interlink_net import in_netns
from tests.fake_site_box import SiteBox
from tests.fixtures_box import site_box  # noqa: F401  (the fixture)
from tests.hpcray_cli import run as hpcray

CHARTS = Path(os.environ.get("HPCRAY_CHARTS_DIR", "/work/shared/charts"))


def box_profile(box: SiteBox, directory: Path, name: str, **changes: Any) -> Path:
    """A profile of the box's shape (the Vega profile's, at box size): a head and `workers` 1-CPU Ray pods on the
    virtual node over pod-vpn with the box's VPN bootstrap; `changes` replace top-level keys (`interlink` merged)."""
    assert box.info
    profile: dict[str, Any] = {
        "name": name, "backend": "kuberay",
        "kubernetes": {"kubeconfig": box.info.kubeconfig, "namespace": box.info.namespace},
        "chart": {"version": "1.2.2", **({"path": str(CHARTS / "ray-cluster-1.2.2.tgz")}
                                          if (CHARTS / "ray-cluster-1.2.2.tgz").is_file() else {})},
        "image": {"dir": box.info.sif_dir, "name": box.info.sif_name, "tag": box.info.sif_tag,
                  "ray_version": version("ray")},
        "head": {"cpu": "1", "memory": "2G"},
        "workers": {"cpu": {"replicas": 1, "cpu": "1", "memory": "2G"}},
        "interlink": {"enabled": True, "node": box.info.node, "slurm": {"time": "10"},
                      "vpn_bootstrap": box.info.vpn_bootstrap},
        "mlflow": {"credentials": "none"},
        "jobs": {"hello": {"entrypoint": "echo hello-from-slurm"}},
        "timeout": "4m",
    }
    interlink = changes.pop("interlink", {})
    profile.update(changes)
    profile["interlink"] = {k: v for k, v in {**profile["interlink"], **interlink}.items() if v is not None}
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(profile, sort_keys=False))
    return path


def last_line(done: subprocess.CompletedProcess[str]) -> str:
    return done.stderr.strip().splitlines()[-1]


class IngressStandIn:
    """What an Ingress of the dashboard gives: an address on this machine (127.0.0.1:port) that reaches the head
    pod's 8265 over the box's VPN, without the Kubernetes API server."""

    def __init__(self, box: SiteBox, pod_ip: str) -> None:
        assert box.network
        self.router, self.target = box.network.router, (pod_ip, 8265)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = in_netns(self.router, socket.socket)
            upstream.connect(self.target)
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        with a, b:
            while True:
                readable, _, _ = select.select([a, b], [], [], 60)
                if not readable:
                    return
                for s in readable:
                    data = s.recv(65536)
                    if not data:
                        return
                    (b if s is a else a).sendall(data)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """hpcray's state dir for this module's commands."""
    path = tmp_path_factory.mktemp("access-state")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HPCRAY_STATE_DIR", str(path))
        yield path


@pytest.fixture(scope="module")
def walltime_run(site_box: SiteBox, state: Path,  # noqa: F811
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """`hpcray run --keep` of a head-only cluster with a one-minute walltime and a job that outlives it, started
    first; checked by the last test. Its cluster is removed afterwards."""
    # a worker group of none: without any group, the chart renders workerGroupSpecs: null, which the CRD refuses
    profile = box_profile(site_box, tmp_path_factory.mktemp("wall"), "wall",
                          workers={"cpu": {"replicas": 0, "cpu": "1", "memory": "2G"}},
                          interlink={"slurm": {"time": "1"}}, jobs={"sleeper": {"entrypoint": "sleep 600"}})
    proc = subprocess.Popen([sys.executable, "-m", "hpcray.cli", "run", "--keep", "-p", str(profile), "sleeper"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc, profile
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        hpcray("down", "-p", str(profile))


@pytest.fixture(scope="module")
def cluster(site_box: SiteBox, state: Path, walltime_run: Any,  # noqa: F811
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The `acc` cluster (access: auto), up: its head and worker are Ray processes started by SLURM jobs."""
    profile = box_profile(site_box, tmp_path_factory.mktemp("acc"), "acc")
    started = time.monotonic()
    done = hpcray("up", "-p", str(profile))
    assert done.returncode == 0, done.stderr
    assert "2 Ray node(s) alive" in done.stderr  # up waited for the Ray side, not only for Ready pods
    print(f"acc up in {time.monotonic() - started:.0f} s")
    try:
        yield profile
    finally:
        hpcray("down", "-p", str(profile))


# ---------------------------------------------------------------------------------------------------------------
# Preflight: refused before helm runs, nothing installed
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.reliability(
    case="bad input: an interLink profile asks the virtual node for GPUs it does not advertise, more CPU than it "
         "has, or names a node that does not exist",
    sees="`preflight of … against interLink virtual node … failed, nothing was installed: …` naming the "
         "resource, what is free and the fix (gpu_mode gres, fewer CPUs, interlink.node), exit 2 before helm runs",
    remains="nothing: no release, Secret or pod")
def test_the_preflight_refuses_what_the_virtual_node_cannot_run(site_box: SiteBox, walltime_run: Any,  # noqa: F811
                                                                tmp_path: Path) -> None:
    box = site_box
    assert box.api
    gpus = box_profile(box, tmp_path, "gpus", head={"cpu": "1", "memory": "2G", "gpus": 1},
                       interlink={"gpu_mode": "resource"})
    done = hpcray("up", "-p", str(gpus))
    assert done.returncode == 2, done.stderr
    assert "virtual node vega-box-vk has 0 free" in last_line(done) and "nvidia.com/gpu" in last_line(done)
    assert "set interlink.gpu_mode: gres" in last_line(done)

    cpus = box_profile(box, tmp_path, "cpus", head={"cpu": "64", "memory": "2G"},
                       workers={"gpu": {"replicas": 2, "cpu": "64", "memory": "2G"}})
    done = hpcray("up", "-p", str(cpus))
    assert done.returncode == 2 and "asks for 192 cpu in all, but virtual node vega-box-vk has" in last_line(done)
    assert "100 allocatable" in last_line(done) and "lower head/workers cpu" in last_line(done)

    elsewhere = box_profile(box, tmp_path, "nonode", interlink={"node": "vega-virtual-node"})
    done = hpcray("up", "-p", str(elsewhere))
    assert done.returncode == 2 and "virtual node vega-virtual-node does not exist" in last_line(done)

    for name in ("gpus", "cpus", "nonode"):
        assert not box.api.list("pods", labels=f"ray.io/cluster={name}-kuberay")
        assert not box.api.list("secrets", labels=f"owner=helm,name={name}")

    plan = hpcray("up", "-p", str(cpus), "--dry-run")
    assert plan.returncode == 0 and "# would check that interLink virtual node vega-box-vk exists" in plan.stdout
    assert "check that" not in hpcray("up", "-p", str(cpus), "--dry-run", "--skip-preflight").stdout


# ---------------------------------------------------------------------------------------------------------------
# The ways to the Jobs API
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.reliability(
    case="fault: a port-forward to a Ray head on an interLink virtual node (its kubelet answers 501)",
    sees="at once (not after retries): `the head pod … runs on vega-box-vk, an interLink virtual node, whose "
         "virtual kubelet answers port-forward with 501 Not Implemented; reach the Jobs API with --access "
         "service-proxy … or --access https://<the dashboard's Ingress>`, exit 2",
    remains="nothing: no job was submitted")
def test_a_port_forward_to_a_virtual_node_fails_at_once_naming_it(cluster: Path, tmp_path: Path) -> None:
    text = cluster.read_text().replace("name: acc", "name: acc\naccess: port-forward")
    by_profile = tmp_path / "acc.yaml"
    by_profile.write_text(text)
    for args in (["submit", "-p", str(by_profile), "hello"], ["list", "-p", str(cluster), "--access", "port-forward"]):
        started = time.monotonic()
        done = hpcray(*args)
        assert done.returncode == 2 and time.monotonic() - started < 10, done.stderr
        line = last_line(done)
        assert "runs on vega-box-vk, an interLink virtual node" in line and "--access service-proxy" in line
    listed = hpcray("list", "-p", str(cluster), "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout) == [], listed.stderr
    shown = hpcray("dashboard", "-p", str(cluster))  # a browser lacks the kubeconfig's token: kubectl proxy adds it
    assert shown.returncode == 0 and "kubectl proxy --port" in shown.stderr, shown.stderr
    assert shown.stdout.strip() == ("dashboard: http://127.0.0.1:8265/api/v1/namespaces/default/services/"
                                    "http:acc-kuberay-head-svc:8265/proxy/")


@pytest.mark.reliability(
    case="bad input: an access the backend cannot use (`--access service-proxy` on the local backend, "
         "`access: relay` in a local profile, `--access nowhere`)",
    sees="one line naming the value and what works (auto or a URL for the local backend; the list of ways), exit 2",
    remains="nothing")
def test_ways_the_local_backend_has_no_use_for_are_refused(tmp_path: Path) -> None:
    local = tmp_path / "here.yaml"
    local.write_text("name: here\nbackend: local\n")
    done = hpcray("list", "-p", str(local), "--access", "service-proxy")
    assert done.returncode == 2 and "the local backend's head is on this machine: use auto" in last_line(done)
    local.write_text("name: here\nbackend: local\naccess: relay\n")
    done = hpcray("list", "-p", str(local))
    assert done.returncode == 2 and "access: 'relay' is for a cluster on Kubernetes" in last_line(done), done.stderr
    done = hpcray("list", "-p", str(local), "--access", "nowhere")
    assert done.returncode == 2 and "'nowhere' is not one of auto, port-forward, service-proxy, relay or an " \
        "http(s):// URL" in last_line(done), done.stderr


def test_jobs_through_auto_the_service_proxy_a_relay_and_an_address(site_box: SiteBox, cluster: Path,  # noqa: F811
                                                            tmp_path: Path) -> None:
    """submit (a working_dir uploaded, its log followed over the websocket), list, logs and stop, through `auto`
    (the service proxy, since the head is on the virtual node), `service-proxy`, `relay` and a URL.

    The relay pod runs on the box's regular node, whose fake kubelet runs no container: the port-forward to it is
    served by the Ingress stand-in, as its socat would serve it (from its port 8265 to the head's Service)."""
    assert site_box.api
    work = tmp_path / "wd"
    work.mkdir()
    (work / "main.py").write_text("import sys; print(open('data.txt').read().strip(), sys.argv[1])\n")
    (work / "data.txt").write_text("uploaded-through-the-api-server\n")
    [head] = site_box.api.list("pods", labels="ray.io/cluster=acc-kuberay,ray.io/node-type=head")
    ingress = IngressStandIn(site_box, head["status"]["podIP"])
    site_box.api.serve_pod_port("hpcray.io/relay=acc-kuberay", 8265, ("127.0.0.1", int(ingress.url.split(":")[-1])))
    try:
        for access in ("auto", "service-proxy", "relay", ingress.url):
            done = hpcray("submit", "-p", str(cluster), "--access", access, "--working-dir", str(work), "--json",
                          "--", f"python main.py {access}")
            assert done.returncode == 0, done.stderr
            assert f"uploaded-through-the-api-server {access}" in done.stderr  # followed: the job's output
            job = json.loads(done.stdout)
            assert job["status"] == "SUCCEEDED"
            if access == ingress.url:
                assert job["address"] == ingress.url
            elif access == "relay":
                assert job["address"].startswith("http://127.0.0.1:")
                [relay] = site_box.api.list("pods", labels="hpcray.io/relay=acc-kuberay")
                assert relay["spec"]["nodeName"] != site_box.node and not relay["spec"].get("tolerations")
                assert relay["metadata"]["ownerReferences"][0]["kind"] == "RayCluster"
                assert "TCP:acc-kuberay-head-svc.default.svc:8265" in relay["spec"]["containers"][0]["args"]
            else:
                assert "/services/http:acc-kuberay-head-svc:8265/proxy" in job["address"]

            sleeper = hpcray("submit", "-p", str(cluster), "--access", access, "--no-wait", "--",
                             "echo started; sleep 300")
            assert sleeper.returncode == 0, sleeper.stderr
            job_id = sleeper.stdout.strip()
            listed = hpcray("list", "-p", str(cluster), "--access", access, "--json")
            assert listed.returncode == 0 and job_id in {j["submission_id"] for j in json.loads(listed.stdout)}
            stopped = hpcray("stop", "-p", str(cluster), "--access", access, job_id)
            assert stopped.returncode == 0 and stopped.stdout.strip() == f"job {job_id} STOPPED", stopped.stderr
            logs = hpcray("logs", "-p", str(cluster), "--access", access, job["submission_id"])
            assert logs.returncode == 0 and f"uploaded-through-the-api-server {access}" in logs.stdout
    finally:
        ingress.close()


# ---------------------------------------------------------------------------------------------------------------
# Diagnosis in interLink's words
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.reliability(
    case="fault: pod-vpn without the site's VPN bootstrap (the pods' address is on no interface)",
    sees="`up` fails within about a minute of the pods being Ready (not at the walltime): `workers cannot reach "
         "the head: the Ray head's log says \"… Failed to connect to GCS …\"; with interlink.pod_vpn … set "
         "interlink.vpn_bootstrap …`, exit 4",
    remains="nothing with --down-on-failure (the release and its SLURM jobs are removed)")
def test_pod_vpn_without_a_bootstrap_is_diagnosed_not_waited_out(site_box: SiteBox, state: Path,  # noqa: F811
                                                                  tmp_path: Path) -> None:
    assert site_box.api
    profile = box_profile(site_box, tmp_path, "novpn", interlink={"vpn_bootstrap": None})
    started = time.monotonic()
    done = hpcray("up", "-p", str(profile), "--down-on-failure")
    took = time.monotonic() - started
    assert done.returncode == 4, done.stderr
    line = last_line(done)
    assert "workers cannot reach the head" in line and "Failed to connect to GCS" in line, line
    assert "interlink.vpn_bootstrap" in line and took < 120, (took, line)
    deadline = time.monotonic() + 60
    while site_box.api.list("pods", labels="ray.io/cluster=novpn-kuberay") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not site_box.api.list("pods", labels="ray.io/cluster=novpn-kuberay")


@pytest.mark.reliability(
    case="fault: sbatch refuses the pods' SLURM jobs (an unknown partition)",
    sees="`up` stops waiting at once: `… cannot start: … interLink could not start its SLURM job (ProviderFailed: "
         "… sbatch: error: invalid partition specified: nosuch …); fix what sbatch or the plugin says …`, exit 4",
    remains="nothing with --down-on-failure")
def test_an_sbatch_refusal_ends_up_at_once_in_interlinks_words(site_box: SiteBox, state: Path,  # noqa: F811
                                                               tmp_path: Path) -> None:
    assert site_box.api
    profile = box_profile(site_box, tmp_path, "nopart", interlink={"slurm": {"time": "10", "partition": "nosuch"}})
    started = time.monotonic()
    done = hpcray("up", "-p", str(profile), "--down-on-failure")
    assert done.returncode == 4 and time.monotonic() - started < 60, done.stderr
    line = last_line(done)
    assert "nopart cannot start" in line and "interLink could not start its SLURM job (ProviderFailed: " in line
    assert "sbatch: error: invalid partition specified: nosuch" in line, line
    assert not site_box.api.list("secrets", labels="owner=helm,name=nopart")


@pytest.mark.parametrize("status, said", [
    ({"phase": "Failed", "reason": "ProviderFailed", "message": "sbatch: error: Invalid account"},
     "interLink could not start its SLURM job (ProviderFailed: sbatch: error: Invalid account)"),
    ({"phase": "Pending", "reason": "ProviderFailed", "message": "node podCIDR not found"},
     "(ProviderFailed: node podCIDR not found)"),
    ({"phase": "Failed", "containerStatuses": [{"name": "ray-head", "state": {"terminated": {
        "reason": "SlurmJobTimeout", "exitCode": 0}}}]}, "reached the walltime and was killed (SlurmJobTimeout"),
    ({"phase": "Failed", "containerStatuses": [{"name": "ray-worker", "state": {"terminated": {
        "reason": "OOMKilled", "exitCode": 137}}}]}, "ran out of memory (OOMKilled, container ray-worker); raise"),
    ({"phase": "Failed", "containerStatuses": [{"name": "ray-head", "state": {"terminated": {
        "reason": "Error: 1", "exitCode": 1}}}]}, "its SLURM job ended (container ray-head exited with code 1"),
    ({"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}, None),
])
def test_a_pod_on_the_virtual_node_in_interlinks_words(status: dict[str, Any], said: str | None) -> None:
    from hpcray.interlink import pod_problem

    problem = pod_problem({"metadata": {"name": "p", "labels": {}}, "spec": {}, "status": status})
    assert problem == said if said is None else said in (problem or "")


def test_run_works_with_auto_and_tears_the_cluster_down(site_box: SiteBox, cluster: Path) -> None:  # noqa: F811
    assert site_box.api
    done = hpcray("run", "-p", str(cluster), "hello", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["jobs"][0]["status"] == "SUCCEEDED" and report["torn_down"] is True
    assert "hello-from-slurm" in done.stderr
    assert not site_box.api.list("pods", labels="ray.io/cluster=acc-kuberay")
    assert not site_box.api.list("pods", labels="hpcray.io/relay=acc-kuberay")  # gone with the release


@pytest.mark.reliability(
    case="fault: SLURM kills the Ray head at its walltime while `run` follows a job",
    sees="`run` ends within seconds of the kill: `cluster 'wall' went away while job sleeper … was running: … its "
         "SLURM job reached the walltime and was killed (SlurmJobTimeout …); raise interlink.slurm.time …`; "
         "`status` shows the same on the head pod KubeRay deleted (`… Deleted  Failed: its SLURM job reached the "
         "walltime … (SlurmJobTimeout …); KubeRay deleted it and made a new pod`) beside the new head",
    remains="the cluster with --keep, whose new head pod KubeRay made queues for a new SLURM job, until `hpcray down`")
def test_a_walltime_kill_shows_slurm_job_timeout(site_box: SiteBox,  # noqa: F811
                                                 walltime_run: tuple[subprocess.Popen[str], Path]) -> None:
    proc, profile = walltime_run
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 2, err
    line = err.strip().splitlines()[-1]
    assert "went away while job sleeper" in line and "SlurmJobTimeout" in line, err
    status = hpcray("status", "-p", str(profile))
    assert status.returncode == 0, status.stderr
    gone = [line for line in status.stdout.splitlines() if " Deleted " in line]  # the Failed pod is gone: KubeRay's
    assert len(gone) == 1 and "SlurmJobTimeout" in gone[0], status.stdout  # Event on the RayCluster says why
    assert "KubeRay deleted it and made a new pod" in gone[0], status.stdout
    print(f"{line}\n{status.stdout}")
    head = gone[0].split()[0]
    assert any(" head " in line and head not in line for line in status.stdout.splitlines()), status.stdout
