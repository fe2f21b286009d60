"""`make vega-box`: the Vega flow of hpcray/profiles/vega.yaml on the site in a box (tests/fake_site_box.py), with
hpcray driven only through its CLI, as a user drives it.

It starts the box (fake API server + fake KubeRay operator + an interLink virtual node over a real single-node
SLURM + an MLflow server with basic auth), writes a profile of the box in vega.yaml's shape (`box_profile`), then:
`hpcray pull --slurm` (a real SLURM job runs the box's singularity, which makes the SIF), `hpcray up` (head and
worker become SLURM jobs running real Ray), `hpcray submit` of the shipped training and HPO examples (MLflow
credentials through the cluster), `hpcray down`. Before `down` it lists every place on the HPC side where the MLflow
password landed (`exposure`): files under the plugin's job directories, its debug log, singularity's log, SLURM's
state directory (batch scripts, job environments), `scontrol show job` and `scontrol write batch_script` of every
job, and the environments of running processes, each with its mode. After `down` it checks that no SLURM job, pod,
Helm release, RayCluster, Secret or process of the run is left, then stops the box's servers by PID.

Exit 0 only when both jobs SUCCEEDED and nothing is left. `--deliver` and `--no-shared-fs` measure the other
credential deliveries (docs/from-the-tutorial.md compares them); `--up-only` skips the jobs (credentials land at
`up`); `--json FILE` writes the summary.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tests.fake_kube_objects import PODS, SECRETS
from tests.fake_site_box import QUIET, SYSTEM_PATH, BoxInfo, SiteBox

REPO = Path(__file__).resolve().parent.parent
NAME = "vega-box"
JOBS = ("training", "hpo")
PHASE_TIMEOUT_S = 900


def box_profile(info: BoxInfo, image_dir: Path, deliver: str) -> str:
    """hpcray/profiles/vega.yaml's shape for the box: its virtual node, a SIF that `hpcray pull --slurm` makes, the
    VPN bootstrap as pre-exec with pod_vpn, one head and one worker sized for a 2-core machine without GPUs (the
    box's SLURM has none), the box's MLflow with credentials from the environment, and the shipped examples."""
    return f"""\
# The site in a box's Vega (written by tests/vega_box.py): hpcray/profiles/vega.yaml's shape, sized for the box.
name: {NAME}
backend: kuberay
kubernetes:
  kubeconfig: {info.kubeconfig}
  namespace: {info.namespace}
chart:
  version: 1.2.2
image:
  dir: {image_dir}
  name: {info.sif_name}
  tag: {info.sif_tag}
  source: docker://ghcr.io/intertwin-eu/hython-itwinai-plugin:latest
head:
  cpu: "1"
  memory: 2G
  gpus: 0                   # Vega: 1, through --gres (the box's SLURM GPUs are counted, not real)
  env: &env
    HYDRA_FULL_ERROR: "1"
    SLURM_NNODES: "1"
workers:
  cpu:
    replicas: 1
    cpu: "1"
    memory: 2G
    gpus: 0
    env: *env
interlink:
  enabled: true
  node: {info.node}
  gpu_mode: gres
  slurm:
    time: "30"
  singularity:
    options: ["--no-home", "--compat", "--no-mount /exa5"]   # Vega's; its /ceph bind has no counterpart here
  pod_vpn: true
  vpn_bootstrap: {info.vpn_bootstrap}
  nccl_interface: eth0      # the box's VPN interface (Vega: br0)
  tolerations:
    - key: node.kubernetes.io/unreachable
      operator: Exists
      effect: NoExecute
      tolerationSeconds: 300
mlflow:
  tracking_uri: {info.mlflow_url}
  experiment: vega-box
  credentials: env
  deliver: {deliver}
timeout: 15m
jobs:
  training:
    entrypoint: python train.py --epochs 3 --samples 2000
    working_dir: ${{HPCRAY_EXAMPLES}}
  hpo:
    entrypoint: python hpo.py --trials 2 --epochs 2 --samples 1000
    working_dir: ${{HPCRAY_EXAMPLES}}
"""


@dataclass
class Landing:
    """One place on the HPC side that holds the password."""
    where: str
    form: str  # "plaintext" or "base64"
    mode: str = ""  # the file's mode, or who can read it

    def line(self) -> str:
        return f"{self.where}  [{self.form}{', mode ' + self.mode if self.mode else ''}]"


@dataclass
class Summary:
    deliver: str
    shared_fs: bool
    phases: dict[str, float] = field(default_factory=dict)
    jobs: dict[str, str] = field(default_factory=dict)
    slurm_jobs: dict[str, str] = field(default_factory=dict)  # id → "state (what)"
    landings: list[Landing] = field(default_factory=list)
    token_landings: list[Landing] = field(default_factory=list)  # the cluster's Ray token (auth: token)
    leftovers: dict[str, list[str]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures and not any(self.leftovers.values())


# -- the password's landings ---------------------------------------------------------------------------------
def _needles(password: str) -> dict[str, bytes]:
    return {"plaintext": password.encode(), "base64": base64.b64encode(password.encode())}


def _forms(data: bytes, needles: dict[str, bytes]) -> list[str]:
    return [form for form, needle in needles.items() if needle in data]


def scan_files(roots: list[Path], password: str) -> list[Landing]:
    found = []
    needles = _needles(password)
    for root in roots:
        paths = [root] if root.is_file() else [Path(d) / n for d, _, names in os.walk(root) for n in names]
        for path in paths:
            try:
                st = path.lstat()
                data = path.read_bytes() if stat.S_ISREG(st.st_mode) else b""
            except OSError:
                continue
            found += [Landing(str(path), form, f"{stat.S_IMODE(st.st_mode):04o}") for form in _forms(data, needles)]
    return found


def scan_slurm(job_ids: list[str], password: str, env: dict[str, str]) -> list[Landing]:
    found = []
    needles = _needles(password)
    for jid in job_ids:
        for what, argv in ((f"`scontrol show job -dd {jid}`", ["scontrol", "show", "job", "-dd", jid]),
                           (f"`scontrol write batch_script {jid} -`", ["scontrol", "write", "batch_script", jid, "-"])):
            out = subprocess.run(argv, capture_output=True, env=env, timeout=30).stdout
            found += [Landing(what, form, "the job's owner and root") for form in _forms(out, needles)]
    return found


def scan_processes(password: str, servers: set[int]) -> list[Landing]:
    """Processes whose environment holds the password (/proc/PID/environ: readable by their user and root), but the
    box's own servers' (process groups `servers`: the MLflow server knows its admin password)."""
    needles = _needles(password)
    found: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if os.getpgid(int(entry.name)) in servers:
                continue
            environ = (entry / "environ").read_bytes()
            argv0 = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except (OSError, ProcessLookupError):
            continue
        for form in _forms(environ, needles):
            key = f"{Path(argv0).name} ({form})"
            found[key] = found.get(key, 0) + 1
    return [Landing(f"environment of {n} process(es): {k.split(' (')[0]}", k.split("(")[1].rstrip(")"),
                    "0400 /proc/PID/environ: the process's user and root") for k, n in sorted(found.items())]


def _processes_holding(password: str, servers: set[int]) -> list[str]:
    """`PID command` of each process but the box's servers whose environment holds the password."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if os.getpgid(int(entry.name)) in servers or password.encode() not in (entry / "environ").read_bytes():
                continue
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            out.append(f"{entry.name} {command[:120]}")
        except (OSError, ProcessLookupError):
            continue
    return out


def _ray_token(box: SiteBox) -> str | None:
    """The cluster's Ray token, from the Secret `up` made (None without token authentication)."""
    assert box.api is not None and box.info is not None
    secret = box.api.get("secrets", f"{NAME}-hpcray-ray-token", box.info.namespace)
    return base64.b64decode(secret["data"]["token"]).decode() if secret else None


def _servers(box: SiteBox) -> set[int]:
    return {box.mlflow_pid} if box.mlflow_pid is not None else set()


# -- leftovers ------------------------------------------------------------------------------------------------
def leftovers(box: SiteBox, password: str, env: dict[str, str]) -> dict[str, list[str]]:
    assert box.api is not None and box.info is not None and box.plugin is not None
    api, ns = box.api, box.info.namespace
    queue = subprocess.run(["squeue", "-h", "-o", "%i %T %j"], capture_output=True, text=True, env=env,
                           timeout=30).stdout.split("\n")
    pods = api.call(lambda: [p["metadata"]["name"] for p in api.store.list(PODS, ns)])
    secrets = api.call(lambda: [s for s in api.store.list(SECRETS, ns)])
    rayclusters = api.call(lambda: [r["metadata"]["name"] for res in api.store.resources()
                                    if res.plural == "rayclusters" for r in api.store.list(res, ns)])
    return {
        "SLURM jobs": [line for line in queue if line.strip()],
        "pods": pods,
        "Helm releases": [s["metadata"]["name"] for s in secrets if s.get("type") == "helm.sh/release.v1"],
        "Secrets": [s["metadata"]["name"] for s in secrets if s.get("type") != "helm.sh/release.v1"],
        "RayClusters": rayclusters,
        "job directories": [p.name for p in Path(box.info.data_root).iterdir()],
        "processes": _processes_holding(password, _servers(box)),
    }


# -- the run ---------------------------------------------------------------------------------------------------
def _cli(env: dict[str, str], *args: str, timeout: float = PHASE_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "hpcray.cli", *args]
    print("$ hpcray " + " ".join(args), file=sys.stderr, flush=True)
    done = subprocess.run(argv, env=env, text=True, capture_output=True, timeout=timeout)
    sys.stderr.write(done.stderr[-3000:])
    sys.stderr.write(done.stdout[-2000:])
    return done


def _phase(summary: Summary, name: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    start = time.monotonic()
    done = _cli(env, *args)
    summary.phases[name] = round(time.monotonic() - start, 1)
    if done.returncode != 0:
        summary.failures.append(f"`hpcray {' '.join(args)}` exited {done.returncode}")
    return done


def _slurm_jobs(box: SiteBox, pull_job: str | None) -> dict[str, str]:
    """The SLURM jobs of the run: the pull's, and the pods' the plugin knows (it forgets a pod's at delete)."""
    assert box.plugin is not None and box.api is not None
    names = box.api.call(lambda: {p["metadata"]["uid"]: p["metadata"]["name"] for p in box.api.store.list(PODS)})
    return ({pull_job: "hpcray pull"} if pull_job else {}) | {
        job.jid: f"pod {names.get(uid, uid)}" for uid, job in box.plugin.jobs.items()}


def _final_states(jobs: dict[str, str], env: dict[str, str]) -> dict[str, str]:
    out = {}
    for jid, what in jobs.items():
        line = subprocess.run(["scontrol", "show", "job", "-o", jid], capture_output=True, text=True, env=env,
                              timeout=30).stdout
        state = next((w.split("=", 1)[1] for w in line.split() if w.startswith("JobState=")), "unknown")
        out[jid] = f"{state} ({what})"
    return out


def run(work: Path, deliver: str, shared_fs: bool, up_only: bool) -> Summary:
    summary = Summary(deliver, shared_fs)
    with SiteBox(root=work / "box", shared_fs=shared_fs) as box:
        info = box.info
        assert info is not None and box.slurm is not None and box.plugin is not None
        user, password = info.mlflow_admin
        image_dir = work / "sif"
        profile = work / f"{NAME}.yaml"
        profile.write_text(box_profile(info, image_dir, deliver))
        home = work / "home"
        home.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "KUBECONFIG"))}
        env.update(QUIET, HOME=str(home), PATH=f"{Path(sys.executable).parent}:{box.root / 'bin'}:{SYSTEM_PATH}",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                   MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password, **box.slurm.env)
        charts = os.environ.get("HPCRAY_CHARTS_DIR") or str(REPO.parent / "shared" / "charts")
        if Path(charts).is_dir():
            env["HPCRAY_CHARTS_DIR"] = charts
        pull_job, jobs, token = None, {}, None
        try:
            pulled = _phase(summary, "pull", env, "pull", "-p", str(profile), "--slurm", "--json")
            if pulled.returncode == 0:
                pull_job = json.loads(pulled.stdout).get("job_id")
                if _phase(summary, "up", env, "up", "-p", str(profile)).returncode == 0 and not up_only:
                    for job in JOBS:
                        done = _phase(summary, job, env, "submit", "-p", str(profile), job, "--json")
                        try:
                            summary.jobs[job] = json.loads(done.stdout)["status"]
                        except (KeyError, ValueError):
                            summary.jobs[job] = f"unknown (exit {done.returncode})"
                        if summary.jobs[job] != "SUCCEEDED":
                            summary.failures.append(f"job {job} is {summary.jobs[job]}")
            jobs = _slurm_jobs(box, pull_job)
            hpc_side = [Path(info.data_root), Path(info.plugin_log), Path(info.singularity_log), box.slurm.root,
                        image_dir]
            summary.landings = (scan_files(hpc_side, password) + scan_slurm(list(jobs), password, env)
                                + scan_processes(password, _servers(box)))
            token = _ray_token(box)
            if token:
                summary.token_landings = (scan_files(hpc_side, token) + scan_slurm(list(jobs), token, env)
                                          + scan_processes(token, _servers(box)))
        finally:
            jobs = jobs or _slurm_jobs(box, pull_job)
            _phase(summary, "down", env, "down", "-p", str(profile))
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                summary.leftovers = leftovers(box, password, env)
                if not any(summary.leftovers.values()):
                    break
                time.sleep(2)
            summary.slurm_jobs = _final_states(jobs or _slurm_jobs(box, pull_job), env)
        user_side = scan_files([home, work / f"{NAME}.yaml"], password)
        if token:
            user_side += scan_files([home, work / f"{NAME}.yaml"], token)
        if user_side:
            summary.failures.append("the password or the Ray token landed on the user's side: "
                                    + ", ".join(lnd.line() for lnd in user_side))
    return summary


