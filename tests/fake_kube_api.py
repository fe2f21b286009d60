"""A fake Kubernetes API server on 127.0.0.1 that real helm 3/4, kubectl and the `kubernetes` client talk to.

No kube-apiserver can run on this machine, so tests run against this: aiohttp in a background thread, holding
objects in memory, answering at the network boundary the way a real server does (discovery, OpenAPI v3,
protobuf Secrets from helm, selectors, patches, watches with bookmarks and 410 Gone, finalizers, garbage
collection). `FakeKubeAPI.operator` plays KubeRay, the scheduler and the kubelet (tests/fake_kuberay_operator.py).

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
import re
import ssl
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import yaml
from aiohttp import web

Obj = dict[str, Any]
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


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------------------------------
# Resources: what the server serves, and the errors it answers with
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    fields: frozenset[str] = frozenset()  # field selectors beyond metadata.name and metadata.namespace
    has_status: bool = True  # a status subresource: writes to the main resource leave .status alone
    short_names: tuple[str, ...] = ()
    schema: Obj | None = field(default=None, compare=False, hash=False)  # a custom resource's openAPIV3Schema

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        """The name Kubernetes uses in messages and this store uses as a key: `pods`, `rayclusters.ray.io`."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


_EVENT_FIELDS = frozenset({"involvedObject.kind", "involvedObject.namespace", "involvedObject.name",
                           "involvedObject.uid", "involvedObject.apiVersion", "involvedObject.resourceVersion",
                           "involvedObject.fieldPath", "reason", "reportingComponent", "type"})
_POD_FIELDS = frozenset({"spec.nodeName", "spec.restartPolicy", "spec.schedulerName", "spec.serviceAccountName",
                         "status.phase", "status.podIP", "status.nominatedNodeName"})
NAMESPACES = Resource("", "v1", "namespaces", "Namespace", False, frozenset({"status.phase"}), short_names=("ns",))
NODES = Resource("", "v1", "nodes", "Node", False, frozenset({"spec.unschedulable"}), short_names=("no",))
PODS = Resource("", "v1", "pods", "Pod", fields=_POD_FIELDS, short_names=("po",))
SERVICES = Resource("", "v1", "services", "Service", short_names=("svc",))
SECRETS = Resource("", "v1", "secrets", "Secret", fields=frozenset({"type"}), has_status=False)
CONFIGMAPS = Resource("", "v1", "configmaps", "ConfigMap", has_status=False, short_names=("cm",))
EVENTS = Resource("", "v1", "events", "Event", fields=_EVENT_FIELDS, has_status=False, short_names=("ev",))
SERVICEACCOUNTS = Resource("", "v1", "serviceaccounts", "ServiceAccount", has_status=False, short_names=("sa",))
DEPLOYMENTS = Resource("apps", "v1", "deployments", "Deployment", short_names=("deploy",))
CRDS = Resource("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition", False,
                short_names=("crd",))
BUILTIN = (NAMESPACES, NODES, PODS, SERVICES, SECRETS, CONFIGMAPS, EVENTS, SERVICEACCOUNTS, DEPLOYMENTS, CRDS)


