"""Twitter API v2 emulator, as the real `tweepy.Client` speaks it.

Routes: ``POST /2/tweets``, ``POST /2/dm_conversations/with/{id}/messages``,
``GET /2/users/by/username/{username}``, ``GET /2/users/me``, ``GET /2/users/{id}/tweets``
(the account's timeline, ``start_time``), ``GET /2/dm_conversations/with/{id}/dm_events``
and ``GET /2/tweets/search/recent`` (``conversation_id:`` only). Every request must carry a
valid OAuth 1.0a HMAC-SHA1 signature (RFC 5849), recomputed here from the configured
consumer and token secrets (401 otherwise). Tweets are checked for weighted length (400
over 280), replies to unknown or deleted tweets (403, `delete_tweet`) and duplicate text
(403), and a locked account's posts and DMs (403, code 326: fault ``locked``); every
response carries ``x-rate-limit-*`` headers and a configurable limit answers
429.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import re
import threading
import time
import urllib.parse
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar

from incident_notify.limits import TWEET_MAX, tweet_length
from incident_notify.sandbox.common import EmulatorHandler, HttpEmulator

_AUTH_PARAM = re.compile(r'(\w+)="([^"]*)"')
OWNER = "acme_status"
LOCKED = ("To protect our users from spam and other malicious activity, this account is "
          "temporarily locked. Please log in to https://twitter.com to unlock your account.")
"""What X answers a locked account's posts and DMs (code 326)."""
DEFAULT_USERS = {OWNER: "1000", "oncall_alice": "1001", "oncall_bob": "1002",
                 "customer_carol": "1003"}


def _pct(value: str) -> str:
    return urllib.parse.quote(value, safe="~")


