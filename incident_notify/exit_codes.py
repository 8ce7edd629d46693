"""Process exit codes. Documented in docs/exit-codes.md; keep the two in step."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    """Everything asked for was done: every delivery reached its recipient on some channel."""
    ERROR = 1
    """An unexpected error (a bug): rerun with --debug and report it."""
    USAGE = 2
    """The command line was wrong (unknown option, missing argument, bad --set)."""
    INVALID_PLAYBOOK = 3
    """A playbook, template or variables file is invalid (schema, YAML, Jinja, limits)."""
    INVALID_CONTACTS = 4
    """A contacts source has invalid records or columns, or cannot be read, or an audience
    selects nobody (validate, contacts check; a send or a planning resume refuses)."""
    PARTIAL_DELIVERY = 5
    """Some deliveries did not reach their recipient on any channel (see the summary)."""
    DELIVERY_FAILED = 6
    """No delivery succeeded at all."""
    CHANNEL_UNHEALTHY = 7
    """`channels check` found a required channel down or its credentials rejected."""
    AUDIT_INVALID = 8
    """The audit log failed verification (tampered, reordered, torn), or cannot be written."""
    NOT_FOUND = 9
    """The incident, playbook or stage named does not exist."""
    STATE_CONFLICT = 10
    """The request does not fit the incident's state (e.g. updating a resolved incident)."""
    ABORTED = 11
    """The commander declined the confirmation, or no TTY and no --yes."""
    CONFIG = 12
    """Configuration or credentials problem (config file, secrets file, missing env var), or a
    path given cannot be read or written."""
    INTERRUPTED = 130
    """Stopped by Ctrl-C or SIGTERM; the summary says what was sent and what is unknown."""
