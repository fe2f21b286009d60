"""Walltime: SLURM's time formats, the allocation's end and what is left of it, max_runtime against it (warned,
refused with --must-fit), the graceful stop before the end, and `hpcray run` resuming a Tune sweep on a new
allocation after it (in the site in a box, over real SLURM: the last test)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from hpcray import waiting, walltime
from hpcray.backends.base import ClusterStatus, NodeStatus
from hpcray.backends.kuberay import cluster_ends_at, node_status
from hpcray.cli import main
from hpcray.kube import pod_state
from tests.fixtures_box import site_box  # noqa: F401  (the fixture)

# ---------------------------------------------------------------------------------------------------------------
# Pure: SLURM's time formats and the arithmetic
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, seconds", [
    ("1", 60), ("90", 5400), ("230", 13800),  # minutes
    ("5:30", 330),  # minutes:seconds
    ("04:00:00", 14400), ("1:02:03", 3723),  # hours:minutes:seconds
    ("2-0", 172800), ("1-12", 129600),  # days-hours
    ("1-2:30", 95400),  # days-hours:minutes
    ("1-00:00:01", 86401),  # days-hours:minutes:seconds
    ("UNLIMITED", None), ("infinite", None), ("0", None),  # sbatch: 0 means no limit
])
def test_every_slurm_time_format(text: str, seconds: float | None) -> None:
    assert walltime.parse_slurm_time(text) == seconds


@pytest.mark.parametrize("text", ["1h", "1:2:3:4", "-5", "1-", "a-1", "1.5", "", "1-2:3:4:5"])
def test_a_bad_slurm_time_says_which_formats_work(text: str) -> None:
    with pytest.raises(ValueError, match="is not a SLURM time limit; write minutes .* or UNLIMITED"):
        walltime.parse_slurm_time(text)


@pytest.mark.parametrize("flags, limit", [
    ("-p gpu --gres=gpu:1 --time=90 --account=a", 5400),
    (["--time 1-0", "--nodes=1"], 86400),
    ("-t 30", 1800), ("-t5", 300),
    ("--time=10 --time=2", 120),  # the plugin keeps the last flag of a key
    ("-p gpu", None), ("", None), ("--time=UNLIMITED", None),
])
def test_the_time_limit_of_a_pods_sbatch_flags(flags: Any, limit: float | None) -> None:
    assert walltime.time_limit(flags) == limit


def test_a_cluster_ends_with_its_first_pod_and_hpcray_stops_a_margin_before() -> None:
    assert walltime.allocation_end(1000.0, 60.0) == 1060.0
    assert walltime.allocation_end(None, 60.0) is None and walltime.allocation_end(1000.0, None) is None
    assert walltime.cluster_end([1060.0, None, 1030.0]) == 1030.0
    assert walltime.cluster_end([None]) is None
    assert walltime.stop_at(1060.0, 300.0) == 760.0 and walltime.stop_at(None, 300.0) is None


def test_max_runtime_against_the_time_left() -> None:
    assert walltime.fit_problem("hpo", 3600, 7200) is None
    assert walltime.fit_problem("hpo", None, 10) is None and walltime.fit_problem("hpo", 3600, None) is None
    assert walltime.fit_problem("hpo", 7200, 1800, max_runtime="2h") == (
        "job hpo has max_runtime 2h but only 30m of the allocation is left before hpcray stops it")
    assert "only 0s of the allocation" in (walltime.fit_problem("hpo", 60, -5) or "")


@pytest.mark.parametrize("seconds, words", [(0, "0s"), (59, "59s"), (90, "1m30s"), (3600, "1h"), (5400, "1h30m"),
                                            (200000, "2d7h33m"), (86400, "1d")])
def test_durations_in_words(seconds: float, words: str) -> None:
    assert waiting.words(seconds) == words


def test_time_left_in_words() -> None:
    assert walltime.left_words(1600.0, 1000.0) == "walltime 10m left"
    assert walltime.left_words(1000.0, 1120.0) == "walltime ended 2m ago"
    assert walltime.left_words(None, 1000.0) == "no walltime known"


def _pod(name: str, role: str, flags: str, container_state: dict[str, Any], phase: str = "Running") -> dict[str, Any]:
    return {"metadata": {"name": name, "creationTimestamp": "2026-12-01T10:00:00Z",
                         "labels": {"ray.io/node-type": role}, "annotations": {"slurm-job.vk.io/flags": flags}},
            "spec": {"containers": [{"name": "ray"}]},
            "status": {"phase": phase, "conditions": [{"type": "Ready", "status": "True"}],
                       "containerStatuses": [{"name": "ray", "state": container_state}]}}


def test_a_pods_start_and_limit_come_from_what_the_plugin_reports_and_what_sbatch_got() -> None:
    """The SLURM job's start is the container's running.startedAt (terminated.startedAt once it ended), the limit
    the --time in the pod's sbatch flags; the cluster's end is its first live pod's."""
    head = _pod("h", "head", "-p debug --time=1-0", {"running": {"startedAt": "2026-12-01T10:00:30Z"}})
    worker = _pod("w", "worker", "--time=30", {"running": {"startedAt": "2026-12-01T10:02:00Z"}})
    waiting = _pod("x", "worker", "--time=30", {"waiting": {}}, phase="Pending")
    ended = _pod("e", "worker", "--time=1", {"terminated": {"startedAt": "2026-12-01T09:00:00Z",
                                                            "reason": "SlurmJobTimeout"}}, phase="Failed")
    nodes = [node_status(pod_state(p)) for p in (head, worker, waiting, ended)]
    t0 = nodes[0].started_at
    assert t0 is not None and nodes[2].started_at is None and nodes[3].started_at == t0 - 3630
    assert [(n.time_limit_s, n.created_at is not None) for n in nodes] == [(86400, True), (1800, True),
                                                                          (1800, True), (60, True)]
    assert cluster_ends_at(nodes) == t0 + 90 + 1800  # the worker ends first; the ended pod no longer counts
    status = ClusterStatus("c", "kuberay", True, True, nodes=nodes, ends_at=cluster_ends_at(nodes))
    assert status.time_left_s(now=t0 + 1890 - 600) == 600
    assert status.to_json()["ends_at"] == t0 + 1890 and "time_left_s" in status.to_json()
    assert ClusterStatus("l", "local", True, True, nodes=[NodeStatus("n", "head", "Ready")]).time_left_s() is None


