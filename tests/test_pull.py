"""`hpcray pull`: the SIF lands under exactly `<dir>/<name>:<tag>`, never half-written there, here (a fake singularity
on PATH) and through a real SLURM cluster (sbatch/slurmd from tests/fixtures_slurm.py)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcray import images, slurm
from hpcray.profile import load_profile
from tests.fixtures_slurm import SlurmCluster
from tests.hpcray_cli import call as hpcray

REPO = Path(__file__).resolve().parent.parent
FAKE = REPO / "tests" / "fake_singularity"
SOURCE = "docker://ghcr.io/intertwin-eu/hython-itwinai-plugin:latest"
FAKE_SIZE = 10 * 4096 + sum(len(f"fake SIF of {SOURCE}, chunk {i} of 10\n") for i in range(1, 11))


def scancel(job_id: str) -> None:
    subprocess.run(["scancel", job_id], check=True, capture_output=True)


def write_profile(tmp_path: Path, sif_dir: Path, slurm_keys: str = "{}", extra: str = "") -> Path:
    path = tmp_path / "hython.yaml"
    path.write_text(f"name: hython\nimage: {{dir: {sif_dir}, name: hython, tag: sif, source: '{SOURCE}'}}\n"
                    f"head: {{cpu: '2', memory: 4G}}\ninterlink: {{slurm: {slurm_keys}{extra}}}\n")
    return path


def fake_bin(tmp_path: Path, name: str = "singularity") -> Path:
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    (d / name).symlink_to(FAKE)
    return d


def spawn(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    """hpcray as a separate process (while the test watches files or cancels the job)."""
    return subprocess.Popen([sys.executable, "-m", "hpcray.cli", *args], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **env})


def pulls(log: Path) -> list[str]:
    """The `pull` commands the fake ran (spython also asks it for --version)."""
    return [ln for ln in log.read_text().splitlines() if " pull " in ln]


def sif_files(sif_dir: Path) -> list[str]:
    return sorted(p.name for p in sif_dir.glob("hython:sif*"))


# ---------------------------------------------------------------------------------------------------------------
# The batch script
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("slurm_keys,expected", [
    ("{}", []),
    ("{partition: gpu, time: '230'}", ["--partition=gpu", "--time=230"]),
    ("{partition: gpu, time: '01:00:00', account: s24r05-03-users, qos: long}",
     ["--partition=gpu", "--time=01:00:00", "--account=s24r05-03-users", "--qos=long"]),
])
def test_script_is_bash_and_has_only_the_flags_the_profile_sets(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], slurm_keys: str, expected: list[str]) -> None:
    profile = write_profile(tmp_path, tmp_path / "sif", slurm_keys)
    code, script, err = hpcray(capsys, "pull", "--profile", str(profile), "--print")
    assert (code, err) == (0, "")
    flags = re.findall(r"^#SBATCH (\S+)", script, re.M)
    assert flags == ["--job-name=hpcray-pull-hython", f"--output={tmp_path}/sif/.hpcray-pull-%j.log", *expected]
    assert f"final={tmp_path}/sif/hython:sif\n" in script
    assert "set -euo pipefail" in script and 'mv -f -- "$partial" "$final"' in script
    (tmp_path / "pull.sh").write_text(script)
    assert subprocess.run(["bash", "-n", str(tmp_path / "pull.sh")], capture_output=True).returncode == 0
    assert not (tmp_path / "sif").exists(), "--print must not touch the image dir"


@pytest.mark.reliability(
    case="bad input: an sbatch value with spaces (interlink.slurm.partition) via pull --print",
    sees="`interlink.slurm.partition: 'gpu --exclusive' is not a single sbatch value …`, exit 2",
    remains="nothing")
def test_a_flag_value_that_would_break_the_script_is_refused(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    profile = write_profile(tmp_path, tmp_path / "sif", "{partition: 'gpu --exclusive'}")
    code, out, err = hpcray(capsys, "pull", "--profile", str(profile), "--print")
    assert (code, out) == (2, "")
    assert "interlink.slurm.partition: 'gpu --exclusive' is not a single sbatch value" in err
    assert len(err.strip().splitlines()) == 1


def test_ray_def_pins_the_clients_ray_and_python() -> None:
    import ray
    from spython.main.parse.parsers import SingularityParser

    [recipe] = SingularityParser(str(REPO / "containers" / "ray.def")).recipe.values()
    assert recipe.fromHeader.startswith("nvidia/cuda:")
    install = "\n".join(recipe.install)
    pins = re.findall(r"ray\[[\w,]+\]==([\w.]+)|ray\.version ([\w.]+)|ray\.__version__ == '([\w.]+)'",
                      (REPO / "containers" / "ray.def").read_text())
    assert {v for m in pins for v in m if v} == {ray.__version__}
    assert len(pins) == 3
    assert f"python3.{sys.version_info.minor} -m venv" in install and "itwinai" in install and "mlflow==" in install


# ---------------------------------------------------------------------------------------------------------------
# Here, through spython and a fake singularity
# ---------------------------------------------------------------------------------------------------------------


def test_local_pull_writes_the_file_then_skips_then_force_pulls_again(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    sif = tmp_path / "sif"
    profile = write_profile(tmp_path, sif)
    monkeypatch.setenv("PATH", f"{fake_bin(tmp_path)}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SINGULARITY_LOG", str(tmp_path / "calls"))

    code, out, err = hpcray(capsys, "pull", "--profile", str(profile))
    assert code == 0, err
    assert out == f"{sif}/hython:sif\n"
    assert (sif / "hython:sif").stat().st_size == FAKE_SIZE
    assert "Converting OCI blobs" in err  # singularity's progress, on stderr
    [call] = pulls(tmp_path / "calls")
    assert re.fullmatch(rf"singularity pull --name {sif}/hython:sif\.partial\.\d+ --force {re.escape(SOURCE)}", call)

    code, out, err = hpcray(capsys, "pull", "--profile", str(profile), "--json")
    assert code == 0 and json.loads(out)["pulled"] is False and "present" in err
    assert len(pulls(tmp_path / "calls")) == 1

    code, out, _ = hpcray(capsys, "pull", "--profile", str(profile), "--force", "--json")
    assert code == 0 and json.loads(out)["pulled"] is True
    assert len(pulls(tmp_path / "calls")) == 2
    assert sif_files(sif) == ["hython:sif"]


def test_local_pull_with_only_apptainer(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    profile = write_profile(tmp_path, tmp_path / "sif")
    monkeypatch.setenv("PATH", f"{fake_bin(tmp_path, 'apptainer')}{os.pathsep}/usr/bin{os.pathsep}/bin")
    code, out, err = hpcray(capsys, "pull", "--profile", str(profile))
    assert code == 0, err
    assert (tmp_path / "sif" / "hython:sif").stat().st_size == FAKE_SIZE


@pytest.mark.parametrize("env,expected", [
    ({"FAKE_SINGULARITY_FAIL": "manifest unknown"}, "singularity pull " + SOURCE + " failed (exit code 255): "),
    ({"FAKE_SINGULARITY_EMPTY": "1"}, "ended without error but wrote nothing"),
], ids=["runtime-fails", "runtime-writes-nothing"])
@pytest.mark.reliability(
    case="fault: singularity pull fails, or succeeds without writing the file",
    sees="`singularity pull SOURCE failed (exit code 255): …` / `… ended without error but wrote nothing to …`, "
         "exit 2",
    remains="no SIF file and no partial file")
def test_local_pull_failure_is_one_line_and_leaves_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        env: dict[str, str], expected: str) -> None:
    sif = tmp_path / "sif"
    profile = write_profile(tmp_path, sif)
    monkeypatch.setenv("PATH", f"{fake_bin(tmp_path)}{os.pathsep}{os.environ['PATH']}")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    code, out, err = hpcray(capsys, "pull", "--profile", str(profile))
    assert (code, out) == (2, "")
    last = err.strip().splitlines()[-1]
    assert last.startswith("hpcray: error: ") and expected in last
    if "FAKE_SINGULARITY_FAIL" in env:
        assert "manifest unknown" in last
    assert sif_files(sif) == []


@pytest.mark.reliability(
    case="bad input: neither singularity nor apptainer on PATH via pull",
    sees="`neither singularity nor apptainer is on PATH; …`, exit 2",
    remains="nothing")
def test_no_singularity_on_path_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    profile = write_profile(tmp_path, tmp_path / "sif")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    code, out, err = hpcray(capsys, "pull", "--profile", str(profile))
    assert (code, out) == (2, "")
    assert err.startswith("hpcray: error: neither singularity nor apptainer is on PATH;")
    assert len(err.strip().splitlines()) == 1


@pytest.mark.reliability(
    case="bad input: no sbatch on PATH via pull --slurm",
    sees="`sbatch not found on PATH; …`, exit 2",
    remains="nothing")
def test_no_sbatch_on_path_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    profile = write_profile(tmp_path, tmp_path / "sif")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    code, out, err = hpcray(capsys, "pull", "--profile", str(profile), "--slurm")
    assert (code, out) == (2, "")
    assert err.startswith("hpcray: error: sbatch not found on PATH;")
    assert len(err.strip().splitlines()) == 1


def test_up_warning_only_when_the_dir_is_visible_and_lacks_the_file(tmp_path: Path) -> None:
    p = load_profile(write_profile(tmp_path, tmp_path / "sif"))
    assert images.sif_known_missing(p) is None  # the dir is not on this machine: cannot tell
    (tmp_path / "sif").mkdir()
    warning = images.sif_known_missing(p)
    assert warning is not None and f"{tmp_path}/sif/hython:sif does not exist" in warning
    assert "hpcray pull" in warning
    (tmp_path / "sif" / "hython:sif").write_bytes(b"SIF")
    assert images.sif_known_missing(p) is None


# ---------------------------------------------------------------------------------------------------------------
# On a real SLURM cluster
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def job_env(slurm_env: SlurmCluster, tmp_path: Path) -> dict[str, str]:
    """The environment hpcray (and, through sbatch's default --export=ALL, the job) runs with."""
    return {"SLURM_CONF": str(slurm_env.conf),
            "PATH": f"{fake_bin(tmp_path)}{os.pathsep}{os.environ['PATH']}"}


def test_slurm_pull_writes_the_exact_file_then_skips(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        job_env: dict[str, str]) -> None:
    sif = tmp_path / "sif"
    profile = write_profile(tmp_path, sif, "{partition: gpu, time: '5'}")
    for k, v in job_env.items():
        monkeypatch.setenv(k, v)

    code, out, err = hpcray(capsys, "pull", "--profile", str(profile), "--slurm", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["path"] == f"{sif}/hython:sif" and result["pulled"] is True
    assert (sif / "hython:sif").read_bytes().startswith(f"fake SIF of {SOURCE}".encode())
    assert (sif / "hython:sif").stat().st_size == FAKE_SIZE
    assert sif_files(sif) == ["hython:sif"] and not list(sif.glob(".hpcray-pull-*.log"))
    assert f"submitted SLURM job {result['job_id']}" in err and f"job {result['job_id']}: COMPLETED" in err
    job = slurm.show(result["job_id"])
    assert job is not None and job.fields["Partition"] == "gpu" and job.fields["TimeLimit"] == "00:05:00"

    # hpcray sees the file and submits nothing …
    code, out, err = hpcray(capsys, "pull", "--profile", str(profile), "--slurm")
    assert code == 0 and out == f"{sif}/hython:sif\n" and "submitted" not in err and "present" in err
    # … and the script itself skips a present file (another job may have pulled it meanwhile).
    mtime = (sif / "hython:sif").stat().st_mtime_ns
    job_id = slurm.submit(images.render_pull_script(load_profile(profile)))
    assert slurm.wait(job_id, timeout=30, say=lambda _: None).ok
    assert "hpcray-pull: skipped" in (sif / f".hpcray-pull-{job_id}.log").read_text()
    assert (sif / "hython:sif").stat().st_mtime_ns == mtime


@pytest.mark.reliability(
    case="fault: the SLURM pull job fails",
    sees="`pulling SOURCE into FILE: SLURM job N ended FAILED (exit code 255); its output ends: …; full output in "
         "LOG`, exit 2",
    remains="the job's output file; no SIF file or partial")
def test_failing_slurm_pull_reports_the_jobs_output_and_exit_code(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        job_env: dict[str, str]) -> None:
    sif = tmp_path / "sif"
    profile = write_profile(tmp_path, sif)
    for k, v in {**job_env, "FAKE_SINGULARITY_FAIL": "manifest unknown"}.items():
        monkeypatch.setenv(k, v)
    code, out, err = hpcray(capsys, "pull", "--profile", str(profile), "--slurm")
    assert (code, out) == (2, "")
    last = err.strip().splitlines()[-1]
    assert re.search(r"hpcray: error: pulling \S+ into \S+/hython:sif: SLURM job \d+ ended FAILED \(exit code 255\)",
                     last), last
    assert "FATAL: While making image from oci registry: manifest unknown" in last
    log = re.search(r"full output in (\S+)$", last)
    assert log and Path(log.group(1)).is_file()
    assert sif_files(sif) == []


@pytest.mark.reliability(
    case="fault: the SIF is read while the SLURM job pulls it",
    sees="the final name appears only once the image is complete",
    remains="the complete SIF only")
def test_a_half_written_image_never_has_the_final_name(tmp_path: Path, job_env: dict[str, str]) -> None:
    sif = tmp_path / "sif"
    profile = write_profile(tmp_path, sif)
    proc = spawn(tmp_path, {**job_env, "FAKE_SINGULARITY_DELAY": "2"}, "pull", "--profile", str(profile), "--slurm")
    partial_sizes: set[int] = set()
    while proc.poll() is None:
        for p in sif.glob("hython:sif*"):
            try:
                size = p.stat().st_size
            except FileNotFoundError:
                continue  # renamed between glob and stat
            if p.name == "hython:sif":
                assert size == FAKE_SIZE, f"the final name held {size} of {FAKE_SIZE} bytes"
            else:
                partial_sizes.add(size)
        time.sleep(0.01)
    _, err = proc.communicate()
    assert proc.returncode == 0, err
    assert any(0 < s < FAKE_SIZE for s in partial_sizes), "never saw the pull in progress"
    assert sif_files(sif) == ["hython:sif"]


@pytest.mark.reliability(
    case="fault: the SLURM pull job is cancelled (scancel)",
    sees="`… SLURM job N ended CANCELLED …`, exit 2",
    remains="no SIF file and no partial file")
def test_a_cancelled_pull_leaves_no_final_file_and_no_partial(tmp_path: Path, slurm_env: SlurmCluster,
                                                              job_env: dict[str, str]) -> None:
    sif = tmp_path / "sif"
    profile = write_profile(tmp_path, sif)
    proc = spawn(tmp_path, {**job_env, "FAKE_SINGULARITY_DELAY": "30"}, "pull", "--profile", str(profile), "--slurm")
    deadline = time.monotonic() + 20
    while not list(sif.glob("hython:sif.partial.*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    [partial] = sif.glob("hython:sif.partial.*")
    job_id = partial.name.rsplit(".", 1)[1]
    scancel(job_id)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert re.search(rf"SLURM job {job_id} ended CANCELLED", err), err
    assert job_id not in slurm_env.jobs()
    assert sif_files(sif) == []


@pytest.mark.reliability(
    case="fault: the SLURM pull outlasts --timeout",
    sees="`job N is still RUNNING after 1 s and keeps going: follow it with `scontrol show job N`, stop it with "
         "`scancel N``, exit 4",
    remains="the SLURM job, still running (as said)")
def test_waiting_past_the_timeout_exits_4_and_leaves_the_job_running(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        slurm_env: SlurmCluster, job_env: dict[str, str]) -> None:
    profile = write_profile(tmp_path, tmp_path / "sif")
    for k, v in {**job_env, "FAKE_SINGULARITY_DELAY": "30"}.items():
        monkeypatch.setenv(k, v)
    code, out, err = hpcray(capsys, "pull", "--profile", str(profile), "--slurm", "--timeout", "1s")
    assert (code, out) == (4, "")
    m = re.search(r"job (\d+) is still \w+ after 1 s and keeps going: .*`scancel \1`", err)
    assert m, err
    assert m.group(1) in slurm_env.jobs()
    scancel(m.group(1))


def test_wait_reports_state_changes_and_progress_while_running(tmp_path: Path, slurm_env: SlurmCluster) -> None:
    job_id = slurm.submit(f"#!/bin/bash\n#SBATCH --output={tmp_path}/out.log\nsleep 1.5\n")
    said: list[str] = []
    ticks = iter(range(1, 100))
    job = slurm.wait(job_id, timeout=30, say=said.append, detail=lambda _: f"tick {next(ticks)}", every=0.3)
    assert job.ok and job.exit_status == (0, 0)
    assert said[-1] == f"job {job_id}: COMPLETED"
    assert f"job {job_id}: RUNNING on hpcraytest" in said
    assert any(re.fullmatch(rf"job {job_id}: RUNNING on hpcraytest, tick \d+", s) for s in said), said


@pytest.mark.reliability(
    case="bad input: a partition SLURM does not know via pull --slurm",
    sees="`sbatch refused the job: Batch job submission failed: Invalid partition name specified; check "
         "interlink.slurm (…) in FILE`, exit 2",
    remains="nothing")
def test_sbatch_refusal_names_the_profile_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch, job_env: dict[str, str]) -> None:
    profile = write_profile(tmp_path, tmp_path / "sif", "{partition: nope}")
    for k, v in job_env.items():
        monkeypatch.setenv(k, v)
    code, out, err = hpcray(capsys, "pull", "--profile", str(profile), "--slurm")
    assert (code, out) == (2, "")
    assert err == (f"hpcray: error: sbatch refused the job: Batch job submission failed: Invalid partition name "
                   f"specified; check interlink.slurm (partition, time, account, qos) in {profile}\n")


@pytest.mark.reliability(
    case="fault: Ctrl-C while waiting for the SLURM pull",
    sees="`job N keeps running; `scancel N` stops it`, exit 130",
    remains="the SLURM job, still running (as said)")
def test_ctrl_c_while_waiting_says_the_job_keeps_running(tmp_path: Path, slurm_env: SlurmCluster,
                                                         job_env: dict[str, str]) -> None:
    profile = write_profile(tmp_path, tmp_path / "sif")
    proc = spawn(tmp_path, {**job_env, "FAKE_SINGULARITY_DELAY": "30"}, "pull", "--profile", str(profile), "--slurm")
    assert proc.stderr is not None
    submitted = proc.stderr.readline()
    job_id = re.search(r"submitted SLURM job (\d+)", submitted)
    assert job_id, submitted
    while not list((tmp_path / "sif").glob("hython:sif.partial.*")):  # hpcray is waiting on a running job
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert f"job {job_id.group(1)} keeps running; `scancel {job_id.group(1)}` stops it" in err
    assert job_id.group(1) in slurm_env.jobs()
    scancel(job_id.group(1))
