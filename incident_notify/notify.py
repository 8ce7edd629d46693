"""The lifecycle operations behind declare / update / resolve / reopen / resume.

Each sending operation runs the same steps:

1. load the playbook, contacts and opt-outs; fold the incident's state from the log;
2. plan and render everything up front (template or limit errors stop here, before
   anything is written or sent), check the health of every channel involved;
3. show the commander a `Preflight` and ask for confirmation (the CLI's callback);
4. append the lifecycle event, the rendered messages, every planned delivery and an
   ``update.planned`` marker to the audit log;
5. dispatch the pending deliveries read back from the log (so a first run and a resume
   are the same code), then append ``update.completed`` with the summary.
"""

from __future__ import annotations

import fcntl
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from incident_notify.channels.base import Channel, Delivery, Health, OutgoingMessage
from incident_notify.dispatch import Dispatcher, DispatchResult, Planned, ProgressFn
from incident_notify.errors import AbortedError, NotFoundError, StateError, UsageError
from incident_notify.exit_codes import ExitCode
from incident_notify.incident import DeliveryState, IncidentState, apply, fold
from incident_notify.messages import IncidentContext, RenderedMessage, make_renderer
from incident_notify.plan import Planner, PlanStats, Skip
from incident_notify.playbook import Playbook, channels_with_fallbacks, load_playbook
from incident_notify.runtime import (
    Runtime,
    build_channels,
    check_health,
)
from incident_notify.verdict import Verdict, verdict


# ----------------------------------------------------------------------- results
@dataclass
class Preflight:
    incident_id: str
    playbook: Playbook
    stage: str
    update_no: int
    event: str
    messages: list[RenderedMessage]
    audience_sizes: dict[str, int]
    """channel -> planned deliveries."""
    health: dict[str, Health]
    stats: PlanStats
    skips: list[Skip]
    invalid_contacts: int = 0
    """Contact records left out as invalid."""
    contact_source_problems: int = 0
    """Other problems in the contact sources (an ignored column, a missing file)."""
    settled: list[dict[str, Any]] = field(default_factory=list)
    """`resume`: what the providers said of each delivery in doubt."""
    endpoints: dict[str, str] = field(default_factory=dict)
    """channel -> where its requests (and credentials) go."""

    @property
    def unhealthy(self) -> list[str]:
        return [name for name, h in self.health.items() if not h.ok]

    def to_dict(self) -> dict[str, Any]:
        from incident_notify.preview import message_to_dict

        return {
            "incident": self.incident_id, "playbook": self.playbook.name,
            "stage": self.stage, "update_no": self.update_no, "event": self.event,
            "messages": [message_to_dict(m) for m in self.messages],
            "deliveries_per_channel": self.audience_sizes,
            "health": {n: {"ok": h.ok, "detail": h.detail} for n, h in self.health.items()},
            "skipped": [{"contact": s.contact_id, "channel": s.channel, "reason": s.reason}
                        for s in self.skips],
            "warnings": self.stats.warnings,
            "invalid_contacts": self.invalid_contacts,
            "contact_source_problems": self.contact_source_problems,
            "settled": self.settled,
            "endpoints": self.endpoints,
        }


@dataclass
class SendOutcome:
    incident_id: str
    stage: str
    update_no: int
    dry_run: bool
    preflight: Preflight | None
    result: DispatchResult | None
    verdict: Verdict | None = None
    """Who was reached, from the record (None for a dry run or nothing to do)."""
    in_doubt: list[dict[str, Any]] = field(default_factory=list)
    """Deliveries still unknown after settling with the providers: key, channel, recipient,
    contact, attempts."""
    sandbox: bool = False
    """Sent to the local emulators: a rehearsal, not a notification."""

    @property
    def exit_code(self) -> ExitCode:
        r = self.result
        if r is None:
            return ExitCode.OK
        if r.fatal:
            return ExitCode.AUDIT_INVALID if r.fatal_kind == "audit" else ExitCode.ERROR
        if r.interrupted:
            return ExitCode.INTERRUPTED
        v = self.verdict
        if v is None or (v.complete and not self.in_doubt):
            return ExitCode.OK
        if v.count("reached") == 0 and v.count("not_reached") > 0:
            return ExitCode.DELIVERY_FAILED
        return ExitCode.PARTIAL_DELIVERY

    def result_dict(self) -> dict[str, Any] | None:
        r, v = self.result, self.verdict
        if r is None:
            return None
        body = v.to_dict() if v is not None else {}
        failures = [x.to_dict() for x in (v.not_reached + v.in_doubt if v else [])]
        return {
            "channels": body.get("channels", {}), "totals": body.get("totals", {}),
            "people": body.get("people", {}), "failures": failures[:500],
            "failovers": r.failovers, "interrupted": r.interrupted, "fatal": r.fatal,
            "complete": self.exit_code == ExitCode.OK, "elapsed_s": round(r.elapsed_s, 3),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "incident": self.incident_id, "stage": self.stage, "update_no": self.update_no,
            "dry_run": self.dry_run,
            "preflight": self.preflight.to_dict() if self.preflight else None,
            "result": self.result_dict(),
            "in_doubt": self.in_doubt,
            "sandbox": self.sandbox,
        }


