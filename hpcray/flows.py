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
import secrets
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator, TextIO

from hpcray import accounting, jobs, walltime
from hpcray.backends import backend_for
from hpcray.errors import ClusterError, CredentialsError, HpcrayError, Interrupted, TrackingError, WalltimeTooShort
from hpcray.profile import JobSpec, Profile, profile_ref
from hpcray.secrets import Secret
from hpcray.tracking import CredentialPlan, Credentials, credential_plan, log_usage, preflight
from hpcray.waiting import parse_duration, words

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
    return _with_usage(backend_for(p).status())


def _with_usage(st: ClusterStatus) -> ClusterStatus:
    """The cluster's queue wait, run time and GPU-hours so far (hpcray.accounting), from its nodes' times."""
    return dataclasses.replace(st, usage=accounting.cluster_usage(st.nodes, time.time()) if st.nodes else None)


def fleet(p: Profile) -> list[ClusterStatus]:
    """Every cluster hpcray made in the profile's kube context."""
    from hpcray import targets
    from hpcray.backends import fleet as kuberay_fleet

    return [_with_usage(c) for c in kuberay_fleet.clusters(targets.kube_target(p))]


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


def follow(api: jobs.JobsApi, job_id: str, *, out: TextIO, say: Say, on_interrupt: str | None = None,
           stop_at: float | None = None) -> str:
    """Follow the job's logs to its end and say how it ended; its status. On Ctrl-C the job is stopped
    (on_interrupt "stop") or left running, and Interrupted says which. At `stop_at` (epoch seconds: the walltime
    margin, see `walltime_stop`) the job is stopped gracefully."""
    try:
        with _stopped_at(api, job_id, stop_at, say):
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
    usage: accounting.Usage | None = None  # the job's, once it ended
    cluster_usage: accounting.Usage | None = None  # its cluster's, when the job ended
    attempts: int = 0  # submissions made; more than one when the job was resumed on a new allocation
    resume_name: str | None = None  # HPCRAY_RESUME_NAME, the same on every attempt of a `resume: true` job

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
        must_fit: bool = False, archive: bool = True) -> RunReport:
    """Run the named jobs of the profile on a fresh (or existing) cluster; what happened to each. A job that may not
    fit the allocation is warned about (refused with `must_fit`), stopped gracefully before the allocation ends,
    and, with `resume: true`, submitted again on a cluster brought up again (see `_ended_under`). Before the
    teardown the cluster's jobs are archived (see `down`)."""
    from hpcray.archive import RESULTS_VAR

    jobs.check_names(p, job_names)
    specs = {name: jobs.job_spec(p, name, []) for name in job_names}
    limit = allocation_limit(p)
    if limit is not None and _margin(p) >= limit:
        say(f"hpcray: warning: interlink.slurm.stop_margin {p.interlink.slurm.stop_margin} is not shorter than the "
            f"pods' --time ({words(limit)}): jobs are not stopped before SLURM's kill; lower it")
    for name in job_names:  # before any HPC hour is spent: against the allocation a fresh cluster gets
        check_fit(p, name, left_s=_left(p, limit), must_fit=must_fit, warn=say)
        if specs[name].resume and RESULTS_VAR not in specs[name].env:
            say(f"hpcray: warning: job {name} has resume: true but no {RESULTS_VAR} in its env: its results directory "
                "is then on the head and gone with the allocation, so a new attempt starts over; set "
                f"jobs.{name}.env.{RESULTS_VAR} to a directory on the shared filesystem (a profile volume)")
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
    def bring_up() -> ClusterStatus:
        return backend.up(timeout=_timeout(p, timeout_s), progress=say,
                          credentials=credentials if plan.in_cluster else None, ttl_s=_ttl(p, None),
                          preflight=not skip_preflight, access=_access(p, access))

    try:
        with _signals_raise():
            cluster = bring_up()
            tracked = _tracked(p, backend.tracking_uri())
            report.tracking_uri = tracked.mlflow.tracking_uri
            if not p.mlflow.tracking_uri:
                preflight(tracked, credentials)  # a server the backend started
            api = jobs.JobsApi(way.enter_context(backend.access(say, _access(p, access))))
            for result in results:
                spec = specs[result.name]
                current = result
                while True:
                    check_fit(p, result.name, left_s=_left(p, cluster.time_left_s()), must_fit=must_fit, warn=say)
                    sub = _submission(tracked, result.name, _attempt(spec, result), plan, credentials, None,
                                      say, backend.results_root()).submission
                    result.submission_id = jobs.submit(api, sub, image_ray_version=p.image.ray_version,
                                                       progress=say, warn=say)
                    result.attempts += 1
                    tries = f" (attempt {result.attempts} of {spec.max_attempts})" if spec.resume else ""
                    say(f"job {result.name}: submitted as {result.submission_id}{tries}")
                    result.status = "RUNNING"
                    output = JobOutput(out, result)
                    info: dict[str, Any] | None = None
                    try:
                        with _stopped_at(api, result.submission_id, walltime_stop(p, cluster), say) as stopped:
                            info = jobs.follow(api, result.submission_id, output)
                        ended = "the walltime stop" if stopped and info["status"] == "STOPPED" else None
                    except ClusterError as exc:
                        ended = _ended_under(backend, cluster) if _resumes(spec, result) else None
                        if ended is None:
                            raise _lost(p, backend, result, exc) from None
                    finally:
                        output.close()
                    if ended is not None and _resumes(spec, result):
                        say(f"job {result.name}: attempt {result.attempts} of {spec.max_attempts} ended by {ended}; "
                            "bringing the cluster up again to resume it")
                        current, api = None, None  # nothing of it is left to stop
                        way.close()
                        backend.down(progress=say)
                        cluster = bring_up()
                        api = jobs.JobsApi(way.enter_context(backend.access(say, _access(p, access))))
                        current = result
                        continue
                    break
                assert info is not None  # a lost cluster raised above unless the job was resumed
                result.status = str(info["status"])
                account(p, backend, result, info, tracked.mlflow.tracking_uri, credentials, say)
                if result.status == "FAILED" and info.get("message"):
                    say(str(info["message"]).rstrip())
                if ended is not None:
                    say(f"job {result.name}: stopped before the allocation's end" +
                        (f" after {result.attempts} attempt(s) (max_attempts)" if spec.resume else
                         "; `resume: true` in the job would continue it on a new allocation"))
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


