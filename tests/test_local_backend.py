"""The local backend against real Ray and a real MLflow server: up, a job, down, and nothing left behind."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from hpcray.backends import local
from hpcray.backends.local import find_leftovers
from hpcray.errors import ClusterError, ClusterNotReady, CredentialsError
from hpcray.secrets import Secret
from hpcray.tracking import Credentials
from tests.fixtures_servers import START_TIMEOUT_S, RayHead, local_backend, local_profile

pytestmark = pytest.mark.slow


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status == 200
    except OSError:
        return False


def cmdlines_containing(value: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if value.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            pass
    return found


def files_containing(root: Path, value: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and value.encode() in p.read_bytes()]


def run_job(address: str, entrypoint: str) -> str:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    job = client.submit_job(entrypoint=entrypoint)
    deadline = time.monotonic() + 120
    while not (status := client.get_job_status(job)).is_terminal():
        assert time.monotonic() < deadline, f"job {job} still {status} after 120 s"
        time.sleep(0.3)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs
    return logs


def test_up_runs_a_job_with_the_credentials_in_its_env_and_down_leaves_nothing(tmp_path: Path,
                                                                               ray_head: RayHead) -> None:
    from ray.job_submission import JobSubmissionClient

    value = secrets.token_urlsafe(24)
    # A tracking server that takes a login: the credential plan puts the credentials in the head's environment.
    profile = local_profile("jobs", tracking_uri="http://127.0.0.1:9", credentials="env")
    backend = local_backend(profile, tmp_path / "state")
    lines: list[str] = []

    t0 = time.monotonic()
    status = backend.up(timeout=START_TIMEOUT_S, progress=lines.append, credentials=Credentials("u", Secret(value)))
    print(f"up: {time.monotonic() - t0:.1f} s", *lines, sep="\n  ")
    address = backend.address()
    assert status.ready and status.address == address and address != ray_head.address
    assert [(n.role, n.phase) for n in status.nodes] == [("head", "Ready")]
    assert answers(address + "/api/version")
    plan = backend.plan(warn=print)
    assert [s.what for s in plan.steps] == [f"leave the running local cluster 'jobs' (pid {status.head.pid}, "
                                            f"dashboard {address}) as it is"]

    again = backend.up(timeout=START_TIMEOUT_S, progress=lines.append, credentials=Credentials("u", Secret("x")))
    assert again.address == address and again.head.pid == status.head.pid

    logs = run_job(address, "python -c \"import os, sys; "
                            "print(sys.executable, os.environ['MLFLOW_TRACKING_PASSWORD'])\"")
    assert f"{os.path.dirname(sys.executable)}/python {value}" in logs

    assert cmdlines_containing(value) == []
    assert files_containing(backend.dir, value) == []
    assert oct(os.stat(status.head.temp_dir).st_mode & 0o777) == "0o700"

    # A job's entrypoint runs in a session of its own and outlives Ray's own shutdown: down must stop it too.
    marker = f"hpcray-test-{secrets.token_hex(4)}"
    client = JobSubmissionClient(address)
    client.submit_job(entrypoint=f"python -c 'import time; time.sleep(600)' {marker}")
    deadline = time.monotonic() + 60
    while not cmdlines_containing(marker):
        assert time.monotonic() < deadline, "the sleeping job did not start within 60 s"
        time.sleep(0.3)

    temp_dir = status.head.temp_dir
    t0 = time.monotonic()
    assert backend.down(progress=lines.append) is True
    print(f"down: {time.monotonic() - t0:.1f} s")
    assert find_leftovers(temp_dir) == []
    assert cmdlines_containing(marker) == [], "a job's process outlived down"
    assert not os.path.exists(temp_dir)
    with pytest.raises(ClusterError, match="no local cluster 'jobs' is up"):
        backend.address()
    assert backend.down(progress=lines.append) is False
    assert not backend.status().exists

    assert answers(ray_head.address + "/api/version"), "down of one local cluster stopped another"
    head = ray_head.backend.status().head
    assert head is not None and find_leftovers(head.temp_dir)


def test_local_mlflow_server_starts_and_stops_with_the_cluster(tmp_path: Path) -> None:
    backend = local_backend(local_profile("tracked", mlflow_server=True), tmp_path / "state")
    t0 = time.monotonic()
    status = backend.up(timeout=START_TIMEOUT_S, progress=print)
    print(f"up with mlflow: {time.monotonic() - t0:.1f} s")
    uri = status.tracking_uri
    assert uri is not None and uri.startswith("http://127.0.0.1:") and backend.tracking_uri() == uri
    assert answers(uri + "/health")

    backend.down(progress=print)
    assert not answers(uri + "/health")
    assert backend.tracking_uri() is None
    assert status.head is not None and find_leftovers(status.head.temp_dir) == []


def test_the_plan_says_what_would_start_and_changes_nothing(tmp_path: Path) -> None:
    backend = local_backend(local_profile("planned", mlflow_server=True, num_cpus=3), tmp_path / "state")
    plan = backend.plan(ttl_s=3600, warn=print)
    [head, mlflow, wait] = [s.what for s in plan.steps]
    assert head.startswith("start a Ray head 'planned' on 127.0.0.1") and "3 CPU(s)" in head
    assert backend.temp_dir in head and str(backend.dir / "head.log") in head
    assert mlflow.startswith("start an MLflow server") and wait.endswith("and MLflow is healthy")
    assert plan.expires_at is not None and 3500 < plan.expires_at - time.time() <= 3600
    assert not (tmp_path / "state").exists() and not os.path.exists(backend.temp_dir)
    assert [s.what for s in backend.plan_down().steps] == ["do nothing: no local cluster 'planned' is up"]


@pytest.mark.reliability(
    case="bad input: the local head should pass MLflow credentials to its jobs but none are given (API)",
    sees="`the local head of 'NAME' gives its jobs MLflow credentials, but none were given; set …`",
    remains="nothing: no process, no state dir")
def test_credentials_the_plan_needs_are_required_before_anything_starts(tmp_path: Path) -> None:
    profile = local_profile("needs", tracking_uri="https://mlflow.example.org", credentials="env")
    backend = local_backend(profile, tmp_path / "state")
    with pytest.raises(CredentialsError, match="gives its jobs MLflow credentials, but none were given"):
        backend.up(timeout=START_TIMEOUT_S, progress=print)
    assert not (tmp_path / "state").exists() and find_leftovers(backend.temp_dir) == []


@pytest.mark.reliability(
    case="fault: the local Ray head exits while starting",
    sees="`the local Ray head of 'NAME' exited while starting; last lines of …/head.log: …`, exit 2",
    remains="nothing: no Ray process, no state file")
def test_a_head_that_dies_while_starting_is_reported_with_its_log(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    ray_argv = local._ray_argv
    monkeypatch.setattr(local, "_ray_argv", lambda *args: [*ray_argv(*args), "--no-such-option"])
    backend = local_backend(local_profile("broken"), tmp_path / "state")
    with pytest.raises(ClusterError, match=r"(?s)exited while starting.*head\.log.*--no-such-option"):
        backend.up(timeout=START_TIMEOUT_S, progress=print)
    assert not (backend.dir / "local.json").exists()
    assert find_leftovers(backend.temp_dir) == []


@pytest.mark.reliability(
    case="fault: the local MLflow store is still being made when the head is ready and the wait runs out",
    sees="`local cluster 'NAME': the MLflow store sqlite:///… was still being set up N s after the head was ready; "
         "check …`, exit 4",
    remains="nothing: the head is stopped, no state file")
def test_a_store_that_never_finishes_is_one_line_and_stops_the_head(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    hung = threading.Event()
    monkeypatch.setattr(local.LocalBackend, "_prepare_store", lambda self: hung.wait(60))
    monkeypatch.setattr(local, "STORE_GRACE_S", 0.5)
    monkeypatch.setattr(local.LocalBackend, "_wait_ready", lambda *args: None)  # the head counts as ready at once
    backend = local_backend(local_profile("hung", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db"), tmp_path / "state")
    try:
        with pytest.raises(ClusterNotReady, match=r"the MLflow store sqlite:///\S+ was still being set up") as err:
            backend.up(timeout=1, progress=print)
    finally:
        hung.set()
    assert "\n" not in str(err.value) and err.value.exit_code == ClusterNotReady.exit_code
    assert not (backend.dir / "local.json").exists()
    assert find_leftovers(backend.temp_dir) == []


@pytest.mark.reliability(
    case="fault: a state file whose head is gone (machine rebooted, head killed)",
    sees="`status` shows the head Failed (`the head process N is gone`); `down` cleans up",
    remains="nothing after `down`")
def test_a_stale_state_file_is_cleaned_up(tmp_path: Path) -> None:
    backend = local_backend(local_profile("stale"), tmp_path / "state")
    assert not backend.status().exists and backend.down(progress=print) is False
    assert not backend.dir.exists()  # looking at a cluster never started leaves nothing behind
    dead = subprocess.Popen(["true"])
    dead.wait()
    backend.dir.mkdir(parents=True)
    (backend.dir / "local.json").write_text(json.dumps(
        {"pid": dead.pid, "temp_dir": backend.temp_dir, "ports": {"dashboard-port": 1}, "started_at": 0}))

    status = backend.status()
    assert status.exists and not status.ready and status.nodes[0].phase == "Failed"
    with pytest.raises(ClusterError, match="no local cluster 'stale' is up"):
        backend.address()
    assert backend.down(progress=print) is True
    assert not (backend.dir / "local.json").exists()
    assert backend.down(progress=print) is False


@pytest.mark.reliability(
    case="bad input: local.dashboard_port already in use",
    sees="`dashboard port N is in use or in another Ray's port range; set local.dashboard_port: 0 …`, exit 2",
    remains="nothing")
def test_a_busy_dashboard_port_is_refused(tmp_path: Path, ray_head: RayHead) -> None:
    busy = int(ray_head.address.rsplit(":", 1)[1])
    backend = local_backend(local_profile("busy", dashboard_port=busy), tmp_path / "state")
    with pytest.raises(ClusterError, match=f"dashboard port {busy} is in use"):
        backend.up(timeout=START_TIMEOUT_S, progress=print)
    assert not backend.status().exists