ConfirmFn = Callable[[Preflight], bool]
HEALTH_MAX_AGE_S = 30.0
"""A preflight health check older than this (a slow answer at the prompt) is redone."""


# ----------------------------------------------------------------------- helpers
def load_state(rt: Runtime, incident_id: str) -> IncidentState:
    state = fold(rt.audit.records(incident=incident_id), incident_id)
    if not state.updates:
        raise NotFoundError(f"no incident {incident_id!r} in {rt.settings.audit_path()}",
                            hint="run 'incident-notify status' to list incidents, or pass "
                            "--audit-log if it was recorded elsewhere")
    return state


def playbook_of(state: IncidentState, override: Path | None = None) -> Playbook:
    path = override or Path(state.playbook)
    if not path.exists():
        raise NotFoundError(f"the playbook of {state.id} ({path}) is not there any more",
                            hint="pass --playbook PATH to use its current location")
    return load_playbook(path)


def load_contact_set(rt: Runtime, pb: Playbook) -> Any:
    from incident_notify.contacts import load_contacts

    paths = [*pb.contact_paths(), *rt.settings.contacts]
    return load_contacts(paths, default_region=rt.settings.default_region)


def optout_store(rt: Runtime) -> Any:
    from incident_notify.optouts import OptOutStore

    return OptOutStore(rt.settings.optouts_path(), rt.settings.default_region)


def _lock(path: Path) -> Any:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    handle = open(path, "a+")  # noqa: SIM115 - held for the duration of the declare
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def next_incident_id(rt: Runtime, today: datetime | None = None) -> str:
    """The next free INC-YYYYMMDD-NNNN. Final only when read under `lifecycle_lock`."""
    day = (today or datetime.now(UTC)).strftime("%Y%m%d")
    prefix = f"INC-{day}-"
    highest = 0
    for rec in rt.audit.records(event_prefix="incident.declared"):
        if rec.incident and rec.incident.startswith(prefix):
            try:
                highest = max(highest, int(rec.incident[len(prefix):]))
            except ValueError:
                continue
    return f"{prefix}{highest + 1:04d}"


def lifecycle_lock(rt: Runtime) -> Any:
    """Held only while a lifecycle event is decided and recorded, never across a prompt:
    two commanders declaring at once get distinct ids, and two updating the same incident
    cannot both claim the same update number."""
    return _lock(Path(str(rt.settings.audit_path()) + ".lifecycle.lock"))


# ----------------------------------------------------------------------- core
@dataclass
class UpdateSpec:
    event: str
    stage: str
    message: str
    values: dict[str, str]


def _make_planner(rt: Runtime, pb: Playbook, contacts: Any, incident_id: str,
                  update_no: int, spec: UpdateSpec, state: IncidentState | None,
                  declared_at: str) -> Planner:
    ctx = IncidentContext(id=incident_id, stage=spec.stage, update_no=update_no,
                          declared_at=declared_at, message=spec.message)
    return Planner(pb, make_renderer(pb), contacts, optout_store(rt), incident_id=incident_id,
                   update_no=update_no, stage=spec.stage, values=spec.values, ctx=ctx,
                   state=state)