class ApiError(Exception):
    """Answered as a metav1.Status with this code and reason."""

    def __init__(self, code: int, reason: str, message: str, details: Obj | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> Obj:
        out: Obj = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": self.message, "reason": self.reason, "code": self.code}
        if self.details:
            out["details"] = self.details
        return out

    @classmethod
    def not_found(cls, res: Resource, name: str) -> ApiError:
        return cls(404, "NotFound", f'{res.qualified} "{name}" not found',
                   {"name": name, "group": res.group, "kind": res.plural})


def resources_from_crd(crd: Obj) -> list[Resource]:
    """The custom resources a CustomResourceDefinition serves, one per served version."""
    spec, names = crd["spec"], crd["spec"]["names"]
    return [Resource(spec["group"], v["name"], names["plural"], names["kind"], spec.get("scope") == "Namespaced",
                     has_status="status" in (v.get("subresources") or {}),
                     short_names=tuple(names.get("shortNames", ())),
                     schema=(v.get("schema") or {}).get("openAPIV3Schema"))
            for v in spec.get("versions", []) if v.get("served", True)]


# ---------------------------------------------------------------------------------------------------------------
# Selectors
# ---------------------------------------------------------------------------------------------------------------

_LABEL_REQ = re.compile(r"^(!?)([\w./-]+)(?:\s*(==|=|!=)\s*([\w.-]*)|\s+(in|notin)\s*\(([^)]*)\))?$")


def label_matcher(selector: str) -> Callable[[Obj], bool]:
    """A predicate on objects for a label selector: `a=b`, `a!=b`, `a in (x,y)`, `a notin (x)`, `a`, `!a`."""
    tests: list[Callable[[dict[str, str]], bool]] = []
    for part in re.split(r",(?![^(]*\))", selector or ""):
        if not part.strip():
            continue
        m = _LABEL_REQ.match(part.strip())
        if not m or (m[1] and (m[3] or m[5])):
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {part.strip()!r}")
        neg, key, op, value, set_op, values = m.groups()
        choices = {v.strip() for v in (values or "").split(",")}
        if op:
            tests.append(lambda ls, k=key, v=value, ne=op == "!=": (ls.get(k) == v) != ne)
        elif set_op:
            tests.append(lambda ls, k=key, c=choices, ne=set_op == "notin": (ls.get(k) in c) != ne)
        else:
            tests.append(lambda ls, k=key, ne=bool(neg): (k in ls) != ne)
    return lambda obj: all(t(obj["metadata"].get("labels") or {}) for t in tests)


def field_matcher(selector: str, res: Resource) -> Callable[[Obj], bool]:
    """A predicate for a field selector (`metadata.name=x,status.phase!=Running`), fields limited like Kubernetes."""
    reqs: list[tuple[list[str], bool, str]] = []
    for part in (selector or "").split(","):
        if not part.strip():
            continue
        m = re.match(r"^\s*([^=!\s]+)\s*(==|=|!=)\s*(.*?)\s*$", part)
        if not m:
            raise ApiError(400, "BadRequest", f"invalid selector: {selector!r}")
        if m[1] not in res.fields | {"metadata.name", "metadata.namespace"}:
            raise ApiError(400, "BadRequest", f'field label not supported: {m[1]}')
        reqs.append((m[1].split("."), m[2] == "!=", m[3]))

    def match(obj: Obj) -> bool:
        for path, negate, want in reqs:
            cur: Any = obj
            for p in path:
                cur = cur.get(p) if isinstance(cur, dict) else None
            have = "" if cur is None else str(cur).lower() if isinstance(cur, bool) else str(cur)
            if (have == want) == negate:
                return False
        return True
    return match


# ---------------------------------------------------------------------------------------------------------------
# Patches: JSON merge (strategic merge is treated as merge), JSON patch, and an approximation of server-side apply
# ---------------------------------------------------------------------------------------------------------------

def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386; `$`-keys (strategic-merge directives such as `$setElementOrder/...`) are dropped."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if k.startswith("$"):
            continue
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def json_patch(doc: Obj, ops: list[Obj]) -> Obj:
    """RFC 6902: add, remove, replace, move, copy, test."""
    doc = copy.deepcopy(doc)

    def locate(pointer: str) -> tuple[Any, str]:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in pointer.split("/")[1:]]
        cur: Any = doc
        for p in parts[:-1]:
            cur = cur[int(p)] if isinstance(cur, list) else cur[p]
        return cur, parts[-1]

    for op in ops:
        try:
            name, value = op["op"], copy.deepcopy(op.get("value"))
            if name in ("move", "copy"):
                src, key = locate(op["from"])
                value = copy.deepcopy(src[int(key)] if isinstance(src, list) else src[key])
                if name == "move":
                    del src[int(key) if isinstance(src, list) else key]
                name = "add"
            parent, key = locate(op["path"])
            index: Any = (len(parent) if key == "-" else int(key)) if isinstance(parent, list) else key
            if name == "add" and isinstance(parent, list):
                parent.insert(index, value)
            elif name == "add":
                parent[index] = value
            elif name not in ("test", "remove", "replace"):
                raise ValueError(f"unknown op {name!r}")
            elif (current := parent[index]) != value and name == "test":  # KeyError/IndexError: no such path
                raise ValueError(f"test failed, value is {current!r}")
            elif name == "remove":
                del parent[index]
            elif name == "replace":
                parent[index] = value
        except (KeyError, IndexError, ValueError, TypeError) as exc:
            raise ApiError(422, "Invalid", f"the server rejected our request due to an error in our request: "
                                           f"{op.get('op')} {op.get('path')}: {exc}") from None
    return doc


