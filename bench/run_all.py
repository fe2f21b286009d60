"""`make bench`: every benchmark side by side in one run, written to docs/BENCHMARKS.md.

Order: cold start, readiness/teardown against the fake Kubernetes API, then one local Ray head (started and
stopped by hpcray's LocalBackend) for the submit rows, following a 100 MiB log and the sweep, then `make demo` (its
own heads). `--only follow-log` (say) runs one section alone. Within a
comparison the two sides alternate run by run, so both see the same load of a shared machine; the load average
is recorded before each section. Benchmarks are not tests: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import bench_cli
import bench_demo
import bench_follow
import bench_lifecycle
import bench_submit
import bench_sweep
from common import HEADER, REPO, Result, loadavg, local_head, machine, prepare_environment

SECTIONS = ("cli", "lifecycle", "submit", "follow-log", "sweep", "demo")
GPU_BEGIN, GPU_END = "<!-- gpu-proof -->", "<!-- /gpu-proof -->"

GPU_NOT_RUN = f"""{GPU_BEGIN}
## GPU proof (`make bench-gpu`): ready, not run

No machine with an NVIDIA GPU was lent to this run, so the GPU proof was **not run** and there is no figure for
it yet. `make bench-gpu` (`python bench/gpu_proof.py`) is ready for one; on such a machine it needs torch with
CUDA in the venv (`.venv/bin/pip install torch`) and writes its result into this section.

What it measures: one PyTorch training loop (`bench/gpu_train.py`: a small CNN on synthetic 64×64 images,
batch 512, 30 warm-up steps, then 300 timed steps with `torch.cuda.synchronize()` around them) run, alternately,
5 times bare on the GPU and 5 times as a job submitted with `hpcray submit --num-gpus 1 --working-dir bench` to
hpcray's local backend started with `local.num_gpus: 1`, in one run on the same GPU. It reports the median
samples/s of each, the ratio hpcray/bare (goal ≥ 0.95×), the GPU the job saw (`CUDA_VISIBLE_DEVICES`,
`torch.cuda.get_device_name`) and the MLflow run the job logged its throughput to.
{GPU_END}"""


def run_sections(only: set[str], runs: int, demo_runs: int, sweep_jobs: int,
                 follow_runs: int) -> tuple[list[Result], list[str]]:
    results: list[Result] = []
    log: list[str] = []

    def section(name: str) -> None:
        line = f"{datetime.datetime.now():%H:%M:%S} {name}: load average {loadavg()}"
        log.append(line)
        print(line, file=sys.stderr, flush=True)

    if "cli" in only:
        section("cold start")
        results += bench_cli.results(max(runs, 7))
    if "lifecycle" in only:
        section("readiness/teardown (fake Kubernetes API)")
        results += bench_lifecycle.results(runs)
    if only & {"submit", "follow-log", "sweep"}:
        section("local Ray head: starting")
        with local_head() as address:
            if "submit" in only:
                section("submit")
                results += bench_submit.results(address, runs)
            if "follow-log" in only:
                section("following a job that prints 100 MiB")
                results += bench_follow.results(address, follow_runs)
            if "sweep" in only:
                section(f"sweep of {sweep_jobs} jobs")
                results += bench_sweep.results(address, sweep_jobs)
        section("local Ray head: stopped")
    if "demo" in only:
        section(f"`make demo` × {demo_runs}")
        results += bench_demo.results(demo_runs)
    section("end")
    return results, log


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True).stdout.strip()


def git_commit() -> tuple[str, str]:
    """The commit measured, in words, and its hash: a shared working tree may hold others' uncommitted changes."""
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = [line[3:] for line in git("status", "--porcelain", "--", "hpcray", "pyproject.toml").splitlines()]
    return f"`{head}`" + (f" with uncommitted changes in {', '.join(changed)}" if changed else ""), head


