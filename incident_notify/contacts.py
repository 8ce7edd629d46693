"""Contacts: people, their addresses, groups, tags and channel preferences.

Sources are YAML files (a list of people, or ``{contacts: [...]}``), tables (.csv, .tsv or
.txt: one person per row) or directories of them. Every record is validated — phone
numbers normalised to E.164 with `phonenumbers`, emails with `email-validator` (syntax
only, no network), Twitter handles by Twitter's rules — and a bad record is reported as
``file:line: field: problem`` while the rest still load. CSV is streamed row by row.
Reference: docs/contacts.md.

Long on purpose: every contact source (CSV, YAML) goes through one loader and one field
validator, so all are checked alike, with located problems.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import time
from functools import lru_cache
from pathlib import Path
from typing import IO, Any, NamedTuple

from incident_notify.errors import InvalidField, Problem, did_you_mean
from incident_notify.phones import normalise_phone, region_code

__all__ = ["KINDS", "Contact", "ContactSet", "InvalidField", "SourceSummary", "build_contact",
           "iter_contacts", "load_contacts", "normalise_address", "normalise_email",
           "normalise_handle", "normalise_phone"]

KINDS = ("sms", "email", "twitter_dm")
"""The built-in channels' preference names; plugin channel types add their own."""
_BUILTIN_ADDRESS = {"sms": "phone", "email": "email", "twitter_dm": "twitter"}


def preference_kinds() -> tuple[str, ...]:
    """Every name a person may list in `channels` or opt out of: the built-ins, then each
    registered channel type's own (its type name, unless it declares otherwise)."""
    from incident_notify.channels import available_types

    return (*KINDS, *sorted(t for t in available_types() if t not in KINDS and t != "twitter"))


def address_field(kind: str) -> str | None:
    """The contact field that addresses channels of a preference kind."""
    if kind in _BUILTIN_ADDRESS:
        return _BUILTIN_ADDRESS[kind]
    from incident_notify.channels import available_types, channel_class

    if kind not in available_types():
        return None
    return channel_class(kind).address
FIELDS = ("id", "name", "email", "phone", "twitter", "channels", "groups", "tags", "timezone",
          "quiet_hours")
_FIELD_SET = frozenset(FIELDS)
_FIELDS_HINT = "fields: " + ", ".join(FIELDS)
_HEADER_HINT = "the first row names the fields: " + ",".join(FIELDS)
HANDLE_RE = re.compile(r"^@?([A-Za-z0-9_]{1,15})$")
QUIET_RE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_LIST_SEPARATORS = re.compile(r"[;,|]")


class Contact(NamedTuple):
    """One person. Immutable; a NamedTuple because 100,000 of them are built per load and a
    frozen dataclass costs three times as much to construct."""

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

    def address_for(self, field: str | None) -> str | None:
        """The person's address in a contact field (``phone``, ``email``, ``twitter``)."""
        if field == "phone":
            return self.phone
        if field == "email":
            return self.email
        if field == "twitter":
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


# ------------------------------------------------------------------ normalisers
# Phone numbers: incident_notify.phones (an exact fast path in front of `phonenumbers`).

# A plain ASCII dot-atom local part (RFC 5322) needs no further normalisation.
_LOCAL_FAST = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")


def normalise_email(raw: str) -> str:
    """The normalised address. Most of email-validator's cost is the domain, which many
    contacts share: a plain ASCII local part is checked here and the domain is validated
    once (cached); anything else goes through the full validator."""
    text = raw.strip()
    local, at, domain = text.rpartition("@")
    if at and len(local) <= 64 and _LOCAL_FAST.match(local):
        try:
            return f"{local}@{_normalise_domain(domain)}"
        except InvalidField:
            pass  # validate the address itself, so that the error quotes it
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
    field = address_field(kind)
    if field == "phone":
        return normalise_phone(raw, region)
    if field == "email":
        return normalise_email(raw).lower()
    if field == "twitter":
        return normalise_handle(raw).lower()
    return raw


# Lists (channels, groups, tags) repeat across thousands of people: each distinct value is
# split and checked once, and every contact with it shares one tuple or frozenset.
def _items(value: Any) -> tuple[str, ...]:
    """A list field's items: a YAML list (as a tuple), or text separated by ';', ',' or '|'."""
    if isinstance(value, tuple):
        return tuple(v.strip() for v in value if v.strip())
    return tuple(v.strip() for v in _LIST_SEPARATORS.split(str(value)) if v.strip())


@lru_cache(maxsize=4096)
def _selectors(value: Any) -> frozenset[str]:
    return frozenset(_items(value))


@lru_cache(maxsize=1024)
def _channel_kinds(value: Any) -> tuple[str, ...]:
    items = _items(value)
    for kind in items:
        if kind not in KINDS and kind not in preference_kinds():
            raise InvalidField("channels", f"unknown channel kind {kind!r}",
                               f"use {', '.join(preference_kinds())}")
    return items