def _fieldset(obj: Obj) -> Obj:
    """Field paths of an applied configuration, in managedFields' FieldsV1 shape; lists count as one field."""
    return {f"f:{k}": _fieldset(v) if isinstance(v, dict) else {} for k, v in obj.items()}


def _applied_fields(applied: Obj) -> Obj:
    body = {k: v for k, v in applied.items() if k not in ("apiVersion", "kind", "metadata", "status")}
    meta = {k: v for k, v in applied.get("metadata", {}).items() if k in ("labels", "annotations")}
    return _fieldset({**body, "metadata": meta})


def _prune(obj: Obj, old: Obj, new: Obj) -> None:
    for key, sub in old.items():
        name = key[2:]
        if key not in new:
            obj.pop(name, None)
        elif sub and isinstance(obj.get(name), dict):
            _prune(obj[name], sub, new[key])


def _deep_merge(base: Any, overlay: Any) -> Any:
    if not (isinstance(base, dict) and isinstance(overlay, dict)):
        return copy.deepcopy(overlay)
    return {**base, **{k: _deep_merge(base.get(k), v) for k, v in overlay.items()}}


def server_side_apply(live: Obj, applied: Obj, manager: str) -> Obj:
    """Approximates server-side apply: fields this manager applied before and omits now are removed, the applied
    configuration is merged in (maps by key, lists replaced), and other managers' fields stay."""
    managed = [m for m in live["metadata"].get("managedFields", []) if m.get("operation") == "Apply"]
    mine = next((m for m in managed if m["manager"] == manager), None)
    new_fields = _applied_fields(applied)
    out = copy.deepcopy(live)
    if mine:
        _prune(out, mine["fieldsV1"], new_fields)
    out = _deep_merge(out, {k: v for k, v in applied.items() if k != "status"})
    entry = {"manager": manager, "operation": "Apply", "apiVersion": applied.get("apiVersion", ""),
             "time": now_iso(), "fieldsType": "FieldsV1", "fieldsV1": new_fields}
    out["metadata"]["managedFields"] = [m for m in managed if m["manager"] != manager] + [entry]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Protobuf: client-go's typed clients (helm's release storage, kubectl create) send `k8s\0` + runtime.Unknown
# ---------------------------------------------------------------------------------------------------------------

_PB_META = {1: ("name", "str"), 2: ("generateName", "str"), 3: ("namespace", "str"), 5: ("uid", "str"),
            6: ("resourceVersion", "str"), 11: ("labels", "map"), 12: ("annotations", "map"),
            14: ("finalizers", "list")}
_PB_KINDS: dict[str, dict[int, tuple[str, Any]]] = {
    "Secret": {1: ("metadata", _PB_META), 2: ("data", "map64"), 3: ("type", "str"), 4: ("stringData", "map"),
               5: ("immutable", "bool")},
    "ConfigMap": {1: ("metadata", _PB_META), 2: ("data", "map"), 3: ("binaryData", "map64"), 4: ("immutable", "bool")},
    "Namespace": {1: ("metadata", _PB_META)},  # kubectl create namespace
    "ServiceAccount": {1: ("metadata", _PB_META)},
    "DeleteOptions": {1: ("gracePeriodSeconds", "int"), 3: ("orphanDependents", "bool"),
                      4: ("propagationPolicy", "str"), 5: ("dryRun", "list")},
}


def _pb_fields(buf: bytes) -> Iterator[tuple[int, Any]]:
    """(field number, value) pairs of one protobuf message; varints as int, length-delimited as bytes."""
    i = 0

    def varint() -> int:
        nonlocal i
        value = shift = 0
        while True:
            b = buf[i]
            i += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return value

    while i < len(buf):
        key = varint()
        wire = key & 7
        if wire == 0:
            yield key >> 3, varint()
        elif wire == 2:
            n = varint()
            yield key >> 3, buf[i:i + n]
            i += n
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            raise ApiError(415, "UnsupportedMediaType", f"protobuf wire type {wire} not understood")


