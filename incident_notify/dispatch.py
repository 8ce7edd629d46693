"""The fan-out engine: concurrent, rate-limited, retried, fails over, never sends twice.

Each channel instance gets a `ChannelRunner`: a pool of worker threads (the channel's
declared concurrency), a token bucket (its rate), a circuit breaker, and a pause used
when the provider answers 429. Jobs are single deliveries, or the parts of one tweet
thread, which a single worker sends in order so each part replies to the one before.

Every request that can reach a provider is preceded by a durable ``delivery.attempt``
record, written when the channel calls ``attempt.begin()`` (after user lookups and
connection set-up), and followed by its outcome. A failure before that point is retried
freely; after it, one that may have delivered (a dropped connection, a read timeout) is
recorded "unknown" and never retried blindly. A crash between the two leaves an attempt
with no outcome, which `resume` settles with the provider before deciding anything.

A 429 is a state of the whole channel: it pauses every worker of that channel until the
reset; a reset beyond the wait ceiling opens the circuit at once (until the reset) and
the queued deliveries fail over without touching the provider again.

When a channel is down (circuit open, or retries exhausted by the deadline) the
`Router` (the planner) re-routes its deliveries to the playbook's fallback channels.

Long on purpose: the Dispatcher is one state machine (workers, rate limits, retries, the
breaker, failover, the attempt and outcome records), and its invariants (a durable attempt
before every request; no job lost or sent twice) are kept in one place.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from incident_notify.audit import AuditEntry, AuditRecord
from incident_notify.channels.base import (
    Channel,
    ChannelError,
    Delivery,
    OutgoingMessage,
    PermanentChannelError,
    Receipt,
    TransientChannelError,
)
from incident_notify.errors import AuditError, IncidentNotifyError
from incident_notify.flow import CircuitBreaker, RetryPolicy, TokenBucket
from incident_notify.held import HeldWatch
from incident_notify.same_address import Same, SharedSends


# --------------------------------------------------------------------- interfaces
class AuditSink(Protocol):
    def append(self, event: str, **fields: Any) -> AuditRecord: ...

    def append_many(self, entries: Sequence[AuditEntry]) -> list[AuditRecord]: ...


@dataclass(frozen=True)
class Planned:
    """A delivery with the payload of its ``delivery.planned`` record."""

    delivery: Delivery
    payload: Mapping[str, Any]
    channel_type: str = ""


class Router(Protocol):
    def reroute(self, delivery: Delivery, reason: str) -> list[Planned] | None:
        """Deliveries that carry `delivery` on fallback channels; [] when everyone is
        already told on one; None when there is no other way to reach them."""
        ...

    def next_channel(self, delivery: Delivery) -> list[Planned] | None:
        """After a permanent recipient error: the person's next channel, as `reroute`."""
        ...

    def opted_out(self, delivery: Delivery) -> str | None:
        """The provider says the recipient unsubscribed (Twilio 21610). A warning for the
        commander when it could not all be kept (the opt-out list not written)."""
        ...

    def new_records(self) -> list[AuditEntry]:
        """Records the router's last answers need first (``message.rendered`` of a new
        fallback message); the dispatcher writes them with the failover, in one batch."""
        ...


# --------------------------------------------------------------------- results
@dataclass
class DispatchResult:
    """What one run of the dispatcher saw: per-channel outcome counts, failures and failovers
    of this run (for progress and the record's summary). The verdict a command reports is
    read from the record (verdict.py), not from these counters."""

    counts: dict[str, Counter[str]] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    failovers: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False
    abandoned: bool = False
    """Interrupted twice: requests still in flight were not waited for (in doubt)."""
    fatal: str | None = None
    fatal_kind: str | None = None
    """'audit' (the record cannot be written: exit 8) or 'bug' (exit 1)."""
    elapsed_s: float = 0.0

    def add(self, channel: str, outcome: str) -> None:
        self.counts.setdefault(channel, Counter())[outcome] += 1

    def total(self, outcome: str) -> int:
        return sum(c[outcome] for c in self.counts.values())


