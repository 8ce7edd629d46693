"""The channel contract: what every built-in or third-party channel implements.

A channel type (``twitter``, ``sms``, ...) is a `Channel` subclass registered in the
entry-point group ``incident_notify.channels``. A playbook names channel *instances*
(``status_twitter: {type: twitter, sender: "@acme_status"}``); each instance becomes one
object of that class, built with the instance's `ChannelSpec` and the secrets mapping.

Rules a channel follows:

* `send(delivery, attempt)` sends exactly one message to exactly one recipient (one tweet
  of a thread is one delivery) and returns a `Receipt`, or raises `TransientChannelError`
  (retry / fail over: 429, 5xx, timeouts, connection errors, SMTP 4xx) or
  `PermanentChannelError` (never retried: invalid recipient, unsubscribed, auth failure,
  over-long, duplicate).
* Exactly once: a channel calls ``attempt.begin()`` at the last moment before the request
  that can reach the provider (after user lookups, connection set-up, ``MAIL``/``RCPT``).
  That call writes the durable ``delivery.attempt`` record. A failure raised before it is
  known not to have delivered anything and is retried freely; a failure after it that may
  have reached the provider (a dropped connection, a reset, a read timeout, and a server
  error other than 503: Twilio documents that a 500 to a send may hide a message it
  sent, and a gateway's 502 or 504 may too) sets ``maybe_delivered`` and is never retried
  blindly: the delivery is "unknown" until `find_sent` (on `resume`) settles it. A 429 or
  503 says the request was not taken, and is retried.
* `find_sent(delivery, since)` asks the provider whether an in-doubt delivery arrived:
  a `Receipt` when it did, None when the provider's own records show it did not, or
  `Unknowable` when the provider cannot tell (SMTP).
* Error messages never contain a secret value: build them from the provider's error code
  and text, never from request headers or the client object's repr. A provider's text
  may quote a credential back: requests made under `bounded` have their mapped error
  passed through `hide_secrets`, and the dispatcher and the health check do the same for
  every channel's errors and details, a plugin's too.
* Heavy client libraries (tweepy, twilio, smtplib's TLS set-up) are imported inside the
  methods that need them, never at module level, to keep the CLI's start-up fast.

Long on purpose: it is the whole channel contract (deliveries, receipts, errors, options,
limits and the Channel class): a plugin author reads one file.
"""

from __future__ import annotations

import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, model_validator

from incident_notify.errors import IncidentNotifyError
from incident_notify.exit_codes import ExitCode

T = TypeVar("T")
ChannelErrorT = TypeVar("ChannelErrorT", bound="ChannelError")


# --------------------------------------------------------------------------- errors
class ChannelError(IncidentNotifyError):
    """A send or check failed. `code` is the provider's error code when there is one.

    When one reaches the command line (outside a fan-out, which records it instead) it is
    a channel problem, exit 7; a missing credential is a configuration problem, exit 12."""

    exit_code = ExitCode.CHANNEL_UNHEALTHY

    def __init__(
        self,
        message: str,
        *,
        channel: str = "",
        code: str | None = None,
        hint: str = "",
    ) -> None:
        super().__init__(message, hint)
        self.channel = channel
        self.code = code


class TransientChannelError(ChannelError):
    """Worth retrying later or on another channel (429, 5xx, timeout, connection refused).

    `retry_after` (seconds) is set when the provider said when to come back (a 429's
    ``x-rate-limit-reset``); the dispatcher then pauses the whole channel until then.
    `maybe_delivered` is True when the request may have reached the provider before the
    failure (a timeout after sending, a 500): such a delivery is "unknown", not "failed".
    `recipient_problem` is True when the deferral is about this recipient only (a mail
    server greylisting, a mailbox receiving too fast): it does not count against the
    channel's circuit, and the person's next channel is tried at once.
    """

    def __init__(
        self,
        message: str,
        *,
        channel: str = "",
        code: str | None = None,
        hint: str = "",
        retry_after: float | None = None,
        maybe_delivered: bool = False,
        recipient_problem: bool = False,
    ) -> None:
        super().__init__(message, channel=channel, code=code, hint=hint)
        self.retry_after = retry_after
        self.maybe_delivered = maybe_delivered
        self.recipient_problem = recipient_problem


class PermanentChannelError(ChannelError):
    """Do not retry this delivery on this channel.

    `opt_out` is True when the recipient has unsubscribed (Twilio 21610, replied STOP):
    the opt-out list records it. `recipient_problem` is True when the address itself is
    bad (invalid number, unknown user): the dispatcher may still try the person's next
    channel. `channel_down` is True when no delivery on this channel can succeed (the
    credentials are rejected or missing, TLS fails): the channel's circuit opens and its
    deliveries fail over.
    """

    def __init__(
        self,
        message: str,
        *,
        channel: str = "",
        code: str | None = None,
        hint: str = "",
        opt_out: bool = False,
        recipient_problem: bool = False,
        channel_down: bool = False,
        missing_credential: bool = False,
    ) -> None:
        super().__init__(message, channel=channel, code=code, hint=hint)
        self.opt_out = opt_out
        self.recipient_problem = recipient_problem
        self.channel_down = channel_down
        if missing_credential:
            self.exit_code = ExitCode.CONFIG


