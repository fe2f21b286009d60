"""A site in a box: an interLink-faithful Kubernetes + SLURM site on this machine, for tests and `make vega-box`.

What runs, and what it stands for:
- the fake Kubernetes API server (tests/fake_kube_api.py) with the fake KubeRay operator, kube-scheduler, endpoints
  controller and a regular kubelet node `fake-node-1` (the cluster's own node) — real helm, kubectl and the
  `kubernetes` client talk to it through the kubeconfig the box writes;
- an interLink virtual node (default `vega-box-vk`, PodCIDR 127.0.100.0/24, cpu 100, no GPUs: interLink's
  defaults) whose virtual kubelet and SLURM plugin (tests/fake_interlink.py, tests/fake_interlink_plugin.py) turn
  the pods bound to it into batch jobs of a real single-node SLURM (tests/fixtures_slurm.py: 16 CPUs, 200 GB and
  4 GPUs as `gpu` GRES declared: a pod's `--gres=gpu:N` gets a SLURM allocation of N of them, without hardware);
- the jobs' `singularity` (tests/fake_singularity): runs the container commands on this machine — real Ray from
  the venv — in the job's network namespace (tests/fake_interlink_net.py: the VPN, cluster DNS);
- `fake_vpn_bootstrap`: the site's VPN bootstrap a profile's pre-exec must call for pod-vpn pods;
- a SIF stand-in (`<root>/sif/<name>:<tag>`) the jobs' singularity accepts;
- the plugin's debug log (`BoxInfo.plugin_log`), as a site with `VerboseLogging: true` keeps it; `shared_fs`
  is the plugin's SHARED_FS (Secret volumes as files under the job directory, or base64 in job.slurm);
- optionally an MLflow server with basic auth on the VPN gateway address (one URL from this machine and from the
  pods).

`with SiteBox() as box: ...` or `python -m tests.fake_site_box [--json FILE]` (serves until SIGINT/SIGTERM; FILE,
mode 0600, gets `BoxInfo` as JSON, the MLflow admin password included). `stop()` cancels every SLURM job, kills
what the jobs left in the box's network namespaces and deletes them, stops every server by PID and removes the
box's directory.

Limits (what the box does not reproduce): one SLURM node, GPUs only as SLURM's count (device files without a
GPU behind them: a job that really computes on a GPU fails), no cgroups (memory limits and OUT_OF_MEMORY are not
enforced), no accounting (`sacct`), no Ingress/wstunnel, no kube-proxy (a Service's DNS name resolves to its ready
endpoint, like a headless Service), a pod's processes share this machine's filesystem (binds to paths absent here
are recorded, not mounted), and the interLink status lag is `poll_s` (1 s) instead of ~10-15 s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tests.fake_interlink import FakeVirtualKubelet
from tests.fake_interlink_net import PodNetwork
from tests.fake_interlink_plugin import PluginConfig, SlurmPlugin
from tests.fake_kube_api import FakeKubeAPI, default_crd
from tests.fixtures_servers import stop_group
from tests.fixtures_slurm import SlurmCluster, skip_reason, start_slurm, stop_slurm

TESTS = Path(__file__).resolve().parent
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "RAY_USAGE_STATS_ENABLED": "0"}
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class BoxInfo:
    """What a profile (and a test) needs to use the box."""
    kubeconfig: str
    namespace: str
    node: str  # the interLink virtual node's name
    pod_cidr: str
    sif: str  # the image every job's singularity accepts: <sif_dir>/<sif_name>:<sif_tag>
    sif_dir: str
    sif_name: str
    sif_tag: str
    vpn_bootstrap: str  # what a pod-vpn profile's pre-exec must run
    slurm_conf: str
    data_root: str  # interLink's DataRootFolder: a pod's job lives in <data_root><namespace>-<uid>
    singularity_log: str
    plugin_log: str  # the debug log of interLink's API and the plugin (VerboseLogging: true)
    mlflow_url: str
    mlflow_admin: tuple[str, str]  # (username, password); ("", "") without MLflow


def make_sif(path: Path) -> Path:
    """A file singularity takes for a SIF: its launch line, then SIF_MAGIC at byte 32."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"#!/usr/bin/env run-singularity\n".ljust(32, b"\0") + b"SIF_MAGIC\0hpcray site-in-a-box\n")
    return path


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class SiteBox:
    """The box. Every argument has interLink's or the brief's default; `pod_cidr=""` makes a node without one."""

    def __init__(self, root: Path | None = None, *, node: str = "vega-box-vk", namespace: str = "default",
                 cpu: str = "100", memory: str = "3000G", pods: str = "10000",
                 accelerators: dict[str, str] | None = None, pod_cidr: str = "127.0.100.0/24", poll_s: float = 1.0,
                 mlflow: bool = True, slurm: SlurmCluster | None = None, slurm_cpus: int = 16,
                 slurm_memory_mb: int = 200000, sif: tuple[str, str] = ("hython", "sif"),
                 shared_fs: bool = True) -> None:
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="hpcray-box-", dir="/var/tmp"))
        self.node, self.namespace, self.pod_cidr, self.poll_s = node, namespace, pod_cidr, poll_s
        self.node_resources = {"cpu": cpu, "memory": memory, "pods": pods, "accelerators": accelerators}
        self.with_mlflow, self.slurm_size, self.sif_name = mlflow, (slurm_cpus, slurm_memory_mb), sif
        self.shared_fs = shared_fs
        self.prefix = f"hb{os.getpid() % 100000}{secrets.token_hex(2)}"
        self.slurm: SlurmCluster | None = slurm
        self._own_slurm = slurm is None  # a cluster given by the caller is the caller's to stop
        self.network: PodNetwork | None = None
        self.api: FakeKubeAPI | None = None
        self.vk: FakeVirtualKubelet | None = None
        self.plugin: SlurmPlugin | None = None
        self._mlflow: subprocess.Popen[bytes] | None = None
        self.info: BoxInfo | None = None

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def start(self) -> SiteBox:
        reason = skip_reason()
        if reason:
            raise RuntimeError(reason)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        if self.slurm is None:
            self.slurm = start_slurm(*self.slurm_size)
        gateway = ""
        if self.pod_cidr:
            self.network = PodNetwork(self.prefix, self.pod_cidr).start()
            gateway = self.network.gateway
        crds = [default_crd()] if default_crd().is_file() else None
        self.api = FakeKubeAPI(crds=crds).start()
        self.api.pod_network = self.network
        self.api.cluster_dns = self.root / "cluster-hosts"
        self.api.call(self.api.write_cluster_dns)
        kubeconfig = self.api.write_kubeconfig(self.root / "kubeconfig", namespace=self.namespace)
        bin_dir = self.root / "bin"
        bin_dir.mkdir()
        (bin_dir / "singularity").symlink_to(TESTS / "fake_singularity")
        data_root = self.root / "interlink-jobs"
        data_root.mkdir()
        log = self.root / "singularity.log"
        venv_bin = Path(sys.executable).parent
        env = {"PATH": f"{bin_dir}:{SYSTEM_PATH}", **self.slurm.env, **QUIET, "HOME": os.environ.get("HOME", "/root"),
               "FAKE_SINGULARITY_LOG": str(log), "FAKE_SINGULARITY_CONTAINER_PATH": f"{venv_bin}:{SYSTEM_PATH}",
               "FAKE_SINGULARITY_IMAGE_DIRS": f"{sys.prefix}:{sys.base_prefix}",
               "HPCRAY_BOX_DNS": str(self.api.cluster_dns), **(self.network.env() if self.network else {})}
        plugin_log = self.root / "interlink-plugin.log"
        self.plugin = SlurmPlugin(PluginConfig(data_root=data_root, env=env, shared_fs=self.shared_fs,
                                               log=plugin_log))
        self.vk = FakeVirtualKubelet(self.api, node=self.node, plugin=self.plugin, pod_network=self.network,
                                     poll_s=self.poll_s, pod_cidr=self.pod_cidr,
                                     **self.node_resources).start()  # type: ignore[arg-type]
        name, tag = self.sif_name
        sif = make_sif(self.root / "sif" / f"{name}:{tag}")
        mlflow_url, admin = "", ("", "")
        if self.with_mlflow:
            mlflow_url, admin = self._start_mlflow(gateway or "127.0.0.1")
        self.info = BoxInfo(kubeconfig=str(kubeconfig), namespace=self.namespace, node=self.node,
                            pod_cidr=self.pod_cidr, sif=str(sif), sif_dir=str(sif.parent), sif_name=name,
                            sif_tag=tag, vpn_bootstrap=str(TESTS / "fake_vpn_bootstrap"),
                            slurm_conf=str(self.slurm.conf), data_root=f"{data_root}/",
                            singularity_log=str(log), plugin_log=str(plugin_log), mlflow_url=mlflow_url,
                            mlflow_admin=admin)

    def _start_mlflow(self, host: str) -> tuple[str, tuple[str, str]]:
        """`mlflow server --app-name basic-auth` on a fresh sqlite store, on the VPN gateway address (relayed
        into the VPN) so that the same URL works here and in VPN-connected pods."""
        work = self.root / "mlflow"
        work.mkdir()
        admin = ("admin", secrets.token_urlsafe(16))
        (work / "basic_auth.ini").write_text(
            "[mlflow]\ndefault_permission = READ\n"
            f"database_uri = sqlite:///{work / 'auth.db'}\nadmin_username = {admin[0]}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        port = _free_port(host)
        env = {**os.environ, **QUIET, "MLFLOW_AUTH_CONFIG_PATH": str(work / "basic_auth.ini"),
               "MLFLOW_AUTH_ADMIN_PASSWORD": admin[1], "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_urlsafe(32),
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        argv = [str(Path(sys.executable).parent / "mlflow"), "server", "--app-name", "basic-auth", "--host", host,
                "--port", str(port), "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}",
                "--artifacts-destination", str(work / "artifacts"), "--workers", "1",
                "--allowed-hosts", f"{host}:{port},{host}"]  # the Host header its clients send
        with open(work / "server.log", "wb") as out:
            self._mlflow = subprocess.Popen(argv, env=env, cwd=work, stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://{host}:{port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and self._mlflow.poll() is None:
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            time.sleep(0.3)
        else:
            tail = (work / "server.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the box's MLflow server at {url} did not answer /health:\n{tail}")
        if self.network is not None and self.api is not None and self.api.loop is not None:
            self.network.relay(self.api.loop, port, (host, port))
        return url, admin

    def stop(self) -> None:
        """End everything the box started (idempotent)."""
        if self.vk is not None:
            self.vk.stop()
            self.vk = None
        if self.slurm is not None and self._own_slurm:
            stop_slurm(self.slurm)
        self.slurm = None
        if self.network is not None:
            self.network.stop()
            self.network = None
        if self.api is not None:
            self.api.stop()
            self.api = None
        if self._mlflow is not None:
            stop_group(self._mlflow)
            self._mlflow = None
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> SiteBox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- for tests -----------------------------------------------------------------------------------------------
    @property
    def mlflow_pid(self) -> int | None:
        """The MLflow server's PID, which leads its process group (its workers know the admin password too)."""
        return self._mlflow.pid if self._mlflow is not None else None

    def job_dir(self, pod: dict[str, Any]) -> Path:
        assert self.plugin is not None
        return self.plugin.workdir(pod)

    def job_id(self, pod: dict[str, Any]) -> str | None:
        assert self.vk is not None
        return self.vk.job_id(pod)

    def singularity_records(self) -> list[dict[str, Any]]:
        """What fake singularity recorded of the exec/run calls (image, command, binds, env names, network)."""
        assert self.info is not None
        log = Path(self.info.singularity_log)
        lines = log.read_text().splitlines() if log.exists() else []
        return [json.loads(line.split(" ", 1)[1]) for line in lines if line.startswith("exec-record ")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the site in a box until interrupted.")
    parser.add_argument("--json", type=Path, help="write what a profile needs (BoxInfo) to this file, mode 0600")
    parser.add_argument("--no-mlflow", action="store_true")
    args = parser.parse_args(argv)
    os.environ.update(QUIET)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    with SiteBox(mlflow=not args.no_mlflow) as box:
        assert box.info is not None
        if args.json:
            fd = os.open(args.json, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(asdict(box.info), f, indent=2)
        print(f"site box up: kubeconfig {box.info.kubeconfig}, virtual node {box.info.node}", file=sys.stderr)
        try:
            while not stop:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