# ---------------------------------------------------------------------------------------------------------------
# Walltime: max_runtime against the allocation left, the graceful stop before its end, resume on a new one
# ---------------------------------------------------------------------------------------------------------------


def _margin(p: Profile) -> float:
    return parse_duration(p.interlink.slurm.stop_margin)  # checked when the profile loaded


def allocation_limit(p: Profile) -> float | None:
    """The shortest SLURM `--time` among the profile's pods (interLink only); None where none applies."""
    if not p.interlink.enabled:
        return None
    from hpcray.render import slurm_flags

    limits = [walltime.time_limit(slurm_flags(p, g)) for g in (p.head, *p.workers.values())]
    return min((t for t in limits if t is not None), default=None)


def _left(p: Profile, allocation_left_s: float | None) -> float | None:
    """Seconds a job has before hpcray stops it: the allocation left less the stop margin."""
    return None if allocation_left_s is None else allocation_left_s - _margin(p)


def walltime_stop(p: Profile, cluster: ClusterStatus) -> float | None:
    """When a job on this cluster is stopped gracefully (epoch seconds); None where no walltime is known, or where
    the stop margin is as long as the pods' --time (a stop at once would be no use: SLURM's kill ends the job)."""
    limits = [n.time_limit_s for n in cluster.nodes if n.time_limit_s is not None]
    if not p.interlink.enabled or (limits and _margin(p) >= min(limits)):
        return None
    return walltime.stop_at(cluster.ends_at, _margin(p))