@lru_cache(maxsize=1024)
def _valid_timezone(name: str) -> bool:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


_LIST_FIELDS = frozenset({"channels", "groups", "tags"})


def build_contact(raw: Mapping[str, Any], source: str, line: int, region: str) -> Contact:
    """Validate one record (a YAML mapping); raise InvalidField for the first bad field."""
    unknown = raw.keys() - _FIELD_SET
    if unknown:
        first = str(sorted(unknown, key=str)[0])
        raise InvalidField(first, "unknown field" + did_you_mean(first, FIELDS), _FIELDS_HINT)
    values = []
    for name in FIELDS:  # the shape of a CSV row: text, and YAML lists as tuples
        value = raw.get(name)
        if value is None:
            value = ""
        elif isinstance(value, bool):  # YAML reads no, off, yes, true... as booleans
            raise InvalidField(name, f"expected text, not {str(value).lower()}",
                               f'quote it if you mean the word, e.g. {name}: "no"')
        elif name in _LIST_FIELDS and isinstance(value, list | dict):
            if isinstance(value, dict) or any(isinstance(v, list | dict) for v in value):
                raise InvalidField(name, "expected a name or a list of names",
                                   f"e.g. {name}: [a, b] or {name}: a;b")
            value = tuple(str(v) for v in value)  # hashable, to share like CSV text
        values.append(value if isinstance(value, str | tuple) else str(value))
    return _contact(values, source, line, region)


def _contact(values: Sequence[Any], source: str, line: int, region: str) -> Contact:
    """Validate one record given as the values of FIELDS in order: text ("" when absent),
    or a tuple for a list field."""
    cid, name, email, phone, twitter, channels, groups, tags, tz, quiet = values
    cid = cid.strip()
    if not cid:
        raise InvalidField("id", "missing", "every contact needs a unique id")
    if not ID_RE.match(cid):
        raise InvalidField("id", f"{cid!r} has characters other than letters, digits, "
                           "'_', '.', '@' or '-'")
    email = normalise_email(email) if (email := email.strip()) else None
    phone = normalise_phone(phone, region) if (phone := phone.strip()) else None
    twitter = normalise_handle(twitter) if (twitter := twitter.strip()) else None
    if not (email or phone or twitter):
        raise InvalidField("email", "no address at all", "give an email, phone or twitter")
    channels = _channel_kinds(channels) if channels else ()
    groups = _selectors(groups) if groups else _EMPTY
    tags = _selectors(tags) if tags else _EMPTY
    tz = tz.strip() or None
    if tz and not _valid_timezone(tz):
        raise InvalidField("timezone", f"{tz!r} is not an IANA time zone",
                           "e.g. Europe/London, America/New_York")
    if quiet := quiet.strip():
        match = QUIET_RE.match(quiet)
        if not match:
            raise InvalidField("quiet_hours", f"{quiet!r} is not HH:MM-HH:MM")
        a, b, c, d = (int(g) for g in match.groups())
        quiet = (time(a, b), time(c, d))
    return _new_contact(Contact, (cid, name.strip() or cid, email, phone, twitter, channels,
                                  groups, tags, tz, quiet or None, source, line))


_EMPTY: frozenset[str] = frozenset()
_new_contact = tuple.__new__  # Contact's fields in order, without NamedTuple's wrapper


# ------------------------------------------------------------------ sources
# A source yields (line, record): a record is the values of FIELDS in order (a CSV row), or
# a mapping whose field names are still to be checked (YAML), or the InvalidField that
# rejects it.
Record = tuple[Any, ...] | Mapping[str, Any] | InvalidField
Rows = Iterator[tuple[int, Record]]


_SEPARATOR_NAMES = {",": "a comma", ";": "a ';'", "\t": "a tab"}


def _delimiter(handle: IO[str]) -> str:
    """',' unless the header row has none and is split by ';' (what a spreadsheet saves as
    CSV where the decimal separator is a comma) or by tabs. The handle is rewound."""
    header = ""
    for _ in range(20):  # (blank lines may come first)
        header = handle.readline()
        if not header or header.strip():
            break
    handle.seek(0)
    stated = header.strip()
    if len(stated) == 5 and stated.lower().startswith("sep="):
        return stated[4]  # (Excel's "sep=;" line, naming the separator: skipped as read)
    if "," in header:
        return ","
    return ";" if ";" in header else "\t" if "\t" in header else ","


def _is_separator_line(row: list[str]) -> bool:
    """Excel's first line "sep=;" (the separator it names splits it in two)."""
    return [v.strip().lower() for v in row] == ["sep=", ""]


