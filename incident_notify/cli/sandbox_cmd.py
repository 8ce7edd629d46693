"""`sandbox` (run the local emulators, steer their faults) and `channels check`.

Long on purpose: `sandbox fault` has one option per emulator fault, so that a commander
rehearses any of them from the command line; split, the options would part from the one
place that turns them into the control API's JSON.
"""

from __future__ import annotations

import json as jsonlib
import signal
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from incident_notify.cli.environment import environment
from incident_notify.cli.main import app
from incident_notify.cli.options import JsonOpt
from incident_notify.cli.output import safe as escape
from incident_notify.errors import ConfigError, UsageError
from incident_notify.exit_codes import ExitCode

sandbox_app = typer.Typer(
    help="Run local Twitter, Twilio and SMTP emulators (no credentials, no internet).",
    invoke_without_command=True,
)
app.add_typer(sandbox_app, name="sandbox")
channels_app = typer.Typer(help="Check the channels a playbook uses.", no_args_is_help=True)
app.add_typer(channels_app, name="channels")

SERVICES = ("twitter", "twilio", "smtp")


@sandbox_app.callback()
def sandbox_main(
    ctx: typer.Context,
    twitter_port: Annotated[int, typer.Option(help="Port of the Twitter API emulator.")] = 0,
    twilio_port: Annotated[int, typer.Option(help="Port of the Twilio API emulator.")] = 0,
    smtp_port: Annotated[int, typer.Option(help="Port of the SMTP emulator.")] = 0,
    control_port: Annotated[int, typer.Option(help="Port of the control API.")] = 0,
    outage: Annotated[list[str] | None, typer.Option(
        "--outage", help="Start with this service down (repeatable).", show_default=False)]
    = None,
    json: JsonOpt = False,
) -> None:
    """Start all three emulators and print the environment to export; Ctrl-C stops them.

    While it runs, --sandbox on any other command uses it, and
    'incident-notify sandbox fault twitter --outage' switches faults on and off.
    """
    if ctx.invoked_subcommand is not None:
        return
    from incident_notify.sandbox import Sandbox
    from incident_notify.sandbox.control import ControlServer

    sb = Sandbox(twitter_port=twitter_port, twilio_port=twilio_port, smtp_port=smtp_port)
    sb.start()
    control = ControlServer(sb, control_port).start()
    for name in outage or []:
        if name not in SERVICES:
            raise UsageError(f"--outage {name!r}: expected one of {', '.join(SERVICES)}")
        sb.emulators[name].faults.update(outage=True)
    exports = {**sb.env(), "INCIDENT_NOTIFY_SANDBOX_CONTROL": control.url}
    path = sb.write_state(control_url=control.url)
    env = environment(ctx)
    env.json = json
    con = env.console()
    if json:
        # One document announcing the environment; the sandbox then runs until stopped.
        env.emit_json("sandbox", {"env": exports, "state_file": str(path)})
    else:
        con.print("# incident-notify sandbox is running (Ctrl-C to stop). To use it from "
                  "a shell:", markup=False)
        for key, value in exports.items():
            con.print(f"export {key}={value}", markup=False)
        con.print("# or simply pass --sandbox to any incident-notify command.", markup=False)
    stop = {"now": False}

    def _stop(*_: Any) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, _stop)
    try:
        while not stop["now"]:
            # Short sleeps, not signal.pause(): a signal the kernel hands another thread
            # (the emulators') would not wake a paused main thread, which alone runs the
            # handlers.
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        control.stop()
        sb.stop()
        try:
            path.unlink()
        except OSError:
            pass
        if not json:
            con.print("sandbox stopped.")


def _control() -> tuple[str, str]:
    from incident_notify.sandbox import state_file

    try:
        data = jsonlib.loads(state_file().read_text())
        return (str(data["env"]["INCIDENT_NOTIFY_SANDBOX_CONTROL"]),
                str(data["env"].get("INCIDENT_NOTIFY_SANDBOX_TOKEN", "")))
    except (OSError, ValueError, KeyError):
        raise ConfigError("no running sandbox found",
                          hint="start one in another terminal: incident-notify sandbox") from None


