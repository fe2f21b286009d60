"""What the fake API server relays instead of serving from its store: pod subresources that a kubelet answers
(portforward, exec, attach, log) and the service proxy.

- On a regular node the fake kubelet serves port-forward over the v4 channel protocol to whatever a test declared
  with `FakeKubeAPI.serve_pod_port` (today's behaviour).
- On an interLink virtual node the virtual kubelet registers no port-forward, exec or attach handler, so its
  kubelet API answers `501 not implemented` (virtual-kubelet node/api `NotImplemented`: `http.Error(w, "501 not
  implemented", 501)`), which the API server hands back to the client as the upgrade's response. Logs come from the
  virtual kubelet (tests/fake_interlink.py).
- `/api/v1/namespaces/NS/services/[SCHEME:]NAME[:PORT]/proxy/PATH` goes to one ready endpoint of the Service's
  port, as kube-apiserver's `ResourceLocation` picks it (a port number is first mapped to the port's name; the
  Endpoints object missing → 404; no ready address → 503 `no endpoints available for service ...`); a refused
  connection is a 503 `error trying to reach service: ...`; websocket upgrades are relayed both ways.
"""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING, Any, Callable

import aiohttp
from aiohttp import web

from tests.fake_kube_objects import ENDPOINTS, PODS, SERVICES, ApiError, Obj
from tests.fake_kube_scheduler import ready_addresses

if TYPE_CHECKING:
    from tests.fake_kube_api import FakeKubeAPI

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
               "transfer-encoding", "upgrade", "host", "content-length", "authorization"}


def not_implemented() -> web.Response:
    """What a virtual kubelet's unregistered handler answers, relayed by the API server."""
    return web.Response(status=501, text="501 not implemented\n",
                        headers={"X-Content-Type-Options": "nosniff"}, content_type="text/plain", charset="utf-8")


async def kubelet_portforward(api: FakeKubeAPI, request: web.Request, pod: Obj) -> web.StreamResponse:
    """The kubelet's port-forward over the v4 channel protocol: per requested port i, channel 2i carries data and
    2i+1 errors, each opened by a frame with the port number (2 bytes, little-endian); every other frame is the
    channel byte and a payload. A port nothing listens on gets its error, like a real kubelet's."""
    name = pod["metadata"]["name"]
    if pod.get("status", {}).get("phase") != "Running":
        raise ApiError(400, "BadRequest", f"pod {name} is not running: cannot port-forward to it")
    try:
        ports = [int(p) for value in request.query.getall("ports", []) for p in value.split(",") if p]
    except ValueError:
        raise ApiError(400, "BadRequest", "invalid port in 'ports'") from None
    if not ports:
        raise ApiError(400, "BadRequest", "at least one port is required ('ports')")
    ws = web.WebSocketResponse(protocols=("v4.channel.k8s.io", "portforward.k8s.io"))
    await ws.prepare(request)
    writers: dict[int, asyncio.StreamWriter] = {}
    pumps: list[asyncio.Task[None]] = []

    async def pump(reader: asyncio.StreamReader, channel: int) -> None:
        while data := await reader.read(65536):
            await ws.send_bytes(bytes([channel]) + data)
        await ws.close()

    try:
        for i, port in enumerate(ports):
            for channel in (2 * i, 2 * i + 1):
                await ws.send_bytes(bytes([channel]) + port.to_bytes(2, "little"))
            target = next((t for matches, p, t in api.pod_ports if p == port and matches(pod)), None)
            try:
                if target is None:
                    raise ConnectionRefusedError("connection refused")
                reader, writers[2 * i] = await asyncio.open_connection(*target)
            except OSError as exc:
                await ws.send_bytes(bytes([2 * i + 1]) + f"error forwarding port {port} to pod {name}: failed to "
                                    f"connect to localhost:{port}: {exc}".encode())
                continue
            pumps.append(asyncio.create_task(pump(reader, 2 * i)))
        async for msg in ws:
            if msg.type == web.WSMsgType.BINARY and msg.data and msg.data[0] in writers:
                writers[msg.data[0]].write(msg.data[1:])
                await writers[msg.data[0]].drain()
    except (ConnectionError, RuntimeError):
        pass  # either side went away
    finally:
        for task in pumps:
            task.cancel()
        for writer in writers.values():
            writer.close()
    return ws


async def pod_log(api: FakeKubeAPI, request: web.Request, pod: Obj) -> web.StreamResponse:
    """GET pods/NAME/log: the API server checks the container name, then asks the pod's kubelet."""
    spec, name = pod.get("spec", {}), pod["metadata"]["name"]
    containers = [c["name"] for c in spec.get("containers") or []]
    inits = [c["name"] for c in spec.get("initContainers") or []]
    container = request.query.get("container")
    if not container:
        if len(containers) != 1:
            raise ApiError(400, "BadRequest", f"a container name must be specified for pod {name}, choose one of: "
                                              f"[{' '.join(containers)}] or one of the init containers: "
                                              f"[{' '.join(inits)}]")
        container = containers[0]
    elif container not in containers + inits:
        raise ApiError(400, "BadRequest", f"container {container} is not valid for pod {name}")
    vk = api.virtual_kubelets.get(spec.get("nodeName") or "")
    if vk is None:
        raise ApiError(404, "NotFound", "the server could not find the requested resource")
    tail = request.query.get("tailLines")
    text = await asyncio.get_running_loop().run_in_executor(
        None, vk.logs, pod, container, int(tail) if tail else None)
    return web.Response(text=text, content_type="text/plain")