def check_fit(p: Profile, name: str | None, *, left_s: float | None, must_fit: bool, warn: Say) -> None:
    """Warn (refuse with `must_fit`: WalltimeTooShort) when the job's max_runtime exceeds `left_s`."""
    spec = p.jobs.get(name) if name else None
    if spec is None or spec.max_runtime is None:
        return
    problem = walltime.fit_problem(name or "", parse_duration(spec.max_runtime), left_s, max_runtime=spec.max_runtime)
    if problem is None:
        return
    if must_fit:
        raise WalltimeTooShort(f"{problem}; nothing submitted: raise interlink.slurm.time, lower max_runtime, or "
                               f"drop --must-fit to run it anyway")
    warn(f"hpcray: warning: {problem}; it will be stopped then (--must-fit refuses instead)")


def submit_walltime(p: Profile, name: str | None, *, must_fit: bool, warn: Say) -> float | None:
    """Before `submit` to the profile's cluster: the max_runtime check against the allocation left, and when to
    stop the job gracefully (epoch seconds), or None where no walltime applies."""
    if not p.interlink.enabled:
        return None
    cluster = backend_for(p).status()
    check_fit(p, name, left_s=_left(p, cluster.time_left_s()), must_fit=must_fit, warn=warn)
    return walltime_stop(p, cluster)


@contextlib.contextmanager
def _stopped_at(api: jobs.JobsApi, job_id: str, at: float | None, say: Say) -> Iterator[list[float]]:
    """Stop the job at `at` (epoch seconds) through the Jobs API, as `ray job stop` does: SIGTERM, then SIGKILL
    after Ray's grace period, so that it can checkpoint and flush MLflow. Yields a list that holds the time it
    was stopped, once it was."""
    stopped: list[float] = []

    def stop() -> None:
        stopped.append(time.time())
        say(f"hpcray: the cluster's SLURM allocation ends soon (interlink.slurm.stop_margin): stopping job {job_id} "
            "gracefully (SIGTERM through the Jobs API, as `ray job stop`) so it can checkpoint and flush MLflow")
        try:
            jobs.stop(api, job_id, wait=False)
        except HpcrayError as exc:
            say(f"hpcray: could not stop job {job_id}: {exc}")

    timer = threading.Timer(max(0.0, at - time.time()), stop) if at is not None else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        yield stopped
    finally:
        if timer is not None:
            timer.cancel()


def _resumes(spec: JobSpec, result: JobResult) -> bool:
    return spec.resume and result.attempts < spec.max_attempts


def _attempt(spec: JobSpec, result: JobResult) -> JobSpec:
    """A `resume: true` job as its next attempt gets it: HPCRAY_RESUME_NAME (the same every time: a Tune
    experiment's name), HPCRAY_ATTEMPT, and from the second on HPCRAY_MLFLOW_PARENT_RUN_ID, the first MLflow run the
    job announced (`MLFLOW_RUN_ID=`), to log to again."""
    if not spec.resume:
        return spec
    if result.resume_name is None:
        result.resume_name = f"{result.name}-{secrets.token_hex(4)}"
    env = {**spec.env, "HPCRAY_RESUME_NAME": result.resume_name, "HPCRAY_ATTEMPT": str(result.attempts + 1)}
    if result.mlflow_run_ids:
        env["HPCRAY_MLFLOW_PARENT_RUN_ID"] = result.mlflow_run_ids[0]
    return dataclasses.replace(spec, env=env)


def _ended_under(backend: Backend, cluster: ClusterStatus) -> str | None:
    """Why the cluster a job ran on is gone, when it is: SLURM's walltime (the head's allocation has ended), or the
    head pod gone (not Ready, or replaced: KubeRay deletes a head whose pod failed and makes a new one); None when
    the head it had is still Ready (the Jobs API did not answer for some other reason)."""
    head = next((n for n in cluster.nodes if n.role == "head"), None)
    try:
        now = backend.status()
    except HpcrayError:
        return None
    if head is None:
        return None
    same = next((n for n in now.nodes if n.name == head.name), None)
    if same is not None and same.phase == "Ready":
        return None
    end = walltime.allocation_end(head.started_at, head.time_limit_s)
    if end is not None and time.time() >= end:
        return f"SLURM's walltime ({walltime.TIMEOUT_REASON}: --time {words(head.time_limit_s or 0)})"
    gone = next((n for n in now.replaced if n.name == head.name), None)
    return f"the head pod {head.name} going away ({gone.reason if gone else same.phase if same else 'deleted'})"


