"""What an audit record may contain: the events, and the payload keys (with their kinds)
each event must carry because a reader relies on them. The writer refuses a record that
breaks this, `verify` reports one, and every reader skips one instead of crashing."""

from __future__ import annotations

import itertools
import operator
from collections.abc import Mapping
from typing import Any

EVENTS = (
    "incident.declared", "incident.updated", "incident.resolved", "incident.reopened",
    "message.rendered", "update.planned", "update.completed",
    "delivery.planned", "delivery.attempt", "delivery.sent", "delivery.failed",
    "delivery.unknown", "delivery.skipped", "delivery.failover", "delivery.settled",
    "delivery.requeued", "delivery.held", "channel.circuit_open", "channel.circuit_closed",
    "optout.added", "audit.torn_tail_recovered", "reply.received",
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
    "delivery.attempt": {"attempt": _INT}, "delivery.held": {"attempt": _INT},
    "delivery.sent": {"provider_id": _STR},
    "delivery.settled": {"outcome": _STR},
    "delivery.requeued": {"reason": _STR},
    "delivery.skipped": {"reason": _STR},
    "reply.received": {"id": _STR, "text": _STR},
}
"""Payload keys each event must carry, with their kind: what the readers rely on."""
_RECORD_TYPES: tuple[tuple[str, Kind], ...] = (
    ("incident", _OPT_STR), ("channel", _OPT_STR), ("recipient", _OPT_STR),
    ("key", _OPT_STR), ("ts", _STR), ("actor", _STR), ("event", _STR), ("payload", _DICT))
_EVENTS = frozenset(EVENTS)


def _passing(kinds: list[Kind]) -> frozenset[tuple[type, ...]]:
    """Every tuple of exact types that passes, member by member, kinds `kinds`."""
    return frozenset(itertools.product(*((int,) if kind is _INT else kind for kind in kinds)))


_DEEP_CHECKS = frozenset({"message.rendered", *(e for e in EVENTS if e.startswith("incident."))})
"""Events whose payload has members inside to check: always the exact loop."""
_RECORD_GET = operator.itemgetter(*(name for name, _ in _RECORD_TYPES))
_RECORD_PASS = _passing([kind for _, kind in _RECORD_TYPES])
_EVENT_AT, _PAYLOAD_AT = 6, 7
_FAST_PAYLOAD: dict[str, tuple[Any, frozenset[tuple[type, ...]]] | None] = {}
"""Per event with no deep check: None when its payload has no required key, else a getter
of the required keys (named twice when there is one, so that it gives a tuple) and the
tuples of exact types that pass. A subclass or a missing key goes to the exact loop."""
for _event in EVENTS:
    if _event not in _DEEP_CHECKS:
        _keys = list(PAYLOAD_SCHEMA.get(_event, {}).items()) * \
            (2 if len(PAYLOAD_SCHEMA.get(_event, {})) == 1 else 1)
        _FAST_PAYLOAD[_event] = (operator.itemgetter(*(k for k, _ in _keys)),
                                 _passing([kind for _, kind in _keys])) if _keys else None


def record_problem(data: Mapping[str, Any]) -> str | None:
    """What is wrong with a well-chained record's content (a payload the readers could not
    use), or None. `verify` reports it; readers refuse the record instead of crashing.
    (Called for every record `verify` reads: the common case, every member of the plain
    type JSON gives it, is a few lookups in sets of passing type tuples; anything else
    takes the loop that names it.)"""
    try:
        values = _RECORD_GET(data)
        if tuple(map(type, values)) in _RECORD_PASS:
            event = values[_EVENT_AT]
            if event in _FAST_PAYLOAD:
                fast = _FAST_PAYLOAD[event]
                if fast is None or tuple(map(type, fast[0](values[_PAYLOAD_AT]))) in fast[1]:
                    return None
    except KeyError:
        pass
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
