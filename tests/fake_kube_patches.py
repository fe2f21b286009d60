"""Request bodies the fake API server understands: JSON merge / JSON patch / server-side apply, and the protobuf
that client-go's typed clients (helm's release storage, kubectl create) send. Pure functions."""

from __future__ import annotations

import base64
import copy
from typing import Any, Iterator

from tests.fake_kube_objects import ApiError, Obj, now_iso


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
