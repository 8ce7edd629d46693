"""Human renderings of results (tables, previews). JSON renderings live with the results."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import TYPE_CHECKING, Any

from rich import box
from rich.table import Table

from incident_notify.cli.output import safe as escape

if TYPE_CHECKING:
    from incident_notify.checks import PlaybookReport
    from incident_notify.cli.environment import Environment
    from incident_notify.preview import PreviewResult


class FitTable(Table):
    """A table that never splits a token (an id, a number, an address) to fit: when the
    widest word of every column cannot fit side by side, each row is shown as a block of
    ``header: value`` lines instead. Long free text still wraps between words."""

    def __rich_console__(self, console: Any, options: Any) -> Any:
        from rich.text import Text

        def words(cell: Any) -> int:
            plain = Text.from_markup(cell).plain if isinstance(cell, str) else str(cell)
            return max((len(w) for w in plain.split()), default=0)

        need = 1
        for column in self.columns:
            widest = max([words(column.header), *(words(c) for c in column._cells)])
            need += widest + 3
        if need <= options.max_width:
            plain = self._plain_lines(console, options)
            if plain is not None:
                yield from plain
                return
            yield from super().__rich_console__(console, options)
            return
        if self.title:
            yield Text.from_markup(str(self.title), style="bold")
        headers = [Text.from_markup(str(c.header)).plain for c in self.columns]
        label = max((len(h) for h in headers), default=0)
        for row in range(self.row_count):
            for header, column in zip(headers, self.columns, strict=True):
                cell = column._cells[row]
                value = cell if isinstance(cell, str) else str(cell)
                yield Text.from_markup(f"{header or '-':<{label}}  {value}")
            yield Text("")


    def _plain_lines(self, console: Any, options: Any) -> list[Any] | None:
        """The ASCII table exactly as rich draws it, for output without styles (a pipe, a
        log, NO_COLOR): rich measures, wraps and pads each cell through its general
        renderer, which made printing `validate`'s tables cost more than the checks. When
        the table is wider than the output, columns are narrowed as rich narrows them
        (`_wrapped_widths`) and cells cut where rich's `divide_line` cuts them; a header
        sits on its row's last line, as rich sets it. tests/test_output.py compares both
        with rich byte for byte. None when rich must draw it (styles, a cell holding a
        line break or a tab, a title wider than the table)."""
        from rich.cells import cell_len
        from rich.text import Text

        if self.box is not box.ASCII2 or console.color_system is not None:
            return None
        headers = [Text.from_markup(str(c.header)).plain for c in self.columns]
        columns = [[c if isinstance(c, str) else str(c) for c in col._cells]
                   for col in self.columns]
        cells = [[Text.from_markup(c).plain for c in col] for col in columns]
        if any("\n" in c or "\t" in c for col in [*cells, headers] for c in col):
            return None
        widths = [max([cell_len(h), *(cell_len(c) for c in col)])
                  for h, col in zip(headers, cells, strict=True)]
        total = sum(widths) + 3 * len(widths) + 1
        if total > options.max_width:
            widths = _wrapped_widths(widths, options.max_width - self._extra_width)
            if min(widths, default=1) < 1:
                return None
            total = sum(widths) + 3 * len(widths) + 1
        title = Text.from_markup(str(self.title)).plain if self.title else None
        if title is not None and (cell_len(title) > total or "\n" in title):
            return None

        def row(values: list[str], header: bool = False) -> list[str] | None:
            pieces = [_cut(v, w) for v, w in zip(values, widths, strict=True)]
            if any(p is None for p in pieces):
                return None
            height = max(len(p) for p in pieces if p is not None)
            # (rich sets a header's cells on the bottom line, the others from the top)
            filled = [[*[" " * w] * (height - len(p)), *p] if header else
                      [*p, *[" " * w] * (height - len(p))]
                      for p, w in zip(pieces, widths, strict=True) if p is not None]
            return ["| " + " | ".join(line) + " |" for line in zip(*filled, strict=True)]

        rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
        body = [row(headers, header=True),
                *(row([col[i] for col in cells]) for i in range(self.row_count))]
        if any(lines is None for lines in body):
            return None
        out = ([title] if title is not None else []) + [rule, *body[0], rule]  # type: ignore[misc]
        for lines in body[1:]:
            out += lines  # type: ignore[arg-type]
        out.append(rule)
        return [Text("\n".join(out))]


def _wrapped_widths(natural: list[int], room: int) -> list[int]:
    """The cell widths (without padding) rich gives columns whose widest cells are
    `natural` wide when the table must fit `room` columns (borders excluded): each column
    measured with its one-space padding and capped at the room, then the widest columns
    narrowed first (rich's own `_collapse_widths`), then all evenly (`ratio_reduce`). (rich
    measures each column again at its new width, which gives back that width.)"""
    from rich._ratio import ratio_reduce

    if room - 2 < 1:
        return [0] * len(natural)  # (rich's own narrow case: not copied)
    widths = [min(w, room - 2) + 2 for w in natural]
    if sum(widths) > room:
        widths = Table._collapse_widths(widths, [True] * len(widths), room)
        if sum(widths) > room:
            widths = ratio_reduce(sum(widths) - room, [1] * len(widths), widths, widths)
    return [w - 2 for w in widths]  # (each cell has one space either side)


def _cut(text: str, width: int) -> list[str] | None:
    """`text` as rich wraps a cell `width` wide (overflow "fold", left-justified): its
    lines, each padded to the width; None for what this does not copy."""
    from rich._wrap import divide_line
    from rich.cells import cell_len

    bounds = [0, *divide_line(text, width, fold=True), len(text)]
    lines = []
    for start, end in pairwise(bounds):
        piece = text[start:end]
        if cell_len(piece) > width:
            piece = piece.rstrip()  # (spaces past the width are dropped)
        size = cell_len(piece)
        if size > width:
            return None
        lines.append(piece + " " * (width - size))
    return lines


def table(env: Environment, *columns: str, title: str | None = None) -> Table:
    """A table that degrades to plain ASCII when results do not go to a terminal, and to
    one block per row when the terminal is too narrow to keep every word whole."""
    tty = env.results_on_terminal()
    t = FitTable(title=title, box=box.ROUNDED if tty else box.ASCII2, show_lines=False,
                 title_justify="left")
    for col in columns:
        t.add_column(col, overflow="fold")
    return t


def _mark(ok: bool) -> str:
    return "[green]ok[/]" if ok else "[bold red]FAIL[/]"


def print_validation(env: Environment, reports: Sequence[PlaybookReport]) -> None:
    con = env.console()
    for report in reports:
        name = report.name or report.path.name
        if report.rows:
            t = table(env, "stage", "audience", "channel", "values", "length / limit", "",
                      title=f"{name} ({report.path})")
            seen: set[tuple[str, str, str, str]] = set()
            for row in report.rows:
                # One line per distinct (stage, channel, mode, measure) keeps it readable.
                key = (row.stage, row.channel, row.mode, row.measure)
                if key in seen:
                    continue
                seen.add(key)
                channel = row.channel + (f" (fallback of {row.fallback_from})"
                                         if row.fallback_from else "")
                t.add_row(row.stage, row.audience or "", escape(channel), row.mode,
                          escape(row.measure), _mark(row.ok))
            con.print(t)
        for problem in report.problems:
            con.print(f"[bold red]error:[/] {escape(str(problem))}")
        status = "[green]passed[/]" if report.ok else (
            f"[bold red]failed[/] ({len(report.problems)} problem(s))")
        con.print(f"{escape(str(report.path))}: {status}")
    failed = sum(1 for r in reports if not r.ok)
    con.print(f"\n{len(reports)} playbook(s) checked, {failed} failed.")


def print_preview(env: Environment, result: PreviewResult) -> None:
    con = env.console()
    con.print(f"[bold]{escape(result.playbook)}[/] — stage [bold]{escape(result.stage)}[/]\n")
    for m in result.messages:
        head = f"[bold cyan]{escape(m.channel)}[/] ({m.channel_type}) → {escape(m.audience or '')}"
        if m.fallback_from:
            head += f"  [yellow](fallback when {escape(m.fallback_from)} is down)[/]"
        con.print(head)
        if m.subject is not None:
            con.print(f"  Subject: {escape(m.subject)}")
        for i, (part, meas) in enumerate(zip(m.parts, m.measures, strict=False), start=1):
            label = f"part {i}/{len(m.parts)}, " if len(m.parts) > 1 else ""
            limit = f"/{meas.limit}" if meas.limit is not None else ""
            detail = f", {meas.detail}" if meas.detail else ""
            counts = f"{label}{meas.value}{limit} {meas.unit}{detail}"
            con.print(f"  [dim]({counts})[/] {_mark(meas.ok)}")
            for line in part.splitlines() or [""]:
                con.print(f"  │ {escape(line)}")
        if m.html:
            con.print("  [dim](HTML part also sent)[/]")
        for problem in m.problems:
            con.print(f"  [bold red]error:[/] {escape(str(problem))}")
        con.print("")
