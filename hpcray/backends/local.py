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
import fcntl
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
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Iterator

from hpcray.backends.base import ClusterStatus, NodeStatus, Progress
from hpcray.errors import ClusterError, ClusterNotReady, ToolMissing
from hpcray.secrets import Secret
from hpcray.state import QUIET_ENV, make_private, state_dir, state_root

STATE_FILE = "local.json"
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
MLFLOW_TIMEOUT_S = 120.0


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
    def __init__(self, profile: Any) -> None:
        self.p = profile
        self.name: str = profile.name
        self.dir = state_dir(self.name)  # bound once: a later change of $HPCRAY_STATE_DIR cannot lose the head

    @property
    def temp_dir(self) -> str:
        # Ray's unix sockets live under <temp dir>/session_<date>_<pid>/sockets/ and a socket path may have at
        # most 107 characters: a state dir can be much longer than that, so the temp dir is short and derived
        # from the state dir (one head per state dir, findable even when local.json is lost). Ray makes its
        # temp dir world-writable and its logs (jobs' output) world-readable: it gets <this 0700 dir>/ray.
        digest = hashlib.sha256(str(self.dir.resolve()).encode()).hexdigest()[:12]
        return f"/tmp/hpcray-{digest}"

    # -- Backend --------------------------------------------------------------------------------------------------

    def up(self, *, timeout: float, progress: Progress, env: dict[str, Secret | str] | None = None,
           ttl_s: float | None = None, down_on_failure: bool = True) -> ClusterStatus:
        """Start the head (and MLflow server) or return the one already up. A head that fails to start is always
        stopped, whatever ``down_on_failure`` says: half a local cluster is of no use to inspect."""
        deadline = time.monotonic() + timeout
        with _locked(self.dir / "local.lock"):
            st = self._load()
            if st and _running(st.pid):
                progress(f"local cluster '{self.name}' is already up at {st.dashboard}; environment unchanged")
                self._wait_ready(st, deadline, progress)
                return self.status()
            if st or find_leftovers(self.temp_dir):
                progress(f"cleaning up what is left of a previous local cluster '{self.name}'")
                self._stop(st, progress, deadline)
            try:
                st = self._start(env or {}, ttl_s, progress)
                with concurrent.futures.ThreadPoolExecutor(1) as pool:  # MLflow's import overlaps the head's start
                    store = pool.submit(self._prepare_store)
                    self._wait_ready(st, deadline, progress)
                    if warning := store.result():
                        progress(f"hpcray: warning: {warning}")
            except BaseException:
                st = self._load()
                if st or find_leftovers(self.temp_dir):
                    self._stop(st, progress, time.monotonic() + TERM_GRACE_S * 2)
                shutil.rmtree(self.temp_dir, ignore_errors=True)
                raise
        return self.status()

    def _prepare_store(self) -> str | None:
        uri = self.p.mlflow.tracking_uri
        if not uri or not uri.startswith("sqlite:///"):
            return None
        from hpcray.tracking import prepare_local_store

        return prepare_local_store(uri, self.p.mlflow.experiment)

    @contextlib.contextmanager
    def reach(self, progress: Progress) -> Iterator[str]:
        yield self.address()

    def address(self) -> str:
        st = self._load()
        if st is None or not _running(st.pid):
            raise ClusterError(f"no local cluster '{self.name}' is up; run `hpcray up --profile {self.p.source}`")
        return st.dashboard

    def tracking_uri(self) -> str | None:
        """The MLflow server started with the head (local.mlflow_server) while it runs, else the profile's URI."""
        st = self._load()
        if st and st.mlflow_pid and _running(st.mlflow_pid):
            return st.mlflow_uri
        return self.p.mlflow.tracking_uri

    def status(self) -> ClusterStatus:
        st = self._load()
        if st is None:
            return ClusterStatus(name=self.name, backend="local", exists=False, ready=False)
        alive = _running(st.pid)
        ready = alive and _http_ok(st.dashboard + "/api/version")
        phase = "Ready" if ready else "Running" if alive else "Failed"
        reason = "" if alive else f"the head process {st.pid} is gone; see {self.dir / 'head.log'}"
        gpus = st.num_gpus if st.num_gpus is not None else (_detected_gpus(st) if ready else 0)
        head = NodeStatus(name=f"{self.name}-head", role="head", phase=phase, reason=reason,
                          age_s=time.time() - st.started_at, gpus=gpus)
        details: dict[str, Any] = {"pid": st.pid, "temp_dir": st.temp_dir, "ports": st.ports,
                                   "log": str(self.dir / "head.log")}
        if st.mlflow_pid:
            details["mlflow_uri"] = st.mlflow_uri
        return ClusterStatus(name=self.name, backend="local", exists=True, ready=ready,
                             address=st.dashboard if alive else None, nodes=[head], expires_at=st.expires_at,
                             details=details)

    def down(self, *, progress: Progress, timeout: float = 300.0) -> bool:
        if not (self.dir / STATE_FILE).exists() and not find_leftovers(self.temp_dir):
            return False  # without taking the lock, which would make the state dir of a cluster never started
        with _locked(self.dir / "local.lock"):
            st = self._load()
            if st is None and not find_leftovers(self.temp_dir):
                return False
            self._stop(st, progress, time.monotonic() + timeout)
        return True

    # -- start ----------------------------------------------------------------------------------------------------

    def _start(self, env: dict[str, Secret | str], ttl_s: float | None, progress: Progress) -> HeadState:
        local = self.p.local
        temp_dir = self.temp_dir
        child_env = _child_env(temp_dir, env)
        # Held until both children have exec'd: their command lines then name the ports for the next chooser.
        with _locked(state_root() / "local-ports.lock"):
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
        if not os.access(argv[0], os.X_OK):
            raise ToolMissing(f"{argv[0]} not found: reinstall hpcray with its dependencies in {sys.prefix}")
        with open(self.dir / log_name, "wb") as log:
            return subprocess.Popen(argv, env=env, cwd=self.dir, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    def _wait_ready(self, st: HeadState, deadline: float, progress: Progress) -> None:
        """Until the dashboard answers, the Jobs API lists jobs, the job agent listens and MLflow is healthy."""
        t0 = time.monotonic()
        agent = st.ports["dashboard-agent-listen-port"]
        checks = [("Ray dashboard answers", lambda: _http_ok(st.dashboard + "/api/version")),
                  ("Jobs API answers", lambda: _http_ok(st.dashboard + "/api/jobs/")),
                  ("job agent listens", lambda: _listening(agent))]
        if st.mlflow_pid:
            checks.append((f"MLflow server healthy at {st.mlflow_uri}",
                           lambda: _http_ok(f"{st.mlflow_uri}/health")))
        pending = list(checks)
        while pending:
            for what, check in list(pending):
                if check():
                    pending.remove((what, check))
                    progress(f"{what} after {time.monotonic() - t0:.1f} s")
            self._check_alive(st)
            if not pending:
                return
            if time.monotonic() > deadline:
                waiting = ", ".join(what for what, _ in pending)
                raise ClusterNotReady(
                    f"local cluster '{self.name}' not ready after {time.monotonic() - t0:.0f} s (still waiting: "
                    f"{waiting}). Last lines of {self.dir / 'head.log'}:\n"
                    f"{_tail(self.dir / 'head.log')}\nRetry with a longer --timeout.")
            time.sleep(0.2)

    def _check_alive(self, st: HeadState) -> None:
        for pid, what, log in ((st.pid, "Ray head", "head.log"), (st.mlflow_pid, "MLflow server", "mlflow.log")):
            if pid and not _running(pid):
                raise ClusterError(f"the local {what} of '{self.name}' exited while starting; last lines of "
                                   f"{self.dir / log}:\n{_tail(self.dir / log)}")

    # -- stop -----------------------------------------------------------------------------------------------------

    def _stop(self, st: HeadState | None, progress: Progress, deadline: float) -> None:
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
        grace = time.monotonic() + min(TERM_GRACE_S, max(0.0, deadline - time.monotonic()))
        left = _wait_gone(temp_dir, leaders, grace)
        if left:
            progress(f"{len(left)} process(es) still running after {time.monotonic() - t0:.0f} s; killing them")
            for pid in left:
                _signal(pid, signal.SIGKILL)
            left = _wait_gone(temp_dir, leaders, max(deadline, time.monotonic() + 2.0))
        if left:
            raise ClusterError(f"could not stop processes {left} of local cluster '{self.name}'; kill them by PID")
        shutil.rmtree(temp_dir, ignore_errors=True)
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
        path = self.dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(st), f, indent=2)
        os.replace(tmp, path)


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


