"""A real single-node SLURM cluster (Debian slurm-wlm + munge) for the session; skipped with the reason otherwise.

Everything it starts lives in a private temp dir with free ports and its own munge socket, so it neither needs nor
disturbs a system SLURM, and it is stopped by PID at the end. The one node declares more than this machine has
(`SlurmdParameters=config_overrides`, 16 CPUs, 200 GB), so HPC-sized jobs run; OverTimeLimit=0 and KillWait=5
make a walltime kill prompt (~60-90 s after start for `--time=1`), MinJobAge=600 keeps a finished job visible to
squeue/scontrol without accounting. `start_slurm` serves the pytest fixture and the site box
(tests/fake_site_box.py) alike.

GPUs: the node declares `Gres=gpu:4` (GresTypes=gpu, gres.conf with AutoDetect=off), so `--gres=gpu:N` and
`--gpus=N` get a real allocation: SLURM counts and refuses (`--gres=gpu:5`: "Requested node configuration is not
available"), sets CUDA_VISIBLE_DEVICES in the job and shows `JOB_GRES=gpu:N` in `scontrol -d show job`. The
compromise: slurmd 22.05 drops a GPU without a device file ("Removing file-less GPU") and refuses a regular file
("is not a valid character or block device"), so the GPUs are character devices made with mknod in the cluster's
directory (major 195, NVIDIA's, minors 0-3) with no driver behind them; nothing opens them (TaskPlugin=task/none:
no device cgroup). AccountingStorageTRES=gres/gpu is not set: without slurmdbd slurmctld refuses to start with it.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "squeue")
NODE = "hpcraytest"
PARTITIONS = ("debug", "gpu")
GPUS = 4  # a Vega GPU node's


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(args), capture_output=True, text=True, timeout=30,
                              env={**os.environ, **self.env})

    def jobs(self) -> list[str]:
        """Jobs not finished yet (pending, running, completing)."""
        return self.run("squeue", "-h", "-t", "PD,R,CG,S", "-o", "%i").stdout.split()

    def log_tail(self) -> str:
        return "\n".join(f"{p.name}: {p.read_text()[-600:]}" for p in sorted(self.root.glob("*.log")))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _gres(root: Path, gpus: int) -> str:
    """gres.conf for `gpus` GPUs: one character device each under root/dev (see the module's docstring)."""
    dev = root / "dev"
    dev.mkdir()
    for i in range(gpus):
        os.mknod(dev / f"nvidia{i}", 0o600 | stat.S_IFCHR, os.makedev(195, i))
    files = "".join(f"NodeName={NODE} Name=gpu File={dev}/nvidia{i}\n" for i in range(gpus))
    return "AutoDetect=off\n" + files


def _config(root: Path, munge_socket: Path, cpus: int, memory_mb: int, gpus: int) -> str:
    partitions = "\n".join(f"PartitionName={p} Nodes={NODE} Default={'YES' if p == 'debug' else 'NO'} "
                           "MaxTime=INFINITE State=UP" for p in PARTITIONS)
    return f"""\
ClusterName=hpcraytest
SlurmctldHost=localhost
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
GresTypes=gpu
AccountingStorageType=accounting_storage/none
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
MpiDefault=none
ReturnToService=2
KillWait=5
OverTimeLimit=0
MinJobAge=600
SlurmdParameters=config_overrides
NodeName={NODE} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} Gres=gpu:{gpus} State=UNKNOWN
{partitions}
"""


def _start_munge(root: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """munged as user munge (it refuses root), with its own key and socket in a munge-owned dir."""
    munge = pwd.getpwnam("munge")
    d = root / "munge"
    d.mkdir()
    d.chmod(0o755)  # munged wants its socket dir executable by all
    key = d / "munge.key"
    key.write_bytes(os.urandom(128))
    key.chmod(0o400)
    for path in (d, key):
        os.chown(path, munge.pw_uid, munge.pw_gid)
    sock = d / "munge.socket"
    proc = subprocess.Popen(
        ["munged", "--foreground", f"--socket={sock}", f"--key-file={key}", f"--log-file={d}/munged.log",
         f"--pid-file={d}/munged.pid", f"--seed-file={d}/munged.seed"],
        user=munge.pw_uid, group=munge.pw_gid, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_for(lambda: sock.exists() or proc.poll() is not None, 10)
    if proc.poll() is not None:
        raise RuntimeError(f"munged exited: {proc.stderr.read().decode() if proc.stderr else ''}")
    return proc, sock


def _wait_for(predicate: Callable[[], object], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def skip_reason() -> str | None:
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return f"SLURM not installed ({', '.join(missing)} missing): apt-get install -y slurm-wlm munge"
    if os.geteuid() != 0:
        return "the test SLURM cluster runs slurmd as root (SlurmUser=root); run the tests as root"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "user munge does not exist; reinstall the munge package"
    return None


def start_slurm(cpus: int = 16, memory_mb: int = 200000, gpus: int = GPUS) -> SlurmCluster:
    """munged + slurmctld + slurmd, node idle. Raises RuntimeError saying why when it cannot; `stop_slurm` ends it."""
    # Not under pytest's tmp dirs: those are 0700 root, and munged (user munge) must reach its own dir.
    root = Path(tempfile.mkdtemp(prefix="hpcray-slurm-"))
    root.chmod(0o755)
    for sub in ("state", "spool"):
        (root / sub).mkdir()
    cluster = SlurmCluster(root, root / "slurm.conf")
    try:
        munged, sock = _start_munge(root)
        cluster.procs.append(munged)
        (root / "gres.conf").write_text(_gres(root, gpus))  # beside slurm.conf, where slurmd looks for it
        cluster.conf.write_text(_config(root, sock, cpus, memory_mb, gpus))
        for cmd in (["slurmctld", "-D", "-i", "-f", str(cluster.conf)],
                    ["slurmd", "-D", "-N", NODE, "-f", str(cluster.conf)]):
            cluster.procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                                  env={**os.environ, **cluster.env}))
        idle = _wait_for(lambda: cluster.run("sinfo", "-h", "-n", NODE, "-o", "%t").stdout.strip() == "idle", 30)
        if not idle:
            raise RuntimeError(f"the test SLURM node did not become idle in 30 s:\n{cluster.log_tail()}")
    except BaseException:
        stop_slurm(cluster)
        raise
    return cluster


def stop_slurm(cluster: SlurmCluster) -> None:
    """Cancel every job, stop every daemon by PID, remove the cluster's directory."""
    if len(cluster.procs) == 3 and cluster.jobs():  # slurmstepd outlives slurmd: end the jobs first
        cluster.run("scancel", *cluster.jobs())
        _wait_for(lambda: not cluster.jobs(), 20)
    for proc in reversed(cluster.procs):
        _stop(proc)
    shutil.rmtree(cluster.root, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """slurmctld + slurmd + munged, node idle; every job is cancelled and every daemon stopped by PID at the end."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    cluster = start_slurm()
    try:
        yield cluster
    finally:
        stop_slurm(cluster)


@pytest.fixture
def slurm_env(slurm_cluster: SlurmCluster, monkeypatch: pytest.MonkeyPatch) -> SlurmCluster:
    """The test cluster, made the one sbatch/scontrol/scancel talk to (SLURM_CONF)."""
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    return slurm_cluster
