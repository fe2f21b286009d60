"""Every `hpcray` command the README documents runs: the local flow for real, the Vega flow with --dry-run."""

from __future__ import annotations

import os
import re
import secrets
import shlex
import subprocess
from pathlib import Path

import pytest
from tests.hpcray_cli import run

REPO = Path(__file__).resolve().parent.parent
DRY_RUN = {"up", "down", "submit", "run"}  # touch a cluster: the Vega flow runs them with --dry-run
NEEDS_A_CLUSTER = {"dashboard", "gc", "doctor"}  # stay connected / scan a live Kubernetes context / check one: not run
                                                  # here (tests/test_doctor.py runs doctor against the fake API)
NEEDS_SLURM = {"pull"}  # `pull --slurm` submits a batch job; its `--print` twin is run instead


def bash_blocks() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    return [block.splitlines() for block in re.findall(r"```bash\n(.*?)```", text, re.S)]


def hpcray_lines(block: list[str]) -> list[list[str]]:
    commands = []
    for line in block:
        line = line.split(" # ")[0].strip()
        if line.startswith("hpcray "):
            commands.append(shlex.split(line)[1:])
    return commands


def block_with(command: str) -> list[list[str]]:
    for block in bash_blocks():
        lines = hpcray_lines(block)
        if any(" ".join(c).startswith(command) for c in lines):
            return lines
    raise AssertionError(f"README has no bash block with `hpcray {command}`")


def hpcray(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A README command line, run from the checkout's root as the README's reader would."""
    return run(*args, env=env, cwd=REPO)


def test_readme_starts_with_the_two_setup_commands() -> None:
    first = bash_blocks()[0]
    commands = [line.split("#")[0].strip() for line in first if line.strip()]
    assert commands[:2] == ["make demo", "make test"]
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_local_flow_runs_for_real(tmp_path: Path) -> None:
    env = {**os.environ, "HPCRAY_STATE_DIR": str(tmp_path / "state")}
    commands = block_with("up --profile local")
    assert [c[0] for c in commands][:3] == ["render", "run", "up"]
    try:
        for args in commands:
            done = hpcray(args, env)
            assert done.returncode == 0, f"hpcray {shlex.join(args)} failed:\n{done.stdout}\n{done.stderr}"
            if args[0] == "submit" and "--" in args:
                assert "hello from Ray" in done.stdout
            if args[0] == "list":
                assert "SUCCEEDED" in done.stdout
    finally:
        hpcray(["down", "--profile", "local"], env)


def test_vega_flow_runs_with_dry_run(helm_bin: str, charts_env: Path, tmp_path: Path) -> None:
    env = {**os.environ, "HPCRAY_STATE_DIR": str(tmp_path / "state"), "VEGA_USER_DIR": str(tmp_path / "sif"),
           "ITWINAI_CONFIG_DIR": str(tmp_path), "MLFLOW_TRACKING_USERNAME": "me",
           "MLFLOW_TRACKING_PASSWORD": secrets.token_urlsafe(16)}
    commands = block_with("up --profile vega")
    ran = set()
    for args in commands:
        verb = args[0]
        if verb in NEEDS_A_CLUSTER or (verb in NEEDS_SLURM and "--print" not in args):
            continue
        if verb in DRY_RUN and "--dry-run" not in args:
            args = [*args, "--dry-run"]
        done = hpcray(args, env)
        assert done.returncode == 0, f"hpcray {shlex.join(args)} failed:\n{done.stdout}\n{done.stderr}"
        assert env["MLFLOW_TRACKING_PASSWORD"] not in done.stdout + done.stderr
        ran.add(verb)
    assert {"pull", "render", "up", "submit", "down", "run"} <= ran
    assert {c[0] for c in commands} <= ran | NEEDS_A_CLUSTER


@pytest.mark.parametrize("verb", sorted(NEEDS_A_CLUSTER | NEEDS_SLURM | DRY_RUN))
def test_skipped_commands_still_exist(verb: str) -> None:
    done = hpcray([verb, "--help"], dict(os.environ))
    assert done.returncode == 0, done.stderr


def layout_layers() -> list[set[str]]:
    """The README's picture of the code: layers (a line and the indented lines under it), top first, each a set of
    module paths relative to hpcray/ ("x/" names a whole package)."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"## How the code is laid out.*?```\n(.*?)```", text, re.S)
    assert block, "README has no picture of the code's layout"
    layers: list[set[str]] = []
    for line in block.group(1).splitlines():
        names = set(re.findall(r"[\w/]+\.py|\w+/(?=\s)", line))
        if line.startswith(" "):
            layers[-1] |= names
        elif names:
            layers.append(names)
    return layers


def imported_modules(path: Path) -> set[str]:
    """The hpcray modules a file imports (anywhere in it), as paths relative to hpcray/."""
    import ast

    def as_path(module: str) -> str | None:
        rel = module.removeprefix("hpcray").lstrip(".").replace(".", "/")
        if not rel:
            return None
        return f"{rel}/__init__.py" if (REPO / "hpcray" / rel).is_dir() else f"{rel}.py"

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "hpcray":
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "hpcray" else [node.module]
            found |= {m for m in map(as_path, names) if m and (REPO / "hpcray" / m).exists()}
        elif isinstance(node, ast.Import):
            found |= {m for a in node.names if a.name.startswith("hpcray.") and (m := as_path(a.name))}
    return found


def test_the_layout_picture_names_every_module_and_every_import_points_down() -> None:
    layers = layout_layers()
    modules = sorted(str(p.relative_to(REPO / "hpcray")) for p in (REPO / "hpcray").rglob("*.py")
                     if p != REPO / "hpcray" / "__init__.py"
                     and p.parent != REPO / "hpcray" / "examples")  # jobs shipped as data, run on a cluster

    def layer_of(module: str) -> int | None:
        for i, names in enumerate(layers):
            if module in names or any(n.endswith("/") and module.startswith(n) for n in names):
                return i
        return None

    assert [m for m in modules if layer_of(m) is None] == [], "modules missing from the README's picture"
    pictured = {n for names in layers for n in names if not n.endswith("/")}
    assert pictured <= set(modules), "the README's picture names modules that do not exist"
    upward = [f"{m} imports {dep}" for m in modules for dep in sorted(imported_modules(REPO / "hpcray" / m))
              if (layer_of(dep) or 0) < (layer_of(m) or 0)]
    assert upward == [], "imports that point up the README's picture"


def test_the_cli_does_not_branch_on_backends_and_helm_and_kube_never_see_a_profile() -> None:
    cli = (REPO / "hpcray" / "cli.py").read_text()
    assert not re.search(r"\.backend\s*[!=]=|type:\s*ignore", cli)
    for owner in ("helm.py", "kube.py", "portforward.py", "slurm.py"):
        assert "profile.py" not in imported_modules(REPO / "hpcray" / owner), owner
