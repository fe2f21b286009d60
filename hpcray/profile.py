"""The cluster profile: one YAML file per cluster, validated into typed dataclasses.

The dataclasses below are the schema: field types drive validation, field metadata (``doc``, ``example``) drives
``hpcray profile --schema`` and docs/profile.md. Every error names the file, the line and the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, Union

from hpcray import shipped
from hpcray.errors import ProfileError
from hpcray.waiting import parse_duration
from hpcray.walltime import parse_slurm_time

KUBERAY_REPO = "https://ray-project.github.io/kuberay-helm/"


def opt(default: Any = None, doc: str = "", example: Any = None, *, factory: Any = None) -> Any:
    meta = {"doc": doc, "example": example}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# ---------------------------------------------------------------------------------------------------------------
# The schema
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ChartSpec:
    """The KubeRay ray-cluster Helm chart the release is made from."""

    repo: str = opt(KUBERAY_REPO, "Helm repository URL of the chart.")
    name: str = opt("ray-cluster", "Chart name in the repository.")
    version: str = opt("1.2.2", "Chart version (KubeRay release).", "1.7.0")
    path: str | None = opt(None, "A local packaged chart (.tgz); when set, repo and name are not used.",
                           "/opt/charts/ray-cluster-1.2.2.tgz")


@dataclass
class ImageSpec:
    """The Ray image. On Kubernetes through interLink it is a Singularity (SIF) file on the SLURM side."""

    dir: str | None = opt(None, "Absolute directory of the SIF file on the SLURM machine.",
                          "/ceph/hpc/data/st2301-itwin-users/${USER}")
    name: str = opt("ray", "Image name; the file is `<dir>/<name>:<tag>`.", "hython")
    tag: str = opt("sif", "Image tag; the chart renders `image: <dir>/<name>:<tag>`.")
    source: str | None = opt(None, "Where `hpcray pull` gets the image from.",
                             "docker://ghcr.io/intertwin-eu/hython-itwinai-plugin:latest")
    pull_policy: Literal["IfNotPresent", "Always", "Never"] = opt("IfNotPresent", "Kubernetes imagePullPolicy.")
    ray_version: str | None = opt(None, "Ray version inside the image, checked against the client's Ray.", "2.60.0")

    @property
    def sif_path(self) -> str:
        return f"{(self.dir or '').rstrip('/')}/{self.name}:{self.tag}"


@dataclass
class VolumeSpec:
    """A data directory mounted into every Ray container: a path on the node (hostPath) or a PVC."""

    name: str = opt(None, "Volume name (a DNS label).", "data")
    mount_path: str = opt(None, "Where the volume appears in the containers.", "/data")
    host_path: str | None = opt(None, "A directory on the node; with interLink, on the SLURM side (a network share).",
                                "/ceph/hpc/data")
    host_path_type: Literal["Directory", "DirectoryOrCreate"] = opt(
        "Directory", "hostPath type: the directory must exist, or is created (interLink's SLURM plugin binds only "
                     "these two types and fails the pod on any other).")
    pvc: str | None = opt(None, "A PersistentVolumeClaim name; not with interLink, whose SLURM plugin ignores PVCs and "
                                "then drops every bind of the container.", "training-data")
    read_only: bool = opt(False, "Mount read-only.")


@dataclass
class SingularitySpec:
    """How interLink's SLURM plugin runs the container: `singularity exec <site defaults> <mounts> <options> …`."""

    options: list[str] = opt(doc="singularity options (`slurm-job.vk.io/singularity-options`); with pod_vpn hpcray "
                                 "adds `--env POD_IP=$POD_IP`.",
                             example=["--no-home", "--compat", "--no-mount /exa5"], factory=list)
    mounts: list[str] = opt(doc="Bind mounts `SRC[:DST[:ro]]`, each a `--bind` "
                                "(`slurm-job.vk.io/singularity-mounts`).",
                            example=["/ceph"], factory=list)


@dataclass
class HeadSpec:
    """The Ray head pod."""

    cpu: str | None = opt(None, "CPU limit and request (Kubernetes quantity); with interLink a whole number, which "
                                "the SLURM plugin makes `--cpus-per-task`.", "8")
    memory: str | None = opt(None, "Memory limit and request (Kubernetes quantity).", "32G")
    gpus: int = opt(0, "GPUs: Ray num-gpus, plus `--gres=gpu:N` with interLink (see interlink.gpu_mode) or the "
                       "nvidia.com/gpu limit without.", 1)
    ray_start_params: dict[str, str] = opt(doc="Extra `ray start` parameters.", example={"num-cpus": "8"},
                                           factory=dict)
    env: dict[str, str] = opt(doc="Extra environment variables of the Ray container.",
                              example={"HYDRA_FULL_ERROR": "1"}, factory=dict)
    slurm_flags: list[str] = opt(doc="Extra sbatch flags for this pod only.", example=["--exclusive"],
                                 factory=list)
    singularity: SingularitySpec = opt(doc="Singularity options and mounts for this pod only, after "
                                           "interlink.singularity's.", factory=SingularitySpec)
    pre_exec: str | None = opt(None, "Shell run before this pod's container, after interlink.vpn_bootstrap and "
                                     "interlink.pre_exec.", "nvidia-smi")


@dataclass
class WorkerGroupSpec(HeadSpec):
    """A group of identical Ray worker pods."""

    replicas: int = opt(1, "Number of worker pods.", 2)
    min_replicas: int | None = opt(None, "Autoscaler lower bound (default: replicas).")
    max_replicas: int | None = opt(None, "Autoscaler upper bound (default: replicas).")


