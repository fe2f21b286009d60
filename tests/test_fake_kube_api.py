"""The fake Kubernetes API server and KubeRay operator serve the real helm 3 and 4, kubectl and `kubernetes` client.

What these tests found out about the real clients (see also the report in the commit message):
- `helm --wait` does not wait for a RayCluster's pods. helm 3 counts custom resources as ready at once; helm 4's
  kstatus watcher finds a RayCluster "Current" (no Reconciling/Stalled conditions, observedGeneration not behind).
  Whoever needs the Ray pods up must watch them itself.
- client-go (helm, kubectl) never sends a bearer token over plain http: a server requiring a token serves https.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from tests.fake_kube_api import FakeKubeAPI, serve
from tests.fake_kube_objects import PODS
from tests.fixtures_tools import helm_path

RAYCLUSTER = "raycluster-kuberay"  # release `raycluster` + the chart's nameOverride `kuberay`


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def kube(tmp_path: Path) -> Iterator[FakeKubeAPI]:
    yield from serve(tmp_path)


def core(api: FakeKubeAPI) -> client.CoreV1Api:
    return client.CoreV1Api(config.new_client_from_config(str(api.kubeconfig)))


def custom(api: FakeKubeAPI) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(config.new_client_from_config(str(api.kubeconfig)))


def wait_for(what: str, check: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return result


def ray_cluster(name: str = "rc", workers: int = 2, group: str = "wg") -> dict[str, Any]:
    def template(container: str) -> dict[str, Any]:
        return {"metadata": {"labels": {"team": "ml"}, "annotations": {"note": "copied"}},
                "spec": {"containers": [{"name": container, "image": "rayproject/ray:2.9.0"}],
                         "nodeSelector": {"kubernetes.io/os": "linux"},
                         "tolerations": [{"key": "gpu", "operator": "Exists"}]}}
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": name},
            "spec": {"headGroupSpec": {"rayStartParams": {}, "template": template("ray-head")},
                     "workerGroupSpecs": [{"groupName": group, "replicas": workers, "minReplicas": 0, "maxReplicas": 5,
                                           "rayStartParams": {}, "template": template("ray-worker")}]}}


def is_ready(pod: dict[str, Any]) -> bool:
    return pod["status"].get("phase") == "Running" and any(
        c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


class Helm:
    """Runs one real helm binary against the fake, with its own HOME so no cache leaks between tests."""

    def __init__(self, binary: str, kubeconfig: Path, home: Path) -> None:
        self.binary, self.kubeconfig = binary, kubeconfig
        self.env = {**os.environ, "HOME": str(home), "HELM_CACHE_HOME": str(home / "cache"),
                    "HELM_CONFIG_HOME": str(home / "config"), "HELM_DATA_HOME": str(home / "data")}
        self.major = int(subprocess.run([binary, "version", "--short"], capture_output=True, text=True,
                                        check=True).stdout.strip().lstrip("v")[0])

    def __call__(self, *args: str, ok: bool = True, namespace: str = "default") -> subprocess.CompletedProcess[str]:
        done = subprocess.run([self.binary, *args, "--namespace", namespace, "--kubeconfig", str(self.kubeconfig)],
                              capture_output=True, text=True, env=self.env, timeout=120)
        assert (done.returncode == 0) == ok, f"helm {' '.join(args)} → {done.returncode}: {done.stderr}"
        return done

    def releases(self) -> list[dict[str, Any]]:
        return json.loads(self("list", *(["-a"] if self.major == 3 else []), "-o", "json").stdout)  # 4: all by default


@pytest.fixture
def helm(helm_bin: str, kube: FakeKubeAPI, tmp_path: Path) -> Helm:
    assert kube.kubeconfig
    return Helm(helm_bin, kube.kubeconfig, tmp_path / "home")


# ---------------------------------------------------------------------------------------------------------------
# Real helm
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chart_version", ["1.2.2", "1.7.0"])
def test_helm_install_upgrade_uninstall(helm: Helm, kube: FakeKubeAPI, charts_dir: Path, chart_version: str) -> None:
    # The cluster's KubeRay must match the chart: the 1.7.0 chart omits rayStartParams, which the 1.2.2 CRD requires.
    kube.apply_crd(charts_dir / "crds" / f"ray.io_rayclusters-{chart_version}.yaml")
    chart = str(charts_dir / f"ray-cluster-{chart_version}.tgz")
    helm("upgrade", "--install", "raycluster", chart, "--wait", "--timeout", "60s")

    assert kube.get("rayclusters", RAYCLUSTER) is not None
    crd = kube.get("customresourcedefinitions", "rayclusters.ray.io", None)
    assert crd and crd["spec"]["names"]["kind"] == "RayCluster"
    release = kube.get("secrets", "sh.helm.release.v1.raycluster.v1")
    assert release and release["metadata"]["labels"]["owner"] == "helm"
    assert any(r.startswith("POST /api/v1/namespaces/default/secrets application/vnd.kubernetes.protobuf")
               for r in kube.requests), "helm sends its release Secret as protobuf"
    stored = json.loads(gzip.decompress(base64.b64decode(base64.b64decode(release["data"]["release"]))))
    assert stored["name"] == "raycluster" and stored["chart"]["metadata"]["version"] == chart_version
    assert [(r["name"], r["status"], r["revision"]) for r in helm.releases()] == [("raycluster", "deployed", "1")]
    wait_for("Ray pods ready", lambda: len(pods := kube.list("pods", labels=f"ray.io/cluster={RAYCLUSTER}")) == 2
             and all(map(is_ready, pods)))
    assert kube.get("services", f"{RAYCLUSTER}-head-svc") is not None

    helm("upgrade", "--install", "raycluster", chart, "--wait", "--timeout", "60s")
    assert [r["revision"] for r in helm.releases()] == ["2"]

    helm("uninstall", "raycluster", "--wait")
    assert kube.get("rayclusters", RAYCLUSTER) is None
    wait_for("pods and service gone", lambda: not kube.list("pods") and not kube.list("services"))
    assert helm.releases() == [] and not kube.list("secrets", labels="owner=helm")
    assert "not found" in helm("status", "raycluster", ok=False).stderr


def test_helm_wait_does_not_wait_for_raycluster_pods(helm: Helm, kube: FakeKubeAPI, charts_dir: Path) -> None:
    assert kube.operator
    kube.operator.keep_pending(reason="Unschedulable", message="0/3 nodes are available: 3 Insufficient nvidia.com/gpu.")
    started = time.monotonic()
    helm("upgrade", "--install", "raycluster", str(charts_dir / "ray-cluster-1.2.2.tgz"), "--wait", "--timeout", "5s")
    assert time.monotonic() - started < 5
    pods = wait_for("pods", lambda: len(p := kube.list("pods")) == 2 and p)
    assert all(p["status"]["phase"] == "Pending" for p in pods)


def test_helm_rollback_on_failure_leaves_no_release(helm: Helm, kube: FakeKubeAPI, charts_dir: Path) -> None:
    # The API server checks a RayCluster against the CRD schema, as a real one does: the install fails there.
    flag = "--atomic" if helm.major == 3 else "--rollback-on-failure"
    failed = helm("upgrade", "--install", "raycluster", str(charts_dir / "ray-cluster-1.2.2.tgz"), "--wait",
                  "--timeout", "5s", flag, "--set", "worker.replicas=two", ok=False)
    assert "spec.workerGroupSpecs[0].replicas in body must be of type integer" in failed.stderr
    assert helm.releases() == [] and not kube.list("secrets") and not kube.list("rayclusters")


def test_helm_errors_a_user_meets(helm_bin: str, tmp_path: Path, charts_dir: Path) -> None:
    chart = str(charts_dir / "ray-cluster-1.2.2.tgz")
    with FakeKubeAPI(token="right") as api:  # https, since client-go sends no token over http
        good = Helm(helm_bin, api.write_kubeconfig(tmp_path / "good"), tmp_path / "home")
        assert good.releases() == []
        failed = good("upgrade", "--install", "raycluster", chart, namespace="nope", ok=False)
        assert 'namespaces "nope" not found' in failed.stderr
        bad = Helm(helm_bin, api.write_kubeconfig(tmp_path / "bad", token="wrong"), tmp_path / "home")
        assert "provide credentials" in bad("list", ok=False).stderr
        with pytest.raises(ApiException) as caught:
            core(api).list_namespaced_pod("default")
        assert caught.value.status == 401
    with FakeKubeAPI(crds=[]) as api:  # KubeRay's CRD not installed
        failed = Helm(helm_bin, api.write_kubeconfig(tmp_path / "kc"), tmp_path / "home")(
            "upgrade", "--install", "raycluster", chart, ok=False)
        assert 'no matches for kind "RayCluster" in version "ray.io/v1"' in failed.stderr


def test_kubectl_apply_get_delete(helm_bin: str, kube: FakeKubeAPI, tmp_path: Path) -> None:
    kubectl = Path(helm_bin).parent / "kubectl"
    if not kubectl.is_file():
        pytest.skip(f"no kubectl beside {helm_bin}")

    def run(*args: str, stdin: str | None = None) -> str:
        done = subprocess.run([str(kubectl), "--kubeconfig", str(kube.kubeconfig), *args], input=stdin,
                              capture_output=True, text=True, env={**os.environ, "HOME": str(tmp_path)}, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    cm = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x, labels: {a: b}}\ndata: {k: v, k2: v2}\n"
    run("apply", "--server-side", "-f", "-", stdin=cm)
    run("apply", "--server-side", "-f", "-", stdin=cm.replace("labels: {a: b}", "").replace(", k2: v2", ""))
    assert json.loads(run("get", "cm", "x", "-o", "json"))["data"] == {"k": "v"}  # what the manager dropped, went
    run("create", "namespace", "team")
    run("apply", "-n", "team", "-f", "-", stdin=cm)
    run("apply", "-n", "team", "-f", "-", stdin=cm.replace("k: v,", "k: w,"))  # a patch; /openapi/v2 is a 404
    assert kube.get("configmaps", "x", "team")["data"] == {"k": "w", "k2": "v2"}
    assert run("get", "cm", "-n", "team", "-l", "a=b", "-o", "name").split() == ["configmap/x"]
    run("delete", "namespace", "team")
    assert kube.list("configmaps", "team") == []


# ---------------------------------------------------------------------------------------------------------------
# The kubernetes client, and the fake operator
# ---------------------------------------------------------------------------------------------------------------

def test_watch_sees_pods_go_pending_to_ready(kube: FakeKubeAPI) -> None:
    assert kube.operator
    kube.operator.delay = 0.1
    v1 = core(kube)
    custom(kube).create_namespaced_custom_object("ray.io", "v1", "default", "rayclusters", ray_cluster())
    states: dict[str, list[str]] = {}
    w = watch.Watch()
    for event in w.stream(v1.list_namespaced_pod, "default", label_selector="ray.io/cluster=rc", timeout_seconds=10):
        pod = event["raw_object"]
        states.setdefault(pod["metadata"]["name"], []).append("Ready" if is_ready(pod) else pod["status"]["phase"])
        if len(states) == 3 and all(s[-1] == "Ready" for s in states.values()):
            w.stop()
    assert all(s[0] == "Pending" and "Running" in s for s in states.values()), states
    head = v1.list_namespaced_pod("default", label_selector="ray.io/node-type=head").items[0]
    assert head.metadata.name.startswith("rc-head-") and head.metadata.labels["ray.io/group"] == "headgroup"
    assert head.metadata.labels["team"] == "ml"
    assert head.metadata.annotations == {"note": "copied", "ray.io/ft-enabled": "false"}
    assert head.spec.node_selector == {"kubernetes.io/os": "linux"} and head.spec.tolerations[0].key == "gpu"
    assert head.metadata.owner_references[0].kind == "RayCluster"
    node = v1.read_node(head.spec.node_name)
    assert [(c.type, c.status) for c in node.status.conditions] == [("Ready", "True")]
    svc = v1.read_namespaced_service("rc-head-svc", "default")
    assert {p.name: p.port for p in svc.spec.ports} == {"client": 10001, "dashboard": 8265, "gcs-server": 6379,
                                                        "metrics": 8080, "serve": 8000}  # KubeRay's defaults
    status = wait_for("status", lambda: (s := kube.get("rayclusters", "rc")["status"]).get("state") and s)
    assert status["state"] == "ready" and status["readyWorkerReplicas"] == 2


def test_selectors(kube: FakeKubeAPI) -> None:
    assert kube.operator
    kube.operator.mode = "manual"
    kube.create(ray_cluster(workers=2))
    v1 = core(kube)
    workers = wait_for("pods", lambda: len(p := kube.list("pods", labels="ray.io/node-type=worker")) == 2 and p)
    kube.operator.make_ready(pod=workers[0]["metadata"]["name"])

    def names(**kw: str) -> set[str]:
        return {p.metadata.name for p in v1.list_namespaced_pod("default", **kw).items}
    assert len(names(label_selector="ray.io/group in (wg,other),!missing,ray.io/cluster=rc")) == 2
    assert len(names(label_selector="ray.io/node-type notin (worker)")) == 1
    assert len(names(label_selector="ray.io/node-type!=head,team")) == 2
    assert names(field_selector="status.phase=Running") == {workers[0]["metadata"]["name"]}
    assert names(field_selector=f"metadata.name={workers[1]['metadata']['name']},status.phase!=Running") == {
        workers[1]["metadata"]["name"]}
    with pytest.raises(ApiException) as caught:
        v1.list_namespaced_pod("default", field_selector="spec.containers=x")
    assert caught.value.status == 400 and "field label not supported" in caught.value.body

    # A watch applies its selectors to every change: a pod becoming Running enters the selection as ADDED.
    threading.Timer(0.2, kube.operator.make_ready, kwargs={"pod": workers[1]["metadata"]["name"]}).start()
    seen, w = [], watch.Watch()
    for event in w.stream(v1.list_namespaced_pod, "default", field_selector="status.phase=Running", timeout_seconds=5):
        seen.append((event["type"], event["object"].metadata.name))
        if len(seen) == 2:
            w.stop()
    assert seen == [("ADDED", workers[0]["metadata"]["name"]), ("ADDED", workers[1]["metadata"]["name"])]


def test_pending_image_pull_and_crash_show_in_pods_and_events(kube: FakeKubeAPI) -> None:
    operator = kube.operator
    assert operator
    operator.mode = "manual"
    operator.keep_pending(cluster="rc", group="gpu")
    operator.fail_image_pull(cluster="rc", group="headgroup", message="manifest unknown")
    kube.create(ray_cluster(workers=1, group="gpu"))
    v1 = core(kube)
    worker = wait_for("worker", lambda: kube.list("pods", labels="ray.io/group=gpu"))[0]["metadata"]["name"]
    head = wait_for("head", lambda: kube.list("pods", labels="ray.io/group=headgroup"))[0]["metadata"]["name"]

    scheduled = next(c for c in v1.read_namespaced_pod(worker, "default").status.conditions if c.type == "PodScheduled")
    assert (scheduled.status, scheduled.reason) == ("False", "Unschedulable")
    assert "Insufficient nvidia.com/gpu" in scheduled.message
    events = v1.list_namespaced_event("default", field_selector=f"involvedObject.name={worker}").items
    assert [(e.reason, e.type, e.involved_object.kind) for e in events] == [("FailedScheduling", "Warning", "Pod")]

    waiting = wait_for("ImagePullBackOff", lambda: (s := v1.read_namespaced_pod(head, "default").status
                                                    .container_statuses[0].state.waiting).reason == "ImagePullBackOff" and s)
    assert "Back-off pulling image" in waiting.message
    reasons = [(e.reason, e.message) for e in
               v1.list_namespaced_event("default", field_selector=f"involvedObject.name={head}").items]
    assert ("Failed", 'Failed to pull image "rayproject/ray:2.9.0": manifest unknown') in reasons

    operator.crash(pod=worker, exit_code=137)
    status = v1.read_namespaced_pod(worker, "default").status.container_statuses[0]
    assert status.state.waiting.reason == "CrashLoopBackOff" and status.last_state.terminated.exit_code == 137

    operator.set_pod_phase(worker, "Failed", reason="Evicted", message="The node was low on memory.")
    # KubeRay deletes a pod that ended (its restartPolicy Always notwithstanding) and makes a new one in its place
    wait_for("evicted worker replaced", lambda: kube.get("pods", worker) is None and kube.list(
        "pods", labels="ray.io/group=gpu"))
    deleted = [e.message for e in v1.list_namespaced_event("default", field_selector="involvedObject.kind=RayCluster")
               .items if e.reason == "Deleted"]
    assert deleted == [f"Deleted worker Pod {worker}; Pod status: Failed; Pod restart policy: Always; Ray container "
                       "terminated status: nil"]
    operator.make_ready(cluster="rc")
    assert all(map(is_ready, kube.list("pods")))
    wait_for("state ready", lambda: kube.get("rayclusters", "rc").get("status", {}).get("state") == "ready")
    operator.crash(cluster="rc")
    wait_for("status seen the crash", lambda: kube.get("rayclusters", "rc")["status"]["readyWorkerReplicas"] == 0)
    assert kube.get("rayclusters", "rc")["status"]["state"] == "ready"  # KubeRay 1.2.2 never clears it


def test_kuberay_replaces_a_pod_that_ended_and_says_so_in_an_event(kube: FakeKubeAPI) -> None:
    """KubeRay 1.2.2's shouldDeletePod: a Failed or Succeeded pod goes whatever its restartPolicy; a Running one
    whose Ray container ended goes only with restartPolicy Never. A new pod, with a new name, takes its place."""
    operator = kube.operator
    assert operator
    operator.mode = "manual"
    never = ray_cluster("never", workers=1)
    never["spec"]["workerGroupSpecs"][0]["template"]["spec"]["restartPolicy"] = "Never"
    kube.create(ray_cluster(workers=1))
    kube.create(never)
    pods = wait_for("pods", lambda: len(p := kube.list("pods")) == 4 and p)
    operator.make_ready(namespace="default")
    name = {(p["metadata"]["labels"]["ray.io/cluster"], p["metadata"]["labels"]["ray.io/node-type"]):
            p["metadata"]["name"] for p in pods}

    def end(pod: str, phase: str, container: str) -> None:
        live = kube.get("pods", pod)
        assert live
        status = {**live["status"], "phase": phase, "containerStatuses": [{
            "name": container, "ready": False, "restartCount": 0, "image": "", "imageID": "", "state": {"terminated": {
                "exitCode": 0, "reason": "SlurmJobTimeout", "message": "SLURM job reached its time limit",
                "startedAt": "2026-12-01T10:00:00Z", "finishedAt": "2026-12-01T10:01:30Z"}}}]}
        kube.call(lambda: kube.store.replace(PODS, "default", pod, {**live, "status": status}, subresource="status"))

    end(name[("rc", "head")], "Failed", "ray-head")
    end(name[("rc", "worker")], "Running", "ray-worker")  # restartPolicy Always: the kubelet restarts it
    end(name[("never", "worker")], "Running", "ray-worker")
    heads = wait_for("a new head", lambda: [p["metadata"]["name"] for p in kube.list("pods", labels="ray.io/cluster=rc,"
                                                                                           "ray.io/node-type=head")
                                            if p["metadata"]["name"] != name[("rc", "head")]])
    assert len(heads) == 1 and kube.get("pods", name[("rc", "head")]) is None
    wait_for("a new worker of never", lambda: kube.get("pods", name[("never", "worker")]) is None and len(
        kube.list("pods", labels="ray.io/cluster=never,ray.io/node-type=worker")) == 1)
    assert kube.get("pods", name[("rc", "worker")]) is not None
    rc = kube.get("rayclusters", "rc")
    assert rc
    events = [(e["reason"], e["message"]) for e in kube.list("events", fields=f"involvedObject.uid={rc['metadata']['uid']}")]
    assert ("Deleted", f"Deleted head Pod {name[('rc', 'head')]}; Pod status: Failed; Pod restart policy: Always; Ray "
            "container terminated status: &ContainerStateTerminated{ExitCode:0,Signal:0,Reason:SlurmJobTimeout,Message:"
            "SLURM job reached its time limit,StartedAt:2026-12-01 10:00:00 +0000 UTC,FinishedAt:2026-12-01 10:01:30 "
            "+0000 UTC,ContainerID:,}") in events
    assert ("Created", f"Created head pod {heads[0]}") in events and ("Created", "Created worker pod ") in events
    assert not operator.errors


def test_watch_resumes_after_dropped_connection_and_410_gone(kube: FakeKubeAPI) -> None:
    v1 = core(kube)
    seen: list[str] = []
    failure: list[BaseException] = []

    def follow() -> None:
        w = watch.Watch()
        try:
            for event in w.stream(v1.list_namespaced_config_map, "default"):
                seen.append(event["object"].metadata.name)
                if seen[-1] == "last":
                    w.stop()
        except BaseException as exc:  # handed to the test thread
            failure.append(exc)

    follower = threading.Thread(target=follow)
    follower.start()
    kube.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "before"}})
    wait_for("first event", lambda: seen)
    assert kube.drop_watches() == 1
    kube.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "last"}})
    follower.join(10)
    assert seen == ["before", "last"] and not failure  # resumed from its last resourceVersion: nothing lost
    assert sum("configmaps?resourceVersion=" in r for r in kube.requests) == 1

    old = v1.list_namespaced_config_map("default").metadata.resource_version
    kube.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "after"}})
    kube.compact()
    with pytest.raises(ApiException) as caught:  # the client retries a 410 once, then raises
        next(iter(watch.Watch().stream(v1.list_namespaced_config_map, "default", resource_version=old)))
    assert caught.value.status == 410
    fresh = v1.list_namespaced_config_map("default").metadata.resource_version
    kube.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "new"}})
    events = watch.Watch().stream(v1.list_namespaced_config_map, "default", resource_version=fresh, timeout_seconds=5)
    assert next(events)["object"].metadata.name == "new"
    events.close()


def test_restart_keeps_objects_and_port_and_stop_is_prompt(kube: FakeKubeAPI) -> None:
    v1 = core(kube)
    kube.create(ray_cluster(workers=1))
    wait_for("pods ready", lambda: len(p := kube.list("pods")) == 2 and all(map(is_ready, p)))
    url = kube.url
    cut: list[BaseException] = []

    def follow() -> None:
        try:
            for _ in watch.Watch().stream(v1.list_namespaced_pod, "default"):
                pass
        except BaseException as exc:  # the connection is cut by the restart
            cut.append(exc)
    follower = threading.Thread(target=follow)
    follower.start()
    wait_for("watch open", lambda: kube.call(lambda: len(kube.store.watchers)))
    started = time.monotonic()
    kube.stop()
    assert time.monotonic() - started < 2
    follower.join(5)
    assert cut, "a restart cuts open watches"
    kube.start()
    assert kube.url == url and len(v1.list_namespaced_pod("default").items) == 2
    kube.create({"apiVersion": "ray.io/v1", **{k: v for k, v in ray_cluster("rc2", 1).items() if k != "apiVersion"}})
    wait_for("operator back at work", lambda: len(kube.list("pods", labels="ray.io/cluster=rc2")) == 2)


def test_scaling_and_terminating_pods(kube: FakeKubeAPI) -> None:
    assert kube.operator
    kube.operator.terminating_delay = 0.5
    api = custom(kube)
    api.create_namespaced_custom_object("ray.io", "v1", "default", "rayclusters", ray_cluster(workers=1))
    wait_for("1 worker", lambda: len(kube.list("pods", labels="ray.io/node-type=worker")) == 1)
    patch = {"spec": {"workerGroupSpecs": [{**ray_cluster()["spec"]["workerGroupSpecs"][0], "replicas": 3}]}}
    api.patch_namespaced_custom_object("ray.io", "v1", "default", "rayclusters", "rc", patch)
    assert kube.get("rayclusters", "rc")["metadata"]["generation"] == 2
    wait_for("3 workers ready", lambda: len(p := kube.list("pods", labels="ray.io/node-type=worker")) == 3
             and all(map(is_ready, p)))

    api.delete_namespaced_custom_object("ray.io", "v1", "default", "rayclusters", "rc")
    terminating = wait_for("terminating pods", lambda: (p := kube.list("pods")) and all(
        x["metadata"].get("deletionTimestamp") for x in p) and p)
    assert len(terminating) == 4 and kube.get("rayclusters", "rc") is None  # pods on a node linger, like real ones
    wait_for("pods gone", lambda: not kube.list("pods"))


def test_patches_finalizers_and_garbage_collection(kube: FakeKubeAPI) -> None:
    v1 = core(kube)
    owner = v1.create_namespaced_config_map("default", {"metadata": {"name": "owner"}, "data": {"a": "1"}})
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
    v1.create_namespaced_config_map("default", {"metadata": {"name": "kid", "ownerReferences": [ref],
                                                             "finalizers": ["example.com/hold"]}})
    v1.patch_namespaced_config_map("owner", "default", {"data": {"b": "2", "a": None}},
                                   _content_type="application/merge-patch+json")
    v1.patch_namespaced_config_map("owner", "default", [{"op": "add", "path": "/data/c", "value": "3"},
                                                        {"op": "replace", "path": "/data/b", "value": "4"}])
    assert v1.read_namespaced_config_map("owner", "default").data == {"b": "4", "c": "3"}
    with pytest.raises(ApiException) as caught:
        v1.patch_namespaced_config_map("owner", "default", {"metadata": {"resourceVersion": "1"}})
    assert caught.value.status == 409

    applied = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "applied"}, "data": {"x": "1", "y": "2"}}
    for body, expect in ((applied, {"x": "1", "y": "2"}), ({**applied, "data": {"x": "9"}}, {"x": "9"})):
        v1.patch_namespaced_config_map("applied", "default", body, field_manager="test",
                                       _content_type="application/apply-patch+yaml")  # creates, then prunes y
        assert v1.read_namespaced_config_map("applied", "default").data == expect

    v1.delete_namespaced_config_map("owner", "default", propagation_policy="Foreground")
    assert v1.read_namespaced_config_map("owner", "default").metadata.deletion_timestamp  # waits for kid
    assert v1.read_namespaced_config_map("kid", "default").metadata.deletion_timestamp  # waits for its finalizer
    v1.patch_namespaced_config_map("kid", "default", {"metadata": {"finalizers": None}},
                                   _content_type="application/merge-patch+json")
    assert {c.metadata.name for c in v1.list_namespaced_config_map("default").items} == {"applied"}

    parent = v1.create_namespaced_config_map("default", {"metadata": {"name": "parent"}})
    ref = {**ref, "name": "parent", "uid": parent.metadata.uid}
    v1.create_namespaced_config_map("default", {"metadata": {"name": "orphan", "ownerReferences": [ref]}})
    v1.delete_namespaced_config_map("parent", "default", propagation_policy="Orphan")
    assert v1.read_namespaced_config_map("orphan", "default").metadata.owner_references is None

    with pytest.raises(ApiException) as caught:
        v1.create_namespaced_config_map("missing", {"metadata": {"name": "x"}})
    assert caught.value.status == 404 and 'namespaces \\"missing\\" not found' in caught.value.body
    v1.delete_collection_namespaced_config_map("default")
    assert v1.list_namespaced_config_map("default").items == []


# ---------------------------------------------------------------------------------------------------------------
# KubeRay's pods, the scheduler, endpoints and the service proxy
# ---------------------------------------------------------------------------------------------------------------

def test_kuberay_pods_and_head_service_are_built_as_kuberay_builds_them(kube: FakeKubeAPI) -> None:
    rc = ray_cluster(workers=1)
    rc["spec"]["headGroupSpec"]["rayStartParams"] = {"num-cpus": "0"}
    for group in (rc["spec"]["headGroupSpec"], rc["spec"]["workerGroupSpecs"][0]):
        group["template"]["spec"]["containers"][0].update(
            env=[{"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow"}],
            resources={"limits": {"cpu": "1500m", "memory": "2G", "nvidia.com/gpu": "1"}})
    kube.create(rc)
    head = wait_for("head", lambda: kube.list("pods", labels="ray.io/node-type=head"))[0]
    worker = wait_for("worker", lambda: kube.list("pods", labels="ray.io/node-type=worker"))[0]
    ray = head["spec"]["containers"][0]
    assert ray["command"] == ["/bin/bash", "-lc", "--"]
    assert ray["args"] == ["ulimit -n 65536; ray start --head  --block  --dashboard-agent-listen-port=52365  "
                           "--dashboard-host=0.0.0.0  --memory=2000000000  --metrics-export-port=8080  "
                           "--num-cpus=0  --num-gpus=1 "]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in ray["env"]}
    assert env["RAY_ADDRESS"] == "127.0.0.1:6379" and env["RAY_PORT"] == "6379"
    assert env["RAY_CLUSTER_NAME"] == {"fieldRef": {"fieldPath": "metadata.labels['ray.io/cluster']"}}
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow" and "FQ_RAY_IP" not in env
    assert {"mountPath": "/dev/shm", "name": "shared-mem"} in ray["volumeMounts"]
    assert head["spec"]["containers"][0]["resources"]["requests"]["cpu"] == "1500m"  # defaulted from the limits
    [init] = worker["spec"]["initContainers"]
    assert init["name"] == "wait-gcs-ready" and init["command"] == ["/bin/bash", "-lc", "--"]
    assert "ray health-check --address rc-head-svc.default.svc.cluster.local:6379" in init["args"][0]
    assert init["env"] == [{"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow"},
                           {"name": "FQ_RAY_IP", "value": "rc-head-svc.default.svc.cluster.local"},
                           {"name": "RAY_IP", "value": "rc-head-svc"}]
    assert "--address=rc-head-svc.default.svc.cluster.local:6379" in worker["spec"]["containers"][0]["args"][0]
    svc = kube.get("services", "rc-head-svc")
    assert svc["spec"]["selector"] == {"ray.io/cluster": "rc", "ray.io/node-type": "head",
                                       "ray.io/identifier": "rc-head", "app.kubernetes.io/name": "kuberay",
                                       "app.kubernetes.io/created-by": "kuberay-operator"}
    assert [p["name"] for p in svc["spec"]["ports"]] == ["client", "dashboard", "gcs-server", "metrics", "serve"]
    [subset] = wait_for("the ready head in the Service's endpoints", lambda: (
        e := kube.get("endpoints", "rc-head-svc")) and e.get("subsets") and e["subsets"][0].get("addresses")
        and e["subsets"])
    assert [a["targetRef"]["name"] for a in subset["addresses"]] == [head["metadata"]["name"]]


def test_the_scheduler_fits_pods_as_kube_scheduler_does(kube: FakeKubeAPI) -> None:
    from tests.fake_kube_scheduler import interlink_node
    kube.create({"apiVersion": "v1", "kind": "Node", **interlink_node("vk", pod_cidr="10.10.0.0/24")})
    toleration = [{"key": "virtual-node.interlink/no-schedule", "operator": "Exists"}]

    def make(name: str, cpu: str, *, selector: bool = True, tolerate: bool = True) -> None:
        kube.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": {
            **({"nodeSelector": {"kubernetes.io/hostname": "vk"}} if selector else {}),
            **({"tolerations": toleration} if tolerate else {}),
            "containers": [{"name": "c", "image": "x", "resources": {"limits": {"cpu": cpu}}}]}})

    def pending_message(name: str) -> str:
        return wait_for(f"{name} unschedulable", lambda: next(
            (c["message"] for c in (kube.get("pods", name)["status"].get("conditions") or [])
             if c["type"] == "PodScheduled" and c["status"] == "False"), ""))

    make("first", "60")
    assert wait_for("first bound", lambda: kube.get("pods", "first")["spec"].get("nodeName")) == "vk"
    make("second", "60")  # requests default to limits and add up on the node: 120 > 100
    assert pending_message("second") == (
        "0/2 nodes are available: 1 Insufficient cpu, 1 node(s) didn't match Pod's node affinity/selector. "
        "preemption: 0/2 nodes are available: 1 No preemption victims found for incoming pod, 1 Preemption is not "
        "helpful for scheduling.")
    make("intolerant", "1", tolerate=False)
    assert pending_message("intolerant") == (
        "0/2 nodes are available: 1 node(s) didn't match Pod's node affinity/selector, 1 node(s) had untolerated "
        "taint {virtual-node.interlink/no-schedule: true}. preemption: 0/2 nodes are available: 2 Preemption is "
        "not helpful for scheduling.")
    make("anywhere", "1", selector=False, tolerate=False)
    assert wait_for("on the regular node", lambda: kube.get("pods", "anywhere")["spec"].get("nodeName")) == "fake-node-1"
    kube.delete("pods", "first")
    assert wait_for("second fits once first is gone", lambda: kube.get("pods", "second")["spec"].get("nodeName"))


class Backend:
    """What listens in a fake pod: an HTTP endpoint and a websocket echo, on 127.0.0.1."""

    def __init__(self) -> None:
        import asyncio

        from aiohttp import web

        async def version(request: web.Request) -> web.Response:
            return web.json_response({"path": request.path, "query": request.query_string, "version": "fake"})

        async def echo(request: web.Request) -> web.WebSocketResponse:
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for msg in ws:
                await ws.send_str(f"echo: {msg.data}")
            return ws
        app = web.Application()
        app.router.add_get("/api/version", version)
        app.router.add_get("/ws", echo)
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = self.runner.addresses[0][1]
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        import asyncio
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_the_service_proxy_reaches_ready_endpoints_only(kube: FakeKubeAPI, tmp_path: Path) -> None:
    import asyncio

    import aiohttp
    backend = Backend()
    try:
        kube.serve_pod_port("ray.io/node-type=head", 8265, ("127.0.0.1", backend.port))
        kube.create(ray_cluster(workers=0))
        head = wait_for("ready head", lambda: [p for p in kube.list("pods", labels="ray.io/node-type=head")
                                                if is_ready(p)])[0]["metadata"]["name"]
        v1 = core(kube)
        answer = wait_for("proxied", lambda: _try(lambda: v1.connect_get_namespaced_service_proxy_with_path(
            "rc-head-svc:dashboard", "default", "api/version")))
        assert json.loads(answer.replace("'", '"'))["version"] == "fake"
        kubectl = shutil.which("kubectl") or str(Path(helm_path(4) or "/nonexistent").parent / "kubectl")
        raw = subprocess.run([kubectl, "--kubeconfig", str(kube.kubeconfig), "get", "--raw",
                              "/api/v1/namespaces/default/services/http:rc-head-svc:8265/proxy/api/version?x=1"],
                             capture_output=True, text=True, env={**os.environ, "HOME": str(tmp_path)}, timeout=60)
        assert raw.returncode == 0 and json.loads(raw.stdout) == {"path": "/api/version", "query": "x=1",
                                                                  "version": "fake"}

        async def websocket() -> str:
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(f"{kube.url}/api/v1/namespaces/default/services/rc-head-svc:dashboard"
                                              "/proxy/ws") as ws:
                    await ws.send_str("hello")
                    return (await ws.receive(timeout=10)).data
        assert asyncio.run(websocket()) == "echo: hello"

        with pytest.raises(ApiException) as caught:
            v1.connect_get_namespaced_service_proxy_with_path("rc-head-svc:client", "default", "x")
        assert caught.value.status == 503 and "error trying to reach service" in caught.value.body
        assert kube.operator
        kube.operator.set_pod_phase(head, "Running", ready=False)
        wait_for("no ready endpoint", lambda: not kube.get("endpoints", "rc-head-svc")["subsets"][0].get("addresses"))
        with pytest.raises(ApiException) as caught:
            v1.connect_get_namespaced_service_proxy_with_path("rc-head-svc:dashboard", "default", "api/version")
        assert caught.value.status == 503
        assert 'no endpoints available for service \\"rc-head-svc:dashboard\\"' in caught.value.body
        kube.create({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "manual"},
                     "spec": {"ports": [{"name": "http", "port": 80}]}})  # no selector: nobody writes Endpoints
        with pytest.raises(ApiException) as caught:
            v1.connect_get_namespaced_service_proxy_with_path("manual:http", "default", "")
        assert caught.value.status == 404 and 'endpoints \\"manual\\" not found' in caught.value.body
    finally:
        backend.close()


def _try(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except ApiException:
        return None
