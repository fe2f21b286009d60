"""Accounting: queue wait, run time and GPU-hours per job and per cluster (hpcray/accounting.py), read from the pods
as interLink reports them, logged to the job's MLflow run and shown by `status` and `run` — on the local backend
with real Ray and MLflow, and in the site in a box with SLURM GPUs (`--gres=gpu:N`)."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from hpcray import accounting
from hpcray.accounting import Usage, cluster_usage, gpus_in_flags, job_usage
from tests.fake_site_box import SiteBox
from tests.fixtures_box import site_box  # noqa: F401  (the fixture)
from tests.fixtures_slurm import GPUS, SlurmCluster
from tests.hpcray_cli import run as hpcray
from tests.test_access import box_profile


@dataclass
class Alloc:
    gpus: int
    created_at: float | None
    started_at: float | None
    ended_at: float | None = None


# ---------------------------------------------------------------------------------------------------------------
# The arithmetic
# ---------------------------------------------------------------------------------------------------------------


def test_a_cluster_waits_for_its_last_allocation_and_sums_gpu_hours() -> None:
    head = Alloc(0, created_at=1000, started_at=1030)  # queued 30 s, no GPU
    worker = Alloc(2, created_at=1000, started_at=1090)  # queued 90 s, 2 GPUs for 1 h until now
    gone = Alloc(1, created_at=900, started_at=960, ended_at=960 + 1800)  # 1 GPU for half an hour
    usage = cluster_usage([head, worker, gone], now=1090 + 3600)
    assert usage.queue_wait_s == 90
    assert usage.run_time_s == 1090 + 3600 - 960  # first running to now
    assert usage.gpus == 2  # held now
    assert usage.gpu_hours == pytest.approx(2 * 1 + 1 * 0.5)


def test_a_pod_still_queued_counts_its_wait_so_far_and_no_gpu_time() -> None:
    usage = cluster_usage([Alloc(4, created_at=100, started_at=None)], now=400)
    assert usage == Usage(queue_wait_s=300, run_time_s=None, gpus=0, gpu_hours=0.0)
    assert usage.words() == "queued 5m; not running; 0 GPUs; 0.000 GPU-hours"


def test_a_job_is_charged_the_gpus_held_while_it_ran() -> None:
    allocations = [Alloc(1, 0, 10), Alloc(2, 0, 20, ended_at=1820)]
    usage = job_usage(allocations, start=20, end=20 + 3600, now=5000)
    assert usage.run_time_s == 3600 and usage.gpus == 3 and usage.queue_wait_s == 20
    assert usage.gpu_hours == pytest.approx(1 * 1 + 2 * 0.5)  # the second allocation ended half-way
    assert usage.metrics(accounting.PREFIX) == {"hpcray.queue_wait_s": 20.0, "hpcray.run_time_s": 3600.0,
                                                "hpcray.gpus": 3.0, "hpcray.gpu_hours": 2.0}
    assert job_usage(allocations, start=None, end=None, now=5000).metrics("x.") == {
        "x.queue_wait_s": 20.0, "x.gpus": 0.0, "x.gpu_hours": 0.0}  # no run time: Ray never started it


@pytest.mark.parametrize("flags, gpus", [
    ("-p gpu --gres=gpu:1 --time=230", 1),
    ("--gres=gpu:a100:4,nic:1", 4),
    ("--gres gpu", 1),
    ("--gres=nic:1", None),
    ("--gpus=2", 2),
    ("-G a100:3", 3),
    ("--gpus-per-node 2 --exclusive", 2),
    ("--gres=gpu:1 --gres=gpu:2", 2),  # later wins, as interLink's plugin de-duplicates
    ("-p gpu --time=10", None),
])
def test_gpus_from_the_sbatch_flags_a_pod_carries(flags: str, gpus: int | None) -> None:
    assert gpus_in_flags(flags) == gpus


def test_a_pod_as_interlink_reports_it_gives_its_times_and_gres_gpus() -> None:
    from hpcray.kube import pod_state

    def pod(state: dict[str, Any], limits: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"metadata": {"name": "p", "creationTimestamp": "2026-12-01T10:00:00Z", "labels": {},
                             "annotations": {"slurm-job.vk.io/flags": "-p gpu --gres=gpu:2 --time=10"}},
                "spec": {"containers": [{"name": "ray", "resources": {"limits": limits or {}}}]},
                "status": {"phase": "Running", "containerStatuses": [{"name": "ray", "state": state}]}}

    created = datetime.fromisoformat("2026-12-01T10:00:00+00:00").timestamp()
    running = pod_state(pod({"running": {"startedAt": "2026-12-01T10:02:00Z"}}))
    assert (running.gpus, running.created, running.started, running.ended) == (2, created, created + 120, None)
    ended = pod_state(pod({"terminated": {"exitCode": 0, "startedAt": "2026-12-01T10:02:00Z",
                                          "finishedAt": "2026-12-01T11:02:00Z"}}))
    assert (ended.started, ended.ended) == (created + 120, created + 3720)
    waiting = pod_state(pod({"waiting": {}}))
    assert (waiting.started, waiting.ended) == (None, None)
    limit_only = pod({"waiting": {}}, {"nvidia.com/gpu": "1"})
    limit_only["metadata"]["annotations"] = {}
    assert pod_state(limit_only).gpus == 1  # a regular node's pod: the limit


# ---------------------------------------------------------------------------------------------------------------
# SLURM hands out GPUs in the test cluster
# ---------------------------------------------------------------------------------------------------------------


def _scontrol(cluster: SlurmCluster, jid: str) -> dict[str, str]:
    line = cluster.run("scontrol", "-d", "-o", "show", "job", jid).stdout
    return dict(w.split("=", 1) for w in line.split() if "=" in w)


@pytest.mark.slow
def test_the_test_slurm_node_allocates_gres_gpus(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """`--gres=gpu:2` runs with two GPUs of the node's four (CUDA_VISIBLE_DEVICES, JOB_GRES); five are refused."""
    out = tmp_path / "gpu.out"
    tmp_path.chmod(0o755)
    done = slurm_cluster.run("sbatch", "--gres=gpu:2", "--mem=100", f"--output={out}", "--wrap",
                             "echo CUDA=$CUDA_VISIBLE_DEVICES")
    assert done.returncode == 0, done.stderr
    jid = done.stdout.split()[-1]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _scontrol(slurm_cluster, jid).get("JobState") != "COMPLETED":
        time.sleep(0.2)
    job = _scontrol(slurm_cluster, jid)
    assert job["JobState"] == "COMPLETED" and job["JOB_GRES"] == "gpu:2", job
    assert out.read_text().strip() == "CUDA=0,1"
    refused = slurm_cluster.run("sbatch", f"--gres=gpu:{GPUS + 1}", "--wrap", "true")
    assert refused.returncode != 0 and "Requested node configuration is not available" in refused.stderr


