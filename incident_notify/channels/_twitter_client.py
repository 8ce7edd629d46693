"""What the twitter and twitter_dm channels share: a tweepy v2 Client pointed at the API
base, and the mapping of tweepy errors to our error classes.

The base URL is swapped by giving the client a `requests.Session` whose `request()`
rewrites ``https://api.twitter.com`` before OAuth 1.0a signs the request, so the signature
covers the URL actually requested (the sandbox verifies it).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from incident_notify.channels._deadline import mount
from incident_notify.channels._http import (
    CONNECT_TIMEOUT_S,
    provider_offset,
    read_environment_once,
    transport_error,
)
from incident_notify.channels.base import Channel, PermanentChannelError, TransientChannelError

TWITTER_API = "https://api.twitter.com"
CREDENTIALS = ("TWITTER_API_KEY", "TWITTER_API_SECRET", "TWITTER_ACCESS_TOKEN",
               "TWITTER_ACCESS_TOKEN_SECRET")
# tweepy logs request parameters and bodies at DEBUG; keep that out of our logs.
logging.getLogger("tweepy").setLevel(logging.WARNING)


def make_client(channel: Channel) -> Any:
    import requests
    import tweepy

    base = channel.api_base(TWITTER_API)
    timeout = (CONNECT_TIMEOUT_S, channel.answer_timeout_s())

    class RewritingSession(requests.Session):
        last_date: tuple[str, float] | None = None
        """The last answer's Date header and when it came (read only when asked: `offset`)."""

        @property
        def offset(self) -> float:
            """How far X's clock was ahead of this machine's at the last answer."""
            if self.last_date is None:
                return 0.0
            date, received = self.last_date
            return provider_offset(date) + (time.time() - received)

        def request(self, method: str | bytes, url: str | bytes, *args: Any,
                    **kwargs: Any) -> requests.Response:
            text = url.decode() if isinstance(url, bytes) else url
            for origin in (TWITTER_API, "https://api.x.com"):
                if text.startswith(origin):
                    text = base + text[len(origin):]
            kwargs.setdefault("timeout", timeout)
            response = super().request(method, text, *args, **kwargs)
            date = response.headers.get("date")
            if date:
                self.last_date = (date, time.time())
            return response

    key, secret, token, token_secret = (channel.secret(n) for n in CREDENTIALS)
    client = tweepy.Client(consumer_key=key, consumer_secret=secret, access_token=token,
                           access_token_secret=token_secret, wait_on_rate_limit=False)
    client.session = RewritingSession()
    read_environment_once(client.session, base)
    mount(client.session)
    return client


def _api_text(exc: Any) -> str:
    parts = list(getattr(exc, "api_messages", []) or [])
    response = getattr(exc, "response", None)
    if not parts and response is not None:
        try:
            body = response.json()
            parts = [body.get("detail") or body.get("title") or ""]
        except ValueError:
            parts = []
    status = getattr(response, "status_code", "?")
    return f"HTTP {status}: " + ("; ".join(p for p in parts if p) or "no detail")


_ACCOUNT_CODES = {64, 93, 226, 326, 453}
"""X's error codes about the sending account or app: suspended, an app not allowed direct
messages, a request that looks automated, temporarily locked, an access level without the
endpoint."""
_ACCOUNT_WORDS = ("account is temporarily locked", "account is suspended",
                  "account is locked", "might be automated", "your account",
                  "app permissions", "application is not allowed", "attached to a project",
                  "client-not-enrolled", "oauth1-permissions", "different access level",
                  "access to a subset of")


def _account_refused(exc: Any, text: str) -> bool:
    """Whether a 403 is about the sending account or app rather than the request or the
    recipient (its words, its v1.1 code, or its v2 problem type)."""
    codes = set(getattr(exc, "api_codes", []) or [])
    lowered = f"{text} {_problem_type(exc)}".lower()
    return bool(codes & _ACCOUNT_CODES) or any(w in lowered for w in _ACCOUNT_WORDS)


_LIMITS = ("x-rate-limit", "x-user-limit-24hour", "x-app-limit-24hour")
"""X's limits, each with -remaining and -reset headers: the endpoint's 15-minute window, and
the daily caps of the account and of the app."""