def _pb_message(buf: bytes, schema: dict[int, tuple[str, Any]]) -> Obj:
    out: Obj = {}
    for num, raw in _pb_fields(buf):
        if num not in schema:
            continue  # fields this fake does not keep (managedFields, ownerReferences, ...)
        name, kind = schema[num]
        if isinstance(kind, dict):
            out[name] = _pb_message(raw, kind)
        elif kind in ("map", "map64"):
            entry = dict(_pb_fields(raw))
            value = entry.get(2, b"")
            out.setdefault(name, {})[entry.get(1, b"").decode()] = (
                base64.b64encode(value).decode() if kind == "map64" else value.decode())
        elif kind == "list":
            out.setdefault(name, []).append(raw.decode())
        else:
            out[name] = raw.decode() if kind == "str" else bool(raw) if kind == "bool" else raw
    return out


def decode_protobuf(body: bytes) -> Obj:
    """A `k8s\\0`-prefixed runtime.Unknown holding one of _PB_KINDS, as the JSON object (other fields dropped)."""
    unknown = dict(_pb_fields(body[4:]))
    type_meta = dict(_pb_fields(unknown.get(1, b"")))
    api_version, kind = type_meta.get(1, b"").decode(), type_meta.get(2, b"").decode()
    if kind not in _PB_KINDS:
        raise ApiError(415, "UnsupportedMediaType", f"this fake cannot decode a protobuf {kind or 'message'}")
    return {"apiVersion": api_version, "kind": kind, **_pb_message(unknown.get(2, b""), _PB_KINDS[kind])}


# ---------------------------------------------------------------------------------------------------------------
# Store: objects, resource versions, event history, watchers, deletion and garbage collection
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Change:
    """One write: `old` is None for a creation, `new` is None for a deletion (then `old` is the final state)."""
    rv: int
    res: Resource
    old: Obj | None
    new: Obj | None


DROP, ABORT = "drop", "abort"  # what a watcher's queue may hold besides events


@dataclass(eq=False)
class Watcher:
    res: Resource
    namespace: str | None
    labels: Callable[[Obj], bool]
    fields: Callable[[Obj], bool]
    queue: asyncio.Queue[tuple[str, Obj] | str] = field(default_factory=asyncio.Queue)

    def matches(self, obj: Obj | None) -> bool:
        return (obj is not None and (self.namespace is None or obj["metadata"].get("namespace") == self.namespace)
                and self.labels(obj) and self.fields(obj))

    def event_for(self, change: Change) -> tuple[str, Obj] | None:
        """Like the real watch cache: an object leaving the selection is DELETED, one entering it is ADDED."""
        if change.res.qualified != self.res.qualified:
            return None
        if change.new is None:
            return ("DELETED", change.old) if change.old is not None and self.matches(change.old) else None
        was, now = self.matches(change.old), self.matches(change.new)
        if now:
            return ("MODIFIED" if was else "ADDED", change.new)
        return ("DELETED", change.new) if was else None


