"""Profile → Helm values (Jinja, StrictUndefined) → RayCluster manifest checked against KubeRay's CRD schema."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcray.errors import TemplateError, ValuesError
from hpcray import shipped
from hpcray.profile import HeadSpec, Profile, WorkerGroupSpec
from hpcray.state import QUIET_ENV

VIRTUAL_NODE_TOLERATION = {"key": "virtual-node.interlink/no-schedule", "operator": "Exists", "effect": "NoSchedule"}
PROFILE_LABEL = "hpcray.io/profile"
MANAGED_LABEL = "app.kubernetes.io/managed-by-hpcray"


@dataclass
class Image:
    repository: str
    tag: str


def image_of(p: Profile) -> Image:
    """The chart renders `<repository>:<tag>`; for a SIF that is the file `<dir>/<name>:<tag>`."""
    if p.image.dir:
        return Image(f"{p.image.dir.rstrip('/')}/{p.image.name}", p.image.tag)
    return Image(p.image.name, p.image.tag)


def slurm_flags(p: Profile, g: HeadSpec) -> str:
    s = p.interlink.slurm
    flags = []
    if s.partition:
        flags.append(f"-p {s.partition}")
    if g.gpus:
        flags.append(f"--gres=gpu:{g.gpus}")
    if s.time:
        flags.append(f"--time={s.time}")
    if s.account:
        flags.append(f"--account={s.account}")
    if s.qos:
        flags.append(f"--qos={s.qos}")
    return " ".join(flags + list(s.extra_flags) + list(g.slurm_flags))


def mlflow_env(p: Profile) -> list[dict[str, Any]]:
    """Environment of every Ray container: telemetry off, MLflow location, credentials by Secret reference only."""
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in QUIET_ENV.items()]
    if p.mlflow.tracking_uri:
        env.append({"name": "MLFLOW_TRACKING_URI", "value": p.mlflow.tracking_uri})
        env.append({"name": "MLFLOW_EXPERIMENT_NAME", "value": p.mlflow.experiment})
    if p.mlflow.credentials != "none" and p.mlflow.deliver == "secret" and p.mlflow.tracking_uri:
        for var, key in (("MLFLOW_TRACKING_USERNAME", "username"), ("MLFLOW_TRACKING_PASSWORD", "password")):
            env.append({"name": var, "valueFrom": {"secretKeyRef": {"name": p.secret_name, "key": key}}})
    return env


def group_values(p: Profile, g: HeadSpec, role: str, name: str = "headgroup") -> dict[str, Any]:
    """Everything the template needs for one pod group, in the chart's vocabulary."""
    params: dict[str, str] = {}
    if role == "head":
        params["dashboard-host"] = "0.0.0.0"
    if g.gpus:
        params["num-gpus"] = str(g.gpus)
    if p.interlink.enabled and p.interlink.pod_vpn:
        params["node-ip-address"] = "$POD_IP"
    params.update({k: str(v) for k, v in g.ray_start_params.items()})

    limits: dict[str, Any] = {}
    if g.cpu is not None:
        limits["cpu"] = g.cpu
    if g.memory is not None:
        limits["memory"] = g.memory
    requests = dict(limits)
    if g.gpus:
        limits["nvidia.com/gpu"] = g.gpus

    annotations: dict[str, str] = {}
    node_selector: dict[str, str] = {}
    tolerations: list[dict[str, Any]] = []
    il = p.interlink
    if il.enabled:
        annotations["slurm-job.vk.io/flags"] = slurm_flags(p, g)
        if il.singularity.options:
            annotations["slurm-job.vk.io/singularity-options"] = " ".join(il.singularity.options)
        if il.singularity.mounts:
            annotations["slurm-job.vk.io/singularity-mounts"] = " ".join(f"--bind {m}" for m in il.singularity.mounts)
        if il.pre_exec:
            annotations["slurm-job.vk.io/pre-exec"] = il.pre_exec
        if il.pod_vpn:
            annotations["interlink.eu/pod-vpn"] = "true"
        node_selector[il.node_selector_key] = il.node or ""
        tolerations = [VIRTUAL_NODE_TOLERATION] + list(il.tolerations)

    volumes: list[dict[str, Any]] = [{"name": "log-volume", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": "log-volume", "mountPath": "/tmp/ray"}]
    for v in p.volumes:
        source = {"hostPath": {"path": v.host_path}} if v.host_path else {"persistentVolumeClaim": {"claimName": v.pvc}}
        volumes.append({"name": v.name, **source})
        mounts.append({"name": v.name, "mountPath": v.mount_path, "readOnly": v.read_only})

    env = mlflow_env(p) + [{"name": k, "value": v} for k, v in g.env.items()]
    values: dict[str, Any] = {
        "ray_start_params": params,
        "env": env,
        "resources": {"limits": limits, "requests": requests},
        "annotations": annotations,
        "labels": {PROFILE_LABEL: p.name},
        "node_selector": node_selector,
        "tolerations": tolerations,
        "volumes": volumes,
        "volume_mounts": mounts,
    }
    if isinstance(g, WorkerGroupSpec):
        values["replicas"] = g.replicas
        values["min_replicas"] = g.replicas if g.min_replicas is None else g.min_replicas
        values["max_replicas"] = g.replicas if g.max_replicas is None else g.max_replicas
    return values


def render_values_text(p: Profile, annotations: dict[str, str] | None = None) -> str:
    """The rendered template, before YAML parsing; raises TemplateError naming the template and line."""
    import jinja2

    path = p.resolve_path(p.template) if p.template else shipped.path("templates", "raycluster.yaml.j2")
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(path.parent)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,  # noqa: S701 - YAML, not HTML
    )
    env.policies["json.dumps_kwargs"] = {"sort_keys": False}
    try:
        template = env.get_template(path.name)
        return template.render(
            p=p,
            image=image_of(p),
            annotations=annotations or {},
            group=lambda g, role, name="headgroup": group_values(p, g, role, name),
        )
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"{exc.filename or path}:{exc.lineno}: {exc.message}; fix the template syntax") from None
    except jinja2.UndefinedError as exc:
        line = _template_line(exc, path)
        raise TemplateError(f"{path}{line}: {exc.message}; define it in the profile or remove it from the "
                            "template") from None


