"""MLflow: where credentials come from (never argv), and the preflight run before anything is queued."""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, TextIO

from hpcray.errors import CredentialsError, TrackingError
from hpcray.profile import Profile
from hpcray.secrets import Secret
from hpcray.state import make_private

USERNAME_VAR = "MLFLOW_TRACKING_USERNAME"
PASSWORD_VAR = "MLFLOW_TRACKING_PASSWORD"
SECRET_KEYS = {USERNAME_VAR: "username", PASSWORD_VAR: "password"}
"""The keys of the Kubernetes Secret that holds the credentials, by the variable the pods read each into."""


@dataclass(frozen=True)
class Credentials:
    username: str
    password: Secret

    def env(self) -> dict[str, Secret | str]:
        """The variables MLflow's client reads them from."""
        return {USERNAME_VAR: self.username, PASSWORD_VAR: self.password}


Delivery = Literal["secret", "head_env", "runtime_env"]


@dataclass(frozen=True)
class CredentialPlan:
    """Who needs MLflow credentials and where they go: the one rule that render, the backends, the flows and the
    CLI follow (from credential_plan).

    ``where`` is
    - "secret": a Kubernetes Secret (``secret_name``) that every Ray pod reads (kuberay): ``secret_as`` "env"
      (variables from the Secret) or "file" (a Secret volume, mode 0400, that the Ray container's command reads
      into its environment). "file" on interLink: its SLURM plugin writes every variable in plaintext into an env
      file (0644) and its debug log, a Secret volume only into one 0400 file (measured: tests/test_vega_box.py);
    - "head_env": the local Ray head's environment, which every job inherits (local; mlflow.deliver: secret);
    - "runtime_env": each job's runtime_env (mlflow.deliver: runtime_env; opt-in: the dashboard shows it);
    - None: nowhere, because nothing takes a login: no tracking URI, a local store (sqlite:, file:, a path), or
      mlflow.credentials: none.
    ``source`` says where hpcray reads them (env, file, stdin) when they are needed.
    """

    where: Delivery | None
    source: Literal["env", "file", "stdin"] | None = None
    file: Path | None = None  # with source "file"
    secret_name: str | None = None  # with where "secret"
    secret_as: Literal["env", "file"] | None = None  # with where "secret": how the pods read the Secret

    @property
    def in_cluster(self) -> bool:
        """`up` gives them to the cluster (a Secret, the head's environment)."""
        return self.where in ("secret", "head_env")

    @property
    def in_job(self) -> bool:
        """Each submission carries them (runtime_env)."""
        return self.where == "runtime_env"

    def load(self, *, environ: Mapping[str, str] | None = None, stdin: TextIO | None = None) -> Credentials | None:
        """The credentials, read from their source; None when nobody needs them. CredentialsError when missing."""
        if self.where is None:
            return None
        if self.source == "env":
            env = os.environ if environ is None else environ
            user, password = env.get(USERNAME_VAR), env.get(PASSWORD_VAR)
            if not user or not password:
                unset = [v for v, val in ((USERNAME_VAR, user), (PASSWORD_VAR, password)) if not val]
                missing = f"{' and '.join(unset)} {'are' if len(unset) > 1 else 'is'} not set"
                raise CredentialsError(f"mlflow.credentials is 'env' but {missing}; export it (e.g. "
                                       f"`read -s {PASSWORD_VAR}; export {PASSWORD_VAR}`), or use a credentials file")
            return Credentials(user, Secret(password))
        if self.source == "file":
            assert self.file is not None  # credential_plan sets it with this source
            return read_credentials_file(self.file)
        return read_credentials_stdin(stdin or sys.stdin)


def takes_login(tracking_uri: str | None) -> bool:
    """An MLflow tracking server reached over HTTP may ask for a login; a local store never does."""
    return bool(tracking_uri) and str(tracking_uri).startswith(("http://", "https://"))


def secret_name(cluster: str) -> str:
    """The Kubernetes Secret that holds a KubeRay cluster's MLflow credentials."""
    return f"{cluster}-hpcray-mlflow"