def prepare(rt: Runtime, pb: Playbook, incident_id: str, update_no: int, spec: UpdateSpec,
            state: IncidentState | None, *, check: bool = True) -> tuple[Preflight, Any]:
    if rt.sandbox is not None and state is not None:
        rt.sandbox.remember_tweets(state.last_tweet.values())
    contacts = load_contact_set(rt, pb)
    declared_at = state.declared_at if state else datetime.now(UTC).isoformat()
    planner = _make_planner(rt, pb, contacts, incident_id, update_no, spec, state, declared_at)
    messages = planner.render_all()
    # A counting pass with a throwaway planner: sizes per channel without sending.
    counter = _make_planner(rt, pb, contacts, incident_id, update_no, spec, state, declared_at)
    for job in counter.jobs():
        for _ in job:
            pass
    _refuse_misleading(pb, contacts, spec.stage, messages, state)
    used = _stage_channels(pb, spec.stage)
    checked = build_channels(rt, pb, used)
    health = check_health(checked) if check else {}
    close_channels(checked)
    pre = Preflight(
        incident_id=incident_id, playbook=pb, stage=spec.stage, update_no=update_no,
        event=spec.event, messages=messages, audience_sizes=dict(counter.stats.per_channel),
        health=health, stats=counter.stats, skips=counter.skips,
        invalid_contacts=contacts.invalid_records,
        contact_source_problems=len(contacts.problems) - contacts.invalid_records,
        endpoints={n: ch.endpoint() for n, ch in checked.items()},
    )
    return pre, contacts


def _refuse_misleading(pb: Playbook, contacts: Any, stage: str,
                       messages: list[RenderedMessage], state: IncidentState | None) -> None:
    """Stop before anything is sent when sending would mislead: contacts that did not load
    (people would silently not be told), an internal audience that selects nobody, or a
    tweet identical to one this incident already posted (the provider refuses it)."""
    from incident_notify.channels import channel_class
    from incident_notify.errors import ContactsError

    problems = list(contacts.problems)
    for aname in pb.audiences_for(stage):
        aud = pb.model.audiences[aname]
        if aud.kind != "internal":
            continue
        sel = aud.select
        if next(iter(contacts.select(groups=sel.groups, tags=sel.tags, ids=sel.ids)), None) \
                is None:
            problems.append(pb.source.problem(
                ("audiences", aname), f"internal audience {aname!r} selects nobody in the "
                "contacts: the incident team would not be told",
                "check its groups/tags against the contact files (incident-notify contacts "
                "list)"))
    from incident_notify.sensitivity import leak_problems

    leaks = leak_problems(pb, make_renderer(pb), stage)
    if leaks:
        from incident_notify.errors import PlaybookError

        raise PlaybookError(leaks, hint="nothing was sent; incident-notify validate shows "
                            "every path")
    if problems:
        raise ContactsError(problems, "nothing was sent: the contacts are not what the "
                            "playbook needs", hint="fix the contact files (incident-notify "
                            "contacts check shows every problem), then run the command again")
    if state is None:
        return
    posted: dict[str, set[str]] = {}
    for d in state.deliveries.values():
        if d.status == "sent" and not d.payload.get("contact_id"):
            msg = state.messages.get(d.payload.get("digest", ""))
            part = int(d.payload.get("part", 1))
            if msg and part <= len(msg["parts"]):
                posted.setdefault(d.channel, set()).add(msg["parts"][part - 1])
    for m in messages:
        if not getattr(channel_class(m.channel_type), "refuses_duplicates", False):
            continue
        for text in m.parts:
            if text in posted.get(m.channel, set()):
                raise StateError(
                    f"{m.channel}: this update's post is identical to one the incident "
                    f"already posted, which {m.channel_type} refuses as a duplicate; nothing "
                    "was sent",
                    hint="say what is new with --message \"...\" (or --set changed values)")


def _stage_channels(pb: Playbook, stage: str) -> list[str]:
    primary: list[str] = []
    for aname in pb.audiences_for(stage):
        primary += pb.model.audiences[aname].channels
    return channels_with_fallbacks(pb, primary)


