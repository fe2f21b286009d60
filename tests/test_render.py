"""The example profiles rendered through the real `helm template` and the real KubeRay charts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from hpcray import helm, targets
from hpcray.profile import load_profile
from hpcray.render import check_release, dump_values, raycluster_of, render_values

REPO = Path(__file__).resolve().parent.parent
VEGA_ENV = {"VEGA_USER_DIR": "/ceph/hpc/data/st2301-itwin-users/alice"}


def manifest_for(name: str, chart_version: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    p = load_profile(name, env=env or {})
    p.chart.version = chart_version
    checked = check_release(p, dump_values(render_values(p)), required=True, warn=print)
    assert checked is not None
    return checked.raycluster


def pod(group: dict[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]


@pytest.mark.parametrize("chart_version", ["1.2.2", "1.7.0"])
def test_vega_profile_renders_interlink_offload(helm_bin: str, charts_env: Path, chart_version: str) -> None:
    rc = manifest_for("vega", chart_version, VEGA_ENV)
    assert rc["metadata"]["name"] == "hython-kuberay"
    head = rc["spec"]["headGroupSpec"]
    [workers] = rc["spec"]["workerGroupSpecs"]
    expected_annotations = {
        "slurm-job.vk.io/flags": "-p gpu --gres=gpu:1 --time=230",
        "slurm-job.vk.io/singularity-options": "--no-home --nv",
        "slurm-job.vk.io/singularity-mounts":
            "--bind /ceph/hpc/data/st2301-itwin-users:/ceph/hpc/data/st2301-itwin-users",
        "interlink.eu/pod-vpn": "true",
    }
    for group in (head, workers):
        spec = pod(group)
        [container] = spec["containers"]
        assert container["image"] == "/ceph/hpc/data/st2301-itwin-users/alice/hython:sif"
        assert spec["nodeSelector"] == {"kubernetes.io/hostname": "vega-new-vk"}
        assert spec["tolerations"] == [
            {"key": "virtual-node.interlink/no-schedule", "operator": "Exists", "effect": "NoSchedule"}]
        assert group["template"]["metadata"]["annotations"] == expected_annotations
        assert container["resources"]["limits"] == {"cpu": "64", "memory": "128G", "nvidia.com/gpu": 1}
        assert group["rayStartParams"]["num-gpus"] == "1"
        assert group["rayStartParams"]["node-ip-address"] == "$POD_IP"
        env = {e["name"]: e for e in container["env"]}
        assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": "hython-hpcray-mlflow", "key": "password"}
        assert env["MLFLOW_DISABLE_TELEMETRY"]["value"] == "true"
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert workers["groupName"] == "gpu"
    assert workers["replicas"] == 2 and workers["minReplicas"] == 2 and workers["maxReplicas"] == 2


@pytest.mark.parametrize("chart_version", ["1.2.2", "1.7.0"])
def test_local_profile_renders_plain_cluster(helm_bin: str, charts_env: Path, chart_version: str) -> None:
    rc = manifest_for("local", chart_version)
    head = rc["spec"]["headGroupSpec"]
    spec = pod(head)
    assert spec["containers"][0]["image"] == "rayproject/ray:2.60.0"
    assert not spec.get("nodeSelector") and not spec.get("tolerations")
    assert not (head["template"]["metadata"].get("annotations") or {})
    assert "nvidia.com/gpu" not in spec["containers"][0]["resources"]["limits"]
    assert "num-gpus" not in head["rayStartParams"] and "node-ip-address" not in head["rayStartParams"]
    assert not rc["spec"].get("workerGroupSpecs")


def test_several_worker_groups_and_volumes(helm_bin: str, charts_env: Path, tmp_path: Path) -> None:
    profile = tmp_path / "multi.yaml"
    profile.write_text(yaml.safe_dump({
        "name": "multi", "image": {"dir": "/sif", "name": "ray"},
        "head": {"cpu": "4", "memory": "8G"},
        "workers": {"gpu": {"replicas": 3, "cpu": "8", "memory": "16G", "gpus": 4},
                    "cpu": {"replicas": 1, "cpu": "2", "memory": "4G", "max_replicas": 5}},
        "volumes": [{"name": "data", "mount_path": "/data", "host_path": "/ceph/data", "read_only": True},
                    {"name": "ckpt", "mount_path": "/ckpt", "pvc": "checkpoints"}],
        "interlink": {"enabled": True, "node": "vk", "slurm": {"partition": "gpu", "account": "proj"},
                      "pre_exec": "module load CUDA", "pod_vpn": False},
    }))
    p = load_profile(profile)
    checked = check_release(p, dump_values(render_values(p)), required=True, warn=print)
    assert checked is not None
    groups = {g["groupName"]: g for g in checked.raycluster["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"gpu", "cpu"}
    assert groups["gpu"]["replicas"] == 3 and groups["gpu"]["rayStartParams"]["num-gpus"] == "4"
    assert groups["cpu"]["maxReplicas"] == 5
    gpu_annotations = groups["gpu"]["template"]["metadata"]["annotations"]
    assert gpu_annotations["slurm-job.vk.io/flags"] == "-p gpu --gres=gpu:4 --account=proj"
    assert gpu_annotations["slurm-job.vk.io/pre-exec"] == "module load CUDA"
    assert "interlink.eu/pod-vpn" not in gpu_annotations
    assert "--gres" not in groups["cpu"]["template"]["metadata"]["annotations"]["slurm-job.vk.io/flags"]
    assert "node-ip-address" not in groups["gpu"]["rayStartParams"]
    volumes = {v["name"]: v for v in pod(groups["gpu"])["volumes"]}
    assert volumes["data"]["hostPath"] == {"path": "/ceph/data"}
    assert volumes["ckpt"]["persistentVolumeClaim"] == {"claimName": "checkpoints"}
    mounts = {m["name"]: m for m in pod(groups["gpu"])["containers"][0]["volumeMounts"]}
    assert mounts["data"] == {"name": "data", "mountPath": "/data", "readOnly": True}


def test_render_cli_writes_values_and_manifest(helm_bin: str, charts_env: Path, tmp_path: Path) -> None:
    out = tmp_path / "values.yaml"
    env = {**VEGA_ENV, "HPCRAY_HELM": helm_bin, "HPCRAY_CHARTS_DIR": str(charts_env), "PATH": "/usr/bin:/bin"}
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


def test_help_and_render_do_not_import_heavy_libraries() -> None:
    code = ("import sys; from hpcray.cli import main\n"
            "try:\n    main(['render', '-p', 'local', '--no-check'])\nexcept SystemExit: pass\n"
            "try:\n    main(['--help'])\nexcept SystemExit: pass\n"
            "heavy = [m for m in ('ray', 'mlflow', 'kubernetes') if m in sys.modules]\n"
            "print('HEAVY', heavy, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert "HEAVY []" in done.stderr, done.stderr
