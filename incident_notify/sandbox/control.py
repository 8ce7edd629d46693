"""One HTTP control API for a running sandbox (all three emulators, SMTP included).

* ``GET  /SERVICE/received``  -> ``{"received": [...]}``
* ``GET  /SERVICE/faults``    -> current faults
* ``POST /SERVICE/faults``    JSON body of fault fields -> new faults
* ``POST /reset``             clears every record and fault
* ``POST /twitter/reply``     ``{"in_reply_to", "username", "text"}``: someone replies
* ``POST /twitter/delete``    ``{"id"}``: the tweet vanishes (replies to it are refused)

SERVICE is ``twitter``, ``twilio`` or ``smtp``. Bound to 127.0.0.1 only, and every
request must carry ``Authorization: Bearer <token>``, the sandbox's per-run token (in its
owner-only state file): another local user cannot steer or read the sandbox.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class ControlServer:
    def __init__(self, sandbox: Any, port: int = 0) -> None:
        emulators = sandbox.emulators

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return

            def _reply(self, status: int, payload: Any) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _authorised(self) -> bool:
                import hmac

                given = self.headers.get("Authorization", "")
                if hmac.compare_digest(given.encode(), f"Bearer {sandbox.token}".encode()):
                    return True
                self._reply(401, {"error": "the sandbox token is required"})
                return False

            def _route(self) -> tuple[Any, str] | None:
                parts = self.path.strip("/").split("/")
                if len(parts) == 2 and parts[0] in emulators:
                    return emulators[parts[0]], parts[1]
                return None

            def do_GET(self) -> None:
                if not self._authorised():
                    return
                route = self._route()
                if route and route[1] == "received":
                    self._reply(200, {"received": route[0].received.all()})
                elif route and route[1] == "faults":
                    self._reply(200, route[0].faults.snapshot())
                else:
                    self._reply(404, {"error": "unknown route"})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b"{}"
                if not self._authorised():
                    return
                if self.path == "/reset":
                    sandbox.reset()
                    self._reply(200, {"ok": True})
                    return
                if self.path == "/twitter/reply":
                    try:
                        body = json.loads(raw or b"{}")
                        tweet_id = sandbox.twitter.add_reply(
                            str(body["in_reply_to"]), str(body["username"]),
                            str(body["text"]))
                    except (KeyError, TypeError, ValueError) as exc:
                        self._reply(400, {"error": f"bad reply request: {exc}"})
                        return
                    self._reply(200, {"id": tweet_id})
                    return
                if self.path == "/twitter/delete":
                    try:
                        tweet_id = str(json.loads(raw or b"{}")["id"])
                    except (KeyError, TypeError, ValueError) as exc:
                        self._reply(400, {"error": f"bad delete request: {exc}"})
                        return
                    deleted = sandbox.twitter.delete_tweet(tweet_id)
                    self._reply(200, {"id": tweet_id, "deleted": deleted})
                    return
                route = self._route()
                if not route or route[1] != "faults":
                    self._reply(404, {"error": "unknown route"})
                    return
                try:
                    route[0].faults.update(**json.loads(raw or b"{}"))
                except (TypeError, ValueError) as exc:
                    self._reply(400, {"error": str(exc)})
                    return
                self._reply(200, route[0].faults.snapshot())

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> ControlServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