@dataclass
class SlurmSpec:
    """sbatch flags interLink's SLURM plugin puts in each pod's batch script (`slurm-job.vk.io/flags`)."""

    partition: str | None = opt(None, "SLURM partition (-p).", "gpu")
    time: str | None = opt(None, "Wall-time limit (--time), in any SLURM format: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S "
                                 "or UNLIMITED. hpcray counts each pod's allocation end from it.", "04:00:00")
    stop_margin: str = opt("5m", "While following a job, hpcray stops it gracefully (SIGTERM through the Jobs API, as "
                                 "`ray job stop`) this long before its cluster's allocation ends, so it can checkpoint "
                                 "and flush MLflow.", "10m")
    account: str | None = opt(None, "Account to charge (--account).", "s24r05-03-users")
    qos: str | None = opt(None, "Quality of service (--qos).")
    extra_flags: list[str] = opt(doc="Any other sbatch flags; CPUs and memory come from the pod limits.",
                                 example=["--nodes=1"], factory=list)


@dataclass
class TolerationSpec:
    """A Kubernetes toleration, with the keys of a pod spec."""

    key: str | None = opt(None, "Taint key; empty with operator Exists tolerates every taint.",
                          "node.kubernetes.io/unreachable")
    operator: Literal["Equal", "Exists"] = opt("Equal", "Equal matches key and value; Exists matches the key.")
    value: str | None = opt(None, "Taint value (with operator Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = opt(
        None, "Taint effect to tolerate (empty: all).", "NoExecute")
    tolerationSeconds: int | None = opt(None, "With effect NoExecute: seconds the pod stays bound once the taint "
                                              "appears (empty: forever).", 300)


@dataclass
class InterlinkSpec:
    """Offload of the Ray pods to a SLURM machine through interLink's virtual kubelet."""

    enabled: bool = opt(False, "Schedule the Ray pods on the interLink virtual node.")
    node: str | None = opt(None, "Name of the virtual node.", "vega-virtual-node")
    node_selector_key: str = opt("kubernetes.io/hostname", "Label that selects the virtual node.")
    tolerations: list[TolerationSpec] = opt(
        doc="Tolerations besides `virtual-node.interlink/no-schedule`, which is always added.",
        example=[{"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
                  "tolerationSeconds": 300}], factory=list)
    gpu_mode: Literal["gres", "resource"] = opt(
        "gres", "How pods ask for GPUs: `gres` only `--gres=gpu:N` in the sbatch flags (a virtual node that "
                "advertises no nvidia.com/gpu, the default, would leave a pod with a GPU limit Pending forever); "
                "`resource` also the nvidia.com/gpu limit, for a virtual node that advertises GPUs.")
    slurm: SlurmSpec = opt(doc="sbatch flags.", factory=SlurmSpec)
    singularity: SingularitySpec = opt(doc="Singularity options and mounts of every pod (a group's own come after).",
                                       factory=SingularitySpec)
    pre_exec: str | None = opt(None, "Shell run in every pod's batch script before the container "
                                     "(`slurm-job.vk.io/pre-exec`), after vpn_bootstrap.", "module load CUDA")
    pod_vpn: bool = opt(True, "Give each pod an address from the virtual node's PodCIDR (`interlink.eu/pod-vpn`): "
                              "the plugin exports it as $POD_IP, hpcray passes it into the container and Ray "
                              "advertises it (node-ip-address). Needs vpn_bootstrap to put it on an interface.")
    vpn_bootstrap: str | None = opt(None, "With pod_vpn: the site's shell lines that bring $POD_IP up on the compute "
                                          "node (e.g. the tutorial's slirp + WireGuard), first in the pre-exec.",
                                    "${VEGA_VPN_BOOTSTRAP}")
    mesh: bool = opt(False, "The virtual kubelet runs interLink's Network.FullMesh, which puts its own WireGuard "
                            "bootstrap first in the pre-exec of pods without pod_vpn (set pod_vpn: false).")
    nccl_interface: str | None = opt(None, "Network interface NCCL uses between pods (NCCL_SOCKET_IFNAME in every "
                                           "container), e.g. the VPN's.", "br0")


@dataclass
class MlflowSpec:
    """Where jobs log, and where their credentials come from (never the credentials themselves)."""

    tracking_uri: str | None = opt(None, "MLflow tracking server (or sqlite:/// store for local runs); no "
                                         "`user:password@` in it, credentials come from mlflow.credentials.",
                                   "https://mlflow.intertwin.fedcloud.eu")
    experiment: str = opt("hpcray", "Experiment the jobs log to.", "hython-hpo")
    credentials: Literal["env", "file", "stdin", "none"] = opt(
        "env", "Where the username/password come from: MLFLOW_TRACKING_USERNAME/PASSWORD, a 0600 file, or stdin.")
    credentials_file: str | None = opt(None, "File with `username=` and `password=` lines (mode 0600).",
                                       "~/.config/hpcray/mlflow.cred")
    deliver: Literal["secret", "secret_file", "secret_env", "runtime_env"] = opt(
        "secret", "How credentials reach Ray processes. `secret`: a Kubernetes Secret (kuberay; the local head's "
                  "environment with backend local), read as a 0400 file on interLink (its plugin writes env "
                  "values into a 0644 file and its debug log) and as variables elsewhere; `secret_file` / "
                  "`secret_env` force either way; `runtime_env` (opt-in, readable by anyone who reaches the "
                  "dashboard): the job's runtime_env.")


@dataclass
class ItwinaiSpec:
    """An itwinai pipeline run: `itwinai exec-pipeline --config-name NAME +pipe_key=KEY`."""

    config_name: str = opt("config", "Hydra config name.", "config")
    config_path: str | None = opt(None, "Hydra config directory (--config-path).", ".")
    pipe_key: str = opt("training", "Pipeline key in the config.", "hpo")
    overrides: list[str] = opt(doc="Extra Hydra overrides.", example=["epochs=5"], factory=list)


