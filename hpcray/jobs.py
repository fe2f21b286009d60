"""Ray jobs: the one door to a cluster's Job Submission API (submit, follow, logs, stop, list, status).

It speaks the Jobs REST API (`POST /api/jobs/`, `GET /api/jobs/<id>`, `…/logs`, `…/stop`) with urllib, the same
requests `JobSubmissionClient` makes, so that `submit --no-wait`, `status`, `logs` and `stop` never import ray
(about 0.7 s). Ray's own packaging (`ray._private.runtime_env`) builds and names the working_dir and py_modules
zips; it is imported only when a local directory has to be uploaded.
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

from hpcray.errors import (
    EXIT_JOB_FAILED,
    EXIT_JOB_STOPPED,
    EXIT_OK,
    ClusterError,
    HpcrayError,
    JobNotFound,
    RayVersionError,
    WorkingDirTooLarge,
)
from hpcray.profile import ItwinaiSpec, JobSpec, Profile
from hpcray.secrets import Secret
from hpcray.state import QUIET_ENV, make_private, state_root
from hpcray.tracking import PASSWORD_VAR, USERNAME_VAR, Credentials

Say = Callable[[str], None]

TERMINAL = {"SUCCEEDED": EXIT_OK, "FAILED": EXIT_JOB_FAILED, "STOPPED": EXIT_JOB_STOPPED}
"""Terminal Ray job statuses and the exit code hpcray mirrors each with."""

API_WAIT_S = 60.0
"""How long `submit` waits for the Jobs API of a fresh or port-forwarded cluster to accept jobs."""

POLL_S = 0.2
"""Status poll period when waiting for a job's end, and log poll period while following one."""
STATUS_POLL_S = 0.1
"""Status poll period while following a job (Ray's own log tail lingers ~5 s after a job ends)."""

_SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN(?!IZ)")  # TOKENIZERS_PARALLELISM is common and harmless
_WHEEL_DIR = "_hpcray_wheels"


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name.upper()))


def check_env_names(env: dict[str, str], where: str) -> None:
    """Refuse secret-looking variables: Ray shows runtime_env env_vars in plain text to every dashboard client."""
    for name in env:
        if is_secret_name(name):
            raise HpcrayError(
                f"{where} {name}: refused, because Ray shows a job's env vars in plain text to anyone who reaches the "
                f"dashboard; MLflow credentials reach jobs through the cluster's own environment (profile key "
                f"mlflow.credentials, delivered by `hpcray up`); let a job read other secrets from a file")


# ---------------------------------------------------------------------------------------------------------------
# The Jobs REST API
# ---------------------------------------------------------------------------------------------------------------


class _Refused(ClusterError):
    """The cluster answers but does not accept our token (or lack of one)."""


def ray_token() -> Secret | None:
    """Ray's token for a cluster with token authentication, looked up where Ray looks for it.

    Like `ray start`: RAY_AUTH_MODE=disabled sends none; otherwise RAY_AUTH_TOKEN, the file in RAY_AUTH_TOKEN_PATH,
    or ~/.ray/auth_token.
    """
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if os.environ.get("RAY_AUTH_TOKEN"):
        return Secret(os.environ["RAY_AUTH_TOKEN"].strip())
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        token = path.read_text().strip()
    except OSError:
        return None
    return Secret(token) if token else None


def normalize_address(address: str) -> str:
    address = address.strip().rstrip("/")
    if "://" not in address:
        address = f"http://{address}"
    if not address.startswith(("http://", "https://")):
        raise ClusterError(f"{address}: not a Jobs API address; give the dashboard's, e.g. http://127.0.0.1:8265")
    return address