class Unknowable(ChannelError):
    """`find_sent` cannot tell whether a delivery arrived (the provider keeps no record we
    can query, e.g. SMTP). The delivery stays unknown; the commander decides."""


class Attempt(Protocol):
    """Handed to `Channel.send`; `begin()` writes the durable attempt record."""

    number: int
    """Which attempt of this delivery in this run `begin()` recorded (1 for the first;
    0 before it)."""

    def begin(self) -> None:
        """Call once, immediately before the request that can reach the provider."""
        ...


class NoAttempt:
    """An `Attempt` that records nothing (health checks, tools, tests of a channel)."""

    number = 0

    def begin(self) -> None:
        return None


# --------------------------------------------------------------------------- data
@dataclass(frozen=True)
class ChannelLimits:
    """What a channel accepts and how fast. Declared by the channel, used everywhere."""

    length_rule: str
    """How a message is measured: 'twitter-weighted', 'sms-segments', 'chars', 'email'."""
    max_length: int | None
    """Maximum in the rule's unit (280 weighted, 10,000 chars); None for no limit."""
    rate_per_second: float
    """Sustained sends per second (token bucket refill)."""
    burst: int = 1
    """Token bucket size: sends allowed at once after a quiet spell."""
    concurrency: int = 4
    """Requests in flight at once for one channel instance."""
    threads: bool = False
    """True when an over-long message can be split into a reply thread."""
    broadcast: bool = False
    """True for a public broadcast channel (a Twitter account): one send reaches everyone."""


@dataclass(frozen=True)
class OutgoingMessage:
    """Rendered, limit-checked content of one delivery."""

    text: str
    """Tweet / thread part / SMS / DM text, or the plain-text part of an email."""
    subject: str | None = None
    """Email subject (one line)."""
    html: str | None = None
    """Email HTML part (rendered with autoescape)."""


@dataclass(frozen=True)
class Delivery:
    """One message to one recipient on one channel instance. The unit of sending and audit."""

    key: str
    """Idempotency key: incident, update number, channel, recipient, thread part."""
    incident_id: str
    update_no: int
    channel: str
    """Channel instance name from the playbook (``status_twitter``)."""
    recipient: str
    """Address in the channel's form: E.164 phone, email, ``@handle``; '' for a broadcast."""
    message: OutgoingMessage
    contact_id: str = ""
    """The contact's id (for audit and opt-outs); '' for a broadcast."""
    audience: str = ""
    part: int = 1
    """1-based thread part; `parts` > 1 only for a tweet thread."""
    parts: int = 1
    reply_to: str | None = None
    """Provider id to thread onto: a tweet id (in_reply_to_tweet_id) or an email Message-ID."""
    thread_refs: tuple[str, ...] = ()
    """Email: earlier Message-IDs of this incident, for the References header."""
    fallback_from: str | None = None
    """Set when this delivery was re-routed from another (down) channel."""


@dataclass(frozen=True)
class Receipt:
    """What the provider said when it accepted a delivery."""

    provider_id: str
    """Tweet id, DM event id, Twilio message SID (SM...), or email Message-ID."""
    sent_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    segments: int = 1
    """SMS segments billed (Twilio num_segments); 1 otherwise."""
    detail: Mapping[str, Any] = field(default_factory=dict)
    """Extra provider facts worth auditing (status, recipient user id)."""


@dataclass(frozen=True)
class Health:
    """Result of `Channel.check`: can this channel send right now?"""

    ok: bool
    detail: str
    latency_ms: float | None = None


ENDPOINT_KEYS = ("api_base", "host", "port", "tls", "cafile", "smtp_url", "url")
"""Option names a playbook may not use: where requests (and so credentials) go is the
operator's configuration, not the playbook's."""