def _rows_csv(path: Path, source: str, problems: list[Problem]) -> Rows:
    """Stream a CSV: one header row naming fields (any case), then one person per row.
    Blank rows are skipped; a row with more values than the header is reported."""
    from operator import itemgetter

    with open(path, "rb") as raw:
        utf16 = raw.read(2) in (b"\xff\xfe", b"\xfe\xff")  # a spreadsheet's "Unicode text"
    undecodable = [] if utf16 else _undecodable_lines(path)
    with open(path, newline="", encoding="utf-16" if utf16 else "utf-8-sig",
              errors="replace" if undecodable or utf16 else "strict") as handle:
        delimiter = _delimiter(handle)
        reader = csv.reader(handle, delimiter=delimiter)
        start = 1
        try:
            header: list[str] | None = None
            for row in reader:  # the first row that is not blank
                start = reader.line_num + 1
                if any(v.strip() for v in row):
                    if header is None and _is_separator_line(row):
                        header = []  # (skipped once)
                        continue
                    header = row
                    break
            header = header or None
            if header is None:
                problems.append(Problem(source, 1, None, "no header row", _HEADER_HINT))
                return
            header_line = start - 1
            if any(header_line <= n < start for n in undecodable) or (
                    utf16 and any("\ufffd" in h for h in header)):
                problems.append(Problem(source, header_line, None, "the header row is not "
                                        f"{'UTF-16' if utf16 else 'UTF-8'} text: not a CSV "
                                        "file, or saved in another encoding",
                                        "save it as CSV UTF-8 (a spreadsheet's 'CSV UTF-8' "
                                        "format)"))
                return
            columns: list[str] = []
            for name in (h.strip().lower() for h in header):
                if name and name in columns:
                    problems.append(Problem(source, header_line, None, f"column {name!r} "
                                            "appears twice; the later one is ignored"))
                elif name and name not in _FIELD_SET:
                    shown = name if len(name) <= 40 else name[:39] + "…"
                    problems.append(Problem(source, header_line, None, f"column {shown!r} is "
                                            "not a contact field and is ignored"
                                            + did_you_mean(name, FIELDS), _FIELDS_HINT))
                columns.append(name)
            if "id" not in columns:
                problems.append(Problem(source, header_line, None, "no 'id' column: no row can "
                                        "be loaded", _HEADER_HINT))
                return
            width = len(columns)
            # Each field's column (id first); a field with no column reads the "" appended
            # to every row.
            fields = itemgetter(*(columns.index(f) if f in columns else width for f in FIELDS))
            padding = [""] * width
            for row in reader:
                line, start = start, reader.line_num + 1
                size = len(row)
                if size > width:
                    if any(v.strip() for v in row[width:]):
                        yield line, InvalidField("row", f"{size} values but the header has "
                                                 f"{width} columns", "a value that contains "
                                                 f"{_SEPARATOR_NAMES[delimiter]} must be in "
                                                 "double quotes")
                        continue
                    del row[width:]
                elif size < width:
                    row.extend(padding[size:])
                row.append("")
                if ((undecodable and any(line <= n < start for n in undecodable))
                        or (utf16 and any("\ufffd" in v for v in row))):
                    yield line, InvalidField("row", f"not {'UTF-16' if utf16 else 'UTF-8'} "
                                             "text", "save the file as UTF-8 (a "
                                             "spreadsheet's 'CSV UTF-8' format)")
                    continue
                values = fields(row)
                # A row with an id is a record; one without is skipped if it is blank
                # (only commas or spaces), and reported ("id: missing") if not.
                if values[0].strip() or any(v.strip() for v in row):
                    yield line, values
        except csv.Error as exc:  # e.g. a field over csv's size limit
            problems.append(Problem(source, start, None, f"cannot read from this line on: "
                                    f"{exc}", "the rows before this line were read"))


_BLOCK = 1 << 20


def _undecodable_lines(path: Path) -> list[int]:
    """The numbers of the lines that are not UTF-8 (none, nearly always). A block is
    decoded whole, in C; only a block that fails is looked at line by line."""
    bad: list[int] = []
    line = 1
    pending = b""
    with open(path, "rb") as handle:
        while chunk := handle.read(_BLOCK):
            pending += chunk
            cut = pending.rfind(b"\n") + 1  # whole lines only: UTF-8 never splits at \n
            line = _scan_utf8(pending[:cut], line, bad)
            pending = pending[cut:]
    _scan_utf8(pending, line, bad)
    return bad


def _scan_utf8(block: bytes, line: int, bad: list[int]) -> int:
    try:
        block.decode("utf-8")
    except UnicodeDecodeError:
        for number, raw in enumerate(block.split(b"\n"), start=line):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                bad.append(number)
    return line + block.count(b"\n")


