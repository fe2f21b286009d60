"""A TCP relay on 127.0.0.1 standing between hpcray and a Ray dashboard, as a port-forward or a proxy would.

It counts the bytes each way (what a follower fetched), can cut every open connection at once (a port-forward
blip), can start listening late (a port-forward still starting), and can refuse websocket upgrades with 501 the way
some HTTP proxies do. Used by tests/test_jobs.py and bench/bench_follow.py; stopped with `close()`.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any


class TcpProxy:
    def __init__(self, target: str, *, port: int = 0, delay: float = 0.0, refuse_upgrades: bool = False) -> None:
        """`target`: http://host:port or host:port. With `delay`, it listens on `port` only after that long."""
        host, _, target_port = target.split("://")[-1].rstrip("/").rpartition(":")
        self.target = (host, int(target_port))
        self.refuse_upgrades = refuse_upgrades
        self.down = self.up = 0  # bytes target → client, client → target
        self.refused = 0  # websocket upgrades refused
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._closed = False
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if delay:
            self.port = port
            threading.Thread(target=self._listen_later, args=(delay,), daemon=True).start()
        else:
            self._server.bind(("127.0.0.1", port))
            self.port = self._server.getsockname()[1]
            self._server.listen(64)
            threading.Thread(target=self._accept, daemon=True).start()
        self.address = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def cut(self) -> None:
        """Close every open connection, both sides, as a dying port-forward does; new ones are still accepted."""
        with self._lock:
            victims, self._open = list(self._open), set()
        for sock in victims:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self) -> None:
        self._closed = True
        try:
            self._server.shutdown(socket.SHUT_RDWR)  # close() alone leaves a blocked accept() listening on Linux
        except OSError:
            pass
        self._server.close()
        self.cut()

    def _listen_later(self, delay: float) -> None:
        time.sleep(delay)
        self._server.bind(("127.0.0.1", self.port))
        self._server.listen(64)
        self._accept()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        first = b""
        if self.refuse_upgrades:
            while b"\r\n\r\n" not in first:
                chunk = client.recv(65536)
                if not chunk:
                    client.close()
                    return
                first += chunk
            if b"upgrade: websocket" in first.split(b"\r\n\r\n", 1)[0].lower():
                self.refused += 1
                client.sendall(b"HTTP/1.1 501 Not Implemented\r\nContent-Type: text/plain\r\nContent-Length: 37\r\n"
                               b"Connection: close\r\n\r\nthis proxy does not forward upgrades\n")
                client.close()
                return
        try:
            upstream = socket.create_connection(self.target)
        except OSError:
            client.close()
            return
        with self._lock:
            self._open.update((client, upstream))
        if first:
            upstream.sendall(first)
            self.up += len(first)
        threading.Thread(target=self._pipe, args=(upstream, client, "down"), daemon=True).start()
        self._pipe(client, upstream, "up")

    def _pipe(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            while data := src.recv(262144):
                dst.sendall(data)
                with self._lock:
                    setattr(self, direction, getattr(self, direction) + len(data))
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
            with self._lock:
                self._open.discard(src)
                self._open.discard(dst)