def split_scheme_name_port(ident: str) -> tuple[str, str, str]:
    """k8s.io/apimachinery `SplitSchemeNamePort`: NAME, NAME:PORT or SCHEME:NAME:PORT."""
    parts = ident.split(":")
    scheme, name, port = ("", parts[0], "") if len(parts) == 1 else ("", parts[0], parts[1]) if len(parts) == 2 \
        else (parts[0], parts[1], parts[2]) if len(parts) == 3 else ("", "", "")
    if not name or scheme not in ("", "http", "https"):
        raise ApiError(400, "BadRequest", f"invalid service request {ident!r}")
    return scheme or "http", name, port


def service_location(api: FakeKubeAPI, ns: str, ident: str) -> tuple[str, str, int]:
    """(scheme, host, port) of one ready endpoint serving the requested service port, or the API server's error.
    A pod on a regular node is reached where the test said it listens (`FakeKubeAPI.serve_pod_port`)."""
    scheme, name, port = split_scheme_name_port(ident)
    svc = api.store.get(SERVICES, ns, name)
    port_name: str | None = port
    if port.isdigit():
        found = next((p for p in svc.get("spec", {}).get("ports") or [] if p["port"] == int(port)), None)
        if found is None:
            raise ApiError(503, "ServiceUnavailable", f'no service port {port} found for service "{name}"')
        port_name = found.get("name", "")
    endpoints = api.store.find(ENDPOINTS, ns, name)
    if endpoints is None:
        raise ApiError.not_found(ENDPOINTS, name)
    if not endpoints.get("subsets"):
        raise ApiError(503, "ServiceUnavailable", f'no endpoints available for service "{name}"')
    addresses = ready_addresses(endpoints, port_name or "")
    if not addresses:
        raise ApiError(503, "ServiceUnavailable", f'no endpoints available for service "{ident}"')
    address, target = addresses[0]
    ref = address.get("targetRef") or {}
    pod = api.store.find(PODS, ref.get("namespace"), ref.get("name", ""))
    if pod is not None and pod["spec"].get("nodeName") not in api.virtual_kubelets:
        mapped = next((t for matches, p, t in api.pod_ports if p == target and matches(pod)), None)
        if mapped is not None:
            return scheme, mapped[0], mapped[1]
    if api.pod_network is None or not api.pod_network.contains(address["ip"]):
        # a pod network this machine does not have: nothing listens there (and nothing is dialled off-machine)
        raise ApiError(503, "ServiceUnavailable", f"error trying to reach service: dial tcp {address['ip']}:{target}: "
                                                  f"connect: connection refused")
    return scheme, address["ip"], target


def _connector(api: FakeKubeAPI, ip: str) -> aiohttp.TCPConnector:
    """Connections to pods on the box's pod network are made from inside it (tests/fake_interlink_net.py)."""
    network = api.pod_network
    factory: Callable[[Any], socket.socket] | None = None
    if network is not None and network.contains(ip):
        factory = network.socket_factory
    return aiohttp.TCPConnector(force_close=True, **({"socket_factory": factory} if factory else {}))


async def service_proxy(api: FakeKubeAPI, request: web.Request, ns: str, ident: str, path: str) -> web.StreamResponse:
    scheme, ip, port = api.call(service_location, api, ns, ident)
    target = f"{scheme}://{ip}:{port}/{path}"
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with aiohttp.ClientSession(connector=_connector(api, ip), timeout=timeout,
                                     auto_decompress=False) as session:
        try:
            if request.headers.get("Upgrade", "").lower() == "websocket":
                return await _relay_websocket(session, request, target, headers)
            body = await request.read()
            async with session.request(request.method, target, params=request.query, headers=headers,
                                       data=body or None, allow_redirects=False) as upstream:
                resp = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers={
                    k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP})
                await resp.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
        except aiohttp.ClientConnectorError as exc:
            raise ApiError(503, "ServiceUnavailable",
                           f"error trying to reach service: dial tcp {ip}:{port}: connect: "
                           f"{_errno_text(exc)}") from None


def _errno_text(exc: aiohttp.ClientConnectorError) -> str:
    os_error = exc.os_error
    return {111: "connection refused", 113: "no route to host", 101: "network is unreachable",
            110: "connection timed out"}.get(os_error.errno or 0, str(os_error))


async def _relay_websocket(session: aiohttp.ClientSession, request: web.Request, target: str,
                           headers: dict[str, str]) -> web.StreamResponse:
    protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    drop = {"sec-websocket-key", "sec-websocket-version", "sec-websocket-protocol", "sec-websocket-extensions"}
    upstream = await session.ws_connect(target, protocols=protocols, params=request.query,
                                        headers={k: v for k, v in headers.items() if k.lower() not in drop})
    ws = web.WebSocketResponse(protocols=[upstream.protocol] if upstream.protocol else ())
    await ws.prepare(request)

    async def pipe(src: Any, dst: Any) -> None:
        async for msg in src:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await dst.send_str(msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await dst.send_bytes(msg.data)
            else:
                break
        await dst.close()

    await asyncio.gather(pipe(upstream, ws), pipe(ws, upstream), return_exceptions=True)
    return ws


async def pod_subresource(api: FakeKubeAPI, request: web.Request, ns: str, name: str, sub: str) -> web.StreamResponse:
    pod = api.call(api.store.get, PODS, ns, name)
    on_virtual = (pod.get("spec", {}).get("nodeName") or "") in api.virtual_kubelets
    if sub == "log":
        return await pod_log(api, request, pod)
    if on_virtual:
        return not_implemented()
    if sub == "portforward":
        return await kubelet_portforward(api, request, pod)
    raise ApiError(404, "NotFound", "the server could not find the requested resource")