class Store:
    """Objects by (resource, namespace, name). Only ever touched on the server's event loop thread."""

    def __init__(self, history: int) -> None:
        self.objects: dict[tuple[str, str, str], Obj] = {}
        self.rv = 0
        self.history: collections.deque[Change] = collections.deque(maxlen=history)
        self.compacted_rv = 0  # a watch from an older resourceVersion gets 410 Gone
        self.watchers: set[Watcher] = set()
        self.listeners: list[Callable[[Change], None]] = []  # in-process controllers (the fake operator)

    # -- lookups -------------------------------------------------------------------------------------------------
    def resources(self) -> list[Resource]:
        """Built-in resources plus those served by the stored CustomResourceDefinitions."""
        crds = [o for (q, _, _), o in self.objects.items() if q == CRDS.qualified]
        return [*BUILTIN, *(r for crd in crds for r in resources_from_crd(crd))]

    def resource(self, group: str, version: str, plural: str) -> Resource | None:
        return next((r for r in self.resources() if (r.group, r.version, r.plural) == (group, version, plural)), None)

    def find(self, res: Resource, namespace: str | None, name: str) -> Obj | None:
        return self.objects.get((res.qualified, namespace or "", name))

    def get(self, res: Resource, namespace: str | None, name: str) -> Obj:
        obj = self.find(res, namespace, name)
        if obj is None:
            raise ApiError.not_found(res, name)
        return obj

    def list(self, res: Resource, namespace: str | None = None, labels: str = "", fields: str = "") -> list[Obj]:
        by_labels, by_fields = label_matcher(labels), field_matcher(fields, res)
        return [o for (q, ns, _), o in sorted(self.objects.items())
                if q == res.qualified and (namespace is None or ns == namespace) and by_labels(o) and by_fields(o)]

    def dependents(self, uid: str) -> list[tuple[Resource, Obj]]:
        by_name = {r.qualified: r for r in self.resources()}
        return [(by_name[q], o) for (q, _, _), o in list(self.objects.items()) if q in by_name
                and any(ref.get("uid") == uid for ref in o["metadata"].get("ownerReferences", []))]

    def by_uid(self, uid: str) -> Obj | None:
        return next((o for o in self.objects.values() if o["metadata"].get("uid") == uid), None)

    # -- writes --------------------------------------------------------------------------------------------------
    def _commit(self, res: Resource, old: Obj | None, new: Obj | None) -> Obj:
        self.rv += 1
        target = copy.deepcopy(new if new is not None else old)
        assert target is not None
        target["metadata"]["resourceVersion"] = str(self.rv)
        key = (res.qualified, target["metadata"].get("namespace", ""), target["metadata"]["name"])
        if new is None:
            self.objects.pop(key, None)
            change = Change(self.rv, res, target, None)
        else:
            self.objects[key] = target
            change = Change(self.rv, res, old, target)
        if len(self.history) == self.history.maxlen:
            self.compacted_rv = self.history[0].rv
        self.history.append(change)
        for w in self.watchers:
            if (event := w.event_for(change)) is not None:
                w.queue.put_nowait(event)
        for listener in self.listeners:
            listener(change)
        return target

    def create(self, res: Resource, obj: Obj, namespace: str | None = None, dry_run: bool = False) -> Obj:
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        if res.namespaced:
            namespace = namespace or meta.get("namespace") or "default"
            if meta.get("namespace") not in (None, "", namespace):
                raise ApiError(400, "BadRequest", "the namespace of the provided object does not match the namespace "
                                                  "sent on the request")
            if self.find(NAMESPACES, None, namespace) is None:
                raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found',
                               {"name": namespace, "kind": "namespaces"})
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if not meta.get("name"):
            raise ApiError(422, "Invalid", f'{res.kind} "" is invalid: metadata.name: Required value: name or '
                                           f"generateName is required")
        if self.find(res, namespace, meta["name"]) is not None:
            raise ApiError(409, "AlreadyExists", f'{res.qualified} "{meta["name"]}" already exists',
                           {"name": meta["name"], "group": res.group, "kind": res.plural})
        obj.update(apiVersion=res.api_version, kind=res.kind)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=now_iso(), generation=1)
        for k in ("resourceVersion", "deletionTimestamp"):
            meta.pop(k, None)
        self._default(res, obj)
        self._validate(res, obj)
        return obj if dry_run else self._commit(res, None, obj)

    def _default(self, res: Resource, obj: Obj) -> None:
        if res is PODS:
            obj.setdefault("status", {"phase": "Pending"})
        elif res is SERVICES and obj.setdefault("spec", {}).get("type", "ClusterIP") != "ExternalName":
            n = self.rv + 1
            obj["spec"].setdefault("clusterIP", f"10.96.{n // 250 % 250}.{n % 250 + 1}")
        elif res is NAMESPACES:
            obj["status"] = {"phase": "Active"}
        elif res is SECRETS:
            obj.setdefault("type", "Opaque")

    def _validate(self, res: Resource, obj: Obj) -> None:
        """Secrets' stringData goes into data; custom resources are checked against their CRD's schema, as the
        real server does (422 Invalid)."""
        if res is SECRETS:
            for k, v in (obj.pop("stringData", None) or {}).items():
                obj.setdefault("data", {})[k] = base64.b64encode(v.encode()).decode()
        if not res.schema:
            return
        import jsonschema

        error = jsonschema.exceptions.best_match(jsonschema.Draft7Validator(res.schema).iter_errors(obj))
        if error is None:
            return
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
        if error.validator == "required":
            detail = f"{path}.{error.message.split(chr(39))[1]}: Required value".lstrip(".")
        elif error.validator == "type":
            json_type = {str: "string", bool: "boolean", int: "integer", float: "number", list: "array",
                         dict: "object"}.get(type(error.instance), "null")
            detail = (f'{path}: Invalid value: "{json_type}": {path} in body must be of type {error.validator_value}: '
                      f"{json.dumps(error.instance)[:80]}")
        else:
            detail = f"{path}: Invalid value: {json.dumps(error.instance)[:80]}: {error.message}"
        raise ApiError(422, "Invalid", f'{res.kind}.{res.group} "{obj["metadata"]["name"]}" is invalid: {detail}')

    def replace(self, res: Resource, namespace: str | None, name: str, obj: Obj, subresource: str = "",
                dry_run: bool = False) -> Obj:
        """PUT semantics, used by every write to an existing object (patches and status updates too)."""
        old = self.get(res, namespace, name)
        new = copy.deepcopy(obj)
        meta = new.setdefault("metadata", {})
        want_rv = meta.get("resourceVersion")
        if want_rv and want_rv != old["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {res.qualified} "{name}": the object '
                                            f"has been modified; please apply your changes to the latest version and "
                                            f"try again", {"name": name, "group": res.group, "kind": res.plural})
        if meta.get("name", name) != name:
            raise ApiError(400, "BadRequest", f'the name of the object ({meta["name"]}) does not match the name on '
                                              f"the URL ({name})")
        if subresource == "status":
            new = {**copy.deepcopy(old), "status": new.get("status")}
        elif res.has_status:
            new["status"] = copy.deepcopy(old.get("status"))
        new.update(apiVersion=res.api_version, kind=res.kind)
        for k in ("name", "namespace", "uid", "creationTimestamp", "deletionTimestamp", "generation"):
            if k in old["metadata"]:
                new["metadata"][k] = old["metadata"][k]
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        if {k: v for k, v in new.items() if k not in ("metadata", "status")} != \
                {k: v for k, v in old.items() if k not in ("metadata", "status")}:
            new["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
        if new.get("status") is None:
            new.pop("status", None)
        self._validate(res, new)
        if dry_run or new == old:
            return new
        out = self._commit(res, old, new)
        if out["metadata"].get("deletionTimestamp") and not self._lingers(res, out):
            self._remove(res, out)
        return out

    def patch(self, res: Resource, namespace: str | None, name: str, content_type: str, body: Any,
              manager: str = "", subresource: str = "", dry_run: bool = False) -> Obj:
        """application/{merge-patch,strategic-merge-patch,json-patch}+json and apply-patch+yaml (creates)."""
        live = self.find(res, namespace, name)
        if content_type == "application/apply-patch+yaml":
            if not manager:
                raise ApiError(400, "BadRequest", "fieldManager is required for apply requests")
            if live is None:
                applied = server_side_apply({"metadata": {}}, body, manager)
                applied["metadata"].update(name=name, **({"namespace": namespace} if namespace else {}))
                return self.create(res, applied, namespace, dry_run)
            return self.replace(res, namespace, name, server_side_apply(live, body, manager), subresource, dry_run)
        if live is None:
            raise ApiError.not_found(res, name)
        if content_type == "application/json-patch+json":
            patched = json_patch(live, body)
        elif content_type in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            patched = merge_patch(live, body)
        else:
            raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - "
                                                        f"accepted media types include: application/json-patch+json, "
                                                        f"application/merge-patch+json, application/apply-patch+yaml")
        return self.replace(res, namespace, name, patched, subresource, dry_run)

    def delete(self, res: Resource, namespace: str | None, name: str, propagation: str | None = None,
               grace_seconds: int | None = None, dry_run: bool = False) -> Obj:
        """Deletes now, or marks the object deleting while finalizers (or, for a pod on a node, the kubelet: the
        fake operator) hold it. Dependents: Background (default) deleted after it, Foreground before it, Orphan
        kept."""
        obj = self.get(res, namespace, name)
        if dry_run:
            return obj
        uid = obj["metadata"]["uid"]
        if propagation == "Orphan":
            for dep_res, dep in self.dependents(uid):
                meta = {k: v for k, v in dep["metadata"].items() if k != "ownerReferences"}
                refs = [r for r in dep["metadata"]["ownerReferences"] if r.get("uid") != uid]
                self.replace(dep_res, meta.get("namespace"), meta["name"],
                             {**dep, "metadata": {**meta, **({"ownerReferences": refs} if refs else {})}})
        meta = copy.deepcopy(obj["metadata"])
        if propagation == "Foreground" and self.dependents(uid) and "foregroundDeletion" not in meta.get(
                "finalizers", []):
            meta["finalizers"] = [*meta.get("finalizers", []), "foregroundDeletion"]
        meta.setdefault("deletionTimestamp", now_iso())
        if res is PODS and (grace_seconds is not None or "deletionGracePeriodSeconds" not in meta):
            meta["deletionGracePeriodSeconds"] = 30 if grace_seconds is None else grace_seconds
        marked = {**obj, "metadata": meta}
        if not self._lingers(res, marked):
            return self._remove(res, obj)
        if meta != obj["metadata"]:
            marked = self._commit(res, obj, marked)
        if "foregroundDeletion" in meta.get("finalizers", []):
            for dep_res, dep in self.dependents(uid):
                self.delete(dep_res, dep["metadata"].get("namespace"), dep["metadata"]["name"], "Foreground")
        return marked

    @staticmethod
    def _lingers(res: Resource, obj: Obj) -> bool:
        meta = obj["metadata"]
        on_node = res is PODS and bool(obj.get("spec", {}).get("nodeName"))
        return bool(meta.get("finalizers")) or (on_node and meta.get("deletionGracePeriodSeconds", 0) > 0)

    def _remove(self, res: Resource, obj: Obj) -> Obj:
        """The object goes; then what it owned alone goes (garbage collection), and so does a foreground-deleting
        owner whose last dependent this was; a namespace takes its contents with it."""
        gone = self._commit(res, obj, None)
        meta = obj["metadata"]
        if res is NAMESPACES:
            for (q, ns, n) in [k for k in self.objects if k[1] == meta["name"]]:
                if (inner := next(r for r in self.resources() if r.qualified == q)) and self.find(inner, ns, n):
                    self.delete(inner, ns, n)
        for dep_res, dep in self.dependents(meta["uid"]):
            alive = [r for r in dep["metadata"]["ownerReferences"] if self.by_uid(r.get("uid", ""))]
            if not alive and self.find(dep_res, dep["metadata"].get("namespace"), dep["metadata"]["name"]):
                self.delete(dep_res, dep["metadata"].get("namespace"), dep["metadata"]["name"])
        for ref in meta.get("ownerReferences", []):
            owner = self.by_uid(ref.get("uid", ""))
            if owner and "foregroundDeletion" in owner["metadata"].get("finalizers", []) \
                    and not self.dependents(ref["uid"]):
                owner_res = next(r for r in self.resources() if (r.api_version, r.kind) ==
                                 (owner["apiVersion"], owner["kind"]))
                fins = [f for f in owner["metadata"]["finalizers"] if f != "foregroundDeletion"]
                self.replace(owner_res, owner["metadata"].get("namespace"), owner["metadata"]["name"],
                             {**owner, "metadata": {**owner["metadata"], "finalizers": fins}})
        return gone


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
        if res is PODS and len(rest) == 3 and rest[2] == "portforward":
            return await self._portforward(request, namespace, rest[1])
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
        raise ApiError(405, "MethodNotAllowed", f"the server does not allow this method on the requested resource")

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

    async def _portforward(self, request: web.Request, ns: str | None, name: str) -> web.StreamResponse:
        """The kubelet's port-forward over the v4 channel protocol: per requested port i, channel 2i carries data
        and 2i+1 errors, each opened by a frame with the port number (2 bytes, little-endian); every other frame is
        the channel byte and a payload. A port nothing listens on gets its error, like a real kubelet's."""
        pod = self.store.get(PODS, ns, name)
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
                target = next((t for matches, p, t in self.pod_ports if p == port and matches(pod)), None)
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
