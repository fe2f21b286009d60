"""`make vega-box` in CI: the Vega flow through hpcray's CLI on the site in a box, and the MLflow password's exposure
on the HPC side as measured there; the SLURM plugin's two ways with a Secret volume (SHARED_FS on and off)."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fake_interlink_plugin import PluginConfig, SlurmPlugin
from tests.fixtures_slurm import SlurmCluster, skip_reason

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.reliability(
    case="the MLflow password on interLink's SLURM side (site in a box, hpcray's default delivery)",
    sees="`make vega-box`: both example jobs SUCCEEDED, and every place the password landed with its mode",
    remains="the password in one 0400 file per pod under the plugin's job directory (gone with the pod), base64 in "
            "the plugin's debug log where it logs at debug level, and in the Ray processes' environments; in no env "
            "file, batch script or SLURM record; after `down` no SLURM job, pod, release, Secret or process")
def test_make_vega_box_runs_training_and_hpo_and_the_password_lands_only_in_a_0400_file(tmp_path: Path) -> None:
    """Both example jobs SUCCEED on real Ray in SLURM jobs; with hpcray's default delivery on interLink the password
    is in no env file, no batch script, no SLURM record and no debug log line in plaintext: on the HPC side only in
    the Secret volume's file, mode 0400, in the base64 of the create body the debug log keeps, and in the Ray
    processes' environments; nothing is left afterwards."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "summary.json"
    done = subprocess.run([sys.executable, "-m", "tests.vega_box", "--json", str(out)], cwd=REPO, text=True,
                          capture_output=True, timeout=1500)
    assert done.returncode == 0, done.stdout + done.stderr[-6000:]
    summary = json.loads(out.read_text())
    assert summary["jobs"] == {"training": "SUCCEEDED", "hpo": "SUCCEEDED"}
    assert not any(summary["leftovers"].values()), summary["leftovers"]
    assert summary["slurm_jobs"] and all(s.split()[0] in ("COMPLETED", "CANCELLED") for s in
                                         summary["slurm_jobs"].values()), summary["slurm_jobs"]
    files = [lnd for lnd in summary["landings"] if lnd["where"].startswith("/")]
    plaintext_files = {lnd["where"]: lnd["mode"] for lnd in files if lnd["form"] == "plaintext"}
    assert plaintext_files, "the box measured nothing: the Secret volume's file must hold the password"
    assert all(path.endswith("/secrets/hpcray-mlflow/password") for path in plaintext_files), plaintext_files
    assert set(plaintext_files.values()) == {"0400"}
    assert not [lnd for lnd in files if lnd["where"].endswith(("_envfile.properties", "job.slurm", "job.sh"))]
    assert not [lnd for lnd in summary["landings"] if lnd["where"].startswith("`scontrol")]
    assert not [lnd for lnd in files if "/hpcray-slurm-" in lnd["where"]], "sbatch passed the password to a job"
    assert {lnd["form"] for lnd in files if lnd["where"].endswith("interlink-plugin.log")} <= {"base64"}


def _pod(uid: str, mode: int) -> dict:
    return {"metadata": {"name": "p", "namespace": "default", "uid": uid, "annotations": {}},
            "spec": {"containers": [{"name": "ray", "image": "/nonexistent.sif", "command": ["true"],
                                     "volumeMounts": [{"name": "cred", "mountPath": "/tmp/cred", "readOnly": True}]}],
                     "volumes": [{"name": "cred", "secret": {"secretName": "s", "defaultMode": mode}}]}}


@pytest.mark.slow
@pytest.mark.parametrize("shared_fs", [True, False])
def test_the_fake_plugin_writes_a_secret_volume_as_interlinks_does(slurm_cluster: SlurmCluster, tmp_path: Path,
                                                                    shared_fs: bool) -> None:
    """SHARED_FS=true: the key is a file under the job directory with the volume's defaultMode, and job.slurm does
    not hold it. Otherwise: job.slurm (0774) holds it base64 in a here-doc that makes the file, and the plugin's own
    environment (which every later sbatch passes to its job) holds it."""
    secret = "s3cr3t-" + os.urandom(4).hex()
    data = tmp_path / "jobs"
    data.mkdir()
    plugin = SlurmPlugin(PluginConfig(data_root=data, env={"PATH": os.environ["PATH"], **slurm_cluster.env},
                                      shared_fs=shared_fs))
    pod = _pod("u1", 0o400)
    objects = {"s": {"metadata": {"name": "s"}, "data": {"password": base64.b64encode(secret.encode()).decode()}}}
    try:
        plugin.create(pod, objects, {})
        job = plugin.workdir(pod)
        script = (job / "job.slurm").read_text()
        target = job / "secrets" / "cred" / "password"
        assert stat.S_IMODE((job / "job.slurm").stat().st_mode) == 0o774
        if shared_fs:
            assert stat.S_IMODE(target.stat().st_mode) == 0o400 and target.read_text() == secret
            assert base64.b64encode(secret.encode()).decode() not in script and secret not in script
            assert secret not in plugin.config.env.values()
        else:
            assert base64.b64encode(secret.encode()).decode() in script
            assert 'base64 -d <<\'VKDATA_' in script and f'> "{target}"' in script
            assert secret in plugin.config.env.values()
    finally:
        plugin.delete(pod)


@pytest.mark.parametrize("interlink, deliver, read_as", [
    (True, "secret", "file"), (True, "secret_env", "env"), (False, "secret", "env"), (False, "secret_file", "file")])
def test_the_credential_plan_reads_the_secret_as_a_0400_file_on_interlink(tmp_path: Path, interlink: bool,
                                                                        deliver: str, read_as: str) -> None:
    """One rule: on interLink the Secret is a volume (its plugin writes env values into 0644 files), elsewhere
    variables; `mlflow.deliver` forces either way. The rendered pods follow it."""
    from hpcray.profile import load_profile
    from hpcray.render import credentials_volume, mlflow_env
    from hpcray.tracking import credential_plan

    node = "interlink: {enabled: true, node: vk, pod_vpn: false}\n" if interlink else ""
    (tmp_path / "p.yaml").write_text("name: p\nbackend: kuberay\nimage: {dir: /sif}\nhead: {cpu: '1', memory: 2G}\n"
                                     f"{node}mlflow: {{tracking_uri: 'https://mlflow.example', deliver: {deliver}}}\n")
    p = load_profile(str(tmp_path / "p.yaml"))
    assert credential_plan(p).secret_as == read_as
    env = {e["name"] for e in mlflow_env(p)}
    mounted = credentials_volume(p)
    if read_as == "file":
        assert "MLFLOW_TRACKING_PASSWORD" not in env and mounted is not None
        assert mounted[0]["secret"] == {"secretName": "p-hpcray-mlflow", "defaultMode": 0o400}
    else:
        assert "MLFLOW_TRACKING_PASSWORD" in env and mounted is None