def oauth1_signature(method: str, url: str, params: Mapping[str, str] | list[tuple[str, str]],
                     consumer_secret: str, token_secret: str) -> str:
    """RFC 5849 HMAC-SHA1 signature of a request."""
    parsed = urllib.parse.urlparse(url)
    scheme, host = parsed.scheme.lower(), (parsed.hostname or "").lower()
    port = parsed.port
    if port and not ((scheme == "http" and port == 80) or (scheme == "https" and port == 443)):
        host = f"{host}:{port}"
    base_url = f"{scheme}://{host}{parsed.path}"
    items = list(params.items()) if isinstance(params, Mapping) else list(params)
    encoded = sorted((_pct(k), _pct(v)) for k, v in items)
    normalized = "&".join(f"{k}={v}" for k, v in encoded)
    base = "&".join([method.upper(), _pct(base_url), _pct(normalized)])
    key = f"{_pct(consumer_secret)}&{_pct(token_secret)}"
    digest = hmac.new(key.encode(), base.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def _problem(status: int, title: str, detail: str, kind: str = "about:blank") -> dict[str, Any]:
    return {"title": title, "detail": detail, "type": kind, "status": status}


class TwitterHandler(EmulatorHandler):
    emulator: ClassVar[TwitterEmulator]
    _rate_headers: dict[str, str] = {}
    _body: bytes = b""

    def server_error(self, status: int) -> Any:
        title = self.responses.get(status, ("Server Error",))[0]
        return _problem(status, title, "Something went wrong on our side.")

    def _gate(self) -> bool:
        """Faults, OAuth and the rate limit, common to all routes; False when answered."""
        emu = self.emulator
        self.apply_latency()
        if emu.faults.outage or emu.faults.take_fail_next():
            self.send_json(503, _problem(503, "Service Unavailable", "Over capacity"))
            return False
        problem = self._check_oauth()
        if problem:
            self.send_json(401, {"title": "Unauthorized", "type": "about:blank",
                                 "status": 401, "detail": problem})
            return False
        path = urllib.parse.urlparse(self.path).path
        limited = emu.faults.rate_limited_paths
        if not limited or any(path.startswith(prefix) for prefix in limited):
            rate_limit = emu.faults.rate_limit
            allowed, remaining, reset = emu.rate.hit(rate_limit, emu.faults.rate_window_s)
        else:  # (an endpoint with a limit of its own, not counted in that one)
            rate_limit, allowed, remaining = None, True, 10**6
            reset = time.time() + emu.faults.rate_window_s
        limit = rate_limit or 10**6
        reset += emu.faults.clock_skew_s  # (the provider's clock)
        self._rate_headers = {"x-rate-limit-limit": str(limit),
                              "x-rate-limit-remaining": str(remaining),
                              "x-rate-limit-reset": str(int(reset))}
        if not allowed:
            self.send_json(429, _problem(429, "Too Many Requests", "Too Many Requests",
                                         "about:blank"), headers=self._rate_headers)
            return False
        daily = emu.faults.daily_limit
        if daily is not None and self.command == "POST" and (
                path == "/2/tweets" or "/dm_conversations/" in path):
            with emu.lock:
                spent = emu.posted_today >= daily
                emu.posted_today += 0 if spent else 1
            # (Counted as taken before the post is checked: X counts attempts too.)
            day_reset = int(emu.day_started + 86_400 + emu.faults.clock_skew_s)
            self._rate_headers.update({
                "x-user-limit-24hour-limit": str(daily),
                "x-user-limit-24hour-remaining": str(0 if spent else daily - emu.posted_today),
                "x-user-limit-24hour-reset": str(day_reset)})
            if spent:
                self.send_json(429, _problem(429, "Too Many Requests", "Too Many Requests",
                                             "about:blank"), headers=self._rate_headers)
                return False
        return True

    def _check_oauth(self) -> str | None:
        emu = self.emulator
        header = self.headers.get("Authorization", "")
        if not header.startswith("OAuth "):
            return "Unauthorized: OAuth 1.0a user context required"
        oauth = {k: urllib.parse.unquote(v) for k, v in _AUTH_PARAM.findall(header)}
        signature = oauth.pop("oauth_signature", "")
        oauth.pop("realm", None)
        if oauth.get("oauth_consumer_key") != emu.consumer_key or \
                oauth.get("oauth_token") != emu.access_token:
            return "Unauthorized: unknown consumer key or access token"
        parsed = urllib.parse.urlparse(self.path)
        params = list(oauth.items()) + urllib.parse.parse_qsl(parsed.query,
                                                              keep_blank_values=True)
        content_type = self.headers.get("Content-Type", "")
        if content_type.startswith("application/x-www-form-urlencoded"):
            params += urllib.parse.parse_qsl(self._body.decode(), keep_blank_values=True)
        url = f"http://{self.headers.get('Host', '')}{parsed.path}"
        expected = oauth1_signature(self.command, url, params, emu.consumer_secret,
                                    emu.access_token_secret)
        if not hmac.compare_digest(expected, signature):
            return "Unauthorized: the OAuth signature does not match"
        return None

    def do_GET(self) -> None:
        if self.handle_control("GET"):
            return
        self._body = b""
        if not self._gate():
            return
        emu = self.emulator
        parsed = urllib.parse.urlparse(self.path)
        path = parsed.path
        if path == "/2/tweets/search/recent":
            query = dict(urllib.parse.parse_qsl(parsed.query)).get("query", "")
            match = re.fullmatch(r"conversation_id:(\d+)", query.strip())
            if not match:
                self.send_json(400, _problem(400, "Invalid Request",
                                             "only conversation_id: queries are emulated"))
                return
            found = emu.conversation(match.group(1))
            body: dict[str, Any] = {"meta": {"result_count": len(found)}}
            if found:
                body["data"] = found
                authors = {t["author_id"] for t in found}
                body["includes"] = {"users": [
                    {"id": uid, "username": emu.username_of(uid) or uid,
                     "name": emu.username_of(uid) or uid} for uid in sorted(authors)]}
            self.send_json(200, body, headers=self._rate_headers)
            return
        match = re.fullmatch(r"/2/users/(\d+)/tweets", path)
        if match:
            params = dict(urllib.parse.parse_qsl(parsed.query))
            start = params.get("start_time", "")
            with emu.lock:
                mine = [{"id": tid, "text": emu.tweets[tid], "created_at": m["created_at"],
                         "edit_history_tweet_ids": [tid],
                         **({"referenced_tweets": [{"type": "replied_to",
                                                    "id": m["in_reply_to"]}]}
                            if m["in_reply_to"] else {})}
                        for tid, m in emu.meta.items()
                        if m["author_id"] == match.group(1) and m["created_at"] >= start]
            mine.sort(key=lambda t: int(t["id"]), reverse=True)
            self.send_json(200, {"data": mine[:int(params.get("max_results", 10))],
                                 "meta": {"result_count": len(mine)}},
                           headers=self._rate_headers)
            return
        match = re.fullmatch(r"/2/dm_conversations/with/(\d+)/dm_events", path)
        if match:
            with emu.lock:
                events = [e for e in reversed(emu.dm_events)
                          if e["participant_id"] == match.group(1)]
            self.send_json(200, {"data": [{k: v for k, v in e.items()
                                           if k != "participant_id"} for e in events],
                                 "meta": {"result_count": len(events)}},
                           headers=self._rate_headers)
            return
        if path == "/2/users/me":
            self.send_json(200, {"data": emu.user(OWNER)}, headers=self._rate_headers)
            return
        match = re.fullmatch(r"/2/users/by/username/(\w{1,15})", path)
        if match:
            emu.lookups += 1
            user = emu.user(match.group(1))
            if user is None:
                self.send_json(200, {"errors": [{
                    "value": match.group(1), "detail": f"Could not find user with username: "
                    f"[{match.group(1)}].", "title": "Not Found Error",
                    "resource_type": "user", "parameter": "username",
                    "resource_id": match.group(1),
                    "type": "https://api.twitter.com/2/problems/resource-not-found"}]},
                    headers=self._rate_headers)
            else:
                self.send_json(200, {"data": user}, headers=self._rate_headers)
            return
        self.send_json(404, _problem(404, "Not Found", "no such route"))

    def do_POST(self) -> None:
        if self.handle_control("POST"):
            return
        self._body = self.read_body()
        if not self._gate():
            return
        path = urllib.parse.urlparse(self.path).path
        try:
            payload = json.loads(self._body or b"{}")
        except ValueError:
            self.send_json(400, _problem(400, "Invalid Request", "body is not JSON"))
            return
        if self.emulator.faults.locked and (path == "/2/tweets" or "/dm_conversations/" in path):
            self.send_json(403, {"errors": [{"message": LOCKED, "code": 326}],
                                 "title": "Forbidden", "detail": LOCKED, "type": "about:blank",
                                 "status": 403})
            return
        if self.emulator.faults.no_dm_permission and "/dm_conversations/" in path:
            self.send_json(403, _problem(
                403, "Unsupported Authentication", "Your client app is not configured with "
                "the appropriate oauth1 app permissions for this endpoint.",
                "https://api.twitter.com/2/problems/oauth1-permissions"))
            return
        if path == "/2/tweets":
            self._tweet(payload)
            return
        match = re.fullmatch(r"/2/dm_conversations/with/(\d+)/messages", path)
        if match:
            self._dm(match.group(1), payload)
            return
        self.send_json(404, _problem(404, "Not Found", "no such route"))

    def _tweet(self, payload: dict[str, Any]) -> None:
        emu = self.emulator
        text = str(payload.get("text", ""))
        reply_to = (payload.get("reply") or {}).get("in_reply_to_tweet_id")
        if not text:
            self.send_json(400, _problem(400, "Invalid Request", "text is required"))
            return
        if tweet_length(text) > TWEET_MAX:
            self.send_json(400, {"errors": [{"message": "Your Tweet text is too long."}],
                                 "title": "Invalid Request", "detail": "One or more parameters "
                                 "to your request was invalid.", "type":
                                 "https://api.twitter.com/2/problems/invalid-request"})
            return
        with emu.lock:
            if reply_to is not None and reply_to not in emu.tweets:
                # (What X answers a reply to a deleted tweet, v1.1's code 385.)
                self.send_json(403, _problem(403, "Forbidden", "You attempted to reply to "
                                             "a Tweet that is deleted or not visible to "
                                             "you."))
                return
            if text in emu.texts:
                self.send_json(403, {"detail": "You are not allowed to create a Tweet with "
                                     "duplicate content.", "type": "about:blank",
                                     "title": "Forbidden", "status": 403})
                return
            tweet_id = str(next(emu.ids))
            emu.tweets[tweet_id] = text
            emu.texts.add(text)
            emu.meta[tweet_id] = {"author_id": emu.users[OWNER], "conversation_id":
                                  emu.meta.get(reply_to, {}).get("conversation_id", reply_to)
                                  if reply_to else tweet_id, "in_reply_to": reply_to,
                                  "created_at": emu.faults.now().strftime(
                                      "%Y-%m-%dT%H:%M:%S.000Z")}
        emu.received.add({"kind": "tweet", "id": tweet_id, "text": text,
                          "in_reply_to_tweet_id": reply_to, "author_id": emu.users[OWNER],
                          "ts": datetime.now(UTC).isoformat()})
        self.send_accepted(201, {"data": {"id": tweet_id, "text": text,
                                          "edit_history_tweet_ids": [tweet_id]}},
                           headers=self._rate_headers)

    def _dm(self, participant: str, payload: dict[str, Any]) -> None:
        emu = self.emulator
        username = emu.username_of(participant)
        if username is None:
            self.send_json(400, _problem(400, "Invalid Request", f"participant {participant} "
                                         "does not exist"))
            return
        if participant in emu.faults.bad_recipients or username in emu.faults.bad_recipients:
            self.send_json(403, _problem(403, "Forbidden", "You cannot send messages to this "
                                         "user."))
            return
        event_id = str(next(emu.ids))
        conversation = f"{emu.users[OWNER]}-{participant}"
        text = str(payload.get("text", ""))
        with emu.lock:
            emu.dm_events.append({
                "id": event_id, "event_type": "MessageCreate", "text": text,
                "sender_id": emu.users[OWNER], "dm_conversation_id": conversation,
                "participant_id": participant,
                "created_at": emu.faults.now().strftime("%Y-%m-%dT%H:%M:%S.000Z")})
        emu.received.add({"kind": "dm", "participant_id": participant, "username": username,
                          "text": text, "dm_event_id": event_id,
                          "ts": datetime.now(UTC).isoformat()})
        self.send_accepted(201, {"data": {"dm_conversation_id": conversation,
                                          "dm_event_id": event_id}},
                           headers=self._rate_headers)


class TwitterEmulator(HttpEmulator):
    handler_class = TwitterHandler

    def __init__(self, port: int = 0, *, consumer_key: str = "sandbox-key",
                 consumer_secret: str = "sandbox-secret", access_token: str = "sandbox-token",
                 access_token_secret: str = "sandbox-token-secret",
                 users: Mapping[str, str] | None = None, auto_users: bool = False) -> None:
        super().__init__(port)
        self.consumer_key = consumer_key
        self.consumer_secret = consumer_secret
        self.access_token = access_token
        self.access_token_secret = access_token_secret
        self.users: dict[str, str] = dict(users or DEFAULT_USERS)
        self.auto_users = auto_users
        """Create unknown users on lookup (the interactive sandbox); off in exact tests."""
        self.tweets: dict[str, str] = {}
        self.meta: dict[str, dict[str, Any]] = {}
        """tweet id -> author_id, conversation_id, in_reply_to, created_at."""
        self.texts: set[str] = set()
        self.deleted: set[str] = set()
        self.dm_events: list[dict[str, Any]] = []
        self.posted_today, self.day_started = 0, time.time()
        """Posts counted against `daily_limit`, since the day's start."""
        self.ids = itertools.count(1_860_000_000_000_000_000)
        self.lock = threading.Lock()
        self.lookups = 0

    def add_user(self, username: str) -> str:
        with self.lock:
            key = username.lstrip("@")
            if key.lower() not in {u.lower() for u in self.users}:
                self.users[key] = str(2000 + len(self.users))
            return next(v for k, v in self.users.items() if k.lower() == key.lower())

    def user(self, username: str) -> dict[str, str] | None:
        for name, uid in self.users.items():
            if name.lower() == username.lower():
                return {"id": uid, "name": name.replace("_", " ").title(), "username": name}
        if self.auto_users:
            uid = self.add_user(username)
            return {"id": uid, "name": username, "username": username}
        return None

    def username_of(self, user_id: str) -> str | None:
        return next((name for name, uid in self.users.items() if uid == user_id), None)

    def add_reply(self, in_reply_to: str, username: str, text: str) -> str:
        """Someone replies to one of the account's tweets (what customers do)."""
        author = self.add_user(username)
        with self.lock:
            parent = self.meta.get(in_reply_to, {})
            tweet_id = str(next(self.ids))
            self.tweets[tweet_id] = text
            self.meta[tweet_id] = {
                "author_id": author, "in_reply_to": in_reply_to,
                "conversation_id": parent.get("conversation_id", in_reply_to),
                "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")}
        return tweet_id

    def conversation(self, conversation_id: str) -> list[dict[str, Any]]:
        """Replies by others in a conversation, newest first (as recent search returns)."""
        owner = self.users[OWNER]
        with self.lock:
            found = [{"id": tid, "text": self.tweets[tid], "author_id": m["author_id"],
                      "conversation_id": m["conversation_id"], "created_at": m["created_at"],
                      "referenced_tweets": [{"type": "replied_to", "id": m["in_reply_to"]}]}
                     for tid, m in self.meta.items()
                     if m["conversation_id"] == conversation_id and m["author_id"] != owner]
        return sorted(found, key=lambda t: int(t["id"]), reverse=True)

    def known_tweet(self, tweet_id: str, text: str = "") -> None:
        """Seed a tweet (from an earlier process's sandbox) so replies to it are accepted."""
        with self.lock:
            if tweet_id not in self.deleted:
                self.tweets.setdefault(tweet_id, text)

    def delete_tweet(self, tweet_id: str) -> bool:
        """The tweet is gone (its author, a moderator, or Twitter deleted it): replies to it
        are refused, and it is no longer on the timeline. False when there was no such
        tweet."""
        with self.lock:
            self.deleted.add(tweet_id)
            self.meta.pop(tweet_id, None)
            return self.tweets.pop(tweet_id, None) is not None

    def reset(self) -> None:
        super().reset()
        with self.lock:
            self.tweets.clear()
            self.texts.clear()
            self.meta.clear()
            self.deleted.clear()
            self.dm_events.clear()
            self.posted_today, self.day_started = 0, time.time()
