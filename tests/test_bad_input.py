"""Bad input across every command: one line `hpcray: error: …` that names the input and says what to do, exit 2,
no traceback without --debug, and nothing created — no helm release or Secret in the (fake) Kubernetes API, no Ray
job or uploaded package, no MLflow run, no state file, no process, no file written.

hpcray runs in this process (`hpcray.cli.main`) for speed; what it would leave behind is checked from outside: the
files under the test's directory (hpcray's state, temp and working dirs all point there), every live process whose
environment names that directory (whatever hpcray starts inherits it), and the servers' own records.
Profile-only mistakes through `render` are in tests/test_bad_profiles.py; these are the other commands' inputs.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.fake_kube_api import MINIMAL_RAYCLUSTER_CRD, FakeKubeAPI
from tests.fake_ray_dashboard import FakeRayDashboard
from tests.fixtures_tools import helm_path
from tests.hpcray_cli import call as hpcray

NOTHING = "nothing (no state file, process or file; no job, release or run)"
NOTHING_LOCK = "nothing (at most the profile's empty lock file): no release, Secret, process or other file"


def closed_port() -> int:
    """A 127.0.0.1 port nothing listens on (bound once, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------------------------
# The world hpcray runs in, and the one check every case makes
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class World:
    root: Path
    env: dict[str, str] = field(default_factory=dict)

    def write(self, name: str, text: str, mode: int = 0o644) -> Path:
        path = self.root / "in" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(mode)
        return path

    def files(self) -> dict[str, int]:
        """Every file and directory under the test's directory with its size (-1: a directory), lock files and
        state dirs included; hpcray's download cache is not something a command created."""
        found = {}
        for path in self.root.rglob("*"):
            rel = path.relative_to(self.root)
            if rel.parts[0] != "cache":
                found[str(rel)] = path.stat().st_size if path.is_file() else -1
        return found

    def processes(self) -> set[int]:
        """Live processes (not this one) whose environment names the test's directory: anything hpcray started."""
        needle = str(self.root).encode()
        found = set()
        for entry in os.scandir("/proc"):
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    with open(f"/proc/{entry.name}/environ", "rb") as f:
                        if needle in f.read():
                            found.add(int(entry.name))
                except OSError:
                    continue
        return found


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> World:
    root = tmp_path
    for d in ("state", "cache", "tmp", "cwd", "in"):
        (root / d).mkdir()
    monkeypatch.setenv("HPCRAY_STATE_DIR", str(root / "state"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(root / "cache"))
    monkeypatch.setenv("KUBECONFIG", str(root / "no-kubeconfig"))
    monkeypatch.setattr(tempfile, "tempdir", str(root / "tmp"))  # hpcray's temp dirs (job staging, packages)
    monkeypatch.chdir(root / "cwd")
    for name in ("HPCRAY_DEBUG", "HPCRAY_PROFILE", "HPCRAY_HELM", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_USERNAME",
                 "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_URI", "HPCRAY_CHARTS_DIR", "HPCRAY_TEST_UNSET"):
        monkeypatch.delenv(name, raising=False)
    return World(root)


def refused(world: World, capsys: pytest.CaptureFixture[str], args: list[str], says: list[str], *,
            observe: Callable[[], Any] | None = None, progress: bool = False) -> str:
    """Run hpcray with bad input; assert the promise (one line, exit 2, no traceback, nothing created); the line."""
    files, procs = world.files(), world.processes()
    seen = observe() if observe else None
    code, out, err = hpcray(capsys, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("hpcray: error: ")]
    assert code == 2, err
    assert len(errors) == 1 and lines[-1] == errors[0], err
    if not progress:
        assert lines == errors, f"more than the error line on stderr:\n{err}"
    assert "Traceback" not in out + err and out == "", out
    for text in says:
        assert text in errors[0], errors[0]
    assert world.files() == files, "hpcray wrote files"
    assert world.processes() - procs == set(), "hpcray left a process running"
    if observe:
        assert observe() == seen, "hpcray created something"
    return errors[0]


def case(name: str, sees: str, remains: str = NOTHING) -> pytest.MarkDecorator:
    return pytest.mark.reliability(case=f"bad input: {name}", sees=sees, remains=remains)


# ---------------------------------------------------------------------------------------------------------------
# Profiles
# ---------------------------------------------------------------------------------------------------------------

LOCAL = """\
name: bi
backend: local
mlflow: {credentials: none}
jobs:
  ok: {entrypoint: "true"}
"""
MALFORMED = "name: bi\nbackend: local\njobs: {ok: {entrypoint: 'true'}\n  oops: 1\n"  # the flow mapping never closes


def kuberay(kubeconfig: Path | str, **keys: str) -> str:
    fields = {"name": "kr", "backend": "kuberay", "chart": "{version: 1.2.2}",
              "kubernetes": f"{{namespace: default, kubeconfig: '{kubeconfig}'}}",
              "image": "{dir: /opt/sif, name: ray, tag: sif}", "head": '{cpu: "1", memory: 2G}',
              "mlflow": "{credentials: none}", **keys}
    return "".join(f"{k}: {v}\n" for k, v in fields.items())


def interlink(**keys: str) -> str:
    fields = {"name": "il", "image": "{dir: /opt/sif, source: 'docker://ghcr.io/x/ray:latest'}",
              "head": '{cpu: "2", memory: 4G, gpus: 1}', "interlink": "{enabled: true, node: vk}", **keys}
    return "".join(f"{k}: {v}\n" for k, v in fields.items())


# ---------------------------------------------------------------------------------------------------------------
# Input that is wrong on its face: no server is needed to refuse it
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Offline:
    args: list[str]  # {profile} {in} {dashboard} and {secret} (a password made at run time) are filled in
    says: list[str]
    profile: str = LOCAL
    files: dict[str, tuple[str, int]] = field(default_factory=dict)  # name → (text, mode), beside the profile


OFFLINE: list[tuple[str, Offline, str]] = [
    *[(f"malformed YAML via {cmd}", Offline([cmd, "-p", "{profile}", *rest], ["{profile}:4:", "malformed YAML",
                                                                            "fix the syntax there"], MALFORMED),
       "`hpcray: error: FILE:4:3: malformed YAML: …; fix the syntax there`")
      for cmd, rest in (("up", []), ("submit", ["--address", "{dashboard}", "--", "true"]), ("run", ["ok"]),
                        ("pull", []), ("down", []), ("status", []))],
    ("unknown key via run", Offline(["run", "-p", "{profile}", "ok"], ["{profile}:5: jobs.ok.entrypont: unknown key; "
                                                                      "did you mean 'entrypoint'?"],
                                    LOCAL.replace("entrypoint", "entrypont")),
     "`FILE:5: jobs.ok.entrypont: unknown key; did you mean 'entrypoint'?`"),
    ("wrong type via up", Offline(["up", "-p", "{profile}"], ["{profile}:6: local.num_cpus: expected a whole number, "
                                                              "got a string ('two')"], LOCAL + "local: {num_cpus: two}\n"),
     "`FILE:6: local.num_cpus: expected a whole number, got a string ('two')`"),
    ("undefined ${VAR} via submit",
     Offline(["submit", "-p", "{profile}", "--address", "{dashboard}", "ok"],
             ["jobs.ok.entrypoint: ${HPCRAY_TEST_UNSET} is not set; export HPCRAY_TEST_UNSET=…"],
             LOCAL.replace('"true"', '"python ${HPCRAY_TEST_UNSET}"')),
     "`FILE:5: jobs.ok.entrypoint: ${HPCRAY_TEST_UNSET} is not set; export HPCRAY_TEST_UNSET=… or write the value`"),
    ("unknown profile name via up", Offline(["up", "-p", "vegaa"], ["vegaa", "did you mean 'vega'?"]),
     "`hpcray: error: vegaa: … did you mean 'vega'?`"),
    ("profile file missing via down", Offline(["down", "-p", "{in}/gone.yaml"], ["{in}/gone.yaml: no such profile file"]),
     "`PATH: no such profile file; pass a path to a YAML profile or a profile name (`hpcray profile --list`)`"),
    ("--env without =", Offline(["submit", "--address", "{dashboard}", "--env", "EPOCHS", "--", "true"],
                                ["--env: 'EPOCHS' is not K=V", "see `hpcray submit --help`"]),
     "`Invalid value for --env: 'EPOCHS' is not K=V; see `hpcray submit --help``"),
    ("--env with PASSWORD in the name", Offline(["submit", "--address", "{dashboard}", "--env", "DB_PASSWORD=x", "--",
                                                 "true"], ["--env DB_PASSWORD: refused", "mlflow.credentials"]),
     "`--env DB_PASSWORD: refused, because Ray shows a job's env vars in plain text …; let a job read other secrets "
     "from a file`"),
    ("run --timeout not a duration", Offline(["run", "-p", "{profile}", "--timeout", "forever", "ok"],
                                             ["--timeout: 'forever' is not a duration; write e.g. 90s, 30m, 6h or 2d",
                                              "see `hpcray run --help`"]),
     "`Invalid value for --timeout: 'forever' is not a duration; write e.g. 90s, 30m, 6h or 2d; see `hpcray run "
     "--help``"),
    ("up --ttl not a duration", Offline(["up", "-p", "{profile}", "--ttl", "5x"],
                                        ["--ttl: '5x' is not a duration; write e.g. 90s, 30m, 6h or 2d"]),
     "`Invalid value for --ttl: '5x' is not a duration; write e.g. 90s, 30m, 6h or 2d; see …`"),
    ("down --timeout not a duration", Offline(["down", "-p", "{profile}", "--timeout", "1 minute"],
                                              ["--timeout: '1 minute' is not a duration; write e.g. 90s, 30m, 6h or "
                                               "2d"]),
     "`Invalid value for --timeout: '1 minute' is not a duration; write e.g. 90s, 30m, 6h or 2d; …`"),
    ("pull --timeout not a duration", Offline(["pull", "-p", "{profile}", "--slurm", "--timeout", "soon"],
                                              ["--timeout: 'soon' is not a duration; write e.g. 90s, 30m, 6h or 2d"]),
     "`Invalid value for --timeout: 'soon' is not a duration; write e.g. 90s, 30m, 6h or 2d; see …`"),
    ("unknown job name via run", Offline(["run", "-p", "{profile}", "traning"],
                                         ["{profile}: jobs.traning: no such job in the profile; its jobs are: ok"]),
     "`FILE: jobs.traning: no such job in the profile; its jobs are: ok`"),
    ("unknown job name via submit", Offline(["submit", "-p", "{profile}", "--address", "{dashboard}", "traning"],
                                            ["{profile}: jobs.traning: no such job in the profile; its jobs are: ok"]),
     "`FILE: jobs.traning: no such job in the profile; its jobs are: ok`"),
    ("`--` with no entrypoint", Offline(["submit", "--address", "{dashboard}", "--"],
                                        ["give the entrypoint after `--`, e.g. -- python train.py"]),
     "`give the entrypoint after `--`, e.g. -- python train.py; see `hpcray submit --help``"),
    ("--runtime-env-json not JSON", Offline(["submit", "--address", "{dashboard}", "--runtime-env-json", "{pip: x",
                                             "--", "true"], ["--runtime-env-json: not a JSON object"]),
     "`Invalid value for --runtime-env-json: not a JSON object; see …`"),
    ("--num-gpus not a number", Offline(["submit", "--address", "{dashboard}", "--num-gpus", "one", "--", "true"],
                                        ["'--num-gpus'", "'one' is not a valid float"]),
     "`Invalid value for '--num-gpus' …: 'one' is not a valid float; see `hpcray submit --help``"),
    ("unknown command", Offline(["sumbit"], ["No such command 'sumbit'", "Did you mean 'submit'?"]),
     "`No such command 'sumbit'. Did you mean 'submit'? See `hpcray --help``"),
    ("--working-dir that does not exist", Offline(["submit", "--address", "{dashboard}", "--working-dir",
                                                   "{in}/nowhere", "--", "true"],
                                                  ["{in}/nowhere: no such file or directory"]),
     "`DIR: no such file or directory (a working dir or wheel of the job)`"),
    ("--requirements that does not exist", Offline(["submit", "--address", "{dashboard}", "--requirements",
                                                    "{in}/req.txt", "--", "true"],
                                                   ["{in}/req.txt: cannot read the requirements file"]),
     "`FILE: cannot read the requirements file (No such file or directory)`"),
    ("--address not http", Offline(["list", "--address", "ftp://127.0.0.1:8265"],
                                   ["ftp://127.0.0.1:8265: not a Jobs API address", "http://127.0.0.1:8265"]),
     "`ftp://…: not a Jobs API address; give the dashboard's, e.g. http://127.0.0.1:8265`"),
    ("logs of a profile whose cluster is down", Offline(["logs", "-p", "{profile}", "raysubmit_x"],
                                                        ["no local cluster 'bi' is up", "hpcray up"]),
     "`no local cluster 'bi' is up; run `hpcray up --profile …``"),
    ("render -o into a missing directory", Offline(["render", "--no-check", "-p", "{profile}", "-o",
                                                    "{in}/missing/values.yaml"],
                                                   ["-o {in}/missing/values.yaml: cannot write it (No such file or "
                                                    "directory)"], interlink()),
     "`-o FILE: cannot write it (No such file or directory); give a file in an existing, writable directory`"),
    ("MLflow credentials unset", Offline(["submit", "-p", "{profile}", "--address", "{dashboard}", "ok"],
                                         ["MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD are not set",
                                          "export it"],
                                         LOCAL.replace("{credentials: none}",
                                                       "{tracking_uri: 'http://127.0.0.1:9', credentials: env}")),
     "`mlflow.credentials is 'env' but MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD are not set; export …`"),
    ("password inside mlflow.tracking_uri", Offline(["run", "-p", "{profile}", "ok"],
                                                    ["mlflow.tracking_uri: the URL 'http://u:***@…' carries a "
                                                     "password", "mlflow.credentials"],
                                                    LOCAL.replace("{credentials: none}",
                                                                  "{tracking_uri: 'http://u:{secret}@127.0.0.1:9', "
                                                                  "credentials: none}")),
     "`FILE:LINE: mlflow.tracking_uri: the URL 'http://u:***@…' carries a password …; remove 'user:password@' "
     "from it and give the username and password through mlflow.credentials …`"),
    ("credentials file readable by others (0644)",
     Offline(["up", "-p", "{profile}"], ["{in}/mlflow.cred: credentials file is readable by others (mode 644)",
                                         "chmod 600 {in}/mlflow.cred"],
             LOCAL.replace("{credentials: none}", "{tracking_uri: 'http://127.0.0.1:9', credentials: file, "
                                                  "credentials_file: mlflow.cred}"),
             {"mlflow.cred": ("username=alice\npassword={secret}\n", 0o644)}),
     "`FILE: credentials file is readable by others (mode 644); run `chmod 600 FILE``"),
    ("SIF dir not absolute via pull", Offline(["pull", "-p", "{profile}"],
                                              ["image.dir: 'sif' is not an absolute directory", "image.dir: /ceph"],
                                              interlink(image="{dir: sif, source: 'docker://x/ray:1'}",
                                                        interlink="{enabled: false}")),
     "`FILE:2: image.dir: 'sif' is not an absolute directory; `hpcray pull` writes the SIF there, e.g. …`"),
    ("SIF dir not absolute via pull --slurm --print",
     Offline(["pull", "-p", "{profile}", "--slurm", "--print"], ["image.dir: 'data/sif' is not an absolute"],
             interlink(image="{dir: data/sif, source: 'docker://x/ray:1'}", interlink="{enabled: false}")),
     "`FILE:2: image.dir: 'data/sif' is not an absolute directory; …`"),
    ("SLURM --mem clashing with limits via up",
     Offline(["up", "-p", "{profile}"], ["interlink.slurm.extra_flags: '--mem=10G' clashes with the pod's "
                                         "cpu/memory limits", "set head/workers cpu and memory instead"],
             interlink(interlink="{enabled: true, node: vk, slurm: {extra_flags: ['--mem=10G']}}")),
     "`FILE:4: interlink.slurm.extra_flags: '--mem=10G' clashes with the pod's cpu/memory limits …`"),
    ("SLURM --gres clashing with gpus via pull --slurm",
     Offline(["pull", "-p", "{profile}", "--slurm"], ["head.slurm_flags: '--gres=gpu:2' clashes with the GPU count",
                                                     "set gpus instead"],
             interlink(head="{cpu: '2', memory: 4G, gpus: 1, slurm_flags: ['--gres=gpu:2']}")),
     "`FILE:3: head.slurm_flags: '--gres=gpu:2' clashes with the GPU count …; set gpus instead`"),
]


@pytest.fixture
def dashboard() -> Iterator[FakeRayDashboard]:
    """A Jobs API that answers like this client's Ray and records every request (so nothing must reach it)."""
    from hpcray.jobs import client_ray_version

    with FakeRayDashboard(client_ray_version() or "2.60.0") as fake:
        yield fake


@pytest.mark.parametrize("spec", [pytest.param(spec, id=name.replace(" ", "-"), marks=case(name, sees))
                                  for name, spec, sees in OFFLINE])
def test_refused_before_anything_is_touched(world: World, capsys: pytest.CaptureFixture[str],
                                            dashboard: FakeRayDashboard, spec: Offline) -> None:
    secret = secrets.token_urlsafe(12)
    profile = world.write("profile.yaml", spec.profile.replace("{secret}", secret))
    for name, (text, mode) in spec.files.items():
        world.write(name, text.replace("{secret}", secret), mode)

    def fill(text: str) -> str:
        for key, value in (("{profile}", profile), ("{dashboard}", dashboard.address), ("{in}", world.root / "in")):
            text = text.replace(key, str(value))
        return text

    line = refused(world, capsys, [fill(a) for a in spec.args], [fill(s) for s in spec.says],
                   observe=lambda: list(dashboard.requests))
    assert dashboard.requests == [] and secret not in line


def test_debug_shows_the_traceback_of_a_bad_input(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    profile = world.write("profile.yaml", LOCAL)
    code, _, err = hpcray(capsys, "--debug", "run", "-p", str(profile), "traning")
    assert code == 2 and "Traceback" in err and err.rstrip().splitlines()[-1].startswith("hpcray: error: ")


# ---------------------------------------------------------------------------------------------------------------
# helm and Kubernetes
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def kube_world(world: World, charts_env: Path, monkeypatch: pytest.MonkeyPatch) -> World:
    path = helm_path(4) or helm_path(3)
    if path is None:
        pytest.skip("no helm installed: run `make test` or set HPCRAY_HELM4")
    monkeypatch.setenv("HPCRAY_HELM", path)
    return world


@pytest.fixture
def fake_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeKubeAPI]:
    crd = tmp_path_factory.mktemp("crd") / "rayclusters.json"
    crd.write_text(json.dumps(MINIMAL_RAYCLUSTER_CRD))
    with FakeKubeAPI(crds=[crd]) as api:
        yield api


def kube_objects(api: FakeKubeAPI) -> dict[str, list[str]]:
    """Every object a command could have made, by kind (helm's release records are Secrets)."""
    return {kind: sorted(f"{o['metadata'].get('namespace')}/{o['metadata']['name']}" for o in api.list(kind, None))
            for kind in ("secrets", "configmaps", "rayclusters", "pods", "services", "namespaces")}


@pytest.mark.parametrize("command", [
    pytest.param(c, marks=case(f"unreachable Kubernetes API via {c}",
                               "`the Kubernetes API at http://127.0.0.1:PORT is unreachable; check kubernetes.context / "
                               "kubeconfig and that the API server is up` (or `cannot reach the Kubernetes API at …`)",
                               NOTHING_LOCK)) for c in ("up", "down", "status", "gc", "dashboard")])
def test_unreachable_kube_api(kube_world: World, capsys: pytest.CaptureFixture[str], command: str) -> None:
    port = closed_port()
    kubeconfig = kube_world.write("kubeconfig", json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "c", "user": {}}], "contexts": [{"name": "c", "context": {"cluster": "c", "user": "c"}}]}))
    profile = kube_world.write("kr.yaml", kuberay(kubeconfig))
    line = refused(kube_world, capsys, [command, "-p", str(profile)], [f"http://127.0.0.1:{port}",
                                                                       "check kubernetes.context / kubeconfig"])
    assert "unreachable" in line or "cannot reach" in line


