"""Profile → Helm values (Jinja, StrictUndefined) → RayCluster manifest checked against KubeRay's CRD schema."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcray.errors import TemplateError, ValuesError
from hpcray import shipped
from hpcray.profile import HeadSpec, Profile, TolerationSpec, WorkerGroupSpec, whole_cpus_problem
from hpcray.state import QUIET_ENV

VIRTUAL_NODE_TOLERATION = {"key": "virtual-node.interlink/no-schedule", "operator": "Exists", "effect": "NoSchedule"}
PROFILE_LABEL = "hpcray.io/profile"
HOST_PATH_TYPES = ("Directory", "DirectoryOrCreate")  # the only hostPath types interLink's SLURM plugin binds
CREDENTIALS_VOLUME = "hpcray-mlflow"
CREDENTIALS_DIR = "/tmp/hpcray-mlflow"  # under /tmp: a fresh directory in the container with singularity --containall


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
    """sbatch flags of one pod. GPUs are `--gres` in either gpu_mode: interLink's SLURM plugin makes no sbatch flag
    of an nvidia.com/gpu limit (the limit only picks a site's GPU flavor)."""
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


def singularity_options(p: Profile, g: HeadSpec) -> list[str]:
    """The pod's singularity options: global, then the group's; with pod-vpn first `--env POD_IP=$POD_IP`.

    The plugin exports POD_IP in the batch script, but its default `--containall` starts the container with a clean
    environment, so `ray start --node-ip-address=$POD_IP` sees it only when passed in explicitly.
    """
    options = [*p.interlink.singularity.options, *g.singularity.options]
    if p.interlink.pod_vpn and not any("POD_IP=" in o for o in options):
        options.insert(0, "--env POD_IP=$POD_IP")
    return options


def toleration(t: TolerationSpec) -> dict[str, Any]:
    """A toleration in the pod spec's words, without the keys the profile leaves empty."""
    return {k: v for k, v in dataclasses.asdict(t).items() if v is not None}


def mlflow_env(p: Profile) -> list[dict[str, Any]]:
    """Environment of every Ray container: telemetry off, MLflow location, and credentials by reference to the
    Secret of the credential plan, when it has one (never a value)."""
    from hpcray.tracking import SECRET_KEYS, credential_plan

    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in QUIET_ENV.items()]
    if p.mlflow.tracking_uri:
        env.append({"name": "MLFLOW_TRACKING_URI", "value": p.mlflow.tracking_uri})
        env.append({"name": "MLFLOW_EXPERIMENT_NAME", "value": p.mlflow.experiment})
    plan = credential_plan(p)
    if plan.where == "secret" and plan.secret_as == "env":
        for var, key in SECRET_KEYS.items():
            env.append({"name": var, "valueFrom": {"secretKeyRef": {"name": plan.secret_name, "key": key}}})
    return env


TOKEN_KEY = "token"


def token_secret_name(cluster: str) -> str:
    """The Kubernetes Secret that holds a KubeRay cluster's Ray token (made by `up`, removed by `down`)."""
    return f"{cluster}-hpcray-ray-token"


def token_auth(p: Profile) -> bool:
    """Whether the cluster's pods run with Ray's token authentication: asked for, and the image's Ray has it (an
    image whose Ray version the profile does not say is taken to have it: an older Ray ignores the variables)."""
    from hpcray.jobs.api import has_token_auth

    return p.auth == "token" and (not p.image.ray_version or has_token_auth(p.image.ray_version))


def auth_warnings(p: Profile) -> list[str]:
    """Token authentication asked for where the image's Ray lacks it."""
    if p.auth == "token" and not token_auth(p):
        return [f"image.ray_version {p.image.ray_version} has no token authentication (Ray >= 2.52): the head's "
                "dashboard will take jobs from anyone who reaches it; use an image with Ray >= 2.52, or set auth: "
                "none to silence this"]
    return []


def auth_env(p: Profile) -> list[dict[str, Any]]:
    """RAY_AUTH_MODE=token and the token by reference to its Secret (never the value); none without token auth.
    KubeRay copies the Ray container's env into the workers' `wait-gcs-ready` init container, whose `ray
    health-check` needs the token too."""
    if not token_auth(p):
        return []
    ref = {"secretKeyRef": {"name": token_secret_name(p.name), "key": TOKEN_KEY}}
    return [{"name": "RAY_AUTH_MODE", "value": "token"}, {"name": "RAY_AUTH_TOKEN", "valueFrom": ref}]


def credentials_volume(p: Profile) -> tuple[dict[str, Any], dict[str, Any], str] | None:
    """With the credential plan's Secret read as a file: the Secret volume (mode 0400), its mount, and the shell
    line the Ray container runs before `ray start` (KubeRay runs the container's command, then `&& ray start`) to
    put the credentials into the environment of the Ray processes, which the jobs inherit. None otherwise."""
    from hpcray.tracking import SECRET_KEYS, credential_plan

    plan = credential_plan(p)
    if plan.where != "secret" or plan.secret_as != "file":
        return None
    volume = {"name": CREDENTIALS_VOLUME, "secret": {"secretName": plan.secret_name, "defaultMode": 0o400}}
    mount = {"name": CREDENTIALS_VOLUME, "mountPath": CREDENTIALS_DIR, "readOnly": True}
    reads = " && ".join(f"{var}=$(cat {CREDENTIALS_DIR}/{key})" for var, key in SECRET_KEYS.items())
    return volume, mount, f"{reads} && export {' '.join(SECRET_KEYS)} || exit 1"


