"""SIF images: the profile's `image.source` pulled into exactly `<image.dir>/<name>:<tag>` (the file the chart's pods
name), on this machine through spython or on the SLURM side by a batch job. Either way the image is written under a
partial name and renamed, so the final name never holds half an image.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from hpcray import shipped, slurm
from hpcray.errors import ImageError, ProfileError, ToolMissing
from hpcray.profile import Profile

# What spython (and singularity) can pull from.
_SOURCE = re.compile(r"^(docker|oras|library|shub|https)://\S+$")


@dataclass
class PullResult:
    path: str
    pulled: bool  # False: the file was already there
    job_id: str | None = None
    seconds: float = 0.0


def present(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def _fail(p: Profile, key: str, problem: str) -> ProfileError:
    line = p.key_lines.get(key) or p.key_lines.get(key.rsplit(".", 1)[0])
    return ProfileError(f"{p.source}:{line}" if line else str(p.source), key, problem)


def target(p: Profile) -> tuple[Path, str]:
    """(the SIF file, the source to pull it from), or ProfileError naming the key that stops a pull."""
    if not p.image.dir or not p.image.dir.startswith("/"):
        raise _fail(p, "image.dir", f"{p.image.dir!r} is not an absolute directory; `hpcray pull` writes the SIF "
                                    "there, e.g. image.dir: /ceph/hpc/data/<project>/<user>")
    if re.search(r"\s", p.image.sif_path):
        raise _fail(p, "image.dir", f"{p.image.sif_path!r} contains whitespace; pick a path without")
    if not p.image.source or not _SOURCE.match(p.image.source):
        raise _fail(p, "image.source", f"{p.image.source!r} is not something singularity can pull; write e.g. "
                                       "docker://ghcr.io/intertwin-eu/hython-itwinai-plugin:latest")
    return Path(p.image.sif_path), p.image.source


def sif_known_missing(p: Profile) -> str | None:
    """A warning for `hpcray up` when the SIF is known to be absent: its directory is visible here and lacks the
    file. None when it is there, or when this machine cannot tell (the directory exists only on the SLURM side)."""
    if not p.image.dir:
        return None
    final = Path(p.image.sif_path)
    if not final.parent.is_dir() or present(final):
        return None
    return (f"{final} does not exist, so the Ray pods cannot start; pull it with "
            f"`hpcray pull --profile {p.source} --slurm`")


def _make_dir(final: Path) -> None:
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImageError(f"cannot create {final.parent} ({exc.strerror}); create it, or fix image.dir") from None


# ---------------------------------------------------------------------------------------------------------------
# Here: singularity (or apptainer) through spython
# ---------------------------------------------------------------------------------------------------------------


def find_runtime() -> str:
    found = shutil.which("singularity") or shutil.which("apptainer")
    if found is None:
        raise ToolMissing("neither singularity nor apptainer is on PATH; install Apptainer (or `module load "
                          "apptainer`), or pull on the SLURM side with `hpcray pull --slurm`")
    return found


@contextlib.contextmanager
def _as_singularity(runtime: str) -> Iterator[None]:
    """spython always runs `singularity`: where only apptainer exists, put a `singularity` link to it on PATH."""
    if Path(runtime).name == "singularity":
        yield
        return
    saved = os.environ["PATH"]
    with tempfile.TemporaryDirectory(prefix="hpcray-runtime-") as d:
        os.symlink(runtime, Path(d) / "singularity")
        os.environ["PATH"] = f"{d}{os.pathsep}{saved}"
        try:
            yield
        finally:
            os.environ["PATH"] = saved


def _lines(stream: Iterator[str]) -> Iterator[str]:
    """spython's output stream, minus the empty line it prints to stderr when the command fails."""
    while True:
        with contextlib.redirect_stderr(io.StringIO()):
            line = next(stream, None)
        if line is None:
            return
        yield line


def pull(p: Profile, force: bool = False, progress: Callable[[str], None] = lambda _: None) -> PullResult:
    """Pull image.source into the SIF file on this machine; skipped when the file is there unless `force`."""
    final, source = target(p)
    if present(final) and not force:
        return PullResult(str(final), pulled=False)
    runtime = find_runtime()
    _make_dir(final)
    partial = final.with_name(f"{final.name}.partial.{os.getpid()}")
    start = time.monotonic()
    try:
        _spython_pull(runtime, source, partial, progress)
        if not present(partial):
            # spython returns the path whether or not singularity wrote it.
            raise ImageError(f"{Path(runtime).name} pull {source} ended without error but wrote nothing to "
                             f"{partial}; check the runtime's configuration (cache dir, disk quota)")
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)
    return PullResult(str(final), pulled=True, seconds=round(time.monotonic() - start, 1))


