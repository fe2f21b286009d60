"""Generated documentation is fresh, and shell completion works."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import json
from typing import Any

import pytest

from hpcray.docs import profile_markdown
from tests.hpcray_cli import run as hpcray

REPO = Path(__file__).resolve().parent.parent


def test_profile_reference_is_fresh() -> None:
    committed = (REPO / "docs" / "profile.md").read_text()
    assert committed == profile_markdown(), "docs/profile.md is stale: run `make docs` and commit it"


def documented() -> dict[str, tuple[str, str]]:
    """docs/profile.md's table: key → (type, default), as a reader sees it."""
    rows = {}
    for line in (REPO / "docs" / "profile.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("| `") and len(cells) == 5:
            rows[cells[0].strip("`")] = (cells[1], cells[2].strip("`"))
    return rows


# Written by hand from the profile loader's behaviour, not from the code that writes the reference.
KNOWN_ROWS = {
    "name": ("a string", ""),
    "backend": ("one of kuberay, local", "kuberay"),
    "kubernetes.namespace": ("a string", "default"),
    "chart.version": ("a string", "1.2.2"),
    "head.gpus": ("a whole number", "0"),
    "workers.<name>.replicas": ("a whole number", "1"),
    "volumes[].read_only": ("true/false", "false"),
    "interlink.slurm.partition": ("a string", ""),
    "mlflow.credentials": ("one of env, file, stdin, none", "env"),
    "mlflow.deliver": ("one of secret, secret_file, secret_env, runtime_env", "secret"),
    "jobs.<name>.num_gpus": ("a number", ""),
    "timeout": ("a string", "2h"),
}


def test_profile_reference_says_what_the_loader_does() -> None:
    rows = documented()
    assert {key: rows.get(key) for key in KNOWN_ROWS} == KNOWN_ROWS


@pytest.mark.parametrize("profile", ["local", "vega"])
def test_every_key_of_a_loaded_profile_is_in_the_reference(profile: str) -> None:
    """Every key the loader gives a shipped profile (`hpcray profile --json`: defaults included) has a row, and
    nested mappings are documented as such (descended by the reference's own types)."""
    done = hpcray("profile", "-p", profile, "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    data.pop("source")
    rows, missing = documented(), []

    def walk(value: dict[str, Any], prefix: str) -> None:
        for key, inner in value.items():
            path = f"{prefix}{key}"
            if path not in rows:
                missing.append(path)
                continue
            kind = rows[path][0]
            if kind.startswith("a mapping (") and isinstance(inner, dict):
                walk(inner, f"{path}.")
            elif kind.startswith("a mapping of a mapping (") and isinstance(inner, dict):
                for group in inner.values():
                    walk(group, f"{path}.<name>.")
            elif kind.startswith("a list of a mapping (") and isinstance(inner, list):
                for item in inner:
                    walk(item, f"{path}[].")

    walk(data, "")
    assert missing == [], f"keys of the {profile} profile missing from docs/profile.md"


def test_bash_completion_script_is_valid_bash() -> None:
    script = hpcray("completion", "bash").stdout
    assert "_hpcray_completion" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_completion_offers_commands_and_profile_names() -> None:
    import os

    base = {**os.environ, "_HPCRAY_COMPLETE": "bash_complete"}
    commands = hpcray(env={**base, "COMP_WORDS": "hpcray ren", "COMP_CWORD": "1"}).stdout
    assert "render" in commands
    profiles = hpcray(env={**base, "COMP_WORDS": "hpcray render --profile ve", "COMP_CWORD": "3"}).stdout
    assert "vega" in profiles and "local" not in profiles


def test_reliability_table_is_fresh() -> None:
    done = subprocess.run([sys.executable, str(REPO / "tools" / "reliability_table.py"), "--check"],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr + done.stdout


def test_every_error_raised_in_hpcray_has_a_troubleshooting_entry() -> None:
    import re

    import hpcray.errors as errors

    doc = (REPO / "docs" / "troubleshooting.md").read_text()
    headings = "\n".join(line for line in doc.splitlines() if line.startswith("## "))
    raised = set()
    for source in (REPO / "hpcray").rglob("*.py"):
        raised |= set(re.findall(r"raise ([A-Z]\w*)\(", source.read_text()))
    public = {name for name in raised if isinstance(getattr(errors, name, None), type)
              and issubclass(getattr(errors, name), errors.HpcrayError)}
    assert {"ProfileError", "ClusterNotReady", "TrackingError"} <= public
    missing = [name for name in sorted(public) if f"`{name}`" not in headings]
    assert not missing, f"docs/troubleshooting.md has no section for {missing}"
