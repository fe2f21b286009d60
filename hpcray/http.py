"""The one HTTP client hpcray uses (Ray's Jobs API, MLflow's REST API, health checks): urllib, never `requests`.

An Endpoint is where requests go and what they carry (auth headers kept as Secrets until sent, a TLS context): the
same Jobs API client then works against a local head, a port-forward, an Ingress or the Kubernetes API server's
service proxy.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from hpcray.secrets import Secret


class Unreachable(Exception):
    """Nothing answered (refused, DNS, timeout, TLS); `reason` says which in the system's words."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"{url}: {reason}")
        self.url, self.reason = url, reason


@dataclass(frozen=True)
class Endpoint:
    base: str  # http(s)://host:port[/path prefix], no trailing slash
    headers: dict[str, str | Secret] = field(default_factory=dict, repr=False)
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False)

    def url(self, path: str) -> str:
        """The base with `path` appended; the base as given (a trailing slash kept) when there is no path."""
        return self.base.rstrip("/") + path if path else self.base


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)


def request(where: Endpoint | str, method: str, path: str = "", *, body: Any = None, data: bytes | None = None,
            headers: dict[str, str | Secret] | None = None, timeout: float = 30.0) -> Response:
    """One request; any HTTP status is a Response, a failure to get one is Unreachable."""
    endpoint = where if isinstance(where, Endpoint) else Endpoint(where)
    sent: dict[str, str] = {}
    for name, value in {**endpoint.headers, **(headers or {})}.items():
        sent[name] = value.reveal() if isinstance(value, Secret) else value
    if body is not None:
        data = json.dumps(body).encode()
        sent["Content-Type"] = "application/json"
    url = endpoint.url(path)
    req = urllib.request.Request(url, data=data, method=method, headers=sent)
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=endpoint.ssl_context) as resp:
            return Response(resp.status, resp.read())
    except urllib.error.HTTPError as exc:
        return Response(exc.code, exc.read())
    except (OSError, ValueError) as exc:  # URLError, refused, timeouts, TLS; ValueError: a malformed URL
        raise Unreachable(url, str(getattr(exc, "reason", exc))) from None


def ok(url: str, timeout: float = 2.0) -> bool:
    """A health check: GET answers 200."""
    try:
        return request(url, "GET", timeout=timeout).status == 200
    except Unreachable:
        return False
