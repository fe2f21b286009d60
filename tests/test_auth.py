"""Ray's token authentication on the head (Ray >= 2.52), as hpcray turns it on: a local head on real Ray, the values
rendered for KubeRay, and a KubeRay cluster in the site in a box (real SLURM, real Ray, interLink as it really is).

Without the token the head's Jobs API answers 401; every hpcray command sends it; the token is in no argv, rendered
value, `--dry-run` or log line of hpcray's.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml

from hpcray import http
from tests.fake_site_box import SiteBox
from tests.fixtures_box import site_box  # noqa: F401  (the fixture)
from tests.hpcray_cli import run as hpcray
from tests.test_access import box_profile

CHARTS = Path(os.environ.get("HPCRAY_CHARTS_DIR", "/work/shared/charts"))


def request(url: str, token: str | None = None) -> int:
    """The status of a GET, with the token in Authorization as Ray's own clients send it, or without."""
    headers: dict[str, str | Any] = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return http.request(url, "GET", headers=headers, timeout=30).status


# ---------------------------------------------------------------------------------------------------------------
# The local head, on real Ray
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.reliability(
    case="secrets: a request to the local head's Jobs API without its Ray token (auth: token, the default)",
    sees="HTTP 401 `Unauthorized: Missing authentication token` (403 with a wrong token); hpcray's own commands send "
         "the token and succeed; `hpcray dashboard` names the 0600 file that holds it",
    remains="the token only in `ray-token` (0600) beside the head's state, removed by `down`; in no output")
def test_a_local_head_refuses_requests_without_its_token_and_hpcray_sends_it(tmp_path: Path) -> None:
    profile = tmp_path / "tok.yaml"
    profile.write_text(yaml.safe_dump({"name": "tok", "backend": "local", "local": {"num_cpus": 1},
                                       "mlflow": {"credentials": "none"},
                                       "jobs": {"hello": {"entrypoint": "echo hello-with-a-token"}}}))
    env = {"HPCRAY_STATE_DIR": str(tmp_path / "state")}
    plan = hpcray("up", "-p", str(profile), "--dry-run", extra_env=env)
    assert plan.returncode == 0 and "start the head with RAY_AUTH_MODE=token" in plan.stdout, plan.stderr
    up = hpcray("up", "-p", str(profile), extra_env=env)
    try:
        assert up.returncode == 0, up.stderr
        [token_file] = (tmp_path / "state").glob("*/ray-token")
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text()
        address = json.loads(hpcray("status", "-p", str(profile), "--json", extra_env=env).stdout)["address"]

        assert request(f"{address}/api/jobs/") == 401
        assert request(f"{address}/api/jobs/", "not-the-token") == 403
        assert request(f"{address}/api/jobs/", token) == 200

        done = hpcray("submit", "-p", str(profile), "hello", "--json", extra_env=env)
        assert done.returncode == 0 and json.loads(done.stdout)["status"] == "SUCCEEDED", done.stderr
        assert "hello-with-a-token" in done.stderr
        listed = hpcray("list", "-p", str(profile), "--json", extra_env=env)
        assert listed.returncode == 0 and len(json.loads(listed.stdout)) == 1
        refused = hpcray("list", "--address", address, extra_env={**env, "RAY_AUTH_TOKEN": "not-the-token"})
        assert refused.returncode != 0 and "refused us (403" in refused.stderr, refused.stderr

        shown = hpcray("dashboard", "-p", str(profile), extra_env=env)
        assert shown.returncode == 0 and f"it is in {token_file}" in shown.stderr, shown.stderr
        for said in (plan, up, done, listed, shown):
            assert token not in said.stdout + said.stderr
    finally:
        down = hpcray("down", "-p", str(profile), extra_env=env)
    assert down.returncode == 0, down.stderr
    assert not token_file.exists()


# ---------------------------------------------------------------------------------------------------------------
# The values rendered for KubeRay
# ---------------------------------------------------------------------------------------------------------------


def kuberay_profile(directory: Path, **changes: Any) -> Path:
    profile: dict[str, Any] = {
        "name": "tok", "backend": "kuberay",
        "chart": {"version": "1.2.2", **({"path": str(CHARTS / "ray-cluster-1.2.2.tgz")}
                                          if (CHARTS / "ray-cluster-1.2.2.tgz").is_file() else {})},
        "image": {"dir": "/sif", "name": "ray", "tag": "2.60.0", "ray_version": "2.60.0"},
        "workers": {"cpu": {"replicas": 1}}, "mlflow": {"credentials": "none"}, **changes}
    path = directory / "tok.yaml"
    path.write_text(yaml.safe_dump(profile))
    return path


def containers_env(manifest: str) -> dict[str, list[dict[str, Any]]]:
    """The env of every Ray container of the rendered RayCluster, by group."""
    [rc] = [d for d in yaml.safe_load_all(manifest) if d and d.get("kind") == "RayCluster"]
    groups = {"head": rc["spec"]["headGroupSpec"], **{g["groupName"]: g for g in rc["spec"]["workerGroupSpecs"]}}
    return {name: g["template"]["spec"]["containers"][0].get("env", []) for name, g in groups.items()}


