"""`drill`: rehearse a whole incident against the local emulators."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated

import typer

from incident_notify.cli.environment import environment
from incident_notify.cli.main import app
from incident_notify.cli.options import JsonOpt
from incident_notify.cli.output import safe as escape
from incident_notify.cli.playbook_cmd import SetOpt, VarsOpt


@app.command()
def drill(
    ctx: typer.Context,
    playbook: Annotated[
        Path, typer.Argument(help="Playbook to rehearse.")
    ] = Path("playbooks/dc-power-failure.yaml"),
    sets: SetOpt = None,
    vars_file: VarsOpt = None,
    outage: Annotated[
        list[str] | None,
        typer.Option("--outage", help="Start with this provider down: twitter, twilio or "
                     "smtp (repeatable), to rehearse failover.", show_default=False),
    ] = None,
    audit_log: Annotated[
        Path | None, typer.Option("--audit-log", help="Keep the drill's audit log here "
                                  "(default: a new temporary directory).", show_default=False)
    ] = None,
    json: JsonOpt = False,
) -> None:
    """Run a whole incident (declare, every stage, resolve) against the sandbox emulators.

    Nothing leaves this machine: Twitter, Twilio and SMTP are local emulators driven by
    the real clients. Prints what each recipient received and how long it took.
    """
    env = environment(ctx)
    from incident_notify.cli.progress import LiveProgress, print_outcome
    from incident_notify.drill import run_drill
    from incident_notify.errors import UsageError
    from incident_notify.messages import parse_set

    env.json = json
    for name in outage or []:
        if name not in ("twitter", "twilio", "smtp"):
            raise UsageError(f"--outage {name!r}: expected twitter, twilio or smtp")
    values = parse_set(sets or [])
    if vars_file is not None:
        from incident_notify.messages import collect_variables
        from incident_notify.playbook import load_playbook

        values = {**collect_variables(load_playbook(playbook), [], vars_file), **values}
    with LiveProgress(env) as progress:
        report = run_drill(playbook, values, audit_log=audit_log, outage=outage,
                           progress=progress)
    code = next((int(s.outcome.exit_code) for s in report.steps if s.outcome.exit_code), 0)
    if json:
        env.emit_json("drill", report.to_dict(), exit_code=code)
        raise typer.Exit(code)
    con = env.console()
    for step in report.steps:
        print_outcome(env, step.outcome)
        con.print(f"[dim]{step.stage}: command to last delivery {step.elapsed_s:.2f}s[/]\n")
    from incident_notify.cli.render_results import table

    t = table(env, "recipient", "groups / tags", "received", title="What each recipient received")
    for person in report.recipients:
        got = Counter(r["channel"] for r in person["received"])
        t.add_row(escape(person["name"]), escape(", ".join(person["groups"] + person["tags"])),
                  ", ".join(f"{n} {ch}" for ch, n in sorted(got.items())))
    con.print(t)
    if report.public:
        con.print(f"[bold]Public timeline[/] ({len(report.public)} tweets, one thread):")
        for tweet in report.public:
            reply = f" ↳ reply to {tweet['in_reply_to']}" if tweet.get("in_reply_to") else ""
            con.print(f"  [dim]{tweet['id']}{reply}[/]\n    {escape(str(tweet['text']))}")
    con.print(f"\nDrill {report.incident_id}: {len(report.steps)} updates in "
              f"{report.total_s:.2f}s; audit log: {report.audit_log}")
    con.print("[bold green]Drill passed.[/]" if report.ok else "[bold red]Drill found problems.[/]")
    raise typer.Exit(code)
