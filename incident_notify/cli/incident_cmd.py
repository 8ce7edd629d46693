"""Lifecycle commands: declare, update, resolve, reopen, resume, status, timeline.

Long on purpose: the lifecycle commands share one sending sequence (`_send`: confirmation,
progress, summary, exit code) and its options; apart, that sequence would be copied.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from incident_notify.cli.environment import environment
from incident_notify.cli.main import app
from incident_notify.cli.options import AuditLogOpt, JsonOpt, RehearsalLogOpt
from incident_notify.cli.output import safe as escape
from incident_notify.cli.playbook_cmd import SetOpt, VarsOpt

if TYPE_CHECKING:
    from incident_notify.outcome import SendOutcome
    from incident_notify.runtime import Runtime

YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Send without asking for confirmation.")]
DryRunOpt = Annotated[
    bool, typer.Option("--dry-run", help="Show the plan and messages; record and send nothing.")
]
MessageOpt = Annotated[
    str, typer.Option("--message", "-m", help="Free-text update, rendered through the "
                      "stage's templates as {{ message }}.")
]
SandboxOpt = Annotated[
    bool, typer.Option("--sandbox", envvar="INCIDENT_NOTIFY_SANDBOX",
                       help="Send to the local provider emulators, no credentials needed.")
]
SecretsOpt = Annotated[
    Path | None, typer.Option("--secrets", help="dotenv-style file of credentials.",
                              show_default=False)
]
IncidentArg = Annotated[str, typer.Argument(help="Incident id, e.g. INC-20261122-0001.")]
PlaybookOpt = Annotated[
    Path | None, typer.Option("--playbook", help="Use this playbook file instead of the "
                              "recorded path (if it moved).", show_default=False)
]


@contextmanager
def runtime(audit_log: Path | None, sandbox: bool = False,
            secrets: Path | None = None) -> Iterator[Runtime]:
    from incident_notify.config import load_settings
    from incident_notify.runtime import open_runtime

    settings = load_settings({"audit_log": audit_log, "sandbox": sandbox,
                              "secrets_file": secrets})
    rt = open_runtime(settings)
    try:
        yield rt
    finally:
        rt.close()


@dataclass(frozen=True)
class SendOptions:
    """The options every sending command shares (declared once, in `_SEND_PARAMS`)."""

    yes: bool = False
    dry_run: bool = False
    sandbox: bool = False
    secrets: Path | None = None
    audit_log: Path | None = None
    json: bool = False
    playbook: Path | None = None


def _param(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=annotation)


_SEND_PARAMS = [_param("yes", YesOpt, False), _param("dry_run", DryRunOpt, False),
                _param("sandbox", SandboxOpt, False), _param("secrets", SecretsOpt, None),
                _param("audit_log", AuditLogOpt, None), _param("json", JsonOpt, False)]
_PLAYBOOK_PARAM = _param("playbook", PlaybookOpt, None)


def sending_command(*, recorded_playbook: bool = True) -> Callable[[Callable[..., None]],
                                                                    Callable[..., None]]:
    """Register a sending command: its own parameters, then the shared sending options
    (and --playbook for commands on a recorded incident), handed to it as `send`."""

    def register(fn: Callable[..., None]) -> Callable[..., None]:
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values()
               if p.name != "send"]
        shared = _SEND_PARAMS + ([_PLAYBOOK_PARAM] if recorded_playbook else [])

        def command(**kwargs: Any) -> None:
            options = SendOptions(**{p.name: kwargs.pop(p.name) for p in shared})
            environment(kwargs["ctx"]).json = options.json
            fn(send=options, **kwargs)

        command.__name__, command.__doc__ = fn.__name__, fn.__doc__
        command.__module__ = fn.__module__
        command.__signature__ = inspect.Signature(own + shared)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in own + shared}
        app.command(fn.__name__)(command)
        return fn

    return register


def _send(ctx: typer.Context, command: str, send: SendOptions,
          action: Callable[[Runtime, Any, Any], SendOutcome]) -> None:
    """Run a sending action with confirmation, progress and the summary/exit code."""
    from incident_notify.cli.progress import (
        LiveProgress,
        make_confirm,
        print_outcome,
        print_preflight,
    )

    env = environment(ctx)
    with runtime(send.audit_log, send.sandbox, send.secrets) as rt:
        sandboxed = rt.sandbox is not None
        if sandboxed:
            # Never mistakable for a real send: said first, on stderr, whatever the mode.
            env.err_console().print(
                f"SANDBOX: messages go to the local emulators only, nobody is notified; "
                f"recorded in {rt.settings.audit_path()}", markup=False, highlight=False)
        progress = LiveProgress(env)
        confirm = None if send.dry_run else make_confirm(env, send.yes, progress)
        with progress:
            outcome = action(rt, confirm, progress)
    outcome.sandbox = sandboxed
    if env.json:
        env.emit_json(command, outcome.to_dict(), exit_code=int(outcome.exit_code))
    else:
        if outcome.dry_run and outcome.preflight is not None:
            print_preflight(env, outcome.preflight)
        print_outcome(env, outcome)
    env.reported = True  # (an interrupted send's summary says so)
    raise typer.Exit(int(outcome.exit_code))


def _change(ctx: typer.Context, command: str, send: SendOptions, incident: str,
            sets: list[str] | None, message: str, **extra: Any) -> None:
    """update / resolve / reopen: one lifecycle step of an existing incident."""
    from incident_notify import lifecycle
    from incident_notify.messages import parse_set

    values = parse_set(sets or [])
    step = {"update": lifecycle.update, "resolve": lifecycle.resolve,
            "reopen": lifecycle.reopen}[command]
    _send(ctx, command, send, lambda rt, confirm, progress: step(
        rt, incident, sets=values, message=message, dry_run=send.dry_run, confirm=confirm,
        progress=progress, playbook=send.playbook, **extra))


@sending_command(recorded_playbook=False)
def declare(
    ctx: typer.Context,
    send: SendOptions,
    playbook: Annotated[Path, typer.Argument(help="The incident playbook (YAML).")],
    sets: SetOpt = None,
    vars_file: VarsOpt = None,
    message: MessageOpt = "",
    stage: Annotated[str | None, typer.Option("--stage", help="Start at this stage "
                                              "(default: the playbook's first).")] = None,
) -> None:
    """Open an incident from a playbook and notify everyone its first stage names.

    The incident id (INC-YYYYMMDD-NNNN) is printed; use it with update / resolve.
    Variables come from --set, --vars and INCIDENT_NOTIFY_VAR_<NAME>.
    """
    from incident_notify import lifecycle
    from incident_notify.messages import collect_variables
    from incident_notify.playbook import load_playbook

    pb = load_playbook(playbook)  # once: its variables here, then the declaration
    values = collect_variables(pb, sets or [], vars_file)
    _send(ctx, "declare", send, lambda rt, confirm, progress: lifecycle.declare(
        rt, pb, values, message=message, stage=stage, dry_run=send.dry_run,
        confirm=confirm, progress=progress))


@sending_command()
def update(
    ctx: typer.Context,
    send: SendOptions,
    incident: IncidentArg,
    stage: Annotated[str | None, typer.Option("--stage", help="Move to this stage.")] = None,
    sets: SetOpt = None,
    message: MessageOpt = "",
) -> None:
    """Move an incident to its next stage, or post a free-text update at the same stage.

    Only the transitions the playbook allows are accepted. Tweets continue the
    incident's thread; emails thread by References.
    """
    _change(ctx, "update", send, incident, sets, message, stage=stage)


@sending_command()
def resolve(
    ctx: typer.Context,
    send: SendOptions,
    incident: IncidentArg,
    message: MessageOpt = "",
    sets: SetOpt = None,
) -> None:
    """Close an incident with the playbook's final stage; it then refuses updates."""
    _change(ctx, "resolve", send, incident, sets, message)