def test_the_pods_read_the_token_from_its_secret_and_an_old_ray_gets_none_with_a_warning(tmp_path: Path) -> None:
    done = hpcray("render", "-p", str(kuberay_profile(tmp_path)), "--manifest")
    assert done.returncode == 0, done.stderr
    for group, env in containers_env(done.stdout).items():
        by_name = {e["name"]: e for e in env}
        assert by_name["RAY_AUTH_MODE"] == {"name": "RAY_AUTH_MODE", "value": "token"}, group
        assert by_name["RAY_AUTH_TOKEN"] == {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": "tok-hpcray-ray-token", "key": "token"}}}, group
    plan = hpcray("up", "-p", str(kuberay_profile(tmp_path)), "--dry-run")
    assert "create Secret tok-hpcray-ray-token in namespace default with a new random Ray token (token: ******)" \
        in plan.stdout, plan.stdout + plan.stderr

    old_ray = {"image": {"dir": "/sif", "name": "ray", "tag": "2.40.0", "ray_version": "2.40.0"}}
    for changes in (old_ray, {"auth": "none"}):
        done = hpcray("render", "-p", str(kuberay_profile(tmp_path, **changes)), "--manifest")
        assert done.returncode == 0, done.stderr
        assert not any(e["name"].startswith("RAY_AUTH") for env in containers_env(done.stdout).values() for e in env)
        warned = [line for line in done.stderr.splitlines() if "token authentication" in line]
        if "auth" in changes:
            assert not warned
        else:
            assert warned == ["hpcray: warning: image.ray_version 2.40.0 has no token authentication (Ray >= 2.52): "
                              "the head's dashboard will take jobs from anyone who reaches it; use an image with Ray "
                              ">= 2.52, or set auth: none to silence this"]


# ---------------------------------------------------------------------------------------------------------------
# A KubeRay cluster in the site in a box: interLink resolves the token into the plugin's files
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.reliability(
    case="secrets: a request through the API server's service proxy to a KubeRay head on interLink without its Ray "
         "token (site in a box)",
    sees="HTTP 401; `hpcray submit` sends the token from Secret NAME-hpcray-ray-token and the job SUCCEEDS",
    remains="the token in that Secret (kept by a second `up`, deleted by `down`) and, as interLink resolves "
            "secretKeyRef, in plaintext in the plugin's 0644 env file of each container and its debug log")
def test_a_cluster_in_the_box_runs_with_its_token_which_only_hpcray_and_the_hpc_side_hold(
        site_box: SiteBox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811 (the fixture)
    """Head and worker run Ray with the token (the worker's `wait-gcs-ready` health check and its Ray node need it
    too); through the access path (the API server's service proxy) a request without it gets 401 and hpcray's submit
    succeeds; a second `up` keeps the token; `down` removes its Secret. Where the token landed on the HPC side
    (interLink writes resolved env values into the plugin's env files and debug log) is printed and checked."""
    from hpcray import kube
    from tests.vega_box import scan_files

    assert site_box.api and site_box.info
    info = site_box.info
    monkeypatch.setenv("HPCRAY_STATE_DIR", str(tmp_path / "state"))
    profile = box_profile(site_box, tmp_path, "tok")
    up = hpcray("up", "-p", str(profile))
    try:
        assert up.returncode == 0 and "2 Ray node(s) alive" in up.stderr, up.stderr
        assert "created Secret tok-hpcray-ray-token with the cluster's Ray token" in up.stderr
        secret = site_box.api.get("secrets", "tok-hpcray-ray-token", info.namespace)
        assert secret and secret["metadata"]["labels"]["hpcray.io/profile"] == "tok"
        token = base64.b64decode(secret["data"]["token"]).decode()
        for pod in site_box.api.list("pods", info.namespace, labels="ray.io/cluster=tok-kuberay"):
            env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
            assert env["RAY_AUTH_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "tok-hpcray-ray-token",
                                                                           "key": "token"}}

        k = kube.connect(kube.Target(info.namespace, None, info.kubeconfig))
        proxy = kube.service_proxy(k, "tok-kuberay-head-svc", 8265)
        assert http.request(proxy, "GET", "/api/jobs/").status == 401
        assert http.request(proxy, "GET", "/api/jobs/", headers={"X-Ray-Authorization": f"Bearer {token}"}
                            ).status == 200
        done = hpcray("submit", "-p", str(profile), "hello", "--json")
        assert done.returncode == 0 and json.loads(done.stdout)["status"] == "SUCCEEDED", done.stderr
        assert "hello-from-slurm" in done.stderr

        shown = hpcray("dashboard", "-p", str(profile))  # through the service proxy: it prints the way and ends
        print(shown.stderr + shown.stdout)
        assert shown.returncode == 0 and "kubectl get secret tok-hpcray-ray-token -n default -o jsonpath=" \
            "'{.data.token}' | base64 -d" in shown.stderr, shown.stderr

        landed = scan_files([Path(info.data_root), Path(info.plugin_log)], token)
        print("the Ray token on the HPC side:\n" + "\n".join(f"  {landing.line()}" for landing in landed))
        assert {Path(landing.where).name for landing in landed} >= {"ray-head_envfile.properties",
                                                                    "wait-gcs-ready_envfile.properties",
                                                                    "ray-worker_envfile.properties"}
        assert not scan_files([tmp_path], token), "the token is on the user's side"
        for said in (up, done, shown):
            assert token not in said.stdout + said.stderr

        again = hpcray("up", "-p", str(profile))
        assert again.returncode == 0 and "created Secret" not in again.stderr, again.stderr
        kept = site_box.api.get("secrets", "tok-hpcray-ray-token", info.namespace)
        assert kept and kept["data"]["token"] == secret["data"]["token"]
    finally:
        down = hpcray("down", "-p", str(profile))
    assert down.returncode == 0 and "deleted Secret tok-hpcray-ray-token" in down.stderr, down.stderr
    assert site_box.api.get("secrets", "tok-hpcray-ray-token", info.namespace) is None
