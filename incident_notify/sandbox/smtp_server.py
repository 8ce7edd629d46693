"""SMTP emulator: a small threaded server (one thread per connection, blocking reads) with
AUTH (PLAIN, LOGIN), optional STARTTLS or implicit TLS with a self-signed certificate made
at start, a record of every message, and fault injection (outage -> 421, transient 451, bad
recipients -> 550, rate limit -> 452, latency, ``send_latency_ms``: the message is recorded,
then the answer waits, ``drop_after_accept``: it is recorded, then the connection drops
before "250", ``garble_after_accept``: it is recorded, then the reply has no reply code,
and ``dribble_ms``: it is recorded, then a long multi-line "250" comes a byte at a time,
and so does the answer to QUIT).

It speaks the part of RFC 5321 a submission client uses (EHLO/HELO, STARTTLS, AUTH, MAIL,
RCPT, DATA with dot-stuffing, RSET, NOOP, QUIT). It replaced an asyncio server whose event
loop cost a quarter of a sandbox fan-out's CPU; the clients are the real smtplib either way.
"""

from __future__ import annotations

import base64
import binascii
import re
import shutil
import socket
import socketserver
import ssl
import subprocess
import tempfile
import threading
import time
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.header import decode_header, make_header
from pathlib import Path
from typing import Literal

from incident_notify.sandbox.common import Faults, RateWindow, Recorder

TlsMode = Literal["none", "starttls", "implicit"]
MAX_LINE = 4096
MAX_MESSAGE = 32 * 1024 * 1024


