"""Files that ship inside the package: the values template, the pull script template, the example profiles and
the example jobs they upload. Read through importlib.resources, never through a checkout."""

from __future__ import annotations

import atexit
import contextlib
from functools import cache
from importlib.resources import as_file, files
from pathlib import Path

_KEEP = contextlib.ExitStack()
atexit.register(_KEEP.close)


@cache
def path(*parts: str) -> Path:
    """A real path to a shipped file or directory, valid for the life of the process (Ray uploads the examples
    directory; Jinja reads templates beside each other)."""
    return _KEEP.enter_context(as_file(files("hpcray").joinpath(*parts)))


def text(*parts: str) -> str:
    return files("hpcray").joinpath(*parts).read_text(encoding="utf-8")

