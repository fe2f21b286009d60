"""How tests run hpcray: as a user does (`run`, `start`: a subprocess of `python -m hpcray.cli`), or in this process
where only the command's own answer matters and speed does (`call`: `hpcray.cli.main` under pytest's capsys)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

ARGV = [sys.executable, "-m", "hpcray.cli"]


def environment(env: Mapping[str, str] | None, extra_env: Mapping[str, str] | None) -> dict[str, str]:
    """`env` whole (default: this process's, read at the call, so monkeypatched variables count), `extra_env` over it."""
    return {**(dict(os.environ) if env is None else dict(env)), **(extra_env or {})}


def run(*args: str, env: Mapping[str, str] | None = None, extra_env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ARGV, *args], capture_output=True, text=True, env=environment(env, extra_env), cwd=cwd,
                          timeout=timeout)


def start(*args: str, env: Mapping[str, str] | None = None,
          extra_env: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([*ARGV, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=environment(env, extra_env))


def call(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `hpcray ARGS` run in this process."""
    from hpcray.cli import main

    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    out, err = capsys.readouterr()
    return code, out, err
