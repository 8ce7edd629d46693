"""Channel instances for one command: where each channel's requests go and which
credentials it uses (the environment, the secrets file, the config's endpoints and
accounts; in a rehearsal only the emulators), built once per command; and the pre-send
health check of all of them together, within one deadline."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from incident_notify.channels.base import Channel, Health
from incident_notify.playbook import Playbook
from incident_notify.runtime import Runtime


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


def check_health(channels: Mapping[str, Channel], deadline_s: float = HEALTH_DEADLINE_S,
                 retry_after_s: float = 0.5) -> dict[str, Health]:
    """Run every channel's check() concurrently, all within `deadline_s`. A check that
    raises, or has not answered by the deadline, is an unhealthy result, never an error.
    Checks run in daemon threads: one that hangs is abandoned, and cannot hold up the
    command or its exit."""
    return start_health_checks(channels, deadline_s, retry_after_s)()


def start_health_checks(channels: Mapping[str, Channel],
                        deadline_s: float = HEALTH_DEADLINE_S,
                        retry_after_s: float = 0.5) -> Callable[[], dict[str, Health]]:
    """`check_health` started: the checks run while the caller goes on (planning, say);
    the function returned waits for them, within the same deadline, and gives the
    results."""
    if not channels:
        return dict
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
                if time.monotonic() + retry_after_s >= ends:
                    break
                time.sleep(retry_after_s)
            try:
                health = ch.check()
            except Exception as exc:  # a failing check is a result, not a crash
                health = Health(ok=False, detail=getattr(exc, "message", None)
                                or type(exc).__name__)
            if health.ok:
                break
        # (Whatever a channel, a plugin's too, says of itself is shown and recorded.)
        health = replace(health, detail=ch.hide_secrets_in(health.detail or ""))
        with lock:
            results[name] = health

    threads = [threading.Thread(target=one, args=(name, ch), name=f"check-{name}",
                                daemon=True) for name, ch in channels.items()]
    for t in threads:
        t.start()

    def wait() -> dict[str, Health]:
        for t in threads:
            t.join(max(0.0, ends - time.monotonic()))
        with lock:
            return {name: results.get(name) or Health(
                ok=False, detail=f"no answer within {deadline_s:.0f}s")
                for name in channels}

    return wait
