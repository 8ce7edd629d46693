"""Email through SMTP with the standard library's smtplib.

The server is the operator's configuration, never the playbook's: ``smtp_url`` in the
config file (or the channel's account), or ``INCIDENT_NOTIFY_SMTP_URL``:
``smtp+starttls://host:587`` (STARTTLS), ``smtps://host:465`` (implicit TLS), or
``smtp://host:port`` (plain, towards this machine only: the sandbox). A private CA comes
from ``smtp_cafile`` / ``INCIDENT_NOTIFY_SMTP_CAFILE``. AUTH from ``SMTP_USERNAME`` /
``SMTP_PASSWORD`` when set. Messages are multipart (text and
HTML), carry a Message-ID derived from the delivery's idempotency key (a resend after a
crash has the same Message-ID, so mail systems can drop the duplicate), and thread the
incident's updates with In-Reply-To / References. Connections are pooled and reused.

Long on purpose: the endpoint, the connection pool, the message (its body flattened once
per text) and the SMTP transaction with the attempt record before DATA are one channel;
split, the point where a message may have been delivered would span files.
"""

from __future__ import annotations

import hashlib
import os
import queue
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Mapping
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, getaddresses
from functools import lru_cache
from typing import TYPE_CHECKING, Any, ClassVar

from incident_notify.channels._deadline import (
    Deadline,
    addresses,
    current,
    first_to_open,
    watch,
)
from incident_notify.channels.base import (
    Attempt,
    Channel,
    ChannelLimits,
    ChannelOptions,
    ChannelSpec,
    Delivery,
    Health,
    PermanentChannelError,
    Receipt,
    TransientChannelError,
    is_loopback,
)
from incident_notify.errors import ConfigError

if TYPE_CHECKING:
    import smtplib
    import ssl

DEFAULT_PORTS = {"starttls": 587, "implicit": 465, "none": 25}
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_ADDRESS = re.compile(rf"{_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\Z")
"""An ASCII address the email policy writes back exactly as given (no quoting, no
encoding): a dot-atom local part at a plain domain."""


class EmailOptions(ChannelOptions):
    reply_to: str | None = None
    list_unsubscribe: str | None = None
    timeout_s: float = 20.0


