"""From a playbook stage to the exact text each channel receives.

`compose()` renders one (stage, channel, audience) message with the incident's variables,
measures it with the channel's own length rule, splits an over-long tweet into a
numbered thread when the playbook allows it, and reports every limit problem with the
playbook line it came from. validate, preview and the planner all go through here, so
what CI checks is exactly what is sent.

Long on purpose: variables, the template context, composing and measuring one message are
one step of the pipeline (render, then check against the channel), sharing that context.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import cycle, islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from incident_notify.errors import PlaybookError, Problem, UsageError, did_you_mean
from incident_notify.playbook import BUILTIN_VARIABLES, MessageSpec, Playbook, TemplateFile

if TYPE_CHECKING:
    from incident_notify.limits import Measure
    from incident_notify.render import Renderer


@dataclass(frozen=True)
class RenderedMessage:
    """One channel's rendered, measured message (a tweet thread has several parts)."""

    stage: str
    channel: str
    channel_type: str
    audience: str | None
    parts: tuple[str, ...]
    subject: str | None = None
    html: str | None = None
    measures: tuple[Measure, ...] = ()
    problems: tuple[Problem, ...] = ()
    fallback_from: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def text(self) -> str:
        return "\n".join(self.parts)


@dataclass
class IncidentContext:
    """The built-in variables every template sees (`incident.*`, `message`, ...)."""

    id: str = "INC-EXAMPLE-0001"
    stage: str = ""
    stage_title: str = ""
    update_no: int = 1
    declared_at: str = ""
    message: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def template_dirs(pb: Playbook) -> list[Path]:
    """Where `template:` files are looked up, first match wins: `templates/` beside the
    playbook, then `templates/` beside the playbooks' folder (and the operator's
    INCIDENT_NOTIFY_TEMPLATES first). Never the playbook's own folder or the working
    directory: contacts, secrets and playbooks live there, and a template could include
    them into a public tweet."""
    return [d for d in _template_places(pb) if d.is_dir()]


def _template_places(pb: Playbook) -> list[Path]:
    dirs = [pb.path.parent / "templates", pb.path.parent.parent / "templates"]
    env = os.environ.get("INCIDENT_NOTIFY_TEMPLATES")
    if env:
        dirs.insert(0, Path(env))
    unique: list[Path] = []
    for d in dirs:
        resolved = d.resolve()
        if resolved not in unique:
            unique.append(resolved)
    return unique


def make_renderer(pb: Playbook) -> Renderer:
    from incident_notify.render import Renderer

    return Renderer(template_dirs(pb), looked_in=_template_places(pb))


# ------------------------------------------------------------------ variables
VariableMode = Literal["given", "example", "worst"]
_SET_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.S)
_HIDDEN = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
"""Characters nobody means to send: control characters (a tab or a line break excepted)
and the bidirectional overrides and isolates that reorder how text around them shows.
They come from pasting (a terminal's colour codes, a Windows line end, a web page), are
invisible in a preview, and would go out as they are."""


def hidden_character(text: str) -> str | None:
    """Where `text` holds a character nobody means to send, described; else None."""
    import unicodedata

    found = _HIDDEN.search(text)
    if found is None:
        return None
    char = found.group()
    code = ord(char)
    name = unicodedata.name(char, "") or (_C0[code] if code < 32 else "DELETE" if code == 127
                                          else "a control character")
    return f"U+{code:04X} ({name}) at character {found.start() + 1}"


_C0 = ("NULL", "START OF HEADING", "START OF TEXT", "END OF TEXT", "END OF TRANSMISSION",
       "ENQUIRY", "ACKNOWLEDGE", "BELL", "BACKSPACE", "TAB", "LINE FEED", "LINE TABULATION",
       "FORM FEED", "CARRIAGE RETURN", "SHIFT OUT", "SHIFT IN", "DATA LINK ESCAPE",
       "DEVICE CONTROL ONE", "DEVICE CONTROL TWO", "DEVICE CONTROL THREE",
       "DEVICE CONTROL FOUR", "NEGATIVE ACKNOWLEDGE", "SYNCHRONOUS IDLE",
       "END OF TRANSMISSION BLOCK", "CANCEL", "END OF MEDIUM", "SUBSTITUTE", "ESCAPE",
       "FILE SEPARATOR", "GROUP SEPARATOR", "RECORD SEPARATOR", "UNIT SEPARATOR")