class AuditedRouter:
    """The planner as the dispatcher's router. New rendered messages (a fallback's) are
    handed back as records for the dispatcher to write with the failover that needs them;
    an opt-out is recorded at once."""

    def __init__(self, planner: Planner, audit: Any, incident_id: str) -> None:
        self.planner = planner
        self.audit = audit
        self.incident_id = incident_id

    def new_records(self) -> list[Any]:
        from incident_notify.audit import AuditEntry

        return [AuditEntry("message.rendered", incident=self.incident_id,
                           channel=payload["channel"], payload=payload)
                for payload in self.planner.take_new_renders()]

    def reroute(self, delivery: Delivery, reason: str) -> list[Planned] | None:
        return self.planner.reroute(delivery, reason)

    def next_channel(self, delivery: Delivery) -> list[Planned] | None:
        return self.planner.next_channel(delivery)

    def opted_out(self, delivery: Delivery) -> None:
        self.planner.opted_out(delivery)
        self.audit.append("optout.added", incident=self.incident_id, channel=delivery.channel,
                          recipient=delivery.recipient,
                          payload={"contact_id": delivery.contact_id,
                                   "reason": "recipient unsubscribed (provider opt-out)"})


def _write_plan(rt: Runtime, planner: Planner, incident_id: str, update_no: int) -> list[Any]:
    """Record every delivery of the update (then `update.planned`); returns the records."""
    from incident_notify.audit import AuditEntry

    batch: list[Any] = []
    written: list[Any] = []

    def flush() -> None:
        renders = planner.take_new_renders()
        entries = [AuditEntry("message.rendered", incident=incident_id, channel=r["channel"],
                              payload=r) for r in renders]
        if entries or batch:
            written.extend(rt.audit.append_many([*entries, *batch]))
        batch.clear()

    for job in planner.jobs():
        for p in job:
            d = p.delivery
            batch.append(AuditEntry("delivery.planned", incident=incident_id, channel=d.channel,
                                    recipient=d.recipient or None, key=d.key,
                                    payload=dict(p.payload)))
        if len(batch) >= 500:
            flush()
    for s in planner.skips:
        batch.append(AuditEntry("delivery.planned", incident=incident_id, channel=s.channel,
                                recipient=s.recipient, key=s.key,
                                payload={"update_no": update_no, "contact_id": s.contact_id,
                                         "audience": s.audience, "part": 1, "parts": 1}))
        batch.append(AuditEntry("delivery.skipped", incident=incident_id, channel=s.channel,
                                recipient=s.recipient, key=s.key,
                                payload={"reason": s.reason, "opted_out": s.opted_out}))
    flush()
    written.append(rt.audit.append("update.planned", incident=incident_id,
                                   payload={"update_no": update_no,
                                            "planned": planner.stats.planned,
                                            "skipped": planner.stats.skipped,
                                            "warnings": planner.stats.warnings}))
    return written


def _delivery_from_state(ds: DeliveryState, state: IncidentState, contacts: Any,
                         reply_to: str | None) -> Delivery | None:
    p = ds.payload
    msg = state.messages.get(p.get("digest", ""))
    if msg is None:
        return None
    part = int(p.get("part", 1))
    recipient = ds.recipient or ""
    if recipient.startswith("hmac-sha256:"):
        # Redacted in the log: look the address up again by contact id.
        from incident_notify.channels import available_types, channel_class

        person = contacts.contacts.get(p.get("contact_id"))
        ctype = p.get("channel_type", "")
        field = channel_class(ctype).address if ctype in available_types() else None
        recipient = (person.address_for(field) if person and field else None) or ""
        if not recipient:
            return None
    return Delivery(
        key=ds.key, incident_id=state.id, update_no=ds.update_no, channel=ds.channel,
        recipient=recipient,
        message=OutgoingMessage(text=msg["parts"][part - 1], subject=msg.get("subject"),
                                html=msg.get("html")),
        contact_id=p.get("contact_id", ""), audience=p.get("audience", ""), part=part,
        parts=int(p.get("parts", 1)), reply_to=reply_to,
        thread_refs=tuple(p.get("thread_refs") or ()), fallback_from=p.get("fallback_from"),
    )


def pending_jobs(state: IncidentState, contacts: Any, update_no: int,
                 include_unknown: bool = False) -> Iterator[list[Delivery]]:
    """Jobs for the deliveries of an update that have no outcome yet, threads grouped."""
    wanted = {"planned", "attempting", "unknown"} if include_unknown else {"planned"}
    groups: dict[str, list[DeliveryState]] = {}
    for ds in state.deliveries.values():
        if ds.update_no != update_no:
            continue
        thread = ds.key.rsplit("/", 1)[0]
        groups.setdefault(thread, []).append(ds)
    for members in groups.values():
        members.sort(key=lambda d: int(d.payload.get("part", 1)))
        job: list[Delivery] = []
        previous: DeliveryState | None = None
        for ds in members:
            if ds.status in wanted:
                reply = ds.payload.get("reply_to")
                if previous is not None and int(ds.payload.get("part", 1)) > 1:
                    reply = previous.provider_id
                d = _delivery_from_state(ds, state, contacts, reply)
                if d is not None:
                    job.append(d)
            elif job:
                break  # a thread part after a gap waits for the next resume
            previous = ds
        if job:
            yield job


