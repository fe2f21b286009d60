"""A fake Kubernetes API server on 127.0.0.1 that real helm 3/4, kubectl and the `kubernetes` client talk to.

No kube-apiserver can run on this machine, so tests run against this: aiohttp in a background thread, holding
objects in memory, answering at the network boundary the way a real server does (discovery, OpenAPI v3,
protobuf Secrets from helm, selectors, patches, watches with bookmarks and 410 Gone, finalizers, garbage
collection), the pod subresources a kubelet answers and the service proxy. `FakeKubeAPI.operator` plays KubeRay,
the kube-scheduler, the endpoints controller and the kubelet of the regular node `fake-node-1`; interLink virtual
nodes register their virtual kubelet in `virtual_kubelets` (tests/fake_interlink.py, started by
tests/fake_site_box.py).

The pieces, by concern:
- tests/fake_kube_objects.py — resources, the errors the server answers with, label and field selectors;
- tests/fake_kube_patches.py — merge / JSON patch / server-side apply, protobuf request bodies;
- tests/fake_kube_store.py — objects, resource versions, watchers, defaulting, validation, deletion and GC;
- tests/fake_kube_proxy.py — port-forward (regular node), 501 (virtual node), pod logs, the service proxy;
- tests/fake_kube_scheduler.py — nodes, the scheduler's filters and messages, Endpoints, cluster DNS;
- tests/fake_kuberay_operator.py, tests/fake_kuberay_pods.py — KubeRay and the fake kubelet.

Everything in `Store` runs on the server's event loop thread; the public methods of `FakeKubeAPI` may be called
from any thread.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import copy
import functools
import json
import os
import socket
import ssl
import tempfile
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import yaml
from aiohttp import web

from tests.fake_kube_objects import (CRDS, ENDPOINTS, NAMESPACES, PODS, SERVICES, ApiError, Obj, Resource, field_matcher,
                                     label_matcher, now_iso)
from tests.fake_kube_proxy import pod_subresource, service_proxy
from tests.fake_kube_scheduler import cluster_hosts
from tests.fake_kube_patches import decode_protobuf
from tests.fake_kube_store import ABORT, DROP, Change, Store, Watcher

__all__ = ["MINIMAL_RAYCLUSTER_CRD", "ApiError", "Change", "FakeKubeAPI", "Obj", "Resource", "Store", "now_iso",
           "serve"]

KUBE_VERSION = {"major": "1", "minor": "33", "gitVersion": "v1.33.0", "gitCommit": "fake", "gitTreeState": "clean",
                "buildDate": "2025-05-01T00:00:00Z", "goVersion": "go1.24.0", "compiler": "gc",
                "platform": "linux/amd64"}
WATCH_DEFAULT_TIMEOUT_S = 1800.0


def default_crd() -> Path:
    """The KubeRay 1.2.2 RayCluster CRD in $HPCRAY_CHARTS_DIR/crds, else ../shared/charts/crds."""
    charts = os.environ.get("HPCRAY_CHARTS_DIR") or Path(__file__).resolve().parents[2] / "shared" / "charts"
    return Path(charts) / "crds" / "ray.io_rayclusters-1.2.2.yaml"


# Stands in for the real CRD when the charts are absent: RayCluster is served, its spec is not validated.
MINIMAL_RAYCLUSTER_CRD: Obj = {
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": "rayclusters.ray.io"},
    "spec": {"group": "ray.io", "scope": "Namespaced",
             "names": {"kind": "RayCluster", "listKind": "RayClusterList", "plural": "rayclusters",
                       "singular": "raycluster"},
             "versions": [{"name": "v1", "served": True, "storage": True, "subresources": {"status": {}},
                           "schema": {"openAPIV3Schema": {"type": "object",
                                                          "x-kubernetes-preserve-unknown-fields": True}}}]}}


@functools.lru_cache(maxsize=8)
def _load_yaml(path: str) -> Obj:
    """Parsed once per process: a KubeRay CRD is 0.9 MB of YAML (1.5 s with the pure-Python loader)."""
    return yaml.load(Path(path).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _self_signed_cert() -> tuple[bytes, bytes]:
    """(certificate, key) PEM for 127.0.0.1, valid for a day."""
    from datetime import timedelta
    from ipaddress import IPv4Address

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-kube-api")])
    start = datetime.now(timezone.utc) - timedelta(minutes=5)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start)
            .not_valid_after(start + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(IPv4Address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


# ---------------------------------------------------------------------------------------------------------------
# Discovery and OpenAPI
# ---------------------------------------------------------------------------------------------------------------

VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


def resource_list(group_version: str, resources: list[Resource]) -> Obj:
    items: list[Obj] = []
    for r in resources:
        items.append({"name": r.plural, "singularName": r.kind.lower(), "namespaced": r.namespaced, "kind": r.kind,
                      "verbs": VERBS, "shortNames": list(r.short_names)})
        if r.has_status:
            items.append({"name": f"{r.plural}/status", "singularName": "", "namespaced": r.namespaced,
                          "kind": r.kind, "verbs": ["get", "patch", "update"]})
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": items}


def _pb_bytes(num: int, payload: bytes) -> bytes:
    return bytes([num << 3 | 2, len(payload)]) + payload  # a short length-delimited protobuf field


# An OpenAPI v2 Document (gnostic protobuf) with no definitions: client-side validation finds no schema for a
# kind and lets the server judge it — so a kind nobody serves fails as "no matches for kind", like on a real cluster.
OPENAPI_V2 = _pb_bytes(1, b"2.0") + _pb_bytes(2, _pb_bytes(1, b"Kubernetes") + _pb_bytes(2, b"v1.33.0"))


def openapi_v3_doc(resources: list[Resource]) -> Obj:
    """A group-version document whose PATCH operations declare `fieldValidation`: helm and kubectl then leave
    validation to the server instead of fetching schemas."""
    paths: Obj = {}
    for r in resources:
        prefix = f"/apis/{r.group}/{r.version}" if r.group else f"/api/{r.version}"
        path = f"{prefix}/namespaces/{{namespace}}/{r.plural}/{{name}}" if r.namespaced else f"{prefix}/{r.plural}/{{name}}"
        paths[path] = {"patch": {
            "operationId": f"patch{r.kind}", "x-kubernetes-action": "patch",
            "x-kubernetes-group-version-kind": {"group": r.group, "version": r.version, "kind": r.kind},
            "parameters": [{"name": n, "in": "query", "schema": {"type": "string"}}
                           for n in ("dryRun", "fieldManager", "fieldValidation", "force")],
            "responses": {"200": {"description": "OK"}}}}
    return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": KUBE_VERSION["gitVersion"]},
            "paths": paths, "components": {"schemas": {}}}


# ---------------------------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------------------------

class FakeKubeAPI:
    """A Kubernetes API server for tests: `with FakeKubeAPI() as api: api.write_kubeconfig(path)`.

    `token`: require `Authorization: Bearer <token>` (401 otherwise). `tls`: serve https with a self-signed
    certificate (default: when a token is set, because client-go — helm, kubectl — never sends a token over plain
    http). `crds`: CRD files to serve (default: the RayCluster CRD from the shared charts, else a minimal one).
    `operator`: run the fake KubeRay operator (`api.operator`). `history`: how many writes a watch can resume
    across before it gets 410 Gone.
    """

    def __init__(self, *, port: int = 0, token: str | None = None, tls: bool | None = None,
                 crds: Sequence[Path] | None = None, operator: bool = True, history: int = 1000) -> None:
        self.port = port
        self.token = token
        use_tls = token is not None if tls is None else tls
        self._cert: tuple[bytes, bytes] | None = _self_signed_cert() if use_tls else None
        self.store = Store(history)
        self.requests: collections.deque[str] = collections.deque(maxlen=5000)  # "METHOD /path?query content-type"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.kubeconfig: Path | None = None  # the last one write_kubeconfig wrote
        # What listens inside the fake pods: (label selector, container port) -> a real 127.0.0.1 address that
        # the portforward endpoint connects to (a test's Ray head, say). See serve_pod_port().
        self.pod_ports: list[tuple[Callable[[Obj], bool], int, tuple[str, int]]] = []
        # interLink virtual kubelets by node name (tests/fake_interlink.py registers itself here)
        self.virtual_kubelets: dict[str, Any] = {}
        self.pod_network: Any = None  # the box's pod network (tests/fake_interlink_net.py), or None
        self.cluster_dns: Path | None = None  # a hosts file kept in step with the Services' ready endpoints
        for ns in ("default", "kube-system"):
            self.store.create(NAMESPACES, {"metadata": {"name": ns}})
        crd_files = list(crds) if crds is not None else [default_crd()] if default_crd().is_file() else []
        for path in crd_files:
            self.apply_crd(path)
        if crds is None and not crd_files:
            self.store.create(CRDS, MINIMAL_RAYCLUSTER_CRD)
        from tests.fake_kuberay_operator import FakeKubeRayOperator  # imports this module

        self.operator: FakeKubeRayOperator | None = FakeKubeRayOperator(self) if operator else None

    # -- lifecycle -----------------------------------------------------------------------------------------------
    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The server's event loop while it serves (where the store lives)."""
        return self._loop

    @property
    def url(self) -> str:
        return f"{'https' if self._cert else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> FakeKubeAPI:
        """Serve in a background thread (again on the same port after stop(), keeping every object)."""
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._serve, args=(started,), name="fake-kube-api", daemon=True)
        self._thread.start()
        started.result(timeout=30)
        return self

    def stop(self) -> None:
        """Stop serving within about a second, cutting open watches; objects stay for a later start()."""
        if self._loop is None or self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._thread = None

    def restart(self) -> None:
        """An API server restart: connections are cut, the same port answers again with the same objects."""
        self.stop()
        self.start()

    def __enter__(self) -> FakeKubeAPI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self, started: concurrent.futures.Future[None]) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._open())
        except BaseException as exc:  # reported to start()'s caller
            loop.close()
            started.set_exception(exc)
            return
        self._loop = loop
        started.set_result(None)
        loop.run_forever()
        loop.run_until_complete(self._close())
        self._loop = None
        loop.close()

    async def _open(self) -> None:
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{path:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self._ssl_context())
        await site.start()
        self.port = self._runner.addresses[0][1]
        if self.operator:
            self.operator.attach(asyncio.get_running_loop())

    def _ssl_context(self) -> ssl.SSLContext | None:
        if self._cert is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "cert.pem").write_bytes(self._cert[0])
            (Path(tmp) / "key.pem").write_bytes(self._cert[1])
            context.load_cert_chain(Path(tmp) / "cert.pem", Path(tmp) / "key.pem")
        return context

    async def _close(self) -> None:
        if self.operator:
            self.operator.detach()
        self._drop(ABORT)
        assert self._runner is not None
        await self._runner.cleanup()

    # -- test controls -------------------------------------------------------------------------------------------
    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run fn on the server's loop thread (where the store lives) and return its result."""
        loop = self._loop
        if loop is None or (self._thread is not None and threading.current_thread() is self._thread):
            return fn(*args, **kwargs)
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # handed to the calling thread
                done.set_exception(exc)
        loop.call_soon_threadsafe(run)
        return done.result(timeout=30)

    def resource(self, name: str) -> Resource:
        """A served resource by plural, qualified plural or kind: `pods`, `rayclusters.ray.io`, `RayCluster`."""
        found = self.call(lambda: [r for r in self.store.resources() if name in (r.plural, r.qualified, r.kind)])
        if not found:
            raise KeyError(f"no resource {name!r} served")
        return found[0]

    def get(self, resource: str, name: str, namespace: str | None = "default") -> Obj | None:
        """A copy of one object, or None."""
        res = self.resource(resource)
        return copy.deepcopy(self.call(self.store.find, res, namespace if res.namespaced else None, name))

    def list(self, resource: str, namespace: str | None = "default", labels: str = "", fields: str = "") -> list[Obj]:
        """Copies of the objects matching the selectors (namespace None: all namespaces)."""
        res = self.resource(resource)
        return copy.deepcopy(self.call(self.store.list, res, namespace if res.namespaced else None, labels, fields))

    def create(self, obj: Obj, namespace: str | None = None) -> Obj:
        """Create an object as a client would; raises ApiError like the server answers."""
        return copy.deepcopy(self.call(self.store.create, self.resource(obj["kind"]), obj, namespace))

    def apply_crd(self, path: Path | str) -> None:
        """Install a CustomResourceDefinition from a YAML file, replacing one of the same name (a KubeRay upgrade)."""
        crd = _load_yaml(str(path))

        def run() -> None:
            live = self.store.find(CRDS, None, crd["metadata"]["name"])
            if live is None:
                self.store.create(CRDS, crd)
            else:
                self.store.replace(CRDS, None, crd["metadata"]["name"], {**crd, "metadata": live["metadata"]})
        self.call(run)

    def delete(self, resource: str, name: str, namespace: str | None = "default", propagation: str | None = None) -> None:
        """Delete an object as a client would (finalizers, cascade, pod grace)."""
        res = self.resource(resource)
        self.call(self.store.delete, res, namespace if res.namespaced else None, name, propagation)

    def write_cluster_dns(self) -> None:
        """Rewrite `cluster_dns` in place when the Services' ready endpoints changed (a container that bind-mounted
        it as /etc/hosts sees the new content: the inode stays)."""
        if self.cluster_dns is None:
            return
        text = cluster_hosts(self.store.list(ENDPOINTS), socket.gethostname())
        path = self.cluster_dns
        if path.exists() and path.read_text() == text:
            return
        with open(path, "r+" if path.exists() else "w") as f:
            f.write(text)
            f.truncate()

    def serve_pod_port(self, selector: str, port: int, target: tuple[str, int]) -> None:
        """Pods matching the label selector listen on `port`: a port-forward to it reaches `target`."""
        self.pod_ports.append((label_matcher(selector), port, target))

    def drop_watches(self, abrupt: bool = False) -> int:
        """End every open watch (cleanly, or by cutting the connection): clients must re-watch. Returns how many."""
        return self.call(self._drop, ABORT if abrupt else DROP)

    def _drop(self, how: str) -> int:
        for w in self.store.watchers:
            w.queue.put_nowait(how)
        return len(self.store.watchers)

    def compact(self) -> int:
        """Forget the event history, like etcd compaction: watching from any older resourceVersion gets 410 Gone.
        Returns the current resourceVersion."""
        def run() -> int:
            self.store.history.clear()
            self.store.compacted_rv = self.store.rv
            return self.store.rv
        return self.call(run)

    def write_kubeconfig(self, path: Path | str, *, context: str = "fake", namespace: str | None = None,
                         token: str | None = None) -> Path:
        """A kubeconfig for helm, kubectl and kubernetes.config.load_kube_config: the server's token (or `token`,
        e.g. a wrong one) and CA certificate, `namespace` as the context's default."""
        user = {"token": token or self.token} if (token or self.token) else {}
        ctx: Obj = {"cluster": context, "user": context, **({"namespace": namespace} if namespace else {})}
        cluster: Obj = {"server": self.url}
        if self._cert:
            cluster["certificate-authority-data"] = base64.b64encode(self._cert[0]).decode()
        config = {"apiVersion": "v1", "kind": "Config", "current-context": context, "preferences": {},
                  "clusters": [{"name": context, "cluster": cluster}],
                  "users": [{"name": context, "user": user}], "contexts": [{"name": context, "context": ctx}]}
        path = Path(path)
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        self.kubeconfig = path
        return path

    # -- HTTP ----------------------------------------------------------------------------------------------------
    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
        self.requests.append(f"{request.method} {request.path_qs} {request.content_type}")
        if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response(ApiError(401, "Unauthorized", "Unauthorized").status(), status=401)
        try:
            return await handler(request)
        except ApiError as exc:
            return web.json_response(exc.status(), status=exc.code)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        segs = [s for s in request.path.split("/") if s]
        store = self.store
        if segs == ["version"]:
            return web.json_response(KUBE_VERSION)
        if segs[:1] == ["openapi"]:
            return self._openapi(segs[1:])
        if segs == ["api"]:
            return web.json_response({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": f"127.0.0.1:{self.port}"}]})
        if segs == ["apis"]:
            return web.json_response({"kind": "APIGroupList", "apiVersion": "v1", "groups": self._groups()})
        if len(segs) == 2 and segs[0] == "apis" and (g := [g for g in self._groups() if g["name"] == segs[1]]):
            return web.json_response({"kind": "APIGroup", "apiVersion": "v1", **g[0]})
        if len(segs) < 2 or segs[0] not in ("api", "apis") or (segs[0] == "apis" and len(segs) < 3):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        group, version, rest = ("", segs[1], segs[2:]) if segs[0] == "api" else (segs[1], segs[2], segs[3:])
        if not rest:
            served = [r for r in store.resources() if (r.group, r.version) == (group, version)]
            if not served:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            return web.json_response(resource_list(f"{group}/{version}".lstrip("/"), served))
        namespace = None
        res = store.resource(group, version, rest[2]) if rest[0] == "namespaces" and len(rest) >= 3 else None
        if res is not None and res.namespaced:
            namespace, rest = rest[1], rest[2:]
        else:
            res = store.resource(group, version, rest[0])
        if res is PODS and len(rest) == 3 and rest[2] in ("portforward", "exec", "attach", "log") and namespace:
            return await pod_subresource(self, request, namespace, rest[1], rest[2])
        if res is SERVICES and len(rest) >= 3 and rest[2] == "proxy" and namespace:
            # the path after proxy/ goes on as given, a trailing slash included (Ray's POST /api/jobs/ needs it)
            tail = "/".join(rest[3:]) + ("/" if len(rest) > 3 and request.path.endswith("/") else "")
            return await service_proxy(self, request, namespace, rest[1], tail)
        if res is None or len(rest) > 3 or (len(rest) == 3 and not (rest[2] == "status" and res.has_status)):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        name, sub = (rest[1:] + ["", ""])[:2]
        return await self._verb(request, res, namespace, name, sub)

    async def _verb(self, request: web.Request, res: Resource, ns: str | None, name: str,
                    sub: str) -> web.StreamResponse:
        q, store, m = request.query, self.store, request.method
        dry_run = "dryRun" in q
        if m == "GET" and not name and q.get("watch") in ("1", "true"):
            return await self._watch(request, res, ns)
        if m == "GET" and not name:
            items = store.list(res, ns, q.get("labelSelector", ""), q.get("fieldSelector", ""))
            return web.json_response({"kind": f"{res.kind}List", "apiVersion": res.api_version,
                                      "metadata": {"resourceVersion": str(store.rv)}, "items": items})
        if m == "GET":
            return web.json_response(store.get(res, ns, name))
        if m == "POST" and not name:
            return web.json_response(store.create(res, await self._body(request), ns, dry_run), status=201)
        if m == "PUT" and name:
            return web.json_response(store.replace(res, ns, name, await self._body(request), sub, dry_run))
        if m == "PATCH" and name:
            created = store.find(res, ns, name) is None
            out = store.patch(res, ns, name, request.content_type, await self._body(request),
                              q.get("fieldManager", ""), sub, dry_run)
            return web.json_response(out, status=201 if created else 200)
        if m == "DELETE":
            opts = await self._body(request) if request.can_read_body else {}
            propagation = q.get("propagationPolicy") or opts.get("propagationPolicy")
            if propagation is None and (q.get("orphanDependents") == "true" or opts.get("orphanDependents")):
                propagation = "Orphan"
            grace = q.get("gracePeriodSeconds", opts.get("gracePeriodSeconds"))
            grace = None if grace is None else int(grace)
            if name:
                return web.json_response(store.delete(res, ns, name, propagation, grace, dry_run))
            doomed = store.list(res, ns, q.get("labelSelector", ""), q.get("fieldSelector", ""))
            for o in doomed:
                if store.find(res, o["metadata"].get("namespace"), o["metadata"]["name"]) is not None:
                    store.delete(res, o["metadata"].get("namespace"), o["metadata"]["name"], propagation, grace,
                                 dry_run)
            return web.json_response({"kind": f"{res.kind}List", "apiVersion": res.api_version,
                                      "metadata": {"resourceVersion": str(store.rv)}, "items": doomed})
        raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")

    @staticmethod
    async def _body(request: web.Request) -> Any:
        raw = await request.read()
        if raw.startswith(b"k8s\x00"):
            return decode_protobuf(raw)
        try:
            if request.content_type == "application/apply-patch+yaml":
                return yaml.safe_load(raw) or {}
            return json.loads(raw) if raw else {}
        except ValueError as exc:
            raise ApiError(400, "BadRequest", f"the body of the request could not be decoded: {exc}") from None

    def _groups(self) -> list[Obj]:
        versions: dict[str, list[str]] = {}
        for r in self.store.resources():
            if r.group and r.version not in versions.setdefault(r.group, []):
                versions[r.group].append(r.version)
        return [{"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in vs],
                 "preferredVersion": {"groupVersion": f"{g}/{vs[0]}", "version": vs[0]}}
                for g, vs in versions.items()]

    def _openapi(self, segs: list[str]) -> web.Response:
        if segs == ["v2"]:  # asked (protobuf only) for client-side validation of kinds v3 does not describe
            return web.Response(body=OPENAPI_V2, content_type="application/com.github.proto-openapi.spec.v2.v1.0+protobuf")
        if segs == ["v3"]:
            gvs = {f"api/{r.version}" if not r.group else f"apis/{r.group}/{r.version}" for r in self.store.resources()}
            return web.json_response({"paths": {gv: {"serverRelativeURL": f"/openapi/v3/{gv}?hash={self.store.rv}"}
                                                for gv in sorted(gvs)}})
        if segs[:1] == ["v3"] and len(segs) in (3, 4):
            group, version = ("", segs[2]) if segs[1] == "api" else (segs[2], segs[3] if len(segs) == 4 else "")
            served = [r for r in self.store.resources() if (r.group, r.version) == (group, version)]
            if served:
                return web.json_response(openapi_v3_doc(served))
        raise ApiError(404, "NotFound", "the server could not find the requested resource")

    async def _watch(self, request: web.Request, res: Resource, ns: str | None) -> web.StreamResponse:
        q, store = request.query, self.store
        rv, initial = q.get("resourceVersion", ""), q.get("sendInitialEvents") == "true"
        if initial and (q.get("resourceVersionMatch") != "NotOlderThan" or q.get("allowWatchBookmarks") != "true"):
            raise ApiError(422, "Invalid", "ListOptions.meta.k8s.io \"\" is invalid: sendInitialEvents requires "
                                           "resourceVersionMatch=NotOlderThan and allowWatchBookmarks=true")
        if rv and not rv.isdigit():
            raise ApiError(400, "BadRequest", f"invalid resource version: {rv}")
        watcher = Watcher(res, ns, label_matcher(q.get("labelSelector", "")),
                          field_matcher(q.get("fieldSelector", ""), res))
        # Backlog and registration happen with no await in between, so no write can fall in a gap.
        backlog: list[tuple[str, Obj]] = []
        if initial or rv in ("", "0"):
            backlog = [("ADDED", o) for o in store.list(res, ns) if watcher.matches(o)]
            if initial:
                backlog.append(("BOOKMARK", {"kind": res.kind, "apiVersion": res.api_version, "metadata": {
                    "resourceVersion": str(store.rv), "annotations": {"k8s.io/initial-events-end": "true"}}}))
        elif int(rv) < store.compacted_rv:
            backlog = [("ERROR", ApiError(410, "Expired", f"too old resource version: {rv} "
                                                          f"({store.compacted_rv})").status())]
        else:
            backlog = [e for c in store.history if c.rv > int(rv) and (e := watcher.event_for(c)) is not None]
        if backlog[-1:] and backlog[-1][0] == "ERROR":
            watcher.queue.put_nowait(DROP)
        else:
            store.watchers.add(watcher)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(q.get("timeoutSeconds") or WATCH_DEFAULT_TIMEOUT_S)
        try:
            await resp.prepare(request)
            for event in backlog:
                await resp.write(json.dumps({"type": event[0], "object": event[1]}).encode() + b"\n")
            while True:
                try:
                    item = await asyncio.wait_for(watcher.queue.get(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    break
                if item == ABORT and request.transport is not None:
                    request.transport.abort()
                if isinstance(item, str):
                    break
                await resp.write(json.dumps({"type": item[0], "object": item[1]}).encode() + b"\n")
            await resp.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client went away, or the connection was cut on purpose
        finally:
            store.watchers.discard(watcher)
        return resp


def serve(directory: Path, **options: Any) -> Iterator[FakeKubeAPI]:
    """For a pytest fixture — `yield from serve(tmp_path)`: a started server whose kubeconfig is
    `directory/kubeconfig` (`api.kubeconfig`), stopped afterwards; fails the test if the fake operator broke."""
    with FakeKubeAPI(**options) as api:
        api.write_kubeconfig(Path(directory) / "kubeconfig")
        yield api
        errors = api.operator.errors if api.operator else []
        assert not errors, "the fake operator failed:\n" + "\n".join(errors)
