"""`hpcray run` on the local backend: real Ray heads, teardown guaranteed on failure and on signals."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcray.backends.local import find_leftovers
from hpcray.profile import load_profile
from tests.fixtures_servers import local_backend

REPO = Path(__file__).resolve().parent.parent
SLOW_JOB = "python -c \"import time; print('job started', flush=True); [time.sleep(0.5) or print('tick', flush=True) for _ in range(120)]\""


def profile(tmp_path: Path, jobs: dict[str, str]) -> Path:
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "name": "runtest", "backend": "local", "local": {"num_cpus": 1}, "mlflow": {"credentials": "none"},
        "jobs": {name: {"entrypoint": entrypoint} for name, entrypoint in jobs.items()}}))
    return path


def start(tmp_path: Path, prof: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "HPCRAY_STATE_DIR": str(tmp_path / "state")}
    return subprocess.Popen([sys.executable, "-m", "hpcray.cli", "run", "--profile", str(prof), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def read_until(proc: subprocess.Popen[str], pattern: str, timeout: float = 120) -> str:
    assert proc.stdout is not None
    seen = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen += line
        if re.search(pattern, line):
            return seen
    raise AssertionError(f"never saw {pattern!r}; output so far:\n{seen}")


def temp_dir_of(tmp_path: Path, prof: Path) -> str:
    """The temp dir of the profile's local head: LocalBackend derives it from the state dir `start` gives hpcray."""
    return local_backend(load_profile(prof), tmp_path / "state").temp_dir


def assert_nothing_left(tmp_path: Path, temp_dir: str) -> None:
    assert find_leftovers(temp_dir) == [], "Ray processes of the run are still alive"
    assert not list((tmp_path / "state").glob("*/local.json")), "a local cluster is still recorded"


PHASES = {
    "during-up": r"starting Ray head",
    "job-submitted": r"job slow: submitted as",
    "following-logs": r"tick",
}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("phase", list(PHASES))
@pytest.mark.reliability(
    case="fault: SIGINT/SIGTERM during `hpcray run` (head starting, job submitted, logs followed)",
    sees="`stopping job slow …`, the teardown, `interrupted by SIGINT` / `SIGTERM`; exit 130 / 143",
    remains="nothing: no Ray process, no state file")
def test_signal_tears_everything_down(tmp_path: Path, phase: str, sig: signal.Signals) -> None:
    prof = profile(tmp_path, {"slow": SLOW_JOB})
    proc = start(tmp_path, prof, "slow")
    seen = read_until(proc, PHASES[phase])
    temp_dir = temp_dir_of(tmp_path, prof)
    proc.send_signal(sig)
    rest, _ = proc.communicate(timeout=120)
    output = seen + rest
    assert proc.returncode == 128 + sig, output
    assert f"interrupted by {sig.name}" in output
    if phase != "during-up":
        assert "stopping job slow" in output
    assert "Traceback" not in output
    assert_nothing_left(tmp_path, temp_dir)


@pytest.mark.reliability(
    case="fault: a job of `hpcray run` fails",
    sees="each job's result in the summary (`bad: FAILED`), `cluster torn down`; exit 1",
    remains="nothing: no Ray process, no state file")
def test_failing_job_exits_1_and_still_tears_down(tmp_path: Path) -> None:
    prof = profile(tmp_path, {"ok": "python -c 'print(42)'", "bad": "python -c 'import sys; sys.exit(3)'"})
    proc = start(tmp_path, prof, "ok", "bad")
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 1, output
    assert "ok: SUCCEEDED" in output and "bad: FAILED" in output
    assert "cluster torn down" in output
    assert_nothing_left(tmp_path, temp_dir_of(tmp_path, prof))


@pytest.mark.reliability(
    case="bad input: unknown job of `hpcray run` (a subprocess)",
    sees="`FILE: jobs.okk: no such job in the profile; its jobs are: ok`, exit 2",
    remains="nothing: no Ray head was started")
def test_unknown_job_fails_before_anything_starts(tmp_path: Path) -> None:
    proc = start(tmp_path, profile(tmp_path, {"ok": "true"}), "okk")
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "jobs.okk: no such job in the profile; its jobs are: ok" in output
    assert "starting Ray head" not in output


def test_keep_leaves_the_cluster_up(tmp_path: Path) -> None:
    prof = profile(tmp_path, {"ok": "python -c 'print(42)'"})
    proc = start(tmp_path, prof, "ok", "--keep")
    output, _ = proc.communicate(timeout=180)
    temp_dir = temp_dir_of(tmp_path, prof)
    try:
        assert proc.returncode == 0, output
        assert "cluster kept up" in output
        assert find_leftovers(temp_dir), "--keep should leave the head running"
    finally:
        env = {**os.environ, "HPCRAY_STATE_DIR": str(tmp_path / "state")}
        subprocess.run([sys.executable, "-m", "hpcray.cli", "down", "--profile", str(prof)], env=env, timeout=120)
    assert_nothing_left(tmp_path, temp_dir)


def test_the_summary_reads_the_job_output_contract_once_per_line_across_chunks() -> None:
    """Lines arrive in chunks cut anywhere; each complete line is read once, the last one even without a newline."""
    import io

    from hpcray.flows import JobOutput, JobResult

    run_a, run_b = "a" * 32, "b" * 32
    text = (f"epoch 1\nMLFLOW_RUN_ID={run_a}\nsome MLFLOW_RUN_ID={'c' * 32} mid-line is no contract\n"
            f"best trial: val_loss 0.1 with {{'lr': 0.1}}\nMLFLOW_RUN_ID={run_a}\r\nnot best trial: x\n"
            f"MLFLOW_RUN_ID={run_b}")
    out, result = io.StringIO(), JobResult("j")
    output = JobOutput(out, result)
    for i in range(0, len(text), 7):
        output.write(text[i:i + 7])
    assert result.mlflow_run_ids == [run_a]  # the last line is not complete yet
    output.close()
    assert out.getvalue() == text  # passed through unchanged
    assert result.mlflow_run_ids == [run_a, run_b]
    assert result.highlights == ["best trial: val_loss 0.1 with {'lr': 0.1}"]
