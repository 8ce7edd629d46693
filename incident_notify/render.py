"""Sandboxed Jinja2 rendering with StrictUndefined: a missing variable is an error, never a
blank in a public tweet, and a template cannot reach Python internals.

Errors become `TemplateError` problems with absolute positions: an inline template that
starts on line 27 of a playbook reports its own line 2 as line 28 of the playbook.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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


def _make_env(dirs: Sequence[Path], autoescape: bool) -> Environment:
    from jinja2 import FileSystemLoader, StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    class Sandboxed(SandboxedEnvironment):
        def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
            # The stock sandbox allows some dunder access (''.__class__); refuse any
            # name starting with '_' outright.
            if attr.startswith("_"):
                return False
            return bool(super().is_safe_attribute(obj, attr, value))

    env = Sandboxed(
        loader=FileSystemLoader([str(d) for d in dirs]),
        undefined=StrictUndefined,
        autoescape=autoescape,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=False,
    )
    env.filters["utc"] = _utc
    return env


class Renderer:
    """Renders inline templates and template files for one playbook."""

    def __init__(self, template_dirs: Sequence[Path]) -> None:
        self.template_dirs = list(template_dirs)
        self._text = _make_env(self.template_dirs, autoescape=False)
        self._html = _make_env(self.template_dirs, autoescape=True)

    def _env(self, html: bool) -> Environment:
        return self._html if html else self._text

    def render(self, source: str, variables: Mapping[str, Any], *, origin: str,
               line: int | None = None, html: bool = False) -> str:
        """Render an inline template whose first line is `line` of `origin`."""
        env = self._env(html)
        try:
            template = env.from_string(source)
            return str(template.render(**variables))
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
            searched = ", ".join(str(d) for d in self.template_dirs) or "(none)"
            raise TemplateError([Problem(origin or name, line, None,
                                         f"template file {name!r} not found",
                                         f"searched: {searched}")]) from None
        except Exception as exc:
            raise self._error(exc, str(Path(self._path_of(name))), None) from None
        try:
            return str(template.render(**variables))
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

    def variables_used(self, source: str | None = None, name: str | None = None) -> set[str]:
        """Names a template reads from its context (for the undeclared-variable check)."""
        from jinja2 import meta

        env = self._text
        try:
            if name is not None:
                assert env.loader is not None
                source, _, _ = env.loader.get_source(env, name)
            ast = env.parse(source or "")
        except Exception:
            return set()  # syntax errors and missing files are reported when rendering
        return set(meta.find_undeclared_variables(ast))

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
