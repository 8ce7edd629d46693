"""Regular expressions a playbook may declare for its variables (`pattern:`), checked
before Python's backtracking engine ever runs them: `slow_pattern` says why a pattern could
take exponential time on some value, from the parsed pattern alone."""

from __future__ import annotations

from typing import Any

MAX_PATTERN_LENGTH = 500


def slow_pattern(pattern: str) -> str | None:
    """Why `pattern` could take exponential time on some value, or None. Refused: a
    repetition inside a repetition, or alternatives under one, unless they cannot compete
    for the same text (``[A-Z]+(-[A-Z]+)*`` is fine: each round starts with a '-' the inner
    repetition cannot match). ``(A+)+B``, ``(a|a)*``, ``(x*)*`` are refused rather than run:
    Python's regex engine cannot be interrupted."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        return f"is longer than {MAX_PATTERN_LENGTH} characters"
    try:
        from re import _parser as parser  # type: ignore[attr-defined]
    except ImportError:  # pragma: no cover - Python < 3.11
        import sre_parse as parser
    repeats = {"MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"}

    def item_chars(op: Any, arg: Any) -> set[int] | None:
        """The characters one item can match; None for 'anything' or unknown."""
        name = str(op)
        if name == "LITERAL":
            return {arg}
        if name == "IN":
            out: set[int] = set()
            for kind, value in arg:
                if str(kind) == "LITERAL":
                    out.add(value)
                elif str(kind) == "RANGE" and value[1] - value[0] < 5000:
                    out.update(range(value[0], value[1] + 1))
                else:
                    return None
            return out
        return None

    def chars(items: Any, only_repeated: bool = False) -> set[int] | None:
        """The characters `items` can match (None: anything); with `only_repeated`, only
        those a repetition nested in them can match."""
        out: set[int] = set()
        for op, arg in items:
            name = str(op)
            if name in repeats:
                sub = chars(arg[2])
            elif name == "SUBPATTERN":
                sub = chars(arg[-1], only_repeated)
            elif name == "BRANCH":
                sub = set()
                for branch in arg[1]:
                    b = chars(branch, only_repeated)
                    if b is None:
                        return None
                    sub |= b
            elif name == "AT" or only_repeated:
                continue
            else:
                sub = item_chars(op, arg)
            if sub is None:
                return None
            out |= sub
        return out

    def edge(items: Any, first: bool) -> set[int] | None:
        """Characters of a body's first (or last) item when it is a plain character."""
        flat = list(items)
        while flat:
            op, arg = flat[0] if first else flat[-1]
            if str(op) == "SUBPATTERN":
                flat = list(arg[-1])
                continue
            return item_chars(op, arg)
        return None

    def has_branch(items: Any) -> bool:
        for op, arg in items:
            name = str(op)
            if name == "BRANCH":
                return True
            if name == "SUBPATTERN" and has_branch(arg[-1]):
                return True
            if name in repeats and has_branch(arg[2]):
                return True
        return False

    def separated(body: Any) -> bool:
        """Each round of a repetition starts or ends with a character nothing repeated
        inside it can match: rounds cannot compete for the same text."""
        if has_branch(body):
            return False  # alternatives are checked on their own, under the repetition
        inner = chars(body, only_repeated=True)
        if inner is None:
            return False
        for first in (True, False):
            boundary = edge(body, first)
            if boundary is not None and not boundary & inner:
                return True
        return False

    def walk(items: Any, under_repeat: bool) -> str | None:
        for op, arg in items:
            name = str(op)
            if name in repeats:
                _low, high, sub = arg
                if under_repeat and high != 0:
                    return "nests a repetition inside a repetition"
                repeated = high > 1
                if repeated and separated(sub):
                    repeated = False  # each round is delimited: check inside on its own
                found = walk(sub, under_repeat or repeated)
                if found:
                    return found
            elif name == "BRANCH":
                if under_repeat:
                    firsts = [edge(b, True) for b in arg[1]]
                    if any(f is None for f in firsts) or any(
                            a & b for i, a in enumerate(firsts) for b in firsts[i + 1:]
                            if a is not None and b is not None):
                        return "repeats a choice of alternatives that can match alike"
                for branch in arg[1]:
                    found = walk(branch, under_repeat)
                    if found:
                        return found
            elif name == "SUBPATTERN":
                found = walk(arg[-1], under_repeat)
                if found:
                    return found
            elif name in ("ASSERT", "ASSERT_NOT"):
                found = walk(arg[1], under_repeat)
                if found:
                    return found
        return None

    try:
        return walk(parser.parse(pattern), False)
    except Exception:
        return None  # re.compile reports a malformed pattern
