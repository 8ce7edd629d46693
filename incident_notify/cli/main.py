"""Entry point: the Typer app, global options, and the one place errors become exit codes.

Every command module registers itself on `app` (or adds a sub-app). Heavy libraries are
imported inside command functions only, so `incident-notify --help` stays fast.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from incident_notify import __version__
from incident_notify.cli import output
from incident_notify.cli.environment import Environment, environment
from incident_notify.errors import ConfigError, IncidentNotifyError, ProblemsError
from incident_notify.exit_codes import ExitCode

app = typer.Typer(
    name="incident-notify",
    help=(
        "Tell the incident team and customers what is happening, on every channel, "
        "with failover when one is down, and keep a tamper-evident record of every word."
    ),
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(ctx: typer.Context, value: bool) -> None:
    if value:
        out = environment(ctx).stdout
        out.write(f"incident-notify {__version__}\n")
        out.flush()
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show full tracebacks for unexpected errors.")
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print only warnings, errors and results.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Incident mass notification from YAML playbooks."""
    env = environment(ctx)
    env.debug, env.quiet = debug, quiet


def _register() -> None:
    # Importing a command module registers its commands on `app`; these modules are
    # cheap to import (no tweepy / twilio / jinja2 at module level).
    from incident_notify.cli import commands  # noqa: F401


def report_error(env: Environment, exc: IncidentNotifyError, command: str) -> int:
    """Print one paragraph (or one line per located problem) and return the exit code."""
    code = int(exc.exit_code)
    if env.json:
        if isinstance(exc, ProblemsError):
            errors = [p.to_dict() for p in exc.problems]
        else:
            errors = [{"message": exc.message, "hint": exc.hint}]
        env.emit_json(command, None, exit_code=code, errors=errors)
        return code
    con = env.err_console()
    if isinstance(exc, ProblemsError):
        for problem in exc.problems:
            con.print(f"[bold red]error:[/] {output.safe(problem)}", markup=True,
                      highlight=False)
        said = f"{len(exc.problems)} problem(s)"
        if exc.message and exc.message != f"{said} found":  # (what it means: "nothing was sent")
            said += f"; {exc.message}"
        con.print(output.inert(f"{said}. {exc.hint}".rstrip()), markup=False)
    else:
        text = f"error: {exc.message}"
        if exc.hint:
            text += f"\n  hint: {exc.hint}"
        con.print(output.inert(text), markup=False, highlight=False)
    return code


_GLOBAL_FLAGS = ("--debug", "--quiet", "-q")
_TAKES_VALUE = ("--message", "-m", "--set", "-s")


def _hoist_globals(args: list[str]) -> list[str]:
    """Let --quiet / -q / --debug stand anywhere, as users type them after the command."""
    front, rest = [], []
    for i, arg in enumerate(args):
        if arg in _GLOBAL_FLAGS and not (i and args[i - 1] in _TAKES_VALUE):
            front.append(arg)
        else:
            rest.append(arg)
    return front + rest


def run(argv: list[str] | None = None) -> None:
    """Console-script entry point: the process's own streams (guarded: `cli.streams`), its
    signals, and its exit code."""
    from incident_notify.cli.streams import finish, guarded_environment

    env = guarded_environment()
    code = invoke(list(sys.argv[1:] if argv is None else argv), env)
    sys.exit(finish(env, code))


try:  # Typer vendors Click from 0.2x on; before, it used the click package
    from typer._click import ClickException as _ClickException
except ImportError:  # pragma: no cover - older Typer
    from click import ClickException as _ClickException  # type: ignore[no-redef,unused-ignore]


def invoke(argv: list[str], env: Environment) -> int:
    """Run one command line in `env` and return its exit code. Never shows a traceback
    unless --debug is given; every error a user can cause has its documented code."""
    _register()
    args = _hoist_globals(list(argv))
    command = next((a for a in args if not a.startswith("-")), "")
    env.json = "--json" in args  # before parsing: a usage error is JSON too
    env.debug = "--debug" in args
    try:
        code = int(app(args=args, prog_name="incident-notify", standalone_mode=False,
                       obj=env) or 0)
        if code == ExitCode.INTERRUPTED:
            from incident_notify.cli.streams import interrupted

            interrupted(env, command)
        return code
    except typer.Exit as exc:
        return int(exc.exit_code)
    except _ClickException as exc:  # usage errors: click's own message, exit 2
        exc.show(file=env.stderr)
        return int(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        from incident_notify.cli.streams import interrupted

        env.interrupted = True
        interrupted(env, command)
        return int(ExitCode.INTERRUPTED)
    except IncidentNotifyError as exc:
        if env.debug:  # the traceback too, but the documented exit code still
            import traceback

            traceback.print_exc(file=env.stderr)
        return _report(env, exc, command)
    except BrokenPipeError as exc:
        # The console script's streams are guarded (`cli.streams`): a reader that went
        # away (`| head`) never gets here, and the command ends with its own code. A broken
        # pipe that does get here is a connection's, or an unguarded stream's: the command
        # did not finish, so never exit 0 ("everyone was reached") for it.
        from incident_notify.cli.streams import Guarded, silence

        if isinstance(env.stdout, Guarded):
            return _unexpected(env, exc)
        silence(env.stdout)
        return int(ExitCode.INTERRUPTED)
    except OSError as exc:
        if env.debug:
            import traceback

            traceback.print_exc(file=env.stderr)
        # A path the user gave (or the default one) cannot be read or written.
        where = f" {exc.filename}" if exc.filename else ""
        return report_error(env, ConfigError(
            f"cannot use{where}: {exc.strerror or type(exc).__name__}",
            hint="check the path (a file, not a folder; its folder exists) and its "
            "permissions"), command)
    except Exception as exc:
        if env.debug:
            raise
        return _unexpected(env, exc)


def _report(env: Environment, exc: IncidentNotifyError, command: str) -> int:
    """`report_error`, whose own output (a --json document on a full disk) cannot fail the
    exit code it reports."""
    try:
        return report_error(env, exc, command)
    except IncidentNotifyError:
        return int(exc.exit_code)


def _unexpected(env: Environment, exc: BaseException) -> int:
    if env.debug:
        import traceback

        traceback.print_exc(file=env.stderr)
    env.err_console().print(
        f"error: unexpected {type(exc).__name__}: {exc}\n"
        "  hint: this is a bug; rerun with --debug for the traceback and report it",
        markup=False,
        highlight=False,
    )
    return int(ExitCode.ERROR)
