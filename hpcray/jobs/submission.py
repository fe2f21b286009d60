"""From a profile's job (or an entrypoint on the command line) to what is sent to `POST /api/jobs/`.

The rules about what a job may carry live here: Ray shows a job's runtime_env env vars in plain text to every
dashboard client, so secret-looking names are refused, and secret values are redacted wherever hpcray shows a job.
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from hpcray.errors import HpcrayError, UnknownJob
from hpcray.profile import ItwinaiSpec, JobSpec, Profile
from hpcray.secrets import Secret, is_secret_name
from hpcray.state import QUIET_ENV
from hpcray.tracking import PASSWORD_VAR, USERNAME_VAR, Credentials

Say = Callable[[str], None]



def check_env_names(env: dict[str, str], where: str) -> None:
    """Refuse secret-looking variables: Ray shows runtime_env env_vars in plain text to every dashboard client."""
    for name in env:
        if is_secret_name(name):
            raise HpcrayError(
                f"{where} {name}: refused, because Ray shows a job's env vars in plain text to anyone who reaches the "
                f"dashboard; MLflow credentials reach jobs through the cluster's own environment (profile key "
                f"mlflow.credentials, delivered by `hpcray up`); let a job read other secrets from a file")


def redact(job: dict[str, Any]) -> dict[str, Any]:
    """A copy of a job's details that shows which secret-looking env vars are set, not their values."""
    env = (job.get("runtime_env") or {}).get("env_vars")
    if not env:
        return job
    shown = {k: Secret.REDACTED if is_secret_name(k) else v for k, v in env.items()}
    return {**job, "runtime_env": {**job["runtime_env"], "env_vars": shown}}


def scrub(text: str, secrets: list[Secret]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret.reveal(), Secret.REDACTED)
    return text


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


def check_names(p: Profile, names: Iterable[str]) -> None:
    """UnknownJob for the first name that is not a job of the profile."""
    for name in names:
        if name not in p.jobs:
            raise UnknownJob(f"{p.source}: jobs.{name}: no such job in the profile; its jobs are: "
                             f"{', '.join(p.jobs) or 'none'}")


def job_spec(p: Profile, name: str | None, argv: list[str]) -> JobSpec:
    """The profile's job `name`, its paths made absolute against the profile file, or an ad-hoc job running argv."""
    if name is None:
        return JobSpec(entrypoint=entrypoint_of(argv))
    check_names(p, [name])
    job = p.jobs[name]

    def here(value: str) -> str:
        return value if is_uri(value) else str(p.resolve_path(value))

    return dataclasses.replace(
        job, working_dir=here(job.working_dir) if job.working_dir else None,
        requirements=here(job.requirements) if job.requirements else None,
        wheels=[here(w) for w in job.wheels])


def with_overrides(spec: JobSpec, *, working_dir: str | None = None, requirements: str | None = None,
                   pip: tuple[str, ...] = (), wheels: tuple[str, ...] = (), env: dict[str, str] | None = None,
                   num_cpus: float | None = None, num_gpus: float | None = None) -> JobSpec:
    """Command-line flags over a job: paths relative to the current directory; lists and env extend the job's."""
    def here(value: str) -> str:
        return value if is_uri(value) else str(Path(value).resolve())

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


def is_uri(value: str) -> bool:
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
        if path and not is_uri(path) and not Path(path).exists():
            raise HpcrayError(f"{path}: no such file or directory (a working dir or wheel of the job)")

    metadata = {"profile": p.name, "user": getpass.getuser()}
    if name:
        metadata["job"] = name
    if spec.working_dir and not is_uri(spec.working_dir):
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
