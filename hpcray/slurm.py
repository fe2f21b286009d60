"""The only place that runs sbatch and scontrol: argument lists (never a shell string), job state from
`scontrol show job -o` (works without accounting), and a job that ended badly as a SlurmError with its error output.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hpcray.errors import SlurmError, SlurmTimeout, ToolMissing
from hpcray.secrets import is_secret_name
from hpcray.waiting import Deadline

# States after which a job never runs again. COMPLETING is not one: its processes may still be cleaning up.
ENDED = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
                   "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT"})
_KEY = re.compile(r"(?:^|\s)([A-Za-z][\w:/]*)=")


@dataclass(frozen=True)
class Job:
    """One `scontrol show job -o` line, with the fields hpcray reads by name."""

    id: str
    fields: dict[str, str]

    def _get(self, key: str) -> str | None:
        value = self.fields.get(key)
        return None if value in (None, "", "(null)", "None") else value

    @property
    def state(self) -> str:
        return (self.fields.get("JobState") or "UNKNOWN").split()[0]

    @property
    def reason(self) -> str | None:
        return self._get("Reason")

    @property
    def node(self) -> str | None:
        return self._get("NodeList")

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    @property
    def exit_status(self) -> tuple[int, int]:
        """(exit code, signal) of the batch script: ExitCode=1:0 is exit 1, 0:15 killed by SIGTERM."""
        code, _, sig = (self.fields.get("ExitCode") or "0:0").partition(":")
        return int(code or 0), int(sig or 0)

    @property
    def ok(self) -> bool:
        return self.state == "COMPLETED" and self.exit_status == (0, 0)

    @property
    def log(self) -> Path | None:
        path = self._get("StdErr") or self._get("StdOut")
        return Path(path) if path else None


def parse_job(line: str) -> Job:
    """`JobId=5 JobName=x … TRES=cpu=1,mem=1G … StdErr=/p` → Job; a value runs up to the next ` Key=`."""
    keys = list(_KEY.finditer(line))
    fields = {m.group(1): line[m.end():keys[i + 1].start()].strip() if i + 1 < len(keys) else line[m.end():].strip()
              for i, m in enumerate(keys)}
    return Job(fields.get("JobId", ""), fields)


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ToolMissing(f"{name} not found on PATH; run this on a SLURM login node (or `module load slurm`), or "
                          "use `hpcray pull --slurm --print` to get the batch script")
    return path


def _run(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a SLURM command in this environment less its secret-looking variables: sbatch's default --export=ALL
    copies the environment into the job, where SLURM keeps it in its state directory for the job's life."""
    env = {k: v for k, v in os.environ.items() if not is_secret_name(k)}
    try:
        return subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=60, env=env)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{Path(args[0]).name} did not answer within 60 s; is slurmctld up? (`scontrol ping`)") \
            from None


def _message(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else "no error message"
    return re.sub(r"^(sbatch|scontrol|slurm_\w+)(: error)?:\s*", "", last)


def submit(script: str, fix: str = "") -> str:
    """Submit a batch script on stdin; the job id. `fix` ends the message when sbatch refuses the script."""
    done = _run([tool("sbatch"), "--parsable"], stdin=script)
    m = re.match(r"(\d+)", done.stdout.strip())
    if done.returncode != 0 or not m:
        raise SlurmError(f"sbatch refused the job: {_message(done.stderr or done.stdout)}{'; ' + fix if fix else ''}")
    return m.group(1)


def show(job_id: str) -> Job | None:
    """The job as slurmctld sees it; None once it is unknown (never submitted, or purged after MinJobAge)."""
    done = _run([tool("scontrol"), "show", "job", "-o", job_id])
    if done.returncode != 0:
        if "Invalid job id" in done.stderr:
            return None
        raise SlurmError(f"scontrol show job {job_id} failed: {_message(done.stderr)}")
    return parse_job(done.stdout.strip().splitlines()[0])


def _describe(job: Job) -> str:
    if job.state == "PENDING":
        return f"PENDING ({job.reason})" if job.reason else "PENDING"
    if job.state == "RUNNING" and job.node:
        return f"RUNNING on {job.node}"
    return job.state


def wait(job_id: str, *, timeout: float, say: Callable[[str], None],
         detail: Callable[[Job], str | None] | None = None, every: float = 30.0) -> Job:
    """Poll until the job has ended. `say` gets a line on each state change, and `detail(job)` at most every
    `every` seconds while it changes (e.g. bytes written). Raises SlurmTimeout (the job keeps running)."""
    deadline = Deadline(timeout)
    interval, last, last_detail, last_said = 0.2, "", None, deadline.start
    while True:
        job = show(job_id)
        if job is None:
            raise SlurmError(f"job {job_id} is no longer known to slurmctld (purged after MinJobAge?); look for its "
                             "output file")
        described = _describe(job)
        if described != last:
            say(f"job {job_id}: {described}")
            last, last_said = described, time.monotonic()
        elif detail is not None and time.monotonic() - last_said >= every:
            note = detail(job)
            if note and note != last_detail:
                say(f"job {job_id}: {described}, {note}")
                last_detail, last_said = note, time.monotonic()
        if job.ended:
            return job
        if deadline.passed:
            raise SlurmTimeout(f"job {job_id} is still {job.state} after {timeout:.0f} s and keeps going: follow it "
                               f"with `scontrol show job {job_id}`, stop it with `scancel {job_id}`")
        deadline.sleep(interval)
        interval = min(interval * 1.5, 5.0)


def error_tail(job: Job, lines: int = 8) -> str:
    """The last lines of the job's error output, or '' when the file cannot be read from here."""
    if job.log is None:
        return ""
    try:
        text = job.log.read_text(errors="replace")
    except OSError:
        return ""
    kept = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " | ".join(kept[-lines:])


def failure(job: Job, what: str) -> SlurmError:
    """A SlurmError for a job that did not end COMPLETED with exit 0, carrying its exit code and error output."""
    code, sig = job.exit_status
    how = f"killed by signal {sig}" if sig else f"exit code {code}"
    tail = error_tail(job)
    where = f"; full output in {job.log}" if job.log else ""
    said = f"; its output ends: {tail}" if tail else ""
    return SlurmError(f"{what}: SLURM job {job.id} ended {job.state} ({how}){said}{where}")