def _reset_of(headers: Any) -> float | None:
    """When a 429 ends: the latest reset among the limits it says are spent (a daily cap
    spent answers 429 with the 15-minute window not spent, its reset near); with none
    said spent, the 15-minute window's."""
    spent: list[float] = []
    for limit in _LIMITS:
        try:
            if int(headers.get(f"{limit}-remaining", "")) <= 0:
                spent.append(float(headers.get(f"{limit}-reset", "")))
        except ValueError:
            continue
    if spent:
        return max(spent)
    try:
        return float(headers.get("x-rate-limit-reset", ""))
    except ValueError:
        return None


def _problem_type(exc: Any) -> str:
    response = getattr(exc, "response", None)
    try:
        body = response.json() if response is not None else {}
    except ValueError:
        return ""
    return str(body.get("type", "")) if isinstance(body, dict) else ""


def map_error(channel: str, exc: BaseException, *, broadcast: bool = False
              ) -> PermanentChannelError | TransientChannelError:
    """tweepy / transport errors to our classes. `broadcast`: a refused tweet (403 that is
    not a duplicate: a locked or suspended account) takes the whole channel down, where a
    refused DM is about its recipient."""
    import tweepy

    if isinstance(exc, PermanentChannelError | TransientChannelError):
        return exc
    if isinstance(exc, tweepy.TooManyRequests):
        reset: float | None = None
        now = time.time()
        if exc.response is not None:
            reset = _reset_of(exc.response.headers)
            # The reset is a time on X's clock; this machine's may have drifted (a laptop
            # woken from sleep) by more than the wait.
            now += provider_offset(exc.response.headers.get("date"))
        wait = max(1.0, reset - now) if reset else 60.0
        return TransientChannelError(f"{channel}: Twitter rate limit reached; resets in "
                                     f"{wait:.0f}s", channel=channel, code="429",
                                     retry_after=wait)
    if isinstance(exc, tweepy.TwitterServerError):
        status = exc.response.status_code
        if status == 503:  # over capacity: the request was not taken
            return TransientChannelError(f"{channel}: Twitter is unavailable "
                                         f"({_api_text(exc)})", channel=channel, code="503")
        # A 500, or a gateway's 502 or 504, may come after the post was made.
        return TransientChannelError(f"{channel}: Twitter answered with a server error "
                                     f"({_api_text(exc)})", channel=channel, code=str(status),
                                     maybe_delivered=True)
    if isinstance(exc, tweepy.Unauthorized):
        return PermanentChannelError(
            f"{channel}: Twitter rejected the credentials ({_api_text(exc)})", channel=channel,
            code="auth", hint="check TWITTER_API_KEY, TWITTER_API_SECRET, TWITTER_ACCESS_TOKEN "
            "and TWITTER_ACCESS_TOKEN_SECRET (user context, read and write)",
            channel_down=True)
    if isinstance(exc, tweepy.Forbidden):
        text = _api_text(exc)
        if _account_refused(exc, text):
            # X refuses the account itself (locked, suspended, held as automated) or the
            # app (not allowed DMs): nothing of this kind can go out on it, so its
            # deliveries fail over now, not one refusal per recipient at the DM rate.
            return PermanentChannelError(
                f"{channel}: X refuses the account or app ({text})", channel=channel,
                code="account",
                channel_down=True, hint="log in to X with the account to see why (a locked "
                "account is unlocked there); an app needs the \"Read, write and Direct "
                "Messages\" permission for DMs")
        if "deleted or not visible" in text.lower():
            return PermanentChannelError(f"{channel}: the tweet to reply to is gone ({text})",
                                         channel=channel, code="reply_target_gone")
        if "duplicate" in text.lower():
            return PermanentChannelError(f"{channel}: Twitter refused a duplicate tweet "
                                         f"({text})", channel=channel, code="duplicate",
                                         hint="an identical update was already posted")
        return PermanentChannelError(f"{channel}: Twitter refused the request ({text})",
                                     channel=channel, code="403",
                                     recipient_problem=not broadcast, channel_down=broadcast)
    if isinstance(exc, tweepy.NotFound):
        return PermanentChannelError(f"{channel}: not found ({_api_text(exc)})",
                                     channel=channel, code="404", recipient_problem=True)
    if isinstance(exc, tweepy.BadRequest):
        return PermanentChannelError(f"{channel}: Twitter refused the request "
                                     f"({_api_text(exc)})", channel=channel, code="400")
    if isinstance(exc, tweepy.HTTPException):
        return PermanentChannelError(f"{channel}: {_api_text(exc)}", channel=channel,
                                     code=str(exc.response.status_code))
    return transport_error(channel, "Twitter", exc)
