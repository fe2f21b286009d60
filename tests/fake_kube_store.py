"""The fake API server's object store: resource versions, event history, watchers, defaulting, validation,
deletion with finalizers and garbage collection. Everything here runs on the server's event loop thread."""

from __future__ import annotations

import asyncio
import base64
import collections
import copy
import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from tests.fake_kube_objects import (BUILTIN, CRDS, NAMESPACES, PODS, SECRETS, SERVICES, ApiError, Obj, Resource,
                                     field_matcher, label_matcher, now_iso, resources_from_crd)
from tests.fake_kube_patches import json_patch, merge_patch, server_side_apply


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
        """The API server's defaulting that the fakes depend on (pkg/apis/core/v1/defaults.go): a container's
        requests default to its limits, a hostPath's type to "" (HostPathUnset), a Service port's targetPort to
        its port."""
        if res is PODS:
            obj.setdefault("status", {"phase": "Pending"})
            spec = obj.setdefault("spec", {})
            spec.setdefault("restartPolicy", "Always")
            spec.setdefault("schedulerName", "default-scheduler")
            for c in (spec.get("containers") or []) + (spec.get("initContainers") or []):
                resources = c.get("resources") or {}
                if resources.get("limits"):
                    c["resources"] = {**resources, "requests": {**resources["limits"],
                                                                **(resources.get("requests") or {})}}
                for p in c.get("ports") or []:
                    p.setdefault("protocol", "TCP")
            for v in spec.get("volumes") or []:
                if "hostPath" in v:
                    v["hostPath"].setdefault("type", "")
        elif res is SERVICES and obj.setdefault("spec", {}).get("type", "ClusterIP") != "ExternalName":
            n = self.rv + 1
            obj["spec"].setdefault("type", "ClusterIP")
            obj["spec"].setdefault("clusterIP", f"10.96.{n // 250 % 250}.{n % 250 + 1}")
            for p in obj["spec"].get("ports") or []:
                p.setdefault("protocol", "TCP")
                p.setdefault("targetPort", p.get("port"))
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
            raise ApiError(415, "UnsupportedMediaType", "the body of the request was in an unknown format - "
                                                        "accepted media types include: application/json-patch+json, "
                                                        "application/merge-patch+json, application/apply-patch+yaml")
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
