"""Command line: parse, print, exit. Work happens in the modules below; heavy libraries load only when used.

Exit codes (hpcray.errors): 0 ok, 1 job failed, 2 bad input / unmet precondition, 3 job stopped, 4 timed out,
70 internal error (a bug: rerun with --debug), 128+N interrupted by signal N.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any, Iterator, NoReturn

import click

from hpcray import __version__

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}

def _complete_profiles(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    from hpcray.profile import list_profiles

    return sorted({f.name for f in list_profiles() if f.name.startswith(incomplete)})


profile_option = click.option(
    "--profile", "-p", "profile_ref", metavar="PROFILE", envvar="HPCRAY_PROFILE", default="local", show_default=True,
    shell_complete=_complete_profiles,
    help="Profile name (`hpcray profile --list`) or path to a profile YAML ($HPCRAY_PROFILE).")
json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")


def echo_err(message: str) -> None:
    click.echo(message, err=True)


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def fail(exc: BaseException, debug: bool) -> NoReturn:
    from hpcray.errors import HpcrayError

    if debug:
        import traceback

        traceback.print_exception(exc)
    if not isinstance(exc, HpcrayError):
        echo_err(f"hpcray: internal error: {type(exc).__name__}: {exc} (rerun with --debug and report it)")
        sys.exit(70)
    message = " ".join(str(exc).split()) if not debug else str(exc)
    echo_err(f"hpcray: error: {message}")
    sys.exit(exc.exit_code)


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="hpcray")
@click.option("--debug", is_flag=True, envvar="HPCRAY_DEBUG", help="Show tracebacks and helm/kubectl detail.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Run Ray training and HPO jobs on HPC GPUs: a KubeRay cluster offloaded to SLURM through interLink,
    or a local Ray head (the embedded default).

    \b
    Typical flow:  hpcray up -p vega  →  hpcray submit -p vega training  →  hpcray down -p vega
    All at once:   hpcray run -p local training hpo
    """
    ctx.obj = {"debug": debug}


# ---------------------------------------------------------------------------------------------------------------
# Profiles and values
# ---------------------------------------------------------------------------------------------------------------


@cli.command()
@profile_option
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True), help="Write the values to FILE.")
@click.option("--manifest", is_flag=True, help="Print the RayCluster manifest the real `helm template` makes.")
@click.option("--no-check", is_flag=True, help="Skip the chart render and CRD schema check.")
def render(profile_ref: str, output: str | None, manifest: bool, no_check: bool) -> None:
    """Render the profile's Helm values (and check them against KubeRay's CRD)."""
    from hpcray.profile import load_profile
    from hpcray.render import check_release, dump_values, render_values

    p = load_profile(profile_ref)
    values = render_values(p)
    text = dump_values(values)
    if manifest or not no_check:
        result = check_release(p, text, required=manifest, warn=echo_err)
        if manifest:
            text = result.manifest if result else text
    if output:
        try:
            with open(output, "w") as fh:
                fh.write(text)
        except OSError as exc:
            from hpcray.errors import HpcrayError

            raise HpcrayError(f"-o {output}: cannot write it ({exc.strerror}); give a file in an existing, "
                              "writable directory") from None
        echo_err(f"wrote {output}")
    else:
        click.echo(text, nl=False)


@cli.command("profile")
@profile_option
@click.option("--schema", is_flag=True, help="Print every profile key as Markdown (docs/profile.md).")
@click.option("--list", "list_all", is_flag=True, help="List the profiles found by name, where each comes from.")
@json_option
def profile_cmd(profile_ref: str, schema: bool, list_all: bool, as_json: bool) -> None:
    """Validate a profile and show it, list the profiles, or print the profile schema."""
    from hpcray.profile import load_profile

    if list_all:
        _list_profiles(as_json)
        return
    if schema:
        from hpcray.docs import profile_markdown

        click.echo(profile_markdown(), nl=False)
        return
    p = load_profile(profile_ref)
    from dataclasses import asdict

    data = asdict(p)
    data["source"] = str(p.source)
    if as_json:
        print_json(data)
    else:
        import yaml

        click.echo(f"# {p.source}: valid")
        click.echo(yaml.safe_dump(data, sort_keys=False), nl=False)