@pytest.mark.parametrize("command", [
    pytest.param(c, marks=case(f"kube context not in the kubeconfig via {c}", "`kube context 'elsewhere' is not in …; "
                               "fix kubernetes.context (see `kubectl config get-contexts`)`", NOTHING_LOCK))
    for c in ("up", "status")])
def test_wrong_kube_context(kube_world: World, capsys: pytest.CaptureFixture[str], fake_api: FakeKubeAPI,
                            command: str) -> None:
    kubeconfig = fake_api.write_kubeconfig(kube_world.root / "in" / "kubeconfig")
    profile = kube_world.write("kr.yaml", kuberay(kubeconfig, kubernetes=f"{{namespace: default, kubeconfig: "
                                                                         f"'{kubeconfig}', context: elsewhere}}"))
    refused(kube_world, capsys, [command, "-p", str(profile)], ["kube context 'elsewhere' is not in",
                                                                "fix kubernetes.context"],
            observe=lambda: kube_objects(fake_api))


@pytest.mark.parametrize("command", [
    pytest.param(c, marks=case(f"namespace missing via {c}", "`namespace 'ray-nobody' does not exist at URL; create it "
                               "(`kubectl create namespace ray-nobody`) or fix kubernetes.namespace`", NOTHING_LOCK))
    for c in ("up", "down")])