def test_a_head_kuberay_replaced_counts_as_the_cluster_gone_at_the_walltime() -> None:
    """KubeRay deletes a head pod that SLURM's walltime ended and makes a new one (another name): for `run`, the
    cluster the job ran on is gone, by the walltime once the head's allocation is over, else in KubeRay's words."""
    from hpcray.flows import _ended_under

    class Backend:
        def __init__(self, now: ClusterStatus) -> None:
            self.now = now

        def status(self) -> ClusterStatus:
            return self.now

    def head(name: str, phase: str, started: float | None) -> NodeStatus:
        return NodeStatus(name, "head", phase, started_at=started, time_limit_s=60.0)

    t = time.time()
    old = ClusterStatus("c", "kuberay", True, True, nodes=[head("h-old", "Ready", t - 90)])
    gone = NodeStatus("h-old", "head", "Deleted", "Failed: its SLURM job reached the walltime and was killed "
                      "(SlurmJobTimeout, its Ray container); …; KubeRay deleted it and made a new pod")
    now = ClusterStatus("c", "kuberay", True, False, nodes=[head("h-new", "Pending", None)], replaced=[gone])
    assert _ended_under(Backend(now), old) == "SLURM's walltime (SlurmJobTimeout: --time 1m)"  # type: ignore[arg-type]
    early = ClusterStatus("c", "kuberay", True, True, nodes=[head("h-old", "Ready", t - 10)])
    assert _ended_under(Backend(now), early) == f"the head pod h-old going away ({gone.reason})"  # type: ignore[arg-type]
    assert _ended_under(Backend(early), early) is None  # type: ignore[arg-type]


def test_each_attempt_of_a_resumable_job_gets_the_same_name_and_from_the_second_on_the_parent_run() -> None:
    from hpcray.flows import JobResult, _attempt
    from hpcray.profile import JobSpec

    plain = JobSpec(entrypoint="python hpo.py", env={"A": "1"})
    result = JobResult("hpo")
    assert _attempt(plain, result) is plain
    spec = JobSpec(entrypoint="python hpo.py", env={"A": "1"}, resume=True)
    first = _attempt(spec, result).env
    assert first["A"] == "1" and first["HPCRAY_ATTEMPT"] == "1" and first["HPCRAY_RESUME_NAME"].startswith("hpo-")
    assert "HPCRAY_MLFLOW_PARENT_RUN_ID" not in first
    result.attempts, result.mlflow_run_ids = 1, ["a" * 32, "b" * 32]
    second = _attempt(spec, result).env
    assert second["HPCRAY_RESUME_NAME"] == first["HPCRAY_RESUME_NAME"] and second["HPCRAY_ATTEMPT"] == "2"
    assert second["HPCRAY_MLFLOW_PARENT_RUN_ID"] == "a" * 32  # the first run the job announced: its parent
    assert spec.env == {"A": "1"}


# ---------------------------------------------------------------------------------------------------------------
# The profile
# ---------------------------------------------------------------------------------------------------------------

