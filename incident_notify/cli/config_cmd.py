"""`config show`: the effective settings and where each came from (secrets masked)."""

from __future__ import annotations

from typing import Any

import typer

from incident_notify.cli.environment import environment
from incident_notify.cli.main import app
from incident_notify.cli.options import JsonOpt
from incident_notify.cli.output import safe as escape

config_app = typer.Typer(help="Show the effective configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("show")
def show(ctx: typer.Context, json: JsonOpt = False) -> None:
    """Print every setting with its source, and which credentials are set (never values)."""
    env = environment(ctx)
    import os

    from incident_notify.config import (
        KNOWN_SECRETS,
        config_files,
        load_secrets,
        load_settings,
        mask,
    )

    env.json = json
    settings = load_settings()
    secrets = load_secrets(settings)
    data: dict[str, Any] = {
        "settings": settings.to_dict(),
        "config_files": [{"path": str(p), "exists": p.is_file()} for p in config_files()],
        "credentials": {name: mask(secrets.get(name, "")) for name in KNOWN_SECRETS},
        "environment": {k: v for k, v in os.environ.items()
                        if k.startswith("INCIDENT_NOTIFY_VAR_")},
    }
    if json:
        env.emit_json("config show", data)
        return
    from incident_notify.cli.render_results import table

    con = env.console()
    t = table(env, "setting", "value", "source", title="Effective settings")
    for name, item in data["settings"].items():
        value = item.get("effective", item["value"])
        t.add_row(name, escape(str(value)), escape(item["source"]))
    con.print(t)
    c = table(env, "credential", "state")
    for name, state in data["credentials"].items():
        c.add_row(name, state)
    con.print(c)
    for f in data["config_files"]:
        con.print(f"config file {escape(f['path'])}: {'found' if f['exists'] else 'absent'}")
