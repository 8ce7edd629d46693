"""The console script's own streams and signals: what a closed pipe, a full disk, a
terminal that hung up or a runbook's `timeout` does to a command.

The rule: the display never decides a send. Once the commander confirmed, a send goes on
to the end whatever becomes of its output, and its exit code says who was reached. Before
that, and in every other command, results that cannot be written are an error (an export
to a full disk is not a success), and a stopped command says so.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import IO, Any, cast

from incident_notify.cli.environment import Environment, is_utf8
from incident_notify.errors import ConfigError


def silence(stream: Any) -> None:
    """Point the stream's file descriptor at /dev/null (writes after a reader went away,
    Python's own flush at exit included, then go nowhere)."""
    try:
        _to_devnull([stream.fileno()])
    except (OSError, ValueError):
        pass


def _to_devnull(fds: list[int]) -> None:
    """Each of `fds` now leads to /dev/null (writes vanish, reads get end of input)."""
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        for fd in fds:
            try:
                os.dup2(devnull, fd)
            except OSError:
                pass
    finally:
        os.close(devnull)


class Guarded:
    """stdout or stderr that its reader or its disk cannot turn into a crash.

    * A closed reader (`| head`, a log shipper that died): writes are dropped quietly, the
      command carries on and its own exit code stands.
    * Any other failure (a full disk, an I/O error): on stderr, dropped (diagnostics are
      best effort); on stdout, the command's results, a `ConfigError` naming it, unless a
      confirmed send is under way (`tolerate`), which goes on with its output dropped.
    """

    def __init__(self, stream: Any, name: str, *, results: bool) -> None:
        self._stream = stream
        self.name = name
        self.results = results
        self.broken = False
        self.failed: OSError | None = None
        self.tolerate = _never

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return int(self._stream.write(text))
            except OSError as exc:
                self._fail(exc)
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self._stream.flush()
            except OSError as exc:
                self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        self.broken = True
        silence(self._stream)
        if isinstance(exc, BrokenPipeError):
            return
        self.failed = exc
        if self.results and not self.tolerate():
            raise ConfigError(f"cannot write the output ({self.name}): "
                              f"{exc.strerror or type(exc).__name__}",
                              hint="free space on its disk, or send it elsewhere")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _never() -> bool:
    return False


def guarded_environment() -> Environment:
    """The process's streams, guarded, in an Environment; Ctrl-C, SIGTERM and SIGHUP
    handled."""
    for stream in (sys.stdout, sys.stderr):
        # A terminal or pipe that cannot show every character (PYTHONIOENCODING=ascii, a
        # Latin-1 locale) gets '?' for those, never a crash half-way through a summary.
        if not is_utf8(stream) and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    if not isinstance(sys.stdout, Guarded):  # click's own help and usage text too
        sys.stdout = Guarded(sys.stdout, "stdout", results=True)
    if not isinstance(sys.stderr, Guarded):  # diagnostics, progress, the preflight
        sys.stderr = Guarded(sys.stderr, "stderr", results=False)
    env = Environment(stdout=cast("IO[str]", sys.stdout), stderr=cast("IO[str]", sys.stderr))
    sys.stdout.tolerate = lambda: env.send_confirmed
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # (not ignored)
        signal.signal(signal.SIGINT, lambda signum, frame: _interrupt(env, signum))
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: _interrupt(env, signum))
    if signal.getsignal(signal.SIGHUP) is signal.SIG_DFL:  # (nohup ignores it: left so)
        terminal = [fd for fd in (0, 1, 2) if os.isatty(fd)]  # (a hung-up one says no)
        signal.signal(signal.SIGHUP, lambda signum, frame: _hung_up(env, terminal))
    return env


def finish(env: Environment, code: int) -> int:
    """The exit code once the results are flushed: results that could not be written
    (outside a confirmed send) make a successful command an error; a confirmed send keeps
    its code (who was reached), and says on stderr that its output was lost."""
    try:
        env.stdout.flush()
    except ConfigError as exc:
        env.err_console().print(f"error: {exc.message}\n  hint: {exc.hint}", markup=False,
                                highlight=False)
        return code or int(exc.exit_code)
    failed = getattr(env.stdout, "failed", None)
    if failed is not None and env.send_confirmed:
        env.err_console().print(
            f"warning: the output could not be written (stdout: {failed.strerror}); the send "
            f"went on: its exit code says who was reached, and `incident-notify status` "
            f"shows it", markup=False, highlight=False)
    return code


def _interrupt(env: Environment, signum: int) -> None:
    """Ctrl-C, and SIGTERM (a runbook's timeout, a service manager, a CI job cancelled),
    which stops a command as Ctrl-C does: what is in flight is recorded, the summary
    printed, exit 130. Noted, so that a command stopped before it could say so is said to
    be (`interrupted`)."""
    env.interrupted = True
    raise KeyboardInterrupt(f"signal {signum}")


def interrupted(env: Environment, command: str) -> None:
    """Say that the command was stopped, when it did not say so itself (Typer turns an
    interrupt that leaves a command into a silent exit 130); under --json, in the one
    document a script reads too."""
    if not env.interrupted or env.reported:
        return
    text = ("interrupted: nothing more is sent. What went out is on record: incident-notify "
            "status shows it, and incident-notify resume ID sends the rest."
            if env.send_confirmed else "interrupted: nothing was sent.")
    if env.json:
        try:
            env.emit_json(command, None, exit_code=130,
                          errors=[{"message": text, "hint": None}])
        except ConfigError:
            pass  # (stdout cannot take it: the exit code still says)
    env.err_console().print(text, markup=False, highlight=False)


def _hung_up(env: Environment, terminal: list[int]) -> None:
    """SIGHUP: the commander's terminal went away (an SSH session dropped, a window
    closed). Writing to it would fail, so its streams now lead to /dev/null (reading gets
    end of input: a question is answered no). A send the commander confirmed goes on to
    the end, recorded as always, where `status` and `timeline` show it: a dropped
    connection must not leave the customers half-told. Anything else stops as Ctrl-C
    stops it."""
    _to_devnull(terminal)
    if not env.send_confirmed:
        env.interrupted = True
        raise KeyboardInterrupt("signal 1 (the terminal hung up)")