INTERLINK = """\
name: il
image: {dir: /sif}
head: {cpu: "2", memory: 4G}
interlink: {enabled: true, node: vk, slurm: {time: "TIME"}}
jobs: {hpo: {entrypoint: python hpo.py, max_runtime: "30m"}}
"""


@pytest.mark.parametrize("text, expected", [
    pytest.param(INTERLINK.replace("TIME", "4h"), "interlink.slurm.time: '4h' is not a SLURM time limit; write "
                 "minutes (90), M:S, H:M:S (04:00:00), D-H, D-H:M, D-H:M:S (1-12:00:00) or UNLIMITED", id="time"),
    pytest.param(INTERLINK.replace('"30m"', "soon"), "jobs.hpo.max_runtime: 'soon' is not a duration", id="max_runtime"),
    pytest.param(INTERLINK.replace("max_runtime", "max_attempts: 0, max_runtime"),
                 "jobs.hpo.max_attempts: 0 attempts would never run the job", id="max_attempts"),
    pytest.param(INTERLINK.replace('time: "TIME"', 'time: "60", stop_margin: 5min'),
                 "interlink.slurm.stop_margin: '5min' is not a duration", id="stop_margin"),
])
@pytest.mark.reliability(case="bad input: a SLURM --time, max_runtime, max_attempts or stop_margin hpcray cannot read",
                         sees="one line `hpcray: error: FILE:LINE: KEY: … write …`, exit 2",
                         remains="nothing (checked when the profile loads)")
