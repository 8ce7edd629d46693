"""Pure helpers for what commands print: inert outside text and the JSON envelope.
Where output goes (streams, mode, width, colour) is the `Environment`'s business.

The JSON envelope (documented in docs/json-output.md) is always::

    {"schema": "incident-notify/v1", "command": "<name>", "ok": bool,
     "exit_code": int, "data": {...}, "errors": [...]}

Human text goes to stderr when --json is on, so stdout holds only the document.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import re

JSON_SCHEMA = "incident-notify/v1"


@functools.cache
def _escapes() -> re.Pattern[str]:
    import re

    return re.compile("[\u0000-\u0008\u000b-\u001f\u007f-\u009f]|"
                      "[\u202a-\u202e\u2066-\u2069]")


def inert(text: object) -> str:
    """Outside text (replies, authors, contact fields, values quoted in errors) made safe to
    show on a terminal: escape sequences (CSI, OSC hyperlinks and clipboard writes, ...) and
    control characters become visible control pictures (ESC shows as ␛), bidirectional
    overrides are removed; newlines and tabs stay. Exact, yet it cannot drive the
    terminal. Rich markup is escaped separately (`safe`)."""

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

    return _escapes().sub(picture, value)


def safe(text: object) -> str:
    """`inert`, then escaped for Rich markup: for outside text inside a markup string."""
    from rich.markup import escape

    return escape(inert(text))


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