def _dispatch(rt: Runtime, pb: Playbook, planner: Planner, state: IncidentState,
              contacts: Any, update_no: int, health: Mapping[str, Health],
              progress: ProgressFn | None, include_unknown: bool = False,
              channels: Mapping[str, Channel] | None = None) -> DispatchResult:
    from incident_notify.audit import GroupCommitWriter

    owned = channels is None
    built = build_channels(rt, pb, list(pb.model.channels)) if channels is None \
        else dict(channels)
    types = {n: pb.model.channels[n].type for n in built}
    down = {n: h.detail for n, h in health.items() if not h.ok}
    try:
        with GroupCommitWriter(rt.audit) as writer:
            router = AuditedRouter(planner, writer, state.id)
            dispatcher = Dispatcher(built, writer, router, incident_id=state.id,
                                    policy=rt.policy, on_event=progress, channel_types=types,
                                    down=down)
            return dispatcher.run(pending_jobs(state, contacts, update_no, include_unknown))
    finally:
        if owned:
            close_channels(built)


def close_channels(channels: Mapping[str, Channel]) -> None:
    for ch in channels.values():
        try:
            ch.close()
        except Exception:
            pass


def _finish(rt: Runtime, incident_id: str, update_no: int,
            result: DispatchResult) -> tuple[Verdict, IncidentState]:
    """The update's verdict from the record, and ``update.completed`` when it ran to the
    end (an interrupted or stopped run stays open for `resume`)."""
    state = fold(rt.audit.records(incident=incident_id), incident_id)
    v = verdict(state, update_no)
    if not result.interrupted and result.fatal is None:
        rt.audit.append("update.completed", incident=incident_id,
                        payload={"update_no": update_no,
                                 "summary": {**v.to_dict(), "failovers": result.failovers,
                                             "elapsed_s": round(result.elapsed_s, 3)}})
    return v, state


def _in_doubt(state: IncidentState, update_no: int) -> list[dict[str, Any]]:
    return [{"key": d.key, "channel": d.channel, "recipient": d.recipient,
             "contact": d.payload.get("contact_id") or None, "attempts": d.attempts}
            for d in state.in_doubt(update_no)]


def run_update(rt: Runtime, pb: Playbook, incident_id: str, update_no: int, spec: UpdateSpec,
               state: IncidentState | None, *, dry_run: bool, confirm: ConfirmFn | None,
               progress: ProgressFn | None, lifecycle_payload: dict[str, Any]) -> SendOutcome:
    """Preflight, confirmation, then record the lifecycle event and send.

    For a declaration `incident_id` is provisional (shown in the preview); the real id is
    allocated under the lifecycle lock after confirmation.
    """
    pre, contacts = prepare(rt, pb, incident_id, update_no, spec, state)
    if dry_run:
        return SendOutcome(incident_id, spec.stage, update_no, True, pre, None)
    asked = time.monotonic()
    if confirm is not None and not confirm(pre):
        raise AbortedError("nothing was sent: the commander declined",
                           hint="rerun when ready; --dry-run previews without asking")
    health = pre.health
    if time.monotonic() - asked > HEALTH_MAX_AGE_S:
        # The commander took a while to answer: channels may have gone down or come back.
        health = check_health(build_channels(rt, pb, list(pre.health)))
    handle = lifecycle_lock(rt)
    try:
        if spec.event == "incident.declared":
            incident_id = next_incident_id(rt)
            current = IncidentState(id=incident_id)
        else:
            current = fold(rt.audit.records(incident=incident_id), incident_id)
            if current.update_no != update_no - 1:
                raise StateError(
                    f"{incident_id} was updated by someone else meanwhile (now at update "
                    f"{current.update_no}, stage {current.stage!r}); nothing was sent",
                    hint=f"review with: incident-notify status {incident_id}, then retry")
        record = rt.audit.append(spec.event, incident=incident_id, payload=lifecycle_payload)
    finally:
        handle.close()
    # The state read under the lock plus what this command writes: no re-reading the log.
    state = current
    apply(state, record)
    planner = _make_planner(rt, pb, contacts, incident_id, update_no, spec, state,
                            state.declared_at)
    planner.render_all()
    for written in _write_plan(rt, planner, incident_id, update_no):
        apply(state, written)
    result = _dispatch(rt, pb, planner, state, contacts, update_no, health, progress)
    v, final = _finish(rt, incident_id, update_no, result)
    return SendOutcome(incident_id, spec.stage, update_no, False, pre, result, v,
                       in_doubt=_in_doubt(final, update_no))


