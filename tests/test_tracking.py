"""MLflow preflight and credentials delivery: a real MLflow server with basic auth, real Ray heads.

Passwords are generated per run (secrets.token_urlsafe) and must never show outside the environment of the
processes that need them.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import yaml

from hpcray.jobs import JobsApi
from hpcray.profile import load_profile
from hpcray.secrets import Secret
from hpcray.state import QUIET_ENV
from hpcray.errors import TrackingError
from hpcray.tracking import PASSWORD_VAR, USERNAME_VAR, Credentials, preflight
from tests.test_jobs import free_port, hpcray, job_ids, one_error_line, popen_hpcray

pytestmark = pytest.mark.slow

JOB_SCRIPT = """\
import os
import time

import mlflow

with mlflow.start_run(run_name="hpcray-e2e") as run:  # experiment and server come from MLFLOW_* env vars
    mlflow.log_param("epochs", 2)
    mlflow.log_metric("loss", 0.5)
    print("RUN_ID", run.info.run_id, flush=True)
    time.sleep(float(os.environ.get("HOLD_S", "0")))  # lets a test read every process's argv meanwhile
"""


def new_user(mlflow_server: Any) -> Credentials:
    user, password = f"u{secrets.token_hex(4)}", secrets.token_urlsafe(24)
    mlflow_server.create_user(user, password)
    return Credentials(user, Secret(password))


def admin_rest(mlflow_server: Any, method: str, path: str, body: dict[str, Any] | None = None,
               api: str = "2.0") -> dict[str, Any]:
    user, password = mlflow_server.admin
    headers = {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    if body is not None:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(f"{mlflow_server.url}/api/{api}/mlflow/{path}", method=method, headers=headers,
                                     data=json.dumps(body).encode() if body is not None else None)
    with urllib.request.urlopen(request, timeout=30) as response:
        return dict(json.loads(response.read() or b"{}"))


def experiment_id(mlflow_server: Any, name: str) -> str:
    found = admin_rest(mlflow_server, "GET", f"experiments/get-by-name?experiment_name={quote(name)}")
    return str(found["experiment"]["experiment_id"])


def runs(mlflow_server: Any, experiment: str) -> list[dict[str, Any]]:
    body = {"experiment_ids": [experiment_id(mlflow_server, experiment)], "run_view_type": "ACTIVE_ONLY"}
    return list(admin_rest(mlflow_server, "POST", "runs/search", body).get("runs", []))


def permission(mlflow_server: Any, experiment: str, user: str) -> str:
    eid = experiment_id(mlflow_server, experiment)
    found = admin_rest(mlflow_server, "GET", f"users/permissions/get?username={user}&resource_type=experiment&"
                                             f"resource_id={eid}", api="3.0")
    return str(found["permission"])


def profile_file(directory: Path, name: str, mlflow: dict[str, Any]) -> Path:
    (directory / "wd").mkdir(exist_ok=True)
    (directory / "wd" / "log_metric.py").write_text(JOB_SCRIPT)
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        # auth none: these tests read the head's Jobs API with Ray's own clients (test_auth.py covers the token)
        "name": name, "backend": "local", "local": {"num_cpus": 1}, "auth": "none",
        "mlflow": {"credentials": "env", **mlflow},
        "jobs": {"train": {"entrypoint": "python log_metric.py", "working_dir": "wd"}}}))
    return path


def creds_env(c: Credentials) -> dict[str, str]:
    return {USERNAME_VAR: c.username, PASSWORD_VAR: c.password.reveal()}


def files_containing(needle: bytes, *roots: Path) -> list[str]:
    hits = []
    for root in roots:
        for path in Path(root).rglob("*"):
            try:
                if path.is_file() and not path.is_symlink() and path.stat().st_size < 50 * 2**20 \
                        and needle in path.read_bytes():
                    hits.append(str(path))
            except OSError:  # a socket, or gone meanwhile
                continue
    return hits


def argv_containing(needle: bytes) -> list[str]:
    hits = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    if needle in f.read():
                        hits.append(entry.name)
            except OSError:
                continue
    return hits


@pytest.fixture(autouse=True)
def own_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """hpcray's state (local heads, the package cache) of each test, for it and the hpcray processes it starts."""
    monkeypatch.setenv("HPCRAY_STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state"


# ---------------------------------------------------------------------------------------------------------------
# Credentials reach the job through the head's environment, and nowhere else
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def head_with_credentials(mlflow_server: Any, tmp_path: Path, own_state_dir: Path) -> Any:
    """A head of its own, started with one user's MLflow credentials in its environment (as `hpcray up` does)."""
    from types import SimpleNamespace

    from hpcray.backends.local import LocalBackend

    credentials = new_user(mlflow_server)
    experiment = f"e2e-{secrets.token_hex(4)}"
    profile = profile_file(tmp_path, f"creds-{secrets.token_hex(3)}",
                           {"tracking_uri": mlflow_server.url, "experiment": experiment})
    backend = LocalBackend(load_profile(profile))
    backend.up(timeout=120, progress=lambda _: None, credentials=credentials)
    try:
        yield SimpleNamespace(credentials=credentials, experiment=experiment, profile=profile,
                              address=backend.address(), temp_dir=Path(backend.temp_dir), state=own_state_dir)
    finally:
        backend.down(progress=lambda _: None)


@pytest.mark.reliability(
    case="secrets: the MLflow password through `submit` on a head started with it",
    sees="the job logs to MLflow as the injected user; the password is in no output",
    remains="the password in no argv, Jobs API answer, `ray job list`, file, MLflow param or tag")
def test_job_logs_to_mlflow_as_the_injected_user_and_the_password_leaks_nowhere(
        mlflow_server: Any, head_with_credentials: Any, tmp_path: Path) -> None:
    h = head_with_credentials
    password = h.credentials.password.reveal().encode()
    hpcray_tmp = tmp_path / "hpcray-tmp"
    hpcray_tmp.mkdir()
    follower = popen_hpcray("submit", "-p", str(h.profile), "--env", "HOLD_S=1", "train",  # no --address: the
                            env={**creds_env(h.credentials), "TMPDIR": str(hpcray_tmp)})  # profile's own head
    api = JobsApi(h.address)
    ray_list = None
    leaking: set[str] = set()
    while follower.poll() is None:  # the argv of every process on the machine, while hpcray and the job run
        leaking.update(argv_containing(password))
        if ray_list is None and api.list():  # Ray's CLI takes seconds to start: list while the job runs
            ray_list = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "job", "list", "--address",
                                         h.address], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, **QUIET_ENV})
        time.sleep(0.05)
    out, err = follower.communicate()
    assert follower.returncode == 0, err
    assert not leaking, f"password in the argv of pids {leaking}"
    assert password.decode() not in out + err

    listed = api.call("GET", "/api/jobs/")
    assert listed.status == 200 and password.decode() not in listed.text
    assert ray_list is not None
    listed_out, listed_err = ray_list.communicate(timeout=60)
    assert ray_list.returncode == 0 and "raysubmit_" in listed_out, listed_err
    assert password.decode() not in listed_out + listed_err
    assert not files_containing(password, tmp_path, h.temp_dir)  # working dir, hpcray temp and state, Ray logs

    [run] = runs(mlflow_server, h.experiment)
    assert run["info"]["run_id"] in out
    assert run["data"]["metrics"][0]["key"] == "loss" and run["data"]["metrics"][0]["value"] == 0.5
    assert password.decode() not in json.dumps(run["data"])  # params and tags
    # The run's user_id is the OS user MLflow's client reports; who authenticated shows in the permissions: only the
    # injected user may write to this experiment, which the preflight created as that user.
    assert permission(mlflow_server, h.experiment, h.credentials.username) == "MANAGE"


