"""An incident's state is a fold over its audit records; there is no second store.

Event vocabulary (payload keys in docs/audit-log.md):

* ``incident.declared`` / ``incident.updated`` / ``incident.resolved`` /
  ``incident.reopened``: the lifecycle; each starts update number N (``update_no``)
  and carries the stage, variables and free-text message of that update.
* ``message.rendered``: the exact text of one (update, audience, channel) message with
  its digest; deliveries carry only the digest.
* ``delivery.planned`` -> ``delivery.attempt`` -> ``delivery.sent`` | ``delivery.failed``
  | ``delivery.unknown`` | ``delivery.skipped`` | ``delivery.failover``.
* ``delivery.settled``: `resume` asked the provider about an unknown delivery; outcome
  ``sent`` (with the provider's id: as ``delivery.sent``) or ``not_sent`` (planned again,
  safe to send).
* ``delivery.requeued``: `resume --retry-not-reached` sends a failed delivery of someone
  the update did not reach again (planned again); a later ``delivery.planned`` of a key
  that failed is the same (a failover planning that person's next channel again).
* ``update.planned`` (every delivery of the update is in the log) and
  ``update.completed`` (fan-out finished, with its summary).
* ``channel.circuit_open`` / ``channel.circuit_closed``, ``optout.added``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from incident_notify.audit import AuditRecord

OUTCOMES = {
    "delivery.sent": "sent",
    "delivery.failed": "failed",
    "delivery.unknown": "unknown",
    "delivery.skipped": "skipped",
    "delivery.failover": "failed_over",
}
LIFECYCLE = ("incident.declared", "incident.updated", "incident.resolved", "incident.reopened")


@dataclass(slots=True)
class DeliveryState:
    key: str
    channel: str
    recipient: str | None
    update_no: int
    payload: dict[str, Any]
    """The planned record's payload without its contact id; shared, never changed: every
    delivery of an update's channel has the same one (resume folds 100,000 of them)."""
    status: str = "planned"
    """planned, attempting, sent, failed, unknown, skipped, failed_over."""
    attempts: int = 0
    provider_id: str | None = None
    error: str | None = None
    attempted_at: str = ""
    """Timestamp of the latest attempt record (where `resume` starts looking), while the
    delivery is in doubt; dropped once it has an outcome (a fold holds 100,000)."""
    opted_out: bool = False
    """Skipped because the person opted out: not someone this update intends to reach."""
    contact_id: str = ""
    held_s: float = 0.0
    """How long, as recorded, the provider held the latest attempt without an answer (a
    timeout's whole wait, `delivery.held` while it was held): `resume` then allows that
    the provider may still be working on it."""


