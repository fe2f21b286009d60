"""hpcray submit / logs / stop / list / job-status against a real Ray head (the session's `ray_head`)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest

from hpcray import jobs
from hpcray.errors import ClusterError, JobNotFound, JobsApiRefused, RayApiMoved, RayVersionError, UnknownJob
from hpcray.profile import ItwinaiSpec, JobSpec, load_profile
from hpcray.secrets import Secret
from hpcray.state import QUIET_ENV
from tests.tcp_proxy import TcpProxy
from tests.hpcray_cli import run, start

pytestmark = pytest.mark.slow


def hpcray(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run(*args, extra_env=env, timeout=timeout)


def popen_hpcray(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return start(*args, extra_env=env)


def uid(prefix: str) -> str:
    """A submission id no other run on the same head has used."""
    return f"{prefix}-{secrets.token_hex(3)}"


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("hpcray: error: "), stderr
    return lines[0]


def wait_status(api: jobs.JobsApi, job_id: str, wanted: set[str], timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = str(api.info(job_id)["status"])
        except JobNotFound:
            status = "NOT-YET"
        if status in wanted:
            return status
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never reached {wanted}")


def job_ids(api: jobs.JobsApi) -> set[str]:
    return {j["submission_id"] for j in api.list() if j.get("submission_id")}


def write_profile(directory: Path, mlflow: dict[str, Any] | None = None, jobs_: dict[str, Any] | None = None) -> Path:
    """A local-backend profile; the tests reach its cluster with --address."""
    import yaml

    data = {"name": "jobs-test", "backend": "local", "image": {"ray_version": "2.60.0"},
            "mlflow": mlflow or {"credentials": "none"}, "jobs": jobs_ or {}}
    path = directory / "profile.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def api(ray_head: Any) -> jobs.JobsApi:
    return jobs.JobsApi(ray_head.address)


@pytest.fixture(autouse=True)
def own_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """hpcray's state (the package cache) of each test, for it and the hpcray processes it starts."""
    monkeypatch.setenv("HPCRAY_STATE_DIR", str(tmp_path / "state"))


# ---------------------------------------------------------------------------------------------------------------
# Following jobs, exit codes, Ctrl-C
# ---------------------------------------------------------------------------------------------------------------


def test_submit_follows_a_1s_job_and_returns_soon_after_it_ends(ray_head: Any, api: jobs.JobsApi) -> None:
    job_id = uid("follow-1s")
    done = hpcray("submit", "--address", ray_head.address, "--submission-id", job_id, "--",
                  "echo start; sleep 1; echo end")
    returned = time.time()
    assert done.returncode == 0, done.stderr
    assert "start" in done.stdout and "end" in done.stdout
    assert f"job {job_id} SUCCEEDED" in done.stderr
    ended = api.info(job_id)["end_time"] / 1000
    assert returned - ended < 3.0, "submit should return promptly, not wait for Ray's log tail to close"


@pytest.mark.reliability(
    case="fault: a submitted job fails",
    sees="Ray's reason in one line (`Job entrypoint command failed with exit code 7`), `job ID FAILED`; exit 1",
    remains="the failed job in the cluster's job list")
def test_exit_code_mirrors_the_job(ray_head: Any) -> None:
    cases = {uid("ok"): ("exit 0", 0, "job {} SUCCEEDED"),
             uid("fails"): ("echo oops; exit 7", 1, "Job entrypoint command failed with exit code 7\njob {} FAILED")}
    running = {job_id: popen_hpcray("submit", "--address", ray_head.address, "--submission-id", job_id, "--", command)
               for job_id, (command, _, _) in cases.items()}  # side by side: each takes Ray ~2.5 s
    for job_id, (_, code, ending) in cases.items():
        _, err = running[job_id].communicate(timeout=120)
        assert running[job_id].returncode == code, err
        assert err.rstrip().endswith(ending.format(job_id))


