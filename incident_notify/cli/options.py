"""Options shared by many commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print one versioned JSON document on stdout.")
]
RehearsalLogOpt = Annotated[
    bool, typer.Option("--sandbox", envvar="INCIDENT_NOTIFY_SANDBOX",
                       help="Read the rehearsals' log (sandbox runs record apart from real "
                       "ones).")
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
