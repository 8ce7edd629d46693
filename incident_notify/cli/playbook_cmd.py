"""`validate` and `preview`: prove a playbook works before an outage needs it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from incident_notify.cli.environment import environment
from incident_notify.cli.main import app
from incident_notify.cli.options import JsonOpt
from incident_notify.exit_codes import ExitCode

SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Incident variable name=value (repeatable).",
                 show_default=False),
]
VarsOpt = Annotated[
    Path | None,
    typer.Option("--vars", help="YAML or JSON file of incident variables.", show_default=False),
]


@app.command()
def validate(
    ctx: typer.Context,
    paths: Annotated[
        list[Path] | None,
        typer.Argument(help="Playbook files or directories (default: playbooks/).",
                       show_default=False),
    ] = None,
    no_contacts: Annotated[
        bool, typer.Option("--no-contacts", help="Skip checking the contact sources.")
    ] = False,
    json: JsonOpt = False,
) -> None:
    """Check playbooks for CI: schema, templates, variables, sensitivity and channel limits.

    Every stage x audience x channel (fallbacks included) is rendered with the declared
    example values and with every variable at its max length, and measured against the
    channel's real limit. Exit 0 only when everything passes; 3 otherwise.
    """
    env = environment(ctx)
    from incident_notify.checks import validate_paths
    from incident_notify.cli.render_results import print_validation
    from incident_notify.config import load_settings

    env.json = json
    region = load_settings().default_region  # national numbers read as a send reads them
    reports = validate_paths(paths or [Path("playbooks")], check_contacts=not no_contacts,
                             region=region)
    ok = all(r.ok for r in reports)
    code = ExitCode.OK if ok else ExitCode.INVALID_PLAYBOOK
    if json:
        env.emit_json(
            "validate",
            {"playbooks": [r.to_dict() for r in reports], "ok": ok},
            exit_code=int(code),
            errors=[p.to_dict() for r in reports for p in r.problems],
        )
    else:
        print_validation(env, reports)
    raise typer.Exit(int(code))


@app.command()
def preview(
    ctx: typer.Context,
    playbook: Annotated[Path, typer.Argument(help="The playbook file.")],
    stage: Annotated[
        str | None, typer.Option("--stage", help="Stage to preview (default: the first).")
    ] = None,
    sets: SetOpt = None,
    vars_file: VarsOpt = None,
    message: Annotated[
        str, typer.Option("--message", "-m", help="Free-text update to include.")
    ] = "",
    fallback: Annotated[
        bool, typer.Option("--fallback/--no-fallback",
                           help="Also show what fallback channels would receive.")
    ] = False,
    json: JsonOpt = False,
) -> None:
    """Show exactly what each channel would receive, with counts and thread parts."""
    env = environment(ctx)
    from incident_notify.cli.render_results import print_preview
    from incident_notify.preview import preview_stage

    env.json = json
    result = preview_stage(playbook, stage, sets or [], vars_file, message=message,
                           include_fallbacks=fallback)
    code = ExitCode.OK if result.ok else ExitCode.INVALID_PLAYBOOK
    if json:
        env.emit_json("preview", result.to_dict(), exit_code=int(code),
                         errors=[p.to_dict() for p in result.problems])
    else:
        print_preview(env, result)
    raise typer.Exit(int(code))