# ----------------------------------------------------------------------- commands
def declare(rt: Runtime, playbook: Path, values: dict[str, str], *, message: str = "",
            stage: str | None = None, dry_run: bool = False, confirm: ConfirmFn | None = None,
            progress: ProgressFn | None = None) -> SendOutcome:
    pb = load_playbook(playbook)
    first = stage or pb.first_stage
    if first not in pb.model.stages:
        raise NotFoundError(f"{playbook}: no stage {first!r}",
                            hint=f"stages: {', '.join(pb.stage_names)}")
    spec = UpdateSpec("incident.declared", first, message, values)
    provisional = next_incident_id(rt)
    payload = {"playbook": str(playbook.resolve()), "playbook_name": pb.name,
               "title": pb.model.title, "severity": pb.model.severity, "stage": first,
               "update_no": 1, "variables": values, "message": message,
               "sandbox": rt.sandbox is not None}
    return run_update(rt, pb, provisional, 1, spec, None, dry_run=dry_run, confirm=confirm,
                      progress=progress, lifecycle_payload=payload)


def update(rt: Runtime, incident_id: str, *, stage: str | None, sets: dict[str, str],
           message: str = "", dry_run: bool = False, confirm: ConfirmFn | None = None,
           progress: ProgressFn | None = None, playbook: Path | None = None,
           event: str = "incident.updated") -> SendOutcome:
    from incident_notify.messages import resolve_variables

    state = load_state(rt, incident_id)
    pb = playbook_of(state, playbook)
    if state.status == "resolved" and event != "incident.reopened":
        raise StateError(f"{incident_id} is resolved; it takes no further updates",
                         hint=f"reopen it first: incident-notify reopen {incident_id}")
    if event == "incident.reopened" and state.status != "resolved":
        raise StateError(f"{incident_id} is not resolved, so it cannot be reopened")
    target = stage or state.stage
    if target not in pb.model.stages:
        raise NotFoundError(f"{pb.path}: no stage {target!r}",
                            hint=f"stages: {', '.join(pb.stage_names)}")
    if event == "incident.updated" and target != state.stage:
        allowed = pb.allowed_next(state.stage)
        if target not in allowed:
            raise StateError(
                f"{incident_id} is at {state.stage!r}; it cannot move to {target!r}",
                hint=f"allowed next: {', '.join(allowed) or '(none)'}; use 'resolve' to close")
        if target == pb.final_stage:
            event = "incident.resolved"
    if event == "incident.updated" and target == state.stage and not message and not sets:
        raise UsageError("nothing to say: same stage, no --message and no --set",
                         hint="give --stage NEXT, or --message \"...\" for a free-text update")
    values = resolve_variables(pb, {**state.variables, **sets}, mode="given")
    update_no = state.update_no + 1
    spec = UpdateSpec(event, target, message, values)
    payload = {"stage": target, "previous_stage": state.stage, "update_no": update_no,
               "variables": values, "message": message}
    return run_update(rt, pb, incident_id, update_no, spec, state, dry_run=dry_run,
                      confirm=confirm, progress=progress, lifecycle_payload=payload)


def resolve(rt: Runtime, incident_id: str, **kwargs: Any) -> SendOutcome:
    state = load_state(rt, incident_id)
    pb = playbook_of(state, kwargs.get("playbook"))
    if state.status == "resolved":
        raise StateError(f"{incident_id} is already resolved",
                         hint=f"reopen it with: incident-notify reopen {incident_id}")
    return update(rt, incident_id, stage=pb.final_stage, event="incident.resolved", **kwargs)


