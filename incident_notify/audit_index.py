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
from typing import Any

INDEX_VERSION = 1
SAVE_AFTER_BYTES = 256 * 1024
"""Rewrite the index file once this much of the log was scanned beyond it."""

_EVENT = b'"event":"'
_INCIDENT = b'"incident":'
_LIFECYCLE = (b"incident.declared", b"incident.updated", b"incident.resolved",
              b"incident.reopened")


class IndexMismatch(Exception):
    """The index pointed at a record that is not the one it claimed."""


@dataclass
class IncidentEntry:
    runs: list[list[int]] = field(default_factory=list)
    """[start, end) byte ranges of the log holding this incident's records, in order."""
    last_lifecycle: str | None = None
    declared: bool = False


@dataclass
class AuditIndex:
    covered: int = 0
    """Bytes of the log the index describes (always at a line end)."""
    last_start: int = 0
    """Where the last covered line starts."""
    last_hash: str | None = None
    """That line's hash, to know the log is still the one indexed."""
    incidents: dict[str, IncidentEntry] = field(default_factory=dict)

    # ------------------------------------------------------------------ building
    def add_line(self, start: int, raw: bytes) -> None:
        """Index one complete line of the log found at byte `start`."""
        end = start + len(raw)
        incident = incident_of(raw)
        if incident is not None:
            entry = self.incidents.get(incident)
            if entry is None:
                entry = self.incidents[incident] = IncidentEntry()
            if entry.runs and entry.runs[-1][1] == start:
                entry.runs[-1][1] = end
            else:
                entry.runs.append([start, end])
            event = _event_of(raw)
            if event in _LIFECYCLE:
                entry.last_lifecycle = event.decode()
                if event == b"incident.declared":
                    entry.declared = True
        self.covered, self.last_start = end, start

    # ------------------------------------------------------------------ file
    def to_json(self) -> bytes:
        return json.dumps({
            "version": INDEX_VERSION, "covered": self.covered, "last_start": self.last_start,
            "last_hash": self.last_hash,
            "incidents": {i: [e.runs, e.last_lifecycle, e.declared]
                          for i, e in self.incidents.items()},
        }, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> AuditIndex | None:
        try:
            doc = json.loads(data)
            if doc.get("version") != INDEX_VERSION:
                return None
            index = cls(covered=int(doc["covered"]), last_start=int(doc["last_start"]),
                        last_hash=doc["last_hash"])
            for incident, (runs, last, declared) in doc["incidents"].items():
                index.incidents[str(incident)] = IncidentEntry(
                    [[int(s), int(e)] for s, e in runs], last, bool(declared))
        except (ValueError, TypeError, KeyError, AttributeError):
            return None
        if not 0 <= index.last_start <= index.covered:
            return None
        return index


def incident_of(raw: bytes) -> str | None:
    at = raw.find(_INCIDENT)
    if at < 0:
        return None
    start = at + len(_INCIDENT)
    if raw[start:start + 1] != b'"':
        return None  # "incident":null
    end = raw.find(b'"', start + 1)
    name = raw[start + 1:end]
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


def read_runs(handle: Any, runs: list[list[int]]) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line) of every line in `runs` of an open log file."""
    for start, end in runs:
        handle.seek(start)
        block = handle.read(end - start)
        if len(block) != end - start or not block.endswith(b"\n"):
            raise IndexMismatch
        offset = start
        for line in block.splitlines(keepends=True):
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