def make_self_signed(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 / localhost, made with openssl."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True)
    return cert, key


class _Closed(Exception):
    """The client went away (or the connection is to be dropped)."""


class _Session(socketserver.BaseRequestHandler):
    """One SMTP connection, start to end, in its own thread."""

    server: _Server

    def setup(self) -> None:
        self.emu = self.server.emulator
        self.sock: socket.socket = self.request
        self.sock.settimeout(300)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.tls_active = False
        self.helo: str | None = None
        self.authenticated = False
        self.login: str | None = None
        self.accepted = 0
        self._reset()

    def _reset(self) -> None:
        self.mail_from: str | None = None
        self.rcpt_tos: list[str] = []

    # ------------------------------------------------------------------ wire
    def _send(self, *lines: str) -> None:
        self.sock.sendall("".join(f"{line}\r\n" for line in lines).encode("utf-8"))

    def _dribble(self, reply: bytes) -> None:
        """Send `reply` a byte at a time (fault `dribble_ms`)."""
        for i in range(len(reply)):
            self.sock.sendall(reply[i:i + 1])
            time.sleep(self.emu.faults.dribble_ms / 1000)

    def _readline(self) -> bytes:
        line = self.reader.readline(MAX_LINE + 2)
        if not line:
            raise _Closed
        return line

    def handle(self) -> None:
        emu = self.emu
        with emu._lock:
            emu.connections += 1
            emu._open.add(self.sock)
        try:
            if emu.tls == "implicit":
                assert emu.ssl_context is not None
                self.sock = emu.ssl_context.wrap_socket(self.sock, server_side=True)
                self.tls_active = True
            self.reader = self.sock.makefile("rb")
            if emu.faults.take_throttled():
                self._send("421 4.7.0 Try again later, closing connection")
                return
            self._send("220 localhost ESMTP incident-notify sandbox")
            while self._command(self._readline()):
                pass
        except (_Closed, OSError, ssl.SSLError):
            pass
        finally:
            with emu._lock:
                emu._open.discard(self.request)
            try:
                self.sock.close()
            except OSError:
                pass

    def _down(self) -> bool:
        """After the fault's latency: True (having said 421) when the server is out."""
        if self.emu.faults.latency_ms:
            time.sleep(self.emu.faults.latency_ms / 1000)
        if self.emu.faults.outage:
            self._send("421 4.3.2 Service not available, closing transmission channel")
            return True
        return False

    # ------------------------------------------------------------------ commands
    def _command(self, raw: bytes) -> bool:
        """Answer one command line; False ends the session."""
        if len(raw) > MAX_LINE:
            self._send("500 5.5.2 Line too long")
            return True
        line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        if _listed([verb], self.emu.faults.unknown_commands):
            self._send(f"502 5.5.1 Command not implemented: {verb[:20]}")
        elif verb in ("EHLO", "HELO"):
            if self._down():
                return False
            if not arg:
                self._send(f"501 5.5.4 Syntax: {verb} hostname")
                return True
            self.helo = arg
            self._reset()
            if verb == "HELO":
                self._send("250 localhost")
                return True
            lines = ["localhost", f"SIZE {MAX_MESSAGE}", "8BITMIME", "SMTPUTF8"]
            if self.emu.tls == "starttls" and not self.tls_active:
                lines.append("STARTTLS")
            lines += ["AUTH LOGIN PLAIN", "HELP"]
            hidden = {x.upper() for x in self.emu.faults.no_extensions}
            lines = [x for x in lines if x.split()[0].upper() not in hidden]
            self._send(*[f"250-{x}" for x in lines[:-1]], f"250 {lines[-1]}")
        elif verb == "STARTTLS":
            if self.emu.tls != "starttls" or self.tls_active:
                self._send("503 5.5.1 TLS not available or already active")
                return True
            self._send("220 2.0.0 Ready to start TLS")
            assert self.emu.ssl_context is not None
            self.sock = self.emu.ssl_context.wrap_socket(self.sock, server_side=True)
            self.reader = self.sock.makefile("rb")
            self.tls_active, self.helo, self.authenticated = True, None, False
            self._reset()
        elif verb == "AUTH":
            self._auth(arg)
        elif verb == "MAIL":
            return self._mail(arg)
        elif verb == "RCPT":
            self._rcpt(arg)
        elif verb == "DATA":
            return self._data()
        elif verb == "RSET":
            self._reset()
            self._send("250 OK")
        elif verb == "NOOP":
            self._send("250 OK")
        elif verb == "QUIT":
            if self.emu.faults.dribble_ms > 0:
                self._dribble(b"221-2.0.0 Closing\r\n" * 20 + b"221 2.0.0 Bye\r\n")
            else:
                self._send("221 Bye")
            return False
        else:
            self._send(f"502 5.5.1 Command not implemented: {verb[:20]}")
        return True

    def _b64(self, text: str) -> str | None:
        try:
            return base64.b64decode(text, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None

    def _read_b64(self) -> str | None:
        """The client's next line (an AUTH answer), base64-decoded."""
        return self._b64(self._readline().strip().decode("ascii", "replace"))

    def _auth(self, arg: str) -> None:
        if self.helo is None:
            self._send("503 5.5.1 Send EHLO first")
            return
        if self.authenticated:
            self._send("503 5.5.1 Already authenticated")
            return
        if self.emu.faults.take_busy_login():
            self._send("454 4.7.0 Too many login attempts, please try again later")
            return
        mechanism, _, initial = arg.partition(" ")
        mechanism = mechanism.upper()
        if mechanism == "PLAIN":
            if not initial:
                self._send("334 ")
                decoded = self._read_b64()
            else:
                decoded = self._b64(initial)
            parts = decoded.split("\0") if decoded is not None else []
            login, password = (parts[1], parts[2]) if len(parts) == 3 else (None, None)
        elif mechanism == "LOGIN":
            if initial:
                login = self._b64(initial)
            else:
                self._send("334 VXNlcm5hbWU6")
                login = self._read_b64()
            self._send("334 UGFzc3dvcmQ6")
            password = self._read_b64()
        else:
            self._send("504 5.5.4 Unrecognized authentication type")
            return
        if login == self.emu.username and password == self.emu.password:
            self.authenticated = True
            self.login = login
            self._send("235 2.7.0 Authentication successful")
        else:
            self._send("535 5.7.8 Authentication credentials invalid")

    def _address(self, arg: str, keyword: str) -> tuple[str, str] | None:
        match = re.match(rf"{keyword}:\s*<([^>]*)>\s*(.*)$", arg, re.IGNORECASE)
        return (match.group(1), match.group(2)) if match else None

    def _mail(self, arg: str) -> bool:
        """MAIL FROM; False after a 421, which closes the connection."""
        if self._down():
            return False
        faults = self.emu.faults
        if faults.messages_per_connection and self.accepted >= faults.messages_per_connection:
            # (As Exchange or Postfix's per-connection limits answer, then hang up.)
            self._send("421 4.7.0 Too many messages on this connection, closing")
            return False
        if self.helo is None:
            self._send("503 5.5.1 Send EHLO first")
        elif self.emu.require_auth and not self.authenticated:
            self._send("530 5.7.0 Authentication required")
        elif self.mail_from is not None:
            self._send("503 5.5.1 Nested MAIL command")
        elif (parsed := self._address(arg, "FROM")) is None:
            self._send("501 5.5.4 Syntax: MAIL FROM:<address>")
        elif not (limited := self.emu.rate.hit(faults.rate_limit, faults.rate_window_s))[0]:
            # (Postfix's anvil and Exchange word it so; some say when, some do not.)
            wait = max(1, round(limited[2] - time.time()))
            self._send(f"452 4.5.3 Too many messages, slow down; try again in {wait} seconds"
                       if wait > 5 else "452 4.5.3 Too many messages, slow down")
        elif _listed([parsed[0]], faults.bad_senders):
            # (As Postfix words it: the reply names the login.)
            self._send(f"553 5.7.1 <{parsed[0]}>: Sender address rejected: not owned by "
                       f"user {self.login or 'anonymous'}")
        else:
            self.mail_from = parsed[0]
            self._send("250 OK")
        return True

    def _rcpt(self, arg: str) -> None:
        if self.mail_from is None:
            self._send("503 5.5.1 Need MAIL before RCPT")
            return
        parsed = self._address(arg, "TO")
        if parsed is None or not parsed[0]:
            self._send("501 5.5.4 Syntax: RCPT TO:<address>")
            return
        address = parsed[0]
        if _listed([address], self.emu.faults.bad_recipients):
            self._send("550 5.1.1 Mailbox unavailable")
            return
        if _listed([address], self.emu.faults.deferred_recipients):
            # (As a greylisting server answers a sender it has not seen yet.)
            self._send(f"450 4.7.1 <{address}>: Recipient address rejected: Greylisted, "
                       "try again in 300 seconds")
            return
        self.rcpt_tos.append(address)
        self._send("250 OK")

    def _data(self) -> bool:
        if not self.rcpt_tos or self.mail_from is None:
            self._send("503 5.5.1 Need RCPT before DATA")
            return True
        self._send("354 End data with <CR><LF>.<CR><LF>")
        lines: list[bytes] = []
        size = 0
        too_big = False
        while True:
            line = self.reader.readline(MAX_MESSAGE)
            if not line:
                raise _Closed
            if line in (b".\r\n", b".\n"):
                break
            if line.startswith(b"."):
                line = line[1:]
            size += len(line)
            if size > MAX_MESSAGE:
                too_big = True
                lines.clear()
            elif not too_big:
                lines.append(line)
        mail_from, rcpt_tos = self.mail_from, list(self.rcpt_tos)
        self._reset()
        if too_big:
            self._send("552 5.3.4 Message too big")
            return True
        if self.emu.faults.take_fail_next():
            self._send("451 4.3.0 Temporary failure, try again later")
            return True
        if _listed(rcpt_tos, self.emu.faults.full_mailboxes):
            self._send("452 4.2.2 Mailbox full, try again later")
            return True
        if _listed(rcpt_tos, self.emu.faults.failed_recipients):
            self._send("554 5.7.1 Message rejected by the recipient's mail filter")
            return True
        raw = b"".join(lines)
        self.emu._record(mail_from, rcpt_tos, raw)
        self.accepted += 1
        self.emu.faults.note_accept()
        if self.emu.faults.send_latency_ms:  # accepted, then slow to say so (a hung server)
            time.sleep(self.emu.faults.send_latency_ms / 1000)
        if self.emu.faults.take_drop():
            # Accepted, then the connection drops before the client hears "250".
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                     b"\x01\x00\x00\x00\x00\x00\x00\x00")
            except OSError:
                pass
            return False
        if self.emu.faults.take_garble():
            # Accepted, then a reply the client cannot read (no reply code).
            self._send("Queued as 4F2A1C: thank you")
            return True
        if self.emu.faults.dribble_ms > 0:
            # Accepted, then a long multi-line "250" a byte at a time: until its last line
            # the client cannot know the reply is complete.
            self._dribble(b"250-2.0.0 Message accepted, queued\r\n" * 20
                          + b"250 2.0.0 OK\r\n")
            return True
        self._send("250 2.0.0 Message accepted for delivery")
        return True


def _listed(addresses: list[str], listing: list[str]) -> bool:
    """Whether any of `addresses` (or commands) is in a fault's `listing`, in any case."""
    listed = {b.lower() for b in listing}
    return any(a.lower() in listed for a in addresses)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, emulator: SmtpEmulator) -> None:
        self.emulator = emulator
        super().__init__((emulator.host, emulator.port), _Session)


