"""The site in a box behaves as interLink's virtual kubelet and SLURM plugin do, over the real SLURM: pods become
batch jobs built as the plugin builds them, run by SLURM through a singularity that starts real processes (real
Ray), in a network that only the site's VPN bootstrap connects; port-forward, exec and attach are refused with 501;
the API server's service proxy reaches a ready head. Facts: ../shared/docs/interlink-facts.md.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.stream import portforward

from tests.fake_interlink import FakeVirtualKubelet
from tests.fake_site_box import SiteBox
from tests.fixtures_box import site_box  # noqa: F401  (the fixture)
from tests.fixtures_tools import helm_path

Obj = dict[str, Any]
TOLERATION = {"key": "virtual-node.interlink/no-schedule", "operator": "Exists"}
KUBECTL = shutil.which("kubectl") or "/work/main/.tools/helm4/kubectl"


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)
    return result


def pod(box: SiteBox, name: str, command: str, *, annotations: dict[str, str] | None = None,
        labels: dict[str, str] | None = None, node: str = "", **spec: Any) -> Obj:
    """A pod for the virtual node, running `command` in the box's image."""
    assert box.info
    container = {"name": "main", "image": box.info.sif, "command": ["/bin/bash", "-lc", "--"], "args": [command],
                 **spec.pop("container", {})}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "annotations": annotations or {}, "labels": labels or {}},
            "spec": {"nodeSelector": {"kubernetes.io/hostname": node or box.node}, "tolerations": [TOLERATION],
                     "containers": [container], **spec}}


def phase(box: SiteBox, name: str, namespace: str = "default") -> str:
    assert box.api
    live = box.api.get("pods", name, namespace)
    return live["status"].get("phase", "") if live else ""


