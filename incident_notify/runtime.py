"""What every command needs around the core: settings, secrets, the audit log, the sandbox,
channel instances built from a playbook, and their health."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from incident_notify.channels.base import Channel, Health
from incident_notify.config import Settings, load_secrets
from incident_notify.flow import RetryPolicy
from incident_notify.playbook import Playbook

if TYPE_CHECKING:
    from collections.abc import Iterable

    from incident_notify.audit import AuditLog
    from incident_notify.render import Renderer


class Rehearsal(Protocol):
    """The sandbox as the core sees it: the emulators' environment, and a way to stop."""

    def env(self) -> dict[str, str]: ...

    def stop(self) -> None: ...

    def remember_tweets(self, tweet_ids: Iterable[str]) -> None: ...


@dataclass
class Runtime:
    """Everything a command needs that outlives one call: settings, secrets, log."""

    settings: Settings
    secrets: dict[str, str]
    audit: AuditLog
    sandbox: Rehearsal | None = None
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    rate_override: float | None = None
    """Sandbox runs send as fast as the emulators allow, not at the providers' rates."""
    renderers: dict[str, Renderer] = field(default_factory=dict)
    """One template renderer per playbook for the command (its compiled-template cache)."""

    def renderer(self, pb: Playbook) -> Renderer:
        from incident_notify.messages import make_renderer

        key = str(pb.path)
        if key not in self.renderers:
            self.renderers[key] = make_renderer(pb)
        return self.renderers[key]

    def close(self) -> None:
        if self.sandbox is not None:
            self.sandbox.stop()
            self.sandbox = None


def open_runtime(settings: Settings, *, sandbox: Rehearsal | None = None) -> Runtime:
    from incident_notify.audit import AuditLog

    secrets = load_secrets(settings)
    redact = secrets.get("INCIDENT_NOTIFY_AUDIT_REDACT_KEY") if settings.redact_recipients else None
    if settings.redact_recipients and not redact:
        from incident_notify.errors import ConfigError

        raise ConfigError("redact_recipients is on but INCIDENT_NOTIFY_AUDIT_REDACT_KEY is "
                          "not set", hint="set the key in the environment or secrets file")
    log = AuditLog(settings.audit_path(),
                   redact_key=redact.encode() if redact else None)
    rt = Runtime(settings=settings, secrets=secrets, audit=log)
    if settings.sandbox or sandbox is not None:
        from incident_notify.sandbox import Sandbox

        sb = sandbox or Sandbox.attach_or_start()
        rt.sandbox = sb
        rt.secrets = {**secrets, **sb.env()}
        rt.rate_override = 200.0
    return rt


def channel_environment(rt: Runtime, channel_type: type[Channel],
                        options: Mapping[str, Any]) -> dict[str, str]:
    """What a channel reads its endpoint and credentials from. The environment (and the
    secrets file) first, then endpoints from the config file; a channel that names an
    account gets that account's endpoints and its credentials read under the account's
    prefix. In the sandbox only the emulators' own endpoints and credentials apply."""
    from incident_notify.errors import ConfigError

    env = dict(rt.secrets)
    if rt.sandbox is not None:
        return env
    for variable, value in rt.settings.endpoints.items():
        env.setdefault(variable, value)
    account = options.get("account")
    if account:
        table = rt.settings.accounts.get(str(account))
        if table is None:
            raise ConfigError(f"account {account!r} is not defined",
                              hint=f"add [accounts.{account}] to the config file "
                              "(incident-notify config show lists the accounts)")
        env.update({k: v for k, v in table.items() if k != "credentials_prefix"})
        prefix = table.get("credentials_prefix")
        if prefix:
            for name in channel_type.secret_names:
                env[name] = rt.secrets.get(prefix + name, "")
    return env


def build_channels(rt: Runtime, pb: Playbook, names: list[str]) -> dict[str, Channel]:
    from dataclasses import replace

    from incident_notify.channels import channel_class
    from incident_notify.channels.base import is_loopback
    from incident_notify.errors import ConfigError

    out: dict[str, Channel] = {}
    for name in names:
        spec = pb.channel_spec(name)
        if rt.rate_override is not None and spec.rate_per_second is None:
            spec = replace(spec, rate_per_second=rt.rate_override, burst=50)
        cls = channel_class(spec.type)
        channel = out[name] = cls(spec, channel_environment(rt, cls, spec.options))
        if rt.sandbox is not None:
            import urllib.parse

            host = urllib.parse.urlparse(channel.endpoint()).hostname
            if host and not is_loopback(host):
                raise ConfigError(f"channel {name!r} would reach {host} during a rehearsal",
                                  hint="a sandbox run or drill only talks to this machine")
    return out


HEALTH_DEADLINE_S = 8.0
"""The whole pre-send health check ends within this: a provider that has not answered by
then is down for this update (its circuit opens and its audiences fail over)."""


def check_health(channels: Mapping[str, Channel],
                 deadline_s: float = HEALTH_DEADLINE_S) -> dict[str, Health]:
    """Run every channel's check() concurrently, all within `deadline_s`. A check that
    raises, or has not answered by the deadline, is an unhealthy result, never an error.
    Checks run in daemon threads: one that hangs is abandoned, and cannot hold up the
    command or its exit."""
    if not channels:
        return {}
    for ch in channels.values():
        try:
            ch.preload()
        except Exception:
            pass  # the check itself reports a broken client
    results: dict[str, Health] = {}
    lock = threading.Lock()
    ends = time.monotonic() + deadline_s

    def one(name: str, ch: Channel) -> None:
        # One retry: a single dropped request must not fail a whole update over.
        health = Health(ok=False, detail="not checked")
        for attempt in range(2):
            if attempt:
                if time.monotonic() + 0.5 >= ends:
                    break
                time.sleep(0.5)
            try:
                health = ch.check()
            except Exception as exc:  # a failing check is a result, not a crash
                health = Health(ok=False, detail=getattr(exc, "message", None)
                                or type(exc).__name__)
            if health.ok:
                break
        with lock:
            results[name] = health

    threads = [threading.Thread(target=one, args=(name, ch), name=f"check-{name}",
                                daemon=True) for name, ch in channels.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, ends - time.monotonic()))
    with lock:
        return {name: results.get(name) or Health(
            ok=False, detail=f"no answer within {deadline_s:.0f}s")
            for name in channels}
