"""Rendering results: rich on a TTY, plain lines otherwise, one JSON envelope with --json.

The JSON envelope (documented in docs/json-output.md) is always::

    {"schema": "incident-notify/v1", "command": "<name>", "ok": bool,
     "exit_code": int, "data": {...}, "errors": [...]}

Human text goes to stderr when --json is on, so stdout holds only the document.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Any

from rich.console import Console

JSON_SCHEMA = "incident-notify/v1"


@dataclass
class OutputState:
    json: bool = False
    quiet: bool = False
    debug: bool = False


state = OutputState()


class _Console(Console):
    def on_broken_pipe(self) -> None:
        # rich would exit 1; a closed pipe (`| head`) is the reader's choice, not an error:
        # the entry point ends quietly.
        self.quiet = True
        raise BrokenPipeError


def _no_color() -> bool:
    return bool(os.environ.get("NO_COLOR"))


def _width(stream: object) -> int | None:
    """Terminals report their width; pipes and logs get $COLUMNS or 120, not rich's 80."""
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return None
    try:
        return max(60, int(os.environ.get("COLUMNS", "120")))
    except ValueError:
        return 120


def console() -> Console:
    """Where human output goes: stdout normally, stderr when stdout carries JSON."""
    stream = sys.stderr if state.json else sys.stdout
    width = _width(stream)
    # Off a terminal, long lines (error messages, paths) stay whole for grep and CI logs.
    return _Console(file=stream, no_color=_no_color(), highlight=False, width=width,
                    soft_wrap=width is not None)


def err_console() -> Console:
    width = _width(sys.stderr)
    return _Console(file=sys.stderr, no_color=_no_color(), highlight=False, width=width,
                    soft_wrap=width is not None)


def info(message: str) -> None:
    """A progress/info line for humans; silent with --quiet."""
    if not state.quiet:
        console().print(message)


def envelope(
    command: str, data: Any, *, exit_code: int = 0, errors: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    return {
        "schema": JSON_SCHEMA,
        "command": command,
        "ok": exit_code == 0,
        "exit_code": exit_code,
        "data": data,
        "errors": errors or [],
    }


def emit_json(
    command: str, data: Any, *, exit_code: int = 0, errors: list[dict[str, Any]] | None = None
) -> None:
    """Write the one JSON document of this command to stdout."""
    doc = envelope(command, data, exit_code=exit_code, errors=errors)
    sys.stdout.write(json.dumps(doc, indent=2, default=str, ensure_ascii=False) + "\n")
    sys.stdout.flush()

