"""Ray jobs: the one door to a cluster's Job Submission API (submit, follow, logs, stop, list, status).

- `api`: the Jobs API client (JSON calls over hpcray.http, the log-tail websocket over aiohttp);
- `submission`: a profile's job or a command line → what is sent, with the rules on env vars and secrets;
- `packaging`: wheels, working_dir and py_modules uploaded with Ray's own packaging (the only `ray._private` user);
- `follow`: following a job to its end, stopping it, listing jobs.

`submit` below ties them together. Importing this package imports neither ray nor aiohttp.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

from hpcray.errors import HpcrayError
from hpcray.jobs.api import AgentNotReady, JobsApi, check_versions, client_ray_version, ray_token, wait_for_api
from hpcray.jobs.follow import TERMINAL, exit_code, failure_summary, follow, job_lines, list_jobs, status_of, stop
from hpcray.jobs.packaging import stage_wheels, upload_local_packages
from hpcray.jobs.submission import (Submission, build_submission, check_env_names, check_names, entrypoint_of,
                                    is_secret_name, itwinai_entrypoint, job_spec, redact, scrub, with_overrides)
from hpcray.waiting import Deadline

__all__ = [
    "API_WAIT_S", "TERMINAL", "JobsApi", "Submission", "build_submission", "check_env_names", "check_names",
    "check_versions", "client_ray_version", "entrypoint_of", "exit_code", "failure_summary", "follow",
    "is_secret_name", "itwinai_entrypoint", "job_lines", "job_spec", "list_jobs", "ray_token", "redact",
    "stage_wheels", "status_of", "stop", "submit", "wait_for_api", "with_overrides",
]

API_WAIT_S = 60.0
"""How long `submit` waits for the Jobs API of a fresh or port-forwarded cluster to accept jobs."""


def submit(api: JobsApi, sub: Submission, *, image_ray_version: str | None, progress: Callable[[str], None],
           warn: Callable[[str], None], wait_s: float | None = None) -> str:
    """Wait (API_WAIT_S by default) until the cluster accepts jobs, check Ray versions, upload local dirs, submit;
    the submission id."""
    deadline = Deadline(API_WAIT_S if wait_s is None else wait_s)
    version = wait_for_api(api, deadline.left, progress)
    check_versions(str(version.get("ray_version", "")), client_ray_version() or "", image_ray_version, warn,
                   address=api.address)
    with tempfile.TemporaryDirectory(prefix="hpcray-job-") as tmp:
        runtime_env = dict(sub.runtime_env)
        stage_wheels(runtime_env, sub.wheels, Path(tmp))
        upload_local_packages(api, runtime_env, progress, cache=not sub.wheels)  # a staged dir is new every time
        payload = {**sub.payload(), "runtime_env": runtime_env}
    try:
        while True:
            try:
                return api.submit(payload)
            except AgentNotReady:
                if deadline.passed:
                    raise
            deadline.sleep(0.5)
    except HpcrayError as exc:
        raise type(exc)(scrub(str(exc), sub.secrets)) from None