def credential_plan(p: Profile) -> CredentialPlan:
    m = p.mlflow
    if not takes_login(m.tracking_uri) or m.credentials == "none":
        return CredentialPlan(None)
    where: Delivery = "runtime_env" if m.deliver == "runtime_env" else "secret" if p.backend == "kuberay" else \
        "head_env"
    file = p.resolve_path(m.credentials_file) if m.credentials == "file" and m.credentials_file else None
    if where != "secret":
        return CredentialPlan(where, m.credentials, file)
    read_as: Literal["env", "file"] = "file" if m.deliver == "secret_file" or (
        m.deliver == "secret" and p.interlink.enabled) else "env"
    return CredentialPlan(where, m.credentials, file, secret_name(p.name), read_as)


def read_credentials_file(path: Path) -> Credentials:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise CredentialsError(f"{path}: credentials file not found; create it with `username=…` and `password=…` "
                               f"lines and `chmod 600 {path}`") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CredentialsError(f"{path}: credentials file is readable by others (mode {stat.S_IMODE(mode):o}); "
                               f"run `chmod 600 {path}`")
    fields: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            fields[key.strip().lower()] = value.strip()
    if not fields.get("username") or not fields.get("password"):
        raise CredentialsError(f"{path}: needs a `username=…` and a `password=…` line")
    return Credentials(fields["username"], Secret(fields["password"]))


def read_credentials_stdin(stream: TextIO) -> Credentials:
    """From a terminal: prompt (the password unechoed). From a pipe: two lines, username then password."""
    if stream.isatty():
        import getpass

        user = input("MLflow username: ").strip()
        password = getpass.getpass("MLflow password: ")
    else:
        lines = stream.read().splitlines()
        user, password = (lines + ["", ""])[:2]
    if not user.strip() or not password:
        raise CredentialsError("mlflow.credentials is 'stdin' but no username and password were given; pipe two "
                               "lines (username, then password) or run in a terminal to be prompted")
    return Credentials(user.strip(), Secret(password))


# ---------------------------------------------------------------------------------------------------------------
# Preflight: plain HTTP against MLflow's REST API (no `import mlflow`, no telemetry), credentials in headers only
# ---------------------------------------------------------------------------------------------------------------

PREFLIGHT_RUN = "hpcray-preflight"


class _Mlflow:
    """Just the REST calls the preflight makes."""

    def __init__(self, uri: str, credentials: Credentials | None, timeout: float) -> None:
        self.uri, self.credentials, self.timeout = uri.rstrip("/"), credentials, timeout

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        import base64
        import json

        from hpcray import http

        # MLflow's basic-auth app answers 401 to a GET that carries a JSON Content-Type: http.request sets it only
        # with a body.
        headers: dict[str, str | Secret] = {}
        if self.credentials is not None:
            pair = f"{self.credentials.username}:{self.credentials.password.reveal()}".encode()
            headers["Authorization"] = Secret("Basic " + base64.b64encode(pair).decode())
        try:
            response = http.request(self.uri, method, f"/api/2.0/mlflow/{path}", body=body, headers=headers,
                                    timeout=self.timeout)
        except http.Unreachable as exc:
            raise TrackingError(f"the MLflow server at {self.uri} does not answer ({exc.reason}); check "
                                f"mlflow.tracking_uri and that the server is up") from None
        status, text = response.status, response.text
        if status == 401 and self.credentials is None:
            raise TrackingError(f"the MLflow server at {self.uri} requires a login (401); set mlflow.credentials in "
                                f"the profile (env, file or stdin)")
        if status == 401:
            raise TrackingError(f"the MLflow server at {self.uri} rejected user '{self.credentials.username}' (401: "
                                f"wrong username or password); check {USERNAME_VAR}/{PASSWORD_VAR} or the profile's "
                                f"mlflow.credentials source")
        try:
            return status, json.loads(text) if text.strip() else {}
        except ValueError:
            if status != 200:
                return status, {"message": text.strip()[:200]}
            raise TrackingError(f"{self.uri} answered with something other than MLflow's JSON; is "
                                f"mlflow.tracking_uri the MLflow server itself?") from None

    def experiment(self, name: str) -> dict[str, Any] | None:
        status, body = self.lookup(name)
        if status == 404:
            return None
        self.expect(status, body, f"reading experiment '{name}'", name)
        return dict(body["experiment"])

    def lookup(self, name: str) -> tuple[int, dict[str, Any]]:
        from urllib.parse import quote

        return self.call("GET", f"experiments/get-by-name?experiment_name={quote(name)}")

    def expect(self, status: int, body: dict[str, Any], doing: str, experiment: str) -> None:
        if status == 403 and doing.startswith("creating experiment"):
            raise TrackingError(f"{self.who()} may not create MLflow experiment '{experiment}' on {self.uri} (403); "
                                f"ask its admin for one, or set mlflow.experiment to one you may write to")
        if status == 403:
            raise TrackingError(f"{self.who()} may not write to MLflow experiment '{experiment}' (403: it belongs to "
                                f"someone else); set mlflow.experiment to a free name such as "
                                f"'{self.free_name(experiment)}'")
        if status != 200:
            raise TrackingError(f"{doing} on {self.uri} failed ({status}: {body.get('message', body)})")

    def who(self) -> str:
        return f"user '{self.credentials.username}'" if self.credentials else "an anonymous user"

    def free_name(self, experiment: str) -> str:
        import getpass

        base = f"{experiment}-{self.credentials.username if self.credentials else getpass.getuser()}"
        candidates = [base] + [f"{base}-{i}" for i in range(2, 6)]
        return next((c for c in candidates if self.lookup(c)[0] == 404), f"{base}-{os.getpid()}")


