"""Shipping local code with a job: wheels staged into the working dir, working_dir / py_modules zipped and uploaded
with Ray's own packaging (so the package and its gcs:// name are exactly what `ray job submit` makes), and a cache
that lets an unchanged working dir skip `import ray` and hashing.

The only importer of `ray._private` in hpcray: `_ray_packaging` binds every helper used at once, so a Ray that moved
one is a single clear error naming the installed version and the range hpcray is tested with.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from hpcray.errors import HpcrayError, RayApiMoved, WorkingDirTooLarge
from hpcray.jobs.api import JobsApi, client_ray_version, reason
from hpcray.jobs.submission import is_uri
from hpcray.state import state_root, write_atomic

Say = Callable[[str], None]

WHEEL_DIR = "_hpcray_wheels"
PACKAGE_CACHE_SIZE = 100
"""Working dirs remembered in the package cache (the newest)."""


def tested_ray() -> str:
    """The Ray versions hpcray is tested with: its own requirement on ray, read from its installed metadata."""
    import re
    from importlib.metadata import PackageNotFoundError, requires

    try:
        required = requires("hpcray") or []
    except PackageNotFoundError:
        required = []
    for requirement in required:
        found = re.match(r"ray(?:\[[^\]]*\])?\s*([<>=!~][^;]*)?\s*(?:;|$)", requirement)
        if found:
            return f"ray{found.group(1) or ''}".strip()
    return "the Ray versions hpcray's pyproject.toml requires"


@functools.cache
def _ray_packaging() -> SimpleNamespace:
    """Ray's private packaging helpers, bound all at once."""
    try:
        from ray._private import ray_constants
        from ray._private.runtime_env import packaging, py_modules, working_dir

        return SimpleNamespace(
            ignore_gitignore_var=ray_constants.RAY_RUNTIME_ENV_IGNORE_GITIGNORE,
            default_excludes=ray_constants.get_runtime_env_default_excludes,
            upload_working_dir=working_dir.upload_working_dir_if_needed,
            upload_py_modules=py_modules.upload_py_modules_if_needed,
            uri_for_package=packaging.get_uri_for_package,
            uri_for_directory=packaging.get_uri_for_directory,
            create_package=packaging.create_package,
            dir_travel=packaging._dir_travel,
            get_excludes=packaging._get_excludes,
            max_size=packaging.GCS_STORAGE_MAX_SIZE,
        )
    except (ImportError, AttributeError) as exc:
        raise RayApiMoved(
            f"Ray {client_ray_version() or '(not installed)'} lacks the packaging helpers hpcray uploads local "
            f"working dirs and modules with ({type(exc).__name__}: {exc}); hpcray is tested with {tested_ray()}: "
            f"install a Ray in that range, or give the working dir as a URI (s3://, gs://, https://…zip)") from None


def build_wheel(project: Path, dest: Path) -> Path:
    """`pip wheel --no-deps` of a project directory; the one wheel it makes."""
    # An absolute path: pip reads a bare name such as `proj` as a package to fetch from the index.
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dest),
                           str(project.resolve())], capture_output=True, text=True)
    built = sorted(dest.glob("*.whl"))
    if done.returncode != 0 or not built:
        raise HpcrayError(f"building a wheel of {project} failed: {reason(done.stderr or done.stdout)}")
    return built[-1]


def stage_wheels(runtime_env: dict[str, Any], wheels: list[Path], tmp: Path) -> None:
    """Ship wheels inside the working dir and pip-install them from there, without touching the user's directory:
    the staged dir links to its entries (Ray's zip follows links, so the package holds the same files) and holds
    copies of the wheels, built first where a project directory is given.

    Each wheel sits in a directory named by its content hash: Ray keeps a job's pip environment under a hash of the
    requirement strings, so a rebuilt wheel with an unchanged name and version would otherwise be served from the
    environment of the old one."""
    if not wheels:
        return
    working_dir = runtime_env.get("working_dir")
    if working_dir and is_uri(working_dir):
        raise HpcrayError(f"wheels are shipped inside the working dir, which cannot be a URI ({working_dir}); "
                          f"use a local working dir or put the wheels on an index")
    stage = tmp / "working_dir"
    (stage / WHEEL_DIR).mkdir(parents=True)
    if working_dir:
        for entry in Path(working_dir).iterdir():
            (stage / entry.name).symlink_to(entry.resolve())
    pip = list(runtime_env.get("pip") or [])
    for wheel in wheels:
        built = build_wheel(wheel, Path(tempfile.mkdtemp(dir=tmp))) if wheel.is_dir() else wheel
        if built.suffix != ".whl" or not built.is_file():
            raise HpcrayError(f"{wheel}: neither a .whl file nor a Python project directory")
        digest = hashlib.sha256(built.read_bytes()).hexdigest()[:16]
        (stage / WHEEL_DIR / digest).mkdir(exist_ok=True)
        shutil.copy2(built, stage / WHEEL_DIR / digest / built.name)
        pip.append(f"${{RAY_RUNTIME_ENV_CREATE_WORKING_DIR}}/{WHEEL_DIR}/{digest}/{built.name}")
    runtime_env["working_dir"], runtime_env["pip"] = str(stage), pip


def upload_local_packages(api: JobsApi, runtime_env: dict[str, Any], progress: Say, *, cache: bool = True) -> None:
    """Replace local working_dir / py_modules paths by gcs:// URIs of packages uploaded to the cluster."""
    local = [x for x in [runtime_env.get("working_dir"), *(runtime_env.get("py_modules") or [])]
             if isinstance(x, str) and not is_uri(x)]
    if not local:
        return
    key = _package_key(runtime_env) if cache and local == [runtime_env.get("working_dir")] else None
    known = _package_cache().get(key) if key else None
    if known and api.package_exists(known):
        runtime_env["working_dir"] = known
        return
    _upload_with_ray(api, runtime_env, local, progress)
    if key:
        _remember_package(key, runtime_env["working_dir"])


