"""Sandboxed Jinja2 rendering with StrictUndefined: a missing variable is an error, never a
blank in a public tweet, and a template cannot reach Python internals.

Errors become `TemplateError` problems with absolute positions: an inline template that
starts on line 27 of a playbook reports its own line 2 as line 28 of the playbook.

Templates stay in their room and do bounded work: files load only from the template
folders (no symlink out of them, only template suffixes, so no contacts, secrets or
playbooks can be included), the sandbox refuses string and number operations that would
build more than `MAX_OUTPUT` characters, and a render that runs longer than `MAX_RENDER_S`
is stopped.

Long on purpose: the Jinja sandbox (its limits, the watchdog, the loader's room) and the
locating of template errors are one security boundary, kept in one file so it can be
reviewed in one read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from incident_notify.errors import Problem, TemplateError

if TYPE_CHECKING:
    from jinja2 import Environment


def _utc(value: Any) -> str:
    """Format a datetime or ISO string as 'YYYY-MM-DD HH:MM UTC'."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return value
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M UTC")
    return str(value)


MAX_OUTPUT = 100_000
"""Characters one template may produce, and the largest string or number it may build."""
MAX_RENDER_S = 1.0
TEMPLATE_SUFFIXES = (".j2", ".jinja", ".jinja2", ".tmpl")


class RenderLimit(Exception):
    """A template asked for more work than a message can need."""


def _check_size(value: Any) -> Any:
    if isinstance(value, str | bytes | list | tuple) and len(value) > MAX_OUTPUT:
        raise RenderLimit(f"would build {len(value):,} characters (limit {MAX_OUTPUT:,})")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**15:
        raise RenderLimit("would build a number larger than 10^15")
    return value


