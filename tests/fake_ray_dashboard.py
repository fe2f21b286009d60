"""A stand-in for a Ray dashboard's Jobs API on 127.0.0.1 that claims any Ray version and records every request.

For what no real Ray here can be: a cluster of another Ray major version (`FakeRayDashboard("1.13.0")`). It answers
`GET /api/version`, lists no jobs, and accepts nothing else, so a test can assert from `requests` that hpcray sent no
job and uploaded no package.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeRayDashboard:
    def __init__(self, ray_version: str) -> None:
        self.ray_version = ray_version
        self.requests: list[str] = []  # "METHOD /path"
        dashboard = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                dashboard.requests.append(f"{self.command} {self.path}")
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                if self.command == "GET" and self.path == "/api/version":
                    self._json(200, {"version": "4", "ray_version": dashboard.ray_version, "ray_commit": "fake",
                                     "session_name": "session_fake"})
                elif self.command == "GET" and self.path == "/api/jobs/":
                    self._json(200, [])
                else:
                    self._json(404, {"message": f"the fake dashboard does not serve {self.command} {self.path}"})

            def _json(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _answer

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - BaseHTTPRequestHandler's name
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.address = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-ray-dashboard", daemon=True)

    def __enter__(self) -> FakeRayDashboard:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def writes(self) -> list[str]:
        """Every request that could have created something (a job, an uploaded package)."""
        return [r for r in self.requests if not r.startswith("GET ")]
