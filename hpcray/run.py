"""`hpcray run`: up → preflight → submit each job → follow → down, with the teardown guaranteed.

Teardown happens on success, on a failed job, on an error of hpcray, and on SIGINT, SIGTERM and SIGHUP (a CI
runner cancelling, a closed terminal); a job still running is stopped first. Signals that arrive during teardown
are reported and deferred, so a second Ctrl-C cannot leave half a cluster behind. `keep=True` leaves it up.
"""

from __future__ import annotations

import re
import signal
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, TextIO

from hpcray.errors import ClusterError, HpcrayError, Interrupted
from hpcray.profile import Profile, parse_duration

Say = Callable[[str], None]
HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_RUN_ID = re.compile(r"MLFLOW_RUN_ID=([0-9a-f]{32})")
_BEST = re.compile(r"^best trial: .*$", re.M)


@dataclass
class JobResult:
    name: str
    submission_id: str | None = None
    status: str = "NOT_SUBMITTED"
    mlflow_run_ids: list[str] = field(default_factory=list)
    highlights: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        from hpcray.jobs import exit_code

        return exit_code(self.status) if self.status != "NOT_SUBMITTED" else 2


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
        from dataclasses import asdict

        return {**asdict(self), "exit_code": self.exit_code}


class _Tee:
    """Passes a job's log through and remembers what the summary needs (MLflow run ids, the best trial)."""

    def __init__(self, out: TextIO, result: JobResult) -> None:
        self.out, self.result, self._text = out, result, ""

    def write(self, text: str) -> int:
        self._text += text
        self.result.mlflow_run_ids = list(dict.fromkeys(_RUN_ID.findall(self._text)))
        self.result.highlights = _BEST.findall(self._text)
        return self.out.write(text)

    def flush(self) -> None:
        self.out.flush()


@contextmanager
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


@contextmanager
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


def run(p: Profile, job_names: list[str], *, out: TextIO, say: Say, keep: bool = False,
        timeout: float | None = None) -> RunReport:
    """Run the named jobs of the profile on a fresh (or existing) cluster; return what happened to each."""
    from hpcray import jobs
    from hpcray.backends import backend_for
    from hpcray.tracking import load_credentials, preflight

    unknown = [n for n in job_names if n not in p.jobs]
    if unknown:
        raise HpcrayError(f"{p.source}: jobs.{unknown[0]}: no such job in the profile; its jobs are: "
                          f"{', '.join(p.jobs) or 'none'}")
    specs = {name: jobs.job_spec(p, name, []) for name in job_names}
    credentials = load_credentials(p)
    tracking_known = bool(p.mlflow.tracking_uri)
    if tracking_known:
        preflight(p, credentials)  # before any HPC hour is spent
    backend = backend_for(p)
    results = [JobResult(name) for name in job_names]
    api: Any = None
    current: JobResult | None = None
    env = credentials.env() if credentials and p.mlflow.deliver == "secret" else None
    report = RunReport(p.name, results, p.mlflow.tracking_uri, torn_down=False)
    reached = ExitStack()  # a port-forward to the head, where the backend needs one
    try:
        with _signals_raise():
            backend.up(timeout=timeout or parse_duration(p.timeout), progress=say, env=env)
            if not tracking_known:
                p.mlflow.tracking_uri = report.tracking_uri = getattr(backend, "tracking_uri", lambda: None)()
                preflight(p, credentials)
            api = jobs.JobsApi(reached.enter_context(backend.reach(say)))
            for result in results:
                sub = jobs.build_submission(p, specs[result.name], name=result.name, credentials=credentials,
                                            warn=say)
                current = result
                result.submission_id = jobs.submit(api, sub, image_ray_version=p.image.ray_version, progress=say,
                                                   warn=say)
                say(f"job {result.name}: submitted as {result.submission_id}")
                result.status = "RUNNING"
                try:
                    info = jobs.follow(api, result.submission_id, _Tee(out, result))
                except ClusterError as exc:
                    raise _lost(p, backend, result, exc) from None
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
            reached.close()
            if keep:
                say(f"--keep: cluster {p.name} stays up; remove it with `hpcray down --profile {p.source}`")
            else:
                backend.down(progress=say)
                report.torn_down = True
        if received:
            raise Interrupted(received[0])
    return report


def _lost(p: Profile, backend: Any, result: JobResult, exc: ClusterError) -> ClusterError:
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
