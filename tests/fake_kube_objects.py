"""Kubernetes objects as the fake API server serves them: resources, the errors it answers with, selectors.

Part of the fake API server (tests/fake_kube_api.py); pure data and functions, no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

Obj = dict[str, Any]


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
ENDPOINTS = Resource("", "v1", "endpoints", "Endpoints", has_status=False, short_names=("ep",))
SECRETS = Resource("", "v1", "secrets", "Secret", fields=frozenset({"type"}), has_status=False)
CONFIGMAPS = Resource("", "v1", "configmaps", "ConfigMap", has_status=False, short_names=("cm",))
EVENTS = Resource("", "v1", "events", "Event", fields=_EVENT_FIELDS, has_status=False, short_names=("ev",))
SERVICEACCOUNTS = Resource("", "v1", "serviceaccounts", "ServiceAccount", has_status=False, short_names=("sa",))
DEPLOYMENTS = Resource("apps", "v1", "deployments", "Deployment", short_names=("deploy",))
CRDS = Resource("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition", False,
                short_names=("crd",))
BUILTIN = (NAMESPACES, NODES, PODS, SERVICES, ENDPOINTS, SECRETS, CONFIGMAPS, EVENTS, SERVICEACCOUNTS, DEPLOYMENTS, CRDS)


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
