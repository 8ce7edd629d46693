"""The opt-out list: who asked not to be contacted on which channel kind.

An append-only JSON Lines file of ``{"kind", "address", "ts", "reason", "action"}``;
``action`` is ``optout`` or ``optin`` and the last one for an address wins. A Twilio 21610
(the recipient replied STOP) adds an opt-out automatically. Customers who opted out are
skipped on that channel; internal audiences ignore the list.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from incident_notify.contacts import InvalidField, normalise_address, preference_kinds


class OptOutStore:
    def __init__(self, path: Path, region: str = "US") -> None:
        self.path = Path(path)
        self.region = region.strip().upper()
        self._lock = threading.Lock()
        self._state: dict[tuple[str, str], dict[str, Any]] | None = None
        self._unreadable: list[int] = []
        """Numbers of the lines that could not be read (see `problems`)."""

    def _key(self, kind: str, address: str) -> tuple[str, str]:
        try:
            return self.checked_key(kind, address)
        except InvalidField:
            return kind, address.strip().lower()

    def checked_key(self, kind: str, address: str) -> tuple[str, str]:
        """(kind, normalised address), or InvalidField for an address of no such kind."""
        if kind not in preference_kinds():
            raise InvalidField("kind", f"{kind!r} is not a channel kind",
                               f"use {', '.join(preference_kinds())}")
        return kind, normalise_address(kind, address, self.region)

    def _load(self) -> dict[tuple[str, str], dict[str, Any]]:
        if self._state is None:
            state: dict[tuple[str, str], dict[str, Any]] = {}
            unreadable: list[int] = []
            # Entries whose address is not one of its kind, by the line of the last one:
            # unless it is an opt-in, a problem to report.
            invalid: dict[tuple[str, str], int] = {}
            try:
                with open(self.path, encoding="utf-8", errors="replace") as handle:
                    for number, line in enumerate(handle, 1):
                        if not line.endswith("\n"):
                            break  # a line being written, or cut short by a crash
                        if not line.strip():
                            continue
                        item = _entry(line)
                        if item is None:
                            unreadable.append(number)
                            continue
                        try:
                            # (Keyed as it is looked up: a number typed by hand in
                            # another format is still the number.)
                            key = self.checked_key(item["kind"], item["address"])
                            invalid.pop(key, None)
                        except InvalidField:
                            # It matches nobody; kept as written, so that it can be
                            # removed as written.
                            key = self._key(item["kind"], item["address"])
                            invalid[key] = number
                        state[key] = {**item, "kind": key[0], "address": key[1]}
            except FileNotFoundError:
                pass
            unreadable += [n for key, n in invalid.items()
                           if state[key].get("action") == "optout"]
            self._state, self._unreadable = state, sorted(unreadable)
        return self._state

    def problems(self) -> list[str]:
        """Lines of the list that cannot be read, or whose opt-out names no valid address
        of its kind: each may be an opt-out not honoured. (The line numbers only: a line
        holds a person's address.)"""
        with self._lock:
            self._load()
            bad = self._unreadable
        if not bad:
            return []
        shown = ", ".join(map(str, bad[:5])) + (f" and {len(bad) - 5} more" if len(bad) > 5
                                                else "")
        return [f"opt-out list {self.path}: line{'s' if len(bad) > 1 else ''} {shown} cannot "
                "be read (or name no valid address), so whoever it names is not treated as "
                "opted out; fix the line, or record the opt-out again with "
                "'incident-notify contacts optout add'"]

    def _append(self, item: dict[str, Any]) -> None:
        """One line, under an exclusive lock (a send records a STOP while a commander adds
        one). A line cut short by a crash is ended first: written straight after it, this
        entry would join it in one unreadable line, and the opt-out would be lost."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            line = (json.dumps(item, ensure_ascii=False) + "\n").encode()
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)  # (and the lock with it)

    def add(self, kind: str, address: str, reason: str = "manual") -> bool:
        """Record an opt-out; False when the address was already opted out."""
        key = self._key(kind, address)
        with self._lock:
            state = self._load()
            if state.get(key, {}).get("action") == "optout":
                return False
            item = {"kind": key[0], "address": key[1], "action": "optout", "reason": reason,
                    "ts": datetime.now(UTC).isoformat()}
            self._append(item)
            state[key] = item
            return True

    def remove(self, kind: str, address: str, reason: str = "manual") -> None:
        key = self._key(kind, address)
        with self._lock:
            item = {"kind": key[0], "address": key[1], "action": "optin", "reason": reason,
                    "ts": datetime.now(UTC).isoformat()}
            self._append(item)
            self._load()[key] = item

    def is_opted_out(self, kind: str, address: str) -> bool:
        with self._lock:
            return self._load().get(self._key(kind, address), {}).get("action") == "optout"

    def all(self) -> list[dict[str, Any]]:
        with self._lock:
            return [v for v in self._load().values() if v.get("action") == "optout"]


def _entry(line: str) -> dict[str, Any] | None:
    """One line of the list, or None when it is not an opt-out or opt-in entry (or holds
    bytes that are not UTF-8: its address cannot be the one written)."""
    if "\ufffd" in line:
        return None
    try:
        item = json.loads(line)
    except ValueError:
        return None
    if not isinstance(item, dict) or item.get("action") not in ("optout", "optin") \
            or not isinstance(item.get("kind"), str) \
            or not isinstance(item.get("address"), str) or not item["address"].strip():
        return None
    return item