def changed_since(head: str) -> str:
    """Others commit while the benchmarks run: say which files of the package changed meanwhile."""
    files = git("diff", "--name-only", head, "HEAD", "--", "hpcray", "pyproject.toml").split()
    return f" (during the run, later commits changed {', '.join(files)})" if files else ""


def versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{pkg} {version(pkg)}" for pkg in ("ray", "mlflow", "kubernetes"))


def demo_jobs() -> str:
    sys.path.insert(0, str(REPO))
    from hpcray.profile import load_profile

    jobs = load_profile("local").jobs
    return " and ".join(f"`{name}` (`{jobs[name].entrypoint}`)" for name in bench_demo.JOBS if name in jobs)


def document(results: list[Result], log: list[str], argv: list[str], started: float, load_at_start: str,
             previous_gpu: str | None, sweep_jobs: int, commit: tuple[str, str]) -> str:
    missed = [r for r in results if r.met is False]
    elapsed = time.time() - started
    out = [
        "# Benchmarks",
        "",
        "hpcray against the tools a user would otherwise run, measured side by side in one run. Generated by "
        f"`make bench` (`python bench/{' '.join(argv)}`); every row names the command that reproduces it alone "
        "(run from the repository root with `.venv/bin/python`). Benchmarks are not tests: no test asserts a time.",
        "",
        f"- When: {datetime.datetime.fromtimestamp(started):%Y-%m-%d %H:%M} (the run took {elapsed / 60:.0f} min), "
        f"commit {commit[0]} at the start{changed_since(commit[1])}",
        f"- Machine: {machine()}; {versions()}",
        f"- Load average (1/5/15 min) at start: **{load_at_start}**. The machine is shared with other engineers' "
        "test suites and CI runs, so absolute times are inflated and noisy; the two sides of each comparison "
        "alternate run by run (ours, theirs, ours, theirs, …) so that both see the same load, and the ratios are "
        "the figures to read.",
        "- Cells: median (min, max, n = number of runs). Ratio: hpcray's median / the usual way's median.",
        "",
        HEADER,
        *(r.row() for r in results),
        "",
    ]
    if missed:
        out += ["**Missed goals:** " + "; ".join(
            f"{r.what.split(' (')[0]}: "
            f"{f'{r.ratio:.2f}×' if r.on == 'ratio' else r.ours.cell().split(' (')[0]} "
            f"vs {r.goal}" for r in missed) + ". See *Reading the results* below.", ""]
    else:
        out += ["Every goal was met in this run.", ""]
    out += [
        "## What each row measures",
        "",
        "- **Cold start**: wall time of `hpcray --help` and of `ray job --help` as subprocesses, after one warm-up run "
        "of each (the files are in the page cache, as for any second command of a session).",
        "- **Readiness / teardown noticing latency**: real helm 4 and real kubectl against `tests/fake_kube_api.py` "
        "with its fake KubeRay operator in manual mode, 3 pods (head + 2 workers). The clock starts when the fake "
        "API commits the change that makes the last pod Ready (or deletes the last pod) and stops when the command "
        "has exited. hpcray watches; the usual way is a `kubectl get pods` loop with `sleep 5` started at a random "
        "phase of its period (so its expected latency is ~2.5 s plus one kubectl call). Goal: ≤ 0.5 s absolute.",
        "- **Submit rows**: one local Ray head started by hpcray's LocalBackend (profile `local`, in a state dir of "
        "its own, stopped by PID afterwards). `hpcray submit --address A …` vs `ray job submit --address A …` with "
        "the same arguments; `--no-wait` returns once the head has accepted the job; following a `sleep 1` job "
        "lasts until the command exits after the job ended (Ray's CLI tails the logs until the head closes the "
        "stream; hpcray stops when the job's status is terminal and the logs are drained). The row *… of which the "
        "command's own part* subtracts from each run the job's own time as the head recorded it (`start_time` → "
        "`end_time` of `GET /api/jobs/ID`): what is left is the CLI's start, the submission, noticing the end and "
        "the exit; the two rows after it split that at the head's marks (the head runs on this machine: one clock).",
        "- **Following a job that prints 100 MiB**: the same head; one job writes 100 MiB of 100-byte lines in "
        "bursts every 0.1 s over about 20 s, and `hpcray logs -f ID` and `ray job logs -f ID` follow it at the same "
        "time, each through a byte-counting TCP relay of its own on 127.0.0.1 (`tests/tcp_proxy.py`, standing where a "
        "port-forward or an Ingress would). *Bytes fetched over the log's size*: all bytes the relay passed from the "
        "dashboard to the follower (the log stream, status polls, headers) over the log's length; both follow Ray's "
        "log-tail "
        "websocket, so both pay its frame headers (~0.4 %). *CPU time*: user + sys of each follower process as the "
        "kernel accounted it (wait4), its start and imports included. Each follower's output is checked to hold "
        "the whole log.",
        f"- **HPO sweep**: the same head; {sweep_jobs} jobs `python -c 'print(1)'`, each submitted and followed to its end by "
        "`hpcray submit -- …` and by `ray job submit -- …` (waiting), one after the other, as a shell loop over a "
        "sweep's points would run them; the two sides alternate job by job. The row's cells are per job; the "
        f"totals (sum of the {sweep_jobs} jobs) are in its first column.",
        "- **`make demo`**: `hpcray run --profile local training hpo` (what `make demo` runs once the venv is "
        "installed) in a fresh `HPCRAY_STATE_DIR` each run: a new Ray head, a new MLflow sqlite store, the jobs "
        f"{demo_jobs()} one after the other, and the teardown; the *… of which* rows split each run at the lines "
        "it prints (head up, each job's end, exit). No usual-way counterpart; goal ≤ 60 s absolute.",
        "",
        "Load average before each section of this run:",
        "",
        *(f"    {line}" for line in log),
        "",
        "## Reading the results",
        "",
        *reading(results),
        "",
        previous_gpu or GPU_NOT_RUN,
        "",
    ]
    return "\n".join(out)