def _last_line(text: str) -> str:
    """Ray answers errors with a Python traceback; its last line says what went wrong."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "no details")[:400]


class JobsApi:
    """A Ray cluster's Jobs API at one address (a local head, a port-forward, an ingress)."""

    def __init__(self, address: str, token: Secret | None = None) -> None:
        self.address = normalize_address(address)
        self._token = token if token is not None else ray_token()

    def call(self, method: str, path: str, *, body: Any = None, data: bytes | None = None,
             timeout: float = 30.0) -> tuple[int, str]:
        """(status, text) of one request; ClusterError when nothing answers or the cluster refuses us."""
        headers: dict[str, str] = {}
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self._token:
            headers["Authorization"] = f"Bearer {self._token.reveal()}"
        request = urllib.request.Request(self.address + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            text = exc.read().decode("utf-8", "replace")
            if exc.code in (401, 403):
                raise _Refused(
                    f"the Ray cluster at {self.address} refused us ({exc.code}: {_last_line(text)}); it uses token "
                    f"authentication: put its token in ~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN"
                ) from None
            return exc.code, text
        except OSError as exc:  # URLError, ConnectionRefused, timeouts
            reason = getattr(exc, "reason", exc)
            raise ClusterError(f"cannot reach the Ray Jobs API at {self.address}: {reason}; is the cluster up "
                                f"(`hpcray status`), or is --address wrong?") from None

    def _json(self, method: str, path: str, job_id: str | None = None, **kwargs: Any) -> Any:
        status, text = self.call(method, path, **kwargs)
        if status == 404 and job_id is not None:
            raise JobNotFound(f"no job '{job_id}' on the Ray cluster at {self.address}; `hpcray list` shows the jobs")
        if status != 200:
            raise ClusterError(f"{method} {path} at {self.address} failed ({status}): {_last_line(text)}")
        try:
            return json.loads(text)
        except ValueError:
            raise ClusterError(f"{self.address} answered {path} with something other than JSON; is it the Ray "
                               f"dashboard (port 8265 of the head)?") from None

    def version(self) -> dict[str, Any]:
        return dict(self._json("GET", "/api/version"))

    def submit(self, payload: dict[str, Any]) -> str:
        return str(self._json("POST", "/api/jobs/", body=payload)["submission_id"])

    def info(self, job_id: str) -> dict[str, Any]:
        return dict(self._json("GET", f"/api/jobs/{job_id}", job_id))

    def logs(self, job_id: str) -> str:
        return str(self._json("GET", f"/api/jobs/{job_id}/logs", job_id)["logs"])

    def stop(self, job_id: str) -> bool:
        return bool(self._json("POST", f"/api/jobs/{job_id}/stop", job_id)["stopped"])

    def list(self) -> list[dict[str, Any]]:
        return list(self._json("GET", "/api/jobs/"))

    def package_exists(self, uri: str) -> bool:
        status, text = self.call("GET", f"/api/packages/{_package_path(uri)}")
        if status not in (200, 404):
            raise ClusterError(f"checking package {uri} at {self.address} failed ({status}): {_last_line(text)}")
        return status == 200

    def put_package(self, uri: str, data: bytes) -> None:
        status, text = self.call("PUT", f"/api/packages/{_package_path(uri)}", data=data,
                                 timeout=60 + len(data) / 1e6)
        if status != 200:
            raise ClusterError(f"uploading {uri} to {self.address} failed ({status}): {_last_line(text)}")


def _package_path(uri: str) -> str:
    protocol, name = uri.split("://", 1)
    return f"{protocol}/{name}"


def wait_for_api(api: JobsApi, timeout: float, progress: Say) -> dict[str, Any]:
    """/api/version of a cluster whose Jobs API answers; a refused connection is retried until `timeout`."""
    start = time.monotonic()
    next_say = start
    while True:
        try:
            return api.version()
        except _Refused:
            raise
        except ClusterError as exc:  # nothing listening yet, or a proxy answering 502 for a starting dashboard
            waited = time.monotonic() - start
            if waited >= timeout:  # nothing was submitted: exit 2 like any cluster that cannot be reached
                raise ClusterError(f"the Ray Jobs API at {api.address} did not answer within {timeout:.0f} s: "
                                   f"{exc}") from None
            if time.monotonic() >= next_say:
                progress(f"waiting for the Ray Jobs API at {api.address} ({waited:.0f}/{timeout:.0f} s) …")
                next_say += 5
            time.sleep(0.5)


def check_versions(cluster: str, client: str, image: str | None, warn: Say, *, address: str | None = None) -> None:
    """Different major versions cannot talk; a different minor version mostly works, so it only warns."""
    where = f"the cluster at {address}" if address else "the cluster"

    def major_minor(v: str) -> tuple[int, int]:
        parts = [int(x) for x in re.findall(r"\d+", v)[:2]] + [0, 0]
        return parts[0], parts[1]

    for what, other in (("this client", client), ("the profile's image.ray_version", image)):
        if not other:
            continue
        (cma, cmi), (oma, omi) = major_minor(cluster), major_minor(other)
        if cma != oma:
            raise RayVersionError(f"{where} runs Ray {cluster} but {what} has Ray {other}; install "
                                  f"ray=={cluster} here or use an image with Ray {other}")
        if cmi != omi:
            warn(f"warning: {where} runs Ray {cluster}, {what} has Ray {other}; jobs usually work across minor "
                 f"versions, but match them if something fails")


def client_ray_version() -> str | None:
    """The installed Ray's version, read from ray/_version.py: `import ray` costs ~0.7 s, importlib.metadata ~0.1 s."""
    import importlib.util

    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.origin:
        return None
    try:
        found = re.search(r'^version = "([^"]+)"', (Path(spec.origin).parent / "_version.py").read_text(), re.M)
    except OSError:
        found = None
    if found:
        return found.group(1)
    from importlib.metadata import version

    return version("ray")


# ---------------------------------------------------------------------------------------------------------------
# From a profile's job to a submission
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Submission:
    """What is sent to `POST /api/jobs/`, before local directories are uploaded."""

    entrypoint: str
    runtime_env: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    submission_id: str | None = None
    entrypoint_num_cpus: float | None = None
    entrypoint_num_gpus: float | None = None
    wheels: list[Path] = field(default_factory=list)
    secrets: list[Secret] = field(default_factory=list, repr=False)

    def payload(self) -> dict[str, Any]:
        body = {"entrypoint": self.entrypoint, "runtime_env": self.runtime_env, "metadata": self.metadata,
                "submission_id": self.submission_id, "entrypoint_num_cpus": self.entrypoint_num_cpus,
                "entrypoint_num_gpus": self.entrypoint_num_gpus}
        return {k: v for k, v in body.items() if v is not None}


def job_spec(p: Profile, name: str | None, argv: list[str]) -> JobSpec:
    """The profile's job `name`, its paths made absolute against the profile file, or an ad-hoc job running argv."""
    if name is None:
        return JobSpec(entrypoint=entrypoint_of(argv))
    if name not in p.jobs:
        known = ", ".join(sorted(p.jobs)) or "none"
        raise HpcrayError(f"{p.source}: no job '{name}' (the profile's jobs: {known}); or give an entrypoint after "
                          f"`--`, e.g. hpcray submit -p {p.name} -- python train.py")
    job = p.jobs[name]

    def here(value: str) -> str:
        return value if _is_uri(value) else str(p.resolve_path(value))

    return dataclasses.replace(
        job, working_dir=here(job.working_dir) if job.working_dir else None,
        requirements=here(job.requirements) if job.requirements else None,
        wheels=[here(w) for w in job.wheels])


def with_overrides(spec: JobSpec, *, working_dir: str | None = None, requirements: str | None = None,
                   pip: tuple[str, ...] = (), wheels: tuple[str, ...] = (), env: dict[str, str] | None = None,
                   num_cpus: float | None = None, num_gpus: float | None = None) -> JobSpec:
    """Command-line flags over a job: paths relative to the current directory; lists and env extend the job's."""
    def here(value: str) -> str:
        return value if _is_uri(value) else str(Path(value).resolve())

    return dataclasses.replace(
        spec,
        working_dir=here(working_dir) if working_dir else spec.working_dir,
        requirements=here(requirements) if requirements else spec.requirements,
        pip=list(spec.pip) + list(pip),
        wheels=list(spec.wheels) + [here(w) for w in wheels],
        env={**spec.env, **(env or {})},
        num_cpus=spec.num_cpus if num_cpus is None else num_cpus,
        num_gpus=spec.num_gpus if num_gpus is None else num_gpus)


def itwinai_entrypoint(spec: ItwinaiSpec, p: Profile) -> str:
    argv = ["itwinai", "exec-pipeline"]
    if spec.config_path:
        argv += ["--config-path", spec.config_path]
    argv += ["--config-name", spec.config_name, f"+pipe_key={spec.pipe_key}"]
    if p.mlflow.tracking_uri:
        argv += [f"experiment_name={p.mlflow.experiment}", f"tracking_uri={p.mlflow.tracking_uri}"]
    return shlex.join(argv + list(spec.overrides))


def entrypoint_of(args: list[str]) -> str:
    """One argument is a shell command as written; several are an argv, quoted so the shell gives them back."""
    return args[0] if len(args) == 1 else shlex.join(args)


def read_requirements(path: Path) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise HpcrayError(f"{path}: cannot read the requirements file ({exc.strerror})") from None
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def _git_commit(directory: Path) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(directory), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _is_uri(value: str) -> bool:
    return "://" in value


def build_submission(p: Profile, spec: JobSpec, *, name: str | None, credentials: Credentials | None,
                     warn: Say, submission_id: str | None = None) -> Submission:
    """The job's entrypoint, runtime_env, resources and metadata; paths in `spec` are already absolute."""
    entrypoint = itwinai_entrypoint(spec.itwinai, p) if spec.itwinai else spec.entrypoint
    if not entrypoint:
        raise HpcrayError("no entrypoint: name a job of the profile or give one after `--`")
    runtime_env = json.loads(json.dumps(spec.runtime_env))  # a deep copy of plain YAML data
    extra_env = {str(k): str(v) for k, v in (runtime_env.pop("env_vars", None) or {}).items()}
    check_env_names(extra_env, "runtime_env.env_vars")
    check_env_names(spec.env, "env")
    env: dict[str, str] = dict(QUIET_ENV)
    if p.mlflow.tracking_uri:
        env["MLFLOW_TRACKING_URI"] = p.mlflow.tracking_uri
        env["MLFLOW_EXPERIMENT_NAME"] = p.mlflow.experiment
    env.update(extra_env)
    env.update(spec.env)
    secrets: list[Secret] = []
    if credentials is not None and p.mlflow.deliver == "runtime_env":
        warn(f"warning: mlflow.deliver is 'runtime_env': {PASSWORD_VAR} goes into the job's runtime_env, which Ray "
             f"shows in plain text to anyone who reaches the dashboard (and puts on the command line of its worker "
             f"processes, which `ps` shows to every user of the machine); prefer the default 'secret'")
        env[USERNAME_VAR] = credentials.username
        env[PASSWORD_VAR] = credentials.password.reveal()
        secrets.append(credentials.password)
    runtime_env["env_vars"] = env

    pip = _pip_list(runtime_env.pop("pip", None))
    if spec.requirements:
        pip += read_requirements(Path(spec.requirements))
    pip += list(spec.pip)
    if pip:
        runtime_env["pip"] = pip
    if spec.working_dir:
        runtime_env["working_dir"] = spec.working_dir
    for path in [spec.working_dir or "", *spec.wheels]:
        if path and not _is_uri(path) and not Path(path).exists():
            raise HpcrayError(f"{path}: no such file or directory (a working dir or wheel of the job)")

    metadata = {"profile": p.name, "user": getpass.getuser()}
    if name:
        metadata["job"] = name
    if spec.working_dir and not _is_uri(spec.working_dir):
        commit = _git_commit(Path(spec.working_dir))
        if commit:
            metadata["git_commit"] = commit
    return Submission(entrypoint, runtime_env, metadata, submission_id, spec.num_cpus, spec.num_gpus,
                      [Path(w) for w in spec.wheels], secrets)


def _pip_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, dict):
        return [str(v) for v in value.get("packages", [])]
    if isinstance(value, str):
        return read_requirements(Path(value))
    return [str(v) for v in value]