def _upload_with_ray(api: JobsApi, runtime_env: dict[str, Any], local: list[str], progress: Say) -> None:
    import logging

    ray = _ray_packaging()
    for path in local:
        if not Path(path).exists():
            raise HpcrayError(f"{path}: no such working dir or module; give an existing directory (or a URI)")
    include_gitignore = os.environ.get(ray.ignore_gitignore_var, "0") != "1"
    excludes = ray.default_excludes() + list(runtime_env.get("excludes") or [])
    for path in local:
        if Path(path).is_dir():
            check_package_size(Path(path), excludes, include_gitignore)
    quiet = logging.getLogger("hpcray.packaging")  # Ray's own logger prints every step at INFO; keep warnings

    def uploader(parent: bool) -> Callable[..., None]:
        def upload(path: str, excludes: list[str] | None = None, is_file: bool = False) -> None:
            _upload(api, path, excludes or [], is_file, parent, include_gitignore, progress, quiet)
        return upload

    try:
        ray.upload_working_dir(runtime_env, include_gitignore, logger=quiet, upload_fn=uploader(False))
        ray.upload_py_modules(runtime_env, include_gitignore, logger=quiet, upload_fn=uploader(True))
    except ValueError as exc:  # Ray's packaging says what is wrong with a path
        raise HpcrayError(str(exc)) from None


def _upload(api: JobsApi, path: str, excludes: list[str], is_file: bool, include_parent_dir: bool,
            include_gitignore: bool, progress: Say, logger: Any) -> None:
    ray = _ray_packaging()
    if is_file:
        uri = ray.uri_for_package(Path(path))
    else:
        uri = ray.uri_for_directory(path, include_gitignore, excludes=excludes)
    if api.package_exists(uri):
        return
    with tempfile.TemporaryDirectory(prefix="hpcray-pkg-") as tmp:
        package = Path(path) if is_file else Path(tmp) / uri.split("://", 1)[1]
        if not is_file:
            ray.create_package(path, package, include_gitignore=include_gitignore,
                               include_parent_dir=include_parent_dir, excludes=excludes, logger=logger)
        data = package.read_bytes()
    progress(f"uploading {len(data) / 2**20:.1f} MiB as {uri}")
    api.put_package(uri, data)


def check_package_size(directory: Path, excludes: list[str], include_gitignore: bool) -> None:
    """Ray refuses a package of GCS_STORAGE_MAX_SIZE or more only once it is uploaded; say so before, naming the
    bulk. Ray zips without compression, so the package is the files that survive the excludes plus small headers.
    """
    import logging

    ray = _ray_packaging()
    sizes: dict[str, int] = {}

    def count(path: Path) -> None:
        if path.is_file():
            top = path.relative_to(directory).parts[0]
            sizes[top] = sizes.get(top, 0) + path.stat().st_size

    ray.dir_travel(directory, [ray.get_excludes(directory, excludes)], count, include_gitignore=include_gitignore,
                   logger=logging.getLogger("hpcray.packaging"))
    total, limit = sum(sizes.values()), ray.max_size
    if total >= limit:
        bulk = ", ".join(f"{name} ({size / 2**20:.0f} MiB)"
                         for name, size in sorted(sizes.items(), key=lambda kv: -kv[1])[:3])
        raise WorkingDirTooLarge(
            f"{directory} packs to {total / 2**20:.0f} MiB, over Ray's upload limit of {limit / 2**20:.0f} MiB "
            f"(RAY_max_grpc_message_size); largest: {bulk}; exclude them with runtime_env.excludes or a .rayignore "
            f"file, or put the data on a shared volume")


# ---------------------------------------------------------------------------------------------------------------
# The package cache: working dir fingerprint → gcs:// URI of its package
# ---------------------------------------------------------------------------------------------------------------


def _package_key(runtime_env: dict[str, Any]) -> str | None:
    """Changes whenever Ray's package of the working dir could: each file's path, size and mtime (excluded files
    too, which at worst costs an upload), the excludes, the Ray version and the settings Ray's packaging reads.
    Lets an unchanged working dir skip `import ray` and hashing (~1 s) when the cluster still has its package."""
    directory = Path(runtime_env["working_dir"])
    if not directory.is_dir():
        return None
    settings = [str(directory.resolve()), runtime_env.get("excludes"), client_ray_version(),
                [os.environ.get(k) for k in ("RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES",
                                             "RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "RAY_max_grpc_message_size")]]
    digest = hashlib.sha256(json.dumps(settings).encode())
    for root, dirs, files in os.walk(directory, followlinks=True):
        dirs.sort()
        for name in sorted(dirs + files):
            path = os.path.join(root, name)
            try:
                st = os.stat(path)
            except OSError:  # a dangling link: Ray skips it too
                continue
            digest.update(f"{os.path.relpath(path, directory)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _package_cache_path() -> Path:
    return state_root() / "packages.json"


def _package_cache() -> dict[str, str]:
    try:
        return dict(json.loads(_package_cache_path().read_text()))
    except (OSError, ValueError):
        return {}


def _remember_package(key: str, uri: str) -> None:
    cache = _package_cache()
    cache.pop(key, None)
    cache[key] = uri
    write_atomic(_package_cache_path(), json.dumps(dict(list(cache.items())[-PACKAGE_CACHE_SIZE:])))
