"""What the commander sees while and after sending: preflight, prompt, progress, summary.

On a terminal: rich progress bars per channel and a summary table. Otherwise (a runbook,
a CI log, NO_COLOR): plain lines, no bars, no colour.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from incident_notify.cli.output import safe as escape
from incident_notify.cli.render_results import print_preview, table
from incident_notify.errors import AbortedError

if TYPE_CHECKING:
    from incident_notify.channels.base import Delivery
    from incident_notify.cli.environment import Environment
    from incident_notify.outcome import Preflight, SendOutcome


def print_preflight(env: Environment, pre: Preflight) -> None:
    from incident_notify.preview import PreviewResult

    con = env.console()
    what = {"incident.declared": "Declare", "incident.updated": "Update",
            "incident.resolved": "Resolve", "incident.reopened": "Reopen",
            "resume": "Resume"}.get(pre.event, "Send")
    provisional = " (id provisional until sent)" if pre.event == "incident.declared" else ""
    con.print(f"[bold]{what} {escape(pre.incident_id)}[/]{provisional} — "
              f"{escape(pre.playbook.model.title)} — stage [bold]{escape(pre.stage)}[/] "
              f"(update {pre.update_no})\n")
    if pre.messages:
        print_preview(env, PreviewResult(str(pre.playbook.path), pre.stage, list(pre.messages)))
    if pre.settled:
        t = table(env, "delivery", "channel", "recipient", "provider says", title="Deliveries in "
                  "doubt, settled with the providers")
        words = {"sent": "arrived (recorded sent)", "not_sent": "never arrived (will send)",
                 "unknowable": "cannot tell"}
        for s in pre.settled:
            t.add_row(escape(s["key"]), escape(s["channel"]), escape(str(s["recipient"] or
                      "public")), escape(words.get(s["outcome"], s["outcome"]) +
                                         (f": {s['detail']}" if s["outcome"] == "unknowable"
                                          else "")))
        con.print(t)
    t = table(env, "channel", "type", "deliveries", "endpoint", "health",
              title="Audience per channel")
    for name, health in sorted(pre.health.items()):
        count = pre.audience_sizes.get(name, 0)
        ctype = pre.playbook.model.channels[name].type
        mark = "[green]healthy[/]" if health.ok else f"[bold red]DOWN[/] {escape(health.detail)}"
        t.add_row(name, ctype, str(count), escape(_host(pre.endpoints.get(name, ""))), mark)
    con.print(t)
    for name in pre.unhealthy:
        fb = pre.playbook.model.channels[name].fallback
        where = f"will fail over to {', '.join(fb)}" if fb else "has no fallback channel"
        env.err_console().print(f"[bold yellow]warning:[/] {escape(name)} is unhealthy "
                                f"and {where}")
    if pre.skips:
        reasons = Counter(s.reason for s in pre.skips)
        for reason, n in reasons.most_common():
            con.print(f"[yellow]skipped {n}:[/] {escape(reason)}")
    parts = []
    if pre.invalid_contacts:
        parts.append(f"{pre.invalid_contacts} invalid contact record(s) not loaded")
    if pre.contact_source_problems:
        parts.append(f"{pre.contact_source_problems} problem(s) in the contact sources")
    if parts:
        con.print(f"[yellow]{'; '.join(parts)}; "
                  "run 'incident-notify contacts check' for details[/]")
    for warning in pre.stats.warnings[:10]:
        env.err_console().print(f"[yellow]warning:[/] {escape(warning)}")


def _host(url: str) -> str:
    """The host (and port) of an endpoint: enough to see where the credentials go."""
    import urllib.parse

    parsed = urllib.parse.urlparse(url)
    return parsed.netloc or url


def make_confirm(env: Environment, yes: bool,
                 progress: LiveProgress | None = None) -> Callable[[Preflight], bool]:
    """The confirmation callback: --yes skips it; no TTY and no --yes refuses."""

    def confirm(pre: Preflight) -> bool:
        total = sum(pre.audience_sizes.values())
        if progress is not None:
            progress.expected = dict(pre.audience_sizes)
        if yes:  # decided already: from here the display cannot stop the send
            env.send_confirmed = True
        if not env.json and not (yes and env.quiet):
            print_preflight(env, pre)
        if yes:
            return True
        if not env.interactive():
            raise AbortedError(
                "refusing to send without confirmation: no terminal to ask on and no --yes",
                hint="a runbook must be explicit: add --yes (preview first with --dry-run)")
        # Ctrl-D (end of input) is no answer, and no answer is a no.
        answer = env.ask(f"Send {total} deliveries on {len(pre.audience_sizes)} "
                         "channel(s)? [y/N] ").strip().lower()
        env.send_confirmed = answer in ("y", "yes")
        return env.send_confirmed

    return confirm


class LiveProgress:
    """Progress callback for the dispatcher; a context manager around the fan-out."""

    def __init__(self, env: Environment, expected: Mapping[str, int] | None = None) -> None:
        self.env = env
        self.enabled = env.live()
        self.expected = dict(expected or {})
        self.counts: dict[str, Counter[str]] = {}
        self._lock = threading.Lock()
        self._progress: Progress | None = None
        self._tasks: dict[str, Any] = {}
        self._announced: set[tuple[str, tuple[str, ...]]] = set()

    def __enter__(self) -> LiveProgress:
        # The bars start with the first delivery, not here: a live display must not
        # repaint over the confirmation prompt.
        return self

    def _start(self) -> None:
        if self.enabled and self._progress is None:
            self._progress = Progress(
                TextColumn("{task.description:<22}"), BarColumn(), TextColumn(
                    "{task.completed}/{task.total} {task.fields[detail]}"),
                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                console=self.env.err_console(), transient=False)
            self._progress.start()
            for name, total in sorted(self.expected.items()):
                self._task(name, total)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()

    def _task(self, channel: str, total: int | None = None) -> Any:
        if self._progress is None:
            return None
        if channel not in self._tasks:
            self._tasks[channel] = self._progress.add_task(
                channel, total=total or self.expected.get(channel) or 0, detail="", rate="")
        return self._tasks[channel]

    def __call__(self, kind: str, delivery: Delivery, info: Mapping[str, Any]) -> None:
        channel = delivery.channel
        with self._lock:
            self._start()
        if kind in ("circuit_open", "circuit_closed", "failover", "retry", "stopping",
                    "warning"):
            self._notice(kind, channel, info)
        if kind not in ("sent", "failed", "failed_over", "unknown", "skipped"):
            return
        with self._lock:
            c = self.counts.setdefault(channel, Counter())
            c[kind] += 1
            if self._progress is not None:
                task = self._task(channel)
                total = self._progress.tasks[task].total or 0
                done = sum(c.values())
                detail = " ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(c.items()))
                elapsed = self._progress.tasks[task].elapsed or 0.0
                rate = f"{done / elapsed:.0f}/s" if elapsed > 0.5 else ""
                self._progress.update(task, completed=done, total=max(total, done),
                                      detail=detail, rate=rate)

    def _notice(self, kind: str, channel: str, info: Mapping[str, Any]) -> None:
        if self.env.quiet and kind == "retry":
            return
        if kind == "retry":
            if self._progress is None and not self.env.json:
                return  # plain output: retries are summarised, not streamed
            text = f"[dim]{escape(channel)}: retrying ({escape(str(info.get('error', '')))})[/]"
        elif kind == "circuit_open":
            text = (f"[bold yellow]warning:[/] channel {escape(channel)} is down "
                    f"({escape(str(info.get('reason', '')))}); failing over")
        elif kind == "circuit_closed":
            text = f"[green]channel {escape(channel)} recovered[/]"
        elif kind == "warning":
            text = (f"[bold yellow]warning:[/] {escape(channel)}: "
                    f"{escape(str(info.get('reason', '')))}")
        elif kind == "stopping":
            text = ("[bold yellow]stopping:[/] nothing new is sent; waiting for the "
                    "requests in flight to be answered and recorded (Ctrl-C again to leave "
                    "them in doubt, for resume to settle)")
        else:
            targets = tuple(info.get("to", []))
            with self._lock:
                if (channel, targets) in self._announced:
                    return  # once per channel pair; the summary has the counts
                self._announced.add((channel, targets))
            to = ", ".join(targets) or "channels the recipients already get"
            text = (f"[yellow]failover:[/] {escape(channel)} → {escape(to)} "
                    f"({escape(str(info.get('reason', '')))})")
        if self._progress is not None:
            self._progress.console.print(text)
        else:
            self.env.err_console().print(text)  # diagnostics go to stderr, results to stdout


def print_outcome(env: Environment, outcome: SendOutcome) -> None:
    con = env.console()
    if outcome.dry_run:
        con.print("[bold]Dry run:[/] nothing was recorded or sent.")
        return
    r, v = outcome.result, outcome.verdict
    if r is None:
        return
    title = f"{outcome.incident_id} update {outcome.update_no} ({outcome.stage})"
    if v is not None and v.channels:
        t = table(env, "channel", "sent", "failed", "failed over", "skipped", "unknown",
                  "unsent",
                  title=title)
        for ch, c in sorted(v.channels.items()):
            t.add_row(ch, *(str(c.get(k, 0)) for k in
                            ("sent", "failed", "failed_over", "skipped", "unknown",
                             "planned")))
        con.print(t)
    failures = (v.not_reached + v.in_doubt) if v is not None else []
    for f in failures[:20]:
        label = "not reached" if f.status == "not_reached" else "in doubt"
        tried = "; ".join(f"{t['channel']} → {t['recipient']}: {t['outcome']}"
                          + (f" ({t['error']})" if t.get("error") else "") for t in f.tried)
        con.print(f"[red]{label}:[/] {escape(f.who)}: {escape(tried)}")
    if len(failures) > 20:
        con.print(f"... and {len(failures) - 20} more (--json lists them all; "
                  f"incident-notify status {outcome.incident_id})")
    n = len(outcome.in_doubt)
    doubtful = f"{n} deliver{'y' if n == 1 else 'ies'}"
    if outcome.in_doubt:
        resumed = outcome.preflight is not None and outcome.preflight.event == "resume"
        if resumed:  # the providers were asked, and could not say
            con.print(f"[yellow]{doubtful} may have arrived and no provider record "
                      f"settles it; resend only with: incident-notify resume "
                      f"{outcome.incident_id} --include-unknown[/]")
        else:
            con.print(f"[yellow]{doubtful} may have arrived (the answer was lost): "
                      f"incident-notify resume {outcome.incident_id} asks the providers "
                      "that keep a record (SMS, Twitter) and records what they say; what "
                      "none can settle (email) is re-sent only with --include-unknown[/]")
    people = v.to_dict()["people"] if v is not None else {}
    if r.fatal:
        fix = ("make room for the audit log (or fix its permissions); nothing was sent that "
               "is not recorded" if r.fatal_kind == "audit" else "the rest is recorded as "
               "planned")
        con.print(f"[bold red]stopped:[/] {escape(r.fatal)}; {fix}; then send the rest "
                  f"with: incident-notify resume {outcome.incident_id}")
    elif r.interrupted:
        con.print(f"[bold yellow]interrupted:[/] the rest is recorded as planned; send it "
                  f"with: incident-notify resume {outcome.incident_id}")
    elif int(outcome.exit_code) == 0:
        con.print(f"[bold green]Everyone was reached:[/] {people.get('reached', 0)} "
                  f"recipient(s), {v.total('sent') if v else 0} sent, {r.elapsed_s:.1f}s.")
    elif people.get("reached", 0) == people.get("intended", 0):
        # (Exit 5: each person was reached on some channel, but a delivery is in doubt.)
        con.print(f"[bold yellow]Everyone was reached, with deliveries in doubt:[/] "
                  f"{people.get('reached', 0)} recipient(s), {doubtful} in doubt (above).")
    else:
        con.print(f"[bold yellow]Not everyone was reached:[/] {people.get('reached', 0)} of "
                  f"{people.get('intended', 0)} recipient(s) reached, "
                  f"{people.get('not_reached', 0)} not reached, "
                  f"{people.get('in_doubt', 0)} in doubt.")
