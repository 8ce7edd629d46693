"""Sensitivity is a property of data: internal content never reaches a public channel or a
public or customer audience, by any path.

What is internal: a stage marked ``sensitivity: internal``, a message marked so, a
variable marked so, and a template file whose first line is ``{# sensitivity: internal #}``
(and any template that includes or imports one). Anything rendered from internal data is
internal: a message is internal when any of those feeds it, the failover notice included.

Who is public: a channel whose type declares ``public = True`` (the contract, not the type
name: a Twitter account, a status page plugin), and every audience of kind ``public`` or
``customers``.

The same predicate serves `validate` (every stage x audience x channel, fallbacks
included, reported at its line) and the planner, which refuses such a message before
anything is recorded or sent, whatever path led to it (a fallback, a failover).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from incident_notify.errors import Problem
    from incident_notify.playbook import Playbook
    from incident_notify.render import Renderer

_MARK = re.compile(r"^\s*\{#-?\s*sensitivity:\s*internal\s*-?#\}")


def is_public(pb: Playbook, channel: str, audience: str | None) -> bool:
    """A message to this channel, for this audience, is read by the public (or customers)."""
    from incident_notify.channels import channel_class

    cls = channel_class(pb.model.channels[channel].type)
    if getattr(cls, "public", False):
        return True
    aud = pb.model.audiences.get(audience or "")
    return aud is not None and aud.kind in ("public", "customers")


def leak_problems(pb: Playbook, renderer: Renderer, stage: str) -> list[Problem]:
    """Every path by which a stage would carry internal content to a public channel or a
    public or customer audience (direct, or as a fallback with its notice), each located
    at its line. `validate`, `preview` and the send preflight all use this."""
    from incident_notify.playbook import message_targets

    problems: list[Problem] = []
    seen: set[tuple[str, str | None]] = set()
    for audience, channel, origin in message_targets(pb, stage):
        if (channel, audience) in seen or not is_public(pb, channel, audience):
            continue
        reason = internal_reason(pb, renderer, stage, channel, audience, origin)
        if reason is None:
            continue
        seen.add((channel, audience))
        found = pb.message_for(stage, channel, audience)
        where: tuple[str | int, ...] = found[1] if found else ("stages", stage)
        if pb.model.stages[stage].sensitivity == "internal":
            where = ("stages", stage, "sensitivity")
        via = f" (as the fallback of {origin!r})" if origin else ""
        problems.append(pb.source.problem(
            where, f"internal content would reach public audience/channel "
            f"{audience!r}/{channel!r}{via} at stage {stage!r}: {reason}",
            "give the public audience its own message without internal data, take the "
            "public channel off this path (audiences, fallback), or drop the marking"))
    return problems


def internal_reason(pb: Playbook, renderer: Renderer, stage: str, channel: str,
                    audience: str | None, fallback_from: str | None = None) -> str | None:
    """Why the message for (stage, channel, audience) is internal, or None."""
    if pb.model.stages[stage].sensitivity == "internal":
        return f"stage {stage!r} is internal"
    found = pb.message_for(stage, channel, audience)
    if found is None:
        return None
    spec, _ = found
    if spec.sensitivity == "internal":
        return f"its message for {channel!r} at stage {stage!r} is marked internal"
    sources: list[str] = []
    files: list[str] = []
    for part in (spec.body, spec.subject, spec.html):
        if part is None:
            continue
        if isinstance(part, str):
            sources.append(part)
        else:
            files.append(part.template)
    if fallback_from is not None and pb.model.failover_notice:
        sources.append(pb.model.failover_notice)
    for source in sources:
        reason = _template_reason(pb, renderer, source=source)
        if reason:
            return reason
    for name in files:
        reason = _template_reason(pb, renderer, name=name)
        if reason:
            return reason
    return None


def _template_reason(pb: Playbook, renderer: Renderer, *, source: str | None = None,
                     name: str | None = None, seen: set[str] | None = None) -> str | None:
    seen = set() if seen is None else seen
    if name is not None:
        if name in seen:
            return None
        seen.add(name)
    facts = renderer.facts(source, name)
    if name is not None and _MARK.match(facts.source):
        return f"template {name!r} is marked internal"
    internal_vars = {n for n, v in pb.model.variables.items() if v.sensitivity == "internal"}
    used = facts.variables & internal_vars
    if used:
        return f"it uses internal variable {sorted(used)[0]!r}"
    for included in facts.includes:
        if included is None:
            return "it includes a template chosen at render time, which cannot be checked"
        reason = _template_reason(pb, renderer, name=included, seen=seen)
        if reason:
            return f"{reason} (included)"
    return None
