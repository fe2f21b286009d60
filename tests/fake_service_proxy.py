"""The Kubernetes API server's service proxy in front of a real Ray dashboard, for the one part of it hpcray's Jobs
API client meets: `https://APISERVER/api/v1/namespaces/NS/services/http:NAME:8265/proxy/PATH`.

As strict as the API server on what the client must get right: HTTPS only (a self-signed certificate the client must
be told to trust), a bearer token on every request (401 with a Kubernetes Status without it), nothing outside the
service's proxy path (404). Like the API server's authentication filter, it removes the Authorization header before
proxying (so Ray never sees the Kubernetes token, and Ray's own token must travel in X-Ray-Authorization); websocket
upgrades are proxied, close codes included. Records the headers each proxied request carried to the dashboard.
"""

from __future__ import annotations

import asyncio
import ssl
import tempfile
import threading
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, WSMsgType, web

from hpcray.http import Endpoint
from hpcray.secrets import Secret
from tests.fake_kube_api import _self_signed_cert

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "upgrade", "host", "content-length", "authorization",
              "sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-accept"}


class FakeServiceProxy:
    def __init__(self, dashboard: str, token: str, namespace: str = "ray",
                 service: str = "raycluster-kuberay-head-svc") -> None:
        self.dashboard = dashboard.rstrip("/")
        self.token = token
        self.prefix = f"/api/v1/namespaces/{namespace}/services/http:{service}:8265/proxy"
        self.forwarded: list[tuple[str, dict[str, str]]] = []  # (METHOD path, headers sent on to the dashboard)
        self.upgrades: list[str] = []  # paths of proxied websockets
        self._cert = _self_signed_cert()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="fake-service-proxy", daemon=True)

    def __enter__(self) -> FakeServiceProxy:
        self._thread.start()
        self._ready.wait(30)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def endpoint(self, token: str | None = None) -> Endpoint:
        """What hpcray is handed for this service: the proxy URL, the bearer token, a TLS context trusting the cert."""
        context = ssl.create_default_context(cadata=self._cert[0].decode())
        headers: dict[str, str | Secret] = {"Authorization": Secret(f"Bearer {token or self.token}")}
        return Endpoint(f"https://127.0.0.1:{self.port}{self.prefix}", headers, context)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_route("*", "/{path:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        self._loop.run_until_complete(runner.setup())
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "cert.pem").write_bytes(self._cert[0])
            (Path(tmp) / "key.pem").write_bytes(self._cert[1])
            context.load_cert_chain(Path(tmp) / "cert.pem", Path(tmp) / "key.pem")
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
        self._loop.run_until_complete(site.start())
        self.port = runner.addresses[0][1]
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())
        self._loop.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                      "message": "Unauthorized", "reason": "Unauthorized", "code": 401}, status=401)
        if not request.path.startswith(self.prefix + "/"):
            return web.json_response({"kind": "Status", "status": "Failure", "message": "the server could not find "
                                      "the requested resource", "reason": "NotFound", "code": 404}, status=404)
        path = request.path_qs[len(self.prefix):]
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        self.forwarded.append((f"{request.method} {path}", headers))
        async with ClientSession(auto_decompress=False) as session:
            if request.headers.get("Upgrade", "").lower() == "websocket":
                return await self._websocket(request, session, path, headers)
            async with session.request(request.method, self.dashboard + path, headers=headers,
                                       data=await request.read()) as upstream:
                body = await upstream.read()
                return web.Response(status=upstream.status, body=body,
                                    headers={k: v for k, v in upstream.headers.items()
                                             if k.lower() not in HOP_BY_HOP})

    async def _websocket(self, request: web.Request, session: ClientSession, path: str,
                         headers: dict[str, str]) -> web.StreamResponse:
        self.upgrades.append(path)
        upstream = await session.ws_connect(self.dashboard + path, headers=headers, max_msg_size=0)
        client = web.WebSocketResponse(max_msg_size=0)
        await client.prepare(request)

        async def to_client() -> None:
            async for msg in upstream:
                if msg.type is WSMsgType.TEXT:
                    await client.send_str(msg.data)
            await client.close(code=upstream.close_code or 1000)

        relay = asyncio.ensure_future(to_client())
        async for _ in client:  # the client sends nothing but control frames; its close ends the relay
            pass
        relay.cancel()
        await upstream.close()
        return client
