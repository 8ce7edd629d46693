"""The audit log: append-only JSON Lines, SHA-256 hash-chained, locked, fsync'd.

Format and guarantees: docs/audit-log.md. In short, each line is one record
``{schema, seq, ts, actor, incident, event, channel, recipient, key, payload, prev, hash}``
serialised canonically; `hash` is the SHA-256 of the record without `hash`, `prev` the
hash of the record before, `seq` its 1-based position. Writers hold an exclusive `flock`
while they read the tail, append and fsync, so several processes can append at once and
the chain stays whole. A torn last line (a crash mid-write) is never dropped: the next
append moves its bytes to a sidecar file and records that it did.

Long on purpose: the log's write path (append, group commit, torn-tail recovery, the head)
and its read and verify paths share the file format and locking; split, the chain's
invariants would be in two places.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import hmac
import json
import os
import threading
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from incident_notify.audit_index import (
    SAVE_AFTER_BYTES,
    AuditIndex,
    IndexMismatch,
    incident_field,
    incident_of,
    index_path,
    read_runs,
)
from incident_notify.audit_index import save as save_index
from incident_notify.audit_schema import is_int, record_problem
from incident_notify.errors import AuditError

if TYPE_CHECKING:
    from concurrent.futures import Executor

SCHEMA = 1
GENESIS = "0" * 64
FIELDS = ("schema", "seq", "ts", "actor", "incident", "event", "channel", "recipient", "key",
          "payload", "prev", "hash")


_T = TypeVar("_T")


def default_audit_path() -> Path:
    env = os.environ.get("INCIDENT_NOTIFY_AUDIT_LOG")
    if env:
        return Path(env)
    from incident_notify.config import state_dir

    return state_dir() / "audit.jsonl"


_FAST_PARSE_AFTER = 1000
"""Lines a reader parses with `json.loads` before it imports msgspec (20 ms) for the rest."""


@lru_cache(maxsize=1)
def _fast_parser() -> Callable[[bytes], Any]:
    """A line's JSON exactly as `json.loads` gives it, at a third of the cost: msgspec
    parses, with floats read by `float` as `json.loads` reads them; what msgspec refuses
    (NaN, a lone surrogate...) goes to `json.loads`, which decides."""
    import msgspec

    decode = msgspec.json.Decoder(float_hook=float).decode

    def parse(raw: bytes) -> Any:
        try:
            return decode(raw)
        except (msgspec.MsgspecError, ValueError):
            return json.loads(raw)

    return parse


def canonical(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def record_hash(fields: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical({k: v for k, v in fields.items() if k != "hash"})).hexdigest()


def redact(value: str, key: bytes) -> str:
    """A keyed hash of a recipient: matchable by whoever holds the key, opaque otherwise."""
    digest = hmac.new(key, value.encode(), hashlib.sha256).hexdigest()
    return f"hmac-sha256:{digest[:32]}"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class AuditEntry:
    """What a caller asks to append; the log adds seq, ts, actor, prev and hash."""

    event: str
    incident: str | None = None
    channel: str | None = None
    recipient: str | None = None
    key: str | None = None
    payload: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class AuditRecord:
    schema: int
    seq: int
    ts: str
    actor: str
    incident: str | None
    event: str
    channel: str | None
    recipient: str | None
    key: str | None
    payload: dict[str, Any]
    prev: str
    hash: str

    def to_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in FIELDS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AuditRecord:
        # The fields set directly: a frozen dataclass's __init__ sets each one through
        # object.__setattr__, which cost readers more than parsing the line.
        record = object.__new__(cls)
        record.__dict__.update({f: data[f] for f in FIELDS})
        return record


@dataclass
class Checkpoint:
    """Where a verification ended: the last record checked (its seq and hash) and the bytes
    it occupies, so the next verification can start right after it."""

    seq: int
    hash: str
    line_start: int
    end: int

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "hash": self.hash, "line_start": self.line_start,
                "end": self.end}

    @staticmethod
    def from_dict(data: object) -> Checkpoint | None:
        if not isinstance(data, dict):
            return None
        try:
            cp = Checkpoint(data["seq"], data["hash"], data["line_start"], data["end"])
        except (KeyError, TypeError):
            return None
        ok = (is_int(cp.seq) and is_int(cp.line_start) and is_int(cp.end)
              and isinstance(cp.hash, str) and 0 <= cp.line_start < cp.end)
        return cp if ok else None


@dataclass
class VerifyResult:
    ok: bool
    records: int
    first_bad_line: int | None = None
    problem: str | None = None
    torn_tail: bool = False
    head: str | None = None
    checkpoint: Checkpoint | None = None
    """Where this verification ended (when it passed)."""
    checked: int = 0
    """Records read by this verification (all of them, or those after a checkpoint)."""

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "records": self.records, "first_bad_line": self.first_bad_line,
                "problem": self.problem, "torn_tail": self.torn_tail, "head": self.head}


@dataclass
class _Tail:
    seq: int = 0
    hash: str = GENESIS
    torn: bytes = b""
    end: int = 0
    """Offset just after the last complete line."""


class AuditLog:
    """One audit log file. Safe to use from several threads and several processes."""

    def __init__(self, path: Path, *, actor: str | None = None,
                 redact_key: bytes | None = None) -> None:
        self.path = Path(path)
        self.actor = actor or _default_actor()
        self.redact_key = redact_key
        self._thread_lock = threading.Lock()
        # Kept between appends: the open descriptor and the tail it ended with. Under the
        # lock, a file whose size is still `_tail.end` has not been appended to by anyone
        # else, so the tail need not be read again.
        self._fd: int | None = None
        self._tail: _Tail | None = None
        self._head_fd: int | None = None
        self._index: AuditIndex | None = None
        self.use_index = True
        """Read one incident's records through the index beside the log (tests of the
        index compare both ways)."""

    @property
    def head_path(self) -> Path:
        return self.path.with_name(self.path.name + ".head")

    # ------------------------------------------------------------------ writing
    def append(self, event: str, *, incident: str | None = None, channel: str | None = None,
               recipient: str | None = None, key: str | None = None,
               payload: Mapping[str, Any] | None = None,
               spans: list[tuple[int, int]] | None = None) -> AuditRecord:
        """Append one record; it is on disk (fsync'd) when this returns."""
        return self.append_many([AuditEntry(event, incident, channel, recipient, key,
                                            payload)], spans=spans)[0]

    def append_many(self, entries: Sequence[AuditEntry], *,
                    spans: list[tuple[int, int]] | None = None) -> list[AuditRecord]:
        """Append several records with one lock, one write and one fsync. `spans`: the
        [start, end) bytes the write took in the log are added to it."""
        if not entries:
            return []
        for e in entries:
            if not e.event or e.event != e.event.lower() or "." not in e.event:
                raise AuditError(f"invalid audit event name {e.event!r}")
        with self._thread_lock:
            fd = self._descriptor()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                size = os.fstat(fd).st_size
                tail = self._tail
                if tail is None or tail.torn or tail.end != size:
                    tail = self._read_tail(fd)
                prefix: list[AuditEntry] = []
                if tail.torn:
                    prefix.append(self._recover_torn(fd, tail))
                records, lines = [], []
                seq, prev = tail.seq, tail.hash
                ts = _now()  # (one write: its records share the moment)
                for e in [*prefix, *entries]:
                    seq += 1
                    fields: dict[str, Any] = {
                        "schema": SCHEMA, "seq": seq, "ts": ts, "actor": self.actor,
                        "incident": e.incident, "event": e.event, "channel": e.channel,
                        "recipient": self._redact(e.recipient), "key": e.key,
                        "payload": self._scrub(e.payload or {}, e.recipient), "prev": prev,
                    }
                    problem = record_problem(fields)
                    if problem:  # a bug of ours: the record must stay readable
                        raise AuditError(f"refusing to record a malformed {e.event}: "
                                         f"{problem}")
                    body = canonical(fields)  # what the hash covers: all but the hash
                    prev = hashlib.sha256(body).hexdigest()
                    lines.append(_with_hash(body, prev))
                    fields["hash"] = prev
                    records.append(AuditRecord.from_dict(fields))
                data = b"".join(lines)
                start = os.fstat(fd).st_size
                try:
                    written = os.write(fd, data)
                    while written < len(data):
                        written += os.write(fd, data[written:])
                    os.fsync(fd)
                except OSError as exc:
                    # A full disk (or quota) takes part of the write: take back what this
                    # write left, under the lock, so the log still ends at a whole record
                    # and a full disk never reads as a torn or tampered log.
                    self._tail = None
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, start)
                    raise AuditError(f"cannot write the audit log {self.path}: {exc.strerror}",
                                     hint="free disk space or fix permissions; nothing was "
                                     "sent that is not recorded") from None
                self._tail = _Tail(seq=seq, hash=prev, end=start + len(data))
                if spans is not None:
                    spans.append((start, start + len(data)))
                self._write_head(seq, prev)
                return records[len(prefix):]
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _descriptor(self) -> int:
        """The open log, reopened if the file was replaced or removed meanwhile."""
        if self._fd is not None:
            try:
                same = os.fstat(self._fd).st_ino == os.stat(self.path).st_ino
            except OSError:
                same = False
            if same:
                return self._fd
            os.close(self._fd)
            self._fd, self._tail = None, None
        self._fd = self._open()
        return self._fd

    def _open(self) -> int:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = _open_regular(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise AuditError(f"the audit log {self.path} is a symbolic link; refusing to "
                                 "write through it", hint="name the real file with "
                                 "--audit-log, and remove the link") from None
            raise AuditError(f"cannot open the audit log {self.path}: {exc.strerror}",
                             hint="check the path (--audit-log / INCIDENT_NOTIFY_AUDIT_LOG) "
                             "and its permissions") from None
        _owner_only(fd, self.path)
        return fd

    def _read_tail(self, fd: int) -> _Tail:
        size = os.fstat(fd).st_size
        if size == 0:
            return _Tail()
        chunk = 1 << 16
        pos, buf = size, b""
        # Read backwards until the buffer holds the whole last complete line: two
        # newlines, or one newline and the start of the file.
        while pos > 0 and buf.count(b"\n") < 2:
            start = max(0, pos - chunk)
            buf = os.pread(fd, pos - start, start) + buf
            pos = start
        last_nl = buf.rfind(b"\n")
        torn = buf[last_nl + 1:] if last_nl >= 0 else buf
        complete = buf[: last_nl + 1] if last_nl >= 0 else b""
        end = pos + len(complete)
        lines = complete.rstrip(b"\n").split(b"\n") if complete else []
        if not lines or not lines[-1]:
            return _Tail(torn=torn, end=end)
        # When the file starts mid-buffer, lines[0] may be partial; only lines[-1] is used.
        try:
            last = json.loads(lines[-1])
            return _Tail(seq=int(last["seq"]), hash=str(last["hash"]), torn=torn, end=end)
        except (ValueError, KeyError, TypeError):
            raise AuditError(f"{self.path}: the last record is not valid; refusing to extend "
                             "a damaged chain", hint="run 'incident-notify audit verify'") \
                from None

    def _recover_torn(self, fd: int, tail: _Tail) -> AuditEntry:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        sidecar = self.path.with_name(f"{self.path.name}.torn-{stamp}")
        with open(sidecar, "wb") as out:
            out.write(tail.torn)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(sidecar, 0o600)
        os.ftruncate(fd, tail.end)
        return AuditEntry("audit.torn_tail_recovered", payload={
            "bytes": len(tail.torn), "sidecar": str(sidecar),
            "sha256": hashlib.sha256(tail.torn).hexdigest(), "offset": tail.end})

    @property
    def checkpoint_path(self) -> Path:
        return self.path.with_name(self.path.name + ".verified")

    def read_checkpoint(self) -> Checkpoint | None:
        """Where the last passing `audit verify` ended, if it left a readable note."""
        try:
            fd = _open_regular(self.checkpoint_path, os.O_RDONLY)
            with os.fdopen(fd, "rb") as handle:
                return Checkpoint.from_dict(json.loads(handle.read(4096)))
        except (OSError, ValueError):
            return None

    def write_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Remember where a passing verification ended (owner-only, replaced atomically).
        Only a shortcut for the next `verify --incremental`, which checks that the record
        there is still the one verified: never trusted over the log."""
        tmp = self.checkpoint_path.with_name(self.checkpoint_path.name + f".{os.getpid()}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(json.dumps(checkpoint.to_dict()).encode() + b"\n")
            os.replace(tmp, self.checkpoint_path)
        except OSError:
            try:
                tmp.unlink()
            except OSError:
                pass

    def _write_head(self, seq: int, head: str) -> None:
        # Written in place under the log's lock (a fixed-width line, so no rename is
        # needed); the head is a truncation check, not the record itself.
        try:
            if self._head_fd is None:
                self._head_fd = _open_regular(self.head_path, os.O_RDWR | os.O_CREAT, 0o600)
                _owner_only(self._head_fd, self.head_path)
            line = json.dumps({"seq": seq, "hash": head}).encode().ljust(120) + b"\n"
            os.pwrite(self._head_fd, line, 0)
            os.ftruncate(self._head_fd, len(line))
        except OSError:
            self._head_fd = None

    def _scrub(self, payload: Mapping[str, Any], recipient: str | None) -> dict[str, Any]:
        """With redaction on, the address must not survive elsewhere in the record
        (a provider's error text often quotes it)."""
        if not (recipient and self.redact_key):
            return dict(payload)
        text = json.dumps(payload, ensure_ascii=False)
        if recipient not in text:
            return dict(payload)
        hidden = redact(recipient, self.redact_key)
        scrubbed: dict[str, Any] = json.loads(text.replace(recipient, hidden))
        return scrubbed

    def _redact(self, recipient: str | None) -> str | None:
        if recipient and self.redact_key:
            return redact(recipient, self.redact_key)
        return recipient

    # ------------------------------------------------------------------ reading
    def _lines(self) -> Iterator[tuple[int, bytes]]:
        """(line number, bytes) of complete lines; a torn last line is not yielded."""
        try:
            handle = os.fdopen(_open_regular(self.path, os.O_RDONLY), "rb")
        except FileNotFoundError:
            return
        except OSError as exc:
            raise AuditError(f"cannot read the audit log {self.path}: {exc.strerror}",
                             hint="a symbolic link is not followed: name the real file"
                             if exc.errno == errno.ELOOP else "") from None
        with handle:
            for number, raw in enumerate(handle, start=1):
                if not raw.endswith(b"\n"):
                    return
                yield number, raw

    def names_channel(self, channel: str) -> bool:
        """Whether a record names `channel` (read from the raw lines, as `records`
        pre-filters them: records are canonical JSON); stops at the first."""
        needle = b'"channel":' + json.dumps(channel).encode()
        return any(needle in raw for _, raw in self._lines())

    def channel_names(self) -> set[str]:
        """Every channel a record names."""
        import re

        pattern = re.compile(rb'"channel":"([^"\\]+)"')
        return {m.decode() for _, raw in self._lines() for m in pattern.findall(raw)}

    def records(self, *, incident: str | None = None, event_prefix: str | None = None,
                channel: str | None = None, since: datetime | None = None,
                incidents: Collection[str] | None = None,
                _runs: list[list[int]] | None = None) -> Iterator[AuditRecord]:
        """Stream records in log order, filtered (`incidents`: only records of these;
        `_runs`: only the lines in these byte ranges, already checked to be whole lines of
        the wanted incident by the index)."""
        wanted = {i.encode() for i in incidents} if incidents is not None else None
        since_s = since.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ") if since else None
        # Records are canonical JSON (sorted keys, no spaces), so a wanted event or incident
        # appears verbatim in its line: lines without it are skipped unparsed. A match is
        # still parsed and checked, so a look-alike inside a payload is never taken for it.
        event_needle = b'"event":"' + event_prefix.encode() if event_prefix else None
        indexed = self._indexed_lines(incident, incidents) if _runs is None \
            else self._read_runs(_runs)
        parse: Callable[[bytes], Any] = json.loads
        parsed = 0
        for number, raw in indexed if indexed is not None else self._lines():
            if incident is not None and incident.encode() not in raw:
                continue
            if event_needle is not None and event_needle not in raw:
                continue
            if wanted is not None:
                name = incident_field(raw)
                if name is None or (name not in wanted and b"\\" not in name):
                    continue  # (an escaped id is parsed and compared below)
            parsed += 1
            if parsed == _FAST_PARSE_AFTER:
                parse = _fast_parser()
            try:
                data = parse(raw)
                problem = record_problem(data) if isinstance(data, dict) else "not a record"
                if problem is None:
                    rec = AuditRecord.from_dict(data)
            except (ValueError, KeyError, TypeError):
                problem = "not a valid audit record"
            if problem is not None:
                if indexed is not None:  # (an offset there: say the line number)
                    number = self._line_number(number)
                raise AuditError(f"{self.path}:{number}: {problem}",
                                 hint="run 'incident-notify audit verify' to check the log")
            if incident is not None and rec.incident != incident:
                continue
            if incidents is not None and rec.incident not in incidents:
                continue
            if event_prefix is not None and not rec.event.startswith(event_prefix):
                continue
            if channel is not None and rec.channel != channel:
                continue
            if since_s is not None and rec.ts < since_s:
                continue
            yield rec

    def size(self) -> int:
        """The log's length in bytes now (0 when there is none yet)."""
        try:
            return os.stat(self.path).st_size
        except FileNotFoundError:
            return 0

    def records_after(self, incident: str, known_before: int,
                      own: Sequence[tuple[int, int]]) -> Iterator[AuditRecord] | None:
        """The records of `incident` after the last of the byte ranges `own` (a command's
        own writes), for a caller that holds the fold of every record of it that lay
        before `known_before` plus the records it wrote there; None when the log holds
        another record of it in between (someone else wrote one meanwhile), or the index
        is off or not usable: the caller then folds the incident whole. Read through the
        index, parsed and checked as `records` does."""
        if not self.use_index or not own:
            return None
        mark = max(end for _, end in own)
        try:
            runs = self._ask_index(lambda index: [list(run) for run in index.runs(incident)])
        except (TypeError, IndexMismatch):
            return None
        ranges = sorted(own)
        for start, end in runs:
            low, high = max(start, known_before), min(end, mark)
            if low < high and not _covered(low, high, ranges):
                return None
        tail = [[max(start, mark), end] for start, end in runs if end > mark]
        return self.records(incident=incident, _runs=tail)

    # ------------------------------------------------------------------ the index
    def index(self) -> AuditIndex:
        """The index beside the log, checked against the log as it is now and brought up
        to date: loaded when its last line is still where it says, else rebuilt; the
        records appended since are scanned; saved again when that tail was large."""
        try:
            handle = os.fdopen(_open_regular(self.path, os.O_RDONLY), "rb")
        except FileNotFoundError:
            return AuditIndex()
        except OSError as exc:
            raise AuditError(f"cannot read the audit log {self.path}: {exc.strerror}") \
                from None
        with handle:
            size = os.fstat(handle.fileno()).st_size
            index = self._index
            if index is None or not _index_holds(handle, index, size):
                index = self._load_index(handle, size)
            start, fresh = index.covered, index.covered == 0
            if size > start:
                handle.seek(start)
                offset, last = start, b""
                for raw in handle:
                    if not raw.endswith(b"\n"):
                        break  # a torn last line: not a record (yet)
                    index.add_line(offset, raw)
                    offset += len(raw)
                    last = raw
                if last:
                    index.last_hash = _line_hash(last)
                if index.covered - start >= SAVE_AFTER_BYTES or (fresh and index.covered):
                    save_index(index_path(self.path), index)
            self._index = index
            return index

    def _load_index(self, handle: BinaryIO, size: int) -> AuditIndex:
        path = index_path(self.path)
        try:
            fd = _open_regular(path, os.O_RDONLY)
        except OSError:
            return AuditIndex()
        with os.fdopen(fd, "rb") as f:
            loaded = AuditIndex.from_json(f.read())
        if loaded is None or not _index_holds(handle, loaded, size):
            return AuditIndex()  # rebuilt from the log by the caller
        return loaded

    def _indexed_lines(self, incident: str | None,
                       incidents: Collection[str] | None) -> Iterator[tuple[int, bytes]] | None:
        """(byte offset, line) of the wanted incidents' records, in log order, read through
        the index; None to read the whole log (no incident filter, the index off, or an
        index that pointed at another incident's record: it is then removed, and rebuilt
        by the next reader). Every run that came from the index file is checked to hold
        only wanted records before the first is handed out, so a reader never switches
        source half-way."""
        if not self.use_index or (incident is None and incidents is None):
            return None
        wanted = {incident} if incident is not None else set(incidents or ())
        index = self.index()
        try:
            runs = sorted(run for i in wanted for run in index.runs(i))
        except (TypeError, IndexMismatch):  # a damaged entry
            runs = [[-1, -1]]
        from_file = [run for run in runs if type(run) is not list or not run
                     or type(run[0]) is not int or run[0] < index.read_from_file]
        try:  # (runs this process indexed itself need no second look)
            with os.fdopen(_open_regular(self.path, os.O_RDONLY), "rb") as handle:
                holds = all(incident_of(raw) in wanted
                            for _, raw in read_runs(handle, from_file))
        except FileNotFoundError:
            return iter(())
        except (OSError, IndexMismatch):
            holds = False
        if holds:
            return self._read_runs(runs)
        self._drop_index()
        return None

    def _drop_index(self) -> None:
        """Forget the index and remove its file: the next reader rebuilds it."""
        self._index = None
        try:
            index_path(self.path).unlink()
        except OSError:
            pass

    def _read_runs(self, runs: list[list[int]]) -> Iterator[tuple[int, bytes]]:
        with os.fdopen(_open_regular(self.path, os.O_RDONLY), "rb") as handle:
            yield from read_runs(handle, runs)

    def _line_number(self, offset: int) -> int:
        with os.fdopen(_open_regular(self.path, os.O_RDONLY), "rb") as handle:
            return handle.read(offset).count(b"\n") + 1

    def _ask_index(self, question: Callable[[AuditIndex], _T]) -> _T:
        """An answer from the index; a damaged entry found on the way removes the index
        and the answer comes from one rebuilt from the log."""
        try:
            return question(self.index())
        except IndexMismatch:
            self._drop_index()
            return question(self.index())

    def incident_ids(self) -> dict[str, str | None]:
        """Every incident in the log with its last lifecycle event (None: none yet)."""
        return self._ask_index(AuditIndex.lifecycle)

    def open_incidents(self) -> set[str]:
        """The incidents whose last lifecycle event is not incident.resolved (a fold says
        "resolved" exactly then)."""
        return self._ask_index(AuditIndex.open_ids)

    def declared_ids(self) -> list[str]:
        """The incidents with an incident.declared record."""
        return self._ask_index(AuditIndex.declared)

    def verify(self, expected_head: str | None = None, since: Checkpoint | None = None, *,
               workers: int | None = 1, pool: Executor | None = None) -> VerifyResult:
        """Check every record, the chain, its head file and (given) an externally kept
        head; name the first bad line. `since`: where an earlier verification ended; only
        what was appended after it is read (the part before is trusted), once the record
        there is checked to be still the one verified. `workers`: processes checking
        stretches of the log at once (None: one per core for a log of 64 MB or more; they
        are spawned, so a calling script needs the usual `if __name__ == "__main__"`).
        `pool`: an executor to run them in."""
        prev, seq, count = GENESIS, 0, 0
        offset = line_start = 0
        head = self._read_head()
        exists = self.path.exists() or self.path.is_symlink()
        if not exists:
            if head is not None and head.get("seq"):
                return VerifyResult(False, 0, None, f"the log is missing, but its head says "
                                    f"{head['seq']} records were written")
            if expected_head is not None and expected_head != GENESIS:
                return VerifyResult(False, 0, None, "the log is missing; the expected head "
                                    f"is {expected_head[:12]}")
            return VerifyResult(ok=True, records=0, head=GENESIS)
        torn = False
        try:
            handle = os.fdopen(_open_regular(self.path, os.O_RDONLY), "rb")
        except OSError as exc:
            return VerifyResult(False, 0, None, "cannot read the log"
                                + (" (it is a symbolic link)" if exc.errno == errno.ELOOP
                                   else f": {exc.strerror}"))
        with handle:
            start_line = 1
            if since is not None:
                if not self._still_there(handle, since):
                    return VerifyResult(False, 0, since.seq, f"record {since.seq} is not the "
                                        f"verified head {since.hash[:12]} any more (the log "
                                        "was rewritten)")
                prev, seq, count, start_line = since.hash, since.seq, since.seq, since.seq + 1
                offset = line_start = since.end
            from incident_notify.audit_verify import (
                PARALLEL_VERIFY_BYTES,
                scan_lines,
                scan_parallel,
            )

            scan = None
            if since is None:
                size = os.fstat(handle.fileno()).st_size
                n = workers if workers is not None else (
                    min(os.cpu_count() or 1, 8) if size >= PARALLEL_VERIFY_BYTES else 1)
                if n > 1:
                    scan = scan_parallel(self.path, handle, size, n, pool)
            if scan is None:
                scan = scan_lines(handle, offset, None, seq, prev)
            seq, prev, line_start, offset = scan.seq, scan.prev, scan.line_start, scan.offset
            count, checked = count + scan.passed, scan.passed
            number = start_line + scan.passed
            if scan.problem:
                return VerifyResult(False, count, number, scan.problem, head=prev)
            if scan.torn:
                torn = True
                return VerifyResult(False, count, number, "torn last line (a write was "
                                    "interrupted); the next append preserves it in a "
                                    "sidecar file", torn_tail=True, head=prev)
        if head is None:
            if seq:
                return VerifyResult(False, count, None, "the head file "
                                    f"{self.head_path.name} is missing or unreadable", torn,
                                    prev)
        elif head["seq"] > seq:
            return VerifyResult(False, count, seq + 1, f"records after line {seq} were "
                                f"removed (the head says {head['seq']} records)", torn, prev)
        elif head["seq"] < seq:
            return VerifyResult(False, count, head["seq"] + 1, f"{seq - head['seq']} "
                                f"record(s) after the head (record {head['seq']}) were not "
                                "written by incident-notify, or the head was rolled back "
                                "(a crash between the two writes also leaves this; the next "
                                "append brings them level)", torn, prev)
        elif head["hash"] != prev:
            return VerifyResult(False, count, seq, "the last record does not match the "
                                "recorded head", torn, prev)
        if expected_head is not None and expected_head != prev and \
                not (len(expected_head) >= 12 and prev.startswith(expected_head)):
            return VerifyResult(False, count, None, "the chain's head is not the expected "
                                f"{expected_head[:12]}", torn, prev)
        checkpoint = Checkpoint(seq, prev, line_start, offset) if seq else None
        return VerifyResult(True, count, head=prev, checkpoint=checkpoint, checked=checked)

    @staticmethod
    def _still_there(handle: BinaryIO, since: Checkpoint) -> bool:
        """Position `handle` after the checkpoint's record if the bytes there are still that
        record (its seq and hash, a whole line ending exactly at the checkpoint)."""
        handle.seek(since.line_start)
        raw = handle.read(since.end - since.line_start)
        if len(raw) != since.end - since.line_start or not raw.endswith(b"\n") \
                or b"\n" in raw[:-1]:
            return False
        try:
            data = json.loads(raw)
        except ValueError:
            return False
        return (isinstance(data, dict) and data.get("seq") == since.seq
                and data.get("hash") == since.hash and _line_hash(raw) == since.hash)

    def _read_head(self) -> dict[str, Any] | None:
        try:
            fd = _open_regular(self.head_path, os.O_RDONLY)
            with os.fdopen(fd, "rb") as handle:
                data = json.loads(handle.read(4096))
            seq, digest = data["seq"], data["hash"]
            if not is_int(seq) or not isinstance(digest, str) or len(digest) != 64:
                return None
            return {"seq": seq, "hash": digest}
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def head(self) -> tuple[int, str]:
        """(records, hash of the last record) as the log itself says, for keeping
        elsewhere (a ticket) and checking later with `verify --expect`."""
        seq, prev = 0, GENESIS
        for _, raw in self._lines():
            data = json.loads(raw)
            seq, prev = data["seq"], data["hash"]
        return seq, prev

    def close(self) -> None:
        for fd in (self._fd, self._head_fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._fd = self._head_fd = None
        self._tail = None


def _open_regular(path: Path, flags: int, mode: int = 0o600) -> int:
    """Open without following a symlink and without blocking (a FIFO planted in its place
    would hang the open), and refuse anything but a regular file."""
    import stat as stat_module

    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK, mode)
    if not stat_module.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"{path} is not a regular file")
    os.set_blocking(fd, True)
    return fd


def _owner_only(fd: int, path: Path) -> None:
    """The log and its head are the incident's record: nobody else may read or change them."""
    info = os.fstat(fd)
    if info.st_mode & 0o077:
        try:
            os.fchmod(fd, 0o600)
        except OSError:
            raise AuditError(f"{path} is open to other users and cannot be made private",
                             hint=f"chmod 600 {path}") from None


_FIELD_SET = frozenset(FIELDS)
_HASH_KEY = b',"hash":"'


def _index_holds(handle: BinaryIO, index: AuditIndex, size: int) -> bool:
    """The log still holds, where the index says it ends, the line the index last saw."""
    if index.covered == 0:
        return True
    if index.covered > size or index.last_hash is None:
        return False
    handle.seek(index.last_start)
    raw = handle.read(index.covered - index.last_start)
    return raw.endswith(b"\n") and b"\n" not in raw[:-1] and \
        _line_hash(raw) == index.last_hash


_AFTER_HASH = b',"incident":'


def _with_hash(body: bytes, digest: str) -> bytes:
    """The log line of a record: its canonical JSON `body` without the hash, with the hash
    member put where sorting puts it (before "incident"; the members before it are actor,
    channel and event, strings that cannot hold an unescaped quote, so the first match
    is the member's own), and a newline: `canonical` of the whole record, encoded once.
    `_line_hash` undoes it."""
    at = body.index(_AFTER_HASH)
    return b"".join((body[:at], _HASH_KEY, digest.encode(), b'"', body[at:], b"\n"))


def _line_hash(raw: bytes) -> str | None:
    """The hash of a canonical line's record: the line without its `"hash":"...",` member
    and newline is exactly the canonical JSON the hash was computed over (keys are sorted,
    and the members before "hash" are actor, channel and event, plain strings that cannot
    hold an unescaped quote). None when the member is not where it must be."""
    at = raw.find(_HASH_KEY)
    end = at + len(_HASH_KEY) + 64
    if at < 0 or raw[end:end + 2] != b'",':
        return None
    return hashlib.sha256(raw[:at + 1] + raw[end + 2:-1]).hexdigest()


def _covered(low: int, high: int, ranges: Sequence[tuple[int, int]]) -> bool:
    """Whether [low, high) lies within the union of the sorted [start, end) `ranges`."""
    for start, end in ranges:
        if end <= low:
            continue
        if start > low:
            return False
        low = end
        if low >= high:
            return True
    return False


def _default_actor() -> str:
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


@dataclass
class _Slot:
    entries: list[AuditEntry]
    done: bool = False
    records: list[AuditRecord] = field(default_factory=list)
    error: BaseException | None = None
    wake: threading.Condition | None = None
    """Its thread waits on this (made on the writer's lock when it first waits)."""


@dataclass
class GroupCommitWriter:
    """Many threads append; concurrent appends share one write and one fsync.

    Whoever finds no write in progress becomes the leader and writes every queued entry;
    the others wait until their entry is durable. `append` returns only then. The entries
    of one `append_many` are written together, in order, in the same write. A finished
    write wakes only the threads whose entries it wrote, and the first still queued to
    lead the next one (waking every waiter at each write made 32 sending threads spend
    their time handing the interpreter lock to each other).
    """

    log: AuditLog
    max_batch: int = 1024
    _pending: list[_Slot] = field(default_factory=list)
    _writing: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def append(self, event: str, **fields: Any) -> AuditRecord:
        return self.append_many([AuditEntry(event, **fields)])[0]

    def append_many(self, entries: Sequence[AuditEntry]) -> list[AuditRecord]:
        slot = _Slot(list(entries))
        if not slot.entries:
            return []
        with self._lock:
            self._pending.append(slot)
            while not slot.done:
                if self._writing:
                    if slot.wake is None:
                        slot.wake = threading.Condition(self._lock)
                    try:
                        slot.wake.wait()
                    except BaseException:  # Ctrl-C in the main thread while it waited
                        self._abandon(slot)
                        raise
                    continue
                self._writing = True
                batch, self._pending = (self._pending[: self.max_batch],
                                        self._pending[self.max_batch:])
                self._lock.release()
                try:
                    records = self.log.append_many([e for s in batch for e in s.entries])
                    at = 0
                    for s in batch:
                        s.records = records[at:at + len(s.entries)]
                        at += len(s.entries)
                except BaseException as exc:  # every waiter must learn of the failure
                    for s in batch:
                        s.error = exc
                finally:
                    self._lock.acquire()
                    self._writing = False
                    for s in batch:
                        s.done = True
                        if s.wake is not None:
                            s.wake.notify()
                    self._hand_on()
        if slot.error is not None:
            if isinstance(slot.error, AuditError):
                raise slot.error
            raise AuditError(f"audit write failed: {slot.error}") from slot.error
        return slot.records

    def _abandon(self, slot: _Slot) -> None:
        """(Under the lock.) A waiter leaves before its entries were written: they are
        withdrawn unless a write already holds them, and the turn to lead the next write,
        which may have been handed to it, goes to the first still queued."""
        if slot in self._pending:
            self._pending.remove(slot)
        if not self._writing:
            self._hand_on()

    def _hand_on(self) -> None:
        """(Under the lock, no write in progress.) Wake the first queued thread to lead
        the next write."""
        if self._pending and self._pending[0].wake is not None:
            self._pending[0].wake.notify()

    def records(self, **filters: Any) -> Iterator[AuditRecord]:
        return self.log.records(**filters)

    def close(self) -> None:
        """Every append is durable when it returns; nothing to flush."""

    def __enter__(self) -> GroupCommitWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
