"""Public tweets and reply threads on the incident's Twitter/X account (API v2)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

from incident_notify.channels._http import provider_id, settle_floor
from incident_notify.channels._twitter_client import make_client, map_error
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
    Unknowable,
)


class TwitterOptions(ChannelOptions):
    timeout_s: float = 20.0
    """Seconds to wait for Twitter's answer before the request counts as in doubt."""


class TwitterChannel(Channel):
    type_name: ClassVar[str] = "twitter"
    threading = "reply"
    Options = TwitterOptions
    options: TwitterOptions
    # POST /2/tweets allows 100 requests per 15 minutes per user on the paid tiers (fewer
    # on Free): 0.1/s sustained with a small burst for a thread. One in flight keeps a
    # thread's parts in order.
    default_limits = ChannelLimits(length_rule="twitter-weighted", max_length=280,
                                   rate_per_second=0.1, burst=5, concurrency=1, threads=True,
                                   broadcast=True)
    secret_names = ("TWITTER_API_KEY", "TWITTER_API_SECRET", "TWITTER_ACCESS_TOKEN",
                    "TWITTER_ACCESS_TOKEN_SECRET")
    api_base_env = "INCIDENT_NOTIFY_TWITTER_API_BASE"
    refuses_duplicates = True
    public = True

    def __init__(self, spec: ChannelSpec, secrets: Mapping[str, str]) -> None:
        super().__init__(spec, secrets)

    def endpoint(self) -> str:
        from incident_notify.channels._twitter_client import TWITTER_API

        return self.api_base(TWITTER_API)

    def preload(self) -> None:
        import requests  # noqa: F401
        import tweepy  # noqa: F401

    def client(self) -> Any:
        return self.per_thread("client", lambda: make_client(self))

    def _mapped(self, exc: Exception) -> ChannelError:
        return map_error(self.name, exc)

    def _mapped_post(self, exc: Exception) -> ChannelError:
        """A refused public post (a locked account) takes the channel down."""
        return map_error(self.name, exc, broadcast=True)

    def send(self, delivery: Delivery, attempt: Attempt) -> Receipt:
        client = self.client()
        attempt.begin()
        try:
            return self._post(client, delivery.message.text, delivery.reply_to)
        except PermanentChannelError as exc:
            if exc.code == "reply_target_gone" and delivery.reply_to:
                # The tweet this one replies to was deleted: X refused the reply, so
                # nothing was posted. The public must still hear: a new thread starts.
                receipt = self._post(client, delivery.message.text, None)
                return Receipt(provider_id=receipt.provider_id, detail={
                    "in_reply_to": None, "reply_target_gone": delivery.reply_to})
            # A retry refused as a duplicate when the first try was not: the tweet that
            # makes it one appeared meanwhile, most likely this one, made by Twitter
            # although its answer said otherwise (a 503 after posting). The timeline
            # settles it (same text, same reply target, recent); anything it cannot show
            # stays the refusal.
            if exc.code != "duplicate" or attempt.number < 2:
                raise
            try:
                found = self.find_sent(delivery, datetime.now(UTC) - timedelta(minutes=15))
            except ChannelError:
                found = None
            if found is None:
                raise
            return found

    def _post(self, client: Any, text: str, reply_to: str | None) -> Receipt:
        with self.bounded("Twitter", maybe_delivered=True, mapped=self._mapped_post):
            response = client.create_tweet(text=text, in_reply_to_tweet_id=reply_to,
                                           user_auth=True)
            return Receipt(provider_id=provider_id(response.data.get("id"), self.name,
                                                   "Twitter"),
                           detail={"in_reply_to": reply_to})

    def my_id(self) -> str:
        def fetch() -> str:
            with self.bounded("Twitter", maybe_delivered=False, mapped=self._mapped):
                response = self.client().get_me(user_auth=True)
            return str(response.data.id)

        return self.per_thread("me", fetch)

    def find_sent(self, delivery: Delivery, since: datetime) -> Receipt | None:
        """The account's own recent tweets: one with the same text replying to the same
        tweet is the one we sent."""
        me = self.my_id()  # (a request of its own, under its own deadline)
        # (On X's clock: this thread's client has had an answer by now, with its Date.)
        start = settle_floor(since, self.client().session.offset).astimezone(UTC)
        with self.bounded("Twitter", maybe_delivered=False, mapped=self._mapped):
            response = self.client().get_users_tweets(
                me, user_auth=True, max_results=100,
                start_time=start.strftime("%Y-%m-%dT%H:%M:%SZ"),
                tweet_fields=["created_at", "referenced_tweets"])
        for tweet in response.data or []:
            if tweet.text is None:
                raise Unknowable(f"{self.name}: the timeline does not show tweet texts",
                                 channel=self.name, code="unknowable")
            replied = next((str(r.id) for r in (tweet.referenced_tweets or [])
                            if r.type == "replied_to"), None)
            if tweet.text != delivery.message.text:
                continue
            if replied == (delivery.reply_to or None):
                return Receipt(provider_id=str(tweet.id),
                               detail={"in_reply_to": delivery.reply_to, "settled": True})
            if replied is None and delivery.reply_to:
                # Posted as a new thread, its reply target being gone (see `send`).
                return Receipt(provider_id=str(tweet.id), detail={
                    "in_reply_to": None, "reply_target_gone": delivery.reply_to,
                    "settled": True})
        return None

    def replies(self, conversation_id: str) -> list[dict[str, Any]]:
        """Replies from others to the incident's thread (recent search, last 7 days)."""
        with self.bounded("Twitter", maybe_delivered=False, mapped=self._mapped):
            response = self.client().search_recent_tweets(
                query=f"conversation_id:{conversation_id}", user_auth=True,
                tweet_fields=["author_id", "created_at", "conversation_id"],
                expansions=["author_id"], max_results=100)
        users = {str(u.id): u.username for u in (response.includes or {}).get("users", [])}
        return [{"id": str(t.id), "text": t.text, "author": users.get(str(t.author_id), ""),
                 "created_at": str(t.created_at or "")} for t in (response.data or [])]

    def check(self) -> Health:
        started = time.monotonic()
        try:
            with self.bounded("Twitter", maybe_delivered=False, mapped=self._mapped):
                me = self.client().get_me(user_auth=True)
        except ChannelError as err:
            if err.code == "429":
                # Each X endpoint has its own limit: the account lookup (75 per 15 min)
                # can run out while posting works. Twitter answered, with these
                # credentials: up. A send that meets a limit pauses then.
                return Health(ok=True, detail=f"answering, but the account lookup is rate "
                              f"limited ({err.message})",
                              latency_ms=(time.monotonic() - started) * 1000)
            return Health(ok=False, detail=err.message)
        username = me.data.username if me.data else ""
        detail = "authenticated"
        if self.spec.sender and self.spec.sender.lstrip("@").lower() != username.lower():
            detail += f" (not as the playbook's sender {self.spec.sender})"
        return Health(ok=True, detail=detail, latency_ms=(time.monotonic() - started) * 1000)