def _bounded_args(args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_OUTPUT:
            raise RenderLimit(f"argument {a:,} is larger than {MAX_OUTPUT:,}")


def _guard_filter(fn: Any) -> Any:
    from functools import wraps

    @wraps(fn)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        _bounded_args(args[1:], kwargs)
        return _check_size(fn(*args, **kwargs))

    return guarded


def _make_loader(dirs: Sequence[Path]) -> Any:
    import os

    from jinja2 import BaseLoader, TemplateNotFound

    roots = [d.resolve() for d in dirs]

    class RoomLoader(BaseLoader):
        """Templates from `roots` only: resolved (symlinks followed) they must still lie
        inside the root they were found in, be regular files and end in a template
        suffix."""

        def get_source(self, environment: Any, template: str) -> tuple[str, str, Any]:
            from incident_notify.files import InputFileError, read_input

            if not template.endswith(TEMPLATE_SUFFIXES) or "\x00" in template:
                raise TemplateNotFound(template)
            for root in roots:
                candidate = (root / template).resolve()
                if not candidate.is_relative_to(root) or not candidate.is_file():
                    continue
                try:
                    source = read_input(candidate).decode("utf-8")
                except (InputFileError, OSError, UnicodeDecodeError):
                    continue
                mtime = os.path.getmtime(candidate)
                return source, str(candidate), \
                    lambda c=candidate, m=mtime: os.path.getmtime(c) == m
            raise TemplateNotFound(template)

    return RoomLoader()


def _make_env(dirs: Sequence[Path], autoescape: bool) -> Environment:
    from jinja2 import StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    class Sandboxed(SandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+", "%", "//", "<<"})

        def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
            # The stock sandbox allows some dunder access (''.__class__); refuse any
            # name starting with '_' outright, and str.format (its width specs are
            # unbounded).
            if attr.startswith("_") or attr in ("format", "format_map"):
                return False
            return bool(super().is_safe_attribute(obj, attr, value))

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "**" and isinstance(right, int) and abs(right) > 64:
                raise RenderLimit(f"exponent {right:,} is too large")
            if operator == "<<" and isinstance(right, int) and right > 64:
                raise RenderLimit(f"shift {right:,} is too large")
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, str | list | tuple) and isinstance(n, int) \
                            and len(seq) * n > MAX_OUTPUT:
                        raise RenderLimit(f"would build {len(seq) * n:,} characters "
                                          f"(limit {MAX_OUTPUT:,})")
            if operator == "%" and isinstance(left, str) and "*" in left:
                raise RenderLimit("'*' widths in %-formatting are not allowed")
            return _check_size(super().call_binop(context, operator, left, right))

        def wrap_str_format(self, value: Any) -> Any:
            if super().wrap_str_format(value) is None:
                return None

            def refuse(*args: Any, **kwargs: Any) -> str:
                # A format spec's width is unbounded ('{:>999999999}'): use filters.
                raise RenderLimit("str.format is not available in templates")

            return refuse

        def call(__self, __context: Any, __obj: Any, *args: Any,
                 **kwargs: Any) -> Any:
            _bounded_args(args, kwargs)
            return _check_size(super().call(__context, __obj, *args, **kwargs))

    env = Sandboxed(
        loader=_make_loader(dirs),
        undefined=StrictUndefined,
        autoescape=autoescape,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=False,
    )
    env.filters["utc"] = _utc
    for name, fn in list(env.filters.items()):
        env.filters[name] = _guard_filter(fn)
    return env


class _Watchdog:
    """One thread for the whole process that stops renders running past their deadline
    (a thread per render cost more than the render: validate renders thousands)."""

    def __init__(self) -> None:
        import threading

        self._cond = threading.Condition()
        self._armed: dict[int, tuple[float, int]] = {}  # token -> (deadline, thread id)
        self._fired: set[int] = set()
        self._next = 0
        self._thread: threading.Thread | None = None

    def arm(self, seconds: float) -> int:
        import threading
        import time

        with self._cond:
            self._next += 1
            token = self._next
            self._armed[token] = (time.monotonic() + seconds, threading.get_ident())
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="render-watchdog",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()
            return token

    def disarm(self, token: int) -> bool:
        """Stop watching; True when the deadline fired (an exception may be pending in the
        rendering thread: the caller clears it)."""
        with self._cond:
            self._armed.pop(token, None)
            if token in self._fired:
                self._fired.discard(token)
                return True
            return False

    def _run(self) -> None:
        import ctypes
        import time

        with self._cond:
            while True:
                now = time.monotonic()
                for token, (deadline, tid) in list(self._armed.items()):
                    if deadline <= now:
                        del self._armed[token]
                        self._fired.add(token)
                        ctypes.pythonapi.PyThreadState_SetAsyncExc(
                            ctypes.c_ulong(tid), ctypes.py_object(RenderLimit))
                soonest = min((d for d, _ in self._armed.values()), default=None)
                self._cond.wait(None if soonest is None else max(0.0, soonest - now))


_WATCHDOG = _Watchdog()


def _render_bounded(template: Any, variables: Mapping[str, Any]) -> str:
    """Render with an output cap and a time limit. The watchdog raises RenderLimit in the
    rendering thread (Jinja's compiled templates are Python: the exception lands at the
    next bytecode, even in a loop that writes nothing)."""
    import ctypes
    import threading

    token = _WATCHDOG.arm(MAX_RENDER_S)
    try:
        try:
            out: list[str] = []
            size = 0
            try:
                for chunk in template.root_render_func(
                        template.new_context(dict(variables))):
                    size += len(chunk)
                    if size > MAX_OUTPUT:
                        raise RenderLimit(f"produces more than {MAX_OUTPUT:,} characters")
                    out.append(chunk)
            except RenderLimit:
                raise
            except Exception:
                # Jinja rewrites the traceback to template lines (for the error's line).
                template.environment.handle_exception()
            return "".join(out)
        finally:
            if _WATCHDOG.disarm(token):  # clear an exception set but not yet delivered
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(threading.get_ident()), None)
    except RenderLimit as exc:
        if not str(exc):  # only the watchdog raises it bare
            raise RenderLimit(f"took longer than {MAX_RENDER_S:.0f}s") from None
        raise


@dataclass(frozen=True)
class TemplateFacts:
    """What static analysis of one template says."""

    variables: frozenset[str]
    """Names it reads from its context."""
    includes: tuple[str | None, ...]
    """Templates it includes or imports (None: chosen at render time)."""
    source: str