def test_namespace_missing(kube_world: World, capsys: pytest.CaptureFixture[str], fake_api: FakeKubeAPI,
                           command: str) -> None:
    kubeconfig = fake_api.write_kubeconfig(kube_world.root / "in" / "kubeconfig")
    profile = kube_world.write("kr.yaml", kuberay(kubeconfig, kubernetes=f"{{namespace: ray-nobody, kubeconfig: "
                                                                         f"'{kubeconfig}'}}"))
    refused(kube_world, capsys, [command, "-p", str(profile)],
            ["namespace 'ray-nobody' does not exist", "kubectl create namespace ray-nobody", "kubernetes.namespace"],
            observe=lambda: kube_objects(fake_api))


@pytest.mark.parametrize("kind", [
    pytest.param("missing", marks=case("helm missing (HPCRAY_HELM points nowhere, PATH empty) via up",
                                       "`HPCRAY_HELM=PATH is not an executable file; point it at helm 3 or 4, or unset "
                                       "it to use the helm on PATH`")),
    pytest.param("helm 2", marks=case("helm of an unsupported major version (v2.17.0) via up",
                                      "`PATH is helm 2.17.0; hpcray supports helm 3 and 4 — install one with `make "
                                      "install` or set HPCRAY_HELM`"))])
def test_helm_missing_or_unsupported(kube_world: World, capsys: pytest.CaptureFixture[str], fake_api: FakeKubeAPI,
                                     monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    if kind == "missing":
        helm, says = str(kube_world.root / "nowhere" / "helm"), ["is not an executable file", "HPCRAY_HELM"]
        monkeypatch.setenv("PATH", "")
    else:
        helm = str(kube_world.write("fake_helm", "#!/bin/sh\necho 'v2.17.0+ga690bad'\n", 0o755))
        says = ["is helm 2.17.0; hpcray supports helm 3 and 4"]
    monkeypatch.setenv("HPCRAY_HELM", helm)
    kubeconfig = fake_api.write_kubeconfig(kube_world.root / "in" / "kubeconfig")
    profile = kube_world.write("kr.yaml", kuberay(kubeconfig))
    refused(kube_world, capsys, ["up", "-p", str(profile)], [helm, *says], observe=lambda: kube_objects(fake_api))


@pytest.fixture
def chart_repo(charts_env: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Helm chart repository (index.yaml made by `helm repo index`) on 127.0.0.1 holding ray-cluster 1.2.2."""
    helm = helm_path(4) or helm_path(3)
    assert helm is not None
    directory = tmp_path_factory.mktemp("chart-repo")
    shutil.copy(charts_env / "ray-cluster-1.2.2.tgz", directory)
    handler = functools.partial(type("Quiet", (SimpleHTTPRequestHandler,), {"log_message": lambda *a: None}),
                                directory=str(directory))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    subprocess.run([helm, "repo", "index", str(directory), "--url", url], check=True, capture_output=True)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()


@case("chart version not in the repository (nor the charts dir) via up",
      "`chart ray-cluster 9.9.9 is not available locally and could not be pulled from URL (… chart version not found "
      "in the repository; fix chart.version …); set chart.path …`", NOTHING_LOCK)
def test_chart_version_not_in_repo(kube_world: World, capsys: pytest.CaptureFixture[str], fake_api: FakeKubeAPI,
                                   chart_repo: str) -> None:
    kubeconfig = fake_api.write_kubeconfig(kube_world.root / "in" / "kubeconfig")
    profile = kube_world.write("kr.yaml", kuberay(kubeconfig, chart=f"{{version: 9.9.9, repo: '{chart_repo}'}}"))
    refused(kube_world, capsys, ["up", "-p", str(profile)],
            ["ray-cluster 9.9.9", chart_repo, "fix chart.version", "chart.path"], observe=lambda: kube_objects(fake_api))


# ---------------------------------------------------------------------------------------------------------------
# Ray: the cluster's address, version, size limit and job ids
# ---------------------------------------------------------------------------------------------------------------


@case("unreachable Ray address via submit",
      "progress lines while it waits, then `the Ray Jobs API at http://127.0.0.1:PORT did not answer within N s: "
      "cannot reach …; is the cluster up (`hpcray status`), or is --address wrong?`, exit 2", NOTHING)
def test_unreachable_ray_address_fails_in_bounded_time(world: World, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from hpcray import jobs

    monkeypatch.setattr(jobs, "API_WAIT_S", 2.0)  # 60 s by default, for a port-forward that is still starting
    address = f"http://127.0.0.1:{closed_port()}"
    start = time.monotonic()
    refused(world, capsys, ["submit", "--address", address, "--", "true"],
            [address, "did not answer within 2 s", "is --address wrong?"], progress=True)
    assert time.monotonic() - start < 10


@case("Ray major version mismatch (cluster 1.13.0) via submit",
      "`the cluster at URL runs Ray 1.13.0 but this client has Ray 2.x; install ray==1.13.0 here …`", NOTHING)
def test_ray_major_mismatch(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    with FakeRayDashboard("1.13.0") as old:
        refused(world, capsys, ["submit", "--address", old.address, "--", "true"],
                [old.address, "runs Ray 1.13.0", "install ray==1.13.0"])
    assert old.requests == ["GET /api/version"]


@case("working dir over Ray's upload limit via submit",
      "`DIR packs to 513 MiB, over Ray's upload limit of 512 MiB …; largest: data.bin (513 MiB); exclude them with "
      "runtime_env.excludes or a .rayignore file …`, before any upload", NOTHING)
def test_working_dir_over_the_limit_is_reported_before_uploading(world: World, capsys: pytest.CaptureFixture[str],
                                                                 dashboard: FakeRayDashboard) -> None:
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    wd = world.root / "in" / "wd"
    wd.mkdir(parents=True)
    (wd / "main.py").write_text("print('hello')\n")
    with open(wd / "data.bin", "wb") as f:
        f.truncate(GCS_STORAGE_MAX_SIZE + 2**20)  # sparse: costs no disk
    refused(world, capsys, ["submit", "--address", dashboard.address, "--working-dir", str(wd), "--", "python main.py"],
            [str(wd), "over Ray's upload limit", "data.bin", ".rayignore"])
    assert dashboard.writes == [], "nothing may be uploaded or submitted"


@pytest.fixture
def ray_jobs(ray_head: Any) -> Callable[[], set[str]]:
    from hpcray.jobs import JobsApi

    api = JobsApi(ray_head.address)
    return lambda: {str(j.get("submission_id")) for j in api.list()}


@pytest.mark.parametrize("command", [
    pytest.param(c, id="-".join(c), marks=case(f"non-existent job id via {' '.join(c)}",
                                              "`no job 'raysubmit_doesnotexist' on the Ray cluster at URL; `hpcray "
                                              "list` shows the jobs`", "nothing (the cluster's job list is unchanged)"))
    for c in (["logs"], ["logs", "-f"], ["stop"], ["job-status"], ["status"])])
def test_nonexistent_job_id(world: World, capsys: pytest.CaptureFixture[str], ray_head: Any,
                            ray_jobs: Callable[[], set[str]], monkeypatch: pytest.MonkeyPatch,
                            command: list[str]) -> None:
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", ray_head.address)  # `status ID` has no --address of its own
    refused(world, capsys, [*command, "raysubmit_doesnotexist"],
            ["no job 'raysubmit_doesnotexist'", ray_head.address, "hpcray list"], observe=ray_jobs)


# ---------------------------------------------------------------------------------------------------------------
# MLflow: checked before anything starts or is queued
# ---------------------------------------------------------------------------------------------------------------


def mlflow_runs(server: Any) -> int:
    """How many runs exist on the server, in every experiment (as its admin)."""
    token = base64.b64encode(":".join(server.admin).encode()).decode()

    def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(f"{server.url}/api/2.0/mlflow/{path}", data=json.dumps(body).encode(),
                                         headers={"Authorization": f"Basic {token}",
                                                  "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as resp:
            return dict(json.load(resp))

    experiments = post("experiments/search", {"max_results": 1000}).get("experiments", [])
    ids = [e["experiment_id"] for e in experiments]
    return len(post("runs/search", {"experiment_ids": ids, "run_view_type": "ALL", "max_results": 1000})
               .get("runs", [])) if ids else 0


def mlflow_profile(world: World, uri: str, experiment: str = "bad-input") -> Path:
    return world.write("profile.yaml", LOCAL.replace("{credentials: none}", f"{{tracking_uri: '{uri}', experiment: "
                                                                             f"{experiment}, credentials: env}}"))


@case("MLflow down via run", "`the MLflow server at URL does not answer (Connection refused); check "
                             "mlflow.tracking_uri and that the server is up`, before any Ray head starts", NOTHING)
def test_mlflow_down(world: World, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secrets.token_urlsafe(12))
    refused(world, capsys, ["run", "-p", str(mlflow_profile(world, uri)), "ok"],
            [uri, "does not answer", "check mlflow.tracking_uri"])


@case("MLflow wrong password via run", "`the MLflow server at URL rejected user 'U' (401: wrong username or "
                                       "password); check MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD …`, before "
                                       "any Ray head starts", "nothing (no MLflow run, no process, no file)")
def test_mlflow_wrong_password(world: World, capsys: pytest.CaptureFixture[str], mlflow_server: Any,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    user, wrong = f"u{secrets.token_hex(4)}", secrets.token_urlsafe(16)
    mlflow_server.create_user(user, secrets.token_urlsafe(16))
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", wrong)
    line = refused(world, capsys, ["run", "-p", str(mlflow_profile(world, mlflow_server.url)), "ok"],
                   [mlflow_server.url, f"rejected user '{user}' (401", "MLFLOW_TRACKING_PASSWORD"],
                   observe=lambda: mlflow_runs(mlflow_server))
    assert wrong not in line


@case("MLflow experiment of another user via submit",
      "`user 'U' may not write to MLflow experiment 'E' (403: it belongs to someone else); set mlflow.experiment to a "
      "free name such as 'E-U'`, before anything is queued", "nothing (no MLflow run, no Ray job, no file)")
def test_mlflow_foreign_experiment(world: World, capsys: pytest.CaptureFixture[str], mlflow_server: Any,
                                   dashboard: FakeRayDashboard, monkeypatch: pytest.MonkeyPatch) -> None:
    owner, owner_pw = f"u{secrets.token_hex(4)}", secrets.token_urlsafe(16)
    intruder, intruder_pw = f"u{secrets.token_hex(4)}", secrets.token_urlsafe(16)
    mlflow_server.create_user(owner, owner_pw)
    mlflow_server.create_user(intruder, intruder_pw)
    experiment = f"owned-{secrets.token_hex(4)}"
    mlflow_server.create_experiment_as(owner, owner_pw, experiment)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", intruder)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", intruder_pw)
    profile = mlflow_profile(world, mlflow_server.url, experiment)
    refused(world, capsys, ["submit", "-p", str(profile), "--address", dashboard.address, "ok"],
            [f"may not write to MLflow experiment '{experiment}' (403", f"'{experiment}-{intruder}'"],
            observe=lambda: (mlflow_runs(mlflow_server), list(dashboard.requests)))
    assert dashboard.requests == []