def check_message(message: str) -> None:
    """A free-text update (--message) holds only what the commander means to send."""
    where = hidden_character(message)
    if where is not None:
        raise UsageError(f"--message holds an invisible character, {where}: it would be "
                         "sent as it is", hint="retype the text (it was probably pasted)")


def parse_set(items: list[str]) -> dict[str, str]:
    """`--set key=value` items into a dict; a malformed item is a usage error."""
    values: dict[str, str] = {}
    for item in items:
        match = _SET_RE.match(item)
        if not match:
            raise UsageError(
                f"--set {item!r} is not of the form name=value",
                hint="e.g. --set site=LON-2 --set eta='30 minutes'",
            )
        values[match.group(1)] = match.group(2)
    return values


def resolve_variables(
    pb: Playbook, given: Mapping[str, str], mode: VariableMode = "given"
) -> dict[str, str]:
    """The playbook's variables with values: from `given`, or examples / worst cases.

    `given` mode refuses unknown names (a typo must not silently render a default) and
    missing required ones, before anything renders.
    """
    declared = pb.model.variables
    smap = pb.source
    problems: list[Problem] = []
    values: dict[str, str] = {}
    for name in given:
        if name not in declared:
            problems.append(smap.problem(
                ("variables",), f"unknown variable {name!r} given"
                + did_you_mean(name, declared),
                f"declared variables: {', '.join(declared) or '(none)'}"))
    for name, var in declared.items():
        if mode == "example":
            values[name] = var.example
        elif mode == "worst":
            target = var.max_length or len(var.example)
            source = var.example or "x"
            values[name] = "".join(islice(cycle(source), max(target, len(var.example))))
        elif name in given and given[name].strip():
            values[name] = given[name]
        elif var.default is not None and var.default.strip():
            values[name] = var.default
        elif var.required:
            # An empty or blank value is refused like a missing one: a public tweet must
            # never read "power loss at ." because --set site= was typed in a hurry.
            state = "is empty" if name in given else "has no value"
            problems.append(smap.problem(
                ("variables", name), f"required variable {name!r} {state}",
                f"pass --set {name}=... (e.g. {var.example!r}), --vars FILE, or "
                f"INCIDENT_NOTIFY_VAR_{name.upper()}"))
            continue
        else:
            values[name] = ""
        value = values[name]
        hidden = hidden_character(value) if mode == "given" else None
        if hidden is not None:
            problems.append(smap.problem(
                ("variables", name), f"variable {name!r} holds an invisible character, "
                f"{hidden}: it would be sent as it is",
                "retype the value (it was probably pasted)"))
        if mode == "given" and var.max_length is not None and len(value) > var.max_length:
            problems.append(smap.problem(
                ("variables", name), f"variable {name!r} is {len(value)} characters, more "
                f"than its max_length {var.max_length}", "shorten the value"))
        if mode == "given" and var.pattern and value and not re.fullmatch(var.pattern, value):
            problems.append(smap.problem(
                ("variables", name), f"variable {name!r} value {value!r} does not match "
                f"pattern {var.pattern!r}"))
    if problems:
        raise PlaybookError(problems)
    return values


