"""Bad profiles: each is one line on stderr naming the file and the key, exit 2, no traceback."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Callable

import pytest

from hpcray.cli import main

GOOD_KUBERAY = """\
name: good
image: {dir: /sif, name: ray}
head: {cpu: "2", memory: 4G}
"""
INTERLINK = """\
name: il
image: {dir: /sif}
head: {cpu: "2", memory: 4G}
interlink: {enabled: true, node: vk}
"""

# (case id, profile text, text that must appear in the one-line error)
CASES: list[tuple[str, str, str]] = [
    ("typo-key", GOOD_KUBERAY + "wokers: {}\n", "wokers: unknown key; did you mean 'workers'?"),
    ("typo-nested", GOOD_KUBERAY + "interlink: {enabeld: true}\n", "interlink.enabeld: unknown key; did you mean 'enabled'?"),
    ("wrong-type-replicas", GOOD_KUBERAY + "workers: {w: {replicas: two}}\n", "workers.w.replicas: expected a whole number, got a string ('two')"),
    ("wrong-type-bool", GOOD_KUBERAY + "interlink: {enabled: maybe, node: vk}\n", "interlink.enabled: expected true or false"),
    ("negative-gpus", GOOD_KUBERAY + "workers: {w: {gpus: -1}}\n", "workers.w.gpus: -1 GPUs is negative"),
    ("negative-replicas", GOOD_KUBERAY + "workers: {w: {replicas: -2}}\n", "workers.w.replicas: -2 is negative"),
    ("missing-name", "backend: local\n", "name: required"),
    ("missing-sif-dir", "name: x\nhead: {cpu: '1', memory: 1G}\n", "image.dir: required for the kuberay backend"),
    ("relative-sif-dir", INTERLINK.replace("dir: /sif", "dir: sif"), "image.dir: 'sif' is not absolute"),
    ("interlink-no-limits", "name: il\nimage: {dir: /sif}\ninterlink: {enabled: true, node: vk}\n", "head.cpu: required with interLink"),
    ("interlink-no-node", INTERLINK.replace("node: vk", "node: null"), "interlink.node: required when interlink.enabled"),
    ("slurm-mem-clash", INTERLINK.replace("node: vk}", "node: vk, slurm: {extra_flags: ['--mem=10G']}}"), "interlink.slurm.extra_flags: '--mem=10G' clashes"),
    ("slurm-cpus-clash", INTERLINK.replace("head: {", "head: {slurm_flags: ['--cpus-per-task=4'], "), "head.slurm_flags: '--cpus-per-task=4' clashes"),
    ("slurm-partition-flag", INTERLINK.replace("node: vk}", "node: vk, slurm: {extra_flags: ['-p gpu']}}"), "use interlink.slurm.partition"),
    ("chart-file-missing", GOOD_KUBERAY + "chart: {path: charts/ray-cluster-9.9.9.tgz}\n", "chart.path: "),
    ("chart-version-bad", GOOD_KUBERAY + "chart: {version: latest}\n", "chart.version: 'latest' is not a chart version"),
    ("undefined-env-var", GOOD_KUBERAY.replace("/sif", "'${HPCRAY_TEST_UNSET_DIR}/x'"), "image.dir: ${HPCRAY_TEST_UNSET_DIR} is not set"),
    ("bad-backend", GOOD_KUBERAY + "backend: slurm\n", "backend: 'slurm' is not one of kuberay, local"),
    ("bad-quantity", GOOD_KUBERAY.replace("memory: 4G", "memory: lots"), "head.memory: 'lots' is not a Kubernetes quantity"),
    ("bad-name", GOOD_KUBERAY.replace("name: good", "name: My_Cluster"), "name: 'My_Cluster' must be a lowercase DNS label"),
    ("bad-ttl", GOOD_KUBERAY + "ttl: forever\n", "ttl: 'forever' is not a duration"),
    ("job-no-entrypoint", GOOD_KUBERAY + "jobs: {train: {working_dir: .}}\n", "jobs.train: give exactly one of entrypoint or itwinai"),
    ("volume-two-sources", GOOD_KUBERAY + "volumes: [{name: d, mount_path: /d, host_path: /x, pvc: y}]\n", "volumes[0]: give exactly one of host_path or pvc"),
    ("cred-file-missing", GOOD_KUBERAY + "mlflow: {credentials: file}\n", "mlflow.credentials_file: required"),
    ("num-gpus-twice", GOOD_KUBERAY.replace("head: {", "head: {gpus: 1, ray_start_params: {num-gpus: '2'}, "), "head.ray_start_params.num-gpus: set by head.gpus"),
    ("malformed-yaml", "name: x\nhead: {cpu: '1'\n  memory: 2G\n", "malformed YAML"),
    ("duplicate-key", GOOD_KUBERAY + "name: again\n", "duplicate key 'name'"),
    ("not-a-mapping", "- just\n- a list\n", "a profile is a YAML mapping"),
    ("template-missing", GOOD_KUBERAY + "template: nowhere.j2\n", "template: "),
    ("null-value", GOOD_KUBERAY + "kubernetes: {namespace: }\n", "kubernetes.namespace: has no value"),
    ("zero-cpu", GOOD_KUBERAY.replace('cpu: "2"', 'cpu: "0"'), "head.cpu: '0' gives the pod no CPU to run Ray on"),
    ("zero-memory", GOOD_KUBERAY.replace("memory: 4G", "memory: 0Gi"), "head.memory: '0Gi' gives the pod no memory"),
    ("interlink-below-one-cpu", INTERLINK.replace('cpu: "2"', "cpu: 500m"),
     "head.cpu: '500m' is less than one CPU; interLink's SLURM plugin gives a job whole CPUs (--cpus-per-task=1)"),
    ("interlink-fractional-cpu", INTERLINK + "workers: {w: {cpu: 1500m, memory: 4G}}\n",
     "workers.w.cpu: '1500m' is not a whole number of CPUs; interLink's SLURM plugin rounds it up to "
     "--cpus-per-task=2: write 2 (or 1)"),
    ("password-in-tracking-uri", GOOD_KUBERAY + "mlflow: {tracking_uri: 'https://alice:hunter2@mlflow.example.org'}\n",
     "mlflow.tracking_uri: the URL 'https://alice:***@…' carries a password, which would land in the rendered values "
     "and job specs; remove 'user:password@' from it and give the username and password through mlflow.credentials"),
    ("password-in-image-source", GOOD_KUBERAY.replace("name: ray}", "name: ray, source: 'docker://u:pw@reg.io/ray'}"),
     "image.source: the URL 'docker://u:***@…' carries a password"),
    ("interlink-pvc", INTERLINK + "volumes: [{name: d, mount_path: /d, pvc: data}]\n",
     "volumes[0].pvc: interLink's SLURM plugin ignores PVCs and then drops every bind of the container"),
    ("host-path-type", GOOD_KUBERAY + "volumes: [{name: d, mount_path: /d, host_path: /x, host_path_type: File}]\n",
     "volumes[0].host_path_type: 'File' is not one of Directory, DirectoryOrCreate"),
    ("gpu-mode-typo", INTERLINK.replace("node: vk}", "node: vk, gpu_mode: gress}"),
     "interlink.gpu_mode: 'gress' is not one of gres, resource (did you mean 'gres'?)"),
    ("toleration-seconds-string", INTERLINK.replace("node: vk}", "node: vk, tolerations: [{key: k, operator: Exists, "
                                                    "effect: NoExecute, tolerationSeconds: '300'}]}"),
     "interlink.tolerations[0].tolerationSeconds: expected a whole number, got a string ('300')"),
    ("toleration-seconds-no-execute", INTERLINK.replace("node: vk}", "node: vk, tolerations: [{key: k, "
                                                        "effect: NoSchedule, tolerationSeconds: 300}]}"),
     "interlink.tolerations[0].tolerationSeconds: only applies to effect NoExecute"),
    ("toleration-exists-value", INTERLINK.replace("node: vk}", "node: vk, tolerations: [{key: k, operator: Exists, "
                                                  "value: v}]}"),
     "interlink.tolerations[0].value: must be empty with operator Exists"),
    ("mesh-with-pod-vpn", INTERLINK.replace("node: vk}", "node: vk, mesh: true}"),
     "interlink.mesh: the virtual kubelet builds its mesh only for pods without interlink.eu/pod-vpn; add "
     "interlink.pod_vpn: false"),
    ("bootstrap-without-pod-vpn", INTERLINK.replace("node: vk}", "node: vk, pod_vpn: false, vpn_bootstrap: up.sh}"),
     "interlink.vpn_bootstrap: brings $POD_IP up, which only pods with interlink.pod_vpn get"),
]


@pytest.mark.parametrize("text,expected", [
    pytest.param(text, expected, id=case, marks=pytest.mark.reliability(
        case=f"bad profile: {case}", sees=f"`hpcray: error: FILE:LINE: {expected}…`, exit 2",
        remains="nothing (checked before helm or Ray is touched)"))
    for case, text, expected in CASES])
def test_bad_profile_is_one_line_naming_file_and_key(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch, text: str, expected: str) -> None:
    monkeypatch.delenv("HPCRAY_TEST_UNSET_DIR", raising=False)
    profile = tmp_path / "bad.yaml"
    profile.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        main(["render", "--no-check", "--profile", str(profile)])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"hpcray: error: {profile}")
    assert expected in lines[0], lines[0]
    assert "Traceback" not in captured.err


def test_line_number_of_the_offending_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    profile = tmp_path / "bad.yaml"
    profile.write_text(GOOD_KUBERAY + "workers:\n  w:\n    replicas: 1\n    gpus: -3\n")
    with pytest.raises(SystemExit):
        main(["render", "--no-check", "--profile", str(profile)])
    assert f"{profile}:7: workers.w.gpus: -3 GPUs is negative" in capsys.readouterr().err


def test_malformed_yaml_names_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    profile = tmp_path / "bad.yaml"
    profile.write_text("name: x\nhead:\n  cpu: '1'\n   memory: 2G\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["render", "--no-check", "--profile", str(profile)])
    assert exit_info.value.code == 2
    assert f"{profile}:4:" in capsys.readouterr().err


def test_unknown_profile_name_suggests_known_ones(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["render", "--no-check", "--profile", "vegaa"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "did you mean 'vega'?" in err


def test_undefined_template_variable_names_template_and_line(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "mine.yaml.j2").write_text("image:\n  repository: {{ p.image.dir }}\n  tag: {{ p.image.flavour }}\n")
    profile = tmp_path / "p.yaml"
    profile.write_text(GOOD_KUBERAY + "template: mine.yaml.j2\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["render", "--no-check", "--profile", str(profile)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert f"{tmp_path / 'mine.yaml.j2'}:3:" in err and "flavour" in err
    assert len(err.strip().splitlines()) == 1


def test_debug_shows_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    profile = tmp_path / "bad.yaml"
    profile.write_text(GOOD_KUBERAY + "wokers: {}\n")
    with pytest.raises(SystemExit):
        main(["--debug", "render", "--no-check", "--profile", str(profile)])
    assert "Traceback" in capsys.readouterr().err


# Bad input that used to get through (issue 13), for every command that loads a profile: each case makes the
# profile file and names what the one-line error must say.
def _not_utf8(tmp_path: Path) -> Path:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(GOOD_KUBERAY.encode() + b"# caf\xe9 au lait\n")
    return path


def _unreadable(tmp_path: Path) -> Path:
    return Path("/proc/self/mem")  # a regular file that every user, root included, fails to read


def _text(text: str) -> Callable[[Path], Path]:
    def make(tmp_path: Path) -> Path:
        path = tmp_path / "bad.yaml"
        path.write_text(text)
        return path
    return make


LOAD_FAILURES: list[tuple[str, Callable[[Path], Path], str]] = [
    ("not UTF-8", _not_utf8, ":4: not UTF-8 text (byte 0xe9); a profile is a YAML file: save it as UTF-8"),
    ("unreadable", _unreadable, "/proc/self/mem: cannot read it: Input/output error"),
    ("zero CPUs", _text(GOOD_KUBERAY.replace('cpu: "2"', 'cpu: "0"')), "head.cpu: '0' gives the pod no CPU"),
    ("below one CPU on interLink", _text(INTERLINK.replace('cpu: "2"', "cpu: 500m")),
     "head.cpu: '500m' is less than one CPU"),
    ("password in a URL", _text(GOOD_KUBERAY + "mlflow: {tracking_uri: 'https://alice:hunter2@mlflow.example.org'}\n"),
     "mlflow.tracking_uri: the URL 'https://alice:***@…' carries a password"),
]
COMMANDS = [["render"], ["render", "--manifest"], ["profile"], ["up", "--dry-run"], ["down", "--dry-run"],
            ["submit", "--dry-run", "--", "true"], ["run", "--dry-run", "training"], ["status"], ["list"],
            ["pull", "--slurm", "--print"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c))
@pytest.mark.parametrize("make,expected", [
    pytest.param(make, expected, id=case, marks=pytest.mark.reliability(
        case=f"profile: {case}", sees=f"`hpcray: error: FILE…{expected}…`, exit 2, for every command",
        remains="nothing (refused while loading the profile)"))
    for case, make, expected in LOAD_FAILURES])
def test_bad_input_is_refused_by_every_command(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               make: Callable[[Path], Path], expected: str,
                                               command: list[str]) -> None:
    profile = make(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([command[0], "--profile", str(profile), *command[1:]])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2, captured.err
    assert captured.out == ""
    [line] = captured.err.strip().splitlines()
    assert line.startswith(f"hpcray: error: {profile}") and expected in line, line
    assert "hunter2" not in captured.err


@pytest.mark.reliability(case="profile: a password in a URL from an environment variable",
                         sees="`hpcray: error: FILE:LINE: mlflow.tracking_uri: the URL 'https://alice:***@…' carries "
                              "a password…`, exit 2; the password is not shown",
                         remains="nothing (refused while loading the profile)")
def test_password_from_the_environment_is_refused_without_echoing_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    password = secrets.token_urlsafe(12)
    monkeypatch.setenv("HPCRAY_TEST_MLFLOW_PW", password)
    profile = tmp_path / "p.yaml"
    profile.write_text(GOOD_KUBERAY + "mlflow:\n"
                       "  tracking_uri: https://alice:${HPCRAY_TEST_MLFLOW_PW}@mlflow.example.org\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["submit", "--dry-run", "--profile", str(profile), "--", "python", "train.py"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2
    assert f"{profile}:5: mlflow.tracking_uri: the URL 'https://alice:***@…' carries a password" in captured.err
    assert password not in captured.out + captured.err


def test_shell_variables_in_urls_are_left_to_the_shell(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`$TOKEN` is no password in the profile: the compute node's shell fills it in, hpcray never sees it."""
    profile = tmp_path / "p.yaml"
    profile.write_text(INTERLINK.replace("node: vk}",
                                         "node: vk, pre_exec: 'git clone https://me:$TOKEN@git.example.org/x'}"))
    main(["render", "--no-check", "--profile", str(profile)])
    assert "https://me:$TOKEN@git.example.org/x" in capsys.readouterr().out
