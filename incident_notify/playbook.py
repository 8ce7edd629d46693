"""Playbook schema and loader. The reference is docs/playbook-format.md.

`load_playbook(path)` parses the YAML (keeping line numbers), validates it against the
schema (unknown keys refused) and checks cross-references (channels, audiences, stages,
fallbacks, channel options). Every problem in the file is collected, each naming its
line; rendering checks (templates, variables, limits) live in `incident_notify.checks`.

Long on purpose: the schema, the loader and the cross-reference checks of one file belong
together: each problem is located at its line by the same source map.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from incident_notify.channels.base import ChannelSpec, endpoint_refusal
from incident_notify.errors import PlaybookError, Problem, did_you_mean
from incident_notify.patterns import slow_pattern
from incident_notify.yamlmap import SourceMap, load_yaml

STANDARD_STAGES = ("investigating", "identified", "monitoring", "resolved")
NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
# Variables every template may use without declaring them (set by the tool).
BUILTIN_VARIABLES = frozenset({"incident", "message", "stage", "playbook", "failover"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


MAX_VARIABLE_LENGTH = 10_000


class Variable(_Strict):
    """An incident variable a commander supplies with --set (declared so CI can check it)."""

    description: str = ""
    required: bool = True
    example: str
    """A realistic value: validate renders every template with it."""
    default: str | None = None
    max_length: int | None = Field(default=None, ge=1, le=MAX_VARIABLE_LENGTH)
    """Longest value allowed; validate also renders with a value this long (worst case)."""
    pattern: str | None = None
    """Optional regular expression a value must match in full."""
    sensitivity: Literal["public", "internal"] = "public"
    """An internal variable (a bridge link, a codename): anything rendered from it is
    internal and can never reach a public channel or a public or customer audience."""

    @field_validator("example", "default", mode="before")
    @classmethod
    def _scalar_to_str(cls, value: Any) -> Any:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        return value

    @model_validator(mode="after")
    def _example_fits(self) -> Variable:
        if self.max_length is not None and len(self.example) > self.max_length:
            raise ValueError(
                f"example is {len(self.example)} characters, longer than max_length "
                f"{self.max_length}"
            )
        if self.pattern is not None:
            try:
                rx = re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern is not a valid regular expression: {exc}") from None
            problem = slow_pattern(self.pattern)
            if problem:
                raise ValueError(f"pattern {problem}; write it without nesting repetitions")
            if not rx.fullmatch(self.example):
                raise ValueError(f"example {self.example!r} does not match pattern")
        return self


class TemplateFile(_Strict):
    template: str
    """Path of a template file, relative to the playbook's directory or templates/."""


TextSource = str | TemplateFile


class MessageSpec(_Strict):
    """What one channel receives at one stage. A bare string is shorthand for `text`."""

    text: TextSource | None = None
    template: str | None = None
    """Shorthand for `text: {template: ...}`."""
    subject: str | None = None
    """Email only: subject template (one line)."""
    html: TextSource | None = None
    """Email only: HTML part template (autoescaped)."""
    thread: bool = True
    """Twitter: split an over-long update into a numbered reply thread (else: reject)."""
    sensitivity: Literal["public", "internal"] | None = None
    """Marks this message internal: it can never go to a public audience or channel."""

    @model_validator(mode="after")
    def _one_body(self) -> MessageSpec:
        if self.text is not None and self.template is not None:
            raise ValueError("give either 'text' or 'template', not both")
        if self.text is None and self.template is None:
            raise ValueError("a message needs 'text' (inline template) or 'template' (a file)")
        return self

    @property
    def body(self) -> TextSource:
        if self.template is not None:
            return TemplateFile(template=self.template)
        assert self.text is not None
        return self.text


def _coerce_message(value: Any) -> Any:
    return {"text": value} if isinstance(value, str) else value