def _list_profiles(as_json: bool) -> None:
    """Each profile a name finds, in lookup order, marking those an earlier one of the same name shadows."""
    from hpcray.profile import list_profiles, profile_dirs

    dirs, found = profile_dirs(), list_profiles()
    if as_json:
        print_json({"dirs": [{"path": str(d.path), "from": d.origin} for d in dirs],
                    "profiles": [{"name": f.name, "path": str(f.path), "from": f.origin,
                                  "shadowed_by": str(f.shadowed_by) if f.shadowed_by else None} for f in found]})
        return
    width = max([4, *(len(f.name) for f in found)])
    click.echo(f"{'NAME':<{width}}  {'FROM':<8}  PATH")
    for f in found:
        shadow = f"  (shadowed by {f.shadowed_by})" if f.shadowed_by else ""
        click.echo(f"{f.name:<{width}}  {f.origin:<8}  {f.path}{shadow}")
    click.echo("# looked up in this order: " + ", ".join(f"{d.path} ({d.origin})" for d in dirs))


@cli.command("init")
@click.argument("name")
@click.option("--from", "source", default="local", show_default=True, metavar="PROFILE",
              shell_complete=_complete_profiles, help="The profile to start from: vega, local, another name or a path.")
def init_cmd(name: str, source: str) -> None:
    """Write NAME.yaml, a commented copy of another profile, to edit into ~/.config/hpcray/profiles/
    ($XDG_CONFIG_HOME/hpcray/profiles/); never overwrites. `--profile NAME` then finds it."""
    from hpcray.profile import init_profile, profile_ref

    made = init_profile(name, source)
    for note in made.notes:
        echo_err(f"note: {note}")
    click.echo(f"wrote {made.path} (from {made.source}); edit it, then: hpcray render -p {profile_ref(made.path)}")


@cli.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script: `eval "$(hpcray completion bash)"` in ~/.bashrc."""
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    assert cls is not None
    click.echo(cls(cli, {}, "hpcray", "_HPCRAY_COMPLETE").source())


# ---------------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------------


@cli.command()
@profile_option
@click.option("--force", is_flag=True, help="Pull even when the SIF file is already there.")
@click.option("--slurm", is_flag=True, help="Pull in a SLURM batch job (sbatch) instead of on this machine.")
@click.option("--print", "print_only", is_flag=True, help="Print the SLURM batch script; submit nothing (implies --slurm).")
@click.option("--timeout", default="2h", show_default=True, metavar="DURATION",
              help="With --slurm: how long to wait for the job (90s, 30m, 2h); it keeps running after.")
@json_option
def pull(profile_ref: str, force: bool, slurm: bool, print_only: bool, timeout: str, as_json: bool) -> None:
    """Pull the profile's image.source into the SIF file its pods run: `<image.dir>/<name>:<tag>`.

    Progress goes to stderr, the SIF path to stdout.
    """
    from dataclasses import asdict

    from hpcray import images
    from hpcray.profile import load_profile, parse_duration

    try:
        wait_s = parse_duration(timeout)
    except ValueError:
        raise click.BadParameter(f"{timeout!r} is not a duration; write e.g. 90s, 30m or 2h",
                                 param_hint="--timeout") from None
    p = load_profile(profile_ref)
    if print_only:
        click.echo(images.render_pull_script(p, force=force), nl=False)
        return
    if slurm:
        result = images.pull_slurm(p, force=force, timeout=wait_s, progress=echo_err)
    else:
        result = images.pull(p, force=force, progress=echo_err)
    if not result.pulled:
        echo_err(f"{result.path} is present; not pulled again (--force does)")
    if as_json:
        print_json(asdict(result))
    else:
        click.echo(result.path)


# ---------------------------------------------------------------------------------------------------------------
# Jobs (hpcray.jobs): Ray's vocabulary — submit, logs, stop, list, job-status — against any Ray cluster
# ---------------------------------------------------------------------------------------------------------------

address_option = click.option(
    "--address", metavar="URL", envvar="RAY_API_SERVER_ADDRESS",
    help="Ray Jobs API (dashboard) address of any Ray cluster: local head, port-forward, ingress, e.g. "
         "http://127.0.0.1:8265 ($RAY_API_SERVER_ADDRESS). Default: the profile's cluster.")


@contextlib.contextmanager
def _jobs_api(profile_ref: str, address: str | None, profile: Any = None) -> Iterator[Any]:
    """The Jobs API at --address, else of the profile's cluster (loaded from profile_ref unless given), through a
    port-forward of this command's own where the cluster needs one."""
    from hpcray.jobs import JobsApi

    if address:
        yield JobsApi(address)
        return
    from hpcray.backends import backend_for
    from hpcray.profile import load_profile

    with backend_for(profile or load_profile(profile_ref)).reach(echo_err) as reached:
        yield JobsApi(reached)


