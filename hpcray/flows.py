"""The flows: what each command does from start to end, on any backend. cli.py parses, calls one of these and
prints what it returns; a dry run gets a plan (hpcray.backends.base.Plan, Submit) and changes nothing.

- up: credentials (as hpcray.tracking.credential_plan says) → the backend's plan → up; `plan_up` for --dry-run.
- submit: spec → submission → MLflow preflight → access to the Jobs API → submit → follow.
- run: preflight → up → each job in turn → down, with the teardown guaranteed: on success, on a failed job, on an
  error of hpcray, and on SIGINT, SIGTERM and SIGHUP (a CI runner cancelling, a closed terminal); a job still
  running is stopped first. Signals that arrive during teardown are reported and deferred, so a second Ctrl-C
  cannot leave half a cluster behind. `keep=True` leaves it up.
- down, status, the fleet (`status --all`, `gc`), the dashboard.

The run summary learns about a job's MLflow runs from the job's output, read once, line by line (JobOutput).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import signal
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator, TextIO

from hpcray import jobs
from hpcray.backends import backend_for
from hpcray.errors import ClusterError, CredentialsError, HpcrayError, Interrupted
from hpcray.profile import JobSpec, Profile, profile_ref
from hpcray.secrets import Secret
from hpcray.tracking import CredentialPlan, Credentials, credential_plan, preflight
from hpcray.waiting import parse_duration

if TYPE_CHECKING:
    from hpcray.archive import Tracking
    from hpcray.backends.base import Backend, ClusterStatus, Plan
    from hpcray.backends.fleet import Expired

Say = Callable[[str], None]
HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _timeout(p: Profile, timeout_s: float | None) -> float:
    return timeout_s if timeout_s is not None else parse_duration(p.timeout)  # checked when the profile loaded


def _ttl(p: Profile, ttl_s: float | None) -> float | None:
    return ttl_s if ttl_s is not None else parse_duration(p.ttl) if p.ttl else None


def _credentials(plan: CredentialPlan, *, dry_run: bool, warn: Say) -> Credentials | None:
    """The credentials the plan needs. A dry run reads no terminal and does without missing ones, saying so:
    placeholders show where they would go."""
    placeholder = Credentials("<unset>", Secret("<unset>"))
    if plan.where is None:
        return None
    if dry_run and plan.source == "stdin":
        return placeholder
    try:
        return plan.load()
    except CredentialsError as exc:
        if not dry_run:
            raise
        warn(f"hpcray: warning: {exc} (the real command needs them)")
        return placeholder


def _access(p: Profile, access: str | None) -> str:
    """The way to the Jobs API: --access, else the profile's `access`."""
    return access or p.access


def _tracked(p: Profile, tracking_uri: str | None) -> Profile:
    """The profile with the tracking URI its cluster's jobs log to (a local MLflow server is known once it runs)."""
    if tracking_uri == p.mlflow.tracking_uri:
        return p
    return dataclasses.replace(p, mlflow=dataclasses.replace(p.mlflow, tracking_uri=tracking_uri))


# ---------------------------------------------------------------------------------------------------------------
# The cluster: up, down, status, the fleet, the dashboard
# ---------------------------------------------------------------------------------------------------------------


def plan_up(p: Profile, *, ttl_s: float | None = None, skip_preflight: bool = False, access: str | None = None,
            warn: Say) -> Plan:
    plan = credential_plan(p)
    credentials = _credentials(plan, dry_run=True, warn=warn) if plan.in_cluster else None
    return backend_for(p).plan(credentials=credentials, ttl_s=_ttl(p, ttl_s), warn=warn, preflight=not skip_preflight,
                               access=_access(p, access))


def up(p: Profile, *, timeout_s: float | None = None, ttl_s: float | None = None, down_on_failure: bool = False,
       skip_preflight: bool = False, access: str | None = None, progress: Say) -> ClusterStatus:
    """Bring the cluster up (timeout and ttl default to the profile's) with the credentials it gives its jobs;
    the virtual node's preflight first, unless skipped; done once the Jobs API answers through the access asked for."""
    plan = credential_plan(p)
    return backend_for(p).up(timeout=_timeout(p, timeout_s), progress=progress,
                             credentials=plan.load() if plan.in_cluster else None, ttl_s=_ttl(p, ttl_s),
                             down_on_failure=down_on_failure, preflight=not skip_preflight, access=_access(p, access))


