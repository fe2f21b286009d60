"""Command line: parse, print, exit. Work happens in the modules below; heavy libraries load only when used.

Exit codes (hpcray.errors): 0 ok, 1 job failed, 2 bad input / unmet precondition, 3 job stopped, 4 timed out,
70 internal error (a bug: rerun with --debug), 128+N interrupted by signal N.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import TYPE_CHECKING, Any, Iterator, NoReturn

import click

from hpcray import __version__

if TYPE_CHECKING:
    from hpcray.backends.base import ClusterStatus, Plan
    from hpcray.flows import RunPlan, Submit
    from hpcray.jobs import JobsApi

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


def duration(value: str, flag: str) -> float:
    """A duration flag (90s, 30m, 6h, 2d) in seconds; a bad one is a usage error naming the flag."""
    from hpcray.waiting import parse_duration

    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=flag) from None


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
            from hpcray.errors import OutputError

            raise OutputError(f"-o {output}: cannot write it ({exc.strerror}); give a file in an existing, "
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
    del data["key_lines"]  # where each key is in the file: for error messages, not part of the profile
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
    from hpcray.profile import load_profile

    wait_s = duration(timeout, "--timeout")
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
# Jobs (hpcray.flows, hpcray.jobs): Ray's words — submit, logs, stop, list, job-status — against any Ray cluster
# ---------------------------------------------------------------------------------------------------------------

address_option = click.option(
    "--address", metavar="URL", envvar="RAY_API_SERVER_ADDRESS",
    help="Ray Jobs API (dashboard) address of any Ray cluster: local head, port-forward, ingress, e.g. "
         "http://127.0.0.1:8265 ($RAY_API_SERVER_ADDRESS). Default: the profile's cluster.")


def _check_access(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from hpcray.profile import access_problem

    if value is not None and (problem := access_problem(value, "kuberay")):
        raise click.BadParameter(problem, param_hint="--access")
    return value


access_option = click.option(
    "--access", metavar="WAY", callback=_check_access,
    help="How to reach the cluster's Jobs API: auto, port-forward, service-proxy (through the Kubernetes API "
         "server, with the kubeconfig's credentials), relay (a port-forward to a socat pod on a regular node) or an "
         "http(s) URL such as an Ingress (default: the profile's access key, auto: the service proxy for a head on "
         "an interLink virtual node, a port-forward otherwise).")
skip_preflight_option = click.option(
    "--skip-preflight", is_flag=True,
    help="Don't check interLink's virtual node (Ready, taints, free CPU/memory/GPUs, PodCIDR) before helm runs.")


must_fit_option = click.option(
    "--must-fit", is_flag=True,
    help="Refuse (exit 2, nothing submitted) a job whose max_runtime exceeds what is left of the cluster's SLURM "
         "allocation before hpcray stops it (default: a warning).")


@contextlib.contextmanager
def _jobs_api(profile_ref: str, address: str | None, access: str | None = None) -> Iterator[JobsApi]:
    """The Jobs API at --address (the profile is not read), else of the profile's cluster, reached as --access (else
    the profile's access) says."""
    from hpcray import flows
    from hpcray.profile import load_profile

    with flows.jobs_api(None if address else load_profile(profile_ref), address, echo_err, access) as api:
        yield api


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


