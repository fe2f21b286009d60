"""The Ray Jobs API client: the REST calls `JobSubmissionClient` makes, and its log-tail websocket.

JSON calls go through hpcray.http (urllib), so `submit --no-wait`, `status`, `logs` and `stop` never import ray
(about 0.7 s). One `http.Endpoint` carries where the API is and how to reach it (a local head, a port-forward, an
Ingress, or the Kubernetes API server's service proxy with its bearer token and TLS context); the websocket uses
the same base URL, headers and TLS context through aiohttp, imported only when a log is followed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from hpcray import http
from hpcray.errors import ClusterError, JobNotFound, JobsApiRefused, RayVersionError
from hpcray.secrets import Secret
from hpcray.waiting import Deadline, poll_until

Say = Callable[[str], None]

HEARTBEAT_S = 20.0
"""A log-tail websocket that answers no ping for half this long is taken for dropped (a port-forward that died
without closing)."""


class StreamRefused(Exception):
    """The log-tail websocket could not be opened (nothing answers, or a proxy refuses the upgrade)."""


class StreamLost(Exception):
    """The log-tail websocket ended without Ray closing it."""


class AgentNotReady(ClusterError):
    """A head whose dashboard answers may lack its job agent for a few seconds (HTTP 500, 'No available agent')."""


def ray_token() -> Secret | None:
    """Ray's token for a cluster with token authentication, looked up where Ray looks for it.

    Like `ray start`: RAY_AUTH_MODE=disabled sends none; otherwise RAY_AUTH_TOKEN, the file in RAY_AUTH_TOKEN_PATH,
    or ~/.ray/auth_token.
    """
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if os.environ.get("RAY_AUTH_TOKEN"):
        return Secret(os.environ["RAY_AUTH_TOKEN"].strip())
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        token = path.read_text().strip()
    except OSError:
        return None
    return Secret(token) if token else None


TOKEN_AUTH_SINCE = (2, 52)
"""The first Ray release with token authentication (RAY_AUTH_MODE=token); older Rays ignore its variables."""
TOKEN_HEADER = "X-Ray-Authorization"


def has_token_auth(ray_version: str) -> bool:
    """Whether this Ray version knows token authentication (a version hpcray cannot read is taken to know it)."""
    parts = [int(x) for x in re.findall(r"\d+", ray_version)[:2]]
    return len(parts) < 2 or (parts[0], parts[1]) >= TOKEN_AUTH_SINCE


def new_token() -> Secret:
    """A token for a new cluster: 256 random bits, URL-safe (Ray compares it byte for byte)."""
    import secrets

    return Secret(secrets.token_urlsafe(32))


def with_token(endpoint: http.Endpoint, token: Secret | None) -> http.Endpoint:
    """The endpoint carrying a cluster's own Ray token, in X-Ray-Authorization: Ray reads it there when no
    Authorization header is sent, and a proxy in front of it (the Kubernetes API server, which keeps Authorization
    for its own credentials and strips it) passes it on."""
    if token is None:
        return endpoint
    bearer = Secret(f"Bearer {token.reveal()}")
    return dataclasses.replace(endpoint, headers={**endpoint.headers, TOKEN_HEADER: bearer})


def normalize_address(address: str) -> str:
    address = address.strip().rstrip("/")
    if "://" not in address:
        address = f"http://{address}"
    if not address.startswith(("http://", "https://")):
        raise ClusterError(f"{address}: not a Jobs API address; give the dashboard's, e.g. http://127.0.0.1:8265")
    return address


def reason(text: str) -> str:
    """What went wrong, from an error body: Ray answers with a Python traceback (its last line says it), the
    Kubernetes API server and proxies with a JSON object carrying a message."""
    try:
        message = json.loads(text).get("message")
    except (ValueError, AttributeError):
        message = None
    lines = [line.strip() for line in str(message or text).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "no details")[:400]


class JobsApi:
    """A Ray cluster's Jobs API at one Endpoint (or a plain address such as 127.0.0.1:8265)."""

    def __init__(self, where: http.Endpoint | str, token: Secret | None = None) -> None:
        endpoint = (dataclasses.replace(where, base=where.base.rstrip("/")) if isinstance(where, http.Endpoint)
                    else http.Endpoint(normalize_address(where)))
        self._proxied = any(name.lower() == "authorization" for name in endpoint.headers)
        # A backend hands over its cluster's own token with the endpoint (with_token); else Ray's places for one.
        self._carried = any(name.lower() == TOKEN_HEADER.lower() for name in endpoint.headers)
        token = None if self._carried else token if token is not None else ray_token()
        if token:
            # Ray reads its token from Authorization, else from X-Ray-Authorization: the one a proxy in front of it
            # leaves alone when Authorization carries the proxy's own credentials (the Kubernetes API server's).
            header = "X-Ray-Authorization" if self._proxied else "Authorization"
            endpoint = dataclasses.replace(endpoint, headers={**endpoint.headers,
                                                              header: Secret(f"Bearer {token.reveal()}")})
        self.endpoint = endpoint
        self.address = endpoint.base

    def call(self, method: str, path: str, *, body: Any = None, data: bytes | None = None,
             timeout: float = 30.0) -> http.Response:
        """One request; JobsApiRefused on 401/403, ClusterError when nothing answers."""
        try:
            response = http.request(self.endpoint, method, path, body=body, data=data, timeout=timeout)
        except http.Unreachable as exc:
            raise ClusterError(f"cannot reach the Ray Jobs API at {self.address}: {exc.reason}; is the cluster up "
                               f"(`hpcray status`), or is --address wrong?") from None
        if response.status in (401, 403) and self._carried and not self._proxied:
            raise JobsApiRefused(f"the Ray cluster at {self.address} refused the token hpcray keeps for it "
                                 f"({response.status}: {reason(response.text)}); was it re-created outside hpcray? "
                                 f"`hpcray down` and `hpcray up` give it a new one")
        if response.status in (401, 403):
            where = ("(hpcray sent the one it keeps for the cluster)" if self._carried else
                     "in ~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN")
            fix = ("check the credentials for the proxy in front of it (the kubeconfig's user) and, if Ray uses token "
                   "authentication, its token" if self._proxied else "it uses token authentication: put its token")
            raise JobsApiRefused(f"the Ray cluster at {self.address} refused us ({response.status}: "
                                 f"{reason(response.text)}); {fix} {where}")
        return response

    def _json(self, method: str, path: str, job_id: str | None = None, **kwargs: Any) -> Any:
        return self._parse(method, path, self.call(method, path, **kwargs), job_id)

    def _parse(self, method: str, path: str, response: http.Response, job_id: str | None = None) -> Any:
        if response.status == 404 and job_id is not None:
            raise JobNotFound(f"no job '{job_id}' on the Ray cluster at {self.address}; `hpcray list` shows the jobs")
        if response.status != 200:
            raise ClusterError(f"{method} {path} at {self.address} failed ({response.status}): "
                               f"{reason(response.text)}")
        try:
            return response.json()
        except ValueError:
            raise ClusterError(f"{self.address} answered {path} with something other than JSON; is it the Ray "
                               f"dashboard (port 8265 of the head)?") from None

    def version(self) -> dict[str, Any]:
        return dict(self._json("GET", "/api/version"))

    def submit(self, payload: dict[str, Any]) -> str:
        response = self.call("POST", "/api/jobs/", body=payload)
        if response.status == 500 and "No available agent" in response.text:  # Ray's words; it has no error code
            raise AgentNotReady(f"POST /api/jobs/ at {self.address} failed (500): {reason(response.text)}")
        return str(self._parse("POST", "/api/jobs/", response)["submission_id"])

    def info(self, job_id: str) -> dict[str, Any]:
        return dict(self._json("GET", f"/api/jobs/{job_id}", job_id))

    def logs(self, job_id: str) -> str:
        return str(self._json("GET", f"/api/jobs/{job_id}/logs", job_id)["logs"])

    def stop(self, job_id: str) -> bool:
        return bool(self._json("POST", f"/api/jobs/{job_id}/stop", job_id)["stopped"])

    def list(self) -> list[dict[str, Any]]:
        return list(self._json("GET", "/api/jobs/"))

    def alive_nodes(self) -> int:
        """How many Ray nodes (head included) the head's GCS counts alive (Ray's State API)."""
        found = self._json("GET", "/api/v0/nodes?detail=false&limit=1000")
        return sum(n.get("state") == "ALIVE" for n in found["data"]["result"]["result"])

    def package_exists(self, uri: str) -> bool:
        response = self.call("GET", f"/api/packages/{_package_path(uri)}")
        if response.status not in (200, 404):
            raise ClusterError(f"checking package {uri} at {self.address} failed ({response.status}): "
                               f"{reason(response.text)}")
        return response.status == 200

    def put_package(self, uri: str, data: bytes) -> None:
        response = self.call("PUT", f"/api/packages/{_package_path(uri)}", data=data, timeout=60 + len(data) / 1e6)
        if response.status != 200:
            raise ClusterError(f"uploading {uri} to {self.address} failed ({response.status}): "
                               f"{reason(response.text)}")

    def tail_url(self, job_id: str) -> str:
        return self.endpoint.url(f"/api/jobs/{job_id}/logs/tail")

    async def tail(self, job_id: str) -> AsyncIterator[str]:
        """The job's log from its first byte, chunk by chunk as Ray's log-tail websocket sends it (up to 10 lines or
        ~20 kB each), until Ray closes it, which it does once the job has ended and its log is sent.

        StreamRefused when the websocket cannot be opened, StreamLost when it ends without Ray's close frame (a
        cut connection reads as a clean end of stream otherwise).
        """
        import asyncio

        import aiohttp

        headers = {k: v.reveal() if isinstance(v, Secret) else v for k, v in self.endpoint.headers.items()}
        tls = {"ssl": self.endpoint.ssl_context} if self.endpoint.ssl_context is not None else {}
        async with aiohttp.ClientSession(trust_env=True) as session:  # proxies from the environment, as urllib
            try:
                ws = await session.ws_connect(self.tail_url(job_id), headers=headers, heartbeat=HEARTBEAT_S,
                                              max_msg_size=0, **tls)
            except aiohttp.WSServerHandshakeError as exc:
                raise StreamRefused(f"HTTP {exc.status} to the websocket upgrade") from None
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                raise StreamRefused(str(exc) or type(exc).__name__) from None
            async with ws:
                while True:
                    msg = await ws.receive()
                    if msg.type is aiohttp.WSMsgType.TEXT:
                        yield msg.data
                    elif msg.type is aiohttp.WSMsgType.CLOSE and msg.data == aiohttp.WSCloseCode.OK:
                        return
                    elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        why = ws.exception() or (f"close code {msg.data}" if msg.type is aiohttp.WSMsgType.CLOSE
                                                 else "connection closed")
                        raise StreamLost(str(why) or type(why).__name__)


