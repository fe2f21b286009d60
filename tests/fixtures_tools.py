"""Real helm binaries (3 and 4) and the real KubeRay charts, found or fetched; skipped with the reason otherwise."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CHART_VERSIONS = ("1.2.2", "1.7.0")


def helm_path(major: int) -> str | None:
    for candidate in (os.environ.get(f"HPCRAY_HELM{major}"), REPO / ".tools" / f"helm{major}" / "helm"):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


@pytest.fixture(params=[3, 4], ids=["helm3", "helm4"])
def helm_bin(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test using this runs with real helm 3 and real helm 4, made hpcray's helm via HPCRAY_HELM."""
    path = helm_path(request.param)
    if path is None:
        pytest.skip(f"helm {request.param} not installed: run `make test` (it fetches it into .tools/helm"
                    f"{request.param}) or set HPCRAY_HELM{request.param}")
    monkeypatch.setenv("HPCRAY_HELM", path)
    return path


@pytest.fixture(scope="session")
def charts_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with ray-cluster-<v>.tgz and kuberay-operator-<v>.tgz (+ crds/): $HPCRAY_CHARTS_DIR, ../shared/charts,
    else `helm pull` from the KubeRay repository, else skip saying why."""
    for candidate in (os.environ.get("HPCRAY_CHARTS_DIR"), REPO.parent / "shared" / "charts"):
        if candidate and all((Path(candidate) / f"ray-cluster-{v}.tgz").is_file() for v in CHART_VERSIONS):
            return Path(candidate)
    helm = helm_path(3) or shutil.which("helm")
    if helm is None:
        pytest.skip("no KubeRay charts: set HPCRAY_CHARTS_DIR, or install helm to pull them")
    dest = tmp_path_factory.mktemp("charts")
    for v in CHART_VERSIONS:
        for chart in ("ray-cluster", "kuberay-operator"):
            done = subprocess.run([helm, "pull", chart, "--repo", "https://ray-project.github.io/kuberay-helm/",
                                   "--version", v, "--destination", str(dest)], capture_output=True, text=True,
                                  timeout=120)
            if done.returncode:
                pytest.skip(f"no KubeRay charts here (not in $HPCRAY_CHARTS_DIR or ../shared/charts) and helm pull "
                            f"failed: {done.stderr.strip()[:200]}")
    return dest


@pytest.fixture
def charts_env(charts_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """hpcray reads charts (and CRDs) from charts_dir; its download cache is a fresh temp dir."""
    monkeypatch.setenv("HPCRAY_CHARTS_DIR", str(charts_dir))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return charts_dir