def _call(method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    import urllib.request  # (here: a seventh of every command's start-up otherwise)

    url, token = _control()
    req = urllib.request.Request(url + path, method=method,
                                 data=jsonlib.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return jsonlib.loads(resp.read())
    except OSError as exc:
        raise ConfigError(f"the sandbox control API did not answer: {exc}",
                          hint="is 'incident-notify sandbox' still running?") from None


@sandbox_app.command("fault")
def fault(
    ctx: typer.Context,
    service: Annotated[str, typer.Argument(help="twitter, twilio or smtp.")],
    outage: Annotated[bool | None, typer.Option("--outage/--no-outage",
                                                help="Switch a full outage on or off.")] = None,
    latency_ms: Annotated[float | None, typer.Option(
        min=0, help="Added latency per request.")] = None,
    rate_limit: Annotated[int | None, typer.Option(
        min=0, help="Requests per window before 429; 0 removes the limit.")] = None,
    rate_window_s: Annotated[float | None, typer.Option(
        min=0.001, help="Length of the rate-limit window, so how far away the 429's reset "
        "is (900 when not set).")] = None,
    rate_limited_path: Annotated[list[str] | None, typer.Option(
        help="twitter and twilio: the rate limit applies only to paths starting so, e.g. "
        "/2/users/me (repeatable; else to every request, Twilio's sends).",
        show_default=False)] = None,
    fail_next: Annotated[int | None, typer.Option(
        min=0, help="Fail the next N requests.")] = None,
    bad_recipient: Annotated[list[str] | None, typer.Option(
        help="A recipient to reject as invalid (repeatable).", show_default=False)] = None,
    bad_recipient_code: Annotated[int | None, typer.Option(
        min=20000, max=99999, help="twilio: the error code --bad-recipient is refused with "
        "(21211 when not set; 21219: a trial account's unverified number).")] = None,
    bad_sender: Annotated[list[str] | None, typer.Option(
        help="twilio and smtp: a From number or address to refuse (repeatable).",
        show_default=False)] = None,
    failed_recipient: Annotated[list[str] | None, typer.Option(
        help="A recipient whose messages are refused once sent (twilio: taken as "
        "failed; smtp: 554 after the data; repeatable).",
        show_default=False)] = None,
    no_extension: Annotated[list[str] | None, typer.Option(
        help="smtp: an extension to leave out of EHLO, e.g. AUTH or SMTPUTF8 (repeatable).",
        show_default=False)] = None,
    send_latency_ms: Annotated[float | None, typer.Option(
        min=0, help="Added latency per send only (health checks answer at once).")] = None,
    outage_after: Annotated[int | None, typer.Option(
        min=0, help="An outage starts after N more accepted messages (a thread cut "
        "mid-way).")] = None,
    drop_after_accept: Annotated[int | None, typer.Option(
        min=0, help="Accept the next N messages, then drop the connection "
        "unanswered.")] = None,
    garble_after_accept: Annotated[int | None, typer.Option(
        min=0, help="Accept the next N messages, then answer with an HTML page (SMTP: "
        "a reply with no code).")] = None,
    idless_after_accept: Annotated[int | None, typer.Option(
        min=0, help="twitter and twilio: accept the next N messages, then answer without "
        "the message's id.")] = None,
    error_after_accept: Annotated[int | None, typer.Option(
        min=0, help="twitter and twilio: accept the next N messages, then answer with "
        "--error-status.")] = None,
    error_status: Annotated[int | None, typer.Option(
        min=500, max=599, help="The server error --error-after-accept answers with (500 "
        "when not set).")] = None,
    dribble_ms: Annotated[float | None, typer.Option(
        min=0, help="Accept each message, then answer a byte at a time, this far apart; "
        "0 stops it.")] = None,
    clock_skew_s: Annotated[float | None, typer.Option(
        help="twitter and twilio: the provider's clock runs this far ahead (negative: "
        "behind) of this machine's, in its Date header, creation times and rate-limit "
        "resets; 0 stops it.")] = None,
    messages_per_connection: Annotated[int | None, typer.Option(
        min=0, help="smtp: after N messages on one connection, answer the next MAIL 421 "
        "and hang up (a server's per-connection limit); 0 removes it.")] = None,
    deferred_recipient: Annotated[list[str] | None, typer.Option(
        help="smtp: a recipient whose server defers mail (RCPT 450, greylisted; "
        "repeatable).", show_default=False)] = None,
    full_mailbox: Annotated[list[str] | None, typer.Option(
        help="smtp: a recipient whose mailbox is full (452 4.2.2 to the message; "
        "repeatable).", show_default=False)] = None,
    throttled_connections: Annotated[int | None, typer.Option(
        min=0, help="smtp: greet the next N connections 421 4.7.0 (try again later).")
    ] = None,
    busy_logins: Annotated[int | None, typer.Option(
        min=0, help="smtp: answer the next N AUTH commands 454 (too many login attempts, "
        "try again later).")] = None,
    unknown_command: Annotated[list[str] | None, typer.Option(
        help="smtp: a command answered 502 (not implemented), as an old or minimal server: "
        "EHLO (HELO only, no extensions), NOOP, RSET (repeatable).",
        show_default=False)] = None,
    sender_queue_full: Annotated[bool | None, typer.Option(
        "--sender-queue-full/--no-sender-queue-full", help="twilio: the From number's "
        "queue is full (21611): every send refused.")] = None,
    account_status: Annotated[str | None, typer.Option(
        help="twilio: the account's status in its lookup (the health check): suspended, "
        "closed, active; '' leaves it out.", show_default=False)] = None,
    daily_limit: Annotated[int | None, typer.Option(
        min=-1, help="twitter: posts (tweets and DMs) allowed in 24 hours; past it, 429 with "
        "the daily cap's reset hours away; -1 removes the cap.")] = None,
    no_dm_permission: Annotated[bool | None, typer.Option(
        "--no-dm-permission/--dm-permission", help="twitter: the app may post but not send "
        "DMs (403, problem oauth1-permissions).")] = None,
    locked: Annotated[bool | None, typer.Option(
        "--locked/--no-locked", help="twitter: lock the account (its posts and DMs are "
        "refused, 403 code 326; reads still answer).")] = None,
    json: JsonOpt = False,
) -> None:
    """Change the faults of a running sandbox's emulator."""
    env = environment(ctx)
    if service not in SERVICES:
        raise UsageError(f"unknown service {service!r}", hint=f"one of {', '.join(SERVICES)}")
    for wanted, fault, where, why, hint in (
            (locked, "--locked", ("twitter",), "a Twitter fault: a locked X account",
             "use it with twitter; --bad-sender refuses a Twilio number or an SMTP sender"),
            (unknown_command, "--unknown-command", ("smtp",), "an SMTP fault: commands a "
             "server does not know", "use it with smtp"),
            (busy_logins, "--busy-logins", ("smtp",), "an SMTP fault: logins refused for now",
             "use it with smtp"),
            (deferred_recipient, "--deferred-recipient", ("smtp",),
             "an SMTP fault: a greylisting server", "use it with smtp"),
            (full_mailbox, "--full-mailbox", ("smtp",), "an SMTP fault: a full mailbox",
             "use it with smtp"),
            (throttled_connections, "--throttled-connections", ("smtp",),
             "an SMTP fault: a server throttling new connections", "use it with smtp"),
            (sender_queue_full, "--sender-queue-full", ("twilio",),
             "a Twilio fault: a sender's full queue", "use it with twilio"),
            (account_status is not None, "--account-status", ("twilio",),
             "a Twilio fault: the account's status", "use it with twilio"),
            (no_dm_permission, "--no-dm-permission", ("twitter",),
             "a Twitter fault: an app not allowed DMs", "use it with twitter"),
            (daily_limit is not None, "--daily-limit", ("twitter",),
             "a Twitter fault: X's daily cap on an account's posts", "use it with twitter"),
            (messages_per_connection, "--messages-per-connection", ("smtp",),
             "an SMTP fault: a mail server's limit per connection", "use it with smtp"),
            (error_after_accept, "--error-after-accept", ("twitter", "twilio"),
             "an HTTP fault: an SMTP server's refusal after the data is --fail-next (451)",
             "use it with twitter or twilio"),
            (idless_after_accept, "--idless-after-accept", ("twitter", "twilio"),
             "an HTTP fault: an SMTP server's answer to the data names no message (the id "
             "is ours)", "use it with twitter or twilio")):
        if wanted and service not in where:
            raise UsageError(f"{fault} is {why}", hint=hint)
    options = dict(locals())
    body: dict[str, Any] = {k: options[k] for k in (
        "outage", "locked", "latency_ms", "rate_window_s", "fail_next", "send_latency_ms",
        "outage_after", "drop_after_accept", "garble_after_accept", "dribble_ms",
        "error_after_accept", "error_status", "clock_skew_s", "idless_after_accept",
        "bad_recipient_code", "messages_per_connection", "daily_limit", "sender_queue_full",
        "busy_logins", "no_dm_permission", "throttled_connections", "account_status")
        if options[k] is not None}
    if rate_limit is not None:
        body["rate_limit"] = rate_limit or None
    if daily_limit == -1:  # (0 is a spent cap: nothing allowed)
        body["daily_limit"] = None
    for name, given in (("bad_recipients", bad_recipient), ("bad_senders", bad_sender),
                        ("rate_limited_paths", rate_limited_path),
                        ("failed_recipients", failed_recipient),
                        ("no_extensions", no_extension),
                        ("deferred_recipients", deferred_recipient),
                        ("full_mailboxes", full_mailbox),
                        ("unknown_commands", unknown_command)):
        if given:
            body[name] = list(given)
    result = _call("POST", f"/{service}/faults", body)
    if json:
        env.emit_json("sandbox fault", {"service": service, "faults": result})
    else:
        active = {k: v for k, v in result.items()
                  if (v != "active" if k == "account_status"
                      else v is not None if k == "daily_limit" else v)
                  and (k != "rate_window_s" or result.get("rate_limit") is not None)
                  and (k != "error_status" or result.get("error_after_accept"))
                  and (k != "bad_recipient_code" or result.get("bad_recipients"))}
        def shown(v: Any) -> str:
            return "on" if v is True else " ".join(map(str, v)) if isinstance(v, list) \
                else str(v) or "left out"

        env.console().print(f"{service}: " + (", ".join(
            f"{k.replace('_', ' ')} {shown(v)}" for k, v in active.items())
            or "no faults"), markup=False)


@sandbox_app.command("received")
def received(
    ctx: typer.Context,
    service: Annotated[str, typer.Argument(help="twitter, twilio or smtp.")],
    json: JsonOpt = False,
) -> None:
    """List what a running sandbox's emulator has received."""
    env = environment(ctx)
    if service not in SERVICES:
        raise UsageError(f"unknown service {service!r}", hint=f"one of {', '.join(SERVICES)}")
    items = _call("GET", f"/{service}/received")["received"]
    if json:
        env.emit_json("sandbox received", {"service": service, "received": items})
        return
    for item in items:
        env.console().print(jsonlib.dumps(item, ensure_ascii=False), markup=False)


@sandbox_app.command("reply")
def reply(
    ctx: typer.Context,
    tweet_id: Annotated[str, typer.Argument(help="The tweet being replied to.")],
    username: Annotated[str, typer.Option("--from", help="Who replies (a handle).")],
    text: Annotated[str, typer.Option("--text", help="The reply.")],
    json: JsonOpt = False,
) -> None:
    """Post a reply to one of the account's tweets, as a customer would (rehearsals)."""
    env = environment(ctx)
    result = _call("POST", "/twitter/reply", {"in_reply_to": tweet_id,
                                              "username": username.lstrip("@"), "text": text})
    if json:
        env.emit_json("sandbox reply", result)
    else:
        env.console().print(f"reply {result['id']} posted.", markup=False)


@sandbox_app.command("delete-tweet")
def delete_tweet(
    ctx: typer.Context,
    tweet_id: Annotated[str, typer.Argument(help="The tweet that vanishes.")],
    json: JsonOpt = False,
) -> None:
    """Delete one of the account's tweets, as a moderator or Twitter would (rehearsals: the
    next update cannot reply to it)."""
    env = environment(ctx)
    result = _call("POST", "/twitter/delete", {"id": tweet_id})
    if not result.get("deleted"):
        from incident_notify.errors import NotFoundError

        raise NotFoundError(f"the sandbox's Twitter has no tweet {tweet_id}",
                            hint="incident-notify sandbox received twitter lists its tweets")
    if json:
        env.emit_json("sandbox delete-tweet", result)
    else:
        env.console().print(f"tweet {result['id']} deleted.", markup=False)


@channels_app.command("check")
def check(
    ctx: typer.Context,
    playbooks: Annotated[list[Path] | None, typer.Argument(
        help="Playbooks whose channels to check (default: playbooks/).", show_default=False)]
    = None,
    sandbox: Annotated[bool, typer.Option("--sandbox", envvar="INCIDENT_NOTIFY_SANDBOX",
                                          help="Check against the local emulators.")] = False,
    secrets: Annotated[Path | None, typer.Option("--secrets", help="dotenv-style file of "
                                                 "credentials.", show_default=False)] = None,
    json: JsonOpt = False,
) -> None:
    """Verify credentials and reachability of every channel (nothing is sent).

    Twitter: GET /2/users/me; Twilio: the account; SMTP: EHLO and login. Exits 7 when a
    required channel is down.
    """
    env = environment(ctx)
    from incident_notify.channel_setup import build_channels, check_health
    from incident_notify.config import load_settings
    from incident_notify.playbook import find_playbooks, load_playbook
    from incident_notify.runtime import open_runtime

    env.json = json
    settings = load_settings({"sandbox": sandbox, "secrets_file": secrets})
    rt = open_runtime(settings)
    rows: list[dict[str, Any]] = []
    try:
        for path in find_playbooks(playbooks or [settings.playbooks_dir]):
            pb = load_playbook(path)
            health = check_health(build_channels(rt, pb, list(pb.model.channels)),
                                  retry_after_s=rt.health_retry_s)
            for name, h in health.items():
                rows.append({"playbook": pb.name, "channel": name,
                             "type": pb.model.channels[name].type,
                             "required": pb.model.channels[name].required, "ok": h.ok,
                             "detail": h.detail, "latency_ms": h.latency_ms})
    finally:
        rt.close()
    down = [r for r in rows if r["required"] and not r["ok"]]
    code = int(ExitCode.CHANNEL_UNHEALTHY if down else ExitCode.OK)
    if json:
        env.emit_json("channels check", {"channels": rows}, exit_code=code)
        raise typer.Exit(code)
    from incident_notify.cli.render_results import table

    t = table(env, "playbook", "channel", "type", "status", "detail", "latency")
    for r in rows:
        status = "[green]healthy[/]" if r["ok"] else "[bold red]DOWN[/]"
        latency = f"{r['latency_ms']:.0f} ms" if r["latency_ms"] is not None else ""
        t.add_row(r["playbook"], r["channel"], r["type"], status, escape(r["detail"]), latency)
    env.console().print(t)
    if down:
        env.console().print(f"[bold red]{len(down)} required channel(s) down.[/]")
    raise typer.Exit(code)
