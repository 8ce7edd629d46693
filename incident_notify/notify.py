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

from incident_notify.channels.base import Delivery, Health, OutgoingMessage
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
        }


@dataclass
class SendOutcome:
    incident_id: str
    stage: str
    update_no: int
    dry_run: bool
    preflight: Preflight | None
    result: DispatchResult | None
    in_doubt: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exit_code(self) -> ExitCode:
        r = self.result
        if r is None:
            return ExitCode.OK
        if r.fatal:
            return ExitCode.AUDIT_INVALID if "audit" in r.fatal else ExitCode.ERROR
        if r.interrupted:
            return ExitCode.INTERRUPTED
        if r.complete and not self.in_doubt:
            return ExitCode.OK
        if r.total("sent") == 0 and (r.total("failed") + r.total("unknown")) > 0:
            return ExitCode.DELIVERY_FAILED
        return ExitCode.PARTIAL_DELIVERY

    def to_dict(self) -> dict[str, Any]:
        return {
            "incident": self.incident_id, "stage": self.stage, "update_no": self.update_no,
            "dry_run": self.dry_run,
            "preflight": self.preflight.to_dict() if self.preflight else None,
            "result": self.result.to_dict() if self.result else None,
            "in_doubt": self.in_doubt,
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
    used = _stage_channels(pb, spec.stage)
    health = check_health(build_channels(rt, pb, used)) if check else {}
    pre = Preflight(
        incident_id=incident_id, playbook=pb, stage=spec.stage, update_no=update_no,
        event=spec.event, messages=messages, audience_sizes=dict(counter.stats.per_channel),
        health=health, stats=counter.stats, skips=counter.skips,
        invalid_contacts=contacts.invalid_records,
        contact_source_problems=len(contacts.problems) - contacts.invalid_records,
    )
    return pre, contacts


def _stage_channels(pb: Playbook, stage: str) -> list[str]:
    primary: list[str] = []
    for aname in pb.audiences_for(stage):
        primary += pb.model.audiences[aname].channels
    return channels_with_fallbacks(pb, primary)


class AuditedRouter:
    """Planner as the dispatcher's router, writing any new rendered message first."""

    def __init__(self, planner: Planner, audit: Any, incident_id: str) -> None:
        self.planner = planner
        self.audit = audit
        self.incident_id = incident_id

    def _flush(self) -> None:
        for payload in self.planner.take_new_renders():
            self.audit.append("message.rendered", incident=self.incident_id,
                              channel=payload["channel"], payload=payload)

    def reroute(self, delivery: Delivery, reason: str) -> list[Planned] | None:
        planned = self.planner.reroute(delivery, reason)
        self._flush()
        return planned

    def next_channel(self, delivery: Delivery) -> list[Planned] | None:
        planned = self.planner.next_channel(delivery)
        self._flush()
        return planned

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
                                payload={"reason": s.reason,
                                         "opted_out": "opted out" in s.reason}))
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
        from incident_notify.plan import KIND_OF_TYPE

        person = contacts.contacts.get(p.get("contact_id"))
        kind = KIND_OF_TYPE.get(p.get("channel_type", ""))
        recipient = (person.address_for(kind) if person and kind else None) or ""
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
              progress: ProgressFn | None, include_unknown: bool = False) -> DispatchResult:
    from incident_notify.audit import GroupCommitWriter

    used = [n for n in pb.model.channels]
    channels = build_channels(rt, pb, used)
    types = {n: pb.model.channels[n].type for n in used}
    down = [n for n, h in health.items() if not h.ok]
    with GroupCommitWriter(rt.audit) as writer:
        router = AuditedRouter(planner, writer, state.id)
        dispatcher = Dispatcher(channels, writer, router, incident_id=state.id,
                                policy=rt.policy, on_event=progress, channel_types=types,
                                down=down)
        try:
            result = dispatcher.run(pending_jobs(state, contacts, update_no, include_unknown))
        finally:
            for ch in channels.values():
                try:
                    ch.close()
                except Exception:
                    pass
    return result


def _finish(rt: Runtime, incident_id: str, update_no: int, planner: Planner,
            result: DispatchResult) -> None:
    for s in planner.skips:
        if "opted out" not in s.reason:
            result.add(s.channel, "not_reached")
        else:
            result.add(s.channel, "skipped")
    if not result.interrupted and result.fatal is None:
        rt.audit.append("update.completed", incident=incident_id,
                        payload={"update_no": update_no, "summary": result.to_dict()})


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
    _finish(rt, incident_id, update_no, planner, result)
    return SendOutcome(incident_id, spec.stage, update_no, False, pre, result)


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
               "update_no": 1, "variables": values, "message": message}
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


def resume(rt: Runtime, incident_id: str, *, include_unknown: bool = False,
           progress: ProgressFn | None = None, playbook: Path | None = None) -> SendOutcome:
    """Send what a crashed or interrupted run left unsent; never re-send the unknown
    unless asked."""
    state = load_state(rt, incident_id)
    pb = playbook_of(state, playbook)
    unfinished = [u for u in state.updates
                  if not u.completed or state.pending(u.update_no)
                  or (include_unknown and state.in_doubt(u.update_no))]
    if not unfinished:
        return SendOutcome(incident_id, state.stage, state.update_no, False, None,
                           DispatchResult())
    last: SendOutcome | None = None
    for upd in unfinished:
        spec = UpdateSpec(upd.event, upd.stage, upd.message, upd.variables)
        contacts = load_contact_set(rt, pb)
        planner = _make_planner(rt, pb, contacts, incident_id, upd.update_no, spec, state,
                                state.declared_at)
        if not upd.planned:
            # Crashed while planning: plan again; keys already in the log are skipped.
            _write_plan(rt, planner, incident_id, upd.update_no)
            state = fold(rt.audit.records(incident=incident_id), incident_id)
        in_doubt = [{"key": d.key, "channel": d.channel, "recipient": d.recipient,
                     "attempts": d.attempts}
                    for d in state.in_doubt(upd.update_no)]
        used = _stage_channels(pb, upd.stage)
        health = check_health(build_channels(rt, pb, used))
        result = _dispatch(rt, pb, planner, state, contacts, upd.update_no, health, progress,
                           include_unknown=include_unknown)
        _finish(rt, incident_id, upd.update_no, planner, result)
        last = SendOutcome(incident_id, upd.stage, upd.update_no, False, None, result,
                           in_doubt=[] if include_unknown else in_doubt)
        state = fold(rt.audit.records(incident=incident_id), incident_id)
    assert last is not None
    return last


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

