"""interLink's SLURM plugin, as it treats a pod (interlink-hq/interlink-slurm-plugin pkg/slurm: Create.go,
prepare.go, Status.go, GetLogs.go, Delete.go), over the real `sbatch`, `squeue` and `scancel`.

Create: a working directory `<DataRootFolder><ns>-<uid>` (0755); for every container (init containers first) an
env file `<container>_envfile.properties` of `NAME='value'` lines (shell-quoted, 0644) when it has env; its volume
binds (configMap/secret/projected → files, emptyDir → `emptyDirs/<name>`, hostPath only with type Directory or
DirectoryOrCreate, else "unsupported hostPath type ...", and any other volume — a PVC — makes the plugin drop
every bind of that container); `job.sh` (the plugin's shell functions, `runInitCtn` / `runCtn` lines of
`singularity exec|run <SingularityDefaultOptions> <singularity-mounts> <singularity-options> --env-file FILE
<binds> IMAGE` + the shell-quoted command and args) and `job.slurm` (`#SBATCH --job-name=<uid>`,
`--output=<dir>/job.out`, the `slurm-job.vk.io/flags` split and de-duplicated by key with aliases, later wins,
`--cpus-per-task`/`--mem` from the largest limits — or 1 / 1 MB — overriding the annotation's, `export POD_IP`,
the pre-exec, and the path of job.sh appended to the last prefix line, so a pre-exec whose last line does not run
its arguments swallows job.sh, as the real plugin's does); `sbatch job.slurm`, where any stderr is a failure.

Secret and ConfigMap volumes (prepare.go `mountData`/`mountDataSimpleVolume`/`prepareMountsSimpleVolume`): with
`SHARED_FS=true` (`shared_fs`, the default) each key is written before submission to
`<dir>/<secrets|configMaps>/<volume mount>/<key>` with the volume's defaultMode (os.WriteFile: less the umask) in
0755 directories; without it the plugin puts each value into its own process environment
(`<container>_<secrets|configMaps>_<hex of the path>`, os.Setenv: every later `sbatch` with its default
--export=ALL hands it to the job's environment) and job.slurm gets, before the other prefix lines,
`mkdir -p "<dir>" && touch "<file>"` and the value base64 in a `base64 -d <<'VKDATA_<hex>' > "<file>"` here-doc
(job.slurm 0774; the file the job makes has the job's umask, not defaultMode).

Debug log (`log`, as a site with `VerboseLogging: true` has it): the interLink API's create body (the pod with its
env already resolved to values, and the Secret objects of its volumes: create.go logs the whole body), and the
plugin's `---- Written envfile file <file> key <NAME> value <quoted value>` per variable (prepare.go createEnvFile).

Status: `squeue --noheader -a --states=all -O exit_code,StateCompact -j JID`; PD/S → waiting, R/CG → running,
TO → terminated `SlurmJobTimeout`, OOM → terminated `OOMKilled`, anything else terminated with the container's
`run-<name>.status` (or the job's exit code). Only the pod's containers are reported, never its init containers.
Logs: `job.out` followed by `run-<container>.out`. Delete: `scancel JID`, then the working directory goes.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tests.fake_kube_objects import Obj
from tests.fake_kube_scheduler import quantity

FLAG_ALIASES = {"-A": "--account", "-C": "--constraint", "-D": "--chdir", "-G": "--gpus", "-J": "--job-name",
                "-N": "--nodes", "-c": "--cpus-per-task", "-n": "--ntasks", "-o": "--output", "-p": "--partition",
                "-t": "--time", "-w": "--nodelist"}
REASON_TIMEOUT, MESSAGE_TIMEOUT = "SlurmJobTimeout", "SLURM job reached its time limit and was terminated"
REASON_OOM, MESSAGE_OOM = "OOMKilled", "SLURM job was killed due to out-of-memory condition"
_STATE = re.compile(r"(CD|CG|F|OOM|PD|PR|R|ST|S|TO)")
_EXIT = re.compile(r"([0-9]|[1-9][0-9]|1[0-9][0-9]|2[0-4][0-9]|25[0-5])\s")

_FUNCTIONS = '''

####
# Functions
####

# Wait for 60 times 2s if the file exist. The file can be a directory or symlink or anything.
waitFileExist() {
  filePath="$1"
  printf "%s\\n" "$(date -Is --utc) Checking if file exists: ${filePath} ..."
  i=1
  iMax=60
  while test "${i}" -le "${iMax}" ; do
\tif test -e "${filePath}" ; then
\t  printf "%s\\n" "$(date -Is --utc) attempt ${i}/${iMax} file found ${filePath}"
\t  break
\tfi
    printf "%s\\n" "$(date -Is --utc) attempt ${i}/${iMax} file not found ${filePath}"
\ti=$((i + 1))
    sleep 2
  done
}

runInitCtn() {
  ctn="$1"
  shift
  printf "%s\\n" "$(date -Is --utc) Running init container ${ctn}..."
  time ( "$@" ) &> ${workingPath}/init-${ctn}.out
  exitCode="$?"
  printf "%s\\n" "${exitCode}" > ${workingPath}/init-${ctn}.status
  waitFileExist "${workingPath}/init-${ctn}.status"
  if test "${exitCode}" != 0 ; then
    printf "%s\\n" "$(date -Is --utc) InitContainer ${ctn} failed with status ${exitCode}" >&2
    # InitContainers are fail-fast.
    exit "${exitCode}"
  fi
}

runCtn() {
  ctn="$1"
  shift
  # This subshell below is NOT POSIX shell compatible, it needs for example bash.
  time ( "$@" ) &> ${workingPath}/run-${ctn}.out &
  pid="$!"
  printf "%s\\n" "$(date -Is --utc) Running in background ${ctn} pid ${pid}..."
  pidCtns="${pidCtns} ${pid}:${ctn}"
}

waitCtns() {
  # POSIX shell substring test below. Also, container name follows DNS pattern (hyphen alphanumeric, so no ":" inside)
  # pidCtn=12345:container-name-rfc-dns
  # ${pidCtn%:*} => 12345
  # ${pidCtn#*:} => container-name-rfc-dns
  for pidCtn in ${pidCtns} ; do
    pid="${pidCtn%:*}"
    ctn="${pidCtn#*:}"
    printf "%s\\n" "$(date -Is --utc) Waiting for container ${ctn} pid ${pid}..."
    wait "${pid}"
    exitCode="$?"
    printf "%s\\n" "${exitCode}" > "${workingPath}/run-${ctn}.status"
    printf "%s\\n" "$(date -Is --utc) Container ${ctn} pid ${pid} ended with status ${exitCode}."
\twaitFileExist "${workingPath}/run-${ctn}.status"
  done
  # Compatibility with jobScript, read the result of container .status files
  for filestatus in $(ls ${workingPath}/*.status 2>/dev/null) ; do
    exitCode=$(cat "$filestatus")
    test "${highestExitCode}" -lt "${exitCode}" && highestExitCode="${exitCode}"
  done
}

endScript() {
  printf "%s\\n" "$(date -Is --utc) End of script, highest exit code ${highestExitCode}..."
  # Deprecated the sleep in favor of checking the status file with waitFileExist (see above).
  #printf "%s\\n" "$(date -Is --utc) Sleeping 30s in case of..."
  # For some reason, the status files does not have the time for being written in some HPC, because slurm kills the job too soon.
  #sleep 30

  exit "${highestExitCode}"
}

####
# Main
####

highestExitCode=0

\t'''


class PluginError(Exception):
    """What the plugin answers a create request with when it cannot build or submit the job."""


@dataclass
class PluginConfig:
    data_root: Path  # DataRootFolder
    env: dict[str, str]  # the plugin's environment: sbatch's, and through --export=ALL the job's
    singularity_path: str = "singularity"
    singularity_default_options: tuple[str, ...] = ("--nv", "--no-eval", "--containall")
    image_prefix: str = "docker://"
    bash_path: str = "/bin/bash"
    command_prefix: str = ""
    shared_fs: bool = True  # SHARED_FS=true in the plugin's environment
    log: Path | None = None  # the debug log of interLink's API and the plugin (VerboseLogging: true)


@dataclass
class Job:
    jid: str
    workdir: Path
    started: str = ""
    finished: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def quote(value: str) -> str:
    """al.essio.dev/pkg/shellescape Quote: as shlex.quote."""
    return shlex.quote(value)


def _split_words(text: str) -> list[str]:
    """The plugin's splitShellWords: quotes group, backslash escapes outside single quotes."""
    tokens, current, single, double, escaping, started = [], [], False, False, False, False
    for ch in text:
        if escaping:
            current.append(ch)
            escaping, started = False, True
        elif ch == "\\" and not single:
            escaping = started = True
        elif ch == "'" and not double:
            single, started = not single, True
        elif ch == '"' and not single:
            double, started = not double, True
        elif ch.isspace() and not single and not double:
            if started:
                tokens.append("".join(current))
                current, started = [], False
        else:
            current.append(ch)
            started = True
    if escaping:
        current.append("\\")
    if started:
        tokens.append("".join(current))
    return tokens