@dataclass
class JobSpec:
    """A named job (`hpcray submit training`)."""

    entrypoint: str | None = opt(None, "Shell command run on the head (exclusive with itwinai).",
                                 "python train.py --epochs 20")
    itwinai: ItwinaiSpec | None = opt(None, "Build the entrypoint for an itwinai pipeline.")
    working_dir: str | None = opt(None, "Directory uploaded with the job (relative to the profile file).",
                                  "../../examples")
    requirements: str | None = opt(None, "pip requirements file installed for the job.", "requirements.txt")
    pip: list[str] = opt(doc="pip packages installed for the job.", example=["scikit-learn"], factory=list)
    wheels: list[str] = opt(doc="Wheel files shipped in the working dir and installed for the job.",
                            example=["dist/mypkg-0.1-py3-none-any.whl"], factory=list)
    env: dict[str, str] = opt(doc="Environment variables of the job (not for secrets).", example={"EPOCHS": "5"},
                              factory=dict)
    num_cpus: float | None = opt(None, "CPUs reserved for the entrypoint.")
    num_gpus: float | None = opt(None, "GPUs reserved for the entrypoint.", 1)
    runtime_env: dict[str, Any] = opt(doc="Any other Ray runtime_env fields.", example={"excludes": ["*.ckpt"]},
                                      factory=dict)
    max_runtime: str | None = opt(None, "How long the job may run (90s, 30m, 6h); `submit`/`run` warn when it won't fit "
                                        "the cluster's allocation left (`--must-fit` refuses).", "2h")
    resume: bool = opt(False, "`hpcray run`: when the cluster ends under the job (SLURM's walltime, the head gone), "
                              "bring it up again and submit the job again with HPCRAY_RESUME_NAME (the same on every "
                              "attempt) and HPCRAY_MLFLOW_PARENT_RUN_ID (the run the first attempt announced with "
                              "`MLFLOW_RUN_ID=`) so that it continues where it stopped.")
    max_attempts: int = opt(3, "With resume: attempts in all, the first included.", 5)


@dataclass
class KubernetesSpec:
    """Where the release goes."""

    context: str | None = opt(None, "kube context (default: the kubeconfig's current one).", "grnet")
    namespace: str = opt("default", "Namespace of the release.", "ray-${USER}")
    kubeconfig: str | None = opt(None, "kubeconfig file (default: $KUBECONFIG or ~/.kube/config).")
    relay_image: str = opt("docker.io/alpine/socat:1.8.0.1",
                           "Image of the relay pod (`access: relay`): runs `socat` on a regular node, forwarding "
                           "its port 8265 to the head's Service; a mirror of it where the cluster cannot pull from "
                           "Docker Hub.", "registry.example.org/mirror/socat:1.8.0.1")


@dataclass
class LocalSpec:
    """The embedded default: a Ray head on this machine."""

    num_cpus: int | None = opt(None, "CPUs Ray may use (default: all).", 2)
    num_gpus: int | None = opt(None, "GPUs Ray may use (default: detected).", 1)
    mlflow_server: bool = opt(False, "Start a local `mlflow server` with the cluster and log there.")
    dashboard_port: int = opt(0, "Dashboard port (0: a free one).")


@dataclass
class Profile:
    """One Ray cluster and the jobs run on it."""

    name: str = opt(None, "Cluster name: the Helm release name, or the local head's name.", "hython")
    backend: Literal["kuberay", "local"] = opt("kuberay", "Where the cluster lives.")
    kubernetes: KubernetesSpec = opt(doc="Kubernetes placement.", factory=KubernetesSpec)
    chart: ChartSpec = opt(doc="The KubeRay chart.", factory=ChartSpec)
    image: ImageSpec = opt(doc="The Ray image (a SIF file on HPC).", factory=ImageSpec)
    head: HeadSpec = opt(doc="The Ray head.", factory=HeadSpec)
    workers: dict[str, WorkerGroupSpec] = opt(doc="Worker groups by name.",
                                              example={"gpu": {"replicas": 2, "gpus": 1}}, factory=dict)
    volumes: list[VolumeSpec] = opt(doc="Data volumes mounted in every Ray container.", factory=list)
    interlink: InterlinkSpec = opt(doc="interLink offload to SLURM.", factory=InterlinkSpec)
    mlflow: MlflowSpec = opt(doc="MLflow tracking.", factory=MlflowSpec)
    jobs: dict[str, JobSpec] = opt(doc="Named jobs.", factory=dict)
    local: LocalSpec = opt(doc="Local backend settings.", factory=LocalSpec)
    template: str | None = opt(None, "Jinja template of the Helm values (relative to the profile file).",
                               "my-values.yaml.j2")
    values: dict[str, Any] = opt(doc="Raw Helm values merged over the rendered ones (escape hatch).",
                                 example={"service": {"type": "NodePort"}}, factory=dict)
    access: str = opt("auto", "How hpcray reaches the cluster's Jobs API (dashboard): `auto` (a port-forward to the "
                              "head pod where its node has a real kubelet, the API server's service proxy where it is "
                              "an interLink virtual node, whose kubelet refuses port-forward), `port-forward`, "
                              "`service-proxy`, `relay` (a small pod on a regular node forwarding to the head's "
                              "Service, made and removed with the release) or an http(s) URL (an Ingress of the "
                              "dashboard). The local backend takes `auto` or a URL. `--access` overrides it.",
                      "service-proxy")
    auth: Literal["token", "none"] = opt(
        "token", "Ray's token authentication of the head (Ray >= 2.52): `token` makes a random token per cluster "
                 "(kuberay: in Secret `<name>-hpcray-ray-token`, read by the pods as RAY_AUTH_TOKEN; local: a 0600 "
                 "file beside the head's state) and hpcray sends it with every Jobs API call; a request without it "
                 "gets 401. With an older Ray (image.ray_version, or the local client's) hpcray warns and runs "
                 "without. `none`: no token; anyone who reaches the dashboard can run code on the cluster.")
    ttl: str | None = opt(None, "Default lifetime of a cluster; `hpcray gc` removes expired ones.", "6h")
    timeout: str = opt("2h", "How long `up` waits for the cluster to be ready (HPC queues are slow).", "30m")
    archive_timeout: str = opt("60s", "How long `down` (and `run`'s teardown) may spend saving each job's logs, "
                                      "details and results (HPCRAY_RESULTS_DIR) before the cluster goes; past it, a "
                                      "warning, and the teardown goes on. `down --no-archive` skips it.", "2m")

    # Where the profile came from, and the line of each dotted key in it; not YAML keys.
    source: Path = field(default=Path("<profile>"), metadata={"internal": True})
    key_lines: dict[str, int] = field(default_factory=dict, metadata={"internal": True}, repr=False)

    @property
    def release(self) -> str:
        return self.name

    @property
    def raycluster_name(self) -> str:
        """The RayCluster the chart creates: the release name plus the chart's default nameOverride."""
        return self.name if "kuberay" in self.name else f"{self.name}-kuberay"

    def resolve_path(self, value: str) -> Path:
        """A path from the profile, relative to the profile file's directory."""
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else (self.source.parent / p).resolve()


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