def reopen(rt: Runtime, incident_id: str, *, stage: str | None = None,
           **kwargs: Any) -> SendOutcome:
    state = load_state(rt, incident_id)
    pb = playbook_of(state, kwargs.get("playbook"))
    target = stage or pb.first_stage
    return update(rt, incident_id, stage=target, event="incident.reopened", **kwargs)


@dataclass
class Settlement:
    """What a provider said about a delivery whose outcome was unknown."""

    delivery: DeliveryState
    outcome: str
    """sent (it arrived), not_sent (the provider's records show it did not: safe to send)
    or unknowable (the provider cannot say, or could not be asked)."""
    provider_id: str | None = None
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = self.delivery
        return {"key": d.key, "channel": d.channel, "recipient": d.recipient,
                "contact": d.payload.get("contact_id") or None, "outcome": self.outcome,
                "provider_id": self.provider_id, "detail": self.detail}


def _reply_target(ds: DeliveryState, state: IncidentState) -> str | None:
    part = int(ds.payload.get("part", 1))
    if part == 1:
        reply: str | None = ds.payload.get("reply_to")
        return reply
    thread = ds.key.rsplit("/", 1)[0]
    previous = state.deliveries.get(f"{thread}/{part - 1}")
    return previous.provider_id if previous is not None else None


def settle(state: IncidentState, contacts: Any, channels: Mapping[str, Channel],
           update_nos: list[int]) -> list[Settlement]:
    """Ask each provider what became of the deliveries in doubt (attempted, no answer
    recorded). Read-only: the caller records the answers. A provider that cannot be asked
    (down, or no lookup: SMTP) leaves its deliveries unknowable, asked once per channel."""
    from datetime import datetime as dt

    from incident_notify.channels.base import ChannelError

    out: list[Settlement] = []
    unreachable: dict[str, str] = {}
    for upd in update_nos:
        for ds in sorted(state.in_doubt(upd), key=lambda d: d.key):
            ch = channels.get(ds.channel)
            d = _delivery_from_state(ds, state, contacts, _reply_target(ds, state))
            if ch is None or d is None:
                out.append(Settlement(ds, "unknowable", detail="its channel or contact is "
                                      "no longer in the playbook"))
                continue
            if ds.channel in unreachable:
                out.append(Settlement(ds, "unknowable", detail=unreachable[ds.channel]))
                continue
            try:
                since = dt.fromisoformat((ds.attempted_at or state.declared_at)
                                         .replace("Z", "+00:00"))
            except ValueError:
                since = dt.fromisoformat(state.declared_at.replace("Z", "+00:00"))
            try:
                receipt = ch.find_sent(d, since)
            except ChannelError as exc:
                unreachable[ds.channel] = exc.message
                out.append(Settlement(ds, "unknowable", detail=exc.message))
                continue
            except Exception as exc:  # a malformed answer: cannot tell
                unreachable[ds.channel] = f"unexpected answer ({type(exc).__name__})"
                out.append(Settlement(ds, "unknowable", detail=unreachable[ds.channel]))
                continue
            if receipt is None:
                out.append(Settlement(ds, "not_sent", detail="not in the provider's records"))
            else:
                out.append(Settlement(ds, "sent", provider_id=receipt.provider_id,
                                      detail="found in the provider's records"))
    return out


def _record_settlements(rt: Runtime, state: IncidentState,
                        settled: list[Settlement]) -> None:
    from incident_notify.audit import AuditEntry

    entries = []
    for s in settled:
        if s.outcome == "unknowable":
            continue
        d = s.delivery
        payload: dict[str, Any] = {"outcome": s.outcome, "detail": s.detail}
        if s.outcome == "sent":
            payload.update(provider_id=s.provider_id,
                           channel_type=d.payload.get("channel_type", ""))
        entries.append(AuditEntry("delivery.settled", incident=state.id, channel=d.channel,
                                  recipient=d.recipient, key=d.key, payload=payload))
    for record in rt.audit.append_many(entries) if entries else []:
        apply(state, record)


def _merge(verdicts: list[Verdict]) -> Verdict:
    from collections import Counter

    channels: dict[str, Counter[str]] = {}
    recipients = []
    for v in verdicts:
        for ch, c in v.channels.items():
            channels.setdefault(ch, Counter()).update(c)
        recipients += v.recipients
    return Verdict(channels, recipients)


