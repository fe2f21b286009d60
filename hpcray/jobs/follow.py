"""Following a job to its end (its log as it comes, its final status, the exit code that mirrors it), stopping it,
listing jobs.

The log comes over Ray's log-tail websocket, what `ray job logs -f` reads: each byte once, as Ray reads the job's
log file (it looks again about every second while the job is quiet); a job that ends within 2 s of starting is
shown with one read at its end instead. The end is noticed from the job's status, polled at an interval that grows
with the job's age (4 % of it, from 0.05 s up to 5 s), or from Ray closing the stream, which it does once the job
has ended and the whole log is sent. A stream that drops mid-job is opened again and what it resends is skipped;
where none can be opened (a proxy that refuses websocket upgrades) the whole log is re-read every few seconds
instead, and a line says so.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from typing import Any, Callable, Iterator, TextIO

from hpcray.errors import EXIT_JOB_FAILED, EXIT_JOB_STOPPED, EXIT_OK, ClusterError, JobsApiRefused
from hpcray.jobs.api import JobsApi, StreamLost, StreamRefused
from hpcray.jobs.submission import redact
from hpcray.waiting import poll_until

Say = Callable[[str], None]

TERMINAL = {"SUCCEEDED": EXIT_OK, "FAILED": EXIT_JOB_FAILED, "STOPPED": EXIT_JOB_STOPPED}
"""Terminal Ray job statuses and the exit code hpcray mirrors each with."""

POLL_S = 0.2
"""Status poll period when waiting for a stopped job's end; the fallback's log poll period for a short log."""
STATUS_POLL_S, STATUS_POLL_SHARE, STATUS_POLL_MAX_S = 0.05, 0.04, 5.0
"""While following: the job's status is polled every STATUS_POLL_SHARE of its age, within these bounds."""
STREAM_AFTER_S = 2.0
"""A job seen starting gets the log stream once it has run this long (one already running gets it at once): a
shorter one is shown with one read at its end, without the websocket (importing aiohttp costs ~0.3 s of CPU, which
a short job on a busy head would wait for)."""
REFETCH_MAX = 2**20
"""When the job has ended, a log of which less than this was shown is fetched whole (one request, done at once)
rather than waiting for Ray to close the stream (1-5 s after the end); a longer one comes through the stream."""
QUIET_AFTER_END_S = 15.0
"""A stream that sends nothing this long after the job ended is given up for one fetch of the whole log."""
BLIP_S = 10.0
"""A status poll that fails is retried this long (a port-forward blip) before the cluster is taken for gone."""
MAX_DROPS = 3
"""Streams in a row that drop before showing anything new, before falling back to re-reading the log."""
FLUSH_S = 0.05
"""Output from the stream is flushed at most this long after it arrives (not once per chunk: a chatty job)."""


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class _Stream:
    """Ray's log-tail websocket, read in a thread of its own (so Ctrl-C and the status polls stay in the caller's)
    and written to `out` as it arrives, leaving out the first `skip` characters: those shown before it was opened
    again, which Ray sends again since its tail starts at the first byte."""

    def __init__(self, api: JobsApi, job_id: str, out: TextIO, skip: int = 0) -> None:
        import asyncio

        self.url, self.start, self.shown = api.tail_url(job_id), skip, skip
        self.refused: str | None = None  # why it could not be opened
        self.lost: str | None = None  # why it ended without Ray closing it
        self.failure: Exception | None = None  # writing the output failed (a closed pipe)
        self.last_data = time.monotonic()
        self._skip, self._out, self._done = skip, out, threading.Event()
        self._lock, self._closed = threading.Lock(), False  # `out` is written under the lock, until closed
        self._loop = asyncio.new_event_loop()
        self._task = self._loop.create_task(self._read(api, job_id))
        threading.Thread(target=self._run, name=f"log-tail {job_id}", daemon=True).start()

    @property
    def ended(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float) -> None:
        self._done.wait(timeout)

    def close(self) -> None:
        """Stop writing at once (`shown` is final when this returns); the thread winds the connection down alone."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._out.flush()
        if not self._done.is_set():
            try:
                self._loop.call_soon_threadsafe(self._task.cancel)
            except RuntimeError:  # its loop closed meanwhile
                pass

    def _run(self) -> None:
        import asyncio

        try:
            self._loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        finally:
            self._loop.close()
            self._done.set()

    def _flush(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                self._out.flush()
            except Exception as exc:  # noqa: BLE001 - handed to the caller's thread, which raises it
                self.failure = self.failure or exc

    async def _read(self, api: JobsApi, job_id: str) -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        pending: list[asyncio.TimerHandle] = []

        def flush() -> None:
            pending.clear()
            self._flush()

        try:
            async for text in api.tail(job_id):
                self.last_data = time.monotonic()
                if self._skip:
                    cut = min(self._skip, len(text))
                    self._skip, text = self._skip - cut, text[cut:]
                    if not text:
                        continue
                with self._lock:
                    if self._closed:
                        return
                    self._out.write(text)
                    self.shown += len(text)
                if not pending:
                    pending.append(loop.call_later(FLUSH_S, flush))
        except StreamRefused as exc:
            self.refused = str(exc)
        except StreamLost as exc:
            self.lost = str(exc)
        except Exception as exc:  # noqa: BLE001 - handed to the caller's thread, which raises it
            self.failure = exc
        finally:
            for handle in pending:
                handle.cancel()
            self._flush()


class _NotYet:
    """Before the stream: a job that ends within STREAM_AFTER_S of starting is shown with one read at its end."""

    ended, failure, shown = False, None, 0

    def wait(self, timeout: float) -> None:
        time.sleep(timeout)

    def close(self) -> None:
        pass


class _Rereading:
    """The fallback: the whole log fetched again (`GET /api/jobs/ID/logs`, the Jobs API has no ranged read) and its
    new part written, less often as it grows."""

    ended, failure = False, None

    def __init__(self, api: JobsApi, job_id: str, out: TextIO, shown: int) -> None:
        self.api, self.job_id, self.out, self.shown = api, job_id, out, shown
        self._next = 0.0

    def wait(self, timeout: float) -> None:
        time.sleep(timeout)
        if time.monotonic() >= self._next:
            self.shown = _write_rest(self.api.logs(self.job_id), self.shown, self.out)
            self._next = time.monotonic() + POLL_S + self.shown / 2e6

    def close(self) -> None:
        pass


def _write_rest(log: str, shown: int, out: TextIO) -> int:
    if len(log) > shown:
        out.write(log[shown:])
        out.flush()
    return max(shown, len(log))


def status_poll_interval(age: float) -> float:
    return min(STATUS_POLL_MAX_S, max(STATUS_POLL_S, STATUS_POLL_SHARE * age))


def follow(api: JobsApi, job_id: str, out: TextIO, say: Say = _to_stderr) -> dict[str, Any]:
    """Write the job's log to `out` as it comes until the job has ended and its log is written; its final details
    (status, Ray's message). Lines about the stream (dropped, reopened, given up) go to `say`."""
    info = api.info(job_id)  # an unknown id is JobNotFound before anything is opened
    if str(info["status"]) in TERMINAL:  # nothing more will come: one read, no stream
        _write_rest(api.logs(job_id), 0, out)
        return redact(info)
    started = time.monotonic()
    running_since = -math.inf if info["status"] == "RUNNING" else None  # already running: the stream opens at once
    source: _NotYet | _Stream | _Rereading = _NotYet()
    drops = 0
    try:
        while True:
            if (isinstance(source, _NotYet) and running_since is not None
                    and time.monotonic() - running_since >= STREAM_AFTER_S):
                source = _Stream(api, job_id, out)
            source.wait(status_poll_interval(time.monotonic() - started))
            if source.failure is not None:
                raise source.failure
            if str(info["status"]) not in TERMINAL:
                info = _info(api, job_id, say)
            ended = str(info["status"]) in TERMINAL
            if running_since is None and info["status"] == "RUNNING":
                running_since = time.monotonic()
            if isinstance(source, _Stream) and source.ended:
                if ended and source.refused is None and source.lost is None:
                    return redact(info)  # Ray closed the stream once the whole log was sent
                if ended:
                    break
                drops = drops + 1 if source.shown == source.start else 1
                source = _reopen(api, job_id, out, source, drops, say)
            elif ended and not (isinstance(source, _Stream) and source.shown >= REFETCH_MAX
                                and time.monotonic() - source.last_data < QUIET_AFTER_END_S):
                break
        source.close()
        _write_rest(api.logs(job_id), source.shown, out)
        return redact(info)
    finally:
        source.close()


def _info(api: JobsApi, job_id: str, say: Say) -> dict[str, Any]:
    """The job's details; through a blip of the connection (a port-forward restarting), retried for BLIP_S."""
    try:
        return api.info(job_id)
    except JobsApiRefused:
        raise
    except ClusterError:
        say(f"no answer from the Ray Jobs API at {api.address}; retrying for {BLIP_S:.0f} s")

        def answer() -> dict[str, Any] | None:
            try:
                return api.info(job_id)
            except JobsApiRefused:
                raise
            except ClusterError:
                return None

        found = poll_until(answer, timeout=BLIP_S, interval=0.5)
        if found is None:
            raise
        return found


def _reopen(api: JobsApi, job_id: str, out: TextIO, stream: _Stream, drops: int,
            say: Say) -> _Stream | _Rereading:
    """After a stream ended while the job runs: another stream, or the fallback where streams do not work."""
    if stream.refused is not None or drops > MAX_DROPS:
        why = (f"cannot open the log stream at {stream.url} ({stream.refused})" if stream.refused is not None
               else f"the log stream at {stream.url} dropped {drops} times in a row ({stream.lost or 'closed'})")
        say(f"{why}; following job {job_id} by re-reading its whole log (GET /api/jobs/{job_id}/logs) every few "
            f"seconds instead")
        return _Rereading(api, job_id, out, stream.shown)
    say(f"the log stream of job {job_id} dropped ({stream.lost or 'closed before the job ended'}); reconnecting, "
        f"leaving out the {stream.shown} characters already shown")
    return _Stream(api, job_id, out, skip=stream.shown)


def wait_until_done(api: JobsApi, job_id: str, timeout: float) -> str:
    """The job's status once terminal, or as it is when `timeout` has passed."""
    last = [""]

    def ended() -> str | None:
        last[0] = str(api.info(job_id)["status"])
        return last[0] if last[0] in TERMINAL else None

    return poll_until(ended, timeout=timeout, interval=POLL_S) or last[0]


def stop(api: JobsApi, job_id: str, *, wait: bool = True, timeout: float = 30.0) -> str:
    """Ask Ray to stop the job (SIGTERM, then SIGKILL); its status afterwards."""
    api.stop(job_id)
    return wait_until_done(api, job_id, timeout) if wait else str(api.info(job_id)["status"])


def status_of(api: JobsApi, job_id: str) -> dict[str, Any]:
    """A job's details as Ray reports them, with secret-looking env var values redacted."""
    return redact(api.info(job_id))


def list_jobs(api: JobsApi) -> list[dict[str, Any]]:
    return [redact(job) for job in api.list()]


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