@dataclass
class UpdateState:
    update_no: int
    event: str
    stage: str
    message: str
    variables: dict[str, str]
    ts: str
    planned: bool = False
    completed: bool = False
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class IncidentState:
    id: str
    playbook: str = ""
    playbook_name: str = ""
    title: str = ""
    severity: str = ""
    stage: str = ""
    status: str = "open"
    """open or resolved."""
    declared_at: str = ""
    last_event_at: str = ""
    actor: str = ""
    updates: list[UpdateState] = field(default_factory=list)
    deliveries: dict[str, DeliveryState] = field(default_factory=dict)
    messages: dict[str, dict[str, Any]] = field(default_factory=dict)
    """digest -> {text, subject, html} from message.rendered."""
    first_tweet: dict[str, str] = field(default_factory=dict)
    """channel -> id of the incident's first tweet (the thread's conversation id)."""
    last_tweet: dict[str, str] = field(default_factory=dict)
    """channel -> id of the last tweet sent (the next update replies to it)."""
    email_refs: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    """(channel, contact id) -> Message-IDs sent so far, for References/In-Reply-To."""
    failovers: list[dict[str, Any]] = field(default_factory=list)
    replies: list[dict[str, Any]] = field(default_factory=list)
    """Replies fetched from the public thread (``reply.received``)."""
    events: list[AuditRecord] = field(default_factory=list)
    shared_payloads: dict[tuple[Any, ...], dict[str, Any]] = field(
        default_factory=dict, repr=False, compare=False)
    """One copy of each distinct planned payload (without the contact id)."""

    @property
    def update_no(self) -> int:
        return self.updates[-1].update_no if self.updates else 0

    @property
    def variables(self) -> dict[str, str]:
        return dict(self.updates[-1].variables) if self.updates else {}

    def counts(self) -> dict[str, dict[str, int]]:
        """channel -> status -> number of deliveries (all updates)."""
        out: dict[str, dict[str, int]] = {}
        for d in self.deliveries.values():
            per = out.setdefault(d.channel, {})
            per[d.status] = per.get(d.status, 0) + 1
        return out

    def pending(self, update_no: int | None = None) -> list[DeliveryState]:
        """Planned deliveries with no attempt and no outcome: safe to send."""
        return [d for d in self.deliveries.values()
                if d.status == "planned" and (update_no is None or d.update_no == update_no)]

    def in_doubt(self, update_no: int | None = None) -> list[DeliveryState]:
        """Attempted with no recorded answer, or recorded unknown: may have been delivered."""
        return [d for d in self.deliveries.values()
                if d.status in ("attempting", "unknown")
                and (update_no is None or d.update_no == update_no)]


def fold(records: Iterable[AuditRecord], incident_id: str, *,
         keep_events: bool = False) -> IncidentState:
    """Build an incident's state from its audit records (in log order)."""
    state = IncidentState(id=incident_id)
    for rec in records:
        if rec.incident != incident_id:
            continue
        apply(state, rec)
        if keep_events:
            state.events.append(rec)
    return state


def apply(state: IncidentState, rec: AuditRecord) -> None:
    event: str = rec.event
    p: dict[str, Any] = dict(rec.payload or {})
    state.last_event_at = rec.ts
    if event in LIFECYCLE:
        if event == "incident.declared":
            state.playbook = p.get("playbook", "")
            state.playbook_name = p.get("playbook_name", "")
            state.title = p.get("title", "")
            state.severity = p.get("severity", "")
            state.declared_at = rec.ts
            state.actor = rec.actor
        state.stage = p.get("stage", state.stage)
        state.status = "resolved" if event == "incident.resolved" else "open"
        state.updates.append(UpdateState(
            update_no=int(p.get("update_no", len(state.updates) + 1)), event=event,
            stage=state.stage, message=p.get("message", ""),
            variables=dict(p.get("variables", {})), ts=rec.ts))
        return
    if event == "reply.received":
        state.replies.append({"ts": rec.ts, "channel": rec.channel, **p})
        return
    if event == "message.rendered":
        state.messages[p["digest"]] = p
        return
    if event in ("update.planned", "update.completed"):
        for u in state.updates:
            if u.update_no == p.get("update_no"):
                if event == "update.planned":
                    u.planned = True
                else:
                    u.completed = True
                    u.summary = dict(p.get("summary", {}))
        return
    key = rec.key
    if event == "delivery.planned" and key:
        again = state.deliveries.get(key)
        if again is not None:
            _plan_again(again)  # (a failover planning a retried person's channel again)
        else:
            # Channel names and contact ids are interned (every delivery on a channel, and
            # a person's delivery on each channel, share one copy). Keys and recipients are
            # one per delivery: interning them only grew the interpreter's table.
            contact = p.pop("contact_id", None)
            recipient = rec.recipient
            state.deliveries[key] = DeliveryState(
                key=key, channel=sys.intern(rec.channel or ""),
                recipient=recipient,
                update_no=int(p.get("update_no", 0)), payload=_shared(state, p),
                contact_id=sys.intern(contact) if isinstance(contact, str) else "")
        return
    d = state.deliveries.get(key) if key else None
    if d is None:
        if event == "delivery.failover" or event.startswith("channel."):
            _note_failover(state, rec, p)
        return
    if event == "delivery.attempt":
        d.attempts = max(d.attempts, int(p.get("attempt", d.attempts + 1)))
        d.attempted_at, d.held_s = rec.ts, 0.0
        if d.status == "planned":
            d.status = "attempting"
        return
    if event == "delivery.settled":
        if p.get("outcome") == "sent":
            _sent(state, d, p)
        else:
            d.status, d.error = "planned", None
        return
    if event == "delivery.requeued":
        _plan_again(d)
        return
    if event == "delivery.held":
        if d.status in ("attempting", "unknown"):
            held = p.get("held_s")
            d.held_s = max(d.held_s, float(held) if isinstance(held, (int, float)) else 0.0)
        return
    if event in OUTCOMES:
        d.status = OUTCOMES[event]
        if d.status != "unknown":
            d.attempted_at = ""
        elif d.attempted_at:
            d.held_s = seconds_between(d.attempted_at, rec.ts)
        d.error = p.get("error") or p.get("reason")
        if event == "delivery.skipped":
            d.opted_out = bool(p.get("opted_out"))
        if event == "delivery.sent":
            _sent(state, d, p)
        if event == "delivery.failover":
            _note_failover(state, rec, p)