def prepare_local_store(uri: str, experiment: str) -> str | None:
    """Give a sqlite store's experiments an artifact root beside the database; a warning if the profile's
    experiment already exists with its artifacts elsewhere.

    Without one, the process that creates the store or an experiment puts artifacts under its own working dir
    (`./mlruns`): for a job, that is its Ray working dir, which the local head's teardown deletes with the models
    the job logged. So the store and the profile's experiment are made here first, as `mlflow server
    --default-artifact-root` would make them. Cheap when they exist (one sqlite query, no mlflow import).
    """
    import sqlite3

    db = Path(uri.removeprefix("sqlite:///"))
    root = (db.parent / "artifacts").resolve().as_uri()
    if db.exists():
        try:
            with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as conn:
                row = conn.execute("SELECT artifact_location FROM experiments WHERE name = ?",
                                   (experiment,)).fetchone()
        except sqlite3.Error:
            row = None  # not made by MLflow yet, or another schema: let MLflow say
        if row:
            if str(row[0]).startswith(root + "/"):
                return None
            return (f"MLflow experiment '{experiment}' in {db} keeps its artifacts in {row[0]}, not beside the store: "
                    f"models jobs log there are lost if that is a job's temporary dir; set mlflow.experiment to a "
                    f"new name to keep them in {root}")
    make_private(db.parent)
    try:
        import logging

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # its INFO lines about creating tables
        from mlflow.exceptions import MlflowException
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        store = SqlAlchemyStore(uri, root)
        if store.get_experiment_by_name(experiment) is None:
            try:
                store.create_experiment(experiment)
            except MlflowException:  # made meanwhile by a job
                if store.get_experiment_by_name(experiment) is None:
                    raise
    except Exception as exc:  # noqa: BLE001 - MLflow, SQLAlchemy and OS errors alike: one line
        # SQLAlchemy wraps the database's error in several lines with the SQL: its first line, or the wrapped one
        why = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TrackingError(f"cannot prepare the local MLflow store {db}: {why}; remove it (the runs in it are "
                            "lost) or set mlflow.tracking_uri") from None
    return None


