"""The pods and head Service KubeRay 1.2.2 makes of a RayCluster, as its controller builds them (ray-project/kuberay
ray-operator/controllers/ray/common/pod.go `DefaultHeadPodTemplate`, `DefaultWorkerPodTemplate`, `BuildPod`,
`setContainerEnvVars`, `generateRayStartCommand`; service.go `BuildServiceForHeadPod`). Pure functions.

What a pod gets: the `ray.io/*` and `app.kubernetes.io/*` labels, the `ray.io/ft-enabled` annotation, the Ray
container's command `/bin/bash -lc --` with `ulimit -n 65536; ray start [--head] --k=v ...` from rayStartParams
(plus KubeRay's own: dashboard-host=0.0.0.0 on the head, address=<fqdn>:6379 on workers, metrics-export-port,
block, dashboard-agent-listen-port, num-cpus / memory / num-gpus from limits), its env (RAY_CLUSTER_NAME,
RAY_CLOUD_INSTANCE_ID, RAY_NODE_TYPE_NAME, KUBERAY_GEN_RAY_START_CMD, RAY_PORT, RAY_ADDRESS, FQ_RAY_IP and RAY_IP
on workers, ...), a /dev/shm emptyDir, exec probes, and on workers the `wait-gcs-ready` init container that loops
on `ray health-check --address <cluster>-head-svc.<ns>.svc.cluster.local:6379` with a copy of the Ray container's
env and mounts. Go iterates rayStartParams in random order; here they are sorted. KubeRay 1.7.0 builds the same
pods for what hpcray uses (the chart's command/args/ports), which is what these fakes cover.
"""

from __future__ import annotations

import copy

from tests.fake_kube_objects import Obj
from tests.fake_kube_scheduler import quantity

KUBERAY_VERSION = "v1.2.2"
DEFAULT_PORTS = {"client": 10001, "gcs-server": 6379, "dashboard": 8265, "metrics": 8080, "serve": 8000}
METRICS_PORT = 8080
AGENT_PORT = 52365
_BOOLEAN_EXEMPT = ("log-color", "include-dashboard")
_WGET = "wget -T {timeout} -q -O- http://localhost:{port}/{path} | grep success"


def head_service_name(cluster: str) -> str:
    return f"{cluster}-head-svc"


def fqdn(cluster: str, namespace: str) -> str:
    return f"{head_service_name(cluster)}.{namespace}.svc.cluster.local"


def _labels(node_type: str, cluster: str, group: str, template_labels: dict[str, str] | None) -> dict[str, str]:
    out = dict(template_labels or {})
    for k, v in {"ray.io/is-ray-node": "yes", "ray.io/cluster": cluster, "ray.io/node-type": node_type,
                 "ray.io/group": group, "ray.io/identifier": f"{cluster}-{node_type}",
                 "app.kubernetes.io/name": "kuberay", "app.kubernetes.io/created-by": "kuberay-operator"}.items():
        out.setdefault(k, v)
    return out


def _param_string(params: dict[str, str]) -> str:
    out = ""
    for option, argument in sorted(params.items()):
        if str(argument).lower() in ("true", "false") and option not in _BOOLEAN_EXEMPT:
            if str(argument).lower() == "true":
                out += f" --{option} "
        else:
            out += f" --{option}={argument} "
    return out