def test_runtime_env_delivery_works_and_warns_that_the_dashboard_shows_it(
        mlflow_server: Any, ray_head: Any, tmp_path: Path) -> None:
    credentials = new_user(mlflow_server)
    experiment = f"renv-{secrets.token_hex(4)}"
    profile = profile_file(tmp_path, "renv", {"tracking_uri": mlflow_server.url, "experiment": experiment,
                                              "deliver": "runtime_env"})
    job_id = f"renv-{secrets.token_hex(3)}"
    done = hpcray("submit", "-p", str(profile), "--address", ray_head.address, "--submission-id", job_id, "train",
                  env=creds_env(credentials))
    assert done.returncode == 0, done.stderr
    assert "anyone who reaches the dashboard" in done.stderr
    assert len(runs(mlflow_server, experiment)) == 1
    password = credentials.password.reveal()
    assert password not in done.stdout + done.stderr
    assert password in JobsApi(ray_head.address).call("GET", f"/api/jobs/{job_id}").text, "why it is opt-in"
    for shown in (hpcray("list", "--address", ray_head.address, "--json"),
                  hpcray("job-status", "--address", ray_head.address, job_id, "--json")):
        assert shown.returncode == 0 and password not in shown.stdout
        assert PASSWORD_VAR in shown.stdout