@pytest.mark.reliability(
    case="fault: a followed job is stopped from elsewhere (`hpcray stop`)",
    sees="`job ID STOPPED`; the follower exits 3",
    remains="the stopped job in the cluster's job list")
def test_stop_ends_a_followed_job_with_exit_3(ray_head: Any, api: jobs.JobsApi) -> None:
    job_id = uid("to-stop")
    follower = popen_hpcray("submit", "--address", ray_head.address, "--submission-id", job_id, "--", "sleep 60")
    wait_status(api, job_id, {"RUNNING"})
    stopped = hpcray("stop", "--address", ray_head.address, job_id)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.strip() == f"job {job_id} STOPPED"
    assert follower.wait(timeout=30) == 3


@pytest.mark.parametrize(("mode", "after"), [("stop", "STOPPED"), ("detach", "RUNNING")])
@pytest.mark.reliability(
    case="fault: Ctrl-C while `submit` follows a job",
    sees="the job is stopped, or (--on-interrupt detach) `… keeps running: hpcray logs -f ID`; exit 130",
    remains="a STOPPED job, or with detach the job still running")
def test_ctrl_c_while_following_stops_or_detaches(ray_head: Any, api: jobs.JobsApi, mode: str, after: str) -> None:
    job_id = uid(f"ctrl-c-{mode}")
    extra = [] if mode == "stop" else ["--on-interrupt", "detach"]  # stop is the default
    follower = popen_hpcray("submit", "--address", ray_head.address, "--submission-id", job_id, *extra, "--",
                            "sleep 60")
    wait_status(api, job_id, {"RUNNING"})
    follower.send_signal(signal.SIGINT)
    _, err = follower.communicate(timeout=30)
    assert follower.returncode == 130, err
    assert api.info(job_id)["status"] == after
    if mode == "detach":
        assert f"hpcray logs -f {job_id}" in err
        api.stop(job_id)


# ---------------------------------------------------------------------------------------------------------------
# The log stream: each byte once, as it comes; through drops, proxies that refuse websockets, the API server
# ---------------------------------------------------------------------------------------------------------------


def follow_through(relay: TcpProxy, job_id: str) -> subprocess.Popen[str]:
    return popen_hpcray("logs", "-f", "--address", relay.address, job_id)


def submit_job(api: jobs.JobsApi, prefix: str, script: str) -> str:
    """A job running a Python script. Ray writes the entrypoint into the log first: what a test looks for in the
    output must not be spelled out in the script."""
    import shlex

    job_id = uid(prefix)
    api.submit({"entrypoint": f"python -c {shlex.quote(script)}", "submission_id": job_id})
    return job_id