def plan_down(p: Profile, *, archive: bool = True) -> Plan:
    backend = backend_for(p)
    plan = backend.plan_down()
    if archive:
        from hpcray.archive import describe
        from hpcray.backends.base import Step

        where = _archive_tracking(backend.tracking_uri(), None)
        plan.steps.insert(0, Step(describe(p.name, where, parse_duration(p.archive_timeout))))
    return plan


def down(p: Profile, *, timeout_s: float, progress: Say, archive: bool = True) -> bool:
    """Archive the cluster's jobs (unless told not to; bounded by archive_timeout, never in the way), then remove
    the cluster."""
    backend = backend_for(p)
    if archive and backend.status().exists:
        try:
            tracking = _archive_tracking(backend.tracking_uri(), credential_plan(p).load())
        except CredentialsError as exc:
            progress(f"hpcray: warning: {exc}; archiving to this machine instead of MLflow")
            tracking = None
        _archive(p, lambda: jobs_api(p, None, progress), tracking, progress)
    return backend.down(progress=progress, timeout=timeout_s)


def _archive_tracking(uri: str | None, credentials: Credentials | None) -> Tracking | None:
    from hpcray.archive import Tracking

    return Tracking(uri, credentials) if uri else None


def _archive(p: Profile, open_api: Callable[[], ContextManager[jobs.JobsApi]], tracking: Tracking | None,
             say: Say) -> None:
    from hpcray.archive import archive

    archive(open_api, cluster=p.name, tracking=tracking, run_id_of=_run_id_of,
            timeout_s=parse_duration(p.archive_timeout), say=say)


def status(p: Profile) -> ClusterStatus:
    return backend_for(p).status()


def fleet(p: Profile) -> list[ClusterStatus]:
    """Every cluster hpcray made in the profile's kube context."""
    from hpcray import targets
    from hpcray.backends import fleet as kuberay_fleet

    return kuberay_fleet.clusters(targets.kube_target(p))


def gc(p: Profile, *, dry_run: bool, progress: Say) -> list[Expired]:
    from hpcray import targets
    from hpcray.backends import fleet as kuberay_fleet

    return kuberay_fleet.gc(targets.kube_target(p), dry_run=dry_run, progress=progress)


def dashboard(p: Profile, *, port: int, progress: Say, on_ready: Callable[[str], None],
              access: str | None = None) -> None:
    backend_for(p).dashboard(port=port, progress=progress, on_ready=on_ready, access=_access(p, access))


# ---------------------------------------------------------------------------------------------------------------
# Jobs: submit (spec → submission → preflight → access → submit → follow); the Jobs API for logs, stop, list
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def jobs_api(p: Profile | None, address: str | None, progress: Say,
             access: str | None = None) -> Iterator[jobs.JobsApi]:
    """The Jobs API at `address`, else of the profile's cluster through its backend's access (`access`, else the
    profile's: a port-forward of this command's own, the API server's service proxy, a URL), valid while the block
    runs."""
    if address:
        yield jobs.JobsApi(address)
        return
    assert p is not None, "a profile or an address"
    with backend_for(p).access(progress, _access(p, access)) as endpoint:
        yield jobs.JobsApi(endpoint)


@dataclass
class Overrides:
    """Command-line changes to a job (`submit`'s flags); paths relative to the current directory."""

    working_dir: str | None = None
    requirements: str | None = None
    pip: tuple[str, ...] = ()
    wheels: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    runtime_env: dict[str, Any] = field(default_factory=dict)  # merged over the job's runtime_env
    num_cpus: float | None = None
    num_gpus: float | None = None


