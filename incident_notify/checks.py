"""`validate`: everything CI must prove before a playbook is trusted in an outage.

For each playbook: the schema and cross-references (playbook.py), variables used but not
declared, the sensitivity guard (nothing internal reaches a public audience or channel),
the contact sources it names, and every stage x audience x channel (fallbacks included)
rendered twice — with the declared example values and with every variable at its
declared max length — and measured against the channel's real limit.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from incident_notify.errors import NotFoundError, PlaybookError, Problem, ProblemsError
from incident_notify.messages import (
    IncidentContext,
    RenderedMessage,
    VariableMode,
    compose,
    describe_measure,
    make_renderer,
    resolve_variables,
    used_variables,
)
from incident_notify.playbook import Playbook, load_playbook, message_targets

if TYPE_CHECKING:
    from incident_notify.render import Renderer


@dataclass(frozen=True)
class CheckRow:
    """One rendered message as validate measured it."""

    stage: str
    audience: str | None
    channel: str
    channel_type: str
    mode: str
    """'example' or 'worst' (every variable at its max length)."""
    measure: str
    parts: int
    ok: bool
    fallback_from: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage, "audience": self.audience, "channel": self.channel,
            "channel_type": self.channel_type, "mode": self.mode, "measure": self.measure,
            "parts": self.parts, "ok": self.ok, "fallback_from": self.fallback_from,
        }


@dataclass
class PlaybookReport:
    path: Path
    name: str | None = None
    rows: list[CheckRow] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    contacts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "name": self.name, "ok": self.ok,
            "messages": [r.to_dict() for r in self.rows],
            "problems": [p.to_dict() for p in self.problems],
            "contacts": self.contacts,
        }


def _sensitivity_problems(pb: Playbook, renderer: Renderer) -> Iterator[Problem]:
    """Every path by which internal content would reach the public, at its line."""
    from incident_notify.sensitivity import leak_problems

    for sname in pb.stage_names:
        yield from leak_problems(pb, renderer, sname)


ContactSets = dict[tuple[tuple[Path, ...], str], Any]
"""Contact sets already loaded in one validate run, by (sources, region)."""


def check_playbook(path: Path, *, check_contacts: bool = True, region: str = "US",
                   loaded: ContactSets | None = None) -> PlaybookReport:
    """Run every check on one playbook file; problems are collected, never raised (but an
    unknown default `region` for national phone numbers is a ConfigError). Playbooks that
    share contact sources share one load through `loaded`."""
    report = PlaybookReport(path=path)
    try:
        pb = load_playbook(path)
    except ProblemsError as exc:
        report.problems.extend(exc.problems)
        return report
    except NotFoundError as exc:  # (validate reports it with the others: exit 3)
        report.problems.append(Problem(str(path), None, None, "file not found",
                                       exc.hint))
        return report
    report.name = pb.name
    renderer = make_renderer(pb)
    for name, where in used_variables(pb, renderer):
        report.problems.append(pb.source.problem(
            where, f"template uses undeclared variable {name!r}",
            f"declare it under variables: with an example and max_length, or fix the spelling "
            f"(declared: {', '.join(pb.model.variables) or 'none'})"))
    report.problems.extend(_sensitivity_problems(pb, renderer))
    if check_contacts and pb.model.contacts:
        report.problems.extend(_contact_problems(pb, report, region,
                                                 {} if loaded is None else loaded))
    if report.problems:
        return report
    modes: tuple[VariableMode, ...] = ("example", "worst")
    for mode in modes:
        if report.problems:
            break  # the worst case would only repeat what the examples already showed
        values = resolve_variables(pb, {}, mode=mode)
        for stage in pb.stage_names:
            ctx = IncidentContext(stage=stage, message="Example free-text update."
                                  if mode == "example" else "x" * 140)
            for audience, channel, origin in message_targets(pb, stage):
                try:
                    msg = compose(pb, renderer, stage, channel, audience, values, ctx,
                                  fallback_from=origin)
                except ProblemsError as exc:
                    report.problems.extend(p for p in exc.problems if p not in report.problems)
                    continue
                report.rows.append(_row(msg, mode))
                report.problems.extend(p for p in msg.problems if p not in report.problems)
                if mode == "example":
                    # A free-text update must reach this channel too (a short one fits).
                    free = compose(pb, renderer, stage, channel, audience, values, ctx,
                                   fallback_from=origin, carry_message=True)
                    report.problems.extend(p for p in free.problems
                                           if p not in report.problems)
    return report


def _row(msg: RenderedMessage, mode: str) -> CheckRow:
    worst = max(msg.measures, key=lambda m: m.value)
    text = describe_measure(worst)
    if len(msg.parts) > 1:
        text = f"thread of {len(msg.parts)}, longest {text}"
    return CheckRow(
        stage=msg.stage, audience=msg.audience, channel=msg.channel,
        channel_type=msg.channel_type, mode=mode, measure=text, parts=len(msg.parts),
        ok=msg.ok, fallback_from=msg.fallback_from,
    )


def _contact_problems(pb: Playbook, report: PlaybookReport, region: str,
                      loaded: ContactSets) -> list[Problem]:
    from incident_notify.contacts import load_contacts

    missing = [p for p in pb.contact_paths() if not p.exists()]
    if missing:
        return [pb.source.problem(("contacts",), f"contacts source {str(p)!r} not found",
                                  "fix the path (relative to the playbook)") for p in missing]
    key = (tuple(p.resolve() for p in pb.contact_paths()), region)
    if key not in loaded:
        loaded[key] = load_contacts(pb.contact_paths(), default_region=region)
    contacts = loaded[key]
    report.contacts = {"people": len(contacts.contacts), "invalid": contacts.invalid_records}
    problems = list(contacts.problems)
    for aname, aud in pb.model.audiences.items():
        sel = aud.fallback_select if aud.kind == "public" else aud.select
        if sel.is_empty():
            continue
        count = sum(1 for _ in contacts.select(groups=sel.groups, tags=sel.tags, ids=sel.ids))
        report.contacts[f"audience:{aname}"] = count
        if count == 0:
            problems.append(pb.source.problem(
                ("audiences", aname), f"audience {aname!r} selects nobody in the contacts",
                "check the groups/tags against the contact files"))
    return problems


def validate_paths(paths: list[Path], *, check_contacts: bool = True,
                   region: str = "US") -> list[PlaybookReport]:
    from incident_notify.playbook import find_playbooks

    files = find_playbooks(paths)
    if not files:
        raise PlaybookError([Problem(", ".join(map(str, paths)), None, None,
                                     "no playbook (*.yaml) found",
                                     "pass playbook files or directories holding them")])
    loaded: ContactSets = {}
    return [check_playbook(f, check_contacts=check_contacts, region=region, loaded=loaded)
            for f in files]