def ray_start_command(node_type: str, params: dict[str, str], resources: Obj) -> str:
    limits = (resources or {}).get("limits") or {}
    params = dict(params)
    if "num-cpus" not in params and quantity(limits.get("cpu", 0)) != 0:
        params["num-cpus"] = str(-(-quantity(limits["cpu"]).numerator // quantity(limits["cpu"]).denominator))
    if "memory" not in params and quantity(limits.get("memory", 0)) != 0:
        params["memory"] = str(int(quantity(limits["memory"])))
    if "num-gpus" not in params:
        for key, value in limits.items():
            if key.endswith("gpu") and quantity(value) != 0:
                params["num-gpus"] = str(int(quantity(value)))
                break
    return f"ray start --head {_param_string(params)}" if node_type == "head" else f"ray start {_param_string(params)}"


def _probe(node_type: str, liveness: bool) -> Obj:
    commands = [_WGET.format(timeout=1, port=AGENT_PORT, path="api/local_raylet_healthz")]
    if node_type == "head":
        commands.append(_WGET.format(timeout=10, port=8265, path="api/gcs_healthz"))
    timeout = 5 if node_type == "head" else 1
    probe = {"initialDelaySeconds": 30 if liveness else 10, "timeoutSeconds": timeout, "periodSeconds": 5,
             "successThreshold": 1, "failureThreshold": 120 if liveness else 10}
    return {**probe, "exec": {"command": ["bash", "-c", " && ".join(commands)]}}


def _cmd_string(parts: list[str]) -> str:
    return "".join(f" {p} " for p in parts)


def build_pod(rc: Obj, node_type: str, group_spec: Obj) -> Obj:
    """A pod (without name: generateName) KubeRay creates for the head group or one worker group."""
    name, ns = rc["metadata"]["name"], rc["metadata"]["namespace"]
    svc_fqdn, head_port = fqdn(name, ns), str((rc["spec"]["headGroupSpec"].get("rayStartParams") or {})
                                              .get("port", "6379"))
    template = copy.deepcopy(group_spec.get("template") or {})
    tmeta, spec = template.get("metadata") or {}, template.get("spec") or {"containers": []}
    group = "headgroup" if node_type == "head" else group_spec["groupName"]
    ray = spec["containers"][0]
    params = {k: str(v) for k, v in (group_spec.get("rayStartParams") or {}).items()}
    if node_type == "worker":
        original_env, original_mounts = copy.deepcopy(ray.get("env") or []), copy.deepcopy(
            ray.get("volumeMounts") or [])
        spec.setdefault("initContainers", []).append({
            "name": "wait-gcs-ready", "image": ray.get("image", ""),
            **({"imagePullPolicy": ray["imagePullPolicy"]} if ray.get("imagePullPolicy") else {}),
            "command": ["/bin/bash", "-lc", "--"],
            "args": [f"""
\t\t\t\t\tSECONDS=0
\t\t\t\t\twhile true; do
\t\t\t\t\t\tif (( SECONDS <= 120 )); then
\t\t\t\t\t\t\tif ray health-check --address {svc_fqdn}:{head_port} > /dev/null 2>&1; then
\t\t\t\t\t\t\t\techo "GCS is ready."
\t\t\t\t\t\t\t\tbreak
\t\t\t\t\t\t\tfi
\t\t\t\t\t\t\techo "$SECONDS seconds elapsed: Waiting for GCS to be ready."
\t\t\t\t\t\telse
\t\t\t\t\t\t\tif ray health-check --address {svc_fqdn}:{head_port}; then
\t\t\t\t\t\t\t\techo "GCS is ready. Any error messages above can be safely ignored."
\t\t\t\t\t\t\t\tbreak
\t\t\t\t\t\t\tfi
\t\t\t\t\t\t\techo "$SECONDS seconds elapsed: Still waiting for GCS to be ready. For troubleshooting, \
refer to the FAQ at https://github.com/ray-project/kuberay/blob/master/docs/guidance/FAQ.md."
\t\t\t\t\t\tfi
\t\t\t\t\t\tsleep 5
\t\t\t\t\tdone
\t\t\t\t"""],
            **({"securityContext": copy.deepcopy(ray["securityContext"])} if ray.get("securityContext") else {}),
            "env": original_env, "volumeMounts": original_mounts,
            "resources": {"limits": {"cpu": "200m", "memory": "256Mi"},
                          "requests": {"cpu": "200m", "memory": "256Mi"}}})
        params.setdefault("address", f"{svc_fqdn}:{head_port}")
    else:
        params.setdefault("dashboard-host", "0.0.0.0")
    params.setdefault("metrics-export-port", str(METRICS_PORT))
    params["block"] = "true"
    params.setdefault("dashboard-agent-listen-port", str(AGENT_PORT))
    if not any(p.get("name") == "metrics" for p in ray.get("ports") or []):
        ray["ports"] = [*(ray.get("ports") or []), {"name": "metrics", "containerPort": METRICS_PORT}]

    memory = ((ray.get("resources") or {}).get("requests") or {}).get("memory") or \
        ((ray.get("resources") or {}).get("limits") or {}).get("memory")
    if not any(m.get("mountPath") == "/dev/shm" for m in ray.get("volumeMounts") or []):
        if not any(v.get("name") == "shared-mem" for v in spec.get("volumes") or []):
            spec.setdefault("volumes", []).append({"name": "shared-mem", "emptyDir": {
                "medium": "Memory", **({"sizeLimit": memory} if memory else {})}})
        ray.setdefault("volumeMounts", []).append({"mountPath": "/dev/shm", "name": "shared-mem"})

    existing = _cmd_string(ray.get("command") or []) + _cmd_string(ray.get("args") or [])
    start = ray_start_command(node_type, params, ray.get("resources") or {})
    annotations = {**(tmeta.get("annotations") or {}), "ray.io/ft-enabled": "false"}
    if "ray start" not in existing and annotations.get("ray.io/overwrite-container-cmd", "").lower() != "true":
        generated = f"ulimit -n 65536; {start}"
        ray["command"] = ["/bin/bash", "-lc", "--"]
        ray["args"] = [f"{existing} && {generated}" if existing else generated]
    for init in spec.get("initContainers") or []:
        init.setdefault("env", []).extend([{"name": "FQ_RAY_IP", "value": svc_fqdn},
                                           {"name": "RAY_IP", "value": head_service_name(name)}])
    env = ray.setdefault("env", [])
    names = {e["name"] for e in env}
    ip = "127.0.0.1"
    if node_type == "worker":
        ip = svc_fqdn
        env += [{"name": "FQ_RAY_IP", "value": ip}, {"name": "RAY_IP", "value": head_service_name(name)}]
    env += [{"name": "RAY_CLUSTER_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['ray.io/cluster']"}}},
            {"name": "RAY_CLOUD_INSTANCE_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "RAY_NODE_TYPE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['ray.io/group']"}}},
            {"name": "KUBERAY_GEN_RAY_START_CMD", "value": start}]
    for key, value in (("RAY_PORT", head_port), ("RAY_ADDRESS", f"{ip}:{head_port}"),
                       ("RAY_USAGE_STATS_KUBERAY_IN_USE", "1")):
        if key not in names:
            env.append({"name": key, "value": value})
    if node_type == "head":
        env.append({"name": "RAY_USAGE_STATS_EXTRA_TAGS",
                    "value": f"kuberay_version={KUBERAY_VERSION};kuberay_crd=RayCluster"})
    if "REDIS_PASSWORD" not in names:
        env.append({"name": "REDIS_PASSWORD", "value": params.get("redis-password", "")})
    if "RAY_DASHBOARD_ENABLE_K8S_DISK_USAGE" not in names:
        env.append({"name": "RAY_DASHBOARD_ENABLE_K8S_DISK_USAGE", "value": "1"})
    ray.setdefault("livenessProbe", _probe(node_type, True))
    ray.setdefault("readinessProbe", _probe(node_type, False))

    prefix = f"{name}-head-" if node_type == "head" else f"{name}-{group}-worker-"
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": prefix, "namespace": ns,
                         "labels": _labels(node_type, name, group, tmeta.get("labels")),
                         "annotations": annotations,
                         "ownerReferences": [{"apiVersion": rc["apiVersion"], "kind": "RayCluster", "name": name,
                                              "uid": rc["metadata"]["uid"], "controller": True,
                                              "blockOwnerDeletion": True}]},
            "spec": spec}