def reading(results: list[Result]) -> list[str]:
    """Why a goal was missed, from the figures of this run (the table has them all)."""
    by_what = {r.what.split(" (")[0]: r for r in results}
    lines = []
    for r in results:
        if r.met is not False:
            continue
        name = r.what.split(" (")[0]
        why = "see the row's min/max and the load average before its section; run it alone on a quiet machine."
        own = by_what.get("… of which the command's own part")
        if name.startswith("`submit -- sleep 1`") and own and r.theirs and own.theirs:
            job_ours = r.ours.median - own.ours.median
            need = (0.3 * own.theirs.median - own.ours.median) / 0.7
            why = (f"most of hpcray's {r.ours.median:.1f} s is the job itself on the head: Ray took ~{job_ours:.1f} s "
                   f"from accepting the 1 s job to ending it (starting its JobSupervisor actor and the entrypoint "
                   f"on the loaded machine), and both sides wait for that. What the command itself adds is "
                   f"{own.ours.median:.2f} s for hpcray vs {own.theirs.median:.2f} s for `ray job submit` "
                   f"({own.ours.median / own.theirs.median:.2f}×, next row). With these overheads the wall-time "
                   f"ratio reaches 0.3× only when Ray runs a 1 s job in ≤ {need:.1f} s, i.e. on a quiet machine; "
                   f"hpcray cannot shorten Ray's start of the job. To check: `python bench/bench_submit.py` when the "
                   f"load average is below 1.")
        elif name.startswith("… of which the command's own part"):
            before = by_what.get("… of which before the head accepted the job")
            after = by_what.get("… of which after the job ended")
            cold = by_what.get("cold start: `hpcray --help` vs `ray job --help`")
            floor = by_what.get("for reference: a Python that imports the libraries hpcray's CLI stands on")
            if before and after:
                sys.path.insert(0, str(REPO))
                from hpcray.jobs.follow import STATUS_POLL_S as poll_s

                why = (f"hpcray's {r.ours.median:.2f} s is {before.ours.median:.2f} s before the head accepted the "
                       f"job (the command's start and imports, the Jobs API and Ray version checks, the "
                       f"submission{f'; `hpcray --help` alone took {cold.ours.median:.2f} s' if cold else ''}) and "
                       f"{after.ours.median:.2f} s after the job ended (noticing the end: the status is polled every "
                       f"{poll_s:g} s while the job is young; one read of its short log; the exit), each inflated by the "
                       f"load average above (a 2-core machine shared with a Ray head running the job)"
                       f"{f'; a Python that only imports click, PyYAML and urllib took {floor.ours.median:.2f} s' if floor else ''}. "
                       f"`python bench/bench_submit.py` on a quiet machine measures it without that load.")
        elif name.startswith("`make demo`"):
            parts = [x for x in results if x.what.startswith("… of which") and x.command == r.command]
            split = ", ".join(f"{x.what.removeprefix('… of which ').split(' (')[0]} {x.ours.median:.0f} s"
                              for x in parts)
            biggest = max(parts, key=lambda x: x.ours.median, default=None)
            why = (f"the demo is CPU-bound work on {os.cpu_count()} cores (a Ray head, then {demo_jobs()}) on a "
                   f"shared machine (load average in its section above); medians of its parts: "
                   f"{split}"
                   + (f"; the largest is {biggest.what.removeprefix('… of which ').split(' (')[0]}" if biggest else "")
                   + ". What would bring it under 60 s here: a quiet machine, or a lighter demo in "
                   "hpcray/profiles/local.yaml (fewer HPO trials or epochs); `python bench/bench_demo.py` times it "
                   "alone.")
        lines.append(f"- **{name}** missed its goal ({r.goal}) in this run: {why}")
    follow = by_what.get("`submit -- sleep 1`, following to the end")
    own = by_what.get("… of which the command's own part")
    if follow and follow.met and own and follow.theirs and own.theirs:
        job = follow.ours.median - own.ours.median
        lines.append(f"- **Following a 1 s job** met its goal with little to spare: most of hpcray's "
                     f"{follow.ours.median:.1f} s is Ray's own time to start and end the 1 s job on the head "
                     f"(~{job:.1f} s here), which both sides wait for and which grows with the machine's load, while "
                     f"hpcray's own part stays small ({own.ours.median:.2f} s vs {own.theirs.median:.2f} s, next row). "
                     f"On a loaded machine the wall-time ratio can pass 0.3× with hpcray adding nothing more; the "
                     f"*own part* row is the figure that load does not move.")
    return lines or ["Every goal was met; nothing to explain."]