class SmtpEmulator:
    """An SMTP server on 127.0.0.1 in a background thread, like the HTTP emulators."""

    def __init__(self, port: int = 0, *, username: str = "sandbox",
                 password: str = "sandbox-password", tls: TlsMode = "none",
                 require_auth: bool = True) -> None:
        self.host = "127.0.0.1"
        self.username = username
        self.password = password
        self.tls = tls
        self.require_auth = require_auth
        self.faults = Faults()
        self.received = Recorder()
        self.rate = RateWindow()
        self.connections = 0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._dir: Path | None = None
        """The TLS certificate and key, removed when the emulator stops."""
        self.cafile: str | None = None
        self.ssl_context: ssl.SSLContext | None = None
        if tls != "none":
            self._dir = Path(tempfile.mkdtemp(prefix="incident-notify-smtp-"))
            cert, key = make_self_signed(self._dir)
            self.cafile = str(cert)
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(cert), str(key))
            self.ssl_context = context
        self.port = port
        self._server = _Server(self)
        self.port = int(self._server.server_address[1])
        self._thread: threading.Thread | None = None

    def _record(self, mail_from: str, rcpt_tos: list[str], raw: bytes) -> None:
        # compat32 parsing plus decoding of the few headers kept: the same values as the
        # modern policy at a fourteenth of its cost.
        msg = message_from_bytes(raw, policy=policy.compat32)

        def header(name: str) -> str:
            value = msg.get(name)
            if value is None:
                return ""
            unfolded = re.sub(r"\r?\n(?=[ \t])", "", str(value))
            return str(make_header(decode_header(unfolded)))

        self.received.add({
            "kind": "email", "mail_from": mail_from, "rcpt_tos": rcpt_tos,
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

    def start(self) -> SmtpEmulator:
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name=f"smtp-emulator-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and close every open connection (clients see it drop)."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()
        with self._lock:
            open_now = list(self._open)
        for sock in open_now:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._dir is not None:  # (every start made one: /tmp filled with them)
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

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