class Renderer:
    """Renders inline templates and template files for one playbook."""

    def __init__(self, template_dirs: Sequence[Path],
                 looked_in: Sequence[Path] = ()) -> None:
        self.template_dirs = list(template_dirs)
        self.looked_in = list(looked_in) or self.template_dirs
        """Every place a template may be (for the error when one is not found)."""
        self._text = _make_env(self.template_dirs, autoescape=False)
        self._html = _make_env(self.template_dirs, autoescape=True)
        self._compiled: dict[tuple[str, bool], Any] = {}
        """Inline templates compiled once per renderer (validate renders each many times)."""
        self._facts: dict[tuple[str | None, str | None], TemplateFacts] = {}

    def _env(self, html: bool) -> Environment:
        return self._html if html else self._text

    def render(self, source: str, variables: Mapping[str, Any], *, origin: str,
               line: int | None = None, html: bool = False) -> str:
        """Render an inline template whose first line is `line` of `origin`."""
        env = self._env(html)
        try:
            template = self._compiled.get((source, html))
            if template is None:
                template = self._compiled[(source, html)] = env.from_string(source)
            return _render_bounded(template, variables)
        except Exception as exc:
            raise self._error(exc, origin, line) from None

    def render_file(self, name: str, variables: Mapping[str, Any], *, html: bool = False,
                    origin: str | None = None, line: int | None = None) -> str:
        """Render a template file found under the template directories."""
        from jinja2 import TemplateNotFound

        env = self._env(html)
        try:
            template = env.get_template(name)
        except TemplateNotFound:
            searched = ", ".join(str(d) + ("" if d in self.template_dirs else " (no such folder)")
                                 for d in self.looked_in) or "(none)"
            raise TemplateError([Problem(origin or name, line, None,
                                         f"template file {name!r} not found",
                                         f"searched: {searched}; template files live in a "
                                         "'templates' folder beside the playbook or beside "
                                         "its folder, or in INCIDENT_NOTIFY_TEMPLATES")]) from None
        except Exception as exc:
            raise self._error(exc, str(Path(self._path_of(name))), None) from None
        try:
            return _render_bounded(template, variables)
        except Exception as exc:
            err = self._error(exc, template.filename or name, None)
            # Point at the file, and also say which playbook line uses it.
            if origin is not None:
                for p in err.problems:
                    object.__setattr__(p, "hint", (p.hint + "; " if p.hint else "")
                                       + f"used at {origin}:{line}")
            raise err from None

    def _path_of(self, name: str) -> str:
        for d in self.template_dirs:
            if (d / name).exists():
                return str(d / name)
        return name

    def facts(self, source: str | None = None, name: str | None = None) -> TemplateFacts:
        """What a template reads and includes, parsed once per renderer (validate asks for
        every stage x channel x audience, the sensitivity check again). A template that
        does not parse or cannot be found has no facts: rendering reports it."""
        key = (source, name)
        found = self._facts.get(key)
        if found is not None:
            return found
        from jinja2 import meta

        env = self._text
        try:
            if name is not None:
                assert env.loader is not None
                source, _, _ = env.loader.get_source(env, name)
            ast = env.parse(source or "")
        except Exception:
            facts = TemplateFacts(frozenset(), (), source or "")
        else:
            facts = TemplateFacts(frozenset(meta.find_undeclared_variables(ast)),
                                  tuple(meta.find_referenced_templates(ast)), source or "")
        self._facts[key] = facts
        return facts

    def variables_used(self, source: str | None = None, name: str | None = None) -> set[str]:
        """Names a template reads from its context (for the undeclared-variable check)."""
        return set(self.facts(source, name).variables)

    # ------------------------------------------------------------------ errors
    @staticmethod
    def _error(exc: Exception, origin: str, line: int | None) -> TemplateError:
        from jinja2 import TemplateSyntaxError, UndefinedError
        from jinja2.exceptions import SecurityError

        def absolute(template_line: int | None) -> int | None:
            if template_line is None:
                return line
            return template_line + (line - 1 if line is not None else 0)

        if isinstance(exc, TemplateSyntaxError):
            return TemplateError([Problem(origin, absolute(exc.lineno), None,
                                          f"template syntax error: {exc.message}",
                                          "check the {{ }} / {% %} pairs on this line")])
        if isinstance(exc, UndefinedError):
            tl = _template_line(exc)
            message = str(exc.message or exc)
            if "has no attribute" in message:
                return TemplateError([Problem(
                    origin, absolute(tl), None, f"template uses a missing attribute: {message}",
                    "check the spelling; built-ins are listed in docs/playbook-format.md")])
            name = message.split("'")[1] if message.count("'") >= 2 else message
            return TemplateError([Problem(
                origin, absolute(tl), None, f"variable {name!r} is not defined ({message})",
                f"declare it under variables: in the playbook or pass --set {name}=...")])
        if isinstance(exc, RenderLimit):
            return TemplateError([Problem(origin, absolute(_template_line(exc)), None,
                                          f"template does too much work: {exc}",
                                          "a message template renders a message: no huge "
                                          "repetitions or long loops")])
        if isinstance(exc, SecurityError):
            return TemplateError([Problem(origin, absolute(_template_line(exc)), None,
                                          f"template tried unsafe access: {exc}",
                                          "templates may only use variables and filters")])
        return TemplateError([Problem(origin, absolute(_template_line(exc)), None,
                                      f"template failed: {type(exc).__name__}: {exc}")])


def _template_line(exc: BaseException) -> int | None:
    """The template line a render-time error happened on, from the traceback."""
    tb = exc.__traceback__
    found = None
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_filename == "<template>" or code.co_filename.endswith((".j2", ".jinja")):
            found = tb.tb_lineno
        tb = tb.tb_next
    return found
