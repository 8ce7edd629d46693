"""SMS through Twilio's Messages API with the real `twilio` client.

Credentials: ``TWILIO_ACCOUNT_SID``, ``TWILIO_AUTH_TOKEN``. The sandbox (or any test
double of Twilio) is reached by setting ``api_base`` / ``INCIDENT_NOTIFY_TWILIO_API_BASE``:
the client's HTTP (`_twilio_http`) rewrites ``https://api.twilio.com`` to it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

from incident_notify.channels._http import (
    provider_id,
    provider_offset,
    settle_floor,
    transport_error,
)
from incident_notify.channels._twilio_http import TWILIO_API
from incident_notify.channels.base import (
    Attempt,
    Channel,
    ChannelError,
    ChannelLimits,
    ChannelOptions,
    ChannelSpec,
    Delivery,
    Health,
    PermanentChannelError,
    Receipt,
    TransientChannelError,
    Unknowable,
)
from incident_notify.errors import ConfigError

# Twilio's documented sending rates (messages segments per second): US/Canada long code
# 1 MPS, toll-free 3 MPS (default verified), short code 100 MPS.
RATES = {"long_code": 1.0, "toll_free": 3.0, "short_code": 100.0}
RECIPIENT_CODES = {21211, 21614, 21612, 21408, 21610, 30006}
SENDER_CODES = {21601, 21603, 21606, 21212, 21659, 21701, 20005, 20404}
"""Twilio refusing the sender or the account (a From number not the account's, a messaging
service that does not exist, an account not active, a wrong account path): no SMS can go
to anyone, so the channel is down. (A short code's 21606 / 21659 can be the destination's
country instead: for a short code they stay the recipient's problem.)"""
_COUNTRY_CODES = {21606, 21659}
_quiet = logging.getLogger("incident_notify.twilio")
_quiet.setLevel(logging.WARNING)


class SMSOptions(ChannelOptions):
    messaging_service_sid: str | None = None
    status_callback: str | None = None
    max_segments: int = 3
    sender_kind: Literal["long_code", "toll_free", "short_code"] = "long_code"
    timeout_s: float = 20.0


class SMSChannel(Channel):
    type_name: ClassVar[str] = "sms"
    address = "phone"
    Options = SMSOptions
    default_limits = ChannelLimits(length_rule="sms-segments", max_length=None,
                                   rate_per_second=1.0, burst=1, concurrency=4)
    secret_names = ("TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN")
    api_base_env = "INCIDENT_NOTIFY_TWILIO_API_BASE"
    options: SMSOptions

    def __init__(self, spec: ChannelSpec, secrets: Mapping[str, str]) -> None:
        super().__init__(spec, secrets)
        if not spec.sender and not self.options.messaging_service_sid:
            raise ConfigError(f"channel {spec.name!r} (sms) needs a sender (From number) or "
                              "messaging_service_sid")
        if spec.rate_per_second is None:
            rate = RATES[self.options.sender_kind]
            self.limits = replace(self.limits, rate_per_second=rate, burst=max(1, int(rate)))

    def endpoint(self) -> str:
        return self.api_base(TWILIO_API)

    def preload(self) -> None:
        import twilio.rest  # noqa: F401
        from twilio.rest.api.v2010.account import AccountContext  # noqa: F401
        from twilio.rest.api.v2010.account.message import MessageList  # noqa: F401

    def _client(self) -> Any:
        return self.per_thread("client", self._make_client)

    def _make_client(self) -> Any:
        from twilio.rest import Client

        from incident_notify.channels._twilio_http import make_http

        http = make_http(self.api_base(TWILIO_API), self.options.timeout_s, _quiet)
        return Client(self.secret("TWILIO_ACCOUNT_SID"), self.secret("TWILIO_AUTH_TOKEN"),
                      http_client=http)

    def send(self, delivery: Delivery, attempt: Attempt) -> Receipt:
        kwargs: dict[str, Any] = {"to": delivery.recipient, "body": delivery.message.text}
        if self.spec.sender:
            kwargs["from_"] = self.spec.sender
        else:
            kwargs["messaging_service_sid"] = self.options.messaging_service_sid
        if self.options.status_callback:
            kwargs["status_callback"] = self.options.status_callback
        client = self._client()
        attempt.begin()
        with self.bounded("Twilio", maybe_delivered=True, mapped=self._map):
            message = client.messages.create(**kwargs)
        status = str(message.status or "")
        if status in _NOT_DELIVERED:
            # Taken, but already known not to reach the handset: not a delivery. The
            # person's next channel is tried; SMS is not retried.
            code = message.error_code
            raise PermanentChannelError(
                f"{self.name}: Twilio took the message as {status} (error {code}: "
                f"{message.error_message or 'no detail'})", channel=self.name,
                code=str(code or status), recipient_problem=True)
        return Receipt(provider_id=provider_id(message.sid, self.name, "Twilio"),
                       segments=_count(message.num_segments), detail={"status": message.status})

    def find_sent(self, delivery: Delivery, since: datetime) -> Receipt | None:
        """Twilio's message list (newest first), filtered by To and From, matched on the body
        and a creation time at or after the attempt. No DateSent filter: a message still
        queued at Twilio has no sent date yet, and it is exactly the one we look for."""
        kwargs: dict[str, Any] = {"to": delivery.recipient, "limit": 200}
        if self.spec.sender:
            kwargs["from_"] = self.spec.sender
        client = self._client()
        with self.bounded("Twilio", maybe_delivered=False, mapped=self._map):
            found = client.messages.list(**kwargs)
        floor = settle_floor(since, provider_offset(_answered(client).get("Date")))
        for message in found:
            created = message.date_created
            if message.body is None or message.to is None:
                # A list that hides bodies or recipients cannot prove anything either way.
                raise Unknowable(f"{self.name}: Twilio's message list does not show the "
                                 "body and recipient", channel=self.name, code="unknowable")
            if message.to != delivery.recipient or message.body != delivery.message.text:
                continue
            if self.spec.sender and message.from_ and message.from_ != self.spec.sender:
                continue
            if created is not None and created.astimezone(UTC) < floor:
                continue
            if str(message.status) in _NOT_DELIVERED:
                continue
            return Receipt(provider_id=str(message.sid),
                           segments=_count(message.num_segments),
                           detail={"status": message.status, "settled": True})
        return None

    def check(self) -> Health:
        started = time.monotonic()
        try:
            sid = self.secret("TWILIO_ACCOUNT_SID")
            with self.bounded("Twilio", maybe_delivered=False, mapped=self._map):
                account = self._client().api.v2010.accounts(sid).fetch()
        except ChannelError as exc:
            if exc.code == "429":
                # Twilio answered, to these credentials, that the account is busy (too many
                # requests at once): up. A send that meets the limit pauses then.
                return Health(ok=True, detail=f"answering, but rate limited ({exc.message})",
                              latency_ms=(time.monotonic() - started) * 1000)
            return Health(ok=False, detail=exc.message)
        latency = (time.monotonic() - started) * 1000
        # Only an account Twilio says is suspended or closed is down: one that answers
        # these credentials with no status (a restricted key's view, a minimal fake of
        # the API) can send, and sending says otherwise soon enough.
        status = account.status
        return Health(ok=status not in ("suspended", "closed"),
                      detail=f"account {status}" if status else "account answered",
                      latency_ms=latency)

    def _retry_after(self) -> float:
        """Seconds until Twilio accepts requests again: its Retry-After header, else 1 s."""
        client = getattr(self._thread_local, "client", None)
        return _seconds(_answered(client).get("Retry-After") if client is not None else None)

    def _map(self, exc: Exception) -> PermanentChannelError | TransientChannelError:
        """Twilio / transport errors to our classes (`bounded` then hides any credential
        Twilio quotes back)."""
        from twilio.base.exceptions import TwilioRestException

        name = self.name
        if isinstance(exc, PermanentChannelError | TransientChannelError):
            return exc
        if isinstance(exc, TwilioRestException):
            code, status = exc.code, exc.status
            text = f"Twilio error {code}: {exc.msg}" if code else f"Twilio HTTP {status}: {exc.msg}"
            if code == 21610:
                return PermanentChannelError(
                    f"{name}: the recipient replied STOP ({text})", channel=name,
                    code="21610", opt_out=True)
            if code in SENDER_CODES and not (code in _COUNTRY_CODES
                                             and self.options.sender_kind == "short_code"):
                return PermanentChannelError(
                    f"{name}: Twilio refuses to send from this account or sender ({text})",
                    channel=name, code=str(code), channel_down=True,
                    hint="check the channel's sender (a number of this Twilio account) or "
                    "messaging_service_sid, and TWILIO_ACCOUNT_SID")
            if code == 21611:
                # The sender's queue at Twilio is full (hours of messages wait in it): what
                # it took now would arrive hours late, so the channel is down for this
                # update and its deliveries fail over.
                return PermanentChannelError(
                    f"{name}: Twilio's queue for this sender is full ({text})", channel=name,
                    code="21611", channel_down=True,
                    hint="another system may be sending from the same number; give this "
                    "channel a sender of its own, or a messaging service with several")
            if code in RECIPIENT_CODES or code in _COUNTRY_CODES:
                return PermanentChannelError(f"{name}: invalid recipient ({text})",
                                             channel=name, code=str(code),
                                             recipient_problem=True)
            if code == 21617:
                return PermanentChannelError(f"{name}: message too long ({text})",
                                             channel=name, code="21617")
            if code == 20003 or status == 401:
                return PermanentChannelError(
                    f"{name}: Twilio rejected the credentials ({text})", channel=name,
                    code="auth", hint="check TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN",
                    channel_down=True)
            if code == 20429 or status == 429:
                return TransientChannelError(f"{name}: rate limited ({text})", channel=name,
                                             code="429", retry_after=self._retry_after())
            if status == 503:
                return TransientChannelError(f"{name}: Twilio unavailable ({text})",
                                             channel=name, code=str(code or status))
            if status >= 500:
                # Twilio: "if you get a 500 Server Error on these requests, and you retry
                # the request, it is possible for a customer to receive multiple messages"
                # (error 20500); a gateway's 502 or 504 may hide an accepted send too.
                return TransientChannelError(
                    f"{name}: Twilio answered with a server error ({text})", channel=name,
                    code=str(code or status), maybe_delivered=True)
            return PermanentChannelError(f"{name}: {text}", channel=name,
                                         code=str(code or status))
        return transport_error(name, "Twilio", exc)


_NOT_DELIVERED = ("failed", "undelivered", "canceled")
"""Message statuses that mean Twilio will not deliver it."""


def _answered(client: Any) -> Mapping[str, str]:
    """The headers of the last answer `client` read (`_twilio_http` keeps them, case
    insensitive; twilio's objects drop them)."""
    headers: Mapping[str, str] = client.http_client.last_headers or {}
    return headers


def _count(raw: Any) -> int:
    """Twilio's `num_segments` (a string in its JSON), 1 when it does not say."""
    try:
        return max(1, int(raw))
    except (TypeError, ValueError):
        return 1


def _seconds(raw: Any) -> float:
    """A Retry-After value (seconds, or an HTTP date) as seconds from now, at least 1."""
    if not raw:
        return 1.0
    try:
        return max(1.0, float(raw))
    except (TypeError, ValueError):
        pass
    try:
        from email.utils import parsedate_to_datetime

        return max(1.0, (parsedate_to_datetime(str(raw)) - datetime.now(UTC)).total_seconds())
    except (TypeError, ValueError):
        return 1.0
