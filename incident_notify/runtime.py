"""What a command runs the core with: settings, secrets, the audit log, the sandbox (a
rehearsal), the retry policy and one template renderer per playbook. Channel instances are
built from it in channel_setup.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from incident_notify.config import Settings, load_secrets
from incident_notify.flow import RetryPolicy

if TYPE_CHECKING:
    from collections.abc import Iterable

    from incident_notify.audit import AuditLog
    from incident_notify.playbook import Playbook
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
    health_retry_s: float = 0.5
    """Pause before a failed health check's one retry (a rehearsal's emulators answer at
    once: it waits a tenth of that)."""
    renderers: dict[str, Renderer] = field(default_factory=dict)
    """One template renderer per playbook for the command (its compiled-template cache)."""

    def renderer(self, pb: Playbook) -> Renderer:
        from incident_notify.messages import make_renderer

        key = str(pb.path)
        if key not in self.renderers:
            self.renderers[key] = make_renderer(pb)
        return self.renderers[key]

    def continuing(self, tweet_ids: Iterable[str]) -> None:
        """An update continues these public threads. A rehearsal started afresh for this
        command learns them, so replies to them are accepted as the real API accepts
        replies to existing posts; against the real providers there is nothing to do."""
        if self.sandbox is not None:
            self.sandbox.remember_tweets(tweet_ids)

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
        rt.health_retry_s = 0.05
    return rt
