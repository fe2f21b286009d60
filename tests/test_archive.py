"""Archive before teardown, on real Ray heads and a real MLflow store: `down` and `run`'s teardown save each job's
log, redacted details and results directory (HPCRAY_RESULTS_DIR) to its MLflow run or the local archive, within
archive_timeout; `hpcray logs` reads the archive once the cluster is gone."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hpcray.archive import RESULTS_VAR, archive_dir
from tests.fake_site_box import SiteBox
from tests.fixtures_box import site_box  # noqa: F401  (the fixture)
from tests.hpcray_cli import run as run_cli
from tests.test_access import box_profile
from tests.test_run import SLOW_JOB, assert_nothing_left, read_until, start, temp_dir_of

EXAMPLES = Path(__file__).resolve().parent.parent / "hpcray" / "examples"
WRITES_RESULTS = (f"python -c \"import os; d = os.environ['{RESULTS_VAR}']; os.makedirs(d + '/trial_0'); "
                  "open(d + '/experiment_state-1.json', 'w').write('{}'); "
                  "open(d + '/trial_0/result.json', 'w').write('{}'); print('results in', d)\"")


def write_profile(tmp_path: Path, jobs: dict[str, dict[str, str]], **extra: object) -> Path:
    path = tmp_path / "archive.yaml"
    path.write_text(yaml.safe_dump({
        "name": "archivetest", "backend": "local", "local": {"num_cpus": 1},
        "mlflow": {"credentials": "none", "experiment": "archive-test"}, "jobs": jobs,
        "archive_timeout": "5m", **extra}))  # a loaded test machine may take more than the default 60s
    return path


def hpcray(tmp_path: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HPCRAY_STATE_DIR": str(tmp_path / "state")}
    return subprocess.run([sys.executable, "-m", "hpcray.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def private(root: Path) -> bool:
    return all(stat.S_IMODE(p.stat().st_mode) & 0o077 == 0 for p in [root, *root.rglob("*")])


@pytest.mark.slow
def test_hpo_results_are_artifacts_of_its_mlflow_run_and_logs_reads_the_archive(tmp_path: Path) -> None:
    prof = write_profile(tmp_path, {"hpo": {"entrypoint": "python hpo.py --trials 2 --epochs 2 --samples 400",
                                            "working_dir": str(EXAMPLES)}})
    done = hpcray(tmp_path, "run", "--profile", str(prof), "hpo", "--json", timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    job = report["jobs"][0]
    run_id, sid = job["mlflow_run_ids"][0], job["submission_id"]
    assert f"archived job {sid} (SUCCEEDED): log, details, " in done.stderr
    assert done.stderr.index(f"archived job {sid}") < done.stderr.index("stopping local cluster")

    from mlflow.tracking import MlflowClient

    client = MlflowClient(report["tracking_uri"])

    def walk(path: str) -> list[str]:
        return [f for a in client.list_artifacts(run_id, path) for f in (walk(a.path) if a.is_dir else [a.path])]

    archived = walk("hpcray-archive")
    assert {"hpcray-archive/logs.txt", "hpcray-archive/job.json"} <= set(archived)
    state = [a for a in archived if a.rsplit("/", 1)[-1].startswith("experiment_state")]
    assert state, archived  # Tune's experiment state, from the head's HPCRAY_RESULTS_DIR
    assert len([a for a in archived if a.endswith("/result.json")]) == 2  # one per trial
    details = json.loads(Path(client.download_artifacts(run_id, "hpcray-archive/job.json", str(tmp_path))).read_text())
    assert details["submission_id"] == sid and details["status"] == "SUCCEEDED"

    logs = hpcray(tmp_path, "logs", "--profile", str(prof), sid)
    assert logs.returncode == 0, logs.stderr
    assert job["highlights"][0] in logs.stdout and f"MLFLOW_RUN_ID={run_id}" in logs.stdout
    assert "archived before the teardown" in logs.stderr and "no local cluster 'archivetest' is up" in logs.stderr


@pytest.mark.reliability(
    case="a job that names no MLflow run, and one carrying a secret-looking env var, at `down`",
    sees="`archived job ID (SUCCEEDED): log, details, 2 result file(s) → ~/.local/share/hpcray/archive/...`",
    remains="the archive: logs.txt, job.json (the secret's value ******), results/, all 0600 in 0700 dirs")
def test_down_archives_locally_without_a_run_redacted_and_private(tmp_path: Path) -> None:
    prof = write_profile(tmp_path, {"res": {"entrypoint": WRITES_RESULTS}})
    assert hpcray(tmp_path, "up", "--profile", str(prof)).returncode == 0
    try:
        sub = hpcray(tmp_path, "submit", "--profile", str(prof), "res")
        assert sub.returncode == 0, sub.stderr
        sid = sub.stdout.split("Running entrypoint for job ", 1)[1].split(":", 1)[0]
        # a job hpcray did not submit, with a secret in its runtime_env (hpcray refuses those; Ray does not)
        from hpcray import flows
        from hpcray.jobs.follow import wait_until_done
        from hpcray.profile import load_profile

        os.environ["HPCRAY_STATE_DIR"] = str(tmp_path / "state")
        try:
            with flows.jobs_api(load_profile(prof), None, print) as api:
                other = api.submit({"entrypoint": "echo other", "runtime_env": {"env_vars": {"API_TOKEN": "s3cr3t"}}})
                assert wait_until_done(api, other, 60) == "SUCCEEDED"
        finally:
            del os.environ["HPCRAY_STATE_DIR"]

        dry = hpcray(tmp_path, "down", "--profile", str(prof), "--dry-run")
        assert "would archive every job on the cluster first" in dry.stdout and RESULTS_VAR in dry.stdout
    finally:
        down = hpcray(tmp_path, "down", "--profile", str(prof))
    assert down.returncode == 0, down.stderr
    root = archive_dir() / "archivetest"
    assert f"archived job {sid} (SUCCEEDED): log, details, 2 result file(s) → {root / sid}" in down.stderr
    assert (root / sid / "results" / "experiment_state-1.json").read_text() == "{}"
    assert (root / sid / "results" / "trial_0" / "result.json").is_file()
    assert "results in" in (root / sid / "logs.txt").read_text()
    assert json.loads((root / other / "job.json").read_text())["runtime_env"]["env_vars"]["API_TOKEN"] == "******"
    assert "s3cr3t" not in "".join(p.read_text() for p in root.rglob("*") if p.is_file())
    assert private(archive_dir())
    kinds = [json.loads(p.read_text())["metadata"] or {} for p in root.glob("*/job.json")]  # other tests' jobs too
    assert kinds and not [m for m in kinds if m.get("hpcray") == "archive"]  # the archive job is not archived


@pytest.mark.reliability(
    case="fault: the archive cannot finish within archive_timeout (`down`)",
    sees="`hpcray: warning: archiving the jobs of 'archivetest' did not finish within 0.2 s (archive_timeout); "
         "tearing down anyway …`, exit 0",
    remains="nothing: no Ray process, no state file")
def test_an_archive_out_of_time_still_tears_down_with_a_warning(tmp_path: Path) -> None:
    prof = write_profile(tmp_path, {"res": {"entrypoint": WRITES_RESULTS}}, archive_timeout="0.2s")
    assert hpcray(tmp_path, "up", "--profile", str(prof)).returncode == 0
    temp_dir = temp_dir_of(tmp_path, prof)
    try:
        assert hpcray(tmp_path, "submit", "--profile", str(prof), "res").returncode == 0
    finally:
        down = hpcray(tmp_path, "down", "--profile", str(prof))
    assert down.returncode == 0, down.stderr
    assert "hpcray: warning: archiving the jobs of 'archivetest' did not finish within 0.2 s (archive_timeout); " \
           "tearing down anyway" in down.stderr
    assert "archivetest: removed" in down.stdout
    assert_nothing_left(tmp_path, temp_dir)


def test_no_archive_skips_it(tmp_path: Path) -> None:
    prof = write_profile(tmp_path, {"res": {"entrypoint": WRITES_RESULTS}})
    assert hpcray(tmp_path, "up", "--profile", str(prof)).returncode == 0
    try:
        sub = hpcray(tmp_path, "submit", "--profile", str(prof), "res")
        sid = sub.stdout.split("Running entrypoint for job ", 1)[1].split(":", 1)[0]
        dry = hpcray(tmp_path, "down", "--profile", str(prof), "--dry-run", "--no-archive")
        assert "would archive" not in dry.stdout and "would stop the Ray head" in dry.stdout
    finally:
        down = hpcray(tmp_path, "down", "--profile", str(prof), "--no-archive")
    assert down.returncode == 0 and "archived" not in down.stderr
    assert not (archive_dir() / "archivetest" / sid).exists()
    logs = hpcray(tmp_path, "logs", "--profile", str(prof), sid)
    assert logs.returncode == 2 and "no local cluster 'archivetest' is up" in logs.stderr


@pytest.mark.reliability(
    case="fault: Ctrl-C during `hpcray run` while a job runs",
    sees="`stopping job slow …`, `archived job ID (STOPPED): …`, the teardown, `interrupted by SIGINT`; exit 130",
    remains="the job's log in the archive (`hpcray logs ID` prints it); no Ray process, no state file")
def test_ctrl_c_during_run_archives_then_tears_down(tmp_path: Path) -> None:
    prof = tmp_path / "run.yaml"
    prof.write_text(yaml.safe_dump({"name": "runtest", "backend": "local", "local": {"num_cpus": 1},
                                    "mlflow": {"credentials": "none"}, "jobs": {"slow": {"entrypoint": SLOW_JOB}}}))
    proc = start(tmp_path, prof, "slow")
    seen = read_until(proc, r"tick")
    sid = seen.split("submitted as ", 1)[1].split()[0]
    temp_dir = temp_dir_of(tmp_path, prof)
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=180)
    output = seen + rest
    assert proc.returncode == 130, output
    assert output.index("stopping job slow") < output.index(f"archived job {sid} (STOPPED)") \
        < output.index("stopping local cluster") < output.index("interrupted by SIGINT")
    assert_nothing_left(tmp_path, temp_dir)
    logs = hpcray(tmp_path, "logs", "--profile", str(prof), sid)
    assert logs.returncode == 0 and "job started" in logs.stdout and "tick" in logs.stdout


def test_down_of_a_kuberay_cluster_on_interlink_archives_through_the_jobs_api(
        site_box: SiteBox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """The KubeRay path: a head pod on interLink's virtual node (a SLURM job), reached only through the API server's
    service proxy (its kubelet refuses port-forward and exec): the results directory still comes back, packed by the
    archive job on the head."""
    monkeypatch.setenv("HPCRAY_STATE_DIR", str(tmp_path / "state"))
    prof = box_profile(site_box, tmp_path, "arch", workers={"cpu": {"replicas": 0, "cpu": "1", "memory": "2G"}},
                       jobs={"res": {"entrypoint": WRITES_RESULTS}})
    up = run_cli("up", "-p", str(prof))
    assert up.returncode == 0, up.stderr
    try:
        sub = run_cli("submit", "-p", str(prof), "res")
        assert sub.returncode == 0, sub.stderr
        sid = sub.stdout.split("Running entrypoint for job ", 1)[1].split(":", 1)[0]
        assert "results in /tmp/ray/hpcray-results/res-" in sub.stdout
    finally:
        down = run_cli("down", "-p", str(prof))
    assert down.returncode == 0, down.stderr
    job = archive_dir() / "arch" / sid
    assert f"archived job {sid} (SUCCEEDED): log, details, 2 result file(s) → {job}" in down.stderr
    assert down.stderr.index("archived job") < down.stderr.index("uninstall")
    assert (job / "results" / "trial_0" / "result.json").is_file()
    assert site_box.api is not None and not site_box.api.list("pods", labels="ray.io/cluster=arch-kuberay")
    logs = run_cli("logs", "-p", str(prof), sid)
    assert logs.returncode == 0 and "results in /tmp/ray/hpcray-results/res-" in logs.stdout, logs.stderr
    assert "archived before the teardown" in logs.stderr