def _env_pairs(pairs: tuple[str, ...]) -> dict[str, str]:
    from hpcray.jobs import check_env_names

    env: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{pair!r} is not K=V", param_hint="--env")
        env[name] = value
    check_env_names(env, "--env")
    return env


class _EntrypointCommand(click.Command):
    """Remembers whether the arguments came after `--`: `submit JOB` names a profile job, `submit -- CMD` runs CMD."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["hpcray.entrypoint"] = "--" in args
        return super().parse_args(ctx, args)


def _credentials_for(p: Any, dry_run: bool) -> Any:
    """The profile's MLflow credentials; a dry run does without them, saying so."""
    from hpcray.errors import CredentialsError
    from hpcray.tracking import load_credentials

    try:
        return load_credentials(p)
    except CredentialsError as exc:
        if not dry_run:
            raise
        echo_err(f"hpcray: warning: {exc} (the real command needs them)")
        return None


def _print_submission(sub: Any, name: str, as_json: bool) -> None:
    from hpcray.jobs import redact

    payload = redact(sub.payload())
    if as_json:
        print_json({"job": name, **payload})
        return
    click.echo(f"# would submit job {name}: {payload['entrypoint']}")
    click.echo(json.dumps({k: v for k, v in payload.items() if k != "entrypoint"}, indent=2))


def _follow_or_interrupt(api: Any, job_id: str, on_interrupt: str | None, out: Any, intro: str = "") -> str:
    """Follow the job to its end and say how it ended; on Ctrl-C stop it or detach (as on_interrupt says), exit 130."""
    from hpcray import jobs

    try:
        if intro:
            echo_err(intro)
        info = jobs.follow(api, job_id, out)
        status = str(info["status"])
        if status == "FAILED" and info.get("message"):
            echo_err(jobs.failure_summary(str(info["message"])))
        echo_err(f"job {job_id} {status}")
        return status
    except KeyboardInterrupt:
        if on_interrupt == "stop":
            echo_err(f"hpcray: interrupted; stopping job {job_id} …")
            echo_err(f"hpcray: job {job_id} {jobs.stop(api, job_id)}")
        else:
            echo_err(f"hpcray: interrupted; job {job_id} keeps running: hpcray logs -f {job_id}")
        sys.exit(130)


@cli.command(cls=_EntrypointCommand)
@profile_option
@address_option
@click.argument("job_args", metavar="[JOB | -- ENTRYPOINT...]", nargs=-1)
@click.option("--working-dir", metavar="DIR", help="Directory uploaded with the job (replaces the job's).")
@click.option("--requirements", metavar="FILE", help="pip requirements file installed for the job.")
@click.option("--pip", multiple=True, metavar="PKG", help="pip package installed for the job (repeatable).")
@click.option("--wheel", "wheels", multiple=True, metavar="PATH",
              help="A .whl file, or a project directory built with `pip wheel`, shipped in the working dir and "
                   "installed for the job (repeatable).")
@click.option("--env", "env_pairs", multiple=True, metavar="K=V",
              help="Job environment variable (repeatable); names with PASSWORD, TOKEN or SECRET are refused.")
