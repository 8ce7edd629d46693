"""`incident-notify audit verify|show|export`: the incident record, checked and read."""

from __future__ import annotations

import csv
import json as jsonlib
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from incident_notify.cli.environment import environment
from incident_notify.cli.main import app
from incident_notify.cli.options import AuditLogOpt, JsonOpt, RehearsalLogOpt
from incident_notify.cli.output import safe as escape
from incident_notify.errors import UsageError
from incident_notify.exit_codes import ExitCode

if TYPE_CHECKING:
    from incident_notify.audit import AuditLog

audit_app = typer.Typer(help="Verify, show and export the audit log.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")

IncidentOpt = Annotated[str | None, typer.Option("--incident", help="Only this incident.")]
ChannelOpt = Annotated[str | None, typer.Option("--channel", help="Only this channel.")]
StatusOpt = Annotated[str | None, typer.Option(
    "--status", help="Only deliveries with this outcome: sent, failed, failover, skipped, "
    "unknown, planned, attempt.")]
EventOpt = Annotated[str | None, typer.Option("--event", help="Only events starting with this.")]
SinceOpt = Annotated[str | None, typer.Option(
    "--since", help="Only records since a time (2026-11-22T10:00) or an age (2h, 30m, 1d).")]


def _log(path: Path | None, sandbox: bool = False) -> AuditLog:
    """The log the other commands write: --audit-log, else the environment or config file,
    else the default; with --sandbox the rehearsals' log."""
    from incident_notify.audit import AuditLog
    from incident_notify.config import load_settings

    return AuditLog(load_settings({"audit_log": path, "sandbox": sandbox}).audit_path())


def parse_since(value: str | None) -> datetime | None:
    if not value:
        return None
    match = re.fullmatch(r"(\d+)([smhd])", value.strip())
    if match:
        seconds = int(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
        return datetime.now(UTC) - timedelta(seconds=seconds)
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--since {value!r} is neither a time nor an age",
                         hint="e.g. --since 2026-11-22T10:00 or --since 2h") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _filtered(path: Path | None, sandbox: bool, incident: str | None, channel: str | None,
              status: str | None, event: str | None, since: str | None) -> Any:
    from incident_notify.audit_schema import EVENTS
    from incident_notify.errors import NotFoundError, UsageError, did_you_mean

    statuses = [e.split(".", 1)[1] for e in EVENTS if e.startswith("delivery.")]
    if status and status not in statuses:
        raise UsageError(f"no delivery status {status!r}" + did_you_mean(status, statuses),
                         hint=f"--status takes one of: {', '.join(statuses)}")
    if event and not any(e.startswith(event) for e in EVENTS):
        raise UsageError(f"no event starts with {event!r}" + did_you_mean(event, EVENTS),
                         hint=f"events: {', '.join(EVENTS)}")
    prefix = f"delivery.{status}" if status else event
    log = _log(path, sandbox)
    if channel and not log.names_channel(channel):
        # (As with an incident id: a mistyped channel would show nothing, as if it were so.)
        names = log.channel_names()
        raise NotFoundError(f"no record of channel {channel!r} in {log.path}"
                            + did_you_mean(channel, names),
                            hint=f"channels recorded: {', '.join(sorted(names)) or 'none'}")
    if incident and next(iter(log.records(incident=incident)), None) is None:
        # (A mistyped id would otherwise show or export nothing, as if it were so.)
        raise NotFoundError(f"no incident {incident!r} in {log.path}",
                            hint="incident-notify status lists the incidents")
    return log.records(incident=incident, channel=channel, event_prefix=prefix,
                       since=parse_since(since))


def _summary(rec: Any) -> str:
    p = rec.payload or {}
    for key in ("provider_id", "error", "reason", "stage", "message"):
        if p.get(key):
            return f"{key}: {p[key]}"
    return ""


@audit_app.command("verify")
def verify(
    ctx: typer.Context,
    audit_log: AuditLogOpt = None,
    sandbox: RehearsalLogOpt = False,
    expect: Annotated[str | None, typer.Option(
        "--expect", help="The head hash kept elsewhere (from 'audit head'): the log must end "
        "exactly there.",
        show_default=False)] = None,
    incremental: Annotated[bool, typer.Option(
        "--incremental", help="Check only what was appended since the last passing "
        "verification (after checking the record it ended at is unchanged).")] = False,
    json: JsonOpt = False,
) -> None:
    """Check every record's hash, the chain, the head file and the payloads; name the first
    bad line (exit 8). With --expect, also that the log ends at a head kept elsewhere."""
    env = environment(ctx)
    env.json = json
    log = _log(audit_log, sandbox)
    if expect is not None and not (12 <= len(expect) <= 64
                                   and all(c in "0123456789abcdef" for c in expect)):
        from incident_notify.errors import UsageError

        raise UsageError(f"--expect {expect!r} is not a head hash",
                         hint="give the hex hash 'incident-notify audit head' printed "
                         "(12 to 64 characters)")
    since = log.read_checkpoint() if incremental else None
    result = log.verify(expected_head=expect, since=since, workers=None)
    if result.ok and result.checkpoint is not None:
        log.write_checkpoint(result.checkpoint)
    code = int(ExitCode.OK if result.ok else ExitCode.AUDIT_INVALID)
    if json:
        errors = [] if result.ok else [{"message": result.problem,
                                        "line": result.first_bad_line,
                                        "file": str(log.path)}]
        env.emit_json("audit verify", {"path": str(log.path), **result.to_dict(),
                                       "checked": result.checked},
                         exit_code=code, errors=errors)
        raise typer.Exit(code)
    if result.ok:
        head = (result.head or "")[:12]
        fresh = (f"; {result.checked} checked since the last verification"
                 if since is not None else "")
        env.console().print(f"OK: {result.records} records, chain intact (head {head}) "
                            f"in {log.path}{fresh}", markup=False)
    else:
        hint = ("the next append moves the torn bytes to a sidecar file and records it"
                if result.torn_tail else "compare with a backup; do not edit the log")
        env.err_console().print(f"TAMPERED: {log.path}:{result.first_bad_line}: "
                                   f"{result.problem}\n  hint: {hint}", markup=False)
    raise typer.Exit(code)