class Stage(_Strict):
    title: str | None = None
    sensitivity: Literal["public", "internal"] = "public"
    """An internal stage never reaches a public audience or public channel."""
    audiences: list[str] | None = None
    """Audiences told at this stage (default: every audience of the playbook)."""
    messages: dict[str, MessageSpec] = Field(default_factory=dict)
    """Key: a channel name, or a channel type as the default for every channel of it."""
    audience_messages: dict[str, dict[str, MessageSpec]] = Field(default_factory=dict)
    """Per-audience overrides: audience -> channel name/type -> message."""
    next: list[str] | None = None
    """Stages allowed after this one (default: every later stage)."""

    @field_validator("messages", mode="before")
    @classmethod
    def _strings(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: _coerce_message(v) for k, v in value.items()}
        return value

    @field_validator("audience_messages", mode="before")
    @classmethod
    def _aud_strings(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            return {
                a: ({k: _coerce_message(v) for k, v in m.items()} if isinstance(m, Mapping) else m)
                for a, m in value.items()
            }
        return value


class ChannelConfig(BaseModel):
    """A channel instance. Keys other than the common ones are the type's own options."""

    model_config = ConfigDict(extra="allow", frozen=True)

    type: str
    sender: str = ""
    """Sender identity (the Twitter account, From number, From address). Never a secret."""
    fallback: list[str] = Field(default_factory=list)
    """Channels that carry this channel's audience when it is down, in order."""
    rate_per_second: float | None = Field(default=None, gt=0)
    burst: int | None = Field(default=None, ge=1)
    concurrency: int | None = Field(default=None, ge=1, le=64)
    required: bool = True
    """`channels check` exits non-zero when a required channel is down."""

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Selector(_Strict):
    groups: list[str] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)
    ids: list[str] = Field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.groups or self.tags or self.ids)


class Audience(_Strict):
    kind: Literal["internal", "customers", "public"]
    description: str = ""
    select: Selector = Field(default_factory=Selector)
    """Who belongs (internal / customers): contacts matching any group, tag or id."""
    channels: list[str]
    """internal: every channel listed is used; customers: allowed channels, tried in the
    person's preferred order; public: broadcast channels (a Twitter account)."""
    required_channels: int = Field(default=1, ge=1)
    """internal: the least number of channels each member must be reached on."""
    fallback_select: Selector = Field(default_factory=Selector)
    """public: who hears through the fallback channels when the broadcast channel is down."""


class PlaybookModel(_Strict):
    name: str
    title: str
    severity: Literal["sev1", "sev2", "sev3", "sev4", "maintenance"]
    description: str = ""
    contacts: list[str] = Field(default_factory=list)
    """Contact files or directories, relative to the playbook file."""
    variables: dict[str, Variable] = Field(default_factory=dict)
    channels: dict[str, ChannelConfig]
    audiences: dict[str, Audience]
    stages: dict[str, Stage]
    failover_notice: str | None = None
    """Template of a line prefixed to messages re-routed from a down channel."""
    free_text: dict[str, MessageSpec] = Field(default_factory=dict)
    """How a free-text update (``--message``) reads on a channel whose stage message does not
    carry ``{{ message }}``: channel name or type -> message. Built-in defaults otherwise."""

    @field_validator("free_text", mode="before")
    @classmethod
    def _free_strings(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: _coerce_message(v) for k, v in value.items()}
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_RE.match(value):
            raise ValueError("name must be lower-case letters, digits, '-' or '_'")
        return value


@dataclass(frozen=True)
class Playbook:
    """A loaded, schema-valid playbook and where it came from."""

    model: PlaybookModel
    path: Path
    source: SourceMap

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def stage_names(self) -> list[str]:
        return list(self.model.stages)

    @property
    def first_stage(self) -> str:
        return self.stage_names[0]

    def stage_named(self, name: str | None) -> str:
        """`name` (default: the first stage), which must be one of this playbook's."""
        name = name or self.first_stage
        if name not in self.model.stages:
            from incident_notify.errors import NotFoundError

            raise NotFoundError(f"{self.path}: no stage {name!r}"
                                + did_you_mean(name, self.stage_names),
                                hint=f"stages: {', '.join(self.stage_names)}")
        return name

    @property
    def final_stage(self) -> str:
        return "resolved" if "resolved" in self.model.stages else self.stage_names[-1]

    def allowed_next(self, stage: str) -> list[str]:
        spec = self.model.stages[stage]
        if spec.next is not None:
            return list(spec.next)
        names = self.stage_names
        return names[names.index(stage) + 1 :]

    def channel_spec(self, name: str) -> ChannelSpec:
        cfg = self.model.channels[name]
        return ChannelSpec(
            name=name,
            type=cfg.type,
            sender=cfg.sender,
            options=cfg.options(),
            fallback=tuple(cfg.fallback),
            rate_per_second=cfg.rate_per_second,
            burst=cfg.burst,
            concurrency=cfg.concurrency,
        )

    def message_for(
        self, stage: str, channel: str, audience: str | None = None
    ) -> tuple[MessageSpec, tuple[str | int, ...]] | None:
        """The message spec for (stage, channel[, audience]) and its key path, or None.

        Lookup order: the audience's override by channel name, then by channel type, then
        the stage's message by channel name, then by channel type.
        """
        spec = self.model.stages[stage]
        ctype = self.model.channels[channel].type
        if audience is not None:
            override = spec.audience_messages.get(audience, {})
            for key in (channel, ctype):
                if key in override:
                    return override[key], ("stages", stage, "audience_messages", audience, key)
        for key in (channel, ctype):
            if key in spec.messages:
                return spec.messages[key], ("stages", stage, "messages", key)
        return None

    def free_text_for(self, channel: str) -> tuple[MessageSpec, tuple[str | int, ...]] | None:
        """The playbook's free-text message for a channel (by name, then type), or None."""
        ctype = self.model.channels[channel].type
        for key in (channel, ctype):
            if key in self.model.free_text:
                return self.model.free_text[key], ("free_text", key)
        return None

    def contact_paths(self) -> list[Path]:
        return [(self.path.parent / p) for p in self.model.contacts]

    def audiences_for(self, stage: str) -> list[str]:
        chosen = self.model.stages[stage].audiences
        return list(self.model.audiences) if chosen is None else list(chosen)

    def is_public_channel(self, channel: str) -> bool:
        """Channels whose type declares itself public (a Twitter account) are public
        whoever the audience is."""
        from incident_notify.channels import channel_class

        return bool(getattr(channel_class(self.model.channels[channel].type), "public",
                            False))