@click.option("--runtime-env-json", metavar="JSON", help="Extra runtime_env fields, as for `ray job submit`.")
@click.option("--num-cpus", "--entrypoint-num-cpus", "num_cpus", type=float, help="CPUs reserved for the entrypoint.")
@click.option("--num-gpus", "--entrypoint-num-gpus", "num_gpus", type=float, help="GPUs reserved for the entrypoint.")
@click.option("--submission-id", metavar="ID", help="The job's id (default: Ray makes one).")
@click.option("--no-wait", is_flag=True, help="Print the submission id and return; don't follow the job.")
@click.option("--on-interrupt", type=click.Choice(["stop", "detach"]), default="stop", show_default=True,
              help="What Ctrl-C while following does: stop the job, or leave it running; then exit 130.")
@click.option("--dry-run", is_flag=True, help="Print the job that would be submitted (secrets redacted); contact "
                                              "nothing.")
@json_option
@click.pass_context
def submit(ctx: click.Context, profile_ref: str, address: str | None, job_args: tuple[str, ...],
           working_dir: str | None, requirements: str | None, pip: tuple[str, ...], wheels: tuple[str, ...],
           env_pairs: tuple[str, ...], runtime_env_json: str | None, num_cpus: float | None, num_gpus: float | None,
           submission_id: str | None, no_wait: bool, on_interrupt: str, dry_run: bool, as_json: bool) -> None:
    """Submit a job to the profile's Ray cluster (or --address) and follow its logs until it ends.

    \b
    JOB is a job of the profile (`hpcray submit -p vega training`); after `--` comes any entrypoint
    (`hpcray submit -p local -- python train.py --epochs 2`): one argument is a shell command as written,
    several are quoted as an argv. MLflow credentials reach the job through the cluster's environment, never
    its runtime_env, entrypoint or argv; the MLflow server, the credentials and write access to the experiment
    are checked before anything is queued.

    \b
    Exit code mirrors the job: 0 SUCCEEDED, 1 FAILED, 3 STOPPED; 130 on Ctrl-C (which stops the job unless
    --on-interrupt detach); 2 when nothing was submitted.
    """
    from dataclasses import replace

    from hpcray import jobs
    from hpcray.profile import load_profile
    from hpcray.tracking import preflight

    env = _env_pairs(env_pairs)
    extra_env: dict[str, Any] = {}
    if runtime_env_json:
        try:
            extra_env = dict(json.loads(runtime_env_json))
        except (ValueError, TypeError):
            raise click.BadParameter("not a JSON object", param_hint="--runtime-env-json") from None
    p = load_profile(profile_ref)
    if ctx.meta["hpcray.entrypoint"]:
        if not job_args:
            raise click.UsageError("give the entrypoint after `--`, e.g. -- python train.py")
        name, argv = None, list(job_args)
    elif len(job_args) == 1:
        name, argv = job_args[0], []
    else:
        raise click.UsageError("give one JOB of the profile, or an entrypoint after `--` "
                               "(hpcray submit -p PROFILE -- python train.py)")
    spec = jobs.with_overrides(jobs.job_spec(p, name, argv), working_dir=working_dir, requirements=requirements,
                               pip=pip, wheels=wheels, env=env, num_cpus=num_cpus, num_gpus=num_gpus)
    if extra_env:
        spec = replace(spec, runtime_env={**spec.runtime_env, **extra_env})
    credentials = _credentials_for(p, dry_run)
    sub = jobs.build_submission(p, spec, name=name, credentials=credentials, submission_id=submission_id,
                                warn=echo_err)
    if dry_run:
        _print_submission(sub, name or "(entrypoint)", as_json)
        return
    preflight(p, credentials)
    with _jobs_api(profile_ref, address, p) as api:
        job_id = jobs.submit(api, sub, image_ray_version=p.image.ray_version, progress=echo_err, warn=echo_err)
        if no_wait:
            if as_json:
                print_json({"submission_id": job_id, "address": api.address})
            else:
                click.echo(job_id)
                echo_err(f"submitted to {api.address}; follow with: hpcray logs -f {job_id}")
            return
        status = _follow_or_interrupt(api, job_id, on_interrupt, sys.stderr if as_json else sys.stdout,
                                      f"submitted job {job_id} to {api.address}; Ctrl-C "
                                      f"{'stops' if on_interrupt == 'stop' else 'detaches'}")
    if as_json:
        print_json({"submission_id": job_id, "address": api.address, "status": status})
    sys.exit(jobs.exit_code(status))


