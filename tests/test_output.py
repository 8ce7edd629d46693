"""The output layer: what reaches a terminal, a pipe or a log."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest
from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

from incident_notify.cli.environment import Environment
from incident_notify.cli.render_results import FitTable

WORDS = ["INC-20261126-0001", "ok", "+14155550123", "ops@acme.example", "東京", "naïve",
         "[green]ok[/]", "[bold red]FAIL[/]", "1/2 segments (GSM-7, 139 units)", "", "x" * 30,
         "emoji 🚨", "a b c", "  lead", "trail  ", "a  b   c", "tab\there",
         "a long sentence of many words that wraps across lines", "東京大阪名古屋福岡札幌",
         "😀😀😀😀😀😀😀", "x,y;z-long-hyphenated-token-here"]


def _render(table: Table, width: int) -> str:
    out = io.StringIO()
    Console(file=out, width=width, color_system=None, force_terminal=False,
            highlight=False, emoji=False, soft_wrap=True).print(table)
    return out.getvalue()


@pytest.mark.parametrize("seed", range(6))
def test_plain_tables_are_drawn_exactly_as_rich_draws_them(seed: int) -> None:
    """The fast plain drawing (pipes, logs, NO_COLOR) is rich's own drawing, to the byte,
    tables too wide for the output included (cells wrapped where rich wraps them)."""
    rng = random.Random(seed)
    drawn_fast = wrapped = 0
    for _ in range(60):
        columns = [rng.choice(WORDS[:9]) or "c" for _ in range(rng.randint(1, 6))]
        title = rng.choice([None, "A title", "Deliveries per channel " * rng.randint(1, 4)])
        rows = [[rng.choice(WORDS) for _ in columns] for _ in range(rng.randint(0, 8))]
        width = rng.choice([40, 60, 80, 120, 160])

        def build(cls: type[Table], title: str | None = title, columns: list[str] = columns,
                  rows: list[list[str]] = rows) -> Table:
            t = cls(title=title, box=box.ASCII2, show_lines=False, title_justify="left")
            for c in columns:
                t.add_column(c, overflow="fold")
            for r in rows:
                t.add_row(*r)
            return t

        fit = build(FitTable)
        reference = build(Table)
        fast = fit._plain_lines(Console(file=io.StringIO(), color_system=None, width=width),
                                Console(width=width).options)
        if fast is None:
            continue
        drawn_fast += 1
        expected = _render(reference, width)
        assert "".join(t.plain for t in fast) + "\n" == expected, (columns, rows, width)
        natural = sum(max(cell_len(Text.from_markup(c).plain) for c in [h, *(r[i] for r in rows)])
                      for i, h in enumerate(columns)) + 3 * len(columns) + 1
        wrapped += natural > width
    assert drawn_fast >= 20  # the fast drawing is really used
    assert wrapped >= 5  # tables too wide for the output, wrapped as rich wraps them


def test_no_color_and_pipes_get_no_escape_sequences_and_no_bars() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for environ, stream in (({"NO_COLOR": "1"}, Terminal()), ({}, io.StringIO())):
        env = Environment(stdout=stream, stderr=stream, environ=environ)
        env.console().print("[bold red]DOWN[/] and [green]healthy[/]")
        assert "\x1b" not in stream.getvalue()
        assert "DOWN and healthy" in stream.getvalue()
        assert not env.live()
    colour = Terminal()
    env = Environment(stdout=colour, stderr=colour, environ={"TERM": "xterm-256color"})
    env.console().print("[bold red]DOWN[/]")
    assert "\x1b[" in colour.getvalue()  # a terminal without NO_COLOR does get colour
    assert env.live()


def test_a_terminal_that_cannot_show_every_character_gets_the_output_not_a_crash(
        isolated_home: Path) -> None:
    """A pipe or terminal in ASCII or Latin-1 (PYTHONIOENCODING, an old locale): the drill's
    arrows and dashes become '?', and --json escapes what it cannot carry, the same JSON."""
    import json

    from tests.conftest import PLAYBOOKS, run_process

    ascii_env = {"PYTHONIOENCODING": "ascii"}
    drill = run_process("drill", str(PLAYBOOKS / "dc-power-failure.yaml"), env=ascii_env)
    assert drill.returncode == 0, drill.stdout + drill.stderr
    assert "Drill passed." in drill.stdout and "?" in drill.stdout
    args = ("preview", str(PLAYBOOKS / "dc-power-failure.yaml"), "--set", "site=Zürich",
            "--set", "services=compute", "--set", "status_url=https://status.acme.example/i/1",
            "--json")
    narrow, wide = run_process(*args, env=ascii_env), run_process(*args)
    assert narrow.returncode == wide.returncode == 0, narrow.stderr
    assert narrow.stdout.isascii() and "Z\\u00fcrich" in narrow.stdout
    assert json.loads(narrow.stdout) == json.loads(wide.stdout)