def _pydantic_text(err: Any) -> str:
    """A validation error's words, without the "Value error, " pydantic puts before a
    validator's own message."""
    return str(err["msg"]).removeprefix("Value error, ")


def _pydantic_problems(exc: ValidationError, smap: SourceMap) -> Iterator[Problem]:
    for err in exc.errors():
        loc = tuple(err["loc"])
        # pydantic adds union-member names ('str', 'TemplateFile') and validator tags to
        # loc; keep only the parts that are real keys in the YAML.
        path: list[str | int] = []
        for part in loc:
            candidate = (*path, part)
            if candidate in smap.positions or err["type"] == "extra_forbidden":
                path.append(part)
        kind = err["type"]
        where = ".".join(str(p) for p in path) or "(top level)"
        if kind == "extra_forbidden":
            parent = ".".join(str(p) for p in path[:-1]) or "the top level"
            message = f"unknown key {path[-1]!r} in {parent}" + did_you_mean(path[-1],
                                                                              _schema_keys())
            hint = "check the spelling; see docs/playbook-format.md for the keys allowed here"
        elif kind == "missing":
            message = f"{where}: missing required key {loc[-1]!r}"
            hint = "add it; see docs/playbook-format.md"
        else:
            message = f"{where}: {_pydantic_text(err)}"
            hint = ""
        yield smap.problem(path, message, hint)


def _schema_keys() -> set[str]:
    """Every key the playbook schema knows, at any level (for a misspelt one's likely
    spelling)."""
    models: tuple[type[BaseModel], ...] = (PlaybookModel, Variable, TemplateFile, MessageSpec,
                                           Stage, ChannelConfig, Selector, Audience)
    return {info.alias or name for model in models
            for name, info in model.model_fields.items()}


def _dedupe(problems: list[Problem]) -> list[Problem]:
    seen: set[tuple[Any, ...]] = set()
    unique = []
    for p in problems:
        key = (p.line, p.column, p.message)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def load_playbook(path: Path) -> Playbook:
    """Load and schema-check one playbook; raise PlaybookError listing every problem, or
    NotFoundError (exit 9, as documented) when no file has that name."""
    if not path.exists() and not path.is_symlink():
        from incident_notify.errors import NotFoundError

        raise NotFoundError(f"{path}: no such playbook file",
                            hint="check the path (incident-notify validate playbooks/ lists "
                            "the playbooks there)")
    data, smap = load_yaml(path)
    if not isinstance(data, dict):
        raise PlaybookError(
            [smap.problem((), "a playbook must be a YAML mapping (name:, title:, ...)",
                          "see playbooks/ for examples")]
        )
    if "secrets" in data or any(
        isinstance(c, dict) and any(k in c for k in _SECRET_KEYS)
        for c in (data.get("channels") or {}).values()
    ):
        raise PlaybookError(list(_secret_problems(data, smap)))
    try:
        model = PlaybookModel.model_validate(data)
    except ValidationError as exc:
        raise PlaybookError(_dedupe(list(_pydantic_problems(exc, smap)))) from None
    playbook = Playbook(model=model, path=path, source=smap)
    problems = list(check_references(playbook))
    if problems:
        raise PlaybookError(problems)
    return playbook


