"""What an audit record may contain: the events, and the payload keys (with their kinds)
each event must carry because a reader relies on them. The writer refuses a record that
breaks this, `verify` reports one, and every reader skips one instead of crashing."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

EVENTS = (
    "incident.declared", "incident.updated", "incident.resolved", "incident.reopened",
    "message.rendered", "update.planned", "update.completed",
    "delivery.planned", "delivery.attempt", "delivery.sent", "delivery.failed",
    "delivery.unknown", "delivery.skipped", "delivery.failover", "delivery.settled",
    "channel.circuit_open", "channel.circuit_closed", "optout.added",
    "audit.torn_tail_recovered", "reply.received",
)

def _str_or_none(v: Any) -> bool:
    return v is None or isinstance(v, str)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_list(v: Any) -> bool:
    return isinstance(v, list)


def _is_dict(v: Any) -> bool:
    return isinstance(v, dict)


Check = Callable[[Any], bool]
_LIFECYCLE_SCHEMA: dict[str, Check] = {"stage": _is_str, "update_no": is_int,
                                       "variables": _is_dict, "message": _is_str}
PAYLOAD_SCHEMA: dict[str, dict[str, Check]] = {
    "incident.declared": {**_LIFECYCLE_SCHEMA, "playbook": _is_str},
    "incident.updated": _LIFECYCLE_SCHEMA, "incident.resolved": _LIFECYCLE_SCHEMA,
    "incident.reopened": _LIFECYCLE_SCHEMA,
    "message.rendered": {"digest": _is_str, "update_no": is_int, "parts": _is_list,
                         "subject": _str_or_none, "html": _str_or_none},
    "update.planned": {"update_no": is_int}, "update.completed": {"update_no": is_int},
    "delivery.planned": {"update_no": is_int, "part": is_int, "parts": is_int},
    "delivery.attempt": {"attempt": is_int},
    "delivery.sent": {"provider_id": _is_str},
    "delivery.settled": {"outcome": _is_str},
    "delivery.skipped": {"reason": _is_str},
    "reply.received": {"id": _is_str, "text": _is_str},
}
"""Payload keys each event must carry, with their kind: what the readers rely on."""
_RECORD_TYPES: dict[str, Check] = {
    "incident": _str_or_none, "channel": _str_or_none, "recipient": _str_or_none,
    "key": _str_or_none, "ts": _is_str, "actor": _is_str, "event": _is_str,
    "payload": _is_dict}


def record_problem(data: Mapping[str, Any]) -> str | None:
    """What is wrong with a well-chained record's content (a payload the readers could not
    use), or None. `verify` reports it; readers refuse the record instead of crashing."""
    for name, check in _RECORD_TYPES.items():
        if not check(data.get(name)):
            return f"field {name!r} has the wrong type"
    if data["event"] not in EVENTS:
        return f"unknown event {data['event']!r}"
    payload = data["payload"]
    for key, check in PAYLOAD_SCHEMA.get(data["event"], {}).items():
        if key not in payload:
            return f"{data['event']} record without {key!r}"
        if not check(payload[key]):
            return f"{data['event']} record with a malformed {key!r}"
    if data["event"] == "message.rendered" and not all(isinstance(p, str)
                                                       for p in payload["parts"]):
        return "message.rendered record with malformed parts"
    if data["event"].startswith("incident.") and not all(
            isinstance(k, str) and isinstance(v, str) for k, v in payload["variables"].items()):
        return f"{data['event']} record with malformed variables"
    return None