def _rows_yaml(path: Path, source: str, problems: list[Problem]) -> Rows:
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
        problems.append(smap.problem(prefix, "expected a list of contacts", _FORMATS_HINT))
        return
    for i, item in enumerate(items):
        pos = smap.position((*prefix, i))
        line = pos.line if pos else 0
        if not isinstance(item, dict):
            yield line, InvalidField("record", "a contact must be a mapping of fields",
                                     "e.g. - id: alice\n    email: alice@example.com")
            continue
        yield line, item


CONTACT_SUFFIXES = (".csv", ".tsv", ".yaml", ".yml")
"""What a directory of contacts holds."""
TABLE_SUFFIXES = (".csv", ".tsv", ".txt")
"""Read as a table (a header row, then a person per row; separated by commas, ';' or tabs):
a spreadsheet's "Unicode Text" export is named .txt. Anything else is read as YAML."""
_FORMATS_HINT = ("a contacts file is a table (.csv, .tsv or .txt: a header row naming the "
                 "fields, then one person per row) or YAML (.yaml, .yml: a list of people)")


def source_files(paths: Sequence[Path]) -> Iterator[Path]:
    """Each source once, even when named twice (say by a playbook and the config). A
    directory stands for its contact files (any case of the suffix; a broken link among
    them is yielded, to be reported); one holding none, or that cannot be listed, is
    yielded itself, so that its reader says so rather than tell nobody in silence."""
    seen: set[Path] = set()
    for p in paths:
        found = [p]
        if p.is_dir():
            try:
                found = sorted(f for f in p.iterdir()
                               if f.suffix.lower() in CONTACT_SUFFIXES and not f.is_dir()) or [p]
            except OSError:
                pass
        for f in found:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                yield f


def _directory_problem(path: Path) -> str:
    try:
        next(path.iterdir(), None)
    except OSError as exc:
        return f"cannot read the directory: {exc.strerror or exc}"
    return ("is a directory holding no contact files (" + ", ".join(CONTACT_SUFFIXES) +
            "): nobody would be read from it")


def iter_contacts(paths: Sequence[Path], *, default_region: str = "US",
                  problems: list[Problem] | None = None,
                  summaries: list[SourceSummary] | None = None) -> Iterator[Contact]:
    """Stream valid contacts; invalid records go to `problems` as file:line: field: why.
    An unknown default region is a ConfigError, raised before any record is read."""
    sink = problems if problems is not None else []
    default_region = region_code(default_region)
    seen: dict[str, tuple[str, int]] = {}
    for path in source_files(paths):
        source = str(path)
        summary = SourceSummary(source)
        if summaries is not None:
            summaries.append(summary)
        from incident_notify.files import MAX_CONTACTS_BYTES, InputFileError, check_input

        try:
            check_input(path, MAX_CONTACTS_BYTES)
        except FileNotFoundError:
            sink.append(Problem(source, None, None, "contacts source not found"))
            continue
        except InputFileError as exc:
            if path.is_dir():  # (a folder holding no contact file: `source_files`)
                sink.append(Problem(source, None, None, _directory_problem(path),
                                    "name the contact files, or put them in the directory"))
            else:
                sink.append(Problem(source, None, None, exc.message, exc.hint))
            continue
        rows = (_rows_csv(path, source, sink) if path.suffix.lower() in TABLE_SUFFIXES
                else _rows_yaml(path, source, sink))
        try:
            for line, record in rows:
                try:
                    if isinstance(record, tuple):  # a CSV row: the hot path
                        contact = _contact(record, source, line, default_region)
                    elif isinstance(record, InvalidField):
                        raise record
                    else:
                        contact = build_contact(record, source, line, default_region)
                except InvalidField as exc:
                    summary.invalid += 1
                    sink.append(Problem(source, line, None, f"{exc.field_name}: "
                                        f"{exc.problem}", exc.hint))
                    continue
                here = (source, line)
                first = seen.setdefault(contact.id, here)
                if first is not here:
                    summary.invalid += 1
                    sink.append(Problem(source, line, None, f"id: duplicate contact id "
                                        f"{contact.id!r}, first defined at {first[0]}:{first[1]}"))
                    continue
                summary.people += 1
                yield contact
        except OSError as exc:
            sink.append(Problem(source, None, None, f"cannot read: {exc}"))


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

    @property
    def invalid_records(self) -> int:
        """Records left out; `problems` also holds a source's own (a column, a missing file)."""
        return sum(s.invalid for s in self.sources)

    def by_group(self, name: str) -> list[Contact]:
        return list(self.select(groups=[name]))


def load_contacts(paths: Sequence[Path], *, default_region: str = "US") -> ContactSet:
    result = ContactSet()
    for c in iter_contacts(paths, default_region=default_region, problems=result.problems,
                           summaries=result.sources):
        result.contacts[c.id] = c
    return result
