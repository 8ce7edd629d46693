"""What an audit record may contain: the events, and the payload keys (with their kinds)
each event must carry because a reader relies on them. The writer refuses a record that
breaks this, `verify` reports one, and every reader skips one instead of crashing."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

EVENTS = (
    "incident.declared", "incident.updated", "incident.resolved", "incident.reopened",
    "message.rendered", "update.planned", "update.completed",
    "delivery.planned", "delivery.attempt", "delivery.sent", "delivery.failed",
    "delivery.unknown", "delivery.skipped", "delivery.failover", "delivery.settled",
    "channel.circuit_open", "channel.circuit_closed", "optout.added",
    "audit.torn_tail_recovered", "reply.received",
)

def is_int(v: Any) -> bool:
    return type(v) is int  # JSON integers; True/False are not counts


_INT = "int"
Kind = Any
"""A tuple of types for isinstance, or _INT for a JSON integer (not a bool)."""
_STR: Kind = (str,)
_OPT_STR: Kind = (str, type(None))
_LIST: Kind = (list,)
_DICT: Kind = (dict,)

_LIFECYCLE_SCHEMA: dict[str, Kind] = {"stage": _STR, "update_no": _INT, "variables": _DICT,
                                      "message": _STR}
PAYLOAD_SCHEMA: dict[str, dict[str, Kind]] = {
    "incident.declared": {**_LIFECYCLE_SCHEMA, "playbook": _STR},
    "incident.updated": _LIFECYCLE_SCHEMA, "incident.resolved": _LIFECYCLE_SCHEMA,
    "incident.reopened": _LIFECYCLE_SCHEMA,
    "message.rendered": {"digest": _STR, "update_no": _INT, "parts": _LIST,
                         "subject": _OPT_STR, "html": _OPT_STR},
    "update.planned": {"update_no": _INT}, "update.completed": {"update_no": _INT},
    "delivery.planned": {"update_no": _INT, "part": _INT, "parts": _INT},
    "delivery.attempt": {"attempt": _INT},
    "delivery.sent": {"provider_id": _STR},
    "delivery.settled": {"outcome": _STR},
    "delivery.skipped": {"reason": _STR},
    "reply.received": {"id": _STR, "text": _STR},
}
"""Payload keys each event must carry, with their kind: what the readers rely on."""
_RECORD_TYPES: tuple[tuple[str, Kind], ...] = (
    ("incident", _OPT_STR), ("channel", _OPT_STR), ("recipient", _OPT_STR),
    ("key", _OPT_STR), ("ts", _STR), ("actor", _STR), ("event", _STR), ("payload", _DICT))
_EVENTS = frozenset(EVENTS)
_NULLABLE_STR = frozenset({str, type(None)})
_MISSING = object()
_FAST_PAYLOAD: dict[str, tuple[tuple[str, frozenset[type]], ...]] = {
    event: tuple((key, frozenset({int}) if kind is _INT else frozenset(kind))
                 for key, kind in PAYLOAD_SCHEMA.get(event, {}).items())
    for event in EVENTS}
"""Per event, each required payload key with the exact types that pass (the fast path:
a subclass or a missing key goes to the exact loop)."""
_DEEP_CHECKS = frozenset({"message.rendered", *(e for e in EVENTS if e.startswith("incident."))})
"""Events whose payload has members inside to check: always the exact loop."""


def record_problem(data: Mapping[str, Any]) -> str | None:
    """What is wrong with a well-chained record's content (a payload the readers could not
    use), or None. `verify` reports it; readers refuse the record instead of crashing.
    (Called for every record `verify` reads: the common case, every member of the plain
    type JSON gives it, is one expression; anything else takes the loop that names it.)"""
    get = data.get
    if type(get("incident")) in _NULLABLE_STR and type(get("channel")) in _NULLABLE_STR and \
            type(get("recipient")) in _NULLABLE_STR and type(get("key")) in _NULLABLE_STR and \
            type(get("ts")) is str and type(get("actor")) is str and \
            type(get("event")) is str and type(get("payload")) is dict:
        event = data["event"]
        fast = _FAST_PAYLOAD.get(event)
        if fast is not None:
            payload = data["payload"]
            if all(type(payload.get(key, _MISSING)) in kinds for key, kinds in fast) and \
                    event not in _DEEP_CHECKS:
                return None
    return _exact_problem(data)


def _exact_problem(data: Mapping[str, Any]) -> str | None:
    """`record_problem` member by member, naming the first problem."""
    for name, kind in _RECORD_TYPES:
        value = data.get(name)
        if not (type(value) is int if kind is _INT else isinstance(value, kind)):
            return f"field {name!r} has the wrong type"
    event = data["event"]
    if event not in _EVENTS:
        return f"unknown event {event!r}"
    payload = data["payload"]
    schema = PAYLOAD_SCHEMA.get(event)
    if schema is None:
        return None
    for key, kind in schema.items():
        if key not in payload:
            return f"{event} record without {key!r}"
        value = payload[key]
        if not (type(value) is int if kind is _INT else isinstance(value, kind)):
            return f"{event} record with a malformed {key!r}"
    if event == "message.rendered" and not all(isinstance(p, str) for p in payload["parts"]):
        return "message.rendered record with malformed parts"
    if event.startswith("incident.") and not all(
            isinstance(k, str) and isinstance(v, str) for k, v in payload["variables"].items()):
        return f"{event} record with malformed variables"
    return None
