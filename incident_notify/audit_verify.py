"""Checking the audit log's lines: one record given the one before it (parse, fields,
schema, canonical form, sequence, chain, hash, payload), a stretch of lines a megabyte at a
time, and the whole log in stretches checked by worker processes, then linked. `AuditLog.
verify` runs these and adds the head file, `--expect` and the checkpoint."""

from __future__ import annotations

import gc
import json
import os
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import msgspec

from incident_notify.audit import (
    _FIELD_SET,
    GENESIS,
    SCHEMA,
    _line_hash,
    _open_regular,
    canonical,
)
from incident_notify.audit_schema import is_int, record_problem

_VERIFY_BLOCK = 1 << 20
"""Bytes of lines checked at once."""

_FAST_JSON = True
"""Whether msgspec answers first (the tests compare its answers with the standard
library's alone)."""


class _NotAsPythonWritesIt(ValueError):
    pass


def _float_as_python_writes_it(token: str) -> float:
    value = float(token)
    if repr(value) != token:
        raise _NotAsPythonWritesIt(token)
    return value


_DECODER = msgspec.json.Decoder(float_hook=_float_as_python_writes_it)
_ENCODER = msgspec.json.Encoder(order="sorted")


def _canonical_records(body: bytes) -> list[Any] | None:
    """The values of JSON array `body` when `body` is exactly their canonical encoding
    (`canonical`: sorted keys, compact, UTF-8), else None.

    msgspec answers first, at a fifth of the standard library's cost. Its yes is the
    standard library's yes: both parse a canonical text to the same values; they write
    every string, integer, key order and literal the same way (tests/test_audit.py
    compares them on every code point); and every float in `body` is checked, as it is
    parsed, to be spelled as `repr` (and so `json.dumps`) spells it. Its no is only a
    maybe, which the standard library settles."""
    if _FAST_JSON:
        try:
            records = _DECODER.decode(body)
            if _ENCODER.encode(records) == body:
                return records
        except (msgspec.MsgspecError, ValueError):
            pass
    try:
        records = json.loads(body)
        if json.dumps(records, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode() == body:
            return records
    except (UnicodeDecodeError, ValueError):
        pass
    return None


def _check_line(raw: bytes, seq: int, prev: str) -> tuple[str | None, dict[str, Any]]:
    """What is wrong with one line of the log given the record before it, or None; and
    the parsed record. Every line is parsed once, re-encoded once and hashed once."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return "not valid JSON (the line was altered)", {}
    if not isinstance(data, dict) or data.keys() != _FIELD_SET:
        return "not an audit record (fields missing or added)", {}
    if data["schema"] != SCHEMA:
        return f"unknown schema {data['schema']!r}", data
    if canonical(data) + b"\n" != raw:
        return "not in canonical form (the line was altered)", data
    return _check_chained(raw, data, seq, prev), data


def _chain_problem(found_seq: object, found_prev: object, seq: int, prev: str) -> str | None:
    if found_seq != seq + 1:
        return (f"sequence {found_seq} where {seq + 1} was expected (a record was removed "
                "or reordered)")
    if found_prev != prev:
        return ("does not chain to the record before it (a record was removed, inserted or "
                "reordered)")
    return None


def _check_chained(raw: bytes, data: dict[str, Any], seq: int, prev: str) -> str | None:
    """The checks after parsing: sequence, chain, hash, payload."""
    chain = _chain_problem(data["seq"], data["prev"], seq, prev)
    if chain:
        return chain
    if _line_hash(raw) != data["hash"]:
        return "hash mismatch (the record was altered)"
    problem = record_problem(data)
    if problem:
        return f"well chained but malformed: {problem}"
    return None


def _check_lines(lines: list[bytes], seq: int,
                 prev: str) -> tuple[int, str | None, int, str]:
    """Check consecutive complete lines as `_check_line` does, the JSON work done for all
    of them at once: one parse of the lines as one JSON array and one canonical encoding
    of that array, compared with the lines' own bytes (equal exactly when every line is
    one canonical record). Then per line: fields, schema, sequence, chain, hash, payload.
    When the batch does not hold, the lines are checked one by one, which names the first
    bad one with the same words. Returns (lines that passed, the first problem or None,
    the seq and hash of the last passing record)."""
    records = _canonical_records(b"[" + b",".join([raw[:-1] for raw in lines]) + b"]")
    batch = records is not None and len(records) == len(lines)
    for i, raw in enumerate(lines):
        if batch:
            data = records[i]  # type: ignore[index]
            if type(data) is not dict or data.keys() != _FIELD_SET:
                problem: str | None = "not an audit record (fields missing or added)"
            elif data["schema"] != SCHEMA:
                problem = f"unknown schema {data['schema']!r}"
            else:
                problem = _check_chained(raw, data, seq, prev)
        else:
            problem, data = _check_line(raw, seq, prev)
        if problem:
            return i, problem, seq, prev
        seq, prev = data["seq"], data["hash"]
    return len(lines), None, seq, prev


@dataclass
class _Scan:
    """What checking a stretch of the log found."""

    seq: int
    prev: str
    line_start: int
    offset: int
    passed: int = 0
    problem: str | None = None
    torn: bool = False
    first: tuple[int, str] | None = None
    """(A stretch checked on its own:) its first record's own seq and prev, to be linked
    to the stretch before it."""


def scan_lines(handle: BinaryIO, offset: int, end: int | None, seq: int, prev: str) -> _Scan:
    """Check the lines from `offset` (to `end`, or to the end of the file) given the
    record before them: a megabyte at a time, until the first problem or a torn line.
    (The cyclic garbage collector is paused meanwhile: a block's records hold no cycles
    and are freed by reference counting, while the collector would walk them again and
    again as they are allocated, a third of the time.)"""
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _scan_lines(handle, offset, end, seq, prev)
    finally:
        if collecting:
            gc.enable()


def _scan_lines(handle: BinaryIO, offset: int, end: int | None, seq: int, prev: str) -> _Scan:
    out = _Scan(seq, prev, offset, offset)
    handle.seek(offset)
    while end is None or out.offset < end:
        lines = handle.readlines(_VERIFY_BLOCK if end is None
                                 else min(_VERIFY_BLOCK, end - out.offset))
        if end is not None:  # (readlines goes one line past a hint it meets exactly)
            room, kept = end - out.offset, 0
            while kept < len(lines) and room > 0:
                room -= len(lines[kept])
                kept += 1
            del lines[kept:]
        if not lines:
            break
        torn_line = not lines[-1].endswith(b"\n")
        whole = lines[:-1] if torn_line else lines
        passed, problem, out.seq, out.prev = _check_lines(whole, out.seq, out.prev)
        out.passed += passed
        if passed:
            out.line_start = out.offset + sum(len(raw) for raw in whole[:passed - 1])
            out.offset = out.line_start + len(whole[passed - 1])
        if problem:
            out.problem = problem
            break
        if torn_line:
            out.torn = True
            break
    return out


PARALLEL_VERIFY_BYTES = 64 * 1024 * 1024
"""From this size on, `verify` checks stretches of the log in parallel processes."""


def _verify_range(path: str, start: int, end: int) -> _Scan | None:
    """Check one stretch of the log on its own (in a worker process): its first record
    is taken at its word for seq and prev, which the caller then links to the stretch
    before. None when that first record cannot say (the caller checks in one pass)."""
    with os.fdopen(_open_regular(Path(path), os.O_RDONLY), "rb") as handle:
        handle.seek(start)
        try:
            first = json.loads(handle.readline())
            first_seq, first_prev = first["seq"], first["prev"]
        except (ValueError, TypeError, KeyError):
            return None
        if not is_int(first_seq) or not isinstance(first_prev, str):
            return None
        scan = scan_lines(handle, start, end, first_seq - 1, first_prev)
        scan.first = (first_seq, first_prev)
        return scan


def scan_parallel(path: Path, handle: BinaryIO, size: int, workers: int,
                     pool: Executor | None = None) -> _Scan | None:
    """The log checked in `workers` stretches at once (cut at line ends), then linked:
    the same answer as one pass, problem for problem. None sends the caller to one pass
    (a stretch whose first line is itself in question, or no worker processes)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    cuts = [0]
    for k in range(1, workers):
        handle.seek(max(size * k // workers - 1, cuts[-1]))
        handle.readline()  # to the next line end
        cut = handle.tell()
        if cut < size and cut > cuts[-1]:
            cuts.append(cut)
    ends = [*cuts[1:], size]
    args = ([str(path)] * len(cuts), cuts, ends)
    try:
        if pool is not None:
            reports = list(pool.map(_verify_range, *args))
        else:
            with ProcessPoolExecutor(max_workers=len(cuts),
                                     mp_context=multiprocessing.get_context("spawn")) as own:
                reports = list(own.map(_verify_range, *args))
    except (OSError, RuntimeError):
        return None
    total = _Scan(0, GENESIS, 0, 0)
    for report in reports:
        if report is None or report.first is None or (report.passed == 0 and
                                                       (report.problem or report.torn)):
            return None
        link = _chain_problem(report.first[0], report.first[1], total.seq, total.prev)
        if link:
            total.problem = link
            return total
        total.passed += report.passed
        total.seq, total.prev = report.seq, report.prev
        total.line_start, total.offset = report.line_start, report.offset
        if report.problem or report.torn:
            total.problem, total.torn = report.problem, report.torn
            return total
    return total