def spreadsheet_safe(value: Any) -> Any:
    """A CSV cell a spreadsheet will not run: text starting with = + - @ (or a tab or
    carriage return) is prefixed with a single quote (OWASP's CSV-injection advice)."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


@audit_app.command("head")
def head(ctx: typer.Context, audit_log: AuditLogOpt = None, sandbox: RehearsalLogOpt = False,
         json: JsonOpt = False) -> None:
    """Print the log's head (record count and the last record's hash), to keep somewhere
    the log's writer cannot change (a ticket, a chat message); check it later with
    'audit verify --expect HASH'."""
    env = environment(ctx)
    env.json = json
    log = _log(audit_log, sandbox)
    records, digest = log.head()
    if json:
        env.emit_json("audit head", {"path": str(log.path), "records": records,
                                        "head": digest})
        return
    env.console().print(f"{digest} {records} records {log.path}", markup=False,
                           highlight=False)


@audit_app.command("show")
def show(
    ctx: typer.Context,
    audit_log: AuditLogOpt = None, sandbox: RehearsalLogOpt = False,
    incident: IncidentOpt = None, channel: ChannelOpt = None,
    status: StatusOpt = None, event: EventOpt = None, since: SinceOpt = None,
    limit: Annotated[int, typer.Option("--limit", min=0, help="At most this many (the latest).")]
    = 200,
    json: JsonOpt = False,
) -> None:
    """Records as a table (or --json), filtered by incident, channel, status, time."""
    env = environment(ctx)
    from collections import deque

    env.json = json
    records = deque(_filtered(audit_log, sandbox, incident, channel, status, event, since),
                    maxlen=limit)
    if json:
        env.emit_json("audit show", {"records": [r.to_dict() for r in records]})
        return
    from incident_notify.cli.render_results import table

    t = table(env, "seq", "time (UTC)", "incident", "event", "channel", "recipient", "detail")
    for r in records:
        t.add_row(str(r.seq), r.ts[:19].replace("T", " "), r.incident or "", r.event,
                  r.channel or "", escape(r.recipient or ""), escape(_summary(r)[:80]))
    env.console().print(t)


@audit_app.command("export")
def export(
    ctx: typer.Context,
    format: Annotated[str, typer.Option("--format", help="csv or jsonl.")] = "jsonl",
    output_file: Annotated[str, typer.Option("--output", "-o", help="File, or - for stdout.")]
    = "-",
    audit_log: AuditLogOpt = None, sandbox: RehearsalLogOpt = False,
    incident: IncidentOpt = None, channel: ChannelOpt = None,
    status: StatusOpt = None, event: EventOpt = None, since: SinceOpt = None,
    json: Annotated[bool, typer.Option(
        "--json", help="With -o FILE: print one JSON document saying what was exported.")]
    = False,
) -> None:
    """Export records as CSV (flat columns, payload as JSON) or JSON Lines."""
    env = environment(ctx)
    from incident_notify.audit import FIELDS

    env.json = json
    if format not in ("csv", "jsonl"):
        raise UsageError(f"--format {format!r}: expected csv or jsonl")
    if json and output_file == "-":
        raise UsageError("--json needs -o FILE: without it the export itself is what goes "
                         "to stdout", hint="add -o incident.jsonl (or drop --json)")
    records = _filtered(audit_log, sandbox, incident, channel, status, event, since)
    written = 0
    if output_file == "-":
        handle = env.stdout
    else:
        # The record holds phone numbers and addresses: the export is owner-only.
        import os

        fd = os.open(output_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW,
                     0o600)
        os.fchmod(fd, 0o600)
        handle = os.fdopen(fd, "w", newline="", encoding="utf-8")
    try:
        if format == "jsonl":
            for r in records:
                handle.write(jsonlib.dumps(r.to_dict(), ensure_ascii=False) + "\n")
                written += 1
        else:
            writer = csv.writer(handle)
            writer.writerow(FIELDS)
            for r in records:
                row = r.to_dict()
                row["payload"] = jsonlib.dumps(row["payload"], ensure_ascii=False,
                                               sort_keys=True)
                writer.writerow([spreadsheet_safe(row[f]) for f in FIELDS])
                written += 1
    finally:
        if handle is not env.stdout:
            handle.close()
    if json:
        env.emit_json("audit export", {"path": output_file, "format": format,
                                       "records": written})