def _spython_pull(runtime: str, source: str, partial: Path, progress: Callable[[str], None]) -> None:
    from spython.main import Client

    tail: deque[str] = deque(maxlen=6)
    try:
        with _as_singularity(runtime):
            _, stream = Client.pull(source, name=str(partial), force=True, stream=True, quiet=True)
            for line in _lines(stream):
                if line.strip():
                    tail.append(line.strip())
                    progress(line.rstrip())
    except FileNotFoundError:
        raise ToolMissing(f"{runtime} cannot be run; reinstall it or fix PATH") from None
    except subprocess.CalledProcessError as exc:
        said = " | ".join(tail) or "no output"
        raise ImageError(f"{Path(runtime).name} pull {source} failed (exit code {exc.returncode}): {said}; check "
                         "image.source, the registry login and the disk space in image.dir") from None


# ---------------------------------------------------------------------------------------------------------------
# On the SLURM side: a batch job
# ---------------------------------------------------------------------------------------------------------------


def render_pull_script(p: Profile, force: bool = False) -> str:
    """The sbatch script that pulls the image: only the sbatch flags the profile sets, pull-if-missing, atomic rename."""
    import jinja2

    final, source = target(p)
    s = p.interlink.slurm
    for key in ("partition", "time", "account", "qos"):
        value = getattr(s, key)
        if value is not None and not re.fullmatch(r"[^\s#]+", value):
            raise _fail(p, f"interlink.slurm.{key}", f"{value!r} is not a single sbatch value (no spaces or '#')")
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, trim_blocks=True,
                             lstrip_blocks=True, autoescape=False)
    env.filters["q"] = lambda v: shlex.quote(str(v))
    template = env.from_string(shipped.text("templates", "pull.sbatch.j2"))
    return template.render(final=str(final), source=source, log=str(log_pattern(final)), force=force, slurm=s,
                           job_name=f"hpcray-pull-{p.name}", profile=p.name, pre_exec=p.interlink.pre_exec)


def log_pattern(final: Path) -> Path:
    """The job's output file beside the image (the one place the job surely can write), `%j` for the job id."""
    return final.parent / ".hpcray-pull-%j.log"


def _written(path: Path) -> str | None:
    try:
        size = path.stat().st_size
    except OSError:
        return None
    return f"{size / 2**30:.2f} GiB written" if size >= 2**30 else f"{size / 2**20:.1f} MiB written"


def pull_slurm(p: Profile, force: bool = False, timeout: float = 7200.0,
               progress: Callable[[str], None] = lambda _: None) -> PullResult:
    """Submit the pull script with sbatch and wait for the job's end; skipped without a job when the SIF is visible
    here unless `force`. Raises SlurmError with the job's output when it fails."""
    final, source = target(p)
    if present(final) and not force:
        return PullResult(str(final), pulled=False)
    script = render_pull_script(p, force)
    _make_dir(final)  # sbatch does not create the directory of --output; without it the job fails silently
    start = time.monotonic()
    job_id = slurm.submit(script, fix=f"check interlink.slurm (partition, time, account, qos) in {p.source}")
    partial = final.with_name(f"{final.name}.partial.{job_id}")
    try:
        progress(f"submitted SLURM job {job_id}: pull {source} into {final}")
        job = slurm.wait(job_id, timeout=timeout, say=progress, detail=lambda _: _written(partial))
    except KeyboardInterrupt:
        progress(f"job {job_id} keeps running; `scancel {job_id}` stops it")
        raise
    if not job.ok:
        raise slurm.failure(job, f"pulling {source} into {final}")
    log = Path(str(log_pattern(final)).replace("%j", job_id))
    skipped = "hpcray-pull: skipped" in log.read_text(errors="replace") if log.is_file() else False
    if not present(final):
        raise ImageError(f"SLURM job {job_id} completed but {final} is not there from this machine; is image.dir "
                         f"the same filesystem on the compute nodes? (job output: {log})")
    log.unlink(missing_ok=True)
    return PullResult(str(final), pulled=not skipped, job_id=job_id, seconds=round(time.monotonic() - start, 1))
