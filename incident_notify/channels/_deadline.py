"""A deadline on a whole request, for the clients whose timeouts are per socket operation.

`requests` and `smtplib` time out a read that gets nothing for `timeout` seconds. A
provider (or a middlebox) that sends its answer a byte at a time never trips that: each
read gets its byte in time, and one request holds its sending thread, and the update, for
as long as the answer lasts. A channel runs each request in `with Deadline(seconds):`; the
connections the request uses register with it (`watch`); once the time is up, a watchdog
thread shuts their sockets down, the blocked read fails at once, and the channel reports
the request as timed out (`Deadline.expired`): the provider may have taken the message,
so the delivery is unknown, never retried blindly.

Starting and ending a deadline costs two dictionary operations (sending threads never
wait for each other here); the watchdog looks at the running ones four times a second,
so a deadline ends up to a quarter of a second late.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Callable
from functools import lru_cache
from typing import Any, TypeVar

_CHECK_EVERY_S = 0.25
T = TypeVar("T")

_local = threading.local()
_running: dict[int, Deadline] = {}
_start_lock = threading.Lock()
_watchdog: threading.Thread | None = None


class Deadline:
    """The requests this thread makes inside the block end within `seconds`."""

    __slots__ = ("_outer", "ends", "expired", "owners", "seconds")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.ends = 0.0
        self.owners: list[Any] = []
        """Objects with a `sock` attribute (connections) the requests use."""
        self.expired = False
        self._outer: Deadline | None = None

    def __enter__(self) -> Deadline:
        self.ends = time.monotonic() + self.seconds
        self._outer = getattr(_local, "deadline", None)
        _local.deadline = self
        _running[id(self)] = self
        if _watchdog is None:
            _start_watchdog()
        return self

    def __exit__(self, *exc: object) -> None:
        _running.pop(id(self), None)
        _local.deadline = self._outer


def watch(owner: Any) -> None:
    """Put a connection (anything with a `sock`) under the current thread's deadline, if
    it has one: registered before it blocks, shut down once the deadline passes."""
    current: Deadline | None = getattr(_local, "deadline", None)
    if current is None:
        return
    current.owners.append(owner)
    if current.expired:
        _shut(owner)


def current() -> Deadline | None:
    """The current thread's deadline, if it runs inside one."""
    found: Deadline | None = getattr(_local, "deadline", None)
    return found


def _start_watchdog() -> None:
    global _watchdog
    with _start_lock:
        if _watchdog is None:
            thread = threading.Thread(target=_watch_loop, name="request-deadlines",
                                      daemon=True)
            thread.start()
            _watchdog = thread


def _watch_loop() -> None:
    while True:
        time.sleep(_CHECK_EVERY_S)
        now = time.monotonic()
        for due in list(_running.values()):
            if due.ends <= now and not due.expired:
                due.expired = True
                for owner in list(due.owners):
                    _shut(owner)


def _shut(owner: Any) -> None:
    sock = getattr(owner, "sock", None)
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def addresses(host: str, port: int, seconds: float) -> list[str]:
    """The addresses of `host` (numeric, in the resolver's order, each once), looked up
    within `seconds` (TimeoutError after). The system's resolver (`getaddrinfo`) is
    outside every socket timeout and has no socket to shut: a resolver that hangs (the
    outage took the name servers) held each new connection for as long as it did, so the
    lookup runs in a thread of its own, left behind when it takes too long."""
    box: dict[str, Any] = {}
    done = threading.Event()

    def look_up() -> None:
        try:
            box["infos"] = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
        except BaseException as exc:  # (handed to the caller)
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=look_up, name="lookup", daemon=True).start()
    if not done.wait(seconds):
        raise TimeoutError(f"no address for {host} within {seconds:.0f}s")
    if "error" in box:
        raise box["error"]
    found: list[str] = []
    for *_, sockaddr in box["infos"]:
        if str(sockaddr[0]) not in found:
            found.append(str(sockaddr[0]))
    if not found:
        raise OSError(f"{host} has no address")
    return found


STAGGER_S = 0.25
"""How long one address has to open before the next is tried beside it (RFC 8305's
"connection attempt delay")."""


