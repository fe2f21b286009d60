"""Command line: parse, print, exit. Work happens in the modules below; heavy libraries load only when used.

Exit codes (hpcray.errors): 0 ok, 1 job failed, 2 bad input / unmet precondition, 3 job stopped, 4 timed out,
70 internal error (a bug: rerun with --debug), 128+N interrupted by signal N.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, NoReturn

import click

from hpcray import __version__

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}

def _complete_profiles(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    from hpcray.profile import PROFILES_DIR

    return sorted(p.stem for p in PROFILES_DIR.glob("*.y*ml") if p.stem.startswith(incomplete))


profile_option = click.option(
    "--profile", "-p", "profile_ref", metavar="PROFILE", envvar="HPCRAY_PROFILE", default="local", show_default=True,
    shell_complete=_complete_profiles,
    help="Profile name in values/profiles/ or path to a profile YAML ($HPCRAY_PROFILE).")
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
        with open(output, "w") as fh:
            fh.write(text)
        echo_err(f"wrote {output}")
    else:
        click.echo(text, nl=False)


@cli.command("profile")
@profile_option
@click.option("--schema", is_flag=True, help="Print every profile key as Markdown (docs/profile.md).")
@json_option
def profile_cmd(profile_ref: str, schema: bool, as_json: bool) -> None:
    """Validate a profile and show it, or print the profile schema."""
    from hpcray.profile import load_profile

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


def main(argv: list[str] | None = None) -> None:
    from hpcray.errors import Interrupted

    debug = "--debug" in (argv if argv is not None else sys.argv[1:]) or bool(os.environ.get("HPCRAY_DEBUG"))
    try:
        cli.main(args=argv, prog_name="hpcray", standalone_mode=False)
    except click.exceptions.Abort:
        echo_err("hpcray: interrupted")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        fail(Interrupted(2), debug)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line; --debug shows the traceback
        fail(exc, debug)


if __name__ == "__main__":
    main()