def split_flags(text: str) -> list[str]:
    """splitSlurmFlags: a flag keeps the words after it that do not start with '-'."""
    tokens, flags, i = _split_words(text), [], 0
    while i < len(tokens):
        token = tokens[i].strip()
        if token and not token.startswith("-"):
            flags.append(token)
        elif token:
            parts = [token]
            while i + 1 < len(tokens) and not tokens[i + 1].startswith("-"):
                parts.append(tokens[i + 1])
                i += 1
            flags.append(" ".join(parts))
        i += 1
    return flags


def flag_key(flag: str) -> str:
    words = _split_words(flag.strip())
    if not words:
        return ""
    key = words[0].split("=", 1)[0]
    return FLAG_ALIASES.get(key, key)


def dedupe_flags(flags: list[str]) -> list[str]:
    """deduplicateSlurmFlags: the last value of a key wins, at the place the key first appeared."""
    last: dict[str, str] = {}
    for flag in (f.strip() for f in flags):
        if flag and (key := flag_key(flag)):
            last[key] = flag
    return list(last.values())


def resource_limits(containers: list[Obj]) -> tuple[int, int, bool, bool]:
    """(cpu, memory bytes, cpu is default, memory is default) as Create.go computes them over all containers."""
    cpu = mem = max_cpu = max_mem = rl_cpu = rl_mem = 0
    default_cpu = default_mem = True
    for c in containers:
        limits = (c.get("resources") or {}).get("limits") or {}
        c_cpu = math.ceil(quantity(limits.get("cpu", 0)))
        c_mem = int(quantity(limits.get("memory", 0)))
        if c_cpu == 0 and default_cpu:
            rl_cpu = 1
        elif c_cpu > rl_cpu and max_cpu < c_cpu:
            cpu = max_cpu = c_cpu
            default_cpu = False
        if c_mem == 0 and default_mem:
            rl_mem = 1024 * 1024
        elif c_mem > rl_mem and max_mem < c_mem:
            mem = max_mem = c_mem
            default_mem = False
        rl_cpu, rl_mem = cpu, mem
    return cpu, mem, default_cpu, default_mem