def first_to_open(found: list[str], open_at: Callable[[str], T],
                  errors: tuple[type[BaseException], ...]) -> T:
    """The first of `open_at(address)` to succeed, each with its own connect timeout, as
    browsers connect (RFC 8305, Happy Eyeballs): the next address is tried beside the
    others once the last started has not opened within STAGGER_S, or at once when it
    failed; the last failure when none opens. One address that drops connection requests
    (an edge of the provider down, an IPv6 route that is gone) costs a quarter of a
    second, not a connect timeout per connection, so a name whose first two addresses are
    dead is still reached within the health check's time. `open_at` runs in threads of
    its own and must not change shared state; what opens after the winner is closed."""
    if len(found) == 1:
        return open_at(found[0])
    import queue

    results: queue.Queue[tuple[bool, Any]] = queue.Queue()

    def attempt(address: str) -> None:
        try:
            results.put((True, open_at(address)))
        except BaseException as exc:  # (handed to the caller)
            results.put((False, exc))

    started = finished = 0
    try:
        while True:
            if started < len(found):  # (the first; the next beside it, or after a failure)
                threading.Thread(target=attempt, args=(found[started],), daemon=True,
                                 name="connect").start()
                started += 1
            try:
                ok, value = results.get(timeout=STAGGER_S if started < len(found) else None)
            except queue.Empty:
                continue
            finished += 1
            if ok:
                return value
            if not isinstance(value, errors) or finished == len(found):
                raise value
    finally:
        if finished < started:
            threading.Thread(target=_close_late, args=(results, started - finished),
                             daemon=True, name="connect-late").start()


def _close_late(results: Any, count: int) -> None:
    """Close what opens after the winner (or after the caller gave up)."""
    for _ in range(count):
        ok, value = results.get()
        if ok:
            try:
                value.close()
            except Exception:
                pass


# ---------------------------------------------------------------- requests / urllib3
def mount(session: Any) -> None:
    """Make every connection `session` uses register with the current deadline."""
    adapter = _adapter_class()
    for prefix in ("https://", "http://"):
        session.mount(prefix, adapter())


@lru_cache(maxsize=1)
def _adapter_class() -> type:
    """A requests adapter whose pools make connections that register with the current
    deadline before each request (made once, on first use: requests is imported only by
    the commands that send)."""
    from requests.adapters import HTTPAdapter
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
    from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
    from urllib3.util.connection import create_connection

    class Watched:
        def request(self, *args: Any, **kwargs: Any) -> None:
            watch(self)
            super().request(*args, **kwargs)  # type: ignore[misc]

        def _new_conn(self) -> Any:
            opening = super()._new_conn  # type: ignore[misc]
            limit = getattr(self, "timeout", None)
            name = getattr(self, "_dns_host", None)
            if not isinstance(limit, int | float) or limit <= 0 or not name:
                return opening()
            try:
                found = addresses(name, self.port, limit)  # type: ignore[attr-defined]
            except TimeoutError:
                raise ConnectTimeoutError(self, f"no connection to {name} within "
                                          f"{limit:.0f}s (name lookup)") from None
            except OSError:
                return opening()  # (urllib3 says it: a name that does not resolve)

            conn: Any = self

            def at(address: str) -> Any:
                # urllib3's own `_new_conn` for one address, without setting `_dns_host`
                # (the attempts run side by side; TLS then checks the name, `host`).
                try:
                    sock = create_connection((address, conn.port), limit,
                                             source_address=conn.source_address,
                                             socket_options=conn.socket_options)
                except TimeoutError as exc:
                    raise ConnectTimeoutError(conn, f"Connection to {name} timed out. "
                                              f"(connect timeout={limit})") from exc
                except OSError as exc:
                    raise NewConnectionError(conn, "Failed to establish a new connection: "
                                             f"{exc}") from exc
                sys.audit("http.client.connect", conn, conn.host, conn.port)
                return sock

            return first_to_open(found, at, (ConnectTimeoutError, NewConnectionError))

    class WatchedHTTP(Watched, HTTPConnection):
        pass

    class WatchedHTTPS(Watched, HTTPSConnection):
        pass

    class HTTPPool(HTTPConnectionPool):
        ConnectionCls = WatchedHTTP

    class HTTPSPool(HTTPSConnectionPool):
        ConnectionCls = WatchedHTTPS

    pools = {"http": HTTPPool, "https": HTTPSPool}

    class Adapter(HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = pools

        def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
            manager = super().proxy_manager_for(proxy, **kwargs)
            manager.pool_classes_by_scheme = pools
            return manager

    return Adapter