class ChannelOptions(BaseModel):
    """Base of each channel type's options (validated from the playbook, unknown keys refused).

    Every channel type accepts `account`: the name of an account the operator's config
    defines (``[accounts.NAME]``: endpoint, TLS, which credentials). A playbook never names
    a host or a URL: a playbook in a pull request must not decide where the credentials go.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    account: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_endpoints(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            refusal = endpoint_refusal(data)
            if refusal:
                raise ValueError(refusal)
        return data


def endpoint_refusal(options: Mapping[str, Any], env: str | None = None) -> str | None:
    """What is wrong with channel options that name an endpoint (`env`: the variable that
    sets it for the channel's type), or None."""
    found = [k for k in ENDPOINT_KEYS if k in options]
    if not found:
        return None
    where = f"{env}; docs/channels.md" if env else "docs/channels.md"
    return (f"{', '.join(found)}: endpoints are the operator's configuration, not the "
            "playbook's; name an account (account: NAME, defined under [accounts.NAME] in "
            f"the config file) or set the endpoint in the config file or environment "
            f"({where})")


@dataclass(frozen=True)
class ChannelSpec:
    """A channel instance as the playbook defines it."""

    name: str
    type: str
    sender: str = ""
    """Sender identity: the Twitter account, the From number or the From address."""
    options: Mapping[str, Any] = field(default_factory=dict)
    """Type-specific options, already validated by the class's `Options` model."""
    fallback: tuple[str, ...] = ()
    rate_per_second: float | None = None
    burst: int | None = None
    concurrency: int | None = None


def is_loopback(host: str) -> bool:
    import ipaddress

    if host in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_endpoint(url: str, channel: str) -> None:
    """An HTTP endpoint override must be https, or http towards this machine only."""
    import urllib.parse

    from incident_notify.errors import ConfigError

    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "https" and parsed.hostname:
        return
    if parsed.scheme == "http" and parsed.hostname and is_loopback(parsed.hostname):
        return
    raise ConfigError(f"channel {channel!r}: endpoint {url!r} must be https:// (plain http "
                      "only towards this machine)", hint="fix the endpoint in the config "
                      "file or environment; credentials never travel in clear")


class Channel(ABC):
    """Base class of every channel type."""

    type_name: ClassVar[str]
    """The name a playbook uses in ``type:`` (equal to the entry-point name)."""
    Options: ClassVar[type[ChannelOptions]] = ChannelOptions
    """Pydantic model of the type-specific options; unknown keys are refused."""
    default_limits: ClassVar[ChannelLimits]
    """The provider's documented limits; a playbook may lower the rate, never raise length."""
    secret_names: ClassVar[tuple[str, ...]] = ()
    """Environment variables this channel reads its credentials from."""
    api_base_env: ClassVar[str | None] = None
    """Environment variable that overrides `api_base` (the sandbox exports it)."""
    address: ClassVar[str | None] = None
    """The contact field that addresses this channel: ``phone``, ``email``, ``twitter`` (a
    handle), or None for a broadcast that reaches everyone at once (a Twitter account)."""
    preference: ClassVar[str | None] = None
    """The name people use for this channel in their ``channels`` preference and in
    opt-outs (default: the type name)."""
    threading: ClassVar[str] = ""
    """How an incident's updates hang together: ``reply`` (a broadcast replies to the last
    post: a tweet thread), ``references`` (each person's messages reference the earlier
    ones: email), or "" (none)."""
    public: ClassVar[bool] = False
    """Whatever it sends is public (a Twitter account, a status page): internal content
    never goes to it, by any path."""
    refuses_duplicates: ClassVar[bool] = False
    """The provider refuses a post identical to an earlier one (Twitter): the preflight
    stops such an update before anything is sent."""

    def __init__(self, spec: ChannelSpec, secrets: Mapping[str, str]) -> None:
        self.spec = spec
        self.name = spec.name
        self.secrets = secrets
        self.options = self.Options.model_validate(dict(spec.options))
        base = self.default_limits
        self.limits = ChannelLimits(
            length_rule=base.length_rule,
            max_length=base.max_length,
            rate_per_second=spec.rate_per_second or base.rate_per_second,
            burst=spec.burst or base.burst,
            concurrency=spec.concurrency or base.concurrency,
            threads=base.threads,
            broadcast=base.broadcast,
        )
        self._thread_local = threading.local()

    # -- helpers for subclasses
    def per_thread(self, name: str, make: Callable[[], T]) -> T:
        """One `name` per sending thread, made on first use there (HTTP clients and their
        sessions are not shared between the channel's concurrent workers)."""
        value = getattr(self._thread_local, name, None)
        if value is None:
            value = make()
            setattr(self._thread_local, name, value)
        return value

    REQUEST_DEADLINE_FACTOR: ClassVar[float] = 3.0

    def answer_timeout_s(self) -> float:
        """The channel's `timeout_s` (20 s unless set): how long a sender waits on each
        socket operation for the provider's answer."""
        return float(getattr(self.options, "timeout_s", 20.0))

    def request_deadline_s(self) -> float:
        """The most one request may take, whole (connecting, sending, reading the answer):
        three times `answer_timeout_s`, which bounds each socket operation only."""
        return self.REQUEST_DEADLINE_FACTOR * self.answer_timeout_s()

    def bounded(self, provider: str, *, maybe_delivered: bool,
                mapped: Callable[[Exception], ChannelError]) -> _Bounded:
        """`with` this around one request (through clients made with `_deadline.mount`):
        it must end within `request_deadline_s`. An error it raises becomes `mapped(error)`,
        or, once the deadline passed and shut its connections down, `deadline_passed`."""
        return _Bounded(self, provider, maybe_delivered, mapped)

    def deadline_passed(self, provider: str, seconds: float,
                        maybe_delivered: bool) -> TransientChannelError:
        """A request cut by its deadline: a timeout, unknown if the request may have reached
        the provider (`maybe_delivered`), retried freely if not."""
        return TransientChannelError(
            f"{self.name}: {provider} did not finish answering within {seconds:.0f}s",
            channel=self.name, code="timeout", maybe_delivered=maybe_delivered)

    def api_base(self, default: str) -> str:
        """The base URL requests go to: the operator's override (environment, config file
        or the channel's account, as the runtime resolved it into `secrets`), else the
        provider's official `default`. An override must be HTTPS unless it is this
        machine: credentials never travel in clear to another host."""
        value = (self.secrets.get(self.api_base_env) if self.api_base_env else None) \
            or (os.environ.get(self.api_base_env) if self.api_base_env else None)
        if not value:
            return default
        check_endpoint(value, self.name)
        return value.rstrip("/")

    def endpoint(self) -> str:
        """Where this channel's requests go (shown in the preflight)."""
        return ""

    def hide_secrets(self, err: ChannelErrorT) -> ChannelErrorT:
        """`err` with any of the channel's credentials removed from its text: providers
        quote them back (a relay names the login it refuses, Twilio's 404 the account's
        path), and the text goes to the terminal and into the audit log."""
        message, hint = self.hide_secrets_in(err.message), self.hide_secrets_in(err.hint)
        if (message, hint) != (err.message, err.hint):
            err.message, err.hint, err.args = message, hint, (message,)
        return err

    def hide_secrets_in(self, text: str) -> str:
        for name in self.secret_names:
            value = self.secrets.get(name) or os.environ.get(name) or ""
            if len(value) >= 4:
                text = text.replace(value, "(hidden)")
        return text

    def secret(self, name: str) -> str:
        """A credential by env-var name; a clear error naming the variable when missing."""
        value = self.secrets.get(name) or os.environ.get(name)
        if not value:
            raise PermanentChannelError(
                f"channel {self.name!r} ({self.type_name}) needs the credential {name}, "
                "which is not set",
                channel=self.name,
                code="missing-credential",
                hint=f"export {name}=... or put it in the secrets file (--secrets FILE); "
                "for a rehearsal use --sandbox",
                channel_down=True,
                missing_credential=True,
            )
        return value

    # -- the contract
    @abstractmethod
    def send(self, delivery: Delivery, attempt: Attempt) -> Receipt:
        """Send one delivery; raise Transient/PermanentChannelError on failure.

        Call ``attempt.begin()`` right before the request that can reach the provider.
        """

    @classmethod
    def preference_name(cls) -> str | None:
        """The preference and opt-out name of a per-person channel; None for a broadcast."""
        return (cls.preference or cls.type_name) if cls.address else None

    def find_sent(self, delivery: Delivery, since: datetime) -> Receipt | None:
        """After a crash or a dropped connection: did `delivery` (attempted at or after
        `since`) reach the provider? A Receipt if so, None if the provider's records show it
        did not; raise `Unknowable` when the provider cannot say (the default)."""
        raise Unknowable(f"{self.name}: {self.type_name} cannot look up sent messages",
                         channel=self.name, code="unknowable")

    def preload(self) -> None:  # noqa: B027 - optional hook
        """Import the client library (called before the health check's deadline starts, so
        the deadline measures the provider, not our imports)."""

    @abstractmethod
    def check(self) -> Health:
        """Verify credentials and reachability without sending anything."""

    def close(self) -> None:  # noqa: B027 - optional hook, most channels hold nothing
        """Release connections (SMTP keeps one open for many recipients)."""


class _Bounded:
    """`Channel.bounded`: a `_deadline.Deadline` that maps the request's error."""

    __slots__ = ("channel", "deadline", "mapped", "maybe_delivered", "provider")

    def __init__(self, channel: Channel, provider: str, maybe_delivered: bool,
                 mapped: Callable[[Exception], ChannelError]) -> None:
        from incident_notify.channels._deadline import Deadline

        self.channel, self.provider, self.maybe_delivered = channel, provider, maybe_delivered
        self.mapped = mapped
        self.deadline = Deadline(channel.request_deadline_s())

    def __enter__(self) -> None:
        self.deadline.__enter__()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        self.deadline.__exit__()
        if not isinstance(exc, Exception):
            return
        if self.deadline.expired:
            raise self.channel.deadline_passed(self.provider, self.deadline.seconds,
                                               self.maybe_delivered) from None
        raise self.channel.hide_secrets(self.mapped(exc)) from None