def head_service(rc: Obj) -> Obj:
    """`<cluster>-head-svc`: the head container's named ports (unnamed ones as `<port>-port`), else KubeRay's
    defaults, plus metrics; app protocol tcp; sorted by name; selecting the head pod by KubeRay's labels."""
    name, head = rc["metadata"]["name"], rc["spec"]["headGroupSpec"]
    container = ((head.get("template") or {}).get("spec") or {}).get("containers", [{}])[0]
    ports = {p.get("name") or f"{p['containerPort']}-port": p["containerPort"] for p in container.get("ports") or []}
    ports = ports or dict(DEFAULT_PORTS)
    ports.setdefault("metrics", METRICS_PORT)
    labels = {"ray.io/cluster": name, "ray.io/node-type": "head", "ray.io/identifier": f"{name}-head",
              "app.kubernetes.io/name": "kuberay", "app.kubernetes.io/created-by": "kuberay-operator"}
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": head_service_name(name), "namespace": rc["metadata"]["namespace"],
                         "labels": dict(labels),
                         "ownerReferences": [{"apiVersion": rc["apiVersion"], "kind": "RayCluster", "name": name,
                                              "uid": rc["metadata"]["uid"], "controller": True,
                                              "blockOwnerDeletion": True}]},
            "spec": {"type": head.get("serviceType") or "ClusterIP", "selector": dict(labels),
                     "ports": [{"name": n, "port": p, "appProtocol": "tcp"} for n, p in sorted(ports.items())]}}
