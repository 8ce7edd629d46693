"""One verdict per outcome: who an update reached, read from the record.

The dispatcher's own counters see only what one run did; a resume, a failover or a thread
cut mid-way would make them disagree with the log. So the summary a command prints, its
``--json`` and its exit code are all derived here from the incident's folded state, the
same state `status` and `timeline` read.

The unit is the person (a contact), not the delivery: a person is *reached* when any of
their deliveries in the update was sent, on whatever channel; *in doubt* when none was sent
but one may have been (unknown, or attempted with no answer); *not reached* otherwise
(failed, skipped for want of an address, or still unsent). People skipped because they
opted out are not intended. A public broadcast counts as one recipient per channel: reached
when every part was sent or carried on its fallback channels.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from incident_notify.incident import DeliveryState, IncidentState

STATUS_COLUMNS = ("sent", "failed", "failed_over", "skipped", "unknown", "planned")
IN_DOUBT = ("unknown", "attempting")


@dataclass
class Recipient:
    who: str
    """Contact id, or ``public:<channel>`` for a broadcast."""
    status: str
    """reached, in_doubt or not_reached."""
    tried: list[dict[str, Any]] = field(default_factory=list)
    """Each delivery: channel, recipient, outcome, error."""

    def to_dict(self) -> dict[str, Any]:
        return {"recipient": self.who, "status": self.status, "tried": self.tried}


@dataclass
class Verdict:
    channels: dict[str, Counter[str]]
    recipients: list[Recipient]

    def count(self, status: str) -> int:
        return sum(1 for r in self.recipients if r.status == status)

    @property
    def complete(self) -> bool:
        return all(r.status == "reached" for r in self.recipients)

    @property
    def not_reached(self) -> list[Recipient]:
        return [r for r in self.recipients if r.status == "not_reached"]

    @property
    def in_doubt(self) -> list[Recipient]:
        return [r for r in self.recipients if r.status == "in_doubt"]

    def total(self, status: str) -> int:
        return sum(c[status] for c in self.channels.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "channels": {ch: {k: c.get(k, 0) for k in STATUS_COLUMNS}
                         for ch, c in sorted(self.channels.items())},
            "totals": {k: self.total(k) for k in STATUS_COLUMNS},
            "people": {"intended": len(self.recipients), "reached": self.count("reached"),
                       "in_doubt": self.count("in_doubt"),
                       "not_reached": self.count("not_reached")},
            "not_reached": [r.to_dict() for r in self.not_reached][:500],
            "in_doubt": [r.to_dict() for r in self.in_doubt][:500],
        }


def _tried(d: DeliveryState) -> dict[str, Any]:
    return {"channel": d.channel, "recipient": d.recipient or "public",
            "outcome": "in_doubt" if d.status in IN_DOUBT else d.status,
            "error": d.error}


def _broadcast_status(parts: list[DeliveryState]) -> str:
    statuses = {d.status for d in parts}
    if statuses <= {"sent", "failed_over"}:
        return "reached"
    if statuses & {"failed", "skipped", "planned"}:
        return "not_reached"
    return "in_doubt"


def _person_status(deliveries: list[DeliveryState]) -> str:
    statuses = {d.status for d in deliveries}
    if "sent" in statuses:
        return "reached"
    if statuses & set(IN_DOUBT):
        return "in_doubt"
    return "not_reached"


def verdict(state: IncidentState, update_no: int) -> Verdict:
    """The outcome of one update, from the record."""
    channels: dict[str, Counter[str]] = {}
    groups: dict[str, list[DeliveryState]] = {}
    for d in state.deliveries.values():
        if d.update_no != update_no:
            continue
        channels.setdefault(d.channel, Counter())[d.status] += 1
        if d.status == "skipped" and d.opted_out:
            continue  # opted out: not someone this update intends to reach
        contact = d.contact_id
        who = contact or f"public:{d.channel}"
        groups.setdefault(who, []).append(d)
    recipients = []
    for who, deliveries in groups.items():
        judge = _person_status if not who.startswith("public:") else _broadcast_status
        status = judge(deliveries)
        tried = [] if status == "reached" else [_tried(d) for d in deliveries]
        recipients.append(Recipient(who, status, tried))
    recipients.sort(key=lambda r: r.who)
    return Verdict(channels, recipients)