# ---------------------------------------------------------------------------------------------------------------
# End to end: the local backend (real Ray + MLflow), the site in a box (real SLURM GPUs)
# ---------------------------------------------------------------------------------------------------------------

JOB = ("python -c \"import mlflow, time; r = mlflow.start_run(); print('MLFLOW_RUN_ID=' + r.info.run_id, flush=True); "
       "time.sleep({sleep}); mlflow.end_run()\"")


def _run_of(uri: str, run_id: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri).get_run(run_id)


@pytest.mark.slow
def test_a_local_run_logs_its_usage_to_the_jobs_mlflow_run(tmp_path: Path) -> None:
    """Local, with its own MLflow server (usage logged over MLflow's REST API): queue wait 0, the job's GPU-hours =
    the GPUs Ray was given × the job's run time, in the job's MLflow run, in `run --json` and `submit --json`;
    `status` (human and --json) shows the cluster's while it is up."""
    profile = tmp_path / "acct.yaml"
    profile.write_text(yaml.safe_dump({
        "name": "acct", "backend": "local", "local": {"num_cpus": 1, "num_gpus": 2, "mlflow_server": True},
        "mlflow": {"experiment": "acct", "credentials": "none"},
        "jobs": {"work": {"entrypoint": JOB.format(sleep=3)}}}))
    env = {**os.environ, "HPCRAY_STATE_DIR": str(tmp_path / "state"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    try:
        done = hpcray("run", "-p", str(profile), "work", "--keep", "--json", env=env)
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        [job] = report["jobs"]
        assert report["tracking_uri"].startswith("http://127.0.0.1:")
        logged = _run_of(report["tracking_uri"], job["mlflow_run_ids"][0]).data
        status = hpcray("status", "-p", str(profile), "--json", env=env)
        assert status.returncode == 0, status.stderr
        cluster = json.loads(status.stdout)
        human = hpcray("status", "-p", str(profile), env=env)
        submitted = hpcray("submit", "-p", str(profile), "work", "--json", env=env)
        assert submitted.returncode == 0, submitted.stderr
        followed = json.loads(submitted.stdout)
        logged_too = _run_of(report["tracking_uri"], followed["mlflow_run_ids"][0]).data
    finally:
        hpcray("down", "-p", str(profile), env=env)
    assert followed["usage"]["gpus"] == 2 and followed["usage"]["run_time_s"] >= 3
    assert logged_too.metrics["hpcray.gpu_hours"] == pytest.approx(followed["usage"]["gpu_hours"], abs=1e-6)
    assert logged_too.tags["hpcray.submission_id"] == followed["submission_id"]
    usage = job["usage"]
    assert usage["queue_wait_s"] == 0 and usage["gpus"] == 2 and 3 <= usage["run_time_s"] < 30
    assert usage["gpu_hours"] == pytest.approx(2 * usage["run_time_s"] / 3600)
    assert job["cluster_usage"]["run_time_s"] >= usage["run_time_s"]
    assert logged.metrics["hpcray.gpu_hours"] == pytest.approx(usage["gpu_hours"], abs=1e-6)
    assert logged.metrics["hpcray.queue_wait_s"] == 0 and logged.metrics["hpcray.gpus"] == 2
    assert logged.metrics["hpcray.cluster.gpu_hours"] >= logged.metrics["hpcray.gpu_hours"]
    assert logged.tags["hpcray.cluster"] == "acct" and logged.tags["hpcray.submission_id"] == job["submission_id"]
    assert cluster["usage"]["queue_wait_s"] == 0 and cluster["usage"]["gpus"] == 2
    assert cluster["usage"]["gpu_hours"] >= job["cluster_usage"]["gpu_hours"]
    assert "usage: queued 0s; ran " in human.stdout and "2 GPUs" in human.stdout, human.stdout


def _slurm_time(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()  # scontrol's local time


@pytest.mark.slow
def test_gpu_hours_on_interlink_match_slurms_gres_allocations(site_box: SiteBox, tmp_path: Path,  # noqa: F811
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A head and a worker with `--gres=gpu:1` each, offloaded to SLURM: the job's MLflow run gets the cluster's
    GPU-hours = Σ SLURM's JOB_GRES × (the time logged − SLURM's StartTime) within one minute per GPU, the job's =
    its GPUs × its run time; queue waits ≥ 0, no earlier than SLURM started the jobs; `status --json` shows them."""
    monkeypatch.setenv("HPCRAY_STATE_DIR", str(tmp_path / "state"))
    shared = tmp_path / "shared"  # a shared filesystem, bound into the containers as Vega's /ceph is
    shared.mkdir()
    store = f"sqlite:///{shared / 'mlflow.db'}"
    from mlflow.tracking import MlflowClient

    # the experiment made first, with its artifacts beside the store: else the job (no working dir, so in the
    # container's home) would make it with ./mlruns there, outside the test's directory
    MlflowClient(store).create_experiment("gpuacct", artifact_location=(shared / "artifacts").as_uri())
    profile = box_profile(site_box, tmp_path, "gpuacct", head={"cpu": "1", "memory": "2G", "gpus": 1},
                          workers={"gpu": {"replicas": 1, "cpu": "1", "memory": "2G", "gpus": 1}},
                          mlflow={"tracking_uri": store, "experiment": "gpuacct", "credentials": "none"},
                          interlink={"singularity": {"mounts": [str(shared)]}},
                          jobs={"work": {"entrypoint": JOB.format(sleep=20)}})
    assert site_box.api
    try:
        done = hpcray("run", "-p", str(profile), "work", "--keep", "--json", timeout=600)
        assert done.returncode == 0, done.stderr
        [job] = json.loads(done.stdout)["jobs"]
        status = hpcray("status", "-p", str(profile), "--json")
        assert status.returncode == 0, status.stderr
        cluster = json.loads(status.stdout)
        human = hpcray("status", "-p", str(profile)).stdout
        pods = site_box.api.list("pods", labels="ray.io/cluster=gpuacct-kuberay")
        assert site_box.slurm
        slurm = {pod["metadata"]["name"]: _scontrol(site_box.slurm, str(site_box.job_id(pod))) for pod in pods}
    finally:
        hpcray("down", "-p", str(profile))
    assert len(slurm) == 2 and {s["JOB_GRES"] for s in slurm.values()} == {"gpu:1"}, slurm
    from mlflow.tracking import MlflowClient

    run_id = job["mlflow_run_ids"][0]
    metrics = _run_of(store, run_id).data.metrics
    [point] = MlflowClient(store).get_metric_history(run_id, "hpcray.cluster.gpu_hours")
    expected = sum(1 * (point.timestamp / 1000 - _slurm_time(s["StartTime"])) for s in slurm.values()) / 3600
    assert metrics["hpcray.cluster.gpu_hours"] == pytest.approx(expected, abs=2 * 60 / 3600)
    assert metrics["hpcray.gpus"] == 2 and metrics["hpcray.run_time_s"] >= 20
    assert metrics["hpcray.gpu_hours"] == pytest.approx(2 * metrics["hpcray.run_time_s"] / 3600, abs=1e-6)
    assert metrics["hpcray.queue_wait_s"] >= 0 and metrics["hpcray.cluster.queue_wait_s"] >= 0
    print(f"SLURM StartTimes {[s['StartTime'] for s in slurm.values()]}; expected {expected:.6f} GPU-hours; logged "
          f"{json.dumps(metrics, sort_keys=True)}"
          f"\n{done.stderr[-1500:]}\n{human}")
    assert "  usage: queued " in human and "2 GPUs" in human and human.count(" queued ") == 3, human
    nodes = cluster["nodes"]
    assert cluster["usage"]["queue_wait_s"] >= 0 and cluster["usage"]["gpus"] == 2 and len(nodes) == 2
    for n in nodes:
        assert n["gpus"] == 1 and n["created_at"] <= n["started_at"] and n["ended_at"] is None
        slurm_start = _slurm_time(slurm[n["name"]]["StartTime"])
        assert slurm_start - 1 <= n["started_at"] <= slurm_start + 60  # interLink reports it once SLURM runs it
    assert cluster["usage"]["gpu_hours"] >= metrics["hpcray.cluster.gpu_hours"]


def test_usage_for_a_run_that_cannot_take_it_is_a_tracking_error(tmp_path: Path) -> None:
    """A deleted run refuses the metrics: TrackingError (which `run`/`submit` turn into a warning); a live one,
    finished or not, takes them with the timestamp given."""
    from mlflow.tracking import MlflowClient

    from hpcray.errors import TrackingError
    from hpcray.tracking import log_usage

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(store)
    experiment = client.create_experiment("e", artifact_location=(tmp_path / "artifacts").as_uri())
    done, gone = (client.create_run(experiment).info.run_id for _ in range(2))
    client.set_terminated(done)
    client.delete_run(gone)
    log_usage(store, None, [done], {"hpcray.gpu_hours": 0.5}, {"hpcray.cluster": "c"}, timestamp=1000.0)
    [point] = client.get_metric_history(done, "hpcray.gpu_hours")
    assert (point.value, point.timestamp, client.get_run(done).data.tags["hpcray.cluster"]) == (0.5, 1000000, "c")
    with pytest.raises(TrackingError, match="took no usage metrics"):
        log_usage(store, None, [gone], {"hpcray.gpu_hours": 0.5}, {}, timestamp=1000.0)