def preflight(p: Profile, credentials: Credentials | None, *, timeout: float = 10.0) -> None:
    """Before anything is queued: the MLflow server answers, accepts the credentials, and lets this user write.

    Write access is measured, not inferred: an experiment of another user with the default READ permission lets
    `set_experiment` succeed and then `start_run` fail 403, so a run is created and deleted (named
    hpcray-preflight). A missing experiment is created, as the job would. Local stores (sqlite:, file:) pass.
    """
    uri = p.mlflow.tracking_uri
    if not uri or not uri.startswith(("http://", "https://")):
        return
    api = _Mlflow(uri, credentials, timeout)
    name = p.mlflow.experiment
    experiment = api.experiment(name)
    if experiment is None:
        status, body = api.call("POST", "experiments/create", {"name": name})
        if status == 200:
            return  # the creator of an experiment may write to it
        experiment = api.experiment(name)  # created meanwhile by someone else (RESOURCE_ALREADY_EXISTS)
        if experiment is None:
            api.expect(status, body, f"creating experiment '{name}'", name)
            return
    if experiment.get("lifecycle_stage") == "deleted":
        raise TrackingError(f"MLflow experiment '{name}' is deleted; restore it (`mlflow experiments restore`) or "
                            f"set mlflow.experiment to another name")
    status, body = api.call("POST", "runs/create", {
        "experiment_id": experiment["experiment_id"], "run_name": PREFLIGHT_RUN,
        "tags": [{"key": "mlflow.runName", "value": PREFLIGHT_RUN}]})
    api.expect(status, body, f"creating a run in experiment '{name}'", name)
    status, body = api.call("POST", "runs/delete", {"run_id": body["run"]["info"]["run_id"]})
    api.expect(status, body, f"deleting the preflight run in experiment '{name}'", name)


# ---------------------------------------------------------------------------------------------------------------
# Accounting: a job's usage (hpcray.accounting) as metrics and tags of its MLflow runs, once the job has ended
# ---------------------------------------------------------------------------------------------------------------


def log_usage(uri: str, credentials: Credentials | None, run_ids: list[str], metrics: dict[str, float],
              tags: dict[str, str], *, timestamp: float, timeout: float = 10.0) -> None:
    """Add metrics (at `timestamp`, epoch seconds; step 0) and tags to each run, which may have finished (MLflow
    takes them then too). A server: its REST API, credentials in headers only (no `import mlflow`); a sqlite store:
    MLflow's own store. TrackingError when a run refuses them."""
    ms = int(timestamp * 1000)
    if uri.startswith(("http://", "https://")):
        api = _Mlflow(uri, credentials, timeout)
        for run_id in run_ids:
            status, body = api.call("POST", "runs/log-batch", {
                "run_id": run_id, "metrics": [{"key": k, "value": v, "timestamp": ms, "step": 0}
                                              for k, v in metrics.items()],
                "tags": [{"key": k, "value": v} for k, v in tags.items()]})
            if status != 200:
                raise TrackingError(f"MLflow run {run_id} on {uri} took no usage metrics ({status}: "
                                    f"{body.get('message', body)}); check that {api.who()} may write to its experiment")
        return
    if not uri.startswith("sqlite:///"):
        raise TrackingError(f"usage metrics go to an MLflow server or a sqlite store, not {uri}")
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    from mlflow.entities import Metric, RunTag
    from mlflow.exceptions import MlflowException
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    root = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
    try:
        store = SqlAlchemyStore(uri, root)
        for run_id in run_ids:
            store.log_batch(run_id, metrics=[Metric(k, v, ms, 0) for k, v in metrics.items()], params=[],
                            tags=[RunTag(k, v) for k, v in tags.items()])
    except MlflowException as exc:
        raise TrackingError(f"MLflow run in {uri} took no usage metrics: {exc.message}") from None


def log_artifacts(uri: str, credentials: Credentials | None, run_id: str, directory: Path, artifact_path: str) -> None:
    """Upload a directory's files as artifacts of an existing run (a job's archive). The credentials reach MLflow's
    client the way it reads them, through this process's environment, only while it uploads."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    env = {k: v.reveal() if isinstance(v, Secret) else v for k, v in credentials.env().items()} if credentials else {}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        MlflowClient(uri).log_artifacts(run_id, str(directory), artifact_path)
    except MlflowException as exc:
        raise TrackingError(f"cannot save artifacts to MLflow run {run_id} at {uri}: {exc.message}") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