def _lost(p: Profile, backend: Backend, result: JobResult, exc: ClusterError) -> ClusterError:
    """The cluster stopped answering while a job ran: which cluster, which job, and why when the backend can say
    (the teardown that follows would erase the evidence)."""
    try:
        now = backend.status()
        why = "; ".join(f"{n.name} {n.phase}: {n.reason}" for n in now.replaced + now.nodes if n.reason)
    except HpcrayError:
        why = ""
    return ClusterError(f"cluster '{p.name}' went away while job {result.name} ({result.submission_id}) was running: "
                        f"{why or exc}; its outcome is unknown: look there, then run the job again")


def account(p: Profile, backend: Backend, result: JobResult, info: dict[str, Any], tracking_uri: str | None,
            credentials: Credentials | None, say: Say) -> None:
    """A job that ended: its usage and its cluster's (hpcray.accounting) on the result, and as metrics and tags of
    the MLflow runs it named (JobOutput). Failing that, a warning: the job's outcome stands."""
    now = time.time()
    try:
        nodes = backend.status().nodes
    except HpcrayError as exc:
        say(f"hpcray: warning: no usage for job {result.name}: the cluster's status is unknown ({exc})")
        return
    start, end = (info.get(k) for k in ("start_time", "end_time"))  # Ray's, in ms
    result.usage = accounting.job_usage(nodes, start / 1000 if start else None, end / 1000 if end else None, now)
    result.cluster_usage = accounting.cluster_usage(nodes, now)
    if not result.mlflow_run_ids or not tracking_uri:
        return
    metrics = {**result.usage.metrics(accounting.PREFIX), **result.cluster_usage.metrics(accounting.CLUSTER_PREFIX)}
    tags = {"hpcray.cluster": p.name, "hpcray.backend": p.backend, "hpcray.submission_id": result.submission_id or ""}
    try:
        log_usage(tracking_uri, credentials, result.mlflow_run_ids, metrics, tags, timestamp=now)
    except TrackingError as exc:
        say(f"hpcray: warning: the usage of job {result.name} is not in MLflow: {exc}")


def follow_submitted(s: Submit, api: jobs.JobsApi, job_id: str, *, out: TextIO, say: Say, on_interrupt: str,
                     usage: bool, stop_at: float | None = None) -> JobResult:
    """`submit`'s following: the job's output (read for its MLflow runs, as `run` reads it) to its end, then, with
    `usage`, its usage on the profile's cluster (not for a cluster given by --address: hpcray cannot see its pods)."""
    result = JobResult(s.name or "entrypoint", submission_id=job_id, status="RUNNING")
    output = JobOutput(out, result)
    try:
        result.status = follow(api, job_id, out=output, say=say, on_interrupt=on_interrupt,  # type: ignore[arg-type]
                               stop_at=stop_at)
    finally:
        output.close()
    if usage:
        account(s.profile, backend_for(s.profile), result, jobs.status_of(api, job_id),
                s.profile.mlflow.tracking_uri, s.credentials, say)
    return result


def summary(report: RunReport) -> list[str]:
    """What a user wants at the end: each job, its MLflow runs, the best trial, its usage, and where to look."""
    lines = []
    for j in report.jobs:
        runs = f"; MLflow run {', '.join(j.mlflow_run_ids)}" if j.mlflow_run_ids else ""
        lines.append(f"{j.name}: {j.status} ({j.submission_id or 'not submitted'}){runs}")
        lines.extend(f"  {h}" for h in j.highlights)
        if j.usage is not None and j.cluster_usage is not None:
            lines.append(f"  usage: {j.usage.words()} (cluster so far: {j.cluster_usage.words()})")
    uri = report.tracking_uri
    if uri and uri.startswith("sqlite:"):
        lines.append(f"look at the runs: mlflow ui --backend-store-uri {uri} --port 5000  (then open "
                     "http://127.0.0.1:5000)")
    elif uri:
        lines.append(f"look at the runs: {uri}")
    lines.append("cluster torn down; nothing left running" if report.torn_down else "cluster kept up (--keep)")
    return lines
