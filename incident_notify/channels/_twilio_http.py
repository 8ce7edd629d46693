"""The twilio client's HTTP: a `twilio.http.HttpClient` that sends through a `requests`
session's adapter without the session's per-request machinery.

The twilio client hands its HTTP client a finished request: method, URL, form fields,
headers and Basic credentials, no redirects. `TwilioHttpClient` passes that through
`requests.Session.request`, which prepares it again (merging the session's cookies,
hooks, auth and settings, re-parsing the URL, a dozen runtime protocol checks) and then
reads the environment for the proxy: two thirds of an SMS's CPU in this process, where
every sending thread shares one interpreter lock. Here the request is written once and
given to the same session's adapter, the one `requests` itself would use: its connection
pool, proxy, TLS verification, request deadline (`_deadline.mount`) and its exceptions
(`requests.ConnectionError`, `ReadTimeout`, ...), which `_http.transport_error` reads to
tell a request that never left from one that may have been delivered, are unchanged.

What the session would have added and this does not: cookies (Twilio sets none), response
hooks (none are installed) and redirects (the twilio client never follows them).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import lru_cache
from typing import Any
from urllib.parse import urlencode

TWILIO_API = "https://api.twilio.com"


def form(values: Mapping[str, Any]) -> str:
    """Form fields as `requests` encodes them: a list (any iterable but text) repeats its
    field, None is left out, text is UTF-8."""
    pairs: list[tuple[Any, Any]] = []
    for key, value in values.items():
        scalar = isinstance(value, str | bytes) or not hasattr(value, "__iter__")
        items = (value,) if scalar else value
        pairs.extend((key, item) for item in items if item is not None)
    return urlencode(pairs, doseq=True, encoding="utf-8")


def make_http(base: str, timeout: float, logger: Any) -> Any:
    """A twilio HTTP client sending to `base` (the sandbox, a test double, or Twilio)."""
    return _http_class()(base, timeout, logger)


@lru_cache(maxsize=1)
def _http_class() -> type:
    import requests
    from requests.auth import _basic_auth_str
    from requests.structures import CaseInsensitiveDict
    from requests.utils import requote_uri
    from twilio.http import HttpClient
    from twilio.http.response import Response

    from incident_notify.channels._deadline import mount
    from incident_notify.channels._http import CONNECT_TIMEOUT_S, read_environment_once

    class LeanHttp(HttpClient):
        last_headers: Any = None
        """Headers of the last answer (a 429's Retry-After, the Date): twilio drops them."""

        def __init__(self, base: str, timeout: float, logger: Any) -> None:
            super().__init__(logger, False, timeout)
            self.base = base
            self.session = requests.Session()
            read_environment_once(self.session, base)
            mount(self.session)
            self.verify: bool | str = True if self.session.verify is None \
                else self.session.verify

        def request(self, method: str, url: str, params: Mapping[str, Any] | None = None,
                    data: Mapping[str, Any] | None = None,
                    headers: Mapping[str, str] | None = None,
                    auth: tuple[str, str] | None = None, timeout: float | None = None,
                    allow_redirects: bool = False) -> Any:
            self.last_headers = None
            if url.startswith(TWILIO_API):
                url = self.base + url[len(TWILIO_API):]
            if params:
                url += ("&" if "?" in url else "?") + form(params)
            session = self.session
            prepared = requests.PreparedRequest()
            prepared.method = method.upper()
            prepared.url = requote_uri(url)
            sent: Any = CaseInsensitiveDict(session.headers)
            sent.update(headers or {})
            if auth is not None:
                sent["Authorization"] = _basic_auth_str(*auth)
            body: bytes | None = None
            kind = sent.get("Content-Type", "")
            if data and kind in ("application/json", "application/scim+json"):
                body = json.dumps(data, allow_nan=False).encode("utf-8")
            elif data:
                body = form(data).encode("ascii")
                sent.setdefault("Content-Type", "application/x-www-form-urlencoded")
            if body is not None:
                sent["Content-Length"] = str(len(body))
            elif prepared.method not in ("GET", "HEAD"):
                sent.setdefault("Content-Length", "0")
            prepared.headers = sent
            prepared.body = body
            prepared.hooks = {"response": []}
            read = self.timeout if timeout is None else timeout
            answer = session.get_adapter(prepared.url).send(
                prepared, stream=False, timeout=(min(CONNECT_TIMEOUT_S, read), read),
                verify=self.verify, cert=session.cert, proxies=session.proxies)
            content = answer.content  # (read whole: the connection goes back to the pool)
            self.last_headers = answer.headers
            text = content.decode(answer.encoding or "utf-8", errors="replace")
            return Response(int(answer.status_code), text, answer.headers)

    return LeanHttp
