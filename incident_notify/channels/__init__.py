"""Channel registry: built-in and third-party channel types through entry points."""

from __future__ import annotations

from functools import cache
from importlib.metadata import entry_points

from incident_notify.channels.base import Channel
from incident_notify.errors import ConfigError

GROUP = "incident_notify.channels"

# The built-ins are registered as entry points in pyproject.toml like any plugin; this
# table is the fallback when the package runs from a source tree that was never installed.
_BUILTIN = {
    "twitter": "incident_notify.channels.twitter:TwitterChannel",
    "twitter_dm": "incident_notify.channels.twitter_dm:TwitterDMChannel",
    "sms": "incident_notify.channels.sms:SMSChannel",
    "email": "incident_notify.channels.email:EmailChannel",
}


@cache
def available_types() -> dict[str, str]:
    """Channel type name -> 'module:Class' for every registered channel type."""
    found = dict(_BUILTIN)
    for ep in entry_points(group=GROUP):
        found[ep.name] = ep.value
    return found


def channel_class(type_name: str) -> type[Channel]:
    """Load the class for a channel type; an unknown type names the valid ones."""
    target = available_types().get(type_name)
    if target is None:
        valid = ", ".join(sorted(available_types()))
        raise ConfigError(
            f"unknown channel type {type_name!r}",
            hint=f"valid channel types are: {valid}",
        )
    module_name, _, attr = target.partition(":")
    import importlib

    module = importlib.import_module(module_name)
    cls: type[Channel] = getattr(module, attr)
    return cls