@cli.command()
@profile_option
@address_option
@click.argument("job_id", metavar="ID")
@click.option("-f", "--follow", is_flag=True, help="Follow the logs until the job ends; exit code mirrors the job.")
def logs(profile_ref: str, address: str | None, job_id: str, follow: bool) -> None:
    """Print a job's logs (like `ray job logs`)."""
    from hpcray import jobs

    with _jobs_api(profile_ref, address) as api:
        if not follow:
            click.echo(api.logs(job_id), nl=False)
            return
        status = _follow_or_interrupt(api, job_id, None, sys.stdout)
    sys.exit(jobs.exit_code(status))


@cli.command()
@profile_option
@address_option
@click.argument("job_id", metavar="ID")
@click.option("--no-wait", is_flag=True, help="Ask Ray to stop the job and return at once.")
def stop(profile_ref: str, address: str | None, job_id: str, no_wait: bool) -> None:
    """Stop a job (SIGTERM, then SIGKILL) and wait until it has stopped."""
    from hpcray import jobs

    with _jobs_api(profile_ref, address) as api:
        click.echo(f"job {job_id} {jobs.stop(api, job_id, wait=not no_wait)}")


@cli.command("list")
@profile_option
@address_option
@json_option
def list_cmd(profile_ref: str, address: str | None, as_json: bool) -> None:
    """List the cluster's jobs (secret-looking env var values shown as ******)."""
    from hpcray import jobs

    with _jobs_api(profile_ref, address) as api:
        found = jobs.list_jobs(api)
    if as_json:
        print_json(found)
    else:
        for line in jobs.job_lines(found):
            click.echo(line)


@cli.command("job-status")
@profile_option
@address_option
@click.argument("job_id", metavar="ID")
@json_option
def job_status(profile_ref: str, address: str | None, job_id: str, as_json: bool) -> None:
    """A job's status and Ray's message about it (like `ray job status`)."""
    from hpcray import jobs

    with _jobs_api(profile_ref, address) as api:
        info = jobs.status_of(api, job_id)
    if as_json:
        print_json(info)
    else:
        click.echo(f"job {job_id}: {info['status']}" + (f" ({info['message']})" if info.get("message") else ""))


# ---------------------------------------------------------------------------------------------------------------
# Cluster lifecycle: up, down, status, gc, dashboard (hpcray.backends; KubeRay through helm + the kubernetes client)
# ---------------------------------------------------------------------------------------------------------------


def _duration(value: str | None, flag: str) -> float | None:
    from hpcray.profile import parse_duration

    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a duration; write e.g. 90s, 30m, 6h or 2d",
                                 param_hint=flag) from None


def _expiry(epoch: float | None) -> str:
    import time

    if epoch is None:
        return "no expiry"
    left = epoch - time.time()
    span = abs(left)
    text = f"{span:.0f}s" if span < 120 else f"{span / 60:.0f}m" if span < 7200 else f"{span / 3600:.1f}h"
    return f"expires in {text}" if left > 0 else f"expired {text} ago"


def _print_cluster(status: Any) -> None:
    ready_nodes = sum(n.phase == "Ready" for n in status.nodes)
    d = status.details
    where = f" namespace {d['namespace']}" if d.get("namespace") else ""
    release = f" release {d['release_status']} rev {d['revision']}" if d.get("release_status") else ""
    click.echo(f"{status.name}: {status.backend}{where}{release}; "
               f"{'ready' if status.ready else 'not ready' if status.exists else 'absent'}; "
               f"{ready_nodes}/{len(status.nodes)} {'pods' if status.backend == 'kuberay' else 'Ray nodes'} Ready; "
               f"{sum(n.gpus for n in status.nodes)} GPUs; "
               f"{_expiry(status.expires_at)}" + (f"; dashboard {status.address}" if status.address else ""))
    for n in status.nodes:
        click.echo(f"  {n.name}  {n.role}  {n.phase}{'  ' + n.reason if n.reason else ''}  age {n.age_s:.0f}s"
                   f"{f'  {n.gpus} GPU' if n.gpus else ''}")