def read_line_with(stream: Any, needle: str, timeout: float = 60) -> None:
    """Read `stream` until a line holding `needle`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline()
        if needle in line:
            return
        assert line, f"stream ended before {needle!r}"
    raise AssertionError(f"no {needle!r} within {timeout} s")


def drain(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[str, str]:
    """The rest of a follower's stdout, read through the buffered reader lines were already read from (communicate()
    would skip what it holds), and its stderr; the follower is killed after `timeout`."""
    assert proc.stdout is not None and proc.stderr is not None
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    try:
        rest, err = proc.stdout.read(), proc.stderr.read()
        proc.wait()
    finally:
        killer.cancel()
    return rest, err


def test_following_a_chatty_job_shows_output_as_it_comes_and_fetches_the_log_once(api: jobs.JobsApi) -> None:
    script = ("import sys, time\nprint('first', 'line', flush=True)\ntime.sleep(6)\n"
              "for i in range(30000): sys.stdout.write('%06d ' % i + 'y' * 93 + '\\n')\n"
              "sys.stdout.flush()\ntime.sleep(2)\nprint('last', 'line')\n")
    job_id = submit_job(api, "chatty", script)
    with TcpProxy(api.address) as relay:
        follower = follow_through(relay, job_id)
        assert follower.stdout is not None
        read_line_with(follower.stdout, "first line")
        assert api.info(job_id)["status"] == "RUNNING", "the first line must show while the job runs"
        rest, err = drain(follower)
        fetched = relay.down
    log = api.logs(job_id)
    assert follower.returncode == 0, err
    assert log.endswith("last line\n") and rest in log and log.count("first line") == 1
    assert len(log) > 3_000_000
    assert fetched < 1.1 * len(log), f"fetched {fetched} bytes for a log of {len(log)}"


@pytest.mark.reliability(
    case="fault: the port-forward between hpcray and the dashboard restarts while a job is followed (2 s down)",
    sees="`no answer from the Ray Jobs API at URL; retrying for 10 s`, `the log stream of job ID dropped (…); "
         "reconnecting, leaving out the N characters already shown`; every line of the log shown once; exit mirrors "
         "the job",
    remains="the job, unaffected")
def test_a_port_forward_restart_is_ridden_out_without_showing_anything_twice(api: jobs.JobsApi) -> None:
    job_id = submit_job(api, "blip", "import time\nfor i in range(80):\n    print('tick', i, flush=True)\n"
                                      "    time.sleep(0.1)\n")
    relay = TcpProxy(api.address)
    follower = follow_through(relay, job_id)
    assert follower.stdout is not None
    read_line_with(follower.stdout, "tick 10")
    relay.close()  # every connection cut, nothing listening for 2 s, then the same port again
    with TcpProxy(api.address, port=relay.port, delay=2.0):
        rest, err = drain(follower)
    assert follower.returncode == 0, err
    ticks = [line for line in api.logs(job_id).splitlines() if line.startswith("tick ")]
    assert ticks == [f"tick {i}" for i in range(80)]
    shown = [line for line in rest.splitlines() if line.startswith("tick ")]
    assert shown == [f"tick {i}" for i in range(11, 80)], "each line once, in order, none lost"
    assert [line for line in err.splitlines() if "no answer from the Ray Jobs API" in line], err
    [notice] = [line for line in err.splitlines() if "log stream" in line]
    assert "dropped" in notice and "reconnecting, leaving out the" in notice


@pytest.mark.reliability(
    case="fault: a proxy between hpcray and the dashboard refuses websocket upgrades (501)",
    sees="`cannot open the log stream at URL (HTTP 501 to the websocket upgrade); following job ID by re-reading its "
         "whole log (GET …/logs) every few seconds instead`; the whole log shown; exit mirrors the job",
    remains="the job, unaffected")
def test_a_proxy_that_refuses_websockets_falls_back_to_rereading_the_log(api: jobs.JobsApi) -> None:
    job_id = submit_job(api, "no-ws", "import time\nfor i in range(40):\n    print('tock', i, flush=True)\n"
                                       "    time.sleep(0.1)\nraise SystemExit(7)\n")
    with TcpProxy(api.address, refuse_upgrades=True) as relay:
        follower = follow_through(relay, job_id)
        out, err = follower.communicate(timeout=120)
        assert relay.refused >= 1
    assert follower.returncode == 1, err
    assert [line for line in out.splitlines() if line.startswith("tock ")] == [f"tock {i}" for i in range(40)]
    [notice] = [line for line in err.splitlines() if "log stream" in line]
    assert "HTTP 501" in notice and "re-reading its whole log" in notice


def test_the_client_works_through_the_kubernetes_api_servers_service_proxy(api: jobs.JobsApi) -> None:
    """HTTPS with a context trusting the API server's certificate, its bearer token, the service proxy's path prefix;
    Ray's own token rides in X-Ray-Authorization, the one header the API server passes on."""
    import io

    from tests.fake_service_proxy import FakeServiceProxy

    with FakeServiceProxy(api.address, token=secrets.token_urlsafe(16)) as proxy:
        with pytest.raises(JobsApiRefused, match="refused us \\(401: Unauthorized\\)"):
            jobs.JobsApi(proxy.endpoint(token="wrong")).list()
        through = jobs.JobsApi(proxy.endpoint(), token=Secret("ray-token"))
        sub = jobs.Submission("sleep 3; echo through the proxy", submission_id=uid("svc-proxy"))  # streamed: > 2 s
        job_id = jobs.submit(through, sub, image_ray_version=None, progress=print, warn=print)
        out = io.StringIO()
        info = jobs.follow(through, job_id, out, say=print)
        assert info["status"] == "SUCCEEDED"
        assert out.getvalue().splitlines().count("through the proxy") == 1 and out.getvalue() == api.logs(job_id)
        assert proxy.upgrades == [f"/api/jobs/{job_id}/logs/tail"]
        assert {headers.get("X-Ray-Authorization") for _, headers in proxy.forwarded} == {"Bearer ray-token"}
        assert not any("Authorization" in headers for _, headers in proxy.forwarded)