@dataclass
class Submit:
    """A job ready to go: what `submit --dry-run` prints, and what `submitted` sends."""

    profile: Profile  # with the tracking URI its cluster's jobs log to
    name: str | None  # the profile's job, or None for an entrypoint
    submission: jobs.Submission
    credentials: Credentials | None  # for the preflight


def plan_submit(p: Profile, name: str | None, argv: list[str], *, overrides: Overrides | None = None,
                submission_id: str | None = None, dry_run: bool = False, warn: Say) -> Submit:
    """The profile's job `name` (or an entrypoint `argv`) with the overrides, as Ray would receive it."""
    o = overrides or Overrides()
    spec = jobs.with_overrides(jobs.job_spec(p, name, argv), working_dir=o.working_dir, requirements=o.requirements,
                               pip=o.pip, wheels=o.wheels, env=o.env, num_cpus=o.num_cpus, num_gpus=o.num_gpus)
    if o.runtime_env:
        spec = dataclasses.replace(spec, runtime_env={**spec.runtime_env, **o.runtime_env})
    plan = credential_plan(p)
    credentials = _credentials(plan, dry_run=dry_run, warn=warn)
    backend = backend_for(p)
    return _submission(_tracked(p, backend.tracking_uri()), name, spec, plan, credentials, submission_id, warn,
                       backend.results_root())


def _submission(p: Profile, name: str | None, spec: JobSpec, plan: CredentialPlan, credentials: Credentials | None,
                submission_id: str | None, warn: Say, results_root: str) -> Submit:
    """The submission, with a results directory of its own on the head (HPCRAY_RESULTS_DIR, which `down` archives)
    unless the job names one."""
    from hpcray.archive import RESULTS_VAR, results_dir

    sub = jobs.build_submission(p, spec, name=name, credentials=credentials if plan.in_job else None,
                                submission_id=submission_id, warn=warn)
    sub.runtime_env["env_vars"].setdefault(RESULTS_VAR, results_dir(results_root, name))
    return Submit(p, name, sub, credentials)


@contextlib.contextmanager
def submitted(s: Submit, *, address: str | None = None, access: str | None = None, progress: Say,
              warn: Say) -> Iterator[tuple[jobs.JobsApi, str]]:
    """Check MLflow (before anything is queued), open the way to the cluster, submit: the Jobs API (valid while the
    block runs) and the submission id."""
    preflight(s.profile, s.credentials)
    with jobs_api(s.profile, address, progress, access) as api:
        yield api, jobs.submit(api, s.submission, image_ray_version=s.profile.image.ray_version, progress=progress,
                               warn=warn)


def follow(api: jobs.JobsApi, job_id: str, *, out: TextIO, say: Say, on_interrupt: str | None = None) -> str:
    """Follow the job's logs to its end and say how it ended; its status. On Ctrl-C the job is stopped
    (on_interrupt "stop") or left running, and Interrupted says which."""
    try:
        info = jobs.follow(api, job_id, out)
    except KeyboardInterrupt:
        if on_interrupt == "stop":
            say(f"hpcray: interrupted; stopping job {job_id} …")
            raise Interrupted(signal.SIGINT, f"interrupted; job {job_id} {jobs.stop(api, job_id)}") from None
        raise Interrupted(signal.SIGINT, f"interrupted; job {job_id} keeps running: hpcray logs -f {job_id}") \
            from None
    status = str(info["status"])
    if status == "FAILED" and info.get("message"):
        say(jobs.failure_summary(str(info["message"])))
    say(f"job {job_id} {status}")
    return status


# ---------------------------------------------------------------------------------------------------------------
# run: up → jobs → down, teardown guaranteed
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class JobResult:
    name: str
    submission_id: str | None = None
    status: str = "NOT_SUBMITTED"
    mlflow_run_ids: list[str] = field(default_factory=list)
    highlights: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return jobs.exit_code(self.status) if self.status != "NOT_SUBMITTED" else 2


@dataclass
class RunReport:
    profile: str
    jobs: list[JobResult]
    tracking_uri: str | None
    torn_down: bool

    @property
    def exit_code(self) -> int:
        return max((j.exit_code for j in self.jobs), default=0)

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "exit_code": self.exit_code}