def _dry_run_up(p: Any, env: dict[str, Any] | None, ttl_s: float | None, as_json: bool) -> None:
    import shlex

    from hpcray.backends.kuberay import KubeRayBackend

    if p.backend != "kuberay":
        click.echo(f"# profile {p.name} uses the local backend: `up` starts a Ray head on this machine (no helm)")
        return
    if env is None and p.mlflow.credentials != "none":  # a dry run without credentials shows where they would go
        from hpcray.secrets import Secret
        from hpcray.tracking import PASSWORD_VAR, USERNAME_VAR

        env = {USERNAME_VAR: "<unset>", PASSWORD_VAR: Secret("<unset>")}
    plan = KubeRayBackend(p).plan(env=env, ttl_s=ttl_s, warn=echo_err)
    command = shlex.join([plan.helm.path, *plan.argv])
    secret = None if plan.secret is None else {
        "name": p.secret_name, "namespace": p.kubernetes.namespace, "data": {k: str(v) for k, v in plan.secret.items()}}
    if as_json:
        print_json({"helm_argv": [plan.helm.path, *plan.argv], "values": plan.values_yaml, "secret": secret,
                    "expected_workers": plan.expected_workers, "expires_at": plan.expires_at})
        return
    if secret:
        shown = ", ".join(f"{k}={v if k != 'password' else 'Secret(******)'}" for k, v in secret["data"].items())
        click.echo(f"# would create/replace Secret {p.secret_name} in namespace {p.kubernetes.namespace}: {shown}")
    click.echo(f"# would run (values on stdin):\n{command}\n# values:")
    click.echo(plan.values_yaml, nl=False)


@cli.command()
@profile_option
@click.option("--timeout", metavar="DUR", help="How long to wait for every pod to be Ready, e.g. 30m "
                                               "(default: the profile's timeout).")
@click.option("--ttl", metavar="DUR", help="Lifetime, e.g. 6h: `hpcray gc` removes the cluster after it "
                                           "(default: the profile's ttl).")
@click.option("--down-on-failure/--keep-on-failure", default=False, show_default=True,
              help="On timeout or Ctrl-C remove the release, or keep it for inspection.")
@click.option("--port-forward", is_flag=True, help="Once ready, forward a local port to the dashboard until Ctrl-C.")
@click.option("--port", type=int, default=8265, show_default=True, help="Local port for --port-forward (0: any).")
@click.option("--dry-run", is_flag=True, help="Print the helm command and values; touch nothing.")
@json_option
def up(profile_ref: str, timeout: str | None, ttl: str | None, down_on_failure: bool, port_forward: bool, port: int,
       dry_run: bool, as_json: bool) -> None:
    """Start the profile's Ray cluster and wait until the head and every worker are Ready.

    \b
    Progress (one line per pod change, with Kubernetes' reason) goes to stderr, the result to stdout.
    On timeout: a diagnosis of every pod not Ready and exit 4. Ctrl-C: stop waiting, exit 130; the release is
    removed with --down-on-failure, otherwise left (`hpcray down` removes it).
    """
    from hpcray.backends import backend_for
    from hpcray.profile import load_profile

    p = load_profile(profile_ref)
    timeout_s = _duration(timeout or p.timeout, "--timeout")
    ttl_s = _duration(ttl or p.ttl, "--ttl")
    credentials = _credentials_for(p, dry_run)
    env = credentials.env() if credentials else None
    if dry_run:
        _dry_run_up(p, env, ttl_s, as_json)
        return
    backend = backend_for(p)
    status = backend.up(timeout=timeout_s or 7200.0, progress=echo_err, env=env, ttl_s=ttl_s,
                        down_on_failure=down_on_failure)
    if as_json:
        print_json(status.to_json())
    else:
        _print_cluster(status)
        if p.backend == "kuberay" and not port_forward:
            click.echo(f"dashboard: `hpcray dashboard -p {profile_ref}` forwards a local port to "
                       f"{status.details['service']}:8265")
    if port_forward and p.backend == "kuberay":
        backend.dashboard(port=port, progress=echo_err,  # type: ignore[attr-defined]
                          on_ready=lambda url: click.echo(f"dashboard: {url} (Ctrl-C stops the port-forward)"))