# ---------------------------------------------------------------------------------------------------------------
# --no-wait, logs, list, job-status, unknown ids
# ---------------------------------------------------------------------------------------------------------------


def test_no_wait_prints_the_id_then_logs_list_and_status_find_it(ray_head: Any) -> None:
    address = ["--address", ray_head.address]
    submitted = hpcray("submit", *address, "--no-wait", "--", "echo one; sleep 1; echo two")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert job_id.startswith("raysubmit_") and "\n" not in job_id

    followed = hpcray("logs", "-f", *address, job_id)
    assert followed.returncode == 0, followed.stderr
    assert followed.stdout.index("one") < followed.stdout.index("two")
    assert "two" in hpcray("logs", *address, job_id).stdout

    listed = json.loads(hpcray("list", *address, "--json").stdout)
    assert {j["submission_id"]: j["status"] for j in listed if j.get("submission_id")}[job_id] == "SUCCEEDED"
    assert job_id in hpcray("list", *address).stdout
    status = hpcray("job-status", *address, job_id)
    assert status.returncode == 0 and status.stdout.startswith(f"job {job_id}: SUCCEEDED")
    assert json.loads(hpcray("job-status", *address, job_id, "--json").stdout)["status"] == "SUCCEEDED"


@pytest.mark.parametrize("command", [["logs"], ["logs", "-f"], ["stop"], ["job-status"]])
@pytest.mark.reliability(
    case="bad input: non-existent job id (logs, logs -f, stop, job-status as subprocesses)",
    sees="`no job 'no-such-job' on the Ray cluster at URL; `hpcray list` shows the jobs`, exit 2",
    remains="nothing")
def test_unknown_job_id_is_one_line_exit_2(ray_head: Any, command: list[str]) -> None:
    done = hpcray(*command, "--address", ray_head.address, "no-such-job")
    assert done.returncode == 2
    assert "no job 'no-such-job'" in one_error_line(done.stderr)


@pytest.mark.reliability(
    case="bad input: unreachable Ray address via list",
    sees="`cannot reach the Ray Jobs API at URL: …; is the cluster up (`hpcray status`), or is --address wrong?`, "
         "exit 2",
    remains="nothing")
