"""YAML loading that remembers where every value came from.

`load_yaml(path)` returns plain Python data plus a `SourceMap` from key paths
(``("stages", "investigating", "messages", "sms")``) to 1-based line/column, so schema
and template errors can name the exact line. Duplicate keys, which PyYAML silently
overwrites, are reported as problems.

Hostile input does bounded work: only the core schema's tags (no ``!custom``, no
``!!python/...``), no merge keys, nesting at most `MAX_DEPTH` deep, aliases that may not
expand the document beyond twice its own size (plus `ALIAS_SLACK` nodes; a "billion
laughs" is refused at the line of the first alias over budget) or refer to themselves, and
files read only when they are regular files no larger than `files.MAX_INPUT_BYTES`.
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


MAX_DEPTH = 64
ALIAS_SLACK = 10_000
_CORE = "tag:yaml.org,2002:"
_ALLOWED_TAGS = {_CORE + t for t in ("str", "int", "float", "bool", "null", "timestamp",
                                     "map", "seq")}


class _Budget:
    def __init__(self, root: yaml.Node) -> None:
        self.left = 2 * _distinct_nodes(root) + ALIAS_SLACK
        self.stack: set[int] = set()


def _distinct_nodes(root: yaml.Node) -> int:
    """How many node objects the document holds (an alias is the same object again)."""
    seen: set[int] = set()
    todo = [root]
    while todo:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                todo += (k, v)
        elif isinstance(node, yaml.SequenceNode):
            todo += node.value
    return len(seen)


class _Stop(Exception):
    """The document cannot be read further (a budget ran out): report and stop."""


def _convert(
    node: yaml.Node, path: PathKey, smap: SourceMap, problems: list[Problem],
    budget: _Budget | None = None,
) -> Any:
    if budget is None:
        budget = _Budget(node)
    mark = node.start_mark

    def stop(message: str, hint: str) -> _Stop:
        problems.append(Problem(smap.file, mark.line + 1, mark.column + 1, message, hint))
        return _Stop()

    budget.left -= 1
    if budget.left < 0:
        raise stop("the document grows too large when its aliases (*name) are expanded",
                   "write the values out instead of repeating aliases of aliases")
    if len(path) > MAX_DEPTH:
        raise stop(f"nested more than {MAX_DEPTH} levels deep", "flatten the structure")
    if node.tag not in _ALLOWED_TAGS and not isinstance(node, yaml.ScalarNode):
        raise stop(f"YAML tag {node.tag!r} is not allowed",
                   "remove the tag: only plain strings, numbers, booleans, lists and "
                   "mappings are read")
    if id(node) in budget.stack:
        raise stop("an alias refers to a value that contains it (a recursive alias)",
                   "remove the alias")
    content_line = mark.line + 1
    if isinstance(node, yaml.ScalarNode) and node.style in ("|", ">"):
        content_line = mark.line + 2
    smap.positions.setdefault(path, Position(mark.line + 1, mark.column + 1, content_line))
    if isinstance(node, yaml.MappingNode):
        budget.stack.add(id(node))
        try:
            return _mapping(node, path, smap, problems, budget)
        finally:
            budget.stack.discard(id(node))
    if isinstance(node, yaml.SequenceNode):
        budget.stack.add(id(node))
        try:
            return [_convert(item, (*path, i), smap, problems, budget)
                    for i, item in enumerate(node.value)]
        finally:
            budget.stack.discard(id(node))
    return _scalar(node, smap, problems)


def _mapping(node: yaml.MappingNode, path: PathKey, smap: SourceMap, problems: list[Problem],
             budget: _Budget) -> dict[Any, Any]:
    result: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        if key_node.tag == _CORE + "merge":
            problems.append(Problem(
                smap.file, key_node.start_mark.line + 1, key_node.start_mark.column + 1,
                "merge keys (<<) are not supported", "write the keys out in full"))
            continue
        key = _scalar(key_node, smap, problems) if isinstance(key_node, yaml.ScalarNode) \
            else None
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
        result[skey] = _convert(value_node, child, smap, problems, budget)
    return result


def _content_line(node: yaml.Node) -> int:
    if isinstance(node, yaml.ScalarNode) and node.style in ("|", ">"):
        return node.start_mark.line + 2
    return int(node.start_mark.line) + 1


_CONSTRUCTOR = yaml.constructor.SafeConstructor()


def _scalar(node: yaml.Node, smap: SourceMap, problems: list[Problem]) -> Any:
    """Construct one scalar with the safe constructor (ints, bools, dates, null); a tag
    outside the core schema, or a value its tag cannot hold (``!!float x``), is a problem."""
    mark = node.start_mark
    if node.tag not in _ALLOWED_TAGS:
        problems.append(Problem(smap.file, mark.line + 1, mark.column + 1,
                                f"YAML tag {node.tag!r} is not allowed",
                                "remove the tag: only plain values are read"))
        return None
    try:
        return _CONSTRUCTOR.construct_object(node, deep=True)
    except Exception as exc:
        problems.append(Problem(smap.file, mark.line + 1, mark.column + 1,
                                f"invalid value for {node.tag.rsplit(':', 1)[-1]}: "
                                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                                "quote the value to keep it as text"))
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
    try:
        data = _convert(node, (), smap, problems)
    except _Stop:
        data = None
    if problems:
        raise PlaybookError(problems)
    return data, smap


def load_yaml(path: Path) -> tuple[Any, SourceMap]:
    from incident_notify.files import InputFileError, read_input

    try:
        text = read_input(path).decode("utf-8")
    except InputFileError as exc:
        raise PlaybookError([Problem(str(path), None, None, exc.message, exc.hint)]) from None
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
