"""Twilio REST emulator: the Messages resource as the real `twilio` client speaks it.

* ``POST /2010-04-01/Accounts/{sid}/Messages.json`` (form body, HTTP Basic auth) -> 201 and a
  Message resource (``sid`` SM..., ``status``, ``num_segments`` computed, ``error_code``).
* ``GET /2010-04-01/Accounts/{sid}/Messages.json`` -> a list page.
* ``GET /2010-04-01/Accounts/{sid}.json`` -> the account (``channels check``).

* ``GET .../Messages.json?To=...&From=...`` filters (newest first), as `resume` uses to
  settle a message whose answer was lost.

Errors use Twilio's legacy body ``{code, message, more_info, status}``; never ``type`` and
``title`` together, which makes twilio 9.x raise a different exception class.
"""

from __future__ import annotations

import base64
import hmac
import math
import re
import secrets
import threading
import time
import urllib.parse
from collections.abc import Iterable
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any, ClassVar

from incident_notify.limits import sms_segments
from incident_notify.sandbox.common import EmulatorHandler, HttpEmulator

E164 = re.compile(r"^\+[1-9]\d{6,14}$")
DEFAULT_SID = "AC" + "5a4db0c" * 4 + "5a4d"


def _error(code: int, message: str, status: int) -> dict[str, Any]:
    return {"code": code, "message": message,
            "more_info": f"https://www.twilio.com/docs/errors/{code}", "status": status}


_REFUSALS = {
    21211: "The 'To' number is not a valid phone number.",
    21219: "The 'To' phone number is not verified. Trial accounts cannot send messages to "
           "unverified numbers.",
    21614: "'To' number is not a valid mobile number",
}
"""Twilio's words for the codes `bad_recipient_code` is usually given."""