def test_unreachable_cluster_is_one_line(tmp_path: Path) -> None:
    done = hpcray("list", "--address", f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 2
    assert "cannot reach the Ray Jobs API" in one_error_line(done.stderr)


# ---------------------------------------------------------------------------------------------------------------
# What goes into the job: profile jobs, env, working dir, wheels, metadata
# ---------------------------------------------------------------------------------------------------------------


def test_profile_job_gets_its_working_dir_env_and_metadata(ray_head: Any, api: jobs.JobsApi, tmp_path: Path) -> None:
    wd = tmp_path / "code"
    wd.mkdir()
    (wd / "show.py").write_text("import os\nfor k in ('EPOCHS', 'EXTRA', 'MLFLOW_DISABLE_TELEMETRY', "
                                "'MLFLOW_EXPERIMENT_NAME'):\n    print(k, os.environ.get(k))\n")
    subprocess.run(["git", "init", "-q", str(wd)], check=True)
    subprocess.run(["git", "-C", str(wd), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                    "--allow-empty", "-m", "x"], check=True)
    profile = write_profile(tmp_path, {"tracking_uri": "sqlite:////tmp/unused.db", "experiment": "exp-a",
                                       "credentials": "none"},
                            {"show": {"entrypoint": "python show.py", "working_dir": "code", "env": {"EPOCHS": "5"}}})
    job_id = uid("profile-job")
    done = hpcray("submit", "-p", str(profile), "--address", ray_head.address, "--env", "EXTRA=yes",
                  "--submission-id", job_id, "show", env={"LOGNAME": "alice-on-the-login-node"})
    assert done.returncode == 0, done.stderr
    for line in ("EPOCHS 5", "EXTRA yes", "MLFLOW_DISABLE_TELEMETRY true", "MLFLOW_EXPERIMENT_NAME exp-a"):
        assert line in done.stdout
    metadata = api.info(job_id)["metadata"]
    head = subprocess.run(["git", "-C", str(wd), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert metadata == {"profile": "jobs-test", "job": "show", "user": "alice-on-the-login-node", "git_commit": head}


@pytest.mark.parametrize("name", ["HF_TOKEN", "DB_PASSWORD", "AWS_SECRET_ACCESS_KEY"])
@pytest.mark.reliability(
    case="bad input: --env named like a secret (TOKEN, PASSWORD, SECRET; subprocess, real Ray)",
    sees="`--env NAME: refused, because Ray shows a job's env vars in plain text …`, exit 2",
    remains="nothing (the cluster's job list is unchanged)")
def test_secret_looking_env_is_refused_before_submitting(ray_head: Any, api: jobs.JobsApi, name: str) -> None:
    before = job_ids(api)
    done = hpcray("submit", "--address", ray_head.address, "--env", f"{name}=x", "--", "true")
    assert done.returncode == 2
    assert "mlflow.credentials" in one_error_line(done.stderr)
    assert job_ids(api) == before
    assert not jobs.is_secret_name("TOKENIZERS_PARALLELISM")


@pytest.mark.reliability(
    case="bad input: working dir over a lowered upload limit, then fixed by a .rayignore",
    sees="`DIR packs to 3 MiB, over Ray's upload limit of 1 MiB …; largest: data.bin (3 MiB) …`, exit 2; with the "
         ".rayignore the job runs",
    remains="nothing (no job, no upload)")
def test_working_dir_over_rays_limit_is_refused_before_uploading(ray_head: Any, api: jobs.JobsApi,
                                                                  tmp_path: Path) -> None:
    wd = tmp_path / "big"
    wd.mkdir()
    (wd / "data.bin").write_bytes(os.urandom(3 * 2**20))
    (wd / "main.py").write_text("print('small')\n")
    small_limit = {"RAY_max_grpc_message_size": str(2**20)}
    before = job_ids(api)
    done = hpcray("submit", "--address", ray_head.address, "--working-dir", str(wd), "--", "python main.py",
                  env=small_limit)
    assert done.returncode == 2
    line = one_error_line(done.stderr)
    assert "over Ray's upload limit of 1 MiB" in line and "data.bin (3 MiB)" in line
    assert job_ids(api) == before

    (wd / ".rayignore").write_text("data.bin\n")
    done = hpcray("submit", "--address", ray_head.address, "--working-dir", str(wd), "--no-wait", "--",
                  "python main.py", env=small_limit)
    assert done.returncode == 0 and done.stdout.strip() in job_ids(api), done.stderr


def tiny_wheel(directory: Path, value: int) -> Path:
    """A pure-Python wheel of package demo_pkg 0.1 (VALUE = value), made with zipfile: no build, no dependencies."""
    import base64
    import hashlib

    files = {"demo_pkg/__init__.py": f"VALUE = {value}\n",
             "demo_pkg-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: demo-pkg\nVersion: 0.1\n",
             "demo_pkg-0.1.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                             "Tag: py3-none-any\n"}

    def digest(text: str) -> str:
        return base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()

    record = "".join(f"{name},sha256={digest(text)},{len(text.encode())}\n" for name, text in files.items())
    files["demo_pkg-0.1.dist-info/RECORD"] = record + "demo_pkg-0.1.dist-info/RECORD,,\n"
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / "demo_pkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, text in files.items():
            zf.writestr(zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0)), text)  # same content, same bytes
    return wheel


def test_a_rebuilt_wheel_of_the_same_version_is_shipped_under_a_new_name(tmp_path: Path) -> None:
    """Ray keeps a job's pip environment under a hash of the requirement strings: a wheel rebuilt with its old name
    and version would be served from the old environment (seen: the job printed the old VALUE)."""
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "main.py").write_text("print('main')\n")

    def staged(wheel: Path, where: str) -> list[str]:
        runtime_env: dict[str, Any] = {"working_dir": str(wd), "pip": ["requests"]}
        jobs.stage_wheels(runtime_env, [wheel], tmp_path / where)
        assert sorted(os.listdir(runtime_env["working_dir"])) == ["_hpcray_wheels", "main.py"]
        return list(runtime_env["pip"])

    first, again = staged(tiny_wheel(tmp_path / "a", 42), "s1"), staged(tiny_wheel(tmp_path / "b", 42), "s2")
    rebuilt = staged(tiny_wheel(tmp_path / "c", 43), "s3")
    assert first[0] == "requests" and first[1].endswith("/demo_pkg-0.1-py3-none-any.whl")
    assert first == again, "the same wheel keeps its name, so Ray reuses its environment"
    assert rebuilt != first, "a changed wheel must not be served from the old environment"
    assert sorted(os.listdir(wd)) == ["main.py"], "the user's working dir is left alone"


def test_a_shipped_wheel_is_pip_installed_for_the_job(ray_head: Any, api: jobs.JobsApi, tmp_path: Path) -> None:
    """Ray's pip plugin clones the head's virtualenv for the job (~15-30 s here): the one default test that pays it."""
    wheel = tiny_wheel(tmp_path / "dist", 42)
    job_id = uid("wheel-job")
    done = hpcray("submit", "--address", ray_head.address, "--submission-id", job_id, "--wheel", str(wheel), "--",
                  "python -c 'import demo_pkg; print(demo_pkg.VALUE, demo_pkg.__file__)'", timeout=300)
    assert done.returncode == 0, done.stderr
    value, where = done.stdout.strip().splitlines()[-1].split()
    assert value == "42"
    assert "/runtime_resources/pip/" in where and "/site-packages/demo_pkg/" in where, \
        "imported from the job's pip environment, not from the shipped file"


def demo_project(directory: Path) -> Path:
    project = directory / "proj"
    (project / "demo_pkg").mkdir(parents=True)
    (project / "demo_pkg" / "__init__.py").write_text("VALUE = 42\n")
    (project / "setup.py").write_text("from setuptools import setup\nsetup(name='demo-pkg', version='0.1', "
                                      "packages=['demo_pkg'])\n")
    return project


@pytest.mark.skipif(not os.environ.get("HPCRAY_TEST_PIP"), reason="`pip wheel` fetches setuptools into an isolated "
                                                                  "build env (~20 s); set HPCRAY_TEST_PIP=1 to run")
def test_a_project_directory_is_built_into_a_wheel_for_the_job(ray_head: Any, tmp_path: Path) -> None:
    done = hpcray("submit", "--address", ray_head.address, "--wheel", str(demo_project(tmp_path)), "--",
                  "python -c 'import demo_pkg; print(demo_pkg.VALUE)'", timeout=300)
    assert done.returncode == 0 and "42" in done.stdout, done.stderr


# ---------------------------------------------------------------------------------------------------------------
# Reaching the cluster: waiting for its Jobs API, Ray versions, no `import ray` on the quick path
# ---------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.reliability(
    case="fault: the Jobs API is not answering yet (a port-forward still starting)",
    sees="`waiting for the Ray Jobs API at URL (N/60 s) …`, then the submission id; exit 0",
    remains="the submitted job")
