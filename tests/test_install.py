"""hpcray installed as a user installs it: a wheel built from a copy of this checkout, installed into a new venv in
an empty directory outside the checkout, run there with HOME and the XDG dirs in that directory, PYTHONPATH unset.

Cost, measured here (2 cores): ~25 s to build and install, then ~100 s for `hpcray run -p local training hpo`
and ~20 s for one more local head. Dependencies: a real `pip install` of the wheel with its ~130 dependencies
(1.3 GB) took 2 min 20 s to 4 min 15 s here, so the new venv borrows them from the running interpreter's
site-packages through a .pth file (a plain path: that directory's own .pth files, such as an editable install of
this checkout, stay inactive) while hpcray itself comes only from the wheel (`pip install --no-deps`). `ray` and
`mlflow` executables, which the local backend starts from beside its Python, are made beside the new one as pip
makes console scripts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from tests.fixtures_tools import helm_path

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", ".tools", "build", "dist", "*.egg-info", "__pycache__",
                                    ".pytest_cache", ".hpcray", "mlruns")


@dataclass
class Installed:
    root: Path  # the scratch dir: HOME, XDG dirs and cwd
    python: Path
    hpcray: Path
    env: dict[str, str]
    build_output: str
    install_output: str

    def run(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120) \
            -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.hpcray), *args], capture_output=True, text=True, env={**self.env, **(env or {})},
                              cwd=self.root, timeout=timeout)


def _step(argv: list[str], **kwargs: object) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, **kwargs)  # type: ignore[call-overload]
    assert done.returncode == 0, f"{argv} failed:\n{done.stdout}\n{done.stderr}"
    return str(done.stdout + done.stderr)


def _console_script(python: Path, name: str) -> str:
    [target] = {ep.value for ep in entry_points(group="console_scripts", name=name)}  # mlflow-skinny has one too
    module, attr = target.split(":")
    return f"#!{python}\nimport sys\nfrom {module} import {attr}\nsys.exit({attr}())\n"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    scratch = tmp_path_factory.mktemp("user")
    source, dist, venv, root = scratch / "src", scratch / "dist", scratch / "venv", scratch / "home"
    root.mkdir()
    here = os.path.dirname(sys.executable)
    env = {k: v for k, v in os.environ.items()
           if k != "PYTHONPATH" and not k.startswith(("HPCRAY_", "XDG_", "VIRTUAL_ENV"))}
    env.update(HOME=str(root), XDG_CONFIG_HOME=str(root / ".config"), XDG_STATE_HOME=str(root / ".local/state"),
               XDG_CACHE_HOME=str(root / ".cache"), XDG_DATA_HOME=str(root / ".local/share"),
               PATH=os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p != here))

    shutil.copytree(REPO, source, ignore=NOT_SOURCE)  # pip builds in the tree: keep the checkout untouched
    build_output = _step([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(dist), str(source)], env=env,
                         cwd=scratch)
    [wheel] = dist.glob("hpcray-*.whl")
    _step([sys.executable, "-m", "venv", str(venv)], env=env)
    python = venv / "bin" / "python"
    install_output = _step([str(python), "-m", "pip", "install", "--no-deps", str(wheel)], env=env, cwd=root)
    purelib = Path(_step([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         env=env).strip())
    borrowed = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (purelib / "hpcray_test_borrowed_deps.pth").write_text("".join(f"{p}\n" for p in borrowed))
    for name in ("ray", "mlflow"):
        script = venv / "bin" / name
        script.write_text(_console_script(python, name))
        script.chmod(0o755)
    return Installed(root, python, venv / "bin" / "hpcray", env, build_output, install_output)


def test_build_and_install_print_no_deprecation_warning(installed: Installed) -> None:
    for output in (installed.build_output, installed.install_output):
        assert "deprecat" not in output.lower(), output


def test_hpcray_there_is_the_wheel_not_the_checkout(installed: Installed) -> None:
    done = subprocess.run([str(installed.python), "-c", "import hpcray; print(hpcray.__file__)"], capture_output=True,
                          text=True, env=installed.env, cwd=installed.root)
    where = Path(done.stdout.strip())
    assert where.is_relative_to(installed.python.parent.parent) and not where.is_relative_to(REPO), where
    version = installed.run("--version")
    assert version.returncode == 0 and "hpcray, version" in version.stdout, version.stderr


def test_shipped_profiles_are_listed_from_the_package(installed: Installed) -> None:
    done = installed.run("profile", "--list", "--json")
    assert done.returncode == 0, done.stderr
    shipped = {p["name"]: Path(p["path"]) for p in json.loads(done.stdout)["profiles"] if p["from"] == "shipped"}
    assert set(shipped) == {"local", "vega"}
    assert all(path.is_relative_to(installed.python.parent.parent) for path in shipped.values()), shipped


def test_render_vega_then_a_site_profile_made_by_init(installed: Installed, charts_dir: Path) -> None:
    helm = helm_path(3)
    if helm is None:
        pytest.skip("helm 3 not installed: run `make test` (it fetches it into .tools/helm3) or set HPCRAY_HELM3")
    bindir = installed.root.parent / "helm-bin"  # helm found on PATH, as a user's would be
    bindir.mkdir(exist_ok=True)
    (bindir / "helm").unlink(missing_ok=True)
    (bindir / "helm").symlink_to(helm)
    env = {"HPCRAY_CHARTS_DIR": str(charts_dir), "PATH": f"{bindir}{os.pathsep}{installed.env['PATH']}"}

    vega = installed.run("render", "-p", "vega", "--manifest", env=env)
    assert vega.returncode == 0, vega.stderr
    assert "kind: RayCluster" in vega.stdout and "name: hython-kuberay" in vega.stdout

    made = installed.run("init", "mysite", "--from", "vega")
    assert made.returncode == 0, made.stderr
    site = installed.root / ".config" / "hpcray" / "profiles" / "mysite.yaml"
    assert str(site) in made.stdout and "hpcray render -p mysite" in made.stdout
    assert "# GPU head and workers offloaded through interLink" in site.read_text()  # the comments came along
    mine = installed.run("render", "-p", "mysite", "--manifest", env=env)
    assert mine.returncode == 0, mine.stderr
    assert "name: mysite-kuberay" in mine.stdout

    before = site.read_text()
    again = installed.run("init", "mysite")
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and str(site) in again.stderr, again.stderr
    assert site.read_text() == before


def test_local_training_and_hpo_run_from_the_installed_package(installed: Installed) -> None:
    done = installed.run("run", "-p", "local", "training", "hpo", "--json", timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [j["status"] for j in report["jobs"]] == ["SUCCEEDED", "SUCCEEDED"] and report["torn_down"], done.stderr


def test_mlflow_files_beside_the_shipped_examples_are_not_uploaded(installed: Installed) -> None:
    examples = Path(json.loads(installed.run("profile", "-p", "local", "--json").stdout)["jobs"]["training"]
                    ["working_dir"])
    assert examples.is_relative_to(installed.python.parent.parent), examples
    (examples / "mlruns" / "1").mkdir(parents=True)  # what `python train.py` run by hand there leaves
    (examples / "mlruns" / "1" / "meta.yaml").write_text("name: by hand\n")
    try:
        assert installed.run("up", "-p", "local").returncode == 0
        listed = installed.run("submit", "-p", "local", "--working-dir", str(examples), "--", "ls", "-A")
        assert listed.returncode == 0, listed.stderr
        assert "train.py" in listed.stdout and "mlruns" not in listed.stdout, listed.stdout
    finally:
        installed.run("down", "-p", "local")
        shutil.rmtree(examples / "mlruns")
