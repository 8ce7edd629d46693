"""SMTP emulator on aiosmtpd: AUTH (PLAIN, LOGIN), optional STARTTLS or implicit TLS with a
self-signed certificate made at start, a record of every message, and fault injection
(outage -> 421, transient 451, bad recipients -> 550, rate limit -> 452, latency, and
``drop_after_accept``: the message is recorded, then the connection drops before "250").
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import ssl
import subprocess
import tempfile
import threading
import warnings
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.header import decode_header, make_header
from pathlib import Path
from typing import Any, Literal

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from incident_notify.sandbox.common import Faults, RateWindow, Recorder

TlsMode = Literal["none", "starttls", "implicit"]
# AUTH without TLS is deliberate on the loopback sandbox; keep aiosmtpd quiet about it.
logging.getLogger("mail.log").setLevel(logging.CRITICAL)
warnings.filterwarnings("ignore", module="aiosmtpd")
warnings.filterwarnings("ignore", message="Requiring AUTH while not requiring TLS")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_self_signed(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 / localhost, made with openssl."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True)
    return cert, key


class _Handler:
    def __init__(self, emu: SmtpEmulator) -> None:
        self.emu = emu

    async def _delay(self) -> None:
        if self.emu.faults.latency_ms:
            await asyncio.sleep(self.emu.faults.latency_ms / 1000)

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        await self._delay()
        if self.emu.faults.outage:
            return ["421 4.3.2 Service not available, closing transmission channel"]
        session.host_name = hostname
        return responses

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        await self._delay()
        faults = self.emu.faults
        if faults.outage:
            return "421 4.3.2 Service not available, closing transmission channel"
        allowed, _, _ = self.emu.rate.hit(faults.rate_limit, faults.rate_window_s)
        if not allowed:
            return "452 4.5.3 Too many messages, slow down"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if address.lower() in {b.lower() for b in self.emu.faults.bad_recipients}:
            return "550 5.1.1 Mailbox unavailable"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.emu.faults.take_fail_next():
            return "451 4.3.0 Temporary failure, try again later"
        raw = envelope.original_content or b""
        # compat32 parsing plus decoding of the few headers kept: the same values as the
        # modern policy at a fourteenth of its cost (it was most of a sandbox fan-out's CPU).
        msg = message_from_bytes(raw, policy=policy.compat32)

        def header(name: str) -> str:
            value = msg.get(name)
            if value is None:
                return ""
            unfolded = re.sub(r"\r?\n(?=[ \t])", "", str(value))
            return str(make_header(decode_header(unfolded)))

        self.emu.received.add({
            "kind": "email", "mail_from": envelope.mail_from, "rcpt_tos": list(envelope.rcpt_tos),
            "raw": raw.decode("utf-8", "replace"), "subject": header("Subject"),
            "from": header("From"), "to": header("To"),
            "message_id": header("Message-ID"),
            "in_reply_to": header("In-Reply-To") or None,
            "references": header("References") or None,
            "date": header("Date"),
            "is_multipart": msg.is_multipart(),
            "parts": [p.get_content_type() for p in msg.walk()],
            "ts": datetime.now(UTC).isoformat(),
        })
        self.emu.faults.note_accept()
        transport: Any = server.transport
        if self.emu.faults.take_drop() and transport is not None:
            # Accepted, then the connection drops before the client hears "250".
            transport.abort()
        return "250 2.0.0 Message accepted for delivery"


class SmtpEmulator:
    """An SMTP server on 127.0.0.1 in a background thread, like the HTTP emulators."""

    def __init__(self, port: int = 0, *, username: str = "sandbox",
                 password: str = "sandbox-password", tls: TlsMode = "none",
                 require_auth: bool = True) -> None:
        self.host = "127.0.0.1"
        self.port = port or _free_port()
        self.username = username
        self.password = password
        self.tls = tls
        self.require_auth = require_auth
        self.faults = Faults()
        self.received = Recorder()
        self.rate = RateWindow()
        self.connections = 0
        self._lock = threading.Lock()
        self._dir = Path(tempfile.mkdtemp(prefix="incident-notify-smtp-"))
        self.cafile: str | None = None
        tls_context = ssl_context = None
        if tls != "none":
            cert, key = make_self_signed(self._dir)
            self.cafile = str(cert)
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(cert), str(key))
            if tls == "starttls":
                tls_context = context
            else:
                ssl_context = context
        emulator = self

        class _CountingSMTP(SMTP):
            def connection_made(self, transport: Any) -> None:
                with emulator._lock:
                    emulator.connections += 1
                super().connection_made(transport)

        def authenticator(server: SMTP, session: Session, envelope: Envelope,
                          mechanism: str, auth_data: Any) -> AuthResult:
            ok = (isinstance(auth_data, LoginPassword)
                  and auth_data.login.decode() == emulator.username
                  and auth_data.password.decode() == emulator.password)
            return AuthResult(success=ok, handled=False)

        smtp_kwargs: dict[str, Any] = dict(
            authenticator=authenticator, auth_required=require_auth,
            auth_require_tls=False, tls_context=tls_context, require_starttls=False)

        class _Controller(Controller):
            def factory(self) -> SMTP:
                return _CountingSMTP(self.handler, **smtp_kwargs)

        self._controller = _Controller(_Handler(self), hostname=self.host, port=self.port,
                                       ssl_context=ssl_context, server_hostname="localhost")

    def start(self) -> SmtpEmulator:
        self._controller.start()
        return self

    def stop(self) -> None:
        try:
            self._controller.stop()
        except (AssertionError, RuntimeError):
            pass

    def reset(self) -> None:
        self.received.clear()
        self.faults.reset()
        self.rate.reset()
        self.connections = 0

    @property
    def url(self) -> str:
        scheme = "smtps" if self.tls == "implicit" else "smtp"
        return f"{scheme}://{self.host}:{self.port}"

    def __enter__(self) -> SmtpEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