RUN_ID_LINE = re.compile(r"MLFLOW_RUN_ID=([0-9a-f]{32})\s*")
HIGHLIGHT = "best trial: "
LONGEST_READ = 4096


def _run_id_of(log: str) -> str | None:
    """The first MLflow run a job's log names (the job-output contract below)."""
    result = JobResult("")
    output = JobOutput(io.StringIO(), result)
    output.write(log)
    output.close()
    return result.mlflow_run_ids[0] if result.mlflow_run_ids else None


class JobOutput:
    """A job's output, passed through as it arrives, each line read once for the run summary.

    The contract a job can follow (the examples do): a line `MLFLOW_RUN_ID=<32 hex digits>` names an MLflow run
    the job logged; a line starting with `best trial: ` is shown under the job in the summary. Only the first
    LONGEST_READ characters of a line are read.
    """

    def __init__(self, out: TextIO, result: JobResult) -> None:
        self.out, self.result, self._line = out, result, ""

    def write(self, text: str) -> int:
        *complete, rest = (self._line + text).split("\n")
        for line in complete:
            self._read(line)
        self._line = rest[:LONGEST_READ]
        return self.out.write(text)

    def flush(self) -> None:
        self.out.flush()

    def close(self) -> None:
        """The last line, when the output does not end with a newline."""
        if self._line:
            self._read(self._line)
            self._line = ""

    def _read(self, line: str) -> None:
        line = line[:LONGEST_READ].rstrip("\r")
        found = RUN_ID_LINE.fullmatch(line)
        if found and found[1] not in self.result.mlflow_run_ids:
            self.result.mlflow_run_ids.append(found[1])
        elif line.startswith(HIGHLIGHT):
            self.result.highlights.append(line)


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGINT/SIGTERM/SIGHUP raise Interrupted in the main thread, so `finally` blocks run."""

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in HANDLED}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _signals_deferred(say: Say) -> Iterator[list[int]]:
    """While tearing down, a signal is noted (and re-raised afterwards by the caller), never acted on mid-way."""
    received: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        received.append(signum)
        say(f"hpcray: {signal.Signals(signum).name} received; finishing the teardown first so nothing is left "
            "running")

    previous = {s: signal.signal(s, handler) for s in HANDLED}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@dataclass
class RunPlan:
    """What `run` would do: bring the cluster up, submit each job, and tear the cluster down (or keep it)."""

    up: Plan
    jobs: list[Submit]
    then: str


def plan_run(p: Profile, job_names: list[str], *, keep: bool = False, skip_preflight: bool = False,
             access: str | None = None, warn: Say) -> RunPlan:
    jobs.check_names(p, job_names)
    plan = credential_plan(p)
    credentials = _credentials(plan, dry_run=True, warn=warn)
    backend = backend_for(p)
    up_plan = backend.plan(credentials=credentials if plan.in_cluster else None, ttl_s=_ttl(p, None), warn=warn,
                           preflight=not skip_preflight, access=_access(p, access))
    tracked = _tracked(p, backend.tracking_uri())
    submissions = [_submission(tracked, name, jobs.job_spec(p, name, []), plan, credentials, None, warn,
                               backend.results_root()) for name in job_names]
    then = "keep the cluster up (--keep)" if keep else \
        f"tear the cluster down, whatever happens to the jobs (`hpcray down --profile {profile_ref(p.source)}`)"
    return RunPlan(up_plan, submissions, then)


def run(p: Profile, job_names: list[str], *, out: TextIO, say: Say, keep: bool = False,
        timeout_s: float | None = None, skip_preflight: bool = False, access: str | None = None,
        archive: bool = True) -> RunReport:
    """Run the named jobs of the profile on a fresh (or existing) cluster; what happened to each. Before the
    teardown the cluster's jobs are archived (see `down`)."""
    jobs.check_names(p, job_names)
    specs = {name: jobs.job_spec(p, name, []) for name in job_names}
    plan = credential_plan(p)
    credentials = plan.load()
    if p.mlflow.tracking_uri:
        preflight(p, credentials)  # before any HPC hour is spent
    backend = backend_for(p)
    results = [JobResult(name) for name in job_names]
    api: jobs.JobsApi | None = None
    current: JobResult | None = None
    report = RunReport(p.name, results, p.mlflow.tracking_uri, torn_down=False)
    way = contextlib.ExitStack()  # a port-forward to the head, where the backend needs one
    try:
        with _signals_raise():
            backend.up(timeout=_timeout(p, timeout_s), progress=say,
                       credentials=credentials if plan.in_cluster else None, ttl_s=_ttl(p, None),
                       preflight=not skip_preflight, access=_access(p, access))
            tracked = _tracked(p, backend.tracking_uri())
            report.tracking_uri = tracked.mlflow.tracking_uri
            if not p.mlflow.tracking_uri:
                preflight(tracked, credentials)  # a server the backend started
            api = jobs.JobsApi(way.enter_context(backend.access(say, _access(p, access))))
            for result in results:
                sub = _submission(tracked, result.name, specs[result.name], plan, credentials, None, say,
                                  backend.results_root()).submission
                current = result
                result.submission_id = jobs.submit(api, sub, image_ray_version=p.image.ray_version, progress=say,
                                                   warn=say)
                say(f"job {result.name}: submitted as {result.submission_id}")
                result.status = "RUNNING"
                output = JobOutput(out, result)
                try:
                    info = jobs.follow(api, result.submission_id, output)
                except ClusterError as exc:
                    raise _lost(p, backend, result, exc) from None
                finally:
                    output.close()
                result.status = str(info["status"])
                if result.status == "FAILED" and info.get("message"):
                    say(str(info["message"]).rstrip())
                say(f"job {result.name}: {result.status}")
                current = None
    finally:
        with _signals_deferred(say) as received:
            if current is not None and current.submission_id and api is not None:
                say(f"stopping job {current.name} ({current.submission_id}) …")
                try:
                    current.status = jobs.stop(api, current.submission_id, wait=True, timeout=15)
                except HpcrayError as exc:
                    say(f"hpcray: could not stop job {current.submission_id}: {exc}")
            if api is not None and not keep and archive:
                _archive(p, lambda: contextlib.nullcontext(api), _archive_tracking(backend.tracking_uri(), credentials),
                         say)
            way.close()
            if keep:
                say(f"--keep: cluster {p.name} stays up; remove it with "
                    f"`hpcray down --profile {profile_ref(p.source)}`")
            else:
                backend.down(progress=say)
                report.torn_down = True
        if received:
            raise Interrupted(received[0])
    return report


