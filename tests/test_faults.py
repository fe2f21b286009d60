"""Faults while hpcray works, each with what the user sees and what is left behind.

Covered elsewhere (and listed in docs/RELIABILITY.md from there): the API server dropping the readiness watch and
restarting, two `up` of one profile at once, `down` while pods are still terminating, a release a killed helm left
pending (tests/test_lifecycle.py); signals during `hpcray run` (tests/test_run.py). Here: the Ray head dying in the
middle of a job of `hpcray run`, and helm really killed in the middle of an install.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest
from aiohttp import web

from hpcray.backends.local import find_leftovers
from tests.fake_kube_api import MINIMAL_RAYCLUSTER_CRD, FakeKubeAPI, Resource
from tests.test_lifecycle import helm_releases, pods, write_profile
from tests.test_run import assert_nothing_left, profile, read_until, start, temp_dir_of

TICKING_JOB = ("python -c \"import time; print('job started', flush=True); "
               "[time.sleep(0.5) or print('tick', flush=True) for _ in range(240)]\"")


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for its (here: foreign) parent to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("hpcray: error: ")]


# ---------------------------------------------------------------------------------------------------------------
# The Ray head dies while `hpcray run` follows a job
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.reliability(
    case="fault: the Ray head dies mid-job during `hpcray run` (local backend)",
    sees="`hpcray: error: cluster 'runtest' went away while job slow (ID) was running: … the head process PID is "
         "gone; see …/head.log …`, after the teardown lines; exit 2",
    remains="nothing: the orphaned job process is killed, no Ray process, no state file")
def test_ray_head_dies_mid_job_in_run(tmp_path: Path) -> None:
    prof = profile(tmp_path, {"slow": TICKING_JOB})
    proc = start(tmp_path, prof, "slow")
    seen = read_until(proc, r"^tick")
    temp_dir = temp_dir_of(tmp_path, prof)
    # The head's own processes (`ray start`, GCS, raylet, dashboard …) name its temp dir on their command line; the
    # job's entrypoint does not (it only carries the marker in its environment), so it outlives the head.
    head = [pid for pid in find_leftovers(temp_dir) if temp_dir.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()]
    job = set(find_leftovers(temp_dir)) - set(head)
    assert head and job, (head, job)
    for pid in head:
        os.kill(pid, signal.SIGKILL)
    rest, _ = proc.communicate(timeout=120)
    output = seen + rest
    assert proc.returncode == 2, output
    [line] = error_lines(output)
    assert output.rstrip().splitlines()[-1] == line, "the error is the last line, after the teardown"
    assert line.startswith("hpcray: error: cluster 'runtest' went away while job slow (raysubmit_"), line
    assert "head.log" in line and "Traceback" not in output
    assert "stopping local cluster 'runtest'" in output and "stopped after" in output
    assert_nothing_left(tmp_path, temp_dir)
    assert not [pid for pid in job if alive(pid)], "the job's process outlived the teardown"


# ---------------------------------------------------------------------------------------------------------------
# helm killed in the middle of an install, for real
# ---------------------------------------------------------------------------------------------------------------


class StallingKubeAPI(FakeKubeAPI):
    """Holds every write to a RayCluster while `stall` is set (as a slow admission webhook would), so a test can
    kill helm at a known point: after it recorded the release as pending-install, before it finished."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.stall, self.stalled = threading.Event(), threading.Event()

    async def _verb(self, request: web.Request, res: Resource, ns: str | None, name: str,
                    sub: str) -> web.StreamResponse:
        if res.plural == "rayclusters" and request.method != "GET":
            while self.stall.is_set():
                self.stalled.set()
                await asyncio.sleep(0.05)
        return await super()._verb(request, res, ns, name, sub)


@pytest.fixture
def stalling_api(charts_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[StallingKubeAPI]:
    monkeypatch.setenv("HPCRAY_STATE_DIR", str(tmp_path / "state"))
    crd = tmp_path / "rayclusters.json"
    crd.write_text(json.dumps(MINIMAL_RAYCLUSTER_CRD))
    with StallingKubeAPI(crds=[crd]) as api:
        yield api
    assert api.operator is not None and not api.operator.errors


def children(pid: int, needle: bytes) -> list[int]:
    """Child processes of pid whose command line contains needle."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid == pid and needle in Path(f"/proc/{entry.name}/cmdline").read_bytes():
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


@pytest.mark.reliability(
    case="fault: helm killed mid-install (SIGKILL while it creates the RayCluster)",
    sees="`hpcray: error: helm upgrade --install lc: helm was killed by SIGKILL before it finished; run the command "
         "again (`hpcray up` recovers a release a killed helm left pending)`, exit 2; the next `up` says `release lc "
         "was left pending-install with no working revision …; uninstalled it` and installs it",
    remains="after the kill: the release record pending-install; after the next `up`: one deployed release, pods Ready")
def test_helm_killed_mid_install_then_the_next_up_recovers(helm_bin: str, stalling_api: StallingKubeAPI,
                                                           tmp_path: Path) -> None:
    api = stalling_api
    profile = str(write_profile(tmp_path, api, credentials="none"))
    api.stall.set()
    proc = subprocess.Popen([sys.executable, "-m", "hpcray.cli", "up", "-p", profile], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert api.stalled.wait(60), "helm never reached the RayCluster"
        [helm] = children(proc.pid, b"upgrade")
        os.kill(helm, signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
    finally:
        api.stall.clear()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, err
    [line] = error_lines(err)
    assert err.rstrip().splitlines()[-1] == line and "Traceback" not in err
    assert line == ("hpcray: error: helm upgrade --install lc: helm was killed by SIGKILL before it finished; run the "
                    "command again (`hpcray up` recovers a release a killed helm left pending)")
    assert {rev: r["info"]["status"] for rev, r in helm_releases(api, "lc").items()} == {1: "pending-install"}

    again = subprocess.run([sys.executable, "-m", "hpcray.cli", "up", "-p", profile], capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0, again.stderr
    assert "release lc was left pending-install with no working revision" in again.stderr
    assert "uninstalled it" in again.stderr and "installed (revision 1)" in again.stderr
    assert {rev: r["info"]["status"] for rev, r in helm_releases(api, "lc").items()} == {1: "deployed"}
    assert len(api.list("rayclusters")) == 1 and len(pods(api)) == 3
