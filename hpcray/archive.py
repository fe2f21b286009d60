"""Archive before teardown: each job's log, redacted details and results, saved before the cluster (and its head's
filesystem) goes.

Where a job's results are: hpcray gives every job a directory of its own on the head, in HPCRAY_RESULTS_DIR (the
HPO example's Tune `storage_path`); a job that sets the variable itself keeps its own. At archive time one small job
(metadata hpcray=archive) is submitted through the Jobs API: on the head it packs each job's directory (smallest
files first, up to RESULTS_CAP) and prints it, base64, between marker lines; hpcray reads it back with the job's
log. The Jobs API is the one way to the head that every backend has (a local head, a KubeRay head behind a
port-forward, the API server's service proxy or an Ingress, a head on an interLink virtual node with no exec), and
the bytes come back to where MLflow's credentials already are: the head needs neither credentials nor access to
MLflow, and MLflow being off changes only where they are written.

Where they go: with MLflow on and a run named by the job's `MLFLOW_RUN_ID=` line, artifacts of that run under
`hpcray-archive/`; otherwise the local archive (ARCHIVE_DIR below). The log and the details are always also kept in
the local archive, which is what `hpcray logs` reads once the cluster is gone. Files there are 0600, dirs 0700.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shlex
import shutil
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator

from hpcray.errors import HpcrayError
from hpcray.jobs import JobsApi, redact
from hpcray.state import make_private, write_atomic
from hpcray.waiting import Deadline

if TYPE_CHECKING:
    from hpcray.tracking import Credentials

Say = Callable[[str], None]

RESULTS_VAR = "HPCRAY_RESULTS_DIR"
ARTIFACT_PATH = "hpcray-archive"
RESULTS_CAP = 32 * 2**20
"""Bytes of one job's results that come back (smallest files first: Tune's experiment state, params and results
before checkpoints); the rest is named in results-skipped.txt."""
METADATA = {"hpcray": "archive"}
_BEGIN, _END = "HPCRAY-ARCHIVE-BEGIN ", "HPCRAY-ARCHIVE-END"

# Runs on the head with the image's python (stdlib only): each job's directory as a .tar.gz, base64, between markers.
_PACK = f"""
import base64, io, json, os, tarfile
cap = {RESULTS_CAP}
for job, root in json.loads(os.environ["HPCRAY_ARCHIVE_DIRS"]).items():
    files = []
    for d, _, names in os.walk(root):
        files += [(os.path.getsize(os.path.join(d, n)), os.path.join(d, n)) for n in names
                  if os.path.isfile(os.path.join(d, n))]
    buf, kept, skipped = io.BytesIO(), 0, []
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for size, path in sorted(files):
            if kept + size > cap:
                skipped.append(os.path.relpath(path, root))
                continue
            tar.add(path, arcname=os.path.relpath(path, root))
            kept += size
    head = dict(job=job, found=os.path.isdir(root), files=len(files) - len(skipped), skipped=skipped)
    print("{_BEGIN}" + json.dumps(head))
    print(base64.encodebytes(buf.getvalue()).decode(), end="")
    print("{_END}", flush=True)
"""


def archive_dir() -> Path:
    """$XDG_DATA_HOME/hpcray/archive (~/.local/share/hpcray/archive)."""
    data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(data) / "hpcray" / "archive"


def job_dir(cluster: str, submission_id: str) -> Path:
    return archive_dir() / cluster / submission_id


def _made_job_dir(cluster: str, submission_id: str) -> Path:
    """The job's archive directory, it and the directories above it up to the archive's private (0700)."""
    for d in (archive_dir(), archive_dir() / cluster):
        make_private(d).chmod(0o700)
    return make_private(job_dir(cluster, submission_id))


def find_log(submission_id: str) -> Path | None:
    """The archived log of a job, whichever cluster it ran on (submission ids are unique), the newest."""
    if not re.fullmatch(r"[\w.-]+", submission_id):
        return None
    candidates = sorted(archive_dir().glob(f"*/{submission_id}/logs.txt"), key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None


def results_dir(root: str, job: str | None) -> str:
    """A fresh directory for one job under the backend's results root: its name, the time, and 4 random hex."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{root}/{job or 'job'}-{stamp}-{os.urandom(2).hex()}"


@dataclass(frozen=True)
class Tracking:
    """Where archives of jobs with an MLflow run go; None credentials where the server takes no login."""

    uri: str
    credentials: Credentials | None = None


def describe(cluster: str, tracking: Tracking | None, timeout_s: float) -> str:
    """What the archive does, in words (`down --dry-run`)."""
    where = (f"as artifacts ({ARTIFACT_PATH}/) of the MLflow run its log names (`MLFLOW_RUN_ID=` at {tracking.uri}), "
             f"else in {archive_dir() / cluster}/<submission id>/" if tracking else
             f"in {archive_dir() / cluster}/<submission id>/ (MLflow is off)")
    return (f"archive every job on the cluster first: its log, its details (secret-looking env vars redacted) and "
            f"its results directory ({RESULTS_VAR}, up to {RESULTS_CAP // 2**20} MiB, packed on the head by a small "
            f"archive job), {where}; logs are kept in {archive_dir() / cluster} for `hpcray logs`; at most "
            f"{timeout_s:g} s (archive_timeout), then a warning and the teardown goes on")


