"""Generated documentation is fresh, and shell completion works."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hpcray.docs import profile_markdown
from hpcray.profile import schema_fields

REPO = Path(__file__).resolve().parent.parent


def test_profile_reference_is_fresh() -> None:
    committed = (REPO / "docs" / "profile.md").read_text()
    assert committed == profile_markdown(), "docs/profile.md is stale: run `make docs` and commit it"


def test_profile_reference_lists_every_key_with_type() -> None:
    text = profile_markdown()
    for key, tp, *_ in schema_fields():
        assert f"| `{key}` | {tp} |" in text
    assert "| `interlink.slurm.partition` | a string |" in text


def hpcray(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hpcray.cli", *args], capture_output=True, text=True, env=env)


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