class EmailChannel(Channel):
    type_name: ClassVar[str] = "email"
    address = "email"
    threading = "references"
    Options = EmailOptions
    default_limits = ChannelLimits(length_rule="email", max_length=None, rate_per_second=10.0,
                                   burst=20, concurrency=4)
    secret_names = ("SMTP_USERNAME", "SMTP_PASSWORD")
    api_base_env = "INCIDENT_NOTIFY_SMTP_URL"
    options: EmailOptions

    def __init__(self, spec: ChannelSpec, secrets: Mapping[str, str]) -> None:
        super().__init__(spec, secrets)
        self.host, self.port, self.tls = self._endpoint()
        self.cafile = self.secrets.get("INCIDENT_NOTIFY_SMTP_CAFILE") or None
        if self.tls == "none" and not is_loopback(self.host):
            raise ConfigError(
                f"channel {spec.name!r}: tls: none is only allowed towards this machine "
                f"(the sandbox), not {self.host}",
                hint="use tls: starttls or implicit; credentials never travel in clear")
        addresses = getaddresses([spec.sender])
        if not spec.sender or not addresses or "@" not in addresses[0][1]:
            raise ConfigError(f"channel {spec.name!r} (email) needs a sender address, e.g. "
                              "\"Acme Status <status@acme.example>\"")
        self.from_name, self.from_addr = addresses[0]
        self.domain = self.from_addr.rsplit("@", 1)[1]
        self._pool: queue.LifoQueue[smtplib.SMTP] = queue.LifoQueue()
        self._lock = threading.Lock()
        self._slowed, self._slow_until = 0, 0.0
        """Pauses asked for since the last message the server took, and when the last ends
        (each pause that does not say how long doubles, so a refusal that never lifts
        fails over)."""
        self._bodies: dict[tuple[str, str | None], bytes] = {}
        """The MIME body (its content headers and parts) of each message text, flattened
        once: every recipient of an update gets the same body under their own headers."""
        self._shared_headers: dict[tuple[object, ...], tuple[bytes, bytes, bytes]] = {}

    def _endpoint(self) -> tuple[str, int, str]:
        url = self.secrets.get("INCIDENT_NOTIFY_SMTP_URL") or \
            os.environ.get("INCIDENT_NOTIFY_SMTP_URL")
        if not url:
            raise ConfigError(
                f"channel {self.name!r} (email): no SMTP server is configured",
                hint="set smtp_url = \"smtp+starttls://mail.example.com:587\" in the config "
                "file (or under the channel's [accounts.NAME]), or INCIDENT_NOTIFY_SMTP_URL; "
                "for a rehearsal use --sandbox")
        parsed = urllib.parse.urlparse(url)
        tls = {"smtps": "implicit", "smtp+starttls": "starttls", "smtp": "none"}.get(
            parsed.scheme)
        if parsed.scheme == "smtp" and parsed.query == "starttls":
            tls = "starttls"
        if tls is None or not parsed.hostname:
            raise ConfigError(f"channel {self.name!r}: SMTP endpoint {url!r} is not "
                              "smtp+starttls://, smtps:// or smtp:// with a host")
        try:
            port = parsed.port or DEFAULT_PORTS[tls]
        except ValueError:
            raise ConfigError(f"channel {self.name!r}: SMTP endpoint {url!r} has an "
                              "invalid port") from None
        return parsed.hostname, port, tls

    def endpoint(self) -> str:
        scheme = {"implicit": "smtps", "starttls": "smtp+starttls", "none": "smtp"}[self.tls]
        return f"{scheme}://{self.host}:{self.port}"

    # ------------------------------------------------------------------ connections
    def _context(self) -> ssl.SSLContext:
        import ssl

        context = ssl.create_default_context(cafile=self.cafile)
        return context

    def _connect(self) -> smtplib.SMTP:
        import smtplib

        timeout = self.options.timeout_s
        conn: smtplib.SMTP | None = None
        try:
            if self.tls == "implicit":
                conn = _smtp_class(True)(timeout=timeout, context=self._context())
            else:
                conn = _smtp_class(False)(timeout=timeout)
            # Connected after it is watched: a server may dribble its greeting too.
            # (smtplib.SMTP(host) sets _host itself; TLS checks the certificate on it.)
            conn._host = self.host  # type: ignore[union-attr]
            watch(conn)
            code, greeting = conn.connect(self.host, self.port)
            if code != 220:  # (as smtplib.SMTP(host) itself refuses it)
                conn.close()
                raise smtplib.SMTPConnectError(code, greeting)
            _hello(conn)
            if self.tls == "starttls":
                conn.starttls(context=self._context())
                _hello(conn)
            user = self.secrets.get("SMTP_USERNAME")
            password = self.secrets.get("SMTP_PASSWORD")
            if user and password:
                conn.login(user, password)
            return conn
        except Exception as exc:
            if conn is not None:  # (a login refused: its socket is not kept open)
                _drop(conn)
            raise self._map(exc, sent_data=False) from None

    def _take(self) -> smtplib.SMTP:
        """A pooled connection, or a new one, under the current deadline."""
        try:
            conn = self._pool.get_nowait()
        except queue.Empty:
            return self._connect()
        watch(conn)
        return conn

    def _give(self, conn: smtplib.SMTP) -> None:
        self._pool.put(conn)

    def close(self) -> None:
        while True:
            try:
                conn = self._pool.get_nowait()
            except queue.Empty:
                return
            self._close_politely(conn)

    def _close_politely(self, conn: smtplib.SMTP) -> None:
        """QUIT, then close; a server slow to answer QUIT does not hold the caller up."""
        try:
            with Deadline(self.options.timeout_s):
                watch(conn)
                conn.quit()
        except Exception:
            conn.close()

    # ------------------------------------------------------------------ messages
    def message_id(self, key: str) -> str:
        return f"<{hashlib.sha256(key.encode()).hexdigest()[:32]}.incident-notify@{self.domain}>"

    def _headers(self, delivery: Delivery) -> list[tuple[str, object]]:
        """The message's headers, in order (None: the header is left out)."""
        m = delivery.message
        refs = list(delivery.thread_refs)
        if delivery.reply_to and delivery.reply_to not in refs:
            refs.append(delivery.reply_to)
        headers: list[tuple[str, object]] = [
            ("From", Address(self.from_name, addr_spec=self.from_addr) if self.from_name
             else self.from_addr),
            ("To", delivery.recipient),
            ("Subject", (m.subject or "").replace("\r", " ").replace("\n", " ")),
            ("Date", format_datetime(time_now())),
            ("Message-ID", self.message_id(delivery.key)),
            ("In-Reply-To", delivery.reply_to or None),
            ("References", " ".join(refs) or None),
            ("Auto-Submitted", "auto-generated"),
            ("X-Incident-Id", delivery.incident_id),
            ("Reply-To", self.options.reply_to or None),
            ("List-Unsubscribe", f"<{self.options.list_unsubscribe}>"
             if self.options.list_unsubscribe else None),
        ]
        return [(name, value) for name, value in headers if value is not None]

    def build(self, delivery: Delivery, *, body: bool = True) -> EmailMessage:
        """The whole message; with `body=False` only the recipient's headers (`send` joins
        them to the body flattened once per message text)."""
        m = delivery.message
        msg = EmailMessage()
        for name, value in self._headers(delivery):
            msg[name] = value
        if body:
            msg.set_content(m.text)
            if m.html:
                msg.add_alternative(m.html, subtype="html")
        return msg

    def _body(self, text: str, html: str | None) -> bytes:
        """Content headers, blank line and parts of a message text, as SMTP sends them."""
        key = (text, html)
        with self._lock:
            found = self._bodies.get(key)
        if found is not None:
            return found
        part = EmailMessage()
        part.set_content(text)
        if html:
            part.add_alternative(html, subtype="html")
        flat, _ = _flatten(part, self.from_addr, self.from_addr)
        with self._lock:
            if len(self._bodies) > 64:  # an update has a handful of texts
                self._bodies.clear()
            self._bodies[key] = flat
        return flat

    def flatten(self, delivery: Delivery) -> tuple[bytes, list[str]]:
        """The message for one recipient as SMTP sends it: their headers, then the body
        shared by every recipient of the same text (identical to flattening the whole
        message, at a fraction of the cost)."""
        fast = self._recipient_headers(delivery)
        if fast is not None:
            headers, options = fast
        else:
            headers, options = _flatten(self.build(delivery, body=False), self.from_addr,
                                        delivery.recipient)
        if not headers.endswith(b"\r\n\r\n"):  # never seen; the whole message then
            return _flatten(self.build(delivery), self.from_addr, delivery.recipient)
        return headers[:-2] + self._body(delivery.message.text, delivery.message.html), \
            options

    def _recipient_headers(self, delivery: Delivery) -> tuple[bytes, list[str]] | None:
        """The header block `build` makes, without building a message per recipient: the
        headers every recipient of an update shares are folded once (each header folds on
        its own, so folding them apart gives the same lines), and the three that differ
        (To, Date, Message-ID) are written directly when they are plain ASCII short enough
        never to fold. None sends the recipient through `build` instead."""
        recipient = delivery.recipient
        message_id = self.message_id(delivery.key)
        to_line = f"To: {recipient}\r\n"
        id_line = f"Message-ID: {message_id}\r\n"
        if len(to_line) > 80 or len(id_line) > 80 or not _PLAIN_ADDRESS.match(recipient) \
                or not _PLAIN_ADDRESS.match(message_id[1:-1]):
            return None
        message = delivery.message
        key = (message.subject, delivery.reply_to, delivery.thread_refs, delivery.incident_id)
        with self._lock:
            shared = self._shared_headers.get(key)
        if shared is None:
            shared = self._fold_shared(delivery)
            with self._lock:
                if len(self._shared_headers) > 64:
                    self._shared_headers.clear()
                self._shared_headers[key] = shared
        head, subject, tail = shared
        date_line = f"Date: {format_datetime(time_now())}\r\n"
        options = _smtp_options(self.from_addr, recipient)
        return (b"".join((head, to_line.encode(), subject, date_line.encode(),
                          id_line.encode(), tail, b"\r\n")), options)

    def _fold_shared(self, delivery: Delivery) -> tuple[bytes, bytes, bytes]:
        """From; Subject; and the headers after Message-ID: each folded as `build` folds
        them, in its order."""
        headers = self._headers(delivery)
        names = [name for name, _ in headers]
        tail = names[names.index("Message-ID") + 1:]
        pieces = []
        for group in (("From",), ("Subject",), tail):
            msg = EmailMessage()
            for name, value in headers:
                if name in group:
                    msg[name] = value
            flat, _ = _flatten(msg, self.from_addr, self.from_addr)
            pieces.append(flat[:-2])  # without the blank line that ends a header block
        return pieces[0], pieces[1], pieces[2]

    def send(self, delivery: Delivery, attempt: Attempt) -> Receipt:
        """One SMTP transaction: MAIL and RCPT first (refusals there are definite answers,
        and a pooled connection the server closed while idle is replaced freely), then the
        attempt record, then DATA. A connection lost or timed out during DATA may have
        delivered the message: it is reported unknown, never sent again here."""
        flat, mail_options = self.flatten(delivery)
        with Deadline(self.request_deadline_s()):
            return self._transaction(delivery, attempt, flat, mail_options)

    def _transaction(self, delivery: Delivery, attempt: Attempt, flat: bytes,
                     mail_options: list[str]) -> Receipt:
        import smtplib

        for fresh in (False, True):
            conn = self._connect() if fresh else self._take()
            try:
                self._envelope(conn, delivery.recipient, len(flat), mail_options)
            except smtplib.SMTPServerDisconnected as exc:
                _drop(conn)
                if not fresh:
                    continue  # a stale pooled connection: nothing was sent on it
                raise self._map(exc, sent_data=False) from None
            except smtplib.SMTPResponseException as exc:
                if exc.smtp_code == 421 and not fresh:
                    # A pooled connection the server is closing ("too many messages on
                    # this connection", an idle timeout said aloud): nothing was sent on
                    # it; a new one is no retry.
                    _drop(conn)
                    continue
                self._recycle(conn)
                raise self._map(exc, sent_data=False) from None
            except Exception as exc:
                self._recycle(conn)
                raise self._map(exc, sent_data=False) from None
            attempt.begin()
            try:
                code, reply = conn.data(flat)
            except Exception as exc:
                _drop(conn)
                raise self._map(exc, sent_data=True) from None
            if not 200 <= code < 600 or 300 <= code < 400:
                # No reply code (smtplib says -1), or one that is no answer to the data:
                # whether the server took the message cannot be read.
                _drop(conn)
                raise TransientChannelError(
                    f"{self.name}: the SMTP server's reply to the message cannot be read "
                    f"({reply.decode('utf-8', 'replace')[:80]!r})", channel=self.name,
                    code="unreadable",
                    maybe_delivered=True)
            if code >= 500:
                # This message to this mailbox was refused (a filter, a full mailbox): the
                # person's next channel is tried.
                self._recycle(conn)
                raise PermanentChannelError(
                    f"{self.name}: the SMTP server refused the message ({code} "
                    f"{reply.decode('utf-8', 'replace')})", channel=self.name,
                    code=str(code), recipient_problem=True)
            if code >= 400:
                self._recycle(conn)
                raise self._map(smtplib.SMTPDataError(code, reply), sent_data=False) from None
            self._give(conn)
            self._slowed = 0  # (the server takes messages again)
            return Receipt(provider_id=self.message_id(delivery.key))
        raise TransientChannelError(f"{self.name}: SMTP connection lost", channel=self.name,
                                    code="connection")

    def _envelope(self, conn: smtplib.SMTP, recipient: str, size: int,
                  options: list[str]) -> None:
        import smtplib

        conn.ehlo_or_helo_if_needed()
        mail_options = list(options)
        if conn.does_esmtp and conn.has_extn("size"):
            mail_options.append(f"SIZE={size}")
        code, reply = conn.mail(self.from_addr, mail_options)
        if code != 250:
            raise smtplib.SMTPSenderRefused(code, reply, self.from_addr)
        code, reply = conn.rcpt(recipient)
        if code not in (250, 251):
            raise smtplib.SMTPRecipientsRefused({recipient: (code, reply)})

    def _recycle(self, conn: smtplib.SMTP) -> None:
        """After a refused transaction the connection is still good once reset; one the
        server would not reset (RSET unknown to it) is not reused mid-transaction."""
        try:
            code, _ = conn.rset()
        except Exception:
            code = 0
        if code == 250:
            self._give(conn)
        else:
            _drop(conn)

    def check(self) -> Health:
        import smtplib

        started = time.monotonic()
        try:
            with Deadline(self.request_deadline_s()):
                conn = self._connect()
                code, _ = conn.noop()
        except (PermanentChannelError, TransientChannelError) as exc:
            if isinstance(exc, TransientChannelError) and exc.retry_after is not None:
                # The server answered and asks to come back shortly (logins at once): up,
                # as a 429 to Twilio's or X's health check is.
                return Health(ok=True, detail=f"answering, but busy ({exc.message})",
                              latency_ms=(time.monotonic() - started) * 1000)
            return Health(ok=False, detail=exc.message)
        except (OSError, smtplib.SMTPException) as exc:
            return Health(ok=False, detail=self._map(exc, sent_data=False).message)
        greeted = "EHLO" if conn.does_esmtp else "HELO"  # (QUIT forgets which)
        if code != 250 and code not in _UNKNOWN_COMMAND:  # (a server without NOOP: up)
            conn.close()
            return Health(ok=False, detail=f"{self.name}: NOOP answered {code}")
        self._close_politely(conn)
        user = self.secrets.get("SMTP_USERNAME")
        detail = f"{greeted} ok at {self.host}:{self.port}" + (", authenticated" if user else "")
        return Health(ok=True, detail=detail, latency_ms=(time.monotonic() - started) * 1000)

    def _slow_down_s(self, code: int, text: str) -> float | None:
        """Seconds to pause for a 4xx that asks to slow down (a rate limit: enhanced status
        4.7.x, or words to that effect), None for any other reply: the wait it names, else
        SLOW_DOWN_PAUSE_S doubled for each pause since the server last took a message (the
        connections that meet it during one pause count once), so a refusal that does not
        lift reaches the rate-limit ceiling and the channel fails over, within about two
        minutes."""
        if not 400 <= code < 500 or not _SLOW_DOWN.search(text):
            return None
        said = _WAIT_FOR.search(text)
        if said:
            return max(1.0, float(said.group(1)))
        now = time.monotonic()
        with self._lock:
            if now < self._slow_until:  # (met by another connection in the same pause)
                return max(0.5, self._slow_until - now)
            self._slowed = min(self._slowed + 1, 16)
            pause = SLOW_DOWN_PAUSE_S * 2 ** (self._slowed - 1)
            self._slow_until = now + pause
            return pause

    def _map(self, exc: BaseException, *, sent_data: bool) -> PermanentChannelError | \
            TransientChannelError:
        return self.hide_secrets(self._classify(exc, sent_data=sent_data))

    def _classify(self, exc: BaseException, *, sent_data: bool) -> PermanentChannelError | \
            TransientChannelError:
        import smtplib
        import ssl

        name = self.name
        if isinstance(exc, PermanentChannelError | TransientChannelError):
            return exc
        due = current()
        if due is not None and due.expired:  # the transaction's deadline shut it down
            return self.deadline_passed("the SMTP server", due.seconds, sent_data)
        if isinstance(exc, smtplib.SMTPAuthenticationError) and 400 <= exc.smtp_code < 500:
            # "454 4.7.0 Too many login attempts, please try again later": the login is
            # not refused, only not now (many connections logging in at once).
            reason = _reply_text(exc.smtp_error)
            return TransientChannelError(
                f"{name}: the SMTP server cannot take the login now ({exc.smtp_code} "
                f"{reason})", channel=name, code=str(exc.smtp_code),
                retry_after=self._slow_down_s(exc.smtp_code, reason))
        if isinstance(exc, smtplib.SMTPAuthenticationError):
            return PermanentChannelError(f"{name}: the SMTP server rejected the login "
                                         f"({exc.smtp_code})", channel=name, code="auth",
                                         hint="check SMTP_USERNAME and SMTP_PASSWORD",
                                         channel_down=True)
        if isinstance(exc, smtplib.SMTPSenderRefused | smtplib.SMTPConnectError |
                      smtplib.SMTPHeloError) and not 400 <= exc.smtp_code < 500:
            # Refused before any recipient was named (the greeting, EHLO, or MAIL FROM: a
            # relay that will not take this sender from this login): nobody can be sent
            # to, so the channel is down and its deliveries fail over.
            reason = _reply_text(exc.smtp_error)
            return PermanentChannelError(
                f"{name}: the SMTP server refused to send ({exc.smtp_code} {reason})",
                channel=name, code=str(exc.smtp_code), channel_down=True,
                hint=f"check that the login may send as {self.from_addr} (and the server, "
                "port and TLS mode of INCIDENT_NOTIFY_SMTP_URL)")
        if isinstance(exc, smtplib.SMTPNotSupportedError) and "SMTPUTF8" in str(exc):
            return PermanentChannelError(
                f"{name}: the SMTP server cannot take a non-ASCII address (no SMTPUTF8)",
                channel=name, code="smtputf8", recipient_problem=True)
        if isinstance(exc, smtplib.SMTPNotSupportedError):  # (no AUTH offered)
            return PermanentChannelError(
                f"{name}: the SMTP server does not offer what sending needs ({exc})",
                channel=name, code="unsupported", channel_down=True,
                hint="check the server, port and TLS mode of INCIDENT_NOTIFY_SMTP_URL")
        if isinstance(exc, smtplib.SMTPRecipientsRefused):
            code, text = next(iter(exc.recipients.values()), (550, b""))
            reason = _reply_text(text)
            if 400 <= code < 500:  # (greylisting, a mailbox receiving too fast)
                return TransientChannelError(f"{name}: recipient deferred ({code} {reason})",
                                             channel=name, code=str(code),
                                             recipient_problem=True)
            return PermanentChannelError(f"{name}: recipient refused ({code} {reason})",
                                         channel=name, code=str(code), recipient_problem=True)
        if isinstance(exc, smtplib.SMTPResponseException):
            reason = _reply_text(exc.smtp_error)
            pause = self._slow_down_s(exc.smtp_code, reason) if isinstance(
                exc, smtplib.SMTPSenderRefused | smtplib.SMTPConnectError) else None
            if pause is not None:
                # The server takes no more from this sender for now (MAIL refused 4xx: "too
                # many messages, slow down"; a greeting "421 4.7.0 Try again later"): a
                # rate limit, as a 429 is. The channel pauses and the message waits; it is
                # no failure, and nothing fails over unless the wait is longer than a rate
                # limit may be.
                return TransientChannelError(
                    f"{name}: the SMTP server asks to slow down ({exc.smtp_code} {reason})",
                    channel=name, code=str(exc.smtp_code), retry_after=pause)
            if 400 <= exc.smtp_code < 500:
                # A mailbox's own state (4.2.x: full, receiving too fast) is one recipient's
                # problem, as a deferral at RCPT is.
                return TransientChannelError(f"{name}: SMTP {exc.smtp_code} {reason}",
                                             channel=name, code=str(exc.smtp_code),
                                             recipient_problem=bool(_MAILBOX.search(reason)))
            return PermanentChannelError(f"{name}: SMTP {exc.smtp_code} {reason}",
                                         channel=name, code=str(exc.smtp_code))
        if isinstance(exc, ssl.SSLError):
            return PermanentChannelError(f"{name}: TLS failed ({exc.reason})", channel=name,
                                         code="tls", hint="set smtp_cafile in the config (or "
                                         "INCIDENT_NOTIFY_SMTP_CAFILE) if the server uses a "
                                         "private certificate authority",
                                         channel_down=True)
        if isinstance(exc, socket.timeout | TimeoutError):
            return TransientChannelError(f"{name}: the SMTP server did not answer in time",
                                         channel=name, code="timeout",
                                         maybe_delivered=sent_data)
        if sent_data:
            return TransientChannelError(f"{name}: the SMTP connection dropped before the "
                                         "server confirmed the message", channel=name,
                                         code="dropped", maybe_delivered=True)
        if isinstance(exc, OSError | smtplib.SMTPException):
            return TransientChannelError(f"{name}: cannot reach the SMTP server "
                                         f"{self.host}:{self.port} ({type(exc).__name__})",
                                         channel=name, code="connection")
        return TransientChannelError(f"{name}: {type(exc).__name__} talking SMTP",
                                     channel=name, code="error")