def report(s: Summary) -> str:
    lines = [f"vega-box: mlflow.deliver {s.deliver}, plugin SHARED_FS={'true' if s.shared_fs else 'false'}",
             "phases: " + ", ".join(f"{k} {v:.0f} s" for k, v in s.phases.items())
             + f" (total {sum(s.phases.values()):.0f} s)",
             "jobs: " + (", ".join(f"{k} {v}" for k, v in s.jobs.items()) or "none run"),
             "SLURM jobs: " + ", ".join(f"{k} {v}" for k, v in s.slurm_jobs.items()),
             f"the MLflow password on the HPC side ({len(s.landings)} places):"]
    lines += [f"  {lnd.line()}" for lnd in s.landings] or ["  nowhere"]
    lines.append(f"the Ray token on the HPC side ({len(s.token_landings)} places):")
    lines += [f"  {lnd.line()}" for lnd in s.token_landings] or ["  nowhere"]
    lines.append("left after down: " + "; ".join(
        f"{k}: {', '.join(v) if v else 'none'}" for k, v in s.leftovers.items()))
    lines += [f"FAILED: {f}" for f in s.failures]
    lines.append("vega-box: OK" if s.ok else "vega-box: FAILED")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deliver", default="secret", choices=["secret", "secret_file", "secret_env"],
                        help="the profile's mlflow.deliver (default: hpcray's default)")
    parser.add_argument("--no-shared-fs", action="store_true", help="run the plugin with SHARED_FS=false")
    parser.add_argument("--up-only", action="store_true", help="pull and up, no jobs (credentials land at up)")
    parser.add_argument("--json", type=Path, help="write the summary here")
    args = parser.parse_args(argv)
    os.environ.update(QUIET)
    work = Path(tempfile.mkdtemp(prefix="hpcray-vega-box-", dir="/var/tmp"))
    work.chmod(0o755)
    try:
        summary = run(work, args.deliver, not args.no_shared_fs, args.up_only)
    finally:
        subprocess.run(["rm", "-rf", "--", str(work)], check=False)
    print(report(summary))
    if args.json:
        args.json.write_text(json.dumps({**asdict(summary), "ok": summary.ok}, indent=2))
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
