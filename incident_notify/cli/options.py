"""Options shared by many commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print one versioned JSON document on stdout.")
]
AuditLogOpt = Annotated[
    Path | None,
    typer.Option(
        "--audit-log",
        envvar="INCIDENT_NOTIFY_AUDIT_LOG",
        help="Audit log file (default: the user state directory).",
        show_default=False,
    ),
]
