"""One message to one address, whoever it is for.

Two contacts may share an address: an on-call phone the whole rota carries, a team mailbox,
the same person listed in two contact files under two ids. Each is a person the update
must reach, with a delivery of their own (their own fallbacks, their own line in the
verdict), but the address must not get the same message twice. So the dispatcher sends
the first such delivery (the *owner*) and settles the others on its outcome: sent, they are
recorded sent with the owner's provider id, without a request; in doubt, they are in doubt
too (`resume` finds the owner's message at the provider and settles them); refused or
failed over, each is sent on its own, so it fails over to that person's own next channel.
A delivery that shares the address but not the text (a personalised template) is sent.
"""

from __future__ import annotations

import threading
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from incident_notify.channels.base import Delivery, Receipt

if TYPE_CHECKING:
    from incident_notify.incident import DeliveryState

Signature = tuple[str, str, str, str | None, str | None]


def signature(d: Delivery) -> Signature | None:
    """What makes two deliveries the same message to the same address: the channel, the
    address and the text (subject and HTML for email); None for a broadcast or a thread
    part, which are never shared."""
    if not d.recipient or d.parts > 1:
        return None
    m = d.message
    return (d.channel, d.recipient.lower(), m.text, m.subject, m.html)


@dataclass(slots=True)
class Same:
    """The deliveries of one signature: the owner's key, then its outcome once known."""

    owner: str
    done: bool = False
    receipt: Receipt | None = None
    outcome: str = ""
    """The owner's recorded outcome when it has no receipt: unknown, failed, failed_over,
    or "" (not sent: the run stopped)."""
    waiting: list[Delivery] = field(default_factory=list)


def sharing_keys(deliveries: Collection[DeliveryState], update_no: int) -> set[str]:
    """The keys of an update's deliveries that share their channel, address and message
    with another (as recorded: a redacted address is the same keyed hash for the same
    address). Only these are tracked while sending: a resume of 100,000 deliveries keeps
    a set of small integers for a moment, not a signature per delivery."""
    seen: set[int] = set()
    twice: set[int] = set()
    for ds in deliveries:
        if ds.update_no == update_no and ds.recipient and ds.contact_id:
            h = hash((ds.channel, ds.recipient, ds.payload.get("digest")))
            if h in seen:
                twice.add(h)
            seen.add(h)
    if not twice:
        return set()
    del seen
    return {ds.key for ds in deliveries
            if ds.update_no == update_no and ds.recipient and ds.contact_id
            and hash((ds.channel, ds.recipient, ds.payload.get("digest"))) in twice}


class SharedSends:
    def __init__(self, tracked: set[str] | None = None) -> None:
        self._lock = threading.Lock()
        self._by_signature: dict[Signature, Same] = {}
        self._owners: dict[str, Same] = {}
        self._alone: set[str] = set()
        self.tracked = tracked
        """The keys that may share an address (`sharing_keys`); None: every delivery."""

    def track(self, keys: Collection[str]) -> None:
        """Deliveries planned while sending (a failover's) may share an address with each
        other: two people whose SMS fail over to the mailbox they share."""
        if self.tracked is not None:
            with self._lock:
                self.tracked.update(keys)

    def seed(self, d: Delivery, provider_id: str) -> None:
        """`d` was already sent (a resumed update): the same message to its address is not
        sent again."""
        sig = signature(d)
        if sig is not None and (self.tracked is None or d.key in self.tracked):
            with self._lock:
                self._by_signature.setdefault(sig, Same(owner=d.key, done=True,
                                                        receipt=Receipt(provider_id)))

    def claim(self, d: Delivery) -> tuple[Literal["send", "own", "follow", "wait"],
                                          Same | None]:
        """("send", None): send it, nothing shares it; ("own", same): send it, then
        `settle(same, ...)`; ("follow", same): the owner is done, settle this one on its
        outcome; ("wait", same): the owner is in flight, and will settle this one."""
        if self.tracked is not None and d.key not in self.tracked:
            return "send", None
        sig = signature(d)
        if sig is None:
            return "send", None
        with self._lock:
            if d.key in self._alone:
                return "send", None
            same = self._by_signature.get(sig)
            if same is None:
                same = self._by_signature[sig] = self._owners[d.key] = Same(owner=d.key)
                return "own", same
            if not same.done:
                same.waiting.append(d)
                return "wait", same
            return "follow", same

    def note(self, key: str, outcome: str) -> None:
        """An outcome was recorded for `key` (kept when `key` owns a signature)."""
        same = self._owners.get(key)
        if same is not None:
            same.outcome = outcome

    def settle(self, same: Same, receipt: Receipt | None) -> list[Delivery]:
        """The owner is done: the deliveries that waited for it."""
        with self._lock:
            same.done, same.receipt = True, receipt
            waiting, same.waiting = same.waiting, []
            return waiting

    def alone(self, d: Delivery) -> None:
        """`d` is to be sent on its own (its owner was refused or failed over)."""
        with self._lock:
            self._alone.add(d.key)