def previous_gpu_section(path: Path) -> str | None:
    """A GPU section that `make bench-gpu` measured is kept; the 'not run' note is rewritten."""
    if not path.exists():
        return None
    m = re.search(re.escape(GPU_BEGIN) + r".*?" + re.escape(GPU_END), path.read_text(), re.S)
    if m and "ready, not run" not in m.group(0):
        return m.group(0)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=5, help="runs of each side per comparison (≥ 5)")
    ap.add_argument("--demo-runs", type=int, default=3)
    ap.add_argument("--sweep-jobs", type=int, default=50)
    ap.add_argument("--follow-runs", type=int, default=3, help="100 MiB jobs followed by both sides at once")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "BENCHMARKS.md")
    args = ap.parse_args()
    only = set(args.only.split(","))
    if only - set(SECTIONS):
        ap.error(f"--only: unknown {','.join(sorted(only - set(SECTIONS)))}")
    prepare_environment()
    started, load_at_start, commit = time.time(), loadavg(), git_commit()
    results, log = run_sections(only, args.runs, args.demo_runs, args.sweep_jobs, args.follow_runs)
    text = document(results, log, ["run_all.py", *sys.argv[1:]], started, load_at_start,
                    previous_gpu_section(args.out), args.sweep_jobs, commit)
    args.out.write_text(text)
    print(text)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