def test_submit_waits_for_a_jobs_api_that_is_not_up_yet(ray_head: Any) -> None:
    with TcpProxy(ray_head.address, port=free_port(), delay=1.0) as late:  # a port-forward still starting
        done = hpcray("submit", "--address", late.address, "--no-wait", "--", "true")
    assert done.returncode == 0, done.stderr
    assert "waiting for the Ray Jobs API" in done.stderr
    assert done.stdout.strip().startswith("raysubmit_")


def test_waiting_for_the_jobs_api_is_bounded() -> None:
    said: list[str] = []
    start = time.monotonic()
    with pytest.raises(ClusterError, match="did not answer within 1 s"):
        jobs.wait_for_api(jobs.JobsApi(f"127.0.0.1:{free_port()}"), 1.0, said.append)
    assert time.monotonic() - start < 3 and said


def test_ray_versions_major_mismatch_errors_minor_warns() -> None:
    warnings: list[str] = []
    jobs.check_versions("2.60.0", "2.60.1", "2.60.0", warnings.append)
    assert warnings == []
    jobs.check_versions("2.60.0", "2.59.0", None, warnings.append)
    assert len(warnings) == 1 and "2.59.0" in warnings[0]
    with pytest.raises(RayVersionError, match="image.ray_version has Ray 3.0.0"):
        jobs.check_versions("2.60.0", "2.60.0", "3.0.0", warnings.append)


