"""How fast and how often a channel is tried: the retry policy (full-jitter backoff, the
deadline, the 429 wait ceiling), a token bucket per channel (its rate and burst), and the
circuit breaker that stops trying a channel that keeps failing and lets one probe through
after a cool-down. The dispatcher owns one of each per channel; nothing here sends."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0
    deadline_s: float = 300.0
    """Give up on a channel for a delivery this long after its first attempt."""
    breaker_threshold: int = 5
    """Consecutive transient failures that open a channel's circuit."""
    breaker_cooldown_s: float = 30.0
    """After this, one probe request may try an open channel again."""
    max_rate_limit_wait_s: float = 120.0
    """A 429 asking for a longer wait than this counts as the channel being unavailable."""

    def backoff(self, attempt: int) -> float:
        """Exponential backoff with full jitter (AWS architecture blog's recommendation):
        uniform in [0, min(max_delay, base * 2^(attempt-1))]."""
        cap = min(self.max_delay_s, self.base_delay_s * (2 ** (attempt - 1)))
        return random.uniform(0.0, cap)


# --------------------------------------------------------------------- primitives
class TokenBucket:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate = max(rate, 1e-6)
        self.capacity = max(burst, 1)
        self._tokens = float(self.capacity)
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def acquire(self, stop: threading.Event) -> bool:
        """Take one token, sleeping as needed; False when `stop` was set meanwhile."""
        while True:
            with self._lock:
                now = time.monotonic()
                self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
                self._last = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    return True
                wait = (1 - self._tokens) / self.rate
            if stop.wait(min(wait, 0.5)):
                return False


class CircuitBreaker:
    """Per channel: closed (requests go), open (fail over without trying), and after the
    cooldown one probe at a time. Every probe ends in exactly one of `success`, `failure`,
    `hold` or `release`, so an open channel can always be probed again. All times are
    `time.monotonic()`."""

    def __init__(self, threshold: int, cooldown_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.failures = 0
        self.opened_at: float | None = None
        self.closed_until = 0.0
        """No probe before this time (a rate limit's reset)."""
        self._probing = False
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    def allow(self) -> bool:
        """May a request go? Open circuits let one probe through after the cooldown."""
        with self._lock:
            if self.opened_at is None:
                return True
            now = self.clock()
            if (not self._probing and now - self.opened_at >= self.cooldown_s
                    and now >= self.closed_until):
                self._probing = True
                return True
            return False

    def success(self) -> bool:
        """Record a success; True when this closed an open circuit."""
        with self._lock:
            was_open = self.opened_at is not None
            self.failures, self.opened_at, self._probing = 0, None, False
            self.closed_until = 0.0
            return was_open

    def failure(self) -> bool:
        """Record a transient failure; True when this opened the circuit."""
        with self._lock:
            self.failures += 1
            if self.opened_at is not None:
                self.opened_at, self._probing = self.clock(), False
                return False
            if self.failures >= self.threshold:
                self.opened_at = self.clock()
                return True
            return False

    def hold(self, seconds: float) -> bool:
        """Open now and allow no probe for `seconds` (a rate limit that resets far away);
        True when this opened the circuit."""
        with self._lock:
            was_open = self.opened_at is not None
            now = self.clock()
            self.opened_at, self._probing = now, False
            self.closed_until = max(self.closed_until, now + seconds)
            return not was_open

    def release(self) -> None:
        """A probe ended without telling whether the channel works (the request never
        went, or the answer was about the recipient): let another probe go."""
        with self._lock:
            self._probing = False

    def force_open(self) -> None:
        with self._lock:
            self.opened_at, self._probing = self.clock(), False