def _lost(p: Profile, backend: Backend, result: JobResult, exc: ClusterError) -> ClusterError:
    """The cluster stopped answering while a job ran: which cluster, which job, and why when the backend can say
    (the teardown that follows would erase the evidence)."""
    try:
        why = "; ".join(f"{n.name} {n.phase}: {n.reason}" for n in backend.status().nodes if n.reason)
    except HpcrayError:
        why = ""
    return ClusterError(f"cluster '{p.name}' went away while job {result.name} ({result.submission_id}) was running: "
                        f"{why or exc}; its outcome is unknown: look there, then run the job again")


def summary(report: RunReport) -> list[str]:
    """What a user wants at the end: each job, its MLflow runs, the best trial, and where to look."""
    lines = []
    for j in report.jobs:
        runs = f"; MLflow run {', '.join(j.mlflow_run_ids)}" if j.mlflow_run_ids else ""
        lines.append(f"{j.name}: {j.status} ({j.submission_id or 'not submitted'}){runs}")
        lines.extend(f"  {h}" for h in j.highlights)
    uri = report.tracking_uri
    if uri and uri.startswith("sqlite:"):
        lines.append(f"look at the runs: mlflow ui --backend-store-uri {uri} --port 5000  (then open "
                     "http://127.0.0.1:5000)")
    elif uri:
        lines.append(f"look at the runs: {uri}")
    lines.append("cluster torn down; nothing left running" if report.torn_down else "cluster kept up (--keep)")
    return lines