# ---------------------------------------------------------------------------------------------------------------
# Preflight: one line, exit 2, nothing submitted
# ---------------------------------------------------------------------------------------------------------------


def submit_refused(ray_head: Any, profile: Path, env: dict[str, str]) -> str:
    before = job_ids(JobsApi(ray_head.address))
    done = hpcray("submit", "-p", str(profile), "--address", ray_head.address, "train", env=env)
    assert done.returncode == 2, done.stderr
    assert job_ids(JobsApi(ray_head.address)) == before, "nothing may be submitted"
    return one_error_line(done.stderr)


@pytest.mark.reliability(
    case="bad input: MLflow wrong password via submit (subprocess, real Ray)",
    sees="`the MLflow server at URL rejected user 'U' (401: wrong username or password); …`, exit 2",
    remains="nothing (no job submitted)")
def test_wrong_password_is_refused_before_submitting(mlflow_server: Any, ray_head: Any, tmp_path: Path) -> None:
    credentials = new_user(mlflow_server)
    wrong = secrets.token_urlsafe(24)
    profile = profile_file(tmp_path, "wrongpw", {"tracking_uri": mlflow_server.url, "experiment": "x"})
    line = submit_refused(ray_head, profile, {USERNAME_VAR: credentials.username, PASSWORD_VAR: wrong})
    assert f"rejected user '{credentials.username}' (401" in line and wrong not in line


@pytest.mark.reliability(
    case="bad input: MLflow down via submit (subprocess, real Ray)",
    sees="`the MLflow server at URL does not answer (Connection refused); …`, exit 2",
    remains="nothing (no job submitted)")
def test_unreachable_mlflow_is_refused_before_submitting(mlflow_server: Any, ray_head: Any, tmp_path: Path) -> None:
    credentials = new_user(mlflow_server)
    profile = profile_file(tmp_path, "down", {"tracking_uri": f"http://127.0.0.1:{free_port()}", "experiment": "x"})
    line = submit_refused(ray_head, profile, creds_env(credentials))
    assert "does not answer" in line and "Connection refused" in line


@pytest.mark.reliability(
    case="bad input: MLflow experiment of another user via submit (subprocess, real Ray)",
    sees="`user 'U' may not write to MLflow experiment 'E' (403 …); set mlflow.experiment to a free name such as "
         "'E-U'`, exit 2",
    remains="nothing (no job, no MLflow run)")
def test_foreign_experiment_is_refused_with_a_free_name(mlflow_server: Any, ray_head: Any, tmp_path: Path) -> None:
    owner, intruder = new_user(mlflow_server), new_user(mlflow_server)
    experiment = f"owned-{secrets.token_hex(4)}"
    mlflow_server.create_experiment_as(owner.username, owner.password.reveal(), experiment)
    profile = profile_file(tmp_path, "foreign", {"tracking_uri": mlflow_server.url, "experiment": experiment})
    line = submit_refused(ray_head, profile, creds_env(intruder))
    assert f"user '{intruder.username}' may not write to MLflow experiment '{experiment}' (403" in line
    assert f"'{experiment}-{intruder.username}'" in line
    assert runs(mlflow_server, experiment) == []


