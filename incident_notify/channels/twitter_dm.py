"""Twitter/X direct messages: resolve @handle to a user id (cached), then send the DM."""

from __future__ import annotations

import threading
from typing import Any, ClassVar

from incident_notify.channels._twitter_client import map_error
from incident_notify.channels.base import (
    ChannelLimits,
    ChannelSpec,
    Delivery,
    PermanentChannelError,
    Receipt,
)
from incident_notify.channels.twitter import TwitterChannel


class TwitterDMChannel(TwitterChannel):
    type_name: ClassVar[str] = "twitter_dm"
    # DM sends are limited per user per 15 minutes (and per day): 1/s with a small pool.
    default_limits = ChannelLimits(length_rule="chars", max_length=10_000, rate_per_second=1.0,
                                   burst=5, concurrency=2)

    def __init__(self, spec: ChannelSpec, secrets: Any) -> None:
        super().__init__(spec, secrets)
        self._ids: dict[str, str] = {}
        self._ids_lock = threading.Lock()

    def user_id(self, handle: str) -> str:
        name = handle.strip().lstrip("@")
        key = name.lower()
        with self._ids_lock:
            if key in self._ids:
                return self._ids[key]
        try:
            response = self.client().get_user(username=name, user_auth=True)
        except Exception as exc:
            raise map_error(self.name, exc) from None
        if response.data is None:
            raise PermanentChannelError(f"{self.name}: no Twitter user @{name}",
                                        channel=self.name, code="404", recipient_problem=True)
        with self._ids_lock:
            self._ids[key] = str(response.data.id)
            return self._ids[key]

    def send(self, delivery: Delivery) -> Receipt:
        participant = self.user_id(delivery.recipient)
        try:
            response = self.client().create_direct_message(
                participant_id=participant, text=delivery.message.text, user_auth=True)
        except Exception as exc:
            raise map_error(self.name, exc) from None
        return Receipt(provider_id=str(response.data["dm_event_id"]),
                       detail={"participant_id": participant})
