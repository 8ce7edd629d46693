"""Sandboxed Jinja2 with StrictUndefined: errors name the absolute line; no escapes."""

from __future__ import annotations

from pathlib import Path

import pytest

from incident_notify.errors import TemplateError
from incident_notify.render import Renderer


@pytest.fixture
def renderer(tmp_path: Path) -> Renderer:
    (tmp_path / "t.txt.j2").write_text("Hello {{ name }}\n{{ missing }}\n")
    return Renderer([tmp_path])


def test_renders_variables(renderer: Renderer) -> None:
    assert renderer.render("At {{ site }}.", {"site": "LON-2"}, origin="pb.yaml") == "At LON-2."


def test_missing_variable_is_an_error_at_the_absolute_line(renderer: Renderer) -> None:
    with pytest.raises(TemplateError) as info:
        renderer.render("line one\n{{ eta }}", {}, origin="pb.yaml", line=10)
    problem = info.value.problems[0]
    assert (problem.file, problem.line) == ("pb.yaml", 11)
    assert "'eta'" in problem.message and "--set eta=" in problem.hint


def test_missing_variable_never_renders_blank(renderer: Renderer) -> None:
    with pytest.raises(TemplateError):
        renderer.render("Status: {{ site }}", {}, origin="pb.yaml")


def test_syntax_error_line(renderer: Renderer) -> None:
    with pytest.raises(TemplateError) as info:
        renderer.render("ok\nok\n{{ site }", {"site": 1}, origin="pb.yaml", line=20)
    assert info.value.problems[0].line == 22
    assert "syntax" in info.value.problems[0].message


@pytest.mark.parametrize("source", [
    "{{ ''.__class__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
])
def test_sandbox_escapes_are_refused(renderer: Renderer, source: str) -> None:
    with pytest.raises(TemplateError) as info:
        renderer.render(source, {"site": "x"}, origin="pb.yaml")
    assert "unsafe" in info.value.problems[0].message


def test_missing_attribute_is_an_error(renderer: Renderer) -> None:
    with pytest.raises(TemplateError) as info:
        renderer.render("{{ incident.nope }}", {"incident": {"id": 1}}, origin="pb.yaml")
    assert "nope" in info.value.problems[0].message


def test_autoescape_only_for_html(renderer: Renderer) -> None:
    v = {"x": "<b>&"}
    assert renderer.render("{{ x }}", v, origin="p") == "<b>&"
    assert renderer.render("{{ x }}", v, origin="p", html=True) == "&lt;b&gt;&amp;"


def test_missing_template_file(renderer: Renderer, tmp_path: Path) -> None:
    with pytest.raises(TemplateError) as info:
        renderer.render_file("nope.j2", {}, origin="pb.yaml", line=7)
    problem = info.value.problems[0]
    assert (problem.file, problem.line) == ("pb.yaml", 7)
    assert str(tmp_path) in problem.hint


def test_error_inside_template_file_names_the_file(renderer: Renderer, tmp_path: Path) -> None:
    with pytest.raises(TemplateError) as info:
        renderer.render_file("t.txt.j2", {"name": "x"}, origin="pb.yaml", line=7)
    problem = info.value.problems[0]
    assert problem.file.endswith("t.txt.j2") and problem.line == 2
    assert "pb.yaml:7" in problem.hint


def test_variables_used(renderer: Renderer) -> None:
    names = renderer.variables_used(source="{{ a }}{% if b %}{{ c | upper }}{% endif %}")
    assert names == {"a", "b", "c"}
    assert renderer.variables_used(name="t.txt.j2") == {"name", "missing"}
