"""The whole local flow with a known MLflow password, and every place it could leak scanned for it.

`hpcray up` → `hpcray submit` of a job that logs to the basic-auth MLflow server as the injected user → `hpcray list`,
`job-status`, `logs` → `hpcray down`, with `mlflow.credentials: env` (the password only in hpcray's environment).
The password is made at run time. Scanned: the argv of every process on the machine, sampled all along; every file
under the test's directory (hpcray's state, temp and working dirs) and Ray's temp dir of the head; each command's
stdout and stderr; the Jobs API (`GET /api/jobs/`, `GET /api/jobs/<id>`) and `ray job list`; the MLflow run's
params and tags. The job proves it had the password by printing its SHA-256, never the password itself.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from hpcray.secrets import Secret
from hpcray.state import QUIET_ENV

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent

JOB = """\
import hashlib
import os
import time

import mlflow

password = os.environ["MLFLOW_TRACKING_PASSWORD"]  # from the head's environment, put there by `hpcray up`
print("password sha256", hashlib.sha256(password.encode()).hexdigest(), flush=True)
with mlflow.start_run(run_name="secrets-e2e") as run:  # server and experiment come from MLFLOW_* env vars
    mlflow.log_param("epochs", 2)
    mlflow.log_metric("loss", 0.25)
    print("RUN_ID", run.info.run_id, flush=True)
time.sleep(2)  # while the job runs, every process's argv is sampled
"""


class ArgvSampler(threading.Thread):
    """Reads /proc/*/cmdline of every process, over and over, and keeps those that contain the needle."""

    def __init__(self, needle: bytes) -> None:
        super().__init__(daemon=True)
        self.needle, self.hits, self.samples, self.seen = needle, {}, 0, set()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for entry in os.scandir("/proc"):
                if entry.name.isdigit():
                    try:
                        with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                            argv = f.read()
                    except OSError:
                        continue
                    self.seen.add(argv)
                    if self.needle in argv:
                        self.hits[int(entry.name)] = argv.replace(b"\0", b" ")[:200]
            self.samples += 1
            self.done.wait(0.05)

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=10)


def files_containing(needle: bytes, root: Path) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
                hits.append(str(path))
        except OSError:  # a socket, or gone meanwhile
            continue
    return hits


def admin(server: Any, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    token = base64.b64encode(":".join(server.admin).encode()).decode()
    headers = {"Authorization": f"Basic {token}", **({"Content-Type": "application/json"} if body else {})}
    request = urllib.request.Request(f"{server.url}/api/2.0/mlflow/{path}", method=method, headers=headers,
                                     data=json.dumps(body).encode() if body else None)
    with urllib.request.urlopen(request, timeout=30) as response:
        return dict(json.load(response))


def get(url: str, token: Path) -> str:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token.read_text()}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return str(response.read().decode())


@pytest.mark.reliability(
    case="secrets: the MLflow password through up → submit → list/job-status/logs → down (local backend)",
    sees="the job logs to MLflow as the injected user; the password is in no output",
    remains="the password in no argv of any process, no file hpcray or Ray wrote, no Jobs API answer or `ray job "
            "list`, no MLflow param or tag")
def test_the_password_reaches_the_job_and_nothing_else(mlflow_server: Any, tmp_path: Path) -> None:
    user, password = f"u{secrets.token_hex(4)}", secrets.token_urlsafe(24)
    mlflow_server.create_user(user, password)
    experiment = f"secrets-{secrets.token_hex(4)}"
    (tmp_path / "wd").mkdir()
    (tmp_path / "wd" / "log_metric.py").write_text(JOB)
    profile = tmp_path / "secrets.yaml"
    profile.write_text(yaml.safe_dump({
        "name": f"sec-{secrets.token_hex(3)}", "backend": "local", "local": {"num_cpus": 1},
        "mlflow": {"tracking_uri": mlflow_server.url, "experiment": experiment, "credentials": "env"},
        "jobs": {"train": {"entrypoint": "python log_metric.py", "working_dir": "wd"}}}))
    for d in ("state", "tmp", "cache"):
        (tmp_path / d).mkdir()
    env = {**os.environ, **QUIET_ENV, "HPCRAY_STATE_DIR": str(tmp_path / "state"), "TMPDIR": str(tmp_path / "tmp"),
           "XDG_CACHE_HOME": str(tmp_path / "cache"), "MLFLOW_TRACKING_USERNAME": user,
           "MLFLOW_TRACKING_PASSWORD": password}
    outputs: list[str] = []

    def hpcray(*args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([str(BIN / "hpcray"), *args, "-p", str(profile)],
                              capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
        outputs.extend([done.stdout, done.stderr])
        assert done.returncode == 0, f"hpcray {' '.join(args)}:\n{done.stderr}"
        return done

    sampler = ArgvSampler(password.encode())
    sampler.start()
    up_done = False
    try:
        up = json.loads(hpcray("up", "--json").stdout)
        up_done = True
        ray_temp, address = Path(up["head"]["temp_dir"]), up["address"]
        submit = hpcray("submit", "train", "--json")  # the job's output goes to stderr, the result to stdout
        job_id = json.loads(submit.stdout)["submission_id"]
        assert f"password sha256 {hashlib.sha256(password.encode()).hexdigest()}" in submit.stderr
        run_id = re.search(r"RUN_ID (\w+)", submit.stderr).group(1)  # type: ignore[union-attr]
        assert job_id in hpcray("list").stdout
        assert hpcray("job-status", job_id).stdout.startswith(f"job {job_id}: SUCCEEDED")
        assert run_id in hpcray("logs", job_id).stdout

        [token] = (tmp_path / "state").glob("*/ray-token")  # the head runs with Ray's token authentication
        served = [get(f"{address}/api/jobs/", token), get(f"{address}/api/jobs/{job_id}", token)]
        assert job_id in served[0] and json.loads(served[1])["status"] == "SUCCEEDED"
        ray_list = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], capture_output=True,
                                  text=True, env={**os.environ, **QUIET_ENV, "RAY_AUTH_MODE": "token",
                                                  "RAY_AUTH_TOKEN_PATH": str(token)}, timeout=120)
        assert ray_list.returncode == 0 and job_id in ray_list.stdout, ray_list.stderr
        leaked_files = files_containing(password.encode(), tmp_path) + files_containing(password.encode(), ray_temp)
        assert list(ray_temp.rglob("*.log")), "Ray's logs were scanned"  # the head's temp dir, before `down` removes it
    finally:
        if up_done:
            hpcray("down")
        sampler.stop()

    assert sampler.samples > 20 and any(b"log_metric.py" in a for a in sampler.seen), "sampled while the job ran"
    assert sampler.hits == {}, f"the password is in the argv of {sampler.hits}"
    assert leaked_files == [], f"the password is in {leaked_files}"
    for text in [*outputs, *served, ray_list.stdout, ray_list.stderr]:
        assert password not in text

    run = admin(mlflow_server, "GET", f"runs/get?run_id={run_id}")["run"]
    assert run["info"]["user_id"] == user, "the job logged as the injected user"
    assert {m["key"]: m["value"] for m in run["data"]["metrics"]} == {"loss": 0.25}
    assert {t["key"]: t["value"] for t in run["data"]["tags"]}["mlflow.user"] == user
    assert password not in json.dumps(run["data"]["params"]) + json.dumps(run["data"]["tags"])