@cli.command()
@profile_option
@click.option("--timeout", metavar="DUR", default="5m", show_default=True, help="How long to wait for the pods to go.")
@click.option("--dry-run", is_flag=True, help="Print what would be removed; touch nothing.")
def down(profile_ref: str, timeout: str, dry_run: bool) -> None:
    """Remove the profile's Ray cluster and wait until none of its pods is left (absent: says so, succeeds)."""
    from hpcray.backends import backend_for
    from hpcray.profile import load_profile

    p = load_profile(profile_ref)
    if dry_run:
        if p.backend != "kuberay":
            click.echo(f"# profile {p.name} uses the local backend: `down` stops its Ray head on this machine")
            return
        import shlex

        from hpcray import helm

        click.echo(f"# would run:\n{shlex.join([helm.find_helm().path, *helm.uninstall_args(p)])}")
        click.echo(f"# would delete Secret {p.secret_name} and wait for the pods labelled ray.io/cluster="
                   f"{p.raycluster_name} in namespace {p.kubernetes.namespace} to be gone")
        return
    removed = backend_for(p).down(progress=echo_err, timeout=_duration(timeout, "--timeout") or 300.0)
    click.echo(f"{p.name}: removed" if removed else f"{p.name}: nothing to remove (it was not running)")


@cli.command()
@click.argument("job_id", required=False)
@profile_option
@click.option("--all", "all_releases", is_flag=True, help="Every hpcray release in the profile's kube context.")
@json_option
@click.pass_context
def status(ctx: click.Context, job_id: str | None, profile_ref: str, all_releases: bool, as_json: bool) -> None:
    """Show the profile's cluster (pods, age, GPUs, expiry), every hpcray release with --all, or a job by JOB_ID."""
    if job_id is not None:
        job_status_cmd = cli.get_command(ctx, "job-status")
        if job_status_cmd is None:
            from hpcray.errors import HpcrayError

            raise HpcrayError(f"job status is not available in this build of hpcray; use `ray job status {job_id}` "
                              "against the dashboard address")
        job_status_cmd.main([job_id, "--profile", profile_ref, *(["--json"] if as_json else [])],
                            prog_name="hpcray job-status", standalone_mode=False)
        return
    from hpcray.profile import load_profile

    p = load_profile(profile_ref)
    if all_releases:
        from hpcray.backends.kuberay import all_clusters

        clusters = all_clusters(p)
        if as_json:
            print_json([c.to_json() for c in clusters])
        elif not clusters:
            click.echo("no hpcray releases in this kube context")
        for c in clusters if not as_json else []:
            _print_cluster(c)
        return
    from hpcray.backends import backend_for

    st = backend_for(p).status()
    if as_json:
        print_json(st.to_json())
    else:
        _print_cluster(st)


@cli.command()
@profile_option
@click.option("--dry-run", is_flag=True, help="List the expired releases; remove nothing.")
@json_option
def gc(profile_ref: str, dry_run: bool, as_json: bool) -> None:
    """Uninstall every hpcray release whose --ttl has passed, in every namespace of the profile's kube context."""
    from hpcray.backends import kuberay
    from hpcray.profile import load_profile

    expired = kuberay.gc(load_profile(profile_ref), dry_run=dry_run, progress=echo_err)
    if as_json:
        print_json([{"name": e.name, "namespace": e.namespace, "expired_at": e.expired_at, "removed": not dry_run}
                    for e in expired])
        return
    if dry_run:
        for e in expired:
            click.echo(f"would uninstall {e.name} (namespace {e.namespace}, {_expiry(e.expired_at)})")
    click.echo(f"{'found' if dry_run else 'removed'} {len(expired)} expired hpcray release(s)")


@cli.command()
@profile_option
@click.option("--port", type=int, default=8265, show_default=True, help="Local port (0: any free one).")
def dashboard(profile_ref: str, port: int) -> None:
    """Forward 127.0.0.1:PORT to the head's dashboard (8265) until Ctrl-C, reconnecting when it drops."""
    from hpcray.backends import backend_for
    from hpcray.profile import load_profile

    p = load_profile(profile_ref)
    backend = backend_for(p)
    if p.backend != "kuberay":
        with backend.reach(echo_err) as address:
            click.echo(address)
        return
    backend.dashboard(port=port, progress=echo_err,  # type: ignore[attr-defined]
                      on_ready=lambda url: click.echo(f"dashboard: {url} (Ctrl-C stops the port-forward)"))


