"""The Secret type: a value that never prints itself."""

from __future__ import annotations

import re
from typing import Any

_SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN(?!IZ)")  # TOKENIZERS_PARALLELISM is common and harmless


def is_secret_name(name: str) -> bool:
    """A variable name that looks like it holds a secret."""
    return bool(_SECRET_NAME.search(name.upper()))


class Secret:
    """A string that redacts itself in repr, str, f-strings, logs, YAML and JSON dumps.

    Only ``reveal()`` returns the value; call it at the last moment, where the value leaves hpcray for
    a process environment or a Kubernetes Secret body.
    """

    __slots__ = ("_value",)
    REDACTED = "******"

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("Secret wraps a str")
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({self.REDACTED!r})"

    def __str__(self) -> str:
        return self.REDACTED

    def __format__(self, spec: str) -> str:
        return self.REDACTED

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self) -> Any:
        raise TypeError("a Secret is not picklable: pass it explicitly, never inside an object")