def _template_line(exc: BaseException, path: Path) -> str:
    tb = exc.__traceback__
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == str(path):
            line = tb.tb_lineno
        tb = tb.tb_next
    return f":{line}" if line else ""


def render_values(p: Profile, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """The Helm values for the profile, with the profile's raw `values:` merged over them."""
    import yaml

    text = render_values_text(p, annotations)
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise TemplateError(f"the template rendered invalid YAML at{where}: {getattr(exc, 'problem', exc)}; "
                            "check its indentation and use `| tojson` for values") from None
    return deep_merge(values, p.values)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def dump_values(values: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(values, sort_keys=False, default_flow_style=False, width=120)


# ---------------------------------------------------------------------------------------------------------------
# The rendered RayCluster against KubeRay's CRD (the chart has no values.schema.json: wrong types render fine)
# ---------------------------------------------------------------------------------------------------------------


def raycluster_of(manifest: str) -> dict[str, Any]:
    import yaml

    for doc in yaml.safe_load_all(manifest):
        if isinstance(doc, dict) and doc.get("kind") == "RayCluster":
            return doc
    raise ValuesError("the chart rendered no RayCluster; check chart.name points at KubeRay's ray-cluster chart")


def validate_raycluster(raycluster: dict[str, Any], crd_schema: dict[str, Any]) -> None:
    """Raise ValuesError naming the first field of the RayCluster the CRD's openAPIV3Schema rejects."""
    import jsonschema

    validator = jsonschema.Draft7Validator(crd_schema)
    errors = sorted(validator.iter_errors(_prune_nulls(raycluster)), key=lambda e: list(e.absolute_path))
    if errors:
        err = jsonschema.exceptions.best_match(errors)
        where = ".".join(str(x) if not isinstance(x, int) else f"[{x}]" for x in err.absolute_path).replace(".[", "[")
        raise ValuesError(f"RayCluster {where or '(root)'}: {err.message}; KubeRay would reject this — fix the "
                          "profile key or `values:` entry that sets it")
    check_interlink_pods(raycluster)


def _prune_nulls(obj: Any) -> Any:
    """The API server drops null fields of a CRD object (unless nullable) before validating; so do we."""
    if isinstance(obj, dict):
        return {k: _prune_nulls(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_prune_nulls(v) for v in obj]
    return obj


def check_interlink_pods(raycluster: dict[str, Any]) -> None:
    """Pods bound for the virtual node need CPU and memory limits and an absolute SIF path (also for `values:`)."""
    spec = raycluster.get("spec", {})
    groups = [("head", spec.get("headGroupSpec", {}))] + [
        (f"worker group {g.get('groupName')}", g) for g in spec.get("workerGroupSpecs") or []]
    for label, g in groups:
        pod = g.get("template", {}).get("spec", {})
        tolerations = pod.get("tolerations") or []
        if not any(t.get("key") == VIRTUAL_NODE_TOLERATION["key"] for t in tolerations):
            continue
        for c in pod.get("containers", []):
            limits = (c.get("resources") or {}).get("limits") or {}
            for res in ("cpu", "memory"):
                if res not in limits:
                    raise ValuesError(f"{label}: container {c.get('name')} has no {res} limit; interLink's SLURM "
                                      f"plugin would give it {'1 CPU' if res == 'cpu' else '1 MB'} — set it")
            if not str(c.get("image", "")).startswith("/"):
                raise ValuesError(f"{label}: image {c.get('image')!r} is not an absolute SIF path; set image.dir")


@dataclass
class CheckedRelease:
    values_yaml: str
    manifest: str
    raycluster: dict[str, Any]


def check_release(p: Profile, values_yaml: str, *, required: bool, warn: Any) -> CheckedRelease | None:
    """Render the chart with the real `helm template` and validate the RayCluster against KubeRay's CRD.

    With ``required`` a missing helm/chart is an error; otherwise it is reported through ``warn`` and skipped.
    """
    from hpcray import helm
    from hpcray.errors import ChartError, ToolMissing

    try:
        h = helm.find_helm()
        manifest = helm.template(h, p, values_yaml)
    except (ToolMissing, ChartError) as exc:
        if required:
            raise
        warn(f"hpcray: warning: skipped the chart check ({exc})")
        return None
    raycluster = raycluster_of(manifest)
    schema = helm.raycluster_crd_schema(h, p)
    if schema is None:
        warn(f"hpcray: warning: no RayCluster CRD for KubeRay {p.chart.version} found; types were not checked "
             "(set HPCRAY_CRD_DIR to a folder with ray.io_rayclusters-<version>.yaml)")
        check_interlink_pods(raycluster)
    else:
        validate_raycluster(raycluster, schema)
    return CheckedRelease(values_yaml, manifest, raycluster)
