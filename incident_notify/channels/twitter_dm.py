"""Twitter/X direct messages: resolve @handle to a user id (cached), then send the DM."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from datetime import datetime
from typing import ClassVar

from incident_notify.channels._http import provider_id, settle_floor
from incident_notify.channels.base import (
    Attempt,
    ChannelLimits,
    ChannelSpec,
    Delivery,
    PermanentChannelError,
    Receipt,
    Unknowable,
)
from incident_notify.channels.twitter import TwitterChannel


class TwitterDMChannel(TwitterChannel):
    type_name: ClassVar[str] = "twitter_dm"
    address = "twitter"
    threading = ""
    # DM sends are limited per user per 15 minutes (and per day): 1/s with a small pool.
    default_limits = ChannelLimits(length_rule="chars", max_length=10_000, rate_per_second=1.0,
                                   burst=5, concurrency=2)
    refuses_duplicates = False
    public = False

    def __init__(self, spec: ChannelSpec, secrets: Mapping[str, str]) -> None:
        super().__init__(spec, secrets)
        self._ids: dict[str, str] = {}
        self._ids_lock = threading.Lock()

    def user_id(self, handle: str) -> str:
        name = handle.strip().lstrip("@")
        key = name.lower()
        with self._ids_lock:
            if key in self._ids:
                return self._ids[key]
        with self.bounded("Twitter", maybe_delivered=False, mapped=self._mapped):
            response = self.client().get_user(username=name, user_auth=True)
        if response.data is None:
            raise PermanentChannelError(f"{self.name}: no Twitter user @{name}",
                                        channel=self.name, code="404", recipient_problem=True)
        with self._ids_lock:
            self._ids[key] = str(response.data.id)
            return self._ids[key]

    def send(self, delivery: Delivery, attempt: Attempt) -> Receipt:
        participant = self.user_id(delivery.recipient)  # a lookup: nothing sent yet
        client = self.client()
        attempt.begin()
        with self.bounded("Twitter", maybe_delivered=True, mapped=self._mapped):
            response = client.create_direct_message(
                participant_id=participant, text=delivery.message.text, user_auth=True)
            return Receipt(provider_id=provider_id(response.data.get("dm_event_id"),
                                                   self.name, "Twitter"),
                           detail={"participant_id": participant})

    def find_sent(self, delivery: Delivery, since: datetime) -> Receipt | None:
        """The DM conversation with the recipient: a message from us with the same text,
        sent at or after the attempt, is the one."""
        participant = self.user_id(delivery.recipient)
        mine = self.my_id()
        floor = settle_floor(since, self.client().session.offset)  # (on X's clock)
        with self.bounded("Twitter", maybe_delivered=False, mapped=self._mapped):
            response = self.client().get_direct_message_events(
                participant_id=participant, user_auth=True, max_results=100,
                event_types="MessageCreate",
                dm_event_fields=["created_at", "sender_id", "text", "event_type"])
        for event in response.data or []:
            created = getattr(event, "created_at", None)
            sender = getattr(event, "sender_id", None)
            if sender is None or getattr(event, "text", None) is None:
                raise Unknowable(f"{self.name}: the DM conversation does not show senders "
                                 "and texts", channel=self.name, code="unknowable")
            if str(sender) != mine or event.text != delivery.message.text:
                continue
            if created is not None and created < floor:
                continue
            return Receipt(provider_id=str(event.id),
                           detail={"participant_id": participant, "settled": True})
        return None