def _wait_gone(temp_dir: str, leaders: list[int], until: float) -> list[int]:
    while True:
        left = sorted(set(find_leftovers(temp_dir)) | {pid for pid in leaders if _running(pid)})
        if not left or time.monotonic() >= until:
            return left
        time.sleep(0.2)


def _child_env(temp_dir: str, extra: dict[str, Secret | str]) -> dict[str, str]:
    bindir = os.path.dirname(sys.executable)
    env = dict(os.environ)
    env.update(QUIET_ENV)
    env.update({
        # Job entrypoints run through a shell with the head's PATH: `python` must be this venv's.
        "PATH": os.pathsep.join([bindir, env.get("PATH", "")]),
        # Else Ray replaces 127.0.0.1 with the machine's routable address and binds the GCS on every interface.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        # Ray turns token auth on when ~/.ray/auth_token exists and clients without RAY_AUTH_MODE then get 401:
        # be the same on every machine.
        "RAY_AUTH_MODE": "disabled",
        # A local head has nothing to drain; Ray's default waits up to 30 s on SIGTERM.
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        MARKER_VAR: temp_dir,
    })
    env.update({k: v.reveal() if isinstance(v, Secret) else v for k, v in extra.items()})
    return env


def _ray_argv(ports: dict[str, int], temp_dir: str, num_cpus: int | None, num_gpus: int | None) -> list[str]:
    argv = [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--block",
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
    return [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--host", "127.0.0.1",
            "--port", str(port), "--backend-store-uri", f"sqlite:///{directory / 'mlflow.db'}",
            "--artifacts-destination", str(directory / "artifacts"), "--workers", "1"]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[IO[str]]:
    make_private(path.parent)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield f


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


# -- HTTP -----------------------------------------------------------------------------------------------------------


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _detected_gpus(st: HeadState) -> int:
    """The GPUs Ray detected on the head (the state API's node resources), 0 if it cannot say."""
    try:
        with urllib.request.urlopen(st.dashboard + "/api/v0/nodes", timeout=5) as resp:
            nodes = json.load(resp)["data"]["result"]["result"]
        return int(sum(node.get("resources_total", {}).get("GPU", 0) for node in nodes))
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError):
        return 0