def sbatch_flags(annotations: dict[str, str], cpu: int, mem: int, default_cpu: bool, default_mem: bool,
                 run_as_user: int | None) -> list[str]:
    flags: list[str] = []
    cpu_from_flags = mem_from_flags = False
    for flag in split_flags(annotations.get("slurm-job.vk.io/flags", "")):
        key = flag_key(flag)
        if key == "--cpus-per-task":
            if not default_cpu:
                continue
            cpu_from_flags = True
        elif key == "--mem":
            if not default_mem:
                continue
            mem_from_flags = True
        flags.append(flag)
    if run_as_user is not None and run_as_user >= 0:
        flags.append(f"--uid={run_as_user}")
    if not default_cpu:
        flags.append(f"--cpus-per-task={cpu}")
    elif not cpu_from_flags:
        flags.append("--cpus-per-task=1")
    if not default_mem:
        flags.append(f"--mem={mem // 1024 // 1024}")
    elif not mem_from_flags:
        flags.append("--mem=1")
    return dedupe_flags(flags)


class SlurmPlugin:
    def __init__(self, config: PluginConfig) -> None:
        self.config = config
        self.jobs: dict[str, Job] = {}  # pod UID → its SLURM job

    def workdir(self, pod: Obj) -> Path:
        return Path(f"{self.config.data_root}/{pod['metadata']['namespace']}-{pod['metadata']['uid']}")

    def _run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=60, env=self.config.env,
                              cwd=self.config.data_root)

    # -- Create ------------------------------------------------------------------------------------------------
    def create(self, pod: Obj, secrets: dict[str, Obj], configmaps: dict[str, Obj]) -> str:
        """Build and submit the pod's job; the job ID, or PluginError with the plugin's message."""
        path = self.workdir(pod)
        try:
            return self._create(pod, path, secrets, configmaps)
        except PluginError:
            _remove_tree(path)
            raise

    def _debug(self, line: str) -> None:
        if self.config.log is not None:
            with open(self.config.log, "a") as f:
                f.write(f"{_now()} DEBUG {line}\n")

    def _create(self, pod: Obj, path: Path, secrets: dict[str, Obj], configmaps: dict[str, Obj]) -> str:
        spec, meta = pod["spec"], pod["metadata"]
        self._debug("interLink API create body: " + json.dumps(
            {"pod": pod, "secrets": list(secrets.values()), "configMaps": list(configmaps.values())}))
        annotations = meta.get("annotations") or {}
        inits = spec.get("initContainers") or []
        containers = inits + (spec.get("containers") or [])
        cpu, mem, default_cpu, default_mem = resource_limits(containers)
        lines: list[str] = []
        volume_prefix: list[str] = []
        for index, c in enumerate(containers):
            mounts = self._mounts(pod, c, path, secrets, configmaps, volume_prefix)
            envs = self._env_file(pod, c, path)
            image = c.get("image", "")
            if not image.startswith("/") and not image.startswith(self.config.image_prefix):
                image = self.config.image_prefix + image
            cmd = [self.config.singularity_path, "exec" if c.get("command") else "run",
                   *self.config.singularity_default_options,
                   annotations.get("slurm-job.vk.io/singularity-mounts", ""),
                   annotations.get("slurm-job.vk.io/singularity-options", ""), *envs, mounts, image]
            line = f"{'runInitCtn' if index < len(inits) else 'runCtn'} {c['name']} {' '.join(cmd)}"
            line += "".join(f" {quote(x)}" for x in (c.get("command") or []) + (c.get("args") or []))
            lines.append(line)
        run_as = (spec.get("securityContext") or {}).get("runAsUser")
        flags = sbatch_flags(annotations, cpu, mem, default_cpu, default_mem, run_as)
        prefix = "".join(volume_prefix)
        if "interlink.eu/pod-ip" in annotations:
            prefix += f"\nexport POD_IP={annotations['interlink.eu/pod-ip']}\n"
        if self.config.command_prefix:
            prefix += "\n" + self.config.command_prefix
        if "interlink.eu/wstunnel-client-commands" in annotations:
            prefix += "\n" + annotations["interlink.eu/wstunnel-client-commands"] + "\n"
        if "slurm-job.vk.io/pre-exec" in annotations:
            prefix += "\n" + annotations["slurm-job.vk.io/pre-exec"]
        job_sh, job_slurm = path / "job.sh", path / "job.slurm"
        script = (f"#!{self.config.bash_path}\n#SBATCH --job-name={meta['uid']}\n#SBATCH --output={path}/job.out"
                  + "".join(f"\n#SBATCH {f}" for f in flags if f) + "\n" + prefix + " " + str(job_sh) + "\n")
        body = (_FUNCTIONS
                + f"\nprintf '%s\\n' \"This pod {meta['name']}/{meta['uid']} has been submitted to SLURM node "
                  "${SLURMD_NODENAME}.\""
                + "\nprintf '%s\\n' \"To get more info, please run: scontrol show job ${SLURM_JOBID}.\""
                + f"\nexport workingPath={path}\n\nexport SANDBOX={path}\n"
                + "".join(f"\n{line}" for line in lines) + "\n\nwaitCtns\nendScript\n\n")
        for file, text in ((job_slurm, script), (job_sh, body)):
            file.write_text(text)
            file.chmod(0o774)
        done = self._run("sh", "-c", f"{shlex.quote('sbatch')} {shlex.quote(str(job_slurm))}")
        if done.stderr:
            raise PluginError(done.stderr.strip())
        jid = re.search(r"Submitted batch job (\d+)", done.stdout)
        if not jid:
            raise PluginError(f"sbatch said: {done.stdout.strip()}")
        for name, text in (("JobID.jid", jid[1]), ("PodNamespace.ns", meta["namespace"]), ("PodUID.uid", meta["uid"])):
            (path / name).write_text(text)
        self.jobs[meta["uid"]] = Job(jid[1], path)
        return jid[1]

    def _env_file(self, pod: Obj, container: Obj, path: Path) -> list[str]:
        if not container.get("env"):
            return []
        env_file = path / f"{container['name']}_envfile.properties"
        with open(env_file, "w") as f:  # os.Create: 0666 less the umask
            for var in container["env"]:
                value = quote(var.get("value", ""))
                f.write(f"{var['name']}={value}\n")
                self._debug(f"---- Written envfile file {env_file} key {var['name']} value {value}")
        return ["--env-file", str(env_file)]

    def _mounts(self, pod: Obj, container: Obj, path: Path, secrets: dict[str, Obj],
                configmaps: dict[str, Obj], prefix: list[str]) -> str:
        """prepareMounts: the container's binds as one string, or "" when a volume type is unknown."""
        path.mkdir(mode=0o777, parents=True, exist_ok=True)  # os.MkdirAll(ModePerm): 0755 with the usual umask
        pod_name = pod["metadata"]["name"]
        volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
        out = ""
        for vm in container.get("volumeMounts") or []:
            volume = volumes.get(vm["name"])
            if volume is None:
                raise PluginError(f"could not find volume {vm['name']} in pod {pod_name}")
            mode = ":ro" if vm.get("readOnly") else ":rw"
            if "configMap" in volume or "secret" in volume:
                kind, source = ("configMaps", volume["configMap"]) if "configMap" in volume else \
                    ("secrets", volume["secret"])
                ref = source.get("name") or source.get("secretName", "")
                obj = (configmaps if kind == "configMaps" else secrets).get(ref)
                if obj is None:
                    raise PluginError(f"could not find {'configMap' if kind == 'configMaps' else 'secret'} {ref} "
                                      f"in container {container['name']} in pod {pod_name}")
                directory = path / kind / vm["name"]
                _remove_tree(directory)
                if self.config.shared_fs:
                    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
                for key, value in (obj.get("data") or {}).items():
                    data = value.encode() if kind == "configMaps" else _b64(value)
                    target = directory / key
                    if self.config.shared_fs:
                        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, source.get("defaultMode", 0o644))
                        with os.fdopen(fd, "wb") as f:
                            f.write(data)
                        self._debug(f"--- Written {kind} file {target}")
                    else:
                        marker = str(target).encode().hex()
                        self.config.env[f"{container['name']}_{kind}_{marker}"] = data.decode(errors="replace")
                        prefix.append(f'\nmkdir -p "{directory}" && touch "{target}"'
                                      f"\nbase64 -d <<'VKDATA_{marker}' > \"{target}\"\n"
                                      f"{base64.b64encode(data).decode()}\nVKDATA_{marker}")
                    inside = vm["mountPath"] if vm.get("subPath") else f"{vm['mountPath'].rstrip('/')}/{key}"
                    out += f" --bind {target}:{inside}{mode} "
            elif "emptyDir" in volume:
                directory = path / "emptyDirs" / volume["name"]
                directory.mkdir(mode=0o755, parents=True, exist_ok=True)
                out += f" --bind {directory}:{vm['mountPath']}{mode}  "
            elif "hostPath" in volume:
                host, inside, kind = volume["hostPath"]["path"], vm["mountPath"], volume["hostPath"].get("type", "")
                if not host or not inside:
                    raise PluginError(f"hostPath or containerPath is empty for volume {volume['name']} in pod "
                                      f"{pod_name}")
                if kind == "Directory":
                    if not os.path.exists(host):
                        raise PluginError(f"hostPath directory {host} does not exist for volume {volume['name']} "
                                          f"in pod {pod_name}")
                elif kind == "DirectoryOrCreate":
                    os.makedirs(host, exist_ok=True)
                else:
                    raise PluginError(f"unsupported hostPath type {kind} for volume {volume['name']} in pod "
                                      f"{pod_name}")
                out += f" --bind {host}:{inside}" + (":ro" if vm.get("readOnly") else "")
            elif "projected" in volume:
                continue  # the VK sends none with DisableProjectedVolumes, as interLink sites configure it
            else:  # "Silently ignoring unknown volume type of volume: ..." — and every bind of this container
                return ""
        return out

    # -- Status ------------------------------------------------------------------------------------------------
    def status(self, pod: Obj) -> list[Obj] | None:
        """The plugin's container statuses for the pod's containers, or None when it knows no job for it."""
        job = self.jobs.get(pod["metadata"]["uid"])
        if job is None:
            return None
        done = self._run("squeue", "--noheader", "-a", "--states=all", "-O", "exit_code,StateCompact", "-j", job.jid)
        now = _now()
        names = [c["name"] for c in pod["spec"].get("containers") or []]
        if done.stderr:  # squeue failed: the containers' status files, else no answer ("unable to retrieve ...")
            codes = [self._status_file(job, n) for n in names]
            return None if None in codes else [_terminated(n, job, c) for n, c in zip(names, codes)]
        out = done.stdout.replace("\n", "")
        state = (_STATE.search(out) or [""])[0]
        exit_match = _EXIT.search(out)
        exit_code = exit_match[1] if exit_match else "0"
        if state in ("R", "CG") and not job.started:
            job.started = now
            (job.workdir / "StartedAt.time").write_text(now)
        if state in ("PD", "S"):
            return [{"name": n, "state": {"waiting": {}}, "ready": False} for n in names]
        if state in ("R", "CG"):
            return [{"name": n, "state": {"running": {"startedAt": job.started}}, "ready": True} for n in names]
        if not job.finished:
            job.finished = now
            if job.workdir.is_dir():
                (job.workdir / "FinishedAt.time").write_text(now)
        reason = {"TO": (REASON_TIMEOUT, MESSAGE_TIMEOUT), "OOM": (REASON_OOM, MESSAGE_OOM)}.get(state, ("", ""))
        return [_terminated(n, job, self._exit_code(job, n, exit_code), *reason) for n in names]

    @staticmethod
    def _status_file(job: Job, name: str) -> int | None:
        f = job.workdir / f"run-{name}.status"
        return int(f.read_text().strip() or 0) if f.is_file() else None

    def _exit_code(self, job: Job, name: str, slurm_exit: str) -> int:
        for kind in ("run", "init"):
            f = job.workdir / f"{kind}-{name}.status"
            if f.is_file():
                return int(f.read_text().strip() or 0)
        if job.workdir.is_dir():  # the job ended before the container could write its status (e.g. cancelled)
            (job.workdir / f"init-{name}.status").write_text(slurm_exit)
        return int(slurm_exit)

    # -- Logs, Delete ------------------------------------------------------------------------------------------
    def logs(self, pod: Obj, container: str, tail: int | None) -> str:
        path = self.workdir(pod)
        text = "".join(_read(path / f) for f in ("job.out", f"run-{container}.out"))
        if tail:
            lines = text.split("\n")
            text = "".join(line + "\n" for line in (lines if tail > len(lines) else lines[len(lines) - tail - 1:]))
        return text

    def delete(self, pod: Obj) -> str | None:
        """scancel the pod's job and remove its working directory; the job ID it had, if any."""
        job = self.jobs.pop(pod["metadata"]["uid"], None)
        if job is not None:
            self._run("scancel", job.jid)
        _remove_tree(self.workdir(pod))
        return job.jid if job else None


def _terminated(name: str, job: Job, exit_code: int, reason: str = "", message: str = "") -> Obj:
    state: Obj = {"exitCode": exit_code, "startedAt": job.started or None, "finishedAt": job.finished or None}
    if reason:
        state.update(reason=reason, message=message)
    return {"name": name, "state": {"terminated": state}, "ready": False}


def _b64(value: str) -> bytes:
    return base64.b64decode(value)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

