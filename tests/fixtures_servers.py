"""A real Ray head and a real MLflow server (basic auth) for the test session, on 127.0.0.1, stopped by PID."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal
from unittest import mock

import pytest

from hpcray.backends.local import LocalBackend, choose_ports
from hpcray.profile import LocalSpec, MlflowSpec, Profile
from hpcray.state import QUIET_ENV

START_TIMEOUT_S = 180.0  # measured ~8 s (Ray) and ~15 s (MLflow) on an idle 2-core box; tests run beside others


def local_profile(name: str, *, mlflow_server: bool = False, num_cpus: int | None = 1, dashboard_port: int = 0,
                  tracking_uri: str | None = None,
                  credentials: Literal["env", "file", "stdin", "none"] = "none") -> Profile:
    """A local profile, as load_profile makes it from YAML (without the default sqlite store: no tracking_uri), but
    without Ray's token authentication: tests reach these heads by address with Ray's own clients, as a Ray of the
    user's own (test_auth.py covers the token)."""
    return Profile(name=name, backend="local", source=Path(f"{name}.yaml").resolve(), auth="none",
                   local=LocalSpec(num_cpus=num_cpus, mlflow_server=mlflow_server, dashboard_port=dashboard_port),
                   mlflow=MlflowSpec(tracking_uri=tracking_uri, credentials=credentials))


def local_backend(profile: Profile, state: Path) -> LocalBackend:
    """A LocalBackend whose state lives in ``state`` (bound at construction, whatever tests do to the env later)."""
    with mock.patch.dict(os.environ, {"HPCRAY_STATE_DIR": str(state)}):
        return LocalBackend(profile)


@dataclass
class RayHead:
    address: str
    backend: LocalBackend


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    """A local Ray head started by hpcray's LocalBackend, shared by the session."""
    os.environ.update(QUIET_ENV)
    backend = local_backend(local_profile("session-head"), tmp_path_factory.mktemp("ray-head-state"))
    backend.up(timeout=START_TIMEOUT_S, progress=lambda line: print(f"ray_head: {line}", file=sys.stderr))
    try:
        yield RayHead(address=backend.address(), backend=backend)
    finally:
        backend.down(progress=lambda line: print(f"ray_head: {line}", file=sys.stderr))


@dataclass
class MlflowServer:
    url: str
    admin: tuple[str, str]  # (username, password)

    def create_user(self, username: str, password: str) -> None:
        self._post("/api/2.0/mlflow/users/create", {"username": username, "password": password}, self.admin)

    def create_experiment_as(self, user: str, password: str, name: str) -> str:
        """An experiment owned by ``user`` (others get the default READ permission on it)."""
        return str(self._post("/api/2.0/mlflow/experiments/create", {"name": name}, (user, password))
                   ["experiment_id"])

    def _post(self, path: str, body: dict[str, Any], auth: tuple[str, str]) -> dict[str, Any]:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json",
                                                  "Authorization": f"Basic {token}"})
        try:
            with urllib.request.urlopen(request, timeout=30) as resp:
                return json.load(resp) if resp.length != 0 else {}
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"POST {path} as {auth[0]}: HTTP {exc.code} {exc.read()[:300]!r}") from None


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """`mlflow server --app-name basic-auth` on a fresh sqlite store; the admin password is made at run time."""
    os.environ.update(QUIET_ENV)
    work = tmp_path_factory.mktemp("mlflow-server")
    admin = ("admin", secrets.token_urlsafe(16))
    (work / "basic_auth.ini").write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{work / 'auth.db'}\n"
        f"admin_username = {admin[0]}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    env = {**os.environ, **QUIET_ENV,
           "MLFLOW_AUTH_CONFIG_PATH": str(work / "basic_auth.ini"),
           "MLFLOW_AUTH_ADMIN_PASSWORD": admin[1],  # in the server's environment only, never in a file
           "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_urlsafe(32),
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    port = choose_ports()["mlflow"]
    argv = [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--app-name", "basic-auth",
            "--host", "127.0.0.1", "--port", str(port), "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}",
            "--artifacts-destination", str(work / "artifacts"), "--workers", "1"]
    log_path = work / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, env=env, cwd=work, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_health(url, proc, log_path)
        yield MlflowServer(url=url, admin=admin)
    finally:
        stop_group(proc)


def _wait_health(url: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
    state = f"exited with {proc.returncode}" if proc.returncode is not None else f"no /health in {START_TIMEOUT_S} s"
    stop_group(proc)
    pytest.fail(f"mlflow server at {url} {state}; last lines of {log_path}:\n{tail}", pytrace=False)


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group (it leads its own session), SIGKILL what is left after 10 s."""
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader, else the group never empties
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