class TwilioHandler(EmulatorHandler):
    emulator: ClassVar[TwilioEmulator]

    def do_GET(self) -> None:
        if self.handle_control("GET"):
            return
        emu = self.emulator
        if not self._gate():
            return
        path = urllib.parse.urlparse(self.path).path
        if not self._within_rate(path, sends=False):
            return
        if path == f"/2010-04-01/Accounts/{emu.account_sid}.json":
            account = {"sid": emu.account_sid, "status": emu.faults.account_status,
                       "friendly_name": "incident-notify sandbox", "type": "Full"}
            if not emu.faults.account_status:
                del account["status"]
            self.send_json(200, account)
        elif path == f"/2010-04-01/Accounts/{emu.account_sid}/Messages.json":
            query = dict(urllib.parse.parse_qsl(urllib.parse.urlparse(self.path).query))
            with emu.lock:
                messages = [m for m in reversed(emu.messages)  # newest first, as Twilio
                            if not emu.honour_list_filters
                            or (m["to"] == query.get("To", m["to"])
                                and m["from"] == query.get("From", m["from"]))]
            self.send_json(200, {
                "messages": messages, "page": 0, "page_size": 50, "start": 0,
                "end": max(0, len(messages) - 1),
                "first_page_uri": path + "?PageSize=50&Page=0", "next_page_uri": None,
                "previous_page_uri": None, "uri": path})
        else:
            self.send_json(404, _error(20404, f"The requested resource {path} was not found",
                                       404))

    def do_POST(self) -> None:
        if self.handle_control("POST"):
            return
        emu = self.emulator
        body = self.read_body()
        if not self._gate():
            return
        path = urllib.parse.urlparse(self.path).path
        if path != f"/2010-04-01/Accounts/{emu.account_sid}/Messages.json":
            self.send_json(404, _error(20404, f"The requested resource {path} was not found",
                                       404))
            return
        if not self._within_rate(path, sends=True):
            return
        form = {k: v[-1] for k, v in urllib.parse.parse_qs(body.decode()).items()}
        to, text = form.get("To", ""), form.get("Body", "")
        sender, service = form.get("From"), form.get("MessagingServiceSid")
        if not sender and not service:
            self.send_json(400, _error(21603, "A 'From' or 'MessagingServiceSid' parameter "
                                       "is required to send a message", 400))
            return
        if sender and (sender not in emu.from_numbers or sender in emu.faults.bad_senders):
            self.send_json(400, _error(21606, f"The From phone number {sender} is not a "
                                       "valid, SMS-capable inbound phone number or short "
                                       "code for your account.", 400))
            return
        if emu.faults.sender_queue_full:
            self.send_json(400, _error(21611, "This 'From' number has exceeded the maximum "
                                       "number of queued messages", 400))
            return
        if service and service not in emu.messaging_service_sids:
            self.send_json(400, _error(21701, "The Messaging Service Sid is invalid", 400))
            return
        if not E164.match(to):
            self.send_json(400, _error(21211, f"The 'To' number {to} is not a valid phone "
                                       "number.", 400))
            return
        if to in emu.faults.bad_recipients:
            code = emu.faults.bad_recipient_code
            self.send_json(400, _error(code, _REFUSALS.get(code, f"Twilio refuses to send "
                                                                 f"to {to}."), 400))
            return
        if to in emu.stopped:
            self.send_json(400, _error(21610, "Attempt to send to unsubscribed recipient",
                                       400))
            return
        if not text:
            self.send_json(400, _error(21602, "Message body is required.", 400))
            return
        if len(text) > 1600:
            self.send_json(400, _error(21617, "The concatenated message body exceeds the "
                                       "1600 character limit.", 400))
            return
        sid = "SM" + secrets.token_hex(16)
        now = format_datetime(emu.faults.now())
        segments = sms_segments(text).segments
        resource: dict[str, Any] = {
            "sid": sid, "account_sid": emu.account_sid, "to": to, "from": sender,
            "messaging_service_sid": service, "body": text, "status": "queued",
            "num_segments": str(segments), "num_media": "0",
            "direction": "outbound-api", "api_version": "2010-04-01", "price": None,
            "price_unit": "USD", "error_code": None, "error_message": None,
            "date_created": now, "date_updated": now, "date_sent": None,
            "uri": f"{path[:-5]}/{sid}.json", "subresource_uris": {},
        }
        if to in emu.faults.failed_recipients:
            resource.update(status="failed", error_code=30003,
                            error_message="Unreachable destination handset")
        with emu.lock:
            emu.messages.append(resource)
        emu.received.add({"kind": "sms", "sid": sid, "to": to, "from": sender,
                          "messaging_service_sid": service, "body": text,
                          "num_segments": segments,
                          "status_callback": form.get("StatusCallback"),
                          "ts": datetime.now(UTC).isoformat()})
        self.send_accepted(201, resource)

    def server_error(self, status: int) -> Any:
        return _error(20000 + status, self.responses.get(status, ("Server Error",))[0], status)

    def _gate(self) -> bool:
        """Faults and authentication common to every route; False when answered."""
        emu = self.emulator
        self.apply_latency()
        if emu.faults.outage or emu.faults.take_fail_next():
            self.send_json(503, _error(20503, "Service Unavailable", 503))
            return False
        if not self._authorised():
            self.send_json(401, _error(20003, "Authenticate", 401),
                           headers={"WWW-Authenticate": 'Basic realm="Twilio API"'})
            return False
        return True

    def _within_rate(self, path: str, *, sends: bool) -> bool:
        """The rate limit (fault `rate_limit` per `rate_window_s`): on the sends, or on the
        `rate_limited_paths` when some are named; False when answered 429."""
        emu = self.emulator
        limited = emu.faults.rate_limited_paths
        if not (any(path.startswith(p) for p in limited) if limited else sends):
            return True
        allowed, _, reset = emu.rate.hit(emu.faults.rate_limit, emu.faults.rate_window_s)
        if not allowed:  # (Retry-After: the seconds left in the window)
            self.send_json(429, _error(20429, "Too Many Requests", 429),
                           headers={"Retry-After": str(max(1, math.ceil(reset - time.time())))})
        return allowed

    def _authorised(self) -> bool:
        emu = self.emulator
        header = self.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        return (hmac.compare_digest(user, emu.account_sid)
                and hmac.compare_digest(password, emu.auth_token))


class TwilioEmulator(HttpEmulator):
    handler_class = TwilioHandler

    def __init__(self, port: int = 0, *, account_sid: str = DEFAULT_SID,
                 auth_token: str = "sandbox-auth-token",
                 from_numbers: Iterable[str] = ("+15005550006",),
                 messaging_service_sids: Iterable[str] = ("MG" + "0" * 31 + "1",)) -> None:
        super().__init__(port)
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.from_numbers = set(from_numbers)
        self.messaging_service_sids = set(messaging_service_sids)
        self.stopped: set[str] = set()
        self.messages: list[dict[str, Any]] = []
        self.honour_list_filters = True
        """False: the message list ignores To/From (a sloppy fake, for tests)."""
        self.lock = threading.Lock()

    def add_stop(self, number: str) -> None:
        """The recipient replied STOP: later sends to it fail with 21610."""
        self.stopped.add(number)

    def reset(self) -> None:
        super().reset()
        self.stopped.clear()
        with self.lock:
            self.messages.clear()