def template_context(
    pb: Playbook, values: Mapping[str, str], ctx: IncidentContext,
    failover: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    stage = pb.model.stages.get(ctx.stage)
    context: dict[str, Any] = dict(values)
    context.update(
        incident={
            "id": ctx.id,
            "title": pb.model.title,
            "severity": pb.model.severity,
            "stage": ctx.stage,
            "stage_title": (stage.title if stage and stage.title else ctx.stage.title()),
            "update_no": ctx.update_no,
            "declared_at": ctx.declared_at,
            **ctx.extra,
        },
        message=ctx.message,
        stage=ctx.stage,
        playbook={"name": pb.model.name, "title": pb.model.title},
        failover=dict(failover) if failover else None,
    )
    return context


# ------------------------------------------------------------------ composing
def _render_source(
    renderer: Renderer, pb: Playbook, source: str | TemplateFile, context: Mapping[str, Any],
    path: tuple[str | int, ...], *, html: bool = False,
) -> str:
    pos = pb.source.position(path)
    if isinstance(source, TemplateFile):
        return renderer.render_file(
            source.template, context, html=html, origin=str(pb.path),
            line=pos.line if pos else None,
        )
    return renderer.render(
        source, context, origin=str(pb.path), line=pos.content_line if pos else None, html=html
    )


def _body_path(spec: MessageSpec, path: tuple[str | int, ...]) -> tuple[str | int, ...]:
    # SourceMap.position falls back to the message's own line for a bare string.
    return (*path, "template") if spec.template is not None else (*path, "text")


def channel_limits(pb: Playbook, channel: str) -> tuple[str, int | None, int]:
    """(length rule, max length, max SMS segments) of a channel instance."""
    from incident_notify.channels import channel_class

    cfg = pb.model.channels[channel]
    cls = channel_class(cfg.type)
    max_segments = int(cfg.options().get("max_segments", 3))
    return cls.default_limits.length_rule, cls.default_limits.max_length, max_segments


def compose(
    pb: Playbook,
    renderer: Renderer,
    stage: str,
    channel: str,
    audience: str | None,
    values: Mapping[str, str],
    ctx: IncidentContext,
    *,
    fallback_from: str | None = None,
    carry_message: bool = False,
) -> RenderedMessage:
    """Render and measure one message; raise TemplateError for template problems.

    `carry_message`: a free-text update. When the stage's message does not carry the
    commander's words (``ctx.message``), the playbook's ``free_text`` message for the channel
    is used instead, or the built-in one: the words reach every channel.
    """
    from incident_notify.limits import measure, split_thread

    found = pb.message_for(stage, channel, audience)
    ctype = pb.model.channels[channel].type
    if found is None:
        raise PlaybookError([pb.source.problem(
            ("stages", stage, "messages"),
            f"stage {stage!r} has no message for channel {channel!r}",
            f"add messages: {{{channel}: \"...\"}}")])
    spec, path = found
    failover = None
    if fallback_from is not None:
        failover = {"from": fallback_from, "from_type": pb.model.channels[fallback_from].type}
    context = template_context(pb, values, ctx, failover)
    text = _render_source(renderer, pb, spec.body, context, _body_path(spec, path)).strip()
    if carry_message and ctx.message.strip() and ctx.message.strip() not in text:
        spec, path = pb.free_text_for(channel) or (_builtin_free_text(pb, channel), path)
        text = _render_source(renderer, pb, spec.body, context,
                              _body_path(spec, path)).strip()
    if fallback_from is not None and pb.model.failover_notice:
        notice = renderer.render(
            pb.model.failover_notice, context, origin=str(pb.path),
            line=_line(pb, ("failover_notice",)),
        ).strip()
        if notice:
            text = f"{notice}\n\n{text}"
    subject = html = None
    if spec.subject is not None:
        subject = _render_source(renderer, pb, spec.subject, context, (*path, "subject")).strip()
    if spec.html is not None:
        html = _render_source(renderer, pb, spec.html, context, (*path, "html"), html=True)
    rule, max_length, max_segments = channel_limits(pb, channel)
    problems: list[Problem] = []
    where = pb.source.position(path)

    def problem(message: str, hint: str) -> None:
        problems.append(Problem(str(pb.path), where.line if where else None,
                                where.column if where else None, message, hint))

    parts = [text]
    if not text:
        problem(f"stage {stage!r}, channel {channel!r}: the message renders empty",
                "check the template and its variables")
    for label, rendered in (("message", text), ("subject", subject), ("HTML part", html)):
        hidden = hidden_character(rendered or "")
        if hidden is not None:  # (a template's: the values are refused where given)
            problem(f"stage {stage!r}, channel {channel!r}: the {label} holds an invisible "
                    f"character, {hidden}", "remove it from the template")
    if rule == "email":
        if subject is None:
            problem(f"stage {stage!r}, channel {channel!r}: an email needs a subject",
                    "add subject: \"...\" to this message")
    elif subject is not None or html is not None:
        problem(f"stage {stage!r}, channel {channel!r} ({ctype}): subject/html are for "
                "email channels only", "remove them from this message")
    m = measure(rule, text, max_length=max_length, max_segments=max_segments, subject=subject)
    measures = [m]
    if not m.ok and rule == "twitter-weighted":
        if spec.thread:
            parts = split_thread(text, max_length or 280)
            measures = [measure(rule, p, max_length=max_length) for p in parts]
        else:
            problem(f"stage {stage!r}, channel {channel!r}: tweet is {m.value} weighted "
                    f"characters, over the limit of {m.limit}, and thread: false",
                    "shorten the template or allow thread: true")
    elif not m.ok:
        problem(f"stage {stage!r}, channel {channel!r}: {describe_measure(m)}, over the limit",
                _limit_hint(rule))
    return RenderedMessage(
        stage=stage, channel=channel, channel_type=ctype, audience=audience,
        parts=tuple(parts), subject=subject, html=html, measures=tuple(measures),
        problems=tuple(problems), fallback_from=fallback_from,
    )


def _builtin_free_text(pb: Playbook, channel: str) -> MessageSpec:
    """A free-text update on a channel whose stage message ignores ``{{ message }}``."""
    rule = channel_limits(pb, channel)[0]
    if rule == "email":
        return MessageSpec(subject="[{{ incident.id }}] {{ incident.title }}: "
                           "{{ incident.stage_title }}", text="{{ message }}")
    return MessageSpec(text="{{ incident.title }} ({{ incident.stage_title }}): {{ message }}")


def describe_measure(m: Measure) -> str:
    """'172/280 weighted chars', '2/3 segments (GSM-7)'."""
    text = f"{m.value}/{m.limit} {m.unit}" if m.limit is not None else f"{m.value} {m.unit}"
    return f"{text} ({m.detail})" if m.detail else text


def _line(pb: Playbook, path: tuple[str | int, ...]) -> int | None:
    pos = pb.source.position(path)
    return pos.content_line if pos else None


def _limit_hint(rule: str) -> str:
    return {
        "sms-segments": "shorten the text, avoid characters outside GSM-7 (emoji, curly "
        "quotes force UCS-2 and halve the room), or raise max_segments on the channel",
        "chars": "shorten the template or the variables' max_length",
        "email": "keep the subject on one line and lines under 998 bytes",
    }.get(rule, "shorten the message")


def used_variables(pb: Playbook, renderer: Renderer) -> list[tuple[str, tuple[str | int, ...]]]:
    """Every variable name templates use that is neither declared nor built in."""
    undeclared: list[tuple[str, tuple[str | int, ...]]] = []
    declared = set(pb.model.variables) | BUILTIN_VARIABLES
    for sname, stage in pb.model.stages.items():
        specs: list[tuple[MessageSpec, tuple[str | int, ...]]] = [
            (s, ("stages", sname, "messages", k)) for k, s in stage.messages.items()
        ]
        for aud, msgs in stage.audience_messages.items():
            specs += [(s, ("stages", sname, "audience_messages", aud, k)) for k, s in msgs.items()]
        for spec, path in specs:
            for part, source in (("text", spec.body), ("subject", spec.subject),
                                 ("html", spec.html)):
                if source is None:
                    continue
                if isinstance(source, TemplateFile):
                    names = renderer.variables_used(name=source.template)
                else:
                    names = renderer.variables_used(source=source)
                sub = (*path, "template") if spec.template and part == "text" else (*path, part)
                undeclared += [(n, sub) for n in sorted(names - declared)]
    return undeclared


def collect_variables(
    pb: Playbook, sets: list[str], vars_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Variable values from, in rising precedence: INCIDENT_NOTIFY_VAR_<NAME> in the
    environment, a --vars YAML/JSON file, then --set name=value."""
    from incident_notify.yamlmap import load_yaml

    env = os.environ if environ is None else environ
    given: dict[str, str] = {}
    by_key = {f"INCIDENT_NOTIFY_VAR_{name.upper()}": name for name in pb.model.variables}
    stray = sorted(k for k in env if k.startswith("INCIDENT_NOTIFY_VAR_") and k not in by_key)
    if stray:
        raise PlaybookError([pb.source.problem(
            ("variables",), f"{', '.join(stray)} in the environment names no variable of "
            f"this playbook", "unset it, or fix the spelling (declared: "
            f"{', '.join(by_key) or 'none'})")])
    for key, name in by_key.items():
        if key in env:
            given[name] = env[key]
    if vars_file is not None:
        data, smap = load_yaml(vars_file)
        if not isinstance(data, dict):
            raise PlaybookError([smap.problem((), "a variables file must be a mapping of "
                                              "name: value")])
        for key, value in data.items():
            if isinstance(value, dict | list):
                raise PlaybookError([smap.problem((key,), f"variable {key!r} must be a "
                                                  "plain value, not a list or mapping")])
            given[str(key)] = "" if value is None else str(value)
    given.update(parse_set(sets))
    return resolve_variables(pb, given, mode="given")