ProgressFn = Callable[[str, Delivery, Mapping[str, Any]], None]
"""on_event(kind, delivery, info): an outcome (sent/failed/failed_over/unknown/skipped) for
counting, or a notice (retry, failover with its target channels, circuit_open/closed)."""


# --------------------------------------------------------------------- engine
class ChannelRunner:
    def __init__(self, channel: Channel, policy: RetryPolicy) -> None:
        self.channel = channel
        lim = channel.limits
        self.bucket = TokenBucket(lim.rate_per_second, lim.burst)
        self.breaker = CircuitBreaker(policy.breaker_threshold, policy.breaker_cooldown_s)
        # (job, from_feeder); None tells a worker to stop.
        self.queue: deque[tuple[list[Delivery], bool] | None] = deque()
        self.cond = threading.Condition()
        self.max_threads = max(1, lim.concurrency)
        self.idle = 0
        """Workers waiting for a job: a new one starts only when none is (three DMs do
        not start eight threads; each start costs a GIL hand-over)."""
        self.paused_until = 0.0
        """time.monotonic() before which no request goes (a 429's reset)."""
        self.down_reason = ""
        """Why the circuit is open, for the failover records."""
        self.threads: list[threading.Thread] = []


class Dispatcher:
    """Sends jobs through their channels; use once per update (or resume)."""

    def __init__(
        self,
        channels: Mapping[str, Channel],
        audit: AuditSink,
        router: Router,
        *,
        incident_id: str,
        policy: RetryPolicy | None = None,
        on_event: ProgressFn | None = None,
        channel_types: Mapping[str, str] | None = None,
        max_queued: int = 2000,
        down: Mapping[str, str] | Iterable[str] = (),
    ) -> None:
        self.channels = dict(channels)
        self.audit = audit
        self.router = router
        self.incident_id = incident_id
        self.policy = policy or RetryPolicy()
        self.on_event = on_event
        self.types = dict(channel_types or {n: c.type_name for n, c in channels.items()})
        self.result = DispatchResult()
        self.stop = threading.Event()
        self._runners: dict[str, ChannelRunner] = {}
        self._outstanding = 0
        self._done = threading.Condition()
        self._slots = threading.Semaphore(max_queued)
        self._lock = threading.Lock()
        self._down = dict(down) if isinstance(down, Mapping) else dict.fromkeys(down, "")
        self.shared = SharedSends()
        """Deliveries of the same message to the same address (contacts sharing a phone
        or a mailbox): sent once (see `same_address`)."""
        self._reroute_lock = threading.Lock()
        self._attempts: dict[str, int] = {}
        """Attempts (requests that may have reached the provider) per key, this run."""
        self.held = HeldWatch(self._record_held)
        """Requests unanswered for a while, recorded while held (see `held`)."""

    # -- public
    def run(self, jobs: Iterable[Sequence[Delivery]]) -> DispatchResult:
        """Send every job; returns when all are done (or stopped). Ctrl-C safe."""
        started = time.monotonic()
        for name, detail in self._down.items():
            runner = self._runner(name)
            runner.breaker.force_open()
            reason = "health check failed before sending" + (f": {detail}" if detail else "")
            runner.down_reason = f"channel down ({reason})"
            self._emit_circuit(name, True, reason)
        try:
            for job in jobs:
                if self.stop.is_set():
                    break
                while not self._slots.acquire(timeout=0.2):
                    if self.stop.is_set():
                        break
                if self.stop.is_set():
                    break
                self._submit(list(job), from_feeder=True)
            self._wait_all()
        except KeyboardInterrupt:
            # Ctrl-C: nothing new starts; the requests in flight are answered (each within
            # its deadline) and recorded. Ctrl-C again: they are left as they are, in doubt
            # on the record (attempted, no answer), for `resume` to settle.
            self.result.interrupted = True
            self.stop.set()
            if self._outstanding:
                self._notice("stopping", "", {})
            try:
                self._wait_all()
            except KeyboardInterrupt:
                self.result.abandoned = True
        finally:
            self._shutdown(wait=not self.result.abandoned)
            self.result.elapsed_s = time.monotonic() - started
        if self.stop.is_set() and self.result.fatal is None:
            self.result.interrupted = True
        return self.result

    def interrupt(self) -> None:
        self.stop.set()

    # -- plumbing
    def _runner(self, name: str) -> ChannelRunner:
        with self._lock:
            runner = self._runners.get(name)
            if runner is None:
                runner = ChannelRunner(self.channels[name], self.policy)
                self._runners[name] = runner
            return runner

    def _submit(self, job: list[Delivery], *, from_feeder: bool) -> None:
        """Queue a job. Feeder jobs hold a slot (backpressure keeps memory flat);
        re-routed jobs never wait for one, so two channels failing over into each
        other cannot deadlock."""
        runner = self._runner(job[0].channel)
        with self._done:
            self._outstanding += 1
        with runner.cond:
            runner.queue.append((job, from_feeder))
            if len(runner.queue) > runner.idle and len(runner.threads) < runner.max_threads:
                # Workers start as the queue needs them, up to the channel's concurrency.
                t = threading.Thread(target=self._worker, args=(runner,), daemon=True,
                                     name=f"{runner.channel.name}-{len(runner.threads)}")
                runner.threads.append(t)
                t.start()
            runner.cond.notify()

    def _job_done(self, from_feeder: bool) -> None:
        if from_feeder:
            self._slots.release()
        with self._done:
            self._outstanding -= 1
            if self._outstanding == 0:
                self._done.notify_all()

    def _wait_all(self) -> None:
        with self._done:
            while self._outstanding > 0:
                self._done.wait(timeout=0.2)

    def _shutdown(self, wait: bool = True) -> None:
        self.held.close()
        for runner in self._runners.values():
            with runner.cond:
                runner.queue.extend(None for _ in runner.threads)
                runner.cond.notify_all()
        for runner in self._runners.values():
            for t in runner.threads:
                t.join(timeout=60 if wait else 0)

    def _worker(self, runner: ChannelRunner) -> None:
        while True:
            with runner.cond:
                while not runner.queue:
                    runner.idle += 1
                    runner.cond.wait()
                    runner.idle -= 1
                item = runner.queue.popleft()
            if item is None:
                return
            job, from_feeder = item
            try:
                if not self.stop.is_set():
                    self._run_job(runner, job)
            except AuditError as exc:
                # The record is the point of the tool: stop everything rather than
                # send what cannot be recorded.
                self.result.fatal = f"audit log write failed: {exc}"
                self.result.fatal_kind = "audit"
                self.stop.set()
            except Exception as exc:  # a bug in a channel: record, never lose the job
                name = runner.channel.name
                self.result.fatal = f"unexpected {type(exc).__name__} in {name}: {exc}"
                self.result.fatal_kind = "bug"
                self.stop.set()
            finally:
                self._job_done(from_feeder)

    # -- one job (a delivery, or the parts of a thread in order)
    def _run_job(self, runner: ChannelRunner, job: list[Delivery]) -> None:
        if len(job) == 1:
            how, same = self.shared.claim(job[0])
            if same is not None:
                if how == "own":
                    receipt = self._deliver(runner, job[0], whole=job)
                    for follower in self.shared.settle(same, receipt):
                        self._follow(same, follower)
                elif how == "follow":
                    self._follow(same, job[0])
                return  # ("wait": its owner settles it)
        reply_to = job[0].reply_to
        for index, delivery in enumerate(job):
            if self.stop.is_set():
                return
            if index > 0:
                delivery = replace(delivery, reply_to=reply_to)
            # A thread cut mid-way fails over like one that never started: the rest of the
            # thread cannot reply to a missing part, so its words travel on the fallback.
            receipt = self._deliver(runner, delivery, whole=job[index:])
            if receipt is None:
                return
            reply_to = receipt.provider_id

    def _deliver(
        self, runner: ChannelRunner, d: Delivery, whole: list[Delivery]
    ) -> Receipt | None:
        """Send one delivery with retries; None when it did not go out on this channel."""
        breaker = runner.breaker
        first_attempt_at: float | None = None
        tries = 0
        while True:
            if self.stop.is_set():
                return None
            if not breaker.allow():
                self._failover(d, self._down_reason(runner), whole)
                return None
            wait = runner.paused_until - time.monotonic()
            if wait > 0:
                if self._too_long(wait, first_attempt_at):
                    # A reset far away (another delivery met it just before the circuit
                    # opened): the channel is down until then, as that delivery found.
                    breaker.release()
                    self._failover(d, self._down_reason(runner), whole)
                    return None
                if self.stop.wait(wait):
                    breaker.release()
                    return None
                continue  # re-check the breaker: the channel may have closed meanwhile
            if not runner.bucket.acquire(self.stop):
                breaker.release()
                return None
            tries += 1
            first_attempt_at = first_attempt_at or time.monotonic()
            attempt = _Attempt(self, d)
            try:
                try:
                    receipt = runner.channel.send(d, attempt)
                finally:
                    self.held.ended(d.key)
            except TransientChannelError as exc:
                runner.channel.hide_secrets(exc)  # (a plugin's error text too)
                outcome = self._transient(runner, d, exc, attempt, tries, first_attempt_at,
                                          whole)
                if outcome is None:
                    continue
                return None
            except PermanentChannelError as exc:
                self._permanent(runner, d, runner.channel.hide_secrets(exc), attempt, whole)
                return None
            except ChannelError as exc:  # a channel raising the base class: treat as permanent
                self._permanent(runner, d, runner.channel.hide_secrets(PermanentChannelError(
                    str(exc), channel=d.channel, code=exc.code)), attempt, whole)
                return None
            except AuditError:
                raise
            except Exception as exc:  # a malformed answer the client choked on
                err = TransientChannelError(
                    f"{d.channel}: unexpected {type(exc).__name__} from the provider's "
                    f"answer", channel=d.channel, code="error", maybe_delivered=True)
                if self._transient(runner, d, err, attempt, tries, first_attempt_at,
                                   whole) is None:
                    continue
                return None
            attempt.begin()  # a channel that never called it: record before the outcome
            if breaker.success():
                self._emit_circuit(d.channel, False, "recovered")
            self._record(d, "sent", {
                "provider_id": receipt.provider_id, "segments": receipt.segments,
                "attempt": attempt.number, "channel_type": self.types.get(d.channel, ""),
                "reply_to": d.reply_to, "detail": dict(receipt.detail),
            })
            return receipt

    def _follow(self, same: Same, d: Delivery) -> None:
        """Settle `d` on the outcome of the delivery that sent the same message to the same
        address: sent with it, in doubt with it, or sent on its own when it was refused
        or failed over (so that `d` fails over to its own person's next channel)."""
        if same.receipt is not None:
            self._record(d, "sent", {
                "provider_id": same.receipt.provider_id, "segments": 0, "attempt": 0,
                "channel_type": self.types.get(d.channel, ""), "reply_to": d.reply_to,
                "detail": {"same_message_as": same.owner}})
        elif same.outcome == "unknown":
            reason = (f"the same message to the same address ({same.owner}) may have "
                      "arrived")
            self._record(d, "unknown", {"error": reason, "code": "shared", "attempt": 0,
                                        "same_message_as": same.owner})
            self._cover_unknown(d, reason, [d])
        elif not self.stop.is_set():
            self.shared.alone(d)
            self._submit([d], from_feeder=False)

    def _down_reason(self, runner: ChannelRunner) -> str:
        return runner.down_reason or "channel down (circuit open)"

    def _transient(self, runner: ChannelRunner, d: Delivery, exc: TransientChannelError,
                   attempt: _Attempt, tries: int, first_attempt_at: float,
                   whole: list[Delivery]) -> bool | None:
        """Handle a transient failure: None to try again, True when the delivery is done
        on this channel (recorded unknown, or failed over)."""
        policy = self.policy
        breaker = runner.breaker
        if attempt.begun and exc.maybe_delivered:
            # The provider may have it: never retried blindly; resume settles it.
            if breaker.failure():
                self._open(runner, d.channel, str(exc))
            self._record(d, "unknown", _err(exc, attempt.number))
            self._cover_unknown(d, str(exc), whole)
            return True
        if exc.recipient_problem:
            # Deferred for this recipient only (a greylisting server asks for minutes): the
            # channel works, so its circuit is untouched, and the person is tried on their
            # next channel now rather than a worker waiting the deferral out.
            self._permanent(runner, d, PermanentChannelError(
                exc.message, channel=d.channel, code=exc.code, recipient_problem=True),
                attempt, whole)
            return True
        elapsed = time.monotonic() - first_attempt_at
        if exc.retry_after is not None:
            if self._too_long(exc.retry_after, first_attempt_at):
                # The whole channel is unusable until the reset: open it until then, and
                # let every queued delivery fail over without asking the provider again.
                reason = f"rate limited until {exc.retry_after:.0f}s from now"
                runner.down_reason = reason
                runner.paused_until = max(runner.paused_until,
                                          time.monotonic() + exc.retry_after)
                if breaker.hold(exc.retry_after):
                    self._open(runner, d.channel, reason)
                self._failover(d, reason, whole)
                return True
            runner.paused_until = max(runner.paused_until, time.monotonic() + exc.retry_after)
            breaker.release()
            self._emit("retry", d, {"error": str(exc), "attempt": tries,
                                    "retry_after": exc.retry_after})
            return None  # a rate limit is not a failure: the channel is up
        if breaker.failure():
            self._open(runner, d.channel, str(exc))
        if tries >= policy.max_attempts or elapsed >= policy.deadline_s:
            self._failover(d, f"gave up after {tries} attempt(s): {exc}", whole)
            return True
        self._emit("retry", d, {"error": str(exc), "attempt": tries})
        delay = min(policy.backoff(tries), max(0.0, policy.deadline_s - elapsed))
        if self.stop.wait(delay):
            return True
        return None

    def _too_long(self, wait: float, first_attempt_at: float | None) -> bool:
        """Whether a rate limit's wait is longer than a delivery may be held for it (the
        ceiling, or what is left of its deadline): the channel is then down until the
        reset, and the delivery fails over."""
        spent = time.monotonic() - first_attempt_at if first_attempt_at else 0.0
        return wait > min(self.policy.max_rate_limit_wait_s, self.policy.deadline_s - spent)

    def _cover_unknown(self, d: Delivery, reason: str, whole: list[Delivery]) -> None:
        """A delivery whose outcome is unknown (the provider hung or dropped the line after
        the request left): whoever would hear on its fallback channels were it down hears
        now too (the public post's fallback audience; the person, on their next channel
        unless already told there). It may mean a person hears twice, on two channels;
        never twice on one. The delivery itself stays unknown for `resume` to settle; the
        rest of a thread moves with it."""
        with self._reroute_lock:
            try:
                planned = self.router.reroute(d, f"outcome unknown: {reason}")
            except IncidentNotifyError:
                planned = None
            if planned is None:
                return  # no fallback: the rest of the thread waits for resume
            moved = [(part, {"reason": f"an earlier part's outcome is unknown: {reason}",
                             "to": [], "as_part_of": d.key}) for part in whole[1:]]
            if planned or moved:  # (none: already told on the fallback, as team members)
                self._start(planned, d, f"outcome unknown: {reason}", moved)

    def _open(self, runner: ChannelRunner, channel: str, reason: str) -> None:
        if not runner.down_reason:
            runner.down_reason = f"channel down ({reason})"
        self._emit_circuit(channel, True, reason)

    def _permanent(self, runner: ChannelRunner, d: Delivery, exc: PermanentChannelError,
                   attempt: _Attempt, whole: list[Delivery]) -> None:
        if exc.channel_down:
            # Nothing can succeed on this channel (credentials, TLS): fail everything over.
            if runner.breaker.hold(self.policy.breaker_cooldown_s):
                runner.down_reason = f"channel down ({exc.message})"
                self._emit_circuit(d.channel, True, exc.message)
            self._failover(d, exc.message, whole)
            return
        runner.breaker.release()  # the provider answered about this recipient only
        payload = {**_err(exc, attempt.number), "permanent": True}
        if exc.opt_out:
            warning = self.router.opted_out(d)
            if warning:
                self._notice("warning", d.channel, {"reason": warning})
        if not d.contact_id:
            # A public post refused (not the whole channel: a duplicate of an older post,
            # a request X will not take): its fallback audience hears directly, as when
            # the channel is down; the rest of its thread travels with it.
            self._failover(d, str(exc), whole, payload)
            return
        # Refused for this delivery only (the recipient, or this message on this channel:
        # too long, a code we do not know): the person's next channel may still reach them.
        with self._reroute_lock:
            try:
                nxt = self.router.next_channel(d)
            except IncidentNotifyError:
                nxt = None
            if nxt is not None:
                self._start(nxt, d, str(exc), [(d, {
                    **payload, "to": [p.delivery.key for p in nxt], "reason": str(exc),
                    "to_channels": sorted({p.delivery.channel for p in nxt})})])
                return
        self._record(d, "failed", payload)
        for rest in whole[1:]:
            self._record(rest, "failed", {"error": "an earlier thread part was refused",
                                          "permanent": True})

    def _failover(self, d: Delivery, reason: str, whole: list[Delivery],
                  detail: Mapping[str, Any] | None = None) -> None:
        """Carry `d` (and the rest of its thread) on its channel's fallbacks; `detail`
        (a refusal's code and attempt) goes into its record."""
        # One failover at a time: the messages a reroute renders must land in the same
        # batch as the deliveries that use them.
        with self._reroute_lock:
            self._failover_locked(d, reason, whole, detail or {"permanent": False})

    def _failover_locked(self, d: Delivery, reason: str, whole: list[Delivery],
                         detail: Mapping[str, Any]) -> None:
        try:
            planned = self.router.reroute(d, reason)
        except IncidentNotifyError as exc:  # the fallback may not carry this (sensitivity)
            planned, reason = None, f"{reason}; no fallback allowed: {exc}"
        rest = whole[1:]
        if planned is None:
            self._record(d, "failed", {**detail, "error": reason, "no_fallback": True})
            for part in rest:
                self._record(part, "failed", {"error": reason, "permanent": False,
                                              "no_fallback": True, "as_part_of": d.key})
            return
        # The unsent parts of a thread travel as one message on the fallback channels.
        moved = [(d, {**detail, "reason": reason, "to": [p.delivery.key for p in planned],
                      "to_channels": sorted({p.delivery.channel for p in planned})})]
        moved += [(part, {"reason": reason, "to": [], "as_part_of": d.key}) for part in rest]
        self._start(planned, d, reason, moved)

    def _start(self, planned: list[Planned], original: Delivery, reason: str,
               moved: list[tuple[Delivery, dict[str, Any]]]) -> None:
        """Record a failover as one batch, so a crash cannot separate its halves: the new
        messages, the new deliveries, then the ``delivery.failover`` of each moved one."""
        entries = list(self.router.new_records())
        entries += [AuditEntry("delivery.planned", incident=self.incident_id,
                               channel=p.delivery.channel,
                               recipient=p.delivery.recipient or None, key=p.delivery.key,
                               payload=dict(p.payload)) for p in planned]
        entries += [AuditEntry("delivery.failover", incident=self.incident_id,
                               channel=m.channel, recipient=m.recipient or None, key=m.key,
                               payload=payload) for m, payload in moved]
        self.audit.append_many(entries)
        info = {"from": original.channel, "to": sorted({p.delivery.channel for p in planned}),
                "reason": reason, "deliveries": len(planned)}
        with self._lock:
            self.result.failovers.append({"key": original.key, **info})
            for m, _ in moved:
                self.result.add(m.channel, "failed_over")
                self.shared.note(m.key, "failed_over")
        self._emit("failover", original, info)
        for m, payload in moved:
            self._emit("failed_over", m, payload)
        self.shared.track([p.delivery.key for p in planned])
        for p in planned:
            self._submit([p.delivery], from_feeder=False)

    def _record(self, d: Delivery, event: str, payload: Mapping[str, Any],
                outcome: str | None = None) -> None:
        self.audit.append(f"delivery.{event}", incident=self.incident_id, channel=d.channel,
                          recipient=d.recipient or None, key=d.key, payload=dict(payload))
        kind = outcome or event
        self.shared.note(d.key, kind)
        with self._lock:
            self.result.add(d.channel, kind)
            if kind in ("failed", "unknown"):
                self.result.failures.append({"key": d.key, "channel": d.channel,
                                             "recipient": d.recipient, "outcome": kind,
                                             "error": payload.get("error")})
        self._emit(kind, d, payload)

    def _record_held(self, d: Delivery, number: int, seconds: float) -> None:
        self.audit.append("delivery.held", incident=self.incident_id, channel=d.channel,
                          recipient=d.recipient or None, key=d.key,
                          payload={"attempt": number, "held_s": round(seconds, 1)})

    def _emit(self, kind: str, d: Delivery, info: Mapping[str, Any]) -> None:
        if self.on_event is not None:
            try:
                self.on_event(kind, d, info)
            except Exception:  # progress display must never break sending
                pass

    def _emit_circuit(self, channel: str, opened: bool, reason: str) -> None:
        event = "channel.circuit_open" if opened else "channel.circuit_closed"
        self.audit.append(event, incident=self.incident_id, channel=channel,
                          payload={"reason": reason})
        self._notice("circuit_open" if opened else "circuit_closed", channel,
                     {"reason": reason})

    def _notice(self, kind: str, channel: str, info: Mapping[str, Any]) -> None:
        """An event about a channel (or, with no channel, the whole run), for progress."""
        if self.on_event is not None:
            self._emit(kind, Delivery(key="", incident_id=self.incident_id, update_no=0,
                                      channel=channel, recipient="", message=_EMPTY), info)


class _Attempt:
    """The `Attempt` a channel gets: `begin()` writes the durable attempt record once."""

    __slots__ = ("begun", "delivery", "dispatcher", "number")

    def __init__(self, dispatcher: Dispatcher, delivery: Delivery) -> None:
        self.dispatcher = dispatcher
        self.delivery = delivery
        self.begun = False
        self.number = 0

    def begin(self) -> None:
        if self.begun:
            return
        self.begun = True
        dispatcher, d = self.dispatcher, self.delivery
        with dispatcher._lock:
            self.number = dispatcher._attempts[d.key] = dispatcher._attempts.get(d.key, 0) + 1
        dispatcher.audit.append("delivery.attempt", incident=dispatcher.incident_id,
                                channel=d.channel, recipient=d.recipient or None, key=d.key,
                                payload={"attempt": self.number})
        dispatcher.held.started(d, self.number)


def _err(exc: ChannelError, attempt: int) -> dict[str, Any]:
    return {"error": exc.message, "code": exc.code, "attempt": attempt}


_EMPTY = OutgoingMessage(text="")