_SECRET_KEYS = ("password", "token", "auth_token", "api_key", "api_secret", "secret",
                "access_token", "access_token_secret", "consumer_secret")


def _secret_problems(data: dict[str, Any], smap: SourceMap) -> Iterator[Problem]:
    hint = ("credentials come from the environment (e.g. TWILIO_AUTH_TOKEN) or a secrets "
            "file named with --secrets, never from a playbook; see docs/channels.md")
    if "secrets" in data:
        yield smap.problem(("secrets",), "playbooks must not contain secrets", hint)
    for name, cfg in (data.get("channels") or {}).items():
        if isinstance(cfg, dict):
            for key in _SECRET_KEYS:
                if key in cfg:
                    yield smap.problem(("channels", name, key),
                                       f"channel {name!r}: {key!r} looks like a secret", hint)


def check_references(pb: Playbook) -> Iterator[Problem]:
    """Cross-reference checks the schema alone cannot express."""
    from incident_notify.channels import available_types, channel_class

    m, smap = pb.model, pb.source
    if not m.stages:
        yield smap.problem(("stages",), "a playbook needs at least one stage",
                           "add investigating / identified / monitoring / resolved")
    types = available_types()
    for name, cfg in m.channels.items():
        base = ("channels", name)
        if not NAME_RE.match(name):
            yield smap.problem(base, f"channel name {name!r} must be lower-case letters, "
                               "digits, '-' or '_'")
        if cfg.type not in types:
            yield smap.problem((*base, "type"), f"unknown channel type {cfg.type!r}",
                               f"valid channel types are: {', '.join(sorted(types))}")
            continue
        kind = channel_class(cfg.type)
        refusal = endpoint_refusal(cfg.options(), kind.api_base_env)
        if refusal:  # (said here, where the type's endpoint variable is known)
            yield smap.problem(base, f"channel {name!r}: {refusal}",
                               "see docs/channels.md for each type's options")
        else:
            try:
                kind.Options.model_validate(cfg.options())
            except ValidationError as exc:
                for err in exc.errors():
                    key = err["loc"][0] if err["loc"] else ""
                    if err["type"] == "extra_forbidden":
                        msg = (f"channel {name!r}: unknown option {key!r} for type "
                               f"{cfg.type!r}" + did_you_mean(key, [
                                   *kind.Options.model_fields, *ChannelConfig.model_fields]))
                    else:
                        msg = f"channel {name!r}: {f'{key}: ' if key else ''}" \
                            f"{_pydantic_text(err)}"
                    yield smap.problem((*base, key) if key else base, msg,
                                       "see docs/channels.md for each type's options")
        for i, fb in enumerate(cfg.fallback):
            if fb not in m.channels:
                yield smap.problem((*base, "fallback", i), f"fallback channel {fb!r} is not "
                                   "defined" + did_you_mean(fb, m.channels),
                                   f"defined channels: {', '.join(m.channels)}")
            elif fb == name:
                yield smap.problem((*base, "fallback", i), "a channel cannot fall back to itself")
    for aname, aud in m.audiences.items():
        base = ("audiences", aname)
        for i, ch in enumerate(aud.channels):
            if ch not in m.channels:
                yield smap.problem((*base, "channels", i), f"audience {aname!r} uses undefined "
                                   f"channel {ch!r}" + did_you_mean(ch, m.channels),
                                   f"defined channels: {', '.join(m.channels)}")
        if aud.kind != "public" and aud.select.is_empty():
            yield smap.problem(base, f"audience {aname!r} selects nobody",
                               "add select: {groups: [...]} or {tags: [...]}")
        if aud.kind == "public":
            for i, ch in enumerate(aud.channels):
                if ch in m.channels and m.channels[ch].type != "twitter":
                    yield smap.problem((*base, "channels", i), f"public audience {aname!r} can "
                                       f"only use broadcast channels; {ch!r} is "
                                       f"{m.channels[ch].type}", "use a twitter channel; "
                                       "reach people on SMS/email through fallback")
        elif any(ch in m.channels and m.channels[ch].type == "twitter" for ch in aud.channels):
            yield smap.problem((*base, "channels"), f"audience {aname!r} ({aud.kind}) lists a "
                               "broadcast (twitter) channel", "put the Twitter account in a "
                               "public audience; use twitter_dm to reach people directly")
    for sname, stage in m.stages.items():
        base = ("stages", sname)
        if not NAME_RE.match(sname):
            yield smap.problem(base, f"stage name {sname!r} must be lower-case letters, "
                               "digits, '-' or '_'")
        for i, a in enumerate(stage.audiences or []):
            if a not in m.audiences:
                yield smap.problem((*base, "audiences", i), f"stage {sname!r} names undefined "
                                   f"audience {a!r}" + did_you_mean(a, m.audiences),
                                   f"defined: {', '.join(m.audiences)}")
        for i, nxt in enumerate(stage.next or []):
            if nxt not in m.stages:
                yield smap.problem((*base, "next", i), f"stage {sname!r}: next stage {nxt!r} "
                                   "is not defined" + did_you_mean(nxt, m.stages),
                                   f"stages: {', '.join(m.stages)}")
        known_keys = set(m.channels) | {c.type for c in m.channels.values()}
        for key in stage.messages:
            if key not in known_keys:
                yield smap.problem((*base, "messages", key), f"stage {sname!r}: message for "
                                   f"unknown channel {key!r}" + did_you_mean(key, known_keys),
                                   "keys are channel names or types: "
                                   f"{', '.join(sorted(known_keys))}")
        for aud_name, msgs in stage.audience_messages.items():
            if aud_name not in m.audiences:
                yield smap.problem((*base, "audience_messages", aud_name), f"stage {sname!r}: "
                                   f"override for undefined audience {aud_name!r}")
            for key in msgs:
                if key not in known_keys:
                    yield smap.problem((*base, "audience_messages", aud_name, key),
                                       f"stage {sname!r}: message for unknown channel {key!r}")
        # Every channel an audience of this stage may use needs a message.
        if any(ch not in m.channels for a in pb.audiences_for(sname) if a in m.audiences
               for ch in m.audiences[a].channels):
            continue
        for aname in pb.audiences_for(sname):
            if aname not in m.audiences:
                continue
            for ch in channels_with_fallbacks(pb, m.audiences[aname].channels):
                if pb.message_for(sname, ch, aname) is None:
                    yield smap.problem((*base, "messages"), f"stage {sname!r} has no message "
                                       f"for channel {ch!r} (used by audience {aname!r})",
                                       f"add messages: {{{ch}: \"...\"}} or a default for "
                                       f"type {m.channels[ch].type!r}")