def _reply_text(reply: bytes | str) -> str:
    """A server's reply as text (smtplib keeps it as the bytes read)."""
    return reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)


_SLOW_DOWN = re.compile(r"\b4\.7\.\d{1,3}\b|\brate\b|rate.limit|too many|slow down|throttl",
                        re.IGNORECASE)
"""A 4xx asking the sender to slow down. ("Try again later" alone is not enough: a server
in trouble says it too, and must fail over as one.)"""
_WAIT_FOR = re.compile(r"(\d{1,6})\s*(?:s\b|secs?\b|seconds?\b)", re.IGNORECASE)
_MAILBOX = re.compile(r"\b4\.2\.\d{1,3}\b|mailbox (?:is )?full|over quota|quota exceeded",
                     re.IGNORECASE)
"""A temporary refusal about one mailbox (RFC 3463's X.2.X, "mailbox status")."""
SLOW_DOWN_PAUSE_S = 2.0
"""How long the channel pauses when a server asks to slow down and says not how long."""
_UNKNOWN_COMMAND = (500, 502)
"""Replies of a server that does not know a command (an old or minimal one: EHLO, NOOP)."""


@lru_cache(maxsize=2)
def _smtp_class(implicit_tls: bool) -> Any:
    """smtplib's SMTP (or SMTP_SSL) whose connection must open within CONNECT_TIMEOUT_S
    (with the TLS handshake, for implicit TLS); the greeting and everything after wait
    the channel's `timeout_s`."""
    import smtplib

    from incident_notify.channels._http import CONNECT_TIMEOUT_S

    base = smtplib.SMTP_SSL if implicit_tls else smtplib.SMTP

    class Connecting(base):  # type: ignore[valid-type,misc]
        def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
            opening = min(timeout, CONNECT_TIMEOUT_S)
            parent = super()._get_socket
            try:  # (the name lookup bounded too)
                found = addresses(host, port, opening)
            except TimeoutError:  # (not "did not answer": nothing was asked yet)
                raise ConnectionError(f"no connection to {host} within {opening:.0f}s "
                                      "(name lookup)") from None
            # (TLS checks the name, `_host`, not the address.)
            try:
                sock: socket.socket = first_to_open(
                    found, lambda address: parent(address, port, opening), (OSError,))
            except TimeoutError:  # (nothing was asked: not "no answer")
                raise ConnectionError(f"no connection to {host} within {opening:.0f}s") \
                    from None
            sock.settimeout(timeout)
            return sock

    return Connecting