def _json_object(text: str | None, flag: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        return dict(json.loads(text))
    except (ValueError, TypeError):
        raise click.BadParameter("not a JSON object", param_hint=flag) from None


class _EntrypointCommand(click.Command):
    """Remembers whether the arguments came after `--`: `submit JOB` names a profile job, `submit -- CMD` runs CMD."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["hpcray.entrypoint"] = "--" in args
        return super().parse_args(ctx, args)


def _job_or_entrypoint(ctx: click.Context, job_args: tuple[str, ...]) -> tuple[str | None, list[str]]:
    if ctx.meta["hpcray.entrypoint"]:
        if not job_args:
            raise click.UsageError("give the entrypoint after `--`, e.g. -- python train.py")
        return None, list(job_args)
    if len(job_args) == 1:
        return job_args[0], []
    raise click.UsageError("give one JOB of the profile, or an entrypoint after `--` "
                           "(hpcray submit -p PROFILE -- python train.py)")


def _print_submission(s: Submit, as_json: bool) -> None:
    from hpcray.jobs import redact

    payload = redact(s.submission.payload())
    name = s.name or "(entrypoint)"
    if as_json:
        print_json({"job": name, **payload})
        return
    click.echo(f"# would submit job {name}: {payload['entrypoint']}")
    click.echo(json.dumps({k: v for k, v in payload.items() if k != "entrypoint"}, indent=2))


@cli.command(cls=_EntrypointCommand)
@profile_option
@address_option
@access_option
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
@must_fit_option
@click.option("--on-interrupt", type=click.Choice(["stop", "detach"]), default="stop", show_default=True,
              help="What Ctrl-C while following does: stop the job, or leave it running; then exit 130.")
@click.option("--dry-run", is_flag=True, help="Print the job that would be submitted (secrets redacted); contact "
                                              "nothing.")
@json_option
@click.pass_context
def submit(ctx: click.Context, profile_ref: str, address: str | None, access: str | None, job_args: tuple[str, ...],
           working_dir: str | None, requirements: str | None, pip: tuple[str, ...], wheels: tuple[str, ...],
           env_pairs: tuple[str, ...], runtime_env_json: str | None, num_cpus: float | None, num_gpus: float | None,
           submission_id: str | None, no_wait: bool, must_fit: bool, on_interrupt: str, dry_run: bool,
           as_json: bool) -> None:
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
    from hpcray import flows
    from hpcray.jobs import exit_code
    from hpcray.profile import load_profile

    overrides = flows.Overrides(working_dir, requirements, pip, wheels, _env_pairs(env_pairs),
                                _json_object(runtime_env_json, "--runtime-env-json"), num_cpus, num_gpus)
    p = load_profile(profile_ref)
    name, argv = _job_or_entrypoint(ctx, job_args)
    s = flows.plan_submit(p, name, argv, overrides=overrides, submission_id=submission_id, dry_run=dry_run,
                          warn=echo_err)
    if dry_run:
        _print_submission(s, as_json)
        return
    stop_at = None if address else flows.submit_walltime(p, name, must_fit=must_fit, warn=echo_err)
    with flows.submitted(s, address=address, access=access, progress=echo_err, warn=echo_err) as (api, job_id):
        if no_wait:
            if as_json:
                print_json({"submission_id": job_id, "address": api.address})
            else:
                click.echo(job_id)
                echo_err(f"submitted to {api.address}; follow with: hpcray logs -f {job_id}")
            return
        echo_err(f"submitted job {job_id} to {api.address}; Ctrl-C {'stops' if on_interrupt == 'stop' else 'detaches'}")
        result = flows.follow_submitted(s, api, job_id, out=sys.stderr if as_json else sys.stdout, say=echo_err,
                                        on_interrupt=on_interrupt, usage=address is None, stop_at=stop_at)
    if as_json:
        from dataclasses import asdict

        done = asdict(result)
        print_json({"submission_id": job_id, "address": api.address,
                    **{k: done[k] for k in ("status", "mlflow_run_ids", "usage", "cluster_usage")}})
    elif result.usage is not None and result.cluster_usage is not None:
        echo_err(f"usage: {result.usage.words()} (cluster so far: {result.cluster_usage.words()})")
    sys.exit(exit_code(result.status))


@cli.command()
@profile_option
@address_option
@access_option
@click.argument("job_id", metavar="ID")
@click.option("-f", "--follow", is_flag=True, help="Follow the logs until the job ends; exit code mirrors the job.")
def logs(profile_ref: str, address: str | None, access: str | None, job_id: str, follow: bool) -> None:
    """Print a job's logs (like `ray job logs`); of a job whose cluster is gone, the log archived by `down`."""
    from hpcray import flows
    from hpcray.errors import ClusterError, JobNotFound
    from hpcray.jobs import exit_code

    try:
        with _jobs_api(profile_ref, address, access) as api:
            if not follow:
                click.echo(api.logs(job_id), nl=False)
                return
            status = flows.follow(api, job_id, out=sys.stdout, say=echo_err)
    except (ClusterError, JobNotFound) as exc:
        from hpcray.archive import find_log

        archived = find_log(job_id)
        if archived is None:
            raise
        echo_err(f"hpcray: job {job_id} is on no running cluster ({' '.join(str(exc).split())}); its log as "
                 f"archived before the teardown, from {archived}:")
        click.echo(archived.read_text(errors="replace"), nl=False)
        return
    sys.exit(exit_code(status))


@cli.command()
@profile_option
@address_option
@access_option
@click.argument("job_id", metavar="ID")
@click.option("--no-wait", is_flag=True, help="Ask Ray to stop the job and return at once.")
def stop(profile_ref: str, address: str | None, access: str | None, job_id: str, no_wait: bool) -> None:
    """Stop a job (SIGTERM, then SIGKILL) and wait until it has stopped."""
    from hpcray import jobs

    with _jobs_api(profile_ref, address, access) as api:
        click.echo(f"job {job_id} {jobs.stop(api, job_id, wait=not no_wait)}")


@cli.command("list")
@profile_option
@address_option
@access_option
@json_option
def list_cmd(profile_ref: str, address: str | None, access: str | None, as_json: bool) -> None:
    """List the cluster's jobs (secret-looking env var values shown as ******)."""
    from hpcray import jobs

    with _jobs_api(profile_ref, address, access) as api:
        found = jobs.list_jobs(api)
    if as_json:
        print_json(found)
    else:
        for line in jobs.job_lines(found):
            click.echo(line)


def _job_status(profile_ref: str, address: str | None, access: str | None, job_id: str, as_json: bool) -> None:
    from hpcray import jobs

    with _jobs_api(profile_ref, address, access) as api:
        info = jobs.status_of(api, job_id)
    if as_json:
        print_json(info)
    else:
        click.echo(f"job {job_id}: {info['status']}" + (f" ({info['message']})" if info.get("message") else ""))


@cli.command("job-status")
@profile_option
@address_option
@access_option
@click.argument("job_id", metavar="ID")
@json_option
def job_status(profile_ref: str, address: str | None, access: str | None, job_id: str, as_json: bool) -> None:
    """A job's status and Ray's message about it (like `ray job status`)."""
    _job_status(profile_ref, address, access, job_id, as_json)


# ---------------------------------------------------------------------------------------------------------------
# Cluster lifecycle (hpcray.flows over hpcray.backends): up, down, status, gc, dashboard, run
# ---------------------------------------------------------------------------------------------------------------


def _optional_duration(value: str | None, flag: str) -> float | None:
    return None if value is None else duration(value, flag)


def _expiry(epoch: float | None) -> str:
    import time

    if epoch is None:
        return "no expiry"
    left = epoch - time.time()
    span = abs(left)
    text = f"{span:.0f}s" if span < 120 else f"{span / 60:.0f}m" if span < 7200 else f"{span / 3600:.1f}h"
    return f"expires in {text}" if left > 0 else f"expired {text} ago"


def _walltime(status: ClusterStatus) -> str:
    import time

    from hpcray.walltime import left_words

    return left_words(status.ends_at, time.time())


def _print_cluster(status: ClusterStatus) -> None:
    import time

    from hpcray.waiting import words

    ready_nodes = sum(n.phase == "Ready" for n in status.nodes)
    where = f" namespace {status.namespace}" if status.namespace else ""
    release = f" release {status.release.status} rev {status.release.revision}" if status.release else ""
    state = "ready" if status.ready else "not ready" if status.exists else "absent"
    gpus = sum(n.gpus for n in status.nodes)
    click.echo(f"{status.name}: {status.backend}{where}{release}; {state}; "
               f"{ready_nodes}/{len(status.nodes)} {status.node_kind}s Ready; {gpus} GPUs; {_expiry(status.expires_at)}"
               + (f"; {_walltime(status)}" if status.ends_at is not None else "")
               + (f"; dashboard {status.address}" if status.address else "")
               + (f"; MLflow {status.tracking_uri}" if status.tracking_uri else ""))
    if status.usage is not None:
        click.echo(f"  usage: {status.usage.words()}")
    for n in status.nodes:
        queued = (f"  queued {words(n.started_at - n.created_at)}"
                  if n.started_at is not None and n.created_at is not None else "")
        click.echo(f"  {n.name}  {n.role}  {n.phase}{'  ' + n.reason if n.reason else ''}  age {n.age_s:.0f}s"
                   f"{queued}{f'  {n.gpus} GPU' if n.gpus else ''}")
    for n in status.replaced:
        ago = f"  {words(time.time() - n.ended_at)} ago" if n.ended_at is not None else ""
        click.echo(f"  {n.name}  {n.role}  {n.phase}  {n.reason}{ago}")


def _print_plan(plan: Plan) -> None:
    import shlex

    for step in plan.steps:
        click.echo(f"# would {step.what}")
        if step.argv:
            click.echo(shlex.join(step.argv))
        if step.stdin is not None:
            click.echo("# stdin:")
            click.echo(step.stdin, nl=False)
    if plan.expires_at is not None:
        click.echo(f"# {_expiry(plan.expires_at)}: `hpcray gc` removes it then")


@cli.command()
@profile_option
@click.option("--timeout", metavar="DUR", help="How long to wait for every pod to be Ready, e.g. 30m "
                                               "(default: the profile's timeout).")
@click.option("--ttl", metavar="DUR", help="Lifetime, e.g. 6h: `hpcray gc` removes the cluster after it "
                                           "(default: the profile's ttl).")
@click.option("--down-on-failure/--keep-on-failure", default=False, show_default=True,
              help="On timeout or Ctrl-C remove the release, or keep it for inspection.")
@click.option("--port-forward", is_flag=True, help="Once ready, make the dashboard reachable here (a port-forward "
                                                   "where the cluster needs one) until Ctrl-C.")
@click.option("--port", type=int, default=8265, show_default=True, help="Local port for --port-forward (0: any).")
@access_option
@skip_preflight_option
@click.option("--dry-run", is_flag=True, help="Print what would be done (the helm command and values, the head "
                                              "that would start); touch nothing.")
@json_option
def up(profile_ref: str, timeout: str | None, ttl: str | None, down_on_failure: bool, port_forward: bool, port: int,
       access: str | None, skip_preflight: bool, dry_run: bool, as_json: bool) -> None:
    """Start the profile's Ray cluster and wait until the head and every worker are Ready.

    \b
    Progress (one line per pod change, with Kubernetes' reason) goes to stderr, the result to stdout.
    On timeout: a diagnosis of every pod not Ready and exit 4. Ctrl-C: stop waiting, exit 130; the release is
    removed with --down-on-failure, otherwise left (`hpcray down` removes it).
    """
    from hpcray import flows
    from hpcray.profile import load_profile

    p = load_profile(profile_ref)
    timeout_s, ttl_s = _optional_duration(timeout, "--timeout"), _optional_duration(ttl, "--ttl")
    if dry_run:
        plan = flows.plan_up(p, ttl_s=ttl_s, skip_preflight=skip_preflight, access=access, warn=echo_err)
        if as_json:
            print_json(plan.to_json())
        else:
            _print_plan(plan)
        return
    status = flows.up(p, timeout_s=timeout_s, ttl_s=ttl_s, down_on_failure=down_on_failure,
                      skip_preflight=skip_preflight, access=access, progress=echo_err)
    if as_json:
        print_json(status.to_json())
    else:
        _print_cluster(status)
    if port_forward:
        flows.dashboard(p, port=port, progress=echo_err, on_ready=lambda url: click.echo(f"dashboard: {url}"),
                        access=access)
    elif status.address is None and not as_json:
        click.echo(f"dashboard: `hpcray dashboard -p {profile_ref}` makes it reachable on this machine")


@cli.command()
@profile_option
@click.option("--timeout", metavar="DUR", default="5m", show_default=True, help="How long to wait for the pods to go.")
@click.option("--dry-run", is_flag=True, help="Print what would be archived and removed; touch nothing.")
@click.option("--no-archive", is_flag=True, help="Don't save the jobs' logs, details and results first.")
def down(profile_ref: str, timeout: str, dry_run: bool, no_archive: bool) -> None:
    """Archive the cluster's jobs (logs, redacted details, results: to their MLflow runs, else to
    ~/.local/share/hpcray/archive; at most the profile's archive_timeout), then remove the profile's Ray cluster and
    wait until none of its pods is left (absent: says so, succeeds)."""
    from hpcray import flows
    from hpcray.profile import load_profile

    p = load_profile(profile_ref)
    timeout_s = duration(timeout, "--timeout")
    if dry_run:
        _print_plan(flows.plan_down(p, archive=not no_archive))
        return
    removed = flows.down(p, timeout_s=timeout_s, progress=echo_err, archive=not no_archive)
    click.echo(f"{p.name}: removed" if removed else f"{p.name}: nothing to remove (it was not running)")


@cli.command()
@click.argument("job_id", required=False)
@profile_option
@address_option
@access_option
@click.option("--all", "all_releases", is_flag=True, help="Every hpcray release in the profile's kube context.")
@json_option
def status(job_id: str | None, profile_ref: str, address: str | None, access: str | None, all_releases: bool,
           as_json: bool) -> None:
    """Show the profile's cluster (pods, age, GPUs, expiry), every hpcray release with --all, or a job by JOB_ID."""
    if job_id is not None:
        _job_status(profile_ref, address, access, job_id, as_json)
        return
    from hpcray import flows
    from hpcray.profile import load_profile

    p = load_profile(profile_ref)
    if all_releases:
        clusters = flows.fleet(p)
        if as_json:
            print_json([c.to_json() for c in clusters])
            return
        if not clusters:
            click.echo("no hpcray releases in this kube context")
        for c in clusters:
            _print_cluster(c)
        return
    st = flows.status(p)
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
    from hpcray import flows
    from hpcray.profile import load_profile

    expired = flows.gc(load_profile(profile_ref), dry_run=dry_run, progress=echo_err)
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
@click.option("--port", type=int, default=8265, show_default=True,
              help="Local port of the forward to the head's dashboard (0: any free one), where one is needed.")
@access_option
def dashboard(profile_ref: str, port: int, access: str | None) -> None:
    """Make the head's dashboard reachable on 127.0.0.1 and print its address: a port-forward to the head pod until
    Ctrl-C, reconnecting when it drops (kuberay), or the local head's own port."""
    from hpcray import flows
    from hpcray.profile import load_profile

    flows.dashboard(load_profile(profile_ref), port=port, progress=echo_err,
                    on_ready=lambda url: click.echo(f"dashboard: {url}"), access=access)


def _print_run_plan(plan: RunPlan, as_json: bool) -> None:
    from hpcray.jobs import redact

    if as_json:
        print_json({"up": plan.up.to_json(),
                    "jobs": [{"job": s.name, **redact(s.submission.payload())} for s in plan.jobs],
                    "then": plan.then})
        return
    _print_plan(plan.up)
    for s in plan.jobs:
        _print_submission(s, False)
    click.echo(f"# then: {plan.then}")


@cli.command("run")
@profile_option
@click.argument("job_names", metavar="JOB...", nargs=-1, required=True)
@click.option("--keep", is_flag=True, help="Leave the cluster up afterwards (default: tear it down).")
@click.option("--timeout", metavar="DUR", help="How long to wait for the cluster (default: the profile's timeout).")
@access_option
@skip_preflight_option
@must_fit_option
@click.option("--dry-run", is_flag=True, help="Print what would be brought up, submitted and torn down; touch "
                                              "nothing.")
@click.option("--no-archive", is_flag=True, help="Tear down without saving the jobs' logs, details and results.")
@json_option
def run_cmd(profile_ref: str, job_names: tuple[str, ...], keep: bool, timeout: str | None, access: str | None,
            skip_preflight: bool, must_fit: bool, dry_run: bool, no_archive: bool, as_json: bool) -> None:
    """Bring the profile's cluster up, run each JOB of the profile in turn, and tear the cluster down.

    \b
    The teardown happens whatever the outcome: a failed job, an error, Ctrl-C, SIGTERM or SIGHUP (a running job
    is stopped first), after the jobs' logs, details and results are archived (--no-archive: not); --keep leaves
    the cluster up. MLflow is checked before anything starts.
    On interLink a job is stopped gracefully interlink.slurm.stop_margin before its SLURM allocation ends; one
    with `resume: true` is then submitted again on the cluster brought up again, up to its max_attempts.
    Exit code: the worst job's (0 SUCCEEDED, 1 FAILED, 3 STOPPED), 2 when nothing ran, 128+N on signal N.
    """
    from hpcray import flows
    from hpcray.profile import load_profile

    p = load_profile(profile_ref)
    timeout_s = _optional_duration(timeout, "--timeout")
    if dry_run:
        _print_run_plan(flows.plan_run(p, list(job_names), keep=keep, skip_preflight=skip_preflight, access=access,
                                       warn=echo_err), as_json)
        return
    report = flows.run(p, list(job_names), out=sys.stderr if as_json else sys.stdout, say=echo_err, keep=keep,
                       timeout_s=timeout_s, skip_preflight=skip_preflight, access=access, must_fit=must_fit,
                       archive=not no_archive)
    if as_json:
        print_json(report.to_json())
    else:
        click.echo("\n".join(["", "== hpcray run: summary =="] + flows.summary(report)))
    sys.exit(report.exit_code)


@cli.command("doctor")
@profile_option
@access_option
@click.option("--timeout", default="20s", show_default=True, metavar="DURATION",
              help="The longest one check may take (a server that never answers fails its check after it).")
@json_option
def doctor_cmd(profile_ref: str, access: str | None, timeout: str, as_json: bool) -> None:
    """Check everything hpcray can before HPC hours are spent: the profile, helm, the chart and values, Kubernetes
    (kubeconfig, API server, namespace, KubeRay's CRD, rights), interLink's virtual node, the SIF file, Ray versions,
    MLflow (reachable, credentials, experiment writable) and, when a cluster is up, the Jobs API. Creates nothing on
    the cluster.

    \b
    One line per check: ok, warn, fail or skip (why it cannot be known from here), with the fix when not ok;
    --json: a list of {check, status, detail, fix}. Progress on stderr.
    Exit code: the worst result's: 0 all ok or skipped, 1 a warning, 2 a failure.
    """
    from dataclasses import asdict

    from hpcray import doctor

    results = []
    for result in doctor.doctor(profile_ref, access=access, timeout=duration(timeout, "--timeout"),
                                progress=echo_err):
        results.append(result)
        if not as_json:
            click.echo(doctor.line(result))
    if as_json:
        print_json([asdict(r) for r in results])
    sys.exit(doctor.exit_code(results))


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