def fallback_walk(pb: Playbook, channels: Iterable[str]) -> Iterator[tuple[str, str | None]]:
    """Every channel reachable from `channels` through fallbacks, each once, breadth first,
    with the channel it is first reached from (None for a starting channel). The one
    traversal of fallbacks: planning, validation, preview and sensitivity all use it."""
    from collections import deque

    seen: set[str] = set()
    todo: deque[tuple[str, str | None]] = deque((c, None) for c in channels)
    while todo:
        ch, origin = todo.popleft()
        if ch in seen or ch not in pb.model.channels:
            continue
        seen.add(ch)
        yield ch, origin
        todo.extend((fb, ch) for fb in pb.model.channels[ch].fallback)


def channels_with_fallbacks(pb: Playbook, channels: Iterable[str]) -> list[str]:
    """The channels plus every fallback reachable from them, in order, each once."""
    return [ch for ch, _ in fallback_walk(pb, channels)]


def message_targets(pb: Playbook, stage: str) -> Iterator[tuple[str, str, str | None]]:
    """(audience, channel, fallback_from) for every message a stage may send: each
    audience's channels and, per channel, the fallbacks that could carry it."""
    seen: set[tuple[str, str, str | None]] = set()
    for aname in pb.audiences_for(stage):
        for start in pb.model.audiences[aname].channels:
            for ch, origin in fallback_walk(pb, [start]):
                if (aname, ch, origin) not in seen:
                    seen.add((aname, ch, origin))
                    yield aname, ch, origin


def find_playbooks(paths: list[Path]) -> list[Path]:
    """Expand files and directories into playbook files (*.yaml / *.yml, not contacts)."""
    found: list[Path] = []
    for p in paths:
        if p.is_dir():
            for f in sorted([*p.glob("*.yaml"), *p.glob("*.yml")]):
                found.append(f)
        else:
            found.append(p)
    return found