@sending_command()
def reopen(
    ctx: typer.Context,
    send: SendOptions,
    incident: IncidentArg,
    stage: Annotated[str | None, typer.Option("--stage", help="Reopen at this stage "
                                              "(default: the first).")] = None,
    message: MessageOpt = "",
    sets: SetOpt = None,
) -> None:
    """Reopen a resolved incident (and notify, as at its first stage)."""
    _change(ctx, "reopen", send, incident, sets, message, stage=stage)


@sending_command()
def resume(
    ctx: typer.Context,
    send: SendOptions,
    incident: IncidentArg,
    include_unknown: Annotated[
        bool, typer.Option("--include-unknown",
                           help="Also re-send deliveries no provider could settle (they may "
                           "have been delivered already; an email keeps its Message-ID).")
    ] = False,
    retry_not_reached: Annotated[
        bool, typer.Option("--retry-not-reached",
                           help="Also send the latest update again to each person it did not "
                           "reach (every channel failed or was down), on their channels in "
                           "order; nobody reached or in doubt is sent anything.")
    ] = False,
) -> None:
    """After a crash or Ctrl-C: settle what is in doubt, then send what has no outcome.

    Each delivery attempted without a recorded answer is first looked up at its provider
    (Twilio's message list, the account's tweets, the DM conversation): found, it is
    recorded sent; absent, it is sent now. What no provider can settle (email) is listed
    by person and channel, and re-sent only with --include-unknown. Once a provider is
    back, --retry-not-reached reaches the people the latest update missed. Shows the same
    preview and confirmation as every sending command.
    """
    from incident_notify.resume import resume as resume_incident

    _send(ctx, "resume", send, lambda rt, confirm, progress: resume_incident(
        rt, incident, include_unknown=include_unknown, dry_run=send.dry_run, confirm=confirm,
        progress=progress, playbook=send.playbook, retry_not_reached=retry_not_reached))


