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


def within(seconds: float, open_: Callable[[], T], close: Callable[[T], None]) -> T:
    """`open_()` (a connection: its name lookup, its connect), given up after `seconds`
    with TimeoutError. The system's resolver (`getaddrinfo`) is outside every socket
    timeout and has no socket to shut: a resolver that hangs (the outage took the name
    servers) held each new connection for as long as it did. It runs in a thread of its
    own; what it opens after it was given up is closed."""
    lock = threading.Lock()
    box: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            value = open_()
        except BaseException as exc:  # (handed to the caller)
            with lock:
                box["error"] = exc
        else:
            with lock:
                late = box.get("abandoned", False)
                if not late:
                    box["value"] = value
            if late:
                close(value)
        finally:
            done.set()

    threading.Thread(target=run, name="connect", daemon=True).start()
    if not done.wait(seconds):
        with lock:
            if "value" not in box and "error" not in box:
                box["abandoned"] = True
                raise TimeoutError(f"no connection within {seconds:.0f}s")
    if "error" in box:
        raise box["error"]
    value: T = box["value"]
    return value


def addresses(host: str, port: int, seconds: float) -> list[str]:
    """The addresses of `host` (numeric, in the resolver's order, each once), looked up
    within `seconds` (TimeoutError after), as connecting tries them."""
    import socket

    infos = within(seconds, lambda: socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM),
                   lambda _: None)
    found: list[str] = []
    for *_, sockaddr in infos:
        if str(sockaddr[0]) not in found:
            found.append(str(sockaddr[0]))
    if not found:
        raise OSError(f"{host} has no address")
    return found


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
            # Each address in turn, each with the connect timeout, as urllib3 itself does
            # (one that drops connection requests, an IPv6 route that is gone, must not
            # keep the others from being tried); the name is put back for TLS.
            failed: Exception | None = None
            for address in found:
                self._dns_host = address
                try:
                    return opening()
                except (ConnectTimeoutError, NewConnectionError) as exc:
                    failed = exc
                finally:
                    self._dns_host = name
            assert failed is not None
            raise failed

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
