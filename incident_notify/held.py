"""Requests a provider holds, recorded while they are held.

`resume` settles a delivery in doubt by asking the provider, and sends it again when the
provider has no record of it. A provider that holds a request (it hangs) and records the
message only later would then get it twice. When the sending process was killed while the
provider held the request, its record ends at the attempt: nothing in it says that the
provider was holding it, and `resume` trusts "not there" once the provider has had the
channel's `timeout_s`, however long it holds requests. So while sending, a watcher appends
`delivery.held` for each request still unanswered after `HELD_S`, once per attempt;
`resume` then waits for the channel's whole request deadline before it trusts that such a
delivery is not at the provider.

Requests answered sooner cost a dictionary entry each, and the watcher thread starts with
the first attempt of a run and looks twice a second.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from incident_notify.channels.base import Delivery

HELD_S = 1.0
"""A request unanswered this long: its provider may be holding it (an API answers in well
under a second; a record or two more for a slow one costs nothing)."""
CHECK_EVERY_S = 0.5

Record = Callable[[Delivery, int, float], None]
"""Append `delivery.held` for (delivery, attempt number, seconds held so far)."""


class HeldWatch:
    """The requests of one dispatcher run, from their attempt record to their answer."""

    def __init__(self, record: Record) -> None:
        self._record = record
        self._lock = threading.Lock()
        self._flying: dict[str, tuple[float, Delivery, int]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def started(self, d: Delivery, number: int) -> None:
        """Attempt `number` of `d` is recorded and its request is about to leave."""
        with self._lock:
            self._flying[d.key] = (time.monotonic(), d, number)
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._watch, name="held-watch",
                                                daemon=True)
                self._thread.start()

    def ended(self, key: str) -> None:
        """The request of `key` was answered, failed or was given up."""
        with self._lock:
            self._flying.pop(key, None)

    def close(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(CHECK_EVERY_S):
            now = time.monotonic()
            with self._lock:
                due = [(key, flying) for key, flying in self._flying.items()
                       if now - flying[0] >= HELD_S]
                for key, _ in due:
                    del self._flying[key]
            for _, (began, d, number) in due:
                try:
                    self._record(d, number, now - began)
                except Exception:  # a hint for resume: the sending threads meet (and
                    pass  # report) a log that cannot be written themselves