class _LineMap(dict):  # type: ignore[type-arg]
    """A mapping that remembers the line of each key in the YAML file."""

    lines: dict[str, int]


def _yaml_loader() -> type:
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def construct_mapping(loader: Any, node: Any) -> _LineMap:
        loader.flatten_mapping(node)
        result = _LineMap()
        result.lines = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if key in result:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            result[key] = loader.construct_object(value_node, deep=True)
            result.lines[str(key)] = key_node.start_mark.line + 1
        return result

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return Loader


# ---------------------------------------------------------------------------------------------------------------
# Finding profiles: a path, or a name looked up in $HPCRAY_PROFILE_PATH, ./, the user's dir, the shipped examples
# ---------------------------------------------------------------------------------------------------------------

_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class ProfileDir:
    path: Path
    origin: str  # "env path", "cwd", "user dir" or "shipped"


@dataclass(frozen=True)
class FoundProfile:
    name: str
    path: Path
    origin: str
    shadowed_by: Path | None  # the earlier profile of the same name that `-p NAME` picks instead


def user_profile_dir() -> Path:
    """$XDG_CONFIG_HOME/hpcray/profiles (default ~/.config/hpcray/profiles): the user's own profiles."""
    config = os.environ.get("XDG_CONFIG_HOME")
    base = Path(config) if config and os.path.isabs(config) else Path.home() / ".config"  # XDG: ignore relative
    return base / "hpcray" / "profiles"


def profile_dirs() -> list[ProfileDir]:
    """Where a profile name is looked up, first match wins; a directory named twice counts once."""
    dirs = [ProfileDir(Path(d).expanduser(), "env path")
            for d in os.environ.get("HPCRAY_PROFILE_PATH", "").split(os.pathsep) if d]
    dirs += [ProfileDir(Path.cwd(), "cwd"), ProfileDir(user_profile_dir(), "user dir"),
             ProfileDir(shipped.path("profiles"), "shipped")]
    seen: set[Path] = set()
    unique = []
    for d in dirs:
        key = d.path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(d)
    return unique


def list_profiles() -> list[FoundProfile]:
    """Every profile reachable by name, in lookup order; one whose name an earlier one has is shadowed."""
    found: list[FoundProfile] = []
    first: dict[str, Path] = {}
    for d in profile_dirs():
        try:
            files = sorted(f for f in d.path.iterdir() if f.suffix in _SUFFIXES and not f.name.startswith("."))
        except OSError:  # a directory that does not exist (yet) holds no profiles
            continue
        for f in files:
            if f.is_file():
                found.append(FoundProfile(f.stem, f, d.origin, first.get(f.stem)))
                first.setdefault(f.stem, f)
    return found


def is_path_ref(ref: str) -> bool:
    """A profile reference with a '/' or a .yaml/.yml suffix is a file path; anything else is a name."""
    return "/" in ref or os.sep in ref or Path(ref).suffix in _SUFFIXES


def resolve_profile_path(ref: str | os.PathLike[str] | None) -> Path:
    """A profile given as a path, or as a name found in profile_dirs() (`local`, `vega`, `hpcray init` ones)."""
    text = str(ref if ref is not None else os.environ.get("HPCRAY_PROFILE") or "local")
    if is_path_ref(text):
        path = Path(os.path.expanduser(text))
        if not path.is_file():
            raise ProfileError(text, "", "no such profile file; pass a path to a YAML profile or a profile name "
                                         "(`hpcray profile --list`)")
        return path
    dirs = profile_dirs()
    for d in dirs:
        for suffix in _SUFFIXES:
            if (d.path / f"{text}{suffix}").is_file():
                return d.path / f"{text}{suffix}"
    known = sorted({f.name for f in list_profiles()})
    hint = difflib.get_close_matches(text, known, n=1)
    did = f"did you mean '{hint[0]}'? " if hint else ""
    looked = ", ".join(f"{d.path} ({d.origin})" for d in dirs)
    raise ProfileError(text, "", f"no such profile; {did}known profiles: {', '.join(known) or 'none'}; looked in "
                                 f"{looked}; pass a path, or make one with `hpcray init {text}`")