CASES = [  # backend, tracking_uri, credentials, deliver → where the credentials go
    ("kuberay", "https://mlflow.example.org", "env", "secret", "secret"),
    ("kuberay", "https://mlflow.example.org", "file", "runtime_env", "runtime_env"),
    ("kuberay", "https://mlflow.example.org", "none", "secret", None),
    ("kuberay", "file:///data/mlruns", "env", "secret", None),  # a local store takes no login
    ("kuberay", "sqlite:////data/mlflow.db", "stdin", "secret", None),
    ("kuberay", None, "env", "secret", None),
    ("local", "http://127.0.0.1:5000", "env", "secret", "head_env"),
    ("local", "http://127.0.0.1:5000", "env", "runtime_env", "runtime_env"),
    ("local", "sqlite:////tmp/mlflow.db", "env", "secret", None),
]


@pytest.mark.parametrize(("backend", "uri", "source", "deliver", "where"), CASES)
def test_one_credential_plan_for_render_and_delivery(backend: str, uri: str | None, source: str, deliver: str,
                                                     where: str | None) -> None:
    """Who needs MLflow credentials and where they go, once: the values reference the Secret exactly when the
    plan puts them there, and credentials are read only when someone needs them."""
    from hpcray.profile import MlflowSpec, Profile
    from hpcray.render import mlflow_env
    from hpcray.tracking import Credentials, credential_plan

    p = Profile(name="cp", backend=backend, source=Path("/nonexistent/cp.yaml"),
                mlflow=MlflowSpec(tracking_uri=uri, credentials=source, deliver=deliver,
                                  credentials_file="cred" if source == "file" else None))
    plan = credential_plan(p)
    assert plan.where == where
    refs = [e["valueFrom"]["secretKeyRef"] for e in mlflow_env(p) if "valueFrom" in e]
    assert refs == ([{"name": "cp-hpcray-mlflow", "key": "username"}, {"name": "cp-hpcray-mlflow", "key": "password"}]
                    if where == "secret" else [])
    assert plan.in_cluster == (where in ("secret", "head_env")) and plan.in_job == (where == "runtime_env")
    environ = {"MLFLOW_TRACKING_USERNAME": "u", "MLFLOW_TRACKING_PASSWORD": "pw"}
    if where is None:
        assert plan.load(environ={}) is None  # nothing is read, nothing is missing
    elif source == "env":
        assert plan.load(environ=environ) == Credentials("u", Secret("pw"))