def group_values(p: Profile, g: HeadSpec, role: str, name: str = "headgroup") -> dict[str, Any]:
    """Everything the template needs for one pod group, in the chart's vocabulary."""
    il = p.interlink
    params: dict[str, str] = {}
    if role == "head":
        params["dashboard-host"] = "0.0.0.0"
    if g.gpus:
        params["num-gpus"] = str(g.gpus)
    if il.enabled and il.pod_vpn:
        params["node-ip-address"] = "$POD_IP"
    params.update({k: str(v) for k, v in g.ray_start_params.items()})

    limits: dict[str, Any] = {}
    if g.cpu is not None:
        limits["cpu"] = g.cpu
    if g.memory is not None:
        limits["memory"] = g.memory
    requests = dict(limits)
    if g.gpus and (not il.enabled or il.gpu_mode == "resource"):
        limits["nvidia.com/gpu"] = g.gpus

    annotations: dict[str, str] = {}
    node_selector: dict[str, str] = {}
    tolerations: list[dict[str, Any]] = []
    env = mlflow_env(p) + auth_env(p)
    if il.enabled:
        annotations["slurm-job.vk.io/flags"] = slurm_flags(p, g)
        options = singularity_options(p, g)
        if options:
            annotations["slurm-job.vk.io/singularity-options"] = " ".join(options)
        binds = [*il.singularity.mounts, *g.singularity.mounts]
        if binds:
            annotations["slurm-job.vk.io/singularity-mounts"] = " ".join(f"--bind {m}" for m in binds)
        pre_exec = "\n".join(part for part in (il.vpn_bootstrap, il.pre_exec, g.pre_exec) if part)
        if pre_exec:
            annotations["slurm-job.vk.io/pre-exec"] = pre_exec
        if il.pod_vpn:
            annotations["interlink.eu/pod-vpn"] = "true"
        if il.nccl_interface and "NCCL_SOCKET_IFNAME" not in g.env:
            env.append({"name": "NCCL_SOCKET_IFNAME", "value": il.nccl_interface})
        node_selector[il.node_selector_key] = il.node or ""
        tolerations = [VIRTUAL_NODE_TOLERATION] + [toleration(t) for t in il.tolerations]

    volumes: list[dict[str, Any]] = [{"name": "log-volume", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": "log-volume", "mountPath": "/tmp/ray"}]
    for v in p.volumes:
        source = ({"hostPath": {"path": v.host_path, "type": v.host_path_type}} if v.host_path else
                  {"persistentVolumeClaim": {"claimName": v.pvc}})
        volumes.append({"name": v.name, **source})
        mounts.append({"name": v.name, "mountPath": v.mount_path, "readOnly": v.read_only})

    command: list[str] = []
    if (credentials := credentials_volume(p)) is not None:
        volumes.append(credentials[0])
        mounts.append(credentials[1])
        command = [credentials[2]]

    env += [{"name": k, "value": v} for k, v in g.env.items()]
    values: dict[str, Any] = {
        "command": command,
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


def network_warnings(p: Profile) -> list[str]:
    """Settings that render fine but leave Ray nodes without a network on the SLURM side."""
    il = p.interlink
    if il.enabled and il.pod_vpn and not il.vpn_bootstrap:
        return ["interlink.pod_vpn is on but nothing brings $POD_IP up on the compute node: the Ray head would "
                "advertise an address no interface has and workers would wait for it until the walltime ends; set "
                "interlink.vpn_bootstrap to the site's VPN pre-exec, or, where the virtual kubelet runs interLink's "
                "Network.FullMesh, set interlink.mesh: true and interlink.pod_vpn: false"]
    return []


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
    """What interLink's SLURM plugin needs of a pod bound for the virtual node, also after `values:` overrides:
    whole-CPU and memory limits, an absolute SIF path, and volumes it can bind."""
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
            try:
                problem = whole_cpus_problem(str(limits["cpu"]))
            except ValueError:
                problem = f"{limits['cpu']!r} is not a Kubernetes quantity; write e.g. 8"
            if problem:
                raise ValuesError(f"{label}: container {c.get('name')} cpu limit {problem}")
            if not str(c.get("image", "")).startswith("/"):
                raise ValuesError(f"{label}: image {c.get('image')!r} is not an absolute SIF path; set image.dir")
        for v in pod.get("volumes") or []:
            if "persistentVolumeClaim" in v:
                raise ValuesError(f"{label}: volume {v.get('name')} is a PVC, which interLink's SLURM plugin ignores "
                                  "while dropping every bind of the container (/tmp/ray included); use a hostPath "
                                  "on the SLURM side")
            if "hostPath" in v and v["hostPath"].get("type") not in HOST_PATH_TYPES:
                raise ValuesError(f"{label}: volume {v.get('name')} is a hostPath of type "
                                  f"{v['hostPath'].get('type')!r}; interLink's SLURM plugin fails the pod unless the "
                                  f"type is {' or '.join(HOST_PATH_TYPES)}")


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

    from hpcray import targets

    for warning in network_warnings(p) + auth_warnings(p):
        warn(f"hpcray: warning: {warning}")
    chart = targets.chart(p)
    try:
        h = helm.find_helm()
        manifest = helm.template(h, chart, targets.release(p), values_yaml)
    except (ToolMissing, ChartError) as exc:
        if required:
            raise
        warn(f"hpcray: warning: skipped the chart check ({exc})")
        return None
    raycluster = raycluster_of(manifest)
    schema = helm.raycluster_crd_schema(h, chart)
    if schema is None:
        warn(f"hpcray: warning: no RayCluster CRD for KubeRay {p.chart.version} found; types were not checked "
             "(set HPCRAY_CRD_DIR to a folder with ray.io_rayclusters-<version>.yaml)")
        check_interlink_pods(raycluster)
    else:
        validate_raycluster(raycluster, schema)
    return CheckedRelease(values_yaml, manifest, raycluster)