def submit_no_wait(address: str, *args: str) -> tuple[str, bool]:
    """The submission id, and whether `hpcray submit --no-wait` imported ray (about 0.7 s)."""
    code = ("import sys\nfrom hpcray import cli\ntry:\n    cli.main(['submit', '--no-wait', *sys.argv[1:]])\n"
            "except SystemExit as exc:\n    assert not exc.code, exc.code\nprint('ray' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code, "--address", address, *args], capture_output=True, text=True,
                          env={**os.environ, **QUIET_ENV}, timeout=60)
    assert done.returncode == 0, done.stderr
    job_id, imported = done.stdout.split()
    return job_id, imported == "True"


def test_submit_no_wait_never_imports_ray(ray_head: Any) -> None:
    assert submit_no_wait(ray_head.address, "--", "true")[1] is False


def test_an_unchanged_working_dir_is_not_packaged_again(ray_head: Any, api: jobs.JobsApi, tmp_path: Path) -> None:
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "main.py").write_text("print('first')\n")
    runs = [submit_no_wait(ray_head.address, "--working-dir", str(wd), "--", "python main.py") for _ in range(2)]
    assert [imported for _, imported in runs] == [True, False]
    (wd / "main.py").write_text("print('second')\n")
    job_id, imported = submit_no_wait(ray_head.address, "--working-dir", str(wd), "--", "python main.py")
    assert imported, "a changed working dir is packaged again"
    packages = [api.info(j)["runtime_env"]["working_dir"] for j in (runs[0][0], runs[1][0], job_id)]
    assert packages[0] == packages[1] != packages[2]


@pytest.mark.reliability(
    case="fault: the installed Ray lacks a private packaging helper hpcray uses (a Ray outside the tested range)",
    sees="`Ray 2.60.0 lacks the packaging helpers hpcray uploads local working dirs and modules with (…); hpcray is "
         "tested with ray>=…: install a Ray in that range, or give the working dir as a URI …`, exit 2",
    remains="nothing (nothing uploaded or submitted)")
