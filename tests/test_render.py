"""Profiles rendered through the real `helm template` and the real KubeRay charts, checked against KubeRay's CRD,
and read the way interLink's virtual kubelet and SLURM plugin read a pod (../shared/docs/interlink-facts.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from hpcray import helm, targets
from hpcray.cli import main
from hpcray.profile import load_profile, quantity
from hpcray.render import check_release, deep_merge, dump_values, raycluster_of, render_values

REPO = Path(__file__).resolve().parent.parent
VEGA_ENV = {"VEGA_USER_DIR": "/ceph/hpc/data/st2301-itwin-users/alice", "VEGA_VPN_BOOTSTRAP": "/opt/site/vpn-up.sh"}
VIRTUAL_NODE_DEFAULT_CPUS = 100  # interLink's DefaultCPUCapacity
INTERLINK: dict[str, Any] = {
    "name": "il", "image": {"dir": "/sif", "name": "ray"},
    "head": {"cpu": "2", "memory": "4G"},
    "interlink": {"enabled": True, "node": "vk", "vpn_bootstrap": "/opt/site/vpn-up.sh"},
}


def manifest_for(name: str, chart_version: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    p = load_profile(name, env=env or {})
    p.chart.version = chart_version
    checked = check_release(p, dump_values(render_values(p)), required=True, warn=print)
    assert checked is not None
    return checked.raycluster


def write(tmp_path: Path, profile: dict[str, Any], over: dict[str, Any] | None = None) -> Path:
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(deep_merge(profile, over or {})))
    return path


def rendered(tmp_path: Path, profile: dict[str, Any], over: dict[str, Any] | None = None) -> dict[str, Any]:
    """The RayCluster of a profile, through the real helm and the CRD check, by group name ('head' for the head)."""
    p = load_profile(write(tmp_path, profile, over))
    checked = check_release(p, dump_values(render_values(p)), required=True, warn=print)
    assert checked is not None
    spec = checked.raycluster["spec"]
    return {"head": spec["headGroupSpec"], **{g["groupName"]: g for g in spec.get("workerGroupSpecs") or []}}


def pod(group: dict[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]


def annotations(group: dict[str, Any]) -> dict[str, str]:
    return group["template"]["metadata"].get("annotations") or {}


def limits(group: dict[str, Any]) -> dict[str, Any]:
    return pod(group)["containers"][0]["resources"]["limits"]


def env_of(group: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in pod(group)["containers"][0]["env"]}


@pytest.mark.parametrize("chart_version", ["1.2.2", "1.7.0"])
def test_vega_profile_renders_the_tutorials_cluster(helm_bin: str, charts_env: Path, chart_version: str) -> None:
    rc = manifest_for("vega", chart_version, VEGA_ENV)
    assert rc["metadata"]["name"] == "hython-kuberay"
    head = rc["spec"]["headGroupSpec"]
    [workers] = rc["spec"]["workerGroupSpecs"]
    expected_annotations = {
        "slurm-job.vk.io/flags": "-p gpu --gres=gpu:1 --time=230",
        "slurm-job.vk.io/singularity-options": "--env POD_IP=$POD_IP --no-home --compat --no-mount /exa5",
        "slurm-job.vk.io/singularity-mounts": "--bind /ceph",
        "slurm-job.vk.io/pre-exec": "/opt/site/vpn-up.sh",
        "interlink.eu/pod-vpn": "true",
    }
    for group in (head, workers):
        spec = pod(group)
        [container] = spec["containers"]
        assert container["image"] == "/ceph/hpc/data/st2301-itwin-users/alice/hython:sif"
        assert spec["nodeSelector"] == {"kubernetes.io/hostname": "vega-virtual-node"}
        assert spec["tolerations"] == [
            {"key": "virtual-node.interlink/no-schedule", "operator": "Exists", "effect": "NoSchedule"},
            {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
             "tolerationSeconds": 300}]
        assert annotations(group) == expected_annotations
        # GPUs through --gres only: Vega's virtual node advertises no nvidia.com/gpu
        assert container["resources"]["limits"] == {"cpu": "32", "memory": "128G"}
        assert group["rayStartParams"]["num-gpus"] == "1"
        assert group["rayStartParams"]["node-ip-address"] == "$POD_IP"
        env = env_of(group)
        assert env["NCCL_SOCKET_IFNAME"]["value"] == "br0"
        assert env["HYDRA_FULL_ERROR"]["value"] == "1"
        # credentials as a 0400 Secret volume, never as env: interLink's plugin writes env values into a 0644 file
        assert "MLFLOW_TRACKING_PASSWORD" not in env and "MLFLOW_TRACKING_USERNAME" not in env
        assert {"name": "hpcray-mlflow", "secret": {"secretName": "hython-hpcray-mlflow", "defaultMode": 0o400}} \
            in spec["volumes"]
        assert {"name": "hpcray-mlflow", "mountPath": "/tmp/hpcray-mlflow", "readOnly": True} \
            in container["volumeMounts"]
        assert "MLFLOW_TRACKING_PASSWORD=$(cat /tmp/hpcray-mlflow/password)" in container["command"][0]
        assert env["MLFLOW_DISABLE_TELEMETRY"]["value"] == "true"
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert workers["groupName"] == "gpu"
    assert workers["replicas"] == 2 and workers["minReplicas"] == 2 and workers["maxReplicas"] == 2
    cpus = quantity(limits(head)["cpu"]) + workers["replicas"] * quantity(limits(workers)["cpu"])
    assert cpus <= VIRTUAL_NODE_DEFAULT_CPUS, "the cluster must fit a virtual node's default CPU capacity"


def test_vega_profile_asks_for_the_itwinai_config_dir(tmp_path: Path) -> None:
    p = load_profile("vega", env={**VEGA_ENV, "ITWINAI_CONFIG_DIR": str(tmp_path)})
    for name in ("training", "hpo"):
        assert p.resolve_path(p.jobs[name].working_dir or "") == tmp_path
        assert p.jobs[name].itwinai is not None and p.jobs[name].itwinai.config_name == "vega_training"


@pytest.mark.parametrize("chart_version", ["1.2.2", "1.7.0"])
def test_local_profile_renders_plain_cluster(helm_bin: str, charts_env: Path, chart_version: str) -> None:
    rc = manifest_for("local", chart_version)
    head = rc["spec"]["headGroupSpec"]
    spec = pod(head)
    assert spec["containers"][0]["image"] == "rayproject/ray:2.60.0"
    assert not spec.get("nodeSelector") and not spec.get("tolerations")
    assert not annotations(head)
    assert "nvidia.com/gpu" not in spec["containers"][0]["resources"]["limits"]
    assert "num-gpus" not in head["rayStartParams"] and "node-ip-address" not in head["rayStartParams"]
    assert not rc["spec"].get("workerGroupSpecs")


def test_plain_kuberay_keeps_gpu_limits_and_pvcs(helm_bin: str, charts_env: Path, tmp_path: Path) -> None:
    groups = rendered(tmp_path, {
        "name": "multi", "image": {"dir": "/sif", "name": "ray"},
        "head": {"cpu": "500m", "memory": "8G"},
        "workers": {"gpu": {"replicas": 3, "cpu": "8", "memory": "16G", "gpus": 4},
                    "cpu": {"replicas": 1, "cpu": "2", "memory": "4G", "max_replicas": 5}},
        "volumes": [{"name": "data", "mount_path": "/data", "host_path": "/ceph/data", "read_only": True},
                    {"name": "ckpt", "mount_path": "/ckpt", "pvc": "checkpoints"}],
    })
    assert set(groups) == {"head", "gpu", "cpu"}
    assert limits(groups["gpu"])["nvidia.com/gpu"] == 4 and groups["gpu"]["rayStartParams"]["num-gpus"] == "4"
    assert limits(groups["head"])["cpu"] == "500m"  # Kubernetes shares CPUs; only SLURM needs whole ones
    assert groups["gpu"]["replicas"] == 3 and groups["cpu"]["maxReplicas"] == 5
    assert not annotations(groups["gpu"]) and not pod(groups["gpu"]).get("tolerations")
    volumes = {v["name"]: v for v in pod(groups["gpu"])["volumes"]}
    assert volumes["data"]["hostPath"] == {"path": "/ceph/data", "type": "Directory"}
    assert volumes["ckpt"]["persistentVolumeClaim"] == {"claimName": "checkpoints"}
    mounts = {m["name"]: m for m in pod(groups["gpu"])["containers"][0]["volumeMounts"]}
    assert mounts["data"] == {"name": "data", "mountPath": "/data", "readOnly": True}


@pytest.mark.parametrize("mode", ["gres", "resource"])
def test_interlink_gpu_modes(helm_bin: str, charts_env: Path, tmp_path: Path, mode: str) -> None:
    groups = rendered(tmp_path, INTERLINK, {
        "interlink": {"gpu_mode": mode, "slurm": {"partition": "gpu", "account": "proj"}},
        "workers": {"gpu": {"replicas": 2, "cpu": "8", "memory": "16G", "gpus": 2}}})
    worker = groups["gpu"]
    # the plugin makes no sbatch flag of a GPU limit: --gres in both modes, or SLURM would give no GPU
    assert annotations(worker)["slurm-job.vk.io/flags"] == "-p gpu --gres=gpu:2 --account=proj"
    assert worker["rayStartParams"]["num-gpus"] == "2"
    if mode == "gres":
        assert "nvidia.com/gpu" not in limits(worker)
    else:
        assert limits(worker)["nvidia.com/gpu"] == 2
    assert "--gres" not in annotations(groups["head"])["slurm-job.vk.io/flags"]
    assert "nvidia.com/gpu" not in limits(groups["head"]) and "num-gpus" not in groups["head"]["rayStartParams"]


def test_per_group_singularity_options_mounts_and_pre_exec(helm_bin: str, charts_env: Path, tmp_path: Path) -> None:
    groups = rendered(tmp_path, INTERLINK, {
        "interlink": {"singularity": {"options": ["--no-home"], "mounts": ["/ceph"]}, "pre_exec": "module load CUDA"},
        "head": {"singularity": {"options": ["--env A=1"], "mounts": ["/scratch:/scratch:ro"]},
                 "pre_exec": "echo head"},
        "workers": {"w": {"replicas": 1, "cpu": "4", "memory": "8G", "pre_exec": "echo worker",
                          "singularity": {"options": ["--writable-tmpfs"]}},
                    "plain": {"replicas": 1, "cpu": "1", "memory": "2G"}}})
    head, worker, plain = (annotations(groups[g]) for g in ("head", "w", "plain"))
    assert head["slurm-job.vk.io/singularity-options"] == "--env POD_IP=$POD_IP --no-home --env A=1"
    assert worker["slurm-job.vk.io/singularity-options"] == "--env POD_IP=$POD_IP --no-home --writable-tmpfs"
    assert plain["slurm-job.vk.io/singularity-options"] == "--env POD_IP=$POD_IP --no-home"
    assert head["slurm-job.vk.io/singularity-mounts"] == "--bind /ceph --bind /scratch:/scratch:ro"
    assert worker["slurm-job.vk.io/singularity-mounts"] == plain["slurm-job.vk.io/singularity-mounts"] == "--bind /ceph"
    assert head["slurm-job.vk.io/pre-exec"] == "/opt/site/vpn-up.sh\nmodule load CUDA\necho head"
    assert worker["slurm-job.vk.io/pre-exec"] == "/opt/site/vpn-up.sh\nmodule load CUDA\necho worker"
    assert plain["slurm-job.vk.io/pre-exec"] == "/opt/site/vpn-up.sh\nmodule load CUDA"


def test_pod_vpn_passes_pod_ip_into_the_container_once(helm_bin: str, charts_env: Path, tmp_path: Path) -> None:
    groups = rendered(tmp_path, INTERLINK, {"interlink": {"singularity": {"options": ["--env POD_IP=$POD_IP"]}}})
    assert annotations(groups["head"])["slurm-job.vk.io/singularity-options"] == "--env POD_IP=$POD_IP"
    assert groups["head"]["rayStartParams"]["node-ip-address"] == "$POD_IP"


def test_mesh_leaves_the_pod_without_pod_vpn(helm_bin: str, charts_env: Path, tmp_path: Path) -> None:
    """interLink builds its FullMesh only for pods without interlink.eu/pod-vpn, and then exports no POD_IP."""
    groups = rendered(tmp_path, INTERLINK, {"interlink": {"pod_vpn": False, "mesh": True, "vpn_bootstrap": None}})
    head = annotations(groups["head"])
    assert "interlink.eu/pod-vpn" not in head and "slurm-job.vk.io/singularity-options" not in head
    assert "slurm-job.vk.io/pre-exec" not in head and "node-ip-address" not in groups["head"]["rayStartParams"]


@pytest.mark.parametrize("asked,expected", [(None, "Directory"), ("DirectoryOrCreate", "DirectoryOrCreate")])
def test_interlink_host_path_is_typed(helm_bin: str, charts_env: Path, tmp_path: Path, asked: str | None,
                                      expected: str) -> None:
    """The SLURM plugin binds a hostPath only of type Directory or DirectoryOrCreate and fails the pod otherwise."""
    volume = {"name": "data", "mount_path": "/data", "host_path": "/ceph/data",
              **({"host_path_type": asked} if asked else {})}
    groups = rendered(tmp_path, {**INTERLINK, "volumes": [volume]})
    volumes = {v["name"]: v for v in pod(groups["head"])["volumes"]}
    assert volumes["data"]["hostPath"] == {"path": "/ceph/data", "type": expected}


@pytest.mark.parametrize("volume,refusal", [
    ({"name": "ckpt", "persistentVolumeClaim": {"claimName": "checkpoints"}},
     "head: volume ckpt is a PVC, which interLink's SLURM plugin ignores"),
    ({"name": "data", "hostPath": {"path": "/ceph"}},
     "head: volume data is a hostPath of type None; interLink's SLURM plugin fails the pod unless the type is "
     "Directory or DirectoryOrCreate")], ids=["pvc", "untyped-host-path"])
def test_values_override_with_a_volume_the_plugin_cannot_bind_is_refused(
        helm_bin: str, charts_env: Path, tmp_path: Path, volume: dict[str, Any], refusal: str) -> None:
    from hpcray.errors import ValuesError

    p = load_profile(write(tmp_path, INTERLINK, {"values": {"head": {"volumes": [volume]}}}))
    with pytest.raises(ValuesError, match=refusal):
        check_release(p, dump_values(render_values(p)), required=True, warn=print)


def test_values_override_below_one_cpu_is_refused_for_interlink(helm_bin: str, charts_env: Path,
                                                                tmp_path: Path) -> None:
    from hpcray.errors import ValuesError

    p = load_profile(write(tmp_path, INTERLINK, {"values": {"head": {"resources": {"limits": {"cpu": "500m"}}}}}))
    with pytest.raises(ValuesError, match=r"head: container ray-head cpu limit '500m' is less than one CPU"):
        check_release(p, dump_values(render_values(p)), required=True, warn=print)


@pytest.mark.parametrize("command", [["render"], ["up", "--dry-run"]])
def test_pod_vpn_without_bootstrap_warns_with_the_fix(helm_bin: str, charts_env: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str], command: list[str]) -> None:
    profile = write(tmp_path, INTERLINK, {"interlink": {"vpn_bootstrap": None}})
    main([*command, "-p", str(profile)])
    warnings = [line for line in capsys.readouterr().err.splitlines() if "pod_vpn" in line]
    assert len(warnings) == 1
    assert warnings[0].startswith("hpcray: warning: interlink.pod_vpn is on but nothing brings $POD_IP up")
    assert "set interlink.vpn_bootstrap" in warnings[0] and "interlink.mesh: true" in warnings[0]


@pytest.mark.parametrize("over", [{}, {"interlink": {"pod_vpn": False, "mesh": True, "vpn_bootstrap": None}}],
                         ids=["bootstrap", "mesh"])
def test_pod_network_declared_renders_without_warning(helm_bin: str, charts_env: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str], over: dict[str, Any]) -> None:
    main(["render", "-p", str(write(tmp_path, INTERLINK, over))])
    assert "warning" not in capsys.readouterr().err


def test_render_cli_writes_values_and_manifest(helm_bin: str, charts_env: Path, tmp_path: Path) -> None:
    out = tmp_path / "values.yaml"
    env = {**os.environ, **VEGA_ENV, "PYTHONPATH": str(REPO)}  # this checkout, not an installed copy
    done = subprocess.run([sys.executable, "-m", "hpcray.cli", "render", "-p", "vega", "-o", str(out)],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(out.read_text())["image"]["repository"] == "/ceph/hpc/data/st2301-itwin-users/alice/hython"
    done = subprocess.run([sys.executable, "-m", "hpcray.cli", "render", "-p", "vega", "--manifest"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert raycluster_of(done.stdout)["kind"] == "RayCluster"


def test_values_override_with_wrong_type_is_caught_by_the_crd(helm_bin: str, charts_env: Path,
                                                              tmp_path: Path) -> None:
    """The chart has no values.schema.json: helm renders `replicas: "two"` happily; the CRD check does not."""
    profile = tmp_path / "typo.yaml"
    profile.write_text(yaml.safe_dump({
        "name": "typo", "image": {"dir": "/sif"}, "head": {"cpu": "1", "memory": "2G"},
        "workers": {"w": {"replicas": 1}}, "values": {"worker": {"replicas": "two"}}}))
    p = load_profile(profile)
    values = dump_values(render_values(p))
    manifest = helm.template(helm.find_helm(), targets.chart(p), targets.release(p), values)  # helm accepts it
    assert raycluster_of(manifest)["spec"]["workerGroupSpecs"][0]["replicas"] == "two"
    from hpcray.errors import ValuesError

    with pytest.raises(ValuesError, match=r"workerGroupSpecs\[0\]\.replicas: 'two' is not of type 'integer'"):
        check_release(p, values, required=True, warn=print)


def test_string_toleration_seconds_would_fail_the_crd(helm_bin: str, charts_env: Path, tmp_path: Path) -> None:
    """Why the profile types tolerationSeconds as a whole number: KubeRay's CRD refuses the string."""
    from hpcray.errors import ValuesError

    p = load_profile(write(tmp_path, INTERLINK, {"values": {"head": {"tolerations": [
        {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
         "tolerationSeconds": "300"}]}}}))
    with pytest.raises(ValuesError, match=r"tolerations\[0\]\.tolerationSeconds: '300' is not of type 'integer'"):
        check_release(p, dump_values(render_values(p)), required=True, warn=print)


def test_help_and_render_do_not_import_heavy_libraries() -> None:
    code = ("import sys; from hpcray.cli import main\n"
            "try:\n    main(['render', '-p', 'local', '--no-check'])\nexcept SystemExit: pass\n"
            "try:\n    main(['--help'])\nexcept SystemExit: pass\n"
            "heavy = [m for m in ('ray', 'mlflow', 'kubernetes') if m in sys.modules]\n"
            "print('HEAVY', heavy, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert "HEAVY []" in done.stderr, done.stderr
