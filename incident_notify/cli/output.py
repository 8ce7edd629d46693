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


_ESCAPES = None


def inert(text: object) -> str:
    """Outside text (replies, authors, contact fields, values quoted in errors) made safe to
    show on a terminal: escape sequences (CSI, OSC hyperlinks and clipboard writes, ...) and
    control characters become visible control pictures (ESC shows as ␛), bidirectional
    overrides are removed; newlines and tabs stay. Exact, yet it cannot drive the
    terminal. Rich markup is escaped separately (`safe`)."""
    import re

    global _ESCAPES
    if _ESCAPES is None:
        _ESCAPES = re.compile("[\u0000-\u0008\u000b-\u001f\u007f-\u009f]|"
                              "[\u202a-\u202e\u2066-\u2069]")
    value = str(text)

    def picture(m: re.Match[str]) -> str:
        ch = m.group(0)
        code = ord(ch)
        if code < 0x20:
            return chr(0x2400 + code)
        if code == 0x7F:
            return "\u2421"
        if 0x80 <= code <= 0x9F:
            return f"\\x{code:02x}"
        return ""

    return _ESCAPES.sub(picture, value)


def safe(text: object) -> str:
    """`inert`, then escaped for Rich markup: for outside text inside a markup string."""
    from rich.markup import escape

    return escape(inert(text))


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
                    soft_wrap=width is not None, emoji=False)


def err_console() -> Console:
    width = _width(sys.stderr)
    return _Console(file=sys.stderr, no_color=_no_color(), highlight=False, width=width,
                    soft_wrap=width is not None, emoji=False)


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