@pytest.mark.reliability(
    case="bad input: no MLflow credentials for a server that requires a login",
    sees="`the MLflow server at URL requires a login (401); set mlflow.credentials in the profile …`, exit 2",
    remains="nothing (no job submitted)")
def test_no_credentials_for_a_server_that_requires_them(mlflow_server: Any, ray_head: Any, tmp_path: Path) -> None:
    profile = profile_file(tmp_path, "anon", {"tracking_uri": mlflow_server.url, "experiment": "x",
                                              "credentials": "none"})
    assert "requires a login (401)" in submit_refused(ray_head, profile, {})


def test_preflight_creates_a_missing_experiment_for_the_user_and_leaves_no_run(mlflow_server: Any,
                                                                             tmp_path: Path) -> None:
    credentials = new_user(mlflow_server)
    experiment = f"fresh-{secrets.token_hex(4)}"
    profile = load_profile(profile_file(tmp_path, "fresh", {"tracking_uri": mlflow_server.url,
                                                            "experiment": experiment}))
    preflight(profile, credentials)
    preflight(profile, credentials)  # the second time it exists and is written to
    assert permission(mlflow_server, experiment, credentials.username) == "MANAGE"
    assert runs(mlflow_server, experiment) == []


def test_preflight_speaks_http_without_importing_mlflow(mlflow_server: Any, tmp_path: Path) -> None:
    credentials = new_user(mlflow_server)
    profile = profile_file(tmp_path, "light", {"tracking_uri": mlflow_server.url, "experiment": "light"})
    code = ("import sys\nfrom hpcray.profile import load_profile\nfrom hpcray.tracking import credential_plan, "
            "preflight\np = load_profile(sys.argv[1])\npreflight(p, credential_plan(p).load())\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlflow', 'ray')))\n")
    done = subprocess.run([sys.executable, "-c", code, str(profile)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **QUIET_ENV, **creds_env(credentials)})
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


def test_a_password_in_the_tracking_uri_is_refused(tmp_path: Path) -> None:
    from hpcray.errors import ProfileError

    path = profile_file(tmp_path, "inuri", {"tracking_uri": "http://u:p@127.0.0.1:1", "experiment": "x"})
    with pytest.raises(ProfileError, match="mlflow.tracking_uri: the URL 'http://u:\\*\\*\\*@…' carries a password"):
        load_profile(path)  # refused with the profile, before any command can print or send it


def test_local_store_keeps_artifacts_beside_it_and_warns_about_an_experiment_that_does_not(tmp_path: Path) -> None:
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from hpcray.tracking import prepare_local_store

    db = tmp_path / "store" / "mlflow.db"
    uri = f"sqlite:///{db}"
    assert prepare_local_store(uri, "mine") is None  # made: the store, and the experiment
    assert prepare_local_store(uri, "mine") is None  # there already: nothing to say
    store = SqlAlchemyStore(uri, (tmp_path / "elsewhere").as_uri())  # as a job in its Ray working dir would
    assert store.get_experiment_by_name("mine").artifact_location == f"{(db.parent / 'artifacts').as_uri()}/1"
    store.create_experiment("theirs")
    warning = prepare_local_store(uri, "theirs")
    assert warning is not None and "'theirs'" in warning and str(tmp_path / "elsewhere") in warning
    assert "set mlflow.experiment to a new name" in warning


def test_a_local_store_that_is_not_mlflows_is_one_line(tmp_path: Path) -> None:
    from hpcray.tracking import prepare_local_store

    db = tmp_path / "mlflow.db"
    db.write_bytes(b"not a database, just some bytes" * 100)
    with pytest.raises(TrackingError) as raised:
        prepare_local_store(f"sqlite:///{db}", "mine")
    message = str(raised.value)
    assert message.startswith(f"cannot prepare the local MLflow store {db}: ") and "\n" not in message
    assert message.endswith("remove it (the runs in it are lost) or set mlflow.tracking_uri")
    assert db.read_bytes().startswith(b"not a database")  # left as it was
