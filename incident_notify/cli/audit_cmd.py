"""`incident-notify audit ...` (placeholder until the audit module lands)."""

import typer

from incident_notify.cli.main import app

audit_app = typer.Typer(help="Verify, show and export the audit log.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")