def profile_ref(source: Path) -> str:
    """The shortest `--profile` value that picks this file: its name when the name lookup finds it, else its path."""
    try:
        if resolve_profile_path(source.stem).resolve() == source.resolve():
            return source.stem
    except ProfileError:
        pass
    return str(source)


@dataclass(frozen=True)
class MadeProfile:
    path: Path
    source: Path
    notes: list[str]


_NAME_LINE = re.compile(r"^name:[ \t]*[^#\n]*?(?P<comment>[ \t]+#[^\n]*)?$", re.M)


def init_profile(name: str, source_ref: str) -> MadeProfile:
    """Copy profile `source_ref` (comments kept, `name:` set to `name`) to NAME.yaml in the user's profile dir.
    Refuses a bad name, an invalid source or an existing file before anything is written."""
    import yaml

    if not _DNS_LABEL.match(name) or len(name) > 40:
        fix = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "mysite"
        raise ProfileError(name, "", f"not a profile name: it must be a lowercase DNS label of at most 40 characters "
                                     f"(a-z, 0-9, '-'), because it names the Helm release; e.g. {fix}")
    dest = user_profile_dir() / f"{name}.yaml"
    for existing in (dest, dest.with_suffix(".yml")):
        if existing.exists():
            raise ProfileError(str(existing), "", "already exists and is never overwritten; edit it, or remove it "
                                                  f"and run `hpcray init {name}` again, or choose another name")
    src = resolve_profile_path(source_ref)
    p = load_profile(src)  # a copy of a broken profile would only fail later
    original = src.read_text(encoding="utf-8")
    text, count = _NAME_LINE.subn(lambda m: f"name: {name}{m.group('comment') or ''}", original, count=1)
    if count != 1 or (yaml.safe_load(text) or {}).get("name") != name:
        raise ProfileError(str(src), "name", f"cannot set the name in this file's layout; copy it to {dest} by hand "
                                             "and set name there")
    header = f"# Made by `hpcray init {name} --from {source_ref}` from {src}; every key: `hpcray profile --schema`\n"
    notes = []
    if src.parent.resolve() != dest.parent.resolve():
        moved = [f"{key}: {value}" for key, value in _relative_paths(p)]
        if moved:
            notes.append(f"{dest} keeps relative paths that now start from {dest.parent} ({'; '.join(moved)}); "
                         "make them absolute there")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(dest, "x", encoding="utf-8") as fh:  # "x": a file made meanwhile is not overwritten either
            fh.write(header + text)
    except FileExistsError:
        raise ProfileError(str(dest), "", "already exists and is never overwritten; edit it, or choose another "
                                          "name") from None
    return MadeProfile(dest, src, notes)


def _relative_paths(p: Profile) -> list[tuple[str, str]]:
    """The profile's paths that are relative to its file (see Profile.resolve_path)."""
    paths = [("template", p.template), ("chart.path", p.chart.path),
             ("kubernetes.kubeconfig", p.kubernetes.kubeconfig), ("mlflow.credentials_file", p.mlflow.credentials_file)]
    for job_name, job in p.jobs.items():
        key = f"jobs.{job_name}"
        paths += [(f"{key}.working_dir", job.working_dir), (f"{key}.requirements", job.requirements)]
        paths += [(f"{key}.wheels", w) for w in job.wheels]
    return [(key, value) for key, value in paths
            if value and "://" not in value and not os.path.isabs(os.path.expanduser(value))]


def builtin_variables() -> dict[str, str]:
    """`${NAME}` references every profile may use besides the environment's."""
    return {"HPCRAY_EXAMPLES": str(shipped.path("examples"))}