def _hello(conn: smtplib.SMTP) -> None:
    """EHLO; HELO where the server does not know EHLO (RFC 5321 4.1.4: an old or minimal
    server answers it 500 or 502), as smtplib itself falls back. A refusal is raised as
    smtplib refuses a HELO it cannot use (a 421 while the server shuts down is then a
    transient refusal, not a server without AUTH)."""
    import smtplib

    code, reply = conn.ehlo()
    if code in _UNKNOWN_COMMAND:
        code, reply = conn.helo()
    if code != 250:
        conn.close()
        raise smtplib.SMTPHeloError(code, reply)


def _smtp_options(sender: str, recipient: str) -> list[str]:
    """MAIL options as smtplib.send_message chooses them: UTF-8 addresses need SMTPUTF8."""
    return [] if (sender + recipient).isascii() else ["SMTPUTF8", "BODY=8BITMIME"]


def _flatten(msg: EmailMessage, sender: str, recipient: str) -> tuple[bytes, list[str]]:
    """The message as SMTP sends it (as smtplib.send_message flattens it)."""
    from email.generator import BytesGenerator
    from io import BytesIO

    options = _smtp_options(sender, recipient)
    policy = msg.policy.clone(utf8=True) if options else msg.policy  # type: ignore[call-arg]
    with BytesIO() as out:
        BytesGenerator(out, policy=policy).flatten(msg, linesep="\r\n")
        return out.getvalue(), options


def _drop(conn: smtplib.SMTP) -> None:
    try:
        conn.close()
    except Exception:
        pass


def time_now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)