def _package_path(uri: str) -> str:
    protocol, name = uri.split("://", 1)
    return f"{protocol}/{name}"


def wait_for_api(api: JobsApi, timeout: float, progress: Say) -> dict[str, Any]:
    """/api/version of a cluster whose Jobs API answers; one that does not answer yet is retried until `timeout`."""
    last: list[ClusterError] = []
    said = [0.0]

    def answers() -> dict[str, Any] | None:
        try:
            return api.version()
        except JobsApiRefused:
            raise
        except ClusterError as exc:  # nothing listening yet, or a proxy answering 502 for a starting dashboard
            last[:] = [exc]
            return None

    def tell(deadline: Deadline) -> None:
        if deadline.elapsed >= said[0]:
            progress(f"waiting for the Ray Jobs API at {api.address} ({deadline.elapsed:.0f}/{timeout:.0f} s) …")
            said[0] += 5

    found = poll_until(answers, timeout=timeout, interval=0.5, every=tell)
    if found is None:  # nothing was submitted: exit 2 like any cluster that cannot be reached
        raise ClusterError(f"the Ray Jobs API at {api.address} did not answer within {timeout:.0f} s: {last[0]}")
    return found


def check_versions(cluster: str, client: str, image: str | None, warn: Say, *, address: str | None = None) -> None:
    """Different major versions cannot talk; a different minor version mostly works, so it only warns."""
    where = f"the cluster at {address}" if address else "the cluster"

    def major_minor(v: str) -> tuple[int, int]:
        parts = [int(x) for x in re.findall(r"\d+", v)[:2]] + [0, 0]
        return parts[0], parts[1]

    for what, other in (("this client", client), ("the profile's image.ray_version", image)):
        if not other:
            continue
        (cma, cmi), (oma, omi) = major_minor(cluster), major_minor(other)
        if cma != oma:
            raise RayVersionError(f"{where} runs Ray {cluster} but {what} has Ray {other}; install "
                                  f"ray=={cluster} here or use an image with Ray {other}")
        if cmi != omi:
            warn(f"warning: {where} runs Ray {cluster}, {what} has Ray {other}; jobs usually work across minor "
                 f"versions, but match them if something fails")


@functools.cache
def client_ray_version() -> str | None:
    """The installed Ray's version from its package metadata (`import ray` costs ~0.7 s, this ~15 ms)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ray")
    except PackageNotFoundError:
        return None
