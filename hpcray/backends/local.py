"""A Ray head on this machine: `ray start --head --block` in its own session, every port chosen, stopped by PID.

Two hpcray heads and a user's own Ray coexist: each head takes one block of ports that no other Ray on the machine
names on its command line, and `down` stops only the processes of its own head. Those are found by a marker
variable in their environment (Ray renames its workers to `ray::IDLE` and a job's entrypoint runs in a session of
its own, so neither process group nor command line finds them all) and by the head's temp dir on the command line.
Never `ray stop`: it stops every Ray of the user.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from hpcray import http
from hpcray.backends.base import ClusterStatus, HeadProcess, NodeStatus, Plan, Progress, Step
from hpcray.errors import AccessRefused, ClusterError, ClusterNotReady, CredentialsError, ToolMissing
from hpcray.profile import Profile, access_problem, profile_ref
from hpcray.secrets import Secret
from hpcray.state import QUIET_ENV, locked, state_dir, state_root, write_atomic
from hpcray.tracking import PASSWORD_VAR, USERNAME_VAR, Credentials, credential_plan
from hpcray.waiting import Deadline, in_background, poll_until

STATE_FILE = "local.json"
TOKEN_FILE = "ray-token"
"""The head's Ray token (0600, beside local.json): the head reads it through RAY_AUTH_TOKEN_PATH, hpcray sends it."""
MARKER_VAR = "HPCRAY_LOCAL_CLUSTER"
"""Set to the head's temp dir in the environment of the head, and so of every process it starts."""

# Ports: one block per head, above Ray's defaults (6379, 8265, 10001-19999) and below Linux's ephemeral range.
PORT_RANGE = (20480, 32768)
BLOCK = 512
NAMED_PORTS = ("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
               "dashboard-agent-grpc-port", "metrics-export-port", "node-manager-port", "object-manager-port",
               "runtime-env-agent-port", "mlflow")
WORKER_OFFSET = 16  # worker ports: the rest of the block

TERM_GRACE_S = 10.0
STORE_GRACE_S = 30.0  # how long a ready head waits at least for the MLflow store being made beside it


@dataclass
class HeadState:
    """What `local.json` remembers about a running head."""

    pid: int  # `ray start --block`; leader of its own session and process group
    temp_dir: str
    ports: dict[str, int]
    started_at: float
    expires_at: float | None = None
    num_gpus: int | None = None
    mlflow_pid: int | None = None  # leader of its own session too

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard-port']}"

    @property
    def mlflow_uri(self) -> str | None:
        return f"http://127.0.0.1:{self.ports['mlflow']}" if self.mlflow_pid else None


