"""Bad profiles: each is one line on stderr naming the file and the key, exit 2, no traceback."""

from __future__ import annotations

from pathlib import Path

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