def load_profile(ref: str | os.PathLike[str] | None, env: dict[str, str] | None = None) -> Profile:
    """Read, expand `${VAR}` references in, and validate a profile. Raises ProfileError naming file:line: key."""
    import yaml

    path = resolve_profile_path(ref)
    shown = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ProfileError(shown, "", f"cannot read it: {exc.strerror}; check the path and its permissions") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ProfileError(f"{shown}:{line}", "", f"not UTF-8 text (byte 0x{raw[exc.start]:02x}); a profile is a "
                                                  "YAML file: save it as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{shown}:{mark.line + 1}:{mark.column + 1}" if mark else shown
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ProfileError(where, "", f"malformed YAML: {problem}; fix the syntax there") from None
    if not isinstance(data, dict):
        raise ProfileError(shown, "", "a profile is a YAML mapping of keys (name, backend, head, …)")
    converter = _Converter(shown, {**(os.environ if env is None else env), **builtin_variables()})
    profile = converter.build(Profile, data, "")
    profile.source = path.resolve()
    profile.key_lines = converter.lines
    check_profile(profile)
    if profile.backend == "local" and not profile.mlflow.tracking_uri and not profile.local.mlflow_server:
        from hpcray.state import state_root

        profile.mlflow.tracking_uri = f"sqlite:///{state_root() / profile.name / 'mlflow.db'}"
    return profile


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_URL_PASSWORD = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)([^/?#@\s:]*):([^/?#@\s]*)@")


class _Converter:
    """Turns parsed YAML into the dataclasses, raising ProfileError with file:line: key on the first problem."""

    def __init__(self, file: str, env: typing.Mapping[str, str]) -> None:
        self.file, self.env = file, env
        self.lines: dict[str, int] = {}

    def fail(self, key: str, problem: str) -> typing.NoReturn:
        line = self.lines.get(key)
        raise ProfileError(f"{self.file}:{line}" if line else self.file, key or "(top level)", problem)

    def build(self, cls: type, data: Any, path: str) -> Any:
        if not isinstance(data, dict):
            self.fail(path, f"expected a mapping of {cls.__name__} keys, got {_kind(data)}")
        hints = typing.get_type_hints(cls)
        known = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
        for key in data:
            self.lines[_join(path, str(key))] = getattr(data, "lines", {}).get(str(key), 0)
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            key_path = _join(path, str(key))
            if key not in known:
                close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
                hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(known)}"
                self.fail(key_path, f"unknown key; {hint}")
            kwargs[key] = self.convert(value, hints[key], key_path)
        for name, f in known.items():
            if name not in kwargs and f.default is None and f.default_factory is dataclasses.MISSING \
                    and not _optional(hints[name]):
                self.fail(_join(path, name), f"required: {f.metadata.get('doc', '')} e.g. "
                                             f"{name}: {f.metadata.get('example')!r}")
        return cls(**kwargs)

    def convert(self, value: Any, tp: Any, path: str) -> Any:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin in (Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            inner = [a for a in args if a is not type(None)]
            return self.convert(value, inner[0], path) if len(inner) == 1 else value
        if value is None:
            self.fail(path, f"has no value; give {_describe(tp)} or remove the key")
        if origin is Literal:
            if value not in args:
                close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                self.fail(path, f"{value!r} is not one of {', '.join(map(str, args))}{hint}")
            return value
        if dataclasses.is_dataclass(tp):
            return self.build(tp, value, path)
        if origin is list:
            if not isinstance(value, list):
                self.fail(path, f"expected a list of {_describe(args[0])}, got {_kind(value)}")
            return [self.convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
        if origin is dict:
            if not isinstance(value, dict):
                self.fail(path, f"expected a mapping, got {_kind(value)}")
            for k in value:
                self.lines[_join(path, str(k))] = getattr(value, "lines", {}).get(str(k), 0)
            return {str(k): self.convert(v, args[1], _join(path, str(k))) for k, v in value.items()}
        if tp is Any:
            return self.expand_all(value, path)
        if tp is bool:
            if not isinstance(value, bool):
                self.fail(path, f"expected true or false, got {_kind(value)}")
            return value
        if tp is int:
            if isinstance(value, bool) or not isinstance(value, int):
                self.fail(path, f"expected a whole number, got {_kind(value)}")
            return value
        if tp is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                self.fail(path, f"expected a number, got {_kind(value)}")
            return float(value)
        if tp is str:
            if isinstance(value, (dict, list)) or isinstance(value, bool):
                self.fail(path, f"expected a string, got {_kind(value)}")
            return self.expand(str(value), path)
        raise TypeError(f"profile schema uses an unsupported type {tp!r}")  # a bug in this module, not user input

    def expand(self, text: str, path: str) -> str:
        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in self.env and self.env[name] != "":
                return self.env[name]
            if default is not None:
                return default
            self.fail(path, f"${{{name}}} is not set; export {name}=… or write the value (or ${{{name}:-default}})")

        expanded = _ENV_REF.sub(sub, text)
        for m in _URL_PASSWORD.finditer(expanded):
            if m.group(3) and not m.group(3).startswith("$"):  # a `$VAR` is left to the shell that runs it
                shown = f"{m.group(1)}{m.group(2)}:***@…"
                fix = ("give the username and password through mlflow.credentials (e.g. export "
                       "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)" if path == "mlflow.tracking_uri" else
                       "keep credentials out of the profile (MLflow's go through mlflow.credentials)")
                self.fail(path, f"the URL '{shown}' carries a password, which would land in the rendered values "
                                f"and job specs; remove 'user:password@' from it and {fix}")
        return expanded

    def expand_all(self, value: Any, path: str) -> Any:
        if isinstance(value, str):
            return self.expand(value, path)
        if isinstance(value, list):
            return [self.expand_all(v, path) for v in value]
        if isinstance(value, dict):
            return {k: self.expand_all(v, path) for k, v in value.items()}
        return value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list"}
    if isinstance(value, dict):
        return "a mapping"
    return f"{names.get(type(value), type(value).__name__)} ({value!r})" if not isinstance(value, list) else "a list"


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin is list:
        return f"a list of {_describe(args[0])}"
    if origin is dict:
        return f"a mapping of {_describe(args[1])}"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return {str: "a string", int: "a whole number", float: "a number", bool: "true/false"}.get(tp, "a value")


# ---------------------------------------------------------------------------------------------------------------
# Checks that span keys (the chart has no values.schema.json, so helm would accept all of these silently)
# ---------------------------------------------------------------------------------------------------------------

_QUANTITY = re.compile(r"^([0-9]+(\.[0-9]+)?|\.[0-9]+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_SLURM_RESOURCE_FLAGS = ("--cpus-per-task", "-c", "--mem", "--mem-per-cpu", "--mem-per-gpu")


_QUANTITY_SCALE = {"": 1, "m": Decimal("0.001"), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
                   "E": 10**18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def quantity(text: str) -> Decimal:
    """The value of a Kubernetes quantity ('500m' → 0.5, '2Gi' → 2147483648); ValueError if it is none."""
    m = _QUANTITY.match(text)
    if not m:
        raise ValueError(text)
    return Decimal(m.group(1)) * _QUANTITY_SCALE[m.group(3) or ""]


def whole_cpus_problem(cpu: str) -> str | None:
    """Why interLink's SLURM plugin would not give a pod exactly this CPU limit, or None when it would.

    The plugin writes `--cpus-per-task=ceil(limit)` (the largest over the pod's containers), so a fraction is
    rounded up and anything below one CPU becomes a whole CPU the profile did not ask for.
    """
    value = quantity(cpu)
    if value == value.to_integral_value() and value >= 1:
        return None
    up = math.ceil(value)
    if value < 1:
        return (f"{cpu!r} is less than one CPU; interLink's SLURM plugin gives a job whole CPUs "
                f"(--cpus-per-task={max(up, 1)}): write 1 or more")
    return (f"{cpu!r} is not a whole number of CPUs; interLink's SLURM plugin rounds it up to "
            f"--cpus-per-task={up}: write {up} (or {up - 1})")


ACCESS_MODES = ("auto", "port-forward", "service-proxy", "relay")


def access_problem(value: str, backend: str) -> str | None:
    """Why `value` is no way to a `backend` cluster's Jobs API, or None when it is one (profile key and --access)."""
    if value.startswith(("http://", "https://")):
        return None if len(value.split("://", 1)[1].strip("/")) else f"{value!r} has no host; give e.g. " \
                                                                      "https://ray.example.org"
    if value not in ACCESS_MODES:
        return f"{value!r} is not one of {', '.join(ACCESS_MODES)} or an http(s):// URL"
    if backend == "local" and value != "auto":
        return (f"{value!r} is for a cluster on Kubernetes; the local backend's head is on this machine: use auto "
                "(or the dashboard's URL)")
    return None


def check_profile(p: Profile) -> None:
    def fail(key: str, problem: str) -> typing.NoReturn:
        line = p.key_lines.get(key) or p.key_lines.get(key.split("[")[0])
        raise ProfileError(f"{p.source}:{line}" if line else str(p.source), key, problem)

    if not _DNS_LABEL.match(p.name) or len(p.name) > 40:
        fail("name", f"{p.name!r} must be a lowercase DNS label of at most 40 characters (a-z, 0-9, '-'), "
                     "because it names the Helm release and its pods")
    for key, value in (("ttl", p.ttl), ("timeout", p.timeout), ("archive_timeout", p.archive_timeout),
                       ("interlink.slurm.stop_margin", p.interlink.slurm.stop_margin)):
        if value is not None:
            try:
                parse_duration(value)
            except ValueError as exc:
                fail(key, str(exc))
    if problem := access_problem(p.access, p.backend):
        fail("access", problem)
    if p.chart.path:
        chart = p.resolve_path(p.chart.path)
        if not chart.is_file():
            fail("chart.path", f"{chart} does not exist; point it at a packaged chart (.tgz) or remove it to "
                               f"fetch {p.chart.name} {p.chart.version} from {p.chart.repo}")
    if not re.match(r"^\d+\.\d+\.\d+", p.chart.version):
        fail("chart.version", f"{p.chart.version!r} is not a chart version like 1.2.2")
    groups: list[tuple[str, HeadSpec]] = [("head", p.head)] + [(f"workers.{n}", w) for n, w in p.workers.items()]
    for name in p.workers:
        if not _DNS_LABEL.match(name):
            fail(f"workers.{name}", "a worker group name must be a lowercase DNS label (a-z, 0-9, '-')")
    for key, g in groups:
        if g.gpus < 0:
            fail(f"{key}.gpus", f"{g.gpus} GPUs is negative; use 0 for a CPU-only pod")
        for res in ("cpu", "memory"):
            value = getattr(g, res)
            if value is not None and not _QUANTITY.match(value):
                fail(f"{key}.{res}", f"{value!r} is not a Kubernetes quantity; write e.g. "
                                     f"{'8 or 500m' if res == 'cpu' else '32G or 16Gi'}")
            if value is not None and quantity(value) == 0:
                fail(f"{key}.{res}", f"{value!r} gives the pod no {'CPU' if res == 'cpu' else 'memory'} to run Ray "
                                     f"on; write e.g. {'1 or 500m' if res == 'cpu' else '4G'}")
        if isinstance(g, WorkerGroupSpec):
            if g.replicas < 0:
                fail(f"{key}.replicas", f"{g.replicas} is negative; use 0 to keep the group empty")
            lo = g.replicas if g.min_replicas is None else g.min_replicas
            hi = g.replicas if g.max_replicas is None else g.max_replicas
            if not lo <= g.replicas <= hi:
                fail(f"{key}.replicas", f"{g.replicas} is outside min_replicas..max_replicas ({lo}..{hi})")
        if "num-gpus" in g.ray_start_params and g.gpus:
            fail(f"{key}.ray_start_params.num-gpus", f"set by {key}.gpus; remove it from ray_start_params")
    for i, v in enumerate(p.volumes):
        if (v.host_path is None) == (v.pvc is None):
            fail(f"volumes[{i}]", "give exactly one of host_path or pvc")
        if not v.mount_path.startswith("/"):
            fail(f"volumes[{i}].mount_path", f"{v.mount_path!r} must be an absolute path")
        if not _DNS_LABEL.match(v.name):
            fail(f"volumes[{i}].name", f"{v.name!r} must be a lowercase DNS label")
    for name, job in p.jobs.items():
        if (job.entrypoint is None) == (job.itwinai is None):
            fail(f"jobs.{name}", "give exactly one of entrypoint or itwinai")
        for key in ("num_cpus", "num_gpus"):
            if (getattr(job, key) or 0) < 0:
                fail(f"jobs.{name}.{key}", "must not be negative")
        if job.max_runtime is not None:
            try:
                parse_duration(job.max_runtime)
            except ValueError as exc:
                fail(f"jobs.{name}.max_runtime", str(exc))
        if job.max_attempts < 1:
            fail(f"jobs.{name}.max_attempts", f"{job.max_attempts} attempts would never run the job; write 1 or more")
    if p.interlink.slurm.time is not None:
        try:
            parse_slurm_time(p.interlink.slurm.time)
        except ValueError as exc:
            fail("interlink.slurm.time", str(exc))
    if p.mlflow.credentials == "file" and not p.mlflow.credentials_file:
        fail("mlflow.credentials_file", "required when mlflow.credentials is 'file': a 0600 file with "
                                        "username= and password= lines")
    if p.template and not p.resolve_path(p.template).is_file():
        fail("template", f"{p.resolve_path(p.template)} does not exist; remove the key to use the default template")
    for i, t in enumerate(p.interlink.tolerations):
        key = f"interlink.tolerations[{i}]"
        if t.operator == "Exists" and t.value:
            fail(f"{key}.value", "must be empty with operator Exists (Kubernetes rejects it); remove it or use "
                                 "operator: Equal")
        if t.operator == "Equal" and not t.key:
            fail(f"{key}.key", "required with operator Equal; give the taint's key, or operator: Exists to tolerate "
                               "every taint")
        if t.tolerationSeconds is not None and t.effect != "NoExecute":
            fail(f"{key}.tolerationSeconds", "only applies to effect NoExecute (Kubernetes rejects it otherwise); "
                                             "add effect: NoExecute or remove it")
    if p.backend == "kuberay":
        _check_kuberay(p, groups, fail)


def _check_kuberay(p: Profile, groups: list[tuple[str, HeadSpec]], fail: Any) -> None:
    if not p.image.dir:
        fail("image.dir", "required for the kuberay backend: the absolute directory of the SIF file on the "
                          "SLURM side, e.g. /ceph/hpc/data/<project>/<user>")
    if p.interlink.enabled and not p.image.dir.startswith("/"):
        fail("image.dir", f"{p.image.dir!r} is not absolute; interLink hands singularity an image that starts "
                          "with '/' as a file, anything else as a registry reference")
    if not _DNS_LABEL.match(p.kubernetes.namespace):
        fail("kubernetes.namespace", f"{p.kubernetes.namespace!r} is not a valid namespace name")
    if not p.interlink.enabled:
        return
    if not p.interlink.node:
        fail("interlink.node", "required when interlink.enabled: the virtual node's name (kubectl get nodes)")
    for key, g in groups:
        for res in ("cpu", "memory"):
            if getattr(g, res) is None:
                fail(f"{key}.{res}", f"required with interLink: without a {res} limit the SLURM plugin gives the "
                                     f"job {'1 CPU' if res == 'cpu' else '1 MB of memory'}")
        for flag in g.slurm_flags:
            _check_slurm_flag(flag, f"{key}.slurm_flags", g.gpus, fail)
        problem = g.cpu and whole_cpus_problem(g.cpu)  # g.cpu is set: checked above
        if problem:
            fail(f"{key}.cpu", problem)
    for flag in p.interlink.slurm.extra_flags:
        gpus = max(g.gpus for _, g in groups)
        _check_slurm_flag(flag, "interlink.slurm.extra_flags", gpus, fail)
    for i, v in enumerate(p.volumes):
        if v.pvc is not None:
            fail(f"volumes[{i}].pvc", "interLink's SLURM plugin ignores PVCs and then drops every bind of the "
                                      "container (/tmp/ray included); mount the data with host_path, a directory on "
                                      "the SLURM side")
    il = p.interlink
    if il.mesh and il.pod_vpn:
        fail("interlink.mesh", "the virtual kubelet builds its mesh only for pods without interlink.eu/pod-vpn; "
                               "add interlink.pod_vpn: false")
    if il.vpn_bootstrap and not il.pod_vpn:
        fail("interlink.vpn_bootstrap", "brings $POD_IP up, which only pods with interlink.pod_vpn get; remove it "
                                        "or set interlink.pod_vpn: true")


def _check_slurm_flag(flag: str, key: str, gpus: int, fail: Any) -> None:
    name = flag.split("=", 1)[0].split()[0] if flag.strip() else flag
    if name in _SLURM_RESOURCE_FLAGS:
        fail(key, f"{flag!r} clashes with the pod's cpu/memory limits, which interLink turns into --cpus-per-task "
                  "and --mem; set head/workers cpu and memory instead")
    if name in ("--gres", "--gpus", "-G") and gpus:
        fail(key, f"{flag!r} clashes with the GPU count, which hpcray turns into --gres=gpu:N; set gpus instead")
    if name in ("-p", "--partition", "--time", "-t", "--account", "-A"):
        fail(key, f"{flag!r} has its own key: use interlink.slurm.partition/time/account")


def schema_fields(cls: type = Profile) -> list[tuple[str, str, str, Any, Any]]:
    """Every profile key as (dotted key, type, doc, default, example), in declaration order; for the docs."""
    rows: list[tuple[str, str, str, Any, Any]] = []

    def walk(c: type, prefix: str) -> None:
        hints = typing.get_type_hints(c)
        for f in dataclasses.fields(c):
            if f.metadata.get("internal"):
                continue
            tp = hints[f.name]
            key = _join(prefix, f.name)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)] or (
                [tp] if dataclasses.is_dataclass(tp) else [])
            if typing.get_origin(tp) is dict and dataclasses.is_dataclass(typing.get_args(tp)[1]):
                rows.append((key, _describe(tp), f.metadata.get("doc", ""), None, f.metadata.get("example")))
                walk(typing.get_args(tp)[1], f"{key}.<name>")
            elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
                rows.append((key, _describe(tp), f.metadata.get("doc", ""), None, f.metadata.get("example")))
                walk(typing.get_args(tp)[0], f"{key}[]")
            elif inner:
                rows.append((key, _describe(tp), f.metadata.get("doc", ""), None, None))
                walk(inner[0], key)
            else:
                shown = default if not dataclasses.is_dataclass(default) else None
                rows.append((key, _describe(tp), f.metadata.get("doc", ""), shown, f.metadata.get("example")))

    walk(cls, "")
    return rows
