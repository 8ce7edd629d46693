"""The journal: the one writer of an update's plan to the record (``message.rendered``,
``delivery.planned``, ``delivery.skipped``, ``update.planned``; failovers write theirs in
one batch through the dispatcher), and the one reader that rebuilds the deliveries still
to send from the folded state. A first run and a resume go through the same functions."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from incident_notify.channels.base import Delivery, OutgoingMessage
from incident_notify.dispatch import DispatchResult, Planned
from incident_notify.incident import DeliveryState, IncidentState, apply, fold
from incident_notify.plan import Plan, Planner
from incident_notify.runtime import Runtime
from incident_notify.verdict import Verdict, verdict

if TYPE_CHECKING:
    from incident_notify.audit import AuditEntry, AuditRecord
    from incident_notify.contacts import ContactSet
    from incident_notify.dispatch import AuditSink


class AuditedRouter:
    """The planner as the dispatcher's router. New rendered messages (a fallback's) are
    handed back as records for the dispatcher to write with the failover that needs them;
    an opt-out is recorded at once."""

    def __init__(self, planner: Planner, audit: AuditSink, incident_id: str) -> None:
        self.planner = planner
        self.audit = audit
        self.incident_id = incident_id

    def new_records(self) -> list[AuditEntry]:
        from incident_notify.audit import AuditEntry

        return [AuditEntry("message.rendered", incident=self.incident_id,
                           channel=payload["channel"], payload=payload)
                for payload in self.planner.take_new_renders()]

    def reroute(self, delivery: Delivery, reason: str) -> list[Planned] | None:
        return self.planner.reroute(delivery, reason)

    def next_channel(self, delivery: Delivery) -> list[Planned] | None:
        return self.planner.next_channel(delivery)

    def opted_out(self, delivery: Delivery) -> str | None:
        listed: dict[str, Any] = {}
        try:
            self.planner.opted_out(delivery)
        except OSError as exc:
            # The opt-out list cannot be written (read-only, its disk full): the opt-out
            # stays on record here, the provider refuses further texts itself, and one
            # recipient's list entry does not stop everyone else's notification.
            listed = {"list_error": f"the opt-out list could not be written: "
                                    f"{exc.strerror or type(exc).__name__}"}
        self.audit.append("optout.added", incident=self.incident_id, channel=delivery.channel,
                          recipient=delivery.recipient,
                          payload={"contact_id": delivery.contact_id,
                                   "reason": "recipient unsubscribed (provider opt-out)",
                                   **listed})
        if not listed:
            return None
        return (f"{listed['list_error']}; {delivery.contact_id or 'a recipient'} replied STOP "
                f"on {delivery.channel}: add them by hand (incident-notify contacts optout "
                "add), the audit log has the number")


def write_plan(rt: Runtime, planner: Planner, plan: Plan, incident_id: str,
               update_no: int, spans: list[tuple[int, int]] | None = None
               ) -> list[AuditRecord]:
    """Record every delivery of the planned update (then `update.planned`), each message
    before the deliveries that use it; returns the records (`spans`: where the writes
    went in the log are added to it)."""
    from incident_notify.audit import AuditEntry

    batch: list[AuditEntry] = []
    written: list[AuditRecord] = []

    def flush() -> None:
        renders = planner.take_new_renders()
        entries = [AuditEntry("message.rendered", incident=incident_id, channel=r["channel"],
                              payload=r) for r in renders]
        if entries or batch:
            written.extend(rt.audit.append_many([*entries, *batch], spans=spans))
        batch.clear()

    for job in plan.jobs:
        for p in job:
            d = p.delivery
            batch.append(AuditEntry("delivery.planned", incident=incident_id, channel=d.channel,
                                    recipient=d.recipient or None, key=d.key,
                                    payload=dict(p.payload)))
        if len(batch) >= 500:
            flush()
    for s in plan.skips:
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
                                            "planned": plan.stats.planned,
                                            "skipped": plan.stats.skipped,
                                            "warnings": plan.stats.warnings}, spans=spans))
    return written


def delivery_from_state(ds: DeliveryState, state: IncidentState, contacts: ContactSet,
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

        person = contacts.contacts.get(ds.contact_id)
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
        contact_id=ds.contact_id, audience=p.get("audience", ""), part=part,
        parts=int(p.get("parts", 1)), reply_to=reply_to,
        thread_refs=tuple(p.get("thread_refs") or ()), fallback_from=p.get("fallback_from"),
    )


def sent_singles(state: IncidentState, contacts: ContactSet,
                 update_no: int) -> Iterator[tuple[Delivery, str]]:
    """The messages of an update already sent to one person each, with their provider ids
    (a resume sends none of them again to the same address, whoever it is for)."""
    for ds in state.deliveries.values():
        if (ds.update_no == update_no and ds.status == "sent" and ds.provider_id
                and ds.contact_id and int(ds.payload.get("parts", 1)) <= 1):
            d = delivery_from_state(ds, state, contacts, None)
            if d is not None:
                yield d, ds.provider_id


def pending_jobs(state: IncidentState, contacts: ContactSet, update_no: int,
                 include_unknown: bool = False) -> Iterator[list[Delivery]]:
    """Jobs for the deliveries of an update that have no outcome yet, threads grouped."""
    wanted = {"planned", "attempting", "unknown"} if include_unknown else {"planned"}
    # Only the parts of threads are grouped (a list per thread for 100,000 single messages
    # was a quarter of a large resume's memory); jobs keep the order of the plan.
    groups: dict[str, list[DeliveryState]] = {}
    for ds in state.deliveries.values():
        if ds.update_no == update_no and int(ds.payload.get("parts", 1)) > 1:
            groups.setdefault(ds.key.rsplit("/", 1)[0], []).append(ds)
    for ds in list(state.deliveries.values()):  # (a snapshot: the feed is lazy)
        if ds.update_no != update_no:
            continue
        if int(ds.payload.get("parts", 1)) <= 1:
            if ds.status in wanted:
                single = delivery_from_state(ds, state, contacts, ds.payload.get("reply_to"))
                if single is not None:
                    yield [single]
            continue
        members = groups.pop(ds.key.rsplit("/", 1)[0], None)
        if members is None:
            continue  # (the thread was sent at its first part)
        members.sort(key=lambda d: int(d.payload.get("part", 1)))
        job: list[Delivery] = []
        previous: DeliveryState | None = None
        for member in members:
            if member.status in wanted:
                reply = member.payload.get("reply_to")
                if previous is not None and int(member.payload.get("part", 1)) > 1:
                    reply = previous.provider_id
                d = delivery_from_state(member, state, contacts, reply)
                if d is not None:
                    job.append(d)
            elif job:
                break  # a thread part after a gap waits for the next resume
            previous = member
        if job:
            yield job


@dataclass
class Known:
    """What a command knows of an incident's record: `state` is the fold of every record
    of the incident that lay before byte `before` of the log, then of the records it wrote
    itself, at `spans`."""

    state: IncidentState
    before: int
    spans: list[tuple[int, int]]


def finish_update(rt: Runtime, incident_id: str, update_no: int, result: DispatchResult,
                  known: Known | None = None) -> tuple[Verdict, IncidentState]:
    """The update's verdict from the record, and ``update.completed`` when it ran to the
    end (an interrupted or stopped run stays open for `resume`). With `known`, only the
    records appended after the command's own are read and folded onto its state, unless
    someone else recorded something of the incident in between: then, as without, the
    incident is folded from the whole record."""
    tail = rt.audit.records_after(incident_id, known.before, known.spans) if known else None
    if known is not None and tail is not None:
        state = known.state
        for rec in tail:
            apply(state, rec)
    else:
        state = fold(rt.audit.records(incident=incident_id), incident_id)
    v = verdict(state, update_no)
    if not result.interrupted and result.fatal is None:
        summary = v.to_dict()
        # Who and on which channels, never the addresses or the providers' error texts
        # (they quote addresses): each delivery's own record has those, redacted when the
        # log redacts recipients.
        for group in ("not_reached", "in_doubt"):
            summary[group] = [{"recipient": r["recipient"], "status": r["status"],
                               "tried": [{"channel": t["channel"], "outcome": t["outcome"]}
                                         for t in r["tried"]]} for r in summary[group]]
        failovers = [{k: v for k, v in f.items() if k != "reason"}
                     for f in result.failovers]
        rt.audit.append("update.completed", incident=incident_id,
                        payload={"update_no": update_no,
                                 "summary": {**summary, "failovers": failovers,
                                             "elapsed_s": round(result.elapsed_s, 3)}})
    return v, state


def in_doubt_list(state: IncidentState, update_no: int) -> list[dict[str, Any]]:
    return [{"key": d.key, "channel": d.channel, "recipient": d.recipient,
             "contact": d.contact_id or None, "attempts": d.attempts}
            for d in state.in_doubt(update_no)]
