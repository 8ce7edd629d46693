"""What the HTTP channels (Twitter, Twilio) share: their sessions' reading of the
environment, and classifying a transport failure by whether the request may have reached
the provider.

A connection that was never made (refused, DNS, TLS handshake, connect timeout) cannot
have delivered anything: retry freely. A failure once the request was on the wire (the
connection dropped or reset before the answer, a read timeout, an answer we cannot parse)
may have delivered it: the delivery is *unknown*, never retried blindly.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from incident_notify.channels.base import TransientChannelError

CONNECT_TIMEOUT_S = 5.0
"""How long a connection may take to open (TCP, and TLS where it starts at once) before the
provider counts as unreachable: nothing was sent, so the delivery is retried or fails over.
A provider whose address drops the connection request (a firewall, a route gone in the
outage) otherwise held each request for the whole `timeout_s`, and a request deadline
cannot cut a connection that has no socket yet. Reads keep `timeout_s`: a server may take
its time to answer (Postfix's postscreen waits 6 s before its greeting)."""


def read_environment_once(session: Any, url: str) -> None:
    """What `requests` reads from the environment for each request (the proxy for `url`,
    honouring NO_PROXY, and REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE), read once for the one
    host this session talks to, and kept on the session, which then stops reading it.
    Scanning every environment variable twice per request was a sixth of an SMS's CPU.
    (The clients always pass their own auth, so the .netrc lookup it also skips never
    applied.)"""
    settings = session.merge_environment_settings(url, {}, None, None, None)
    session.trust_env = False
    session.proxies.update(settings["proxies"])
    session.verify = settings["verify"]


def provider_id(value: Any, channel: str, provider: str) -> str:
    """The id the provider gave what it made (a message sid, a tweet id): an answer without
    one was taken but names nothing, so the delivery is unknown (never sent again blindly;
    `resume` finds it in the provider's records), and a thread never replies to "None"."""
    if value is None or not str(value).strip():
        raise TransientChannelError(f"{channel}: {provider} took the message but its answer "
                                    "gives no id", channel=channel, code="unreadable",
                                    maybe_delivered=True)
    return str(value)


def provider_offset(date: str | None) -> float:
    """How far the provider's clock (the `Date` header of an answer just read) is ahead of
    this machine's, in seconds (negative: behind); 0 when the answer did not say."""
    if not date:
        return 0.0
    import time
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(date)
    except (TypeError, ValueError):
        return 0.0
    return when.timestamp() - time.time() if when.tzinfo is not None else 0.0


SETTLE_MARGIN_S = 300.0
"""How much earlier than its attempt (both clocks made one) a message found at the
provider may have been created and still be the attempt's."""


def settle_floor(since: datetime, offset: float) -> datetime:
    """The earliest creation time, on the provider's clock, of a message that may be the
    one attempted at `since` (this machine's clock, `offset` seconds behind the
    provider's: negative when this machine runs ahead, as a laptop whose clock drifted).
    Only ever widened by the offset: a message created before the attempt on this clock
    but after it on the provider's is still found, never sent twice."""
    return since + timedelta(seconds=min(0.0, offset) - SETTLE_MARGIN_S)


def transport_error(channel: str, provider: str, exc: BaseException) -> TransientChannelError:
    """Map a `requests` (or other non-HTTP-status) failure to a TransientChannelError."""
    import requests
    from urllib3.exceptions import NewConnectionError

    never_sent = (requests.exceptions.ConnectTimeout, requests.exceptions.SSLError,
                  requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                  requests.exceptions.InvalidSchema, requests.exceptions.InvalidHeader)
    if isinstance(exc, never_sent):
        return TransientChannelError(f"{channel}: cannot reach {provider} "
                                     f"({type(exc).__name__})", channel=channel,
                                     code="connection")
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return TransientChannelError(f"{channel}: {provider} did not answer in time",
                                     channel=channel, code="timeout", maybe_delivered=True)
    if isinstance(exc, requests.exceptions.ConnectionError):
        reason = exc.args[0] if exc.args else None
        inner = getattr(reason, "reason", reason)  # urllib3's MaxRetryError wraps the cause
        if isinstance(inner, NewConnectionError):
            return TransientChannelError(f"{channel}: cannot reach {provider} "
                                         "(connection refused or no route)", channel=channel,
                                         code="connection")
        return TransientChannelError(f"{channel}: the connection to {provider} dropped "
                                     "before it answered", channel=channel, code="dropped",
                                     maybe_delivered=True)
    return TransientChannelError(f"{channel}: unexpected answer from {provider} "
                                 f"({type(exc).__name__})", channel=channel, code="error",
                                 maybe_delivered=True)
