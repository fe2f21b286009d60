"""A local TCP port relayed to a port of a pod through the Kubernetes API (kubectl port-forward's job), healing itself:
each connection gets a fresh upstream, and an upstream that cannot be opened is retried while the client waits."""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from typing import Any, Callable, Iterator

from hpcray import kube
from hpcray.errors import ClusterError
from hpcray.waiting import Deadline

Notice = Callable[[str], None]


class ReadyPod:
    """The name of a Ready pod picked by a label selector, looked up again after a failure (it may be recreated)."""

    def __init__(self, k: kube.Kube, selector: str) -> None:
        self.k, self.selector = k, selector
        self._state: kube.PodState | None = None

    def state(self) -> kube.PodState:
        if self._state is None:
            ready = [s for s in map(kube.pod_state, kube.list_pods(self.k, self.selector)) if s.ready]
            if not ready:
                raise ClusterError(f"no Ready head pod ({self.selector}) in namespace {self.k.namespace}; is the "
                                   "cluster up? (`hpcray status`)")
            self._state = ready[0]
        return self._state

    def name(self) -> str:
        return self.state().name

    def forget(self) -> None:
        self._state = None


def to_pod(k: kube.Kube, selector: str, port: int, *, local_port: int = 0, notice: Notice) -> Relay:
    """A relay from 127.0.0.1:local_port (0: any free one) to `port` of the Ready pod `selector` picks; ClusterError
    at once when there is none, not as a connection that fails later."""
    pod = ReadyPod(k, selector)
    pod.name()
    return Relay(lambda: kube.open_pod_port(k, pod.name(), port), port=local_port, notice=notice,
                 on_failure=pod.forget)


class Relay:
    """Accept on 127.0.0.1:port; relay each connection to a fresh upstream socket from `open_upstream`.

    An upstream that cannot be opened (API server restarting, head pod recreated) is retried with backoff for up
    to `retry_s` while the client waits, so a dropped port-forward heals on the next request."""

    def __init__(self, open_upstream: Callable[[], Any], *, port: int = 0, notice: Notice,
                 on_failure: Callable[[], None] = lambda: None, retry_s: float = 15.0) -> None:
        self.open_upstream, self.notice, self.on_failure, self.retry_s = open_upstream, notice, on_failure, retry_s
        try:
            self.listener = socket.create_server(("127.0.0.1", port))
        except OSError as exc:
            raise ClusterError(f"cannot listen on 127.0.0.1:{port} ({exc.strerror}); pick another with --port") \
                from None
        self.port: int = self.listener.getsockname()[1]
        self.broken = False  # the last upstream attempt failed: say so once, and once when it heals

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def serve_forever(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    @contextlib.contextmanager
    def serving(self) -> Iterator[Relay]:
        """Serve in a background thread while the block runs; closed afterwards."""
        threading.Thread(target=self.serve_forever, name="port-forward", daemon=True).start()
        try:
            yield self
        finally:
            self.close()

    def close(self) -> None:
        self.listener.close()

    def _serve(self, client: socket.socket) -> None:
        with contextlib.closing(client):
            upstream = self._connect()
            if upstream is not None:
                with contextlib.closing(upstream):
                    _pipe(client, upstream)

    def _connect(self) -> Any | None:
        deadline, backoff = Deadline(self.retry_s), 0.1
        while True:
            try:
                upstream = self.open_upstream()
            except Exception as exc:  # noqa: BLE001 - socket, websocket and API failures alike: retried, said once
                if not self.broken:
                    self.notice(f"port-forward lost ({exc}); reconnecting")
                self.broken = True
                self.on_failure()
                if deadline.left < backoff:
                    self.notice(f"port-forward: gave up on this connection after {self.retry_s:.0f}s")
                    return None
                deadline.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            if self.broken:
                self.notice("port-forward reconnected")
                self.broken = False
            return upstream


def _pipe(a: Any, b: Any) -> None:
    """Copy bytes both ways until either side closes."""
    peers = {a.fileno(): b, b.fileno(): a}
    socks = {a.fileno(): a, b.fileno(): b}
    while True:
        readable, _, _ = select.select(list(socks.values()), [], [], 60)
        for s in readable:
            try:
                data = s.recv(65536)
                if not data:
                    return
                peers[s.fileno()].sendall(data)
            except OSError:
                return
