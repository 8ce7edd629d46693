"""YAML loading that remembers where every value came from.

`load_yaml(path)` returns plain Python data plus a `SourceMap` from key paths
(``("stages", "investigating", "messages", "sms")``) to 1-based line/column, so schema
and template errors can name the exact line. Duplicate keys, which PyYAML silently
overwrites, are reported as problems.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from incident_notify.errors import PlaybookError, Problem

PathKey = tuple[str | int, ...]


@dataclass(frozen=True)
class Position:
    line: int
    column: int
    content_line: int
    """Line where a scalar's text begins (the next line for a ``|`` / ``>`` block)."""


@dataclass
class SourceMap:
    file: str
    positions: dict[PathKey, Position] = field(default_factory=dict)

    def position(self, path: Sequence[str | int]) -> Position | None:
        """The position of `path`, or of its closest ancestor that has one."""
        key = tuple(path)
        while key:
            pos = self.positions.get(key)
            if pos is not None:
                return pos
            key = key[:-1]
        return self.positions.get(())

    def problem(self, path: Sequence[str | int], message: str, hint: str = "") -> Problem:
        pos = self.position(path)
        return Problem(
            self.file,
            pos.line if pos else None,
            pos.column if pos else None,
            message,
            hint,
        )


def _loader_class() -> type[yaml.SafeLoader]:
    loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return loader


def _convert(
    node: yaml.Node, path: PathKey, smap: SourceMap, problems: list[Problem]
) -> Any:
    mark = node.start_mark
    content_line = mark.line + 1
    if isinstance(node, yaml.ScalarNode) and node.style in ("|", ">"):
        content_line = mark.line + 2
    smap.positions.setdefault(path, Position(mark.line + 1, mark.column + 1, content_line))
    if isinstance(node, yaml.MappingNode):
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _scalar_value(key_node)
            if not isinstance(key, str | int | bool | float) or key is None:
                problems.append(
                    Problem(smap.file, key_node.start_mark.line + 1,
                            key_node.start_mark.column + 1, "a mapping key must be a scalar")
                )
                continue
            skey = str(key)
            child = (*path, skey)
            if skey in result:
                first = smap.positions.get(child)
                where = f" (first at line {first.line})" if first else ""
                problems.append(
                    Problem(
                        smap.file,
                        key_node.start_mark.line + 1,
                        key_node.start_mark.column + 1,
                        f"duplicate key {skey!r}{where}",
                        "YAML would silently keep only the last one; remove or rename one",
                    )
                )
                continue
            # The key's own line is where a reader looks for "unknown key" errors.
            smap.positions[child] = Position(
                key_node.start_mark.line + 1,
                key_node.start_mark.column + 1,
                _content_line(value_node),
            )
            result[skey] = _convert(value_node, child, smap, problems)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_convert(item, (*path, i), smap, problems) for i, item in enumerate(node.value)]
    return _scalar_value(node)


def _content_line(node: yaml.Node) -> int:
    if isinstance(node, yaml.ScalarNode) and node.style in ("|", ">"):
        return node.start_mark.line + 2
    return int(node.start_mark.line) + 1


_CONSTRUCTOR = yaml.constructor.SafeConstructor()


def _scalar_value(node: yaml.Node) -> Any:
    """Construct one scalar with the safe constructor (ints, bools, dates, null)."""
    if isinstance(node, yaml.ScalarNode):
        return _CONSTRUCTOR.construct_object(node, deep=True)
    return None


def load_yaml_text(text: str, file: str) -> tuple[Any, SourceMap]:
    """Parse YAML text; raise PlaybookError with every problem located."""
    smap = SourceMap(file)
    try:
        node = yaml.compose(text, Loader=_loader_class())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        col = mark.column + 1 if mark else None
        what = (exc.problem or exc.context or "malformed YAML").strip()
        ctx = exc.context_mark
        if exc.context and ctx is not None and ctx.line + 1 != line:
            what += f" ({exc.context.strip()} that started at line {ctx.line + 1})"
        raise PlaybookError(
            [Problem(file, line, col, f"malformed YAML: {what}",
                     "check indentation, colons and quoting near this line "
                     "(a value containing ': ' or starting with '{' or '*' needs quotes)")]
        ) from None
    except yaml.YAMLError as exc:
        raise PlaybookError([Problem(file, None, None, f"malformed YAML: {exc}")]) from None
    if node is None:
        return None, smap
    problems: list[Problem] = []
    data = _convert(node, (), smap, problems)
    if problems:
        raise PlaybookError(problems)
    return data, smap


def load_yaml(path: Path) -> tuple[Any, SourceMap]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlaybookError(
            [Problem(str(path), None, None, "file not found", "check the path")]
        ) from None
    except UnicodeDecodeError as exc:
        raise PlaybookError(
            [Problem(str(path), None, None, f"not UTF-8 text ({exc.reason})",
                     "save the file as UTF-8")]
        ) from None
    except OSError as exc:
        raise PlaybookError(
            [Problem(str(path), None, None, f"cannot read: {exc.strerror}")]
        ) from None
    return load_yaml_text(text, str(path))
