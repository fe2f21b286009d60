"""hpcray installed as a user installs it, and how it finds profiles: by name in $HPCRAY_PROFILE_PATH, ./, the user's
profile dir, then the examples shipped in the package; `hpcray init` writes one into the user's dir.

The slow tests build a wheel from a copy of this checkout, install it into a new venv in an empty directory outside
the checkout, and run it there with HOME and the XDG dirs in that directory, PYTHONPATH unset. Cost, measured here
(2 cores, shared): ~16-20 s to build and install, then 90-140 s for `hpcray run -p local training hpo` and ~55 s
for one more local head (the upload check); the fast tests below take ~10 s.

Dependencies: a real `pip install` of the wheel with its ~130 dependencies (1.3 GB) took 2 min 20 s to 4 min 15 s
here, so the new venv borrows them from the running interpreter's site-packages through a .pth file (a plain path:
that directory's own .pth files, such as an editable install of this checkout, stay inactive) while hpcray itself
comes only from the wheel (`pip install --no-deps`). No `ray` or `mlflow` console script is made beside the new
Python, as with `pip install --user` (scripts in ~/.local/bin, maybe not on PATH): the local backend starts both as
`python -m` modules of its own Python.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures_tools import helm_path
from tests.hpcray_cli import run

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
        return subprocess.run([str(self.hpcray), *args], capture_output=True, text=True,
                              env={**self.env, **(env or {})}, cwd=self.root, timeout=timeout)


def _step(argv: list[str], **kwargs: object) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, **kwargs)  # type: ignore[call-overload]
    assert done.returncode == 0, f"{argv} failed:\n{done.stdout}\n{done.stderr}"
    return str(done.stdout + done.stderr)


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
    return Installed(root, python, venv / "bin" / "hpcray", env, build_output, install_output)


@pytest.mark.slow
def test_build_and_install_print_no_deprecation_warning(installed: Installed) -> None:
    for output in (installed.build_output, installed.install_output):
        assert "deprecat" not in output.lower(), output


@pytest.mark.slow
def test_hpcray_there_is_the_wheel_not_the_checkout(installed: Installed) -> None:
    done = subprocess.run([str(installed.python), "-c", "import hpcray; print(hpcray.__file__)"], capture_output=True,
                          text=True, env=installed.env, cwd=installed.root)
    where = Path(done.stdout.strip())
    assert where.is_relative_to(installed.python.parent.parent) and not where.is_relative_to(REPO), where
    version = installed.run("--version")
    assert version.returncode == 0 and "hpcray, version" in version.stdout, version.stderr


@pytest.mark.slow
def test_shipped_profiles_are_listed_from_the_package(installed: Installed) -> None:
    done = installed.run("profile", "--list", "--json")
    assert done.returncode == 0, done.stderr
    shipped = {p["name"]: Path(p["path"]) for p in json.loads(done.stdout)["profiles"] if p["from"] == "shipped"}
    assert set(shipped) == {"local", "vega"}
    assert all(path.is_relative_to(installed.python.parent.parent) for path in shipped.values()), shipped


@pytest.mark.slow
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
    shipped_comments = [line for line in (REPO / "hpcray" / "profiles" / "vega.yaml").read_text().splitlines()
                        if line.startswith("#")]
    assert shipped_comments and all(c in site.read_text() for c in shipped_comments)  # the comments came along
    mine = installed.run("render", "-p", "mysite", "--manifest", env=env)
    assert mine.returncode == 0, mine.stderr
    assert "name: mysite-kuberay" in mine.stdout

    before = site.read_text()
    again = installed.run("init", "mysite")
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and str(site) in again.stderr, again.stderr
    assert site.read_text() == before


@pytest.mark.slow
def test_local_training_and_hpo_run_from_the_installed_package(installed: Installed) -> None:
    """`make demo`'s run from the wheel, checked in MLflow's store: the training loss falls and its model is logged;
    the HPO sweep makes one MLflow run per trial under one parent that holds the best config, which is also
    printed."""
    assert not {"ray", "mlflow"} & {p.name for p in installed.python.parent.iterdir()}  # as with pip install --user
    done = installed.run("run", "-p", "local", "training", "hpo", "--json", timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [j["status"] for j in report["jobs"]] == ["SUCCEEDED", "SUCCEEDED"] and report["torn_down"], done.stderr
    training, hpo = report["jobs"]
    assert len(training["mlflow_run_ids"]) == 1 and len(hpo["mlflow_run_ids"]) == 1
    assert "Traceback" not in done.stderr, done.stderr  # a clean demo: no spurious tracebacks from Ray workers

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=report["tracking_uri"])
    train_run = client.get_run(training["mlflow_run_ids"][0])
    losses = [m.value for m in client.get_metric_history(train_run.info.run_id, "val_loss")]
    assert len(losses) == int(train_run.data.params["epochs"]) + 1 and losses[-1] < losses[0] / 2  # step 0: untrained
    assert "model" in [a.path for a in client.list_artifacts(train_run.info.run_id)]

    parent = client.get_run(hpo["mlflow_run_ids"][0])
    trials = client.search_runs([parent.info.experiment_id],
                                filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(trials) == int(parent.data.params["trials"]) >= 8
    assert all("val_loss" in t.data.metrics for t in trials)
    best = min(t.data.metrics["val_loss"] for t in trials)
    assert parent.data.metrics["best_val_loss"] == pytest.approx(best)
    assert {"best_lr", "best_hidden", "best_batch"} <= set(parent.data.params)
    assert len(hpo["highlights"]) == 1 and hpo["highlights"][0].startswith(f"best trial: val_loss {best:.4f} with ")


@pytest.mark.slow
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


# ---------------------------------------------------------------------------------------------------------------
# Finding profiles and `hpcray init`, from the checkout (fast)
# ---------------------------------------------------------------------------------------------------------------


def user_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HPCRAY_PROFILE", "XDG_CONFIG_HOME"))}
    return {**env, "HOME": str(tmp_path / "home"), **extra}


def hpcray(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """hpcray of this checkout as the scratch user: their whole environment, in their directory."""
    return run(*args, env=env, cwd=cwd, timeout=60)


def local_profile(directory: Path, file: str, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / file).write_text(f"name: {name}\nbackend: local\n")
    return directory / file


def test_a_name_is_found_in_env_path_then_cwd_then_user_dir_then_shipped(tmp_path: Path) -> None:
    env_dirs = [tmp_path / "site-a", tmp_path / "site-b"]
    cwd, user = tmp_path / "work", tmp_path / "home" / ".config" / "hpcray" / "profiles"
    made = [local_profile(env_dirs[1], "local.yaml", "from-env"), local_profile(cwd, "local.yml", "from-cwd"),
            local_profile(user, "local.yaml", "from-user"), local_profile(user, "mine.yaml", "mine")]
    env = user_env(tmp_path, HPCRAY_PROFILE_PATH=os.pathsep.join(map(str, env_dirs)))

    listed = json.loads(hpcray(env, cwd, "profile", "--list", "--json").stdout)
    assert [(d["from"], d["path"]) for d in listed["dirs"]][:4] == [
        ("env path", str(env_dirs[0])), ("env path", str(env_dirs[1])), ("cwd", str(cwd)), ("user dir", str(user))]
    rows = [(p["name"], p["from"], p["shadowed_by"]) for p in listed["profiles"]]
    assert rows == [("local", "env path", None), ("local", "cwd", str(made[0])), ("local", "user dir", str(made[0])),
                    ("mine", "user dir", None), ("local", "shipped", str(made[0])), ("vega", "shipped", None)]
    table = hpcray(env, cwd, "profile", "--list").stdout
    assert f"shadowed by {made[0]}" in table and re.search(r"^mine +user dir +\S+/mine.yaml$", table, re.M), table
    completion = hpcray({**env, "_HPCRAY_COMPLETE": "bash_complete", "COMP_WORDS": "hpcray up -p m",
                         "COMP_CWORD": "3"}, cwd).stdout
    assert "mine" in completion

    for expected, winner in zip(("from-env", "from-cwd", "from-user"), made):  # without it, the next dir's wins
        assert json.loads(hpcray(env, cwd, "profile", "-p", "local", "--json").stdout)["name"] == expected
        winner.unlink()
    assert json.loads(hpcray(env, cwd, "profile", "-p", "local", "--json").stdout)["name"] == "local"  # shipped


def test_a_path_is_used_as_is_even_when_a_name_would_differ(tmp_path: Path) -> None:
    cwd = tmp_path / "work"
    local_profile(cwd / "sub", "vega.yaml", "sub-vega")
    local_profile(cwd, "other.yaml", "other")
    env = user_env(tmp_path)
    assert json.loads(hpcray(env, cwd, "profile", "-p", "sub/vega.yaml", "--json").stdout)["name"] == "sub-vega"
    assert json.loads(hpcray(env, cwd, "profile", "-p", "other.yaml", "--json").stdout)["name"] == "other"
    assert json.loads(hpcray(env, cwd, "profile", "-p", "vega", "--json").stdout)["name"] == "hython"  # shipped


@pytest.mark.reliability(
    case="bad input: unknown profile name",
    sees="`hpcray: error: vegx: no such profile; did you mean 'vega'? known profiles: …; looked in DIR (cwd), … "
         "(user dir), … (shipped); pass a path, or make one with `hpcray init vegx``, exit 2",
    remains="nothing")
def test_an_unknown_name_says_where_it_looked(tmp_path: Path) -> None:
    cwd = tmp_path / "work"
    local_profile(cwd, "mine.yaml", "mine")
    done = hpcray(user_env(tmp_path), cwd, "render", "-p", "vegx")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    user = tmp_path / "home" / ".config" / "hpcray" / "profiles"
    for part in ("vegx: no such profile; did you mean 'vega'?", "known profiles: local, mine, vega",
                 f"{cwd} (cwd)", f"{user} (user dir)", "(shipped)", "hpcray init vegx"):
        assert part in done.stderr, done.stderr


def test_init_writes_a_commented_copy_that_the_name_then_finds(tmp_path: Path) -> None:
    cwd = tmp_path / "work"
    cwd.mkdir()
    env = user_env(tmp_path, XDG_CONFIG_HOME=str(tmp_path / "config"))
    done = hpcray(env, cwd, "init", "mysite")
    assert done.returncode == 0, done.stderr
    site = tmp_path / "config" / "hpcray" / "profiles" / "mysite.yaml"
    assert done.stdout.strip().endswith("edit it, then: hpcray render -p mysite") and str(site) in done.stdout
    text = site.read_text()
    assert "\nname: mysite\n" in text and "# The embedded default" in text and "\nname: local" not in text
    shown = json.loads(hpcray(env, cwd, "profile", "-p", "mysite", "--json").stdout)
    assert shown["name"] == "mysite" and shown["source"] == str(site)
    assert Path(shown["jobs"]["training"]["working_dir"], "train.py").is_file()  # ${HPCRAY_EXAMPLES} still works

    local_profile(cwd, "shadow.yaml", "shadow")  # a name another dir takes first: the next command gives the path
    done = hpcray(env, cwd, "init", "shadow", "--from", "vega")
    assert done.returncode == 0 and f"hpcray render -p {site.parent / 'shadow.yaml'}" in done.stdout, done.stdout


def test_init_notes_relative_paths_that_change_meaning(tmp_path: Path) -> None:
    cwd = tmp_path / "work"
    source = local_profile(cwd, "base.yaml", "base")
    (cwd / "jobs").mkdir()
    source.write_text(source.read_text() + "jobs:\n  train:\n    entrypoint: python t.py\n    working_dir: jobs\n")
    done = hpcray(user_env(tmp_path), cwd, "init", "copy", "--from", "base")
    assert done.returncode == 0, done.stderr
    assert "note:" in done.stderr and "jobs.train.working_dir: jobs" in done.stderr


INIT_REFUSALS = [
    ("bad name", ["init", "My_Site"], "My_Site: not a profile name: it must be a lowercase DNS label", "e.g. my-site"),
    ("unknown source", ["init", "mysite", "--from", "vegx"], "vegx: no such profile; did you mean 'vega'?", ""),
    ("invalid source", ["init", "mysite", "--from", "bad.yaml"], "bad.yaml:2: backend: 'slurm' is not one of", ""),
]


@pytest.mark.parametrize(("args", "expected", "fix"), [
    pytest.param(args, expected, fix, id=case, marks=pytest.mark.reliability(
        case=f"bad input: hpcray init, {case}", sees=f"`hpcray: error: {expected}…`, exit 2",
        remains="nothing (no profile file, no directory)"))
    for case, args, expected, fix in INIT_REFUSALS])
def test_init_refuses_bad_input_creating_nothing(tmp_path: Path, args: list[str], expected: str, fix: str) -> None:
    cwd = tmp_path / "work"
    cwd.mkdir()
    (cwd / "bad.yaml").write_text("name: bad\nbackend: slurm\n")
    done = hpcray(user_env(tmp_path), cwd, *args)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert expected in done.stderr and fix in done.stderr, done.stderr
    assert not (tmp_path / "home").exists()


@pytest.mark.reliability(
    case="bad input: hpcray init over an existing profile",
    sees="`hpcray: error: ~/.config/hpcray/profiles/NAME.yaml: already exists and is never overwritten; edit it, or "
         "remove it and run `hpcray init NAME` again, or choose another name`, exit 2",
    remains="the existing file, unchanged")
def test_init_never_overwrites(tmp_path: Path) -> None:
    env = user_env(tmp_path)
    site = tmp_path / "home" / ".config" / "hpcray" / "profiles" / "mysite.yml"
    local_profile(site.parent, site.name, "mine")
    done = hpcray(env, tmp_path, "init", "mysite", "--from", "vega")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert f"{site}: already exists and is never overwritten" in done.stderr
    assert site.read_text() == "name: mine\nbackend: local\n" and sorted(site.parent.iterdir()) == [site]