def test_a_bad_walltime_key_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str,
                                        expected: str) -> None:
    profile = tmp_path / "il.yaml"
    profile.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        main(["render", "--no-check", "--profile", str(profile)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith(f"hpcray: error: {profile}:"), err
    assert expected in err[0], err[0]


@pytest.mark.reliability(
    case="bad input: `hpcray run` of a job whose max_runtime exceeds the profile's SLURM --time (less the stop "
         "margin)",
    sees="`hpcray: warning: job hpo has max_runtime 2h but only 55m of the allocation is left before hpcray stops "
         "it; it will be stopped then`; with --must-fit one line `hpcray: error: …; nothing submitted …`, exit 2",
    remains="nothing with --must-fit (refused before anything starts)")
def test_run_refuses_a_job_that_cannot_fit_the_walltime_before_anything_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    profile = tmp_path / "il.yaml"
    profile.write_text(INTERLINK.replace("TIME", "1:00:00").replace('"30m"', "2h"))
    started = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--must-fit", "--profile", str(profile), "hpo"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and time.monotonic() - started < 5, err
    assert err == ["hpcray: error: job hpo has max_runtime 2h but only 55m of the allocation is left before hpcray "
                   "stops it; nothing submitted: raise interlink.slurm.time, lower max_runtime, or drop --must-fit "
                   "to run it anyway"]


# ---------------------------------------------------------------------------------------------------------------
# The site in a box: a Tune sweep over several SLURM allocations, one MLflow parent run, each trial once
# ---------------------------------------------------------------------------------------------------------------

EXAMPLES = Path(__file__).resolve().parent.parent / "hpcray" / "examples"
TRIALS, EPOCHS, PACE_S = 2, 100, 0.5
"""Each epoch takes at least PACE_S (tests/paced_job.py): a sweep of about 50 s of training on any machine, longer
than what a 1-minute allocation leaves a job once Ray is up, so it needs at least two; checkpointed each epoch, it
progresses in each."""


def _mlflow_runs(db: Path) -> list[tuple[str, str, str | None, str | None, int]]:
    """(run id, status, parent run id, trial name, distinct val_loss steps) of every run in the store."""
    with sqlite3.connect(db) as c:
        rows = c.execute("SELECT run_uuid, status FROM runs").fetchall()
        tags = c.execute("SELECT run_uuid, key, value FROM tags").fetchall()
        steps = dict(c.execute("SELECT run_uuid, COUNT(DISTINCT step) FROM metrics WHERE key = 'val_loss' "
                               "GROUP BY run_uuid").fetchall())
    by_run: dict[str, dict[str, str]] = {}
    for run, key, value in tags:
        by_run.setdefault(run, {})[key] = value
    return [(run, status, by_run.get(run, {}).get("mlflow.parentRunId"), by_run.get(run, {}).get("trial_name"),
             steps.get(run, 0)) for run, status in rows]


@pytest.mark.slow
@pytest.mark.reliability(
    case="fault: a Tune sweep longer than its cluster's SLURM --time (1 minute), `resume: true`",
    sees="`hpcray run` stops the job stop_margin before each allocation ends (SIGTERM through the Jobs API), brings "
         "the cluster up on a new allocation and resubmits it; the sweep restores and finishes: SUCCEEDED after 2+ "
         "attempts, one MLflow parent run, one run per trial; `status` showed the walltime left",
    remains="nothing: the cluster torn down, the Tune experiment in HPCRAY_RESULTS_DIR")
def test_a_sweep_longer_than_the_walltime_resumes_on_a_new_allocation(site_box: Any, tmp_path: Path) -> None:
    from tests.test_access import box_profile

    # The shared filesystem: a directory bound into the pods at the same path (singularity --containall gives each
    # container a private /tmp), holding Tune's experiment and the MLflow store, which outlive each allocation.
    shared = tmp_path / "shared"
    results = shared / "results"
    results.mkdir(parents=True)
    db = shared / "mlflow.db"
    # the store made before anything uses it: two first users of one sqlite file race on its tables' creation
    made = subprocess.run([sys.executable, "-c", f"import mlflow; mlflow.MlflowClient('sqlite:///{db}')"
                                                 ".search_experiments()"], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    work = tmp_path / "work"
    shutil.copytree(EXAMPLES, work, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(Path(__file__).parent / "paced_job.py", work / "paced.py")
    profile = box_profile(
        site_box, tmp_path, "wt", workers={"cpu": {"replicas": 0, "cpu": "1", "memory": "2G"}},
        head={"cpu": "2", "memory": "4G"}, interlink={"slurm": {"time": "1", "stop_margin": "10s"}},
        volumes=[{"name": "shared", "mount_path": str(shared), "host_path": str(shared)}],
        mlflow={"tracking_uri": f"sqlite:///{db}", "experiment": "walltime", "credentials": "none"},
        jobs={"hpo": {"entrypoint": f"python paced.py {PACE_S} hpo.py --trials {TRIALS} --epochs {EPOCHS} "
                                    "--samples 2000",
                      "working_dir": str(work), "resume": True, "max_attempts": 12,
                      "env": {"HPCRAY_RESULTS_DIR": str(results)}},
              "long": {"entrypoint": "true", "max_runtime": "10m"}})
    env = {**os.environ, "HPCRAY_STATE_DIR": str(tmp_path / "state")}
    run = subprocess.Popen([sys.executable, "-m", "hpcray.cli", "run", "--json", "-p", str(profile), "hpo"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        shown = None
        deadline = time.monotonic() + 120
        while shown is None and time.monotonic() < deadline and run.poll() is None:
            time.sleep(3)
            status = subprocess.run([sys.executable, "-m", "hpcray.cli", "status", "--json", "-p", str(profile)],
                                    capture_output=True, text=True, env=env)
            found = json.loads(status.stdout) if status.returncode == 0 else {}
            if found.get("time_left_s") is not None:
                shown = (found, subprocess.run([sys.executable, "-m", "hpcray.cli", "status", "-p", str(profile)],
                                               capture_output=True, text=True, env=env).stdout)
        refused = subprocess.run([sys.executable, "-m", "hpcray.cli", "submit", "--must-fit", "-p", str(profile),
                                  "long"], capture_output=True, text=True, env=env)
        out, err = run.communicate(timeout=1500)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
        subprocess.run([sys.executable, "-m", "hpcray.cli", "down", "-p", str(profile)], capture_output=True, env=env)
    assert shown is not None, "status never showed the walltime left"
    assert 0 < shown[0]["time_left_s"] <= 60 and " left" in shown[1] and "walltime " in shown[1], shown
    assert refused.returncode == 2 and "job long has max_runtime 10m but only" in refused.stderr, refused.stderr
    assert run.returncode == 0, err[-6000:]
    report = json.loads(out)
    [job] = report["jobs"]
    assert job["status"] == "SUCCEEDED" and job["attempts"] >= 2, err[-6000:]
    assert "stopping job" in err and "bringing the cluster up again to resume it" in err
    assert "restoring the sweep from" in err
    runs = _mlflow_runs(db)
    parents = [r for r in runs if r[2] is None]
    trials = [r for r in runs if r[2] is not None]
    assert len(parents) == 1 and job["mlflow_run_ids"] == [parents[0][0]], runs
    assert parents[0][1] == "FINISHED", runs
    assert len(trials) == TRIALS and len({t[3] for t in trials}) == TRIALS, runs  # each trial counted once
    assert all(t[2] == parents[0][0] and t[1] == "FINISHED" and t[4] == EPOCHS for t in trials), runs
    print(f"sweep of {EPOCHS} epochs over {job['attempts']} allocations; {len(trials)} trial runs under parent "
          f"{parents[0][0]}")
    print("status:", shown[1], "run:", *[line for line in err.splitlines() if line.startswith(("hpcray", "job "))],
          sep="\n")