# ---------------------------------------------------------------------------------------------------------------
# run (hpcray.run): up → jobs → down, teardown guaranteed
# ---------------------------------------------------------------------------------------------------------------


@cli.command("run")
@profile_option
@click.argument("job_names", metavar="JOB...", nargs=-1, required=True)
@click.option("--keep", is_flag=True, help="Leave the cluster up afterwards (default: tear it down).")
@click.option("--timeout", metavar="DUR", help="How long to wait for the cluster (default: the profile's timeout).")
@click.option("--dry-run", is_flag=True, help="Print what would be brought up and submitted; touch nothing.")
@json_option
def run_cmd(profile_ref: str, job_names: tuple[str, ...], keep: bool, timeout: str | None, dry_run: bool,
            as_json: bool) -> None:
    """Bring the profile's cluster up, run each JOB of the profile in turn, and tear the cluster down.

    \b
    The teardown happens whatever the outcome: a failed job, an error, Ctrl-C, SIGTERM or SIGHUP (a running job
    is stopped first); --keep leaves the cluster up. MLflow is checked before anything starts.
    Exit code: the worst job's (0 SUCCEEDED, 1 FAILED, 3 STOPPED), 2 when nothing ran, 128+N on signal N.
    """
    from hpcray.profile import load_profile, parse_duration
    from hpcray.run import run, summary

    p = load_profile(profile_ref)
    wait = None
    if timeout:
        try:
            wait = parse_duration(timeout)
        except ValueError:
            raise click.BadParameter(f"{timeout!r} is not a duration like 90s, 30m, 2h", param_hint="--timeout") from None
    if dry_run:
        from hpcray import jobs

        credentials = _credentials_for(p, True)
        missing = [n for n in job_names if n not in p.jobs]
        if missing:
            raise click.BadParameter(f"no job {missing[0]!r} in {p.source}; its jobs: {', '.join(p.jobs)}",
                                     param_hint="JOB")
        _dry_run_up(p, credentials.env() if credentials else None, None, False)
        for name in job_names:
            sub = jobs.build_submission(p, jobs.job_spec(p, name, []), name=name, credentials=credentials,
                                        warn=echo_err)
            _print_submission(sub, name, False)
        click.echo(f"# then: {'keep the cluster (--keep)' if keep else f'hpcray down --profile {p.source}'}")
        return
    report = run(p, list(job_names), out=sys.stderr if as_json else sys.stdout, say=echo_err, keep=keep, timeout=wait)
    if as_json:
        print_json(report.to_json())
    else:
        click.echo("\n".join(["", "== hpcray run: summary =="] + summary(report)))
    sys.exit(report.exit_code)


def usage_error(exc: click.ClickException) -> NoReturn:
    """A wrong flag, value or argument: one line naming it and where to read more, exit 2 (not click's four)."""
    from hpcray.errors import EXIT_USAGE

    ctx = getattr(exc, "ctx", None)
    message = " ".join(exc.format_message().split()).rstrip(".")
    see = f"see `{ctx.command_path if ctx is not None else 'hpcray'} --help`"
    echo_err(f"hpcray: error: {message} {see.capitalize()}" if message.endswith("?") else
             f"hpcray: error: {message}; {see}")
    sys.exit(EXIT_USAGE)


def main(argv: list[str] | None = None) -> None:
    from hpcray.errors import Interrupted

    debug = "--debug" in (argv if argv is not None else sys.argv[1:]) or bool(os.environ.get("HPCRAY_DEBUG"))
    try:
        cli.main(args=argv, prog_name="hpcray", standalone_mode=False)
    except click.exceptions.Abort:
        echo_err("hpcray: interrupted")
        sys.exit(130)
    except click.exceptions.NoArgsIsHelpError as exc:
        exc.show()  # the help text, as for --help
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        usage_error(exc)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        fail(Interrupted(2), debug)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line; --debug shows the traceback
        fail(exc, debug)


if __name__ == "__main__":
    main()