def kubectl(box: SiteBox, *args: str, ok: bool | None = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The real kubectl against the box; `ok`: whether it must succeed (None: either)."""
    assert box.info
    done = subprocess.run([KUBECTL, "--kubeconfig", box.info.kubeconfig, *args], capture_output=True, text=True,
                          env={**os.environ, "HOME": str(box.root)}, timeout=timeout)
    assert ok is None or (done.returncode == 0) == ok, f"kubectl {' '.join(args)} → {done.returncode}: {done.stderr}"
    return done


def squeue_state(box: SiteBox, jid: str) -> str:
    assert box.slurm
    return box.slurm.run("squeue", "-h", "-t", "all", "-j", jid, "-o", "%T").stdout.strip()


def delete(box: SiteBox, *names: str) -> None:
    assert box.api
    for name in names:
        if box.api.get("pods", name):
            box.api.delete("pods", name)
    wait_for("pods gone", lambda: not any(box.api.get("pods", n) for n in names))  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def walltime_pod(site_box: SiteBox) -> str:
    """A pod whose job SLURM kills at its walltime (`--time=1`: 60-90 s after start). Started by the first test
    that asks, checked by the last test of the module, so that the wait overlaps the other tests."""
    assert site_box.api
    site_box.api.create(pod(site_box, "walltime", "echo started; sleep 600",
                            annotations={"slurm-job.vk.io/flags": "--time=1"}))
    return "walltime"


# ---------------------------------------------------------------------------------------------------------------
# What the plugin makes of a pod
# ---------------------------------------------------------------------------------------------------------------

def test_a_pod_becomes_the_slurm_job_the_plugin_builds(site_box: SiteBox, walltime_pod: str) -> None:
    box, api = site_box, site_box.api
    assert api and box.info and box.slurm
    password = secrets.token_hex(8)
    api.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "mlflow"},
                "stringData": {"password": f"it's {password}"}})
    api.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "site"},
                "data": {"TRACKING": "http://mlflow", "EXPERIMENT": "box"}})
    env = [{"name": "MLFLOW_TRACKING_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "mlflow", "key": "password"}}},
           {"name": "URI", "valueFrom": {"configMapKeyRef": {"name": "site", "key": "TRACKING"}}},
           {"name": "ME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
           {"name": "GREETING", "value": "hi $(ME)"}]
    pre_exec = f"echo site pre-exec\n{box.info.vpn_bootstrap}"
    api.create(pod(box, "job", 'echo "pw=${MLFLOW_TRACKING_PASSWORD:5} $GREETING $EXPERIMENT $POD_IP"',
                   annotations={"slurm-job.vk.io/flags": "-p debug --time=5 --cpus-per-task=9 -p gpu -J x",
                                "slurm-job.vk.io/singularity-options": "--env POD_IP=$POD_IP",
                                "slurm-job.vk.io/pre-exec": pre_exec, "interlink.eu/pod-vpn": ""},
                   container={"env": env, "envFrom": [{"configMapRef": {"name": "site"}}],
                              "resources": {"limits": {"cpu": "1500m", "memory": "128G"}}},
                   initContainers=[{"name": "setup", "image": box.info.sif, "command": ["true"],
                                    "env": [{"name": "ME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                                    "resources": {"limits": {"cpu": "3", "memory": "1Gi"}}}]))
    live = wait_for("the job's end", lambda: phase(box, "job") in ("Succeeded", "Failed") and api.get("pods", "job"))
    assert live["status"]["phase"] == "Succeeded", live["status"]
    ip = live["metadata"]["annotations"]["interlink.eu/pod-ip"]
    assert ip == live["status"]["podIP"] and ip.startswith("127.0.100.")

    d = box.job_dir(live)
    assert d == Path(f"{box.info.data_root}default-{live['metadata']['uid']}")
    slurm = (d / "job.slurm").read_text().splitlines()
    assert slurm[:7] == ["#!/bin/bash", f"#SBATCH --job-name={live['metadata']['uid']}", f"#SBATCH --output={d}/job.out",
                         "#SBATCH -p gpu", "#SBATCH --time=5", "#SBATCH -J x", "#SBATCH --cpus-per-task=3"]
    assert slurm[7] == "#SBATCH --mem=122070"  # the largest limit, 128G, in MiB; the annotation's cpus dropped
    assert f"export POD_IP={ip}" in slurm and "echo site pre-exec" in slurm
    assert f"{box.info.vpn_bootstrap} {d}/job.sh" in slurm  # job.sh goes to the pre-exec's last line
    job_sh = (d / "job.sh").read_text()
    assert (f"runInitCtn setup singularity exec --nv --no-eval --containall  --env POD_IP=$POD_IP "
            f"--env-file {d}/setup_envfile.properties  {box.info.sif} true") in job_sh  # the pod's options, for all
    assert (f"runCtn main singularity exec --nv --no-eval --containall  --env POD_IP=$POD_IP "
            f"--env-file {d}/main_envfile.properties  {box.info.sif} /bin/bash -lc -- 'echo") in job_sh
    assert oct(d.stat().st_mode & 0o777) == "0o755"
    for name in ("main", "setup"):
        assert oct((d / f"{name}_envfile.properties").stat().st_mode & 0o777) == "0o644"
    assert (d / "main_envfile.properties").read_text().splitlines() == [
        "EXPERIMENT=box", "TRACKING=http://mlflow", f"MLFLOW_TRACKING_PASSWORD='it'\"'\"'s {password}'",
        "URI=http://mlflow", "ME=job", "GREETING='hi job'"]
    assert (d / "setup_envfile.properties").read_text() == "ME=job\n"

    logs = kubectl(box, "logs", "job", "-c", "main").stdout
    assert f"pw={password} hi job box {ip}" in logs and "has been submitted to SLURM node" in logs
    [record] = [r for r in box.singularity_records() if r["command"][-1].startswith('echo "pw=')]
    assert record["network"] == "vpn" and "MLFLOW_TRACKING_PASSWORD" in record["env_names"]
    assert password not in Path(box.info.singularity_log).read_text()
    jid = box.job_id(live)
    assert jid and squeue_state(box, jid) == "COMPLETED"
    delete(box, "job")
    assert not d.exists()  # the plugin removes the job directory, env files included, with the pod


def test_hostpath_without_a_directory_type_fails_and_a_pvc_drops_every_bind(site_box: SiteBox, tmp_path: Path) -> None:
    box, api = site_box, site_box.api
    assert api and box.info
    volumes = [{"name": "data", "hostPath": {"path": str(tmp_path)}}]
    api.create(pod(box, "untyped", "true", volumes=volumes,
                   container={"volumeMounts": [{"name": "data", "mountPath": "/data"}]}))
    failed = wait_for("ProviderFailed", lambda: (s := api.get("pods", "untyped")["status"]).get("phase") == "Failed" and s)
    assert failed["reason"] == "ProviderFailed"
    assert "unsupported hostPath type  for volume data in pod untyped" in failed["message"]
    assert failed["containerStatuses"][0]["state"]["terminated"]["reason"] == "ProviderFailed"

    created = tmp_path / "made-by-the-plugin"
    volumes = [{"name": "data", "hostPath": {"path": str(created), "type": "DirectoryOrCreate"}},
               {"name": "ray-logs", "emptyDir": {}}, {"name": "claim", "persistentVolumeClaim": {"claimName": "c"}}]
    mounts = [{"name": "data", "mountPath": "/tmp/data"}, {"name": "ray-logs", "mountPath": "/tmp/ray"}]
    api.create(pod(box, "binds", "ls /tmp/data && ls -d /tmp/ray", volumes=volumes,
                   container={"volumeMounts": mounts}))
    api.create(pod(box, "claims", "ls /tmp/ray", volumes=volumes,
                   container={"volumeMounts": [*mounts, {"name": "claim", "mountPath": "/claim"}]}))
    for name in ("binds", "claims"):
        wait_for(f"{name} ends", lambda n=name: phase(box, n) in ("Succeeded", "Failed"))
    assert created.is_dir() and phase(box, "binds") == "Succeeded"
    d_binds, d_claims = box.job_dir(api.get("pods", "binds")), box.job_dir(api.get("pods", "claims"))
    assert f" --bind {created}:/tmp/data --bind {d_binds}/emptyDirs/ray-logs:/tmp/ray:rw  " in \
        (d_binds / "job.sh").read_text()
    assert "--bind" not in (d_claims / "job.sh").read_text()  # the PVC took the /tmp/ray emptyDir down with it
    assert phase(box, "claims") == "Failed"  # nothing at /tmp/ray in the container
    assert api.get("pods", "claims")["status"]["reason"] == "Error: 2"
    delete(box, "untyped", "binds", "claims")


def test_sbatch_refusal_and_a_failing_job_fail_the_pod(site_box: SiteBox) -> None:
    box, api = site_box, site_box.api
    assert api
    api.create(pod(box, "refused", "true", annotations={"slurm-job.vk.io/flags": "--partition=nosuch"}))
    api.create(pod(box, "exits", "exit 3"))
    refused = wait_for("refusal", lambda: (s := api.get("pods", "refused")["status"]).get("phase") == "Failed" and s)
    assert refused["reason"] == "ProviderFailed"
    assert "sbatch: error: Batch job submission failed: Invalid partition name specified" in refused["message"]
    exits = wait_for("exit 3", lambda: (s := api.get("pods", "exits")["status"]).get("phase") == "Failed" and s)
    assert exits["reason"] == "Error: 3"
    assert exits["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3
    delete(box, "refused", "exits")


def test_deleting_a_pod_cancels_its_job(site_box: SiteBox) -> None:
    box, api = site_box, site_box.api
    assert api
    api.create(pod(box, "long", "sleep 600"))
    live = wait_for("Running", lambda: phase(box, "long") == "Running" and api.get("pods", "long"))
    jid, d = box.job_id(live), box.job_dir(live)
    assert jid and squeue_state(box, jid) == "RUNNING" and d.is_dir()
    kubectl(box, "delete", "pod", "long", "--wait=true")
    assert squeue_state(box, jid) == "CANCELLED" and not d.exists()


# ---------------------------------------------------------------------------------------------------------------
# The virtual node's kubelet API, the service proxy, the pod network
# ---------------------------------------------------------------------------------------------------------------

def test_port_forward_exec_and_attach_answer_501(site_box: SiteBox) -> None:
    box, api = site_box, site_box.api
    assert api and box.info
    api.create({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "quiet"},
                "spec": {"selector": {"app": "quiet"}, "ports": [{"name": "http", "port": 8265}]}})
    api.create(pod(box, "quiet", "sleep 600", labels={"app": "quiet"}))
    wait_for("Running", lambda: phase(box, "quiet") == "Running")
    for target in ("pod/quiet", "svc/quiet"):
        failed = kubectl(box, "port-forward", target, "18265:8265", ok=False)
        assert "unable to upgrade connection: 501 not implemented" in failed.stderr
    assert "501 not implemented" in kubectl(box, "exec", "quiet", "--", "true", ok=False).stderr
    assert "501 not implemented" in kubectl(box, "attach", "quiet", ok=False).stderr
    v1 = client.CoreV1Api(config.new_client_from_config(box.info.kubeconfig))
    with pytest.raises(ApiException) as caught:
        portforward(v1.connect_get_namespaced_pod_portforward, "quiet", "default", ports="8265")
    assert "501" in str(caught.value)
    # Without pod-vpn the virtual kubelet reports 127.0.0.1, which no Endpoints object may hold.
    assert api.get("pods", "quiet")["status"]["podIP"] == "127.0.0.1"
    failed = kubectl(box, "get", "--raw", "/api/v1/namespaces/default/services/quiet:http/proxy/", ok=False)
    assert 'ServiceUnavailable): no endpoints available for service "quiet"' in failed.stderr
    delete(box, "quiet")
    api.delete("services", "quiet")


def test_the_service_proxy_reaches_a_ray_head_a_slurm_job_started(site_box: SiteBox, charts_dir: Path) -> None:
    """The real ray-cluster chart with interLink annotations: KubeRay's head and worker become SLURM jobs, real
    Ray starts in them, the worker's wait-gcs-ready finds the head through cluster DNS over the VPN, and the head's
    dashboard answers through the API server's service proxy."""
    box, api = site_box, site_box.api
    assert api and box.info
    helm_bin = helm_path(3) or helm_path(4)
    if helm_bin is None:
        pytest.skip("no helm installed: run `make test` or set HPCRAY_HELM3")
    interlink = {"annotations": {"slurm-job.vk.io/flags": "--time=10",
                                 "slurm-job.vk.io/singularity-options": "--env POD_IP=$POD_IP",
                                 "slurm-job.vk.io/pre-exec": box.info.vpn_bootstrap, "interlink.eu/pod-vpn": "true"},
                 "nodeSelector": {"kubernetes.io/hostname": box.node}, "tolerations": [TOLERATION]}
    resources = {"limits": {"cpu": "1", "memory": "2G"}, "requests": {"cpu": "1", "memory": "2G"}}
    values = box.root / "values.json"
    values.write_text(json.dumps({
        "image": {"repository": f"{box.info.sif_dir}/{box.info.sif_name}", "tag": box.info.sif_tag},
        "head": {"rayStartParams": {"dashboard-host": "0.0.0.0", "node-ip-address": "$POD_IP"},
                 "resources": resources, **interlink},
        "worker": {"replicas": 1, "rayStartParams": {"node-ip-address": "$POD_IP"}, "resources": resources,
                   **interlink}}))
    helm = subprocess.run([helm_bin, "upgrade", "--install", "raycluster", str(charts_dir / "ray-cluster-1.2.2.tgz"),
                           "--values", str(values), "--kubeconfig", box.info.kubeconfig],
                          capture_output=True, text=True, env={**os.environ, "HOME": str(box.root)}, timeout=60)
    assert helm.returncode == 0, helm.stderr
    try:
        raw = "/api/v1/namespaces/default/services/raycluster-kuberay-head-svc:dashboard/proxy/api/version"
        answer = wait_for("the head's /api/version through the service proxy", lambda: (
            done := kubectl(box, "get", "--raw", raw, ok=None)).returncode == 0 and done.stdout, timeout=150)
        assert json.loads(answer)["ray_version"]
        pods = api.list("pods", labels="ray.io/cluster=raycluster-kuberay")
        assert {p["spec"]["nodeName"] for p in pods} == {box.node} and all(box.job_id(p) for p in pods)
        nodes = "/api/v1/namespaces/default/services/http:raycluster-kuberay-head-svc:8265/proxy/api/v0/nodes"
        wait_for("the worker's Ray node in the head's cluster", lambda: len([
            n for n in json.loads(kubectl(box, "get", "--raw", nodes).stdout)["data"]["result"]["result"]
            if n["state"] == "ALIVE"]) == 2, timeout=120)
        failed = kubectl(box, "port-forward", "svc/raycluster-kuberay-head-svc", "18265:8265", ok=False)
        assert "501 not implemented" in failed.stderr
    finally:
        subprocess.run([helm_bin, "uninstall", "raycluster", "--kubeconfig", box.info.kubeconfig],
                       capture_output=True, env={**os.environ, "HOME": str(box.root)}, timeout=60)
        wait_for("Ray pods gone", lambda: not api.list("pods", labels="ray.io/cluster=raycluster-kuberay"))


def test_a_pod_vpn_address_is_unusable_until_the_vpn_bootstrap_ran(site_box: SiteBox) -> None:
    box, api = site_box, site_box.api
    assert api and box.info
    serve = ('python3 -c "import http.server as h, os; '
             "h.HTTPServer((os.environ['POD_IP'], 8000), h.SimpleHTTPRequestHandler).serve_forever()\"")
    vpn = {"interlink.eu/pod-vpn": "", "slurm-job.vk.io/singularity-options": "--env POD_IP=$POD_IP"}
    for name, extra in (("connected", {"slurm-job.vk.io/pre-exec": box.info.vpn_bootstrap + "\n"}), ("alone", {})):
        api.create({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
                    "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 8000}]}})
        api.create(pod(box, name, serve, annotations={**vpn, **extra}, labels={"app": name}))
    answer = wait_for("the connected pod through the service proxy", lambda: (
        done := kubectl(box, "get", "--raw", "/api/v1/namespaces/default/services/connected:http/proxy/",
                        ok=None)).returncode == 0 and done.stdout)
    assert "Directory listing" in answer
    alone = wait_for("the unconnected pod's end", lambda: phase(box, "alone") == "Failed" and api.get("pods", "alone"))
    assert "Cannot assign requested address" in box.vk.logs(alone, "main", None)  # type: ignore[union-attr]
    failed = kubectl(box, "get", "--raw", "/api/v1/namespaces/default/services/alone:http/proxy/", ok=False)
    assert "error trying to reach service" in failed.stderr or "no endpoints available" in failed.stderr
    delete(box, "connected", "alone")
    for name in ("connected", "alone"):
        api.delete("services", name)

    # A virtual node without a PodCIDR cannot allocate a pod-vpn address: the pod is not created on it.
    assert box.plugin
    other = FakeVirtualKubelet(api, node="no-cidr-vk", plugin=box.plugin).start()
    try:
        api.create(pod(box, "nocidr", "true", annotations=vpn, node="no-cidr-vk"))
        status = wait_for("ProviderFailed", lambda: (s := api.get("pods", "nocidr")["status"]).get("reason") and s)
        assert (status["phase"], status["reason"], status["message"]) == ("Pending", "ProviderFailed",
                                                                         "node podCIDR not found")
        assert "interlink.eu/pod-ip" not in api.get("pods", "nocidr")["metadata"]["annotations"]
        api.delete("pods", "nocidr")
        wait_for("gone", lambda: not api.get("pods", "nocidr"))
    finally:
        other.stop()
        api.delete("nodes", "no-cidr-vk", None)


def test_a_gpu_request_on_a_node_without_gpus_stays_pending(site_box: SiteBox) -> None:
    box, api = site_box, site_box.api
    assert api
    api.create(pod(box, "gpu", "true", container={"resources": {"limits": {"nvidia.com/gpu": "1"}}}))
    status = wait_for("FailedScheduling", lambda: (s := api.get("pods", "gpu")["status"]).get("conditions") and s)
    message = ("0/2 nodes are available: 1 Insufficient nvidia.com/gpu, 1 node(s) didn't match Pod's node "
               "affinity/selector. preemption: 0/2 nodes are available: 1 No preemption victims found for incoming "
               "pod, 1 Preemption is not helpful for scheduling.")
    assert status["conditions"] == [{**status["conditions"][0], "type": "PodScheduled", "status": "False",
                                     "reason": "Unschedulable", "message": message}]
    events = api.list("events", fields="involvedObject.name=gpu")
    assert [(e["reason"], e["message"]) for e in events] == [("FailedScheduling", message)]
    assert status["phase"] == "Pending" and not api.get("pods", "gpu")["spec"].get("nodeName")
    delete(box, "gpu")


# ---------------------------------------------------------------------------------------------------------------
# Last: the walltime kill started by the first test
# ---------------------------------------------------------------------------------------------------------------

def test_a_walltime_kill_is_slurm_job_timeout(site_box: SiteBox, walltime_pod: str) -> None:
    box, api = site_box, site_box.api
    assert api
    status = wait_for("the walltime kill", lambda: (s := api.get("pods", walltime_pod)["status"]).get("phase")
                      in ("Failed", "Succeeded") and s, timeout=180)
    [terminated] = [c["state"]["terminated"] for c in status["containerStatuses"]]
    assert (status["phase"], terminated["reason"]) == ("Failed", "SlurmJobTimeout")
    assert terminated["message"] == "SLURM job reached its time limit and was terminated"
    jid = box.job_id(api.get("pods", walltime_pod))
    assert jid and squeue_state(box, jid) == "TIMEOUT"
    assert re.search(rf"JOB {jid} ON \S+ CANCELLED AT \S+ DUE TO TIME LIMIT", box.vk.logs(  # type: ignore[union-attr]
        api.get("pods", walltime_pod), "main", None))
    delete(box, walltime_pod)