class LocalBackend:
    def __init__(self, profile: Profile) -> None:
        self.p = profile
        self.name: str = profile.name
        self.dir = state_dir(self.name)  # bound once: a later change of $HPCRAY_STATE_DIR cannot lose the head
        self.credentials = credential_plan(profile)

    @property
    def temp_dir(self) -> str:
        # Ray's unix sockets live under <temp dir>/session_<date>_<pid>/sockets/ and a socket path may have at
        # most 107 characters: a state dir can be much longer than that, so the temp dir is short and derived
        # from the state dir (one head per state dir, findable even when local.json is lost). Ray makes its
        # temp dir world-writable and its logs (jobs' output) world-readable: it gets <this 0700 dir>/ray.
        digest = hashlib.sha256(str(self.dir.resolve()).encode()).hexdigest()[:12]
        return f"/tmp/hpcray-{digest}"

    # -- Backend --------------------------------------------------------------------------------------------------

    def plan(self, *, credentials: Credentials | None = None, ttl_s: float | None = None, warn: Progress,
             preflight: bool = True, access: str = "auto") -> Plan:
        """The head (and MLflow server) `up` would start, or the running head it would leave alone."""
        _check_access(access)
        st = self._load()
        if st and _running(st.pid):
            return Plan(self.name, "local", [Step(f"leave the running local cluster '{self.name}' (pid {st.pid}, "
                                                  f"dashboard {st.dashboard}) as it is")], st.expires_at)
        local = self.p.local
        cpus = f"{local.num_cpus} CPU(s)" if local.num_cpus is not None else "every CPU"
        gpus = f"{local.num_gpus} GPU(s)" if local.num_gpus is not None else "the GPUs Ray detects"
        port = f"dashboard port {local.dashboard_port}" if local.dashboard_port else "a free dashboard port"
        steps = [Step(f"start a Ray head '{self.name}' on 127.0.0.1 (`ray start --head`) with {cpus}, {gpus}, {port} "
                      f"and a block of {BLOCK} ports of its own in {PORT_RANGE[0]}-{PORT_RANGE[1] - 1}; temp dir "
                      f"{self.temp_dir}, log {self.dir / 'head.log'}")]
        if local.mlflow_server:
            steps.append(Step(f"start an MLflow server on 127.0.0.1 with the store {self.dir / 'mlflow.db'} and "
                              f"artifacts in {self.dir / 'artifacts'}"))
        uri = self.p.mlflow.tracking_uri
        if uri and uri.startswith("sqlite:///"):
            steps.append(Step(f"prepare the MLflow store {uri} (experiment '{self.p.mlflow.experiment}', artifacts "
                              "beside it)"))
        env = self._head_env(credentials)
        if env:
            shown = ", ".join(f"{k}={v}" for k, v in env.items())
            steps.append(Step(f"put {shown} in the head's environment, which every job inherits"))
        if self._auth(warn):
            steps.append(Step(f"write a new random Ray token to {self.dir / TOKEN_FILE} (0600) and start the head with "
                              "RAY_AUTH_MODE=token: hpcray sends the token, a request without it gets 401"))
        steps.append(Step("wait until the dashboard, the Jobs API and the job agent answer"
                          + (" and MLflow is healthy" if local.mlflow_server else "")))
        return Plan(self.name, "local", steps, time.time() + ttl_s if ttl_s else None)

    def up(self, *, timeout: float, progress: Progress, credentials: Credentials | None = None,
           ttl_s: float | None = None, down_on_failure: bool = True, access: str = "auto",
           preflight: bool = True) -> ClusterStatus:
        """Start the head (and MLflow server) or return the one already up. A head that fails to start is always
        stopped, whatever ``down_on_failure`` says: half a local cluster is of no use to inspect. There is nothing
        to preflight: the head runs here."""
        _check_access(access)
        deadline = Deadline(timeout)
        env = self._head_env(credentials)
        auth = self._auth(progress)
        with locked(self.dir / "lifecycle.lock", f"`hpcray up` of {self.name}", progress):
            st = self._load()
            if st and _running(st.pid):
                progress(f"local cluster '{self.name}' is already up at {st.dashboard}; environment unchanged")
                self._wait_ready(st, deadline, progress)
                return self.status()
            if st or find_leftovers(self.temp_dir):
                progress(f"cleaning up what is left of a previous local cluster '{self.name}'")
                self._stop(st, progress, deadline)
            try:
                st = self._start(env, auth, ttl_s, progress)
                # MLflow's import overlaps the head's start. A daemon thread, not a pool: an interrupted `up` must
                # go straight to the teardown below, never wait on (or, at exit, join) a store still being made.
                store = in_background("hpcray-mlflow-store", self._prepare_store)
                self._wait_ready(st, deadline, progress)
                grace = max(deadline.left, STORE_GRACE_S)
                try:
                    warning = store.result(timeout=grace)
                except concurrent.futures.TimeoutError:
                    raise ClusterNotReady(
                        f"local cluster '{self.name}': the MLflow store {self.p.mlflow.tracking_uri} was still being "
                        f"set up {grace:.0f} s after the head was ready; "
                        "check that its directory is writable and not on a hung filesystem, then run up again"
                    ) from None
                if warning:
                    progress(f"hpcray: warning: {warning}")
            except BaseException:
                st = self._load()
                if st or find_leftovers(self.temp_dir):
                    self._stop(st, progress, Deadline(TERM_GRACE_S * 2))
                shutil.rmtree(self.temp_dir, ignore_errors=True)
                raise
        return self.status()

    def _auth(self, warn: Progress) -> bool:
        """Whether the head runs with Ray's token authentication: the profile asks for it and this Ray has it."""
        from hpcray.jobs.api import client_ray_version, has_token_auth

        if self.p.auth != "token":
            return False
        version = client_ray_version()
        if version and not has_token_auth(version):
            warn(f"hpcray: warning: Ray {version} here has no token authentication (Ray >= 2.52): the local head's "
                 "dashboard takes jobs from any local user; upgrade Ray, or set auth: none to silence this")
            return False
        return True

    def _token(self) -> Secret | None:
        """The running head's Ray token; None when it runs without token authentication."""
        try:
            token = (self.dir / TOKEN_FILE).read_text().strip()
        except FileNotFoundError:
            return None
        return Secret(token) if token else None

    def _endpoint(self, base: str) -> http.Endpoint:
        from hpcray.jobs.api import with_token

        return with_token(http.Endpoint(base), self._token())

    def _answers(self, st: HeadState, path: str) -> bool:
        """A health check of the head's dashboard, with its token: GET `path` answers 200."""
        try:
            return http.request(self._endpoint(st.dashboard), "GET", path, timeout=2.0).status == 200
        except http.Unreachable:
            return False

    def _head_env(self, credentials: Credentials | None) -> dict[str, Secret | str]:
        """The credentials, where the credential plan puts them in the head's environment."""
        if self.credentials.where != "head_env":
            return {}
        if credentials is None:
            raise CredentialsError(f"the local head of '{self.name}' gives its jobs MLflow credentials, but none were "
                                   f"given; set {USERNAME_VAR} and {PASSWORD_VAR} (mlflow.credentials: "
                                   f"{self.p.mlflow.credentials}) or set mlflow.credentials: none")
        return credentials.env()

    def _prepare_store(self) -> str | None:
        uri = self.p.mlflow.tracking_uri
        if not uri or not uri.startswith("sqlite:///"):
            return None
        from hpcray.tracking import prepare_local_store

        return prepare_local_store(uri, self.p.mlflow.experiment)

    @contextlib.contextmanager
    def access(self, progress: Progress, mode: str = "auto") -> Iterator[http.Endpoint]:
        """The head's own dashboard (it listens on this machine already), or the URL `mode` gives."""
        _check_access(mode)
        yield self._endpoint(mode.rstrip("/") if mode != "auto" else self.address())

    def dashboard(self, *, port: int, progress: Progress, on_ready: Callable[[str], None],
                  access: str = "auto") -> None:
        """The head's dashboard listens on this machine already (on local.dashboard_port, or the port chosen at
        `up`): nothing to forward, whatever ``port`` asks for."""
        _check_access(access)
        address = access if access != "auto" else self.address()
        if self._token() is not None:
            progress(f"the dashboard asks for the cluster's Ray token; it is in {self.dir / TOKEN_FILE} (`cat` it)")
        on_ready(address)

    def address(self) -> str:
        st = self._load()
        if st is None or not _running(st.pid):
            raise ClusterError(f"no local cluster '{self.name}' is up; run "
                               f"`hpcray up --profile {profile_ref(self.p.source)}`")
        return st.dashboard

    def tracking_uri(self) -> str | None:
        """The MLflow server started with the head (local.mlflow_server) while it runs, else the profile's URI."""
        st = self._load()
        if st and st.mlflow_pid and _running(st.mlflow_pid):
            return st.mlflow_uri
        return self.p.mlflow.tracking_uri

    def results_root(self) -> str:
        """In the head's private temp dir, which `down` removes (after archiving it)."""
        return f"{self.temp_dir}/results"

    def status(self) -> ClusterStatus:
        st = self._load()
        if st is None:
            return ClusterStatus(name=self.name, backend="local", exists=False, ready=False,
                                 tracking_uri=self.tracking_uri())
        alive = _running(st.pid)
        ready = alive and self._answers(st, "/api/version")
        phase = "Ready" if ready else "Running" if alive else "Failed"
        reason = "" if alive else f"the head process {st.pid} is gone; see {self.dir / 'head.log'}"
        gpus = st.num_gpus if st.num_gpus is not None else _detected_gpus(self._endpoint(st.dashboard)) if ready else 0
        head = NodeStatus(name=f"{self.name}-head", role="head", phase=phase, reason=reason,
                          age_s=time.time() - st.started_at, gpus=gpus, created_at=st.started_at,
                          started_at=st.started_at)  # no queue on this machine
        return ClusterStatus(name=self.name, backend="local", exists=True, ready=ready, nodes=[head],
                             expires_at=st.expires_at, address=st.dashboard if alive else None,
                             tracking_uri=self.tracking_uri(),
                             head=HeadProcess(st.pid, st.temp_dir, st.ports, str(self.dir / "head.log")))

    def plan_down(self) -> Plan:
        st = self._load()
        leftovers = find_leftovers(self.temp_dir)
        if st is None and not leftovers:
            return Plan(self.name, "local", [Step(f"do nothing: no local cluster '{self.name}' is up")])
        what = (f"the Ray head (pid {st.pid}, dashboard {st.dashboard})" if st else
                f"{len(leftovers)} leftover process(es)")
        mlflow = f" and its MLflow server (pid {st.mlflow_pid})" if st and st.mlflow_pid else ""
        return Plan(self.name, "local", [
            Step(f"stop {what}{mlflow} of local cluster '{self.name}' and every process started from it (SIGTERM, "
                 f"SIGKILL after {TERM_GRACE_S:.0f} s), found by its temp dir {st.temp_dir if st else self.temp_dir}"),
            Step(f"remove its temp dir and {self.dir / STATE_FILE}")])

    def down(self, *, progress: Progress, timeout: float = 300.0) -> bool:
        if not (self.dir / STATE_FILE).exists() and not find_leftovers(self.temp_dir):
            return False  # without taking the lock, which would make the state dir of a cluster never started
        with locked(self.dir / "lifecycle.lock", f"`hpcray down` of {self.name}", progress):
            st = self._load()
            if st is None and not find_leftovers(self.temp_dir):
                return False
            self._stop(st, progress, Deadline(timeout))
        return True

    # -- start ----------------------------------------------------------------------------------------------------

    def _start(self, env: dict[str, Secret | str], auth: bool, ttl_s: float | None, progress: Progress) -> HeadState:
        local = self.p.local
        temp_dir = self.temp_dir
        if auth:  # a new token per head; Ray reads it from the file, so it is in no process's environment
            from hpcray.jobs.api import new_token

            write_atomic(self.dir / TOKEN_FILE, new_token().reveal())
            env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.dir / TOKEN_FILE)}
        else:
            (self.dir / TOKEN_FILE).unlink(missing_ok=True)
        child_env = _child_env(temp_dir, env)
        # Held until both children have exec'd: their command lines then name the ports for the next chooser.
        with locked(state_root() / "local-ports.lock", f"`hpcray up` of {self.name} (choosing its ports)"):
            ports = choose_ports(local.dashboard_port)
            shutil.rmtree(temp_dir, ignore_errors=True)
            try:
                os.makedirs(temp_dir, mode=0o700)
            except FileExistsError:
                raise ClusterError(f"{temp_dir} exists and cannot be removed; remove it and retry") from None
            ray_argv = _ray_argv(ports, f"{temp_dir}/ray", local.num_cpus, local.num_gpus)
            head = self._spawn(ray_argv, child_env, "head.log")
            mlflow = None
            if local.mlflow_server:
                mlflow_env = _child_env(temp_dir, {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
                mlflow = self._spawn(_mlflow_argv(ports["mlflow"], self.dir), mlflow_env, "mlflow.log")
        st = HeadState(pid=head.pid, temp_dir=temp_dir, ports=ports, started_at=time.time(),
                       expires_at=time.time() + ttl_s if ttl_s else None, num_gpus=local.num_gpus,
                       mlflow_pid=mlflow.pid if mlflow else None)
        self._save(st)
        progress(f"starting Ray head '{self.name}' (pid {head.pid}, dashboard {st.dashboard}, temp dir {temp_dir})")
        if mlflow:
            progress(f"starting MLflow server (pid {mlflow.pid}) at {st.mlflow_uri}")
        return st

    def _spawn(self, argv: list[str], env: dict[str, str], log_name: str) -> subprocess.Popen[bytes]:
        with open(self.dir / log_name, "wb") as log:
            return subprocess.Popen(argv, env=env, cwd=self.dir, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    def _wait_ready(self, st: HeadState, deadline: Deadline, progress: Progress) -> None:
        """Until the dashboard answers, the Jobs API lists jobs, the job agent listens and MLflow is healthy."""
        t0 = time.monotonic()
        agent = st.ports["dashboard-agent-listen-port"]
        pending = [("Ray dashboard answers", lambda: self._answers(st, "/api/version")),
                   ("Jobs API answers", lambda: self._answers(st, "/api/jobs/")),
                   ("job agent listens", lambda: _listening(agent))]
        if st.mlflow_pid:
            pending.append((f"MLflow server healthy at {st.mlflow_uri}", lambda: http.ok(f"{st.mlflow_uri}/health")))

        def ready() -> bool:
            for what, check in list(pending):
                if check():
                    pending.remove((what, check))
                    progress(f"{what} after {time.monotonic() - t0:.1f} s")
            self._check_alive(st)
            return not pending

        if not poll_until(ready, timeout=deadline.left):
            waiting = ", ".join(what for what, _ in pending)
            raise ClusterNotReady(
                f"local cluster '{self.name}' not ready after {time.monotonic() - t0:.0f} s (still waiting: "
                f"{waiting}). Last lines of {self.dir / 'head.log'}:\n"
                f"{_tail(self.dir / 'head.log')}\nRetry with a longer --timeout.")

    def _check_alive(self, st: HeadState) -> None:
        for pid, what, log in ((st.pid, "Ray head", "head.log"), (st.mlflow_pid, "MLflow server", "mlflow.log")):
            if pid and not _running(pid):
                raise ClusterError(f"the local {what} of '{self.name}' exited while starting; last lines of "
                                   f"{self.dir / log}:\n{_tail(self.dir / log)}")

    # -- stop -----------------------------------------------------------------------------------------------------

    def _stop(self, st: HeadState | None, progress: Progress, deadline: Deadline) -> None:
        """SIGTERM the head's and MLflow's process groups and every process of our temp dir; SIGKILL stragglers."""
        temp_dir = st.temp_dir if st else self.temp_dir
        t0 = time.monotonic()
        leaders = [pid for pid in ((st.pid, st.mlflow_pid) if st else ()) if pid and _running(pid)]
        for pid in leaders:
            if temp_dir in _environ(pid):  # the pid is still ours, not a recycled one
                _signal_group(pid, signal.SIGTERM)
        progress(f"stopping local cluster '{self.name}'")
        for pid in find_leftovers(temp_dir):
            _signal(pid, signal.SIGTERM)
        left = _wait_gone(temp_dir, leaders, min(TERM_GRACE_S, deadline.left))
        if left:
            progress(f"{len(left)} process(es) still running after {time.monotonic() - t0:.0f} s; killing them")
            for pid in left:
                _signal(pid, signal.SIGKILL)
            left = _wait_gone(temp_dir, leaders, max(deadline.left, 2.0))
        if left:
            raise ClusterError(f"could not stop processes {left} of local cluster '{self.name}'; kill them by PID")
        shutil.rmtree(temp_dir, ignore_errors=True)
        (self.dir / TOKEN_FILE).unlink(missing_ok=True)
        (self.dir / STATE_FILE).unlink(missing_ok=True)
        progress(f"local cluster '{self.name}' stopped after {time.monotonic() - t0:.1f} s")

    # -- state file -----------------------------------------------------------------------------------------------

    def _load(self) -> HeadState | None:
        try:
            return HeadState(**json.loads((self.dir / STATE_FILE).read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            raise ClusterError(f"{self.dir / STATE_FILE} is unreadable ({exc}); stop the processes named in it "
                               f"by PID and delete it") from None

    def _save(self, st: HeadState) -> None:
        write_atomic(self.dir / STATE_FILE, json.dumps(asdict(st), indent=2))


# -- processes ------------------------------------------------------------------------------------------------------


def find_leftovers(temp_dir: str) -> list[int]:
    """PIDs of running processes that belong to the head using ``temp_dir`` (by command line or marker)."""
    marker = f"{MARKER_VAR}={temp_dir}".encode()
    needle = temp_dir.encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        cmdline = _read(f"/proc/{pid}/cmdline")
        if (needle in cmdline or marker in _read(f"/proc/{pid}/environ").split(b"\0")) and _running(pid):
            found.append(pid)
    return found


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:  # gone, or not ours
        return b""


def _environ(pid: int) -> str:
    return _read(f"/proc/{pid}/environ").decode(errors="replace")


def _running(pid: int) -> bool:
    """Alive and not a zombie; reaps it if it is our own child that has exited."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    stat = _read(f"/proc/{pid}/stat")
    return bool(stat) and stat.rsplit(b")", 1)[-1].split()[0] != b"Z"


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)  # the pid leads its own session and group (start_new_session)


def _wait_gone(temp_dir: str, leaders: list[int], timeout: float) -> list[int]:
    """The processes of the head still running once all are gone or `timeout` has passed."""
    left: list[int] = []

    def gone() -> bool:
        left[:] = sorted(set(find_leftovers(temp_dir)) | {pid for pid in leaders if _running(pid)})
        return not left

    poll_until(gone, timeout=timeout)
    return left


def _child_env(temp_dir: str, extra: dict[str, Secret | str]) -> dict[str, str]:
    bindir = os.path.dirname(sys.executable)
    # a token of the user's environment would win over the head's own (RAY_AUTH_TOKEN comes first in Ray's lookup)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update(QUIET_ENV)
    env.update({
        # Job entrypoints run through a shell with the head's PATH: `python` must be this venv's.
        "PATH": os.pathsep.join([bindir, env.get("PATH", "")]),
        # Else Ray replaces 127.0.0.1 with the machine's routable address and binds the GCS on every interface.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        # Ray turns token auth on when ~/.ray/auth_token exists and clients without RAY_AUTH_MODE then get 401:
        # be the same on every machine (`extra` turns it on, with the head's own token).
        "RAY_AUTH_MODE": "disabled",
        # A local head has nothing to drain; Ray's default waits up to 30 s on SIGTERM.
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        MARKER_VAR: temp_dir,
    })
    env.update({k: v.reveal() if isinstance(v, Secret) else v for k, v in extra.items()})
    return env


def python_module_argv(module: str) -> list[str]:
    """`python -m module` with this Python: its console script may be elsewhere (`pip install --user` puts it in
    ~/.local/bin) or nowhere on PATH, the module is where this Python imports it from."""
    import importlib.util

    if importlib.util.find_spec(module.split(".")[0]) is None:
        raise ToolMissing(f"{module.split('.')[0]} is not installed for {sys.executable}: install hpcray with its "
                          f"dependencies there (pip install hpcray)")
    return [sys.executable, "-m", module]


def _ray_argv(ports: dict[str, int], temp_dir: str, num_cpus: int | None, num_gpus: int | None) -> list[str]:
    argv = [*python_module_argv("ray.scripts.scripts"), "start", "--head", "--block",
            "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1", "--temp-dir", temp_dir,
            "--disable-usage-stats"]
    for name in NAMED_PORTS:
        if name != "mlflow":
            argv += [f"--{name}", str(ports[name])]
    argv += ["--min-worker-port", str(ports["min-worker-port"]), "--max-worker-port", str(ports["max-worker-port"])]
    if num_cpus is not None:
        argv += ["--num-cpus", str(num_cpus)]
    if num_gpus is not None:
        argv += ["--num-gpus", str(num_gpus)]
    return argv


def _mlflow_argv(port: int, directory: Path) -> list[str]:
    return [*python_module_argv("mlflow"), "server", "--host", "127.0.0.1",
            "--port", str(port), "--backend-store-uri", f"sqlite:///{directory / 'mlflow.db'}",
            "--artifacts-destination", str(directory / "artifacts"), "--workers", "1"]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -- ports ----------------------------------------------------------------------------------------------------------

_PORT_ARG = re.compile(rb"--([\w-]*port)[= ](\d+)")
_ADDRESS_ARG = re.compile(rb"(?:127\.0\.0\.1|localhost|0\.0\.0\.0):(\d+)")


def choose_ports(dashboard_port: int = 0) -> dict[str, int]:
    """One free block of ports that no Ray running on this machine names (its worker range included)."""
    taken = _ports_named_by_rays()
    low, high = PORT_RANGE
    blocks = list(range(low, high - BLOCK + 1, BLOCK))
    random.shuffle(blocks)  # two hpcray runs choosing at once rarely pick the same block
    if dashboard_port and (dashboard_port in taken or not _free(dashboard_port)):
        raise ClusterError(f"dashboard port {dashboard_port} is in use or in another Ray's port range; set "
                           f"local.dashboard_port: 0 to pick a free one")
    for base in blocks:
        block = range(base, base + BLOCK)
        if dashboard_port in block or any(p in block for p in taken) or not all(_free(p) for p in block):
            continue
        ports = {name: base + i for i, name in enumerate(NAMED_PORTS)}
        if dashboard_port:
            ports["dashboard-port"] = dashboard_port
        ports["min-worker-port"], ports["max-worker-port"] = base + WORKER_OFFSET, base + BLOCK - 1
        return ports
    raise ClusterError(f"no free block of {BLOCK} ports in {low}-{high - 1} outside the Rays running here; stop "
                       f"a local cluster with `hpcray down`")


def _ports_named_by_rays() -> set[int]:
    taken: set[int] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        cmdline = _read(f"/proc/{entry.name}/cmdline").replace(b"\0", b" ")
        if b"ray" not in cmdline:
            continue
        args = {name.replace(b"_", b"-"): int(port) for name, port in _PORT_ARG.findall(cmdline)}
        low, high = args.get(b"min-worker-port"), args.get(b"max-worker-port")
        if low and high:
            taken.update(range(low, high + 1))
        taken.update(args.values())
        taken.update(int(port) for port in _ADDRESS_ARG.findall(cmdline))
    return taken


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("0.0.0.0", port))  # conflicts with a listener on any address, 127.0.0.1 included
        except OSError:
            return False
    return True


# -- health ---------------------------------------------------------------------------------------------------------


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _detected_gpus(dashboard: http.Endpoint) -> int:
    """The GPUs Ray detected on the head (the state API's node resources), 0 if it cannot say."""
    try:
        nodes = http.request(dashboard, "GET", "/api/v0/nodes", timeout=5).json()["data"]["result"]["result"]
        return int(sum(node.get("resources_total", {}).get("GPU", 0) for node in nodes))
    except (http.Unreachable, ValueError, KeyError, TypeError):
        return 0


def _check_access(mode: str) -> None:
    """`auto` or a URL; the Kubernetes ways to a head (port-forward, service-proxy) are refused in one line."""
    if problem := access_problem(mode, "local"):
        raise AccessRefused(f"--access {problem}")
