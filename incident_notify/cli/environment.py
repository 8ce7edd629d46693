"""The environment a command runs in: its streams, the process environment and the output
mode. Created once by the entry point (`main.run` for the process, `main.invoke` for a
caller that brings its own streams, such as the tests) and handed to every command through
the Click context; nothing here is module-level state.

In the spirit of httpie's `Environment`: a command asks the environment where results go
(`console`, `emit_json`), where diagnostics go (`err_console`), whether it may ask a
question (`interactive`) or draw live progress (`live`), and what `NO_COLOR` and the
width say.
"""

from __future__ import annotations

import json as jsonlib
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import IO, Any

import typer
from rich.console import Console

from incident_notify.cli.output import envelope


class _Console(Console):
    def on_broken_pipe(self) -> None:
        # rich would exit 1; a closed pipe (`| head`) is the reader's choice, not an error:
        # the entry point ends quietly.
        self.quiet = True
        raise BrokenPipeError


def _isatty(stream: object) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if isatty is not None else False
    except (OSError, ValueError):
        return False


def is_utf8(stream: Any) -> bool:
    """Whether `stream` can carry every character (its encoding is UTF-8)."""
    return str(getattr(stream, "encoding", "") or "utf-8").lower().replace("-", "") \
        in ("utf8", "utf8sig")


@dataclass
class Environment:
    """Streams, environment variables and output mode of one command run."""

    stdin: IO[str] = field(default_factory=lambda: sys.stdin)
    stdout: IO[str] = field(default_factory=lambda: sys.stdout)
    stderr: IO[str] = field(default_factory=lambda: sys.stderr)
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)
    json: bool = False
    """Results are one JSON document on stdout; human text goes to stderr."""
    quiet: bool = False
    debug: bool = False
    send_confirmed: bool = False
    """The commander confirmed a send in this command: neither its output failing nor its
    terminal hanging up stops it or changes its exit code, which says who was reached."""
    interrupted: bool = False
    """Ctrl-C, SIGTERM or a hang-up reached the command."""
    reported: bool = False
    """The command printed its own outcome (a send's summary says it was interrupted)."""

    # -- what the environment says
    @property
    def no_color(self) -> bool:
        return bool(self.environ.get("NO_COLOR"))

    def interactive(self) -> bool:
        """A person can be asked: stdin and stdout are both a terminal."""
        return _isatty(self.stdin) and _isatty(self.stdout)

    def results_on_terminal(self) -> bool:
        """Human results (stdout, or stderr under --json) are shown on a terminal."""
        return _isatty(self.stderr if self.json else self.stdout)

    def live(self) -> bool:
        """Live progress bars may be drawn: stderr is a terminal, colour is allowed and
        neither --json nor --quiet asked for quiet output."""
        return (_isatty(self.stderr) and not self.no_color and not self.json
                and not self.quiet)

    def _width(self, stream: object) -> int | None:
        """Terminals report their width; pipes and logs get $COLUMNS or 120, not rich's
        80."""
        if _isatty(stream):
            return None
        try:
            return max(60, int(self.environ.get("COLUMNS", "120")))
        except ValueError:
            return 120

    def _console(self, stream: IO[str]) -> Console:
        width = self._width(stream)
        # Off a terminal, long lines (error messages, paths) stay whole for grep and CI
        # logs. NO_COLOR or a non-terminal: no colour, no bold, no escape sequences.
        plain = self.no_color or not (_isatty(stream) or self.environ.get("FORCE_COLOR"))
        return _Console(file=stream, no_color=self.no_color, highlight=False, width=width,
                        soft_wrap=width is not None, emoji=False,
                        color_system=None if plain else "auto",
                        force_terminal=False if plain else None)

    # -- where output goes
    def console(self) -> Console:
        """Where human results go: stdout normally, stderr when stdout carries JSON."""
        return self._console(self.stderr if self.json else self.stdout)

    def err_console(self) -> Console:
        """Diagnostics: warnings, failover notes, progress, errors."""
        return self._console(self.stderr)

    def emit_json(self, command: str, data: Any, *, exit_code: int = 0,
                  errors: list[dict[str, Any]] | None = None) -> None:
        """Write the one JSON document of this command to stdout."""
        doc = envelope(command, data, exit_code=exit_code, errors=errors)
        # (A stream that cannot carry every character gets \u escapes: the same JSON.)
        self.stdout.write(jsonlib.dumps(doc, indent=2, default=str,
                                        ensure_ascii=not is_utf8(self.stdout)) + "\n")
        self.stdout.flush()

    def ask(self, prompt: str) -> str:
        """One line from the person at the terminal; end of input (Ctrl-D) is ''."""
        self.stdout.write(prompt)
        self.stdout.flush()
        _wait_for_input(self.stdin)
        line = self.stdin.readline()
        return line.rstrip("\n") if line else ""


def _wait_for_input(stream: Any) -> None:
    """Until `stream` has something to read, in short waits. The kernel may hand Ctrl-C or
    SIGTERM to any of the process's threads, and Python runs signal handlers only in the
    main thread, once it runs again: blocked in a read, it would sit at the question until
    Enter, the interrupt unheard."""
    import select

    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return  # (not a file: nothing to wait on)
    while True:
        try:
            if select.select([fd], [], [], 0.2)[0]:
                return
        except (OSError, ValueError):
            return


def environment(ctx: typer.Context) -> Environment:
    """The environment of the running command (set up by the entry point)."""
    env = ctx.find_object(Environment)
    if env is None:  # invoked without our entry point (e.g. Typer's own test runner)
        env = ctx.ensure_object(Environment)
    return env
