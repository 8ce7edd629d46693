"""Pieces shared by the local provider emulators: fault injection, a record of what was
received, and a threaded HTTP server on 127.0.0.1 with a small control API.

Every emulator exposes, in-process:

* ``faults``: a `Faults` object (thread-safe setters) — outage, added latency, a rate limit,
  recipients that fail;
* ``received``: a `Recorder` of every accepted message (a list of dicts);
* ``start()`` / ``stop()`` and ``url`` (``http://127.0.0.1:PORT``) or ``port``.

HTTP emulators also answer a control API so another process (a test, or a user of
``incident-notify sandbox``) can inspect and steer them:

* ``GET /_sandbox/received`` -> ``{"received": [...]}``
* ``POST /_sandbox/faults`` with a JSON body of `Faults` fields -> the new faults
* ``POST /_sandbox/reset`` -> clears records, faults and rate-limit windows

Faults (`Faults`): ``outage``, ``latency_ms`` (a slow or hanging provider), ``rate_limit``
with ``rate_window_s`` (a far reset: ``rate_limit: 0, rate_window_s: 900`` answers 429 with
a reset 15 minutes away), ``bad_recipients``, ``fail_next``, ``drop_after_accept`` (the
message is accepted and recorded, then the connection drops before the answer),
``garble_after_accept`` (accepted and recorded, then answered with a page that is not the
API's), ``send_latency_ms`` (only the sends hang), ``dribble_ms`` (accepted and recorded,
then the answer comes a byte at a time), ``error_after_accept`` with ``error_status``
(accepted and recorded, then answered with a server error), ``outage_after`` (an outage
starts after that many more accepted messages).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar


@dataclass
class Faults:
    """Fault injection settings. Change them with `update` (thread-safe)."""

    outage: bool = False
    """Answer every request with 503 (HTTP) or 421 (SMTP)."""
    latency_ms: float = 0.0
    """Sleep this long before answering each request."""
    send_latency_ms: float = 0.0
    """Sleep this long before answering each send (an HTTP POST; for SMTP, the end of
    DATA, once the message is accepted) only: the health check still answers at once,
    then the sends hang."""
    rate_limit: int | None = None
    """At most this many accepted requests per `rate_window_s`; then 429."""
    rate_window_s: float = 900.0
    """Length of the rate-limit window (Twitter's is 15 minutes)."""
    rate_limited_paths: list[str] = field(default_factory=list)
    """The rate limit applies only to paths starting with one of these (each X endpoint
    has its own limit: `/2/users/me` runs out long before `/2/tweets`; Twilio's account
    lookup may be refused while sending works); empty: to every request (Twitter), to
    the sends (Twilio)."""
    bad_recipients: list[str] = field(default_factory=list)
    """Recipients (numbers, emails, user ids/handles) rejected as invalid."""
    bad_recipient_code: int = 21211
    """Twilio: the error code a bad recipient is refused with (21211 an invalid number;
    21219 a number a trial account has not verified, 21614 not a mobile number...)."""
    messages_per_connection: int = 0
    """SMTP: after this many messages on one connection the server answers the next MAIL
    "421 Too many messages on this connection" and hangs up, as mail servers limit
    connections (Exchange Online: 20 or 30); 0: no limit."""
    deferred_recipients: list[str] = field(default_factory=list)
    """SMTP: recipients whose server defers mail for now (greylisting, a mailbox receiving
    too fast): RCPT answered "450 4.7.1 ... try again in 300 seconds"."""
    full_mailboxes: list[str] = field(default_factory=list)
    """SMTP: recipients whose mailbox is full: the end of the data is answered "452 4.2.2
    Mailbox full, try again later" (a temporary refusal of this one message)."""
    throttled_connections: int = 0
    """SMTP: greet the next N connections "421 4.7.0 Try again later, closing connection",
    as Gmail greets a sender going faster than it allows."""
    busy_logins: int = 0
    """SMTP: answer the next N AUTH commands "454 4.7.0 Too many login attempts, please try
    again later", as Gmail and Exchange do when a client logs in on many connections at
    once (smtplib tries each mechanism offered: a login may take two)."""
    sender_queue_full: bool = False
    """Twilio: the From number's queue is full (error 21611: more than about 4 hours of
    messages wait to go out from it): every send is refused until it drains."""
    account_status: str = "active"
    """Twilio: the account's status in the account lookup (the health check): "suspended"
    or "closed" as Twilio says of such accounts; "" leaves the field out, as a stricter
    proxy or a minimal fake of the API does."""
    daily_limit: int | None = None
    """Twitter: posts (tweets and DMs) the account may make in 24 hours; past it, 429 with
    the 15-minute window not spent (its reset near) and `x-user-limit-24hour-remaining: 0`
    with a reset hours away, as X answers a spent daily cap."""
    no_dm_permission: bool = False
    """Twitter: the app may post but not send DMs (its access level lacks "Direct
    Messages"): DMs answer 403, problem `oauth1-permissions`, as X does."""
    locked: bool = False
    """Twitter: the account is locked (X's code 326, "this account is temporarily
    locked"): every post and DM is refused with 403, while reads (the health check's
    account lookup) still answer."""
    bad_senders: list[str] = field(default_factory=list)
    """Senders refused: SMTP From addresses at MAIL (553, an address the login may not send
    as), Twilio From numbers (21606, not a number of the account)."""
    no_extensions: list[str] = field(default_factory=list)
    """SMTP: extensions left out of the EHLO answer (AUTH, SMTPUTF8...), as a relay that
    offers less than the sender needs."""
    unknown_commands: list[str] = field(default_factory=list)
    """SMTP: commands answered "502 5.5.1 Command not implemented", as an old or minimal
    server answers what it does not know: EHLO (it speaks HELO only, with no extensions:
    no AUTH, no SMTPUTF8), NOOP, RSET..."""
    failed_recipients: list[str] = field(default_factory=list)
    """Recipients whose message is refused once sent: Twilio takes it (201) with the status
    already "failed" (error 30003, unreachable handset), as a carrier filter or a stricter
    fake answers; SMTP answers the end of the data "554 5.7.1" (a mailbox's filter)."""
    fail_next: int = 0
    """Fail this many next requests with 503, then work again (tests of retries)."""
    outage_after: int = 0
    """After this many more accepted messages, an outage starts (a thread cut mid-way)."""
    drop_after_accept: int = 0
    """Accept (and record) this many next messages, then drop the connection without
    answering: the client cannot tell whether they arrived."""
    garble_after_accept: int = 0
    """Accept (and record) this many next messages, then answer 200 with a body that is
    not the API's (an HTML page, as a proxy in the way gives; SMTP: a reply to the data
    with no reply code): the client cannot read whether they arrived."""
    idless_after_accept: int = 0
    """Twitter, Twilio: accept (and record) this many next messages, then answer as usual
    but with the message's id (`sid`, `id`, `dm_event_id`) null, as a proxy or a changed
    API might: the message was taken, but which one is not said."""
    error_after_accept: int = 0
    """Accept (and record) this many next messages, then answer with a server error of
    status `error_status` in the API's own error format (Twilio documents that a 500 to
    a send may hide a message it did send)."""
    error_status: int = 500
    """The status `error_after_accept` answers with (500, 502, 504...)."""
    clock_skew_s: float = 0.0
    """The provider's clock runs this far ahead of this machine's (negative: behind), as
    when the commander's laptop clock drifted: its Date header, the creation times of
    what it accepted and (Twitter) its rate-limit resets say so."""
    dribble_ms: float = 0.0
    """Accept (and record) each message, then send its answer a byte at a time, this long
    between bytes: every read gets a byte before a socket timeout, so only a deadline on
    the whole request ends it (a provider, or a middlebox, that hangs without going
    silent). For SMTP, the answers to the end of DATA and to QUIT, as long multi-line
    replies."""

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def now(self) -> datetime:
        """The provider's clock."""
        return datetime.now(UTC) + timedelta(seconds=self.clock_skew_s)

    def update(self, **changes: Any) -> None:
        settings = {f.name for f in fields(self)}
        with self._lock:
            for key, value in changes.items():
                if key not in settings:
                    raise ValueError(f"unknown fault setting {key!r}")
                setattr(self, key, value)

    def take_fail_next(self) -> bool:
        """True (and count one down) when the next request must fail."""
        return self._take("fail_next")

    def note_accept(self) -> None:
        """An accepted message: count `outage_after` down; at zero the outage starts."""
        with self._lock:
            if self.outage_after > 0:
                self.outage_after -= 1
                if self.outage_after == 0:
                    self.outage = True

    def take_drop(self) -> bool:
        """True (and count one down) when this accepted message must lose its answer."""
        return self._take("drop_after_accept")

    def take_error(self) -> bool:
        """True (and count one down) when this accepted message is answered with an
        error."""
        return self._take("error_after_accept")

    def take_garble(self) -> bool:
        """True (and count one down) when this accepted message's answer is garbled."""
        return self._take("garble_after_accept")

    def take_idless(self) -> bool:
        """True (and count one down) when this accepted message's answer loses its id."""
        return self._take("idless_after_accept")

    def take_busy_login(self) -> bool:
        """True (and count one down) when this login must be answered 454."""
        return self._take("busy_logins")

    def take_throttled(self) -> bool:
        """True (and count one down) when this connection must be greeted 421."""
        return self._take("throttled_connections")

    def _take(self, name: str) -> bool:
        with self._lock:
            left = getattr(self, name)
            if left > 0:
                setattr(self, name, left - 1)
                return True
            return False

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {k: v for k, v in asdict(self).items() if not k.startswith("_")}

    def reset(self) -> None:
        fresh = Faults()
        self.update(**fresh.snapshot())


class Recorder:
    """Thread-safe list of what an emulator accepted."""

    def __init__(self) -> None:
        self._items: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def add(self, item: dict[str, Any]) -> None:
        with self._lock:
            self._items.append(item)

    def all(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.all())


class RateWindow:
    """Fixed-window counter for the emulated rate limit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._start = time.time()
        self._count = 0

    def hit(self, limit: int | None, window_s: float) -> tuple[bool, int, float]:
        """Count one request. Returns (allowed, remaining, reset_epoch)."""
        with self._lock:
            now = time.time()
            if now - self._start >= window_s:
                self._start, self._count = now, 0
            reset = self._start + window_s
            if limit is None:
                self._count += 1
                return True, 10**6, reset
            if self._count >= limit:
                return False, 0, reset
            self._count += 1
            return True, limit - self._count, reset

    def reset(self) -> None:
        with self._lock:
            self._start, self._count = time.time(), 0


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # Fan-out opens many connections at once; the default backlog of 5 drops some.
    request_queue_size = 256

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that went away (killed mid-request, timed out) is not an emulator error.
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError):
            return
        super().handle_error(request, client_address)


class EmulatorHandler(BaseHTTPRequestHandler):
    """Base request handler: JSON helpers and the control API. Subclasses add routes.

    `self.emulator` is the owning `HttpEmulator`.
    """

    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle's algorithm the body then waits for
    # the client's delayed ACK of the headers (up to 40 ms a request on a kept-alive
    # connection, which made a 300-message resume take 6 s instead of 1).
    disable_nagle_algorithm = True
    emulator: ClassVar[HttpEmulator]

    def log_message(self, format: str, *args: Any) -> None:  # silence stderr logging
        return

    def date_time_string(self, timestamp: float | None = None) -> str:
        """The Date header, on the provider's clock (`clock_skew_s`)."""
        now = time.time() if timestamp is None else timestamp
        return super().date_time_string(now + self.emulator.faults.clock_skew_s)

    # -- helpers
    def read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def send_json(
        self, status: int, payload: Any, headers: dict[str, str] | None = None
    ) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def handle_control(self, method: str) -> bool:
        """Serve /_sandbox/* routes; True when the request was one of them."""
        if not self.path.startswith("/_sandbox/"):
            return False
        emu = self.emulator
        if emu.control_token is not None:
            import hmac

            given = self.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(),
                                       f"Bearer {emu.control_token}".encode()):
                self.send_json(401, {"error": "the sandbox token is required"})
                return True
        if method == "GET" and self.path == "/_sandbox/received":
            self.send_json(200, {"received": emu.received.all()})
        elif method == "GET" and self.path == "/_sandbox/faults":
            self.send_json(200, emu.faults.snapshot())
        elif method == "POST" and self.path == "/_sandbox/faults":
            try:
                emu.faults.update(**json.loads(self.read_body() or b"{}"))
            except (ValueError, TypeError) as exc:
                self.send_json(400, {"error": str(exc)})
                return True
            self.send_json(200, emu.faults.snapshot())
        elif method == "POST" and self.path == "/_sandbox/reset":
            self.read_body()
            emu.reset()
            self.send_json(200, {"ok": True})
        else:
            self.send_json(404, {"error": "unknown control route"})
        return True

    def send_accepted(self, status: int, payload: Any,
                      headers: dict[str, str] | None = None) -> None:
        """Answer an accepted message, or (fault `drop_after_accept`) drop the connection
        with no answer after recording it, or (`garble_after_accept`) answer with a page
        that is not the API's, or (`idless_after_accept`) answer without its id."""
        self.emulator.faults.note_accept()
        if self.emulator.faults.take_drop():
            import socket

            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if self.emulator.faults.dribble_ms > 0:
            self._dribble(status, payload, headers)
            return
        if self.emulator.faults.take_error():
            status = self.emulator.faults.error_status
            self.send_json(status, self.server_error(status))
            return
        if self.emulator.faults.take_idless():
            payload = _without_ids(payload)
        if self.emulator.faults.take_garble():
            body = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_json(status, payload, headers)

    def server_error(self, status: int) -> Any:
        """The body of a server error in this API's format (overridden per API)."""
        return {"error": self.responses.get(status, ("Server Error",))[0], "status": status}

    def _dribble(self, status: int, payload: Any, headers: dict[str, str] | None) -> None:
        """The answer `send_json` would give, a byte at a time (fault `dribble_ms`), until
        it is all sent or the client gives up."""
        body = json.dumps(payload).encode()
        lines = [f"HTTP/1.1 {status} {self.responses.get(status, ('',))[0]}",
                 "Content-Type: application/json; charset=utf-8",
                 f"Content-Length: {len(body)}",
                 *(f"{k}: {v}" for k, v in (headers or {}).items())]
        data = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
        self.close_connection = True
        try:
            for i in range(len(data)):
                self.connection.sendall(data[i:i + 1])
                time.sleep(self.emulator.faults.dribble_ms / 1000.0)
        except OSError:
            pass  # the client gave up

    def apply_latency(self) -> None:
        with self.emulator.lock_hits:
            self.emulator.hits[urllib.parse.urlparse(self.path).path] += 1
        delay = self.emulator.faults.latency_ms
        if self.command == "POST" and not self.path.startswith("/_sandbox/"):
            delay += self.emulator.faults.send_latency_ms
        if delay > 0:
            time.sleep(delay / 1000.0)