def archive(open_api: Callable[[], ContextManager[JobsApi]], *, cluster: str, tracking: Tracking | None,
            run_id_of: Callable[[str], str | None], timeout_s: float, say: Say) -> None:
    """Archive every job on the cluster within `timeout_s`; never raises: a failure, or running out of time, is one
    warning line, and the caller tears down either way."""
    outcome: list[BaseException | None] = []

    def work() -> None:
        try:
            with open_api() as api:
                _archive(api, cluster, tracking, run_id_of, Deadline(timeout_s), say)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - reported by the waiting thread, in one line
            outcome.append(exc)

    # A daemon thread: one that is still waiting on a cluster past the limit is left behind, never waited for.
    worker = threading.Thread(target=work, daemon=True, name="hpcray-archive")
    worker.start()
    worker.join(timeout_s)
    if not outcome:
        say(f"hpcray: warning: archiving the jobs of '{cluster}' did not finish within {timeout_s:g} s "
            f"(archive_timeout); tearing down anyway: what was not saved is lost")
    elif (exc := outcome[0]) is not None:
        why = str(exc) if isinstance(exc, HpcrayError) else f"{type(exc).__name__}: {exc}"
        say(f"hpcray: warning: archiving the jobs of '{cluster}' failed ({' '.join(why.split())}); tearing down "
            f"anyway")


def _archive(api: JobsApi, cluster: str, tracking: Tracking | None, run_id_of: Callable[[str], str | None],
             deadline: Deadline, say: Say) -> None:
    found = [j for j in api.list() if j.get("submission_id") and (j.get("metadata") or {}).get("hpcray") !=
             METADATA["hpcray"]]
    if not found:
        say(f"no jobs on '{cluster}' to archive")
        return
    dirs = {j["submission_id"]: env[RESULTS_VAR] for j in found
            if RESULTS_VAR in (env := (j.get("runtime_env") or {}).get("env_vars") or {})}
    packed: dict[str, tuple[dict[str, Any], bytes]] = {}
    if dirs:
        try:
            packed = _pack_on_head(api, dirs, deadline)
        except HpcrayError as exc:
            say(f"hpcray: warning: the results directories of {len(dirs)} job(s) could not be fetched from the head "
                f"({' '.join(str(exc).split())}); archiving their logs and details only")
    for job in found:
        sid = job["submission_id"]
        log = api.logs(sid)
        where = _save(cluster, sid, log, redact(job), packed.get(sid), tracking, run_id_of(log))
        say(f"archived job {sid} ({job.get('status', '?')}): {where}")


def _pack_on_head(api: JobsApi, dirs: dict[str, str], deadline: Deadline) -> dict[str, tuple[dict[str, Any], bytes]]:
    from hpcray.jobs.follow import wait_until_done

    payload = {"entrypoint": f"python -c {shlex.quote(_PACK)}", "metadata": dict(METADATA),
               "runtime_env": {"env_vars": {"HPCRAY_ARCHIVE_DIRS": json.dumps(dirs)}}}
    job = api.submit(payload)
    status = wait_until_done(api, job, max(deadline.left, 1.0))
    if status != "SUCCEEDED":
        message = str(api.info(job).get("message") or "").strip().splitlines()
        raise HpcrayError(f"the archive job {job} ended {status or 'unfinished'}"
                          + (f": {message[-1]}" if message else ""))
    return dict(_unpack_output(api.logs(job)))


def _unpack_output(text: str) -> Iterator[tuple[str, tuple[dict[str, Any], bytes]]]:
    head: dict[str, Any] | None = None
    chunks: list[str] = []
    for line in text.splitlines():
        if line.startswith(_BEGIN):
            head, chunks = json.loads(line[len(_BEGIN):]), []
        elif line == _END and head is not None:
            yield str(head["job"]), (head, base64.b64decode("".join(chunks)))
            head = None
        elif head is not None:
            chunks.append(line)


def _save(cluster: str, sid: str, log: str, details: dict[str, Any], results: tuple[dict[str, Any], bytes] | None,
          tracking: Tracking | None, run_id: str | None) -> str:
    """Write one job's archive; where it went, in words."""
    local = _made_job_dir(cluster, sid)
    write_atomic(local / "logs.txt", log)
    write_atomic(local / "job.json", json.dumps(details, indent=2, default=str) + "\n")
    if not (tracking and run_id):
        shutil.rmtree(local / "results", ignore_errors=True)
        files = _extract(results, local / "results") if results else "no results directory"
        return f"log, details, {files} → {local}"
    from hpcray.tracking import log_artifacts

    with tempfile.TemporaryDirectory(prefix="hpcray-archive-") as tmp:
        staged = Path(tmp)
        shutil.copy(local / "logs.txt", staged)
        shutil.copy(local / "job.json", staged)
        files = _extract(results, staged / "results") if results else "no results directory"
        log_artifacts(tracking.uri, tracking.credentials, run_id, staged, ARTIFACT_PATH)
    write_atomic(local / "archive.json", json.dumps({"mlflow_run_id": run_id, "tracking_uri": tracking.uri,
                                                     "artifact_path": ARTIFACT_PATH}, indent=2))
    return f"log, details, {files} → MLflow run {run_id} ({ARTIFACT_PATH}/ at {tracking.uri})"


def _extract(results: tuple[dict[str, Any], bytes], dest: Path) -> str:
    head, blob = results
    if not head.get("found"):
        return "no results directory (the job made none)"
    make_private(dest)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        tar.extractall(dest, filter="data")  # a head's paths never leave dest
    _private_tree(dest)
    if head.get("skipped"):
        write_atomic(dest / "results-skipped.txt", "".join(f"{name}\n" for name in head["skipped"]))
        return f"{head['files']} result file(s) ({len(head['skipped'])} left out over {RESULTS_CAP // 2**20} MiB)"
    return f"{head['files']} result file(s)"


def _private_tree(root: Path) -> None:
    for d, _, names in os.walk(root):
        os.chmod(d, 0o700)
        for n in names:
            os.chmod(os.path.join(d, n), 0o600)