def _plan_again(d: DeliveryState) -> None:
    """A failed delivery of someone not reached, sent again (`resume --retry-not-reached`):
    planned again. Any other status stands (a key planned twice is planned once)."""
    if d.status in ("failed", "failed_over"):
        d.status, d.error = "planned", None


def _shared(state: IncidentState, payload: dict[str, Any]) -> dict[str, Any]:
    """The one copy of this payload the state holds (payloads with a member that cannot
    be a dictionary key are kept as they are)."""
    try:
        shape = tuple((k, tuple(v) if type(v) is list else v) for k, v in payload.items())
        return state.shared_payloads.setdefault(shape, payload)
    except TypeError:
        return payload


def _sent(state: IncidentState, d: DeliveryState, p: dict[str, Any]) -> None:
    d.status, d.error, d.attempted_at = "sent", None, ""
    d.provider_id = p.get("provider_id")
    threading = d.payload.get("threading")
    if threading is None:  # records written before the contract declared it
        ctype = p.get("channel_type") or d.payload.get("channel_type")
        threading = {"twitter": "reply", "email": "references"}.get(ctype or "", "")
    if threading == "reply" and d.provider_id:
        state.last_tweet[d.channel] = d.provider_id
        state.first_tweet.setdefault(d.channel, d.provider_id)
    elif threading == "references" and d.provider_id:
        contact = d.contact_id or d.recipient or ""
        state.email_refs.setdefault((d.channel, contact), []).append(d.provider_id)


def _note_failover(state: IncidentState, rec: Any, p: dict[str, Any]) -> None:
    state.failovers.append({"ts": rec.ts, "event": rec.event, "channel": rec.channel, **p})


def list_incidents(records: Iterable[AuditRecord]) -> dict[str, IncidentState]:
    """Every incident in the log, folded in one pass."""
    states: dict[str, IncidentState] = {}
    for rec in records:
        if not rec.incident:
            continue
        st = states.get(rec.incident)
        if st is None:
            st = states[rec.incident] = IncidentState(id=rec.incident)
        apply(st, rec)
    return states


def seconds_between(earlier: str, later: str) -> float:
    """Seconds from one record's timestamp to another's (0 when either cannot be read)."""
    try:
        return (datetime.fromisoformat(later.replace("Z", "+00:00"))
                - datetime.fromisoformat(earlier.replace("Z", "+00:00"))).total_seconds()
    except ValueError:
        return 0.0


def age(ts: str, now: datetime) -> str:
    """'3h12m' from an ISO timestamp to now."""
    try:
        start = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        return "?"
    seconds = max(0, int((now - start).total_seconds()))
    hours, rem = divmod(seconds, 3600)
    minutes = rem // 60
    if hours >= 24:
        return f"{hours // 24}d{hours % 24}h"
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m"
