"""Following a chatty job: one job prints 100 MiB of log lines over about 20 s, and `hpcray logs -f ID` and
`ray job logs -f ID` follow it at the same time, each through a byte-counting TCP relay of its own on 127.0.0.1
(tests/tcp_proxy.py, as a port-forward would stand between them and the dashboard).

Rows: bytes fetched (the relay's bytes dashboard → follower, status polls included) over the log's size (goal
≤ 1.1×), and each follower's CPU time (user + sys of its process, from wait4) with hpcray against Ray's CLI (goal
≤ 1×). Each follower's output is checked to hold the job's whole log (hpcray's: nothing else). Without --address a
local head is started with the project's LocalBackend (its own state dir) and taken down afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

from bench_submit import ray_cli_env
from common import BIN, HEADER, QUIET, REPO, Result, Stats, loadavg, local_head, machine, prepare_environment

sys.path.insert(0, str(REPO))
from tests.tcp_proxy import TcpProxy  # noqa: E402 - after the path is set

COMMAND = "python bench/run_all.py --only follow-log"
LINE = 100  # bytes per log line, newline included
SECONDS = 20  # the job writes its log in bursts every 0.1 s over about this long, as a chatty training loop would
JOB = ("python -c \"import sys, time\nw = sys.stdout.write\nfor i in range({n}):\n    w('%09d ' % i + 'x' * {pad} + "
       "'\\n')\n    if i % {burst} == {burst} - 1: sys.stdout.flush(); time.sleep(0.1)\"")


def request(address: str, method: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(address + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return dict(json.load(resp))


def follower(argv: list[str], out: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(out, "wb") as f:
        return subprocess.Popen(argv, stdout=f, stderr=subprocess.PIPE, env={**os.environ, **QUIET, **env})


def reap(proc: subprocess.Popen[bytes]) -> float:
    """Wait for the follower; its CPU time (user + sys) as the kernel accounted it."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"follower failed ({proc.returncode}): {' '.join(map(str, proc.args))}\n"
                         f"{proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
    return usage.ru_utime + usage.ru_stime


def one_run(address: str, mib: int, tmp: Path) -> tuple[float, float, float, float, int, float]:
    """(hpcray's CPU s, Ray's CPU s, hpcray's bytes/log, Ray's bytes/log, log bytes, job's run time s)."""
    lines = mib * 2**20 // LINE
    sid = f"bench-follow-{uuid.uuid4().hex[:10]}"
    job = JOB.format(n=lines, pad=LINE - 11, burst=max(1, lines // (10 * SECONDS)))
    request(address, "POST", "/api/jobs/", {"entrypoint": job, "submission_id": sid})
    with TcpProxy(address) as ours_relay, TcpProxy(address) as theirs_relay:
        ours = follower([str(BIN / "hpcray"), "logs", "-f", "--address", ours_relay.address, sid], tmp / "ours.log",
                        {})
        theirs = follower([str(BIN / "ray"), "job", "logs", "-f", "--address", theirs_relay.address, sid],
                          tmp / "theirs.log", ray_cli_env())
        ours_cpu, theirs_cpu = reap(ours), reap(theirs)
        time.sleep(0.5)  # the relays' last bytes
        ours_bytes, theirs_bytes = ours_relay.down, theirs_relay.down
    info = request(address, "GET", f"/api/jobs/{sid}")
    req = urllib.request.Request(f"{address}/api/jobs/{sid}/logs")
    with urllib.request.urlopen(req, timeout=300) as resp:
        log = json.load(resp)["logs"].encode()
    if (tmp / "ours.log").read_bytes() != log:
        raise SystemExit(f"hpcray's output ({(tmp / 'ours.log').stat().st_size} bytes) is not the job's log "
                         f"({len(log)} bytes)")
    if (tmp / "theirs.log").read_bytes().find(log) < 0:  # Ray's CLI adds lines of its own before and after
        raise SystemExit(f"Ray's output does not hold the job's log ({len(log)} bytes)")
    size = len(log)
    return (ours_cpu, theirs_cpu, ours_bytes / size, theirs_bytes / size, size,
            (info["end_time"] - info["start_time"]) / 1000)


def results(address: str, runs: int = 3, mib: int = 100) -> list[Result]:
    cpu_a, cpu_b, bytes_a, bytes_b, spans = [], [], [], [], []
    with tempfile.TemporaryDirectory(prefix="hpcray-bench-follow-") as tmp:
        for i in range(runs):
            a, b, ba, bb, size, span = one_run(address, mib, Path(tmp))
            cpu_a.append(a), cpu_b.append(b), bytes_a.append(ba), bytes_b.append(bb), spans.append(span)
            print(f"  follow-log run {i + 1}/{runs}: {size / 2**20:.0f} MiB log, job ran {span:.0f} s; CPU hpcray "
                  f"{a:.2f} s, ray {b:.2f} s; fetched/log hpcray {ba:.3f}×, ray {bb:.3f}×", flush=True)
    note = (f"`hpcray logs -f` vs `ray job logs -f` on the same job, {LINE}-byte lines written in bursts every 0.1 s, "
            f"the job ran ~{min(spans):.0f} s")
    return [
        Result(f"following a job that prints {mib} MiB of log lines: bytes fetched / log size ({note})",
               Stats(bytes_a, unit="×"), Stats(bytes_b, unit="×"), "≤ 1.1×", COMMAND, 1.1, on="value"),
        Result("following the same job: CPU time of the follower (user + sys, its start included)", Stats(cpu_a),
               Stats(cpu_b), "≤ 1×", COMMAND, 1.0),
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mib", type=int, default=100, help="size of the job's log")
    ap.add_argument("--address", help="Jobs API of a running Ray head (default: start a local one)")
    args = ap.parse_args()
    prepare_environment()
    load = loadavg()
    with local_head(args.address) as address:
        rows = results(address, args.runs, args.mib)
    print(f"Machine: {machine()}; load average at start {load}; Ray head at {address}\n")
    print(HEADER)
    print("\n".join(r.row() for r in rows))


if __name__ == "__main__":
    main()