def build_wheel(project: Path, dest: Path) -> Path:
    """`pip wheel --no-deps` of a project directory; the one wheel it makes."""
    # An absolute path: pip reads a bare name such as `proj` as a package to fetch from the index.
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dest),
                           str(project.resolve())], capture_output=True, text=True)
    built = sorted(dest.glob("*.whl"))
    if done.returncode != 0 or not built:
        raise HpcrayError(f"building a wheel of {project} failed: {_last_line(done.stderr or done.stdout)}")
    return built[-1]


# ---------------------------------------------------------------------------------------------------------------
# Uploading local directories with Ray's packaging
# ---------------------------------------------------------------------------------------------------------------


def stage_wheels(runtime_env: dict[str, Any], wheels: list[Path], tmp: Path) -> None:
    """Ship wheels inside the working dir and pip-install them from there, without touching the user's directory:
    the staged dir links to its entries (Ray's zip follows links, so the package holds the same files) and holds
    copies of the wheels, built first where a project directory is given."""
    if not wheels:
        return
    working_dir = runtime_env.get("working_dir")
    if working_dir and _is_uri(working_dir):
        raise HpcrayError(f"wheels are shipped inside the working dir, which cannot be a URI ({working_dir}); "
                          f"use a local working dir or put the wheels on an index")
    stage = tmp / "working_dir"
    (stage / _WHEEL_DIR).mkdir(parents=True)
    if working_dir:
        for entry in Path(working_dir).iterdir():
            (stage / entry.name).symlink_to(entry.resolve())
    pip = list(runtime_env.get("pip") or [])
    for wheel in wheels:
        built = build_wheel(wheel, Path(tempfile.mkdtemp(dir=tmp))) if wheel.is_dir() else wheel
        if built.suffix != ".whl" or not built.is_file():
            raise HpcrayError(f"{wheel}: neither a .whl file nor a Python project directory")
        shutil.copy2(built, stage / _WHEEL_DIR / built.name)
        pip.append(f"${{RAY_RUNTIME_ENV_CREATE_WORKING_DIR}}/{_WHEEL_DIR}/{built.name}")
    runtime_env["working_dir"], runtime_env["pip"] = str(stage), pip


