"""Contacts: people, their addresses, groups, tags and channel preferences.

Sources are YAML files (a list of people, or ``{contacts: [...]}``), CSV files (one person
per row) or directories of them. Every record is validated — phone numbers normalised to
E.164 with `phonenumbers`, emails with `email-validator` (syntax only, no network), Twitter
handles by Twitter's rules — and a bad record is reported as ``file:line: field: problem``
while the rest still load. CSV is streamed row by row. Reference: docs/contacts.md.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import time
from functools import lru_cache
from pathlib import Path
from typing import Any

from incident_notify.errors import Problem

KINDS = ("sms", "email", "twitter_dm")
HANDLE_RE = re.compile(r"^@?([A-Za-z0-9_]{1,15})$")
QUIET_RE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_E164_FAST = re.compile(r"^\+[1-9]\d{6,14}$")


@dataclass(frozen=True, slots=True)
class Contact:
    id: str
    name: str
    email: str | None
    phone: str | None
    twitter: str | None
    channels: tuple[str, ...]
    groups: frozenset[str]
    tags: frozenset[str]
    timezone: str | None
    quiet_hours: tuple[time, time] | None
    source: str
    line: int

    def address_for(self, kind: str | None) -> str | None:
        if kind == "sms":
            return self.phone
        if kind == "email":
            return self.email
        if kind == "twitter_dm":
            return self.twitter
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "name": self.name, "email": self.email, "phone": self.phone,
            "twitter": self.twitter, "channels": list(self.channels),
            "groups": sorted(self.groups), "tags": sorted(self.tags),
            "timezone": self.timezone,
            "quiet_hours": (f"{self.quiet_hours[0]:%H:%M}-{self.quiet_hours[1]:%H:%M}"
                            if self.quiet_hours else None),
            "source": self.source, "line": self.line,
        }


class InvalidField(ValueError):
    def __init__(self, field_name: str, problem: str, hint: str = "") -> None:
        super().__init__(f"{field_name}: {problem}")
        self.field_name = field_name
        self.problem = problem
        self.hint = hint


# ------------------------------------------------------------------ normalisers
@lru_cache(maxsize=200_000)
def normalise_phone(raw: str, region: str = "US") -> str:
    """E.164 form of a phone number, or InvalidField."""
    import phonenumbers

    text = raw.strip()
    if text.startswith("00"):
        text = "+" + text[2:]
    try:
        number = phonenumbers.parse(text, None if _E164_FAST.match(text) else region)
    except phonenumbers.NumberParseException as exc:
        raise InvalidField("phone", f"{raw!r} is not a phone number ({exc})",
                           "use international format, e.g. +44 20 7946 0958") from None
    if not phonenumbers.is_valid_number(number):
        raise InvalidField("phone", f"{raw!r} is not a valid number",
                           f"check the digits; national numbers are read as region {region}")
    return str(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))


# A plain ASCII dot-atom local part (RFC 5322) needs no further normalisation.
_LOCAL_FAST = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")


@lru_cache(maxsize=200_000)
def normalise_email(raw: str) -> str:
    """The normalised address. Most of email-validator's cost is the domain, which many
    contacts share: a plain ASCII local part is checked here and the domain is validated
    once (cached); anything else goes through the full validator."""
    text = raw.strip()
    local, at, domain = text.rpartition("@")
    if at and len(local) <= 64 and _LOCAL_FAST.match(local):
        return f"{local}@{_normalise_domain(domain)}"
    return _validate_email(text)


@lru_cache(maxsize=65_536)
def _normalise_domain(domain: str) -> str:
    return _validate_email(f"postmaster@{domain}").split("@", 1)[1]


def _validate_email(text: str) -> str:
    from email_validator import EmailNotValidError, validate_email

    try:
        return str(validate_email(text, check_deliverability=False).normalized)
    except EmailNotValidError as exc:
        raise InvalidField("email", f"{text!r}: {exc}") from None


def normalise_handle(raw: str) -> str:
    match = HANDLE_RE.match(raw.strip())
    if not match:
        raise InvalidField("twitter", f"{raw!r} is not a Twitter handle",
                           "1-15 letters, digits or '_', optionally starting with @")
    return "@" + match.group(1)


def normalise_address(kind: str, raw: str, region: str = "US") -> str:
    if kind == "sms":
        return normalise_phone(raw, region)
    if kind == "email":
        return normalise_email(raw).lower()
    if kind == "twitter_dm":
        return normalise_handle(raw).lower()
    return raw


def _split(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return [str(v).strip() for v in value if str(v).strip()]
    return [v.strip() for v in re.split(r"[;,|]", str(value)) if v.strip()]


@lru_cache(maxsize=1024)
def _valid_timezone(name: str) -> bool:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def build_contact(raw: dict[str, Any], source: str, line: int, region: str) -> Contact:
    """Validate one record; raise InvalidField for the first bad field."""
    unknown = set(raw) - {"id", "name", "email", "phone", "twitter", "channels", "groups",
                          "tags", "timezone", "quiet_hours"}
    if unknown:
        raise InvalidField(sorted(unknown)[0], "unknown field",
                           "fields: id, name, email, phone, twitter, channels, groups, tags, "
                           "timezone, quiet_hours")
    cid = str(raw.get("id") or "").strip()
    if not cid:
        raise InvalidField("id", "missing", "every contact needs a unique id")
    if not ID_RE.match(cid):
        raise InvalidField("id", f"{cid!r} has characters other than letters, digits, "
                           "'_', '.', '@' or '-'")
    email = str(raw["email"]).strip() if raw.get("email") else None
    phone = str(raw["phone"]).strip() if raw.get("phone") else None
    twitter = str(raw["twitter"]).strip() if raw.get("twitter") else None
    email = normalise_email(email) if email else None
    phone = normalise_phone(phone, region) if phone else None
    twitter = normalise_handle(twitter) if twitter else None
    if not (email or phone or twitter):
        raise InvalidField("email", "no address at all", "give an email, phone or twitter")
    channels = tuple(_split(raw.get("channels")))
    for kind in channels:
        if kind not in KINDS:
            raise InvalidField("channels", f"unknown channel kind {kind!r}",
                               f"use {', '.join(KINDS)}")
    tz = str(raw["timezone"]).strip() if raw.get("timezone") else None
    if tz and not _valid_timezone(tz):
        raise InvalidField("timezone", f"{tz!r} is not an IANA time zone",
                           "e.g. Europe/London, America/New_York")
    quiet = None
    if raw.get("quiet_hours"):
        match = QUIET_RE.match(str(raw["quiet_hours"]).strip())
        if not match:
            raise InvalidField("quiet_hours", f"{raw['quiet_hours']!r} is not HH:MM-HH:MM")
        a, b, c, d = (int(g) for g in match.groups())
        quiet = (time(a, b), time(c, d))
    return Contact(
        id=cid, name=str(raw.get("name") or cid).strip(), email=email, phone=phone,
        twitter=twitter, channels=channels, groups=frozenset(_split(raw.get("groups"))),
        tags=frozenset(_split(raw.get("tags"))), timezone=tz, quiet_hours=quiet,
        source=source, line=line,
    )


# ------------------------------------------------------------------ sources
def _rows_csv(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        line = 1
        for row in reader:
            line = reader.line_num
            yield line, {k.strip(): v for k, v in row.items() if k and v not in (None, "")}


def _rows_yaml(path: Path, problems: list[Problem]) -> Iterator[tuple[int, dict[str, Any]]]:
    from incident_notify.errors import ProblemsError
    from incident_notify.yamlmap import load_yaml

    try:
        data, smap = load_yaml(path)
    except ProblemsError as exc:
        problems.extend(exc.problems)
        return
    items = data.get("contacts") if isinstance(data, dict) else data
    prefix: tuple[str | int, ...] = ("contacts",) if isinstance(data, dict) else ()
    if not isinstance(items, list):
        problems.append(smap.problem(prefix, "expected a list of contacts"))
        return
    for i, item in enumerate(items):
        pos = smap.position((*prefix, i))
        line = pos.line if pos else 0
        if not isinstance(item, dict):
            problems.append(Problem(str(path), line, None, "a contact must be a mapping"))
            continue
        yield line, item


def _files(paths: Sequence[Path]) -> Iterator[Path]:
    for p in paths:
        if p.is_dir():
            yield from sorted(f for f in p.iterdir()
                              if f.suffix in (".yaml", ".yml", ".csv") and f.is_file())
        else:
            yield p


def iter_contacts(paths: Sequence[Path], *, default_region: str = "US",
                  problems: list[Problem] | None = None,
                  summaries: list[SourceSummary] | None = None) -> Iterator[Contact]:
    """Stream valid contacts; invalid records go to `problems` as file:line: field: why."""
    sink = problems if problems is not None else []
    seen: dict[str, tuple[str, int]] = {}
    for path in _files(paths):
        summary = SourceSummary(str(path))
        if summaries is not None:
            summaries.append(summary)
        if not path.exists():
            sink.append(Problem(str(path), None, None, "contacts source not found"))
            continue
        rows = _rows_csv(path) if path.suffix == ".csv" else _rows_yaml(path, sink)
        try:
            for line, raw in rows:
                try:
                    contact = build_contact(raw, str(path), line, default_region)
                except InvalidField as exc:
                    summary.invalid += 1
                    sink.append(Problem(str(path), line, None, f"{exc.field_name}: "
                                        f"{exc.problem}", exc.hint))
                    continue
                if contact.id in seen:
                    first = seen[contact.id]
                    summary.invalid += 1
                    sink.append(Problem(str(path), line, None, f"id: duplicate contact id "
                                        f"{contact.id!r}, first defined at {first[0]}:{first[1]}"))
                    continue
                seen[contact.id] = (str(path), line)
                summary.people += 1
                yield contact
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            sink.append(Problem(str(path), None, None, f"cannot read: {exc}"))


@dataclass
class SourceSummary:
    path: str
    people: int = 0
    invalid: int = 0


@dataclass
class ContactSet:
    contacts: dict[str, Contact] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    sources: list[SourceSummary] = field(default_factory=list)

    def select(self, groups: Collection[str] = (), tags: Collection[str] = (),
               ids: Collection[str] = ()) -> Iterator[Contact]:
        """Contacts matching any group, tag or id (an empty selector matches nobody)."""
        g, t, i = set(groups), set(tags), set(ids)
        if not (g or t or i):
            return
        for c in self.contacts.values():
            if c.id in i or (g and not g.isdisjoint(c.groups)) or (t and not t.isdisjoint(c.tags)):
                yield c

    def by_group(self, name: str) -> list[Contact]:
        return list(self.select(groups=[name]))


def load_contacts(paths: Sequence[Path], *, default_region: str = "US") -> ContactSet:
    result = ContactSet()
    for c in iter_contacts(paths, default_region=default_region, problems=result.problems,
                           summaries=result.sources):
        result.contacts[c.id] = c
    return result