@app.command()
def status(
    ctx: typer.Context,
    incident: Annotated[str | None, typer.Argument(help="One incident (default: all open).")]
    = None,
    all_: Annotated[bool, typer.Option("--all", help="Include resolved incidents.")] = False,
    sandbox: RehearsalLogOpt = False,
    audit_log: AuditLogOpt = None,
    json: JsonOpt = False,
) -> None:
    """Open incidents: stage, age, last update, deliveries per channel, failed over."""
    env = environment(ctx)
    from incident_notify.config import load_settings
    from incident_notify.runtime import open_runtime
    from incident_notify.views import incident_summaries

    env.json = json
    settings = load_settings({"audit_log": audit_log, "sandbox": sandbox})
    # Only the log is read: no emulators are started for it.
    settings.sandbox, reading = False, settings.audit_path()
    settings.audit_log = reading
    rt = open_runtime(settings)
    with contextlib.closing(rt):
        rows = incident_summaries(rt, incident, include_resolved=all_ or incident is not None)
    if json:
        env.emit_json("status", {"incidents": rows})
        return
    con = env.console()
    if not rows:
        con.print("No open incidents." if not incident else f"No incident {incident}.")
        return
    from incident_notify.cli.render_results import table

    # "failed over" counts deliveries, as the summary of a send and the per-channel table
    # below do (a failover event can move many people, or none: those already told).
    t = table(env, "incident", "stage", "status", "age", "last event (UTC)", "updates", "sent",
              "failed", "failed over")
    for column in t.columns:
        column.no_wrap = True
    for r in rows:
        totals = _totals(r["channels"])
        t.add_row(r["id"], r["stage"], r["status"], r["age"],
                  r["last_event_at"][11:19] if r["last_event_at"] else "", str(r["updates"]),
                  str(totals.get("sent", 0)), str(totals.get("failed", 0)),
                  str(totals.get("failed_over", 0)))
    con.print(t)
    if incident:
        r = rows[0]
        con.print(f"{escape(r['title'])} ({r['playbook']}, {r['severity']}), declared "
                  f"{r['declared_at'][:19].replace('T', ' ')} UTC "
                  f"by {escape(r['declared_by'])}")
        per = table(env, "channel", "sent", "failed", "failed over", "skipped", "unknown",
                    "planned", title=f"{incident} deliveries per channel")
        for ch, c in sorted(rows[0]["channels"].items()):
            per.add_row(ch, *(str(c.get(k, 0)) for k in
                              ("sent", "failed", "failed_over", "skipped", "unknown",
                               "planned")))
        con.print(per)
    for r in rows:
        if r["pending"] or r["in_doubt"]:
            con.print(f"[yellow]{r['id']}: {r['pending']} unsent, {r['in_doubt']} unknown — "
                      f"run: incident-notify resume {r['id']}[/]")


@app.command()
def timeline(
    ctx: typer.Context,
    incident: Annotated[str, typer.Argument(help="Incident id.")],
    audit_log: AuditLogOpt = None,
    deliveries: Annotated[bool, typer.Option("--deliveries",
                                             help="List every delivery, not only totals.")]
    = False,
    replies: Annotated[bool, typer.Option(
        "--replies", help="First fetch replies to the incident's public thread and record "
        "them in the audit log.")] = False,
    sandbox: SandboxOpt = False,
    secrets: SecretsOpt = None,
    json: JsonOpt = False,
) -> None:
    """Every event of an incident in order: what was said, on which channel, to whom, and
    (with --replies) what people answered on the public thread."""
    env = environment(ctx)
    from incident_notify.views import timeline_entries

    env.json = json
    with runtime(audit_log, sandbox, secrets) as rt:
        if replies:
            from incident_notify.lifecycle import fetch_replies

            fetch_replies(rt, incident)
        entries = timeline_entries(rt, incident, deliveries=deliveries)
    if json:
        env.emit_json("timeline", {"incident": incident, "events": entries})
        return
    con = env.console()
    for e in entries:
        when = e["ts"][:19].replace("T", " ") + " UTC"
        con.print(f"[dim]{when}[/] [bold]{escape(e['what'])}[/]")
        for line in e.get("lines", []):
            con.print(f"    {escape(line)}")


def _totals(channels: dict[str, dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for counts in channels.values():
        for key, n in counts.items():
            out[key] = out.get(key, 0) + n
    return out