def resume(rt: Runtime, incident_id: str, *, include_unknown: bool = False,
           dry_run: bool = False, confirm: ConfirmFn | None = None,
           progress: ProgressFn | None = None, playbook: Path | None = None) -> SendOutcome:
    """Finish what a crashed or interrupted run left: settle every delivery in doubt with
    its provider first (found -> recorded sent with the provider's id; absent -> sent now),
    then send what has no outcome. What no provider can settle is listed, and re-sent only
    with `include_unknown` (email keeps its Message-ID on a resend)."""
    state = load_state(rt, incident_id)
    pb = playbook_of(state, playbook)
    unfinished = [u for u in state.updates
                  if not u.completed or state.pending(u.update_no)
                  or state.in_doubt(u.update_no)]
    if not unfinished:
        return SendOutcome(incident_id, state.stage, state.update_no, dry_run, None,
                           DispatchResult(), verdict(state, state.update_no))
    contacts = load_contact_set(rt, pb)
    channels = build_channels(rt, pb, list(pb.model.channels))
    try:
        numbers = [u.update_no for u in unfinished]
        settled = settle(state, contacts, channels, numbers)
        used = sorted({c for u in unfinished for c in _stage_channels(pb, u.stage)})
        health = check_health({n: channels[n] for n in used if n in channels})
        unknowable = {s.delivery.key for s in settled if s.outcome == "unknowable"}
        sizes: dict[str, int] = {}
        for upd in unfinished:
            for ds in state.pending(upd.update_no):
                sizes[ds.channel] = sizes.get(ds.channel, 0) + 1
        for s in settled:
            if s.outcome == "not_sent" or (include_unknown and s.delivery.key in unknowable):
                sizes[s.delivery.channel] = sizes.get(s.delivery.channel, 0) + 1
        last = unfinished[-1]
        pre = Preflight(incident_id=incident_id, playbook=pb, stage=last.stage,
                        update_no=last.update_no, event="resume", messages=[],
                        audience_sizes=sizes, health=health, stats=PlanStats(), skips=[],
                        settled=[s.to_dict() for s in settled],
                        endpoints={n: channels[n].endpoint() for n in used
                                   if n in channels})
        if dry_run:
            return SendOutcome(incident_id, last.stage, last.update_no, True, pre, None)
        if confirm is not None and (sizes or settled) and not confirm(pre):
            raise AbortedError("nothing was sent or recorded: the commander declined",
                               hint="rerun when ready; --dry-run previews without asking")
        _record_settlements(rt, state, settled)
        verdicts = []
        result = DispatchResult()
        in_doubt: list[dict[str, Any]] = []
        for upd in unfinished:
            spec = UpdateSpec(upd.event, upd.stage, upd.message, upd.variables)
            planner = _make_planner(rt, pb, contacts, incident_id, upd.update_no, spec, state,
                                    state.declared_at)
            if not upd.planned:
                # Crashed while planning: plan again; keys already in the log are skipped.
                for written in _write_plan(rt, planner, incident_id, upd.update_no):
                    apply(state, written)
            result = _dispatch(rt, pb, planner, state, contacts, upd.update_no, health,
                               progress, include_unknown=include_unknown, channels=channels)
            v, state = _finish(rt, incident_id, upd.update_no, result)
            verdicts.append(v)
            in_doubt += _in_doubt(state, upd.update_no)
            if result.interrupted or result.fatal:
                break
        return SendOutcome(incident_id, last.stage, last.update_no, False, pre, result,
                           _merge(verdicts), in_doubt=in_doubt)
    finally:
        close_channels(channels)


def fetch_replies(rt: Runtime, incident_id: str, playbook: Path | None = None) -> int:
    """Fetch replies to the incident's public thread and record the new ones
    (``reply.received``), so the timeline shows what people answered."""
    state = load_state(rt, incident_id)
    if not state.first_tweet:
        return 0
    pb = playbook_of(state, playbook)
    seen = {r.get("id") for r in state.replies}
    new = 0
    channels = build_channels(rt, pb, [c for c in state.first_tweet if c in pb.model.channels])
    for name, channel in channels.items():
        replies = getattr(channel, "replies", None)
        if replies is None:
            continue
        for reply in reversed(replies(state.first_tweet[name])):
            if reply["id"] in seen:
                continue
            rt.audit.append("reply.received", incident=incident_id, channel=name,
                            payload=reply)
            new += 1
    return new

