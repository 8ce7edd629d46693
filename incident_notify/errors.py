"""One exception hierarchy. Every error carries a user-facing message and a hint.

The CLI turns these into one paragraph on stderr and the matching exit code
(`incident_notify.cli.main`); nothing else in the code prints errors.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from incident_notify.exit_codes import ExitCode


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an input file, pointing at the place to fix."""

    file: str
    line: int | None
    column: int | None
    message: str
    hint: str = ""

    def location(self) -> str:
        loc = self.file
        if self.line is not None:
            loc += f":{self.line}"
            if self.column is not None:
                loc += f":{self.column}"
        return loc

    def __str__(self) -> str:
        text = f"{self.location()}: {self.message}"
        if self.hint:
            text += f" (hint: {self.hint})"
        return text

    def to_dict(self) -> dict[str, object]:
        return {
            "file": self.file,
            "line": self.line,
            "column": self.column,
            "message": self.message,
            "hint": self.hint,
        }


class InvalidField(ValueError):
    """One field of one record is wrong; the loader turns it into a Problem at its line."""

    def __init__(self, field_name: str, problem: str, hint: str = "") -> None:
        super().__init__(f"{field_name}: {problem}")
        self.field_name = field_name
        self.problem = problem
        self.hint = hint


class IncidentNotifyError(Exception):
    """Base of every error the tool reports to a user."""

    exit_code: ExitCode = ExitCode.ERROR

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(IncidentNotifyError):
    exit_code = ExitCode.USAGE


class ConfigError(IncidentNotifyError):
    exit_code = ExitCode.CONFIG


class NotFoundError(IncidentNotifyError):
    exit_code = ExitCode.NOT_FOUND


def did_you_mean(word: object, choices: Iterable[object]) -> str:
    """" (did you mean 'x'?)" when one of `choices` is a likely spelling of `word`; ""."""
    from difflib import get_close_matches

    found = get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.75)
    return f" (did you mean {found[0]!r}?)" if found else ""


def no_incident(incident: str, log: object) -> NotFoundError:
    """The one wording for an incident the audit log does not hold."""
    return NotFoundError(f"no incident {incident!r} in {log}",
                         hint="run 'incident-notify status --all' to list incidents, or pass "
                         "--audit-log if it was recorded elsewhere")


class StateError(IncidentNotifyError):
    exit_code = ExitCode.STATE_CONFLICT


class AbortedError(IncidentNotifyError):
    exit_code = ExitCode.ABORTED


class AuditError(IncidentNotifyError):
    exit_code = ExitCode.AUDIT_INVALID


class ProblemsError(IncidentNotifyError):
    """Many located problems at once (a playbook or contacts file): all are reported."""

    exit_code = ExitCode.INVALID_PLAYBOOK

    def __init__(self, problems: Sequence[Problem], message: str = "", hint: str = "") -> None:
        self.problems = list(problems)
        summary = message or f"{len(self.problems)} problem(s) found"
        super().__init__(summary, hint)

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems) or self.message


class PlaybookError(ProblemsError):
    exit_code = ExitCode.INVALID_PLAYBOOK


class TemplateError(PlaybookError):
    """A template failed to compile or render (syntax, undefined variable, sandbox)."""


class LimitError(PlaybookError):
    """A rendered message does not fit its channel (too long, too many SMS segments)."""


class ContactsError(ProblemsError):
    exit_code = ExitCode.INVALID_CONTACTS
