"""Every example in docs/ that shows a command's output is the real output of that command.

A ```text block holding `$ incident-notify ...` lines is a transcript: each command line is
followed by what the command printed (stdout and stderr, interleaved as on a terminal, at
120 columns, NO_COLOR) and `[exit N]`. The transcripts of one page are replayed in order
against one sandbox and one audit log, so a page reads as one session. What differs between
runs is normalised on both sides (emulator ports, clock times, dates in incident ids,
elapsed seconds, the user@host, hashes and temporary paths). A line of the form
`  ... (anything) ...` stands for any number of lines the page chose not to repeat.

To re-capture a page after a deliberate change of output:
    INCIDENT_NOTIFY_RECAPTURE_DOCS=1 python -m pytest tests/test_docs.py -n0
then read the diff.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, run_cli

DOCS = ROOT / "docs"
BLOCK = re.compile(r"^```text\n(.*?)^```\n", re.S | re.M)
ELISION = re.compile(r"^\s*\.\.\..*\.\.\.\s*$")
RECAPTURE = bool(os.environ.get("INCIDENT_NOTIFY_RECAPTURE_DOCS"))


@dataclass
class Step:
    command: str
    expected: list[str] = field(default_factory=list)
    exit_code: int = 0


@dataclass
class Block:
    start: int
    end: int
    steps: list[Step]


def transcripts(text: str) -> list[Block]:
    blocks = []
    for m in BLOCK.finditer(text):
        lines = m.group(1).splitlines()
        if not any(line.startswith("$ incident-notify ") for line in lines):
            continue
        steps: list[Step] = []
        for line in lines:
            if line.startswith("$ "):
                steps.append(Step(line[2:]))
            elif (code := re.fullmatch(r"\[exit (\d+)\]", line)) and steps:
                steps[-1].exit_code = int(code.group(1))
            elif steps:
                steps[-1].expected.append(line)
            else:
                raise AssertionError(f"output before any command in a transcript: {line!r}")
        blocks.append(Block(m.start(1), m.end(1), steps))
    return blocks


def normalise(line: str, tmp: Path) -> str:
    line = line.rstrip()
    line = line.replace(str(tmp), "/tmp/guide").replace(f"{ROOT}/", "")
    line = re.sub(r"127\.0\.0\.1:\d{2,5}", "127.0.0.1:PORT", line)
    line = re.sub(r"INC-\d{8}-", "INC-YYYYMMDD-", line)
    line = re.sub(r"\b\d{4}-\d\d-\d\d\b", "YYYY-MM-DD", line)
    line = re.sub(r"\b\d\d:\d\d:\d\d\b", "HH:MM:SS", line)
    line = re.sub(r"\b\d+\.\ds\b", "N.Ns", line)
    line = re.sub(r"\bhead [0-9a-f]{12}\b", "head HASH", line)
    line = re.sub(r"\bby \S+@\S+", "by USER@HOST", line)
    return line


CONCURRENT = ("failover: ", "warning: channel ")
"""Notes that channels sending at the same time print in either order."""


def in_order(lines: list[str]) -> list[str]:
    """Runs of notes from concurrent channels, sorted (their order is the scheduler's)."""
    out: list[str] = []
    run: list[str] = []
    for line in [*lines, ""]:
        if line.startswith(CONCURRENT):
            run.append(line)
            continue
        out += sorted(run)
        run = []
        out.append(line)
    return out[:-1]


def _matches(expected: list[str], actual: list[str]) -> bool:
    expected, actual = in_order(expected), in_order(actual)
    pattern = "".join(r"(?:[^\n]*\n)*?" if ELISION.match(e) else re.escape(e) + r"\n"
                      for e in expected)
    return re.fullmatch(pattern, "".join(a + "\n" for a in actual)) is not None


def _recaptured(expected: list[str], raw: list[str], tmp: Path) -> list[str]:
    """The real output, keeping the page's elisions where they still fit."""
    if not any(ELISION.match(e) for e in expected):
        return raw
    normal = [normalise(r, tmp) for r in raw]
    expected = [normalise(e, tmp) for e in expected]
    groups = []
    pattern = ""
    for e in expected:
        if ELISION.match(e):
            pattern += f"(?P<g{len(groups)}>(?:[^\\n]*\\n)*?)"
            groups.append(e)
        else:
            pattern += re.escape(e) + r"\n"
    m = re.fullmatch(pattern, "".join(n + "\n" for n in normal))
    if m is None:
        return raw
    out, at = [], 0
    starts = {m.start(f"g{i}"): (m.end(f"g{i}"), e) for i, e in enumerate(groups)}
    offset = 0
    for i, line in enumerate(raw):
        pos = offset
        offset += len(normal[i]) + 1
        if pos in starts:
            end, elision = starts.pop(pos)
            out.append(elision)
            at = end
        if pos < at:
            continue
        out.append(line)
    for _, elision in starts.values():  # an elision of nothing at the very end
        out.append(elision)
    return out


def _run(command: str, env: dict[str, str], incident_day: str) -> tuple[int, list[str]]:
    argv = shlex.split(re.sub(r"INC-\d{8}-", f"INC-{incident_day}-", command))
    assert argv[0] == "incident-notify"
    proc = run_cli(*argv[1:], env=env, merged=True)
    # Every --sandbox command says so first; the pages leave that line out.
    return proc.returncode, [line for line in proc.stdout.splitlines()
                             if not line.startswith("SANDBOX: ")]


def _pages() -> list[Path]:
    return sorted(p for p in DOCS.glob("*.md") if transcripts(p.read_text()))


def test_the_docs_have_transcripts() -> None:
    assert DOCS / "commander-guide.md" in _pages()


@pytest.mark.parametrize("page", _pages(), ids=lambda p: p.name)
def test_every_transcript_in_the_docs_is_real_output(page: Path, sandbox: Any,
                                                     tmp_path: Path) -> None:
    from incident_notify.sandbox import state_file
    from incident_notify.sandbox.control import ControlServer

    sandbox.twitter.auto_users = True
    control = ControlServer(sandbox, 0).start()
    try:
        target = state_file()
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        target.write_text(json.dumps({"pid": os.getpid(), "env": {
            **sandbox.env(), "INCIDENT_NOTIFY_SANDBOX_CONTROL": control.url}}))
        target.chmod(0o600)
        env = {"INCIDENT_NOTIFY_AUDIT_LOG": str(tmp_path / "audit.jsonl"),
               "INCIDENT_NOTIFY_OPTOUTS": str(tmp_path / "optouts.jsonl"),
               "COLUMNS": "120", "NO_COLOR": "1"}
        day = datetime.now(UTC).strftime("%Y%m%d")
        text = page.read_text()
        mismatches = []
        replaced: list[tuple[int, int, str]] = []
        for block in transcripts(text):
            new_block: list[str] = []
            for step in block.steps:
                code, raw = _run(step.command, env, day)
                actual = [normalise(line, tmp_path) for line in raw]
                expected = [normalise(line, tmp_path) for line in step.expected]
                if code != step.exit_code or not _matches(expected, actual):
                    mismatches.append(
                        f"$ {step.command}\n--- the page says (exit {step.exit_code}):\n"
                        + "\n".join(expected) + f"\n--- the command printed (exit {code}):\n"
                        + "\n".join(actual))
                new_block += [f"$ {step.command}",
                              *[r.replace(str(tmp_path), "/tmp/guide").replace(f"{ROOT}/", "")
                                for r in _recaptured(step.expected, in_order(raw), tmp_path)],
                              f"[exit {code}]"]
            replaced.append((block.start, block.end, "\n".join(new_block) + "\n"))
        if RECAPTURE and mismatches:
            for start, end, body in reversed(replaced):
                text = text[:start] + body + text[end:]
            page.write_text(text)
        assert not mismatches, f"{page.name}: {len(mismatches)} transcript(s) differ from " \
            "real output:\n\n" + "\n\n".join(mismatches)
    finally:
        control.stop()


def test_a_changed_transcript_is_caught(tmp_path: Path) -> None:
    """The comparison is not vacuous: a changed count or a dropped line is a difference."""
    real = ["Everyone was reached: 31 recipient(s), 36 sent, 0.8s."]
    assert _matches([normalise(real[0], tmp_path)], [normalise(real[0], tmp_path)])
    changed = ["Everyone was reached: 30 recipient(s), 36 sent, 0.8s."]
    assert not _matches([normalise(changed[0], tmp_path)], [normalise(real[0], tmp_path)])
    assert not _matches([], [normalise(real[0], tmp_path)])
    assert _matches(["  ... (as above) ..."], ["a", "b"])


def command_lines(text: str) -> list[str]:
    """Every `incident-notify ...` line of the shell examples, continuations joined,
    comments and lines with placeholders (`...`) left out."""
    lines: list[str] = []
    for m in re.finditer(r"^```sh\n(.*?)^```", text, re.S | re.M):
        joined = re.sub(r"\\\n\s*", " ", m.group(1))
        for line in joined.splitlines():
            try:
                words = shlex.split(line, comments=True)
            except ValueError:
                words = shlex.split(line.split(" | ")[0], comments=True)
            ours = [i for i, w in enumerate(words) if w.endswith("incident-notify")]
            if not ours:
                continue
            words = words[ours[0]:]
            for i, w in enumerate(words):
                if w in ("|", "&&", "||", ";", ">", "2>"):
                    words = words[:i]
                    break
            if "..." not in words:
                lines.append(shlex.join(["incident-notify", *words[1:]]))
    return lines


def _parse(argv: list[str]) -> None:
    """Parse a command line as the CLI would, without running it."""
    import typer.main

    from incident_notify.cli.main import _register, app

    _register()
    command: Any = typer.main.get_command(app)
    ctx = command.make_context("incident-notify", list(argv))
    def pending(ctx: Any) -> list[str]:
        protected = getattr(ctx, "_protected_args", None)
        if protected is None:  # Click outside Typer
            protected = ctx.protected_args
        return [*protected, *ctx.args]

    while hasattr(command, "resolve_command") and pending(ctx):
        name, command, rest = command.resolve_command(ctx, pending(ctx))
        ctx = command.make_context(name, rest, parent=ctx)


DOC_FILES = sorted([*DOCS.glob("*.md"), ROOT / "README.md"])


@pytest.mark.parametrize("page", [p for p in DOC_FILES if command_lines(p.read_text())],
                         ids=lambda p: p.name)
def test_every_command_line_in_the_docs_is_accepted(page: Path) -> None:
    """A documented option or subcommand that does not exist (or lost its name) fails."""
    for line in command_lines(page.read_text()):
        try:
            _parse(shlex.split(line)[1:])  # (quoting was normalised by command_lines)
        except Exception as exc:  # click's UsageError and friends
            raise AssertionError(f"{page.name}: {line!r} is refused: {exc}") from None


def test_a_wrong_documented_option_is_caught() -> None:
    with pytest.raises(Exception, match="No such option"):
        _parse(["status", "--everything"])
    _parse(["audit", "verify", "--expect", "26741088bd45"])


def test_every_file_the_docs_name_exists() -> None:
    for page in DOC_FILES:
        for name in re.findall(r"`((?:tests|bench|scripts|playbooks|templates)/[\w./-]+)`",
                               page.read_text()):
            assert (ROOT / name).exists(), f"{page.name} names {name}, which does not exist"
    modules = {p.name for p in ROOT.rglob("*.py") if ".venv" not in p.parts}
    for page in DOC_FILES:
        for name in re.findall(r"`(\w+\.py)`", page.read_text()):
            assert name in modules, f"{page.name} names {name}, which does not exist"
