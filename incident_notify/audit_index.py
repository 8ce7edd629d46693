"""An index beside the audit log (``audit.jsonl.index``): where each incident's records lie
in the log, its last lifecycle event, and whether it was declared. With it a command reads
only the incidents it needs, so a year of history costs `status`, `timeline`, `declare`
and `update` about what an empty log costs.

The log stays the record; the index is never trusted over it:

* it names the log length it covers and the hash of the line ending there; when that line
  is not there (the log was cut, replaced or rewritten) or the file is missing, unreadable
  or of another version, the index is rebuilt from the log;
* records appended since are scanned from where it ends (readers bring it up to date;
  writers never touch it), and it is saved again once that tail is large;
* every record read through it is parsed and checked like any other, and a record of
  another incident where the index said it would be makes the reader fall back to reading
  the whole log, and the index is removed (rebuilt by the next reader).

Records are canonical JSON (sorted keys), so a record's top-level ``"event"`` and
``"incident"`` are the first occurrences of those keys in its line (every value before
them is a string, where a quote is escaped): they are read without parsing the line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

INDEX_VERSION = 2
SAVE_AFTER_BYTES = 256 * 1024
"""Rewrite the index file once this much of the log was scanned beyond it."""

_EVENT = b'"event":"'
_INCIDENT = b'"incident":'
_LIFECYCLE = (b"incident.declared", b"incident.updated", b"incident.resolved",
              b"incident.reopened")


class IndexMismatch(Exception):
    """The index pointed at a record that is not the one it claimed."""


_CODE = {"incident.declared": "d", "incident.updated": "u", "incident.resolved": "r",
         "incident.reopened": "o", None: "-"}
_EVENT_OF_CODE = {code: event for event, code in _CODE.items()}


@dataclass
class AuditIndex:
    covered: int = 0
    """Bytes of the log the index describes (always at a line end)."""
    last_start: int = 0
    """Where the last covered line starts."""
    last_hash: str | None = None
    """That line's hash, to know the log is still the one indexed."""
    read_from_file: int = 0
    """Below this offset the runs came from the index file (checked before use); above it
    this process indexed the log's bytes itself. Not saved."""
    incidents: dict[str, list[Any] | str] = field(default_factory=dict)
    """Incident id -> [runs, last lifecycle event or None, declared]: runs are the
    [start, end) byte ranges of the log holding its records, in order. The file holds
    each entry as one string, "<lifecycle code><declared 0/1>:<start>-<end>,...", decoded
    only when that incident is read (a year of incidents loads in one short parse)."""

    def _entry(self, incident: str) -> list[Any] | None:
        """The decoded entry, None when the incident has none; IndexMismatch when it is not
        an entry."""
        entry = self.incidents.get(incident)
        if entry is None:
            return None
        if isinstance(entry, str):
            entry = self.incidents[incident] = _decode(entry)
        if type(entry) is not list or len(entry) != 3:
            raise IndexMismatch
        return entry

    def runs(self, incident: str) -> list[list[int]]:
        entry = self._entry(incident)
        return entry[0] if entry is not None else []

    def lifecycle(self) -> dict[str, str | None]:
        """Every incident with its last lifecycle event (None: none yet)."""
        return {incident: self._lifecycle_of(incident) for incident in self.incidents}

    def open_ids(self) -> set[str]:
        """The incidents whose last lifecycle event is there and is not incident.resolved
        (`status` folds exactly these): entries still coded "resolved" or "none" are
        passed over by their first character."""
        return {i for i, e in self.incidents.items()
                if not (isinstance(e, str) and e[:1] in ("r", "-"))
                and (last := self._lifecycle_of(i)) is not None
                and last != "incident.resolved"}

    def _lifecycle_of(self, incident: str) -> str | None:
        entry = self.incidents.get(incident)
        if isinstance(entry, str) and entry[:1] in _EVENT_OF_CODE:
            return _EVENT_OF_CODE[entry[:1]]
        decoded = self._entry(incident)
        return decoded[1] if decoded is not None else None

    def declared(self) -> list[str]:
        """The incidents with an incident.declared record."""
        return [i for i, e in self.incidents.items()
                if (e[1:2] == "1" if isinstance(e, str) else (self._entry(i) or [0, 0, 0])[2]
                    is True)]

    # ------------------------------------------------------------------ building
    def add_line(self, start: int, raw: bytes) -> None:
        """Index one complete line of the log found at byte `start`."""
        end = start + len(raw)
        incident = incident_of(raw)
        if incident is not None:
            entry = self._entry(incident)
            if entry is None:
                entry = self.incidents[incident] = [[], None, False]
            runs = entry[0]
            if runs and runs[-1][1] == start:
                runs[-1][1] = end
            else:
                runs.append([start, end])
            event = _event_of(raw)
            if event in _LIFECYCLE:
                entry[1] = event.decode()
                if event == b"incident.declared":
                    entry[2] = True
        self.covered, self.last_start = end, start

    # ------------------------------------------------------------------ file
    def to_json(self) -> bytes:
        return json.dumps({
            "version": INDEX_VERSION, "covered": self.covered, "last_start": self.last_start,
            "last_hash": self.last_hash,
            "incidents": {i: e if isinstance(e, str) else _encode(e)
                          for i, e in self.incidents.items()},
        }, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> AuditIndex | None:
        """The index in a file, or None when it is not one (the caller rebuilds). Entries
        are checked where they are decoded (IndexMismatch)."""
        try:
            doc = json.loads(data)
            if doc.get("version") != INDEX_VERSION or not isinstance(doc["incidents"], dict):
                return None
            index = cls(covered=int(doc["covered"]), last_start=int(doc["last_start"]),
                        last_hash=doc["last_hash"], incidents=doc["incidents"])
            index.read_from_file = index.covered
        except (ValueError, TypeError, KeyError, AttributeError):
            return None
        if not 0 <= index.last_start <= index.covered:
            return None
        return index


def _encode(entry: list[Any]) -> str:
    runs = ",".join(f"{s}-{e}" for s, e in entry[0])
    return f"{_CODE.get(entry[1], '-')}{'1' if entry[2] else '0'}:{runs}"


def _decode(text: str) -> list[Any]:
    """An entry as the file holds it; IndexMismatch when it is not one."""
    try:
        code, declared, runs = text[0], text[1], text[3:]
        if text[2] != ":" or code not in _EVENT_OF_CODE or declared not in "01":
            raise ValueError(text)
        pairs = [[int(a), int(b)] for a, b in (p.split("-") for p in runs.split(","))] \
            if runs else []
    except (ValueError, IndexError):
        raise IndexMismatch from None
    return [pairs, _EVENT_OF_CODE[code], declared == "1"]


def incident_field(raw: bytes) -> bytes | None:
    """The line's top-level incident id as its bytes stand (escapes unread); None when it
    is null."""
    at = raw.find(_INCIDENT)
    if at < 0:
        return None
    start = at + len(_INCIDENT)
    if raw[start:start + 1] != b'"':
        return None  # "incident":null
    return raw[start + 1:raw.find(b'"', start + 1)]


def incident_of(raw: bytes) -> str | None:
    name = incident_field(raw)
    if name is None:
        return None
    if b"\\" in name:  # an escaped id: let the JSON parser read it
        try:
            value = json.loads(raw).get("incident")
        except ValueError:
            return None
        return value if isinstance(value, str) else None
    return name.decode("utf-8", "replace")


def _event_of(raw: bytes) -> bytes:
    at = raw.find(_EVENT)
    if at < 0:
        return b""
    start = at + len(_EVENT)
    return raw[start:raw.find(b'"', start)]


def index_path(log_path: Path) -> Path:
    return Path(str(log_path) + ".index")


def read_runs(handle: BinaryIO, runs: list[list[int]]) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line) of every line in `runs` of an open log file; IndexMismatch
    when a run is not a range of whole lines there."""
    for run in runs:
        if type(run) is not list or len(run) != 2 or type(run[0]) is not int \
                or type(run[1]) is not int or not 0 <= run[0] < run[1]:
            raise IndexMismatch
        start, end = run
        handle.seek(start)
        offset = start
        while offset < end:  # line by line: a run can be most of the log
            line = handle.readline(end - offset)
            if not line.endswith(b"\n"):
                raise IndexMismatch
            yield offset, line
            offset += len(line)


def save(path: Path, index: AuditIndex) -> None:
    """Write the index beside the log, owner-only, atomically; a failure leaves the old
    one (or none), which only costs the next reader a scan."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(index.to_json())
        os.replace(tmp, path)
    except OSError:
        try:
            tmp.unlink()
        except OSError:
            pass