def upload_local_packages(api: JobsApi, runtime_env: dict[str, Any], progress: Say, *, cache: bool = True) -> None:
    """Replace local working_dir / py_modules paths by gcs:// URIs of packages uploaded to the cluster."""
    local = [x for x in [runtime_env.get("working_dir"), *(runtime_env.get("py_modules") or [])]
             if isinstance(x, str) and not _is_uri(x)]
    if not local:
        return
    key = _package_key(runtime_env) if cache and local == [runtime_env.get("working_dir")] else None
    known = _package_cache().get(key) if key else None
    if known and api.package_exists(known):
        runtime_env["working_dir"] = known
        return
    _upload_with_ray(api, runtime_env, local, progress)
    if key:
        _remember_package(key, runtime_env["working_dir"])


def _upload_with_ray(api: JobsApi, runtime_env: dict[str, Any], local: list[str], progress: Say) -> None:
    import logging

    from ray._private.ray_constants import RAY_RUNTIME_ENV_IGNORE_GITIGNORE, get_runtime_env_default_excludes
    from ray._private.runtime_env.py_modules import upload_py_modules_if_needed
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    for path in local:
        if not Path(path).exists():
            raise HpcrayError(f"{path}: no such working dir or module; give an existing directory (or a URI)")
    include_gitignore = os.environ.get(RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"
    excludes = get_runtime_env_default_excludes() + list(runtime_env.get("excludes") or [])
    for path in local:
        if Path(path).is_dir():
            check_package_size(Path(path), excludes, include_gitignore)
    quiet = logging.getLogger("hpcray.packaging")  # Ray's own logger prints every step at INFO; keep warnings

    def uploader(parent: bool) -> Callable[..., None]:
        def upload(path: str, excludes: list[str] | None = None, is_file: bool = False) -> None:
            _upload(api, path, excludes or [], is_file, parent, include_gitignore, progress, quiet)
        return upload

    try:
        upload_working_dir_if_needed(runtime_env, include_gitignore, logger=quiet, upload_fn=uploader(False))
        upload_py_modules_if_needed(runtime_env, include_gitignore, logger=quiet, upload_fn=uploader(True))
    except ValueError as exc:  # Ray's packaging says what is wrong with a path
        raise HpcrayError(str(exc)) from None


def _package_key(runtime_env: dict[str, Any]) -> str | None:
    """Changes whenever Ray's package of the working dir could: each file's path, size and mtime (excluded files
    too, which at worst costs an upload), the excludes, the Ray version and the settings Ray's packaging reads.
    Lets an unchanged working dir skip `import ray` and hashing (~1 s) when the cluster still has its package."""
    import hashlib

    directory = Path(runtime_env["working_dir"])
    if not directory.is_dir():
        return None
    settings = [str(directory.resolve()), runtime_env.get("excludes"), client_ray_version(),
                [os.environ.get(k) for k in ("RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES",
                                             "RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "RAY_max_grpc_message_size")]]
    digest = hashlib.sha256(json.dumps(settings).encode())
    for root, dirs, files in os.walk(directory, followlinks=True):
        dirs.sort()
        for name in sorted(dirs + files):
            path = os.path.join(root, name)
            try:
                st = os.stat(path)
            except OSError:  # a dangling link: Ray skips it too
                continue
            digest.update(f"{os.path.relpath(path, directory)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _package_cache_path() -> Path:
    return state_root() / "packages.json"


def _package_cache() -> dict[str, str]:
    try:
        return dict(json.loads(_package_cache_path().read_text()))
    except (OSError, ValueError):
        return {}


def _remember_package(key: str, uri: str) -> None:
    cache = _package_cache()
    cache.pop(key, None)
    cache[key] = uri
    path = _package_cache_path()
    make_private(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(dict(list(cache.items())[-100:])))
    os.replace(tmp, path)


def _upload(api: JobsApi, path: str, excludes: list[str], is_file: bool, include_parent_dir: bool,
            include_gitignore: bool, progress: Say, logger: Any) -> None:
    from ray._private.runtime_env import packaging

    if is_file:
        uri = packaging.get_uri_for_package(Path(path))
    else:
        uri = packaging.get_uri_for_directory(path, include_gitignore, excludes=excludes)
    if api.package_exists(uri):
        return
    with tempfile.TemporaryDirectory(prefix="hpcray-pkg-") as tmp:
        package = Path(path) if is_file else Path(tmp) / uri.split("://", 1)[1]
        if not is_file:
            packaging.create_package(path, package, include_gitignore=include_gitignore,
                                     include_parent_dir=include_parent_dir, excludes=excludes, logger=logger)
        data = package.read_bytes()
    progress(f"uploading {len(data) / 2**20:.1f} MiB as {uri}")
    api.put_package(uri, data)


def check_package_size(directory: Path, excludes: list[str], include_gitignore: bool) -> None:
    """Ray refuses a package of GCS_STORAGE_MAX_SIZE or more only once it is uploaded; say so before, naming the
    bulk. Ray zips without compression, so the package is the files that survive the excludes plus small headers.
    """
    import logging

    from ray._private.runtime_env import packaging

    sizes: dict[str, int] = {}

    def count(path: Path) -> None:
        if path.is_file():
            top = path.relative_to(directory).parts[0]
            sizes[top] = sizes.get(top, 0) + path.stat().st_size

    packaging._dir_travel(directory, [packaging._get_excludes(directory, excludes)], count,
                          include_gitignore=include_gitignore, logger=logging.getLogger("hpcray.packaging"))
    total, limit = sum(sizes.values()), packaging.GCS_STORAGE_MAX_SIZE
    if total >= limit:
        bulk = ", ".join(f"{name} ({size / 2**20:.0f} MiB)"
                         for name, size in sorted(sizes.items(), key=lambda kv: -kv[1])[:3])
        raise WorkingDirTooLarge(
            f"{directory} packs to {total / 2**20:.0f} MiB, over Ray's upload limit of {limit / 2**20:.0f} MiB "
            f"(RAY_max_grpc_message_size); largest: {bulk}; exclude them with runtime_env.excludes or a .rayignore "
            f"file, or put the data on a shared volume")


# ---------------------------------------------------------------------------------------------------------------
# Submitting and following
# ---------------------------------------------------------------------------------------------------------------


def submit(api: JobsApi, sub: Submission, *, image_ray_version: str | None, progress: Say, warn: Say,
           wait_s: float | None = None) -> str:
    """Wait (API_WAIT_S by default) until the cluster accepts jobs, check Ray versions, upload local dirs, submit;
    the submission id."""
    wait_s = API_WAIT_S if wait_s is None else wait_s
    deadline = time.monotonic() + wait_s
    version = wait_for_api(api, wait_s, progress)
    check_versions(str(version.get("ray_version", "")), client_ray_version() or "", image_ray_version, warn,
                   address=api.address)
    with tempfile.TemporaryDirectory(prefix="hpcray-job-") as tmp:
        runtime_env = dict(sub.runtime_env)
        stage_wheels(runtime_env, sub.wheels, Path(tmp))
        upload_local_packages(api, runtime_env, progress, cache=not sub.wheels)  # a staged dir is new every time
        payload = {**sub.payload(), "runtime_env": runtime_env}
    try:
        return _post_until_accepted(api, payload, deadline)
    except HpcrayError as exc:
        raise type(exc)(_scrub(str(exc), sub.secrets)) from None


def _post_until_accepted(api: JobsApi, payload: dict[str, Any], deadline: float) -> str:
    """A head whose dashboard answers may still lack its job agent for a few seconds (HTTP 500, 'No available
    agent'); that, and only that, is retried."""
    while True:
        try:
            return api.submit(payload)
        except ClusterError as exc:
            if "No available agent" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(0.5)


def _scrub(text: str, secrets: list[Secret]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret.reveal(), Secret.REDACTED)
    return text


def follow(api: JobsApi, job_id: str, out: TextIO) -> dict[str, Any]:
    """Print the job's logs as they grow until it ends; its final details (status, message).

    Polls the status every STATUS_POLL_S (a few hundred bytes: the end is noticed within ~0.1 s) and drains the
    full log by offset (the Jobs API has no ranged read) every POLL_S, less often as the log grows, so a chatty
    job does not make this loop heavy.
    """
    printed = 0
    next_logs = 0.0
    while True:
        info = api.info(job_id)
        status = str(info["status"])
        now = time.monotonic()
        if status in TERMINAL or now >= next_logs:
            text = api.logs(job_id)
            if len(text) > printed:
                out.write(text[printed:])
                out.flush()
                printed = len(text)
            next_logs = now + POLL_S + printed / 2e6
        if status in TERMINAL:
            return redact(info)
        time.sleep(STATUS_POLL_S)


def wait_until_done(api: JobsApi, job_id: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = str(api.info(job_id)["status"])
        if status in TERMINAL or time.monotonic() >= deadline:
            return status
        time.sleep(POLL_S)


def stop(api: JobsApi, job_id: str, *, wait: bool = True, timeout: float = 30.0) -> str:
    """Ask Ray to stop the job (SIGTERM, then SIGKILL); its status afterwards."""
    api.stop(job_id)
    return wait_until_done(api, job_id, timeout) if wait else str(api.info(job_id)["status"])


def status_of(api: JobsApi, job_id: str) -> dict[str, Any]:
    """A job's details as Ray reports them, with secret-looking env var values redacted."""
    return redact(api.info(job_id))


def list_jobs(api: JobsApi) -> list[dict[str, Any]]:
    return [redact(job) for job in api.list()]


def redact(job: dict[str, Any]) -> dict[str, Any]:
    """A copy of a job's details that shows which secret-looking env vars are set, not their values."""
    env = (job.get("runtime_env") or {}).get("env_vars")
    if not env:
        return job
    shown = {k: Secret.REDACTED if is_secret_name(k) else v for k, v in env.items()}
    return {**job, "runtime_env": {**job["runtime_env"], "env_vars": shown}}


def failure_summary(message: str) -> str:
    """Ray's message about a failed job, without the log tail it repeats when the entrypoint itself failed."""
    first = message.strip().split("\n", 1)[0]
    if first.startswith("Job entrypoint command failed"):
        return first.split(", last available logs", 1)[0]
    return message.strip()


def exit_code(status: str) -> int:
    return TERMINAL.get(status, EXIT_OK)


def job_lines(jobs: list[dict[str, Any]]) -> Iterator[str]:
    """`hpcray list` as a table: id, status, start time, entrypoint."""
    yield f"{'SUBMISSION ID':<34} {'STATUS':<10} {'STARTED':<19} ENTRYPOINT"
    for job in sorted(jobs, key=lambda j: j.get("start_time") or 0):
        started = job.get("start_time")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started / 1000)) if started else "-"
        ident = job.get("submission_id") or job.get("job_id") or "-"
        entry = (job.get("entrypoint") or "").replace("\n", " ")
        yield f"{ident:<34} {job.get('status', '?'):<10} {when:<19} {entry[:80]}"
