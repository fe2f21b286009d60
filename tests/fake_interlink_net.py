"""The box's pod network: what stands in for interLink's pod VPN, cluster routing and cluster DNS.

interLink's `interlink.eu/pod-vpn` only allocates an address from the virtual node's PodCIDR; a site's VPN
bootstrap (the tutorial's `slurm-job.vk.io/pre-exec`) must put it on an interface, and without it nothing in the
cluster reaches the pod nor the pod the cluster. In the box, as root on one machine (gVisor allows it):

- The VPN is a *router* network namespace `<prefix>-vpn` with a bridge `br0` holding the PodCIDR's first address
  (`127.0.X.1/24`; `route_localnet=1` lets 127/8 travel over non-loopback links). Pod IPs are distinct loopback
  addresses `127.0.X.Y`, allocated by the fake virtual kubelet from the node's PodCIDR.
- Every container a SLURM job runs (tests/fake_singularity) lives in that job's network namespace:
  `<prefix>-job<JOBID>` if the VPN bootstrap (tests/fake_vpn_bootstrap) created it — a veth into `br0`, `$POD_IP`
  on it, lo with 127.0.0.1/32 only — else `<prefix>-node<JOBID>`, which fake singularity creates with lo
  127.0.0.1/32 and nothing else: the compute node's own network, from which the cluster is unreachable and where
  `$POD_IP` is on no interface (a head told `--node-ip-address=$POD_IP` loops on GCS, as on Vega). Each pod has
  its own port space, like a Kubernetes pod, so heads and workers on one machine do not collide.
- The fake API server reaches pods (service proxy) through sockets opened inside the router namespace
  (`socket_factory`), as a control plane that routes to the VPN.
- Services on this machine that jobs must reach (the box's MLflow) listen on the gateway address in the host
  namespace; `relay` listens on the same address and port inside the router namespace and forwards there, so one
  URL (http://127.0.X.1:PORT) works from the host and from every VPN-connected pod.
- Cluster DNS: the fake API keeps a hosts file (`FakeKubeAPI.cluster_dns`: `<svc>.<ns>.svc.cluster.local` → the
  Service's ready endpoint) that fake singularity bind-mounts as /etc/hosts in VPN-connected containers only.

Nothing here touches the host's own interfaces; `stop` kills the processes left in the box's namespaces by PID
and deletes every namespace it made.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")
_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


def in_netns(name: str, fn: Callable[[], T]) -> T:
    """Run fn in a thread switched into the named network namespace (sockets it opens stay there)."""
    out: dict[str, Any] = {}

    def run() -> None:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(NETNS_DIR / name, os.O_RDONLY)
        try:
            if _libc.setns(target, CLONE_NEWNET):
                raise OSError(ctypes.get_errno(), f"setns into {name}")
            out["value"] = fn()
        except BaseException as exc:  # handed to the caller
            out["error"] = exc
        finally:
            _libc.setns(own, CLONE_NEWNET)
            os.close(target)
            os.close(own)
    thread = threading.Thread(target=run, name=f"netns-{name}")
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def netns_sysctl(name: str, *settings: str) -> None:
    subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw", *settings], check=True, capture_output=True,
                   timeout=30)


def kill_netns(name: str) -> None:
    """End every process in a network namespace (by PID), then delete it."""
    if not (NETNS_DIR / name).exists():
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [int(p) for p in ip("netns", "pids", name, check=False).stdout.split()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 5
        while pids and time.monotonic() < deadline and ip("netns", "pids", name, check=False).stdout.split():
            time.sleep(0.1)
    ip("netns", "del", name, check=False)


class PodNetwork:
    """The VPN of one box: `start()`, `relay(...)`, `end_job(jid)`, `stop()`."""

    def __init__(self, prefix: str, cidr: str) -> None:
        self.prefix, self.cidr = prefix, cidr
        net = ipaddress.ip_network(cidr)
        self.gateway = str(next(net.hosts()))
        self.router = f"{prefix}-vpn"
        self._servers: list[tuple[asyncio.AbstractEventLoop, asyncio.base_events.Server]] = []

    @property
    def cidrs(self) -> list[str]:
        return [self.cidr]

    def contains(self, address: str) -> bool:
        return ipaddress.ip_address(address) in ipaddress.ip_network(self.cidr)

    def env(self) -> dict[str, str]:
        """What the site's job environment carries for fake singularity and the VPN bootstrap."""
        return {"HPCRAY_BOX_NETNS_PREFIX": self.prefix, "HPCRAY_BOX_VPN": self.router,
                "HPCRAY_BOX_VPN_PREFIXLEN": str(ipaddress.ip_network(self.cidr).prefixlen)}

    def start(self) -> PodNetwork:
        r = self.router
        ip("netns", "add", r)
        ip("-n", r, "link", "set", "lo", "up")
        ip("-n", r, "addr", "del", "127.0.0.1/8", "dev", "lo")
        ip("-n", r, "addr", "add", "127.0.0.1/32", "dev", "lo")
        netns_sysctl(r, "net.ipv4.conf.all.route_localnet=1", "net.ipv4.conf.default.route_localnet=1")
        ip("-n", r, "link", "add", "br0", "type", "bridge")
        netns_sysctl(r, "net.ipv4.conf.br0.route_localnet=1")
        ip("-n", r, "addr", "add", f"{self.gateway}/{ipaddress.ip_network(self.cidr).prefixlen}", "dev", "br0")
        ip("-n", r, "link", "set", "br0", "up")
        return self

    def socket_factory(self, addr_info: Any) -> socket.socket:
        """For aiohttp's TCPConnector: a socket inside the VPN."""
        family, type_, proto = addr_info[0], addr_info[1], addr_info[2]
        return in_netns(self.router, lambda: socket.socket(family, type_, proto))

    def relay(self, loop: asyncio.AbstractEventLoop, port: int, target: tuple[str, int]) -> None:
        """Listen on gateway:port inside the VPN and forward each connection to `target` on this machine."""
        def listener() -> socket.socket:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((self.gateway, port))
            s.listen(64)
            s.setblocking(False)
            return s
        sock = in_netns(self.router, listener)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                up_reader, up_writer = await asyncio.open_connection(*target)
            except OSError:
                writer.close()
                return

            async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                try:
                    while data := await src.read(65536):
                        dst.write(data)
                        await dst.drain()
                except (ConnectionError, OSError):
                    pass
                finally:
                    dst.close()
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

        async def serve() -> asyncio.base_events.Server:
            return await asyncio.start_server(handle, sock=sock)
        self._servers.append((loop, asyncio.run_coroutine_threadsafe(serve(), loop).result(timeout=30)))

    def job_namespaces(self, jid: str) -> list[str]:
        return [f"{self.prefix}-job{jid}", f"{self.prefix}-node{jid}"]

    def end_job(self, jid: str) -> None:
        """What a job's end leaves of its networks goes (processes by PID, then the namespaces)."""
        for name in self.job_namespaces(jid):
            kill_netns(name)

    def stop(self) -> None:
        for loop, server in self._servers:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(server.close)
        self._servers.clear()
        ours = [n.split()[0] for n in ip("netns", "list", check=False).stdout.splitlines()
                if n.split() and n.split()[0].startswith(f"{self.prefix}-")]
        for name in sorted(ours, key=lambda n: n == self.router):  # the router last
            kill_netns(name)