def test_a_ray_that_moved_its_packaging_helpers_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from ray._private.runtime_env import packaging as rays_packaging

    from hpcray import cli
    from hpcray.jobs import packaging
    from tests.fake_ray_dashboard import FakeRayDashboard

    monkeypatch.delattr(rays_packaging, "create_package")
    packaging._ray_packaging.cache_clear()  # bound by an earlier test of this process
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "main.py").write_text("print('hi')\n")
    version = jobs.client_ray_version()
    with FakeRayDashboard(version or "2.60.0") as dashboard, pytest.raises(SystemExit) as exited:
        cli.main(["submit", "--address", dashboard.address, "--working-dir", str(wd), "--", "python main.py"])
    assert exited.value.code == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"Ray {version} lacks the packaging helpers" in line and "create_package" in line
    assert "hpcray is tested with ray" in line
    assert dashboard.writes == [], "nothing may be uploaded or submitted"
    with pytest.raises(RayApiMoved):  # not cached: a fixed Ray is picked up by the next call
        packaging._ray_packaging()


def test_an_unknown_job_name_is_one_error_naming_the_profile_and_its_jobs(tmp_path: Path) -> None:
    profile = load_profile(write_profile(tmp_path, jobs_={"train": {"entrypoint": "true"},
                                                          "hpo": {"entrypoint": "true"}}))
    jobs.check_names(profile, ["train", "hpo"])
    for refused in (lambda: jobs.check_names(profile, ["train", "tran"]), lambda: jobs.job_spec(profile, "tran", [])):
        with pytest.raises(UnknownJob) as err:
            refused()
        assert err.value.exit_code == 2
        assert str(err.value).startswith(f"{profile.source}: jobs.tran: no such job in the profile; its jobs are: ")
        assert {"train", "hpo"} == set(str(err.value).rsplit(": ", 1)[1].split(", "))


# ---------------------------------------------------------------------------------------------------------------
# Entrypoints
# ---------------------------------------------------------------------------------------------------------------


def test_itwinai_entrypoint_is_quoted_and_carries_the_tracking_overrides(tmp_path: Path) -> None:
    import shlex

    profile = load_profile(write_profile(tmp_path, {"tracking_uri": "https://mlflow.example.org", "experiment":
                                                    "hython hpo", "credentials": "none"}))
    spec = ItwinaiSpec(config_name="config", config_path="cfg dir", pipe_key="hpo", overrides=["epochs=5"])
    assert shlex.split(jobs.itwinai_entrypoint(spec, profile)) == [
        "itwinai", "exec-pipeline", "--config-path", "cfg dir", "--config-name", "config", "+pipe_key=hpo",
        "experiment_name=hython hpo", "tracking_uri=https://mlflow.example.org", "epochs=5"]


def test_an_entrypoint_argv_reaches_the_job_as_given(ray_head: Any) -> None:
    """Several arguments after `--` are an argv: spaces, quotes and $ reach the job's process unchanged (a single
    argument is a shell command, as `echo one; sleep 1; echo two` in the --no-wait test shows)."""
    done = hpcray("submit", "--address", ray_head.address, "--", "python", "-c",
                  "import sys; print(sys.argv[1:])", "a b", "$HOME", "it's", "*")
    assert done.returncode == 0, done.stderr
    assert "['a b', '$HOME', \"it's\", '*']" in done.stdout.splitlines()


def test_requirements_and_pip_flags_add_to_the_jobs_pip_list(tmp_path: Path) -> None:
    profile = load_profile(write_profile(tmp_path))
    spec = jobs.with_overrides(JobSpec(entrypoint="true"), requirements=str(_requirements(tmp_path)),
                               pip=("numpy",))
    sub = jobs.build_submission(profile, spec, name=None, credentials=None, warn=print)
    assert sub.runtime_env["pip"] == ["scipy>=1", "numpy"]


def _requirements(tmp_path: Path) -> Path:
    path = tmp_path / "requirements.txt"
    path.write_text("# pinned\nscipy>=1\n\n")
    return path