class HttpEmulator:
    """A threaded HTTP server on 127.0.0.1 (port 0 = any free port) in a daemon thread."""

    handler_class: ClassVar[type[EmulatorHandler]]

    def __init__(self, port: int = 0, host: str = "127.0.0.1") -> None:
        self.faults = Faults()
        self.received = Recorder()
        self.rate = RateWindow()
        self.control_token: str | None = None
        """When set, /_sandbox/* requests need ``Authorization: Bearer <token>``."""
        self.hits: Counter[str] = Counter()
        """Requests per path that reached the provider logic (control routes excluded)."""
        self.lock_hits = threading.Lock()
        handler = type(
            f"{self.handler_class.__name__}Bound", (self.handler_class,), {"emulator": self}
        )
        self._server = _QuietServer((host, port), handler)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> HttpEmulator:
        self._thread = threading.Thread(
            # A short poll: stopping waits for it (0.5 s by default, paid by every test).
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
            name=type(self).__name__, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def reset(self) -> None:
        self.received.clear()
        self.faults.reset()
        self.rate.reset()
        with self.lock_hits:
            self.hits.clear()

    def __enter__(self) -> HttpEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _without_ids(payload: Any) -> Any:
    """An accepted message's answer with the id of what was made null
    (`idless_after_accept`): Twilio's resource, or Twitter's `data`."""
    ids = ("sid", "id", "dm_event_id")
    if not isinstance(payload, dict):
        return payload
    emptied: dict[str, Any] = {k: None if k in ids else v for k, v in payload.items()}
    data = emptied.get("data")
    if isinstance(data, dict):
        emptied["data"] = {k: None if k in ids else v for k, v in data.items()}
    return emptied
